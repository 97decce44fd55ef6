//! The synchronisation shim of the workspace.
//!
//! Every atomic, cell, mutex and thread spawn in code that another core can touch comes
//! from here, never from `std` directly. Normally this re-exports `std`; built with
//! `RUSTFLAGS="--cfg loom"` it re-exports [`loom`](https://docs.rs/loom) instead, so
//! the model checker in `loom-tests/` runs the *real* code (the IDQ/PFQ bitfields, the
//! frame arenas) rather than a copy of it.
//!
//! Rules for users:
//! - Import `usm_sync::atomic::*`, not `std::sync::atomic::*`.
//! - Keep capacities behind [`cfg_loom_or`] so the models stay small enough to finish.
//! - Spin loops call [`hint::spin_loop`] from here: under loom it yields to the model.

#![no_std]
extern crate std;

#[cfg(not(loom))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Atomic integers and fences.
pub mod atomic {
    #[cfg(not(loom))]
    pub use core::sync::atomic::{
        AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
        fence,
    };
    #[cfg(loom)]
    pub use loom::sync::atomic::{
        AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
        fence,
    };
}

/// Threads (spawning, yielding, parking).
pub mod thread {
    #[cfg(loom)]
    pub use loom::thread::{JoinHandle, current, park, spawn, yield_now};
    #[cfg(not(loom))]
    pub use std::thread::{JoinHandle, current, park, spawn, yield_now};
}

/// Interior mutability checked by loom (`with`/`with_mut` closures on both sides).
pub mod cell {
    /// An `UnsafeCell` whose accesses loom can track. Outside loom it is a thin wrapper
    /// over [`core::cell::UnsafeCell`] with the same `with`/`with_mut` API.
    #[cfg(not(loom))]
    #[derive(Debug, Default)]
    pub struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

    #[cfg(not(loom))]
    impl<T> UnsafeCell<T> {
        /// Wraps `value`.
        pub const fn new(value: T) -> Self {
            Self(core::cell::UnsafeCell::new(value))
        }
        /// Runs `f` with a shared raw pointer to the contents.
        pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }
        /// Runs `f` with a mutable raw pointer to the contents.
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }

    #[cfg(loom)]
    pub use loom::cell::UnsafeCell;
}

/// Spin hints.
pub mod hint {
    #[cfg(not(loom))]
    pub use core::hint::spin_loop;
    #[cfg(loom)]
    pub use loom::hint::spin_loop;
}

/// Picks `loom_value` when built for the model checker and `value` otherwise; used to
/// shrink capacities (bitfield sizes, arena batches) so loom models finish.
#[inline(always)]
pub const fn cfg_loom_or(value: usize, loom_value: usize) -> usize {
    if cfg!(loom) { loom_value } else { value }
}
