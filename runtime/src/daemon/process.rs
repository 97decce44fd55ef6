//! One managed process: admission, its userfaultfd reader and its control channel. Its
//! memory is a space of the daemon's memory manager ([`usm_mm::MmCore`]), served by the
//! workers ([`super::driver`]).
//!
//! # Threads per process (who does what)
//! - **reader** (`usm-rd-PID`): polls the userfaultfd and the pidfd (and its own swap
//!   engine's eventfd and wake eventfd), reads every message in batches and never blocks
//!   on anything but the memory manager's lock: a page fault is served at once by the
//!   reader's own [`FaultServer`] (installed, or its swap-in submitted; held and evaluated
//!   again, level-triggered, before every sleep until its page is present; see
//!   [`super::driver`], "Who serves a fault"), or, without one, becomes a job for the
//!   workers; FORK/REMAP/REMOVE/UNMAP are applied to the space at
//!   once ([`usm_mm::MmCore::fork_space`], `remap`, `discard`) — the kernel holds the
//!   program's `fork`/`munmap` until the event is read, so the map is current before any
//!   later fault is read. Events on the agent's staging area are the daemon's own doing
//!   and are skipped. It ends when the process exits (pidfd, or a dead mm for a fork
//!   child) and gives back every frame and slot ([`usm_mm::MmCore::remove_space`]),
//!   finishes the evictions an exited program's agent will never answer, lets the
//!   threads of the faults it still holds run and reaps what its engine has in flight
//!   ([`usm_mm::WorkerMm::retire`]) — all before the process leaves the daemon's list
//!   (what `usm exec` waits for before its report) — then gives its worker index back.
//!   While a fence holds faults back (the agent may still run requests sent before an
//!   address was freed), faults already taken are evaluated as before; new ones wait.
//! - **control** (`usm-ctl-PID`): the tagger's socket: hints, coverage, range notices,
//!   the agent's setup, and `SwapState` (how many pages are out). A malformed message is
//!   logged and refused; the session goes on.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use usm_sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use usm_sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_kmod::{Features, RawUserfaultfd, UffdEvent, Userfaultfd};
use usm_mm::{MmCore, WorkerMm};
use usm_proto::agent::AgentClient;
use usm_proto::server::TaggedPeer;
use usm_proto::{Channel, Message, ProtoError, RefusalReason};

use super::Shared;
use super::agent::AgentLink;
use super::driver::{FaultJob, FaultServer, Job, Notice};
use super::stats::{ProcCounters, ProcessStat, bump};
use super::sys;
use crate::sys::remote::RemoteInstaller;

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
const AGENT_RING_ENTRIES: u32 = 512;

const PAGE: u64 = 4096;

/// A managed address space (a tagged process, or a fork child of one).
pub(crate) struct Proc {
    /// Its space in the memory manager (the pid; a number of the daemon's own for a fork
    /// child, whose pid the fork event does not tell).
    pub(crate) space: u32,
    /// The pid (0: a fork child whose pid is not known yet; see [`Proc::learn_pid`]).
    pid: AtomicU32,
    /// The uid it runs as (a fork child's is its parent's): only a session of this uid
    /// may adopt a fork child's space.
    pub(crate) uid: u32,
    pub(crate) name: String,
    pub(crate) parent: Option<u32>,
    /// The configured allocation policy spec.
    pub(crate) policy: String,
    pub(crate) installer: Arc<RemoteInstaller>,
    pub(crate) counters: ProcCounters,
    /// The tagger's session (a fork child's is set when its own session is adopted).
    pub(crate) channel: std::sync::OnceLock<Channel>,
    /// Ranges the tagger says it registered (advisory), start → end.
    pub(crate) ranges: Mutex<BTreeMap<u64, u64>>,
    /// The process is gone; nothing may be served for it any more.
    pub(crate) gone: AtomicBool,
    /// Stop serving (daemon shutdown, after every page was given back).
    pub(crate) stop: AtomicBool,
    pub(crate) coverage: Mutex<(u64, u64)>,
    /// Last count of pages out told to the tagger.
    pub(crate) told_away: AtomicU64,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    /// Counts this tagger's session against its uid and pid until the `Proc` is dropped
    /// (`None` for a fork child known by its parent's FORK event until it is adopted).
    /// See `sessions`.
    pub(crate) session: Mutex<Option<super::sessions::SessionGuard>>,
}

impl Proc {
    /// The pid (0: a fork child whose first fault has not been read yet).
    pub(crate) fn pid(&self) -> u32 {
        self.pid.load(Ordering::Acquire)
    }

    /// The tagger's session, if it has one.
    pub(crate) fn channel(&self) -> Option<&Channel> {
        self.channel.get()
    }

    /// A fork child's pid, from the thread of its first fault (`THREAD_ID`): a forked
    /// child has one thread at birth and reads its fork gate before anything else, so
    /// that thread is the group leader; its thread group id is checked in `/proc`.
    fn learn_pid(&self, tid: u32) {
        if tid == 0 || self.pid() != 0 {
            return;
        }
        if let Some(pid) = thread_group(tid) {
            if self
                .pid
                .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                tracing::debug!("{}: fork child is pid {pid}", self.name);
            }
        }
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    pub(crate) fn stat(&self, core: &MmCore) -> ProcessStat {
        let s = core.space_counters(self.space).unwrap_or_default();
        let (policy, evict_policy, oom_policy) = core.policy_names(self.space);
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (managed, anon) = *self.coverage.lock().unwrap_or_else(|p| p.into_inner());
        ProcessStat {
            pid: self.pid(),
            name: self.name.clone(),
            parent: self.parent,
            policy: if policy.is_empty() {
                self.policy.clone()
            } else {
                policy
            },
            evict_policy,
            oom_policy,
            resident_pages: s.resident as u64,
            swapped_pages: s.swapped as u64,
            faults: l(&c.faults),
            zero_fills: s.zero_fills,
            fhp_pages: s.fhp_pages,
            swapins: s.swap_ins,
            evictions: s.evictions,
            evict_skipped: s.evict_skipped,
            samples: s.samples,
            sample_refaults: s.sample_refaults,
            poisoned: s.poisoned as u64,
            policy_panics: s.policy_panics,
            forks: l(&c.forks),
            remaps: l(&c.remaps),
            removes: l(&c.removes),
            unmaps: l(&c.unmaps),
            released_frames: l(&c.released_frames),
            hints: l(&c.hints),
            hints_refused: l(&c.hints_refused),
            agent: self.installer.has_agent(),
            managed_anon_bytes: managed,
            anon_bytes: anon,
            latency: c.latency(),
            latency_buckets: c.latency_buckets(),
        }
    }

    /// Makes the mapping around `addr` managed (a first fault there). Returns false
    /// when `addr` is in no mapping of the program.
    pub(crate) fn manage_around(&self, core: &MmCore, addr: u64) -> bool {
        let page = addr & !(PAGE - 1);
        let range = if self.pid() != 0 {
            match vma_around(self.pid(), page) {
                Some(r) => r,
                None => return false,
            }
        } else {
            // A fork child: its pid is unknown; manage the page (its parent's ranges
            // were inherited at fork, so this is rare).
            page..page + PAGE
        };
        match core.manage(self.space, range) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(pid = self.pid(), addr, "cannot manage the mapping: {e}");
                false
            }
        }
    }
}

/// The thread group (process) of thread `tid`, from `/proc/TID/status`.
fn thread_group(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The extent of `pid`'s mapping holding `addr`, from `/proc/PID/maps`.
fn vma_around(pid: u32, addr: u64) -> Option<std::ops::Range<u64>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    for line in maps.lines() {
        let span = line.split_whitespace().next()?;
        let (a, b) = span.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        if (a..b).contains(&addr) {
            return Some(a..b);
        }
    }
    None
}

/// Admits a tagger: policy by name, `UFFDIO_API`, Ack, its space, then the reader and
/// control threads. Unmatched names, failed negotiation or a stopping daemon get
/// `Refused`. A forked child of a managed process is adopted into the space made at its
/// `fork` instead ([`adopt`]).
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
    if let Some(child) = sh.unadopted_child(pid, peer.uid) {
        adopt(sh, &child, peer, session);
        return;
    }
    let uid = peer.uid;
    let TaggedPeer { uffd, stream, .. } = peer;
    let negotiated =
        RawUserfaultfd::from_fd(uffd).and_then(|raw| raw.negotiate(REQUESTED, REQUIRED));
    let uffd = match negotiated {
        Ok(u) => Arc::new(u),
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
    let kill_fd = pidfd.try_clone().ok();
    let features = uffd.features();
    let _ = stream.set_send_timeout(Some(Duration::from_secs(1)));
    let channel = stream.try_clone().ok();
    let installer = Arc::new(RemoteInstaller::new(uffd, kill_fd, channel, false));
    if let Err(e) = sh.core.add_process(pid, installer.clone(), &policy) {
        bump(&sh.refused);
        tracing::error!("pid {pid} ({name}): cannot build its policies: {e}");
        let _ = stream.send_nowait(&Message::Refused {
            reason: RefusalReason::NotConfigured,
            text: format!("the daemon cannot build policy {policy}: {e}"),
        });
        return;
    }
    let ack = Message::Ack {
        features: features.bits(),
        policy: policy.clone(),
    };
    bump(&sh.admitted);
    let (alloc, evict, oom) = sh.core.policy_names(pid);
    tracing::info!(
        "pid {pid} ({name}): managed by policy {policy} (alloc {alloc}, evict {evict}, oom {oom})"
    );
    let proc = Arc::new(Proc {
        space: pid,
        pid: AtomicU32::new(pid),
        uid,
        name,
        parent: None,
        policy,
        installer,
        counters: ProcCounters::default(),
        channel: std::sync::OnceLock::from(stream),
        ranges: Mutex::new(BTreeMap::new()),
        gone: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        coverage: Mutex::new((0, 0)),
        told_away: AtomicU64::new(0),
        threads: Mutex::new(Vec::new()),
        session: Mutex::new(Some(session)),
    });
    // Listed before the Ack: a program that exits right after it (`usm exec -- true`)
    // is never missed by a caller that waits for the daemon's list to empty.
    sh.add_proc(proc.clone());
    if let Err(e) = proc.channel().map_or(Ok(()), |ch| ch.send(&ack)) {
        tracing::warn!("pid {}: cannot send Ack: {e}", proc.pid());
        finish(sh, &proc);
        return;
    }
    // The reader tells the allocation policy of the new process before it serves a
    // fault (or queues the notice ahead of the faults, see `reader`).
    start_threads(sh, &proc, Some(pidfd), true);
    start_agent(&proc, features);
}

/// Asks the tagger to start its eviction agent (needs `UFFDIO_MOVE`).
fn start_agent(proc: &Proc, features: Features) {
    if features.contains(Features::MOVE) {
        if let Some(ch) = proc.channel() {
            let _ = ch.send(&Message::StartAgent {
                staging_pages: AGENT_STAGING_PAGES,
                ring_entries: AGENT_RING_ENTRIES,
            });
        }
    }
}

/// A forked child's own session joins the space the daemon made from its parent's
/// `FORK` event (found by the pid learned from its fork-gate fault, same uid, its
/// address space alive): the child gets that context back (`Adopted`, the descriptor
/// attached) in place of the fresh one it sent, which is dropped un-negotiated. From
/// here the child is an ordinary managed process: one space for all of its memory, its
/// socket, its pidfd, and its own eviction agent, so the pages it swaps in (a redis
/// `BGSAVE` child reading its dataset) hold frames of the budget and can be evicted.
fn adopt(
    sh: &Arc<Shared>,
    child: &Arc<Proc>,
    peer: TaggedPeer,
    session: super::sessions::SessionGuard,
) {
    let TaggedPeer {
        pid,
        name,
        stream,
        uffd: fresh,
        ..
    } = peer;
    drop(fresh);
    let opened = sys::pidfd_open(pid)
        .map_err(|e| e.to_string())
        .and_then(|p| Ok((p, stream.try_clone().map_err(|e| e.to_string())?)));
    let (pidfd, channel) = match opened {
        Ok(both) => both,
        Err(e) => {
            bump(&sh.refused);
            tracing::warn!("pid {pid} ({name}): cannot adopt the fork child: {e}");
            return;
        }
    };
    // The pidfd also lets its reader see the exit at once from now on: stages in flight
    // are abandoned (their frames come back) before a daemon shutting down stops its
    // threads.
    if !child.installer.adopt(channel, pidfd) {
        bump(&sh.refused);
        let _ = stream.send_nowait(&Message::Refused {
            reason: RefusalReason::Busy,
            text: "this fork child's space has a session already".into(),
        });
        return;
    }
    let features = child.installer.uffd().features();
    let _ = stream.set_send_timeout(Some(Duration::from_secs(1)));
    let adopted = Message::Adopted {
        features: features.bits(),
        policy: child.policy.clone(),
    };
    if let Err(e) = stream.send_with_fd(&adopted, child.installer.uffd().as_fd()) {
        tracing::warn!("pid {pid} ({name}): cannot send Adopted: {e}");
        return;
    }
    let _ = child.channel.set(stream);
    *child.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
    bump(&sh.admitted);
    tracing::info!(
        "pid {pid} ({name}): fork child of pid {} adopted into the space made at its fork",
        child.parent.unwrap_or(0)
    );
    start_control(sh, child);
    start_agent(child, features);
}

/// Starts `proc`'s reader and control threads; `new_process`: its allocation policy
/// has not been told of it yet.
fn start_threads(sh: &Arc<Shared>, proc: &Arc<Proc>, pidfd: Option<OwnedFd>, new_process: bool) {
    let mut handles = Vec::new();
    let (s, p) = (sh.clone(), proc.clone());
    match std::thread::Builder::new()
        .name(format!("usm-rd-{}", proc.pid()))
        .spawn(move || reader(&s, &p, pidfd, new_process))
    {
        Ok(h) => handles.push(h),
        Err(e) => tracing::error!("cannot start the reader of pid {}: {e}", proc.pid()),
    }
    proc.threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(handles);
    start_control(sh, proc);
}

/// Starts the control thread of `proc`'s session, if it has one.
fn start_control(sh: &Arc<Shared>, proc: &Arc<Proc>) {
    let Some(ch) = proc.channel() else {
        return;
    };
    let ch = match ch.try_clone() {
        Ok(ch) => ch,
        Err(e) => {
            tracing::error!("cannot clone the session of pid {}: {e}", proc.pid());
            return;
        }
    };
    spawn_for(sh, proc, "ctl", move |s, p| control(s, p, ch));
}

/// Starts thread `usm-KIND-PID` of `proc` running `f`; its handle joins the process's
/// threads (joined at daemon shutdown).
fn spawn_for(
    sh: &Arc<Shared>,
    proc: &Arc<Proc>,
    kind: &str,
    f: impl FnOnce(&Arc<Shared>, &Arc<Proc>) + Send + 'static,
) {
    let (s, p) = (sh.clone(), proc.clone());
    match std::thread::Builder::new()
        .name(format!("usm-{kind}-{}", proc.pid()))
        .spawn(move || f(&s, &p))
    {
        Ok(h) => proc
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(h),
        Err(e) => tracing::error!("cannot start thread usm-{kind}-{}: {e}", proc.pid()),
    }
}

/// Waits up to `timeout_ms` for readability of `fds` (`None`s are skipped); bit `i` of
/// the result: `fds[i]` is ready (readable, or hung up / in error: its read says which).
fn poll_fds(fds: &[Option<BorrowedFd<'_>>], timeout_ms: i32) -> u32 {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut polled: Vec<PollFd<'_>> = Vec::with_capacity(fds.len());
    let mut index = Vec::with_capacity(fds.len());
    for (i, fd) in fds.iter().enumerate() {
        if let Some(fd) = fd {
            polled.push(PollFd::new(*fd, PollFlags::POLLIN));
            index.push(i);
        }
    }
    let t = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    if poll(&mut polled, t).is_err() {
        return 0;
    }
    let mut ready = 0;
    for (f, i) in polled.iter().zip(index) {
        if f.revents().is_some_and(|r| !r.is_empty()) {
            ready |= 1 << i;
        }
    }
    ready
}

fn poll2(a: &impl AsFd, b: Option<&OwnedFd>, timeout_ms: i32) -> (bool, bool) {
    let r = poll_fds(&[Some(a.as_fd()), b.map(|b| b.as_fd())], timeout_ms);
    (r & 1 != 0, r & 2 != 0)
}

/// A reader's own fault server (see the module docs, "Who serves a fault"): a
/// [`FaultServer`] over a worker part of the memory manager of its own, under a worker
/// index of its own ([`MmCore::add_worker`]), woken through `wake` when a page it waits
/// for is installed by another thread or frames come free.
struct ReaderServer {
    server: FaultServer,
    wake: Arc<EventFd>,
    index: usize,
    core: Arc<MmCore>,
}

impl ReaderServer {
    /// `None` when the core has no worker index free (64 at most) or the engine cannot
    /// be built: the reader then hands its faults to the workers.
    fn start(core: &Arc<MmCore>) -> Option<ReaderServer> {
        let wake = match EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        ) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                tracing::warn!("a reader's eventfd: {e}; its faults go to the workers");
                return None;
            }
        };
        let w = wake.clone();
        let index = core.add_worker(Arc::new(move || {
            let _ = w.write(1);
        }))?;
        match WorkerMm::new(core.clone(), index) {
            Ok(wm) => Some(ReaderServer {
                server: FaultServer::new(wm),
                wake,
                index,
                core: core.clone(),
            }),
            Err(e) => {
                core.remove_worker(index);
                tracing::warn!("a reader's swap engine: {e}; its faults go to the workers");
                None
            }
        }
    }
}

impl Drop for ReaderServer {
    fn drop(&mut self) {
        self.server.release_all();
        self.server.wm().retire(Duration::from_secs(30));
        self.core.remove_worker(self.index);
    }
}

/// The one reader of `proc`'s userfaultfd; with a [`ReaderServer`] it also serves the
/// faults it reads.
fn reader(sh: &Arc<Shared>, proc: &Arc<Proc>, pidfd: Option<OwnedFd>, new_process: bool) {
    let mut events = Vec::with_capacity(64);
    let mut idle = 0u32;
    let uffd = proc.installer.uffd().clone();
    let mut server = ReaderServer::start(&sh.core);
    if new_process {
        match server.as_mut() {
            Some(s) => s.server.notify(proc, Notice::NewProcess),
            None => sh.jobs.push(Job::Notify {
                proc: proc.clone(),
                notice: Notice::NewProcess,
            }),
        }
    }
    // Faults read while the agent may still run requests sent before an address was
    // freed (see `RemoteInstaller::move_mark`): served once those are answered.
    let mut fence: Option<u64> = None;
    let mut held: Vec<UffdEvent> = Vec::new();
    loop {
        if proc.stop.load(Ordering::Acquire) {
            break;
        }
        if let Some(mark) = fence {
            if !proc.installer.moves_pending(mark) || proc.is_gone() {
                fence = None;
                for ev in held.drain(..) {
                    // Faults only: they set no fence.
                    handle_event(sh, proc, ev, server.as_mut().map(|s| &mut s.server));
                }
            }
        }
        // Level-triggered, before every sleep: reap this reader's I/O (installing the
        // swap-ins it read), then evaluate every fault it holds again.
        let mut timeout = 100;
        if let Some(s) = server.as_mut() {
            s.server.poll();
            if let Some(t) = s.server.park_timeout() {
                timeout = t.as_millis().clamp(1, 100) as i32;
            }
            if !s.server.wm().ready_to_sleep() {
                // Completion work its eventfd will not signal: look, do not sleep.
                timeout = 0;
            }
        }
        if fence.is_some() {
            timeout = 1;
        }
        // A fork child's reader starts without one; its adoption brings the pidfd.
        let exit_fd = pidfd.as_ref().or_else(|| proc.installer.pidfd());
        let ready = poll_fds(
            &[
                Some(uffd.as_fd()),
                exit_fd.map(|f| f.as_fd()),
                server.as_ref().and_then(|s| s.server.wm_ref().eventfd()),
                server.as_ref().map(|s| s.wake.as_fd()),
            ],
            timeout,
        );
        let exited = ready & 2 != 0;
        if ready & 8 != 0
            && let Some(s) = server.as_ref()
        {
            // Drained before the faults are evaluated again (next round): a wake after
            // this leaves it readable.
            let _ = s.wake.read();
        }
        events.clear();
        let n = if ready & 1 != 0 {
            match uffd.read_events(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("pid {}: reading the userfaultfd failed: {e}", proc.pid());
                    break;
                }
            }
        } else {
            0
        };
        if n == 0 {
            if exited {
                break;
            }
            if ready == 0 {
                idle += 1;
                if exit_fd.is_none() && idle % 5 == 0 && !sys::mm_alive(&uffd) {
                    break;
                }
            }
            continue;
        }
        idle = 0;
        for ev in events.drain(..) {
            if fence.is_some() && matches!(ev, UffdEvent::Pagefault { .. }) {
                held.push(ev);
            } else if let Some(mark) =
                handle_event(sh, proc, ev, server.as_mut().map(|s| &mut s.server))
            {
                fence = Some(fence.map_or(mark, |m| m.max(mark)));
            }
        }
    }
    // After the space went and before the process leaves the daemon's list: what this
    // reader still has in flight completes into a space that is gone (frames and slots
    // freed, nothing installed), so a caller that waits for the list to empty (`usm
    // exec`'s report) finds every frame back.
    // A program that exited answers none of the evictions its agent still had: they
    // are finished here (fenced: their frames come back now) rather than by the agent
    // thread's next look and a worker. Collected first: `abandon` calls back under the
    // agent's lock, which is taken under the core's.
    finish_then(sh, proc, || {
        if let Some(mut s) = server {
            if !proc.stop.load(Ordering::Acquire) {
                let mut stages = Vec::new();
                proc.installer
                    .abandon(&mut |frame, moved| stages.push((frame, moved)));
                for (frame, moved) in stages {
                    s.server.wm().finish_stage(proc.space, frame, moved);
                }
            }
            drop(s);
        }
    });
}

/// Applies one event. Returns a fence mark after an event that freed or moved
/// addresses (see [`RemoteInstaller::move_mark`]).
/// A page fault is served by `server` (the reader's own) at once, else queued for the
/// workers.
fn handle_event(
    sh: &Arc<Shared>,
    proc: &Arc<Proc>,
    ev: UffdEvent,
    server: Option<&mut FaultServer>,
) -> Option<u64> {
    let staging = proc.installer.staging_range();
    let ours = |start: u64, end: u64| {
        staging
            .as_ref()
            .is_some_and(|s| start >= s.start && end <= s.end)
    };
    match ev {
        UffdEvent::Pagefault {
            addr, tid, write, ..
        } => {
            bump(&proc.counters.faults);
            if proc.parent.is_some() {
                proc.learn_pid(tid);
            }
            let job = FaultJob {
                proc: proc.clone(),
                addr: addr & !(PAGE - 1),
                write,
                tid,
                t0: Instant::now(),
            };
            match server {
                Some(s) => {
                    s.take(job);
                }
                None => sh.jobs.push(Job::Fault(job)),
            }
        }
        UffdEvent::Fork { child } => {
            bump(&proc.counters.forks);
            match Userfaultfd::from_fork(child, proc.installer.uffd()) {
                Ok(uffd) => {
                    let space = sh.next_child_space();
                    let installer =
                        Arc::new(RemoteInstaller::new(Arc::new(uffd), None, None, true));
                    if let Err(e) = sh.core.fork_space(proc.space, space, installer.clone()) {
                        tracing::warn!("pid {}: cannot adopt a fork child: {e}", proc.pid());
                        return None;
                    }
                    let child = Arc::new(Proc {
                        space,
                        pid: AtomicU32::new(0),
                        uid: proc.uid,
                        name: format!("{} (child)", proc.name),
                        parent: Some(if proc.pid() != 0 {
                            proc.pid()
                        } else {
                            proc.parent.unwrap_or(0)
                        }),
                        policy: proc.policy.clone(),
                        installer,
                        counters: ProcCounters::default(),
                        channel: std::sync::OnceLock::new(),
                        ranges: Mutex::new(
                            proc.ranges
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone(),
                        ),
                        gone: AtomicBool::new(false),
                        stop: AtomicBool::new(false),
                        coverage: Mutex::new((0, 0)),
                        told_away: AtomicU64::new(0),
                        threads: Mutex::new(Vec::new()),
                        session: Mutex::new(None),
                    });
                    sh.add_proc(child.clone());
                    start_threads(sh, &child, None, false);
                }
                Err(e) => tracing::warn!("pid {}: cannot adopt a fork child: {e}", proc.pid()),
            }
        }
        UffdEvent::Remap { from, to, len } => {
            bump(&proc.counters.remaps);
            if let Err(e) = sh.core.remap(proc.space, from, to, len) {
                tracing::warn!("pid {}: mremap {from:#x} -> {to:#x}: {e}", proc.pid());
            }
            proc.ranges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(to, to + len);
            return proc.installer.move_mark();
        }
        UffdEvent::Remove { start, end } => {
            if ours(start, end) {
                return None;
            }
            bump(&proc.counters.removes);
            let rel = sh.core.discard(proc.space, start..end, true);
            proc.counters
                .released_frames
                .fetch_add(rel.frames as u64, Ordering::Relaxed);
            sh.jobs.push(Job::Notify {
                proc: proc.clone(),
                notice: Notice::Free(start..end),
            });
            return proc.installer.move_mark();
        }
        UffdEvent::Unmap { start, end } => {
            if ours(start, end) {
                return None;
            }
            bump(&proc.counters.unmaps);
            let rel = sh.core.discard(proc.space, start..end, false);
            proc.counters
                .released_frames
                .fetch_add(rel.frames as u64, Ordering::Relaxed);
            sh.jobs.push(Job::Notify {
                proc: proc.clone(),
                notice: Notice::Free(start..end),
            });
            return proc.installer.move_mark();
        }
    }
    None
}

/// The process is gone (or the daemon stops): give back every frame and slot.
fn finish(sh: &Arc<Shared>, proc: &Arc<Proc>) {
    finish_then(sh, proc, || {});
}

/// [`finish`], running `then` after the space is removed and before the process leaves
/// the daemon's list.
fn finish_then(sh: &Arc<Shared>, proc: &Arc<Proc>, then: impl FnOnce()) {
    proc.gone.store(true, Ordering::Release);
    // What it did, before its space goes (the policy instance goes with the space).
    let stat = proc.stat(&sh.core);
    if !proc.stop.load(Ordering::Acquire) {
        let rel = sh.core.remove_space(proc.space);
        proc.counters
            .released_frames
            .fetch_add(rel.frames as u64, Ordering::Relaxed);
    }
    then();
    if let Some(ch) = proc.channel() {
        ch.shutdown();
    }
    sh.remove_proc(proc, stat);
}

/// The tagger's messages.
fn control(sh: &Arc<Shared>, proc: &Arc<Proc>, ch: Channel) {
    let _ = ch.set_recv_timeout(Some(Duration::from_millis(250)));
    let mut ticks = 0u32;
    loop {
        if proc.stop.load(Ordering::Acquire) || proc.is_gone() {
            return;
        }
        ticks += 1;
        tell_away(sh, proc, false);
        if ticks % 4 == 0 {
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
                    proc.pid(),
                    proc.name
                );
            }
        }
    }
}

/// The daemon's side of `proc`'s eviction agent: takes its answers as they come (woken
/// by its `done` eventfd) and hands each finished eviction to the workers. Holds no lock
/// of the memory manager (see [`super::agent`]).
fn agent_thread(sh: &Arc<Shared>, proc: &Arc<Proc>, done: OwnedFd) {
    let pool = sh.core.pool().clone();
    let mut finished = |frame, moved| {
        sh.jobs.push(Job::StageDone {
            proc: proc.clone(),
            frame,
            moved,
        });
    };
    loop {
        if proc.stop.load(Ordering::Acquire) {
            break;
        }
        if proc.is_gone() {
            proc.installer.abandon(&mut finished);
            break;
        }
        let (ready, _) = poll2(&done, None, 100);
        if ready {
            let mut buf = [0u8; 8];
            let _ = nix::unistd::read(&done, &mut buf);
        }
        if proc.installer.reap(&pool, &mut finished) {
            sh.core.wake_memory_waiters();
        }
    }
}

/// Tells the tagger how many pages are out (the memory manager's count), if it changed
/// or `force`; lets held staging copies go once it knows. Never blocks.
pub(crate) fn tell_away(sh: &Shared, proc: &Proc, force: bool) {
    let away = sh
        .core
        .space_counters(proc.space)
        .map_or(0, |c| c.away as u64);
    if force || proc.told_away.swap(away, Ordering::AcqRel) != away {
        proc.installer.tell_away(away);
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
            // The memory manager records the hint in the process's space (where the
            // fault, eviction and prefetch paths read it) with the same parser libusm
            // checked it with; the allocation policy hears of it through a Notify.
            let parsed = usm_policies::Hint::parse(&text);
            match parsed.map(|h| (h, sh.core.hint(proc.space, addr, len, &text))) {
                Ok((hint, Ok(()))) => {
                    bump(&proc.counters.hints);
                    tracing::debug!("pid {}: hint {text:?} on {addr:#x}+{len}", proc.pid());
                    sh.jobs.push(Job::Notify {
                        proc: proc.clone(),
                        notice: Notice::Hint(addr..addr.saturating_add(len), hint),
                    });
                }
                Ok((_, Err(e))) => {
                    bump(&proc.counters.hints_refused);
                    tracing::warn!("pid {}: hint {text:?} not applied: {e}", proc.pid());
                }
                Err(e) => {
                    bump(&proc.counters.hints_refused);
                    tracing::warn!("pid {}: hint {text:?} refused: {e}", proc.pid());
                }
            }
        }
        Message::Coverage {
            managed_anon_bytes,
            anon_bytes,
        } => {
            // Kept at the process's peak of anonymous memory: at exit a program frees its
            // managed memory first, and a last sample would say nothing of the run.
            let mut c = proc.coverage.lock().unwrap_or_else(|p| p.into_inner());
            if anon_bytes >= c.1 {
                *c = (managed_anon_bytes, anon_bytes);
            }
        }
        Message::AgentReady {
            staging_start,
            staging_pages,
            ring_entries,
        } => match AgentClient::from_ready(staging_start, staging_pages, ring_entries, fds) {
            Ok(client) => {
                match proc
                    .installer
                    .set_agent(AgentLink::new(client, proc.pid(), ring_entries))
                {
                    Ok(done) => {
                        spawn_for(sh, proc, "ag", move |s, p| agent_thread(s, p, done));
                        tracing::info!("pid {}: eviction agent ready", proc.pid());
                    }
                    Err(e) => tracing::warn!("pid {}: agent set-up: {e}", proc.pid()),
                }
            }
            Err(e) => {
                bump(&sh.bad_messages);
                tracing::warn!("pid {}: bad AgentReady refused: {e}", proc.pid());
            }
        },
        Message::AgentUnavailable { text } => {
            tracing::warn!(
                "pid {}: no eviction agent ({text}); its pages stay resident",
                proc.pid()
            );
        }
        Message::Bye => {
            tracing::info!("pid {}: the tagger said Bye", proc.pid());
        }
        other => {
            bump(&sh.bad_messages);
            tracing::warn!(
                "pid {}: refused {} (not a tagger → daemon message)",
                proc.pid(),
                other.name()
            );
        }
    }
}

/// Used by shutdown: brings every page of `proc` that is out back into it through the
/// ordinary fault path (one job per page; with eviction off, a fault that finds no frame
/// lets a resident page go instead — it stays in the program), so the program can
/// continue unmanaged. Returns pages restored and pages that could not be (poisoned).
pub(crate) fn give_back(sh: &Shared, proc: &Arc<Proc>) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let poisoned_before = sh
        .core
        .space_counters(proc.space)
        .map_or(0, |c| c.poisoned as u64);
    let away = sh.core.away_pages(proc.space);
    let wanted = away.len() as u64;
    for addr in away {
        sh.jobs.push(Job::Fault(FaultJob {
            proc: proc.clone(),
            addr,
            write: false,
            tid: 0,
            t0: Instant::now(),
        }));
    }
    while Instant::now() < deadline && !proc.is_gone() {
        if sh.core.away_pages(proc.space).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = sh.core.space_counters(proc.space).unwrap_or_default();
    let left = sh.core.away_pages(proc.space).len() as u64;
    if left > 0 {
        tracing::error!(
            pid = proc.pid(),
            left,
            "pages still out when the daemon stops; the program will be told and stopped by its tagger"
        );
    }
    let lost = left + (c.poisoned as u64).saturating_sub(poisoned_before);
    (wanted.saturating_sub(left), lost)
}

/// Refuses a connection whose Hello failed (peer fault): the error is logged, the
/// daemon goes on.
pub(crate) fn log_refused(sh: &Shared, e: &ProtoError) {
    bump(&sh.refused);
    tracing::warn!("refused a tagger: {e}");
}
