//! Fork children waiting for their parent's stages (daemon mode).
//!
//! A page the parent's agent is taking out at `fork` (`Leaving`) may already sit in the
//! parent's staging area, which the child does not inherit (`MADV_DONTFORK`): a hole in
//! the child whose content is only in the parent's staging slot, on its way into the
//! daemon's frame and then to the swap entry reserved for it. The child shares that
//! entry (`Swapped(entry)`, reference counted), but the entry holds nothing until the
//! parent's write-back completes: a swap-in before then would read an old slot's bytes.
//!
//! So `fork_space` records each such page, and until every one is settled the child's
//! faults wait ([`FaultResult::NeedMemory`]: the worker joins the memory waiters, which
//! the end of every stage wakes). A child reads its fork gate before anything else, so
//! it waits there, before it has touched anything. A page is settled when the parent's
//! stage ends ([`stage_done`], both when the page is still the parent's and when it was
//! fenced):
//! - moved: the content is in the frame's slot now; it is copied into the child's hole
//!   (`copy_staged`; a page already there is the child's own and stays);
//! - not moved: the page never left the parent before the `fork`, so the child
//!   inherited it and has it.
//!
//! Either way the child's page is `Copied` (its memory, as inherited pages are) and its
//! reference to the entry is dropped. A copy that fails poisons the page (SIGBUS on
//! access, never stale bytes). A stopped parent whose agent never answers keeps its
//! children waiting until it runs again.
//!
//! Lock: every function here takes the locked state (`&mut MemState`).
//!
//! [`FaultResult::NeedMemory`]: super::FaultResult::NeedMemory

use usm_kmod::FrameNo;
use usm_swap::SwapEntry;

use crate::space::PageState;
use crate::stats::MmStats;

use super::{MemState, MmCore};

/// The children sharing one parent page that was `Leaving` at their `fork`.
#[derive(Debug)]
pub(super) struct ForkWait {
    /// The entry reserved for the parent's write-back (the children share it); `None`
    /// for an access sample in flight (the children's pages are `Copied` meanwhile).
    entry: Option<SwapEntry>,
    /// The children's spaces (the page is at the same address in each).
    children: Vec<u32>,
}

/// `fork_space`: `child` shares `entry`, reserved by the parent's stage of `addr` in
/// flight.
pub(super) fn record(
    mem: &mut MemState,
    parent: u32,
    addr: u64,
    entry: Option<SwapEntry>,
    child: u32,
) {
    mem.fork_waits
        .entry((parent, addr))
        .or_insert_with(|| ForkWait {
            entry,
            children: Vec::new(),
        })
        .children
        .push(child);
}

/// Whether `pid`'s faults must wait (a page it inherited is still on its way out of its
/// parent).
pub(super) fn blocks(mem: &MemState, pid: u32) -> bool {
    !mem.fork_waits.is_empty() && mem.fork_waits.values().any(|w| w.children.contains(&pid))
}

/// The parent's stage of `addr` ended; `moved`: the content is in `frame`'s slot.
pub(super) fn stage_done(
    core: &MmCore,
    mem: &mut MemState,
    parent: u32,
    addr: u64,
    frame: FrameNo,
    moved: bool,
) {
    if mem.fork_waits.is_empty() {
        return;
    }
    let Some(w) = mem.fork_waits.remove(&(parent, addr)) else {
        return;
    };
    for child in w.children {
        let installer = core.installer_in(mem, child);
        let Some(space) = mem.spaces.get_mut(&child) else {
            continue;
        };
        let waiting = w.entry.map_or(PageState::Copied, PageState::Swapped);
        if space.pages.get(&addr) != Some(&waiting) {
            continue;
        }
        let copied = if moved {
            installer.copy_staged(&core.pool, frame, addr)
        } else {
            Ok(false)
        };
        match copied {
            Ok(c) => {
                if c {
                    MmStats::bump(&core.stats.counters.swap_cache_copies);
                }
                space.set(addr, PageState::Copied);
            }
            Err(e) => {
                tracing::error!(error = %e, child, addr, "a fork child's copy of a page its parent was evicting failed: poisoned");
                let _ = installer.poison(&core.pool, addr);
                space.set(addr, PageState::Poisoned);
            }
        }
        if let Some(e) = w.entry {
            let _ = mem.swap.free(e);
        }
    }
}
