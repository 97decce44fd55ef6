//! Bringing a page back into its address space.
//!
//! - From staging (swap-cache hit, `swap_cache_hit`): the allocation policy took the
//!   staged frame (`Cx::take_staged`); `Installer::unstage` puts it back, or — while its
//!   write-back pins the slot — the content is copied into a fresh frame that is
//!   installed, and the staging frame becomes an orphan released when its write completes.
//! - From its own slot (sampled re-fault, `refault_sampled`): no policy call, no I/O; the
//!   eviction policy hears `on_access`.
//! - From swap (`start_swap_in`, from `Cx::swap_in`): an `O_DIRECT` read straight into the
//!   Taken frame's slot; the page is `SwapIn` with the waiting workers' bits; a read the
//!   engine refuses at once gets a synthetic ticket and completes with its error at the
//!   next poll (`queue_read`). With `PREFETCH=N` on the page, up to N following swapped
//!   pages are read too while frames stay above the low watermark (`prefetch`).
//!
//! The read's completion is in [`super::completion`]. After it, `keep_or_free_copy` keeps
//! the swap entry as the page's clean copy when the installer tracks writes, else frees it.
//! An install that cannot be done now (`EAGAIN`: the address space is changing) leaves
//! the page where its content is — staging or swap — never vacant.
//!
//! Lock: everything here is a `WorkerCx` method (lock held); reads are only queued, and
//! submitted by the caller after it drops the lock.

use usm_kmod::FrameNo;
use usm_kmod::pool::FrameOwner;
use usm_policies::{Access, EvictCx, MappedPage};
use usm_swap::{SwapEntry, SwapError, Ticket};
use usm_sync::atomic::Ordering;

use crate::MmError;
use crate::space::PageState;
use crate::stats::{FaultPath, MmStats};

use super::{FaultResult, MemView, Op, PAGE, WorkerCx};

impl WorkerCx<'_> {
    /// A fault on a page in staging: MOVE it back, or — when its in-flight write pins the
    /// slot — copy it into a fresh frame and move that in.
    pub(super) fn swap_cache_hit(
        &mut self,
        pid: u32,
        addr: u64,
        f: FrameNo,
        prior: PageState,
        owner: FrameOwner,
    ) {
        let c = &self.core.stats.counters;
        match self
            .core
            .installer_in(self.mem, pid)
            .unstage(&self.core.pool, f)
        {
            Ok(true) => {
                MmStats::bump(&c.swap_cache_moves);
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.set(addr, PageState::Resident(f));
                }
                let mut view = MemView {
                    pool: &self.core.pool,
                    mem: self.mem,
                };
                self.evict.on_map(
                    MappedPage {
                        frame: f,
                        pid,
                        addr,
                    },
                    &mut view,
                );
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, %f, addr, "unstage failed; page stays in staging");
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.set(addr, prior);
                }
                return;
            }
        }
        // The write pins the slot: copy into a fresh frame.
        let fresh = match self.core.pool.take(&mut self.io.arena) {
            Ok(Some(n)) => n,
            _ => {
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.set(addr, prior);
                }
                return;
            }
        };
        if let Err(e) = crate::sys::io::copy_slot(&self.core.pool, f, fresh) {
            tracing::error!(error = %e, "copying a staged page failed");
            self.return_frame(fresh, true);
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            }
            return;
        }
        MmStats::bump(&c.swap_cache_copies);
        self.mem.orphans.insert(f);
        self.install_fresh(pid, addr, &[fresh], owner, false);
        let installed = matches!(
            self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)),
            Some(PageState::Resident(_) | PageState::Copied)
        );
        if !installed {
            // The address space is changing (daemon: an event waits for its reader): the
            // page stays in staging, its write-back goes on; the fault comes again.
            self.mem.orphans.remove(&f);
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            }
        }
    }

    /// An access to a page out for sampling: move it back (copy into a fresh frame if the
    /// slot is pinned) and tell the eviction policy it was accessed.
    pub(super) fn refault_sampled(
        &mut self,
        pid: u32,
        addr: u64,
        frame: FrameNo,
        write: bool,
    ) -> FaultResult {
        let core = self.core;
        MmStats::bump(&core.stats.counters.sample_refaults);
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            space.counters.sample_refaults += 1;
        }
        let accessed = Access {
            accessed: true,
            written: write,
        };
        let installer = core.installer_in(self.mem, pid);
        if matches!(installer.unstage(&core.pool, frame), Ok(true)) {
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, PageState::Resident(frame));
                // The MOVE dropped the write-protection that told clean from written:
                // re-arm it on a read; a write makes the swap copy stale.
                if space.clean.contains_key(&addr)
                    && (write || !matches!(installer.track_clean(addr), Ok(true)))
                    && let Some((e, _)) = space.clean.remove(&addr)
                {
                    let _ = self.mem.swap.free(e);
                }
            }
            self.evict.on_access(frame, accessed);
            return FaultResult::Resolved(FaultPath::SampleRefault);
        }
        // The slot is pinned (should not happen: no I/O runs on it): copy it into a fresh
        // frame, install that, and free the old one once the new page is in.
        let Some((_, range)) = self.mem.spaces.get(&pid).and_then(|s| s.range_of(addr)) else {
            return FaultResult::Foreign;
        };
        let owner = FrameOwner {
            pid,
            region: range.id,
        };
        let fresh = match core.pool.take(&mut self.io.arena) {
            Ok(Some(n)) => n,
            _ => return FaultResult::NeedMemory,
        };
        if let Err(e) = crate::sys::io::copy_slot(&core.pool, frame, fresh) {
            tracing::error!(error = %e, "copying a sampled page failed");
            self.return_frame(fresh, true);
            return FaultResult::NeedMemory;
        }
        self.install_fresh(pid, addr, &[fresh], owner, false);
        match self
            .mem
            .spaces
            .get_mut(&pid)
            .and_then(|s| s.pages.get(&addr))
        {
            Some(PageState::Resident(_) | PageState::Copied) => {
                self.evict.on_free(frame);
                if let Err(e) = core.pool.release(frame) {
                    tracing::error!(error = %e, %frame, "releasing a sampled frame failed");
                }
                if let Some((e, _)) = self
                    .mem
                    .spaces
                    .get_mut(&pid)
                    .and_then(|s| s.clean.remove(&addr))
                {
                    let _ = self.mem.swap.free(e);
                }
                FaultResult::Resolved(FaultPath::SampleRefault)
            }
            _ => FaultResult::NeedMemory,
        }
    }

    pub(super) fn queue_read(&mut self, entry: SwapEntry, frame: FrameNo) -> Ticket {
        match crate::sys::io::read_into_slot(&mut self.io.engine, &self.core.pool, frame, entry) {
            Ok(t) => t,
            Err(e) => {
                let t = Ticket(self.io.next_synthetic);
                self.io.next_synthetic += 1;
                let err = match e {
                    MmError::Swap(s) => s,
                    _ => SwapError::BadEntry(entry),
                };
                self.io.refused.push((t, err));
                t
            }
        }
    }

    pub(super) fn start_swap_in(
        &mut self,
        pid: u32,
        addr: u64,
        entry: SwapEntry,
        frame: FrameNo,
        waiters: u64,
    ) -> Option<Ticket> {
        let key = self.range_key(pid, addr)?;
        let ticket = self.queue_read(entry, frame);
        self.io.ops.insert(
            ticket,
            Op::SwapIn {
                key,
                addr,
                frame,
                entry,
            },
        );
        self.core.io_in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            space.counters.swap_ins += 1;
            space.set(
                addr,
                PageState::SwapIn {
                    frame,
                    entry,
                    worker: self.worker,
                    ticket,
                    waiters,
                },
            );
        }
        MmStats::bump(&self.core.stats.counters.swap_ins);
        Some(ticket)
    }

    /// Prefetch: with `PREFETCH=N` on the page, also read back up to N following swapped
    /// pages of the same range (while frames stay above the low watermark).
    pub(super) fn prefetch(&mut self, pid: u32, addr: u64) {
        let n = self.view().hint(pid, addr).prefetch.unwrap_or(0) as u64;
        if n == 0 {
            return;
        }
        let Some(bounds) = self.mem.spaces.get(&pid).and_then(|s| s.bounds(addr)) else {
            return;
        };
        for i in 1..=n {
            let a = addr + i * PAGE;
            if a >= bounds.end || !self.io.engine.has_capacity() {
                break;
            }
            if self.free_total() <= self.core.config.watermarks.low {
                break;
            }
            let Some(PageState::Swapped(e)) = self
                .mem
                .spaces
                .get(&pid)
                .and_then(|s| s.pages.get(&a))
                .cloned()
            else {
                continue;
            };
            if self.mem.unwritten.contains(&e) {
                continue;
            }
            let Ok(Some(f)) = self.core.pool.take(&mut self.io.arena) else {
                break;
            };
            if self.start_swap_in(pid, a, e, f, 0).is_some() {
                MmStats::bump(&self.core.stats.counters.prefetches);
            } else {
                self.return_frame(f, true);
            }
        }
    }

    /// After a swap-in: keep `entry` as the page's valid copy when the installer tracks
    /// writes to it, else free the slot.
    pub(super) fn keep_or_free_copy(
        &mut self,
        pid: u32,
        addr: u64,
        entry: SwapEntry,
        hash: Option<u128>,
    ) {
        let resident = matches!(
            self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)),
            Some(PageState::Resident(_))
        );
        if let Some(hash) = hash
            && resident
            && matches!(
                self.core.installer_in(self.mem, pid).track_clean(addr),
                Ok(true)
            )
            && let Some(space) = self.mem.spaces.get_mut(&pid)
        {
            space.clean.insert(addr, (entry, hash));
            return;
        }
        let _ = self.mem.swap.free(entry);
    }
}
