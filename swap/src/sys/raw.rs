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
    pub unsafe fn read_raw(
        &mut self,
        entry: SwapEntry,
        addr: *mut u8,
        len: usize,
    ) -> Result<Ticket> {
        let buf = IoBuf::Raw(RawBuf {
            addr: addr as usize,
            len,
        });
        self.queue(entry, IoOp::Read, buf, len, true)
            .map_err(|(e, _)| e)
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
    pub unsafe fn write_raw(
        &mut self,
        entry: SwapEntry,
        addr: *const u8,
        len: usize,
    ) -> Result<Ticket> {
        let buf = IoBuf::Raw(RawBuf {
            addr: addr as usize,
            len,
        });
        self.queue(entry, IoOp::Write, buf, len, true)
            .map_err(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use usm_sync::Arc;

    use crate::engine::{Engine, EngineConfig};
    use crate::entry::{DeviceId, SwapEntry};
    use crate::error::SwapError;
    use crate::header::PAGE_SIZE;
    use crate::sys::buf::PageBuf;
    use crate::sys::ring::IoBuf;
    use crate::{SwapDevice, create_swap_file};

    #[test]
    fn raw_write_then_raw_read_into_caller_memory() {
        let dir = tempfile::Builder::new()
            .prefix("usm-swap-raw-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let path = dir.path().join("swap0");
        create_swap_file(&path, 1 << 20).unwrap();
        let dev = Arc::new(SwapDevice::open(DeviceId(0), &path).unwrap());
        let mut eng = Engine::new(&EngineConfig::default(), &[dev]).unwrap();
        let e = SwapEntry::new(DeviceId(0), 12).unwrap();
        // Caller-owned memory (stands in for a pool frame): 2 pages.
        let mut src = PageBuf::new(2);
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut dst = PageBuf::new(2);
        // SAFETY: `src` outlives the request (reaped below before it is dropped), is not
        // written meanwhile, is page-aligned, and is not a fixed buffer.
        let t = unsafe { eng.write_raw(e, src.as_ptr(), src.len()) }.unwrap();
        eng.wait(1).unwrap();
        let mut n = 0;
        eng.reap(|c| {
            assert_eq!(c.ticket, t);
            assert_eq!(c.result.unwrap() as usize, 2 * PAGE_SIZE);
            assert!(matches!(c.buf, Some(IoBuf::Raw(r)) if r.len() == 2 * PAGE_SIZE));
            n += 1;
        });
        assert_eq!(n, 1);
        let dst_ptr = dst.as_mut_ptr();
        // SAFETY: `dst` stays alive and untouched until the completion is reaped below.
        unsafe { eng.read_raw(e, dst_ptr, 2 * PAGE_SIZE) }.unwrap();
        eng.wait(1).unwrap();
        assert_eq!(eng.reap(|c| assert!(c.result.is_ok())), 1);
        assert_eq!(&src[..], &dst[..]);
        // Misaligned caller memory is refused before any I/O.
        // SAFETY: refused before submission; the pointer is never used by the kernel.
        let err = unsafe { eng.read_raw(e, dst_ptr.wrapping_add(512), PAGE_SIZE) }.unwrap_err();
        assert!(matches!(err, SwapError::Misaligned(_)));
    }
}
