//! Errors of the memory-manager core.

use usm_kmod::FrameNo;

/// What can go wrong in the memory-manager core.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// A userfaultfd or frame-pool operation failed (errno kept inside).
    #[error("memory mechanism: {0}")]
    Kmod(#[from] usm_kmod::Error),
    /// A swap device, slot or io_uring operation failed.
    #[error("swap: {0}")]
    Swap(#[from] usm_swap::SwapError),
    /// A policy name or parameter is unknown or malformed.
    #[error("policy: {0}")]
    Policy(#[from] usm_policies::PolicyError),
    /// A managed range overlaps one that exists, or is empty / unaligned.
    #[error("managed range {start:#x}+{len:#x} of pid {pid}: {reason}")]
    BadRange {
        /// The process.
        pid: u32,
        /// First byte.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// No managed range starts at this address.
    #[error("no managed range at {addr:#x} in pid {pid}")]
    NoRange {
        /// The process.
        pid: u32,
        /// The address.
        addr: u64,
    },
    /// A frame was not in the state the protocol expects (a bug in the core).
    #[error("frame {frame} is not where the protocol expects it: {what}")]
    Protocol {
        /// The frame.
        frame: FrameNo,
        /// What was expected.
        what: &'static str,
    },
    /// The worker index is beyond the number of workers the core was built for.
    #[error("no worker {0}")]
    NoWorker(usize),
}

impl MmError {
    /// Transient: retrying the same operation later may succeed (an address-space event
    /// is pending, the io_uring queue is full).
    pub fn is_retryable(&self) -> bool {
        match self {
            MmError::Kmod(e) => e.is_retryable(),
            MmError::Swap(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The page's content is lost (a swap read failed): it must be poisoned, never zeroed.
    pub fn must_poison(&self) -> bool {
        matches!(self, MmError::Swap(e) if e.must_poison())
    }
}
