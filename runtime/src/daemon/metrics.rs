//! Prometheus text exposition (`metrics ADDR:PORT` in the config), built with
//! `prometheus-client` from the same [`DaemonStat`] snapshot `usm stat` prints, so the
//! two always agree. Each scrape takes one snapshot and encodes it.
//!
//! Scrapers are served like stat clients (see [`super::control`]): a thread each, at
//! most `MAX_CLIENTS` at once, one deadline for the whole exchange, never joined.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Shared;
use super::control::{CLIENT_DEADLINE, spawn_client, write_by};
use super::stats::{DaemonStat, ProcessStat};

type Labels = Vec<(String, String)>;

/// Renders a snapshot in the Prometheus text format.
pub(crate) fn render(stat: &DaemonStat) -> String {
    let mut reg = Registry::with_prefix("usm");
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
    let lat = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for p in &stat.processes {
        for (q, v) in [("0.5", p.latency.p50_us), ("0.99", p.latency.p99_us)] {
            let mut l = labels(p);
            l.push(("quantile".into(), q.into()));
            lat.get_or_create(&l).set(v);
        }
    }
    reg.register(
        "process_fault_latency_us",
        "Fault latency percentiles (µs)",
        lat,
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
            render(&sh.stat()),
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
