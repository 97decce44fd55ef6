//! `/dev/zramN` as a RAM swap device for USM (never `swapon`'d by the kernel).
//!
//! [`Zram::configure`] resets the device, optionally picks the compressor, sets its size
//! and returns a guard; dropping the guard resets the device again (frees its memory), also
//! when a test or benchmark fails. The caller then [`format`](crate::format)s and
//! [`open`](crate::SwapDevice::open)s the returned [`path`](Zram::path) like any block
//! device; the `O_EXCL` open makes a kernel `swapon` on it fail while USM holds it.
//!
//! `O_DIRECT` I/O on zram is synchronous in the block layer, so io_uring runs it on io-wq
//! kernel threads: count their CPU when measuring. A lone request (nothing else
//! outstanding) skips io_uring altogether: the engine performs it inline
//! ([`Engine`](crate::Engine), "Synchronous devices").

use std::path::{Path, PathBuf};

use crate::error::{Result, SwapError};

/// A configured zram device; reset when dropped.
#[derive(Debug)]
pub struct Zram {
    index: u32,
    dev: PathBuf,
    sys: PathBuf,
}

fn write_attr(sys: &Path, attr: &'static str, value: &str) -> Result<()> {
    let p = sys.join(attr);
    std::fs::write(&p, value).map_err(|e| SwapError::device(attr, p, e))
}

impl Zram {
    /// Whether `/dev/zram{index}` and its sysfs directory exist.
    pub fn available(index: u32) -> bool {
        Path::new(&format!("/sys/block/zram{index}")).is_dir()
            && Path::new(&format!("/dev/zram{index}")).exists()
    }

    /// Resets `/dev/zram{index}`, sets `algorithm` (e.g. `"lz4"`) when given, then sets
    /// `disksize` bytes. Fails with `EBUSY` (from the reset) if something holds the device
    /// open, e.g. a kernel `swapon`.
    pub fn configure(index: u32, disksize: u64, algorithm: Option<&str>) -> Result<Self> {
        let sys = PathBuf::from(format!("/sys/block/zram{index}"));
        let dev = PathBuf::from(format!("/dev/zram{index}"));
        if !Self::available(index) {
            return Err(SwapError::device(
                "find zram device",
                dev,
                std::io::Error::from_raw_os_error(libc::ENODEV),
            ));
        }
        let guard = Self { index, dev, sys };
        guard.reset()?;
        if let Some(alg) = algorithm {
            write_attr(&guard.sys, "comp_algorithm", alg)?;
        }
        write_attr(&guard.sys, "disksize", &disksize.to_string())?;
        Ok(guard)
    }

    /// The block device path (`/dev/zramN`).
    pub fn path(&self) -> &Path {
        &self.dev
    }

    /// The device index N.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The configured size in bytes, read back from sysfs.
    pub fn disksize(&self) -> Result<u64> {
        let p = self.sys.join("disksize");
        let s = std::fs::read_to_string(&p).map_err(|e| SwapError::device("disksize", &p, e))?;
        s.trim().parse().map_err(|_| {
            SwapError::device(
                "parse disksize",
                p,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )
        })
    }

    /// Resets the device now (the guard's `Drop` does the same). `EBUSY` is retried for
    /// up to two seconds: a just-dropped io_uring releases its files from a kernel work
    /// item, so the device can stay held for a moment after its last user is gone.
    pub fn reset(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match write_attr(&self.sys, "reset", "1") {
                Err(e)
                    if e.errno() == Some(libc::EBUSY) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        if let Err(e) = self.reset() {
            tracing::error!(error = %e, device = %self.dev.display(), "zram reset failed");
        }
    }
}
