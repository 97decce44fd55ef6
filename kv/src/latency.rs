//! Per-command latency, reported by `INFO` in redis 7's `latencystats` format and cleared
//! by `CONFIG RESETSTAT`, so the tools that read redis read usm-kv the same way:
//!
//! ```text
//! # Latencystats
//! latency_percentiles_usec_get:p50=6.015,p99=112.127,p99.9=401.407
//! ```
//!
//! # What is measured
//! A command's *execution*, as redis measures it: from its parsed arguments to its reply
//! queued for the connection's next write. In USM mode that includes every page fault the
//! command takes (a swap-in parks the uThread until its page is back) and any wait for its
//! shard's lock; it does not include the time the request waited in the socket for its
//! connection to be served, nor the write. A client's latency minus this is the time the
//! request spent queued (network, wake-ups, the worker busy with other connections), which
//! is how `bench/benches/kv_latency.rs` splits a tail.
//!
//! Data commands only (GET, SET, MSET, DEL, MGET, EXISTS): the rest are admin commands
//! whose timing nobody compares. One histogram per command behind a short lock (the
//! runtime's uThread-aware [`Mutex`]: a record never blocks a worker); recording costs
//! tens of nanoseconds against a command's microseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use usm_runtime::embedded::sync::Mutex;

/// The commands with a histogram, in `INFO` order.
const TRACKED: [&str; 6] = ["get", "set", "mset", "del", "mget", "exists"];

/// Latency histograms of the tracked commands.
pub(crate) struct Latency {
    hists: Vec<Mutex<Histogram<u64>>>,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency").finish_non_exhaustive()
    }
}

/// 1 ns to 100 s, 3 significant digits (redis 7 keeps 2).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant, valid bounds"))
}

impl Latency {
    pub(crate) fn new() -> Latency {
        Latency {
            hists: TRACKED.iter().map(|_| Mutex::new(histogram())).collect(),
        }
    }

    /// The index of command `cmd` (any case), if tracked.
    pub(crate) fn slot(cmd: &[u8]) -> Option<usize> {
        TRACKED
            .iter()
            .position(|t| cmd.eq_ignore_ascii_case(t.as_bytes()))
    }

    /// Records one execution of the command in `slot`.
    pub(crate) fn record(&self, slot: usize, took: Duration) {
        if let Some(h) = self.hists.get(slot) {
            let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            h.lock().saturating_record(ns.max(1));
        }
    }

    /// Forgets everything recorded (`CONFIG RESETSTAT`).
    pub(crate) fn reset(&self) {
        for h in &self.hists {
            h.lock().reset();
        }
    }

    /// The `# Latencystats` section: one line per command run since the last reset,
    /// microseconds with three decimals (redis 7's format).
    pub(crate) fn info(&self) -> String {
        let mut t = String::from("# Latencystats\r\n");
        for (name, h) in TRACKED.iter().zip(&self.hists) {
            let h = h.lock();
            if h.is_empty() {
                continue;
            }
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
            t.push_str(&format!(
                "latency_percentiles_usec_{name}:p50={:.3},p99={:.3},p99.9={:.3}\r\n",
                us(0.5),
                us(0.99),
                us(0.999)
            ));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_redis_format_and_reset_clears_them() {
        let l = Latency::new();
        let get = Latency::slot(b"GeT").unwrap();
        for us in 1..=1000u64 {
            l.record(get, Duration::from_micros(us));
        }
        let info = l.info();
        let line = info
            .lines()
            .find(|l| l.starts_with("latency_percentiles_usec_get:"))
            .unwrap();
        let fields: Vec<(&str, f64)> = line
            .split_once(':')
            .unwrap()
            .1
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[0].0, "p50");
        assert!((fields[0].1 - 500.0).abs() < 1.0, "{line}");
        assert_eq!(fields[1].0, "p99");
        assert!((fields[1].1 - 990.0).abs() < 1.5, "{line}");
        assert_eq!(fields[2].0, "p99.9");
        assert!(
            !info.contains("usec_set"),
            "a command never run has no line"
        );
        assert_eq!(Latency::slot(b"INFO"), None);
        l.reset();
        assert!(!l.info().contains("usec_get"));
    }
}
