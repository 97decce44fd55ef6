//! The daemon's per-worker driver: the LocalManager calls it every scheduling round, and
//! it runs the memory manager ([`usm_mm::WorkerMm`]) for the faults of every tagged
//! process — the same core, fault path and swap engine as the embedded runtime.
//!
//! # Jobs
//! A process's reader turns each page fault into a [`Job::Fault`] on the shared queue
//! and wakes the workers; policy notifications (a new process, an exit, a free, a hint)
//! are [`Job::Notify`], so that policies always run on a worker with a truthful `Cx`.
//!
//! # One poll
//! 1. Reap this worker's io_uring ([`WorkerMm::poll`]): write-backs recorded, swap-ins
//!    installed with `UFFDIO_COPY` into their program (which wakes the faulting thread).
//! 2. Take jobs from the queue (a bounded number per round).
//! 3. Evaluate, *level-triggered*, every fault this worker holds:
//!    [`WorkerMm::handle_fault`] again. Present (installed, by anyone) → wake the thread
//!    (a spurious wake is harmless: a thread whose page is still missing faults again)
//!    and forget the fault; swap-in in flight or no memory yet → keep it. No fault ever
//!    waits in a timed sleep: a completion on any worker wakes the workers that wait
//!    (the core's wakers), and this driver's wake fds are the queue, its own eventfd and
//!    its engine's.
//! 4. A fault on an address no managed range covers yet ([`FaultResult::Foreign`]): the
//!    extent of the mapping around it (from `/proc/PID/maps`) becomes managed, then the
//!    fault is served like any other.
//!
//! # Where a fault's time goes
//! `USM_DRIVER_BREAKDOWN=1` in the daemon's environment makes each worker time the stages
//! of the faults it serves and print them when it stops ([`Breakdown`]); see
//! `bench/results/daemon-perf.md` for what it showed for redis under a budget.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};
use usm_sync::Arc;

use hdrhistogram::Histogram;
use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_kmod::event::Origin;
use usm_localmanager::{Driver, DriverContext};
use usm_mm::{FaultResult, WorkerMm};
use usm_policies::Hint;
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicBool, Ordering};

use super::process::Proc;

const PAGE: u64 = 4096;
/// Jobs taken per round (the rest wait for the next round, or another worker).
const JOBS_PER_ROUND: usize = 256;

/// A policy notification.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    /// The process was admitted (`AllocPolicy::new_process`).
    NewProcess,
    /// The program gave back a range (`AllocPolicy::free`).
    Free(std::ops::Range<u64>),
    /// A hint (`AllocPolicy::hint`).
    Hint(std::ops::Range<u64>, Hint),
}

/// Work for a worker.
pub(crate) enum Job {
    /// A page fault read from a process's userfaultfd.
    Fault {
        proc: Arc<Proc>,
        addr: u64,
        write: bool,
        tid: u32,
        t0: Instant,
    },
    /// A policy notification for a process.
    Notify { proc: Arc<Proc>, notice: Notice },
    /// The agent answered an eviction of `frame` (see [`super::agent`]).
    StageDone {
        proc: Arc<Proc>,
        frame: usm_kmod::FrameNo,
        moved: bool,
    },
}

/// The queue every worker takes jobs from.
pub(crate) struct Jobs {
    queue: Mutex<VecDeque<Job>>,
    efd: EventFd,
}

impl Jobs {
    pub(crate) fn new() -> std::io::Result<Jobs> {
        Ok(Jobs {
            queue: Mutex::new(VecDeque::new()),
            efd: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(std::io::Error::from)?,
        })
    }

    /// Queues a job and wakes the workers.
    pub(crate) fn push(&self, job: Job) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job);
        let _ = self.efd.write(1);
    }

    fn take(&self, max: usize, out: &mut Vec<Job>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        if q.is_empty() {
            let _ = self.efd.read();
        } else {
            // Leave it readable for the other workers.
            let _ = self.efd.write(1);
        }
    }

    fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// A fault this worker holds until its page is present.
struct Pending {
    proc: Arc<Proc>,
    addr: u64,
    write: bool,
    tid: u32,
    t0: Instant,
    needs_memory: bool,
    /// When a worker took the job ([`Breakdown`]).
    taken: Instant,
    /// When the first `handle_fault` returned ([`Breakdown`]).
    first: Option<Instant>,
    /// `handle_fault` calls so far.
    calls: u32,
    /// It got `NeedMemory` at least once ([`Breakdown`]).
    starved: bool,
}

/// Per-stage times of the faults one worker served (a profiling aid, on when the daemon
/// runs with `USM_DRIVER_BREAKDOWN` set; printed to stderr when the worker stops). Only
/// faults that waited (a swap-in, a stage in flight, no memory) are timed by stage:
/// *queue* (the reader read it → a worker took it), *first call* (the first
/// `handle_fault`: policy, swap-in queued and submitted, eviction), *waited* (→ resolved:
/// the read, its completion's wake-up, the `UFFDIO_COPY`), apart for those that found no
/// frame (*starved*).
struct Breakdown {
    queue: Histogram<u64>,
    first_call: Histogram<u64>,
    waited: Histogram<u64>,
    starved: Histogram<u64>,
    total: Histogram<u64>,
    /// `handle_fault` calls (every fault).
    calls: u64,
    /// Faults served.
    faults: u64,
    /// Driver polls.
    polls: u64,
}

impl Breakdown {
    /// `Some` when `USM_DRIVER_BREAKDOWN` is set.
    fn from_env() -> Option<Box<Breakdown>> {
        std::env::var_os("USM_DRIVER_BREAKDOWN")?;
        let h = || Histogram::new(3).ok();
        Some(Box::new(Breakdown {
            queue: h()?,
            first_call: h()?,
            waited: h()?,
            starved: h()?,
            total: h()?,
            calls: 0,
            faults: 0,
            polls: 0,
        }))
    }

    fn record(&mut self, p: &Pending, now: Instant) {
        let ns = |a: Instant, b: Instant| b.saturating_duration_since(a).as_nanos() as u64;
        self.calls += u64::from(p.calls);
        self.faults += 1;
        if p.calls <= 1 {
            return;
        }
        let first = p.first.unwrap_or(now);
        let _ = self.queue.record(ns(p.t0, p.taken));
        let _ = self.first_call.record(ns(p.taken, first));
        let waited = if p.starved {
            &mut self.starved
        } else {
            &mut self.waited
        };
        let _ = waited.record(ns(first, now));
        let _ = self.total.record(ns(p.t0, now));
    }

    fn print(&self, worker: usize) {
        let d = |h: &Histogram<u64>| {
            format!(
                "n {} mean {:.1} p50 {:.1} p90 {:.1} p99 {:.1}",
                h.len(),
                h.mean() / 1e3,
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.9) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3
            )
        };
        eprintln!(
            "usm breakdown, worker {worker}: {} faults, {:.2} handle_fault calls each, {} polls; \
             faults that waited (µs): queue {} | first call {} | waited {} | starved {} | total {}",
            self.faults,
            self.calls as f64 / self.faults.max(1) as f64,
            self.polls,
            d(&self.queue),
            d(&self.first_call),
            d(&self.waited),
            d(&self.starved),
            d(&self.total)
        );
    }
}

/// One worker's driver.
pub(crate) struct DaemonDriver {
    wm: WorkerMm,
    jobs: Arc<Jobs>,
    own_fd: Arc<EventFd>,
    woken: Arc<AtomicBool>,
    pending: Vec<Pending>,
    batch: Vec<Job>,
    breakdown: Option<Box<Breakdown>>,
}

impl DaemonDriver {
    pub(crate) fn new(
        wm: WorkerMm,
        jobs: Arc<Jobs>,
        own_fd: Arc<EventFd>,
        woken: Arc<AtomicBool>,
    ) -> DaemonDriver {
        DaemonDriver {
            wm,
            jobs,
            own_fd,
            woken,
            pending: Vec::new(),
            batch: Vec::new(),
            breakdown: Breakdown::from_env(),
        }
    }

    /// Serves one fault; `true` when it is done (the thread may run).
    fn evaluate(&mut self, p: &mut Pending) -> bool {
        if p.proc.is_gone() {
            return true;
        }
        let mut foreign_once = false;
        loop {
            let r = self.wm.handle_fault(p.proc.space, p.addr, p.write, p.tid);
            p.calls += 1;
            if p.first.is_none() && self.breakdown.is_some() {
                p.first = Some(Instant::now());
            }
            match r {
                FaultResult::Resolved(_) | FaultResult::AlreadyPresent => {
                    // Installed by a COPY that woke the thread, or present already: a
                    // wake is harmless either way, and needed for the second.
                    let _ = p.proc.installer.uffd().wake(p.addr, PAGE);
                    p.proc.counters.record_latency(p.t0.elapsed());
                    if let Some(b) = self.breakdown.as_mut() {
                        b.record(p, Instant::now());
                    }
                    return true;
                }
                FaultResult::Failed(reason) => {
                    tracing::debug!(pid = p.proc.pid(), addr = p.addr, %reason, "access failed");
                    let _ = p.proc.installer.uffd().wake(p.addr, PAGE);
                    return true;
                }
                FaultResult::Foreign if !foreign_once => {
                    foreign_once = true;
                    if !p.proc.manage_around(self.wm.core(), p.addr) {
                        // Not a mapping of the program any more (unmapped meanwhile): let
                        // the thread run; the kernel tells it what it touched.
                        let _ = p.proc.installer.uffd().wake(p.addr, PAGE);
                        return true;
                    }
                }
                FaultResult::Foreign => {
                    tracing::warn!(
                        pid = p.proc.pid(),
                        addr = p.addr,
                        "fault outside every managed range"
                    );
                    let _ = p.proc.installer.uffd().wake(p.addr, PAGE);
                    return true;
                }
                FaultResult::Wait => {
                    p.needs_memory = false;
                    return false;
                }
                FaultResult::NeedMemory => {
                    p.needs_memory = true;
                    p.starved = true;
                    return false;
                }
            }
        }
    }

    fn notify(&mut self, proc: &Proc, notice: Notice) {
        let origin = Origin {
            pid: proc.pid(),
            tid: 0,
        };
        let name = proc.name.clone();
        self.wm.notify_alloc(proc.space, |alloc, cx| match notice {
            Notice::NewProcess => alloc.new_process(origin, &name, None, cx),
            Notice::Free(range) => alloc.free(origin, range, cx),
            Notice::Hint(range, hint) => alloc.hint(origin, range, &hint, cx),
        });
    }
}

impl Driver for DaemonDriver {
    fn poll(&mut self, _cx: &mut DriverContext<'_>) -> usize {
        if let Some(b) = self.breakdown.as_mut() {
            b.polls += 1;
        }
        let mut n = self.wm.poll();
        if self.woken.swap(false, Ordering::AcqRel) {
            let _ = self.own_fd.read();
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.jobs.take(JOBS_PER_ROUND, &mut batch);
        for job in batch.drain(..) {
            n += 1;
            match job {
                Job::Fault {
                    proc,
                    addr,
                    write,
                    tid,
                    t0,
                } => self.pending.push(Pending {
                    proc,
                    addr,
                    write,
                    tid,
                    t0,
                    needs_memory: false,
                    taken: Instant::now(),
                    first: None,
                    calls: 0,
                    starved: false,
                }),
                Job::Notify { proc, notice } => self.notify(&proc, notice),
                Job::StageDone { proc, frame, moved } => {
                    self.wm.finish_stage(proc.space, frame, moved);
                }
            }
        }
        self.batch = batch;
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain_mut(|p| {
            let done = self.evaluate(p);
            if done {
                n += 1;
            }
            !done
        });
        self.pending = pending;
        n
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.own_fd.as_fd(), self.jobs.efd.as_fd()];
        if let Some(fd) = self.wm.eventfd() {
            fds.push(fd);
        }
        fds
    }

    fn park_timeout(&self) -> Option<Duration> {
        if self.pending.iter().any(|p| p.needs_memory) {
            // Frames come back when write-backs complete (a completion wakes us) or
            // another worker's eviction frees some (no wake): look again soon.
            Some(Duration::from_millis(1))
        } else if self.wm.in_flight() > 0 || !self.pending.is_empty() {
            Some(Duration::from_millis(5))
        } else {
            None
        }
    }

    fn has_pending(&self) -> bool {
        self.wm.in_flight() > 0 || !self.pending.is_empty() || !self.jobs.is_empty()
    }
}

impl Drop for DaemonDriver {
    fn drop(&mut self) {
        if let Some(b) = &self.breakdown {
            b.print(self.wm.worker());
        }
        self.wm.drain_arena();
    }
}
