//! `usm-types`: the vocabulary USM's crates share — plain data, no system interface.
//!
//! A policy author needs these names and nothing of the machinery behind them, so they
//! live here rather than in the crates that implement that machinery (`usm-kmod`:
//! userfaultfd and the frame pool; `usm-swap`: devices and the io_uring engine). Both
//! re-export them under their old paths (`usm_kmod::FrameNo`, `usm_swap::SwapEntry`), so
//! each type exists once. `usm-policies` depends on this crate only: writing a policy
//! compiles no io_uring, nix or libc binding.
//!
//! - [`frame`]: [`FrameNo`], the number of a 4 KiB frame of the pool; [`PAGE_SIZE`].
//! - [`event`]: what a policy is told — [`Fault`] (page address, write, who), [`Origin`]
//!   (pid, tid), [`Event`] (Fault / Free / NewProcess / Exit / Hint).
//! - [`swap`]: [`SwapEntry`] (device and slot in one `u64`), [`DeviceId`], and the
//!   [`Ticket`] of one queued swap I/O.
//!
//! Addresses are `u64` virtual addresses in the address space of the process that owns
//! them, a page address being one rounded down to [`PAGE_SIZE`]; a process is its `u32`
//! pid (the embedded runtime uses its own).

#![forbid(unsafe_code)]

pub mod event;
pub mod frame;
pub mod swap;

pub use event::{Event, Fault, Origin};
pub use frame::{FrameNo, PAGE_SHIFT, PAGE_SIZE};
pub use swap::{DeviceId, MAX_SLOT, SwapEntry, Ticket};
