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

//! - The types are *aliases* of std's (or loom's), not re-exports: the root
//!   `clippy.toml` forbids `std::sync::{Arc, Mutex, RwLock, Condvar}` and the std atomics
//!   by name, and an alias is a name of its own, so `usm_sync::Arc` passes where
//!   `std::sync::Arc` is refused. Code that truly needs std's own type (a `static`
//!   shared with a signal handler, an API that names `std::sync::Arc`) says so with an
//!   `#[allow(clippy::disallowed_types)]` and its reason.

#![no_std]
// The shim is the one place that names std's and loom's synchronisation types.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![deny(unsafe_code)]
extern crate std;

#[cfg(loom)]
use loom::sync as backend;
#[cfg(not(loom))]
use std::sync as backend;

/// A thread-safe reference-counted pointer (`std::sync::Arc`; loom's under `cfg(loom)`).
pub type Arc<T> = backend::Arc<T>;
/// A mutual-exclusion lock (`std::sync::Mutex`; loom's under `cfg(loom)`).
pub type Mutex<T> = backend::Mutex<T>;
/// The guard of a [`Mutex`].
pub type MutexGuard<'a, T> = backend::MutexGuard<'a, T>;
/// A condition variable for [`Mutex`] (`std::sync::Condvar`; loom's under `cfg(loom)`).
pub type Condvar = backend::Condvar;
/// A reader-writer lock (`std::sync::RwLock`; loom's under `cfg(loom)`).
pub type RwLock<T> = backend::RwLock<T>;
/// The shared guard of a [`RwLock`].
pub type RwLockReadGuard<'a, T> = backend::RwLockReadGuard<'a, T>;
/// The exclusive guard of a [`RwLock`].
pub type RwLockWriteGuard<'a, T> = backend::RwLockWriteGuard<'a, T>;

/// Atomic integers and fences.
pub mod atomic {
    #[cfg(not(loom))]
    use core::sync::atomic as backend;
    #[cfg(loom)]
    use loom::sync::atomic as backend;

    pub use backend::Ordering;

    /// An atomic `bool`.
    pub type AtomicBool = backend::AtomicBool;
    /// An atomic `i8`.
    pub type AtomicI8 = backend::AtomicI8;
    /// An atomic `i16`.
    pub type AtomicI16 = backend::AtomicI16;
    /// An atomic `i32`.
    pub type AtomicI32 = backend::AtomicI32;
    /// An atomic `i64`.
    pub type AtomicI64 = backend::AtomicI64;
    /// An atomic `isize`.
    pub type AtomicIsize = backend::AtomicIsize;
    /// An atomic `u8`.
    pub type AtomicU8 = backend::AtomicU8;
    /// An atomic `u16`.
    pub type AtomicU16 = backend::AtomicU16;
    /// An atomic `u32`.
    pub type AtomicU32 = backend::AtomicU32;
    /// An atomic `u64`.
    pub type AtomicU64 = backend::AtomicU64;
    /// An atomic `usize`.
    pub type AtomicUsize = backend::AtomicUsize;
    /// An atomic raw pointer.
    pub type AtomicPtr<T> = backend::AtomicPtr<T>;

    /// A memory fence (`core::sync::atomic::fence`; loom's under `cfg(loom)`).
    #[inline(always)]
    pub fn fence(order: Ordering) {
        backend::fence(order);
    }
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
