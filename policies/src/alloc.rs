//! The allocation policy trait: which frames back a fault.
//!
//! # Protocol for one fault
//!
//! 1. The runtime catches the fault, records it, parks the faulting uThread and — in
//!    normal context on the worker — resolves what needs no new frame: a second fault on a
//!    page whose swap-in is already in flight waits on the same ticket; a spurious fault
//!    on a present page just resumes. Everything else reaches the policy.
//! 2. [`AllocPolicy::alloc`] answers with a [`Decision`]. A page whose content is in the
//!    staging "swap cache" or in swap must get that content back, never a fresh frame:
//!    [`swap_in_if_swapped`] does both in one call. (The swap-cache hit goes through the
//!    policy so that a policy counting resident pages, like `quota`, sees it.)
//! 3. The runtime installs a `Map` (the uThread resumes), parks the uThread on a `Yield`
//!    ticket, or runs eviction and the OOM policy on `Oom` and then calls `alloc` again.
//!
//! The other callbacks (`free`, `new_process`, `exit`, `hint`) are notifications for
//! policies that keep per-process state; the runtime has already reclaimed the frames of a
//! freed range or an exited process when it calls them.

use std::ops::Range;

use usm_types::event::{Event, Fault, Origin};

use crate::cx::Cx;
use crate::decision::{Decision, Mapping, page_floor};
use crate::hint::{Hint, HintError};

/// Decides which frames back a fault.
///
/// `Send` so the runtime may move a policy to the worker that runs it; calls to one
/// instance never overlap. The runtime calls every method inside [`guarded`](crate::guarded)
/// (`catch_unwind`): a policy that panics costs the faulting access (it fails like an OOM
/// `FailAccess`), the instance is dropped and replaced by a fresh one from the registry,
/// and the daemon keeps running. Because a panicked instance is never called again, a
/// policy needs no unwind-consistency of its own — but frames taken during the panicking
/// call are reclaimed by the runtime, not by the policy.
pub trait AllocPolicy: Send {
    /// The registered name (with its parameter: `fhp:64K`).
    fn name(&self) -> &str;

    /// Serves one fault. See the module docs.
    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision;

    /// `range` of `origin.pid` was given back (its frames are already reclaimed).
    fn free(&mut self, origin: Origin, range: Range<u64>, cx: &mut dyn Cx) {
        let _ = (origin, range, cx);
    }

    /// A process was attached (`parent` is set when it was forked from a managed one).
    fn new_process(&mut self, origin: Origin, name: &str, parent: Option<u32>, cx: &mut dyn Cx) {
        let _ = (origin, name, parent, cx);
    }

    /// A process exited (its frames and slots are already reclaimed).
    fn exit(&mut self, origin: Origin, cx: &mut dyn Cx) {
        let _ = (origin, cx);
    }

    /// A hint was attached to `range` (already recorded where [`EvictCx::hint`] reads it).
    ///
    /// [`EvictCx::hint`]: crate::EvictCx::hint
    fn hint(&mut self, origin: Origin, range: Range<u64>, hint: &Hint, cx: &mut dyn Cx) {
        let _ = (origin, range, hint, cx);
    }
}

/// Gets the faulting page's content back if it has any:
/// - in staging (write-back not finished): `Some(Decision::Map)` of its staged frame;
/// - in swap: takes a frame and queues the swap-in, `Some(Decision::Yield(ticket))`, or
///   `Some(Decision::Oom)` when no frame is free;
/// - neither: `None` (map a fresh frame).
///
/// Every built-in allocation policy starts with this; a custom one should too.
#[inline]
pub fn swap_in_if_swapped(fault: &Fault, cx: &mut dyn Cx) -> Option<Decision> {
    let addr = page_floor(fault.addr);
    if let Some(frame) = cx.take_staged(fault.origin.pid, addr) {
        return Some(Decision::Map(Mapping::one(addr, frame)));
    }
    let entry = cx.swap_entry(fault.origin.pid, addr)?;
    Some(match cx.take_frame() {
        Some(frame) => Decision::Yield(cx.swap_in(fault.origin.pid, addr, entry, frame)),
        None => Decision::Oom,
    })
}

/// Delivers any [`Event`] to an allocation policy: a fault returns its decision, the other
/// events return `Ok(None)`. A `Hint` event's text is parsed first; a parse error is
/// returned and the policy is not called.
///
/// The runtime may call the trait methods directly instead (it parses hints itself to
/// record them); this is the one-line form for tests and simple embedders.
pub fn deliver(
    policy: &mut dyn AllocPolicy,
    event: &Event,
    cx: &mut dyn Cx,
) -> Result<Option<Decision>, HintError> {
    match event {
        Event::Fault(f) => return Ok(Some(policy.alloc(f, cx))),
        Event::Free { origin, start, len } => {
            policy.free(*origin, *start..start.saturating_add(*len), cx)
        }
        Event::NewProcess {
            origin,
            name,
            parent,
        } => policy.new_process(*origin, name, *parent, cx),
        Event::Exit { origin } => policy.exit(*origin, cx),
        Event::Hint {
            origin,
            start,
            len,
            text,
        } => {
            let hint = Hint::parse(text)?;
            policy.hint(*origin, *start..start.saturating_add(*len), &hint, cx);
        }
    }
    Ok(None)
}

impl std::fmt::Debug for dyn AllocPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AllocPolicy({})", self.name())
    }
}
