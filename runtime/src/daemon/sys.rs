//! The daemon's system calls that need `unsafe`: resolving faults in another process
//! (`UFFDIO_COPY` / `UFFDIO_POISON` through `usm_kmod`), `pidfd_open`, and the signal
//! mask of the process. Everything else in the daemon is safe code.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use usm_kmod::{CopyMode, PoisonMode, Resolved, Userfaultfd, ZeropageMode};

/// One 4 KiB page.
pub(crate) const PAGE: u64 = 4096;

/// Installs `src` (whole pages) at `dst` in the address space behind `uffd` with
/// `UFFDIO_COPY`, waking the threads that wait on it.
///
/// The destination is a page of *another* process (the tagged program): `UFFDIO_COPY`
/// only fills ptes that are missing in a range registered on `uffd`, so it can never
/// overwrite data the program already has (it reports `AlreadyMapped` instead).
pub(crate) fn copy_into(uffd: &Userfaultfd, dst: u64, src: &[u8]) -> usm_kmod::Result<Resolved> {
    debug_assert!(dst % PAGE == 0 && src.len() as u64 % PAGE == 0);
    // SAFETY: `src` is a live, readable buffer of `src.len()` bytes for the whole call;
    // the destination belongs to the mm behind `uffd`, where the kernel only fills
    // missing ptes of registered ranges (never memory of this process, never present
    // pages), so no Rust object of ours is written.
    unsafe {
        uffd.copy(
            dst,
            src.as_ptr() as u64,
            src.len() as u64,
            CopyMode::empty(),
        )
    }
}

/// Marks `dst` (one page) poisoned: the program gets SIGBUS there instead of zeros, for a
/// page whose swap copy could not be read back.
pub(crate) fn poison(uffd: &Userfaultfd, dst: u64) -> usm_kmod::Result<Resolved> {
    // SAFETY: POISON only installs poison markers in missing ptes of registered ranges
    // of the mm behind `uffd`; it touches no memory of this process.
    unsafe { uffd.poison(dst, PAGE, PoisonMode::empty()) }
}

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
