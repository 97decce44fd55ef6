//! What an allocation policy answers for one fault.

use usm_types::FrameNo;
use usm_types::PAGE_SIZE;
use usm_types::swap::Ticket;

/// The answer of [`AllocPolicy::alloc`](crate::AllocPolicy::alloc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Install these frames now; the faulting uThread resumes at once.
    Map(Mapping),
    /// The page's content is in swap: a read was queued with
    /// [`Cx::swap_in`](crate::Cx::swap_in); the faulting uThread waits for this ticket
    /// while the worker runs others.
    Yield(Ticket),
    /// No frame could be found. The runtime evicts (down to its watermarks) and asks the
    /// [`OomPolicy`](crate::OomPolicy) what to do if that is not enough, then retries.
    Oom,
}

/// The frames of a mapping: one frame inline (the fault hot path allocates nothing), or a
/// run of several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frames {
    /// A single page.
    One(FrameNo),
    /// Several consecutive virtual pages, one frame each, in address order (never empty).
    Run(Vec<FrameNo>),
}

/// Frames for consecutive virtual pages from `start`: page `start + i * 4096` gets
/// `frames()[i]`. Always covers at least one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    start: u64,
    frames: Frames,
}

impl Mapping {
    /// One frame for the page holding `addr` (rounded down to its page).
    #[inline]
    pub fn one(addr: u64, frame: FrameNo) -> Self {
        Mapping {
            start: page_floor(addr),
            frames: Frames::One(frame),
        }
    }

    /// A run of frames from page `start` (rounded down). `None` when `frames` is empty.
    /// A run of one frame is stored inline.
    pub fn run(start: u64, frames: Vec<FrameNo>) -> Option<Self> {
        let frames = match frames.as_slice() {
            [] => return None,
            [one] => Frames::One(*one),
            _ => Frames::Run(frames),
        };
        Some(Mapping {
            start: page_floor(start),
            frames,
        })
    }

    /// The first page.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + (self.len() * PAGE_SIZE) as u64
    }

    /// How many pages.
    pub fn len(&self) -> usize {
        self.frames().len()
    }

    /// Never true (a mapping has at least one page); for API completeness.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The frames in address order.
    pub fn frames(&self) -> &[FrameNo] {
        match &self.frames {
            Frames::One(f) => std::slice::from_ref(f),
            Frames::Run(v) => v,
        }
    }

    /// `(page address, frame)` pairs in address order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, FrameNo)> + '_ {
        let start = self.start;
        self.frames()
            .iter()
            .enumerate()
            .map(move |(i, f)| (start + (i * PAGE_SIZE) as u64, *f))
    }

    /// The frames, by value (a run's `Vec` is handed over without copying).
    pub fn into_frames(self) -> Frames {
        self.frames
    }

    /// The page `addr` is covered.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end()).contains(&addr)
    }
}

/// `addr` rounded down to its 4 KiB page.
#[inline]
pub const fn page_floor(addr: u64) -> u64 {
    addr & !(PAGE_SIZE as u64 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_frame_is_inline_and_runs_are_ordered() {
        let m = Mapping::one(0x1234, FrameNo(7));
        assert!(matches!(m.frames, Frames::One(FrameNo(7))));
        assert_eq!((m.start(), m.end(), m.len()), (0x1000, 0x2000, 1));
        assert!(Mapping::run(0, vec![]).is_none());
        assert!(matches!(
            Mapping::run(0, vec![FrameNo(1)]).unwrap().frames,
            Frames::One(_)
        ));
        let r = Mapping::run(0x4000, vec![FrameNo(3), FrameNo(9)]).unwrap();
        let pages: Vec<_> = r.pages().collect();
        assert_eq!(pages, vec![(0x4000, FrameNo(3)), (0x5000, FrameNo(9))]);
        assert!(r.contains(0x5fff) && !r.contains(0x6000));
    }
}
