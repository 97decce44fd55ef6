//! Benchmark `kmod_resolve`: userfaultfd resolve operations (COPY, MOVE, ZEROPAGE) at
//! 4 KiB, 64 KiB and 2 MiB per call, next to the kernel's own ways of populating
//! anonymous memory — the first-touch fault and `MADV_POPULATE_WRITE` — measured in the
//! same run on the same machine.
//!
//! Sides: `kernel_first_touch` (a write fault per page), `kernel_populate_write`
//! (`MADV_POPULATE_WRITE` per chunk), `copy` (`UFFDIO_COPY` from a populated buffer),
//! `zeropage` (`UFFDIO_ZEROPAGE`: maps the shared zero page, no allocation — a later
//! write faults again), `move` (`UFFDIO_MOVE` from already-populated pool-like pages: the
//! fault-path cost when the pool was refilled off the critical path) and
//! `move_with_refill` (the same plus populating the source chunk first: the end-to-end
//! cost including the refill).
//!
//! Method: every side populates the same amount of memory (`--mib`, default 32 MiB) in
//! chunks of the given size, timing only the population loop (mapping, registration and
//! the MOVE source's own population are set up untimed). Every mapping is
//! `MADV_NOHUGEPAGE` so all sides work in 4 KiB pages. Host backing is pre-warmed once
//! (touch + free twice the working set) so no side pays the hypervisor's first touch.
//! One warm-up run per side, then `--runs` (default 5) measured runs with the sides
//! interleaved (so load changes on a shared machine hit every side alike); the median is reported as
//! pages/s and as a ratio to the kernel's first-touch fault at the same chunk size
//! (`<op>_<size>_vs_kernel` > 1 means faster than the kernel).
//!
//! ```text
//! cargo bench -p usm-bench --bench kmod_resolve -- [--runs N] [--mib M] [--json PATH]
//! ```
//! (`cargo bench` runs the binary in `bench/`: a relative `--json` path is relative to it.)
//! Needs a userfaultfd with MOVE (Linux 6.8, root or /dev/userfaultfd access); without it
//! the resolve sides are skipped with the reason printed.

#![deny(unsafe_code)]

use std::time::{Duration, Instant};
use usm_kmod::sys::mem::{Advice, Mapping, Protection};
use usm_kmod::{Features, OpenFlags, RawUserfaultfd, RegisterMode, Userfaultfd};

const PAGE: usize = 4096;

/// The resolve calls (each writes a mapping the benchmark owns): the only `unsafe`.
#[allow(unsafe_code)] // the benchmark's resolve calls: its only unsafe code
mod sys {
    use usm_kmod::{CopyMode, MoveMode, Resolved, Userfaultfd, ZeropageMode};

    fn check(r: usm_kmod::Result<Resolved>, len: u64) {
        match r {
            Ok(Resolved::Done(n)) if n == len => {}
            other => panic!("resolve did not complete: {other:?}"),
        }
    }

    /// COPY `len` bytes from `src` to the missing range at `dst`.
    pub(crate) fn copy(uffd: &Userfaultfd, dst: u64, src: u64, len: u64) {
        // SAFETY: `dst` is a missing range of a mapping the benchmark registered and owns;
        // `src` is its own populated source buffer, not written concurrently.
        check(unsafe { uffd.copy(dst, src, len, CopyMode::empty()) }, len);
    }

    /// ZEROPAGE the missing range at `dst`.
    pub(crate) fn zeropage(uffd: &Userfaultfd, dst: u64, len: u64) {
        // SAFETY: `dst` is a missing range of a mapping the benchmark registered and owns.
        check(
            unsafe { uffd.zeropage(dst, len, ZeropageMode::empty()) },
            len,
        );
    }

    /// MOVE the pages of `src` to the missing range at `dst`.
    pub(crate) fn move_pages(uffd: &Userfaultfd, dst: u64, src: u64, len: u64) {
        // SAFETY: both ranges belong to the benchmark; the source pages are given up.
        check(
            unsafe { uffd.move_pages(dst, src, len, MoveMode::empty()) },
            len,
        );
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    FirstTouch,
    PopulateWrite,
    Copy,
    Zeropage,
    Move,
    MoveWithRefill,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::FirstTouch => "kernel_first_touch",
            Side::PopulateWrite => "kernel_populate_write",
            Side::Copy => "copy",
            Side::Zeropage => "zeropage",
            Side::Move => "move",
            Side::MoveWithRefill => "move_with_refill",
        }
    }
}

struct Args {
    runs: usize,
    mib: usize,
    json: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        runs: 5,
        mib: 32,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                a.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.runs)
                    .max(1)
            }
            "--mib" => {
                a.mib = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.mib)
                    .max(2)
            }
            "--json" => a.json = it.next(),
            "--help" | "-h" => {
                println!("kmod_resolve [--runs N] [--mib M] [--json PATH]");
                std::process::exit(0);
            }
            _ => {} // `cargo bench` passes --bench and filters; ignore them
        }
    }
    a
}

fn nohuge(len: usize) -> Mapping {
    let m = Mapping::anonymous_aligned(len, 2 << 20, Protection::ReadWrite).expect("mmap");
    m.advise(0, len, Advice::NoHugePage)
        .expect("MADV_NOHUGEPAGE");
    m
}

/// Populates `total` bytes in chunks of `chunk` one way; returns the timed part.
fn run_once(
    side: Side,
    uffd: Option<&Userfaultfd>,
    total: usize,
    chunk: usize,
    src: &Mapping,
) -> Duration {
    let dst = nohuge(total);
    let base = dst.addr();
    let move_src = match side {
        Side::Move => {
            let m = nohuge(total);
            m.advise(0, total, Advice::PopulateWrite)
                .expect("populate MOVE source");
            Some(m)
        }
        Side::MoveWithRefill => Some(nohuge(total)),
        _ => None,
    };
    let resolves = matches!(
        side,
        Side::Copy | Side::Zeropage | Side::Move | Side::MoveWithRefill
    );
    if resolves {
        let u = uffd.expect("userfaultfd for a resolve side");
        u.register(base, total as u64, RegisterMode::MISSING)
            .expect("register");
    }
    let t0 = Instant::now();
    for off in (0..total).step_by(chunk) {
        let (dst_at, len) = (base + off as u64, chunk as u64);
        match side {
            Side::FirstTouch => dst.touch_pages(off, chunk, 1).expect("touch"),
            Side::PopulateWrite => dst
                .advise(off, chunk, Advice::PopulateWrite)
                .expect("populate"),
            Side::Copy => sys::copy(
                uffd.unwrap_or_else(|| unreachable!()),
                dst_at,
                src.addr(),
                len,
            ),
            Side::Zeropage => sys::zeropage(uffd.unwrap_or_else(|| unreachable!()), dst_at, len),
            Side::Move | Side::MoveWithRefill => {
                if side == Side::MoveWithRefill {
                    // The pool's cost of getting a zeroed page into the slot first.
                    let m = move_src.as_ref().unwrap_or_else(|| unreachable!());
                    m.advise(off, chunk, Advice::PopulateWrite)
                        .expect("refill source");
                }
                let s = move_src.as_ref().map_or(0, |m| m.addr()) + off as u64;
                sys::move_pages(uffd.unwrap_or_else(|| unreachable!()), dst_at, s, len)
            }
        }
    }
    let elapsed = t0.elapsed();
    if matches!(side, Side::FirstTouch | Side::Copy) {
        assert!(
            dst.load_u64(total - PAGE).expect("read back") != 0,
            "{side:?} populated"
        );
    }
    if let Some(u) = uffd.filter(|_| resolves) {
        u.unregister(base, total as u64).expect("unregister");
    }
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn size_label(chunk: usize) -> String {
    if chunk >= 1 << 20 {
        format!("{}MiB", chunk >> 20)
    } else {
        format!("{}KiB", chunk >> 10)
    }
}

fn main() {
    let args = args();
    let total = args.mib << 20;
    let pages = total / PAGE;
    let uffd = RawUserfaultfd::open(OpenFlags::default())
        .and_then(|r| r.negotiate(Features::empty(), Features::MOVE));
    let uffd = match uffd {
        Ok(u) => Some(u),
        Err(e) => {
            println!("resolve sides skipped: {e}");
            None
        }
    };
    // Pre-warm host backing: touch and free twice the working set.
    {
        let warm = nohuge(2 * total);
        warm.advise(0, 2 * total, Advice::PopulateWrite)
            .expect("pre-warm");
    }
    let sizes = [PAGE, 64 << 10, 2 << 20];
    let mut results = Vec::new();
    let mut ratios = serde_json::Map::new();
    println!(
        "kmod_resolve: {} MiB per run ({} pages), 1 warm-up + {} runs, median; ratio = pages/s / kernel first-touch pages/s",
        args.mib, pages, args.runs
    );
    println!(
        "{:<10} {:<22} {:>12} {:>14} {:>10}",
        "chunk", "side", "median ms", "pages/s", "vs kernel"
    );
    for &chunk in &sizes {
        let src = nohuge(chunk);
        src.advise(0, chunk, Advice::PopulateWrite)
            .expect("populate copy source");
        src.touch_pages(0, chunk, 0xabcd).expect("fill copy source");
        let sides: Vec<Side> = [
            Side::FirstTouch,
            Side::PopulateWrite,
            Side::Copy,
            Side::Zeropage,
            Side::Move,
            Side::MoveWithRefill,
        ]
        .into_iter()
        .filter(|s| uffd.is_some() || matches!(s, Side::FirstTouch | Side::PopulateWrite))
        .collect();
        // Warm-up, then the sides interleaved run by run, so a load change on the
        // machine hits every side alike.
        for &side in &sides {
            let _ = run_once(side, uffd.as_ref(), total, chunk, &src);
        }
        let mut per_side: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
        for _ in 0..args.runs {
            for (i, &side) in sides.iter().enumerate() {
                per_side[i].push(run_once(side, uffd.as_ref(), total, chunk, &src));
            }
        }
        let mut kernel_pps = 0.0;
        for (&side, runs) in sides.iter().zip(per_side) {
            let med = median(runs.clone());
            let pps = pages as f64 / med.as_secs_f64();
            if side == Side::FirstTouch {
                kernel_pps = pps;
            }
            let ratio = pps / kernel_pps;
            println!(
                "{:<10} {:<22} {:>12.3} {:>14.0} {:>10.2}",
                size_label(chunk),
                side.name(),
                med.as_secs_f64() * 1e3,
                pps,
                ratio
            );
            let key = format!("{}_{}_vs_kernel", side.name(), size_label(chunk));
            ratios.insert(key, serde_json::json!(ratio));
            results.push(serde_json::json!({
                "side": side.name(),
                "chunk_bytes": chunk,
                "pages": pages,
                "median_ns": med.as_nanos() as u64,
                "runs_ns": runs.iter().map(|d| d.as_nanos() as u64).collect::<Vec<_>>(),
                "pages_per_s": pps,
                "pages_per_s_vs_kernel": ratio,
            }));
        }
    }
    if let Some(path) = args.json {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let doc = serde_json::json!({
            "benchmark": "kmod_resolve",
            "kernel": kernel.trim(),
            "mib_per_run": args.mib,
            "runs": args.runs,
            "baseline": "kernel_first_touch (same chunk size, same run)",
            "results": results,
            "ratios": ratios,
        });
        if let Some(dir) = std::path::Path::new(&path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).expect("create the JSON directory");
        }
        std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json"))
            .expect("write json");
        println!("wrote {path}");
    }
}
