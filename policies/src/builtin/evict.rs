//! Built-in eviction policies: `fifo`, `clock`, `hints`.
//!
//! All three keep their pages in a [`Tracker`] (intrusive lists indexed by frame number):
//! map, free, access and each candidate looked at are O(1), plus one O(log n) hint lookup
//! per candidate. All three refuse pinned pages, and `EVICTION=DENY` pages unless the
//! request is [`Urgency::Hard`](crate::Urgency::Hard) and nothing else is left.

use std::ops::Range;

use usm_types::FrameNo;

use super::tracker::{PageMeta, Tracker};
use crate::cx::{Access, EvictCx};
use crate::evict::{EvictPolicy, MappedPage, VictimRequest, VictimScan};
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
