//! Daemon-style fork tracking: with `EVENT_FORK` a fork delivers the child's userfaultfd
//! to the reader, which adopts it and resolves the child's faults from this process.
//! One test per binary: while an `EVENT_FORK` fd has registered ranges, every fork of
//! the process waits for its event to be read.

#![deny(unsafe_code)]

mod common;

use common::{PAGE, require_root, sys, wait_events};
use std::time::Duration;
use usm_kmod::{CopyMode, Features, RegisterMode, Resolved, UffdEvent, Userfaultfd};

#[test]
fn a_fork_hands_over_the_childs_userfaultfd_and_its_faults_resolve_from_here() {
    if !require_root("a_fork_hands_over_the_childs_userfaultfd_and_its_faults_resolve_from_here") {
        return;
    }
    let uffd = common::uffd(Features::EVENT_FORK | Features::THREAD_ID);
    let region = sys::mmap_anon(2 * PAGE as usize);
    let src = sys::mmap_anon(PAGE as usize);
    sys::fill_page(src, 0x51);
    uffd.register(region, 2 * PAGE, RegisterMode::MISSING)
        .unwrap();
    // Page 0 is present before the fork: the child inherits it.
    assert!(
        sys::copy(&uffd, region, src, PAGE, CopyMode::empty())
            .unwrap()
            .is_done()
    );
    // fork() waits until the FORK event is read, so it runs on another thread.
    let forker = std::thread::spawn(move || {
        sys::fork_with(move || {
            let inherited = sys::load(region);
            let faulted = sys::load(region + PAGE); // missing: resolved by the parent
            if inherited == 0x51 && faulted == 0x52 {
                0
            } else {
                1
            }
        })
    });
    let events = wait_events(&uffd, 1, Duration::from_secs(5));
    let child_uffd = match events.into_iter().next() {
        Some(UffdEvent::Fork { child }) => Userfaultfd::from_fork(child, &uffd).unwrap(),
        other => panic!("expected a FORK event, got {other:?}"),
    };
    assert_eq!(child_uffd.features(), uffd.features());
    let pid = forker.join().unwrap();
    // The child's fault arrives on the child's fd, with the child's thread id.
    let events = wait_events(&child_uffd, 1, Duration::from_secs(5));
    match events.as_slice() {
        [UffdEvent::Pagefault { addr, tid, .. }] => {
            assert_eq!(*addr, region + PAGE);
            assert_eq!(*tid, pid as u32, "the child's only thread faulted");
        }
        other => panic!("expected the child's fault, got {other:?}"),
    }
    sys::fill_page(src, 0x52);
    // COPY reads `src` here and writes the child's page.
    let r = sys::copy(&child_uffd, region + PAGE, src, PAGE, CopyMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert_eq!(
        sys::wait_child(pid),
        Ok(0),
        "the child saw inherited and resolved data"
    );
    // The child is gone: resolving on its fd reports ESRCH, classified as "mm gone".
    let err = sys::copy(&child_uffd, region + PAGE, src, PAGE, CopyMode::empty()).unwrap_err();
    assert!(err.is_mm_gone(), "{err:?}");
    // Our own page 1 is still missing: resolving it here is independent of the child.
    let r = sys::zeropage(&uffd, region + PAGE, PAGE, usm_kmod::ZeropageMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    uffd.unregister(region, 2 * PAGE).unwrap();
    sys::munmap(region, 2 * PAGE as usize);
    sys::munmap(src, PAGE as usize);
}
