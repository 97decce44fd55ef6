//! The daemon's fault servers: [`FaultServer`] (a [`usm_mm::WorkerMm`] and the faults it
//! holds until their page is present) runs in each LocalManager worker's driver
//! ([`DaemonDriver`], called every scheduling round) and in each process's reader
//! (`super::process`) — the same core, fault path and swap engine as the embedded runtime.
//!
//! # Who serves a fault
//! A process's reader serves the faults it reads itself, on a worker part of its own
//! (its own io_uring engine and a worker index of its own, [`usm_mm::MmCore::add_worker`]):
//! a fault on a vacant page is installed right there, a swap-in is submitted by the thread
//! that read the fault and installed by it when its completion wakes it — two wake-ups
//! per swap-in (program → reader, reader → program, with the I/O completion waking the
//! reader in between), not four through a worker. Only when the core has no worker index
//! free (64 at most) does a reader turn its faults into [`Job::Fault`]s for the workers,
//! as does `give_back` at shutdown.
//!
//! # Jobs
//! The shared queue holds what is not a reader's own: faults as above, policy
//! notifications ([`Job::Notify`]: a free, a hint; a new process when its reader has no
//! server of its own), so that policies always run with a truthful `Cx`, and finished
//! agent stages ([`Job::StageDone`]).
//!
//! # One poll
//! 1. Reap this worker's io_uring ([`WorkerMm::poll`]): write-backs recorded, swap-ins
//!    installed with `UFFDIO_COPY` into their program (which wakes the faulting thread).
//! 2. Take jobs from the queue (a bounded number per round).
//! 3. Evaluate, *level-triggered*, every fault this worker holds (a reader does steps 1
//!    and 3 before every sleep):
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
    /// A page fault read from a process's userfaultfd (whose reader has no
    /// [`FaultServer`] of its own), or one `give_back` brings in at shutdown.
    Fault(FaultJob),
    /// A policy notification for a process.
    Notify { proc: Arc<Proc>, notice: Notice },
    /// The agent answered an eviction of `frame` (see [`super::agent`]).
    StageDone {
        proc: Arc<Proc>,
        frame: usm_kmod::FrameNo,
        moved: bool,
    },
}

/// One page fault to serve.
pub(crate) struct FaultJob {
    pub(crate) proc: Arc<Proc>,
    /// Page-aligned.
    pub(crate) addr: u64,
    pub(crate) write: bool,
    pub(crate) tid: u32,
    /// When it was read from the userfaultfd.
    pub(crate) t0: Instant,
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

    fn print(&self, who: &str) {
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
            "usm breakdown, {who}: {} faults, {:.2} handle_fault calls each, {} polls; \
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

/// The memory manager of one thread that serves faults (a LocalManager worker, or a
/// process's reader), with the faults it holds until their page is present.
pub(crate) struct FaultServer {
    wm: WorkerMm,
    pending: Vec<Pending>,
    breakdown: Option<Box<Breakdown>>,
}

impl FaultServer {
    pub(crate) fn new(wm: WorkerMm) -> FaultServer {
        FaultServer {
            wm,
            pending: Vec::new(),
            breakdown: Breakdown::from_env(),
        }
    }

    /// This server's memory manager.
    pub(crate) fn wm(&mut self) -> &mut WorkerMm {
        &mut self.wm
    }

    /// This server's memory manager.
    pub(crate) fn wm_ref(&self) -> &WorkerMm {
        &self.wm
    }

    /// Takes a fault and serves it at once (the swap-in it needs is submitted before
    /// this returns); kept until its page is present. Returns 1 if it is done.
    pub(crate) fn take(&mut self, job: FaultJob) -> usize {
        let mut p = Pending::from(job);
        if self.evaluate(&mut p) {
            1
        } else {
            self.pending.push(p);
            0
        }
    }

    /// Reaps this server's I/O (swap-ins installed, write-backs recorded), then evaluates
    /// every fault it holds again (level-triggered). Returns the work done.
    pub(crate) fn poll(&mut self) -> usize {
        let n = self.wm.poll();
        n + self.serve_pending()
    }

    /// Evaluates every fault held again. Returns how many are done.
    fn serve_pending(&mut self) -> usize {
        let mut n = 0;
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

    /// Tells `proc`'s allocation policy of `notice`.
    pub(crate) fn notify(&mut self, proc: &Proc, notice: Notice) {
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

    /// How long a thread serving faults may sleep: not long while a fault waits for a
    /// frame (frames freed by another worker's eviction wake nobody), a little longer
    /// while I/O is in flight or faults are held (their wakes are eventfds, this is a
    /// backstop), else until woken.
    pub(crate) fn park_timeout(&self) -> Option<Duration> {
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

    /// I/O in flight or faults held.
    pub(crate) fn busy(&self) -> bool {
        self.wm.in_flight() > 0 || !self.pending.is_empty()
    }

    /// Lets every held fault's thread run (the server stops: a thread whose page is
    /// still missing faults again, and whoever reads the userfaultfd then serves it).
    pub(crate) fn release_all(&mut self) {
        for p in self.pending.drain(..) {
            let _ = p.proc.installer.uffd().wake(p.addr, PAGE);
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

    /// Prints the breakdown (if on) under `who`.
    fn print_breakdown(&self, who: &str) {
        if let Some(b) = &self.breakdown {
            b.print(who);
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.wm.drain_arena();
    }
}

impl From<FaultJob> for Pending {
    fn from(j: FaultJob) -> Pending {
        Pending {
            proc: j.proc,
            addr: j.addr,
            write: j.write,
            tid: j.tid,
            t0: j.t0,
            needs_memory: false,
            taken: Instant::now(),
            first: None,
            calls: 0,
            starved: false,
        }
    }
}

/// One worker's driver.
pub(crate) struct DaemonDriver {
    server: FaultServer,
    jobs: Arc<Jobs>,
    own_fd: Arc<EventFd>,
    woken: Arc<AtomicBool>,
    batch: Vec<Job>,
}

impl DaemonDriver {
    pub(crate) fn new(
        wm: WorkerMm,
        jobs: Arc<Jobs>,
        own_fd: Arc<EventFd>,
        woken: Arc<AtomicBool>,
    ) -> DaemonDriver {
        // The LocalManager workers reclaim in their idle time; the readers, busy with
        // their program's faults, only ask them to (and reclaim below `min` themselves).
        wm.join_reclaim();
        DaemonDriver {
            server: FaultServer::new(wm),
            jobs,
            own_fd,
            woken,
            batch: Vec::new(),
        }
    }
}

impl Driver for DaemonDriver {
    fn poll(&mut self, _cx: &mut DriverContext<'_>) -> usize {
        if let Some(b) = self.server.breakdown.as_mut() {
            b.polls += 1;
        }
        let mut n = self.server.wm().poll();
        if self.woken.swap(false, Ordering::AcqRel) {
            let _ = self.own_fd.read();
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.jobs.take(JOBS_PER_ROUND, &mut batch);
        for job in batch.drain(..) {
            n += 1;
            match job {
                Job::Fault(f) => self.server.pending.push(Pending::from(f)),
                Job::Notify { proc, notice } => self.server.notify(&proc, notice),
                Job::StageDone { proc, frame, moved } => {
                    self.server.wm().finish_stage(proc.space, frame, moved);
                }
            }
        }
        self.batch = batch;
        n + self.server.serve_pending()
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.own_fd.as_fd(), self.jobs.efd.as_fd()];
        if let Some(fd) = self.server.wm.eventfd() {
            fds.push(fd);
        }
        fds
    }

    fn ready_to_block(&mut self) -> bool {
        self.server.wm().ready_to_sleep()
    }

    fn idle_work(&mut self) -> usize {
        self.server.wm().reclaim_slice()
    }

    fn park_timeout(&self) -> Option<Duration> {
        self.server
            .wm
            .reclaim_park_timeout(self.server.park_timeout())
    }

    fn has_pending(&self) -> bool {
        self.server.busy() || !self.jobs.is_empty() || self.server.wm.reclaim_pending()
    }
}

impl Drop for DaemonDriver {
    fn drop(&mut self) {
        self.server.wm.leave_reclaim();
        self.server
            .print_breakdown(&format!("worker {}", self.server.wm.worker()));
    }
}
