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
//! - `usm-concurrent`: `usm`, but a connection's reads run on their own uThreads, replies
//!   in order (`usm-kv --concurrent`, `usm_kv::pipeline`; the default answers a
//!   connection's requests one by one).
//! - `usm-nopressure`: `usm` with a pool 3x the data (the hot keys' reference).
//! - `SIDE/EVICT` for any usm side (`usm/two-list`, `usm/clock`): that side with the
//!   eviction policy `EVICT` (`usm-kv --evict`); without it, the runtime's default.
//!
//! Per point it also records the pages read back from swap: USM's swap-ins, evictions and
//! frame waits (`INFO`) on the usm sides, the memory cgroup's `pgmajfault` on the others.
//! `--repeat N` runs the whole set of sides N times, interleaved (run 1 of every side,
//! then run 2, ...); the report gives every run, the medians, and ratios of medians with
//! the kernel side's absolute figures. `--pmqos` holds `/dev/cpu_dma_latency` at 0 for
//! the whole run (all sides); the report says whether it was held.
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
    /// Runs of the whole set of sides (run 1 of every side, then run 2, ...: the sides
    /// interleave, so each sees similar slices of the machine's noise). The report gives
    /// every run and the medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Hold `/dev/cpu_dma_latency` at 0 µs for the whole run (every side): idle vCPUs stay
    /// out of deep C-states, so a wake-up across vCPUs costs less.
    #[arg(long)]
    pmqos: bool,
    /// Workers of the usm sides.
    #[arg(long, default_value_t = 2)]
    usm_workers: usize,
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
        /// Run a connection's reads on their own uThreads (`usm-kv --concurrent`).
        #[arg(long)]
        concurrent: bool,
        /// Eviction policy (`usm-kv --evict`).
        #[arg(long)]
        evict: Option<String>,
    },
    /// Multishot against single-shot accept: `conns` sequential loopback connections
    /// (connect, one byte each way, close) to a uThread listener, `runs` of each mode
    /// interleaved; prints connections/s and process CPU µs per connection.
    AcceptRate {
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

/// Process CPU seconds (user + system) so far.
fn process_cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// One accept-rate run: (connections/s, process CPU µs per connection).
fn accept_run(conns: usize, multishot: bool) -> BoxResult<(f64, f64)> {
    use std::io::{Read, Write};
    let rt = usm_runtime::embedded::Runtime::builder()
        .workers(2)
        .build()?;
    let mut listener = rt.net().bind("127.0.0.1:0")?;
    listener.set_multishot(multishot);
    let addr = listener.local_addr()?;
    let handle = rt.handle()?;
    rt.spawn(move || {
        while let Ok(mut c) = listener.accept() {
            let _ = handle.spawn(move || {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    let _ = c.write_all(&b);
                }
            });
        }
    })?;
    let cpu0 = process_cpu_s();
    let t0 = Instant::now();
    for i in 0..conns {
        let mut c = std::net::TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        c.write_all(&[i as u8])?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        if b[0] != i as u8 {
            return Err("accept-rate: wrong echo".into());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_s() - cpu0;
    rt.shutdown(Duration::from_secs(1));
    Ok((conns as f64 / secs, cpu * 1e6 / conns as f64))
}

fn accept_rate(conns: usize, runs: usize) -> BoxResult<()> {
    let mut rows: Vec<(bool, f64, f64)> = Vec::new();
    for run in 1..=runs {
        for multishot in [true, false] {
            let (rate, cpu) = accept_run(conns, multishot)?;
            println!(
                "run {run} {}: {rate:.0} connections/s, {cpu:.1} us CPU per connection (client included)",
                if multishot {
                    "multishot "
                } else {
                    "single-shot"
                }
            );
            rows.push((multishot, rate, cpu));
        }
    }
    for multishot in [true, false] {
        let r: Vec<f64> = rows
            .iter()
            .filter(|x| x.0 == multishot)
            .map(|x| x.1)
            .collect();
        let c: Vec<f64> = rows
            .iter()
            .filter(|x| x.0 == multishot)
            .map(|x| x.2)
            .collect();
        println!(
            "median {}: {:.0} connections/s, {:.1} us CPU per connection",
            if multishot {
                "multishot "
            } else {
                "single-shot"
            },
            usm_bench::stats::median(&r),
            usm_bench::stats::median(&c)
        );
    }
    Ok(())
}

/// A usm side's base name and its eviction policy: `usm/two-list` → (`usm`, `two-list`).
fn usm_variant(side: &str) -> (&str, Option<&str>) {
    match side.split_once('/') {
        Some((base, evict)) if base.starts_with("usm") => (base, Some(evict)),
        _ => (side, None),
    }
}

fn serve_kv(serve: Serve) -> BoxResult<()> {
    if let Serve::AcceptRate { conns, runs } = serve {
        return accept_rate(conns, runs);
    }
    let Serve::ServeKv {
        kernel,
        pool,
        swap,
        swap_size,
        max_keys,
        max_data,
        workers,
        concurrent,
        evict,
    } = serve
    else {
        return Err("not a serve-kv command".into());
    };
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
        usm: usm_kv::UsmKnobs {
            evict,
            ..usm_kv::UsmKnobs::default()
        },
        concurrent,
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
    /// Pages read back from swap over the point (warm-up and drain too): USM's swap-ins
    /// (`INFO`) on the usm sides, the memory cgroup's `pgmajfault` on the cgroup sides.
    swap_ins: Option<u64>,
    /// USM: pages evicted over the point.
    evicted: Option<u64>,
    /// USM: faults that waited for a free frame (eviction on the fault path).
    memory_waits: Option<u64>,
    /// USM: accesses to pages taken out for access sampling, over the point.
    sample_refaults: Option<u64>,
    /// The server's own GET execution time over the measured window (`INFO`'s
    /// `latency_percentiles_usec_get`, redis 7's `latencystats`, reset by `CONFIG
    /// RESETSTAT` when the window starts): p50, p99, p99.9 in µs. What the client's
    /// latency adds beyond it was spent queued (socket, wake-ups, a busy worker). `None`
    /// for memcached.
    server_get_us: Option<[f64; 3]>,
}

#[derive(Debug, Serialize)]
struct SideResult {
    side: String,
    /// Which repetition (1-based).
    run: usize,
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
    let (base, evict) = usm_variant(side);
    match base {
        "usm" | "usm-nopressure" | "usm-concurrent" => {
            let mut cmd = Command::new(&exe);
            if base == "usm-nopressure" {
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
            if base == "usm-concurrent" {
                cmd.arg("--concurrent");
            }
            if let Some(e) = evict {
                cmd.args(["--evict", e]);
            }
            cmd.args(["--workers", &a.usm_workers.to_string()]);
            let swap = run_dir.join(format!("{}.swap", side.replace(['/', ':'], "_")));
            let _ = std::fs::remove_file(&swap);
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
        other => Err(format!(
            "unknown side {other:?} (usm, usm-concurrent, usm-nopressure, each with an optional /EVICT; kernel, redis, memcached)"
        )
        .into()),
    }
}

/// `INFO` of a RESP server as `field -> value` (`None` if it cannot be read).
fn resp_info(addr: SocketAddr) -> Option<std::collections::HashMap<String, String>> {
    use std::io::Read;
    let mut s = resp_send(addr, &["INFO"]).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n")?;
        let len: usize = head.strip_prefix('$')?.parse().ok()?;
        if body.len() >= len {
            return Some(
                body[..len]
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                    .collect(),
            );
        }
    }
}

/// Connects to a RESP server and sends one command (reads time out after 10 s).
fn resp_send(addr: SocketAddr, args: &[&str]) -> std::io::Result<std::net::TcpStream> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    Ok(s)
}

/// Sends one RESP command and waits for its reply's first line.
fn resp_command(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(resp_send(addr, args)?).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// `latency_percentiles_usec_get` of an `INFO`: (p50, p99, p99.9) in µs.
fn server_get_latency(info: &std::collections::HashMap<String, String>) -> Option<[f64; 3]> {
    let v = info.get("latency_percentiles_usec_get")?;
    let mut out = [0.0; 3];
    for (slot, key) in out.iter_mut().zip(["p50", "p99", "p99.9"]) {
        *slot = v
            .split(',')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()?;
    }
    Some(out)
}

/// A server's memory counters at one moment (`None`: the side does not have it).
#[derive(Debug, Clone, Copy, Default)]
struct MemCounters {
    /// Swap-ins (usm) or the memory cgroup's major faults.
    swap_ins: Option<u64>,
    /// USM: pages evicted.
    evicted: Option<u64>,
    /// USM: faults that waited for a free frame.
    memory_waits: Option<u64>,
    /// USM: accesses to pages taken out for access sampling.
    sample_refaults: Option<u64>,
}

/// Reads a server's [`MemCounters`].
fn mem_counters(server: &Server, usm: bool) -> MemCounters {
    if usm {
        let info = resp_info(server.addr);
        let get = |k: &str| info.as_ref()?.get(k)?.parse().ok();
        MemCounters {
            swap_ins: get("swap_ins"),
            evicted: get("evicted"),
            memory_waits: get("memory_waits"),
            sample_refaults: get("sample_refaults"),
        }
    } else {
        let majflt = server
            .cgroup
            .as_ref()
            .and_then(|cg| cg.stats().ok())
            .map(|st| st.major_faults);
        MemCounters {
            swap_ins: majflt,
            ..MemCounters::default()
        }
    }
}

fn delta(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
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
    let pmqos = if a.pmqos {
        Some(usm_bench::PmQos::hold(0)?)
    } else {
        None
    };
    for run in 1..=a.repeat.max(1) {
        for side in &sides {
            match run_side(a, run, side, keys, budget, run_dir.path()) {
                Ok(r) => results.push(r),
                Err(e) => {
                    // A side that fails (e.g. OOM-killed) is reported, and the others still run.
                    eprintln!("  {side} #{run}: FAILED: {e}");
                    results.push(SideResult {
                        side: side.clone(),
                        run,
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
    }
    drop(pmqos);
    drop(kernel_swap);
    let load_end = loadavg();
    write_outputs(a, keys, dataset, &results, &load_start, &load_end)
}

fn run_side(
    a: &Args,
    run: usize,
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
            let usm = side.starts_with("usm");
            let c0 = mem_counters(&server, usm);
            let cpu0 = server.cpu_s();
            let resp = protocol == Protocol::Resp;
            // The server's own latency statistics cover the measured window only: cleared
            // when the warm-up ends (the generator keeps its own clock from the same start).
            let r = std::thread::scope(|sc| {
                if resp {
                    let addr = server.addr;
                    let at = Duration::from_millis(50) + spec.warmup;
                    sc.spawn(move || {
                        std::thread::sleep(at);
                        if let Err(e) = resp_command(addr, &["CONFIG", "RESETSTAT"]) {
                            eprintln!("  CONFIG RESETSTAT failed: {e}");
                        }
                    });
                }
                kvload::run(&spec)
            })?;
            let cpu = server.cpu_s() - cpu0;
            let server_get_us = if resp {
                resp_info(server.addr).as_ref().and_then(server_get_latency)
            } else {
                None
            };
            let c1 = mem_counters(&server, usm);
            let swap_ins = delta(c0.swap_ins, c1.swap_ins);
            eprintln!(
                "  {side} #{run} @ {rate:>6.0}/s: achieved {:>6.0}/s  p50 {:>7.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  hot/other p99 {:.0}/{:.0} us  server GET p99 {} us  lost {} errors {} misses {}  CPU {:.1} us/req  {} {}{}",
                r.achieved_rps,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                r.hot_p99_us,
                r.cold_p99_us,
                server_get_us.map_or("-".into(), |l| format!("{:.0}", l[1])),
                r.lost,
                r.errors,
                r.misses,
                cpu * 1e6 / r.completed.max(1) as f64,
                if usm { "swap-ins" } else { "pgmajfault" },
                swap_ins.map_or("?".into(), |n| n.to_string()),
                delta(c0.sample_refaults, c1.sample_refaults)
                    .map_or_else(String::new, |n| format!("  sampled re-faults {n}")),
            );
            points.push(Point {
                server_cpu_us_per_request: cpu * 1e6 / r.completed.max(1) as f64,
                server_cpu_s: cpu,
                load: r,
                swap_ins,
                evicted: delta(c0.evicted, c1.evicted),
                memory_waits: delta(c0.memory_waits, c1.memory_waits),
                sample_refaults: delta(c0.sample_refaults, c1.sample_refaults),
                server_get_us,
            });
        }
        let rss = server.proc_kib("VmRSS:");
        let swap = server.proc_kib("VmSwap:");
        let (base, evict) = usm_variant(side);
        let policy = evict.map_or_else(String::new, |e| format!(", eviction policy {e}"));
        let note = match base {
            "usm" => format!("USM pool = budget, USM swap file, no cgroup{policy}"),
            "usm-nopressure" => format!("USM pool 3x the data (no eviction), no cgroup{policy}"),
            "usm-concurrent" => format!(
                "USM pool = budget, USM swap file, no cgroup, a connection's reads on their own uThreads{policy}"
            ),
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
            run,
            points,
            preload_s,
            preload_errors,
            rss_kib_end: rss,
            swap_kib_end: swap,
            note,
        })
    }
}

/// The side names in the order they first ran.
fn side_names(results: &[SideResult]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in results {
        if !names.contains(&r.side) {
            names.push(r.side.clone());
        }
    }
    names
}

/// Point `i` of every run of `side`, in run order.
fn runs_at<'a>(results: &'a [SideResult], side: &str, i: usize) -> Vec<&'a Point> {
    results
        .iter()
        .filter(|r| r.side == side)
        .filter_map(|r| r.points.get(i))
        .collect()
}

fn median_of<'a>(points: impl IntoIterator<Item = &'a Point>, f: impl Fn(&Point) -> f64) -> f64 {
    let v: Vec<f64> = points.into_iter().map(f).collect();
    if v.is_empty() {
        return 0.0;
    }
    usm_bench::stats::median(&v)
}

/// The non-usm side with the lowest median p99 at point `i`: (name, median p99).
fn best_kernel(results: &[SideResult], i: usize) -> Option<(String, f64)> {
    side_names(results)
        .into_iter()
        .filter(|s| !s.starts_with("usm"))
        .filter_map(|s| {
            let runs = runs_at(results, &s, i);
            (!runs.is_empty()).then(|| {
                let m = median_of(runs, |p| p.load.p99_us);
                (s, m)
            })
        })
        .min_by(|x, y| x.1.total_cmp(&y.1))
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |n| n.to_string())
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
        "repeat": a.repeat,
        "cpu_dma_latency_held_at_0": a.pmqos,
        "usm_workers": a.usm_workers,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "sides": results,
    });
    std::fs::write(a.out.join("kv.json"), serde_json::to_string_pretty(&json)?)?;
    let names = side_names(results);
    let npoints = a.rates.len();
    let mut md = String::new();
    md.push_str(&format!(
        "budget {} MiB, {keys} keys x {} B ({} MiB, {:.1}x the budget), {:?}, GET {:.0}%, {} connections, {} s per point (+{} s warm-up), {} run(s) per side (interleaved), usm workers {}, /dev/cpu_dma_latency {}, load average {load_start} -> {load_end}\n\n",
        a.budget_mib,
        a.value_size,
        dataset >> 20,
        dataset as f64 / (a.budget_mib << 20) as f64,
        a.dist,
        a.get_ratio * 100.0,
        a.connections,
        a.duration,
        a.warmup,
        a.repeat,
        a.usm_workers,
        if a.pmqos { "held at 0 us" } else { "not held" }
    ));
    md.push_str("Every run. \"swap-ins\": pages read back over the whole point (warm-up and drain included): USM's swap-ins on usm sides, the memory cgroup's pgmajfault on the others. Hot: keys of popularity rank < ");
    md.push_str(&format!(
        "{} (their pages fit in half the budget).\n\n",
        (a.budget_mib << 20) / 4096 / 2
    ));
    md.push_str("\"server GET p99\": the server's own GET execution time over the measured window (its `INFO` `latencystats`; usm-kv and redis), faults and lock waits included: what the client's p99 adds to it was spent queued before execution (socket, wake-ups, a busy worker).\n\n");
    md.push_str("| side | run | offered/s | achieved/s | p50 us | p99 us | p99.9 us | hot p99 us | other p99 us | server GET p99 us | swap-ins | evicted | sampled re-faults | memory waits | lost | errors | misses | server CPU us/req |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in results {
        if s.points.is_empty() {
            md.push_str(&format!(
                "| {} | {} | {} | | | | | | | | | | | | | | |\n",
                s.side, s.run, s.note
            ));
        }
        for pt in &s.points {
            let p = &pt.load;
            md.push_str(&format!(
                "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
                s.side,
                s.run,
                p.offered_rps,
                p.achieved_rps,
                p.p50_us,
                p.p99_us,
                p.p999_us,
                p.hot_p99_us,
                p.cold_p99_us,
                pt.server_get_us.map_or("-".into(), |l| format!("{:.1}", l[1])),
                opt(pt.swap_ins),
                opt(pt.evicted),
                opt(pt.sample_refaults),
                opt(pt.memory_waits),
                p.lost,
                p.errors,
                p.misses,
                pt.server_cpu_us_per_request
            ));
        }
    }
    md.push_str("\nMedians over the runs:\n\n| side | offered/s | runs | p50 us | p99 us | p99.9 us | hot p99 us | other p99 us | server GET p99 us | swap-ins | server CPU us/req |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for name in &names {
        for i in 0..npoints {
            let runs = runs_at(results, name, i);
            if runs.is_empty() {
                continue;
            }
            let swaps: Vec<f64> = runs
                .iter()
                .filter_map(|p| p.swap_ins.map(|n| n as f64))
                .collect();
            let server: Vec<f64> = runs
                .iter()
                .filter_map(|p| p.server_get_us.map(|l| l[1]))
                .collect();
            md.push_str(&format!(
                "| {name} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} |\n",
                runs[0].load.offered_rps,
                runs.len(),
                median_of(runs.iter().copied(), |p| p.load.p50_us),
                median_of(runs.iter().copied(), |p| p.load.p99_us),
                median_of(runs.iter().copied(), |p| p.load.p999_us),
                median_of(runs.iter().copied(), |p| p.load.hot_p99_us),
                median_of(runs.iter().copied(), |p| p.load.cold_p99_us),
                if server.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1}", usm_bench::stats::median(&server))
                },
                if swaps.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", usm_bench::stats::median(&swaps))
                },
                median_of(runs.iter().copied(), |p| p.server_cpu_us_per_request),
            ));
        }
    }
    // Each usm side's p99 against the best kernel side (lowest median p99) at each load.
    let usm_sides: Vec<&String> = names.iter().filter(|n| n.starts_with("usm")).collect();
    if !usm_sides.is_empty() {
        md.push_str("\np99 against the best kernel side at the same offered load (ratio of the medians; per run: run i of each side, paired; the kernel side's absolute p99 next to each ratio):\n\n| side | offered/s | its median p99 us | best kernel side | its median p99 us | ratio of medians | per-run ratios (kernel p99 us) |\n|---|---|---|---|---|---|---|\n");
        for u in &usm_sides {
            for i in 0..npoints {
                let runs = runs_at(results, u, i);
                let Some((kname, kmed)) = best_kernel(results, i) else {
                    continue;
                };
                if runs.is_empty() || kmed <= 0.0 {
                    continue;
                }
                let umed = median_of(runs.iter().copied(), |p| p.load.p99_us);
                let kruns = runs_at(results, &kname, i);
                let per_run = runs
                    .iter()
                    .zip(&kruns)
                    .map(|(p, q)| {
                        format!(
                            "{:.2}x ({:.0})",
                            p.load.p99_us / q.load.p99_us.max(1.0),
                            q.load.p99_us
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                md.push_str(&format!(
                    "| {u} | {:.0} | {umed:.1} | {kname} | {kmed:.1} | {:.2}x | {per_run} |\n",
                    runs[0].load.offered_rps,
                    umed / kmed
                ));
            }
        }
    }
    md.push_str("\nThroughput at a 1 ms p99 objective (highest median achieved rate among points whose median p99 <= 1 ms and no run lost requests):\n\n");
    for name in &names {
        let best = (0..npoints)
            .filter_map(|i| {
                let runs = runs_at(results, name, i);
                let ok = !runs.is_empty()
                    && median_of(runs.iter().copied(), |p| p.load.p99_us) <= 1000.0
                    && runs.iter().all(|p| p.load.lost == 0);
                ok.then(|| median_of(runs, |p| p.load.achieved_rps))
            })
            .fold(0.0f64, f64::max);
        md.push_str(&format!("- {name}: {best:.0}/s\n"));
    }
    if let (true, true) = (
        names.iter().any(|n| n == "usm"),
        names.iter().any(|n| n == "usm-nopressure"),
    ) {
        md.push_str("\n| offered/s | usm hot p99 us (pressure, median) | usm-nopressure hot p99 us (median) | ratio |\n|---|---|---|---|\n");
        for i in 0..npoints {
            let u = runs_at(results, "usm", i);
            let n = runs_at(results, "usm-nopressure", i);
            if u.is_empty() || n.is_empty() {
                continue;
            }
            let (hu, hn) = (
                median_of(u.iter().copied(), |p| p.load.hot_p99_us),
                median_of(n.iter().copied(), |p| p.load.hot_p99_us),
            );
            md.push_str(&format!(
                "| {:.0} | {hu:.1} | {hn:.1} | {:.2}x |\n",
                u[0].load.offered_rps,
                hu / hn.max(1.0)
            ));
        }
    }
    md.push_str("\nRSS at the end of each side's last run (KiB): ");
    md.push_str(
        &names
            .iter()
            .filter_map(|n| results.iter().rev().find(|r| &r.side == n))
            .map(|s| format!("{} {} (+{} swapped)", s.side, s.rss_kib_end, s.swap_kib_end))
            .collect::<Vec<_>>()
            .join(", "),
    );
    md.push('\n');
    std::fs::write(a.out.join("kv-latest.md"), &md)?;
    let plot = LinePlot {
        title: format!(
            "p99 latency vs offered load, median of {} run(s) ({:?}, {} MiB budget)",
            a.repeat, a.dist, a.budget_mib
        ),
        x_label: "offered load (requests/s)".into(),
        y_label: "median p99 latency (us, log10)".into(),
        series: names
            .iter()
            .map(|name| Series {
                name: name.clone(),
                points: (0..npoints)
                    .filter_map(|i| {
                        let runs = runs_at(results, name, i);
                        (!runs.is_empty()).then(|| {
                            (
                                runs[0].load.offered_rps,
                                median_of(runs.iter().copied(), |p| p.load.p99_us)
                                    .max(1.0)
                                    .log10(),
                            )
                        })
                    })
                    .collect(),
            })
            .collect(),
        date: usm_bench::report::now_utc(),
        headline: kv_headline(results, npoints),
    };
    plot.write(&a.out.join("kv_latency.svg"))?;
    println!("{md}");
    Ok(())
}

/// The headline ratio: USM's median p99 over the best kernel side's median p99 at each
/// offered load (below 1: USM's tail is shorter), as in the report's ratio table.
fn kv_headline(results: &[SideResult], npoints: usize) -> Option<Headline> {
    let points: Vec<(f64, f64)> = (0..npoints)
        .filter_map(|i| {
            let runs = runs_at(results, "usm", i);
            let (_, best) = best_kernel(results, i)?;
            (!runs.is_empty() && best > 0.0).then(|| {
                (
                    runs[0].load.offered_rps,
                    median_of(runs.iter().copied(), |p| p.load.p99_us) / best,
                )
            })
        })
        .collect();
    (!points.is_empty()).then(|| Headline {
        y_label: "usm / best kernel side, median p99".into(),
        series: vec![Series {
            name: "usm / best kernel p99".into(),
            points,
        }],
        goal: Some(1.0),
    })
}
