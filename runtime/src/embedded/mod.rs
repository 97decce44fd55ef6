//! The embedded runtime: an application links it, runs its tasks as uThreads on pinned
//! workers, keeps its data in managed [`Region`]s, and never stalls a core on a swap-in.
//!
//! ```no_run
//! use usm_runtime::embedded::{Runtime, RegionVec};
//! let rt = Runtime::builder()
//!     .workers(2)
//!     .pool_frames(4096)                                  // 16 MiB of frames
//!     .create_swap_file("/var/tmp/usm-swap0", 256 << 20) // on a disk, not tmpfs
//!     .alloc_policy("first-fit")
//!     .build()?;
//! let mut region = rt.region(64 << 20)?;                  // 64 MiB, 4x the pool
//! let sum = rt.block_on(move || {
//!     let data = region.as_mut_slice::<u64>();
//!     for (i, x) in data.iter_mut().enumerate() { *x = i as u64; } // faults, evictions
//!     data.iter().sum::<u64>()                                       // swap-ins
//! })?;
//! println!("{sum} {}", serde_json::to_string(&rt.stats())?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The fault path (DESIGN.md, "The fault path, embedded mode")
//! 1. Regions and the pool are registered on one userfaultfd opened with
//!    `UFFD_FEATURE_SIGBUS` (+ MOVE, POISON): a missing page raises SIGBUS in the
//!    faulting thread.
//! 2. The SIGBUS handler (`SA_SIGINFO|SA_NODEFER`, no alternate stack; chains foreign
//!    faults to the previous handler) reads the write bit from the fault error code and
//!    only records (address, write) and parks the uThread in its worker's PFQ with
//!    `usm_localmanager::signal::park_current_on_fault`. A thread that is not a uThread
//!    posts the fault to the runtime and waits on a futex.
//! 3. The worker's driver (module `driver`) — normal context, every scheduling round — hands
//!    each fault to the memory core ([`crate::mm::WorkerMm::handle_fault`]): the region's
//!    allocation policy runs, zero pages are installed with `UFFDIO_COPY` from the pool's
//!    zero source (or pre-zeroed frames with `UFFDIO_MOVE`, [`InstallMode::Move`]), or the
//!    uThread stays in PFQ while its io_uring swap-in runs and the worker runs others.
//! 4. Completions are reaped every round; the page is installed; the uThread moves to IDQ,
//!    resumes *on the same worker*, returns from the handler and retries the access.
//! 5. Content that cannot be read back is installed with `UFFDIO_POISON`: SIGBUS at that
//!    page (the handler chains it: default action), never zeros.
//!
//! # Knobs that change the fault path
//! - [`Builder::install_mode`]: [`InstallMode::Copy`] (default) installs by `UFFDIO_COPY`
//!   (no TLB flush per page; the copied pool slots are dropped in batches; the pool has
//!   lazy slots, nothing populated), [`InstallMode::Move`] by `UFFDIO_MOVE` (zero copy, one
//!   TLB flush — with two workers an IPI — per page). See `crate::mm::InstallMode`.
//! - [`Builder::swap_in_mode`]: [`SwapInMode::Yield`] (default) runs other uThreads while a
//!   swap-in is in flight; [`SwapInMode::Sync`] makes the worker wait for it (blocked in
//!   `io_uring_enter`), the kernel-like baseline inside USM (benchmark mode (b)).
//! - [`Builder::access_sampling`] (default on): re-fault sampling gives the eviction
//!   policy access information (reads included) — see the `crate::mm` module docs.
//! - [`Builder::round_budget`]: uThread runs between two regular driver polls.
//!
//! # What an application must not do around region accesses
//! - **Do not hold an OS-level lock** (`std::sync::Mutex`, `RwLock`, a spin lock, a lock
//!   inside `println!`'s stdout) while touching region memory from a uThread. The access
//!   may park the uThread while its worker runs other uThreads; if one of those blocks on
//!   the same OS lock, the worker thread itself blocks — and the page the lock holder
//!   waits for is installed by that very worker, so neither ever proceeds. Use
//!   `usm_localmanager::sync::Mutex` (it parks the uThread, not the worker).
//! - **Do not pass region memory to a syscall directly**: the kernel gets `EFAULT` on a
//!   missing page (and, e.g., a received datagram is lost). Use [`Region::recv_into`],
//!   [`Region::send_from`] or [`Region::pin_for_syscall`] (pins, then pre-faults).
//! - **Do not touch region memory from a worker thread outside a uThread** (a `Driver`,
//!   a thread-local destructor): that thread would wait for a fault that only it can
//!   serve. Plain threads of your own are fine (they wait on a futex).
//! - `fork()` children do not see regions (`MADV_DONTFORK`).
//!
//! # Observability
//! `tracing` spans `fault`, `swap_in`, `eviction`, `writeback_done`, `swap_in_done`;
//! [`Runtime::stats`] returns a `serde::Serialize` [`RuntimeStats`] with counters, per-path
//! latency (fast map, swap-cache hit, swap-in, synchronous wait), the pool census and the
//! scheduler's counters (yields, faults parked).

mod driver;
mod error;
mod net;
mod region;
mod runtime;
#[cfg(test)]
mod tests;

pub use crate::mm::InstallMode;
pub use error::EmbeddedError;
pub use net::{Net, NetError, TcpListener, TcpStream};
pub use region::{PinGuard, Pod, Region, RegionVec};
pub use runtime::{Builder, Runtime, SwapInMode};
/// uThread-aware locks and channels (a blocked uThread parks, its worker runs others): what
/// code that touches region memory under a lock must use (see above).
pub use usm_localmanager::sync;
pub use usm_localmanager::{JoinError, JoinHandle, ShutdownReport, WakerMode};
/// Parks the calling uThread for a while / gives its worker to the next ready uThread.
pub use usm_localmanager::{sleep, yield_now};

/// A snapshot of the embedded runtime's state (serialisable for the demo and benches).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeStats {
    /// Memory-core counters and latency per fault path.
    pub mm: crate::mm::StatsSnapshot,
    /// Frames by state (`pool.total`: the pool's size).
    pub pool: usm_kmod::pool::Census,
    /// COPY installs: batches of pool slots given back to the kernel so far (the slot of
    /// a frame copied into a region is dropped in batches, keeping memory at the pool's
    /// size).
    pub slot_drop_batches: u64,
    /// COPY installs: pool slots dropped so far, in those batches.
    pub slots_dropped: u64,
    /// COPY installs: pool slots waiting for their batched drop.
    pub slots_pending_drop: usize,
    /// Swap slots in use.
    pub swap_slots_used: u64,
    /// Swap I/O in flight.
    pub io_in_flight: usize,
    /// The runtime's address-space counters (resident, swapped, poisoned, faults).
    pub space: crate::mm::SpaceCounters,
    /// Scheduler counters per worker.
    pub sched: Vec<usm_localmanager::CountersSnapshot>,
}
