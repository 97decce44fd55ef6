//! Out of memory: what a fault does when its allocation policy answers `Oom`, and how an
//! access fails.
//!
//! `oom_ladder`, called by `serve` ([`super::fault`]) on `Decision::Oom`, climbs one step
//! per call, in order (each step only if the one before did not help):
//! 1. eviction turned off (daemon shutdown): let go of resident pages (`let_go`) and retry;
//! 2. write-backs in flight: wait for one ([`FaultResult::NeedMemory`], the worker's bit in
//!    `memory_waiters`: the next write-back to complete on any worker wakes it);
//! 3. once per fault: evict up to the high watermark; victims staged → wait; frames came
//!    free → retry;
//! 4. asynchronous stages in flight, evictions or access samples (a program's agent has
//!    not answered): wait, never OOM;
//! 5. ask the OOM policy (guarded; a panic fails the access): `EvictHarder(n)` → a hard
//!    victim search (at most 8 times per fault), `FailAccess` → fail, `KillLargestProcess`
//!    / `KillLargestTask` → the installer of the space holding the most frames ends its
//!    process (daemon: SIGKILL through a pidfd; the embedded installer cannot, and the
//!    access fails); the fault waits for the frames unless its own process is the one killed.
//!
//! Failing an access (`fail`) logs the numbers that led to it (free frames and slots,
//! write-backs and stages in flight), poisons the page (`UFFDIO_POISON`: the access gets
//! SIGBUS, never zeros) and records it `Poisoned`.
//!
//! Lock: everything here is a `WorkerCx` method (lock held).

use usm_kmod::event::Fault;
use usm_policies::{Cx, OomAction, OomPolicy, OomSituation, VictimRequest, VictimScan, guarded};
use usm_sync::atomic::Ordering;

use crate::space::PageState;
use crate::stats::MmStats;

use super::{FaultResult, WorkerCx};

/// Where one fault is on the OOM ladder, across the allocation policy's retries.
#[derive(Debug, Default)]
pub(super) struct OomLadder {
    /// Allocation-policy panics and OOM-policy calls so far.
    pub(super) attempts: u32,
    /// What the last victim search saw (told to the OOM policy).
    pub(super) last_scan: VictimScan,
    /// The watermark eviction of step 3 was tried.
    pub(super) evicted_once: bool,
}

/// What the fault does after a step of the ladder.
pub(super) enum OomStep {
    /// Run the allocation policy again.
    Retry,
    /// The fault's result.
    Done(FaultResult),
}

impl WorkerCx<'_> {
    /// The allocation policy answered `Oom` for `fault` (every frame its call took is
    /// given back first): climbs `ladder` one step (see the module docs). `Retry`: run the
    /// allocation policy again; `Done`: the fault's result.
    pub(super) fn oom_ladder(&mut self, fault: &Fault, ladder: &mut OomLadder) -> OomStep {
        let (pid, addr) = (fault.origin.pid, fault.addr);
        self.restore_taken();
        if !self.core.eviction.load(Ordering::Acquire) && self.let_go(64) > 0 {
            // Giving everything back (daemon shutdown): pages stay where they
            // are and stop holding frames, instead of being evicted.
            return OomStep::Retry;
        }
        if self.mem.writebacks > 0 {
            MmStats::bump(&self.core.stats.counters.memory_waits);
            self.mem.memory_waiters |= 1 << self.worker;
            return OomStep::Done(FaultResult::NeedMemory);
        }
        if !ladder.evicted_once {
            ladder.evicted_once = true;
            let want = self.core.config.watermarks.high.max(1);
            ladder.last_scan = self.run_eviction(VictimRequest::any(want));
            if ladder.last_scan.chosen > 0 {
                MmStats::bump(&self.core.stats.counters.memory_waits);
                return OomStep::Done(FaultResult::NeedMemory);
            }
            if self.free_total() > 0 {
                return OomStep::Retry;
            }
        }
        if self.mem.leaving > 0
            || !self.mem.sampling.is_empty()
            || self
                .mem
                .spaces
                .values()
                .any(|s| s.installer.as_ref().is_some_and(|i| i.busy()))
        {
            // Stages in flight (a program's agent has not answered yet: it may
            // be stopped; a finished sample is a victim at the next search), or
            // staging room on its way back, and nothing else to take now: wait,
            // never OOM.
            MmStats::bump(&self.core.stats.counters.memory_waits);
            self.mem.memory_waiters |= 1 << self.worker;
            return OomStep::Done(FaultResult::NeedMemory);
        }
        let situation = OomSituation {
            fault: *fault,
            attempt: ladder.attempts,
            mode: self.core.config.mode,
            last_scan: ladder.last_scan,
            free_frames: self.free_total(),
        };
        ladder.attempts += 1;
        let oom_name = self.oom.name().to_owned();
        let action = {
            let mut policy = std::mem::replace(self.oom, Box::new(NoOom));
            let a = guarded(&oom_name, || policy.on_oom(&situation, self));
            *self.oom = policy;
            a
        };
        self.restore_taken();
        match action {
            Ok(OomAction::EvictHarder(n)) if ladder.attempts <= 8 => {
                ladder.last_scan = self.run_eviction(VictimRequest::any(n.max(1)).hard());
                if ladder.last_scan.chosen > 0 {
                    return OomStep::Done(FaultResult::NeedMemory);
                }
            }
            Ok(OomAction::EvictHarder(_)) => {
                return OomStep::Done(self.fail(
                    addr,
                    pid,
                    format!("out of memory after {} harder evictions", ladder.attempts),
                ));
            }
            Ok(OomAction::FailAccess(reason)) => {
                return OomStep::Done(self.fail(addr, pid, reason.to_string()));
            }
            Ok(action @ (OomAction::KillLargestProcess | OomAction::KillLargestTask)) => {
                // The space holding the most frames, if its installer can end
                // its process (daemon: SIGKILL through a pidfd). Its exit gives
                // the frames back; this fault waits for them unless it is the
                // one killed. The embedded runtime cannot end a task: the access
                // fails.
                let largest = self
                    .mem
                    .spaces
                    .iter()
                    .max_by_key(|(_, s)| s.counters.resident)
                    .map(|(&p, _)| p);
                if let Some(victim) = largest
                    && self.core.installer_in(self.mem, victim).kill()
                {
                    tracing::error!(
                        ?action,
                        victim,
                        faulting = pid,
                        free_slots = self.mem.swap.free_slots(),
                        "out of memory: the OOM policy killed the process holding the most frames"
                    );
                    if victim == pid {
                        return OomStep::Done(self.fail(addr, pid, "out of memory: killed".into()));
                    }
                    self.mem.memory_waiters |= 1 << self.worker;
                    return OomStep::Done(FaultResult::NeedMemory);
                }
                return OomStep::Done(self.fail(
                    addr,
                    pid,
                    format!("out of memory: the OOM policy asked {action:?}, which this runtime cannot do; the access fails"),
                ));
            }
            Err(p) => return OomStep::Done(self.fail(addr, pid, p.to_string())),
        }
        OomStep::Retry
    }

    /// Poisons `addr` so the access fails with SIGBUS, logs why.
    pub(super) fn fail(&mut self, addr: u64, pid: u32, reason: String) -> FaultResult {
        tracing::error!(
            addr,
            pid,
            %reason,
            free_frames = self.free_total(),
            frames = self.core.pool.len(),
            free_slots = self.mem.swap.free_slots(),
            slots = self.mem.swap.total_slots(),
            writebacks = self.mem.writebacks,
            leaving = self.mem.leaving,
            sampling = self.mem.sampling.len(),
            io_in_flight = self.io.engine.in_flight(),
            io_depth = self.io.engine.depth(),
            resident = self
                .mem
                .spaces
                .values()
                .map(|s| s.counters.resident)
                .sum::<usize>(),
            "access failed: page poisoned (SIGBUS on access)"
        );
        MmStats::bump(&self.core.stats.counters.oom_failures);
        if let Err(e) = self
            .core
            .installer_in(self.mem, pid)
            .poison(&self.core.pool, addr)
        {
            tracing::error!(error = %e, addr, "poisoning failed");
        }
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            space.set(addr, PageState::Poisoned);
        }
        FaultResult::Failed(reason)
    }
}

/// Placeholder while the OOM policy is being called (never called itself).
pub(super) struct NoOom;

impl OomPolicy for NoOom {
    fn name(&self) -> &str {
        "none"
    }
    fn on_oom(&mut self, _: &OomSituation, _: &mut dyn Cx) -> OomAction {
        OomAction::FailAccess(usm_policies::OomReason::Policy("re-entered".into()))
    }
}
