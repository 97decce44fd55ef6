//! The daemon refuses bad configs and malformed socket messages with clear errors and
//! keeps serving; `usm mkswap` refuses foreign data; several daemons run side by side.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use usm_proto::{Channel, Message};

mod common;

use common::daemon::{RunDaemon, USM};

fn write_cfg(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("usm.cfg");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn bad_configs_are_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "memory 100\nworkres 2\n",
            "usm.cfg:2: unknown directive `workres`",
        ),
        ("memory 100\nprocess redis nosuchpolicy\n", "config line 2"),
        ("memory 0\n", "usm.cfg:1:"),
    ];
    for (body, want) in cases {
        let cfg = write_cfg(dir.path(), body);
        let out = Command::new(USM).arg("run").arg(&cfg).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{body:?}: {err}");
        assert!(err.contains(want), "{body:?}: expected {want:?} in {err}");
        let out = Command::new(USM)
            .arg("check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
    }
    let err = String::from_utf8_lossy(
        &Command::new(USM)
            .arg("check-config")
            .arg(write_cfg(dir.path(), "process redis nosuchpolicy\n"))
            .output()
            .unwrap()
            .stderr,
    )
    .into_owned();
    assert!(err.contains("first-fit"), "lists the known policies: {err}");
}

fn userfaultfd() -> std::os::fd::OwnedFd {
    usm_kmod::RawUserfaultfd::open(usm_kmod::OpenFlags::default())
        .expect("open a userfaultfd")
        .into_fd()
}

#[test]
fn malformed_messages_are_refused_and_the_daemon_keeps_serving() {
    let d = RunDaemon::start_with(
        "memory 1024\nworkers 1\nprocess daemon_protocol first-fit",
        Stdio::null(),
    );
    // Garbage instead of a Hello: refused with a reason.
    let ch = Channel::connect(&d.socket).unwrap();
    ch.send_bytes(b"this is not a USM message", None, 0)
        .unwrap();
    match ch.recv() {
        Ok(Message::Refused { text, .. }) => assert!(text.contains("magic"), "{text}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    // A Hello without its userfaultfd.
    let ch = Channel::connect(&d.socket).unwrap();
    ch.send(&Message::Hello {
        version: usm_proto::PROTOCOL_VERSION,
        pid: std::process::id(),
        name: "daemon_protocol".into(),
    })
    .unwrap();
    assert!(matches!(ch.recv(), Ok(Message::Refused { .. })));
    // A proper session; then a malformed message inside it: logged, counted, refused,
    // and the session goes on.
    let uffd = userfaultfd();
    let session = usm_proto::client::connect(&d.socket).unwrap();
    let adm = session
        .hello(std::process::id(), "daemon_protocol", uffd.as_fd())
        .expect("a configured process is acked");
    assert_eq!(adm.policy, "first-fit");
    session
        .channel()
        .send_bytes(
            b"USMP\x01\x00\x63\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            None,
            0,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = d.stat().unwrap();
        if s["bad_messages"].as_u64().unwrap() >= 1 {
            assert_eq!(s["processes"].as_array().unwrap().len(), 1, "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "malformed message not counted: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // An unconfigured name is refused as NotConfigured.
    let uffd2 = userfaultfd();
    let other = usm_proto::client::connect(&d.socket).unwrap();
    match other.hello(std::process::id(), "not-in-config", uffd2.as_fd()) {
        Err(usm_proto::ProtoError::Refused { reason, .. }) => {
            assert_eq!(reason, usm_proto::RefusalReason::NotConfigured)
        }
        other => panic!("expected NotConfigured, got {other:?}"),
    }
    let s = d.stat().unwrap();
    assert!(s["refused"].as_u64().unwrap() >= 3, "{s}");
}

#[test]
fn two_daemons_run_side_by_side() {
    let a = RunDaemon::start_with(
        "memory 512\nworkers 1\nwaker busy-poll\nprocess a first-fit",
        Stdio::null(),
    );
    let b = RunDaemon::start_with("memory 1024\nworkers 1\nprocess b first-fit", Stdio::null());
    let (sa, sb) = (a.stat().unwrap(), b.stat().unwrap());
    assert_eq!(sa["pool_pages"], 512);
    assert_eq!(sb["pool_pages"], 1024);
    // `usm stat` reports each daemon's waker (the config's, default eventfd).
    assert_eq!(sa["waker"], "spin", "{sa}");
    assert_eq!(sb["waker"], "eventfd", "{sb}");
    assert_ne!(sa["pid"], sb["pid"]);
    // A second daemon on a live socket is refused.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_cfg(
        dir.path(),
        &format!("memory 64\nsocket {}\n", a.socket.display()),
    );
    let out = Command::new(USM).arg("run").arg(&cfg).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Address already in use"));
}

#[test]
fn mkswap_creates_and_refuses_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("swap.img");
    let out = Command::new(USM)
        .args(["mkswap", "--size", "16M"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 16 << 20);
    // Re-formatting a USM swap file is fine.
    assert!(
        Command::new(USM)
            .arg("mkswap")
            .arg(&p)
            .status()
            .unwrap()
            .success()
    );
    // A file with other data is refused without --force.
    let f = dir.path().join("data.bin");
    std::fs::write(&f, vec![0x42u8; 8 << 20]).unwrap();
    let out = Command::new(USM).arg("mkswap").arg(&f).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(
        Command::new(USM)
            .args(["mkswap", "--force"])
            .arg(&f)
            .status()
            .unwrap()
            .success()
    );
    // No size for a new file: a clear error.
    let out = Command::new(USM)
        .arg("mkswap")
        .arg(dir.path().join("new.img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
