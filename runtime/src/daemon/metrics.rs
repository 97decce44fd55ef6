//! Prometheus text exposition (`metrics ADDR:PORT` in the config, `usm exec --metrics`),
//! built with `prometheus-client` from the same [`DaemonStat`] snapshot `usm stat`
//! prints, so the two always agree. Each scrape takes one snapshot and encodes it.
//!
//! # What is exported (prefix `usm_`)
//! - `build_info{version,commit} 1`;
//! - daemon-wide counters over every process since start, ended ones included
//!   (`faults_total`, `evictions_total`, `swapins_total`, ...: they never go down);
//! - the fault latency as a histogram in seconds, daemon-wide
//!   (`fault_latency_seconds`) and per process (`process_fault_latency_seconds`), its
//!   buckets counted from the daemon's own hdrhistograms at the scrape (a histogram
//!   rebuilt per scrape, encoded as prometheus-client's `Histogram` is, so the fault path
//!   records each latency once, into the hdrhistogram);
//! - gauges of the pool, swap and processes, and per-process counters and gauges
//!   labelled `pid`, `name`, `policy`.
//!
//! Scrapers are served like stat clients (see [`super::control`]): a thread each, at
//! most `MAX_CLIENTS` at once, one deadline for the whole exchange, never joined.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::Shared;
use super::control::{CLIENT_DEADLINE, spawn_client, write_by};
use super::stats::{DaemonStat, ProcessStat};

type Labels = Vec<(String, String)>;

pub use super::{commit, version};

/// Upper bounds (seconds) of the latency histograms' buckets: 1 µs to 1 s, then +Inf.
const LATENCY_BOUNDS_S: [f64; 17] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5,
    1.0,
];

/// What a Prometheus histogram encodes: sum (s), count, and per-bucket counts (upper
/// bound in s, count in that bucket alone).
type Encoded = (f64, u64, Vec<(f64, u64)>);

/// A latency histogram (seconds) taken from an hdrhistogram of nanoseconds at the scrape,
/// encoded as a Prometheus histogram.
#[derive(Debug, Default)]
struct LatencyHistogram {
    inner: Mutex<Encoded>,
}

impl LatencyHistogram {
    fn of(h: Option<&Histogram<u64>>) -> LatencyHistogram {
        let m = LatencyHistogram::default();
        if let Some(h) = h {
            m.set(h);
        }
        m
    }

    fn set(&self, h: &Histogram<u64>) {
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_S.len() + 1);
        let mut below = 0u64;
        for le in LATENCY_BOUNDS_S {
            let upto = if h.is_empty() {
                0
            } else {
                h.count_between(0, (le * 1e9) as u64)
            };
            buckets.push((le, upto.saturating_sub(below)));
            below = below.max(upto);
        }
        buckets.push((f64::INFINITY, h.len().saturating_sub(below)));
        let sum = if h.is_empty() {
            0.0
        } else {
            h.mean() * h.len() as f64 / 1e9
        };
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = (sum, h.len(), buckets);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (sum, count, ref buckets) = *g;
        if buckets.is_empty() {
            let empty: Vec<(f64, u64)> = LATENCY_BOUNDS_S
                .iter()
                .map(|&b| (b, 0))
                .chain([(f64::INFINITY, 0)])
                .collect();
            return encoder.encode_histogram::<NoLabelSet>(0.0, 0, &empty, None);
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The hdrhistograms a scrape encodes: the daemon's, and each live process's by pid.
pub(crate) struct LatencySources {
    pub(crate) daemon: Option<Histogram<u64>>,
    pub(crate) processes: Vec<(u32, String, Option<Histogram<u64>>)>,
}

/// Renders a snapshot in the Prometheus text format (latency histograms from `lat`).
pub(crate) fn render(stat: &DaemonStat, lat: &LatencySources) -> String {
    let mut reg = Registry::with_prefix("usm");
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![
        ("version".into(), env!("CARGO_PKG_VERSION").into()),
        ("commit".into(), commit().into()),
    ])
    .set(1);
    reg.register("build_info", "usm version and commit (value 1)", info);
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        reg.register(name, help, g);
    };
    gauge(
        &mut reg,
        "pool_pages",
        "Pool size in 4 KiB pages",
        stat.pool_pages,
    );
    gauge(
        &mut reg,
        "frames_used",
        "Frames charged to managed processes",
        stat.frames_used,
    );
    gauge(
        &mut reg,
        "swap_slots_used",
        "Swap slots in use",
        stat.slots_used,
    );
    gauge(
        &mut reg,
        "swap_slots",
        "Swap slots in all devices",
        stat.slots_total,
    );
    gauge(
        &mut reg,
        "workers",
        "Worker threads (LocalManagers)",
        stat.workers as u64,
    );
    gauge(
        &mut reg,
        "processes",
        "Managed processes",
        stat.processes.len() as u64,
    );
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    counter(&mut reg, "admitted", "Processes admitted", stat.admitted);
    let t = &stat.totals;
    for (name, help, v) in [
        (
            "faults",
            "Faults served, every process since start",
            t.faults,
        ),
        ("zero_fills", "Pages filled with zeros", t.zero_fills),
        (
            "fhp_pages",
            "Pages mapped by flexible huge pages",
            t.fhp_pages,
        ),
        ("evictions", "Pages evicted", t.evictions),
        ("swapins", "Pages brought back from swap", t.swapins),
        (
            "evict_skipped",
            "Eviction candidates the agent could not move",
            t.evict_skipped,
        ),
        ("poisoned", "Pages poisoned (unreadable swap)", t.poisoned),
        ("policy_panics", "Policy panics caught", t.policy_panics),
        ("forks", "fork events", t.forks),
        (
            "released_frames",
            "Frames given back by munmap, madvise and exit",
            t.released_frames,
        ),
        ("hints", "Hints received", t.hints),
        (
            "processes_ended",
            "Managed processes that ended",
            t.processes_ended,
        ),
    ] {
        counter(&mut reg, name, help, v);
    }
    reg.register(
        "fault_latency_seconds",
        "Fault latency (fault read to page installed), every process since start",
        LatencyHistogram::of(lat.daemon.as_ref()),
    );
    let per_proc = Family::<Labels, LatencyHistogram>::default();
    for p in &stat.processes {
        if let Some((_, _, Some(h))) = lat
            .processes
            .iter()
            .find(|(pid, name, _)| *pid == p.pid && *name == p.name)
        {
            per_proc.get_or_create(&labels(p)).set(h);
        }
    }
    reg.register(
        "process_fault_latency_seconds",
        "Fault latency of each managed process",
        per_proc,
    );
    counter(&mut reg, "refused", "Taggers refused", stat.refused);
    counter(
        &mut reg,
        "bad_messages",
        "Malformed session messages refused",
        stat.bad_messages,
    );

    let per = |reg: &mut Registry,
               name: &str,
               help: &str,
               f: &dyn Fn(&ProcessStat) -> u64,
               is_counter: bool| {
        if is_counter {
            let fam = Family::<Labels, Counter>::default();
            for p in &stat.processes {
                fam.get_or_create(&labels(p)).inc_by(f(p));
            }
            reg.register(name, help, fam);
        } else {
            let fam = Family::<Labels, Gauge>::default();
            for p in &stat.processes {
                fam.get_or_create(&labels(p))
                    .set(i64::try_from(f(p)).unwrap_or(i64::MAX));
            }
            reg.register(name, help, fam);
        }
    };
    per(
        &mut reg,
        "process_resident_pages",
        "Resident pages mapped by the daemon",
        &|p| p.resident_pages,
        false,
    );
    per(
        &mut reg,
        "process_swapped_pages",
        "Pages out of the program (swap)",
        &|p| p.swapped_pages,
        false,
    );
    per(
        &mut reg,
        "process_faults",
        "Faults served",
        &|p| p.faults,
        true,
    );
    per(
        &mut reg,
        "process_swapins",
        "Pages swapped in",
        &|p| p.swapins,
        true,
    );
    per(
        &mut reg,
        "process_evictions",
        "Pages evicted",
        &|p| p.evictions,
        true,
    );
    per(
        &mut reg,
        "process_fhp_pages",
        "Pages mapped by flexible huge pages",
        &|p| p.fhp_pages,
        true,
    );
    per(
        &mut reg,
        "process_poisoned",
        "Pages poisoned (unreadable swap)",
        &|p| p.poisoned,
        true,
    );
    let quantiles = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for p in &stat.processes {
        for (q, v) in [("0.5", p.latency.p50_us), ("0.99", p.latency.p99_us)] {
            let mut l = labels(p);
            l.push(("quantile".into(), q.into()));
            quantiles.get_or_create(&l).set(v);
        }
    }
    reg.register(
        "process_fault_latency_us",
        "Fault latency percentiles (µs; see process_fault_latency_seconds)",
        quantiles,
    );
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

fn labels(p: &ProcessStat) -> Labels {
    vec![
        ("pid".into(), p.pid.to_string()),
        ("name".into(), p.name.clone()),
        ("policy".into(), p.policy.clone()),
    ]
}

pub(crate) fn serve(sh: &Arc<Shared>, l: &TcpListener, stop: &AtomicBool) {
    if l.set_nonblocking(true).is_err() {
        return;
    }
    let clients = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                let (sh, clients) = (sh.clone(), clients.clone());
                spawn_client("usm-metrics-client", &clients, move || {
                    let _ = answer(&sh, s);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn answer(sh: &Shared, mut s: TcpStream) -> std::io::Result<()> {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(CLIENT_DEADLINE))?;
    let mut req = [0u8; 2048];
    let n = s.read(&mut req)?;
    let head = String::from_utf8_lossy(&req[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, body, ctype) = if path == "/metrics" || path == "/" {
        (
            "200 OK",
            {
                let stat = sh.stat();
                render(&stat, &sh.latency_sources())
            },
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        ("404 Not Found", "try /metrics\n".to_owned(), "text/plain")
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let w = s.try_clone()?;
    write_by(
        &mut s,
        |t| w.set_write_timeout(Some(t)),
        reply.as_bytes(),
        deadline,
    )
}
