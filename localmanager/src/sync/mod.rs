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

/// A locked internal (OS-level) mutex; the holding uThread cannot be preempted meanwhile.
pub(crate) struct LockGuard<'a, T> {
    guard: usm_sync::MutexGuard<'a, T>,
    _no_preempt: crate::NoPreempt,
}

impl<T> std::ops::Deref for LockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for LockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// Locks a shim mutex, ignoring poisoning (the data of our internal mutexes stays consistent
/// at every panic point). Preemption of the caller is off until the guard drops: a uThread
/// switched out holding it would block the next uThread of its worker that locks it.
pub(crate) fn lock<T>(mutex: &usm_sync::Mutex<T>) -> LockGuard<'_, T> {
    let no_preempt = crate::NoPreempt::enter();
    LockGuard {
        guard: mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
        _no_preempt: no_preempt,
    }
}
