//! Kernel baselines of the USM benchmarks, each side measured in this run.
//!
//! ```text
//! cargo bench -p usm-bench --bench kernel_baseline -- [--quick] [--json PATH] <COMMAND>
//!   cleanup        undo leftovers of a killed run (every command does this first)
//!   fault-latency  single 4 KiB first-touch fault, p50/p99 (issue 6 benchmark 3)
//!   first-touch    first touch of a region at 4K / mTHP 16K,64K / THP 2M, seq + rand (bench 2)
//!   storm          swap storm, mode (a') on a swap file and on zram, intensity sweep (bench 1)
//!   redis          redis-benchmark GET/SET: plain, cgroup + swap file, cgroup + zram (issue 7)
//!   all            everything above
//! ```
//! Every command holds PM-QoS at 0 µs for all sides (`--no-pmqos` to skip) and pre-warms
//! the host backing before every side (`--no-prewarm` to skip).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use usm_bench::child::ChildLauncher;
use usm_bench::fault::{self, FirstTouchSpec, TouchOrder};
use usm_bench::redis::{self, RedisContext, RedisSide, RedisSpec};
use usm_bench::report::{JsonReport, Table, fmt_f};
use usm_bench::storm::{
    self, KernelThreadsMode, PlotMetric, StormContext, StormMode, StormSpec, SwapMedium,
};
use usm_bench::{Error, PmQos, Result, guard};

#[derive(Parser, Debug)]
#[command(about = "Kernel baselines of the USM benchmarks")]
struct Cli {
    /// Small sizes and short runs.
    #[arg(long, global = true)]
    quick: bool,
    /// Write the figures as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Directory for swap files (must be on the project disk).
    #[arg(long, global = true, default_value = guard::DEFAULT_SWAP_DIR)]
    swap_dir: PathBuf,
    /// Swap media for storm and redis.
    #[arg(long, global = true, value_enum, default_value_t = MediumArg::Both)]
    medium: MediumArg,
    /// Seconds to wait for /dev/zram0 if someone else is using it.
    #[arg(long, global = true, default_value_t = 20)]
    zram_wait_s: u64,
    /// Do not pre-warm the host backing before each side.
    #[arg(long, global = true)]
    no_prewarm: bool,
    /// Do not hold /dev/cpu_dma_latency at 0.
    #[arg(long, global = true)]
    no_pmqos: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum MediumArg {
    File,
    Zram,
    Both,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Undo leftovers of a killed run.
    Cleanup,
    /// Single 4 KiB first-touch fault latency.
    FaultLatency {
        /// Faults timed.
        #[arg(long)]
        pages: Option<usize>,
    },
    /// First-touch throughput at each kernel page size.
    FirstTouch {
        /// Region size in MiB.
        #[arg(long)]
        mib: Option<u64>,
        /// Measured runs per side.
        #[arg(long)]
        runs: Option<usize>,
    },
    /// Swap storm, kernel mode (a') on each medium.
    Storm {
        /// Memory intensities to sweep, e.g. 1,0.25,0.05.
        #[arg(long, value_delimiter = ',')]
        intensities: Option<Vec<f64>>,
        /// Measured milliseconds per point.
        #[arg(long)]
        duration_ms: Option<u64>,
        /// Write the throughput-over-time plots as STEM-cpu.svg and STEM-memory.svg.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// redis-benchmark GET/SET: plain and in a cgroup with kernel swap.
    Redis {
        /// Requests per test.
        #[arg(long)]
        requests: Option<u64>,
    },
    /// Everything.
    All {
        /// Write the storm plot here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

fn media(m: MediumArg) -> Vec<SwapMedium> {
    match m {
        MediumArg::File => vec![SwapMedium::File],
        MediumArg::Zram => vec![SwapMedium::Zram],
        MediumArg::Both => vec![SwapMedium::File, SwapMedium::Zram],
    }
}

fn main() {
    if let Some(code) = usm_bench::child::serve_if_child(&[]) {
        std::process::exit(code);
    }
    // `cargo bench` appends `--bench`; it means nothing here.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    if let Err(e) = run(&cli) {
        // A SIGINT/SIGTERM may have caused the error: let its cleanup finish first.
        guard::wait_for_signal_cleanup();
        eprintln!("kernel_baseline: {e}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let cleaned = usm_bench::cleanup::cleanup_leftovers(std::slice::from_ref(&cli.swap_dir))?;
    if !cleaned.is_clean() {
        eprintln!("cleanup of a previous run: {cleaned:?}");
    }
    if matches!(cli.command, Cmd::Cleanup) {
        println!(
            "cleanup: {} undone, {} failed",
            cleaned.undone.len(),
            cleaned.failed.len()
        );
        for u in &cleaned.undone {
            println!("  undone {u}");
        }
        return Ok(());
    }
    let _qos = PmQos::hold_zero_unless(cli.no_pmqos);
    let mut report = JsonReport::new("kernel_baseline");
    report.insert("quick", cli.quick)?;
    report.insert(
        "pm_qos_us",
        if _qos.is_some() {
            json!(0)
        } else {
            Value::Null
        },
    )?;
    let swaps_start = guard::active_swaps()?;
    report.insert("swaps_at_start", &swaps_start)?;
    match &cli.command {
        Cmd::Cleanup => {}
        Cmd::FaultLatency { pages } => {
            report.insert("fault_latency", fault_latency(cli, *pages)?)?
        }
        Cmd::FirstTouch { mib, runs } => {
            report.insert("first_touch", first_touch(cli, *mib, *runs)?)?
        }
        Cmd::Storm {
            intensities,
            duration_ms,
            svg,
        } => report.insert(
            "storm",
            storm_cmd(cli, intensities.clone(), *duration_ms, svg.clone())?,
        )?,
        Cmd::Redis { requests } => report.insert("redis", redis_cmd(cli, *requests)?)?,
        Cmd::All { svg } => {
            report.insert("fault_latency", fault_latency(cli, None)?)?;
            report.insert("first_touch", first_touch(cli, None, None)?)?;
            report.insert("storm", storm_cmd(cli, None, None, svg.clone())?)?;
            report.insert("redis", redis_cmd(cli, None)?)?;
        }
    }
    let swaps_end = guard::active_swaps()?;
    if swaps_end != swaps_start {
        eprintln!("WARNING: active swaps differ from the start: {swaps_start:?} -> {swaps_end:?}");
    }
    report.insert("swaps_at_end", &swaps_end)?;
    if let Some(path) = &cli.json {
        report.write(path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn fault_latency(cli: &Cli, pages: Option<usize>) -> Result<Value> {
    let pages = pages.unwrap_or(if cli.quick { 20_000 } else { 100_000 });
    let r = fault::kernel_fault_latency(pages, 1000)?;
    let mut t = Table::new(&["side", "faults", "p50 ns", "p99 ns", "mean ns", "timer ns"]);
    t.row(vec![
        r.side.clone(),
        r.latency.count.to_string(),
        r.latency.p50_ns.to_string(),
        r.latency.p99_ns.to_string(),
        fmt_f(Some(r.latency.mean_ns), 0),
        r.timer_overhead_ns.to_string(),
    ]);
    println!(
        "\n== first-touch fault latency (kernel, 4 KiB)\n{}",
        t.render()
    );
    Ok(serde_json::to_value(r)?)
}

fn first_touch(cli: &Cli, mib: Option<u64>, runs: Option<usize>) -> Result<Value> {
    let mib = mib.unwrap_or(if cli.quick { 256 } else { 1024 });
    let runs = runs.unwrap_or(if cli.quick { 2 } else { 3 });
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for order in [TouchOrder::Sequential, TouchOrder::Random] {
        for side in fault::available_kernel_sides() {
            let spec = FirstTouchSpec {
                bytes: mib << 20,
                order,
                warmup: 1,
                runs,
                seed: 0x000f_1757,
            };
            match fault::kernel_first_touch(side, &spec) {
                Ok(r) => results.push(r),
                Err(e) if e.is_unavailable() => skipped.push(format!("{}: {e}", side.label())),
                Err(e) => return Err(e),
            }
        }
    }
    let ratios = fault::first_touch_ratios(&results);
    let mut t = Table::new(&[
        "side",
        "order",
        "faults",
        "folios",
        "GiB/s",
        "wall s",
        "cpu s",
        "steal s",
        "GiB/s vs 4K",
        "faults vs 4K",
    ]);
    for r in &results {
        let ratio = ratios
            .iter()
            .find(|x| x.side == r.side && x.order == r.order);
        t.row(vec![
            r.side.clone(),
            r.order.clone(),
            fmt_f(Some(r.faults), 0),
            fmt_f(Some(r.folios_allocated), 0),
            fmt_f(Some(r.gib_per_s.median), 2),
            fmt_f(Some(r.wall_s.median), 3),
            fmt_f(Some(r.cpu_s.median), 3),
            fmt_f(Some(r.steal_s.median), 2),
            fmt_f(ratio.and_then(|x| x.gib_per_s_vs_kernel), 2),
            fmt_f(ratio.and_then(|x| x.faults_vs_kernel), 4),
        ]);
    }
    println!(
        "\n== first touch of {mib} MiB (median of {runs} runs, host pre-warmed)\n{}",
        t.render()
    );
    for s in &skipped {
        println!("skipped {s}");
    }
    Ok(json!({ "results": results, "ratios": ratios, "skipped": skipped }))
}

fn storm_cmd(
    cli: &Cli,
    intensities: Option<Vec<f64>>,
    duration_ms: Option<u64>,
    svg: Option<PathBuf>,
) -> Result<Value> {
    let mut spec = if cli.quick {
        StormSpec::quick()
    } else {
        StormSpec::default_mix()
    };
    if let Some(d) = duration_ms {
        spec.duration_ms = d;
    }
    let intensities = intensities.unwrap_or(if cli.quick {
        vec![1.0, 0.1]
    } else {
        vec![1.0, 0.25, 0.05]
    });
    let launcher = ChildLauncher::current_exe()?;
    let mut sweeps = Vec::new();
    let mut t = Table::new(&[
        "mode",
        "medium",
        "intensity",
        "cpu ops/s",
        "mem ops/s",
        "access p50 us",
        "access p99 us",
        "majflt",
        "steal s",
        "peak MiB",
        "swap MiB",
    ]);
    for medium in media(cli.medium) {
        let ctx = StormContext {
            spec: spec.clone(),
            medium,
            swap_dir: cli.swap_dir.clone(),
            launcher: launcher.clone(),
            zram_wait: Duration::from_secs(cli.zram_wait_s),
            prewarm: !cli.no_prewarm,
        };
        let mut modes: Vec<Box<dyn StormMode>> = vec![Box::new(KernelThreadsMode)];
        let sweep = storm::run_sweep(&mut modes, &ctx, &intensities)?;
        for p in &sweep.points {
            let cg = p.cgroup.clone().unwrap_or_default();
            t.row(vec![
                p.mode.clone(),
                p.medium.clone(),
                p.intensity.to_string(),
                fmt_f(Some(p.cpu_ops_per_s), 0),
                fmt_f(Some(p.memory_ops_per_s), 0),
                fmt_f(Some(p.access_latency.p50_ns as f64 / 1e3), 2),
                fmt_f(Some(p.access_latency.p99_ns as f64 / 1e3), 1),
                p.major_faults.to_string(),
                fmt_f(Some(p.steal_s), 2),
                (cg.peak_bytes >> 20).to_string(),
                ((cg.peak_with_swap_bytes.saturating_sub(cg.peak_bytes)) >> 20).to_string(),
            ]);
        }
        for s in &sweep.skipped {
            println!("skipped {s}");
        }
        sweeps.push(sweep);
    }
    println!(
        "\n== swap storm: {} memory + {} CPU tasks on {} workers, budget {} MiB, working set {} MiB, {} ms/point\n{}",
        spec.mix.memory_tasks,
        spec.mix.cpu_tasks,
        spec.workers,
        spec.budget_bytes >> 20,
        spec.working_set_bytes >> 20,
        spec.duration_ms,
        t.render()
    );
    if let Some(path) = svg {
        let points: Vec<&storm::StormPoint> = sweeps.iter().flat_map(|s| s.points.iter()).collect();
        let stem = path.with_extension("");
        for (metric, suffix) in [(PlotMetric::Cpu, "cpu"), (PlotMetric::Memory, "memory")] {
            let file = PathBuf::from(format!("{}-{suffix}.svg", stem.display()));
            storm::throughput_plot(
                &points,
                metric,
                &format!("swap storm, kernel modes: {suffix} throughput"),
            )
            .write(&file)?;
            println!("wrote {}", file.display());
        }
    }
    Ok(serde_json::to_value(sweeps)?)
}

fn redis_cmd(cli: &Cli, requests: Option<u64>) -> Result<Value> {
    let mut spec = if cli.quick {
        RedisSpec::quick()
    } else {
        RedisSpec::default_run()
    };
    if let Some(r) = requests {
        spec.requests = r;
    }
    let ctx = RedisContext {
        swap_dir: cli.swap_dir.clone(),
        zram_wait: Duration::from_secs(cli.zram_wait_s),
        prewarm: !cli.no_prewarm,
    };
    let mut sides = vec![RedisSide::plain()];
    for m in media(cli.medium) {
        sides.push(RedisSide::kernel_swap(m, spec.budget_bytes));
    }
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for side in &sides {
        match redis::run_redis_side(side, &spec, &ctx) {
            Ok(r) => results.push(r),
            Err(e @ (Error::Unavailable { .. } | Error::Busy { .. })) => {
                skipped.push(format!("{}: {e}", side.label))
            }
            Err(e) => return Err(e),
        }
    }
    let mut t = Table::new(&[
        "side",
        "SET ops/s",
        "GET ops/s",
        "SET p99 ms",
        "GET p99 ms",
        "populate s",
        "swap MiB",
        "majflt",
    ]);
    for r in &results {
        t.row(vec![
            r.label.clone(),
            fmt_f(Some(r.set_ops_per_s), 0),
            fmt_f(Some(r.get_ops_per_s), 0),
            fmt_f(Some(r.set_p99_ms), 3),
            fmt_f(Some(r.get_p99_ms), 3),
            fmt_f(Some(r.populate_s), 2),
            (r.swap_used_bytes >> 20).to_string(),
            r.cgroup
                .as_ref()
                .map_or("-".into(), |c| c.major_faults.to_string()),
        ]);
    }
    println!(
        "\n== redis-benchmark -t set,get -n {} -r {} -d {} -c {} (dataset {} MiB, budget {} MiB)\n{}",
        spec.requests,
        spec.keys,
        spec.value_bytes,
        spec.clients,
        spec.dataset_bytes() >> 20,
        spec.budget_bytes >> 20,
        t.render()
    );
    for s in &skipped {
        println!("skipped {s}");
    }
    Ok(json!({ "spec": spec, "results": results, "skipped": skipped }))
}
