//! Completions: what comes back from the workers' engines and from asynchronous stages.
//!
//! [`WorkerMm::poll`] (every scheduling round): clears the engine's eventfd, reaps every
//! completion *without* the lock, then takes the lock once for the batch and runs
//! `complete` on each (and on reads the engine refused at once):
//! - write-back done and still the page's (range generation, frame, ticket *and* worker
//!   match): the page becomes `Swapped(entry)`, *then* the staging frame is released to
//!   the zeroing queue; failed: the slot is freed and the page put back (nothing lost);
//!   not the page's any more (taken back by a fault, range gone): the slot is freed, an
//!   orphan frame released. Any write-back completing wakes the workers waiting for memory.
//! - swap-in done and still the page's: the content is hashed (clean eviction), installed
//!   (`install_fresh`), the copy kept or freed, the waiting workers woken; not installable
//!   now → `Swapped` again and the waiters fault again; a retryable error → read again;
//!   any other error → `Poisoned` (SIGBUS on access, never zeros); fenced → frame and
//!   slot freed.
//!
//! [`WorkerMm::finish_stage`] (daemon: the tagger's agent answered a `Pending` stage):
//! an eviction moved → `leave` (the write-back is queued as for any staged page); stayed
//! → `stay` (`Resident` again, re-announced to the eviction policy); an access sample
//! (`Leaving { entry: None }`, see the crate docs) moved → `Sampled` (the content in the
//! frame's slot; the next access installs it from there), stayed → `Resident` (the policy
//! tracked it all along); the page went away meanwhile → fenced (the frame is released;
//! if the address holds a newer page, what was moved is copied back).
//!
//! Lock: `poll` and `finish_stage` take the core lock after the reaping and submit after
//! dropping it; `complete`, `leave` and `stay` are `WorkerCx` methods (lock held).

use usm_kmod::pool::FrameOwner;
use usm_policies::MappedPage;
use usm_swap::{SwapEntry, SwapError, Ticket};
use usm_sync::atomic::Ordering;

use crate::space::PageState;
use crate::stats::MmStats;

use super::{MemView, MmCore, MmState, Op, WorkerCx, WorkerMm};

impl WorkerMm {
    /// Blocks until at least one operation of this worker's engine completes (returns at
    /// once when none is in flight); [`WorkerMm::poll`] then reaps it. Used by the
    /// synchronous swap-in mode, which deliberately blocks the worker.
    pub fn wait_io(&mut self) {
        if self.io.ops.is_empty() {
            return;
        }
        if let Err(e) = self.io.engine.wait(1) {
            tracing::warn!(error = %e, "io_uring wait failed");
        }
    }

    /// Reaps this worker's completions: write-backs record their swap entry and free the
    /// staging frame; swap-ins install their page (or poison it) and wake the workers
    /// waiting for it. Returns how many operations finished.
    pub fn poll(&mut self) -> usize {
        // The engine's eventfd is one of the worker's wake fds: consume its signals before
        // reaping (the engine's documented order). Left unread it stays readable and a
        // parked worker wakes at once, again and again (an idle server burned most of a
        // core that way: bench/results/kv.md, "Run 1"). A signal may come after the last
        // reap of a round with I/O: drained one round later too.
        let io_before = !self.io.ops.is_empty();
        if io_before || self.signal_stale {
            self.io.engine.clear_eventfd();
        }
        self.signal_stale = io_before;
        if self.io.ops.is_empty() && self.io.refused.is_empty() {
            return 0;
        }
        if let Err(e) = self.io.engine.enter_for_completions() {
            tracing::warn!(error = %e, "io_uring enter failed");
        }
        let mut completions = std::mem::take(&mut self.completions);
        self.io.engine.reap(|c| completions.push(c));
        let refused = std::mem::take(&mut self.io.refused);
        if completions.is_empty() && refused.is_empty() {
            self.completions = completions;
            return 0;
        }
        let core = &*self.core;
        let mut guard = core.lock();
        let st = &mut *guard;
        let mut n = 0;
        let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
        for c in completions.drain(..) {
            n += 1;
            cx.complete(c.ticket, c.result.map(|_| ()));
        }
        for (t, e) in refused {
            n += 1;
            cx.complete(t, Err(e));
        }
        cx.balance();
        drop(guard);
        let _ = self.io.engine.submit();
        self.completions = completions;
        n
    }

    /// Finishes an asynchronous stage of `frame` ([`crate::StageOutcome::Pending`]):
    /// `moved` says whether the page left its address space *and* its content is now in
    /// the frame's slot (the frame Staging). Its write-back is queued on this worker, or
    /// (not moved) the page is resident again. Returns whether the content was wanted:
    /// `false` when the page went away meanwhile (fenced: the frame is released and the
    /// caller drops whatever copy it holds).
    pub fn finish_stage(&mut self, pid: u32, frame: usm_kmod::FrameNo, moved: bool) -> bool {
        let core = self.core.clone();
        let mut guard = core.lock();
        let st = &mut *guard;
        if !st.mem.sampling.remove(&frame) {
            st.mem.leaving = st.mem.leaving.saturating_sub(1);
        }
        let addr = core.pool.desc(frame).map_or(0, |d| d.vaddr());
        let state = st
            .mem
            .spaces
            .get(&pid)
            .and_then(|s| s.pages.get(&addr))
            .cloned();
        // Fork children sharing this page's entry get its content now (`fork_wait`).
        super::fork_wait::stage_done(&core, &mut st.mem, pid, addr, frame, moved);
        let wanted = match state {
            Some(PageState::Leaving {
                frame: f,
                entry,
                waiters,
            }) if f == frame => {
                let mut cx = WorkerCx::new(&core, st, &mut self.io, self.worker);
                let v = usm_policies::MappedPage { frame, pid, addr };
                match (entry, moved) {
                    (Some(entry), true) => cx.leave(v, entry),
                    (Some(entry), false) => cx.stay(v, entry),
                    (None, moved) => cx.sample_done(v, moved),
                }
                core.wake_mask(waiters, usize::MAX);
                true
            }
            other => {
                // Fenced: the page went away (unmapped, freed, process gone). If the
                // program has a page there again that the core counts present, what the
                // agent moved (it only names an address) is that newer page's content:
                // put it back, never lose it.
                let present = matches!(
                    other,
                    Some(PageState::Resident(_) | PageState::Copied | PageState::Leaving { .. })
                );
                let mut kept = false;
                if moved && present {
                    let installer = core.installer_in(&st.mem, pid);
                    match installer.copy_staged(&core.pool, frame, addr) {
                        Ok(true) => MmStats::bump(&core.stats.counters.swap_cache_copies),
                        // A page is there: the agent moved the *older* page, before the
                        // address went away; its content is nobody's now.
                        Ok(false) => {}
                        Err(e) => {
                            // Not now (an address-space change is waiting for the reader):
                            // the content waits in the frame's slot as a sampled page, and
                            // the next fault there installs it. What the core counted
                            // present there is not (the agent took it): let it go.
                            tracing::debug!(error = %e, addr, %frame, "a page taken out after its address was reused waits in its slot");
                            kept = true;
                            displace(&core, st, pid, addr, frame);
                        }
                    }
                }
                if !kept
                    && st.mem.orphans.remove(&frame)
                    && let Err(e) = core.pool.release(frame)
                {
                    tracing::error!(error = %e, %frame, "releasing a fenced frame failed");
                }
                MmStats::bump(&core.stats.counters.fenced);
                false
            }
        };
        let waiting = std::mem::take(&mut st.mem.memory_waiters);
        {
            let mut cx = WorkerCx::new(&core, st, &mut self.io, self.worker);
            cx.balance();
        }
        drop(guard);
        if waiting != 0 {
            core.wake_mask(waiting, self.worker);
        }
        let _ = self.io.engine.submit();
        wanted
    }
}

impl WorkerCx<'_> {
    /// One completed operation.
    fn complete(&mut self, ticket: Ticket, result: Result<(), SwapError>) {
        let Some(op) = self.io.ops.remove(&ticket) else {
            return;
        };
        self.core.io_in_flight.fetch_sub(1, Ordering::AcqRel);
        let core = self.core;
        let c = &core.stats.counters;
        match op {
            Op::WriteBack {
                key,
                addr,
                frame,
                entry,
            } => {
                self.mem.writebacks = self.mem.writebacks.saturating_sub(1);
                // A page sharing this entry may be read now (or poisoned when the write
                // failed: its content never reached swap).
                let unwritten = self.mem.unwritten.remove(&entry);
                if unwritten && result.is_err() {
                    self.poison_unwritten(entry);
                }
                // A frame (or at least progress) for faults waiting on memory elsewhere.
                let waiting = std::mem::take(&mut self.mem.memory_waiters);
                if waiting != 0 {
                    core.wake_mask(waiting, self.worker);
                }
                let _span = tracing::trace_span!("writeback_done", addr, %entry).entered();
                // The same frame may be staging the same page again by now (taken back
                // by a COPY swap-cache hit while this write ran, then evicted again, its
                // write on another worker, whose tickets are numbered independently):
                // only the write the page state names — ticket *and* worker — is ours.
                let ours = self.still_owned(key, addr)
                    && matches!(self.mem.spaces.get(&key.pid).and_then(|s| s.pages.get(&addr)),
                        Some(PageState::Staging { frame: f, write, worker, .. })
                            if *f == frame && *write == ticket && *worker == self.worker);
                match (ours, result) {
                    (true, Ok(())) => {
                        // Record the entry first, then recycle the staging frame.
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.set(addr, PageState::Swapped(entry));
                        }
                        if let Err(e) = core.pool.release(frame) {
                            tracing::error!(error = %e, %frame, "releasing a staging frame failed");
                        }
                        MmStats::bump(&c.writebacks_done);
                    }
                    (true, Err(e)) => {
                        MmStats::bump(&c.writeback_errors);
                        tracing::warn!(error = %e, addr, "write-back failed; page put back in memory");
                        let _ = self.mem.swap.free(entry);
                        match core
                            .installer_in(self.mem, key.pid)
                            .unstage(&core.pool, frame)
                        {
                            Ok(true) => {
                                if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                                    space.set(addr, PageState::Resident(frame));
                                }
                                let mut view = MemView {
                                    pool: &core.pool,
                                    mem: self.mem,
                                };
                                self.evict.on_refused(
                                    MappedPage {
                                        frame,
                                        pid: key.pid,
                                        addr,
                                    },
                                    &mut view,
                                );
                            }
                            other => {
                                tracing::error!(?other, %frame, "page of a failed write-back could not be put back; it stays in staging")
                            }
                        }
                    }
                    (false, _) => {
                        // Taken back by a fault (MOVE or copy) or its range is gone.
                        if !self.still_owned(key, addr) {
                            MmStats::bump(&c.fenced);
                        }
                        let _ = self.mem.swap.free(entry);
                        if self.mem.orphans.remove(&frame) {
                            if let Err(e) = core.pool.release(frame) {
                                tracing::error!(error = %e, %frame, "releasing an orphan staging frame failed");
                            }
                        }
                    }
                }
            }
            Op::SwapIn {
                key,
                addr,
                frame,
                entry,
            } => {
                let _span = tracing::trace_span!("swap_in_done", addr, %entry).entered();
                let waiters = match self
                    .mem
                    .spaces
                    .get(&key.pid)
                    .and_then(|s| s.pages.get(&addr))
                {
                    Some(PageState::SwapIn {
                        frame: f, waiters, ..
                    }) if *f == frame && self.still_owned(key, addr) => Some(*waiters),
                    _ => None,
                };
                let Some(waiters) = waiters else {
                    MmStats::bump(&c.fenced);
                    self.return_frame(frame, false);
                    let _ = self.mem.swap.free(entry);
                    return;
                };
                match result {
                    Ok(()) => {
                        // Hash the content read back (while we still own the slot): a
                        // later eviction compares against it to skip the write.
                        let hash = if self.mem.spaces.contains_key(&key.pid)
                            && core.config.clean_eviction
                        {
                            crate::sys::io::hash_slot(&core.pool, frame).ok()
                        } else {
                            None
                        };
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.clear(addr);
                        }
                        let region = self
                            .mem
                            .spaces
                            .get(&key.pid)
                            .and_then(|s| s.range_of(addr))
                            .map_or(0, |(_, r)| r.id);
                        self.install_fresh(
                            key.pid,
                            addr,
                            &[frame],
                            FrameOwner {
                                pid: key.pid,
                                region,
                            },
                            false,
                        );
                        let installed = matches!(
                            self.mem
                                .spaces
                                .get(&key.pid)
                                .and_then(|s| s.pages.get(&addr)),
                            Some(PageState::Resident(_) | PageState::Copied)
                        );
                        if !installed {
                            // Not installed (the address space is changing: a `mremap` or
                            // `munmap` event waits for its reader; daemon mode): the content
                            // stays in swap, and the waiters fault again once the event is
                            // applied. Never lose it, never leave the page vacant.
                            if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                                space.set(addr, PageState::Swapped(entry));
                            }
                            core.wake_mask(waiters, self.worker);
                            return;
                        }
                        self.keep_or_free_copy(key.pid, addr, entry, hash);
                        MmStats::bump(&c.swap_ins_done);
                    }
                    Err(e) if e.is_retryable() => {
                        let t = self.queue_read(entry, frame);
                        self.io.ops.insert(t, op);
                        core.io_in_flight.fetch_add(1, Ordering::AcqRel);
                        if let Some(PageState::SwapIn { ticket, .. }) = self
                            .mem
                            .spaces
                            .get_mut(&key.pid)
                            .and_then(|s| s.pages.get_mut(&addr))
                        {
                            *ticket = t;
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, addr, %entry, "swap-in failed: content lost, page poisoned (SIGBUS on access, never zeros)");
                        MmStats::bump(&c.poisoned);
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.clear(addr);
                        }
                        if let Err(pe) = core
                            .installer_in(self.mem, key.pid)
                            .poison(&core.pool, addr)
                        {
                            tracing::error!(error = %pe, addr, "poisoning failed");
                        }
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.set(addr, PageState::Poisoned);
                        }
                        self.return_frame(frame, false);
                        let _ = self.mem.swap.free(entry);
                    }
                }
                core.wake_mask(waiters, self.worker);
            }
        }
    }

    /// The write-back that was to fill `entry` failed while a page was `Swapped` to it
    /// (see `MemState::unwritten`): those pages are poisoned (SIGBUS on access, never
    /// zeros).
    fn poison_unwritten(&mut self, entry: SwapEntry) {
        let core = self.core;
        let mut hit = Vec::new();
        for (pid, space) in &self.mem.spaces {
            for (a, st) in &space.pages {
                if matches!(st, PageState::Swapped(e) if *e == entry) {
                    hit.push((*pid, *a));
                }
            }
        }
        for (pid, addr) in hit {
            tracing::error!(addr, %entry, "the write-back a moved page shared failed: page poisoned (SIGBUS on access, never zeros)");
            MmStats::bump(&core.stats.counters.poisoned);
            if let Err(e) = core.installer_in(self.mem, pid).poison(&core.pool, addr) {
                tracing::error!(error = %e, addr, "poisoning failed");
            }
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, PageState::Poisoned);
            }
            let _ = self.mem.swap.free(entry);
        }
    }

    /// An asynchronous stage finished with the page out and its content in the frame's
    /// slot (Staging): queue its write-back.
    fn leave(&mut self, v: MappedPage, entry: SwapEntry) {
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            // queue_writeback counts the eviction again.
            space.counters.evictions = space.counters.evictions.saturating_sub(1);
        }
        // Not queued: the page was put back in place (resident) and nothing is lost.
        self.queue_writeback(v, entry);
    }

    /// An asynchronous access sample finished: the page is `Sampled` (its content in the
    /// frame's slot) if it left, else `Resident` again. The eviction policy tracked it all
    /// along (it was spared as accessed, see the crate docs): nothing to tell it.
    fn sample_done(&mut self, v: MappedPage, moved: bool) {
        let Some(space) = self.mem.spaces.get_mut(&v.pid) else {
            return;
        };
        if moved {
            space.counters.samples += 1;
            MmStats::bump(&self.core.stats.counters.samples_taken);
            space.set(v.addr, PageState::Sampled(v.frame));
        } else {
            space.set(v.addr, PageState::Resident(v.frame));
        }
    }

    /// An asynchronous stage finished with the page still in its address space: it is
    /// resident again.
    fn stay(&mut self, v: MappedPage, entry: SwapEntry) {
        let _ = self.mem.swap.free(entry);
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            space.counters.evictions = space.counters.evictions.saturating_sub(1);
            space.counters.evict_skipped += 1;
            space.set(v.addr, PageState::Resident(v.frame));
        }
        MmStats::bump(&self.core.stats.counters.evict_pinned);
        let mut view = MemView {
            pool: &self.core.pool,
            mem: self.mem,
        };
        self.evict.on_refused(v, &mut view);
    }
}

/// The agent took the page at `addr` out after the address was reused, and its content
/// (now in `frame`'s slot) could not be put back: `frame` becomes the page, `Sampled`
/// (the next fault installs it), and what the core thought was there goes. Core lock held
/// (`st`).
fn displace(core: &MmCore, st: &mut MmState, pid: u32, addr: u64, frame: usm_kmod::FrameNo) {
    st.mem.orphans.remove(&frame);
    let Some(space) = st.mem.spaces.get_mut(&pid) else {
        return;
    };
    match space.clear(addr) {
        Some(PageState::Resident(f)) => {
            st.evict.on_free(f);
            if let Err(e) = core.pool.release(f) {
                tracing::warn!(error = %e, %f, addr, "releasing a displaced frame failed");
            }
        }
        Some(PageState::Leaving {
            frame: f,
            entry,
            waiters,
        }) => {
            // Its stage finds nothing to move (the page is already out): fenced then.
            st.mem.orphans.insert(f);
            match entry {
                Some(entry) => {
                    let _ = st.mem.swap.free(entry);
                }
                // A sample: the policy tracked it.
                None => st.evict.on_free(f),
            }
            core.wake_mask(waiters, usize::MAX);
        }
        _ => {}
    }
    space.set(addr, PageState::Sampled(frame));
    let mut view = MemView {
        pool: &core.pool,
        mem: &st.mem,
    };
    st.evict.on_map(MappedPage { frame, pid, addr }, &mut view);
}
