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
//! | `evict NAME` | default eviction policy of every managed process (`fifo`, `clock`, `hints`) |
//! | `oom NAME` | default out-of-memory policy of every managed process (`fail`, `evict-harder`, `kill-largest`) |
//! | `watermarks LOW HIGH` | evict when free frames fall below `LOW` until `HIGH` are free (pages, or sizes, or `%` of the pool) |
//! | `metrics ADDR:PORT` | Prometheus text exposition on this (localhost) address |
//! | `waker MODE` | idle workers wait by `eventfd`, `eventfd+pmqos` (holds `/dev/cpu_dma_latency` at 0) or `spin` |
//! | `socket PATH` | the unix socket taggers connect to |
//!
//! Every error names the file, the line, and the offending token. Policy names are checked
//! against the policy registry by the caller (the registry lives in `usm-policies`); the
//! parsed config keeps each name's line so that error can name the line too.

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
    /// Sleep on an eventfd (≈20 µs to wake across vCPUs on this VM).
    #[default]
    Eventfd,
    /// Sleep on an eventfd while holding `/dev/cpu_dma_latency` at 0 (≈2.4 µs here).
    EventfdPmQos,
    /// Busy-poll (≈0.1 µs, burns the core).
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
            Watermark::Percent(pc) => pool_pages * u64::from(pc) / 100,
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
        }
    }
}

/// What is wrong with a config line.
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
    /// A value that does not parse.
    #[error("bad value `{token}` for `{directive}`: {why}")]
    BadValue {
        /// The directive.
        directive: &'static str,
        /// The bad token.
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
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(String),
}

const KNOWN_DIRECTIVES: &str =
    "memory, workers, policy, process, swap, fhp, evict, oom, watermarks, metrics, waker, socket";

/// A config error with its location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {kind}", file.display())]
pub struct ConfigError {
    /// The file (or `<string>`).
    pub file: PathBuf,
    /// 1-based line; 0 when the file could not be read.
    pub line: usize,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            kind: ConfigErrorKind::Io(e.to_string()),
        })?;
        Self::parse_named(&text, path)
    }

    /// Parses config text; errors name `<string>` as the file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_named(text, Path::new("<string>"))
    }

    /// Parses config text that came from `file`.
    pub fn parse_named(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        let mut seen: Vec<(&'static str, usize)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("");
            let mut words = content.split_whitespace();
            let Some(directive) = words.next() else {
                continue;
            };
            let args: Vec<&str> = words.collect();
            cfg.apply(directive, &args, line, &mut seen)
                .map_err(|kind| ConfigError {
                    file: file.to_path_buf(),
                    line,
                    kind,
                })?;
        }
        // Checks that need the whole file (a `memory` line may follow `watermarks`).
        let (low, high) = cfg.watermarks;
        if low.pages(cfg.memory_pages) > high.pages(cfg.memory_pages) {
            let line = seen
                .iter()
                .find(|(n, _)| *n == "watermarks")
                .map_or(0, |&(_, l)| l);
            return Err(ConfigError {
                file: file.to_path_buf(),
                line,
                kind: ConfigErrorKind::BadValue {
                    directive: "watermarks",
                    token: format!("{high:?}"),
                    why: format!(
                        "HIGH ({} pages) must not be below LOW ({} pages)",
                        high.pages(cfg.memory_pages),
                        low.pages(cfg.memory_pages)
                    ),
                },
            });
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
        seen: &mut Vec<(&'static str, usize)>,
    ) -> Result<(), ConfigErrorKind> {
        // Directives that may appear once.
        let mut once = |name: &'static str| -> Result<(), ConfigErrorKind> {
            if let Some(&(_, first)) = seen.iter().find(|(n, _)| *n == name) {
                return Err(ConfigErrorKind::Duplicate {
                    directive: name,
                    first,
                });
            }
            seen.push((name, line));
            Ok(())
        };
        match directive {
            "memory" => {
                once("memory")?;
                let [v] = exact(args, "memory", "a size (pages, or 512M / 2G)")?;
                self.memory_pages = parse_pages(v, "memory")?;
                if self.memory_pages == 0 {
                    return Err(bad("memory", v, "the pool cannot be empty"));
                }
            }
            "workers" => {
                once("workers")?;
                let [v] = exact(args, "workers", "a number or `auto`")?;
                self.workers = if *v == "auto" {
                    None
                } else {
                    let n: usize = v.parse().map_err(|_| bad("workers", v, "not a number"))?;
                    if n == 0 || n > 1024 {
                        return Err(bad("workers", v, "must be 1..=1024"));
                    }
                    Some(n)
                };
            }
            "policy" => {
                let [v] = exact(args, "policy", "a policy name")?;
                if !self.policies.iter().any(|p| p.value == *v) {
                    self.policies.push(Spanned {
                        value: (*v).to_string(),
                        line,
                    });
                }
            }
            "process" => {
                let [name, policy] = exact(args, "process", "a process name and a policy")?;
                if let Some(r) = self.processes.iter().find(|r| r.name == *name) {
                    return Err(ConfigErrorKind::DuplicateProcess {
                        name: (*name).to_string(),
                        first: r.policy.line,
                    });
                }
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
                            return Err(ConfigErrorKind::Trailing((*x).to_string()));
                        }
                        v.parse::<i32>()
                            .map_err(|_| bad("swap", v, "priority must be an integer"))?
                    }
                    [other, ..] => return Err(ConfigErrorKind::Trailing((*other).to_string())),
                };
                self.swap.push(SwapSpec {
                    path: PathBuf::from(path),
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
            other => return Err(ConfigErrorKind::UnknownDirective(other.to_string())),
        }
        Ok(())
    }
}

fn bad(directive: &'static str, token: &str, why: &str) -> ConfigErrorKind {
    ConfigErrorKind::BadValue {
        directive,
        token: token.to_string(),
        why: why.to_string(),
    }
}

/// Exactly `N` values, else a precise error.
fn exact<'a, const N: usize>(
    args: &'a [&'a str],
    directive: &'static str,
    expected: &'static str,
) -> Result<&'a [&'a str; N], ConfigErrorKind> {
    if args.len() > N {
        return Err(ConfigErrorKind::Trailing(args[N].to_string()));
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
        assert_eq!(e.line, 3);
        assert!(
            e.to_string()
                .starts_with("<string>:3: unknown directive `memroy`"),
            "{e}"
        );

        let e = err("workers two\n");
        assert_eq!(e.line, 1);
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
        assert_eq!(e.line, 1);
        assert!(
            e.to_string()
                .contains("HIGH (50 pages) must not be below LOW (100 pages)"),
            "{e}"
        );

        let e = err("metrics localhost\n");
        assert_eq!(e.line, 1);

        let e = err("memory 0\n");
        assert!(e.to_string().contains("empty"), "{e}");

        let e = err("memory 100\nwaker turbo\n");
        assert_eq!(e.line, 2);
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
    fn missing_file_is_a_clear_error() {
        let e = Config::load(Path::new("/nonexistent/usm.cfg")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/usm.cfg:0: cannot read"),
            "{e}"
        );
    }
}
