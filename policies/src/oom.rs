//! The out-of-memory policy: what happens when no frame can be found or freed.
//!
//! # Protocol
//!
//! When an allocation policy answers [`Decision::Oom`](crate::Decision::Oom), the runtime
//! first runs ordinary eviction (normal urgency) and waits for the write-backs; if the
//! retried allocation still fails, it calls [`OomPolicy::on_oom`] with
//! [`OomSituation::attempt`] = 0, carries out the [`OomAction`], retries the allocation,
//! and calls again with `attempt` + 1 while it keeps failing. An OOM policy must
//! eventually answer `FailAccess` or a kill, or the fault never completes.
//!
//! What each action means to the runtime:
//! - `EvictHarder(n)`: evict up to `n` pages with [`Urgency::Hard`](crate::Urgency::Hard)
//!   (`EVICTION=DENY` pages allowed as a last resort), wait for write-back, retry.
//! - `FailAccess(reason)`: the faulting access fails: `UFFDIO_POISON` on the page (the
//!   program gets `SIGBUS` there, never zeros), and `reason` is logged.
//! - `KillLargestProcess` (daemon): the managed process with the most resident pages is
//!   killed with a message naming the reason; its frames return to the pool.
//! - `KillLargestTask` (embedded): the runtime ends the task (uThread group) holding the
//!   most resident pages of the region, as the application registered them.

use std::fmt;

use usm_types::event::Fault;

use crate::cx::Cx;
use crate::evict::VictimScan;

/// Which runtime the policy serves (decides what "kill the largest" means).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunMode {
    /// InstanceUSM: managing other processes.
    #[default]
    Daemon,
    /// A runtime embedded in one application.
    Embedded,
}

/// The facts an OOM policy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomSituation {
    /// The fault that cannot be served.
    pub fault: Fault,
    /// 0 on the first call for this fault, then 1, 2, ...
    pub attempt: u32,
    /// Daemon or embedded.
    pub mode: RunMode,
    /// What the last eviction attempt for this fault saw.
    pub last_scan: VictimScan,
    /// Free frames right now.
    pub free_frames: usize,
}

/// Why an access was failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OomReason {
    /// No free frame and eviction found nothing it may take.
    PoolExhausted {
        /// Candidates refused for `EVICTION=DENY` in the last scan.
        denied: usize,
        /// Candidates refused because they were pinned.
        pinned: usize,
    },
    /// The policy tried this many times and gave up.
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
    /// A custom policy's own reason.
    Policy(String),
}

impl fmt::Display for OomReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OomReason::PoolExhausted { denied, pinned } => write!(
                f,
                "out of memory: no free frame and nothing evictable \
                 ({denied} candidates denied by EVICTION=DENY hints, {pinned} pinned)"
            ),
            OomReason::GaveUp { attempts } => {
                write!(
                    f,
                    "out of memory: still no frame after {attempts} harder evictions"
                )
            }
            OomReason::Policy(s) => write!(f, "out of memory: {s}"),
        }
    }
}

/// What the runtime should do next (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OomAction {
    /// Evict up to this many pages with hard urgency, then retry.
    EvictHarder(usize),
    /// Fail the faulting access.
    FailAccess(OomReason),
    /// Kill the managed process with the most resident pages (daemon), then retry.
    KillLargestProcess,
    /// End the task with the most resident pages (embedded), then retry.
    KillLargestTask,
}

/// Decides what happens when memory runs out. Same `Send`/panic rules as
/// [`AllocPolicy`](crate::AllocPolicy).
pub trait OomPolicy: Send {
    /// The registered name.
    fn name(&self) -> &str;

    /// Chooses the next action for `situation`.
    fn on_oom(&mut self, situation: &OomSituation, cx: &mut dyn Cx) -> OomAction;
}

impl fmt::Debug for dyn OomPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OomPolicy({})", self.name())
    }
}
