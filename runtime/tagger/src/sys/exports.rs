//! The C symbols the tagger exports: the malloc family, `mmap`/`mmap64`/`mremap`/
//! `munmap`, `ioctl`, and `usm_tagger_*` for `libusm.so` and tests.
//!
//! Being first in the symbol search order (`LD_PRELOAD`), these replace glibc's for the
//! whole program, including calls from glibc itself and from other libraries (Debian's
//! redis-server links jemalloc, which calls the exported `mmap`).

#![allow(
    unreachable_pub,
    reason = "C symbols: exported by #[no_mangle], not by Rust paths"
)]

use std::ffi::{CStr, c_char, c_int, c_void};

use super::{PAGE_SIZE, heap, set_errno};
use crate::{extents, ranges, session, state};

fn fail_nomem() -> *mut c_void {
    set_errno(libc::ENOMEM);
    std::ptr::null_mut()
}

fn out(ptr: *mut u8) -> *mut c_void {
    if ptr.is_null() {
        fail_nomem()
    } else {
        ptr.cast()
    }
}

/// `malloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    out(heap::malloc(size))
}

/// `free(3)`.
///
/// # Safety
/// - `ptr` is null or was returned by this library's allocation functions and not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: forwarded caller contract.
    unsafe { heap::free(ptr.cast()) }
}

/// `calloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn calloc(nmemb: usize, size: usize) -> *mut c_void {
    match nmemb.checked_mul(size) {
        Some(total) => out(heap::calloc(total)),
        None => fail_nomem(),
    }
}

/// `realloc(3)`: `realloc(NULL, n)` is `malloc(n)`; `realloc(p, 0)` frees `p` and
/// returns NULL (glibc's behaviour).
///
/// # Safety
/// - `ptr` is null or a live allocation of this library.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    if ptr.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // SAFETY: forwarded caller contract.
        unsafe { heap::free(ptr.cast()) };
        return std::ptr::null_mut();
    }
    // SAFETY: forwarded caller contract.
    out(unsafe { heap::realloc(ptr.cast(), size) })
}

/// `reallocarray(3)`.
///
/// # Safety
/// - As for [`realloc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(ptr: *mut c_void, nmemb: usize, size: usize) -> *mut c_void {
    match nmemb.checked_mul(size) {
        // SAFETY: forwarded caller contract.
        Some(total) => unsafe { realloc(ptr, total) },
        None => fail_nomem(),
    }
}

/// `memalign(3)`: a non-power-of-two alignment is rounded up (glibc does the same).
#[unsafe(no_mangle)]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    let Some(align) = align.max(1).checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    out(heap::memalign(align, size))
}

/// `posix_memalign(3)`.
///
/// # Safety
/// - `memptr` is valid for one pointer-sized write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(
    memptr: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    if !align.is_power_of_two() || align % std::mem::size_of::<usize>() != 0 {
        return libc::EINVAL;
    }
    let ptr = heap::memalign(align, size);
    if ptr.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: guaranteed by the caller.
    unsafe { memptr.write(ptr.cast()) };
    0
}

/// `aligned_alloc(3)` (C11): the alignment must be a power of two.
#[unsafe(no_mangle)]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    out(heap::memalign(align, size))
}

/// `valloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    out(heap::memalign(PAGE_SIZE, size))
}

/// `pvalloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    match size.max(1).checked_next_multiple_of(PAGE_SIZE) {
        Some(rounded) => out(heap::memalign(PAGE_SIZE, rounded)),
        None => fail_nomem(),
    }
}

/// `malloc_usable_size(3)`.
///
/// # Safety
/// - `ptr` is null or a live allocation of this library.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() {
        return 0;
    }
    // SAFETY: forwarded caller contract.
    unsafe { heap::usable_size(ptr.cast()) }
}

fn mmap_common(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: i64,
) -> *mut c_void {
    // `MAP_POPULATE` on memory the daemon manages would have the kernel fill every page
    // before the range is registered: pages outside the budget that the daemon never
    // counted, and no fault for the daemon's stale-request fence to order against an
    // eviction still naming a page freed at this address. It is only a hint, so it goes:
    // the pages fault in through the daemon on first touch, like the rest.
    let flags = if ranges::mmap_is_managed(flags) && state::mode() == state::Mode::Managed {
        flags & !libc::MAP_POPULATE
    } else {
        flags
    };
    match super::mmap_raw(addr as usize, len, prot, flags, fd, off) {
        Ok(mapped) => {
            ranges::after_mmap(mapped, len, flags);
            mapped as *mut c_void
        }
        Err(errno) => {
            set_errno(errno);
            libc::MAP_FAILED
        }
    }
}

/// `mmap(2)`: private anonymous mappings become managed (see `ranges`).
///
/// # Safety
/// - As for `mmap(2)` (`MAP_FIXED` replaces whatever was there).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    mmap_common(addr, len, prot, flags, fd, off)
}

/// `mmap64(2)` (same as `mmap` on 64-bit).
///
/// # Safety
/// - As for `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off64_t,
) -> *mut c_void {
    mmap_common(addr, len, prot, flags, fd, off)
}

/// `munmap(2)`.
///
/// # Safety
/// - As for `munmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    match super::munmap_raw(addr as usize, len) {
        Ok(()) => {
            ranges::after_munmap(addr as usize, len);
            0
        }
        Err(errno) => {
            set_errno(errno);
            -1
        }
    }
}

/// `mremap(2)` (the fifth argument is read only with `MREMAP_FIXED`, as the kernel does).
/// Registration follows the mapping in the kernel; nothing to redo here.
///
/// # Safety
/// - As for `mremap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let new_addr = if flags & libc::MREMAP_FIXED != 0 {
        new_addr as usize
    } else {
        0
    };
    match super::mremap_raw(old as usize, old_len, new_len, flags, new_addr) {
        Ok(addr) => {
            let page = |n: usize| n.next_multiple_of(PAGE_SIZE);
            extents::moved(old as usize, page(old_len), addr, page(new_len));
            addr as *mut c_void
        }
        Err(errno) => {
            set_errno(errno);
            libc::MAP_FAILED
        }
    }
}

/// `ioctl(2)`: passed through, except that before the program registers a range on
/// its *own* userfaultfd the tagger unregisters that range from the daemon's.
///
/// # Safety
/// - As for `ioctl(2)`: `arg` is what `request` expects.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: libc::c_ulong, arg: usize) -> c_int {
    if request == super::UFFDIO_REGISTER {
        // SAFETY: for UFFDIO_REGISTER, `arg` points to a struct uffdio_register.
        if let Some(range) = unsafe { super::read_register_range(arg) } {
            ranges::before_foreign_register(fd, range.start, range.len);
        }
    }
    // SAFETY: forwarded caller contract.
    let rc = unsafe { super::ioctl_raw(fd, request, arg) };
    if rc < 0 {
        set_errno(super::errno());
        -1
    } else {
        rc as c_int
    }
}

/// Sends a hint to the daemon (the backend of `libusm.so`'s `usm_hint`).
/// Returns 0, `-EINVAL` (null/empty/too long/not UTF-8 text, empty or wrapping range)
/// or `-ENOTCONN` (the process is not managed), or another negative errno.
///
/// # Safety
/// - `hint` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usm_tagger_hint(
    addr: *const c_void,
    len: usize,
    hint: *const c_char,
) -> c_int {
    if hint.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: guaranteed by the caller.
    let Ok(text) = unsafe { CStr::from_ptr(hint) }.to_str() else {
        return -libc::EINVAL;
    };
    session::hint(addr as usize, len, text)
}

/// The pages of the mapping or allocation holding `addr` (the backend of `libusm.so`'s
/// two-argument `usm_hint`; see `extents`). Writes them to `*start` and `*len` and
/// returns 0, or returns `-EINVAL` (a null output pointer), `-ENOMEM` (no mapping holds
/// `addr`) or another negative errno from reading `/proc/self/maps`. Allocates nothing.
///
/// # Safety
/// - `start` and `len` are null or valid for one write of `usize`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usm_tagger_extent(
    addr: *const c_void,
    start: *mut usize,
    len: *mut usize,
) -> c_int {
    if start.is_null() || len.is_null() {
        return -libc::EINVAL;
    }
    match extents::containing(addr as usize) {
        Ok((s, l)) => {
            // SAFETY: both are valid for a write (the caller's contract, checked non-null).
            unsafe {
                start.write(s);
                len.write(l);
            }
            0
        }
        Err(errno) => -errno,
    }
}

/// Coverage report filled by [`usm_tagger_coverage`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UsmTaggerCoverage {
    /// Anonymous resident bytes in registered (MISSING) VMAs, from /proc/self/smaps.
    pub managed_anon_bytes: u64,
    /// All anonymous resident bytes, from /proc/self/smaps.
    pub anon_bytes: u64,
    /// Bytes registered by the tagger so far (cumulative).
    pub registered_bytes: u64,
    /// Registrations the kernel refused.
    pub register_failures: u64,
    /// Advisory notifications dropped on a full socket.
    pub dropped_notices: u64,
    /// 0 starting, 1 managed, 2 unmanaged.
    pub mode: u64,
}

/// Measures managed bytes vs anonymous RSS now. Returns 0 or a negative errno.
///
/// # Safety
/// - `out` is valid for one write of `UsmTaggerCoverage`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usm_tagger_coverage(out: *mut UsmTaggerCoverage) -> c_int {
    use usm_sync::atomic::Ordering::Relaxed;
    if out.is_null() {
        return -libc::EINVAL;
    }
    let cov = match session::coverage() {
        Ok(c) => c,
        Err(errno) => return -errno,
    };
    let report = UsmTaggerCoverage {
        managed_anon_bytes: cov.managed_anon_bytes,
        anon_bytes: cov.anon_bytes,
        registered_bytes: state::REGISTERED_BYTES.load(Relaxed),
        register_failures: state::REGISTER_FAILURES.load(Relaxed),
        dropped_notices: state::DROPPED_NOTICES.load(Relaxed),
        mode: state::mode() as u64,
    };
    // SAFETY: guaranteed by the caller.
    unsafe { out.write(report) };
    0
}

/// 0 starting, 1 managed, 2 unmanaged.
#[unsafe(no_mangle)]
pub extern "C" fn usm_tagger_state() -> c_int {
    state::mode() as c_int
}
