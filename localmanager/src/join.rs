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

pub(crate) struct JoinState<T> {
    result: Mutex<Option<Result<T, JoinError>>>,
    done: AtomicBool,
    waiter: Mutex<Option<Waiter>>,
}

impl<T> JoinState<T> {
    fn complete(&self, result: Result<T, JoinError>) {
        {
            let mut slot = lock(&self.result);
            if slot.is_some() || self.done.load(Ordering::Acquire) {
                return;
            }
            *slot = Some(result);
        }
        self.done.store(true, Ordering::Release);
        if let Some(waiter) = lock(&self.waiter).take() {
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
        loop {
            if self.state.done.load(Ordering::Acquire)
                && let Some(result) = lock(&self.state.result).take()
            {
                return result;
            }
            let waiter = Waiter::current();
            {
                let mut slot = lock(&self.state.waiter);
                if self.state.done.load(Ordering::Acquire) {
                    continue;
                }
                *slot = Some(waiter.clone());
            }
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
        result: Mutex::new(None),
        done: AtomicBool::new(false),
        waiter: Mutex::new(None),
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
