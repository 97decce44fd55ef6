//! Flexible huge pages (issue 6, benchmark 2): first touch of a region, sequential and
//! random 4 KiB order, kernel (4 KiB, mTHP 16K/64K, THP 2M) against USM's embedded runtime
//! with the `first-fit`, `fhp:16K`, `fhp:64K` and `fhp:2M` allocation policies, in one run.
//!
//! ```text
//! cargo bench -p usm-bench --bench fhp -- [--quick] [--mib N] [--runs N] [--json PATH]
//! ```
//!
//! - Kernel sides: `usm_bench::fault::kernel_first_touch` (knobs set per side, restored).
//! - USM sides: per run, the host backing is pre-warmed, then the clock starts; the
//!   runtime is built (the frame pool of region + 32 MiB is mapped, registered, populated
//!   and zeroed; no swap), a region with the side's policy is created, and one uThread
//!   writes one byte per 4 KiB page in the order; the clock stops when the uThread
//!   returns. Wall time and the **whole process's** CPU time (workers, zeroer, the
//!   measuring thread) cover all of that. The pool populates its first 8 MiB at build
//!   time and the rest in 8 MiB chunks on the zeroer thread (other core) or, when the
//!   worker runs dry first, on the worker: population is inside the clock either way.
//!   `build s` is the runtime build plus region creation; `touch s` the touch alone. Faults are the faults USM's memory core served
//!   (one per SIGBUS; a fault under `fhp:N` maps N bytes). `touch s` is the touch alone.
//! - PM-QoS is held at 0 µs for every side; median of `--runs` after one warm-up.
//! - Goal with `fhp:64K`: ≥ 16× fewer faults and ≥ 2× the GiB/s of kernel-4K, and at
//!   least the wall-time GiB/s of kernel-mTHP-64K (same order).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use usm_bench::fault::{self, FirstTouchResult, FirstTouchSpec, TouchOrder};
use usm_bench::report::{JsonReport, Table, fmt_f};
use usm_bench::stats::{RunSummary, median, rusage, system_steal_s, warmup_then_runs};
use usm_bench::{Error, PmQos, Result};
use usm_runtime::embedded::{InstallMode, Runtime};

const PAGE: usize = 4096;
/// Pool frames beyond the region (32 MiB).
const SLACK_FRAMES: usize = (32 << 20) / PAGE;
const USM_POLICIES: [&str; 4] = ["first-fit", "fhp:16K", "fhp:64K", "fhp:2M"];

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
enum InstallArg {
    Move,
    Copy,
    Both,
}

#[derive(Parser, Debug)]
#[command(about = "First touch: kernel page sizes vs USM flexible huge pages")]
struct Cli {
    /// Smaller region, fewer runs.
    #[arg(long)]
    quick: bool,
    /// Region size in MiB (default 1024; 256 with --quick).
    #[arg(long)]
    mib: Option<u64>,
    /// Measured runs per side (default 3; 2 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not hold /dev/cpu_dma_latency at 0.
    #[arg(long)]
    no_pmqos: bool,
    /// How the USM sides install frames (`move` / `copy`; default: the runtime's
    /// default, `usm_runtime::mm::InstallMode`). With `both`, every USM side runs in both
    /// modes (labels end in `/move`, `/copy`).
    #[arg(long, value_enum)]
    install: Option<InstallArg>,
    /// Run only the sides whose label contains one of these (e.g. `--only fhp:64K --only
    /// mTHP-64K`); the goal line needs kernel-4K, kernel-mTHP-64K and usm-fhp:64K.
    #[arg(long)]
    only: Vec<String>,
    /// Touch orders to run: `seq`, `rand` (default both).
    #[arg(long)]
    order: Vec<String>,
    /// Also run each USM side with the whole pool populated right after the build (by
    /// the measuring thread, inside the clock) instead of on the zeroer thread during the
    /// touch: labels end in `/eager`.
    #[arg(long)]
    eager: bool,
    /// Do not pin USM's worker to CPU 0 (the kernel sides' thread is not pinned; on this
    /// shared machine neither choice was consistently faster).
    #[arg(long)]
    no_pin: bool,
}

impl Cli {
    fn wants(&self, side: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| side.contains(o.as_str()))
    }
    fn wants_order(&self, order: TouchOrder) -> bool {
        self.order.is_empty() || self.order.iter().any(|o| o == order.label())
    }
}

fn main() {
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    if let Err(e) = run(&cli) {
        usm_bench::guard::wait_for_signal_cleanup();
        eprintln!("fhp: {e}");
        std::process::exit(1);
    }
}

/// One measured USM run.
struct UsmRun {
    wall_s: f64,
    cpu_s: f64,
    touch_s: f64,
    build_s: f64,
    faults: u64,
    steal_s: f64,
}

fn usm_once(
    policy: &str,
    eager: bool,
    pin: bool,
    install: Option<InstallMode>,
    bytes: u64,
    order: &[u32],
) -> Result<UsmRun> {
    let emb = |e: usm_runtime::embedded::EmbeddedError| Error::Invalid(format!("embedded: {e}"));
    usm_bench::prewarm::prewarm_host(2 * bytes + (64 << 20))?;
    let order = order.to_vec();
    let pages = order.len();
    let (cpu0, _, _) = rusage(true)?;
    let steal0 = system_steal_s();
    let t0 = Instant::now();
    let mut b = Runtime::builder();
    if let Some(m) = install {
        b = b.install_mode(m);
    }
    let rt = b
        .workers(1)
        .pin_workers(pin)
        .pool_frames(pages + SLACK_FRAMES)
        // No swap device: nothing can be evicted, so the watermarks only need to stay
        // inside the slack (the default, 1/16 of the pool, would make the policy shrink
        // its windows over the last 64 MiB of a 1 GiB region).
        .watermarks(SLACK_FRAMES / 4, SLACK_FRAMES / 2)
        .alloc_policy(policy)
        .build()
        .map_err(emb)?;
    if eager {
        rt.populate_pool()
            .map_err(|e| Error::Invalid(format!("populating the pool: {e}")))?;
    }
    let mut region = rt.region_with_policy(pages * PAGE, policy).map_err(emb)?;
    let build_s = t0.elapsed().as_secs_f64();
    let faults0 = rt.stats().mm.faults;
    let (region, touch_s) = rt
        .block_on(move || {
            let t = Instant::now();
            {
                let bytes = region.as_mut_slice::<u8>();
                for &p in &order {
                    bytes[p as usize * PAGE] = 1;
                }
            }
            (region, t.elapsed().as_secs_f64())
        })
        .map_err(|e| Error::Invalid(format!("touch uThread: {e}")))?;
    let wall_s = t0.elapsed().as_secs_f64();
    let (cpu1, _, _) = rusage(true)?;
    let steal_s = system_steal_s() - steal0;
    let faults = rt.stats().mm.faults - faults0;
    drop(region);
    rt.shutdown(Duration::from_secs(5));
    Ok(UsmRun {
        wall_s,
        cpu_s: cpu1 - cpu0,
        touch_s,
        build_s,
        faults,
        steal_s,
    })
}

fn usm_side(
    policy: &str,
    eager: bool,
    pin: bool,
    install: Option<InstallMode>,
    suffix: &str,
    spec: &FirstTouchSpec,
) -> Result<(FirstTouchResult, f64, f64)> {
    let pages = (spec.bytes as usize).div_ceil(PAGE);
    let order: Vec<u32> = match spec.order {
        TouchOrder::Sequential => (0..pages as u32).collect(),
        TouchOrder::Random => fault::permutation(pages, spec.seed),
    };
    let runs = warmup_then_runs(spec.warmup, spec.runs, |_| {
        usm_once(policy, eager, pin, install, spec.bytes, &order)
    })?;
    let gib = spec.bytes as f64 / (1u64 << 30) as f64;
    let walls: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
    let rates: Vec<f64> = walls.iter().map(|w| gib / w).collect();
    let cpus: Vec<f64> = runs.iter().map(|r| r.cpu_s).collect();
    let steals: Vec<f64> = runs.iter().map(|r| r.steal_s).collect();
    let faults: Vec<f64> = runs.iter().map(|r| r.faults as f64).collect();
    let touch: Vec<f64> = runs.iter().map(|r| r.touch_s).collect();
    let build: Vec<f64> = runs.iter().map(|r| r.build_s).collect();
    Ok((
        FirstTouchResult {
            side: format!("usm-{policy}{}{suffix}", if eager { "/eager" } else { "" }),
            order: spec.order.label().into(),
            bytes: spec.bytes,
            faults: median(&faults),
            folios_allocated: 0.0,
            gib_per_s: RunSummary::of(&rates),
            wall_s: RunSummary::of(&walls),
            cpu_s: RunSummary::of(&cpus),
            steal_s: RunSummary::of(&steals),
        },
        median(&touch),
        median(&build),
    ))
}

fn run(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let load_before = fault::load_average();
    let qos = PmQos::hold_zero_unless(cli.no_pmqos);
    let mib = cli.mib.unwrap_or(if cli.quick { 256 } else { 1024 });
    let runs = cli.runs.unwrap_or(if cli.quick { 2 } else { 3 });
    let mut results = Vec::new();
    let mut touch_only = Vec::new();
    let mut skipped = Vec::new();
    for order in [TouchOrder::Sequential, TouchOrder::Random] {
        if !cli.wants_order(order) {
            continue;
        }
        let spec = FirstTouchSpec {
            bytes: mib << 20,
            order,
            warmup: 1,
            runs,
            seed: 0x000f_1757,
        };
        for side in fault::available_kernel_sides() {
            if !cli.wants(&side.label()) {
                continue;
            }
            match fault::kernel_first_touch(side, &spec) {
                Ok(r) => results.push(r),
                Err(e) if e.is_unavailable() => skipped.push(format!("{}: {e}", side.label())),
                Err(e) => return Err(e),
            }
        }
        let eager = if cli.eager {
            &[false, true][..]
        } else {
            &[false][..]
        };
        for (policy, &eager) in USM_POLICIES
            .iter()
            .flat_map(|p| eager.iter().map(move |e| (p, e)))
        {
            let label = format!("usm-{policy}{}", if eager { "/eager" } else { "" });
            if !cli.wants(&label) {
                continue;
            }
            let installs: Vec<(Option<InstallMode>, &str)> = match cli.install {
                None => vec![(None, "")],
                Some(InstallArg::Move) => vec![(Some(InstallMode::Move), "")],
                Some(InstallArg::Copy) => vec![(Some(InstallMode::Copy), "")],
                Some(InstallArg::Both) => vec![
                    (Some(InstallMode::Move), "/move"),
                    (Some(InstallMode::Copy), "/copy"),
                ],
            };
            for (install, suffix) in installs {
                let (r, t, b) = usm_side(policy, eager, !cli.no_pin, install, suffix, &spec)?;
                touch_only
                    .push(json!({"side": r.side, "order": r.order, "touch_s": t, "build_s": b}));
                results.push(r);
            }
        }
    }
    let ratios = fault::first_touch_ratios(&results);
    let mut t = Table::new(&[
        "side",
        "order",
        "faults",
        "GiB/s",
        "wall s",
        "cpu s",
        "touch s",
        "build s",
        "GiB/s vs 4K",
        "faults vs 4K",
    ]);
    for r in &results {
        let ratio = ratios
            .iter()
            .find(|x| x.side == r.side && x.order == r.order);
        let usm = touch_only
            .iter()
            .find(|v| v["side"] == r.side.as_str() && v["order"] == r.order.as_str());
        let touch = usm.and_then(|v| v["touch_s"].as_f64());
        let build = usm.and_then(|v| v["build_s"].as_f64());
        t.row(vec![
            r.side.clone(),
            r.order.clone(),
            fmt_f(Some(r.faults), 0),
            fmt_f(Some(r.gib_per_s.median), 2),
            fmt_f(Some(r.wall_s.median), 3),
            fmt_f(Some(r.cpu_s.median), 3),
            fmt_f(touch, 3),
            fmt_f(build, 3),
            fmt_f(ratio.and_then(|x| x.gib_per_s_vs_kernel), 2),
            fmt_f(ratio.and_then(|x| x.faults_vs_kernel), 4),
        ]);
    }
    println!(
        "\n== first touch of {mib} MiB (median of {runs} runs after 1 warm-up, host pre-warmed; USM includes runtime build, pool population and zeroing)\n{}",
        t.render()
    );
    for s in &skipped {
        println!("skipped {s}");
    }
    let mut goals = Vec::new();
    for order in ["seq", "rand"] {
        let find = |side: &str| results.iter().find(|r| r.side == side && r.order == order);
        if let (Some(u), Some(k4), Some(m64)) = (
            find("usm-fhp:64K"),
            find("kernel-4K"),
            find("kernel-mTHP-64K"),
        ) {
            let fewer = k4.faults / u.faults.max(1.0);
            let speed = u.gib_per_s.median / k4.gib_per_s.median;
            let vs_mthp = u.gib_per_s.median / m64.gib_per_s.median;
            let met = fewer >= 16.0 && speed >= 2.0 && vs_mthp >= 1.0;
            println!(
                "GOAL fhp:64K {order}: {fewer:.1}x fewer faults than 4K (>= 16), {speed:.2}x its GiB/s (>= 2), {vs_mthp:.2}x mTHP-64K wall GiB/s (>= 1): {}",
                if met { "MET" } else { "NOT MET" }
            );
            goals.push(json!({
                "order": order,
                "fewer_faults_vs_kernel": fewer,
                "gib_per_s_vs_kernel": speed,
                "gib_per_s_vs_kernel_mthp64k": vs_mthp,
                "met": met,
            }));
        }
    }
    let mut report = JsonReport::new("fhp");
    report.insert("quick", cli.quick)?;
    report.insert("mib", mib)?;
    report.insert("runs", runs)?;
    report.insert("install", cli.install.map(|m| format!("{m:?}")))?;
    report.insert(
        "pm_qos_us",
        if qos.is_some() { json!(0) } else { Value::Null },
    )?;
    report.insert("results", &results)?;
    report.insert("ratios", &ratios)?;
    report.insert("usm_touch_only", &touch_only)?;
    report.insert("goal_fhp64k", &goals)?;
    report.insert("skipped", &skipped)?;
    report.insert("wall_s", started.elapsed().as_secs_f64())?;
    report.insert("loadavg_before", load_before)?;
    report.insert("loadavg_after", fault::load_average())?;
    if let Some(path) = &cli.json {
        report.write(path)?;
        println!("wrote {}", path.display());
    }
    println!(
        "load average before {:?}, after {:?}; total {:.0} s",
        load_before,
        fault::load_average(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
