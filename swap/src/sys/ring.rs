//! `Ring`: one io_uring instance plus the table of buffers it has handed to the kernel.
//!
//! # Buffer ownership (why the safe engine API is sound)
//!
//! ```text
//!   caller ──PageBuf──▶ Ring::push ──▶ slots[i] = Pending{buf}   (kernel may DMA into buf)
//!                                          │
//!                        CQE user_data=i ◀─┘  kernel is done with buf
//!   caller ◀──Pending{buf}── Ring::drain (slot i freed)
//! ```
//!
//! * A buffer whose address is in a submission entry is owned by `slots[i]` until the CQE
//!   carrying `user_data = i` has been read. Nothing else can reach it: `PageBuf` moved in
//!   by value; staging pages are this ring's own memory; raw buffers were promised by an
//!   `unsafe` caller (see [`crate::sys::raw`]).
//! * `Ring::drop` waits for every pending CQE before the buffers are freed. If the kernel
//!   refuses to let it wait, the buffers are leaked rather than freed under the kernel.
//! * Field order is drop order: `uring` (closing the fd drops the kernel's references to
//!   the registered files and staging buffer) goes before `staging`.
//! * Only `staging`, memory this ring allocated, is registered as a fixed buffer. Memory
//!   handed in by a caller never is: a fixed buffer pins its pages, and a pinned pool frame
//!   makes `UFFDIO_MOVE` fail with `EBUSY`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Instant;

use io_uring::{EnterFlags, IoUring, Probe, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_sync::atomic::{AtomicU64, Ordering};

use crate::engine::{CompletionMode, IoOp};
use crate::entry::{SwapEntry, Ticket};
use crate::error::{Result, SwapError};
use crate::header::PAGE_SIZE;
use crate::sys::buf::PageBuf;

static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

/// A page of the engine's registered staging area, handed to the caller by a completed
/// staged read. Read it with [`Engine::staged`](crate::Engine::staged) and give it back
/// with [`Engine::release_staged`](crate::Engine::release_staged); a page that is dropped
/// instead stays out of the pool until the engine is dropped.
#[must_use = "give the page back with Engine::release_staged"]
#[derive(Debug, PartialEq, Eq)]
pub struct StagedPage {
    pub(crate) ring: u64,
    pub(crate) index: u16,
}

/// A caller-owned memory range handed to the engine by an `unsafe` raw request. Only
/// [`crate::sys::raw`] creates one; it comes back in the completion.
#[derive(Debug, PartialEq, Eq)]
pub struct RawBuf {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl RawBuf {
    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the range is empty (never, for a request the engine accepted).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The buffer of a request: given to the engine with the request, returned with its
/// completion.
#[derive(Debug)]
pub enum IoBuf {
    /// A caller's owned buffer (heap, never registered).
    Owned(PageBuf),
    /// One of the engine's registered staging pages.
    Staged(StagedPage),
    /// A caller's memory, passed by an `unsafe` raw request.
    Raw(RawBuf),
}

/// What the engine remembers about a request in flight.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) ticket: Ticket,
    pub(crate) entry: SwapEntry,
    pub(crate) op: IoOp,
    pub(crate) len: u32,
    pub(crate) started: Instant,
}

/// A request in flight: its metadata and the buffer the kernel is using.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) meta: Meta,
    pub(crate) buf: IoBuf,
}

/// One read or write to queue.
pub(crate) struct Rw {
    pub(crate) file: u32,
    pub(crate) offset: u64,
}

/// Setup parameters of a ring.
pub(crate) struct RingSetup<'a> {
    pub(crate) entries: u32,
    pub(crate) mode: Option<CompletionMode>,
    pub(crate) staging_pages: u16,
    pub(crate) eventfd: bool,
    pub(crate) files: &'a [RawFd],
}

/// An io_uring instance that owns the buffers of its in-flight requests.
pub(crate) struct Ring {
    uring: IoUring,
    id: u64,
    mode: CompletionMode,
    report: String,
    slots: Vec<Option<Pending>>,
    free_slots: Vec<u32>,
    cqes: Vec<(u64, i32)>,
    done: Vec<(Pending, i32)>,
    staging: PageBuf,
    staging_pages: u16,
    staging_free: Vec<u16>,
    eventfd: Option<EventFd>,
}

fn try_build(mode: CompletionMode, single_issuer: bool, entries: u32) -> std::io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(entries.saturating_mul(2)).dontfork();
    if single_issuer {
        b.setup_single_issuer();
    }
    match mode {
        CompletionMode::Default => {}
        CompletionMode::CoopTaskrun => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        CompletionMode::DeferTaskrun => {
            b.setup_defer_taskrun().setup_taskrun_flag();
        }
    }
    b.build(entries)
}

impl Ring {
    /// Creates the ring on the calling thread (with `SINGLE_ISSUER` it is the only thread
    /// that may submit), probes the opcodes, registers files, staging and eventfd.
    pub(crate) fn new(setup: &RingSetup<'_>) -> Result<Self> {
        let entries = setup.entries.max(1).next_power_of_two();
        let candidates: &[CompletionMode] = match setup.mode {
            Some(m) => std::slice::from_ref(match m {
                CompletionMode::Default => &CompletionMode::Default,
                CompletionMode::CoopTaskrun => &CompletionMode::CoopTaskrun,
                CompletionMode::DeferTaskrun => &CompletionMode::DeferTaskrun,
            }),
            None => &[
                CompletionMode::DeferTaskrun,
                CompletionMode::CoopTaskrun,
                CompletionMode::Default,
            ],
        };
        let mut report = String::new();
        let mut built = None;
        let mut last_err = None;
        for &mode in candidates {
            // DEFER_TASKRUN requires SINGLE_ISSUER; the others only prefer it.
            let issuer_options: &[bool] = if mode == CompletionMode::DeferTaskrun {
                &[true]
            } else {
                &[true, false]
            };
            for &single in issuer_options {
                let name = format!("{mode}{}", if single { "+SINGLE_ISSUER" } else { "" });
                match try_build(mode, single, entries) {
                    Ok(u) => {
                        report.push_str(&format!("{name} chosen"));
                        built = Some((u, mode));
                        break;
                    }
                    Err(e) => {
                        report.push_str(&format!("{name} refused ({e}); "));
                        last_err = Some(e);
                    }
                }
            }
            if built.is_some() {
                break;
            }
        }
        let Some((uring, mode)) = built else {
            return Err(match (setup.mode, last_err) {
                (Some(CompletionMode::DeferTaskrun), Some(e))
                    if e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    SwapError::Unsupported {
                        what: "IORING_SETUP_DEFER_TASKRUN",
                    }
                }
                (Some(CompletionMode::CoopTaskrun), Some(e))
                    if e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    SwapError::Unsupported {
                        what: "IORING_SETUP_COOP_TASKRUN",
                    }
                }
                (_, Some(e)) => SwapError::ring("setup", e),
                (_, None) => SwapError::Unsupported {
                    what: "io_uring_setup",
                },
            });
        };

        let mut probe = Probe::new();
        uring
            .submitter()
            .register_probe(&mut probe)
            .map_err(|_| SwapError::Unsupported {
                what: "IORING_REGISTER_PROBE",
            })?;
        let mut needed = vec![
            (opcode::Read::CODE, "IORING_OP_READ"),
            (opcode::Write::CODE, "IORING_OP_WRITE"),
        ];
        if setup.staging_pages > 0 {
            needed.push((opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED"));
            needed.push((opcode::WriteFixed::CODE, "IORING_OP_WRITE_FIXED"));
        }
        for (code, what) in needed {
            if !probe.is_supported(code) {
                return Err(SwapError::Unsupported { what });
            }
        }

        if !setup.files.is_empty() {
            uring
                .submitter()
                .register_files(setup.files)
                .map_err(|e| SwapError::ring("register files", e))?;
        }
        let staging = PageBuf::new(usize::from(setup.staging_pages));
        if setup.staging_pages > 0 {
            let iov = libc::iovec {
                iov_base: staging.as_ptr() as *mut libc::c_void,
                iov_len: usize::from(setup.staging_pages) * PAGE_SIZE,
            };
            // SAFETY: the iovec covers `staging`, memory this ring owns; it is freed only
            // after `uring` is dropped (field order), which releases the registration.
            unsafe { uring.submitter().register_buffers(&[iov]) }
                .map_err(|e| SwapError::ring("register staging buffers", e))?;
        }
        let eventfd = if setup.eventfd {
            let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| SwapError::ring("eventfd", e.into()))?;
            uring
                .submitter()
                .register_eventfd(efd.as_fd().as_raw_fd())
                .map_err(|e| SwapError::ring("register eventfd", e))?;
            Some(efd)
        } else {
            None
        };
        let depth = entries as usize;
        Ok(Self {
            uring,
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
            mode,
            report,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth as u32).rev().collect(),
            cqes: Vec::with_capacity(depth * 2),
            done: Vec::with_capacity(depth),
            staging,
            staging_pages: setup.staging_pages,
            staging_free: (0..setup.staging_pages).rev().collect(),
            eventfd,
        })
    }

    pub(crate) fn mode(&self) -> CompletionMode {
        self.mode
    }

    pub(crate) fn report(&self) -> &str {
        &self.report
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn pending(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    pub(crate) fn unsubmitted(&mut self) -> usize {
        self.uring.submission().len()
    }

    pub(crate) fn eventfd(&self) -> Option<BorrowedFd<'_>> {
        self.eventfd.as_ref().map(|e| e.as_fd())
    }

    /// Consumes the eventfd counter; returns its value (0 when nothing was signalled).
    pub(crate) fn clear_eventfd(&self) -> u64 {
        self.eventfd
            .as_ref()
            .and_then(|e| e.read().ok())
            .unwrap_or(0)
    }

    pub(crate) fn staging_pages(&self) -> u16 {
        self.staging_pages
    }

    pub(crate) fn take_staging(&mut self) -> Option<StagedPage> {
        self.staging_free.pop().map(|index| StagedPage {
            ring: self.id,
            index,
        })
    }

    /// Gives back a page of this ring; a page of another ring is ignored (returns false).
    pub(crate) fn release_staging(&mut self, page: StagedPage) -> bool {
        if page.ring != self.id || page.index >= self.staging_pages {
            return false;
        }
        self.staging_free.push(page.index);
        true
    }

    fn staging_range(&self, page: &StagedPage) -> Option<std::ops::Range<usize>> {
        (page.ring == self.id && page.index < self.staging_pages).then(|| {
            let start = usize::from(page.index) * PAGE_SIZE;
            start..start + PAGE_SIZE
        })
    }

    pub(crate) fn staged(&self, page: &StagedPage) -> Option<&[u8]> {
        let r = self.staging_range(page)?;
        Some(&self.staging[r])
    }

    pub(crate) fn staged_mut(&mut self, page: &mut StagedPage) -> Option<&mut [u8]> {
        let r = self.staging_range(page)?;
        Some(&mut self.staging[r])
    }

    /// Performs one read or write at once, in the calling thread (`pread`/`pwrite` on
    /// `fd`, no io_uring): the engine's inline path for a lone request on a synchronous
    /// device (see the engine's module docs). `len` bytes of `buf`, which the engine checked
    /// against the buffer's size, at byte `offset`. Returns what a CQE would: the byte
    /// count or `-errno`.
    pub(crate) fn rw_inline(
        &mut self,
        fd: RawFd,
        op: IoOp,
        offset: u64,
        buf: &mut IoBuf,
        len: u32,
    ) -> i32 {
        let addr: *mut u8 = match buf {
            IoBuf::Owned(b) => b.as_mut_ptr(),
            IoBuf::Staged(p) => match self.staging_range(p) {
                Some(r) => self.staging[r].as_mut_ptr(),
                None => return -libc::EINVAL,
            },
            IoBuf::Raw(r) => r.addr as *mut u8,
        };
        let Ok(offset) = libc::off_t::try_from(offset) else {
            return -libc::EINVAL;
        };
        loop {
            // SAFETY: `addr..addr+len` is the request's buffer — an owned `PageBuf` of at
            // least `len` bytes, a staging page of this ring (`len` = one page), or caller
            // memory promised valid by the unsafe raw API until the completion is reaped —
            // and `&mut IoBuf` gives us exclusive use of it; the call is synchronous, so the
            // kernel is done with the memory when it returns. `fd` is the device's
            // descriptor, kept open by the engine's `Arc<SwapDevice>`.
            let n = unsafe {
                match op {
                    IoOp::Read => libc::pread(fd, addr.cast(), len as usize, offset),
                    IoOp::Write => libc::pwrite(fd, addr.cast_const().cast(), len as usize, offset),
                }
            };
            if n >= 0 {
                return i32::try_from(n).unwrap_or(i32::MAX);
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return -errno;
            }
        }
    }

    /// Queues one request in the submission queue (no system call). On refusal the buffer
    /// comes back with the error.
    pub(crate) fn push(
        &mut self,
        rw: Rw,
        meta: Meta,
        mut buf: IoBuf,
    ) -> std::result::Result<(), (SwapError, IoBuf)> {
        let Some(slot) = self.free_slots.pop() else {
            return Err((
                SwapError::QueueFull {
                    depth: self.slots.len() as u32,
                },
                buf,
            ));
        };
        let len = meta.len;
        let (addr, fixed_buf): (*mut u8, Option<u16>) = match &mut buf {
            IoBuf::Owned(b) => (b.as_mut_ptr(), None),
            IoBuf::Staged(p) => match self.staging_range(p) {
                Some(r) => (self.staging[r].as_mut_ptr(), Some(0)),
                None => {
                    self.free_slots.push(slot);
                    return Err((SwapError::BadBufferLength(0), buf));
                }
            },
            IoBuf::Raw(r) => (r.addr as *mut u8, None),
        };
        let file = types::Fixed(rw.file);
        let sqe: squeue::Entry = match (meta.op, fixed_buf) {
            (IoOp::Read, None) => opcode::Read::new(file, addr, len).offset(rw.offset).build(),
            (IoOp::Read, Some(i)) => opcode::ReadFixed::new(file, addr, len, i)
                .offset(rw.offset)
                .build(),
            (IoOp::Write, None) => opcode::Write::new(file, addr, len)
                .offset(rw.offset)
                .build(),
            (IoOp::Write, Some(i)) => opcode::WriteFixed::new(file, addr, len, i)
                .offset(rw.offset)
                .build(),
        }
        .user_data(u64::from(slot));
        // SAFETY: the entry's buffer (`addr..addr+len`, checked against the buffer's size by
        // the engine) is stored in `slots[slot]` below and stays there until the CQE with
        // this user_data is drained; `Drop` waits for all CQEs (module docs). A raw buffer's
        // validity was promised by the caller of the unsafe raw API.
        let pushed = unsafe { self.uring.submission().push(&sqe) };
        if pushed.is_err() {
            // The SQ has as many entries as there are slots, so this means the kernel has
            // not consumed submitted entries yet; ask for a submit first.
            self.free_slots.push(slot);
            return Err((
                SwapError::QueueFull {
                    depth: self.slots.len() as u32,
                },
                buf,
            ));
        }
        self.slots[slot as usize] = Some(Pending { meta, buf });
        Ok(())
    }

    /// Submits queued entries (one `io_uring_enter`, only if any are queued or deferred
    /// task work is flagged). Returns how many were submitted.
    pub(crate) fn submit(&mut self) -> Result<usize> {
        loop {
            match self.uring.submit() {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(SwapError::ring("submit", e)),
            }
        }
    }

    /// Submits queued entries and runs completion task work (`GETEVENTS`) without
    /// waiting: with `DEFER_TASKRUN` nothing completes until this is called; with
    /// `COOP_TASKRUN` it spares waiting for the next tick.
    pub(crate) fn enter_getevents(&mut self) -> Result<()> {
        let to_submit = self.uring.submission().len() as u32;
        loop {
            // SAFETY: no extended argument is passed (`None`, size 0), so the kernel reads
            // no user memory; submitted entries were pushed under `push`'s contract.
            let r = unsafe {
                self.uring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    0,
                    EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(SwapError::ring("enter(GETEVENTS)", e)),
            }
        }
    }

    /// Runs *all* completion task work, not just one batch: `enter_getevents` once, then
    /// again while the kernel still flags work (`IORING_SQ_TASKRUN`) and requests are in
    /// flight. Returns how many times it entered the kernel.
    ///
    /// Why the loop: under `DEFER_TASKRUN` an `io_uring_enter(GETEVENTS)` with
    /// `min_complete = 0` runs at most `IO_LOCAL_TW_DEFAULT_MAX` (20 on 6.x) task-work
    /// items; the rest stay on the ring's retry list with `IORING_SQ_TASKRUN` set again
    /// but **without** an eventfd signal (the kernel signals only when its work list goes
    /// from empty to non-empty, or when CQEs are posted). Measured here: 64 finished reads
    /// needed four entries (20 + 20 + 20 + 4). See the engine's module docs.
    pub(crate) fn run_task_work(&mut self) -> Result<u32> {
        self.enter_getevents()?;
        let mut entries = 1;
        // Bounded: each entry runs up to 20 items (or everything, outside DEFER_TASKRUN).
        let cap = (self.capacity() / 16 + 2) as u32;
        while entries < cap
            && self.mode != CompletionMode::Default
            && self.pending() > 0
            && self.taskrun_flagged()
        {
            self.enter_getevents()?;
            entries += 1;
        }
        Ok(entries)
    }

    /// Whether completions are visible in the CQ (a load from the shared ring).
    pub(crate) fn cq_ready(&mut self) -> bool {
        !self.uring.completion().is_empty()
    }

    /// Submits and blocks until at least `want` completions are visible or `timeout`
    /// passes (`IORING_ENTER_EXT_ARG`). Returns false on timeout.
    pub(crate) fn submit_and_wait_timeout(
        &mut self,
        want: usize,
        timeout: std::time::Duration,
    ) -> Result<bool> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match self.uring.submitter().submit_with_args(want, &args) {
                Ok(_) => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(false),
                Err(e) => return Err(SwapError::ring("submit_and_wait(timeout)", e)),
            }
        }
    }

    /// Submits and blocks until at least `want` completions are visible.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> Result<()> {
        loop {
            match self.uring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(SwapError::ring("submit_and_wait", e)),
            }
        }
    }

    /// Whether the kernel flagged pending task work (`IORING_SQ_TASKRUN`).
    pub(crate) fn taskrun_flagged(&mut self) -> bool {
        self.uring.submission().taskrun()
    }

    /// Hands every visible completion to `f` with its request and result, freeing slots.
    ///
    /// Every visible CQE is first matched with its request (slot freed, request moved to
    /// `done`), then `f` runs: if `f` panics, the remaining requests are dropped while
    /// unwinding — the kernel is already done with their buffers — and no slot is left
    /// waiting for a CQE that was consumed.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(Pending, i32)) -> usize {
        self.cqes.clear();
        self.cqes
            .extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
        let mut done = std::mem::take(&mut self.done);
        for &(ud, res) in &self.cqes {
            let Some(p) = self.slots.get_mut(ud as usize).and_then(Option::take) else {
                tracing::error!(user_data = ud, "completion for an unknown request; ignored");
                continue;
            };
            self.free_slots.push(ud as u32);
            done.push((p, res));
        }
        let n = done.len();
        for (p, res) in done.drain(..) {
            f(p, res);
        }
        self.done = done;
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Wait until the kernel is done with every buffer it was given (module docs).
        while self.pending() > 0 {
            let want = self.pending();
            if let Err(e) = self.submit_and_wait(want) {
                tracing::error!(error = %e, pending = want,
                    "io_uring would not let us wait for in-flight I/O; leaking its buffers");
                for p in self.slots.iter_mut().filter_map(Option::take) {
                    std::mem::forget(p);
                }
                std::mem::forget(std::mem::replace(&mut self.staging, PageBuf::new(1)));
                return;
            }
            self.drain(|_, _| {});
        }
        // Release the registered device files now: closing the ring fd frees its context
        // asynchronously (a kernel work item), which would keep an O_EXCL block device
        // busy for a moment after the engine is gone.
        if let Err(e) = self.uring.submitter().unregister_files() {
            if e.raw_os_error() != Some(libc::ENXIO) {
                tracing::debug!(error = %e, "unregister files");
            }
        }
    }
}
