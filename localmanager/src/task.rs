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
//! A [`TaskState`]: states, token and transitions are documented in [`crate::task_state`].
//!
//! `owner`/`slot` change only while the uThread is ready and its IDQ bit is claimed by a
//! thief, never while it is `IDLE`, so an unparker that won `IDLE → QUEUED` (Acquire) reads
//! the location last published by the worker that parked it (Release).

use usm_fibers::Fiber;
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

pub(crate) use crate::task_state::QUEUED;
use crate::task_state::TaskState;

use crate::runtime::RuntimeShared;

/// The shared half of a uThread (see the module docs).
pub(crate) struct Task {
    pub(crate) state: TaskState,
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
            .field("state", &self.state.load())
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
        if self.state.unpark() {
            // Read after winning IDLE → QUEUED: the location published by the worker that
            // parked it (see the module docs).
            let owner = self.owner.load(Ordering::Acquire);
            let slot = self.slot.load(Ordering::Acquire);
            self.rt.make_ready(owner, slot);
        }
    }

    /// See [`TaskState::finish_park`].
    pub(crate) fn finish_park(&self) -> bool {
        self.state.finish_park()
    }

    /// See [`TaskState::claim_running`].
    #[inline]
    pub(crate) fn claim_running(&self) -> bool {
        self.state.claim_running()
    }

    /// See [`TaskState::mark_faulted`].
    pub(crate) fn mark_faulted(&self) {
        self.state.mark_faulted();
    }

    /// See [`TaskState::cancel_if_idle`].
    pub(crate) fn cancel_if_idle(&self) -> bool {
        self.state.cancel_if_idle()
    }
}
