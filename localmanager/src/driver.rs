//! The hook through which the runtime plugs I/O completion reaping and userfaultfd reading
//! into a LocalManager.
//!
//! # Calls, all on the worker thread in normal (not signal) context
//! 1. [`Driver::poll`] once per scheduling round (after at most `round_budget` uThread
//!    runs) and once more right before the worker parks. It returns how much work it did;
//!    non-zero keeps the worker from parking this time.
//! 2. Before blocking, the worker asks [`Driver::wake_fds`] and waits for readability on
//!    those fds as well as on its own eventfd, and never longer than
//!    [`Driver::park_timeout`].
//!    Before it parks (after its last poll and spin, with no work found) it calls
//!    [`Driver::ready_to_block`]: the driver clears its level-triggered wake fds there
//!    (an eventfd it does not read on every poll) and re-checks for work none of its fds
//!    would signal; `false` means work appeared, and the worker runs a round instead of
//!    blocking.
//! 3. A worker that found nothing to run and nothing to steal calls
//!    [`Driver::idle_work`] before it idles (spins or parks): background work in bounded
//!    slices (the embedded runtime reclaims frames there, as the kernel's kswapd does on
//!    an idle CPU). A slice that did something sends the worker round its loop again.
//! 4. During shutdown, [`Driver::has_pending`] keeps the worker counted as busy.
//!
//! A driver must not suspend (it does not run on a uThread) and should not block.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use usm_sync::atomic::Ordering;

use crate::signal::{FaultKey, FaultedUThread};

/// Per-worker I/O / fault driver (see the module docs).
pub trait Driver {
    /// Does a bounded amount of work (reap completions, read events, resume PFQ entries);
    /// returns the number of items handled.
    fn poll(&mut self, cx: &mut DriverContext<'_>) -> usize;

    /// File descriptors whose readability must wake this worker when it is parked.
    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// Called right before the worker blocks (see the module docs, step 2): clear wake fds
    /// that stayed readable for completions already handled, then say whether blocking is
    /// safe. Whatever the driver's wake fds signal after this call wakes the worker.
    fn ready_to_block(&mut self) -> bool {
        true
    }

    /// Background work for a worker that found nothing to run (no ready uThread, nothing
    /// to steal), done before it idles: a bounded slice (a uThread that becomes ready
    /// meanwhile waits for it). Returns how much it did; more than 0 and the worker polls
    /// and looks for work again instead of idling, so slices repeat while idle.
    fn idle_work(&mut self) -> usize {
        0
    }

    /// Longest time the worker may stay parked (`None`: until woken).
    fn park_timeout(&self) -> Option<Duration> {
        None
    }

    /// True while the driver has outstanding work, so shutdown must not treat the worker as
    /// quiescent.
    fn has_pending(&self) -> bool {
        false
    }
}

/// Creates the driver of each worker, on that worker's thread (argument: worker index).
// std's Arc: a closure coerces to `Arc<dyn Fn>` (loom's Arc cannot unsize), and the
// factory is only called at start-up, outside any loom model.
#[allow(clippy::disallowed_types)]
pub type DriverFactory = std::sync::Arc<dyn Fn(usize) -> Box<dyn Driver> + Send + Sync>;

/// What a driver may do from its `poll`.
pub struct DriverContext<'a> {
    pub(crate) worker: usize,
    pub(crate) manager: &'a crate::manager::ManagerShared,
    pub(crate) rt: &'a crate::runtime::RuntimeShared,
}

impl std::fmt::Debug for DriverContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverContext")
            .field("worker", &self.worker)
            .finish()
    }
}

impl DriverContext<'_> {
    /// Index of the worker being polled.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Appends this worker's uThreads parked on a fault (PFQ) with their payloads.
    pub fn faulted(&self, out: &mut Vec<FaultedUThread>) {
        self.manager.faulted(out);
    }

    /// Moves the uThread parked on a fault in `slot` of this worker from PFQ to IDQ, whatever
    /// fault it is parked on now; `false` if it is not in PFQ. The driver runs on the
    /// worker, so the slot cannot change hands between its [`DriverContext::faulted`] and
    /// this call within one `poll`; across polls use [`DriverContext::resume_fault`].
    pub fn resume_faulted(&self, slot: u32) -> bool {
        let Some(meta) = self.manager.slots.get(slot as usize) else {
            return false;
        };
        self.rt.resume_faulted(FaultKey {
            worker: self.worker,
            slot,
            generation: meta.fault_seq.load(Ordering::Acquire),
        })
    }

    /// Resumes exactly the fault `key` names (PFQ → IDQ); `false` if that fault was resumed
    /// already (its slot may be parked on a newer fault, which stays parked).
    pub fn resume_fault(&self, key: FaultKey) -> bool {
        self.rt.resume_faulted(key)
    }
}
