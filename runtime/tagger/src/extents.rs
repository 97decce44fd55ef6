//! Extents of what the program allocated, for `usm_hint(addr, hint)`: the whole mapping
//! or allocation holding `addr`.
//!
//! The kernel merges adjacent anonymous VMAs with the same flags (and the same
//! userfaultfd), so `/proc/self/maps` cannot tell two neighbouring `mmap`s apart, nor a
//! `malloc` block from the heap segment around it. The tagger sees every allocation, so
//! it records the extents here:
//! - [`Kind::Mapping`]: a managed private anonymous `mmap` of the program (trimmed by
//!   `munmap`, moved by `mremap`);
//! - [`Kind::Large`]: a `malloc` block of 256 KiB or more, a mapping of its own
//!   (`sys::heap`); the extent is the block, without its header page;
//! - [`Kind::Heap`]: a dlmalloc segment; a smaller block inside it is found from its
//!   chunk header (`sys::heap::chunk_extent`).
//!
//! An address none of these holds (memory mapped before the tagger's session was
//! managed, a file mapping, a full table) falls back to its VMA from `/proc/self/maps`.
//!
//! # The table
//! A fixed array of slots (`start | kind`, `end`) in the library's static memory: no
//! allocation and no lock, so it is safe to update from inside the malloc family and
//! across `fork` (the child inherits the table with the memory). A slot is free when its
//! start word is 0; insertion claims a free slot with a compare-and-swap, then publishes
//! the end (a reader that sees the start without the end sees an empty extent and skips
//! it). Updates of one slot race only when the program unmaps or remaps the same memory
//! from two threads at once, which it cannot do meaningfully; the table is advice for
//! hints, never used to decide what is managed.

use usm_sync::atomic::{AtomicUsize, Ordering};

use crate::sys::PAGE_SIZE;

/// What an extent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A private anonymous `mmap` of the program.
    Mapping = 1,
    /// A large `malloc` block (a mapping of its own).
    Large = 2,
    /// A dlmalloc segment.
    Heap = 3,
}

impl Kind {
    fn from_bits(bits: usize) -> Option<Kind> {
        match bits {
            1 => Some(Kind::Mapping),
            2 => Some(Kind::Large),
            3 => Some(Kind::Heap),
            _ => None,
        }
    }
}

/// Extents remembered at most (more fall back to `/proc/self/maps`).
const SLOTS: usize = 4096;
/// The kind lives in the low bits of the (page-aligned) start.
const KIND_MASK: usize = PAGE_SIZE - 1;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // the array initialiser below
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// Remembers `[start, end)` (page-aligned `start`). Silently forgets it if the table is
/// full.
pub(crate) fn insert(start: usize, end: usize, kind: Kind) {
    if start == 0 || start & KIND_MASK != 0 || end <= start {
        return;
    }
    for slot in &TABLE {
        if slot
            .start
            .compare_exchange(
                0,
                start | kind as usize,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            slot.end.store(end, Ordering::Release);
            return;
        }
    }
}

/// Forgets `[start, end)`: extents inside it are dropped, extents across its edges are
/// trimmed (split in two when it is in their middle).
pub(crate) fn remove(start: usize, end: usize) {
    if end <= start {
        return;
    }
    for slot in &TABLE {
        let s = slot.start.load(Ordering::Acquire);
        if s == 0 {
            continue;
        }
        let (base, bits) = (s & !KIND_MASK, s & KIND_MASK);
        let e = slot.end.load(Ordering::Acquire);
        if e <= start || end <= base {
            continue;
        }
        if start <= base && e <= end {
            slot.end.store(0, Ordering::Release);
            slot.start.store(0, Ordering::Release);
        } else if start <= base {
            // The front is gone.
            slot.start.store(end | bits, Ordering::Release);
        } else {
            // The back is gone (and maybe a hole in the middle).
            slot.end.store(start, Ordering::Release);
            if end < e {
                if let Some(kind) = Kind::from_bits(bits) {
                    insert(end, e, kind);
                }
            }
        }
    }
}

/// The remembered extent holding `addr`, with its kind.
pub(crate) fn find(addr: usize) -> Option<(usize, usize, Kind)> {
    for slot in &TABLE {
        let s = slot.start.load(Ordering::Acquire);
        if s == 0 {
            continue;
        }
        let base = s & !KIND_MASK;
        let e = slot.end.load(Ordering::Acquire);
        if base <= addr && addr < e {
            return Kind::from_bits(s & KIND_MASK).map(|k| (base, e, k));
        }
    }
    None
}

/// The program moved `[old, old + old_len)` to `[new, new + new_len)` with `mremap`: a
/// remembered mapping follows.
pub(crate) fn moved(old: usize, old_len: usize, new: usize, new_len: usize) {
    let Some((_, _, Kind::Mapping)) = find(old) else {
        return;
    };
    remove(old, old + old_len);
    remove(new, new + new_len);
    insert(new, new + new_len, Kind::Mapping);
}

/// The pages holding the mapping or allocation that holds `addr` (see the module docs),
/// as `(start, len)`; `Err(errno)`: `ENOMEM` when no mapping holds `addr`, or the errno
/// of reading `/proc/self/maps`. Allocates nothing.
pub(crate) fn containing(addr: usize) -> Result<(usize, usize), i32> {
    let (start, end) = match find(addr) {
        Some((s, e, Kind::Mapping | Kind::Large)) => (s, e),
        Some((s, e, Kind::Heap)) => crate::sys::heap::chunk_extent(addr, s, e)
            .unwrap_or((addr, addr.saturating_add(1).min(e))),
        None => match crate::sys::vma_containing(addr)? {
            Some(r) => r,
            None => return Err(libc::ENOMEM),
        },
    };
    let start = start & !(PAGE_SIZE - 1);
    let end = end.checked_next_multiple_of(PAGE_SIZE).unwrap_or(end);
    Ok((start, end - start))
}
