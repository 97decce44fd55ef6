//! `usm-swap`: swap devices, reference-counted slots, and the io_uring engine.
//!
//! This crate knows nothing about uThreads: an I/O request returns a [`Ticket`], and the
//! runtime maps tickets to parked workees.

pub mod entry;

pub use entry::{DeviceId, SwapEntry, Ticket};
