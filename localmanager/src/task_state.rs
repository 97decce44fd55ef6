//! The state word of a uThread (the part of [`crate`]'s task that unparkers race on), kept
//! free of everything else so the loom models in `loom-tests/tests/sched.rs` run this very
//! code.
//!
//! # States (low byte)
//! - `IDLE`: parked (generic park), in no queue; only an unpark moves it on.
//! - `QUEUED`: made ready by an unpark or a spawn; its IDQ bit is set (or about to be, by
//!   the unparker that made it `QUEUED`; or it is in an injector / spawn queue).
//! - `RUNNING`: being run, or ready after a yield (a yield does not touch the state word).
//! - `FAULTED`: parked inside a signal handler (its PFQ bit is set), or ready again after a
//!   PFQ → IDQ move.
//! - `DONE`: finished.
//!
//! Flag `NOTIFIED` (bit 8): an unpark arrived while `RUNNING`/`FAULTED`; the next park
//! returns at once (a park token, like `std::thread::park`).
//!
//! # Transitions and who makes them
//! | from | to | by |
//! |---|---|---|
//! | (new) | `QUEUED` | spawn |
//! | `QUEUED`/`FAULTED`/`RUNNING` | `RUNNING` (keeps `NOTIFIED`) | the worker that claimed its IDQ bit ([`TaskState::claim_running`]) |
//! | `RUNNING` | `IDLE`, or `QUEUED` if `NOTIFIED` (worker sets the IDQ bit) | the worker, after a `Park` suspension ([`TaskState::finish_park`]) |
//! | `IDLE` | `QUEUED` (unparker sets the IDQ bit) | any thread ([`TaskState::unpark`]) |
//! | `RUNNING`/`FAULTED` | same + `NOTIFIED` | any thread ([`TaskState::unpark`]) |
//! | `RUNNING` | `FAULTED` (keeps `NOTIFIED`) | the fault primitive, in the handler |
//! | `IDLE` | `DONE` | shutdown ([`TaskState::cancel_if_idle`]) |
//! | any | `DONE` | the worker, when the closure returned |
//!
//! Exactly one party makes the uThread ready after a park: the unparker that wins
//! `IDLE → QUEUED`, or the worker whose `finish_park` found `NOTIFIED`. An unpark that
//! lands before the park completed (still `RUNNING`) leaves `NOTIFIED`, which `finish_park`
//! reads in the same RMW that would have made it `IDLE`: it cannot be lost.

use usm_sync::atomic::{AtomicU32, Ordering};

/// Parked, in no queue.
pub const IDLE: u32 = 0;
/// Ready (made so by an unpark or a spawn).
pub const QUEUED: u32 = 1;
/// Running, or ready after a yield.
pub const RUNNING: u32 = 2;
/// Parked inside a signal handler, or ready after a PFQ → IDQ move.
pub const FAULTED: u32 = 3;
/// Finished.
pub const DONE: u32 = 4;
/// Mask of the state byte.
pub const STATE_MASK: u32 = 0xff;
/// Park token: an unpark arrived while running or faulted.
pub const NOTIFIED: u32 = 0x100;

/// A uThread's state word (see the module docs).
#[derive(Debug)]
pub struct TaskState {
    word: AtomicU32,
}

impl TaskState {
    /// A state word starting at `state`.
    pub fn new(state: u32) -> Self {
        Self {
            word: AtomicU32::new(state),
        }
    }

    /// The current value (a snapshot).
    pub fn load(&self) -> u32 {
        self.word.load(Ordering::Acquire)
    }

    /// Any thread: makes a parked uThread ready, or leaves a token. Returns `true` when the
    /// caller won `IDLE → QUEUED` and must now set the uThread's IDQ bit (at its owner's
    /// `(owner, slot)`, read *after* this call) and wake the owner.
    pub fn unpark(&self) -> bool {
        let mut state = self.word.load(Ordering::Acquire);
        loop {
            let next = match state & STATE_MASK {
                IDLE => QUEUED,
                RUNNING | FAULTED if state & NOTIFIED == 0 => state | NOTIFIED,
                _ => return false,
            };
            match self
                .word
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next == QUEUED,
                Err(actual) => state = actual,
            }
        }
    }

    /// Worker side, after a `Park` suspension (the entry is already back in its slot).
    /// Returns `true` when a token was pending and the worker must set the IDQ bit itself.
    pub fn finish_park(&self) -> bool {
        let mut state = self.word.load(Ordering::Acquire);
        loop {
            let next = if state & NOTIFIED != 0 { QUEUED } else { IDLE };
            match self
                .word
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next == QUEUED,
                Err(actual) => state = actual,
            }
        }
    }

    /// Worker side, when it claimed the uThread to run it. Returns `true` if it was made
    /// ready by someone else (`QUEUED`/`FAULTED`), `false` after its own yield. The common
    /// case (a yield: already `RUNNING`) costs one load.
    #[inline]
    pub fn claim_running(&self) -> bool {
        let mut state = self.word.load(Ordering::Acquire);
        while state & STATE_MASK != RUNNING {
            let next = RUNNING | (state & NOTIFIED);
            match self
                .word
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => state = actual,
            }
        }
        false
    }

    /// Fault primitive side: `RUNNING → FAULTED`, keeping a pending token. Lock-free,
    /// async-signal-safe.
    pub fn mark_faulted(&self) {
        let mut state = self.word.load(Ordering::Acquire);
        loop {
            let next = FAULTED | (state & NOTIFIED);
            match self
                .word
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => state = actual,
            }
        }
    }

    /// Shutdown: `IDLE → DONE` if still parked; `false` if someone unparked it meanwhile.
    pub fn cancel_if_idle(&self) -> bool {
        self.word
            .compare_exchange(IDLE, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The worker, when the closure returned (or the uThread was dropped).
    pub fn set_done(&self) {
        self.word.swap(DONE, Ordering::AcqRel);
    }
}
