//! The swap-storm demo (`usm demo`): a small swap storm on the embedded runtime, on
//! built-in defaults, so a newcomer sees the system work in under a minute.
//!
//! # What it runs
//! 1. An embedded [`Runtime`] with 2 workers, a pool of `--pool-mib` (64 MiB) and a fresh
//!    USM swap file of working set + 64 MiB under `--swap-dir` (`/var/tmp`, a disk: the
//!    swap engine uses `O_DIRECT`, which tmpfs refuses).
//! 2. `--memory-tasks` memory uThreads, each owning one [`crate::embedded::Region`]; their
//!    regions together are `--ratio` × the pool (4×). Each task first writes every page
//!    (a pattern from a per-page seed; its checksum kept in the task's own table, outside
//!    the region), then loops: a random page is either rewritten (a new seed, a new
//!    checksum) or read back and checked. The regions do not fit, so pages are evicted to
//!    the swap file and faulted back with io_uring while the worker runs other uThreads.
//! 3. `--cpu-tasks` CPU-bound uThreads on the same workers, counting compute operations.
//! 4. A progress bar shows throughput and swap traffic; after `--seconds` every task stops,
//!    reads back **every** page of its region once more and checks it. Any mismatch makes
//!    [`run`] fail with [`DemoError::Corruption`].
//! 5. The regions are dropped: the pool must be full again and no swap slot may stay in
//!    use ([`DemoError::Leak`] otherwise). The swap file is removed on every path (a guard
//!    owns it from before it is created).
//!
//! The final table ([`DemoReport::table`]) lists throughput, faults by path (fast map from
//! the pool, swap-cache hit, swap-in), swap-ins, evictions, fault latency p50/p99 per path
//! and the number of page checks that passed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::embedded::{EmbeddedError, JoinError, Region, Runtime, RuntimeStats};
use crate::mm::Latency;

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Compute rounds of one CPU-task operation.
const CPU_OP_ROUNDS: u32 = 1 << 14;
/// Compute rounds between two yields of a CPU task.
const CPU_SLICE_ROUNDS: u32 = 1 << 10;

/// Options of `usm demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// A short run (small pool, a few seconds): for tests and a first look.
    #[arg(long)]
    pub quick: bool,
    /// Frame pool in MiB (default 64; 16 with --quick).
    #[arg(long)]
    pub pool_mib: Option<u64>,
    /// Working set as a multiple of the pool.
    #[arg(long, default_value_t = 4)]
    pub ratio: u64,
    /// Measured seconds of the storm (default 20; 3 with --quick).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Workers (pinned cores).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Memory-intensive uThreads.
    #[arg(long, default_value_t = 8)]
    pub memory_tasks: usize,
    /// CPU-bound uThreads.
    #[arg(long, default_value_t = 2)]
    pub cpu_tasks: usize,
    /// Percentage of memory steps that rewrite a page (the rest read and verify).
    #[arg(long, default_value_t = 50)]
    pub write_percent: u32,
    /// Directory of the temporary swap file (must be on a disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    pub swap_dir: PathBuf,
    /// No progress bar (for logs and tests).
    #[arg(long)]
    pub no_progress: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            quick: false,
            pool_mib: None,
            ratio: 4,
            seconds: None,
            workers: 2,
            memory_tasks: 8,
            cpu_tasks: 2,
            write_percent: 50,
            swap_dir: PathBuf::from("/var/tmp"),
            no_progress: false,
            json: None,
        }
    }
}

impl DemoArgs {
    /// The `--quick` defaults, without a progress bar.
    pub fn quick() -> Self {
        DemoArgs {
            quick: true,
            no_progress: true,
            ..DemoArgs::default()
        }
    }

    fn pool_bytes(&self) -> u64 {
        self.pool_mib.unwrap_or(if self.quick { 16 } else { 64 }) << 20
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds.unwrap_or(if self.quick { 3 } else { 20 }))
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Bad arguments.
    #[error("invalid demo arguments: {0}")]
    Invalid(String),
    /// The embedded runtime failed.
    #[error("embedded runtime: {0}")]
    Runtime(#[from] EmbeddedError),
    /// A uThread failed (panicked or was cancelled).
    #[error("a demo task did not finish: {0}")]
    Task(#[from] JoinError),
    /// A page read back differs from what was written.
    #[error("DATA CORRUPTION: {count} page checks failed; first: {first}")]
    Corruption {
        /// Failed checks.
        count: u64,
        /// The first failure.
        first: String,
    },
    /// Frames or swap slots were not given back after the regions were dropped.
    #[error("resources not returned after the regions were dropped: {0}")]
    Leak(String),
    /// Writing the JSON report or removing the swap file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl DemoError {
    /// Whether the failure means data was lost or altered (as opposed to a set-up error).
    pub fn is_data_loss(&self) -> bool {
        matches!(self, DemoError::Corruption { .. })
    }
}

/// Latency of one fault path (µs).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PathLatency {
    /// Faults served on this path.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

impl From<&Latency> for PathLatency {
    fn from(l: &Latency) -> Self {
        PathLatency {
            count: l.count,
            p50_us: l.p50_ns as f64 / 1e3,
            p99_us: l.p99_ns as f64 / 1e3,
        }
    }
}

/// What the demo measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Workers.
    pub workers: usize,
    /// Pool, MiB.
    pub pool_mib: u64,
    /// All regions together, MiB.
    pub working_set_mib: u64,
    /// Memory / CPU uThreads.
    pub memory_tasks: usize,
    /// CPU uThreads.
    pub cpu_tasks: usize,
    /// Seconds to write the initial data set.
    pub populate_s: f64,
    /// Measured seconds of the storm.
    pub storm_s: f64,
    /// Memory-task steps in the storm.
    pub memory_ops: u64,
    /// CPU-task operations in the storm.
    pub cpu_ops: u64,
    /// Memory-task steps per second.
    pub memory_ops_per_s: f64,
    /// CPU-task operations per second.
    pub cpu_ops_per_s: f64,
    /// Faults seen by the memory core.
    pub faults: u64,
    /// Faults served from the pool (pre-zeroed frame moved in).
    pub fast_map: PathLatency,
    /// Faults served from the swap cache (page still in staging).
    pub swap_cache_hit: PathLatency,
    /// Faults that waited for an io_uring swap-in (the uThread parked in PFQ).
    pub swap_in: PathLatency,
    /// Swap-ins completed.
    pub swap_ins: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Uthread switches while a fault was pending (faults parked) over all workers.
    pub faults_parked: u64,
    /// Page checks that passed (storm reads + the final full read-back).
    pub pages_verified: u64,
    /// Page checks that failed (always 0 in a returned report).
    pub errors: u64,
    /// Swap slots in use after the regions were dropped (0).
    pub swap_slots_after_drop: u64,
    /// Whole-run wall seconds (set-up and clean-up included).
    pub total_s: f64,
}

impl DemoReport {
    /// The final table.
    pub fn table(&self) -> String {
        let lat = |l: &PathLatency| {
            if l.count == 0 {
                "-".to_string()
            } else {
                format!("{:>9} {:>9.1} {:>9.1}", l.count, l.p50_us, l.p99_us)
            }
        };
        let mut s = String::new();
        s.push_str(&format!(
            "USM swap-storm demo: {} workers, pool {} MiB, working set {} MiB ({} memory + {} CPU uThreads)\n",
            self.workers,
            self.pool_mib,
            self.working_set_mib,
            self.memory_tasks,
            self.cpu_tasks
        ));
        s.push_str("  ------------------------------------------------------------\n");
        s.push_str(&format!(
            "  memory-task throughput   {:>12.0} ops/s\n",
            self.memory_ops_per_s
        ));
        s.push_str(&format!(
            "  CPU-task throughput      {:>12.0} ops/s\n",
            self.cpu_ops_per_s
        ));
        s.push_str(&format!("  faults (all paths)       {:>12}\n", self.faults));
        s.push_str("  fault path                   count   p50 µs    p99 µs\n");
        s.push_str(&format!(
            "    fast map (pool)     {}\n",
            lat(&self.fast_map)
        ));
        s.push_str(&format!(
            "    swap-cache hit      {}\n",
            lat(&self.swap_cache_hit)
        ));
        s.push_str(&format!("    swap-in (io_uring)  {}\n", lat(&self.swap_in)));
        s.push_str(&format!(
            "  swap-ins completed       {:>12}\n",
            self.swap_ins
        ));
        s.push_str(&format!(
            "  pages evicted            {:>12}\n",
            self.evictions
        ));
        s.push_str(&format!(
            "  uThreads parked on faults{:>12}\n",
            self.faults_parked
        ));
        s.push_str(&format!(
            "  data verified            {:>12} page checks, {} errors\n",
            self.pages_verified, self.errors
        ));
        s.push_str(&format!(
            "  populate / storm / total {:>8.1} s / {:.1} s / {:.1} s\n",
            self.populate_s, self.storm_s, self.total_s
        ));
        s
    }
}

/// Removes the swap file when dropped, on every path (error, panic unwinding).
struct SwapFileGuard(PathBuf);

impl Drop for SwapFileGuard {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("usm demo: could not remove {}: {e}", self.0.display()),
        }
    }
}

/// Counters the tasks share with the progress loop.
#[derive(Default)]
struct Shared {
    memory_ops: AtomicU64,
    cpu_ops: AtomicU64,
    verified: AtomicU64,
    errors: AtomicU64,
    populated_tasks: AtomicU64,
    stop: AtomicBool,
    first_error: usm_sync::Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock()
            && first.is_none()
        {
            *first = Some(msg);
        }
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Fills `page` from `seed`; returns its checksum.
fn fill(page: &mut [u64], seed: u64) -> u64 {
    let mut x = seed | 1;
    for w in page.iter_mut() {
        *w = xorshift(&mut x);
    }
    checksum(page)
}

fn checksum(page: &[u64]) -> u64 {
    page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &v| {
        (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5)
    })
}

/// One memory uThread: owns its region and the checksum table of its pages.
fn memory_task(mut region: Region, id: usize, write_percent: u32, shared: Arc<Shared>) -> Region {
    let pages = region.len() / PAGE;
    let mut sums = vec![0u64; pages];
    let mut rng = 0x5eed_0000_0000_0001u64 ^ ((id as u64 + 1) << 20);
    {
        let data = region.as_mut_slice::<u64>();
        for (p, sum) in sums.iter_mut().enumerate() {
            let seed = xorshift(&mut rng);
            *sum = fill(&mut data[p * WORDS..(p + 1) * WORDS], seed);
            if p % 16 == 15 {
                usm_localmanager::yield_now();
            }
        }
    }
    shared.populated_tasks.fetch_add(1, Ordering::SeqCst);
    let mut local_ops = 0u64;
    let mut local_verified = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let r = xorshift(&mut rng);
        let p = (r % pages as u64) as usize;
        let data = region.as_mut_slice::<u64>();
        let page = &mut data[p * WORDS..(p + 1) * WORDS];
        if ((r >> 40) % 100) < u64::from(write_percent) {
            sums[p] = fill(page, xorshift(&mut rng));
        } else {
            let got = checksum(page);
            if got != sums[p] {
                shared.fail(format!(
                    "task {id} page {p}: checksum {got:#x}, expected {:#x}",
                    sums[p]
                ));
            } else {
                local_verified += 1;
            }
        }
        local_ops += 1;
        if local_ops % 8 == 0 {
            shared.memory_ops.fetch_add(8, Ordering::Relaxed);
        }
        usm_localmanager::yield_now();
    }
    shared
        .memory_ops
        .fetch_add(local_ops % 8, Ordering::Relaxed);
    // Final read-back of every page.
    let data = region.as_slice::<u64>();
    for (p, want) in sums.iter().enumerate() {
        let got = checksum(&data[p * WORDS..(p + 1) * WORDS]);
        if got != *want {
            shared.fail(format!(
                "task {id} page {p} (final read-back): checksum {got:#x}, expected {want:#x}"
            ));
        } else {
            local_verified += 1;
        }
        if p % 16 == 15 {
            usm_localmanager::yield_now();
        }
    }
    shared.verified.fetch_add(local_verified, Ordering::Relaxed);
    region
}

fn cpu_task(id: usize, shared: Arc<Shared>) {
    let mut x = 0x0c0f_fee0_u64 ^ id as u64;
    while !shared.stop.load(Ordering::Relaxed) {
        // Yield every slice: a worker serves new faults and swap-in completions between
        // rounds of uThread runs, so long slices would delay the memory tasks' faults.
        for _ in 0..CPU_OP_ROUNDS / CPU_SLICE_ROUNDS {
            for _ in 0..CPU_SLICE_ROUNDS {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                x ^= x >> 29;
            }
            std::hint::black_box(x);
            usm_localmanager::yield_now();
        }
        shared.cpu_ops.fetch_add(1, Ordering::Relaxed);
    }
}

fn progress_bar(args: &DemoArgs, len: u64, msg: &'static str) -> indicatif::ProgressBar {
    if args.no_progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:32}] {pos:>3}/{len:3} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(msg);
    bar
}

fn swap_file_path(dir: &Path) -> PathBuf {
    dir.join(format!("usm-demo-{}.swap", std::process::id()))
}

/// Runs the demo and returns its report; the caller prints [`DemoReport::table`].
/// Fails loudly on any data mismatch ([`DemoError::Corruption`]) or leak.
pub fn run(args: &DemoArgs) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let pool = args.pool_bytes();
    if args.workers == 0 || args.memory_tasks == 0 || args.ratio == 0 || pool < (4 << 20) {
        return Err(DemoError::Invalid(
            "need workers, memory tasks, a ratio >= 1 and a pool >= 4 MiB".into(),
        ));
    }
    let working_set = pool * args.ratio;
    let region_bytes = (working_set as usize / args.memory_tasks) / PAGE * PAGE;
    if region_bytes < PAGE {
        return Err(DemoError::Invalid(
            "working set too small for the tasks".into(),
        ));
    }
    let swap_path = swap_file_path(&args.swap_dir);
    // The guard exists before the file does: every path after this removes it.
    let _swap_guard = SwapFileGuard(swap_path.clone());
    let rt = Runtime::builder()
        .workers(args.workers)
        .pin_workers(true)
        .pool_frames((pool as usize) / PAGE)
        .create_swap_file(&swap_path, working_set + (64 << 20))
        .build()?;
    let report = storm(args, &rt, pool, region_bytes, started);
    let shutdown = rt.shutdown(Duration::from_secs(10));
    let mut report = report?;
    if !shutdown.stuck_in_handler.is_empty() {
        return Err(DemoError::Leak(format!(
            "{} uThreads stuck in the fault handler at shutdown",
            shutdown.stuck_in_handler.len()
        )));
    }
    report.total_s = started.elapsed().as_secs_f64();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| DemoError::Io {
            what: "serialising the report".into(),
            source: e.into(),
        })?;
        std::fs::write(path, text).map_err(|source| DemoError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    }
    Ok(report)
}

fn storm(
    args: &DemoArgs,
    rt: &Runtime,
    pool: u64,
    region_bytes: usize,
    started: Instant,
) -> Result<DemoReport, DemoError> {
    let shared = Arc::new(Shared::default());
    let mut memory = Vec::new();
    for id in 0..args.memory_tasks {
        let region = rt.region(region_bytes)?;
        let s = shared.clone();
        let wp = args.write_percent.min(100);
        memory.push(rt.spawn_on(id % args.workers, move || memory_task(region, id, wp, s))?);
    }
    // Populate phase.
    let populate_start = Instant::now();
    let bar = progress_bar(args, args.memory_tasks as u64, "populate");
    let mut tick = 0u32;
    while shared.populated_tasks.load(Ordering::SeqCst) < args.memory_tasks as u64 {
        bar.set_position(shared.populated_tasks.load(Ordering::SeqCst));
        tick += 1;
        if tick % 5 == 0 {
            let st = rt.stats();
            bar.set_message(format!("faults {} evicted {}", st.mm.faults, st.mm.evicted));
        }
        if memory.iter().any(|h| h.is_finished())
            || populate_start.elapsed() > Duration::from_secs(300)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bar.finish_and_clear();
    let populate_s = populate_start.elapsed().as_secs_f64();
    let mut cpu = Vec::new();
    for id in 0..args.cpu_tasks {
        let s = shared.clone();
        cpu.push(rt.spawn_on(id % args.workers, move || cpu_task(id, s))?);
    }
    // Storm phase.
    let before = rt.stats();
    let (m0, c0) = (
        shared.memory_ops.load(Ordering::Relaxed),
        shared.cpu_ops.load(Ordering::Relaxed),
    );
    let duration = args.duration();
    let storm_start = Instant::now();
    let bar = progress_bar(args, duration.as_secs().max(1) * 10, "storm");
    while storm_start.elapsed() < duration && shared.errors.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(100));
        let t = storm_start.elapsed().as_secs_f64().max(1e-3);
        let st = rt.stats();
        bar.set_position((t * 10.0) as u64);
        bar.set_message(format!(
            "mem {:.0}/s cpu {:.0}/s swap-ins {} evicted {}",
            (shared.memory_ops.load(Ordering::Relaxed) - m0) as f64 / t,
            (shared.cpu_ops.load(Ordering::Relaxed) - c0) as f64 / t,
            st.mm.swap_ins_done - before.mm.swap_ins_done,
            st.mm.evicted - before.mm.evicted,
        ));
    }
    let storm_s = storm_start.elapsed().as_secs_f64();
    let (m1, c1) = (
        shared.memory_ops.load(Ordering::Relaxed),
        shared.cpu_ops.load(Ordering::Relaxed),
    );
    shared.stop.store(true, Ordering::SeqCst);
    bar.finish_and_clear();
    // Verify phase (each task reads back its whole region) and join.
    let bar = progress_bar(args, args.memory_tasks as u64, "verify");
    let mut regions = Vec::new();
    let mut first_join_error = None;
    for h in memory {
        match h.join() {
            Ok(r) => regions.push(r),
            Err(e) => {
                first_join_error.get_or_insert(e);
            }
        }
        bar.inc(1);
    }
    for h in cpu {
        if let Err(e) = h.join() {
            first_join_error.get_or_insert(e);
        }
    }
    bar.finish_and_clear();
    let after = rt.stats();
    drop(regions);
    let errors = shared.errors.load(Ordering::Relaxed);
    if errors > 0 {
        let first = shared
            .first_error
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_default();
        return Err(DemoError::Corruption {
            count: errors,
            first,
        });
    }
    if let Some(e) = first_join_error {
        return Err(DemoError::Task(e));
    }
    check_returned(rt)?;
    Ok(report_from(
        args,
        pool,
        region_bytes,
        &after,
        ReportCounts {
            populate_s,
            storm_s,
            memory_ops: m1 - m0,
            cpu_ops: c1 - c0,
            verified: shared.verified.load(Ordering::Relaxed),
            swap_slots_after_drop: rt.stats().swap_slots_used,
            total_s: started.elapsed().as_secs_f64(),
        },
    ))
}

/// After the regions are dropped: the pool is full and no swap slot is in use.
fn check_returned(rt: &Runtime) -> Result<(), DemoError> {
    if !rt.quiesce(Duration::from_secs(20)) {
        return Err(DemoError::Leak(
            "swap I/O still in flight after 20 s".into(),
        ));
    }
    let slots = rt.stats().swap_slots_used;
    if slots != 0 {
        return Err(DemoError::Leak(format!("{slots} swap slots still in use")));
    }
    let frames = rt.pool_frames();
    let census = rt
        .check_conservation()
        .map_err(|e| DemoError::Leak(format!("pool conservation: {e}")))?;
    if census.free != frames {
        return Err(DemoError::Leak(format!(
            "pool not full after drop: {census}"
        )));
    }
    Ok(())
}

struct ReportCounts {
    populate_s: f64,
    storm_s: f64,
    memory_ops: u64,
    cpu_ops: u64,
    verified: u64,
    swap_slots_after_drop: u64,
    total_s: f64,
}

fn report_from(
    args: &DemoArgs,
    pool: u64,
    region_bytes: usize,
    after: &RuntimeStats,
    c: ReportCounts,
) -> DemoReport {
    let parked: u64 = after.sched.iter().map(|s| s.faults).sum();
    DemoReport {
        workers: args.workers,
        pool_mib: pool >> 20,
        working_set_mib: (region_bytes as u64 * args.memory_tasks as u64) >> 20,
        memory_tasks: args.memory_tasks,
        cpu_tasks: args.cpu_tasks,
        populate_s: c.populate_s,
        storm_s: c.storm_s,
        memory_ops: c.memory_ops,
        cpu_ops: c.cpu_ops,
        memory_ops_per_s: c.memory_ops as f64 / c.storm_s.max(1e-9),
        cpu_ops_per_s: c.cpu_ops as f64 / c.storm_s.max(1e-9),
        faults: after.mm.faults,
        fast_map: PathLatency::from(&after.mm.fast_map),
        swap_cache_hit: PathLatency::from(&after.mm.swap_cache_hit),
        swap_in: PathLatency::from(&after.mm.swap_in),
        swap_ins: after.mm.swap_ins_done,
        evictions: after.mm.evicted,
        faults_parked: parked,
        pages_verified: c.verified,
        errors: 0,
        swap_slots_after_drop: c.swap_slots_after_drop,
        total_s: c.total_s,
    }
}

/// What `usm demo` does: runs the demo, prints the final table (or the error, loudly, on
/// stderr) and returns the process exit code (0 only when every page verified).
pub fn run_cli(args: &DemoArgs) -> std::process::ExitCode {
    match run(args) {
        Ok(report) => {
            print!("{}", report.table());
            if let Some(path) = &args.json {
                println!("report written to {}", path.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("usm demo FAILED: {e}");
            if e.is_data_loss() {
                eprintln!("usm demo: data read back differs from what was written");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
