//! `nap`: a workee waits a little without holding its worker.
//!
//! Off a uThread (shutdown, the reader as a fallback) the OS thread sleeps.

use std::time::{Duration, Instant};

/// Waits about `d` without holding the worker: yields (other faults run meanwhile), or
/// sleeps the OS thread when not on a uThread.
///
/// Yield, not park + timer: with the current scheduler a parked uThread can miss an
/// unpark from a foreign thread (seen under load), which would leave a fault unserved.
pub(crate) fn nap(d: Duration) {
    if !usm_localmanager::in_uthread() {
        std::thread::sleep(d);
        return;
    }
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        usm_localmanager::yield_now();
    }
}
