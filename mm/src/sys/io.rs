//! Swap I/O straight to and from pool slots (`O_DIRECT`, no bounce buffer), and page
//! copies between slots.

use usm_kmod::FrameNo;
use usm_kmod::PAGE_SIZE;
use usm_kmod::pool::{FramePool, FrameState};
use usm_swap::{Engine, SwapEntry, Ticket};

use crate::MmError;

/// Queues the read of `entry` into `frame`'s slot.
///
/// The frame must be Taken by the caller (the memory core), which keeps it Taken, never
/// installs it, and never reads or writes its slot until the completion of the returned
/// ticket has been reaped: that is the contract of [`Engine::read_raw`].
pub(crate) fn read_into_slot(
    engine: &mut Engine,
    pool: &FramePool,
    frame: FrameNo,
    entry: SwapEntry,
) -> Result<Ticket, MmError> {
    let desc = pool.desc(frame)?;
    if desc.state() != FrameState::Taken {
        return Err(MmError::Protocol {
            frame,
            what: "swap-in into a frame that is not Taken",
        });
    }
    // A lazy pool's slot may be a hole: O_DIRECT into it would fault (EFAULT).
    pool.ensure_slot(frame)?;
    let addr = pool.slot_addr(frame) as *mut u8;
    // SAFETY: the slot is a present, page-aligned page of the pool mapping (a Taken frame's
    // slot holds a zeroed page: `ensure_slot`), which lives as long as the pool, and the pool outlives
    // every engine (the core holds both and drops engines first). The core owns the
    // Taken frame and does not touch its slot until the completion is reaped. Pool memory
    // is never an io_uring fixed buffer.
    Ok(unsafe { engine.read_raw(entry, addr, PAGE_SIZE)? })
}

/// Queues the write of Staging `frame`'s slot to `entry`.
///
/// The slot must stay Staging (not released, not refilled) until the completion is
/// reaped; a swap-cache hit meanwhile may MOVE the page back only if the kernel agrees
/// (the in-flight write pins it: `EBUSY` → the core copies instead), or — COPY install
/// mode — copy it back, after which the slot's page is dropped in a batch: the write
/// holds its own reference to the page, and the completion (whose ticket no longer
/// matches the page state) only frees its swap slot.
pub(crate) fn write_from_slot(
    engine: &mut Engine,
    pool: &FramePool,
    frame: FrameNo,
    entry: SwapEntry,
) -> Result<Ticket, MmError> {
    let desc = pool.desc(frame)?;
    if desc.state() != FrameState::Staging {
        return Err(MmError::Protocol {
            frame,
            what: "write-back of a frame that is not Staging",
        });
    }
    let addr = pool.slot_addr(frame) as *const u8;
    // SAFETY: the Staging slot holds the page (present), page-aligned, inside the pool
    // mapping which outlives the engine; nobody writes it until the completion is reaped
    // (the core releases a Staging frame only after its write completed), and the kernel
    // refuses to move it away while the write pins it.
    Ok(unsafe { engine.write_raw(entry, addr, PAGE_SIZE)? })
}

/// Copies the page in `from`'s slot (Staging: a present page) into `to`'s slot (Taken).
pub(crate) fn copy_slot(pool: &FramePool, from: FrameNo, to: FrameNo) -> Result<(), MmError> {
    if pool.desc(from)?.state() != FrameState::Staging
        || pool.desc(to)?.state() != FrameState::Taken
    {
        return Err(MmError::Protocol {
            frame: to,
            what: "slot copy needs a Staging source and a Taken destination",
        });
    }
    pool.ensure_slot(to)?;
    let src = pool.slot_addr(from) as *const u8;
    let dst = pool.slot_addr(to) as *mut u8;
    // SAFETY: both slots are present pages of the pool mapping (Staging holds the evicted
    // page, Taken holds a zeroed page); the core owns both frames under its lock; an
    // in-flight O_DIRECT write of `from` only reads it, so reading concurrently is fine;
    // the slots are distinct frames, so the ranges do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE) };
    Ok(())
}

/// A 128-bit content hash of `frame`'s slot (Taken: freshly read from swap; Staging: just
/// moved out of its region). Two independent 64-bit mixes, so an accidental match is
/// about 2^-128.
pub(crate) fn hash_slot(pool: &FramePool, frame: FrameNo) -> Result<u128, MmError> {
    let state = pool.desc(frame)?.state();
    if state != FrameState::Taken && state != FrameState::Staging {
        return Err(MmError::Protocol {
            frame,
            what: "hashing a slot that holds no page of ours",
        });
    }
    let src = pool.slot_addr(frame) as *const u64;
    let (mut a, mut b) = (0xcbf2_9ce4_8422_2325u64, 0x9e37_79b9_7f4a_7c15u64);
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: the slot is a present page of the pool mapping owned by the core under
        // its lock (Taken or Staging, see above); reads only, aligned u64s.
        let w = unsafe { src.add(i).read() };
        a = (a ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ w.rotate_left(29)).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ (b >> 31);
    }
    Ok((u128::from(a) << 64) | u128::from(b))
}
