//! Unmodified Debian programs under the tagger: redis-server (jemalloc, which maps
//! through the exported `mmap`) and stressapptest (`memalign`). Each test skips with a
//! printed reason when the program is not installed (`.ci/run` installs both).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use usm_sync::atomic::Ordering;

use support::*;
use usm_proto::Message;

fn installed(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn coverage_of(served: &Served) -> (u64, u64) {
    served.stream.send(&Message::CoverageRequest).unwrap();
    match served.wait_for("Coverage", |m| matches!(m, Message::Coverage { .. })) {
        Message::Coverage {
            managed_anon_bytes,
            anon_bytes,
        } => (managed_anon_bytes, anon_bytes),
        _ => unreachable!(),
    }
}

fn redis_cli(sock: &Path, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-s")
        .arg(sock)
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn redis_server_with_jemalloc_is_covered() {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    let Some(redis) = installed("redis-server") else {
        panic!("redis-server is not installed (scripts/test installs redis-server redis-tools)");
    };
    assert!(
        installed("redis-cli").is_some(),
        "redis-cli is not installed (scripts/test installs redis-tools)"
    );
    let tagger = tagger_so();
    let daemon = TestDaemon::new();
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("redis.sock");
    let mut child = Command::new(&redis)
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .args(["--enable-debug-command", "yes", "--unixsocket"])
        .arg(&sock)
        .arg("--dir")
        .arg(work.path())
        .env("LD_PRELOAD", &tagger)
        .env("USM_SOCKET", daemon.socket())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let served = daemon.accept_and_serve();
    assert_eq!(served.name, "redis-server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "redis did not open its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        redis_cli(&sock, &["DEBUG", "POPULATE", "300000", "key", "100"]),
        "OK"
    );
    assert_eq!(redis_cli(&sock, &["DBSIZE"]), "300000");
    let value = redis_cli(&sock, &["GET", "key:123456"]);
    assert!(value.starts_with("value:123456"), "{value}");
    let (managed, anon) = coverage_of(&served);
    let ratio = managed as f64 / anon as f64;
    eprintln!("redis-server coverage: {managed} / {anon} = {ratio:.4}");
    assert!(
        anon > 40 << 20,
        "redis should hold > 40 MiB after POPULATE, has {anon}"
    );
    assert!(ratio >= 0.90, "redis coverage {ratio:.3} below 90%");
    assert!(served.faults.stats.faults.load(Ordering::Relaxed) > 5_000);
    let _ = Command::new("redis-cli")
        .arg("-s")
        .arg(&sock)
        .args(["SHUTDOWN", "NOSAVE"])
        .output();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status:?} {err}");
    assert!(!err.contains("usm-tagger"), "{err}");
    served.faults.stop();
}

#[test]
fn stressapptest_passes_and_is_covered() {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    let Some(sat) = installed("stressapptest") else {
        panic!("stressapptest is not installed (scripts/test installs it)");
    };
    let tagger = tagger_so();
    let daemon = TestDaemon::new();
    let child = Command::new(&sat)
        .args(["-M", "96", "-s", "4", "-m", "2", "-C", "1", "-W"])
        .env("LD_PRELOAD", &tagger)
        .env("USM_SOCKET", daemon.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let served = daemon.accept_and_serve();
    assert_eq!(served.name, "stressapptest");
    // Sample coverage while it runs (its 96 MiB are allocated in the first second).
    std::thread::sleep(Duration::from_millis(2500));
    let (managed, anon) = coverage_of(&served);
    let ratio = managed as f64 / anon as f64;
    eprintln!("stressapptest coverage: {managed} / {anon} = {ratio:.4}");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Status: PASS"), "{stdout}");
    assert!(
        anon > 90 << 20,
        "stressapptest -M 96 holds {anon} anonymous bytes"
    );
    assert!(ratio >= 0.90, "stressapptest coverage {ratio:.3} below 90%");
    served.faults.stop();
}
