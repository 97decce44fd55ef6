//! Out of memory: what a fault does when its allocation policy answers `Oom`, and how an
//! access fails.
//!
//! The ladder runs in the `Decision::Oom` arm of `serve` ([`super::fault`]), in order (each
//! step only if the one before did not help):
//! 1. eviction turned off (daemon shutdown): let go of resident pages (`let_go`) and retry;
//! 2. write-backs in flight: wait for one ([`FaultResult::NeedMemory`], the worker's bit in
//!    `memory_waiters`: the next write-back to complete on any worker wakes it);
//! 3. once per fault: evict up to the high watermark; victims staged → wait; frames came
//!    free → retry;
//! 4. asynchronous stages in flight (a program's agent has not answered): wait, never OOM;
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

use usm_policies::{Cx, OomAction, OomPolicy, OomSituation};

use crate::space::PageState;
use crate::stats::MmStats;

use super::{FaultResult, WorkerCx};

impl WorkerCx<'_> {
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
