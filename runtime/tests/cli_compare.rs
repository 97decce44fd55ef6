//! `usm compare` end to end, as root on the real kernel: a C program touching 64 MiB in a
//! 32 MiB budget runs under USM (private daemon, tagger) and under the kernel (memory
//! cgroup + kernel swap file); the report names both sides, and afterwards no cgroup, no
//! active swap and no swap file of ours remain — also when SIGINT arrives mid-run.

#![deny(unsafe_code)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::USM;
use common::programs::{build_c, tagger};
use serde_json::Value;
use usm_sync::Mutex;

/// The tests share /proc/swaps and the cgroup tree: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (memory cgroup, swapon)"
    );
}

/// Where our cgroups are made (v2 root, or our own v1 memory cgroup).
fn cgroup_base() -> PathBuf {
    usm_runtime::baseline::cgroup_base_dir().unwrap().1
}

/// Our leftovers: `usm-baseline-*` cgroups, swap files in `dir`, active swaps in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let ours = |name: &str| name.starts_with(usm_runtime::baseline::NAME_PREFIX);
    for d in [cgroup_base(), dir.to_path_buf()] {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if ours(&n) {
                    found.push(e.path().display().to_string());
                }
                // USM's own private swap file (`usm exec`'s daemon) must be gone too.
                if n.starts_with("usm-swap-") && d == dir {
                    found.push(e.path().display().to_string());
                }
            }
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    for l in swaps.lines().skip(1) {
        if l.starts_with(&dir.display().to_string()) {
            found.push(format!("active swap: {l}"));
        }
    }
    found
}

fn compare_cmd(swap_dir: &Path, prog: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(USM);
    cmd.arg("compare")
        .args(["--pool", "32M", "--swap-size", "256M"])
        .args(extra)
        .arg("--")
        .arg(prog)
        .args(["64", "3"])
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", swap_dir);
    cmd
}

#[test]
fn compare_prints_both_sides_and_leaves_nothing() {
    need_root();
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let prog = build_c(work.path(), "compare_touch");
    let swap_dir = work.path().join("swap");
    let swaps_before = std::fs::read_to_string("/proc/swaps").unwrap();

    // Human: one line on stdout.
    let out = compare_cmd(&swap_dir, &prog, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stdout}\n{stderr}");
    for part in [
        "usm/kernel",
        "wall time",
        "throughput",
        "major faults",
        "peak memory",
        "kernel ",
    ] {
        assert!(lines[0].contains(part), "{part:?} missing in {}", lines[0]);
    }
    assert!(
        lines[0].contains("ops/s"),
        "throughput not found: {}",
        lines[0]
    );
    assert!(
        leftovers(&swap_dir).is_empty(),
        "{:?}",
        leftovers(&swap_dir)
    );

    // JSON, two interleaved runs per side.
    let out = compare_cmd(&swap_dir, &prog, &["--report", "json", "--runs", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("stdout is one JSON object");
    let order: Vec<&str> = v["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(order, ["kernel", "usm", "usm", "kernel"]);
    for side in ["kernel", "usm"] {
        let runs = v[side]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{side}: {v}");
        for r in runs {
            assert_eq!(r["exit_code"], 0, "{side}: {r}");
            assert!(r["wall_s"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["throughput"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["peak_bytes"].as_u64().unwrap() > 0, "{r}");
        }
    }
    // 64 MiB in a 32 MiB budget: both sides swap.
    for r in v["kernel"]["runs"].as_array().unwrap() {
        assert!(
            r["major_faults"].as_u64().unwrap() > 0,
            "kernel did not swap: {r}"
        );
        assert!(
            r["peak_bytes"].as_u64().unwrap() <= (32 << 20) + (1 << 20),
            "kernel side over its budget: {r}"
        );
    }
    for r in v["usm"]["runs"].as_array().unwrap() {
        assert_eq!(r["usm_exec"]["managed"], true, "{r}");
        assert!(
            r["usm_exec"]["evictions"].as_u64().unwrap() > 0,
            "USM did not evict: {r}"
        );
        assert!(
            r["major_faults"].as_u64().unwrap() > 0,
            "USM did not swap in: {r}"
        );
    }
    let ratios = &v["ratios_usm_vs_kernel"];
    for k in ["wall_time", "throughput", "major_faults", "peak_memory"] {
        assert!(ratios[k].as_f64().unwrap() > 0.0, "{k}: {ratios}");
    }
    assert!(
        leftovers(&swap_dir).is_empty(),
        "{:?}",
        leftovers(&swap_dir)
    );
    assert_eq!(
        std::fs::read_to_string("/proc/swaps").unwrap(),
        swaps_before
    );
}

#[test]
fn bad_input_is_refused_before_anything_changes() {
    let out = Command::new(USM)
        .args(["compare", "--pool", "lots", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pool"));
    let out = Command::new(USM)
        .args([
            "compare",
            "--pool",
            "32M",
            "--throughput-regex",
            "(",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--throughput-regex"));
}

#[test]
fn sigint_mid_run_undoes_everything() {
    need_root();
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let prog = build_c(work.path(), "compare_touch");
    let swap_dir = work.path().join("swap");
    let swaps_before = std::fs::read_to_string("/proc/swaps").unwrap();
    // Many passes: the kernel side (first) runs for a while.
    let mut cmd = Command::new(USM);
    cmd.arg("compare")
        .args(["--pool", "32M", "--swap-size", "256M", "--runs", "2", "--"])
        .arg(&prog)
        .args(["64", "1000000"])
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", &swap_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Wait until the kernel side is set up: its cgroup and its swap file exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    while leftovers(&swap_dir).len() < 3 {
        assert!(Instant::now() < deadline, "kernel side never started");
        assert!(child.try_wait().unwrap().is_none(), "compare ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert!(
        leftovers(&swap_dir).is_empty(),
        "{:?}",
        leftovers(&swap_dir)
    );
    assert_eq!(
        std::fs::read_to_string("/proc/swaps").unwrap(),
        swaps_before
    );
    let journal: Vec<_> = std::fs::read_dir(usm_runtime::baseline::JOURNAL_DIR)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&child.id().to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(journal.is_empty(), "journal records left: {journal:?}");
}
