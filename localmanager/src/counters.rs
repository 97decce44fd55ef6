//! Per-LocalManager counters.
//!
//! Most counters are written only by their worker (a load + store, no locked RMW, so the
//! hot path stays cheap) and read by anyone; the few bumped from other threads or signal
//! handlers (`stolen_from`, `faults`, `fault_resumes`, `preemptions`, `panicked`) use
//! `fetch_add`. The block is cache-padded away from the words other cores write.

use usm_sync::atomic::{AtomicU64, Ordering};

/// Live counters of one LocalManager.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) switches: AtomicU64,
    pub(crate) steals: AtomicU64,
    pub(crate) stolen_from: AtomicU64,
    pub(crate) parks: AtomicU64,
    pub(crate) wakes: AtomicU64,
    pub(crate) worker_parks: AtomicU64,
    pub(crate) idle_ns: AtomicU64,
    pub(crate) spawned: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) fault_resumes: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) rounds: AtomicU64,
    pub(crate) preemptions: AtomicU64,
    pub(crate) preempt_deferred: AtomicU64,
}

/// Adds `n` to a counter only its owner writes.
#[inline]
pub(crate) fn bump_owned(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self, worker: usize) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            worker,
            switches: get(&self.switches),
            steals: get(&self.steals),
            stolen_from: get(&self.stolen_from),
            parks: get(&self.parks),
            wakes: get(&self.wakes),
            worker_parks: get(&self.worker_parks),
            idle_ns: get(&self.idle_ns),
            spawned: get(&self.spawned),
            completed: get(&self.completed),
            panicked: get(&self.panicked),
            faults: get(&self.faults),
            fault_resumes: get(&self.fault_resumes),
            cancelled: get(&self.cancelled),
            rounds: get(&self.rounds),
            preemptions: get(&self.preemptions),
            preempt_deferred: get(&self.preempt_deferred),
        }
    }
}

/// A copy of one LocalManager's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CountersSnapshot {
    /// Worker index.
    pub worker: usize,
    /// uThread resumptions (context switches into a uThread).
    pub switches: u64,
    /// uThreads this worker stole from others.
    pub steals: u64,
    /// uThreads other workers stole from this one.
    pub stolen_from: u64,
    /// uThreads that parked (generic park, not faults).
    pub parks: u64,
    /// uThreads of this worker made ready by someone else (unpark, PFQ resume) and then run
    /// here (counted when run).
    pub wakes: u64,
    /// Times the worker itself blocked in its waker (eventfd mode).
    pub worker_parks: u64,
    /// Nanoseconds spent idle (blocked or spinning without work).
    pub idle_ns: u64,
    /// uThreads admitted to this worker (spawned here or taken from the injector).
    pub spawned: u64,
    /// uThreads that finished on this worker (including panicked ones).
    pub completed: u64,
    /// uThreads whose closure panicked on this worker.
    pub panicked: u64,
    /// Faults recorded by [`crate::signal::park_current_on_fault`] on this worker.
    pub faults: u64,
    /// PFQ → IDQ moves on this worker.
    pub fault_resumes: u64,
    /// uThreads dropped unfinished at shutdown.
    pub cancelled: u64,
    /// Scheduling rounds.
    pub rounds: u64,
    /// uThreads switched out by time-slice preemption from the signal handler.
    pub preemptions: u64,
    /// Over-quantum uThreads that were not at a safe point and yielded at their next
    /// runtime call instead.
    pub preempt_deferred: u64,
}
