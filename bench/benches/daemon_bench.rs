//! Daemon mode (issue 7): cross-process fault latency and redis GET/SET under `usm exec`,
//! each against the kernel measured in the same run.
//!
//! ```text
//! cargo build --release -p usm-runtime -p usm-tagger    # `usm` and libusm_tagger.so
//! cargo bench -p usm-bench --bench daemon_bench -- [--json PATH] [--md PATH] [OPTIONS]
//! ```
//! (the bench runs that build itself first unless `--no-build`; `-- --help` lists options).
//!
//! # Part 1: fault latency (`fault_probe`, a C program this bench builds with gcc)
//! The probe mmaps fresh anonymous pages (`MADV_NOHUGEPAGE`), touches `--warm` pages
//! untimed, then writes one word to each of `--pages` pages timing every write alone
//! (`clock_gettime` pair; the pair's own cost is reported, not subtracted), then re-reads
//! every page, timed, checking the word (a lost word fails the run).
//! - `kernel`: the probe alone — the kernel's first-touch fault.
//! - `usm`: `usm exec --pool (pages + warm + 4096) -- fault_probe` — every first touch is
//!   a userfaultfd fault served by the private daemon in the `usm` process (a pool large
//!   enough: no eviction). The daemon's own summary (faults, daemon-side p50/p99) is kept
//!   and must show at least `--pages` faults, else the run fails.
//! - `kernel-budget` / `usm-budget` (skip with `--no-pressure`): `--pressure-pages` of data
//!   in ¼ of its size. The kernel side runs in a memory cgroup limited to that budget plus
//!   the probe's own footprint (measured at start: a 1-page probe's cgroup peak), with
//!   kernel swap on a fresh swap file in `--swap-dir`; USM's side has the budget as its
//!   pool and its private swap file in the same directory (same disk), no kernel swap.
//!   Here the re-read pass is a swap-in per evicted page on both sides.
//!
//! # Part 2: redis-benchmark GET/SET (Debian's redis-server; installed if missing)
//! Keys `key:%012d` × `value_bytes` populated by a pipelined client, then
//! `redis-benchmark -t set,get -n requests -r keys -d value_bytes -c clients --csv`
//! (`usm_bench::redis`). Sides:
//! - `kernel-plain`: plain redis-server, no memory pressure;
//! - `usm-exec`: redis-server under `usm exec` with a pool of 2 × dataset + 256 MiB;
//! - `kernel-cgroup-swapfile`: in a memory cgroup of `budget` with kernel swap on a swap
//!   file in `--swap-dir`;
//! - `usm-exec-budget`: under `usm exec --pool budget`, USM swap in `--swap-dir`.
//!
//! The `usm` sides also run in a memory cgroup, with a limit far above what they use, so
//! that every process of the side (the server is a grandchild) is killed on SIGINT/SIGTERM
//! or by the leftover cleanup after a SIGKILL; its peak shows USM's whole footprint.
//! `--redis-budget-only` runs only the budget pair. Every run records the machine-wide
//! `/proc/vmstat` swap counters over the side (`pswpin`, `pswpout`, `pgmajfault`; populate
//! included), to set the kernel's swap I/O beside USM's evictions and swap-ins.
//! `--config-line LINE` adds a line to the daemon's config (A/B of daemon settings, e.g.
//! `watermarks 512 1024`; see `bench/results/daemon-perf.md`).
//!
//! # Method
//! PM-QoS (`/dev/cpu_dma_latency`) is held at 0 µs for every side (`--no-pmqos` to skip);
//! the host backing is pre-warmed before every side (`--no-prewarm`); the daemon's waker
//! is set by a generated config (`--waker`). Sides are interleaved — each run executes
//! every side once, the order rotating run to run — with `--warmup` discarded runs first
//! (fault part; `--redis-warmup` for redis) and `--runs` measured runs. Tables show the
//! median over runs; ratios are medians over medians: latency `…_vs_kernel` (usm /
//! kernel, below 1 is faster), throughput `…_vs_plain` and `…_vs_kernel_budget`
//! (usm / kernel, above 1 is faster). The load average is sampled before every run.

#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};
use usm_bench::guard::{self, CgroupStats, MemCgroup, SwapFile};
use usm_bench::redis::{self, RedisContext, RedisResult, RedisSide, RedisSpec};
use usm_bench::report::{JsonReport, Table, fmt_f};
use usm_bench::stats::{LatencyHistogram, LatencySummary, median, ratio_vs_kernel};
use usm_bench::storm::SwapMedium;
use usm_bench::{Error, PmQos, Result};

const PAGE: u64 = 4096;
const PROBE_SOURCE: &str = include_str!("daemon_bench/fault_probe.c");

#[derive(Parser, Debug)]
#[command(
    about = "Daemon mode: cross-process fault latency and redis GET/SET under `usm exec`, \
             each against the kernel in the same run"
)]
struct Cli {
    /// Which parts to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    only: Part,
    /// Measured runs per side (interleaved).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Discarded warm-up runs of the fault part.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Discarded warm-up runs of the redis part.
    #[arg(long, default_value_t = 0)]
    redis_warmup: usize,
    /// Small sizes (fault 5000 / 2048 pages, redis 24 Ki keys in 48 MiB, 5000 requests).
    #[arg(long)]
    quick: bool,
    /// First touches timed per fault run, no pressure (default 20000).
    #[arg(long)]
    pages: Option<u64>,
    /// Pages of data of the pressure variant, in a budget of ¼ of it (default 8192).
    #[arg(long)]
    pressure_pages: Option<u64>,
    /// Untimed first touches before the timed ones.
    #[arg(long, default_value_t = 256)]
    warm: u64,
    /// Skip the fault-latency pressure variant.
    #[arg(long)]
    no_pressure: bool,
    /// redis: requests per test of the no-pressure pair, kernel-plain and usm-exec
    /// (default 50000; 20000 with --quick).
    #[arg(long)]
    redis_requests: Option<u64>,
    /// redis: requests per test of the budget pair, kernel-cgroup-swapfile and
    /// usm-exec-budget (default 10000; 5000 with --quick).
    #[arg(long)]
    redis_budget_requests: Option<u64>,
    /// redis: keys populated (default 98304).
    #[arg(long)]
    redis_keys: Option<u64>,
    /// redis: value size in bytes (default 4096).
    #[arg(long)]
    redis_value_bytes: Option<usize>,
    /// redis: memory budget in MiB of the budget sides (default 192).
    #[arg(long)]
    redis_budget_mib: Option<u64>,
    /// redis: parallel clients (default 16).
    #[arg(long)]
    redis_clients: Option<u32>,
    /// Directory of the kernel's and USM's swap files (on the project disk).
    #[arg(long, default_value = guard::DEFAULT_SWAP_DIR)]
    swap_dir: PathBuf,
    /// The `usm` binary (default: next to this bench's target directory, release).
    #[arg(long)]
    usm: Option<PathBuf>,
    /// `libusm_tagger.so` (default: next to `usm`).
    #[arg(long)]
    tagger: Option<PathBuf>,
    /// Do not run `cargo build --release -p usm-runtime -p usm-tagger` first.
    #[arg(long)]
    no_build: bool,
    /// redis: only the budget pair (kernel-cgroup-swapfile, usm-exec-budget).
    #[arg(long)]
    redis_budget_only: bool,
    /// An extra line for the daemon's config (repeatable), e.g. `--config-line
    /// "watermarks 128 384"`: A/B experiments against the defaults.
    #[arg(long)]
    config_line: Vec<String>,
    /// The daemon's `waker` setting (eventfd, eventfd+pmqos, spin).
    #[arg(long, default_value = "eventfd")]
    waker: String,
    /// Daemon worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seconds one side may take before its processes are killed and the run fails.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Do not hold /dev/cpu_dma_latency at 0.
    #[arg(long)]
    no_pmqos: bool,
    /// Do not pre-warm the host backing before each side.
    #[arg(long)]
    no_prewarm: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a Markdown report (command, machine, every run, medians) here.
    #[arg(long)]
    md: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Part {
    Fault,
    Redis,
    All,
}

fn main() {
    // `cargo bench` appends `--bench`; it means nothing here.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    if let Err(e) = run(&cli) {
        // A SIGINT/SIGTERM may have caused the error: let its cleanup finish first.
        guard::wait_for_signal_cleanup();
        eprintln!("daemon_bench: {e}");
        std::process::exit(1);
    }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.into(),
        source,
    }
}

/// 1-minute load average.
fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A scratch directory removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    /// Creates `TMP/usm-daemon-bench-<pid>`, removing those of dead pids (a run ended by a
    /// signal re-raises it and skips drops).
    fn create() -> Result<Self> {
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let dead = name
                    .strip_prefix("usm-daemon-bench-")
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if dead {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("usm-daemon-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| io_err("mkdir", &dir, e))?;
        Ok(Self(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The programs and files every side uses.
struct Tools {
    usm: PathBuf,
    tagger: PathBuf,
    probe: PathBuf,
    config: PathBuf,
    /// Where USM's private swap files go (a subdirectory of `--swap-dir`).
    usm_swap_dir: PathBuf,
    build: String,
    work: WorkDir,
}

/// The bench binary sits in `TARGET/release/deps/`; `usm` in `TARGET/release/`.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| io_err("current_exe", "/proc/self/exe", e))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Invalid(format!("no target directory above {}", exe.display())))
}

fn build_usm(profile: &Path) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = profile
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent", profile.display())))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let t0 = Instant::now();
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "usm-runtime",
            "-p",
            "usm-tagger",
        ])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(workspace)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io_err("spawn", PathBuf::from(&cargo), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        return Err(Error::Child {
            what: "cargo build --release -p usm-runtime -p usm-tagger".into(),
            detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(format!(
        "cargo build --release -p usm-runtime -p usm-tagger ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ))
}

fn gcc(source: &Path, out: &Path) -> Result<()> {
    let res = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(out)
        .arg(source)
        .output()
        .map_err(|e| Error::Unavailable {
            facility: "gcc",
            reason: e.to_string(),
        })?;
    if !res.status.success() {
        return Err(Error::Child {
            what: "gcc fault_probe.c".into(),
            detail: String::from_utf8_lossy(&res.stderr).into_owned(),
        });
    }
    Ok(())
}

impl Tools {
    fn prepare(cli: &Cli) -> Result<Self> {
        let profile = profile_dir()?;
        let build = if cli.no_build || cli.usm.is_some() {
            "not built by the bench".to_string()
        } else {
            build_usm(&profile)?
        };
        let usm = cli.usm.clone().unwrap_or_else(|| profile.join("usm"));
        let tagger = cli.tagger.clone().unwrap_or_else(|| {
            usm.parent()
                .unwrap_or(Path::new("."))
                .join("libusm_tagger.so")
        });
        for (what, p) in [("usm", &usm), ("libusm_tagger.so", &tagger)] {
            if !p.is_file() {
                return Err(Error::Unavailable {
                    facility: "usm binaries",
                    reason: format!(
                        "{what} not found at {}: run `cargo build --release -p usm-runtime \
                         -p usm-tagger` with this target directory, or pass --usm/--tagger",
                        p.display()
                    ),
                });
            }
        }
        if usm_runtime::config::WakerMode::parse(&cli.waker).is_none() {
            return Err(Error::Invalid(format!(
                "--waker {}: expected eventfd, eventfd+pmqos or spin",
                cli.waker
            )));
        }
        let work = WorkDir::create()?;
        let source = work.0.join("fault_probe.c");
        std::fs::write(&source, PROBE_SOURCE).map_err(|e| io_err("write", &source, e))?;
        let probe = work.0.join("fault_probe");
        gcc(&source, &probe)?;
        let config = work.0.join("usm.cfg");
        let mut text = format!(
            "# daemon_bench: the private daemon of every usm side\nworkers {}\nwaker {}\n",
            cli.workers.max(1),
            cli.waker
        );
        for line in &cli.config_line {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&config, text).map_err(|e| io_err("write", &config, e))?;
        let usm_swap_dir = cli.swap_dir.join("usm-exec");
        std::fs::create_dir_all(&usm_swap_dir).map_err(|e| io_err("mkdir", &usm_swap_dir, e))?;
        remove_dead_usm_swap_files(&usm_swap_dir);
        Ok(Self {
            usm,
            tagger,
            probe,
            config,
            usm_swap_dir,
            build,
            work,
        })
    }

    /// `usm exec` argv (through `env`, which sets the swap directory and the tagger).
    fn usm_exec_argv(&self, pool_pages: u64, swap_bytes: u64) -> Vec<String> {
        vec![
            "env".into(),
            format!("USM_SWAP_DIR={}", self.usm_swap_dir.display()),
            format!("USM_TAGGER={}", self.tagger.display()),
            self.usm.display().to_string(),
            "exec".into(),
            "--config".into(),
            self.config.display().to_string(),
            "--pool".into(),
            pool_pages.to_string(),
            "--swap-size".into(),
            format!("{}M", swap_bytes.div_ceil(1 << 20).max(256)),
            "--report".into(),
            "json".into(),
            "--".into(),
        ]
    }

    fn describe(&self) -> Value {
        let mtime = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        json!({
            "usm": self.usm, "usm_mtime_unix": mtime(&self.usm),
            "tagger": self.tagger, "tagger_mtime_unix": mtime(&self.tagger),
            "build": self.build,
        })
    }
}

/// USM's private swap files are `usm-swap-<pid>.img`; a SIGKILLed run leaves its file.
fn remove_dead_usm_swap_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("usm-swap-")
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The last JSON object line `usm exec --report json` printed on stderr.
fn usm_summary(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("managed").is_some())
}

fn summary_u64(s: &Value, key: &str) -> u64 {
    s.get(key).and_then(Value::as_u64).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Part 1: fault latency.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultSide {
    Kernel,
    Usm,
    KernelBudget,
    UsmBudget,
}

impl FaultSide {
    fn label(self) -> &'static str {
        match self {
            FaultSide::Kernel => "kernel",
            FaultSide::Usm => "usm",
            FaultSide::KernelBudget => "kernel-budget",
            FaultSide::UsmBudget => "usm-budget",
        }
    }
}

/// One run of one side.
#[derive(Debug, Clone, Serialize)]
struct FaultRun {
    side: &'static str,
    run: usize,
    pages: u64,
    load_avg_1m: f64,
    timer_pair_ns: u64,
    /// Per first touch, ns.
    touch: LatencySummary,
    /// Per re-read of a touched page, ns (a swap-in when it was evicted).
    reread: LatencySummary,
    wall_s: f64,
    /// `usm exec --report json` (USM sides).
    usm: Option<Value>,
    cgroup: Option<CgroupStats>,
    /// Peak of memory+swap minus peak of memory in the side's cgroup: what the kernel
    /// swapped (0 on the USM sides, whose swap is USM's own).
    kernel_swapped_bytes: u64,
    /// Kernel swaps active during the run (the side's own at priority 1000; others are
    /// another job's on this shared machine).
    active_swaps: Vec<guard::ActiveSwap>,
}

struct FaultPlan {
    pages: u64,
    pressure_pages: u64,
    warm: u64,
    /// Cgroup peak of a 1-page probe: what the kernel-budget side gets above the budget.
    probe_overhead_bytes: u64,
}

impl FaultPlan {
    fn pages_of(&self, side: FaultSide) -> u64 {
        match side {
            FaultSide::Kernel | FaultSide::Usm => self.pages,
            _ => self.pressure_pages,
        }
    }

    fn budget_pages(&self) -> u64 {
        (self.pressure_pages / 4).max(16)
    }
}

/// Kills every process in `cg` (all started by this bench) by pid.
fn kill_members(cg: &MemCgroup) {
    for pid in cg.pids().unwrap_or_default() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Spawns `cmd` (already placed in `cg`) with stdout/stderr to files and waits at most
/// `timeout`; on timeout every process of the group is killed and the run fails.
fn run_in_group(
    cmd: &mut Command,
    cg: &MemCgroup,
    work: &Path,
    tag: &str,
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    let out_path = work.join(format!("{tag}.out"));
    let err_path = work.join(format!("{tag}.err"));
    let out = std::fs::File::create(&out_path).map_err(|e| io_err("create", &out_path, e))?;
    let err = std::fs::File::create(&err_path).map_err(|e| io_err("create", &err_path, e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = cmd
        .spawn()
        .map_err(|e| io_err("spawn", PathBuf::from(format!("{cmd:?}")), e))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| io_err("wait", &out_path, e))? {
            break s;
        }
        if Instant::now() >= deadline {
            kill_members(cg);
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Child {
                what: tag.into(),
                detail: format!("still running after {} s: killed", timeout.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let (o, e) = (read(&out_path), read(&err_path));
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok((status, o, e))
}

fn latencies(line: &str) -> Result<LatencyHistogram> {
    let mut h = LatencyHistogram::new()?;
    for v in line.split_whitespace().skip(1) {
        let ns: u64 = v.parse().map_err(|_| Error::Parse {
            what: "fault_probe output",
            detail: v.into(),
        })?;
        h.record_ns(ns);
    }
    Ok(h)
}

/// Parses the probe's stdout: (timer pair ns, touch, reread).
fn parse_probe(out: &str, pages: u64) -> Result<(u64, LatencySummary, LatencySummary)> {
    if let Some(bad) = out.lines().find(|l| l.starts_with("BAD")) {
        return Err(Error::Corruption(format!("fault_probe: {bad}")));
    }
    if !out.lines().any(|l| l == "OK") {
        return Err(Error::Child {
            what: "fault_probe".into(),
            detail: format!("no OK in its output: {:?}", &out[..out.len().min(200)]),
        });
    }
    let line = |k: &str| out.lines().find(|l| l.split_whitespace().next() == Some(k));
    let timer = line("timer_ns")
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let touch = latencies(line("touch").unwrap_or_default())?;
    let reread = latencies(line("reread").unwrap_or_default())?;
    if touch.len() != pages || reread.len() != pages {
        return Err(Error::Parse {
            what: "fault_probe output",
            detail: format!(
                "{} touches and {} re-reads for {pages} pages",
                touch.len(),
                reread.len()
            ),
        });
    }
    Ok((timer, touch.summary(), reread.summary()))
}

/// Room above any real use, for the groups that only hold a side's processes.
const UNLIMITED_GROUP: u64 = 64 << 30;

fn fault_once(
    side: FaultSide,
    run: usize,
    plan: &FaultPlan,
    tools: &Tools,
    cli: &Cli,
) -> Result<FaultRun> {
    let pages = plan.pages_of(side);
    let data = (pages + plan.warm) * PAGE;
    let swap_bytes = 2 * data + (64 << 20);
    if !cli.no_prewarm {
        usm_bench::prewarm::prewarm_host(2 * data + (64 << 20))?;
    }
    let load = load_avg();
    let swap = match side {
        FaultSide::KernelBudget => Some(SwapFile::create(&cli.swap_dir, swap_bytes, 1000)?),
        _ => None,
    };
    let active_swaps = guard::active_swaps()?;
    let limit = match side {
        FaultSide::KernelBudget => plan.budget_pages() * PAGE + plan.probe_overhead_bytes,
        _ => UNLIMITED_GROUP,
    };
    let cg = MemCgroup::create(&format!("daemon-fault-{}", side.label()), limit)?;
    let probe_args = [pages.to_string(), plan.warm.to_string()];
    let mut cmd = match side {
        FaultSide::Kernel | FaultSide::KernelBudget => {
            let mut c = Command::new(&tools.probe);
            c.args(probe_args);
            c
        }
        FaultSide::Usm | FaultSide::UsmBudget => {
            let pool = if side == FaultSide::Usm {
                pages + plan.warm + 4096
            } else {
                plan.budget_pages()
            };
            let argv = tools.usm_exec_argv(pool, swap_bytes);
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]).arg(&tools.probe).args(probe_args);
            c
        }
    };
    cg.place_before_exec(&mut cmd);
    let t0 = Instant::now();
    let (status, out, err) = run_in_group(
        &mut cmd,
        &cg,
        &tools.work.0,
        &format!("fault-{}-{run}", side.label()),
        Duration::from_secs(cli.timeout_s),
    )?;
    let wall_s = t0.elapsed().as_secs_f64();
    let cgroup = cg.stats().ok();
    let kernel_swapped_bytes = cgroup
        .as_ref()
        .map_or(0, |c| c.peak_with_swap_bytes.saturating_sub(c.peak_bytes));
    drop(cg);
    drop(swap);
    if !status.success() {
        // A lost word prints BAD before the non-zero exit.
        parse_probe(&out, pages)?;
        return Err(Error::Child {
            what: format!("fault side {}", side.label()),
            detail: format!("{status}; stderr: {}", err.trim()),
        });
    }
    let (timer_pair_ns, touch, reread) = parse_probe(&out, pages)?;
    let usm = match side {
        FaultSide::Usm | FaultSide::UsmBudget => {
            let s = usm_summary(&err).ok_or_else(|| Error::Child {
                what: "usm exec".into(),
                detail: format!("no JSON summary on stderr: {}", err.trim()),
            })?;
            let faults = summary_u64(&s, "faults");
            if s.get("managed") != Some(&Value::Bool(true)) || faults < pages {
                return Err(Error::Invalid(format!(
                    "only {faults} faults reached the daemon for {pages} pages (summary {s})"
                )));
            }
            if side == FaultSide::UsmBudget && summary_u64(&s, "evictions") == 0 {
                return Err(Error::Invalid(format!(
                    "usm-budget evicted nothing: no pressure (summary {s})"
                )));
            }
            Some(s)
        }
        _ => None,
    };
    let major = cgroup.as_ref().map_or(0, |c| c.major_faults);
    if side == FaultSide::KernelBudget && kernel_swapped_bytes == 0 && major == 0 {
        return Err(Error::Invalid(
            "kernel-budget swapped nothing: no pressure".into(),
        ));
    }
    Ok(FaultRun {
        side: side.label(),
        run,
        pages,
        load_avg_1m: load,
        timer_pair_ns,
        touch,
        reread,
        wall_s,
        usm,
        cgroup,
        kernel_swapped_bytes,
        active_swaps,
    })
}

/// Cgroup peak of the probe touching one page: its footprint apart from the data.
fn probe_overhead(tools: &Tools, cli: &Cli) -> Result<u64> {
    let cg = MemCgroup::create("daemon-probe-overhead", UNLIMITED_GROUP)?;
    let mut cmd = Command::new(&tools.probe);
    cmd.args(["1", "0"]);
    cg.place_before_exec(&mut cmd);
    let (status, out, err) = run_in_group(
        &mut cmd,
        &cg,
        &tools.work.0,
        "probe-overhead",
        Duration::from_secs(cli.timeout_s),
    )?;
    if !status.success() {
        return Err(Error::Child {
            what: "fault_probe 1 0".into(),
            detail: format!("{status}: {out} {err}"),
        });
    }
    Ok(cg.stats()?.peak_bytes)
}

fn fault_part(cli: &Cli, tools: &Tools) -> Result<Value> {
    let plan = FaultPlan {
        pages: cli.pages.unwrap_or(if cli.quick { 5000 } else { 20_000 }),
        pressure_pages: cli
            .pressure_pages
            .unwrap_or(if cli.quick { 2048 } else { 8192 }),
        warm: cli.warm,
        probe_overhead_bytes: probe_overhead(tools, cli)?,
    };
    let mut sides = vec![FaultSide::Kernel, FaultSide::Usm];
    if !cli.no_pressure {
        sides.extend([FaultSide::KernelBudget, FaultSide::UsmBudget]);
    }
    let mut runs: Vec<FaultRun> = Vec::new();
    let total = cli.warmup + cli.runs.max(1);
    for i in 0..total {
        let mut order = sides.clone();
        order.rotate_left(i % sides.len());
        for &side in &order {
            let r = fault_once(side, i, &plan, tools, cli)?;
            eprintln!(
                "fault run {i}{} {:<13} touch p50 {:>7} ns p99 {:>8} ns, reread p50 {:>7} ns (load {:.1})",
                if i < cli.warmup { " (warm-up)" } else { "" },
                r.side,
                r.touch.p50_ns,
                r.touch.p99_ns,
                r.reread.p50_ns,
                r.load_avg_1m
            );
            if i >= cli.warmup {
                runs.push(r);
            }
        }
    }
    let med = |side: FaultSide, f: fn(&FaultRun) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.side == side.label())
            .map(f)
            .collect();
        median(&v)
    };
    let mut medians = serde_json::Map::new();
    for &side in &sides {
        medians.insert(
            side.label().into(),
            json!({
                "touch_p50_ns": med(side, |r| r.touch.p50_ns as f64),
                "touch_p99_ns": med(side, |r| r.touch.p99_ns as f64),
                "touch_mean_ns": med(side, |r| r.touch.mean_ns),
                "reread_p50_ns": med(side, |r| r.reread.p50_ns as f64),
                "reread_p99_ns": med(side, |r| r.reread.p99_ns as f64),
                "daemon_fault_p50_us": med(side, |r| r.usm.as_ref().and_then(|s| s["fault_p50_us"].as_f64()).unwrap_or(f64::NAN)),
                "daemon_fault_p99_us": med(side, |r| r.usm.as_ref().and_then(|s| s["fault_p99_us"].as_f64()).unwrap_or(f64::NAN)),
                "wall_s": med(side, |r| r.wall_s),
            }),
        );
    }
    let m = |side: FaultSide, k: &str| {
        medians
            .get(side.label())
            .and_then(|v| v[k].as_f64())
            .unwrap_or(f64::NAN)
    };
    let mut ratios = json!({
        "usm_p50_vs_kernel": ratio_vs_kernel(m(FaultSide::Usm, "touch_p50_ns"), m(FaultSide::Kernel, "touch_p50_ns")),
        "usm_p99_vs_kernel": ratio_vs_kernel(m(FaultSide::Usm, "touch_p99_ns"), m(FaultSide::Kernel, "touch_p99_ns")),
    });
    if !cli.no_pressure {
        ratios["usm_budget_p50_vs_kernel_budget"] = json!(ratio_vs_kernel(
            m(FaultSide::UsmBudget, "touch_p50_ns"),
            m(FaultSide::KernelBudget, "touch_p50_ns")
        ));
        ratios["usm_budget_p99_vs_kernel_budget"] = json!(ratio_vs_kernel(
            m(FaultSide::UsmBudget, "touch_p99_ns"),
            m(FaultSide::KernelBudget, "touch_p99_ns")
        ));
        ratios["usm_budget_reread_p50_vs_kernel_budget"] = json!(ratio_vs_kernel(
            m(FaultSide::UsmBudget, "reread_p50_ns"),
            m(FaultSide::KernelBudget, "reread_p50_ns")
        ));
        ratios["usm_budget_reread_p99_vs_kernel_budget"] = json!(ratio_vs_kernel(
            m(FaultSide::UsmBudget, "reread_p99_ns"),
            m(FaultSide::KernelBudget, "reread_p99_ns")
        ));
    }
    let mut t = Table::new(&[
        "side",
        "pages",
        "touch p50 ns",
        "touch p99 ns",
        "p50 vs kernel",
        "p99 vs kernel",
        "reread p50 ns",
        "reread p99 ns",
        "daemon p50 us",
    ]);
    for &side in &sides {
        let base = if matches!(side, FaultSide::Kernel | FaultSide::Usm) {
            FaultSide::Kernel
        } else {
            FaultSide::KernelBudget
        };
        t.row(vec![
            side.label().into(),
            plan.pages_of(side).to_string(),
            fmt_f(Some(m(side, "touch_p50_ns")), 0),
            fmt_f(Some(m(side, "touch_p99_ns")), 0),
            fmt_f(
                ratio_vs_kernel(m(side, "touch_p50_ns"), m(base, "touch_p50_ns")),
                2,
            ),
            fmt_f(
                ratio_vs_kernel(m(side, "touch_p99_ns"), m(base, "touch_p99_ns")),
                2,
            ),
            fmt_f(Some(m(side, "reread_p50_ns")), 0),
            fmt_f(Some(m(side, "reread_p99_ns")), 0),
            fmt_f(Some(m(side, "daemon_fault_p50_us")), 1),
        ]);
    }
    println!(
        "\n== cross-process first-touch fault latency (median of {} runs; budget sides: {} pages in {} + probe {} KiB)\n{}",
        cli.runs.max(1),
        plan.pressure_pages,
        plan.budget_pages(),
        plan.probe_overhead_bytes >> 10,
        t.render()
    );
    Ok(json!({
        "pages": plan.pages,
        "pressure_pages": if cli.no_pressure { Value::Null } else { json!(plan.pressure_pages) },
        "budget_pages": plan.budget_pages(),
        "warm_pages": plan.warm,
        "probe_overhead_bytes": plan.probe_overhead_bytes,
        "usm_pool_pages_no_pressure": plan.pages + plan.warm + 4096,
        "medians": medians,
        "ratios": ratios,
        "runs": runs,
    }))
}

// ---------------------------------------------------------------------------------------
// Part 2: redis.

/// One run of one redis side.
#[derive(Debug, Clone, Serialize)]
struct RedisRun {
    run: usize,
    load_avg_1m: f64,
    result: RedisResult,
    /// `usm exec --report json` (USM sides).
    usm: Option<Value>,
    /// Kernel swaps active when the side started (another job's, on this shared machine;
    /// the kernel side's own swap file comes on after this and takes priority 1000).
    active_swaps_before: Vec<guard::ActiveSwap>,
    /// Machine-wide `/proc/vmstat` deltas over the side (populate included): the kernel
    /// side's swap I/O against USM's evictions and swap-ins.
    vm: VmCounters,
}

/// `/proc/vmstat` swap counters (machine-wide: another job swapping meanwhile shows too).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct VmCounters {
    /// Pages read from swap (faulted and read ahead).
    pswpin: u64,
    /// Pages written to swap.
    pswpout: u64,
    /// Major faults.
    pgmajfault: u64,
}

impl VmCounters {
    fn read() -> VmCounters {
        let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0)
        };
        VmCounters {
            pswpin: field("pswpin"),
            pswpout: field("pswpout"),
            pgmajfault: field("pgmajfault"),
        }
    }

    fn since(&self, before: &VmCounters) -> VmCounters {
        VmCounters {
            pswpin: self.pswpin.saturating_sub(before.pswpin),
            pswpout: self.pswpout.saturating_sub(before.pswpout),
            pgmajfault: self.pgmajfault.saturating_sub(before.pgmajfault),
        }
    }
}

fn redis_part(cli: &Cli, tools: &Tools) -> Result<Value> {
    let mut spec = if cli.quick {
        RedisSpec::quick()
    } else {
        RedisSpec::default_run()
    };
    if let Some(v) = cli.redis_keys {
        spec.keys = v;
    }
    if let Some(v) = cli.redis_value_bytes {
        spec.value_bytes = v;
    }
    if let Some(v) = cli.redis_budget_mib {
        spec.budget_bytes = v << 20;
    }
    if let Some(v) = cli.redis_clients {
        spec.clients = v;
    }
    let ctx = RedisContext {
        swap_dir: cli.swap_dir.clone(),
        zram_wait: Duration::from_secs(20),
        prewarm: !cli.no_prewarm,
    };
    // Each compared pair shares one spec; the budget pair runs fewer requests (≈ 1-2 k/s).
    let mut budget_spec = spec.clone();
    spec.requests = cli
        .redis_requests
        .unwrap_or(if cli.quick { 20_000 } else { 50_000 });
    budget_spec.requests =
        cli.redis_budget_requests
            .unwrap_or(if cli.quick { 5_000 } else { 10_000 });
    let spec_of = |side: &RedisSide| {
        if side.label.contains("budget") || side.kernel_swap.is_some() {
            &budget_spec
        } else {
            &spec
        }
    };
    let dataset = spec.dataset_bytes();
    // The kernel side's swap file is 2 × dataset + 64 MiB (usm_bench::redis); USM's too.
    let swap_bytes = 2 * dataset + (64 << 20);
    let big_pool = (2 * dataset + (256 << 20)).div_ceil(PAGE);
    let budget_pool = spec.budget_bytes.div_ceil(PAGE);
    let mut sides = vec![
        RedisSide::plain(),
        RedisSide::wrapped(
            "usm-exec",
            tools.usm_exec_argv(big_pool, swap_bytes),
            Some(UNLIMITED_GROUP),
        ),
        RedisSide::kernel_swap(SwapMedium::File, spec.budget_bytes),
        RedisSide::wrapped(
            "usm-exec-budget",
            tools.usm_exec_argv(budget_pool, swap_bytes),
            Some(UNLIMITED_GROUP),
        ),
    ];
    if cli.redis_budget_only {
        sides.drain(..2);
    }
    redis::ensure_redis_installed()?;
    let mut runs: Vec<RedisRun> = Vec::new();
    let total = cli.redis_warmup + cli.runs.max(1);
    for i in 0..total {
        let mut order: Vec<&RedisSide> = sides.iter().collect();
        order.rotate_left(i % sides.len());
        for side in order {
            let load = load_avg();
            let active_swaps_before = guard::active_swaps()?;
            let vm_before = VmCounters::read();
            let (result, log) = redis::run_redis_side_logged(side, spec_of(side), &ctx)?;
            let vm = VmCounters::read().since(&vm_before);
            let usm = if side.wrapper.is_empty() {
                None
            } else {
                let s = usm_summary(&log).ok_or_else(|| Error::Child {
                    what: format!("usm exec redis-server ({})", side.label),
                    detail: format!("no JSON summary; log tail: {}", tail(&log, 800)),
                })?;
                if s.get("managed") != Some(&Value::Bool(true)) || summary_u64(&s, "faults") == 0 {
                    return Err(Error::Invalid(format!(
                        "redis-server was not managed under usm exec: {s}"
                    )));
                }
                Some(s)
            };
            eprintln!(
                "redis run {i}{} {:<22} GET {:>9.0}/s SET {:>9.0}/s (load {load:.1})",
                if i < cli.redis_warmup {
                    " (warm-up)"
                } else {
                    ""
                },
                result.label,
                result.get_ops_per_s,
                result.set_ops_per_s
            );
            if i >= cli.redis_warmup {
                runs.push(RedisRun {
                    run: i,
                    load_avg_1m: load,
                    result,
                    usm,
                    active_swaps_before,
                    vm,
                });
            }
        }
    }
    let med = |label: &str, f: fn(&RedisRun) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.result.label == label)
            .map(f)
            .collect();
        median(&v)
    };
    let mut medians = serde_json::Map::new();
    for side in &sides {
        let l = side.label.as_str();
        medians.insert(
            l.into(),
            json!({
                "get_ops_per_s": med(l, |r| r.result.get_ops_per_s),
                "set_ops_per_s": med(l, |r| r.result.set_ops_per_s),
                "get_p50_ms": med(l, |r| r.result.get_p50_ms),
                "get_p99_ms": med(l, |r| r.result.get_p99_ms),
                "set_p50_ms": med(l, |r| r.result.set_p50_ms),
                "set_p99_ms": med(l, |r| r.result.set_p99_ms),
                "populate_s": med(l, |r| r.result.populate_s),
                "cgroup_peak_bytes": med(l, |r| r.result.cgroup.as_ref().map_or(f64::NAN, |c| c.peak_bytes as f64)),
                "usm_evictions": med(l, |r| r.usm.as_ref().map_or(f64::NAN, |s| summary_u64(s, "evictions") as f64)),
                "usm_swapins": med(l, |r| r.usm.as_ref().map_or(f64::NAN, |s| summary_u64(s, "swapins") as f64)),
                "usm_coverage": med(l, |r| r.usm.as_ref().and_then(|s| s["coverage"].as_f64()).unwrap_or(f64::NAN)),
            }),
        );
    }
    let m = |l: &str, k: &str| {
        medians
            .get(l)
            .and_then(|v| v[k].as_f64())
            .unwrap_or(f64::NAN)
    };
    let (plain, usm, kb, ub) = (
        "kernel-plain",
        "usm-exec",
        "kernel-cgroup-swapfile",
        "usm-exec-budget",
    );
    let ratios = json!({
        "usm_get_vs_plain": ratio_vs_kernel(m(usm, "get_ops_per_s"), m(plain, "get_ops_per_s")),
        "usm_set_vs_plain": ratio_vs_kernel(m(usm, "set_ops_per_s"), m(plain, "set_ops_per_s")),
        "usm_budget_get_vs_kernel_budget": ratio_vs_kernel(m(ub, "get_ops_per_s"), m(kb, "get_ops_per_s")),
        "usm_budget_set_vs_kernel_budget": ratio_vs_kernel(m(ub, "set_ops_per_s"), m(kb, "set_ops_per_s")),
        "kernel_budget_get_vs_plain": ratio_vs_kernel(m(kb, "get_ops_per_s"), m(plain, "get_ops_per_s")),
        "usm_budget_get_vs_plain": ratio_vs_kernel(m(ub, "get_ops_per_s"), m(plain, "get_ops_per_s")),
    });
    let mut t = Table::new(&[
        "side",
        "GET ops/s",
        "SET ops/s",
        "GET vs base",
        "SET vs base",
        "GET p99 ms",
        "SET p99 ms",
        "cgroup peak MiB",
        "usm evict",
        "usm swapin",
    ]);
    for side in &sides {
        let l = side.label.as_str();
        let base = if l == usm || l == plain { plain } else { kb };
        t.row(vec![
            l.into(),
            fmt_f(Some(m(l, "get_ops_per_s")), 0),
            fmt_f(Some(m(l, "set_ops_per_s")), 0),
            fmt_f(
                ratio_vs_kernel(m(l, "get_ops_per_s"), m(base, "get_ops_per_s")),
                2,
            ),
            fmt_f(
                ratio_vs_kernel(m(l, "set_ops_per_s"), m(base, "set_ops_per_s")),
                2,
            ),
            fmt_f(Some(m(l, "get_p99_ms")), 3),
            fmt_f(Some(m(l, "set_p99_ms")), 3),
            fmt_f(Some(m(l, "cgroup_peak_bytes") / f64::from(1u32 << 20)), 0),
            fmt_f(Some(m(l, "usm_evictions")), 0),
            fmt_f(Some(m(l, "usm_swapins")), 0),
        ]);
    }
    println!(
        "\n== redis-benchmark -t set,get -n {}/{} -r {} -d {} -c {} (dataset {} MiB, budget {} MiB; median of {} runs; base = kernel-plain / kernel-cgroup-swapfile)\n{}",
        spec.requests,
        budget_spec.requests,
        spec.keys,
        spec.value_bytes,
        spec.clients,
        dataset >> 20,
        spec.budget_bytes >> 20,
        cli.runs.max(1),
        t.render()
    );
    Ok(json!({
        "spec": spec,
        "budget_requests": budget_spec.requests,
        "usm_pool_pages_no_pressure": big_pool,
        "usm_pool_pages_budget": budget_pool,
        "swap_file_bytes": swap_bytes,
        "sides": sides,
        "medians": medians,
        "ratios": ratios,
        "runs": runs,
    }))
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

// ---------------------------------------------------------------------------------------

fn run(cli: &Cli) -> Result<()> {
    let cleaned = usm_bench::cleanup::cleanup_leftovers(std::slice::from_ref(&cli.swap_dir))?;
    if !cleaned.is_clean() {
        eprintln!("cleanup of a previous run: {cleaned:?}");
    }
    let tools = Tools::prepare(cli)?;
    let qos = PmQos::hold_zero_unless(cli.no_pmqos);
    // Faults are served by the memory manager on the daemon's workers (`usm stat`
    // reports it as `fault_runner`).
    let fault_runner = "workers".to_owned();
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let swaps_start = guard::active_swaps()?;
    let t0 = Instant::now();
    let mut report = JsonReport::new("daemon_bench");
    report.insert("quick", cli.quick)?;
    report.insert("runs", cli.runs.max(1))?;
    report.insert("pm_qos_us", qos.as_ref().map(|_| 0))?;
    report.insert("waker", &cli.waker)?;
    report.insert("daemon_workers", cli.workers.max(1))?;
    report.insert("fault_runner", &fault_runner)?;
    report.insert("tools", tools.describe())?;
    report.insert("swap_dir", &cli.swap_dir)?;
    report.insert("load_avg_start", load_start.trim())?;
    report.insert("swaps_at_start", &swaps_start)?;
    let fault = if cli.only != Part::Redis {
        Some(fault_part(cli, &tools)?)
    } else {
        None
    };
    let redis = if cli.only != Part::Fault {
        Some(redis_part(cli, &tools)?)
    } else {
        None
    };
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let swaps_end = guard::active_swaps()?;
    if swaps_end != swaps_start {
        eprintln!("WARNING: active swaps differ from the start: {swaps_start:?} -> {swaps_end:?}");
    }
    report.insert("load_avg_end", load_end.trim())?;
    report.insert("swaps_at_end", &swaps_end)?;
    report.insert("total_s", t0.elapsed().as_secs_f64())?;
    report.insert("fault_latency", &fault)?;
    report.insert("redis", &redis)?;
    println!(
        "\nPM-QoS {}, waker {}, fault runner {fault_runner}, load average {} -> {}, {:.0} s",
        if qos.is_some() { "0 us" } else { "not held" },
        cli.waker,
        load_start.trim(),
        load_end.trim(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = &cli.json {
        report.write(path)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &cli.md {
        let text = markdown(&report.to_value());
        std::fs::write(path, text).map_err(|e| io_err("write", path, e))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Markdown report.

fn f(v: &Value, digits: usize) -> String {
    fmt_f(v.as_f64(), digits)
}

fn us(v: &Value) -> String {
    fmt_f(v.as_f64().map(|x| x / 1e3), 2)
}

fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let meta = &r["meta"];
    let args: Vec<String> = meta["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .skip(1)
                .filter_map(|x| x.as_str().map(str::to_owned))
                .filter(|x| x != "--bench")
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "# Daemon mode: `usm exec` against the kernel (issue 7)\n"
    );
    let _ = writeln!(
        s,
        "Generated by `cargo bench -p usm-bench --bench daemon_bench -- {}` \
         (unix time {}, {:.0} s).\n",
        args.join(" "),
        meta["unix_time"],
        r["total_s"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        s,
        "Machine: Linux {}, {} vCPUs, {} GiB RAM, shared with other build jobs; load average \
         `{}` at the start, `{}` at the end (each run's 1-minute load is in the tables below). \
         PM-QoS `/dev/cpu_dma_latency` {} for every side; daemon `waker {}`, {} workers, \
         fault runner `{}`; `usm` = {} ({}). Sides are interleaved (each run executes every \
         side once, the order rotating), host backing pre-warmed before each side; figures \
         are medians over runs. Swap for the kernel sides is a fresh swap file in `{}`, \
         USM's private swap file is in the same directory (same disk); the kernel sides' swap \
         file has priority 1000, above any swap another job on this machine may turn on \
         meanwhile (those are listed per run in the JSON: `active_swaps`).\n",
        meta["kernel"].as_str().unwrap_or("?"),
        meta["cpus"],
        meta["mem_total_bytes"].as_u64().unwrap_or(0) >> 30,
        r["load_avg_start"].as_str().unwrap_or(""),
        r["load_avg_end"].as_str().unwrap_or(""),
        if r["pm_qos_us"].is_null() {
            "not held"
        } else {
            "held at 0 µs"
        },
        r["waker"].as_str().unwrap_or("?"),
        r["daemon_workers"],
        r["fault_runner"].as_str().unwrap_or("?"),
        r["tools"]["usm"].as_str().unwrap_or("?"),
        r["tools"]["build"].as_str().unwrap_or("?"),
        r["swap_dir"].as_str().unwrap_or("?"),
    );
    let fl = &r["fault_latency"];
    if !fl.is_null() {
        let _ = writeln!(s, "## Cross-process first-touch fault latency\n");
        let _ = writeln!(
            s,
            "`fault_probe` (C, built by the bench) times each first write to {} fresh pages \
             (`clock_gettime` pair ≈ {} ns, not subtracted) after {} untimed ones, then \
             re-reads and checks every page. `kernel` = the probe alone; `usm` = under \
             `usm exec --pool {}` (no eviction); `kernel-budget` / `usm-budget` = {} pages in \
             a budget of {} pages: the kernel in a memory cgroup of that budget + the probe's \
             own {} KiB with kernel swap on, USM with that pool and its swap file. \
             \"daemon\" is the daemon's own fault service time (message read → page \
             installed), from `usm exec --report json`.\n",
            fl["pages"],
            fl["runs"][0]["timer_pair_ns"],
            fl["warm_pages"],
            fl["usm_pool_pages_no_pressure"],
            fl["pressure_pages"],
            fl["budget_pages"],
            fl["probe_overhead_bytes"].as_u64().unwrap_or(0) >> 10,
        );
        let _ = writeln!(
            s,
            "| side | first touch p50 | p99 | p50 vs kernel | p99 vs kernel | re-read p50 | re-read p99 | daemon p50 / p99 |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let ratios = &fl["ratios"];
        if let Some(meds) = fl["medians"].as_object() {
            let order = ["kernel", "usm", "kernel-budget", "usm-budget"];
            for (side, m) in order.iter().filter_map(|k| Some((*k, meds.get(*k)?))) {
                let (r50, r99) = match side {
                    "usm" => (&ratios["usm_p50_vs_kernel"], &ratios["usm_p99_vs_kernel"]),
                    "usm-budget" => (
                        &ratios["usm_budget_p50_vs_kernel_budget"],
                        &ratios["usm_budget_p99_vs_kernel_budget"],
                    ),
                    _ => (&Value::Null, &Value::Null),
                };
                let _ = writeln!(
                    s,
                    "| {side} | {} µs | {} µs | {} | {} | {} µs | {} µs | {} / {} µs |",
                    us(&m["touch_p50_ns"]),
                    us(&m["touch_p99_ns"]),
                    f(r50, 2),
                    f(r99, 2),
                    us(&m["reread_p50_ns"]),
                    us(&m["reread_p99_ns"]),
                    f(&m["daemon_fault_p50_us"], 1),
                    f(&m["daemon_fault_p99_us"], 1),
                );
            }
        }
        let _ = writeln!(s, "\nEvery run:\n");
        let _ = writeln!(
            s,
            "| run | side | load | touch p50 | touch p99 | re-read p50 | re-read p99 | daemon faults | evictions | swap-ins | kernel swapped |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for run in fl["runs"].as_array().into_iter().flatten() {
            let u = &run["usm"];
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} µs | {} µs | {} µs | {} µs | {} | {} | {} | {} MiB |",
                run["run"],
                run["side"].as_str().unwrap_or(""),
                f(&run["load_avg_1m"], 1),
                us(&run["touch"]["p50_ns"]),
                us(&run["touch"]["p99_ns"]),
                us(&run["reread"]["p50_ns"]),
                us(&run["reread"]["p99_ns"]),
                if u.is_null() {
                    "–".into()
                } else {
                    u["faults"].to_string()
                },
                if u.is_null() {
                    "–".into()
                } else {
                    u["evictions"].to_string()
                },
                if u.is_null() {
                    "–".into()
                } else {
                    u["swapins"].to_string()
                },
                run["kernel_swapped_bytes"].as_u64().unwrap_or(0) >> 20,
            );
        }
        let _ = writeln!(s);
    }
    let rd = &r["redis"];
    if !rd.is_null() {
        let sp = &rd["spec"];
        let _ = writeln!(s, "## redis-benchmark GET/SET\n");
        let _ = writeln!(
            s,
            "`redis-benchmark -t set,get -n {} -r {} -d {} -c {} -P {} --csv` (`-n {}` for the \
             two budget sides) against \
             `redis-server --save \"\" --appendonly no` after populating {} keys × {} B \
             ({} MiB of values). `kernel-plain`: no pressure. `usm-exec`: `usm exec --pool {}` \
             (pages; no pressure). `kernel-cgroup-swapfile`: memory cgroup of {} MiB + kernel \
             swap on a swap file. `usm-exec-budget`: `usm exec --pool {}` ({} MiB) + \
             USM swap file on the same disk. The `usm` sides run in a cgroup without a real \
             limit (only to kill every process of the side on exit); its peak is USM's whole \
             footprint (pool + daemon + the unmanaged part of redis).\n",
            sp["requests"],
            sp["keys"],
            sp["value_bytes"],
            sp["clients"],
            sp["pipeline"],
            rd["budget_requests"],
            sp["keys"],
            sp["value_bytes"],
            (sp["keys"].as_u64().unwrap_or(0) * sp["value_bytes"].as_u64().unwrap_or(0)) >> 20,
            rd["usm_pool_pages_no_pressure"],
            sp["budget_bytes"].as_u64().unwrap_or(0) >> 20,
            rd["usm_pool_pages_budget"],
            sp["budget_bytes"].as_u64().unwrap_or(0) >> 20,
        );
        let ra = &rd["ratios"];
        let _ = writeln!(
            s,
            "| side | GET ops/s | SET ops/s | GET vs base | SET vs base | GET p50 / p99 ms | SET p50 / p99 ms | populate s | cgroup peak | USM evictions / swap-ins | coverage |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        if let Some(meds) = rd["medians"].as_object() {
            let order = [
                "kernel-plain",
                "usm-exec",
                "kernel-cgroup-swapfile",
                "usm-exec-budget",
            ];
            for (side, m) in order.iter().filter_map(|k| Some((*k, meds.get(*k)?))) {
                let (g, st) = match side {
                    "usm-exec" => (&ra["usm_get_vs_plain"], &ra["usm_set_vs_plain"]),
                    "usm-exec-budget" => (
                        &ra["usm_budget_get_vs_kernel_budget"],
                        &ra["usm_budget_set_vs_kernel_budget"],
                    ),
                    _ => (&Value::Null, &Value::Null),
                };
                let peak = m["cgroup_peak_bytes"].as_f64().filter(|x| x.is_finite());
                let _ = writeln!(
                    s,
                    "| {side} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} / {} | {} |",
                    f(&m["get_ops_per_s"], 0),
                    f(&m["set_ops_per_s"], 0),
                    f(g, 2),
                    f(st, 2),
                    f(&m["get_p50_ms"], 3),
                    f(&m["get_p99_ms"], 3),
                    f(&m["set_p50_ms"], 3),
                    f(&m["set_p99_ms"], 3),
                    f(&m["populate_s"], 1),
                    peak.map_or("–".into(), |p| format!("{} MiB", (p as u64) >> 20)),
                    f(&m["usm_evictions"], 0),
                    f(&m["usm_swapins"], 0),
                    f(&m["usm_coverage"], 3),
                );
            }
        }
        let _ = writeln!(
            s,
            "\nBase: `usm-exec` against `kernel-plain` (`usm_get_vs_plain`, `usm_set_vs_plain`), \
             `usm-exec-budget` against `kernel-cgroup-swapfile` \
             (`usm_budget_get_vs_kernel_budget`, `usm_budget_set_vs_kernel_budget`).\n"
        );
        let _ = writeln!(s, "Every run:\n");
        let _ = writeln!(
            s,
            "| run | side | load | GET ops/s | SET ops/s | GET p99 ms | SET p99 ms | populate s | kernel swap used | kernel pswpout / pswpin / majflt | USM evictions / swap-ins |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for run in rd["runs"].as_array().into_iter().flatten() {
            let res = &run["result"];
            let u = &run["usm"];
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} MiB | {} / {} / {} | {} |",
                run["run"],
                res["label"].as_str().unwrap_or(""),
                f(&run["load_avg_1m"], 1),
                f(&res["get_ops_per_s"], 0),
                f(&res["set_ops_per_s"], 0),
                f(&res["get_p99_ms"], 3),
                f(&res["set_p99_ms"], 3),
                f(&res["populate_s"], 2),
                res["swap_used_bytes"].as_u64().unwrap_or(0) >> 20,
                run["vm"]["pswpout"],
                run["vm"]["pswpin"],
                run["vm"]["pgmajfault"],
                if u.is_null() {
                    "–".into()
                } else {
                    format!("{} / {}", u["evictions"], u["swapins"])
                },
            );
        }
        let _ = writeln!(s);
    }
    s
}
