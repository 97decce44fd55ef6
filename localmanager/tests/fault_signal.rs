//! The fault path's scheduler half with real signals: a uThread touches a page of a
//! `MAP_SHARED` file mapping beyond end-of-file, the kernel raises SIGBUS on it, the handler
//! (on the uThread's stack, `SA_NODEFER|SA_SIGINFO`) parks it in PFQ with the fault address
//! and write bit, another thread "resolves" the fault (extends the file) and moves it
//! PFQ → IDQ, and the uThread returns from the handler and retries the access.

#![deny(unsafe_code)]

use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, Ordering};

use usm_localmanager::signal::{FaultedUThread, current_fault_key, park_current_on_fault};
use usm_localmanager::{Builder, Handle, worker_index, yield_now};

#[allow(unsafe_code)] // the test's system calls: its only unsafe code
mod sys {
    //! Signal handler installation and file mappings (the test's unsafe code).

    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Once;

    pub(crate) const PAGE: usize = 4096;

    extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as u64;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted ucontext;
        // REG_ERR holds the page-fault error code (bit 1 = write).
        let write = unsafe {
            (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_ERR as usize]
        } & 2
            != 0;
        #[cfg(not(target_arch = "x86_64"))]
        let write = {
            let _ = ctx;
            false
        };
        let payload = (addr & !(PAGE as u64 - 1)) | write as u64;
        if !usm_localmanager::signal::park_current_on_fault(payload) {
            // Not on a uThread: fall back to the default action, the retried access kills us.
            // SAFETY: restoring SIG_DFL is async-signal-safe.
            unsafe {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }

    /// Installs the SIGBUS handler once for the whole test binary.
    pub(crate) fn install_sigbus_handler() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: a zeroed sigaction is a valid starting point; we fill handler, flags
            // and an empty mask before installing it.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
                libc::sigemptyset(&mut action.sa_mask);
                assert_eq!(
                    libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()),
                    0
                );
            }
        });
    }

    /// A `MAP_SHARED` mapping of a memfd whose size starts below the mapping's length:
    /// touching a page past end-of-file raises SIGBUS.
    pub(crate) struct FileMapping {
        fd: OwnedFd,
        base: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain shared memory; accesses go through volatile reads and
    // writes of single bytes.
    unsafe impl Send for FileMapping {}
    // SAFETY: see above.
    unsafe impl Sync for FileMapping {}

    impl FileMapping {
        pub(crate) fn new(pages: usize, file_pages: usize) -> Self {
            // SAFETY: plain syscalls; results checked.
            unsafe {
                let fd = libc::memfd_create(c"usm-fault-test".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0);
                let fd = OwnedFd::from_raw_fd(fd);
                assert_eq!(
                    libc::ftruncate(fd.as_raw_fd(), (file_pages * PAGE) as i64),
                    0
                );
                let base = libc::mmap(
                    std::ptr::null_mut(),
                    pages * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                );
                assert_ne!(base, libc::MAP_FAILED);
                Self {
                    fd,
                    base: base.cast(),
                    len: pages * PAGE,
                }
            }
        }

        pub(crate) fn addr(&self, offset: usize) -> u64 {
            self.base as u64 + offset as u64
        }

        pub(crate) fn contains(&self, addr: u64) -> bool {
            (self.base as u64..self.base as u64 + self.len as u64).contains(&addr)
        }

        /// Makes the file `pages` long: the pages become accessible.
        pub(crate) fn extend(&self, pages: usize) {
            // SAFETY: ftruncate on our own memfd.
            let rc = unsafe { libc::ftruncate(self.fd.as_raw_fd(), (pages * PAGE) as i64) };
            assert_eq!(rc, 0);
        }

        pub(crate) fn write(&self, offset: usize, value: u8) {
            assert!(offset < self.len);
            // SAFETY: in bounds of our mapping; a SIGBUS here is the point of the test.
            unsafe { self.base.add(offset).write_volatile(value) }
        }

        pub(crate) fn read(&self, offset: usize) -> u8 {
            assert!(offset < self.len);
            // SAFETY: as in `write`.
            unsafe { self.base.add(offset).read_volatile() }
        }

        /// Keeps the mapping forever (a uThread parked on it is leaked on purpose).
        pub(crate) fn leak(self) {
            std::mem::forget(self);
        }
    }

    impl Drop for FileMapping {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping; nobody uses it any more.
            unsafe {
                libc::munmap(self.base.cast(), self.len);
            }
        }
    }
}

use sys::{FileMapping, PAGE};

fn wait_for_faults(handle: &Handle, workers: &[usize], at_least: usize) -> Vec<FaultedUThread> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let faulted: Vec<_> = workers.iter().flat_map(|&w| handle.faulted(w)).collect();
        if faulted.len() >= at_least {
            return faulted;
        }
        assert!(Instant::now() < deadline, "no fault parked after 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sigbus_parks_the_uthread_and_it_resumes_inside_the_handler() {
    sys::install_sigbus_handler();
    let rt = Builder::new().workers(2).build().unwrap();
    let handle = rt.handle();
    let mapping = Arc::new(FileMapping::new(2, 1));
    let m = mapping.clone();
    let faulting = rt
        .spawn_on(0, move || {
            let before = worker_index();
            let key = current_fault_key().unwrap();
            m.write(0, 1); // page 0 is backed: no fault
            m.write(PAGE + 8, 0xAB); // past EOF: SIGBUS, parked inside the handler
            let after = worker_index();
            (before, after, key, m.read(PAGE + 8))
        })
        .unwrap();

    let faulted = wait_for_faults(&handle, &[0], 1);
    assert_eq!(faulted.len(), 1);
    let entry = faulted[0];
    assert_eq!(entry.key.worker, 0);
    assert_eq!(entry.payload & !1, mapping.addr(PAGE));
    #[cfg(target_arch = "x86_64")]
    assert_eq!(entry.payload & 1, 1, "a write fault");
    assert!(!faulting.is_finished());

    // The worker is not blocked: another uThread on worker 0 runs to completion meanwhile.
    let other = rt
        .spawn_on(0, || {
            for _ in 0..10 {
                yield_now();
            }
            worker_index()
        })
        .unwrap();
    assert_eq!(other.join().unwrap(), Some(0));
    assert!(!faulting.is_finished(), "still parked in PFQ");
    assert_eq!(handle.faulted(0).len(), 1);

    // Resolve and resume from this (foreign) thread.
    mapping.extend(2);
    assert!(handle.resume_faulted(entry.key));
    assert!(!handle.resume_faulted(entry.key), "one resumer per fault");
    let (before, after, key, value) = faulting.join().unwrap();
    assert_eq!(before, Some(0));
    assert_eq!(after, Some(0), "resumed on the worker it faulted on");
    assert_eq!(key, entry.key);
    assert_eq!(
        value, 0xAB,
        "the access was retried after the handler returned"
    );
    let counters = rt.counters();
    assert_eq!(counters[0].faults, 1);
    assert_eq!(counters[0].fault_resumes, 1);
    assert!(handle.faulted(0).is_empty());
    let report = rt.shutdown(Duration::from_secs(1));
    assert!(report.stuck_in_handler.is_empty());
}

#[test]
fn many_concurrent_faults_on_both_workers() {
    const N: usize = 64;
    sys::install_sigbus_handler();
    let rt = Builder::new().workers(2).build().unwrap();
    let handle = rt.handle();
    let mappings: Arc<Vec<FileMapping>> =
        Arc::new((0..N).map(|_| FileMapping::new(1, 0)).collect());
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let mappings = mappings.clone();
            rt.spawn_on(i % 2, move || {
                yield_now();
                let before = worker_index();
                let value = mappings[i].read(100); // past EOF (file is empty): SIGBUS
                (before, worker_index(), value)
            })
            .unwrap()
        })
        .collect();

    // Resolver: a plain OS thread, like the runtime's swap-in completion path would be.
    let done = Arc::new(AtomicBool::new(false));
    let resolver = {
        let handle = handle.clone();
        let mappings = mappings.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut resumed = 0;
            while !done.load(Ordering::SeqCst) {
                for worker in 0..2 {
                    for faulted in handle.faulted(worker) {
                        let addr = faulted.payload & !1;
                        let mapping = mappings.iter().find(|m| m.contains(addr)).unwrap();
                        mapping.extend(1);
                        assert!(handle.resume_faulted(faulted.key));
                        resumed += 1;
                    }
                }
                std::thread::yield_now();
            }
            resumed
        })
    };
    for h in handles {
        let (before, after, value) = h.join().unwrap();
        assert_eq!(
            before, after,
            "a uThread parked in the handler never migrates"
        );
        assert_eq!(value, 0);
    }
    done.store(true, Ordering::SeqCst);
    let resumed = resolver.join().unwrap();
    assert_eq!(resumed, N);
    let counters = rt.counters();
    assert_eq!(counters.iter().map(|c| c.faults).sum::<u64>(), N as u64);
    assert_eq!(
        counters.iter().map(|c| c.fault_resumes).sum::<u64>(),
        N as u64
    );
    assert!(
        counters.iter().all(|c| c.faults > 0),
        "faults on both workers: {counters:?}"
    );
}

#[test]
fn shutdown_reports_and_never_drops_a_uthread_parked_in_the_handler() {
    sys::install_sigbus_handler();
    let rt = Builder::new().workers(2).build().unwrap();
    let handle = rt.handle();
    let mapping = Arc::new(FileMapping::new(1, 0));
    let m = mapping.clone();
    let stuck = rt.spawn_on(1, move || m.read(0)).unwrap();
    let finisher = rt.spawn(|| 3).unwrap();
    let faulted = wait_for_faults(&handle, &[1], 1);
    let started = Instant::now();
    let report = rt.shutdown(Duration::from_millis(300));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "shutdown waited for it"
    );
    assert_eq!(finisher.join().unwrap(), 3);
    assert_eq!(report.stuck_in_handler, faulted);
    assert!(
        !stuck.is_finished(),
        "never completed, never dropped (no Cancelled)"
    );
    // Its stack and the mapping it faulted on stay alive; the process carries on.
    drop(stuck);
    match Arc::try_unwrap(mapping) {
        Ok(mapping) => mapping.leak(),
        Err(still_shared) => std::mem::forget(still_shared),
    }
}

#[test]
fn off_a_uthread_the_primitive_refuses() {
    assert!(!park_current_on_fault(0x1000));
    assert!(current_fault_key().is_none());
}

#[test]
fn a_resumed_fault_is_never_stolen_even_while_stealing_is_busy() {
    const FAULTING: usize = 32;
    sys::install_sigbus_handler();
    let rt = Builder::new().workers(2).build().unwrap();
    let handle = rt.handle();
    let mappings: Arc<Vec<FileMapping>> =
        Arc::new((0..FAULTING).map(|_| FileMapping::new(1, 0)).collect());
    let m = mappings.clone();
    // Everything starts on worker 0 (spawned from a uThread there) and is migratable; noise
    // keeps worker 0 overloaded so worker 1 steals.
    let parent = rt
        .spawn_on(0, move || {
            let noise: Vec<_> = (0..100)
                .map(|_| {
                    usm_localmanager::spawn(|| {
                        for _ in 0..20 {
                            let until = Instant::now() + Duration::from_micros(20);
                            while Instant::now() < until {
                                std::hint::spin_loop();
                            }
                            yield_now();
                        }
                    })
                    .unwrap()
                })
                .collect();
            let faulting: Vec<_> = (0..FAULTING)
                .map(|i| {
                    let m = m.clone();
                    usm_localmanager::spawn(move || {
                        yield_now();
                        let before = worker_index();
                        let value = m[i].read(0);
                        let after = worker_index();
                        for _ in 0..5 {
                            yield_now(); // free to migrate again now
                        }
                        (before, after, value)
                    })
                    .unwrap()
                })
                .collect();
            for n in noise {
                n.join().unwrap();
            }
            faulting
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut resumed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while resumed < FAULTING {
        assert!(Instant::now() < deadline);
        for worker in 0..2 {
            for faulted in handle.faulted(worker) {
                let addr = faulted.payload & !1;
                mappings
                    .iter()
                    .find(|m| m.contains(addr))
                    .unwrap()
                    .extend(1);
                assert!(handle.resume_faulted(faulted.key));
                resumed += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    for (before, after, value) in parent.join().unwrap() {
        assert_eq!(before, after, "resumed on the worker it faulted on");
        assert_eq!(value, 0);
    }
    let counters = rt.counters();
    assert!(counters[1].steals > 0, "stealing was active: {counters:?}");
}

/// The runtime's normal arrangement: the worker's own driver sees PFQ, resolves the fault
/// and resumes the uThread (PFQ → IDQ from its own worker, no cross-core wake).
#[test]
fn the_workers_own_driver_resolves_and_resumes_faults() {
    use usm_localmanager::{Driver, DriverContext};

    struct Resolver {
        mappings: Arc<Vec<FileMapping>>,
        resumed: Arc<usm_sync::atomic::AtomicUsize>,
        faulted: Vec<FaultedUThread>,
    }
    impl Driver for Resolver {
        fn poll(&mut self, cx: &mut DriverContext<'_>) -> usize {
            self.faulted.clear();
            cx.faulted(&mut self.faulted);
            for f in &self.faulted {
                assert_eq!(f.key.worker, cx.worker());
                let addr = f.payload & !1;
                self.mappings
                    .iter()
                    .find(|m| m.contains(addr))
                    .unwrap()
                    .extend(1);
                assert!(cx.resume_faulted(f.key.slot));
                self.resumed.fetch_add(1, Ordering::Relaxed);
            }
            self.faulted.len()
        }
    }

    sys::install_sigbus_handler();
    const N: usize = 16;
    let mappings: Arc<Vec<FileMapping>> =
        Arc::new((0..N).map(|_| FileMapping::new(1, 0)).collect());
    let resumed = Arc::new(usm_sync::atomic::AtomicUsize::new(0));
    let factory = {
        let (mappings, resumed) = (mappings.clone(), resumed.clone());
        Arc::new(move |_worker: usize| -> Box<dyn Driver> {
            Box::new(Resolver {
                mappings: mappings.clone(),
                resumed: resumed.clone(),
                faulted: Vec::new(),
            })
        })
    };
    let rt = Builder::new().workers(2).driver(factory).build().unwrap();
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let m = mappings.clone();
            rt.spawn_on(i % 2, move || {
                m[i].write(64, i as u8); // SIGBUS, parked, resolved by the driver
                m[i].read(64)
            })
            .unwrap()
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), i as u8);
    }
    assert_eq!(resumed.load(Ordering::Relaxed), N);
    let counters = rt.counters();
    assert_eq!(
        counters.iter().map(|c| c.fault_resumes).sum::<u64>(),
        N as u64
    );
}
