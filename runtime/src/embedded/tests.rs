//! White-box tests of the embedded runtime on its memory-manager core (crate-private
//! `Runtime::mm`): an eviction staged by a thread of the test's own, and a multi-page MOVE
//! the test builds frame by frame. Real kernel: userfaultfd, io_uring, an O_DIRECT swap
//! file under /var/tmp.

use std::time::Duration;

use crate::embedded::{InstallMode, Runtime};
use crate::mm::{PageState, WorkerMm};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

fn swap_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("usm-embedded-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn build_with(
    frames: usize,
    workers: usize,
    dir: &tempfile::TempDir,
    mode: InstallMode,
) -> Runtime {
    Runtime::builder()
        .workers(workers)
        .pool_frames(frames)
        .install_mode(mode)
        .create_swap_file(dir.path().join("swap0"), 64 << 20)
        .build()
        .unwrap()
}

#[test]
fn pages_faulted_back_during_write_back_come_from_the_swap_cache_move_install() {
    swap_cache_hits_during_write_back(InstallMode::Move);
}

#[test]
fn pages_faulted_back_during_write_back_come_from_the_swap_cache_copy_install() {
    swap_cache_hits_during_write_back(InstallMode::Copy);
}

fn swap_cache_hits_during_write_back(mode: InstallMode) {
    let dir = swap_dir();
    let rt = build_with(256, 1, &dir, mode);
    let frames = rt.pool_frames();
    let mut region = rt.region(64 * PAGE).unwrap();
    for p in 0..64 {
        region.as_mut_slice::<u64>()[p * WORDS + 1] = p as u64 ^ 0x5555;
    }
    // This thread evicts with an engine of its own and does not reap it yet: the victims
    // stay in staging (their O_DIRECT writes queued or in flight) while we touch them.
    let mut io = WorkerMm::new(rt.mm().clone(), 0).unwrap();
    let staged = rt.mm().evict_now(&mut io, 32);
    assert!(staged > 0, "eviction staged nothing");
    let in_staging: Vec<usize> = (0..64)
        .filter(|&p| matches!(region.page_state(p), Some(PageState::Staging { .. })))
        .collect();
    assert_eq!(in_staging.len(), staged);
    for &p in &in_staging {
        assert_eq!(
            region.as_slice::<u64>()[p * WORDS + 1],
            p as u64 ^ 0x5555,
            "page {p}"
        );
    }
    let s = rt.stats().mm;
    eprintln!(
        "swap-cache hits: {} by MOVE, {} by copy (write still pinning the slot)",
        s.swap_cache_moves, s.swap_cache_copies
    );
    assert_eq!(
        (s.swap_cache_moves + s.swap_cache_copies) as usize,
        staged,
        "{s:#?}"
    );
    assert!(s.swap_cache_hit.count > 0);
    // Reap the writes: the slots of pages taken back are freed, copied-from frames too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while io.in_flight() > 0 && std::time::Instant::now() < deadline {
        io.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(io.in_flight(), 0);
    drop(io);
    drop(region);
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(rt.stats().swap_slots_used, 0);
    assert_eq!(rt.check_conservation().unwrap().free, frames);
}

#[test]
fn a_multi_page_move_that_meets_a_present_page_is_classified_page_by_page() {
    let dir = swap_dir();
    let rt = build_with(256, 1, &dir, InstallMode::default());
    let mut region = rt.region(4 * PAGE).unwrap();
    // Page 2 gets content through the normal fault path.
    region.as_mut_slice::<u64>()[2 * WORDS] = 0xFEED;
    let pool = rt.mm().pool().clone();
    let mut arena = pool.local_arena();
    let frames: Vec<_> = (0..4)
        .map(|_| pool.take(&mut arena).unwrap().unwrap())
        .collect();
    // Install a 4-page run over it: the MOVE stops at page 2 with a partial count; the
    // rest is re-issued from there and classified (page 2 present, page 3 moved).
    let report = rt
        .mm()
        .install_frames(std::process::id(), region.addr(), &frames)
        .unwrap();
    let moved: Vec<u64> = report
        .mapped
        .iter()
        .map(|m| (m.0 - region.addr()) / PAGE as u64)
        .collect();
    assert_eq!(moved, vec![0, 1, 3]);
    assert_eq!(report.present.len(), 1);
    assert_eq!(report.present[0].0, region.addr() + 2 * PAGE as u64);
    pool.return_unused(&mut arena, report.present[0].1).unwrap();
    assert_eq!(
        region.as_slice::<u64>()[2 * WORDS],
        0xFEED,
        "present page untouched"
    );
    assert_eq!(
        region.as_slice::<u64>()[3 * WORDS],
        0,
        "page 3 installed zeroed"
    );
    assert!(rt.stats().mm.partial_moves >= 1);
    drop(arena);
    drop(region);
}
