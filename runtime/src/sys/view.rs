//! Typed views of region memory, and the [`Pod`] marker.

// Typed views of region memory another thread may write: std's atomics over raw memory.
#![allow(clippy::disallowed_types)]

use crate::embedded::Pod;

/// `&[T]` over `len` elements at `ptr`.
///
/// The caller ([`crate::embedded::Region`]) guarantees: `ptr` is the start of a live
/// region mapping of at least `len * size_of::<T>()` bytes, aligned for `T` (regions are
/// page aligned), borrowed for `'a`; every byte pattern is a valid `T` (`T: Pod`), so a
/// page that faults in zeroed or comes back from swap is a valid value. The runtime never
/// changes the content behind the view: it only moves pages in and out intact.
pub(crate) fn slice<'a, T: Pod>(ptr: *const u8, len: usize) -> &'a [T] {
    // SAFETY: see the contract above; region mappings are page aligned, so aligned for
    // any Pod type (alignment at most 4096 is asserted by the caller).
    unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), len) }
}

/// `&mut [T]`; same contract, and the caller holds the region mutably for `'a`.
pub(crate) fn slice_mut<'a, T: Pod>(ptr: *mut u8, len: usize) -> &'a mut [T] {
    // SAFETY: as for `slice`, plus exclusivity from the caller's `&mut` borrow.
    unsafe { std::slice::from_raw_parts_mut(ptr.cast::<T>(), len) }
}

/// `&[AtomicU64]` over `len` words at `ptr`; same contract as [`slice`] (any bit pattern
/// is a valid `AtomicU64`, the region is page aligned, shared access goes through atomics).
pub(crate) fn atomic_u64<'a>(ptr: *const u8, len: usize) -> &'a [std::sync::atomic::AtomicU64] {
    // SAFETY: see `slice`; AtomicU64 has the size and alignment of u64 and interior
    // mutability, so handing out shared references to it is sound.
    unsafe { std::slice::from_raw_parts(ptr.cast(), len) }
}

/// Touches one byte of each page of `[ptr, ptr + len)` with a volatile read, so each page
/// is faulted in (through the SIGBUS path) before a syscall uses the buffer.
pub(crate) fn prefault(ptr: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: `ptr + off` is inside a live region mapping (caller's borrow).
        unsafe { std::ptr::read_volatile(ptr.add(off)) };
        off += usm_kmod::PAGE_SIZE;
    }
    if len > 0 {
        // SAFETY: the last byte is inside the same mapping.
        unsafe { std::ptr::read_volatile(ptr.add(len - 1)) };
    }
}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: every bit pattern is a valid value of this primitive, it has no padding,
        // no pointers and no drop glue.
        unsafe impl Pod for $t {}
    )*};
}
pod!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64
);

// SAFETY: an array of Pod values is Pod (no padding between elements, each valid for any
// bit pattern).
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}
