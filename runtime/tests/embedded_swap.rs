//! Embedded runtime under swap pressure, on the real kernel (userfaultfd, io_uring,
//! O_DIRECT swap file on ext4): integrity, nested faults, panics, shutdown, swap-cache
//! hits, partial MOVE, datagrams into regions, poisoned swap entries.

use std::time::Duration;
use usm_sync::Arc;
use usm_sync::atomic::{AtomicU64, Ordering};

use usm_kmod::event::Fault;
use usm_policies::{
    AllocPolicy, Cx, Decision, Mapping, Param, Registry, page_floor, swap_in_if_swapped,
};
use usm_runtime::embedded::{InstallMode, Region, Runtime, SwapInMode};
use usm_runtime::mm::PageState;

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

fn swap_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("usm-embedded-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn build(frames: usize, workers: usize, dir: &tempfile::TempDir) -> Runtime {
    build_with(frames, workers, dir, InstallMode::default())
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

/// A cheap per-page checksum pattern: word i of page p in generation g.
fn word(p: usize, i: usize, g: u64) -> u64 {
    ((p as u64) << 32) ^ (i as u64).wrapping_mul(0x9E37_79B9) ^ g.wrapping_mul(0x1000_0001)
}

#[test]
fn many_uthreads_on_both_workers_keep_every_page_intact_under_heavy_swap_move_install() {
    heavy_swap_keeps_every_page_intact(InstallMode::Move);
}

#[test]
fn many_uthreads_on_both_workers_keep_every_page_intact_under_heavy_swap_copy_install() {
    heavy_swap_keeps_every_page_intact(InstallMode::Copy);
}

fn heavy_swap_keeps_every_page_intact(mode: InstallMode) {
    let dir = swap_dir();
    let rt = build_with(256, 2, &dir, mode);
    let frames = rt.pool_frames();
    let pages = 6 * frames; // working set 6x the pool
    let region = Arc::new(rt.region(pages * PAGE).unwrap());
    let tasks = 16;
    let rounds = 3u64;
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let region = region.clone();
        let errors = errors.clone();
        handles.push(
            rt.spawn(move || {
                let words = region.as_atomic_u64();
                // Task t owns pages p with p % tasks == t.
                for g in 1..=rounds {
                    for p in (t..pages).step_by(tasks) {
                        for i in (0..WORDS).step_by(64) {
                            words[p * WORDS + i].store(word(p, i, g), Ordering::Relaxed);
                        }
                        if p % 3 == 0 {
                            usm_localmanager::yield_now();
                        }
                    }
                    for p in (t..pages).step_by(tasks).rev() {
                        for i in (0..WORDS).step_by(64) {
                            if words[p * WORDS + i].load(Ordering::Relaxed) != word(p, i, g) {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
            .unwrap(),
        );
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "corrupted words");
    let stats = rt.stats();
    let workers_used = stats.sched.iter().filter(|c| c.faults > 0).count();
    assert_eq!(
        workers_used, 2,
        "both workers served faults: {:?}",
        stats.sched
    );
    assert!(stats.mm.evicted as usize > pages, "{:#?}", stats.mm);
    assert!(stats.mm.swap_ins_done > 0);
    assert!(stats.mm.swap_in.count > 0, "swap-in latency recorded");
    assert_eq!(stats.mm.poisoned, 0);
    assert_eq!(
        stats.mm.worker_blocked, 0,
        "Yield mode never blocks a worker"
    );
    let (batches, dropped) = (stats.slot_drop_batches, stats.slots_dropped);
    match mode {
        // Every swap-in and first touch was a COPY whose slot was dropped in batches.
        InstallMode::Copy => assert!(
            dropped > stats.mm.swap_ins_done && batches * 8 < dropped,
            "{batches} drop batches for {dropped} slots, {} swap-ins",
            stats.mm.swap_ins_done
        ),
        InstallMode::Move => assert_eq!(dropped, 0),
    }
    // Memory stays at the pool's size: a page is either in the region or in its frame's
    // slot, never both for long (COPY installs: copied slots dropped in batches, at most
    // one batch pending, and none once quiet). The one documented exception: a page
    // installed by the COPY fallback when MOVE met a pinned slot (`Copied`) is the
    // region's own memory and holds no frame, so each adds one page.
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(rt.stats().slots_pending_drop, 0);
    let rss = mapping_rss(region.addr()) + mapping_rss(rt.pool_mapping().start);
    let copied = (0..pages as u64)
        .filter(|&i| region.page_state(i as usize) == Some(PageState::Copied))
        .count();
    assert!(
        rss <= ((frames + copied) * PAGE) as u64,
        "region + pool RSS {} KiB > pool {} KiB + {copied} page(s) installed by the COPY fallback",
        rss >> 10,
        (frames * PAGE) >> 10
    );
    drop(region);
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(rt.stats().swap_slots_used, 0);
    assert_eq!(rt.stats().slots_pending_drop, 0);
    let census = rt.check_conservation().unwrap();
    assert_eq!(census.free, frames, "{census}");
}

/// `Rss` of the mapping starting at `start`, from `/proc/self/smaps`.
fn mapping_rss(start: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(_)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            inside = lo == start;
            continue;
        }
        if inside && let Some(kb) = line.strip_prefix("Rss:") {
            return kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
        }
    }
    panic!("no mapping at {start:#x}");
}

/// A region of `pages` pages whose first word of page `p` is `mark(p)`, written from a
/// uThread (so every page was faulted in through the pool).
fn marked_region(rt: &Runtime, pages: usize, mark: fn(u64) -> u64) -> Region {
    let mut data = rt.region(pages * PAGE).unwrap();
    rt.block_on(move || {
        for (p, w) in data
            .as_mut_slice::<u64>()
            .iter_mut()
            .step_by(WORDS)
            .enumerate()
        {
            *w = mark(p as u64);
        }
        data
    })
    .unwrap()
}

/// Evicts everything of `region` by touching a second region of twice the pool.
fn push_out(rt: &Runtime, filler: &mut Option<Region>) {
    let frames = rt.pool_frames();
    let mut r = rt.region(2 * frames * PAGE).unwrap();
    let r = rt
        .block_on(move || {
            for w in r.as_mut_slice::<u64>().iter_mut().step_by(WORDS) {
                *w = 1;
            }
            r
        })
        .unwrap();
    *filler = Some(r);
}

#[test]
fn a_second_uthread_faults_while_the_first_is_parked_on_a_swap_in() {
    let dir = swap_dir();
    let rt = build(256, 1, &dir);
    let mut a = rt.region(8 * PAGE).unwrap();
    let a = rt
        .block_on(move || {
            a.as_mut_slice::<u64>()[0] = 42;
            a
        })
        .unwrap();
    let mut filler = None;
    push_out(&rt, &mut filler);
    assert!(matches!(
        a.page_state(0),
        Some(PageState::Swapped(_) | PageState::Staging { .. })
    ));
    let b = Arc::new(rt.region(8 * PAGE).unwrap());
    let a = Arc::new(a);
    let (a2, b2) = (a.clone(), b.clone());
    // Same worker: the first parks in PFQ on the swap-in, the second runs and faults too.
    let first = rt.spawn_on(0, move || a2.as_slice::<u64>()[0]).unwrap();
    let second = rt
        .spawn_on(0, move || {
            let v = b2.as_slice::<u64>()[WORDS * 3];
            v + 7
        })
        .unwrap();
    assert_eq!(first.join().unwrap(), 42);
    assert_eq!(second.join().unwrap(), 7);
    let faults: u64 = rt.stats().sched.iter().map(|c| c.faults).sum();
    assert!(faults >= 2);
    drop(filler);
}

#[test]
fn a_panicking_uthread_that_holds_frames_loses_nothing() {
    let dir = swap_dir();
    let rt = build(256, 2, &dir);
    let frames = rt.pool_frames();
    let region = Arc::new(rt.region(64 * PAGE).unwrap());
    let r2 = region.clone();
    let h = rt
        .spawn(move || {
            let w = r2.as_atomic_u64();
            for p in 0..64 {
                w[p * WORDS].store(p as u64 + 1, Ordering::Relaxed);
            }
            panic!("task dies while its pages are resident");
        })
        .unwrap();
    assert!(h.join().is_err());
    // The runtime keeps serving faults and the pages kept their content.
    let r3 = region.clone();
    let sum = rt
        .block_on(move || {
            let w = r3.as_atomic_u64();
            (0..64)
                .map(|p| w[p * WORDS].load(Ordering::Relaxed))
                .sum::<u64>()
        })
        .unwrap();
    assert_eq!(sum, (1..=64).sum::<u64>());
    drop(region);
    assert!(rt.quiesce(Duration::from_secs(5)));
    assert_eq!(rt.check_conservation().unwrap().free, frames);
}

/// Maps like first-fit but panics on every `n`th call.
struct Flaky {
    calls: u64,
    every: u64,
}

impl AllocPolicy for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        self.calls += 1;
        if let Some(d) = swap_in_if_swapped(fault, cx) {
            return d;
        }
        // Take a frame first, so the panic happens while the policy holds one.
        let f = cx.take_frame();
        if self.calls % self.every == 0 {
            panic!("flaky policy, call {}", self.calls);
        }
        match f {
            Some(f) => Decision::Map(Mapping::one(page_floor(fault.addr), f)),
            None => Decision::Oom,
        }
    }
}

#[test]
fn a_panicking_policy_is_replaced_by_the_default_and_the_access_completes() {
    let dir = swap_dir();
    let mut reg = Registry::with_builtins();
    reg.register_alloc("flaky", Param::None, |_| {
        Ok(Box::new(Flaky { calls: 0, every: 3 }))
    })
    .unwrap();
    let rt = Runtime::builder()
        .workers(2)
        .pool_frames(256)
        .create_swap_file(dir.path().join("swap0"), 16 << 20)
        .build_with_registry(reg)
        .unwrap();
    let frames = rt.pool_frames();
    let mut region = rt.region_with_policy(32 * PAGE, "flaky").unwrap();
    let region = rt
        .block_on(move || {
            let w = region.as_mut_slice::<u64>();
            for p in 0..32 {
                w[p * WORDS] = p as u64 * 11;
            }
            for p in 0..32 {
                assert_eq!(w[p * WORDS], p as u64 * 11);
            }
            region
        })
        .unwrap();
    assert!(rt.stats().mm.policy_panics >= 1);
    drop(region);
    assert!(rt.quiesce(Duration::from_secs(5)));
    let census = rt.check_conservation().unwrap();
    assert_eq!(
        census.free, frames,
        "frames held by the panicking call came back: {census}"
    );
}

#[test]
fn shutdown_waits_for_uthreads_parked_in_pfq() {
    let dir = swap_dir();
    let rt = build(256, 2, &dir);
    let data = marked_region(&rt, 64, |p| p + 100);
    let mut filler = None;
    push_out(&rt, &mut filler);
    let data = Arc::new(data);
    let seen = Arc::new(AtomicU64::new(0));
    for p in 0..64 {
        let (d, seen) = (data.clone(), seen.clone());
        rt.spawn(move || {
            let v = d.as_slice::<u64>()[p * WORDS];
            seen.fetch_add(v, Ordering::Relaxed);
        })
        .unwrap();
    }
    // Shut down at once: many uThreads are parked on swap-ins right now.
    let report = rt.shutdown(Duration::from_secs(10));
    assert!(report.stuck_in_handler.is_empty(), "{report:?}");
    assert_eq!(report.cancelled, 0);
    assert_eq!(seen.load(Ordering::Relaxed), (100..164).sum::<u64>());
    drop(filler);
}

#[test]
fn a_datagram_received_into_a_missing_region_buffer_arrives_intact() {
    let dir = swap_dir();
    let rt = build(256, 1, &dir);
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    rx.connect(tx.local_addr().unwrap()).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg: Vec<u8> = (0..6000u32).map(|i| (i * 7 % 251) as u8).collect();
    // Without the helper the kernel meets missing pages: EFAULT and the datagram is gone.
    let mut raw = rt.region(4 * PAGE).unwrap();
    tx.send(&msg).unwrap();
    let direct = rx.recv(raw.bytes_mut(PAGE..PAGE + 8000));
    assert_eq!(
        direct.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EFAULT))
    );
    // With it: pinned, pre-faulted, intact (the buffer straddles a page boundary).
    let mut region = rt.region(4 * PAGE).unwrap();
    tx.send(&msg).unwrap();
    let n = region.recv_into(&rx, 100..100 + 8000).unwrap();
    assert_eq!(n, msg.len());
    assert_eq!(region.bytes(100..100 + n), &msg[..]);
    // And back out: send_from pre-faults too.
    assert_eq!(region.send_from(&rx, 100..100 + n).unwrap(), n);
    let mut back = vec![0u8; 8000];
    tx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(tx.recv(&mut back).unwrap(), n);
    assert_eq!(&back[..n], &msg[..]);
}

#[test]
fn uthreads_holding_a_uthread_mutex_across_faulting_accesses_all_finish() {
    // The documented rule: hold usm_localmanager::sync::Mutex (parks the uThread), never
    // an OS mutex, across a region access. One worker, many contenders, swap traffic.
    let dir = swap_dir();
    let rt = build(256, 1, &dir);
    let frames = rt.pool_frames();
    let region = Arc::new(rt.region(3 * frames * PAGE).unwrap());
    let lock = Arc::new(usm_localmanager::sync::Mutex::new(0u64));
    let mut hs = Vec::new();
    for t in 0..8 {
        let (region, lock) = (region.clone(), lock.clone());
        hs.push(
            rt.spawn(move || {
                let w = region.as_atomic_u64();
                for k in 0..200 {
                    let mut g = lock.lock();
                    let p = (t * 97 + k * 13) % (3 * frames);
                    // Faulting access while the lock is held: this uThread parks, others
                    // run and block on the lock by parking too.
                    w[p * WORDS].fetch_add(1, Ordering::Relaxed);
                    *g += 1;
                }
            })
            .unwrap(),
        );
    }
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(*lock.lock(), 8 * 200);
}

#[test]
fn an_unreadable_swap_entry_kills_with_sigbus_not_zeros() {
    use std::os::unix::process::ExitStatusExt;
    if let Some(dir) = std::env::var_os("USM_POISON_CHILD") {
        return poisoned_child(std::path::Path::new(&dir));
    }
    // The parent owns the swap directory: the child dies by SIGBUS and could not remove it.
    let dir = swap_dir();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "an_unreadable_swap_entry_kills_with_sigbus_not_zeros",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("USM_POISON_CHILD", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("child: reading a page whose swap slot was truncated away"),
        "{stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("child: READ"),
        "the child read something: {stdout}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "{stdout}\n{stderr}"
    );
}

fn poisoned_child(dir: &std::path::Path) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("usm_runtime=debug,usm_swap=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let path = dir.join("swap0");
    let rt = Runtime::builder()
        .workers(1)
        .pool_frames(256)
        .create_swap_file(&path, 16 << 20)
        .build()
        .unwrap();
    let mut data = rt.region(8 * PAGE).unwrap();
    let data = rt
        .block_on(move || {
            data.as_mut_slice::<u64>()[0] = 0x1234_5678;
            data
        })
        .unwrap();
    let mut filler = None;
    push_out(&rt, &mut filler);
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert!(matches!(data.page_state(0), Some(PageState::Swapped(_))));
    // The swap file loses everything but its header under the runtime.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    println!("child: reading a page whose swap slot was truncated away");
    let data = Arc::new(data);
    let d = data.clone();
    let v = rt.block_on(move || d.as_slice::<u64>()[0]).unwrap();
    println!("child: READ {v:#x}");
}

#[test]
fn a_prefetch_hint_reads_neighbours_back_with_the_faulting_page() {
    let dir = swap_dir();
    let rt = build(256, 1, &dir);
    let data = marked_region(&rt, 32, |p| p * 3 + 1);
    let mut filler = None;
    push_out(&rt, &mut filler);
    assert!(rt.quiesce(Duration::from_secs(10)));
    drop(filler);
    assert!(rt.quiesce(Duration::from_secs(10)));
    data.hint(0..32 * PAGE, "PREFETCH=8").unwrap();
    let before = rt.stats().mm;
    let data = Arc::new(data);
    let d = data.clone();
    assert_eq!(rt.block_on(move || d.as_slice::<u64>()[0]).unwrap(), 1);
    let after = rt.stats().mm;
    assert!(after.prefetches > before.prefetches, "{after:#?}");
    // The prefetched neighbours are in memory (or arriving) with their content.
    let resident = (1..=8)
        .filter(|p| {
            matches!(
                data.page_state(*p),
                Some(PageState::Resident(_) | PageState::SwapIn { .. })
            )
        })
        .count();
    assert!(resident >= 1);
    let d = data.clone();
    let ok = rt
        .block_on(move || (0..32).all(|p| d.as_slice::<u64>()[p * WORDS] == p as u64 * 3 + 1))
        .unwrap();
    assert!(ok);
}

#[test]
fn clean_pages_are_evicted_without_io_and_written_ones_are_written_back_move_install() {
    clean_pages_skip_the_write_back(InstallMode::Move);
}

#[test]
fn clean_pages_are_evicted_without_io_and_written_ones_are_written_back_copy_install() {
    // Copy mode maps swapped-in pages write-protected by the COPY itself.
    clean_pages_skip_the_write_back(InstallMode::Copy);
}

fn clean_pages_skip_the_write_back(mode: InstallMode) {
    let dir = swap_dir();
    let rt = build_with(256, 1, &dir, mode);
    let data = marked_region(&rt, 64, |p| p + 5000);
    let mut filler = None;
    push_out(&rt, &mut filler);
    drop(filler);
    assert!(rt.quiesce(Duration::from_secs(10)));
    // Read every page back (swap-ins, clean), then change the odd ones.
    let data = Arc::new(data);
    let d = data.clone();
    rt.block_on(move || {
        let w = d.as_atomic_u64();
        for p in 0..64 {
            assert_eq!(w[p * WORDS].load(Ordering::Relaxed), p as u64 + 5000);
        }
        for p in (1..64).step_by(2) {
            w[p * WORDS].store(p as u64 + 9000, Ordering::Relaxed);
        }
    })
    .unwrap();
    let before = rt.stats().mm;
    let mut filler = None;
    push_out(&rt, &mut filler);
    drop(filler);
    assert!(rt.quiesce(Duration::from_secs(10)));
    let after = rt.stats().mm;
    assert!(
        rt.clean_eviction(),
        "clean eviction is off: the kernel offers no UFFD_FEATURE_WP_ASYNC (6.7+; this \
         machine's kernel has it)"
    );
    assert!(after.clean_evictions > before.clean_evictions, "{after:#?}");
    // Every page comes back with its latest content: clean ones from their old slot,
    // written ones from their new write-back.
    let d = data.clone();
    let bad = rt
        .block_on(move || {
            let w = d.as_atomic_u64();
            (0..64)
                .filter(|&p| {
                    let want = if p % 2 == 1 {
                        p as u64 + 9000
                    } else {
                        p as u64 + 5000
                    };
                    w[p * WORDS].load(Ordering::Relaxed) != want
                })
                .count()
        })
        .unwrap();
    assert_eq!(bad, 0);
    drop(data);
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(rt.stats().swap_slots_used, 0);
}

/// A hot set read every round while a cold stream (larger than the pool) flows past it:
/// returns (hot accesses that found the page out of memory, final statistics).
fn hot_set_misses(access_sampling: bool) -> (u64, usm_runtime::mm::StatsSnapshot) {
    let dir = swap_dir();
    let rt = Runtime::builder()
        .workers(1)
        .pool_frames(256)
        .evict_policy("clock")
        .access_sampling(access_sampling)
        .create_swap_file(dir.path().join("swap0"), 64 << 20)
        .build()
        .unwrap();
    let (hot_pages, cold_pages, cold_per_round, rounds) = (48usize, 1024usize, 64usize, 32usize);
    let hot = Arc::new(rt.region(hot_pages * PAGE).unwrap());
    let cold = Arc::new(rt.region(cold_pages * PAGE).unwrap());
    let (h, c) = (hot.clone(), cold.clone());
    let misses = rt
        .block_on(move || {
            let (hw, cw) = (h.as_atomic_u64(), c.as_atomic_u64());
            for p in 0..hot_pages {
                hw[p * WORDS].store(p as u64 + 77, Ordering::Relaxed);
            }
            let mut misses = 0u64;
            let mut next_cold = 0;
            for _ in 0..rounds {
                for _ in 0..cold_per_round {
                    cw[next_cold * WORDS].store(next_cold as u64, Ordering::Relaxed);
                    next_cold = (next_cold + 1) % cold_pages;
                }
                // Reads only: a written-bit scan would not see these accesses.
                for p in 0..hot_pages {
                    if matches!(
                        h.page_state(p),
                        Some(PageState::Swapped(_) | PageState::Staging { .. })
                    ) {
                        misses += 1;
                    }
                    assert_eq!(hw[p * WORDS].load(Ordering::Relaxed), p as u64 + 77);
                }
            }
            misses
        })
        .unwrap();
    let stats = rt.stats().mm;
    drop((hot, cold));
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(rt.stats().swap_slots_used, 0);
    (misses, stats)
}

#[test]
fn access_sampling_keeps_a_read_hot_set_in_memory_better_than_fifo() {
    let (fifo, fifo_stats) = hot_set_misses(false);
    let (sampled, stats) = hot_set_misses(true);
    eprintln!(
        "hot-set misses: clock without access information (FIFO) {fifo}, with re-fault sampling {sampled}; samples {} refaults {} sampled evictions {}",
        stats.samples_taken, stats.sample_refaults, stats.sampled_evictions
    );
    assert_eq!(fifo_stats.samples_taken, 0);
    assert!(
        fifo > 100,
        "the FIFO baseline must lose the hot set: {fifo}"
    );
    assert!(
        stats.samples_taken > 0 && stats.sample_refaults > 0,
        "{stats:#?}"
    );
    assert!(stats.sample_refault.count > 0, "re-fault latency recorded");
    assert!(
        sampled * 3 < fifo,
        "sampling must cut hot-set misses to under a third of FIFO's: {sampled} vs {fifo}"
    );
    assert_eq!(stats.poisoned, 0);
}

#[test]
fn synchronous_swap_in_mode_blocks_the_worker_and_keeps_data_intact() {
    let dir = swap_dir();
    let rt = Runtime::builder()
        .workers(2)
        .pool_frames(256)
        .swap_in_mode(SwapInMode::Sync)
        .round_budget(16)
        .create_swap_file(dir.path().join("swap0"), 64 << 20)
        .build()
        .unwrap();
    let pages = 4 * 256;
    let region = Arc::new(rt.region(pages * PAGE).unwrap());
    let mut handles = Vec::new();
    for t in 0..4 {
        let region = region.clone();
        handles.push(
            rt.spawn(move || {
                let w = region.as_atomic_u64();
                for p in (t..pages).step_by(4) {
                    w[p * WORDS].store(word(p, 0, 1), Ordering::Relaxed);
                    usm_localmanager::yield_now();
                }
                (t..pages)
                    .step_by(4)
                    .filter(|&p| w[p * WORDS].load(Ordering::Relaxed) != word(p, 0, 1))
                    .count()
            })
            .unwrap(),
        );
    }
    let bad: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(bad, 0, "corrupted pages");
    let st = rt.stats().mm;
    assert!(st.swap_ins_done > 0, "{st:#?}");
    assert!(
        st.worker_blocked > 0,
        "every swap-in a uThread waited for blocked its worker: {st:#?}"
    );
    assert!(st.worker_blocked <= st.swap_ins + st.memory_waits + st.faults);
    drop(region);
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(rt.stats().swap_slots_used, 0);
}
