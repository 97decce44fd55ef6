//! [`MmCore`] (shared by all workers) and [`WorkerMm`] (one per worker): fault service,
//! swap-in completion, eviction. See the [crate] docs for the protocol.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::time::Instant;
use usm_sync::Arc;

use usm_kmod::event::{Fault, Origin};
use usm_kmod::pool::arena::LocalArena;
use usm_kmod::pool::{FrameOwner, FramePool, FrameState, MAX_ORDER};
use usm_kmod::{FrameNo, PAGE_SIZE};
use usm_policies::{
    Access, AllocPolicy, Cx, Decision, EvictCx, EvictPolicy, Hint, MappedPage, OomAction,
    OomPolicy, OomSituation, PageMask, ProcessCounters, Registry, RunMode, VictimRequest,
    VictimScan, Watermarks, guarded, page_floor,
};
use usm_swap::{
    Completion, Engine, EngineConfig, SwapDevice, SwapEntry, SwapError, SwapSpace, Ticket,
};
use usm_sync::Mutex;
use usm_sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::MmError;
use crate::installer::{Installer, StageOutcome};
use crate::space::{ManagedRange, PageState, RangeKey, Space};
use crate::stats::{FaultPath, MmStats, StatsSnapshot};

mod process;

const PAGE: u64 = PAGE_SIZE as u64;
/// Tickets of requests the engine refused at once (their completion is synthesised).
const SYNTHETIC_TICKET: u64 = 1 << 62;
/// Most pages moved out for access sampling in one victim search (bounds the one-time
/// cost when pressure first arrives and every page is unsampled; beyond it the policy
/// gets "no information" for the rest of that search).
const MAX_SAMPLES_PER_SCAN: usize = 4096;

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
    /// policy gets no access information (`clock` degrades to FIFO).
    pub access_sampling: bool,
    /// Priority of each swap device, in the order given to [`MmCore::new`] (missing: 0);
    /// higher first, as the kernel's `swapon -p`.
    pub priorities: Vec<i32>,
}

impl MmConfig {
    /// Defaults for a pool of `frames`: low = frames/16 (at least 16), high = 2 × low,
    /// `clock` eviction, `fail` OOM policy, embedded mode, engine depth 256.
    pub fn for_pool(frames: usize) -> MmConfig {
        let low = (frames / 16).max(16).min(frames / 2);
        MmConfig {
            watermarks: Watermarks {
                low,
                high: (2 * low).min(frames),
            },
            evict: "clock".into(),
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

/// Memory state under the core's lock: everything an eviction policy may query.
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
    /// Asynchronous stages in flight ([`PageState::Leaving`], fenced ones included).
    leaving: usize,
    /// Swap had no free slot at the last eviction attempt (reported once per episode).
    swap_full: bool,
    /// Bit `w`: worker `w` has a fault waiting for a frame behind write-backs
    /// ([`FaultResult::NeedMemory`]); the next write-back to complete, on any worker,
    /// wakes it (its own ring's completions would wake it anyway, another worker's not).
    memory_waiters: u64,
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

/// Everything under the core's lock: memory state and the two global policies, in
/// separate fields so an allocation policy's `Cx::evict` can borrow the eviction policy
/// while the memory state is borrowed too.
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
}

impl std::fmt::Debug for MmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmCore")
            .field("frames", &self.pool.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What happened to a fault handed to [`WorkerMm::handle_fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultResult {
    /// The page is present now: resume the faulting thread (it retries the access).
    Resolved(FaultPath),
    /// The page was already present (another resolver won, or a spurious fault): resume.
    AlreadyPresent,
    /// A swap-in is in flight for the page: keep the thread parked; this worker is woken
    /// (its waker called) when the page is installed, then ask again.
    Wait,
    /// No free frame; eviction is in flight. Ask again at the next poll.
    NeedMemory,
    /// The access failed (OOM policy, poisoned content): the page is poisoned, so resuming
    /// the thread makes it take SIGBUS at that page. The reason is logged.
    Failed(String),
    /// The address is not a managed page of this pid.
    Foreign,
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
                    swap_full: false,
                    memory_waiters: 0,
                },
                evict,
                oom,
            }),
            stats: MmStats::default(),
            generation: AtomicU64::new(1),
            wakers: Mutex::new((0..workers).map(|_| None).collect()),
            io_in_flight: AtomicUsize::new(0),
            eviction: usm_sync::atomic::AtomicBool::new(true),
        }))
    }

    /// The installer of `pid`'s space (its own, or the core's default).
    fn installer_in(&self, mem: &MemState, pid: u32) -> Arc<dyn Installer> {
        mem.spaces
            .get(&pid)
            .and_then(|s| s.installer.clone())
            .unwrap_or_else(|| self.installer.clone())
    }

    fn lock(&self) -> usm_sync::MutexGuard<'_, MmState> {
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
    /// installer's [`Installer::busy`] work).
    pub fn wake_memory_waiters(&self) {
        let waiting = std::mem::take(&mut self.lock().mem.memory_waiters);
        self.wake_mask(waiting, usize::MAX);
    }

    /// Creates the space of `pid` (idempotent).
    pub fn add_space(&self, pid: u32) {
        self.lock()
            .mem
            .spaces
            .entry(pid)
            .or_insert_with(|| Space::new(pid));
    }

    /// Starts managing `[start, start + len)` of `pid` (page aligned, not overlapping a
    /// managed range) with the allocation policy `alloc_spec`. The caller has registered
    /// the range on the pool's userfaultfd.
    pub fn add_range(
        &self,
        pid: u32,
        start: u64,
        len: u64,
        id: u32,
        alloc_spec: &str,
    ) -> Result<RangeKey, MmError> {
        let bad = |reason| MmError::BadRange {
            pid,
            start,
            len,
            reason,
        };
        if len == 0 || start % PAGE != 0 || len % PAGE != 0 {
            return Err(bad("empty or not page aligned"));
        }
        let alloc = self.registry.build_alloc(alloc_spec)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let space = st.mem.spaces.entry(pid).or_insert_with(|| Space::new(pid));
        let end = start + len;
        if space.range_of(start).is_some()
            || space.range_of(end - 1).is_some()
            || space.ranges.range(start..end).next().is_some()
        {
            return Err(bad("overlaps a managed range"));
        }
        space.ranges.insert(
            start,
            ManagedRange {
                end,
                generation,
                id,
                alloc_spec: alloc_spec.to_owned(),
                alloc: Some(alloc),
            },
        );
        Ok(RangeKey {
            pid,
            start,
            generation,
        })
    }

    /// Stops managing the range starting at `start`: resident frames go back to the pool
    /// (the pages become holes), swap slots are freed, in-flight operations are fenced
    /// (their frame and slot are freed when they complete). The caller unregisters and
    /// unmaps the range afterwards.
    pub fn remove_range(&self, pid: u32, start: u64) -> Result<RangeRelease, MmError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let installer = self.installer_in(&st.mem, pid);
        let space = st
            .mem
            .spaces
            .get_mut(&pid)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let range = space
            .ranges
            .remove(&start)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let addrs: Vec<u64> = space
            .pages
            .keys()
            .copied()
            .filter(|a| (start..range.end).contains(a))
            .collect();
        let mut rel = RangeRelease::default();
        for addr in addrs {
            self.release_page(&mut st.mem, &mut st.evict, &*installer, pid, addr, &mut rel);
        }
        Ok(rel)
    }

    /// Forgets page `addr` of `pid`: its frame goes back to the pool (the page becomes a
    /// hole, or goes with its mapping), its swap slot is freed, an operation in flight on
    /// it is fenced (frame and slot freed when it completes).
    fn release_page(
        &self,
        mem: &mut MemState,
        evict: &mut Box<dyn EvictPolicy>,
        installer: &dyn Installer,
        pid: u32,
        addr: u64,
        rel: &mut RangeRelease,
    ) {
        let Some(space) = mem.spaces.get_mut(&pid) else {
            return;
        };
        space.pins.remove(&addr);
        if let Some((e, _)) = space.clean.remove(&addr) {
            let _ = mem.swap.free(e);
            rel.slots += 1;
        }
        match space.clear(addr) {
            Some(PageState::Resident(f)) => {
                evict.on_free(f);
                match installer.reclaim(&self.pool, f) {
                    Ok(true) => rel.frames += 1,
                    Ok(false) => rel.stuck += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, %f, addr, "reclaiming a frame failed");
                        rel.stuck += 1;
                    }
                }
            }
            Some(PageState::Sampled(f)) => {
                // Out in its own slot: nothing to unmap, the frame goes to zeroing.
                evict.on_free(f);
                match self.pool.release(f) {
                    Ok(()) => rel.frames += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, %f, addr, "releasing a sampled frame failed");
                        rel.stuck += 1;
                    }
                }
            }
            Some(PageState::Staging { frame, .. }) => {
                mem.orphans.insert(frame);
                rel.in_flight += 1;
            }
            Some(PageState::Swapped(e)) => {
                if let Err(err) = mem.swap.free(e) {
                    tracing::warn!(error = %err, "freeing a swap slot failed");
                }
                rel.slots += 1;
            }
            Some(PageState::SwapIn { .. }) => rel.in_flight += 1,
            Some(PageState::Leaving { frame, entry, .. }) => {
                // The stage finishes later: its frame is released then (fenced).
                mem.orphans.insert(frame);
                let _ = mem.swap.free(entry);
                rel.in_flight += 1;
            }
            Some(PageState::Copied) | Some(PageState::Poisoned) | None => {}
        }
    }

    /// Pins `[start, end)` of `pid` against eviction (counted; see [`MmCore::unpin`]).
    pub fn pin(&self, pid: u32, range: Range<u64>) {
        let mut st = self.lock();
        if let Some(space) = st.mem.spaces.get_mut(&pid) {
            let mut a = page_floor(range.start);
            while a < range.end {
                *space.pins.entry(a).or_insert(0) += 1;
                a += PAGE;
            }
        }
    }

    /// Undoes one [`MmCore::pin`] of the same range.
    pub fn unpin(&self, pid: u32, range: Range<u64>) {
        let mut st = self.lock();
        if let Some(space) = st.mem.spaces.get_mut(&pid) {
            let mut a = page_floor(range.start);
            while a < range.end {
                if let Some(n) = space.pins.get_mut(&a) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        space.pins.remove(&a);
                    }
                }
                a += PAGE;
            }
        }
    }

    /// Records a hint (`"PREFETCH=8; EVICTION=DENY"`) for `[start, start + len)` of `pid`
    /// and tells the eviction policy.
    pub fn hint(&self, pid: u32, start: u64, len: u64, text: &str) -> Result<(), MmError> {
        let hint = Hint::parse(text).map_err(usm_policies::PolicyError::from)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(space) = st.mem.spaces.get_mut(&pid) else {
            return Err(MmError::NoRange { pid, addr: start });
        };
        space.hints.apply(start, len, &hint);
        let mut view = MemView {
            pool: &self.pool,
            mem: &st.mem,
        };
        st.evict.on_hint(pid, start..start + len, &hint, &mut view);
        Ok(())
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

    /// Evicts up to `want` pages now on behalf of worker `io` (used by tests and by the
    /// watermark logic). Returns the pages staged.
    pub fn evict_now(&self, io: &mut WorkerMm, want: usize) -> usize {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut cx = WorkerCx::new(self, st, &mut io.io, io.worker);
        cx.run_eviction(VictimRequest::any(want)).chosen
    }

    /// Installs Taken `frames` at `start..` of `pid` directly, bypassing the policies
    /// (daemon pre-population; tests of the partial-move classification). Pages whose
    /// content is elsewhere (staging, swap, swap-in, poisoned) are refused; pages already
    /// present are left to the kernel, which refuses them (`EEXIST`): a multi-page MOVE
    /// then stops with a partial count and the rest is re-issued page by page. Installed
    /// pages become Resident; frames not installed come back in the report (still Taken).
    pub fn install_frames(
        &self,
        pid: u32,
        start: u64,
        frames: &[FrameNo],
    ) -> Result<crate::InstallReport, MmError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let installer = self.installer_in(&st.mem, pid);
        let space = st
            .mem
            .spaces
            .get_mut(&pid)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let (_, range) = space
            .range_of(start)
            .ok_or(MmError::NoRange { pid, addr: start })?;
        let end = start + frames.len() as u64 * PAGE;
        if end > range.end || start % PAGE != 0 {
            return Err(MmError::BadRange {
                pid,
                start,
                len: end - start,
                reason: "outside its range",
            });
        }
        let owner = FrameOwner {
            pid,
            region: range.id,
        };
        for i in 0..frames.len() as u64 {
            match space.pages.get(&(start + i * PAGE)) {
                None | Some(PageState::Resident(_) | PageState::Copied) => {}
                Some(_) => {
                    return Err(MmError::BadRange {
                        pid,
                        start,
                        len: end - start,
                        reason: "a page has content in staging or swap",
                    });
                }
            }
        }
        let report = installer.install(&self.pool, frames, start, owner)?;
        if !report.present.is_empty() || !report.copied.is_empty() {
            MmStats::bump(&self.stats.counters.partial_moves);
        }
        for &(a, f) in &report.mapped {
            space.set(a, PageState::Resident(f));
        }
        for &(a, _) in report.copied.iter().chain(report.present.iter()) {
            space.set(a, PageState::Copied);
        }
        let mut view = MemView {
            pool: &self.pool,
            mem: &st.mem,
        };
        for &(a, f) in &report.mapped {
            st.evict.on_map(
                MappedPage {
                    frame: f,
                    pid,
                    addr: a,
                },
                &mut view,
            );
        }
        Ok(report)
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

    /// Blocks until at least one operation of this worker's engine completes (returns at
    /// once when none is in flight); [`WorkerMm::poll`] then reaps it. Used by the
    /// synchronous swap-in mode, which deliberately blocks the worker.
    pub fn wait_io(&mut self) {
        if self.io.ops.is_empty() {
            return;
        }
        if let Err(e) = self.io.engine.wait(1) {
            tracing::warn!(error = %e, "io_uring wait failed");
        }
    }

    /// The engine's eventfd (poll it while parked).
    pub fn eventfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.io.engine.eventfd()
    }

    /// Serves a fault on `addr` of `pid` (see [`FaultResult`]).
    pub fn handle_fault(&mut self, pid: u32, addr: u64, write: bool, tid: u32) -> FaultResult {
        let core = &*self.core;
        let addr = page_floor(addr);
        let span = tracing::trace_span!("fault", addr, write, worker = self.worker).entered();
        MmStats::bump(&core.stats.counters.faults);
        let mut guard = core.lock();
        let st = &mut *guard;
        let result = {
            let Some(space) = st.mem.spaces.get_mut(&pid) else {
                return FaultResult::Foreign;
            };
            if space.range_of(addr).is_none() {
                return FaultResult::Foreign;
            }
            match space.pages.get_mut(&addr) {
                Some(PageState::Resident(_) | PageState::Copied | PageState::Poisoned) => {
                    return FaultResult::AlreadyPresent;
                }
                Some(PageState::SwapIn { waiters, .. } | PageState::Leaving { waiters, .. }) => {
                    *waiters |= 1 << self.worker;
                    return FaultResult::Wait;
                }
                Some(&mut PageState::Sampled(frame)) => {
                    let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
                    let r = cx.refault_sampled(pid, addr, frame, write);
                    cx.balance();
                    drop(guard);
                    let _ = self.io.engine.submit();
                    return r;
                }
                _ => {}
            }
            space.counters.faults += 1;
            let fault = Fault {
                addr,
                write,
                wp: false,
                minor: false,
                len_hint: PAGE,
                origin: Origin { pid, tid },
            };
            let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
            cx.serve(&fault)
        };
        if !matches!(result, FaultResult::NeedMemory) {
            let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
            cx.balance();
        }
        drop(guard);
        let _ = self.io.engine.submit();
        drop(span);
        result
    }

    /// Reaps this worker's completions: write-backs record their swap entry and free the
    /// staging frame; swap-ins install their page (or poison it) and wake the workers
    /// waiting for it. Returns how many operations finished.
    pub fn poll(&mut self) -> usize {
        // The engine's eventfd is one of the worker's wake fds: consume its signals before
        // reaping (the engine's documented order). Left unread it stays readable and a
        // parked worker wakes at once, again and again (measured: ~100 000 wake-ups/s per
        // worker, ~0.65 of a core, on an idle server once swap I/O had happened). A signal
        // may come after the last reap of a round with I/O: drained one round later too.
        let io_before = !self.io.ops.is_empty();
        if io_before || self.signal_stale {
            self.io.engine.clear_eventfd();
        }
        self.signal_stale = io_before;
        if self.io.ops.is_empty() && self.io.refused.is_empty() {
            return 0;
        }
        if let Err(e) = self.io.engine.enter_for_completions() {
            tracing::warn!(error = %e, "io_uring enter failed");
        }
        let mut completions = std::mem::take(&mut self.completions);
        self.io.engine.reap(|c| completions.push(c));
        let refused = std::mem::take(&mut self.io.refused);
        if completions.is_empty() && refused.is_empty() {
            self.completions = completions;
            return 0;
        }
        let core = &*self.core;
        let mut guard = core.lock();
        let st = &mut *guard;
        let mut n = 0;
        let mut cx = WorkerCx::new(core, st, &mut self.io, self.worker);
        for c in completions.drain(..) {
            n += 1;
            cx.complete(c.ticket, c.result.map(|_| ()));
        }
        for (t, e) in refused {
            n += 1;
            cx.complete(t, Err(e));
        }
        cx.balance();
        drop(guard);
        let _ = self.io.engine.submit();
        self.completions = completions;
        n
    }

    /// Gives this worker's cached free frames back to the shared arena (before exit, or
    /// when another worker starves).
    pub fn drain_arena(&mut self) {
        self.io.arena.drain();
    }
}

/// The eviction policy's view: memory state only.
struct MemView<'a> {
    pool: &'a FramePool,
    mem: &'a MemState,
}

impl EvictCx for MemView<'_> {
    fn access(&mut self, _frame: FrameNo) -> Access {
        // No access sampling yet: every frame reports "no information".
        Access::default()
    }

    fn is_pinned(&self, frame: FrameNo) -> bool {
        let Ok(desc) = self.pool.desc(frame) else {
            return false;
        };
        let (pid, addr) = (desc.owner().pid, desc.vaddr());
        self.mem.spaces.get(&pid).is_some_and(|s| s.is_pinned(addr))
    }

    fn hint(&self, pid: u32, addr: u64) -> Hint {
        self.mem
            .spaces
            .get(&pid)
            .map(|s| s.hints.hint_at(addr))
            .unwrap_or_default()
    }
}

/// The eviction policy's view during a victim search: [`MemView`] plus re-fault access
/// sampling (see the module docs) when `MmConfig::access_sampling` is on.
struct SamplingView<'a> {
    core: &'a MmCore,
    mem: &'a mut MemState,
    /// Pages moved out during this search.
    sampled: usize,
}

impl EvictCx for SamplingView<'_> {
    /// A resident page is moved out to its own slot (`Resident → Sampled`) and reported
    /// accessed: it gets one revolution of the hand to show it is used. A page still out
    /// when asked again was not accessed since: "not accessed". A sampled page that was
    /// accessed is resident again and was reported through `on_access` by its re-fault.
    fn access(&mut self, frame: FrameNo) -> Access {
        if !self.core.config.access_sampling {
            return Access::default();
        }
        let pool = &self.core.pool;
        let Ok(desc) = pool.desc(frame) else {
            return Access::default();
        };
        let (pid, addr) = (desc.owner().pid, desc.vaddr());
        let installer = self.core.installer_in(self.mem, pid);
        let Some(space) = self.mem.spaces.get_mut(&pid) else {
            return Access::default();
        };
        match space.pages.get(&addr) {
            Some(PageState::Resident(f))
                if *f == frame
                    && self.sampled < MAX_SAMPLES_PER_SCAN
                    && !space.is_pinned(addr)
                    && matches!(installer.stage(pool, frame), Ok(true)) =>
            {
                space.set(addr, PageState::Sampled(frame));
                self.sampled += 1;
                Access {
                    accessed: true,
                    written: false,
                }
            }
            _ => Access::default(),
        }
    }

    fn is_pinned(&self, frame: FrameNo) -> bool {
        MemView {
            pool: &self.core.pool,
            mem: self.mem,
        }
        .is_pinned(frame)
    }

    fn hint(&self, pid: u32, addr: u64) -> Hint {
        MemView {
            pool: &self.core.pool,
            mem: self.mem,
        }
        .hint(pid, addr)
    }
}

/// The [`Cx`] a policy gets on one worker, for one call.
struct WorkerCx<'a> {
    core: &'a MmCore,
    mem: &'a mut MemState,
    evict: &'a mut Box<dyn EvictPolicy>,
    oom: &'a mut Box<dyn OomPolicy>,
    io: &'a mut WorkerIo,
    worker: usize,
    /// Fresh frames taken during this call.
    taken: Vec<FrameNo>,
    /// Staged frames handed out by `take_staged`, with their page and prior state.
    staged: Vec<(FrameNo, u32, u64, PageState)>,
}

impl<'a> WorkerCx<'a> {
    fn new(core: &'a MmCore, st: &'a mut MmState, io: &'a mut WorkerIo, worker: usize) -> Self {
        WorkerCx {
            core,
            mem: &mut st.mem,
            evict: &mut st.evict,
            oom: &mut st.oom,
            io,
            worker,
            taken: Vec::new(),
            staged: Vec::new(),
        }
    }

    fn view(&self) -> MemView<'_> {
        MemView {
            pool: &self.core.pool,
            mem: self.mem,
        }
    }

    fn free_total(&self) -> usize {
        self.io.arena.len() + self.core.shared_free_frames()
    }

    /// Gives back every frame still taken (after a panic, an OOM answer, or a policy that
    /// kept some): fresh ones to the arena, staged ones back into staging.
    fn restore_taken(&mut self) {
        for f in std::mem::take(&mut self.taken) {
            self.return_frame(f, true);
        }
        for (f, pid, addr, prior) in std::mem::take(&mut self.staged) {
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            } else {
                self.mem.orphans.insert(f);
            }
        }
    }

    fn return_frame(&mut self, f: FrameNo, zeroed: bool) {
        let pool = &self.core.pool;
        let r = if zeroed {
            pool.return_unused(&mut self.io.arena, f)
        } else {
            pool.release(f)
        };
        if let Err(e) = r {
            tracing::error!(error = %e, %f, "giving a frame back failed");
        }
    }

    /// Runs the region's allocation policy for `fault` and carries out its decision.
    fn serve(&mut self, fault: &Fault) -> FaultResult {
        let (pid, addr) = (fault.origin.pid, fault.addr);
        let mut attempts = 0u32;
        let mut last_scan = VictimScan::default();
        let mut evicted_once = false;
        loop {
            let Some(space) = self.mem.spaces.get_mut(&pid) else {
                return FaultResult::Foreign;
            };
            let Some((spec, mut alloc, space_level)) = take_alloc(space, addr) else {
                return FaultResult::NeedMemory;
            };
            let name = alloc.name().to_owned();
            let decision = guarded(&name, || alloc.alloc(fault, self));
            let panicked = decision.is_err();
            if panicked {
                // Replace the instance: the default allocation policy (logged).
                let fallback = self
                    .core
                    .registry
                    .default_spec(usm_policies::PolicyKind::Alloc)
                    .unwrap_or("first-fit")
                    .to_owned();
                match self.core.registry.build_alloc(&fallback) {
                    Ok(p) => alloc = p,
                    Err(e) => tracing::error!(error = %e, "cannot build the default policy"),
                }
                tracing::error!(policy = %name, replacement = %fallback, spec = %spec,
                    "allocation policy panicked; frames it held were taken back and the region now uses the default policy");
                MmStats::bump(&self.core.stats.counters.policy_panics);
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.counters.policy_panics += 1;
                }
            }
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                put_alloc(space, addr, alloc, space_level);
            }
            let decision = match decision {
                Ok(d) => d,
                Err(_) => {
                    self.restore_taken();
                    attempts += 1;
                    if attempts > 3 {
                        return self.fail(addr, pid, "allocation policy keeps panicking".into());
                    }
                    continue;
                }
            };
            match decision {
                Decision::Map(m) => return self.apply_map(pid, addr, m),
                Decision::Yield(ticket) => {
                    self.restore_taken();
                    let space = self.mem.spaces.get_mut(&pid);
                    return match space.and_then(|s| s.pages.get_mut(&addr)) {
                        Some(PageState::SwapIn {
                            waiters, ticket: t, ..
                        }) if *t == ticket => {
                            *waiters |= 1 << self.worker;
                            FaultResult::Wait
                        }
                        Some(PageState::SwapIn { waiters, .. }) => {
                            *waiters |= 1 << self.worker;
                            FaultResult::Wait
                        }
                        other => {
                            tracing::error!(?other, "policy yielded on a page with no swap-in");
                            FaultResult::NeedMemory
                        }
                    };
                }
                Decision::Oom => {
                    self.restore_taken();
                    if !self.core.eviction.load(Ordering::Acquire) && self.let_go(64) > 0 {
                        // Giving everything back (daemon shutdown): pages stay where they
                        // are and stop holding frames, instead of being evicted.
                        continue;
                    }
                    if self.mem.writebacks > 0 {
                        MmStats::bump(&self.core.stats.counters.memory_waits);
                        self.mem.memory_waiters |= 1 << self.worker;
                        return FaultResult::NeedMemory;
                    }
                    if !evicted_once {
                        evicted_once = true;
                        let want = self.core.config.watermarks.high.max(1);
                        last_scan = self.run_eviction(VictimRequest::any(want));
                        if last_scan.chosen > 0 {
                            MmStats::bump(&self.core.stats.counters.memory_waits);
                            return FaultResult::NeedMemory;
                        }
                        if self.free_total() > 0 {
                            continue;
                        }
                    }
                    if self.mem.leaving > 0
                        || self
                            .mem
                            .spaces
                            .values()
                            .any(|s| s.installer.as_ref().is_some_and(|i| i.busy()))
                    {
                        // Stages in flight (a program's agent has not answered yet: it may
                        // be stopped), or staging room on its way back, and nothing else
                        // to take now: wait, never OOM.
                        MmStats::bump(&self.core.stats.counters.memory_waits);
                        self.mem.memory_waiters |= 1 << self.worker;
                        return FaultResult::NeedMemory;
                    }
                    let situation = OomSituation {
                        fault: *fault,
                        attempt: attempts,
                        mode: self.core.config.mode,
                        last_scan,
                        free_frames: self.free_total(),
                    };
                    attempts += 1;
                    let oom_name = self.oom.name().to_owned();
                    let action = {
                        let mut policy = std::mem::replace(self.oom, Box::new(NoOom));
                        let a = guarded(&oom_name, || policy.on_oom(&situation, self));
                        *self.oom = policy;
                        a
                    };
                    self.restore_taken();
                    match action {
                        Ok(OomAction::EvictHarder(n)) if attempts <= 8 => {
                            last_scan = self.run_eviction(VictimRequest::any(n.max(1)).hard());
                            if last_scan.chosen > 0 {
                                return FaultResult::NeedMemory;
                            }
                        }
                        Ok(OomAction::EvictHarder(_)) => {
                            return self.fail(
                                addr,
                                pid,
                                format!("out of memory after {attempts} harder evictions"),
                            );
                        }
                        Ok(OomAction::FailAccess(reason)) => {
                            return self.fail(addr, pid, reason.to_string());
                        }
                        Ok(
                            action @ (OomAction::KillLargestProcess | OomAction::KillLargestTask),
                        ) => {
                            // The space holding the most frames, if its installer can end
                            // its process (daemon: SIGKILL through a pidfd). Its exit gives
                            // the frames back; this fault waits for them unless it is the
                            // one killed. The embedded runtime cannot end a task: the access
                            // fails.
                            let largest = self
                                .mem
                                .spaces
                                .iter()
                                .max_by_key(|(_, s)| s.counters.resident)
                                .map(|(&p, _)| p);
                            if let Some(victim) = largest
                                && self.core.installer_in(self.mem, victim).kill()
                            {
                                tracing::error!(
                                    ?action,
                                    victim,
                                    faulting = pid,
                                    free_slots = self.mem.swap.free_slots(),
                                    "out of memory: the OOM policy killed the process holding the most frames"
                                );
                                if victim == pid {
                                    return self.fail(addr, pid, "out of memory: killed".into());
                                }
                                self.mem.memory_waiters |= 1 << self.worker;
                                return FaultResult::NeedMemory;
                            }
                            return self.fail(
                                addr,
                                pid,
                                format!("out of memory: the OOM policy asked {action:?}, which this runtime cannot do; the access fails"),
                            );
                        }
                        Err(p) => return self.fail(addr, pid, p.to_string()),
                    }
                }
            }
        }
    }

    /// Poisons `addr` so the access fails with SIGBUS, logs why.
    fn fail(&mut self, addr: u64, pid: u32, reason: String) -> FaultResult {
        tracing::error!(
            addr,
            pid,
            %reason,
            free_frames = self.free_total(),
            frames = self.core.pool.len(),
            free_slots = self.mem.swap.free_slots(),
            slots = self.mem.swap.total_slots(),
            writebacks = self.mem.writebacks,
            leaving = self.mem.leaving,
            io_in_flight = self.io.engine.in_flight(),
            io_depth = self.io.engine.depth(),
            resident = self
                .mem
                .spaces
                .values()
                .map(|s| s.counters.resident)
                .sum::<usize>(),
            "access failed: page poisoned (SIGBUS on access)"
        );
        MmStats::bump(&self.core.stats.counters.oom_failures);
        if let Err(e) = self
            .core
            .installer_in(self.mem, pid)
            .poison(&self.core.pool, addr)
        {
            tracing::error!(error = %e, addr, "poisoning failed");
        }
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            space.set(addr, PageState::Poisoned);
        }
        FaultResult::Failed(reason)
    }

    fn apply_map(&mut self, pid: u32, addr: u64, m: usm_policies::Mapping) -> FaultResult {
        let Some(space) = self.mem.spaces.get(&pid) else {
            self.restore_taken();
            return FaultResult::Foreign;
        };
        let Some((rstart, range)) = space.range_of(addr) else {
            self.restore_taken();
            return FaultResult::Foreign;
        };
        let (rend, region) = (range.end, range.id);
        let owner = FrameOwner { pid, region };
        if !m.contains(addr) || m.start() < rstart || m.end() > rend {
            tracing::error!(
                start = m.start(),
                end = m.end(),
                addr,
                "policy mapping misses the fault or leaves its region"
            );
            self.restore_taken();
            return FaultResult::NeedMemory;
        }
        let mut path = FaultPath::FastMap;
        if m.len() > 1
            && let Some(space) = self.mem.spaces.get_mut(&pid)
        {
            space.counters.fhp_pages += m.len() as u64 - 1;
        }
        // 1. Staged frames (swap-cache hits) go back to their own page.
        let mut fresh: Vec<(u64, FrameNo)> = Vec::with_capacity(m.len());
        // Policies map frames in the order they took them: reversed, each one is found
        // at the end of `taken` (O(1) per page instead of a scan; a 2 MiB run is 512).
        self.taken.reverse();
        for (a, f) in m.pages() {
            if let Some(i) = self.staged.iter().position(|s| s.0 == f) {
                let (f, spid, saddr, prior) = self.staged.swap_remove(i);
                if (spid, saddr) != (pid, a) {
                    tracing::error!(%f, "policy mapped a staged frame at another page; restored");
                    if let Some(space) = self.mem.spaces.get_mut(&spid) {
                        space.set(saddr, prior);
                    }
                    continue;
                }
                path = FaultPath::SwapCacheHit;
                self.swap_cache_hit(pid, a, f, prior, owner);
            } else if let Some(i) = if self.taken.last() == Some(&f) {
                Some(self.taken.len() - 1)
            } else {
                self.taken.iter().position(|&t| t == f)
            } {
                self.taken.swap_remove(i);
                if self
                    .mem
                    .spaces
                    .get(&pid)
                    .is_some_and(|s| s.pages.contains_key(&a))
                {
                    // Not vacant: never map over content.
                    self.return_frame(f, true);
                } else {
                    fresh.push((a, f));
                }
            } else {
                tracing::error!(%f, "policy mapped a frame it did not take this call");
            }
        }
        // 2. Fresh frames: one MOVE per run of consecutive pages.
        let mut i = 0;
        while i < fresh.len() {
            let mut j = i + 1;
            while j < fresh.len() && fresh[j].0 == fresh[j - 1].0 + PAGE {
                j += 1;
            }
            let frames: Vec<FrameNo> = fresh[i..j].iter().map(|p| p.1).collect();
            self.install_fresh(pid, fresh[i].0, &frames, owner, true);
            i = j;
        }
        self.restore_taken();
        match self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)) {
            Some(PageState::Resident(_) | PageState::Copied) => FaultResult::Resolved(path),
            _ => FaultResult::NeedMemory,
        }
    }

    /// Installs Taken frames (zeroed if `zeroed`, else holding content) at `start..`.
    fn install_fresh(
        &mut self,
        pid: u32,
        start: u64,
        frames: &[FrameNo],
        owner: FrameOwner,
        zeroed: bool,
    ) {
        let installer = self.core.installer_in(self.mem, pid);
        let installed = if zeroed {
            installer.install_zeroed(&self.core.pool, frames, start, owner)
        } else {
            installer.install(&self.core.pool, frames, start, owner)
        };
        let report = match installed {
            Ok(r) => r,
            Err(e) => {
                // The mapping went away under the fault (its `munmap` event is on its way
                // to the reader, daemon mode) or the process is gone: nothing to install.
                if matches!(&e, MmError::Kmod(k) if k.is_not_found() || k.is_mm_gone()) {
                    tracing::debug!(error = %e, start, "install target gone");
                } else {
                    tracing::error!(error = %e, start, "install failed");
                }
                for &f in frames {
                    self.return_frame(f, zeroed);
                }
                return;
            }
        };
        let c = &self.core.stats.counters;
        if report.mapped.len() != frames.len() {
            MmStats::bump(&c.partial_moves);
        }
        c.pages_mapped
            .fetch_add(report.mapped.len() as u64, Ordering::Relaxed);
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            if zeroed {
                space.counters.zero_fills += (report.mapped.len() + report.copied.len()) as u64;
            }
            for &(a, f) in &report.mapped {
                space.set(a, PageState::Resident(f));
            }
            for &(a, _) in report.copied.iter().chain(report.present.iter()) {
                space.set(a, PageState::Copied);
            }
        }
        for &(_, f) in report.copied.iter() {
            MmStats::bump(&c.copy_fallbacks);
            self.return_frame(f, zeroed);
        }
        for &(_, f) in report.present.iter().chain(report.retry.iter()) {
            self.return_frame(f, zeroed);
        }
        for &(a, f) in &report.mapped {
            let mut view = MemView {
                pool: &self.core.pool,
                mem: self.mem,
            };
            self.evict.on_map(
                MappedPage {
                    frame: f,
                    pid,
                    addr: a,
                },
                &mut view,
            );
        }
    }

    /// A fault on a page in staging: MOVE it back, or — when its in-flight write pins the
    /// slot — copy it into a fresh frame and move that in.
    fn swap_cache_hit(
        &mut self,
        pid: u32,
        addr: u64,
        f: FrameNo,
        prior: PageState,
        owner: FrameOwner,
    ) {
        let c = &self.core.stats.counters;
        match self
            .core
            .installer_in(self.mem, pid)
            .unstage(&self.core.pool, f)
        {
            Ok(true) => {
                MmStats::bump(&c.swap_cache_moves);
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.set(addr, PageState::Resident(f));
                }
                let mut view = MemView {
                    pool: &self.core.pool,
                    mem: self.mem,
                };
                self.evict.on_map(
                    MappedPage {
                        frame: f,
                        pid,
                        addr,
                    },
                    &mut view,
                );
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, %f, addr, "unstage failed; page stays in staging");
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.set(addr, prior);
                }
                return;
            }
        }
        // The write pins the slot: copy into a fresh frame.
        let fresh = match self.core.pool.take(&mut self.io.arena) {
            Ok(Some(n)) => n,
            _ => {
                if let Some(space) = self.mem.spaces.get_mut(&pid) {
                    space.set(addr, prior);
                }
                return;
            }
        };
        if let Err(e) = crate::sys::io::copy_slot(&self.core.pool, f, fresh) {
            tracing::error!(error = %e, "copying a staged page failed");
            self.return_frame(fresh, true);
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            }
            return;
        }
        MmStats::bump(&c.swap_cache_copies);
        self.mem.orphans.insert(f);
        self.install_fresh(pid, addr, &[fresh], owner, false);
        let installed = matches!(
            self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)),
            Some(PageState::Resident(_) | PageState::Copied)
        );
        if !installed {
            // The address space is changing (daemon: an event waits for its reader): the
            // page stays in staging, its write-back goes on; the fault comes again.
            self.mem.orphans.remove(&f);
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            }
        }
    }

    /// Stages victims chosen by the eviction policy and queues their write-backs.
    fn run_eviction(&mut self, req: VictimRequest) -> VictimScan {
        let span =
            tracing::debug_span!("eviction", want = req.want, worker = self.worker).entered();
        // Asynchronous stages in flight become write-backs on whichever worker finishes
        // them: count them against the room, but never more than half of it (a stopped
        // program's stages may not finish for a long time and must not stop eviction; a
        // write-back that finds no room puts its page back, nothing is lost).
        let depth = self.io.engine.depth() as usize;
        let room = depth
            .saturating_sub(self.io.engine.in_flight() as usize)
            .saturating_sub(self.mem.leaving.min(depth / 2));
        let want = req.want.min(room).min(self.core.config.eviction_batch);
        let full = self.mem.swap.free_slots() == 0 && !self.core.devices.is_empty();
        if full != self.mem.swap_full {
            // Said once per episode: pages stay in memory while swap has no room.
            self.mem.swap_full = full;
            if full {
                tracing::warn!(
                    slots = self.mem.swap.total_slots(),
                    "swap is full: no page can be evicted until slots come free; pages stay in memory and faults wait (the OOM policy decides when frames run out too)"
                );
                MmStats::bump(&self.core.stats.counters.swap_full);
            } else {
                tracing::info!("swap has free slots again; eviction resumes");
            }
        }
        if want == 0 || full || !self.core.eviction.load(Ordering::Acquire) {
            return VictimScan::default();
        }
        let mut out = Vec::with_capacity(want);
        let mut scan = {
            let mut view = SamplingView {
                core: self.core,
                mem: self.mem,
                sampled: 0,
            };
            let name = self.evict.name().to_owned();
            let evict = &mut *self.evict;
            let scan = guarded(&name, || {
                evict.victims(VictimRequest { want, ..req }, &mut view, &mut out)
            });
            self.core
                .stats
                .counters
                .samples_taken
                .fetch_add(view.sampled as u64, Ordering::Relaxed);
            match scan {
                Ok(scan) => scan,
                Err(p) => {
                    out.clear();
                    self.replace_evict(&name, &p.to_string());
                    return VictimScan::default();
                }
            }
        };
        let mut staged = 0;
        let mut to_stage: Vec<(MappedPage, SwapEntry)> = Vec::new();
        let offered = out.len();
        for v in out {
            match self.prepare_victim(v) {
                Victim::Done(true) => staged += 1,
                Victim::Done(false) => {}
                Victim::Stage(v, entry) => to_stage.push((v, entry)),
            }
        }
        let n_stage = to_stage.len();
        staged += self.stage_batch(to_stage);
        if staged == 0 {
            tracing::debug!(
                want,
                room,
                offered,
                n_stage,
                ?scan,
                "eviction chose nothing"
            );
        }
        scan.chosen = staged;
        if staged > 0 {
            if let Err(e) = self.io.engine.submit() {
                tracing::warn!(error = %e, "submitting write-backs failed");
            }
        }
        drop(span);
        scan
    }

    /// Lets go of up to `n` resident pages of any space: they stay in their address space
    /// (`Copied`, no longer the core's), their frames go back to the pool.
    fn let_go(&mut self, n: usize) -> usize {
        let mut done = 0;
        for space in self.mem.spaces.values_mut() {
            let some: Vec<(u64, FrameNo)> = space
                .pages
                .iter()
                .filter_map(|(&a, s)| match s {
                    PageState::Resident(f) => Some((a, *f)),
                    _ => None,
                })
                .take(n - done)
                .collect();
            for (a, f) in some {
                self.evict.on_free(f);
                if let Err(e) = self.core.pool.release(f) {
                    tracing::warn!(error = %e, %f, "releasing a frame failed");
                }
                space.set(a, PageState::Copied);
                done += 1;
            }
            if done >= n {
                break;
            }
        }
        done
    }

    /// The eviction policy panicked: FIFO replaces it (it needs nothing the failed one
    /// knew), learns every resident page, and each space counts the panic.
    fn replace_evict(&mut self, name: &str, why: &str) {
        MmStats::bump(&self.core.stats.counters.policy_panics);
        let fresh = match self.core.registry.build_evict("fifo") {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot build fifo to replace a panicking eviction policy");
                return;
            }
        };
        *self.evict = fresh;
        let mut resident = Vec::new();
        for (&pid, space) in self.mem.spaces.iter_mut() {
            space.counters.policy_panics += 1;
            for (&addr, st) in &space.pages {
                if let PageState::Resident(frame) = *st {
                    resident.push(MappedPage { frame, pid, addr });
                }
            }
        }
        resident.sort_by_key(|p| p.frame);
        let n = resident.len();
        let mut view = MemView {
            pool: &self.core.pool,
            mem: self.mem,
        };
        for p in resident {
            self.evict.on_map(p, &mut view);
        }
        tracing::error!(policy = %name, replacement = "fifo", pages = n, %why,
            "eviction policy panicked; fifo replaces it and tracks every resident page");
    }

    /// Takes the victims out of their address spaces, one [`Installer::stage_many`] per
    /// space (the daemon's agent moves a whole batch per round trip), and queues the
    /// write-backs of those that left. Returns how many did.
    fn stage_batch(&mut self, mut victims: Vec<(MappedPage, SwapEntry)>) -> usize {
        let core = self.core;
        victims.sort_by_key(|(v, _)| v.pid);
        let mut staged = 0;
        let mut frames = Vec::new();
        let mut done = Vec::new();
        for group in victims.chunk_by(|a, b| a.0.pid == b.0.pid) {
            let pid = group[0].0.pid;
            frames.clear();
            frames.extend(group.iter().map(|(v, _)| v.frame));
            done.clear();
            core.installer_in(self.mem, pid)
                .stage_many(&core.pool, &frames, &mut done);
            for (i, &(v, entry)) in group.iter().enumerate() {
                match done.get(i).copied().unwrap_or(StageOutcome::Stayed) {
                    StageOutcome::Staged => {
                        if self.queue_writeback(v, entry) {
                            staged += 1;
                        }
                        continue;
                    }
                    StageOutcome::Pending => {
                        // Reclaim in flight: the page is Leaving until finish_stage.
                        self.mem.leaving += 1;
                        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                            space.counters.evictions += 1;
                            space.set(
                                v.addr,
                                PageState::Leaving {
                                    frame: v.frame,
                                    entry,
                                    waiters: 0,
                                },
                            );
                        }
                        MmStats::bump(&core.stats.counters.evicted);
                        staged += 1;
                        continue;
                    }
                    StageOutcome::Stayed => {}
                }
                MmStats::bump(&core.stats.counters.evict_pinned);
                let _ = self.mem.swap.free(entry);
                if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                    space.counters.evict_skipped += 1;
                }
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_map(v, &mut view);
            }
        }
        staged
    }

    /// Checks a victim the eviction policy chose and gives it a swap slot: evicted
    /// already (clean or sampled: `Done(true)`), skipped (`Done(false)`), or to be staged.
    fn prepare_victim(&mut self, v: MappedPage) -> Victim {
        let core = self.core;
        let c = &core.stats.counters;
        let (ok, out) = match self
            .mem
            .spaces
            .get(&v.pid)
            .and_then(|s| s.pages.get(&v.addr))
        {
            Some(PageState::Resident(f)) if *f == v.frame => (true, false),
            // Out for sampling and not accessed since: already in its slot.
            Some(PageState::Sampled(f)) if *f == v.frame => (true, true),
            _ => (false, false),
        };
        let pinned = self
            .mem
            .spaces
            .get(&v.pid)
            .is_some_and(|s| s.is_pinned(v.addr));
        if !ok || pinned {
            if ok {
                MmStats::bump(&c.evict_pinned);
                if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                    space.counters.evict_skipped += 1;
                }
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_map(v, &mut view);
            }
            return Victim::Done(false);
        }
        if let Some(done) = self.evict_clean(v, out) {
            return Victim::Done(done);
        }
        let entry = match self.mem.swap.alloc() {
            Ok(e) => e,
            Err(_) => {
                let mut view = MemView {
                    pool: &core.pool,
                    mem: self.mem,
                };
                self.evict.on_map(v, &mut view);
                return Victim::Done(false);
            }
        };
        if out {
            MmStats::bump(&c.sampled_evictions);
            return Victim::Done(self.queue_writeback(v, entry));
        }
        Victim::Stage(v, entry)
    }

    /// An asynchronous stage finished with the page out and its content in the frame's
    /// slot (Staging): queue its write-back.
    fn leave(&mut self, v: MappedPage, entry: SwapEntry) {
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            // queue_writeback counts the eviction again.
            space.counters.evictions = space.counters.evictions.saturating_sub(1);
        }
        // Not queued: the page was put back in place (resident) and nothing is lost.
        self.queue_writeback(v, entry);
    }

    /// An asynchronous stage finished with the page still in its address space: it is
    /// resident again.
    fn stay(&mut self, v: MappedPage, entry: SwapEntry) {
        let _ = self.mem.swap.free(entry);
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            space.counters.evictions = space.counters.evictions.saturating_sub(1);
            space.counters.evict_skipped += 1;
            space.set(v.addr, PageState::Resident(v.frame));
        }
        MmStats::bump(&self.core.stats.counters.evict_pinned);
        let mut view = MemView {
            pool: &self.core.pool,
            mem: self.mem,
        };
        self.evict.on_map(v, &mut view);
    }

    /// Queues the write-back of victim `v`, already in staging, to `entry`.
    fn queue_writeback(&mut self, v: MappedPage, entry: SwapEntry) -> bool {
        let core = self.core;
        let c = &core.stats.counters;
        let ticket = match crate::sys::io::write_from_slot(
            &mut self.io.engine,
            &core.pool,
            v.frame,
            entry,
        ) {
            Ok(t) => t,
            Err(e) => {
                // Put the page back where it was: nothing is lost.
                if matches!(&e, MmError::Swap(s) if s.is_retryable()) {
                    tracing::debug!(error = %e, "no room for a write-back; page restored");
                } else {
                    tracing::warn!(error = %e, "queueing a write-back failed; page restored");
                }
                let _ = self.mem.swap.free(entry);
                match core
                    .installer_in(self.mem, v.pid)
                    .unstage(&core.pool, v.frame)
                {
                    Ok(true) => {
                        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                            space.set(v.addr, PageState::Resident(v.frame));
                        }
                        let mut view = MemView {
                            pool: &core.pool,
                            mem: self.mem,
                        };
                        self.evict.on_map(v, &mut view);
                    }
                    _ => {
                        // Not now (the address space is changing): the page waits in its
                        // frame's slot like a sampled page; its next access copies it back,
                        // and eviction may take it from there later.
                        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                            space.set(v.addr, PageState::Sampled(v.frame));
                        }
                    }
                }
                return false;
            }
        };
        let Some(key) = self.range_key(v.pid, v.addr) else {
            return false;
        };
        self.io.ops.insert(
            ticket,
            Op::WriteBack {
                key,
                addr: v.addr,
                frame: v.frame,
                entry,
            },
        );
        core.io_in_flight.fetch_add(1, Ordering::AcqRel);
        self.mem.writebacks += 1;
        if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
            space.counters.evictions += 1;
            space.set(
                v.addr,
                PageState::Staging {
                    frame: v.frame,
                    entry,
                    worker: self.worker,
                    write: ticket,
                },
            );
        }
        MmStats::bump(&c.evicted);
        true
    }

    /// A swapped-in page whose copy in swap is still valid: if the installer says it was
    /// not written since, take it out and recycle its frame with no I/O (the entry is
    /// recorded first). `None`: not such a page (or written: its copy is dropped), use
    /// the write-back path. `Some(staged)` otherwise.
    /// `out`: the page is already in its slot (out for sampling).
    fn evict_clean(&mut self, v: MappedPage, out: bool) -> Option<bool> {
        let core = self.core;
        let (entry, hash) = self.mem.spaces.get_mut(&v.pid)?.clean.remove(&v.addr)?;
        // Cheap pre-filter: written since the swap-in (WP_ASYNC + PAGEMAP_SCAN). A page
        // out for sampling has no page-table entry to ask: the hash below decides.
        let installer = core.installer_in(self.mem, v.pid);
        if !out && !matches!(installer.is_written(v.addr), Ok(false)) {
            let _ = self.mem.swap.free(entry);
            return None;
        }
        if out {
            MmStats::bump(&core.stats.counters.sampled_evictions);
        } else if !matches!(installer.stage(&core.pool, v.frame), Ok(true)) {
            MmStats::bump(&core.stats.counters.evict_pinned);
            if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                space.clean.insert(v.addr, (entry, hash));
            }
            let mut view = MemView {
                pool: &core.pool,
                mem: self.mem,
            };
            self.evict.on_map(v, &mut view);
            return Some(false);
        }
        // The page is out of the address space now, so nobody can write it. A write that
        // raced between the scan and the move shows in the content: compare it with the
        // hash taken when the page was read back. Equal: the swap copy is valid.
        if crate::sys::io::hash_slot(&core.pool, v.frame).ok() == Some(hash) {
            if let Some(space) = self.mem.spaces.get_mut(&v.pid) {
                space.counters.evictions += 1;
                space.set(v.addr, PageState::Swapped(entry));
            }
            if let Err(e) = core.pool.release(v.frame) {
                tracing::error!(error = %e, frame = %v.frame, "releasing a clean frame failed");
            }
            MmStats::bump(&core.stats.counters.evicted);
            MmStats::bump(&core.stats.counters.clean_evictions);
            return Some(true);
        }
        // Written in the window: an ordinary write-back to the same slot.
        Some(self.queue_writeback(v, entry))
    }

    /// After a swap-in: keep `entry` as the page's valid copy when the installer tracks
    /// writes to it, else free the slot.
    fn keep_or_free_copy(&mut self, pid: u32, addr: u64, entry: SwapEntry, hash: Option<u128>) {
        let resident = matches!(
            self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)),
            Some(PageState::Resident(_))
        );
        if let Some(hash) = hash
            && resident
            && matches!(
                self.core.installer_in(self.mem, pid).track_clean(addr),
                Ok(true)
            )
            && let Some(space) = self.mem.spaces.get_mut(&pid)
        {
            space.clean.insert(addr, (entry, hash));
            return;
        }
        let _ = self.mem.swap.free(entry);
    }

    fn range_key(&self, pid: u32, addr: u64) -> Option<RangeKey> {
        let space = self.mem.spaces.get(&pid)?;
        let (start, r) = space.range_of(addr)?;
        Some(RangeKey {
            pid,
            start,
            generation: r.generation,
        })
    }

    fn still_owned(&self, key: RangeKey, addr: u64) -> bool {
        self.mem
            .spaces
            .get(&key.pid)
            .and_then(|s| s.generation_at(addr))
            == Some(key.generation)
    }

    /// An access to a page out for sampling: move it back (copy into a fresh frame if the
    /// slot is pinned) and tell the eviction policy it was accessed.
    fn refault_sampled(&mut self, pid: u32, addr: u64, frame: FrameNo, write: bool) -> FaultResult {
        let core = self.core;
        MmStats::bump(&core.stats.counters.sample_refaults);
        let accessed = Access {
            accessed: true,
            written: write,
        };
        let installer = core.installer_in(self.mem, pid);
        if matches!(installer.unstage(&core.pool, frame), Ok(true)) {
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, PageState::Resident(frame));
                // The MOVE dropped the write-protection that told clean from written:
                // re-arm it on a read; a write makes the swap copy stale.
                if space.clean.contains_key(&addr)
                    && (write || !matches!(installer.track_clean(addr), Ok(true)))
                    && let Some((e, _)) = space.clean.remove(&addr)
                {
                    let _ = self.mem.swap.free(e);
                }
            }
            self.evict.on_access(frame, accessed);
            return FaultResult::Resolved(FaultPath::SampleRefault);
        }
        // The slot is pinned (should not happen: no I/O runs on it): copy it into a fresh
        // frame, install that, and free the old one once the new page is in.
        let Some((_, range)) = self.mem.spaces.get(&pid).and_then(|s| s.range_of(addr)) else {
            return FaultResult::Foreign;
        };
        let owner = FrameOwner {
            pid,
            region: range.id,
        };
        let fresh = match core.pool.take(&mut self.io.arena) {
            Ok(Some(n)) => n,
            _ => return FaultResult::NeedMemory,
        };
        if let Err(e) = crate::sys::io::copy_slot(&core.pool, frame, fresh) {
            tracing::error!(error = %e, "copying a sampled page failed");
            self.return_frame(fresh, true);
            return FaultResult::NeedMemory;
        }
        self.install_fresh(pid, addr, &[fresh], owner, false);
        match self
            .mem
            .spaces
            .get_mut(&pid)
            .and_then(|s| s.pages.get(&addr))
        {
            Some(PageState::Resident(_) | PageState::Copied) => {
                self.evict.on_free(frame);
                if let Err(e) = core.pool.release(frame) {
                    tracing::error!(error = %e, %frame, "releasing a sampled frame failed");
                }
                if let Some((e, _)) = self
                    .mem
                    .spaces
                    .get_mut(&pid)
                    .and_then(|s| s.clean.remove(&addr))
                {
                    let _ = self.mem.swap.free(e);
                }
                FaultResult::Resolved(FaultPath::SampleRefault)
            }
            _ => FaultResult::NeedMemory,
        }
    }

    /// After a fault or a completion: below the low watermark, evict up to the high one.
    fn balance(&mut self) {
        let wm = self.core.config.watermarks;
        let free = self.free_total();
        if free >= wm.low || self.core.devices.is_empty() {
            return;
        }
        let want = wm.high.saturating_sub(free + self.mem.writebacks);
        if want > 0 {
            self.run_eviction(VictimRequest::any(want));
        }
    }

    fn queue_read(&mut self, entry: SwapEntry, frame: FrameNo) -> Ticket {
        match crate::sys::io::read_into_slot(&mut self.io.engine, &self.core.pool, frame, entry) {
            Ok(t) => t,
            Err(e) => {
                let t = Ticket(self.io.next_synthetic);
                self.io.next_synthetic += 1;
                let err = match e {
                    MmError::Swap(s) => s,
                    _ => SwapError::BadEntry(entry),
                };
                self.io.refused.push((t, err));
                t
            }
        }
    }

    fn start_swap_in(
        &mut self,
        pid: u32,
        addr: u64,
        entry: SwapEntry,
        frame: FrameNo,
        waiters: u64,
    ) -> Option<Ticket> {
        let key = self.range_key(pid, addr)?;
        let ticket = self.queue_read(entry, frame);
        self.io.ops.insert(
            ticket,
            Op::SwapIn {
                key,
                addr,
                frame,
                entry,
            },
        );
        self.core.io_in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(space) = self.mem.spaces.get_mut(&pid) {
            space.counters.swap_ins += 1;
            space.set(
                addr,
                PageState::SwapIn {
                    frame,
                    entry,
                    worker: self.worker,
                    ticket,
                    waiters,
                },
            );
        }
        MmStats::bump(&self.core.stats.counters.swap_ins);
        Some(ticket)
    }

    /// Prefetch: with `PREFETCH=N` on the page, also read back up to N following swapped
    /// pages of the same range (while frames stay above the low watermark).
    fn prefetch(&mut self, pid: u32, addr: u64) {
        let n = self.view().hint(pid, addr).prefetch.unwrap_or(0) as u64;
        if n == 0 {
            return;
        }
        let Some(bounds) = self.mem.spaces.get(&pid).and_then(|s| s.bounds(addr)) else {
            return;
        };
        for i in 1..=n {
            let a = addr + i * PAGE;
            if a >= bounds.end || !self.io.engine.has_capacity() {
                break;
            }
            if self.free_total() <= self.core.config.watermarks.low {
                break;
            }
            let Some(PageState::Swapped(e)) = self
                .mem
                .spaces
                .get(&pid)
                .and_then(|s| s.pages.get(&a))
                .cloned()
            else {
                continue;
            };
            let Ok(Some(f)) = self.core.pool.take(&mut self.io.arena) else {
                break;
            };
            if self.start_swap_in(pid, a, e, f, 0).is_some() {
                MmStats::bump(&self.core.stats.counters.prefetches);
            } else {
                self.return_frame(f, true);
            }
        }
    }

    /// One completed operation.
    fn complete(&mut self, ticket: Ticket, result: Result<(), SwapError>) {
        let Some(op) = self.io.ops.remove(&ticket) else {
            return;
        };
        self.core.io_in_flight.fetch_sub(1, Ordering::AcqRel);
        let core = self.core;
        let c = &core.stats.counters;
        match op {
            Op::WriteBack {
                key,
                addr,
                frame,
                entry,
            } => {
                self.mem.writebacks = self.mem.writebacks.saturating_sub(1);
                // A frame (or at least progress) for faults waiting on memory elsewhere.
                let waiting = std::mem::take(&mut self.mem.memory_waiters);
                if waiting != 0 {
                    core.wake_mask(waiting, self.worker);
                }
                let _span = tracing::trace_span!("writeback_done", addr, %entry).entered();
                // The same frame may be staging the same page again by now (taken back
                // by a COPY swap-cache hit while this write ran, then evicted again, its
                // write on another worker, whose tickets are numbered independently):
                // only the write the page state names — ticket *and* worker — is ours.
                let ours = self.still_owned(key, addr)
                    && matches!(self.mem.spaces.get(&key.pid).and_then(|s| s.pages.get(&addr)),
                        Some(PageState::Staging { frame: f, write, worker, .. })
                            if *f == frame && *write == ticket && *worker == self.worker);
                match (ours, result) {
                    (true, Ok(())) => {
                        // Record the entry first, then recycle the staging frame.
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.set(addr, PageState::Swapped(entry));
                        }
                        if let Err(e) = core.pool.release(frame) {
                            tracing::error!(error = %e, %frame, "releasing a staging frame failed");
                        }
                        MmStats::bump(&c.writebacks_done);
                    }
                    (true, Err(e)) => {
                        MmStats::bump(&c.writeback_errors);
                        tracing::warn!(error = %e, addr, "write-back failed; page put back in memory");
                        let _ = self.mem.swap.free(entry);
                        match core
                            .installer_in(self.mem, key.pid)
                            .unstage(&core.pool, frame)
                        {
                            Ok(true) => {
                                if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                                    space.set(addr, PageState::Resident(frame));
                                }
                                let mut view = MemView {
                                    pool: &core.pool,
                                    mem: self.mem,
                                };
                                self.evict.on_map(
                                    MappedPage {
                                        frame,
                                        pid: key.pid,
                                        addr,
                                    },
                                    &mut view,
                                );
                            }
                            other => {
                                tracing::error!(?other, %frame, "page of a failed write-back could not be put back; it stays in staging")
                            }
                        }
                    }
                    (false, _) => {
                        // Taken back by a fault (MOVE or copy) or its range is gone.
                        if !self.still_owned(key, addr) {
                            MmStats::bump(&c.fenced);
                        }
                        let _ = self.mem.swap.free(entry);
                        if self.mem.orphans.remove(&frame) {
                            if let Err(e) = core.pool.release(frame) {
                                tracing::error!(error = %e, %frame, "releasing an orphan staging frame failed");
                            }
                        }
                    }
                }
            }
            Op::SwapIn {
                key,
                addr,
                frame,
                entry,
            } => {
                let _span = tracing::trace_span!("swap_in_done", addr, %entry).entered();
                let waiters = match self
                    .mem
                    .spaces
                    .get(&key.pid)
                    .and_then(|s| s.pages.get(&addr))
                {
                    Some(PageState::SwapIn {
                        frame: f, waiters, ..
                    }) if *f == frame && self.still_owned(key, addr) => Some(*waiters),
                    _ => None,
                };
                let Some(waiters) = waiters else {
                    MmStats::bump(&c.fenced);
                    self.return_frame(frame, false);
                    let _ = self.mem.swap.free(entry);
                    return;
                };
                match result {
                    Ok(()) => {
                        // Hash the content read back (while we still own the slot): a
                        // later eviction compares against it to skip the write.
                        let hash = if self.mem.spaces.contains_key(&key.pid)
                            && core.config.clean_eviction
                        {
                            crate::sys::io::hash_slot(&core.pool, frame).ok()
                        } else {
                            None
                        };
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.clear(addr);
                        }
                        let region = self
                            .mem
                            .spaces
                            .get(&key.pid)
                            .and_then(|s| s.range_of(addr))
                            .map_or(0, |(_, r)| r.id);
                        self.install_fresh(
                            key.pid,
                            addr,
                            &[frame],
                            FrameOwner {
                                pid: key.pid,
                                region,
                            },
                            false,
                        );
                        let installed = matches!(
                            self.mem
                                .spaces
                                .get(&key.pid)
                                .and_then(|s| s.pages.get(&addr)),
                            Some(PageState::Resident(_) | PageState::Copied)
                        );
                        if !installed {
                            // Not installed (the address space is changing: a `mremap` or
                            // `munmap` event waits for its reader; daemon mode): the content
                            // stays in swap, and the waiters fault again once the event is
                            // applied. Never lose it, never leave the page vacant.
                            if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                                space.set(addr, PageState::Swapped(entry));
                            }
                            core.wake_mask(waiters, self.worker);
                            return;
                        }
                        self.keep_or_free_copy(key.pid, addr, entry, hash);
                        MmStats::bump(&c.swap_ins_done);
                    }
                    Err(e) if e.is_retryable() => {
                        let t = self.queue_read(entry, frame);
                        self.io.ops.insert(t, op);
                        core.io_in_flight.fetch_add(1, Ordering::AcqRel);
                        if let Some(PageState::SwapIn { ticket, .. }) = self
                            .mem
                            .spaces
                            .get_mut(&key.pid)
                            .and_then(|s| s.pages.get_mut(&addr))
                        {
                            *ticket = t;
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, addr, %entry, "swap-in failed: content lost, page poisoned (SIGBUS on access, never zeros)");
                        MmStats::bump(&c.poisoned);
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.clear(addr);
                        }
                        if let Err(pe) = core
                            .installer_in(self.mem, key.pid)
                            .poison(&core.pool, addr)
                        {
                            tracing::error!(error = %pe, addr, "poisoning failed");
                        }
                        if let Some(space) = self.mem.spaces.get_mut(&key.pid) {
                            space.set(addr, PageState::Poisoned);
                        }
                        self.return_frame(frame, false);
                        let _ = self.mem.swap.free(entry);
                    }
                }
                core.wake_mask(waiters, self.worker);
            }
        }
    }
}

/// Takes the allocation policy serving `addr` out of `space` for one call: the range's
/// own, or the space's ([`crate::SpacePolicy`]). Returns its spec, the policy and whether
/// it is the space's. `None`: no range there, or the policy is being called.
fn take_alloc(space: &mut Space, addr: u64) -> Option<(String, Box<dyn AllocPolicy>, bool)> {
    let (_, range) = space.range_of_mut(addr)?;
    if let Some(p) = range.alloc.take() {
        return Some((range.alloc_spec.clone(), p, false));
    }
    let shared = space.alloc.as_mut()?;
    let p = shared.policy.take()?;
    Some((shared.spec.clone(), p, true))
}

/// Puts back what [`take_alloc`] took (the range may be gone meanwhile: then a range's
/// policy is dropped with it).
fn put_alloc(space: &mut Space, addr: u64, policy: Box<dyn AllocPolicy>, space_level: bool) {
    if space_level {
        if let Some(shared) = space.alloc.as_mut() {
            shared.policy = Some(policy);
        }
    } else if let Some((_, range)) = space.range_of_mut(addr) {
        range.alloc = Some(policy);
    }
}

/// What [`WorkerCx::prepare_victim`] made of a victim.
enum Victim {
    /// Evicted (`true`) or skipped (`false`) already.
    Done(bool),
    /// To be taken out of its address space, then written to this entry.
    Stage(MappedPage, SwapEntry),
}

/// Placeholder while the OOM policy is being called (never called itself).
struct NoOom;

impl OomPolicy for NoOom {
    fn name(&self) -> &str {
        "none"
    }
    fn on_oom(&mut self, _: &OomSituation, _: &mut dyn Cx) -> OomAction {
        OomAction::FailAccess(usm_policies::OomReason::Policy("re-entered".into()))
    }
}

impl EvictCx for WorkerCx<'_> {
    fn access(&mut self, frame: FrameNo) -> Access {
        self.view().access(frame)
    }
    fn is_pinned(&self, frame: FrameNo) -> bool {
        self.view().is_pinned(frame)
    }
    fn hint(&self, pid: u32, addr: u64) -> Hint {
        self.view().hint(pid, addr)
    }
}

impl Cx for WorkerCx<'_> {
    fn take_frame(&mut self) -> Option<FrameNo> {
        match self.core.pool.take(&mut self.io.arena) {
            Ok(Some(f)) => {
                self.taken.push(f);
                Some(f)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "taking a frame failed");
                None
            }
        }
    }

    /// `n` frames for consecutive pages. Each power-of-two piece of `n` (largest first,
    /// at most `2^MAX_ORDER`) is asked of the pool as one naturally aligned run of
    /// consecutive slots ([`FramePool::take_run`]), so installing it is one `UFFDIO_MOVE`;
    /// what no run can serve comes one frame at a time from the lArena.
    fn take_frames(&mut self, n: usize, out: &mut Vec<FrameNo>) -> bool {
        let mark = out.len();
        let mut rest = n;
        while rest > 1 {
            let order = (usize::BITS - 1 - rest.leading_zeros()).min(MAX_ORDER);
            match self.core.pool.take_run(&mut self.io.arena, order) {
                Ok(Some(first)) => {
                    let run = (first.0..first.0 + (1 << order)).map(FrameNo);
                    self.taken.extend(run.clone());
                    out.extend(run);
                    rest -= 1 << order;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, order, "taking a run of frames failed");
                    break;
                }
            }
        }
        for _ in 0..rest {
            match self.take_frame() {
                Some(f) => out.push(f),
                None => {
                    for f in out.drain(mark..) {
                        self.give_frame(f);
                    }
                    return false;
                }
            }
        }
        true
    }

    fn give_frame(&mut self, frame: FrameNo) {
        if let Some(i) = self.staged.iter().position(|s| s.0 == frame) {
            let (_, pid, addr, prior) = self.staged.swap_remove(i);
            tracing::error!(%frame, "policy gave back a staged frame; it stays in staging");
            if let Some(space) = self.mem.spaces.get_mut(&pid) {
                space.set(addr, prior);
            }
            return;
        }
        if let Some(i) = self.taken.iter().position(|&t| t == frame) {
            self.taken.swap_remove(i);
            self.return_frame(frame, true);
        }
    }

    fn free_frames(&self) -> usize {
        self.free_total()
    }

    fn watermarks(&self) -> Watermarks {
        self.core.config.watermarks
    }

    fn region(&self, pid: u32, addr: u64) -> Option<Range<u64>> {
        self.mem.spaces.get(&pid)?.bounds(addr)
    }

    fn vacant(&self, pid: u32, start: u64, npages: usize, out: &mut PageMask) {
        out.clear();
        let Some(space) = self.mem.spaces.get(&pid) else {
            return;
        };
        for i in 0..npages.min(PageMask::CAPACITY) {
            let a = start + i as u64 * PAGE;
            if space.range_of(a).is_some() && !space.pages.contains_key(&a) {
                out.set(i);
            }
        }
    }

    fn take_staged(&mut self, pid: u32, addr: u64) -> Option<FrameNo> {
        let addr = page_floor(addr);
        let space = self.mem.spaces.get_mut(&pid)?;
        let Some(PageState::Staging { frame, .. }) = space.pages.get(&addr).cloned() else {
            return None;
        };
        let prior = space.clear(addr)?;
        self.staged.push((frame, pid, addr, prior));
        Some(frame)
    }

    fn swap_entry(&self, pid: u32, addr: u64) -> Option<SwapEntry> {
        match self.mem.spaces.get(&pid)?.pages.get(&page_floor(addr))? {
            PageState::Swapped(e) => Some(*e),
            _ => None,
        }
    }

    fn swap_in(&mut self, pid: u32, addr: u64, entry: SwapEntry, frame: FrameNo) -> Ticket {
        let addr = page_floor(addr);
        let _span = tracing::trace_span!("swap_in", addr, %entry).entered();
        if let Some(i) = self.taken.iter().position(|&t| t == frame) {
            self.taken.swap_remove(i);
        }
        let ok = matches!(self.mem.spaces.get(&pid).and_then(|s| s.pages.get(&addr)), Some(PageState::Swapped(e)) if *e == entry);
        if !ok || self.core.pool.desc(frame).map(|d| d.state()).ok() != Some(FrameState::Taken) {
            tracing::error!(addr, %entry, %frame, "swap_in of a page that is not swapped to that entry");
            self.return_frame(frame, true);
            let t = Ticket(self.io.next_synthetic);
            self.io.next_synthetic += 1;
            return t;
        }
        let ticket = match self.start_swap_in(pid, addr, entry, frame, 1 << self.worker) {
            Some(t) => t,
            None => {
                self.return_frame(frame, true);
                Ticket(0)
            }
        };
        self.prefetch(pid, addr);
        ticket
    }

    fn counters(&self, pid: u32) -> ProcessCounters {
        self.mem
            .spaces
            .get(&pid)
            .map_or(ProcessCounters::default(), |s| ProcessCounters {
                resident: s.counters.resident,
                swapped: s.counters.swapped,
                faults: s.counters.faults,
            })
    }

    fn evict(&mut self, req: VictimRequest) -> usize {
        self.run_eviction(req).chosen
    }
}

/// Start time of a fault, for the latency histograms.
#[derive(Debug, Clone, Copy)]
pub struct FaultClock(Instant);

impl FaultClock {
    /// Now.
    pub fn start() -> FaultClock {
        FaultClock(Instant::now())
    }
    /// Records the time since [`FaultClock::start`] under `path`.
    pub fn record(self, stats: &MmStats, path: FaultPath) {
        stats.record(path, self.0.elapsed());
    }
}
