//! A condition variable for [`crate::sync::Mutex`].

use crate::sync::waiter::{WaitList, Waiter};
use crate::sync::{Mutex, MutexGuard};

/// Parks uThreads until notified. Spurious wake-ups are possible: wait in a loop (or use
/// [`Condvar::wait_while`]).
pub struct Condvar {
    waiters: WaitList,
}

impl std::fmt::Debug for Condvar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condvar")
            .field("has_waiters", &!self.waiters.is_empty())
            .finish()
    }
}

impl Default for Condvar {
    fn default() -> Self {
        Self::new()
    }
}

impl Condvar {
    /// A condition variable with no waiters.
    pub fn new() -> Self {
        Self {
            waiters: WaitList::new(),
        }
    }

    /// Releases `guard`, parks until notified, re-locks. The waiter is registered before the
    /// mutex is released, so a notification sent after the caller's check cannot be lost.
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        crate::preempt_point();
        let mutex: &'a Mutex<T> = guard.mutex;
        let waiter = Waiter::current();
        let id = self.waiters.register(waiter.clone());
        drop(guard);
        waiter.wait();
        self.waiters.remove(id);
        mutex.lock()
    }

    /// Waits until `condition` is false.
    pub fn wait_while<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        mut condition: impl FnMut(&mut T) -> bool,
    ) -> MutexGuard<'a, T> {
        while condition(&mut guard) {
            guard = self.wait(guard);
        }
        guard
    }

    /// Wakes one waiter.
    pub fn notify_one(&self) {
        crate::preempt_point();
        self.waiters.wake_one();
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        crate::preempt_point();
        self.waiters.wake_all();
    }
}
