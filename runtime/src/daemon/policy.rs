//! The configured policies of one managed address space, and the daemon's
//! [`usm_policies::Cx`] for them.
//!
//! Every [`PageMap`](super::space::PageMap) owns the policies of its process, built from
//! the daemon's [`Registry`] by process name at admission (a fork child gets fresh
//! instances of the same specs and a copy of the parent's hints):
//!
//! | part | where | who calls it |
//! |---|---|---|
//! | allocation + OOM policy ([`AllocSide`]) | `PageMap::policy` | the workee serving a fault on a vacant page, under the map lock |
//! | eviction policy, hints, frame tokens ([`Victims`]) | `PageMap::fifo` | the map on every install / free / evict; the evictor through `pop_front` |
//!
//! # Frames in the daemon
//! A daemon "frame" is one page of the pool budget it mapped into a program with
//! `UFFDIO_COPY` (the content lives in the program, not in the daemon). So:
//! - [`FaultCx::take_frame`] reserves one unit of the budget (`frames_used`) and hands
//!   the policy a token [`FrameNo`]; `give_frame` gives the unit back; tokens still taken
//!   when the call returns and not in the returned mapping are reclaimed (and logged).
//! - [`Victims`] gives each *resident, charged* page a stable [`FrameNo`] of its own, so
//!   an eviction policy can track it as a [`MappedPage`]; the number is released when the
//!   page leaves (evicted, freed, unmapped, exit).
//!
//! # Panics
//! Every policy call goes through [`guarded`]. A panic is logged and counted
//! (`policy_panics`), the frames the call took are given back, and the panicked instance
//! is replaced by the registry's default of its kind (or the built-in `first-fit` /
//! `fifo` / `fail` when the default is the policy that panicked); a replaced eviction
//! policy is told about every page the old one tracked. The fault is then served by the
//! replacement: the daemon keeps serving.
//!
//! # What the daemon can and cannot offer a policy (cross-process)
//! - `region`: the range the tagger registered around the fault (`RegisterRange`), or
//!   `None` before it arrived (a policy then maps one page).
//! - `vacant`: pages inside that range the daemon holds nothing for.
//! - Pages with content (evicted: in staging, cache or swap) never reach the allocation
//!   policy: the daemon restores them itself (what every built-in policy's
//!   [`swap_in_if_swapped`](usm_policies::swap_in_if_swapped) would do), because the
//!   content comes back through a cross-process copy, not a frame. So `take_staged` and
//!   `swap_entry` answer `None`.
//! - `evict`: eviction needs the tagger's agent and cannot run under the map lock; the
//!   request is recorded and carried out by the faulting workee right after the call
//!   (for a policy answering `Oom`, like `quota` at its cap). It returns 0 (nothing taken
//!   out yet).
//! - Access information: a page is *accessed* when it is mapped (fault or swap-in) or
//!   faults again while resident; [`EvictCx::access`] tests and clears that bit. There
//!   is no sampling of hot pages beyond faults (no `page_idle` yet).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use usm_sync::Arc;
use usm_sync::atomic::{AtomicU64, Ordering};

use usm_kmod::FrameNo;
use usm_policies::builtin::{FailOom, Fifo, FirstFit};
use usm_policies::{
    Access, AllocPolicy, Cx, EvictCx, EvictPolicy, Hint, HintMap, MappedPage, OomPolicy, PageMask,
    PolicyKind, PolicyPanic, ProcessCounters, Registry, Scope, Urgency, VictimRequest, Watermarks,
    guarded,
};
use usm_swap::{SwapEntry, Ticket};

use super::space::PageState;
use super::sys::PAGE;

/// The allocation and OOM policies of one address space.
pub(crate) struct AllocSide {
    registry: Arc<Registry>,
    /// The process name the policies were assigned by (a fork child keeps its parent's).
    pub(crate) assigned_to: String,
    pub(crate) alloc: Box<dyn AllocPolicy>,
    /// `alloc.name()`, kept so a guarded call needs no allocation.
    pub(crate) alloc_name: String,
    pub(crate) oom: Box<dyn OomPolicy>,
}

/// The spec to fall back to after a policy of `kind` named `failed` panicked: the
/// registry's default of that kind, unless that is the policy that failed.
fn fallback_spec(registry: &Registry, kind: PolicyKind, failed: &str) -> Option<String> {
    registry
        .default_spec(kind)
        .filter(|d| *d != failed && usm_policies::split_spec(d).0 != failed)
        .map(str::to_owned)
}

/// Logs a caught panic.
pub(crate) fn log_panic(pid: u32, e: &PolicyPanic, replacement: &str) {
    tracing::error!("pid {pid}: {e}; replaced by `{replacement}`, the daemon keeps serving");
}

impl AllocSide {
    /// Replaces the allocation policy after a panic; returns the new policy's name.
    pub(crate) fn replace_alloc(&mut self) -> String {
        let failed = self.alloc.name().to_owned();
        self.alloc = fallback_spec(&self.registry, PolicyKind::Alloc, &failed)
            .and_then(|s| self.registry.build_alloc(&s).ok())
            .unwrap_or_else(|| Box::new(FirstFit));
        self.alloc_name = self.alloc.name().to_owned();
        self.alloc_name.clone()
    }

    /// Replaces the OOM policy after a panic; returns the new policy's name.
    pub(crate) fn replace_oom(&mut self) -> String {
        let failed = self.oom.name().to_owned();
        self.oom = fallback_spec(&self.registry, PolicyKind::Oom, &failed)
            .and_then(|s| self.registry.build_oom(&s).ok())
            .unwrap_or_else(|| Box::new(FailOom));
        self.oom.name().to_owned()
    }
}

/// Builds the policies of a process named `name` (the defaults for kinds the config does
/// not assign it; all defaults when it assigns nothing).
pub(crate) fn build(
    registry: &Arc<Registry>,
    name: &str,
    pid: u32,
) -> Result<(AllocSide, Victims), usm_policies::PolicyError> {
    let set = match registry.for_process(name)? {
        Some(set) => set,
        None => registry.defaults()?,
    };
    Ok((
        AllocSide {
            registry: registry.clone(),
            assigned_to: name.to_owned(),
            alloc_name: set.alloc.name().to_owned(),
            alloc: set.alloc,
            oom: set.oom,
        },
        Victims::new(registry.clone(), set.evict, pid),
    ))
}

/// The eviction policy of one address space, the hints, and the frame numbers of its
/// resident pages. Kept in the map's `fifo` field: the evictor asks it for victims with
/// `pop_front` (one page at a time) and gives back one it could not take with
/// `push_front`.
pub(crate) struct Victims {
    registry: Arc<Registry>,
    policy: Box<dyn EvictPolicy>,
    /// `policy.name()`, kept so a guarded call needs no allocation.
    name: String,
    /// Hints from `usm_hint` (what `EvictCx::hint` reads).
    pub(crate) hints: HintMap,
    pid: u32,
    frame_of: HashMap<u64, u32>,
    page_of: HashMap<u32, u64>,
    free_ids: Vec<u32>,
    next_id: u32,
    touched: HashSet<u32>,
    /// Victims still to choose with hard urgency (an OOM policy's `EvictHarder`).
    pub(crate) hard: usize,
    /// Pages the allocation policy asked to evict from this process (`Cx::evict`).
    pub(crate) requested: usize,
    /// Panics of the eviction policy so far.
    pub(crate) panics: u64,
}

/// What an eviction policy sees: hints and access bits, keyed by this map's frame numbers.
struct EvictView<'a> {
    hints: &'a HintMap,
    touched: &'a mut HashSet<u32>,
}

impl EvictCx for EvictView<'_> {
    fn access(&mut self, frame: FrameNo) -> Access {
        Access {
            accessed: self.touched.remove(&frame.0),
            written: true,
        }
    }

    fn is_pinned(&self, _frame: FrameNo) -> bool {
        false
    }

    fn hint(&self, _pid: u32, addr: u64) -> Hint {
        self.hints.hint_at(addr)
    }
}

impl Victims {
    fn new(registry: Arc<Registry>, policy: Box<dyn EvictPolicy>, pid: u32) -> Victims {
        Victims {
            registry,
            name: policy.name().to_owned(),
            policy,
            hints: HintMap::new(),
            pid,
            frame_of: HashMap::new(),
            page_of: HashMap::new(),
            free_ids: Vec::new(),
            next_id: 0,
            touched: HashSet::new(),
            hard: 0,
            requested: 0,
            panics: 0,
        }
    }

    /// Fresh policies of the same assignment for a fork child, with the parent's hints.
    pub(crate) fn for_child(&self, alloc: &AllocSide) -> (AllocSide, Victims) {
        let (a, mut v) = match build(&self.registry, &alloc.assigned_to, 0) {
            Ok(built) => built,
            Err(e) => {
                tracing::warn!("fork child: {e}; it gets the built-in policies");
                (
                    AllocSide {
                        registry: self.registry.clone(),
                        assigned_to: alloc.assigned_to.clone(),
                        alloc_name: FirstFit::NAME.to_owned(),
                        alloc: Box::new(FirstFit),
                        oom: Box::new(FailOom),
                    },
                    Victims::new(self.registry.clone(), Box::new(Fifo::new()), 0),
                )
            }
        };
        v.hints = self.hints.clone();
        (a, v)
    }

    /// The eviction policy's name.
    pub(crate) fn policy_name(&self) -> &str {
        &self.name
    }

    fn replace_after_panic(&mut self, e: &PolicyPanic) {
        self.panics += 1;
        let failed = self.policy.name().to_owned();
        self.policy = fallback_spec(&self.registry, PolicyKind::Evict, &failed)
            .and_then(|s| self.registry.build_evict(&s).ok())
            .unwrap_or_else(|| Box::new(Fifo::new()));
        self.name = self.policy.name().to_owned();
        log_panic(self.pid, e, &self.name);
        // The new instance tracks nothing yet: announce every resident page.
        let pages: Vec<(u32, u64)> = self.page_of.iter().map(|(&f, &a)| (f, a)).collect();
        for (frame, addr) in pages {
            if self.announce(frame, addr, true).is_err() {
                break; // the built-in fallback panicking too: give up announcing
            }
        }
    }

    /// Tells the eviction policy that page `addr` is resident as frame `frame` (during a
    /// `replacement`, the new instance learning the resident set).
    fn announce(&mut self, frame: u32, addr: u64, replacement: bool) -> Result<(), PolicyPanic> {
        let page = MappedPage {
            frame: FrameNo(frame),
            pid: self.pid,
            addr,
        };
        let mut view = EvictView {
            hints: &self.hints,
            touched: &mut self.touched,
        };
        let name = if replacement {
            "replacement"
        } else {
            &self.name
        };
        let policy = &mut self.policy;
        guarded(name, || policy.on_map(page, &mut view))
    }

    /// A resident, charged page was installed (fault, swap-in, reverted eviction).
    pub(crate) fn on_map(&mut self, addr: u64) {
        let id = match self.frame_of.get(&addr) {
            Some(&id) => id,
            None => {
                let id = self.free_ids.pop().unwrap_or_else(|| {
                    self.next_id += 1;
                    self.next_id
                });
                self.frame_of.insert(addr, id);
                self.page_of.insert(id, addr);
                id
            }
        };
        self.touched.insert(id);
        if let Err(e) = self.announce(id, addr, false) {
            self.replace_after_panic(&e);
        }
    }

    /// A resident page left (evicted, freed, unmapped): its frame number is released.
    pub(crate) fn on_gone(&mut self, addr: u64) {
        let Some(id) = self.frame_of.remove(&addr) else {
            return;
        };
        self.page_of.remove(&id);
        self.touched.remove(&id);
        self.free_ids.push(id);
        let policy = &mut self.policy;
        if let Err(e) = guarded(&self.name, || policy.on_free(FrameNo(id))) {
            self.replace_after_panic(&e);
        }
    }

    /// A resident page faulted again (the program touched it): access information.
    pub(crate) fn touch(&mut self, addr: u64) {
        if let Some(&id) = self.frame_of.get(&addr) {
            self.touched.insert(id);
            let policy = &mut self.policy;
            let access = Access {
                accessed: true,
                written: true,
            };
            if let Err(e) = guarded(&self.name, || policy.on_access(FrameNo(id), access)) {
                self.replace_after_panic(&e);
            }
        }
    }

    /// Records a hint and tells the eviction policy.
    pub(crate) fn on_hint(&mut self, range: Range<u64>, hint: &Hint) {
        self.hints
            .apply(range.start, range.end.saturating_sub(range.start), hint);
        let mut view = EvictView {
            hints: &self.hints,
            touched: &mut self.touched,
        };
        let (policy, pid) = (&mut self.policy, self.pid);
        if let Err(e) = guarded(&self.name, || policy.on_hint(pid, range, hint, &mut view)) {
            self.replace_after_panic(&e);
        }
    }

    /// Moves the hints of `[from, from + len)` to `to` (mremap).
    pub(crate) fn move_hints(&mut self, from: u64, to: u64, len: u64) {
        let end = from.saturating_add(len);
        let moved: Vec<(Range<u64>, Hint)> = self
            .hints
            .iter()
            .filter(|(r, _)| r.start < end && from < r.end)
            .map(|(r, h)| (r.start.max(from)..r.end.min(end), *h))
            .collect();
        if moved.is_empty() {
            return;
        }
        self.hints.remove(from, len);
        for (r, h) in moved {
            self.hints.apply(r.start - from + to, r.end - r.start, &h);
        }
    }

    /// The next victim chosen by the eviction policy (it stops tracking it), or `None`.
    /// The caller takes it out of the program or gives it back with
    /// [`push_front`](Self::push_front).
    pub(crate) fn pop_front(&mut self) -> Option<u64> {
        for _ in 0..2 {
            let urgency = if self.hard > 0 {
                Urgency::Hard
            } else {
                Urgency::Normal
            };
            let req = VictimRequest {
                want: 1,
                scope: Scope::Any,
                urgency,
            };
            let mut out = Vec::with_capacity(1);
            let mut view = EvictView {
                hints: &self.hints,
                touched: &mut self.touched,
            };
            let policy = &mut self.policy;
            match guarded(&self.name, || policy.victims(req, &mut view, &mut out)) {
                Ok(_) => {
                    for v in out {
                        if self.page_of.get(&v.frame.0) == Some(&v.addr) {
                            self.hard = self.hard.saturating_sub(1);
                            return Some(v.addr);
                        }
                    }
                    return None;
                }
                Err(e) => self.replace_after_panic(&e),
            }
        }
        None
    }

    /// The evictor could not take `addr` out: it is tracked again.
    pub(crate) fn push_front(&mut self, addr: u64) {
        self.on_map(addr);
    }

    /// Everything is gone (exit).
    pub(crate) fn clear(&mut self) {
        let pages: Vec<u64> = self.frame_of.keys().copied().collect();
        for a in pages {
            self.on_gone(a);
        }
    }
}

/// The daemon's [`Cx`] for one allocation (or hint) call on one process, built under its
/// map lock.
pub(crate) struct FaultCx<'a> {
    pub(crate) pages: &'a HashMap<u64, PageState>,
    pub(crate) victims: &'a mut Victims,
    pub(crate) frames_used: &'a AtomicU64,
    pub(crate) pool: u64,
    pub(crate) marks: Watermarks,
    /// The registered range around the fault, if the tagger announced it.
    pub(crate) region: Option<Range<u64>>,
    pub(crate) counters: ProcessCounters,
    /// Tokens handed out and not given back.
    pub(crate) taken: Vec<FrameNo>,
    next_token: u32,
    /// The policy called `swap_in` (it cannot have a reason to: no page it sees has
    /// content).
    pub(crate) misused: bool,
}

impl<'a> FaultCx<'a> {
    /// A context over one locked map.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pages: &'a HashMap<u64, PageState>,
        victims: &'a mut Victims,
        frames_used: &'a AtomicU64,
        pool: u64,
        marks: Watermarks,
        region: Option<Range<u64>>,
        counters: ProcessCounters,
    ) -> FaultCx<'a> {
        FaultCx {
            pages,
            victims,
            frames_used,
            pool,
            marks,
            region,
            counters,
            taken: Vec::new(),
            next_token: 0,
            misused: false,
        }
    }

    fn token(&mut self) -> FrameNo {
        self.next_token += 1;
        let f = FrameNo(self.next_token);
        self.taken.push(f);
        f
    }

    /// Gives back every reserved unit still taken (after a panic or a refused decision).
    pub(crate) fn reclaim_all(&mut self) -> u64 {
        let n = self.taken.len() as u64;
        if n > 0 {
            self.frames_used.fetch_sub(n, Ordering::AcqRel);
        }
        self.taken.clear();
        n
    }

    /// Takes the tokens of a returned mapping out of the taken list; the units stay
    /// reserved for the install. Returns tokens that were not taken from this context
    /// (a policy bug) as `false`.
    pub(crate) fn claim(&mut self, frames: &[FrameNo]) -> bool {
        for f in frames {
            match self.taken.iter().position(|t| t == f) {
                Some(i) => {
                    self.taken.swap_remove(i);
                }
                None => return false,
            }
        }
        true
    }
}

impl EvictCx for FaultCx<'_> {
    fn access(&mut self, frame: FrameNo) -> Access {
        Access {
            accessed: self.victims.touched.remove(&frame.0),
            written: true,
        }
    }

    fn is_pinned(&self, _frame: FrameNo) -> bool {
        false
    }

    fn hint(&self, _pid: u32, addr: u64) -> Hint {
        self.victims.hints.hint_at(addr)
    }
}

impl Cx for FaultCx<'_> {
    fn take_frame(&mut self) -> Option<FrameNo> {
        super::space::try_reserve(self.frames_used, 1, self.pool).then(|| self.token())
    }

    fn take_frames(&mut self, n: usize, out: &mut Vec<FrameNo>) -> bool {
        if n == 0 {
            return true;
        }
        if !super::space::try_reserve(self.frames_used, n as u64, self.pool) {
            return false;
        }
        for _ in 0..n {
            let f = self.token();
            out.push(f);
        }
        true
    }

    fn give_frame(&mut self, frame: FrameNo) {
        if let Some(i) = self.taken.iter().position(|t| *t == frame) {
            self.taken.swap_remove(i);
            self.frames_used.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn free_frames(&self) -> usize {
        self.pool
            .saturating_sub(self.frames_used.load(Ordering::Acquire)) as usize
    }

    fn watermarks(&self) -> Watermarks {
        self.marks
    }

    fn region(&self, _pid: u32, addr: u64) -> Option<Range<u64>> {
        self.region.clone().filter(|r| r.contains(&addr))
    }

    fn vacant(&self, _pid: u32, start: u64, npages: usize, out: &mut PageMask) {
        out.clear();
        let Some(region) = &self.region else {
            return;
        };
        for i in 0..npages.min(PageMask::CAPACITY) {
            let a = start + i as u64 * PAGE;
            if region.contains(&a) && !self.pages.contains_key(&a) {
                out.set(i);
            }
        }
    }

    fn take_staged(&mut self, _pid: u32, _addr: u64) -> Option<FrameNo> {
        None
    }

    fn swap_entry(&self, _pid: u32, _addr: u64) -> Option<SwapEntry> {
        None
    }

    fn swap_in(&mut self, _pid: u32, _addr: u64, _entry: SwapEntry, frame: FrameNo) -> Ticket {
        self.misused = true;
        self.give_frame(frame);
        Ticket(0)
    }

    fn counters(&self, _pid: u32) -> ProcessCounters {
        self.counters
    }

    fn evict(&mut self, req: VictimRequest) -> usize {
        self.victims.requested += req.want;
        if req.urgency == Urgency::Hard {
            self.victims.hard += req.want;
        }
        0
    }
}
