//! The injector hand-off protocol: how work pushed from outside (a spawn into the
//! `crossbeam-deque` injector or a worker inbox, a PFQ → IDQ move, a shutdown phase change)
//! reaches a worker that may be about to park.
//!
//! # Producer ([`notify_for_injected`])
//! 1. Push the work (the queue's push is linearisable; crossbeam's injector is).
//! 2. Pick a worker: the first one whose park word says `PARKED`, else the next in
//!    round-robin order. Call its `notify()`; if it returns `true` the worker is blocked and
//!    must be signalled (eventfd write).
//!
//! # Worker ([`idle_step`]), after a round that found no work
//! 1. `try_park()`; if a notification was pending, return and look again.
//! 2. Re-check the queues; block only if still nothing.
//! 3. `unparked()` and look again.
//!
//! Why no work is stranded: the chosen worker either had not yet `try_park`ed (then the
//! notification makes its `try_park` fail and it re-checks, seeing the push), or had (then
//! `notify` sees `PARKED` and the producer signals it). A worker that is not chosen may park
//! with work in the queue, but the chosen one — or any busy worker, which drains the
//! injector every round — takes it. crossbeam-deque is not loom-aware, so the loom model
//! (`injector_handoff_reaches_a_worker` in `loom-tests/tests/sched.rs`) runs this same code
//! with a loom mutex-protected queue standing in for the injector.

use usm_sync::atomic::{AtomicUsize, Ordering};

use crate::park::ParkState;

/// Producer side: notify one of `workers` workers (`park_of(i)` gives worker `i`'s park
/// word) after pushing shared work. Returns the worker that must be signalled, if any.
pub fn notify_for_injected<'a>(
    workers: usize,
    park_of: impl Fn(usize) -> &'a ParkState,
    round_robin: &AtomicUsize,
) -> Option<usize> {
    if workers == 0 {
        return None;
    }
    let chosen = (0..workers)
        .find(|&i| park_of(i).is_parked())
        .unwrap_or_else(|| round_robin.fetch_add(1, Ordering::Relaxed) % workers);
    park_of(chosen).notify().then_some(chosen)
}

/// Worker side: one idle step. `has_work` re-checks the queues after announcing the park;
/// `block` waits until signalled (or a timeout). Returns `true` if it blocked.
pub fn idle_step(park: &ParkState, has_work: impl FnOnce() -> bool, block: impl FnOnce()) -> bool {
    if !park.try_park() {
        return false;
    }
    let blocked = if has_work() {
        false
    } else {
        block();
        true
    };
    park.unparked();
    blocked
}
