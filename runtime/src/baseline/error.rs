//! The one error type of [`crate::baseline`].
//!
//! Every variant keeps the OS error (errno) as its `source` where there is one, and names
//! the file or knob it was touching, so a failed set-up says exactly what to look at.

use std::io;
use std::path::PathBuf;

/// Errors of the kernel-side guards.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or sysfs/cgroupfs operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`"write"`, `"rmdir"`, ...).
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A system call without a path failed.
    #[error("{op}: {source}")]
    Sys {
        /// The system call.
        op: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A kernel facility this machine does not have (no zram, no memory cgroup).
    #[error("{facility} is not available: {reason}")]
    Unavailable {
        /// The facility.
        facility: &'static str,
        /// Why we think it is absent.
        reason: String,
    },
    /// A shared facility is in use by someone else (e.g. `/dev/zram0` with a non-zero
    /// disksize we did not set).
    #[error("{facility} is busy: {reason}")]
    Busy {
        /// The facility.
        facility: &'static str,
        /// Who or what holds it.
        reason: String,
    },
    /// A kernel counter could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was parsed.
        what: &'static str,
        /// The offending text.
        detail: String,
    },
    /// A caller-supplied parameter is out of range.
    #[error("invalid parameter: {0}")]
    Invalid(String),
    /// A journal record could not be (de)serialised.
    #[error("journal: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Builds an [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Sys`].
    pub(crate) fn sys(op: &'static str, source: nix::Error) -> Self {
        Error::Sys { op, source }
    }

    /// True when the facility is absent on this machine.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// True when a shared facility is held by someone else; retrying later may work.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }
}

/// Result alias of [`crate::baseline`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
