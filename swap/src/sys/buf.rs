//! [`PageBuf`]: an owned, page-aligned, zero-initialised heap buffer for `O_DIRECT` I/O.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;

use crate::header::PAGE_SIZE;

/// An owned buffer of whole 4 KiB pages, aligned to 4 KiB (what `O_DIRECT` needs).
///
/// Handed to the engine by value for a read or write, it belongs to the engine while the
/// request is in flight and comes back in the [`Completion`](crate::Completion), so the
/// kernel can never write into freed memory. It is plain heap memory: the engine never
/// registers it as an io_uring fixed buffer (that would pin it).
pub struct PageBuf {
    ptr: NonNull<u8>,
    pages: usize,
}

// SAFETY: `PageBuf` uniquely owns its allocation, like `Box<[u8]>`; no interior sharing.
unsafe impl Send for PageBuf {}
// SAFETY: shared references only give `&[u8]`, like `Box<[u8]>`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    fn layout(pages: usize) -> Layout {
        match Layout::from_size_align(pages.saturating_mul(PAGE_SIZE), PAGE_SIZE) {
            Ok(l) => l,
            // Only reachable for sizes beyond isize::MAX, which no allocation can satisfy.
            Err(_) => handle_alloc_error(Layout::new::<[u8; PAGE_SIZE]>()),
        }
    }

    /// A zeroed buffer of `pages` pages (at least one).
    pub fn new(pages: usize) -> Self {
        let pages = pages.max(1);
        let layout = Self::layout(pages);
        // SAFETY: `layout` has a non-zero size (at least one page).
        let raw = unsafe { alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => Self { ptr, pages },
            None => handle_alloc_error(layout),
        }
    }

    /// A zeroed one-page buffer.
    pub fn page() -> Self {
        Self::new(1)
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Length in bytes (`pages * 4096`).
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Always false: a buffer has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len()` initialised (zeroed at allocation) bytes owned by
        // `self`; the shared borrow of `self` keeps them alive and unmutated.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the unique borrow of `self` excludes other access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.pages)) }
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf")
            .field("addr", &self.ptr)
            .field("pages", &self.pages)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_sized() {
        let mut b = PageBuf::new(3);
        assert_eq!(b.len(), 3 * PAGE_SIZE);
        assert_eq!(b.as_mut_ptr() as usize % PAGE_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[PAGE_SIZE * 3 - 1] = 7;
        assert_eq!(b[PAGE_SIZE * 3 - 1], 7);
        assert_eq!(PageBuf::new(0).pages(), 1);
    }
}
