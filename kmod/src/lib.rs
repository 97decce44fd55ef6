//! `usm-kmod`: the USM *mechanism* (USMKernel in the USM documents).
//!
//! It catches page faults and executes mapping decisions; it decides nothing. Today the
//! backend is userfaultfd on a stock kernel; a kernel-module backend may follow.
//!
//! - [`event`]: the USM event vocabulary ([`Event`]: Fault / Free / NewProcess / Exit /
//!   Hint) that policies consume.
//! - [`frame`]: frame numbers, the unit the pool hands out.

pub mod event;
pub mod frame;

pub use event::{Event, Fault, Origin};
pub use frame::FrameNo;
