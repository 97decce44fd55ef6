//! The per-worker fault driver: the LocalManager calls it every scheduling round.
//!
//! # One poll
//! 1. Reap this worker's io_uring ([`WorkerMm::poll`]): write-backs recorded, swap-ins
//!    installed (their waiters on other workers are woken through their eventfds).
//! 2. Claim plain-thread faults posted for this runtime (external slots POSTED →
//!    SERVING).
//! 3. Evaluate, *level-triggered*, every fault this worker holds: each uThread in its PFQ
//!    and each claimed external fault goes to [`WorkerMm::handle_fault`] again. Present →
//!    resume (PFQ → IDQ, or DONE + futex wake); swap-in in flight or no memory → keep it.
//!    Re-evaluating instead of remembering means no wake-up can be lost: a page installed
//!    by another worker is simply found present at the next round.
//!
//! # Synchronous swap-in ([`SwapInMode::Sync`], the kernel-like baseline inside USM)
//! Step 3 does not leave a uThread in PFQ when its page is not there yet: the driver
//! blocks the worker in `io_uring_enter` (or sleeps 20 µs at a time when the read is on
//! another worker's ring, or frames are still being written back) until the page is
//! installed, then resumes it — the core runs no other uThread meanwhile, as a kernel
//! fault would block it. Counted in `worker_blocked`. After 5 s of waiting the driver gives
//! up for this round and the uThread stays parked (a shutdown is never held forever).
//!
//! # Idle time
//! A worker with nothing to run does one slice of background reclaim
//! ([`WorkerMm::reclaim_slice`]) before it idles: every worker is a reclaimer, so a fault
//! below the low watermark asks them instead of evicting up to the high one itself.
//!
//! A uThread is resumed only by the worker it is parked on (the scheduler guarantees it
//! runs there again), and never dropped while parked (shutdown waits for it).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::Ordering;

use nix::sys::eventfd::EventFd;
use usm_localmanager::signal::FaultedUThread;
use usm_localmanager::{Driver, DriverContext};

use crate::embedded::SwapInMode;
use crate::embedded::runtime::Shared;
use crate::mm::{FaultClock, FaultPath, FaultResult, MmStats, WorkerMm};
use crate::sys::sigbus;

struct Waiting {
    clock: FaultClock,
    waited_io: bool,
    needs_memory: bool,
}

pub(crate) struct FaultDriver {
    wm: WorkerMm,
    shared: Arc<Shared>,
    own_fd: Arc<EventFd>,
    uthreads: HashMap<u32, Waiting>,
    external: HashMap<usize, Waiting>,
    faulted: Vec<FaultedUThread>,
}

impl FaultDriver {
    pub(crate) fn new(wm: WorkerMm, shared: Arc<Shared>) -> FaultDriver {
        let own_fd = shared.worker_fds[wm.worker()].clone();
        wm.join_reclaim();
        FaultDriver {
            wm,
            shared,
            own_fd,
            uthreads: HashMap::new(),
            external: HashMap::new(),
            faulted: Vec::new(),
        }
    }

    /// Serves one fault; `true` when the faulting thread may resume.
    fn evaluate(&mut self, payload: u64, waiting: &mut Waiting) -> bool {
        let addr = payload & !0xfff;
        let write = payload & sigbus::PAYLOAD_WRITE != 0;
        let r = self.wm.handle_fault(self.shared.pid, addr, write, 0);
        match r {
            FaultResult::Resolved(path) => {
                let path = if waiting.waited_io {
                    FaultPath::SwapIn
                } else {
                    path
                };
                waiting.clock.record(self.wm.core().stats(), path);
                true
            }
            FaultResult::AlreadyPresent => {
                if waiting.waited_io {
                    waiting
                        .clock
                        .record(self.wm.core().stats(), FaultPath::SwapIn);
                }
                true
            }
            FaultResult::Failed(_) => true,
            FaultResult::Foreign => {
                tracing::error!(addr, "fault on an address no region of this runtime holds");
                true
            }
            FaultResult::Wait => {
                waiting.waited_io = true;
                waiting.needs_memory = false;
                false
            }
            FaultResult::NeedMemory => {
                waiting.needs_memory = true;
                false
            }
        }
    }

    /// [`SwapInMode::Sync`]: blocks this worker until the fault is served (see the module
    /// docs). `true` when it was.
    fn block_until_served(&mut self, payload: u64, waiting: &mut Waiting) -> bool {
        MmStats::bump(&self.wm.core().stats().counters.worker_blocked);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.wm.in_flight() > 0 {
                self.wm.wait_io();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
            self.wm.poll();
            if self.evaluate(payload, waiting) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

impl Driver for FaultDriver {
    fn poll(&mut self, cx: &mut DriverContext<'_>) -> usize {
        // (`WorkerMm::poll` drains the swap engine's eventfd, one of our wake fds.)
        let mut n = self.wm.poll();
        // Network completions, in the same round as swap I/O.
        n += self.shared.net[self.wm.worker()].poll();
        if self.shared.woken[self.wm.worker()].swap(false, Ordering::AcqRel) {
            let _ = self.own_fd.read();
        }
        // Claim external faults of this runtime (only when one was posted since).
        if sigbus::take_external_pending(self.shared.runtime_id) {
            let _ = self.shared.external_fd.read();
            for (i, slot) in sigbus::EXTERNAL.iter().enumerate() {
                if slot.state.load(Ordering::Acquire) == sigbus::EXT_POSTED
                    && slot.runtime.load(Ordering::Relaxed) == self.shared.runtime_id
                    && slot
                        .state
                        .compare_exchange(
                            sigbus::EXT_POSTED,
                            sigbus::EXT_SERVING,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                {
                    self.external.insert(
                        i,
                        Waiting {
                            clock: FaultClock::start(),
                            waited_io: false,
                            needs_memory: false,
                        },
                    );
                }
            }
        }
        let external: Vec<usize> = if self.external.is_empty() {
            Vec::new()
        } else {
            self.external.keys().copied().collect()
        };
        for i in external {
            let payload = sigbus::EXTERNAL[i].payload.load(Ordering::Acquire);
            let Some(mut w) = self.external.remove(&i) else {
                continue;
            };
            if self.evaluate(payload, &mut w) {
                w.clock.record(self.wm.core().stats(), FaultPath::SyncWait);
                sigbus::complete_external(i);
                n += 1;
            } else {
                self.external.insert(i, w);
            }
        }
        // uThreads parked in this worker's PFQ.
        let mut faulted = std::mem::take(&mut self.faulted);
        faulted.clear();
        cx.faulted(&mut faulted);
        if !self.uthreads.is_empty() {
            let live: std::collections::HashSet<u32> = faulted.iter().map(|f| f.key.slot).collect();
            self.uthreads.retain(|slot, _| live.contains(slot));
        }
        for f in &faulted {
            let mut w = self.uthreads.remove(&f.key.slot).unwrap_or(Waiting {
                clock: FaultClock::start(),
                waited_io: false,
                needs_memory: false,
            });
            let mut served = self.evaluate(f.payload, &mut w);
            if !served && self.shared.swap_in == SwapInMode::Sync {
                served = self.block_until_served(f.payload, &mut w);
            }
            if served {
                if cx.resume_faulted(f.key.slot) {
                    n += 1;
                }
            } else {
                self.uthreads.insert(f.key.slot, w);
            }
        }
        self.faulted = faulted;
        n
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![
            self.own_fd.as_fd(),
            self.shared.external_fd.as_fd(),
            self.shared.net[self.wm.worker()].eventfd(),
        ];
        if let Some(fd) = self.wm.eventfd() {
            fds.push(fd);
        }
        fds
    }

    fn ready_to_block(&mut self) -> bool {
        self.shared.net[self.wm.worker()].ready_to_block() && self.wm.ready_to_sleep()
    }

    fn idle_work(&mut self) -> usize {
        self.wm.reclaim_slice()
    }

    fn park_timeout(&self) -> Option<Duration> {
        let memory = self
            .uthreads
            .values()
            .chain(self.external.values())
            .any(|w| w.needs_memory);
        let timeout = if memory || !self.uthreads.is_empty() || !self.external.is_empty() {
            Some(Duration::from_millis(1))
        } else if self.wm.in_flight() > 0 {
            Some(Duration::from_millis(5))
        } else {
            None
        };
        self.wm.reclaim_park_timeout(timeout)
    }

    fn has_pending(&self) -> bool {
        self.wm.in_flight() > 0
            || !self.uthreads.is_empty()
            || !self.external.is_empty()
            || self.wm.reclaim_pending()
    }
}

impl Drop for FaultDriver {
    fn drop(&mut self) {
        self.wm.leave_reclaim();
        self.wm.drain_arena();
    }
}
