//! The embedded [`Installer`]: same-mm `UFFDIO_MOVE` between the pool and regions.

use usm_kmod::pool::{FrameOwner, FramePool};
use usm_kmod::{CopyMode, FrameNo, MoveMode, PAGE_SIZE, PoisonMode, Resolved};

use crate::mm::MmError;
use crate::mm::installer::{InstallReport, Installer};

/// The embedded installer: everything happens in our own address space with
/// `UFFDIO_MOVE` on the pool's userfaultfd (regions, pool and staging registered on it).
#[derive(Debug, Default, Clone, Copy)]
pub struct SameMmInstaller;

const PAGE: u64 = PAGE_SIZE as u64;

impl Installer for SameMmInstaller {
    fn install(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        let mut report = InstallReport::default();
        let mut i = 0;
        while i < frames.len() {
            let at = start + i as u64 * PAGE;
            let rest = &frames[i..];
            // SAFETY: (contract of `install_many`) the core calls us with vacant pages of
            // ranges it manages, registered on the pool's fd with the pool's protection
            // and lock state, under its state lock; the frames are Taken by the caller.
            let r = unsafe { pool.install_many(rest, at, owner, MoveMode::empty())? };
            match r {
                Resolved::Done(_) => {
                    report.moved.extend(page_pairs(at, rest));
                    break;
                }
                Resolved::Partial(bytes) => {
                    let n = (bytes / PAGE) as usize;
                    report.moved.extend(page_pairs(at, &rest[..n]));
                    // Re-issue from the stop point: the next round classifies that page.
                    i += n;
                }
                Resolved::AlreadyMapped => {
                    report.present.push((at, rest[0]));
                    i += 1;
                }
                Resolved::MmapChanging => {
                    report.retry.extend(page_pairs(at, rest));
                    break;
                }
                Resolved::UseCopy => {
                    // SAFETY: as above; COPY reads the Taken slot and fills the hole.
                    match unsafe { pool.install_copy(rest[0], at, CopyMode::empty())? } {
                        Resolved::Done(_) => report.copied.push((at, rest[0])),
                        Resolved::AlreadyMapped => report.present.push((at, rest[0])),
                        _ => report.retry.push((at, rest[0])),
                    }
                    i += 1;
                }
            }
        }
        Ok(report)
    }

    fn stage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        // SAFETY: the core stages only frames it mapped into ranges it manages, under its
        // state lock; the page becomes a hole that faults back to us.
        let r = unsafe { pool.stage(frame, MoveMode::empty())? };
        Ok(r.is_done())
    }

    fn unstage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        // SAFETY: the core unstages only into the frame's own page, which is a hole
        // (the page is in staging), under its state lock.
        let r = unsafe { pool.unstage(frame, MoveMode::empty())? };
        Ok(r.is_done())
    }

    fn poison(&self, pool: &FramePool, addr: u64) -> Result<(), MmError> {
        let uffd = pool.userfaultfd().ok_or(usm_kmod::Error::NoUserfaultfd)?;
        // SAFETY: as stated: a vacant page of a managed range, under the core's lock.
        match unsafe { uffd.poison(addr, PAGE, PoisonMode::empty())? } {
            Resolved::Done(_) | Resolved::AlreadyMapped => {
                if !crate::sys::sigbus::mark_poisoned(addr) {
                    tracing::error!(addr, "poisoned-page table full: the access will spin");
                }
                Ok(())
            }
            _ => Err(MmError::Protocol {
                frame: FrameNo(u32::MAX),
                what: "UFFDIO_POISON did not complete (address space changing)",
            }),
        }
    }

    fn reclaim(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        // SAFETY: the range holding the page is being dropped by the core.
        let r = unsafe { pool.reclaim(frame)? };
        Ok(r.is_done())
    }
}

fn page_pairs(start: u64, frames: &[FrameNo]) -> impl Iterator<Item = (u64, FrameNo)> + '_ {
    frames
        .iter()
        .enumerate()
        .map(move |(i, &f)| (start + i as u64 * PAGE, f))
}
