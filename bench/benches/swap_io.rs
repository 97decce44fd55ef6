//! Benchmark `swap_io`: the USM swap engine against `fio` on the same file, same run.
//!
//! For each medium (a swap file on the project disk, `/dev/zram0`), each operation (4 KiB
//! random read, random write) and each queue depth (1, 8, 32), it runs the engine's closed
//! loop (keep `depth` requests in flight, submit, `wait(1)`, reap — what fio's io_uring
//! engine does; the last request of a round is queued with `Engine::queue_read`/
//! `queue_write` so `wait(1)` submits it and waits in one `io_uring_enter`, `--two-enters`
//! restores submit-then-wait) and `fio --ioengine=io_uring --direct=1` on the same file, alternating
//! which goes first, `--runs` times, and reports medians: IOPS, median and p99 latency
//! (queue → reap for the engine, fio's total `lat`), CPU per I/O from `getrusage` (whole
//! process, so io-wq kernel threads — which run every zram I/O — are counted on both
//! sides), and the ratios `iops_vs_fio` and `p50_vs_fio`. On zram the engine performs a
//! request made while nothing else is outstanding inline (`EngineConfig::inline_sync`, its
//! default; `inline/io` in the output is the share of I/Os that did): at depth 1 that is
//! every request. `--no-inline` measures the io_uring path instead.
//!
//! Then it measures the engine's completion modes (default, `COOP_TASKRUN`,
//! `DEFER_TASKRUN`): depth-1 read latency when the thread calls `enter_for_completions`
//! every round (the scheduler's loop, never blocking), how long a completion takes to
//! become visible when the thread only polls the CQ without entering the kernel, and
//! depth-32 IOPS.
//!
//! Goal (issue 4): ≥ 0.9× fio's IOPS at depth 32 and within 10% of fio's depth-1 latency.
//!
//! ```text
//! cargo bench -p usm-bench --bench swap_io -- [--json PATH] [--runs 3] [--seconds 2]
//!     [--dir /var/tmp] [--file-mib 1024] [--zram-mib 1024] [--no-zram] [--quick]
//! ```
//! Files are deleted and zram is reset at the end, also when a step fails (guards).

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use usm_sync::Arc;

use clap::Parser;
use nix::sys::resource::{UsageWho, getrusage};
use serde::Serialize;
use usm_swap::{
    CompletionMode, DeviceId, Engine, EngineConfig, FormatOptions, IoBuf, PAGE_SIZE, PageBuf,
    SwapDevice, SwapEntry, Zram, create_swap_file, format,
};

#[derive(Parser, Debug)]
#[command(about = "USM swap engine vs fio: 4 KiB random I/O on a file and on zram")]
struct Args {
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runs per configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Directory on the project disk for the test file.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of the test file, MiB.
    #[arg(long, default_value_t = 1024)]
    file_mib: u64,
    /// Size of the zram device, MiB.
    #[arg(long, default_value_t = 1024)]
    zram_mib: u64,
    /// Skip zram.
    #[arg(long)]
    no_zram: bool,
    /// Skip the disk file rows (the file is still used for the mode measurement).
    #[arg(long)]
    no_disk: bool,
    /// Queue depths.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    depths: Vec<u32>,
    /// Operations to run (randread, randwrite).
    #[arg(long, value_delimiter = ',', default_value = "randread,randwrite")]
    ops: Vec<String>,
    /// Completion mode of the engine in the fio comparison: auto, default, coop, defer.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// The engine side polls (`enter_for_completions` + `reap` in a loop, as the scheduler
    /// does) instead of sleeping in `wait(1)` like fio.
    #[arg(long)]
    spin: bool,
    /// The engine's `submit_batch` (1: submit each request at once, like fio's default
    /// `iodepth_batch_submit=1`; 0: one submit per round). At depth 32 the other value is
    /// measured too (`usm_alt_batch`).
    #[arg(long, default_value_t = 1)]
    submit_batch: u32,
    /// The engine side submits every request at once and then waits in a second kernel
    /// entry (the behaviour before `Engine::queue_read`). By default the last request of
    /// each round is queued with `queue_read`/`queue_write` so that `wait(1)` submits it
    /// and waits in one `io_uring_enter` (at depth 1: one entry per I/O).
    #[arg(long)]
    two_enters: bool,
    /// Turn the engine's inline path for synchronous devices off (`EngineConfig::
    /// inline_sync = false`): every zram request then goes through io_uring (and io-wq),
    /// as fio's do. By default a request made while nothing else is outstanding on zram is
    /// read or written inline.
    #[arg(long)]
    no_inline: bool,
    /// Skip the completion-mode measurement.
    #[arg(long)]
    no_modes: bool,
    /// One short run per configuration (smoke test).
    #[arg(long)]
    quick: bool,
    /// Internal: run one engine measurement in this (child) process:
    /// `PATH,OP,DEPTH,SEED`; prints the sample as JSON.
    #[arg(long, hide = true)]
    child_run: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Op {
    RandRead,
    RandWrite,
}

impl Op {
    fn fio_name(self) -> &'static str {
        match self {
            Op::RandRead => "randread",
            Op::RandWrite => "randwrite",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
struct Sample {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_io: f64,
    /// `io_uring_enter` calls per I/O (engine side only; 0 for fio, not measured).
    #[serde(default)]
    enters_per_io: f64,
    /// Share of the engine's I/Os performed inline on a synchronous device (zram, nothing
    /// else outstanding), without io_uring; 0 for fio.
    #[serde(default)]
    inline_per_io: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_sample(s: &[Sample]) -> Sample {
    Sample {
        iops: median(s.iter().map(|x| x.iops).collect()),
        p50_us: median(s.iter().map(|x| x.p50_us).collect()),
        p99_us: median(s.iter().map(|x| x.p99_us).collect()),
        cpu_us_per_io: median(s.iter().map(|x| x.cpu_us_per_io).collect()),
        enters_per_io: median(s.iter().map(|x| x.enters_per_io).collect()),
        inline_per_io: median(s.iter().map(|x| x.inline_per_io).collect()),
    }
}

#[derive(Debug, Serialize)]
struct Row {
    medium: String,
    op: Op,
    depth: u32,
    usm: Sample,
    fio: Sample,
    iops_vs_fio: f64,
    p50_vs_fio: f64,
    p99_vs_fio: f64,
    usm_runs: Vec<Sample>,
    fio_runs: Vec<Sample>,
    /// The engine with the other `submit_batch` value (depth ≥ 8 only).
    usm_alt_batch: Option<Sample>,
    usm_alt_batch_value: u32,
    usm_alt_batch_vs_fio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ModeRow {
    mode: CompletionMode,
    setup_report: String,
    /// Depth-1 read latency with `enter_for_completions` + `reap` each round, µs.
    sched_loop_p50_us: f64,
    sched_loop_p99_us: f64,
    /// Kernel entries per read in that loop.
    enters_per_io: f64,
    /// Time until a completion is visible when the thread only polls the CQ, µs (median
    /// of the samples that became visible).
    poll_only_visible_p50_us: Option<f64>,
    /// Samples that never became visible within the timeout without entering.
    poll_only_timeouts: u32,
    poll_only_samples: u32,
    poll_only_timeout_ms: u64,
    /// Depth-32 random-read IOPS with `wait(1)`.
    depth32_iops: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    kernel: String,
    /// `/proc/loadavg` before and after: the machine is shared (2 vCPUs), so a high load
    /// means noisy figures on both sides.
    loadavg_start: String,
    loadavg_end: String,
    fio_version: String,
    file: String,
    file_mib: u64,
    zram_mib: Option<u64>,
    seconds_per_run: f64,
    runs: usize,
    /// Completion mode requested for the engine in the fio rows (`auto` = probed).
    engine_mode: String,
    /// Whether the engine side spun (`--spin`) instead of sleeping in `wait(1)`.
    engine_spin: bool,
    /// Whether the engine side submitted every request at once and waited in a second
    /// entry (`--two-enters`); otherwise the last request of a round rides with `wait(1)`.
    engine_two_enters: bool,
    engine_submit_batch: u32,
    /// The engine's inline path for synchronous devices (zram) was on (`--no-inline` off).
    engine_inline_sync: bool,
    fio_args_example: String,
    rows: Vec<Row>,
    modes: Vec<ModeRow>,
    goal_depth32_iops_ratio_min: f64,
    goal_depth1_latency_ratio_max: f64,
    goals: BTreeMap<String, bool>,
}

/// Deletes the test file when dropped (also on panic/early return).
struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Like fio's `--buffer_compress_percentage=50 --buffer_compress_chunk=512`: each 512-byte
/// chunk is 256 random bytes then 256 zero bytes, so zram compresses both sides' pages
/// alike (about 2:1).
fn fill_pattern(buf: &mut [u8], rng: &mut Rng) {
    for chunk in buf.chunks_mut(512) {
        let half = chunk.len().min(256);
        for w in chunk[..half].chunks_mut(8) {
            let v = rng.next();
            w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
        }
        chunk[half..].fill(0);
    }
}

fn cpu_time(who: UsageWho) -> Duration {
    getrusage(who)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

fn engine_for(
    dev: &Arc<SwapDevice>,
    depth: u32,
    mode: Option<CompletionMode>,
    submit_batch: u32,
    inline_sync: bool,
) -> Engine {
    Engine::new(
        &EngineConfig {
            depth,
            mode,
            staging_pages: 0,
            eventfd: false,
            submit_batch,
            inline_sync,
        },
        std::slice::from_ref(dev),
    )
    .unwrap_or_else(|e| panic!("engine: {e}"))
}

/// Writes every slot once (so reads hit real data, not unwritten extents).
fn fill_device(dev: &Arc<SwapDevice>) {
    let mut eng = engine_for(dev, 32, None, 0, true);
    let pages_per_io = 64u64;
    let mut rng = Rng(0x1234_5678);
    let mut next = 0u64;
    let slots = dev.slots();
    let mut bufs: Vec<PageBuf> = (0..32)
        .map(|_| PageBuf::new(pages_per_io as usize))
        .collect();
    for b in &mut bufs {
        fill_pattern(b, &mut rng);
    }
    while next < slots || eng.in_flight() > 0 {
        while next < slots && eng.has_capacity() {
            let n = pages_per_io.min(slots - next);
            let Some(buf) = bufs.pop() else { break };
            let buf = if n == pages_per_io {
                buf
            } else {
                PageBuf::new(n as usize)
            };
            let e = SwapEntry::new(dev.id(), next).unwrap_or_else(|| panic!("entry"));
            eng.write(e, buf).unwrap_or_else(|r| panic!("fill: {r}"));
            next += n;
        }
        eng.wait(1).unwrap_or_else(|e| panic!("fill wait: {e}"));
        eng.reap(|c| {
            if let Err(e) = c.result {
                panic!("fill write failed: {e}");
            }
            if let Some(IoBuf::Owned(b)) = c.buf {
                if b.pages() == pages_per_io as usize {
                    bufs.push(b);
                }
            }
        });
    }
}

/// One engine measurement.
struct UsmRun {
    op: Op,
    depth: u32,
    secs: f64,
    seed: u64,
    mode: Option<CompletionMode>,
    spin: bool,
    submit_batch: u32,
    two_enters: bool,
    inline_sync: bool,
}

/// The engine's closed loop at `depth` for `secs`.
fn run_usm(dev: &Arc<SwapDevice>, run: &UsmRun) -> Sample {
    let UsmRun {
        op,
        depth,
        secs,
        seed,
        mode,
        spin,
        submit_batch,
        two_enters,
        inline_sync,
    } = *run;
    // The last request of a round goes with the wait (one kernel entry) unless asked not
    // to, or when spinning (no wait to ride on).
    let last_with_wait = !spin && !two_enters;
    let mut eng = engine_for(dev, depth, mode, submit_batch, inline_sync);
    let slots = dev.slots();
    let mut rng = Rng(seed | 1);
    let mut bufs: Vec<PageBuf> = (0..depth).map(|_| PageBuf::page()).collect();
    for b in &mut bufs {
        fill_pattern(b, &mut rng);
    }
    let issue = |eng: &mut Engine, bufs: &mut Vec<PageBuf>, rng: &mut Rng| {
        let room = (eng.depth() - eng.in_flight()) as usize;
        let n = room.min(bufs.len());
        for i in 0..n {
            let Some(buf) = bufs.pop() else { break };
            let e = SwapEntry::new(dev.id(), rng.next() % slots).unwrap_or_else(|| panic!());
            let with_wait = last_with_wait && i + 1 == n;
            let r = match (op, with_wait) {
                (Op::RandRead, false) => eng.read(e, buf),
                (Op::RandWrite, false) => eng.write(e, buf),
                (Op::RandRead, true) => eng.queue_read(e, buf),
                (Op::RandWrite, true) => eng.queue_write(e, buf),
            };
            r.unwrap_or_else(|r| panic!("{r}"));
        }
    };
    let mut loop_for = |eng: &mut Engine, dur: Duration, bufs: &mut Vec<PageBuf>| -> u64 {
        let end = Instant::now() + dur;
        let mut done = 0u64;
        while Instant::now() < end {
            issue(eng, bufs, &mut rng);
            if spin {
                // The scheduler's way: enter for completions each round, never sleep.
                eng.enter_for_completions()
                    .unwrap_or_else(|e| panic!("enter: {e}"));
            } else {
                eng.wait(1).unwrap_or_else(|e| panic!("wait: {e}"));
            }
            done += eng.reap(|c| {
                if let Err(e) = c.result {
                    panic!("{op:?} failed: {e}");
                }
                if let Some(IoBuf::Owned(b)) = c.buf {
                    bufs.push(b);
                }
            }) as u64;
        }
        done
    };
    // Warm-up, then measure.
    loop_for(&mut eng, Duration::from_secs_f64(0.3), &mut bufs);
    eng.stats_mut().reset();
    let cpu0 = cpu_time(UsageWho::RUSAGE_SELF);
    let t0 = Instant::now();
    let done = loop_for(&mut eng, Duration::from_secs_f64(secs), &mut bufs);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time(UsageWho::RUSAGE_SELF) - cpu0).as_secs_f64();
    let enters = eng.stats().enters;
    let inline = eng.stats().inline_ios;
    // Drain what is still in flight (not counted).
    while eng.in_flight() > 0 {
        eng.wait(1).unwrap_or_else(|e| panic!("{e}"));
        eng.reap(|_| {});
    }
    let h = match op {
        Op::RandRead => &eng.stats().read_latency,
        Op::RandWrite => &eng.stats().write_latency,
    };
    Sample {
        iops: done as f64 / elapsed,
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_us_per_io: cpu * 1e6 / done.max(1) as f64,
        enters_per_io: enters as f64 / done.max(1) as f64,
        inline_per_io: inline as f64 / done.max(1) as f64,
    }
}

/// Runs one engine measurement in a fresh child process (like fio), so both sides start
/// with the same scheduler state and their CPU is counted the same way (the whole child,
/// io-wq threads included, via `RUSAGE_CHILDREN`).
fn run_usm_child(
    args: &Args,
    path: &Path,
    op: Op,
    depth: u32,
    seed: u64,
    submit_batch: u32,
) -> Sample {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let cpu0 = cpu_time(UsageWho::RUSAGE_CHILDREN);
    let mut cmd = Command::new(exe);
    cmd.arg("--child-run")
        .arg(format!(
            "{},{},{depth},{seed}",
            path.display(),
            op.fio_name()
        ))
        .arg("--seconds")
        .arg(args.seconds.to_string())
        .arg("--mode")
        .arg(&args.mode);
    if args.spin {
        cmd.arg("--spin");
    }
    if args.two_enters {
        cmd.arg("--two-enters");
    }
    if args.no_inline {
        cmd.arg("--no-inline");
    }
    cmd.arg("--submit-batch").arg(submit_batch.to_string());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn engine child: {e}"));
    let cpu = (cpu_time(UsageWho::RUSAGE_CHILDREN) - cpu0).as_secs_f64();
    if !out.status.success() {
        panic!(
            "engine child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut sample: Sample =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("engine child output: {e}"));
    // Whole-process CPU, like fio's side: ios = iops × seconds.
    sample.cpu_us_per_io = cpu * 1e6 / (sample.iops * args.seconds).max(1.0);
    sample
}

fn child_main(args: &Args, spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let submit_batch = args.submit_batch;
    let [path, op, depth, seed] = parts[..] else {
        panic!("--child-run PATH,OP,DEPTH,SEED, got {spec}");
    };
    let op = match op {
        "randread" => Op::RandRead,
        "randwrite" => Op::RandWrite,
        other => panic!("op {other}"),
    };
    let depth: u32 = depth.parse().unwrap_or_else(|e| panic!("depth: {e}"));
    let seed: u64 = seed.parse().unwrap_or_else(|e| panic!("seed: {e}"));
    let dev = Arc::new(SwapDevice::open(DeviceId(0), path).unwrap_or_else(|e| panic!("{e}")));
    let sample = run_usm(
        &dev,
        &UsmRun {
            op,
            depth,
            secs: args.seconds,
            seed,
            mode: parse_mode(&args.mode),
            spin: args.spin,
            submit_batch,
            two_enters: args.two_enters,
            inline_sync: !args.no_inline,
        },
    );
    println!(
        "{}",
        serde_json::to_string(&sample).unwrap_or_else(|e| panic!("{e}"))
    );
}

fn fio_args(path: &Path, bytes: u64, op: Op, depth: u32, secs: f64) -> Vec<String> {
    vec![
        "--name=usm-swap-bench".into(),
        format!("--filename={}", path.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", op.fio_name()),
        "--bs=4k".into(),
        format!("--iodepth={depth}"),
        // Skip the USM header page, like the engine.
        format!("--offset={PAGE_SIZE}"),
        format!("--size={}", bytes - PAGE_SIZE as u64),
        "--ramp_time=0.3".into(),
        format!("--runtime={secs}"),
        "--time_based".into(),
        "--randrepeat=0".into(),
        "--norandommap".into(),
        "--lat_percentiles=1".into(),
        "--buffer_compress_percentage=50".into(),
        "--buffer_compress_chunk=512".into(),
        "--output-format=json".into(),
    ]
}

fn run_fio(path: &Path, bytes: u64, op: Op, depth: u32, secs: f64) -> Sample {
    let cpu0 = cpu_time(UsageWho::RUSAGE_CHILDREN);
    let out = Command::new("fio")
        .args(fio_args(path, bytes, op, depth, secs))
        .output()
        .unwrap_or_else(|e| panic!("fio not runnable (apt-get install -y fio): {e}"));
    let cpu = (cpu_time(UsageWho::RUSAGE_CHILDREN) - cpu0).as_secs_f64();
    if !out.status.success() {
        panic!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON object.
    let json_start = text.find('{').unwrap_or(0);
    let v: serde_json::Value =
        serde_json::from_str(&text[json_start..]).unwrap_or_else(|e| panic!("fio json: {e}"));
    let side = match op {
        Op::RandRead => &v["jobs"][0]["read"],
        Op::RandWrite => &v["jobs"][0]["write"],
    };
    let pct = |q: &str| side["lat_ns"]["percentile"][q].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let ios = side["total_ios"].as_f64().unwrap_or(0.0);
    Sample {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        // Includes fio's start-up and ramp time: a slight over-estimate for fio.
        cpu_us_per_io: cpu * 1e6 / ios.max(1.0),
        enters_per_io: 0.0,
        inline_per_io: 0.0,
    }
}

/// Compares the engine (in a child process) with fio on `path`. The caller must not hold
/// `path` open `O_EXCL` (the child opens it as a swap device).
fn bench_medium(args: &Args, medium: &str, path: &Path, bytes: u64, rows: &mut Vec<Row>) {
    for op in [Op::RandRead, Op::RandWrite] {
        if !args.ops.iter().any(|o| o == op.fio_name()) {
            continue;
        }
        for &depth in &args.depths {
            let mut usm = Vec::new();
            let mut fio = Vec::new();
            for run in 0..args.runs {
                let seed = 0x9E37_79B9 ^ (run as u64 * 7919) ^ u64::from(depth);
                if run % 2 == 0 {
                    usm.push(run_usm_child(
                        args,
                        path,
                        op,
                        depth,
                        seed,
                        args.submit_batch,
                    ));
                    fio.push(run_fio(path, bytes, op, depth, args.seconds));
                } else {
                    fio.push(run_fio(path, bytes, op, depth, args.seconds));
                    usm.push(run_usm_child(
                        args,
                        path,
                        op,
                        depth,
                        seed,
                        args.submit_batch,
                    ));
                }
            }
            let alt_batch = u32::from(args.submit_batch == 0);
            let alt: Vec<Sample> = if depth >= 8 {
                (0..args.runs)
                    .map(|run| {
                        let seed = 0x5EED ^ (run as u64 * 104_729) ^ u64::from(depth);
                        run_usm_child(args, path, op, depth, seed, alt_batch)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let u = median_sample(&usm);
            let f = median_sample(&fio);
            let alt_median = (!alt.is_empty()).then(|| median_sample(&alt));
            if let Some(a) = alt_median {
                eprintln!(
                    "{medium:5} {:9} qd{depth:<3} usm submit_batch={alt_batch}: {:>8.0} IOPS p50 {:>7.1} µs (×{:.3} fio)",
                    op.fio_name(),
                    a.iops,
                    a.p50_us,
                    a.iops / f.iops
                );
            }
            eprintln!(
                "{medium:5} {:9} qd{depth:<3} usm {:>8.0} IOPS p50 {:>7.1} µs p99 {:>7.1} µs cpu {:>5.1} µs/io enters/io {:.2} inline/io {:.2} | fio {:>8.0} IOPS p50 {:>7.1} µs p99 {:>7.1} µs cpu {:>5.1} µs/io | iops×{:.3} p50×{:.3}",
                op.fio_name(),
                u.iops,
                u.p50_us,
                u.p99_us,
                u.cpu_us_per_io,
                u.enters_per_io,
                u.inline_per_io,
                f.iops,
                f.p50_us,
                f.p99_us,
                f.cpu_us_per_io,
                u.iops / f.iops,
                u.p50_us / f.p50_us
            );
            rows.push(Row {
                medium: medium.into(),
                op,
                depth,
                usm: u,
                fio: f,
                iops_vs_fio: u.iops / f.iops,
                p50_vs_fio: u.p50_us / f.p50_us,
                p99_vs_fio: u.p99_us / f.p99_us,
                usm_runs: usm,
                fio_runs: fio,
                usm_alt_batch: alt_median,
                usm_alt_batch_value: alt_batch,
                usm_alt_batch_vs_fio: alt_median.map(|a| a.iops / f.iops),
            });
        }
    }
}

fn parse_mode(s: &str) -> Option<CompletionMode> {
    match s {
        "default" => Some(CompletionMode::Default),
        "coop" => Some(CompletionMode::CoopTaskrun),
        "defer" => Some(CompletionMode::DeferTaskrun),
        "auto" => None,
        other => panic!("--mode {other}: expected auto, default, coop or defer"),
    }
}

fn bench_modes(dev: &Arc<SwapDevice>, args: &Args) -> Vec<ModeRow> {
    let slots = dev.slots();
    let mut out = Vec::new();
    let (loop_ios, poll_samples, timeout) = if args.quick {
        (300, 10, Duration::from_millis(10))
    } else {
        (3000, 40, Duration::from_millis(10))
    };
    for mode in [
        CompletionMode::Default,
        CompletionMode::CoopTaskrun,
        CompletionMode::DeferTaskrun,
    ] {
        let mut eng = engine_for(dev, 32, Some(mode), 0, true);
        let mut rng = Rng(0xABCD ^ mode as u64);
        // (1) The scheduler loop: enter_for_completions + reap, spinning, depth 1.
        let mut lat = Vec::with_capacity(loop_ios);
        let enters0 = eng.stats().enters;
        let mut buf = Some(PageBuf::page());
        for _ in 0..loop_ios {
            let e = SwapEntry::new(dev.id(), rng.next() % slots).unwrap_or_else(|| panic!());
            let t0 = Instant::now();
            let b = buf.take().unwrap_or_else(PageBuf::page);
            eng.read(e, b).unwrap_or_else(|r| panic!("{r}"));
            let mut done = false;
            while !done {
                eng.enter_for_completions()
                    .unwrap_or_else(|e| panic!("{e}"));
                eng.reap(|c| {
                    done = true;
                    if let Some(IoBuf::Owned(b)) = c.buf {
                        buf = Some(b);
                    }
                });
            }
            lat.push(t0.elapsed().as_nanos() as f64 / 1000.0);
        }
        let enters = (eng.stats().enters - enters0) as f64 / loop_ios as f64;
        let p99 = {
            let mut l = lat.clone();
            l.sort_by(|a, b| a.total_cmp(b));
            l[(l.len() * 99 / 100).min(l.len() - 1)]
        };
        let p50 = median(lat);
        // (2) Poll the CQ only (no kernel entry after the submit).
        let mut visible = Vec::new();
        let mut timeouts = 0;
        for _ in 0..poll_samples {
            let e = SwapEntry::new(dev.id(), rng.next() % slots).unwrap_or_else(|| panic!());
            let b = buf.take().unwrap_or_else(PageBuf::page);
            eng.read(e, b).unwrap_or_else(|r| panic!("{r}"));
            eng.submit().unwrap_or_else(|e| panic!("{e}"));
            let t0 = Instant::now();
            let mut seen = false;
            while t0.elapsed() < timeout {
                if eng.reap(|c| {
                    if let Some(IoBuf::Owned(b)) = c.buf {
                        buf = Some(b);
                    }
                }) > 0
                {
                    seen = true;
                    break;
                }
                std::hint::spin_loop();
            }
            if seen {
                visible.push(t0.elapsed().as_nanos() as f64 / 1000.0);
            } else {
                timeouts += 1;
                eng.wait(1).unwrap_or_else(|e| panic!("{e}"));
                eng.reap(|c| {
                    if let Some(IoBuf::Owned(b)) = c.buf {
                        buf = Some(b);
                    }
                });
            }
        }
        // (3) Depth-32 IOPS in this mode.
        drop(eng);
        let depth32 = run_mode_iops(
            dev,
            mode,
            if args.quick { 0.5 } else { args.seconds },
            args.submit_batch,
        );
        let eng = engine_for(dev, 1, Some(mode), 0, true);
        let report = eng.setup_report().to_string();
        let row = ModeRow {
            mode,
            setup_report: report,
            sched_loop_p50_us: p50,
            sched_loop_p99_us: p99,
            enters_per_io: enters,
            poll_only_visible_p50_us: (!visible.is_empty()).then(|| median(visible)),
            poll_only_timeouts: timeouts,
            poll_only_samples: poll_samples,
            poll_only_timeout_ms: timeout.as_millis() as u64,
            depth32_iops: depth32,
        };
        eprintln!(
            "mode {:13} sched-loop qd1 p50 {:>6.1} µs p99 {:>7.1} µs, {:.2} enters/io | poll-only visible p50 {} ({}/{} timed out at {} ms) | qd32 {:>8.0} IOPS",
            mode.to_string(),
            row.sched_loop_p50_us,
            row.sched_loop_p99_us,
            row.enters_per_io,
            row.poll_only_visible_p50_us
                .map_or("never".to_string(), |v| format!("{v:.1} µs")),
            row.poll_only_timeouts,
            row.poll_only_samples,
            row.poll_only_timeout_ms,
            row.depth32_iops
        );
        out.push(row);
    }
    out
}

fn run_mode_iops(dev: &Arc<SwapDevice>, mode: CompletionMode, secs: f64, submit_batch: u32) -> f64 {
    let mut eng = engine_for(dev, 32, Some(mode), submit_batch, true);
    let slots = dev.slots();
    let mut rng = Rng(77);
    let mut bufs: Vec<PageBuf> = (0..32).map(|_| PageBuf::page()).collect();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut done = 0u64;
    while Instant::now() < end {
        while let Some(b) = bufs.pop() {
            let e = SwapEntry::new(dev.id(), rng.next() % slots).unwrap_or_else(|| panic!());
            eng.read(e, b).unwrap_or_else(|r| panic!("{r}"));
        }
        eng.wait(1).unwrap_or_else(|e| panic!("{e}"));
        done += eng.reap(|c| {
            if let Some(IoBuf::Owned(b)) = c.buf {
                bufs.push(b);
            }
        }) as u64;
    }
    let el = t0.elapsed().as_secs_f64();
    while eng.in_flight() > 0 {
        eng.wait(1).unwrap_or_else(|e| panic!("{e}"));
        eng.reap(|_| {});
    }
    done as f64 / el
}

fn main() {
    let mut args = Args::parse();
    if let Some(spec) = args.child_run.clone() {
        child_main(&args, &spec);
        return;
    }
    if args.quick {
        args.runs = 1;
        args.seconds = 0.5;
        args.file_mib = args.file_mib.min(256);
        args.zram_mib = args.zram_mib.min(256);
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let fio_version = Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "fio missing: apt-get install -y fio".into());
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let loadavg_start = loadavg();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();

    let path = args
        .dir
        .join(format!("usm-swap-bench-{}.img", std::process::id()));
    let _file_guard = FileGuard(path.clone());
    let bytes = args.file_mib << 20;
    create_swap_file(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
    let disk = Arc::new(SwapDevice::open(DeviceId(0), &path).unwrap_or_else(|e| panic!("{e}")));
    eprintln!("filling {} ({} MiB) ...", path.display(), args.file_mib);
    fill_device(&disk);

    let mut rows = Vec::new();
    let modes = if args.no_modes {
        Vec::new()
    } else {
        bench_modes(&disk, &args)
    };
    if !args.no_disk {
        bench_medium(&args, "disk", &path, bytes, &mut rows);
    }
    drop(disk);

    let mut zram_mib = None;
    if !args.no_zram {
        if Zram::available(0) {
            // Reset on drop, also if a step below panics.
            let zram = Zram::configure(0, args.zram_mib << 20, None)
                .unwrap_or_else(|e| panic!("zram: {e}"));
            format(zram.path(), &FormatOptions::default()).unwrap_or_else(|e| panic!("{e}"));
            let dev = Arc::new(
                SwapDevice::open(DeviceId(1), zram.path()).unwrap_or_else(|e| panic!("{e}")),
            );
            eprintln!(
                "filling {} ({} MiB) ...",
                zram.path().display(),
                args.zram_mib
            );
            fill_device(&dev);
            // Release the O_EXCL open: the engine child opens the device itself.
            drop(dev);
            bench_medium(&args, "zram", zram.path(), args.zram_mib << 20, &mut rows);
            zram_mib = Some(args.zram_mib);
            drop(zram);
        } else {
            eprintln!("zram0 unavailable: skipped");
        }
    }

    let mut goals = BTreeMap::new();
    for r in &rows {
        if r.depth == 32 {
            goals.insert(
                format!("{}_{}_qd32_iops_ge_0.9x_fio", r.medium, r.op.fio_name()),
                r.iops_vs_fio >= 0.9,
            );
        }
        if r.depth == 1 {
            goals.insert(
                format!("{}_{}_qd1_p50_le_1.1x_fio", r.medium, r.op.fio_name()),
                r.p50_vs_fio <= 1.1,
            );
        }
    }
    for (k, v) in &goals {
        eprintln!("goal {k}: {}", if *v { "met" } else { "NOT met" });
    }
    let report = Report {
        command,
        kernel,
        loadavg_start,
        loadavg_end: loadavg(),
        fio_version,
        file: path.display().to_string(),
        file_mib: args.file_mib,
        zram_mib,
        seconds_per_run: args.seconds,
        runs: args.runs,
        engine_mode: args.mode.clone(),
        engine_spin: args.spin,
        engine_two_enters: args.two_enters,
        engine_submit_batch: args.submit_batch,
        engine_inline_sync: !args.no_inline,
        fio_args_example: fio_args(Path::new("FILE"), 1 << 30, Op::RandRead, 32, args.seconds)
            .join(" "),
        rows,
        modes,
        goal_depth32_iops_ratio_min: 0.9,
        goal_depth1_latency_ratio_max: 1.1,
        goals,
    };
    let json = serde_json::to_string_pretty(&report).unwrap_or_else(|e| panic!("{e}"));
    match &args.json {
        Some(p) => std::fs::write(p, &json).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        None => println!("{json}"),
    }
}
