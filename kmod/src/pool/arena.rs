//! The two-tier frame arenas: one [`SharedArena`] (sArena) per pool, one [`LocalArena`]
//! (lArena) per worker.
//!
//! # Protocol
//!
//! - The sArena keeps its free frames as **naturally aligned blocks** of `2^k` frames,
//!   `k <= MAX_ORDER` (a buddy allocator: one free list per order, a freed block merges
//!   with its free buddy), behind a `usm_sync::Mutex`. Workers touch it in batches of
//!   [`ARENA_BATCH`] frames (2 under loom), so the lock is taken once per batch, not once
//!   per fault. A batch is cut from as few blocks as possible, so the frames a worker
//!   takes one by one come out consecutive.
//! - A flexible huge page takes one aligned block of `2^k` consecutive slots at once
//!   ([`SharedArena::pop_run`]): its pages then move into the region with one
//!   `UFFDIO_MOVE`. Frames come back one by one or as runs and merge again, so runs stay
//!   available after the pool has been fragmented by single-frame traffic.
//! - The sArena may also hold a **reserve**: frames of the pool not yet populated (the
//!   pool populates its memory in chunks, see [`crate::pool`]). The reserve counts in
//!   [`SharedArena::len`] (those frames are free: the pool hands them out once populated)
//!   but no block holds them until [`SharedArena::add_populated`] moves them in, under the
//!   same lock, so the published length never jumps.
//! - An lArena is owned by exactly one worker (`&mut self` everywhere, no lock). It pops
//!   from its own stack (O(1)); when empty it *refills* one batch from the sArena; when a
//!   push takes it to `2 * batch` frames it *spills* one batch back. Dropping it spills all.
//! - Conservation: a frame number is at any time in exactly one place (the sArena's blocks
//!   or reserve, one lArena, or in the hands of whoever popped it). Each arena publishes
//!   its length (`SharedArena::len`, [`LocalArena::published_len`]) so the pool's census
//!   can add them up; the loom model in `loom-tests/tests/arena.rs` checks refill and
//!   spill from two threads lose and duplicate nothing.
//!
//! The arenas hold frame *numbers* only; the frame states live in the pool's descriptor
//! table (see [`crate::pool`]).

use crate::frame::FrameNo;
use std::vec::Vec;
use usm_sync::atomic::{AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex, MutexGuard};

/// Frames moved per refill / spill between an lArena and the sArena.
pub const ARENA_BATCH: usize = usm_sync::cfg_loom_or(64, 2);

/// The largest block the sArena keeps: `2^MAX_ORDER` frames (512 frames = 2 MiB).
pub const MAX_ORDER: u32 = 9;

const ORDERS: usize = MAX_ORDER as usize + 1;
/// End of a free list.
const NIL: u32 = u32::MAX;
/// `FreeBlocks::order` of a frame that does not start a free block.
const NOT_HEAD: u8 = u8::MAX;

/// `floor(log2(n))` for `n >= 1`, capped at [`MAX_ORDER`].
fn order_at_most(n: usize) -> u32 {
    debug_assert!(n >= 1);
    (usize::BITS - 1 - n.leading_zeros()).min(MAX_ORDER)
}

/// The buddy free lists (owned by the sArena's lock).
///
/// `order[f] == k` exactly when frames `f .. f + 2^k` are one free block on list `k`
/// (`f` is then a multiple of `2^k`); `next` / `prev` link the blocks of one list, so a
/// buddy found free is unlinked in O(1) when it merges.
#[derive(Debug)]
struct FreeBlocks {
    heads: [u32; ORDERS],
    next: Vec<u32>,
    prev: Vec<u32>,
    order: Vec<u8>,
    /// Bit `k` set: list `k` is not empty.
    nonempty: u16,
    /// Frames held in blocks.
    frames: usize,
    /// Frames promised but not yet populated (no block holds them yet).
    reserve: usize,
}

impl FreeBlocks {
    fn new(capacity: usize) -> FreeBlocks {
        FreeBlocks {
            heads: [NIL; ORDERS],
            next: vec![NIL; capacity],
            prev: vec![NIL; capacity],
            order: vec![NOT_HEAD; capacity],
            nonempty: 0,
            frames: 0,
            reserve: 0,
        }
    }

    fn total(&self) -> usize {
        self.frames + self.reserve
    }

    /// Grows the tables to hold frame numbers below `capacity`.
    fn ensure(&mut self, capacity: usize) {
        if capacity > self.order.len() {
            self.next.resize(capacity, NIL);
            self.prev.resize(capacity, NIL);
            self.order.resize(capacity, NOT_HEAD);
        }
    }

    fn link(&mut self, f: u32, k: u32) {
        let (i, head) = (f as usize, self.heads[k as usize]);
        self.next[i] = head;
        self.prev[i] = NIL;
        if head != NIL {
            self.prev[head as usize] = f;
        }
        self.heads[k as usize] = f;
        self.order[i] = k as u8;
        self.nonempty |= 1 << k;
    }

    fn unlink(&mut self, f: u32, k: u32) {
        let i = f as usize;
        let (next, prev) = (self.next[i], self.prev[i]);
        if prev == NIL {
            self.heads[k as usize] = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next != NIL {
            self.prev[next as usize] = prev;
        }
        self.order[i] = NOT_HEAD;
        if self.heads[k as usize] == NIL {
            self.nonempty &= !(1 << k);
        }
    }

    /// Adds the free block `f .. f + 2^k` (aligned), merging with free buddies.
    fn free_block(&mut self, mut f: u32, mut k: u32) {
        debug_assert_eq!(f & ((1 << k) - 1), 0, "unaligned block");
        self.ensure(f as usize + (1 << k));
        self.frames += 1 << k;
        while k < MAX_ORDER {
            let buddy = f ^ (1 << k);
            if (buddy as usize) < self.order.len() && self.order[buddy as usize] == k as u8 {
                self.unlink(buddy, k);
                f = f.min(buddy);
                k += 1;
            } else {
                break;
            }
        }
        self.link(f, k);
    }

    /// Adds the free frames `start .. start + n` as the largest aligned blocks they hold.
    fn free_range(&mut self, start: u32, n: usize) {
        let end = start as u64 + n as u64;
        let mut f = start as u64;
        while f < end {
            let mut k = (f.trailing_zeros()).min(MAX_ORDER);
            while f + (1 << k) > end {
                k -= 1;
            }
            self.free_block(f as u32, k);
            f += 1 << k;
        }
    }

    /// Takes an aligned block of exactly `2^k` frames, splitting a larger one if needed.
    fn alloc(&mut self, k: u32) -> Option<u32> {
        let avail = self.nonempty & !((1u16 << k) - 1);
        if avail == 0 {
            return None;
        }
        let mut j = avail.trailing_zeros();
        let f = self.heads[j as usize];
        self.unlink(f, j);
        while j > k {
            j -= 1;
            self.link(f + (1 << j), j);
        }
        self.frames -= 1 << k;
        Some(f)
    }

    /// Takes a block of `2^k` frames, or the largest there is when none is that big.
    fn alloc_up_to(&mut self, k: u32) -> Option<(u32, u32)> {
        if let Some(f) = self.alloc(k) {
            return Some((f, k));
        }
        if self.nonempty == 0 {
            return None;
        }
        let j = 15 - self.nonempty.leading_zeros();
        self.alloc(j).map(|f| (f, j))
    }

    fn snapshot(&self) -> Vec<FrameNo> {
        let mut out = Vec::with_capacity(self.frames);
        for k in 0..ORDERS {
            let mut f = self.heads[k];
            while f != NIL {
                out.extend((f..f + (1 << k)).map(FrameNo));
                f = self.next[f as usize];
            }
        }
        out
    }
}

/// The shared arena (sArena): free frames any worker may take, in batches or as aligned
/// runs, plus the pool's not-yet-populated reserve.
#[derive(Debug)]
pub struct SharedArena {
    blocks: Mutex<FreeBlocks>,
    /// Frames in blocks plus the reserve, published after every change under the lock
    /// (read without it).
    len: AtomicUsize,
}

impl Default for SharedArena {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedArena {
    /// An empty arena.
    pub fn new() -> SharedArena {
        SharedArena {
            blocks: Mutex::new(FreeBlocks::new(0)),
            len: AtomicUsize::new(0),
        }
    }

    /// An arena holding `frames` (any numbers; they merge into blocks where they can).
    pub fn with_frames(frames: impl IntoIterator<Item = FrameNo>) -> SharedArena {
        let mut blocks = FreeBlocks::new(0);
        for f in frames {
            blocks.free_block(f.0, 0);
        }
        let len = blocks.total();
        SharedArena {
            blocks: Mutex::new(blocks),
            len: AtomicUsize::new(len),
        }
    }

    /// The arena of a pool of `frames` frames whose first `populated` are free and
    /// populated, the rest a reserve that [`SharedArena::add_populated`] brings in.
    pub fn with_reserve(frames: usize, populated: usize) -> SharedArena {
        let populated = populated.min(frames);
        let mut blocks = FreeBlocks::new(frames);
        blocks.free_range(0, populated);
        blocks.reserve = frames - populated;
        let len = blocks.total();
        SharedArena {
            blocks: Mutex::new(blocks),
            len: AtomicUsize::new(len),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FreeBlocks> {
        // A panic while holding the lock could at worst leave a block unlinked (lost to
        // the free lists, still counted); frames are never duplicated, so poison is
        // ignored.
        self.blocks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, blocks: &FreeBlocks) {
        self.len.store(blocks.total(), Ordering::Release);
    }

    /// Free frames held now, the reserve included (a snapshot; exact when nobody is
    /// refilling or spilling).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// No frame held now (neither populated nor in reserve).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frames of the reserve (free but not populated yet).
    pub fn reserve(&self) -> usize {
        self.lock().reserve
    }

    /// Moves frames `start .. start + n` from the reserve into the free blocks (the pool
    /// populated them). `n` larger than the reserve is a caller bug; the reserve stops at 0.
    pub fn add_populated(&self, start: FrameNo, n: usize) {
        let mut blocks = self.lock();
        debug_assert!(n <= blocks.reserve, "more frames populated than reserved");
        blocks.reserve = blocks.reserve.saturating_sub(n);
        blocks.free_range(start.0, n);
        self.publish(&blocks);
    }

    /// Adds one frame.
    pub fn push(&self, frame: FrameNo) {
        let mut blocks = self.lock();
        blocks.free_block(frame.0, 0);
        self.publish(&blocks);
    }

    /// Moves the last `n` frames of `from` (all of them if fewer) into the arena.
    pub fn push_batch(&self, from: &mut Vec<FrameNo>, n: usize) {
        let n = n.min(from.len());
        if n == 0 {
            return;
        }
        let start = from.len() - n;
        let mut blocks = self.lock();
        for f in from.drain(start..) {
            blocks.free_block(f.0, 0);
        }
        self.publish(&blocks);
    }

    /// Gives back the run `start .. start + 2^order` taken with [`SharedArena::pop_run`].
    pub fn push_run(&self, start: FrameNo, order: u32) {
        let mut blocks = self.lock();
        blocks.free_range(start.0, 1 << order.min(MAX_ORDER));
        self.publish(&blocks);
    }

    /// Moves up to `n` frames from the arena to the end of `into`; returns how many. The
    /// frames are cut from as few blocks as possible and appended so that popping from
    /// the end of `into` yields them in ascending order within each block.
    pub fn pop_batch(&self, into: &mut Vec<FrameNo>, n: usize) -> usize {
        if n == 0 || self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut blocks = self.lock();
        let mut got = 0;
        while got < n {
            let Some((f, k)) = blocks.alloc_up_to(order_at_most(n - got)) else {
                break;
            };
            into.extend((f..f + (1 << k)).rev().map(FrameNo));
            got += 1 << k;
        }
        self.publish(&blocks);
        got
    }

    /// Takes one frame.
    pub fn pop(&self) -> Option<FrameNo> {
        let mut blocks = self.lock();
        let frame = blocks.alloc(0).map(FrameNo);
        self.publish(&blocks);
        frame
    }

    /// Takes a naturally aligned run of `2^order` consecutive frames (`order <=`
    /// [`MAX_ORDER`]), splitting a larger block if needed; returns its first frame.
    /// `None`: no free block is that large (the caller may give lArena frames back, zero
    /// or populate more, and retry).
    pub fn pop_run(&self, order: u32) -> Option<FrameNo> {
        if order > MAX_ORDER {
            return None;
        }
        let mut blocks = self.lock();
        let frame = blocks.alloc(order).map(FrameNo);
        self.publish(&blocks);
        frame
    }

    /// Free blocks by order: `counts[k]` blocks of `2^k` frames (fragmentation report).
    pub fn blocks_by_order(&self) -> [usize; ORDERS] {
        let blocks = self.lock();
        let mut counts = [0; ORDERS];
        for (k, c) in counts.iter_mut().enumerate() {
            let mut f = blocks.heads[k];
            while f != NIL {
                *c += 1;
                f = blocks.next[f as usize];
            }
        }
        counts
    }

    /// A copy of the populated free frames held (for tests and conservation checks).
    pub fn snapshot(&self) -> Vec<FrameNo> {
        self.lock().snapshot()
    }
}

/// A worker's own arena (lArena): no locks, one owner, refilled from and spilled to the
/// [`SharedArena`] in batches.
#[derive(Debug)]
pub struct LocalArena {
    shared: Arc<SharedArena>,
    frames: Vec<FrameNo>,
    batch: usize,
    /// `frames.len()`, published for the pool's census; written only by the owner.
    published: Arc<AtomicUsize>,
}

impl LocalArena {
    /// An empty lArena over `shared`, batches of [`ARENA_BATCH`].
    pub fn new(shared: Arc<SharedArena>) -> LocalArena {
        Self::with_batch(shared, ARENA_BATCH)
    }

    /// An empty lArena with a given batch size (at least 1).
    pub fn with_batch(shared: Arc<SharedArena>, batch: usize) -> LocalArena {
        let batch = batch.max(1);
        LocalArena {
            shared,
            frames: Vec::with_capacity(2 * batch),
            batch,
            published: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn publish(&self) {
        self.published.store(self.frames.len(), Ordering::Release);
        debug_assert!(self.frames.len() < 2 * self.batch);
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// No frame held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The batch size.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The shared arena this one refills from.
    pub fn shared(&self) -> &Arc<SharedArena> {
        &self.shared
    }

    /// The published length counter (read by the pool's census from other threads).
    pub fn published_len(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.published)
    }

    /// Takes one frame, refilling a batch from the sArena when empty; `None` when both are
    /// empty.
    pub fn pop(&mut self) -> Option<FrameNo> {
        if self.frames.is_empty() {
            self.refill();
        }
        let frame = self.frames.pop();
        self.publish();
        frame
    }

    /// Moves one batch from the sArena into this arena; returns how many came.
    pub fn refill(&mut self) -> usize {
        let got = self.shared.pop_batch(&mut self.frames, self.batch);
        self.publish();
        got
    }

    /// Returns a free frame to this arena, spilling a batch to the sArena when it reaches
    /// `2 * batch` frames.
    pub fn push(&mut self, frame: FrameNo) {
        self.frames.push(frame);
        if self.frames.len() >= 2 * self.batch {
            self.shared.push_batch(&mut self.frames, self.batch);
        }
        self.publish();
    }

    /// Moves every frame to the sArena.
    pub fn drain(&mut self) {
        let n = self.frames.len();
        self.shared.push_batch(&mut self.frames, n);
        self.publish();
    }
}

impl Drop for LocalArena {
    fn drop(&mut self) {
        self.drain();
    }
}
