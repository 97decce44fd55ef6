//! Handler-thread mode on the real kernel: one thread faults, another reads the
//! userfaultfd and resolves; plus WP, REMOVE/UNMAP events, mmap_changing, partial MOVE,
//! MOVE of a fork-shared page and POISON.

#![deny(unsafe_code)]

mod common;

use common::{PAGE, require_root, sys, uffd, wait_events};
use std::time::Duration;
use usm_kmod::{
    ContinueMode, CopyMode, Features, Ioctls, MoveMode, PoisonMode, RegisterMode, Resolved,
    UffdEvent, WriteProtect, ZeropageMode,
};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU32, Ordering};

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn a_thread_faults_another_resolves_with_copy_zeropage_and_move() {
    if !require_root("a_thread_faults_another_resolves_with_copy_zeropage_and_move") {
        return;
    }
    let uffd = uffd(Features::MOVE | Features::THREAD_ID);
    let region = sys::mmap_anon(3 * PAGE as usize);
    let copy_src = sys::mmap_anon(PAGE as usize);
    let move_src = sys::mmap_anon_dontfork(PAGE as usize);
    sys::fill_page(copy_src, 0xC0C0);
    sys::fill_page(move_src, 0x3030);
    uffd.register(region, 3 * PAGE, RegisterMode::MISSING)
        .unwrap();

    let tid = Arc::new(AtomicU32::new(0));
    let faulter = {
        let tid = Arc::clone(&tid);
        std::thread::spawn(move || {
            tid.store(sys::gettid(), Ordering::SeqCst);
            let a = sys::load(region + 8);
            sys::store(region + PAGE + 16, 7);
            let c = sys::load(region + 2 * PAGE + 24);
            (
                a,
                sys::load(region + PAGE),
                sys::load(region + PAGE + 16),
                c,
            )
        })
    };
    let mut faults = 0;
    let mut resolved_bytes = 0;
    while faults < 3 {
        let events = wait_events(&uffd, 1, WAIT);
        assert!(!events.is_empty(), "the faulting thread's fault arrives");
        for ev in events {
            let UffdEvent::Pagefault {
                addr,
                write,
                wp,
                minor,
                tid: ftid,
            } = ev
            else {
                panic!("unexpected event {ev:?}");
            };
            assert!(!wp && !minor);
            assert_eq!(
                ftid,
                tid.load(Ordering::SeqCst),
                "THREAD_ID reports the faulting thread"
            );
            let page = (addr - region) / PAGE;
            assert_eq!(page, faults, "faults arrive in program order");
            assert_eq!(write, page == 1, "page 1 is written, 0 and 2 read");
            let r = match page {
                0 => sys::copy(&uffd, addr, copy_src, PAGE, CopyMode::empty()),
                1 => sys::zeropage(&uffd, addr, PAGE, ZeropageMode::empty()),
                _ => sys::move_pages(&uffd, addr, move_src, PAGE, MoveMode::empty()),
            }
            .unwrap();
            assert_eq!(r, Resolved::Done(PAGE));
            resolved_bytes += r.bytes();
            faults += 1;
        }
    }
    let (a, b0, b16, c) = faulter.join().unwrap();
    assert_eq!((a, b0, b16, c), (0xC0C0, 0, 7, 0x3030));
    assert_eq!(resolved_bytes, 3 * PAGE);
    assert!(
        sys::page_is(region + 2 * PAGE, 0x3030),
        "moved page content intact"
    );
    assert!(
        sys::page_is(move_src, 0),
        "MOVE left a hole in the (unregistered) source"
    );
    // Resolving again: already mapped, a state not an error.
    let r = sys::copy(&uffd, region, copy_src, PAGE, CopyMode::DONTWAKE).unwrap();
    assert_eq!(r, Resolved::AlreadyMapped);
    sys::munmap(region, 3 * PAGE as usize);
    sys::munmap(copy_src, PAGE as usize);
    sys::munmap(move_src, PAGE as usize);
}

#[test]
fn a_write_blocks_until_write_protection_is_cleared() {
    if !require_root("a_write_blocks_until_write_protection_is_cleared") {
        return;
    }
    let uffd = uffd(Features::PAGEFAULT_FLAG_WP);
    let region = sys::mmap_anon(PAGE as usize);
    let src = sys::mmap_anon(PAGE as usize);
    sys::fill_page(src, 1);
    uffd.register(region, PAGE, RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    // Populate write-protected in one step (COPY with MODE_WP).
    let r = sys::copy(&uffd, region, src, PAGE, CopyMode::WP).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert_eq!(sys::load(region), 1, "reads are not blocked by WP");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            sys::store(region, 42);
            done.store(true, Ordering::SeqCst);
        })
    };
    let events = wait_events(&uffd, 1, WAIT);
    assert!(
        matches!(events.as_slice(), [UffdEvent::Pagefault { wp: true, write: true, addr, .. }] if *addr == region),
        "{events:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "the write waits while the page is write-protected"
    );
    let r = sys::writeprotect(&uffd, region, PAGE, WriteProtect::Clear).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(sys::load(region), 42);
    // Setting it again protects again.
    let r = sys::writeprotect(&uffd, region, PAGE, WriteProtect::Set).unwrap();
    assert!(r.is_done());
    sys::munmap(region, PAGE as usize);
    sys::munmap(src, PAGE as usize);
}

#[test]
fn remove_and_unmap_events_arrive_for_dontneed_and_munmap() {
    if !require_root("remove_and_unmap_events_arrive_for_dontneed_and_munmap") {
        return;
    }
    let uffd = uffd(Features::EVENT_REMOVE | Features::EVENT_UNMAP);
    let len = 4 * PAGE;
    let region = sys::mmap_anon(len as usize);
    uffd.register(region, len, RegisterMode::MISSING).unwrap();
    // Both calls wait until their event is read, so they run on another thread.
    let t = std::thread::spawn(move || {
        assert_eq!(
            sys::madvise(region + PAGE, 2 * PAGE as usize, libc::MADV_DONTNEED),
            0
        );
        assert_eq!(sys::munmap(region, len as usize), 0);
    });
    let mut events = wait_events(&uffd, 1, WAIT);
    match events.as_slice() {
        [UffdEvent::Remove { start, end }] => {
            assert_eq!((*start, *end), (region + PAGE, region + 3 * PAGE));
        }
        other => panic!("expected one REMOVE, got {other:?}"),
    }
    let ev = events.pop().unwrap().to_event(7).unwrap();
    assert!(
        matches!(ev, usm_kmod::Event::Free { start, len, .. } if start == region + PAGE && len == 2 * PAGE)
    );
    let events = wait_events(&uffd, 1, WAIT);
    match events.as_slice() {
        [UffdEvent::Unmap { start, end }] => assert_eq!((*start, *end), (region, region + len)),
        other => panic!("expected one UNMAP, got {other:?}"),
    }
    t.join().unwrap();
}

#[test]
fn a_resolve_during_an_unread_remap_is_mmap_changing() {
    if !require_root("a_resolve_during_an_unread_remap_is_mmap_changing") {
        return;
    }
    let uffd = uffd(Features::EVENT_REMAP);
    let len = 2 * PAGE as usize;
    let region = sys::mmap_anon(len);
    let target = sys::mmap_anon(len);
    let src = sys::mmap_anon(PAGE as usize);
    sys::fill_page(src, 9);
    uffd.register(region, len as u64, RegisterMode::MISSING)
        .unwrap();
    let mover = std::thread::spawn(move || sys::mremap_fixed(region, len, target));
    // The REMAP event is queued (and mmap_changing raised) before mremap waits for us.
    assert!(
        uffd.wait_readable(5000).unwrap(),
        "the remap event is pending"
    );
    let r = sys::copy(&uffd, target, src, PAGE, CopyMode::empty()).unwrap();
    assert_eq!(
        r,
        Resolved::MmapChanging,
        "EAGAIN with no progress while the event is unread"
    );
    let r = sys::move_pages(&uffd, target, src, PAGE, MoveMode::empty()).unwrap();
    assert_eq!(r, Resolved::MmapChanging);
    let events = wait_events(&uffd, 1, WAIT);
    match events.as_slice() {
        [UffdEvent::Remap { from, to, len: l }] => {
            assert_eq!((*from, *to, *l), (region, target, len as u64));
        }
        other => panic!("expected one REMAP, got {other:?}"),
    }
    assert_eq!(mover.join().unwrap(), target);
    // Reading the event lets mremap finish; then the new range resolves normally.
    let r = sys::copy(&uffd, target, src, PAGE, CopyMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert!(sys::page_is(target, 9));
    sys::munmap(target, len);
    sys::munmap(src, PAGE as usize);
}

#[test]
fn a_multi_page_move_meeting_a_present_page_is_partial() {
    if !require_root("a_multi_page_move_meeting_a_present_page_is_partial") {
        return;
    }
    let uffd = uffd(Features::MOVE);
    let n = 4;
    let dst = sys::mmap_anon((n * PAGE) as usize);
    let src = sys::mmap_anon_dontfork((n * PAGE) as usize);
    for i in 0..n {
        sys::fill_page(src + i * PAGE, 100 + i);
    }
    uffd.register(dst, n * PAGE, RegisterMode::MISSING).unwrap();
    // Page 2 of dst is present.
    assert!(
        sys::zeropage(&uffd, dst + 2 * PAGE, PAGE, ZeropageMode::DONTWAKE)
            .unwrap()
            .is_done()
    );
    let r = sys::move_pages(&uffd, dst, src, n * PAGE, MoveMode::empty()).unwrap();
    assert_eq!(
        r,
        Resolved::Partial(2 * PAGE),
        "stops at the present page with a partial count"
    );
    assert!(sys::page_is(dst, 100) && sys::page_is(dst + PAGE, 101));
    // Continuing from the stop point names the reason: the page is already mapped.
    let r = sys::move_pages(
        &uffd,
        dst + 2 * PAGE,
        src + 2 * PAGE,
        2 * PAGE,
        MoveMode::empty(),
    )
    .unwrap();
    assert_eq!(r, Resolved::AlreadyMapped);
    // And the rest moves.
    let r = sys::move_pages(
        &uffd,
        dst + 3 * PAGE,
        src + 3 * PAGE,
        PAGE,
        MoveMode::empty(),
    )
    .unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert!(sys::page_is(dst + 3 * PAGE, 103));
    assert!(
        sys::page_is(src + 2 * PAGE, 102),
        "the unmoved source page stayed"
    );
    sys::munmap(dst, (n * PAGE) as usize);
    sys::munmap(src, (n * PAGE) as usize);
}

#[test]
fn moving_a_fork_shared_page_says_use_copy_and_copy_works() {
    if !require_root("moving_a_fork_shared_page_says_use_copy_and_copy_works") {
        return;
    }
    let uffd = uffd(Features::MOVE);
    let dst = sys::mmap_anon(PAGE as usize);
    let src = sys::mmap_anon(PAGE as usize);
    sys::fill_page(src, 0xF00D);
    uffd.register(dst, PAGE, RegisterMode::MISSING).unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let rfd = std::os::fd::AsRawFd::as_raw_fd(&r);
    // The child shares `src` copy-on-write and waits on the pipe.
    let child = sys::fork_with(move || {
        if sys::read_one(rfd) && sys::load(src) == 0xF00D {
            0
        } else {
            1
        }
    });
    let r1 = sys::move_pages(&uffd, dst, src, PAGE, MoveMode::empty()).unwrap();
    assert_eq!(
        r1,
        Resolved::UseCopy,
        "EBUSY from MOVE on a fork-shared page"
    );
    let r2 = sys::copy(&uffd, dst, src, PAGE, CopyMode::empty()).unwrap();
    assert_eq!(r2, Resolved::Done(PAGE));
    assert!(sys::page_is(dst, 0xF00D));
    nix::unistd::write(&w, b"x").unwrap();
    assert_eq!(
        sys::wait_child(child),
        Ok(0),
        "the child still sees its copy"
    );
    sys::munmap(dst, PAGE as usize);
    sys::munmap(src, PAGE as usize);
}

#[test]
fn a_poisoned_page_raises_sigbus_on_access() {
    if !require_root("a_poisoned_page_raises_sigbus_on_access") {
        return;
    }
    let uffd = uffd(Features::POISON);
    let region = sys::mmap_anon(2 * PAGE as usize);
    let src = sys::mmap_anon(PAGE as usize);
    sys::fill_page(src, 5);
    uffd.register(region, 2 * PAGE, RegisterMode::MISSING)
        .unwrap();
    // Page 0 gets real content (so the child inherits the page tables), page 1 poison.
    assert!(
        sys::copy(&uffd, region, src, PAGE, CopyMode::empty())
            .unwrap()
            .is_done()
    );
    let r = sys::poison(&uffd, region + PAGE, PAGE, PoisonMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    // Touch it in a child: the parent must survive to check how the child died.
    let child = sys::fork_with(move || {
        if sys::load(region) != 5 {
            return 2;
        }
        let _ = sys::load(region + PAGE);
        3 // not reached: the access above raises SIGBUS
    });
    assert_eq!(sys::wait_child(child), Err(libc::SIGBUS));
    sys::munmap(region, 2 * PAGE as usize);
    sys::munmap(src, PAGE as usize);
}

#[test]
fn a_minor_fault_on_shmem_is_resolved_with_continue() {
    if !require_root("a_minor_fault_on_shmem_is_resolved_with_continue") {
        return;
    }
    let uffd = uffd(Features::MINOR_SHMEM);
    let len = 2 * PAGE as usize;
    let (_fd, managed, backdoor) = sys::memfd_mapped_twice(len);
    // The page cache gets content through the second mapping; the first has no ptes yet.
    sys::fill_page(backdoor, 0x77);
    sys::fill_page(backdoor + PAGE, 0x88);
    let granted = uffd
        .register(managed, len as u64, RegisterMode::MINOR)
        .unwrap();
    assert!(granted.contains(Ioctls::CONTINUE), "{granted}");
    let reader = std::thread::spawn(move || (sys::load(managed), sys::load(managed + PAGE)));
    for page in 0..2u64 {
        let events = wait_events(&uffd, 1, WAIT);
        match events.as_slice() {
            [
                UffdEvent::Pagefault {
                    addr,
                    minor: true,
                    write: false,
                    ..
                },
            ] => {
                assert_eq!(*addr, managed + page * PAGE);
            }
            other => panic!("expected a minor fault, got {other:?}"),
        }
        let r =
            sys::continue_pages(&uffd, managed + page * PAGE, PAGE, ContinueMode::empty()).unwrap();
        assert_eq!(r, Resolved::Done(PAGE));
    }
    assert_eq!(
        reader.join().unwrap(),
        (0x77, 0x88),
        "CONTINUE mapped the page-cache pages"
    );
    sys::munmap(managed, len);
    sys::munmap(backdoor, len);
}
