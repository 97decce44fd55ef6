//! Built-in allocation policies: `first-fit` (alias `policyOne`), `fhp:SIZE`,
//! `quota:PAGES`.

use usm_types::PAGE_SIZE;
use usm_types::event::Fault;

use crate::alloc::{AllocPolicy, swap_in_if_swapped};
use crate::cx::{Cx, PageMask};
use crate::decision::{Decision, Mapping, page_floor};
use crate::error::PolicyError;
use crate::evict::VictimRequest;
use crate::hint::parse_size;

const PAGE: u64 = PAGE_SIZE as u64;

/// One pre-zeroed frame for the page that faulted (the USM tutorial's `policyOne`).
///
/// A `PREFETCH=N` hint on the page makes it also map up to `N` following vacant pages of
/// the same region in the same decision.
#[derive(Debug, Default, Clone)]
pub struct FirstFit;

impl FirstFit {
    /// The registered name.
    pub const NAME: &'static str = "first-fit";
    /// The name used by the USM tutorial.
    pub const ALIAS: &'static str = "policyOne";
}

/// Maps one frame for the faulting page, or answers `Oom`. No allocation.
#[inline]
fn map_one(fault: &Fault, cx: &mut dyn Cx) -> Decision {
    match cx.take_frame() {
        Some(f) => Decision::Map(Mapping::one(fault.addr, f)),
        None => Decision::Oom,
    }
}

/// Tries to map the vacant run around the faulting page within `[lo, hi)` (at most one
/// [`PageMask`] of pages) as one decision, if it is longer than one page and `take_frames`
/// succeeds without dipping below the low watermark.
fn map_run(fault: &Fault, lo: u64, hi: u64, cx: &mut dyn Cx) -> RunOutcome {
    let pid = fault.origin.pid;
    let addr = page_floor(fault.addr);
    let npages = (((hi - lo) / PAGE) as usize).min(PageMask::CAPACITY);
    let mut mask = PageMask::new();
    cx.vacant(pid, lo, npages, &mut mask);
    let Some(run) = mask.run_around(((addr - lo) / PAGE) as usize) else {
        return RunOutcome::Single;
    };
    let n = run.len();
    if n <= 1 {
        return RunOutcome::Single;
    }
    if cx.free_frames() < n + cx.watermarks().low {
        return RunOutcome::TooBig;
    }
    let mut frames = Vec::with_capacity(n);
    if !cx.take_frames(n, &mut frames) {
        return RunOutcome::TooBig;
    }
    match Mapping::run(lo + run.start as u64 * PAGE, frames) {
        Some(m) => RunOutcome::Mapped(Decision::Map(m)),
        None => RunOutcome::Single,
    }
}

enum RunOutcome {
    Mapped(Decision),
    /// Only the faulting page is vacant: a smaller window cannot do better.
    Single,
    /// Not enough free frames for this run: try a smaller one.
    TooBig,
}

impl AllocPolicy for FirstFit {
    fn name(&self) -> &str {
        Self::NAME
    }

    #[inline]
    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        if let Some(d) = swap_in_if_swapped(fault, cx) {
            return d;
        }
        let pid = fault.origin.pid;
        let addr = page_floor(fault.addr);
        let prefetch = cx.hint(pid, addr).prefetch.unwrap_or(0) as u64;
        if prefetch > 0 {
            if let Some(region) = cx.region(pid, addr) {
                let hi = (addr + (prefetch + 1) * PAGE).min(region.end);
                if let RunOutcome::Mapped(d) = map_run(fault, addr, hi, cx) {
                    return d;
                }
            }
        }
        map_one(fault, cx)
    }
}

/// Flexible huge pages: the first fault in an aligned window of `SIZE` maps the whole
/// window at once, clipped to the region (or VMA) and to the run of vacant pages around
/// the faulting one. When free frames would fall below the low watermark it halves the
/// window until the run fits, down to a single page. A `HUGE=SIZE` hint on the page
/// overrides the window for that range (`HUGE=4K` turns it off).
#[derive(Debug, Clone)]
pub struct FlexibleHugePages {
    name: String,
    window_pages: usize,
}

impl FlexibleHugePages {
    /// The registered base name.
    pub const NAME: &'static str = "fhp";
    /// The smallest window.
    pub const MIN: u64 = 8 << 10;
    /// The largest window.
    pub const MAX: u64 = 2 << 20;

    /// A policy mapping windows of `bytes` (a power of two in `8K..=2M`).
    pub fn new(bytes: u64) -> Result<Self, PolicyError> {
        if !bytes.is_power_of_two() || !(Self::MIN..=Self::MAX).contains(&bytes) {
            return Err(PolicyError::BadParameter {
                policy: Self::NAME.into(),
                token: format!("{bytes}"),
                reason: "the window must be a power of two from 8K to 2M".into(),
            });
        }
        Ok(FlexibleHugePages {
            name: format!("{}:{}K", Self::NAME, bytes >> 10),
            window_pages: (bytes / PAGE) as usize,
        })
    }

    /// Parses the parameter text of `fhp:SIZE` (`64K`, `2M`, `16384`).
    pub fn from_param(param: &str) -> Result<Self, PolicyError> {
        let bad = |reason: &str| PolicyError::BadParameter {
            policy: Self::NAME.into(),
            token: param.into(),
            reason: reason.into(),
        };
        let bytes = parse_size(param).map_err(bad)?;
        Self::new(bytes).map_err(|_| bad("the window must be a power of two from 8K to 2M"))
    }

    /// The window in pages.
    pub fn window_pages(&self) -> usize {
        self.window_pages
    }
}

impl AllocPolicy for FlexibleHugePages {
    fn name(&self) -> &str {
        &self.name
    }

    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        if let Some(d) = swap_in_if_swapped(fault, cx) {
            return d;
        }
        let pid = fault.origin.pid;
        let addr = page_floor(fault.addr);
        let Some(region) = cx.region(pid, addr) else {
            return map_one(fault, cx);
        };
        let mut window = match cx.hint(pid, addr).huge {
            Some(bytes) => (bytes / PAGE) as usize,
            None => self.window_pages,
        };
        while window > 1 {
            let bytes = window as u64 * PAGE;
            let start = addr & !(bytes - 1);
            let lo = start.max(region.start);
            let hi = start.saturating_add(bytes).min(region.end);
            match map_run(fault, lo, hi, cx) {
                RunOutcome::Mapped(d) => return d,
                RunOutcome::Single => break,
                RunOutcome::TooBig => window /= 2,
            }
        }
        map_one(fault, cx)
    }
}

/// Caps each process's resident pages (mapped plus swap-ins in flight) at `PAGES`: a fault
/// at the cap first evicts the process's own pages (normal urgency, then hard). Pages are
/// served one at a time like `first-fit`.
///
/// When none of its own pages can leave (all pinned), it answers `Oom` and the OOM policy
/// decides; pair `quota` with `fail` or `evict-harder` — `kill-largest` could pick another
/// process, which does not help a process that is at its own cap.
#[derive(Debug, Clone)]
pub struct Quota {
    name: String,
    limit: usize,
}

impl Quota {
    /// The registered base name.
    pub const NAME: &'static str = "quota";

    /// A quota of `pages` (at least 1).
    pub fn new(pages: usize) -> Result<Self, PolicyError> {
        if pages == 0 {
            return Err(PolicyError::BadParameter {
                policy: Self::NAME.into(),
                token: "0".into(),
                reason: "a quota must allow at least one page".into(),
            });
        }
        Ok(Quota {
            name: format!("{}:{pages}", Self::NAME),
            limit: pages,
        })
    }

    /// Parses the parameter of `quota:PAGES`: a page count (`4096`), or a size with a
    /// suffix (`16M` = 4096 pages).
    pub fn from_param(param: &str) -> Result<Self, PolicyError> {
        let bad = |reason: &str| PolicyError::BadParameter {
            policy: Self::NAME.into(),
            token: param.into(),
            reason: reason.into(),
        };
        let t = param.trim();
        let pages = if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() {
            t.parse::<usize>()
                .map_err(|_| bad("page count out of range"))?
        } else {
            let bytes = parse_size(t).map_err(bad)?;
            if bytes % PAGE != 0 {
                return Err(bad("a size must be a multiple of 4K"));
            }
            usize::try_from(bytes / PAGE).map_err(|_| bad("size out of range"))?
        };
        Self::new(pages).map_err(|_| bad("a quota must allow at least one page"))
    }

    /// The cap in pages.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl AllocPolicy for Quota {
    fn name(&self) -> &str {
        &self.name
    }

    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        let pid = fault.origin.pid;
        let resident = cx.counters(pid).resident;
        if resident >= self.limit {
            let excess = resident + 1 - self.limit;
            let mut gone = cx.evict(VictimRequest::of_process(pid, excess));
            if gone < excess {
                gone += cx.evict(VictimRequest::of_process(pid, excess - gone).hard());
            }
            if gone < excess {
                tracing::debug!(
                    pid,
                    resident,
                    limit = self.limit,
                    "quota: nothing left to evict"
                );
                return Decision::Oom;
            }
        }
        if let Some(d) = swap_in_if_swapped(fault, cx) {
            return d;
        }
        map_one(fault, cx)
    }
}
