//! [`Space`]: what the memory manager knows about one address space.
//!
//! # Page states (keyed by page address, 4 KiB aligned)
//!
//! ```text
//!            fault: Map                       victim: MOVE page -> staging slot
//!  (vacant) ───────────► Resident(frame) ─────────────────────────► Staging{frame, entry}
//!     ▲                     ▲    ▲   ▲                                 │   │ fault (swap-cache hit):
//!     │                     │    │   └──── MOVE back (or copy if the ──┘   │ page back at once
//!     │                     │    │         write still pins the slot)      │
//!     │     swap-in done    │    │                                         │ write-back done:
//!     │  (MOVE slot->page)  │    └─ Copied (COPY fallback: resident,       ▼ entry recorded, then
//!     │                     │       no pool frame, never evicted)    Swapped(entry)   frame freed
//!     │                 SwapIn{frame, entry, ticket, worker} ◄─────────────┘
//!     │                     │ read failed: UFFDIO_POISON
//!     │                     ▼
//!     └── range dropped ─ Poisoned (the program gets SIGBUS there, never zeros)
//! ```
//!
//! Access sampling adds one state beside `Resident`: `Resident(frame)` ⇄ `Sampled(frame)`.
//! A sampled page was moved out to its frame's own slot (`UFFDIO_MOVE`, no I/O) so that the
//! next access faults; that fault moves it back at once and tells the eviction policy the
//! page was accessed. A sampled page chosen as a victim is already out: its write-back is
//! queued straight from the slot (`Sampled → Staging`). Where pages leave only
//! asynchronously (daemon), a sample goes `Resident → Leaving { entry: None } → Sampled`
//! (or back to `Resident` if the page stayed).
//!
//! Who tracks what in the eviction policy: `Resident`, `Sampled` and a sample in flight
//! (`Leaving { entry: None }`) are tracked; a victim (`Leaving { entry: Some(_) }`,
//! `Staging`) was removed from the policy when it was chosen.
//!
//! A page absent from the map is *vacant*: no content anywhere, a zeroed frame may back it.
//!
//! # Ranges and generations
//! Every managed range carries a generation number, unique over the core's life. Each
//! asynchronous operation (write-back, swap-in) records the generation of the range its
//! page belonged to; when it completes and the range at that address is gone or has a
//! different generation (the address was reused), the result is dropped: frame freed,
//! swap slot freed. Nothing is installed into an address that changed owner.
//!
//! # Pins
//! I/O helpers pin pages for the duration of a syscall (`pins`: page → count). A pinned
//! page is never taken out of the address space by eviction.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use serde::Serialize;
use usm_kmod::FrameNo;
use usm_policies::{AllocPolicy, HintMap};
use usm_swap::{SwapEntry, Ticket};

/// The state of one managed page that has (or had) content. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageState {
    /// Mapped, backed by a pool frame.
    Resident(FrameNo),
    /// Resident, but moved out to its frame's slot for access sampling: the next access
    /// faults and moves it back (see the module docs). Still tracked by the eviction
    /// policy; counts as resident.
    Sampled(FrameNo),
    /// Mapped by `UFFDIO_COPY` (MOVE refused): resident but owns no pool frame, so it is
    /// never evicted; its memory goes with the range.
    Copied,
    /// Taken out of the address space into a staging slot; its write-back to `entry` is
    /// in flight (ticket `write` on worker `worker`).
    Staging {
        /// The staging frame (its slot holds the page).
        frame: FrameNo,
        /// Where the page is being written.
        entry: SwapEntry,
        /// The worker whose engine carries the write.
        worker: usize,
        /// The write's ticket.
        write: Ticket,
    },
    /// Being taken out of an address space by an asynchronous stage (daemon mode: the
    /// tagger's agent moves the page; see [`crate::installer::StageOutcome::Pending`]):
    /// the page may already be a hole. Its frame is still the core's. Faults on it wait
    /// for the stage to finish.
    Leaving {
        /// The frame (Mapped, or Staging once the content is in its slot).
        frame: FrameNo,
        /// An eviction: the swap entry reserved for the write-back. `None`: taken out for
        /// access sampling (no write-back; it becomes `Sampled`, still tracked by the
        /// eviction policy).
        entry: Option<SwapEntry>,
        /// Workers with a fault waiting on this page (bit per worker).
        waiters: u64,
    },
    /// Content only in swap.
    Swapped(SwapEntry),
    /// A swap-in is in flight into `frame`; faults on the page wait for it.
    SwapIn {
        /// The frame being filled.
        frame: FrameNo,
        /// The entry being read.
        entry: SwapEntry,
        /// The worker whose engine carries the read (it installs the page).
        worker: usize,
        /// The read's ticket.
        ticket: Ticket,
        /// Bit `w` set: worker `w` has a faulting uThread waiting on this page and must be
        /// woken when it is installed.
        waiters: u64,
    },
    /// The content could not be read back: the page is poisoned (SIGBUS on access).
    Poisoned,
}

impl PageState {
    /// The content is not in the address space (the program would read a hole there), or
    /// may not be (`Leaving`: the agent may have moved it out and the daemon dropped its
    /// staging copy before the stage is finished here). What the tagger is told
    /// (`SwapState`): if the daemon dies while such pages exist, the program is killed
    /// rather than left to read zeros.
    pub fn is_away(&self) -> bool {
        matches!(
            self,
            PageState::Sampled(_)
                | PageState::Leaving { .. }
                | PageState::Staging { .. }
                | PageState::Swapped(_)
                | PageState::SwapIn { .. }
        )
    }

    /// Holds a frame (resident or swap-in in flight): counts as resident.
    pub fn is_resident(&self) -> bool {
        matches!(
            self,
            PageState::Resident(_)
                | PageState::Sampled(_)
                | PageState::Copied
                | PageState::SwapIn { .. }
                | PageState::Leaving { .. }
        )
    }
}

/// Identifies a managed range: process, first byte and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct RangeKey {
    /// The process.
    pub pid: u32,
    /// First byte of the range.
    pub start: u64,
    /// Generation (unique over the core's life).
    pub generation: u64,
}

/// One managed range (an embedded region, or a VMA in daemon mode).
pub struct ManagedRange {
    /// One past the last byte.
    pub end: u64,
    /// Generation, see the module docs.
    pub generation: u64,
    /// Region id recorded as the frames' owner.
    pub id: u32,
    /// The allocation policy spec (to rebuild it after a panic).
    pub alloc_spec: String,
    /// The allocation policy; `None` while it is being called, and always for a range
    /// that uses its space's policy ([`Space::alloc`], daemon mode).
    pub alloc: Option<Box<dyn AllocPolicy>>,
}

impl std::fmt::Debug for ManagedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedRange")
            .field("end", &format_args!("{:#x}", self.end))
            .field("generation", &self.generation)
            .field("id", &self.id)
            .field("alloc", &self.alloc_spec)
            .finish()
    }
}

/// Per-space counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpaceCounters {
    /// Pages holding a frame (mapped, copied, swap-in in flight).
    pub resident: usize,
    /// Pages whose content is only in staging or swap.
    pub swapped: usize,
    /// Pages whose content is not in the address space (sampled, staging, swapped,
    /// swap-in in flight) or may not be (leaving): what the program would lose with the
    /// memory manager.
    pub away: usize,
    /// Poisoned pages.
    pub poisoned: usize,
    /// Faults served (policy calls).
    pub faults: u64,
    /// Pages filled with zeroes (first touch).
    pub zero_fills: u64,
    /// Pages mapped beside the faulting one by a multi-page decision (flexible huge pages).
    pub fhp_pages: u64,
    /// Swap-ins started.
    pub swap_ins: u64,
    /// Pages taken out of the address space for write-back (or clean eviction).
    pub evictions: u64,
    /// Victims that stayed (pinned, refused by the installer).
    pub evict_skipped: u64,
    /// Pages taken out for access sampling (see the crate docs).
    pub samples: u64,
    /// Sampled pages accessed again (installed back from their slot, no I/O).
    pub sample_refaults: u64,
    /// Panics of a policy serving this space (each one replaced the policy).
    pub policy_panics: u64,
}

/// The allocation policy of a whole space (daemon mode: one instance per process, so a
/// stateful policy sees every fault of the process), used by ranges without their own.
pub struct SpacePolicy {
    /// The spec it was built from (to rebuild it after a panic).
    pub spec: String,
    /// The policy; `None` only while it is being called.
    pub policy: Option<Box<dyn AllocPolicy>>,
}

/// One address space: page states, managed ranges, hints, pins, counters.
#[derive(Default)]
pub struct Space {
    /// The process id.
    pub pid: u32,
    /// Page address → state (absent: vacant).
    pub pages: HashMap<u64, PageState>,
    /// Range start → range.
    pub ranges: BTreeMap<u64, ManagedRange>,
    /// Hints given by the program.
    pub hints: HintMap,
    /// Page address → pin count.
    pub pins: HashMap<u64, u32>,
    /// Resident pages whose swap copy is still valid (swapped in, write-tracked by the
    /// installer): if not written since, eviction needs no I/O.
    /// (entry, 128-bit hash of the content read back).
    pub clean: HashMap<u64, (SwapEntry, u128)>,
    /// Counters.
    pub counters: SpaceCounters,
    /// How pages get into and out of this space, when not the core's default installer
    /// (daemon mode: each tagged process is another address space).
    pub installer: Option<usm_sync::Arc<dyn crate::Installer>>,
    /// The policy of ranges without their own (daemon mode).
    pub alloc: Option<SpacePolicy>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("pid", &self.pid)
            .field("pages", &self.pages.len())
            .field("ranges", &self.ranges)
            .field("counters", &self.counters)
            .field("own_installer", &self.installer.is_some())
            .finish_non_exhaustive()
    }
}

impl Space {
    /// An empty space for `pid`.
    pub fn new(pid: u32) -> Space {
        Space {
            pid,
            ..Space::default()
        }
    }

    /// The range holding `addr`, with its start.
    pub fn range_of(&self, addr: u64) -> Option<(u64, &ManagedRange)> {
        let (&start, range) = self.ranges.range(..=addr).next_back()?;
        (addr < range.end).then_some((start, range))
    }

    /// The range holding `addr`, mutably.
    pub fn range_of_mut(&mut self, addr: u64) -> Option<(u64, &mut ManagedRange)> {
        let (&start, range) = self.ranges.range_mut(..=addr).next_back()?;
        (addr < range.end).then_some((start, range))
    }

    /// The bounds of the range holding `addr`.
    pub fn bounds(&self, addr: u64) -> Option<Range<u64>> {
        self.range_of(addr).map(|(s, r)| s..r.end)
    }

    /// The generation of the range holding `addr`.
    pub fn generation_at(&self, addr: u64) -> Option<u64> {
        self.range_of(addr).map(|(_, r)| r.generation)
    }

    /// Sets the state of `addr`, keeping the counters.
    pub fn set(&mut self, addr: u64, state: PageState) -> Option<PageState> {
        self.count(&state, 1);
        let old = self.pages.insert(addr, state);
        if let Some(o) = &old {
            self.count(o, -1);
        }
        old
    }

    /// Forgets `addr` (vacant again), keeping the counters.
    pub fn clear(&mut self, addr: u64) -> Option<PageState> {
        let old = self.pages.remove(&addr);
        if let Some(o) = &old {
            self.count(o, -1);
        }
        old
    }

    fn count(&mut self, state: &PageState, delta: isize) {
        let c = &mut self.counters;
        if state.is_away() {
            c.away = c.away.saturating_add_signed(delta);
        }
        let slot = match state {
            PageState::Resident(_)
            | PageState::Sampled(_)
            | PageState::Copied
            | PageState::Leaving { .. }
            | PageState::SwapIn { .. } => &mut c.resident,
            PageState::Staging { .. } | PageState::Swapped(_) => &mut c.swapped,
            PageState::Poisoned => &mut c.poisoned,
        };
        *slot = slot.saturating_add_signed(delta);
    }

    /// The page is pinned for a syscall.
    pub fn is_pinned(&self, addr: u64) -> bool {
        self.pins.get(&addr).is_some_and(|&n| n > 0)
    }
}
