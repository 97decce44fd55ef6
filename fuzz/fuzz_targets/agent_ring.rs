//! The daemon's reader of the agent ring (`usm_proto::agent::AgentClient`) over any ring
//! contents a hostile tagged program could write into the shared memfd: setting up the
//! client never panics; reading completions never reads past the ring, returns at most
//! `entries` of them per call, and keeps working through submits and further reads.
//!
//! Input: `[entries selector, staging-pages byte, flags, staging start (8 bytes LE),
//! ring bytes...]`. Unless flag bit
//! 0 is set, the ring's magic and size are written correctly so most inputs reach the
//! completion reader.
#![no_main]

use std::io::Write as _;
use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{MFdFlags, memfd_create};
use usm_proto::agent::{AgentClient, AgentOp, AgentRequest, ring_len};

fuzz_target!(|data: &[u8]| {
    let [sel, staging, flags, s0, s1, s2, s3, s4, s5, s6, s7, ring_bytes @ ..] = data else {
        return;
    };
    let staging_start = u64::from_le_bytes([*s0, *s1, *s2, *s3, *s4, *s5, *s6, *s7]);
    let entries = 1u32 << (sel % 5); // 1..=16: small rings wrap often.
    let len = ring_len(entries);
    let mut ring = vec![0u8; len];
    let n = ring_bytes.len().min(len);
    ring[..n].copy_from_slice(&ring_bytes[..n]);
    if flags & 1 == 0 {
        ring[256..264].copy_from_slice(b"USMRING1");
        ring[264..272].copy_from_slice(&u64::from(entries).to_le_bytes());
    }
    let memfd = memfd_create("usm-fuzz-ring", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .expect("memfd_create");
    let mut file = std::fs::File::from(memfd);
    file.write_all(&ring).expect("write the ring");
    // What a well-behaved tagger does (a daemon may require it before mapping).
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
    )
    .expect("seal the ring");
    let eventfd = || -> OwnedFd {
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .expect("eventfd")
            .into()
    };
    let fds = vec![OwnedFd::from(file), eventfd(), eventfd()];
    let Ok(mut client) =
        AgentClient::from_ready(staging_start, u32::from(*staging), entries, fds)
    else {
        return;
    };
    let max = entries as usize;
    let first = client.completions();
    assert!(first.len() <= max, "{} completions from a ring of {max}", first.len());
    for (i, seq) in (0u64..).zip(0..u64::from(entries) + 1) {
        let req = AgentRequest {
            op: AgentOp::DropSlots,
            slot: (i as u32) % u32::from(*staging).max(1),
            addr: 0,
            pages: 1,
            seq,
        };
        if client.submit(req).is_err() {
            break;
        }
    }
    let second = client.completions();
    assert!(second.len() <= max, "{} completions from a ring of {max}", second.len());
    // Every slot the daemon may use has an address (no overflow past the staging area).
    for slot in 0..u32::from(*staging) {
        let addr = client.staging_addr(slot);
        assert!(addr >= staging_start && addr % 4096 == staging_start % 4096);
    }
});
