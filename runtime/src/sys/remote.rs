//! The daemon's [`Installer`]: pages of *another* process (a tagged program).
//!
//! | | how |
//! |---|---|
//! | first touch, swap-in, swap-cache hit | `UFFDIO_COPY` from the daemon's pool slot (or zero source) through the program's userfaultfd; the slot is dropped in a batch |
//! | take a page out (evict, access sample) | the tagger's agent MOVEs it to its staging area, the daemon copies it into the frame's slot ([`crate::daemon::agent`]) |
//! | sampled re-fault | `UFFDIO_COPY` from the frame's slot (`unstage`) |
//! | lost content | `UFFDIO_POISON` through the program's userfaultfd |
//! | range going away | the frame is released; the page goes with the program's `munmap` |
//!
//! A fork child's space starts without an agent (the agent thread does not survive
//! `fork`) and cannot give pages back, so until the child's own session is adopted into
//! it ([`RemoteInstaller::adopt`]: its socket, its pidfd, then its own agent) its
//! installs are reported as *copied* (resident, not holding a frame of the budget: the
//! kernel's memory, as the pages it inherited). From the adoption on it is an ordinary
//! process.
//!
//! Every method runs under the memory manager's lock, on a worker.

use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};

use usm_kmod::pool::{CopyFrom, FrameOwner, FramePool};
use usm_kmod::{CopyMode, FrameNo, PAGE_SIZE, PoisonMode, Resolved, Userfaultfd};
use usm_mm::{InstallReport, Installer, MmError, StageOutcome};
use usm_proto::Channel;
use usm_sync::Mutex;

use crate::daemon::agent::AgentLink;
use crate::sys::install::{RunStep, record_run};

const PAGE: u64 = PAGE_SIZE as u64;

/// Installs into, and takes pages out of, one tagged process (or fork child).
pub(crate) struct RemoteInstaller {
    /// The program's userfaultfd (the daemon negotiated it).
    uffd: Arc<Userfaultfd>,
    /// A pidfd of the program, for the OOM policy's kill (a fork child's comes with its
    /// adoption).
    pidfd: std::sync::OnceLock<std::os::fd::OwnedFd>,
    /// The eviction agent, once the tagger started it.
    agent: Mutex<Option<AgentLink>>,
    /// The tagger's session (`SwapState` before staging copies are dropped); a fork
    /// child's comes with its adoption.
    channel: std::sync::OnceLock<Channel>,
    /// Pages taken out and not (known to be) back: what the tagger is told.
    away: AtomicU64,
    /// No agent can come (a fork child not adopted yet): installs are reported copied.
    agentless: AtomicBool,
    /// The agent's staging area, once known.
    staging: std::sync::OnceLock<std::ops::Range<u64>>,
}

impl RemoteInstaller {
    pub(crate) fn new(
        uffd: Arc<Userfaultfd>,
        pidfd: Option<std::os::fd::OwnedFd>,
        channel: Option<Channel>,
        agentless: bool,
    ) -> RemoteInstaller {
        RemoteInstaller {
            uffd,
            pidfd: once(pidfd),
            agent: Mutex::new(None),
            channel: once(channel),
            away: AtomicU64::new(0),
            agentless: AtomicBool::new(agentless),
            staging: std::sync::OnceLock::new(),
        }
    }

    /// A fork child's own session takes over this (agentless) space: from now on pages
    /// installed hold frames of the budget, and its agent can take them out again.
    /// Returns false (and changes nothing) if the space has a session already.
    pub(crate) fn adopt(&self, channel: Channel, pidfd: std::os::fd::OwnedFd) -> bool {
        if self.channel.set(channel).is_err() {
            return false;
        }
        let _ = self.pidfd.set(pidfd);
        self.agentless.store(false, Ordering::Release);
        true
    }

    /// The program's pidfd (readable when it exits), once known.
    pub(crate) fn pidfd(&self) -> Option<&std::os::fd::OwnedFd> {
        self.pidfd.get()
    }

    /// Whether installs must be copies that hold no frame (no agent can ever take them
    /// out: a fork child not adopted yet).
    fn agentless(&self) -> bool {
        self.agentless.load(Ordering::Acquire)
    }

    /// The program's userfaultfd.
    pub(crate) fn uffd(&self) -> &Arc<Userfaultfd> {
        &self.uffd
    }

    /// The agent is ready. Returns a descriptor that becomes readable when it answers
    /// (for the process's agent thread, which calls [`RemoteInstaller::reap`]).
    pub(crate) fn set_agent(&self, link: AgentLink) -> std::io::Result<std::os::fd::OwnedFd> {
        let fd = link.done_fd()?;
        let r = link.staging_range();
        let _ = self.staging.set(r);
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(link);
        Ok(fd)
    }

    /// Phase 2 of the agent's stages (see [`crate::daemon::agent`]): `done(frame, moved)`
    /// for every eviction the agent answered; then the held staging copies are dropped
    /// once the tagger knows how many pages are out.
    /// Returns whether staging slots came free (faults waiting for memory may go on).
    pub(crate) fn reap(&self, pool: &FramePool, done: &mut dyn FnMut(FrameNo, bool)) -> bool {
        let mut guard = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(agent) = guard.as_mut() else {
            return false;
        };
        let (taken, freed) = agent.reap(pool, done);
        let away = self.away.fetch_add(taken, Ordering::AcqRel) + taken;
        agent.drop_held(self.channel.get(), away);
        freed
    }

    /// The process is gone: finishes its evictions in flight as not moved.
    pub(crate) fn abandon(&self, done: &mut dyn FnMut(FrameNo, bool)) {
        if let Some(agent) = self
            .agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            agent.abandon(done);
        }
    }

    /// Requests name pages by address, and an address can be given to another page by
    /// the program's next `mmap`/`mremap` once the event that freed it was read. After
    /// applying such an event the reader takes this mark, and reads but does not serve
    /// faults until [`RemoteInstaller::moves_pending`] says every request sent before
    /// (by the view of the address space that the event changed) is answered: a new page
    /// at a freed address needs a fault served first, so no stale request can move it.
    /// `None`: no agent, nothing to wait for.
    pub(crate) fn move_mark(&self) -> Option<u64> {
        self.agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(AgentLink::last_seq)
    }

    /// Whether an eviction request numbered `mark` or lower is unanswered.
    pub(crate) fn moves_pending(&self, mark: u64) -> bool {
        self.agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|a| a.moves_up_to(mark))
    }

    /// Whether an agent serves this process.
    pub(crate) fn has_agent(&self) -> bool {
        self.agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The agent's staging area, if any (its `REMOVE` events are the daemon's doing).
    /// Never waits: the reader asks for every event.
    pub(crate) fn staging_range(&self) -> Option<std::ops::Range<u64>> {
        self.staging.get().cloned()
    }

    /// Corrects the count of pages out (from the memory manager's own count) and tells
    /// the tagger; drops held staging copies if it was told. Never blocks.
    pub(crate) fn tell_away(&self, away: u64) {
        self.away.store(away, Ordering::Release);
        if let Some(a) = self
            .agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            a.drop_held(self.channel.get(), away);
        } else if let Some(ch) = self.channel.get() {
            let _ = ch.send_nowait(&usm_proto::Message::SwapState {
                swapped_pages: away,
            });
        }
    }

    fn install_from(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
        from: CopyFrom,
    ) -> Result<InstallReport, MmError> {
        let mut report = InstallReport::default();
        let mut i = 0;
        while i < frames.len() {
            let at = start + i as u64 * PAGE;
            let rest = &frames[i..];
            if self.agentless() {
                // Copy each page; the frames stay Taken and go back (no budget held).
                let src = match from {
                    CopyFrom::Slots => {
                        pool.ensure_slot(rest[0])?;
                        pool.slot_addr(rest[0])
                    }
                    CopyFrom::Zero => ZEROS.0.as_ptr() as u64,
                };
                // SAFETY: (contract of `install_copy`) `at` is a vacant page of a range the
                // core manages in the program, under its lock; the source is the Taken
                // frame's present slot (the core's) or a static page of zeroes, read only.
                let r = unsafe { self.uffd.copy(at, src, PAGE, CopyMode::empty())? };
                match r {
                    Resolved::Done(_) | Resolved::Partial(_) => report.copied.push((at, rest[0])),
                    Resolved::AlreadyMapped => report.present.push((at, rest[0])),
                    _ => report.retry.push((at, rest[0])),
                }
                i += 1;
                continue;
            }
            // SAFETY: the core calls us with vacant pages of ranges it manages in the
            // program behind `self.uffd`, under its lock; the frames are Taken by it.
            let r = unsafe {
                pool.install_many_copy_into(&self.uffd, rest, at, owner, from, CopyMode::empty())?
            };
            match record_run(&mut report, at, rest, r) {
                RunStep::Stop => break,
                RunStep::Advance(n) => i += n,
                RunStep::UseCopy => {
                    // COPY has no EBUSY: not expected here; retry after the events.
                    report.retry.extend(
                        rest.iter()
                            .enumerate()
                            .map(|(k, &f)| (at + k as u64 * PAGE, f)),
                    );
                    break;
                }
            }
        }
        Ok(report)
    }
}

/// One page of zeroes, page aligned.
#[repr(C, align(4096))]
struct Zeros([u8; PAGE_SIZE]);
static ZEROS: Zeros = Zeros([0; PAGE_SIZE]);

impl Installer for RemoteInstaller {
    fn install(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        let r = self.install_from(pool, frames, start, owner, CopyFrom::Slots)?;
        let back = (r.mapped.len() + r.copied.len()) as u64;
        let _ = self
            .away
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                Some(a.saturating_sub(back))
            });
        Ok(r)
    }

    fn install_zeroed(
        &self,
        pool: &FramePool,
        frames: &[FrameNo],
        start: u64,
        owner: FrameOwner,
    ) -> Result<InstallReport, MmError> {
        self.install_from(pool, frames, start, owner, CopyFrom::Zero)
    }

    fn stage(&self, _pool: &FramePool, _frame: FrameNo) -> Result<bool, MmError> {
        // Only asynchronously (stage_many): a page of another process leaves through its
        // agent.
        Ok(false)
    }

    fn stages_async(&self) -> bool {
        // Evictions and access samples alike go through the agent (stage_many).
        true
    }

    fn busy(&self) -> bool {
        self.agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(AgentLink::slots_coming_back)
    }

    fn stage_many(&self, pool: &FramePool, frames: &[FrameNo], out: &mut Vec<StageOutcome>) {
        let mut guard = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(agent) = guard.as_mut() else {
            out.extend(std::iter::repeat_n(StageOutcome::Stayed, frames.len()));
            return;
        };
        let addrs: Vec<u64> = frames
            .iter()
            .map(|&f| pool.desc(f).map_or(0, |d| d.vaddr()))
            .collect();
        let mut sent = Vec::with_capacity(frames.len());
        agent.submit_evictions(frames, &addrs, &mut sent);
        out.extend(sent.into_iter().map(|s| {
            if s {
                StageOutcome::Pending
            } else {
                StageOutcome::Stayed
            }
        }));
    }

    fn unstage(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        // SAFETY: the core unstages only into the frame's own page, a hole of a range it
        // manages in the program, under its lock; COPY only reads the slot.
        let r = unsafe { pool.unstage_copy_into(&self.uffd, frame, CopyMode::empty())? };
        if r.is_done() {
            let _ = self
                .away
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                    Some(a.saturating_sub(1))
                });
        }
        Ok(r.is_done())
    }

    fn copy_staged(&self, pool: &FramePool, frame: FrameNo, addr: u64) -> Result<bool, MmError> {
        // SAFETY: `addr` is a vacant page of a range the core manages in this (fork
        // child's) address space, under its lock; the slot holds a staged page, read only.
        match unsafe { pool.copy_staged_into(&self.uffd, frame, addr, CopyMode::empty())? } {
            Resolved::Done(_) => Ok(true),
            Resolved::MmapChanging => Err(MmError::Protocol {
                frame,
                what: "UFFDIO_COPY: the address space is changing",
            }),
            _ => Ok(false),
        }
    }

    fn poison(&self, _pool: &FramePool, addr: u64) -> Result<(), MmError> {
        // SAFETY: POISON only installs a marker in a missing pte of a registered range of
        // the program; it touches no memory of this process.
        match unsafe { self.uffd.poison(addr, PAGE, PoisonMode::empty())? } {
            Resolved::Done(_) | Resolved::AlreadyMapped => Ok(()),
            _ => Err(MmError::Protocol {
                frame: FrameNo(u32::MAX),
                what: "UFFDIO_POISON did not complete (address space changing)",
            }),
        }
    }

    fn reclaim(&self, pool: &FramePool, frame: FrameNo) -> Result<bool, MmError> {
        // The page goes with the program's munmap / DONTNEED / exit; the frame is free.
        pool.release(frame)?;
        Ok(true)
    }

    fn kill(&self) -> bool {
        let Some(fd) = self.pidfd.get() else {
            return false;
        };
        // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number and null
        // pointers; it touches no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(fd),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}

/// A cell holding `v` if any.
fn once<T>(v: Option<T>) -> std::sync::OnceLock<T> {
    let cell = std::sync::OnceLock::new();
    if let Some(v) = v {
        let _ = cell.set(v);
    }
    cell
}

/// Copies `PAGE_SIZE` bytes of process `pid` at `remote` into the slot at `slot_addr`, a
/// slot of `pool` that [`FramePool::prepare_stage`] made present (`process_vm_readv`).
pub(crate) fn copy_from_process(
    pool: &FramePool,
    slot_addr: u64,
    pid: u32,
    remote: u64,
) -> nix::Result<usize> {
    if slot_addr < pool.base() || slot_addr + PAGE > pool.base() + pool.len() as u64 * PAGE {
        return Err(nix::errno::Errno::EFAULT);
    }
    // SAFETY: `prepare_stage` made the slot a present page of the pool mapping, which lives
    // as long as `pool`; its frame is owned by the memory manager (Leaving) and only the
    // agent thread of its process fills it, once, before marking it Staging, so nothing
    // else reads or writes it meanwhile.
    let dst = unsafe { std::slice::from_raw_parts_mut(slot_addr as *mut u8, PAGE_SIZE) };
    crate::daemon::agent::read_remote(pid, remote, dst)
}
