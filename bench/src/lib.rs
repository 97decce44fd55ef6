//! Shared helpers of the USM benchmarks: the kernel-baseline harness.
//!
//! Every USM benchmark is measured side by side with the Linux kernel in one run. This
//! crate owns the kernel side and the plumbing both sides share:
//!
//! - [`guard`]: RAII guards that change machine state and always undo it — on drop, on
//!   panic, on SIGINT/SIGTERM, and (via [`cleanup`]) after SIGKILL: [`MemCgroup`],
//!   [`SwapFile`], [`ZramSwap`], [`ThpSetting`], [`MthpSetting`], [`PmQos`].
//! - [`stats`], [`report`], [`plot`]: warm-up + N runs, medians, hdrhistogram percentiles,
//!   `…_vs_kernel` ratios, `--json PATH`, a text table, an SVG line plot.
//! - [`prewarm`]: pre-warm the host backing before every side.
//! - [`fault`]: kernel first-touch fault latency and first-touch throughput at 4 KiB, mTHP
//!   and THP 2 MiB (issue 6, benchmarks 2 and 3).
//! - [`storm`]: the swap-storm workload, independent of any runtime, its kernel modes on
//!   OS threads, and the [`storm::StormMode`] trait USM's modes plug into (issue 6,
//!   benchmark 1).
//! - [`redis`]: the redis-server baseline, plain and in a memory cgroup with kernel swap
//!   (issue 7).
//! - [`child`]: running a workload in a child process placed in a cgroup before it
//!   allocates (re-executing the bench binary).
//!
//! `unsafe` lives only in [`sys`].

#![deny(unsafe_code)]

pub mod child;
pub mod cleanup;
mod error;
pub mod fault;

pub mod guard;
pub mod kvload;
pub mod plot;
pub mod prewarm;
pub mod redis;
pub mod storm;

pub mod report;
pub mod stats;

#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
pub mod sys;

pub use error::{Error, Result};
pub use guard::{MemCgroup, MthpSetting, PmQos, SwapFile, ThpSetting, ZramSwap};
pub use sys::{Advice, AnonMemory};
