//! Address spaces of other processes (daemon mode): spaces with their own installer and
//! one allocation policy per process, ranges that follow the program's `mmap`, `munmap`,
//! `madvise(DONTNEED)`, `mremap` and `fork` (the userfaultfd events), and exit.
//!
//! # Who calls what, and when
//! The daemon's reader of a process's userfaultfd applies each event here *before* it
//! reads the next message, so the page map is current before any later fault is served
//! (the kernel holds the program's `fork`/`munmap`/`mremap` until the event is read):
//! - `UNMAP` → [`MmCore::discard`] (`keep_managed = false`): pages freed, the range is no
//!   longer managed, its hints forgotten; in-flight operations there are fenced
//!   (generation).
//! - `REMOVE` (`MADV_DONTNEED`/`MADV_FREE`) → [`MmCore::discard`] (`keep_managed = true`):
//!   pages freed, the range stays managed under a *new* generation, so a swap-in
//!   completing later never installs old content into what now reads as zeroes.
//! - `REMAP` → [`MmCore::remap`]: page states and hints follow the pages.
//! - `FORK` → [`MmCore::fork_space`]: the child's space from the parent's.
//! - exit → [`MmCore::remove_space`].
//!
//! A fault on an address no range covers yet is `Foreign`; the daemon then calls
//! [`MmCore::manage`] with the extent of the mapping (VMA) around it and retries.

use std::ops::Range;
use usm_sync::Arc;

use usm_kmod::pool::FrameOwner;
use usm_policies::{AllocPolicy, Cx, PolicyKind, guarded, page_floor};
use usm_sync::atomic::Ordering;

use super::{MmCore, PAGE, RangeRelease, WorkerCx, WorkerMm, fork_wait};
use crate::MmError;
use crate::installer::Installer;
use crate::space::{ManagedRange, PageState, Space, SpacePolicy};
use crate::stats::MmStats;

impl MmCore {
    /// Creates the space of process `pid`, whose pages `installer` moves in and out, with
    /// one instance of the allocation policy `alloc_spec` for all its ranges. Replaces a
    /// space the pid had (a recycled pid).
    pub fn add_process(
        &self,
        pid: u32,
        installer: Arc<dyn Installer>,
        alloc_spec: &str,
    ) -> Result<(), MmError> {
        let policy = self.registry.build_alloc(alloc_spec)?;
        let mut space = Space::new(pid);
        space.installer = Some(installer);
        space.alloc = Some(SpacePolicy {
            spec: alloc_spec.to_owned(),
            policy: Some(policy),
        });
        let old = self.lock().mem.spaces.insert(pid, space);
        if old.is_some() {
            tracing::warn!(pid, "a space for this pid existed; replaced");
        }
        Ok(())
    }

    /// Makes every page of `range` of `pid` managed: the parts no range covers yet become
    /// ranges of their own (new generations) that use the space's allocation policy.
    /// Returns how many ranges were added.
    pub fn manage(&self, pid: u32, range: Range<u64>) -> Result<usize, MmError> {
        let (start, end) = (page_floor(range.start), range.end.next_multiple_of(PAGE));
        if start >= end {
            return Ok(0);
        }
        let mut guard = self.lock();
        let space = guard
            .mem
            .spaces
            .get_mut(&pid)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        // The gaps between existing ranges inside [start, end).
        let mut gaps = Vec::new();
        let mut at = start;
        if let Some((s, r)) = space.range_of(start) {
            at = r.end.max(s);
        }
        for (&s, r) in space.ranges.range(start..end) {
            if s > at {
                gaps.push(at..s);
            }
            at = at.max(r.end);
        }
        if at < end {
            gaps.push(at..end);
        }
        let n = gaps.len();
        for g in gaps {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            space
                .ranges
                .insert(g.start, shared_range(g.end, generation));
        }
        Ok(n)
    }

    /// The program dropped `[range)` of `pid` (`munmap`: `keep_managed` false;
    /// `madvise(DONTNEED)`: true). Frames and slots go back; operations in flight there
    /// are fenced. See the module docs.
    pub fn discard(&self, pid: u32, range: Range<u64>, keep_managed: bool) -> RangeRelease {
        let (start, end) = (page_floor(range.start), range.end.next_multiple_of(PAGE));
        let mut rel = RangeRelease::default();
        if start >= end {
            return rel;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        tracing::trace!(target: "usm_mm::page", pid, start = format_args!("{start:#x}"), end = format_args!("{end:#x}"), keep_managed, "discard");
        let installer = self.installer_in(&st.mem, pid);
        let Some(space) = st.mem.spaces.get_mut(&pid) else {
            return rel;
        };
        let addrs = pages_in(space, start, end);
        // Split every range overlapping [start, end): the parts outside keep their
        // generation; the inside goes (or gets a new generation).
        let overlapping: Vec<u64> = ranges_overlapping(space, start, end);
        for rs in overlapping {
            let Some(r) = space.ranges.remove(&rs) else {
                continue;
            };
            let (re, generation, id, spec) = (r.end, r.generation, r.id, r.alloc_spec.clone());
            let mut own = Some(r);
            if rs < start {
                space
                    .ranges
                    .insert(rs, self.piece(&mut own, start, generation, id, &spec));
            }
            if re > end {
                space
                    .ranges
                    .insert(end, self.piece(&mut own, re, generation, id, &spec));
            }
        }
        if keep_managed {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            space.ranges.insert(start, shared_range(end, generation));
        } else {
            // Unmapped: its hints go with it (a new mapping at these addresses starts
            // without them, as a new embedded region does).
            space.hints.remove(start, end - start);
        }
        for addr in addrs {
            self.release_page(&mut st.mem, &mut st.evict, &*installer, pid, addr, &mut rel);
        }
        rel
    }

    /// The program moved `[from, from + len)` of `pid` to `[to, to + len)` (`mremap`):
    /// page states follow their pages. Operations in flight on the old addresses are
    /// fenced and their pages made whole at the new ones: a write-back's page is copied
    /// back in place, a swap-in's entry is shared (reference-counted) with the new page.
    pub fn remap(&self, pid: u32, from: u64, to: u64, len: u64) -> Result<(), MmError> {
        let len = len.next_multiple_of(PAGE);
        // What the destination held is gone (the kernel unmapped it).
        self.discard(pid, to..to + len, false);
        self.manage(pid, to..to + len)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let installer = self.installer_in(&st.mem, pid);
        let Some(space) = st.mem.spaces.get_mut(&pid) else {
            return Err(MmError::NoRange { pid, addr: from });
        };
        let moved: Vec<(u64, PageState)> = pages_in(space, from, from + len)
            .into_iter()
            .filter_map(|a| space.clear(a).map(|s| (a, s)))
            .collect();
        let clean: Vec<(u64, (usm_swap::SwapEntry, u128))> =
            pages_in_map(&space.clean, from, from + len)
                .into_iter()
                .filter_map(|a| space.clean.remove(&a).map(|c| (a, c)))
                .collect();
        let pins: Vec<(u64, u32)> = space
            .pins
            .iter()
            .filter(|(a, _)| (from..from + len).contains(*a))
            .map(|(a, n)| (*a, *n))
            .collect();
        for (a, _) in &pins {
            space.pins.remove(a);
        }
        // Hints follow the pages (before the eviction policy hears of them at `to`; the
        // old addresses lose theirs with the final discard).
        let hints: Vec<(Range<u64>, usm_policies::Hint)> = space
            .hints
            .iter()
            .filter(|(r, _)| r.start < from + len && from < r.end)
            .map(|(r, h)| (r.start.max(from)..r.end.min(from + len), *h))
            .collect();
        for (r, h) in &hints {
            space.hints.apply(to + (r.start - from), r.end - r.start, h);
        }
        let region = space.range_of(to).map_or(0, |(_, r)| r.id);
        let owner = FrameOwner { pid, region };
        let mut census = [0usize; 9];
        let mut remapped = Vec::new();
        for (old, state) in moved {
            census[match &state {
                PageState::Resident(_) => 0,
                PageState::Sampled(_) => 1,
                PageState::Copied => 2,
                PageState::Leaving { .. } => 3,
                PageState::Staging { .. } => 4,
                PageState::Swapped(_) => 5,
                PageState::SwapIn { .. } => 6,
                PageState::Poisoned => 7,
            }] += 1;
            let new = to + (old - from);
            let state = match state {
                PageState::Resident(f)
                | PageState::Sampled(f)
                | PageState::Leaving { frame: f, .. } => {
                    // The stage of a Leaving page finishes at its frame's new address; the
                    // eviction policy hears of the pages it tracks at their new place.
                    let _ = self.pool.set_owner(f, owner, new);
                    if matches!(
                        state,
                        PageState::Resident(_)
                            | PageState::Sampled(_)
                            | PageState::Leaving { entry: None, .. }
                    ) {
                        st.evict.on_free(f);
                        remapped.push(usm_policies::MappedPage {
                            frame: f,
                            pid,
                            addr: new,
                        });
                    }
                    state
                }
                PageState::Staging { frame, entry, .. } => {
                    // Its write-back is keyed to the old address: fenced when it completes.
                    // The page comes back in place now (COPY works while the write reads
                    // the slot); if it cannot, the new page shares the entry.
                    let _ = self.pool.set_owner(frame, owner, new);
                    if matches!(installer.unstage(&self.pool, frame), Ok(true)) {
                        PageState::Resident(frame)
                    } else {
                        let _ = st.mem.swap.dup(entry);
                        st.mem.orphans.insert(frame);
                        // Not readable before its write lands (see `MemState::unwritten`).
                        st.mem.unwritten.insert(entry);
                        PageState::Swapped(entry)
                    }
                }
                PageState::SwapIn { entry, .. } => {
                    // The read in flight is fenced (it frees its frame and its reference).
                    let _ = st.mem.swap.dup(entry);
                    PageState::Swapped(entry)
                }
                other => other,
            };
            space.set(new, state);
        }
        tracing::debug!(pid, from = format_args!("{from:#x}"), to = format_args!("{to:#x}"), len, moved = ?census, "remap applied");
        for (a, c) in clean {
            space.clean.insert(to + (a - from), c);
        }
        for (a, n) in pins {
            space.pins.insert(to + (a - from), n);
        }
        let mut view = super::MemView {
            pool: &self.pool,
            mem: &st.mem,
        };
        for v in remapped {
            st.evict.on_map(v, &mut view);
        }
        // The old addresses are no longer managed (the kernel unmapped them).
        drop(guard);
        self.discard(pid, from..from + len, false);
        Ok(())
    }

    /// A fork child `child` of `parent`, whose pages `installer` serves: its space is
    /// the parent's ranges (new generations) and pages, the child's own view of them:
    /// - resident pages are shared copy-on-write by the kernel: `Copied` in the child
    ///   (its memory, not the pool's; never evicted through the child);
    /// - pages out in a staging slot (write-back, sampling) are holes in the child too:
    ///   it gets a copy of the staged content now (`Copied`);
    /// - swapped pages (and swap-ins in flight) share the parent's swap entry
    ///   (reference-counted: each side frees its own reference);
    /// - pages being taken out of the parent (`Leaving`) share the entry their write-back
    ///   goes to, and the child waits until the stage ends (`fork_wait`: the content is
    ///   copied from the frame then); an access sample in flight (no entry) is `Copied`
    ///   in the child, which waits the same way.
    pub fn fork_space(
        &self,
        parent: u32,
        child: u32,
        installer: Arc<dyn Installer>,
    ) -> Result<(), MmError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let p = st.mem.spaces.get(&parent).ok_or(MmError::NoRange {
            pid: parent,
            addr: 0,
        })?;
        let mut space = Space::new(child);
        let spec = p.alloc.as_ref().map(|a| a.spec.clone()).unwrap_or_else(|| {
            self.registry
                .default_spec(PolicyKind::Alloc)
                .unwrap_or("first-fit")
                .to_owned()
        });
        space.alloc = Some(SpacePolicy {
            policy: Some(self.registry.build_alloc(&spec)?),
            spec,
        });
        space.hints = p.hints.clone();
        for (&s, r) in &p.ranges {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let mut nr = shared_range(r.end, generation);
            nr.id = r.id;
            space.ranges.insert(s, nr);
        }
        let pages: Vec<(u64, PageState)> = p.pages.iter().map(|(&a, s)| (a, s.clone())).collect();
        let mut copied_staged = 0usize;
        let mut waits = 0usize;
        for (a, state) in pages {
            let child_state = match state {
                PageState::Resident(_) | PageState::Copied => PageState::Copied,
                PageState::Sampled(f) | PageState::Staging { frame: f, .. } => {
                    match installer.copy_staged(&self.pool, f, a) {
                        Ok(true) => {
                            copied_staged += 1;
                            PageState::Copied
                        }
                        other => {
                            tracing::error!(
                                ?other,
                                addr = a,
                                child,
                                "a fork child's copy of a staged page failed: poisoned"
                            );
                            let _ = installer.poison(&self.pool, a);
                            PageState::Poisoned
                        }
                    }
                }
                // A page being taken out of the parent: its content goes to `entry`
                // (or, if it stays, the child has its own copy and never faults here);
                // the child waits until the stage ends (`fork_wait`).
                PageState::Swapped(e)
                | PageState::SwapIn { entry: e, .. }
                | PageState::Leaving { entry: Some(e), .. } => match st.mem.swap.dup(e) {
                    Ok(_) => {
                        if matches!(state, PageState::Leaving { .. }) {
                            fork_wait::record(&mut st.mem, parent, a, Some(e), child);
                            waits += 1;
                        }
                        PageState::Swapped(e)
                    }
                    Err(err) => {
                        tracing::error!(error = %err, addr = a, child, "sharing a swap entry with a fork child failed: poisoned");
                        let _ = installer.poison(&self.pool, a);
                        PageState::Poisoned
                    }
                },
                // An access sample in flight (no swap entry): the child waits for its
                // stage like for an eviction's, and gets the content from the frame
                // (`Copied` meanwhile: its faults wait); the parent's page stays sampled.
                PageState::Leaving { entry: None, .. } => {
                    fork_wait::record(&mut st.mem, parent, a, None, child);
                    waits += 1;
                    PageState::Copied
                }
                PageState::Poisoned => {
                    let _ = installer.poison(&self.pool, a);
                    PageState::Poisoned
                }
            };
            space.set(a, child_state);
        }
        space.installer = Some(installer);
        if copied_staged > 0 || waits > 0 {
            tracing::debug!(
                child,
                copied_staged,
                waits,
                "fork child got copies of staged pages, and waits for pages being evicted"
            );
        }
        st.mem.spaces.insert(child, space);
        Ok(())
    }

    /// Process `pid` exited: every frame and slot of its space goes back.
    pub fn remove_space(&self, pid: u32) -> RangeRelease {
        let mut guard = self.lock();
        let st = &mut *guard;
        let installer = self.installer_in(&st.mem, pid);
        let mut rel = RangeRelease::default();
        let Some(space) = st.mem.spaces.get(&pid) else {
            return rel;
        };
        let addrs: Vec<u64> = space.pages.keys().copied().collect();
        for addr in addrs {
            self.release_page(&mut st.mem, &mut st.evict, &*installer, pid, addr, &mut rel);
        }
        st.mem.spaces.remove(&pid);
        rel
    }

    /// One piece of a split range, ending at `end`: the first piece keeps the range
    /// (and its own policy, if it had one); later pieces get a new instance of its spec.
    fn piece(
        &self,
        own: &mut Option<ManagedRange>,
        end: u64,
        generation: u64,
        id: u32,
        spec: &str,
    ) -> ManagedRange {
        if let Some(mut r) = own.take() {
            r.end = end;
            return r;
        }
        let mut r = shared_range(end, generation);
        r.id = id;
        if !spec.is_empty() {
            r.alloc_spec = spec.to_owned();
            r.alloc = self.registry.build_alloc(spec).ok();
        }
        r
    }

    /// Turns eviction on or off (the daemon turns it off to give every page back).
    pub fn set_eviction(&self, on: bool) {
        self.eviction.store(on, Ordering::Release);
    }

    /// Counters of every space, by pid.
    pub fn all_space_counters(&self) -> Vec<(u32, crate::SpaceCounters)> {
        self.lock()
            .mem
            .spaces
            .iter()
            .map(|(&p, s)| (p, s.counters))
            .collect()
    }

    /// Pages of `pid` whose content is away (in staging or swap) or may be (leaving),
    /// with their addresses: what must come back before the process can run without the
    /// memory manager.
    pub fn away_pages(&self, pid: u32) -> Vec<u64> {
        let st = self.lock();
        st.mem.spaces.get(&pid).map_or_else(Vec::new, |s| {
            let mut v: Vec<u64> = s
                .pages
                .iter()
                .filter(|(_, p)| p.is_away())
                .map(|(&a, _)| a)
                .collect();
            v.sort_unstable();
            v
        })
    }

    /// The names of `pid`'s allocation policy (space-level), and the global eviction and
    /// OOM policies.
    pub fn policy_names(&self, pid: u32) -> (String, String, String) {
        let st = self.lock();
        let alloc = st
            .mem
            .spaces
            .get(&pid)
            .and_then(|s| s.alloc.as_ref())
            .and_then(|a| {
                a.policy
                    .as_ref()
                    .map(|p| p.name().to_owned())
                    .or(Some(a.spec.clone()))
            })
            .unwrap_or_default();
        (alloc, st.evict.name().to_owned(), st.oom.name().to_owned())
    }
}

impl WorkerMm {
    /// Tells `pid`'s space-level allocation policy something (a new process, an exit, a
    /// free, a hint) through `call`, with a full [`Cx`] on this worker. A panic is
    /// contained like one on a fault: frames the call took are given back and the
    /// policy is replaced by the registry's default (logged, counted).
    pub fn notify_alloc(&mut self, pid: u32, call: impl FnOnce(&mut dyn AllocPolicy, &mut dyn Cx)) {
        let core = self.core.clone();
        let mut guard = core.lock();
        let st = &mut *guard;
        let Some((spec, mut policy)) = st
            .mem
            .spaces
            .get_mut(&pid)
            .and_then(|s| s.alloc.as_mut())
            .and_then(|a| a.policy.take().map(|p| (a.spec.clone(), p)))
        else {
            return;
        };
        let name = policy.name().to_owned();
        let mut cx = WorkerCx::new(&core, st, &mut self.io, self.worker);
        let r = guarded(&name, || call(policy.as_mut(), &mut cx));
        cx.restore_taken();
        cx.balance();
        drop(cx);
        if r.is_err() {
            let fallback = core
                .registry
                .default_spec(PolicyKind::Alloc)
                .unwrap_or("first-fit")
                .to_owned();
            match core.registry.build_alloc(&fallback) {
                Ok(p) => policy = p,
                Err(e) => tracing::error!(error = %e, "cannot build the default policy"),
            }
            tracing::error!(policy = %name, replacement = %fallback, spec = %spec, pid,
                "allocation policy panicked in a notification; frames it held were taken back and the process now uses the default policy");
            MmStats::bump(&core.stats.counters.policy_panics);
            if let Some(space) = st.mem.spaces.get_mut(&pid) {
                space.counters.policy_panics += 1;
            }
        }
        if let Some(a) = st.mem.spaces.get_mut(&pid).and_then(|s| s.alloc.as_mut()) {
            a.policy = Some(policy);
        }
        drop(guard);
        let _ = self.io.engine.submit();
    }
}

/// A range that uses its space's allocation policy.
fn shared_range(end: u64, generation: u64) -> ManagedRange {
    ManagedRange {
        end,
        generation,
        id: 0,
        alloc_spec: String::new(),
        alloc: None,
    }
}

/// Starts of the ranges of `space` that overlap `[start, end)`.
fn ranges_overlapping(space: &Space, start: u64, end: u64) -> Vec<u64> {
    let mut v: Vec<u64> = space.ranges.range(start..end).map(|(&s, _)| s).collect();
    if let Some((s, _)) = space.range_of(start)
        && s < start
    {
        v.push(s);
    }
    v
}

/// Page addresses of `space` with a state in `[start, end)`: walks the range when it is
/// smaller than the map, else filters the map.
fn pages_in(space: &Space, start: u64, end: u64) -> Vec<u64> {
    let n = (end - start) / PAGE;
    if (n as usize) < space.pages.len() {
        (0..n)
            .map(|i| start + i * PAGE)
            .filter(|a| space.pages.contains_key(a))
            .collect()
    } else {
        space
            .pages
            .keys()
            .copied()
            .filter(|a| (start..end).contains(a))
            .collect()
    }
}

fn pages_in_map<V>(map: &std::collections::HashMap<u64, V>, start: u64, end: u64) -> Vec<u64> {
    map.keys()
        .copied()
        .filter(|a| (start..end).contains(a))
        .collect()
}
