//! The worker thread's context pointer, read from uThread code and from signal handlers.
//!
//! `WORKER` is a `const`-initialised `Cell` of a raw pointer (no destructor), so reading it
//! never allocates or runs lazy initialisation: safe in a signal handler. It is set by the
//! worker thread for the whole life of its LocalManager ([`enter`]) and cleared before the
//! [`WorkerLocal`] it points to is dropped ([`WorkerGuard`]). Accessors are
//! `#[inline(never)]` so that no caller caches the thread-local address across a yield.
//!
//! `WorkerLocal::current_task` is set by the worker right before resuming a uThread, to the
//! `Task` inside the `Entry` it holds for the duration of the run, and cleared right after.

use std::cell::Cell;
use std::ptr;

use usm_sync::Arc;

use crate::manager::WorkerLocal;
use crate::task::Task;

thread_local! {
    static WORKER: Cell<*const WorkerLocal> = const { Cell::new(ptr::null()) };
}

/// Clears the thread's worker pointer when dropped.
pub(crate) struct WorkerGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        set_worker(ptr::null());
    }
}

/// Publishes `local` as this thread's worker context until the guard drops. The caller must
/// keep `local` alive (and not move it) until then; the borrow checker enforces it through
/// the guard's lifetime being tied to the caller's scope by convention: the worker thread
/// creates the guard right after `local` and drops it before `local`.
pub(crate) fn enter(local: &WorkerLocal) -> WorkerGuard {
    set_worker(local as *const WorkerLocal);
    WorkerGuard {
        _not_send: std::marker::PhantomData,
    }
}

#[inline(never)]
fn set_worker(local: *const WorkerLocal) {
    WORKER.set(local);
}

#[inline(never)]
fn worker_ptr() -> *const WorkerLocal {
    WORKER.get()
}

/// Runs `f` with this thread's worker context; `None` when not on a worker thread.
/// Async-signal-safe as long as `f` is.
#[inline(never)]
pub(crate) fn with_worker<R>(f: impl FnOnce(&WorkerLocal) -> R) -> Option<R> {
    let local = worker_ptr();
    if local.is_null() {
        return None;
    }
    // SAFETY: a non-null WORKER points at the `WorkerLocal` owned by this thread's worker
    // loop; it is cleared (WorkerGuard) before that value is dropped, and `WorkerLocal` is only
    // accessed through shared references (its mutable parts are `Cell`/`RefCell`).
    Some(f(unsafe { &*local }))
}

/// The task currently running on this worker, if any (`f` runs with a borrow of it).
/// Async-signal-safe as long as `f` is.
#[inline(never)]
pub(crate) fn with_current_task<R>(f: impl FnOnce(&WorkerLocal, &Task, u32) -> R) -> Option<R> {
    with_worker(|local| {
        let task = local.current_task.get();
        if task.is_null() {
            return None;
        }
        // SAFETY: `current_task` is non-null only while the worker runs that uThread; it points
        // into the `Arc<Task>` of the `Entry` the worker holds on its stack for the whole run
        // (see `LocalManager::run_slot`), and we are on that uThread (same thread), so the run
        // has not ended.
        let task = unsafe { &*task };
        Some(f(local, task, local.current_slot.get()))
    })
    .flatten()
}

/// A new reference to the running task (not for signal context: it bumps a refcount, which
/// is fine there too, but callers only use it in normal context).
pub(crate) fn current_task_arc() -> Option<Arc<Task>> {
    with_worker(|local| {
        let task = local.current_task.get();
        if task.is_null() {
            return None;
        }
        // SAFETY: as in `with_current_task`: the pointer comes from `Arc::as_ptr` of an Arc
        // held alive by the running entry, so bumping the count and rebuilding an Arc is sound.
        unsafe {
            Arc::increment_strong_count(task);
            Some(Arc::from_raw(task))
        }
    })
    .flatten()
}
