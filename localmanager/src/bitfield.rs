//! Multi-level atomic bitfields: the IDQ (ready uThreads) and the PFQ (uThreads parked on a
//! page fault) of a LocalManager.
//!
//! # Layout
//! ```text
//!   top: AtomicU64                 bit c  = chunk c may have a set bit
//!   chunk c (published once, grows the capacity by CHUNK_BITS):
//!     summary: AtomicU64           bit l  = leaf l of this chunk may have a set bit
//!     leaves:  [AtomicU64; LEAVES] bit b  = index c*CHUNK_BITS + l*64 + b is set
//! ```
//! With 64 leaves per chunk a chunk holds 4096 indices and the field grows, one chunk at a
//! time, up to 64 chunks (262 144 indices). Under `cfg(loom)` both are shrunk to 2.
//!
//! Chunk 0 lives inline, right after the top word: `top`, its `summary` and its first six
//! leaves share one cache line. With up to 384 uThreads on a worker a cross-core `set` (an
//! unpark) and the owner's claim therefore touch **one** line instead of three — three
//! RMWs on lines the other core last wrote cost three cache-line transfers (~100 ns each
//! on the project VM) on the unpark's critical path, and the owner's spin loop watches that
//! same line. Later chunks are separate cache-aligned allocations.
//!
//! # Protocol (any thread may set or clear; leaves are the truth, summaries are hints)
//! - **set(i)**: `leaf |= bit`; if the leaf was empty, `summary |= leaf bit`; if the summary
//!   was empty, `top |= chunk bit`. Whoever makes a word go from empty to non-empty owns the
//!   summary bit above it. A setter that found the word non-empty also *helps*: if the
//!   summary (or top) bit is not visible yet — its owner may be an OS thread descheduled
//!   between its two RMWs — it sets it, so its own bit never waits on another thread's
//!   progress to become findable.
//! - **clear(i)** (a *claim*: exactly one of several concurrent clearers of a set bit gets
//!   `true`): `leaf &= !bit`; if that emptied the leaf, `summary &= !leaf bit` and then
//!   **re-check the leaf**: a concurrent `set` may have refilled it and set the summary bit
//!   just before our clear of it; if the leaf is non-empty again, set the summary bit back
//!   (and the top bit, the same way one level up). Without the re-check such a set would be
//!   invisible to find-first-set forever. All RMWs are AcqRel, so the re-check load sees any
//!   set whose summary write our summary RMW read.
//! - Between a clear of a summary and its re-check a concurrent search can miss a set bit
//!   (a transient false negative); [`AtomicBitfield::clear_reporting`] tells the clearer it
//!   restored a summary so it can wake the owner. A summary bit may also be set over an
//!   empty leaf (a stale hint: a set whose leaf bit was claimed before it published the
//!   summary bit); searches skip those, and the owner removes them before it parks
//!   ([`AtomicBitfield::scrub_stale_hints`]) because they make `is_empty` report work.
//! - **find_next(from)**: rotating find-first-set starting at `from`, wrapping around:
//!   O(1) in the capacity (three word loads in the common case), used for fair round-robin.
//! - Chunks are only added by the owner ([`AtomicBitfield::grow_to`]) before any index in
//!   them is handed out; other threads only set or clear indices they were given.

use crossbeam_utils::CachePadded;
use usm_sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use usm_sync::cfg_loom_or;

use crate::sys::OnceBox;

/// Leaf words per chunk.
pub const LEAVES_PER_CHUNK: usize = cfg_loom_or(64, 2);
/// Indices per chunk.
pub const CHUNK_BITS: usize = LEAVES_PER_CHUNK * 64;
/// Maximum number of chunks (the top word has 64 bits).
pub const MAX_CHUNKS: usize = cfg_loom_or(64, 2);
/// Largest capacity a bitfield can grow to.
pub const MAX_CAPACITY: usize = CHUNK_BITS * MAX_CHUNKS;

/// `summary` first, so it shares a cache line with the first leaves.
#[repr(C)]
struct Chunk {
    summary: AtomicU64,
    leaves: [AtomicU64; LEAVES_PER_CHUNK],
}

impl Chunk {
    fn new() -> Self {
        Self {
            summary: AtomicU64::new(0),
            leaves: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The top word followed by chunk 0 (one cache line holds `top`, chunk 0's summary and its
/// first leaves; see the module docs).
#[repr(C)]
struct Head {
    top: AtomicU64,
    first: Chunk,
}

/// A growable three-level atomic bitfield (see the module docs for the protocol).
pub struct AtomicBitfield {
    head: CachePadded<Head>,
    /// Chunks 1.. (index `c - 1`), published by [`AtomicBitfield::grow_to`].
    rest: Box<[OnceBox<CachePadded<Chunk>>]>,
    capacity: AtomicUsize,
}

impl std::fmt::Debug for AtomicBitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicBitfield")
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// Result of [`AtomicBitfield::clear_reporting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    /// The bit was set and this call cleared it (the caller won the claim).
    pub was_set: bool,
    /// This call cleared a summary bit and had to set it back because a concurrent `set`
    /// refilled the word: searches in between may have missed that set bit.
    pub restored_summary: bool,
}

const fn split(index: usize) -> (usize, usize, u64) {
    let chunk = index / CHUNK_BITS;
    let within = index % CHUNK_BITS;
    (chunk, within / 64, 1u64 << (within % 64))
}

/// Bits strictly above `pos` (pos < 64).
const fn above(pos: usize) -> u64 {
    if pos >= 63 { 0 } else { !0u64 << (pos + 1) }
}

impl AtomicBitfield {
    /// A bitfield with room for at least `capacity` indices (rounded up to whole chunks,
    /// at least one chunk).
    pub fn with_capacity(capacity: usize) -> Self {
        let field = Self {
            head: CachePadded::new(Head {
                top: AtomicU64::new(0),
                first: Chunk::new(),
            }),
            rest: (1..MAX_CHUNKS).map(|_| OnceBox::new()).collect(),
            capacity: AtomicUsize::new(0),
        };
        field.grow_to(capacity.max(1));
        field
    }

    /// Current capacity (a multiple of [`CHUNK_BITS`]).
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Acquire)
    }

    /// Grows to hold at least `capacity` indices; returns the new capacity, which stays
    /// below `capacity` only when [`MAX_CAPACITY`] is reached. Called by the owner.
    pub fn grow_to(&self, capacity: usize) -> usize {
        let wanted = capacity.min(MAX_CAPACITY).div_ceil(CHUNK_BITS).max(1);
        for chunk in &self.rest[..wanted - 1] {
            chunk.get_or_init(|| CachePadded::new(Chunk::new()));
        }
        let new = (wanted * CHUNK_BITS).max(self.capacity());
        self.capacity.fetch_max(new, Ordering::AcqRel);
        self.capacity()
    }

    fn chunk(&self, index: usize) -> Option<&Chunk> {
        if index == 0 {
            return Some(&self.head.first);
        }
        self.rest.get(index - 1)?.get().map(|chunk| &**chunk)
    }

    /// Sets bit `index`; returns `true` if it was clear. Indices beyond the capacity are
    /// ignored (returns `false`).
    pub fn set(&self, index: usize) -> bool {
        let (c, l, bit) = split(index);
        let Some(chunk) = self.chunk(c) else {
            return false;
        };
        let prev = chunk.leaves[l].fetch_or(bit, Ordering::AcqRel);
        if prev == 0 {
            self.set_summary(chunk, c, l);
        } else {
            // Help: the setter that made the leaf non-empty may not have published the
            // summary (or top) bit yet — it may be an OS thread descheduled between its two
            // RMWs. Without this our bit would stay invisible to searches through the
            // summaries until that thread runs again. A load suffices when the bit is set.
            self.ensure_summary(chunk, c, l);
        }
        prev & bit == 0
    }

    fn set_summary(&self, chunk: &Chunk, c: usize, l: usize) {
        if chunk.summary.fetch_or(1 << l, Ordering::AcqRel) == 0 {
            self.head.top.fetch_or(1 << c, Ordering::AcqRel);
        } else {
            self.ensure_top(c);
        }
    }

    /// `set_summary` unless the summary and top bits are both visible already.
    fn ensure_summary(&self, chunk: &Chunk, c: usize, l: usize) {
        if chunk.summary.load(Ordering::Acquire) & (1 << l) == 0 {
            self.set_summary(chunk, c, l);
        } else {
            self.ensure_top(c);
        }
    }

    fn ensure_top(&self, c: usize) {
        if self.head.top.load(Ordering::Acquire) & (1 << c) == 0 {
            self.head.top.fetch_or(1 << c, Ordering::AcqRel);
        }
    }

    /// Clears bit `index`; returns `true` if this call cleared it (claim semantics).
    pub fn clear(&self, index: usize) -> bool {
        self.clear_reporting(index).was_set
    }

    /// [`AtomicBitfield::clear`], also telling whether a summary had to be restored.
    pub fn clear_reporting(&self, index: usize) -> Cleared {
        let (c, l, bit) = split(index);
        let mut out = Cleared {
            was_set: false,
            restored_summary: false,
        };
        let Some(chunk) = self.chunk(c) else {
            return out;
        };
        let prev = chunk.leaves[l].fetch_and(!bit, Ordering::AcqRel);
        out.was_set = prev & bit != 0;
        if out.was_set && prev == bit {
            out.restored_summary = self.clear_summary(chunk, c, l);
        }
        out
    }

    /// The leaf `l` of chunk `c` was seen empty by our RMW: clear its summary bit, re-check.
    fn clear_summary(&self, chunk: &Chunk, c: usize, l: usize) -> bool {
        let prev = chunk.summary.fetch_and(!(1 << l), Ordering::AcqRel);
        if chunk.leaves[l].load(Ordering::Acquire) != 0 {
            // A concurrent set refilled the leaf; its summary bit may be the one we cleared.
            self.set_summary(chunk, c, l);
            return true;
        }
        if prev == 1 << l {
            // The chunk's summary went empty: same dance one level up.
            self.head.top.fetch_and(!(1 << c), Ordering::AcqRel);
            if chunk.summary.load(Ordering::Acquire) != 0 {
                self.head.top.fetch_or(1 << c, Ordering::AcqRel);
                return true;
            }
        }
        false
    }

    /// Clears summary and top bits left over an empty word (stale hints: a set racing a
    /// claim can leave one behind), each with the same re-check as a claim, so a concurrent
    /// set is never hidden. Stale hints cost nothing in searches, but they make
    /// [`AtomicBitfield::is_empty`] report work that is not there, which would keep an idle
    /// worker from ever blocking. Called by the owner before it parks. Returns the number
    /// of hints cleared.
    pub fn scrub_stale_hints(&self) -> usize {
        let mut cleared = 0;
        let mut top = self.head.top.load(Ordering::Acquire);
        while top != 0 {
            let c = top.trailing_zeros() as usize;
            top &= top - 1;
            let Some(chunk) = self.chunk(c) else { continue };
            let mut summary = chunk.summary.load(Ordering::Acquire);
            while summary != 0 {
                let l = summary.trailing_zeros() as usize;
                summary &= summary - 1;
                if chunk.leaves[l].load(Ordering::Acquire) != 0 {
                    continue;
                }
                chunk.summary.fetch_and(!(1 << l), Ordering::AcqRel);
                if chunk.leaves[l].load(Ordering::Acquire) != 0 {
                    self.set_summary(chunk, c, l);
                } else {
                    cleared += 1;
                }
            }
            if chunk.summary.load(Ordering::Acquire) == 0 {
                self.head.top.fetch_and(!(1 << c), Ordering::AcqRel);
                if chunk.summary.load(Ordering::Acquire) != 0 {
                    self.head.top.fetch_or(1 << c, Ordering::AcqRel);
                } else {
                    cleared += 1;
                }
            }
        }
        cleared
    }

    /// True when bit `index` is set (a snapshot).
    pub fn is_set(&self, index: usize) -> bool {
        let (c, l, bit) = split(index);
        self.chunk(c)
            .is_some_and(|chunk| chunk.leaves[l].load(Ordering::Acquire) & bit != 0)
    }

    /// True when no bit is set (a snapshot through the top word; may transiently report
    /// `true` while a clearer is restoring a summary, see the module docs).
    pub fn is_empty(&self) -> bool {
        self.head.top.load(Ordering::Acquire) == 0
    }

    fn first_in_chunk(&self, c: usize, from: usize) -> Option<usize> {
        let chunk = self.chunk(c)?;
        let (l0, b0) = (from / 64, from % 64);
        let word = chunk.leaves[l0].load(Ordering::Acquire) & (!0u64 << b0);
        if word != 0 {
            return Some(c * CHUNK_BITS + l0 * 64 + word.trailing_zeros() as usize);
        }
        let mut summary = chunk.summary.load(Ordering::Acquire) & above(l0);
        while summary != 0 {
            let l = summary.trailing_zeros() as usize;
            let word = chunk.leaves[l].load(Ordering::Acquire);
            if word != 0 {
                return Some(c * CHUNK_BITS + l * 64 + word.trailing_zeros() as usize);
            }
            summary &= summary - 1;
        }
        None
    }

    /// The first set index at or after `from`, wrapping around to 0 (round-robin search).
    pub fn find_next(&self, from: usize) -> Option<usize> {
        let capacity = self.capacity();
        if capacity == 0 {
            return None;
        }
        let from = if from >= capacity { 0 } else { from };
        let (c0, within) = (from / CHUNK_BITS, from % CHUNK_BITS);
        if let Some(found) = self.first_in_chunk(c0, within) {
            return Some(found);
        }
        let top = self.head.top.load(Ordering::Acquire);
        // Chunks after c0, then from chunk 0 up to and including c0 (its low part).
        let mut rest = top & above(c0);
        while rest != 0 {
            let c = rest.trailing_zeros() as usize;
            if let Some(found) = self.first_in_chunk(c, 0) {
                return Some(found);
            }
            rest &= rest - 1;
        }
        let mut wrapped = top & !above(c0);
        while wrapped != 0 {
            let c = wrapped.trailing_zeros() as usize;
            if let Some(found) = self.first_in_chunk(c, 0) {
                return Some(found);
            }
            wrapped &= wrapped - 1;
        }
        None
    }

    /// Finds and claims (clears) the next set index at or after `from`, wrapping around.
    pub fn take_next(&self, from: usize) -> Option<usize> {
        loop {
            let index = self.find_next(from)?;
            if self.clear(index) {
                return Some(index);
            }
            // Someone else claimed it between the find and the clear: search again.
        }
    }

    /// The owner's yield: `index` (claimed by the caller, its bit clear) goes back to the
    /// ready set and the next ready index after it in rotation order is claimed, in one
    /// step. Returns the claimed index — `index` itself when nothing else is ready, and then
    /// no shared word is written at all; `None` only when `index` was stolen in the slow
    /// path (below) and nothing else was left to claim.
    ///
    /// Equivalent to `set(index)` followed by `take_next(index + 1)`, but when the next ready
    /// index shares `index`'s leaf (the common case: at most 64 uThreads between them) it
    /// costs one CAS on that leaf instead of two RMWs: `leaf: w → (w | index bit) & !next
    /// bit`, which fails (and is retried) if anyone changed the leaf meanwhile — a thief
    /// claiming `next`, a waker setting another bit. The leaf stays non-empty across the CAS,
    /// so no summary bit can need clearing; the summary bit of `index`'s leaf is made
    /// visible afterwards like any setter's. While `index`'s bit is clear nobody else can
    /// claim it (it is still the caller's, as while it ran).
    pub fn requeue_and_take_next(&self, index: usize) -> Option<usize> {
        let (c, l, bit) = split(index);
        let chunk = self.chunk(c)?;
        loop {
            let Some(next) = self.find_next(index + 1) else {
                return Some(index);
            };
            if next == index {
                // Our bit is set after all (not by the protocol: the caller holds it):
                // fall back to the plain claim.
                return self.take_next(index + 1);
            }
            let (nc, nl, nbit) = split(next);
            if (nc, nl) == (c, l) {
                let leaf = &chunk.leaves[l];
                let word = leaf.load(Ordering::Acquire);
                if word & nbit == 0 {
                    continue;
                }
                if leaf
                    .compare_exchange(
                        word,
                        (word | bit) & !nbit,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    self.ensure_summary(chunk, c, l);
                    return Some(next);
                }
                continue;
            }
            // Different leaves: the two RMWs (a thief may take `index` in between).
            self.set(index);
            return self.take_next(index + 1);
        }
    }

    /// [`AtomicBitfield::take_next`], also reporting whether the claim had to restore a
    /// summary bit (a concurrent search may have missed a set bit: wake the owner).
    pub fn take_next_reporting(&self, from: usize) -> Option<(usize, bool)> {
        loop {
            let index = self.find_next(from)?;
            let cleared = self.clear_reporting(index);
            if cleared.was_set {
                return Some((index, cleared.restored_summary));
            }
        }
    }

    /// Appends every set index to `out` in ascending order (a snapshot; bits set or cleared
    /// during the walk may or may not appear).
    pub fn collect_into(&self, out: &mut Vec<usize>) {
        let chunks = self.capacity() / CHUNK_BITS;
        for c in 0..chunks {
            let Some(chunk) = self.chunk(c) else { break };
            for (l, leaf) in chunk.leaves.iter().enumerate() {
                let mut word = leaf.load(Ordering::Acquire);
                while word != 0 {
                    out.push(c * CHUNK_BITS + l * 64 + word.trailing_zeros() as usize);
                    word &= word - 1;
                }
            }
        }
    }

    /// Number of set bits (a snapshot, O(capacity / 64)).
    pub fn count(&self) -> usize {
        let chunks = self.capacity() / CHUNK_BITS;
        (0..chunks)
            .filter_map(|c| self.chunk(c))
            .flat_map(|chunk| chunk.leaves.iter())
            .map(|leaf| leaf.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn set_find_clear_across_levels() {
        let field = AtomicBitfield::with_capacity(3 * CHUNK_BITS);
        assert_eq!(field.capacity(), 3 * CHUNK_BITS);
        assert!(field.is_empty());
        for &i in &[0, 63, 64, 4095, 4096, 9000, 3 * CHUNK_BITS - 1] {
            assert!(field.set(i));
            assert!(!field.set(i));
            assert!(field.is_set(i));
        }
        assert_eq!(field.count(), 7);
        assert_eq!(field.find_next(0), Some(0));
        assert_eq!(field.find_next(1), Some(63));
        assert_eq!(field.find_next(65), Some(4095));
        assert_eq!(field.find_next(4097), Some(9000));
        assert_eq!(field.find_next(9001), Some(3 * CHUNK_BITS - 1));
        // Wraps around.
        assert!(field.clear(0));
        assert!(!field.clear(0));
        assert_eq!(field.find_next(3 * CHUNK_BITS - 1 + 1), Some(63));
        let mut all = Vec::new();
        field.collect_into(&mut all);
        assert_eq!(all, vec![63, 64, 4095, 4096, 9000, 3 * CHUNK_BITS - 1]);
        while let Some(i) = field.take_next(0) {
            assert!(!field.is_set(i));
        }
        assert!(field.is_empty());
        assert_eq!(field.count(), 0);
    }

    #[test]
    fn top_summary_and_first_leaves_share_a_cache_line() {
        let field = AtomicBitfield::with_capacity(1);
        let line = |word: &AtomicU64| word as *const AtomicU64 as usize / 64;
        let head = &field.head;
        assert_eq!(line(&head.top), line(&head.first.summary));
        assert_eq!(line(&head.top), line(&head.first.leaves[0]));
        assert_eq!(line(&head.top), line(&head.first.leaves[5]));
        field.grow_to(2 * CHUNK_BITS);
        let second = field.chunk(1).unwrap();
        assert_eq!(line(&second.summary), line(&second.leaves[0]));
    }

    #[test]
    fn requeue_claims_the_next_in_rotation() {
        let field = AtomicBitfield::with_capacity(2 * CHUNK_BITS);
        // Alone: runs again, nothing written.
        assert_eq!(field.requeue_and_take_next(7), Some(7));
        assert!(field.is_empty());
        // Same leaf: the next one after it, wrapping around.
        field.set(3);
        field.set(10);
        assert_eq!(field.requeue_and_take_next(5), Some(10));
        assert!(field.is_set(5) && field.is_set(3) && !field.is_set(10));
        assert_eq!(field.requeue_and_take_next(10), Some(3));
        assert!(field.is_set(5) && field.is_set(10) && !field.is_set(3));
        // Different leaf and chunk.
        while field.take_next(0).is_some() {}
        field.set(CHUNK_BITS + 200);
        assert_eq!(field.requeue_and_take_next(5), Some(CHUNK_BITS + 200));
        assert_eq!(field.find_next(0), Some(5));
        assert_eq!(field.count(), 1);
    }

    #[test]
    fn grows_beyond_4096() {
        let field = AtomicBitfield::with_capacity(10);
        assert_eq!(field.capacity(), CHUNK_BITS);
        assert!(!field.set(CHUNK_BITS + 5), "beyond capacity is ignored");
        assert_eq!(field.grow_to(CHUNK_BITS + 6), 2 * CHUNK_BITS);
        assert!(field.set(CHUNK_BITS + 5));
        assert_eq!(field.find_next(0), Some(CHUNK_BITS + 5));
        assert_eq!(field.grow_to(usize::MAX), MAX_CAPACITY);
    }

    #[test]
    fn rotation_visits_everyone() {
        let field = AtomicBitfield::with_capacity(4096);
        for i in (0..4096).step_by(7) {
            field.set(i);
        }
        let mut cursor = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(4096 / 7 + 1) {
            let i = field.find_next(cursor).unwrap();
            seen.insert(i);
            cursor = i + 1;
        }
        assert_eq!(seen.len(), 4096usize.div_ceil(7));
    }

    #[test]
    fn concurrent_set_and_claim_lose_nothing() {
        let field = usm_sync::Arc::new(AtomicBitfield::with_capacity(2 * CHUNK_BITS));
        let claimed = usm_sync::Arc::new(AtomicUsize::new(0));
        let newly_set = usm_sync::Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let field = field.clone();
                let claimed = claimed.clone();
                let newly_set = newly_set.clone();
                std::thread::spawn(move || {
                    for round in 0..20_000usize {
                        let i = (round * 131 + t * 4099) % (2 * CHUNK_BITS);
                        if field.set(i) {
                            newly_set.fetch_add(1, Ordering::Relaxed);
                        }
                        if round % 3 != 0 && field.take_next(i).is_some() {
                            claimed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every set bit that was not claimed is still findable.
        let mut left = 0;
        while field.take_next(0).is_some() {
            left += 1;
        }
        assert!(field.is_empty());
        // Each successful set added one bit, each claim removed one: nothing lost or doubled.
        assert_eq!(
            claimed.load(Ordering::Relaxed) + left,
            newly_set.load(Ordering::Relaxed)
        );
        assert!(left > 0 && claimed.load(Ordering::Relaxed) > 0);
    }
}
