//! [`MmCore`] (shared by all workers) and [`WorkerMm`] (one per worker). See the [crate]
//! docs for the fault protocol; this module holds the shared types, and one file per
//! concern holds the code:
//!
//! | file | what it holds |
//! |---|---|
//! | `core.rs` | [`MmConfig`], [`MmCore`] (its state, the lock, wakers, queries), [`WorkerMm`] (its engine and lArena), [`RangeRelease`], `Op` |
//! | `core/ranges.rs` | the host's calls on ranges: `add_space`, `add_range`, `remove_range` (`release_page`), `pin`/`unpin`, `hint`, `install_frames` |
//! | `core/process.rs` | spaces of other processes (daemon): `add_process`, `manage`, `discard`, `remap`, `fork_space`, `remove_space`, `notify_alloc` |
//! | `core/fault.rs` | the fault path: [`WorkerMm::handle_fault`], `serve` (the allocation policy, guarded), `apply_map`, `install_fresh`; [`FaultResult`], [`FaultClock`] |
//! | `core/swap_in.rs` | bringing pages back: `swap_cache_hit`, `refault_sampled`, swap-in reads (`start_swap_in`, `queue_read`, `prefetch`), `keep_or_free_copy` |
//! | `core/eviction.rs` | `balance`, `run_eviction` (victim choice through `SamplingView`), `prepare_victim`, `stage_batch`, `evict_clean`, `queue_writeback`, `let_go`, `replace_evict`; `evict_now` |
//! | `core/completion.rs` | [`WorkerMm::poll`] (reaping the engine), `complete` (write-back and swap-in done), [`WorkerMm::finish_stage`] with `leave` / `stay` (asynchronous stages), [`WorkerMm::wait_io`] |
//! | `core/fork_wait.rs` | fork children waiting for pages their parent was evicting at `fork`: `record`, `blocks`, `stage_done` |
//! | `core/oom.rs` | `oom_ladder` (after an allocation policy's `Oom`; kill actions), `fail` (poison the page, log why), `NoOom` |
//! | `core/cx.rs` | the policy host's views: `WorkerCx` (the `Cx` and `EvictCx` of one policy call; `restore_taken`, `return_frame`, `range_key`, `still_owned`) and `MemView` |
//!
//! # Locking
//! One lock, `MmCore::state` (a `Mutex<MmState>`), guards everything a policy decides on:
//! - [`MemState`]: every [`Space`] (page states, ranges and their generations, pins, hints,
//!   clean copies, counters, the space's installer and allocation policy), the swap slot
//!   map ([`SwapSpace`]), orphan staging frames, the counts of write-backs and stages in
//!   flight, `swap_full`, and the mask of workers waiting for memory;
//! - the eviction and OOM policies (`MmState::{evict, oom}`).
//!
//! Outside it, with their own synchronisation: the [`FramePool`] (frame descriptors,
//! shared arena, zeroing queue), the statistics and `generation` / `io_in_flight` /
//! `eviction` (atomics), and the wakers (their own mutex, always taken *after* the state
//! lock, never before). Each worker's `WorkerIo` (lArena, io_uring engine, operations in
//! flight) belongs to its [`WorkerMm`] and needs no lock.
//!
//! **Who holds it.** A `pub` method of [`MmCore`] or [`WorkerMm`] either takes the lock
//! itself ([`MmCore::lock`], which returns a `Locked` guard) and releases it before it
//! returns, or touches nothing the lock guards (accessors, statistics, `set_waker`,
//! `set_eviction`, `io_in_flight`, `shared_free_frames`, `wait_io`, `drain_arena`). None
//! may be called with the lock held: it is not reentrant, that would deadlock — so no
//! policy, installer or [`Waker`] calls back into the core. Every function that needs the
//! lock held says so in its type: it takes the locked state — `&mut MmState` / a `Locked`
//! guard, `&MemState` / `&mut MemState` (only reachable through the guard) — or is a
//! method of `WorkerCx` / `MemView` / `SamplingView`, which borrow it. There is no other
//! way to reach page states, so no `_locked` suffix is needed: a function with none of
//! these in its signature does not touch them.
//!
//! **What runs under it.**
//! - Every policy call (allocation, eviction, OOM, hints, notifications; each inside
//!   `usm_policies::guarded`).
//! - Every [`Installer`] call (`install`, `stage` / `stage_many`, `unstage`, `poison`,
//!   `copy_staged`, `reclaim`, `track_clean` / `is_written`, `kill`): installers are
//!   written to be called so (see [`crate::installer`]) and never wait for the address
//!   space they manage — the daemon's `stage_many` only queues to the tagger's agent and
//!   answers `Pending`.
//! - Queueing swap I/O on the worker's engine. With the default
//!   `EngineConfig::submit_batch` of 1 that *submits* each request at once (an
//!   `io_uring_enter`), and a lone request on a synchronous device (zram, with
//!   `inline_sync`) is performed right there (`pread`/`pwrite` in the calling thread); see
//!   `usm_swap::Engine`. Eviction's batch is also submitted under the lock
//!   (`run_eviction`).
//! - The 4 KiB slot copies and hashes of swap-cache hits, sampled re-faults, swap-in
//!   completions and clean eviction.
//! - Waking the workers whose page was installed, and those waiting for memory when a
//!   write-back completes (so a [`Waker`] only signals: eventfd write, flag).
//!
//! **What runs outside it.** The `submit` after a fault, a poll, a finished stage or a
//! notification, for whatever is still queued (after the guard is dropped); reaping
//! completions (`enter_for_completions` and `reap` first, then one lock for the whole
//! batch); clearing the engine's eventfd; blocking in [`WorkerMm::wait_io`]; the work of
//! an asynchronous stage in the other process (the page is `Leaving`, the lock released
//! until [`WorkerMm::finish_stage`]); waking the workers that wait for memory after a
//! finished stage.

use std::collections::{BTreeMap, HashMap, HashSet};
use usm_sync::Arc;

use usm_kmod::pool::FramePool;
use usm_kmod::pool::arena::LocalArena;
use usm_kmod::{FrameNo, PAGE_SIZE};
use usm_policies::{EvictPolicy, OomPolicy, Registry, RunMode, Watermarks, page_floor};
use usm_swap::{
    Completion, Engine, EngineConfig, SwapDevice, SwapEntry, SwapError, SwapSpace, Ticket,
};
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::MmError;
use crate::installer::Installer;
use crate::space::{PageState, RangeKey, Space};
use crate::stats::{MmStats, StatsSnapshot};

mod completion;
mod cx;
mod eviction;
mod fault;
mod fork_wait;
mod oom;
mod process;
mod ranges;
mod swap_in;

use self::cx::{MemView, WorkerCx};
pub use self::fault::{FaultClock, FaultResult};

/// The core lock's guard ([`MmCore::lock`]): whoever holds one holds the lock.
type Locked<'a> = usm_sync::MutexGuard<'a, MmState>;

const PAGE: u64 = PAGE_SIZE as u64;
/// Tickets of requests the engine refused at once (their completion is synthesised).
const SYNTHETIC_TICKET: u64 = 1 << 62;

/// Wakes one worker (writes its eventfd, unparks it, ...).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Configuration of an [`MmCore`].
#[derive(Debug, Clone)]
pub struct MmConfig {
    /// Free-frame watermarks (whole pool): below `low` eviction starts, up to `high`.
    pub watermarks: Watermarks,
    /// Eviction policy spec (registry name).
    pub evict: String,
    /// OOM policy spec.
    pub oom: String,
    /// Per-worker io_uring engine.
    pub engine: EngineConfig,
    /// Daemon or embedded (told to the OOM policy).
    pub mode: RunMode,
    /// Most victims staged per eviction round (bounded by the engine's free depth).
    pub eviction_batch: usize,
    /// Evict swapped-in pages that were not written since without I/O (needs an
    /// installer that tracks writes, see [`Installer::track_clean`]).
    pub clean_eviction: bool,
    /// Re-fault access sampling for the eviction policy (see the module docs): the first
    /// time the policy asks about a resident page, it is moved out to its own slot and
    /// reported accessed; asked again while still out, it reports not accessed. Off: the
    /// policy gets no access information (`clock` and `two-list` degrade to FIFO).
    pub access_sampling: bool,
    /// Priority of each swap device, in the order given to [`MmCore::new`] (missing: 0);
    /// higher first, as the kernel's `swapon -p`.
    pub priorities: Vec<i32>,
}

impl MmConfig {
    /// Defaults for a pool of `frames`: low = frames/16 (at least 16), high = 2 × low,
    /// `two-list` eviction, `fail` OOM policy, embedded mode, engine depth 256.
    pub fn for_pool(frames: usize) -> MmConfig {
        let low = (frames / 16).max(16).min(frames / 2);
        MmConfig {
            watermarks: Watermarks {
                low,
                high: (2 * low).min(frames),
            },
            evict: "two-list".into(),
            oom: "fail".into(),
            engine: EngineConfig {
                depth: 256,
                ..EngineConfig::default()
            },
            mode: RunMode::Embedded,
            eviction_batch: 128,
            clean_eviction: true,
            access_sampling: true,
            priorities: Vec::new(),
        }
    }
}

/// An asynchronous operation in flight on a worker's engine.
#[derive(Debug, Clone, Copy)]
enum Op {
    WriteBack {
        key: RangeKey,
        addr: u64,
        frame: FrameNo,
        entry: SwapEntry,
    },
    SwapIn {
        key: RangeKey,
        addr: u64,
        frame: FrameNo,
        entry: SwapEntry,
    },
}

/// Memory state under the core's lock: everything an eviction policy may query. Only
/// reachable through the lock's guard: a function that takes `&MemState` or
/// `&mut MemState` runs with the lock held.
pub struct MemState {
    /// Address spaces by pid.
    pub spaces: BTreeMap<u32, Space>,
    /// Swap slots.
    pub swap: SwapSpace,
    /// Staging frames no page refers to any more (swap-cache hit served by a copy, range
    /// dropped): released when their write-back completes.
    orphans: HashSet<FrameNo>,
    /// Write-backs in flight on all workers.
    writebacks: usize,
    /// Asynchronous evictions in flight ([`PageState::Leaving`] with an entry, fenced ones
    /// included).
    leaving: usize,
    /// Frames whose asynchronous access sample is in flight ([`PageState::Leaving`]
    /// without an entry, fenced ones included): [`WorkerMm::finish_stage`] tells a sample
    /// from an eviction by this set, since a fenced page's state is gone.
    sampling: HashSet<FrameNo>,
    /// Swap had no free slot at the last eviction attempt (reported once per episode).
    swap_full: bool,
    /// Bit `w`: worker `w` has a fault waiting for a frame behind write-backs
    /// ([`FaultResult::NeedMemory`]); the next write-back to complete, on any worker,
    /// wakes it (its own ring's completions would wake it anyway, another worker's not).
    memory_waiters: u64,
    /// Parent pages that were `Leaving` at a `fork`, by (parent, address): their children
    /// wait (see `fork_wait`).
    fork_waits: HashMap<(u32, u64), fork_wait::ForkWait>,
    /// Swap entries a page is `Swapped` to while the write-back that fills them is still
    /// in flight (a `Staging` page moved by `remap` that could not be put back in place):
    /// a fault there waits for the write instead of reading a slot not written yet (a
    /// sparse swap file reads zeros there). Removed when that write completes.
    unwritten: HashSet<SwapEntry>,
}

impl std::fmt::Debug for MemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemState")
            .field("spaces", &self.spaces.len())
            .field("orphans", &self.orphans.len())
            .field("writebacks", &self.writebacks)
            .finish()
    }
}

/// Everything under the core's lock (the content of `MmCore::state`): memory state and
/// the two global policies, in separate fields so an allocation policy's `Cx::evict` can
/// borrow the eviction policy while the memory state is borrowed too. Holding a
/// `&mut MmState` means holding the lock (see the module's locking section).
struct MmState {
    mem: MemState,
    evict: Box<dyn EvictPolicy>,
    oom: Box<dyn OomPolicy>,
}

/// Shared by all workers of one memory manager.
pub struct MmCore {
    pool: Arc<FramePool>,
    /// The default installer (spaces may bring their own, see [`MmCore::add_process`]).
    installer: Arc<dyn Installer>,
    registry: Arc<Registry>,
    devices: Vec<Arc<SwapDevice>>,
    config: MmConfig,
    state: Mutex<MmState>,
    stats: MmStats,
    generation: AtomicU64,
    wakers: Mutex<Vec<Option<Waker>>>,
    io_in_flight: AtomicUsize,
    /// Eviction allowed (off while the daemon gives every page back at shutdown).
    eviction: usm_sync::atomic::AtomicBool,
    /// Workers that evict in the background ([`WorkerMm::join_reclaim`]), by bit.
    reclaimers: AtomicU64,
    /// Background reclaim wanted: set when free frames fell below the low watermark,
    /// cleared once a reclaimer brought them (with write-backs in flight) to the high one.
    reclaim: usm_sync::atomic::AtomicBool,
    /// The last slice of background reclaim, on any worker, staged nothing (cleared when
    /// reclaim is asked for anew).
    reclaim_stalled: usm_sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmCore")
            .field("frames", &self.pool.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Frames, swap and fences released by [`MmCore::remove_range`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RangeRelease {
    /// Resident frames moved back to the pool.
    pub frames: usize,
    /// Swap slots freed.
    pub slots: usize,
    /// Pages with an operation in flight (their frame/slot is freed at completion).
    pub in_flight: usize,
    /// Pages that stayed because they were pinned (frames lost to the pool).
    pub stuck: usize,
}

impl MmCore {
    /// A core over `pool` (registered on the userfaultfd `installer` uses), `devices`
    /// (swap; may be empty: then nothing is evicted and a full pool goes to the OOM policy)
    /// and the policies of `registry`, for `workers` workers.
    pub fn new(
        pool: Arc<FramePool>,
        installer: Box<dyn Installer>,
        registry: Arc<Registry>,
        devices: Vec<Arc<SwapDevice>>,
        config: MmConfig,
        workers: usize,
    ) -> Result<Arc<MmCore>, MmError> {
        let mut swap = SwapSpace::new();
        for (i, d) in devices.iter().enumerate() {
            swap.add(d.clone(), config.priorities.get(i).copied().unwrap_or(0))?;
        }
        let evict = registry.build_evict(&config.evict)?;
        let oom = registry.build_oom(&config.oom)?;
        Ok(Arc::new(MmCore {
            pool,
            installer: Arc::from(installer),
            registry,
            devices,
            config,
            state: Mutex::new(MmState {
                mem: MemState {
                    spaces: BTreeMap::new(),
                    swap,
                    orphans: HashSet::new(),
                    writebacks: 0,
                    leaving: 0,
                    sampling: HashSet::new(),
                    swap_full: false,
                    memory_waiters: 0,
                    fork_waits: HashMap::new(),
                    unwritten: HashSet::new(),
                },
                evict,
                oom,
            }),
            stats: MmStats::default(),
            generation: AtomicU64::new(1),
            wakers: Mutex::new((0..workers).map(|_| None).collect()),
            io_in_flight: AtomicUsize::new(0),
            eviction: usm_sync::atomic::AtomicBool::new(true),
            reclaimers: AtomicU64::new(0),
            reclaim: usm_sync::atomic::AtomicBool::new(false),
            reclaim_stalled: usm_sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The installer of `pid`'s space (its own, or the core's default).
    fn installer_in(&self, mem: &MemState, pid: u32) -> Arc<dyn Installer> {
        mem.spaces
            .get(&pid)
            .and_then(|s| s.installer.clone())
            .unwrap_or_else(|| self.installer.clone())
    }

    /// Takes the core lock. Never call it (or any `pub` method, which calls it) with the
    /// lock held: it is not reentrant. A poisoned lock (a panic under it that
    /// `usm_policies::guarded` did not catch) is taken anyway.
    fn lock(&self) -> Locked<'_> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frame pool.
    pub fn pool(&self) -> &Arc<FramePool> {
        &self.pool
    }

    /// The configuration.
    pub fn config(&self) -> &MmConfig {
        &self.config
    }

    /// The policy registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The swap devices.
    pub fn devices(&self) -> &[Arc<SwapDevice>] {
        &self.devices
    }

    /// Statistics.
    pub fn stats(&self) -> &MmStats {
        &self.stats
    }

    /// A snapshot of the statistics.
    pub fn stats_snapshot(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Sets how to wake worker `worker` (called when a page it waits for is installed by
    /// another worker, or frames it waits for come free).
    pub fn set_waker(
        &self,
        worker: usize,
        waker: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(), MmError> {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        let slot = w.get_mut(worker).ok_or(MmError::NoWorker(worker))?;
        *slot = Some(waker);
        Ok(())
    }

    /// Adds a worker beyond those [`MmCore::new`] was built for (the daemon's per-process
    /// readers serve their faults themselves, each with a [`WorkerMm`] of its own): the
    /// lowest index no worker holds, woken by `waker`. Indices are bits of the pages'
    /// waiter masks, so at most 64 workers exist at once; `None` when all are taken.
    /// Give it back with [`MmCore::remove_worker`] once its [`WorkerMm`] has nothing in
    /// flight ([`WorkerMm::retire`]).
    pub fn add_worker(&self, waker: Waker) -> Option<usize> {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.iter().position(Option::is_none) {
            w[i] = Some(waker);
            return Some(i);
        }
        if w.len() >= 64 {
            return None;
        }
        w.push(Some(waker));
        Some(w.len() - 1)
    }

    /// Gives back an index [`MmCore::add_worker`] returned (a later wake of it does
    /// nothing, or wakes the next holder: waking is always harmless).
    pub fn remove_worker(&self, worker: usize) {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = w.get_mut(worker) {
            *slot = None;
        }
    }

    fn wake(&self, worker: usize) {
        let waker = {
            let w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            w.get(worker).cloned().flatten()
        };
        if let Some(waker) = waker {
            waker();
        }
    }

    fn wake_mask(&self, mask: u64, except: usize) {
        for w in 0..64 {
            if mask & (1 << w) != 0 && w != except {
                self.wake(w);
            }
        }
    }

    /// Wakes the faults waiting for memory (reclaim the core does not see finished: an
    /// installer's [`Installer::busy`] work). Locks.
    pub fn wake_memory_waiters(&self) {
        let waiting = std::mem::take(&mut self.lock().mem.memory_waiters);
        self.wake_mask(waiting, usize::MAX);
    }

    /// The state of page `addr` of `pid` (`None`: vacant or unknown).
    pub fn page_state(&self, pid: u32, addr: u64) -> Option<PageState> {
        self.lock()
            .mem
            .spaces
            .get(&pid)?
            .pages
            .get(&page_floor(addr))
            .cloned()
    }

    /// Counters of `pid`'s space.
    pub fn space_counters(&self, pid: u32) -> Option<crate::SpaceCounters> {
        self.lock().mem.spaces.get(&pid).map(|s| s.counters)
    }

    /// Swap slots in use (all devices).
    pub fn swap_slots_used(&self) -> u64 {
        let st = self.lock();
        st.mem.swap.total_slots() - st.mem.swap.free_slots()
    }

    /// Swap slots in all (all devices).
    pub fn swap_slots_total(&self) -> u64 {
        self.lock().mem.swap.total_slots()
    }

    /// Asynchronous operations (swap-ins, write-backs) in flight on all workers.
    pub fn io_in_flight(&self) -> usize {
        self.io_in_flight.load(Ordering::Acquire)
    }

    /// Frames free in the pool as far as any worker can tell (shared arena + zeroing
    /// queue; frames cached in lArenas are not counted).
    pub fn shared_free_frames(&self) -> usize {
        self.pool.shared_arena().len() + self.pool.zeroing_len()
    }
}

/// One worker's part of the memory manager: its lArena, its io_uring engine and the
/// operations in flight on it. Not `Send` (the engine is bound to its thread): build it
/// on the worker thread.
pub struct WorkerMm {
    core: Arc<MmCore>,
    worker: usize,
    io: WorkerIo,
    completions: Vec<Completion>,
    /// I/O was in flight at the last poll: the engine's eventfd may hold a late signal.
    signal_stale: bool,
    /// The next slice of background reclaim may not start before this (see
    /// [`WorkerMm::reclaim_slice`]).
    next_slice: std::time::Instant,
}

impl std::fmt::Debug for WorkerMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMm")
            .field("worker", &self.worker)
            .field("ops", &self.io.ops.len())
            .finish()
    }
}

struct WorkerIo {
    arena: LocalArena,
    engine: Engine,
    ops: HashMap<Ticket, Op>,
    /// Requests the engine refused at once, completed with their error at the next poll.
    refused: Vec<(Ticket, SwapError)>,
    next_synthetic: u64,
}

impl WorkerMm {
    /// Builds worker `worker`'s part on the calling (worker) thread.
    pub fn new(core: Arc<MmCore>, worker: usize) -> Result<WorkerMm, MmError> {
        let engine = Engine::new(&core.config.engine, &core.devices)?;
        let arena = core.pool.local_arena();
        Ok(WorkerMm {
            core,
            worker,
            io: WorkerIo {
                arena,
                engine,
                ops: HashMap::new(),
                refused: Vec::new(),
                next_synthetic: SYNTHETIC_TICKET,
            },
            completions: Vec::new(),
            signal_stale: false,
            next_slice: std::time::Instant::now(),
        })
    }

    /// The core.
    pub fn core(&self) -> &Arc<MmCore> {
        &self.core
    }

    /// This worker's index.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Operations in flight on this worker's engine.
    pub fn in_flight(&self) -> usize {
        self.io.ops.len()
    }

    /// The engine's eventfd (poll it while parked).
    pub fn eventfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.io.engine.eventfd()
    }

    /// Whether the thread may sleep on [`WorkerMm::eventfd`] now, right after a
    /// [`WorkerMm::poll`], without missing a completion: nothing refused or finished
    /// inline waits, nothing is queued unsubmitted, and the kernel flags no completion
    /// work it left pending (`usm_swap::Engine::ready_to_sleep`: such work signals no
    /// eventfd, so a sleeper would wait for its timeout). `false`: poll again first.
    pub fn ready_to_sleep(&mut self) -> bool {
        self.io.refused.is_empty() && self.io.engine.ready_to_sleep()
    }

    /// Before this worker's part is dropped by a thread that is not a LocalManager
    /// worker (a daemon reader): reaps until nothing is in flight on its engine, so no
    /// write-back or swap-in is lost with it (their pages would stay `Staging` or
    /// `SwapIn` for ever), then gives its cached frames back. Eviction may still run
    /// from these polls (as from any), bounded by the watermarks. Returns `false` if
    /// I/O was still in flight after `limit`.
    pub fn retire(&mut self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        self.poll();
        while !self.io.ops.is_empty() || !self.io.refused.is_empty() {
            if std::time::Instant::now() >= deadline {
                tracing::error!(
                    worker = self.worker,
                    in_flight = self.io.ops.len(),
                    "I/O still in flight when a worker retired"
                );
                self.drain_arena();
                return false;
            }
            self.wait_io();
            self.poll();
        }
        self.drain_arena();
        true
    }

    /// Gives this worker's cached free frames back to the shared arena (before exit, or
    /// when another worker starves).
    pub fn drain_arena(&mut self) {
        self.io.arena.drain();
    }
}
