//! The one error type of the bench library.
//!
//! Every variant keeps the OS error (errno) as its `source` where there is one, and names
//! the file or knob it was touching, so a failed set-up says exactly what to look at.

use std::io;
use std::path::PathBuf;

/// Errors of the kernel-baseline harness.
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
    /// A kernel facility this machine does not have (no zram, no mTHP knob, no cgroup
    /// memory controller, no redis-server package, ...).
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
    /// A child process (benchmark worker, redis-server, redis-benchmark) failed.
    #[error("child {what}: {detail}")]
    Child {
        /// Which child.
        what: String,
        /// Exit status and the tail of its stderr.
        detail: String,
    },
    /// A child process was killed by a signal (SIGKILL: most often the memory cgroup's OOM
    /// killer, see `dmesg`).
    #[error("child {what}: killed by signal {signal}; {detail}")]
    ChildSignalled {
        /// Which child.
        what: String,
        /// The signal number.
        signal: i32,
        /// The tail of its stderr.
        detail: String,
    },
    /// Output of the kernel or of a tool could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was parsed.
        what: &'static str,
        /// The offending text.
        detail: String,
    },
    /// A workload found a page whose checksum does not match what it last wrote.
    #[error("data corruption: {0}")]
    Corruption(String),
    /// A caller-supplied parameter is out of range.
    #[error("invalid parameter: {0}")]
    Invalid(String),
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A kernel-side guard (cgroup, swap file, zram, journal) failed; absent and busy
    /// facilities become [`Error::Unavailable`] / [`Error::Busy`] instead.
    #[error(transparent)]
    Baseline(usm_runtime::baseline::Error),
}

impl From<usm_runtime::baseline::Error> for Error {
    fn from(e: usm_runtime::baseline::Error) -> Self {
        use usm_runtime::baseline::Error as B;
        match e {
            B::Unavailable { facility, reason } => Error::Unavailable { facility, reason },
            B::Busy { facility, reason } => Error::Busy { facility, reason },
            B::Io { op, path, source } => Error::Io { op, path, source },
            B::Sys { op, source } => Error::Sys { op, source },
            other => Error::Baseline(other),
        }
    }
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

    /// True when the facility is absent on this machine: tests skip, benches leave the
    /// side out with the reason.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// True when a shared facility is held by someone else; retrying later may work.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }

    /// True when a child was SIGKILLed: in a benchmark that places children in a memory
    /// cgroup, the cgroup's OOM killer (a kernel-side failure of that run, not of the
    /// harness), so running the point again is reasonable.
    pub fn is_child_killed(&self) -> bool {
        matches!(self, Error::ChildSignalled { signal, .. } if *signal == libc::SIGKILL)
    }

    /// The errno behind this error, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::Sys { source, .. } => Some(*source as i32),
            _ => None,
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
