//! Real unix sockets: Hello with a real userfaultfd over SCM_RIGHTS, credential checks,
//! malformed messages refused while the listener keeps serving.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use usm_proto::server::{self, Listener};
use usm_proto::wire::DecodeError;
use usm_proto::{Channel, Message, PROTOCOL_VERSION, ProtoError, RefusalReason, client};

/// Any descriptor works as "the fd" for the protocol.
fn some_fd() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

fn listener() -> (tempfile::TempDir, Listener) {
    let dir = tempfile::tempdir().unwrap();
    let l = Listener::bind(&dir.path().join("usm.sock")).unwrap();
    l.set_accept_timeout(Some(Duration::from_secs(10))).unwrap();
    (dir, l)
}

#[test]
fn hello_ack_round_trip_with_fd() {
    let (dir, l) = listener();
    let path = dir.path().join("usm.sock");
    let daemon = std::thread::spawn(move || {
        let peer = server::accept(&l).unwrap();
        assert_eq!(peer.pid, std::process::id());
        assert_eq!(peer.name, "unit-test");
        assert!(peer.uffd.as_raw_fd() >= 0);
        peer.ack(0x55, "policyOne").unwrap();
        peer.send_swap_state(3).unwrap();
        assert_eq!(
            peer.stream.recv().unwrap(),
            Message::Hint {
                addr: 0x1000,
                len: 10,
                text: "cold".into()
            }
        );
    });
    let session = client::connect(&path).unwrap();
    let fd = some_fd();
    let admission = session
        .hello(std::process::id(), "unit-test", fd.as_fd())
        .unwrap();
    assert_eq!(admission.features, 0x55);
    assert_eq!(admission.policy, "policyOne");
    assert_eq!(
        session.channel().recv().unwrap(),
        Message::SwapState { swapped_pages: 3 }
    );
    session
        .channel()
        .send(&Message::Hint {
            addr: 0x1000,
            len: 10,
            text: "cold".into(),
        })
        .unwrap();
    daemon.join().unwrap();
    // The daemon hung up: the tagger sees a clean Closed.
    assert!(matches!(session.channel().recv(), Err(ProtoError::Closed)));
}

#[test]
fn refused_hello_reaches_the_tagger() {
    let (dir, l) = listener();
    let path = dir.path().join("usm.sock");
    let daemon = std::thread::spawn(move || {
        let peer = server::accept(&l).unwrap();
        peer.refuse(
            RefusalReason::NotConfigured,
            "no process rule for unit-test",
        )
        .unwrap();
    });
    let session = client::connect(&path).unwrap();
    let fd = some_fd();
    let err = session
        .hello(std::process::id(), "unit-test", fd.as_fd())
        .unwrap_err();
    match err {
        ProtoError::Refused { reason, text } => {
            assert_eq!(reason, RefusalReason::NotConfigured);
            assert!(text.contains("no process rule"));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    daemon.join().unwrap();
}

#[test]
fn malformed_and_dishonest_peers_are_refused_and_the_listener_keeps_serving() {
    let (dir, l) = listener();
    let path = dir.path().join("usm.sock");

    // 1. Garbage bytes.
    let c = Channel::connect(&path).unwrap();
    c.send_bytes(b"GET / HTTP/1.0\r\n\r\n", None, 0).unwrap();
    let err = server::accept(&l).unwrap_err();
    assert!(err.is_peer_fault(), "{err}");
    assert!(
        matches!(err, ProtoError::Decode(DecodeError::BadMagic { .. })),
        "{err}"
    );
    match c.recv().unwrap() {
        Message::Refused { reason, text } => {
            assert_eq!(reason, RefusalReason::Malformed);
            assert!(text.contains("bad magic"), "{text}");
        }
        other => panic!("{other:?}"),
    }

    // 2. A valid Hello without its userfaultfd.
    let c = Channel::connect(&path).unwrap();
    c.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        name: "nofd".into(),
    })
    .unwrap();
    let err = server::accept(&l).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::BadFdCount {
                expected: 1,
                count: 0,
                ..
            }
        ),
        "{err}"
    );

    // 3. A Hello that lies about its pid.
    let c = Channel::connect(&path).unwrap();
    let fd = some_fd();
    c.send_with_fd(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id() + 1,
            name: "liar".into(),
        },
        fd.as_fd(),
    )
    .unwrap();
    let err = server::accept(&l).unwrap_err();
    assert!(matches!(err, ProtoError::PidMismatch { .. }), "{err}");
    match c.recv().unwrap() {
        Message::Refused { reason, .. } => assert_eq!(reason, RefusalReason::Credentials),
        other => panic!("{other:?}"),
    }

    // 4. Something other than Hello first.
    let c = Channel::connect(&path).unwrap();
    c.send(&Message::Bye).unwrap();
    let err = server::accept(&l).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::Unexpected {
                expected: "Hello",
                ..
            }
        ),
        "{err}"
    );

    // 5. A future protocol version.
    let c = Channel::connect(&path).unwrap();
    let mut bytes = usm_proto::wire::encode_to_vec(&Message::Bye).unwrap();
    bytes[4] = 2;
    c.send_bytes(&bytes, None, 0).unwrap();
    let err = server::accept(&l).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::Decode(DecodeError::UnsupportedVersion { found: 2 })
        ),
        "{err}"
    );
    match c.recv().unwrap() {
        Message::Refused { reason, .. } => assert_eq!(reason, RefusalReason::VersionMismatch),
        other => panic!("{other:?}"),
    }

    // 6. The listener still admits an honest tagger.
    let honest = std::thread::spawn(move || {
        let s = client::connect(&path).unwrap();
        let fd = some_fd();
        s.hello(std::process::id(), "honest", fd.as_fd()).unwrap()
    });
    let peer = server::accept(&l).unwrap();
    assert_eq!(peer.name, "honest");
    peer.ack(1, "p").unwrap();
    assert_eq!(honest.join().unwrap().policy, "p");
}

#[test]
fn oversized_datagram_is_truncation_not_a_message() {
    let (a, b) = Channel::pair().unwrap();
    a.send_bytes(&vec![0u8; usm_proto::wire::MAX_MESSAGE_LEN + 1], None, 0)
        .unwrap();
    assert!(matches!(b.recv(), Err(ProtoError::Truncated)));
    // A descriptor where none is expected is refused (and closed).
    let fd = some_fd();
    a.send_with_fd(&Message::Bye, fd.as_fd()).unwrap();
    assert!(matches!(
        b.recv(),
        Err(ProtoError::BadFdCount {
            expected: 0,
            count: 1,
            ..
        })
    ));
}

#[test]
fn silent_peer_times_out_instead_of_wedging() {
    let (dir, l) = listener();
    let _c = Channel::connect(&dir.path().join("usm.sock")).unwrap();
    let stream = l.accept_channel().unwrap();
    stream
        .set_recv_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let err = stream.recv().unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

#[test]
fn uid_rule() {
    assert!(server::uid_allowed(1000, 1000));
    assert!(server::uid_allowed(1000, 0));
    assert!(!server::uid_allowed(0, 1000));
    assert!(!server::uid_allowed(1001, 1000));
}
