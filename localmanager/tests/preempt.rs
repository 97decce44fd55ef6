//! Time-slice preemption with a real timer signal (SIGURG from the ticker thread).

#![deny(unsafe_code)]

use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};

use usm_localmanager::sync::channel;
use usm_localmanager::{Builder, JoinHandle, Runtime, preemptible};

fn one_worker_with_preemption() -> Runtime {
    Builder::new()
        .workers(1)
        .preemption(Duration::from_micros(200))
        .build()
        .unwrap()
}

/// Waits for `handle` up to 10 s; on timeout releases the spinner and fails.
fn join_or_fail<T>(handle: JoinHandle<T>, release: &AtomicBool, what: &str) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handle.is_finished() {
        if Instant::now() > deadline {
            release.store(true, Ordering::SeqCst);
            panic!("{what} starved: preemption did not happen");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    handle.join().unwrap()
}

#[test]
fn a_spinning_uthread_is_preempted_and_others_run() {
    let rt = one_worker_with_preemption();
    let stop = Arc::new(AtomicBool::new(false));
    let spins = Arc::new(AtomicU64::new(0));
    let (s, n) = (stop.clone(), spins.clone());
    // Never yields, never calls the runtime: only the signal can switch it out.
    let spinner = rt
        .spawn(move || {
            preemptible(|| {
                while !s.load(Ordering::Relaxed) {
                    n.fetch_add(1, Ordering::Relaxed);
                    std::hint::spin_loop();
                }
            });
            usm_localmanager::worker_index()
        })
        .unwrap();
    while spins.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = stop.clone();
    let other = rt
        .spawn(move || {
            s.store(true, Ordering::SeqCst);
            42
        })
        .unwrap();
    assert_eq!(join_or_fail(other, &stop, "the second uThread"), 42);
    assert_eq!(spinner.join().unwrap(), Some(0));
    let counters = rt.counters();
    assert!(counters[0].preemptions > 0, "{counters:?}");
}

#[test]
fn outside_a_preemptible_section_it_yields_at_the_next_runtime_call() {
    let rt = one_worker_with_preemption();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel::<u32>(1);
    let s = stop.clone();
    let spinner = rt
        .spawn(move || {
            let _tx = tx;
            // Not preemptible, but calls the runtime (try_recv) now and then.
            while !s.load(Ordering::Relaxed) {
                for _ in 0..1000 {
                    std::hint::spin_loop();
                }
                let _ = rx.try_recv();
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let s = stop.clone();
    let other = rt.spawn(move || s.store(true, Ordering::SeqCst)).unwrap();
    join_or_fail(other, &stop, "the second uThread");
    spinner.join().unwrap();
    let counters = rt.counters();
    assert!(counters[0].preempt_deferred > 0, "{counters:?}");
    assert_eq!(
        counters[0].preemptions, 0,
        "never switched out from the signal"
    );
}

#[test]
fn preempted_uthreads_using_channels_do_not_deadlock() {
    // Channel internals take an OS mutex: preemption must never switch a uThread out while
    // it holds one, or the next uThread of the worker would block the worker on it.
    let rt = one_worker_with_preemption();
    let (tx, rx) = channel::<u64>(8);
    let deadline = Instant::now() + Duration::from_millis(300);
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let tx = tx.clone();
            rt.spawn(move || {
                let mut sent = 0u64;
                preemptible(|| {
                    while Instant::now() < deadline {
                        if tx.try_send(p).is_ok() {
                            sent += 1;
                        }
                        for _ in 0..200 {
                            std::hint::spin_loop();
                        }
                    }
                });
                sent
            })
            .unwrap()
        })
        .collect();
    drop(tx);
    let consumer = rt
        .spawn(move || {
            let mut got = 0u64;
            preemptible(|| {
                while rx.recv().is_ok() {
                    got += 1;
                }
            });
            got
        })
        .unwrap();
    let release = AtomicBool::new(false);
    let sent: u64 = producers
        .into_iter()
        .map(|p| join_or_fail(p, &release, "a producer"))
        .sum();
    let got = join_or_fail(consumer, &release, "the consumer");
    assert_eq!(sent, got);
    assert!(sent > 0);
    assert!(rt.counters()[0].preemptions > 0, "{:?}", rt.counters());
}
