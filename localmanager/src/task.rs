//! A uThread as the scheduler sees it.
//!
//! # Pieces and who owns them
//! - [`Task`] (in an `Arc`): the part other cores touch — its state word, where it lives
//!   (`owner` worker, `slot`), the in-handler flag. Held by its [`Entry`], by
//!   [`crate::Unparker`]s, timers and wait lists.
//! - [`Entry`] (a `Box`): the part only the holder of the run claim touches — the fiber (or the
//!   closure before the first run). It sits in its worker's slot table (`AtomicBox`) while
//!   not running, is taken out by the worker that runs it or by a thief that steals it, and is
//!   put back before the uThread becomes visible as ready/parked again.
//!
//! # State word (`Task::state`)
//! Low byte, the state:
//! - `IDLE`: parked (generic park), in no queue; only an unpark moves it on.
//! - `QUEUED`: made ready by an unpark or a spawn; its IDQ bit is set (or it is in an
//!   injector / spawn queue).
//! - `RUNNING`: being run, or ready after a yield (a yield does not touch the state word).
//! - `FAULTED`: parked inside a signal handler on a fault (its PFQ bit is set), or ready again
//!   after a PFQ → IDQ move; `in_handler` is set.
//! - `DONE`: finished; its slot is free.
//!
//! Flag `NOTIFIED` (bit 8): an unpark arrived while `RUNNING`/`FAULTED`; the next park
//! returns at once (a park token, like `std::thread::park`).
//!
//! Transitions: spawn → `QUEUED`; worker claims it → `RUNNING` (keeps `NOTIFIED`); after a
//! `Park` suspension the worker moves `RUNNING → IDLE`, or `RUNNING|NOTIFIED → QUEUED` and
//! sets the IDQ bit itself; unpark moves `IDLE → QUEUED` and sets the IDQ bit of
//! (`owner`,`slot`), or adds `NOTIFIED`; the fault primitive moves `RUNNING → FAULTED`;
//! finishing stores `DONE`.
//!
//! `owner`/`slot` change only while the uThread is ready and its IDQ bit is claimed by a
//! thief, never while it is `IDLE`, so an unparker that won `IDLE → QUEUED` (Acquire) reads
//! the location last published by the worker that parked it (Release).

use usm_fibers::Fiber;
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::runtime::RuntimeShared;

pub(crate) const IDLE: u32 = 0;
pub(crate) const QUEUED: u32 = 1;
pub(crate) const RUNNING: u32 = 2;
pub(crate) const FAULTED: u32 = 3;
pub(crate) const DONE: u32 = 4;
pub(crate) const STATE_MASK: u32 = 0xff;
pub(crate) const NOTIFIED: u32 = 0x100;

/// The shared half of a uThread (see the module docs).
pub(crate) struct Task {
    pub(crate) state: AtomicU32,
    pub(crate) owner: AtomicUsize,
    pub(crate) slot: AtomicU32,
    /// Suspended inside a signal handler (fault or preemption): must resume on `owner`.
    pub(crate) in_handler: AtomicBool,
    /// Never migrated (spawned pinned).
    pub(crate) pinned: bool,
    /// Depth of `preemptible` sections the uThread is in (written by itself only).
    pub(crate) preemptible: AtomicU32,
    /// Depth of runtime-internal non-preemptible sections (written by itself only).
    pub(crate) no_preempt: AtomicU32,
    pub(crate) rt: Arc<RuntimeShared>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("state", &self.state.load(Ordering::Relaxed))
            .field("owner", &self.owner.load(Ordering::Relaxed))
            .finish()
    }
}

/// The closure of a uThread that has not run yet.
pub(crate) type Body = Box<dyn FnOnce() + Send + 'static>;

/// The exclusively owned half of a uThread.
pub(crate) struct Entry {
    pub(crate) task: Arc<Task>,
    pub(crate) fiber: Option<Fiber>,
    pub(crate) body: Option<Body>,
}

impl Task {
    /// A process-unique id while the task is alive (its address).
    pub(crate) fn id(&self) -> u64 {
        self as *const Task as u64
    }

    /// Makes a parked uThread ready (or leaves a park token). Callable from any thread.
    pub(crate) fn unpark(&self) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let next = match state & STATE_MASK {
                IDLE => QUEUED,
                RUNNING | FAULTED if state & NOTIFIED == 0 => state | NOTIFIED,
                _ => return,
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if next == QUEUED => {
                    let owner = self.owner.load(Ordering::Acquire);
                    let slot = self.slot.load(Ordering::Acquire);
                    self.rt.make_ready(owner, slot);
                    return;
                }
                Ok(_) => return,
                Err(actual) => state = actual,
            }
        }
    }

    /// Worker side, after a `Park` suspension (the entry is already back in its slot).
    /// Returns `true` when a token was pending and the uThread must be queued again.
    pub(crate) fn finish_park(&self) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let next = if state & NOTIFIED != 0 { QUEUED } else { IDLE };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next == QUEUED,
                Err(actual) => state = actual,
            }
        }
    }

    /// Worker side, when it claims the uThread to run it. Returns `true` if it was made
    /// ready by someone else (`QUEUED`/`FAULTED`), `false` after its own yield.
    pub(crate) fn claim_running(&self) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        while state & STATE_MASK != RUNNING {
            let next = RUNNING | (state & NOTIFIED);
            match self
                .state
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
    pub(crate) fn mark_faulted(&self) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let next = FAULTED | (state & NOTIFIED);
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => state = actual,
            }
        }
    }

    /// Shutdown: `IDLE → DONE` if still parked; `false` if someone unparked it meanwhile.
    pub(crate) fn cancel_if_idle(&self) -> bool {
        self.state
            .compare_exchange(IDLE, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}
