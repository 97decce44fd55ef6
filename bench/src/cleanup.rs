//! Crash-safe cleanup: undoes what a previous, killed run left behind.
//!
//! Every benchmark calls [`cleanup_leftovers`] first. The work is
//! [`usm_runtime::baseline::cleanup::cleanup_leftovers`] (journal records of dead pids, our
//! named cgroups and swap files of dead pids); this wrapper adds the benchmarks' default
//! swap directory [`DEFAULT_SWAP_DIR`] to the directories it scans.

use std::path::PathBuf;

pub use usm_runtime::baseline::cleanup::CleanupReport;

use crate::error::Result;
use crate::guard::DEFAULT_SWAP_DIR;

/// Undoes leftovers of dead runs. `extra_swap_dirs` are scanned in addition to
/// [`DEFAULT_SWAP_DIR`].
pub fn cleanup_leftovers(extra_swap_dirs: &[PathBuf]) -> Result<CleanupReport> {
    let mut dirs = vec![PathBuf::from(DEFAULT_SWAP_DIR)];
    dirs.extend(extra_swap_dirs.iter().cloned());
    Ok(usm_runtime::baseline::cleanup::cleanup_leftovers(&dirs)?)
}
