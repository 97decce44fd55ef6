//! `usm-runtime`: joins mechanism, scheduler, swap and policies into the InstanceUSM
//! daemon and the embedded runtime; home of the `usm` command.
//!
//! - [`config`]: the USM cfg format.
//! - [`mm`]: the memory-manager core both modes share: per-space page states, the policy
//!   context (`usm_policies::Cx`) over a worker's arena, swap-in and eviction pipelines.
//! - [`embedded`]: the embedded runtime (`Runtime`, `Region`, the SIGBUS fault path).
//! - [`daemon`]: InstanceUSM, the daemon that manages tagged programs.
//! - [`demo`]: the swap-storm demo the README's main command runs.

pub mod config;
pub mod daemon;
pub mod demo;
pub mod embedded;
pub use usm_mm as mm;
mod sys;

pub use config::{Config, ConfigError};
pub use sys::spawn::unblock_termination_signals;
