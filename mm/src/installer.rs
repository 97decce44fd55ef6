//! [`Installer`]: *how* pages get into and out of an address space.
//!
//! The core decides *what* happens to a page; an installer carries it out in a given
//! address space:
//!
//! | | embedded, [`InstallMode::Copy`] (default) | embedded, [`InstallMode::Move`] | daemon (implemented by the daemon) |
//! |---|---|---|---|
//! | install a frame (swap-in) | `UFFDIO_COPY` slot → page, mapped write-protected when writes are tracked; the slot's page is dropped in a batch | `UFFDIO_MOVE` pool slot → page (zero copy); `UFFDIO_COPY` when MOVE says `EBUSY` | `UFFDIO_COPY` from the daemon's slot into the tagged process (cross-mm) |
//! | first touch | `UFFDIO_COPY` from the pool's zero source (the lazy pool's slot is not even populated) | MOVE the pre-zeroed slot | COPY |
//! | take a page out (evict, sample) | `UFFDIO_MOVE` page → staging slot, same mm (a pending slot drop is flushed first) | the same | asynchronous ([`Installer::stages_async`]): the tagger's agent thread does the same-mm MOVE to its staging area, the daemon copies it into the frame's slot |
//! | swap-cache hit, sampled re-fault | COPY the staging slot back (works while the write-back reads it) | MOVE it back (COPY into a fresh frame while the write-back pins it) | `UFFDIO_COPY` from the frame's slot in the daemon |
//! | lost content | `UFFDIO_POISON` | `UFFDIO_POISON` | `UFFDIO_POISON` on the tagged process's fd |
//!
//! Why COPY: MOVE clears the slot's *present* PTE, one TLB flush per page (even in a
//! multi-page MOVE); with the process running on both CPUs (two workers, the zeroer) each
//! flush is an IPI, and in a VM an exit on both sides. COPY into an empty PTE needs no
//! flush; `process_madvise(MADV_DONTNEED)` over 64 slots flushes once (Linux 6.16+ gathers
//! the whole vector). What flushes remain with COPY installs: the eviction and sampling
//! MOVEs out (they must clear the app's PTE) and the batched drops. The swap storm's
//! profile with each mode (the flushes' share of USM's CPU) is in
//! `bench/results/storm.md`, "COPY installs instead of MOVE".
//!
//! Every method is called with the core's state lock held, on a worker, in normal
//! context. An installer never blocks on the address space it manages.

use usm_kmod::FrameNo;
use usm_kmod::pool::{FrameOwner, FramePool};

use crate::MmError;

/// What became of one frame given to [`Installer::stage_many`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// The page is out; the frame is Staging (its slot holds the page).
    Staged,
    /// The page stayed (pinned, shared, refused); the frame is still Mapped.
    Stayed,
    /// The stage was started and finishes asynchronously: the page is
    /// [`crate::PageState::Leaving`] until [`crate::WorkerMm::finish_stage`].
    Pending,
}

/// The result of installing a run of frames at consecutive pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Pages installed with their frame, which is now Mapped: moved (`InstallMode::Move`)
    /// or copied with the slot's page left for a batched drop (`InstallMode::Copy`).
    pub mapped: Vec<(u64, FrameNo)>,
    /// Pages installed by a fallback COPY when MOVE said `EBUSY` (the frame's slot was
    /// pinned or shared): the frames stay Taken; the caller gives them back.
    pub copied: Vec<(u64, FrameNo)>,
    /// Pages that were already present (`EEXIST`): nothing installed; frames stay Taken.
    pub present: Vec<(u64, FrameNo)>,
    /// Pages not installed because the address space is changing (`EAGAIN`, no
    /// progress): retry after reading the events; frames stay Taken.
    pub retry: Vec<(u64, FrameNo)>,
}

/// Takes pages into and out of one address space (see the module docs).
pub trait Installer: Send + Sync {
    /// Installs Taken `frames` (their slots hold the content: zeroes or a swapped-in page)
    /// at `start`, `start + 4096`, ... Partial multi-page moves are classified page by
    /// page (DESIGN.md: never retried blindly).
    ///
    /// The destination pages must be vacant pages of a range the core manages in this
    /// installer's address space; the core guarantees it under its lock. A present page
    /// is never overwritten (the kernel refuses with `EEXIST`).
    fn install(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError>;

    /// Takes a Mapped frame's page out of the address space into its staging slot.
    /// `Ok(true)`: the frame is Staging. `Ok(false)`: the page is pinned (in-flight
    /// O_DIRECT on it, fork-shared) and stays mapped.
    fn stage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError>;

    /// Stages a batch of Mapped frames of one address space; `out[i]` says what became of
    /// `frames[i]`. The default stages them one by one ([`Installer::stage`]); the daemon's
    /// installer queues the whole batch to the tagger's agent and answers
    /// [`StageOutcome::Pending`]: the stage finishes later, when the caller hands the
    /// agent's answer to [`crate::WorkerMm::finish_stage`].
    fn stage_many(&self, pool: &FramePool, frames: &[FrameNo], out: &mut Vec<StageOutcome>) {
        out.extend(frames.iter().map(|&f| match self.stage(pool, f) {
            Ok(true) => StageOutcome::Staged,
            _ => StageOutcome::Stayed,
        }));
    }

    /// Whether pages leave this address space only asynchronously: [`Installer::stage`]
    /// cannot, [`Installer::stage_many`] answers [`StageOutcome::Pending`] (daemon: the
    /// tagger's agent). Access sampling then queues its samples with the eviction's
    /// batch and learns their outcome at [`crate::WorkerMm::finish_stage`]. The default
    /// stages synchronously.
    fn stages_async(&self) -> bool {
        false
    }

    /// Installs a copy of a Staging frame's page (a sampled or written-back page of
    /// another space: a fork parent) at the vacant page `addr` of this space, leaving the
    /// frame as it is. `Ok(false)`: not possible here (a page is already there, or this
    /// installer cannot); an error: not now (the address space is changing). The default
    /// cannot (the embedded runtime has no fork children).
    fn copy_staged(&self, pool: &FramePool, frame: FrameNo, addr: u64) -> Result<bool, MmError> {
        let _ = (pool, frame, addr);
        Ok(false)
    }

    /// Whether stages this installer refuses now will be possible once work of its own
    /// in flight finishes (daemon: staging slots the agent is still dropping). The core
    /// counts that as reclaim in flight: a fault waits for it rather than calling the OOM
    /// policy, and whoever sees the work finish calls [`crate::MmCore::wake_memory_waiters`].
    fn busy(&self) -> bool {
        false
    }

    /// Ends the address space's process (the OOM policy's `KillLargestProcess`).
    /// Returns whether it was signalled. The default cannot (the embedded runtime is the
    /// process itself).
    fn kill(&self) -> bool {
        false
    }

    /// Swap-cache hit: puts a Staging frame's page back at its address. `Ok(true)`: the
    /// frame is Mapped again. `Ok(false)`: the staging slot is pinned by its in-flight
    /// write; the caller copies instead (see [`Installer::install`] with a fresh frame).
    fn unstage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError>;

    /// Installs Taken frames whose slots are still zeroed (first touch) at `start`, ...;
    /// same contract as [`Installer::install`]. The default installs them like any other
    /// (embedded COPY mode copies from the pool's zero source instead of the slots).
    fn install_zeroed(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        self.install(pool, frames, start, owner)
    }

    /// Marks page `addr` poisoned: accesses raise SIGBUS. `addr` is a vacant page of a
    /// range the core manages.
    fn poison(&self, pool: &FramePool, addr: u64) -> Result<(), MmError>;

    /// Starts tracking writes to the present page `addr` (embedded: asynchronous
    /// write-protection, `UFFD_FEATURE_WP_ASYNC`). `Ok(true)`: tracking is on, so
    /// [`Installer::is_written`] can later tell whether the page changed. The default
    /// tracks nothing.
    fn track_clean(&self, addr: u64) -> Result<bool, MmError> {
        let _ = addr;
        Ok(false)
    }

    /// Whether the present page `addr` was written since [`Installer::track_clean`]
    /// (embedded: `PAGEMAP_SCAN` for `PAGE_IS_WRITTEN`). The default says `true` (always
    /// write the page back).
    fn is_written(&self, addr: u64) -> Result<bool, MmError> {
        let _ = addr;
        Ok(true)
    }

    /// Drops a Mapped frame's page from a range that is going away; the frame goes to the
    /// zeroing queue. `Ok(false)`: the page was pinned and stays (the frame stays Mapped).
    /// The embedded installer in [`InstallMode::Copy`] just releases the frame and leaves
    /// the page to the caller's `munmap` of the range (no MOVE back, no TLB flush).
    fn reclaim(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError>;
}

/// How the embedded installer puts a frame's page at its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum InstallMode {
    /// `UFFDIO_MOVE` slot → page (zero copy). MOVE clears the slot's *present* PTE, which
    /// costs a TLB flush per page; while another thread of the process (the other
    /// worker, the pool's zeroer) runs on another CPU that flush is an IPI, a VM exit on
    /// both sides in a VM.
    Move,
    /// `UFFDIO_COPY` slot (or the zero source, first touch) → page: fills an empty PTE
    /// and only reads the source, so no flush; the frame is Mapped as with MOVE and its
    /// slot's now redundant page is dropped in batches (`FramePool::flush_drops`: one
    /// `process_madvise(MADV_DONTNEED)` and one flush per 64 pages), so memory stays at
    /// the pool's size. Costs a 4 KiB copy and a page allocation per page. The embedded
    /// runtime then builds its pool with lazy slots (`FramePool::new_lazy`: nothing
    /// populated; a first touch copies from the zero source and needs no slot). The
    /// default: faster than `Move` in the swap storm, at first touch and per fault — the
    /// figures, each mode against the kernel in the same run, are in `bench/results/`
    /// (`storm.md`, `fhp.md`, `usm_fault.md`, "COPY installs" sections).
    #[default]
    Copy,
}
