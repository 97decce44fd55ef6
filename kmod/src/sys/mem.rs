//! [`Mapping`]: an owned anonymous mapping.
//!
//! A `Mapping` never hands out Rust references to its bytes: its content can change under
//! us (userfaultfd moves pages in and out, `MADV_DONTNEED` drops them), so it is reached
//! through atomic loads/stores (safe) or raw byte writes whose exclusivity the caller
//! promises (`unsafe`). Dropping it unmaps it: if the range is registered on a
//! userfaultfd with `EVENT_UNMAP`, unregister it first, or the drop waits until the UNMAP
//! event is read (a deadlock when the reader is the dropping thread).

use crate::error::{Error, Result};
use crate::frame::PAGE_SIZE;
use nix::errno::Errno;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
// Words of a mapping (possibly shared with another process) are accessed through std's
// `AtomicU64::from_ptr`, which loom has no counterpart of.
#[allow(clippy::disallowed_types)]
use std::sync::atomic::AtomicU64;
use usm_sync::atomic::Ordering;

/// Page protection of a [`Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `PROT_NONE`.
    None,
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl Protection {
    fn bits(self) -> i32 {
        match self {
            Protection::None => libc::PROT_NONE,
            Protection::Read => libc::PROT_READ,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// `madvise` advice a [`Mapping`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTFORK`: the child of a fork does not get this range.
    DontFork,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_POPULATE_WRITE`: fault every page in writable (Linux 5.14).
    PopulateWrite,
    /// `MADV_POPULATE_READ`.
    PopulateRead,
    /// `MADV_DONTNEED`: drop the pages (anonymous memory reads back as zero, or faults
    /// again on a userfaultfd-registered range, which also sends a REMOVE event).
    DontNeed,
}

impl Advice {
    fn bits(self) -> i32 {
        match self {
            Advice::DontFork => libc::MADV_DONTFORK,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::PopulateWrite => super::MADV_POPULATE_WRITE,
            Advice::PopulateRead => super::MADV_POPULATE_READ,
            Advice::DontNeed => libc::MADV_DONTNEED,
        }
    }
}

/// A pidfd of the calling process (`pidfd_open(getpid())`), for `process_madvise` on
/// our own mappings ([`Mapping::drop_pages`]).
#[derive(Debug)]
pub struct SelfPidfd(std::os::fd::OwnedFd, u32);

impl SelfPidfd {
    /// Opens it (Linux 5.3).
    pub fn open() -> Result<SelfPidfd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory
        // is passed.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0u32) };
        if ret < 0 {
            return Err(Error::Sys {
                what: "pidfd_open(self)",
                source: Errno::last(),
            });
        }
        // SAFETY: `ret` is a fresh fd owned by nobody else.
        let fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(ret as i32) };
        Ok(SelfPidfd(fd, std::process::id()))
    }
}

/// An owned private anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range; its bytes are only reached through atomics or
// `unsafe` methods whose callers promise exclusivity, so sharing it between threads
// introduces no data race by itself.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (rounded up to pages) of private anonymous memory with `prot`,
    /// `MAP_NORESERVE`. Nothing is populated.
    pub fn anonymous(len: usize, prot: Protection) -> Result<Mapping> {
        Self::anonymous_aligned(len, PAGE_SIZE, prot)
    }

    /// Like [`Mapping::anonymous`] with the start aligned to `align` (a power of two, at
    /// least a page): over-maps and trims, so 2 MiB ranges can be THP-aligned.
    pub fn anonymous_aligned(len: usize, align: usize, prot: Protection) -> Result<Mapping> {
        if len == 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(Error::InvalidArgument("mapping length 0 or bad alignment"));
        }
        let len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let total = len + align - PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks overlaps nothing.
        let raw = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                total,
                prot.bits(),
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::Sys {
                what: "mmap(anonymous)",
                source: Errno::last(),
            });
        }
        let base = raw as usize;
        let start = (base + align - 1) & !(align - 1);
        let head = start - base;
        let tail = total - head - len;
        // SAFETY: the head and tail trimmed here are parts of the mapping just created,
        // not referenced by anyone.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        let ptr = NonNull::new(start as *mut u8)
            .ok_or(Error::InvalidArgument("mmap returned a null address"))?;
        Ok(Mapping { ptr, len })
    }

    /// The start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    /// The start as a raw pointer (for ioctls and `memcpy` sources).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (a mapping has at least one page); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset % PAGE_SIZE != 0 || offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::InvalidArgument(
                "range outside the mapping or misaligned",
            ));
        }
        Ok(())
    }

    /// `madvise(addr + offset, len, advice)`.
    pub fn advise(&self, offset: usize, len: usize, advice: Advice) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: the range lies inside this mapping; no Rust reference points into it, so
        // dropping or populating pages cannot invalidate one.
        let ret =
            unsafe { libc::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice.bits()) };
        Errno::result(ret).map(drop).map_err(|source| Error::Sys {
            what: "madvise",
            source,
        })
    }

    /// `MADV_DONTNEED` on the pages at `offsets` (page offsets into the mapping, sorted
    /// or not; consecutive ones are merged into one range). With `pidfd` it is one
    /// `process_madvise` per 1024 ranges: since Linux 6.16 the kernel gathers the whole
    /// vector under one TLB flush, where one `madvise` per range would flush (and, with
    /// the mm active on another CPU, send an IPI) per range. Without a pidfd, or when the
    /// kernel refuses `process_madvise` for this advice, one `madvise` per range.
    ///
    /// On a userfaultfd-registered range the pages read as missing afterwards; the
    /// userfaultfd must not have `EVENT_REMOVE` (the call would wait for the event to be
    /// read). Like [`Mapping::advise`], this cannot invalidate a Rust reference (none
    /// points into a `Mapping`); the caller decides the pages' content is not needed.
    pub fn drop_pages(&self, offsets: &[usize], pidfd: Option<&SelfPidfd>) -> Result<()> {
        let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(offsets.len());
        let mut sorted = offsets.to_vec();
        sorted.sort_unstable();
        for &o in &sorted {
            self.check(o, PAGE_SIZE)?;
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == o => *len += PAGE_SIZE,
                Some((start, len)) if *start + *len > o => {} // duplicate
                _ => ranges.push((o, PAGE_SIZE)),
            }
        }
        // A forked child must not advise its parent's pages through the parent's pidfd.
        if let Some(fd) = pidfd.filter(|p| p.1 == std::process::id()) {
            let iov: Vec<libc::iovec> = ranges
                .iter()
                .map(|&(o, len)| libc::iovec {
                    // SAFETY: `o` was checked to lie inside this mapping.
                    iov_base: unsafe { self.ptr.as_ptr().add(o) }.cast(),
                    iov_len: len,
                })
                .collect();
            let mut done = true;
            for chunk in iov.chunks(1024) {
                let want: usize = chunk.iter().map(|v| v.iov_len).sum();
                // SAFETY: process_madvise reads `chunk.len()` iovecs from a live slice;
                // the ranges lie inside this mapping and no Rust reference points into
                // it (dropping pages cannot invalidate one).
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        fd.0.as_raw_fd(),
                        chunk.as_ptr(),
                        chunk.len(),
                        libc::MADV_DONTNEED,
                        0u32,
                    )
                };
                if ret < 0 {
                    let e = Errno::last();
                    if matches!(e, Errno::EINVAL | Errno::ENOSYS | Errno::EPERM) {
                        // Not allowed here (older kernel): madvise below, for all ranges
                        // (dropping twice is harmless).
                        done = false;
                        break;
                    }
                    return Err(Error::Sys {
                        what: "process_madvise(MADV_DONTNEED)",
                        source: e,
                    });
                }
                if ret as usize != want {
                    done = false;
                    break;
                }
            }
            if done {
                return Ok(());
            }
        }
        for (o, len) in ranges {
            self.advise(o, len, Advice::DontNeed)?;
        }
        Ok(())
    }

    /// `mlock2(MLOCK_ONFAULT)` on the whole mapping: pages are locked as they are faulted
    /// in. `UFFDIO_MOVE` needs source and destination in the same lock state.
    pub fn mlock_onfault(&self) -> Result<()> {
        // SAFETY: locking pages of our own mapping has no memory-safety effect.
        let ret = unsafe { libc::mlock2(self.ptr.as_ptr().cast(), self.len, libc::MLOCK_ONFAULT) };
        Errno::result(ret).map(drop).map_err(|source| Error::Sys {
            what: "mlock2(MLOCK_ONFAULT)",
            source,
        })
    }

    /// `munlock` on the whole mapping.
    pub fn munlock(&self) -> Result<()> {
        // SAFETY: unlocking pages of our own mapping has no memory-safety effect.
        let ret = unsafe { libc::munlock(self.ptr.as_ptr().cast(), self.len) };
        Errno::result(ret).map(drop).map_err(|source| Error::Sys {
            what: "munlock",
            source,
        })
    }

    #[allow(clippy::disallowed_types)] // std's AtomicU64 over mapped memory (see the import)
    fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64> {
        if offset % 8 != 0 || offset + 8 > self.len {
            return Err(Error::InvalidArgument(
                "offset outside the mapping or unaligned",
            ));
        }
        // SAFETY: the address is inside the live mapping and 8-byte aligned; every safe
        // access to mapping bytes is atomic, so no non-atomic access races with it; the
        // reference lives no longer than `&self`, i.e. than the mapping.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) })
    }

    /// Atomically loads the `u64` at `offset` (faults the page in like any access; on a
    /// userfaultfd-registered range that waits for, or signals, the handler).
    pub fn load_u64(&self, offset: usize) -> Result<u64> {
        Ok(self.atomic_u64(offset)?.load(Ordering::Relaxed))
    }

    /// Atomically stores `value` at `offset` (same faulting behaviour as
    /// [`Mapping::load_u64`]).
    pub fn store_u64(&self, offset: usize, value: u64) -> Result<()> {
        self.atomic_u64(offset)?.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `value` into the first word of every page of `[offset, offset+len)`: the
    /// first-touch pattern.
    pub fn touch_pages(&self, offset: usize, len: usize, value: u64) -> Result<()> {
        self.check(offset, len)?;
        for page in (offset..offset + len).step_by(PAGE_SIZE) {
            self.store_u64(page, value)?;
        }
        Ok(())
    }

    /// Whether every byte of `[offset, offset+len)` is zero (read with atomic loads).
    pub fn is_zero(&self, offset: usize, len: usize) -> Result<bool> {
        self.check(offset, len)?;
        for word in (offset..offset + len).step_by(8) {
            if self.load_u64(word)? != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Fills `[offset, offset+len)` with `byte` using plain (non-atomic) writes.
    ///
    /// # Safety
    /// - No other thread reads or writes these bytes during the call (through this
    ///   mapping's atomics or otherwise).
    pub unsafe fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked) and the caller promises
        // exclusive access for the duration of the call.
        unsafe { core::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is owned by `self` and no reference into it outlives it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
