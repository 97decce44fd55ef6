//! The swap-storm benchmark (issue 6, benchmark 1): workload, kernel modes, and the hook
//! USM's modes plug into.
//!
//! # Workload (independent of any runtime)
//! A fixed mix ([`TaskMix`]) of
//! - **memory tasks**: each owns a shard of a working set larger than the memory budget
//!   (plain `&mut [u8]`, so the data may live in anonymous memory or in a USM region). A
//!   step picks a uniformly random 4 KiB page of the shard and either reads it and checks
//!   its checksum against the table of what was last written (read), or fills it with a
//!   fresh pattern and records the new checksum (write, `write_percent` of steps); then it
//!   computes [`think_rounds`] rounds of the compute kernel. A mismatch is
//!   [`Error::Corruption`].
//! - **CPU tasks**: a step is [`CPU_OP_ROUNDS`] rounds of the same compute kernel.
//!
//! The **memory intensity** knob `i ∈ (0, 1]` sets the compute between two page accesses
//! of a memory task: `PAGE_WORK_ROUNDS × (1/i − 1)` rounds, where [`PAGE_WORK_ROUNDS`] is
//! about the cost of one resident page access here. `i = 1` is back-to-back accesses; the
//! sweep reports the whole curve. Throughput counters ([`StormCounters`]) are sampled every
//! `sample_ms` to give throughput over time.
//!
//! # Modes
//! A mode implements [`StormMode`] and produces one [`StormPoint`] per (intensity, medium):
//! - (a′) [`KernelThreadsMode`]: as many OS threads as memory tasks (plus one per CPU
//!   task), pinned to the same worker cores, data in plain anonymous memory
//!   (`MADV_NOHUGEPAGE`), in a child process placed in a memory cgroup limited to the
//!   budget before it allocates, kernel swap on a swap file on the project disk or on zram
//!   ([`KernelSwapEnv`]).
//! - (a) kernel swap under the uThread runtime, (b) USM with synchronous swap-in, (c) USM
//!   with `Yield`: implemented next to the runtime. They reuse [`MemoryTask`], [`CpuTask`],
//!   [`StormCounters`], [`sample_throughput`]; (a) reuses [`KernelSwapEnv`] so its kernel
//!   swap and cgroup are identical to (a′); (b)/(c) get the medium from [`StormContext`]
//!   and run in a cgroup of budget plus their measured overhead. Run them in a child with
//!   [`ChildLauncher::run`] and a handler registered in [`crate::child::serve_if_child`].
//!
//! [`run_sweep`] runs every mode at every intensity on one medium and computes the
//! `…_vs_kernel` ratios (against (a) when present, else (a′)) and `…_vs_kernel_threads`
//! (against (a′)).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::child::ChildLauncher;
use crate::error::{Error, Result};
use crate::guard::{CgroupStats, MemCgroup, SwapFile, ZramSwap};
use crate::plot::{Headline, LinePlot, Series};
use crate::stats::{LatencyHistogram, LatencySummary};
use crate::sys::{Advice, AnonMemory};

/// Child kind of the (a′) mode.
pub const STORM_THREADS_CHILD: &str = "storm-threads";

/// Compute-kernel rounds costing about one resident 4 KiB page access + checksum here.
pub const PAGE_WORK_ROUNDS: u32 = 512;

/// Compute-kernel rounds of one CPU-task operation (~50 µs here).
pub const CPU_OP_ROUNDS: u32 = 1 << 15;

const PAGE: usize = 4096;

/// The fixed compute kernel: `rounds` dependent multiply-xorshift steps on `state`.
#[inline]
pub fn compute_rounds(state: &mut u64, rounds: u32) {
    let mut x = *state;
    for _ in 0..rounds {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x ^= x >> 29;
    }
    *state = std::hint::black_box(x);
}

/// Compute rounds between two page accesses of a memory task at intensity `i`.
pub fn think_rounds(intensity: f64) -> u32 {
    let i = intensity.clamp(1e-3, 1.0);
    (f64::from(PAGE_WORK_ROUNDS) * (1.0 / i - 1.0)).round() as u32
}

/// The task mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMix {
    /// Memory tasks (uThreads in USM; OS threads in (a′)).
    pub memory_tasks: usize,
    /// CPU-bound tasks.
    pub cpu_tasks: usize,
}

/// Everything that defines one swap-storm run except the mode, medium and intensity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormSpec {
    /// Memory budget (cgroup limit for the kernel modes, pool for USM).
    pub budget_bytes: u64,
    /// Working set of all memory tasks together (larger than the budget).
    pub working_set_bytes: u64,
    /// The task mix.
    pub mix: TaskMix,
    /// Worker cores (cores `0..workers`).
    pub workers: usize,
    /// Measured duration per point.
    pub duration_ms: u64,
    /// Throughput sampling interval.
    pub sample_ms: u64,
    /// Percentage of memory steps that write.
    pub write_percent: u32,
    /// Seed of every task's generator.
    pub seed: u64,
}

impl StormSpec {
    /// The default point: 192 MiB budget, 384 MiB working set (2× the budget), 16 memory
    /// + 4 CPU tasks on 2 workers, 50% writes, 3 s per point.
    pub fn default_mix() -> Self {
        Self {
            budget_bytes: 192 << 20,
            working_set_bytes: 384 << 20,
            mix: TaskMix {
                memory_tasks: 16,
                cpu_tasks: 4,
            },
            workers: 2,
            duration_ms: 3000,
            sample_ms: 100,
            write_percent: 50,
            seed: 0x5eed_0006,
        }
    }

    /// A smaller, shorter variant for `--quick`.
    pub fn quick() -> Self {
        Self {
            budget_bytes: 96 << 20,
            working_set_bytes: 192 << 20,
            duration_ms: 1500,
            ..Self::default_mix()
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.mix.memory_tasks == 0 || self.workers == 0 {
            return Err(Error::Invalid("need memory tasks and workers".into()));
        }
        if self.working_set_bytes / (PAGE as u64) < self.mix.memory_tasks as u64 {
            return Err(Error::Invalid(
                "working set smaller than one page per task".into(),
            ));
        }
        Ok(())
    }
}

/// Shared throughput counters of a run.
#[derive(Debug, Default)]
pub struct StormCounters {
    /// Memory-task steps completed.
    pub memory_ops: AtomicU64,
    /// CPU-task steps completed.
    pub cpu_ops: AtomicU64,
    /// Set when tasks must stop.
    pub stop: AtomicBool,
}

/// A CPU-bound task.
#[derive(Debug, Clone)]
pub struct CpuTask {
    state: u64,
}

impl CpuTask {
    /// A task seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed | 1 }
    }

    /// One operation: [`CPU_OP_ROUNDS`] rounds of the compute kernel.
    pub fn step(&mut self) {
        compute_rounds(&mut self.state, CPU_OP_ROUNDS);
    }
}

/// A memory-intensive task over its own shard of the working set.
#[derive(Debug)]
pub struct MemoryTask<'a> {
    pages: &'a mut [u8],
    sums: Vec<u64>,
    rng: u64,
    think: u32,
    think_state: u64,
    write_percent: u32,
    /// Latency of each page access (fault, swap-in or hit), ns.
    pub latency: LatencyHistogram,
    /// Reads whose checksum was verified.
    pub verified_reads: u64,
}

fn checksum(page: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in page.chunks_exact(8) {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
    }
    h
}

fn fill(page: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for w in page.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

impl<'a> MemoryTask<'a> {
    /// A task over `shard` (whole 4 KiB pages), seeded, at memory `intensity`.
    pub fn new(shard: &'a mut [u8], seed: u64, intensity: f64, write_percent: u32) -> Result<Self> {
        let n = shard.len() / PAGE;
        Ok(Self {
            pages: shard,
            sums: vec![0; n],
            rng: seed | 1,
            think: think_rounds(intensity),
            think_state: seed,
            write_percent: write_percent.min(100),
            latency: LatencyHistogram::new()?,
            verified_reads: 0,
        })
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn page_count(&self) -> usize {
        self.sums.len()
    }

    /// Writes every page once (the initial data set; pushes the excess to swap).
    pub fn populate(&mut self) {
        for p in 0..self.page_count() {
            let seed = self.next();
            let page = &mut self.pages[p * PAGE..(p + 1) * PAGE];
            fill(page, seed);
            self.sums[p] = checksum(page);
        }
    }

    /// One step: a random page read-and-verify or write, then the think compute.
    pub fn step(&mut self) -> Result<()> {
        let r = self.next();
        let p = (r % self.page_count() as u64) as usize;
        let write = ((r >> 40) % 100) < u64::from(self.write_percent);
        let t0 = Instant::now();
        if write {
            let seed = self.next();
            let page = &mut self.pages[p * PAGE..(p + 1) * PAGE];
            fill(page, seed);
            self.sums[p] = checksum(page);
        } else {
            let sum = checksum(&self.pages[p * PAGE..(p + 1) * PAGE]);
            if sum != self.sums[p] {
                return Err(Error::Corruption(format!(
                    "page {p}: checksum {sum:#x}, expected {:#x}",
                    self.sums[p]
                )));
            }
            self.verified_reads += 1;
        }
        self.latency.record(t0.elapsed());
        compute_rounds(&mut self.think_state, self.think);
        Ok(())
    }

    /// Reads and verifies every page (slow under swap; for tests).
    pub fn verify_all(&self) -> Result<()> {
        for (p, want) in self.sums.iter().enumerate() {
            let sum = checksum(&self.pages[p * PAGE..(p + 1) * PAGE]);
            if sum != *want {
                return Err(Error::Corruption(format!(
                    "page {p}: {sum:#x} != {want:#x}"
                )));
            }
        }
        Ok(())
    }
}

/// One throughput sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThroughputSample {
    /// Seconds since the measurement started (end of the interval).
    pub t_s: f64,
    /// Memory-task ops/s over the interval.
    pub memory_ops_per_s: f64,
    /// CPU-task ops/s over the interval.
    pub cpu_ops_per_s: f64,
}

/// Samples `counters` every `interval` for `duration`, then sets `stop`. Returns the
/// samples and the exact elapsed time.
pub fn sample_throughput(
    counters: &StormCounters,
    interval: Duration,
    duration: Duration,
) -> (Vec<ThroughputSample>, Duration) {
    let start = Instant::now();
    let mut samples = Vec::new();
    let (mut last_t, mut last_m, mut last_c) = (
        start,
        counters.memory_ops.load(Ordering::Relaxed),
        counters.cpu_ops.load(Ordering::Relaxed),
    );
    while start.elapsed() < duration {
        std::thread::sleep(
            interval
                .min(duration.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(1)),
        );
        let now = Instant::now();
        // A last sliver shorter than half an interval would only add noise.
        if now - last_t < interval / 2 {
            continue;
        }
        let m = counters.memory_ops.load(Ordering::Relaxed);
        let c = counters.cpu_ops.load(Ordering::Relaxed);
        let dt = (now - last_t).as_secs_f64().max(1e-9);
        samples.push(ThroughputSample {
            t_s: (now - start).as_secs_f64(),
            memory_ops_per_s: (m - last_m) as f64 / dt,
            cpu_ops_per_s: (c - last_c) as f64 / dt,
        });
        (last_t, last_m, last_c) = (now, m, c);
    }
    counters.stop.store(true, Ordering::SeqCst);
    (samples, start.elapsed())
}

/// One point of the curve: one mode, one medium, one intensity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormPoint {
    /// Mode label.
    pub mode: String,
    /// Medium label (`swapfile`, `zram`).
    pub medium: String,
    /// Memory intensity.
    pub intensity: f64,
    /// Measured seconds.
    pub elapsed_s: f64,
    /// Memory-task ops in the measured window.
    pub memory_ops: u64,
    /// CPU-task ops in the measured window.
    pub cpu_ops: u64,
    /// Memory-task throughput.
    pub memory_ops_per_s: f64,
    /// CPU-task throughput.
    pub cpu_ops_per_s: f64,
    /// Page-access latency of memory tasks (a hit, a fault, or a swap-in).
    pub access_latency: LatencySummary,
    /// Reads verified against their checksum.
    pub verified_reads: u64,
    /// Major faults of the workload process during the measured window.
    pub major_faults: u64,
    /// Minor faults of the workload process during the measured window.
    pub minor_faults: u64,
    /// CPU seconds of the workload process during the measured window.
    pub cpu_s: f64,
    /// CPU seconds stolen from the VM (all vCPUs) during the measured window.
    #[serde(default)]
    pub steal_s: f64,
    /// Seconds spent writing the initial data set.
    pub populate_s: f64,
    /// Throughput over time.
    pub samples: Vec<ThroughputSample>,
    /// Cgroup statistics after the run (kernel modes).
    pub cgroup: Option<CgroupStats>,
}

/// Payload of [`STORM_THREADS_CHILD`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormThreadsPayload {
    /// The run.
    pub spec: StormSpec,
    /// Memory intensity.
    pub intensity: f64,
}

fn pin_to_workers(workers: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    for c in 0..workers.min(ncpu).max(1) {
        set.set(c).map_err(|e| Error::sys("CpuSet::set", e))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| Error::sys("sched_setaffinity", e))
}

/// Runs the workload on plain OS threads over plain anonymous memory in *this* process
/// (the body of the (a′) child; callable directly for tests): one thread per task, each
/// pinned to cores `0..workers` (the caller's affinity is left alone). Mode and medium
/// labels are left empty for the caller.
pub fn run_storm_on_threads(spec: &StormSpec, intensity: f64) -> Result<StormPoint> {
    spec.validate()?;
    let m = spec.mix.memory_tasks;
    let pages_per_task = (spec.working_set_bytes as usize / PAGE) / m;
    let mut mem = AnonMemory::new(pages_per_task * m * PAGE)?;
    mem.advise(Advice::NoHugePage)?;
    let counters = StormCounters::default();
    let barrier = std::sync::Barrier::new(m + spec.mix.cpu_tasks + 1);
    let populate_start = Instant::now();
    let mut populate_s = 0.0;
    let mut window = (0.0, 0u64, 0u64);
    let mut samples = Vec::new();
    let mut elapsed = Duration::ZERO;
    let mut steal_s = 0.0;
    type TaskOut = Result<(LatencyHistogram, u64)>;
    let (results, memory_ops, cpu_ops): (Vec<TaskOut>, u64, u64) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, shard) in mem
            .as_mut_slice()
            .chunks_mut(pages_per_task * PAGE)
            .enumerate()
        {
            let (counters, barrier) = (&counters, &barrier);
            let seed = spec.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let wp = spec.write_percent;
            let workers = spec.workers;
            handles.push(s.spawn(move || -> Result<(LatencyHistogram, u64)> {
                // Every thread reaches the barrier, even when its set-up fails.
                let setup = pin_to_workers(workers)
                    .and_then(|()| MemoryTask::new(shard, seed, intensity, wp));
                let mut task = match setup {
                    Ok(mut task) => {
                        task.populate();
                        barrier.wait();
                        task
                    }
                    Err(e) => {
                        counters.stop.store(true, Ordering::SeqCst);
                        barrier.wait();
                        return Err(e);
                    }
                };
                let mut local = 0u64;
                let mut res = Ok(());
                while !counters.stop.load(Ordering::Relaxed) {
                    if let Err(e) = task.step() {
                        res = Err(e);
                        counters.stop.store(true, Ordering::SeqCst);
                        break;
                    }
                    local += 1;
                    if local == 8 {
                        counters.memory_ops.fetch_add(local, Ordering::Relaxed);
                        local = 0;
                    }
                }
                res.map(|()| (task.latency.clone(), task.verified_reads))
            }));
        }
        for i in 0..spec.mix.cpu_tasks {
            let (counters, barrier) = (&counters, &barrier);
            let seed = spec.seed ^ 0xc0ff_ee00 ^ i as u64;
            let workers = spec.workers;
            handles.push(s.spawn(move || -> Result<(LatencyHistogram, u64)> {
                let pinned = pin_to_workers(workers);
                let mut task = CpuTask::new(seed);
                barrier.wait();
                if let Err(e) = pinned {
                    counters.stop.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                while !counters.stop.load(Ordering::Relaxed) {
                    task.step();
                    counters.cpu_ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok((LatencyHistogram::new()?, 0))
            }));
        }
        barrier.wait();
        populate_s = populate_start.elapsed().as_secs_f64();
        let before = crate::stats::rusage(true);
        let steal0 = crate::stats::system_steal_s();
        let m0 = counters.memory_ops.load(Ordering::Relaxed);
        let c0 = counters.cpu_ops.load(Ordering::Relaxed);
        let (smp, el) = sample_throughput(
            &counters,
            Duration::from_millis(spec.sample_ms.max(1)),
            Duration::from_millis(spec.duration_ms),
        );
        let m1 = counters.memory_ops.load(Ordering::Relaxed);
        let c1 = counters.cpu_ops.load(Ordering::Relaxed);
        let after = crate::stats::rusage(true);
        steal_s = crate::stats::system_steal_s() - steal0;
        samples = smp;
        elapsed = el;
        if let (Ok(b), Ok(a)) = (before, after) {
            window = (a.0 - b.0, a.1.saturating_sub(b.1), a.2.saturating_sub(b.2));
        }
        let (mo, co) = (m1 - m0, c1 - c0);
        let out: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("task panicked".into())))
            })
            .collect();
        (out, mo, co)
    });
    let (cpu_s, minor, major) = (window.0, window.1, window.2);
    let mut latency = LatencyHistogram::new()?;
    let mut verified_reads = 0;
    for r in results {
        let (h, v) = r?;
        latency.merge(&h)?;
        verified_reads += v;
    }
    let secs = elapsed.as_secs_f64();
    Ok(StormPoint {
        mode: String::new(),
        medium: String::new(),
        intensity,
        elapsed_s: secs,
        memory_ops,
        cpu_ops,
        memory_ops_per_s: memory_ops as f64 / secs,
        cpu_ops_per_s: cpu_ops as f64 / secs,
        access_latency: latency.summary(),
        verified_reads,
        major_faults: major,
        minor_faults: minor,
        cpu_s,
        steal_s,
        populate_s,
        samples,
        cgroup: None,
    })
}

/// The (a′) child: [`run_storm_on_threads`] with the payload's spec and intensity.
pub(crate) fn storm_threads_child(payload: Value) -> Result<Value> {
    let p: StormThreadsPayload = serde_json::from_value(payload)?;
    let point = run_storm_on_threads(&p.spec, p.intensity)?;
    Ok(serde_json::to_value(point)?)
}

/// Where swapped pages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwapMedium {
    /// A swap file on the project disk (ext4).
    File,
    /// `/dev/zram0`.
    Zram,
}

impl SwapMedium {
    /// `swapfile` / `zram`.
    pub fn label(&self) -> &'static str {
        match self {
            SwapMedium::File => "swapfile",
            SwapMedium::Zram => "zram",
        }
    }
}

/// What every mode of a sweep shares.
#[derive(Debug, Clone)]
pub struct StormContext {
    /// The run definition.
    pub spec: StormSpec,
    /// The swap medium of this sweep.
    pub medium: SwapMedium,
    /// Directory for swap files (the project disk).
    pub swap_dir: PathBuf,
    /// How children are started.
    pub launcher: ChildLauncher,
    /// How long to wait for `/dev/zram0` when someone else holds it.
    pub zram_wait: Duration,
    /// Pre-warm the host backing before every point.
    pub prewarm: bool,
}

/// Kernel swap as set up for a kernel mode.
#[derive(Debug)]
pub enum KernelSwap {
    /// A swap file.
    File(SwapFile),
    /// zram.
    Zram(ZramSwap),
}

impl KernelSwap {
    /// Bytes in use now.
    pub fn used_bytes(&self) -> u64 {
        match self {
            KernelSwap::File(f) => f.used_bytes(),
            KernelSwap::Zram(z) => z.used_bytes(),
        }
    }
}

/// The kernel environment of a kernel mode: kernel swap on the context's medium, then a
/// memory cgroup limited to the budget. Dropped in reverse: cgroup first, then swap.
#[derive(Debug)]
pub struct KernelSwapEnv {
    /// The cgroup the workload process must be placed in before it allocates.
    pub cgroup: MemCgroup,
    /// The swap.
    pub swap: KernelSwap,
}

impl KernelSwapEnv {
    /// Sets up swap (working set + 64 MiB) and the cgroup (limit = budget).
    pub fn prepare(ctx: &StormContext, label: &str) -> Result<Self> {
        let swap_bytes = ctx.spec.working_set_bytes + (64 << 20);
        let swap = match ctx.medium {
            SwapMedium::File => KernelSwap::File(SwapFile::create(&ctx.swap_dir, swap_bytes, 10)?),
            SwapMedium::Zram => KernelSwap::Zram(ZramSwap::create(swap_bytes, 10, ctx.zram_wait)?),
        };
        let cgroup = MemCgroup::create(label, ctx.spec.budget_bytes)?;
        Ok(Self { cgroup, swap })
    }
}

/// Which kernel reference a mode is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelReference {
    /// (a): kernel swap under the uThread runtime — the denominator of `…_vs_kernel`.
    UThreads,
    /// (a′): plain OS threads — the denominator of `…_vs_kernel_threads`.
    Threads,
}

/// One way of running the swap-storm workload.
pub trait StormMode {
    /// Short label, e.g. `a'-kernel-threads`, `c-usm-yield`.
    fn label(&self) -> String;
    /// Whether this mode is a kernel reference.
    fn kernel_reference(&self) -> Option<KernelReference> {
        None
    }
    /// Runs one point (the implementation sets up and tears down its own swap/cgroup).
    fn run_point(&mut self, ctx: &StormContext, intensity: f64) -> Result<StormPoint>;
}

/// (a′): plain OS threads under kernel swap, in a child in a memory cgroup.
#[derive(Debug, Clone, Default)]
pub struct KernelThreadsMode;

impl StormMode for KernelThreadsMode {
    fn label(&self) -> String {
        "a'-kernel-threads".into()
    }

    fn kernel_reference(&self) -> Option<KernelReference> {
        Some(KernelReference::Threads)
    }

    fn run_point(&mut self, ctx: &StormContext, intensity: f64) -> Result<StormPoint> {
        if ctx.prewarm {
            crate::prewarm::prewarm_host(ctx.spec.working_set_bytes + (64 << 20))?;
        }
        let env = KernelSwapEnv::prepare(ctx, "storm-threads")?;
        let payload = StormThreadsPayload {
            spec: ctx.spec.clone(),
            intensity,
        };
        let value = ctx
            .launcher
            .run(STORM_THREADS_CHILD, &payload, Some(&env.cgroup))?;
        let mut point: StormPoint = serde_json::from_value(value)?;
        point.mode = self.label();
        point.medium = ctx.medium.label().into();
        point.cgroup = Some(env.cgroup.stats()?);
        drop(env);
        Ok(point)
    }
}

/// Ratios of one mode against the kernel references at one intensity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormRatio {
    /// The mode.
    pub mode: String,
    /// The medium.
    pub medium: String,
    /// Intensity.
    pub intensity: f64,
    /// CPU-task throughput / kernel reference ((a) if measured, else (a′)).
    pub cpu_throughput_vs_kernel: Option<f64>,
    /// Memory-task throughput / kernel reference.
    pub memory_throughput_vs_kernel: Option<f64>,
    /// CPU-task throughput / (a′).
    pub cpu_throughput_vs_kernel_threads: Option<f64>,
    /// Memory-task throughput / (a′).
    pub memory_throughput_vs_kernel_threads: Option<f64>,
}

/// A sweep on one medium.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormSweep {
    /// The run definition.
    pub spec: StormSpec,
    /// The medium.
    pub medium: String,
    /// Every point, intensity-major.
    pub points: Vec<StormPoint>,
    /// Modes that could not run, with the reason.
    pub skipped: Vec<String>,
    /// Ratios of non-reference modes (and of (a) against (a′)).
    pub ratios: Vec<StormRatio>,
}

/// Runs every mode at every intensity (modes interleaved per intensity, so slow drift of
/// the machine hits all modes alike) and computes the ratios.
pub fn run_sweep(
    modes: &mut [Box<dyn StormMode>],
    ctx: &StormContext,
    intensities: &[f64],
) -> Result<StormSweep> {
    let mut points = Vec::new();
    let mut skipped = Vec::new();
    let mut ratios = Vec::new();
    for &i in intensities {
        let mut here: Vec<(Option<KernelReference>, StormPoint)> = Vec::new();
        for mode in modes.iter_mut() {
            let mut result = mode.run_point(ctx, i);
            if let Err(e) = &result
                && e.is_child_killed()
            {
                // Seen once with kernel swap on zram (memcg v1 OOM kill in (a)): a failure
                // of that run, so the point is measured again rather than the sweep lost.
                println!("{} at {i}: {e}; running the point again", mode.label());
                result = mode.run_point(ctx, i);
            }
            match result {
                Ok(p) => here.push((mode.kernel_reference(), p)),
                Err(e) if e.is_unavailable() || e.is_busy() => {
                    skipped.push(format!("{} at {i}: {e}", mode.label()))
                }
                Err(e) => return Err(e),
            }
        }
        let find = |r| here.iter().find(|(k, _)| *k == Some(r)).map(|(_, p)| p);
        let threads = find(KernelReference::Threads);
        let kernel = find(KernelReference::UThreads).or(threads);
        for (k, p) in &here {
            if *k == Some(KernelReference::Threads) {
                continue;
            }
            let r = |num: f64, den: Option<&StormPoint>, f: fn(&StormPoint) -> f64| {
                den.and_then(|d| crate::stats::ratio_vs_kernel(num, f(d)))
            };
            let is_a = *k == Some(KernelReference::UThreads);
            ratios.push(StormRatio {
                mode: p.mode.clone(),
                medium: p.medium.clone(),
                intensity: i,
                cpu_throughput_vs_kernel: if is_a {
                    None
                } else {
                    r(p.cpu_ops_per_s, kernel, |d| d.cpu_ops_per_s)
                },
                memory_throughput_vs_kernel: if is_a {
                    None
                } else {
                    r(p.memory_ops_per_s, kernel, |d| d.memory_ops_per_s)
                },
                cpu_throughput_vs_kernel_threads: r(p.cpu_ops_per_s, threads, |d| d.cpu_ops_per_s),
                memory_throughput_vs_kernel_threads: r(p.memory_ops_per_s, threads, |d| {
                    d.memory_ops_per_s
                }),
            });
        }
        points.extend(here.into_iter().map(|(_, p)| p));
    }
    Ok(StormSweep {
        spec: ctx.spec.clone(),
        medium: ctx.medium.label().into(),
        points,
        skipped,
        ratios,
    })
}

/// Which throughput a plot shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotMetric {
    /// CPU-task ops/s.
    Cpu,
    /// Memory-task ops/s.
    Memory,
}

/// Throughput-over-time plot of `points`: one line per point (mode, medium, intensity),
/// dated, with the headline ratio — (c) `c-usm-yield` over (a) `a-kernel-uthreads` at each
/// intensity, sample by sample — in a panel under the lines (goal: 2.26× for CPU, 1.0× for
/// memory throughput).
pub fn throughput_plot(points: &[&StormPoint], metric: PlotMetric, title: &str) -> LinePlot {
    let value = |s: &ThroughputSample| match metric {
        PlotMetric::Cpu => s.cpu_ops_per_s,
        PlotMetric::Memory => s.memory_ops_per_s,
    };
    let series = points
        .iter()
        .map(|p| Series {
            name: format!("{} {} i={}", p.mode, p.medium, p.intensity),
            points: p.samples.iter().map(|s| (s.t_s, value(s))).collect(),
        })
        .collect();
    let mut ratios = Vec::new();
    for c in points.iter().filter(|p| p.mode == "c-usm-yield") {
        let Some(a) = points.iter().find(|p| {
            p.mode == "a-kernel-uthreads" && p.intensity == c.intensity && p.medium == c.medium
        }) else {
            continue;
        };
        ratios.push(Series {
            name: format!("(c)/(a) {} i={}", c.medium, c.intensity),
            points: c
                .samples
                .iter()
                .zip(&a.samples)
                .filter(|(_, sa)| value(sa) > 0.0)
                .map(|(sc, sa)| (sc.t_s, value(sc) / value(sa)))
                .collect(),
        });
    }
    let (what, goal) = match metric {
        PlotMetric::Cpu => ("CPU", 2.26),
        PlotMetric::Memory => ("memory", 1.0),
    };
    LinePlot {
        title: title.into(),
        x_label: "time (s)".into(),
        y_label: match metric {
            PlotMetric::Cpu => "CPU-task ops/s".into(),
            PlotMetric::Memory => "memory-task ops/s".into(),
        },
        series,
        date: crate::report::now_utc(),
        headline: (!ratios.is_empty()).then(|| Headline {
            y_label: format!("(c)/(a) {what} throughput"),
            series: ratios,
            goal: Some(goal),
        }),
    }
}
