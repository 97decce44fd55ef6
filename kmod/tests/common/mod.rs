//! Helpers shared by the kmod integration tests. Every `unsafe` block is in [`sys`].
#![allow(dead_code, unreachable_pub)]

pub mod sys;

use std::time::{Duration, Instant};
use usm_kmod::{Features, OpenFlags, RawUserfaultfd, UffdEvent, Userfaultfd};

pub const PAGE: u64 = 4096;

/// True when running as root; the kmod tests need it (userfaultfd handler mode,
/// EVENT_FORK, mlock). Prints why a test is skipped otherwise.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("SKIP {test}: needs root (userfaultfd handler mode / mlock)");
        false
    }
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
