//! `usm-kmod`: the USM *mechanism* (USMKernel in the USM documents).
//!
//! It catches page faults and executes mapping decisions; it decides nothing. Today the
//! backend is userfaultfd on a stock kernel; a kernel-module backend may follow.
//!
//! - [`event`]: the USM event vocabulary ([`Event`]: Fault / Free / NewProcess / Exit /
//!   Hint) that policies consume.
//! - [`frame`]: frame numbers, the unit the pool hands out.
//! - [`uffd`]: userfaultfd, safely — [`RawUserfaultfd::open`] then
//!   [`RawUserfaultfd::negotiate`] into a [`Userfaultfd`]; register, resolve (the
//!   [`Resolved`] states), read [`UffdEvent`]s.
//! - [`pool`]: the [`FramePool`](pool::FramePool) of 4 KiB frames moved in and out of
//!   regions with `UFFDIO_MOVE`, its descriptor table, the sArena / lArena tiers and the
//!   zeroing queue.
//! - [`probe`]: what this machine offers (for `usm doctor`).
//! - [`sys`]: the uapi and every `unsafe` block of the crate.
//! - [`Error`]: the crate's error type, with classifiers.
//!
//! ```no_run
//! use usm_kmod::{Features, OpenFlags, RawUserfaultfd, RegisterMode};
//! let uffd = RawUserfaultfd::open(OpenFlags::default())?
//!     .negotiate(Features::EVENT_REMOVE | Features::EVENT_UNMAP, Features::MOVE)?;
//! # let (addr, len) = (0u64, 4096u64);
//! let granted = uffd.register(addr, len, RegisterMode::MISSING)?;
//! println!("granted {granted}, features {}", uffd.features());
//! # Ok::<(), usm_kmod::Error>(())
//! ```

#![deny(unsafe_code)]

pub mod error;
mod flags;
pub mod pool;
pub mod probe;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
pub mod sys;
pub mod uffd;

pub use error::{Error, Result};
pub use event::{Event, Fault, Origin};
pub use frame::{FrameNo, PAGE_SHIFT, PAGE_SIZE};
pub use uffd::{
    ContinueMode, CopyMode, Features, Ioctls, MoveMode, OpenFlags, OpenPath, PoisonMode,
    RawUserfaultfd, RegisterMode, Resolved, UffdEvent, Userfaultfd, WriteProtect, ZeropageMode,
};
/// The event vocabulary and frame numbers live in `usm-types` (policies use them without
/// this crate); re-exported here under their old paths.
pub use usm_types::{event, frame};
