//! One tagged address space as the daemon sees it: which pages it mapped, which are on
//! their way out, which are in swap.
//!
//! # Page states (keyed by page address; absent = the daemon holds nothing for it)
//! ```text
//!   (absent) ──fault: COPY zeros──► Resident ──evictor: agent MOVE to staging──► Out(cell: Evicting)
//!      ▲                              ▲                                              │ daemon reads staging
//!      │ UNMAP / REMOVE / exit        │ fault: COPY from cell                       ▼
//!      └──────────────────────────────┴────────────────────────── Out(cell: Cached ─► Stored(slot))
//! ```
//! - `Resident`: the program has the page; it costs one frame of the pool budget.
//! - `Out(cell)`: the program has a hole there. The [`SwapCell`] says where the data is:
//!   still being moved to staging (`Evicting`), in a daemon buffer while its write is in
//!   flight (`Cached`, the "swap cache"), or in a swap slot (`Stored`). A fault copies it
//!   back from the cell and the entry becomes `Resident`.
//! - After `fork`, parent and child share cells (`Arc`): the slot is freed when the last
//!   sharer lets go, which is the slot's reference count.
//!
//! # Policies
//! The map owns its process's configured policies ([`super::policy`]): the allocation and
//! OOM policies in `policy`, the eviction policy with the hints in `fifo`. Every page that
//! becomes resident and charged is announced to the eviction policy (`on_map`), every one
//! that leaves is forgotten (`on_gone`); the evictor takes victims with `fifo.pop_front()`.
//!
//! # Fencing address reuse (per-range generations)
//! Every change of the map by an event (UNMAP, REMOVE, REMAP, fork) bumps `generation`
//! and stamps the affected range with it in `range_gens` ([`RangeGens`]). A workee that
//! lets go of the lock (to read swap) notes [`PageMap::generation_at`] of its page first
//! and installs only if the page's generation is unchanged *and* the entry is still the
//! very cell it read (`Arc::ptr_eq`): a page freed and re-mapped meanwhile has a newer
//! generation, so a stale swap-in is dropped instead of landing in new memory. A fault on
//! a vacant page decides and installs under one hold of the lock, and the kernel refuses
//! the install (`EAGAIN`) while an UNMAP/REMOVE/REMAP event is unread.

use std::collections::{BTreeMap, HashMap};
use usm_sync::atomic::{AtomicU64, Ordering};
use usm_sync::{Arc, Mutex};

use usm_swap::{PageBuf, SwapEntry};

use super::policy::{AllocSide, Victims};
use super::swapio::SwapStore;
use super::sys::PAGE;

/// Where an evicted page's data is.
pub(crate) enum CellData {
    /// The agent is moving it to staging; the daemon has no copy yet.
    Evicting,
    /// The daemon has it in memory (its swap write may be in flight).
    Cached(PageBuf),
    /// Only the swap slot has it.
    Stored(SwapEntry),
    /// Lost (the agent failed after the page left the program, or the slot cannot be
    /// read): a fault gets `UFFDIO_POISON`, never zeros.
    Lost,
}

/// An evicted page, shared by every address space that still refers to it.
pub(crate) struct SwapCell {
    pub(crate) data: Mutex<CellData>,
    /// While `Evicting`: the staging slot's address in the program. A fault on the page
    /// proves the agent's MOVE happened (the page was present before), so the data can
    /// be read from there before the agent's completion arrives — the agent's own
    /// thread may be the one faulting.
    pub(crate) staging: u64,
    /// The page's address now (a `mremap` moves it while it is out).
    pub(crate) addr: AtomicU64,
    store: Arc<SwapStore>,
}

impl SwapCell {
    pub(crate) fn new(store: Arc<SwapStore>, staging: u64, addr: u64) -> Arc<SwapCell> {
        Arc::new(SwapCell {
            data: Mutex::new(CellData::Evicting),
            staging,
            addr: AtomicU64::new(addr),
            store,
        })
    }

    /// Is this cell what `map` holds for its page (wherever a `mremap` put it)?
    pub(crate) fn is_in(self: &Arc<Self>, map: &PageMap) -> bool {
        let a = self.addr.load(Ordering::Acquire);
        matches!(map.pages.get(&a), Some(PageState::Out(c)) if Arc::ptr_eq(c, self))
    }
}

impl Drop for SwapCell {
    fn drop(&mut self) {
        if let Ok(CellData::Stored(e)) = self.data.get_mut().map(|d| &*d) {
            self.store.free(*e);
        }
    }
}

/// One page's state.
#[derive(Clone)]
pub(crate) enum PageState {
    /// Mapped in the program; costs a frame (unless `borrowed`: inherited through fork,
    /// counted by the parent).
    Resident {
        /// Not charged to the pool (a fork child's inherited page).
        inherited: bool,
    },
    /// A hole in the program; the data is in the cell.
    Out(Arc<SwapCell>),
}

/// How a newly resident page is paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// The caller reserved the frame already ([`PageMap::try_reserve`]).
    Reserved,
    /// Charge it now (a reverted eviction).
    Now,
    /// Not charged: inherited through fork (the parent pays).
    Inherited,
}

/// The page map of one address space. Every change of `charged` is mirrored in the
/// daemon-wide `frames_used` counter, so the two never disagree.
pub(crate) struct PageMap {
    /// Daemon-wide frames in use (shared by every map).
    frames_used: Arc<AtomicU64>,
    pub(crate) pages: HashMap<u64, PageState>,
    /// The allocation and OOM policies.
    pub(crate) policy: AllocSide,
    /// The eviction policy (victims in its order: `pop_front`), the hints, and the frame
    /// numbers of resident pages. (Named for the queue it replaced: the evictor's calls
    /// `pop_front` / `push_front` are unchanged.)
    pub(crate) fifo: Victims,
    /// Bumped by every event that changes the map.
    pub(crate) generation: u64,
    /// The generation of each range an event touched.
    pub(crate) range_gens: RangeGens,
    /// Pages charged to the pool.
    pub(crate) charged: u64,
    /// Pages whose data is only outside the program (`Out`).
    pub(crate) out: u64,
}

/// What a range removal released.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Released {
    /// Charged frames given back to the pool.
    pub(crate) frames: u64,
    /// Pages that were out (cells dropped; slots freed with the last sharer).
    pub(crate) out: u64,
}

/// Reserves `n` frames of a pool of `pool` frames in `frames_used`; `false` when they
/// are not available.
pub(crate) fn try_reserve(frames_used: &AtomicU64, n: u64, pool: u64) -> bool {
    frames_used
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            (u + n <= pool).then_some(u + n)
        })
        .is_ok()
}

/// Gives back `n` reserved frames.
pub(crate) fn unreserve(frames_used: &AtomicU64, n: u64) {
    frames_used.fetch_sub(n, Ordering::AcqRel);
}

impl PageMap {
    /// An empty map charging `frames_used`, served by `policies`.
    pub(crate) fn new(frames_used: Arc<AtomicU64>, policies: (AllocSide, Victims)) -> PageMap {
        PageMap {
            frames_used,
            pages: HashMap::new(),
            policy: policies.0,
            fifo: policies.1,
            generation: 0,
            range_gens: RangeGens::default(),
            charged: 0,
            out: 0,
        }
    }

    /// Records a newly mapped page.
    pub(crate) fn set_resident(&mut self, page: u64, charge: Charge) {
        let old = self.pages.insert(
            page,
            PageState::Resident {
                inherited: charge == Charge::Inherited,
            },
        );
        self.account_removed(page, old.as_ref());
        if charge != Charge::Inherited {
            if charge == Charge::Now {
                self.frames_used.fetch_add(1, Ordering::AcqRel);
            }
            self.charged += 1;
            self.fifo.on_map(page);
        }
    }

    /// The generation of the last event that touched `page` (0: none).
    pub(crate) fn generation_at(&self, page: u64) -> u64 {
        self.range_gens.at(page)
    }

    /// Stamps `[start, end)` with a new generation.
    fn bump(&mut self, start: u64, end: u64) {
        self.generation += 1;
        self.range_gens.stamp(start, end, self.generation);
    }

    /// Marks a resident page as going out. Returns whether it was charged.
    pub(crate) fn set_out(&mut self, page: u64, cell: Arc<SwapCell>) -> bool {
        let old = self.pages.insert(page, PageState::Out(cell));
        let was_charged = matches!(old, Some(PageState::Resident { inherited: false }));
        self.account_removed(page, old.as_ref());
        self.out += 1;
        was_charged
    }

    fn account_removed(&mut self, page: u64, old: Option<&PageState>) {
        match old {
            Some(PageState::Resident { inherited: false }) => {
                self.fifo.on_gone(page);
                self.charged -= 1;
                self.frames_used.fetch_sub(1, Ordering::AcqRel);
            }
            Some(PageState::Out(_)) => self.out -= 1,
            _ => {}
        }
    }

    /// Drops everything in `[start, end)` (UNMAP, REMOVE, exit).
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) -> Released {
        self.bump(start, end);
        let mut rel = Released::default();
        let npages = end.saturating_sub(start) / PAGE;
        let keys: Vec<u64> = if npages as usize > self.pages.len() {
            self.pages
                .keys()
                .copied()
                .filter(|a| (start..end).contains(a))
                .collect()
        } else {
            (0..npages)
                .map(|i| start + i * PAGE)
                .filter(|a| self.pages.contains_key(a))
                .collect()
        };
        for k in keys {
            match self.pages.remove(&k) {
                Some(PageState::Resident { inherited: false }) => {
                    self.fifo.on_gone(k);
                    self.charged -= 1;
                    self.frames_used.fetch_sub(1, Ordering::AcqRel);
                    rel.frames += 1;
                }
                Some(PageState::Out(_)) => {
                    self.out -= 1;
                    rel.out += 1;
                }
                _ => {}
            }
        }
        rel
    }

    /// Moves `[from, from+len)` to `to` (mremap).
    pub(crate) fn remap(&mut self, from: u64, to: u64, len: u64) {
        self.bump(from, from.saturating_add(len));
        self.bump(to, to.saturating_add(len));
        self.fifo.move_hints(from, to, len);
        let moved: Vec<(u64, PageState)> = (0..len / PAGE)
            .filter_map(|i| {
                let a = from + i * PAGE;
                self.pages.remove(&a).map(|s| (a, s))
            })
            .collect();
        for (a, s) in &moved {
            if matches!(s, PageState::Resident { inherited: false }) {
                self.fifo.on_gone(*a);
            }
        }
        for (a, s) in moved {
            let b = a - from + to;
            match &s {
                PageState::Resident { inherited: false } => self.fifo.on_map(b),
                PageState::Out(c) => c.addr.store(b, Ordering::Release),
                PageState::Resident { inherited: true } => {}
            }
            self.pages.insert(b, s);
        }
    }

    /// The child's view after fork: same pages; resident ones are the child's through
    /// copy-on-write and not charged again, evicted ones share the parent's cells.
    pub(crate) fn fork_child(&mut self) -> PageMap {
        self.generation += 1;
        let policies = self.fifo.for_child(&self.policy);
        let mut child = PageMap::new(self.frames_used.clone(), policies);
        for (&a, s) in &self.pages {
            match s {
                PageState::Resident { .. } => {
                    child
                        .pages
                        .insert(a, PageState::Resident { inherited: true });
                }
                PageState::Out(c) => {
                    child.pages.insert(a, PageState::Out(c.clone()));
                    child.out += 1;
                }
            }
        }
        child
    }

    /// Drops everything (exit). Returns what was released.
    pub(crate) fn clear(&mut self) -> Released {
        self.bump(0, u64::MAX);
        let rel = Released {
            frames: self.charged,
            out: self.out,
        };
        self.pages.clear();
        self.fifo.clear();
        self.frames_used.fetch_sub(self.charged, Ordering::AcqRel);
        self.charged = 0;
        self.out = 0;
        rel
    }
}

/// Generations of address ranges: every page of a range an event touched carries that
/// event's generation (non-overlapping `[start, end)` → generation; pages never touched
/// are generation 0).
#[derive(Debug, Default)]
pub(crate) struct RangeGens {
    ranges: BTreeMap<u64, (u64, u64)>,
}

impl RangeGens {
    /// Most ranges kept; beyond it the oldest are forgotten. Forgetting is safe: a fence
    /// then sees a *different* generation (0) and the workee retries from the start.
    const MAX_RANGES: usize = 4096;

    /// The generation of `page` (0 when no event touched it).
    pub(crate) fn at(&self, page: u64) -> u64 {
        match self.ranges.range(..=page).next_back() {
            Some((_, &(end, generation))) if page < end => generation,
            _ => 0,
        }
    }

    /// Stamps `[start, end)` with `generation`, replacing whatever it overlaps.
    pub(crate) fn stamp(&mut self, start: u64, end: u64, generation: u64) {
        if start >= end {
            return;
        }
        // Cut the range that straddles `start`, and the one that straddles `end`.
        if let Some((&s, &(e, g))) = self.ranges.range(..start).next_back() {
            if e > start {
                self.ranges.insert(s, (start, g));
                if e > end {
                    self.ranges.insert(end, (e, g));
                }
            }
        }
        if let Some((&s, &(e, g))) = self.ranges.range(start..end).next_back() {
            if e > end {
                self.ranges.remove(&s);
                self.ranges.insert(end, (e, g));
            }
        }
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, (end, generation));
        if self.ranges.len() > Self::MAX_RANGES {
            let oldest = self.ranges.iter().min_by_key(|(_, v)| v.1).map(|(&s, _)| s);
            if let Some(s) = oldest {
                self.ranges.remove(&s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usm_policies::{Param, PolicyError, Registry};

    #[test]
    fn range_generations_split_and_replace() {
        let mut g = RangeGens::default();
        assert_eq!(g.at(0x5000), 0);
        g.stamp(0x1000, 0x9000, 1);
        g.stamp(0x3000, 0x5000, 2); // splits the first range in three
        assert_eq!(
            [0x1000, 0x2fff, 0x3000, 0x4fff, 0x5000, 0x8fff, 0x9000].map(|a| g.at(a)),
            [1, 1, 2, 2, 1, 1, 0]
        );
        g.stamp(0x2000, 0x6000, 3); // covers one whole range, cuts two
        assert_eq!(
            [0x1fff, 0x2000, 0x3000, 0x5fff, 0x6000].map(|a| g.at(a)),
            [1, 3, 3, 3, 1]
        );
        g.stamp(0, u64::MAX, 4);
        assert_eq!(g.at(0x8000), 4);
        assert_eq!(g.ranges.len(), 1);
    }

    fn map_with(reg: Registry, process: &str) -> PageMap {
        let reg = Arc::new(reg);
        let policies = super::super::policy::build(&reg, process, 7).unwrap();
        PageMap::new(Arc::new(AtomicU64::new(0)), policies)
    }

    #[test]
    fn victims_follow_the_eviction_policy_and_its_hints() {
        let mut reg = Registry::with_builtins();
        reg.assign_process("p", "hints").unwrap();
        let mut m = map_with(reg, "p");
        for i in 0..4u64 {
            m.set_resident(0x10000 + i * PAGE, Charge::Now);
        }
        assert_eq!(m.fifo.policy_name(), "hints");
        // Pages 0 and 1 may not be evicted; page 3 goes first.
        let deny = usm_policies::Hint::parse("EVICTION=DENY").unwrap();
        m.fifo.on_hint(0x10000..0x12000, &deny);
        let low = usm_policies::Hint::parse("PRIORITY=LOW").unwrap();
        m.fifo.on_hint(0x13000..0x14000, &low);
        assert_eq!(m.fifo.pop_front(), Some(0x13000));
        assert_eq!(m.fifo.pop_front(), Some(0x12000));
        assert_eq!(m.fifo.pop_front(), None, "DENY pages are refused");
        // Hard urgency (an OOM policy's EvictHarder) takes them.
        m.fifo.hard = 1;
        assert!(matches!(m.fifo.pop_front(), Some(0x10000 | 0x11000)));
        // A page the evictor could not take is tracked again.
        m.fifo.push_front(0x12000);
        assert_eq!(m.fifo.pop_front(), Some(0x12000));
        // Freed pages are forgotten.
        m.remove_range(0x10000, 0x14000);
        m.fifo.hard = 4;
        assert_eq!(m.fifo.pop_front(), None);
        assert_eq!(m.charged, 0);
    }

    struct PanicsOnVictims;

    impl usm_policies::EvictPolicy for PanicsOnVictims {
        fn name(&self) -> &str {
            "boom"
        }
        fn on_map(&mut self, _: usm_policies::MappedPage, _: &mut dyn usm_policies::EvictCx) {}
        fn on_free(&mut self, _: usm_kmod::FrameNo) {}
        fn victims(
            &mut self,
            _: usm_policies::VictimRequest,
            _: &mut dyn usm_policies::EvictCx,
            _: &mut Vec<usm_policies::MappedPage>,
        ) -> usm_policies::VictimScan {
            panic!("boom")
        }
        fn tracked(&self) -> usize {
            0
        }
    }

    #[test]
    fn a_panicking_eviction_policy_is_replaced_and_told_every_page() -> Result<(), PolicyError> {
        let mut reg = Registry::with_builtins();
        reg.register_evict("boom", Param::None, |_| Ok(Box::new(PanicsOnVictims)))?;
        reg.set_default("boom")?; // the default itself panics: the built-in fifo replaces it
        reg.assign_process("p", "first-fit")?;
        let mut m = map_with(reg, "p");
        m.set_resident(0x20000, Charge::Now);
        m.set_resident(0x21000, Charge::Now);
        let first = m.fifo.pop_front();
        assert_eq!(m.fifo.panics, 1);
        assert_eq!(m.fifo.policy_name(), "fifo");
        assert!(matches!(first, Some(0x20000 | 0x21000)), "{first:?}");
        assert!(m.fifo.pop_front().is_some());
        assert_eq!(m.fifo.pop_front(), None);
        Ok(())
    }

    #[test]
    fn a_fork_child_gets_fresh_policies_and_the_hints() {
        let mut reg = Registry::with_builtins();
        reg.assign_process("p", "fhp:64K").unwrap();
        reg.assign_process("p", "hints").unwrap();
        let mut m = map_with(reg, "p");
        let h = usm_policies::Hint::parse("HUGE=4K").unwrap();
        m.fifo.on_hint(0x40000..0x50000, &h);
        m.set_resident(0x40000, Charge::Now);
        let child = m.fork_child();
        assert_eq!(child.policy.alloc_name, "fhp:64K");
        assert_eq!(child.fifo.policy_name(), "hints");
        assert_eq!(child.fifo.hints.hint_at(0x48000).huge, Some(4096));
        assert!(m.generation_at(0x40000) == 0 && m.generation > 0);
        drop(child);
        m.remap(0x40000, 0x80000, 0x10000);
        assert_eq!(m.fifo.hints.hint_at(0x88000).huge, Some(4096));
        assert!(m.fifo.hints.hint_at(0x48000).is_empty());
        assert!(m.generation_at(0x40000) > 0 && m.generation_at(0x80000) > 0);
        assert_eq!(m.fifo.pop_front(), Some(0x80000));
    }
}
