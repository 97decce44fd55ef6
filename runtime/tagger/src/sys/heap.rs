//! The replacement malloc: dlmalloc over segments of managed memory.
//!
//! glibc's malloc gets its memory through internal `__mmap`/`__sbrk` calls that no
//! `LD_PRELOAD` wrapper sees, so the tagger replaces the whole malloc family. Every
//! segment dlmalloc asks for is a private anonymous `mmap` made here; once the session
//! is managed it is registered (MISSING) on the shared userfaultfd at once, before any
//! byte of it is handed out. Segments created before the daemon's Ack (libc and other
//! constructors allocate before ours runs) are remembered in a small table and
//! registered when the Ack arrives ([`adopt_pending`]).
//!
//! # Locking
//! One `pthread_mutex_t` guards the dlmalloc state. It is taken around `fork` by the
//! `pthread_atfork` handlers (prepare: lock; parent: unlock; child: re-initialise), so a
//! child never inherits it held. Nothing done under it allocates: segment callbacks use
//! raw system calls and stack-encoded, non-blocking notifications.
//!
//! # Faults under the lock
//! dlmalloc keeps its bookkeeping (chunk headers, free-list links) inside the managed
//! segments, so a thread holding the lock can fault on a page the daemon evicted, and
//! hold the lock until the daemon serves it. That only delays other *program* threads:
//! no thread of the tagger itself (message thread, eviction agent) takes this lock once
//! the session runs: the message loop does not allocate (see `session`), and what the
//! tagger's threads do allocate comes from an arena of their own in unmanaged memory
//! (`arena`; frees are routed there by address), so the daemon never waits for a
//! thread that waits for this lock. What touches many pages is kept outside it:
//! - zeroing (`calloc`, and `malloc`/`memalign` with zero-on-malloc) happens after the
//!   lock is released: the chunk is the caller's alone by then;
//! - a `realloc` that grows a block copies it outside the lock (allocate under the lock,
//!   copy, free under the lock) instead of letting dlmalloc copy under it; growing in
//!   place is given up for that (shrinking stays in place);
//! - large blocks (`LARGE_THRESHOLD` and up) are mappings of their own: their headers
//!   and contents are touched without the lock, which covers only the segment table.
//!
//! # Recursion
//! Code under the lock never calls `malloc`: the system-allocator callbacks below only
//! make system calls. Rust code elsewhere in the tagger *does* allocate (through the
//! exported `malloc`, since this library is the process's allocator) but never while
//! holding the lock.

use std::cell::UnsafeCell;

use dlmalloc::{Allocator, Dlmalloc};
use usm_sync::atomic::{AtomicBool, Ordering};

use super::{PAGE_SIZE, arena, mmap_raw, mremap_raw, munmap_raw};
use crate::extents::{self, Kind};
use crate::ranges;
use usm_proto::RangeKind;

/// How many pre-Ack segments are remembered (more are left unmanaged).
const PENDING_CAPACITY: usize = 64;

/// dlmalloc's source of memory: managed anonymous segments.
struct ManagedSegments;

/// Segments made before the Ack: `(start, len)`, `len == 0` = free slot.
struct PendingSegments {
    pending: [(usize, usize); PENDING_CAPACITY],
}

impl PendingSegments {
    fn remember(&mut self, start: usize, len: usize) {
        if let Some(slot) = self.pending.iter_mut().find(|s| s.1 == 0) {
            *slot = (start, len);
        }
    }

    fn forget(&mut self, start: usize, len: usize) {
        // Drop or trim entries overlapping [start, start+len).
        let end = start + len;
        for slot in &mut self.pending {
            let (s, l) = *slot;
            if l == 0 || s + l <= start || s >= end {
                continue;
            }
            *slot = if s < start { (s, start - s) } else { (0, 0) };
        }
    }

    fn created(&mut self, start: usize, len: usize) {
        if !ranges::adopt(start, len, RangeKind::Heap) {
            self.remember(start, len);
        }
    }

    fn dropped(&mut self, start: usize, len: usize) {
        self.forget(start, len);
        ranges::forget(start, len);
    }
}

// SAFETY: dlmalloc's contract: `alloc` returns fresh, page-aligned, zeroed memory it owns
// exclusively (a new private anonymous mapping); `remap`/`free_part`/`free` act only on
// segments it handed out earlier, as dlmalloc asks.
unsafe impl Allocator for ManagedSegments {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let size = size.next_multiple_of(PAGE_SIZE);
        match mmap_raw(
            0,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) {
            Ok(addr) => {
                pending_mut().created(addr, size);
                extents::insert(addr, addr + size, Kind::Heap);
                (addr as *mut u8, size, 0)
            }
            Err(_) => (std::ptr::null_mut(), 0, 0),
        }
    }

    fn remap(&self, ptr: *mut u8, oldsize: usize, newsize: usize, can_move: bool) -> *mut u8 {
        let flags = if can_move { libc::MREMAP_MAYMOVE } else { 0 };
        match mremap_raw(ptr as usize, oldsize, newsize, flags, 0) {
            Ok(addr) => {
                let segs = pending_mut();
                segs.dropped(ptr as usize, oldsize);
                segs.created(addr, newsize);
                extents::remove(ptr as usize, ptr as usize + oldsize);
                extents::insert(addr, addr + newsize, Kind::Heap);
                addr as *mut u8
            }
            Err(_) => std::ptr::null_mut(),
        }
    }

    fn free_part(&self, ptr: *mut u8, oldsize: usize, newsize: usize) -> bool {
        let base = ptr as usize;
        let ok = mremap_raw(base, oldsize, newsize, 0, 0).is_ok()
            || munmap_raw(base + newsize, oldsize - newsize).is_ok();
        if ok {
            pending_mut().dropped(base + newsize, oldsize - newsize);
            extents::remove(base + newsize, base + oldsize);
        }
        ok
    }

    fn free(&self, ptr: *mut u8, size: usize) -> bool {
        let ok = munmap_raw(ptr as usize, size).is_ok();
        if ok {
            pending_mut().dropped(ptr as usize, size);
            extents::remove(ptr as usize, ptr as usize + size);
        }
        ok
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        true
    }

    fn allocates_zeros(&self) -> bool {
        true
    }

    fn page_size(&self) -> usize {
        PAGE_SIZE
    }
}

struct Heap {
    lock: super::ForkMutex,
    dl: UnsafeCell<Dlmalloc<ManagedSegments>>,
    pending: UnsafeCell<PendingSegments>,
}

// SAFETY: `dl` and `pending` are only reached with `lock` held (`with_heap`, and the
// dlmalloc callbacks that run inside it).
unsafe impl Sync for Heap {}

static HEAP: Heap = Heap {
    lock: super::ForkMutex::new(),
    dl: UnsafeCell::new(Dlmalloc::new_with_allocator(ManagedSegments)),
    pending: UnsafeCell::new(PendingSegments {
        pending: [(0, 0); PENDING_CAPACITY],
    }),
};

/// The pre-Ack segment table. Only called with the heap lock held (dlmalloc callbacks
/// run inside `with_heap`; `adopt_pending` takes the lock), and no caller keeps the
/// reference beyond one statement sequence without another call in between.
fn pending_mut() -> &'static mut PendingSegments {
    // SAFETY: the heap lock is held (see above), so no other reference exists.
    unsafe { &mut *HEAP.pending.get() }
}

fn lock() {
    HEAP.lock.lock();
}

fn unlock() {
    HEAP.lock.unlock();
}

/// Runs `f` on the heap with the lock held.
fn with_heap<R>(f: impl FnOnce(&mut Dlmalloc<ManagedSegments>) -> R) -> R {
    lock();
    // SAFETY: the lock is held, so this is the only reference to the dlmalloc state.
    let r = f(unsafe { &mut *HEAP.dl.get() });
    unlock();
    r
}

/// `fork` prepare handler: hold the heap across `fork`.
pub(crate) fn fork_prepare() {
    lock();
}

/// `fork` parent handler.
pub(crate) fn fork_parent() {
    unlock();
}

/// `fork` child handler: the child has one thread; re-initialise the lock it inherited
/// held (unlocking a mutex locked by a thread that does not exist here is undefined).
pub(crate) fn fork_child() {
    HEAP.lock.reinit_in_child();
}

/// Registers the segments made before the Ack. Called once, right after the session
/// became managed (new segments register themselves from then on).
pub(crate) fn adopt_pending() {
    with_heap(|_| {
        for slot in &mut pending_mut().pending {
            if slot.1 != 0 && ranges::adopt(slot.0, slot.1, RangeKind::Heap) {
                *slot = (0, 0);
            }
        }
    });
}

const MIN_ALIGN: usize = 2 * std::mem::size_of::<usize>();

/// Hand out zeroed memory from `malloc` and `memalign` too (see [`set_zero_on_malloc`]).
static ZERO_ON_MALLOC: AtomicBool = AtomicBool::new(true);

/// Whether `malloc`/`memalign` zero what they return (default: yes).
///
/// Some programs read memory they never initialised and happen to work on glibc, whose
/// fresh memory is usually zero; stressapptest 1.0.6 is one (it crashes under glibc
/// with `MALLOC_PERTURB_` as well). Zeroing costs a `memset` of recycled chunks only:
/// chunks freshly mapped from the kernel (or the daemon) are known to be zero and are
/// not touched, so large allocations stay lazy. `USM_TAGGER_MALLOC_ZERO=0` turns it off.
pub(crate) fn set_zero_on_malloc(on: bool) {
    ZERO_ON_MALLOC.store(on, Ordering::Relaxed);
}

/// Whether a chunk dlmalloc just handed out may hold old bytes: true unless it is a
/// fresh mapping of its own (dlmalloc's `calloc_must_clear` for an allocator that
/// `allocates_zeros`, read from the chunk header as in [`usable_size`]).
///
/// # Safety
/// - `ptr` is a live dlmalloc allocation (not a large block).
unsafe fn may_hold_old_bytes(ptr: *const u8) -> bool {
    // SAFETY: every live dlmalloc allocation is preceded by its chunk header.
    let head = unsafe { ptr.cast::<usize>().sub(1).read() };
    head & 3 != 0
}

/// `size` zeroed bytes aligned to `align` (a power of two) from dlmalloc: allocated
/// under the lock, zeroed after it is released (see "Faults under the lock").
fn zeroed(size: usize, align: usize) -> *mut u8 {
    // SAFETY: `align` is a power of two (every caller's contract); the chunk header of a
    // non-null result is readable.
    let (ptr, clear) = with_heap(|dl| unsafe {
        let ptr = dl.malloc(size, align);
        (ptr, !ptr.is_null() && may_hold_old_bytes(ptr))
    });
    if clear {
        // SAFETY: `ptr` is a fresh allocation of at least `size` bytes that no other
        // thread knows yet.
        unsafe { ptr.write_bytes(0, size) };
    }
    ptr
}

/// A block from the tagger's own arena if the caller is a tagger thread (`arena`),
/// else (or if the arena is full) null.
fn for_tagger_thread(size: usize, align: usize) -> *mut u8 {
    if arena::in_tagger_thread() {
        arena::alloc_zeroed(size, align)
    } else {
        std::ptr::null_mut()
    }
}

/// `malloc`.
pub(crate) fn malloc(size: usize) -> *mut u8 {
    let own = for_tagger_thread(size, MIN_ALIGN);
    if !own.is_null() {
        return own;
    }
    if size >= LARGE_THRESHOLD {
        return large_alloc(size, MIN_ALIGN);
    }
    if ZERO_ON_MALLOC.load(Ordering::Relaxed) {
        return zeroed(size, MIN_ALIGN);
    }
    // SAFETY: c_malloc has no preconditions.
    with_heap(|dl| unsafe { dl.c_malloc(size) })
}

/// `free`.
///
/// # Safety
/// - `ptr` is null or a live allocation of this heap.
pub(crate) unsafe fn free(ptr: *mut u8) {
    if ptr.is_null() {
        return;
    }
    if arena::owns(ptr) {
        // SAFETY: guaranteed by the caller (a live block, of the arena).
        unsafe { arena::free(ptr) };
        return;
    }
    // SAFETY: guaranteed by the caller.
    if let Some(large) = unsafe { LargeHeader::of(ptr) } {
        large.release();
        return;
    }
    // SAFETY: guaranteed by the caller.
    with_heap(|dl| unsafe { dl.c_free(ptr) });
}

/// `calloc` of `size` bytes (the caller checked the multiplication).
pub(crate) fn calloc(size: usize) -> *mut u8 {
    let own = for_tagger_thread(size, MIN_ALIGN);
    if !own.is_null() {
        return own;
    }
    if size >= LARGE_THRESHOLD {
        return large_alloc(size, MIN_ALIGN);
    }
    zeroed(size, MIN_ALIGN)
}

/// `realloc` (non-null `ptr`, non-zero `size`).
///
/// # Safety
/// - `ptr` is a live allocation of this heap.
pub(crate) unsafe fn realloc(ptr: *mut u8, size: usize) -> *mut u8 {
    if arena::owns(ptr) {
        // SAFETY: guaranteed by the caller (a live block, of the arena).
        return unsafe { arena::realloc(ptr, size) };
    }
    // SAFETY: guaranteed by the caller.
    if let Some(large) = unsafe { LargeHeader::of(ptr) } {
        if size >= LARGE_THRESHOLD && large.ptr == large.base + PAGE_SIZE {
            if let Some(moved) = large.remap(size) {
                return moved;
            }
        }
        let fresh = malloc(size);
        if !fresh.is_null() {
            // SAFETY: both blocks are live and distinct; the copy fits both.
            unsafe { std::ptr::copy_nonoverlapping(ptr, fresh, size.min(large.usable())) };
            large.release();
        }
        return fresh;
    }
    // SAFETY: guaranteed by the caller.
    let usable = unsafe { usable_size(ptr) };
    if size <= usable {
        // Shrinking (or no change): dlmalloc splits the chunk in place.
        // SAFETY: guaranteed by the caller.
        return with_heap(|dl| unsafe { dl.c_realloc(ptr, size) });
    }
    // Growing: a new block, the copy outside the lock, then the old block freed.
    let fresh = if size >= LARGE_THRESHOLD {
        large_alloc(size, MIN_ALIGN)
    } else {
        // SAFETY: c_malloc has no preconditions.
        with_heap(|dl| unsafe { dl.c_malloc(size) })
    };
    if !fresh.is_null() {
        // SAFETY: both blocks are live and distinct; `usable < size` fits both.
        unsafe { std::ptr::copy_nonoverlapping(ptr, fresh, usable) };
        // SAFETY: guaranteed by the caller; `ptr` is not used again.
        with_heap(|dl| unsafe { dl.c_free(ptr) });
    }
    fresh
}

/// `memalign` with a power-of-two `align`.
pub(crate) fn memalign(align: usize, size: usize) -> *mut u8 {
    debug_assert!(align.is_power_of_two());
    let own = for_tagger_thread(size, align);
    if !own.is_null() {
        return own;
    }
    if size >= LARGE_THRESHOLD {
        return large_alloc(size, align);
    }
    if ZERO_ON_MALLOC.load(Ordering::Relaxed) {
        return zeroed(size, align);
    }
    // SAFETY: `align` is a power of two (checked by every caller).
    with_heap(|dl| unsafe { dl.c_memalign(align, size) })
}

/// `malloc_usable_size`: a large block's header, or dlmalloc's chunk header (pinned
/// crate version, see Cargo.toml), the word before the pointer: size | PINUSE | CINUSE |
/// FLAG4; a chunk with neither in-use bit is a directly mmapped one, with two words of
/// overhead.
///
/// # Safety
/// - `ptr` is a live allocation of this heap.
pub(crate) unsafe fn usable_size(ptr: *const u8) -> usize {
    // SAFETY: guaranteed by the caller.
    if let Some(large) = unsafe { LargeHeader::of(ptr.cast_mut()) } {
        return large.usable();
    }
    // SAFETY: every live dlmalloc allocation is preceded by its chunk header.
    let head = unsafe { ptr.cast::<usize>().sub(1).read() };
    let size = head & !7;
    let overhead = if head & 3 == 0 { 2 } else { 1 } * std::mem::size_of::<usize>();
    size.saturating_sub(overhead)
}

/// The bytes of the dlmalloc block at `addr` inside the heap segment `[seg_start,
/// seg_end)`, as `(addr, addr + usable)`, if the word before `addr` reads as the header
/// of an in-use chunk that fits the segment (`usm_hint(ptr, …)` on a small `malloc`
/// block; `addr` must be the pointer `malloc` returned: an interior address usually
/// fails these checks, and then the caller hints the page of `addr` alone).
pub(crate) fn chunk_extent(
    addr: usize,
    seg_start: usize,
    seg_end: usize,
) -> Option<(usize, usize)> {
    let word = std::mem::size_of::<usize>();
    if addr % MIN_ALIGN != 0 || addr < seg_start + 2 * word || addr >= seg_end {
        return None;
    }
    // SAFETY: `addr - 8` lies inside the segment, a live readable mapping of the heap
    // (the extents table drops a segment when it is unmapped).
    let head = unsafe { (addr as *const usize).sub(1).read() };
    let size = head & !7;
    let chunk = addr - 2 * word;
    let in_use = head & 2 != 0;
    if !in_use || size < 4 * word || size % MIN_ALIGN != 0 || chunk.checked_add(size)? > seg_end {
        return None;
    }
    Some((addr, addr + size - word))
}

/// Allocations of at least this many bytes get a mapping of their own (glibc does the
/// same above its mmap threshold): fresh from the kernel, hence zero without a `memset`
/// and untouched until used; returned to the kernel on `free`; no heap lock.
const LARGE_THRESHOLD: usize = 256 * 1024;
/// `"USMLARGE"`, xor-ed with the block's address in its tag word.
const LARGE_MAGIC: usize = 0x5553_4D4C_4152_4745;

/// A large block, described by the 32 bytes just below its pointer:
/// ```text
///  ptr-32: mapping base   ptr-24: mapping length   ptr-16: 0   ptr-8: LARGE_MAGIC ^ ptr
/// ```
/// The mapping starts at least one page below `ptr`, so the header is always inside it.
/// A dlmalloc chunk has its size word at `ptr-8`, always far below `LARGE_MAGIC ^ ptr`
/// (whose top bits come from the magic), so the two cannot be confused.
#[derive(Clone, Copy, Debug)]
struct LargeHeader {
    ptr: usize,
    base: usize,
    len: usize,
}

impl LargeHeader {
    /// The header of `ptr` if it is a large block.
    ///
    /// # Safety
    /// - `ptr` is a live allocation of this heap (so `ptr-32..ptr` is readable: a large
    ///   block's header, or dlmalloc's chunk header and the previous chunk's tail).
    unsafe fn of(ptr: *mut u8) -> Option<LargeHeader> {
        let words = ptr.cast::<usize>();
        // SAFETY: readable per the contract.
        let tag = unsafe { words.sub(1).read() };
        if tag != LARGE_MAGIC ^ ptr as usize {
            return None;
        }
        // SAFETY: a large block: its header words are inside its mapping.
        let (base, len) = unsafe { (words.sub(4).read(), words.sub(3).read()) };
        Some(LargeHeader {
            ptr: ptr as usize,
            base,
            len,
        })
    }

    fn write(&self) {
        let words = self.ptr as *mut usize;
        // SAFETY: `ptr - 32 >= base` (ptr is at least a page into the mapping), and the
        // mapping is ours and writable.
        unsafe {
            words.sub(4).write(self.base);
            words.sub(3).write(self.len);
            words.sub(2).write(0);
            words.sub(1).write(LARGE_MAGIC ^ self.ptr);
        }
    }

    fn usable(&self) -> usize {
        self.base + self.len - self.ptr
    }

    /// Unmaps the block.
    fn release(self) {
        if munmap_raw(self.base, self.len).is_ok() {
            with_heap(|_| pending_mut().dropped(self.base, self.len));
            extents::remove(self.base, self.base + self.len);
        }
    }

    /// Grows or shrinks a page-aligned block in place or by moving it (`mremap`; the
    /// registration moves with it).
    fn remap(self, size: usize) -> Option<*mut u8> {
        let len = size
            .checked_add(PAGE_SIZE)?
            .checked_next_multiple_of(PAGE_SIZE)?;
        let base = mremap_raw(self.base, self.len, len, libc::MREMAP_MAYMOVE, 0).ok()?;
        with_heap(|_| {
            let pending = pending_mut();
            pending.dropped(self.base, self.len);
            pending.created(base, len);
        });
        let moved = LargeHeader {
            ptr: base + PAGE_SIZE,
            base,
            len,
        };
        moved.write();
        extents::remove(self.base, self.base + self.len);
        extents::insert(moved.ptr, base + len, Kind::Large);
        Some(moved.ptr as *mut u8)
    }
}

/// Maps a large block of `size` bytes aligned to `align` (a power of two).
fn large_alloc(size: usize, align: usize) -> *mut u8 {
    let slack = if align > PAGE_SIZE { align } else { 0 };
    let Some(len) = size
        .checked_add(PAGE_SIZE + slack)
        .and_then(|l| l.checked_next_multiple_of(PAGE_SIZE))
    else {
        return std::ptr::null_mut();
    };
    let Ok(base) = mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    ) else {
        return std::ptr::null_mut();
    };
    with_heap(|_| pending_mut().created(base, len));
    let ptr = (base + PAGE_SIZE).next_multiple_of(align.max(PAGE_SIZE));
    let block = LargeHeader { ptr, base, len };
    block.write();
    extents::insert(ptr, base + len, Kind::Large);
    ptr as *mut u8
}
