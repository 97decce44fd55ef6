//! Fault latency (issue 6, benchmark 3): one 4 KiB fault served by USM's embedded runtime
//! from its frame pool, against the kernel's first-touch fault, in one run.
//!
//! ```text
//! cargo bench -p usm-bench --bench usm_fault -- [--pages N] [--runs N] [--json PATH]
//! ```
//!
//! - Kernel side: `usm_bench::fault::kernel_fault_latency` (4 KiB pages, THP off, host
//!   backing pre-warmed, one volatile write per page, each timed).
//! - USM sides (pool populated in full right after the build, before the clock; no swap,
//!   1 pinned worker):
//!   `uthread` — one uThread writes one word per page of a fresh region, each access timed
//!   (SIGBUS → park in PFQ → driver runs `first-fit`, `UFFDIO_MOVE` → resume → retry);
//!   `plain-thread` — the same from an OS thread that is not a uThread (the fault is
//!   posted to the worker and the thread waits on a futex).
//! - Timer overhead (median of back-to-back `Instant::now()`) is reported, not
//!   subtracted. One warm-up run, then `--runs` runs; the table shows the median of the
//!   runs' p50 and p99; ratios are `usm / kernel` (below 1 is faster than the kernel).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::Instant;
use usm_sync::atomic::Ordering;

use clap::Parser;
use serde_json::json;
use usm_bench::fault;
use usm_bench::report::{JsonReport, Table, fmt_f};
use usm_bench::stats::{LatencyHistogram, LatencySummary, median, ratio_vs_kernel};
use usm_bench::{Error, Result};
use usm_runtime::embedded::{InstallMode, Runtime};

const PAGE: usize = 4096;

#[derive(Parser, Debug)]
#[command(about = "Single 4 KiB fault latency: USM (pool) vs the kernel's first touch")]
struct Cli {
    /// Faults timed per run (default 20000).
    #[arg(long, default_value_t = 20_000)]
    pages: usize,
    /// Measured runs per side (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Install mode of the USM sides (`move` / `copy`; default: the runtime's default).
    #[arg(long, value_enum)]
    install: Option<InstallArg>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
enum InstallArg {
    Move,
    Copy,
}

fn main() {
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    if let Err(e) = run(&cli) {
        eprintln!("usm_fault: {e}");
        std::process::exit(1);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    UThread,
    PlainThread,
}

/// One USM run: the latency seen by the faulting code, and the part spent in the worker's
/// driver (fault seen → page installed, from the runtime's own `fast_map` histogram).
fn usm_once(
    side: Side,
    pages: usize,
    install: Option<InstallArg>,
) -> Result<(LatencySummary, u64)> {
    let emb = |e: usm_runtime::embedded::EmbeddedError| Error::Invalid(format!("embedded: {e}"));
    usm_bench::prewarm::prewarm_host((2 * pages * PAGE) as u64 + (64 << 20))?;
    let mut b = Runtime::builder();
    match install {
        Some(InstallArg::Move) => b = b.install_mode(InstallMode::Move),
        Some(InstallArg::Copy) => b = b.install_mode(InstallMode::Copy),
        None => {}
    }
    let rt = b
        .workers(1)
        .pin_workers(true)
        .pool_frames(pages + 4096)
        .build()
        .map_err(emb)?;
    // The pool populates lazily (8 MiB chunks); populate it all now so no fault below
    // waits for population and the zeroer thread is idle (not running on the other core,
    // where it would receive the MOVEs' TLB-flush IPIs). A COPY-mode pool has lazy slots:
    // nothing to populate.
    rt.populate_pool()
        .map_err(|e| Error::Invalid(format!("populating the pool: {e}")))?;
    let region = usm_sync::Arc::new(rt.region(pages * PAGE).map_err(emb)?);
    let r = region.clone();
    let touch = move || -> Result<LatencySummary> {
        let words = r.as_atomic_u64();
        let mut hist = LatencyHistogram::new()?;
        for p in 0..pages {
            let t0 = Instant::now();
            words[p * (PAGE / 8)].store(p as u64 + 1, Ordering::Relaxed);
            hist.record(t0.elapsed());
        }
        if (0..pages).any(|p| words[p * (PAGE / 8)].load(Ordering::Relaxed) != p as u64 + 1) {
            return Err(Error::Corruption(
                "a USM-faulted page lost its write".into(),
            ));
        }
        Ok(hist.summary())
    };
    let summary = match side {
        Side::UThread => rt
            .block_on(touch)
            .map_err(|e| Error::Invalid(format!("uThread: {e}")))??,
        Side::PlainThread => std::thread::spawn(touch)
            .join()
            .map_err(|_| Error::Invalid("plain thread panicked".into()))??,
    };
    let stats = rt.stats().mm;
    let faults = stats.pages_mapped;
    if (faults as usize) < pages {
        return Err(Error::Invalid(format!(
            "only {faults} of {pages} pages went through USM"
        )));
    }
    drop(region);
    Ok((summary, stats.fast_map.p50_ns))
}

fn summarize(runs: &[LatencySummary]) -> serde_json::Value {
    let p50: Vec<f64> = runs.iter().map(|s| s.p50_ns as f64).collect();
    let p99: Vec<f64> = runs.iter().map(|s| s.p99_ns as f64).collect();
    json!({ "p50_ns": median(&p50), "p99_ns": median(&p99), "runs": runs })
}

fn run(cli: &Cli) -> Result<()> {
    let runs = cli.runs.max(1);
    let load_before = fault::load_average();
    let mut kernel = Vec::new();
    let mut uthread = Vec::new();
    let mut plain = Vec::new();
    let mut timer_ns = 0;
    let mut service = Vec::new();
    // Interleave the sides so drift hits all of them; run 0 is the warm-up.
    for i in 0..=runs {
        let k = fault::kernel_fault_latency(cli.pages, 1000)?;
        timer_ns = k.timer_overhead_ns;
        let u = usm_once(Side::UThread, cli.pages, cli.install)?;
        let t = usm_once(Side::PlainThread, cli.pages, cli.install)?;
        if i > 0 {
            kernel.push(k.latency);
            uthread.push(u.0);
            plain.push(t.0);
            service.push(u.1 as f64);
        }
    }
    let (k, u, t) = (summarize(&kernel), summarize(&uthread), summarize(&plain));
    let get = |v: &serde_json::Value, f: &str| v[f].as_f64().unwrap_or(f64::NAN);
    let mut table = Table::new(&["side", "p50 ns", "p99 ns", "p50 vs kernel", "p99 vs kernel"]);
    for (name, v) in [
        ("kernel-4K first touch", &k),
        ("usm uThread (pool)", &u),
        ("usm plain thread (futex)", &t),
    ] {
        table.row(vec![
            name.into(),
            fmt_f(Some(get(v, "p50_ns")), 0),
            fmt_f(Some(get(v, "p99_ns")), 0),
            fmt_f(ratio_vs_kernel(get(v, "p50_ns"), get(&k, "p50_ns")), 2),
            fmt_f(ratio_vs_kernel(get(v, "p99_ns"), get(&k, "p99_ns")), 2),
        ]);
    }
    println!(
        "single 4 KiB fault, {} faults x {runs} runs (timer pair {timer_ns} ns, not subtracted)",
        cli.pages
    );
    println!("{}", table.render());
    let service_p50 = median(&service);
    println!(
        "of the uThread fault, the worker's driver (policy + install + resume) takes p50 {service_p50:.0} ns; \
         the rest is signal delivery, the switch to the LocalManager and back, and sigreturn"
    );
    println!(
        "load average before {load_before:?}, after {:?}",
        fault::load_average()
    );
    if let Some(path) = &cli.json {
        let mut report = JsonReport::new("usm_fault");
        report.insert("pages", cli.pages)?;
        report.insert("runs", runs)?;
        report.insert("install", cli.install.map(|m| format!("{m:?}")))?;
        report.insert("timer_overhead_ns", timer_ns)?;
        report.insert("loadavg_before", load_before)?;
        report.insert("loadavg_after", fault::load_average())?;
        report.insert("uthread_driver_service_p50_ns", service_p50)?;
        report.insert("kernel", &k)?;
        report.insert("usm_uthread", &u)?;
        report.insert("usm_plain_thread", &t)?;
        report.insert(
            "uthread_p50_vs_kernel",
            ratio_vs_kernel(get(&u, "p50_ns"), get(&k, "p50_ns")),
        )?;
        report.insert(
            "uthread_p99_vs_kernel",
            ratio_vs_kernel(get(&u, "p99_ns"), get(&k, "p99_ns")),
        )?;
        report.insert(
            "plain_thread_p50_vs_kernel",
            ratio_vs_kernel(get(&t, "p50_ns"), get(&k, "p50_ns")),
        )?;
        report.insert(
            "plain_thread_p99_vs_kernel",
            ratio_vs_kernel(get(&t, "p99_ns"), get(&k, "p99_ns")),
        )?;
        report.write(path)?;
    }
    Ok(())
}
