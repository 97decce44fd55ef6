//! Errors of the localmanager crate.

use std::io;

/// Everything that can fail when building or using a runtime.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// A configuration value is out of range.
    #[error("invalid runtime configuration: {0}")]
    InvalidConfig(&'static str),
    /// A requested core does not exist or pinning to it failed.
    #[error("cannot pin worker {worker} to core {core}")]
    Pin {
        /// Worker index.
        worker: usize,
        /// Core id.
        core: usize,
    },
    /// Creating the worker's eventfd failed.
    #[error("creating the wake eventfd failed")]
    EventFd(#[source] nix::Error),
    /// Opening or writing `/dev/cpu_dma_latency` failed.
    #[error("holding /dev/cpu_dma_latency at 0 failed")]
    CpuDmaLatency(#[source] io::Error),
    /// Installing the preemption signal handler failed.
    #[error("installing the preemption signal handler failed")]
    Signal(#[source] io::Error),
    /// Spawning a worker OS thread failed.
    #[error("spawning worker thread {worker} failed")]
    SpawnWorker {
        /// Worker index.
        worker: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a fiber (stack allocation) failed.
    #[error(transparent)]
    Fiber(#[from] usm_fibers::FiberError),
    /// The runtime is shutting down and accepts no new uThreads.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// The call needs to run on a uThread (or worker) of a runtime.
    #[error("not called from a uThread of this runtime")]
    NotInUThread,
    /// A LocalManager has no free slot left (capacity limit reached).
    #[error("worker {worker} has no free uThread slot")]
    NoSlot {
        /// Worker index.
        worker: usize,
    },
}

impl SchedError {
    /// True when retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SchedError::Fiber(e) => e.is_retryable(),
            SchedError::NoSlot { .. } => true,
            SchedError::SpawnWorker { source, .. } => source.raw_os_error() == Some(libc::EAGAIN),
            _ => false,
        }
    }

    /// The errno behind the error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SchedError::EventFd(e) => Some(*e as i32),
            SchedError::CpuDmaLatency(e) | SchedError::Signal(e) => e.raw_os_error(),
            SchedError::SpawnWorker { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
