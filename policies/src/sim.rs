//! A simulated machine for testing policies: **not the real frame pool**.
//!
//! Policies are pure logic over the [`Cx`] interface, so they can be exercised against a
//! plain frame table: [`SimMachine`] implements [`Cx`]/[`EvictCx`] over a `Vec` of frame
//! states, per-process page tables in `BTreeMap`s, a FIFO of write-backs and a FIFO of
//! swap-ins that complete when the test says so. It mirrors the runtime's protocol (see
//! [`alloc`](crate::alloc), [`evict`](crate::evict), [`oom`](crate::oom)): it resolves
//! swap-cache hits and in-flight pages itself, runs ordinary eviction before the OOM
//! policy, evicts down to the high watermark after a fault leaves it below the low one.
//!
//! Unlike the runtime it *checks every answer*: a frame mapped that was not taken, a page
//! mapped over content, a pinned page or an out-of-scope page chosen as victim, a `DENY`
//! page evicted while another victim existed, a frame kept by a policy after its call —
//! each becomes a [`SimError`]. [`SimMachine::check`] verifies the global invariants
//! (conservation `free + mapped + staging + swap-in = total`, one page per frame, every
//! mapped frame tracked by the eviction policy).
//!
//! Nothing here touches userfaultfd, io_uring or memory: the runtime's own tests cover the
//! real path.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;

use usm_types::event::{Fault, Origin};
use usm_types::swap::{DeviceId, SwapEntry, Ticket};
use usm_types::{FrameNo, PAGE_SIZE};

use crate::alloc::AllocPolicy;
use crate::cx::{Access, Cx, EvictCx, PageMask, ProcessCounters, Watermarks};
use crate::decision::{Decision, Mapping, page_floor};
use crate::evict::{EvictPolicy, MappedPage, Urgency, VictimRequest, VictimScan};
use crate::guard::{PolicyPanic, guarded};
use crate::hint::{Hint, HintError, HintMap};
use crate::oom::{OomAction, OomPolicy, OomReason, OomSituation, RunMode};

const PAGE: u64 = PAGE_SIZE as u64;

/// A broken rule, found by the simulator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// A policy broke the [`Cx`] / decision contract.
    #[error("policy contract violated: {0}")]
    Contract(String),
    /// A global invariant does not hold.
    #[error("invariant broken: {0}")]
    Invariant(String),
    /// The test named a process that does not exist.
    #[error("no process {0}")]
    NoProcess(u32),
}

/// What became of one simulated fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultOutcome {
    /// This many pages were mapped.
    Mapped(usize),
    /// The page was in staging and the policy mapped its staged frame back.
    Reclaimed,
    /// The faulting access waits for this swap-in.
    Waiting(Ticket),
    /// The page was already present (a spurious fault; no policy call).
    AlreadyPresent,
    /// The address is outside every region of the process.
    Segv,
    /// The OOM policy failed the access.
    Failed(OomReason),
    /// The OOM policy killed the faulting process itself.
    Killed,
    /// The allocation policy panicked: the access failed, the frames it had taken were
    /// reclaimed, and the process's policy was replaced by a fresh instance (the runtime
    /// builds it from the registry; the simulator uses the factory given to
    /// [`SimMachine::set_respawn`], `first-fit` by default).
    PolicyPanicked(PolicyPanic),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    Free,
    /// Handed to a policy during the current call.
    Taken,
    Mapped {
        pid: u32,
        addr: u64,
    },
    /// Write-back in flight; `None` once the page was freed meanwhile.
    Staging(Option<(u32, u64)>),
    /// Swap-in in flight; `None` once the page was freed meanwhile.
    SwapIn(Option<(u32, u64)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Present(FrameNo),
    Staging(FrameNo),
    Swapped(SwapEntry),
    SwapIn {
        frame: FrameNo,
        ticket: Ticket,
        entry: SwapEntry,
    },
}

struct Proc {
    regions: Vec<Range<u64>>,
    pages: BTreeMap<u64, Page>,
    hints: HintMap,
    faults: u64,
}

/// Simulator counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimStats {
    /// Pages taken out by eviction.
    pub evicted: u64,
    /// Of those, pages whose hint said `EVICTION=DENY`.
    pub evicted_denied: u64,
    /// Swap-ins queued.
    pub swap_ins: u64,
    /// Processes killed by an OOM policy.
    pub kills: u64,
}

/// The memory side of the simulator: everything an eviction policy may query.
struct SimMemory {
    frames: Vec<FrameState>,
    free: Vec<FrameNo>,
    taken: usize,
    /// Frames handed out by `take_staged` in the current call, with their page.
    staged_taken: HashMap<FrameNo, (u32, u64)>,
    procs: BTreeMap<u32, Proc>,
    access: Vec<Access>,
    pinned: HashSet<FrameNo>,
    watermarks: Watermarks,
    next_ticket: u64,
    next_slot: u64,
    free_slots: Vec<u64>,
    writebacks: VecDeque<FrameNo>,
    swapins: VecDeque<(Ticket, FrameNo)>,
    violations: Vec<String>,
    stats: SimStats,
}

impl EvictCx for SimMemory {
    fn access(&mut self, frame: FrameNo) -> Access {
        match self.access.get_mut(frame.index()) {
            Some(a) => {
                let now = *a;
                a.accessed = false;
                now
            }
            None => Access::default(),
        }
    }

    fn is_pinned(&self, frame: FrameNo) -> bool {
        self.pinned.contains(&frame)
    }

    fn hint(&self, pid: u32, addr: u64) -> Hint {
        self.procs
            .get(&pid)
            .map(|p| p.hints.hint_at(addr))
            .unwrap_or_default()
    }
}

impl SimMemory {
    fn page(&self, pid: u32, addr: u64) -> Option<Page> {
        self.procs.get(&pid)?.pages.get(&addr).copied()
    }

    fn region(&self, pid: u32, addr: u64) -> Option<Range<u64>> {
        self.procs
            .get(&pid)?
            .regions
            .iter()
            .find(|r| r.contains(&addr))
            .cloned()
    }

    fn release_slot(&mut self, entry: SwapEntry) {
        self.free_slots.push(entry.slot());
    }

    fn new_slot(&mut self) -> Option<SwapEntry> {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        });
        SwapEntry::new(DeviceId(0), slot)
    }

    fn put_free(&mut self, f: FrameNo) {
        self.frames[f.index()] = FrameState::Free;
        self.access[f.index()] = Access::default();
        self.free.push(f);
    }

    /// Takes one victim out of its address space into staging, checking the choice.
    fn stage(&mut self, v: MappedPage, req: VictimRequest) {
        match self.frames.get(v.frame.index()) {
            Some(FrameState::Mapped { pid, addr }) if *pid == v.pid && *addr == v.addr => {}
            other => {
                self.violations
                    .push(format!("victim {v:?} is not that mapped page: {other:?}"));
                return;
            }
        }
        if !req.scope.admits(v.pid) {
            self.violations
                .push(format!("victim {v:?} outside scope {:?}", req.scope));
        }
        if self.pinned.contains(&v.frame) {
            self.violations.push(format!("pinned victim {v:?}"));
        }
        if self.hint(v.pid, v.addr).denies_eviction() {
            self.stats.evicted_denied += 1;
            if req.urgency == Urgency::Normal {
                self.violations
                    .push(format!("DENY victim {v:?} with normal urgency"));
            }
        }
        self.frames[v.frame.index()] = FrameState::Staging(Some((v.pid, v.addr)));
        if let Some(p) = self.procs.get_mut(&v.pid) {
            p.pages.insert(v.addr, Page::Staging(v.frame));
        }
        self.writebacks.push_back(v.frame);
        self.stats.evicted += 1;
    }

    /// After a batch containing a DENY page: no other candidate may remain.
    fn check_deny_batch(&mut self, batch: &[MappedPage], req: VictimRequest) {
        if !batch
            .iter()
            .any(|v| self.hint(v.pid, v.addr).denies_eviction())
        {
            return;
        }
        for (i, st) in self.frames.iter().enumerate() {
            if let FrameState::Mapped { pid, addr } = *st {
                let f = FrameNo(i as u32);
                if req.scope.admits(pid)
                    && !batch.iter().any(|v| v.frame == f)
                    && !self.pinned.contains(&f)
                    && !self.hint(pid, addr).denies_eviction()
                {
                    self.violations.push(format!(
                        "a DENY page was evicted while {f} (pid {pid}, {addr:#x}) could have been"
                    ));
                    return;
                }
            }
        }
    }
}

/// The simulator's [`Cx`]: memory plus the eviction policy it runs for [`Cx::evict`].
struct SimCore {
    mem: SimMemory,
    evict: Box<dyn EvictPolicy>,
}

impl SimCore {
    fn run_eviction(&mut self, req: VictimRequest) -> VictimScan {
        let mut out = Vec::new();
        let scan = self.evict.victims(req, &mut self.mem, &mut out);
        if scan.chosen != out.len() {
            self.mem.violations.push(format!(
                "victims() said {} chosen but returned {}",
                scan.chosen,
                out.len()
            ));
        }
        if out.len() > req.want {
            self.mem
                .violations
                .push(format!("victims() returned {} > {}", out.len(), req.want));
        }
        let mut seen = HashSet::new();
        for v in &out {
            if !seen.insert(v.frame) {
                self.mem
                    .violations
                    .push(format!("victim {} returned twice", v.frame));
            }
        }
        self.mem.check_deny_batch(&out, req);
        for v in out {
            self.mem.stage(v, req);
        }
        scan
    }
}

impl EvictCx for SimCore {
    fn access(&mut self, frame: FrameNo) -> Access {
        self.mem.access(frame)
    }
    fn is_pinned(&self, frame: FrameNo) -> bool {
        self.mem.is_pinned(frame)
    }
    fn hint(&self, pid: u32, addr: u64) -> Hint {
        self.mem.hint(pid, addr)
    }
}

impl Cx for SimCore {
    fn take_frame(&mut self) -> Option<FrameNo> {
        let f = self.mem.free.pop()?;
        self.mem.frames[f.index()] = FrameState::Taken;
        self.mem.taken += 1;
        Some(f)
    }

    fn take_frames(&mut self, n: usize, out: &mut Vec<FrameNo>) -> bool {
        if self.mem.free.len() < n {
            return false;
        }
        for _ in 0..n {
            if let Some(f) = self.take_frame() {
                out.push(f);
            }
        }
        true
    }

    fn give_frame(&mut self, frame: FrameNo) {
        if let Some((pid, addr)) = self.mem.staged_taken.remove(&frame) {
            self.mem.violations.push(format!(
                "gave back staged {frame}: the content of {pid}:{addr:#x} would be lost"
            ));
        }
        if self.mem.frames.get(frame.index()) == Some(&FrameState::Taken) {
            self.mem.taken -= 1;
            self.mem.put_free(frame);
        } else {
            self.mem
                .violations
                .push(format!("gave back {frame} which was not taken"));
        }
    }

    fn free_frames(&self) -> usize {
        self.mem.free.len()
    }

    fn watermarks(&self) -> Watermarks {
        self.mem.watermarks
    }

    fn region(&self, pid: u32, addr: u64) -> Option<Range<u64>> {
        self.mem.region(pid, addr)
    }

    fn vacant(&self, pid: u32, start: u64, npages: usize, out: &mut PageMask) {
        out.clear();
        let Some(p) = self.mem.procs.get(&pid) else {
            return;
        };
        for i in 0..npages.min(PageMask::CAPACITY) {
            let a = start + i as u64 * PAGE;
            if p.regions.iter().any(|r| r.contains(&a)) && !p.pages.contains_key(&a) {
                out.set(i);
            }
        }
    }

    fn take_staged(&mut self, pid: u32, addr: u64) -> Option<FrameNo> {
        let addr = page_floor(addr);
        let Some(Page::Staging(f)) = self.mem.page(pid, addr) else {
            return None;
        };
        self.mem.writebacks.retain(|w| *w != f);
        if let Some(p) = self.mem.procs.get_mut(&pid) {
            p.pages.remove(&addr);
        }
        self.mem.frames[f.index()] = FrameState::Taken;
        self.mem.taken += 1;
        self.mem.staged_taken.insert(f, (pid, addr));
        Some(f)
    }

    fn swap_entry(&self, pid: u32, addr: u64) -> Option<SwapEntry> {
        match self.mem.page(pid, page_floor(addr))? {
            Page::Swapped(e) => Some(e),
            _ => None,
        }
    }

    fn swap_in(&mut self, pid: u32, addr: u64, entry: SwapEntry, frame: FrameNo) -> Ticket {
        let ticket = Ticket(self.mem.next_ticket);
        self.mem.next_ticket += 1;
        let addr = page_floor(addr);
        if self.mem.frames.get(frame.index()) != Some(&FrameState::Taken) {
            self.mem
                .violations
                .push(format!("swap_in into {frame} which was not taken"));
            return ticket;
        }
        if self.mem.page(pid, addr) != Some(Page::Swapped(entry)) {
            self.mem
                .violations
                .push(format!("swap_in of {entry} for {addr:#x}: not its entry"));
            self.mem.taken -= 1;
            self.mem.put_free(frame);
            return ticket;
        }
        self.mem.taken -= 1;
        self.mem.frames[frame.index()] = FrameState::SwapIn(Some((pid, addr)));
        if let Some(p) = self.mem.procs.get_mut(&pid) {
            p.pages.insert(
                addr,
                Page::SwapIn {
                    frame,
                    ticket,
                    entry,
                },
            );
        }
        self.mem.swapins.push_back((ticket, frame));
        self.mem.stats.swap_ins += 1;
        ticket
    }

    fn counters(&self, pid: u32) -> ProcessCounters {
        let Some(p) = self.mem.procs.get(&pid) else {
            return ProcessCounters::default();
        };
        let mut c = ProcessCounters {
            faults: p.faults,
            ..Default::default()
        };
        for page in p.pages.values() {
            match page {
                Page::Present(_) | Page::SwapIn { .. } => c.resident += 1,
                Page::Staging(_) | Page::Swapped(_) => c.swapped += 1,
            }
        }
        c
    }

    fn evict(&mut self, req: VictimRequest) -> usize {
        self.run_eviction(req).chosen
    }
}

/// The simulated machine: one worker with a frame pool, swap, processes, one eviction
/// and one OOM policy, and one allocation policy per process.
pub struct SimMachine {
    core: SimCore,
    oom: Box<dyn OomPolicy>,
    allocs: HashMap<u32, Box<dyn AllocPolicy>>,
    respawn: fn() -> Box<dyn AllocPolicy>,
    mode: RunMode,
}

fn first_fit() -> Box<dyn AllocPolicy> {
    Box::new(crate::builtin::FirstFit)
}

impl SimMachine {
    /// A machine with `frames` frames, the given watermarks and policies.
    pub fn new(
        frames: usize,
        watermarks: Watermarks,
        evict: Box<dyn EvictPolicy>,
        oom: Box<dyn OomPolicy>,
    ) -> Self {
        let mem = SimMemory {
            frames: vec![FrameState::Free; frames],
            free: (0..frames as u32).rev().map(FrameNo).collect(),
            taken: 0,
            staged_taken: HashMap::new(),
            procs: BTreeMap::new(),
            access: vec![Access::default(); frames],
            pinned: HashSet::new(),
            watermarks,
            next_ticket: 1,
            next_slot: 0,
            free_slots: Vec::new(),
            writebacks: VecDeque::new(),
            swapins: VecDeque::new(),
            violations: Vec::new(),
            stats: SimStats::default(),
        };
        SimMachine {
            core: SimCore { mem, evict },
            oom,
            allocs: HashMap::new(),
            respawn: first_fit,
            mode: RunMode::Daemon,
        }
    }

    /// The context itself, to call a policy directly in a unit test. Frames taken through
    /// it must be mapped with [`SimMachine::map_taken`] or given back before
    /// [`SimMachine::check`], which otherwise reports them.
    pub fn cx(&mut self) -> &mut dyn Cx {
        &mut self.core
    }

    /// Installs a mapping whose frames were taken through [`SimMachine::cx`], with the same
    /// checks as a fault's `Map` decision (`fault_addr` must be inside it).
    pub fn map_taken(&mut self, pid: u32, fault_addr: u64, m: Mapping) -> Result<usize, SimError> {
        match self.apply_map(pid, page_floor(fault_addr), m)? {
            FaultOutcome::Mapped(n) => Ok(n),
            FaultOutcome::Reclaimed => Ok(1),
            other => Err(SimError::Contract(format!("unexpected {other:?}"))),
        }
    }

    /// Switches what "kill the largest" means (daemon by default).
    pub fn set_mode(&mut self, mode: RunMode) {
        self.mode = mode;
    }

    /// Attaches process `pid` with one managed region and its allocation policy.
    pub fn add_process(
        &mut self,
        pid: u32,
        name: &str,
        region: Range<u64>,
        mut alloc: Box<dyn AllocPolicy>,
    ) {
        self.core.mem.procs.insert(
            pid,
            Proc {
                regions: vec![region],
                pages: BTreeMap::new(),
                hints: HintMap::new(),
                faults: 0,
            },
        );
        alloc.new_process(Origin { pid, tid: pid }, name, None, &mut self.core);
        self.allocs.insert(pid, alloc);
    }

    /// Adds another managed region to process `pid` (page aligned, not overlapping).
    pub fn add_region(&mut self, pid: u32, region: Range<u64>) -> Result<(), SimError> {
        let p = self
            .core
            .mem
            .procs
            .get_mut(&pid)
            .ok_or(SimError::NoProcess(pid))?;
        p.regions.push(region);
        Ok(())
    }

    /// The processes alive.
    pub fn pids(&self) -> Vec<u32> {
        self.core.mem.procs.keys().copied().collect()
    }

    /// Frames free now.
    pub fn free_frames(&self) -> usize {
        self.core.mem.free.len()
    }

    /// Counters of a process.
    pub fn counters(&self, pid: u32) -> ProcessCounters {
        self.core.counters(pid)
    }

    /// Simulator counters.
    pub fn stats(&self) -> SimStats {
        self.core.mem.stats
    }

    /// The eviction policy (to inspect it).
    pub fn evict_policy(&self) -> &dyn EvictPolicy {
        &*self.core.evict
    }

    /// The frame mapped at `addr` of `pid`, if present.
    pub fn frame_of(&self, pid: u32, addr: u64) -> Option<FrameNo> {
        match self.core.mem.page(pid, page_floor(addr))? {
            Page::Present(f) => Some(f),
            _ => None,
        }
    }

    /// Present pages of `pid` in address order.
    pub fn present_pages(&self, pid: u32) -> Vec<u64> {
        self.core.mem.procs.get(&pid).map_or_else(Vec::new, |p| {
            p.pages
                .iter()
                .filter(|(_, pg)| matches!(pg, Page::Present(_)))
                .map(|(a, _)| *a)
                .collect()
        })
    }

    /// `pid`'s page at `addr` is in swap (written back).
    pub fn is_swapped(&self, pid: u32, addr: u64) -> bool {
        matches!(
            self.core.mem.page(pid, page_floor(addr)),
            Some(Page::Swapped(_))
        )
    }

    fn contract(&self) -> Result<(), SimError> {
        match self.core.mem.violations.first() {
            Some(v) => Err(SimError::Contract(v.clone())),
            None => Ok(()),
        }
    }

    /// Serves a fault on `addr` of `pid` as the runtime would (see the module docs).
    pub fn fault(&mut self, pid: u32, addr: u64, write: bool) -> Result<FaultOutcome, SimError> {
        let addr = page_floor(addr);
        if !self.core.mem.procs.contains_key(&pid) {
            return Err(SimError::NoProcess(pid));
        }
        if self.core.mem.region(pid, addr).is_none() {
            return Ok(FaultOutcome::Segv);
        }
        match self.core.mem.page(pid, addr) {
            Some(Page::Present(_)) => return Ok(FaultOutcome::AlreadyPresent),
            Some(Page::SwapIn { ticket, .. }) => return Ok(FaultOutcome::Waiting(ticket)),
            Some(Page::Staging(_)) | Some(Page::Swapped(_)) | None => {}
        }
        if let Some(p) = self.core.mem.procs.get_mut(&pid) {
            p.faults += 1;
        }
        let fault = Fault {
            addr,
            write,
            wp: false,
            minor: false,
            len_hint: PAGE,
            origin: Origin { pid, tid: pid },
        };
        let mut ordinary_eviction_done = false;
        let mut attempt = 0u32;
        let mut last_scan = VictimScan::default();
        loop {
            let Some(alloc) = self.allocs.get_mut(&pid) else {
                return Err(SimError::NoProcess(pid));
            };
            let name = alloc.name().to_owned();
            let core = &mut self.core;
            let decision = match guarded(&name, || alloc.alloc(&fault, core)) {
                Ok(d) => d,
                Err(panic) => {
                    self.recover_from_panic(pid);
                    return Ok(FaultOutcome::PolicyPanicked(panic));
                }
            };
            let outcome = match decision {
                Decision::Map(m) => Some(self.apply_map(pid, addr, m)?),
                Decision::Yield(t) => {
                    match self.core.mem.page(pid, addr) {
                        Some(Page::SwapIn { ticket, .. }) if ticket == t => {}
                        other => {
                            return Err(SimError::Contract(format!(
                                "Yield({t:?}) but page {addr:#x} is {other:?}"
                            )));
                        }
                    }
                    Some(FaultOutcome::Waiting(t))
                }
                Decision::Oom => None,
            };
            if let Some((f, (p, a))) = self.core.mem.staged_taken.drain().next() {
                return Err(SimError::Contract(format!(
                    "staged {f} of {p}:{a:#x} taken but not mapped back: content lost"
                )));
            }
            if self.core.mem.taken != 0 {
                return Err(SimError::Contract(format!(
                    "policy kept {} taken frame(s) after its call",
                    self.core.mem.taken
                )));
            }
            self.contract()?;
            if let Some(o) = outcome {
                self.balance();
                return Ok(o);
            }
            if !ordinary_eviction_done {
                ordinary_eviction_done = true;
                let want = self.core.mem.watermarks.high.max(1);
                last_scan = self.core.run_eviction(VictimRequest::any(want));
                self.complete_writebacks(usize::MAX);
                self.contract()?;
                continue;
            }
            let situation = OomSituation {
                fault,
                attempt,
                mode: self.mode,
                last_scan,
                free_frames: self.core.mem.free.len(),
            };
            attempt += 1;
            if attempt > 64 {
                return Err(SimError::Contract("the OOM policy never gave up".into()));
            }
            match self.oom.on_oom(&situation, &mut self.core) {
                OomAction::EvictHarder(n) => {
                    last_scan = self.core.run_eviction(VictimRequest::any(n).hard());
                    self.complete_writebacks(usize::MAX);
                    self.contract()?;
                }
                OomAction::FailAccess(r) => return Ok(FaultOutcome::Failed(r)),
                OomAction::KillLargestProcess | OomAction::KillLargestTask => {
                    let largest = self
                        .pids()
                        .into_iter()
                        .max_by_key(|p| (self.core.counters(*p).resident, *p));
                    let Some(victim) = largest else {
                        return Ok(FaultOutcome::Failed(OomReason::GaveUp {
                            attempts: attempt,
                        }));
                    };
                    self.core.mem.stats.kills += 1;
                    self.exit(victim)?;
                    if victim == pid {
                        return Ok(FaultOutcome::Killed);
                    }
                }
            }
        }
    }

    /// What the runtime does after a policy panicked: take back what the policy held
    /// (staged frames go back to staging with their write-back), drop the instance and
    /// build a fresh one.
    fn recover_from_panic(&mut self, pid: u32) {
        let mem = &mut self.core.mem;
        let staged: Vec<_> = mem.staged_taken.drain().collect();
        for (f, (p, a)) in staged {
            mem.frames[f.index()] = FrameState::Staging(Some((p, a)));
            if let Some(proc_) = mem.procs.get_mut(&p) {
                proc_.pages.insert(a, Page::Staging(f));
            }
            mem.writebacks.push_back(f);
            mem.taken -= 1;
        }
        for i in 0..mem.frames.len() {
            if mem.frames[i] == FrameState::Taken {
                mem.taken -= 1;
                mem.put_free(FrameNo(i as u32));
            }
        }
        mem.violations.clear();
        let fresh = (self.respawn)();
        self.allocs.insert(pid, fresh);
    }

    /// Sets the factory that replaces an allocation policy after it panicked.
    pub fn set_respawn(&mut self, factory: fn() -> Box<dyn AllocPolicy>) {
        self.respawn = factory;
    }

    fn install(&mut self, pid: u32, addr: u64, f: FrameNo) {
        self.core.mem.frames[f.index()] = FrameState::Mapped { pid, addr };
        if let Some(p) = self.core.mem.procs.get_mut(&pid) {
            p.pages.insert(addr, Page::Present(f));
        }
        self.core.evict.on_map(
            MappedPage {
                frame: f,
                pid,
                addr,
            },
            &mut self.core.mem,
        );
    }

    fn apply_map(&mut self, pid: u32, addr: u64, m: Mapping) -> Result<FaultOutcome, SimError> {
        let bad = |why: String| Err(SimError::Contract(why));
        if !m.contains(addr) {
            return bad(format!(
                "mapping {:#x}..{:#x} misses the fault {addr:#x}",
                m.start(),
                m.end()
            ));
        }
        let Some(region) = self.core.mem.region(pid, addr) else {
            return bad("no region".into());
        };
        if m.start() < region.start || m.end() > region.end {
            return bad(format!(
                "mapping {:#x}..{:#x} leaves region {region:x?}",
                m.start(),
                m.end()
            ));
        }
        let mut seen = HashSet::new();
        for (a, f) in m.pages() {
            if self.core.mem.frames.get(f.index()) != Some(&FrameState::Taken) || !seen.insert(f) {
                return bad(format!(
                    "{f} mapped at {a:#x} was not taken by this call (or twice)"
                ));
            }
            if let Some(pg) = self.core.mem.page(pid, a) {
                return bad(format!("{a:#x} mapped over {pg:?}"));
            }
        }
        let mut reclaimed = false;
        for (a, f) in m.pages() {
            if let Some(owner) = self.core.mem.staged_taken.remove(&f) {
                if owner != (pid, a) {
                    return bad(format!("staged {f} of {owner:x?} mapped at {pid}:{a:#x}"));
                }
                reclaimed = true;
            }
        }
        for (a, f) in m.pages() {
            self.core.mem.taken -= 1;
            self.install(pid, a, f);
        }
        if reclaimed && m.len() == 1 {
            return Ok(FaultOutcome::Reclaimed);
        }
        Ok(FaultOutcome::Mapped(m.len()))
    }

    /// Runtime behaviour after a fault: below the low watermark, evict (normal urgency)
    /// down to the high one.
    fn balance(&mut self) {
        let wm = self.core.mem.watermarks;
        let free = self.core.mem.free.len();
        if free < wm.low {
            let in_flight = self.core.mem.writebacks.len();
            let want = wm.high.saturating_sub(free + in_flight);
            if want > 0 {
                self.core.run_eviction(VictimRequest::any(want));
            }
        }
    }

    /// Asks the eviction policy for victims directly (as the runtime's watermark thread
    /// would); returns what it saw.
    pub fn evict(&mut self, req: VictimRequest) -> Result<VictimScan, SimError> {
        let s = self.core.run_eviction(req);
        self.contract()?;
        Ok(s)
    }

    /// Completes up to `n` write-backs (oldest first); returns how many.
    pub fn complete_writebacks(&mut self, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let Some(f) = self.core.mem.writebacks.pop_front() else {
                break;
            };
            if let FrameState::Staging(Some((pid, addr))) = self.core.mem.frames[f.index()] {
                match self.core.mem.new_slot() {
                    Some(entry) => {
                        if let Some(p) = self.core.mem.procs.get_mut(&pid) {
                            p.pages.insert(addr, Page::Swapped(entry));
                        }
                    }
                    None => self.core.mem.violations.push("swap slots exhausted".into()),
                }
            }
            self.core.mem.put_free(f);
            done += 1;
        }
        done
    }

    /// Completes up to `n` swap-ins (oldest first); returns how many.
    pub fn complete_swapins(&mut self, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let Some((_, f)) = self.core.mem.swapins.pop_front() else {
                break;
            };
            match self.core.mem.frames[f.index()] {
                FrameState::SwapIn(Some((pid, addr))) => {
                    if let Some(Page::SwapIn { entry, .. }) = self.core.mem.page(pid, addr) {
                        self.core.mem.release_slot(entry);
                    }
                    self.install(pid, addr, f);
                }
                _ => self.core.mem.put_free(f),
            }
            done += 1;
        }
        done
    }

    /// Records an access to a present page (pull bit, and pushed to the eviction policy).
    pub fn touch(&mut self, pid: u32, addr: u64, write: bool) {
        if let Some(f) = self.frame_of(pid, addr) {
            let a = &mut self.core.mem.access[f.index()];
            a.accessed = true;
            a.written |= write;
            self.core.evict.on_access(
                f,
                Access {
                    accessed: true,
                    written: write,
                },
            );
        }
    }

    /// Pins or unpins a present page against eviction.
    pub fn pin(&mut self, pid: u32, addr: u64, pinned: bool) {
        if let Some(f) = self.frame_of(pid, addr) {
            if pinned {
                self.core.mem.pinned.insert(f);
            } else {
                self.core.mem.pinned.remove(&f);
            }
        }
    }

    /// The program hints `[start, start + len)` with `text`.
    pub fn hint(&mut self, pid: u32, start: u64, len: u64, text: &str) -> Result<(), HintError> {
        let hint = Hint::parse(text)?;
        let Some(p) = self.core.mem.procs.get_mut(&pid) else {
            return Ok(());
        };
        p.hints.apply(start, len, &hint);
        let range = start..start.saturating_add(len);
        if let Some(a) = self.allocs.get_mut(&pid) {
            a.hint(
                Origin { pid, tid: pid },
                range.clone(),
                &hint,
                &mut self.core,
            );
        }
        self.core
            .evict
            .on_hint(pid, range, &hint, &mut self.core.mem);
        Ok(())
    }

    /// The program frees `[start, start + len)` (`munmap` / `MADV_DONTNEED`).
    pub fn free(&mut self, pid: u32, start: u64, len: u64) -> Result<(), SimError> {
        let start = page_floor(start);
        let end = start.saturating_add(len);
        let Some(p) = self.core.mem.procs.get_mut(&pid) else {
            return Err(SimError::NoProcess(pid));
        };
        let addrs: Vec<u64> = p.pages.range(start..end).map(|(a, _)| *a).collect();
        p.hints.remove(start, len);
        for a in addrs {
            self.drop_page(pid, a);
        }
        if let Some(alloc) = self.allocs.get_mut(&pid) {
            alloc.free(Origin { pid, tid: pid }, start..end, &mut self.core);
        }
        self.contract()
    }

    fn drop_page(&mut self, pid: u32, addr: u64) {
        let Some(page) = self
            .core
            .mem
            .procs
            .get_mut(&pid)
            .and_then(|p| p.pages.remove(&addr))
        else {
            return;
        };
        let mem = &mut self.core.mem;
        match page {
            Page::Present(f) => {
                self.core.evict.on_free(f);
                mem.pinned.remove(&f);
                mem.put_free(f);
            }
            Page::Staging(f) => mem.frames[f.index()] = FrameState::Staging(None),
            Page::Swapped(e) => mem.release_slot(e),
            Page::SwapIn { frame, entry, .. } => {
                mem.frames[frame.index()] = FrameState::SwapIn(None);
                mem.release_slot(entry);
            }
        }
    }

    /// Process `pid` exits: everything it held is given back.
    pub fn exit(&mut self, pid: u32) -> Result<(), SimError> {
        let Some(p) = self.core.mem.procs.get(&pid) else {
            return Err(SimError::NoProcess(pid));
        };
        let addrs: Vec<u64> = p.pages.keys().copied().collect();
        for a in addrs {
            self.drop_page(pid, a);
        }
        self.core.mem.procs.remove(&pid);
        if let Some(mut alloc) = self.allocs.remove(&pid) {
            alloc.exit(Origin { pid, tid: pid }, &mut self.core);
        }
        self.contract()
    }

    /// Checks the global invariants (see the module docs).
    pub fn check(&self) -> Result<(), SimError> {
        self.contract()?;
        let mem = &self.core.mem;
        let inv = |s: String| Err(SimError::Invariant(s));
        let (mut free, mut mapped, mut staging, mut swapin, mut taken) = (0, 0, 0, 0, 0);
        for (i, st) in mem.frames.iter().enumerate() {
            let f = FrameNo(i as u32);
            match *st {
                FrameState::Free => free += 1,
                FrameState::Taken => taken += 1,
                FrameState::Mapped { pid, addr } => {
                    mapped += 1;
                    if mem.page(pid, addr) != Some(Page::Present(f)) {
                        return inv(format!(
                            "{f} says mapped at {pid}:{addr:#x}, the page disagrees"
                        ));
                    }
                }
                FrameState::Staging(_) => staging += 1,
                FrameState::SwapIn(_) => swapin += 1,
            }
        }
        if taken != 0 || mem.taken != 0 || !mem.staged_taken.is_empty() {
            return inv(format!("{taken} frames still taken"));
        }
        if free + mapped + staging + swapin != mem.frames.len() {
            return inv("frames not conserved".into());
        }
        if free != mem.free.len() {
            return inv(format!(
                "{free} free frames but {} on the free list",
                mem.free.len()
            ));
        }
        let mut on_list = HashSet::new();
        for f in &mem.free {
            if !on_list.insert(*f) || mem.frames[f.index()] != FrameState::Free {
                return inv(format!("{f} on the free list twice or not free"));
            }
        }
        let mut pages_present = 0;
        for (pid, p) in &mem.procs {
            for (addr, pg) in &p.pages {
                if let Page::Present(f) = pg {
                    pages_present += 1;
                    if mem.frames[f.index()]
                        != (FrameState::Mapped {
                            pid: *pid,
                            addr: *addr,
                        })
                    {
                        return inv(format!("page {pid}:{addr:#x} -> {f} not mapped there"));
                    }
                }
            }
        }
        if pages_present != mapped {
            return inv(format!(
                "{pages_present} present pages for {mapped} mapped frames"
            ));
        }
        if self.core.evict.tracked() != mapped {
            return inv(format!(
                "eviction policy tracks {} pages, {mapped} are mapped",
                self.core.evict.tracked()
            ));
        }
        Ok(())
    }

    /// The count of frames in each state: `(free, mapped, staging + swap-in, total)`.
    pub fn frame_census(&self) -> (usize, usize, usize, usize) {
        let mem = &self.core.mem;
        let mut c = (0, 0, 0, mem.frames.len());
        for st in &mem.frames {
            match st {
                FrameState::Free => c.0 += 1,
                FrameState::Mapped { .. } => c.1 += 1,
                FrameState::Staging(_) | FrameState::SwapIn(_) => c.2 += 1,
                FrameState::Taken => {}
            }
        }
        c
    }

    /// The number of present pages of `pid` whose hint denies eviction.
    pub fn denied_present(&self, pid: u32) -> usize {
        self.present_pages(pid)
            .into_iter()
            .filter(|a| self.core.mem.hint(pid, *a).denies_eviction())
            .count()
    }
}
