//! Join handles: the result of a uThread, its panic payload, or its cancellation.
//!
//! The uThread's closure is wrapped so that, on any exit, it stores the outcome in the shared
//! [`JoinState`] and wakes the joiner (a uThread, or an OS thread blocked in `join`):
//! - returned → `Ok(value)`;
//! - panicked → `Err(JoinError::Panicked(payload))` (caught inside the uThread; the worker
//!   goes on);
//! - dropped before finishing (shutdown cancelled it, or its stack could not be created) →
//!   `Err(JoinError::Cancelled)`, set by a drop guard that lives in the closure.

use usm_sync::atomic::{AtomicBool, Ordering};
use usm_sync::{Arc, Mutex};

use crate::sync::lock;
use crate::sync::waiter::Waiter;
use crate::task::Body;

/// Why a uThread produced no value.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Its closure panicked; the payload is what `panic!` carried.
    #[error("the uThread panicked")]
    Panicked(usm_fibers::PanicPayload),
    /// It was dropped before it finished (runtime shutdown).
    #[error("the uThread was cancelled")]
    Cancelled,
}

impl JoinError {
    /// The panic message when the payload is a string.
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            JoinError::Panicked(payload) => payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str)),
            JoinError::Cancelled => None,
        }
    }

    /// True for a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, JoinError::Cancelled)
    }
}

/// The result (once there) and the joiner waiting for it, under one short lock.
struct Shared<T> {
    result: Option<Result<T, JoinError>>,
    waiter: Option<Waiter>,
}

pub(crate) struct JoinState<T> {
    shared: Mutex<Shared<T>>,
    done: AtomicBool,
}

impl<T> JoinState<T> {
    fn complete(&self, result: Result<T, JoinError>) {
        let waiter = {
            let mut shared = lock(&self.shared);
            if self.done.load(Ordering::Acquire) {
                return;
            }
            shared.result = Some(result);
            self.done.store(true, Ordering::Release);
            shared.waiter.take()
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

/// Completes the join state with `Cancelled` if the closure is dropped unfinished.
struct CompleteOnDrop<T>(Arc<JoinState<T>>);

impl<T> Drop for CompleteOnDrop<T> {
    fn drop(&mut self) {
        self.0.complete(Err(JoinError::Cancelled));
    }
}

/// Owner of a uThread's result. Dropping it detaches the uThread.
pub struct JoinHandle<T> {
    state: Arc<JoinState<T>>,
}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl<T> JoinHandle<T> {
    /// True once the uThread finished, panicked or was cancelled.
    pub fn is_finished(&self) -> bool {
        self.state.done.load(Ordering::Acquire)
    }

    /// Waits for the uThread. On a uThread this parks only the calling uThread; on any other
    /// thread it blocks that thread.
    pub fn join(self) -> Result<T, JoinError> {
        crate::preempt_point();
        loop {
            let waiter = {
                let mut shared = lock(&self.state.shared);
                if let Some(result) = shared.result.take() {
                    return result;
                }
                let waiter = Waiter::current();
                shared.waiter = Some(waiter.clone());
                waiter
            };
            waiter.wait();
        }
    }
}

/// Wraps `f` into a uThread body reporting to the returned handle.
pub(crate) fn new_join<F, T>(f: F) -> (Body, JoinHandle<T>)
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let state = Arc::new(JoinState {
        shared: Mutex::new(Shared {
            result: None,
            waiter: None,
        }),
        done: AtomicBool::new(false),
    });
    let guard = CompleteOnDrop(state.clone());
    let body: Body = Box::new(move || {
        let guard = guard;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let result = match result {
            Ok(value) => Ok(value),
            Err(_) if crate::sys::current::with_worker(|l| l.cancelling.get()) == Some(true) => {
                Err(JoinError::Cancelled)
            }
            Err(payload) => {
                crate::sys::current::with_worker(|local| {
                    local
                        .manager()
                        .counters
                        .panicked
                        .fetch_add(1, Ordering::Relaxed)
                });
                Err(JoinError::Panicked(payload))
            }
        };
        guard.0.complete(result);
    });
    (body, JoinHandle { state })
}
