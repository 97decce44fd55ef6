//! Benchmark `sched`: the uThread scheduler (`usm-fibers` + `usm-localmanager`) next to
//! its baselines, measured in the same run on the same machine.
//!
//! Sides (medians over `--runs` measured runs after one warm-up run):
//! - `corosensei_resume_suspend`: raw corosensei resume + suspend round trip (the floor);
//! - `fiber_resume_suspend`: the same through `usm_fibers::Fiber` (thread-local bookkeeping);
//! - `yield`: one uThread yielding to the next ready uThread on the same worker (two
//!   uThreads ping-ponging through the LocalManager: requeue + claim of the next one in one
//!   CAS, entry take/put, switch);
//! - `yield_thread_cpu`: the same, timed with the worker thread's CPU clock — on a machine
//!   shared with other jobs the wall-clock side also counts the time the worker was
//!   descheduled; this one shows what the path itself costs;
//! - `spawn_join`: a uThread spawns a child and joins it (pooled stacks);
//! - `mutex_pingpong`: two uThreads on one worker alternate through a uThread `Mutex` +
//!   `Condvar` (park, unpark, switch per hand-off), one-way time;
//! - `os_condvar_same_core` / `os_condvar_cross_core`: two OS threads alternate through a
//!   `std::sync::Mutex` + `Condvar` (futex), pinned to one core / two cores, one-way time;
//! - `unpark_cross_core_<mode>`: a uThread on worker 0 unparks one on worker 1 and parks
//!   until unparked back; one-way latency = round trip / 2, median and p99 over all round
//!   trips, for each waker mode: eventfd, eventfd with `/dev/cpu_dma_latency` held at 0,
//!   busy-poll, eventfd with a 50 µs spin before parking, and eventfd with
//!   `/dev/cpu_dma_latency` held and the builder's default adaptive spin
//!   (`DEFAULT_SPIN_BEFORE_PARK`; the plain eventfd sides set the spin to zero, so they
//!   measure the kernel wake-up itself). The OS-thread
//!   cross-core baseline is measured both without and with the
//!   PM-QoS request held, so every mode has a baseline under the same setting.
//!
//! Ratios: `yield_vs_corosensei`, `mutex_pingpong_vs_os_same_core`,
//! `unpark_<mode>_vs_os_cross_core` (uThread time / baseline time: < 1 means faster).
//! Targets from the issue are checked and reported (`targets` in the JSON).
//!
//! ```text
//! cargo bench -p usm-bench --bench sched -- [--runs N] [--quick] [--only NAME] [--json PATH]
//! ```
//! `cargo bench` runs the binary from `bench/`: give `--json` an absolute path (or one
//! relative to `bench/`, e.g. `results/sched.json`).
//! Needs two cores for the cross-core sides; `/dev/cpu_dma_latency` needs root (the side
//! is skipped with the reason printed otherwise).

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use usm_sync::{Arc, Condvar, Mutex};

use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;
use usm_localmanager::{Builder, Runtime, Unparker, WakerMode};

#[derive(Parser, Debug)]
#[command(about = "uThread scheduler benchmark")]
struct Args {
    /// Measured runs per side (after one warm-up run).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Ten times fewer iterations (smoke run).
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run only the sides whose name contains this (e.g. `yield`, `unpark`).
    #[arg(long)]
    only: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Side {
    /// Median over runs (throughput sides) or over all samples (latency sides), ns.
    median_ns: f64,
    /// 99th percentile over all samples (latency sides only), ns.
    p99_ns: Option<f64>,
    /// Per-run values (throughput sides), ns.
    runs_ns: Vec<f64>,
    /// Best run (throughput sides) or minimum sample (latency sides), ns: less sensitive to
    /// other load on the machine than the median.
    best_ns: f64,
    /// Waker mode of the runtime used, if any.
    waker: Option<String>,
    /// Whether `/dev/cpu_dma_latency` was held at 0 during the side.
    cpu_dma_latency_held: bool,
    iterations: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine_cpus: usize,
    /// `/proc/loadavg` at the start and at the end of the run (other load skews figures).
    loadavg_start: String,
    loadavg_end: String,
    sides: BTreeMap<String, Side>,
    ratios: BTreeMap<String, f64>,
    targets: BTreeMap<String, Target>,
    skipped: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct Target {
    side: String,
    limit_ns: f64,
    measured_ns: f64,
    met: bool,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Runs `one_run` (returning ns per operation) once to warm up and `runs` times measured.
fn throughput(
    runs: usize,
    iterations: u64,
    waker: Option<WakerMode>,
    mut one_run: impl FnMut(u64) -> f64,
) -> Side {
    one_run(iterations / 4 + 1);
    let mut per_run: Vec<f64> = (0..runs).map(|_| one_run(iterations)).collect();
    let runs_ns = per_run.clone();
    let best_ns = per_run.iter().copied().fold(f64::INFINITY, f64::min);
    Side {
        median_ns: median(&mut per_run),
        p99_ns: None,
        runs_ns,
        best_ns,
        waker: waker.map(|w| format!("{w:?}")),
        cpu_dma_latency_held: false,
        iterations,
    }
}

fn latency(hist: &Histogram<u64>, waker: Option<String>, dma: bool, iterations: u64) -> Side {
    // Samples are round trips; one-way = half.
    Side {
        median_ns: hist.value_at_quantile(0.5) as f64 / 2.0,
        p99_ns: Some(hist.value_at_quantile(0.99) as f64 / 2.0),
        runs_ns: Vec::new(),
        best_ns: hist.min() as f64 / 2.0,
        waker,
        cpu_dma_latency_held: dma,
        iterations,
    }
}

fn runtime(workers: usize, waker: WakerMode, dma: bool) -> Result<Runtime, String> {
    runtime_spin(workers, waker, dma, Duration::ZERO)
}

fn runtime_spin(
    workers: usize,
    waker: WakerMode,
    dma: bool,
    spin: Duration,
) -> Result<Runtime, String> {
    Builder::new()
        .workers(workers)
        .waker(waker)
        .hold_cpu_dma_latency(dma)
        .spin_before_park(spin)
        .stack_size(64 * 1024)
        .stack_cache(1024, 64)
        .build()
        .map_err(|e| e.to_string())
}

// --- baselines --------------------------------------------------------------------------

fn corosensei_round_trip(iterations: u64) -> f64 {
    use corosensei::{Coroutine, CoroutineResult};
    let mut co: Coroutine<(), (), ()> = Coroutine::new(|yielder, ()| {
        loop {
            yielder.suspend(());
        }
    });
    let start = Instant::now();
    for _ in 0..iterations {
        if let CoroutineResult::Return(()) = co.resume(()) {
            unreachable!();
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    std::mem::forget(co); // never finishes; skip the forced unwind
    ns
}

fn fiber_round_trip(iterations: u64) -> f64 {
    let mut pool = usm_fibers::StackPool::new(64 * 1024, 1).expect("stack pool");
    let mut fiber = usm_fibers::Fiber::new(&mut pool, || {
        loop {
            usm_fibers::suspend_current(usm_fibers::Suspend::Yield);
        }
    })
    .expect("fiber");
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(fiber.resume());
    }
    let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    std::mem::forget(fiber);
    ns
}

fn pin_to(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(core).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Two OS threads alternating through a futex mutex + condvar; samples are round trips.
fn os_condvar_pingpong(iterations: u64, cores: (usize, usize)) -> Histogram<u64> {
    let original = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .unwrap_or_else(|_| nix::sched::CpuSet::new());
    let shared = Arc::new((Mutex::new(0u64), Condvar::new()));
    let other = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            pin_to(cores.1);
            let (lock, cv) = &*shared;
            for i in 0..iterations {
                let mut turn = lock.lock().unwrap();
                while *turn != 2 * i + 1 {
                    turn = cv.wait(turn).unwrap();
                }
                *turn = 2 * i + 2;
                cv.notify_one();
            }
        })
    };
    pin_to(cores.0);
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let (lock, cv) = &*shared;
    for i in 0..iterations {
        let start = Instant::now();
        let mut turn = lock.lock().unwrap();
        *turn = 2 * i + 1;
        cv.notify_one();
        while *turn != 2 * i + 2 {
            turn = cv.wait(turn).unwrap();
        }
        drop(turn);
        let _ = hist.record(start.elapsed().as_nanos() as u64);
    }
    other.join().unwrap();
    // Give the bench thread its original CPU set back: later runtimes pick their cores from
    // the creating thread's affinity (core_affinity), and must see both CPUs.
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &original);
    hist
}

fn hold_cpu_dma_latency() -> Result<File, String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .map_err(|e| format!("/dev/cpu_dma_latency: {e}"))?;
    file.write_all(&0i32.to_ne_bytes())
        .map_err(|e| format!("/dev/cpu_dma_latency: {e}"))?;
    Ok(file)
}

// --- uThread sides ----------------------------------------------------------------------

/// Which clock a same-worker side is timed with.
#[derive(Clone, Copy)]
enum Clock {
    /// Elapsed time (includes time the worker thread was descheduled by other jobs).
    Wall,
    /// The worker thread's CPU time (`getrusage(RUSAGE_THREAD)`): excludes the time other
    /// jobs on a shared machine held the CPU, so it shows the cost of the path itself.
    ThreadCpu,
}

/// CPU time (user + system) of the calling thread so far (`getrusage(RUSAGE_THREAD)`).
fn thread_cpu_now() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(Duration::ZERO, |usage| {
        let (user, system) = (usage.user_time(), usage.system_time());
        let micros =
            |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
        Duration::from_micros(micros(user) + micros(system))
    })
}

fn yield_run(rt: &Runtime, iterations: u64, clock: Clock) -> f64 {
    let started = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let started = started.clone();
            rt.spawn_on(0, move || {
                started.fetch_add(1, Ordering::SeqCst);
                while started.load(Ordering::SeqCst) < 2 {
                    usm_localmanager::yield_now();
                }
                // Both uThreads run on worker 0: the thread CPU clock is that worker's.
                let (start, cpu_start) = (Instant::now(), thread_cpu_now());
                for _ in 0..iterations {
                    usm_localmanager::yield_now();
                }
                match clock {
                    Clock::Wall => start.elapsed(),
                    Clock::ThreadCpu => thread_cpu_now().saturating_sub(cpu_start),
                }
            })
            .expect("spawn")
        })
        .collect();
    let elapsed: Vec<Duration> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Both uThreads interleave: each one's loop spans ~2 * iterations switches.
    let longest = elapsed.into_iter().max().unwrap_or_default();
    longest.as_nanos() as f64 / (2 * iterations) as f64
}

fn spawn_join_run(rt: &Runtime, iterations: u64) -> f64 {
    rt.spawn_on(0, move || {
        let start = Instant::now();
        for i in 0..iterations {
            let child = usm_localmanager::spawn(move || i).expect("spawn");
            std::hint::black_box(child.join().unwrap());
        }
        start.elapsed().as_nanos() as f64 / iterations as f64
    })
    .expect("spawn")
    .join()
    .unwrap()
}

fn mutex_pingpong_run(rt: &Runtime, iterations: u64) -> f64 {
    use usm_localmanager::sync::{Condvar, Mutex};
    let shared = Arc::new((Mutex::new(0u64), Condvar::new()));
    let other = {
        let shared = shared.clone();
        rt.spawn_on(0, move || {
            let (lock, cv) = &*shared;
            for i in 0..iterations {
                let mut turn = cv.wait_while(lock.lock(), |t| *t != 2 * i + 1);
                *turn = 2 * i + 2;
                drop(turn);
                cv.notify_one();
            }
        })
        .expect("spawn")
    };
    let ns = rt
        .spawn_on(0, move || {
            let (lock, cv) = &*shared;
            let start = Instant::now();
            for i in 0..iterations {
                *lock.lock() = 2 * i + 1;
                cv.notify_one();
                drop(cv.wait_while(lock.lock(), |t| *t != 2 * i + 2));
            }
            // Two hand-offs per iteration.
            start.elapsed().as_nanos() as f64 / (2 * iterations) as f64
        })
        .expect("spawn")
        .join()
        .unwrap();
    other.join().unwrap();
    ns
}

/// uThread on worker 0 and uThread on worker 1 unpark each other; samples are round trips.
fn unpark_cross_core(rt: &Runtime, iterations: u64) -> Histogram<u64> {
    let turn = Arc::new(AtomicU64::new(0));
    let b_unparker: Arc<Mutex<Option<Unparker>>> = Arc::new(Mutex::new(None));
    let a_unparker: Arc<Mutex<Option<Unparker>>> = Arc::new(Mutex::new(None));
    let ready = Arc::new(AtomicBool::new(false));
    let b = {
        let (turn, b_unparker, a_unparker, ready) = (
            turn.clone(),
            b_unparker.clone(),
            a_unparker.clone(),
            ready.clone(),
        );
        rt.spawn_on(1, move || {
            *b_unparker.lock().unwrap() = usm_localmanager::current();
            ready.store(true, Ordering::SeqCst);
            let a = loop {
                if let Some(a) = a_unparker.lock().unwrap().clone() {
                    break a;
                }
                usm_localmanager::yield_now();
            };
            for i in 0..iterations {
                while turn.load(Ordering::Acquire) != 2 * i + 1 {
                    usm_localmanager::park();
                }
                turn.store(2 * i + 2, Ordering::Release);
                a.unpark();
            }
        })
        .expect("spawn")
    };
    let hist = rt
        .spawn_on(0, move || {
            *a_unparker.lock().unwrap() = usm_localmanager::current();
            while !ready.load(Ordering::SeqCst) {
                usm_localmanager::yield_now();
            }
            let b = b_unparker.lock().unwrap().clone().expect("b published");
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            for i in 0..iterations {
                let start = Instant::now();
                turn.store(2 * i + 1, Ordering::Release);
                b.unpark();
                while turn.load(Ordering::Acquire) != 2 * i + 2 {
                    usm_localmanager::park();
                }
                let _ = hist.record(start.elapsed().as_nanos() as u64);
            }
            hist
        })
        .expect("spawn")
        .join()
        .unwrap();
    b.join().unwrap();
    hist
}

fn main() {
    let args = Args::parse();
    let scale = if args.quick { 10 } else { 1 };
    let runs = args.runs.max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sides = BTreeMap::new();
    let mut skipped = BTreeMap::new();

    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let loadavg_start = loadavg();
    let want = |name: &str| args.only.as_deref().is_none_or(|only| name.contains(only));
    println!("sched benchmark: {runs} runs per side, medians");
    if want("corosensei_resume_suspend") {
        sides.insert(
            "corosensei_resume_suspend".to_string(),
            throughput(runs, 5_000_000 / scale, None, corosensei_round_trip),
        );
    }
    if want("fiber_resume_suspend") {
        sides.insert(
            "fiber_resume_suspend".to_string(),
            throughput(runs, 5_000_000 / scale, None, fiber_round_trip),
        );
    }

    // Single-worker runtime for the same-core sides.
    match runtime(1, WakerMode::EventFd, false) {
        Ok(rt) => {
            if want("yield") {
                sides.insert(
                    "yield".to_string(),
                    throughput(runs, 1_000_000 / scale, Some(WakerMode::EventFd), |n| {
                        yield_run(&rt, n, Clock::Wall)
                    }),
                );
            }
            if want("yield_thread_cpu") {
                sides.insert(
                    "yield_thread_cpu".to_string(),
                    throughput(runs, 1_000_000 / scale, Some(WakerMode::EventFd), |n| {
                        yield_run(&rt, n, Clock::ThreadCpu)
                    }),
                );
            }
            if want("spawn_join") {
                sides.insert(
                    "spawn_join".to_string(),
                    throughput(runs, 200_000 / scale, Some(WakerMode::EventFd), |n| {
                        spawn_join_run(&rt, n)
                    }),
                );
            }
            if want("mutex_pingpong") {
                sides.insert(
                    "mutex_pingpong".to_string(),
                    throughput(runs, 200_000 / scale, Some(WakerMode::EventFd), |n| {
                        mutex_pingpong_run(&rt, n)
                    }),
                );
            }
            drop(rt);
        }
        Err(e) => {
            skipped.insert("same_core_runtime".to_string(), e);
        }
    }

    let os_iterations = 50_000 / scale;
    if want("os_condvar_same_core") {
        let hist = os_condvar_pingpong(os_iterations, (0, 0));
        sides.insert(
            "os_condvar_same_core".to_string(),
            latency(&hist, None, false, os_iterations),
        );
    }

    if cpus < 2 {
        skipped.insert("cross_core".to_string(), "needs two CPUs".to_string());
    } else {
        if want("os_condvar_cross_core") {
            let hist = os_condvar_pingpong(os_iterations, (0, 1));
            sides.insert(
                "os_condvar_cross_core".to_string(),
                latency(&hist, None, false, os_iterations),
            );
        }
        let unpark_iterations = 20_000 / scale;
        let no_spin = Duration::ZERO;
        let spin = Duration::from_micros(50);
        for (name, mode, dma, spin) in [
            (
                "unpark_cross_core_eventfd",
                WakerMode::EventFd,
                false,
                no_spin,
            ),
            (
                "unpark_cross_core_busy_poll",
                WakerMode::BusyPoll,
                false,
                no_spin,
            ),
            (
                "unpark_cross_core_eventfd_spin50us",
                WakerMode::EventFd,
                false,
                spin,
            ),
            (
                "unpark_cross_core_eventfd_dma",
                WakerMode::EventFd,
                true,
                no_spin,
            ),
            (
                "unpark_cross_core_eventfd_dma_default_spin",
                WakerMode::EventFd,
                true,
                usm_localmanager::DEFAULT_SPIN_BEFORE_PARK,
            ),
        ] {
            if !want(name) {
                continue;
            }
            match runtime_spin(2, mode, dma, spin) {
                Ok(rt) => {
                    unpark_cross_core(&rt, unpark_iterations / 10); // warm-up
                    let hist = unpark_cross_core(&rt, unpark_iterations);
                    let held = rt.handle().holds_cpu_dma_latency();
                    let waker = if spin.is_zero() {
                        format!("{mode:?}")
                    } else if spin == usm_localmanager::DEFAULT_SPIN_BEFORE_PARK {
                        format!("{mode:?}+adaptive-spin<={}us", spin.as_micros())
                    } else {
                        format!("{mode:?}+spin{}us", spin.as_micros())
                    };
                    sides.insert(
                        name.to_string(),
                        latency(&hist, Some(waker), held, unpark_iterations),
                    );
                    if dma && !sides.contains_key("os_condvar_cross_core_dma") {
                        // Baseline under the same PM-QoS setting (the runtime holds it now).
                        let hist = os_condvar_pingpong(os_iterations, (0, 1));
                        sides.insert(
                            "os_condvar_cross_core_dma".to_string(),
                            latency(&hist, None, true, os_iterations),
                        );
                    }
                }
                Err(e) => {
                    skipped.insert(name.to_string(), e);
                }
            }
        }
        if want("os_condvar_cross_core_dma") && !sides.contains_key("os_condvar_cross_core_dma") {
            // Hold it ourselves if the runtime could not (so the baseline still exists).
            if let Ok(_held) = hold_cpu_dma_latency() {
                let hist = os_condvar_pingpong(os_iterations, (0, 1));
                sides.insert(
                    "os_condvar_cross_core_dma".to_string(),
                    latency(&hist, None, true, os_iterations),
                );
            }
        }
    }

    let get = |name: &str| sides.get(name).map(|s| s.median_ns);
    let mut ratios = BTreeMap::new();
    let mut ratio = |name: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b)
            && b > 0.0
        {
            ratios.insert(name.to_string(), a / b);
        }
    };
    ratio(
        "yield_vs_corosensei",
        get("yield"),
        get("corosensei_resume_suspend"),
    );
    ratio(
        "mutex_pingpong_vs_os_same_core",
        get("mutex_pingpong"),
        get("os_condvar_same_core"),
    );
    ratio(
        "unpark_eventfd_vs_os_cross_core",
        get("unpark_cross_core_eventfd"),
        get("os_condvar_cross_core"),
    );
    ratio(
        "unpark_busy_poll_vs_os_cross_core",
        get("unpark_cross_core_busy_poll"),
        get("os_condvar_cross_core"),
    );
    ratio(
        "unpark_eventfd_spin50us_vs_os_cross_core",
        get("unpark_cross_core_eventfd_spin50us"),
        get("os_condvar_cross_core"),
    );
    ratio(
        "unpark_eventfd_dma_vs_os_cross_core_dma",
        get("unpark_cross_core_eventfd_dma"),
        get("os_condvar_cross_core_dma"),
    );
    ratio(
        "unpark_eventfd_dma_default_spin_vs_os_cross_core_dma",
        get("unpark_cross_core_eventfd_dma_default_spin"),
        get("os_condvar_cross_core_dma"),
    );

    let mut targets = BTreeMap::new();
    for (name, side, limit) in [
        ("yield_le_50ns", "yield", 50.0),
        ("yield_thread_cpu_le_50ns", "yield_thread_cpu", 50.0),
        ("spawn_join_le_1us", "spawn_join", 1000.0),
        (
            "unpark_busy_poll_le_1us",
            "unpark_cross_core_busy_poll",
            1000.0,
        ),
        (
            "unpark_eventfd_dma_le_5us",
            "unpark_cross_core_eventfd_dma",
            5000.0,
        ),
        (
            "unpark_eventfd_dma_default_spin_le_5us",
            "unpark_cross_core_eventfd_dma_default_spin",
            5000.0,
        ),
    ] {
        if let Some(measured) = get(side) {
            targets.insert(
                name.to_string(),
                Target {
                    side: side.to_string(),
                    limit_ns: limit,
                    measured_ns: measured,
                    met: measured <= limit,
                },
            );
        }
    }

    println!(
        "{:<34} {:>12} {:>12} {:>12}  waker",
        "side", "median ns", "best ns", "p99 ns"
    );
    for (name, side) in &sides {
        println!(
            "{:<34} {:>12.1} {:>12.1} {:>12}  {}{}",
            name,
            side.median_ns,
            side.best_ns,
            side.p99_ns.map_or("-".to_string(), |p| format!("{p:.1}")),
            side.waker.as_deref().unwrap_or("-"),
            if side.cpu_dma_latency_held {
                " +cpu_dma_latency=0"
            } else {
                ""
            }
        );
    }
    for (name, value) in &ratios {
        println!("ratio {name:<40} {value:.3}");
    }
    for (name, t) in &targets {
        println!(
            "target {name:<28} {:>10.1} ns (limit {:.0}) {}",
            t.measured_ns,
            t.limit_ns,
            if t.met { "MET" } else { "NOT MET" }
        );
    }
    for (name, why) in &skipped {
        println!("skipped {name}: {why}");
    }
    println!("load average: start {loadavg_start} / end {}", loadavg());

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine_cpus: cpus,
        loadavg_start,
        loadavg_end: loadavg(),
        sides,
        ratios,
        targets,
        skipped,
    };
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report).expect("serialize");
        std::fs::write(&path, json).expect("write --json file");
        println!("wrote {}", path.display());
    }
}
