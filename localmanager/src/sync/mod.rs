//! uThread-aware synchronisation: blocking parks the calling uThread, never its worker.
//!
//! Every primitive also works from ordinary OS threads (they block the thread), so a
//! uThread and a non-runtime thread can share them.
//!
//! # Waiting protocol (all primitives)
//! A waiter registers itself (an [`crate::Unparker`] or the OS thread handle) in the
//! primitive's wait list *before* re-checking the condition, then parks. A waker changes the
//! condition, then pops a waiter and unparks it. Because a uThread's park consumes a token
//! left by an unpark that came early, no wake-up is lost between the re-check and the park;
//! waiters loop, so spurious wake-ups are harmless. Internal `std` mutexes (from the `sync`
//! shim) are held only for a few instructions and never across a park.

mod channel;
mod condvar;
pub(crate) mod waiter;

pub use crate::sys::mutex::{Mutex, MutexGuard};
pub use channel::{Receiver, RecvError, SendError, Sender, TryRecvError, TrySendError, channel};
pub use condvar::Condvar;

/// Locks a shim mutex, ignoring poisoning (the data of our internal mutexes stays consistent
/// at every panic point).
pub(crate) fn lock<T>(mutex: &usm_sync::Mutex<T>) -> usm_sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
