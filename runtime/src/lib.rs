//! `usm-runtime`: joins mechanism, scheduler, swap and policies into the InstanceUSM
//! daemon and the embedded runtime; home of the `usm` command.

pub mod config;

pub use config::{Config, ConfigError};
