//! Counters and latency histograms of the memory-manager core, and their snapshot.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicU64, Ordering};

/// How a fault was served (one latency histogram each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum FaultPath {
    /// Pre-zeroed frame(s) moved in from the pool.
    FastMap,
    /// The page was in staging (write-back in flight or about to be): moved or copied back.
    SwapCacheHit,
    /// The page was read back from swap while the uThread waited in PFQ.
    SwapIn,
    /// A fault from a thread that is not a uThread, served while it waited on a futex.
    SyncWait,
    /// An access to a page moved out for access sampling: moved back at once.
    SampleRefault,
}

/// Event counters (monotonic).
#[derive(Debug, Default)]
pub struct Counters {
    /// Faults handed to the core (policy calls, waits and spurious ones).
    pub faults: AtomicU64,
    /// Pages mapped from the pool by `Map` decisions (fresh frames).
    pub pages_mapped: AtomicU64,
    /// Swap-cache hits served by moving the staged page back.
    pub swap_cache_moves: AtomicU64,
    /// Swap-cache hits served by copying (the in-flight write pinned the slot).
    pub swap_cache_copies: AtomicU64,
    /// Swap-ins started (including prefetches).
    pub swap_ins: AtomicU64,
    /// Of which prefetches of neighbours (`PREFETCH=N`).
    pub prefetches: AtomicU64,
    /// Swap-ins completed and installed.
    pub swap_ins_done: AtomicU64,
    /// Pages poisoned because their content could not be read back.
    pub poisoned: AtomicU64,
    /// Pages taken out to staging by eviction.
    pub evicted: AtomicU64,
    /// Write-backs completed (entry recorded).
    pub writebacks_done: AtomicU64,
    /// Clean pages evicted without I/O (their swap copy was still valid).
    pub clean_evictions: AtomicU64,
    /// Write-backs that failed (page kept in memory).
    pub writeback_errors: AtomicU64,
    /// Victims that could not be staged (pinned by I/O).
    pub evict_pinned: AtomicU64,
    /// Installs that fell back to `UFFDIO_COPY`.
    pub copy_fallbacks: AtomicU64,
    /// Multi-page moves that stopped early and were classified page by page.
    pub partial_moves: AtomicU64,
    /// Allocation-policy panics (the policy was replaced by the default one).
    pub policy_panics: AtomicU64,
    /// Accesses failed by the OOM policy.
    pub oom_failures: AtomicU64,
    /// Faults that had to wait for memory (eviction in flight).
    pub memory_waits: AtomicU64,
    /// Async operations dropped because their range went away or changed generation.
    pub fenced: AtomicU64,
    /// Faults a worker waited for itself, blocking its core (synchronous swap-in mode).
    pub worker_blocked: AtomicU64,
    /// Resident pages taken out for access sampling (moved to their slot, still resident).
    pub samples_taken: AtomicU64,
    /// Sampled pages accessed again (moved back by a cheap fault; reported as accessed).
    pub sample_refaults: AtomicU64,
    /// Victims that were already out for sampling (no MOVE needed to evict them).
    pub sampled_evictions: AtomicU64,
}

/// Latency histograms (nanoseconds) per [`FaultPath`].
#[derive(Debug)]
pub struct Histograms {
    fast_map: Histogram<u64>,
    swap_cache_hit: Histogram<u64>,
    swap_in: Histogram<u64>,
    sync_wait: Histogram<u64>,
    sample_refault: Histogram<u64>,
}

impl Histograms {
    fn new() -> Histograms {
        let h = || match Histogram::new_with_bounds(1, 60_000_000_000, 2) {
            Ok(h) => h,
            Err(_) => fallback_histogram(),
        };
        Histograms {
            fast_map: h(),
            swap_cache_hit: h(),
            swap_in: h(),
            sync_wait: h(),
            sample_refault: h(),
        }
    }

    fn get_mut(&mut self, path: FaultPath) -> &mut Histogram<u64> {
        match path {
            FaultPath::FastMap => &mut self.fast_map,
            FaultPath::SwapCacheHit => &mut self.swap_cache_hit,
            FaultPath::SwapIn => &mut self.swap_in,
            FaultPath::SyncWait => &mut self.sync_wait,
            FaultPath::SampleRefault => &mut self.sample_refault,
        }
    }
}

/// Bounds above are constants that `new_with_bounds` accepts; this auto-resizing one is
/// only a type-correct fallback (`new` fails only for a precision above 5).
fn fallback_histogram() -> Histogram<u64> {
    let mut h = Histogram::new(2).unwrap_or_else(|_| std::process::abort());
    h.auto(true);
    h
}

/// The core's statistics: counters plus histograms.
#[derive(Debug)]
pub struct MmStats {
    /// Counters.
    pub counters: Counters,
    histograms: Mutex<Histograms>,
}

impl Default for MmStats {
    fn default() -> Self {
        MmStats {
            counters: Counters::default(),
            histograms: Mutex::new(Histograms::new()),
        }
    }
}

impl MmStats {
    /// Records the latency of one fault served by `path`.
    pub fn record(&self, path: FaultPath, latency: Duration) {
        let ns = (latency.as_nanos().min(u128::from(u64::MAX)) as u64).max(1);
        let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        h.get_mut(path).saturating_record(ns);
    }

    /// Bumps a counter by one.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of everything.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        StatsSnapshot {
            faults: l(&c.faults),
            pages_mapped: l(&c.pages_mapped),
            swap_cache_moves: l(&c.swap_cache_moves),
            swap_cache_copies: l(&c.swap_cache_copies),
            swap_ins: l(&c.swap_ins),
            prefetches: l(&c.prefetches),
            swap_ins_done: l(&c.swap_ins_done),
            poisoned: l(&c.poisoned),
            evicted: l(&c.evicted),
            writebacks_done: l(&c.writebacks_done),
            clean_evictions: l(&c.clean_evictions),
            writeback_errors: l(&c.writeback_errors),
            evict_pinned: l(&c.evict_pinned),
            copy_fallbacks: l(&c.copy_fallbacks),
            partial_moves: l(&c.partial_moves),
            policy_panics: l(&c.policy_panics),
            oom_failures: l(&c.oom_failures),
            memory_waits: l(&c.memory_waits),
            fenced: l(&c.fenced),
            worker_blocked: l(&c.worker_blocked),
            samples_taken: l(&c.samples_taken),
            sample_refaults: l(&c.sample_refaults),
            sampled_evictions: l(&c.sampled_evictions),
            fast_map: Latency::of(&h.fast_map),
            swap_cache_hit: Latency::of(&h.swap_cache_hit),
            swap_in: Latency::of(&h.swap_in),
            sync_wait: Latency::of(&h.sync_wait),
            sample_refault: Latency::of(&h.sample_refault),
        }
    }
}

/// Latency summary of one path, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Largest.
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
            mean_ns: h.mean(),
        }
    }
}

/// A point-in-time copy of the core's statistics (see [`Counters`] for each field).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub faults: u64,
    pub pages_mapped: u64,
    pub swap_cache_moves: u64,
    pub swap_cache_copies: u64,
    pub swap_ins: u64,
    pub prefetches: u64,
    pub swap_ins_done: u64,
    pub poisoned: u64,
    pub evicted: u64,
    pub writebacks_done: u64,
    pub clean_evictions: u64,
    pub writeback_errors: u64,
    pub evict_pinned: u64,
    pub copy_fallbacks: u64,
    pub partial_moves: u64,
    pub policy_panics: u64,
    pub oom_failures: u64,
    pub memory_waits: u64,
    pub fenced: u64,
    pub worker_blocked: u64,
    pub samples_taken: u64,
    pub sample_refaults: u64,
    pub sampled_evictions: u64,
    /// Latency of faults served from the pool.
    pub fast_map: Latency,
    /// Latency of swap-cache hits.
    pub swap_cache_hit: Latency,
    /// Latency of faults that waited for a swap-in (fault seen → uThread resumable).
    pub swap_in: Latency,
    /// Latency of faults from plain threads (posted → futex released).
    pub sync_wait: Latency,
    /// Latency of accesses to pages out for access sampling.
    pub sample_refault: Latency,
}
