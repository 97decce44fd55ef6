//! InstanceUSM, the daemon: manages the anonymous memory of unmodified programs tagged
//! with `libusm_tagger.so` (`usm run CONFIG`, or privately under `usm exec`).
//!
//! # Pieces
//! | piece | thread(s) | module |
//! |---|---|---|
//! | accept loop: `SO_PEERCRED` against the [`PeerRule`], session limits, then (one bounded admission thread per connection) Hello, policy by name, `UFFDIO_API`, Ack/Refused | `usm-accept`, `usm-admit` | [`sessions`], [`process`] (`admit`) |
//! | one reader per userfaultfd (fork children get their own) | `usm-rd-PID` | [`process`] |
//! | fault service: one job per fault, on a pool of OS threads or as workees on the LocalManager workers ([`FaultRunner`]) | `usm-fault-N` / `usm-localmanager` workers | [`process`], [`pool`] |
//! | the configured policies of each process (allocation per fault, eviction victims, OOM; hints), guarded against panics | whoever holds the process's map lock | [`policy`], [`space`] |
//! | swap I/O: io_uring engine, parks/unparks workees | `usm-swap-io` | [`swapio`] |
//! | eviction through the tagger's agent | `usm-evict` | [`evict`] |
//! | `usm stat` socket (`SOCKET.stat`, JSON lines) | `usm-stat` | [`control`] |
//! | Prometheus exposition (`metrics ADDR`) | `usm-metrics` | [`metrics`] |
//!
//! # Memory accounting
//! The pool is a budget of `memory` frames. Cross-process, a frame is not a page of the
//! daemon's (`UFFDIO_MOVE` cannot cross address spaces): the daemon installs with
//! `UFFDIO_COPY` from its buffers, and a frame is one page it mapped into a program and
//! that is still there. Every such page is in exactly one [`space::PageMap`], and
//! `frames_used` is the sum of their `charged` counts, kept in lockstep by the map.
//! Swap slots belong to [`space::SwapCell`]s and are freed when the last sharer (after
//! fork) lets go. A process that exits, `munmap`s or `madvise(DONTNEED/FREE)`s gives its
//! frames and slots back at the event.
//!
//! # Shutdown (SIGINT/SIGTERM on `usm run`, end of `usm exec`), numbered
//! 1. Stop admitting (new taggers get `Refused(Busy)`), stop the accept loop.
//! 2. Stop the evictor (no page leaves a program any more).
//! 3. For each managed process: copy every evicted page back into it (`UFFDIO_COPY`
//!    from swap or the swap cache), tell the tagger `SwapState 0`, send `Bye`, stop its
//!    reader; closing the daemon's userfaultfd lets the kernel unregister its ranges,
//!    and the program continues unmanaged with all its data.
//! 4. Stop the workers, the swap I/O thread, delete a private swap file and the socket
//!    files this daemon created (only if they are still the inodes it bound, see
//!    [`sockfile`]). Stat and metrics clients are never waited for: each is served on a
//!    thread of its own with deadlines ([`control`], [`metrics`]).
//!
//! # Who may connect
//! The taggers' socket file gets mode `0600` (`0666` when the [`PeerRule`] admits
//! other users: then the rule filters), set explicitly; the stat socket `0600`. Every
//! connection's `SO_PEERCRED` is checked against the rule before anything is read from
//! it; admitted sessions are counted per uid and per process ([`SessionLimits`]). A
//! private daemon (`usm exec`) lives in a fresh `0700` directory
//! ([`private_socket_dir`]) and accepts only its own user and root.

mod control;
mod evict;
mod leftovers;
mod metrics;
mod nap;
mod policy;
mod pool;
mod process;
mod sessions;
mod sockfile;
mod space;
pub mod stats;
mod swapio;
mod sys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};
use usm_sync::{Arc, Condvar, Mutex};

use usm_policies::Registry;
use usm_proto::server::{self, Listener};

use crate::config::{Config, WakerMode};
pub use control::{query_stat, stat_socket_path};
pub use leftovers::private_socket_dir;
pub use pool::FaultRunner;
pub use sessions::SessionLimits;
pub use stats::{DaemonStat, Latency, ProcessStat};
pub use usm_proto::server::PeerRule;

use process::Proc;
use stats::ProcCounters;
use swapio::SwapStore;

/// Everything that can stop the daemon from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A config value the daemon cannot use (the line is the config's).
    #[error("config line {line}: {why}")]
    Config {
        /// Line in the config file.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A policy name the registry does not know.
    #[error("config line {line}: {source}")]
    Policy {
        /// Line in the config file.
        line: usize,
        /// The registry's error (lists the known names).
        #[source]
        source: usm_policies::PolicyError,
    },
    /// The taggers' socket.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: usm_proto::ProtoError,
    },
    /// Something else than a stale socket of ours is at a socket path; it is left alone.
    #[error("socket {path}: {why}")]
    SocketPath {
        /// The path (`socket PATH`, or `PATH.stat`).
        path: PathBuf,
        /// What is there and why it is not used.
        why: String,
    },
    /// A swap device.
    #[error("swap: {0}")]
    Swap(#[from] usm_swap::SwapError),
    /// The LocalManager runtime.
    #[error("workers: {0}")]
    Sched(#[from] usm_localmanager::SchedError),
    /// Another OS resource at start-up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Another daemon already listens on the socket.
    pub fn is_address_in_use(&self) -> bool {
        matches!(self, DaemonError::Socket { source, .. } if source.errno() == Some(libc::EADDRINUSE))
    }
}

/// Options beyond the config file.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Where a private swap file goes when the config names no swap device.
    pub temp_swap_dir: PathBuf,
    /// Size of that private swap file (bytes).
    pub temp_swap_bytes: u64,
    /// What serves faults (see [`FaultRunner`]).
    pub runner: FaultRunner,
    /// How long one fault waits in all for a frame (the allocation policy answering
    /// `Oom` while the evictor works) before the process's OOM policy is asked. The
    /// default, 10 s, only fails accesses when eviction is truly stuck (nothing
    /// evictable: every page `EVICTION=DENY`, or no agent).
    pub oom_wait: Duration,
    /// Registers extra policies (beyond the built-ins) before the config's policy names
    /// are checked: how an embedder — or a test — brings its own policy to the daemon.
    pub register: Option<RegisterPolicies>,
    /// Whose programs may attach (checked on `SO_PEERCRED`). Default: the daemon's own
    /// uid and root, or `USM_ALLOW_UIDS` (`1000,1001`, or `*` for every user) for a
    /// system daemon serving other users. `usm exec` always uses the default.
    pub peers: PeerRule,
    /// Sessions per uid and per process, admissions in progress.
    pub limits: SessionLimits,
}

/// A function adding policies to the daemon's registry (see [`DaemonOptions::register`]).
pub type RegisterPolicies = fn(&mut Registry) -> Result<(), usm_policies::PolicyError>;

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            temp_swap_dir: std::env::var_os("USM_SWAP_DIR")
                .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from),
            temp_swap_bytes: 0,
            runner: FaultRunner::from_env(),
            oom_wait: Duration::from_secs(10),
            register: None,
            peers: peer_rule_from_env(),
            limits: SessionLimits::from_env(),
        }
    }
}

/// `USM_ALLOW_UIDS`, or the default rule; a value that does not parse keeps the
/// default (the stricter rule) with a warning.
fn peer_rule_from_env() -> PeerRule {
    match std::env::var("USM_ALLOW_UIDS") {
        Ok(v) => PeerRule::parse(&v).unwrap_or_else(|e| {
            tracing::warn!("USM_ALLOW_UIDS: {e}; accepting only this user and root");
            PeerRule::same_user()
        }),
        Err(_) => PeerRule::same_user(),
    }
}

/// State shared by every daemon thread.
pub(crate) struct Shared {
    pub(crate) pool_pages: u64,
    pub(crate) low: u64,
    pub(crate) high: u64,
    pub(crate) frames_used: Arc<AtomicU64>,
    pub(crate) swap: Arc<SwapStore>,
    pub(crate) handle: usm_localmanager::Handle,
    pub(crate) workers: usize,
    /// How idle workers wait (the config's `waker`).
    pub(crate) waker: WakerMode,
    pub(crate) runner: FaultRunner,
    pub(crate) fault_threads: pool::ThreadPool,
    procs: Mutex<Vec<Arc<Proc>>>,
    ended: Mutex<Vec<ProcessStat>>,
    pub(crate) stopping: AtomicBool,
    evict_kick: (Mutex<bool>, Condvar),
    pub(crate) totals: ProcCounters,
    pub(crate) admitted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) bad_messages: AtomicU64,
    pub(crate) overcommits: AtomicU64,
    /// Faults being served now (workees alive).
    pub(crate) in_flight: AtomicU64,
    /// Process name → allocation policy name.
    assignments: HashMap<String, String>,
    /// Every policy the daemon knows, with the config's defaults and assignments: each
    /// managed process gets its own instances from here.
    pub(crate) registry: Arc<Registry>,
    /// Policy name → pages per flexible huge page.
    fhp: HashMap<String, u64>,
    /// See [`DaemonOptions::oom_wait`].
    pub(crate) oom_wait: Duration,
}

impl Shared {
    pub(crate) fn policy_for(&self, name: &str) -> Option<String> {
        self.assignments.get(name).cloned()
    }

    pub(crate) fn fhp_pages_for(&self, policy: &str) -> u64 {
        self.fhp.get(policy).copied().unwrap_or(1)
    }

    pub(crate) fn free_frames(&self) -> u64 {
        self.pool_pages
            .saturating_sub(self.frames_used.load(Ordering::Acquire))
    }

    pub(crate) fn kick_evictor(&self) {
        if let Ok(mut k) = self.evict_kick.0.lock() {
            *k = true;
        }
        self.evict_kick.1.notify_one();
    }

    pub(crate) fn wait_evict_kick(&self, timeout: Duration) {
        if let Ok(k) = self.evict_kick.0.lock() {
            if let Ok((mut k, _)) = self.evict_kick.1.wait_timeout_while(k, timeout, |k| !*k) {
                *k = false;
            }
        }
    }

    pub(crate) fn add_proc(&self, p: Arc<Proc>) {
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    pub(crate) fn remove_proc(&self, p: &Arc<Proc>) {
        let stat = p.stat();
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|q| !Arc::ptr_eq(q, p));
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.push(stat);
        // Keep the last few hundred for `usm stat` and the exec summary.
        if ended.len() > 512 {
            ended.remove(0);
        }
    }

    pub(crate) fn procs(&self) -> Vec<Arc<Proc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The managed process with the most charged frames that has an agent.
    pub(crate) fn largest_evictable(&self) -> Option<Arc<Proc>> {
        self.procs()
            .into_iter()
            .filter(|p| !p.gone.load(Ordering::Acquire) && p.has_agent())
            .map(|p| {
                let charged = p.lock_map().charged;
                (charged, p)
            })
            .filter(|(c, _)| *c > 0)
            .max_by_key(|(c, _)| *c)
            .map(|(_, p)| p)
    }

    pub(crate) fn stat(&self) -> DaemonStat {
        let procs = self.procs();
        DaemonStat {
            pid: std::process::id(),
            pool_pages: self.pool_pages,
            frames_used: self.frames_used.load(Ordering::Acquire),
            slots_used: self.swap.used(),
            slots_total: self.swap.total(),
            workers: self.workers,
            waker: self.waker.as_str().to_owned(),
            fault_runner: self.runner.as_str().to_owned(),
            admitted: self.admitted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bad_messages: self.bad_messages.load(Ordering::Relaxed),
            overcommits: self.overcommits.load(Ordering::Relaxed),
            faults_in_flight: self.in_flight.load(Ordering::Relaxed),
            latency: self.totals.latency(),
            processes: procs.iter().map(|p| p.stat()).collect(),
            ended: self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// A running daemon. Dropping it without [`Daemon::shutdown`] still shuts it down.
pub struct Daemon {
    shared: Arc<Shared>,
    runtime: Option<usm_localmanager::Runtime>,
    threads: Vec<JoinHandle<()>>,
    socket: PathBuf,
    /// The socket files this daemon bound (removed at shutdown if still theirs).
    socket_files: Vec<sockfile::SocketFile>,
    stop_accept: Arc<AtomicBool>,
    stop_aux: Arc<AtomicBool>,
    metrics_addr: Option<std::net::SocketAddr>,
}

/// What shutdown gave back.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShutdownSummary {
    /// Processes released.
    pub processes: usize,
    /// Pages copied back into programs.
    pub pages_returned: u64,
    /// Pages that could not be read back (poisoned: SIGBUS there, never zeros).
    pub pages_lost: u64,
}

/// Process name → policy spec, policy spec → pages per flexible huge page, and the
/// registry holding the config's defaults and assignments.
type Assignments = (HashMap<String, String>, HashMap<String, u64>, Registry);

/// A bare `fhp` names the config's `fhp SIZE` (the registry wants `fhp:SIZE`).
fn with_fhp_size(spec: &str, fhp_bytes: Option<u64>) -> String {
    match (spec.trim(), fhp_bytes) {
        ("fhp", Some(b)) => format!("fhp:{}K", b / 1024),
        (s, _) => s.to_owned(),
    }
}

/// Builds the daemon's registry from the config (built-ins, then `register`, then the
/// config's `policy`, `evict`, `oom` defaults — the first `policy` line wins — and its
/// `process` assignments), each error naming its line.
fn assignments(
    cfg: &Config,
    register: Option<RegisterPolicies>,
) -> Result<Assignments, DaemonError> {
    let mut reg = Registry::with_builtins();
    if let Some(register) = register {
        register(&mut reg).map_err(|source| DaemonError::Policy { line: 0, source })?;
    }
    for p in cfg.policies.iter().rev() {
        reg.set_default(&with_fhp_size(&p.value, cfg.fhp_bytes))
            .map_err(|source| DaemonError::Policy {
                line: p.line,
                source,
            })?;
    }
    for d in [&cfg.evict, &cfg.oom].into_iter().flatten() {
        reg.set_default(&d.value)
            .map_err(|source| DaemonError::Policy {
                line: d.line,
                source,
            })?;
    }
    let mut out = HashMap::new();
    let mut fhp = HashMap::new();
    for r in &cfg.processes {
        let spec = with_fhp_size(&r.policy.value, cfg.fhp_bytes);
        reg.assign_process(&r.name, &spec)
            .map_err(|source| DaemonError::Policy {
                line: r.policy.line,
                source,
            })?;
        let pages = fhp_pages(&reg, &spec, cfg.fhp_bytes);
        fhp.insert(spec.clone(), pages);
        out.insert(r.name.clone(), spec);
    }
    Ok((out, fhp, reg))
}

/// Checks a config as [`Daemon::start`] will: policy names against the registry, each
/// error naming its line.
pub fn validate(cfg: &Config) -> Result<(), DaemonError> {
    assignments(cfg, None).map(|_| ())
}

/// Pages per flexible huge page for an allocation policy spec (`fhp:64K`, `fhp`).
fn fhp_pages(reg: &Registry, spec: &str, default_bytes: Option<u64>) -> u64 {
    let Ok(policy) = reg.build_alloc(spec) else {
        return 1;
    };
    let name = policy.name().to_owned();
    let Some(size) = name.strip_prefix("fhp:") else {
        return if name == "fhp" {
            default_bytes.map_or(16, |b| (b / 4096).max(1))
        } else {
            1
        };
    };
    crate::config::parse_size(size, "fhp").map_or(1, |b| (b / 4096).clamp(1, 512))
}

impl Daemon {
    /// Starts a daemon: workers, swap, socket, evictor, stat socket, metrics.
    pub fn start(cfg: &Config, opts: &DaemonOptions) -> Result<Daemon, DaemonError> {
        let (assignments, fhp, registry) = assignments(cfg, opts.register)?;
        let workers = cfg.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4)
        });
        let (lm_waker, hold_pm_qos) = match cfg.waker {
            WakerMode::Eventfd => (usm_localmanager::WakerMode::EventFd, false),
            WakerMode::EventfdPmQos => (usm_localmanager::WakerMode::EventFd, true),
            WakerMode::Spin => (usm_localmanager::WakerMode::BusyPoll, false),
        };
        let runtime = usm_localmanager::Runtime::builder()
            .workers(workers)
            .pin(false)
            .waker(lm_waker)
            .hold_cpu_dma_latency(hold_pm_qos)
            .build()?;
        let pool = cfg.memory_pages;
        let temp_bytes = if opts.temp_swap_bytes > 0 {
            opts.temp_swap_bytes
        } else {
            (pool * 4096 * 8).max(256 << 20)
        };
        let swap = SwapStore::open(&cfg.swap, &opts.temp_swap_dir, temp_bytes)?;
        let socket = cfg.socket.clone();
        let stat_socket = stat_socket_path(&socket);
        // Both paths are checked before either is bound: a bad `PATH.stat` must not
        // leave `PATH` bound behind a failed start.
        sockfile::clear_stale(&socket, |p| usm_proto::Channel::connect(p).is_ok())?;
        sockfile::clear_stale(&stat_socket, |p| {
            std::os::unix::net::UnixStream::connect(p).is_ok()
        })?;
        let (listener, socket_file) = bind(&socket, opts.peers.socket_mode())?;
        let (stat_listener, stat_file) = match control::bind(&stat_socket) {
            Ok(l) => l,
            Err(e) => {
                socket_file.remove();
                return Err(e);
            }
        };
        let socket_files = vec![socket_file, stat_file];
        let low = cfg.watermarks.0.pages(pool).max(1);
        let high = cfg.watermarks.1.pages(pool).max(low + 1).min(pool);
        let shared = Arc::new(Shared {
            pool_pages: pool,
            low,
            high,
            frames_used: Arc::new(AtomicU64::new(0)),
            swap,
            handle: runtime.handle(),
            workers,
            waker: cfg.waker,
            runner: opts.runner,
            fault_threads: pool::ThreadPool::new((workers * 4).max(8)).map_err(|e| {
                DaemonError::Setup {
                    what: "start the fault threads".into(),
                    source: e,
                }
            })?,
            procs: Mutex::new(Vec::new()),
            ended: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            evict_kick: (Mutex::new(false), Condvar::new()),
            totals: ProcCounters::default(),
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bad_messages: AtomicU64::new(0),
            overcommits: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            assignments,
            fhp,
            registry: Arc::new(registry),
            oom_wait: opts.oom_wait,
        });
        let stop_accept = Arc::new(AtomicBool::new(false));
        let stop_aux = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| DaemonError::Setup {
                    what: format!("spawn {name}"),
                    source: e,
                })
        };
        let (sh, stop) = (shared.clone(), stop_accept.clone());
        let gate = Gate {
            peers: opts.peers.clone(),
            sessions: sessions::Sessions::new(opts.limits),
            daemon_uid: nix::unistd::geteuid().as_raw(),
        };
        threads.push(spawn(
            "usm-accept",
            Box::new(move || accept_loop(&sh, &listener, &stop, &gate)),
        )?);
        let sh = shared.clone();
        threads.push(spawn("usm-evict", Box::new(move || evict::run(&sh)))?);
        let (sh, stop) = (shared.clone(), stop_aux.clone());
        threads.push(spawn(
            "usm-stat",
            Box::new(move || control::serve(&sh, &stat_listener, &stop)),
        )?);
        let mut metrics_addr = None;
        if let Some(addr) = cfg.metrics {
            let l = std::net::TcpListener::bind(addr).map_err(|e| DaemonError::Setup {
                what: format!("metrics listener on {addr}"),
                source: e,
            })?;
            metrics_addr = l.local_addr().ok();
            let (sh, stop) = (shared.clone(), stop_aux.clone());
            threads.push(spawn(
                "usm-metrics",
                Box::new(move || metrics::serve(&sh, &l, &stop)),
            )?);
        }
        tracing::info!(
            "usm daemon: pool {pool} pages, {workers} workers (waker {}, faults on {}), socket {}",
            cfg.waker.as_str(),
            opts.runner.as_str(),
            socket.display()
        );
        Ok(Daemon {
            shared,
            runtime: Some(runtime),
            threads,
            socket,
            socket_files,
            stop_accept,
            stop_aux,
            metrics_addr,
        })
    }

    /// The taggers' socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The metrics address actually bound (port 0 in the config picks one).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// A snapshot of every counter (what `usm stat` prints).
    pub fn stat(&self) -> DaemonStat {
        self.shared.stat()
    }

    /// Graceful shutdown (steps in the module docs).
    pub fn shutdown(mut self) -> ShutdownSummary {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> ShutdownSummary {
        let mut summary = ShutdownSummary::default();
        if self.runtime.is_none() {
            return summary;
        }
        let sh = self.shared.clone();
        // 1-2.
        sh.stopping.store(true, Ordering::Release);
        self.stop_accept.store(true, Ordering::Release);
        sh.kick_evictor();
        // Join accept + evictor (the first two threads).
        let rest = self.threads.split_off(2.min(self.threads.len()));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.threads = rest;
        // 3.
        for p in sh.procs() {
            let (ok, bad) = process::give_back(&sh, &p);
            summary.pages_returned += ok;
            summary.pages_lost += bad;
            summary.processes += 1;
            p.tell_swapped(true);
            if let Some(ch) = &p.channel {
                let _ = ch.send(&usm_proto::Message::Bye);
            }
            p.stop.store(true, Ordering::Release);
        }
        for p in sh.procs() {
            let handles: Vec<_> = p
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            for h in handles {
                let _ = h.join();
            }
        }
        // 4.
        self.stop_aux.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        sh.fault_threads.shutdown();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown(Duration::from_secs(2));
        }
        sh.swap.shutdown();
        for f in self.socket_files.drain(..) {
            f.remove();
        }
        tracing::info!(
            "usm daemon stopped: {} process(es) released, {} page(s) returned, {} lost",
            summary.processes,
            summary.pages_returned,
            summary.pages_lost
        );
        summary
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// Binds the taggers' socket (its path checked by [`sockfile::clear_stale`] already),
/// creating its directory (mode `0755`) if missing, with the socket file's mode set to
/// `mode` before it listens.
fn bind(path: &Path, mode: u32) -> Result<(Listener, sockfile::SocketFile), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| DaemonError::Setup {
                    what: format!("create {}", dir.display()),
                    source: e,
                })?;
        }
    }
    let listener = Listener::bind_mode(path, mode).map_err(|source| DaemonError::Socket {
        path: path.into(),
        source,
    })?;
    let file = sockfile::SocketFile::record(path)?;
    Ok((listener, file))
}

/// What the accept loop checks before it spends a thread on a connection.
struct Gate {
    peers: PeerRule,
    sessions: Arc<sessions::Sessions>,
    daemon_uid: u32,
}

/// Tells a peer why it is turned away, without waiting (the accept loop never blocks
/// on a peer), and counts it.
fn turn_away(sh: &Shared, ch: &usm_proto::Channel, reason: usm_proto::RefusalReason, text: &str) {
    bump_refused(sh);
    let _ = ch.send_nowait(&usm_proto::Message::Refused {
        reason,
        text: text.to_owned(),
    });
}

fn bump_refused(sh: &Shared) {
    sh.refused.fetch_add(1, Ordering::Relaxed);
}

fn accept_loop(sh: &Arc<Shared>, listener: &Listener, stop: &AtomicBool, gate: &Gate) {
    use usm_proto::RefusalReason;
    let _ = listener.set_accept_timeout(Some(Duration::from_millis(200)));
    while !stop.load(Ordering::Acquire) {
        let ch = match listener.accept_channel() {
            Ok(ch) => ch,
            Err(usm_proto::ProtoError::Timeout { .. }) => continue,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Credentials first: the kernel's, no byte from the peer needed.
        let cred = match ch.peer_credentials() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("refused a tagger: {e}");
                bump_refused(sh);
                continue;
            }
        };
        if !gate.peers.allows(cred.uid, gate.daemon_uid) {
            tracing::warn!(
                "refused pid {} of uid {}: this daemon (uid {}) does not accept that user",
                cred.pid,
                cred.uid,
                gate.daemon_uid
            );
            let text = format!(
                "uid {} may not attach to this daemon (uid {})",
                cred.uid, gate.daemon_uid
            );
            turn_away(sh, &ch, RefusalReason::Credentials, &text);
            continue;
        }
        let (session, slot) = match sessions::open(&gate.sessions, cred.uid, cred.pid) {
            Ok(s) => s,
            Err(limit) => {
                tracing::warn!("refused pid {} of uid {}: {limit}", cred.pid, cred.uid);
                turn_away(sh, &ch, RefusalReason::Busy, &limit.to_string());
                continue;
            }
        };
        // Admission reads the Hello with a timeout: do it off the accept loop so a
        // silent peer cannot hold others up. The slot bounds these threads.
        let sh2 = sh.clone();
        let peers = gate.peers.clone();
        let spawned = std::thread::Builder::new()
            .name("usm-admit".into())
            .spawn(move || {
                let _slot = slot;
                match server::admit_with(ch, &peers) {
                    Ok(peer) => process::admit(&sh2, peer, session),
                    Err(e) => process::log_refused(&sh2, &e),
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start admission: {e}");
        }
    }
}
