//! Errors of the fibers crate.

use std::io;

/// Everything that can go wrong creating a fiber or its stack.
#[derive(Debug, thiserror::Error)]
pub enum FiberError {
    /// The configured stack size is below [`crate::MIN_STACK_SIZE`].
    #[error("stack size {requested} bytes is below the minimum of {minimum} bytes")]
    StackTooSmall {
        /// Requested size in bytes.
        requested: usize,
        /// The minimum accepted.
        minimum: usize,
    },
    /// `mmap`/`mprotect` of a new stack failed.
    #[error("allocating a {size}-byte fiber stack failed")]
    StackAlloc {
        /// Requested usable size.
        size: usize,
        /// The OS error (errno kept).
        #[source]
        source: io::Error,
    },
}

impl FiberError {
    /// True when retrying later may succeed (memory pressure, mapping-count limit).
    pub fn is_retryable(&self) -> bool {
        match self {
            FiberError::StackTooSmall { .. } => false,
            FiberError::StackAlloc { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOMEM) | Some(libc::EAGAIN)
            ),
        }
    }
}
