//! Engine statistics: counters, in-flight depth and latency histograms per operation.
//!
//! Latency is measured from the moment a request is queued to the moment its completion is
//! reaped, so it includes the time the caller took to submit and to reap (what a parked
//! workee actually waits).

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters and histograms of one engine (one ring). Serialises as a
/// [`StatsSnapshot`].
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Reads completed (successfully or not).
    pub reads: u64,
    /// Writes completed (successfully or not).
    pub writes: u64,
    /// Bytes read successfully.
    pub read_bytes: u64,
    /// Bytes written successfully.
    pub write_bytes: u64,
    /// Reads that failed or were short.
    pub read_errors: u64,
    /// Writes that failed or were short.
    pub write_errors: u64,
    /// Requests refused because the queue was full.
    pub queue_full: u64,
    /// Calls to `io_uring_enter` made by the engine.
    pub enters: u64,
    /// Requests performed inline on a synchronous device, without io_uring (see
    /// [`Engine`](crate::Engine), "Synchronous devices").
    pub inline_ios: u64,
    /// Requests queued or in the kernel right now.
    pub in_flight: u32,
    /// The largest `in_flight` seen.
    pub max_in_flight: u32,
    /// Read latency, nanoseconds.
    pub read_latency: Histogram<u64>,
    /// Write latency, nanoseconds.
    pub write_latency: Histogram<u64>,
}

/// A latency histogram summarised in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min_ns: u64,
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
    /// Mean.
    pub mean_ns: f64,
}

impl LatencySummary {
    /// Summarises `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            min_ns: h.min(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            mean_ns: h.mean(),
        }
    }
}

/// A serialisable copy of [`EngineStats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// See [`EngineStats::reads`].
    pub reads: u64,
    /// See [`EngineStats::writes`].
    pub writes: u64,
    /// See [`EngineStats::read_bytes`].
    pub read_bytes: u64,
    /// See [`EngineStats::write_bytes`].
    pub write_bytes: u64,
    /// See [`EngineStats::read_errors`].
    pub read_errors: u64,
    /// See [`EngineStats::write_errors`].
    pub write_errors: u64,
    /// See [`EngineStats::queue_full`].
    pub queue_full: u64,
    /// See [`EngineStats::enters`].
    pub enters: u64,
    /// See [`EngineStats::inline_ios`].
    pub inline_ios: u64,
    /// See [`EngineStats::in_flight`].
    pub in_flight: u32,
    /// See [`EngineStats::max_in_flight`].
    pub max_in_flight: u32,
    /// Read latency.
    pub read_latency: LatencySummary,
    /// Write latency.
    pub write_latency: LatencySummary,
}

fn histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    // 100 ns .. 100 s with 3 significant digits; out-of-range samples saturate.
    Histogram::new_with_bounds(100, 100_000_000_000, 3)
}

impl EngineStats {
    /// Empty counters and histograms.
    pub fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            reads: 0,
            writes: 0,
            read_bytes: 0,
            write_bytes: 0,
            read_errors: 0,
            write_errors: 0,
            queue_full: 0,
            enters: 0,
            inline_ios: 0,
            in_flight: 0,
            max_in_flight: 0,
            read_latency: histogram()?,
            write_latency: histogram()?,
        })
    }

    /// A serialisable copy.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            reads: self.reads,
            writes: self.writes,
            read_bytes: self.read_bytes,
            write_bytes: self.write_bytes,
            read_errors: self.read_errors,
            write_errors: self.write_errors,
            queue_full: self.queue_full,
            enters: self.enters,
            inline_ios: self.inline_ios,
            in_flight: self.in_flight,
            max_in_flight: self.max_in_flight,
            read_latency: LatencySummary::of(&self.read_latency),
            write_latency: LatencySummary::of(&self.write_latency),
        }
    }

    /// Clears counters and histograms (not `in_flight`), e.g. after a warm-up.
    pub fn reset(&mut self) {
        self.reads = 0;
        self.writes = 0;
        self.read_bytes = 0;
        self.write_bytes = 0;
        self.read_errors = 0;
        self.write_errors = 0;
        self.queue_full = 0;
        self.enters = 0;
        self.inline_ios = 0;
        self.max_in_flight = self.in_flight;
        self.read_latency.reset();
        self.write_latency.reset();
    }

    pub(crate) fn record_latency(hist: &mut Histogram<u64>, ns: u64) {
        hist.saturating_record(ns.max(1));
    }
}

impl Serialize for EngineStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}
