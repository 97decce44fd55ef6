//! Everything `unsafe` in this crate: page-aligned buffers, pushing submission entries
//! that carry raw buffer addresses, entering the ring, registering the engine's staging
//! buffers, and the raw-pointer I/O API for memory the engine does not own.
//!
//! The rest of the crate is safe code built on these pieces.

pub mod buf;
pub mod raw;
pub mod ring;
