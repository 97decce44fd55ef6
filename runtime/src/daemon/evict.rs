//! Eviction from another process, through the tagger's agent.
//!
//! No stock system call takes a page out of another address space, so the evictor asks
//! the tagger's agent thread to `UFFDIO_MOVE` it (same mm) into a staging slot, then
//! reads the slot (present memory, never a hole) with `process_vm_readv`.
//!
//! # One batch, step by step (who owns the page)
//! 1. Under the map lock, pick up to `want` resident pages (FIFO) and mark each
//!    `Out(cell: Evicting)` with a free staging slot. The frame stops counting at once.
//! 2. Ring: `EvictToStaging(slot, addr)` for each; kick; collect completions.
//!    - moved: the program has a hole there; a fault on it waits for step 3.
//!    - refused (`EBUSY`: shared with a fork child or pinned; `ENOENT`: freed meanwhile):
//!      the page is still the program's; the entry goes back to `Resident` (if it was
//!      not freed meanwhile) and is charged again.
//! 3. Read each moved slot into a daemon buffer: the cell becomes `Cached` (faults are
//!    served from it from now on).
//! 4. Write each buffer to a swap slot; on success the cell becomes `Stored` and the
//!    buffer is dropped. (No slot, or a failed write: the data stays `Cached`.)
//! 5. Tell the tagger how many pages are out (`SwapState`) — before the staging copies
//!    are dropped, so a daemon death after this point kills the program rather than let
//!    it read zeros — then `DropSlots` and reuse the slots.
//!
//! # fork
//! - Right after a `fork`, every page of the parent is shared copy-on-write with the
//!   child and `UFFDIO_MOVE` refuses it (`EBUSY`): the agent breaks the sharing without
//!   writing (`MADV_POPULATE_WRITE`) and moves the parent's now private copy.
//! - While a `fork` (or `munmap`, `mremap`, `madvise`) waits for the reader, the
//!   agent's moves fail with `EAGAIN` at once: those victims are reverted and retried
//!   in a later batch. Nothing here waits for the reader while holding what it needs
//!   (it takes only the map lock, briefly).
//! - A page moved to staging just before a `fork` is a hole in the child too, which
//!   shares the cell: if the parent frees the page before the move's completion is
//!   handled, the staged content is still read into the cell (the child's only copy).
//! - A fork child's inherited memory lives on a userfaultfd context only the daemon
//!   holds, so no agent can ever move its pages: what it swaps in (a `BGSAVE` child
//!   reading the whole dataset) is not held against the pool ([`release_fork_children`]),
//!   else the pool would fill with pages nobody can evict and every fault of every
//!   process would wait for a frame. Those pages go when the child exits.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::sync::TryLockError;
use std::time::{Duration, Instant};
use usm_sync::atomic::Ordering;
use usm_sync::{Arc, MutexGuard};

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;
use usm_proto::agent::{AgentCompletion, AgentOp, AgentRequest};
use usm_swap::PageBuf;

use super::Shared;
use super::process::{Agent, Proc};
use super::space::{CellData, Charge, PageState, SwapCell};
use super::stats::bump;
use super::sys::PAGE;

/// Most pages evicted in one batch.
const BATCH: usize = 64;

/// The evictor thread: keeps free frames between the watermarks.
pub(crate) fn run(sh: &Arc<Shared>) {
    while !sh.stopping.load(Ordering::Acquire) {
        sh.wait_evict_kick(Duration::from_millis(20));
        if sh.free_frames() >= sh.low {
            continue;
        }
        release_fork_children(sh);
        let mut stalls = 0;
        while sh.free_frames() < sh.high && !sh.stopping.load(Ordering::Acquire) {
            let Some(victim) = sh.largest_evictable() else {
                break;
            };
            let want = sh
                .high
                .saturating_sub(sh.free_frames())
                .clamp(1, BATCH as u64) as usize;
            if evict_batch(sh, &victim, want) == 0 {
                stalls += 1;
                if stalls > 3 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Stops charging the pool for the resident pages of fork children (see the module
/// doc): they become `Resident { inherited: true }`, like the pages the child inherited
/// at `fork`. Returns how many frames were given back to the pool.
fn release_fork_children(sh: &Shared) -> u64 {
    let mut released = 0;
    for p in sh.procs() {
        if p.channel.is_some() || p.parent.is_none() || p.gone.load(Ordering::Acquire) {
            continue;
        }
        let mut m = p.lock_map();
        if m.charged == 0 {
            continue;
        }
        let charged: Vec<u64> = m
            .pages
            .iter()
            .filter(|(_, s)| matches!(s, PageState::Resident { inherited: false }))
            .map(|(&a, _)| a)
            .collect();
        for page in charged {
            m.set_resident(page, Charge::Inherited);
            released += 1;
        }
        m.fifo.clear();
    }
    if released > 0 {
        tracing::debug!("{released} frame(s) of fork children no longer held against the pool");
    }
    released
}

/// Drops the staging copies of pages that are safe in the daemon, once the tagger knows
/// how many pages are out; if it cannot be told now, they stay in staging (the tagger
/// restores those itself if the daemon dies) and this is retried with the next batch.
fn flush_undropped(proc: &Proc, agent: &mut Agent) {
    if agent.undropped.is_empty() || !proc.tell_swapped(true) {
        return;
    }
    let mut slots = std::mem::take(&mut agent.undropped);
    // One `madvise` per run of consecutive slots: each raises a REMOVE event (the
    // staging area is registered), which holds every UFFDIO_COPY of the process at
    // `EAGAIN` until the reader has read it.
    slots.sort_unstable();
    let mut last = None;
    for (first, pages) in slot_runs(&slots) {
        if let Some(s) = submit_pages(agent, AgentOp::DropSlots, first, 0, pages) {
            last = Some(s);
        }
    }
    let _ = agent.client.kick();
    let mut d = HashMap::new();
    if let Some(last) = last {
        if !collect(proc, agent, &mut d, last, Duration::from_secs(10))
            && forget_if_gone(proc, agent)
        {
            // The staging area went with the process: nothing is left to drop or reuse.
            return;
        }
    }
    agent.free_slots.extend(slots);
}

/// If `proc` is gone, forgets the agent's batch state (completions set aside, staging
/// copies not yet dropped: they went with its address space) and says so.
fn forget_if_gone(proc: &Proc, agent: &mut Agent) -> bool {
    if !proc.gone.load(Ordering::Acquire) {
        return false;
    }
    agent.stash.clear();
    agent.undropped.clear();
    true
}

/// Is the page at `addr` of process `pid` present (`/proc/PID/pagemap` bit 63)? Reading
/// a hole of a staging slot through `process_vm_readv` would fault into the program's
/// own userfaultfd, so the daemon checks first.
pub(crate) fn present(pid: u32, addr: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else {
        return false;
    };
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, addr / PAGE * 8).is_ok() && u64::from_le_bytes(e) >> 63 == 1
}

/// Reads one page of process `pid` at `addr` (a staging slot: present memory).
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

/// The page did not leave the program: it is the program's (and charged) again.
fn revert(proc: &Proc, agent: &mut Agent, v: Victim) {
    let mut m = proc.lock_map();
    if v.cell.is_in(&m) {
        let addr = v.cell.addr.load(Ordering::Acquire);
        m.set_resident(addr, Charge::Now);
    }
    agent.free_slots.push(v.slot);
}

/// The page is in staging but the daemon cannot read it: ask the agent to put it back.
fn return_from_staging(proc: &Proc, agent: &mut Agent, v: Victim, to: u64) {
    let Some(seq) = submit(agent, AgentOp::ReturnFromStaging, v.slot, to) else {
        *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) = CellData::Lost;
        return;
    };
    let _ = agent.client.kick();
    let mut d = HashMap::new();
    if !collect(proc, agent, &mut d, seq, Duration::from_secs(10)) && forget_if_gone(proc, agent) {
        // The staged copy went with the process; a fork child sharing the cell gets
        // `Lost` (a clear SIGBUS) unless it was read already.
        abandon(std::iter::once(v));
        return;
    }
    if d.get(&seq).copied() == Some(PAGE as i64) {
        revert(proc, agent, v);
        return;
    }
    let ours = v.cell.is_in(&proc.lock_map());
    if ours {
        // The slot keeps the only copy: it stays occupied, and a fault reads it there.
        *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) = CellData::Lost;
    } else {
        // Stale content nobody refers to: drop it and reuse the slot.
        agent.undropped.push(v.slot);
    }
}

/// The evicting process died with these pages in flight: their staged copies went with
/// it. A fork child that shares a cell (it forked after the move) gets `Lost` — its
/// fault is poisoned, a clear `SIGBUS` — rather than waiting forever for `Evicting` to
/// end.
fn abandon(victims: impl Iterator<Item = Victim>) {
    for v in victims {
        let mut d = v.cell.data.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*d, CellData::Evicting) {
            *d = CellData::Lost;
        }
    }
}

struct Victim {
    page: u64,
    cell: Arc<SwapCell>,
    slot: u32,
}

/// Every completion available: set aside earlier ones first, then the ring's.
fn take_completions(agent: &mut Agent) -> Vec<AgentCompletion> {
    let mut out = std::mem::take(&mut agent.stash);
    out.extend(agent.client.completions());
    out
}

/// Waits until `seq` is answered, `timeout` passes, or `proc` is gone (its agent will
/// never answer: stop at once rather than stall the evictor for the whole timeout);
/// other completions are set aside for their own waiter. Returns whether `seq` was
/// answered.
fn collect(
    proc: &Proc,
    agent: &mut Agent,
    done: &mut HashMap<u64, i64>,
    seq: u64,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while !done.contains_key(&seq) && Instant::now() < deadline {
        if proc.gone.load(Ordering::Acquire) {
            // One last look: the answer may have come just before the end.
            for c in take_completions(agent) {
                done.insert(c.seq, c.result);
            }
            break;
        }
        let mut others = Vec::new();
        for c in take_completions(agent) {
            if c.seq == seq {
                done.insert(c.seq, c.result);
            } else {
                others.push(c);
            }
        }
        agent.stash.extend(others);
        if !done.contains_key(&seq) {
            let _ = agent.client.wait_done(20);
        }
    }
    done.contains_key(&seq)
}

fn submit(agent: &mut Agent, op: AgentOp, slot: u32, addr: u64) -> Option<u64> {
    submit_pages(agent, op, slot, addr, 1)
}

/// Runs of consecutive slots in `sorted` (ascending, no duplicates): `(first, pages)`.
fn slot_runs(sorted: &[u32]) -> Vec<(u32, u64)> {
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for &slot in sorted {
        match runs.last_mut() {
            Some((first, pages)) if u64::from(*first) + *pages == u64::from(slot) => *pages += 1,
            _ => runs.push((slot, 1)),
        }
    }
    runs
}

fn submit_pages(agent: &mut Agent, op: AgentOp, slot: u32, addr: u64, pages: u64) -> Option<u64> {
    agent.seq += 1;
    let seq = agent.seq;
    agent
        .client
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

/// Locks `proc`'s agent without ever blocking a worker.
///
/// A workee holds this lock for a whole batch, across yields (it waits for its swap
/// writes by yielding). If a second workee on the same worker blocked the worker's OS
/// thread on the lock, the holder could never be resumed: a deadlock (seen with `quota`,
/// whose faults evict the process's own pages from workees). On a uThread the lock is
/// therefore only *tried*, yielding between tries; an OS thread (the evictor) blocks.
fn lock_agent(proc: &Proc) -> MutexGuard<'_, Option<Agent>> {
    if !usm_localmanager::in_uthread() {
        return proc.agent.lock().unwrap_or_else(|p| p.into_inner());
    }
    loop {
        match proc.agent.try_lock() {
            Ok(guard) => return guard,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                usm_localmanager::yield_now();
            }
        }
    }
}

/// Evicts up to `want` pages of `proc`. Returns how many left the program.
pub(crate) fn evict_batch(sh: &Shared, proc: &Proc, want: usize) -> usize {
    let mut guard = lock_agent(proc);
    let Some(agent) = guard.as_mut() else {
        return 0;
    };
    if proc.agent_tid.load(Ordering::Acquire) == 0 {
        // The tagger starts the agent thread after AgentReady: look it up now.
        let tid = super::process::find_thread(proc.pid, "usm-agent");
        proc.agent_tid.store(tid, Ordering::Release);
    }
    flush_undropped(proc, agent);
    // 1. Pick victims.
    let mut victims = Vec::new();
    {
        let mut m = proc.lock_map();
        if proc.gone.load(Ordering::Acquire) {
            return 0;
        }
        let mut scanned = 0;
        while victims.len() < want && scanned < 4 * want + 64 {
            let Some(page) = m.fifo.pop_front() else {
                break;
            };
            scanned += 1;
            if !matches!(
                m.pages.get(&page),
                Some(PageState::Resident { inherited: false })
            ) {
                continue; // stale FIFO entry
            }
            let Some(slot) = agent.free_slots.pop() else {
                m.fifo.push_front(page);
                break;
            };
            let cell = SwapCell::new(sh.swap.clone(), agent.client.staging_addr(slot), page);
            m.set_out(page, cell.clone());
            victims.push(Victim { page, cell, slot });
        }
    }
    if victims.is_empty() {
        return 0;
    }
    // 2. Ask the agent to move them to staging; 3. handle each completion as it
    // arrives (a fault on a moved page is served from the cache at once: the agent's
    // own thread may be the one faulting), never assuming an outcome on a timeout.
    let mut pending: HashMap<u64, Victim> = HashMap::new();
    for v in victims {
        match submit(agent, AgentOp::EvictToStaging, v.slot, v.page) {
            Some(seq) => {
                pending.insert(seq, v);
            }
            None => revert(proc, agent, v),
        }
    }
    let _ = agent.client.kick();
    let mut moved = Vec::new();
    let mut waited = Instant::now();
    while !pending.is_empty() {
        let done = take_completions(agent);
        if done.is_empty() {
            if proc.gone.load(Ordering::Acquire) {
                // The map is gone with the process; a fork child may share the cells.
                abandon(pending.into_values());
                forget_if_gone(proc, agent);
                return 0;
            }
            if waited.elapsed() > Duration::from_secs(10) {
                tracing::warn!(
                    "pid {}: the eviction agent has not answered for 10 s ({} pages pending)",
                    proc.pid,
                    pending.len()
                );
                waited = Instant::now();
            }
            let _ = agent.client.wait_done(20);
            continue;
        }
        for c in done {
            let Some(v) = pending.remove(&c.seq) else {
                continue;
            };
            tracing::trace!(
                "pid {}: evict {:#x} slot {} -> {}",
                proc.pid,
                v.page,
                v.slot,
                c.result
            );
            if c.result != PAGE as i64 {
                bump(&proc.counters.evict_skipped);
                revert(proc, agent, v);
                continue;
            }
            let (ours, retouched) = {
                let m = proc.lock_map();
                (
                    v.cell.is_in(&m),
                    matches!(m.pages.get(&v.page), Some(PageState::Resident { .. })),
                )
            };
            if !ours {
                // A fork child that forked after the move has a hole there and shares
                // this cell: it needs the staged content whatever the parent did since.
                // (Arc count: this victim, plus every map still holding the cell.)
                if Arc::strong_count(&v.cell) > 1 {
                    let mut buf = PageBuf::page();
                    let staged = agent.client.staging_addr(v.slot);
                    if read_remote(proc.pid, staged, &mut buf) == Ok(PAGE as usize) {
                        *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) =
                            CellData::Cached(buf);
                    }
                }
                if retouched {
                    // Freed and touched again while the request was queued: what the
                    // agent moved is the page's new content. Put it back.
                    let to = v.page;
                    return_from_staging(proc, agent, v, to);
                } else {
                    // Freed (unmapped, DONTNEED): the content is garbage; drop the slot.
                    agent.undropped.push(v.slot);
                }
                continue;
            }
            let mut buf = PageBuf::page();
            let read = read_remote(proc.pid, agent.client.staging_addr(v.slot), &mut buf);
            if read == Ok(PAGE as usize) {
                *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) = CellData::Cached(buf);
                bump(&proc.counters.evictions);
                moved.push(v);
                continue;
            }
            if read == Err(nix::errno::Errno::ESRCH) {
                // The process is gone, and its map with it; a fork child may share the
                // cells.
                abandon(std::iter::once(v).chain(pending.into_values()));
                forget_if_gone(proc, agent);
                return 0;
            }
            tracing::warn!(
                "pid {}: cannot read staging slot {} ({read:?}); returning the page",
                proc.pid,
                v.slot
            );
            let to = v.cell.addr.load(Ordering::Acquire);
            return_from_staging(proc, agent, v, to);
        }
    }
    // 4. Write to swap.
    let mut writes = Vec::new();
    for v in &moved {
        let Some(entry) = sh.swap.alloc() else {
            continue;
        };
        let mut buf = PageBuf::page();
        if let CellData::Cached(b) = &*v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) {
            buf.copy_from_slice(b);
        }
        writes.push((v, entry, sh.swap.write(entry, buf)));
    }
    for (v, entry, w) in writes {
        match w.wait() {
            Ok(_) => {
                *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) = CellData::Stored(entry);
            }
            Err(e) => {
                tracing::warn!("swap write failed ({e}); the page stays in daemon memory");
                sh.swap.free(entry);
            }
        }
    }
    // 5. SwapState first, then drop the staging copies.
    let n = moved.len();
    agent.undropped.extend(moved.iter().map(|v| v.slot));
    drop(moved);
    flush_undropped(proc, agent);
    n
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
