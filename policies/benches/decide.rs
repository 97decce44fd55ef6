//! Cost of one policy decision, on a lean in-memory context (a `Vec` free list; no kernel,
//! none of the simulator's checks), against a baseline measured in the same run: the
//! cheapest possible "allocator", one free-list pop and push.
//!
//! `cargo bench -p usm-policies --bench decide` (add `-- --quick` for a short run).
//! What it shows: the policy layer's share of the fault path (first-fit should be a few
//! ns over the baseline, with no allocation), the per-window cost of `fhp`, and the O(1)
//! victim selection of `clock`/`hints` on 64 Ki tracked pages.

#![deny(unsafe_code)]

use std::hint::black_box;
use std::ops::Range;

use criterion::{Criterion, criterion_group, criterion_main};
use usm_policies::{
    Access, AllocPolicy, Cx, Decision, EvictCx, EvictPolicy, Fault, FrameNo, Hint, HintMap,
    MappedPage, Origin, PageMask, ProcessCounters, Registry, SwapEntry, Ticket, VictimRequest,
    Watermarks,
};

const P: u64 = 4096;
const FRAMES: u32 = 1 << 16;

/// A context with a free list and nothing else: every page is vacant, nothing is swapped.
struct LeanCx {
    free: Vec<FrameNo>,
    hints: HintMap,
    region: Range<u64>,
}

impl LeanCx {
    fn new() -> Self {
        LeanCx {
            free: (0..FRAMES).map(FrameNo).collect(),
            hints: HintMap::new(),
            region: 0..1 << 40,
        }
    }
}

impl EvictCx for LeanCx {
    fn access(&mut self, _frame: FrameNo) -> Access {
        Access::default()
    }
    fn is_pinned(&self, _frame: FrameNo) -> bool {
        false
    }
    fn hint(&self, _pid: u32, addr: u64) -> Hint {
        self.hints.hint_at(addr)
    }
}

impl Cx for LeanCx {
    fn take_frame(&mut self) -> Option<FrameNo> {
        self.free.pop()
    }
    fn take_frames(&mut self, n: usize, out: &mut Vec<FrameNo>) -> bool {
        if self.free.len() < n {
            return false;
        }
        out.extend(self.free.drain(self.free.len() - n..));
        true
    }
    fn give_frame(&mut self, frame: FrameNo) {
        self.free.push(frame);
    }
    fn free_frames(&self) -> usize {
        self.free.len()
    }
    fn watermarks(&self) -> Watermarks {
        Watermarks { low: 64, high: 128 }
    }
    fn region(&self, _pid: u32, _addr: u64) -> Option<Range<u64>> {
        Some(self.region.clone())
    }
    fn vacant(&self, _pid: u32, _start: u64, npages: usize, out: &mut PageMask) {
        out.clear();
        out.set_first(npages);
    }
    fn take_staged(&mut self, _pid: u32, _addr: u64) -> Option<FrameNo> {
        None
    }
    fn swap_entry(&self, _pid: u32, _addr: u64) -> Option<SwapEntry> {
        None
    }
    fn swap_in(&mut self, _pid: u32, _addr: u64, _e: SwapEntry, _f: FrameNo) -> Ticket {
        Ticket(0)
    }
    fn counters(&self, _pid: u32) -> ProcessCounters {
        ProcessCounters::default()
    }
    fn evict(&mut self, _req: VictimRequest) -> usize {
        0
    }
}

fn fault(addr: u64) -> Fault {
    Fault {
        addr,
        write: true,
        wp: false,
        minor: false,
        len_hint: P,
        origin: Origin { pid: 1, tid: 1 },
    }
}

/// Runs one decision and returns its frames to the free list.
fn decide_and_undo(policy: &mut dyn AllocPolicy, cx: &mut LeanCx, addr: u64) {
    match black_box(policy.alloc(&fault(addr), cx)) {
        Decision::Map(m) => cx.free.extend_from_slice(m.frames()),
        other => panic!("unexpected {other:?}"),
    }
}

fn alloc_benches(c: &mut Criterion) {
    let reg = Registry::with_builtins();
    let mut g = c.benchmark_group("alloc");
    let mut cx = LeanCx::new();
    g.bench_function("baseline_freelist_pop_push", |b| {
        b.iter(|| {
            let f = black_box(cx.free.pop());
            if let Some(f) = f {
                cx.free.push(f);
            }
        })
    });
    for spec in ["first-fit", "quota:4096", "fhp:64K", "fhp:2M"] {
        let mut p = reg.build_alloc(spec).unwrap();
        let mut cx = LeanCx::new();
        let mut addr = 0u64;
        g.bench_function(spec, |b| {
            b.iter(|| {
                addr = addr.wrapping_add(0x20_0000) & ((1 << 39) - 1);
                decide_and_undo(&mut *p, &mut cx, addr)
            })
        });
    }
    g.finish();
}

fn evict_benches(c: &mut Criterion) {
    let reg = Registry::with_builtins();
    let mut g = c.benchmark_group("evict_64Ki_tracked");
    for spec in ["fifo", "clock", "hints"] {
        let mut p: Box<dyn EvictPolicy> = reg.build_evict(spec).unwrap();
        let mut cx = LeanCx::new();
        // 1000 hinted ranges so `hints` pays for real lookups.
        for i in 0..1000u64 {
            let text = if i % 2 == 0 {
                "PRIORITY=LOW"
            } else {
                "PRIORITY=HIGH"
            };
            cx.hints
                .apply(i * 64 * P, 16 * P, &Hint::parse(text).unwrap());
        }
        for f in 0..FRAMES {
            let page = MappedPage {
                frame: FrameNo(f),
                pid: 1,
                addr: f as u64 * P,
            };
            p.on_map(page, &mut cx);
        }
        let mut out = Vec::with_capacity(8);
        g.bench_function(format!("{spec}_victim_and_remap"), |b| {
            b.iter(|| {
                out.clear();
                p.victims(VictimRequest::any(1), &mut cx, &mut out);
                for v in out.drain(..) {
                    p.on_map(v, &mut cx);
                }
            })
        });
    }
    g.finish();
}

fn hint_benches(c: &mut Criterion) {
    let mut map = HintMap::new();
    let deny = Hint::parse("EVICTION=DENY").unwrap();
    for i in 0..10_000u64 {
        map.apply(i * 8 * P, 4 * P, &deny);
    }
    let mut addr = 0u64;
    c.bench_function("hintmap_lookup_10k_ranges", |b| {
        b.iter(|| {
            addr = (addr + 7 * P) % (80_000 * P);
            black_box(map.hint_at(addr))
        })
    });
    c.bench_function("hint_parse", |b| {
        b.iter(|| {
            Hint::parse(black_box(
                "PRIORITY=HIGH; EVICTION=DENY; PREFETCH=8; HUGE=64K",
            ))
        })
    });
}

criterion_group!(benches, alloc_benches, evict_benches, hint_benches);
criterion_main!(benches);
