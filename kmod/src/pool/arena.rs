//! The two-tier frame arenas: one [`SharedArena`] (sArena) per pool, one [`LocalArena`]
//! (lArena) per worker.
//!
//! # Protocol
//!
//! - The sArena is a stack of free frame numbers behind a `usm_sync::Mutex`, touched only
//!   in batches of [`ARENA_BATCH`] frames (2 under loom), so a worker takes the lock once
//!   per batch, not once per fault.
//! - An lArena is owned by exactly one worker (`&mut self` everywhere, no lock). It pops
//!   from its own stack; when empty it *refills* one batch from the sArena; when a push
//!   takes it to `2 * batch` frames it *spills* one batch back. Dropping it spills all.
//! - Conservation: a frame number is at any time in exactly one place (the sArena, one
//!   lArena, or in the hands of whoever popped it). Each arena publishes its length
//!   (`SharedArena::len`, [`LocalArena::published_len`]) so the pool's census can add
//!   them up; the loom model in `loom-tests/tests/arena.rs` checks refill and spill from
//!   two threads lose and duplicate nothing.
//!
//! The arenas hold frame *numbers* only; the frame states live in the pool's descriptor
//! table (see [`crate::pool`]).

use crate::frame::FrameNo;
use std::vec::Vec;
use usm_sync::atomic::{AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex, MutexGuard};

/// Frames moved per refill / spill between an lArena and the sArena.
pub const ARENA_BATCH: usize = usm_sync::cfg_loom_or(64, 2);

/// The shared arena (sArena): free frames any worker may take, in batches.
#[derive(Debug)]
pub struct SharedArena {
    frames: Mutex<Vec<FrameNo>>,
    /// `frames.len()`, published after every change under the lock (read without it).
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
            frames: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
        }
    }

    /// An arena holding `frames` (the last one is handed out first).
    pub fn with_frames(frames: impl IntoIterator<Item = FrameNo>) -> SharedArena {
        let frames: Vec<FrameNo> = frames.into_iter().collect();
        let len = frames.len();
        SharedArena {
            frames: Mutex::new(frames),
            len: AtomicUsize::new(len),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<FrameNo>> {
        // A panic while holding the lock cannot leave the Vec half-updated in a way that
        // loses frames (push/truncate are atomic w.r.t. panics), so poison is ignored.
        self.frames
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Frames held now (a snapshot; exact when nobody is refilling or spilling).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// No frame held now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one frame.
    pub fn push(&self, frame: FrameNo) {
        let mut frames = self.lock();
        frames.push(frame);
        self.len.store(frames.len(), Ordering::Release);
    }

    /// Moves the last `n` frames of `from` (all of them if fewer) into the arena.
    pub fn push_batch(&self, from: &mut Vec<FrameNo>, n: usize) {
        let n = n.min(from.len());
        if n == 0 {
            return;
        }
        let start = from.len() - n;
        let mut frames = self.lock();
        frames.extend(from.drain(start..));
        self.len.store(frames.len(), Ordering::Release);
    }

    /// Moves up to `n` frames from the arena to the end of `into`; returns how many.
    pub fn pop_batch(&self, into: &mut Vec<FrameNo>, n: usize) -> usize {
        if self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut frames = self.lock();
        let n = n.min(frames.len());
        let start = frames.len() - n;
        into.extend(frames.drain(start..));
        self.len.store(frames.len(), Ordering::Release);
        n
    }

    /// Takes one frame.
    pub fn pop(&self) -> Option<FrameNo> {
        let mut frames = self.lock();
        let frame = frames.pop();
        self.len.store(frames.len(), Ordering::Release);
        frame
    }

    /// A copy of the frames held (for tests and conservation checks).
    pub fn snapshot(&self) -> Vec<FrameNo> {
        self.lock().clone()
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
