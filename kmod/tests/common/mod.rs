//! Helpers shared by the kmod integration tests. Every `unsafe` block is in [`sys`].
#![allow(dead_code, unreachable_pub)]

#[allow(unsafe_code)] // the tests' system calls: their only unsafe code
pub mod sys;

use std::time::{Duration, Instant};
use usm_kmod::{Features, OpenFlags, RawUserfaultfd, UffdEvent, Userfaultfd};

pub const PAGE: u64 = 4096;

/// The kmod tests need root (userfaultfd handler mode, EVENT_FORK, mlock): fails the
/// test with the reason otherwise (CI runs as root; a test that cannot run must not pass).
/// Returns `true` so call sites read `if !require_root(..) { return; }`.
pub fn require_root(test: &str) -> bool {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root (userfaultfd handler mode / mlock): run the tests as root"
    );
    true
}

/// A handler-mode userfaultfd with `required` features.
pub fn uffd(required: Features) -> Userfaultfd {
    RawUserfaultfd::open(OpenFlags::default())
        .expect("open userfaultfd")
        .negotiate(Features::empty(), required)
        .expect("negotiate")
}

/// Reads events until `n` have arrived or `timeout` passes.
pub fn wait_events(uffd: &Userfaultfd, n: usize, timeout: Duration) -> Vec<UffdEvent> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        uffd.wait_readable(10).expect("poll");
        uffd.read_events(&mut out).expect("read events");
    }
    out
}
