//! Kernel swap for the kernel sides: [`SwapFile`] in a directory of the caller's choice
//! (`usm compare` puts it beside USM's own swap file: same filesystem, same disk) and
//! [`ZramSwap`] on `/dev/zram0`.
//!
//! Both write the swap header themselves (the `mkswap` layout: version 1, last page,
//! no bad pages, `SWAPSPACE2` in the last 10 bytes of page 0) and call `swapon(2)` with an
//! explicit priority. Drop (or a signal, or cleanup of a dead run) turns the swap off and
//! deletes the file / resets the device.
//!
//! `/dev/zram0` is shared with the swap crate's own tests: we take an exclusive `flock` on
//! [`ZRAM_LOCK_PATH`] for as long as we hold the device, and we only ever reset a device
//! whose disksize is 0 when we find it (a non-zero disksize means someone else is using
//! it: we wait, then give up with [`Error::Busy`]).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use usm_sync::atomic::{AtomicU64, Ordering};

use super::{Error, Result};
use super::{NAME_PREFIX, Registration, Undo, UndoCause, register};

/// Lock file held while this crate uses `/dev/zram0`.
pub const ZRAM_LOCK_PATH: &str = "/run/usm-zram.lock";

const PAGE: u64 = 4096;

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// One line of `/proc/swaps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSwap {
    /// Device or file path.
    pub path: String,
    /// `file` or `partition`.
    pub kind: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Priority.
    pub priority: i32,
}

/// The swaps currently active (`/proc/swaps`); empty on a machine without swap.
pub fn active_swaps() -> Result<Vec<ActiveSwap>> {
    let text =
        fs::read_to_string("/proc/swaps").map_err(|e| Error::io("read", "/proc/swaps", e))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            Some(ActiveSwap {
                path: f[0].replace("\\040", " "),
                kind: f[1].to_string(),
                size_bytes: f[2].parse::<u64>().ok()? * 1024,
                used_bytes: f[3].parse::<u64>().ok()? * 1024,
                priority: f[4].parse().ok()?,
            })
        })
        .collect())
}

fn is_active(path: &Path) -> bool {
    let p = path.to_string_lossy();
    active_swaps()
        .map(|v| v.iter().any(|s| s.path == p))
        .unwrap_or(false)
}

/// Writes a version-1 swap header for `bytes` of space at the start of `file`.
fn write_swap_header(file: &File, path: &Path, bytes: u64) -> Result<()> {
    let pages = bytes / PAGE;
    if pages < 10 {
        return Err(Error::Invalid(format!(
            "swap of {bytes} bytes is too small"
        )));
    }
    let mut page0 = vec![0u8; PAGE as usize];
    // struct swap_header_v1_2 at offset 1024: version, last_page, nr_badpages, uuid[16],
    // volume_name[16], padding, badpages.
    page0[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page0[1028..1032].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let uuid = (nanos ^ u128::from(std::process::id()) << 64).to_le_bytes();
    page0[1036..1052].copy_from_slice(&uuid);
    page0[1052..1062].copy_from_slice(b"usm-kernel");
    page0[PAGE as usize - 10..].copy_from_slice(b"SWAPSPACE2");
    file.write_all_at(&page0, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write swap header", path, e))
}

/// A swap file on disk, active for the life of this value.
#[derive(Debug)]
pub struct SwapFile {
    path: PathBuf,
    size_bytes: u64,
    registration: Registration,
}

impl SwapFile {
    /// Creates `dir/usm-baseline-<pid>-<seq>.swap` of `bytes` (rounded down to pages) with
    /// `fallocate`, writes the header and enables it at `priority` (0..=32767).
    pub fn create(dir: &Path, bytes: u64, priority: i16) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", dir, e))?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{NAME_PREFIX}{}-{seq}.swap", std::process::id()));
        let size_bytes = bytes / PAGE * PAGE;
        let registration = register(Undo::SwapOffFile { path: path.clone() })?;
        let made = (|| -> Result<()> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io("create", &path, e))?;
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| Error::io("chmod", &path, e))?;
            nix::fcntl::fallocate(
                &file,
                nix::fcntl::FallocateFlags::empty(),
                0,
                size_bytes as i64,
            )
            .map_err(|e| Error::io("fallocate", &path, e.into()))?;
            write_swap_header(&file, &path, size_bytes)?;
            drop(file);
            crate::sys::baseline::swapon(&path, priority)
        })();
        match made {
            Ok(()) => Ok(Self {
                path,
                size_bytes,
                registration,
            }),
            Err(e) => {
                let _ = registration.undo(UndoCause::Drop);
                Err(e)
            }
        }
    }

    /// The swap file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes of it in use right now (from `/proc/swaps`).
    pub fn used_bytes(&self) -> u64 {
        let p = self.path.to_string_lossy();
        active_swaps()
            .ok()
            .and_then(|v| v.into_iter().find(|s| s.path == p))
            .map_or(0, |s| s.used_bytes)
    }

    /// Turns the swap off and deletes the file now, reporting errors a drop would swallow.
    pub fn remove(self) -> Result<()> {
        self.registration.undo(UndoCause::Drop)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if let Err(e) = self.registration.undo(UndoCause::Drop) {
            eprintln!("usm: removing swap file {}: {e}", self.path.display());
        }
    }
}

/// Undo of [`SwapFile`]: swapoff if active, then delete.
pub(crate) fn undo_swap_file(path: &Path) -> Result<()> {
    if is_active(path) {
        crate::sys::baseline::swapoff(path)?;
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("unlink", path, e)),
    }
}

/// Undo of [`ZramSwap`]: only a device that is an active swap is ours to turn off and
/// reset; anything else is left alone.
pub(crate) fn undo_zram(device: &Path, sysfs: &Path) -> Result<()> {
    if is_active(device) {
        crate::sys::baseline::swapoff(device)?;
        let reset = sysfs.join("reset");
        fs::write(&reset, "1").map_err(|e| Error::io("write", &reset, e))?;
    }
    Ok(())
}

/// Swap on `/dev/zram0`, active for the life of this value.
#[derive(Debug)]
pub struct ZramSwap {
    device: PathBuf,
    sysfs: PathBuf,
    size_bytes: u64,
    registration: Registration,
    // Dropped after `registration` is undone (fields drop after `Drop::drop`).
    _lock: Flock<File>,
}

impl ZramSwap {
    /// Takes `/dev/zram0` (waiting up to `wait` for the lock and for a zero disksize), sizes
    /// it to `bytes`, writes the swap header and enables it at `priority`.
    ///
    /// Errors: [`Error::Unavailable`] without zram, [`Error::Busy`] when the device stays in
    /// use by someone else for `wait`.
    pub fn create(bytes: u64, priority: i16, wait: Duration) -> Result<Self> {
        let device = PathBuf::from("/dev/zram0");
        let sysfs = PathBuf::from("/sys/block/zram0");
        if !device.exists() || !sysfs.join("disksize").exists() {
            return Err(Error::Unavailable {
                facility: "zram",
                reason: "/dev/zram0 does not exist (modprobe zram)".into(),
            });
        }
        let deadline = Instant::now() + wait;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(ZRAM_LOCK_PATH)
            .map_err(|e| Error::io("open", ZRAM_LOCK_PATH, e))?;
        let mut pending = lock_file;
        let lock = loop {
            match Flock::lock(pending, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, _)) if Instant::now() < deadline => {
                    pending = f;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, errno)) => {
                    return Err(Error::Busy {
                        facility: "zram",
                        reason: format!("{ZRAM_LOCK_PATH} held by another process ({errno})"),
                    });
                }
            }
        };
        let disksize = sysfs.join("disksize");
        loop {
            let cur = fs::read_to_string(&disksize).map_err(|e| Error::io("read", &disksize, e))?;
            if cur.trim() == "0" {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy {
                    facility: "zram",
                    reason: format!(
                        "/dev/zram0 has disksize {} (in use by someone else); not resetting it",
                        cur.trim()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let size_bytes = bytes / PAGE * PAGE;
        let registration = register(Undo::SwapOffZram {
            device: device.clone(),
            sysfs: sysfs.clone(),
        })?;
        let made = (|| -> Result<()> {
            fs::write(&disksize, size_bytes.to_string())
                .map_err(|e| Error::io("write", &disksize, e))?;
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&device)
                .map_err(|e| Error::io("open", &device, e))?;
            write_swap_header(&dev, &device, size_bytes)?;
            drop(dev);
            crate::sys::baseline::swapon(&device, priority)
        })();
        match made {
            Ok(()) => Ok(Self {
                device,
                sysfs,
                size_bytes,
                registration,
                _lock: lock,
            }),
            Err(e) => {
                // We sized it (disksize was 0): reset even if swapon failed.
                let _ = registration.undo(UndoCause::Drop);
                let _ = fs::write(sysfs.join("reset"), "1");
                Err(e)
            }
        }
    }

    /// The device node.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Its size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes of it in use (from `/proc/swaps`).
    pub fn used_bytes(&self) -> u64 {
        let p = self.device.to_string_lossy();
        active_swaps()
            .ok()
            .and_then(|v| v.into_iter().find(|s| s.path == p))
            .map_or(0, |s| s.used_bytes)
    }

    /// Sysfs directory of the device (for `mm_stat`).
    pub fn sysfs(&self) -> &Path {
        &self.sysfs
    }

    /// Turns the swap off and resets the device now, reporting errors.
    pub fn remove(self) -> Result<()> {
        self.registration.undo(UndoCause::Drop)
    }
}

impl Drop for ZramSwap {
    fn drop(&mut self) {
        if let Err(e) = self.registration.undo(UndoCause::Drop) {
            eprintln!("usm: removing zram swap: {e}");
        }
    }
}
