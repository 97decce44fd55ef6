//! [`SwapIoThread`]: one [`Engine`] on a thread of its own, shared by any number of threads.
//!
//! An [`Engine`] is bound to the thread that created it (`SINGLE_ISSUER`, and under
//! `DEFER_TASKRUN` only that thread can make its completions visible). A program whose I/O
//! comes from many threads that cannot each own a ring — the daemon's fault threads, its
//! evictor, workees that migrate — hands the requests to this thread instead.
//!
//! # Protocol
//!
//! ```text
//!  any thread                     SwapIoThread (owns the Engine)          kernel
//!  ──────────                     ──────────────────────────────          ──────
//!  read(entry, buf, done) ─▶ inbox.push; wake.write(1)
//!                                 1. clear both eventfds (ring's, wake)
//!                                 2. take the inbox → backlog
//!                                 3. backlog → engine.read/write while it has
//!                                    capacity (QueueFull: stays in backlog, in order)
//!                                 4. enter_for_completions (submits, runs ALL
//!                                    task work) ──────────────────────────▶ I/O
//!                                 5. reap: done(Completion) for each, on this thread
//!                                 6. no progress and engine.ready_to_sleep()
//!                                    and inbox empty → poll(ring eventfd, wake)
//! ```
//!
//! * Requests are accepted until [`SwapIoThread::shutdown`]; every accepted request gets
//!   exactly one call of its `done` callback — with the completion, or with an error
//!   completion (`ticket` 0) if the engine refused it (unknown device, bad entry, out of
//!   range). Shutdown finishes every accepted request before the thread ends.
//! * `done` runs on the I/O thread: it must not block (wake a waiter and return).
//! * Why the sleep in step 6 is safe: the eventfds are cleared in step 1, *before* the
//!   checks. A request pushed after step 2 writes `wake`; completion work that arrives
//!   after the `ready_to_sleep` check signals the ring's eventfd (the kernel signals when
//!   its work list goes from empty to non-empty); work the kernel left over from step 4
//!   is seen by `ready_to_sleep` as `IORING_SQ_TASKRUN` (it is *not* signalled). See the
//!   engine's module docs, "Lost wake-ups".

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::thread::JoinHandle;
use usm_sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicU64, Ordering};

use crate::device::SwapDevice;
use crate::engine::{Completion, Engine, EngineConfig, IoOp};
use crate::entry::{SwapEntry, Ticket};
use crate::error::{Result, SwapError};
use crate::stats::StatsSnapshot;
use crate::sys::buf::PageBuf;
use crate::sys::ring::IoBuf;

/// What runs when a request of a [`SwapIoThread`] finishes (on the I/O thread).
pub type OnComplete = Box<dyn FnOnce(Completion) + Send + 'static>;

struct Request {
    entry: SwapEntry,
    op: IoOp,
    buf: PageBuf,
    done: OnComplete,
}

#[derive(Default)]
struct Inbox {
    requests: VecDeque<Request>,
    open: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: EventFd,
    accepted: AtomicU64,
    completed: AtomicU64,
    stats: Mutex<Option<StatsSnapshot>>,
}

/// An [`Engine`] driven by a thread of its own; `Send + Sync`, so any thread may queue
/// I/O. See the module docs.
pub struct SwapIoThread {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SwapIoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapIoThread")
            .field("accepted", &self.shared.accepted.load(Ordering::Relaxed))
            .field("completed", &self.shared.completed.load(Ordering::Relaxed))
            .finish()
    }
}

impl SwapIoThread {
    /// Starts a thread named `name` and builds its engine there (errors of
    /// [`Engine::new`] are returned here).
    pub fn spawn(name: &str, config: &EngineConfig, devices: &[Arc<SwapDevice>]) -> Result<Self> {
        let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| SwapError::ring("eventfd", e.into()))?;
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox {
                requests: VecDeque::new(),
                open: true,
            }),
            wake,
            accepted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            stats: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let config = *config;
        let devices = devices.to_vec();
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || match Engine::new(&config, &devices) {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    run(engine, &for_thread);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| SwapError::ring("spawn the I/O thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                shared,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(SwapError::Stopped)
            }
        }
    }

    /// Queues a read of `entry..entry + buf.pages()` into `buf`; `done` gets the
    /// completion (with the buffer). `Err` (with the buffer back) only after shutdown.
    pub fn read(
        &self,
        entry: SwapEntry,
        buf: PageBuf,
        done: impl FnOnce(Completion) + Send + 'static,
    ) -> Result<(), (SwapError, PageBuf)> {
        self.request(IoOp::Read, entry, buf, Box::new(done))
    }

    /// Queues a write of `buf` to `entry..entry + buf.pages()`; `done` gets the completion
    /// (with the buffer, which still holds the page if the write failed).
    pub fn write(
        &self,
        entry: SwapEntry,
        buf: PageBuf,
        done: impl FnOnce(Completion) + Send + 'static,
    ) -> Result<(), (SwapError, PageBuf)> {
        self.request(IoOp::Write, entry, buf, Box::new(done))
    }

    fn request(
        &self,
        op: IoOp,
        entry: SwapEntry,
        buf: PageBuf,
        done: OnComplete,
    ) -> Result<(), (SwapError, PageBuf)> {
        let req = Request {
            entry,
            op,
            buf,
            done,
        };
        {
            let Ok(mut inbox) = self.shared.inbox.lock() else {
                return Err((SwapError::Stopped, req.buf));
            };
            if !inbox.open {
                return Err((SwapError::Stopped, req.buf));
            }
            inbox.requests.push_back(req);
            self.shared.accepted.fetch_add(1, Ordering::Relaxed);
        }
        // Cannot fail short of a counter overflow (2^64 - 1 writes).
        let _ = self.shared.wake.write(1);
        Ok(())
    }

    /// Requests accepted and not yet completed.
    pub fn outstanding(&self) -> u64 {
        let done = self.shared.completed.load(Ordering::Acquire);
        self.shared
            .accepted
            .load(Ordering::Acquire)
            .saturating_sub(done)
    }

    /// The engine's statistics at its last sleep (or at shutdown).
    pub fn stats(&self) -> Option<StatsSnapshot> {
        self.shared.stats.lock().ok().and_then(|s| s.clone())
    }

    /// Stops accepting requests, finishes every accepted one (their callbacks run), and
    /// joins the thread. Idempotent.
    pub fn shutdown(&self) {
        if let Ok(mut inbox) = self.shared.inbox.lock() {
            inbox.open = false;
        }
        let _ = self.shared.wake.write(1);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the swap I/O thread panicked");
            }
        }
    }
}

impl Drop for SwapIoThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn refused(req: Request, error: SwapError) {
    (req.done)(Completion {
        ticket: Ticket(0),
        entry: req.entry,
        op: req.op,
        result: Err(error),
        buf: Some(IoBuf::Owned(req.buf)),
    });
}

/// The I/O thread's loop (module docs, steps 1-6).
fn run(mut engine: Engine, shared: &Shared) {
    let mut backlog: VecDeque<Request> = VecDeque::new();
    let mut waiting: HashMap<Ticket, OnComplete> = HashMap::new();
    loop {
        // 1. Consume both wake-ups before looking at what they announce.
        engine.clear_eventfd();
        let _ = shared.wake.read();
        // 2. The inbox.
        let open = match shared.inbox.lock() {
            Ok(mut inbox) => {
                backlog.extend(inbox.requests.drain(..));
                inbox.open
            }
            Err(_) => false,
        };
        // 3. Into the engine, in order, while it has room.
        let mut progress = 0usize;
        while engine.has_capacity() {
            let Some(req) = backlog.pop_front() else {
                break;
            };
            let queued = match req.op {
                IoOp::Read => engine.read(req.entry, req.buf),
                IoOp::Write => engine.write(req.entry, req.buf),
            };
            match queued {
                Ok(t) => {
                    waiting.insert(t, req.done);
                    progress += 1;
                }
                Err(rej) if matches!(rej.error, SwapError::QueueFull { .. }) => {
                    backlog.push_front(Request {
                        buf: rej.buf,
                        ..req
                    });
                    break;
                }
                Err(rej) => {
                    shared.completed.fetch_add(1, Ordering::Release);
                    refused(
                        Request {
                            buf: rej.buf,
                            ..req
                        },
                        rej.error,
                    );
                    progress += 1;
                }
            }
        }
        // 4. Submit and run all completion work; 5. hand completions out.
        if let Err(e) = engine.enter_for_completions() {
            tracing::warn!(error = %e, "swap I/O thread: io_uring enter failed");
        }
        progress += engine.reap(|c| {
            if let Some(done) = waiting.remove(&c.ticket) {
                shared.completed.fetch_add(1, Ordering::Release);
                done(c);
            } else {
                tracing::error!(ticket = ?c.ticket, "completion without a waiter");
            }
        });
        if !open && backlog.is_empty() && engine.in_flight() == 0 {
            break;
        }
        if progress > 0 || !engine.ready_to_sleep() {
            continue;
        }
        // 6. Sleep until a request or completion work arrives.
        if let Ok(mut s) = shared.stats.lock() {
            *s = Some(engine.stats().snapshot());
        }
        let Some(ring_fd) = engine.eventfd() else {
            // No eventfd configured: sleep in the ring, waking at least every millisecond
            // for new requests.
            if engine.in_flight() > 0 {
                let _ = engine.wait_timeout(1, std::time::Duration::from_millis(1));
            } else {
                let mut fds = [PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            continue;
        };
        let mut fds = [
            PollFd::new(ring_fd, PollFlags::POLLIN),
            PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
            if e != nix::errno::Errno::EINTR {
                tracing::warn!(error = %e, "swap I/O thread: poll failed");
            }
        }
    }
    if let Ok(mut s) = shared.stats.lock() {
        *s = Some(engine.stats().snapshot());
    }
    for req in backlog {
        refused(req, SwapError::Stopped);
    }
}
