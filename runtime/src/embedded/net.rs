//! Network I/O for uThreads: [`TcpListener`] and [`TcpStream`] whose accept, connect,
//! read and write park the calling uThread — never its worker — while io_uring does the
//! I/O (DESIGN.md, "Network I/O for uThreads").
//!
//! ```no_run
//! use usm_runtime::embedded::Runtime;
//! let rt = Runtime::builder().workers(2).build()?;
//! let net = rt.net();
//! let listener = net.bind("127.0.0.1:0")?;
//! let handle = rt.handle()?;
//! rt.spawn(move || {
//!     while let Ok(mut conn) = listener.accept() {
//!         let _ = handle.spawn(move || {            // one uThread per connection
//!             let mut buf = [0u8; 4096];
//!             while let Ok(n @ 1..) = conn.read(&mut buf) {
//!                 if conn.write_all(&buf[..n]).is_err() { break; }
//!             }
//!         });
//!     }
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # How an operation runs
//! 0. A write first tries a direct non-blocking `send` (`MSG_DONTWAIT`) on the calling
//!    uThread: when the socket buffer has room — nearly always for a server's reply — the
//!    bytes are queued with one syscall and no park. Only `EAGAIN` (buffer full) takes the
//!    path below, with the write timeout. It never blocks the worker.
//! 1. The uThread pushes one SQE (plus a `LINK_TIMEOUT` when a timeout is set) on the
//!    io_uring of the worker it runs on and submits it; then it parks.
//! 2. The worker runs its other uThreads. Its driver reaps that ring in the same scheduling
//!    round as the swap engine's ring, and before the worker parks; the ring's eventfd is
//!    one of the worker's wake fds, so a parked worker wakes on a completion.
//! 3. The completion stores the result and unparks the uThread, which may resume on
//!    another worker. The protocol and why borrowed buffers are sound (a uThread dropped
//!    while parked cancels its operation and waits for it): `crate::sys::net`.
//!
//! # Buffers in managed regions (DESIGN.md, fault path item 6)
//! The kernel's own access to a missing region page fails with `EFAULT` (and a receive
//! could lose data). Every read or write first checks whether its buffer lies in a region
//! of this runtime; if so the pages are **pinned against eviction, then faulted in** (the
//! uThread may park on a swap-in here, as on any access), and stay pinned until the
//! completion. That covers plain `&mut [u8]` slices of a region as well as
//! [`TcpStream::read_region`] / [`TcpStream::write_region`]. An `EFAULT` is logged as a bug.
//!
//! # Errors and shutdown
//! Errors are values ([`NetError`]), with the errno kept. Timeouts
//! ([`TcpStream::set_read_timeout`], [`TcpStream::set_write_timeout`],
//! [`TcpListener::set_accept_timeout`]) give [`NetError::TimedOut`]. A peer that vanishes
//! gives `ECONNRESET`/`EPIPE` ([`NetError::is_disconnect`]) or a 0-byte read.
//! Dropping a stream or listener closes it. At [`crate::embedded::Runtime::shutdown`],
//! uThreads parked in accept or read are dropped (their operations cancelled, their
//! streams and listeners closed by unwinding), so every connection is closed.

use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::AsFd;
use std::time::Duration;
use usm_sync::Arc;

use crate::embedded::Region;
use crate::embedded::runtime::Shared;
use crate::sys::net::{
    AcceptQueue, Attempt, Completion, NetRing, NextAccept, SockAddr, SockOp, StartError, owned_fd,
    send_now,
};
use crate::sys::{sigbus, view};

/// What can go wrong with uThread sockets.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The kernel refused the operation (errno inside).
    #[error("{op}: {source}")]
    Io {
        /// The operation (`"accept"`, `"recv"`, ...).
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The operation's timeout expired first (nothing was transferred).
    #[error("{op} timed out after {after:?}")]
    TimedOut {
        /// The operation.
        op: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The peer closed the connection before the operation could finish.
    #[error("{op}: connection closed by the peer")]
    Closed {
        /// The operation (`"read_exact"`, `"write_all"`).
        op: &'static str,
    },
    /// The call parks, so it must run on a uThread.
    #[error("{op} must be called on a uThread of the runtime")]
    NotInUThread {
        /// The operation.
        op: &'static str,
    },
    /// A byte range outside its region.
    #[error("range {start}..{end} is outside the region ({len} bytes)")]
    Range {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
        /// The region's length.
        len: usize,
    },
    /// Setting up a worker's network io_uring failed (or the kernel lacks an operation).
    #[error("network io_uring set-up, {what}: {source}")]
    Setup {
        /// What failed or is missing.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    fn io(op: &'static str, source: std::io::Error) -> NetError {
        NetError::Io { op, source }
    }

    fn errno(op: &'static str, errno: i32) -> NetError {
        NetError::io(op, std::io::Error::from_raw_os_error(errno))
    }

    /// The operation's timeout expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, NetError::TimedOut { .. })
    }

    /// The peer is gone (reset, broken pipe, aborted, closed before the end).
    pub fn is_disconnect(&self) -> bool {
        match self {
            NetError::Closed { .. } => true,
            NetError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED | libc::ENOTCONN)
            ),
            _ => false,
        }
    }

    /// Retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            NetError::TimedOut { .. } => true,
            NetError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(
                    libc::EAGAIN
                        | libc::EINTR
                        | libc::EMFILE
                        | libc::ENFILE
                        | libc::ENOBUFS
                        | libc::ENOMEM
                )
            ),
            _ => false,
        }
    }
}

impl From<NetError> for std::io::Error {
    fn from(e: NetError) -> std::io::Error {
        let kind = match &e {
            NetError::Io { source, .. } => source.kind(),
            NetError::TimedOut { .. } => std::io::ErrorKind::TimedOut,
            NetError::Closed { .. } => std::io::ErrorKind::UnexpectedEof,
            NetError::Range { .. } => std::io::ErrorKind::InvalidInput,
            NetError::NotInUThread { .. } | NetError::Setup { .. } => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// Sets up one network ring per worker (called by the runtime builder).
pub(crate) fn rings(workers: usize) -> Result<Vec<NetRing>, NetError> {
    (0..workers)
        .map(|_| NetRing::new().map_err(|(what, source)| NetError::Setup { what, source }))
        .collect()
}

/// The network side of a runtime: binds listeners and connects streams whose operations
/// park uThreads. Cheap to clone; from [`crate::embedded::Runtime::net`].
#[derive(Clone)]
pub struct Net {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("rings", &self.shared.net.len())
            .finish()
    }
}

impl Net {
    pub(crate) fn new(shared: Arc<Shared>) -> Net {
        Net { shared }
    }

    /// The ring of the worker the caller runs on (any ring off the runtime's workers: the
    /// operation then fails with [`NetError::NotInUThread`] before using it).
    fn ring(&self) -> &NetRing {
        self.ring_at().1
    }

    /// [`Net::ring`] and its index.
    fn ring_at(&self) -> (usize, &NetRing) {
        let i = usm_localmanager::worker_index().unwrap_or(0) % self.shared.net.len();
        (i, &self.shared.net[i])
    }

    /// Binds a listening socket (`SO_REUSEADDR`, blocking bind; callable from any thread).
    pub fn bind(&self, addr: impl ToSocketAddrs) -> Result<TcpListener, NetError> {
        let inner = std::net::TcpListener::bind(addr).map_err(|e| NetError::io("bind", e))?;
        Ok(TcpListener {
            inner,
            net: self.clone(),
            accept_timeout: None,
            multishot: false,
            queue: Arc::new(AcceptQueue::default()),
        })
    }

    /// Connects to `addr`, parking the calling uThread meanwhile.
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream, NetError> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| NetError::io("socket", e.into()))?;
        let sa = SockAddr::from(addr);
        let done = self.run("connect", SockOp::Connect(fd.as_fd(), &sa), None)?;
        if done != 0 {
            return Err(NetError::errno("connect", libc::EPROTO));
        }
        Ok(TcpStream::new(std::net::TcpStream::from(fd), self.clone()))
    }

    /// Runs one operation and maps its completion.
    fn run(
        &self,
        op: &'static str,
        sock: SockOp<'_>,
        timeout: Option<Duration>,
    ) -> Result<i32, NetError> {
        match self.ring().run(sock, timeout) {
            Ok(Completion::Done(n)) => Ok(n),
            Ok(Completion::TimedOut) => Err(NetError::TimedOut {
                op,
                after: timeout.unwrap_or_default(),
            }),
            Ok(Completion::Errno(libc::EFAULT)) => {
                tracing::error!(op, "EFAULT on a pinned, pre-faulted buffer: a bug");
                Err(NetError::errno(op, libc::EFAULT))
            }
            Ok(Completion::Errno(e)) => Err(NetError::errno(op, e)),
            Err(StartError::NotInUThread) => Err(NetError::NotInUThread { op }),
            Err(StartError::Submit(e)) => Err(NetError::io(op, e)),
        }
    }

    /// Pins and faults in `[ptr, ptr + len)` when it lies in a region of this runtime
    /// (module docs); the pin lasts until the guard drops.
    fn prepare(&self, ptr: *const u8, len: usize) -> Option<BufferPin<'_>> {
        if len == 0 {
            return None;
        }
        let start = ptr as u64;
        let end = start + len as u64;
        let ours = Some(self.shared.runtime_id);
        if sigbus::region_runtime(start) != ours && sigbus::region_runtime(end - 1) != ours {
            return None;
        }
        // Pin first, then fault in: a page evicted between the two would be missing.
        self.shared.core.pin(self.shared.pid, start..end);
        let pin = BufferPin {
            shared: &self.shared,
            range: start..end,
        };
        view::prefault(ptr, len);
        Some(pin)
    }
}

/// Region pages pinned for an operation in flight.
struct BufferPin<'a> {
    shared: &'a Shared,
    range: Range<u64>,
}

impl Drop for BufferPin<'_> {
    fn drop(&mut self) {
        self.shared.core.unpin(self.shared.pid, self.range.clone());
    }
}

/// A listening TCP socket whose [`TcpListener::accept`] parks the calling uThread.
///
/// Each accept submits one `ACCEPT`. [`TcpListener::set_multishot`] instead keeps one
/// multishot `ACCEPT` armed (one CQE per connection, no SQE or `io_uring_enter` per
/// accept; `crate::sys::net`, "Multishot accept"); it is off by default because it did
/// not measure faster (bench/results/kv.md).
#[derive(Debug)]
pub struct TcpListener {
    inner: std::net::TcpListener,
    net: Net,
    accept_timeout: Option<Duration>,
    multishot: bool,
    queue: Arc<AcceptQueue>,
}

impl Drop for TcpListener {
    /// Cancels the multishot request (if armed) and closes the connections it queued.
    fn drop(&mut self) {
        if let Some((ring, user_data)) = self.queue.close() {
            self.net.shared.net[ring].cancel(user_data);
        }
    }
}

impl TcpListener {
    /// Waits for a connection (parks the uThread). Several uThreads may accept on one
    /// listener at once.
    pub fn accept(&self) -> Result<TcpStream, NetError> {
        if !self.multishot || self.accept_timeout.is_some() {
            return self.accept_once();
        }
        if usm_localmanager::current().is_none() {
            return Err(NetError::NotInUThread { op: "accept" });
        }
        loop {
            match self.queue.next() {
                Ok(NextAccept::Ready(fd)) if fd >= 0 => {
                    return Ok(TcpStream::new(
                        std::net::TcpStream::from(owned_fd(fd)),
                        self.net.clone(),
                    ));
                }
                Ok(NextAccept::Ready(errno)) => return Err(NetError::errno("accept", -errno)),
                Ok(NextAccept::Arm) => {
                    let (i, ring) = self.net.ring_at();
                    match ring.arm_accept(i, self.inner.as_fd(), &self.queue) {
                        Ok(()) => {}
                        Err(StartError::Submit(e)) => return Err(NetError::io("accept", e)),
                        Err(StartError::NotInUThread) => {
                            return Err(NetError::NotInUThread { op: "accept" });
                        }
                    }
                }
                Ok(NextAccept::Wait) => {
                    usm_localmanager::park();
                }
                Err(_) => return Err(NetError::NotInUThread { op: "accept" }),
            }
        }
    }

    /// One single-shot `ACCEPT` (with the accept timeout, if set).
    fn accept_once(&self) -> Result<TcpStream, NetError> {
        let fd = self.net.run(
            "accept",
            SockOp::Accept(self.inner.as_fd()),
            self.accept_timeout,
        )?;
        Ok(TcpStream::new(
            std::net::TcpStream::from(owned_fd(fd)),
            self.net.clone(),
        ))
    }

    /// Bounds each [`TcpListener::accept`] (`None`: wait forever). With a timeout every
    /// accept is a single-shot `ACCEPT` with a linked timeout.
    pub fn set_accept_timeout(&mut self, timeout: Option<Duration>) {
        self.accept_timeout = timeout;
    }

    /// Keep a multishot `ACCEPT` armed, or submit one `ACCEPT` per call (the default).
    pub fn set_multishot(&mut self, on: bool) {
        self.multishot = on;
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.inner
            .local_addr()
            .map_err(|e| NetError::io("getsockname", e))
    }
}

/// A TCP connection whose reads and writes park the calling uThread. Also
/// `std::io::Read` + `Write`. Dropping it closes the connection.
#[derive(Debug)]
pub struct TcpStream {
    inner: std::net::TcpStream,
    net: Net,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl TcpStream {
    fn new(inner: std::net::TcpStream, net: Net) -> TcpStream {
        TcpStream {
            inner,
            net,
            read_timeout: None,
            write_timeout: None,
        }
    }

    /// Reads what is available (at least one byte, or 0 at end of stream) into `buf`.
    /// A buffer in a region is pinned and faulted in first.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        let _pin = self.net.prepare(buf.as_ptr(), buf.len());
        let n = self.net.run(
            "recv",
            SockOp::Recv(self.inner.as_fd(), buf),
            self.read_timeout,
        )?;
        Ok(n as usize)
    }

    /// Fills `buf` completely ([`NetError::Closed`] if the stream ends first).
    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), NetError> {
        while !buf.is_empty() {
            match self.read(buf)? {
                0 => return Err(NetError::Closed { op: "read_exact" }),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Sends some of `buf` (at least one byte unless `buf` is empty).
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, NetError> {
        if !usm_localmanager::in_uthread() {
            return Err(NetError::NotInUThread { op: "send" });
        }
        let _pin = self.net.prepare(buf.as_ptr(), buf.len());
        // A direct non-blocking send first (module docs, "How an operation runs"): with room
        // in the socket buffer — nearly always for a reply — it costs one syscall and no
        // park, instead of an `io_uring_enter`, a park, a reap and a resume.
        match send_now(self.inner.as_fd(), buf) {
            Attempt::Done(n) if n > 0 || buf.is_empty() => return Ok(n),
            Attempt::Errno(libc::EFAULT) => {
                tracing::error!("send: EFAULT on a pinned, pre-faulted buffer: a bug");
                return Err(NetError::errno("send", libc::EFAULT));
            }
            Attempt::Errno(e) => return Err(NetError::errno("send", e)),
            Attempt::Done(_) | Attempt::WouldBlock => {}
        }
        let n = self.net.run(
            "send",
            SockOp::Send(self.inner.as_fd(), buf),
            self.write_timeout,
        )?;
        Ok(n as usize)
    }

    /// Sends all of `buf`.
    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<(), NetError> {
        while !buf.is_empty() {
            match self.write(buf)? {
                0 => return Err(NetError::Closed { op: "write_all" }),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    fn check(region: &Region, range: &Range<usize>) -> Result<(), NetError> {
        if range.start > range.end || range.end > region.len() {
            return Err(NetError::Range {
                start: range.start,
                end: range.end,
                len: region.len(),
            });
        }
        Ok(())
    }

    /// Reads into bytes `[range)` of `region` (pinned and faulted in first).
    pub fn read_region(
        &mut self,
        region: &mut Region,
        range: Range<usize>,
    ) -> Result<usize, NetError> {
        Self::check(region, &range)?;
        self.read(region.bytes_mut(range))
    }

    /// Fills bytes `[range)` of `region` completely.
    pub fn read_exact_region(
        &mut self,
        region: &mut Region,
        range: Range<usize>,
    ) -> Result<(), NetError> {
        Self::check(region, &range)?;
        self.read_exact(region.bytes_mut(range))
    }

    /// Sends some of bytes `[range)` of `region` (pinned and faulted in first).
    pub fn write_region(
        &mut self,
        region: &Region,
        range: Range<usize>,
    ) -> Result<usize, NetError> {
        Self::check(region, &range)?;
        self.write(region.bytes(range))
    }

    /// Sends all of bytes `[range)` of `region`.
    pub fn write_all_region(
        &mut self,
        region: &Region,
        range: Range<usize>,
    ) -> Result<(), NetError> {
        Self::check(region, &range)?;
        self.write_all(region.bytes(range))
    }

    /// A second handle on the same connection (a duplicated descriptor, no timeouts), so
    /// one uThread can read while another writes (e.g. a reader that keeps parsing
    /// requests while a writer sends replies in order). Both operate on the same socket;
    /// the connection closes when both are dropped.
    pub fn try_clone(&self) -> Result<TcpStream, NetError> {
        let inner = self.inner.try_clone().map_err(|e| NetError::io("dup", e))?;
        Ok(TcpStream::new(inner, self.net.clone()))
    }

    /// Bounds each read (`None`: wait forever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    /// Bounds each write (`None`: wait forever).
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) {
        self.write_timeout = timeout;
    }

    /// `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> Result<(), NetError> {
        self.inner
            .set_nodelay(on)
            .map_err(|e| NetError::io("setsockopt", e))
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Result<SocketAddr, NetError> {
        self.inner
            .peer_addr()
            .map_err(|e| NetError::io("getpeername", e))
    }

    /// The local address.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.inner
            .local_addr()
            .map_err(|e| NetError::io("getsockname", e))
    }

    /// Shuts down one or both directions (the descriptor stays open until drop).
    pub fn shutdown(&self, how: Shutdown) -> Result<(), NetError> {
        self.inner
            .shutdown(how)
            .map_err(|e| NetError::io("shutdown", e))
    }
}

impl std::io::Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(TcpStream::read(self, buf)?)
    }
}

impl std::io::Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(TcpStream::write(self, buf)?)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
