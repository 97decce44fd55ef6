//! What the host tells the core about the address spaces it manages (embedded mode, and
//! the daemon's pre-population): spaces and ranges (`add_space`, `add_range`,
//! `remove_range`), pins, hints, and frames installed directly (`install_frames`).
//!
//! Removing a range releases every page (`release_page`): a resident frame goes back to
//! the pool (the page becomes a hole), a swap slot is freed, a page with an operation in
//! flight is *fenced* — its staging frame becomes an orphan and its frame and slot are
//! freed when the operation completes (the range's generation no longer matches).
//!
//! Lock: each `pub` method takes the core lock; `release_page` takes the locked
//! `&mut MemState` (see the `core` module's locking section).

use std::ops::Range;

use usm_kmod::FrameNo;
use usm_kmod::pool::FrameOwner;
use usm_policies::{EvictPolicy, Hint, MappedPage, page_floor};
use usm_sync::atomic::Ordering;

use crate::MmError;
use crate::installer::Installer;
use crate::space::{ManagedRange, PageState, RangeKey, Space};
use crate::stats::MmStats;

use super::{MemState, MemView, MmCore, PAGE, RangeRelease};

impl MmCore {
    /// Creates the space of `pid` (idempotent).
    pub fn add_space(&self, pid: u32) {
        self.lock()
            .mem
            .spaces
            .entry(pid)
            .or_insert_with(|| Space::new(pid));
    }

    /// Starts managing `[start, start + len)` of `pid` (page aligned, not overlapping a
    /// managed range) with the allocation policy `alloc_spec`. The caller has registered
    /// the range on the pool's userfaultfd.
    pub fn add_range(
        &self,
        pid: u32,
        start: u64,
        len: u64,
        id: u32,
        alloc_spec: &str,
    ) -> Result<RangeKey, MmError> {
        let bad = |reason| MmError::BadRange {
            pid,
            start,
            len,
            reason,
        };
        if len == 0 || start % PAGE != 0 || len % PAGE != 0 {
            return Err(bad("empty or not page aligned"));
        }
        let alloc = self.registry.build_alloc(alloc_spec)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let space = st.mem.spaces.entry(pid).or_insert_with(|| Space::new(pid));
        let end = start + len;
        if space.range_of(start).is_some()
            || space.range_of(end - 1).is_some()
            || space.ranges.range(start..end).next().is_some()
        {
            return Err(bad("overlaps a managed range"));
        }
        space.ranges.insert(
            start,
            ManagedRange {
                end,
                generation,
                id,
                alloc_spec: alloc_spec.to_owned(),
                alloc: Some(alloc),
            },
        );
        Ok(RangeKey {
            pid,
            start,
            generation,
        })
    }

    /// Stops managing the range starting at `start`: resident frames go back to the pool
    /// (the pages become holes), swap slots are freed, in-flight operations are fenced
    /// (their frame and slot are freed when they complete). The caller unregisters and
    /// unmaps the range afterwards.
    pub fn remove_range(&self, pid: u32, start: u64) -> Result<RangeRelease, MmError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let installer = self.installer_in(&st.mem, pid);
        let space = st
            .mem
            .spaces
            .get_mut(&pid)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let range = space
            .ranges
            .remove(&start)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let addrs: Vec<u64> = space
            .pages
            .keys()
            .copied()
            .filter(|a| (start..range.end).contains(a))
            .collect();
        let mut rel = RangeRelease::default();
        for addr in addrs {
            self.release_page(&mut st.mem, &mut st.evict, &*installer, pid, addr, &mut rel);
        }
        Ok(rel)
    }

    /// Forgets page `addr` of `pid`: its frame goes back to the pool (the page becomes a
    /// hole, or goes with its mapping), its swap slot is freed, an operation in flight on
    /// it is fenced (frame and slot freed when it completes).
    pub(super) fn release_page(
        &self,
        mem: &mut MemState,
        evict: &mut Box<dyn EvictPolicy>,
        installer: &dyn Installer,
        pid: u32,
        addr: u64,
        rel: &mut RangeRelease,
    ) {
        let Some(space) = mem.spaces.get_mut(&pid) else {
            return;
        };
        space.pins.remove(&addr);
        if let Some((e, _)) = space.clean.remove(&addr) {
            let _ = mem.swap.free(e);
            rel.slots += 1;
        }
        match space.clear(addr) {
            Some(PageState::Resident(f)) => {
                evict.on_free(f);
                match installer.reclaim(&self.pool, f) {
                    Ok(true) => rel.frames += 1,
                    Ok(false) => rel.stuck += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, %f, addr, "reclaiming a frame failed");
                        rel.stuck += 1;
                    }
                }
            }
            Some(PageState::Sampled(f)) => {
                // Out in its own slot: nothing to unmap, the frame goes to zeroing.
                evict.on_free(f);
                match self.pool.release(f) {
                    Ok(()) => rel.frames += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, %f, addr, "releasing a sampled frame failed");
                        rel.stuck += 1;
                    }
                }
            }
            Some(PageState::Staging { frame, .. }) => {
                mem.orphans.insert(frame);
                rel.in_flight += 1;
            }
            Some(PageState::Swapped(e)) => {
                if let Err(err) = mem.swap.free(e) {
                    tracing::warn!(error = %err, "freeing a swap slot failed");
                }
                rel.slots += 1;
            }
            Some(PageState::SwapIn { .. }) => rel.in_flight += 1,
            Some(PageState::Leaving { frame, entry, .. }) => {
                // The stage finishes later: its frame is released then (fenced).
                mem.orphans.insert(frame);
                match entry {
                    Some(entry) => {
                        let _ = mem.swap.free(entry);
                    }
                    // An access sample: the eviction policy tracked the page.
                    None => evict.on_free(frame),
                }
                rel.in_flight += 1;
            }
            Some(PageState::Copied) | Some(PageState::Poisoned) | None => {}
        }
    }

    /// Pins `[start, end)` of `pid` against eviction (counted; see [`MmCore::unpin`]).
    pub fn pin(&self, pid: u32, range: Range<u64>) {
        let mut st = self.lock();
        if let Some(space) = st.mem.spaces.get_mut(&pid) {
            let mut a = page_floor(range.start);
            while a < range.end {
                *space.pins.entry(a).or_insert(0) += 1;
                a += PAGE;
            }
        }
    }

    /// Undoes one [`MmCore::pin`] of the same range.
    pub fn unpin(&self, pid: u32, range: Range<u64>) {
        let mut st = self.lock();
        if let Some(space) = st.mem.spaces.get_mut(&pid) {
            let mut a = page_floor(range.start);
            while a < range.end {
                if let Some(n) = space.pins.get_mut(&a) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        space.pins.remove(&a);
                    }
                }
                a += PAGE;
            }
        }
    }

    /// Records a hint (`"PREFETCH=8; EVICTION=DENY"`) for `[start, start + len)` of `pid`
    /// and tells the eviction policy.
    pub fn hint(&self, pid: u32, start: u64, len: u64, text: &str) -> Result<(), MmError> {
        let hint = Hint::parse(text).map_err(usm_policies::PolicyError::from)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(space) = st.mem.spaces.get_mut(&pid) else {
            return Err(MmError::NoRange { pid, addr: start });
        };
        space.hints.apply(start, len, &hint);
        let mut view = MemView {
            pool: &self.pool,
            mem: &st.mem,
        };
        st.evict.on_hint(pid, start..start + len, &hint, &mut view);
        Ok(())
    }

    /// Installs Taken `frames` at `start..` of `pid` directly, bypassing the policies
    /// (daemon pre-population; tests of the partial-move classification). Pages whose
    /// content is elsewhere (staging, swap, swap-in, poisoned) are refused; pages already
    /// present are left to the kernel, which refuses them (`EEXIST`): a multi-page MOVE
    /// then stops with a partial count and the rest is re-issued page by page. Installed
    /// pages become Resident; frames not installed come back in the report (still Taken).
    pub fn install_frames(
        &self,
        pid: u32,
        start: u64,
        frames: &[FrameNo],
    ) -> Result<crate::InstallReport, MmError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let installer = self.installer_in(&st.mem, pid);
        let space = st
            .mem
            .spaces
            .get_mut(&pid)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let (_, range) = space
            .range_of(start)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let end = start + frames.len() as u64 * PAGE;
        if end > range.end || start % PAGE != 0 {
            return Err(MmError::BadRange {
                pid,
                start,
                len: end - start,
                reason: "outside its range",
            });
        }
        let owner = FrameOwner {
            pid,
            region: range.id,
        };
        for i in 0..frames.len() as u64 {
            match space.pages.get(&(start + i * PAGE)) {
                None | Some(PageState::Resident(_) | PageState::Copied) => {}
                Some(_) => {
                    return Err(MmError::BadRange {
                        pid,
                        start,
                        len: end - start,
                        reason: "a page has content in staging or swap",
                    });
                }
            }
        }
        let report = installer.install(&self.pool, frames, start, owner)?;
        if !report.present.is_empty() || !report.copied.is_empty() {
            MmStats::bump(&self.stats.counters.partial_moves);
        }
        for &(a, f) in &report.mapped {
            space.set(a, PageState::Resident(f));
        }
        for &(a, _) in report.copied.iter().chain(report.present.iter()) {
            space.set(a, PageState::Copied);
        }
        let mut view = MemView {
            pool: &self.pool,
            mem: &st.mem,
        };
        for &(a, f) in &report.mapped {
            st.evict.on_map(
                MappedPage {
                    frame: f,
                    pid,
                    addr: a,
                },
                &mut view,
            );
        }
        Ok(report)
    }
}
