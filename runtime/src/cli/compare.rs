//! `usm compare -- CMD`: one program under USM and under the kernel, same budget, same
//! swap medium, one line of ratios.
//!
//! # The two sides
//! - **usm**: `usm exec --pool P --report json -- CMD` (this binary, a private daemon, the
//!   tagger), run inside an accounting-only memory cgroup (no limit) so its peak memory is
//!   USM's whole footprint: the program plus the daemon and its pool.
//! - **kernel**: CMD alone in a memory cgroup limited to P (v1 `memory.limit_in_bytes`, or
//!   v2 `memory.max` when `/sys/fs/cgroup` is cgroup2 — detected), with kernel swap on a
//!   fresh swap file in the directory where USM puts its private swap file (`USM_SWAP_DIR`,
//!   default `/var/tmp`: the same filesystem), the same size, `swapon`'d at priority 1000
//!   for this run only. (With `--config` naming swap devices, USM uses those; the kernel's
//!   swap file still goes to that directory.)
//!
//! # What is compared (USM / kernel, medians over `--runs`)
//! - wall time: the program's own run, start to exit (USM: `wall_s` of `usm exec`'s
//!   report, which leaves out the daemon's start-up); below 1 is faster;
//! - throughput: the program's own figure, if it prints one (see [`Throughput`]); above 1
//!   is faster;
//! - major faults: faults that waited for the swap device — the kernel side's cgroup
//!   `pgmajfault`, USM's swap-ins (the daemon reads its swap with direct I/O, which the
//!   kernel's fault counters never see; the USM side's cgroup `pgmajfault` is in the JSON
//!   as `cgroup_major_faults`);
//! - peak memory: the peak of each side's cgroup (kernel: the program, at most the budget;
//!   USM: the program plus the daemon).
//!
//! # Order and clean-up
//! With `--runs N` the sides interleave K,U,U,K,K,U… so a drift of the machine hits both.
//! Everything the kernel side changes is a [`usm_runtime::baseline`] guard: undone when the
//! run ends, on an error, on SIGINT/SIGTERM/SIGHUP (a watcher thread undoes every guard —
//! the groups' tasks get SIGTERM, then SIGKILL — and re-raises the signal), and after a
//! SIGKILL by the next `usm compare` (journal in `/run/usm-baseline`).
//!
//! The program's stdout and stderr go to this command's stderr (and are scanned for its
//! throughput); the report alone goes to stdout, so `--report json | jq` works.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use usm_runtime::baseline::{self, MemCgroup, SwapFile};
use usm_runtime::config::parse_size;
use usm_runtime::daemon::DaemonOptions;

use super::ReportFormat;

/// Priority of the kernel side's swap file: above any swap another job may have on.
const KERNEL_SWAP_PRIORITY: i16 = 1000;
/// The output kept per stream for the throughput search (the tail).
const KEEP_OUTPUT_BYTES: usize = 4 << 20;

/// Arguments of `usm compare`.
#[derive(Debug, clap::Args)]
pub(crate) struct CompareArgs {
    /// The memory budget: USM's pool and the kernel side's cgroup limit (pages, or a size:
    /// 32M, 2G).
    #[arg(long)]
    pool: String,
    /// Runs per side; the sides interleave (K,U,U,K,K,U,…) and the report gives medians
    /// and every run.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Allocation policy for the program under USM (first-fit, fhp:64K, ...).
    #[arg(long)]
    policy: Option<String>,
    /// Config file for USM's private daemon, as `usm exec --config`: e.g. to manage a
    /// server a wrapper script starts (`process redis-server first-fit`); `--pool` wins
    /// over its `memory` line.
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
    /// Worker threads of USM's private daemon.
    #[arg(long)]
    workers: Option<usize>,
    /// Swap size of both sides (default: 8 × the pool, at least 256M; the kernel side's
    /// file is written out in full).
    #[arg(long)]
    swap_size: Option<String>,
    /// How to find the program's throughput in its output: a regex whose first group (or
    /// whole match) is the number; the last match counts. Default: the last number
    /// followed by ops/s, op/s, req/s, "requests per second", or KB/s, MB/s, GB/s (and
    /// KiB/s, MiB/s, GiB/s).
    #[arg(long)]
    throughput_regex: Option<String>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value = "human")]
    report: ReportFormat,
    /// The program and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Which side a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Kernel,
    Usm,
}

/// The side order of `runs` interleaved runs: K,U,U,K,K,U,…
fn interleaved(runs: usize) -> Vec<Side> {
    (0..runs)
        .flat_map(|i| {
            if i % 2 == 0 {
                [Side::Kernel, Side::Usm]
            } else {
                [Side::Usm, Side::Kernel]
            }
        })
        .collect()
}

/// The convention for a program's own throughput figure.
#[derive(Debug)]
pub(crate) struct Throughput {
    re: regex::Regex,
    custom: bool,
}

/// The default: a number, then a rate unit (group 1 the number, group 2 the unit).
const DEFAULT_THROUGHPUT: &str = r"(?i)([0-9][0-9,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\s*(ops/s(?:ec)?|op/s|req/s|requests per second|[kmg]i?b/s)";

impl Throughput {
    /// The default convention, or `custom` (checked: it must compile).
    pub(crate) fn new(custom: Option<&str>) -> Result<Self, String> {
        let (src, is_custom) = match custom {
            Some(s) => (s, true),
            None => (DEFAULT_THROUGHPUT, false),
        };
        let re = regex::Regex::new(src).map_err(|e| format!("--throughput-regex: {e}"))?;
        Ok(Self {
            re,
            custom: is_custom,
        })
    }

    /// The last figure in `text`, with its unit (the default convention's unit, else
    /// `None`).
    pub(crate) fn find(&self, text: &str) -> Option<(f64, Option<String>)> {
        self.re
            .captures_iter(text)
            .filter_map(|c| {
                let num = c.get(1).or_else(|| c.get(0))?.as_str().replace(',', "");
                let value: f64 = num.trim().parse().ok()?;
                let unit = (!self.custom)
                    .then(|| c.get(2).map(|u| u.as_str().to_owned()))
                    .flatten();
                Some((value, unit))
            })
            .last()
    }
}

/// One run of one side.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    side: Side,
    /// 0-based position of this run among its side's runs.
    run: usize,
    exit_code: i32,
    wall_s: f64,
    throughput: Option<f64>,
    throughput_unit: Option<String>,
    /// Kernel: the cgroup's `pgmajfault`; USM: the daemon's swap-ins.
    major_faults: u64,
    /// The cgroup's peak (bytes).
    peak_bytes: u64,
    /// The cgroup's `pgmajfault` (on the USM side it does not see USM's swap-ins).
    cgroup_major_faults: u64,
    /// The kernel side's swap in use at the end of the run; `usm exec`'s report for USM.
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_swap_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usm_exec: Option<Value>,
}

/// A failure of `usm compare` itself (the program failing is reported, not an error).
#[derive(Debug, thiserror::Error)]
enum CompareError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Baseline(#[from] baseline::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usm(String),
}

impl CompareError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CompareError::Io {
            what: what.into(),
            source,
        }
    }
}

/// `usm compare`.
pub(crate) fn compare(a: &CompareArgs) -> ExitCode {
    match compare_inner(a) {
        Ok(all_ok) => {
            if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e @ CompareError::Usage(_)) => {
            eprintln!("usm: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            // An error a signal caused: let its cleanup finish (it ends the process).
            baseline::wait_for_signal_cleanup();
            eprintln!("usm compare: {e}");
            ExitCode::from(1)
        }
    }
}

/// The budget in bytes, read as `usm exec --pool` reads it.
fn budget_bytes(pool: &str) -> Result<u64, CompareError> {
    let pages: u64 = if !pool.is_empty() && pool.bytes().all(|b| b.is_ascii_digit()) {
        pool.parse()
            .map_err(|_| CompareError::Usage(format!("bad --pool {pool}")))?
    } else {
        parse_size(pool, "memory")
            .map_err(|e| CompareError::Usage(format!("--pool: {e}")))?
            .div_ceil(4096)
    };
    if pages == 0 {
        return Err(CompareError::Usage(
            "--pool: the budget cannot be empty".into(),
        ));
    }
    Ok(pages * 4096)
}

fn compare_inner(a: &CompareArgs) -> Result<bool, CompareError> {
    if a.runs == 0 {
        return Err(CompareError::Usage("--runs must be at least 1".into()));
    }
    let budget = budget_bytes(&a.pool)?;
    let swap_bytes = match &a.swap_size {
        Some(s) => parse_size(s, "swap-size")
            .map_err(|e| CompareError::Usage(format!("--swap-size: {e}")))?,
        None => (budget * 8).max(256 << 20),
    };
    let throughput = Throughput::new(a.throughput_regex.as_deref()).map_err(CompareError::Usage)?;
    let Some(program) = super::resolve_program(&a.command[0]) else {
        return Err(CompareError::Usage(format!(
            "{}: command not found",
            a.command[0]
        )));
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(CompareError::Usm(
            "usm compare needs root: it makes a memory cgroup and turns kernel swap on".into(),
        ));
    }
    let usm = std::env::current_exe().map_err(|e| CompareError::io("current_exe", e))?;
    let swap_dir = DaemonOptions::default().temp_swap_dir;
    // Signals are handled (cleanup, then re-raise) from the start, and a killed compare's
    // leftovers go first.
    baseline::ensure_signal_watcher()?;
    let cleaned = baseline::cleanup::cleanup_leftovers(std::slice::from_ref(&swap_dir))?;
    for u in &cleaned.undone {
        eprintln!("usm compare: cleaned up after a killed run: {u}");
    }
    let (cg_version, _) = baseline::cgroup_base_dir()?;
    eprintln!(
        "usm compare: budget {} MiB, swap {} MiB in {} (both sides), cgroup {:?}, {} run(s) per side",
        budget >> 20,
        swap_bytes >> 20,
        swap_dir.display(),
        cg_version,
        a.runs
    );

    let order = interleaved(a.runs);
    let mut kernel_runs = Vec::new();
    let mut usm_runs = Vec::new();
    for side in &order {
        match side {
            Side::Kernel => {
                let r = run_kernel(
                    &program,
                    &a.command[1..],
                    budget,
                    swap_bytes,
                    &swap_dir,
                    &throughput,
                    kernel_runs.len(),
                )?;
                kernel_runs.push(r);
            }
            Side::Usm => {
                let r = run_usm(&usm, a, &throughput, usm_runs.len(), swap_bytes)?;
                usm_runs.push(r);
            }
        }
    }

    let k = Medians::of(&kernel_runs);
    let u = Medians::of(&usm_runs);
    let ratios = Ratios::of(&u, &k);
    let unit = kernel_runs
        .iter()
        .chain(&usm_runs)
        .find_map(|r| r.throughput_unit.clone());
    let all_ok = kernel_runs
        .iter()
        .chain(&usm_runs)
        .all(|r| r.exit_code == 0);
    if !all_ok {
        eprintln!(
            "usm compare: warning: the program did not exit 0 in every run (exit codes in the JSON report)"
        );
    }
    for r in &usm_runs {
        if r.usm_exec
            .as_ref()
            .and_then(|v| v.get("managed"))
            .and_then(Value::as_bool)
            == Some(false)
        {
            eprintln!(
                "usm compare: warning: USM did not manage the program in run {} (see the tagger's warning): its figures are the kernel's",
                r.run
            );
        }
    }
    let mut out = std::io::stdout().lock();
    match a.report {
        ReportFormat::Human => {
            let _ = writeln!(out, "{}", human_line(a.runs, &ratios, &k, unit.as_deref()));
        }
        ReportFormat::Json => {
            let report = json!({
                "command": a.command,
                "budget_bytes": budget,
                "swap_bytes": swap_bytes,
                "swap_dir": swap_dir,
                "cgroup_version": format!("{cg_version:?}"),
                "runs_per_side": a.runs,
                "order": order,
                "throughput_unit": unit,
                "ratios_usm_vs_kernel": ratios,
                "kernel": { "median": k, "runs": kernel_runs },
                "usm": { "median": u, "runs": usm_runs },
                "all_exit_zero": all_ok,
            });
            let _ = writeln!(out, "{report}");
        }
    }
    Ok(all_ok)
}

/// Medians of one side's runs.
#[derive(Debug, Clone, Serialize)]
struct Medians {
    wall_s: f64,
    throughput: Option<f64>,
    major_faults: f64,
    peak_bytes: f64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Medians {
    fn of(runs: &[RunResult]) -> Self {
        let m = |f: fn(&RunResult) -> f64| median(runs.iter().map(f).collect()).unwrap_or(0.0);
        // A throughput only when every run reported one.
        let tp: Option<Vec<f64>> = runs.iter().map(|r| r.throughput).collect();
        Self {
            wall_s: m(|r| r.wall_s),
            throughput: tp.and_then(median),
            major_faults: m(|r| r.major_faults as f64),
            peak_bytes: m(|r| r.peak_bytes as f64),
        }
    }
}

/// USM / kernel of the medians (`None` when the kernel's figure is 0 or absent).
#[derive(Debug, Clone, Serialize)]
struct Ratios {
    wall_time: Option<f64>,
    throughput: Option<f64>,
    major_faults: Option<f64>,
    peak_memory: Option<f64>,
}

fn ratio(u: f64, k: f64) -> Option<f64> {
    (k > 0.0 && u.is_finite() && k.is_finite()).then(|| u / k)
}

impl Ratios {
    fn of(u: &Medians, k: &Medians) -> Self {
        Self {
            wall_time: ratio(u.wall_s, k.wall_s),
            throughput: u
                .throughput
                .zip(k.throughput)
                .and_then(|(u, k)| ratio(u, k)),
            major_faults: ratio(u.major_faults, k.major_faults),
            peak_memory: ratio(u.peak_bytes, k.peak_bytes),
        }
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}×"))
}

/// The one line: ratios with the kernel's absolute figures.
fn human_line(runs: usize, r: &Ratios, k: &Medians, unit: Option<&str>) -> String {
    let what = if runs == 1 {
        "1 run".to_owned()
    } else {
        format!("median of {runs} runs")
    };
    let tp = match k.throughput {
        Some(t) => format!(
            "throughput {} (kernel {t:.1} {}, above 1 is faster)",
            fmt_ratio(r.throughput),
            unit.unwrap_or("by --throughput-regex")
        ),
        None => "throughput n/a (no figure in the program's output)".to_owned(),
    };
    format!(
        "usm/kernel ({what}): wall time {} (kernel {:.3} s, below 1 is faster), {tp}, major faults {} (kernel {:.0}), peak memory {} (kernel {:.1} MiB)",
        fmt_ratio(r.wall_time),
        k.wall_s,
        fmt_ratio(r.major_faults),
        k.major_faults,
        fmt_ratio(r.peak_memory),
        k.peak_bytes / f64::from(1u32 << 20),
    )
}

/// Output of one side's child: its exit code and the text it printed.
struct ChildOutput {
    exit_code: i32,
    wall: Duration,
    /// Program output (both streams), minus `usm exec`'s own report line.
    text: String,
    /// `usm exec`'s report line, when the child was `usm exec`.
    exec_report: Option<Value>,
}

/// Forwards a child's stream to our stderr line by line and keeps its tail.
fn pump(stream: impl Read + Send + 'static) -> std::thread::JoinHandle<VecDeque<String>> {
    std::thread::spawn(move || {
        let mut kept: VecDeque<String> = VecDeque::new();
        let mut kept_bytes = 0usize;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let is_report = line.starts_with('{')
                && serde_json::from_str::<Value>(&line)
                    .ok()
                    .is_some_and(|v| v.get("wall_s").is_some() && v.get("managed").is_some());
            if !is_report {
                eprintln!("{line}");
            }
            kept_bytes += line.len() + 1;
            kept.push_back(line);
            while kept_bytes > KEEP_OUTPUT_BYTES && kept.len() > 1 {
                kept_bytes -= kept.pop_front().map_or(0, |l| l.len() + 1);
            }
        }
        kept
    })
}

/// Spawns `cmd` with piped output, waits, and collects.
fn run_child(mut cmd: Command, what: &str) -> Result<ChildOutput, CompareError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| CompareError::io(format!("cannot run {what}"), e))?;
    let out = child.stdout.take().map(pump);
    let err = child.stderr.take().map(pump);
    let status = child
        .wait()
        .map_err(|e| CompareError::io(format!("waiting for {what}"), e))?;
    let wall = started.elapsed();
    let mut lines = Vec::new();
    for h in [out, err].into_iter().flatten() {
        lines.extend(h.join().unwrap_or_default());
    }
    let mut exec_report = None;
    lines.retain(|l| {
        if l.starts_with('{') {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                if v.get("wall_s").is_some() && v.get("managed").is_some() {
                    exec_report = Some(v);
                    return false;
                }
            }
        }
        true
    });
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ChildOutput {
        exit_code,
        wall,
        text: lines.join("\n"),
        exec_report,
    })
}

fn run_kernel(
    program: &Path,
    args: &[String],
    budget: u64,
    swap_bytes: u64,
    swap_dir: &Path,
    throughput: &Throughput,
    run: usize,
) -> Result<RunResult, CompareError> {
    // Swap first, then the group: undone in the reverse order (the group's tasks are gone
    // before its swap is turned off).
    let swap = SwapFile::create(swap_dir, swap_bytes, KERNEL_SWAP_PRIORITY)?;
    let cg = MemCgroup::create("compare-kernel", budget)?;
    let mut cmd = cg.command(program);
    cmd.args(args);
    let out = run_child(cmd, &program.display().to_string())?;
    let stats = cg.stats()?;
    let swap_used = swap.used_bytes();
    cg.remove()?;
    swap.remove()?;
    let tp = throughput.find(&out.text);
    Ok(RunResult {
        side: Side::Kernel,
        run,
        exit_code: out.exit_code,
        wall_s: out.wall.as_secs_f64(),
        throughput: tp.as_ref().map(|t| t.0),
        throughput_unit: tp.and_then(|t| t.1),
        major_faults: stats.major_faults,
        peak_bytes: stats.peak_bytes,
        cgroup_major_faults: stats.major_faults,
        kernel_swap_used_bytes: Some(swap_used),
        usm_exec: None,
    })
}

fn run_usm(
    usm: &Path,
    a: &CompareArgs,
    throughput: &Throughput,
    run: usize,
    swap_bytes: u64,
) -> Result<RunResult, CompareError> {
    // Accounting only: no limit, but the group's peak is USM's footprint and a signal
    // reaches every process of the side.
    let cg = MemCgroup::create("compare-usm", u64::MAX)?;
    let mut cmd = cg.command(usm);
    cmd.args(["exec", "--report", "json", "--pool", &a.pool]);
    if let Some(p) = &a.policy {
        cmd.args(["--policy", p]);
    }
    if let Some(c) = &a.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(w) = a.workers {
        cmd.args(["--workers", &w.to_string()]);
    }
    // The same swap size as the kernel side's (whose file must be written out in full:
    // the kernel takes no sparse swap file), not `usm exec`'s larger sparse default.
    cmd.args(["--swap-size", &swap_bytes.to_string()]);
    cmd.arg("--").args(&a.command);
    let out = run_child(cmd, "usm exec")?;
    let stats = cg.stats()?;
    cg.remove()?;
    let Some(report) = out.exec_report else {
        return Err(CompareError::Usm(format!(
            "usm exec ended with {} without its report (see its messages above)",
            out.exit_code
        )));
    };
    let field = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0);
    let tp = throughput.find(&out.text);
    Ok(RunResult {
        side: Side::Usm,
        run,
        exit_code: report
            .get("exit_code")
            .and_then(Value::as_i64)
            .map_or(out.exit_code, |c| c as i32),
        wall_s: report
            .get("wall_s")
            .and_then(Value::as_f64)
            .unwrap_or(out.wall.as_secs_f64()),
        throughput: tp.as_ref().map(|t| t.0),
        throughput_unit: tp.and_then(|t| t.1),
        major_faults: field("swapins"),
        peak_bytes: stats.peak_bytes,
        cgroup_major_faults: stats.major_faults,
        kernel_swap_used_bytes: None,
        usm_exec: Some(report),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_interleave_k_u_u_k() {
        use Side::{Kernel as K, Usm as U};
        assert_eq!(interleaved(1), vec![K, U]);
        assert_eq!(interleaved(3), vec![K, U, U, K, K, U]);
    }

    #[test]
    fn default_throughput_is_the_last_rate() {
        let t = Throughput::new(None).unwrap();
        let text = "warm-up 10 ops/s\nSET: 12,345.67 requests per second\nGET: 23456.5 requests per second\ndone";
        assert_eq!(
            t.find(text),
            Some((23456.5, Some("requests per second".to_owned())))
        );
        assert_eq!(
            t.find("copied 812.5MB/s"),
            Some((812.5, Some("MB/s".into())))
        );
        assert_eq!(t.find("no figure here: 42 pages"), None);
    }

    #[test]
    fn custom_throughput_regex_uses_its_first_group() {
        let t = Throughput::new(Some(r"Completed: \S+ in \S+ ([0-9.]+)MB/s")).unwrap();
        let text = "Stats: Completed: 4032.00M in 5.00s 806.15MB/s, with 0 hardware incidents\nStats: Disk: 0.00M at 0.00MB/s";
        assert_eq!(t.find(text), Some((806.15, None)));
        assert!(Throughput::new(Some("(unclosed")).is_err());
    }

    #[test]
    fn ratios_of_medians_and_zero_denominators() {
        let k = Medians {
            wall_s: 2.0,
            throughput: Some(100.0),
            major_faults: 0.0,
            peak_bytes: 4.0,
        };
        let u = Medians {
            wall_s: 3.0,
            throughput: Some(50.0),
            major_faults: 7.0,
            peak_bytes: 8.0,
        };
        let r = Ratios::of(&u, &k);
        assert_eq!(r.wall_time, Some(1.5));
        assert_eq!(r.throughput, Some(0.5));
        assert_eq!(r.major_faults, None);
        assert_eq!(r.peak_memory, Some(2.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(budget_bytes("32M").unwrap(), 32 << 20);
        assert_eq!(budget_bytes("8").unwrap(), 8 * 4096);
        assert!(budget_bytes("0").is_err());
        assert!(budget_bytes("lots").is_err());
    }
}
