//! Every `unsafe` of the bench crate: anonymous mappings and the `pre_exec` hook that ties
//! a child's life to the bench's. (Swap, cgroups and the termination-signal handler are in
//! `usm_runtime::baseline`.)
//!
//! The rest of the crate is safe code over the types and functions exported here.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags};

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
