//! Shared helpers of the USM benchmarks: kernel-baseline set-up and reporting.
