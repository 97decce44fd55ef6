//! The only place of this crate with `unsafe`: owned pointers behind atomics, and the
//! worker's current-uThread pointers read from uThread (and signal) context.
//!
//! - [`AtomicBox`]: a `Box<T>` slot whose ownership moves atomically (`take` / `put`), the
//!   way a ready uThread's entry moves between its slot, the worker running it and a thief.
//! - [`OnceBox`]: a lazily published, never-replaced `Box<T>` (bitfield chunks, slot chunks)
//!   that other cores may read once published; freed with its owner.
//! - `current` (not under loom): the worker thread's context pointer.

#[cfg(not(loom))]
pub(crate) mod current;
#[cfg(not(loom))]
pub(crate) mod mutex;
#[cfg(not(loom))]
pub(crate) mod preempt;
#[cfg(not(loom))]
pub(crate) mod signal;

use std::ptr;

use usm_sync::atomic::{AtomicPtr, Ordering};

/// A slot holding at most one `Box<T>`, moved in and out atomically.
///
/// Invariant: the pointer is null or came from `Box::into_raw` and is owned by the slot.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) struct AtomicBox<T> {
    ptr: AtomicPtr<T>,
}

#[cfg_attr(loom, allow(dead_code))]
impl<T> AtomicBox<T> {
    /// An empty slot.
    pub(crate) fn empty() -> Self {
        Self {
            ptr: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Takes the box out, leaving the slot empty.
    pub(crate) fn take(&self) -> Option<Box<T>> {
        let raw = self.ptr.swap(ptr::null_mut(), Ordering::AcqRel);
        if raw.is_null() {
            None
        } else {
            // SAFETY: a non-null pointer in the slot came from `Box::into_raw` (see `put`) and
            // the swap above removed it from the slot, so we are its only owner now.
            Some(unsafe { Box::from_raw(raw) })
        }
    }

    /// Puts `value` in; if the slot was not empty, the previous box is returned.
    ///
    /// The common case (the slot is empty and only the caller may fill it, as for the worker
    /// putting back the uThread it ran) costs a load and a release store instead of a locked
    /// swap. If another thread filled the slot between the two, that box is leaked, never
    /// freed twice: still memory-safe, and the scheduler's protocol rules it out.
    pub(crate) fn put(&self, value: Box<T>) -> Option<Box<T>> {
        if self.ptr.load(Ordering::Acquire).is_null() {
            self.ptr.store(Box::into_raw(value), Ordering::Release);
            return None;
        }
        let raw = self.ptr.swap(Box::into_raw(value), Ordering::AcqRel);
        if raw.is_null() {
            None
        } else {
            // SAFETY: as in `take`: the swap transferred ownership of the old pointer to us.
            Some(unsafe { Box::from_raw(raw) })
        }
    }
}

impl<T> Drop for AtomicBox<T> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

// SAFETY: an AtomicBox only hands out owned `Box<T>` values (never references), so sharing it
// between threads moves `T` between threads: `T: Send` suffices for both traits.
unsafe impl<T: Send> Send for AtomicBox<T> {}
// SAFETY: see above.
unsafe impl<T: Send> Sync for AtomicBox<T> {}

/// A `Box<T>` published once and then read by any thread until the `OnceBox` is dropped.
pub(crate) struct OnceBox<T> {
    ptr: AtomicPtr<T>,
}

impl<T> OnceBox<T> {
    /// Not yet published.
    pub(crate) fn new() -> Self {
        Self {
            ptr: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The published value, if any.
    pub(crate) fn get(&self) -> Option<&T> {
        let raw = self.ptr.load(Ordering::Acquire);
        if raw.is_null() {
            None
        } else {
            // SAFETY: a non-null pointer was published by `get_or_init` from `Box::into_raw`
            // with Release ordering (we loaded with Acquire, so its contents are visible) and
            // is never replaced or freed before `self` is dropped, which the borrow prevents.
            Some(unsafe { &*raw })
        }
    }

    /// The published value, publishing `init()` first if there is none. If two threads race,
    /// one value wins and the other is dropped.
    pub(crate) fn get_or_init(&self, init: impl FnOnce() -> T) -> &T {
        if let Some(value) = self.get() {
            return value;
        }
        let fresh = Box::into_raw(Box::new(init()));
        match self
            .ptr
            .compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: we just published `fresh`; it lives until `self` is dropped.
            Ok(_) => unsafe { &*fresh },
            Err(winner) => {
                // SAFETY: `fresh` was never published, we still own it.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: `winner` is the published pointer (non-null), see `get`.
                unsafe { &*winner }
            }
        }
    }
}

impl<T> Drop for OnceBox<T> {
    fn drop(&mut self) {
        let raw = self.ptr.swap(ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            // SAFETY: published from `Box::into_raw`, owned by `self`, and `&mut self` means
            // no reference from `get` is alive.
            drop(unsafe { Box::from_raw(raw) });
        }
    }
}

// SAFETY: readers get `&T` from any thread (needs `T: Sync`) and the value is dropped on
// whichever thread drops the OnceBox (needs `T: Send`).
unsafe impl<T: Send + Sync> Send for OnceBox<T> {}
// SAFETY: see above.
unsafe impl<T: Send + Sync> Sync for OnceBox<T> {}
