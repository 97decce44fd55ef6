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

use std::collections::HashMap;
use std::io::IoSliceMut;
use usm_sync::Arc;
use usm_sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;
use usm_proto::agent::{AgentOp, AgentRequest};
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
        let mut stalls = 0;
        while sh.free_frames() < sh.high && !sh.stopping.load(Ordering::Acquire) {
            let Some(victim) = sh.largest_evictable() else {
                break;
            };
            let want = (sh.high - sh.free_frames()).min(BATCH as u64) as usize;
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

struct Victim {
    page: u64,
    cell: Arc<SwapCell>,
    slot: u32,
}

fn collect(agent: &mut Agent, done: &mut HashMap<u64, i64>, expect: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while done.len() < expect && Instant::now() < deadline {
        for c in agent.client.completions() {
            done.insert(c.seq, c.result);
        }
        if done.len() < expect {
            let _ = agent.client.wait_done(50);
        }
    }
}

fn submit(agent: &mut Agent, op: AgentOp, slot: u32, addr: u64) -> Option<u64> {
    agent.seq += 1;
    let seq = agent.seq;
    agent
        .client
        .submit(AgentRequest {
            op,
            slot,
            addr,
            pages: 1,
            seq,
        })
        .ok()
        .map(|()| seq)
}

/// Evicts up to `want` pages of `proc`. Returns how many left the program.
pub(crate) fn evict_batch(sh: &Shared, proc: &Proc, want: usize) -> usize {
    let mut guard = proc.agent.lock().unwrap_or_else(|p| p.into_inner());
    let Some(agent) = guard.as_mut() else {
        return 0;
    };
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
            let cell = SwapCell::new(sh.swap.clone());
            m.set_out(page, cell.clone());
            victims.push(Victim { page, cell, slot });
        }
    }
    if victims.is_empty() {
        return 0;
    }
    // 2. Ask the agent to move them to staging.
    let mut seqs = Vec::with_capacity(victims.len());
    for v in &victims {
        seqs.push(submit(agent, AgentOp::EvictToStaging, v.slot, v.page));
    }
    let _ = agent.client.kick();
    let mut done = HashMap::new();
    let expect = seqs.iter().flatten().count();
    collect(agent, &mut done, expect, Duration::from_secs(5));
    // 3. Read the moved pages out of staging.
    let mut moved = Vec::new();
    for (v, seq) in victims.into_iter().zip(seqs) {
        let result = seq.and_then(|s| done.get(&s).copied()).unwrap_or(-1);
        if result == PAGE as i64 {
            let mut buf = PageBuf::page();
            let remote = [RemoteIoVec {
                base: agent.client.staging_addr(v.slot) as usize,
                len: PAGE as usize,
            }];
            let read = process_vm_readv(
                Pid::from_raw(proc.pid as i32),
                &mut [IoSliceMut::new(&mut buf)],
                &remote,
            );
            if read == Ok(PAGE as usize) {
                *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) = CellData::Cached(buf);
                bump(&proc.counters.evictions);
                moved.push(v);
                continue;
            }
            // Cannot read staging: give the page back to the program from staging.
            tracing::warn!(
                "pid {}: cannot read staging slot {} ({read:?}); returning the page",
                proc.pid,
                v.slot
            );
            if let Some(s) = submit(agent, AgentOp::ReturnFromStaging, v.slot, v.page) {
                let _ = agent.client.kick();
                let mut d = HashMap::new();
                collect(agent, &mut d, 1, Duration::from_secs(5));
                if d.get(&s).copied() != Some(PAGE as i64) {
                    *v.cell.data.lock().unwrap_or_else(|p| p.into_inner()) = CellData::Lost;
                    agent.free_slots.push(v.slot);
                    continue;
                }
            }
        } else {
            bump(&proc.counters.evict_skipped);
        }
        // Not moved (or moved back): the page is the program's again.
        let mut m = proc.lock_map();
        if matches!(m.pages.get(&v.page), Some(PageState::Out(c)) if Arc::ptr_eq(c, &v.cell)) {
            m.set_resident(v.page, Charge::Now);
        }
        agent.free_slots.push(v.slot);
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
    proc.tell_swapped(true);
    let n = moved.len();
    let mut drops = Vec::new();
    for v in &moved {
        if let Some(s) = submit(agent, AgentOp::DropSlots, v.slot, 0) {
            drops.push(s);
        }
    }
    let _ = agent.client.kick();
    let mut d = HashMap::new();
    collect(agent, &mut d, drops.len(), Duration::from_secs(5));
    for v in moved {
        agent.free_slots.push(v.slot);
    }
    n
}
