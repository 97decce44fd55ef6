//! The memory-touching half of [`FramePool`]: moving pages between slots and regions,
//! and cleaning slots for the zeroing queue. See [`crate::pool`] for the state protocol.

use crate::error::{Error, Result};
use crate::frame::{FrameNo, PAGE_SIZE};
use crate::pool::{FrameOwner, FramePool, FrameState, SlotContent, ZERO_SOURCE_PAGES};
use crate::uffd::{CopyMode, MoveMode, Resolved};

const PAGE: u64 = PAGE_SIZE as u64;

/// Where a COPY install reads the page content from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFrom {
    /// The frames' own slots (a swapped-in page, a staged page).
    Slots,
    /// The pool's read-only zero source (first touch: the slots are zeroed anyway, and
    /// the zero source is one cache-hot page).
    Zero,
}

impl FramePool {
    fn uffd_or_err(&self) -> Result<&crate::Userfaultfd> {
        self.uffd.as_deref().ok_or(Error::NoUserfaultfd)
    }

    /// COPY installs leave slot pages to drop with `MADV_DONTNEED`, which on a
    /// userfaultfd with `EVENT_REMOVE` would wait until the event is read.
    fn uffd_for_copy_install(&self) -> Result<&crate::Userfaultfd> {
        let uffd = self.uffd_or_err()?;
        if uffd.features().contains(crate::Features::EVENT_REMOVE) {
            return Err(Error::InvalidArgument(
                "COPY installs need a userfaultfd without EVENT_REMOVE",
            ));
        }
        Ok(uffd)
    }

    fn expect_state(&self, frame: FrameNo, expected: FrameState) -> Result<()> {
        let actual = self.desc(frame)?.state();
        if actual != expected {
            return Err(Error::FrameState {
                frame,
                expected,
                actual,
            });
        }
        Ok(())
    }

    /// Installs a Taken frame at `dst` with `UFFDIO_MOVE` (zero copy). On
    /// [`Resolved::Done`] the frame is Mapped (owner and `dst` recorded, slot a hole); on
    /// any other state it stays Taken and the caller decides ([`Resolved::UseCopy`] →
    /// [`FramePool::install_copy`]; [`Resolved::AlreadyMapped`] → give the frame back and
    /// wake; [`Resolved::MmapChanging`] → read events, retry).
    ///
    /// # Safety
    /// - `dst` is a missing page of a region the caller manages, registered on the pool's
    ///   userfaultfd with the pool's protection and lock state.
    /// - The caller owns `frame` (it took it) and nobody accesses its slot concurrently.
    pub unsafe fn install(
        &self,
        frame: FrameNo,
        dst: u64,
        owner: FrameOwner,
        mode: MoveMode,
    ) -> Result<Resolved> {
        let uffd = self.uffd_or_err()?;
        self.expect_state(frame, FrameState::Taken)?;
        self.ensure_slot(frame)?;
        // SAFETY: the caller owns `dst` (missing page of its region) and the Taken frame's
        // slot (contract above).
        let r = unsafe { uffd.move_pages(dst, self.slot_addr(frame), PAGE, mode)? };
        if r.is_done() {
            let desc = self.transition(frame, FrameState::Taken, FrameState::Mapped)?;
            desc.set_slot(SlotContent::Hole);
            desc.set_mapping(owner, dst);
        }
        Ok(r)
    }

    /// Installs Taken frames at consecutive pages: `frames[i]` at `dst + i * 4096` (a
    /// flexible huge page). Runs of consecutive frame numbers move with one `UFFDIO_MOVE`
    /// each (frames refilled from a fresh sArena come out consecutive), so a 16-frame run
    /// costs one ioctl instead of 16.
    ///
    /// Returns [`Resolved::Done`] when all moved; otherwise [`Resolved::Partial`] with the
    /// bytes installed before the first page that did not move, or — when nothing moved —
    /// that page's state ([`Resolved::AlreadyMapped`], [`Resolved::UseCopy`],
    /// [`Resolved::MmapChanging`]). Installed frames are Mapped, the rest stay Taken. On
    /// an error, frames installed before it are Mapped as well.
    ///
    /// # Safety
    /// Same as [`FramePool::install`], for every page of `[dst, dst + frames.len() * 4096)`.
    pub unsafe fn install_many(
        &self,
        frames: &[FrameNo],
        dst: u64,
        owner: FrameOwner,
        mode: MoveMode,
    ) -> Result<Resolved> {
        let uffd = self.uffd_or_err()?;
        for &f in frames {
            self.expect_state(f, FrameState::Taken)?;
            self.ensure_slot(f)?;
        }
        let mut done = 0usize;
        while done < frames.len() {
            let mut run = 1;
            while done + run < frames.len() && frames[done + run].0 == frames[done].0 + run as u32 {
                run += 1;
            }
            let at = dst + done as u64 * PAGE;
            // SAFETY: the caller owns the destination pages and the Taken frames' slots
            // (contract above); the run's slots are consecutive in the pool mapping.
            let r = unsafe {
                uffd.move_pages(at, self.slot_addr(frames[done]), run as u64 * PAGE, mode)?
            };
            let moved = (r.bytes() / PAGE) as usize;
            for (i, &f) in frames[done..done + moved].iter().enumerate() {
                let desc = self.transition(f, FrameState::Taken, FrameState::Mapped)?;
                desc.set_slot(SlotContent::Hole);
                desc.set_mapping(owner, at + i as u64 * PAGE);
            }
            done += moved;
            if !r.is_done() {
                return Ok(if done > 0 {
                    Resolved::Partial(done as u64 * PAGE)
                } else {
                    r
                });
            }
        }
        Ok(Resolved::Done(done as u64 * PAGE))
    }

    /// Installs Taken frames at consecutive pages by `UFFDIO_COPY` instead of MOVE:
    /// `frames[i]`'s content (its slot, or zeroes) at `dst + i * 4096`. COPY fills an
    /// empty destination PTE and only *reads* the source, so unlike MOVE — which clears
    /// the present source PTE and flushes the TLB for it, one cross-CPU IPI per page
    /// while another thread of this mm runs elsewhere — it needs no TLB flush. Installed
    /// frames are Mapped, with their slot `PendingDrop`: the slot's page
    /// is now redundant and is dropped in a batch ([`FramePool::flush_drops`], one flush
    /// per [`crate::pool::DROP_BATCH`] pages), or settled first when the frame leaves
    /// Mapped. One COPY per run of consecutive frames ([`CopyFrom::Slots`]) or per 64
    /// pages ([`CopyFrom::Zero`]). `mode` is passed on (`CopyMode::WP` maps the pages
    /// write-protected, which a later `UFFDIO_WRITEPROTECT` would do with one TLB flush
    /// per page).
    ///
    /// Returns like [`FramePool::install_many`]: [`Resolved::Done`], or
    /// [`Resolved::Partial`] with the bytes installed before the first page that was not,
    /// or that page's state when none was ([`Resolved::AlreadyMapped`],
    /// [`Resolved::MmapChanging`]). Frames not installed stay Taken with their slot as it
    /// was.
    ///
    /// # Safety
    /// Same as [`FramePool::install`], for every page of `[dst, dst + frames.len() * 4096)`.
    pub unsafe fn install_many_copy(
        &self,
        frames: &[FrameNo],
        dst: u64,
        owner: FrameOwner,
        from: CopyFrom,
        mode: CopyMode,
    ) -> Result<Resolved> {
        let uffd = self.uffd_for_copy_install()?;
        // SAFETY: forwarded contract; the pool's own fd serves the regions here.
        unsafe { self.install_many_copy_into(uffd, frames, dst, owner, from, mode) }
    }

    /// [`FramePool::install_many_copy`] into the address space of `dst_uffd`, which may
    /// be another process's (the daemon installs into tagged programs: `UFFDIO_COPY` reads
    /// the source in the caller's address space and fills the page in the fd's). The
    /// slots stay ours and are dropped in batches as usual.
    ///
    /// # Safety
    /// Same as [`FramePool::install`], with `dst_uffd` in place of the pool's fd: every
    /// page of `[dst, dst + frames.len() * 4096)` is a missing page the caller manages in
    /// the address space `dst_uffd` serves.
    pub unsafe fn install_many_copy_into(
        &self,
        uffd: &crate::Userfaultfd,
        frames: &[FrameNo],
        dst: u64,
        owner: FrameOwner,
        from: CopyFrom,
        mode: CopyMode,
    ) -> Result<Resolved> {
        self.uffd_for_copy_install()?;
        for &f in frames {
            self.expect_state(f, FrameState::Taken)?;
            if from == CopyFrom::Slots {
                self.ensure_slot(f)?;
            }
        }
        let mut done = 0usize;
        let mut result = Ok(Resolved::Done(0));
        while done < frames.len() {
            let run = match from {
                CopyFrom::Slots => {
                    let mut run = 1;
                    while done + run < frames.len()
                        && frames[done + run].0 == frames[done].0 + run as u32
                    {
                        run += 1;
                    }
                    run
                }
                CopyFrom::Zero => (frames.len() - done).min(ZERO_SOURCE_PAGES),
            };
            let src = match from {
                CopyFrom::Slots => self.slot_addr(frames[done]),
                CopyFrom::Zero => self.zero_source.addr(),
            };
            let at = dst + done as u64 * PAGE;
            // SAFETY: the caller owns the destination pages (contract above); the source
            // is the Taken frames' present slots (owned by the caller, consecutive) or our
            // read-only never-written zero source, and COPY only reads it.
            let r = match unsafe { uffd.copy(at, src, run as u64 * PAGE, mode) } {
                Ok(r) => r,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let copied = (r.bytes() / PAGE) as usize;
            for (i, &f) in frames[done..done + copied].iter().enumerate() {
                let desc = self.transition(f, FrameState::Taken, FrameState::Mapped)?;
                if desc.slot() != SlotContent::Hole {
                    desc.set_slot(SlotContent::PendingDrop);
                }
                desc.set_mapping(owner, at + i as u64 * PAGE);
            }
            done += copied;
            if !r.is_done() {
                result = Ok(if done > 0 {
                    Resolved::Partial(done as u64 * PAGE)
                } else {
                    r
                });
                break;
            }
            result = Ok(Resolved::Done(done as u64 * PAGE));
        }
        // Installed frames are Mapped now whatever happened after them: queue the slots
        // that hold a page (a lazy slot may be a hole already).
        self.queue_drops(frames[..done].iter().copied().filter(|&f| {
            self.desc(f)
                .is_ok_and(|d| d.slot() == SlotContent::PendingDrop)
        }));
        result
    }

    /// Swap-cache hit by COPY: puts a copy of a Staging frame's page back at its address
    /// (no TLB flush, and it works while an in-flight write-back reads the slot, where
    /// MOVE says `EBUSY`). On [`Resolved::Done`] the frame is Mapped with its slot
    /// `PendingDrop` (dropped in a batch; a write-back still reading it
    /// keeps its own reference to the page, so it completes with the staged content).
    ///
    /// # Safety
    /// Same as [`FramePool::unstage`], except that in-flight I/O may read the slot.
    pub unsafe fn unstage_copy(&self, frame: FrameNo, mode: CopyMode) -> Result<Resolved> {
        let uffd = self.uffd_for_copy_install()?;
        // SAFETY: forwarded contract.
        unsafe { self.unstage_copy_into(uffd, frame, mode) }
    }

    /// [`FramePool::unstage_copy`] into the address space `uffd` serves (see
    /// [`FramePool::install_many_copy_into`]).
    ///
    /// # Safety
    /// Same as [`FramePool::unstage_copy`], the page being in `uffd`'s address space.
    pub unsafe fn unstage_copy_into(
        &self,
        uffd: &crate::Userfaultfd,
        frame: FrameNo,
        mode: CopyMode,
    ) -> Result<Resolved> {
        self.uffd_for_copy_install()?;
        self.expect_state(frame, FrameState::Staging)?;
        let vaddr = self.desc(frame)?.vaddr();
        // SAFETY: the caller owns the destination page; the slot holds our staged page,
        // which COPY only reads.
        let r = unsafe { uffd.copy(vaddr, self.slot_addr(frame), PAGE, mode)? };
        if r.is_done() {
            let desc = self.transition(frame, FrameState::Staging, FrameState::Mapped)?;
            desc.set_slot(SlotContent::PendingDrop);
            self.queue_drops([frame]);
        }
        Ok(r)
    }

    /// Makes sure a Taken frame's slot holds a page (lazy pools: a hole is refilled with
    /// a zeroed page by `UFFDIO_COPY` from the zero source, no TLB flush). Call before
    /// writing the slot (a swap-in read, a copy into it) or moving its page out.
    pub fn ensure_slot(&self, frame: FrameNo) -> Result<()> {
        let desc = self.desc(frame)?;
        if desc.slot() != SlotContent::Hole {
            return Ok(());
        }
        self.expect_state(frame, FrameState::Taken)?;
        self.refill_holes(self.slot_addr(frame), 1)?;
        desc.set_slot(SlotContent::Zeroed);
        Ok(())
    }

    /// Drops the slots of `frames` (`MADV_DONTNEED`, batched; see
    /// [`crate::sys::mem::Mapping::drop_pages`]).
    pub(crate) fn drop_slots(&self, frames: &[FrameNo]) -> Result<()> {
        let offsets: Vec<usize> = frames.iter().map(|f| f.index() * PAGE_SIZE).collect();
        self.mem.drop_pages(&offsets, self.self_pidfd.as_ref())
    }

    /// Installs a copy of a Taken frame's slot at `dst` (`UFFDIO_COPY`), for when MOVE
    /// reported [`Resolved::UseCopy`]. The frame stays Taken (its page did not move):
    /// give it back with [`FramePool::return_unused`] if its slot was still zeroed, or
    /// [`FramePool::release`].
    ///
    /// # Safety
    /// Same as [`FramePool::install`].
    pub unsafe fn install_copy(
        &self,
        frame: FrameNo,
        dst: u64,
        mode: CopyMode,
    ) -> Result<Resolved> {
        let uffd = self.uffd_for_copy_install()?;
        self.expect_state(frame, FrameState::Taken)?;
        // SAFETY: the caller owns `dst`; the slot is a present page the caller owns, read only.
        unsafe { uffd.copy(dst, self.slot_addr(frame), PAGE, mode) }
    }

    /// Evicts a Mapped frame's page from its region back into its slot (`UFFDIO_MOVE`,
    /// atomic: the region page is a hole afterwards and the next access faults to us).
    /// On [`Resolved::Done`] the frame is Staging: write the slot to swap, then
    /// [`FramePool::release`] it, or [`FramePool::unstage`] it on a swap-cache hit.
    /// [`Resolved::UseCopy`]: the region page is pinned or fork-shared; it stays mapped.
    ///
    /// # Safety
    /// - The caller manages the region page at the frame's `vaddr` and accepts that it
    ///   becomes a hole.
    pub unsafe fn stage(&self, frame: FrameNo, mode: MoveMode) -> Result<Resolved> {
        let uffd = self.uffd_or_err()?;
        self.expect_state(frame, FrameState::Mapped)?;
        // A COPY-installed frame's slot may still hold the copied page: MOVE needs a hole.
        self.settle_slot(frame, true)?;
        let vaddr = self.desc(frame)?.vaddr();
        // SAFETY: the slot is a hole (Mapped, settled) inside the pool, registered on this fd; the
        // caller owns the region page (contract above).
        let r = unsafe { uffd.move_pages(self.slot_addr(frame), vaddr, PAGE, mode)? };
        if r.is_done() {
            let desc = self.transition(frame, FrameState::Mapped, FrameState::Staging)?;
            desc.set_slot(SlotContent::Dirty);
        }
        Ok(r)
    }

    /// Prepares a Mapped frame's slot to receive its page's content by other means than a
    /// MOVE (the daemon: the tagger's agent moved the page out of the program and the
    /// daemon copies it from there): a pending drop is flushed, a hole refilled with a
    /// zeroed page. Returns the slot's address; write the page there, then
    /// [`FramePool::commit_stage`] (or leave the frame Mapped if the page stayed).
    pub fn prepare_stage(&self, frame: FrameNo) -> Result<u64> {
        self.expect_state(frame, FrameState::Mapped)?;
        self.settle_slot(frame, true)?;
        let desc = self.desc(frame)?;
        if desc.slot() == SlotContent::Hole {
            self.refill_holes(self.slot_addr(frame), 1)?;
        }
        desc.set_slot(SlotContent::Dirty);
        Ok(self.slot_addr(frame))
    }

    /// The page of a Mapped frame left its address space and its content is in the slot
    /// (written after [`FramePool::prepare_stage`]): the frame is Staging, as after
    /// [`FramePool::stage`].
    pub fn commit_stage(&self, frame: FrameNo) -> Result<()> {
        let desc = self.transition(frame, FrameState::Mapped, FrameState::Staging)?;
        desc.set_slot(SlotContent::Dirty);
        Ok(())
    }

    /// Moves a Staging frame's page back to its region address (a fault hit the page while
    /// it was being written out). On [`Resolved::Done`] the frame is Mapped again.
    ///
    /// # Safety
    /// - The frame's `vaddr` is a missing page of a region the caller manages; no
    ///   in-flight I/O reads the slot (else the move reports [`Resolved::UseCopy`]).
    pub unsafe fn unstage(&self, frame: FrameNo, mode: MoveMode) -> Result<Resolved> {
        let uffd = self.uffd_or_err()?;
        self.expect_state(frame, FrameState::Staging)?;
        let vaddr = self.desc(frame)?.vaddr();
        // SAFETY: the caller owns the destination page; the slot holds our staged page.
        let r = unsafe { uffd.move_pages(vaddr, self.slot_addr(frame), PAGE, mode)? };
        if r.is_done() {
            let desc = self.transition(frame, FrameState::Staging, FrameState::Mapped)?;
            desc.set_slot(SlotContent::Hole);
        }
        Ok(r)
    }

    /// Installs a copy of a Staging frame's page at `dst` of the address space `uffd`
    /// serves, leaving the frame as it is (a fork child inherits a hole where its parent's
    /// page is being written out: the child gets its own copy now).
    ///
    /// # Safety
    /// `dst` is a missing page the caller manages in `uffd`'s address space.
    pub unsafe fn copy_staged_into(
        &self,
        uffd: &crate::Userfaultfd,
        frame: FrameNo,
        dst: u64,
        mode: CopyMode,
    ) -> Result<Resolved> {
        self.expect_state(frame, FrameState::Staging)?;
        // SAFETY: the caller owns `dst`; the slot holds our staged page, COPY only reads it.
        unsafe { uffd.copy(dst, self.slot_addr(frame), PAGE, mode) }
    }

    /// Drops a Mapped frame from its region (the region is going away): its page moves
    /// back to the slot and the frame is released to the zeroing queue. If the region
    /// page is already gone (`ENOENT`), the frame is released as a hole. A pinned page
    /// ([`Resolved::UseCopy`]) stays where it is and the frame stays Mapped.
    ///
    /// # Safety
    /// - The caller manages the region page and accepts that it becomes a hole.
    pub unsafe fn reclaim(&self, frame: FrameNo) -> Result<Resolved> {
        // SAFETY: forwarded contract.
        match unsafe { self.stage(frame, MoveMode::DONTWAKE) } {
            Ok(r @ Resolved::Done(_)) => {
                self.release(frame)?;
                Ok(r)
            }
            Ok(other) => Ok(other),
            Err(e) if e.is_not_found() => {
                self.release(frame)?;
                Ok(Resolved::Done(0))
            }
            Err(e) => Err(e),
        }
    }

    /// Cleans the slots of Zeroing frames (sorted): holes are refilled with fresh zeroed
    /// pages, stale pages are cleared.
    pub(crate) fn clean_slots(&self, sorted: &[FrameNo]) -> Result<()> {
        let mut i = 0;
        while i < sorted.len() {
            let first = sorted[i];
            let content = self.desc(first)?.slot();
            // A run of consecutive frames with the same content is cleaned in one call.
            let mut j = i + 1;
            while j < sorted.len()
                && sorted[j].0 == sorted[j - 1].0 + 1
                && self.desc(sorted[j])?.slot() == content
            {
                j += 1;
            }
            let (start, pages) = (self.slot_addr(first), (j - i) as u64);
            match content {
                // Lazy slots stay holes until someone needs a page there.
                SlotContent::Hole if self.lazy => {}
                SlotContent::Hole => self.refill_holes(start, pages)?,
                SlotContent::Dirty | SlotContent::Zeroed | SlotContent::PendingDrop => {
                    let offset = first.index() * PAGE_SIZE;
                    // SAFETY: these frames are Zeroing and were handed to this call by the
                    // zeroing queue, which gives each frame to one cleaner only; their
                    // slots hold present pages (Dirty), so no fault is taken.
                    unsafe { self.mem.fill(offset, pages as usize * PAGE_SIZE, 0)? };
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Refills `pages` hole slots from `start` with zeroed pages.
    fn refill_holes(&self, start: u64, pages: u64) -> Result<()> {
        let Some(uffd) = self.uffd.as_deref() else {
            // Not registered: an ordinary write fault populates a zeroed page.
            let offset = (start - self.mem.addr()) as usize;
            return self.mem.touch_pages(offset, pages as usize * PAGE_SIZE, 0);
        };
        let chunk = self.zero_source.len() as u64;
        let (mut dst, end) = (start, start + pages * PAGE);
        while dst < end {
            let len = chunk.min(end - dst);
            // SAFETY: [dst, dst+len) are hole slots of Zeroing frames owned by this
            // cleaner; the source is our read-only never-written mapping (reads as zeros).
            let r = unsafe { uffd.copy(dst, self.zero_source.addr(), len, CopyMode::DONTWAKE)? };
            match r {
                Resolved::Done(_) => dst += len,
                Resolved::Partial(n) => dst += n,
                Resolved::MmapChanging => {
                    // An address-space event is unread on this fd; the queue keeps the
                    // frames and a later pass (after the events are read) refills them.
                    return Err(Error::Ioctl {
                        op: "UFFDIO_COPY",
                        start: dst,
                        len,
                        source: nix::errno::Errno::EAGAIN,
                    });
                }
                Resolved::AlreadyMapped => {
                    // The slot was not a hole after all: clear the page that is there.
                    let offset = (dst - self.mem.addr()) as usize;
                    // SAFETY: as in `clean_slots`, the frame is owned by this cleaner and
                    // its page is present (EEXIST).
                    unsafe { self.mem.fill(offset, PAGE_SIZE, 0)? };
                    dst += PAGE;
                }
                Resolved::UseCopy => return Err(Error::InvalidArgument("COPY reported UseCopy")),
            }
        }
        Ok(())
    }
}
