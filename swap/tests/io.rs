//! The io_uring engine on real files: data integrity at several depths and on two threads,
//! completion modes, the eventfd, staging buffers, back-pressure, and the error paths
//! (short read from a truncated file, write on a read-only descriptor).

#![deny(unsafe_code)]

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use usm_sync::{Arc, Mutex};

use common::{check_page, disk_tempdir, fill_page, pipeline};
use usm_swap::{
    CompletionMode, DeviceId, DeviceOptions, Engine, EngineConfig, IoBuf, IoOp, PAGE_SIZE, PageBuf,
    SwapDevice, SwapEntry, SwapError, SwapSpace, create_swap_file,
};

fn device(dir: &Path, name: &str, id: u8, bytes: u64) -> Arc<SwapDevice> {
    let p = dir.join(name);
    create_swap_file(&p, bytes).unwrap();
    Arc::new(SwapDevice::open(DeviceId(id), &p).unwrap())
}

fn engine(devs: &[Arc<SwapDevice>], depth: u32, mode: Option<CompletionMode>) -> Engine {
    Engine::new(
        &EngineConfig {
            depth,
            mode,
            ..EngineConfig::default()
        },
        devs,
    )
    .unwrap()
}

#[test]
fn thousands_of_pages_round_trip_at_several_depths() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 64 << 20);
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    for (round, (depth, pages)) in [(1u32, 1000usize), (8, 3000), (32, 4000), (128, 4000)]
        .into_iter()
        .enumerate()
    {
        let mut eng = engine(std::slice::from_ref(&dev), depth, None);
        let mut entries = Vec::new();
        while entries.len() < pages {
            let run = space.alloc_run(16).unwrap();
            entries.extend(run.entries());
        }
        for e in entries.drain(pages..) {
            space.free(e).unwrap();
        }
        let seed = 1000 + round as u64;
        let writes: Vec<_> = entries.iter().map(|&e| (IoOp::Write, e)).collect();
        assert_eq!(pipeline(&mut eng, &writes, seed, depth), pages);
        // Read back in a different order than written.
        let mut reads: Vec<_> = entries.iter().rev().map(|&e| (IoOp::Read, e)).collect();
        reads.rotate_left(pages / 3);
        assert_eq!(pipeline(&mut eng, &reads, seed, depth), pages);
        let s = eng.stats();
        assert_eq!(s.reads, pages as u64);
        assert_eq!(s.writes, pages as u64);
        assert_eq!(s.read_bytes, (pages * PAGE_SIZE) as u64);
        assert!(s.max_in_flight <= depth && s.max_in_flight >= 1);
        assert_eq!(s.read_latency.len(), pages as u64);
        let json: serde_json::Value = serde_json::to_value(eng.stats()).unwrap();
        assert_eq!(json["reads"], pages as u64);
        assert!(json["read_latency"]["p50_ns"].as_u64().unwrap() > 0);
        for e in entries {
            space.free(e).unwrap();
        }
    }
    assert_eq!(space.free_slots(), space.total_slots());
}

#[test]
fn two_engines_on_two_threads_at_once() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 64 << 20);
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    let space = Arc::new(Mutex::new(space));
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let space = space.clone();
            let devs = vec![dev.clone()];
            std::thread::spawn(move || {
                // The engine is created on (and bound to) its worker thread.
                let mut eng = engine(&devs, 32, None);
                let mut entries = Vec::new();
                while entries.len() < 3000 {
                    let run = space.lock().unwrap().alloc_run(8).unwrap();
                    entries.extend(run.entries());
                }
                let writes: Vec<_> = entries.iter().map(|&e| (IoOp::Write, e)).collect();
                pipeline(&mut eng, &writes, 77 + w, 32);
                let reads: Vec<_> = entries.iter().map(|&e| (IoOp::Read, e)).collect();
                pipeline(&mut eng, &reads, 77 + w, 32);
                entries
            })
        })
        .collect();
    let mut all: Vec<SwapEntry> = workers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "two workers were handed the same slot");
}

#[test]
fn multi_page_runs_are_one_request() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 4, 8 << 20);
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    let mut eng = engine(&[dev], 16, None);
    let run = space.alloc_run(16).unwrap();
    assert_eq!(run.len, 16);
    let mut buf = PageBuf::new(16);
    for (i, e) in run.entries().enumerate() {
        fill_page(&mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], e, 5);
    }
    eng.write(run.first, buf).unwrap();
    eng.wait(1).unwrap();
    let mut n = 0;
    eng.reap(|c| {
        assert_eq!(c.result.unwrap() as usize, 16 * PAGE_SIZE);
        n += 1;
    });
    assert_eq!(n, 1);
    // Read each page back singly.
    for e in run.entries() {
        eng.read(e, PageBuf::page()).unwrap();
    }
    eng.wait(16).unwrap();
    let got = eng.reap(|c| {
        let Some(IoBuf::Owned(b)) = c.buf else {
            panic!()
        };
        check_page(&b, c.entry, 5).unwrap();
    });
    assert_eq!(got, 16);
}

#[test]
fn every_completion_mode_completes_with_enter_for_completions() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 4 << 20);
    let e = SwapEntry::new(DeviceId(0), 7).unwrap();
    for mode in [
        CompletionMode::Default,
        CompletionMode::CoopTaskrun,
        CompletionMode::DeferTaskrun,
    ] {
        let mut eng = engine(std::slice::from_ref(&dev), 4, Some(mode));
        assert_eq!(eng.mode(), mode, "{}", eng.setup_report());
        let mut page = PageBuf::page();
        fill_page(&mut page, e, 9);
        eng.write(e, page).unwrap();
        eng.submit().unwrap();
        // The scheduler's loop: enter, reap, until done — never a blocking wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = 0;
        while done == 0 {
            eng.enter_for_completions().unwrap();
            done += eng.reap(|c| assert!(c.result.is_ok()));
            assert!(
                Instant::now() < deadline,
                "{mode}: completion never became visible"
            );
            std::hint::spin_loop();
        }
        eng.read(e, PageBuf::page()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = 0;
        while done == 0 {
            eng.enter_for_completions().unwrap();
            done += eng.reap(|c| {
                let Some(IoBuf::Owned(b)) = c.buf else {
                    panic!()
                };
                check_page(&b, e, 9).unwrap();
            });
            assert!(
                Instant::now() < deadline,
                "{mode}: read never became visible"
            );
        }
    }
}

#[test]
fn auto_mode_reports_its_choice() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 1 << 20);
    let eng = engine(&[dev], 4, None);
    assert!(
        eng.setup_report().contains("chosen"),
        "{}",
        eng.setup_report()
    );
    // DEFER_TASKRUN is preferred: chosen unless the kernel refused it (before 6.1).
    if eng
        .setup_report()
        .contains("DEFER_TASKRUN+SINGLE_ISSUER refused")
    {
        assert_ne!(eng.mode(), CompletionMode::DeferTaskrun);
    } else {
        assert_eq!(
            eng.mode(),
            CompletionMode::DeferTaskrun,
            "{}",
            eng.setup_report()
        );
        assert!(
            eng.setup_report()
                .starts_with("DEFER_TASKRUN+SINGLE_ISSUER chosen")
        );
    }
}

#[test]
fn eventfd_wakes_a_sleeping_worker_in_every_mode() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 1 << 20);
    let e = SwapEntry::new(DeviceId(0), 1).unwrap();
    for mode in [
        CompletionMode::Default,
        CompletionMode::CoopTaskrun,
        CompletionMode::DeferTaskrun,
    ] {
        let mut eng = engine(std::slice::from_ref(&dev), 4, Some(mode));
        eng.write(e, PageBuf::page()).unwrap();
        eng.submit().unwrap();
        {
            let efd = eng.eventfd().unwrap();
            assert!(efd.as_raw_fd() >= 0);
            let mut fds = [PollFd::new(efd, PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            assert_eq!(n, 1, "{mode}: eventfd not signalled within 5 s");
        }
        assert!(eng.clear_eventfd() >= 1);
        eng.enter_always().unwrap();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while got == 0 {
            got += eng.reap(|c| assert!(c.result.is_ok()));
            if got == 0 {
                eng.enter_always().unwrap();
            }
            assert!(Instant::now() < deadline);
        }
    }
}

#[test]
fn queue_full_hands_the_buffer_back_and_reaping_makes_room() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 1 << 20);
    let mut eng = engine(&[dev], 4, None);
    assert_eq!(eng.depth(), 4);
    for s in 0..4 {
        eng.write(SwapEntry::new(DeviceId(0), s).unwrap(), PageBuf::page())
            .unwrap();
    }
    let mut buf = PageBuf::page();
    buf[0] = 42;
    let rej = eng
        .write(SwapEntry::new(DeviceId(0), 9).unwrap(), buf)
        .unwrap_err();
    assert!(matches!(rej.error, SwapError::QueueFull { depth: 4 }));
    assert!(rej.error.is_retryable());
    assert_eq!(rej.buf[0], 42, "refused buffer must come back untouched");
    assert_eq!(eng.stats().queue_full, 1);
    let reaped = eng
        .reap_until_capacity(|c| assert!(c.result.is_ok()))
        .unwrap();
    assert!(reaped >= 1);
    assert!(eng.has_capacity());
    eng.write(SwapEntry::new(DeviceId(0), 9).unwrap(), rej.buf)
        .unwrap();
    eng.wait(u32::MAX).unwrap();
    eng.reap(|_| {});
    assert_eq!(eng.in_flight(), 0);
}

#[test]
fn staged_reads_and_writes_use_the_engines_own_buffers() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 2, 1 << 20);
    let mut eng = Engine::new(
        &EngineConfig {
            depth: 8,
            staging_pages: 2,
            ..EngineConfig::default()
        },
        &[dev],
    )
    .unwrap();
    let e0 = SwapEntry::new(DeviceId(2), 3).unwrap();
    let e1 = SwapEntry::new(DeviceId(2), 4).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    fill_page(&mut page, e0, 11);
    eng.write_staged(e0, &page).unwrap();
    fill_page(&mut page, e1, 11);
    eng.write_staged(e1, &page).unwrap();
    // Both staging pages are busy now.
    assert!(matches!(
        eng.write_staged(e1, &page),
        Err(SwapError::StagingExhausted(2))
    ));
    eng.wait(2).unwrap();
    assert_eq!(
        eng.reap(|c| assert!(c.result.is_ok() && c.buf.is_none())),
        2
    );
    eng.read_staged(e0).unwrap();
    eng.read_staged(e1).unwrap();
    eng.wait(2).unwrap();
    let mut pages = Vec::new();
    eng.reap(|c| {
        let Some(IoBuf::Staged(p)) = c.buf else {
            panic!("staged page expected")
        };
        pages.push((c.entry, p));
    });
    for (e, p) in pages {
        check_page(eng.staged(&p).unwrap(), e, 11).unwrap();
        assert!(eng.release_staged(p));
    }
    // A page of another engine is refused.
    let dir2 = disk_tempdir();
    let other_dev = device(dir2.path(), "swap1", 2, 1 << 20);
    let mut other = Engine::new(&EngineConfig::default(), &[other_dev]).unwrap();
    other.read_staged(e0).unwrap();
    other.wait(1).unwrap();
    let mut foreign = None;
    other.reap(|c| foreign = c.buf);
    let Some(IoBuf::Staged(p)) = foreign else {
        panic!()
    };
    assert!(eng.staged(&p).is_none());
    assert!(other.staged(&p).is_some());
    assert!(other.release_staged(p));
}

#[test]
fn short_read_from_a_truncated_file_marks_the_entry_bad_and_must_poison() {
    let dir = disk_tempdir();
    let path = dir.path().join("swap0");
    create_swap_file(&path, 1 << 20).unwrap();
    let dev = Arc::new(SwapDevice::open(DeviceId(1), &path).unwrap());
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    let mut eng = engine(std::slice::from_ref(&dev), 8, None);
    let entries: Vec<_> = space.alloc_run(200).unwrap().entries().collect();
    let writes: Vec<_> = entries.iter().map(|&e| (IoOp::Write, e)).collect();
    pipeline(&mut eng, &writes, 3, 8);
    // Someone truncates the backing file under us: slots 100.. are gone.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(101 * PAGE_SIZE as u64).unwrap();
    drop(f);
    let ok = entries[50];
    let lost = entries[150];
    eng.read(ok, PageBuf::page()).unwrap();
    let mut poisoned = PageBuf::page();
    poisoned.fill(0xEE);
    eng.read(lost, poisoned).unwrap();
    eng.wait(2).unwrap();
    let mut seen = 0;
    eng.reap(|c| {
        seen += 1;
        if c.entry == ok {
            let Some(IoBuf::Owned(b)) = c.buf else {
                panic!()
            };
            check_page(&b, ok, 3).unwrap();
        } else {
            let err = c.result.expect_err("a read past EOF must not succeed");
            assert!(err.must_poison(), "{err}");
            assert!(matches!(err, SwapError::ShortRead { got: 0, .. }), "{err}");
            assert_eq!(err.entry(), Some(lost));
            // The buffer comes back as it was: no zeros were made up.
            let Some(IoBuf::Owned(b)) = c.buf else {
                panic!()
            };
            assert!(b.iter().all(|&x| x == 0xEE));
        }
    });
    assert_eq!(seen, 2);
    assert!(dev.is_bad(lost.slot()));
    assert!(!dev.is_bad(ok.slot()));
    assert_eq!(eng.stats().read_errors, 1);
    // A second read of the bad entry is refused before any I/O.
    let rej = eng.read(lost, PageBuf::page()).unwrap_err();
    assert!(matches!(rej.error, SwapError::BadEntry(e) if e == lost));
    assert!(rej.error.must_poison());
    // Freeing it retires the slot: it is never handed out again.
    assert!(space.free(lost).unwrap());
    let free_before = space.free_slots();
    for e in &entries {
        if *e != lost {
            space.free(*e).unwrap();
        }
    }
    assert_eq!(space.free_slots(), free_before + 199);
    let mut handed = Vec::new();
    while let Ok(e) = space.alloc() {
        handed.push(e);
    }
    assert!(!handed.contains(&lost));
    assert_eq!(handed.len() as u64, dev.slots() - 1);
}

#[test]
fn write_on_a_read_only_descriptor_keeps_the_page() {
    let dir = disk_tempdir();
    let path = dir.path().join("swap0");
    create_swap_file(&path, 1 << 20).unwrap();
    let dev = Arc::new(
        SwapDevice::open_with(DeviceId(0), &path, &DeviceOptions { read_only: true }).unwrap(),
    );
    assert!(dev.is_read_only());
    let mut eng = engine(&[dev], 4, None);
    let e = SwapEntry::new(DeviceId(0), 5).unwrap();
    let mut page = PageBuf::page();
    fill_page(&mut page, e, 21);
    eng.write(e, page).unwrap();
    eng.wait(1).unwrap();
    let mut seen = false;
    eng.reap(|c| {
        seen = true;
        let err = c.result.expect_err("write on O_RDONLY must fail");
        assert!(err.keeps_page(), "{err}");
        assert!(!err.must_poison());
        assert_eq!(err.errno(), Some(libc::EBADF), "{err}");
        let Some(IoBuf::Owned(b)) = c.buf else {
            panic!("page not handed back")
        };
        check_page(&b, e, 21).unwrap();
    });
    assert!(seen);
    assert_eq!(eng.stats().write_errors, 1);
}

#[test]
fn requests_beyond_the_device_or_badly_sized_are_refused() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 1 << 20);
    let slots = dev.slots();
    let mut eng = engine(&[dev], 4, None);
    let last = SwapEntry::new(DeviceId(0), slots - 1).unwrap();
    let rej = eng.read(last, PageBuf::new(2)).unwrap_err();
    assert!(matches!(rej.error, SwapError::OutOfRange { pages: 2, .. }));
    let rej = eng
        .read(SwapEntry::new(DeviceId(9), 0).unwrap(), PageBuf::page())
        .unwrap_err();
    assert!(matches!(rej.error, SwapError::UnknownDevice(DeviceId(9))));
    assert!(matches!(
        eng.write_staged(last, &[0u8; 100]),
        Err(SwapError::BadBufferLength(100))
    ));
    assert_eq!(eng.in_flight(), 0);
}

#[test]
fn dropping_an_engine_with_io_in_flight_waits_for_it() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 8 << 20);
    let mut eng = engine(std::slice::from_ref(&dev), 64, None);
    for s in 0..64 {
        let e = SwapEntry::new(DeviceId(0), s).unwrap();
        let mut p = PageBuf::page();
        fill_page(&mut p, e, 8);
        eng.write(e, p).unwrap();
    }
    eng.submit().unwrap();
    drop(eng); // must wait for the 64 writes before freeing their buffers
    let mut eng = engine(&[dev], 64, None);
    let reads: Vec<_> = (0..64)
        .map(|s| (IoOp::Read, SwapEntry::new(DeviceId(0), s).unwrap()))
        .collect();
    pipeline(&mut eng, &reads, 8, 64);
}

#[test]
fn submit_batch_zero_queues_until_an_explicit_submit() {
    let dir = disk_tempdir();
    let dev = device(dir.path(), "swap0", 0, 1 << 20);
    let mut eng = Engine::new(
        &EngineConfig {
            depth: 8,
            submit_batch: 0,
            ..EngineConfig::default()
        },
        std::slice::from_ref(&dev),
    )
    .unwrap();
    for s in 0..5 {
        eng.read(SwapEntry::new(DeviceId(0), s).unwrap(), PageBuf::page())
            .unwrap();
    }
    assert_eq!(
        eng.stats().enters,
        0,
        "nothing may reach the kernel before submit"
    );
    assert_eq!(eng.submit().unwrap(), 5);
    assert_eq!(eng.stats().enters, 1, "one system call for the batch");
    eng.wait(5).unwrap();
    assert_eq!(eng.reap(|c| assert!(c.result.is_ok())), 5);
    // The default submits each request at once.
    let mut eager = engine(&[dev], 8, None);
    eager
        .read(SwapEntry::new(DeviceId(0), 0).unwrap(), PageBuf::page())
        .unwrap();
    assert_eq!(eager.stats().enters, 1);
    assert_eq!(eager.submit().unwrap(), 0);
    eager.wait(1).unwrap();
    assert_eq!(eager.reap(|c| assert!(c.result.is_ok())), 1);
}
