//! The uThread-aware mutex (here because its guard dereferences the protected cell).
//!
//! # Protocol
//! - `locked` is the lock word. `lock`: CAS `false → true`; on failure register in the wait
//!   list, CAS again (an unlock between the first CAS and the registration would otherwise
//!   be missed), and park if it still fails; on success after registering, deregister.
//! - `unlock`: store `false` (Release), then wake the oldest registered waiter, which retries.
//!   Not a hand-off: a running uThread may take the lock first (throughput over fairness);
//!   the woken waiter then registers again at the back.
//! - The data is only reached through a [`MutexGuard`], which exists only while `locked`
//!   was won by its creator.

use std::ops::{Deref, DerefMut};

use usm_sync::atomic::{AtomicBool, Ordering};
use usm_sync::cell::UnsafeCell;

use crate::sync::waiter::{WaitList, Waiter};

/// A mutual-exclusion lock whose `lock` parks the calling uThread (or blocks an OS thread).
///
/// A guard may be held across yields and parks; if the uThread migrates meanwhile, the
/// guard moves with it (the lock is not tied to an OS thread).
pub struct Mutex<T> {
    locked: AtomicBool,
    waiters: WaitList,
    value: UnsafeCell<T>,
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> std::fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mutex")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .finish()
    }
}

// SAFETY: the value is only accessed through a guard, and at most one guard exists at a time
// (the `locked` CAS), so sharing the mutex hands `T` from thread to thread: `T: Send` is
// enough, as for `std::sync::Mutex`.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: moving the mutex moves `T`.
unsafe impl<T: Send> Send for Mutex<T> {}

impl<T> Mutex<T> {
    /// An unlocked mutex holding `value`.
    pub fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            waiters: WaitList::new(),
            value: UnsafeCell::new(value),
        }
    }

    fn try_acquire(&self) -> bool {
        // SeqCst pairs with `unlock`: [register waiter; CAS] against [store false; check
        // for waiters] — at least one side sees the other.
        self.locked
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        self.try_acquire().then_some(MutexGuard { mutex: self })
    }

    /// Takes the lock, parking the calling uThread while it is held elsewhere.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        crate::preempt_point();
        loop {
            if self.try_acquire() {
                return MutexGuard { mutex: self };
            }
            let waiter = Waiter::current();
            let id = self.waiters.register(waiter.clone());
            if self.try_acquire() {
                if !self.waiters.remove(id) {
                    // An unlock popped us meanwhile: pass that wake-up on.
                    self.waiters.wake_one();
                }
                return MutexGuard { mutex: self };
            }
            waiter.wait();
            self.waiters.remove(id);
        }
    }

    fn unlock(&self) {
        let _no_preempt = crate::NoPreempt::enter();
        self.locked.store(false, Ordering::SeqCst);
        self.waiters.wake_one();
    }
}

/// Proof of holding a [`Mutex`]; unlocks when dropped.
pub struct MutexGuard<'a, T> {
    pub(crate) mutex: &'a Mutex<T>,
}

impl<T> std::fmt::Debug for MutexGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MutexGuard").finish_non_exhaustive()
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard exists only while its mutex's `locked` is held by it, so no other
        // reference to the value exists.
        self.mutex.value.with(|ptr| unsafe { &*ptr })
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, plus `&mut self` makes this the only borrow of the guard.
        self.mutex.value.with_mut(|ptr| unsafe { &mut *ptr })
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}
