//! `usm check-config` reports exactly the config errors `usm run` would: machine limits
//! (`memory` vs physical RAM, `workers` vs online cores), files that are not configs
//! (`/dev/zero`, a FIFO), and each error names the file, the line and the token.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const USM: &str = env!("CARGO_BIN_EXE_usm");

fn usm(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(USM)
        .args(args)
        .output()
        .expect("run the usm binary")
}

/// Runs `usm check-config FILE` and `usm run FILE` and returns each one's error line.
fn both(file: &Path) -> (String, String) {
    let check = usm(&["check-config".as_ref(), file.as_os_str()]);
    let run = usm(&["run".as_ref(), file.as_os_str()]);
    let err = |o: &Output, what: &str| {
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{what} {}: {text}",
            file.display()
        );
        text.lines()
            .find(|l| l.starts_with("usm: "))
            .unwrap_or_else(|| panic!("{what}: no `usm:` line in {text:?}"))
            .to_owned()
    };
    (err(&check, "check-config"), err(&run, "run"))
}

#[test]
fn check_config_and_run_refuse_the_same_configs_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cases = [
        (
            format!("memory 100\nworkers {}\n", 65.max(cores + 1)),
            ":2: bad value `",
        ),
        (
            format!("memory {}\n", u64::MAX),
            ":1: bad value `18446744073709551615` for `memory`",
        ),
        (
            "memory 100\n\n# c\nmemory 5\n".into(),
            ":4: `memory` given twice (first on line 1)",
        ),
        (
            "memory 100\nprocess bad\u{1b}]0;x first-fit\n".into(),
            ":2: `bad\\u{1b}]0;x` holds a control",
        ),
        (
            "memory 100\nwatermarks 10 200\n".into(),
            ":2: bad value `200` for `watermarks`",
        ),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.cfg"));
        std::fs::write(&path, body).unwrap();
        let (check, run) = both(&path);
        assert_eq!(check, run, "{body:?}");
        let want = format!("usm: {}{want}", path.display());
        assert!(
            check.starts_with(&want),
            "{body:?}: expected {want:?}, got {check:?}"
        );
        assert!(!check.contains(":0:"), "{check}");
    }
}

#[test]
fn devices_and_fifos_are_refused_at_once() {
    let (check, run) = both(Path::new("/dev/zero"));
    assert_eq!(check, run);
    assert_eq!(
        check,
        "usm: /dev/zero: not a regular file (a character device); a config must be a regular file"
    );

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("cfg.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let t = Instant::now();
    let (check, run) = both(&fifo);
    assert!(t.elapsed() < Duration::from_secs(60), "waited on the FIFO");
    assert_eq!(check, run);
    assert!(
        check.ends_with("not a regular file (a FIFO); a config must be a regular file"),
        "{check}"
    );
}

/// A 10 MB config of `process` lines: `check-config` validates every rule (policy names
/// against the registry) and finishes; the bound is generous, the old parser took minutes.
#[test]
fn a_ten_megabyte_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.cfg");
    let mut text = String::from("memory 100\npolicy first-fit\n");
    let mut i = 0;
    while text.len() < 10 << 20 {
        text.push_str(&format!("process some-program-name-{i:09} first-fit\n"));
        i += 1;
    }
    std::fs::write(&path, &text).unwrap();
    let t = Instant::now();
    let out = usm(&["check-config".as_ref(), path.as_os_str()]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(60), "check-config took {took:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.matches("\nprocess ").count(), i);
}

/// A swap device `usm run` would refuse (not formatted by `usm mkswap`) is refused by
/// `check-config` too, naming its line; a formatted one passes.
#[test]
fn swap_devices_are_checked_like_run_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0x5a; 1 << 20]).unwrap();
    let cfg = dir.path().join("swap.cfg");
    std::fs::write(
        &cfg,
        format!(
            "memory 1024\nworkers 1\nswap {} priority 3\nsocket {}\n",
            raw.display(),
            dir.path().join("u.sock").display()
        ),
    )
    .unwrap();
    let check = usm(&["check-config".as_ref(), cfg.as_os_str()]);
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    let want = format!("usm: {}:3: swap device: ", cfg.display());
    assert!(err.starts_with(&want), "expected {want:?} in {err}");
    let reason = err.trim_end().strip_prefix(&want).unwrap().to_owned();
    let run = usm(&["run".as_ref(), cfg.as_os_str()]);
    let run_err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{run_err}");
    assert!(
        run_err.contains(&reason),
        "run said {run_err:?}, check-config {reason:?}"
    );

    // Formatted by `usm mkswap`: accepted.
    let good = dir.path().join("good.img");
    let mk = usm(&[
        "mkswap".as_ref(),
        good.as_os_str(),
        "--size".as_ref(),
        "16M".as_ref(),
    ]);
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    std::fs::write(&cfg, format!("memory 1024\nswap {}\n", good.display())).unwrap();
    let check = usm(&["check-config".as_ref(), cfg.as_os_str()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn exec_flags_get_the_config_files_limits() {
    // More pool than this machine has, and more workers than cores: refused before any
    // daemon starts (the config file's `memory` and `workers` lines get the same checks).
    let huge = usm(&["exec", "--pool", "65536G", "--", "true"].map(std::ffi::OsStr::new));
    let err = String::from_utf8_lossy(&huge.stderr);
    assert_eq!(huge.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--pool") && err.contains("physical memory"),
        "{err}"
    );
    let many = usm(&["exec", "--workers", "65", "--", "true"].map(std::ffi::OsStr::new));
    let err = String::from_utf8_lossy(&many.stderr);
    assert_eq!(many.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--workers 65") && err.contains("online cores"),
        "{err}"
    );
}
