//! Built-in OOM policies: `fail`, `evict-harder[:N]`, `kill-largest`.

use crate::cx::Cx;
use crate::error::PolicyError;
use crate::oom::{OomAction, OomPolicy, OomReason, OomSituation, RunMode};

/// Fails the access at once, saying what eviction saw.
#[derive(Debug, Default, Clone)]
pub struct FailOom;

impl FailOom {
    /// The registered name.
    pub const NAME: &'static str = "fail";
}

impl OomPolicy for FailOom {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_oom(&mut self, s: &OomSituation, _cx: &mut dyn Cx) -> OomAction {
        OomAction::FailAccess(OomReason::PoolExhausted {
            denied: s.last_scan.denied,
            pinned: s.last_scan.pinned,
        })
    }
}

/// Evicts `N` pages (default 64) with hard urgency — `EVICTION=DENY` pages as a last
/// resort — up to [`EvictHarder::ATTEMPTS`] times, then fails the access.
#[derive(Debug, Clone)]
pub struct EvictHarder {
    name: String,
    batch: usize,
}

impl EvictHarder {
    /// The registered base name.
    pub const NAME: &'static str = "evict-harder";
    /// Attempts before giving up.
    pub const ATTEMPTS: u32 = 4;
    /// The default batch.
    pub const DEFAULT_BATCH: usize = 64;

    /// A policy evicting `batch` pages per attempt (at least 1).
    pub fn new(batch: usize) -> Result<Self, PolicyError> {
        if batch == 0 {
            return Err(PolicyError::BadParameter {
                policy: Self::NAME.into(),
                token: "0".into(),
                reason: "the batch must be at least one page".into(),
            });
        }
        Ok(EvictHarder {
            name: format!("{}:{batch}", Self::NAME),
            batch,
        })
    }

    /// Parses the optional parameter of `evict-harder[:N]`.
    pub fn from_param(param: Option<&str>) -> Result<Self, PolicyError> {
        match param {
            None => Self::new(Self::DEFAULT_BATCH),
            Some(p) => match p.trim().parse::<usize>() {
                Ok(n) if n > 0 => Self::new(n),
                _ => Err(PolicyError::BadParameter {
                    policy: Self::NAME.into(),
                    token: p.into(),
                    reason: "expected a page count of at least 1".into(),
                }),
            },
        }
    }
}

impl OomPolicy for EvictHarder {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_oom(&mut self, s: &OomSituation, _cx: &mut dyn Cx) -> OomAction {
        if s.attempt < Self::ATTEMPTS {
            OomAction::EvictHarder(self.batch)
        } else {
            OomAction::FailAccess(OomReason::GaveUp {
                attempts: s.attempt,
            })
        }
    }
}

/// Kills the largest managed process (daemon) or task (embedded), up to
/// [`KillLargest::KILLS`] times for one fault, then fails the access.
#[derive(Debug, Default, Clone)]
pub struct KillLargest;

impl KillLargest {
    /// The registered name.
    pub const NAME: &'static str = "kill-largest";
    /// Kills for one fault before giving up.
    pub const KILLS: u32 = 4;
}

impl OomPolicy for KillLargest {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_oom(&mut self, s: &OomSituation, _cx: &mut dyn Cx) -> OomAction {
        if s.attempt >= Self::KILLS {
            return OomAction::FailAccess(OomReason::GaveUp {
                attempts: s.attempt,
            });
        }
        match s.mode {
            RunMode::Daemon => OomAction::KillLargestProcess,
            RunMode::Embedded => OomAction::KillLargestTask,
        }
    }
}
