//! The daemon's end of a tagger's eviction agent: how pages leave another process (the
//! `stage` half of the daemon's [`Installer`](usm_mm::Installer)), asynchronously.
//!
//! No stock system call takes a page out of another address space, so a thread inside
//! the tagged program (the agent, `usm_proto::agent`) does a same-mm `UFFDIO_MOVE` of
//! each page into a slot of its staging area; the daemon then copies the staged page
//! into the frame's slot of its own pool (`process_vm_readv`: present memory, never a
//! hole), and from there the memory manager writes it to swap like any staged page.
//!
//! Access samples (the eviction policy's re-fault sampling, see the `usm_mm` crate docs)
//! leave the same way, in the same batches: to the agent a sample is an eviction; the
//! memory manager tells them apart (`Leaving { entry: None }`), and a sample's page stays
//! in the frame's slot as `Sampled` until it is accessed (copied back) or chosen as a
//! victim (written from the slot).
//!
//! # Two phases, nobody waits (who owns what)
//! 1. *Submit* (a worker evicting, under the memory manager's lock): each victim, then
//!    each page queued for a sample, gets a free staging slot and an
//!    `EvictToStaging(slot, addr)` request; one kick. The core
//!    marks the page `Leaving` (its frame still the core's) and goes on: nothing waits
//!    for the program, so a stopped program (`SIGSTOP`, a debugger) delays only its own
//!    eviction, and the process's reader is never behind the agent.
//! 2. *Reap* (the process's agent thread in the daemon, `usm-ag-PID`, woken by the
//!    agent's `done` eventfd, holding no lock of the core): a moved page is copied into
//!    its frame's slot and the frame marked Staging; every answer becomes a `StageDone`
//!    job, and a worker finishes the stage ([`usm_mm::WorkerMm::finish_stage`]: write-back
//!    queued, or the page `Sampled` for a sample, or resident again if it stayed).
//! 3. *Drop*: the tagger must know pages are out (`SwapState`, so that it kills the
//!    program rather than let it read zeroes if the daemon dies) *before* their staging
//!    copies go; if it cannot be told now, the slots stay occupied and this is retried.
//!    `DropSlots` raises a `REMOVE` event on the staging area, which the reader skips.

use std::collections::{BTreeMap, HashMap};
use std::io::IoSliceMut;

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;
use usm_kmod::FrameNo;
use usm_kmod::pool::FramePool;
use usm_proto::agent::{AgentClient, AgentOp, AgentRequest};
use usm_proto::{Channel, Message};

const PAGE: u64 = 4096;

/// An eviction request waiting for the agent's answer.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    frame: FrameNo,
    slot: u32,
    addr: u64,
    sent: std::time::Instant,
}

/// An agent that has left an eviction unanswered this long gets no new ones.
pub(crate) const STALLED: std::time::Duration = std::time::Duration::from_millis(100);

/// The daemon's end of one agent.
pub(crate) struct AgentLink {
    client: AgentClient,
    /// The tagged process (for `process_vm_readv`).
    pid: u32,
    free_slots: Vec<u32>,
    /// Staging slots whose page the daemon holds: to drop once the tagger knows.
    undropped: Vec<u32>,
    /// Evictions in flight, by seq: ordered, so the oldest (the lowest seq: requests are
    /// numbered as they are sent) is the first, and [`AgentLink::stalled`] and
    /// [`AgentLink::moves_up_to`] look at it alone instead of at every request.
    evicting: BTreeMap<u64, InFlight>,
    /// `DropSlots` and returns in flight, by seq → the slots they free.
    dropping: HashMap<u64, Vec<u32>>,
    seq: u64,
}

impl AgentLink {
    pub(crate) fn new(client: AgentClient, pid: u32, ring_entries: u32) -> AgentLink {
        // Half the ring for evictions, the rest for drops and returns.
        let slots = client.staging_pages.min(ring_entries / 2);
        AgentLink {
            client,
            pid,
            free_slots: (0..slots).rev().collect(),
            undropped: Vec::new(),
            evicting: BTreeMap::new(),
            dropping: HashMap::new(),
            seq: 0,
        }
    }

    /// The staging area (its events are the daemon's own doing).
    pub(crate) fn staging_range(&self) -> std::ops::Range<u64> {
        let start = self.client.staging_start;
        start..start + u64::from(self.client.staging_pages) * PAGE
    }

    /// A descriptor that becomes readable when the agent answered.
    pub(crate) fn done_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.client.done_fd().try_clone_to_owned()
    }

    fn submit(&mut self, op: AgentOp, slot: u32, addr: u64, pages: u64) -> Option<u64> {
        self.seq += 1;
        let seq = self.seq;
        self.client
            .submit(AgentRequest {
                op,
                slot,
                addr,
                pages,
                seq,
            })
            .ok()
            .map(|()| seq)
    }

    /// Phase 1: asks the agent to move the pages of `frames` (at `addrs`) out. `out[i]`:
    /// whether the request for `frames[i]` went out (else the page stays: no free slot,
    /// or the agent has left requests unanswered for [`STALLED`] — a stopped program —
    /// so its pages are not piled up as leaving while others could go).
    pub(crate) fn submit_evictions(
        &mut self,
        frames: &[FrameNo],
        addrs: &[u64],
        out: &mut Vec<bool>,
    ) {
        if self.stalled() {
            tracing::debug!(
                pid = self.pid,
                evicting = self.evicting.len(),
                "agent stalled"
            );
            out.extend(std::iter::repeat_n(false, frames.len()));
            return;
        }
        if self.free_slots.len() < frames.len() {
            tracing::debug!(
                pid = self.pid,
                free = self.free_slots.len(),
                undropped = self.undropped.len(),
                dropping = self.dropping.len(),
                evicting = self.evicting.len(),
                "agent short of slots"
            );
        }
        let now = std::time::Instant::now();
        let mut any = false;
        for (&frame, &addr) in frames.iter().zip(addrs) {
            let sent = self.free_slots.pop().and_then(|slot| {
                match self.submit(AgentOp::EvictToStaging, slot, addr, 1) {
                    Some(seq) => {
                        self.evicting.insert(
                            seq,
                            InFlight {
                                frame,
                                slot,
                                addr,
                                sent: now,
                            },
                        );
                        Some(())
                    }
                    None => {
                        self.free_slots.push(slot);
                        None
                    }
                }
            });
            any |= sent.is_some();
            out.push(sent.is_some());
        }
        if any {
            let _ = self.client.kick();
        }
    }

    /// The number of the last request sent (a mark for [`AgentLink::moves_up_to`]).
    pub(crate) fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Whether an eviction request (it moves a page by address) numbered `mark` or lower
    /// is still unanswered. (A return from staging also names an address, but it is sent
    /// only for a page the daemon could not read, and moves into a hole only.)
    pub(crate) fn moves_up_to(&self, mark: u64) -> bool {
        self.evicting
            .first_key_value()
            .is_some_and(|(&s, _)| s <= mark)
    }

    /// Whether an eviction has waited for the agent longer than [`STALLED`]: the oldest
    /// request in flight (one clock reading per submit, not one per request).
    fn stalled(&self) -> bool {
        self.evicting
            .first_key_value()
            .is_some_and(|(_, f)| f.sent.elapsed() > STALLED)
    }

    /// Whether every slot is taken but some are on their way back (dropped or returned,
    /// the agent has not answered yet): stages refused now will be possible then.
    pub(crate) fn slots_coming_back(&self) -> bool {
        self.free_slots.is_empty() && (!self.dropping.is_empty() || !self.undropped.is_empty())
    }

    /// Phase 2: takes the agent's answers. For each eviction, `done(frame, moved)` once:
    /// `moved` when the page left the program and its content is now in the frame's slot
    /// (the frame Staging). Returns how many pages were taken in, and whether slots came
    /// free.
    pub(crate) fn reap(
        &mut self,
        pool: &FramePool,
        done: &mut dyn FnMut(FrameNo, bool),
    ) -> (u64, bool) {
        let mut taken = 0;
        let mut freed = false;
        for c in self.client.completions() {
            if let Some(slots) = self.dropping.remove(&c.seq) {
                self.free_slots.extend(slots);
                freed = true;
                continue;
            }
            let Some(f) = self.evicting.remove(&c.seq) else {
                continue;
            };
            if c.result != PAGE as i64 {
                // Pinned, shared, freed, or the address space was changing: it stayed.
                self.free_slots.push(f.slot);
                freed = true;
                done(f.frame, false);
                continue;
            }
            match self.take_in(pool, f) {
                Ok(()) => {
                    self.undropped.push(f.slot);
                    taken += 1;
                    done(f.frame, true);
                }
                Err(None) => {
                    // The process exited after its agent answered (more likely with
                    // access samples in flight): nothing to read or give back; its exit
                    // releases the frame.
                    tracing::debug!(
                        pid = self.pid,
                        addr = f.addr,
                        "a staged page of an exited process"
                    );
                    done(f.frame, false);
                }
                Err(Some(why)) => {
                    tracing::warn!(pid = self.pid, addr = f.addr, %why, "a staged page could not be read; the agent puts it back");
                    self.give_back(f.slot, f.addr);
                    done(f.frame, false);
                }
            }
        }
        (taken, freed)
    }

    /// The process is gone: its evictions in flight will never be answered. Each is
    /// finished as not moved (the memory manager fences them: their frames go back).
    pub(crate) fn abandon(&mut self, done: &mut dyn FnMut(FrameNo, bool)) {
        for (_, f) in std::mem::take(&mut self.evicting) {
            done(f.frame, false);
        }
        self.undropped.clear();
        self.dropping.clear();
    }

    /// Copies the staged page of `f` into its frame's slot and marks the frame Staging.
    /// `Err(None)`: the process is gone (`ESRCH`); `Err(Some(why))`: it failed.
    fn take_in(&self, pool: &FramePool, f: InFlight) -> Result<(), Option<String>> {
        let slot_addr = pool
            .prepare_stage(f.frame)
            .map_err(|e| Some(e.to_string()))?;
        let staged = self.client.staging_addr(f.slot);
        match crate::sys::remote::copy_from_process(pool, slot_addr, self.pid, staged) {
            Ok(n) if n == PAGE as usize => {}
            Err(nix::errno::Errno::ESRCH) => return Err(None),
            other => return Err(Some(format!("process_vm_readv: {other:?}"))),
        }
        pool.commit_stage(f.frame).map_err(|e| Some(e.to_string()))
    }

    /// A staged page the daemon could not take: the agent moves it back (its slot is
    /// free again when the answer comes).
    fn give_back(&mut self, slot: u32, addr: u64) {
        match self.submit(AgentOp::ReturnFromStaging, slot, addr, 1) {
            Some(seq) => {
                self.dropping.insert(seq, vec![slot]);
                let _ = self.client.kick();
            }
            None => tracing::error!(
                pid = self.pid,
                addr,
                "cannot ask the agent to return a staged page: it stays in staging"
            ),
        }
    }

    /// Phase 3: tells the tagger `away` pages are out, then drops the held slots.
    /// Returns whether the tagger was told (else nothing is dropped).
    pub(crate) fn drop_held(&mut self, channel: Option<&Channel>, away: u64) -> bool {
        if self.undropped.is_empty() {
            return true;
        }
        if let Some(ch) = channel
            && ch
                .send_nowait(&Message::SwapState {
                    swapped_pages: away,
                })
                .is_err()
        {
            return false;
        }
        let mut slots = std::mem::take(&mut self.undropped);
        slots.sort_unstable();
        let mut kicked = false;
        for (first, pages) in slot_runs(&slots) {
            let run: Vec<u32> = (first..first + pages as u32).collect();
            match self.submit(AgentOp::DropSlots, first, 0, pages) {
                Some(seq) => {
                    self.dropping.insert(seq, run);
                    kicked = true;
                }
                None => self.undropped.extend(run),
            }
        }
        if kicked {
            let _ = self.client.kick();
        }
        true
    }
}

/// Reads `buf.len()` bytes of process `pid` at `addr` (a staging slot: present memory,
/// never a hole, which would fault into the program's own userfaultfd).
pub(crate) fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> nix::Result<usize> {
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: buf.len(),
    }];
    process_vm_readv(
        Pid::from_raw(pid as i32),
        &mut [IoSliceMut::new(buf)],
        &remote,
    )
}

/// Runs of consecutive slots in `sorted` (ascending, no duplicates): `(first, pages)`.
pub(crate) fn slot_runs(sorted: &[u32]) -> Vec<(u32, u64)> {
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for &slot in sorted {
        match runs.last_mut() {
            Some((first, pages)) if u64::from(*first) + *pages == u64::from(slot) => *pages += 1,
            _ => runs.push((slot, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::slot_runs;

    #[test]
    fn consecutive_slots_are_dropped_together() {
        assert_eq!(slot_runs(&[]), vec![]);
        assert_eq!(slot_runs(&[3]), vec![(3, 1)]);
        assert_eq!(slot_runs(&[0, 1, 2, 5, 6, 9]), vec![(0, 3), (5, 2), (9, 1)]);
    }
}
