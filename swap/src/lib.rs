//! `usm-swap`: swap devices, reference-counted slots, and the io_uring engine.
//!
//! This crate knows nothing about uThreads: an I/O request returns a [`Ticket`], and the
//! runtime maps tickets to parked workees.
//!
//! # Pieces and who owns them
//!
//! | piece | module | owner |
//! |---|---|---|
//! | [`SwapDevice`]: an `O_DIRECT` fd with a validated USM header, and its *bad* map | [`device`] | shared (`Arc`) by the allocator and all engines |
//! | [`SwapSpace`]: every device's [`SlotMap`] (free/used bitfield, reference counts) behind a per-device lock, priorities | [`slots`] | shared (`Arc`, `Sync`): any thread allocates and frees |
//! | [`Engine`]: one io_uring, the buffers of its requests in flight, statistics | [`engine`] | one worker thread (`!Send`) |
//! | [`SwapIoThread`]: an `Engine` on its own thread; any thread queues I/O, a callback per completion | [`io_thread`] | shared (`Sync`) |
//! | [`Zram`]: a `/dev/zramN` configured as a RAM swap device, reset on drop | [`zram`] | whoever configured it |
//!
//! # A swap-out and a swap-in
//!
//! ```no_run
//! use usm_sync::Arc;
//! use usm_swap::{DeviceId, Engine, EngineConfig, PageBuf, SwapDevice, SwapSpace};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! usm_swap::create_swap_file("/var/lib/usm/swap0", 1 << 30)?;   // `usm mkswap`
//! let dev = Arc::new(SwapDevice::open(DeviceId(0), "/var/lib/usm/swap0")?);
//! let mut space = SwapSpace::new();
//! space.add(dev, 10)?;                                   // priority 10
//! let mut engine = Engine::new(&EngineConfig::default(), &space.devices())?; // per worker
//!
//! let entry = space.alloc()?;                            // NoSpace → other device / OOM
//! let mut page = PageBuf::page();
//! page.fill(0xAB);
//! let t_out = engine.write(entry, page)?;
//! engine.submit()?;
//! // ... the scheduler runs other uThreads; every round:
//! engine.enter_for_completions()?;
//! engine.wait(1)?;                                       // or keep scheduling
//! engine.reap(|c| {
//!     assert_eq!(c.ticket, t_out);
//!     // Err(e) if e.keeps_page(): keep the page in memory (c.buf has it)
//! });
//! let t_in = engine.read(entry, PageBuf::page())?;
//! engine.wait(1)?;
//! engine.reap(|c| match c.result {
//!     Ok(_) => { /* install c.buf with UFFDIO_COPY; keep `entry` while the page is clean */ }
//!     Err(e) if e.must_poison() => { /* UFFDIO_POISON: never a zeroed page */ }
//!     Err(_) => { /* retryable: queue again */ }
//! });
//! space.free(entry)?;                                    // page written to or freed
//! # let _ = t_in; Ok(()) }
//! ```
//!
//! # Many threads, one engine: [`SwapIoThread`]
//!
//! ```no_run
//! use std::sync::mpsc;
//! use usm_sync::Arc;
//! use usm_swap::{EngineConfig, PageBuf, SwapIoThread, SwapSpace};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let space: Arc<SwapSpace> = Arc::new(SwapSpace::new());
//! // Once, at start-up: the engine lives on the thread this spawns.
//! let io = Arc::new(SwapIoThread::spawn("usm-swap-io", &EngineConfig::default(), &space.devices())?);
//! // From any thread: allocate a slot, queue the write, wait however suits the caller
//! // (a condvar, a uThread unpark, a channel). The callback runs on the I/O thread.
//! let entry = space.alloc()?;
//! let (tx, rx) = mpsc::channel();
//! io.write(entry, PageBuf::page(), move |c| { let _ = tx.send(c); })
//!     .map_err(|(e, _buf)| e)?;
//! let done = rx.recv()?;
//! done.result?;
//! space.release(entry)?;                                  // any thread, `&SwapSpace`
//! # Ok(()) }
//! ```

pub mod device;
pub mod engine;
/// Swap entries and tickets: `usm_types::swap` (policies use them without this crate).
pub use usm_types::swap as entry;
pub mod error;
pub mod header;
pub mod io_thread;
pub mod slots;
pub mod stats;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
pub mod sys;
pub mod zram;

pub use device::{
    DeviceKind, DeviceOptions, FormatOptions, SwapDevice, create_sparse_swap_file,
    create_swap_file, format,
};
pub use engine::{Completion, CompletionMode, Engine, EngineConfig, IoOp, Rejected};
pub use entry::{DeviceId, SwapEntry, Ticket};
pub use error::{Result, SwapError};
pub use header::{PAGE_SIZE, SwapHeader};
pub use io_thread::{OnComplete, SwapIoThread};
pub use slots::{SlotMap, SlotRun, SwapSpace};
pub use stats::{EngineStats, LatencySummary, StatsSnapshot};
pub use sys::buf::PageBuf;
pub use sys::ring::{IoBuf, RawBuf, StagedPage};
pub use zram::Zram;
