//! Crash-safe cleanup: undoes what a previous, killed run left behind.
//!
//! `usm compare` and every benchmark call [`cleanup_leftovers`] first. It
//! 1. performs the journal records (see [`crate::baseline`]) of pids that are no longer alive,
//!    newest first, and deletes them;
//! 2. removes our named cgroups (`usm-baseline-<pid>-…`) of dead pids under the cgroup base;
//! 3. turns off and deletes our swap files (`usm-baseline-<pid>-….swap`) of dead pids in
//!    the directories given (the caller knows where it puts swap files).
//!
//! Records of live pids (another run in progress) are left alone.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{JOURNAL_DIR, JournalRecord, NAME_PREFIX, Result, Undo, UndoCause};

/// What [`cleanup_leftovers`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    /// Undo actions performed (human-readable).
    pub undone: Vec<String>,
    /// Undo actions that failed (they stay in the journal for the next attempt).
    pub failed: Vec<String>,
}

impl CleanupReport {
    /// True when nothing was left over.
    pub fn is_clean(&self) -> bool {
        self.undone.is_empty() && self.failed.is_empty()
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid encoded in `usm-baseline-<pid>-...`.
fn pid_of_name(name: &str) -> Option<u32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Undoes leftovers of dead runs; see the module docs. `swap_dirs` are scanned for our
/// swap files.
pub fn cleanup_leftovers(swap_dirs: &[PathBuf]) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let run = |undo: Undo, journal: Option<PathBuf>, report: &mut CleanupReport| {
        let what = format!("{undo:?}");
        match undo.perform(UndoCause::Terminate) {
            Ok(()) => {
                if let Some(j) = journal {
                    let _ = fs::remove_file(j);
                }
                report.undone.push(what);
            }
            Err(e) => report.failed.push(format!("{what}: {e}")),
        }
    };

    // 1. Journal records of dead pids, newest registration first (a knob changed by two
    //    dead runs goes back to the value the older one found).
    let mut records: Vec<(u128, u64, PathBuf, Undo)> = Vec::new();
    if let Ok(rd) = fs::read_dir(JOURNAL_DIR) {
        for entry in rd.flatten() {
            let path = entry.path();
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let Ok(rec) = serde_json::from_str::<JournalRecord>(&text) else {
                let _ = fs::remove_file(&path);
                continue;
            };
            if rec.pid == std::process::id() || pid_alive(rec.pid) {
                continue; // our own live guards, or another run in progress
            }
            let seq = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.rsplit('-').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            records.push((rec.registered_ns, seq, path, rec.undo));
        }
    }
    records.sort_by_key(|r| std::cmp::Reverse((r.0, r.1)));
    for (_, _, path, undo) in records {
        run(undo, Some(path), &mut report);
    }

    // 2. Named cgroups of dead pids.
    if let Ok((_, base)) = super::cgroup_base_dir() {
        if let Ok(rd) = fs::read_dir(&base) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if pid_of_name(&name).is_some_and(|pid| !pid_alive(pid)) {
                    run(Undo::RemoveCgroup { dir: entry.path() }, None, &mut report);
                }
            }
        }
    }

    // 3. Named swap files of dead pids.
    for dir in swap_dirs {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".swap") {
                continue;
            }
            if pid_of_name(&name).is_some_and(|pid| !pid_alive(pid)) {
                run(Undo::SwapOffFile { path: entry.path() }, None, &mut report);
            }
        }
    }
    Ok(report)
}
