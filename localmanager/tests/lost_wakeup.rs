//! Stress for the "lost wake-up" shape reported by the daemon: uThreads park (generic park,
//! and the fault path `park_current_on_fault` from a real signal handler), plain OS threads
//! (not workers) unpark / resume them after random delays, and the workers keep running
//! out of work and going idle (eventfd: blocking in `ppoll`; busy-poll: spinning). Every
//! uThread must finish before a deadline; a lost wake-up fails the test with the ids of the
//! uThreads still waiting and the counters, instead of hanging.
//!
//! Delays are drawn so that each race gets exercised: an unpark issued at once (it lands
//! while the uThread is still running, before its park completed), after a few
//! microseconds of spinning (around the worker's `finish_park`), and after a sleep long
//! enough for the workers to go idle and block in their waker.

#![deny(unsafe_code)]

use std::sync::mpsc;
use std::time::{Duration, Instant};
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use usm_localmanager::signal::{FaultKey, current_fault_key};
use usm_localmanager::{Builder, Handle, Runtime, Unparker, WakerMode, yield_now};

#[allow(unsafe_code)] // the test's system calls: its only unsafe code
mod sys {
    //! A real signal whose handler parks the uThread in PFQ (the fault path's entry), raised
    //! synchronously on the uThread's own stack.

    use std::sync::Once;

    /// The signal standing in for SIGBUS (the same handler flags as the runtime's).
    pub(crate) const FAULT_SIGNAL: libc::c_int = libc::SIGUSR2;

    extern "C" fn on_fault_signal(
        _sig: libc::c_int,
        _info: *mut libc::siginfo_t,
        _: *mut libc::c_void,
    ) {
        // Payload: any value (the resumers go by key).
        let _ = usm_localmanager::signal::park_current_on_fault(0x5a5a_0000);
    }

    pub(crate) fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: a zeroed sigaction is valid; handler, flags and an empty mask are set
            // before installing it.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_fault_signal as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                assert_eq!(
                    libc::sigaction(FAULT_SIGNAL, &action, std::ptr::null_mut()),
                    0
                );
            }
        });
    }

    /// Raises the signal on this thread: the handler runs on the current (uThread) stack
    /// before this returns, parks in PFQ, and returns once resumed.
    pub(crate) fn fault_now() {
        // SAFETY: raise is async-signal-safe; the handler was installed by `install`.
        let rc = unsafe { libc::raise(FAULT_SIGNAL) };
        assert_eq!(rc, 0);
    }
}

/// What a uThread asks an OS thread to do for it.
enum Request {
    /// Set `flag`, then unpark.
    Unpark {
        unparker: Unparker,
        flag: Arc<AtomicBool>,
        delay: Delay,
    },
    /// Resume the PFQ entry `key` (retrying until the handler has put it there).
    Resume { key: FaultKey, delay: Delay },
}

#[derive(Clone, Copy, Debug)]
enum Delay {
    None,
    SpinMicros(u64),
    SleepMicros(u64),
}

impl Delay {
    fn from_random(r: u64) -> Delay {
        match r % 8 {
            0 | 1 => Delay::None,
            2 | 3 => Delay::SpinMicros(r >> 8 & 15),
            _ => Delay::SleepMicros(50 + (r >> 8) % 400),
        }
    }

    fn wait(self) {
        match self {
            Delay::None => {}
            Delay::SpinMicros(us) => {
                let until = Instant::now() + Duration::from_micros(us);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            Delay::SleepMicros(us) => std::thread::sleep(Duration::from_micros(us)),
        }
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Config {
    mode: WakerMode,
    workers: usize,
    pin: bool,
    /// Spin before parking (eventfd mode): zero makes every idle period a real sleep.
    spin: Duration,
    uthreads: usize,
    iterations: usize,
    unparkers: usize,
    faults: bool,
    deadline: Duration,
}

/// Shared by the uThreads of the test: each *chain* is a sequence of short-lived uThreads
/// (every few iterations the running one spawns its successor and finishes), so slots are
/// freed and reused while unparks and resumes for other uThreads are in flight.
struct Chains {
    queues: Vec<Mutex<mpsc::Sender<Request>>>,
    handle: Handle,
    done: AtomicUsize,
    /// Per chain: iterations completed (for the failure report).
    progress: Vec<AtomicUsize>,
    iterations: usize,
    faults: bool,
}

/// Iterations one uThread of a chain runs before handing over to a fresh one.
const HAND_OVER_EVERY: usize = 16;

fn run_chain(chains: Arc<Chains>, chain: usize, first: usize) {
    let mut rng =
        0x9e37_79b9_7f4a_7c15u64 ^ ((chain * 7919 + first) as u64 + 1).wrapping_mul(0x2545_f491);
    for it in first..chains.iterations {
        if it > first && it % HAND_OVER_EVERY == 0 {
            // Hand over: from here (this worker's spawn queue) or through the injector.
            let next = chains.clone();
            if it / HAND_OVER_EVERY % 2 == 0 {
                usm_localmanager::spawn(move || run_chain(next, chain, it)).unwrap();
            } else {
                chains
                    .handle
                    .spawn(move || run_chain(next, chain, it))
                    .unwrap();
            }
            return;
        }
        let r = xorshift(&mut rng);
        let queue = &chains.queues[(r >> 32) as usize % chains.queues.len()];
        let delay = Delay::from_random(xorshift(&mut rng));
        if chains.faults && r % 3 == 0 {
            // The fault path: park in PFQ from a signal handler, resumed from an OS thread.
            let key = current_fault_key().unwrap();
            queue
                .lock()
                .unwrap()
                .send(Request::Resume { key, delay })
                .unwrap();
            sys::fault_now();
        } else {
            let flag = Arc::new(AtomicBool::new(false));
            queue
                .lock()
                .unwrap()
                .send(Request::Unpark {
                    unparker: usm_localmanager::current().unwrap(),
                    flag: flag.clone(),
                    delay,
                })
                .unwrap();
            if r % 5 == 0 {
                // Still running when an immediate unpark lands.
                yield_now();
            }
            while !flag.load(Ordering::SeqCst) {
                usm_localmanager::park();
            }
        }
        chains.progress[chain].store(it + 1, Ordering::Relaxed);
        if r % 7 == 0 {
            yield_now();
        }
    }
    chains.done.fetch_add(1, Ordering::SeqCst);
}

fn stress(config: Config) {
    if config.faults {
        sys::install();
    }
    let rt: Runtime = Builder::new()
        .workers(config.workers)
        .pin(config.pin)
        .spin_before_park(config.spin)
        .waker(config.mode)
        .build()
        .unwrap();
    let handle: Handle = rt.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let resumed_faults = Arc::new(AtomicU64::new(0));
    // OS threads doing the unparks, each with its own request queue.
    let mut queues = Vec::new();
    let mut unparkers = Vec::new();
    for u in 0..config.unparkers {
        let (tx, rx) = mpsc::channel::<Request>();
        queues.push(Mutex::new(tx));
        let (stop, handle, resumed_faults) = (stop.clone(), handle.clone(), resumed_faults.clone());
        unparkers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(request) = rx.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                match request {
                    Request::Unpark {
                        unparker,
                        flag,
                        delay,
                    } => {
                        delay.wait();
                        flag.store(true, Ordering::SeqCst);
                        unparker.unpark();
                    }
                    Request::Resume { key, delay } => {
                        delay.wait();
                        let give_up = Instant::now() + Duration::from_secs(30);
                        while !handle.resume_faulted(key) {
                            assert!(
                                Instant::now() < give_up,
                                "fault {key:?} never reached PFQ (unparker {u})"
                            );
                            std::thread::yield_now();
                        }
                        resumed_faults.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let chains = Arc::new(Chains {
        queues,
        handle: handle.clone(),
        done: AtomicUsize::new(0),
        progress: (0..config.uthreads).map(|_| AtomicUsize::new(0)).collect(),
        iterations: config.iterations,
        faults: config.faults,
    });
    for chain in 0..config.uthreads {
        let chains = chains.clone();
        rt.spawn(move || run_chain(chains, chain, 0)).unwrap();
    }
    let deadline = Instant::now() + config.deadline;
    while chains.done.load(Ordering::SeqCst) < config.uthreads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let finished = chains.done.load(Ordering::SeqCst);
    if finished < config.uthreads {
        let stuck: Vec<(usize, usize)> = chains
            .progress
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.load(Ordering::Relaxed)))
            .filter(|&(_, p)| p < config.iterations)
            .collect();
        let counters = handle.counters();
        stop.store(true, Ordering::Relaxed);
        panic!(
            "lost wake-up ({:?}): {finished}/{} chains finished within {:?}; stuck \
             (chain, iterations done): {stuck:?}; counters: {counters:?}",
            config.mode, config.uthreads, config.deadline
        );
    }
    stop.store(true, Ordering::Relaxed);
    for u in unparkers {
        u.join().unwrap();
    }
    let counters = rt.counters();
    let parks: u64 = counters.iter().map(|c| c.parks).sum();
    let faults: u64 = counters.iter().map(|c| c.faults).sum();
    assert!(parks > 0, "generic parks happened: {counters:?}");
    if config.faults {
        assert!(faults > 0, "fault parks happened: {counters:?}");
        assert_eq!(faults, resumed_faults.load(Ordering::Relaxed));
    }
    if config.mode == WakerMode::EventFd {
        assert!(
            counters.iter().map(|c| c.worker_parks).sum::<u64>() > 0,
            "the workers went to sleep at least once: {counters:?}"
        );
    }
    let report = rt.shutdown(Duration::from_secs(2));
    assert_eq!(report.cancelled, 0, "{report:?}");
    assert!(report.stuck_in_handler.is_empty(), "{report:?}");
}

#[test]
fn unparks_from_os_threads_are_never_lost_eventfd() {
    stress(Config {
        mode: WakerMode::EventFd,
        workers: 2,
        pin: true,
        spin: Duration::ZERO,
        uthreads: 64,
        iterations: 150,
        unparkers: 3,
        faults: true,
        deadline: Duration::from_secs(40),
    });
}

#[test]
fn unparks_from_os_threads_are_never_lost_busy_poll() {
    stress(Config {
        mode: WakerMode::BusyPoll,
        workers: 2,
        pin: true,
        spin: Duration::ZERO,
        uthreads: 64,
        iterations: 100,
        unparkers: 3,
        faults: true,
        deadline: Duration::from_secs(40),
    });
}

/// The daemon's configuration: workers not pinned, more workers than cores (so a worker
/// can be descheduled anywhere in its sleep protocol), default adaptive spin before parking.
#[test]
fn unparks_from_os_threads_are_never_lost_unpinned_oversubscribed() {
    stress(Config {
        mode: WakerMode::EventFd,
        workers: 4,
        pin: false,
        spin: usm_localmanager::DEFAULT_SPIN_BEFORE_PARK,
        uthreads: 64,
        iterations: 100,
        unparkers: 4,
        faults: true,
        deadline: Duration::from_secs(40),
    });
}

/// A fault key names one fault: resuming with a key of an earlier fault of the same slot,
/// or of the slot's earlier occupant, does nothing (the parked uThread stays parked).
#[test]
fn stale_fault_keys_are_ignored() {
    sys::install();
    let rt = Builder::new().workers(1).build().unwrap();
    let handle = rt.handle();
    let (tx, rx) = mpsc::channel::<FaultKey>();
    let wait_parked = |key: FaultKey| {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !handle.faulted(0).iter().any(|f| f.key == key) {
            assert!(Instant::now() < give_up, "{key:?} never listed in PFQ");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let tx_a = tx.clone();
    let a = rt
        .spawn(move || {
            for _ in 0..2 {
                tx_a.send(current_fault_key().unwrap()).unwrap();
                sys::fault_now();
            }
        })
        .unwrap();
    let k1 = rx.recv().unwrap();
    wait_parked(k1);
    assert!(handle.resume_faulted(k1));
    assert!(!handle.resume_faulted(k1), "a fault is resumed once");
    let k2 = rx.recv().unwrap();
    assert_eq!((k2.worker, k2.slot), (k1.worker, k1.slot));
    assert_ne!(k2.generation, k1.generation);
    wait_parked(k2);
    assert!(
        !handle.resume_faulted(k1),
        "the first fault's key resumes nothing"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert!(!a.is_finished(), "still parked on its second fault");
    assert_eq!(handle.faulted(0).len(), 1);
    assert!(handle.resume_faulted(k2));
    a.join().unwrap();
    // A new uThread in the same slot.
    let b = rt
        .spawn(move || {
            tx.send(current_fault_key().unwrap()).unwrap();
            sys::fault_now();
        })
        .unwrap();
    let k3 = rx.recv().unwrap();
    assert_eq!(
        k3.slot, k1.slot,
        "the slot was reused (one worker, lowest free slot)"
    );
    wait_parked(k3);
    assert!(!handle.resume_faulted(k1) && !handle.resume_faulted(k2));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!b.is_finished(), "the new occupant stays parked");
    assert!(handle.resume_faulted(k3));
    b.join().unwrap();
    let report = rt.shutdown(Duration::from_secs(1));
    assert!(report.stuck_in_handler.is_empty());
}
