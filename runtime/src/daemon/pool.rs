//! Where fault-serving work runs: workees (uThreads) on the LocalManager workers, or a
//! pool of OS threads.
//!
//! The design runs each fault as a workee on a LocalManager, parked on its swap-in while
//! the worker serves other faults: that is the default ([`FaultRunner::UThreads`]).
//! Waits inside a workee (`nap`, a frame, staging) yield the worker instead of parking
//! on a timer, because an unpark from a foreign thread was once seen lost under load.
//! Measured before the switch (2026-11-22, machine load ~14 on 2 vCPUs): the daemon's
//! program tests passed 3 runs out of 3 with workees (daemon_programs 517–692 s) and
//! with OS threads (309 s in the same conditions); workees are slower under such load
//! because waiting workees yield-spin.
//!
//! [`FaultRunner::Threads`] (`USM_FAULT_RUNNER=threads`) is a pool of OS threads, each
//! fault blocking only its own thread (so one thread's swap-in still never delays
//! another thread's fault while threads remain).

use std::collections::VecDeque;
use std::thread::JoinHandle;

use usm_sync::atomic::{AtomicBool, Ordering};
use usm_sync::{Arc, Condvar, Mutex};

/// One unit of fault-serving work.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// Which runner serves faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultRunner {
    /// A pool of OS threads.
    Threads,
    /// Workees on the LocalManager runtime (default).
    UThreads,
}

impl FaultRunner {
    /// From `USM_FAULT_RUNNER` (`threads` or `uthreads`), default uthreads (workees).
    pub fn from_env() -> FaultRunner {
        match std::env::var("USM_FAULT_RUNNER").as_deref() {
            Ok("threads" | "os-threads") => FaultRunner::Threads,
            _ => FaultRunner::UThreads,
        }
    }

    /// The `USM_FAULT_RUNNER` spelling (`threads`, `uthreads`), as `usm stat` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultRunner::Threads => "threads",
            FaultRunner::UThreads => "uthreads",
        }
    }
}

struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    cv: Condvar,
    stop: AtomicBool,
}

/// A pool of OS threads taking jobs in order.
pub(crate) struct ThreadPool {
    queue: Arc<Queue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ThreadPool {
    pub(crate) fn new(n: usize) -> std::io::Result<ThreadPool> {
        Self::new_named(n, "usm-fault")
    }

    pub(crate) fn new_named(n: usize, name: &str) -> std::io::Result<ThreadPool> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let q = queue.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker(&q))?,
            );
        }
        Ok(ThreadPool {
            queue,
            threads: Mutex::new(threads),
        })
    }

    pub(crate) fn submit(&self, job: Job) {
        self.queue
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job);
        self.queue.cv.notify_one();
    }

    /// Runs what is queued, then stops the threads.
    pub(crate) fn shutdown(&self) {
        self.queue.stop.store(true, Ordering::Release);
        self.queue.cv.notify_all();
        let handles: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

fn worker(q: &Queue) {
    loop {
        let job = {
            let mut jobs = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = jobs.pop_front() {
                    break Some(j);
                }
                if q.stop.load(Ordering::Acquire) {
                    break None;
                }
                jobs = q.cv.wait(jobs).unwrap_or_else(|p| p.into_inner());
            }
        };
        match job {
            Some(j) => j(),
            None => return,
        }
    }
}
