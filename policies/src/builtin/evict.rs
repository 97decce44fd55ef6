//! Built-in eviction policies: `fifo`, `clock`, `two-list`, `hints`.
//!
//! All of them keep their pages in [`Tracker`]s (intrusive lists indexed by frame number):
//! map, free, access and each candidate looked at are O(1), plus one O(log n) hint lookup
//! per candidate. All refuse pinned pages, and `EVICTION=DENY` pages unless the request is
//! [`Urgency::Hard`](crate::Urgency::Hard) and nothing else is left.

use std::ops::Range;

use usm_types::FrameNo;

use super::tracker::{PageMeta, Tracker};
use crate::cx::{Access, EvictCx};
use crate::error::PolicyError;
use crate::evict::{EvictPolicy, MappedPage, Scope, Urgency, VictimRequest, VictimScan};
use crate::hint::{Hint, Priority};

const NORMAL: usize = Priority::Normal.class();

/// Second chance: spare a page seen accessed since the hand last passed it.
fn clock_hand(meta: &mut PageMeta, frame: FrameNo, cx: &mut dyn EvictCx) -> bool {
    let seen = cx.access(frame).accessed;
    if meta.referenced || seen {
        meta.referenced = false;
        true
    } else {
        false
    }
}

/// First in, first out: the page mapped longest ago leaves first.
#[derive(Default)]
pub struct Fifo {
    pages: Tracker,
}

impl Fifo {
    /// The registered name.
    pub const NAME: &'static str = "fifo";

    /// An empty policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EvictPolicy for Fifo {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_map(&mut self, page: MappedPage, _cx: &mut dyn EvictCx) {
        self.pages.insert(page, NORMAL);
    }

    fn on_free(&mut self, frame: FrameNo) {
        self.pages.remove(frame);
    }

    fn victims(
        &mut self,
        req: VictimRequest,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
    ) -> VictimScan {
        self.pages.scan(req, &[NORMAL], 1, cx, out, |_, _, _| false)
    }

    fn tracked(&self) -> usize {
        self.pages.tracked()
    }
}

/// CLOCK (second chance): the oldest page leaves unless it was accessed since the hand
/// last passed — as told by [`EvictCx::access`] or by [`EvictPolicy::on_access`] — in
/// which case its bit is cleared and it goes to the back.
#[derive(Default)]
pub struct Clock {
    pages: Tracker,
}

impl Clock {
    /// The registered name.
    pub const NAME: &'static str = "clock";

    /// An empty policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EvictPolicy for Clock {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_map(&mut self, page: MappedPage, _cx: &mut dyn EvictCx) {
        self.pages.insert(page, NORMAL);
    }

    fn on_free(&mut self, frame: FrameNo) {
        self.pages.remove(frame);
    }

    fn on_access(&mut self, frame: FrameNo, access: Access) {
        if access.accessed {
            if let Some(m) = self.pages.meta_mut(frame) {
                m.referenced = true;
            }
        }
    }

    fn victims(
        &mut self,
        req: VictimRequest,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
    ) -> VictimScan {
        self.pages.scan(req, &[NORMAL], 2, cx, out, clock_hand)
    }

    fn tracked(&self) -> usize {
        self.pages.tracked()
    }
}

/// Two lists, as the kernel's LRU: pages start on an *inactive* list and move to an
/// *active* one when an access is reported while they are inactive
/// ([`EvictPolicy::on_access`]: with re-fault sampling, the access that brought a sampled
/// page back). Victims come only from the inactive list, CLOCK-style: a page the hand
/// reaches is asked about ([`EvictCx::access`]; re-fault sampling takes it out to its slot
/// and says "accessed") and goes round once more, and leaves if nothing was heard of it
/// when the hand comes back. Active pages are not looked at while the inactive list holds
/// at least `inactive_pct` % of the tracked pages; below that the oldest active pages are
/// moved, unasked, to the inactive list's tail.
///
/// Why, next to `clock`: `clock` asks about every page once per revolution, so with re-fault
/// sampling each page in use is taken out and faults back once per revolution, and there
/// are about as many of those re-faults as evictions when half the pool is in use. Here a
/// page in use is asked about only after it ages off the active list.
///
/// Parameter: `two-list:PCT`, the inactive share in percent (1–100, default
/// [`TwoList::DEFAULT_INACTIVE_PCT`]). The default policy: against `clock` on `usm-kv`
/// under pressure it took 50–88 % fewer sampled re-faults and up to 10 % fewer swap-ins
/// (`bench/results/kv.md`, run 10, which also compares shares of 20, 33 and 50 %).
pub struct TwoList {
    inactive: Tracker,
    active: Tracker,
    inactive_pct: usize,
}

impl TwoList {
    /// The registered name.
    pub const NAME: &'static str = "two-list";

    /// The default inactive share, in percent of the tracked pages.
    pub const DEFAULT_INACTIVE_PCT: usize = 20;

    /// An empty policy with the default inactive share.
    pub fn new() -> Self {
        TwoList {
            inactive: Tracker::default(),
            active: Tracker::default(),
            inactive_pct: Self::DEFAULT_INACTIVE_PCT,
        }
    }

    /// `two-list` or `two-list:PCT`.
    pub fn from_param(param: Option<&str>) -> Result<Self, PolicyError> {
        let mut p = Self::new();
        if let Some(t) = param {
            match t.trim().trim_end_matches('%').parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => p.inactive_pct = n,
                _ => {
                    return Err(PolicyError::BadParameter {
                        policy: Self::NAME.into(),
                        token: t.into(),
                        reason: "expected the inactive share in percent, 1 to 100".into(),
                    });
                }
            }
        }
        Ok(p)
    }

    /// Moves up to `n` of the oldest active pages in `scope` to the inactive tail.
    fn deactivate(&mut self, scope: Scope, n: usize) {
        for _ in 0..n {
            let Some((f, _)) = self.active.oldest(scope, NORMAL) else {
                return;
            };
            let Some(m) = self.active.remove(f) else {
                return;
            };
            self.inactive.insert(m.page(f), NORMAL);
        }
    }

    /// Refills the inactive list up to its share of all tracked pages, and in `scope` up
    /// to `want` pages (a process's quota may find its own inactive list empty).
    fn refill(&mut self, scope: Scope, want: usize) {
        let target = self.tracked() * self.inactive_pct / 100;
        self.deactivate(Scope::Any, target.saturating_sub(self.inactive.tracked()));
        let here = self.inactive.len_in(scope, NORMAL);
        self.deactivate(scope, want.saturating_sub(here));
    }
}

impl Default for TwoList {
    fn default() -> Self {
        Self::new()
    }
}

impl EvictPolicy for TwoList {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_map(&mut self, page: MappedPage, _cx: &mut dyn EvictCx) {
        self.on_free(page.frame);
        self.inactive.insert(page, NORMAL);
    }

    /// A victim that could not be evicted (pinned meanwhile, or its program is stopped and
    /// its agent refuses stages) goes to the active list, as the kernel activates a page it
    /// could not reclaim: on the short inactive list it would be chosen again at once,
    /// ahead of every page that can go.
    fn on_refused(&mut self, page: MappedPage, _cx: &mut dyn EvictCx) {
        self.on_free(page.frame);
        self.active.insert(page, NORMAL);
    }

    fn on_free(&mut self, frame: FrameNo) {
        if self.inactive.remove(frame).is_none() {
            self.active.remove(frame);
        }
    }

    fn on_access(&mut self, frame: FrameNo, access: Access) {
        if !access.accessed {
            return;
        }
        if let Some(m) = self.inactive.remove(frame) {
            self.active.insert(m.page(frame), NORMAL);
        }
    }

    fn victims(
        &mut self,
        req: VictimRequest,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
    ) -> VictimScan {
        let mut scan = VictimScan::default();
        // Round 1 from the inactive list as it is (refilled to its share), `DENY` pages
        // refused whatever the urgency; round 2, if that was not enough, after moving
        // every active page in scope over (each is then asked about once before it can
        // leave, as in `clock`), with the request's urgency: a `DENY` page goes only once
        // nothing else in scope can. The refusals reported are those of the last round
        // (it looked at every candidate the first one did).
        for round in 0..2 {
            let want = req.want - scan.chosen;
            let sub = if round == 0 {
                self.refill(req.scope, want);
                VictimRequest {
                    want,
                    urgency: Urgency::Normal,
                    ..req
                }
            } else {
                let n = self.active.len_in(req.scope, NORMAL);
                self.deactivate(req.scope, n);
                VictimRequest { want, ..req }
            };
            let s = self
                .inactive
                .scan(sub, &[NORMAL], 2, cx, out, |_, f, cx| cx.access(f).accessed);
            scan.chosen += s.chosen;
            scan.denied = s.denied;
            scan.pinned = s.pinned;
            if scan.chosen >= req.want {
                break;
            }
        }
        scan
    }

    fn tracked(&self) -> usize {
        self.inactive.tracked() + self.active.tracked()
    }
}

/// Application-aware eviction: CLOCK within three classes taken in the order
/// `PRIORITY=LOW`, `NORMAL`, `HIGH`; `EVICTION=DENY` pages refused. A page's class is read
/// from its hint when it is mapped and updated when a new hint covers it
/// (O(resident pages of that process) per hint call; hints are rare).
#[derive(Default)]
pub struct HintAware {
    pages: Tracker,
}

impl HintAware {
    /// The registered name.
    pub const NAME: &'static str = "hints";

    /// An empty policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EvictPolicy for HintAware {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_map(&mut self, page: MappedPage, cx: &mut dyn EvictCx) {
        let class = cx.hint(page.pid, page.addr).priority().class();
        self.pages.insert(page, class);
    }

    fn on_free(&mut self, frame: FrameNo) {
        self.pages.remove(frame);
    }

    fn on_access(&mut self, frame: FrameNo, access: Access) {
        if access.accessed {
            if let Some(m) = self.pages.meta_mut(frame) {
                m.referenced = true;
            }
        }
    }

    fn on_hint(&mut self, pid: u32, range: Range<u64>, hint: &Hint, cx: &mut dyn EvictCx) {
        if hint.priority.is_none() {
            return;
        }
        for frame in self.pages.frames_of(pid) {
            let Some(m) = self.pages.meta(frame).copied() else {
                continue;
            };
            if range.contains(&m.addr) {
                let class = cx.hint(pid, m.addr).priority().class();
                self.pages.reclass(frame, class);
            }
        }
    }

    fn victims(
        &mut self,
        req: VictimRequest,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
    ) -> VictimScan {
        let order = [
            Priority::Low.class(),
            Priority::Normal.class(),
            Priority::High.class(),
        ];
        self.pages.scan(req, &order, 2, cx, out, clock_hand)
    }

    fn tracked(&self) -> usize {
        self.pages.tracked()
    }
}
