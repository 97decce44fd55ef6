//! The eviction agent: a thread of the tagged process that moves pages between the
//! application and a staging area on the daemon's request ([`usm_proto::agent`]).
//!
//! # Who owns a page
//! ```text
//!  application page ──EvictToStaging──► staging slot ──DropSlots──► only in the daemon's swap
//!        ▲                                   │
//!        └──────────ReturnFromStaging────────┘   (or the daemon UFFDIO_COPYs it back)
//! ```
//! The agent remembers which application page each occupied slot came from
//! (`slot_owner`, in memory of its own outside the managed heap, so the agent never
//! faults on its own bookkeeping). If the daemon disappears, pages still in staging are
//! moved back by the tagger itself before it detaches: only pages the daemon *dropped*
//! from staging (reported by `SwapState`) are beyond its reach, and those make it kill
//! the process.
//!
//! # Never blocking the program
//! The agent only issues non-blocking requests on the program's behalf:
//! - `EAGAIN` from `UFFDIO_MOVE` (the address space is changing: a `fork`, `munmap`,
//!   `mremap` or `madvise` event is waiting for the daemon's reader) is answered at
//!   once, never retried here: the forking thread waits for the reader, and the
//!   daemon retries the page in a later batch.
//! - `EBUSY` (the page is shared copy-on-write with a fork child) is resolved by
//!   breaking the sharing without writing (`MADV_POPULATE_WRITE`: the program keeps a
//!   private copy with the same content, the child keeps the original), then one more
//!   `UFFDIO_MOVE`. Without it, after a `fork` every page of the parent is shared, no
//!   eviction succeeds, and every fault waits for a frame that never comes.
//!
//! # fork
//! The agent thread does not exist in a forked child and the staging area is
//! `MADV_DONTFORK`: the child forgets the agent ([`forget_in_child`]) and can start its
//! own when its own session asks.

// The bookkeeping words live in raw memory outside the managed heap: std's atomics.
#![allow(clippy::disallowed_types)]

use std::os::fd::BorrowedFd;
// The bookkeeping words live in raw memory (see `sys::unmanaged_words`): std's type.
use std::sync::atomic::AtomicU64;

use usm_proto::agent::{AgentCompletion, AgentOp, AgentRequest, AgentServer};
use usm_proto::{Message, ProtoError};
use usm_sync::Mutex;
use usm_sync::atomic::Ordering;

use crate::state::{self, Mode};
use crate::sys::{self, PAGE_SIZE};

/// `UFFD_FEATURE_MOVE`.
const UFFD_FEATURE_MOVE: u64 = 1 << 16;

struct Agent {
    server: AgentServer,
    staging: usize,
    pages: u32,
    /// Application address whose page sits in each slot (0 = empty).
    slot_owner: &'static [AtomicU64],
    /// Held while a batch of requests runs, and while pages are restored.
    busy: Mutex<()>,
}

static AGENT: sys::LeakedRef<Agent> = sys::LeakedRef::new();

/// `EBUSY`: `UFFDIO_MOVE` met a page shared with a fork child (or pinned).
const EBUSY: i32 = libc::EBUSY;

/// Handles `StartAgent`: builds staging + ring, answers `AgentReady` (or
/// `AgentUnavailable`) on `channel`, and starts the agent thread.
pub(crate) fn start(channel: &usm_proto::Channel, staging_pages: u32, ring_entries: u32) {
    let answer = match setup(staging_pages, ring_entries) {
        Ok(agent) => agent,
        Err(why) => {
            let _ = channel.send(&Message::AgentUnavailable { text: why });
            return;
        }
    };
    let ready = Message::AgentReady {
        staging_start: answer.staging as u64,
        staging_pages: answer.pages,
        ring_entries: answer.server.entries(),
    };
    let fds: [BorrowedFd<'_>; 3] = answer.server.fds_for_daemon();
    if let Err(e) = channel.send_with_fds(&ready, &fds) {
        crate::session::warn(&format!("cannot hand the agent ring to the daemon ({e})"));
        return;
    }
    if std::thread::Builder::new()
        .name("usm-agent".into())
        .spawn(move || run(answer))
        .is_err()
    {
        crate::session::warn("cannot start the eviction agent thread");
    }
}

fn setup(staging_pages: u32, ring_entries: u32) -> Result<&'static Agent, String> {
    if AGENT.get().is_some() {
        return Err("an agent is already running".into());
    }
    if state::features() & UFFD_FEATURE_MOVE == 0 {
        return Err("the daemon did not negotiate UFFD_FEATURE_MOVE".into());
    }
    let Some(uffd) = state::managed_uffd() else {
        return Err("the process is not managed".into());
    };
    let server = AgentServer::create(ring_entries, staging_pages).map_err(|e| e.to_string())?;
    let len = staging_pages as usize * PAGE_SIZE;
    let staging = sys::mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        0,
    )
    .map_err(|e| format!("staging mmap failed (errno {e})"))?;
    let prepared = sys::madvise_raw(staging, len, libc::MADV_DONTFORK)
        .and_then(|()| sys::madvise_raw(staging, len, libc::MADV_NOHUGEPAGE))
        .and_then(|()| sys::uffd_register(uffd, staging, len));
    if let Err(e) = prepared {
        let _ = sys::munmap_raw(staging, len);
        return Err(format!("staging area setup failed (errno {e})"));
    }
    let slot_owner = match sys::unmanaged_words(staging_pages as usize) {
        Ok(words) => words,
        Err(e) => {
            let _ = sys::munmap_raw(staging, len);
            return Err(format!("agent bookkeeping mmap failed (errno {e})"));
        }
    };
    let agent = Agent {
        server,
        staging,
        pages: staging_pages,
        slot_owner,
        busy: Mutex::new(()),
    };
    AGENT
        .set(agent)
        .ok_or_else(|| "an agent is already running".to_owned())
}

/// In a forked child (from the `pthread_atfork` child handler; does not allocate): the
/// parent's agent thread does not exist here and its staging area was not inherited.
/// Forget it, so this process's own session can start an agent. Call after
/// [`staged_pages`] was read.
pub(crate) fn forget_in_child() {
    AGENT.forget();
}

fn run(agent: &'static Agent) {
    loop {
        match agent.server.wait_kick(-1) {
            Ok(_) => {}
            Err(e) if e.is_retryable() => continue,
            Err(_) => return,
        }
        if state::mode() != Mode::Managed {
            return;
        }
        let Ok(_guard) = agent.busy.lock() else {
            return;
        };
        while let Some(req) = agent.server.next_request() {
            let completion = match req {
                Ok(req) => agent.execute(req),
                Err(invalid) => invalid,
            };
            agent.server.complete(completion);
        }
        if agent.server.signal_done().is_err() {
            return;
        }
    }
}

impl Agent {
    fn slot_addr(&self, slot: u64) -> usize {
        self.staging + slot as usize * PAGE_SIZE
    }

    fn execute(&self, req: AgentRequest) -> AgentCompletion {
        let len = req.pages as usize * PAGE_SIZE;
        let slot = u64::from(req.slot);
        let result = match state::managed_uffd() {
            None => Err(libc::ENOTCONN),
            Some(uffd) => match req.op {
                AgentOp::EvictToStaging => {
                    evict_move(uffd, self.slot_addr(slot), req.addr as usize, len).inspect(
                        |moved| {
                            for i in 0..(*moved / PAGE_SIZE) as u64 {
                                self.slot_owner[(slot + i) as usize]
                                    .store(req.addr + i * PAGE_SIZE as u64, Ordering::Release);
                            }
                        },
                    )
                }
                AgentOp::ReturnFromStaging => {
                    sys::uffd_move(uffd, req.addr as usize, self.slot_addr(slot), len, true)
                        .inspect(|moved| {
                            for i in 0..(*moved / PAGE_SIZE) as u64 {
                                self.slot_owner[(slot + i) as usize].store(0, Ordering::Release);
                            }
                        })
                }
                AgentOp::DropSlots => {
                    sys::madvise_raw(self.slot_addr(slot), len, libc::MADV_DONTNEED).map(|()| {
                        for i in 0..req.pages {
                            self.slot_owner[(slot + i) as usize].store(0, Ordering::Release);
                        }
                        0
                    })
                }
            },
        };
        AgentCompletion {
            op: Ok(req.op),
            slot: req.slot,
            addr: req.addr,
            result: match result {
                Ok(bytes) => bytes as i64,
                Err(errno) => -i64::from(errno),
            },
            seq: req.seq,
        }
    }
}

/// `UFFDIO_MOVE` application → staging. A page shared copy-on-write with a fork child
/// (`EBUSY`) is made the program's own first (see the module doc), then moved; every
/// other outcome, `EAGAIN` included, is the daemon's to handle.
fn evict_move(uffd: i32, slot: usize, addr: usize, len: usize) -> Result<usize, i32> {
    match sys::uffd_move(uffd, slot, addr, len, true) {
        Err(EBUSY) => {
            // ENOMEM/EFAULT: the range went away meanwhile; the daemon hears of it.
            sys::break_cow(addr, len)?;
            sys::uffd_move(uffd, slot, addr, len, true)
        }
        other => other,
    }
}

/// Marks a slot whose page was moved back but whose waiters are not woken yet.
const RESTORED: u64 = 1;

/// The daemon is gone: move every staged page back where it came from (on the
/// tagger's own copy of the userfaultfd, still open) *without waking* threads waiting
/// on them, and stop the agent. Returns how many pages could not be put back.
/// Does not allocate (see `session::daemon_lost`); [`wake_restored`] finishes the job.
pub(crate) fn restore_staged() -> u64 {
    let Some(agent) = AGENT.get() else { return 0 };
    let Ok(_guard) = agent.busy.lock() else {
        return 0;
    };
    let uffd = state::uffd_number();
    let mut lost = 0;
    for (slot, owner_slot) in agent.slot_owner.iter().enumerate() {
        let owner = owner_slot.load(Ordering::Acquire);
        if owner == 0 || owner & RESTORED != 0 {
            continue;
        }
        let next = match sys::uffd_move(
            uffd,
            owner as usize,
            agent.slot_addr(slot as u64),
            PAGE_SIZE,
            false,
        ) {
            Ok(_) => owner | RESTORED,
            // EEXIST: the page was installed again meanwhile; the staged copy is stale.
            Err(libc::EEXIST) => 0,
            Err(_) => {
                lost += 1;
                0
            }
        };
        owner_slot.store(next, Ordering::Release);
    }
    let _: Result<(), ProtoError> = agent.server.self_kick();
    lost
}

/// Wakes threads that faulted on pages `restore_staged` put back.
pub(crate) fn wake_restored() {
    let Some(agent) = AGENT.get() else { return };
    let uffd = state::uffd_number();
    for owner_slot in agent.slot_owner {
        let owner = owner_slot.load(Ordering::Acquire);
        if owner & RESTORED != 0 {
            sys::uffd_wake(uffd, (owner & !RESTORED) as usize, PAGE_SIZE);
            owner_slot.store(0, Ordering::Release);
        }
    }
}

/// Pages currently in staging (their application page is a hole). Does not allocate.
pub(crate) fn staged_pages() -> u64 {
    AGENT.get().map_or(0, |agent| {
        agent
            .slot_owner
            .iter()
            .filter(|o| o.load(Ordering::Acquire) != 0)
            .count() as u64
    })
}
