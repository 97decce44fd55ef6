//! Swap storm with co-located CPU tasks (issue 6, benchmark 1), every mode in one run.
//!
//! ```text
//! cargo bench -p usm-bench --bench swap_storm -- [--quick] [--json PATH] [--svg PATH]
//!     [--medium file|zram|both] [--intensities 1,0.25,0.05] [--duration-ms N]
//!     [--overhead-mib N] [--no-prewarm] [--no-pmqos] [--repeat N] [--no-access-sampling]
//!     [--round-budget N]
//! ```
//!
//! # Modes (DESIGN.md, "Benchmarks, defined fairly")
//! The workload is `usm_bench::storm`'s: a fixed mix of memory tasks (random 4 KiB page
//! reads verified against a checksum table, or rewrites) and CPU tasks, memory intensity
//! swept. Every mode runs in its own child process placed in a memory cgroup before it
//! allocates, on `spec.workers` cores, with the same settings: PM-QoS held at 0 µs by the
//! parent for all modes (`--no-pmqos` to drop it for all), and **no busy-polling** (the
//! uThread runtimes park idle workers on an eventfd; the OS threads block in the kernel).
//! - **(a) `a-kernel-uthreads`**: the same tasks as uThreads on `usm_localmanager`
//!   (pinned workers), data in plain anonymous memory (`MADV_NOHUGEPAGE`), cgroup limit =
//!   budget, kernel swap on the same medium ([`KernelSwapEnv`]): a fault on a swapped page
//!   blocks the worker, as in Shenango or Junction. This is the denominator of
//!   `…_vs_kernel`.
//! - **(a′) `a'-kernel-threads`**: the kernel-baseline mode (one OS thread per task).
//! - **(b) `b-usm-sync`**: (c)'s setup with `SwapInMode::Sync`: a worker whose uThread
//!   faults on a swapped page waits for that swap-in itself (blocked in `io_uring_enter`)
//!   and runs no other uThread meanwhile — the kernel-like behaviour inside USM.
//! - **(c) `c-usm-yield`**: the same tasks as uThreads on the embedded runtime, one managed
//!   region per memory task, pool = budget, USM swap on the same medium (a USM swap file in
//!   the same directory, written out with zeros before the run so ext4 has no unwritten
//!   extents to convert on first write — kernel swap maps a `fallocate`d file's blocks
//!   once at swapon and never pays that; or `/dev/zram0` formatted for USM), no kernel
//!   swap. Its cgroup
//!   limit is budget + its measured overhead: a probe run of (c) in a cgroup of budget +
//!   512 MiB measures the peak beyond the pool (heap, stacks, page tables, checksum tables);
//!   that plus 25% and 8 MiB is the allowance (`--overhead-mib` sets it instead).
//!
//! uThreads are cooperative, in (a), (b) and (c) alike: a memory task yields after every
//! page access, a CPU task every `--cpu-slice-rounds` (1024 rounds, ~1.5 µs; an op is
//! 32 768). The scheduler polls a worker's driver between rounds of up to `round_budget`
//! uThread runs (64; `--round-budget` sets it for (b)/(c)) and within a round right after
//! a fault and while I/O is in flight (at most every 100 µs).
//!
//! `--repeat N` runs every sweep N times (modes interleaved within each) and reports the
//! median of each figure and of each per-run ratio, besides every run's own figures.

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use usm_bench::child::ChildLauncher;
use usm_bench::guard::{self, MemCgroup};
use usm_bench::report::{JsonReport, Table, fmt_f};
use usm_bench::stats::LatencyHistogram;
use usm_bench::storm::{
    self, CPU_OP_ROUNDS, KernelReference, KernelSwapEnv, KernelThreadsMode, MemoryTask, PlotMetric,
    StormContext, StormCounters, StormMode, StormPoint, StormSpec, SwapMedium,
};
use usm_bench::sys::{Advice, AnonMemory};
use usm_bench::{Error, PmQos, Result};
use usm_localmanager::{Handle, JoinHandle, WakerMode};
use usm_runtime::embedded::{InstallMode, Region, Runtime, SwapInMode};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const PAGE: usize = 4096;
const UTHREADS_CHILD: &str = "storm-kernel-uthreads";
const USM_CHILD: &str = "storm-usm-yield";
const ZRAM_LOCK_PATH: &str = "/run/usm-zram.lock";

#[derive(Parser, Debug)]
#[command(about = "Swap storm: kernel swap (uThreads, OS threads) vs USM (Yield)")]
struct Cli {
    /// Small sizes and short runs (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Throughput-over-time plot (CPU tasks) of the swap-file run; the memory-task plot
    /// goes next to it as STEM-memory.svg.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Directory for swap files (must be on the project disk).
    #[arg(long, default_value = guard::DEFAULT_SWAP_DIR)]
    swap_dir: PathBuf,
    /// Swap media.
    #[arg(long, value_enum, default_value_t = MediumArg::Both)]
    medium: MediumArg,
    /// Memory intensities to sweep, e.g. 1,0.25,0.05.
    #[arg(long, value_delimiter = ',')]
    intensities: Option<Vec<f64>>,
    /// Measured milliseconds per point.
    #[arg(long)]
    duration_ms: Option<u64>,
    /// USM's cgroup allowance beyond the budget, MiB (default: measured by a probe run).
    #[arg(long)]
    overhead_mib: Option<u64>,
    /// Seconds to wait for /dev/zram0 if someone else is using it.
    #[arg(long, default_value_t = 30)]
    zram_wait_s: u64,
    /// Do not pre-warm the host backing before each point.
    #[arg(long)]
    no_prewarm: bool,
    /// Compute rounds a CPU uThread runs between two yields, in (a) and (c) alike (an op
    /// is `CPU_OP_ROUNDS` = 32768 rounds, ~50 µs; 32768 = yield once per op).
    #[arg(long, default_value_t = 1024)]
    cpu_slice_rounds: u32,
    /// Do not hold /dev/cpu_dma_latency at 0.
    #[arg(long)]
    no_pmqos: bool,
    /// Runs of every sweep (medians reported).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Turn USM's re-fault access sampling off in (b) and (c) (`clock` then acts as FIFO).
    #[arg(long)]
    no_access_sampling: bool,
    /// uThread runs per scheduling round in (b) and (c) (default: the scheduler's 64).
    #[arg(long)]
    round_budget: Option<usize>,
    /// Skip mode (b).
    #[arg(long)]
    no_sync: bool,
    /// How (b) and (c) install frames (`move` / `copy`; default: the runtime's default,
    /// see `usm_runtime::mm::InstallMode`).
    #[arg(long, value_enum)]
    install: Option<InstallArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Serialize, Deserialize)]
enum InstallArg {
    Move,
    Copy,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum MediumArg {
    File,
    Zram,
    Both,
}

fn main() {
    if let Some(code) = usm_bench::child::serve_if_child(&[
        (UTHREADS_CHILD, kernel_uthreads_child),
        (USM_CHILD, usm_child),
    ]) {
        std::process::exit(code);
    }
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    if let Err(e) = run(&cli) {
        guard::wait_for_signal_cleanup();
        eprintln!("swap_storm: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// The uThread workload, shared by (a) and (c).

/// Memory a memory uThread works on: an anonymous mapping (a) or a managed region (c).
trait ShardMemory: Send + 'static {
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl ShardMemory for AnonMemory {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl ShardMemory for Region {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice::<u8>()
    }
}

type MemOut<M> = Result<(LatencyHistogram, u64, M)>;

/// Runs the mix as uThreads through `handle` over `shards` (one per memory task); returns
/// the point (labels empty) and the shards.
fn run_uthread_storm<M: ShardMemory>(
    handle: &Handle,
    spec: &StormSpec,
    intensity: f64,
    cpu_slice_rounds: u32,
    shards: Vec<M>,
) -> Result<(StormPoint, Vec<M>)> {
    let counters = Arc::new(StormCounters::default());
    let populated = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let workers = spec.workers.max(1);
    let spawn_err = |e: usm_localmanager::SchedError| Error::Invalid(format!("spawn: {e}"));
    let mut mem_handles: Vec<JoinHandle<MemOut<M>>> = Vec::new();
    let populate_start = Instant::now();
    for (i, mut shard) in shards.into_iter().enumerate() {
        let (counters, populated, go) = (counters.clone(), populated.clone(), go.clone());
        let seed = spec.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let wp = spec.write_percent;
        let h = handle
            .spawn_on(i % workers, move || -> MemOut<M> {
                let (latency, verified) = {
                    let mut task = match MemoryTask::new(shard.bytes_mut(), seed, intensity, wp) {
                        Ok(t) => t,
                        Err(e) => {
                            counters.stop.store(true, Ordering::SeqCst);
                            populated.fetch_add(1, Ordering::SeqCst);
                            return Err(e);
                        }
                    };
                    task.populate();
                    populated.fetch_add(1, Ordering::SeqCst);
                    while !go.load(Ordering::Acquire) && !counters.stop.load(Ordering::Relaxed) {
                        usm_localmanager::yield_now();
                    }
                    let mut local = 0u64;
                    while !counters.stop.load(Ordering::Relaxed) {
                        if let Err(e) = task.step() {
                            counters.stop.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                        local += 1;
                        if local == 8 {
                            counters.memory_ops.fetch_add(local, Ordering::Relaxed);
                            local = 0;
                        }
                        usm_localmanager::yield_now();
                    }
                    (task.latency.clone(), task.verified_reads)
                };
                Ok((latency, verified, shard))
            })
            .map_err(spawn_err)?;
        mem_handles.push(h);
    }
    let mut cpu_handles = Vec::new();
    for i in 0..spec.mix.cpu_tasks {
        let (counters, go) = (counters.clone(), go.clone());
        let seed = spec.seed ^ 0xc0ff_ee00 ^ i as u64;
        let slice = cpu_slice_rounds.clamp(1, CPU_OP_ROUNDS);
        let h = handle
            .spawn_on(i % workers, move || {
                // The same work as `CpuTask::step`, cut into slices with a yield between
                // (a cooperative runtime needs it: the worker polls its driver between
                // rounds of uThread runs, not while one runs).
                let mut state = seed | 1;
                let slices = (CPU_OP_ROUNDS / slice).max(1);
                while !go.load(Ordering::Acquire) && !counters.stop.load(Ordering::Relaxed) {
                    usm_localmanager::yield_now();
                }
                while !counters.stop.load(Ordering::Relaxed) {
                    for _ in 0..slices {
                        storm::compute_rounds(&mut state, CPU_OP_ROUNDS / slices);
                        usm_localmanager::yield_now();
                    }
                    counters.cpu_ops.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(spawn_err)?;
        cpu_handles.push(h);
    }
    let m = mem_handles.len();
    while populated.load(Ordering::SeqCst) < m {
        if counters.stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let populate_s = populate_start.elapsed().as_secs_f64();
    let before = usm_bench::stats::rusage(true)?;
    let steal0 = usm_bench::stats::system_steal_s();
    go.store(true, Ordering::Release);
    let m0 = counters.memory_ops.load(Ordering::Relaxed);
    let c0 = counters.cpu_ops.load(Ordering::Relaxed);
    let (samples, elapsed) = storm::sample_throughput(
        &counters,
        Duration::from_millis(spec.sample_ms.max(1)),
        Duration::from_millis(spec.duration_ms),
    );
    let memory_ops = counters.memory_ops.load(Ordering::Relaxed) - m0;
    let cpu_ops = counters.cpu_ops.load(Ordering::Relaxed) - c0;
    let after = usm_bench::stats::rusage(true)?;
    let steal_s = usm_bench::stats::system_steal_s() - steal0;
    let mut latency = LatencyHistogram::new()?;
    let mut verified_reads = 0;
    let mut shards = Vec::new();
    let mut first_err = None;
    for h in mem_handles {
        match h.join() {
            Ok(Ok((lat, v, shard))) => {
                latency.merge(&lat)?;
                verified_reads += v;
                shards.push(shard);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(Error::Invalid(format!("memory uThread: {e}")));
            }
        }
    }
    for h in cpu_handles {
        if let Err(e) = h.join() {
            first_err.get_or_insert(Error::Invalid(format!("CPU uThread: {e}")));
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let secs = elapsed.as_secs_f64();
    let point = StormPoint {
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
        major_faults: after.2.saturating_sub(before.2),
        minor_faults: after.1.saturating_sub(before.1),
        cpu_s: after.0 - before.0,
        steal_s,
        populate_s,
        samples,
        cgroup: None,
    };
    Ok((point, shards))
}

fn pages_per_task(spec: &StormSpec) -> usize {
    (spec.working_set_bytes as usize / PAGE) / spec.mix.memory_tasks
}

// ---------------------------------------------------------------------------------------
// (a): kernel swap under usm_localmanager.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UThreadsPayload {
    spec: StormSpec,
    intensity: f64,
    cpu_slice_rounds: u32,
}

fn kernel_uthreads_child(payload: Value) -> Result<Value> {
    let p: UThreadsPayload = serde_json::from_value(payload)?;
    p.spec.validate()?;
    let rt = usm_localmanager::Runtime::builder()
        .workers(p.spec.workers)
        .pin(true)
        .waker(WakerMode::EventFd)
        .build()
        .map_err(|e| Error::Invalid(format!("usm_localmanager runtime: {e}")))?;
    let mut shards = Vec::new();
    for _ in 0..p.spec.mix.memory_tasks {
        let mem = AnonMemory::new(pages_per_task(&p.spec) * PAGE)?;
        mem.advise(Advice::NoHugePage)?;
        shards.push(mem);
    }
    let (point, shards) = run_uthread_storm(
        &rt.handle(),
        &p.spec,
        p.intensity,
        p.cpu_slice_rounds,
        shards,
    )?;
    drop(shards);
    rt.shutdown(Duration::from_secs(5));
    Ok(serde_json::to_value(point)?)
}

/// (a): kernel swap under the same uThread runtime.
struct KernelUThreadsMode {
    cpu_slice_rounds: u32,
}

impl StormMode for KernelUThreadsMode {
    fn label(&self) -> String {
        "a-kernel-uthreads".into()
    }

    fn kernel_reference(&self) -> Option<KernelReference> {
        Some(KernelReference::UThreads)
    }

    fn run_point(&mut self, ctx: &StormContext, intensity: f64) -> Result<StormPoint> {
        if ctx.prewarm {
            usm_bench::prewarm::prewarm_host(ctx.spec.working_set_bytes + (64 << 20))?;
        }
        let env = KernelSwapEnv::prepare(ctx, "storm-uthreads")?;
        let payload = UThreadsPayload {
            spec: ctx.spec.clone(),
            intensity,
            cpu_slice_rounds: self.cpu_slice_rounds,
        };
        let value = ctx
            .launcher
            .run(UTHREADS_CHILD, &payload, Some(&env.cgroup))?;
        let mut point: StormPoint = serde_json::from_value(value)?;
        point.mode = self.label();
        point.medium = ctx.medium.label().into();
        point.cgroup = Some(env.cgroup.stats()?);
        drop(env);
        Ok(point)
    }
}

// ---------------------------------------------------------------------------------------
// (c): USM with Yield.

#[derive(Debug, Clone, Serialize, Deserialize)]
enum UsmSwap {
    /// A device (or a swap file, written out by `usm_swap::create_swap_file`)
    /// already formatted for USM.
    Device(PathBuf),
}

/// How (b) and (c) configure the embedded runtime.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct UsmKnobs {
    /// (b): synchronous swap-in.
    sync: bool,
    access_sampling: bool,
    round_budget: Option<usize>,
    #[serde(default)]
    install: Option<InstallArg>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UsmPayload {
    spec: StormSpec,
    intensity: f64,
    cpu_slice_rounds: u32,
    swap: UsmSwap,
    knobs: UsmKnobs,
}

/// Fault-path statistics of one (c) point.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct UsmPathStats {
    faults: u64,
    fast_map: u64,
    swap_cache_hits: u64,
    swap_ins: u64,
    evicted: u64,
    swap_in_p50_us: f64,
    swap_in_p99_us: f64,
    fast_map_p50_us: f64,
    fast_map_p99_us: f64,
    faults_parked: u64,
    #[serde(default)]
    worker_blocked: u64,
    #[serde(default)]
    samples_taken: u64,
    #[serde(default)]
    sample_refaults: u64,
    #[serde(default)]
    writebacks_done: u64,
    #[serde(default)]
    clean_evictions: u64,
    #[serde(default)]
    memory_waits: u64,
    /// COPY install mode: batched slot drops (`process_madvise` calls) and slots dropped.
    #[serde(default)]
    slot_drop_batches: u64,
    #[serde(default)]
    slots_dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UsmOut {
    point: StormPoint,
    usm: UsmPathStats,
}

fn usm_child(payload: Value) -> Result<Value> {
    let p: UsmPayload = serde_json::from_value(payload)?;
    p.spec.validate()?;
    let emb = |e: usm_runtime::embedded::EmbeddedError| Error::Invalid(format!("embedded: {e}"));
    let mut b = Runtime::builder()
        .workers(p.spec.workers)
        .pin_workers(true)
        .waker(WakerMode::EventFd)
        .pool_frames(p.spec.budget_bytes as usize / PAGE)
        .access_sampling(p.knobs.access_sampling)
        .swap_in_mode(if p.knobs.sync {
            SwapInMode::Sync
        } else {
            SwapInMode::Yield
        });
    if let Some(r) = p.knobs.round_budget {
        b = b.round_budget(r);
    }
    match p.knobs.install {
        Some(InstallArg::Move) => b = b.install_mode(InstallMode::Move),
        Some(InstallArg::Copy) => b = b.install_mode(InstallMode::Copy),
        None => {}
    }
    b = match &p.swap {
        UsmSwap::Device(path) => b.swap_device(path),
    };
    let rt = b.build().map_err(emb)?;
    let mut shards = Vec::new();
    for _ in 0..p.spec.mix.memory_tasks {
        shards.push(rt.region(pages_per_task(&p.spec) * PAGE).map_err(emb)?);
    }
    let before = rt.stats();
    let drops_before = rt.stats();
    let handle = rt.handle().map_err(emb)?;
    let (point, shards) =
        run_uthread_storm(&handle, &p.spec, p.intensity, p.cpu_slice_rounds, shards)?;
    let st = rt.stats();
    let parked0: u64 = before.sched.iter().map(|s| s.faults).sum();
    let parked1: u64 = st.sched.iter().map(|s| s.faults).sum();
    let usm = UsmPathStats {
        faults: st.mm.faults,
        fast_map: st.mm.fast_map.count,
        swap_cache_hits: st.mm.swap_cache_hit.count,
        swap_ins: st.mm.swap_ins_done,
        evicted: st.mm.evicted,
        swap_in_p50_us: st.mm.swap_in.p50_ns as f64 / 1e3,
        swap_in_p99_us: st.mm.swap_in.p99_ns as f64 / 1e3,
        fast_map_p50_us: st.mm.fast_map.p50_ns as f64 / 1e3,
        fast_map_p99_us: st.mm.fast_map.p99_ns as f64 / 1e3,
        faults_parked: parked1 - parked0,
        worker_blocked: st.mm.worker_blocked - before.mm.worker_blocked,
        samples_taken: st.mm.samples_taken - before.mm.samples_taken,
        sample_refaults: st.mm.sample_refaults - before.mm.sample_refaults,
        writebacks_done: st.mm.writebacks_done - before.mm.writebacks_done,
        clean_evictions: st.mm.clean_evictions - before.mm.clean_evictions,
        memory_waits: st.mm.memory_waits - before.mm.memory_waits,
        slot_drop_batches: rt.stats().slot_drop_batches - drops_before.slot_drop_batches,
        slots_dropped: rt.stats().slots_dropped - drops_before.slots_dropped,
    };
    if st.mm.poisoned > 0 {
        return Err(Error::Corruption(format!(
            "{} pages poisoned (unreadable swap)",
            st.mm.poisoned
        )));
    }
    drop(shards);
    rt.shutdown(Duration::from_secs(10));
    Ok(serde_json::to_value(UsmOut { point, usm })?)
}

/// `/dev/zram0` formatted for USM, held under the shared zram lock; reset on drop.
struct UsmZram {
    zram: Option<usm_swap::Zram>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl UsmZram {
    fn take(bytes: u64, wait: Duration) -> Result<Self> {
        if !usm_swap::Zram::available(0) {
            return Err(Error::Unavailable {
                facility: "zram",
                reason: "/dev/zram0 does not exist".into(),
            });
        }
        let deadline = Instant::now() + wait;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(ZRAM_LOCK_PATH)
            .map_err(|e| Error::Io {
                op: "open",
                path: ZRAM_LOCK_PATH.into(),
                source: e,
            })?;
        let lock = loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, _)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, errno)) => {
                    return Err(Error::Busy {
                        facility: "zram",
                        reason: format!("{ZRAM_LOCK_PATH} held by another process ({errno})"),
                    });
                }
            }
        };
        let disksize =
            std::fs::read_to_string("/sys/block/zram0/disksize").map_err(|e| Error::Io {
                op: "read",
                path: "/sys/block/zram0/disksize".into(),
                source: e,
            })?;
        if disksize.trim() != "0" {
            return Err(Error::Busy {
                facility: "zram",
                reason: format!("/dev/zram0 in use (disksize {})", disksize.trim()),
            });
        }
        let zram = usm_swap::Zram::configure(0, bytes, None)
            .map_err(|e| Error::Invalid(format!("zram configure: {e}")))?;
        usm_swap::format(zram.path(), &usm_swap::FormatOptions::default())
            .map_err(|e| Error::Invalid(format!("format zram for USM: {e}")))?;
        Ok(Self {
            zram: Some(zram),
            _lock: lock,
        })
    }

    fn path(&self) -> PathBuf {
        self.zram
            .as_ref()
            .map_or_else(|| PathBuf::from("/dev/zram0"), |z| z.path().to_path_buf())
    }
}

impl Drop for UsmZram {
    fn drop(&mut self) {
        // Reset the device before the lock is released (fields drop after this).
        drop(self.zram.take());
    }
}

/// Path statistics per point: (intensity, medium, mode label, stats).
type PathLog = std::rc::Rc<std::cell::RefCell<Vec<(f64, String, String, UsmPathStats)>>>;

/// (c): USM, faults yield; or (b) with `knobs.sync`.
struct UsmYieldMode {
    /// cgroup allowance beyond the budget.
    overhead_bytes: u64,
    /// Compute rounds between two yields of a CPU task.
    cpu_slice_rounds: u32,
    /// Path statistics per point, shared with the caller.
    paths: PathLog,
    knobs: UsmKnobs,
}

impl UsmYieldMode {
    fn run_in(
        &self,
        ctx: &StormContext,
        intensity: f64,
        limit: u64,
        spec: &StormSpec,
    ) -> Result<(UsmOut, MemCgroup)> {
        let swap_bytes = spec.working_set_bytes + (64 << 20);
        let mut file = None;
        let mut zram = None;
        let swap = match ctx.medium {
            SwapMedium::File => {
                let path = ctx
                    .swap_dir
                    .join(format!("usm-storm-{}.swap", std::process::id()));
                file = Some(RemoveOnDrop(path.clone()));
                usm_swap::create_swap_file(&path, swap_bytes).map_err(|e| {
                    usm_bench::Error::Invalid(format!("USM swap file {}: {e}", path.display()))
                })?;
                UsmSwap::Device(path)
            }
            SwapMedium::Zram => {
                let z = UsmZram::take(swap_bytes, ctx.zram_wait)?;
                let p = z.path();
                zram = Some(z);
                UsmSwap::Device(p)
            }
        };
        let cgroup = MemCgroup::create("storm-usm", limit)?;
        let payload = UsmPayload {
            spec: spec.clone(),
            intensity,
            cpu_slice_rounds: self.cpu_slice_rounds,
            swap,
            knobs: self.knobs,
        };
        let value = ctx.launcher.run(USM_CHILD, &payload, Some(&cgroup));
        drop(file);
        drop(zram);
        Ok((serde_json::from_value(value?)?, cgroup))
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl StormMode for UsmYieldMode {
    fn label(&self) -> String {
        if self.knobs.sync {
            "b-usm-sync".into()
        } else {
            "c-usm-yield".into()
        }
    }

    fn run_point(&mut self, ctx: &StormContext, intensity: f64) -> Result<StormPoint> {
        if ctx.prewarm {
            usm_bench::prewarm::prewarm_host(ctx.spec.working_set_bytes + (64 << 20))?;
        }
        let limit = ctx.spec.budget_bytes + self.overhead_bytes;
        let (out, cgroup) = self.run_in(ctx, intensity, limit, &ctx.spec)?;
        let mut point = out.point;
        point.mode = self.label();
        point.medium = ctx.medium.label().into();
        point.cgroup = Some(cgroup.stats()?);
        self.paths
            .borrow_mut()
            .push((intensity, ctx.medium.label().into(), self.label(), out.usm));
        Ok(point)
    }
}

/// Measures USM's memory beyond the pool: a short (c) run in a cgroup of budget + 512 MiB.
fn measure_overhead(
    ctx: &StormContext,
    intensity: f64,
    slice: u32,
    knobs: UsmKnobs,
) -> Result<(u64, u64)> {
    let probe = UsmYieldMode {
        overhead_bytes: 0,
        cpu_slice_rounds: slice,
        paths: PathLog::default(),
        knobs,
    };
    let mut spec = ctx.spec.clone();
    spec.duration_ms = spec.duration_ms.min(1000);
    let (_, cgroup) = probe.run_in(ctx, intensity, ctx.spec.budget_bytes + (512 << 20), &spec)?;
    let peak = cgroup.stats()?.peak_bytes;
    let beyond = peak.saturating_sub(ctx.spec.budget_bytes);
    let allowance = (beyond + beyond / 4 + (8 << 20)).div_ceil(1 << 20) << 20;
    Ok((peak, allowance))
}

// ---------------------------------------------------------------------------------------

fn run(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    // A fresh machine has no swap directory yet: USM's swap file goes there too.
    std::fs::create_dir_all(&cli.swap_dir)
        .map_err(|e| usm_bench::Error::Invalid(format!("mkdir {}: {e}", cli.swap_dir.display())))?;
    let cleaned = usm_bench::cleanup::cleanup_leftovers(std::slice::from_ref(&cli.swap_dir))?;
    if !cleaned.is_clean() {
        eprintln!("cleanup of a previous run: {cleaned:?}");
    }
    let qos = PmQos::hold_zero_unless(cli.no_pmqos);
    let mut spec = if cli.quick {
        StormSpec::quick()
    } else {
        StormSpec::default_mix()
    };
    if let Some(d) = cli.duration_ms {
        spec.duration_ms = d;
    }
    let intensities = cli.intensities.clone().unwrap_or(if cli.quick {
        vec![1.0]
    } else {
        vec![1.0, 0.25, 0.05]
    });
    let media = match cli.medium {
        MediumArg::File => vec![SwapMedium::File],
        MediumArg::Zram => vec![SwapMedium::Zram],
        MediumArg::Both => vec![SwapMedium::File, SwapMedium::Zram],
    };
    let mut report = JsonReport::new("swap_storm");
    report.insert("quick", cli.quick)?;
    report.insert(
        "pm_qos_us",
        if qos.is_some() { json!(0) } else { Value::Null },
    )?;
    report.insert("busy_poll", false)?;
    report.insert("waker", "eventfd")?;
    report.insert("cpu_slice_rounds", cli.cpu_slice_rounds)?;
    let knobs = UsmKnobs {
        sync: false,
        access_sampling: !cli.no_access_sampling,
        round_budget: cli.round_budget,
        install: cli.install,
    };
    report.insert("usm_install", cli.install.map(|m| format!("{m:?}")))?;
    report.insert("usm_access_sampling", knobs.access_sampling)?;
    report.insert("usm_round_budget", cli.round_budget)?;
    report.insert("repeat", cli.repeat.max(1))?;
    report.insert("load_average_at_start", load_average())?;
    let swaps_start = guard::active_swaps()?;
    report.insert("swaps_at_start", &swaps_start)?;
    let launcher = ChildLauncher::current_exe()?;
    let mut sweeps = Vec::new();
    let mut paths_all = Vec::new();
    let mut overheads = Vec::new();
    for medium in media {
        let ctx = StormContext {
            spec: spec.clone(),
            medium,
            swap_dir: cli.swap_dir.clone(),
            launcher: launcher.clone(),
            zram_wait: Duration::from_secs(cli.zram_wait_s),
            prewarm: !cli.no_prewarm,
        };
        let overhead_bytes = match cli.overhead_mib {
            Some(m) => m << 20,
            None => match measure_overhead(&ctx, intensities[0], cli.cpu_slice_rounds, knobs) {
                Ok((peak, allowance)) => {
                    println!(
                        "USM on {}: probe peak {} MiB with a {} MiB pool -> cgroup allowance {} MiB",
                        medium.label(),
                        peak >> 20,
                        spec.budget_bytes >> 20,
                        allowance >> 20
                    );
                    overheads.push(json!({
                        "medium": medium.label(),
                        "probe_peak_bytes": peak,
                        "allowance_bytes": allowance,
                    }));
                    allowance
                }
                Err(e) if e.is_unavailable() || e.is_busy() => {
                    println!("skipped {}: {e}", medium.label());
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let paths = PathLog::default();
        let mut modes: Vec<Box<dyn StormMode>> = vec![
            Box::new(KernelUThreadsMode {
                cpu_slice_rounds: cli.cpu_slice_rounds,
            }),
            Box::new(KernelThreadsMode),
        ];
        if !cli.no_sync {
            modes.push(Box::new(UsmYieldMode {
                overhead_bytes,
                cpu_slice_rounds: cli.cpu_slice_rounds,
                paths: paths.clone(),
                knobs: UsmKnobs {
                    sync: true,
                    ..knobs
                },
            }));
        }
        modes.push(Box::new(UsmYieldMode {
            overhead_bytes,
            cpu_slice_rounds: cli.cpu_slice_rounds,
            paths: paths.clone(),
            knobs,
        }));
        for run in 0..cli.repeat.max(1) {
            println!(
                "-- {} run {}/{} (load average {})",
                medium.label(),
                run + 1,
                cli.repeat.max(1),
                load_average()
            );
            let sweep = storm::run_sweep(&mut modes, &ctx, &intensities)?;
            let mine: Vec<_> = paths.borrow_mut().drain(..).collect();
            print_sweep(&sweep, &mine);
            paths_all.extend(mine.into_iter().map(|p| (run, p)));
            sweeps.push(sweep);
        }
    }
    let medians = median_table(&sweeps);
    print_medians(&medians, cli.repeat.max(1));
    print_goal(&medians);
    report.insert("medians", &medians)?;
    report.insert("load_average_at_end", load_average())?;
    let svg = cli.svg.clone().unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results/storm.svg"))
    });
    write_plots(&sweeps, &svg)?;
    report.insert("usm_overhead", &overheads)?;
    report.insert("sweeps", &sweeps)?;
    report.insert(
        "usm_fault_paths",
        paths_all
            .iter()
            .map(|(run, (i, m, mode, s))| {
                json!({"run": run, "intensity": i, "medium": m, "mode": mode, "stats": s})
            })
            .collect::<Vec<_>>(),
    )?;
    let swaps_end = guard::active_swaps()?;
    if swaps_end != swaps_start {
        eprintln!("WARNING: active swaps differ from the start: {swaps_start:?} -> {swaps_end:?}");
    }
    report.insert("swaps_at_end", &swaps_end)?;
    report.insert("wall_s", started.elapsed().as_secs_f64())?;
    if let Some(path) = &cli.json {
        report.write(path)?;
        println!("wrote {}", path.display());
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_sweep(sweep: &storm::StormSweep, paths: &[(f64, String, String, UsmPathStats)]) {
    let mut t = Table::new(&[
        "mode",
        "intensity",
        "cpu ops/s",
        "mem ops/s",
        "cpu vs (a)",
        "mem vs (a)",
        "cpu vs (a')",
        "mem vs (a')",
        "access p50 us",
        "access p99 us",
        "swap-in p50/p99 us",
        "cg peak MiB",
    ]);
    for p in &sweep.points {
        let r = sweep
            .ratios
            .iter()
            .find(|r| r.mode == p.mode && r.intensity == p.intensity);
        let usm = paths
            .iter()
            .find(|(i, m, mode, _)| *i == p.intensity && *m == p.medium && *mode == p.mode);
        t.row(vec![
            p.mode.clone(),
            p.intensity.to_string(),
            fmt_f(Some(p.cpu_ops_per_s), 0),
            fmt_f(Some(p.memory_ops_per_s), 0),
            fmt_f(r.and_then(|r| r.cpu_throughput_vs_kernel), 2),
            fmt_f(r.and_then(|r| r.memory_throughput_vs_kernel), 2),
            fmt_f(r.and_then(|r| r.cpu_throughput_vs_kernel_threads), 2),
            fmt_f(r.and_then(|r| r.memory_throughput_vs_kernel_threads), 2),
            fmt_f(Some(p.access_latency.p50_ns as f64 / 1e3), 1),
            fmt_f(Some(p.access_latency.p99_ns as f64 / 1e3), 0),
            usm.map_or("-".into(), |(_, _, _, s)| {
                format!("{:.0}/{:.0}", s.swap_in_p50_us, s.swap_in_p99_us)
            }),
            p.cgroup
                .as_ref()
                .map_or("-".into(), |c| (c.peak_bytes >> 20).to_string()),
        ]);
    }
    println!(
        "\n== swap storm on {}: {} memory + {} CPU tasks on {} workers, budget {} MiB, working set {} MiB, {} ms/point\n{}",
        sweep.medium,
        sweep.spec.mix.memory_tasks,
        sweep.spec.mix.cpu_tasks,
        sweep.spec.workers,
        sweep.spec.budget_bytes >> 20,
        sweep.spec.working_set_bytes >> 20,
        sweep.spec.duration_ms,
        t.render()
    );
    for s in &sweep.skipped {
        println!("skipped {s}");
    }
}

/// The median over runs of one (medium, mode, intensity).
#[derive(Debug, Clone, Serialize)]
struct MedianPoint {
    medium: String,
    mode: String,
    intensity: f64,
    runs: usize,
    cpu_ops_per_s: f64,
    memory_ops_per_s: f64,
    /// Medians of the per-run ratios (each run's own denominator).
    cpu_throughput_vs_kernel: Option<f64>,
    memory_throughput_vs_kernel: Option<f64>,
    cpu_throughput_vs_kernel_threads: Option<f64>,
    memory_throughput_vs_kernel_threads: Option<f64>,
    /// Per-run (CPU, memory) ratios against (a), to show the spread.
    runs_vs_kernel: Vec<(Option<f64>, Option<f64>)>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn median_table(sweeps: &[storm::StormSweep]) -> Vec<MedianPoint> {
    let mut keys: Vec<(String, String, f64)> = Vec::new();
    for s in sweeps {
        for p in &s.points {
            let k = (p.medium.clone(), p.mode.clone(), p.intensity);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.into_iter()
        .map(|(medium, mode, intensity)| {
            let pts: Vec<&StormPoint> = sweeps
                .iter()
                .flat_map(|s| s.points.iter())
                .filter(|p| p.medium == medium && p.mode == mode && p.intensity == intensity)
                .collect();
            let rs: Vec<&storm::StormRatio> = sweeps
                .iter()
                .flat_map(|s| s.ratios.iter())
                .filter(|r| r.medium == medium && r.mode == mode && r.intensity == intensity)
                .collect();
            let m = |f: fn(&storm::StormRatio) -> Option<f64>| {
                median(rs.iter().filter_map(|r| f(r)).collect())
            };
            MedianPoint {
                runs: pts.len(),
                cpu_ops_per_s: median(pts.iter().map(|p| p.cpu_ops_per_s).collect())
                    .unwrap_or(f64::NAN),
                memory_ops_per_s: median(pts.iter().map(|p| p.memory_ops_per_s).collect())
                    .unwrap_or(f64::NAN),
                cpu_throughput_vs_kernel: m(|r| r.cpu_throughput_vs_kernel),
                memory_throughput_vs_kernel: m(|r| r.memory_throughput_vs_kernel),
                cpu_throughput_vs_kernel_threads: m(|r| r.cpu_throughput_vs_kernel_threads),
                memory_throughput_vs_kernel_threads: m(|r| r.memory_throughput_vs_kernel_threads),
                runs_vs_kernel: rs
                    .iter()
                    .map(|r| (r.cpu_throughput_vs_kernel, r.memory_throughput_vs_kernel))
                    .collect(),
                medium,
                mode,
                intensity,
            }
        })
        .collect()
}

fn print_medians(medians: &[MedianPoint], runs: usize) {
    let mut t = Table::new(&[
        "medium",
        "mode",
        "intensity",
        "cpu ops/s",
        "mem ops/s",
        "cpu vs (a)",
        "mem vs (a)",
        "cpu vs (a')",
        "mem vs (a')",
        "per run vs (a): cpu/mem",
    ]);
    for m in medians {
        t.row(vec![
            m.medium.clone(),
            m.mode.clone(),
            m.intensity.to_string(),
            fmt_f(Some(m.cpu_ops_per_s), 0),
            fmt_f(Some(m.memory_ops_per_s), 0),
            fmt_f(m.cpu_throughput_vs_kernel, 2),
            fmt_f(m.memory_throughput_vs_kernel, 2),
            fmt_f(m.cpu_throughput_vs_kernel_threads, 2),
            fmt_f(m.memory_throughput_vs_kernel_threads, 2),
            m.runs_vs_kernel
                .iter()
                .map(|(c, mm)| format!("{}/{}", fmt_f(*c, 2), fmt_f(*mm, 2)))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    println!("\n== medians over {runs} run(s)\n{}", t.render());
}

fn print_goal(medians: &[MedianPoint]) {
    let Some(first) = medians
        .iter()
        .find(|m| m.medium == "swapfile")
        .map(|m| m.intensity)
    else {
        return;
    };
    if let Some(m) = medians
        .iter()
        .find(|m| m.medium == "swapfile" && m.mode == "c-usm-yield" && m.intensity == first)
    {
        let cpu = m.cpu_throughput_vs_kernel.unwrap_or(f64::NAN);
        let mem = m.memory_throughput_vs_kernel.unwrap_or(f64::NAN);
        let met = cpu >= 2.26 && mem >= 1.0;
        let runs_met = m
            .runs_vs_kernel
            .iter()
            .filter(|(c, mm)| c.is_some_and(|c| c >= 2.26) && mm.is_some_and(|mm| mm >= 1.0))
            .count();
        println!(
            "GOAL (swap file, intensity {first}, median of {} run(s)): (c)/(a) CPU-task {cpu:.2}x (>= 2.26), memory-task {mem:.2}x (>= 1.0): {} ({runs_met}/{} runs met it)",
            m.runs,
            if met { "MET" } else { "NOT MET" },
            m.runs_vs_kernel.len()
        );
    }
}

/// `/proc/loadavg`'s first three fields.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn write_plots(sweeps: &[storm::StormSweep], svg: &Path) -> Result<()> {
    // The first run of each (mode, intensity): repeats would only stack identical lines.
    let mut points: Vec<&StormPoint> = Vec::new();
    for p in sweeps
        .iter()
        .filter(|s| s.medium == "swapfile")
        .flat_map(|s| s.points.iter())
    {
        if !points
            .iter()
            .any(|q| q.mode == p.mode && q.intensity == p.intensity)
        {
            points.push(p);
        }
    }
    if points.is_empty() {
        return Ok(());
    }
    storm::throughput_plot(
        &points,
        PlotMetric::Cpu,
        "swap storm on a swap file: CPU-task throughput over time",
    )
    .write(svg)?;
    println!("wrote {}", svg.display());
    let mem = svg.with_file_name(format!(
        "{}-memory.svg",
        svg.file_stem().and_then(|s| s.to_str()).unwrap_or("storm")
    ));
    storm::throughput_plot(
        &points,
        PlotMetric::Memory,
        "swap storm on a swap file: memory-task throughput over time",
    )
    .write(&mem)?;
    println!("wrote {}", mem.display());
    Ok(())
}
