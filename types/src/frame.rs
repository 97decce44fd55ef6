//! Frame numbers.
//!
//! A *frame* is one 4 KiB slot of the frame pool (`struct page` in the USM documents).
//! The physical page behind a slot migrates between the pool and the managed regions with
//! `UFFDIO_MOVE`; the frame number names the slot, and indexes the pool's `Frame`
//! descriptor table, so every back-link a policy keeps is O(1).

/// The size of one frame (and of one base page) in bytes.
pub const PAGE_SIZE: usize = 4096;

/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// The number of a frame in the pool: `0..pool.len()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct FrameNo(pub u32);

impl FrameNo {
    /// The frame number as an index into descriptor tables.
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl core::fmt::Display for FrameNo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "frame#{}", self.0)
    }
}
