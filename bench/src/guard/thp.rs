//! Transparent huge page knobs: [`ThpSetting`] (the global
//! `/sys/kernel/mm/transparent_hugepage/{enabled,defrag}`), [`MthpSetting`] (per-size
//! `hugepages-<N>kB/enabled`), both on the generic [`SysfsKnob`] guard that writes a value
//! and writes the previous one back on drop, panic, or signal.
//!
//! The previous value of a "choice" knob is the bracketed word (`always [madvise] never`
//! → `madvise`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use usm_runtime::baseline::{Registration, Undo, UndoCause, register};

const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// Writes `value` to a sysfs knob.
pub(crate) fn write_knob(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::io("write", path, e))
}

/// The current value of a knob: the bracketed word of a choice list, else the whole text.
pub(crate) fn read_knob(path: &Path) -> Result<String> {
    let text = fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    let t = text.trim();
    Ok(match (t.find('['), t.find(']')) {
        (Some(a), Some(b)) if a < b => t[a + 1..b].to_string(),
        _ => t.to_string(),
    })
}

/// A sysfs (or procfs) knob set to a value for the life of this guard.
#[derive(Debug)]
pub struct SysfsKnob {
    path: PathBuf,
    original: String,
    registration: Registration,
}

impl SysfsKnob {
    /// Records the current value of `path`, then writes `value`.
    pub fn set(path: impl Into<PathBuf>, value: &str) -> Result<Self> {
        let path = path.into();
        if !path.exists() {
            return Err(Error::Unavailable {
                facility: "sysfs knob",
                reason: format!("{} does not exist", path.display()),
            });
        }
        let original = read_knob(&path)?;
        let registration = register(Undo::RestoreSysfs {
            path: path.clone(),
            value: original.clone(),
        })?;
        if let Err(e) = write_knob(&path, value) {
            let _ = registration.undo(UndoCause::Drop);
            return Err(e);
        }
        Ok(Self {
            path,
            original,
            registration,
        })
    }

    /// The knob.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value it will be restored to.
    pub fn original(&self) -> &str {
        &self.original
    }

    /// Restores the knob now, reporting errors.
    pub fn restore(self) -> Result<()> {
        Ok(self.registration.undo(UndoCause::Drop)?)
    }
}

impl Drop for SysfsKnob {
    fn drop(&mut self) {
        if let Err(e) = self.registration.undo(UndoCause::Drop) {
            eprintln!("usm-bench: restoring {}: {e}", self.path.display());
        }
    }
}

/// Global THP mode (`enabled` and `defrag` accept these words, `defrag` more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThpMode {
    /// THP for every anonymous mapping.
    Always,
    /// THP only in `MADV_HUGEPAGE` ranges.
    Madvise,
    /// No THP.
    Never,
}

impl ThpMode {
    fn word(self) -> &'static str {
        match self {
            ThpMode::Always => "always",
            ThpMode::Madvise => "madvise",
            ThpMode::Never => "never",
        }
    }
}

/// The global THP `enabled` knob, set for the life of this guard.
#[derive(Debug)]
pub struct ThpSetting {
    knob: SysfsKnob,
}

impl ThpSetting {
    /// Sets `/sys/kernel/mm/transparent_hugepage/enabled` to `mode`.
    pub fn set_enabled(mode: ThpMode) -> Result<Self> {
        let path = Path::new(THP_DIR).join("enabled");
        if !path.exists() {
            return Err(Error::Unavailable {
                facility: "THP",
                reason: format!("{} does not exist", path.display()),
            });
        }
        Ok(Self {
            knob: SysfsKnob::set(path, mode.word())?,
        })
    }

    /// The value that will be restored.
    pub fn original(&self) -> &str {
        self.knob.original()
    }
}

/// Per-size mTHP mode (`hugepages-<N>kB/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MthpMode {
    /// Always use this size where it fits.
    Always,
    /// Follow the global `enabled` knob.
    Inherit,
    /// Only in `MADV_HUGEPAGE` ranges.
    Madvise,
    /// Never this size.
    Never,
}

impl MthpMode {
    fn word(self) -> &'static str {
        match self {
            MthpMode::Always => "always",
            MthpMode::Inherit => "inherit",
            MthpMode::Madvise => "madvise",
            MthpMode::Never => "never",
        }
    }
}

/// Folio sizes (KiB) that have a `hugepages-<N>kB/enabled` knob here, ascending. Empty on a
/// kernel without mTHP.
pub fn mthp_sizes_kib() -> Vec<u32> {
    let mut sizes: Vec<u32> = fs::read_dir(THP_DIR)
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                // Some sizes (8 kB on x86-64) have a directory but no anonymous knob.
                if !e.path().join("enabled").exists() {
                    return None;
                }
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("hugepages-")?
                    .strip_suffix("kB")?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default();
    sizes.sort_unstable();
    sizes
}

/// One per-size mTHP knob, set for the life of this guard.
#[derive(Debug)]
pub struct MthpSetting {
    size_kib: u32,
    knob: SysfsKnob,
}

impl MthpSetting {
    /// Sets `hugepages-<size_kib>kB/enabled` to `mode`.
    pub fn set(size_kib: u32, mode: MthpMode) -> Result<Self> {
        let path = Path::new(THP_DIR).join(format!("hugepages-{size_kib}kB/enabled"));
        if !path.exists() {
            return Err(Error::Unavailable {
                facility: "mTHP",
                reason: format!("{} does not exist", path.display()),
            });
        }
        Ok(Self {
            size_kib,
            knob: SysfsKnob::set(path, mode.word())?,
        })
    }

    /// The folio size in KiB.
    pub fn size_kib(&self) -> u32 {
        self.size_kib
    }

    /// The value that will be restored.
    pub fn original(&self) -> &str {
        self.knob.original()
    }
}

/// Reads a per-size mTHP counter (`hugepages-<N>kB/stats/<name>`), 0 when absent.
pub fn mthp_stat(size_kib: u32, name: &str) -> u64 {
    fs::read_to_string(Path::new(THP_DIR).join(format!("hugepages-{size_kib}kB/stats/{name}")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
