//! [`Engine`]: one io_uring per worker thread for swap reads and writes.
//!
//! # Protocol
//!
//! ```text
//!  policy                       Engine                         kernel
//!  ──────                       ──────                         ──────
//!  read(entry, PageBuf) ──▶ checks, SQE queued, ticket ──▶ submitted at once when
//!                                                           submit_batch = 1 (default)
//!  ... more requests ...
//!  submit()             ──▶ one io_uring_enter for the rest ─▶ I/O starts
//!  every scheduling round:
//!  enter_for_completions() ─▶ GETEVENTS (runs task work) ──▶ CQEs posted
//!  reap(|Completion|)   ◀── ticket, entry, result, buffer back
//! ```
//!
//! * **Which thread may call what.** The ring is created `SINGLE_ISSUER` on the thread
//!   that calls [`Engine::new`]; the kernel then refuses submissions from any other thread
//!   (`EEXIST`), and under `DEFER_TASKRUN` only that thread can make completions visible.
//!   So an `Engine` is neither `Send` nor `Sync`: **every method is called by the thread
//!   that built it** — queueing (`read`/`write`/`queue_*`/`*_staged`/`*_raw`), `submit`,
//!   `enter_for_completions`, `wait*`, `reap`, `ready_to_sleep`, `clear_eventfd`. Each
//!   worker builds its own engine on its own thread. Threads that cannot own one (fault
//!   threads, an evictor, uThreads that migrate) hand their requests to a
//!   [`SwapIoThread`](crate::SwapIoThread), which owns an engine on a thread of its own and
//!   runs a callback per completion.
//!   ```compile_fail
//!   fn needs_send<T: Send>() {}
//!   needs_send::<usm_swap::Engine>();
//!   ```
//! * **Completion modes** ([`CompletionMode`]), chosen at [`Engine::new`] (probed, with
//!   fallback, the choice reported by [`Engine::mode`] and [`Engine::setup_report`]):
//!   - `DeferTaskrun`: completions are posted *only* when this thread enters the kernel
//!     with `GETEVENTS` — cheapest (no interrupts, batched), but the scheduler must call
//!     [`Engine::enter_for_completions`] every round while [`Engine::in_flight`] > 0.
//!   - `CoopTaskrun`: completion work waits for the thread's next kernel entry, in the
//!     worst case the next timer tick — so enter every round too.
//!   - `Default`: the kernel interrupts the thread to post completions, no entry needed,
//!     but the thread pays the interruptions.
//!
//!   The latency each mode adds, measured against fio, is in `bench/results/swap.md`.
//!
//!   `bench/benches/swap_io.rs` measures the three.
//! * **How a sleeping thread learns of completions.** The owner sleeps either *in the
//!   ring* ([`Engine::wait`]/[`Engine::wait_timeout`]: one `io_uring_enter` that submits,
//!   runs completion work and blocks until `min` CQEs are posted — always safe), or *on
//!   the [`Engine::eventfd`]* together with other fds. For the eventfd, this order and no
//!   other:
//!   ```text
//!   loop {
//!       engine.clear_eventfd();              // 1. consume old signals first
//!       engine.enter_for_completions()?;     // 2. submit + run ALL completion work
//!       engine.reap(|c| ...);                // 3.
//!       if !engine.ready_to_sleep() { continue; }   // 4. CQE visible / work flagged
//!       poll(engine.eventfd(), ...);         // 5. new completion work signals it
//!   }
//!   ```
//!   The kernel signals the eventfd when its completion-work list goes from empty to
//!   non-empty and when it posts CQEs — *not* for work it left over from an earlier entry
//!   (next point). Work left over is visible only as `IORING_SQ_TASKRUN`, which
//!   [`Engine::ready_to_sleep`] checks.
//! * **Lost wake-ups (found and fixed; `tests/stress.rs`).** Under `DEFER_TASKRUN` one
//!   `io_uring_enter(GETEVENTS, min_complete = 0)` runs at most 20 completion items
//!   (`IO_LOCAL_TW_DEFAULT_MAX`); the rest wait on the ring's retry list, flagged
//!   `IORING_SQ_TASKRUN` but with no eventfd signal. Measured: 64 finished reads needed
//!   four entries (20 + 20 + 20 + 4). The engine used to enter once per
//!   `enter_for_completions`, so a thread that reaped, cleared its eventfd and slept
//!   never heard of the remaining completions unless new I/O happened to finish — a
//!   swap-in waited forever. `enter_for_completions` now enters again while the flag is
//!   set (bounded), and `ready_to_sleep` refuses to let a thread sleep on flagged work.
//! * **Back-pressure.** At most [`Engine::depth`] requests are queued or in flight; beyond
//!   that a request is refused with [`SwapError::QueueFull`] and its buffer handed back
//!   ([`Rejected`]); [`Engine::reap_until_capacity`] blocks until a slot is free. A
//!   refused request never got a ticket, so nothing is left waiting for it. The CQ has
//!   twice the depth's entries, so it cannot overflow (no `IORING_SQ_CQ_OVERFLOW` path
//!   to handle). A failed submit (`EAGAIN`/`EBUSY`, [`SwapError::is_retryable`]) leaves
//!   the requests in the SQ; the next `submit`/`enter_for_completions`/`wait` sends them.
//! * **Depth 1.** A caller that is going to wait anyway uses [`Engine::queue_read`] /
//!   [`Engine::queue_write`] (never auto-submitted) and then [`Engine::wait`]`(1)`: submit
//!   and wait in one `io_uring_enter`, instead of a submit and a `GETEVENTS` entry.
//! * **Synchronous devices (zram).** A request on a [synchronous
//!   device](SwapDevice::is_synchronous) made while the engine has **nothing else queued or
//!   in flight** is performed inline, in the calling thread (`pread`/`pwrite`, no
//!   io_uring), when [`EngineConfig::inline_sync`] is on (the default); its completion is
//!   kept and handed out by the next [`reap`](Engine::reap) like any other (latency still
//!   queue → reap, [`in_flight`](Engine::in_flight) counts it until reaped,
//!   [`wait`](Engine::wait) returns at once, [`ready_to_sleep`](Engine::ready_to_sleep) is
//!   false). Why: zram does not support `NOWAIT` I/O, so io_uring punts every request to
//!   an io-wq kernel thread — a wake-up of that thread and one of ours per request, which
//!   costs more than the read itself, far more when the other vCPU is halted (figures in
//!   `bench/results/swap.md`). The
//!   kernel's own swap-in does the same for `SWP_SYNCHRONOUS_IO` devices. With anything
//!   outstanding, requests go through the ring as before, so a burst still runs in
//!   parallel on io-wq threads, and an inline request can never overtake a queued one.
//! * **Buffers.** Owned [`PageBuf`]s move into the engine and come back in the
//!   [`Completion`]; the engine's own staging pages are the only memory registered as
//!   fixed buffers ([`Engine::read_staged`], [`Engine::write_staged`]); caller memory goes
//!   through the `unsafe` [`Engine::read_raw`]/[`Engine::write_raw`]. See
//!   [`crate::sys::ring`] for why this is sound.
//! * **Errors lose nothing.** A failed or short read marks the entry bad on its device and
//!   completes with an error whose [`SwapError::must_poison`] is true: the runtime installs
//!   `UFFDIO_POISON`, never zeros. A failed write completes with
//!   [`SwapError::keeps_page`] and returns the buffer: the page stays in memory.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Instant;
use usm_sync::Arc;

use crate::device::SwapDevice;
use crate::entry::{DeviceId, SwapEntry, Ticket};
use crate::error::{Result, SwapError};
use crate::header::PAGE_SIZE;
use crate::stats::EngineStats;
use crate::sys::buf::PageBuf;
use crate::sys::ring::{IoBuf, Meta, Pending, Ring, RingSetup, Rw, StagedPage};

/// How completions become visible (io_uring setup flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum CompletionMode {
    /// No task-run flag: the kernel interrupts the thread to post completions.
    Default,
    /// `IORING_SETUP_COOP_TASKRUN | TASKRUN_FLAG`: posted at the next kernel entry.
    CoopTaskrun,
    /// `IORING_SETUP_DEFER_TASKRUN | TASKRUN_FLAG`: posted only by an entry with GETEVENTS.
    DeferTaskrun,
}

impl std::fmt::Display for CompletionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::CoopTaskrun => "COOP_TASKRUN",
            Self::DeferTaskrun => "DEFER_TASKRUN",
        })
    }
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum IoOp {
    /// Swap-in: device → memory.
    Read,
    /// Write-back: memory → device.
    Write,
}

/// Engine parameters.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Maximum requests queued or in flight (rounded up to a power of two).
    pub depth: u32,
    /// Completion mode; `None` probes `DeferTaskrun`, then `CoopTaskrun`, then `Default`.
    pub mode: Option<CompletionMode>,
    /// Engine-owned bounce pages registered as fixed buffers (0: none).
    pub staging_pages: u16,
    /// Register an eventfd that a sleeping worker can poll.
    pub eventfd: bool,
    /// Submit automatically once this many requests are queued (1: every request goes
    /// to the kernel at once; 0: only on [`Engine::submit`], [`Engine::wait`] or
    /// [`Engine::enter_for_completions`]). On the project's virtio disk, submitting each
    /// request at once gave more depth-32 IOPS than one batch per round (figures in
    /// `bench/results/swap.md`), so 1 is the default.
    pub submit_batch: u32,
    /// Perform a lone request on a synchronous device (zram) inline, in the calling
    /// thread, instead of through io_uring (module docs, "Synchronous devices").
    pub inline_sync: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            depth: 64,
            mode: None,
            staging_pages: 32,
            eventfd: true,
            submit_batch: 1,
            inline_sync: true,
        }
    }
}

/// A request the engine refused before queueing it; the buffer comes back.
#[derive(Debug)]
pub struct Rejected {
    /// Why ([`SwapError::QueueFull`] is retryable after reaping).
    pub error: SwapError,
    /// The caller's buffer, untouched.
    pub buf: PageBuf,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The ticket the request returned.
    pub ticket: Ticket,
    /// The first entry it read or wrote.
    pub entry: SwapEntry,
    /// Read or write.
    pub op: IoOp,
    /// Bytes transferred (the whole request), or why not.
    pub result: Result<u32>,
    /// The buffer: the caller's `PageBuf` or raw range, or the staging page holding the
    /// data of a successful staged read. `None` for staged writes and failed staged reads
    /// (their page went back to the staging pool).
    pub buf: Option<IoBuf>,
}

struct DeviceSlot {
    fixed: u32,
    device: Arc<SwapDevice>,
}

/// One io_uring for swap I/O, owned by one thread. See the module docs.
pub struct Engine {
    ring: Ring,
    devices: Vec<Option<DeviceSlot>>,
    submit_batch: u32,
    inline_sync: bool,
    /// Requests performed inline and not reaped yet, with their results (at most one: a
    /// request goes inline only when nothing else is outstanding).
    inline_done: Vec<(Pending, i32)>,
    next_ticket: u64,
    stats: EngineStats,
    // !Send + !Sync: the ring is SINGLE_ISSUER, bound to the creating thread.
    _thread_bound: PhantomData<*const ()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("mode", &self.ring.mode())
            .field("depth", &self.ring.capacity())
            .field("in_flight", &self.ring.pending())
            .finish()
    }
}

impl Engine {
    /// Creates a ring on the calling thread, probes the operations it needs, and registers
    /// `devices`' descriptors (and the staging pages, and the eventfd).
    pub fn new(config: &EngineConfig, devices: &[Arc<SwapDevice>]) -> Result<Self> {
        let mut table: Vec<Option<DeviceSlot>> = (0..255).map(|_| None).collect();
        let mut fds = Vec::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            let slot = &mut table[usize::from(d.id().0)];
            if slot.is_some() {
                return Err(SwapError::DuplicateDevice(d.id()));
            }
            *slot = Some(DeviceSlot {
                fixed: i as u32,
                device: d.clone(),
            });
            fds.push(d.fd().as_raw_fd());
        }
        let ring = Ring::new(&RingSetup {
            entries: config.depth,
            mode: config.mode,
            staging_pages: config.staging_pages,
            eventfd: config.eventfd,
            files: &fds,
        })?;
        tracing::debug!(report = ring.report(), "swap engine ring set up");
        Ok(Self {
            ring,
            devices: table,
            submit_batch: config.submit_batch,
            inline_sync: config.inline_sync,
            inline_done: Vec::with_capacity(1),
            next_ticket: 1,
            stats: EngineStats::new()?,
            _thread_bound: PhantomData,
        })
    }

    /// The completion mode in use.
    pub fn mode(&self) -> CompletionMode {
        self.ring.mode()
    }

    /// What setup tried and chose, e.g. `"DEFER_TASKRUN+SINGLE_ISSUER chosen"`.
    pub fn setup_report(&self) -> &str {
        self.ring.report()
    }

    /// Maximum requests queued or in flight.
    pub fn depth(&self) -> u32 {
        self.ring.capacity() as u32
    }

    /// Requests queued or in flight (not yet reaped), inline ones included.
    pub fn in_flight(&self) -> u32 {
        (self.ring.pending() + self.inline_done.len()) as u32
    }

    /// Whether another request would be accepted.
    pub fn has_capacity(&self) -> bool {
        self.ring.pending() + self.inline_done.len() < self.ring.capacity()
    }

    /// Statistics so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Statistics, mutable (to reset after a warm-up).
    pub fn stats_mut(&mut self) -> &mut EngineStats {
        &mut self.stats
    }

    /// A device registered with this engine.
    pub fn device(&self, id: DeviceId) -> Option<&Arc<SwapDevice>> {
        self.slot_of(id).map(|s| &s.device)
    }

    fn slot_of(&self, id: DeviceId) -> Option<&DeviceSlot> {
        self.devices.get(usize::from(id.0)).and_then(Option::as_ref)
    }

    /// Queues a read of the slots `entry..entry + buf.pages()` into `buf`. The buffer
    /// belongs to the engine until the completion hands it back.
    pub fn read(&mut self, entry: SwapEntry, buf: PageBuf) -> Result<Ticket, Rejected> {
        let len = buf.len();
        self.queue(entry, IoOp::Read, IoBuf::Owned(buf), len, true)
            .map_err(Self::rejected)
    }

    /// Queues a write of `buf` to the slots `entry..entry + buf.pages()`. The buffer comes
    /// back in the completion — on a failed write it still holds the page.
    pub fn write(&mut self, entry: SwapEntry, buf: PageBuf) -> Result<Ticket, Rejected> {
        let len = buf.len();
        self.queue(entry, IoOp::Write, IoBuf::Owned(buf), len, true)
            .map_err(Self::rejected)
    }

    /// Like [`read`](Self::read) but never submits by itself, whatever
    /// [`EngineConfig::submit_batch`] says: the request goes to the kernel with the next
    /// [`wait`](Self::wait) (then submit and wait are **one** `io_uring_enter`),
    /// [`enter_for_completions`](Self::enter_for_completions) or [`submit`](Self::submit).
    /// For a caller that is going to wait anyway — a swap-in at depth 1 — this saves one
    /// kernel entry per I/O (see `bench/results/swap.md`).
    pub fn queue_read(&mut self, entry: SwapEntry, buf: PageBuf) -> Result<Ticket, Rejected> {
        let len = buf.len();
        self.queue(entry, IoOp::Read, IoBuf::Owned(buf), len, false)
            .map_err(Self::rejected)
    }

    /// Like [`write`](Self::write) but never submits by itself; see
    /// [`queue_read`](Self::queue_read).
    pub fn queue_write(&mut self, entry: SwapEntry, buf: PageBuf) -> Result<Ticket, Rejected> {
        let len = buf.len();
        self.queue(entry, IoOp::Write, IoBuf::Owned(buf), len, false)
            .map_err(Self::rejected)
    }

    fn rejected((error, buf): (SwapError, IoBuf)) -> Rejected {
        match buf {
            IoBuf::Owned(buf) => Rejected { error, buf },
            // Only owned buffers come through `read`/`write`.
            IoBuf::Staged(_) | IoBuf::Raw(_) => Rejected {
                error,
                buf: PageBuf::page(),
            },
        }
    }

    /// Queues a read of one slot into an engine staging page (a registered fixed buffer,
    /// `IORING_OP_READ_FIXED`). The completion carries the page; copy it out with
    /// [`staged`](Self::staged) (e.g. as the source of `UFFDIO_COPY`) and give it back
    /// with [`release_staged`](Self::release_staged).
    pub fn read_staged(&mut self, entry: SwapEntry) -> Result<Ticket> {
        let page = self
            .ring
            .take_staging()
            .ok_or(SwapError::StagingExhausted(u32::from(
                self.ring.staging_pages(),
            )))?;
        self.queue(entry, IoOp::Read, IoBuf::Staged(page), PAGE_SIZE, true)
            .map_err(|(e, buf)| {
                if let IoBuf::Staged(p) = buf {
                    self.ring.release_staging(p);
                }
                e
            })
    }

    /// Copies one page from `src` into an engine staging page and queues its write
    /// (`IORING_OP_WRITE_FIXED`). `src` is free again on return; keep the page itself
    /// until the completion is `Ok` (a failed write means the device does not have it).
    pub fn write_staged(&mut self, entry: SwapEntry, src: &[u8]) -> Result<Ticket> {
        if src.len() != PAGE_SIZE {
            return Err(SwapError::BadBufferLength(src.len()));
        }
        if !self.has_capacity() {
            self.stats.queue_full += 1;
            return Err(SwapError::QueueFull {
                depth: self.depth(),
            });
        }
        let mut page = self
            .ring
            .take_staging()
            .ok_or(SwapError::StagingExhausted(u32::from(
                self.ring.staging_pages(),
            )))?;
        if let Some(dst) = self.ring.staged_mut(&mut page) {
            dst.copy_from_slice(src);
        }
        self.queue(entry, IoOp::Write, IoBuf::Staged(page), PAGE_SIZE, true)
            .map_err(|(e, buf)| {
                if let IoBuf::Staged(p) = buf {
                    self.ring.release_staging(p);
                }
                e
            })
    }

    /// The content of a staging page returned by a staged read (`None` for a page of
    /// another engine).
    pub fn staged(&self, page: &StagedPage) -> Option<&[u8]> {
        self.ring.staged(page)
    }

    /// Gives a staging page back to the pool. Returns false (and does nothing) for a page
    /// of another engine.
    pub fn release_staged(&mut self, page: StagedPage) -> bool {
        self.ring.release_staging(page)
    }

    /// Validates and queues a request; on refusal the buffer comes back.
    pub(crate) fn queue(
        &mut self,
        entry: SwapEntry,
        op: IoOp,
        buf: IoBuf,
        len: usize,
        auto_submit: bool,
    ) -> std::result::Result<Ticket, (SwapError, IoBuf)> {
        if len == 0 || len % PAGE_SIZE != 0 || len > u32::MAX as usize {
            return Err((SwapError::BadBufferLength(len), buf));
        }
        if let IoBuf::Raw(r) = &buf {
            if r.addr % PAGE_SIZE != 0 {
                return Err((SwapError::Misaligned(r.addr), buf));
            }
        }
        let Some(slot) = self.slot_of(entry.device()) else {
            return Err((SwapError::UnknownDevice(entry.device()), buf));
        };
        let pages = (len / PAGE_SIZE) as u64;
        let device = &slot.device;
        let inline = self.inline_sync
            && device.is_synchronous()
            && self.ring.pending() == 0
            && self.inline_done.is_empty();
        if entry.slot().saturating_add(pages) > device.slots() {
            return Err((
                SwapError::OutOfRange {
                    entry,
                    pages,
                    slots: device.slots(),
                },
                buf,
            ));
        }
        if op == IoOp::Read {
            if let Some(bad) = (entry.slot()..entry.slot() + pages).find(|&s| device.is_bad(s)) {
                let e = SwapEntry::new(entry.device(), bad).unwrap_or(entry);
                return Err((SwapError::BadEntry(e), buf));
            }
        }
        let rw = Rw {
            file: slot.fixed,
            offset: device.slot_offset(entry.slot()),
        };
        let fd = device.fd().as_raw_fd();
        let ticket = Ticket(self.next_ticket);
        let meta = Meta {
            ticket,
            entry,
            op,
            len: len as u32,
            started: Instant::now(),
        };
        if inline {
            let mut buf = buf;
            let res = self.ring.rw_inline(fd, op, rw.offset, &mut buf, len as u32);
            self.inline_done.push((Pending { meta, buf }, res));
            self.next_ticket += 1;
            self.stats.inline_ios += 1;
            self.stats.in_flight += 1;
            self.stats.max_in_flight = self.stats.max_in_flight.max(self.stats.in_flight);
            return Ok(ticket);
        }
        if !self.has_capacity() {
            self.stats.queue_full += 1;
            return Err((
                SwapError::QueueFull {
                    depth: self.depth(),
                },
                buf,
            ));
        }
        if let Err((e, buf)) = self.ring.push(rw, meta, buf) {
            if matches!(e, SwapError::QueueFull { .. }) {
                self.stats.queue_full += 1;
            }
            return Err((e, buf));
        }
        self.next_ticket += 1;
        self.stats.in_flight += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.stats.in_flight);
        if auto_submit
            && self.submit_batch > 0
            && self.ring.unsubmitted() >= self.submit_batch as usize
        {
            // The request is queued either way: a failed submit leaves it in the SQ for
            // the next submit / wait / enter_for_completions, which report the error.
            if let Err(e) = self.submit() {
                tracing::debug!(error = %e, "automatic submit failed; request stays queued");
            }
        }
        Ok(ticket)
    }

    /// Submits every queued request with one system call (none when nothing is queued).
    pub fn submit(&mut self) -> Result<usize> {
        if self.ring.unsubmitted() == 0 {
            return Ok(0);
        }
        self.stats.enters += 1;
        self.ring.submit()
    }

    /// Call every scheduling round while [`in_flight`](Self::in_flight) > 0: submits what
    /// is queued and makes finished I/O visible, without blocking; then [`reap`](Self::reap).
    /// Returns whether it entered the kernel.
    ///
    /// It enters (`io_uring_enter` with `GETEVENTS`) only when that can help: requests are
    /// queued, or under `COOP_TASKRUN`/`DEFER_TASKRUN` the kernel has flagged completion
    /// work (`IORING_SQ_TASKRUN`, a load from the shared ring, no system call). In the
    /// `Default` mode completions are posted without our help. It enters again while the
    /// kernel still flags work: one `DEFER_TASKRUN` entry runs at most 20 completions
    /// (module docs, "Lost wake-ups"), so after this returns every completion that had
    /// finished in the device when it was called is visible to `reap`.
    pub fn enter_for_completions(&mut self) -> Result<bool> {
        let queued = self.ring.unsubmitted() > 0;
        let needed = queued
            || (self.ring.pending() > 0
                && self.ring.mode() != CompletionMode::Default
                && self.ring.taskrun_flagged());
        if !needed {
            return Ok(false);
        }
        let entries = self.ring.run_task_work()?;
        self.stats.enters += u64::from(entries);
        Ok(true)
    }

    /// Like [`enter_for_completions`](Self::enter_for_completions) but always enters the
    /// kernel with `GETEVENTS` while anything is queued or in flight (no flag check).
    pub fn enter_always(&mut self) -> Result<bool> {
        if self.ring.unsubmitted() == 0 && self.ring.pending() == 0 {
            return Ok(false);
        }
        let entries = self.ring.run_task_work()?;
        self.stats.enters += u64::from(entries);
        Ok(true)
    }

    /// Whether the owner thread may go to sleep on the [`eventfd`](Self::eventfd) now
    /// without missing a completion: nothing is queued unsubmitted, no completion is
    /// visible in the CQ, and the kernel flags no pending completion work
    /// (`IORING_SQ_TASKRUN`). Three loads from the shared ring, no system call.
    ///
    /// Only meaningful after [`clear_eventfd`](Self::clear_eventfd): the eventfd is
    /// signalled for completion work that arrives *after* this check, not for work the
    /// kernel left flagged earlier (module docs, "How a sleeping thread learns of
    /// completions").
    pub fn ready_to_sleep(&mut self) -> bool {
        if !self.inline_done.is_empty() || self.ring.unsubmitted() > 0 || self.ring.cq_ready() {
            return false;
        }
        self.ring.mode() == CompletionMode::Default
            || self.ring.pending() == 0
            || !self.ring.taskrun_flagged()
    }

    /// Submits and blocks until at least `min` completions (capped at the requests in
    /// flight) are visible — one `io_uring_enter(to_submit, min, GETEVENTS)`. `wait(1)` is
    /// how a worker with nothing else to do sleeps; after [`queue_read`](Self::queue_read)
    /// it is the whole depth-1 swap-in in one kernel entry.
    pub fn wait(&mut self, min: u32) -> Result<()> {
        // Inline completions are visible already.
        let want = (min as usize)
            .saturating_sub(self.inline_done.len())
            .min(self.ring.pending());
        if want == 0 {
            return self.submit().map(|_| ());
        }
        self.stats.enters += 1;
        self.ring.submit_and_wait(want)
    }

    /// Like [`wait`](Self::wait) but gives up after `timeout`. Returns false when it timed
    /// out with fewer than `min` completions visible (some may be: [`reap`](Self::reap)).
    pub fn wait_timeout(&mut self, min: u32, timeout: std::time::Duration) -> Result<bool> {
        let want = (min as usize)
            .saturating_sub(self.inline_done.len())
            .min(self.ring.pending());
        if want == 0 {
            return self.submit().map(|_| true);
        }
        self.stats.enters += 1;
        self.ring.submit_and_wait_timeout(want, timeout)
    }

    /// Hands every visible completion to `on_completion`, without entering the kernel.
    /// Returns how many. Failed reads are marked bad on their device here.
    pub fn reap(&mut self, mut on_completion: impl FnMut(Completion)) -> usize {
        let Self {
            ring,
            devices,
            stats,
            inline_done,
            ..
        } = self;
        let mut staged_done: Vec<StagedPage> = Vec::new();
        let mut complete = |pending: Pending, res: i32| {
            Self::complete(
                devices,
                stats,
                &mut staged_done,
                pending,
                res,
                &mut on_completion,
            )
        };
        // Inline completions first: they were requested before anything now in the ring.
        let mut n = inline_done.len();
        for (pending, res) in inline_done.drain(..) {
            complete(pending, res);
        }
        n += ring.drain(&mut complete);
        for p in staged_done {
            ring.release_staging(p);
        }
        n
    }

    /// One finished request: statistics, classification, buffer hand-back.
    fn complete(
        devices: &[Option<DeviceSlot>],
        stats: &mut EngineStats,
        staged_done: &mut Vec<StagedPage>,
        pending: Pending,
        res: i32,
        on_completion: &mut impl FnMut(Completion),
    ) {
        let meta = pending.meta;
        let elapsed = meta.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        stats.in_flight = stats.in_flight.saturating_sub(1);
        let device = devices
            .get(usize::from(meta.entry.device().0))
            .and_then(Option::as_ref)
            .map(|s| &s.device);
        let result = Self::classify(&meta, res, device);
        match meta.op {
            IoOp::Read => {
                stats.reads += 1;
                EngineStats::record_latency(&mut stats.read_latency, elapsed);
                match &result {
                    Ok(n) => stats.read_bytes += u64::from(*n),
                    Err(_) => stats.read_errors += 1,
                }
            }
            IoOp::Write => {
                stats.writes += 1;
                EngineStats::record_latency(&mut stats.write_latency, elapsed);
                match &result {
                    Ok(n) => stats.write_bytes += u64::from(*n),
                    Err(_) => stats.write_errors += 1,
                }
            }
        }
        let buf = match pending.buf {
            IoBuf::Staged(p) if meta.op == IoOp::Write || result.is_err() => {
                staged_done.push(p);
                None
            }
            other => Some(other),
        };
        on_completion(Completion {
            ticket: meta.ticket,
            entry: meta.entry,
            op: meta.op,
            result,
            buf,
        });
    }

    fn classify(meta: &Meta, res: i32, device: Option<&Arc<SwapDevice>>) -> Result<u32> {
        let entry = meta.entry;
        let pages = u64::from(meta.len) / PAGE_SIZE as u64;
        if res >= 0 && res as u32 == meta.len {
            return Ok(meta.len);
        }
        match meta.op {
            IoOp::Read => {
                let err = if res < 0 {
                    SwapError::ReadFailed {
                        entry,
                        source: std::io::Error::from_raw_os_error(-res),
                    }
                } else {
                    SwapError::ShortRead {
                        entry,
                        expected: meta.len,
                        got: res as u32,
                    }
                };
                if err.must_poison() {
                    // Pages wholly read are intact; the rest of the request is lost.
                    let first_lost = if res > 0 {
                        res as u64 / PAGE_SIZE as u64
                    } else {
                        0
                    };
                    if let Some(d) = device {
                        for s in entry.slot() + first_lost..entry.slot() + pages {
                            d.mark_bad(s);
                        }
                    }
                    tracing::error!(%entry, error = %err, "swap read lost data; entry marked bad");
                }
                Err(err)
            }
            IoOp::Write => {
                let err = if res < 0 {
                    SwapError::WriteFailed {
                        entry,
                        source: std::io::Error::from_raw_os_error(-res),
                    }
                } else {
                    SwapError::ShortWrite {
                        entry,
                        expected: meta.len,
                        got: res as u32,
                    }
                };
                if res == -libc::ENOSPC
                    && let Some(d) = device
                {
                    // A sparse file whose file system filled up: swap is full (see
                    // `SwapDevice::mark_out_of_space`).
                    d.mark_out_of_space();
                }
                if res == -libc::EFAULT {
                    // The source page was gone when the kernel read it: a write that could
                    // not be done inline (into a hole of a sparse file, or an unwritten
                    // extent) waits in io-wq with its page not yet pinned, and the page can
                    // be taken back meanwhile (a fault moving it home). The caller knows
                    // whether the page is still its to write, and says so if it is.
                    tracing::debug!(%entry, error = %err, "swap write found no page to write; page stays with the caller");
                } else {
                    tracing::warn!(%entry, error = %err, "swap write failed; page stays in memory");
                }
                Err(err)
            }
        }
    }

    /// Back-pressure helper: while the queue is full, submits, waits for one completion and
    /// reaps. Returns how many completions were handed to `on_completion`.
    pub fn reap_until_capacity(
        &mut self,
        mut on_completion: impl FnMut(Completion),
    ) -> Result<usize> {
        let mut n = self.reap(&mut on_completion);
        while !self.has_capacity() {
            self.wait(1)?;
            n += self.reap(&mut on_completion);
        }
        Ok(n)
    }

    /// The eventfd registered with the ring (`None` if the config asked for none). It
    /// becomes readable when completion work arrives; then call
    /// [`enter_for_completions`](Self::enter_for_completions) and [`reap`](Self::reap).
    pub fn eventfd(&self) -> Option<BorrowedFd<'_>> {
        self.ring.eventfd()
    }

    /// Consumes the eventfd's counter (non-blocking); returns it (0: nothing signalled).
    pub fn clear_eventfd(&self) -> u64 {
        self.ring.clear_eventfd()
    }
}
