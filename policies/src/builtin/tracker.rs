//! The page tracker shared by the built-in eviction policies: intrusive lists indexed by
//! frame number, so every operation (map, free, pick, second chance) is O(1).
//!
//! Every tracked frame sits on two doubly linked lists at once, threaded through two
//! `Vec`s of links indexed by `FrameNo`:
//! - a *global* list per priority class (order of arrival, or of last second chance);
//! - a *per-process* list per priority class, so a quota can evict its own pages in O(1).
//!
//! The fifo and clock policies use class `Normal` only; the hints policy uses all three.
//! "Rotating" a frame moves it to the tail of both its lists.

use std::collections::HashMap;

use usm_types::FrameNo;

use crate::cx::EvictCx;
use crate::evict::{MappedPage, Scope, Urgency, VictimRequest, VictimScan};

const NIL: u32 = u32::MAX;
const UNTRACKED: u8 = u8::MAX;
pub(crate) const CLASSES: usize = 3;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

#[derive(Clone, Copy, Debug)]
struct ListHead {
    head: u32,
    tail: u32,
    len: usize,
}

impl ListHead {
    const EMPTY: ListHead = ListHead {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

impl Default for ListHead {
    fn default() -> Self {
        ListHead::EMPTY
    }
}

/// One set of links (prev/next per frame).
#[derive(Default)]
struct Links {
    links: Vec<Link>,
}

impl Links {
    fn ensure(&mut self, f: u32) {
        let need = f as usize + 1;
        if self.links.len() < need {
            self.links.resize(
                need,
                Link {
                    prev: NIL,
                    next: NIL,
                },
            );
        }
    }

    fn push_back(&mut self, list: &mut ListHead, f: u32) {
        self.ensure(f);
        self.links[f as usize] = Link {
            prev: list.tail,
            next: NIL,
        };
        if list.tail == NIL {
            list.head = f;
        } else {
            self.links[list.tail as usize].next = f;
        }
        list.tail = f;
        list.len += 1;
    }

    fn unlink(&mut self, list: &mut ListHead, f: u32) {
        let Link { prev, next } = self.links[f as usize];
        if prev == NIL {
            list.head = next;
        } else {
            self.links[prev as usize].next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.links[next as usize].prev = prev;
        }
        self.links[f as usize] = Link {
            prev: NIL,
            next: NIL,
        };
        list.len -= 1;
    }
}

/// What the tracker keeps per frame.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageMeta {
    pub(crate) pid: u32,
    pub(crate) addr: u64,
    class: u8,
    /// Second-chance bit (set by pushed access reports).
    pub(crate) referenced: bool,
}

impl PageMeta {
    /// The tracked page `frame` backs.
    pub(crate) fn page(&self, frame: FrameNo) -> MappedPage {
        MappedPage {
            frame,
            pid: self.pid,
            addr: self.addr,
        }
    }

    const NONE: PageMeta = PageMeta {
        pid: 0,
        addr: 0,
        class: UNTRACKED,
        referenced: false,
    };
}

/// Tracked pages on global and per-process lists, per priority class.
#[derive(Default)]
pub(crate) struct Tracker {
    meta: Vec<PageMeta>,
    global: Links,
    global_lists: [ListHead; CLASSES],
    local: Links,
    local_lists: HashMap<u32, [ListHead; CLASSES]>,
    tracked: usize,
}

impl Tracker {
    pub(crate) fn tracked(&self) -> usize {
        self.tracked
    }

    pub(crate) fn meta(&self, f: FrameNo) -> Option<&PageMeta> {
        self.meta.get(f.index()).filter(|m| m.class != UNTRACKED)
    }

    pub(crate) fn meta_mut(&mut self, f: FrameNo) -> Option<&mut PageMeta> {
        self.meta
            .get_mut(f.index())
            .filter(|m| m.class != UNTRACKED)
    }

    /// Starts tracking `page` in `class` (re-tracking a tracked frame moves it).
    pub(crate) fn insert(&mut self, page: MappedPage, class: usize) {
        let f = page.frame.0;
        self.remove(page.frame);
        if self.meta.len() <= f as usize {
            self.meta.resize(f as usize + 1, PageMeta::NONE);
        }
        self.meta[f as usize] = PageMeta {
            pid: page.pid,
            addr: page.addr,
            class: class as u8,
            referenced: false,
        };
        self.global.push_back(&mut self.global_lists[class], f);
        let lists = self
            .local_lists
            .entry(page.pid)
            .or_insert([ListHead::EMPTY; CLASSES]);
        self.local.push_back(&mut lists[class], f);
        self.tracked += 1;
    }

    /// Stops tracking `f`; returns what it was.
    pub(crate) fn remove(&mut self, f: FrameNo) -> Option<PageMeta> {
        let m = *self.meta(f)?;
        let class = m.class as usize;
        self.global.unlink(&mut self.global_lists[class], f.0);
        if let Some(lists) = self.local_lists.get_mut(&m.pid) {
            self.local.unlink(&mut lists[class], f.0);
            if lists.iter().all(|l| l.len == 0) {
                self.local_lists.remove(&m.pid);
            }
        }
        self.meta[f.index()] = PageMeta::NONE;
        self.tracked -= 1;
        Some(m)
    }

    /// Moves `f` to the tail of its lists (a second chance, or a refused candidate).
    pub(crate) fn rotate(&mut self, f: FrameNo) {
        let Some(m) = self.meta(f).copied() else {
            return;
        };
        let class = m.class as usize;
        self.global.unlink(&mut self.global_lists[class], f.0);
        self.global.push_back(&mut self.global_lists[class], f.0);
        if let Some(lists) = self.local_lists.get_mut(&m.pid) {
            self.local.unlink(&mut lists[class], f.0);
            self.local.push_back(&mut lists[class], f.0);
        }
    }

    /// Moves `f` to another class (keeping its referenced bit).
    pub(crate) fn reclass(&mut self, f: FrameNo, class: usize) {
        if let Some(m) = self.meta(f).copied() {
            if m.class as usize != class {
                self.insert(m.page(f), class);
                if let Some(n) = self.meta_mut(f) {
                    n.referenced = m.referenced;
                }
            }
        }
    }

    fn front(&self, scope: Scope, class: usize) -> Option<(FrameNo, usize)> {
        let list = match scope {
            Scope::Any => self.global_lists[class],
            Scope::Process(pid) => self.local_lists.get(&pid)?[class],
        };
        (list.head != NIL).then_some((FrameNo(list.head), list.len))
    }

    /// The oldest tracked frame of `class` in `scope`, and how many of that class are in
    /// scope.
    pub(crate) fn oldest(&self, scope: Scope, class: usize) -> Option<(FrameNo, usize)> {
        self.front(scope, class)
    }

    /// How many frames of `class` are in `scope`.
    pub(crate) fn len_in(&self, scope: Scope, class: usize) -> usize {
        self.front(scope, class).map_or(0, |(_, n)| n)
    }

    /// Every tracked frame of `pid`, all classes (O(resident pages of pid)).
    pub(crate) fn frames_of(&self, pid: u32) -> Vec<FrameNo> {
        let mut out = Vec::new();
        if let Some(lists) = self.local_lists.get(&pid) {
            for l in lists {
                let mut f = l.head;
                while f != NIL {
                    out.push(FrameNo(f));
                    f = self.local.links[f as usize].next;
                }
            }
        }
        out
    }

    /// The common victim search: classes in `order`, oldest first, pinned pages and (with
    /// normal urgency) `DENY` pages refused, `second_chance` consulted for the rest (it
    /// returns true to spare a page, which is then rotated). Each class list is walked at
    /// most `passes` times its length, so the search always ends.
    pub(crate) fn scan(
        &mut self,
        req: VictimRequest,
        order: &[usize],
        passes: usize,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
        mut second_chance: impl FnMut(&mut PageMeta, FrameNo, &mut dyn EvictCx) -> bool,
    ) -> VictimScan {
        let mut scan = VictimScan::default();
        let mut denied_spare: Vec<FrameNo> = Vec::new();
        for &class in order {
            let Some((_, len)) = self.front(req.scope, class) else {
                continue;
            };
            let mut budget = len.saturating_mul(passes);
            while scan.chosen < req.want && budget > 0 {
                let Some((f, _)) = self.front(req.scope, class) else {
                    break;
                };
                budget -= 1;
                let Some(m) = self.meta(f).copied() else {
                    break;
                };
                if cx.is_pinned(f) {
                    scan.pinned += 1;
                    self.rotate(f);
                    continue;
                }
                if cx.hint(m.pid, m.addr).denies_eviction() {
                    scan.denied += 1;
                    if req.urgency == Urgency::Hard {
                        denied_spare.push(f);
                    }
                    self.rotate(f);
                    continue;
                }
                let spared = match self.meta_mut(f) {
                    Some(meta) => second_chance(meta, f, cx),
                    None => false,
                };
                if spared {
                    self.rotate(f);
                    continue;
                }
                self.remove(f);
                out.push(m.page(f));
                scan.chosen += 1;
            }
        }
        // Hard urgency: DENY pages only once nothing else in scope could be taken.
        for f in denied_spare {
            if scan.chosen >= req.want {
                break;
            }
            if cx.is_pinned(f) {
                continue;
            }
            if let Some(m) = self.remove(f) {
                out.push(m.page(f));
                scan.chosen += 1;
            }
        }
        scan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn walk(links: &Links, list: &ListHead) -> Vec<u32> {
        let mut out = Vec::new();
        let mut f = list.head;
        while f != NIL {
            out.push(f);
            f = links.links[f as usize].next;
        }
        assert_eq!(out.len(), list.len);
        assert_eq!(out.last().copied().unwrap_or(NIL), list.tail);
        out
    }

    proptest! {
        /// The intrusive lists agree with a plain `Vec` model after any sequence of
        /// inserts, removes, rotations and reclassifications, globally and per process.
        #[test]
        fn lists_match_a_vec_model(ops in prop::collection::vec(
            (0u8..4, 0u32..40, 0u32..3, 0usize..CLASSES), 1..200)) {
            let mut t = Tracker::default();
            // model: frame -> (pid, class), plus per-class global order
            let mut order: [Vec<u32>; CLASSES] = Default::default();
            let mut owner: HashMap<u32, (u32, usize)> = HashMap::new();
            for (op, f, pid, class) in ops {
                let frame = FrameNo(f);
                match op {
                    0 => {
                        if let Some((_, c)) = owner.remove(&f) {
                            order[c].retain(|x| *x != f);
                        }
                        t.insert(MappedPage { frame, pid, addr: f as u64 * 4096 }, class);
                        order[class].push(f);
                        owner.insert(f, (pid, class));
                    }
                    1 => {
                        let got = t.remove(frame).map(|m| m.pid);
                        let want = owner.remove(&f).map(|(p, c)| {
                            order[c].retain(|x| *x != f);
                            p
                        });
                        prop_assert_eq!(got, want);
                    }
                    2 => {
                        t.rotate(frame);
                        if let Some((_, c)) = owner.get(&f) {
                            order[*c].retain(|x| *x != f);
                            order[*c].push(f);
                        }
                    }
                    _ => {
                        t.reclass(frame, class);
                        if let Some((_, c)) = owner.get_mut(&f) {
                            if *c != class {
                                order[*c].retain(|x| *x != f);
                                order[class].push(f);
                                *c = class;
                            }
                        }
                    }
                }
                prop_assert_eq!(t.tracked(), owner.len());
                for c in 0..CLASSES {
                    prop_assert_eq!(&walk(&t.global, &t.global_lists[c]), &order[c]);
                    for p in 0..3u32 {
                        let want: Vec<u32> = order[c]
                            .iter()
                            .copied()
                            .filter(|x| owner[x].0 == p)
                            .collect();
                        let got = t.local_lists.get(&p).map_or_else(Vec::new, |l| walk(&t.local, &l[c]));
                        prop_assert_eq!(got, want, "pid {} class {}", p, c);
                    }
                }
            }
        }
    }
}
