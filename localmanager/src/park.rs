//! Parking an idle worker without losing a wake-up.
//!
//! # States of [`ParkState`] (one per LocalManager)
//! - `EMPTY`: no pending notification, the worker is not blocked.
//! - `PARKED`: the worker announced it is about to block (or is blocked) in its waker.
//! - `NOTIFIED`: someone published work for the worker since it last looked.
//!
//! # Protocol
//! 1. A thread that gives the worker work (sets an IDQ bit, pushes to the injector, resumes a
//!    PFQ entry) publishes it first, then calls [`ParkState::notify`]: `swap(NOTIFIED)`. If
//!    the previous state was `PARKED`, it signals the waker (writes the eventfd).
//! 2. The worker, having found no work, calls [`ParkState::try_park`]: CAS `EMPTY → PARKED`.
//!    If that fails the state was `NOTIFIED`: it consumes the notification (`swap(EMPTY)`)
//!    and looks for work again instead of blocking.
//! 3. After the waker returns (signalled, timed out, or a driver fd became readable) the
//!    worker calls [`ParkState::unparked`]: `swap(EMPTY)`, then looks for work.
//!
//! Every transition is an RMW on the one word, so either the notifier's swap precedes the
//! worker's CAS (the CAS fails and the worker re-checks, synchronised with the notifier and
//! so seeing its work) or it follows it (the notifier sees `PARKED` and signals). The loom
//! model `park_unpark_no_lost_wakeup` in `loom-tests/tests/sched.rs` checks this code.
//!
//! In busy-poll mode the worker never calls `try_park` and notifiers skip `notify`.

use usm_sync::atomic::{AtomicU32, Ordering};

const EMPTY: u32 = 0;
const PARKED: u32 = 1;
const NOTIFIED: u32 = 2;

/// The park word of one worker (see the module docs).
#[derive(Debug)]
pub struct ParkState {
    state: AtomicU32,
}

impl Default for ParkState {
    fn default() -> Self {
        Self::new()
    }
}

impl ParkState {
    /// Not parked, nothing pending.
    pub fn new() -> Self {
        Self {
            state: AtomicU32::new(EMPTY),
        }
    }

    /// Called after publishing work for the worker. Returns `true` when the worker is parked
    /// (or committed to parking) and its waker must be signalled.
    pub fn notify(&self) -> bool {
        self.state.swap(NOTIFIED, Ordering::AcqRel) == PARKED
    }

    /// Worker: announce that it is about to block. `false` means a notification was pending
    /// (now consumed): do not block, look for work.
    pub fn try_park(&self) -> bool {
        match self
            .state
            .compare_exchange(EMPTY, PARKED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(_) => {
                self.state.swap(EMPTY, Ordering::AcqRel);
                false
            }
        }
    }

    /// Worker: back from blocking (for whatever reason); consumes any notification.
    pub fn unparked(&self) {
        self.state.swap(EMPTY, Ordering::AcqRel);
    }

    /// True while the worker is parked or committed to parking (a snapshot, for picking
    /// which worker to wake).
    pub fn is_parked(&self) -> bool {
        self.state.load(Ordering::Acquire) == PARKED
    }
}
