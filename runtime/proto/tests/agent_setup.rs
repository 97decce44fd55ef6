//! `AgentClient::from_ready` refuses a staging area the daemon could not address: found by
//! the `agent_ring` fuzz target (a staging start near `u64::MAX` made `staging_addr`
//! overflow).

use std::os::fd::OwnedFd;

use usm_proto::ProtoError;
use usm_proto::agent::{AgentClient, AgentServer};

fn fds(server: &AgentServer) -> Vec<OwnedFd> {
    server
        .fds_for_daemon()
        .iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect()
}

#[test]
fn a_staging_area_that_wraps_or_is_unaligned_is_refused() {
    let server = AgentServer::create(4, 16).unwrap();
    for (start, pages) in [
        (u64::MAX - 4095, 16),        // wraps past the end of the address space
        (0xffff_ffff_ffff_0000, 16),  // ends exactly past u64::MAX
        (0x7f00_0000_0800, 16),       // not page-aligned
        (0x7f00_0000_0000, u32::MAX), // more than MAX_STAGING_PAGES
    ] {
        let err = AgentClient::from_ready(start, pages, 4, fds(&server)).unwrap_err();
        assert!(
            matches!(err, ProtoError::BadAgentSetup { .. }),
            "{start:#x} + {pages} pages: {err}"
        );
    }
    // The last slot of a valid area has an address.
    let client = AgentClient::from_ready(0xffff_ffff_fffe_0000, 16, 4, fds(&server)).unwrap();
    assert_eq!(client.staging_addr(15), 0xffff_ffff_fffe_f000);
}
