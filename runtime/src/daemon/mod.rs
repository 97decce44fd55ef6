//! InstanceUSM, the daemon: manages the anonymous memory of unmodified programs tagged
//! with `libusm_tagger.so` (`usm run CONFIG`, or privately under `usm exec`).
//!
//! The daemon is a host for the one memory manager ([`usm_mm`]) the embedded runtime
//! runs on too: each tagged process (and each fork child) is a *space* of that core,
//! whose pages a [`RemoteInstaller`](crate::sys::remote) moves in (`UFFDIO_COPY` into
//! the program) and out (through the tagger's agent, [`agent`]); the frame pool is the
//! budget (`memory` pages, lazy: nothing is populated until used); swap is the core's
//! io_uring engine on every worker. What the daemon adds is *where faults come from*
//! (a reader per userfaultfd) and the sessions with the taggers.
//!
//! # Pieces
//! | piece | thread(s) | module |
//! |---|---|---|
//! | accept loop: `SO_PEERCRED` against the [`PeerRule`], session limits, then (one bounded admission thread per connection) Hello, policy by name, `UFFDIO_API`, Ack/Refused | `usm-accept`, `usm-admit` | [`sessions`], [`process`] (`admit`) |
//! | one reader per userfaultfd (fork children get their own): events → the space; faults served right there on a worker part of its own (own io_uring engine and worker index), or → jobs when no index is free | `usm-rd-PID` | [`process`], [`driver`] (`FaultServer`) |
//! | finished agent stages (their write-backs), policy notices, shutdown's give-back, faults of readers without a server: the memory manager on every worker | LocalManager workers | [`driver`], `usm_mm` |
//! | eviction through the tagger's agent (submitted by the evicting worker, answers taken by the process's agent thread) | workers, `usm-ag-PID` | [`agent`] |
//! | `usm stat` socket (`SOCKET.stat`, JSON lines) | `usm-stat` | [`control`] |
//! | Prometheus exposition (`metrics ADDR`) | `usm-metrics` | [`metrics`] |
//!
//! # Memory accounting
//! The pool is a budget of `memory` frames: a frame is Mapped while its page is in the
//! program (installed by `UFFDIO_COPY`, the daemon's copy dropped in batches), Staging
//! while the page is out and being written to swap. Below the low watermark the core
//! evicts up to the high one, in batches, from the worker that noticed; a fault that finds
//! no frame waits for write-backs in flight (woken by their completion), never in a timed
//! poll. Swap slots are reference-counted: a fork child shares its parent's.
//!
//! # Shutdown (SIGINT/SIGTERM on `usm run`, end of `usm exec`), numbered
//! 1. Stop admitting (new taggers get `Refused(Busy)`), stop the accept loop.
//! 2. Turn eviction off (no page leaves a program any more).
//! 3. For each managed process: bring every page that is out back into it through the
//!    fault path (a fault that finds no frame lets a resident page go: it stays in the
//!    program, unmanaged from now on), tell the
//!    tagger `SwapState 0`, send `Bye`, stop its reader; closing the daemon's userfaultfd
//!    lets the kernel unregister its ranges, and the program continues unmanaged with all
//!    its data.
//! 4. Stop the workers, delete a private swap file and the sockets.
//!    Only the socket files this daemon created are deleted, and only if they are
//!    still the inodes it bound (see [`sockfile`]). Stat and metrics clients are never
//!    waited for: each is served on a thread of its own with deadlines ([`control`],
//!    [`metrics`]).
//!
//! # Who may connect
//! The taggers' socket file gets mode `0600` (`0666` when the [`PeerRule`] admits
//! other users: then the rule filters), set explicitly; the stat socket `0600`. Every
//! connection's `SO_PEERCRED` is checked against the rule before anything is read from
//! it; admitted sessions are counted per uid and per process ([`SessionLimits`]). A
//! private daemon (`usm exec`) lives in a fresh `0700` directory
//! ([`private_socket_dir`]) and accepts only its own user and root.

pub(crate) mod agent;
mod control;
mod driver;
mod leftovers;
#[cfg(feature = "metrics")]
pub mod metrics;

/// The `usm` version with the commit it was built from (`0.1.0 (abc123def456)`), as
/// `usm --version`, `usm stat` and `build_info` show it.
pub fn version() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("USM_GIT_COMMIT"), ")")
}

/// The commit `usm` was built from (`unknown` when built outside a git checkout).
pub fn commit() -> &'static str {
    env!("USM_GIT_COMMIT")
}

mod process;
mod sessions;
mod sockfile;
pub mod stats;
#[allow(unsafe_code)] // probing a program's address space, pidfd_open
mod sys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;
use usm_sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use usm_sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_kmod::pool::{FramePool, LockMode, PoolConfig};
use usm_kmod::{Features, OpenFlags, RawUserfaultfd};
use usm_mm::{MmConfig, MmCore, WorkerMm};
use usm_policies::{Registry, RunMode, Watermarks};
use usm_proto::server::{self, Listener};
use usm_swap::{DeviceId, SwapDevice};

use crate::config::{Config, WakerMode};
pub use control::{query_stat, stat_socket_path};
pub use leftovers::{PRIVATE_SOCKET_NAME, daemon_sockets, private_socket_dir};
pub use sessions::SessionLimits;
pub use stats::{DaemonStat, Latency, LatencyBuckets, ProcessStat, SwapInfo, Totals};
pub use usm_proto::server::PeerRule;

use driver::{DaemonDriver, Jobs};
use process::Proc;
use stats::ProcCounters;

/// Everything that can stop the daemon from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A config value the daemon cannot use (the line is the config's).
    #[error("{}{why}", at_line(*line))]
    Config {
        /// Line in the config file (0: not from a line of a file, e.g. a `usm exec` flag).
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A policy name the registry does not know.
    #[error("{}{source}", at_line(*line))]
    Policy {
        /// Line in the config file (0: not from a line of a file: a `usm exec` flag, or
        /// the embedder's own policies).
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
    /// The memory manager (pool, policies, swap engine).
    #[error("memory manager: {0}")]
    Mm(usm_mm::MmError),
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

/// `config line N: `, or nothing for a value that came from no line of a file.
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!("config line {line}: ")
    }
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
            register: None,
            peers: peer_rule_from_env(),
            limits: SessionLimits::from_env(),
        }
    }
}

/// The private swap file's size when none is asked for: 64 times the pool, at least 4 GiB
/// — it is sparse, so its size costs nothing until pages are written (a program whose data
/// is many times its pool must not find swap full, as kernel swap sized by an administrator
/// would not be) — but never more than half the free space of `dir`'s file system, and
/// never less than 8 times the pool.
fn default_swap_bytes(pool_bytes: u64, dir: &Path) -> u64 {
    let want = (pool_bytes * 64).max(4 << 30);
    let room = nix::sys::statvfs::statvfs(dir)
        .map(|v| v.blocks_available() * v.fragment_size() / 2)
        .unwrap_or(want);
    want.min(room).max((pool_bytes * 8).max(256 << 20))
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
    /// The memory manager: every managed process is a space of it.
    pub(crate) core: Arc<MmCore>,
    /// Faults and policy notifications for the workers.
    pub(crate) jobs: Arc<Jobs>,
    pub(crate) workers: usize,
    /// How idle workers wait (the config's `waker`).
    pub(crate) waker: WakerMode,
    procs: Mutex<Vec<Arc<Proc>>>,
    ended: Mutex<Vec<ProcessStat>>,
    pub(crate) stopping: AtomicBool,
    pub(crate) admitted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) bad_messages: AtomicU64,
    /// Process name → allocation policy spec.
    assignments: HashMap<String, String>,
    /// Space numbers for fork children (above any pid).
    next_child: AtomicU32,
    /// Latency of every fault served.
    pub(crate) totals: ProcCounters,
    /// Counters of the processes that ended (all of them, not only the last `ended`).
    ended_totals: Mutex<Totals>,
    /// What `usm stat` says about the daemon itself (socket, swap, policies in force).
    about: About,
}

/// The daemon's fixed facts, for every snapshot.
struct About {
    socket: PathBuf,
    swap: Vec<SwapInfo>,
    alloc_policy: String,
    evict_policy: String,
    oom_policy: String,
}

impl Shared {
    pub(crate) fn policy_for(&self, name: &str) -> Option<String> {
        self.assignments.get(name).cloned()
    }

    /// A space number for a fork child (pids are below 2^22).
    pub(crate) fn next_child_space(&self) -> u32 {
        self.next_child.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn add_proc(&self, p: Arc<Proc>) {
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    pub(crate) fn remove_proc(&self, p: &Arc<Proc>, stat: ProcessStat) {
        self.totals.absorb(&p.counters);
        {
            let mut t = self.ended_totals.lock().unwrap_or_else(|e| e.into_inner());
            t.add(&stat);
            t.processes_ended += 1;
        }
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

    /// The space made from a `FORK` event for process `pid` (learned from its first
    /// fault), if no session has taken it yet, it runs as `uid`, and its address space
    /// is alive (after an `exec` the pid stays but the space is another's).
    pub(crate) fn unadopted_child(&self, pid: u32, uid: u32) -> Option<Arc<Proc>> {
        self.procs().into_iter().find(|p| {
            p.parent.is_some()
                && p.pid() == pid
                && p.uid == uid
                && p.channel().is_none()
                && !p.is_gone()
                && sys::mm_alive(p.installer.uffd())
        })
    }

    pub(crate) fn procs(&self) -> Vec<Arc<Proc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The fault-latency hdrhistograms: the daemon's (ended processes included) and each
    /// live process's (for the Prometheus histograms).
    #[cfg(feature = "metrics")]
    pub(crate) fn latency_sources(&self) -> metrics::LatencySources {
        let procs = self.procs();
        let mut daemon = self.totals.latency_histogram();
        for p in &procs {
            p.counters.merge_latency_into(&mut daemon);
        }
        metrics::LatencySources {
            daemon,
            processes: procs
                .iter()
                .map(|p| (p.pid(), p.name.clone(), p.counters.latency_histogram()))
                .collect(),
        }
    }

    pub(crate) fn stat(&self) -> DaemonStat {
        let procs = self.procs();
        let census = self.core.pool().census();
        let processes: Vec<ProcessStat> = procs.iter().map(|p| p.stat(&self.core)).collect();
        let mut totals = self.totals.latency_histogram();
        for p in &procs {
            p.counters.merge_latency_into(&mut totals);
        }
        let mut sums = *self.ended_totals.lock().unwrap_or_else(|e| e.into_inner());
        for p in &processes {
            sums.add(p);
        }
        let a = &self.about;
        DaemonStat {
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            pid: std::process::id(),
            version: version().to_owned(),
            socket: a.socket.display().to_string(),
            swap: a.swap.clone(),
            alloc_policy: a.alloc_policy.clone(),
            evict_policy: a.evict_policy.clone(),
            oom_policy: a.oom_policy.clone(),
            pool_pages: self.pool_pages,
            frames_used: (census.taken + census.mapped + census.staging) as u64,
            slots_used: self.core.swap_slots_used(),
            slots_total: self.core.swap_slots_total(),
            workers: self.workers,
            waker: self.waker.as_str().to_owned(),
            fault_runner: "workers".to_owned(),
            admitted: self.admitted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bad_messages: self.bad_messages.load(Ordering::Relaxed),
            overcommits: 0,
            faults_in_flight: self.core.io_in_flight() as u64,
            prefetches: self.core.stats_snapshot().prefetches,
            latency: stats::latency_of(totals.as_ref()),
            latency_buckets: totals
                .as_ref()
                .map(stats::LatencyBuckets::of)
                .unwrap_or_default(),
            totals: sums,
            processes,
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
    /// A private swap file to delete at shutdown.
    temp_swap: Option<PathBuf>,
    _zeroer: Option<usm_kmod::pool::ZeroerHandle>,
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

/// Process name → policy spec, and the registry holding the config's defaults and
/// assignments.
type Assignments = (HashMap<String, String>, Registry);

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
    for r in &cfg.processes {
        let spec = with_fhp_size(&r.policy.value, cfg.fhp_bytes);
        reg.assign_process(&r.name, &spec)
            .map_err(|source| DaemonError::Policy {
                line: r.policy.line,
                source,
            })?;
        // The spec a process gets is the registry's answer (an alias resolves here).
        reg.build_alloc(&spec)
            .map_err(|source| DaemonError::Policy {
                line: r.policy.line,
                source,
            })?;
        out.insert(r.name.clone(), spec);
    }
    Ok((out, reg))
}

/// Checks a config as [`Daemon::start`] will: policy names against the registry, each
/// error naming its line.
pub fn validate(cfg: &Config) -> Result<(), DaemonError> {
    validate_with(cfg, None)
}

/// [`validate`] with the extra policies `register` adds (as [`DaemonOptions::register`]).
pub fn validate_with(cfg: &Config, register: Option<RegisterPolicies>) -> Result<(), DaemonError> {
    assignments(cfg, register).map(|_| ())
}

/// Swap devices, their priorities, and the private swap file to delete at the end.
type SwapSetup = (Vec<Arc<SwapDevice>>, Vec<i32>, Option<PathBuf>);

/// Opens the swap devices the config names, or creates a private swap file.
fn open_swap(cfg: &Config, opts: &DaemonOptions, pool: u64) -> Result<SwapSetup, DaemonError> {
    if cfg.swap.is_empty() {
        let dir = &opts.temp_swap_dir;
        std::fs::create_dir_all(dir).map_err(|e| DaemonError::Setup {
            what: format!("create {}", dir.display()),
            source: e,
        })?;
        let bytes = if opts.temp_swap_bytes > 0 {
            opts.temp_swap_bytes
        } else {
            default_swap_bytes(pool * 4096, dir)
        };
        // A killed daemon's private swap file (owner pid dead) goes first.
        leftovers::sweep_swap_files(dir);
        let path = leftovers::swap_file_path(dir);
        // Sparse: nothing written at start, blocks allocated as slots are first written
        // (a full file system then fails a write-back with ENOSPC: the page stays in
        // memory, as with a full device).
        usm_swap::create_sparse_swap_file(&path, bytes.max(16 << 20))?;
        let dev = SwapDevice::open(DeviceId(0), &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
        return Ok((vec![Arc::new(dev)], vec![0], Some(path)));
    }
    let mut devices = Vec::new();
    let mut priorities = Vec::new();
    for (i, spec) in cfg.swap.iter().enumerate() {
        let id = u8::try_from(i).map_err(|_| DaemonError::Config {
            line: spec.line,
            why: "too many swap devices".into(),
        })?;
        devices.push(Arc::new(SwapDevice::open(DeviceId(id), &spec.path)?));
        priorities.push(spec.priority);
    }
    Ok((devices, priorities, None))
}

fn setup_err(what: &str) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |e| DaemonError::Setup {
        what: what.into(),
        source: e,
    }
}

impl Daemon {
    /// Starts a daemon: its memory manager, workers, swap, socket, stat socket, metrics.
    pub fn start(cfg: &Config, opts: &DaemonOptions) -> Result<Daemon, DaemonError> {
        #[cfg(not(feature = "metrics"))]
        if let Some(addr) = cfg.metrics {
            return Err(DaemonError::Config {
                line: 0, // the config keeps no line for it
                why: format!(
                    "metrics {addr}: this build has no metrics endpoint (usm-runtime's \
                     `metrics` feature is off)"
                ),
            });
        }
        let (assignments, registry) = assignments(cfg, opts.register)?;
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
        let pool_pages = cfg.memory_pages;
        // The budget: a lazy pool in our own address space (nothing populated until a
        // frame holds a page on its way in or out), on a userfaultfd of our own that only
        // refills its holes.
        let raw = RawUserfaultfd::open(OpenFlags {
            nonblock: true,
            cloexec: true,
            user_mode_only: true,
        })
        .map_err(|e| DaemonError::Mm(e.into()))?;
        let own = Arc::new(
            raw.negotiate(Features::empty(), Features::MOVE)
                .map_err(|e| DaemonError::Mm(e.into()))?,
        );
        let frames = usize::try_from(pool_pages).unwrap_or(usize::MAX);
        let pool = FramePool::new_lazy(
            PoolConfig {
                frames,
                lock: LockMode::Unlocked,
            },
            own,
        )
        .map_err(|e| DaemonError::Mm(e.into()))?;
        let (devices, priorities, temp_swap) = open_swap(cfg, opts, pool_pages)?;
        let low = cfg.watermarks.0.pages(pool_pages).max(1);
        let high = cfg
            .watermarks
            .1
            .pages(pool_pages)
            .max(low + 1)
            .min(pool_pages);
        let mut config = MmConfig::for_pool(frames);
        config.watermarks = Watermarks {
            low: low as usize,
            high: high as usize,
        };
        config.mode = RunMode::Daemon;
        config.clean_eviction = false;
        config.priorities = priorities;
        if let Some(e) = &cfg.evict {
            config.evict = e.value.clone();
        } else if let Some(d) = registry.default_spec(usm_policies::PolicyKind::Evict) {
            config.evict = d.to_owned();
        }
        if let Some(o) = &cfg.oom {
            config.oom = o.value.clone();
        } else if let Some(d) = registry.default_spec(usm_policies::PolicyKind::Oom) {
            config.oom = d.to_owned();
        }
        let temp_guard = TempSwap(temp_swap.clone());
        let swap_info = devices
            .iter()
            .map(|d| SwapInfo {
                path: d.path().display().to_string(),
                bytes: (d.slots() + 1) * 4096,
                private: temp_swap.as_deref() == Some(d.path()),
            })
            .collect();
        let alloc_policy = registry
            .default_spec(usm_policies::PolicyKind::Alloc)
            .unwrap_or("first-fit")
            .to_owned();
        let (evict_policy, oom_policy) = (config.evict.clone(), config.oom.clone());
        let core = MmCore::new(
            pool.clone(),
            Box::new(NoInstaller),
            Arc::new(registry),
            devices,
            config,
            workers,
        )
        .map_err(DaemonError::Mm)?;
        let jobs = Arc::new(Jobs::new().map_err(setup_err("the job queue's eventfd"))?);
        let efd =
            || EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC);
        let mut worker_fds = Vec::new();
        let mut woken = Vec::new();
        for i in 0..workers {
            let fd = Arc::new(efd().map_err(|e| DaemonError::Setup {
                what: "a worker's eventfd".into(),
                source: e.into(),
            })?);
            let flag = Arc::new(AtomicBool::new(false));
            let (f2, w2) = (fd.clone(), flag.clone());
            core.set_waker(
                i,
                Arc::new(move || {
                    // Write first, then flag: the driver reads the fd after taking the flag.
                    let _ = f2.write(1);
                    w2.store(true, Ordering::Release);
                }),
            )
            .map_err(DaemonError::Mm)?;
            worker_fds.push(fd);
            woken.push(flag);
        }
        let (fcore, fjobs) = (core.clone(), jobs.clone());
        let factory: usm_localmanager::DriverFactory =
            Arc::new(move |worker| match WorkerMm::new(fcore.clone(), worker) {
                Ok(wm) => Box::new(DaemonDriver::new(
                    wm,
                    fjobs.clone(),
                    worker_fds[worker].clone(),
                    woken[worker].clone(),
                )) as Box<dyn usm_localmanager::Driver>,
                Err(e) => {
                    tracing::error!(error = %e, worker, "worker memory manager failed to start");
                    Box::new(NoDriver)
                }
            });
        let runtime = usm_localmanager::Runtime::builder()
            .workers(workers)
            .pin(false)
            .waker(lm_waker)
            .hold_cpu_dma_latency(hold_pm_qos)
            .driver(factory)
            .build()?;
        let zeroer = pool.spawn_zeroer(64);
        let socket = cfg.socket.clone();
        let stat_socket = stat_socket_path(&socket);
        // Both paths are checked before either is bound: a bad `PATH.stat` must not
        // leave `PATH` bound behind a failed start.
        sockfile::clear_stale(&socket, |p| usm_proto::Channel::connect(p).is_ok())?;
        sockfile::clear_stale(&stat_socket, |p| {
            std::os::unix::net::UnixStream::connect(p).is_ok()
        })?;
        // The config's `allow` line, else the options' rule (`USM_ALLOW_UIDS`, or only
        // this user and root).
        let peers = match &cfg.allow {
            Some(list) => PeerRule::parse(list).map_err(|why| DaemonError::Config {
                line: 0,
                why: format!("allow {list}: {why}"),
            })?,
            None => opts.peers.clone(),
        };
        let (listener, socket_file) = bind(&socket, peers.socket_mode())?;
        let (stat_listener, stat_file) = match control::bind(&stat_socket) {
            Ok(l) => l,
            Err(e) => {
                socket_file.remove();
                return Err(e);
            }
        };
        let socket_files = vec![socket_file, stat_file];
        let shared = Arc::new(Shared {
            pool_pages,
            core,
            jobs,
            workers,
            waker: cfg.waker,
            procs: Mutex::new(Vec::new()),
            ended: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bad_messages: AtomicU64::new(0),
            assignments,
            next_child: AtomicU32::new(1 << 24),
            totals: ProcCounters::default(),
            ended_totals: Mutex::new(Totals::default()),
            about: About {
                socket: socket.clone(),
                swap: swap_info,
                alloc_policy,
                evict_policy,
                oom_policy,
            },
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
            peers,
            sessions: sessions::Sessions::new(opts.limits),
            daemon_uid: nix::unistd::geteuid().as_raw(),
        };
        threads.push(spawn(
            "usm-accept",
            Box::new(move || accept_loop(&sh, &listener, &stop, &gate)),
        )?);
        let (sh, stop) = (shared.clone(), stop_aux.clone());
        threads.push(spawn(
            "usm-stat",
            Box::new(move || control::serve(&sh, &stat_listener, &stop)),
        )?);
        #[cfg_attr(not(feature = "metrics"), allow(unused_mut))]
        let mut metrics_addr = None;
        #[cfg(feature = "metrics")]
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
            "usm daemon: pool {pool_pages} pages (watermarks {low}/{high}), {workers} workers (waker {}), socket {}",
            cfg.waker.as_str(),
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
            temp_swap: temp_guard.keep(),
            _zeroer: Some(zeroer),
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
        sh.core.set_eviction(false);
        // Join the accept loop (the first thread).
        let rest = self.threads.split_off(1.min(self.threads.len()));
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
            process::tell_away(&sh, &p, true);
            if let Some(ch) = p.channel() {
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
        if let Some(rt) = self.runtime.take() {
            rt.shutdown(Duration::from_secs(2));
        }
        if let Some(path) = self.temp_swap.take() {
            let _ = std::fs::remove_file(path);
        }
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

/// Deletes a private swap file if start-up fails after creating it.
struct TempSwap(Option<PathBuf>);

impl TempSwap {
    fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for TempSwap {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The core's default installer: the daemon has none (every space brings its own).
struct NoInstaller;

impl usm_mm::Installer for NoInstaller {
    fn install(
        &self,
        _: &FramePool,
        _: &[usm_kmod::FrameNo],
        _: u64,
        _: usm_kmod::pool::FrameOwner,
    ) -> Result<usm_mm::InstallReport, usm_mm::MmError> {
        Err(usm_mm::MmError::Protocol {
            frame: usm_kmod::FrameNo(u32::MAX),
            what: "a daemon space without its installer",
        })
    }
    fn stage(&self, _: &FramePool, _: usm_kmod::FrameNo) -> Result<bool, usm_mm::MmError> {
        Ok(false)
    }
    fn unstage(&self, _: &FramePool, _: usm_kmod::FrameNo) -> Result<bool, usm_mm::MmError> {
        Ok(false)
    }
    fn poison(&self, _: &FramePool, _: u64) -> Result<(), usm_mm::MmError> {
        Ok(())
    }
    fn reclaim(&self, pool: &FramePool, frame: usm_kmod::FrameNo) -> Result<bool, usm_mm::MmError> {
        pool.release(frame)?;
        Ok(true)
    }
}

struct NoDriver;

impl usm_localmanager::Driver for NoDriver {
    fn poll(&mut self, _cx: &mut usm_localmanager::DriverContext<'_>) -> usize {
        0
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
