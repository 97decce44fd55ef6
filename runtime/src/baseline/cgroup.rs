//! [`MemCgroup`]: a memory cgroup limited to a benchmark's budget.
//!
//! - **v1** (this machine: `/sys/fs/cgroup/memory`): the group is made *inside the memory
//!   cgroup of the calling process* (read from `/proc/self/cgroup`), so the benchmark stays
//!   within whatever hierarchy launched it; limit in `memory.limit_in_bytes`, optional
//!   `memory.memsw.limit_in_bytes` for memory+swap.
//! - **v2** (when `/sys/fs/cgroup/cgroup.controllers` lists `memory`): the group is made
//!   under the root (the only place free of the "no internal processes" rule), with
//!   `memory.max` and optional `memory.swap.max`.
//!
//! Placement: [`MemCgroup::command`] / [`MemCgroup::place_before_exec`] make the child
//! write its own pid to `cgroup.procs` between fork and exec, so it is charged from its
//! very first allocation. Removal (drop, panic, signal, or cleanup of a dead run): tasks
//! still inside are moved to the parent (drop) or killed (termination), then the directory
//! is removed, retrying while dying tasks leave.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use usm_sync::Arc;

use serde::{Deserialize, Serialize};
use usm_sync::atomic::{AtomicU64, Ordering};

use super::{Error, Result};
use super::{NAME_PREFIX, Registration, Undo, UndoCause, register};

/// Which cgroup hierarchy carries the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchy at `/sys/fs/cgroup/memory`.
    V1,
    /// Unified hierarchy at `/sys/fs/cgroup`.
    V2,
}

/// Memory statistics of a cgroup, in bytes unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    /// Memory limit (the budget).
    pub limit_bytes: u64,
    /// Current memory usage.
    pub usage_bytes: u64,
    /// Peak memory usage since creation.
    pub peak_bytes: u64,
    /// Memory currently swapped out from this group.
    pub swap_bytes: u64,
    /// Peak memory+swap (v1 `memsw.max_usage_in_bytes`; v2 `memory.peak` + swap peak).
    pub peak_with_swap_bytes: u64,
    /// Major faults of the group's tasks (from `memory.stat`).
    pub major_faults: u64,
    /// All faults of the group's tasks (from `memory.stat`).
    pub faults: u64,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// A memory cgroup that exists for the life of this value.
#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
    version: CgroupVersion,
    procs: Arc<OwnedFd>,
    registration: Registration,
}

/// The version and the directory under which our groups are made.
pub(crate) fn cgroup_base() -> Result<(CgroupVersion, PathBuf)> {
    let v2_controllers =
        fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    if v2_controllers.split_whitespace().any(|c| c == "memory") {
        return Ok((CgroupVersion::V2, PathBuf::from("/sys/fs/cgroup")));
    }
    let root = Path::new("/sys/fs/cgroup/memory");
    if !root.join("memory.limit_in_bytes").exists() {
        return Err(Error::Unavailable {
            facility: "memory cgroup",
            reason: "neither cgroup v2 with the memory controller nor /sys/fs/cgroup/memory".into(),
        });
    }
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::io("read", "/proc/self/cgroup", e))?;
    let rel = own
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            ctrls
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        })
        .next()
        .unwrap_or_else(|| "/".into());
    let dir = root.join(rel.trim_start_matches('/'));
    Ok((
        CgroupVersion::V1,
        if dir.is_dir() {
            dir
        } else {
            root.to_path_buf()
        },
    ))
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::io("write", path, e))
}

fn read_u64(path: &Path) -> Result<u64> {
    let s = fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    let t = s.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse().map_err(|_| Error::Parse {
        what: "cgroup counter",
        detail: format!("{}: {t:?}", path.display()),
    })
}

fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

impl MemCgroup {
    /// Creates `usm-baseline-<pid>-<seq>-<label>` limited to `limit_bytes` of memory (swap
    /// unlimited; see [`MemCgroup::set_swap_limit`]).
    pub fn create(label: &str, limit_bytes: u64) -> Result<Self> {
        let (version, base) = cgroup_base()?;
        if version == CgroupVersion::V2 {
            let sub = base.join("cgroup.subtree_control");
            let cur = fs::read_to_string(&sub).unwrap_or_default();
            if !cur.split_whitespace().any(|c| c == "memory") {
                write_file(&sub, "+memory")?;
            }
        }
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{NAME_PREFIX}{}-{seq}-{clean}", std::process::id()));
        let registration = register(Undo::RemoveCgroup { dir: dir.clone() })?;
        let made = (|| -> Result<Arc<OwnedFd>> {
            fs::create_dir(&dir).map_err(|e| Error::io("mkdir", &dir, e))?;
            match version {
                CgroupVersion::V1 => {
                    write_file(&dir.join("memory.limit_in_bytes"), &limit_bytes.to_string())?
                }
                CgroupVersion::V2 => write_file(&dir.join("memory.max"), &limit_bytes.to_string())?,
            }
            let procs = dir.join("cgroup.procs");
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| Error::io("open", &procs, e))?;
            Ok(Arc::new(OwnedFd::from(f)))
        })();
        match made {
            Ok(procs) => Ok(Self {
                dir,
                version,
                procs,
                registration,
            }),
            Err(e) => {
                let _ = registration.undo(UndoCause::Drop);
                Err(e)
            }
        }
    }

    /// Limits memory+swap (v1 `memsw.limit_in_bytes`, which must be ≥ the memory limit) or
    /// swap alone (v2 `memory.swap.max`). `None` = unlimited.
    pub fn set_swap_limit(&self, bytes: Option<u64>) -> Result<()> {
        match self.version {
            CgroupVersion::V1 => write_file(
                &self.dir.join("memory.memsw.limit_in_bytes"),
                &bytes.map_or("-1".to_string(), |b| b.to_string()),
            ),
            CgroupVersion::V2 => write_file(
                &self.dir.join("memory.swap.max"),
                &bytes.map_or("max".to_string(), |b| b.to_string()),
            ),
        }
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The hierarchy version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Makes the child spawned from `cmd` join this group before it execs (and so before
    /// it allocates anything). `cmd` must not outlive `self`'s usefulness: spawning after
    /// the group is gone fails with the write's errno.
    pub fn place_before_exec(&self, cmd: &mut Command) {
        crate::sys::baseline::join_cgroup_before_exec(cmd, Arc::clone(&self.procs));
    }

    /// A [`Command`] for `program` that starts inside this group.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.place_before_exec(&mut cmd);
        cmd
    }

    /// Moves an existing process into the group (it keeps the charges it already has).
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        write_file(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    /// Pids of the processes in the group.
    pub fn pids(&self) -> Result<Vec<u32>> {
        read_pids(&self.dir)
    }

    /// Current statistics.
    pub fn stats(&self) -> Result<CgroupStats> {
        let d = &self.dir;
        let stat_path = d.join("memory.stat");
        let stat = fs::read_to_string(&stat_path).map_err(|e| Error::io("read", &stat_path, e))?;
        let major_faults = stat_field(&stat, "pgmajfault").unwrap_or(0);
        let faults = stat_field(&stat, "pgfault").unwrap_or(0);
        Ok(match self.version {
            CgroupVersion::V1 => {
                let usage = read_u64(&d.join("memory.usage_in_bytes"))?;
                let memsw_peak = read_u64(&d.join("memory.memsw.max_usage_in_bytes")).unwrap_or(0);
                CgroupStats {
                    limit_bytes: read_u64(&d.join("memory.limit_in_bytes"))?,
                    usage_bytes: usage,
                    peak_bytes: read_u64(&d.join("memory.max_usage_in_bytes"))?,
                    swap_bytes: stat_field(&stat, "swap").unwrap_or(0),
                    peak_with_swap_bytes: memsw_peak,
                    major_faults,
                    faults,
                }
            }
            CgroupVersion::V2 => {
                let peak = read_u64(&d.join("memory.peak")).unwrap_or(0);
                let swap_peak = read_u64(&d.join("memory.swap.peak")).unwrap_or(0);
                CgroupStats {
                    limit_bytes: read_u64(&d.join("memory.max"))?,
                    usage_bytes: read_u64(&d.join("memory.current"))?,
                    peak_bytes: peak,
                    swap_bytes: read_u64(&d.join("memory.swap.current")).unwrap_or(0),
                    peak_with_swap_bytes: peak.saturating_add(swap_peak),
                    major_faults,
                    faults,
                }
            }
        })
    }

    /// Removes the group now (tasks still inside are moved to the parent), reporting errors
    /// that a drop would swallow.
    pub fn remove(self) -> Result<()> {
        self.registration.undo(UndoCause::Drop)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.registration.undo(UndoCause::Drop) {
            eprintln!("usm: removing cgroup {}: {e}", self.dir.display());
        }
    }
}

fn read_pids(dir: &Path) -> Result<Vec<u32>> {
    let p = dir.join("cgroup.procs");
    let s = fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?;
    Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// How long tasks of a group being removed on termination get between SIGTERM and
/// SIGKILL: long enough for `usm exec` (the USM side of `usm compare`) to stop its program
/// and its private daemon, which deletes its own swap file.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Empties and removes a cgroup directory (idempotent: a missing directory is success).
///
/// Tasks still inside are moved to the parent ([`UndoCause::Drop`]) or, on termination,
/// sent SIGTERM, then SIGKILL after [`TERMINATE_GRACE`].
pub(crate) fn remove_cgroup_dir(dir: &Path, cause: UndoCause) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let parent_procs = dir
        .parent()
        .map(|p| p.join("cgroup.procs"))
        .ok_or_else(|| Error::Invalid(format!("cgroup without parent: {}", dir.display())))?;
    let start = Instant::now();
    let deadline = start + TERMINATE_GRACE + Duration::from_secs(10);
    let mut termed = false;
    loop {
        let pids = read_pids(dir).unwrap_or_default();
        let kill = Instant::now() >= start + TERMINATE_GRACE;
        for pid in &pids {
            match cause {
                UndoCause::Drop => {
                    // A task that exits meanwhile makes this fail with ESRCH: fine.
                    let _ = fs::write(&parent_procs, pid.to_string());
                }
                UndoCause::Terminate if kill || !termed => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        if kill {
                            nix::sys::signal::Signal::SIGKILL
                        } else {
                            nix::sys::signal::Signal::SIGTERM
                        },
                    );
                }
                UndoCause::Terminate => {}
            }
        }
        termed = true;
        if cause == UndoCause::Terminate && !pids.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io("rmdir", dir, e)),
        }
    }
}
