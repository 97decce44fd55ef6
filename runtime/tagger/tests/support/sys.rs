//! The test daemon's userfaultfd calls (raw ioctls: the test plays the daemon without
//! linking it). All `unsafe` of the tests lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFD_API: u64 = 0xAA;

/// Features the daemon negotiates in daemon mode.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;

pub const PAGE: u64 = 4096;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// One `struct uffd_msg` (32 bytes): event byte, then the union as four u64 words
/// starting at offset 8.
#[derive(Clone, Copy, Debug)]
pub struct UffdMsg {
    pub event: u8,
    pub arg: [u64; 3],
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `UFFDIO_API` on a handed-over, un-negotiated userfaultfd.
pub fn uffdio_api(fd: BorrowedFd<'_>, features: u64) -> Result<u64, i32> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid uffdio_api the kernel reads and writes.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(api.features)
    }
}

/// Waits up to `timeout_ms` for the userfaultfd to be readable.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}

/// Reads the pending messages (non-blocking fd). Empty when none is ready.
pub fn read_msgs(fd: BorrowedFd<'_>) -> Vec<UffdMsg> {
    let mut buf = [0u64; 4 * 16];
    // SAFETY: `buf` is writable for its whole size.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            std::mem::size_of_val(&buf),
        )
    };
    if n <= 0 {
        return Vec::new();
    }
    buf[..n as usize / 8]
        .chunks_exact(4)
        .map(|w| UffdMsg {
            event: (w[0] & 0xff) as u8,
            arg: [w[1], w[2], w[3]],
        })
        .collect()
}

/// Takes ownership of the fd delivered by a FORK event.
pub fn own_fork_fd(raw: u64) -> OwnedFd {
    // SAFETY: the kernel installed this descriptor in our table for the FORK event we
    // just read; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(raw as i32) }
}

/// A zeroed, page-aligned source page for UFFDIO_COPY.
#[repr(C, align(4096))]
pub struct SourcePage(pub [u8; 4096]);

/// Resolves a missing fault at `page` by copying `src` in.
pub fn copy_page(fd: BorrowedFd<'_>, page: u64, src: &SourcePage) -> Result<(), i32> {
    let mut copy = UffdioCopy {
        dst: page,
        src: src.0.as_ptr() as u64,
        len: PAGE,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `src` is a readable page; `dst` is in the faulting process's registered
    // range (the kernel checks), so this only fills a hole of that process.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY, &raw mut copy) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// Resolves a missing read fault at `page` with the zero page.
pub fn zero_page(fd: BorrowedFd<'_>, page: u64) -> Result<(), i32> {
    let mut z = UffdioZeropage {
        start: page,
        len: PAGE,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: a valid uffdio_zeropage; the kernel checks the range.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_ZEROPAGE, &raw mut z) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// Wakes threads waiting on `page` (after EEXIST: someone else mapped it).
pub fn wake(fd: BorrowedFd<'_>, page: u64) {
    let range = UffdioRange {
        start: page,
        len: PAGE,
    };
    // SAFETY: a valid uffdio_range.
    unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE, &raw const range) };
}

/// Reads `len` bytes at `addr` in process `pid` (only present memory: the staging
/// slots the agent filled; never a hole).
pub fn read_remote(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers `buf`; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Can this process open a handler-mode userfaultfd (not `UFFD_USER_MODE_ONLY`)?
/// Either through `/dev/userfaultfd` (needs access to the device) or the system call
/// (needs `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd=1`). Returns the reason if not.
pub fn userfaultfd_unavailable() -> Option<String> {
    const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
    // SAFETY: the path is NUL-terminated.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev >= 0 {
        // SAFETY: USERFAULTFD_IOC_NEW takes flags by value.
        let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW, libc::O_CLOEXEC) };
        // SAFETY: closing descriptors we own.
        unsafe {
            if fd >= 0 {
                libc::close(fd);
            }
            libc::close(dev);
        }
        if fd >= 0 {
            return None;
        }
    }
    // SAFETY: userfaultfd(2) takes flags by value.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: closing a descriptor we own.
        unsafe { libc::close(fd as i32) };
        return None;
    }
    Some(format!(
        "no handler-mode userfaultfd for this user ({}): run as root or set vm.unprivileged_userfaultfd=1",
        io::Error::last_os_error()
    ))
}
