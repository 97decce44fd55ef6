//! The runtime: one pinned worker per core, each running a LocalManager, plus the shared
//! injector and the shutdown protocol.
//!
//! # Where a spawned uThread goes
//! - From a uThread of this runtime: the current worker's spawn queue (no synchronisation);
//!   the worker admits it right after the spawning uThread suspends.
//! - From any other thread: the global `crossbeam-deque` injector, then one worker is woken
//!   (a parked one if any, else round-robin). Every worker drains a batch of the injector
//!   each round, so a busy worker picks the uThread up even if the woken one is slow.
//! - [`Handle::spawn_on`]: that worker's inbox (an injector of its own), then that worker is
//!   woken.
//!
//! # Shutdown ([`Runtime::shutdown`]), steps
//! 1. `Draining`: new spawns from outside are refused; workers keep running. Wait until
//!    every uThread finished, or the runtime is quiescent (every worker idle with no timers
//!    or driver work pending, all queues empty, no switch for 10 ms), or the grace period
//!    ends.
//! 2. `Cancelling`: each worker drops its uThreads parked with a generic park (their stacks
//!    unwind, their join handles report [`crate::JoinError::Cancelled`]). uThreads parked
//!    inside a signal handler (PFQ or preempted) are never dropped: shutdown keeps waiting,
//!    up to the grace period, for the runtime's fault path to resume them.
//! 3. `Exiting`: workers return. Any uThread still parked inside a signal handler is listed
//!    in [`ShutdownReport::stuck_in_handler`] and its stack is leaked, never unmapped. Ready
//!    uThreads left over (grace period exceeded) are dropped. The workers are joined and
//!    `/dev/cpu_dma_latency` is released.
//!
//! A uThread that never yields cannot be interrupted (there is no preemption): shutdown
//! then waits for it.

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use crossbeam_deque::Injector;
use usm_fibers::StackPool;
use usm_sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use crate::counters::CountersSnapshot;
use crate::driver::DriverFactory;
use crate::join::{JoinHandle, new_join};
use crate::manager::{ManagerConfig, ManagerShared, WorkerLocal, worker_main};
use crate::signal::{FaultKey, FaultedUThread};
use crate::sys::current;
use crate::task::{Entry, QUEUED, Task};
use crate::{SchedError, sync::lock};

/// Default longest spin of an idle eventfd-mode worker before it blocks (see
/// [`Builder::spin_before_park`]): 20 µs, a little more than a kernel wake-up on a loaded
/// machine, so short waits are caught spinning and long ones soon stop the spinning.
pub const DEFAULT_SPIN_BEFORE_PARK: Duration = Duration::from_micros(20);

/// How an idle worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WakerMode {
    /// Block in `ppoll` on an eventfd (plus driver fds); wakers write the eventfd.
    EventFd,
    /// Never block: spin re-checking the queues (Shenango-style); wakers only set bits.
    BusyPoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    Cancelling,
    Exiting,
}

/// State shared by all workers and handles of one runtime.
pub(crate) struct RuntimeShared {
    pub(crate) managers: Box<[ManagerShared]>,
    pub(crate) injector: Injector<Box<Entry>>,
    phase: AtomicU8,
    /// uThreads spawned and not finished (including ones still in queues).
    pub(crate) live: AtomicUsize,
    round_robin: AtomicUsize,
    stuck: Mutex<Vec<FaultedUThread>>,
    pub(crate) waker: WakerMode,
    pub(crate) cpu_dma_latency_held: bool,
}

impl RuntimeShared {
    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            2 => Phase::Cancelling,
            _ => Phase::Exiting,
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
        for manager in self.managers.iter() {
            manager.wake();
        }
    }

    /// True when the calling thread is worker `worker` of this runtime.
    fn on_worker(&self, worker: usize) -> bool {
        current::with_worker(|local| {
            local.index == worker && std::ptr::eq(&*local.rt as *const RuntimeShared, self)
        })
        .unwrap_or(false)
    }

    /// Sets the IDQ bit of (`owner`, `slot`) and wakes that worker unless it is us.
    pub(crate) fn make_ready(&self, owner: usize, slot: u32) {
        let Some(manager) = self.managers.get(owner) else {
            return;
        };
        manager.idq.set(slot as usize);
        if !self.on_worker(owner) {
            manager.wake();
        }
    }

    /// Wakes one worker for injector work: a parked one if any, else round-robin.
    pub(crate) fn wake_one(&self) {
        if self.waker == WakerMode::BusyPoll {
            return;
        }
        if let Some(worker) = crate::handoff::notify_for_injected(
            self.managers.len(),
            |i| &self.managers[i].park,
            &self.round_robin,
        ) {
            self.managers[worker].signal();
        }
    }

    /// PFQ → IDQ for `key`; `false` if that fault is not parked (any more). Any thread.
    ///
    /// The claim is the generation CAS (odd → even): exactly one resumer of a fault wins, and
    /// a stale key (an earlier fault of the slot, or of its earlier occupant) never matches.
    /// The handler sets the PFQ bit before it publishes the odd generation, so the winner
    /// always finds the bit set.
    pub(crate) fn resume_faulted(&self, key: FaultKey) -> bool {
        let Some(manager) = self.managers.get(key.worker) else {
            return false;
        };
        let Some(meta) = manager.slots.get(key.slot as usize) else {
            return false;
        };
        if key.generation & 1 == 0
            || meta
                .fault_seq
                .compare_exchange(
                    key.generation,
                    key.generation.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return false;
        }
        if !manager.pfq.clear(key.slot as usize) {
            // Ruled out by the order above; never leave a uThread parked for it.
            tracing::error!(?key, "resumed fault had no PFQ bit");
        }
        manager
            .counters
            .fault_resumes
            .fetch_add(1, Ordering::Relaxed);
        manager.idq.set(key.slot as usize);
        if !self.on_worker(key.worker) {
            manager.wake();
        }
        true
    }

    pub(crate) fn report_stuck(&self, faulted: FaultedUThread) {
        lock(&self.stuck).push(faulted);
    }

    fn counters(&self) -> Vec<CountersSnapshot> {
        self.managers
            .iter()
            .map(|m| m.counters.snapshot(m.index))
            .collect()
    }

    fn quiescent(&self) -> bool {
        self.injector.is_empty()
            && self.managers.iter().all(|m| {
                m.quiescent.load(Ordering::Acquire)
                    && m.idq.is_empty()
                    && m.inbox.is_empty()
                    && !m.running.load(Ordering::Acquire)
            })
    }

    fn total_switches(&self) -> u64 {
        self.managers
            .iter()
            .map(|m| m.counters.switches.load(Ordering::Relaxed))
            .sum()
    }

    fn in_handler(&self) -> usize {
        self.managers
            .iter()
            .map(|m| m.in_handler.load(Ordering::Acquire))
            .sum()
    }
}

/// Builds a [`Runtime`].
pub struct Builder {
    workers: usize,
    cores: Option<Vec<usize>>,
    pin: bool,
    waker: WakerMode,
    hold_cpu_dma_latency: bool,
    stack_size: usize,
    stack_cache: usize,
    prefill_stacks: usize,
    capacity: usize,
    round_budget: usize,
    injector_batch: usize,
    steal_batch: usize,
    spin_before_park: Duration,
    driver: Option<DriverFactory>,
    preemption: Option<Duration>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("workers", &self.workers)
            .field("waker", &self.waker)
            .field("hold_cpu_dma_latency", &self.hold_cpu_dma_latency)
            .field("stack_size", &self.stack_size)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// Defaults: one worker per available core, pinned; eventfd waker with an adaptive spin
    /// of up to [`DEFAULT_SPIN_BEFORE_PARK`] before blocking; no `/dev/cpu_dma_latency`;
    /// 256 KiB stacks; 4096 slots per worker to start with.
    pub fn new() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cores: None,
            pin: true,
            waker: WakerMode::EventFd,
            hold_cpu_dma_latency: false,
            stack_size: usm_fibers::DEFAULT_STACK_SIZE,
            stack_cache: 1024,
            prefill_stacks: 0,
            capacity: 4096,
            round_budget: 64,
            injector_batch: 32,
            steal_batch: 32,
            spin_before_park: DEFAULT_SPIN_BEFORE_PARK,
            driver: None,
            preemption: None,
        }
    }

    /// Number of workers (one LocalManager each).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Cores to pin worker `i` to (`cores[i % len]`); default: the cores `core_affinity`
    /// lists, in order — that is, the *calling thread's* CPU affinity mask: building a runtime
    /// from a thread pinned to one core pins every worker to that core unless `cores` is
    /// given.
    pub fn cores(mut self, cores: Vec<usize>) -> Self {
        self.cores = Some(cores);
        self
    }

    /// Pin workers to cores (default `true`).
    pub fn pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// How idle workers wait ([`WakerMode::EventFd`] by default).
    pub fn waker(mut self, waker: WakerMode) -> Self {
        self.waker = waker;
        self
    }

    /// Open `/dev/cpu_dma_latency`, write 0 and keep it open while the runtime lives (keeps
    /// idle cores out of deep C-states, which makes a cross-core eventfd wake-up several
    /// times faster; figures in `bench/results/sched.md`). Needs root; failure is a build
    /// error.
    pub fn hold_cpu_dma_latency(mut self, hold: bool) -> Self {
        self.hold_cpu_dma_latency = hold;
        self
    }

    /// Usable stack size of uThreads (at least [`usm_fibers::MIN_STACK_SIZE`]).
    pub fn stack_size(mut self, bytes: usize) -> Self {
        self.stack_size = bytes;
        self
    }

    /// Idle stacks each worker keeps for reuse, and how many it maps at start.
    pub fn stack_cache(mut self, keep: usize, prefill: usize) -> Self {
        self.stack_cache = keep;
        self.prefill_stacks = prefill;
        self
    }

    /// Initial slot capacity per worker (grows on demand up to 262 144).
    pub fn capacity(mut self, slots: usize) -> Self {
        self.capacity = slots;
        self
    }

    /// uThread runs per scheduling round between driver polls (default 64).
    pub fn round_budget(mut self, runs: usize) -> Self {
        self.round_budget = runs;
        self
    }

    /// Most uThreads stolen in one attempt (0 disables stealing).
    pub fn steal_batch(mut self, batch: usize) -> Self {
        self.steal_batch = batch;
        self
    }

    /// In eventfd mode, spin at most this long looking for work before blocking (default
    /// [`DEFAULT_SPIN_BEFORE_PARK`]; `Duration::ZERO` blocks at once). The budget adapts:
    /// it shrinks to nothing while spins keep running out without work (long idle periods)
    /// and grows back while wake-ups arrive within it, so an idle runtime does not burn its
    /// cores. A wake-up that finds the worker spinning costs a cache-line transfer; one
    /// that finds it blocked in `ppoll` costs a kernel wake-up, and on a loaded machine a
    /// wait for the CPU (figures in `bench/results/sched.md`).
    pub fn spin_before_park(mut self, spin: Duration) -> Self {
        self.spin_before_park = spin;
        self
    }

    /// Enables time-slice preemption with this quantum (e.g. 100 µs; at least 10 µs): a
    /// uThread that runs longer without switching is switched out from a signal handler
    /// when it is at a safe point (inside [`crate::preemptible`], in the program's own code),
    /// otherwise at its next runtime call. Uses `SIGURG`. See [`crate::preemptible`].
    pub fn preemption(mut self, quantum: Duration) -> Self {
        self.preemption = Some(quantum);
        self
    }

    /// Installs a per-worker [`crate::Driver`], created on each worker thread.
    pub fn driver(mut self, factory: DriverFactory) -> Self {
        self.driver = Some(factory);
        self
    }

    /// Starts the workers.
    pub fn build(self) -> Result<Runtime, SchedError> {
        if self.workers == 0 || self.workers > 64 {
            return Err(SchedError::InvalidConfig("workers must be 1..=64"));
        }
        if self.round_budget == 0 {
            return Err(SchedError::InvalidConfig("round_budget must be at least 1"));
        }
        // Validate the stack size before starting anything.
        StackPool::new(self.stack_size, 0)?;
        if let Some(quantum) = self.preemption {
            if quantum < Duration::from_micros(10) {
                return Err(SchedError::InvalidConfig("preemption quantum below 10 µs"));
            }
            crate::sys::preempt::install().map_err(SchedError::Signal)?;
        }
        let cpu_dma_latency = if self.hold_cpu_dma_latency {
            Some(hold_cpu_dma_latency()?)
        } else {
            None
        };
        let managers = (0..self.workers)
            .map(|i| ManagerShared::new(i, self.waker, self.capacity))
            .collect::<Result<Vec<_>, _>>()?;
        let rt = Arc::new(RuntimeShared {
            managers: managers.into_boxed_slice(),
            injector: Injector::new(),
            phase: AtomicU8::new(Phase::Running as u8),
            live: AtomicUsize::new(0),
            round_robin: AtomicUsize::new(0),
            stuck: Mutex::new(Vec::new()),
            waker: self.waker,
            cpu_dma_latency_held: cpu_dma_latency.is_some(),
        });
        let cores = match (&self.cores, self.pin) {
            (Some(cores), true) => cores.clone(),
            (None, true) => core_affinity::get_core_ids()
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.id)
                .collect(),
            (_, false) => Vec::new(),
        };
        if self.pin && cores.is_empty() {
            return Err(SchedError::Pin { worker: 0, core: 0 });
        }
        let config = ManagerConfig {
            round_budget: self.round_budget,
            injector_batch: self.injector_batch,
            steal_batch: self.steal_batch,
            spin_before_park: self.spin_before_park,
        };
        let mut runtime = Runtime {
            rt: rt.clone(),
            ticker: None,
            workers: Vec::new(),
            _cpu_dma_latency: cpu_dma_latency,
            report: None,
        };
        for worker in 0..self.workers {
            let core = cores.get(worker % cores.len().max(1)).copied();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let worker_rt = rt.clone();
            let (stack_size, cache, prefill) =
                (self.stack_size, self.stack_cache, self.prefill_stacks);
            let driver = self.driver.clone();
            let preemption = self.preemption;
            let handle = std::thread::Builder::new()
                .name(format!("usm-worker-{worker}"))
                .spawn(move || {
                    if let Some(core) = core
                        && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
                    {
                        let _ = ready_tx.send(Err(SchedError::Pin { worker, core }));
                        return;
                    }
                    let pool = StackPool::new(stack_size, cache)
                        .and_then(|mut pool| pool.prefill(prefill).map(|()| pool));
                    let pool = match pool {
                        Ok(pool) => pool,
                        Err(error) => {
                            let _ = ready_tx.send(Err(error.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let local = WorkerLocal {
                        index: worker,
                        rt: worker_rt,
                        current_task: std::cell::Cell::new(std::ptr::null()),
                        current_slot: std::cell::Cell::new(0),
                        spawns: Default::default(),
                        timers: Default::default(),
                        timer_seq: std::cell::Cell::new(0),
                        cancelling: std::cell::Cell::new(false),
                        preempt_pending: usm_sync::atomic::AtomicBool::new(false),
                        preemption: preemption.is_some(),
                    };
                    worker_main(local, pool, driver, config);
                })
                .map_err(|source| SchedError::SpawnWorker { worker, source })?;
            runtime.workers.push(handle);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(SchedError::InvalidConfig("worker exited during start")),
            }
        }
        if let Some(quantum) = self.preemption {
            let ticker_rt = rt.clone();
            runtime.ticker = Some(
                std::thread::Builder::new()
                    .name("usm-preempt".into())
                    .spawn(move || preemption_ticker(&ticker_rt, quantum))
                    .map_err(|source| SchedError::SpawnWorker {
                        worker: usize::MAX,
                        source,
                    })?,
            );
        }
        Ok(runtime)
    }
}

/// Signals a worker whose current uThread ran a whole quantum without switching.
fn preemption_ticker(rt: &RuntimeShared, quantum: Duration) {
    let tick = quantum / 2;
    let mut last: Vec<(u64, u32)> = vec![(u64::MAX, 0); rt.managers.len()];
    while rt.phase() != Phase::Exiting {
        std::thread::sleep(tick);
        for (manager, (seen, ticks)) in rt.managers.iter().zip(last.iter_mut()) {
            let switches = manager.counters.switches.load(Ordering::Relaxed);
            let running = manager.running.load(Ordering::Relaxed);
            if !running || switches != *seen {
                *seen = switches;
                *ticks = 0;
                continue;
            }
            *ticks += 1;
            if *ticks >= 2 {
                let thread = manager.thread.load(Ordering::Acquire);
                if thread != 0 {
                    crate::sys::preempt::kick(thread as libc::pthread_t);
                }
            }
        }
    }
}

fn hold_cpu_dma_latency() -> Result<File, SchedError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .map_err(SchedError::CpuDmaLatency)?;
    file.write_all(&0i32.to_ne_bytes())
        .map_err(SchedError::CpuDmaLatency)?;
    Ok(file)
}

/// What [`Runtime::shutdown`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShutdownReport {
    /// uThreads that ran to completion (including panicked ones), over the runtime's life.
    pub completed: u64,
    /// uThreads dropped unfinished (generic park at shutdown, or left over after the grace
    /// period).
    pub cancelled: u64,
    /// uThreads still parked inside a signal handler when the workers exited; their stacks
    /// were leaked, never unmapped.
    pub stuck_in_handler: Vec<FaultedUThread>,
    /// Final counters of every worker.
    pub counters: Vec<CountersSnapshot>,
}

/// A running set of workers. Dropping it shuts it down with a 1 s grace period.
pub struct Runtime {
    rt: Arc<RuntimeShared>,
    ticker: Option<std::thread::JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    _cpu_dma_latency: Option<File>,
    report: Option<ShutdownReport>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("workers", &self.workers.len())
            .field("waker", &self.rt.waker)
            .finish()
    }
}

/// A cheap, cloneable reference to a runtime, usable from any thread.
#[derive(Clone)]
pub struct Handle {
    pub(crate) rt: Arc<RuntimeShared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("workers", &self.rt.managers.len())
            .finish()
    }
}

impl Handle {
    /// The runtime of the uThread (or worker) calling this; `None` elsewhere.
    pub fn current() -> Option<Handle> {
        current::with_worker(|local| Handle {
            rt: local.rt.clone(),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.rt.managers.len()
    }

    /// The waker mode the runtime was built with.
    pub fn waker_mode(&self) -> WakerMode {
        self.rt.waker
    }

    /// True when the runtime holds `/dev/cpu_dma_latency` at 0.
    pub fn holds_cpu_dma_latency(&self) -> bool {
        self.rt.cpu_dma_latency_held
    }

    /// Spawns a uThread (see the module docs for where it goes).
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<T>, SchedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.spawn_inner(f, false, None)
    }

    /// Spawns a uThread on worker `worker` that is never migrated to another worker.
    pub fn spawn_on<F, T>(&self, worker: usize, f: F) -> Result<JoinHandle<T>, SchedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if worker >= self.rt.managers.len() {
            return Err(SchedError::InvalidConfig("spawn_on: no such worker"));
        }
        self.spawn_inner(f, true, Some(worker))
    }

    fn spawn_inner<F, T>(
        &self,
        f: F,
        pinned: bool,
        worker: Option<usize>,
    ) -> Result<JoinHandle<T>, SchedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        crate::preempt_point();
        let _no_preempt = crate::NoPreempt::enter();
        let rt = &self.rt;
        if rt.phase() != Phase::Running && current::with_worker(|_| ()).is_none() {
            return Err(SchedError::ShuttingDown);
        }
        let (body, handle) = new_join(f);
        let task = Arc::new(Task {
            state: crate::task_state::TaskState::new(QUEUED),
            owner: AtomicUsize::new(0),
            slot: usm_sync::atomic::AtomicU32::new(0),
            in_handler: usm_sync::atomic::AtomicBool::new(false),
            pinned,
            preemptible: usm_sync::atomic::AtomicU32::new(0),
            no_preempt: usm_sync::atomic::AtomicU32::new(0),
            rt: rt.clone(),
        });
        let entry = Box::new(Entry {
            task,
            fiber: None,
            body: Some(body),
        });
        rt.live.fetch_add(1, Ordering::AcqRel);
        match worker {
            Some(worker) => {
                if rt.on_worker(worker) {
                    current::with_worker(|local| local.spawns.borrow_mut().push(entry));
                } else {
                    rt.managers[worker].inbox.push(entry);
                    rt.managers[worker].wake();
                }
            }
            None => {
                let local_entry = current::with_worker(|local| {
                    std::ptr::eq(&*local.rt as *const RuntimeShared, &**rt as *const _)
                });
                if local_entry == Some(true) {
                    current::with_worker(|local| local.spawns.borrow_mut().push(entry));
                } else {
                    rt.injector.push(entry);
                    rt.wake_one();
                }
            }
        }
        Ok(handle)
    }

    /// The uThreads of worker `worker` parked on a fault (PFQ), with their payloads.
    pub fn faulted(&self, worker: usize) -> Vec<FaultedUThread> {
        let mut out = Vec::new();
        if let Some(manager) = self.rt.managers.get(worker) {
            manager.faulted(&mut out);
        }
        out
    }

    /// Moves the faulted uThread `key` from PFQ to IDQ (it resumes on its own worker and
    /// returns from the signal handler). Any thread. `false` if that fault is not parked
    /// (any more): already resumed, or a key of an earlier fault of the slot or of its
    /// earlier occupant (keys carry the fault's generation, see [`crate::signal`]).
    pub fn resume_faulted(&self, key: FaultKey) -> bool {
        self.rt.resume_faulted(key)
    }

    /// Counters of every worker.
    pub fn counters(&self) -> Vec<CountersSnapshot> {
        self.rt.counters()
    }

    /// uThreads spawned and not finished.
    pub fn live(&self) -> usize {
        self.rt.live.load(Ordering::Acquire)
    }
}

impl Runtime {
    /// A runtime with the default [`Builder`] settings.
    pub fn new() -> Result<Self, SchedError> {
        Builder::new().build()
    }

    /// A [`Builder`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// A handle for spawning and fault control from any thread.
    pub fn handle(&self) -> Handle {
        Handle {
            rt: self.rt.clone(),
        }
    }

    /// [`Handle::spawn`].
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<T>, SchedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.handle().spawn(f)
    }

    /// [`Handle::spawn_on`].
    pub fn spawn_on<F, T>(&self, worker: usize, f: F) -> Result<JoinHandle<T>, SchedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.handle().spawn_on(worker, f)
    }

    /// Runs `f` on a uThread and waits for it from this (non-uThread) thread.
    pub fn block_on<F, T>(&self, f: F) -> Result<T, crate::JoinError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(f) {
            Ok(handle) => handle.join(),
            Err(_) => Err(crate::JoinError::Cancelled),
        }
    }

    /// [`Handle::counters`].
    pub fn counters(&self) -> Vec<CountersSnapshot> {
        self.rt.counters()
    }

    /// Shuts down (see the module docs for the steps), waiting at most about `grace` in
    /// each of the waiting steps.
    pub fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        self.shutdown_inner(grace)
    }

    fn shutdown_inner(&mut self, grace: Duration) -> ShutdownReport {
        if let Some(report) = &self.report {
            return report.clone();
        }
        let rt = self.rt.clone();
        // 1. Drain.
        rt.set_phase(Phase::Draining);
        let deadline = Instant::now() + grace;
        while rt.live.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            if rt.quiescent() {
                let switches = rt.total_switches();
                std::thread::sleep(Duration::from_millis(10));
                if rt.quiescent() && rt.total_switches() == switches {
                    break;
                }
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // 2. Cancel generic parks; wait for faulted uThreads to be resumed and finish.
        rt.set_phase(Phase::Cancelling);
        let deadline = Instant::now() + grace;
        loop {
            std::thread::sleep(Duration::from_millis(2));
            if rt.live.load(Ordering::Acquire) == 0 || Instant::now() >= deadline {
                break;
            }
            if rt.in_handler() == 0 && rt.quiescent() {
                // Nothing left that anyone could resume: leftovers are dropped at exit.
                std::thread::sleep(Duration::from_millis(10));
                if rt.in_handler() == 0 && rt.quiescent() {
                    break;
                }
            }
        }
        // 3. Exit.
        rt.set_phase(Phase::Exiting);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
        let counters = rt.counters();
        let report = ShutdownReport {
            completed: counters.iter().map(|c| c.completed).sum(),
            cancelled: counters.iter().map(|c| c.cancelled).sum(),
            stuck_in_handler: std::mem::take(&mut *lock(&rt.stuck)),
            counters,
        };
        self.report = Some(report.clone());
        report
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.report.is_none() {
            self.shutdown_inner(Duration::from_secs(1));
        }
    }
}
