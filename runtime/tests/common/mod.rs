//! Helpers shared by the daemon test files (each test file is its own crate and uses a
//! different subset, hence `dead_code` is allowed here).
#![allow(dead_code)]

pub(crate) mod daemon;
pub(crate) mod harden;
pub(crate) mod programs;
pub(crate) mod redis;
