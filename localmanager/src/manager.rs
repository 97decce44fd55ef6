//! One LocalManager: the per-core scheduler loop.
//!
//! # Shared part ([`ManagerShared`], read and written by every core)
//! - `idq`: ready uThreads (bit = slot); set by anyone, claimed by the owner or a thief.
//! - `pfq`: uThreads parked inside the fault handler; set by the owner (in the handler),
//!   cleared by whoever resumes the fault (PFQ → IDQ).
//! - `slots`: per slot, the uThread's [`Entry`] (present unless the uThread is running or in
//!   transit) and its fault payload.
//! - `park`: the park word (see [`crate::park`]) and the eventfd waker.
//! - `freed`: slots that thieves took uThreads out of; recycled by the owner.
//!
//! # Private part ([`LocalManager`], owned by the worker thread)
//! Slot allocation (`bitvec`), the stack pool, the round-robin cursor, the driver. The
//! [`WorkerLocal`] (spawn queue, timers, current uThread) is reachable from uThreads running
//! on this worker through the worker context pointer.
//!
//! # A round
//! 1. Driver poll, expired timers, admit spawned uThreads (local queue, then injector).
//! 2. Run up to `round_budget` ready uThreads, each found by a rotating find-first-set from
//!    the cursor just past the last one run (fair: a ready uThread waits at most one full
//!    rotation of the IDQ).
//! 3. Nothing ran: try to steal from a busy worker; otherwise go idle (spin in busy-poll
//!    mode; in eventfd mode spin up to the adaptive spin budget, then park on the eventfd +
//!    driver fds until the next timer, through the `handoff::idle_step` protocol). Before
//!    that, stale IDQ summary hints are scrubbed so `has_work` cannot report phantom work.
//!
//! # Running one uThread ([`LocalManager::run_slot`])
//! claim IDQ bit → take entry → state `RUNNING` → resume → put entry back → by reason:
//! `Yield` requeues it (IDQ bit set and the next ready uThread claimed in one CAS when they
//! share a leaf: [`crate::bitfield::AtomicBitfield::requeue_and_take_next`]; with nobody
//! else ready it simply runs again); `Park` moves to `IDLE` (or re-queues on a token); `Fault`
//! leaves it in PFQ (set by the handler); `Preempted` sets the IDQ bit; `Finished` frees the
//! slot and recycles the stack. The entry always goes back *before* the uThread can be seen
//! ready, so a thief that claims the bit finds it (or, in the fault path's window, finds the
//! slot empty and puts the bit back).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use bitvec::vec::BitVec;
use crossbeam_deque::Steal;
use crossbeam_utils::CachePadded;
use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_fibers::{Fiber, Outcome, StackPool, Suspend};
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use crate::SchedError;
use crate::bitfield::{AtomicBitfield, CHUNK_BITS, MAX_CAPACITY, MAX_CHUNKS};
use crate::counters::{Counters, bump_owned};
use crate::driver::{Driver, DriverContext};

/// Within a round, the driver is polled at most this often (after a fault, or while it
/// has work in flight).
const DRIVER_POLL_INTERVAL: Duration = Duration::from_micros(100);
/// Without a fault, whether the driver is due is checked every this many runs (it reads
/// the clock).
const DRIVER_CHECK_EVERY: usize = 4;
/// Iterations of one busy-poll idle spin before the worker runs a full round again.
const BUSY_POLL_SPINS: u32 = 1024;
/// The busy-poll spin reads the clock (for `idle_ns`) every this many iterations.
const IDLE_CLOCK_EVERY: u32 = 64;
use crate::park::ParkState;
use crate::runtime::{Phase, RuntimeShared, WakerMode};
use crate::signal::{FaultKey, FaultedUThread};
use crate::sys::{AtomicBox, OnceBox, current};
use crate::task::{Entry, Task};

/// Per-slot shared data.
pub(crate) struct SlotMeta {
    pub(crate) entry: AtomicBox<Entry>,
    pub(crate) payload: AtomicU64,
    /// Fault generation of the slot: odd while its uThread is parked in PFQ (the value is
    /// the [`FaultKey::generation`] of that fault), even otherwise. Only ever incremented
    /// (never reset when the slot is reused), so a key of an earlier fault or an earlier
    /// occupant never matches again. See [`crate::signal`].
    pub(crate) fault_seq: AtomicU64,
}

impl SlotMeta {
    /// The key of the fault this slot is parked on now, with the payload recorded for it;
    /// `None` when it is not parked (or is between its PFQ bit and its generation being
    /// published: listed again on the next look).
    pub(crate) fn parked_fault(&self, worker: usize, slot: usize) -> Option<FaultedUThread> {
        let generation = self.fault_seq.load(Ordering::Acquire);
        if generation & 1 == 0 {
            return None;
        }
        let payload = self.payload.load(Ordering::Acquire);
        // The payload belongs to this fault only if no resume + new fault came in between.
        (self.fault_seq.load(Ordering::Acquire) == generation).then_some(FaultedUThread {
            key: FaultKey {
                worker,
                slot: slot as u32,
                generation,
            },
            payload,
        })
    }
}

/// Slot storage growing chunk by chunk like the bitfields.
pub(crate) struct SlotTable {
    chunks: Box<[OnceBox<Box<[SlotMeta]>>]>,
}

impl SlotTable {
    fn new() -> Self {
        Self {
            chunks: (0..MAX_CHUNKS).map(|_| OnceBox::new()).collect(),
        }
    }

    fn grow_to(&self, capacity: usize) {
        for chunk in &self.chunks[..capacity.div_ceil(CHUNK_BITS).min(MAX_CHUNKS)] {
            chunk.get_or_init(|| {
                (0..CHUNK_BITS)
                    .map(|_| SlotMeta {
                        entry: AtomicBox::empty(),
                        payload: AtomicU64::new(0),
                        fault_seq: AtomicU64::new(0),
                    })
                    .collect()
            });
        }
    }

    pub(crate) fn get(&self, slot: usize) -> Option<&SlotMeta> {
        self.chunks
            .get(slot / CHUNK_BITS)?
            .get()
            .map(|chunk| &chunk[slot % CHUNK_BITS])
    }
}

/// The part of a LocalManager other cores touch.
pub(crate) struct ManagerShared {
    pub(crate) index: usize,
    pub(crate) idq: AtomicBitfield,
    pub(crate) pfq: AtomicBitfield,
    pub(crate) slots: SlotTable,
    pub(crate) park: CachePadded<ParkState>,
    wake_fd: Option<EventFd>,
    mode: WakerMode,
    /// Running a uThread right now (steal heuristic).
    pub(crate) running: CachePadded<AtomicBool>,
    /// Idle with no timers or driver work pending (shutdown quiescence).
    pub(crate) quiescent: AtomicBool,
    /// uThreads of this worker parked inside a signal handler (maintained by the owner).
    pub(crate) in_handler: AtomicUsize,
    /// Live entries held by this worker (maintained by the owner).
    pub(crate) live: AtomicUsize,
    freed: Mutex<Vec<u32>>,
    /// Set when `freed` may be non-empty, so the owner locks it only then.
    has_freed: AtomicBool,
    /// The worker's pthread id (for the preemption ticker), 0 until started.
    pub(crate) thread: AtomicU64,
    /// uThreads spawned onto this worker from elsewhere (`spawn_on`).
    pub(crate) inbox: crossbeam_deque::Injector<Box<Entry>>,
    pub(crate) counters: CachePadded<Counters>,
}

impl ManagerShared {
    pub(crate) fn new(index: usize, mode: WakerMode, capacity: usize) -> Result<Self, SchedError> {
        let wake_fd = match mode {
            WakerMode::BusyPoll => None,
            WakerMode::EventFd => Some(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .map_err(SchedError::EventFd)?,
            ),
        };
        let idq = AtomicBitfield::with_capacity(capacity);
        let pfq = AtomicBitfield::with_capacity(capacity);
        let slots = SlotTable::new();
        slots.grow_to(idq.capacity());
        Ok(Self {
            index,
            idq,
            pfq,
            slots,
            park: CachePadded::new(ParkState::new()),
            wake_fd,
            mode,
            running: CachePadded::new(AtomicBool::new(false)),
            quiescent: AtomicBool::new(false),
            in_handler: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            freed: Mutex::new(Vec::new()),
            has_freed: AtomicBool::new(false),
            thread: AtomicU64::new(0),
            inbox: crossbeam_deque::Injector::new(),
            counters: CachePadded::new(Counters::default()),
        })
    }

    /// Wakes the worker if it is parked (or about to park). Skipped in busy-poll mode.
    pub(crate) fn wake(&self) {
        if self.mode == WakerMode::BusyPoll {
            return;
        }
        if self.park.notify() {
            self.signal();
        }
    }

    /// Signals the waker of a worker whose park word said `PARKED`.
    pub(crate) fn signal(&self) {
        if let Some(fd) = &self.wake_fd {
            // EAGAIN means the counter is saturated: the worker is being woken anyway.
            let _ = fd.write(1);
        }
    }

    /// Appends the uThreads parked on a fault with their payloads.
    pub(crate) fn faulted(&self, out: &mut Vec<FaultedUThread>) {
        let mut slots = Vec::new();
        self.pfq.collect_into(&mut slots);
        for slot in slots {
            if let Some(fault) = self
                .slots
                .get(slot)
                .and_then(|meta| meta.parked_fault(self.index, slot))
            {
                out.push(fault);
            }
        }
    }
}

/// A timer: unpark `task` at `deadline`.
pub(crate) struct TimerEntry {
    pub(crate) deadline: Instant,
    pub(crate) seq: u64,
    pub(crate) task: Arc<Task>,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// Worker state reachable from uThreads on this worker (and, for the fault primitive, from
/// signal context: only `current_task`, `current_slot` and `manager` are read there).
pub(crate) struct WorkerLocal {
    pub(crate) index: usize,
    pub(crate) rt: Arc<RuntimeShared>,
    pub(crate) current_task: Cell<*const Task>,
    pub(crate) current_slot: Cell<u32>,
    /// Boxed because the box itself moves on into the slot table (`AtomicBox`) unchanged.
    #[allow(clippy::vec_box)]
    pub(crate) spawns: RefCell<Vec<Box<Entry>>>,
    pub(crate) timers: RefCell<BinaryHeap<Reverse<TimerEntry>>>,
    pub(crate) timer_seq: Cell<u64>,
    /// Set while the worker drops unfinished uThreads (their join handles say Cancelled).
    pub(crate) cancelling: Cell<bool>,
    /// Set by the preemption handler when the running uThread overran its quantum outside a
    /// safe point: it yields at its next runtime call.
    pub(crate) preempt_pending: AtomicBool,
    /// Preemption is enabled for this runtime.
    pub(crate) preemption: bool,
}

impl WorkerLocal {
    pub(crate) fn manager(&self) -> &ManagerShared {
        &self.rt.managers[self.index]
    }

    pub(crate) fn add_timer(&self, deadline: Instant, task: Arc<Task>) {
        let _no_preempt = crate::NoPreempt::enter();
        let seq = self.timer_seq.get();
        self.timer_seq.set(seq + 1);
        self.timers.borrow_mut().push(Reverse(TimerEntry {
            deadline,
            seq,
            task,
        }));
    }
}

/// Tunables of a LocalManager (copied from the runtime builder).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ManagerConfig {
    pub(crate) round_budget: usize,
    pub(crate) injector_batch: usize,
    pub(crate) steal_batch: usize,
    pub(crate) spin_before_park: Duration,
}

/// How [`LocalManager::run_slot`] left the uThread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ran {
    /// Yielded: still claimed by the worker, to be requeued.
    Yielded,
    /// Suspended on a page fault (it is in PFQ now).
    Faulted,
    /// Parked, preempted, finished, or not run.
    Other,
}

/// The worker-owned scheduler.
pub(crate) struct LocalManager<'a> {
    local: &'a WorkerLocal,
    shared: &'a ManagerShared,
    rt: &'a RuntimeShared,
    ids: BitVec,
    id_hint: usize,
    pool: StackPool,
    cursor: usize,
    driver: Option<Box<dyn Driver>>,
    config: ManagerConfig,
    steal_cursor: usize,
    last_sibling_wake: Instant,
    /// When the driver was last polled from within a round (`run_ready`).
    last_driver_poll: Instant,
    /// How long to spin before blocking, adapted to recent wake-ups.
    spin: AdaptiveSpin,
}

/// The spin-before-park budget of an idle worker in eventfd mode (the idea of the
/// guest-side `haltpoll` cpuidle driver and of Shenango/Caladan's spinning cores): spin up to
/// `max` looking for work before blocking, because a wake-up that finds the worker still
/// running costs a cache-line transfer while one that finds it blocked costs a kernel
/// wake-up and, on a loaded machine, a wait for the CPU (figures in
/// `bench/results/sched.md`).
/// Each spin that found work (a *hit*) doubles the budget up to `max`; each spin that ran
/// out (a *miss*: the wait was longer, the spin was wasted) halves it, and at `max / 16`
/// spinning stops; every [`AdaptiveSpin::PROBE_EVERY`]-th park then probes again with
/// `max / 4`. So a worker whose wake-ups come in bursts spins, and one that sleeps for long
/// stretches soon stops burning its core.
#[derive(Debug)]
struct AdaptiveSpin {
    current: Duration,
    parks_since_spin: u32,
}

impl AdaptiveSpin {
    const PROBE_EVERY: u32 = 16;

    fn new(max: Duration) -> Self {
        Self {
            current: max,
            parks_since_spin: 0,
        }
    }

    fn budget(&mut self, max: Duration) -> Duration {
        if self.current.is_zero() && !max.is_zero() {
            self.parks_since_spin += 1;
            if self.parks_since_spin >= Self::PROBE_EVERY {
                self.parks_since_spin = 0;
                self.current = max / 4;
            }
        }
        self.current.min(max)
    }

    fn hit(&mut self, max: Duration) {
        self.current = (self.current * 2).min(max);
    }

    fn miss(&mut self, max: Duration) {
        self.current /= 2;
        if self.current <= max / 16 {
            self.current = Duration::ZERO;
        }
    }
}

impl<'a> LocalManager<'a> {
    pub(crate) fn new(
        local: &'a WorkerLocal,
        pool: StackPool,
        driver: Option<Box<dyn Driver>>,
        config: ManagerConfig,
    ) -> Self {
        let shared = local.manager();
        let capacity = shared.idq.capacity();
        Self {
            local,
            shared,
            rt: &local.rt,
            ids: BitVec::repeat(false, capacity),
            id_hint: 0,
            pool,
            cursor: 0,
            driver,
            config,
            steal_cursor: local.index + 1,
            last_sibling_wake: Instant::now(),
            last_driver_poll: Instant::now(),
            spin: AdaptiveSpin::new(config.spin_before_park),
        }
    }

    /// The worker loop; returns when the runtime stops.
    pub(crate) fn run(&mut self) {
        loop {
            bump_owned(&self.shared.counters.rounds, 1);
            let mut progress = self.poll_driver();
            progress += self.fire_timers();
            progress += self.admit_spawns();
            self.share_surplus();
            progress += self.run_ready();
            if progress > 0 {
                continue;
            }
            if self.steal() > 0 {
                continue;
            }
            if self.rt.phase() != Phase::Exiting
                && self.driver.as_mut().is_some_and(|d| d.idle_work() > 0)
            {
                continue;
            }
            match self.rt.phase() {
                Phase::Running | Phase::Draining => {}
                Phase::Cancelling => {
                    if self.cancel_idle() > 0 {
                        continue;
                    }
                }
                Phase::Exiting => {
                    self.exit();
                    return;
                }
            }
            self.idle();
        }
    }

    /// With more than one ready uThread and a parked sibling, wakes that sibling so it can
    /// steal (at most every 100 µs, so pinned-only workloads do not pay a wake per round).
    fn share_surplus(&mut self) {
        if self.config.steal_batch == 0 || self.rt.managers.len() < 2 {
            return;
        }
        let Some(first) = self.shared.idq.find_next(self.cursor) else {
            return;
        };
        if self.shared.idq.find_next(first + 1) == Some(first) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last_sibling_wake) < Duration::from_micros(100) {
            return;
        }
        if let Some(sibling) = self
            .rt
            .managers
            .iter()
            .find(|m| m.index != self.local.index && m.park.is_parked())
        {
            self.last_sibling_wake = now;
            sibling.wake();
        }
    }

    fn poll_driver(&mut self) -> usize {
        let Some(driver) = self.driver.as_mut() else {
            return 0;
        };
        let mut cx = DriverContext {
            worker: self.local.index,
            manager: self.shared,
            rt: self.rt,
        };
        driver.poll(&mut cx)
    }

    fn fire_timers(&mut self) -> usize {
        if self.local.timers.borrow().is_empty() {
            // No clock read: this runs on the wake-up path of every idle worker.
            return 0;
        }
        let mut fired = 0;
        let now = Instant::now();
        loop {
            let due = {
                let mut timers = self.local.timers.borrow_mut();
                match timers.peek() {
                    Some(Reverse(t)) if t.deadline <= now => timers.pop(),
                    _ => None,
                }
            };
            let Some(Reverse(timer)) = due else { break };
            timer.task.unpark();
            fired += 1;
        }
        fired
    }

    fn next_timer(&self) -> Option<Instant> {
        self.local
            .timers
            .borrow()
            .peek()
            .map(|Reverse(t)| t.deadline)
    }

    /// Admits uThreads spawned on this worker and a batch from the injector.
    fn admit_spawns(&mut self) -> usize {
        let mut admitted = self.admit_local_spawns();
        // `is_empty` first: it is two plain loads, while `steal` on an empty injector also
        // issues a SeqCst fence, and this runs on every idle worker's wake-up path.
        if !self.shared.inbox.is_empty() {
            while let Steal::Success(entry) = self.shared.inbox.steal() {
                self.adopt(entry, true);
                admitted += 1;
            }
        }
        if self.rt.injector.is_empty() {
            return admitted;
        }
        for _ in 0..self.config.injector_batch {
            match self.rt.injector.steal() {
                Steal::Success(entry) => {
                    self.adopt(entry, true);
                    admitted += 1;
                }
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        }
        admitted
    }

    fn admit_local_spawns(&mut self) -> usize {
        if self.local.spawns.borrow().is_empty() {
            return 0;
        }
        let spawns = std::mem::take(&mut *self.local.spawns.borrow_mut());
        let n = spawns.len();
        for entry in spawns {
            self.adopt(entry, true);
        }
        n
    }

    fn alloc_slot(&mut self) -> Option<usize> {
        if self.shared.has_freed.load(Ordering::Acquire) {
            self.shared.has_freed.store(false, Ordering::Release);
            let mut freed = crate::sync::lock(&self.shared.freed);
            for slot in freed.drain(..) {
                self.ids.set(slot as usize, false);
            }
        }
        if let Some(found) = self.ids[self.id_hint..].first_zero() {
            let slot = self.id_hint + found;
            self.ids.set(slot, true);
            self.id_hint = slot + 1;
            return Some(slot);
        }
        if let Some(slot) = self.ids.first_zero() {
            self.ids.set(slot, true);
            self.id_hint = slot + 1;
            return Some(slot);
        }
        let old = self.ids.len();
        if old >= MAX_CAPACITY {
            return None;
        }
        let new = self.shared.idq.grow_to(old + CHUNK_BITS);
        self.shared.pfq.grow_to(new);
        self.shared.slots.grow_to(new);
        self.ids.resize(new, false);
        self.ids.set(old, true);
        self.id_hint = old + 1;
        Some(old)
    }

    fn free_slot(&mut self, slot: usize) {
        self.ids.set(slot, false);
        if slot < self.id_hint {
            self.id_hint = slot;
        }
    }

    /// Gives `entry` a slot here and makes it ready. `fresh`: newly spawned (counted).
    fn adopt(&mut self, entry: Box<Entry>, fresh: bool) {
        let Some(slot) = self.alloc_slot() else {
            // Full (262 144 uThreads on one worker): hand it back to the injector so another
            // worker takes it, and make sure one is awake.
            self.rt.injector.push(entry);
            self.rt.wake_one();
            return;
        };
        entry.task.owner.store(self.local.index, Ordering::Release);
        entry.task.slot.store(slot as u32, Ordering::Release);
        if let Some(meta) = self.shared.slots.get(slot) {
            meta.entry.put(entry);
        }
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        if fresh {
            bump_owned(&self.shared.counters.spawned, 1);
        }
        self.shared.idq.set(slot);
    }

    fn run_ready(&mut self) -> usize {
        let mut ran = 0;
        // The next slot, already claimed by the previous uThread's yield.
        let mut claimed = None;
        while ran < self.config.round_budget {
            let Some(slot) = claimed
                .take()
                .or_else(|| self.shared.idq.take_next(self.cursor))
            else {
                break;
            };
            self.cursor = slot + 1;
            let suspended = self.run_slot(slot);
            let faulted = suspended == Ran::Faulted;
            ran += 1;
            // A fault is served within the round, not after it: the driver maps the page
            // (the uThread is ready again this round) or queues its swap-in, so the I/O
            // starts while the other uThreads run; while the driver has work in flight it is
            // polled between runs too. Both at most every `DRIVER_POLL_INTERVAL`, so a burst
            // of faults is still served in one batch (one io_uring enter). Measured in the
            // swap storm: with CPU uThreads that run 50 µs between yields, polling only
            // between rounds delayed swap-ins by ~10 ms and starved the memory uThreads.
            if (faulted || ran % DRIVER_CHECK_EVERY == 0) && self.driver_due(faulted) {
                self.last_driver_poll = Instant::now();
                self.poll_driver();
            }
            self.admit_local_spawns();
            if suspended == Ran::Yielded {
                // Back to the ready set and the next one claimed in one step (one CAS when
                // both share a leaf; nothing written at all when it is the only one ready).
                if ran < self.config.round_budget {
                    claimed = self.shared.idq.requeue_and_take_next(slot);
                } else {
                    self.shared.idq.set(slot);
                }
            }
        }
        ran
    }

    /// The driver should be polled within the round: it has work (a fresh fault, or I/O in
    /// flight) and was not polled in the last `DRIVER_POLL_INTERVAL`.
    fn driver_due(&self, faulted: bool) -> bool {
        let Some(driver) = self.driver.as_ref() else {
            return false;
        };
        (faulted || driver.has_pending()) && self.last_driver_poll.elapsed() >= DRIVER_POLL_INTERVAL
    }

    /// Runs one claimed uThread until it suspends or finishes. After [`Ran::Yielded`] the
    /// caller still holds the claim: the uThread's entry is back in its slot but its IDQ bit
    /// is not set yet (the caller requeues it).
    fn run_slot(&mut self, slot: usize) -> Ran {
        let Some(meta) = self.shared.slots.get(slot) else {
            return Ran::Other;
        };
        let Some(mut entry) = meta.entry.take() else {
            // Not possible for the owner (it puts entries back before looking again), but be
            // conservative: leave the bit set for whoever holds it.
            self.shared.idq.set(slot);
            return Ran::Other;
        };
        if entry.task.claim_running() && entry.fiber.is_some() {
            // Made ready by an unpark or a PFQ resume (counted here, by the owner, so
            // wakers never write this worker's counters line).
            bump_owned(&self.shared.counters.wakes, 1);
        }
        if entry.fiber.is_none() {
            let Some(body) = entry.body.take() else {
                self.finish(slot, entry, false);
                return Ran::Other;
            };
            match Fiber::new(&mut self.pool, body) {
                Ok(fiber) => entry.fiber = Some(fiber),
                Err(error) => {
                    // No stack: the closure (and its join state) is dropped, the join handle
                    // reports Cancelled.
                    tracing::error!(%error, "cannot create a uThread stack");
                    self.finish(slot, entry, false);
                    return Ran::Other;
                }
            }
        }
        let Some(fiber) = entry.fiber.as_mut() else {
            return Ran::Other;
        };
        let was_in_handler = fiber.last_suspend().is_some_and(Suspend::in_signal_handler);
        self.local.current_task.set(Arc::as_ptr(&entry.task));
        self.local.current_slot.set(slot as u32);
        self.shared.running.store(true, Ordering::Relaxed);
        let outcome = fiber.resume();
        self.shared.running.store(false, Ordering::Relaxed);
        self.local.current_task.set(std::ptr::null());
        self.local.preempt_pending.store(false, Ordering::Relaxed);
        bump_owned(&self.shared.counters.switches, 1);
        if was_in_handler {
            self.shared.in_handler.fetch_sub(1, Ordering::Relaxed);
        }
        match outcome {
            Outcome::Suspended(Suspend::Yield) => {
                meta.entry.put(entry);
                return Ran::Yielded;
            }
            Outcome::Suspended(Suspend::Park) => {
                let task = entry.task.clone();
                meta.entry.put(entry);
                bump_owned(&self.shared.counters.parks, 1);
                if task.finish_park() {
                    self.shared.idq.set(slot);
                }
            }
            Outcome::Suspended(Suspend::Fault) => {
                // PFQ bit and payload were recorded by the handler before it switched.
                self.shared.in_handler.fetch_add(1, Ordering::Relaxed);
                meta.entry.put(entry);
                return Ran::Faulted;
            }
            Outcome::Suspended(Suspend::Preempted) => {
                self.shared.in_handler.fetch_add(1, Ordering::Relaxed);
                meta.entry.put(entry);
                self.shared.idq.set(slot);
            }
            Outcome::Finished(result) => {
                if result.is_err() {
                    bump_owned(&self.shared.counters.panicked, 1);
                }
                self.finish(slot, entry, true);
            }
        }
        Ran::Other
    }

    fn finish(&mut self, slot: usize, mut entry: Box<Entry>, completed: bool) {
        entry.task.state.set_done();
        if let Some(fiber) = entry.fiber.take() {
            fiber.recycle(&mut self.pool);
        }
        if completed {
            bump_owned(&self.shared.counters.completed, 1);
        } else {
            bump_owned(&self.shared.counters.cancelled, 1);
        }
        drop(entry);
        self.free_slot(slot);
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        self.rt.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// Steals ready uThreads from a busy worker. Returns how many it took.
    fn steal(&mut self) -> usize {
        let workers = self.rt.managers.len();
        if workers < 2 || self.config.steal_batch == 0 {
            return 0;
        }
        for k in 0..workers - 1 {
            let victim = &self.rt.managers[(self.steal_cursor + k) % workers];
            if victim.index == self.local.index || victim.idq.is_empty() {
                continue;
            }
            let ready = victim.idq.count();
            let busy = victim.running.load(Ordering::Relaxed);
            let budget =
                if busy { ready.div_ceil(2) } else { ready / 2 }.min(self.config.steal_batch);
            let mut taken = 0;
            let mut from = 0;
            for _ in 0..budget {
                let Some((slot, restored)) = victim.idq.take_next_reporting(from) else {
                    break;
                };
                if restored {
                    victim.wake();
                }
                from = slot + 1;
                let Some(meta) = victim.slots.get(slot) else {
                    break;
                };
                let Some(entry) = meta.entry.take() else {
                    // In transit (the fault path's window): leave it to its owner.
                    victim.idq.set(slot);
                    victim.wake();
                    break;
                };
                if entry.task.pinned || entry.task.in_handler.load(Ordering::Acquire) {
                    meta.entry.put(entry);
                    victim.idq.set(slot);
                    victim.wake();
                    continue;
                }
                crate::sync::lock(&victim.freed).push(slot as u32);
                victim.has_freed.store(true, Ordering::Release);
                victim.live.fetch_sub(1, Ordering::Relaxed);
                victim.counters.stolen_from.fetch_add(1, Ordering::Relaxed);
                self.adopt(entry, false);
                taken += 1;
            }
            if taken > 0 {
                bump_owned(&self.shared.counters.steals, taken as u64);
                self.steal_cursor = victim.index;
                return taken;
            }
        }
        0
    }

    /// Work other threads can hand this worker without waking it: ready bits, injected or
    /// inboxed uThreads.
    fn has_queued_work(&self) -> bool {
        !self.shared.idq.is_empty() || !self.rt.injector.is_empty() || !self.shared.inbox.is_empty()
    }

    fn has_work(&self) -> bool {
        !self.shared.idq.is_empty()
            || !self.rt.injector.is_empty()
            || !self.shared.inbox.is_empty()
            || !self.local.spawns.borrow().is_empty()
            || self.next_timer().is_some_and(|t| t <= Instant::now())
    }

    fn idle(&mut self) {
        if !self.shared.idq.is_empty() && self.shared.idq.find_next(0).is_none() {
            // Nothing found but the top word says otherwise: stale hints (see `bitfield`)
            // would keep `has_work` true and this worker from ever blocking.
            self.shared.idq.scrub_stale_hints();
        }
        let pending_driver = self.driver.as_ref().is_some_and(|d| d.has_pending());
        let quiescent = self.local.timers.borrow().is_empty() && !pending_driver;
        self.shared.quiescent.store(quiescent, Ordering::Release);
        let start = Instant::now();
        let end = match self.shared.mode {
            WakerMode::BusyPoll => self.busy_poll(start),
            WakerMode::EventFd => self.park_worker(start),
        };
        self.shared.quiescent.store(false, Ordering::Release);
        bump_owned(
            &self.shared.counters.idle_ns,
            end.saturating_duration_since(start).as_nanos() as u64,
        );
    }

    /// Busy-poll idling: spins on the cheap checks only (a few loads of lines other cores
    /// write; the IDQ's top word shares its line with the first leaves, see
    /// [`crate::bitfield`]); timers, the driver and shutdown are handled by the next round.
    /// Returns the last clock reading, taken every [`IDLE_CLOCK_EVERY`] iterations and
    /// never between finding work and returning to run it (a clock read costs ~40 ns here,
    /// a measurable part of a ~600 ns cross-core unpark): `idle_ns` is exact to within that
    /// many iterations.
    fn busy_poll(&self, start: Instant) -> Instant {
        let mut seen = start;
        for spin in 1..=BUSY_POLL_SPINS {
            if self.has_queued_work() {
                return seen;
            }
            if spin % IDLE_CLOCK_EVERY == 0 {
                seen = Instant::now();
            }
            usm_sync::hint::spin_loop();
        }
        Instant::now()
    }

    /// Eventfd idling: spin (adaptive budget), then block. Returns when the idle period
    /// ended: the clock reading of the spin iteration that found work, else the time after
    /// waking up (no extra clock read when the spin found work).
    fn park_worker(&mut self, start: Instant) -> Instant {
        let spin = self.spin.budget(self.config.spin_before_park);
        if !spin.is_zero() {
            let until = start + spin;
            let mut now = start;
            loop {
                if self.has_work() {
                    self.spin.hit(self.config.spin_before_park);
                    return now;
                }
                now = Instant::now();
                if now >= until {
                    break;
                }
                usm_sync::hint::spin_loop();
            }
            self.spin.miss(self.config.spin_before_park);
        }
        // The driver's wake fds are level-triggered: asked after its last poll and
        // before the park, it says whether anything is left that would not signal them.
        if self.driver.as_mut().is_some_and(|d| !d.ready_to_block()) {
            return Instant::now();
        }
        let mut timeout = self
            .next_timer()
            .map(|t| t.saturating_duration_since(Instant::now()));
        if let Some(driver_timeout) = self.driver.as_ref().and_then(|d| d.park_timeout()) {
            timeout = Some(timeout.map_or(driver_timeout, |t| t.min(driver_timeout)));
        }
        if self.rt.phase() != Phase::Running {
            // Shutdown polls quiescence: do not sleep for long.
            timeout = Some(timeout.map_or(Duration::from_millis(5), |t| {
                t.min(Duration::from_millis(5))
            }));
        }
        crate::handoff::idle_step(
            &self.shared.park,
            || self.has_work(),
            || {
                // Counted on entry, so a worker blocked right now is already counted.
                bump_owned(&self.shared.counters.worker_parks, 1);
                self.block(timeout);
            },
        );
        Instant::now()
    }

    fn block(&self, timeout: Option<Duration>) {
        use nix::poll::{PollFd, PollFlags, ppoll};
        use nix::sys::time::TimeSpec;
        let Some(wake_fd) = &self.shared.wake_fd else {
            return;
        };
        let driver_fds = self
            .driver
            .as_ref()
            .map(|d| d.wake_fds())
            .unwrap_or_default();
        let mut fds = Vec::with_capacity(1 + driver_fds.len());
        fds.push(PollFd::new(wake_fd.as_fd(), PollFlags::POLLIN));
        for fd in driver_fds {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let timeout = timeout.map(TimeSpec::from_duration);
        match ppoll(&mut fds, timeout, None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(error) => tracing::warn!(%error, "ppoll in worker park failed"),
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            let _ = wake_fd.read();
        }
    }

    /// Shutdown, cancelling phase: drops every uThread parked with a generic park (never
    /// one parked inside a signal handler). Returns how many were dropped.
    fn cancel_idle(&mut self) -> usize {
        let mut cancelled = 0;
        for slot in self.ids.iter_ones().collect::<Vec<_>>() {
            let Some(meta) = self.shared.slots.get(slot) else {
                continue;
            };
            let Some(entry) = meta.entry.take() else {
                continue;
            };
            if entry.task.in_handler.load(Ordering::Acquire) || !entry.task.cancel_if_idle() {
                meta.entry.put(entry);
                continue;
            }
            self.local.cancelling.set(true);
            self.finish_cancelled(slot, entry);
            self.local.cancelling.set(false);
            cancelled += 1;
        }
        cancelled
    }

    fn finish_cancelled(&mut self, slot: usize, mut entry: Box<Entry>) {
        // Dropping the fiber unwinds it (running destructors, completing its join handle
        // with Cancelled) on this thread.
        drop(entry.fiber.take());
        drop(entry.body.take());
        self.finish(slot, entry, false);
    }

    /// Shutdown, last step: report uThreads still parked in a signal handler (their stacks
    /// are leaked, never freed) and drop anything else left.
    fn exit(&mut self) {
        for slot in self.ids.iter_ones().collect::<Vec<_>>() {
            let Some(meta) = self.shared.slots.get(slot) else {
                continue;
            };
            let Some(mut entry) = meta.entry.take() else {
                continue;
            };
            if entry.task.in_handler.load(Ordering::Acquire) {
                self.rt.report_stuck(FaultedUThread {
                    key: FaultKey {
                        worker: self.local.index,
                        slot: slot as u32,
                        generation: meta.fault_seq.load(Ordering::Acquire),
                    },
                    payload: meta.payload.load(Ordering::Acquire),
                });
                // Leak on purpose: its signal frame must never be unwound or unmapped.
                if let Some(fiber) = entry.fiber.take() {
                    std::mem::forget(fiber);
                }
                std::mem::forget(entry);
                continue;
            }
            self.local.cancelling.set(true);
            self.finish_cancelled(slot, entry);
            self.local.cancelling.set(false);
        }
        // Drop timers (they hold task references).
        self.local.timers.borrow_mut().clear();
    }
}

/// Runs a worker: publishes its context, builds its LocalManager and loops until shutdown.
pub(crate) fn worker_main(
    local: WorkerLocal,
    pool: StackPool,
    driver_factory: Option<crate::driver::DriverFactory>,
    config: ManagerConfig,
) {
    let _guard = current::enter(&local);
    local.manager().thread.store(
        crate::sys::preempt::current_thread() as u64,
        Ordering::Release,
    );
    let driver = driver_factory.map(|factory| factory(local.index));
    let mut manager = LocalManager::new(&local, pool, driver, config);
    manager.run();
    drop(manager);
    drop(_guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_budget_shrinks_on_misses_grows_on_hits_and_probes_again() {
        let max = Duration::from_micros(32);
        let mut spin = AdaptiveSpin::new(max);
        assert_eq!(spin.budget(max), max);
        // Long idle periods: every spin runs out.
        for expected in [16, 8, 4] {
            spin.miss(max);
            assert_eq!(spin.budget(max), Duration::from_micros(expected));
        }
        spin.miss(max); // 2 µs = max / 16: stop spinning
        let blocked_at_once = (0..AdaptiveSpin::PROBE_EVERY - 1)
            .map(|_| spin.budget(max))
            .all(|b| b.is_zero());
        assert!(blocked_at_once);
        // Then a probe, and hits grow it back to the maximum.
        assert_eq!(spin.budget(max), max / 4);
        spin.hit(max);
        spin.hit(max);
        spin.hit(max);
        assert_eq!(spin.budget(max), max);
        // Zero maximum: never spins.
        let mut off = AdaptiveSpin::new(Duration::ZERO);
        assert!((0..40).all(|_| off.budget(Duration::ZERO).is_zero()));
    }
}
