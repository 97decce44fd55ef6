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
//! - [`demo`]: the swap-storm demo the README's main command runs (feature `cli`).
//! - [`cli`]: the `usm` command, and [`cli::main_with`] for a `usm` with policies of your
//!   own (feature `cli`).
//!
//! # Features
//!
//! - `cli` (default): the `usm` command, the demo and its progress bars (clap,
//!   indicatif, tracing-subscriber); implies `metrics`.
//! - `metrics` (default through `cli`): the daemon's Prometheus endpoint (the config's
//!   `metrics ADDR:PORT`; prometheus-client). Without it a config naming `metrics` is
//!   refused at start with that reason.
//!
//! An embedder takes neither (`default-features = false`), as `usm-kv` does: the embedded
//! runtime and the daemon then link none of clap, indicatif or prometheus-client.

#![deny(unsafe_code)]

pub mod baseline;

// The `usm` command's modules name this crate by its public name (they began as the
// binary's modules, and read the same as an outside `main_with` user's code).
#[cfg(feature = "cli")]
extern crate self as usm_runtime;

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "cli")]
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
