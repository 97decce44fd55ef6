//! A small `bitflags`-like macro for the typed flag sets of the userfaultfd API.

/// Declares a `u64` flag-set newtype with named constants, set operations, `Display`
/// (`A | B`, unknown bits in hex, `(none)` when empty), `Debug` and `serde::Serialize`
/// (a list of names).
macro_rules! flag_set {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* const $flag:ident = $value:expr; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u64);

        #[allow(dead_code)]
        impl $name {
            $( $(#[$fmeta])* pub const $flag: $name = $name($value); )*

            /// Every named flag with its name, in bit order.
            pub const NAMED: &'static [(&'static str, $name)] =
                &[ $( (stringify!($flag), $name($value)) ),* ];

            /// Every named flag.
            pub const ALL: $name = $name(0 $( | $value )*);

            /// The empty set.
            pub const fn empty() -> Self {
                Self(0)
            }
            /// A set with exactly these bits, unknown ones kept.
            pub const fn from_bits_retain(bits: u64) -> Self {
                Self(bits)
            }
            /// The raw bits.
            pub const fn bits(self) -> u64 {
                self.0
            }
            /// No bit set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }
            /// Every bit of `other` is set in `self`.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
            /// Some bit of `other` is set in `self`.
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }
            /// `self | other`.
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }
            /// `self & other`.
            pub const fn intersection(self, other: Self) -> Self {
                Self(self.0 & other.0)
            }
            /// `self & !other`.
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }
            /// Bits set that have no name here.
            pub const fn unknown_bits(self) -> u64 {
                self.0 & !Self::ALL.0
            }
            /// The named flags set in `self`, one at a time.
            pub fn iter_names(self) -> impl Iterator<Item = (&'static str, Self)> {
                Self::NAMED.iter().copied().filter(move |(_, f)| self.contains(*f))
            }
            /// The name of a single-bit set, if it has one.
            pub fn name(self) -> Option<&'static str> {
                Self::NAMED.iter().find(|(_, f)| *f == self).map(|(n, _)| *n)
            }
        }

        impl core::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.union(rhs)
            }
        }
        impl core::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }
        impl core::ops::BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self {
                self.intersection(rhs)
            }
        }
        impl core::ops::Sub for $name {
            type Output = Self;
            fn sub(self, rhs: Self) -> Self {
                self.difference(rhs)
            }
        }
        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                if self.0 == 0 {
                    return f.write_str("(none)");
                }
                let mut first = true;
                for (n, _) in self.iter_names() {
                    if !first {
                        f.write_str(" | ")?;
                    }
                    f.write_str(n)?;
                    first = false;
                }
                let unknown = self.unknown_bits();
                if unknown != 0 {
                    if !first {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{unknown:#x}")?;
                }
                Ok(())
            }
        }
        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let mut seq = s.serialize_seq(None)?;
                for (n, _) in self.iter_names() {
                    seq.serialize_element(n)?;
                }
                seq.end()
            }
        }
    };
}

pub(crate) use flag_set;
