//! `usm-runtime`: joins mechanism, scheduler, swap and policies into the InstanceUSM
//! daemon and the embedded runtime; home of the `usm` command.
//!
//! - [`baseline`]: the kernel side of a comparison — a memory cgroup with kernel swap,
//!   always undone (used by `usm compare` and the bench crate).
//! - [`config`]: the USM cfg format.
//! - [`mm`]: the memory manager both modes run on (the `usm-mm` crate, re-exported): the
//!   embedded runtime and the daemon differ only in the installers and pool they give it.
//! - [`embedded`]: the embedded runtime (`Runtime`, `Region`, the SIGBUS fault path).
//! - [`daemon`]: InstanceUSM, the daemon that manages tagged programs.
//! - [`demo`]: the swap-storm demo the README's main command runs.

#![deny(unsafe_code)]

pub mod baseline;
pub mod config;
pub mod daemon;
pub mod demo;
// `embedded::region` declares the `unsafe trait Pod` (its impls are in `sys::view`); no
// unsafe block lives in `embedded`.
#[allow(unsafe_code)]
pub mod embedded;
pub use usm_mm as mm;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
mod sys;

pub use config::{Config, ConfigError};
pub use sys::spawn::unblock_termination_signals;
