//! The frame pool (`kmod::pool`): N 4 KiB frames in one anonymous mapping, each frame a
//! *slot* whose physical page migrates with `UFFDIO_MOVE` between the pool and regions
//! registered on the same userfaultfd.
//!
//! # Memory rules
//! The pool mapping is `MADV_DONTFORK | MADV_NOHUGEPAGE`, optionally
//! `mlock2(MLOCK_ONFAULT)` ([`LockMode`]; regions and staging must then be locked the same
//! way, or MOVE fails with `EINVAL`). It is populated (and so zeroed by the kernel) in
//! chunks of [`POPULATE_CHUNK`] frames with `MADV_POPULATE_WRITE`, each chunk then
//! registered (MISSING) on the pool's userfaultfd so pages can be moved *into* its slots:
//! the first chunk at creation, the others by the background zeroer
//! ([`FramePool::spawn_zeroer`], on another core) or, when a worker runs dry first, by
//! that worker ([`FramePool::populate_next`]). Until then they are the sArena's *reserve*:
//! free, counted, handed out by nobody. So a large pool costs its population time on
//! another core, not before the first fault. A slot whose
//! page moved out is a *hole*; a hole is never touched directly (on a registered range
//! that would fault to our own handler) but refilled with `UFFDIO_COPY` from a read-only
//! zero source before the frame is handed out again.
//!
//! # Frame states (who owns the frame, what the slot holds)
//!
//! ```text
//!            take()                     install() (MOVE slot -> region)
//!   Free ─────────────► Taken ─────────────────────────────────► Mapped
//!   (arena; slot =      (caller; slot =      install_many_copy() (region at vaddr;
//!    zeroed page, or     zeroed or filled     (COPY; slot pending  slot = hole, or
//!    hole if lazy)       by the caller)        a batched drop)     PendingDrop)
//!     ▲                  by the caller)                           │   ▲
//!     │ zero_some()        │ return_unused() ──► Free              │   │ unstage()
//!     │                    │ release()                     stage() │   │ (MOVE back)
//!   Zeroing ◄──────────────┘                                       ▼   │
//!   (queue; slot = hole     ◄──── release() ─────────────────── Staging
//!    or stale data)         ◄──── release() of a Mapped frame   (slot = the region's
//!                                 whose page is gone (munmap,    page, being written
//!                                 DONTNEED, exit): slot = hole   to swap)
//! ```
//!
//! - Free frames live in the sArena (as aligned buddy blocks, or in its reserve while
//!   unpopulated) or an lArena ([`arena`]); only they are in arenas.
//! - [`FramePool::take`] (one frame, O(1) from the lArena) and [`FramePool::take_run`] (a
//!   naturally aligned run of `2^k` consecutive frames from the sArena, for a flexible
//!   huge page moved with one `UFFDIO_MOVE`) are the only ways out of an arena; they mark
//!   the frames Taken.
//! - Freed frames go through the zeroing queue: [`FramePool::zero_some`] (called by an
//!   idle worker) or the background zeroer ([`FramePool::spawn_zeroer`]) refills holes /
//!   clears stale data and pushes them to the sArena, so frames are handed out pre-zeroed
//!   and zeroing stays off the fault path. Runs come back whole: a zeroing batch is
//!   sorted, cleaned one run of consecutive slots per call, and the freed frames merge
//!   with their buddies in the sArena.
//! - **Conservation**: `free (arenas) + taken + mapped + staging + zeroing == len()`.
//!   [`FramePool::check_conservation`] verifies it against the arenas' published lengths
//!   and the zeroing queue (call it when no worker is mid-operation); every transition is
//!   a compare-and-swap on the descriptor state, checked with `debug_assert!` / a typed
//!   [`Error::FrameState`].
//!
//! # Installing by COPY, dropping slots in batches
//! MOVE clears the slot's present PTE: one TLB flush per page, an IPI whenever the process
//! also runs on another CPU (a VM exit on both sides in a VM). `install_many_copy` /
//! `unstage_copy` install with `UFFDIO_COPY` instead (fills an empty PTE, reads the source:
//! no flush). The frame becomes Mapped as with MOVE, but its slot still holds the copied
//! page: `PendingDrop`, queued in `drops`. [`FramePool::flush_drops`] drops
//! the queue with one `process_madvise(MADV_DONTNEED)` (one flush for the batch), then
//! the slots are holes; it runs when [`DROP_BATCH`] are pending (on the installing
//! thread), from the zeroer when idle, and on demand. Rules that keep it honest:
//! - A MOVE into a slot needs a hole: `stage` (and so `reclaim`) settles a pending slot
//!   first by dropping the whole batch (`settle_slot`).
//! - A Mapped frame released while pending is taken off the batch; its slot is Dirty
//!   (the zeroer clears it like any stale page), so a later drop never hits a slot that
//!   was handed out again. `flushing` is held across each drop, so a frame that left
//!   the queue is a hole once the lock is free.
//! - The pool's userfaultfd must not have `EVENT_REMOVE` (the drop would wait for the
//!   event to be read).
//!
//! So with COPY installs, `mapped` frames still hold no memory in the pool once dropped;
//! RSS exceeds the pool by at most the pending batch (64 pages).
//!
//! # Lazy slots
//! [`FramePool::new_lazy`] registers the whole pool and populates nothing: Free frames may
//! have a hole for a slot (the invariant "Free ⇒ slot zeroed" becomes "zeroed or hole"),
//! and freed holes are not refilled. A COPY install from the zero source never reads the
//! slot; whoever needs a page in a Taken frame's slot (a swap-in read, a copy, a MOVE out
//! of it) calls [`FramePool::ensure_slot`] (one COPY from the zero source, no flush).
//!
//! The memory-touching half (`install`, `install_many` for a run of pages, `install_copy`,
//! `install_many_copy`, `stage`, `unstage`, `unstage_copy`, `reclaim`, slot refill and
//! drops) is implemented in `sys::pool`, where the crate's `unsafe` lives.

pub mod arena;

use crate::error::{Error, Result};
use crate::frame::{FrameNo, PAGE_SIZE};
use crate::sys::mem::{Advice, Mapping, Protection};
use crate::uffd::{Features, RegisterMode, Userfaultfd};
use arena::{LocalArena, SharedArena};
use std::vec::Vec;
use usm_sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

pub use crate::sys::pool::CopyFrom;
pub use arena::{ARENA_BATCH, MAX_ORDER};

/// Frames populated per step (8 MiB; a multiple of `2^MAX_ORDER`, so no aligned run
/// straddles two chunks, i.e. two registrations).
pub const POPULATE_CHUNK: usize = 2048;

/// Pages in the read-only zero source used to refill holes with `UFFDIO_COPY`.
pub(crate) const ZERO_SOURCE_PAGES: usize = 64;

/// Slots of COPY-installed frames dropped per batch: when this many are pending, the
/// installing thread drops them with one `process_madvise(MADV_DONTNEED)` (one TLB
/// flush for the batch; see [`FramePool::flush_drops`]).
pub const DROP_BATCH: usize = 64;

/// Where a frame is in its life (see the module doc's diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[repr(u8)]
pub enum FrameState {
    /// In an arena, slot holds a zeroed page (or, in a lazy pool, is a hole).
    Free = 0,
    /// Handed out by [`FramePool::take`]; the taker owns it and its slot.
    Taken = 1,
    /// Its page is mapped in a region at [`FrameDesc::vaddr`]; the slot is a hole (after
    /// a COPY install: until its batched drop, the copied page).
    Mapped = 2,
    /// Its page was moved back out of a region and sits in the slot (eviction / swap cache).
    Staging = 3,
    /// In the zeroing queue.
    Zeroing = 4,
}

impl FrameState {
    fn from_u8(v: u8) -> FrameState {
        match v {
            0 => FrameState::Free,
            1 => FrameState::Taken,
            2 => FrameState::Mapped,
            3 => FrameState::Staging,
            _ => FrameState::Zeroing,
        }
    }
}

impl core::fmt::Display for FrameState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

/// What a slot holds (kept with the state so the zeroer knows how to clean it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SlotContent {
    /// A zeroed page.
    Zeroed = 0,
    /// No page (it moved out, or was dropped with its region).
    Hole = 1,
    /// A page with stale data.
    Dirty = 2,
    /// A Mapped frame installed by `UFFDIO_COPY`: the slot still holds the page that was
    /// copied (now redundant), queued for a batched `MADV_DONTNEED` (see
    /// [`FramePool::flush_drops`]); it becomes a hole then.
    PendingDrop = 3,
}

/// Who a mapped or staged frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct FrameOwner {
    /// The process (the embedded runtime's own pid in embedded mode).
    pub pid: u32,
    /// The region id within that process.
    pub region: u32,
}

/// The descriptor of one frame (`struct page`), indexed by [`FrameNo`].
///
/// Fields are atomics so any core can read them; they are *written* only by the frame's
/// current owner (per the state protocol), except the state itself, which moves by
/// compare-and-swap.
#[derive(Debug)]
pub struct FrameDesc {
    state: AtomicU8,
    slot: AtomicU8,
    owner_pid: AtomicU32,
    owner_region: AtomicU32,
    vaddr: AtomicU64,
    policy: AtomicU64,
}

impl FrameDesc {
    fn new() -> FrameDesc {
        FrameDesc {
            state: AtomicU8::new(FrameState::Free as u8),
            slot: AtomicU8::new(SlotContent::Zeroed as u8),
            owner_pid: AtomicU32::new(0),
            owner_region: AtomicU32::new(0),
            vaddr: AtomicU64::new(0),
            policy: AtomicU64::new(0),
        }
    }
    /// The current state.
    pub fn state(&self) -> FrameState {
        FrameState::from_u8(self.state.load(Ordering::Acquire))
    }
    /// The owner recorded at the last install (meaningful while Mapped / Staging).
    pub fn owner(&self) -> FrameOwner {
        FrameOwner {
            pid: self.owner_pid.load(Ordering::Relaxed),
            region: self.owner_region.load(Ordering::Relaxed),
        }
    }
    /// The virtual address of the page in its region (meaningful while Mapped / Staging).
    pub fn vaddr(&self) -> u64 {
        self.vaddr.load(Ordering::Relaxed)
    }
    /// The policy slot: a `u64` the alloc/evict policy owns (an index into its own lists),
    /// for O(1) back-links from a frame to the policy's bookkeeping.
    pub fn policy(&self) -> u64 {
        self.policy.load(Ordering::Relaxed)
    }
    /// Sets the policy slot.
    pub fn set_policy(&self, value: u64) {
        self.policy.store(value, Ordering::Relaxed);
    }
    pub(crate) fn slot(&self) -> SlotContent {
        match self.slot.load(Ordering::Relaxed) {
            0 => SlotContent::Zeroed,
            1 => SlotContent::Hole,
            3 => SlotContent::PendingDrop,
            _ => SlotContent::Dirty,
        }
    }
    pub(crate) fn set_slot(&self, content: SlotContent) {
        self.slot.store(content as u8, Ordering::Relaxed);
    }
    pub(crate) fn set_mapping(&self, owner: FrameOwner, vaddr: u64) {
        self.owner_pid.store(owner.pid, Ordering::Relaxed);
        self.owner_region.store(owner.region, Ordering::Relaxed);
        self.vaddr.store(vaddr, Ordering::Relaxed);
    }
}

/// Whether the pool's pages are locked in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum LockMode {
    /// Not locked (regions and staging must not be locked either).
    #[default]
    Unlocked,
    /// `mlock2(MLOCK_ONFAULT)` (regions and staging must be locked the same way).
    OnFault,
}

/// How to build a [`FramePool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Number of 4 KiB frames.
    pub frames: usize,
    /// Lock state of the pool mapping.
    pub lock: LockMode,
}

/// Frame counts by state, and where the free ones are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Census {
    /// Frames in the pool.
    pub total: usize,
    /// Free frames (descriptor state).
    pub free: usize,
    /// Of which in the sArena (published length).
    pub free_shared: usize,
    /// Of which in lArenas (published lengths).
    pub free_local: usize,
    /// Of the sArena's, frames not populated yet (its reserve).
    pub unpopulated: usize,
    /// Taken.
    pub taken: usize,
    /// Mapped.
    pub mapped: usize,
    /// Staging.
    pub staging: usize,
    /// Zeroing (descriptor state).
    pub zeroing: usize,
    /// Length of the zeroing queue.
    pub zeroing_queued: usize,
}

impl core::fmt::Display for Census {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "total {} = free {} (sArena {} [unpopulated {}] + lArenas {}) + taken {} + mapped {} + staging {} + zeroing {} (queued {})",
            self.total,
            self.free,
            self.free_shared,
            self.unpopulated,
            self.free_local,
            self.taken,
            self.mapped,
            self.staging,
            self.zeroing,
            self.zeroing_queued
        )
    }
}

/// The frame pool. Shared as `Arc<FramePool>` by every worker; each worker takes frames
/// through its own [`LocalArena`] from [`FramePool::local_arena`].
#[derive(Debug)]
pub struct FramePool {
    pub(crate) mem: Mapping,
    pub(crate) zero_source: Mapping,
    pub(crate) descs: Vec<FrameDesc>,
    pub(crate) uffd: Option<Arc<Userfaultfd>>,
    shared: Arc<SharedArena>,
    zeroing: Mutex<Vec<FrameNo>>,
    zeroing_len: AtomicUsize,
    locals: Mutex<Vec<Arc<AtomicUsize>>>,
    /// Chunks not populated yet, highest index first (popped from the end).
    unpopulated_chunks: Mutex<Vec<usize>>,
    config: PoolConfig,
    #[cfg(not(loom))]
    zeroer_signal: (Mutex<()>, usm_sync::Condvar),
    /// Mapped frames whose slot is `PendingDrop` (pushed by COPY installs).
    pub(crate) drops: Mutex<Vec<FrameNo>>,
    pub(crate) drops_len: AtomicUsize,
    /// Held by whoever drops a batch, for the whole `MADV_DONTNEED`: a frame taken out of
    /// `drops` is a hole once this lock is free again (see [`FramePool::settle_slot`]).
    pub(crate) flushing: Mutex<()>,
    /// A pidfd of our own process for `process_madvise` (`None`: plain `madvise`).
    pub(crate) self_pidfd: Option<crate::sys::mem::SelfPidfd>,
    /// Batches dropped and slots dropped (statistics).
    pub(crate) drop_counts: (AtomicU64, AtomicU64),
    /// Lazy slots ([`FramePool::new_lazy`]): a Free frame's slot may be a hole.
    pub(crate) lazy: bool,
}

impl FramePool {
    /// Maps, advises, (optionally) locks the pool, populates its first
    /// [`POPULATE_CHUNK`] frames and — when `uffd` is given — registers them (MISSING) on
    /// it. Every frame starts Free in the sArena: zeroed in a block, or in its reserve
    /// until populated. Without a userfaultfd the pool cannot move pages (tests of
    /// policies, or bookkeeping-only users).
    pub fn new(config: PoolConfig, uffd: Option<Arc<Userfaultfd>>) -> Result<Arc<FramePool>> {
        Self::build(config, uffd, false)
    }

    /// A pool with *lazy slots*, for installing by `UFFDIO_COPY`: the whole mapping is
    /// registered at once and nothing is populated; every frame starts Free with a hole
    /// for a slot, and a freed frame's hole is not refilled. A first-touch install copies
    /// from the zero source and never needs the slot; whoever needs a real page in a
    /// Taken frame's slot (a swap-in read, a copy into it, a MOVE out of it) calls
    /// [`FramePool::ensure_slot`] first (one `UFFDIO_COPY` from the zero source, no TLB
    /// flush). So the pool costs no population time and its memory is only what was
    /// used. Needs a userfaultfd.
    pub fn new_lazy(config: PoolConfig, uffd: Arc<Userfaultfd>) -> Result<Arc<FramePool>> {
        Self::build(config, Some(uffd), true)
    }

    /// Whether slots are lazy ([`FramePool::new_lazy`]).
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    fn build(
        config: PoolConfig,
        uffd: Option<Arc<Userfaultfd>>,
        lazy: bool,
    ) -> Result<Arc<FramePool>> {
        if config.frames == 0 || config.frames > u32::MAX as usize {
            return Err(Error::InvalidArgument(
                "pool size must be 1..=u32::MAX frames",
            ));
        }
        if let Some(u) = &uffd {
            if !u.features().contains(Features::MOVE) {
                return Err(Error::MissingFeature {
                    feature: Features::MOVE,
                    name: "MOVE".into(),
                    since: Features::MOVE.since(),
                    offered: u.offered_features(),
                });
            }
        }
        let len = config.frames * PAGE_SIZE;
        let mem = Mapping::anonymous(len, Protection::ReadWrite)?;
        mem.advise(0, len, Advice::DontFork)?;
        mem.advise(0, len, Advice::NoHugePage)?;
        if config.lock == LockMode::OnFault {
            mem.mlock_onfault()?;
        }
        let first = if lazy {
            if let Some(u) = &uffd {
                u.register(mem.addr(), len as u64, RegisterMode::MISSING)?;
            }
            config.frames
        } else {
            let first = config.frames.min(POPULATE_CHUNK);
            Self::populate_range(&mem, uffd.as_deref(), 0, first)?;
            first
        };
        let zero_source = Mapping::anonymous(ZERO_SOURCE_PAGES * PAGE_SIZE, Protection::Read)?;
        let descs: Vec<FrameDesc> = (0..config.frames).map(|_| FrameDesc::new()).collect();
        if lazy {
            for d in &descs {
                d.set_slot(SlotContent::Hole);
            }
        }
        let shared = Arc::new(SharedArena::with_reserve(config.frames, first));
        let chunks = config.frames.div_ceil(POPULATE_CHUNK);
        let unpopulated_chunks = Mutex::new(if lazy {
            Vec::new()
        } else {
            (1..chunks).rev().collect()
        });
        // Without it, drops fall back to one madvise per run of slots.
        let self_pidfd = match &uffd {
            Some(_) => crate::sys::mem::SelfPidfd::open().ok(),
            None => None,
        };
        Ok(Arc::new(FramePool {
            mem,
            zero_source,
            descs,
            uffd,
            shared,
            zeroing: Mutex::new(Vec::new()),
            zeroing_len: AtomicUsize::new(0),
            locals: Mutex::new(Vec::new()),
            unpopulated_chunks,
            config,
            #[cfg(not(loom))]
            zeroer_signal: (Mutex::new(()), usm_sync::Condvar::new()),
            drops: Mutex::new(Vec::with_capacity(DROP_BATCH)),
            drops_len: AtomicUsize::new(0),
            flushing: Mutex::new(()),
            self_pidfd,
            drop_counts: (AtomicU64::new(0), AtomicU64::new(0)),
            lazy,
        }))
    }

    /// Populates frames `first .. first + n` of `mem` (the kernel zeroes them) and
    /// registers them (MISSING) on `uffd`.
    fn populate_range(
        mem: &Mapping,
        uffd: Option<&Userfaultfd>,
        first: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (offset, len) = (first * PAGE_SIZE, n * PAGE_SIZE);
        mem.advise(offset, len, Advice::PopulateWrite)?;
        if let Some(u) = uffd {
            u.register(
                mem.addr() + offset as u64,
                len as u64,
                RegisterMode::MISSING,
            )?;
        }
        Ok(())
    }

    /// Populates and registers the next unpopulated chunk of the pool and moves its
    /// frames from the sArena's reserve into its free blocks. Returns how many frames
    /// came (0: the whole pool is populated). Safe to call from several threads: each
    /// call claims a different chunk. On an error the chunk stays unpopulated (retried by
    /// a later call).
    pub fn populate_next(&self) -> Result<usize> {
        let chunk = {
            let mut q = self
                .unpopulated_chunks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match q.pop() {
                Some(c) => c,
                None => return Ok(0),
            }
        };
        let first = chunk * POPULATE_CHUNK;
        let n = POPULATE_CHUNK.min(self.descs.len() - first);
        if let Err(e) = Self::populate_range(&self.mem, self.uffd.as_deref(), first, n) {
            self.unpopulated_chunks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(chunk);
            return Err(e);
        }
        self.shared.add_populated(FrameNo(first as u32), n);
        Ok(n)
    }

    /// Populates the whole pool now (callers that want no population later, e.g. before
    /// a latency measurement).
    pub fn populate_all(&self) -> Result<()> {
        while self.populate_next()? > 0 {}
        Ok(())
    }

    /// Frames not populated yet.
    pub fn unpopulated(&self) -> usize {
        self.shared.reserve()
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.descs.len()
    }
    /// Never true (a pool has at least one frame).
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }
    /// The configuration.
    pub fn config(&self) -> PoolConfig {
        self.config
    }
    /// The userfaultfd the pool is registered on.
    pub fn userfaultfd(&self) -> Option<&Arc<Userfaultfd>> {
        self.uffd.as_ref()
    }
    /// First byte of the pool mapping.
    pub fn base(&self) -> u64 {
        self.mem.addr()
    }
    /// The pool mapping itself (read frame contents with its atomic accessors).
    pub fn memory(&self) -> &Mapping {
        &self.mem
    }
    /// The address of a frame's slot.
    pub fn slot_addr(&self, frame: FrameNo) -> u64 {
        self.mem.addr() + (frame.index() * PAGE_SIZE) as u64
    }
    /// The frame whose slot contains `addr`.
    pub fn frame_at(&self, addr: u64) -> Option<FrameNo> {
        let off = addr.checked_sub(self.mem.addr())? as usize;
        (off < self.mem.len()).then_some(FrameNo((off / PAGE_SIZE) as u32))
    }
    /// A frame's descriptor.
    pub fn desc(&self, frame: FrameNo) -> Result<&FrameDesc> {
        self.descs.get(frame.index()).ok_or(Error::NoSuchFrame {
            frame,
            len: self.descs.len(),
        })
    }

    /// Records that the page of a Mapped, Staging or sampled frame now belongs at `vaddr`
    /// of `owner` (the program `mremap`ped it, or a fork child took it over): later
    /// stages and installs of the frame use the new address.
    pub fn set_owner(&self, frame: FrameNo, owner: FrameOwner, vaddr: u64) -> Result<()> {
        self.desc(frame)?.set_mapping(owner, vaddr);
        Ok(())
    }

    /// The sArena.
    pub fn shared_arena(&self) -> &Arc<SharedArena> {
        &self.shared
    }

    /// A new lArena for one worker, counted in the census.
    pub fn local_arena(&self) -> LocalArena {
        let local = LocalArena::new(Arc::clone(&self.shared));
        self.locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(local.published_len());
        local
    }

    /// Moves a frame's state `from` → `to`; a mismatch is [`Error::FrameState`].
    pub(crate) fn transition(
        &self,
        frame: FrameNo,
        from: FrameState,
        to: FrameState,
    ) -> Result<&FrameDesc> {
        let desc = self.desc(frame)?;
        desc.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|actual| Error::FrameState {
                frame,
                expected: from,
                actual: FrameState::from_u8(actual),
            })?;
        Ok(desc)
    }

    /// Takes a pre-zeroed frame from the worker's lArena (refilling from the sArena; when
    /// both are empty, zeroing one batch inline first, else populating the next chunk).
    /// The frame is Taken: the caller installs it, fills it (swap-in) or gives it back.
    /// `None`: the pool is exhausted.
    pub fn take(&self, local: &mut LocalArena) -> Result<Option<FrameNo>> {
        let frame = match local.pop() {
            Some(f) => f,
            None => {
                if self.zero_some(local.batch())? == 0 && self.populate_next()? == 0 {
                    return Ok(None);
                }
                match local.pop() {
                    Some(f) => f,
                    None => return Ok(None),
                }
            }
        };
        let transitioned = self.transition(frame, FrameState::Free, FrameState::Taken);
        debug_assert!(
            transitioned.is_ok(),
            "arena held a non-free frame: {transitioned:?}"
        );
        transitioned?;
        Ok(Some(frame))
    }

    /// Takes a naturally aligned run of `2^order` consecutive pre-zeroed frames
    /// (`order <=` [`MAX_ORDER`]; slots `first .. first + 2^order`, `first` a multiple of
    /// `2^order`) straight from the sArena, for a flexible huge page that then moves with
    /// one `UFFDIO_MOVE`. All frames are Taken. When no block is that large it serves the
    /// zeroing queue, then populates the next chunk, then gives the worker's lArena back
    /// to the sArena (its frames may complete a block), retrying after each step.
    /// `None`: no such run exists now (take single frames instead).
    pub fn take_run(&self, local: &mut LocalArena, order: u32) -> Result<Option<FrameNo>> {
        if order > MAX_ORDER {
            return Err(Error::InvalidArgument("run order above MAX_ORDER"));
        }
        let pages = 1usize << order;
        let mut step = 0;
        let first = loop {
            if let Some(f) = self.shared.pop_run(order) {
                break f;
            }
            let progressed = match step {
                0 => self.zero_some(pages.max(local.batch()))? > 0,
                1 => self.populate_next()? > 0,
                2 => {
                    let had = local.len();
                    local.drain();
                    had > 0
                }
                _ => return Ok(None),
            };
            if !progressed {
                step += 1;
            }
        };
        for i in 0..pages as u32 {
            let frame = FrameNo(first.0 + i);
            if let Err(e) = self.transition(frame, FrameState::Free, FrameState::Taken) {
                debug_assert!(false, "sArena held a non-free frame: {e}");
                // Undo: the frames before it go back to Free, the run back to the arena
                // (the odd frame is left as it is and reported).
                for j in 0..i {
                    let _ =
                        self.transition(FrameNo(first.0 + j), FrameState::Taken, FrameState::Free);
                }
                self.shared.push_run(first, order);
                return Err(e);
            }
        }
        Ok(Some(first))
    }

    /// Gives back a Taken frame whose slot was *not* written (still zeroed) straight to the
    /// worker's lArena.
    pub fn return_unused(&self, local: &mut LocalArena, frame: FrameNo) -> Result<()> {
        let desc = self.transition(frame, FrameState::Taken, FrameState::Free)?;
        if desc.slot() != SlotContent::Hole {
            desc.set_slot(SlotContent::Zeroed);
        }
        local.push(frame);
        Ok(())
    }

    /// Frees a frame: Taken (slot possibly written), Staging (slot holds the old page), or
    /// Mapped whose page is already gone from the region (munmap / DONTNEED / exit: the
    /// slot is a hole). The frame joins the zeroing queue.
    pub fn release(&self, frame: FrameNo) -> Result<()> {
        let desc = self.desc(frame)?;
        let state = desc.state();
        let slot = match state {
            // A lazy slot nobody filled stays a hole.
            FrameState::Taken if desc.slot() == SlotContent::Hole => SlotContent::Hole,
            FrameState::Taken | FrameState::Staging => SlotContent::Dirty,
            // A slot still holding the copied page is cleared by the zeroer like any
            // stale page (no drop needed).
            FrameState::Mapped if self.settle_slot(frame, false)? == SlotContent::Dirty => {
                SlotContent::Dirty
            }
            FrameState::Mapped => SlotContent::Hole,
            other => {
                return Err(Error::FrameState {
                    frame,
                    expected: FrameState::Taken,
                    actual: other,
                });
            }
        };
        self.transition(frame, state, FrameState::Zeroing)?;
        desc.set_slot(slot);
        desc.set_mapping(FrameOwner::default(), 0);
        self.enqueue_zeroing(frame);
        Ok(())
    }

    pub(crate) fn enqueue_zeroing(&self, frame: FrameNo) {
        let mut q = self.zeroing.lock().unwrap_or_else(|p| p.into_inner());
        q.push(frame);
        self.zeroing_len.store(q.len(), Ordering::Release);
        drop(q);
        #[cfg(not(loom))]
        self.zeroer_signal.1.notify_one();
    }

    /// Frames waiting to be zeroed.
    pub fn zeroing_len(&self) -> usize {
        self.zeroing_len.load(Ordering::Acquire)
    }

    /// Slots of COPY-installed frames waiting for their batched drop.
    pub fn pending_drops(&self) -> usize {
        self.drops_len.load(Ordering::Acquire)
    }

    /// `(batches, slots)` dropped so far by [`FramePool::flush_drops`].
    pub fn drop_stats(&self) -> (u64, u64) {
        (
            self.drop_counts.0.load(Ordering::Relaxed),
            self.drop_counts.1.load(Ordering::Relaxed),
        )
    }

    /// Queues the slots of frames just installed by COPY (now Mapped, slot
    /// `PendingDrop`) for a batched drop; drops the batch at once when it
    /// reaches [`DROP_BATCH`] and nobody else is dropping.
    /// A failed drop is logged and the slots stay pending (retried by the next flush).
    pub(crate) fn queue_drops(&self, frames: impl IntoIterator<Item = FrameNo>) {
        let full = {
            let mut q = self.drops.lock().unwrap_or_else(|p| p.into_inner());
            q.extend(frames);
            self.drops_len.store(q.len(), Ordering::Release);
            q.len() >= DROP_BATCH
        };
        if full
            && let Ok(guard) = self.flushing.try_lock()
            && let Err(e) = self.flush_locked(&guard)
        {
            tracing::warn!(error = %e, "dropping copied slots failed; they stay pending");
        }
    }

    /// Drops every pending slot of COPY-installed frames now (`MADV_DONTNEED`, one
    /// `process_madvise` call and so one TLB flush per [`DROP_BATCH`]); their slots become
    /// holes. Returns how many. Called when a batch fills, before a pending slot is
    /// needed as a hole, by the background zeroer when idle, and by anyone who wants the
    /// pool's memory back to its size (RSS ≈ pool) now.
    pub fn flush_drops(&self) -> Result<usize> {
        if self.pending_drops() == 0 {
            return Ok(0);
        }
        let guard = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(&guard)
    }

    fn flush_locked(&self, _flushing: &usm_sync::MutexGuard<'_, ()>) -> Result<usize> {
        let batch = {
            let mut q = self.drops.lock().unwrap_or_else(|p| p.into_inner());
            let batch = std::mem::take(&mut *q);
            self.drops_len.store(0, Ordering::Release);
            batch
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.drop_slots(&batch) {
            // Nothing dropped for sure: keep them pending (a later flush retries).
            let mut q = self.drops.lock().unwrap_or_else(|p| p.into_inner());
            q.extend(batch);
            self.drops_len.store(q.len(), Ordering::Release);
            return Err(e);
        }
        for &f in &batch {
            self.desc(f)?.set_slot(SlotContent::Hole);
        }
        self.drop_counts.0.fetch_add(1, Ordering::Relaxed);
        self.drop_counts
            .1
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(batch.len())
    }

    /// Settles the slot of a Mapped frame that is about to leave the Mapped state: if
    /// its copied page is still pending a drop, either drop the whole pending batch now
    /// (`need_hole`: the slot must be a hole, e.g. a MOVE into it follows) or take the
    /// frame off the batch, leaving its slot `Dirty` (the zeroer clears it).
    /// Holding `flushing` means no drop of this frame is in progress. Returns the slot
    /// content afterwards.
    pub(crate) fn settle_slot(&self, frame: FrameNo, need_hole: bool) -> Result<SlotContent> {
        let desc = self.desc(frame)?;
        if desc.slot() != SlotContent::PendingDrop {
            return Ok(desc.slot());
        }
        let guard = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        if desc.slot() != SlotContent::PendingDrop {
            // Dropped by a flush that finished while we waited.
            return Ok(desc.slot());
        }
        if need_hole {
            self.flush_locked(&guard)?;
        } else {
            let mut q = self.drops.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = q.iter().position(|&f| f == frame) {
                q.swap_remove(i);
                self.drops_len.store(q.len(), Ordering::Release);
            }
            desc.set_slot(SlotContent::Dirty);
        }
        Ok(desc.slot())
    }

    /// Serves the zeroing queue: up to `budget` frames are cleaned (holes refilled with
    /// `UFFDIO_COPY` from a zero source, stale pages cleared), marked Free and pushed to the
    /// sArena. Returns how many. Called by idle workers or the background zeroer.
    pub fn zero_some(&self, budget: usize) -> Result<usize> {
        if budget == 0 || self.zeroing_len() == 0 {
            return Ok(0);
        }
        let mut batch = {
            let mut q = self.zeroing.lock().unwrap_or_else(|p| p.into_inner());
            let n = budget.min(q.len());
            let start = q.len() - n;
            let batch: Vec<FrameNo> = q.drain(start..).collect();
            self.zeroing_len.store(q.len(), Ordering::Release);
            batch
        };
        batch.sort_unstable();
        if let Err(e) = self.clean_slots(&batch) {
            // Leave them queued for a later attempt: nothing is lost.
            for f in batch {
                self.enqueue_zeroing(f);
            }
            return Err(e);
        }
        for &f in &batch {
            let desc = self.transition(f, FrameState::Zeroing, FrameState::Free)?;
            if !(self.lazy && desc.slot() == SlotContent::Hole) {
                desc.set_slot(SlotContent::Zeroed);
            }
        }
        let n = batch.len();
        self.shared.push_batch(&mut batch, n);
        Ok(n)
    }

    /// Counts frames by state and where the free ones are.
    pub fn census(&self) -> Census {
        let mut c = Census {
            total: self.descs.len(),
            ..Census::default()
        };
        for d in &self.descs {
            match d.state() {
                FrameState::Free => c.free += 1,
                FrameState::Taken => c.taken += 1,
                FrameState::Mapped => c.mapped += 1,
                FrameState::Staging => c.staging += 1,
                FrameState::Zeroing => c.zeroing += 1,
            }
        }
        c.free_shared = self.shared.len();
        c.unpopulated = self.shared.reserve();
        c.free_local = self
            .locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| l.load(Ordering::Acquire))
            .sum();
        c.zeroing_queued = self.zeroing_len();
        c
    }

    /// Checks frame conservation: the states add up to the pool size, the free frames are
    /// exactly those in the arenas, and the zeroing ones exactly those queued. Call when
    /// no worker is in the middle of a take / give / refill.
    pub fn check_conservation(&self) -> Result<Census> {
        let c = self.census();
        let states = c.free + c.taken + c.mapped + c.staging + c.zeroing;
        if states != c.total
            || c.free != c.free_shared + c.free_local
            || c.zeroing != c.zeroing_queued
        {
            return Err(Error::Conservation(c.to_string()));
        }
        Ok(c)
    }
}

impl Drop for FramePool {
    /// Unregisters the pool from its userfaultfd before the mapping is unmapped: with
    /// `EVENT_UNMAP` enabled, unmapping a registered range would wait until the event is
    /// read, which deadlocks if the reader is the dropping thread.
    fn drop(&mut self) {
        if let Some(u) = &self.uffd {
            if let Err(e) = u.unregister(self.mem.addr(), self.mem.len() as u64) {
                tracing::warn!(error = %e, "unregistering the frame pool failed");
            }
        }
    }
}

#[cfg(not(loom))]
mod zeroer {
    use super::FramePool;
    use std::time::Duration;
    use usm_sync::Arc;
    use usm_sync::atomic::{AtomicBool, Ordering};
    use usm_sync::thread::JoinHandle;

    /// The background zeroing thread of a pool; stops and joins on drop.
    #[derive(Debug)]
    pub struct ZeroerHandle {
        stop: Arc<AtomicBool>,
        pool: Arc<FramePool>,
        thread: Option<JoinHandle<()>>,
    }

    impl FramePool {
        /// Starts a thread that serves the zeroing queue `budget` frames at a time and,
        /// while the queue is empty, populates the rest of the pool a chunk at a time
        /// ([`FramePool::populate_next`]); it sleeps when there is neither. Errors are
        /// logged and retried after a pause.
        pub fn spawn_zeroer(self: &Arc<Self>, budget: usize) -> ZeroerHandle {
            let stop = Arc::new(AtomicBool::new(false));
            let (pool, flag) = (Arc::clone(self), Arc::clone(&stop));
            let thread = usm_sync::thread::spawn(move || {
                let mut idle = false;
                while !flag.load(Ordering::Acquire) {
                    // Zeroing first (it feeds faults now), then populating the rest of
                    // the pool a chunk at a time; once idle for a whole wait, dropping
                    // the copied slots left pending below a full batch (RSS back to the
                    // pool's size when the program goes quiet).
                    let work = match pool.zero_some(budget) {
                        Ok(0) => pool.populate_next(),
                        other => other,
                    };
                    let work = match work {
                        Ok(0) if idle && pool.pending_drops() > 0 => pool.flush_drops(),
                        other => other,
                    };
                    idle = matches!(work, Ok(0));
                    match work {
                        Ok(0) => {
                            let (lock, cv) = &pool.zeroer_signal;
                            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                            if pool.zeroing_len() == 0 && !flag.load(Ordering::Acquire) {
                                let _ = cv.wait_timeout(guard, Duration::from_millis(5));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // EAGAIN (an address-space event is unread) is expected and
                            // clears once the reader catches up; anything else is not.
                            if e.is_retryable() {
                                tracing::debug!(error = %e, "frame zeroing deferred");
                            } else {
                                tracing::warn!(error = %e, "frame zeroing failed; retrying");
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            });
            ZeroerHandle {
                stop,
                pool: Arc::clone(self),
                thread: Some(thread),
            }
        }
    }

    impl Drop for ZeroerHandle {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            self.pool.zeroer_signal.1.notify_all();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(not(loom))]
pub use zeroer::ZeroerHandle;
