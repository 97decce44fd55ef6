//! The kernel side of a comparison: a memory cgroup with kernel swap, set up so that it is
//! always undone. Used by `usm compare` (the kernel run beside the USM run) and by the
//! `usm-bench` crate (every benchmark's kernel baseline), so there is one copy.
//!
//! # Protocol
//! Every guard follows the same four steps, so the machine is restored whether the scope
//! ends normally, by an error, a panic, SIGINT/SIGTERM/SIGHUP, or SIGKILL:
//! 1. **Journal first.** Before touching anything, the guard records *how to undo it*
//!    (an [`Undo`] value) in the process-wide registry and in a journal file under
//!    [`JOURNAL_DIR`] named after the pid. Undo actions tolerate "already undone / never
//!    done", so a crash between journaling and changing is harmless.
//! 2. **Change.** It creates the cgroup, enables the swap, writes the sysfs knob.
//! 3. **Undo on drop** (also during unwinding after a panic): the guard takes its entry out
//!    of the registry and performs it, then deletes its journal file. Whoever takes the
//!    entry out (drop, or the signal watcher) is the only one to perform it.
//! 4. **Undo on SIGINT/SIGTERM/SIGHUP**: the first guard installs a handler that only writes
//!    the signal number to a self-pipe; a watcher thread reads it, performs every registered
//!    undo in reverse order of registration (LIFO: a cgroup made after a swap file is removed
//!    before that swap is turned off), then re-raises the signal with its default action.
//!    While it works it holds a process-wide lock; a guard dropped meanwhile (its entry
//!    already taken) waits on that lock, so an error path racing with the signal cannot end
//!    the process half-cleaned ([`wait_for_signal_cleanup`] does the same before `exit`).
//!
//! After SIGKILL nothing runs in the process; [`cleanup::cleanup_leftovers`] reads the
//! journal files of dead pids (and scans for our named cgroups and swap files,
//! `usm-baseline-<pid>-…`) and performs them. Every user calls it first.
//!
//! Guards: [`MemCgroup`] (cgroup v1 or v2, detected), [`SwapFile`], [`ZramSwap`], and any
//! sysfs knob through [`register`] + [`Undo::RestoreSysfs`] (the bench crate's THP guards).
//!
//! The system calls (`swapon`, `swapoff`, the signal handler, joining a cgroup between
//! fork and exec) are in `sys::baseline`; this module is safe code.

mod cgroup;
pub mod cleanup;
mod error;
mod swap;

pub use cgroup::{CgroupStats, CgroupVersion, MemCgroup};
pub use error::{Error, Result};
pub use swap::{ActiveSwap, SwapFile, ZRAM_LOCK_PATH, ZramSwap, active_swaps};

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicU64, Ordering};

/// Directory of journal files (one per live undo action; tmpfs, so a reboot clears it
/// together with the state it describes).
pub const JOURNAL_DIR: &str = "/run/usm-baseline/journal";

/// Prefix of every cgroup directory and swap file this module creates:
/// `usm-baseline-<pid>-<seq>…`; [`cleanup::cleanup_leftovers`] finds them by it.
pub const NAME_PREFIX: &str = "usm-baseline-";

/// How to undo one change. Each action is idempotent: performing it when the change was
/// never made, or was already undone, succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Undo {
    /// Empty the memory cgroup (move its tasks to the parent, or kill them when the
    /// process is terminating) and remove its directory.
    RemoveCgroup {
        /// The cgroup directory.
        dir: PathBuf,
    },
    /// `swapoff` the file if it is active, then delete it.
    SwapOffFile {
        /// The swap file.
        path: PathBuf,
    },
    /// `swapoff` the zram device if it is active, then reset it (disksize back to 0).
    /// A device that is not an active swap is left alone: someone else may own it now.
    SwapOffZram {
        /// The device node, e.g. `/dev/zram0`.
        device: PathBuf,
        /// Its sysfs directory, e.g. `/sys/block/zram0`.
        sysfs: PathBuf,
    },
    /// Write `value` back to a sysfs knob.
    RestoreSysfs {
        /// The knob.
        path: PathBuf,
        /// The value it had.
        value: String,
    },
}

/// Why an undo runs; it decides what happens to tasks still inside a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoCause {
    /// Normal drop (or unwinding): tasks still in a cgroup are moved to its parent.
    Drop,
    /// The process is terminating (signal) or a dead run is being cleaned up: tasks still
    /// in a cgroup are benchmark children and are killed.
    Terminate,
}

impl Undo {
    /// Performs the undo action.
    pub fn perform(&self, cause: UndoCause) -> Result<()> {
        match self {
            Undo::RemoveCgroup { dir } => cgroup::remove_cgroup_dir(dir, cause),
            Undo::SwapOffFile { path } => swap::undo_swap_file(path),
            Undo::SwapOffZram { device, sysfs } => swap::undo_zram(device, sysfs),
            Undo::RestoreSysfs { path, value } => {
                fs::write(path, value).map_err(|e| Error::io("write", path, e))
            }
        }
    }
}

/// The directory under which [`MemCgroup`]s are created on this machine.
pub fn cgroup_base_dir() -> Result<(CgroupVersion, PathBuf)> {
    cgroup::cgroup_base()
}

/// A journal record: the undo and the pid that registered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JournalRecord {
    pub(crate) pid: u32,
    /// Registration time (ns since the epoch): cleanup undoes newest first across pids.
    #[serde(default)]
    pub(crate) registered_ns: u128,
    pub(crate) undo: Undo,
}

struct Entry {
    id: u64,
    undo: Undo,
    journal: Option<PathBuf>,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
/// Held by the signal watcher from before it takes the entries until the process dies, so
/// a guard whose entry it took (and any caller of [`wait_for_signal_cleanup`]) blocks
/// instead of letting the process exit half-cleaned.
static TERMINATING: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static WATCHER: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// The registry entry of one guard; performing it is the guard's drop.
#[derive(Debug)]
pub struct Registration {
    id: u64,
}

/// Registers `undo` (in memory and in the journal) before the change is made; the caller
/// keeps the [`Registration`] and calls [`Registration::undo`] in its `Drop`.
pub fn register(undo: Undo) -> Result<Registration> {
    ensure_signal_watcher()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let journal = write_journal(id, &undo).ok();
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    reg.push(Entry { id, undo, journal });
    Ok(Registration { id })
}

impl Registration {
    /// Takes the entry out of the registry and performs it (once; a second call, or a call
    /// after the signal watcher ran it, does nothing).
    pub fn undo(&self, cause: UndoCause) -> Result<()> {
        let entry = {
            let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
            let pos = reg.iter().position(|e| e.id == self.id);
            pos.map(|p| reg.remove(p))
        };
        match entry {
            Some(e) => perform_entry(e, cause),
            None => {
                // Already undone — by us, or by the signal watcher, which may still be at
                // it: wait for it (it ends the process when done).
                drop(TERMINATING.lock().unwrap_or_else(|p| p.into_inner()));
                Ok(())
            }
        }
    }
}

fn perform_entry(e: Entry, cause: UndoCause) -> Result<()> {
    let res = e.undo.perform(cause);
    if let (Ok(()), Some(j)) = (&res, &e.journal) {
        let _ = fs::remove_file(j);
    }
    res
}

/// Performs every registered undo, newest first. Used by the signal watcher; callable by
/// benches that want to unwind everything explicitly. Returns the failures.
pub fn undo_all(cause: UndoCause) -> Vec<Error> {
    let entries: Vec<Entry> = {
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *reg)
    };
    let mut errors = Vec::new();
    for e in entries.into_iter().rev() {
        if let Err(err) = perform_entry(e, cause) {
            errors.push(err);
        }
    }
    errors
}

/// Blocks while a termination signal's cleanup is running (it ends the process when done).
/// Call before `std::process::exit` on an error path that a signal may have caused.
pub fn wait_for_signal_cleanup() {
    drop(TERMINATING.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Number of undo actions currently registered in this process.
pub fn registered_count() -> usize {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).len()
}

fn write_journal(id: u64, undo: &Undo) -> Result<PathBuf> {
    fs::create_dir_all(JOURNAL_DIR).map_err(|e| Error::io("mkdir", JOURNAL_DIR, e))?;
    let pid = std::process::id();
    let path = Path::new(JOURNAL_DIR).join(format!("{pid}-{id}.json"));
    let registered_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let rec = JournalRecord {
        pid,
        registered_ns,
        undo: undo.clone(),
    };
    let text = serde_json::to_string(&rec)?;
    fs::write(&path, text).map_err(|e| Error::io("write", &path, e))?;
    Ok(path)
}

/// Installs (once per process) the SIGINT/SIGTERM/SIGHUP handler and its watcher thread.
/// The first [`register`] does it; a program that wants the signals handled the same way
/// before its first guard exists (so a signal never skips the cleanup of a guard being
/// made) calls it at start.
pub fn ensure_signal_watcher() -> Result<()> {
    let res = WATCHER.get_or_init(|| {
        let install = || -> Result<()> {
            let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::sys("pipe2", e))?;
            std::thread::Builder::new()
                .name("usm-baseline-cleanup".into())
                .spawn(move || watch_termination(read_end))
                .map_err(|e| Error::io("spawn", "usm-baseline-cleanup thread", e))?;
            crate::sys::baseline::install_termination_pipe(
                write_end,
                &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP],
            )
        };
        install().map_err(|e| e.to_string())
    });
    res.clone().map_err(|reason| Error::Unavailable {
        facility: "termination signal handler",
        reason,
    })
}

fn watch_termination(read_end: OwnedFd) {
    let mut file = fs::File::from(read_end);
    let mut byte = [0u8; 1];
    if file.read_exact(&mut byte).is_ok() {
        let signo = byte[0] as libc::c_int;
        let _terminating = TERMINATING.lock().unwrap_or_else(|p| p.into_inner());
        let errors = undo_all(UndoCause::Terminate);
        for e in errors {
            eprintln!("usm: cleanup on signal {signo}: {e}");
        }
        crate::sys::baseline::reraise_default(signo);
    }
}
