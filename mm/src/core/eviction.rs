//! Eviction: victim choice, staging, write-back issue.
//!
//! - `balance` (after every fault, completion and finished stage): below the low
//!   watermark, reclaim up to the high one (write-backs in flight counted as
//!   free-to-be) — in the background where workers reclaim, else at once (below).
//! - `run_eviction`: room = the engine's free depth, less the stages in flight (at most
//!   half the depth: a stopped program must not stop eviction), capped at
//!   `MmConfig::eviction_batch`. A full swap is said once per episode and nothing is
//!   chosen. The eviction policy chooses victims (guarded: a panic replaces it with
//!   `fifo`, which is told every page it should track — `replace_evict`) through
//!   `SamplingView`, which takes a resident page out to its own slot the first time it is
//!   asked about (re-fault access sampling): at once where the installer stages
//!   synchronously (at most `SAMPLES_PER_VICTIM` per victim wanted, between
//!   `MIN_SAMPLES_PER_SCAN` and `MAX_SAMPLES_PER_SCAN` per search), else queued with the
//!   batch (at most `MAX_ASYNC_SAMPLES_PER_SCAN`; the page is `Leaving { entry: None }`
//!   until `finish_stage`, and reported accessed while it is).
//! - `prepare_victim`: a victim must still be `Resident` (or `Sampled`: already in its
//!   slot) with that frame and not pinned, else it is skipped (re-announced with `on_refused`
//!   if pinned or its sample is in flight). A page with a valid clean copy in swap is
//!   evicted without I/O (`evict_clean`: the staged content's hash must match the one
//!   taken at swap-in). Otherwise it gets a swap entry.
//! - `stage_batch`: one `Installer::stage_many` per space for its victims and then its
//!   queued samples (victims get the agent's staging slots first); for a victim `Staged`
//!   → `queue_writeback` (the page is `Staging`, its write queued straight from the
//!   slot); `Pending` → the page is `Leaving` until `finish_stage`
//!   ([`super::completion`]); `Stayed` → the entry is freed, the page stays. For a
//!   sample: `Pending` → it stays `Leaving { entry: None }`; `Staged` → `Sampled`;
//!   `Stayed` → `Resident` again. A write that cannot be queued puts the page back (or, if
//!   the address space is changing, leaves it `Sampled` in its slot): nothing is lost.
//!
//! # Background and direct reclaim
//! Like the kernel's kswapd and direct reclaim. Workers that call
//! [`WorkerMm::join_reclaim`] (the embedded runtime's and the daemon's LocalManager
//! workers) are *reclaimers*: they call [`WorkerMm::reclaim_slice`] whenever they have
//! nothing else to run, and each slice evicts at most `BACKGROUND_BATCH` pages. A fault,
//! completion or finished stage that finds free frames below the low watermark then only
//! raises the core's `reclaim` request (waking the reclaimers on the first raise); a
//! reclaimer clears it once free frames, write-backs and stages in flight reach the high
//! watermark. Below half the low watermark (`direct_threshold`, the kernel's `min`) the
//! fault evicts `DIRECT_BATCH` pages itself as well, so a worker that never idles still
//! gets frames. Without reclaimers (a core driven by hand, tests) `balance` evicts up to
//! the high watermark at once, as before. Slices are paced (`RECLAIM_PACE`), so the lock
//! is free most of the time for the other workers' faults. Why: a 128-page batch run by a
//! fault held the core lock for 0.5–2 ms, and every request on both workers waited behind
//! it; unpaced slices back to back did the same (`usm-kv`, `bench/results/kv.md`, run 9).
//!
//! The page is always out of its address space before its write is queued, and its swap
//! entry is recorded (`Swapped`) before its staging frame is recycled (at completion).
//!
//! Lock: `evict_now` takes the core lock; the rest are `WorkerCx` methods or views of the
//! locked state (lock held). Write-backs are queued and submitted under the lock.

use usm_kmod::FrameNo;
use usm_policies::{Access, EvictCx, Hint, MappedPage, VictimRequest, VictimScan, guarded};
use usm_swap::SwapEntry;
use usm_sync::atomic::Ordering;

use crate::MmError;
use crate::installer::StageOutcome;
use crate::space::PageState;
use crate::stats::MmStats;

use super::{MemState, MemView, MmCore, Op, WorkerCx, WorkerMm};

/// Most pages moved out for access sampling in one victim search (bounds the one-time
/// cost when pressure first arrives and every page is unsampled; beyond it the policy
/// gets "no information" for the rest of that search).
const MAX_SAMPLES_PER_SCAN: usize = 4096;

/// A search moves out at most this many pages per victim wanted (at least
/// [`MIN_SAMPLES_PER_SCAN`]): a sample is a `UFFDIO_MOVE` under the core lock, so a small
/// slice of background reclaim must not sample thousands of pages at once (searches of
/// several milliseconds were seen when the hand met a run of unsampled pages).
const SAMPLES_PER_VICTIM: usize = 8;

/// See [`SAMPLES_PER_VICTIM`].
const MIN_SAMPLES_PER_SCAN: usize = 64;

/// Most pages queued for an asynchronous sample in one victim search (daemon: each one is
/// a `UFFDIO_MOVE` by the tagger's agent and a `process_vm_readv` by the daemon, and holds
/// one of the agent's staging slots — 256 per process — until its copy is dropped; a
/// space's victims get the slots first, and a sample that finds none stays resident).
/// Beyond it the policy gets "no information" for the rest of the search. Measured with
/// `daemon_mm`'s hot/cold test: 128 let a few hundred more hot pages go uninformed than
/// 192 or 256.
const MAX_ASYNC_SAMPLES_PER_SCAN: usize = 192;

/// Most victims one slice of background reclaim stages: a request that arrives while an
/// idle worker reclaims waits for at most one slice (a victim costs a few µs here: its
/// `UFFDIO_MOVE` with the TLB flush, its write's submission, its share of the scan).
const BACKGROUND_BATCH: usize = 16;

/// After a slice of background reclaim that took `t`, the reclaimer waits
/// `RECLAIM_PACE × t` before the next: reclaim holds the core lock at most a fifth of the
/// time and still evicts several times the rate a saturated `usm-kv` needs (paces 0 to 8
/// compared in `bench/results/kv.md`, run 9).
const RECLAIM_PACE: u32 = 4;

/// Most victims a fault stages itself (direct reclaim) when background reclaimers exist
/// (the kernel's direct reclaim takes `SWAP_CLUSTER_MAX`, 32 pages, at a time).
const DIRECT_BATCH: usize = 32;

/// Free frames below which faults reclaim themselves although reclaimers exist: half the
/// low watermark (the kernel's `min` is below `low` the same way).
fn direct_threshold(low: usize) -> usize {
    low / 2
}

impl WorkerMm {
    /// Makes this worker a background reclaimer: from now on a fault that finds free
    /// frames below the low watermark asks the reclaimers (and wakes them) instead of
    /// evicting the whole way to the high watermark itself, and this worker must call
    /// [`WorkerMm::reclaim_slice`] whenever it has nothing else to do.
    pub fn join_reclaim(&self) {
        self.core
            .reclaimers
            .fetch_or(1 << self.worker, Ordering::AcqRel);
    }

    /// Takes this worker out of the background reclaimers (before it stops).
    pub fn leave_reclaim(&self) {
        self.core
            .reclaimers
            .fetch_and(!(1 << self.worker), Ordering::AcqRel);
    }

    /// One slice of background reclaim, if reclaim was asked for (a cheap load when not)
    /// and the last slice ended long enough ago: for a worker with nothing else to run.
    /// Returns the victims staged (0: nothing to do or not yet, or nothing could be done
    /// now — park, no longer than [`WorkerMm::reclaim_park_timeout`] says).
    ///
    /// Slices are paced: after one that took `t`, the next waits `RECLAIM_PACE × t`
    /// (reclaim holds the core lock at most a fifth of the time). Back to back, the
    /// reclaimer re-took the lock the instant it let go (the lock does not queue its
    /// waiters), and the other workers' faults waited as long as behind one big batch.
    pub fn reclaim_slice(&mut self) -> usize {
        if !self.core.reclaim.load(Ordering::Acquire) {
            return 0;
        }
        let started = std::time::Instant::now();
        if started < self.next_slice {
            return 0;
        }
        let core = &*self.core;
        let mut guard = core.lock();
        let st = &mut *guard;
        let n = WorkerCx::new(core, st, &mut self.io, self.worker).reclaim_slice();
        drop(guard);
        let _ = self.io.engine.submit();
        let ended = std::time::Instant::now();
        self.next_slice = ended + RECLAIM_PACE * (ended - started);
        // Stalled only if nothing in flight anywhere could make room for the next slice
        // (a full engine is not a stall: its completions let the next slice go on).
        core.reclaim_stalled
            .store(n == 0 && core.io_in_flight() == 0, Ordering::Release);
        n
    }

    /// See [`MmCore::reclaim_pending`].
    pub fn reclaim_pending(&self) -> bool {
        self.core.reclaim_pending()
    }

    /// A reclaimer's park timeout: `timeout` (its host's own), shortened while background
    /// reclaim is wanted to the time until this worker's next slice may start.
    pub fn reclaim_park_timeout(
        &self,
        timeout: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        if !self.core.reclaim.load(Ordering::Acquire) {
            return timeout;
        }
        let due = self
            .next_slice
            .saturating_duration_since(std::time::Instant::now());
        Some(timeout.map_or(due, |t| t.min(due)))
    }
}

impl MmCore {
    /// Background reclaim is wanted and not stalled: work in progress, which a host
    /// waiting for quiescence must wait for. Stalled: the last slice staged nothing while
    /// no I/O was in flight (swap full, eviction off, every page pinned) — not busy; it is
    /// tried again when a reclaimer is idle, and cleared when reclaim is asked for anew.
    pub fn reclaim_pending(&self) -> bool {
        self.reclaim.load(Ordering::Acquire) && !self.reclaim_stalled.load(Ordering::Acquire)
    }

    /// Evicts up to `want` pages now on behalf of worker `io` (used by tests and by the
    /// watermark logic). Returns the pages staged.
    pub fn evict_now(&self, io: &mut WorkerMm, want: usize) -> usize {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut cx = WorkerCx::new(self, st, &mut io.io, io.worker);
        cx.run_eviction(VictimRequest::any(want)).chosen
    }
}

impl WorkerCx<'_> {
    /// After a fault, a completion or a finished stage: below the low watermark, reclaim
    /// up to the high one (see the module docs, "Background and direct reclaim").
    pub(super) fn balance(&mut self) {
        let wm = self.core.config.watermarks;
        let free = self.free_total();
        if free >= wm.low || self.core.devices.is_empty() {
            return;
        }
        let want = wm.high.saturating_sub(free + self.mem.writebacks);
        if want == 0 {
            return;
        }
        let reclaimers = self.core.reclaimers.load(Ordering::Acquire);
        if reclaimers == 0 {
            self.run_eviction(VictimRequest::any(want));
            return;
        }
        if !self.core.reclaim.swap(true, Ordering::AcqRel) {
            self.core.reclaim_stalled.store(false, Ordering::Release);
            // Wakes the idle reclaimers (the wakers' lock is taken after the state lock,
            // as everywhere). This worker reclaims itself the next time it is idle.
            self.core.wake_mask(reclaimers, self.worker);
        }
        if free < direct_threshold(wm.low) {
            self.run_eviction(VictimRequest::any(want.min(DIRECT_BATCH)));
        }
    }

    /// One slice of background reclaim: up to [`BACKGROUND_BATCH`] victims while free
    /// frames, with write-backs and asynchronous stages in flight, are below the high
    /// watermark; clears the request once they are not. Returns the victims staged.
    pub(super) fn reclaim_slice(&mut self) -> usize {
        let wm = self.core.config.watermarks;
        let coming = self.free_total() + self.mem.writebacks + self.mem.leaving;
        let want = wm.high.saturating_sub(coming);
        if want == 0 || self.core.devices.is_empty() {
            self.core.reclaim.store(false, Ordering::Release);
            return 0;
        }
        self.run_eviction(VictimRequest::any(want.min(BACKGROUND_BATCH)))
            .chosen
    }

    /// Stages victims chosen by the eviction policy and queues their write-backs.
    pub(super) fn run_eviction(&mut self, req: VictimRequest) -> VictimScan {
        let span =
            tracing::debug_span!("eviction", want = req.want, worker = self.worker).entered();
        // Asynchronous stages in flight become write-backs on whichever worker finishes
        // them: count them against the room, but never more than half of it (a stopped
        // program's stages may not finish for a long time and must not stop eviction; a
        // write-back that finds no room puts its page back, nothing is lost).
        let depth = self.io.engine.depth() as usize;
        let room = depth
            .saturating_sub(self.io.engine.in_flight() as usize)
            .saturating_sub(self.mem.leaving.min(depth / 2));
        let want = req.want.min(room).min(self.core.config.eviction_batch);
        let full = self.mem.swap.free_slots() == 0 && !self.core.devices.is_empty();
        if full != self.mem.swap_full {
            // Said once per episode: pages stay in memory while swap has no room.
            self.mem.swap_full = full;
            if full {
                tracing::warn!(
                    slots = self.mem.swap.total_slots(),
                    "swap is full: no page can be evicted until slots come free; pages stay in memory and faults wait (the OOM policy decides when frames run out too)"
                );
                MmStats::bump(&self.core.stats.counters.swap_full);
            } else {
                tracing::info!("swap has free slots again; eviction resumes");
            }
        }
        if want == 0 || full || !self.core.eviction.load(Ordering::Acquire) {
            return VictimScan::default();
        }
        let mut out = Vec::with_capacity(want);
        let queued: Vec<MappedPage>;
        let mut scan = {
            let mut view = SamplingView {
                core: self.core,
                mem: self.mem,
                sampled: 0,
                max_samples: want
                    .saturating_mul(SAMPLES_PER_VICTIM)
                    .clamp(MIN_SAMPLES_PER_SCAN, MAX_SAMPLES_PER_SCAN),
                queued: Vec::new(),
            };
            let name = self.evict.name().to_owned();
            let evict = &mut *self.evict;
            let scan = guarded(&name, || {
                evict.victims(VictimRequest { want, ..req }, &mut view, &mut out)
            });
            self.core
                .stats
                .counters
                .samples_taken
                .fetch_add(view.sampled as u64, Ordering::Relaxed);
            queued = std::mem::take(&mut view.queued);
            match scan {
                Ok(scan) => scan,
                Err(p) => {
                    out.clear();
                    // Nothing was asked of the installer yet: the queued samples stay.
                    for q in queued {
                        if let Some(space) = self.mem.spaces.get_mut(&q.pid) {
                            space.set(q.addr, PageState::Resident(q.frame));
                        }
                    }
                    self.replace_evict(&name, &p.to_string());
                    return VictimScan::default();
                }
            }
        };
        let mut staged = 0;
        let mut to_stage: Vec<(MappedPage, Option<SwapEntry>)> = Vec::new();
        let offered = out.len();
        for v in out {
            match self.prepare_victim(v) {
                Victim::Done(true) => staged += 1,
                Victim::Done(false) => {}
                Victim::Stage(v, entry) => to_stage.push((v, Some(entry))),
            }
        }
        let n_stage = to_stage.len();
        // Samples after the victims: each space's victims get the staging room first.
        to_stage.extend(queued.into_iter().map(|q| (q, None)));
        staged += self.stage_batch(to_stage);
        if staged == 0 {
            tracing::debug!(
                want,
                room,
                offered,
                n_stage,
                ?scan,
                "eviction chose nothing"
            );
        }
        scan.chosen = staged;
        if staged > 0 {
            if let Err(e) = self.io.engine.submit() {
                tracing::warn!(error = %e, "submitting write-backs failed");
            }
        }
        drop(span);
        scan
    }

    /// Lets go of up to `n` resident pages of any space: they stay in their address space
    /// (`Copied`, no longer the core's), their frames go back to the pool.
    pub(super) fn let_go(&mut self, n: usize) -> usize {
        let mut done = 0;
        for space in self.mem.spaces.values_mut() {
            let some: Vec<(u64, FrameNo)> = space
                .pages
                .iter()
                .filter_map(|(&a, s)| match s {
                    PageState::Resident(f) => Some((a, *f)),
                    _ => None,
                })
                .take(n - done)
                .collect();
            for (a, f) in some {
                self.evict.on_free(f);
                if let Err(e) = self.core.pool.release(f) {
                    tracing::warn!(error = %e, %f, "releasing a frame failed");
                }
                space.set(a, PageState::Copied);
                done += 1;
            }
            if done >= n {
                break;
            }
        }
        done
    }

    /// The eviction policy panicked: FIFO replaces it (it needs nothing the failed one
    /// knew), learns every resident page, and each space counts the panic.
    fn replace_evict(&mut self, name: &str, why: &str) {
        MmStats::bump(&self.core.stats.counters.policy_panics);
        let fresh = match self.core.registry.build_evict("fifo") {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot build fifo to replace a panicking eviction policy");
                return;
            }
        };
        *self.evict = fresh;
        let mut resident = Vec::new();
        for (&pid, space) in self.mem.spaces.iter_mut() {
            space.counters.policy_panics += 1;
            for (&addr, st) in &space.pages {
                // What the policy tracks: resident pages, sampled ones and samples in
                // flight (victims on their way out were removed when chosen).
                if let PageState::Resident(frame)
                | PageState::Sampled(frame)
                | PageState::Leaving {
                    frame, entry: None, ..
                } = *st
                {
                    resident.push(MappedPage { frame, pid, addr });
                }
            }
        }
        resident.sort_by_key(|p| p.frame);
        let n = resident.len();
        let mut view = MemView {
            pool: &self.core.pool,
            mem: self.mem,
        };
        for p in resident {
            self.evict.on_map(p, &mut view);
        }
        tracing::error!(policy = %name, replacement = "fifo", pages = n, %why,
            "eviction policy panicked; fifo replaces it and tracks every resident page");
    }

    /// Checks a victim the eviction policy chose and gives it a swap slot: evicted
    /// already (clean or sampled: `Done(true)`), skipped (`Done(false)`), or to be staged.
    fn prepare_victim(&mut self, v: MappedPage) -> Victim {
        let core = self.core;
        let c = &core.stats.counters;
        let (ok, out) = match self
            .mem
            .spaces
            .get(&v.pid)
            .and_then(|s| s.pages.get(&v.addr))
        {
            Some(PageState::Resident(f)) if *f == v.frame => (true, false),
            // Out for sampling and not accessed since: already in its slot.
            Some(PageState::Sampled(f)) if *f == v.frame => (true, true),
            Some(PageState::Leaving {
                frame: f,
                entry: None,
                ..
            }) if *f == v.frame => {
                // Its sample is in flight (a policy that chose it anyway): not yet; the
                // policy keeps tracking it.
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_refused(v, &mut view);
                return Victim::Done(false);
            }
            _ => (false, false),
        };
        let pinned = self
            .mem
            .spaces
            .get(&v.pid)
            .is_some_and(|s| s.is_pinned(v.addr));
        if !ok || pinned {
            if ok {
                MmStats::bump(&c.evict_pinned);
                if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                    space.counters.evict_skipped += 1;
                }
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_refused(v, &mut view);
            }
            return Victim::Done(false);
        }
        if let Some(done) = self.evict_clean(v, out) {
            return Victim::Done(done);
        }
        let entry = match self.mem.swap.alloc() {
            Ok(e) => e,
            Err(_) => {
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_refused(v, &mut view);
                return Victim::Done(false);
            }
        };
        if out {
            MmStats::bump(&c.sampled_evictions);
            return Victim::Done(self.queue_writeback(v, entry));
        }
        Victim::Stage(v, entry)
    }

    /// Takes the victims (with their entry) and the queued samples (`None`) out of their
    /// address spaces, one [`Installer::stage_many`](crate::Installer::stage_many) per
    /// space (the daemon's agent moves a whole batch per round trip), and queues the
    /// write-backs of the victims that left. Returns how many victims did.
    fn stage_batch(&mut self, mut items: Vec<(MappedPage, Option<SwapEntry>)>) -> usize {
        let core = self.core;
        // Stable: within a space, victims stay ahead of samples.
        items.sort_by_key(|(v, _)| v.pid);
        let mut staged = 0;
        let mut frames = Vec::new();
        let mut done = Vec::new();
        for group in items.chunk_by(|a, b| a.0.pid == b.0.pid) {
            let pid = group[0].0.pid;
            frames.clear();
            frames.extend(group.iter().map(|(v, _)| v.frame));
            done.clear();
            core.installer_in(self.mem, pid)
                .stage_many(&core.pool, &frames, &mut done);
            for (i, &(v, entry)) in group.iter().enumerate() {
                let outcome = done.get(i).copied().unwrap_or(StageOutcome::Stayed);
                let Some(entry) = entry else {
                    self.sample_staged(v, outcome);
                    continue;
                };
                match outcome {
                    StageOutcome::Staged => {
                        if self.queue_writeback(v, entry) {
                            staged += 1;
                        }
                        continue;
                    }
                    StageOutcome::Pending => {
                        // Reclaim in flight: the page is Leaving until finish_stage.
                        self.mem.leaving += 1;
                        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                            space.counters.evictions += 1;
                            space.set(
                                v.addr,
                                PageState::Leaving {
                                    frame: v.frame,
                                    entry: Some(entry),
                                    waiters: 0,
                                },
                            );
                        }
                        MmStats::bump(&core.stats.counters.evicted);
                        staged += 1;
                        continue;
                    }
                    StageOutcome::Stayed => {}
                }
                MmStats::bump(&core.stats.counters.evict_pinned);
                let _ = self.mem.swap.free(entry);
                if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                    space.counters.evict_skipped += 1;
                }
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_refused(v, &mut view);
            }
        }
        staged
    }

    /// What became of a queued sample (its page is `Leaving { entry: None }`): in flight
    /// (`finish_stage` completes it), out already (`Sampled`), or it stayed (`Resident`
    /// again; it was reported accessed, so it is only spared once more).
    fn sample_staged(&mut self, v: MappedPage, outcome: StageOutcome) {
        let state = match outcome {
            StageOutcome::Pending => {
                self.mem.sampling.insert(v.frame);
                return;
            }
            StageOutcome::Staged => PageState::Sampled(v.frame),
            StageOutcome::Stayed => PageState::Resident(v.frame),
        };
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            if matches!(state, PageState::Sampled(_)) {
                space.counters.samples += 1;
                MmStats::bump(&self.core.stats.counters.samples_taken);
            }
            space.set(v.addr, state);
        }
    }

    /// Queues the write-back of victim `v`, already in staging, to `entry`.
    pub(super) fn queue_writeback(&mut self, v: MappedPage, entry: SwapEntry) -> bool {
        let core = self.core;
        let c = &core.stats.counters;
        let ticket = match crate::sys::io::write_from_slot(
            &mut self.io.engine,
            &core.pool,
            v.frame,
            entry,
        ) {
            Ok(t) => t,
            Err(e) => {
                // Put the page back where it was: nothing is lost.
                if matches!(&e, MmError::Swap(s) if s.is_retryable()) {
                    tracing::debug!(error = %e, "no room for a write-back; page restored");
                } else {
                    tracing::warn!(error = %e, "queueing a write-back failed; page restored");
                }
                let _ = self.mem.swap.free(entry);
                match core
                    .installer_in(self.mem, v.pid)
                    .unstage(&core.pool, v.frame)
                {
                    Ok(true) => {
                        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                            space.set(v.addr, PageState::Resident(v.frame));
                        }
                        let mut view = MemView {
                            pool: &core.pool,
                            mem: self.mem,
                        };
                        self.evict.on_refused(v, &mut view);
                    }
                    _ => {
                        // Not now (the address space is changing): the page waits in its
                        // frame's slot like a sampled page; its next access copies it back,
                        // and eviction may take it from there later.
                        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                            space.set(v.addr, PageState::Sampled(v.frame));
                        }
                    }
                }
                return false;
            }
        };
        let Some(key) = self.range_key(v.pid, v.addr) else {
            return false;
        };
        self.io.ops.insert(
            ticket,
            Op::WriteBack {
                key,
                addr: v.addr,
                frame: v.frame,
                entry,
            },
        );
        core.io_in_flight.fetch_add(1, Ordering::AcqRel);
        self.mem.writebacks += 1;
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            space.counters.evictions += 1;
            space.set(
                v.addr,
                PageState::Staging {
                    frame: v.frame,
                    entry,
                    worker: self.worker,
                    write: ticket,
                },
            );
        }
        MmStats::bump(&c.evicted);
        true
    }

    /// A swapped-in page whose copy in swap is still valid: if the installer says it was
    /// not written since, take it out and recycle its frame with no I/O (the entry is
    /// recorded first). `None`: not such a page (or written: its copy is dropped), use
    /// the write-back path. `Some(staged)` otherwise.
    /// `out`: the page is already in its slot (out for sampling).
    fn evict_clean(&mut self, v: MappedPage, out: bool) -> Option<bool> {
        let core = self.core;
        let (entry, hash) = self.mem.spaces.get_mut(&v.pid)?.clean.remove(&v.addr)?;
        // Cheap pre-filter: written since the swap-in (WP_ASYNC + PAGEMAP_SCAN). A page
        // out for sampling has no page-table entry to ask: the hash below decides.
        let installer = core.installer_in(self.mem, v.pid);
        if !out && !matches!(installer.is_written(v.addr), Ok(false)) {
            let _ = self.mem.swap.free(entry);
            return None;
        }
        if out {
            MmStats::bump(&core.stats.counters.sampled_evictions);
        } else if !matches!(installer.stage(&core.pool, v.frame), Ok(true)) {
            MmStats::bump(&core.stats.counters.evict_pinned);
            if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                space.clean.insert(v.addr, (entry, hash));
            }
            let mut view = MemView {
                pool: &core.pool,
                mem: self.mem,
            };
            self.evict.on_refused(v, &mut view);
            return Some(false);
        }
        // The page is out of the address space now, so nobody can write it. A write that
        // raced between the scan and the move shows in the content: compare it with the
        // hash taken when the page was read back. Equal: the swap copy is valid.
        if crate::sys::io::hash_slot(&core.pool, v.frame).ok() == Some(hash) {
            if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                space.counters.evictions += 1;
                space.set(v.addr, PageState::Swapped(entry));
            }
            if let Err(e) = core.pool.release(v.frame) {
                tracing::error!(error = %e, frame = %v.frame, "releasing a clean frame failed");
            }
            MmStats::bump(&core.stats.counters.evicted);
            MmStats::bump(&core.stats.counters.clean_evictions);
            return Some(true);
        }
        // Written in the window: an ordinary write-back to the same slot.
        Some(self.queue_writeback(v, entry))
    }
}

/// What [`WorkerCx::prepare_victim`] made of a victim.
enum Victim {
    /// Evicted (`true`) or skipped (`false`) already.
    Done(bool),
    /// To be taken out of its address space, then written to this entry.
    Stage(MappedPage, SwapEntry),
}

/// The eviction policy's view during a victim search: [`MemView`] plus re-fault access
/// sampling (see the module docs) when `MmConfig::access_sampling` is on.
struct SamplingView<'a> {
    core: &'a MmCore,
    mem: &'a mut MemState,
    /// Pages moved out during this search (synchronous installers).
    sampled: usize,
    /// Most pages this search may move out.
    max_samples: usize,
    /// Pages to take out asynchronously after the search (their state is already
    /// `Leaving { entry: None }`; `stage_batch` submits them with the victims).
    queued: Vec<MappedPage>,
}

impl EvictCx for SamplingView<'_> {
    /// A resident page is moved out to its own slot (`Resident → Sampled`; where pages
    /// leave asynchronously, queued: `Resident → Leaving { entry: None }`) and reported
    /// accessed: it gets one revolution of the hand to show it is used. A page still out
    /// when asked again was not accessed since: "not accessed". A sample still in flight
    /// has no news yet: reported accessed (spared). A sampled page that was accessed is
    /// resident again and was reported through `on_access` by its re-fault.
    fn access(&mut self, frame: FrameNo) -> Access {
        const ACCESSED: Access = Access {
            accessed: true,
            written: false,
        };
        if !self.core.config.access_sampling {
            return Access::default();
        }
        let pool = &self.core.pool;
        let Ok(desc) = pool.desc(frame) else {
            return Access::default();
        };
        let (pid, addr) = (desc.owner().pid, desc.vaddr());
        let installer = self.core.installer_in(self.mem, pid);
        let Some(space) = self.mem.spaces.get_mut(&pid) else {
            return Access::default();
        };
        match space.pages.get(&addr) {
            Some(PageState::Resident(f)) if *f == frame && !space.is_pinned(addr) => {
                if installer.stages_async() {
                    if self.queued.len() >= MAX_ASYNC_SAMPLES_PER_SCAN {
                        return Access::default();
                    }
                    space.set(
                        addr,
                        PageState::Leaving {
                            frame,
                            entry: None,
                            waiters: 0,
                        },
                    );
                    self.queued.push(MappedPage { frame, pid, addr });
                    return ACCESSED;
                }
                if self.sampled < self.max_samples
                    && matches!(installer.stage(pool, frame), Ok(true))
                {
                    space.set(addr, PageState::Sampled(frame));
                    space.counters.samples += 1;
                    self.sampled += 1;
                    return ACCESSED;
                }
                Access::default()
            }
            Some(PageState::Leaving {
                frame: f,
                entry: None,
                ..
            }) if *f == frame => ACCESSED,
            _ => Access::default(),
        }
    }

    fn is_pinned(&self, frame: FrameNo) -> bool {
        MemView {
            pool: &self.core.pool,
            mem: self.mem,
        }
        .is_pinned(frame)
    }

    fn hint(&self, pid: u32, addr: u64) -> Hint {
        MemView {
            pool: &self.core.pool,
            mem: self.mem,
        }
        .hint(pid, addr)
    }
}
