//! A policy of one's own without a fork: `examples/evict_policy.rs` is a complete `usm`
//! (`usm_runtime::cli::main_with`) with the eviction policy `random`. Built here as a user
//! would build it, it runs a real program (Debian's python3, a working set three times the
//! pool, every byte checked) under `exec` with `evict random`, and the policy is the one
//! that chose the victims. Needs root (userfaultfd on another process) and python3
//! (`scripts/test` installs it).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::daemon::USM;
use common::programs::{tagger, target_profile_dir};

/// Builds the example next to `usm` (cargo builds no example for an integration test).
fn example() -> PathBuf {
    let dir = target_profile_dir();
    let target = dir.parent().unwrap();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "usm-runtime",
        "--example",
        "evict_policy",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build --example evict_policy");
    assert!(st.success());
    let bin = dir.join("examples/evict_policy");
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// 24 MiB, page by page: the page number in the first 8 bytes, then a byte pattern of
/// the page; written, then every byte compared. Prints `bad N`.
const PROGRAM: &str = "
N = 24 << 20
PAGES = N // 4096
def page(p):
    return p.to_bytes(8, 'little') + bytes([(p * 31 + 7) & 255]) * 4088
b = bytearray(N)
for p in range(PAGES):
    b[p * 4096:(p + 1) * 4096] = page(p)
print('bad', sum(1 for p in range(PAGES) if b[p * 4096:(p + 1) * 4096] != page(p)))
";

#[test]
fn a_usm_built_with_main_with_runs_a_program_under_its_own_eviction_policy() {
    let python = "/usr/bin/python3";
    assert!(
        std::path::Path::new(python).exists(),
        "{python} missing: scripts/test installs python3"
    );
    let example = example();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("random.cfg");
    std::fs::write(&cfg, "evict random\n").unwrap();

    // The name is the example's: plain `usm` refuses it, the example accepts it.
    let plain = Command::new(USM)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("unknown policy `random`"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let check = Command::new(&example)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("evict random"));

    let mut child = Command::new(&example)
        .arg("exec")
        .arg("--config")
        .arg(&cfg)
        .args([
            "--pool", "8M", "--report", "json", "--", python, "-c", PROGRAM,
        ])
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", std::env::temp_dir())
        .env("USM_LOG", "warn,evict_policy=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a hang is a failure, not a stuck test run.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(300));
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let _ = child.stdin.take();
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let describe = format!("exit {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status);
    assert_eq!(out.status.code(), Some(0), "{describe}");
    assert_eq!(stdout.trim(), "bad 0", "{describe}");
    let report: serde_json::Value = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary: {describe}"));
    assert_eq!(report["managed"], true, "{describe}");
    assert!(report["evictions"].as_u64().unwrap() > 0, "{describe}");
    assert!(report["swapins"].as_u64().unwrap() > 0, "{describe}");
    assert_eq!(report["slots_used_at_exit"], 0, "{describe}");
    // The victims were the example policy's: its own log line says so.
    assert!(
        stderr.contains("random: first victims chosen"),
        "{describe}"
    );
}
