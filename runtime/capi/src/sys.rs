//! The exported C function and finding the tagger's hint entry point: the only
//! `unsafe` of the crate.

use std::ffi::{CStr, c_char, c_int, c_void};

/// Signature of `usm_tagger_hint` in `libusm_tagger.so`.
pub(crate) type TaggerHint = unsafe extern "C" fn(*mut c_void, usize, *const c_char) -> c_int;

/// The tagger's `usm_tagger_hint`, if the tagger is loaded in this process.
pub(crate) fn tagger_hint() -> Option<TaggerHint> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks up a symbol.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"usm_tagger_hint".as_ptr()) };
    if sym.is_null() {
        return None;
    }
    // SAFETY: `usm_tagger_hint` is exported by libusm_tagger.so with exactly this C
    // signature; a non-null address from dlsym is its entry point.
    Some(unsafe { std::mem::transmute::<*mut c_void, TaggerHint>(sym) })
}

/// The bytes of a C string, or None for NULL.
///
/// # Safety
/// - `ptr` is NULL or points to a NUL-terminated string that outlives the result.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    Some(unsafe { CStr::from_ptr(ptr) }.to_bytes())
}

/// Sends a policy hint about `[addr, addr + len)` to the USM daemon.
///
/// `hint` is a NUL-terminated UTF-8 string of 1 to 1024 bytes understood by the
/// process's policies (for example `"cold"`, `"hot"`, `"sequential"`).
///
/// Returns 0 when the hint was delivered to the daemon, `-EINVAL` when `hint` is NULL,
/// empty, too long or not UTF-8, or when `len` is 0 or the range wraps around,
/// `-ENOTCONN` when the process is not managed by a daemon (not tagged, daemon absent
/// or refused), or another negative errno from the socket.
///
/// # Safety
/// `hint` must be NULL or point to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn usm_hint(addr: *mut c_void, len: usize, hint: *const c_char) -> c_int {
    // SAFETY: forwarded caller contract.
    let Some(text) = (unsafe { c_str(hint) }) else {
        return -libc::EINVAL;
    };
    if text.is_empty()
        || text.len() > crate::MAX_HINT_LEN
        || std::str::from_utf8(text).is_err()
        || len == 0
        || (addr as usize).checked_add(len).is_none()
    {
        return -libc::EINVAL;
    }
    match tagger_hint() {
        // SAFETY: `hint` is a valid C string (checked above); the tagger's function has
        // the signature it exports (see libusm_tagger's sys::exports).
        Some(send) => unsafe { send(addr, len, hint) },
        None => -libc::ENOTCONN,
    }
}
