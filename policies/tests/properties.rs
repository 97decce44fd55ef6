//! Property tests: random sequences of faults, accesses, pins, hints, frees, evictions,
//! I/O completions and exits, for every combination of built-in policies, on the
//! simulated machine (a checked frame table, not the real pool).
//!
//! After every step the simulator's checks must hold:
//! - no frame is handed out twice (every mapped frame backs exactly one page, every mapping
//!   is made of frames taken in that very call);
//! - frames are conserved: free + mapped + staging + swap-in = total, none kept by a policy;
//! - the eviction policy tracks exactly the mapped pages, never returns a pinned page, never
//!   a `DENY` page with normal urgency, and with hard urgency only when no other candidate
//!   in scope remains;
//! - a quota policy's process never holds more resident pages than its quota.

#![deny(unsafe_code)]

use proptest::prelude::*;
use usm_policies::sim::{FaultOutcome, SimMachine};
use usm_policies::{Registry, VictimRequest, Watermarks};

const P: u64 = 4096;
const PAGES: u64 = 48;
const PIDS: [u32; 3] = [11, 12, 13];

/// Regions start one page off a 64K boundary so windows get clipped.
fn region_start(pid: u32) -> u64 {
    0x100_0000 * pid as u64 + P
}

#[derive(Debug, Clone)]
enum Op {
    Fault {
        who: usize,
        page: u64,
        write: bool,
    },
    Touch {
        who: usize,
        page: u64,
    },
    Pin {
        who: usize,
        page: u64,
        on: bool,
    },
    Hint {
        who: usize,
        page: u64,
        len: u64,
        text: &'static str,
    },
    Free {
        who: usize,
        page: u64,
        len: u64,
    },
    Evict {
        want: usize,
        hard: bool,
        scoped: Option<usize>,
    },
    Writebacks(usize),
    SwapIns(usize),
    Exit {
        who: usize,
    },
}

#[allow(clippy::disallowed_types)] // `prop_oneof!` expands to `std::sync::Arc`
fn op() -> impl Strategy<Value = Op> {
    let who = 0..PIDS.len();
    let page = 0..PAGES;
    prop_oneof![
        8 => (who.clone(), page.clone(), any::<bool>())
            .prop_map(|(who, page, write)| Op::Fault { who, page, write }),
        2 => (who.clone(), page.clone()).prop_map(|(who, page)| Op::Touch { who, page }),
        1 => (who.clone(), page.clone(), any::<bool>())
            .prop_map(|(who, page, on)| Op::Pin { who, page, on }),
        1 => (who.clone(), page.clone(), 1u64..16, prop::sample::select(vec![
                "EVICTION=DENY", "PRIORITY=LOW", "PRIORITY=HIGH", "EVICTION=ALLOW",
                "PREFETCH=4", "HUGE=16K", "HUGE=4K", "PRIORITY=LOW; EVICTION=DENY",
            ])).prop_map(|(who, page, len, text)| Op::Hint { who, page, len, text }),
        1 => (who.clone(), page.clone(), 1u64..12)
            .prop_map(|(who, page, len)| Op::Free { who, page, len }),
        1 => (1usize..12, any::<bool>(), proptest::option::of(who.clone()))
            .prop_map(|(want, hard, scoped)| Op::Evict { want, hard, scoped }),
        2 => (1usize..8).prop_map(Op::Writebacks),
        2 => (1usize..8).prop_map(Op::SwapIns),
        1 => who.prop_map(|who| Op::Exit { who }),
    ]
}

struct World {
    m: SimMachine,
    reg: Registry,
    allocs: [&'static str; 3],
    quota: Option<usize>,
}

impl World {
    fn new(frames: usize, allocs: [&'static str; 3], evict: &str, oom: &str) -> Self {
        let reg = Registry::with_builtins();
        let m = SimMachine::new(
            frames,
            Watermarks { low: 3, high: 6 },
            reg.build_evict(evict).unwrap(),
            reg.build_oom(oom).unwrap(),
        );
        let mut w = World {
            m,
            reg,
            allocs,
            quota: None,
        };
        for i in 0..PIDS.len() {
            w.spawn(i);
        }
        w
    }

    fn spawn(&mut self, who: usize) {
        let pid = PIDS[who];
        let start = region_start(pid);
        let alloc = self.reg.build_alloc(self.allocs[who]).unwrap();
        self.m
            .add_process(pid, "app", start..start + PAGES * P, alloc);
    }

    fn addr(who: usize, page: u64) -> u64 {
        region_start(PIDS[who]) + page * P
    }

    fn alive(&self, who: usize) -> bool {
        self.m.pids().contains(&PIDS[who])
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Fault { who, page, write } => {
                if !self.alive(who) {
                    self.spawn(who);
                }
                let out = self.m.fault(PIDS[who], Self::addr(who, page), write);
                prop_assert!(out.is_ok(), "fault: {:?}", out);
                if let Ok(FaultOutcome::Mapped(n)) = out {
                    prop_assert!(n >= 1);
                }
            }
            Op::Touch { who, page } => self.m.touch(PIDS[who], Self::addr(who, page), false),
            Op::Pin { who, page, on } => self.m.pin(PIDS[who], Self::addr(who, page), on),
            Op::Hint {
                who,
                page,
                len,
                text,
            } => self
                .m
                .hint(PIDS[who], Self::addr(who, page), len * P, text)
                .unwrap(),
            Op::Free { who, page, len } => {
                if self.alive(who) {
                    let r = self.m.free(PIDS[who], Self::addr(who, page), len * P);
                    prop_assert!(r.is_ok(), "free: {:?}", r);
                }
            }
            Op::Evict { want, hard, scoped } => {
                let req = match scoped {
                    Some(who) => VictimRequest::of_process(PIDS[who], want),
                    None => VictimRequest::any(want),
                };
                let req = if hard { req.hard() } else { req };
                let r = self.m.evict(req);
                prop_assert!(r.is_ok(), "evict: {:?}", r);
            }
            Op::Writebacks(n) => {
                self.m.complete_writebacks(n);
            }
            Op::SwapIns(n) => {
                self.m.complete_swapins(n);
            }
            Op::Exit { who } => {
                if self.alive(who) {
                    prop_assert!(self.m.exit(PIDS[who]).is_ok());
                }
            }
        }
        let c = self.m.check();
        prop_assert!(c.is_ok(), "after {:?}: {:?}", op, c);
        if let Some(q) = self.quota {
            // Process 0 runs the quota policy.
            let resident = self.m.counters(PIDS[0]).resident;
            prop_assert!(resident <= q, "quota {} exceeded: {}", q, resident);
        }
        Ok(())
    }
}

fn run(world: &mut World, ops: &[Op]) -> Result<(), TestCaseError> {
    for op in ops {
        world.step(op)?;
    }
    // Drain all I/O: everything still conserved, nothing left in flight.
    world.m.complete_swapins(usize::MAX);
    world.m.complete_writebacks(usize::MAX);
    prop_assert!(world.m.check().is_ok());
    let (free, mapped, in_flight, total) = world.m.frame_census();
    prop_assert_eq!(in_flight, 0);
    prop_assert_eq!(free + mapped, total);
    Ok(())
}

const ALLOCS: [&str; 5] = ["first-fit", "fhp:16K", "fhp:64K", "policyOne", "fhp:8K"];
const EVICTS: [&str; 5] = ["fifo", "clock", "hints", "two-list", "two-list:100"];
const OOMS: [&str; 3] = ["fail", "evict-harder:4", "kill-largest"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any mix of allocation, eviction and OOM policies keeps the machine consistent.
    #[test]
    fn any_policy_mix_keeps_frames_consistent(
        a in prop::array::uniform3(0..ALLOCS.len()),
        e in 0..EVICTS.len(),
        o in 0..OOMS.len(),
        frames in 8usize..64,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let allocs = [ALLOCS[a[0]], ALLOCS[a[1]], ALLOCS[a[2]]];
        let mut w = World::new(frames, allocs, EVICTS[e], OOMS[o]);
        run(&mut w, &ops)?;
    }

    /// A quota process never holds more than its quota, whatever the others do.
    #[test]
    fn quota_is_never_exceeded(
        quota in 1usize..12,
        e in 0..EVICTS.len(),
        o in 0..OOMS.len(),
        frames in 8usize..64,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let spec: &'static str = Box::leak(format!("quota:{quota}").into_boxed_str());
        let mut w = World::new(frames, [spec, "fhp:16K", "first-fit"], EVICTS[e], OOMS[o]);
        w.quota = Some(quota);
        run(&mut w, &ops)?;
    }

    /// Under memory pressure with many DENY hints, eviction never takes a DENY page while
    /// another victim exists (the simulator checks each batch), and watermark eviction never
    /// takes one at all.
    #[test]
    fn deny_pages_are_last_resort(
        e in 0..EVICTS.len(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let mut w = World::new(12, ["first-fit"; 3], EVICTS[e], "evict-harder:2");
        for (who, pid) in PIDS.iter().enumerate() {
            w.m.hint(*pid, World::addr(who, 0), 24 * P, "EVICTION=DENY").unwrap();
        }
        run(&mut w, &ops)?;
    }
}
