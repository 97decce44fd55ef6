//! The one error type of the crate.
//!
//! Every variant that comes from a system call keeps its `errno` as the `source`. The
//! classifiers say what the caller must do next:
//!
//! | classifier                      | meaning for the runtime                                   |
//! |---------------------------------|-----------------------------------------------------------|
//! | [`SwapError::must_poison`]      | the page's content is lost: install it with `UFFDIO_POISON` |
//! | [`SwapError::keeps_page`]       | a write failed: keep the page in memory, pick another slot |
//! | [`SwapError::is_no_space`]      | no free slot: try another device or the OOM policy        |
//! | [`SwapError::is_retryable`]     | transient (queue full, `EAGAIN`, `EINTR`): retry later     |

use std::io;
use std::path::PathBuf;

use crate::entry::{DeviceId, SwapEntry};

/// Errors of swap devices, slot allocation and the io_uring engine.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// A system call on a device path failed (open, fallocate, header I/O, sysfs).
    #[error("{op} {path}: {source}")]
    Device {
        /// What was being done ("open", "fallocate", "read header", ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The path carries no USM swap header; it is refused and never overwritten.
    #[error(
        "{path} is not a USM swap device ({found}); run `usm mkswap` (swap::format) on it first"
    )]
    NotUsmSwap {
        /// The path that was refused.
        path: PathBuf,
        /// What the first block looks like instead (zeros, a Linux swap or ext4 signature, ...).
        found: &'static str,
    },
    /// `format` found foreign data in the first block and was not forced.
    #[error(
        "refusing to format {path}: it holds {found}; pass FormatOptions {{ force: true }} to overwrite"
    )]
    ForeignData {
        /// The path that was refused.
        path: PathBuf,
        /// What was found.
        found: &'static str,
    },
    /// The header is a USM header but does not match this build or this device.
    #[error("USM swap header of {path} does not match: {reason}")]
    HeaderMismatch {
        /// The device path.
        path: PathBuf,
        /// Which field disagrees.
        reason: String,
    },
    /// The device is too small to hold the header and one slot.
    #[error("{path} is too small for a swap device ({bytes} bytes; need at least 2 pages)")]
    TooSmall {
        /// The device path.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// No free slot on the device(s) tried (`ENOSPC`).
    #[error("no free swap slot on {}", match .device { Some(d) => format!("device {}", d.0), None => "any device".into() })]
    NoSpace {
        /// The device that is full, or `None` when every device was tried.
        device: Option<DeviceId>,
    },
    /// The entry names a device this allocator or engine does not know.
    #[error("unknown swap device {}", .0.0)]
    UnknownDevice(DeviceId),
    /// A device id is used twice.
    #[error("swap device {} registered twice", .0.0)]
    DuplicateDevice(DeviceId),
    /// The entry (or the run starting at it) lies beyond the end of its device.
    #[error("{entry} (+{pages} pages) is beyond the {slots} slots of its device")]
    OutOfRange {
        /// The first entry.
        entry: SwapEntry,
        /// Pages in the request.
        pages: u64,
        /// Slots on the device.
        slots: u64,
    },
    /// The slot is not allocated (double free, or `dup` of a free slot).
    #[error("{0} is not allocated")]
    NotAllocated(SwapEntry),
    /// The slot is shared by too many owners.
    #[error("{0}: reference count overflow")]
    RefcountOverflow(SwapEntry),
    /// The slot was marked bad by an earlier failed read; its content is lost.
    #[error("{0} is marked bad: an earlier read of it failed")]
    BadEntry(SwapEntry),
    /// A read completed with an error; the entry is now marked bad unless retryable.
    #[error("swap read of {entry} failed: {source}")]
    ReadFailed {
        /// The entry read.
        entry: SwapEntry,
        /// The errno of the completion.
        #[source]
        source: io::Error,
    },
    /// A read returned fewer bytes than asked (truncated file, device shrunk).
    #[error("short swap read of {entry}: {got} of {expected} bytes")]
    ShortRead {
        /// The entry read.
        entry: SwapEntry,
        /// Bytes asked.
        expected: u32,
        /// Bytes returned.
        got: u32,
    },
    /// A write completed with an error; the page stays with the caller.
    #[error("swap write of {entry} failed: {source}")]
    WriteFailed {
        /// The entry written.
        entry: SwapEntry,
        /// The errno of the completion.
        #[source]
        source: io::Error,
    },
    /// A write stored fewer bytes than asked; the page stays with the caller.
    #[error("short swap write of {entry}: {got} of {expected} bytes")]
    ShortWrite {
        /// The entry written.
        entry: SwapEntry,
        /// Bytes asked.
        expected: u32,
        /// Bytes stored.
        got: u32,
    },
    /// The engine already holds its maximum queue depth of requests.
    #[error("io_uring queue full ({depth} requests in flight)")]
    QueueFull {
        /// The configured depth.
        depth: u32,
    },
    /// Every engine staging buffer is in use.
    #[error("all {0} staging buffers are in use")]
    StagingExhausted(u32),
    /// A buffer whose length is not a non-zero multiple of the page size.
    #[error("buffer of {0} bytes is not a non-zero multiple of 4096")]
    BadBufferLength(usize),
    /// The kernel lacks something the engine needs (a setup flag, an opcode).
    #[error("io_uring lacks {what}")]
    Unsupported {
        /// The missing feature, spelled as in the uapi header.
        what: &'static str,
    },
    /// The latency histograms could not be created.
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    /// A raw buffer address that is not aligned to 4096 bytes (`O_DIRECT` needs it).
    #[error("buffer address {0:#x} is not aligned to 4096 bytes")]
    Misaligned(usize),
    /// The [`SwapIoThread`](crate::SwapIoThread) has stopped (shut down, or its engine
    /// failed); the request was not accepted.
    #[error("the swap I/O thread has stopped")]
    Stopped,
    /// An io_uring system call (setup, register, enter) failed.
    #[error("io_uring {op}: {source}")]
    Ring {
        /// The operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

impl SwapError {
    pub(crate) fn device(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Device {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ring(op: &'static str, source: io::Error) -> Self {
        Self::Ring { op, source }
    }

    /// The errno behind this error, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Device { source, .. }
            | Self::ReadFailed { source, .. }
            | Self::WriteFailed { source, .. }
            | Self::Ring { source, .. } => source.raw_os_error(),
            Self::NoSpace { .. } => Some(libc::ENOSPC),
            _ => None,
        }
    }

    /// Transient: the same request may succeed if retried later (after reaping, or at
    /// once for `EINTR`/`EAGAIN`). A retryable read error does not mark the entry bad.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::QueueFull { .. } | Self::StagingExhausted(_) => true,
            Self::ReadFailed { source, .. }
            | Self::WriteFailed { source, .. }
            | Self::Ring { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EAGAIN | libc::EINTR | libc::EBUSY)
            ),
            _ => false,
        }
    }

    /// No free slot, or a write the device refused with `ENOSPC`: eviction should try
    /// another device or hand over to the OOM policy.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::NoSpace { .. } => true,
            Self::WriteFailed { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }

    /// The page's swap copy is lost: the runtime must install the page with
    /// `UFFDIO_POISON` (the program gets SIGBUS there), never a zeroed page.
    pub fn must_poison(&self) -> bool {
        match self {
            Self::BadEntry(_) | Self::ShortRead { .. } => true,
            Self::ReadFailed { .. } => !self.is_retryable(),
            _ => false,
        }
    }

    /// A write did not reach the device: the page must stay in memory (its buffer came
    /// back in the completion) and the slot should be freed or retried elsewhere.
    pub fn keeps_page(&self) -> bool {
        matches!(self, Self::WriteFailed { .. } | Self::ShortWrite { .. })
    }

    /// The entry the error is about, when it is about one.
    pub fn entry(&self) -> Option<SwapEntry> {
        match self {
            Self::OutOfRange { entry, .. }
            | Self::ReadFailed { entry, .. }
            | Self::ShortRead { entry, .. }
            | Self::WriteFailed { entry, .. }
            | Self::ShortWrite { entry, .. } => Some(*entry),
            Self::NotAllocated(e) | Self::RefcountOverflow(e) | Self::BadEntry(e) => Some(*e),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = SwapError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::DeviceId;

    #[test]
    fn classifiers() {
        let e = SwapEntry::new(DeviceId(1), 2).unwrap();
        let enospc = SwapError::WriteFailed {
            entry: e,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(enospc.is_no_space() && enospc.keeps_page() && !enospc.must_poison());
        let eio = SwapError::ReadFailed {
            entry: e,
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(eio.must_poison() && !eio.is_retryable());
        assert_eq!(eio.entry(), Some(e));
        assert_eq!(eio.errno(), Some(libc::EIO));
        let eagain = SwapError::ReadFailed {
            entry: e,
            source: io::Error::from_raw_os_error(libc::EAGAIN),
        };
        assert!(eagain.is_retryable() && !eagain.must_poison());
        assert!(SwapError::QueueFull { depth: 4 }.is_retryable());
        assert!(SwapError::NoSpace { device: None }.is_no_space());
        assert!(SwapError::BadEntry(e).must_poison());
    }
}
