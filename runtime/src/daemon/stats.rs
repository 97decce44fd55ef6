//! Counters of the daemon and of each managed process, and the snapshot `usm stat`,
//! `usm exec`'s summary and the Prometheus exposition all read (one source of numbers).
//!
//! # Intervals
//! Every counter in a snapshot is cumulative (since the daemon, or the process, started),
//! and so is the fault-latency histogram a snapshot carries ([`LatencyBuckets`]: counts
//! per eighth of an octave). A client that takes two snapshots gets the interval's rates
//! by subtracting counters and the interval's percentiles by subtracting the two
//! histograms bucket by bucket ([`LatencyBuckets::since`]) — what `usm stat --watch`
//! shows. Daemon-wide counters ([`DaemonStat::totals`]) include processes that ended, so
//! they never go down.

use std::time::Duration;
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Per-process counters of what the daemon sees itself (events, hints, fault latency);
/// page counts come from the memory manager's space counters.
#[derive(Debug)]
pub(crate) struct ProcCounters {
    pub(crate) faults: AtomicU64,
    pub(crate) forks: AtomicU64,
    pub(crate) remaps: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) unmaps: AtomicU64,
    pub(crate) released_frames: AtomicU64,
    /// Hints applied.
    pub(crate) hints: AtomicU64,
    /// Hints refused (the hint language, or no space to apply them to).
    pub(crate) hints_refused: AtomicU64,
    /// Fault latency in nanoseconds (read by the reader → resolved by the workee).
    latency: Mutex<Option<Histogram<u64>>>,
}

impl Default for ProcCounters {
    fn default() -> Self {
        ProcCounters {
            faults: AtomicU64::new(0),
            forks: AtomicU64::new(0),
            remaps: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            released_frames: AtomicU64::new(0),
            hints: AtomicU64::new(0),
            hints_refused: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
        }
    }
}

fn new_histogram() -> Option<Histogram<u64>> {
    // 1 ns .. 100 s, 3 significant digits: fits every fault latency.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).ok()
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ProcCounters {
    pub(crate) fn record_latency(&self, d: Duration) {
        if let Ok(mut guard) = self.latency.lock() {
            let Some(h) = guard.as_mut() else { return };
            let _ = h.record(d.as_nanos().clamp(1, u128::from(u64::MAX)) as u64);
        }
    }

    pub(crate) fn latency(&self) -> Latency {
        let Ok(h) = self.latency.lock() else {
            return Latency::default();
        };
        h.as_ref().map_or_else(Latency::default, Latency::of)
    }

    /// Adds `other`'s latencies to this one's (a process that ended, into the daemon's
    /// totals).
    pub(crate) fn absorb(&self, other: &ProcCounters) {
        let theirs = other.latency_histogram();
        if let (Ok(mut mine), Some(theirs)) = (self.latency.lock(), theirs)
            && let Some(mine) = mine.as_mut()
        {
            let _ = mine.add(&theirs);
        }
    }

    /// The latency histogram in [`LatencyBuckets`].
    pub(crate) fn latency_buckets(&self) -> LatencyBuckets {
        self.latency
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(LatencyBuckets::of))
            .unwrap_or_default()
    }

    /// A copy of the latency histogram.
    pub(crate) fn latency_histogram(&self) -> Option<Histogram<u64>> {
        self.latency.lock().ok().and_then(|h| h.clone())
    }

    /// Adds this process's latencies to `into`.
    pub(crate) fn merge_latency_into(&self, into: &mut Option<Histogram<u64>>) {
        if let (Ok(h), Some(into)) = (self.latency.lock(), into.as_mut())
            && let Some(h) = h.as_ref()
        {
            let _ = into.add(h);
        }
    }
}

/// Percentiles of a histogram (empty: zeroes).
pub(crate) fn latency_of(h: Option<&Histogram<u64>>) -> Latency {
    h.map_or_else(Latency::default, Latency::of)
}

/// Fault latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
        }
    }
}

/// Buckets per octave of [`LatencyBuckets`] (bucket width 2^(1/8): about 9 %).
const BUCKETS_PER_OCTAVE: f64 = 8.0;

/// A fault-latency histogram small enough for every snapshot: `(k, count)` for each
/// non-empty bucket `k`, which holds latencies in `[2^(k/8), 2^((k+1)/8))` ns, in
/// ascending `k`. Cumulative, like every counter of a snapshot: two snapshots' difference
/// ([`since`](Self::since)) is the interval's histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LatencyBuckets(pub Vec<(u16, u64)>);

impl LatencyBuckets {
    /// Bucket of a latency in ns.
    fn bucket(ns: u64) -> u16 {
        ((ns.max(1) as f64).log2() * BUCKETS_PER_OCTAVE).floor() as u16
    }

    /// The buckets of an hdrhistogram (ns).
    pub(crate) fn of(h: &Histogram<u64>) -> LatencyBuckets {
        let mut out: Vec<(u16, u64)> = Vec::new();
        for v in h.iter_recorded() {
            let k = Self::bucket(v.value_iterated_to());
            let n = v.count_at_value();
            match out.last_mut() {
                Some((last, c)) if *last == k => *c += n,
                _ => out.push((k, n)),
            }
        }
        LatencyBuckets(out)
    }

    /// Samples.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|&(_, n)| n).sum()
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram taken before):
    /// bucket-wise differences (a bucket that went down, which a cumulative histogram
    /// never does, counts zero).
    pub fn since(&self, earlier: &LatencyBuckets) -> LatencyBuckets {
        let mut old = earlier.0.iter().peekable();
        let mut out = Vec::new();
        for &(k, n) in &self.0 {
            while old.peek().is_some_and(|&&(j, _)| j < k) {
                old.next();
            }
            let before = match old.peek() {
                Some(&&(j, m)) if j == k => m,
                _ => 0,
            };
            if n > before {
                out.push((k, n - before));
            }
        }
        LatencyBuckets(out)
    }

    /// The `q` quantile (0..=1) in µs: the geometric middle of the bucket holding it
    /// (within about 5 %); `None` when empty.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(k, n) in &self.0 {
            seen += n;
            if seen >= rank {
                let ns = 2f64.powf((f64::from(k) + 0.5) / BUCKETS_PER_OCTAVE);
                return Some(ns / 1000.0);
            }
        }
        None
    }
}

/// Daemon-wide totals since start, processes that ended included (they never go down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Faults served.
    pub faults: u64,
    /// Pages filled with zeros.
    pub zero_fills: u64,
    /// Pages mapped by flexible huge pages.
    pub fhp_pages: u64,
    /// Pages brought back from swap.
    pub swapins: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Eviction candidates the agent could not move.
    pub evict_skipped: u64,
    /// Access samples taken (pages moved out so a re-fault shows an access).
    #[serde(default)]
    pub samples: u64,
    /// Sampled pages accessed again (moved back by a cheap fault).
    #[serde(default)]
    pub sample_refaults: u64,
    /// Pages poisoned (unreadable swap).
    pub poisoned: u64,
    /// Policy panics caught.
    pub policy_panics: u64,
    /// `fork` events.
    pub forks: u64,
    /// Frames given back by REMOVE/UNMAP/exit.
    pub released_frames: u64,
    /// Hints received.
    pub hints: u64,
    /// Processes that ended.
    pub processes_ended: u64,
}

impl Totals {
    /// Adds one process's counters.
    pub fn add(&mut self, p: &ProcessStat) {
        self.faults += p.faults;
        self.zero_fills += p.zero_fills;
        self.fhp_pages += p.fhp_pages;
        self.swapins += p.swapins;
        self.evictions += p.evictions;
        self.evict_skipped += p.evict_skipped;
        self.samples += p.samples;
        self.sample_refaults += p.sample_refaults;
        self.poisoned += p.poisoned;
        self.policy_panics += p.policy_panics;
        self.forks += p.forks;
        self.released_frames += p.released_frames;
        self.hints += p.hints;
    }
}

/// A swap device of the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapInfo {
    /// Its path.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Whether it is the daemon's private temporary file (sparse, deleted at exit).
    pub private: bool,
}

/// One managed process, as `usm stat` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStat {
    /// Its pid (0 for a fork child whose pid the daemon does not know).
    pub pid: u32,
    /// Process name.
    pub name: String,
    /// Pid of the process it was forked from, if it is a fork child.
    pub parent: Option<u32>,
    /// Allocation policy serving the process now (its configured one, or the default
    /// that replaced it after a panic).
    pub policy: String,
    /// Eviction policy.
    #[serde(default)]
    pub evict_policy: String,
    /// Out-of-memory policy.
    #[serde(default)]
    pub oom_policy: String,
    /// Pages the daemon mapped that are resident now (charged to the pool).
    pub resident_pages: u64,
    /// Pages whose data is out of the program (in swap or on the way).
    pub swapped_pages: u64,
    /// Faults served.
    pub faults: u64,
    /// Pages filled with zeros (first touch).
    pub zero_fills: u64,
    /// Pages mapped by flexible huge pages (beyond the faulting page).
    pub fhp_pages: u64,
    /// Pages brought back from swap (or the swap cache).
    pub swapins: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Eviction candidates the agent could not move (pinned or shared with a fork child).
    pub evict_skipped: u64,
    /// Access samples taken: pages moved out so that a re-fault shows an access.
    #[serde(default)]
    pub samples: u64,
    /// Sampled pages the program touched again (each a cheap fault, no I/O).
    #[serde(default)]
    pub sample_refaults: u64,
    /// Pages poisoned because their data could not be read back.
    pub poisoned: u64,
    /// Policy panics caught (the fault was served by the default policy).
    pub policy_panics: u64,
    /// `fork` events.
    pub forks: u64,
    /// `mremap` events.
    pub remaps: u64,
    /// `madvise` REMOVE events (DONTNEED, FREE).
    pub removes: u64,
    /// `munmap` events.
    pub unmaps: u64,
    /// Frames given back by REMOVE/UNMAP/exit.
    pub released_frames: u64,
    /// Hints applied (`usm_hint` accepted by the daemon).
    pub hints: u64,
    /// Hints refused (the daemon's log says why).
    #[serde(default)]
    pub hints_refused: u64,
    /// Whether the eviction agent runs in the process.
    pub agent: bool,
    /// Coverage report taken at the peak of anonymous memory: managed anonymous bytes.
    pub managed_anon_bytes: u64,
    /// The same report: all anonymous bytes.
    pub anon_bytes: u64,
    /// Fault latency.
    pub latency: Latency,
    /// Fault latency histogram (cumulative; see the module docs).
    #[serde(default)]
    pub latency_buckets: LatencyBuckets,
}

/// The whole daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonStat {
    /// When the snapshot was taken: milliseconds since the Unix epoch.
    #[serde(default)]
    pub timestamp_ms: u64,
    /// Daemon pid.
    pub pid: u32,
    /// `usm` version and commit of the daemon.
    #[serde(default)]
    pub version: String,
    /// The taggers' socket.
    #[serde(default)]
    pub socket: String,
    /// Swap devices, in priority order.
    #[serde(default)]
    pub swap: Vec<SwapInfo>,
    /// The eviction policy in force.
    #[serde(default)]
    pub evict_policy: String,
    /// The out-of-memory policy in force.
    #[serde(default)]
    pub oom_policy: String,
    /// The default allocation policy (for processes the config assigns none).
    #[serde(default)]
    pub alloc_policy: String,
    /// Pool size, pages.
    pub pool_pages: u64,
    /// Frames charged to managed processes.
    pub frames_used: u64,
    /// Swap slots in use.
    pub slots_used: u64,
    /// Swap slots in all devices.
    pub slots_total: u64,
    /// Workers (LocalManagers).
    pub workers: usize,
    /// How idle workers wait: the config's `waker` (`eventfd`, `eventfd+pmqos`, `spin`).
    #[serde(default)]
    pub waker: String,
    /// What serves faults: `uthreads` (workees on the workers) or `threads` (OS threads).
    #[serde(default)]
    pub fault_runner: String,
    /// Processes admitted since start.
    pub admitted: u64,
    /// Processes refused since start (unconfigured, bad Hello, ...).
    pub refused: u64,
    /// Malformed messages seen on sessions.
    pub bad_messages: u64,
    /// Faults served over the pool after waiting for a frame too long.
    pub overcommits: u64,
    /// Faults being served right now.
    pub faults_in_flight: u64,
    /// Pages read back ahead of a fault by `PREFETCH=N` hints, since start.
    #[serde(default)]
    pub prefetches: u64,
    /// Fault latency over every process since start.
    pub latency: Latency,
    /// The same as a histogram (cumulative; see the module docs).
    #[serde(default)]
    pub latency_buckets: LatencyBuckets,
    /// Counters over every process since start, ended ones included.
    #[serde(default)]
    pub totals: Totals,
    /// Managed processes now.
    pub processes: Vec<ProcessStat>,
    /// Processes that ended, folded in (so `usm exec` can summarise after exit).
    pub ended: Vec<ProcessStat>,
}

impl DaemonStat {
    /// Sum of a counter over live and ended processes.
    pub fn total(&self, f: impl Fn(&ProcessStat) -> u64) -> u64 {
        self.processes.iter().chain(&self.ended).map(f).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values_ns: &[u64]) -> Histogram<u64> {
        let mut h = new_histogram().unwrap();
        for &v in values_ns {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn buckets_give_interval_percentiles_within_a_bucket() {
        // First interval: 1000 fast faults (2 µs); second: 100 slow ones (500 µs).
        let first: Vec<u64> = vec![2_000; 1000];
        let before = LatencyBuckets::of(&hist(&first));
        let mut all = first.clone();
        all.extend(vec![500_000u64; 100]);
        let after = LatencyBuckets::of(&hist(&all));
        assert_eq!(before.count(), 1000);
        assert_eq!(after.count(), 1100);
        let interval = after.since(&before);
        assert_eq!(interval.count(), 100);
        let p50 = interval.quantile_us(0.5).unwrap();
        assert!((p50 - 500.0).abs() / 500.0 < 0.05, "interval p50 {p50}");
        // Cumulative, the median is still the fast faults.
        let cum = after.quantile_us(0.5).unwrap();
        assert!((cum - 2.0).abs() / 2.0 < 0.05, "cumulative p50 {cum}");
        let p99 = after.quantile_us(0.99).unwrap();
        assert!((p99 - 500.0).abs() / 500.0 < 0.05, "p99 {p99}");
        assert_eq!(LatencyBuckets::default().quantile_us(0.5), None);
        assert_eq!(after.since(&after).count(), 0);
    }

    #[test]
    fn buckets_survive_json() {
        let b = LatencyBuckets::of(&hist(&[1_000, 1_000, 3_000, 90_000]));
        let s = serde_json::to_string(&b).unwrap();
        let back: LatencyBuckets = serde_json::from_str(&s).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.count(), 4);
    }
}
