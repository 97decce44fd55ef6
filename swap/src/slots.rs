//! Slot allocation: [`SlotMap`] per device, [`SwapSpace`] over several devices.
//!
//! # Slot states
//!
//! ```text
//!            alloc / alloc_run                 dup (fork shares the page)
//!   Free ───────────────────────▶ Used(1) ───────────────────────▶ Used(n+1)
//!    ▲                              │  ▲                               │
//!    │       free, last reference   │  └──────────── free ─────────────┘
//!    └──────────────────────────────┘
//!                                   │ free, last reference, device marked the slot bad
//!                                   ▼
//!                                Retired (never handed out again)
//! ```
//!
//! * `used` is a `bitvec` bitfield (bit set = Used or Retired), searched a word at a time
//!   from a rotating cursor, so allocation is O(1) amortised and successive allocations
//!   are contiguous: eviction gets *clustered runs* ([`SwapSpace::alloc_run`]) that it
//!   writes with one request per run.
//! * `refs` counts owners. A forked child that inherits a swapped page calls
//!   [`SwapSpace::dup`]; each owner calls [`SwapSpace::release`] (or `free`) when its page is freed.
//!   Reading a page back does **not** free its slot: a clean page swapped back in keeps
//!   its entry, so evicting it again needs no write (the caller frees the slot when the
//!   page is written to, or freed).
//! * A [`SlotMap`] is owned by one thread at a time. A [`SwapSpace`] is `Sync`: each
//!   device's map sits behind its own lock, held for one allocation, `dup` or `free`
//!   (O(1) amortised, as above), so the daemon and every worker allocate and free from
//!   their own threads with `&SwapSpace` (an `Arc<SwapSpace>`), and threads working on
//!   different devices never contend. Only [`SwapSpace::add`] needs `&mut` (set-up). The
//!   device's *bad* map is atomics, set by any engine.
//! * Lock order: one device lock at a time, never nested; no other lock is taken under it.
//!
//! # Devices and priorities
//! Like `swapon -p`: the highest priority group is tried first; within a group the
//! devices take turns (round-robin per allocation). A device with no free slot is skipped;
//! when all are full the allocator returns [`SwapError::NoSpace`] so eviction can go to the
//! OOM policy.

use std::ops::Range;
use usm_sync::Arc;

use bitvec::prelude::{BitVec, Lsb0};
use usm_sync::atomic::{AtomicUsize, Ordering};
use usm_sync::{Mutex, MutexGuard};

use crate::device::SwapDevice;
use crate::entry::{DeviceId, MAX_SLOT, SwapEntry};
use crate::error::{Result, SwapError};

const RETIRED: u16 = u16::MAX;
const MAX_REFS: u16 = u16::MAX - 1;
/// How many free holes a run search inspects before settling for the longest one seen.
const MAX_HOLES: u32 = 64;

/// The slot map of one device: which slots are used and by how many owners.
#[derive(Debug, Clone)]
pub struct SlotMap {
    device: DeviceId,
    used: BitVec<u64, Lsb0>,
    refs: Vec<u16>,
    free: u64,
    retired: u64,
    cursor: usize,
}

impl SlotMap {
    /// An empty map of `slots` slots on `device`.
    pub fn new(device: DeviceId, slots: u64) -> Self {
        let n = slots as usize;
        Self {
            device,
            used: BitVec::repeat(false, n),
            refs: vec![0; n],
            free: slots,
            retired: 0,
            cursor: 0,
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> u64 {
        self.used.len() as u64
    }

    /// Number of free slots.
    pub fn free_slots(&self) -> u64 {
        self.free
    }

    /// Number of retired (bad) slots.
    pub fn retired_slots(&self) -> u64 {
        self.retired
    }

    fn entry(&self, slot: u64) -> SwapEntry {
        // Exact for every map built by `SwapSpace` (device ids below 255, slots below
        // 2^56); a hand-built map with device 255 reports its errors against device 254.
        SwapEntry::new(DeviceId(self.device.0.min(254)), slot & MAX_SLOT).unwrap_or(ENTRY_ZERO)
    }

    /// Allocates one slot.
    pub fn alloc(&mut self) -> Option<u64> {
        self.alloc_run(1).map(|r| r.start)
    }

    /// Allocates a contiguous run of 1..=`max` free slots, preferring a full run of `max`
    /// near the cursor; `None` when the device is full.
    pub fn alloc_run(&mut self, max: u32) -> Option<Range<u64>> {
        if self.free == 0 {
            return None;
        }
        let max = max.max(1) as usize;
        let n = self.used.len();
        let mut best: Option<(usize, usize)> = None;
        let mut holes = 0;
        'search: for (a, b) in [(self.cursor, n), (0, self.cursor)] {
            let mut pos = a;
            while pos < b {
                let Some(i) = self.used[pos..b].first_zero() else {
                    break;
                };
                let start = pos + i;
                let limit = (start + max).min(b);
                let len = self.used[start..limit].first_one().unwrap_or(limit - start);
                if best.is_none_or(|(_, l)| len > l) {
                    best = Some((start, len));
                }
                holes += 1;
                if len == max || holes >= MAX_HOLES {
                    break 'search;
                }
                pos = start + len;
            }
        }
        let (start, len) = best?;
        self.used[start..start + len].fill(true);
        self.refs[start..start + len].fill(1);
        self.free -= len as u64;
        self.cursor = if start + len >= n { 0 } else { start + len };
        Some(start as u64..(start + len) as u64)
    }

    /// Owners of `slot` (0 when free or retired).
    pub fn refcount(&self, slot: u64) -> u16 {
        match self.refs.get(slot as usize) {
            Some(&RETIRED) | None => 0,
            Some(&r) => r,
        }
    }

    /// Adds an owner to an allocated slot; returns the new count.
    pub fn dup(&mut self, slot: u64) -> Result<u16> {
        let e = self.entry(slot);
        match self.refs.get_mut(slot as usize) {
            None | Some(0) | Some(&mut RETIRED) => Err(SwapError::NotAllocated(e)),
            Some(&mut MAX_REFS) => Err(SwapError::RefcountOverflow(e)),
            Some(r) => {
                *r += 1;
                Ok(*r)
            }
        }
    }

    /// Drops an owner. When it was the last one the slot becomes free — or retired when
    /// `retire` (the device marked it bad). Returns whether it was the last owner.
    pub fn release(&mut self, slot: u64, retire: bool) -> Result<bool> {
        let e = self.entry(slot);
        let r = match self.refs.get_mut(slot as usize) {
            None | Some(0) | Some(&mut RETIRED) => return Err(SwapError::NotAllocated(e)),
            Some(r) => r,
        };
        *r -= 1;
        if *r > 0 {
            return Ok(false);
        }
        if retire {
            *r = RETIRED;
            self.retired += 1;
        } else {
            self.used.set(slot as usize, false);
            self.free += 1;
        }
        Ok(true)
    }
}

/// Device 0, slot 0: a constant fallback (checked at compile time).
const ENTRY_ZERO: SwapEntry = match SwapEntry::new(DeviceId(0), 0) {
    Some(e) => e,
    None => panic!("device 0 slot 0 is a valid entry"),
};

/// A contiguous run of slots on one device, from [`SwapSpace::alloc_run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRun {
    /// The first entry.
    pub first: SwapEntry,
    /// Number of slots (at least 1).
    pub len: u32,
}

impl SlotRun {
    /// The `i`-th entry of the run.
    pub fn entry(&self, i: u32) -> Option<SwapEntry> {
        (i < self.len)
            .then(|| SwapEntry::new(self.first.device(), self.first.slot() + u64::from(i)))
            .flatten()
    }

    /// All entries of the run, in order.
    pub fn entries(&self) -> impl Iterator<Item = SwapEntry> + '_ {
        (0..self.len).filter_map(|i| self.entry(i))
    }
}

#[derive(Debug)]
struct Member {
    device: Arc<SwapDevice>,
    map: Mutex<SlotMap>,
    priority: i32,
}

impl Member {
    fn free_slots(&self) -> u64 {
        if self.device.is_out_of_space() {
            0
        } else {
            self.map().free_slots()
        }
    }

    /// The device's slot map, locked. A panic while it was held cannot leave the map
    /// half-updated (its methods check before they write), so a poisoned lock is entered.
    fn map(&self) -> MutexGuard<'_, SlotMap> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Group {
    priority: i32,
    members: Vec<usize>,
    /// Round-robin turn among equal priorities (a hint: a race only changes which device
    /// of the group is tried first).
    next: AtomicUsize,
}

/// Every swap device of a runtime with its slot map, allocating by priority. `Sync`:
/// share it (`Arc<SwapSpace>`) between the threads that allocate and free slots; see the
/// module docs.
#[derive(Debug, Default)]
pub struct SwapSpace {
    members: Vec<Member>,
    groups: Vec<Group>,
}

impl SwapSpace {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` with `priority` (higher is used first, like `swapon -p`).
    pub fn add(&mut self, device: Arc<SwapDevice>, priority: i32) -> Result<()> {
        let id = device.id();
        if self.members.iter().any(|m| m.device.id() == id) {
            return Err(SwapError::DuplicateDevice(id));
        }
        let idx = self.members.len();
        self.members.push(Member {
            map: Mutex::new(SlotMap::new(id, device.slots())),
            device,
            priority,
        });
        match self.groups.iter_mut().find(|g| g.priority == priority) {
            Some(g) => g.members.push(idx),
            None => {
                self.groups.push(Group {
                    priority,
                    members: vec![idx],
                    next: AtomicUsize::new(0),
                });
                self.groups.sort_by_key(|g| std::cmp::Reverse(g.priority));
            }
        }
        Ok(())
    }

    /// The devices, for [`Engine::new`](crate::Engine::new).
    pub fn devices(&self) -> Vec<Arc<SwapDevice>> {
        self.members.iter().map(|m| m.device.clone()).collect()
    }

    /// The device with id `id`.
    pub fn device(&self, id: DeviceId) -> Option<&Arc<SwapDevice>> {
        self.member(id).map(|m| &m.device)
    }

    /// The priority `id` was added with.
    pub fn priority(&self, id: DeviceId) -> Option<i32> {
        self.member(id).map(|m| m.priority)
    }

    fn member(&self, id: DeviceId) -> Option<&Member> {
        self.members.iter().find(|m| m.device.id() == id)
    }

    fn member_or_err(&self, id: DeviceId) -> Result<&Member> {
        self.member(id).ok_or(SwapError::UnknownDevice(id))
    }

    /// Allocates one slot on the best device with space.
    pub fn alloc(&self) -> Result<SwapEntry> {
        self.alloc_run(1).map(|r| r.first)
    }

    /// Allocates a run of 1..=`max` contiguous slots on the highest-priority device with a
    /// free slot (round-robin among equal priorities). [`SwapError::NoSpace`] when every
    /// device is full.
    pub fn alloc_run(&self, max: u32) -> Result<SlotRun> {
        for g in &self.groups {
            let count = g.members.len();
            let first = g.next.load(Ordering::Relaxed);
            for k in 0..count {
                let turn = (first + k) % count;
                let m = &self.members[g.members[turn]];
                if m.device.is_out_of_space() {
                    continue;
                }
                let run = m.map().alloc_run(max);
                if let Some(run) = run {
                    g.next.store((turn + 1) % count, Ordering::Relaxed);
                    return Self::to_run(m.device.id(), run);
                }
            }
        }
        Err(SwapError::NoSpace { device: None })
    }

    /// Allocates a run on device `id` only.
    pub fn alloc_run_on(&self, id: DeviceId, max: u32) -> Result<SlotRun> {
        let m = self.member_or_err(id)?;
        if m.device.is_out_of_space() {
            return Err(SwapError::NoSpace { device: Some(id) });
        }
        let run = m.map().alloc_run(max);
        match run {
            Some(run) => Self::to_run(id, run),
            None => Err(SwapError::NoSpace { device: Some(id) }),
        }
    }

    fn to_run(id: DeviceId, run: Range<u64>) -> Result<SlotRun> {
        let first = SwapEntry::new(id, run.start).ok_or(SwapError::UnknownDevice(id))?;
        Ok(SlotRun {
            first,
            len: (run.end - run.start) as u32,
        })
    }

    /// Adds an owner to `entry` (fork). Returns the new count.
    pub fn dup(&self, entry: SwapEntry) -> Result<u16> {
        self.member_or_err(entry.device())?.map().dup(entry.slot())
    }

    /// Drops an owner of `entry`; the last owner frees the slot (or retires it if the
    /// device marked it bad). Returns whether the slot lost its last owner. Callable from
    /// any thread through `&SwapSpace`.
    pub fn release(&self, entry: SwapEntry) -> Result<bool> {
        let m = self.member_or_err(entry.device())?;
        let bad = m.device.is_bad(entry.slot());
        m.map().release(entry.slot(), bad)
    }

    /// [`release`](Self::release) for a caller that holds the space exclusively (kept
    /// with `&mut self` for the callers written before the space was shared).
    pub fn free(&mut self, entry: SwapEntry) -> Result<bool> {
        self.release(entry)
    }

    /// Owners of `entry` (0 when free, retired or unknown).
    pub fn refcount(&self, entry: SwapEntry) -> u16 {
        self.member(entry.device())
            .map_or(0, |m| m.map().refcount(entry.slot()))
    }

    /// Free slots on all devices (a sum of per-device snapshots; a device whose file
    /// system is full has none, see [`SwapDevice::mark_out_of_space`]).
    pub fn free_slots(&self) -> u64 {
        self.members.iter().map(Member::free_slots).sum()
    }

    /// Free slots on device `id` (none once its file system is full).
    pub fn free_slots_on(&self, id: DeviceId) -> Option<u64> {
        self.member(id).map(Member::free_slots)
    }

    /// Slots on all devices.
    pub fn total_slots(&self) -> u64 {
        self.members.iter().map(|m| m.map().capacity()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_are_contiguous_and_exhaustion_is_reported() {
        let mut m = SlotMap::new(DeviceId(3), 100);
        let a = m.alloc_run(32).unwrap();
        assert_eq!(a, 0..32);
        let b = m.alloc_run(32).unwrap();
        assert_eq!(b, 32..64);
        let c = m.alloc_run(64).unwrap();
        assert_eq!(c, 64..100);
        assert_eq!(m.free_slots(), 0);
        assert_eq!(m.alloc(), None);
        assert!(m.release(40, false).unwrap());
        assert_eq!(m.alloc(), Some(40));
    }

    #[test]
    fn longest_hole_is_chosen_when_no_full_run_exists() {
        let mut m = SlotMap::new(DeviceId(0), 64);
        m.alloc_run(64).unwrap();
        for s in [3, 10, 11, 12, 30, 31] {
            m.release(s, false).unwrap();
        }
        assert_eq!(m.alloc_run(8), Some(10..13));
    }

    #[test]
    fn refcounts_and_retirement() {
        let mut m = SlotMap::new(DeviceId(1), 8);
        let s = m.alloc().unwrap();
        assert_eq!(m.dup(s).unwrap(), 2);
        assert!(!m.release(s, false).unwrap());
        assert_eq!(m.refcount(s), 1);
        assert!(m.release(s, true).unwrap());
        assert_eq!(m.refcount(s), 0);
        assert_eq!(m.retired_slots(), 1);
        assert!(matches!(
            m.release(s, false),
            Err(SwapError::NotAllocated(_))
        ));
        assert!(matches!(m.dup(s), Err(SwapError::NotAllocated(_))));
        // The retired slot is never handed out again.
        let all: Vec<u64> = std::iter::from_fn(|| m.alloc()).collect();
        assert_eq!(all.len(), 7);
        assert!(!all.contains(&s));
    }

    proptest! {
        #[test]
        fn model_check_against_a_set(ops in proptest::collection::vec((0u8..3, 1u32..9, 0usize..64), 1..300)) {
            let mut m = SlotMap::new(DeviceId(2), 64);
            let mut model: std::collections::BTreeMap<u64, u16> = Default::default();
            for (op, n, pick) in ops {
                match op {
                    0 => match m.alloc_run(n) {
                        Some(r) => {
                            prop_assert!(r.end - r.start >= 1 && r.end - r.start <= u64::from(n));
                            for s in r { prop_assert!(model.insert(s, 1).is_none()); }
                        }
                        None => prop_assert_eq!(model.len(), 64),
                    },
                    1 => if let Some((&s, _)) = model.iter().nth(pick % model.len().max(1)) {
                        let c = m.dup(s).unwrap();
                        *model.get_mut(&s).unwrap() += 1;
                        prop_assert_eq!(c, model[&s]);
                    },
                    _ => if let Some((&s, _)) = model.iter().nth(pick % model.len().max(1)) {
                        let last = m.release(s, false).unwrap();
                        let c = model.get_mut(&s).unwrap();
                        *c -= 1;
                        prop_assert_eq!(last, *c == 0);
                        if *c == 0 { model.remove(&s); }
                    },
                }
                prop_assert_eq!(m.free_slots(), 64 - model.len() as u64);
            }
        }
    }
}
