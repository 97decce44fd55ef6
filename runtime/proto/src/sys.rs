//! Unix `SOCK_SEQPACKET` sockets, `SCM_RIGHTS` and `SO_PEERCRED`: the only `unsafe` of
//! the crate.
//!
//! Nothing on the send path allocates (the tagger sends from inside its malloc): messages
//! are encoded into a stack buffer and sent with one `sendmsg`.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::error::ProtoError;
use crate::wire::{self, MAX_MESSAGE_LEN, Message};

/// At most this many descriptors are accepted in one datagram's control data; more is
/// reported as [`ProtoError::Truncated`] (and all are closed).
const MAX_FDS: usize = 4;

/// Control buffer big enough for `MAX_FDS` descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Credentials of the process at the other end of a socket (`SO_PEERCRED`: taken when it
/// connected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Peer's pid.
    pub pid: u32,
    /// Peer's effective uid.
    pub uid: u32,
    /// Peer's effective gid.
    pub gid: u32,
}

/// One connected `SOCK_SEQPACKET` socket carrying protocol messages.
///
/// Sends may come from several threads at once (each datagram is atomic); receives
/// should come from one thread.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

fn sockaddr_for(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), ProtoError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ProtoError::PathTooLong { len: bytes.len() });
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket() -> Result<OwnedFd, ProtoError> {
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(ProtoError::last_os("socket"));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_timeout(
    fd: BorrowedFd<'_>,
    opt: libc::c_int,
    timeout: Option<Duration>,
) -> Result<(), ProtoError> {
    let tv = match timeout {
        None => libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        Some(d) => libc::timeval {
            tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
            // A zero timeval means "forever": round a tiny timeout up to 1 µs.
            tv_usec: (d.subsec_micros().max(u32::from(d.is_zero()))) as libc::suseconds_t,
        },
    };
    // SAFETY: `tv` is a valid timeval that outlives the call; the length matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(ProtoError::last_os("setsockopt(timeout)"));
    }
    Ok(())
}

impl Channel {
    /// Connects to the daemon's socket at `path`.
    pub fn connect(path: &Path) -> Result<Channel, ProtoError> {
        let (addr, len) = sockaddr_for(path)?;
        let fd = seqpacket_socket()?;
        loop {
            // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
            let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
            if rc == 0 {
                return Ok(Channel { fd });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(ProtoError::io("connect", err));
            }
        }
    }

    /// Wraps an already connected `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Creates a connected pair (tests, and in-process daemons).
    pub fn pair() -> Result<(Channel, Channel), ProtoError> {
        let mut fds = [-1 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair(2) writes.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(ProtoError::last_os("socketpair"));
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// A second handle on the same socket (e.g. one thread receives, another sends).
    pub fn try_clone(&self) -> Result<Channel, ProtoError> {
        let fd = self.fd.try_clone().map_err(|e| ProtoError::io("dup", e))?;
        Ok(Channel { fd })
    }

    /// Credentials of the peer process (`SO_PEERCRED`).
    pub fn peer_credentials(&self) -> Result<PeerCredentials, ProtoError> {
        // SAFETY: ucred is plain old data.
        let mut cred: libc::ucred = unsafe { zeroed() };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes and describe each other.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(ProtoError::last_os("getsockopt(SO_PEERCRED)"));
        }
        Ok(PeerCredentials {
            pid: cred.pid as u32,
            uid: cred.uid,
            gid: cred.gid,
        })
    }

    /// Receive timeout (`SO_RCVTIMEO`); `None` blocks forever.
    pub fn set_recv_timeout(&self, timeout: Option<Duration>) -> Result<(), ProtoError> {
        set_timeout(self.fd.as_fd(), libc::SO_RCVTIMEO, timeout)
    }

    /// Send timeout (`SO_SNDTIMEO`); `None` blocks forever.
    pub fn set_send_timeout(&self, timeout: Option<Duration>) -> Result<(), ProtoError> {
        set_timeout(self.fd.as_fd(), libc::SO_SNDTIMEO, timeout)
    }

    /// Sends one message, blocking while the socket is full. Never allocates.
    pub fn send(&self, msg: &Message) -> Result<(), ProtoError> {
        self.send_raw(msg, &[], 0)
    }

    /// Sends one message only if the socket has room now (`EAGAIN` otherwise, see
    /// [`ProtoError::is_retryable`]). Never allocates.
    pub fn send_nowait(&self, msg: &Message) -> Result<(), ProtoError> {
        self.send_raw(msg, &[], libc::MSG_DONTWAIT)
    }

    /// Sends one message with `fd` attached as `SCM_RIGHTS`. Never allocates.
    pub fn send_with_fd(&self, msg: &Message, fd: BorrowedFd<'_>) -> Result<(), ProtoError> {
        self.send_raw(msg, &[fd], 0)
    }

    /// Sends one message with up to four descriptors attached. Never allocates.
    pub fn send_with_fds(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), ProtoError> {
        self.send_raw(msg, fds, 0)
    }

    fn send_raw(
        &self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
        flags: libc::c_int,
    ) -> Result<(), ProtoError> {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let len = wire::encode(msg, &mut buf)?;
        self.send_bytes_fds(&buf[..len], fds, flags)
    }

    /// Sends raw bytes as one datagram (tests use it to send malformed messages).
    pub fn send_bytes(
        &self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
        flags: libc::c_int,
    ) -> Result<(), ProtoError> {
        match fd {
            Some(fd) => self.send_bytes_fds(bytes, &[fd], flags),
            None => self.send_bytes_fds(bytes, &[], flags),
        }
    }

    fn send_bytes_fds(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        flags: libc::c_int,
    ) -> Result<(), ProtoError> {
        if fds.len() > MAX_FDS {
            return Err(ProtoError::BadFdCount {
                message: "outgoing message",
                count: fds.len(),
                expected: MAX_FDS,
            });
        }
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let mut cmsg = CmsgBuf([0; 64]);
        // SAFETY: msghdr is plain old data; all-zero means "no name, no control".
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_iov = &raw mut iov;
        hdr.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = (size_of::<RawFd>() * fds.len()) as u32;
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
            hdr.msg_control = cmsg.0.as_mut_ptr().cast();
            hdr.msg_controllen = space as _;
            // SAFETY: msg_control points at `cmsg` (8-aligned, 64 bytes >= CMSG_SPACE of
            // at most MAX_FDS ints), so the header and `fds.len()` ints fit.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
        }
        loop {
            // SAFETY: `hdr` points at `iov` (over `bytes`) and `cmsg`, all alive and valid
            // for the duration of the call.
            let rc =
                unsafe { libc::sendmsg(self.fd.as_raw_fd(), &hdr, flags | libc::MSG_NOSIGNAL) };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(ProtoError::io("sendmsg", err));
            }
        }
    }

    /// Receives one datagram into `buf` with any descriptors it carried.
    /// Returns the length (0 = the peer closed) and the descriptors (closed on drop).
    pub fn recv_bytes(
        &self,
        buf: &mut [u8; MAX_MESSAGE_LEN],
    ) -> Result<(usize, Vec<OwnedFd>), ProtoError> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cmsg = CmsgBuf([0; 64]);
        // SAFETY: msghdr is plain old data.
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_iov = &raw mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = cmsg.0.as_mut_ptr().cast();
        hdr.msg_controllen = cmsg.0.len() as _;
        let len = loop {
            // SAFETY: `hdr` describes `buf` and `cmsg`, both alive and writable.
            let rc =
                unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Err(ProtoError::Timeout { what: "a message" }),
                _ => return Err(ProtoError::io("recvmsg", err)),
            }
        };
        // Take ownership of every descriptor first, so none leaks whatever happens next.
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `hdr.msg_control` with well-formed cmsg headers within
        // msg_controllen; CMSG_FIRSTHDR/NXTHDR stay inside it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                    for i in 0..bytes / size_of::<RawFd>() {
                        let raw = data.cast::<RawFd>().add(i).read_unaligned();
                        // The kernel installed `raw` in our table for us: we own it.
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                c = libc::CMSG_NXTHDR(&hdr, c);
            }
        }
        if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > MAX_FDS {
            return Err(ProtoError::Truncated);
        }
        Ok((len, fds))
    }

    /// Receives one message that carries no descriptor; a message that should carry
    /// some ([`Message::expected_fds`]) is refused (its descriptors closed): use
    /// [`Channel::recv_with_fds`] where those are expected.
    pub fn recv(&self) -> Result<Message, ProtoError> {
        let (msg, fds) = self.recv_with_fds()?;
        if !fds.is_empty() {
            return Err(ProtoError::BadFdCount {
                message: msg.name(),
                count: fds.len(),
                expected: 0,
            });
        }
        Ok(msg)
    }

    /// Receives one message and its descriptors, refusing a message whose descriptor
    /// count differs from [`Message::expected_fds`].
    pub fn recv_with_fds(&self) -> Result<(Message, Vec<OwnedFd>), ProtoError> {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let (len, fds) = self.recv_bytes(&mut buf)?;
        if len == 0 {
            return Err(ProtoError::Closed);
        }
        let msg = wire::decode(&buf[..len])?;
        if fds.len() != msg.expected_fds() {
            return Err(ProtoError::BadFdCount {
                message: msg.name(),
                count: fds.len(),
                expected: msg.expected_fds(),
            });
        }
        Ok((msg, fds))
    }

    /// Shuts both directions down (wakes a thread blocked in `recv`).
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on our own descriptor; no memory arguments.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A listening `SOCK_SEQPACKET` socket (the daemon side).
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Binds and listens at `path`. Fails with `EADDRINUSE` if the path exists: the
    /// caller decides whether a stale socket may be removed. The socket file's mode is
    /// whatever the umask leaves; [`Listener::bind_mode`] sets it explicitly.
    pub fn bind(path: &Path) -> Result<Listener, ProtoError> {
        Self::bind_inner(path, None)
    }

    /// Binds at `path`, sets the socket file's mode to `mode` (not the umask's), and only
    /// then listens: nobody can connect while the file still has the umask's mode.
    /// The mode is set through an `O_PATH | O_NOFOLLOW` descriptor of the file just
    /// bound, so a symbolic link swapped in meanwhile is refused, never followed.
    pub fn bind_mode(path: &Path, mode: u32) -> Result<Listener, ProtoError> {
        Self::bind_inner(path, Some(mode))
    }

    fn bind_inner(path: &Path, mode: Option<u32>) -> Result<Listener, ProtoError> {
        let (addr, len) = sockaddr_for(path)?;
        let fd = seqpacket_socket()?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
            return Err(ProtoError::last_os("bind"));
        }
        if let Some(mode) = mode {
            set_socket_file_mode(path, mode).map_err(|e| ProtoError::io("chmod(socket)", e))?;
        }
        // SAFETY: listen(2) on our own socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(ProtoError::last_os("listen"));
        }
        Ok(Listener { fd })
    }

    /// Bounds how long [`Listener::accept_channel`] waits (`SO_RCVTIMEO` applies to
    /// `accept` on unix sockets); expiry is [`ProtoError::Timeout`].
    pub fn set_accept_timeout(&self, timeout: Option<Duration>) -> Result<(), ProtoError> {
        set_timeout(self.fd.as_fd(), libc::SO_RCVTIMEO, timeout)
    }

    /// Accepts one connection.
    pub fn accept_channel(&self) -> Result<Channel, ProtoError> {
        loop {
            // SAFETY: null address arguments are allowed; flags are valid.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a fresh descriptor that we now own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(Channel { fd });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::EAGAIN) => {
                    return Err(ProtoError::Timeout {
                        what: "a connection",
                    });
                }
                _ => return Err(ProtoError::io("accept4", err)),
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The calling process's effective uid.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and takes no arguments.
    unsafe { libc::geteuid() }
}

/// The calling process's real uid and gid (what an executed set-ID program is compared
/// with: the loader runs in secure mode when they differ from the new effective ids).
pub(crate) fn real_ids() -> (u32, u32) {
    // SAFETY: getuid(2)/getgid(2) cannot fail and take no arguments.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Sets the mode of the socket file at `path` without following a symbolic link:
/// opens it `O_PATH | O_NOFOLLOW`, checks it is a socket, and changes the mode through
/// `/proc/self/fd` (the descriptor names exactly the inode that was opened).
pub fn set_socket_file_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", f.as_raw_fd()),
        std::fs::Permissions::from_mode(mode),
    )
}

/// A `MAP_SHARED` mapping of a memfd (the agent ring), unmapped on drop.
#[derive(Debug)]
pub(crate) struct SharedMap {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all accesses go through atomics
// (`SharedMap::word`), so it may be used from any thread.
unsafe impl Send for SharedMap {}
// SAFETY: as above: only atomic accesses.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `fd` read-write, shared.
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize) -> Result<SharedMap, ProtoError> {
        // SAFETY: a fresh mapping chosen by the kernel; it aliases nothing of ours.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(ProtoError::last_os("mmap(agent ring)"));
        }
        Ok(SharedMap {
            base: base.cast(),
            len,
        })
    }

    /// The 8-byte word at `offset` as an atomic.
    ///
    /// The other process writes the same memory, so every access is atomic (plain
    /// `core` atomics: loom cannot model memory shared between processes, which is why
    /// this is not `usm_sync`).
    #[allow(clippy::disallowed_types)] // memory shared with another process: std's type
    pub(crate) fn word(&self, offset: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "ring offset {offset} out of bounds"
        );
        // SAFETY: in bounds and 8-aligned (checked; the base is page-aligned); the mapping
        // lives as long as `self`; every access to it is atomic.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.base.add(offset).cast()) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping we made; no reference outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The seals a shared ring must carry: its size can never change, so a mapping of it
/// can never fault with `SIGBUS` past a truncated end.
pub(crate) const RING_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A memfd of `len` bytes (zero-filled), created `MFD_ALLOW_SEALING` and sealed
/// [`RING_SEALS`] plus `F_SEAL_SEAL` (no other seal can be added later, so the peer can
/// always map it writable).
pub(crate) fn memfd_sealed(name: &std::ffi::CStr, len: usize) -> Result<OwnedFd, ProtoError> {
    // SAFETY: `name` is NUL-terminated.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(ProtoError::last_os("memfd_create"));
    }
    // SAFETY: fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
        return Err(ProtoError::last_os("ftruncate(memfd)"));
    }
    // SAFETY: fcntl(F_ADD_SEALS) on our own memfd; integer argument.
    if unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            RING_SEALS | libc::F_SEAL_SEAL,
        )
    } < 0
    {
        return Err(ProtoError::last_os("fcntl(F_ADD_SEALS)"));
    }
    Ok(fd)
}

/// The seals of a memfd (`F_GET_SEALS`); an error for a file that cannot carry seals
/// (not a memfd / shmem file).
pub(crate) fn seals(fd: BorrowedFd<'_>) -> Result<i32, ProtoError> {
    // SAFETY: fcntl(F_GET_SEALS) takes no pointer argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if rc < 0 {
        return Err(ProtoError::last_os("fcntl(F_GET_SEALS)"));
    }
    Ok(rc)
}

/// Is `fd` an eventfd? (`/proc/self/fd/N` of an eventfd reads `anon_inode:[eventfd]`.)
pub(crate) fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// Sets `O_NONBLOCK` on `fd` (the open file description: shared with the peer).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), ProtoError> {
    // SAFETY: fcntl(F_GETFL) takes no pointer argument.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(ProtoError::last_os("fcntl(F_GETFL)"));
    }
    // SAFETY: fcntl(F_SETFL) with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(ProtoError::last_os("fcntl(F_SETFL)"));
    }
    Ok(())
}

/// Size of a memfd (to check what a peer handed over).
pub(crate) fn fd_size(fd: BorrowedFd<'_>) -> Result<u64, ProtoError> {
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: `st` is writable.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(ProtoError::last_os("fstat"));
    }
    Ok(st.st_size as u64)
}

/// A new eventfd (counter mode, close-on-exec).
pub(crate) fn eventfd() -> Result<OwnedFd, ProtoError> {
    // SAFETY: eventfd(2) has no memory arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(ProtoError::last_os("eventfd"));
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd. On a non-blocking eventfd whose counter is full (`EAGAIN`)
/// the reader has not consumed earlier signals yet: it is signalled already, so that
/// is success, never a wait.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) -> Result<(), ProtoError> {
    let one = 1u64;
    loop {
        // SAFETY: writes 8 readable bytes.
        let rc = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
        if rc == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(()),
            _ => return Err(ProtoError::io("write(eventfd)", err)),
        }
    }
}

/// Waits up to `timeout_ms` (-1 = forever) for an eventfd to be signalled and resets it.
/// Returns false on timeout.
pub(crate) fn eventfd_wait(fd: BorrowedFd<'_>, timeout_ms: i32) -> Result<bool, ProtoError> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(ProtoError::io("poll(eventfd)", err));
        }
        if rc == 0 {
            return Ok(false);
        }
        break;
    }
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into `value`.
    let rc = unsafe { libc::read(fd.as_raw_fd(), (&raw mut value).cast(), 8) };
    if rc != 8 {
        let err = io::Error::last_os_error();
        // Non-blocking and the peer (sharing the eventfd) took the count first.
        if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
            return Ok(false);
        }
        return Err(ProtoError::io("read(eventfd)", err));
    }
    Ok(true)
}

/// Descriptors a hostile peer could hand over, for the tests of what the daemon refuses.
#[cfg(test)]
pub(crate) mod hostile {
    use super::*;

    /// A memfd of `len` bytes that carries no seal (and can take none).
    pub(crate) fn unsealed_memfd(len: usize) -> OwnedFd {
        // SAFETY: the name is NUL-terminated.
        let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(rc, 0);
        fd
    }

    /// A pipe: (read end, write end).
    pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Writes the largest value an eventfd counter holds (the next signal would block).
    pub(crate) fn fill_eventfd(fd: BorrowedFd<'_>) {
        let v: u64 = u64::MAX - 1;
        // SAFETY: writes 8 readable bytes.
        let rc = unsafe { libc::write(fd.as_raw_fd(), (&raw const v).cast(), 8) };
        assert_eq!(rc, 8);
    }

    /// Is `O_NONBLOCK` set on `fd`?
    pub(crate) fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: fcntl(F_GETFL) takes no pointer argument.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        flags >= 0 && flags & libc::O_NONBLOCK != 0
    }

    /// Tries to shrink a memfd; returns the errno (0 = it shrank).
    pub(crate) fn try_truncate(fd: BorrowedFd<'_>, len: usize) -> i32 {
        // SAFETY: ftruncate takes integers only.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }
}
