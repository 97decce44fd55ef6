//! The redis baseline (issue 7): Debian's `redis-server` on loopback, driven by
//! `redis-benchmark` GET/SET with a bounded number of requests.
//!
//! A [`RedisSide`] says how the server runs:
//! - [`RedisSide::plain`]: no cgroup, no memory pressure;
//! - [`RedisSide::kernel_swap`]: in a memory cgroup limited to the budget (placed before
//!   exec), with kernel swap on a swap file on the project disk or on zram;
//! - [`RedisSide::wrapped`]: any argv prefix (e.g. `usm exec --pool … --`) with an optional
//!   cgroup — this is where USM's side plugs in.
//!
//! Every side: pre-warm the host, start the server on a free loopback port, populate
//! `keys` keys `key:%012d` (redis-benchmark's `-r` key format) of `value_bytes` each with a
//! pipelined client, check `DBSIZE`, run `redis-benchmark -t set,get -n requests -r keys`,
//! parse its CSV, stop the server, undo cgroup and swap.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::guard::{CgroupStats, MemCgroup, SwapFile, ZramSwap};
use crate::storm::SwapMedium;

/// Parameters of a redis run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisSpec {
    /// Requests per test (SET, then GET).
    pub requests: u64,
    /// Parallel client connections.
    pub clients: u32,
    /// Value size.
    pub value_bytes: usize,
    /// Keys populated (and the `-r` key space).
    pub keys: u64,
    /// Memory budget of the cgroup sides.
    pub budget_bytes: u64,
    /// Pipeline depth of redis-benchmark.
    pub pipeline: u32,
}

impl RedisSpec {
    /// Default: 96 Ki keys × 4 KiB (384 MiB of values) in a 192 MiB budget, 20 000 requests.
    pub fn default_run() -> Self {
        Self {
            requests: 20_000,
            clients: 16,
            value_bytes: 4096,
            keys: 96 * 1024,
            budget_bytes: 192 << 20,
            pipeline: 1,
        }
    }

    /// `--quick`: 24 Ki keys (96 MiB) in 48 MiB, 5 000 requests.
    pub fn quick() -> Self {
        Self {
            requests: 5_000,
            keys: 24 * 1024,
            budget_bytes: 48 << 20,
            ..Self::default_run()
        }
    }

    /// Bytes of values populated.
    pub fn dataset_bytes(&self) -> u64 {
        self.keys * self.value_bytes as u64
    }
}

/// How the server of one side runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisSide {
    /// Label in tables and JSON.
    pub label: String,
    /// Argv prefix before `redis-server …` (empty for the kernel sides).
    pub wrapper: Vec<String>,
    /// Cgroup memory limit, if any.
    pub cgroup_limit: Option<u64>,
    /// Kernel swap to enable for this side, if any.
    pub kernel_swap: Option<SwapMedium>,
}

impl RedisSide {
    /// No cgroup, no swap, no pressure.
    pub fn plain() -> Self {
        Self {
            label: "kernel-plain".into(),
            wrapper: Vec::new(),
            cgroup_limit: None,
            kernel_swap: None,
        }
    }

    /// In a cgroup of `budget` with kernel swap on `medium`.
    pub fn kernel_swap(medium: SwapMedium, budget: u64) -> Self {
        Self {
            label: format!("kernel-cgroup-{}", medium.label()),
            wrapper: Vec::new(),
            cgroup_limit: Some(budget),
            kernel_swap: Some(medium),
        }
    }

    /// Any wrapper (e.g. `["usm", "exec", "--pool", "48M", "--"]`), optionally in a cgroup.
    pub fn wrapped(label: &str, wrapper: Vec<String>, cgroup_limit: Option<u64>) -> Self {
        Self {
            label: label.into(),
            wrapper,
            cgroup_limit,
            kernel_swap: None,
        }
    }
}

/// Environment shared by the sides.
#[derive(Debug, Clone)]
pub struct RedisContext {
    /// Directory of swap files.
    pub swap_dir: PathBuf,
    /// How long to wait for `/dev/zram0`.
    pub zram_wait: Duration,
    /// Pre-warm the host before each side.
    pub prewarm: bool,
}

/// One side's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisResult {
    /// Side label.
    pub label: String,
    /// SET requests/s.
    pub set_ops_per_s: f64,
    /// GET requests/s.
    pub get_ops_per_s: f64,
    /// SET p50 latency (ms, from redis-benchmark).
    pub set_p50_ms: f64,
    /// SET p99 latency (ms).
    pub set_p99_ms: f64,
    /// GET p50 latency (ms).
    pub get_p50_ms: f64,
    /// GET p99 latency (ms).
    pub get_p99_ms: f64,
    /// Seconds to populate the keys.
    pub populate_s: f64,
    /// Keys in the database after populating.
    pub dbsize: u64,
    /// Kernel swap in use at the end of the run (bytes).
    pub swap_used_bytes: u64,
    /// Cgroup statistics at the end of the run.
    pub cgroup: Option<CgroupStats>,
}

/// Makes sure `redis-server` and `redis-benchmark` exist, installing Debian's packages if
/// not (and stopping the service the package may start).
pub fn ensure_redis_installed() -> Result<()> {
    let have = |p: &str| Path::new("/usr/bin").join(p).exists();
    if have("redis-server") && have("redis-benchmark") {
        return Ok(());
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "redis-server", "redis-tools"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::io("spawn", "apt-get", e))?;
    let _ = Command::new("service")
        .args(["redis-server", "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !(status.success() && have("redis-server") && have("redis-benchmark")) {
        return Err(Error::Unavailable {
            facility: "redis-server",
            reason: format!("apt-get install redis-server redis-tools: {status}"),
        });
    }
    Ok(())
}

/// A server child stopped on drop: `SHUTDOWN NOSAVE` first (the server exits by itself, so
/// a wrapper such as `usm exec` sees it end and writes its summary), then SIGTERM, then
/// SIGKILL, each after [`SERVER_STOP_GRACE`].
struct ServerProcess {
    child: Child,
    dir: PathBuf,
    port: u16,
}

/// How long a stopping server (and its wrapper) gets between SIGTERM and SIGKILL.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(10);

impl ServerProcess {
    /// Stops the server (idempotent); see the type's docs.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
            let mut buf = Vec::new();
            RespClient::encode(&mut buf, &[b"SHUTDOWN", b"NOSAVE"]);
            let _ = stream.write_all(&buf);
            if self.wait_exit(SERVER_STOP_GRACE) {
                return;
            }
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if self.wait_exit(SERVER_STOP_GRACE) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `grace` for the child to exit; true when it did.
    fn wait_exit(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The server's (and its wrapper's) stdout + stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("bind", "127.0.0.1:0", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("local_addr", "127.0.0.1", e))
}

/// A minimal RESP client for set-up commands (not for measurement).
struct RespClient {
    stream: TcpStream,
}

impl RespClient {
    fn connect(port: u16, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => {
                    let mut c = Self { stream };
                    if c.command(&[b"PING"])
                        .map(|r| r.starts_with(b"+PONG"))
                        .unwrap_or(false)
                    {
                        return Ok(c);
                    }
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::io("connect", format!("127.0.0.1:{port}"), e));
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Child {
                    what: "redis-server".into(),
                    detail: "did not answer PING".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn encode(buf: &mut Vec<u8>, args: &[&[u8]]) {
        buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
    }

    /// Sends one command and returns its one-line reply.
    fn command(&mut self, args: &[&[u8]]) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        Self::encode(&mut buf, args);
        self.stream
            .write_all(&buf)
            .map_err(|e| Error::io("send", "redis", e))?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            self.stream
                .read_exact(&mut byte)
                .map_err(|e| Error::io("recv", "redis", e))?;
            reply.push(byte[0]);
        }
        Ok(reply)
    }

    /// Pipelined `SET key:%012d <value>` for `0..keys`, batches of 128.
    fn populate(&mut self, keys: u64, value_bytes: usize) -> Result<()> {
        let mut value = vec![0u8; value_bytes];
        for (i, b) in value.iter_mut().enumerate() {
            *b = b'a' + (i % 26) as u8;
        }
        let mut k = 0;
        while k < keys {
            let n = (keys - k).min(128);
            let mut buf = Vec::with_capacity(n as usize * (value_bytes + 64));
            for j in k..k + n {
                let key = format!("key:{j:012}");
                value[..8.min(value_bytes)].copy_from_slice(&j.to_le_bytes()[..8.min(value_bytes)]);
                Self::encode(&mut buf, &[b"SET", key.as_bytes(), &value]);
            }
            self.stream
                .write_all(&buf)
                .map_err(|e| Error::io("send", "redis", e))?;
            let mut replies = vec![0u8; n as usize * 5];
            self.stream
                .read_exact(&mut replies)
                .map_err(|e| Error::io("recv", "redis", e))?;
            if replies.chunks(5).any(|r| r != b"+OK\r\n") {
                return Err(Error::Child {
                    what: "redis-server".into(),
                    detail: format!(
                        "SET failed: {}",
                        String::from_utf8_lossy(&replies[..40.min(replies.len())])
                    ),
                });
            }
            k += n;
        }
        Ok(())
    }

    fn dbsize(&mut self) -> Result<u64> {
        let r = self.command(&[b"DBSIZE"])?;
        let t = String::from_utf8_lossy(&r);
        t.trim()
            .trim_start_matches(':')
            .parse()
            .map_err(|_| Error::Parse {
                what: "DBSIZE reply",
                detail: t.into_owned(),
            })
    }
}

/// Figures of one test in redis-benchmark's CSV output.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BenchmarkRow {
    /// Requests per second.
    pub rps: f64,
    /// p50 latency, ms.
    pub p50_ms: f64,
    /// p99 latency, ms.
    pub p99_ms: f64,
}

/// Parses `redis-benchmark --csv` output: the header names the columns; returns the row
/// of `test` (e.g. `"SET"`).
pub fn parse_benchmark_csv(csv: &str, test: &str) -> Result<BenchmarkRow> {
    let split = |l: &str| -> Vec<String> {
        l.split(',')
            .map(|f| f.trim().trim_matches('"').to_string())
            .collect()
    };
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header = split(lines.next().unwrap_or_default());
    let col = |name: &str| header.iter().position(|h| h == name);
    let row = lines
        .map(split)
        .find(|r| r.first().is_some_and(|t| t == test))
        .ok_or_else(|| Error::Parse {
            what: "redis-benchmark csv",
            detail: format!("no {test} row in {csv:?}"),
        })?;
    let get = |name: &str| -> Result<f64> {
        col(name)
            .and_then(|i| row.get(i))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Parse {
                what: "redis-benchmark csv",
                detail: format!("no {name} for {test} in {csv:?}"),
            })
    };
    Ok(BenchmarkRow {
        rps: get("rps")?,
        p50_ms: get("p50_latency_ms").unwrap_or(f64::NAN),
        p99_ms: get("p99_latency_ms").unwrap_or(f64::NAN),
    })
}

/// Priority of a side's kernel swap: above the default of swaps someone else may turn on
/// meanwhile on this shared machine (the kernel fills higher priorities first), so the
/// side swaps to the medium it names.
const SIDE_SWAP_PRIORITY: i16 = 1000;

enum SideSwap {
    None,
    File(SwapFile),
    Zram(ZramSwap),
}

impl SideSwap {
    fn used_bytes(&self) -> u64 {
        match self {
            SideSwap::None => 0,
            SideSwap::File(f) => f.used_bytes(),
            SideSwap::Zram(z) => z.used_bytes(),
        }
    }
}

/// Runs one side; see the module docs.
pub fn run_redis_side(
    side: &RedisSide,
    spec: &RedisSpec,
    ctx: &RedisContext,
) -> Result<RedisResult> {
    run_redis_side_logged(side, spec, ctx).map(|(result, _log)| result)
}

/// Runs one side like [`run_redis_side`] and also returns what the server and its wrapper
/// wrote to stdout/stderr, read after the server stopped (SIGTERM, so a wrapper such as
/// `usm exec --report json` has printed its exit summary).
pub fn run_redis_side_logged(
    side: &RedisSide,
    spec: &RedisSpec,
    ctx: &RedisContext,
) -> Result<(RedisResult, String)> {
    ensure_redis_installed()?;
    let dataset = spec.dataset_bytes();
    if ctx.prewarm {
        crate::prewarm::prewarm_host(dataset * 2 + (64 << 20))?;
    }
    let swap_bytes = dataset * 2 + (64 << 20);
    let swap = match side.kernel_swap {
        None => SideSwap::None,
        Some(SwapMedium::File) => SideSwap::File(SwapFile::create(
            &ctx.swap_dir,
            swap_bytes,
            SIDE_SWAP_PRIORITY,
        )?),
        Some(SwapMedium::Zram) => SideSwap::Zram(ZramSwap::create(
            swap_bytes,
            SIDE_SWAP_PRIORITY,
            ctx.zram_wait,
        )?),
    };
    let cgroup = match side.cgroup_limit {
        Some(limit) => Some(MemCgroup::create(&format!("redis-{}", side.label), limit)?),
        None => None,
    };
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("usm-bench-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", &dir, e))?;
    let log =
        std::fs::File::create(dir.join("server.log")).map_err(|e| Error::io("create", &dir, e))?;
    let log2 = log.try_clone().map_err(|e| Error::io("dup", &dir, e))?;
    let server_args: Vec<String> = [
        "redis-server",
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
        "--dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(dir.to_string_lossy().into_owned()))
    .collect();
    let argv: Vec<String> = side.wrapper.iter().cloned().chain(server_args).collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    crate::sys::kill_child_with_parent(&mut cmd);
    if let Some(cg) = &cgroup {
        cg.place_before_exec(&mut cmd);
    }
    let child = cmd.spawn().map_err(|e| Error::io("spawn", &argv[0], e))?;
    let mut server = ServerProcess { child, dir, port };
    let mut client = RespClient::connect(port, Duration::from_secs(15))?;
    let t0 = Instant::now();
    client.populate(spec.keys, spec.value_bytes)?;
    let populate_s = t0.elapsed().as_secs_f64();
    let dbsize = client.dbsize()?;
    if dbsize != spec.keys {
        return Err(Error::Child {
            what: "redis-server".into(),
            detail: format!("DBSIZE {dbsize} after populating {} keys", spec.keys),
        });
    }
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-n",
            &spec.requests.to_string(),
            "-r",
            &spec.keys.to_string(),
            "-d",
            &spec.value_bytes.to_string(),
            "-c",
            &spec.clients.to_string(),
            "-P",
            &spec.pipeline.to_string(),
            "--csv",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("spawn", "redis-benchmark", e))?;
    if !out.status.success() {
        return Err(Error::Child {
            what: "redis-benchmark".into(),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let csv = String::from_utf8_lossy(&out.stdout);
    let set = parse_benchmark_csv(&csv, "SET")?;
    let get = parse_benchmark_csv(&csv, "GET")?;
    let swap_used_bytes = swap.used_bytes();
    let cgroup_stats = match &cgroup {
        Some(cg) => Some(cg.stats()?),
        None => None,
    };
    drop(client);
    server.stop();
    let log = server.log();
    drop(server);
    drop(cgroup);
    drop(swap);
    let result = RedisResult {
        label: side.label.clone(),
        set_ops_per_s: set.rps,
        get_ops_per_s: get.rps,
        set_p50_ms: set.p50_ms,
        set_p99_ms: set.p99_ms,
        get_p50_ms: get.p50_ms,
        get_p99_ms: get.p99_ms,
        populate_s,
        dbsize,
        swap_used_bytes,
        cgroup: cgroup_stats,
    };
    Ok((result, log))
}
