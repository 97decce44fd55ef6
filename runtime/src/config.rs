//! The USM configuration file.
//!
//! The format is the USM cfg format: one directive per line, `keyword value...`, `#` starts
//! a comment (anywhere on a line), blank lines are ignored. The USM tutorial's file works
//! verbatim:
//!
//! ```text
//! memory 32768          # pool size in pages (4 KiB each)
//! workers 2
//! policy policyOne      # optional: declare / make default
//! process stressapptest policyOne
//! ```
//!
//! Extensions keep the same shape:
//!
//! | directive | meaning |
//! |---|---|
//! | `memory N` | pool size: `N` pages of 4 KiB, or a size with a unit (`512M`, `2G`) |
//! | `workers N` | worker threads (one LocalManager each); `auto` = one per core |
//! | `policy NAME` | declare a policy; the first one declared of each kind is that kind's default (the daemon also falls back to it when a process's policy panics) |
//! | `process NAME POLICY` | programs whose name is `NAME` are managed by `POLICY` (its kind's slot; the other kinds get the defaults) |
//! | `swap PATH [priority P]` | a USM swap device (see `usm mkswap`); higher `P` is used first |
//! | `fhp SIZE` | flexible huge page size used by `fhp` policies without a size (`process redis fhp`) |
//! | `evict NAME` | default eviction policy of every managed process (`two-list` (default), `clock`, `fifo`, `hints`) |
//! | `oom NAME` | default out-of-memory policy of every managed process (`fail`, `evict-harder`, `kill-largest`) |
//! | `watermarks LOW HIGH` | evict when free frames fall below `LOW` until `HIGH` are free (pages, or sizes, or `%` of the pool) |
//! | `metrics ADDR:PORT` | Prometheus text exposition on this (localhost) address |
//! | `waker MODE` | idle workers wait by `eventfd`, `eventfd+pmqos` (holds `/dev/cpu_dma_latency` at 0) or `spin` |
//! | `socket PATH` | the unix socket taggers connect to |
//!
//! Every error names the file, the line, and the offending token. Policy names are checked
//! against the policy registry by the caller (the registry lives in `usm-policies`); the
//! parsed config keeps each name's line so that error can name the line too.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Size of one pool page in bytes.
const PAGE: u64 = 4096;

/// A value together with the config line it came from (1-based), for later errors.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// 1-based line number in the config file.
    pub line: usize,
}

/// How an idle worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum WakerMode {
    /// Sleep on an eventfd (a kernel wake-up across vCPUs).
    #[default]
    Eventfd,
    /// Sleep on an eventfd while holding `/dev/cpu_dma_latency` at 0 (a faster wake-up;
    /// the wake-up latency of each mode is in `bench/results/sched.md`).
    EventfdPmQos,
    /// Busy-poll (the fastest wake-up; burns the core).
    Spin,
}

impl WakerMode {
    /// The config/CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WakerMode::Eventfd => "eventfd",
            WakerMode::EventfdPmQos => "eventfd+pmqos",
            WakerMode::Spin => "spin",
        }
    }

    /// Parses the config/CLI spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "eventfd" => Some(WakerMode::Eventfd),
            "eventfd+pmqos" | "pmqos" => Some(WakerMode::EventfdPmQos),
            "spin" | "busy-poll" => Some(WakerMode::Spin),
            _ => None,
        }
    }
}

/// A watermark: absolute pages or a percentage of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Watermark {
    /// A number of pages.
    Pages(u64),
    /// Percent of the pool (0..=100).
    Percent(u8),
}

impl Watermark {
    /// The watermark in pages for a pool of `pool_pages`.
    pub fn pages(self, pool_pages: u64) -> u64 {
        match self {
            Watermark::Pages(p) => p,
            Watermark::Percent(pc) => {
                let pages = u128::from(pool_pages) * u128::from(pc) / 100;
                u64::try_from(pages).unwrap_or(u64::MAX)
            }
        }
    }
}

/// One `swap PATH [priority P]` line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwapSpec {
    /// File or block device formatted by `usm mkswap`.
    pub path: PathBuf,
    /// Higher first; equal priorities are used round-robin (like `swapon -p`).
    pub priority: i32,
    /// Line of the directive.
    pub line: usize,
}

/// One `process NAME POLICY` line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProcessRule {
    /// Process name as the tagger reports it (`comm`, at most 15 bytes, or the executable
    /// file name).
    pub name: String,
    /// Allocation policy name (checked against the registry by the caller).
    pub policy: Spanned<String>,
}

/// A parsed configuration. [`Config::default`] is the built-in default the daemon uses
/// when started without a file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// Pool size in 4 KiB pages.
    pub memory_pages: u64,
    /// Worker threads; `None` = one per core.
    pub workers: Option<usize>,
    /// Declared policies, in order; the first of each kind is that kind's default.
    pub policies: Vec<Spanned<String>>,
    /// Which programs are managed, and by which policy.
    pub processes: Vec<ProcessRule>,
    /// Swap devices.
    pub swap: Vec<SwapSpec>,
    /// Default flexible huge page size in bytes.
    pub fhp_bytes: Option<u64>,
    /// Default eviction policy name.
    pub evict: Option<Spanned<String>>,
    /// Default OOM policy name.
    pub oom: Option<Spanned<String>>,
    /// (low, high) free-frame watermarks.
    pub watermarks: (Watermark, Watermark),
    /// Prometheus exposition address.
    pub metrics: Option<SocketAddr>,
    /// How idle workers wait.
    pub waker: WakerMode,
    /// The taggers' socket.
    pub socket: PathBuf,
    /// Users besides the daemon's own (and root) whose programs may attach: `allow
    /// 1000,1001` or `allow *` (checked on `SO_PEERCRED`; overrides `USM_ALLOW_UIDS`).
    pub allow: Option<String>,
}

/// Default socket path of the daemon.
pub const DEFAULT_SOCKET: &str = "/run/usm/usm.sock";

impl Default for Config {
    fn default() -> Self {
        Config {
            memory_pages: 32768,
            workers: None,
            policies: Vec::new(),
            processes: Vec::new(),
            swap: Vec::new(),
            fhp_bytes: None,
            evict: None,
            oom: None,
            watermarks: (Watermark::Percent(5), Watermark::Percent(10)),
            metrics: None,
            waker: WakerMode::Eventfd,
            socket: PathBuf::from(DEFAULT_SOCKET),
            allow: None,
        }
    }
}

/// What is wrong with a config line (or with the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigErrorKind {
    /// The first word is not a directive.
    #[error("unknown directive `{0}` (known: {KNOWN_DIRECTIVES})")]
    UnknownDirective(String),
    /// Too few values.
    #[error("`{directive}` needs {expected}")]
    MissingValue {
        /// The directive.
        directive: &'static str,
        /// What it needs, in words.
        expected: &'static str,
    },
    /// A value that does not parse, or is out of range for this machine.
    #[error("bad value `{token}` for `{directive}`: {why}")]
    BadValue {
        /// The directive.
        directive: &'static str,
        /// The bad token (control characters escaped, long tokens shortened).
        token: String,
        /// Why it is bad.
        why: String,
    },
    /// Extra words after the values.
    #[error("unexpected `{0}` after the values")]
    Trailing(String),
    /// A directive that may appear once appeared again.
    #[error("`{directive}` given twice (first on line {first})")]
    Duplicate {
        /// The directive.
        directive: &'static str,
        /// Where it first appeared.
        first: usize,
    },
    /// A `process` line for a name that already has one.
    #[error("process `{name}` already assigned on line {first}")]
    DuplicateProcess {
        /// The process name.
        name: String,
        /// Its first line.
        first: usize,
    },
    /// A `swap` line for a path that already has one.
    #[error("swap device `{path}` already given on line {first}")]
    DuplicateSwap {
        /// The path (escaped).
        path: String,
        /// Its first line.
        first: usize,
    },
    /// A token holding a control or invisible formatting character (it could forge or
    /// hide lines in a log).
    #[error("`{0}` holds a control or formatting character")]
    Unprintable(String),
    /// The line is not UTF-8.
    #[error("not valid UTF-8")]
    NotUtf8,
    /// The file could not be opened or read.
    #[error("cannot read: {0}")]
    Io(String),
    /// The path is not a regular file (a FIFO, a device such as `/dev/zero`, a directory).
    #[error("not a regular file ({0}); a config must be a regular file")]
    NotRegularFile(&'static str),
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("{size} bytes is over the limit of {MAX_CONFIG_BYTES} bytes for a config file")]
    TooLarge {
        /// The file's size (at least the limit plus one when it grew while being read).
        size: u64,
    },
}

const KNOWN_DIRECTIVES: &str = "memory, workers, policy, process, swap, fhp, evict, oom, watermarks, metrics, waker, socket, allow";

/// The largest config file [`Config::load`] reads (16 MiB: hundreds of thousands of
/// `process` lines; anything bigger is a mistake, e.g. a device or a log).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The most swap devices a config may name (a device id is one byte, and id 255 is
/// reserved by `usm-swap`).
pub const MAX_SWAP_DEVICES: usize = 255;

/// The most worker threads on any machine (the scheduler's limit).
pub const MAX_WORKERS: usize = 64;

/// A config error with its location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {kind}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file (or `<string>`).
    pub file: PathBuf,
    /// 1-based line; `None` for errors about the whole file (cannot read, too large).
    pub line: Option<usize>,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

/// What this machine offers, for the range checks of `memory` and `workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// Physical memory in 4 KiB pages (`sysinfo(2)` total RAM).
    pub ram_pages: u64,
    /// Online cores (`sysconf(_SC_NPROCESSORS_ONLN)`).
    pub online_cores: usize,
}

impl Machine {
    /// This machine, read once per process.
    pub fn current() -> Machine {
        static CURRENT: std::sync::OnceLock<Machine> = std::sync::OnceLock::new();
        *CURRENT.get_or_init(|| {
            let ram_bytes = nix::sys::sysinfo::sysinfo()
                .map(|s| s.ram_total())
                .ok()
                .or_else(meminfo_total_bytes)
                .unwrap_or(u64::MAX);
            let online_cores = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
                .ok()
                .flatten()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1);
            Machine {
                ram_pages: ram_bytes / PAGE,
                online_cores,
            }
        })
    }
}

/// `MemTotal` of `/proc/meminfo` in bytes (when `sysinfo(2)` failed).
fn meminfo_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The name as it may be written to a log or an error: control characters (newlines,
/// escapes) and invisible formatting characters (bidi overrides, zero-width) are written
/// as `\u{..}` escapes, and a name longer than 64 characters is cut with its byte length
/// noted. Use it for every program-supplied name before it reaches a log.
pub fn printable_name(name: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut out = String::with_capacity(name.len().min(4 * MAX_CHARS));
    for (i, c) in name.chars().enumerate() {
        if i == MAX_CHARS {
            out.push_str(&format!("…({} bytes)", name.len()));
            break;
        }
        if is_unprintable(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Control characters and the invisible formatting characters that can reorder or hide
/// text in a terminal (bidi embeddings and isolates, zero-width characters, BOM).
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Parser state: what has been seen so far, each in a map, so every line costs O(1)
/// beyond its own length (no scan over earlier lines).
#[derive(Default)]
struct Seen {
    /// Directives that may appear once, by their line.
    once: HashMap<&'static str, usize>,
    /// Declared policy names.
    policies: HashSet<String>,
    /// Process names, by their line.
    processes: HashMap<String, usize>,
    /// Swap paths, by their line.
    swaps: HashMap<PathBuf, usize>,
}

impl Config {
    /// Reads and parses a config file, checking numbers against this machine.
    ///
    /// The file must be a regular file of at most [`MAX_CONFIG_BYTES`]: it is opened
    /// without blocking (a FIFO is refused, not waited on) and read with a bound (a file
    /// that grows while it is read is refused too).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let whole = |kind| ConfigError {
            file: path.to_path_buf(),
            line: None,
            kind,
        };
        let bytes = read_bounded(path).map_err(whole)?;
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => {
                let line = bytes[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                return Err(ConfigError {
                    file: path.to_path_buf(),
                    line: Some(line),
                    kind: ConfigErrorKind::NotUtf8,
                });
            }
        };
        Self::parse_named(text, path)
    }

    /// Parses config text, checking numbers against this machine; errors name
    /// `<string>` as the file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_named(text, Path::new("<string>"))
    }

    /// Parses config text that came from `file`, checking numbers against this machine.
    pub fn parse_named(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Self::parse_for(text, file, &Machine::current())
    }

    /// Parses config text that came from `file`, checking `memory` and `workers` against
    /// `machine`. Linear in the size of `text`.
    pub fn parse_for(text: &str, file: &Path, machine: &Machine) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        let mut seen = Seen::default();
        let at = |line: usize, kind| ConfigError {
            file: file.to_path_buf(),
            line: Some(line),
            kind,
        };
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("");
            let mut words = content.split_whitespace();
            let Some(directive) = words.next() else {
                continue;
            };
            let args: Vec<&str> = words.collect();
            if let Some(bad) = std::iter::once(directive)
                .chain(args.iter().copied())
                .find(|w| w.chars().any(is_unprintable))
            {
                return Err(at(line, ConfigErrorKind::Unprintable(printable_name(bad))));
            }
            cfg.apply(directive, &args, line, &mut seen, machine)
                .map_err(|kind| at(line, kind))?;
        }
        // Checks that need the whole file (a `memory` line may follow `watermarks`).
        if let Some(&line) = seen.once.get("watermarks") {
            let pool = cfg.memory_pages;
            let (low, high) = cfg.watermarks;
            let (lo, hi) = (low.pages(pool), high.pages(pool));
            if hi > pool {
                return Err(at(
                    line,
                    ConfigErrorKind::BadValue {
                        directive: "watermarks",
                        token: watermark_token(high),
                        why: format!("HIGH ({hi} pages) is more than the pool ({pool} pages)"),
                    },
                ));
            }
            if lo > hi {
                return Err(at(
                    line,
                    ConfigErrorKind::BadValue {
                        directive: "watermarks",
                        token: watermark_token(high),
                        why: format!("HIGH ({hi} pages) must not be below LOW ({lo} pages)"),
                    },
                ));
            }
        }
        Ok(cfg)
    }

    /// The default allocation policy: the first `policy` line naming an allocation policy
    /// of the built-in registry, if any (`policy` lines may also name eviction and OOM
    /// policies, which are never an allocation default). See [`Config::default_policy_in`]
    /// for a registry with more policies.
    pub fn default_policy(&self) -> Option<&str> {
        self.default_policy_in(&usm_policies::Registry::with_builtins())
    }

    /// [`Config::default_policy`] against `registry`: the first `policy` line whose name
    /// `registry` knows as an allocation policy (unknown names are skipped here; the
    /// daemon refuses them, naming the line).
    pub fn default_policy_in(&self, registry: &usm_policies::Registry) -> Option<&str> {
        self.policies
            .iter()
            .find(|p| {
                matches!(
                    registry.kind_of(&p.value),
                    Ok(usm_policies::PolicyKind::Alloc)
                )
            })
            .map(|p| p.value.as_str())
    }

    /// The policy assigned to a process name, if the config names it.
    pub fn policy_for(&self, process: &str) -> Option<&str> {
        self.processes
            .iter()
            .find(|r| r.name == process)
            .map(|r| r.policy.value.as_str())
    }

    fn apply(
        &mut self,
        directive: &str,
        args: &[&str],
        line: usize,
        seen: &mut Seen,
        machine: &Machine,
    ) -> Result<(), ConfigErrorKind> {
        // Directives that may appear once.
        let mut once = |name: &'static str| -> Result<(), ConfigErrorKind> {
            if let Some(&first) = seen.once.get(name) {
                return Err(ConfigErrorKind::Duplicate {
                    directive: name,
                    first,
                });
            }
            seen.once.insert(name, line);
            Ok(())
        };
        match directive {
            "memory" => {
                once("memory")?;
                let [v] = exact(args, "memory", "a size (pages, or 512M / 2G)")?;
                let pages = parse_pages(v, "memory")?;
                if pages == 0 {
                    return Err(bad("memory", v, "the pool cannot be empty"));
                }
                if pages > machine.ram_pages {
                    return Err(bad(
                        "memory",
                        v,
                        &format!(
                            "{pages} pages is more than this machine's physical memory \
                             ({} pages, {} MiB)",
                            machine.ram_pages,
                            machine.ram_pages / 256
                        ),
                    ));
                }
                self.memory_pages = pages;
            }
            "workers" => {
                once("workers")?;
                let [v] = exact(args, "workers", "a number or `auto`")?;
                self.workers = if *v == "auto" {
                    None
                } else {
                    let n: usize = v.parse().map_err(|_| bad("workers", v, "not a number"))?;
                    let max = machine.online_cores.clamp(1, MAX_WORKERS);
                    if n == 0 || n > max {
                        return Err(bad(
                            "workers",
                            v,
                            &format!(
                                "must be 1..={max} (this machine has {} online cores; at \
                                 most {MAX_WORKERS} workers)",
                                machine.online_cores
                            ),
                        ));
                    }
                    Some(n)
                };
            }
            "policy" => {
                let [v] = exact(args, "policy", "a policy name")?;
                if !seen.policies.contains(*v) {
                    seen.policies.insert((*v).to_string());
                    self.policies.push(Spanned {
                        value: (*v).to_string(),
                        line,
                    });
                }
            }
            "process" => {
                let [name, policy] = exact(args, "process", "a process name and a policy")?;
                if let Some(&first) = seen.processes.get(*name) {
                    return Err(ConfigErrorKind::DuplicateProcess {
                        name: printable_name(name),
                        first,
                    });
                }
                seen.processes.insert((*name).to_string(), line);
                self.processes.push(ProcessRule {
                    name: (*name).to_string(),
                    policy: Spanned {
                        value: (*policy).to_string(),
                        line,
                    },
                });
            }
            "swap" => {
                let Some((path, rest)) = args.split_first() else {
                    return Err(ConfigErrorKind::MissingValue {
                        directive: "swap",
                        expected: "a path and optionally `priority P`",
                    });
                };
                let priority = match rest {
                    [] => 0,
                    ["priority"] => {
                        return Err(ConfigErrorKind::MissingValue {
                            directive: "swap",
                            expected: "a value after `priority`",
                        });
                    }
                    ["priority", v, extra @ ..] => {
                        if let Some(x) = extra.first() {
                            return Err(trailing(x));
                        }
                        let p = v
                            .parse::<i32>()
                            .map_err(|_| bad("swap", v, "priority must be an integer"))?;
                        if !(-1..=32767).contains(&p) {
                            return Err(bad("swap", v, "priority must be -1..=32767"));
                        }
                        p
                    }
                    [other, ..] => return Err(trailing(other)),
                };
                if self.swap.len() == MAX_SWAP_DEVICES {
                    return Err(bad(
                        "swap",
                        path,
                        &format!("at most {MAX_SWAP_DEVICES} swap devices"),
                    ));
                }
                let path = PathBuf::from(path);
                if let Some(&first) = seen.swaps.get(&path) {
                    return Err(ConfigErrorKind::DuplicateSwap {
                        path: printable_name(&path.to_string_lossy()),
                        first,
                    });
                }
                seen.swaps.insert(path.clone(), line);
                self.swap.push(SwapSpec {
                    path,
                    priority,
                    line,
                });
            }
            "fhp" => {
                once("fhp")?;
                let [v] = exact(args, "fhp", "a power-of-two size from 8K to 2M")?;
                let bytes = parse_size(v, "fhp")?;
                if !bytes.is_power_of_two() || !(8192..=2 << 20).contains(&bytes) {
                    return Err(bad("fhp", v, "must be a power of two from 8K to 2M"));
                }
                self.fhp_bytes = Some(bytes);
            }
            "evict" => {
                once("evict")?;
                let [v] = exact(args, "evict", "an eviction policy name")?;
                self.evict = Some(Spanned {
                    value: (*v).to_string(),
                    line,
                });
            }
            "oom" => {
                once("oom")?;
                let [v] = exact(args, "oom", "an OOM policy name")?;
                self.oom = Some(Spanned {
                    value: (*v).to_string(),
                    line,
                });
            }
            "watermarks" => {
                once("watermarks")?;
                let [lo, hi] = exact(args, "watermarks", "LOW and HIGH (pages, sizes or %)")?;
                self.watermarks = (parse_watermark(lo)?, parse_watermark(hi)?);
            }
            "metrics" => {
                once("metrics")?;
                let [v] = exact(args, "metrics", "an ADDRESS:PORT")?;
                let addr: SocketAddr = v
                    .parse()
                    .map_err(|_| bad("metrics", v, "expected ADDRESS:PORT, e.g. 127.0.0.1:9464"))?;
                self.metrics = Some(addr);
            }
            "waker" => {
                once("waker")?;
                let [v] = exact(args, "waker", "eventfd, eventfd+pmqos or spin")?;
                self.waker = WakerMode::parse(v)
                    .ok_or_else(|| bad("waker", v, "expected eventfd, eventfd+pmqos or spin"))?;
            }
            "socket" => {
                once("socket")?;
                let [v] = exact(args, "socket", "a path")?;
                self.socket = PathBuf::from(v);
            }
            "allow" => {
                once("allow")?;
                let [v] = exact(args, "allow", "uids (1000,1001) or *")?;
                usm_proto::server::PeerRule::parse(v).map_err(|why| bad("allow", v, &why))?;
                self.allow = Some(v.to_string());
            }
            other => return Err(ConfigErrorKind::UnknownDirective(printable_name(other))),
        }
        Ok(())
    }
}

/// Opens `path` without blocking, refuses anything but a regular file of at most
/// [`MAX_CONFIG_BYTES`], and reads it with that bound.
fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigErrorKind> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};

    let io = |e: std::io::Error| ConfigErrorKind::Io(e.to_string());
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(ConfigErrorKind::NotRegularFile(what));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigErrorKind::TooLarge { size: meta.len() });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > MAX_CONFIG_BYTES {
        return Err(ConfigErrorKind::TooLarge { size: read });
    }
    Ok(bytes)
}

fn bad(directive: &'static str, token: &str, why: &str) -> ConfigErrorKind {
    ConfigErrorKind::BadValue {
        directive,
        token: printable_name(token),
        why: why.to_string(),
    }
}

fn trailing(token: &str) -> ConfigErrorKind {
    ConfigErrorKind::Trailing(printable_name(token))
}

fn watermark_token(w: Watermark) -> String {
    match w {
        Watermark::Pages(p) => p.to_string(),
        Watermark::Percent(p) => format!("{p}%"),
    }
}

/// Exactly `N` values, else a precise error.
fn exact<'a, const N: usize>(
    args: &'a [&'a str],
    directive: &'static str,
    expected: &'static str,
) -> Result<&'a [&'a str; N], ConfigErrorKind> {
    if let Some(extra) = args.get(N) {
        return Err(trailing(extra));
    }
    args.try_into().map_err(|_| ConfigErrorKind::MissingValue {
        directive,
        expected,
    })
}

/// A byte size: `4096`, `64K`, `512M`, `2G` (binary units; `KiB` spellings accepted).
pub fn parse_size(s: &str, directive: &'static str) -> Result<u64, ConfigErrorKind> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        bad(
            directive,
            s,
            "expected a number with an optional unit K/M/G",
        )
    })?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(bad(directive, s, "unknown unit (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| bad(directive, s, "too large"))
}

/// Pages: a plain number is pages (the USM format); with a unit it is bytes, rounded up.
fn parse_pages(s: &str, directive: &'static str) -> Result<u64, ConfigErrorKind> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| bad(directive, s, "not a number"));
    }
    Ok(parse_size(s, directive)?.div_ceil(PAGE))
}

fn parse_watermark(s: &str) -> Result<Watermark, ConfigErrorKind> {
    if let Some(pc) = s.strip_suffix('%') {
        let v: u8 = pc
            .parse()
            .map_err(|_| bad("watermarks", s, "expected a percentage 0%..100%"))?;
        if v > 100 {
            return Err(bad("watermarks", s, "a percentage cannot exceed 100%"));
        }
        return Ok(Watermark::Percent(v));
    }
    Ok(Watermark::Pages(parse_pages(s, "watermarks")?))
}

impl fmt::Display for Config {
    /// Writes the config back in its own format (round-trips through [`Config::parse`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "memory {}", self.memory_pages)?;
        match self.workers {
            Some(n) => writeln!(f, "workers {n}")?,
            None => writeln!(f, "workers auto")?,
        }
        for p in &self.policies {
            writeln!(f, "policy {}", p.value)?;
        }
        for r in &self.processes {
            writeln!(f, "process {} {}", r.name, r.policy.value)?;
        }
        for s in &self.swap {
            writeln!(f, "swap {} priority {}", s.path.display(), s.priority)?;
        }
        if let Some(b) = self.fhp_bytes {
            writeln!(f, "fhp {}K", b / 1024)?;
        }
        if let Some(e) = &self.evict {
            writeln!(f, "evict {}", e.value)?;
        }
        if let Some(o) = &self.oom {
            writeln!(f, "oom {}", o.value)?;
        }
        let wm = |w: Watermark| match w {
            Watermark::Pages(p) => p.to_string(),
            Watermark::Percent(p) => format!("{p}%"),
        };
        writeln!(
            f,
            "watermarks {} {}",
            wm(self.watermarks.0),
            wm(self.watermarks.1)
        )?;
        if let Some(m) = self.metrics {
            writeln!(f, "metrics {m}")?;
        }
        writeln!(f, "waker {}", self.waker.as_str())?;
        if let Some(a) = &self.allow {
            writeln!(f, "allow {a}")?;
        }
        writeln!(f, "socket {}", self.socket.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TUTORIAL: &str = "memory 32768          # pool size in pages (4 KiB each)\n\
                            workers 2\n\
                            policy policyOne      # optional: declare / make default\n\
                            process stressapptest policyOne\n";

    #[test]
    fn tutorial_file_works_verbatim() {
        let c = Config::parse(TUTORIAL).unwrap();
        assert_eq!(c.memory_pages, 32768);
        assert_eq!(c.workers, Some(2));
        assert_eq!(c.default_policy(), Some("policyOne"));
        assert_eq!(c.policy_for("stressapptest"), Some("policyOne"));
        assert_eq!(c.policy_for("redis-server"), None);
        assert_eq!(c.processes[0].policy.line, 4);
    }

    #[test]
    fn extensions_parse() {
        let c = Config::parse(
            "memory 512M\nworkers auto\nswap /var/usm/a priority 10\nswap /dev/zram0\n\
             fhp 64K\nevict clock\noom kill-largest\nwatermarks 2% 8192\n\
             metrics 127.0.0.1:9464\nwaker eventfd+pmqos\nsocket /tmp/u.sock\n",
        )
        .unwrap();
        assert_eq!(c.memory_pages, 512 * 256);
        assert_eq!(c.workers, None);
        assert_eq!(c.swap.len(), 2);
        assert_eq!(c.swap[0].priority, 10);
        assert_eq!(c.swap[1].priority, 0);
        assert_eq!(c.fhp_bytes, Some(65536));
        assert_eq!(c.evict.as_ref().unwrap().value, "clock");
        assert_eq!(
            c.watermarks,
            (Watermark::Percent(2), Watermark::Pages(8192))
        );
        assert_eq!(c.waker, WakerMode::EventfdPmQos);
        assert_eq!(c.metrics.unwrap().port(), 9464);
    }

    #[test]
    fn display_round_trips() {
        let c = Config::parse(&format!(
            "{TUTORIAL}swap /x priority 3\nfhp 2M\nwatermarks 1% 2%\n"
        ))
        .unwrap();
        let again = Config::parse(&c.to_string()).unwrap();
        assert_eq!(again.memory_pages, c.memory_pages);
        assert_eq!(again.processes[0].name, "stressapptest");
        assert_eq!(
            again.swap,
            vec![SwapSpec {
                path: "/x".into(),
                priority: 3,
                line: again.swap[0].line
            }]
        );
        assert_eq!(again.fhp_bytes, c.fhp_bytes);
        assert_eq!(again.watermarks, c.watermarks);
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_line_and_token() {
        let e = err("memory 100\n\n  memroy 5\n");
        assert_eq!(e.line, Some(3));
        assert!(
            e.to_string()
                .starts_with("<string>:3: unknown directive `memroy`"),
            "{e}"
        );

        let e = err("workers two\n");
        assert_eq!(e.line, Some(1));
        assert!(e.to_string().contains("`two`"), "{e}");

        let e = err("memory 1\nmemory 2\n");
        assert_eq!(
            e.kind,
            ConfigErrorKind::Duplicate {
                directive: "memory",
                first: 1
            }
        );

        let e = err("process redis\n");
        assert!(matches!(
            e.kind,
            ConfigErrorKind::MissingValue {
                directive: "process",
                ..
            }
        ));

        let e = err("workers 2 3\n");
        assert_eq!(e.kind, ConfigErrorKind::Trailing("3".into()));

        let e = err("fhp 48K\n");
        assert!(e.to_string().contains("power of two"), "{e}");

        let e = err("memory 12Q\n");
        assert!(e.to_string().contains("`12Q`"), "{e}");

        let e = err("process a p\nprocess a q\n");
        assert_eq!(
            e.kind,
            ConfigErrorKind::DuplicateProcess {
                name: "a".into(),
                first: 1
            }
        );

        let e = err("swap /x prio 3\n");
        assert_eq!(e.kind, ConfigErrorKind::Trailing("prio".into()));

        let e = err("watermarks 10% 5%\nmemory 1000\n");
        assert_eq!(e.line, Some(1));
        assert!(
            e.to_string()
                .contains("HIGH (50 pages) must not be below LOW (100 pages)"),
            "{e}"
        );

        let e = err("metrics localhost\n");
        assert_eq!(e.line, Some(1));

        let e = err("memory 0\n");
        assert!(e.to_string().contains("empty"), "{e}");

        let e = err("memory 100\nwaker turbo\n");
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("`turbo`"), "{e}");
    }

    #[test]
    fn the_default_policy_is_the_first_allocation_policy() {
        // An eviction (or OOM) policy named first is not the allocation default.
        let c = Config::parse(
            "memory 100\npolicy clock\npolicy kill-largest\npolicy fhp\npolicy first-fit\n",
        )
        .unwrap();
        assert_eq!(c.default_policy(), Some("fhp"));
        let c = Config::parse("memory 100\npolicy clock\n").unwrap();
        assert_eq!(c.default_policy(), None);
        let c = Config::parse("memory 100\npolicy quota:64\npolicy clock\n").unwrap();
        assert_eq!(c.default_policy(), Some("quota:64"));
    }

    #[test]
    fn waker_keywords_parse() {
        for (word, mode) in [
            ("eventfd", WakerMode::Eventfd),
            ("eventfd+pmqos", WakerMode::EventfdPmQos),
            ("pmqos", WakerMode::EventfdPmQos),
            ("spin", WakerMode::Spin),
            ("busy-poll", WakerMode::Spin),
        ] {
            let c = Config::parse(&format!("memory 100\nwaker {word}\n")).unwrap();
            assert_eq!(c.waker, mode, "{word}");
        }
        assert_eq!(
            Config::parse("memory 100\n").unwrap().waker,
            WakerMode::Eventfd
        );
    }

    #[test]
    fn missing_file_is_a_clear_error_without_a_line() {
        let e = Config::load(Path::new("/nonexistent/usm.cfg")).unwrap_err();
        assert_eq!(e.line, None);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/usm.cfg: cannot read"),
            "{e}"
        );
    }

    const SMALL: Machine = Machine {
        ram_pages: 262_144, // 1 GiB
        online_cores: 2,
    };

    fn err_on(text: &str, machine: &Machine) -> ConfigError {
        Config::parse_for(text, Path::new("t.cfg"), machine).unwrap_err()
    }

    #[test]
    fn memory_is_checked_against_physical_ram() {
        let e = err_on("workers 1\nmemory 262145\n", &SMALL);
        assert_eq!(e.line, Some(2));
        assert!(
            e.to_string()
                .starts_with("t.cfg:2: bad value `262145` for `memory`"),
            "{e}"
        );
        assert!(
            e.to_string().contains("physical memory (262144 pages"),
            "{e}"
        );
        let e = err_on("memory 2G\n", &SMALL);
        assert!(e.to_string().contains("`2G`"), "{e}");
        // u64::MAX pages parses as a number but no machine has that much memory.
        let e = err_on(&format!("memory {}\n", u64::MAX), &SMALL);
        assert_eq!(e.line, Some(1));
        assert!(e.to_string().contains("physical memory"), "{e}");
        let e = err("memory 18446744073709551615\n");
        assert!(e.to_string().contains("physical memory"), "{e}");
        // One past u64::MAX, and a size whose bytes overflow.
        let e = err("memory 18446744073709551616\n");
        assert!(e.to_string().contains("not a number"), "{e}");
        let e = err("memory 99999999999999999G\n");
        assert!(e.to_string().contains("too large"), "{e}");
        // The whole of RAM is still accepted (exactly at the bound).
        let c = Config::parse_for("memory 1G\n", Path::new("t.cfg"), &SMALL).unwrap();
        assert_eq!(c.memory_pages, 262_144);
        // This machine: its own RAM is the bound.
        let ram = Machine::current().ram_pages;
        assert!(ram > 0);
        assert!(Config::parse(&format!("memory {ram}\n")).is_ok());
        assert!(Config::parse(&format!("memory {}\n", ram + 1)).is_err());
    }

    #[test]
    fn workers_are_checked_against_online_cores() {
        let e = err_on("workers 3\n", &SMALL);
        assert_eq!(e.line, Some(1));
        assert!(e.to_string().contains("must be 1..=2"), "{e}");
        assert!(e.to_string().contains("2 online cores"), "{e}");
        let big = Machine {
            ram_pages: 1 << 30,
            online_cores: 256,
        };
        let e = err_on("workers 65\n", &big);
        assert!(e.to_string().contains("must be 1..=64"), "{e}");
        assert!(Config::parse_for("workers 64\n", Path::new("t"), &big).is_ok());
        assert!(err_on("workers 0\n", &SMALL).to_string().contains("`0`"));
        // This machine: one per online core at most.
        let cores = Machine::current().online_cores.min(MAX_WORKERS);
        assert!(Config::parse(&format!("workers {cores}\n")).is_ok());
        let e = err(&format!("memory 100\nworkers {}\n", cores + 1));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn swap_lines_are_bounded() {
        let e = err("swap /a\nswap /b\nswap /a priority 2\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(
            e.kind,
            ConfigErrorKind::DuplicateSwap {
                path: "/a".into(),
                first: 1
            }
        );
        let e = err("swap /a priority 40000\n");
        assert!(e.to_string().contains("-1..=32767"), "{e}");
        let e = err("swap /a priority -2\n");
        assert!(e.to_string().contains("`-2`"), "{e}");
        let many: String = (0..=MAX_SWAP_DEVICES)
            .map(|i| format!("swap /s{i}\n"))
            .collect();
        let e = err(&many);
        assert_eq!(e.line, Some(MAX_SWAP_DEVICES + 1));
        assert!(e.to_string().contains("at most 255 swap devices"), "{e}");
    }

    #[test]
    fn watermarks_cannot_exceed_the_pool() {
        let e = err("memory 1000\nwatermarks 10 2000\n");
        assert_eq!(e.line, Some(2));
        assert!(
            e.to_string()
                .contains("HIGH (2000 pages) is more than the pool (1000 pages)"),
            "{e}"
        );
        assert!(Config::parse("memory 1000\nwatermarks 10 1000\n").is_ok());
    }

    #[test]
    fn control_characters_never_reach_an_error_or_a_log() {
        let e = err("memory 100\nprocess evil\u{1b}[2Jname first-fit\n");
        assert_eq!(e.line, Some(2));
        let shown = e.to_string();
        assert!(!shown.contains('\u{1b}'), "{shown:?}");
        assert!(shown.contains("evil\\u{1b}[2Jname"), "{shown}");
        assert!(matches!(e.kind, ConfigErrorKind::Unprintable(_)));
        // A right-to-left override hides text in a terminal: refused too.
        let e = err("process a\u{202e}b first-fit\n");
        assert!(matches!(e.kind, ConfigErrorKind::Unprintable(_)), "{e}");
        // A NUL byte in an unknown directive.
        let e = err("mem\0ory 5\n");
        assert!(!e.to_string().contains('\0'), "{e:?}");

        assert_eq!(printable_name("redis-server"), "redis-server");
        assert_eq!(
            printable_name("a\nINFO forged line"),
            "a\\u{a}INFO forged line"
        );
        let long = "x".repeat(1000);
        let p = printable_name(&long);
        assert!(p.len() < 100 && p.ends_with("…(1000 bytes)"), "{p}");
    }

    #[test]
    fn every_error_names_file_line_and_token() {
        for (text, line, token) in [
            ("memory 100\nbogus 1\n", 2, "bogus"),
            ("memory 100\n\n\nworkers x\n", 4, "x"),
            ("memory 100 7\n", 1, "7"),
            ("memory 100\nfhp 3K\n", 2, "3K"),
            ("memory 100\nwatermarks 5% 101%\n", 2, "101%"),
            ("memory 100\nmetrics nowhere\n", 2, "nowhere"),
            ("memory 100\nswap /x priority z\n", 2, "z"),
            ("memory 100\nwatermarks 50 20\n", 2, "20"),
            ("policy a\nprocess p a\nprocess p b\n", 3, "p"),
        ] {
            let e = Config::parse_named(text, Path::new("/etc/usm.cfg")).unwrap_err();
            let shown = e.to_string();
            assert_eq!(e.line, Some(line), "{text:?}: {shown}");
            assert!(
                shown.starts_with(&format!("/etc/usm.cfg:{line}: ")),
                "{text:?}: {shown}"
            );
            assert!(shown.contains(&format!("`{token}`")), "{text:?}: {shown}");
        }
    }

    #[test]
    fn non_utf8_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.cfg");
        std::fs::write(&path, b"memory 100\nworkers 1\nprocess \xff\xfe p\n").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.kind, ConfigErrorKind::NotUtf8);
    }

    /// `check-config /dev/zero` once read until memory ran out.
    #[test]
    fn devices_directories_and_fifos_are_refused_without_reading() {
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            e.kind,
            ConfigErrorKind::NotRegularFile("a character device")
        );
        assert_eq!(e.line, None);
        assert!(
            e.to_string()
                .starts_with("/dev/zero: not a regular file (a character device)"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = Config::load(dir.path()).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::NotRegularFile("a directory"));

        // A FIFO with no writer: opening it for reading used to wait forever.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Config::load(&f));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("Config::load blocked on a FIFO");
        assert_eq!(
            got.unwrap_err().kind,
            ConfigErrorKind::NotRegularFile("a FIFO")
        );

        // A symlink to a device is judged by what it points to.
        let link = dir.path().join("link.cfg");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_eq!(
            Config::load(&link).unwrap_err().kind,
            ConfigErrorKind::NotRegularFile("a character device")
        );
    }

    #[test]
    fn files_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.cfg");
        let f = std::fs::File::create(&path).unwrap();
        // Sparse: no disk is used for the hole.
        f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(
            e.kind,
            ConfigErrorKind::TooLarge {
                size: MAX_CONFIG_BYTES + 1
            }
        );
        assert_eq!(e.line, None);
        assert!(e.to_string().contains("over the limit"), "{e}");
        // Exactly at the limit is read (and parsed: a hole is NUL bytes, refused with a line).
        f.set_len(MAX_CONFIG_BYTES).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(matches!(e.kind, ConfigErrorKind::Unprintable(_)), "{e}");
    }

    fn many_rules(lines: usize) -> String {
        let mut text = String::from("memory 100\n");
        for i in 0..lines / 2 {
            text.push_str(&format!(
                "policy policy-number-{i:08}\n\
                 process some-program-name-{i:08} policy-number-{i:08}\n"
            ));
        }
        text
    }

    /// Fastest of three parses (the least disturbed by other work on the machine).
    fn parse_time(text: &str) -> std::time::Duration {
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                let c = Config::parse(text).unwrap();
                let d = t.elapsed();
                assert!(c.processes.len() * 2 + 1 >= text.lines().count());
                d
            })
            .min()
            .unwrap()
    }

    /// 10 MB of `process`/`policy` lines once took over a minute (each line scanned all
    /// earlier ones). The bound is not a benchmark: it is generous, and the shape (4x the
    /// lines cost well under 16x the time) is what a quadratic parser cannot meet.
    #[test]
    fn parsing_is_linear_in_the_number_of_rules() {
        let small = many_rules(50_000);
        let large = many_rules(200_000);
        assert!(large.len() > 8_000_000, "{} bytes", large.len());
        let t_small = parse_time(&small);
        let t_large = parse_time(&large);
        assert!(
            t_large < std::time::Duration::from_secs(5),
            "200k lines took {t_large:?}"
        );
        let ratio = t_large.as_secs_f64() / t_small.as_secs_f64().max(1e-6);
        assert!(
            ratio < 10.0,
            "4x the lines took {ratio:.1}x the time ({t_small:?} -> {t_large:?}): not linear"
        );
    }
}

#[cfg(test)]
mod allow_tests {
    use super::Config;

    #[test]
    fn allow_names_uids_or_everyone_and_prints_back() {
        let cfg = Config::parse("memory 64\nallow 1000, 1001\n").unwrap_err();
        // One token: a list without spaces.
        assert!(cfg.to_string().contains("1001"), "{cfg}");
        let cfg = Config::parse("memory 64\nallow 1000,1001\n").unwrap();
        assert_eq!(cfg.allow.as_deref(), Some("1000,1001"));
        let again = Config::parse(&cfg.to_string()).unwrap();
        assert_eq!(again.allow, cfg.allow);
        assert_eq!(
            Config::parse("allow *\n").unwrap().allow.as_deref(),
            Some("*")
        );
        let e = Config::parse("memory 64\nallow bob\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("bob"), "{e}");
        assert!(
            Config::parse("allow 1\nallow 2\n").is_err(),
            "allow only once"
        );
    }
}
