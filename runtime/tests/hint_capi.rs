//! The C hint API on a real program under `usm exec --pool`: `usm_hint(addr, hint)` as
//! USM documents it and `usm_hint_range`, checked by `libusm` with the daemon's parser
//! (`-EINVAL` and `errno` for a refused hint), counted in `usm exec`'s summary, and
//! acting in the daemon as embedded: an `EVICTION=DENY` mapping stays resident while a
//! working set four times the pool swaps around it (and is evicted without the hint),
//! and `PREFETCH=8` on that working set reads pages back ahead of its faults. A hint
//! follows its mapping through `mremap` and is forgotten with `munmap`.
//!
//! The program is `tests/programs/hint_deny.c`, compiled with gcc against
//! `include/usm.h` and `libusm.so` exactly as `runtime/capi/README.md` says (`-L`,
//! `-Wl,-rpath`, `-lusm`). Needs root-like privileges (the daemon's `EVENT_FORK`); skips
//! with a reason without gcc.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

mod common;

use common::programs::{ExecRun, require, target_profile_dir, usm_exec};

/// `libusm.so`, built next to `usm` (cargo does not build another package's cdylib for
/// integration tests).
fn libusm() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_profile_dir();
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "--quiet", "-p", "usm-capi"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd
                .env("CARGO_TARGET_DIR", dir.parent().unwrap())
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build -p usm-capi");
            assert!(st.success(), "cargo build -p usm-capi");
            let so = dir.join("libusm.so");
            assert!(so.exists(), "{} missing", so.display());
            so
        })
        .clone()
}

/// `tests/programs/hint_deny.c` linked with `libusm.so`.
fn hint_deny(dir: &Path) -> PathBuf {
    require("gcc");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = libusm();
    let libdir = lib.parent().unwrap();
    let out = dir.join("hint_deny");
    let st = Command::new("gcc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(manifest.join("tests/programs/hint_deny.c"))
        .arg(format!("-I{}", manifest.join("capi/include").display()))
        .arg(format!("-L{}", libdir.display()))
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-lusm")
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc failed on hint_deny.c");
    out
}

/// `(resident, total)` pages of `name` (`d` or `w`) from the program's output.
fn resident(r: &ExecRun, name: &str) -> (u64, u64) {
    let field = r
        .stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}_resident=")))
        .unwrap_or_else(|| panic!("no {name}_resident in the output\n{}", r.describe()));
    let (n, of) = field.split_once('/').unwrap();
    (n.parse().unwrap(), of.parse().unwrap())
}

#[test]
fn eviction_deny_from_usm_hint_keeps_a_mapping_resident_under_usm_exec() {
    let dir = tempfile::tempdir().unwrap();
    let prog = hint_deny(dir.path());
    let p = prog.to_str().unwrap();
    // D = 4 MiB, written first; W = 32 MiB (4x the pool), written and read twice.
    let denied = usm_exec(
        &["--pool", "8M"],
        &[p, "deny", "4", "32"],
        Duration::from_secs(120),
    );
    let plain = usm_exec(
        &["--pool", "8M"],
        &[p, "plain", "4", "32"],
        Duration::from_secs(120),
    );
    let moved = usm_exec(
        &["--pool", "8M"],
        &[p, "moved", "4", "32"],
        Duration::from_secs(120),
    );
    let unmapped = usm_exec(
        &["--pool", "8M"],
        &[p, "unmapped", "4", "32"],
        Duration::from_secs(120),
    );
    for r in [&denied, &plain, &moved, &unmapped] {
        assert_eq!(r.code, 0, "{}", r.describe());
        assert!(
            r.stdout.contains("hints ok") && r.stdout.contains("OK\n"),
            "{}",
            r.describe()
        );
        assert!(r.report["evictions"].as_u64() > Some(0), "{}", r.describe());
    }
    let (d_denied, d_pages) = resident(&denied, "d");
    let (w_denied, w_pages) = resident(&denied, "w");
    let (d_plain, _) = resident(&plain, "d");
    eprintln!(
        "DENY: D {d_denied}/{d_pages} resident, W {w_denied}/{w_pages}, {} prefetches; \
         no hint: D {d_plain}/{d_pages}, {} prefetches",
        denied.report["prefetches"], plain.report["prefetches"]
    );
    // With the hint every page of D stayed while W swapped around it.
    assert_eq!(d_denied, d_pages, "{}", denied.describe());
    assert!(w_denied < w_pages / 2, "{}", denied.describe());
    // Without it D is the oldest and goes first: the hint is what kept it.
    assert!(d_plain < d_pages / 2, "{}", plain.describe());
    // The hint moved with the mapping; a new mapping where a hinted one was has none
    // (that run has W's PREFETCH=8 too: prefetching is not what keeps D resident).
    let (d_moved, _) = resident(&moved, "d");
    let (d_unmapped, _) = resident(&unmapped, "d");
    eprintln!("moved: D {d_moved}/{d_pages}; unmapped and mapped again: D {d_unmapped}/{d_pages}");
    assert_eq!(d_moved, d_pages, "{}", moved.describe());
    assert!(d_unmapped < d_pages / 2, "{}", unmapped.describe());

    // The summary counts what the daemon accepted and refused: libusm refused three
    // hints; the two with readable text ("cold", "EVICTION=NEVER") reached the daemon and
    // were refused there too (an empty range never leaves libusm).
    assert_eq!(denied.report["hints_accepted"], 2, "{}", denied.describe());
    assert_eq!(denied.report["hints_refused"], 2, "{}", denied.describe());
    assert_eq!(plain.report["hints_accepted"], 0, "{}", plain.describe());
    assert_eq!(plain.report["hints_refused"], 2, "{}", plain.describe());
    // PREFETCH=8 on W: its swap-ins read neighbours back; nothing does without it.
    assert!(
        denied.report["prefetches"].as_u64() > Some(0),
        "{}",
        denied.describe()
    );
    assert_eq!(plain.report["prefetches"], 0, "{}", plain.describe());
    assert!(
        denied.stderr.contains("hint \"cold\" refused"),
        "the daemon says why\n{}",
        denied.describe()
    );
}
