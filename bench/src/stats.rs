//! Measurement helpers: warm-up + N runs, medians, latency percentiles (hdrhistogram),
//! and the `…_vs_kernel` ratios.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Runs `f` `warmup` times (results dropped), then `runs` times, returning the measured
/// results in order. `f` gets the run index (warm-ups are numbered before the runs).
pub fn warmup_then_runs<T>(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut(usize) -> Result<T>,
) -> Result<Vec<T>> {
    for i in 0..warmup {
        f(i)?;
    }
    (0..runs.max(1)).map(|i| f(warmup + i)).collect()
}

/// Median of `values` (mean of the two middle ones for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, minimum and maximum of a set of runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Median.
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// Number of runs.
    pub runs: usize,
}

impl RunSummary {
    /// Summarises `values`.
    pub fn of(values: &[f64]) -> Self {
        Self {
            median: median(values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            runs: values.len(),
        }
    }
}

/// `side / kernel`, the value of a `…_vs_kernel` field (None when the kernel figure is 0 or
/// not finite).
pub fn ratio_vs_kernel(side: f64, kernel: f64) -> Option<f64> {
    (kernel.is_finite() && kernel != 0.0 && side.is_finite()).then(|| side / kernel)
}

/// Name of the ratio field for `metric`: `"{metric}_vs_kernel"`.
pub fn vs_kernel_field(metric: &str) -> String {
    format!("{metric}_vs_kernel")
}

/// A latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Result<Self> {
        let hist = Histogram::new_with_bounds(1, 100_000_000_000, 3)
            .map_err(|e| Error::Invalid(format!("histogram: {e}")))?;
        Ok(Self { hist })
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.record_ns(d.as_nanos().min(u128::from(u64::MAX)) as u64);
    }

    /// Records one latency in ns (clamped to the histogram's range).
    pub fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.max(1));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) -> Result<()> {
        self.hist
            .add(&other.hist)
            .map_err(|e| Error::Invalid(format!("histogram merge: {e}")))
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The summary (percentiles in ns).
    pub fn summary(&self) -> LatencySummary {
        let h = &self.hist;
        LatencySummary {
            count: h.len(),
            mean_ns: if h.is_empty() { 0.0 } else { h.mean() },
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

/// Percentiles of a [`LatencyHistogram`], in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ns: f64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
}

/// Wall time and the calling thread's CPU time and fault counts over a closure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadCost {
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// User + system CPU seconds of the calling thread.
    pub cpu_s: f64,
    /// Minor faults taken by the calling thread.
    pub minor_faults: u64,
    /// Major faults taken by the calling thread.
    pub major_faults: u64,
    /// CPU time stolen by the hypervisor from all vCPUs meanwhile ([`system_steal_s`]):
    /// a large value means other guests/helpers competed, and wall time exceeds CPU time.
    pub steal_s: f64,
}

/// Seconds of CPU time stolen from this VM so far, summed over all CPUs (`/proc/stat`,
/// `steal` column of the `cpu` line, in USER_HZ = 100 ticks/s). 0 when unavailable.
pub fn system_steal_s() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("cpu "))?;
            line.split_whitespace().nth(8)?.parse::<u64>().ok()
        })
        .map_or(0.0, |ticks| ticks as f64 / 100.0)
}

/// CPU seconds, minor and major faults of the calling thread so far (`RUSAGE_THREAD`), or
/// of the whole process with `whole_process`.
pub fn rusage(whole_process: bool) -> Result<(f64, u64, u64)> {
    use nix::sys::resource::{UsageWho, getrusage};
    let who = if whole_process {
        UsageWho::RUSAGE_SELF
    } else {
        UsageWho::RUSAGE_THREAD
    };
    let u = getrusage(who).map_err(|e| Error::sys("getrusage", e))?;
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
    Ok((
        tv(u.user_time()) + tv(u.system_time()),
        u.minor_page_faults().max(0) as u64,
        u.major_page_faults().max(0) as u64,
    ))
}

/// Measures `f` on the calling thread: wall, CPU, faults.
pub fn measure_thread<T>(f: impl FnOnce() -> T) -> Result<(T, ThreadCost)> {
    let (c0, min0, maj0) = rusage(false)?;
    let steal0 = system_steal_s();
    let t0 = Instant::now();
    let out = f();
    let wall_s = t0.elapsed().as_secs_f64();
    let steal_s = system_steal_s() - steal0;
    let (c1, min1, maj1) = rusage(false)?;
    Ok((
        out,
        ThreadCost {
            wall_s,
            cpu_s: c1 - c0,
            minor_faults: min1.saturating_sub(min0),
            major_faults: maj1.saturating_sub(maj0),
            steal_s,
        },
    ))
}
