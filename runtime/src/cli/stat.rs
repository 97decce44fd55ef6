//! `usm stat`: one snapshot, or a live view (`--watch`), of a running daemon — found by
//! its socket, or by the pid of a program it serves (`--pid`) — and the line `usm exec`
//! prints about its private daemon at start.
//!
//! # Finding the daemon of a pid
//! 1. The program's own environment: `usm exec` (and whoever starts a tagged program)
//!    sets `USM_SOCKET`; `/proc/PID/environ` names the socket. It is believed only if
//!    that daemon answers and lists the pid.
//! 2. Otherwise every daemon this user can ask ([`daemon::daemon_sockets`]: the system
//!    daemon and each live private one) is asked in turn; the first that serves the pid
//!    (a live or ended process, or the daemon's own pid — a `usm exec`) is the one.
//!
//! # The live view
//! Every counter of a snapshot is cumulative; the view subtracts the previous snapshot
//! for per-interval rates (faults/s, evictions/s, swap-ins/s) and per-interval fault
//! latency percentiles (the snapshots' histograms subtracted bucket by bucket, see
//! [`LatencyBuckets`](usm_runtime::daemon::LatencyBuckets)). Sizes are in MiB. Processes that ended stay, one summary line
//! each. `--json` prints each snapshot as one JSON line with its time, plus an
//! `interval` object once there is a previous snapshot.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use usm_runtime::daemon::{self, DaemonStat, ProcessStat};

/// Bytes per page.
const PAGE: f64 = 4096.0;

fn mib_of_pages(pages: u64) -> f64 {
    pages as f64 * PAGE / f64::from(1u32 << 20)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// Where `usm stat` asks.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// The system daemon, or else the only daemon this user can ask (a lone `usm exec`).
    Default,
    /// The daemon on this taggers' socket.
    Socket(PathBuf),
    /// The daemon serving this pid.
    Pid(u32),
}

/// Whether `s` serves `pid` (live, ended, a fork child of it, or the daemon itself).
fn serves(s: &DaemonStat, pid: u32) -> bool {
    s.pid == pid
        || s.processes
            .iter()
            .chain(&s.ended)
            .any(|p| p.pid == pid || (p.pid == 0 && p.parent == Some(pid)))
}

/// The socket named by `USM_SOCKET` in `/proc/PID/environ`.
fn socket_in_environment(pid: u32) -> Option<PathBuf> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{}=", usm_proto::SOCKET_ENV);
    env.split(|&b| b == 0).find_map(|kv| {
        kv.strip_prefix(key.as_bytes()).map(|v| {
            use std::os::unix::ffi::OsStrExt;
            PathBuf::from(std::ffi::OsStr::from_bytes(v))
        })
    })
}

/// The taggers' socket of the daemon serving `pid` (see the module docs), or why none.
pub(crate) fn find_daemon_of(pid: u32) -> Result<PathBuf, String> {
    if !Path::new("/proc").join(pid.to_string()).exists() {
        return Err(format!("no process {pid}"));
    }
    let mut asked = Vec::new();
    let mut candidates: Vec<PathBuf> = socket_in_environment(pid).into_iter().collect();
    candidates.extend(daemon::daemon_sockets());
    for sock in candidates {
        if asked.contains(&sock) {
            continue;
        }
        if let Ok(s) = daemon::query_stat(&sock)
            && serves(&s, pid)
        {
            return Ok(sock);
        }
        asked.push(sock);
    }
    Err(if asked.is_empty() {
        format!("pid {pid}: no USM daemon of this user is running")
    } else {
        format!(
            "pid {pid} is not served by any USM daemon this user can ask (asked {})",
            asked
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The system daemon's socket if it answers, else the one daemon of this user that does;
/// several: an error listing them (choose with `--pid` or `--socket`).
fn default_daemon() -> Result<PathBuf, String> {
    let system = PathBuf::from(usm_runtime::config::DEFAULT_SOCKET);
    if daemon::query_stat(&system).is_ok() {
        return Ok(system);
    }
    let mut live: Vec<(PathBuf, u32)> = daemon::daemon_sockets()
        .into_iter()
        .filter_map(|s| daemon::query_stat(&s).ok().map(|st| (s, st.pid)))
        .collect();
    match live.len() {
        0 => Err(format!(
            "no USM daemon is running (none answers at {} and no `usm exec` of this user runs)",
            system.display()
        )),
        1 => Ok(live.remove(0).0),
        _ => Err(format!(
            "{} USM daemons are running; choose one with --pid PID (a program's or the daemon's) or --socket:
{}",
            live.len(),
            live.iter()
                .map(|(s, pid)| format!("  daemon pid {pid}: --socket {}", s.display()))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    }
}

/// `2026-12-07T11:59:01.123Z` for milliseconds since the epoch (UTC, proleptic
/// Gregorian; Howard Hinnant's days-to-civil).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What changed between two snapshots of the same daemon.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Interval {
    seconds: f64,
    faults_per_s: f64,
    evictions_per_s: f64,
    swapins_per_s: f64,
    /// Faults served in the interval.
    faults: u64,
    fault_p50_us: Option<f64>,
    fault_p99_us: Option<f64>,
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    now.saturating_sub(before) as f64 / secs.max(1e-3)
}

fn interval_of(s: &DaemonStat, old: &DaemonStat, secs: f64) -> Option<Interval> {
    if s.pid != old.pid {
        return None;
    }
    let lat = s.latency_buckets.since(&old.latency_buckets);
    Some(Interval {
        seconds: secs,
        faults_per_s: rate(s.totals.faults, old.totals.faults, secs),
        evictions_per_s: rate(s.totals.evictions, old.totals.evictions, secs),
        swapins_per_s: rate(s.totals.swapins, old.totals.swapins, secs),
        faults: s.totals.faults.saturating_sub(old.totals.faults),
        fault_p50_us: lat.quantile_us(0.5),
        fault_p99_us: lat.quantile_us(0.99),
    })
}

/// One snapshot as a JSON line: the snapshot, its time, and the interval's rates.
fn json_line(s: &DaemonStat, interval: Option<Interval>) -> String {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        let ms = if s.timestamp_ms == 0 {
            now_ms()
        } else {
            s.timestamp_ms
        };
        o.insert("timestamp_ms".into(), ms.into());
        o.insert("time".into(), utc(ms).into());
        if let Some(i) = interval {
            o.insert(
                "interval".into(),
                serde_json::to_value(i).unwrap_or_default(),
            );
        }
    }
    v.to_string()
}

/// `usm stat`.
pub(crate) fn stat(target: &Target, watch: Option<u64>, json: bool) -> ExitCode {
    let (socket, only) = match target {
        Target::Default => match default_daemon() {
            Ok(s) => (s, None),
            Err(e) => {
                eprintln!("usm: {e}");
                return ExitCode::FAILURE;
            }
        },
        Target::Socket(s) => (s.clone(), None),
        Target::Pid(pid) => match find_daemon_of(*pid) {
            Ok(s) => (s, Some(*pid)),
            Err(e) => {
                eprintln!("usm: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut prev: Option<(Instant, DaemonStat)> = None;
    // Ended processes seen during this watch, newest last.
    loop {
        let s = match daemon::query_stat(&socket) {
            Ok(s) => s,
            Err(e) => {
                if prev.is_some() {
                    // The daemon went away during a watch (a `usm exec` that finished).
                    eprintln!("usm: the daemon stopped ({e})");
                    return ExitCode::SUCCESS;
                }
                eprintln!("usm: {e}");
                return ExitCode::FAILURE;
            }
        };
        let now = Instant::now();
        let interval = prev
            .as_ref()
            .and_then(|(t, p)| interval_of(&s, p, (now - *t).as_secs_f64()));
        if json {
            println!("{}", json_line(&s, interval));
        } else {
            let mut out = String::new();
            if watch.is_some() {
                out.push_str("\x1b[2J\x1b[H");
            }
            render(
                &mut out,
                &s,
                prev.as_ref().map(|(t, p)| (now - *t, p)),
                interval,
                only,
            );
            print!("{out}");
        }
        let Some(secs) = watch else {
            return ExitCode::SUCCESS;
        };
        prev = Some((now, s));
        std::thread::sleep(Duration::from_secs(secs.max(1)));
    }
}

fn opt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// Is `p` one of the rows `--pid PID` asks for (the program and its fork children)?
fn wanted(p: &ProcessStat, only: Option<u32>, daemon_pid: u32) -> bool {
    match only {
        None => true,
        Some(pid) if pid == daemon_pid => true,
        Some(pid) => p.pid == pid || p.parent == Some(pid),
    }
}

/// The human view of one snapshot (`prev`: the previous one and how long ago).
fn render(
    out: &mut String,
    s: &DaemonStat,
    prev: Option<(Duration, &DaemonStat)>,
    interval: Option<Interval>,
    only: Option<u32>,
) {
    use std::fmt::Write;
    let ms = if s.timestamp_ms == 0 {
        now_ms()
    } else {
        s.timestamp_ms
    };
    let _ = writeln!(
        out,
        "usm daemon {} ({}) · socket {} · {}",
        s.pid,
        if s.version.is_empty() {
            "version ?"
        } else {
            &s.version
        },
        if s.socket.is_empty() { "?" } else { &s.socket },
        utc(ms)
    );
    let swap_mib = s.slots_total as f64 * PAGE / f64::from(1u32 << 20);
    let devices: Vec<String> = s
        .swap
        .iter()
        .map(|d| {
            format!(
                "{} {:.0} MiB{}",
                d.path,
                mib(d.bytes),
                if d.private { " private, sparse" } else { "" }
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "pool {:.1} / {:.1} MiB used · swap {:.1} / {:.1} MiB used ({}) · {} workers (waker {})",
        mib_of_pages(s.frames_used),
        mib_of_pages(s.pool_pages),
        mib_of_pages(s.slots_used),
        swap_mib,
        if devices.is_empty() {
            "?".to_owned()
        } else {
            devices.join(", ")
        },
        s.workers,
        s.waker
    );
    let _ = writeln!(
        out,
        "policies: alloc {} (default) · evict {} · oom {}",
        or_q(&s.alloc_policy),
        or_q(&s.evict_policy),
        or_q(&s.oom_policy)
    );
    match interval {
        Some(i) => {
            let _ = writeln!(
                out,
                "last {:.1} s: {:.0} faults/s · {:.0} evictions/s · {:.0} swap-ins/s · fault p50 {} µs, p99 {} µs",
                i.seconds,
                i.faults_per_s,
                i.evictions_per_s,
                i.swapins_per_s,
                opt_us(i.fault_p50_us),
                opt_us(i.fault_p99_us)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "since start: {} faults · {} evictions · {} swap-ins · fault p50 {:.1} µs, p99 {:.1} µs",
                s.totals.faults,
                s.totals.evictions,
                s.totals.swapins,
                s.latency.p50_us,
                s.latency.p99_us
            );
        }
    }
    let _ = writeln!(
        out,
        "{} admitted · {} refused · {} bad messages · {} in flight · {} ended",
        s.admitted, s.refused, s.bad_messages, s.faults_in_flight, s.totals.processes_ended
    );
    let _ = writeln!(
        out,
        "\n{:>8} {:<16} {:<12} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "PID",
        "NAME",
        "ALLOC",
        "RES MiB",
        "SWAP MiB",
        "FAULTS",
        "FAULT/s",
        "EVICT/s",
        "SWPIN/s",
        "P50µs",
        "P99µs"
    );
    for p in s.processes.iter().filter(|p| wanted(p, only, s.pid)) {
        let old = prev.and_then(|(dt, o)| {
            o.processes
                .iter()
                .find(|q| q.pid == p.pid && q.name == p.name)
                .map(|q| (dt, q))
        });
        let per_s = |f: fn(&ProcessStat) -> u64| -> String {
            match (prev, old) {
                (Some(_), Some((dt, q))) => {
                    format!("{:.0}", rate(f(p), f(q), dt.as_secs_f64()))
                }
                // New since the previous snapshot: everything it has is this interval's.
                (Some((dt, _)), None) => format!("{:.0}", rate(f(p), 0, dt.as_secs_f64())),
                _ => "-".into(),
            }
        };
        let (p50, p99) = match (prev, old) {
            (Some(_), Some((_, q))) => {
                let d = p.latency_buckets.since(&q.latency_buckets);
                (d.quantile_us(0.5), d.quantile_us(0.99))
            }
            (Some(_), None) => (
                p.latency_buckets.quantile_us(0.5),
                p.latency_buckets.quantile_us(0.99),
            ),
            _ => (
                (p.latency.count > 0).then_some(p.latency.p50_us),
                (p.latency.count > 0).then_some(p.latency.p99_us),
            ),
        };
        let pid = if p.pid == 0 {
            format!("({})", p.parent.unwrap_or(0))
        } else {
            p.pid.to_string()
        };
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:<12} {:>9.1} {:>9.1} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}",
            pid,
            p.name,
            p.policy,
            mib_of_pages(p.resident_pages),
            mib_of_pages(p.swapped_pages),
            p.faults,
            per_s(|p| p.faults),
            per_s(|p| p.evictions),
            per_s(|p| p.swapins),
            opt_us(p50),
            opt_us(p99)
        );
    }
    let ended: Vec<&ProcessStat> = s.ended.iter().filter(|p| wanted(p, only, s.pid)).collect();
    if !ended.is_empty() {
        const SHOWN: usize = 8;
        let _ = writeln!(
            out,
            "\nended ({} of {}, newest last):",
            ended.len().min(SHOWN),
            s.totals.processes_ended.max(ended.len() as u64)
        );
        for p in &ended[ended.len().saturating_sub(SHOWN)..] {
            let _ = writeln!(out, "  {}", ended_line(p));
        }
    }
    if let Some(pid) = only
        && pid != s.pid
        && !s.processes.iter().chain(&s.ended).any(|p| p.pid == pid)
    {
        let _ = writeln!(out, "\n(pid {pid} is not served by this daemon any more)");
    }
}

fn or_q(s: &str) -> &str {
    if s.is_empty() { "?" } else { s }
}

/// One line summing up a process that ended.
fn ended_line(p: &ProcessStat) -> String {
    let lat = if p.latency.count > 0 {
        format!(
            "p50 {:.1} µs, p99 {:.1} µs",
            p.latency.p50_us, p.latency.p99_us
        )
    } else {
        "no fault".to_owned()
    };
    format!(
        "pid {} {} (alloc {}, evict {}, oom {}): {} faults ({lat}), {} evictions, {} swap-ins, {} poisoned",
        if p.pid == 0 {
            format!("({})", p.parent.unwrap_or(0))
        } else {
            p.pid.to_string()
        },
        p.name,
        p.policy,
        or_q(&p.evict_policy),
        or_q(&p.oom_policy),
        p.faults,
        p.evictions,
        p.swapins,
        p.poisoned
    )
}

/// The line `usm run` prints on stderr once its daemon listens.
pub(crate) fn daemon_line(s: &DaemonStat, metrics: Option<std::net::SocketAddr>) -> String {
    private_daemon_line(s, metrics).replacen("usm: private daemon", "usm: daemon", 1)
}

/// The line `usm exec` prints on stderr once its private daemon listens: where it is and
/// how to look at it.
pub(crate) fn private_daemon_line(s: &DaemonStat, metrics: Option<std::net::SocketAddr>) -> String {
    let swap: Vec<String> = s
        .swap
        .iter()
        .map(|d| {
            format!(
                "{} ({:.0} MiB{})",
                d.path,
                mib(d.bytes),
                if d.private { ", sparse" } else { "" }
            )
        })
        .collect();
    let mut line = format!(
        "usm: private daemon pid {}: pool {:.0} MiB ({} pages), swap {}, socket {}; watch it with `usm stat --watch --pid {}`",
        s.pid,
        mib_of_pages(s.pool_pages),
        s.pool_pages,
        if swap.is_empty() {
            "none".to_owned()
        } else {
            swap.join(", ")
        },
        s.socket,
        s.pid
    );
    if let Some(a) = metrics {
        line.push_str(&format!("; metrics on http://{a}/metrics"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use usm_runtime::daemon::LatencyBuckets;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 12:34:56.789 UTC.
        assert_eq!(utc(951_827_696_789), "2000-02-29T12:34:56.789Z");
        assert_eq!(utc(1_796_644_800_000), "2026-12-07T12:00:00.000Z");
    }

    #[test]
    fn interval_rates_and_percentiles_come_from_differences() {
        let mut a = DaemonStat {
            pid: 7,
            ..DaemonStat::default()
        };
        a.totals.faults = 100;
        a.latency_buckets = LatencyBuckets(vec![(80, 100)]);
        let mut b = a.clone();
        b.totals.faults = 300;
        b.totals.evictions = 50;
        b.latency_buckets = LatencyBuckets(vec![(80, 100), (160, 200)]);
        let i = interval_of(&b, &a, 2.0).unwrap();
        assert_eq!(i.faults, 200);
        assert!((i.faults_per_s - 100.0).abs() < 1e-9);
        assert!((i.evictions_per_s - 25.0).abs() < 1e-9);
        // Only bucket 160 (2^20 ns ≈ 1 ms) is in the interval.
        let p50 = i.fault_p50_us.unwrap();
        assert!((1000.0..1200.0).contains(&p50), "{p50}");
        let other = DaemonStat {
            pid: 8,
            ..b.clone()
        };
        assert!(interval_of(&other, &a, 1.0).is_none(), "another daemon");
        let line = json_line(&b, Some(i));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v["timestamp_ms"].as_u64().unwrap() > 0);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["interval"]["faults"], 200);
    }
}
