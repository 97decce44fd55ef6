//! The crate's error type. The errno is kept as the source; classifier methods tell a
//! caller what to do without matching on errno values.

use crate::frame::FrameNo;
use crate::pool::FrameState;
use crate::uffd::{Features, OpenPath};
use nix::errno::Errno;

/// Every failure of `usm-kmod`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// One way of opening a userfaultfd failed.
    #[error("cannot open a userfaultfd via {path}: {source}")]
    Open {
        /// The way that was tried.
        path: OpenPath,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// Neither `/dev/userfaultfd` nor the syscall worked.
    #[error(
        "cannot open a userfaultfd: /dev/userfaultfd: {dev}; userfaultfd(2): {syscall} \
         (run as root, make /dev/userfaultfd accessible, or set vm.unprivileged_userfaultfd=1)"
    )]
    OpenFailed {
        /// What `/dev/userfaultfd` answered.
        dev: Errno,
        /// What the syscall answered.
        #[source]
        syscall: Errno,
    },
    /// An fd handed to us is not a userfaultfd.
    #[error("fd {fd} is not a userfaultfd (it is {what})")]
    NotUserfaultfd {
        /// The fd number.
        fd: i32,
        /// What `/proc/self/fd` says it is.
        what: String,
    },
    /// A required feature is absent on this kernel.
    #[error(
        "userfaultfd feature {name} is required but this kernel lacks it (added in Linux \
         {since}); the kernel offers: {offered}"
    )]
    MissingFeature {
        /// The feature.
        feature: Features,
        /// Its name.
        name: String,
        /// The Linux version that added it.
        since: &'static str,
        /// Everything the kernel offers.
        offered: Features,
    },
    /// A required feature exists but we may not use it (`EVENT_FORK` without
    /// `CAP_SYS_PTRACE`).
    #[error("userfaultfd feature {name} is required but not permitted to this process: {source}")]
    FeatureNotPermitted {
        /// Its name.
        name: String,
        /// The errno (`EPERM`).
        #[source]
        source: Errno,
    },
    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API requesting {requested} failed: {source}")]
    Api {
        /// What was requested.
        requested: Features,
        /// The errno (`EINVAL` when the fd was already negotiated).
        #[source]
        source: Errno,
    },
    /// A userfaultfd ioctl on a range failed.
    #[error("{op} on [{start:#x}, +{len:#x}) failed: {source}")]
    Ioctl {
        /// `UFFDIO_*` name.
        op: &'static str,
        /// Destination / range start.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// Any other system call failed.
    #[error("{what} failed: {source}")]
    Sys {
        /// The call and its purpose.
        what: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// A frame was not in the state an operation needs.
    #[error("{frame} is {actual}, the operation needs {expected}")]
    FrameState {
        /// The frame.
        frame: FrameNo,
        /// The state needed.
        expected: FrameState,
        /// The state found.
        actual: FrameState,
    },
    /// A frame number outside the pool.
    #[error("{frame} is outside the pool of {len} frames")]
    NoSuchFrame {
        /// The frame.
        frame: FrameNo,
        /// The pool size.
        len: usize,
    },
    /// The pool was built without a userfaultfd and cannot move pages.
    #[error("the frame pool has no userfaultfd: it cannot move pages")]
    NoUserfaultfd,
    /// An argument was out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The pool's frame accounting does not add up (a bug).
    #[error("frame conservation violated: {0}")]
    Conservation(String),
}

/// `Result<T, Error>`.
pub type Result<T> = core::result::Result<T, Error>;

impl Error {
    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Open { source, .. }
            | Error::FeatureNotPermitted { source, .. }
            | Error::Api { source, .. }
            | Error::Ioctl { source, .. }
            | Error::Sys { source, .. } => Some(*source),
            Error::OpenFailed { syscall, .. } => Some(*syscall),
            _ => None,
        }
    }
    /// Trying again later may succeed (`EAGAIN`, `EINTR`, `ENOMEM`).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.errno(),
            Some(Errno::EAGAIN | Errno::EINTR | Errno::ENOMEM)
        )
    }
    /// The target address space is gone (`ESRCH`: the process exited).
    pub fn is_mm_gone(&self) -> bool {
        self.errno() == Some(Errno::ESRCH)
    }
    /// The range is not (or no longer) registered / mapped, or a MOVE source page is
    /// missing (`ENOENT`).
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(Errno::ENOENT)
    }
    /// The kernel rejected the arguments (`EINVAL`): misaligned range, unregistered
    /// destination, or for MOVE mismatched protection / lock state / userfaultfd.
    pub fn is_invalid(&self) -> bool {
        self.errno() == Some(Errno::EINVAL) || matches!(self, Error::InvalidArgument(_))
    }
    /// Permission was refused (`EPERM`, `EACCES`).
    pub fn is_permission(&self) -> bool {
        matches!(self.errno(), Some(Errno::EPERM | Errno::EACCES))
            || matches!(self, Error::FeatureNotPermitted { .. })
    }
    /// A kernel feature is missing.
    pub fn is_missing_feature(&self) -> bool {
        matches!(self, Error::MissingFeature { .. })
    }
    /// A bad address (`EFAULT`): for a user-mode-only fd, a kernel access hit a missing page.
    pub fn is_fault(&self) -> bool {
        self.errno() == Some(Errno::EFAULT)
    }
}
