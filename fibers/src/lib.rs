//! `usm-fibers`: uThreads (workees) as corosensei coroutines on pooled, guard-paged stacks.
//!
//! This crate knows nothing about scheduling: it turns a closure into a [`Fiber`] that a
//! scheduler (the LocalManager in `usm-localmanager`) resumes until it suspends with a
//! [`Suspend`] reason or finishes.
//!
//! # Pieces
//! - [`StackPool`]: guard-paged stacks (`mmap` + a `PROT_NONE` guard page below the stack),
//!   reused across fibers. Creating a stack costs an `mmap` and an `mprotect`; taking one
//!   from the pool costs a `Vec::pop`. A pool is owned by one worker (no locks).
//! - [`Fiber`]: one coroutine plus its uThread-local storage ([`local`]).
//! - [`suspend_current`]: called *inside* a fiber, switches back to whoever called
//!   [`Fiber::resume`]. It is async-signal-safe (see its docs), which is what lets the fault
//!   path and preemption switch out of a signal handler running on the fiber's stack.
//!
//! # Stack size
//! Never below [`MIN_STACK_SIZE`] (16 KiB): a signal frame carrying AVX-512 state takes
//! ~3.4 KiB of the interrupted stack, and the SIGBUS handler of the fault path runs on it.
//!
//! # Migration and `Send`
//! A fiber may be resumed by a different OS thread than the one that last resumed it (the
//! LocalManager steals ready uThreads between workers). Consequently:
//! - the closure must be `Send + 'static` ([`Fiber::new`] requires it);
//! - code in a fiber must not keep an OS thread-local *reference* (or anything derived from
//!   it, such as a `std::thread::current()` identity or a `RefCell` borrow of a
//!   `thread_local!`) across a call that can suspend — after the call it may be on another
//!   thread. uThread-local storage ([`local`]) follows the fiber instead;
//! - this crate's own thread-locals are read through `#[inline(never)]` accessors so that the
//!   compiler cannot cache a thread-local address across a suspension point.
//!
//! A fiber that suspended from *inside a signal handler* must be resumed on the same thread
//! (its signal frame holds that thread's registers); the scheduler enforces that, not this
//! crate.

#![deny(unsafe_code)]

mod error;
pub mod local;
mod stack;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
mod sys;

pub use error::FiberError;
pub use local::with_local;
pub use stack::{DEFAULT_STACK_SIZE, MIN_STACK_SIZE, StackPool};
pub use sys::{Fiber, Outcome, PanicPayload, in_fiber, on_fiber_stack, suspend_current};

/// Why a fiber gave control back to its scheduler; the value passed by
/// [`suspend_current`] and returned by [`Fiber::resume`] in [`Outcome::Suspended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspend {
    /// Still ready: put it back in the ready set.
    Yield,
    /// Wants to wait until someone unparks it.
    Park,
    /// Parked inside a signal handler on a page fault; the scheduler's fault state (PFQ bit,
    /// payload) was recorded before switching. Must be resumed on the same thread.
    Fault,
    /// Switched out by time-slice preemption from a signal handler; must be resumed on the
    /// same thread.
    Preempted,
}

impl Suspend {
    /// True when the fiber is suspended inside a signal handler and must be resumed by the
    /// thread it was running on.
    pub fn in_signal_handler(self) -> bool {
        matches!(self, Suspend::Fault | Suspend::Preempted)
    }
}
