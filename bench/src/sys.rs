//! Every `unsafe` of the bench crate: anonymous mappings, the termination-signal handler,
//! `swapon`/`swapoff`, and the `pre_exec` hook that puts a child in its cgroup.
//!
//! The rest of the crate is safe code over the types and functions exported here.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::ptr::NonNull;
use usm_sync::Arc;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags};
use usm_sync::atomic::{AtomicI32, Ordering};

use crate::error::{Error, Result};

/// A private anonymous read-write mapping, unmapped on drop.
///
/// This is the "plain anonymous memory" of the kernel sides: its pages are first-touch
/// faulted, reclaimed and swapped by the kernel like any heap memory.
#[derive(Debug)]
pub struct AnonMemory {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving the owner to another
// thread moves the only handle (slices borrowed from it follow the borrow rules).
unsafe impl Send for AnonMemory {}
// SAFETY: shared references only give out `&[u8]` views and volatile reads.
unsafe impl Sync for AnonMemory {}

/// Hints for [`AnonMemory::advise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_HUGEPAGE`: allow THP / mTHP folios in this range (sizes enabled in sysfs).
    HugePage,
    /// `MADV_NOHUGEPAGE`: 4 KiB pages only.
    NoHugePage,
    /// `MADV_DONTNEED`: drop the pages (next touch faults a zero page in again).
    DontNeed,
}

impl AnonMemory {
    /// Maps `len` bytes (rounded up to 4 KiB) of private anonymous memory, untouched.
    pub fn new(len: usize) -> Result<Self> {
        let len = len.div_ceil(4096).max(1) * 4096;
        let nz = std::num::NonZeroUsize::new(len).ok_or_else(|| Error::Invalid("len 0".into()))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::sys("mmap", e))?;
        Ok(Self {
            base: ptr.cast(),
            len,
        })
    }

    /// Length in bytes (a multiple of 4 KiB).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (mappings are at least one page).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Applies `advice` to the whole mapping.
    pub fn advise(&self, advice: Advice) -> Result<()> {
        let adv = match advice {
            Advice::HugePage => MmapAdvise::MADV_HUGEPAGE,
            Advice::NoHugePage => MmapAdvise::MADV_NOHUGEPAGE,
            Advice::DontNeed => MmapAdvise::MADV_DONTNEED,
        };
        // SAFETY: the range is exactly our own mapping; DONTNEED on private anonymous memory
        // only replaces contents by zeros, which every `u8` view tolerates.
        unsafe { nix::sys::mman::madvise(self.base.cast(), self.len, adv) }
            .map_err(|e| Error::sys("madvise", e))
    }

    /// The mapping as a byte slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `base..base+len` is mapped read-write for the life of `self`, any byte is a
        // valid `u8`, and `&self` excludes a concurrent `&mut` view.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    /// The mapping as a mutable byte slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }

    /// Writes `value` at `offset` with a volatile store: the store (and so the page fault
    /// it may take) is never elided or merged by the compiler.
    ///
    /// # Panics
    /// When `offset >= len`.
    pub fn touch(&mut self, offset: usize, value: u8) {
        assert!(offset < self.len, "touch past the mapping");
        // SAFETY: `offset < len`, the byte is inside our writable mapping, and `&mut self`
        // makes this the only access.
        unsafe { self.base.as_ptr().add(offset).write_volatile(value) }
    }

    /// Reads the byte at `offset` with a volatile load.
    ///
    /// # Panics
    /// When `offset >= len`.
    pub fn peek(&self, offset: usize) -> u8 {
        assert!(offset < self.len, "peek past the mapping");
        // SAFETY: `offset < len`, inside our readable mapping.
        unsafe { self.base.as_ptr().add(offset).read_volatile() }
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping we created; no view outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) };
    }
}

/// Write end of the self-pipe the termination handler writes the signal number to
/// (-1 before installation).
static TERMINATION_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_termination_signal(signo: libc::c_int) {
    let fd = TERMINATION_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signo as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives on this stack frame for the
        // call; the fd stays open for the life of the process (leaked on purpose).
        let _ = unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Installs a handler for `signals` that only writes the signal number (one byte) to
/// `pipe_write`, which is leaked and stays open until exit. The reader runs the cleanups in
/// normal context.
pub(crate) fn install_termination_pipe(pipe_write: OwnedFd, signals: &[libc::c_int]) -> Result<()> {
    TERMINATION_PIPE.store(
        std::os::fd::IntoRawFd::into_raw_fd(pipe_write),
        Ordering::SeqCst,
    );
    for &signo in signals {
        // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_termination_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: the handler only calls write(2) on an fd that is never closed; `action`
        // is fully initialised; a null old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(signo, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::sys("sigaction", nix::Error::last()));
        }
    }
    Ok(())
}

/// Restores the default action of `signo` and raises it in the calling process, so the
/// process ends the way the signal asked (exit status "killed by SIGINT/SIGTERM").
pub(crate) fn reraise_default(signo: libc::c_int) {
    // SAFETY: SIG_DFL is always a valid disposition; raise(3) is safe to call from any thread.
    unsafe {
        libc::signal(signo, libc::SIG_DFL);
        libc::raise(signo);
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path with NUL: {}", path.display())))
}

/// `swapon(2)` with an explicit priority (`SWAP_FLAG_PREFER`).
pub(crate) fn swapon(path: &Path, priority: i16) -> Result<()> {
    let c = c_path(path)?;
    // <linux/swap.h>: SWAP_FLAG_PREFER 0x8000, SWAP_FLAG_PRIO_MASK 0x7fff, shift 0.
    const SWAP_FLAG_PREFER: libc::c_int = 0x8000;
    const SWAP_FLAG_PRIO_MASK: libc::c_int = 0x7fff;
    let prio = (priority.max(0) as libc::c_int) & SWAP_FLAG_PRIO_MASK;
    let flags = SWAP_FLAG_PREFER | prio;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::swapon(c.as_ptr(), flags) };
    if rc != 0 {
        return Err(Error::io("swapon", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `swapoff(2)`.
pub(crate) fn swapoff(path: &Path) -> Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::swapoff(c.as_ptr()) };
    if rc != 0 {
        return Err(Error::io("swapoff", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the child of `cmd` join a cgroup before it execs: between fork and exec it writes
/// `"0"` ("the writing process") to the already-open `cgroup.procs` of the target group.
/// So every byte the program allocates, from the dynamic loader on, is charged there.
pub(crate) fn join_cgroup_before_exec(cmd: &mut Command, procs: Arc<OwnedFd>) {
    let hook = move || -> std::io::Result<()> {
        let fd = procs.as_raw_fd();
        // SAFETY: write(2) is async-signal-safe and allocates nothing; the buffer is a
        // static byte string; `procs` keeps the fd open while the hook can run.
        let rc = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if rc == 1 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the hook only performs write(2) on an inherited fd — async-signal-safe and
    // without allocation or locks, as required between fork and exec.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Makes the child of `cmd` receive SIGKILL when the spawning thread dies, so a server
/// started by a benchmark never outlives it (even after SIGKILL of the benchmark).
pub(crate) fn kill_child_with_parent(cmd: &mut Command) {
    let hook = || -> std::io::Result<()> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) is a plain syscall, async-signal-safe, no memory
        // is passed.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the hook only performs one prctl(2) — async-signal-safe, no allocation.
    unsafe {
        cmd.pre_exec(hook);
    }
}
