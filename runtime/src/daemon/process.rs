//! One managed process: admission, its userfaultfd reader, the workees that serve its
//! faults, and its control channel.
//!
//! # Threads per process (who does what)
//! - **reader** (`usm-rd-PID`): polls the userfaultfd and the pidfd, reads every message
//!   in batches and never blocks on anything else: a page fault becomes a workee on the
//!   LocalManager runtime; FORK/REMAP/REMOVE/UNMAP update the [`PageMap`] at once
//!   (the kernel holds the program's `fork`/`munmap` until the event is read, so the map
//!   is current before any later fault is read). It ends when the process exits (pidfd,
//!   or `ESRCH` for a fork child) and gives back every frame and slot.
//! - **workee** (a uThread, one per fault): decides and installs with `UFFDIO_COPY`. A
//!   fault on a vacant page is decided by the process's allocation policy
//!   ([`super::policy`]; a panic is caught and the policy replaced by the default, and
//!   an `Oom` answer waits for the evictor, then asks the OOM policy); a page with
//!   content is restored from its cell. A swap-in parks it on its I/O
//!   ([`super::swapio`]), so the worker serves other faults meanwhile, and one thread's
//!   swap-in never delays another thread's fault.
//! - **control** (`usm-ctl-PID`): the tagger's socket: hints, coverage, range notices,
//!   the agent's setup. A malformed message is logged and refused; the session goes on.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use usm_sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use usm_sync::{Arc, Mutex, MutexGuard};

use usm_kmod::event::{Fault, Origin};
use usm_kmod::{Features, RawUserfaultfd, Resolved, UffdEvent, Userfaultfd};
use usm_policies::{
    AllocPolicy, Decision, OomAction, OomSituation, ProcessCounters, RunMode, Watermarks, guarded,
};
use usm_proto::agent::AgentClient;
use usm_proto::server::TaggedPeer;
use usm_proto::{Channel, Message, ProtoError, RefusalReason};
use usm_swap::PageBuf;

use super::Shared;
use super::policy::{FaultCx, log_panic};
use super::space::{CellData, Charge, PageMap, PageState, SwapCell, try_reserve, unreserve};
use super::stats::{ProcCounters, ProcessStat, bump};
use super::sys::{self, PAGE};

/// Features the daemon asks for on a tagger's userfaultfd.
pub(crate) const REQUESTED: Features = Features::EVENT_FORK
    .union(Features::EVENT_REMAP)
    .union(Features::EVENT_REMOVE)
    .union(Features::EVENT_UNMAP)
    .union(Features::THREAD_ID)
    .union(Features::MOVE)
    .union(Features::POISON);

/// Features without which a process is refused.
pub(crate) const REQUIRED: Features = Features::EVENT_FORK
    .union(Features::EVENT_REMAP)
    .union(Features::EVENT_REMOVE)
    .union(Features::EVENT_UNMAP);

/// Staging slots and ring entries asked of each tagger's eviction agent.
pub(crate) const AGENT_STAGING_PAGES: u32 = 256;
const AGENT_RING_ENTRIES: u32 = 256;

/// The user address space, for a wake-all (`UFFDIO_WAKE` only checks the bounds).
const WAKE_ALL_START: u64 = 0x10000;
const WAKE_ALL_END: u64 = 0x7fff_ffff_f000;

/// How long a fault waits for a frame before it is served anyway (over the pool).
const FRAME_WAIT: Duration = Duration::from_millis(250);

/// The daemon's end of a tagger's eviction agent.
pub(crate) struct Agent {
    pub(crate) client: AgentClient,
    pub(crate) free_slots: Vec<u32>,
    /// Slots whose page is safe in the daemon but which were not dropped yet, because
    /// the tagger could not be told (`SwapState`) first.
    pub(crate) undropped: Vec<u32>,
    /// Completions read while waiting for another one.
    pub(crate) stash: Vec<usm_proto::agent::AgentCompletion>,
    pub(crate) seq: u64,
}

/// A managed address space (a tagged process, or a fork child of one).
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pub(crate) name: String,
    pub(crate) parent: Option<u32>,
    pub(crate) policy: String,
    /// Pages per flexible huge page of the configured spec (1: off). Informational: the
    /// allocation policy in the map decides (a `HUGE=` hint changes it per range).
    pub(crate) fhp_pages: u64,
    pub(crate) uffd: Userfaultfd,
    pub(crate) map: Mutex<PageMap>,
    pub(crate) counters: ProcCounters,
    pub(crate) agent: Mutex<Option<Agent>>,
    pub(crate) channel: Option<Channel>,
    /// Ranges the tagger says it registered (advisory), start → end.
    pub(crate) ranges: Mutex<BTreeMap<u64, u64>>,
    /// The process is gone; nothing may be charged to it any more.
    pub(crate) gone: AtomicBool,
    /// Stop serving (daemon shutdown, after every page was given back).
    pub(crate) stop: AtomicBool,
    pub(crate) coverage: Mutex<(u64, u64)>,
    /// Last `SwapState` sent.
    pub(crate) told_swapped: AtomicU64,
    /// Thread id of the tagger's eviction agent (0: none). Its faults never wait for a
    /// frame: the evictor may be waiting for it.
    pub(crate) agent_tid: AtomicU32,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    /// Counts this tagger's session against its uid and pid until the `Proc` is dropped
    /// (`None` for a fork child known by its parent's FORK event). See `sessions`.
    pub(crate) _session: Option<super::sessions::SessionGuard>,
}

impl Proc {
    pub(crate) fn lock_map(&self) -> MutexGuard<'_, PageMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stat(&self) -> ProcessStat {
        let (resident, swapped, policy, evict_policy, oom_policy, evict_panics) = {
            let m = self.lock_map();
            (
                m.charged,
                m.out,
                m.policy.alloc.name().to_owned(),
                m.fifo.policy_name().to_owned(),
                m.policy.oom.name().to_owned(),
                m.fifo.panics,
            )
        };
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (managed, anon) = *self.coverage.lock().unwrap_or_else(|p| p.into_inner());
        ProcessStat {
            pid: self.pid,
            name: self.name.clone(),
            parent: self.parent,
            policy,
            evict_policy,
            oom_policy,
            resident_pages: resident,
            swapped_pages: swapped,
            faults: l(&c.faults),
            zero_fills: l(&c.zero_fills),
            fhp_pages: l(&c.fhp_pages),
            swapins: l(&c.swapins),
            evictions: l(&c.evictions),
            evict_skipped: l(&c.evict_skipped),
            poisoned: l(&c.poisoned),
            policy_panics: l(&c.policy_panics) + evict_panics,
            forks: l(&c.forks),
            remaps: l(&c.remaps),
            removes: l(&c.removes),
            unmaps: l(&c.unmaps),
            released_frames: l(&c.released_frames),
            hints: l(&c.hints),
            agent: self.has_agent(),
            managed_anon_bytes: managed,
            anon_bytes: anon,
            latency: c.latency(),
        }
    }

    /// Tells the tagger how many pages are out, if it changed (and always when `force`).
    /// Never blocks (a full socket must not stall the daemon): returns whether the
    /// tagger's view is now current.
    pub(crate) fn tell_swapped(&self, force: bool) -> bool {
        let Some(ch) = &self.channel else {
            return true;
        };
        let out = self.lock_map().out;
        if !force && self.told_swapped.load(Ordering::Acquire) == out {
            return true;
        }
        match ch.send_nowait(&Message::SwapState { swapped_pages: out }) {
            Ok(()) => {
                self.told_swapped.store(out, Ordering::Release);
                true
            }
            Err(_) => {
                // Make the next call retry.
                self.told_swapped.store(u64::MAX, Ordering::Release);
                false
            }
        }
    }

    /// The tagger's eviction agent is set up. Never waits: an agent locked by the evictor
    /// (a batch in flight) is one.
    pub(crate) fn has_agent(&self) -> bool {
        match self.agent.try_lock() {
            Ok(a) => a.is_some(),
            Err(std::sync::TryLockError::WouldBlock) => true,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().is_some(),
        }
    }

    /// The range the tagger registered around `addr`, if it announced one.
    fn registered_range(&self, addr: u64) -> Option<std::ops::Range<u64>> {
        let r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.range(..=addr)
            .next_back()
            .filter(|(_, end)| addr < **end)
            .map(|(&start, &end)| start..end)
    }
}

/// Admits a tagger: policy by name, `UFFDIO_API`, Ack, then the reader and control
/// threads. Unmatched names, failed negotiation or a stopping daemon get `Refused`.
pub(crate) fn admit(sh: &Arc<Shared>, peer: TaggedPeer, session: super::sessions::SessionGuard) {
    let pid = peer.pid;
    let name = peer.name.clone();
    let Some(policy) = sh.policy_for(&name) else {
        bump(&sh.refused);
        tracing::info!("pid {pid} ({name}): not named in the config; it runs untouched");
        let text =
            format!("no `process {name} POLICY` line in the daemon's config; running untouched");
        let _ = peer.refuse(RefusalReason::NotConfigured, &text);
        return;
    };
    if sh.stopping.load(Ordering::Acquire) {
        bump(&sh.refused);
        let _ = peer.refuse(RefusalReason::Busy, "the daemon is shutting down");
        return;
    }
    let TaggedPeer { uffd, stream, .. } = peer;
    let negotiated =
        RawUserfaultfd::from_fd(uffd).and_then(|raw| raw.negotiate(REQUESTED, REQUIRED));
    let uffd = match negotiated {
        Ok(u) => u,
        Err(e) => {
            bump(&sh.refused);
            tracing::warn!("pid {pid} ({name}): UFFDIO_API failed: {e}");
            let text = format!("UFFDIO_API failed: {e}");
            let _ = stream.send_nowait(&Message::Refused {
                reason: RefusalReason::UffdApi,
                text,
            });
            return;
        }
    };
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            bump(&sh.refused);
            tracing::warn!("pid {pid} ({name}): pidfd_open failed: {e}");
            return;
        }
    };
    let features = uffd.features();
    let _ = stream.set_send_timeout(Some(Duration::from_secs(1)));
    if let Err(e) = stream.send(&Message::Ack {
        features: features.bits(),
        policy: policy.clone(),
    }) {
        tracing::warn!("pid {pid} ({name}): cannot send Ack: {e}");
        return;
    }
    let policies = match super::policy::build(&sh.registry, &name, pid) {
        Ok(p) => p,
        Err(e) => {
            // The config was checked at start-up: only a registry bug gets here.
            bump(&sh.refused);
            tracing::error!("pid {pid} ({name}): cannot build its policies: {e}");
            return;
        }
    };
    bump(&sh.admitted);
    tracing::info!(
        "pid {pid} ({name}): managed by policy {policy} (alloc {}, evict {}, oom {})",
        policies.0.alloc.name(),
        policies.1.policy_name(),
        policies.0.oom.name()
    );
    let proc = Arc::new(Proc {
        pid,
        name,
        parent: None,
        fhp_pages: sh.fhp_pages_for(&policy),
        policy,
        uffd,
        map: Mutex::new(PageMap::new(sh.frames_used.clone(), policies)),
        counters: ProcCounters::default(),
        agent: Mutex::new(None),
        channel: Some(stream),
        ranges: Mutex::new(BTreeMap::new()),
        gone: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        coverage: Mutex::new((0, 0)),
        told_swapped: AtomicU64::new(0),
        agent_tid: AtomicU32::new(0),
        threads: Mutex::new(Vec::new()),
        _session: Some(session),
    });
    sh.add_proc(proc.clone());
    let origin = Origin { pid, tid: 0 };
    notify_alloc(sh, &proc, None, |alloc, cx| {
        alloc.new_process(origin, &proc.name, None, cx)
    });
    start_threads(sh, &proc, Some(pidfd));
    if features.contains(Features::MOVE) {
        if let Some(ch) = &proc.channel {
            let _ = ch.send(&Message::StartAgent {
                staging_pages: AGENT_STAGING_PAGES,
                ring_entries: AGENT_RING_ENTRIES,
            });
        }
    }
}

fn start_threads(sh: &Arc<Shared>, proc: &Arc<Proc>, pidfd: Option<OwnedFd>) {
    let mut handles = Vec::new();
    let (s, p) = (sh.clone(), proc.clone());
    match std::thread::Builder::new()
        .name(format!("usm-rd-{}", proc.pid))
        .spawn(move || reader(&s, &p, pidfd))
    {
        Ok(h) => handles.push(h),
        Err(e) => tracing::error!("cannot start the reader of pid {}: {e}", proc.pid),
    }
    if let Some(ch) = &proc.channel {
        match ch.try_clone() {
            Ok(ch) => {
                let (s, p) = (sh.clone(), proc.clone());
                match std::thread::Builder::new()
                    .name(format!("usm-ctl-{}", proc.pid))
                    .spawn(move || control(&s, &p, ch))
                {
                    Ok(h) => handles.push(h),
                    Err(e) => tracing::error!("cannot start the control thread: {e}"),
                }
            }
            Err(e) => tracing::error!("cannot clone the session of pid {}: {e}", proc.pid),
        }
    }
    proc.threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(handles);
}

fn poll2(a: &impl AsFd, b: Option<&OwnedFd>, timeout_ms: i32) -> (bool, bool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = vec![PollFd::new(a.as_fd(), PollFlags::POLLIN)];
    if let Some(b) = b {
        fds.push(PollFd::new(b.as_fd(), PollFlags::POLLIN));
    }
    let t = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    if poll(&mut fds, t).is_err() {
        return (false, false);
    }
    let ready = |i: usize| {
        fds.get(i)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty())
    };
    (ready(0), b.is_some() && ready(1))
}

/// The one reader of `proc`'s userfaultfd.
fn reader(sh: &Arc<Shared>, proc: &Arc<Proc>, pidfd: Option<OwnedFd>) {
    let mut events = Vec::with_capacity(64);
    let mut idle = 0u32;
    loop {
        if proc.stop.load(Ordering::Acquire) {
            break;
        }
        let (_, exited) = poll2(&proc.uffd, pidfd.as_ref(), 100);
        events.clear();
        let n = match proc.uffd.read_events(&mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("pid {}: reading the userfaultfd failed: {e}", proc.pid);
                break;
            }
        };
        if n == 0 {
            if exited {
                break;
            }
            idle += 1;
            // Safety net: a quiet userfaultfd with a thread still waiting means a wake-up
            // was lost somewhere (seen rarely under eviction, not root-caused yet). Waking
            // every waiter is harmless — a thread whose page is still missing faults again
            // and its fault is read anew — and bounds such a stall to one poll period.
            let _ = proc
                .uffd
                .wake(WAKE_ALL_START, WAKE_ALL_END - WAKE_ALL_START);
            if pidfd.is_none() && idle % 5 == 0 && !sys::mm_alive(&proc.uffd) {
                break;
            }
            continue;
        }
        idle = 0;
        for ev in events.drain(..) {
            handle_event(sh, proc, ev);
        }
    }
    finish(sh, proc);
}

fn handle_event(sh: &Arc<Shared>, proc: &Arc<Proc>, ev: UffdEvent) {
    match ev {
        UffdEvent::Pagefault {
            addr, tid, write, ..
        } => {
            bump(&proc.counters.faults);
            let t0 = Instant::now();
            let urgent = tid != 0 && tid == proc.agent_tid.load(Ordering::Acquire);
            let fault = Fault {
                addr: addr & !(PAGE - 1),
                write,
                wp: false,
                minor: false,
                len_hint: PAGE,
                origin: Origin { pid: proc.pid, tid },
            };
            let (s, p) = (sh.clone(), proc.clone());
            let job = move || serve_fault(&s, &p, &fault, urgent, t0);
            match sh.runner {
                super::FaultRunner::Threads => sh.fault_threads.submit(Box::new(job)),
                super::FaultRunner::UThreads => {
                    if let Err(e) = sh.handle.spawn(job) {
                        // No runtime (shutting down): serve here rather than leave it.
                        tracing::debug!("spawn failed ({e}); serving the fault on the reader");
                        serve_fault(sh, proc, &fault, urgent, t0);
                    }
                }
            }
        }
        UffdEvent::Fork { child } => {
            bump(&proc.counters.forks);
            match Userfaultfd::from_fork(child, &proc.uffd) {
                Ok(uffd) => {
                    let map = proc.lock_map().fork_child();
                    let child = Arc::new(Proc {
                        pid: 0,
                        name: format!("{} (child)", proc.name),
                        parent: Some(if proc.pid != 0 {
                            proc.pid
                        } else {
                            proc.parent.unwrap_or(0)
                        }),
                        policy: proc.policy.clone(),
                        fhp_pages: proc.fhp_pages,
                        uffd,
                        map: Mutex::new(map),
                        counters: ProcCounters::default(),
                        agent: Mutex::new(None),
                        channel: None,
                        ranges: Mutex::new(
                            proc.ranges
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone(),
                        ),
                        gone: AtomicBool::new(false),
                        stop: AtomicBool::new(false),
                        coverage: Mutex::new((0, 0)),
                        told_swapped: AtomicU64::new(0),
                        agent_tid: AtomicU32::new(0),
                        threads: Mutex::new(Vec::new()),
                        _session: None,
                    });
                    sh.add_proc(child.clone());
                    start_threads(sh, &child, None);
                }
                Err(e) => tracing::warn!("pid {}: cannot adopt a fork child: {e}", proc.pid),
            }
        }
        UffdEvent::Remap { from, to, len } => {
            bump(&proc.counters.remaps);
            proc.lock_map().remap(from, to, len);
            let mut r = proc.ranges.lock().unwrap_or_else(|p| p.into_inner());
            r.insert(to, to + len);
        }
        UffdEvent::Remove { start, end } => {
            bump(&proc.counters.removes);
            let rel = proc.lock_map().remove_range(start, end);
            proc.counters
                .released_frames
                .fetch_add(rel.frames, Ordering::Relaxed);
            tell_alloc_freed(sh, proc, start..end);
        }
        UffdEvent::Unmap { start, end } => {
            bump(&proc.counters.unmaps);
            let rel = proc.lock_map().remove_range(start, end);
            proc.counters
                .released_frames
                .fetch_add(rel.frames, Ordering::Relaxed);
            tell_alloc_freed(sh, proc, start..end);
        }
    }
}

/// The process is gone (or the daemon stops): give back every frame and slot.
fn finish(sh: &Arc<Shared>, proc: &Arc<Proc>) {
    {
        let mut m = proc.lock_map();
        proc.gone.store(true, Ordering::Release);
        if !proc.stop.load(Ordering::Acquire) {
            let rel = m.clear();
            proc.counters
                .released_frames
                .fetch_add(rel.frames, Ordering::Relaxed);
        }
    }
    let origin = Origin {
        pid: proc.pid,
        tid: 0,
    };
    notify_alloc(sh, proc, None, |alloc, cx| alloc.exit(origin, cx));
    // Drop the agent's end now, unless the evictor holds it (a batch for this process,
    // which gives up on a gone process): then it goes with the last reference. Never
    // wait for it, so the process's end is recorded at once.
    if let Ok(mut a) = proc.agent.try_lock() {
        a.take();
    }
    if let Some(ch) = &proc.channel {
        ch.shutdown();
    }
    sh.remove_proc(proc);
}

/// Waits (parking the workee, never the worker) until `n` frames are reserved; after
/// [`FRAME_WAIT`] — at once when `urgent` — reserves them anyway (counted over the
/// pool) rather than hang.
fn reserve_frames(sh: &Shared, n: u64, urgent: bool) {
    let deadline = Instant::now() + FRAME_WAIT;
    loop {
        if try_reserve(&sh.frames_used, n, sh.pool_pages) {
            if sh.free_frames() < sh.low {
                sh.kick_evictor();
            }
            return;
        }
        sh.kick_evictor();
        if urgent || Instant::now() > deadline || sh.stopping.load(Ordering::Acquire) {
            sh.frames_used.fetch_add(n, Ordering::AcqRel);
            bump(&sh.overcommits);
            return;
        }
        super::nap::nap(Duration::from_micros(200));
    }
}

fn zeros(len: usize) -> &'static [u8] {
    static ZEROS: [u8; 2 << 20] = [0; 2 << 20];
    &ZEROS[..len.min(ZEROS.len())]
}

/// Serves one fault of `proc`. Runs on a workee.
pub(crate) fn serve_fault(sh: &Shared, proc: &Proc, fault: &Fault, urgent: bool, t0: Instant) {
    sh.in_flight.fetch_add(1, Ordering::AcqRel);
    serve_fault_inner(sh, proc, fault, urgent, t0);
    sh.in_flight.fetch_sub(1, Ordering::AcqRel);
}

fn serve_fault_inner(sh: &Shared, proc: &Proc, fault: &Fault, urgent: bool, t0: Instant) {
    let page = fault.addr;
    let mut oom = OomWait::default();
    let mut read_back = None;
    for attempt in 0..100_000u32 {
        if proc.gone.load(Ordering::Acquire) {
            return;
        }
        let (state, generation) = {
            let m = proc.lock_map();
            (m.pages.get(&page).cloned(), m.generation_at(page))
        };
        if attempt == 2000 {
            let what = match &state {
                None => "absent".to_owned(),
                Some(PageState::Resident { inherited }) => {
                    format!("resident (inherited {inherited})")
                }
                Some(PageState::Out(c)) => match &*c.data.lock().unwrap_or_else(|p| p.into_inner())
                {
                    CellData::Evicting => "out: evicting".into(),
                    CellData::Cached(_) => "out: cached".into(),
                    CellData::Stored(_) => "out: stored".into(),
                    CellData::Lost => "out: lost".into(),
                },
            };
            tracing::warn!(
                "pid {} ({}): fault at {page:#x} still unresolved after 2000 attempts; state {what}; free frames {}",
                proc.pid,
                proc.name,
                sh.free_frames()
            );
        }
        let done = match state {
            Some(PageState::Resident { .. }) => {
                // Someone (another workee, a revert) mapped it: just wake the waiters.
                // The program touched the page again: access information for eviction.
                tracing::trace!("pid {}: fault on resident page {page:#x}", proc.pid);
                proc.lock_map().fifo.touch(page);
                let _ = proc.uffd.wake(page, PAGE);
                true
            }
            None => fill_by_policy(sh, proc, fault, urgent, &mut oom),
            Some(PageState::Out(cell)) => {
                swap_in(sh, proc, page, &cell, generation, urgent, &mut read_back)
            }
        };
        if done {
            proc.counters.record_latency(t0.elapsed());
            sh.totals.record_latency(t0.elapsed());
            return;
        }
        super::nap::nap(Duration::from_micros(20));
    }
    tracing::error!(
        "pid {}: gave up on the fault at {page:#x} after 100000 attempts",
        proc.pid
    );
}

/// One fault's out-of-memory history.
#[derive(Default)]
struct OomWait {
    /// When this fault first found no frame (reset when a decision is installed).
    since: Option<Instant>,
    /// OOM policy calls so far for this fault.
    attempt: u32,
}

/// The process's policies over its locked map: the context for one policy call.
fn fault_cx<'a>(
    sh: &'a Shared,
    m: &'a mut PageMap,
    region: Option<std::ops::Range<u64>>,
    faults: u64,
) -> (&'a mut super::policy::AllocSide, FaultCx<'a>) {
    let counters = ProcessCounters {
        resident: m.charged as usize,
        swapped: m.out as usize,
        faults,
    };
    let marks = Watermarks {
        low: sh.low as usize,
        high: sh.high as usize,
    };
    let PageMap {
        pages,
        policy,
        fifo,
        ..
    } = m;
    let cx = FaultCx::new(
        pages,
        fifo,
        &sh.frames_used,
        sh.pool_pages,
        marks,
        region,
        counters,
    );
    (policy, cx)
}

/// Calls a notification of the allocation policy (hint, new process, exit), guarded.
fn notify_alloc(
    sh: &Shared,
    proc: &Proc,
    region: Option<std::ops::Range<u64>>,
    call: impl FnOnce(&mut dyn AllocPolicy, &mut FaultCx<'_>),
) {
    let faults = proc.counters.faults.load(Ordering::Relaxed);
    let mut m = proc.lock_map();
    let (policy, mut cx) = fault_cx(sh, &mut m, region, faults);
    let alloc = &mut policy.alloc;
    let r = guarded(&policy.alloc_name, || call(alloc.as_mut(), &mut cx));
    cx.reclaim_all();
    drop(cx);
    if let Err(e) = r {
        bump(&proc.counters.policy_panics);
        let new = policy.replace_alloc();
        log_panic(proc.pid, &e, &new);
    }
}

/// `range` was given back (UNMAP, REMOVE; its frames and slots are reclaimed already):
/// the allocation policy hears of it ([`AllocPolicy::free`]), so a policy with state of
/// its own sees frees. A panic there replaces the policy, as on a fault.
fn tell_alloc_freed(sh: &Shared, proc: &Proc, range: std::ops::Range<u64>) {
    let origin = Origin {
        pid: proc.pid,
        tid: 0,
    };
    notify_alloc(sh, proc, None, |alloc, cx| alloc.free(origin, range, cx));
}

/// A vacant page: the allocation policy decides, the daemon installs zeros with
/// `UFFDIO_COPY` (one page, or the run the policy chose). Returns true when done.
fn fill_by_policy(
    sh: &Shared,
    proc: &Proc,
    fault: &Fault,
    urgent: bool,
    oom: &mut OomWait,
) -> bool {
    let page = fault.addr;
    let region = proc.registered_range(page);
    let faults = proc.counters.faults.load(Ordering::Relaxed);
    let mut m = proc.lock_map();
    if proc.gone.load(Ordering::Acquire) {
        return true;
    }
    if m.pages.contains_key(&page) {
        return false; // changed since the caller looked: look again
    }
    let (policy, mut cx) = fault_cx(sh, &mut m, region.clone(), faults);
    // The policy, guarded; after a panic, its replacement serves the fault.
    let mut decision = None;
    for _ in 0..3 {
        let alloc = &mut policy.alloc;
        match guarded(&policy.alloc_name, || alloc.alloc(fault, &mut cx)) {
            Ok(d) => {
                decision = Some(d);
                break;
            }
            Err(e) => {
                cx.reclaim_all();
                bump(&proc.counters.policy_panics);
                let new = policy.replace_alloc();
                log_panic(proc.pid, &e, &new);
            }
        }
    }
    let requested = std::mem::take(&mut cx.victims.requested);
    let mapping = match decision {
        Some(Decision::Map(mapping)) if !cx.misused => {
            let pages_ok = mapping.contains(page)
                && mapping.pages().all(|(a, _)| {
                    !cx.pages.contains_key(&a)
                        && region.as_ref().map_or(a == page, |r| r.contains(&a))
                });
            let mut frames = mapping.frames().to_vec();
            frames.sort_unstable();
            frames.dedup();
            if pages_ok && frames.len() == mapping.len() && cx.claim(mapping.frames()) {
                let leaked = cx.reclaim_all();
                if leaked > 0 {
                    tracing::debug!(
                        "pid {}: policy `{}` kept {leaked} frame(s) it did not map; reclaimed",
                        proc.pid,
                        policy.alloc.name()
                    );
                }
                Some(mapping)
            } else {
                tracing::warn!(
                    "pid {}: policy `{}` mapped {:#x}..{:#x} for a fault at {page:#x} (outside \
                     the range, over a page with content, or frames not its own): served one page instead",
                    proc.pid,
                    policy.alloc.name(),
                    mapping.start(),
                    mapping.end()
                );
                // Only the tokens this context handed out are reserved units.
                cx.reclaim_all();
                None
            }
        }
        Some(Decision::Oom) => {
            cx.reclaim_all();
            drop(cx);
            drop(m);
            return on_oom(sh, proc, fault, urgent, requested, oom);
        }
        Some(other) => {
            tracing::warn!(
                "pid {}: policy `{}` answered {other:?} for a vacant page: served one page instead",
                proc.pid,
                policy.alloc.name()
            );
            cx.reclaim_all();
            None
        }
        None => {
            cx.reclaim_all();
            None
        }
    };
    drop(cx);
    let Some(mapping) = mapping else {
        drop(m);
        return fill_fresh(sh, proc, page, urgent);
    };
    oom.since = None;
    let n = mapping.len() as u64;
    let start = mapping.start();
    let (installed, fault_page) = install_zeros(proc, &mut m, start, n, page);
    drop(m);
    unreserve(&sh.frames_used, n - installed);
    if installed > 0 {
        bump(&proc.counters.zero_fills);
        proc.counters
            .fhp_pages
            .fetch_add(installed - 1, Ordering::Relaxed);
    }
    if sh.free_frames() < sh.low {
        sh.kick_evictor();
    }
    match fault_page {
        Install::Done => true,
        Install::Retry => false,
        // The run stopped before the faulting page (part of it is no longer registered:
        // a stale range): serve the page alone.
        Install::Gone => fill_fresh(sh, proc, page, urgent),
    }
}

/// Installs zeros at the `n` pages from `start` (their frames reserved by the caller)
/// and records each installed page resident. A page already present (unknown to the
/// daemon: `MADV_FREE` kept it) is skipped. Returns how many pages were installed and
/// what happened at the faulting page `page`: `Done` (installed, or present already:
/// its waiters are woken), `Retry` (the address space is changing), `Gone` (the run
/// stopped before it for another reason).
fn install_zeros(proc: &Proc, m: &mut PageMap, start: u64, n: u64, page: u64) -> (u64, Install) {
    const CHUNK: u64 = 512;
    let (mut i, mut installed) = (0u64, 0u64);
    // Why the loop stopped early, if it did.
    let mut stopped = Install::Done;
    while i < n {
        let chunk = (n - i).min(CHUNK);
        let at = start + i * PAGE;
        match sys::copy_into(&proc.uffd, at, zeros((chunk * PAGE) as usize)) {
            Ok(Resolved::Done(b) | Resolved::Partial(b)) if b >= PAGE => {
                let k = (b / PAGE).min(chunk);
                for j in 0..k {
                    m.set_resident(at + j * PAGE, Charge::Reserved);
                }
                installed += k;
                i += k;
            }
            Ok(Resolved::AlreadyMapped) => {
                // Present but unknown to us: leave it, wake whoever waits on it.
                let _ = proc.uffd.wake(at, PAGE);
                i += 1;
            }
            other => {
                stopped = classify(other);
                break;
            }
        }
    }
    if installed > 0 {
        tracing::trace!(
            "pid {}: zero fill {start:#x} ({installed} of {n} pages)",
            proc.pid
        );
    }
    // The faulting page is in [start, start + n*PAGE): done if the loop got past it.
    let passed = i > (page - start) / PAGE;
    let outcome = match stopped {
        _ if passed => Install::Done,
        Install::Retry => Install::Retry,
        _ => Install::Gone,
    };
    (installed, outcome)
}

/// The allocation policy answered `Oom`. Evicts what the policy asked of its own
/// process, else waits for the evictor (this fault waits at most
/// [`DaemonOptions::oom_wait`](super::DaemonOptions::oom_wait) for a frame in all), then
/// asks the OOM policy. Returns
/// true when the fault is done (failed by the OOM policy, or served over the pool for
/// the agent's own thread).
fn on_oom(
    sh: &Shared,
    proc: &Proc,
    fault: &Fault,
    urgent: bool,
    requested: usize,
    oom: &mut OomWait,
) -> bool {
    if urgent || sh.stopping.load(Ordering::Acquire) {
        // The agent's thread never waits (the evictor may be waiting for it).
        return fill_fresh(sh, proc, fault.addr, true);
    }
    if requested > 0 {
        // The policy asked to evict its own pages (`quota` at its cap): do it here, off
        // the map lock, through the process's agent.
        let charged = proc.lock_map().charged as usize;
        let want = requested.max(16).min(charged.max(1));
        if super::evict::evict_batch(sh, proc, want) > 0 {
            oom.since = None;
            return false;
        }
    }
    if requested == 0 {
        // Wait for the evictor, up to the daemon's `oom_wait` for this fault in all.
        let since = *oom.since.get_or_insert_with(Instant::now);
        loop {
            sh.kick_evictor();
            if sh.free_frames() > 0 {
                return false; // try the policy again
            }
            if proc.gone.load(Ordering::Acquire) {
                return true;
            }
            if since.elapsed() >= sh.oom_wait {
                break;
            }
            super::nap::nap(Duration::from_micros(200));
        }
    }
    // Still no frame after `oom_wait` (or the policy asked to evict its own pages and
    // none could leave):
    // Ask the OOM policy.
    let situation = OomSituation {
        fault: *fault,
        attempt: oom.attempt,
        mode: RunMode::Daemon,
        last_scan: usm_policies::VictimScan::default(),
        free_frames: sh.free_frames() as usize,
    };
    oom.attempt += 1;
    oom.since = None;
    let action = {
        let faults = proc.counters.faults.load(Ordering::Relaxed);
        let region = proc.registered_range(fault.addr);
        let mut m = proc.lock_map();
        let (policy, mut cx) = fault_cx(sh, &mut m, region, faults);
        let name = policy.oom.name().to_owned();
        let oom_policy = &mut policy.oom;
        let r = guarded(&name, || oom_policy.on_oom(&situation, &mut cx));
        cx.reclaim_all();
        drop(cx);
        match r {
            Ok(a) => a,
            Err(e) => {
                bump(&proc.counters.policy_panics);
                let new = policy.replace_oom();
                log_panic(proc.pid, &e, &new);
                return false;
            }
        }
    };
    match action {
        OomAction::EvictHarder(n) => {
            for p in sh.procs() {
                p.lock_map().fifo.hard += n;
            }
            sh.kick_evictor();
            false
        }
        OomAction::KillLargestProcess => {
            let largest = sh
                .procs()
                .into_iter()
                .filter(|p| p.pid != 0 && !p.gone.load(Ordering::Acquire))
                .max_by_key(|p| p.lock_map().charged);
            if let Some(p) = largest {
                tracing::error!(
                    "out of memory serving pid {} at {:#x}: the OOM policy kills the largest \
                     managed process, pid {} ({})",
                    proc.pid,
                    fault.addr,
                    p.pid,
                    p.name
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            false
        }
        OomAction::FailAccess(reason) => fail_access(proc, fault.addr, &reason.to_string()),
        OomAction::KillLargestTask => fail_access(
            proc,
            fault.addr,
            "the OOM policy asked to kill a task (embedded only)",
        ),
    }
}

/// The faulting access fails: `UFFDIO_POISON` (the program gets SIGBUS there, never
/// zeros). Returns true when done.
fn fail_access(proc: &Proc, page: u64, why: &str) -> bool {
    tracing::error!(
        "pid {} ({}): out of memory at {page:#x}: {why}; the access fails (SIGBUS)",
        proc.pid,
        proc.name
    );
    let m = proc.lock_map();
    if m.pages.contains_key(&page) {
        return false;
    }
    bump(&proc.counters.poisoned);
    !matches!(classify(sys::poison(&proc.uffd, page)), Install::Retry)
}

/// What an install attempt came to.
enum Install {
    /// The page is there (installed, or was already).
    Done,
    /// Try again later (the address space is changing, or the state changed).
    Retry,
    /// The range or the process is gone: nobody waits.
    Gone,
}

fn classify(r: usm_kmod::Result<Resolved>) -> Install {
    match r {
        Ok(Resolved::Done(_) | Resolved::AlreadyMapped | Resolved::Partial(_)) => Install::Done,
        Ok(Resolved::MmapChanging | Resolved::UseCopy) => Install::Retry,
        Err(e) if e.is_retryable() => Install::Retry,
        Err(e) => {
            if e.is_mm_gone() || e.is_not_found() {
                tracing::debug!("installing a page: {e}");
            } else {
                tracing::warn!("installing a page failed: {e}");
            }
            Install::Gone
        }
    }
}

/// One page of zeros, without the policy: its fallback (the policy panicked every time,
/// or answered something it may not), and the agent's own faults (served over the pool
/// rather than wait). Returns true when done.
fn fill_fresh(sh: &Shared, proc: &Proc, page: u64, urgent: bool) -> bool {
    reserve_frames(sh, 1, urgent);
    let mut m = proc.lock_map();
    if proc.gone.load(Ordering::Acquire) || m.pages.contains_key(&page) {
        drop(m);
        unreserve(&sh.frames_used, 1);
        return proc.gone.load(Ordering::Acquire);
    }
    let r = sys::copy_into(&proc.uffd, page, zeros(PAGE as usize));
    match r {
        Ok(Resolved::Done(_)) => {
            tracing::trace!("pid {}: zero fill {page:#x}", proc.pid);
            m.set_resident(page, Charge::Reserved);
            bump(&proc.counters.zero_fills);
            true
        }
        other => {
            drop(m);
            unreserve(&sh.frames_used, 1);
            match classify(other) {
                Install::Done => {
                    // Present but unknown to us (MADV_FREE kept it, or inherited).
                    let _ = proc.uffd.wake(page, PAGE);
                    true
                }
                Install::Retry => false,
                Install::Gone => true,
            }
        }
    }
}

/// Swap-in of `page` from `cell`, decided when the page's generation was `generation`.
/// Returns true when done.
/// A page's content read back for a swap-in whose `UFFDIO_COPY` must be retried
/// (`EAGAIN` while an mmap change is pending): the next attempt copies it again without
/// reading swap again. It belongs to `cell` — one eviction of the page, whose content
/// never changes while it is out — and is used only for that same cell.
pub(crate) struct ReadBack {
    cell: Arc<SwapCell>,
    buf: PageBuf,
}

/// Swaps `page` back in from `cell`; `read_back` carries the content read by an earlier
/// attempt of the same fault (see [`ReadBack`]). Returns whether the fault is resolved.
fn swap_in(
    sh: &Shared,
    proc: &Proc,
    page: u64,
    cell: &Arc<SwapCell>,
    generation: u64,
    urgent: bool,
    read_back: &mut Option<ReadBack>,
) -> bool {
    // Where is the data? Already here from an earlier attempt, or in the cell.
    let earlier = read_back
        .take()
        .filter(|rb| Arc::ptr_eq(&rb.cell, cell))
        .map(|rb| rb.buf);
    let data: Result<PageBuf, String> = if let Some(buf) = earlier {
        Ok(buf)
    } else {
        let d = cell.data.lock().unwrap_or_else(|p| p.into_inner());
        match &*d {
            CellData::Evicting => {
                // Once the agent moved it, the data is in the staging slot. (A fault read
                // late may predate the eviction: then the slot is still a hole — wait.)
                if !super::evict::present(proc.pid, cell.staging) {
                    return false;
                }
                let mut buf = PageBuf::page();
                match super::evict::read_remote(proc.pid, cell.staging, &mut buf) {
                    Ok(n) if n == PAGE as usize => Ok(buf),
                    _ => return false,
                }
            }
            CellData::Cached(buf) => {
                let mut copy = PageBuf::page();
                copy.copy_from_slice(buf);
                Ok(copy)
            }
            CellData::Lost => Err("lost during eviction".into()),
            CellData::Stored(entry) => {
                let entry = *entry;
                drop(d);
                sh.swap.read(entry).wait()
            }
        }
    };
    reserve_frames(sh, 1, urgent);
    let mut m = proc.lock_map();
    let same = matches!(m.pages.get(&page), Some(PageState::Out(c)) if Arc::ptr_eq(c, cell))
        && m.generation_at(page) == generation;
    if proc.gone.load(Ordering::Acquire) || !same {
        drop(m);
        unreserve(&sh.frames_used, 1);
        // Freed or re-mapped meanwhile (generation fence): never install stale data.
        return proc.gone.load(Ordering::Acquire);
    }
    match data {
        Ok(buf) => match classify(sys::copy_into(&proc.uffd, page, &buf).inspect(|r| {
            if !r.is_done() {
                tracing::debug!(
                    "pid {} ({}): swap-in of {page:#x}: {r:?}",
                    proc.pid,
                    proc.name
                );
            }
        })) {
            Install::Done => {
                tracing::trace!("pid {}: swap-in {page:#x}", proc.pid);
                m.set_resident(page, Charge::Reserved);
                bump(&proc.counters.swapins);
                true
            }
            Install::Retry => {
                drop(m);
                unreserve(&sh.frames_used, 1);
                // Keep what was read: the retry only repeats the copy.
                *read_back = Some(ReadBack {
                    cell: cell.clone(),
                    buf,
                });
                false
            }
            Install::Gone => {
                drop(m);
                unreserve(&sh.frames_used, 1);
                true
            }
        },
        Err(why) => {
            drop(m);
            unreserve(&sh.frames_used, 1);
            tracing::error!(
                "pid {}: page {page:#x} cannot be read back ({why}): poisoning it",
                proc.pid
            );
            bump(&proc.counters.poisoned);
            !matches!(classify(sys::poison(&proc.uffd, page)), Install::Retry)
        }
    }
}

/// The tagger's messages.
fn control(sh: &Arc<Shared>, proc: &Arc<Proc>, ch: Channel) {
    let _ = ch.set_recv_timeout(Some(Duration::from_millis(250)));
    let mut ticks = 0u32;
    loop {
        if proc.stop.load(Ordering::Acquire) || proc.gone.load(Ordering::Acquire) {
            return;
        }
        ticks += 1;
        if ticks % 4 == 0 {
            proc.tell_swapped(false);
            let _ = ch.send_nowait(&Message::CoverageRequest);
        }
        match ch.recv_with_fds() {
            Ok((msg, fds)) => on_message(sh, proc, msg, fds),
            Err(e) if e.is_retryable() => {}
            Err(e) if e.is_peer_gone() => return,
            Err(e) => {
                bump(&sh.bad_messages);
                tracing::warn!(
                    "pid {} ({}): refused a malformed message: {e}",
                    proc.pid,
                    proc.name
                );
            }
        }
    }
}

fn on_message(sh: &Arc<Shared>, proc: &Arc<Proc>, msg: Message, fds: Vec<OwnedFd>) {
    match msg {
        Message::RegisterRange { start, len, .. } => {
            let mut r = proc.ranges.lock().unwrap_or_else(|p| p.into_inner());
            r.insert(start, start + len);
        }
        Message::UnregisterRange { start, .. } => {
            let mut r = proc.ranges.lock().unwrap_or_else(|p| p.into_inner());
            r.remove(&start);
        }
        Message::Hint { addr, len, text } => {
            bump(&proc.counters.hints);
            match usm_policies::Hint::parse(&text) {
                Ok(hint) => {
                    tracing::debug!("pid {}: hint {text:?} on {addr:#x}+{len}", proc.pid);
                    apply_hint(sh, proc, addr, len, &hint);
                }
                Err(e) => tracing::warn!("pid {}: hint {text:?} refused: {e}", proc.pid),
            }
        }
        Message::Coverage {
            managed_anon_bytes,
            anon_bytes,
        } => {
            *proc.coverage.lock().unwrap_or_else(|p| p.into_inner()) =
                (managed_anon_bytes, anon_bytes);
        }
        Message::AgentReady {
            staging_start,
            staging_pages,
            ring_entries,
        } => match AgentClient::from_ready(staging_start, staging_pages, ring_entries, fds) {
            Ok(client) => {
                let free_slots = (0..staging_pages.min(ring_entries / 2)).rev().collect();
                *proc.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(Agent {
                    client,
                    free_slots,
                    undropped: Vec::new(),
                    stash: Vec::new(),
                    seq: 0,
                });
                proc.agent_tid
                    .store(find_thread(proc.pid, "usm-agent"), Ordering::Release);
                tracing::info!("pid {}: eviction agent ready", proc.pid);
            }
            Err(e) => {
                bump(&sh.bad_messages);
                tracing::warn!("pid {}: bad AgentReady refused: {e}", proc.pid);
            }
        },
        Message::AgentUnavailable { text } => {
            tracing::warn!(
                "pid {}: no eviction agent ({text}); its pages stay resident",
                proc.pid
            );
        }
        Message::Bye => {
            tracing::info!("pid {}: the tagger said Bye", proc.pid);
        }
        other => {
            bump(&sh.bad_messages);
            tracing::warn!(
                "pid {}: refused {} (not a tagger → daemon message)",
                proc.pid,
                other.name()
            );
        }
    }
}

/// Records a hint in the process's hint map (what the policies read) and tells its
/// eviction and allocation policies.
fn apply_hint(sh: &Shared, proc: &Proc, addr: u64, len: u64, hint: &usm_policies::Hint) {
    let range = addr..addr.saturating_add(len);
    proc.lock_map().fifo.on_hint(range.clone(), hint);
    let origin = Origin {
        pid: proc.pid,
        tid: 0,
    };
    let region = proc.registered_range(addr);
    notify_alloc(sh, proc, region, |alloc, cx| {
        alloc.hint(origin, range, hint, cx)
    });
}

/// The tid of `pid`'s thread named `comm` (0 if none).
pub(crate) fn find_thread(pid: u32, comm: &str) -> u32 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    for e in dir.flatten() {
        let named =
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == comm);
        if named {
            if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) {
                return tid;
            }
        }
    }
    0
}

/// Used by shutdown: puts every page of `proc` back into it (blocking this OS thread
/// on swap reads), so the program can continue unmanaged. Returns pages restored and
/// pages that could not be restored (poisoned).
pub(crate) fn give_back(sh: &Shared, proc: &Proc) -> (u64, u64) {
    let outs: Vec<(u64, Arc<SwapCell>)> = {
        let m = proc.lock_map();
        m.pages
            .iter()
            .filter_map(|(&a, s)| match s {
                PageState::Out(c) => Some((a, c.clone())),
                PageState::Resident { .. } => None,
            })
            .collect()
    };
    let (mut ok, mut bad) = (0, 0);
    for (page, cell) in outs {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let data: Result<PageBuf, String> = {
                let d = cell.data.lock().unwrap_or_else(|p| p.into_inner());
                match &*d {
                    CellData::Evicting if Instant::now() < deadline => {
                        drop(d);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    CellData::Evicting | CellData::Lost => Err("lost".into()),
                    CellData::Cached(b) => {
                        let mut c = PageBuf::page();
                        c.copy_from_slice(b);
                        Ok(c)
                    }
                    CellData::Stored(e) => {
                        let e = *e;
                        drop(d);
                        sh.swap.read(e).wait()
                    }
                }
            };
            let mut m = proc.lock_map();
            let same =
                matches!(m.pages.get(&page), Some(PageState::Out(c)) if Arc::ptr_eq(c, &cell));
            if !same {
                break;
            }
            match data {
                Ok(buf) => match classify(sys::copy_into(&proc.uffd, page, &buf)) {
                    Install::Retry if Instant::now() < deadline => {
                        drop(m);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Install::Done => {
                        m.set_resident(page, Charge::Now);
                        ok += 1;
                    }
                    _ => {
                        m.remove_range(page, page + PAGE);
                        bad += 1;
                    }
                },
                Err(_) => {
                    let _ = sys::poison(&proc.uffd, page);
                    m.remove_range(page, page + PAGE);
                    bad += 1;
                }
            }
            break;
        }
    }
    (ok, bad)
}

/// Raw fd of the userfaultfd (diagnostics).
#[allow(dead_code)]
pub(crate) fn uffd_raw(proc: &Proc) -> i32 {
    proc.uffd.as_raw_fd()
}

/// Refuses a connection whose Hello failed (peer fault): the error is logged, the
/// daemon goes on.
pub(crate) fn log_refused(sh: &Shared, e: &ProtoError) {
    bump(&sh.refused);
    tracing::warn!("refused a tagger: {e}");
}
