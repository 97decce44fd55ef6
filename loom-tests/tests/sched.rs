//! Loom models of the scheduler's concurrent protocols, on the real code of
//! `usm_localmanager::{bitfield, park, handoff, task_state}` built over loom's atomics.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p usm-loom-tests --release --test sched`

#![deny(unsafe_code)]
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use usm_localmanager::bitfield::{AtomicBitfield, CHUNK_BITS};
use usm_localmanager::handoff::{idle_step, notify_for_injected};
use usm_localmanager::park::ParkState;
use usm_localmanager::task_state::{RUNNING, STATE_MASK, TaskState};

/// Asserts `index` is the only set bit and that a search from the start of every leaf finds
/// it — including searches that must go through the summaries and the top word.
fn assert_only_and_findable(field: &AtomicBitfield, index: usize) {
    for start in (0..field.capacity()).step_by(64) {
        assert_eq!(
            field.find_next(start),
            Some(index),
            "searching from {start}"
        );
    }
    assert!(!field.is_empty());
    assert_eq!(field.count(), 1);
}

/// A set racing with a claim that empties the same leaf: the summary clear must be undone
/// (re-check), so the set bit stays findable through the summaries.
#[test]
fn idq_set_races_claim_emptying_the_leaf() {
    loom::model(|| {
        let idq = Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
        assert!(idq.set(1));
        let setter = {
            let idq = idq.clone();
            thread::spawn(move || assert!(idq.set(5)))
        };
        assert!(idq.clear(1), "the claim of a set bit succeeds");
        setter.join().unwrap();
        assert_only_and_findable(&idq, 5);
        assert_eq!(idq.take_next(0), Some(5));
        assert!(idq.is_empty());
    });
}

/// Same race one level up: the leaves are in different words of one chunk, so the chunk
/// summary goes empty and the top word is involved; and in different chunks.
#[test]
fn idq_set_races_claim_across_words_and_chunks() {
    for (claimed, set) in [(3usize, 64 + 7), (3, CHUNK_BITS + 64 + 2), (64 + 1, 64 + 9)] {
        loom::model(move || {
            let idq = Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
            idq.set(claimed);
            let setter = {
                let idq = idq.clone();
                thread::spawn(move || {
                    idq.set(set);
                })
            };
            let claimer = {
                let idq = idq.clone();
                thread::spawn(move || {
                    let got = idq.take_next(0).expect("at least the pre-set bit is there");
                    assert!(got == claimed || got == set);
                })
            };
            setter.join().unwrap();
            claimer.join().unwrap();
            // Exactly one of the two bits was claimed; the other is findable from anywhere.
            let left = if idq.is_set(claimed) { claimed } else { set };
            assert_only_and_findable(&idq, left);
            assert!(idq.clear(left));
            assert!(idq.is_empty());
            assert_eq!(idq.find_next(0), None);
        });
    }
}

/// Two claimers race for the same ready uThread (owner vs thief): exactly one wins.
#[test]
fn idq_claim_is_exclusive() {
    loom::model(|| {
        let idq = Arc::new(AtomicBitfield::with_capacity(CHUNK_BITS));
        let wins = Arc::new(AtomicUsize::new(0));
        idq.set(9);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (idq, wins) = (idq.clone(), wins.clone());
                thread::spawn(move || {
                    if idq.take_next(0) == Some(9) {
                        wins.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(wins.load(Ordering::Relaxed), 1);
        assert!(idq.is_empty());
    });
}

/// The fault path: the owner (in the handler) sets the PFQ bit while the worker claims
/// another ready uThread from IDQ; a remote resumer moves the faulted one PFQ → IDQ. In
/// the end the faulted uThread is ready exactly once and PFQ is empty.
#[test]
fn pfq_to_idq_under_concurrent_resume() {
    loom::model(|| {
        // Different leaves of one chunk: the claim of OTHER empties its leaf and then the
        // chunk summary, racing with the resumer's set of FAULTED one level up.
        const FAULTED: usize = 64 + 4;
        const OTHER: usize = 6;
        let pfq = Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
        let idq = Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
        idq.set(OTHER);
        let parked = Arc::new(AtomicBool::new(false));
        let resumer = {
            let (pfq, idq, parked) = (pfq.clone(), idq.clone(), parked.clone());
            thread::spawn(move || {
                // Resume only what is visible in PFQ (the runtime lists PFQ first).
                if parked.load(Ordering::Acquire) && pfq.clear(FAULTED) {
                    idq.set(FAULTED);
                    true
                } else {
                    false
                }
            })
        };
        // Owner: the handler parks FAULTED, then the worker claims the next ready one.
        pfq.set(FAULTED);
        parked.store(true, Ordering::Release);
        let first = idq.take_next(0);
        let resumed = resumer.join().unwrap();
        if !resumed {
            // Resume it now (from the owner); must still find it in PFQ.
            assert!(pfq.clear(FAULTED));
            idq.set(FAULTED);
        }
        assert!(pfq.is_empty() && pfq.find_next(0).is_none());
        let first = first.unwrap();
        assert_only_and_findable(&idq, if first == OTHER { FAULTED } else { OTHER });
        let mut ready = vec![first];
        while let Some(i) = idq.take_next(0) {
            ready.push(i);
        }
        ready.sort_unstable();
        assert_eq!(ready, vec![OTHER, FAULTED]);
    });
}

/// Park/unpark of an idle worker: a notifier publishes work and notifies; the worker
/// never sleeps through it.
#[test]
fn park_unpark_no_lost_wakeup() {
    loom::model(|| {
        let park = Arc::new(ParkState::new());
        let work = Arc::new(AtomicBool::new(false));
        let worker = {
            let (park, work) = (park.clone(), work.clone());
            thread::spawn(move || {
                loop {
                    if work.swap(false, Ordering::AcqRel) {
                        return;
                    }
                    idle_step(&park, || work.load(Ordering::Acquire), thread::park);
                }
            })
        };
        // Published with an RMW, not a store: loom 0.7 can order a plain store between the
        // read and the write of a concurrent swap (tokio-rs/loom#254), which real hardware
        // and the C++ model forbid. The real code (ParkState, bitfields) only uses RMWs on
        // words that other threads RMW.
        work.swap(true, Ordering::AcqRel);
        if park.notify() {
            worker.thread().unpark();
        }
        // If a wake-up were lost, loom reports the worker parked forever (deadlock).
        worker.join().unwrap();
    });
}

/// The injector hand-off: a producer pushes into a shared queue and runs
/// `notify_for_injected`; two idle workers run `idle_step`. The item is always taken (no
/// worker sleeps through it), and the producer can then stop both workers the same way.
///
/// crossbeam's injector is not loom-aware, so an atomic counter of queued items stands in for
/// it (its push / steal / is_empty are linearisable, which is all the protocol relies on). A
/// loom `Mutex` would not do: loom turns an unpark that lands while a thread is blocked on a
/// mutex into a plain wake-up and drops the park token, which real threads never do.
#[test]
fn injector_handoff_reaches_a_worker() {
    loom::model(|| {
        let queued = Arc::new(AtomicUsize::new(0));
        let parks = Arc::new([ParkState::new(), ParkState::new()]);
        let done = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicUsize::new(0));
        let round_robin = AtomicUsize::new(0);
        let pop = |queued: &AtomicUsize| {
            queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        };
        let workers: Vec<_> = (0..2)
            .map(|me| {
                let (queued, parks, done, taken) =
                    (queued.clone(), parks.clone(), done.clone(), taken.clone());
                thread::spawn(move || {
                    loop {
                        if pop(&queued) {
                            taken.fetch_add(1, Ordering::AcqRel);
                        }
                        if done.load(Ordering::Acquire) {
                            return;
                        }
                        idle_step(
                            &parks[me],
                            || queued.load(Ordering::Acquire) > 0 || done.load(Ordering::Acquire),
                            thread::park,
                        );
                    }
                })
            })
            .collect();
        // Producer: push, then hand off.
        queued.fetch_add(1, Ordering::AcqRel);
        if let Some(chosen) = notify_for_injected(2, |i| &parks[i], &round_robin) {
            workers[chosen].thread().unpark();
        }
        // If the hand-off lost the item, this wait never ends and loom reports a deadlock
        // (every other thread parked) or exhausts its branches.
        while taken.load(Ordering::Acquire) == 0 {
            thread::yield_now();
        }
        // Shutdown through the same protocol.
        done.store(true, Ordering::Release);
        for (i, worker) in workers.iter().enumerate() {
            if parks[i].notify() {
                worker.thread().unpark();
            }
        }
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(taken.load(Ordering::Acquire), 1);
    });
}

/// What the worker does when a round found nothing (mirrors `LocalManager::idle` in eventfd
/// mode): drop stale summary hints, then the real `idle_step` with `has_work` reading the IDQ
/// top word, blocking in `thread::park` (the eventfd).
fn worker_idle(idq: &AtomicBitfield, park: &ParkState) {
    if !idq.is_empty() && idq.find_next(0).is_none() {
        idq.scrub_stale_hints();
    }
    idle_step(park, || !idq.is_empty(), thread::park);
}

/// The daemon's shape: a uThread parks on its worker while a plain OS thread (not a worker)
/// publishes its condition and unparks it; meanwhile a thief on the other core claims
/// another ready uThread of the same worker (its claim empties a leaf, the chunk summary and
/// the top word, and may have to restore them) and the worker runs out of work and goes to
/// sleep. Real code throughout: `TaskState` (park token), `AtomicBitfield` (IDQ),
/// `ParkState` + `idle_step` (worker sleep), `clear_reporting` (thief's restore → wake).
/// The unpark may land before the park completed (`RUNNING` → token), between it and the
/// worker's idle check, or while the worker sleeps; the uThread must run again every time.
#[test]
fn unpark_from_outside_reaches_a_sleeping_worker() {
    loom::model(|| {
        const SLOT: usize = 5;
        const OTHER: usize = 64 + 1;
        let idq = Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
        let park = Arc::new(ParkState::new());
        let state = Arc::new(TaskState::new(RUNNING));
        let condition = Arc::new(AtomicBool::new(false));
        idq.set(OTHER);
        let worker = {
            let (idq, park, state, condition) =
                (idq.clone(), park.clone(), state.clone(), condition.clone());
            thread::spawn(move || {
                // The uThread in SLOT checked its condition (false) and parked: the worker
                // completes the park.
                if state.finish_park() {
                    idq.set(SLOT);
                }
                loop {
                    match idq.take_next(0) {
                        Some(SLOT) => {
                            // Resumed: it was made ready only because the condition holds.
                            state.claim_running();
                            assert_eq!(state.load() & STATE_MASK, RUNNING);
                            assert!(condition.load(Ordering::Acquire));
                            return;
                        }
                        Some(other) => assert_eq!(other, OTHER),
                        None => worker_idle(&idq, &park),
                    }
                }
            })
        };
        let thief = {
            let (idq, park) = (idq.clone(), park.clone());
            let worker = worker.thread().clone();
            thread::spawn(move || {
                let cleared = idq.clear_reporting(OTHER);
                if cleared.restored_summary && park.notify() {
                    worker.unpark();
                }
            })
        };
        // The OS thread: publish the condition, unpark (`Task::unpark` + `make_ready`).
        condition.store(true, Ordering::Release);
        if state.unpark() {
            idq.set(SLOT);
            if park.notify() {
                worker.thread().unpark();
            }
        }
        // A lost wake-up leaves the worker parked forever: loom reports a deadlock.
        thief.join().unwrap();
        worker.join().unwrap();
        assert!(idq.is_empty() || idq.find_next(0).is_none());
    });
}

/// A setter descheduled between its leaf RMW and its summary RMW must not hide a second
/// setter's bit in the same leaf from a search through the summaries (the second one helps
/// publish the summary bit).
#[test]
fn second_setter_does_not_wait_for_the_first() {
    loom::model(|| {
        let idq = Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
        let first = {
            let idq = idq.clone();
            thread::spawn(move || {
                idq.set(64 + 3);
            })
        };
        idq.set(64 + 9);
        // Our set returned: our bit is findable from anywhere, whatever the first setter's
        // progress (it may not have published anything yet).
        let found = idq.find_next(0).expect("a set bit is findable");
        assert!(found == 64 + 3 || found == 64 + 9);
        assert!(!idq.is_empty());
        first.join().unwrap();
    });
}

/// The owner's fused yield (`requeue_and_take_next`) racing a thief's claim and a waker's
/// set: every ready uThread ends up claimed exactly once or still findable — none lost,
/// none run twice.
#[test]
fn yield_requeue_races_thief_and_waker() {
    loom::model(|| {
        const RUNNING_ONE: usize = 1;
        const READY: usize = 9;
        const WOKEN: usize = 12;
        let idq = Arc::new(AtomicBitfield::with_capacity(CHUNK_BITS));
        idq.set(READY);
        let thief = {
            let idq = idq.clone();
            thread::spawn(move || idq.take_next(0))
        };
        let waker = {
            let idq = idq.clone();
            thread::spawn(move || {
                idq.set(WOKEN);
            })
        };
        let owner = idq.requeue_and_take_next(RUNNING_ONE);
        let stolen = thief.join().unwrap();
        waker.join().unwrap();
        let mut claimed: Vec<usize> = owner.into_iter().chain(stolen).collect();
        while let Some(i) = idq.take_next(0) {
            claimed.push(i);
        }
        claimed.sort_unstable();
        assert_eq!(claimed, vec![RUNNING_ONE, READY, WOKEN]);
        assert!(idq.is_empty());
    });
}
