//! The `unsafe` half of uThread network I/O: one io_uring per worker for socket
//! operations, the completion hand-off to the parked uThread, and cancellation.
//!
//! # An operation's life ([`NetRing::run`])
//! 1. The calling uThread allocates an [`OpState`] (`Arc`): result, done flag, its own
//!    [`Unparker`], and the timeout's `timespec`. One strong count is leaked into the SQE's
//!    `user_data`; it is taken back by whoever reaps the one CQE of that SQE.
//! 2. Under the ring's mutex it pushes the SQE (with `IO_LINK` + a `LINK_TIMEOUT` SQE
//!    when a timeout is set; the timeout's CQE carries `user_data` 0 and is ignored) and
//!    submits at once (`io_uring_enter`), then releases the mutex.
//! 3. It parks (`usm_localmanager::park`) until `done` is set. The worker runs other
//!    uThreads; its driver reaps this ring every scheduling round ([`NetRing::poll`]) and
//!    before the worker parks; the ring's eventfd is one of the worker's wake fds, so a
//!    parked worker wakes on a completion.
//! 4. The reaper stores the result, sets `done` (Release) and unparks the uThread. The
//!    uThread reads `done` (Acquire) and the result, and returns.
//!
//! # Why borrowed buffers are sound
//! [`NetRing::run`] borrows the buffer for the whole call and does not return before the
//! CQE of its SQE was reaped. The one other way out is unwinding (a uThread dropped at
//! shutdown while parked here unwinds its stack): the in-flight guard's `Drop` then submits
//! `ASYNC_CANCEL` for the operation and waits — blocking the worker, shutdown only — until
//! its CQE was reaped, so the kernel never writes into a buffer after the call is gone.
//!
//! # Wake-ups
//! The eventfd counts CQEs posted; it matters only while the worker blocks (it is one of
//! the worker's wake fds), so it is read once per park at most, not once per completion:
//! [`NetRing::ready_to_block`], called by the worker right before it blocks, reads it
//! (non-blocking) when completions were reaped since the last read (`reaped`), *then*
//! checks the completion queue and refuses to block if a CQE is there. A CQE posted after
//! that read writes the eventfd again, so the blocked worker wakes; one posted before it is
//! visible to the check (the kernel publishes the CQE before it signals the eventfd, and the
//! eventfd's lock orders that signal before our read). So no completion waits for a
//! wake-up that was consumed, and a readable eventfd never outlives the completions that
//! made it readable (a parked worker would spin). With no completion reaped since the last
//! read, no CQE was posted that the check would not see, and the read is skipped.
//!
//! # Multishot accept ([`AcceptQueue`])
//! A listener without an accept timeout keeps one `ACCEPT` with `IORING_ACCEPT_MULTISHOT`
//! armed: every incoming connection posts a CQE (flag `F_MORE` while the request stays
//! armed) instead of costing an SQE and an `io_uring_enter` per accept. Its `user_data` is
//! an `Arc<AcceptQueue>` pointer with the low bit set ([`MULTI_TAG`]); the reaper borrows it
//! for a CQE with `F_MORE` and takes the count back for the last one (no `F_MORE`: the
//! request ended, by error or cancellation). Results queue in the `AcceptQueue`; every
//! CQE wakes all uThreads waiting in accept (they re-check under the queue's lock, so no
//! wake-up is lost and duplicates are harmless). An accept that finds the queue empty and
//! the request ended re-arms it on its own worker's ring. Dropping the listener cancels
//! the request (it borrows no memory: no peer address is asked for) and closes the
//! connections queued and any that still arrive.
//!
//! The ring is not `SINGLE_ISSUER`: uThreads submit from the worker they run on, the
//! cancellation path may run on another thread. Socket completions are task work of the
//! submitting worker (signalled, so a parked or busy worker runs it promptly).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_localmanager::Unparker;
use usm_sync::atomic::{AtomicBool, AtomicI32, Ordering};
use usm_sync::{Arc, Mutex, MutexGuard};

/// `user_data` of SQEs whose CQE nobody waits for (link timeouts, cancellations).
const IGNORED: u64 = 0;

/// Low bit of the `user_data` of a multishot accept (an `Arc<AcceptQueue>` pointer; the
/// `OpState` pointers of single-shot operations are aligned, so their low bit is clear).
const MULTI_TAG: u64 = 1;

/// Submission entries per ring (completions: [`CQ_ENTRIES`]; more in flight overflow into
/// the kernel's backlog, `IORING_FEAT_NODROP`).
const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;

/// A socket operation with the memory it borrows.
pub(crate) enum SockOp<'a> {
    /// `accept4(fd, NULL, NULL, SOCK_CLOEXEC)`; the result is the new descriptor.
    Accept(BorrowedFd<'a>),
    /// `recv(fd, buf)`.
    Recv(BorrowedFd<'a>, &'a mut [u8]),
    /// `send(fd, buf, MSG_NOSIGNAL)`.
    Send(BorrowedFd<'a>, &'a [u8]),
    /// `connect(fd, addr)`.
    Connect(BorrowedFd<'a>, &'a SockAddr),
}

impl SockOp<'_> {
    fn entry(&self) -> squeue::Entry {
        match self {
            SockOp::Accept(fd) => opcode::Accept::new(
                types::Fd(fd.as_raw_fd()),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .flags(libc::SOCK_CLOEXEC)
            .build(),
            SockOp::Recv(fd, buf) => opcode::Recv::new(
                types::Fd(fd.as_raw_fd()),
                buf.as_ptr().cast_mut(),
                clamp_len(buf.len()),
            )
            .build(),
            SockOp::Send(fd, buf) => opcode::Send::new(
                types::Fd(fd.as_raw_fd()),
                buf.as_ptr(),
                clamp_len(buf.len()),
            )
            .flags(libc::MSG_NOSIGNAL)
            .build(),
            SockOp::Connect(fd, addr) => opcode::Connect::new(
                types::Fd(fd.as_raw_fd()),
                (&raw const addr.storage).cast(),
                addr.len,
            )
            .build(),
        }
    }
}

/// A socket address in the kernel's layout.
pub(crate) struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl From<std::net::SocketAddr> for SockAddr {
    fn from(addr: std::net::SocketAddr) -> SockAddr {
        // SAFETY: `sockaddr_storage` is plain data; all zeros is a valid (unspecified) value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            std::net::SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in`.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in6`.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

/// One I/O length is at most 1 GiB (a larger buffer is served in several calls).
fn clamp_len(len: usize) -> u32 {
    len.min(1 << 30) as u32
}

/// What one operation returned: `Ok(res)` (`res >= 0`), or the errno, and whether its
/// linked timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Non-negative result (bytes, or a new descriptor for accept).
    Done(i32),
    /// The kernel's error.
    Errno(i32),
    /// Cancelled by its linked timeout.
    TimedOut,
}

/// The shared state of one operation (see the module docs).
struct OpState {
    result: AtomicI32,
    done: AtomicBool,
    waiter: Unparker,
    /// Read by the kernel when the `LINK_TIMEOUT` SQE is prepared (at submission); kept
    /// here so it outlives any deferred submission.
    timeout: types::Timespec,
}

/// The connections a multishot accept delivered, and the uThreads waiting for one (module
/// docs, "Multishot accept").
#[derive(Debug, Default)]
pub(crate) struct AcceptQueue {
    inner: Mutex<AcceptInner>,
}

#[derive(Debug, Default)]
struct AcceptInner {
    /// Accept results in arrival order: a new descriptor, or `-errno`.
    ready: VecDeque<i32>,
    /// uThreads parked in accept.
    waiters: Vec<Unparker>,
    /// The ring index and `user_data` of the armed request, while it is armed.
    armed: Option<(usize, u64)>,
    /// The listener is gone: arrivals are closed at once.
    closed: bool,
}

/// What [`AcceptQueue::next`] found.
#[derive(Debug)]
pub(crate) enum NextAccept {
    /// A result: a descriptor (`>= 0`) or `-errno`.
    Ready(i32),
    /// Nothing queued and no request armed: the caller arms one ([`NetRing::arm_accept`]).
    Arm,
    /// Registered as a waiter: park, then ask again.
    Wait,
}

impl AcceptQueue {
    fn lock(&self) -> MutexGuard<'_, AcceptInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a queued result, or says whether to arm a request or to park (registering the
    /// calling uThread first, so a result delivered after this returns wakes it).
    pub(crate) fn next(&self) -> Result<NextAccept, StartError> {
        let mut q = self.lock();
        if let Some(r) = q.ready.pop_front() {
            return Ok(NextAccept::Ready(r));
        }
        if q.armed.is_none() {
            return Ok(NextAccept::Arm);
        }
        q.waiters
            .push(usm_localmanager::current().ok_or(StartError::NotInUThread)?);
        Ok(NextAccept::Wait)
    }

    /// Delivers one CQE of the multishot request (`more`: it stays armed).
    fn deliver(&self, res: i32, more: bool) {
        let waiters = {
            let mut q = self.lock();
            if !more {
                q.armed = None;
            }
            if res >= 0 && q.closed {
                drop(owned_fd(res));
            } else if res != -libc::ECANCELED {
                q.ready.push_back(res);
            }
            std::mem::take(&mut q.waiters)
        };
        for w in waiters {
            w.unpark();
        }
    }

    /// The listener is dropped: closes what is queued; returns the armed request to cancel.
    pub(crate) fn close(&self) -> Option<(usize, u64)> {
        let mut q = self.lock();
        q.closed = true;
        for r in q.ready.drain(..) {
            if r >= 0 {
                drop(owned_fd(r));
            }
        }
        q.armed
    }
}

/// Why an operation could not be started.
#[derive(Debug)]
pub(crate) enum StartError {
    /// Not on a uThread: nothing could park.
    NotInUThread,
    /// `io_uring_enter` failed.
    Submit(std::io::Error),
}

/// One worker's network ring and its wake-up eventfd.
pub(crate) struct NetRing {
    ring: Mutex<IoUring>,
    eventfd: EventFd,
    /// Completions were reaped since the eventfd was last read (module docs, "Wake-ups").
    reaped: AtomicBool,
}

impl std::fmt::Debug for NetRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetRing").finish_non_exhaustive()
    }
}

impl NetRing {
    /// Sets up a ring, probes the operations uThread sockets use, registers an eventfd.
    /// `Err((what, error))` names what failed.
    pub(crate) fn new() -> Result<NetRing, (&'static str, std::io::Error)> {
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .map_err(|e| ("io_uring_setup", e))?;
        if !ring.params().is_feature_nodrop() {
            return Err((
                "IORING_FEAT_NODROP",
                std::io::Error::from_raw_os_error(libc::ENOSYS),
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| ("IORING_REGISTER_PROBE", e))?;
        for (code, name) in [
            (opcode::Accept::CODE, "IORING_OP_ACCEPT"),
            (opcode::Recv::CODE, "IORING_OP_RECV"),
            (opcode::Send::CODE, "IORING_OP_SEND"),
            (opcode::Connect::CODE, "IORING_OP_CONNECT"),
            (opcode::LinkTimeout::CODE, "IORING_OP_LINK_TIMEOUT"),
            (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
        ] {
            if !probe.is_supported(code) {
                return Err((name, std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
            }
        }
        let eventfd =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| ("eventfd", std::io::Error::from(e)))?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|e| ("IORING_REGISTER_EVENTFD", e))?;
        Ok(NetRing {
            ring: Mutex::new(ring),
            eventfd,
            reaped: AtomicBool::new(false),
        })
    }

    /// The fd that becomes readable when a completion is posted.
    pub(crate) fn eventfd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    fn lock(&self) -> MutexGuard<'_, IoUring> {
        // A panic while holding it left the ring consistent (every step is a single push,
        // submit or pop): keep using it.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on this ring, parking the calling uThread until it completes (or its
    /// timeout fires). See the module docs.
    pub(crate) fn run(
        &self,
        op: SockOp<'_>,
        timeout: Option<Duration>,
    ) -> Result<Completion, StartError> {
        let waiter = usm_localmanager::current().ok_or(StartError::NotInUThread)?;
        let timeout_ts = timeout.map(|d| {
            types::Timespec::new()
                .sec(d.as_secs())
                .nsec(d.subsec_nanos())
        });
        let state = Arc::new(OpState {
            result: AtomicI32::new(0),
            done: AtomicBool::new(false),
            waiter,
            timeout: timeout_ts.unwrap_or_default(),
        });
        let user_data = Arc::into_raw(state.clone()) as u64;
        let mut entry = op.entry().user_data(user_data);
        if timeout_ts.is_some() {
            entry = entry.flags(squeue::Flags::IO_LINK);
        }
        let link = timeout_ts.map(|_| {
            opcode::LinkTimeout::new(&state.timeout)
                .build()
                .user_data(IGNORED)
        });
        {
            let mut ring = self.lock();
            let need = if link.is_some() { 2 } else { 1 };
            let room = {
                let sq = ring.submission();
                sq.capacity() - sq.len()
            };
            if room < need {
                // Full submission queue: hand what is queued to the kernel first.
                if let Err(e) = ring.submit() {
                    // SAFETY: the SQE was never pushed, so the leaked count is ours again.
                    drop(unsafe { Arc::from_raw(user_data as *const OpState) });
                    return Err(StartError::Submit(e));
                }
            }
            let mut sq = ring.submission();
            // SAFETY: every pointer in `entry` comes from `op`, whose borrows live for this
            // whole call, and this call returns (or unwinds past `Inflight`'s drop) only
            // after the CQE of this SQE was reaped (module docs). `link` points at
            // `state.timeout`, alive while the leaked count is (until that CQE is reaped);
            // the kernel reads it when it prepares the SQE. Room for `need` entries was made
            // above, so neither push fails.
            let pushed = unsafe {
                match &link {
                    Some(link) => sq.push_multiple(&[entry, link.clone()]),
                    None => sq.push(&entry),
                }
            };
            drop(sq);
            if pushed.is_err() {
                // SAFETY: nothing was pushed; the leaked count is ours again.
                drop(unsafe { Arc::from_raw(user_data as *const OpState) });
                return Err(StartError::Submit(std::io::Error::from_raw_os_error(
                    libc::EBUSY,
                )));
            }
            // A failed enter (EBUSY with the completion backlog full, EINTR) leaves the SQE
            // queued: the driver's next poll submits it. The operation is in flight either way.
            if let Err(e) = ring.submit() {
                tracing::debug!(error = %e, "network io_uring submit deferred to the driver");
            }
        }
        let inflight = Inflight {
            ring: self,
            state: &state,
            user_data,
        };
        while !state.done.load(Ordering::Acquire) {
            usm_localmanager::park();
        }
        drop(inflight);
        let res = state.result.load(Ordering::Relaxed);
        Ok(if res >= 0 {
            Completion::Done(res)
        } else if res == -libc::ECANCELED && timeout.is_some() {
            Completion::TimedOut
        } else {
            Completion::Errno(-res)
        })
    }

    /// Arms a multishot accept on `listener` delivering into `queue` (module docs). `ring`
    /// is this ring's index, kept to cancel the request later.
    pub(crate) fn arm_accept(
        &self,
        ring: usize,
        listener: BorrowedFd<'_>,
        queue: &Arc<AcceptQueue>,
    ) -> Result<(), StartError> {
        let user_data = Arc::into_raw(queue.clone()) as u64;
        debug_assert_eq!(user_data & MULTI_TAG, 0);
        let user_data = user_data | MULTI_TAG;
        // Marked armed before the SQE exists, so no CQE finds it unarmed.
        queue.lock().armed = Some((ring, user_data));
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        let mut ring = self.lock();
        loop {
            // SAFETY: a multishot accept borrows no memory (no peer address); the listener
            // descriptor is referenced by the kernel's request itself from submission on.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                break;
            }
            if let Err(e) = ring.submit() {
                drop(ring);
                queue.lock().armed = None;
                // SAFETY: nothing was pushed; the leaked count is ours again.
                drop(unsafe { Arc::from_raw((user_data & !MULTI_TAG) as *const AcceptQueue) });
                return Err(StartError::Submit(e));
            }
        }
        if let Err(e) = ring.submit() {
            tracing::debug!(error = %e, "network io_uring submit deferred to the driver");
        }
        Ok(())
    }

    /// Cancels the multishot request `user_data` without waiting: it borrows no memory,
    /// and its last CQE (`ECANCELED`) gives the queue's count back.
    pub(crate) fn cancel(&self, user_data: u64) {
        let cancel = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(IGNORED);
        let mut ring = self.lock();
        loop {
            // SAFETY: an ASYNC_CANCEL SQE borrows no memory.
            if unsafe { ring.submission().push(&cancel) }.is_ok() {
                break;
            }
            let _ = ring.submit();
        }
        let _ = ring.submit();
    }

    /// Submits queued SQEs and reaps every completion, waking their uThreads. Returns the
    /// number of operations completed. Called by the worker's driver every round.
    pub(crate) fn poll(&self) -> usize {
        let mut done: Vec<(u64, i32, u32)> = Vec::new();
        {
            let mut ring = self.lock();
            if !ring.submission().is_empty()
                && let Err(e) = ring.submit()
            {
                tracing::debug!(error = %e, "network io_uring submit");
            }
            let mut cq = ring.completion();
            if !cq.is_empty() {
                done.extend(cq.by_ref().map(|c| (c.user_data(), c.result(), c.flags())));
                self.reaped.store(true, Ordering::Relaxed);
            }
        }
        dispatch(&done)
    }

    /// Called by the worker right before it blocks with this ring's eventfd among its wake
    /// fds: clears the eventfd if completions were reaped since it was last cleared, then
    /// says whether blocking is safe (no CQE waiting, no SQE left to submit). See the module
    /// docs, "Wake-ups".
    pub(crate) fn ready_to_block(&self) -> bool {
        if self.reaped.swap(false, Ordering::Relaxed) {
            let _ = self.eventfd.read();
        }
        let mut ring = self.lock();
        ring.submission().is_empty() && ring.completion().is_empty()
    }

    /// Cancels the operation `user_data` and waits until its CQE was reaped (see the module
    /// docs: the unwinding path only).
    fn cancel_and_wait(&self, state: &OpState, user_data: u64) {
        {
            let mut ring = self.lock();
            let cancel = opcode::AsyncCancel::new(user_data)
                .build()
                .user_data(IGNORED);
            loop {
                // SAFETY: an ASYNC_CANCEL SQE borrows no memory.
                if unsafe { ring.submission().push(&cancel) }.is_ok() {
                    break;
                }
                let _ = ring.submit();
            }
            let _ = ring.submit();
        }
        let started = Instant::now();
        let mut warned = false;
        loop {
            // Entering the kernel also runs this thread's pending io_uring task work.
            {
                let ring = self.lock();
                let _ = ring.submit();
            }
            self.poll();
            if state.done.load(Ordering::Acquire) {
                return;
            }
            if !warned && started.elapsed() > Duration::from_secs(5) {
                tracing::error!("a cancelled network operation has not completed after 5 s");
                warned = true;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Completes reaped operations (see the module docs, step 4).
fn dispatch(done: &[(u64, i32, u32)]) -> usize {
    let mut n = 0;
    for &(user_data, res, flags) in done {
        if user_data == IGNORED {
            continue;
        }
        if user_data & MULTI_TAG != 0 {
            let ptr = (user_data & !MULTI_TAG) as *const AcceptQueue;
            let more = cqueue::more(flags);
            // SAFETY: a tagged user_data is a count leaked by `arm_accept` with
            // `Arc::into_raw`. While the request stays armed (`F_MORE`) the count stays
            // leaked and is only borrowed here; the one CQE without `F_MORE` is the
            // request's last, and takes it back exactly once.
            let queue = std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(ptr) });
            queue.deliver(res, more);
            if !more {
                drop(std::mem::ManuallyDrop::into_inner(queue));
            }
            n += 1;
            continue;
        }
        // SAFETY: every other non-IGNORED user_data is a count leaked by `NetRing::run`
        // with `Arc::into_raw`, and each of those SQEs yields exactly one CQE, so the
        // count is taken back exactly once, here.
        let state = unsafe { Arc::from_raw(user_data as *const OpState) };
        state.result.store(res, Ordering::Relaxed);
        state.done.store(true, Ordering::Release);
        state.waiter.unpark();
        n += 1;
    }
    n
}

/// Keeps an operation's borrows alive until its CQE was reaped (module docs).
struct Inflight<'a> {
    ring: &'a NetRing,
    state: &'a OpState,
    user_data: u64,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if !self.state.done.load(Ordering::Acquire) {
            self.ring.cancel_and_wait(self.state, self.user_data);
        }
    }
}

/// What a non-blocking attempt ([`send_now`]) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// It transferred this many bytes.
    Done(usize),
    /// It would block (`EAGAIN`) or was interrupted: go through the ring.
    WouldBlock,
    /// The kernel's error.
    Errno(i32),
}

/// `send(fd, buf, MSG_DONTWAIT | MSG_NOSIGNAL)` right now, on the calling thread: never
/// blocks (`crate::embedded::net`, "How an operation runs", step 0).
pub(crate) fn send_now(fd: BorrowedFd<'_>, buf: &[u8]) -> Attempt {
    use nix::sys::socket::{MsgFlags, send};
    let len = clamp_len(buf.len()) as usize;
    match send(
        fd.as_raw_fd(),
        &buf[..len],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    ) {
        Ok(n) => Attempt::Done(n),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Attempt::WouldBlock,
        Err(e) => Attempt::Errno(e as i32),
    }
}

/// Takes ownership of a descriptor an `ACCEPT` completion returned.
pub(crate) fn owned_fd(fd: i32) -> OwnedFd {
    let raw: RawFd = fd;
    // SAFETY: `fd` is the result of a successful accept on our ring: a fresh descriptor
    // that nothing else owns or closes.
    unsafe { OwnedFd::from_raw_fd(raw) }
}
