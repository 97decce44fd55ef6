//! The embedded [`Installer`]: same-mm `UFFDIO_MOVE` / `UFFDIO_COPY` between the pool
//! and regions (see [`InstallMode`] for which and why).

use usm_kmod::pool::{CopyFrom, FrameOwner, FramePool};
use usm_kmod::{CopyMode, FrameNo, MoveMode, PAGE_SIZE, PoisonMode, Resolved};

use usm_mm::MmError;
use usm_mm::{InstallMode, InstallReport, Installer};

/// The embedded installer: everything happens in our own address space with
/// `UFFDIO_MOVE` / `UFFDIO_COPY` on the pool's userfaultfd (regions, pool and staging
/// registered on it), installing by [`InstallMode`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SameMmInstaller {
    /// How frames are installed (eviction always MOVEs the page out).
    pub mode: InstallMode,
    /// COPY installs of content (swap-ins, swap-cache hits) map the page
    /// write-protected (`UFFDIO_COPY_MODE_WP`; regions registered `MISSING | WP`), so
    /// write tracking needs no `UFFDIO_WRITEPROTECT` (and no TLB flush) afterwards.
    wp_content: bool,
}

const PAGE: u64 = PAGE_SIZE as u64;

impl SameMmInstaller {
    /// An installer that installs by `mode`.
    pub(crate) fn new(mode: InstallMode) -> SameMmInstaller {
        SameMmInstaller {
            mode,
            wp_content: false,
        }
    }

    /// The COPY mode for installing page *content* (not zeroes): write-protected when
    /// clean-page tracking wants it (`wp_content`).
    fn content_copy_mode(&self) -> CopyMode {
        if self.wp_content {
            CopyMode::WP
        } else {
            CopyMode::empty()
        }
    }

    fn install_from(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
        from: CopyFrom,
    ) -> Result<InstallReport, MmError> {
        let mut report = InstallReport::default();
        let mut i = 0;
        while i < frames.len() {
            let at = start + i as u64 * PAGE;
            let rest = &frames[i..];
            // SAFETY: (contract of `install_many` / `install_many_copy`) the core calls
            // us with vacant pages of ranges it manages, registered on the pool's fd with
            // the pool's protection and lock state, under its state lock; the frames are
            // Taken by the caller.
            let r = unsafe {
                match self.mode {
                    InstallMode::Move => pool.install_many(rest, at, owner, MoveMode::empty())?,
                    InstallMode::Copy => {
                        let mode = match from {
                            CopyFrom::Slots => self.content_copy_mode(),
                            CopyFrom::Zero => CopyMode::empty(),
                        };
                        pool.install_many_copy(rest, at, owner, from, mode)?
                    }
                }
            };
            match record_run(&mut report, at, rest, r) {
                RunStep::Stop => break,
                RunStep::Advance(n) => i += n,
                RunStep::UseCopy => {
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
}

impl Installer for SameMmInstaller {
    fn install(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        self.install_from(pool, frames, start, owner, CopyFrom::Slots)
    }

    fn install_zeroed(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        self.install_from(pool, frames, start, owner, CopyFrom::Zero)
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
        let r = unsafe {
            match self.mode {
                InstallMode::Move => pool.unstage(frame, MoveMode::empty())?,
                InstallMode::Copy => pool.unstage_copy(frame, self.content_copy_mode())?,
            }
        };
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
        if self.mode == InstallMode::Copy {
            // The region is unmapped right after (embedded `Region` drop): its page goes
            // with it, so the frame is released as it stands — no MOVE back, no TLB flush
            // per page (a 1 GiB region would cost 262 144 flushes under the core's lock).
            // Its slot is a hole (or a pending copy, cleared by the zeroer).
            pool.release(frame)?;
            return Ok(true);
        }
        // SAFETY: the range holding the page is being dropped by the core.
        let r = unsafe { pool.reclaim(frame)? };
        Ok(r.is_done())
    }
}

/// What to do after one multi-page install call ([`record_run`]).
pub(crate) enum RunStep {
    /// Everything left was recorded (installed, or to retry after the events).
    Stop,
    /// This many pages were recorded; re-issue the rest from there (the next call
    /// classifies the page it stopped at).
    Advance(usize),
    /// MOVE said the first page must be copied (`EBUSY`): the caller's to handle.
    UseCopy,
}

/// Records in `report` what one install call of `rest` at `at` did (`r`), classifying a
/// partial run page by page (DESIGN.md: never retried blindly), and says how to go on.
/// Shared by the embedded and the daemon's installers.
pub(crate) fn record_run(
    report: &mut InstallReport,
    at: u64,
    rest: &[FrameNo],
    r: Resolved,
) -> RunStep {
    match r {
        Resolved::Done(_) => {
            report.mapped.extend(page_pairs(at, rest));
            RunStep::Stop
        }
        Resolved::Partial(bytes) => {
            let n = (bytes / PAGE) as usize;
            report.mapped.extend(page_pairs(at, &rest[..n]));
            RunStep::Advance(n)
        }
        Resolved::AlreadyMapped => {
            report.present.push((at, rest[0]));
            RunStep::Advance(1)
        }
        Resolved::MmapChanging => {
            report.retry.extend(page_pairs(at, rest));
            RunStep::Stop
        }
        Resolved::UseCopy => RunStep::UseCopy,
    }
}

fn page_pairs(start: u64, frames: &[FrameNo]) -> impl Iterator<Item = (u64, FrameNo)> + '_ {
    frames
        .iter()
        .enumerate()
        .map(move |(i, &f)| (start + i as u64 * PAGE, f))
}

/// [`SameMmInstaller`] plus clean-page tracking: pages swapped in are write-protected
/// asynchronously (`UFFD_FEATURE_WP_ASYNC`: the kernel resolves the write itself and
/// clears the page's uffd-wp bit), and `PAGEMAP_SCAN` tells whether one was written since.
/// Regions must be registered with `MISSING | WP`.
#[derive(Debug)]
pub(crate) struct TrackingInstaller {
    inner: SameMmInstaller,
    uffd: usm_sync::Arc<usm_kmod::Userfaultfd>,
    pagemap: std::fs::File,
}

impl TrackingInstaller {
    /// Tracks through `uffd` (negotiated with `WP_ASYNC`) and `/proc/self/pagemap`;
    /// installs by the default [`InstallMode`].
    pub(crate) fn new(
        uffd: usm_sync::Arc<usm_kmod::Userfaultfd>,
    ) -> std::io::Result<TrackingInstaller> {
        Ok(TrackingInstaller {
            inner: SameMmInstaller {
                mode: InstallMode::default(),
                wp_content: true,
            },
            uffd,
            pagemap: std::fs::File::open("/proc/self/pagemap")?,
        })
    }

    /// Installs by `mode` instead.
    pub(crate) fn with_mode(mut self, mode: InstallMode) -> TrackingInstaller {
        self.inner.mode = mode;
        self
    }
}

/// `struct pm_scan_arg` (linux/fs.h, Linux 6.7).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

impl Installer for TrackingInstaller {
    fn install(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        self.inner.install(pool, frames, start, owner)
    }
    fn install_zeroed(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        self.inner.install_zeroed(pool, frames, start, owner)
    }
    fn stage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        self.inner.stage(pool, frame)
    }
    fn unstage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        self.inner.unstage(pool, frame)
    }
    fn poison(&self, pool: &FramePool, addr: u64) -> Result<(), MmError> {
        self.inner.poison(pool, addr)
    }
    fn reclaim(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        self.inner.reclaim(pool, frame)
    }

    fn track_clean(&self, addr: u64) -> Result<bool, MmError> {
        if self.inner.mode == InstallMode::Copy {
            // Content is COPY-installed write-protected already (see `wp_content`); the
            // core asks right after such an install (swap-in, sampled re-fault on a read).
            return Ok(true);
        }
        // SAFETY: `addr` is a present page of a WP-registered region the core manages;
        // with WP_ASYNC a write to it is resolved by the kernel (no thread blocks).
        let r = unsafe {
            self.uffd
                .writeprotect(addr, PAGE, usm_kmod::WriteProtect::Set)?
        };
        Ok(r.is_done())
    }

    fn is_written(&self, addr: u64) -> Result<bool, MmError> {
        let mut out = PageRegion::default();
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: addr,
            end: addr + PAGE,
            walk_end: 0,
            vec: (&mut out as *mut PageRegion) as u64,
            vec_len: 1,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` (1) page_region
        // into `out`, both live locals; it only reads the page tables of `addr`.
        let ret = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&self.pagemap),
                PAGEMAP_SCAN as _,
                &mut arg as *mut PmScanArg,
            )
        };
        if ret < 0 {
            return Err(MmError::Kmod(usm_kmod::Error::Sys {
                what: "ioctl(PAGEMAP_SCAN)",
                source: nix::errno::Errno::last(),
            }));
        }
        Ok(ret > 0 && out.categories & PAGE_IS_WRITTEN != 0)
    }
}
