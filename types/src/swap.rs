//! Swap entries (`to_swap` in the USM documents) and I/O tickets.
//!
//! A [`SwapEntry`] names one 4 KiB slot on one device in a single `u64`:
//!
//! ```text
//!  63        56 55                                   0
//! +------------+--------------------------------------+
//! | device + 1 |               slot                   |
//! +------------+--------------------------------------+
//! ```
//!
//! The device field is stored plus one so that the all-zero word never names a valid
//! entry; the original USM implementation lost the device bits when encoding, this one
//! round-trips every (device, slot) pair it accepts (see the tests).

/// Index of a swap device in the runtime's device table (`0..=254`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct DeviceId(pub u8);

/// The largest slot number an entry can carry (2^56 - 1 slots of 4 KiB: far beyond any
/// device).
pub const MAX_SLOT: u64 = (1 << 56) - 1;

/// A (device, slot) pair packed into one `u64`; never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SwapEntry(u64);

impl SwapEntry {
    /// Packs `device` and `slot`. Returns `None` when the slot does not fit in 56 bits or
    /// the device is 255 (reserved).
    pub const fn new(device: DeviceId, slot: u64) -> Option<Self> {
        if slot > MAX_SLOT || device.0 == u8::MAX {
            return None;
        }
        Some(Self((((device.0 as u64) + 1) << 56) | slot))
    }

    /// The device the slot is on.
    pub const fn device(self) -> DeviceId {
        DeviceId(((self.0 >> 56) - 1) as u8)
    }

    /// The slot number on its device.
    pub const fn slot(self) -> u64 {
        self.0 & MAX_SLOT
    }

    /// The packed word, for tables that store raw `u64`s.
    pub const fn to_raw(self) -> u64 {
        self.0
    }

    /// Unpacks a word made by [`to_raw`](Self::to_raw); `None` for 0 or a reserved device.
    pub const fn from_raw(raw: u64) -> Option<Self> {
        let dev = raw >> 56;
        if dev == 0 || dev == 256 {
            None
        } else {
            Some(Self(raw))
        }
    }
}

impl core::fmt::Display for SwapEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "swap({}:{})", self.device().0, self.slot())
    }
}

/// The completion token of one queued swap I/O. Unique per engine for the engine's life;
/// the runtime maps it to the workee parked on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Ticket(pub u64);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_is_never_an_entry() {
        assert_eq!(SwapEntry::from_raw(0), None);
        assert_ne!(SwapEntry::new(DeviceId(0), 0).unwrap().to_raw(), 0);
    }

    #[test]
    fn reserved_device_and_oversized_slot_are_refused() {
        assert_eq!(SwapEntry::new(DeviceId(255), 1), None);
        assert_eq!(SwapEntry::new(DeviceId(0), MAX_SLOT + 1), None);
    }

    proptest! {
        #[test]
        fn round_trips_across_devices(dev in 0u8..255, slot in 0u64..=MAX_SLOT) {
            let e = SwapEntry::new(DeviceId(dev), slot).unwrap();
            prop_assert_eq!(e.device(), DeviceId(dev));
            prop_assert_eq!(e.slot(), slot);
            prop_assert_eq!(SwapEntry::from_raw(e.to_raw()), Some(e));
        }

        #[test]
        fn distinct_pairs_stay_distinct(a in (0u8..255, 0u64..1<<20), b in (0u8..255, 0u64..1<<20)) {
            let ea = SwapEntry::new(DeviceId(a.0), a.1).unwrap();
            let eb = SwapEntry::new(DeviceId(b.0), b.1).unwrap();
            prop_assert_eq!(ea == eb, a == b);
        }
    }
}
