//! The eviction policy trait and its request/answer types.
//!
//! # Protocol
//!
//! 1. The runtime reports every page it installs with [`EvictPolicy::on_map`] (after a
//!    `Map` decision, after a swap-in completes, and again when an eviction it was asked
//!    for could not be carried out). From then on the policy *tracks* the frame.
//! 2. It reports every tracked frame that goes away without eviction (`munmap`,
//!    `MADV_DONTNEED`, exit) with [`EvictPolicy::on_free`], and access observations with
//!    [`EvictPolicy::on_access`] when it has them in push form.
//! 3. When free frames fall below the low watermark (or an allocation policy calls
//!    [`Cx::evict`](crate::Cx::evict)), the runtime calls [`EvictPolicy::victims`]. Every
//!    page the policy returns stops being tracked at once: the runtime takes it out of the
//!    address space (`UFFDIO_MOVE` into staging), writes it to swap, and recycles the
//!    frame. If it cannot (the page became pinned meanwhile, its program's agent refused
//!    the stage, no swap slot was free, its write-back failed), it calls
//!    [`EvictPolicy::on_refused`] and the policy tracks the page again.
//!
//! # Refusals
//!
//! A policy never returns a page that is pinned ([`EvictCx::is_pinned`]). With
//! [`Urgency::Normal`] it never returns a page whose hint says `EVICTION=DENY`; with
//! [`Urgency::Hard`] (an OOM policy asked to evict harder) it returns such pages only after
//! every other candidate in scope is taken. Both kinds of refusal are counted in the
//! returned [`VictimScan`], so an OOM policy can tell "everything is pinned" from "memory
//! is simply full".

use std::ops::Range;

use usm_types::FrameNo;

use crate::cx::{Access, EvictCx};
use crate::hint::Hint;

/// A mapped page: which frame backs which virtual page of which process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MappedPage {
    /// The frame.
    pub frame: FrameNo,
    /// The process.
    pub pid: u32,
    /// The virtual page (4 KiB aligned).
    pub addr: u64,
}

/// Which pages a victim search may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Any tracked page.
    #[default]
    Any,
    /// Only pages of this process (a quota policy evicting its own pages).
    Process(u32),
}

impl Scope {
    /// `pid` is in scope.
    pub fn admits(self, pid: u32) -> bool {
        match self {
            Scope::Any => true,
            Scope::Process(p) => p == pid,
        }
    }
}

/// How hard to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Urgency {
    /// Watermark eviction: `EVICTION=DENY` pages are refused.
    #[default]
    Normal,
    /// Out of memory: `DENY` pages may be taken once nothing else is left.
    Hard,
}

/// A request for victims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VictimRequest {
    /// How many pages are wanted (the policy may return fewer).
    pub want: usize,
    /// Which pages are eligible.
    pub scope: Scope,
    /// Whether `DENY` pages may be taken as a last resort.
    pub urgency: Urgency,
}

impl VictimRequest {
    /// `want` pages of any process, normal urgency.
    pub fn any(want: usize) -> Self {
        VictimRequest {
            want,
            scope: Scope::Any,
            urgency: Urgency::Normal,
        }
    }

    /// `want` pages of process `pid`, normal urgency.
    pub fn of_process(pid: u32, want: usize) -> Self {
        VictimRequest {
            want,
            scope: Scope::Process(pid),
            urgency: Urgency::Normal,
        }
    }

    /// The same request with [`Urgency::Hard`].
    pub fn hard(self) -> Self {
        VictimRequest {
            urgency: Urgency::Hard,
            ..self
        }
    }
}

/// What a victim search saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct VictimScan {
    /// Pages returned.
    pub chosen: usize,
    /// Candidates refused because their hint says `EVICTION=DENY` (counted once per look).
    pub denied: usize,
    /// Candidates refused because they were pinned (counted once per look).
    pub pinned: usize,
}

impl VictimScan {
    /// Adds another scan's counts.
    pub fn merge(&mut self, other: VictimScan) {
        self.chosen += other.chosen;
        self.denied += other.denied;
        self.pinned += other.pinned;
    }
}

/// Chooses which mapped pages leave memory. See the module docs for the protocol.
///
/// `Send` so the runtime may move a policy to the worker that runs it; calls to one
/// instance never overlap. Panics are caught by the runtime (see
/// [`guarded`](crate::guarded)); after a panic the instance is dropped, so a policy needs
/// no unwind-consistency of its own.
pub trait EvictPolicy: Send {
    /// The registered name.
    fn name(&self) -> &str;

    /// A page was installed: start tracking `page.frame`.
    fn on_map(&mut self, page: MappedPage, cx: &mut dyn EvictCx);

    /// A frame went away without eviction; a no-op for an untracked frame.
    fn on_free(&mut self, frame: FrameNo);

    /// A victim this policy returned could not be evicted (see the module docs): track it
    /// again. The default treats it as newly mapped ([`EvictPolicy::on_map`]); a policy
    /// that would choose it again at once should put it where it waits longer (`two-list`
    /// activates it, as the kernel activates a page it failed to reclaim).
    fn on_refused(&mut self, page: MappedPage, cx: &mut dyn EvictCx) {
        self.on_map(page, cx);
    }

    /// An access observation pushed by the runtime (re-fault sampling reports this way).
    fn on_access(&mut self, frame: FrameNo, access: Access) {
        let _ = (frame, access);
    }

    /// A hint was attached to `range` of `pid` (already recorded where
    /// [`EvictCx::hint`] reads it).
    fn on_hint(&mut self, pid: u32, range: Range<u64>, hint: &Hint, cx: &mut dyn EvictCx) {
        let _ = (pid, range, hint, cx);
    }

    /// Appends up to `req.want` victims to `out` and stops tracking them.
    fn victims(
        &mut self,
        req: VictimRequest,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
    ) -> VictimScan;

    /// How many pages are tracked.
    fn tracked(&self) -> usize;
}

impl std::fmt::Debug for dyn EvictPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EvictPolicy({})", self.name())
    }
}
