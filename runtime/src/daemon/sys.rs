//! The daemon's system calls that need `unsafe`: probing a program's address space and
//! `pidfd_open`. (Installing into programs is the runtime's `sys::remote`.) Everything
//! else in the daemon is safe code.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use usm_kmod::{Userfaultfd, ZeropageMode};

const PAGE: u64 = 4096;

/// Is the address space behind `uffd` still alive? Probes with a `UFFDIO_ZEROPAGE` at
/// an address below any mapping a program can have (`mmap_min_addr`, 64 KiB): a live mm
/// answers `ENOENT`/`EINVAL` (no registered range there), a dead one `ESRCH`.
pub(crate) fn mm_alive(uffd: &Userfaultfd) -> bool {
    // SAFETY: the probe address is never a registered range (it lies below
    // mmap_min_addr), so the ioctl cannot install anything; it only reports.
    match unsafe { uffd.zeropage(0x10000, PAGE, ZeropageMode::DONTWAKE) } {
        Err(e) => !e.is_mm_gone(),
        Ok(_) => true,
    }
}

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when `pid` exits.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
