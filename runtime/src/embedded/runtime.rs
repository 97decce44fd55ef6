//! [`Builder`] and [`Runtime`]: the embedded runtime.

use std::path::PathBuf;
use std::time::Duration;
use usm_sync::Arc;
use usm_sync::atomic::AtomicU32;

use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_kmod::pool::{FramePool, LockMode, PoolConfig, ZeroerHandle};
use usm_kmod::{Features, OpenFlags, RawUserfaultfd, Userfaultfd};
use usm_localmanager::{JoinError, JoinHandle, ShutdownReport, WakerMode};
use usm_policies::{Registry, Watermarks};
use usm_swap::{DeviceId, SwapDevice};

use crate::embedded::driver::FaultDriver;
use crate::embedded::{EmbeddedError, Region, RuntimeStats};
use crate::mm::{InstallMode, MmConfig, MmCore, WorkerMm};
use crate::sys::install::{SameMmInstaller, TrackingInstaller};
use crate::sys::sigbus;

/// State shared by the runtime, its drivers and its regions.
pub(crate) struct Shared {
    pub(crate) core: Arc<MmCore>,
    pub(crate) uffd: Arc<Userfaultfd>,
    pub(crate) pid: u32,
    pub(crate) runtime_id: u32,
    pub(crate) external_fd: EventFd,
    pub(crate) worker_fds: Vec<Arc<EventFd>>,
    /// Set before a worker's eventfd is written, so its driver reads the fd only then.
    pub(crate) woken: Arc<Vec<usm_sync::atomic::AtomicBool>>,
    pub(crate) next_region: AtomicU32,
    pub(crate) default_alloc: String,
    /// How regions are registered (`MISSING`, plus `WP` when writes are tracked).
    pub(crate) register_mode: usm_kmod::RegisterMode,
    /// What a worker does while a uThread's page is read back.
    pub(crate) swap_in: SwapInMode,
    /// One network io_uring per worker (`crate::embedded::net`), reaped by its driver.
    pub(crate) net: Vec<crate::sys::net::NetRing>,
}

/// What a worker does while the page a uThread faulted on is read back from swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SwapInMode {
    /// The uThread stays parked in PFQ and the worker runs other uThreads while io_uring
    /// reads the page (USM's mode; the default).
    #[default]
    Yield,
    /// The worker waits for the page itself, running nothing else (blocked in
    /// `io_uring_enter`), as a kernel swap fault blocks a Shenango/Junction worker: the
    /// kernel-like baseline inside USM, benchmark mode (b).
    Sync,
}

impl Drop for Shared {
    fn drop(&mut self) {
        sigbus::release_runtime(self.runtime_id);
    }
}

/// Where a swap device comes from.
#[derive(Debug, Clone)]
enum SwapSource {
    /// Open this USM-formatted path.
    Path(PathBuf),
    /// Create (`usm mkswap`) a file of this many bytes at the path, then open it.
    Create(PathBuf, u64),
}

/// Builds a [`Runtime`].
#[derive(Debug, Clone)]
pub struct Builder {
    workers: usize,
    pool_frames: usize,
    swap: Vec<SwapSource>,
    alloc: String,
    evict: String,
    oom: String,
    waker: WakerMode,
    watermarks: Option<Watermarks>,
    pin: bool,
    stack_size: Option<usize>,
    clean_eviction: bool,
    swap_in: SwapInMode,
    round_budget: Option<usize>,
    access_sampling: Option<bool>,
    install: InstallMode,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// Defaults: 2 workers (not pinned), a pool of 16 MiB (4096 frames), no swap,
    /// `first-fit` / `two-list` / `fail` policies, eventfd waker, watermarks from the pool
    /// size ([`MmConfig::for_pool`]).
    pub fn new() -> Builder {
        Builder {
            workers: 2,
            pool_frames: 4096,
            swap: Vec::new(),
            alloc: "first-fit".into(),
            evict: "two-list".into(),
            oom: "fail".into(),
            waker: WakerMode::EventFd,
            watermarks: None,
            pin: false,
            stack_size: None,
            clean_eviction: true,
            swap_in: SwapInMode::Yield,
            round_budget: None,
            access_sampling: None,
            install: InstallMode::default(),
        }
    }

    /// Number of workers.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Pool size in 4 KiB frames.
    pub fn pool_frames(mut self, frames: usize) -> Self {
        self.pool_frames = frames;
        self
    }

    /// Adds a USM swap device (formatted with `usm mkswap`).
    pub fn swap_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.swap.push(SwapSource::Path(path.into()));
        self
    }

    /// Creates a swap file of `bytes` at `path` (must not exist) and uses it. Put it on a
    /// disk (`O_DIRECT`), not tmpfs. The file is written out (zeros) before it is
    /// formatted: a `fallocate`d file has unwritten extents, and every first `O_DIRECT`
    /// write into one costs an ext4 extent conversion at completion — in a swap storm,
    /// where most slots are written for the first time, that throttled write-back (and
    /// with it every swap-in waiting for a frame) several times over.
    pub fn create_swap_file(mut self, path: impl Into<PathBuf>, bytes: u64) -> Self {
        self.swap.push(SwapSource::Create(path.into(), bytes));
        self
    }

    /// Default allocation policy of regions (registry spec, e.g. `"fhp:64K"`).
    pub fn alloc_policy(mut self, spec: &str) -> Self {
        self.alloc = spec.into();
        self
    }

    /// Eviction policy spec.
    pub fn evict_policy(mut self, spec: &str) -> Self {
        self.evict = spec.into();
        self
    }

    /// OOM policy spec.
    pub fn oom_policy(mut self, spec: &str) -> Self {
        self.oom = spec.into();
        self
    }

    /// How idle workers wait.
    pub fn waker(mut self, waker: WakerMode) -> Self {
        self.waker = waker;
        self
    }

    /// Free-frame watermarks (frames).
    pub fn watermarks(mut self, low: usize, high: usize) -> Self {
        self.watermarks = Some(Watermarks { low, high });
        self
    }

    /// Pin workers to cores.
    pub fn pin_workers(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// Evict pages swapped in and not written since without I/O (default on when the
    /// kernel offers `UFFD_FEATURE_WP_ASYNC`; regions are then registered `MISSING|WP`).
    pub fn clean_eviction(mut self, on: bool) -> Self {
        self.clean_eviction = on;
        self
    }

    /// Re-fault access sampling for the eviction policy (default on): when the policy's
    /// hand first reaches a resident page, the page is moved out to its own pool slot (no
    /// I/O) and spared; an access faults, moves it back at once and reports it accessed;
    /// a page still out when the hand comes back is evicted (already out: no MOVE). Off:
    /// the policy sees no access information (`clock` and `two-list` behave as FIFO).
    pub fn access_sampling(mut self, on: bool) -> Self {
        self.access_sampling = Some(on);
        self
    }

    /// How frames are installed into regions ([`InstallMode`]; see there for the
    /// measured trade-off and the default).
    pub fn install_mode(mut self, mode: InstallMode) -> Self {
        self.install = mode;
        self
    }

    /// What a worker does during a uThread's swap-in ([`SwapInMode::Yield`] by default).
    pub fn swap_in_mode(mut self, mode: SwapInMode) -> Self {
        self.swap_in = mode;
        self
    }

    /// uThread runs per scheduling round between two regular driver polls (the
    /// scheduler's default, 64, when unset). The driver is also polled within a round
    /// right after a fault and while swap I/O is in flight, at most every 100 µs (a
    /// constant of `usm_localmanager`, not a knob).
    pub fn round_budget(mut self, runs: usize) -> Self {
        self.round_budget = Some(runs);
        self
    }

    /// uThread stack size.
    pub fn stack_size(mut self, bytes: usize) -> Self {
        self.stack_size = Some(bytes);
        self
    }

    /// Opens the userfaultfd (SIGBUS mode), builds the pool, the swap devices and the
    /// memory core, installs the SIGBUS handler and starts the workers.
    pub fn build(self) -> Result<Runtime, EmbeddedError> {
        self.build_with_registry(Registry::with_builtins())
    }

    /// [`Builder::build`] with a registry holding custom policies.
    pub fn build_with_registry(self, mut registry: Registry) -> Result<Runtime, EmbeddedError> {
        if self.workers == 0 || self.workers > 64 {
            return Err(EmbeddedError::Config("workers must be 1..=64"));
        }
        registry.set_default(&self.alloc)?;
        let raw = RawUserfaultfd::open(OpenFlags {
            nonblock: true,
            cloexec: true,
            user_mode_only: true,
        })?;
        let requested = if self.clean_eviction {
            Features::WP_ASYNC
        } else {
            Features::empty()
        };
        let uffd = Arc::new(raw.negotiate(
            requested,
            Features::SIGBUS | Features::MOVE | Features::POISON,
        )?);
        let tracking = self.clean_eviction && uffd.features().contains(Features::WP_ASYNC);
        let pool_config = PoolConfig {
            frames: self.pool_frames,
            lock: LockMode::Unlocked,
        };
        // COPY installs never need a first-touch frame's slot: lazy slots, no population.
        let pool = match self.install {
            InstallMode::Copy => FramePool::new_lazy(pool_config, uffd.clone())?,
            InstallMode::Move => FramePool::new(pool_config, Some(uffd.clone()))?,
        };
        let mut devices = Vec::new();
        for (i, src) in self.swap.iter().enumerate() {
            let path = match src {
                SwapSource::Path(p) => p.clone(),
                SwapSource::Create(p, bytes) => {
                    usm_swap::create_swap_file(p, *bytes)?;
                    p.clone()
                }
            };
            devices.push(Arc::new(SwapDevice::open(DeviceId(i as u8), &path)?));
        }
        let mut config = MmConfig::for_pool(self.pool_frames);
        if let Some(wm) = self.watermarks {
            config.watermarks = wm;
        }
        config.evict = self.evict.clone();
        config.clean_eviction = tracking;
        if let Some(n) = self.access_sampling {
            config.access_sampling = n;
        }
        config.oom = self.oom.clone();
        // Surface engine set-up errors here rather than on a worker thread.
        drop(usm_swap::Engine::new(&config.engine, &devices)?);
        let core = MmCore::new(
            pool.clone(),
            if tracking {
                Box::new(
                    TrackingInstaller::new(uffd.clone())
                        .map_err(|e| {
                            EmbeddedError::Kmod(usm_kmod::Error::Sys {
                                what: "open /proc/self/pagemap",
                                source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                            })
                        })?
                        .with_mode(self.install),
                ) as Box<dyn crate::mm::Installer>
            } else {
                Box::new(SameMmInstaller::new(self.install))
            },
            Arc::new(registry),
            devices,
            config,
            self.workers,
        )?;
        let pid = std::process::id();
        core.add_space(pid);
        sigbus::install().map_err(EmbeddedError::Signal)?;
        let efd =
            || EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC);
        let external_fd = efd().map_err(EmbeddedError::Signal)?;
        let worker_fds = (0..self.workers)
            .map(|_| efd().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(EmbeddedError::Signal)?;
        let runtime_id = sigbus::claim_runtime(std::os::fd::AsRawFd::as_raw_fd(&external_fd))
            .ok_or(EmbeddedError::Config(
                "too many embedded runtimes in this process",
            ))?;
        let woken: Arc<Vec<usm_sync::atomic::AtomicBool>> = Arc::new(
            (0..self.workers)
                .map(|_| usm_sync::atomic::AtomicBool::new(false))
                .collect(),
        );
        for (i, fd) in worker_fds.iter().enumerate() {
            let (fd, woken) = (fd.clone(), woken.clone());
            core.set_waker(
                i,
                Arc::new(move || {
                    // Write first, then flag: the driver reads the fd after taking the
                    // flag, so no write is left unread (a readable fd would spin it).
                    let _ = fd.write(1);
                    woken[i].store(true, usm_sync::atomic::Ordering::Release);
                }),
            )?;
        }
        let shared = Arc::new(Shared {
            core: core.clone(),
            uffd,
            pid,
            runtime_id,
            external_fd,
            worker_fds,
            woken,
            next_region: AtomicU32::new(1),
            default_alloc: self.alloc.clone(),
            register_mode: if tracking {
                usm_kmod::RegisterMode::MISSING | usm_kmod::RegisterMode::WP
            } else {
                usm_kmod::RegisterMode::MISSING
            },
            swap_in: self.swap_in,
            net: crate::embedded::net::rings(self.workers)?,
        });
        let zeroer = pool.spawn_zeroer(64);
        let factory_shared = shared.clone();
        let factory: usm_localmanager::DriverFactory = Arc::new(move |worker| match WorkerMm::new(
            factory_shared.core.clone(),
            worker,
        ) {
            Ok(wm) => Box::new(FaultDriver::new(wm, factory_shared.clone()))
                as Box<dyn usm_localmanager::Driver>,
            Err(e) => {
                tracing::error!(error = %e, worker, "worker memory manager failed to start");
                Box::new(NoDriver)
            }
        });
        let mut sched = usm_localmanager::Runtime::builder()
            .workers(self.workers)
            .pin(self.pin)
            .waker(self.waker)
            .driver(factory);
        if let Some(s) = self.stack_size {
            sched = sched.stack_size(s);
        }
        if let Some(r) = self.round_budget {
            sched = sched.round_budget(r);
        }
        let sched = sched.build()?;
        Ok(Runtime {
            shared,
            sched: Some(sched),
            _zeroer: Some(zeroer),
        })
    }
}

struct NoDriver;

impl usm_localmanager::Driver for NoDriver {
    fn poll(&mut self, _cx: &mut usm_localmanager::DriverContext<'_>) -> usize {
        0
    }
}

/// The embedded runtime: workers running uThreads, a frame pool, swap, and the SIGBUS
/// fault path for its [`Region`]s. See the [`crate::embedded`] module docs.
pub struct Runtime {
    shared: Arc<Shared>,
    sched: Option<usm_localmanager::Runtime>,
    _zeroer: Option<ZeroerHandle>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("pid", &self.shared.pid)
            .field("frames", &self.shared.core.pool().len())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A [`Builder`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    fn sched(&self) -> Result<&usm_localmanager::Runtime, EmbeddedError> {
        self.sched.as_ref().ok_or(EmbeddedError::ShutDown)
    }

    /// Runs `f` on a uThread and waits for its result from this thread.
    pub fn block_on<F, T>(&self, f: F) -> Result<T, JoinError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.sched() {
            Ok(s) => s.block_on(f),
            Err(_) => Err(JoinError::Cancelled),
        }
    }

    /// Spawns a uThread.
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<T>, EmbeddedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        Ok(self.sched()?.spawn(f)?)
    }

    /// Spawns a uThread on worker `worker`, never migrated.
    pub fn spawn_on<F, T>(&self, worker: usize, f: F) -> Result<JoinHandle<T>, EmbeddedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        Ok(self.sched()?.spawn_on(worker, f)?)
    }

    /// A scheduler handle (spawn from any thread).
    pub fn handle(&self) -> Result<usm_localmanager::Handle, EmbeddedError> {
        Ok(self.sched()?.handle())
    }

    /// A managed region of `bytes` (rounded up to pages) with the default allocation
    /// policy.
    pub fn region(&self, bytes: usize) -> Result<Region, EmbeddedError> {
        Region::new(
            self.shared.clone(),
            bytes,
            &self.shared.default_alloc.clone(),
        )
    }

    /// A managed region served by the allocation policy `alloc_spec`.
    pub fn region_with_policy(
        &self,
        bytes: usize,
        alloc_spec: &str,
    ) -> Result<Region, EmbeddedError> {
        Region::new(self.shared.clone(), bytes, alloc_spec)
    }

    /// Network I/O for this runtime's uThreads ([`crate::embedded::Net`]).
    pub fn net(&self) -> crate::embedded::Net {
        crate::embedded::Net::new(self.shared.clone())
    }

    /// The memory-manager core, for this crate's white-box tests only: embedders get what
    /// they need through the narrower methods below and [`Runtime::stats`].
    #[cfg(test)]
    pub(crate) fn mm(&self) -> &Arc<MmCore> {
        &self.shared.core
    }

    /// Frames in the pool (the runtime's memory budget, in 4 KiB pages).
    pub fn pool_frames(&self) -> usize {
        self.shared.core.pool().len()
    }

    /// Where the frame pool is mapped in this process, to measure its resident memory
    /// (`/proc/self/smaps`); the frames themselves are reached only through regions.
    pub fn pool_mapping(&self) -> std::ops::Range<u64> {
        let pool = self.shared.core.pool();
        let start = pool.base();
        start..start + (pool.len() * usm_kmod::PAGE_SIZE) as u64
    }

    /// Populates the whole pool now, so no fault waits for a lazily populated chunk (the
    /// benchmarks' "eager" mode). A COPY-mode pool has nothing to populate.
    pub fn populate_pool(&self) -> Result<(), EmbeddedError> {
        Ok(self.shared.core.pool().populate_all()?)
    }

    /// Checks frame conservation (every frame in exactly one state, the free ones in the
    /// arenas, the zeroing ones queued) and returns the census; call it quiet (after
    /// [`Runtime::quiesce`]), not while uThreads fault.
    pub fn check_conservation(&self) -> Result<usm_kmod::pool::Census, EmbeddedError> {
        Ok(self.shared.core.pool().check_conservation()?)
    }

    /// Whether clean pages leave memory without a write-back (their swap copy is still
    /// valid): the kernel offers `UFFD_FEATURE_WP_ASYNC` and the runtime uses it.
    pub fn clean_eviction(&self) -> bool {
        self.shared.core.config().clean_eviction
    }

    /// A snapshot of the runtime's statistics.
    pub fn stats(&self) -> RuntimeStats {
        let core = &self.shared.core;
        let census = core.pool().census();
        let (slot_drop_batches, slots_dropped) = core.pool().drop_stats();
        RuntimeStats {
            mm: core.stats_snapshot(),
            pool: census,
            slot_drop_batches,
            slots_dropped,
            slots_pending_drop: core.pool().pending_drops(),
            swap_slots_used: core.swap_slots_used(),
            io_in_flight: core.io_in_flight(),
            space: core.space_counters(self.shared.pid).unwrap_or_default(),
            sched: self
                .sched
                .as_ref()
                .map(|s| s.counters())
                .unwrap_or_default(),
        }
    }

    /// Waits (up to `timeout`) until no swap I/O is in flight, background reclaim has
    /// nothing left it can do (`MmCore::reclaim_pending`) and the zeroing queue is empty.
    /// `true` when it got there.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let core = &self.shared.core;
            // The zeroing queue can be empty while the zeroer still cleans what it took
            // from it (those frames are still Zeroing): wait for the descriptors too.
            if core.io_in_flight() == 0
                && !core.reclaim_pending()
                && core.pool().zeroing_len() == 0
                && core.pool().census().zeroing == 0
            {
                // Copied slots left below a full drop batch: memory back to the pool's size.
                if let Err(e) = core.pool().flush_drops() {
                    tracing::warn!(error = %e, "dropping copied slots failed");
                }
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            for (fd, w) in self.shared.worker_fds.iter().zip(self.shared.woken.iter()) {
                let _ = fd.write(1);
                w.store(true, usm_sync::atomic::Ordering::Release);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Shuts the scheduler down (see `usm_localmanager::Runtime::shutdown`): uThreads
    /// parked on a fault are served to completion, never dropped.
    pub fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        self.shutdown_inner(grace)
    }

    fn shutdown_inner(&mut self, grace: Duration) -> ShutdownReport {
        match self.sched.take() {
            Some(s) => s.shutdown(grace),
            None => ShutdownReport {
                completed: 0,
                cancelled: 0,
                stuck_in_handler: Vec::new(),
                counters: Vec::new(),
            },
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.sched.is_some() {
            self.shutdown_inner(Duration::from_secs(5));
        }
    }
}
