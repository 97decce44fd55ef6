//! The raw-pointer I/O API: reads and writes on memory the engine does not own (a staging
//! slot of the frame pool, a page of the application).
//!
//! The engine cannot take ownership of such memory, so these functions are `unsafe` and
//! the caller promises what `PageBuf` guarantees structurally. The memory is **never**
//! registered as an io_uring fixed buffer: a fixed buffer pins its pages, and
//! `UFFDIO_MOVE` of a pinned page fails with `EBUSY`. It is still pinned for the duration
//! of the request itself (`O_DIRECT` pins the pages it transfers), so a `UFFDIO_MOVE` of
//! the page while the request is in flight gets `EBUSY` and must fall back to
//! `UFFDIO_COPY` (DESIGN.md, "Eviction without losing a write").

use crate::engine::{Engine, IoOp};
use crate::entry::{SwapEntry, Ticket};
use crate::error::Result;
use crate::sys::ring::{IoBuf, RawBuf};

impl Engine {
    /// Queues a read of `len` bytes (a multiple of 4096: the slots `entry`, `entry+1`, ...)
    /// into `addr`. The completion carries [`IoBuf::Raw`] with the same range.
    ///
    /// # Safety
    /// - `addr..addr+len` is writable memory, aligned to 4096 bytes, that stays mapped and
    ///   is neither read nor written by anyone else until the completion with the returned
    ///   ticket has been reaped (or this engine has been dropped: its `Drop` waits).
    /// - The memory is not an io_uring fixed buffer of any ring, and the caller accepts
    ///   that its pages are pinned while the read is in flight (`UFFDIO_MOVE` → `EBUSY`).
    pub unsafe fn read_raw(&mut self, entry: SwapEntry, addr: *mut u8, len: usize) -> Result<Ticket> {
        let buf = IoBuf::Raw(RawBuf {
            addr: addr as usize,
            len,
        });
        self.queue(entry, IoOp::Read, buf, len).map_err(|(e, _)| e)
    }

    /// Queues a write of `len` bytes (a multiple of 4096) from `addr` to the slots `entry`,
    /// `entry+1`, ... On a failed write the memory still holds the page: keep it.
    ///
    /// # Safety
    /// - `addr..addr+len` is readable memory, aligned to 4096 bytes, that stays mapped and
    ///   is not written by anyone until the completion with the returned ticket has been
    ///   reaped (or this engine has been dropped: its `Drop` waits).
    /// - The memory is not an io_uring fixed buffer of any ring, and the caller accepts
    ///   that its pages are pinned while the write is in flight (`UFFDIO_MOVE` → `EBUSY`).
    pub unsafe fn write_raw(&mut self, entry: SwapEntry, addr: *const u8, len: usize) -> Result<Ticket> {
        let buf = IoBuf::Raw(RawBuf {
            addr: addr as usize,
            len,
        });
        self.queue(entry, IoOp::Write, buf, len).map_err(|(e, _)| e)
    }
}
