//! SIGBUS mode: with `UFFD_FEATURE_SIGBUS` a missing-page access raises SIGBUS in the
//! faulting thread, whose handler resolves its own fault (COPY, ZEROPAGE, MOVE) and
//! returns; the access is retried and succeeds. One test per binary: the handler is
//! process-wide. The fd is opened `user_mode_only`, as the embedded runtime does, so this
//! needs no privilege.

#![deny(unsafe_code)]

mod common;

use common::{PAGE, sys};
use usm_kmod::{Features, OpenFlags, RawUserfaultfd, RegisterMode, UffdEvent};
use usm_sync::atomic::Ordering;

#[test]
fn the_faulting_thread_resolves_its_own_fault_in_its_sigbus_handler() {
    let uffd = RawUserfaultfd::open(OpenFlags {
        user_mode_only: true,
        ..OpenFlags::default()
    })
    .and_then(|raw| raw.negotiate(Features::empty(), Features::SIGBUS | Features::MOVE));
    let uffd = match uffd {
        Ok(u) => u,
        Err(e) => panic!(
            "a user-mode-only userfaultfd with SIGBUS and MOVE opens for anyone (this \
             machine's kernel has both): {e}"
        ),
    };
    let pages = 4;
    let region = sys::mmap_anon((pages * PAGE) as usize);
    let copy_src = sys::mmap_anon(PAGE as usize);
    let move_src = sys::mmap_anon(2 * PAGE as usize);
    sys::fill_page(copy_src, 0xAB);
    sys::fill_page(move_src, 0xCD);
    sys::fill_page(move_src + PAGE, 0xEF);
    uffd.register(region, pages * PAGE, RegisterMode::MISSING)
        .unwrap();
    sys::install_sigbus(sys::SigbusSetup {
        uffd,
        region,
        len: pages * PAGE,
        copy_src,
        move_src,
    });

    // This thread faults four times; each fault is resolved in its own signal handler.
    assert_eq!(sys::load(region + 64), 0xAB, "page 0: COPY");
    sys::store(region + PAGE, 11);
    assert_eq!(
        sys::load(region + PAGE),
        11,
        "page 1: ZEROPAGE, then the write COWs"
    );
    assert_eq!(sys::load(region + PAGE + 8), 0);
    assert_eq!(sys::load(region + 2 * PAGE), 0xCD, "page 2: MOVE");
    sys::store(region + 3 * PAGE + 8, 1);
    assert_eq!(sys::load(region + 3 * PAGE), 0xEF, "page 3: MOVE, written");

    let counts: Vec<usize> = sys::RESOLVED
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .collect();
    assert_eq!(
        counts,
        vec![1, 1, 2],
        "one signal per missing page, each resolved once"
    );
    assert_eq!(sys::FOREIGN.load(Ordering::SeqCst), 0);
    assert!(
        sys::page_is(move_src, 0),
        "the moved source pages are holes now"
    );

    // A second access to the resolved pages raises nothing, and no message is queued.
    let _ = sys::load(region + 3 * PAGE + 16);
    assert_eq!(
        sys::RESOLVED
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum::<usize>(),
        4
    );
    let mut events: Vec<UffdEvent> = Vec::new();
    let uffd = sys_setup_uffd();
    assert_eq!(
        uffd.read_events(&mut events).unwrap(),
        0,
        "SIGBUS mode sends no fault messages"
    );
}

fn sys_setup_uffd() -> &'static usm_kmod::Userfaultfd {
    &sys::setup().uffd
}
