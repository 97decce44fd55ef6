//! `usm-localmanager`: one LocalManager per core scheduling uThreads.
//!
//! # Overview
//! A [`Runtime`] starts one worker thread per core (pinned with `core_affinity`); each runs a
//! LocalManager (the `manager` module docs) over its slots, with two atomic multi-level
//! bitfields ([`bitfield`]): **IDQ** (ready) and **PFQ** (parked inside the fault handler).
//! uThreads are `usm-fibers` fibers. Cross-core work: spawns from outside go through a
//! `crossbeam-deque` injector; an idle worker steals ready uThreads from a busy one; an
//! unpark from another core sets the IDQ bit and wakes the owner ([`mod@park`]).
//!
//! # API in a uThread
//! [`yield_now`], [`fn@park`] / [`current`] + [`Unparker::unpark`], [`sleep`], [`spawn`],
//! the primitives in [`sync`] (Mutex, Condvar, bounded MPSC channel), [`JoinHandle`].
//! From a signal handler on a uThread: [`signal::park_current_on_fault`].
//! Optional time-slice preemption: [`Builder::preemption`] + [`preemptible`] sections
//! (safe-point rule in the `sys::preempt` module docs), [`preempt_point`] otherwise.
//!
//! # Migration
//! A uThread may move to another worker whenever it is ready but not running (after a
//! yield, a spawn, or an unpark) — unless it was spawned with [`Handle::spawn_on`] or is
//! suspended inside a signal handler. Hence closures are `Send + 'static` and code must not
//! keep OS thread-local references across a yield/park (use `usm_fibers::with_local`).
//!
//! # Under `--cfg loom`
//! Only [`bitfield`], [`mod@park`], [`task_state`] and the injector hand-off protocol
//! ([`handoff`]) are built, on loom's atomics, for the models in `loom-tests/tests/sched.rs`.

#![deny(unsafe_code)]

pub mod bitfield;
pub mod handoff;
pub mod park;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
mod sys;
pub mod task_state;

#[cfg(not(loom))]
mod counters;
#[cfg(not(loom))]
mod driver;
#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
mod join;
#[cfg(not(loom))]
mod manager;
#[cfg(not(loom))]
mod runtime;
pub mod signal;
#[cfg(not(loom))]
pub mod sync;
#[cfg(not(loom))]
mod task;

#[cfg(not(loom))]
pub use api::*;

#[cfg(not(loom))]
mod api {
    use std::time::{Duration, Instant};

    use usm_fibers::Suspend;
    use usm_sync::Arc;
    use usm_sync::atomic::Ordering;

    pub use crate::counters::CountersSnapshot;
    pub use crate::driver::{Driver, DriverContext, DriverFactory};
    pub use crate::error::SchedError;
    pub use crate::join::{JoinError, JoinHandle};
    pub use crate::runtime::{
        Builder, DEFAULT_SPIN_BEFORE_PARK, Handle, Runtime, ShutdownReport, WakerMode,
    };
    use crate::sys::current;
    use crate::task::Task;

    /// Gives the worker to the next ready uThread (the caller stays ready). Returns `false`
    /// (doing nothing) when not called on a uThread.
    #[inline]
    pub fn yield_now() -> bool {
        usm_fibers::suspend_current(Suspend::Yield)
    }

    /// Runs `f` with time-slice preemption allowed (when the runtime was built with
    /// [`Builder::preemption`]): if `f` runs past its quantum while executing the program's
    /// own code, the uThread is switched out from the timer signal and resumed later on the
    /// same worker. `f` must not take OS-level locks (`std::sync::Mutex`, stdout via
    /// `println!`) — use this crate's primitives, which are never preempted inside. Off a
    /// uThread, just runs `f`.
    pub fn preemptible<R>(f: impl FnOnce() -> R) -> R {
        struct Exit;
        impl Drop for Exit {
            fn drop(&mut self) {
                current::with_current_task(|_, task, _| {
                    task.preemptible.fetch_sub(1, Ordering::Relaxed)
                });
            }
        }
        if current::with_current_task(|_, task, _| task.preemptible.fetch_add(1, Ordering::Relaxed))
            .is_none()
        {
            return f();
        }
        let _exit = Exit;
        f()
    }

    /// A runtime call: if the preemption timer found the calling uThread over its quantum
    /// while it could not be switched out, yield now. Every primitive of this crate starts
    /// with this; long loops that call nothing else may call it directly. Returns whether it
    /// yielded.
    pub fn preempt_point() -> bool {
        let pending = current::with_worker(|local| {
            local.preemption && local.preempt_pending.load(Ordering::Relaxed) && {
                local.preempt_pending.store(false, Ordering::Relaxed);
                local
                    .manager()
                    .counters
                    .preempt_deferred
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
        });
        pending == Some(true) && yield_now()
    }

    /// Marks the calling uThread non-preemptible until dropped (runtime internals).
    pub(crate) struct NoPreempt {
        active: bool,
    }

    impl NoPreempt {
        #[inline]
        pub(crate) fn enter() -> Self {
            let active = current::with_worker(|local| local.preemption).unwrap_or(false)
                && current::with_current_task(|_, task, _| {
                    task.no_preempt.fetch_add(1, Ordering::Relaxed);
                })
                .is_some();
            NoPreempt { active }
        }
    }

    impl Drop for NoPreempt {
        fn drop(&mut self) {
            if self.active {
                // Same uThread, same worker: nothing can switch it out while this is held.
                current::with_current_task(|_, task, _| {
                    task.no_preempt.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    /// Parks the calling uThread until an [`Unparker`] of it is used. Returns at once if an
    /// unpark arrived since the last park (a token, like `std::thread::park`); may return
    /// spuriously, so park in a loop around a condition. `false` when not on a uThread.
    pub fn park() -> bool {
        usm_fibers::suspend_current(Suspend::Park)
    }

    /// Wakes a parked uThread (from any thread).
    #[derive(Clone)]
    pub struct Unparker {
        task: Arc<Task>,
    }

    impl std::fmt::Debug for Unparker {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Unparker")
                .field("task", &self.task.id())
                .finish()
        }
    }

    impl Unparker {
        /// Makes the uThread ready if parked, or leaves it a token so its next park returns.
        pub fn unpark(&self) {
            let _no_preempt = NoPreempt::enter();
            self.task.unpark();
        }

        /// An id of the uThread, unique among live uThreads of the process.
        pub fn id(&self) -> u64 {
            self.task.id()
        }
    }

    /// An unparker for the calling uThread; `None` when not on a uThread.
    pub fn current() -> Option<Unparker> {
        current::current_task_arc().map(|task| Unparker { task })
    }

    /// True when called on a uThread.
    pub fn in_uthread() -> bool {
        current::with_current_task(|_, _, _| ()).is_some()
    }

    /// Index of the worker the caller runs on now (`None` off the runtime's threads). It
    /// may change after any yield or park.
    pub fn worker_index() -> Option<usize> {
        current::with_worker(|local| local.index)
    }

    /// Parks the calling uThread for at least `duration` (a timer on its worker unparks it).
    /// Off a uThread, sleeps the OS thread.
    pub fn sleep(duration: Duration) {
        preempt_point();
        let deadline = Instant::now() + duration;
        let Some(task) = current::current_task_arc() else {
            std::thread::sleep(duration);
            return;
        };
        current::with_worker(|local| local.add_timer(deadline, task));
        while Instant::now() < deadline {
            park();
        }
    }

    /// Spawns a uThread on the caller's runtime (the caller must be on one of its threads).
    pub fn spawn<F, T>(f: F) -> Result<JoinHandle<T>, SchedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        Handle::current().ok_or(SchedError::NotInUThread)?.spawn(f)
    }
}
