//! The context a policy runs in: what the runtime offers a policy on one worker.
//!
//! The runtime implements [`Cx`] (and its eviction-only part [`EvictCx`]) on each worker
//! and passes it to every policy call. A policy never touches the frame pool, userfaultfd
//! or io_uring itself; it *asks* through the context and *answers* with a
//! [`Decision`](crate::Decision).
//!
//! # Who owns a frame
//!
//! ```text
//!   lArena --take_frame/take_frames--> policy --Decision::Map--> mapped (runtime installs)
//!     ^                                  |  \--swap_in(frame)--> in flight --> mapped
//!     +-------------give_frame-----------+
//!   mapped --victims()--> staging --write-back done--> lArena   (page now in swap)
//!   staging --take_staged--> policy --Decision::Map at the same page--> mapped
//!   mapped --free/exit--> lArena
//! ```
//!
//! - A frame returned by [`Cx::take_frame`] / [`Cx::take_frames`] / [`Cx::take_staged`]
//!   belongs to the policy
//!   until the call returns. Before returning, the policy must have put every frame it took
//!   into the returned [`Mapping`](crate::Mapping), into [`Cx::swap_in`], or back with
//!   [`Cx::give_frame`] (a staged frame: only into a mapping of its own page). The runtime
//!   checks this (a debug assertion) after each call.
//! - Frames are pre-zeroed: mapping one needs no clearing.
//! - The runtime, not the policy, reclaims frames of freed ranges and exited processes.
//!
//! # Where the access information comes from
//!
//! [`EvictCx::access`] reports whether a frame was accessed since the last time it was
//! asked, and whether it was written. The runtime fills it from re-fault sampling (unmap a
//! sample of pages and watch which fault back) or from `page_idle` where available; a
//! policy cannot tell which, and must not care. *Written* comes from `WP_ASYNC` +
//! `PAGEMAP_SCAN` and tells clean from dirty only, never hot from cold.
//!
//! # Checklist for the runtime implementing `Cx`
//!
//! [`sim::SimMachine`](crate::sim::SimMachine) follows this list and checks it; read it as
//! the reference implementation.
//!
//! 1. Hand frames out of the worker's lArena and remember which ones this call took;
//!    after the call, none may remain taken (debug-assert). Around every policy call use
//!    [`guarded`](crate::guarded); on a panic, put taken frames back (a frame from
//!    [`Cx::take_staged`] back into staging with its write-back), fail the access, and
//!    replace the policy with a fresh instance from the registry.
//! 2. Resolve in-flight swap-ins yourself (a second fault waits on the same ticket); send
//!    every other fault — including a staging hit — to the allocation policy.
//! 3. [`Cx::vacant`] reports "no content anywhere": present, staged, swapped and in-flight
//!    pages are not vacant, nor is anything outside the process's managed ranges.
//! 4. [`Cx::swap_in`] never fails; a read error becomes a poisoned page at completion.
//! 5. Call [`EvictPolicy::on_map`](crate::EvictPolicy::on_map) after every install (a `Map`
//!    decision, a completed swap-in, a page whose eviction could not be carried out) and
//!    [`EvictPolicy::on_free`](crate::EvictPolicy::on_free) for every frame of a freed range
//!    or an exited process, before `AllocPolicy::free` / `exit`.
//! 6. [`Cx::evict`] runs the eviction policy with an [`EvictCx`] view (so both can be
//!    borrowed at once), stages the victims, and stops counting them as resident.
//! 7. On a hint call: [`Hint::parse`], record it in the process's
//!    [`HintMap`](crate::HintMap) (what [`EvictCx::hint`] reads), then call
//!    `AllocPolicy::hint` and `EvictPolicy::on_hint`.
//!
//! # Context
//!
//! Every call happens in normal context on a worker (a LocalManager between two uThread
//! switches), never in a signal handler: a policy may allocate, take ordinary locks of its
//! own and log with `tracing`. It must not block for long: the worker's other uThreads wait
//! while it runs.

use std::ops::Range;

use usm_types::FrameNo;
use usm_types::swap::{SwapEntry, Ticket};

use crate::evict::VictimRequest;
use crate::hint::Hint;

/// Access information about one mapped frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Access {
    /// The page was accessed since the previous report for this frame.
    pub accessed: bool,
    /// The page was written since it was last written back (it is dirty).
    pub written: bool,
}

/// Free-frame watermarks of the worker, in frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Watermarks {
    /// Below this many free frames the runtime starts eviction; an allocation policy
    /// should shrink what it maps beyond the faulting page.
    pub low: usize,
    /// Eviction stops once this many frames are free again.
    pub high: usize,
}

/// Per-process counters, maintained by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ProcessCounters {
    /// Pages holding a frame: mapped, plus swap-ins in flight.
    pub resident: usize,
    /// Pages whose content is only in swap (or being written there).
    pub swapped: usize,
    /// Faults served so far.
    pub faults: u64,
}

/// A set of up to [`PageMask::CAPACITY`] consecutive pages (one 2 MiB window), kept on the
/// stack: bit `i` names the page `start + i * 4096` of the query that filled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageMask {
    words: [u64; 8],
}

impl PageMask {
    /// The most pages one mask covers.
    pub const CAPACITY: usize = 512;

    /// An empty mask.
    pub const fn new() -> Self {
        PageMask { words: [0; 8] }
    }

    /// Marks page `i` (ignored beyond the capacity).
    pub fn set(&mut self, i: usize) {
        if i < Self::CAPACITY {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Marks pages `0..n`.
    pub fn set_first(&mut self, n: usize) {
        for i in 0..n.min(Self::CAPACITY) {
            self.set(i);
        }
    }

    /// Page `i` is marked.
    pub fn get(&self, i: usize) -> bool {
        i < Self::CAPACITY && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// How many pages are marked.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Unmarks everything.
    pub fn clear(&mut self) {
        self.words = [0; 8];
    }

    /// The maximal run of marked pages that contains page `i`, or `None` when `i` is not
    /// marked.
    pub fn run_around(&self, i: usize) -> Option<Range<usize>> {
        if !self.get(i) {
            return None;
        }
        let mut lo = i;
        while lo > 0 && self.get(lo - 1) {
            lo -= 1;
        }
        let mut hi = i + 1;
        while hi < Self::CAPACITY && self.get(hi) {
            hi += 1;
        }
        Some(lo..hi)
    }
}

/// The part of the context an eviction policy needs: queries about mapped frames.
///
/// Split from [`Cx`] so the runtime can hand it to an eviction policy while an allocation
/// policy holds the full context (an allocation policy's [`Cx::evict`] call runs the
/// eviction policy with this narrower view).
pub trait EvictCx {
    /// Access information of a mapped frame since the previous call for the same frame
    /// (the *accessed* part is test-and-clear). Frames the runtime has no information
    /// about report `Access::default()`.
    fn access(&mut self, frame: FrameNo) -> Access;

    /// The frame is pinned against eviction right now (an I/O helper pre-faulted it for a
    /// syscall, or a write to it is in flight). A pinned frame must not be chosen.
    fn is_pinned(&self, frame: FrameNo) -> bool;

    /// The hint covering `addr` in process `pid` (the empty hint when none). O(log n).
    fn hint(&self, pid: u32, addr: u64) -> Hint;
}

/// Everything an allocation policy may ask of the runtime on one worker.
///
/// Object safe: policies receive `&mut dyn Cx`.
pub trait Cx: EvictCx {
    /// Takes one pre-zeroed frame from the worker's lArena (refilling it from the shared
    /// arena if needed). `None` when no free frame is left: answer
    /// [`Decision::Oom`](crate::Decision::Oom) (after giving back what you took).
    fn take_frame(&mut self) -> Option<FrameNo>;

    /// Takes exactly `n` frames, appending them to `out`, or none at all (returns `false`
    /// and leaves `out` unchanged).
    fn take_frames(&mut self, n: usize, out: &mut Vec<FrameNo>) -> bool;

    /// Gives back a frame taken during this call and not used.
    fn give_frame(&mut self, frame: FrameNo);

    /// Frames available to this worker without evicting (lArena plus shared arena).
    fn free_frames(&self) -> usize;

    /// The worker's free-frame watermarks.
    fn watermarks(&self) -> Watermarks;

    /// The bounds of the managed region (embedded) or VMA (daemon) holding `addr` in
    /// process `pid`. A mapping must stay inside it.
    fn region(&self, pid: u32, addr: u64) -> Option<Range<u64>>;

    /// Marks in `out` (cleared first) the *vacant* pages among the `npages` pages from
    /// `start` (at most [`PageMask::CAPACITY`]): pages with no content anywhere — not
    /// present, not in swap, not in staging, no swap-in in flight — so that mapping a zero
    /// frame there loses nothing. Pages outside the process's regions are not vacant.
    fn vacant(&self, pid: u32, start: u64, npages: usize, out: &mut PageMask);

    /// If page `addr` of `pid` is in staging (evicted, write-back not finished: the "swap
    /// cache"), cancels its write-back and hands its frame — holding the page's content —
    /// to the policy. The policy must map that frame at `addr` in the decision it returns
    /// (the runtime installs it from staging); giving it back would discard the page.
    /// [`swap_in_if_swapped`](crate::swap_in_if_swapped) does this for you.
    fn take_staged(&mut self, pid: u32, addr: u64) -> Option<FrameNo>;

    /// The swap entry holding the content of page `addr` of process `pid`, if the page was
    /// evicted and its write-back finished.
    fn swap_entry(&self, pid: u32, addr: u64) -> Option<SwapEntry>;

    /// Queues the read of `entry` into `frame` for page `addr` of `pid` and returns the
    /// ticket the faulting uThread will wait on. From this call on the frame belongs to
    /// the swap-in. Never fails: a read error surfaces at completion, where the runtime
    /// installs a poisoned page (`UFFDIO_POISON`), never zeros.
    fn swap_in(&mut self, pid: u32, addr: u64, entry: SwapEntry, frame: FrameNo) -> Ticket;

    /// The counters of process `pid` (zeros for an unknown process).
    fn counters(&self, pid: u32) -> ProcessCounters;

    /// Runs the eviction policy for `req` and starts taking the chosen pages out of their
    /// address space (into staging, then written to swap). Returns how many were chosen.
    /// From this call on they no longer count as resident in [`Cx::counters`], even where
    /// the move out completes a little later (daemon mode: the tagger's agent thread does
    /// it); their frames come back to the arena when their write-back completes.
    fn evict(&mut self, req: VictimRequest) -> usize;
}
