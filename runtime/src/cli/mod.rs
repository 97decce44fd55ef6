//! The `usm` command (feature `cli`): `usm run` (the InstanceUSM daemon), `usm exec` (tag
//! and run one program under a private daemon), `usm compare` (the same against kernel
//! swap), `usm stat`, `usm mkswap`, `usm demo`,
//! `usm doctor` and `usm check-config`.
//!
//! The command lives in the library so that a program of a few lines is a complete `usm`
//! with policies of its own ([`main_with`]); the `usm` binary is [`main`]. An embedder of
//! the runtime builds without this feature and links no clap, indicatif or prometheus.
//!
//! # A `usm` with your own policies
//!
//! ```no_run
//! use usm_policies::{Param, PolicyError, Registry};
//!
//! fn register(reg: &mut Registry) -> Result<(), PolicyError> {
//!     // reg.register_evict("my-policy", Param::None, |_| Ok(Box::new(MyPolicy::new())))?;
//!     # let _ = (reg, Param::None);
//!     Ok(())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     usm_runtime::cli::main_with(register)
//! }
//! ```
//!
//! `examples/evict_policy.rs` is a complete one (an eviction policy, run with `usm exec`
//! and `usm run`); see its docs for the commands.

mod app;

pub use app::{main, main_with};

pub(crate) mod docs;
mod stat;
pub(crate) use stat::{Target as StatTarget, stat};

mod compare;
pub(crate) use compare::{CompareArgs, compare};

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use usm_runtime::config::{Config, ProcessRule, Spanned, SwapSpec, parse_size};
use usm_runtime::daemon::{self, Daemon, DaemonOptions, DaemonStat, ProcessStat, RegisterPolicies};

/// Output format of `usm exec`'s summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReportFormat {
    /// Two human-readable lines on stderr.
    Human,
    /// One JSON object on one line on stderr.
    Json,
}

/// Arguments of `usm exec`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExecArgs {
    /// Config file for the private daemon (the program is added to it if it does not
    /// name it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Pool size: pages, or a size (512M, 2G). Default: the config's, else 32768 pages.
    #[arg(long)]
    pool: Option<String>,
    /// Allocation policy for the program (first-fit, fhp:64K, ...).
    #[arg(long)]
    policy: Option<String>,
    /// Worker threads of the private daemon.
    #[arg(long)]
    workers: Option<usize>,
    /// A USM swap device or file (`usm mkswap`); default: a private temporary file.
    #[arg(long)]
    swap: Option<PathBuf>,
    /// Size of the private swap file, sparse (default: 64 × the pool, at least 4G, at most
    /// half the free space of its file system).
    #[arg(long)]
    swap_size: Option<String>,
    /// Use the daemon already listening on this socket instead of a private one.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Serve Prometheus metrics of the private daemon on this address (127.0.0.1:9464;
    /// port 0 picks one). Default: the config's `metrics` line, if any.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "socket")]
    metrics: Option<std::net::SocketAddr>,
    /// Summary format at exit.
    #[arg(long, value_enum, default_value = "human")]
    report: ReportFormat,
    /// The program and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("USM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Blocks SIGINT/SIGTERM in this thread (and every thread started after) and returns a
/// signalfd that reads them.
fn signal_fd() -> Result<SignalFd, String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| format!("cannot block SIGINT/SIGTERM: {e}"))?;
    SignalFd::new(&set).map_err(|e| format!("signalfd: {e}"))
}

/// Checks a config's policy names as the daemon will (used by `usm check-config`).
pub(crate) fn check_policies(
    cfg: &Config,
    register: Option<RegisterPolicies>,
) -> Result<(), String> {
    daemon::validate_with(cfg, register).map_err(|e| e.to_string())
}

/// `usm run CONFIG`.
pub(crate) fn run(config: &Path, register: Option<RegisterPolicies>) -> ExitCode {
    init_tracing("info");
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usm: {e}");
            return ExitCode::from(2);
        }
    };
    let sfd = match signal_fd() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = DaemonOptions {
        register,
        ..DaemonOptions::default()
    };
    let d = match Daemon::start(&cfg, &opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("usm: cannot start the daemon ({}): {e}", config.display());
            return ExitCode::from(if matches!(e, daemon::DaemonError::Policy { .. }) {
                2
            } else {
                1
            });
        }
    };
    eprintln!(
        "{}; SIGINT/SIGTERM to stop",
        stat::daemon_line(&d.stat(), d.metrics_addr())
    );
    let sig = loop {
        match sfd.read_signal() {
            Ok(Some(s)) => break s.ssi_signo,
            Ok(None) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("usm: reading signals failed: {e}");
                break 0;
            }
        }
    };
    eprintln!("usm: signal {sig}: giving memory back to every managed program");
    let s = d.shutdown();
    eprintln!(
        "usm: stopped; {} process(es) released, {} page(s) returned, {} could not be read back",
        s.processes, s.pages_returned, s.pages_lost
    );
    ExitCode::SUCCESS
}

/// Where `libusm_tagger.so` is: `USM_TAGGER` (an explicit choice wins), else relative to
/// the `usm` binary itself — beside it (a build's `target/release`), its parent (test
/// binaries in `deps/`), or `../lib/usm/` (what `scripts/install` lays out:
/// `PREFIX/bin/usm`, `PREFIX/lib/usm/libusm_tagger.so`) — else the build's target
/// directory.
pub(crate) fn find_tagger() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("USM_TAGGER") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut candidates = vec![
        dir.join("libusm_tagger.so"),
        dir.join("../libusm_tagger.so"),
        dir.join("../lib/usm/libusm_tagger.so"),
    ];
    if let Some(t) = option_env!("USM_BUILD_TARGET_DIR") {
        candidates.push(Path::new(t).join("debug/libusm_tagger.so"));
        candidates.push(Path::new(t).join("release/libusm_tagger.so"));
    }
    candidates.into_iter().find(|p| p.exists())
}

fn resolve_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Why `LD_PRELOAD` will not reach `program`, if it will not.
fn preload_obstacle(program: &Path) -> Option<String> {
    match usm_proto::preload::preload_obstacle(program) {
        Ok(Some(o)) => Some(format!(
            "{} is {o}: it runs unmanaged (no tagger, no summary of its memory)",
            program.display()
        )),
        _ => None,
    }
}

/// The name the tagger will report: `/proc/PID/comm`, the file name cut to 15 bytes.
fn comm_of(program: &Path) -> String {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// `--pool` in pages, checked as the config file's `memory` line is (not empty, not more
/// than this machine's physical memory).
fn exec_pool_pages(a: &ExecArgs) -> Result<Option<u64>, String> {
    let Some(pool) = &a.pool else {
        return Ok(None);
    };
    let pages = if pool.bytes().all(|b| b.is_ascii_digit()) {
        pool.parse().map_err(|_| format!("bad --pool {pool}"))?
    } else {
        parse_size(pool, "memory")
            .map_err(|e| format!("--pool: {e}"))?
            .div_ceil(4096)
    };
    if pages == 0 {
        return Err("--pool: the pool cannot be empty".into());
    }
    let machine = usm_runtime::config::Machine::current();
    if pages > machine.ram_pages {
        return Err(format!(
            "--pool: {pages} pages is more than this machine's physical memory ({} pages)",
            machine.ram_pages
        ));
    }
    Ok(Some(pages))
}

/// `--workers`, checked as the config file's `workers` line is (1 ..= online cores).
fn exec_workers(a: &ExecArgs) -> Result<Option<usize>, String> {
    let Some(w) = a.workers else {
        return Ok(None);
    };
    let max = usm_runtime::config::Machine::current()
        .online_cores
        .clamp(1, usm_runtime::config::MAX_WORKERS);
    if w == 0 || w > max {
        return Err(format!(
            "--workers {w}: must be 1..={max} (this machine's online cores)"
        ));
    }
    Ok(Some(w))
}

fn exec_config(a: &ExecArgs, program: &Path) -> Result<Config, String> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(pages) = exec_pool_pages(a)? {
        cfg.memory_pages = pages;
    }
    let max_workers = usm_runtime::config::Machine::current()
        .online_cores
        .clamp(1, usm_runtime::config::MAX_WORKERS);
    if let Some(w) = exec_workers(a)? {
        cfg.workers = Some(w);
    } else if cfg.workers.is_none() {
        cfg.workers = Some(2.min(max_workers));
    }
    if let Some(s) = &a.swap {
        cfg.swap = vec![SwapSpec {
            path: s.clone(),
            priority: 0,
            line: 0,
        }];
    }
    let policy = a
        .policy
        .clone()
        .or_else(|| cfg.default_policy().map(str::to_owned))
        .unwrap_or_else(|| "first-fit".to_owned());
    let comm = comm_of(program);
    if let Some(r) = cfg.processes.iter_mut().find(|r| r.name == comm) {
        if a.policy.is_some() {
            r.policy.value = policy;
        }
    } else {
        cfg.processes.push(ProcessRule {
            name: comm,
            policy: Spanned {
                value: policy,
                line: 0,
            },
        });
    }
    // Created fresh, 0700, never a directory someone else prepared (root: /run/usm;
    // others: $XDG_RUNTIME_DIR if it is theirs and 0700, else mkdtemp).
    let dir = daemon::private_socket_dir().map_err(|e| e.to_string())?;
    cfg.socket = dir.join(daemon::PRIVATE_SOCKET_NAME);
    if let Some(m) = a.metrics {
        cfg.metrics = Some(m);
    }
    Ok(cfg)
}

/// `usm exec`.
pub(crate) fn exec(a: &ExecArgs, register: Option<RegisterPolicies>) -> ExitCode {
    init_tracing("warn");
    let Some(program) = resolve_program(&a.command[0]) else {
        eprintln!("usm: {}: command not found", a.command[0]);
        return ExitCode::from(127);
    };
    if let Some(why) = preload_obstacle(&program) {
        eprintln!("usm: warning: {why}");
    }
    // Bad flags first: they are the user's to fix whatever else is missing.
    if let Err(e) = exec_pool_pages(a).and(exec_workers(a)) {
        eprintln!("usm: {e}");
        return ExitCode::from(2);
    }
    let Some(tagger) = find_tagger() else {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        eprintln!(
            "usm: libusm_tagger.so not found (beside {exe}, in ../lib/usm/ from it, or in \
             USM_TAGGER); build it with `cargo build -p usm-tagger`, or install both with \
             `scripts/install`"
        );
        return ExitCode::from(1);
    };
    // Ctrl-C reaches the program through the terminal; usm waits for it to exit.
    let sfd = match signal_fd() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (daemon, socket) = if let Some(sock) = &a.socket {
        (None, sock.clone())
    } else {
        let cfg = match exec_config(a, &program) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("usm: {e}");
                return ExitCode::from(2);
            }
        };
        // A private daemon serves its own user (and root), whatever the environment says.
        let mut opts = DaemonOptions {
            peers: daemon::PeerRule::same_user(),
            register,
            ..DaemonOptions::default()
        };
        if let Some(s) = &a.swap_size {
            match parse_size(s, "swap-size") {
                Ok(b) => opts.temp_swap_bytes = b,
                Err(e) => {
                    eprintln!("usm: --swap-size: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        match Daemon::start(&cfg, &opts) {
            Ok(d) => {
                eprintln!("{}", stat::private_daemon_line(&d.stat(), d.metrics_addr()));
                let s = d.socket().to_path_buf();
                (Some(d), s)
            }
            Err(e) => {
                eprintln!("usm: cannot start the private daemon: {e}");
                if let Some(dir) = cfg.socket.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
                return ExitCode::from(1);
            }
        }
    };
    let preload = match std::env::var_os("LD_PRELOAD") {
        Some(old) if !old.is_empty() => {
            let mut s = tagger.clone().into_os_string();
            s.push(":");
            s.push(old);
            s
        }
        _ => tagger.clone().into_os_string(),
    };
    let started = Instant::now();
    let mut cmd = Command::new(&program);
    cmd.args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env(usm_proto::SOCKET_ENV, &socket);
    usm_runtime::unblock_termination_signals(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usm: cannot run {}: {e}", program.display());
            if let Some(d) = daemon {
                let dir = d.socket().parent().map(Path::to_path_buf);
                d.shutdown();
                if let Some(dir) = dir {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            return ExitCode::from(127);
        }
    };
    let pid = child.id();
    // Forward SIGINT/SIGTERM sent to usm itself (not via the terminal) to the program.
    let forward = std::thread::Builder::new()
        .name("usm-signals".into())
        .spawn(move || {
            while let Ok(Some(s)) = sfd.read_signal() {
                if s.ssi_pid == std::process::id() && s.ssi_signo == 0 {
                    return;
                }
                if let Ok(sig) = Signal::try_from(s.ssi_signo as i32) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
                }
            }
        });
    drop(forward);
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usm: waiting for the program failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let wall = started.elapsed();
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    if let Some(d) = daemon {
        // Let the readers see the exit and fold the processes into `ended`, and the
        // write-backs still in flight for them complete (each holds a frame until then:
        // counted in `frames_used_at_exit` otherwise).
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let s = d.stat();
            if s.processes.is_empty() && s.faults_in_flight == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stat = d.stat();
        report(a.report, &stat, pid, code, wall);
        let dir = d.socket().parent().map(Path::to_path_buf);
        d.shutdown();
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn report(format: ReportFormat, stat: &DaemonStat, pid: u32, code: i32, wall: Duration) {
    let main: Option<&ProcessStat> = stat
        .ended
        .iter()
        .chain(&stat.processes)
        .find(|p| p.pid == pid);
    let sum = |f: fn(&ProcessStat) -> u64| stat.total(f);
    let managed = main.is_some();
    let cov = main.and_then(|p| {
        (p.anon_bytes > 0).then(|| p.managed_anon_bytes as f64 / p.anon_bytes as f64)
    });
    let json = serde_json::json!({
        "pid": pid,
        "exit_code": code,
        "managed": managed,
        "policy": main.map(|p| p.policy.clone()),
        "wall_s": wall.as_secs_f64(),
        "faults": sum(|p| p.faults),
        "zero_fills": sum(|p| p.zero_fills),
        "fhp_pages": sum(|p| p.fhp_pages),
        "evictions": sum(|p| p.evictions),
        "swapins": sum(|p| p.swapins),
        "poisoned": sum(|p| p.poisoned),
        "forks": sum(|p| p.forks),
        "released_frames": sum(|p| p.released_frames),
        "hints_accepted": sum(|p| p.hints),
        "hints_refused": sum(|p| p.hints_refused),
        "prefetches": stat.prefetches,
        "fault_p50_us": stat.latency.p50_us,
        "fault_p99_us": stat.latency.p99_us,
        "coverage": cov,
        "pool_pages": stat.pool_pages,
        "frames_used_at_exit": stat.frames_used,
        "slots_used_at_exit": stat.slots_used,
    });
    let mut err = std::io::stderr().lock();
    match format {
        ReportFormat::Json => {
            let _ = writeln!(err, "{json}");
        }
        ReportFormat::Human => {
            if !managed {
                let _ = writeln!(
                    err,
                    "usm: pid {pid} exited with {code}; it was not managed (see the tagger's warning)"
                );
                return;
            }
            let _ = writeln!(
                err,
                "usm: pid {pid} exited with {code} after {:.2}s; policy {}",
                wall.as_secs_f64(),
                main.map_or("?", |p| p.policy.as_str())
            );
            let _ = writeln!(
                err,
                "usm: {} faults served (p50 {:.1} µs, p99 {:.1} µs), {} pages by flexible huge pages, \
                 {} evictions, {} swap-ins, coverage {}",
                sum(|p| p.faults),
                stat.latency.p50_us,
                stat.latency.p99_us,
                sum(|p| p.fhp_pages),
                sum(|p| p.evictions),
                sum(|p| p.swapins),
                cov.map_or("n/a".to_owned(), |c| format!("{:.1}%", c * 100.0))
            );
            let (accepted, refused) = (sum(|p| p.hints), sum(|p| p.hints_refused));
            if accepted + refused > 0 {
                let why = if refused > 0 {
                    " (the log above says why)"
                } else {
                    ""
                };
                let _ = writeln!(
                    err,
                    "usm: hints: {accepted} accepted, {refused} refused{why}"
                );
            }
        }
    }
}

/// `usm mkswap`.
pub(crate) fn mkswap(path: &Path, size: Option<&str>, force: bool) -> ExitCode {
    let result = if path.exists() {
        if let Some(sz) = size {
            if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                eprintln!(
                    "usm: {} exists; --size only applies to a new file (remove it first)",
                    path.display()
                );
                return ExitCode::from(2);
            }
            let _ = sz;
        }
        usm_swap::format(path, &usm_swap::FormatOptions { force })
    } else {
        let Some(sz) = size else {
            eprintln!(
                "usm: {} does not exist: give --size to create it",
                path.display()
            );
            return ExitCode::from(2);
        };
        match parse_size(sz, "size") {
            Ok(b) => usm_swap::create_swap_file(path, b),
            Err(e) => {
                eprintln!("usm: --size: {e}");
                return ExitCode::from(2);
            }
        }
    };
    match result {
        Ok(h) => {
            println!("{}: USM swap, {:?}", path.display(), h);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("usm: mkswap {}: {e}", path.display());
            if matches!(e, usm_swap::SwapError::ForeignData { .. }) {
                eprintln!("usm: (use --force to overwrite it)");
            }
            ExitCode::FAILURE
        }
    }
}
