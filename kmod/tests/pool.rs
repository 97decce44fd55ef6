//! The frame pool on the real kernel: concurrent take/give from both cores conserves
//! frames, handed-out frames are really zero, frames move between pool and region with
//! `UFFDIO_MOVE` under the lock-state rules, holes are refilled; fragmented frames merge
//! back into naturally aligned runs, a run moves as one flexible huge page, the pool
//! populates its reserve chunk by chunk with the census adding up at every step.

#![deny(unsafe_code)]

mod common;

use common::{PAGE, require_root, sys};
use std::collections::HashSet;
use usm_kmod::FrameNo;
use usm_kmod::pool::arena::SharedArena;
use usm_kmod::pool::{
    Census, FrameOwner, FramePool, FrameState, LockMode, MAX_ORDER, POPULATE_CHUNK, PoolConfig,
};
use usm_kmod::{Features, MoveMode, RegisterMode, Resolved};
use usm_sync::Arc;

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if set.set(cpu % cpus).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

#[test]
fn concurrent_take_and_give_from_both_cores_conserves_frames() {
    let pool = FramePool::new(
        PoolConfig {
            frames: 1024,
            lock: LockMode::Unlocked,
        },
        None,
    )
    .unwrap();
    let zeroer = pool.spawn_zeroer(32);
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let pool = Arc::clone(&pool);
            let mut local = pool.local_arena();
            std::thread::spawn(move || {
                pin_to(w);
                let mut held = Vec::new();
                let mut taken = 0usize;
                for round in 0..2000u64 {
                    if let Some(f) = pool.take(&mut local).unwrap() {
                        taken += 1;
                        // A handed-out frame is zero, whoever used it before.
                        let off = f.index() * 4096;
                        assert!(pool.memory().is_zero(off, 4096).unwrap(), "{f} not zeroed");
                        assert_eq!(pool.desc(f).unwrap().state(), FrameState::Taken);
                        held.push(f);
                    }
                    if held.len() > 40 || round % 3 == 0 {
                        if let Some(f) = held.pop() {
                            if round % 2 == 0 {
                                // Written, so it goes through the zeroing queue.
                                let off = f.index() * 4096;
                                pool.memory()
                                    .store_u64(off + 8 * (round as usize % 512), round | 1)
                                    .unwrap();
                                pool.release(f).unwrap();
                            } else {
                                pool.return_unused(&mut local, f).unwrap();
                            }
                        }
                    }
                    if round % 64 == 0 {
                        pool.zero_some(8).unwrap();
                    }
                }
                for f in held {
                    pool.release(f).unwrap();
                }
                taken
            })
        })
        .collect();
    let taken: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(taken > 2000, "the workers did take frames ({taken})");
    drop(zeroer);
    while pool.zero_some(256).unwrap() > 0 {}
    let c = pool.check_conservation().unwrap();
    assert_eq!(c.free, 1024, "{c}");
    assert_eq!(
        c.free_shared, 1024,
        "dropped lArenas spilled everything: {c}"
    );
    // Every frame is in the sArena exactly once, and zero.
    let mut frames = pool.shared_arena().snapshot();
    frames.sort_unstable();
    frames.dedup();
    assert_eq!(frames.len(), 1024);
    assert!(pool.memory().is_zero(0, 1024 * 4096).unwrap());
}

#[test]
fn conservation_check_catches_a_frame_outside_every_arena() {
    let pool = FramePool::new(
        PoolConfig {
            frames: 8,
            lock: LockMode::Unlocked,
        },
        None,
    )
    .unwrap();
    let mut local = pool.local_arena();
    let f = pool.take(&mut local).unwrap().unwrap();
    let c = pool.check_conservation().unwrap();
    assert_eq!((c.taken, c.free), (1, 7));
    // A Free frame missing from every arena is a conservation failure.
    pool.return_unused(&mut local, f).unwrap();
    let g = local.pop().unwrap(); // bypasses the pool: state stays Free, arena lost it
    let err = pool.check_conservation().unwrap_err();
    assert!(matches!(err, usm_kmod::Error::Conservation(_)), "{err:?}");
    local.push(g);
    pool.check_conservation().unwrap();
    // A wrong transition is a typed error.
    let err = pool.release(g).unwrap_err();
    assert!(
        matches!(
            err,
            usm_kmod::Error::FrameState {
                actual: FrameState::Free,
                ..
            }
        ),
        "{err:?}"
    );
}

fn pool_and_region(lock: LockMode, region_locked: bool) -> Option<(Arc<FramePool>, u64, u64)> {
    let uffd = Arc::new(common::uffd(Features::MOVE));
    let pool = FramePool::new(PoolConfig { frames: 16, lock }, Some(Arc::clone(&uffd))).unwrap();
    let len = 4 * PAGE;
    let region = sys::mmap_anon(len as usize);
    assert_eq!(sys::madvise(region, len as usize, libc::MADV_DONTFORK), 0);
    assert_eq!(sys::madvise(region, len as usize, libc::MADV_NOHUGEPAGE), 0);
    if region_locked {
        assert_eq!(sys::mlock_onfault(region, len as usize), 0);
    }
    uffd.register(region, len, RegisterMode::MISSING).unwrap();
    Some((pool, region, len))
}

fn install_stage_release(pool: &Arc<FramePool>, region: u64) {
    let owner = FrameOwner {
        pid: std::process::id(),
        region: 1,
    };
    let mut local = pool.local_arena();
    let f = pool.take(&mut local).unwrap().unwrap();
    let r = sys::install(pool, f, region, owner, MoveMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    let d = pool.desc(f).unwrap();
    assert_eq!(
        (d.state(), d.vaddr(), d.owner()),
        (FrameState::Mapped, region, owner)
    );
    d.set_policy(77);
    assert_eq!(pool.desc(f).unwrap().policy(), 77);
    assert!(sys::page_is(region, 0), "the installed frame is zero");
    sys::fill_page(region, 0x1234);
    // Evict: the page goes back to its slot, the region page becomes a hole again.
    let r = sys::stage(pool, f, MoveMode::DONTWAKE).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert_eq!(pool.desc(f).unwrap().state(), FrameState::Staging);
    let slot = f.index() * 4096;
    assert_eq!(
        pool.memory().load_u64(slot).unwrap(),
        0x1234,
        "the staged page carries the data"
    );
    // Swap-cache hit: move it back.
    let r = sys::unstage(pool, f, MoveMode::empty()).unwrap();
    assert!(r.is_done());
    assert!(sys::page_is(region, 0x1234));
    // Region dropped: reclaim moves the page back and queues the frame for zeroing.
    let r = sys::reclaim(pool, f).unwrap();
    assert!(r.is_done());
    assert_eq!(pool.desc(f).unwrap().state(), FrameState::Zeroing);
    assert_eq!(pool.zero_some(16).unwrap(), 1);
    assert!(
        pool.memory().is_zero(slot, 4096).unwrap(),
        "the dirty slot was cleared"
    );
    pool.check_conservation().unwrap();
}

#[test]
fn move_between_pool_and_region_both_unlocked() {
    if !require_root("move_between_pool_and_region_both_unlocked") {
        return;
    }
    let (pool, region, len) = pool_and_region(LockMode::Unlocked, false).unwrap();
    install_stage_release(&pool, region);
    sys::munmap(region, len as usize);
}

#[test]
fn move_between_pool_and_region_both_mlock_onfault() {
    if !require_root("move_between_pool_and_region_both_mlock_onfault") {
        return;
    }
    let (pool, region, len) = pool_and_region(LockMode::OnFault, true).unwrap();
    install_stage_release(&pool, region);
    sys::munmap(region, len as usize);
}

#[test]
fn move_between_locked_pool_and_unlocked_region_is_einval() {
    if !require_root("move_between_locked_pool_and_unlocked_region_is_einval") {
        return;
    }
    for (pool_lock, region_locked) in [(LockMode::OnFault, false), (LockMode::Unlocked, true)] {
        let (pool, region, len) = pool_and_region(pool_lock, region_locked).unwrap();
        let mut local = pool.local_arena();
        let f = pool.take(&mut local).unwrap().unwrap();
        let err =
            sys::install(&pool, f, region, FrameOwner::default(), MoveMode::empty()).unwrap_err();
        assert!(err.is_invalid(), "lock-state mismatch is EINVAL: {err:?}");
        assert!(err.to_string().contains("UFFDIO_MOVE"), "{err}");
        assert_eq!(
            pool.desc(f).unwrap().state(),
            FrameState::Taken,
            "a failed install keeps the frame"
        );
        pool.return_unused(&mut local, f).unwrap();
        sys::munmap(region, len as usize);
    }
}

#[test]
fn a_frame_whose_page_was_dropped_is_refilled_with_a_zeroed_page() {
    if !require_root("a_frame_whose_page_was_dropped_is_refilled_with_a_zeroed_page") {
        return;
    }
    let (pool, region, len) = pool_and_region(LockMode::Unlocked, false).unwrap();
    let mut local = pool.local_arena();
    let mut frames = Vec::new();
    for i in 0..4 {
        let f = pool.take(&mut local).unwrap().unwrap();
        let r = sys::install(
            &pool,
            f,
            region + i * PAGE,
            FrameOwner::default(),
            MoveMode::empty(),
        )
        .unwrap();
        assert!(r.is_done());
        sys::fill_page(region + i * PAGE, 0xAA + i);
        frames.push(f);
    }
    // The region is dropped by the program (munmap): the pages are gone, the slots are holes.
    assert_eq!(sys::munmap(region, len as usize), 0);
    for &f in &frames {
        pool.release(f).unwrap();
    }
    assert_eq!(pool.zeroing_len(), 4);
    assert_eq!(pool.zero_some(64).unwrap(), 4);
    for &f in &frames {
        assert_eq!(pool.desc(f).unwrap().state(), FrameState::Free);
        assert!(
            pool.memory().is_zero(f.index() * 4096, 4096).unwrap(),
            "{f} refilled and zero"
        );
    }
    // They can be moved out again (a refilled slot holds a real page again).
    let region2 = sys::mmap_anon(len as usize);
    assert_eq!(sys::madvise(region2, len as usize, libc::MADV_DONTFORK), 0);
    pool.userfaultfd()
        .unwrap()
        .register(region2, len, RegisterMode::MISSING)
        .unwrap();
    drop(local);
    let mut local = pool.local_arena();
    for i in 0..4 {
        let f = pool.take(&mut local).unwrap().unwrap();
        let r = sys::install(
            &pool,
            f,
            region2 + i * PAGE,
            FrameOwner::default(),
            MoveMode::empty(),
        )
        .unwrap();
        assert!(r.is_done(), "{f}: {r:?}");
        assert!(sys::page_is(region2 + i * PAGE, 0));
    }
    pool.check_conservation().unwrap();
    sys::munmap(region2, len as usize);
}

#[test]
fn a_run_of_consecutive_frames_installs_with_partial_progress_reported() {
    if !require_root("a_run_of_consecutive_frames_installs_with_partial_progress_reported") {
        return;
    }
    let uffd = Arc::new(common::uffd(Features::MOVE));
    let pool = FramePool::new(
        PoolConfig {
            frames: 64,
            lock: LockMode::Unlocked,
        },
        Some(Arc::clone(&uffd)),
    )
    .unwrap();
    let n = 8u64;
    let region = sys::mmap_anon_dontfork((2 * n * PAGE) as usize);
    uffd.register(region, 2 * n * PAGE, RegisterMode::MISSING)
        .unwrap();
    let mut local = pool.local_arena();
    let frames: Vec<_> = (0..n)
        .map(|_| pool.take(&mut local).unwrap().unwrap())
        .collect();
    assert!(
        frames.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "a fresh pool hands out consecutive frames: {frames:?}"
    );
    let owner = FrameOwner { pid: 1, region: 2 };
    let r = sys::install_many(&pool, &frames, region, owner, MoveMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(n * PAGE));
    for (i, &f) in frames.iter().enumerate() {
        let d = pool.desc(f).unwrap();
        assert_eq!(
            (d.state(), d.vaddr()),
            (FrameState::Mapped, region + i as u64 * PAGE)
        );
    }
    // Second window: page 5 already present -> 5 pages installed, the rest stay Taken.
    let second = region + n * PAGE;
    assert!(
        sys::zeropage(
            &uffd,
            second + 5 * PAGE,
            PAGE,
            usm_kmod::ZeropageMode::empty()
        )
        .unwrap()
        .is_done()
    );
    let more: Vec<_> = (0..n)
        .map(|_| pool.take(&mut local).unwrap().unwrap())
        .collect();
    let r = sys::install_many(&pool, &more, second, owner, MoveMode::empty()).unwrap();
    assert_eq!(r, Resolved::Partial(5 * PAGE));
    assert!(
        more[..5]
            .iter()
            .all(|&f| pool.desc(f).unwrap().state() == FrameState::Mapped)
    );
    assert!(
        more[5..]
            .iter()
            .all(|&f| pool.desc(f).unwrap().state() == FrameState::Taken)
    );
    // Nothing moves when the first page is present: the page's own state is reported.
    let r = sys::install_many(
        &pool,
        &more[5..6],
        second + 5 * PAGE,
        owner,
        MoveMode::empty(),
    )
    .unwrap();
    assert_eq!(r, Resolved::AlreadyMapped);
    for &f in &more[5..] {
        pool.return_unused(&mut local, f).unwrap();
    }
    let c = pool.check_conservation().unwrap();
    assert_eq!(c.mapped, 13, "{c}");
    sys::munmap(region, (2 * n * PAGE) as usize);
}

#[test]
fn dropping_a_pool_on_an_unmap_tracking_userfaultfd_does_not_wait_for_an_event() {
    if !require_root("dropping_a_pool_on_an_unmap_tracking_userfaultfd_does_not_wait_for_an_event")
    {
        return;
    }
    let uffd = Arc::new(common::uffd(
        Features::MOVE | Features::EVENT_UNMAP | Features::EVENT_REMOVE,
    ));
    let pool = FramePool::new(
        PoolConfig {
            frames: 8,
            lock: LockMode::Unlocked,
        },
        Some(Arc::clone(&uffd)),
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dropper = std::thread::spawn(move || {
        drop(pool);
        tx.send(()).unwrap();
    });
    let dropped = rx.recv_timeout(std::time::Duration::from_secs(2)).is_ok();
    // Unblock a stuck munmap before failing, so the test ends either way.
    let mut events = Vec::new();
    uffd.read_events(&mut events).unwrap();
    dropper.join().unwrap();
    assert!(
        dropped,
        "dropping the pool waited for an UNMAP event to be read"
    );
    assert!(events.is_empty(), "no event for the pool: {events:?}");
}

#[test]
fn the_shared_arena_merges_fragments_back_into_aligned_runs() {
    let n = 2048u32;
    let shared = SharedArena::with_frames((0..n).rev().map(FrameNo));
    let top = MAX_ORDER as usize;
    assert_eq!(
        shared.blocks_by_order()[top],
        4,
        "2048 frames = four 2 MiB blocks"
    );
    // Batches come out consecutive and ascending when popped from the end.
    let mut all = Vec::new();
    assert_eq!(shared.pop_batch(&mut all, 64), 64);
    let popped: Vec<u32> = all.iter().rev().map(|f| f.0).collect();
    assert!(popped.windows(2).all(|w| w[1] == w[0] + 1), "{popped:?}");
    while shared.pop_batch(&mut all, 64) > 0 {}
    assert_eq!(all.len(), 2048);
    assert!(shared.is_empty());
    // Give back every odd frame: single frames everywhere, no run of two.
    let (odd, mut even): (Vec<FrameNo>, Vec<FrameNo>) = all.iter().partition(|f| f.0 % 2 == 1);
    for &f in &odd {
        shared.push(f);
    }
    assert_eq!(shared.len(), 1024);
    assert_eq!(shared.blocks_by_order()[0], 1024);
    assert_eq!(shared.pop_run(1), None, "no two free frames are buddies");
    // The even ones come back: every pair merges, all the way up to 2 MiB blocks.
    let k = even.len();
    shared.push_batch(&mut even, k);
    let counts = shared.blocks_by_order();
    assert_eq!(counts[top], 4, "{counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 4, "{counts:?}");
    // Runs of every order come out naturally aligned and disjoint; the rest adds up.
    let mut seen = HashSet::new();
    for order in [4u32, 2, 9, 0, 4, 3, 9] {
        let f = shared.pop_run(order).unwrap();
        assert_eq!(f.0 % (1 << order), 0, "order-{order} run at {f} is aligned");
        for i in 0..1u32 << order {
            assert!(seen.insert(f.0 + i), "frame {} handed out twice", f.0 + i);
        }
    }
    assert_eq!(shared.len() + seen.len(), 2048);
    assert_eq!(shared.pop_run(MAX_ORDER + 1), None);
    let mut rest = shared.snapshot();
    rest.sort_unstable();
    assert!(rest.iter().all(|f| !seen.contains(&f.0)));
    assert_eq!(rest.len() + seen.len(), 2048);
}

fn census_ok(pool: &FramePool) -> Census {
    let c = pool.check_conservation().unwrap();
    assert_eq!(c.total, pool.len());
    assert_eq!(
        c.free + c.taken + c.mapped + c.staging + c.zeroing,
        c.total,
        "{c}"
    );
    c
}

#[test]
fn runs_survive_fragmentation_and_the_reserve_is_populated_on_demand() {
    if !require_root("runs_survive_fragmentation_and_the_reserve_is_populated_on_demand") {
        return;
    }
    let uffd = Arc::new(common::uffd(Features::MOVE));
    let chunk = POPULATE_CHUNK;
    let pool = FramePool::new(
        PoolConfig {
            frames: 2 * chunk,
            lock: LockMode::Unlocked,
        },
        Some(Arc::clone(&uffd)),
    )
    .unwrap();
    // Only the first chunk is populated; the second is the sArena's reserve, free.
    let c = census_ok(&pool);
    assert_eq!((c.free, c.unpopulated), (2 * chunk, chunk), "{c}");
    // Single frames: the whole first chunk, no population needed.
    let mut local = pool.local_arena();
    let singles: Vec<FrameNo> = (0..chunk)
        .map(|_| pool.take(&mut local).unwrap().unwrap())
        .collect();
    assert!(singles.iter().all(|f| f.index() < chunk));
    assert_eq!(pool.unpopulated(), chunk);
    assert_eq!(census_ok(&pool).taken, chunk);
    // Fragment it: every other frame written and released, zeroed back.
    for f in singles.iter().step_by(2) {
        pool.memory()
            .store_u64(f.index() * 4096 + 64, 0xF00D)
            .unwrap();
        pool.release(*f).unwrap();
    }
    while pool.zero_some(256).unwrap() > 0 {}
    let c = census_ok(&pool);
    assert_eq!(
        (c.free, c.taken, c.zeroing),
        (chunk + chunk / 2, chunk / 2, 0),
        "{c}"
    );
    assert_eq!(
        pool.shared_arena().pop_run(1),
        None,
        "chunk 0 is all single frames"
    );
    // A 64 KiB run: none in the populated part, so the pool populates the next chunk.
    let run = pool.take_run(&mut local, 4).unwrap().unwrap();
    assert_eq!(run.0 % 16, 0, "aligned");
    assert!(
        run.index() >= chunk,
        "from the newly populated chunk: {run}"
    );
    assert_eq!(pool.unpopulated(), 0);
    for i in 0..16 {
        let f = FrameNo(run.0 + i);
        assert_eq!(pool.desc(f).unwrap().state(), FrameState::Taken);
        assert!(pool.memory().is_zero(f.index() * 4096, 4096).unwrap());
    }
    // The rest of chunk 1 holds three 2 MiB runs; a fourth does not exist.
    let big: Vec<FrameNo> = (0..3)
        .map(|_| pool.take_run(&mut local, MAX_ORDER).unwrap().unwrap())
        .collect();
    assert_eq!(pool.take_run(&mut local, MAX_ORDER).unwrap(), None);
    assert_eq!(census_ok(&pool).taken, chunk / 2 + 16 + 3 * 512);
    // A 2 MiB run moves into a region with one UFFDIO_MOVE (consecutive slots).
    let len = 512 * PAGE;
    let region = sys::mmap_anon_dontfork(len as usize);
    assert_eq!(sys::madvise(region, len as usize, libc::MADV_NOHUGEPAGE), 0);
    uffd.register(region, len, RegisterMode::MISSING).unwrap();
    let frames: Vec<FrameNo> = (0..512).map(|i| FrameNo(big[0].0 + i)).collect();
    let owner = FrameOwner { pid: 1, region: 9 };
    let r = sys::move_pages(
        &uffd,
        region,
        pool.slot_addr(big[0]),
        len,
        MoveMode::empty(),
    )
    .unwrap();
    assert_eq!(r, Resolved::Done(len), "one ioctl moved the whole run");
    // Move them back to their slots (as a staging MOVE would) and install the run through
    // the pool, which records the frames as Mapped.
    let back = sys::move_pages(
        &uffd,
        pool.slot_addr(big[0]),
        region,
        len,
        MoveMode::empty(),
    )
    .unwrap();
    assert!(back.is_done());
    let r = sys::install_many(&pool, &frames, region, owner, MoveMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(len));
    assert!((0..512).all(|i| sys::page_is(region + i * PAGE, 0)));
    sys::fill_page(region + 7 * PAGE, 0xBEEF);
    assert_eq!(census_ok(&pool).mapped, 512);
    // Everything comes back: the region is unmapped (holes), the rest released.
    assert_eq!(sys::munmap(region, len as usize), 0);
    for &f in &frames {
        pool.release(f).unwrap();
    }
    for f in singles.iter().skip(1).step_by(2) {
        pool.release(*f).unwrap();
    }
    for i in 0..16 {
        pool.return_unused(&mut local, FrameNo(run.0 + i)).unwrap();
    }
    for r in &big[1..] {
        for i in 0..512 {
            pool.release(FrameNo(r.0 + i)).unwrap();
        }
    }
    while pool.zero_some(512).unwrap() > 0 {}
    drop(local);
    let c = census_ok(&pool);
    assert_eq!((c.free, c.free_shared), (2 * chunk, 2 * chunk), "{c}");
    // Runs came back whole: the pool is eight 2 MiB blocks again, all zero.
    let counts = pool.shared_arena().blocks_by_order();
    assert_eq!(counts[MAX_ORDER as usize], 2 * chunk / 512, "{counts:?}");
    assert!(pool.memory().is_zero(0, 2 * chunk * 4096).unwrap());
}

/// Resident pages of the pool mapping: the slots that still hold a page.
/// Zeroes everything in the zeroing queue, then checks conservation.
fn settled_census(pool: &FramePool) -> Census {
    while pool.zeroing_len() > 0 {
        pool.zero_some(64).unwrap();
    }
    census_ok(pool)
}

fn resident_slots(pool: &FramePool) -> usize {
    sys::resident(pool.base(), pool.len())
        .into_iter()
        .filter(|&r| r)
        .count()
}

#[test]
fn copy_installs_drop_their_slots_in_batches_and_a_stage_flushes_them_first() {
    if !require_root("copy_installs_drop_their_slots_in_batches_and_a_stage_flushes_them_first") {
        return;
    }
    use usm_kmod::pool::{CopyFrom, DROP_BATCH};
    let uffd = Arc::new(common::uffd(Features::MOVE));
    let frames = 4 * DROP_BATCH;
    let pool = FramePool::new(
        PoolConfig {
            frames,
            lock: LockMode::Unlocked,
        },
        Some(Arc::clone(&uffd)),
    )
    .unwrap();
    let pages = 2 * DROP_BATCH;
    let len = pages as u64 * PAGE;
    let region = sys::mmap_anon(len as usize);
    assert_eq!(sys::madvise(region, len as usize, libc::MADV_NOHUGEPAGE), 0);
    uffd.register(region, len, RegisterMode::MISSING).unwrap();
    let owner = FrameOwner {
        pid: std::process::id(),
        region: 1,
    };
    let mut local = pool.local_arena();
    let resident_before = resident_slots(&pool);
    assert_eq!(resident_before, frames, "the pool starts populated");
    // A "swapped-in" page: the slot holds data; COPY installs it, the slot stays (pending).
    let f = pool.take(&mut local).unwrap().unwrap();
    pool.memory().store_u64(f.index() * 4096, 0xC0FFEE).unwrap();
    let r = sys::install_many_copy(&pool, &[f], region, owner, CopyFrom::Slots).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert_eq!(pool.desc(f).unwrap().state(), FrameState::Mapped);
    assert_eq!(
        sys::load(region),
        0xC0FFEE,
        "the copy carries the slot's data"
    );
    assert_eq!(pool.pending_drops(), 1);
    // Write after the install: the region page is the program's own now.
    sys::store(region, 0xBEEF);
    // Eviction of a frame whose slot is still pending: the stage drops the pending batch
    // first (MOVE needs a hole), and the staged page is the written one, not the copy.
    let r = sys::stage(&pool, f, MoveMode::DONTWAKE).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert_eq!(
        pool.pending_drops(),
        0,
        "the batch was dropped before the MOVE"
    );
    assert_eq!(pool.drop_stats(), (1, 1));
    assert_eq!(pool.memory().load_u64(f.index() * 4096).unwrap(), 0xBEEF);
    // Swap-cache hit by COPY: back in the region, the slot pending again.
    assert!(sys::unstage_copy(&pool, f).unwrap().is_done());
    assert_eq!(sys::load(region), 0xBEEF);
    assert_eq!(pool.pending_drops(), 1);
    // First-touch installs of the rest from the zero source, in one call: a full batch
    // is dropped by the install itself, the remainder stays pending.
    let mut zeroed = Vec::new();
    for _ in 1..pages {
        zeroed.push(pool.take(&mut local).unwrap().unwrap());
    }
    let r = sys::install_many_copy(&pool, &zeroed, region + PAGE, owner, CopyFrom::Zero).unwrap();
    assert_eq!(r, Resolved::Done((pages as u64 - 1) * PAGE));
    for i in 1..pages as u64 {
        assert!(sys::page_is(region + i * PAGE, 0), "page {i} is zero");
    }
    assert_eq!(pool.pending_drops(), pages % DROP_BATCH);
    assert_eq!(
        pool.drop_stats().1 as usize,
        1 + DROP_BATCH * (pages / DROP_BATCH)
    );
    // A present page stops a COPY like a MOVE: nothing installed, frame still Taken.
    let g = pool.take(&mut local).unwrap().unwrap();
    let r = sys::install_many_copy(&pool, &[g], region, owner, CopyFrom::Slots).unwrap();
    assert_eq!(r, Resolved::AlreadyMapped);
    assert_eq!(pool.desc(g).unwrap().state(), FrameState::Taken);
    pool.return_unused(&mut local, g).unwrap();
    // Flushing leaves every Mapped frame's slot a hole: the pool's memory is its size.
    pool.flush_drops().unwrap();
    assert_eq!(pool.pending_drops(), 0);
    assert_eq!(
        resident_slots(&pool),
        frames - pages,
        "only the free frames' slots hold pages"
    );
    // The region goes away: a frame released while its slot is pending is cleared by the
    // zeroer (no drop), the others (holes) are refilled; everything comes back zeroed.
    let h = pool.take(&mut local).unwrap().unwrap();
    let extra = sys::mmap_anon(PAGE as usize);
    uffd.register(extra, PAGE, RegisterMode::MISSING).unwrap();
    assert!(
        sys::install_many_copy(&pool, &[h], extra, owner, CopyFrom::Zero)
            .unwrap()
            .is_done()
    );
    assert_eq!(pool.pending_drops(), 1);
    uffd.unregister(extra, PAGE).unwrap();
    assert_eq!(sys::munmap(extra, PAGE as usize), 0);
    pool.release(h).unwrap();
    assert_eq!(pool.pending_drops(), 0, "released off the batch");
    for i in 0..pages as u64 {
        let fr = if i == 0 { f } else { zeroed[i as usize - 1] };
        assert!(sys::reclaim(&pool, fr).unwrap().is_done(), "page {i}");
    }
    drop(local);
    let c = settled_census(&pool);
    assert_eq!(c.free, frames, "{c}");
    assert_eq!(resident_slots(&pool), frames, "every slot refilled");
    for i in 0..frames {
        assert!(pool.memory().is_zero(i * 4096, 4096).unwrap(), "slot {i}");
    }
    uffd.unregister(region, len).unwrap();
    sys::munmap(region, len as usize);
}

#[test]
fn a_lazy_pool_populates_nothing_and_fills_a_slot_only_when_asked() {
    if !require_root("a_lazy_pool_populates_nothing_and_fills_a_slot_only_when_asked") {
        return;
    }
    use usm_kmod::pool::CopyFrom;
    let uffd = Arc::new(common::uffd(Features::MOVE));
    let frames = 64;
    let pool = FramePool::new_lazy(
        PoolConfig {
            frames,
            lock: LockMode::Unlocked,
        },
        Arc::clone(&uffd),
    )
    .unwrap();
    assert!(pool.is_lazy());
    assert_eq!(resident_slots(&pool), 0, "nothing populated");
    assert_eq!(census_ok(&pool).free, frames);
    let len = 8 * PAGE;
    let region = sys::mmap_anon(len as usize);
    assert_eq!(sys::madvise(region, len as usize, libc::MADV_NOHUGEPAGE), 0);
    uffd.register(region, len, RegisterMode::MISSING).unwrap();
    let owner = FrameOwner::default();
    let mut local = pool.local_arena();
    // First touch: COPY from the zero source; the slots stay holes, nothing to drop.
    let run: Vec<FrameNo> = (0..4)
        .map(|_| pool.take(&mut local).unwrap().unwrap())
        .collect();
    let r = sys::install_many_copy(&pool, &run, region, owner, CopyFrom::Zero).unwrap();
    assert_eq!(r, Resolved::Done(4 * PAGE));
    assert_eq!(pool.pending_drops(), 0);
    assert_eq!(resident_slots(&pool), 0);
    sys::fill_page(region, 0x77);
    // A "swap-in": the slot is filled on demand, then COPY-installed (slot pending).
    let f = pool.take(&mut local).unwrap().unwrap();
    pool.ensure_slot(f).unwrap();
    assert!(pool.memory().is_zero(f.index() * 4096, 4096).unwrap());
    pool.memory().store_u64(f.index() * 4096, 0x5157).unwrap();
    let r = sys::install_many_copy(&pool, &[f], region + 4 * PAGE, owner, CopyFrom::Slots);
    assert!(r.unwrap().is_done());
    assert_eq!(sys::load(region + 4 * PAGE), 0x5157);
    assert_eq!(pool.pending_drops(), 1);
    // A MOVE install out of a hole slot is refilled first (Move mode on a lazy pool).
    let g = pool.take(&mut local).unwrap().unwrap();
    assert!(
        sys::install(&pool, g, region + 5 * PAGE, owner, MoveMode::empty())
            .unwrap()
            .is_done()
    );
    assert!(sys::page_is(region + 5 * PAGE, 0));
    // Eviction into the (hole) slot and back.
    assert!(
        sys::stage(&pool, run[0], MoveMode::DONTWAKE)
            .unwrap()
            .is_done()
    );
    assert_eq!(pool.memory().load_u64(run[0].index() * 4096).unwrap(), 0x77);
    assert!(sys::unstage_copy(&pool, run[0]).unwrap().is_done());
    assert!(sys::page_is(region, 0x77));
    // Everything back: staged/dirty slots are cleared, holes stay holes.
    for &fr in run.iter().chain([f, g].iter()) {
        assert!(sys::reclaim(&pool, fr).unwrap().is_done());
    }
    drop(local);
    let c = settled_census(&pool);
    assert_eq!(pool.pending_drops(), 0);
    assert_eq!(c.free, frames, "{c}");
    // Every slot that holds a page is zero; a frame taken again works either way.
    for (i, resident) in sys::resident(pool.base(), frames).into_iter().enumerate() {
        if resident {
            assert!(pool.memory().is_zero(i * 4096, 4096).unwrap(), "slot {i}");
        }
    }
    uffd.unregister(region, len).unwrap();
    sys::munmap(region, len as usize);
}

#[test]
fn copy_installs_are_refused_on_a_remove_tracking_userfaultfd() {
    if !require_root("copy_installs_are_refused_on_a_remove_tracking_userfaultfd") {
        return;
    }
    use usm_kmod::pool::CopyFrom;
    // Dropping a copied slot (MADV_DONTNEED) would send a REMOVE event and wait for it.
    let uffd = Arc::new(common::uffd(Features::MOVE | Features::EVENT_REMOVE));
    let pool = FramePool::new(
        PoolConfig {
            frames: 8,
            lock: LockMode::Unlocked,
        },
        Some(Arc::clone(&uffd)),
    )
    .unwrap();
    let region = sys::mmap_anon(PAGE as usize);
    uffd.register(region, PAGE, RegisterMode::MISSING).unwrap();
    let mut local = pool.local_arena();
    let f = pool.take(&mut local).unwrap().unwrap();
    let err = sys::install_many_copy(&pool, &[f], region, FrameOwner::default(), CopyFrom::Zero)
        .unwrap_err();
    assert!(err.to_string().contains("EVENT_REMOVE"), "{err}");
    assert_eq!(pool.desc(f).unwrap().state(), FrameState::Taken);
    assert_eq!(pool.pending_drops(), 0);
    pool.return_unused(&mut local, f).unwrap();
    uffd.unregister(region, PAGE).unwrap();
    sys::munmap(region, PAGE as usize);
}
