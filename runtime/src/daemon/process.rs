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
//!   swap-in parks it on its I/O ([`super::swapio`]), so the worker serves other faults
//!   meanwhile, and one thread's swap-in never delays another thread's fault.
//! - **control** (`usm-ctl-PID`): the tagger's socket: hints, coverage, range notices,
//!   the agent's setup. A malformed message is logged and refused; the session goes on.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use usm_sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use usm_sync::{Arc, Mutex, MutexGuard};

use usm_kmod::{Features, RawUserfaultfd, Resolved, UffdEvent, Userfaultfd};
use usm_proto::agent::AgentClient;
use usm_proto::server::TaggedPeer;
use usm_proto::{Channel, Message, ProtoError, RefusalReason};
use usm_swap::PageBuf;

use super::Shared;
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
    /// Pages per flexible huge page (1: off).
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
}

impl Proc {
    pub(crate) fn lock_map(&self) -> MutexGuard<'_, PageMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stat(&self) -> ProcessStat {
        let (resident, swapped) = {
            let m = self.lock_map();
            (m.charged, m.out)
        };
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (managed, anon) = *self.coverage.lock().unwrap_or_else(|p| p.into_inner());
        ProcessStat {
            pid: self.pid,
            name: self.name.clone(),
            parent: self.parent,
            policy: self.policy.clone(),
            resident_pages: resident,
            swapped_pages: swapped,
            faults: l(&c.faults),
            zero_fills: l(&c.zero_fills),
            fhp_pages: l(&c.fhp_pages),
            swapins: l(&c.swapins),
            evictions: l(&c.evictions),
            evict_skipped: l(&c.evict_skipped),
            poisoned: l(&c.poisoned),
            policy_panics: l(&c.policy_panics),
            forks: l(&c.forks),
            remaps: l(&c.remaps),
            removes: l(&c.removes),
            unmaps: l(&c.unmaps),
            released_frames: l(&c.released_frames),
            hints: l(&c.hints),
            agent: self.agent.lock().map(|a| a.is_some()).unwrap_or(false),
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

    /// Is `[start, start+len)` inside one range the tagger registered?
    fn in_registered(&self, start: u64, len: u64) -> bool {
        let r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.range(..=start)
            .next_back()
            .is_some_and(|(_, &end)| start + len <= end)
    }
}

/// Admits a tagger: policy by name, `UFFDIO_API`, Ack, then the reader and control
/// threads. Unmatched names, failed negotiation or a stopping daemon get `Refused`.
pub(crate) fn admit(sh: &Arc<Shared>, peer: TaggedPeer) {
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
    bump(&sh.admitted);
    tracing::info!("pid {pid} ({name}): managed by policy {policy}");
    let proc = Arc::new(Proc {
        pid,
        name,
        parent: None,
        fhp_pages: sh.fhp_pages_for(&policy),
        policy,
        uffd,
        map: Mutex::new(PageMap::new(sh.frames_used.clone())),
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
    });
    sh.add_proc(proc.clone());
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
        UffdEvent::Pagefault { addr, tid, .. } => {
            bump(&proc.counters.faults);
            let t0 = Instant::now();
            let urgent = tid != 0 && tid == proc.agent_tid.load(Ordering::Acquire);
            let (s, p) = (sh.clone(), proc.clone());
            let job = move || serve_fault(&s, &p, addr & !(PAGE - 1), urgent, t0);
            match sh.runner {
                super::FaultRunner::Threads => sh.fault_threads.submit(Box::new(job)),
                super::FaultRunner::UThreads => {
                    if let Err(e) = sh.handle.spawn(job) {
                        // No runtime (shutting down): serve here rather than leave it.
                        tracing::debug!("spawn failed ({e}); serving the fault on the reader");
                        serve_fault(sh, proc, addr & !(PAGE - 1), urgent, t0);
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
        }
        UffdEvent::Unmap { start, end } => {
            bump(&proc.counters.unmaps);
            let rel = proc.lock_map().remove_range(start, end);
            proc.counters
                .released_frames
                .fetch_add(rel.frames, Ordering::Relaxed);
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
    if let Ok(mut a) = proc.agent.lock() {
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

/// Serves one fault of `proc` at `page`. Runs on a workee.
pub(crate) fn serve_fault(sh: &Shared, proc: &Proc, page: u64, urgent: bool, t0: Instant) {
    sh.in_flight.fetch_add(1, Ordering::AcqRel);
    serve_fault_inner(sh, proc, page, urgent, t0);
    sh.in_flight.fetch_sub(1, Ordering::AcqRel);
}

fn serve_fault_inner(sh: &Shared, proc: &Proc, page: u64, urgent: bool, t0: Instant) {
    for attempt in 0..100_000u32 {
        if proc.gone.load(Ordering::Acquire) {
            return;
        }
        let state = proc.lock_map().pages.get(&page).cloned();
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
                tracing::trace!("pid {}: fault on resident page {page:#x}", proc.pid);
                let _ = proc.uffd.wake(page, PAGE);
                true
            }
            None => fill_fresh(sh, proc, page, urgent),
            Some(PageState::Out(cell)) => swap_in(sh, proc, page, &cell, urgent),
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

/// First touch: zeros, possibly a whole flexible huge page. Returns true when done.
fn fill_fresh(sh: &Shared, proc: &Proc, page: u64, urgent: bool) -> bool {
    if proc.fhp_pages > 1 && fill_fhp(sh, proc, page) {
        return true;
    }
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

/// A flexible huge page: the aligned block around `page`, when it is wholly inside one
/// registered range, untouched, and frames are free now. Returns true when mapped.
fn fill_fhp(sh: &Shared, proc: &Proc, page: u64) -> bool {
    let n = proc.fhp_pages;
    let block = page & !(n * PAGE - 1);
    if !proc.in_registered(block, n * PAGE) || !try_reserve(&sh.frames_used, n, sh.pool_pages) {
        return false;
    }
    let mut m = proc.lock_map();
    let vacant = (0..n).all(|i| !m.pages.contains_key(&(block + i * PAGE)));
    if proc.gone.load(Ordering::Acquire) || !vacant {
        drop(m);
        unreserve(&sh.frames_used, n);
        return false;
    }
    let r = sys::copy_into(&proc.uffd, block, zeros((n * PAGE) as usize));
    let mapped = match r {
        Ok(Resolved::Done(b) | Resolved::Partial(b)) => b / PAGE,
        _ => 0,
    };
    for i in 0..mapped {
        m.set_resident(block + i * PAGE, Charge::Reserved);
    }
    drop(m);
    unreserve(&sh.frames_used, n - mapped);
    if mapped > 0 {
        bump(&proc.counters.zero_fills);
        proc.counters
            .fhp_pages
            .fetch_add(mapped - 1, Ordering::Relaxed);
    }
    (block..block + mapped * PAGE).contains(&page)
}

/// Swap-in of `page` from `cell`. Returns true when done.
fn swap_in(sh: &Shared, proc: &Proc, page: u64, cell: &Arc<SwapCell>, urgent: bool) -> bool {
    // Where is the data?
    let data: Result<PageBuf, String> = {
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
    let same = matches!(m.pages.get(&page), Some(PageState::Out(c)) if Arc::ptr_eq(c, cell));
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
                Ok(_) => tracing::debug!("pid {}: hint {text:?} on {addr:#x}+{len}", proc.pid),
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
