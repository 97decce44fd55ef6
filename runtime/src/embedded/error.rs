//! Errors of the embedded runtime.

/// What can go wrong building or using the embedded runtime.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// A builder setting is out of range.
    #[error("embedded runtime configuration: {0}")]
    Config(&'static str),
    /// userfaultfd / pool failure (errno inside).
    #[error(transparent)]
    Kmod(#[from] usm_kmod::Error),
    /// Swap device or io_uring failure.
    #[error(transparent)]
    Swap(#[from] usm_swap::SwapError),
    /// Policy name unknown or malformed.
    #[error(transparent)]
    Policy(#[from] usm_policies::PolicyError),
    /// Memory-core failure.
    #[error(transparent)]
    Mm(#[from] crate::mm::MmError),
    /// Scheduler failure.
    #[error(transparent)]
    Sched(#[from] usm_localmanager::SchedError),
    /// Installing the SIGBUS handler or creating an eventfd failed.
    #[error("signal set-up: {0}")]
    Signal(#[source] nix::Error),
    /// Setting up network I/O for uThreads failed.
    #[error(transparent)]
    Net(#[from] crate::embedded::NetError),
    /// The runtime was shut down.
    #[error("the runtime is shut down")]
    ShutDown,
}

impl EmbeddedError {
    /// Retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            EmbeddedError::Kmod(e) => e.is_retryable(),
            EmbeddedError::Swap(e) => e.is_retryable(),
            EmbeddedError::Mm(e) => e.is_retryable(),
            _ => false,
        }
    }
}
