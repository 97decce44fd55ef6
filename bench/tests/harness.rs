//! The harness pieces on real inputs: statistics, JSON/table/SVG output, redis-benchmark
//! CSV parsing, the kernel first-touch sides (mTHP really allocates folios of the side's
//! size), the swap-storm (a′) mode end to end (a child in a memory cgroup with a real swap
//! file, checksums verified), and the redis sides.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;
use usm_sync::Mutex;

use usm_bench::child::ChildLauncher;
use usm_bench::fault::{self, FirstTouchSpec, KernelPageSize, TouchOrder};
use usm_bench::guard::{self, active_swaps};
use usm_bench::plot::{Headline, LinePlot, Series};
use usm_bench::report::{JsonReport, Table};
use usm_bench::stats::{self, LatencyHistogram, RunSummary};
use usm_bench::storm::{
    self, KernelThreadsMode, StormContext, StormMode, StormSpec, SwapMedium, TaskMix,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> usm_sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn median_summary_and_ratios() {
    assert_eq!(stats::median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(stats::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    assert!(stats::median(&[]).is_nan());
    let s = RunSummary::of(&[5.0, 1.0, 3.0]);
    assert_eq!((s.median, s.min, s.max, s.runs), (3.0, 1.0, 5.0, 3));
    assert_eq!(stats::ratio_vs_kernel(6.0, 3.0), Some(2.0));
    assert_eq!(stats::ratio_vs_kernel(6.0, 0.0), None);
    assert_eq!(
        stats::vs_kernel_field("cpu_throughput"),
        "cpu_throughput_vs_kernel"
    );
    let mut calls = Vec::new();
    let out = stats::warmup_then_runs(2, 3, |i| {
        calls.push(i);
        Ok(i * 10)
    })
    .unwrap();
    assert_eq!(calls, vec![0, 1, 2, 3, 4]);
    assert_eq!(out, vec![20, 30, 40]);
}

#[test]
fn latency_percentiles() {
    let mut h = LatencyHistogram::new().unwrap();
    for ns in 1..=1000u64 {
        h.record_ns(ns * 1000);
    }
    let s = h.summary();
    assert_eq!(s.count, 1000);
    let near = |v: u64, want: u64| v.abs_diff(want) <= want / 100;
    assert!(near(s.p50_ns, 500_000), "{s:?}");
    assert!(near(s.p99_ns, 990_000), "{s:?}");
    let mut other = LatencyHistogram::new().unwrap();
    other.record(Duration::from_millis(50));
    h.merge(&other).unwrap();
    assert_eq!(h.len(), 1001);
    assert!(h.summary().max_ns >= 49_000_000);
}

#[test]
fn json_report_and_table() {
    let dir = std::env::temp_dir().join(format!("usm-bench-test-{}", std::process::id()));
    let path = dir.join("r.json");
    let mut r = JsonReport::new("unit");
    r.insert("gib_per_s_vs_kernel", 2.5).unwrap();
    r.write(&path).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["bench"], "unit");
    assert_eq!(v["gib_per_s_vs_kernel"], 2.5);
    assert!(v["meta"]["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    std::fs::remove_dir_all(&dir).unwrap();

    let mut t = Table::new(&["side", "GiB/s"]);
    t.row(vec!["kernel-4K".into(), "1.50".into()]);
    t.row(vec!["fhp".into(), "12.25".into()]);
    let text = t.render();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    // Numbers right-aligned in one column.
    assert!(lines[2].ends_with(" 1.50"), "{text}");
    assert!(lines[3].ends_with("12.25"), "{text}");
    assert_eq!(lines[2].len(), lines[3].len());
}

#[test]
fn svg_plot_is_dated_with_one_colour_per_series_and_the_headline() {
    let series = |name: &str, pts: &[(f64, f64)]| Series {
        name: name.into(),
        points: pts.to_vec(),
    };
    let plot = LinePlot {
        title: "storm <&>".into(),
        x_label: "time (s)".into(),
        y_label: "ops/s".into(),
        series: (0..12)
            .map(|i| {
                let y = f64::from(i);
                series(
                    &format!("s{i}"),
                    &[(0.0, y), (1.0, y + 3.0), (2.0, y + 2.0)],
                )
            })
            .collect(),
        date: "2026-12-07 12:00 UTC".into(),
        headline: Some(Headline {
            y_label: "(c)/(a)".into(),
            series: vec![series("ratio", &[(0.0, 1.5), (1.0, 2.5), (2.0, 3.0)])],
            goal: Some(2.26),
        }),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/plot.svg");
    plot.write(&path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("storm &lt;&amp;&gt; — 2026-12-07 12:00 UTC"),
        "title with date"
    );
    for label in ["s0", "s11", "ratio", "goal 2.26×", "(c)/(a)"] {
        assert!(svg.contains(&format!("\n{label}\n")), "{label} missing");
    }
    // The data lines: polylines of three points; each has its own colour.
    let mut colours: Vec<String> = svg
        .split("<polyline")
        .skip(1)
        .filter_map(|p| {
            let pts = p.split("points=\"").nth(1)?.split('"').next()?;
            (pts.split_whitespace().count() == 3).then(|| {
                p.split("stroke=\"")
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })?
        })
        .collect();
    assert_eq!(colours.len(), 13, "12 series + the headline ratio");
    colours.sort();
    colours.dedup();
    assert_eq!(colours.len(), 13, "a colour is reused");
}

#[test]
fn redis_benchmark_csv_is_parsed_by_column_name() {
    let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
               \"SET\",\"52631.58\",\"0.546\",\"0.040\",\"0.303\",\"2.927\",\"4.927\",\"4.991\"\n\
               \"GET\",\"41666.67\",\"0.955\",\"0.048\",\"0.343\",\"3.679\",\"4.111\",\"4.183\"\n";
    let set = usm_bench::redis::parse_benchmark_csv(csv, "SET").unwrap();
    assert_eq!(set.rps, 52631.58);
    assert_eq!(set.p50_ms, 0.303);
    assert_eq!(set.p99_ms, 4.927);
    let get = usm_bench::redis::parse_benchmark_csv(csv, "GET").unwrap();
    assert_eq!(get.rps, 41666.67);
    assert!(usm_bench::redis::parse_benchmark_csv(csv, "LPUSH").is_err());
}

#[test]
fn first_touch_sides_get_the_folio_size_they_name() {
    assert!(
        is_root(),
        "needs root (memory cgroup and mTHP settings): run the tests as root"
    );
    let _s = serial();
    let knobs = || {
        guard::mthp_sizes_kib()
            .into_iter()
            .map(|k| {
                std::fs::read_to_string(format!(
                    "/sys/kernel/mm/transparent_hugepage/hugepages-{k}kB/enabled"
                ))
                .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let before = knobs();
    let spec = FirstTouchSpec {
        bytes: 32 << 20,
        order: TouchOrder::Random,
        warmup: 0,
        runs: 1,
        seed: 7,
    };
    let base = fault::kernel_first_touch(KernelPageSize::Base4K, &spec).unwrap();
    assert!(base.faults >= 8192.0, "{base:?}");
    assert!(
        guard::mthp_sizes_kib().contains(&64),
        "no 64K mTHP knob: this machine's kernel has one"
    );
    let m = fault::kernel_first_touch(KernelPageSize::Mthp(64), &spec).unwrap();
    // 32 MiB / 64 KiB = 512 folios (a few may fall back under fragmentation).
    assert!(
        m.folios_allocated >= 480.0 && m.folios_allocated <= 512.0,
        "{m:?}"
    );
    assert!(m.faults <= 600.0, "{m:?}");
    let ratios = fault::first_touch_ratios(&[base.clone(), m]);
    assert!(ratios[0].faults_vs_kernel.unwrap() < 0.1);
    assert_eq!(knobs(), before, "mTHP knobs not restored");
}

#[test]
fn fault_latency_counts_every_fault() {
    assert!(
        is_root(),
        "needs root (memory cgroup and mTHP settings): run the tests as root"
    );
    let _s = serial();
    let r = fault::kernel_fault_latency(2000, 100).unwrap();
    assert_eq!(r.latency.count, 2000);
    assert!(r.faults_taken >= 2000, "{r:?}");
    assert!(r.latency.p50_ns > r.timer_overhead_ns, "{r:?}");
}

fn test_launcher() -> ChildLauncher {
    let mut l = ChildLauncher::current_exe().unwrap();
    l.args = [
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    l
}

/// (a′) end to end: a child in a 24 MiB cgroup drives 64 MiB of checksummed pages through a
/// real swap file; every read verified, swap really used, machine state restored.
#[test]
fn storm_kernel_threads_mode_swaps_and_verifies() {
    assert!(
        is_root(),
        "needs root (memory cgroup and mTHP settings): run the tests as root"
    );
    let _s = serial();
    let swaps_before = active_swaps().unwrap();
    let spec = StormSpec {
        budget_bytes: 24 << 20,
        working_set_bytes: 64 << 20,
        mix: TaskMix {
            memory_tasks: 4,
            cpu_tasks: 1,
        },
        workers: 2,
        duration_ms: 600,
        sample_ms: 100,
        write_percent: 50,
        seed: 42,
    };
    let ctx = StormContext {
        spec,
        medium: SwapMedium::File,
        swap_dir: PathBuf::from(guard::DEFAULT_SWAP_DIR),
        launcher: test_launcher(),
        zram_wait: Duration::from_secs(5),
        prewarm: false,
    };
    let mut modes: Vec<Box<dyn StormMode>> = vec![Box::new(KernelThreadsMode)];
    let sweep = storm::run_sweep(&mut modes, &ctx, &[1.0]).unwrap();
    assert_eq!(sweep.points.len(), 1);
    let p = &sweep.points[0];
    assert_eq!(p.mode, "a'-kernel-threads");
    assert_eq!(p.medium, "swapfile");
    assert!(p.memory_ops > 0 && p.cpu_ops > 0, "{p:?}");
    assert!(p.verified_reads > 0);
    assert!(p.major_faults > 0, "no swap-in happened: {p:?}");
    assert!(p.samples.len() >= 4);
    let cg = p.cgroup.as_ref().unwrap();
    assert!(cg.peak_bytes <= 24 << 20, "{cg:?}");
    assert!(
        cg.peak_with_swap_bytes > cg.peak_bytes + (16 << 20),
        "{cg:?}"
    );
    assert_eq!(active_swaps().unwrap(), swaps_before);
}

/// A direct (in-process, no swap) run of the workload: counters advance, reads verify.
#[test]
fn storm_workload_runs_in_process() {
    let spec = StormSpec {
        budget_bytes: 8 << 20,
        working_set_bytes: 8 << 20,
        mix: TaskMix {
            memory_tasks: 2,
            cpu_tasks: 1,
        },
        workers: 2,
        duration_ms: 300,
        sample_ms: 50,
        write_percent: 30,
        seed: 1,
    };
    let p = storm::run_storm_on_threads(&spec, 0.5).unwrap();
    assert!(p.memory_ops > 100 && p.cpu_ops > 0, "{p:?}");
    assert!(p.verified_reads > 0);
    assert!(p.samples.len() >= 4);
    // Every step is timed, including those before and after the measured window.
    assert!(p.access_latency.count >= p.memory_ops, "{p:?}");
}

#[test]
fn memory_task_verifies_and_detects_corruption() {
    let mut buf = vec![0u8; 4 * 4096];
    let mut t = storm::MemoryTask::new(&mut buf, 3, 1.0, 50).unwrap();
    t.populate();
    t.verify_all().unwrap();
    for _ in 0..200 {
        t.step().unwrap();
    }
    t.verify_all().unwrap();
    assert!(t.verified_reads > 0);
    drop(t);
    // A task whose checksum table does not match the data (all-zero table over populated
    // pages) must report corruption on its first read.
    let mut t2 = storm::MemoryTask::new(&mut buf, 5, 1.0, 0).unwrap();
    assert!(matches!(t2.step(), Err(usm_bench::Error::Corruption(_))));
    assert!(t2.verify_all().is_err());
}

#[test]
fn redis_sides_plain_and_kernel_swap() {
    assert!(
        is_root(),
        "needs root (memory cgroup and mTHP settings): run the tests as root"
    );
    assert!(
        std::path::Path::new("/usr/bin/redis-server").exists()
            && std::path::Path::new("/usr/bin/redis-benchmark").exists(),
        "redis-server / redis-benchmark not installed (scripts/test installs them)"
    );
    let _s = serial();
    let swaps_before = active_swaps().unwrap();
    let spec = usm_bench::redis::RedisSpec {
        requests: 2000,
        clients: 8,
        value_bytes: 4096,
        keys: 8192,
        budget_bytes: 16 << 20,
        pipeline: 1,
    };
    let ctx = usm_bench::redis::RedisContext {
        swap_dir: PathBuf::from(guard::DEFAULT_SWAP_DIR),
        zram_wait: Duration::from_secs(5),
        prewarm: false,
    };
    let plain =
        usm_bench::redis::run_redis_side(&usm_bench::redis::RedisSide::plain(), &spec, &ctx)
            .unwrap();
    assert_eq!(plain.dbsize, 8192);
    assert!(plain.set_ops_per_s > 0.0 && plain.get_ops_per_s > 0.0);
    let side = usm_bench::redis::RedisSide::kernel_swap(SwapMedium::File, spec.budget_bytes);
    let sw = usm_bench::redis::run_redis_side(&side, &spec, &ctx).unwrap();
    assert_eq!(sw.dbsize, 8192);
    assert!(sw.get_ops_per_s > 0.0);
    assert!(sw.swap_used_bytes > 8 << 20, "{sw:?}");
    let cg = sw.cgroup.unwrap();
    assert!(cg.peak_bytes <= 16 << 20, "{cg:?}");
    assert_eq!(active_swaps().unwrap(), swaps_before);
}

/// Not a test on its own: the body of benchmark children (inert without the env).
#[test]
fn child_entry() {
    if let Some(code) = usm_bench::child::serve_if_child(&[]) {
        assert_eq!(code, 0, "child handler failed");
    }
}
