//! The eviction agent's request ring, shared by the daemon and the tagger.
//!
//! No stock system call takes a page out of *another* process's address space, so the
//! daemon asks a thread inside the tagged process (the agent) to do a same-mm
//! `UFFDIO_MOVE`: application page → staging slot. The daemon then reads the staging
//! slot (present memory, never a hole), writes it to swap, and asks the agent to drop
//! the slot; on a fault it may ask for the page back (`UFFDIO_MOVE` staging → app,
//! which also wakes the faulting threads) or install it itself with `UFFDIO_COPY`.
//!
//! # Setup (over the socket)
//! 1. daemon → tagger: [`Message::StartAgent`](crate::Message::StartAgent)
//!    `{staging_pages, ring_entries}`.
//! 2. The tagger maps a private anonymous staging area (`MADV_DONTFORK`,
//!    `MADV_NOHUGEPAGE`, registered MISSING on the shared userfaultfd, which
//!    `UFFDIO_MOVE` requires of its destination), creates the ring (a memfd) and two
//!    eventfds, starts the agent thread, and answers
//!    [`Message::AgentReady`](crate::Message::AgentReady) `{staging_start, staging_pages,
//!    ring_entries}` with three descriptors: ring memfd, `kick` eventfd (daemon → agent),
//!    `done` eventfd (agent → daemon). Or [`Message::AgentUnavailable`](crate::Message::AgentUnavailable).
//!
//! # Ring layout (memfd, every field an 8-byte little-endian atomic)
//! ```text
//! 0     req_head   written by the daemon (requests published)
//! 64    req_tail   written by the agent  (requests consumed)
//! 128   cmp_head   written by the agent  (completions published)
//! 192   cmp_tail   written by the daemon (completions consumed)
//! 256   magic "USMRING1" | 264 entries        written once by the tagger
//! 4096                 requests[entries]     32 bytes each
//! 4096 + 32*entries    completions[entries]  32 bytes each
//! entry words: [op | slot << 32, addr, pages (request) / result (completion), seq]
//! ```
//! Both rings are single-producer single-consumer: an entry is written, then the head
//! is stored with `Release`; the consumer loads the head with `Acquire`, reads, then
//! stores the tail with `Release`. The daemon must not have more than `entries`
//! requests outstanding (requests + unread completions), so completions never overflow.
//!
//! Each side validates what the other wrote (slots in range, ops known): a confused or
//! hostile peer gets `-EINVAL` completions, never an out-of-bounds access.
//!
//! # What the daemon checks before it maps anything (the tagger is untrusted)
//! - The ring is a memfd sealed `F_SEAL_SHRINK | F_SEAL_GROW` (the tagger creates it
//!   `MFD_ALLOW_SEALING` and adds `F_SEAL_SEAL` too) whose size is exactly
//!   [`ring_len`]: nobody can truncate it under the daemon's mapping, so no access of
//!   the daemon's can raise `SIGBUS`.
//! - Every ring access is an atomic word at an offset computed from the *daemon's*
//!   `entries` (index modulo `entries`), bounds-checked against the mapping length;
//!   heads and tails the peer writes only choose which entry, never where.
//! - `kick` and `done` are eventfds (checked through `/proc/self/fd`), set
//!   `O_NONBLOCK`: a kick into a full counter is "already kicked", a read of a count
//!   the peer took first is "nothing yet". No write to them can block the evictor.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::error::ProtoError;
use crate::sys::{self, SharedMap};

const REQ_HEAD: usize = 0;
const REQ_TAIL: usize = 64;
const CMP_HEAD: usize = 128;
const CMP_TAIL: usize = 192;
const MAGIC_OFF: usize = 256;
const ENTRIES_OFF: usize = 264;
const ENTRIES_BASE: usize = 4096;
const ENTRY_LEN: usize = 32;
/// `"USMRING1"` little-endian.
const RING_MAGIC: u64 = u64::from_le_bytes(*b"USMRING1");
/// Largest ring accepted.
pub const MAX_RING_ENTRIES: u32 = 1 << 16;
/// Largest staging area accepted, in pages (1 GiB).
pub const MAX_STAGING_PAGES: u32 = 1 << 18;

/// What the agent is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AgentOp {
    /// `UFFDIO_MOVE` `pages` pages at `addr` (application) → staging `slot..`.
    EvictToStaging = 1,
    /// `UFFDIO_MOVE` staging `slot..` → `addr` (and wake the faulting threads).
    ReturnFromStaging = 2,
    /// `madvise(MADV_DONTNEED)` of staging `slot..` (its data is safe in swap).
    DropSlots = 3,
}

impl AgentOp {
    fn from_wire(v: u32) -> Option<AgentOp> {
        Some(match v {
            1 => AgentOp::EvictToStaging,
            2 => AgentOp::ReturnFromStaging,
            3 => AgentOp::DropSlots,
            _ => return None,
        })
    }
}

/// One request from the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentRequest {
    /// The operation.
    pub op: AgentOp,
    /// First staging slot.
    pub slot: u32,
    /// Page-aligned application address (ignored by `DropSlots`).
    pub addr: u64,
    /// Number of pages (≥ 1).
    pub pages: u64,
    /// Daemon-chosen tag echoed in the completion.
    pub seq: u64,
}

/// One completion from the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentCompletion {
    /// The operation, or the raw value if the agent wrote an unknown one.
    pub op: Result<AgentOp, u32>,
    /// First staging slot.
    pub slot: u32,
    /// Application address.
    pub addr: u64,
    /// Bytes moved (≥ 0) or `-errno`: `EBUSY` = page pinned or shared with a fork child
    /// (skip it), `ENOENT` = source not present, `EEXIST` = destination present,
    /// `EINVAL` = bad request.
    pub result: i64,
    /// The request's `seq`.
    pub seq: u64,
}

/// The mapped ring (either side).
#[derive(Debug)]
struct Ring {
    map: SharedMap,
    entries: u32,
}

/// Bytes of a ring with `entries` entries.
pub fn ring_len(entries: u32) -> usize {
    ENTRIES_BASE + 2 * ENTRY_LEN * entries as usize
}

fn check_entries(entries: u32) -> Result<(), ProtoError> {
    if entries == 0 || !entries.is_power_of_two() || entries > MAX_RING_ENTRIES {
        return Err(ProtoError::BadAgentSetup {
            why: "ring entries must be a power of two in 1..=65536",
        });
    }
    Ok(())
}

impl Ring {
    fn slot_offset(&self, completions: bool, index: u64) -> usize {
        let i = (index % u64::from(self.entries)) as usize;
        let base = ENTRIES_BASE
            + if completions {
                ENTRY_LEN * self.entries as usize
            } else {
                0
            };
        base + i * ENTRY_LEN
    }

    fn write_entry(&self, completions: bool, index: u64, words: [u64; 4]) {
        let off = self.slot_offset(completions, index);
        for (i, w) in words.iter().enumerate() {
            self.map
                .word(off + 8 * i)
                .store(*w, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn read_entry(&self, completions: bool, index: u64) -> [u64; 4] {
        let off = self.slot_offset(completions, index);
        std::array::from_fn(|i| {
            self.map
                .word(off + 8 * i)
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn load(&self, off: usize) -> u64 {
        self.map
            .word(off)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn store(&self, off: usize, v: u64) {
        self.map
            .word(off)
            .store(v, std::sync::atomic::Ordering::Release)
    }
}

fn pack(op: u32, slot: u32) -> u64 {
    u64::from(op) | (u64::from(slot) << 32)
}

/// The daemon's end of an agent: submit requests, collect completions.
#[derive(Debug)]
pub struct AgentClient {
    ring: Ring,
    kick: OwnedFd,
    done: OwnedFd,
    /// Start of the staging area in the tagged process.
    pub staging_start: u64,
    /// Number of 4 KiB staging slots.
    pub staging_pages: u32,
    /// Requests submitted and not answered yet: `seq` → how many (a completion whose
    /// `seq` is not here is the agent's invention and is dropped).
    in_flight: HashMap<u64, u32>,
    /// Number of requests in `in_flight`.
    outstanding: u64,
    /// Completions dropped because no request of theirs was in flight.
    pub bogus_completions: u64,
}

impl AgentClient {
    /// Builds the daemon's end from an `AgentReady` and its three descriptors
    /// (ring memfd, kick, done), checking sizes and the ring's magic.
    pub fn from_ready(
        staging_start: u64,
        staging_pages: u32,
        ring_entries: u32,
        mut fds: Vec<OwnedFd>,
    ) -> Result<AgentClient, ProtoError> {
        check_entries(ring_entries)?;
        // The tagger chose the staging area: every slot address must be computable
        // (`staging_addr`) without wrapping.
        let staging_end = u64::from(staging_pages)
            .checked_mul(4096)
            .and_then(|len| staging_start.checked_add(len));
        if staging_start % 4096 != 0 || staging_pages > MAX_STAGING_PAGES || staging_end.is_none() {
            return Err(ProtoError::BadAgentSetup {
                why: "staging area is unaligned, larger than 1 GiB or wraps the address space",
            });
        }
        if fds.len() != 3 {
            return Err(ProtoError::BadFdCount {
                message: "AgentReady",
                count: fds.len(),
                expected: 3,
            });
        }
        let done = fds.remove(2);
        let kick = fds.remove(1);
        let memfd = fds.remove(0);
        let len = ring_len(ring_entries);
        // Sealed before mapped: an unsealed ring could be truncated under the mapping,
        // and the daemon's next access would be a SIGBUS that kills every session.
        let seals = sys::seals(memfd.as_fd()).map_err(|_| ProtoError::BadAgentSetup {
            why: "ring is not a sealable memfd (F_GET_SEALS failed)",
        })?;
        if seals & sys::RING_SEALS != sys::RING_SEALS {
            return Err(ProtoError::BadAgentSetup {
                why: "ring memfd is not sealed F_SEAL_SHRINK|F_SEAL_GROW",
            });
        }
        if sys::fd_size(memfd.as_fd())? != len as u64 {
            return Err(ProtoError::BadAgentSetup {
                why: "ring memfd size does not match its entries",
            });
        }
        // The daemon writes `kick` and reads `done`: they must be eventfds (a pipe can
        // fill and block the writer), and non-blocking (the peer shares them).
        for fd in [&kick, &done] {
            if !sys::is_eventfd(fd.as_fd()) {
                return Err(ProtoError::BadAgentSetup {
                    why: "kick and done descriptors must be eventfds",
                });
            }
            sys::set_nonblocking(fd.as_fd())?;
        }
        let ring = Ring {
            map: SharedMap::map(memfd.as_fd(), len)?,
            entries: ring_entries,
        };
        if ring.load(MAGIC_OFF) != RING_MAGIC || ring.load(ENTRIES_OFF) != u64::from(ring_entries) {
            return Err(ProtoError::BadAgentSetup {
                why: "ring magic or size does not match AgentReady",
            });
        }
        Ok(AgentClient {
            ring,
            kick,
            done,
            staging_start,
            staging_pages,
            in_flight: HashMap::new(),
            outstanding: 0,
            bogus_completions: 0,
        })
    }

    /// Address of staging slot `slot` in the tagged process.
    pub fn staging_addr(&self, slot: u32) -> u64 {
        self.staging_start + u64::from(slot) * 4096
    }

    /// Queues a request (call [`AgentClient::kick`] after a batch). Fails with
    /// [`ProtoError::AgentRingFull`] when `entries` requests are outstanding.
    pub fn submit(&mut self, req: AgentRequest) -> Result<(), ProtoError> {
        if self.outstanding >= u64::from(self.ring.entries) {
            return Err(ProtoError::AgentRingFull);
        }
        let head = self.ring.load(REQ_HEAD);
        self.ring.write_entry(
            false,
            head,
            [pack(req.op as u32, req.slot), req.addr, req.pages, req.seq],
        );
        self.ring.store(REQ_HEAD, head.wrapping_add(1));
        *self.in_flight.entry(req.seq).or_default() += 1;
        self.outstanding += 1;
        Ok(())
    }

    /// Wakes the agent. Never blocks: the eventfd is non-blocking, and a full counter
    /// means the agent is kicked already.
    pub fn kick(&self) -> Result<(), ProtoError> {
        sys::eventfd_signal(self.kick.as_fd())
    }

    /// Takes every completion published so far that answers a request in flight (at
    /// most one per request: invented or repeated ones are dropped and counted in
    /// [`AgentClient::bogus_completions`], so a hostile agent can neither make the
    /// daemon believe a request was answered twice nor grow its memory).
    pub fn completions(&mut self) -> Vec<AgentCompletion> {
        let mut out = Vec::new();
        let head = self.ring.load(CMP_HEAD);
        let mut tail = self.ring.load(CMP_TAIL);
        // A hostile agent could publish more than exists: never read past `entries`.
        let mut budget = self.ring.entries;
        while tail != head && budget > 0 {
            let w = self.ring.read_entry(true, tail);
            tail = tail.wrapping_add(1);
            budget -= 1;
            let seq = w[3];
            match self.in_flight.get_mut(&seq) {
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        self.in_flight.remove(&seq);
                    }
                }
                None => {
                    self.bogus_completions += 1;
                    continue;
                }
            }
            out.push(AgentCompletion {
                op: AgentOp::from_wire(w[0] as u32).ok_or(w[0] as u32),
                slot: (w[0] >> 32) as u32,
                addr: w[1],
                result: w[2] as i64,
                seq,
            });
        }
        self.ring.store(CMP_TAIL, tail);
        self.outstanding = self.outstanding.saturating_sub(out.len() as u64);
        out
    }

    /// Waits up to `timeout_ms` for the agent to signal completions.
    pub fn wait_done(&self, timeout_ms: i32) -> Result<bool, ProtoError> {
        sys::eventfd_wait(self.done.as_fd(), timeout_ms)
    }

    /// The `done` eventfd, for the daemon's own poll/epoll/io_uring loop.
    pub fn done_fd(&self) -> BorrowedFd<'_> {
        self.done.as_fd()
    }
}

/// The tagger's end: the descriptors to hand over and the agent loop's ring.
#[derive(Debug)]
pub struct AgentServer {
    ring: Ring,
    kick: OwnedFd,
    done: OwnedFd,
    memfd: OwnedFd,
    staging_pages: u32,
}

impl AgentServer {
    /// Creates the ring memfd and the two eventfds for `entries` entries.
    pub fn create(entries: u32, staging_pages: u32) -> Result<AgentServer, ProtoError> {
        check_entries(entries)?;
        if staging_pages == 0 || staging_pages > MAX_STAGING_PAGES {
            return Err(ProtoError::BadAgentSetup {
                why: "staging pages must be in 1..=262144",
            });
        }
        let len = ring_len(entries);
        let memfd = sys::memfd_sealed(c"usm-agent-ring", len)?;
        let ring = Ring {
            map: SharedMap::map(memfd.as_fd(), len)?,
            entries,
        };
        ring.store(ENTRIES_OFF, u64::from(entries));
        ring.store(MAGIC_OFF, RING_MAGIC);
        Ok(AgentServer {
            ring,
            kick: sys::eventfd()?,
            done: sys::eventfd()?,
            memfd,
            staging_pages,
        })
    }

    /// Descriptors for `AgentReady`, in order: ring memfd, kick, done.
    pub fn fds_for_daemon(&self) -> [BorrowedFd<'_>; 3] {
        [self.memfd.as_fd(), self.kick.as_fd(), self.done.as_fd()]
    }

    /// Ring entries.
    pub fn entries(&self) -> u32 {
        self.ring.entries
    }

    /// Blocks until the daemon kicks (or `timeout_ms` passes; -1 = forever).
    pub fn wait_kick(&self, timeout_ms: i32) -> Result<bool, ProtoError> {
        sys::eventfd_wait(self.kick.as_fd(), timeout_ms)
    }

    /// Wakes a thread blocked in [`AgentServer::wait_kick`] (used to stop the agent).
    pub fn self_kick(&self) -> Result<(), ProtoError> {
        sys::eventfd_signal(self.kick.as_fd())
    }

    /// Takes the next request, validated: `Err(completion)` carries the `-EINVAL`
    /// answer for a request that is out of range or unknown.
    pub fn next_request(&self) -> Option<Result<AgentRequest, AgentCompletion>> {
        let tail = self.ring.load(REQ_TAIL);
        if tail == self.ring.load(REQ_HEAD) {
            return None;
        }
        let w = self.ring.read_entry(false, tail);
        self.ring.store(REQ_TAIL, tail.wrapping_add(1));
        let slot = (w[0] >> 32) as u32;
        let (addr, pages, seq) = (w[1], w[2], w[3]);
        let invalid = AgentCompletion {
            op: Err(w[0] as u32),
            slot,
            addr,
            result: -i64::from(libc::EINVAL),
            seq,
        };
        let Some(op) = AgentOp::from_wire(w[0] as u32) else {
            return Some(Err(invalid));
        };
        let in_range = pages >= 1
            && u64::from(slot)
                .checked_add(pages)
                .is_some_and(|end| end <= u64::from(self.staging_pages));
        let aligned = addr % 4096 == 0 && addr.checked_add(pages.saturating_mul(4096)).is_some();
        if !in_range || (op != AgentOp::DropSlots && !aligned) {
            return Some(Err(AgentCompletion {
                op: Ok(op),
                ..invalid
            }));
        }
        Some(Ok(AgentRequest {
            op,
            slot,
            addr,
            pages,
            seq,
        }))
    }

    /// Publishes a completion. The daemon bounds its outstanding requests by the ring
    /// size, so there is always room; if it does not, the completion is dropped.
    pub fn complete(&self, c: AgentCompletion) {
        let head = self.ring.load(CMP_HEAD);
        if head.wrapping_sub(self.ring.load(CMP_TAIL)) >= u64::from(self.ring.entries) {
            return;
        }
        let op = match c.op {
            Ok(op) => op as u32,
            Err(raw) => raw,
        };
        self.ring.write_entry(
            true,
            head,
            [pack(op, c.slot), c.addr, c.result as u64, c.seq],
        );
        self.ring.store(CMP_HEAD, head.wrapping_add(1));
    }

    /// Tells the daemon completions are ready.
    pub fn signal_done(&self) -> Result<(), ProtoError> {
        sys::eventfd_signal(self.done.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(entries: u32, staging: u32) -> (AgentServer, AgentClient) {
        let server = AgentServer::create(entries, staging).unwrap();
        let fds = server
            .fds_for_daemon()
            .iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        let client = AgentClient::from_ready(0x7000_0000, staging, entries, fds).unwrap();
        (server, client)
    }

    #[test]
    fn requests_and_completions_cross_the_shared_ring() {
        let (server, mut client) = pair(4, 16);
        for i in 0..4u32 {
            client
                .submit(AgentRequest {
                    op: AgentOp::EvictToStaging,
                    slot: i,
                    addr: 0x10000 + u64::from(i) * 4096,
                    pages: 1,
                    seq: u64::from(i) + 100,
                })
                .unwrap();
        }
        assert!(matches!(
            client.submit(AgentRequest {
                op: AgentOp::DropSlots,
                slot: 0,
                addr: 0,
                pages: 1,
                seq: 9
            }),
            Err(ProtoError::AgentRingFull)
        ));
        client.kick().unwrap();
        assert!(server.wait_kick(1000).unwrap());
        let mut seen = 0;
        while let Some(req) = server.next_request() {
            let req = req.unwrap();
            assert_eq!(req.seq, u64::from(req.slot) + 100);
            server.complete(AgentCompletion {
                op: Ok(req.op),
                slot: req.slot,
                addr: req.addr,
                result: 4096,
                seq: req.seq,
            });
            seen += 1;
        }
        assert_eq!(seen, 4);
        server.signal_done().unwrap();
        assert!(client.wait_done(1000).unwrap());
        let done = client.completions();
        assert_eq!(done.len(), 4);
        assert!(
            done.iter()
                .all(|c| c.result == 4096 && c.op == Ok(AgentOp::EvictToStaging))
        );
        // Room again after the completions were taken; the ring wraps.
        for i in 0..3u64 {
            client
                .submit(AgentRequest {
                    op: AgentOp::DropSlots,
                    slot: i as u32,
                    addr: 0,
                    pages: 1,
                    seq: i,
                })
                .unwrap();
        }
        assert_eq!(
            server.next_request().unwrap().unwrap().op,
            AgentOp::DropSlots
        );
    }

    #[test]
    fn out_of_range_requests_are_answered_einval() {
        let (server, mut client) = pair(8, 4);
        let bad = [
            (AgentOp::EvictToStaging, 3, 0x1000, 2), // slot 3 + 2 pages > 4
            (AgentOp::EvictToStaging, 0, 0x1001, 1), // misaligned
            (AgentOp::ReturnFromStaging, 0, 0x1000, 0), // zero pages
        ];
        for (i, (op, slot, addr, pages)) in bad.into_iter().enumerate() {
            client
                .submit(AgentRequest {
                    op,
                    slot,
                    addr,
                    pages,
                    seq: i as u64,
                })
                .unwrap();
        }
        for _ in 0..3 {
            let c = server.next_request().unwrap().unwrap_err();
            assert_eq!(c.result, -i64::from(libc::EINVAL));
        }
        assert!(server.next_request().is_none());
    }

    fn fds_of(server: &AgentServer) -> Vec<OwnedFd> {
        server
            .fds_for_daemon()
            .iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect()
    }

    #[test]
    fn the_tagger_ring_is_sealed_against_truncation() {
        let server = AgentServer::create(8, 4).unwrap();
        let memfd = server.fds_for_daemon()[0];
        assert_eq!(
            sys::hostile::try_truncate(memfd, 0),
            libc::EPERM,
            "F_SEAL_SHRINK refuses a truncation"
        );
        assert_eq!(
            sys::hostile::try_truncate(memfd, ring_len(8) * 2),
            libc::EPERM
        );
    }

    #[test]
    fn an_unsealed_or_resized_ring_is_refused_before_mapping() {
        let server = AgentServer::create(8, 4).unwrap();
        // An unsealed memfd of the right size (the peer could truncate it later).
        let mut fds = fds_of(&server);
        fds[0] = sys::hostile::unsealed_memfd(ring_len(8));
        let err = AgentClient::from_ready(0, 4, 8, fds).unwrap_err();
        assert!(err.to_string().contains("sealed"), "{err}");
        // Not a memfd at all (a pipe).
        let mut fds = fds_of(&server);
        fds[0] = sys::hostile::pipe().0;
        let err = AgentClient::from_ready(0, 4, 8, fds).unwrap_err();
        assert!(err.to_string().contains("sealable memfd"), "{err}");
        // Sealed, but the size does not match the entries announced.
        let big = AgentServer::create(16, 4).unwrap();
        let mut fds = fds_of(&server);
        fds[0] = fds_of(&big).remove(0);
        assert!(matches!(
            AgentClient::from_ready(0, 4, 8, fds),
            Err(ProtoError::BadAgentSetup { .. })
        ));
    }

    #[test]
    fn kick_and_done_must_be_eventfds() {
        let server = AgentServer::create(8, 4).unwrap();
        for which in [1, 2] {
            let mut fds = fds_of(&server);
            let (r, w) = sys::hostile::pipe();
            fds[which] = if which == 1 { w } else { r };
            let err = AgentClient::from_ready(0, 4, 8, fds).unwrap_err();
            assert!(err.to_string().contains("eventfds"), "{err}");
        }
    }

    #[test]
    fn a_kick_into_a_full_eventfd_does_not_block() {
        let (server, client) = pair(8, 4);
        sys::hostile::fill_eventfd(server.fds_for_daemon()[1]);
        // Blocking, this write would wait until the agent reads; non-blocking it is
        // "already kicked".
        client.kick().unwrap();
        client.kick().unwrap();
        // The agent still sees its kick.
        assert!(server.wait_kick(0).unwrap());
    }

    #[test]
    fn invented_and_repeated_completions_are_dropped() {
        let (server, mut client) = pair(4, 16);
        client
            .submit(AgentRequest {
                op: AgentOp::DropSlots,
                slot: 0,
                addr: 0,
                pages: 1,
                seq: 7,
            })
            .unwrap();
        let answer = |seq| AgentCompletion {
            op: Ok(AgentOp::DropSlots),
            slot: 0,
            addr: 0,
            result: 0,
            seq,
        };
        // The agent answers seq 7 twice and invents seq 8.
        for seq in [8, 7, 7] {
            server.complete(answer(seq));
        }
        let got = client.completions();
        assert_eq!(got.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![7]);
        assert_eq!(client.bogus_completions, 2);
        // Room for exactly `entries` requests again, not more.
        for seq in 0..4 {
            client
                .submit(AgentRequest {
                    op: AgentOp::DropSlots,
                    slot: 0,
                    addr: 0,
                    pages: 1,
                    seq,
                })
                .unwrap();
        }
        assert!(matches!(
            client.submit(AgentRequest {
                op: AgentOp::DropSlots,
                slot: 0,
                addr: 0,
                pages: 1,
                seq: 9
            }),
            Err(ProtoError::AgentRingFull)
        ));
    }

    #[test]
    fn mismatched_setup_is_refused() {
        let server = AgentServer::create(8, 4).unwrap();
        let fds: Vec<OwnedFd> = server
            .fds_for_daemon()
            .iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        assert!(matches!(
            AgentClient::from_ready(0, 4, 16, fds),
            Err(ProtoError::BadAgentSetup { .. })
        ));
        assert!(AgentServer::create(3, 4).is_err());
        assert!(AgentServer::create(8, 0).is_err());
    }
}
