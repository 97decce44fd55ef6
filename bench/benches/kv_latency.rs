//! Key-value tail latency under memory pressure, side by side in one run (issue 13,
//! benchmark 4): `usm-kv` on USM; `usm-kv --kernel`, `redis-server` and `memcached` under
//! kernel swap — same budget, same swap medium (a swap file on the project's ext4 disk),
//! working set a multiple of the budget with a Zipf hot set, driven by the open-loop
//! generator `usm_bench::kvload` (latency from each request's scheduled send time).
//!
//! ```text
//! cargo bench -p usm-bench --bench kv_latency -- --rates 2000,5000,10000 --duration 10
//! ```
//! Sides:
//! - `usm`: `usm-kv` (this binary re-executed as `serve-kv`), USM pool = budget, USM swap
//!   file on ext4, 2 workers. Not in a cgroup (its pool is its budget); its RSS is reported.
//! - `kernel`: `usm-kv --kernel` (OS thread per connection, plain memory) in a memory
//!   cgroup (v1) limited to the budget, kernel swap on a swap file on ext4.
//! - `redis`: Debian's `redis-server` (no persistence), same cgroup limit and swap.
//! - `memcached`: Debian's `memcached -t 2`, cache size above the dataset, same limit.
//!
//! Every side is preloaded with every key, then the offered rates run in increasing order.
//! Writes `bench/results/kv.json`, `kv-latest.md` and `kv_latency.svg` (p99 vs offered load).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use usm_bench::kvload::{self, KeyDist, LoadResult, LoadSpec, Protocol};
use usm_bench::plot::{Headline, LinePlot, Series};
use usm_bench::{MemCgroup, SwapFile};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Parser)]
#[command(name = "kv_latency")]
struct Args {
    #[command(subcommand)]
    serve: Option<Serve>,
    /// Memory budget: USM pool and the kernel sides' cgroup limit (MiB).
    #[arg(long, default_value_t = 64)]
    budget_mib: u64,
    /// Working set as a multiple of the budget (sets the key count).
    #[arg(long, default_value_t = 3.0)]
    ws_factor: f64,
    /// Value size (bytes).
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Key distribution: uniform or zipf:S.
    #[arg(long, default_value = "zipf:0.99")]
    dist: KeyDist,
    /// Probability of a GET.
    #[arg(long, default_value_t = 0.9)]
    get_ratio: f64,
    /// Offered loads (requests per second), comma separated, run in this order.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000,10000,20000")]
    rates: Vec<f64>,
    /// Measured seconds per load point (after `--warmup`).
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Unmeasured seconds at the start of each load point.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Sides to run, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "usm,kernel,redis,memcached"
    )]
    sides: Vec<String>,
    /// Directory of the swap files (ext4).
    #[arg(long, default_value = "/var/tmp")]
    swap_dir: PathBuf,
    /// Output directory (default: `bench/results` of this checkout, wherever cargo runs
    /// the bench from).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Drive an already running RESP server at this address instead of starting sides
    /// (side name `external`; no cgroup, no swap set-up).
    #[arg(long)]
    external: Option<SocketAddr>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Subcommand)]
enum Serve {
    /// Runs usm-kv in this process (the benchmark's server child).
    ServeKv {
        #[arg(long)]
        kernel: bool,
        #[arg(long)]
        pool: usize,
        #[arg(long)]
        swap: Option<PathBuf>,
        #[arg(long, default_value_t = 1 << 30)]
        swap_size: u64,
        #[arg(long)]
        max_keys: usize,
        #[arg(long)]
        max_data: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

fn serve_kv(serve: Serve) -> BoxResult<()> {
    let Serve::ServeKv {
        kernel,
        pool,
        swap,
        swap_size,
        max_keys,
        max_data,
        workers,
    } = serve;
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGTERM);
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.thread_block()?;
    let config = usm_kv::KvConfig {
        listen: "127.0.0.1:0".parse()?,
        mode: if kernel {
            usm_kv::Mode::Kernel
        } else {
            usm_kv::Mode::Usm
        },
        workers,
        pool,
        swap,
        swap_size,
        store: usm_kv::store::StoreConfig {
            shards: 32,
            max_keys,
            max_data,
            max_value: 1 << 20,
            max_key: 1024,
        },
        usm: usm_kv::UsmKnobs::default(),
    };
    let running = usm_kv::start(&config)?;
    println!("listening {}", running.addr);
    use std::io::Write;
    std::io::stdout().flush()?;
    stop.wait()?;
    running.stop();
    Ok(())
}

/// One load point of one side: the generator's figures and the server's CPU time.
#[derive(Debug, Serialize)]
struct Point {
    #[serde(flatten)]
    load: LoadResult,
    /// Server CPU seconds (user + system) over the whole point (warm-up and drain too).
    server_cpu_s: f64,
    /// Server CPU microseconds per completed request.
    server_cpu_us_per_request: f64,
}

#[derive(Debug, Serialize)]
struct SideResult {
    side: String,
    points: Vec<Point>,
    preload_s: f64,
    preload_errors: u64,
    rss_kib_end: u64,
    swap_kib_end: u64,
    note: String,
}

struct Server {
    child: Child,
    addr: SocketAddr,
    cgroup: Option<MemCgroup>,
}

impl Server {
    fn stop(mut self) -> Option<MemCgroup> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.cgroup.take();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.cgroup.take()
    }

    /// User + system CPU seconds of the server process so far.
    fn cpu_s(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start after ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        (ticks(11) + ticks(12)) as f64 / hz
    }

    fn proc_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Server {
    /// A side that failed midway still leaves no server behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> BoxResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_ready(addr: SocketAddr) -> BoxResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("no server on {addr} after 30 s").into())
}

fn spawn_kv(mut cmd: Command, cgroup: Option<MemCgroup>) -> BoxResult<Server> {
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .ok_or_else(|| format!("unexpected server output {line:?}"))?
        .parse()?;
    Ok(Server {
        child,
        addr,
        cgroup,
    })
}

fn start_side(
    side: &str,
    a: &Args,
    keys: u64,
    budget: u64,
    run_dir: &std::path::Path,
) -> BoxResult<Server> {
    let exe = std::env::current_exe()?;
    let max_data = ((keys as usize) * (a.value_size + 64) * 2).max(64 << 20);
    let kv_args = |cmd: &mut Command| {
        cmd.arg("serve-kv")
            .args(["--pool", &budget.to_string()])
            .args(["--max-keys", &(keys * 2).to_string()])
            .args(["--max-data", &max_data.to_string()]);
    };
    match side {
        "usm" | "usm-nopressure" => {
            let mut cmd = Command::new(&exe);
            if side == "usm-nopressure" {
                // The reference for resident keys: a pool three times the data.
                cmd.arg("serve-kv")
                    .args([
                        "--pool",
                        &(max_data.max(budget as usize) * 3 / 2).to_string(),
                    ])
                    .args(["--max-keys", &(keys * 2).to_string()])
                    .args(["--max-data", &max_data.to_string()]);
            } else {
                kv_args(&mut cmd);
            }
            let swap = run_dir.join("usm-kv.swap");
            cmd.arg("--swap")
                .arg(&swap)
                .args(["--swap-size", &((max_data as u64) * 3 / 2).to_string()]);
            spawn_kv(cmd, None)
        }
        "kernel" => {
            let cg = MemCgroup::create("kv-kernel", budget)?;
            let mut cmd = cg.command(&exe);
            kv_args(&mut cmd);
            cmd.arg("--kernel");
            spawn_kv(cmd, Some(cg))
        }
        "redis" => {
            let cg = MemCgroup::create("kv-redis", budget)?;
            let port = free_port()?;
            let mut cmd = cg.command("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null());
            let child = cmd.spawn()?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let s = Server {
                child,
                addr,
                cgroup: Some(cg),
            };
            wait_ready(addr)?;
            Ok(s)
        }
        "memcached" => {
            let cg = MemCgroup::create("kv-memcached", budget)?;
            let port = free_port()?;
            let cache_mib = (max_data >> 20).max(64);
            let mut cmd = cg.command("memcached");
            cmd.args([
                "-p",
                &port.to_string(),
                "-U",
                "0",
                "-l",
                "127.0.0.1",
                "-t",
                "2",
            ])
            .args(["-m", &cache_mib.to_string(), "-c", "4096", "-u", "root"])
            .stdout(Stdio::null());
            let child = cmd.spawn()?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let s = Server {
                child,
                addr,
                cgroup: Some(cg),
            };
            wait_ready(addr)?;
            Ok(s)
        }
        other => Err(format!("unknown side {other:?} (usm, kernel, redis, memcached)").into()),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let args = Args::parse();
    let r = match args.serve {
        Some(serve) => serve_kv(serve),
        None => run(&args),
    };
    if let Err(e) = r {
        eprintln!("kv_latency: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> BoxResult<()> {
    let budget = a.budget_mib << 20;
    let item = a.value_size as u64 + 16 + 8;
    let keys = ((budget as f64 * a.ws_factor) / item as f64) as u64;
    let dataset = keys * item;
    let run_dir = tempfile::Builder::new()
        .prefix("usm-kv-bench-")
        .tempdir_in(&a.swap_dir)?;
    // Kernel swap for the cgroup sides: a swap file on the same ext4 disk as USM's.
    let kernel_swap = if a.external.is_none() && a.sides.iter().any(|s| !s.starts_with("usm")) {
        // Generous: the swap is global, other workloads on the machine may use it too.
        Some(SwapFile::create(run_dir.path(), dataset * 6, 10)?)
    } else {
        None
    };
    let load_start = loadavg();
    eprintln!(
        "kv_latency: budget {} MiB, {keys} keys x {} B = {} MiB ({:.1}x), {:?}, GET {:.0}%, load average {load_start}",
        a.budget_mib,
        a.value_size,
        dataset >> 20,
        dataset as f64 / budget as f64,
        a.dist,
        a.get_ratio * 100.0
    );
    let mut results = Vec::new();
    let sides = match a.external {
        Some(_) => vec!["external".to_string()],
        None => a.sides.clone(),
    };
    for side in &sides {
        match run_side(a, side, keys, budget, run_dir.path()) {
            Ok(r) => results.push(r),
            Err(e) => {
                // A side that fails (e.g. OOM-killed) is reported, and the others still run.
                eprintln!("  {side}: FAILED: {e}");
                results.push(SideResult {
                    side: side.clone(),
                    points: Vec::new(),
                    preload_s: 0.0,
                    preload_errors: 0,
                    rss_kib_end: 0,
                    swap_kib_end: 0,
                    note: format!("failed: {e}"),
                });
            }
        }
    }
    drop(kernel_swap);
    let load_end = loadavg();
    write_outputs(a, keys, dataset, &results, &load_start, &load_end)
}

fn run_side(
    a: &Args,
    side: &str,
    keys: u64,
    budget: u64,
    run_dir: &std::path::Path,
) -> BoxResult<SideResult> {
    {
        let server = match a.external {
            Some(addr) => Server {
                child: Command::new("sleep").arg("1000000").spawn()?,
                addr,
                cgroup: None,
            },
            None => start_side(side, a, keys, budget, run_dir)?,
        };
        let protocol = if side == "memcached" {
            Protocol::Memcached
        } else {
            Protocol::Resp
        };
        let t0 = Instant::now();
        // memcached was OOM-killed in its cgroup when 8 connections preloaded at once
        // (reclaim could not keep up); one connection lets kernel swap follow.
        let preload_conns = if side == "memcached" { 1 } else { 8 };
        let preload_errors =
            kvload::preload(server.addr, protocol, keys, a.value_size, preload_conns)?;
        let preload_s = t0.elapsed().as_secs_f64();
        eprintln!("  {side}: preloaded in {preload_s:.1} s ({preload_errors} errors)");
        let mut points = Vec::new();
        for (i, &rate) in a.rates.iter().enumerate() {
            let spec = LoadSpec {
                addr: server.addr,
                protocol,
                rate,
                connections: a.connections,
                threads: a.threads,
                keys,
                dist: a.dist,
                value_size: a.value_size,
                get_ratio: a.get_ratio,
                warmup: Duration::from_secs_f64(a.warmup),
                duration: Duration::from_secs_f64(a.duration),
                drain: Duration::from_secs(3),
                seed: 42 + i as u64,
                // Keys whose pages fit in half the budget even one key per page: the
                // requests that should find their data resident.
                hot_ranks: budget / 4096 / 2,
            };
            let cpu0 = server.cpu_s();
            let r = kvload::run(&spec)?;
            let cpu = server.cpu_s() - cpu0;
            eprintln!(
                "  {side} @ {rate:>8.0}/s: achieved {:>8.0}/s  p50 {:>9.1} us  p99 {:>10.1} us  p99.9 {:>10.1} us  lost {} errors {} misses {}  server CPU {:.1} us/req",
                r.achieved_rps,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                r.lost,
                r.errors,
                r.misses,
                cpu * 1e6 / r.completed.max(1) as f64
            );
            points.push(Point {
                server_cpu_us_per_request: cpu * 1e6 / r.completed.max(1) as f64,
                server_cpu_s: cpu,
                load: r,
            });
        }
        let rss = server.proc_kib("VmRSS:");
        let swap = server.proc_kib("VmSwap:");
        let note = match side {
            "usm" => "USM pool = budget, USM swap file, no cgroup".into(),
            "usm-nopressure" => "USM pool 3x the data (no eviction), no cgroup".into(),
            _ => format!(
                "memory cgroup v1 limit {} MiB, kernel swap file",
                a.budget_mib
            ),
        };
        if let Some(cg) = server.stop() {
            let _ = cg.remove();
        }
        Ok(SideResult {
            side: side.to_string(),
            points,
            preload_s,
            preload_errors,
            rss_kib_end: rss,
            swap_kib_end: swap,
            note,
        })
    }
}

fn write_outputs(
    a: &Args,
    keys: u64,
    dataset: u64,
    results: &[SideResult],
    load_start: &str,
    load_end: &str,
) -> BoxResult<()> {
    std::fs::create_dir_all(&a.out)?;
    let meta = usm_bench::report::run_meta();
    let json = serde_json::json!({
        "bench": "kv_latency",
        "meta": meta,
        "budget_bytes": a.budget_mib << 20,
        "keys": keys,
        "value_size": a.value_size,
        "dataset_bytes": dataset,
        "dist": format!("{:?}", a.dist),
        "get_ratio": a.get_ratio,
        "connections": a.connections,
        "duration_s": a.duration,
        "warmup_s": a.warmup,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "sides": results,
    });
    std::fs::write(a.out.join("kv.json"), serde_json::to_string_pretty(&json)?)?;
    let mut md = String::new();
    md.push_str(&format!(
        "budget {} MiB, {keys} keys x {} B ({} MiB, {:.1}x the budget), {:?}, GET {:.0}%, {} connections, {} s per point (+{} s warm-up), load average {load_start} -> {load_end}\n\n",
        a.budget_mib,
        a.value_size,
        dataset >> 20,
        dataset as f64 / (a.budget_mib << 20) as f64,
        a.dist,
        a.get_ratio * 100.0,
        a.connections,
        a.duration,
        a.warmup
    ));
    md.push_str("| side | offered/s | achieved/s | p50 us | p99 us | p99.9 us | lost | errors | misses | server CPU us/req |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for s in results {
        if s.points.is_empty() {
            md.push_str(&format!("| {} | {} | | | | | | | | |\n", s.side, s.note));
        }
        for pt in &s.points {
            let p = &pt.load;
            md.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.1} |\n",
                s.side,
                p.offered_rps,
                p.achieved_rps,
                p.p50_us,
                p.p99_us,
                p.p999_us,
                p.lost,
                p.errors,
                p.misses,
                pt.server_cpu_us_per_request
            ));
        }
    }
    // USM's p99 against the best kernel side at each offered load.
    if let Some(usm) = results.iter().find(|s| s.side == "usm") {
        md.push_str("\n| offered/s | usm p99 us | best kernel side | its p99 us | usm / kernel p99 |\n|---|---|---|---|---|\n");
        for (i, p) in usm.points.iter().map(|p| &p.load).enumerate() {
            let best = results
                .iter()
                .filter(|s| !s.side.starts_with("usm"))
                .filter_map(|s| s.points.get(i).map(|q| (s.side.as_str(), q.load.p99_us)))
                .min_by(|x, y| x.1.total_cmp(&y.1));
            if let Some((name, k)) = best {
                md.push_str(&format!(
                    "| {:.0} | {:.1} | {name} | {k:.1} | {:.2}x |\n",
                    p.offered_rps,
                    p.p99_us,
                    p.p99_us / k
                ));
            }
        }
        md.push_str("\nThroughput at a 1 ms p99 objective (highest achieved rate among points with p99 <= 1 ms):\n\n");
        for s in results {
            let best = s
                .points
                .iter()
                .map(|p| &p.load)
                .filter(|p| p.p99_us <= 1000.0 && p.lost == 0)
                .map(|p| p.achieved_rps)
                .fold(0.0f64, f64::max);
            md.push_str(&format!("- {}: {best:.0}/s\n", s.side));
        }
    }
    md.push_str(&format!(
        "\nHot requests: keys of popularity rank < {} (their pages fit in half the budget).\n\n| side | offered/s | hot share | hot p99 us | other p99 us |\n|---|---|---|---|---|\n",
        (a.budget_mib << 20) / 4096 / 2
    ));
    for s in results {
        for pt in &s.points {
            let p = &pt.load;
            md.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.1} | {:.1} |\n",
                s.side, p.offered_rps, p.hot_share, p.hot_p99_us, p.cold_p99_us
            ));
        }
    }
    if let (Some(u), Some(n)) = (
        results.iter().find(|s| s.side == "usm"),
        results.iter().find(|s| s.side == "usm-nopressure"),
    ) {
        md.push_str("\n| offered/s | usm hot p99 us (pressure) | usm-nopressure hot p99 us | ratio |\n|---|---|---|---|\n");
        for (p, q) in u.points.iter().zip(&n.points) {
            md.push_str(&format!(
                "| {:.0} | {:.1} | {:.1} | {:.2}x |\n",
                p.load.offered_rps,
                p.load.hot_p99_us,
                q.load.hot_p99_us,
                p.load.hot_p99_us / q.load.hot_p99_us.max(1.0)
            ));
        }
    }
    md.push_str("\nRSS at the end (KiB): ");
    md.push_str(
        &results
            .iter()
            .map(|s| format!("{} {} (+{} swapped)", s.side, s.rss_kib_end, s.swap_kib_end))
            .collect::<Vec<_>>()
            .join(", "),
    );
    md.push('\n');
    std::fs::write(a.out.join("kv-latest.md"), &md)?;
    let plot = LinePlot {
        title: format!(
            "p99 latency vs offered load ({:?}, {} MiB budget)",
            a.dist, a.budget_mib
        ),
        x_label: "offered load (requests/s)".into(),
        y_label: "p99 latency (us, log10)".into(),
        series: results
            .iter()
            .map(|s| Series {
                name: s.side.clone(),
                points: s
                    .points
                    .iter()
                    .map(|p| (p.load.offered_rps, p.load.p99_us.max(1.0).log10()))
                    .collect(),
            })
            .collect(),
        date: usm_bench::report::now_utc(),
        headline: kv_headline(results),
    };
    plot.write(&a.out.join("kv_latency.svg"))?;
    println!("{md}");
    Ok(())
}

/// The headline ratio: USM's p99 over the best kernel side's p99 at each offered load
/// (below 1: USM's tail is shorter), as in the report's last table.
fn kv_headline(results: &[SideResult]) -> Option<Headline> {
    let usm = results.iter().find(|s| s.side == "usm")?;
    let points: Vec<(f64, f64)> = usm
        .points
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let best = results
                .iter()
                .filter(|s| !s.side.starts_with("usm"))
                .filter_map(|s| s.points.get(i).map(|q| q.load.p99_us))
                .min_by(f64::total_cmp)?;
            (best > 0.0).then(|| (p.load.offered_rps, p.load.p99_us / best))
        })
        .collect();
    (!points.is_empty()).then(|| Headline {
        y_label: "usm / best kernel side, p99".into(),
        series: vec![Series {
            name: "usm / best kernel p99".into(),
            points,
        }],
        goal: Some(1.0),
    })
}
