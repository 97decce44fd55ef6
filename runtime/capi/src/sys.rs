//! Finding the tagger's exported hint function: the only `unsafe` of the crate.

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
