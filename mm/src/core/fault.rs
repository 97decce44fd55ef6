//! The fault path: [`WorkerMm::handle_fault`] → `serve` (the allocation policy, guarded)
//! → `apply_map` → `install_fresh`.
//!
//! 1. Under the core lock, the page's state decides: present (`Resident`, `Copied`,
//!    `Poisoned`) → [`FaultResult::AlreadyPresent`]; a swap-in or a stage in flight →
//!    [`FaultResult::Wait`] (this worker's bit joins the page's waiters); `Sampled` → the
//!    sampled re-fault (`refault_sampled`, [`super::swap_in`]); otherwise `serve`.
//! 2. `serve` takes the allocation policy out of its range or space (`take_alloc`), calls
//!    it through `usm_policies::guarded` and puts it back (`put_alloc`). A panic gives
//!    back every frame the call took, replaces the policy by the registry's default and
//!    retries (at most three times, then the access fails).
//! 3. The decision: `Map` → `apply_map` (staged frames go back to their own page as
//!    swap-cache hits; fresh frames are installed by `install_fresh`, one installer call
//!    per run of consecutive vacant pages, never over content); `Yield` → the swap-in the
//!    policy queued is in flight, [`FaultResult::Wait`]; `Oom` → the OOM ladder
//!    ([`super::oom`]).
//! 4. After the fault (unless it waits for memory), `balance` evicts below the low
//!    watermark; the guard is dropped and the worker's queued I/O submitted.
//!
//! `install_fresh` is also how a completed swap-in and a swap-cache copy are installed:
//! the installer's report is recorded page by page (`mapped` → `Resident`, `copied` /
//! `present` → `Copied`, `retry` → stays vacant), frames not mapped go back.
//!
//! Lock: `handle_fault` takes the core lock; the rest are `WorkerCx` methods (lock held).

use std::time::Instant;

use usm_kmod::FrameNo;
use usm_kmod::event::{Fault, Origin};
use usm_kmod::pool::FrameOwner;
use usm_policies::{AllocPolicy, Decision, MappedPage, guarded, page_floor};
use usm_sync::atomic::Ordering;

use crate::MmError;
use crate::space::{PageState, Space};
use crate::stats::{FaultPath, MmStats};

use super::oom::{OomLadder, OomStep};
use super::{MemView, PAGE, WorkerCx, WorkerMm};

/// What happened to a fault handed to [`WorkerMm::handle_fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultResult {
    /// The page is present now: resume the faulting thread (it retries the access).
    Resolved(FaultPath),
    /// The page was already present (another resolver won, or a spurious fault): resume.
    AlreadyPresent,
    /// A swap-in is in flight for the page: keep the thread parked; this worker is woken
    /// (its waker called) when the page is installed, then ask again.
    Wait,
    /// No free frame; eviction is in flight. Ask again at the next poll.
    NeedMemory,
    /// The access failed (OOM policy, poisoned content): the page is poisoned, so resuming
    /// the thread makes it take SIGBUS at that page. The reason is logged.
    Failed(String),
    /// The address is not a managed page of this pid.
    Foreign,
}

impl WorkerMm {
    /// Serves a fault on `addr` of `pid` (see [`FaultResult`]).
    pub fn handle_fault(&mut self, pid: u32, addr: u64, write: bool, tid: u32) -> FaultResult {
        let core = &*self.core;
        let addr = page_floor(addr);
        let span = tracing::trace_span!("fault", addr, write, worker = self.worker).entered();
        MmStats::bump(&core.stats.counters.faults);
        let mut guard = core.lock();
        let st = &mut *guard;
        let result = {
            let Some(space) = st.mem.spaces.get_mut(&pid) else {
                return FaultResult::Foreign;
            };
            if space.range_of(addr).is_none() {
                return FaultResult::Foreign;
            }
            if super::fork_wait::blocks(&st.mem, pid) {
                st.mem.memory_waiters |= 1 << self.worker;
                return FaultResult::NeedMemory;
            }
            let Some(space) = st.mem.spaces.get_mut(&pid) else {
                return FaultResult::Foreign;
            };
            match space.pages.get_mut(&addr) {
                Some(PageState::Resident(_) | PageState::Copied | PageState::Poisoned) => {
                    return FaultResult::AlreadyPresent;
                }
                Some(PageState::SwapIn { waiters, .. } | PageState::Leaving { waiters, .. }) => {
                    *waiters |= 1 << self.worker;
                    return FaultResult::Wait;
                }
                Some(PageState::Swapped(e)) if st.mem.unwritten.contains(e) => {
                    // Its slot is still being written (`MemState::unwritten`): the write's
                    // completion wakes the workers waiting for memory.
                    st.mem.memory_waiters |= 1 << self.worker;
                    return FaultResult::NeedMemory;
                }
                Some(&mut PageState::Sampled(frame)) => {
                    let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
                    let r = cx.refault_sampled(pid, addr, frame, write);
                    cx.balance();
                    drop(guard);
                    let _ = self.io.engine.submit();
                    return r;
                }
                _ => {}
            }
            space.counters.faults += 1;
            let fault = Fault {
                addr,
                write,
                wp: false,
                minor: false,
                len_hint: PAGE,
                origin: Origin { pid, tid },
            };
            let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
            cx.serve(&fault)
        };
        if !matches!(result, FaultResult::NeedMemory) {
            let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
            cx.balance();
        }
        drop(guard);
        let _ = self.io.engine.submit();
        drop(span);
        result
    }
}

impl WorkerCx<'_> {
    /// Runs the region's allocation policy for `fault` and carries out its decision.
    fn serve(&mut self, fault: &Fault) -> FaultResult {
        let (pid, addr) = (fault.origin.pid, fault.addr);
        let mut ladder = OomLadder::default();
        loop {
            let Some(space) = self.mem.spaces.get_mut(&pid) else {
                return FaultResult::Foreign;
            };
            let Some((spec, mut alloc, space_level)) = take_alloc(space, addr) else {
                return FaultResult::NeedMemory;
            };
            let name = alloc.name().to_owned();
            let decision = guarded(&name, || alloc.alloc(fault, self));
            let panicked = decision.is_err();
            if panicked {
                // Replace the instance: the default allocation policy (logged).
                let fallback = self
                    .core
                    .registry
                    .default_spec(usm_policies::PolicyKind::Alloc)
                    .unwrap_or("first-fit")
                    .to_owned();
                match self.core.registry.build_alloc(&fallback) {
                    Ok(p) => alloc = p,
                    Err(e) => tracing::error!(error = %e, "cannot build the default policy"),
                }
                tracing::error!(policy = %name, replacement = %fallback, spec = %spec,
                    "allocation policy panicked; frames it held were taken back and the region now uses the default policy");
                MmStats::bump(&self.core.stats.counters.policy_panics);
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.counters.policy_panics += 1;
                }
            }
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                put_alloc(space, addr, alloc, space_level);
            }
            let decision = match decision {
                Ok(d) => d,
                Err(_) => {
                    self.restore_taken();
                    ladder.attempts += 1;
                    if ladder.attempts > 3 {
                        return self.fail(addr, pid, "allocation policy keeps panicking".into());
                    }
                    continue;
                }
            };
            match decision {
                Decision::Map(m) => return self.apply_map(pid, addr, m),
                Decision::Yield(ticket) => {
                    self.restore_taken();
                    let space = self.mem.spaces.get_mut(&pid);
                    return match space.and_then(|s| s.pages.get_mut(&addr)) {
                        Some(PageState::SwapIn {
                            waiters, ticket: t, ..
                        }) if *t == ticket => {
                            *waiters |= 1 << self.worker;
                            FaultResult::Wait
                        }
                        Some(PageState::SwapIn { waiters, .. }) => {
                            *waiters |= 1 << self.worker;
                            FaultResult::Wait
                        }
                        other => {
                            tracing::error!(?other, "policy yielded on a page with no swap-in");
                            FaultResult::NeedMemory
                        }
                    };
                }
                Decision::Oom => match self.oom_ladder(fault, &mut ladder) {
                    OomStep::Retry => continue,
                    OomStep::Done(result) => return result,
                },
            }
        }
    }

    fn apply_map(&mut self, pid: u32, addr: u64, m: usm_policies::Mapping) -> FaultResult {
        let Some(space) = self.mem.spaces.get(&pid) else {
            self.restore_taken();
            return FaultResult::Foreign;
        };
        let Some((rstart, range)) = space.range_of(addr) else {
            self.restore_taken();
            return FaultResult::Foreign;
        };
        let (rend, region) = (range.end, range.id);
        let owner = FrameOwner { pid, region };
        if !m.contains(addr) || m.start() < rstart || m.end() > rend {
            tracing::error!(
                start = m.start(),
                end = m.end(),
                addr,
                "policy mapping misses the fault or leaves its region"
            );
            self.restore_taken();
            return FaultResult::NeedMemory;
        }
        let mut path = FaultPath::FastMap;
        if m.len() > 1
            && let Some(space) = self.mem.spaces.get_mut(&pid)
        {
            space.counters.fhp_pages += m.len() as u64 - 1;
        }
        // 1. Staged frames (swap-cache hits) go back to their own page.
        let mut fresh: Vec<(u64, FrameNo)> = Vec::with_capacity(m.len());
        // Policies map frames in the order they took them: reversed, each one is found
        // at the end of `taken` (O(1) per page instead of a scan; a 2 MiB run is 512).
        self.taken.reverse();
        for (a, f) in m.pages() {
            if let Some(i) = self.staged.iter().position(|s| s.0 == f) {
                let (f, spid, saddr, prior) = self.staged.swap_remove(i);
                if (spid, saddr) != (pid, a) {
                    tracing::error!(%f, "policy mapped a staged frame at another page; restored");
                    if let Some(space) = self.mem.spaces.get_mut(&spid) {
                        space.set(saddr, prior);
                    }
                    continue;
                }
                path = FaultPath::SwapCacheHit;
                self.swap_cache_hit(pid, a, f, prior, owner);
            } else if let Some(i) = if self.taken.last() == Some(&f) {
                Some(self.taken.len() - 1)
            } else {
                self.taken.iter().position(|&t| t == f)
            } {
                self.taken.swap_remove(i);
                if self
                    .mem
                    .spaces
                    .get(&pid)
                    .is_some_and(|s| s.pages.contains_key(&a))
                {
                    // Not vacant: never map over content.
                    self.return_frame(f, true);
                } else {
                    fresh.push((a, f));
                }
            } else {
                tracing::error!(%f, "policy mapped a frame it did not take this call");
            }
        }
        // 2. Fresh frames: one MOVE per run of consecutive pages.
        let mut i = 0;
        while i < fresh.len() {
            let mut j = i + 1;
            while j < fresh.len() && fresh[j].0 == fresh[j - 1].0 + PAGE {
                j += 1;
            }
            let frames: Vec<FrameNo> = fresh[i..j].iter().map(|p| p.1).collect();
            self.install_fresh(pid, fresh[i].0, &frames, owner, true);
            i = j;
        }
        self.restore_taken();
        match self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)) {
            Some(PageState::Resident(_) | PageState::Copied) => FaultResult::Resolved(path),
            _ => FaultResult::NeedMemory,
        }
    }

    /// Installs Taken frames (zeroed if `zeroed`, else holding content) at `start..`.
    pub(super) fn install_fresh(
        &mut self,
        pid: u32,
        start: u64,
        frames: &[FrameNo],
        owner: FrameOwner,
        zeroed: bool,
    ) {
        let installer = self.core.installer_in(self.mem, pid);
        let installed = if zeroed {
            installer.install_zeroed(&self.core.pool, frames, start, owner)
        } else {
            installer.install(&self.core.pool, frames, start, owner)
        };
        let report = match installed {
            Ok(r) => r,
            Err(e) => {
                // The mapping went away under the fault (its `munmap` event is on its way
                // to the reader, daemon mode) or the process is gone: nothing to install.
                if matches!(&e, MmError::Kmod(k) if k.is_not_found() || k.is_mm_gone()) {
                    tracing::debug!(error = %e, start, "install target gone");
                } else {
                    tracing::error!(error = %e, start, "install failed");
                }
                for &f in frames {
                    self.return_frame(f, zeroed);
                }
                return;
            }
        };
        let c = &self.core.stats.counters;
        if report.mapped.len() != frames.len() {
            MmStats::bump(&c.partial_moves);
        }
        c.pages_mapped
            .fetch_add(report.mapped.len() as u64, Ordering::Relaxed);
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            if zeroed {
                space.counters.zero_fills += (report.mapped.len() + report.copied.len()) as u64;
            }
            for &(a, f) in &report.mapped {
                space.set(a, PageState::Resident(f));
            }
            for &(a, _) in report.copied.iter().chain(report.present.iter()) {
                space.set(a, PageState::Copied);
            }
        }
        for &(_, f) in report.copied.iter() {
            MmStats::bump(&c.copy_fallbacks);
            self.return_frame(f, zeroed);
        }
        for &(_, f) in report.present.iter().chain(report.retry.iter()) {
            self.return_frame(f, zeroed);
        }
        for &(a, f) in &report.mapped {
            let mut view = MemView {
                pool: &self.core.pool,
                mem: self.mem,
            };
            self.evict.on_map(
                MappedPage {
                    frame: f,
                    pid,
                    addr: a,
                },
                &mut view,
            );
        }
    }
}

/// Takes the allocation policy serving `addr` out of `space` for one call: the range's
/// own, or the space's ([`crate::SpacePolicy`]). Returns its spec, the policy and whether
/// it is the space's. `None`: no range there, or the policy is being called.
fn take_alloc(space: &mut Space, addr: u64) -> Option<(String, Box<dyn AllocPolicy>, bool)> {
    let (_, range) = space.range_of_mut(addr)?;
    if let Some(p) = range.alloc.take() {
        return Some((range.alloc_spec.clone(), p, false));
    }
    let shared = space.alloc.as_mut()?;
    let p = shared.policy.take()?;
    Some((shared.spec.clone(), p, true))
}

/// Puts back what [`take_alloc`] took (the range may be gone meanwhile: then a range's
/// policy is dropped with it).
fn put_alloc(space: &mut Space, addr: u64, policy: Box<dyn AllocPolicy>, space_level: bool) {
    if space_level {
        if let Some(shared) = space.alloc.as_mut() {
            shared.policy = Some(policy);
        }
    } else if let Some((_, range)) = space.range_of_mut(addr) {
        range.alloc = Some(policy);
    }
}

/// Start time of a fault, for the latency histograms.
#[derive(Debug, Clone, Copy)]
pub struct FaultClock(Instant);

impl FaultClock {
    /// Now.
    pub fn start() -> FaultClock {
        FaultClock(Instant::now())
    }
    /// Records the time since [`FaultClock::start`] under `path`.
    pub fn record(self, stats: &MmStats, path: FaultPath) {
        stats.record(path, self.0.elapsed());
    }
}
