//! The policy host's views of the locked state.
//!
//! - `WorkerCx`: the [`Cx`] an allocation or OOM policy gets for one call on one worker —
//!   the locked memory state, the eviction and OOM policies (separate borrows, so
//!   `Cx::evict` can run the eviction policy mid-allocation) and the worker's `WorkerIo`.
//!   It records every frame the call takes (`taken`: fresh frames; `staged`: swap-cache
//!   frames with the page state they had), so a panic or an `Oom` answer gives them all
//!   back (`restore_taken`: fresh frames to the lArena, staged ones to staging).
//!   `Cx::swap_in` checks that the page is `Swapped` to that entry and the frame Taken
//!   before it queues the read.
//! - `MemView`: the eviction policy's view outside a victim search (pins, hints; no
//!   access information). During a victim search it gets `SamplingView` (see
//!   [`super::eviction`]).
//!
//! Lock: `WorkerCx` and `MemView` borrow the locked state, so everything here runs with
//! the core lock held.

use std::ops::Range;

use usm_kmod::FrameNo;
use usm_kmod::pool::{FramePool, FrameState, MAX_ORDER};
use usm_policies::{
    Access, Cx, EvictCx, EvictPolicy, Hint, OomPolicy, PageMask, ProcessCounters, VictimRequest,
    Watermarks, page_floor,
};
use usm_swap::{SwapEntry, Ticket};

use crate::space::{PageState, RangeKey};

use super::{MemState, MmCore, MmState, PAGE, WorkerIo};

/// The eviction policy's view: memory state only.
pub(super) struct MemView<'a> {
    pub(super) pool: &'a FramePool,
    pub(super) mem: &'a MemState,
}

impl EvictCx for MemView<'_> {
    fn access(&mut self, _frame: FrameNo) -> Access {
        // No access sampling yet: every frame reports "no information".
        Access::default()
    }

    fn is_pinned(&self, frame: FrameNo) -> bool {
        let Ok(desc) = self.pool.desc(frame) else {
            return false;
        };
        let (pid, addr) = (desc.owner().pid, desc.vaddr());
        self.mem.spaces.get(&pid).is_some_and(|s| s.is_pinned(addr))
    }

    fn hint(&self, pid: u32, addr: u64) -> Hint {
        self.mem
            .spaces
            .get(&pid)
            .map(|s| s.hints.hint_at(addr))
            .unwrap_or_default()
    }
}

/// The [`Cx`] a policy gets on one worker, for one call.
pub(super) struct WorkerCx<'a> {
    pub(super) core: &'a MmCore,
    pub(super) mem: &'a mut MemState,
    pub(super) evict: &'a mut Box<dyn EvictPolicy>,
    pub(super) oom: &'a mut Box<dyn OomPolicy>,
    pub(super) io: &'a mut WorkerIo,
    pub(super) worker: usize,
    /// Fresh frames taken during this call.
    pub(super) taken: Vec<FrameNo>,
    /// Staged frames handed out by `take_staged`, with their page and prior state.
    pub(super) staged: Vec<(FrameNo, u32, u64, PageState)>,
}

impl<'a> WorkerCx<'a> {
    pub(super) fn new(
        core: &'a MmCore,
        st: &'a mut MmState,
        io: &'a mut WorkerIo,
        worker: usize,
    ) -> Self {
        WorkerCx {
            core,
            mem: &mut st.mem,
            evict: &mut st.evict,
            oom: &mut st.oom,
            io,
            worker,
            taken: Vec::new(),
            staged: Vec::new(),
        }
    }

    pub(super) fn view(&self) -> MemView<'_> {
        MemView {
            pool: &self.core.pool,
            mem: self.mem,
        }
    }

    pub(super) fn free_total(&self) -> usize {
        self.io.arena.len() + self.core.shared_free_frames()
    }

    /// Gives back every frame still taken (after a panic, an OOM answer, or a policy that
    /// kept some): fresh ones to the arena, staged ones back into staging.
    pub(super) fn restore_taken(&mut self) {
        for f in std::mem::take(&mut self.taken) {
            self.return_frame(f, true);
        }
        for (f, pid, addr, prior) in std::mem::take(&mut self.staged) {
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            } else {
                self.mem.orphans.insert(f);
            }
        }
    }

    pub(super) fn return_frame(&mut self, f: FrameNo, zeroed: bool) {
        let pool = &self.core.pool;
        let r = if zeroed {
            pool.return_unused(&mut self.io.arena, f)
        } else {
            pool.release(f)
        };
        if let Err(e) = r {
            tracing::error!(error = %e, %f, "giving a frame back failed");
        }
    }

    pub(super) fn range_key(&self, pid: u32, addr: u64) -> Option<RangeKey> {
        let space = self.mem.spaces.get(&pid)?;
        let (start, r) = space.range_of(addr)?;
        Some(RangeKey {
            pid,
            start,
            generation: r.generation,
        })
    }

    pub(super) fn still_owned(&self, key: RangeKey, addr: u64) -> bool {
        self.mem
            .spaces
            .get(&key.pid)
            .and_then(|s| s.generation_at(addr))
            == Some(key.generation)
    }
}

impl EvictCx for WorkerCx<'_> {
    fn access(&mut self, frame: FrameNo) -> Access {
        self.view().access(frame)
    }
    fn is_pinned(&self, frame: FrameNo) -> bool {
        self.view().is_pinned(frame)
    }
    fn hint(&self, pid: u32, addr: u64) -> Hint {
        self.view().hint(pid, addr)
    }
}

impl Cx for WorkerCx<'_> {
    fn take_frame(&mut self) -> Option<FrameNo> {
        match self.core.pool.take(&mut self.io.arena) {
            Ok(Some(f)) => {
                self.taken.push(f);
                Some(f)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "taking a frame failed");
                None
            }
        }
    }

    /// `n` frames for consecutive pages. Each power-of-two piece of `n` (largest first,
    /// at most `2^MAX_ORDER`) is asked of the pool as one naturally aligned run of
    /// consecutive slots ([`FramePool::take_run`]), so installing it is one `UFFDIO_MOVE`;
    /// what no run can serve comes one frame at a time from the lArena.
    fn take_frames(&mut self, n: usize, out: &mut Vec<FrameNo>) -> bool {
        let mark = out.len();
        let mut rest = n;
        while rest > 1 {
            let order = (usize::BITS - 1 - rest.leading_zeros()).min(MAX_ORDER);
            match self.core.pool.take_run(&mut self.io.arena, order) {
                Ok(Some(first)) => {
                    let run = (first.0..first.0 + (1 << order)).map(FrameNo);
                    self.taken.extend(run.clone());
                    out.extend(run);
                    rest -= 1 << order;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, order, "taking a run of frames failed");
                    break;
                }
            }
        }
        for _ in 0..rest {
            match self.take_frame() {
                Some(f) => out.push(f),
                None => {
                    for f in out.drain(mark..) {
                        self.give_frame(f);
                    }
                    return false;
                }
            }
        }
        true
    }

    fn give_frame(&mut self, frame: FrameNo) {
        if let Some(i) = self.staged.iter().position(|s| s.0 == frame) {
            let (_, pid, addr, prior) = self.staged.swap_remove(i);
            tracing::error!(%frame, "policy gave back a staged frame; it stays in staging");
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            }
            return;
        }
        if let Some(i) = self.taken.iter().position(|&t| t == frame) {
            self.taken.swap_remove(i);
            self.return_frame(frame, true);
        }
    }

    fn free_frames(&self) -> usize {
        self.free_total()
    }

    fn watermarks(&self) -> Watermarks {
        self.core.config.watermarks
    }

    fn region(&self, pid: u32, addr: u64) -> Option<Range<u64>> {
        self.mem.spaces.get(&pid)?.bounds(addr)
    }

    fn vacant(&self, pid: u32, start: u64, npages: usize, out: &mut PageMask) {
        out.clear();
        let Some(space) = self.mem.spaces.get(&pid) else {
            return;
        };
        for i in 0..npages.min(PageMask::CAPACITY) {
            let a = start + i as u64 * PAGE;
            if space.range_of(a).is_some() && !space.pages.contains_key(&a) {
                out.set(i);
            }
        }
    }

    fn take_staged(&mut self, pid: u32, addr: u64) -> Option<FrameNo> {
        let addr = page_floor(addr);
        let space = self.mem.spaces.get_mut(&pid)?;
        let Some(PageState::Staging { frame, .. }) = space.pages.get(&addr).cloned() else {
            return None;
        };
        let prior = space.clear(addr)?;
        self.staged.push((frame, pid, addr, prior));
        Some(frame)
    }

    fn swap_entry(&self, pid: u32, addr: u64) -> Option<SwapEntry> {
        match self.mem.spaces.get(&pid)?.pages.get(&page_floor(addr))? {
            PageState::Swapped(e) => Some(*e),
            _ => None,
        }
    }

    fn swap_in(&mut self, pid: u32, addr: u64, entry: SwapEntry, frame: FrameNo) -> Ticket {
        let addr = page_floor(addr);
        let _span = tracing::trace_span!("swap_in", addr, %entry).entered();
        if let Some(i) = self.taken.iter().position(|&t| t == frame) {
            self.taken.swap_remove(i);
        }
        let ok = matches!(self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)), Some(PageState::Swapped(e)) if *e == entry);
        if !ok || self.core.pool.desc(frame).map(|d| d.state()).ok() != Some(FrameState::Taken) {
            tracing::error!(addr, %entry, %frame, "swap_in of a page that is not swapped to that entry");
            self.return_frame(frame, true);
            let t = Ticket(self.io.next_synthetic);
            self.io.next_synthetic += 1;
            return t;
        }
        let ticket = match self.start_swap_in(pid, addr, entry, frame, 1 << self.worker) {
            Some(t) => t,
            None => {
                self.return_frame(frame, true);
                Ticket(0)
            }
        };
        self.prefetch(pid, addr);
        ticket
    }

    fn counters(&self, pid: u32) -> ProcessCounters {
        self.mem
            .spaces
            .get(&pid)
            .map_or(ProcessCounters::default(), |s| ProcessCounters {
                resident: s.counters.resident,
                swapped: s.counters.swapped,
                faults: s.counters.faults,
            })
    }

    fn evict(&mut self, req: VictimRequest) -> usize {
        self.run_eviction(req).chosen
    }
}
