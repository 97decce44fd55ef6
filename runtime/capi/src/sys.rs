//! The exported C functions, `errno`, and finding the tagger's entry points: the only
//! `unsafe` of the crate.

use std::ffi::{CStr, c_char, c_int, c_void};

use crate::{Refusal, check, range_ok};

/// Signature of `usm_tagger_hint` in `libusm_tagger.so`.
type TaggerHint = unsafe extern "C" fn(*mut c_void, usize, *const c_char) -> c_int;
/// Signature of `usm_tagger_extent` in `libusm_tagger.so`.
type TaggerExtent = unsafe extern "C" fn(*mut c_void, *mut usize, *mut usize) -> c_int;

/// The address of `name` in the tagger if it is loaded in this process.
fn tagger_symbol(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks up a symbol.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!sym.is_null()).then_some(sym)
}

/// The tagger's `usm_tagger_hint`.
fn tagger_hint() -> Option<TaggerHint> {
    let sym = tagger_symbol(c"usm_tagger_hint")?;
    // SAFETY: `usm_tagger_hint` is exported by libusm_tagger.so with exactly this C
    // signature; a non-null address from dlsym is its entry point.
    Some(unsafe { std::mem::transmute::<*mut c_void, TaggerHint>(sym) })
}

/// The tagger's `usm_tagger_extent`.
fn tagger_extent() -> Option<TaggerExtent> {
    let sym = tagger_symbol(c"usm_tagger_extent")?;
    // SAFETY: as for `tagger_hint`: the tagger exports it with this signature.
    Some(unsafe { std::mem::transmute::<*mut c_void, TaggerExtent>(sym) })
}

/// The bytes of a C string, or None for NULL.
///
/// # Safety
/// - `ptr` is NULL or points to a NUL-terminated string that outlives the result.
unsafe fn c_str<'a>(ptr: *const c_char) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    Some(unsafe { CStr::from_ptr(ptr) }.to_bytes())
}

/// Returns `rc`, with `errno` set to `-rc` when it is negative.
fn with_errno(rc: c_int) -> c_int {
    if rc < 0 {
        // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
        unsafe { *libc::__errno_location() = -rc };
    }
    rc
}

/// The pages of the mapping or allocation holding `addr`, from the tagger.
fn extent_of(addr: *mut c_void) -> Result<(usize, usize), c_int> {
    let extent = tagger_extent().ok_or(-libc::ENOTCONN)?;
    let (mut start, mut len) = (0usize, 0usize);
    // SAFETY: both output pointers are valid for one write; the tagger's function has
    // the signature it exports (see libusm_tagger's sys::exports).
    let rc = unsafe { extent(addr, &mut start, &mut len) };
    if rc < 0 { Err(rc) } else { Ok((start, len)) }
}

/// Checks `hint` and sends it for `[addr, addr + len)` (`len` `None`: the extent of
/// `addr`, asked from the tagger).
///
/// # Safety
/// - `hint` is NULL or a NUL-terminated string.
unsafe fn hint_common(addr: *mut c_void, len: Option<usize>, hint: *const c_char) -> c_int {
    // SAFETY: forwarded caller contract.
    let verdict = check(unsafe { c_str(hint) });
    if verdict == Err(Refusal::Malformed) {
        return -libc::EINVAL;
    }
    let range = match len {
        Some(len) if range_ok(addr as usize, len) => Ok((addr as usize, len)),
        Some(_) => return -libc::EINVAL,
        None => extent_of(addr),
    };
    let send = tagger_hint();
    if verdict.is_err() {
        // Refused here; the daemon is told too, so that it counts and logs it (its
        // answer does not change ours).
        if let Some(send) = send {
            let (start, len) = range.unwrap_or((addr as usize, 1));
            // SAFETY: `hint` is a valid C string (checked above).
            let _ = unsafe { send(start as *mut c_void, len, hint) };
        }
        return -libc::EINVAL;
    }
    let (start, len) = match range {
        Ok(r) => r,
        Err(rc) => return rc,
    };
    match send {
        // SAFETY: `hint` is a valid C string (checked above); the tagger's function has
        // the signature it exports (see libusm_tagger's sys::exports).
        Some(send) => unsafe { send(start as *mut c_void, len, hint) },
        None => -libc::ENOTCONN,
    }
}

/// Hints the whole mapping or allocation holding `addr`, as USM documents it:
/// `usm_hint(index_buffer, "PRIORITY=HIGH; EVICTION=DENY")`.
///
/// `addr` is any address of a mapping (`mmap`), or the pointer `malloc`/`calloc`/
/// `realloc`/`posix_memalign` returned: the hint covers every page of that mapping or
/// block (pages are the unit: a small block shares its pages with its neighbours).
///
/// `hint` is `KEY=VALUE` items separated by `;` (spaces ignored, case-insensitive):
/// `PRIORITY=LOW|NORMAL|HIGH`, `EVICTION=ALLOW|DENY`, `PREFETCH=0..512` (pages),
/// `HUGE=4K..2M` (a power of two), for example `"PRIORITY=LOW; EVICTION=ALLOW"` or
/// `"PREFETCH=16"`. A later hint changes only the keys it names.
///
/// Returns 0 when the daemon has the hint; otherwise a negative errno, also stored in
/// `errno`: `-EINVAL` for a hint the daemon would refuse (NULL, empty, over 1024 bytes,
/// not UTF-8, an unknown key or value; the daemon still counts and logs it),
/// `-ENOMEM` when no mapping holds `addr`, `-ENOTCONN` when the process is not managed
/// by a daemon (not tagged, daemon absent or refused).
///
/// # Safety
/// `hint` must be NULL or point to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usm_hint(addr: *mut c_void, hint: *const c_char) -> c_int {
    // SAFETY: forwarded caller contract.
    with_errno(unsafe { hint_common(addr, None, hint) })
}

/// Hints `[addr, addr + len)` (the pages holding any of its bytes).
///
/// `hint` and the results are as for `usm_hint`, plus `-EINVAL` when `len` is 0 or the
/// range wraps around. Example: `usm_hint_range(table, 1 << 20, "PREFETCH=16")`.
///
/// # Safety
/// `hint` must be NULL or point to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usm_hint_range(
    addr: *mut c_void,
    len: usize,
    hint: *const c_char,
) -> c_int {
    // SAFETY: forwarded caller contract.
    with_errno(unsafe { hint_common(addr, Some(len), hint) })
}
