//! Scheduler behaviour on real pinned worker threads.

#![deny(unsafe_code)]

use std::collections::HashSet;
use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use usm_localmanager::sync::{Condvar, Mutex, channel};
use usm_localmanager::{Builder, JoinError, Runtime, WakerMode, spawn, yield_now};

fn runtime(workers: usize) -> Runtime {
    Builder::new().workers(workers).build().unwrap()
}

/// Thousands of uThreads on both workers: yields, channel traffic (parks on full/empty
/// channels), a contended uThread mutex.
fn many_uthreads(rt: &Runtime) {
    const PAIRS: usize = 1500;
    const MESSAGES: u64 = 20;
    let counter = Arc::new(Mutex::new(0u64));
    let mut consumers = Vec::new();
    let mut producers = Vec::new();
    for pair in 0..PAIRS {
        let (tx, rx) = channel::<u64>(2);
        let counter = counter.clone();
        producers.push(
            rt.spawn(move || {
                for m in 0..MESSAGES {
                    tx.send(pair as u64 * 1000 + m).unwrap();
                    if m % 4 == 0 {
                        yield_now();
                    }
                }
            })
            .unwrap(),
        );
        consumers.push(
            rt.spawn(move || {
                let mut sum = 0;
                let mut workers = HashSet::new();
                while let Ok(v) = rx.recv() {
                    sum += v;
                    workers.insert(usm_localmanager::worker_index().unwrap());
                    let mut guard = counter.lock();
                    *guard += 1;
                    if v % 7 == 0 {
                        // Hold the lock across a yield: others must park on it.
                        yield_now();
                    }
                    drop(guard);
                }
                (sum, workers)
            })
            .unwrap(),
        );
    }
    let mut seen_workers = HashSet::new();
    for (pair, consumer) in consumers.into_iter().enumerate() {
        let (sum, workers) = consumer.join().unwrap();
        let expected: u64 = (0..MESSAGES).map(|m| pair as u64 * 1000 + m).sum();
        assert_eq!(sum, expected, "pair {pair}");
        seen_workers.extend(workers);
    }
    for producer in producers {
        producer.join().unwrap();
    }
    assert_eq!(*counter.lock(), PAIRS as u64 * MESSAGES);
    assert_eq!(
        seen_workers.len(),
        rt.handle().workers(),
        "both workers ran uThreads"
    );
}

#[test]
fn thousands_of_uthreads_eventfd() {
    let rt = runtime(2);
    many_uthreads(&rt);
    let counters = rt.counters();
    assert!(counters.iter().all(|c| c.switches > 0));
    assert!(
        counters.iter().map(|c| c.parks).sum::<u64>() > 0,
        "{counters:?}"
    );
    let report = rt.shutdown(Duration::from_secs(2));
    assert_eq!(report.completed, 3000);
    assert_eq!(report.cancelled, 0);
    assert!(report.stuck_in_handler.is_empty());
}

#[test]
fn thousands_of_uthreads_busy_poll() {
    let rt = Builder::new()
        .workers(2)
        .waker(WakerMode::BusyPoll)
        .build()
        .unwrap();
    assert_eq!(rt.handle().waker_mode(), WakerMode::BusyPoll);
    many_uthreads(&rt);
}

#[test]
fn fairness_every_ready_uthread_runs_within_one_rotation() {
    const N: usize = 64;
    const ROUNDS: usize = 200;
    let rt = runtime(1);
    let tick = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..N)
        .map(|_| {
            let tick = tick.clone();
            let started = started.clone();
            rt.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                while started.load(Ordering::SeqCst) < N {
                    yield_now();
                }
                let mut last = tick.fetch_add(1, Ordering::SeqCst);
                let mut worst = 0;
                for _ in 0..ROUNDS {
                    yield_now();
                    let now = tick.fetch_add(1, Ordering::SeqCst);
                    worst = worst.max(now - last - 1);
                    last = now;
                }
                worst
            })
            .unwrap()
        })
        .collect();
    let worst = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap();
    // Round-robin over the IDQ: between two runs of a uThread every other ready uThread
    // runs at most once.
    assert!(
        worst <= (N - 1) as u64,
        "a uThread waited {worst} runs of others"
    );
}

#[test]
fn idle_worker_steals_from_overloaded_one() {
    let rt = runtime(2);
    let ran_on = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let r = ran_on.clone();
    // Everything is spawned from a uThread pinned on worker 0, so it all lands there.
    let parent = rt
        .spawn_on(0, move || {
            let children: Vec<_> = (0..200)
                .map(|_| {
                    let r = r.clone();
                    spawn(move || {
                        for _ in 0..20 {
                            let until = Instant::now() + Duration::from_micros(20);
                            while Instant::now() < until {
                                std::hint::spin_loop();
                            }
                            r[usm_localmanager::worker_index().unwrap()]
                                .fetch_add(1, Ordering::Relaxed);
                            yield_now();
                        }
                    })
                    .unwrap()
                })
                .collect();
            for child in children {
                child.join().unwrap();
            }
            usm_localmanager::worker_index().unwrap()
        })
        .unwrap();
    assert_eq!(
        parent.join().unwrap(),
        0,
        "a spawn_on uThread never migrates"
    );
    let counters = rt.counters();
    assert!(counters[1].steals > 0, "{counters:?}");
    assert_eq!(counters[0].stolen_from, counters[1].steals);
    assert!(ran_on[1].load(Ordering::Relaxed) > 0);
    assert_eq!(
        ran_on[0].load(Ordering::Relaxed) + ran_on[1].load(Ordering::Relaxed),
        200 * 20
    );
}

#[test]
fn panics_are_contained_and_reported() {
    let rt = runtime(2);
    let handle = rt
        .spawn(|| -> u32 { panic!("deliberate uThread panic") })
        .unwrap();
    match handle.join() {
        Err(error @ JoinError::Panicked(_)) => {
            assert_eq!(error.panic_message(), Some("deliberate uThread panic"));
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    // The workers are still alive and keep scheduling.
    let values: Vec<_> = (0..50)
        .map(|i| rt.spawn(move || i * 2).unwrap())
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(values.iter().sum::<i32>(), 2 * (0..50).sum::<i32>());
    assert_eq!(rt.counters().iter().map(|c| c.panicked).sum::<u64>(), 1);
}

#[test]
fn condvar_and_join_from_uthreads() {
    let rt = runtime(2);
    let pair = Arc::new((Mutex::new(Vec::<u32>::new()), Condvar::new()));
    let consumer_pair = pair.clone();
    let consumer = rt
        .spawn(move || {
            let (lock, cv) = &*consumer_pair;
            let mut got = Vec::new();
            while got.len() < 100 {
                let mut queue = cv.wait_while(lock.lock(), |q| q.is_empty());
                got.append(&mut queue);
            }
            got
        })
        .unwrap();
    let producer = rt
        .spawn(move || {
            // Join a child from a uThread: parks this uThread only.
            let child = spawn(|| 41 + 1).unwrap();
            assert_eq!(child.join().unwrap(), 42);
            let (lock, cv) = &*pair;
            for i in 0..100 {
                lock.lock().push(i);
                cv.notify_one();
                if i % 10 == 0 {
                    usm_localmanager::sleep(Duration::from_millis(1));
                }
            }
        })
        .unwrap();
    producer.join().unwrap();
    assert_eq!(consumer.join().unwrap(), (0..100).collect::<Vec<_>>());
}

#[test]
fn sleep_parks_the_uthread_not_the_worker() {
    let rt = runtime(1);
    let other_ran = Arc::new(AtomicBool::new(false));
    let flag = other_ran.clone();
    let sleeper = rt
        .spawn(move || {
            let start = Instant::now();
            usm_localmanager::sleep(Duration::from_millis(30));
            (start.elapsed(), flag.load(Ordering::SeqCst))
        })
        .unwrap();
    let flag = other_ran.clone();
    // Same (single) worker: can only run while the sleeper is parked.
    let other = rt
        .spawn(move || {
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap();
    other.join().unwrap();
    let (slept, saw_other) = sleeper.join().unwrap();
    assert!(slept >= Duration::from_millis(30), "{slept:?}");
    assert!(saw_other, "the worker ran another uThread during the sleep");
}

#[test]
fn unpark_from_an_os_thread_wakes_a_parked_uthread() {
    let rt = runtime(2);
    let (tx, rx) = std::sync::mpsc::channel();
    let woke = Arc::new(AtomicBool::new(false));
    let w = woke.clone();
    let parked = rt
        .spawn(move || {
            tx.send(usm_localmanager::current().unwrap()).unwrap();
            while !w.load(Ordering::SeqCst) {
                usm_localmanager::park();
            }
            7
        })
        .unwrap();
    let unparker = rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!parked.is_finished());
    woke.store(true, Ordering::SeqCst);
    unparker.unpark();
    assert_eq!(parked.join().unwrap(), 7);
    assert!(rt.counters().iter().map(|c| c.wakes).sum::<u64>() >= 1);
}

#[test]
fn shutdown_joins_finishable_and_cancels_parked_forever() {
    let rt = runtime(2);
    let finishes = rt
        .spawn(|| {
            usm_localmanager::sleep(Duration::from_millis(20));
            1
        })
        .unwrap();
    let forever = rt
        .spawn(|| {
            loop {
                usm_localmanager::park();
            }
        })
        .unwrap();
    let handle = rt.handle();
    let report = rt.shutdown(Duration::from_secs(2));
    assert_eq!(
        finishes.join().unwrap(),
        1,
        "shutdown let the sleeper finish"
    );
    assert!(forever.join().unwrap_err().is_cancelled());
    assert_eq!(report.completed, 1);
    assert_eq!(report.cancelled, 1);
    assert!(matches!(
        handle.spawn(|| ()),
        Err(usm_localmanager::SchedError::ShuttingDown)
    ));
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"switches\""));
}

#[test]
fn cpu_dma_latency_is_held_while_the_runtime_lives() {
    assert!(
        std::path::Path::new("/dev/cpu_dma_latency").exists(),
        "/dev/cpu_dma_latency does not exist on this machine"
    );
    // Not being allowed to open it (not root) fails: CI runs as root.
    let rt = match Builder::new().workers(2).hold_cpu_dma_latency(true).build() {
        Ok(rt) => rt,
        Err(e) => panic!("hold /dev/cpu_dma_latency (needs root): {e}"),
    };
    assert!(rt.handle().holds_cpu_dma_latency());
    // The kernel reports the PM QoS request through the fd holders: find ours in
    // /proc/self/fd.
    let held = std::fs::read_dir("/proc/self/fd").unwrap().any(|e| {
        std::fs::read_link(e.unwrap().path())
            .map(|p| p == std::path::Path::new("/dev/cpu_dma_latency"))
            .unwrap_or(false)
    });
    assert!(held);
    assert_eq!(rt.block_on(|| 5).unwrap(), 5);
    drop(rt);
}

#[test]
fn stack_size_below_minimum_is_rejected() {
    let err = Builder::new()
        .workers(1)
        .stack_size(8192)
        .build()
        .unwrap_err();
    assert!(matches!(err, usm_localmanager::SchedError::Fiber(_)));
}

#[test]
fn one_worker_grows_beyond_4096_parked_uthreads() {
    const N: usize = 5000;
    let rt = Builder::new()
        .workers(1)
        .stack_size(32 * 1024)
        .build()
        .unwrap();
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let waiting = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let (gate, waiting) = (gate.clone(), waiting.clone());
            rt.spawn(move || {
                let (lock, cv) = &*gate;
                let guard = lock.lock();
                waiting.fetch_add(1, Ordering::SeqCst);
                drop(cv.wait_while(guard, |open| !*open));
                i
            })
            .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while waiting.load(Ordering::SeqCst) < N {
        assert!(
            Instant::now() < deadline,
            "only {} parked",
            waiting.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // All N are parked at once on the single worker: its IDQ/PFQ/slots grew past 4096.
    *gate.0.lock() = true;
    gate.1.notify_all();
    let sum: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(sum, N * (N - 1) / 2);
    let counters = rt.counters();
    assert!(counters[0].parks >= N as u64, "{counters:?}");
}
