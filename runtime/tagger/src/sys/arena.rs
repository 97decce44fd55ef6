//! The tagger's own arena: where the tagger's threads allocate, so that they never take
//! the managed heap's lock and never touch managed memory.
//!
//! A program thread may hold the managed heap's lock across a fault that only the daemon
//! can serve (`heap`, "Faults under the lock"); a tagger thread waiting for that lock
//! would stop serving the daemon, and the daemon would stop serving the fault. The
//! message loop itself does not allocate (`session`), but starting the eviction agent
//! does (a thread spawn: its name, handles and closure, glibc's thread bookkeeping), and
//! so does a fork child's attach. Those allocations come here.
//!
//! # Layout
//! One reservation of [`ARENA_BYTES`] (private anonymous, `MAP_NORESERVE`, never
//! registered with a userfaultfd), made on first use and never unmapped, is handed to a
//! dlmalloc of its own in segments by a bump pointer; memory freed here is reused here.
//! Its lock is taken only by tagger threads and by whoever frees an arena block; no path
//! under it faults on managed memory or takes the managed heap's lock, so it is never
//! held across a fault.
//!
//! # Who is a tagger thread
//! A thread is one while its `pthread_self()` is in [`TAGGER_THREADS`] (set by [`enter`]
//! when it starts, cleared by [`leave`] before it ends, so a program thread that later
//! gets the same `pthread_t` is not mistaken for it). Frees, `realloc` and
//! `malloc_usable_size` are routed by address ([`owns`]), whoever calls them.
//! A full arena or a full table fall back to the managed heap (correct, unprotected).
//!
//! # fork
//! The lock is held across `fork` like the heap's; the child re-initialises it and
//! forgets the parent's tagger threads (they do not exist there). The reservation is
//! inherited (plain kernel memory in the child too).

use std::cell::UnsafeCell;

use dlmalloc::{Allocator, Dlmalloc};
use usm_sync::atomic::{AtomicUsize, Ordering};

use super::{PAGE_SIZE, mmap_raw};

/// Size of the reservation (address space; pages are used as touched).
pub(crate) const ARENA_BYTES: usize = 32 << 20;
/// How many tagger threads can be marked at once (message thread, attach thread, spare).
const SLOTS: usize = 4;

/// `pthread_self()` of the current tagger threads (0 = free slot).
static TAGGER_THREADS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Start of the reservation (0 until first use; set once, under the arena lock).
static BASE: AtomicUsize = AtomicUsize::new(0);

fn me() -> usize {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() as usize }
}

/// Marks the calling thread as a tagger thread until [`leave`].
pub(crate) fn enter() {
    let me = me();
    for slot in &TAGGER_THREADS {
        if slot
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return;
        }
    }
}

/// Unmarks the calling thread (call before it ends).
pub(crate) fn leave() {
    let me = me();
    for slot in &TAGGER_THREADS {
        let _ = slot.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Whether the calling thread is a tagger thread.
pub(crate) fn in_tagger_thread() -> bool {
    let me = me();
    TAGGER_THREADS
        .iter()
        .any(|slot| slot.load(Ordering::Acquire) == me)
}

/// Whether `ptr` is an arena block.
pub(crate) fn owns(ptr: *const u8) -> bool {
    let base = BASE.load(Ordering::Acquire);
    let p = ptr as usize;
    base != 0 && p >= base && p < base + ARENA_BYTES
}

/// dlmalloc's source of memory here: pieces of the reservation.
struct ArenaSegments;

// SAFETY: `alloc` returns fresh, page-aligned, zero-filled memory nobody else uses (an
// untouched piece of the private reservation, handed out once); nothing is ever given
// back (`free`/`free_part`/`remap` refuse), as dlmalloc allows.
unsafe impl Allocator for ArenaSegments {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        // Runs inside `with_arena` (the lock is held).
        let size = size.next_multiple_of(PAGE_SIZE);
        let mut base = BASE.load(Ordering::Acquire);
        if base == 0 {
            match mmap_raw(
                0,
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            ) {
                Ok(addr) => {
                    base = addr;
                    BASE.store(addr, Ordering::Release);
                }
                Err(_) => return (std::ptr::null_mut(), 0, 0),
            }
        }
        // SAFETY: the arena lock is held (see above): the only reference.
        let used = unsafe { &mut *ARENA.used.get() };
        if ARENA_BYTES - *used < size {
            return (std::ptr::null_mut(), 0, 0);
        }
        let piece = base + *used;
        *used += size;
        (piece as *mut u8, size, 0)
    }

    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        std::ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        true
    }

    fn page_size(&self) -> usize {
        PAGE_SIZE
    }
}

struct Arena {
    lock: super::ForkMutex,
    dl: UnsafeCell<Dlmalloc<ArenaSegments>>,
    /// Bytes of the reservation handed to dlmalloc so far.
    used: UnsafeCell<usize>,
}

// SAFETY: `dl` and `used` are only reached with `lock` held (`with_arena` and the
// allocator callback that runs inside it).
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    lock: super::ForkMutex::new(),
    dl: UnsafeCell::new(Dlmalloc::new_with_allocator(ArenaSegments)),
    used: UnsafeCell::new(0),
};

fn lock() {
    ARENA.lock.lock();
}

fn unlock() {
    ARENA.lock.unlock();
}

fn with_arena<R>(f: impl FnOnce(&mut Dlmalloc<ArenaSegments>) -> R) -> R {
    lock();
    // SAFETY: the lock is held, so this is the only reference to the dlmalloc state.
    let r = f(unsafe { &mut *ARENA.dl.get() });
    unlock();
    r
}

/// `size` zeroed bytes aligned to `align` (a power of two), or null if the arena is full.
pub(crate) fn alloc_zeroed(size: usize, align: usize) -> *mut u8 {
    // SAFETY: `align` is a power of two (every caller's contract). The memory is
    // unmanaged: zeroing under this lock never faults to the daemon.
    with_arena(|dl| unsafe { dl.calloc(size, align) })
}

/// Frees an arena block.
///
/// # Safety
/// - `ptr` is a live arena block ([`owns`]).
pub(crate) unsafe fn free(ptr: *mut u8) {
    // SAFETY: guaranteed by the caller.
    with_arena(|dl| unsafe { dl.c_free(ptr) });
}

/// Resizes an arena block (in place or by moving it within the arena); null if the
/// arena is full (the block is left as it was).
///
/// # Safety
/// - `ptr` is a live arena block ([`owns`]), `size` is not zero.
pub(crate) unsafe fn realloc(ptr: *mut u8, size: usize) -> *mut u8 {
    // SAFETY: guaranteed by the caller.
    with_arena(|dl| unsafe { dl.c_realloc(ptr, size) })
}

/// `fork` prepare handler (after the heap's): hold the arena across `fork`.
pub(crate) fn fork_prepare() {
    lock();
}

/// `fork` parent handler.
pub(crate) fn fork_parent() {
    unlock();
}

/// `fork` child handler: a fresh lock, and no tagger thread (none was inherited).
pub(crate) fn fork_child() {
    ARENA.lock.reinit_in_child();
    for slot in &TAGGER_THREADS {
        slot.store(0, Ordering::Release);
    }
}
