//! The USM hint language and the per-process map from address ranges to hints.
//!
//! A program (or its config) describes a range of its memory with a short text:
//!
//! ```text
//! PRIORITY=HIGH; EVICTION=DENY; PREFETCH=8; HUGE=64K
//! ```
//!
//! | key        | values                          | meaning                                       |
//! |------------|---------------------------------|-----------------------------------------------|
//! | `PRIORITY` | `LOW`, `NORMAL`, `HIGH`         | eviction order: `LOW` pages go first          |
//! | `EVICTION` | `ALLOW`, `DENY`                 | `DENY`: never evicted while another victim exists |
//! | `PREFETCH` | `0..=512` (pages)               | also map up to N following vacant pages       |
//! | `HUGE`     | power of two, `4K..=2M`         | flexible-huge-page window for this range      |
//!
//! Items are separated by `;`; spaces around items, keys, `=` and values are ignored; keys
//! and values are case-insensitive; an empty item (a trailing `;`) is allowed. A key given
//! twice in one text is an error. Every error carries the byte offset and the text of the
//! offending token ([`HintError`]).
//!
//! [`HintMap`] attaches parsed hints to address ranges. A new hint *overlays* what is
//! already there field by field (a later `PRIORITY=LOW` over an `EVICTION=DENY` range keeps
//! the `DENY`), ranges are kept non-overlapping (split on insert) and adjacent equal ranges
//! are merged, so the question "what is this page's hint" is one `BTreeMap` lookup:
//! O(log n) in the number of distinct ranges.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use usm_types::PAGE_SIZE;

/// Eviction order of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub enum Priority {
    /// Evicted first.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Evicted last.
    High,
}

impl Priority {
    /// The class index used by eviction policies: `Low` = 0, `Normal` = 1, `High` = 2.
    pub const fn class(self) -> usize {
        match self {
            Priority::Low => 0,
            Priority::Normal => 1,
            Priority::High => 2,
        }
    }
}

/// Whether a range may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum Eviction {
    /// The default: the range may be evicted.
    #[default]
    Allow,
    /// The range is not evicted while any other victim exists (only an OOM policy that
    /// evicts harder may take it as a last resort).
    Deny,
}

/// A parsed hint. Every field is optional: `None` means "not said", which matters when a
/// hint overlays another ([`Hint::overlay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct Hint {
    /// `PRIORITY=`.
    pub priority: Option<Priority>,
    /// `EVICTION=`.
    pub eviction: Option<Eviction>,
    /// `PREFETCH=` in pages.
    pub prefetch: Option<u32>,
    /// `HUGE=` in bytes (a power of two, 4 KiB..=2 MiB).
    pub huge: Option<u64>,
}

/// The largest `PREFETCH=` value (pages; one 2 MiB window).
pub const MAX_PREFETCH: u32 = 512;

/// The smallest and largest `HUGE=` sizes.
pub const HUGE_RANGE: Range<u64> = PAGE_SIZE as u64..(2 << 20) + 1;

impl Hint {
    /// Parses a hint text (see the module docs for the language).
    pub fn parse(text: &str) -> Result<Hint, HintError> {
        let mut hint = Hint::default();
        let mut item_start = 0usize;
        for item in text.split(';') {
            let offset = item_start;
            item_start += item.len() + 1;
            let (lead, trimmed) = trim_with_offset(item);
            if trimmed.is_empty() {
                continue;
            }
            let item_off = offset + lead;
            let Some(eq) = trimmed.find('=') else {
                return Err(HintError::new(
                    item_off,
                    trimmed,
                    HintErrorKind::MissingEquals,
                ));
            };
            let (klead, key) = trim_with_offset(&trimmed[..eq]);
            let (vlead, value) = trim_with_offset(&trimmed[eq + 1..]);
            let key_off = item_off + klead;
            let val_off = item_off + eq + 1 + vlead;
            if key.is_empty() {
                return Err(HintError::new(item_off, trimmed, HintErrorKind::MissingKey));
            }
            let bad_value = |expected: &'static str| {
                HintError::new(val_off, value, HintErrorKind::BadValue { expected })
            };
            let duplicate = || HintError::new(key_off, key, HintErrorKind::DuplicateKey);
            if key.eq_ignore_ascii_case("PRIORITY") {
                if hint.priority.is_some() {
                    return Err(duplicate());
                }
                hint.priority = Some(match value.to_ascii_uppercase().as_str() {
                    "LOW" => Priority::Low,
                    "NORMAL" => Priority::Normal,
                    "HIGH" => Priority::High,
                    _ => return Err(bad_value("LOW, NORMAL or HIGH")),
                });
            } else if key.eq_ignore_ascii_case("EVICTION") {
                if hint.eviction.is_some() {
                    return Err(duplicate());
                }
                hint.eviction = Some(match value.to_ascii_uppercase().as_str() {
                    "ALLOW" => Eviction::Allow,
                    "DENY" => Eviction::Deny,
                    _ => return Err(bad_value("ALLOW or DENY")),
                });
            } else if key.eq_ignore_ascii_case("PREFETCH") {
                if hint.prefetch.is_some() {
                    return Err(duplicate());
                }
                match value.parse::<u32>() {
                    Ok(n) if n <= MAX_PREFETCH => hint.prefetch = Some(n),
                    _ => return Err(bad_value("a page count 0..=512")),
                }
            } else if key.eq_ignore_ascii_case("HUGE") {
                if hint.huge.is_some() {
                    return Err(duplicate());
                }
                match parse_size(value) {
                    Ok(b) if b.is_power_of_two() && HUGE_RANGE.contains(&b) => hint.huge = Some(b),
                    _ => return Err(bad_value("a power-of-two size from 4K to 2M")),
                }
            } else {
                return Err(HintError::new(key_off, key, HintErrorKind::UnknownKey));
            }
        }
        Ok(hint)
    }

    /// `self` with every field `newer` says replaced by `newer`'s value.
    pub fn overlay(&self, newer: &Hint) -> Hint {
        Hint {
            priority: newer.priority.or(self.priority),
            eviction: newer.eviction.or(self.eviction),
            prefetch: newer.prefetch.or(self.prefetch),
            huge: newer.huge.or(self.huge),
        }
    }

    /// Nothing is said.
    pub fn is_empty(&self) -> bool {
        *self == Hint::default()
    }

    /// The effective priority (`Normal` when not said).
    pub fn priority(&self) -> Priority {
        self.priority.unwrap_or_default()
    }

    /// `EVICTION=DENY` was said.
    pub fn denies_eviction(&self) -> bool {
        self.eviction == Some(Eviction::Deny)
    }
}

impl fmt::Display for Hint {
    /// The canonical text: `Hint::parse(&h.to_string()) == Ok(h)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(p) = self.priority {
            let p = match p {
                Priority::Low => "LOW",
                Priority::Normal => "NORMAL",
                Priority::High => "HIGH",
            };
            write!(f, "PRIORITY={p}")?;
            sep = "; ";
        }
        if let Some(e) = self.eviction {
            let e = match e {
                Eviction::Allow => "ALLOW",
                Eviction::Deny => "DENY",
            };
            write!(f, "{sep}EVICTION={e}")?;
            sep = "; ";
        }
        if let Some(n) = self.prefetch {
            write!(f, "{sep}PREFETCH={n}")?;
            sep = "; ";
        }
        if let Some(b) = self.huge {
            write!(f, "{sep}HUGE={}K", b >> 10)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Hint {
    type Err = HintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hint::parse(s)
    }
}

fn trim_with_offset(s: &str) -> (usize, &str) {
    let start = s.len() - s.trim_start().len();
    (start, s.trim())
}

/// What is wrong with a hint token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintErrorKind {
    /// An item without `=`.
    MissingEquals,
    /// `=VALUE` with no key.
    MissingKey,
    /// A key the language does not have.
    UnknownKey,
    /// A key given twice in one text.
    DuplicateKey,
    /// A value the key does not accept.
    BadValue {
        /// What the key accepts.
        expected: &'static str,
    },
}

impl fmt::Display for HintErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HintErrorKind::MissingEquals => f.write_str("expected KEY=VALUE"),
            HintErrorKind::MissingKey => f.write_str("missing key before `=`"),
            HintErrorKind::UnknownKey => {
                f.write_str("unknown key, expected PRIORITY, EVICTION, PREFETCH or HUGE")
            }
            HintErrorKind::DuplicateKey => f.write_str("key given twice"),
            HintErrorKind::BadValue { expected } => write!(f, "bad value, expected {expected}"),
        }
    }
}

/// A hint text that did not parse: where, which token, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad hint at byte {offset} (`{token}`): {kind}")]
pub struct HintError {
    /// Byte offset of the token in the hint text.
    pub offset: usize,
    /// The offending token.
    pub token: String,
    /// What is wrong with it.
    pub kind: HintErrorKind,
}

impl HintError {
    fn new(offset: usize, token: &str, kind: HintErrorKind) -> Self {
        HintError {
            offset,
            token: token.to_owned(),
            kind,
        }
    }
}

/// Parses a size: plain bytes (`65536`) or a number with a binary suffix `K`/`KB`/`KiB`,
/// `M`/`MB`/`MiB`, `G`/`GB`/`GiB` (case-insensitive; `64K` = 65536 bytes).
pub fn parse_size(text: &str) -> Result<u64, &'static str> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("a size must start with a number");
    }
    let n: u64 = t[..digits].parse().map_err(|_| "size out of range")?;
    let shift = match t[digits..].to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err("unknown size suffix (use K, M or G)"),
    };
    n.checked_mul(1 << shift).ok_or("size out of range")
}

/// Hints attached to address ranges of one process: non-overlapping `[start, end)` ranges,
/// adjacent equal ranges merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HintMap {
    /// start -> (end, hint); ranges never overlap and no hint stored is empty.
    ranges: BTreeMap<u64, (u64, Hint)>,
}

impl HintMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Overlays `hint` on `[start, start + len)` (see [`Hint::overlay`]). O(k log n) for
    /// the k ranges it touches.
    pub fn apply(&mut self, start: u64, len: u64, hint: &Hint) {
        let end = start.saturating_add(len);
        if start >= end || hint.is_empty() {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..end)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        let mut cursor = start;
        for (s, e) in inside {
            if cursor < s {
                self.ranges.insert(cursor, (s, *hint));
            }
            if let Some(entry) = self.ranges.get_mut(&s) {
                entry.1 = entry.1.overlay(hint);
            }
            cursor = e;
        }
        if cursor < end {
            self.ranges.insert(cursor, (end, *hint));
        }
        self.coalesce(start, end);
    }

    /// Forgets every hint on `[start, start + len)` (the range was unmapped).
    pub fn remove(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len);
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for k in keys {
            self.ranges.remove(&k);
        }
    }

    /// The hint of the page holding `addr`, if any range covers it. O(log n).
    pub fn get(&self, addr: u64) -> Option<&Hint> {
        match self.ranges.range(..=addr).next_back() {
            Some((_, (end, hint))) if addr < *end => Some(hint),
            _ => None,
        }
    }

    /// The hint of `addr`, or the empty hint.
    pub fn hint_at(&self, addr: u64) -> Hint {
        self.get(addr).copied().unwrap_or_default()
    }

    /// The number of distinct ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// No range has a hint.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in address order.
    pub fn iter(&self) -> impl Iterator<Item = (Range<u64>, &Hint)> + '_ {
        self.ranges.iter().map(|(&s, (e, h))| (s..*e, h))
    }

    /// Splits the range containing `at` (if `at` falls strictly inside one) in two.
    fn split_at(&mut self, at: u64) {
        let Some((&s, &(e, h))) = self.ranges.range(..at).next_back() else {
            return;
        };
        if s < at && at < e {
            self.ranges.insert(s, (at, h));
            self.ranges.insert(at, (e, h));
        }
    }

    /// Merges adjacent equal ranges from the one before `start` through `end`.
    fn coalesce(&mut self, start: u64, end: u64) {
        let lo = self
            .ranges
            .range(..start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let keys: Vec<u64> = self.ranges.range(lo..=end).map(|(&s, _)| s).collect();
        let mut cur: Option<u64> = None;
        for k in keys {
            let Some(c) = cur else {
                cur = Some(k);
                continue;
            };
            let (c_end, c_hint) = self.ranges[&c];
            let (k_end, k_hint) = self.ranges[&k];
            if c_end == k && c_hint == k_hint {
                self.ranges.remove(&k);
                self.ranges.insert(c, (k_end, c_hint));
            } else {
                cur = Some(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_usm_example() {
        let h = Hint::parse("PRIORITY=HIGH; EVICTION=DENY").unwrap();
        assert_eq!(h.priority, Some(Priority::High));
        assert!(h.denies_eviction());
        assert_eq!(h.prefetch, None);
    }

    #[test]
    fn parses_prefetch_huge_case_and_spaces() {
        let h = Hint::parse("  prefetch = 8 ;huge=64k;  ").unwrap();
        assert_eq!(h.prefetch, Some(8));
        assert_eq!(h.huge, Some(64 << 10));
        assert_eq!(Hint::parse("").unwrap(), Hint::default());
    }

    #[test]
    fn errors_point_at_the_bad_token() {
        let e = Hint::parse("PRIORITY=HIGH; EVICTON=DENY").unwrap_err();
        assert_eq!((e.offset, e.token.as_str()), (15, "EVICTON"));
        assert_eq!(e.kind, HintErrorKind::UnknownKey);

        let e = Hint::parse("PRIORITY=HIGH; EVICTION= NEVER").unwrap_err();
        assert_eq!((e.offset, e.token.as_str()), (25, "NEVER"));
        assert!(matches!(e.kind, HintErrorKind::BadValue { .. }));
        assert!(e.to_string().contains("byte 25"), "{e}");

        let e = Hint::parse("HUGE=48K").unwrap_err();
        assert_eq!((e.offset, e.token.as_str()), (5, "48K"));
        let e = Hint::parse("HUGE=4M").unwrap_err();
        assert_eq!(e.token, "4M");
        let e = Hint::parse("PREFETCH=513").unwrap_err();
        assert_eq!(e.token, "513");
        let e = Hint::parse("PRIORITY=LOW;  DENY").unwrap_err();
        assert_eq!(
            (e.offset, e.token.as_str(), e.kind),
            (15, "DENY", HintErrorKind::MissingEquals)
        );
        let e = Hint::parse("PRIORITY=LOW; priority=HIGH").unwrap_err();
        assert_eq!((e.offset, e.kind), (14, HintErrorKind::DuplicateKey));
        let e = Hint::parse(" =3").unwrap_err();
        assert_eq!((e.offset, e.kind), (1, HintErrorKind::MissingKey));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("K").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn overlay_keeps_unsaid_fields() {
        let mut m = HintMap::new();
        m.apply(0x1000, 0x4000, &Hint::parse("EVICTION=DENY").unwrap());
        m.apply(0x2000, 0x1000, &Hint::parse("PRIORITY=LOW").unwrap());
        assert_eq!(m.len(), 3);
        let mid = m.hint_at(0x2fff);
        assert!(mid.denies_eviction());
        assert_eq!(mid.priority(), Priority::Low);
        assert_eq!(m.hint_at(0x1000).priority(), Priority::Normal);
        assert!(m.get(0x5000).is_none());
        assert!(m.get(0xfff).is_none());
        // The same PRIORITY over the rest merges the three ranges back into one.
        m.apply(0x1000, 0x4000, &Hint::parse("PRIORITY=LOW").unwrap());
        assert_eq!(m.len(), 1);
        m.remove(0x2000, 0x1000);
        assert_eq!(m.len(), 2);
        assert!(m.get(0x2000).is_none());
        assert!(m.get(0x3000).is_some());
    }

    #[allow(clippy::disallowed_types)] // `prop_oneof!` expands to `std::sync::Arc`
    fn arb_hint() -> impl Strategy<Value = Hint> {
        (
            proptest::option::of(prop_oneof![
                Just(Priority::Low),
                Just(Priority::Normal),
                Just(Priority::High)
            ]),
            proptest::option::of(prop_oneof![Just(Eviction::Allow), Just(Eviction::Deny)]),
            proptest::option::of(0u32..=512),
            proptest::option::of((12u32..=21).prop_map(|s| 1u64 << s)),
        )
            .prop_map(|(priority, eviction, prefetch, huge)| Hint {
                priority,
                eviction,
                prefetch,
                huge,
            })
    }

    proptest! {
        #[test]
        fn display_round_trips(h in arb_hint()) {
            prop_assert_eq!(Hint::parse(&h.to_string()), Ok(h));
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,40}") {
            let _ = Hint::parse(&s);
        }

        /// The map agrees with a page-by-page model, stays non-overlapping and merged.
        #[test]
        fn map_matches_page_model(ops in proptest::collection::vec(
            (any::<bool>(), 0u64..64, 1u64..16, arb_hint()), 1..40)) {
            let mut map = HintMap::new();
            let mut model = [Hint::default(); 80];
            for (remove, page, len, hint) in ops {
                let (s, l) = (page * 4096, len * 4096);
                if remove {
                    map.remove(s, l);
                    for m in &mut model[page as usize..(page + len) as usize] {
                        *m = Hint::default();
                    }
                } else {
                    map.apply(s, l, &hint);
                    for m in &mut model[page as usize..(page + len) as usize] {
                        *m = m.overlay(&hint);
                    }
                }
                for (p, want) in model.iter().enumerate() {
                    prop_assert_eq!(map.hint_at(p as u64 * 4096 + 7), *want, "page {}", p);
                }
                let ranges: Vec<_> = map.iter().map(|(r, h)| (r, *h)).collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].0.end <= w[1].0.start);
                    prop_assert!(!(w[0].0.end == w[1].0.start && w[0].1 == w[1].1));
                }
                prop_assert!(ranges.iter().all(|(r, h)| r.start < r.end && !h.is_empty()));
            }
        }
    }
}
