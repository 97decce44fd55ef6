//! The built-in policies and their registration.
//!
//! | name | kind | what it does |
//! |---|---|---|
//! | `first-fit` (alias `policyOne`) | alloc | one pre-zeroed frame per fault |
//! | `fhp:SIZE` | alloc | flexible huge pages, `SIZE` a power of two `8K..=2M` |
//! | `quota:PAGES` | alloc | first-fit with a per-process resident cap |
//! | `fifo` | evict | oldest mapping first |
//! | `clock` | evict | second chance on access information |
//! | `two-list[:PCT]` | evict | inactive and active lists, as the kernel's LRU; victims from the inactive list (`PCT` % of the pages, default 20) |
//! | `hints` | evict | `PRIORITY=LOW` first, `EVICTION=DENY` refused |
//! | `fail` | oom | fail the access |
//! | `evict-harder[:N]` | oom | evict N pages with hard urgency, 4 times, then fail |
//! | `kill-largest` | oom | kill the largest process / task |
//!
//! Defaults: `first-fit`, `two-list`, `fail`.

mod alloc;
mod evict;
mod oom;
mod tracker;

pub use alloc::{FirstFit, FlexibleHugePages, Quota};
pub use evict::{Clock, Fifo, HintAware, TwoList};
pub use oom::{EvictHarder, FailOom, KillLargest};

use crate::error::PolicyError;
use crate::registry::{Param, Registry};

fn no_param(name: &str, param: Option<&str>) -> Result<(), PolicyError> {
    match param {
        None => Ok(()),
        Some(p) => Err(PolicyError::UnexpectedParameter {
            policy: name.into(),
            token: p.into(),
        }),
    }
}

fn need_param<'a>(
    name: &str,
    param: Option<&'a str>,
    example: &str,
) -> Result<&'a str, PolicyError> {
    param.ok_or_else(|| PolicyError::MissingParameter {
        policy: name.into(),
        example: example.into(),
    })
}

/// Registers every built-in policy and makes `first-fit`, `two-list` and `fail` the
/// defaults.
pub fn register_builtins(r: &mut Registry) -> Result<(), PolicyError> {
    r.register_alloc(FirstFit::NAME, Param::None, |p| {
        no_param(FirstFit::NAME, p)?;
        Ok(Box::new(FirstFit))
    })?;
    r.register_alias(FirstFit::ALIAS, FirstFit::NAME)?;
    r.register_alloc(FlexibleHugePages::NAME, Param::Required("64K"), |p| {
        let p = need_param(FlexibleHugePages::NAME, p, "64K")?;
        Ok(Box::new(FlexibleHugePages::from_param(p)?))
    })?;
    r.register_alloc(Quota::NAME, Param::Required("4096"), |p| {
        let p = need_param(Quota::NAME, p, "4096")?;
        Ok(Box::new(Quota::from_param(p)?))
    })?;
    r.register_evict(Fifo::NAME, Param::None, |p| {
        no_param(Fifo::NAME, p)?;
        Ok(Box::new(Fifo::new()))
    })?;
    r.register_evict(Clock::NAME, Param::None, |p| {
        no_param(Clock::NAME, p)?;
        Ok(Box::new(Clock::new()))
    })?;
    r.register_evict(TwoList::NAME, Param::Optional("20"), |p| {
        Ok(Box::new(TwoList::from_param(p)?))
    })?;
    r.register_evict(HintAware::NAME, Param::None, |p| {
        no_param(HintAware::NAME, p)?;
        Ok(Box::new(HintAware::new()))
    })?;
    r.register_oom(FailOom::NAME, Param::None, |p| {
        no_param(FailOom::NAME, p)?;
        Ok(Box::new(FailOom))
    })?;
    r.register_oom(EvictHarder::NAME, Param::Optional("64"), |p| {
        Ok(Box::new(EvictHarder::from_param(p)?))
    })?;
    r.register_oom(KillLargest::NAME, Param::None, |p| {
        no_param(KillLargest::NAME, p)?;
        Ok(Box::new(KillLargest))
    })?;
    r.set_default(FirstFit::NAME)?;
    r.set_default(TwoList::NAME)?;
    r.set_default(FailOom::NAME)?;
    Ok(())
}
