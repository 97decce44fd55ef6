//! Kernel sides of the fault benchmarks (issue 6, benchmarks 2 and 3).
//!
//! - [`kernel_fault_latency`]: the kernel's first-touch fault of one 4 KiB anonymous page,
//!   timed one fault at a time (`MADV_NOHUGEPAGE`, one volatile write per page), p50/p99.
//! - [`kernel_first_touch`]: first touch of a region of a few GiB, sequential or random
//!   4 KiB order, with the kernel at 4 KiB, mTHP at a size, or THP 2 MiB: faults taken
//!   (`RUSAGE_THREAD` minflt), GiB/s, wall and CPU time, and the folios the kernel really
//!   allocated at that size (`hugepages-<N>kB/stats/anon_fault_alloc` delta).
//!
//! Page-size sides are made with [`PageSizeConfig`]: the global THP knob at `madvise`,
//! every mTHP size `never` except the one under test (`madvise`), and `MADV_HUGEPAGE` on the
//! region — so the kernel cannot pick a larger size than the side names. The 4 KiB side
//! sets every size `never` and uses `MADV_NOHUGEPAGE`. All knobs are restored on drop.
//! The host backing is pre-warmed before every side ([`crate::prewarm`]).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::guard::{MthpMode, MthpSetting, ThpMode, ThpSetting, mthp_sizes_kib};
use crate::stats::{
    LatencyHistogram, LatencySummary, RunSummary, measure_thread, warmup_then_runs,
};
use crate::sys::{Advice, AnonMemory};

const PAGE: usize = 4096;

/// A kernel page-size side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelPageSize {
    /// Base pages only.
    Base4K,
    /// mTHP folios of this many KiB (16, 32, 64, ... below the PMD size).
    Mthp(u32),
    /// PMD-sized THP (2 MiB on x86-64).
    Thp2M,
}

impl KernelPageSize {
    /// Label used in tables and JSON (`kernel-4K`, `kernel-mTHP-64K`, `kernel-THP-2M`).
    pub fn label(&self) -> String {
        match self {
            KernelPageSize::Base4K => "kernel-4K".into(),
            KernelPageSize::Mthp(k) => format!("kernel-mTHP-{k}K"),
            KernelPageSize::Thp2M => "kernel-THP-2M".into(),
        }
    }

    /// The folio size in KiB.
    pub fn size_kib(&self) -> u32 {
        match self {
            KernelPageSize::Base4K => 4,
            KernelPageSize::Mthp(k) => *k,
            KernelPageSize::Thp2M => 2048,
        }
    }
}

/// The sysfs configuration of one page-size side, restored on drop.
#[derive(Debug)]
pub struct PageSizeConfig {
    side: KernelPageSize,
    _thp: ThpSetting,
    _sizes: Vec<MthpSetting>,
}

impl PageSizeConfig {
    /// Configures the kernel so anonymous `MADV_HUGEPAGE` memory gets exactly `side`.
    ///
    /// Errors with [`Error::Unavailable`] when an mTHP size has no knob here.
    pub fn apply(side: KernelPageSize) -> Result<Self> {
        let sizes = mthp_sizes_kib();
        let want = side.size_kib();
        if want != 4 && !sizes.contains(&want) && !(want == 2048 && sizes.is_empty()) {
            return Err(Error::Unavailable {
                facility: "mTHP size",
                reason: format!("no hugepages-{want}kB knob (have {sizes:?})"),
            });
        }
        let thp = ThpSetting::set_enabled(ThpMode::Madvise)?;
        let mut guards = Vec::new();
        for s in sizes {
            let mode = if s == want {
                MthpMode::Madvise
            } else {
                MthpMode::Never
            };
            guards.push(MthpSetting::set(s, mode)?);
        }
        Ok(Self {
            side,
            _thp: thp,
            _sizes: guards,
        })
    }

    /// The side.
    pub fn side(&self) -> KernelPageSize {
        self.side
    }

    /// The madvise a region must get for this side.
    pub fn advice(&self) -> Advice {
        match self.side {
            KernelPageSize::Base4K => Advice::NoHugePage,
            _ => Advice::HugePage,
        }
    }
}

/// Result of [`kernel_fault_latency`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultLatencyResult {
    /// Side label (`kernel-4K`).
    pub side: String,
    /// Per-fault latency, timer included.
    pub latency: LatencySummary,
    /// Median cost of the timer pair alone (subtract for the bare fault).
    pub timer_overhead_ns: u64,
    /// Faults the thread took while measuring (should equal `latency.count`).
    pub faults_taken: u64,
    /// Bytes of host pre-warming done before the measurement.
    pub prewarmed_bytes: u64,
}

/// Times `pages` single 4 KiB first-touch faults of the kernel (after `warmup_pages`
/// untimed ones), one at a time, on pre-warmed host memory.
pub fn kernel_fault_latency(pages: usize, warmup_pages: usize) -> Result<FaultLatencyResult> {
    let total = pages + warmup_pages;
    let prewarm = crate::prewarm::prewarm_host((total * PAGE) as u64 + (64 << 20))?;
    let cfg = PageSizeConfig::apply(KernelPageSize::Base4K)?;
    let mut mem = AnonMemory::new(total * PAGE)?;
    mem.advise(cfg.advice())?;
    let mut hist = LatencyHistogram::new()?;
    let mut timer = LatencyHistogram::new()?;
    for _ in 0..10_000 {
        let t0 = Instant::now();
        let t1 = Instant::now();
        timer.record(t1 - t0);
    }
    for p in 0..warmup_pages {
        mem.touch(p * PAGE, 1);
    }
    let (_, cost) = measure_thread(|| {
        for p in warmup_pages..total {
            let t0 = Instant::now();
            mem.touch(p * PAGE, 1);
            hist.record(t0.elapsed());
        }
    })?;
    // Every page really faulted in: read back what was written.
    if (warmup_pages..total).any(|p| mem.peek(p * PAGE) != 1) {
        return Err(Error::Corruption("first-touch page lost its write".into()));
    }
    drop(cfg);
    Ok(FaultLatencyResult {
        side: KernelPageSize::Base4K.label(),
        latency: hist.summary(),
        timer_overhead_ns: timer.summary().p50_ns,
        faults_taken: cost.minor_faults,
        prewarmed_bytes: prewarm.bytes,
    })
}

/// Order of the first touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TouchOrder {
    /// Ascending 4 KiB pages.
    Sequential,
    /// A fixed pseudo-random permutation of the 4 KiB pages.
    Random,
}

impl TouchOrder {
    /// `seq` / `rand`.
    pub fn label(&self) -> &'static str {
        match self {
            TouchOrder::Sequential => "seq",
            TouchOrder::Random => "rand",
        }
    }
}

/// Parameters of [`kernel_first_touch`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirstTouchSpec {
    /// Region size in bytes.
    pub bytes: u64,
    /// Touch order.
    pub order: TouchOrder,
    /// Untimed runs before the measured ones.
    pub warmup: usize,
    /// Measured runs (the median is reported).
    pub runs: usize,
    /// Seed of the random permutation.
    pub seed: u64,
}

/// Result of one first-touch side (medians over the runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirstTouchResult {
    /// Side label.
    pub side: String,
    /// `seq` / `rand`.
    pub order: String,
    /// Region size.
    pub bytes: u64,
    /// Faults taken (median of runs).
    pub faults: f64,
    /// Folios of the side's size the kernel allocated per run (median; 0 for 4 KiB).
    pub folios_allocated: f64,
    /// GiB per wall-clock second.
    pub gib_per_s: RunSummary,
    /// Wall seconds.
    pub wall_s: RunSummary,
    /// CPU seconds of the touching thread.
    pub cpu_s: RunSummary,
    /// CPU seconds stolen from the VM (all vCPUs) during a run.
    pub steal_s: RunSummary,
}

/// A fixed permutation of `0..n` (xorshift-driven Fisher-Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// First touch of `spec.bytes` with the kernel configured as `side` (host pre-warmed
/// before every run). The caller runs sides one after another; each side sets and restores
/// its own knobs.
pub fn kernel_first_touch(side: KernelPageSize, spec: &FirstTouchSpec) -> Result<FirstTouchResult> {
    let cfg = PageSizeConfig::apply(side)?;
    let pages = (spec.bytes as usize).div_ceil(PAGE);
    let order: Vec<u32> = match spec.order {
        TouchOrder::Sequential => (0..pages as u32).collect(),
        TouchOrder::Random => permutation(pages, spec.seed),
    };
    let stat_kib = match side {
        KernelPageSize::Base4K => None,
        other => Some(other.size_kib()),
    };
    let runs = warmup_then_runs(spec.warmup, spec.runs, |_| {
        crate::prewarm::prewarm_host(spec.bytes + (64 << 20))?;
        let mut mem = AnonMemory::new(pages * PAGE)?;
        mem.advise(cfg.advice())?;
        let alloc0 = stat_kib.map_or(0, |k| crate::guard::mthp_stat(k, "anon_fault_alloc"));
        let (_, cost) = measure_thread(|| {
            for &p in &order {
                mem.touch(p as usize * PAGE, 1);
            }
        })?;
        let alloc1 = stat_kib.map_or(0, |k| crate::guard::mthp_stat(k, "anon_fault_alloc"));
        Ok((cost, alloc1.saturating_sub(alloc0)))
    })?;
    drop(cfg);
    let gib = spec.bytes as f64 / (1u64 << 30) as f64;
    let walls: Vec<f64> = runs.iter().map(|(c, _)| c.wall_s).collect();
    let cpus: Vec<f64> = runs.iter().map(|(c, _)| c.cpu_s).collect();
    let rates: Vec<f64> = walls.iter().map(|w| gib / w).collect();
    let faults: Vec<f64> = runs.iter().map(|(c, _)| c.minor_faults as f64).collect();
    let folios: Vec<f64> = runs.iter().map(|(_, f)| *f as f64).collect();
    let steals: Vec<f64> = runs.iter().map(|(c, _)| c.steal_s).collect();
    Ok(FirstTouchResult {
        side: side.label(),
        order: spec.order.label().into(),
        bytes: spec.bytes,
        faults: crate::stats::median(&faults),
        folios_allocated: crate::stats::median(&folios),
        gib_per_s: RunSummary::of(&rates),
        wall_s: RunSummary::of(&walls),
        cpu_s: RunSummary::of(&cpus),
        steal_s: RunSummary::of(&steals),
    })
}

/// The kernel sides available here for the first-touch benchmark: 4 KiB, mTHP 16K and 64K
/// when their knobs exist, THP 2 MiB.
pub fn available_kernel_sides() -> Vec<KernelPageSize> {
    let sizes = mthp_sizes_kib();
    let mut v = vec![KernelPageSize::Base4K];
    for k in [16, 64] {
        if sizes.contains(&k) {
            v.push(KernelPageSize::Mthp(k));
        }
    }
    v.push(KernelPageSize::Thp2M);
    v
}

/// Ratios of one first-touch side against the kernel at 4 KiB (same order, same size).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirstTouchRatio {
    /// Side label.
    pub side: String,
    /// `seq` / `rand`.
    pub order: String,
    /// Faults taken / kernel-4K faults (USM's goal with `fhp:64K`: ≤ 1/16).
    pub faults_vs_kernel: Option<f64>,
    /// GiB/s / kernel-4K GiB/s (goal ≥ 2).
    pub gib_per_s_vs_kernel: Option<f64>,
    /// CPU seconds / kernel-4K CPU seconds.
    pub cpu_s_vs_kernel: Option<f64>,
}

/// Ratios of every side of `results` against `kernel-4K` of the same order (kernel or USM
/// sides alike, so USM's `FirstTouchResult`s can be appended and ratioed in one call).
pub fn first_touch_ratios(results: &[FirstTouchResult]) -> Vec<FirstTouchRatio> {
    let base = KernelPageSize::Base4K.label();
    results
        .iter()
        .filter(|r| r.side != base)
        .map(|r| {
            let k = results
                .iter()
                .find(|b| b.side == base && b.order == r.order);
            let f = |num: f64, g: fn(&FirstTouchResult) -> f64| {
                k.and_then(|k| crate::stats::ratio_vs_kernel(num, g(k)))
            };
            FirstTouchRatio {
                side: r.side.clone(),
                order: r.order.clone(),
                faults_vs_kernel: f(r.faults, |k| k.faults),
                gib_per_s_vs_kernel: f(r.gib_per_s.median, |k| k.gib_per_s.median),
                cpu_s_vs_kernel: f(r.cpu_s.median, |k| k.cpu_s.median),
            }
        })
        .collect()
}

/// The 1-, 5- and 15-minute load averages from `/proc/loadavg` (recorded with the
/// figures: this machine is shared, and a loaded run says so).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}
