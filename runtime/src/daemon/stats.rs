//! Counters of the daemon and of each managed process, and the snapshot `usm stat`,
//! `usm exec`'s summary and the Prometheus exposition all read (one source of numbers).

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
}

/// The whole daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonStat {
    /// Daemon pid.
    pub pid: u32,
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
