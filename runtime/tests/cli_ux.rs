//! What a user of `usm` sees, on a real daemon with real programs: `usm exec`'s start line
//! (daemon pid, pool, swap file, socket, metrics) and its sparse private swap file;
//! `usm stat --pid` finding the daemon of a program; `--json` lines with their time and
//! the interval's rates; the Prometheus exposition (histogram, daemon-wide counters,
//! `build_info`), also from a config's `metrics` line; and `scripts/install` into a temp
//! prefix whose `usm` finds its own tagger, completions and manual pages. Needs root
//! (`/dev/userfaultfd`, `/run/usm`) and gcc.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::USM;
use common::programs::{build_c, tagger, target_profile_dir, usm_exec};

/// A `usm exec` running in the background, its stderr in a file.
struct Running {
    child: Child,
    err: PathBuf,
    _dir: tempfile::TempDir,
    swap_dir: PathBuf,
}

impl Running {
    /// `usm exec ARGS -- CMD` with its private swap file in a fresh directory on disk.
    fn start(args: &[&str], cmd: &[&OsLike]) -> Running {
        let dir = disk_tempdir();
        let swap_dir = dir.path().join("swap");
        std::fs::create_dir(&swap_dir).unwrap();
        let err = dir.path().join("err");
        let child = Command::new(USM)
            .arg("exec")
            .args(args)
            .arg("--")
            .args(cmd.iter().map(|c| c.as_os()))
            .env("USM_TAGGER", tagger())
            .env("USM_SWAP_DIR", &swap_dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("run usm exec");
        Running {
            child,
            err,
            _dir: dir,
            swap_dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The start line (waits for it).
    fn start_line(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self
                .stderr()
                .lines()
                .find(|l| l.starts_with("usm: private daemon pid "))
            {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no start line; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The program's pid (the only child of `usm exec`), once it runs.
    fn program_pid(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let me = self.child.id();
        loop {
            let kids = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
                .unwrap_or_default();
            if let Some(pid) = kids.split_whitespace().next() {
                return pid.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "usm exec started no program");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `usm exec` to end; returns its exit code.
    fn wait(mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code().unwrap_or(-1), self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "usm exec did not end; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program argument: a path or a string.
enum OsLike {
    P(PathBuf),
    S(&'static str),
}

impl OsLike {
    fn as_os(&self) -> &std::ffi::OsStr {
        match self {
            OsLike::P(p) => p.as_os_str(),
            OsLike::S(s) => std::ffi::OsStr::new(s),
        }
    }
}

/// A temp dir on a disk file system (the swap file needs `O_DIRECT`).
fn disk_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("usm-cli-test-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "these tests need root (/dev/userfaultfd, /run/usm)"
    );
}

/// The workload program: 4 threads rewriting and verifying `mb` MiB for `secs` seconds.
fn storm(dir: &Path, mb: &'static str, secs: &'static str) -> Vec<OsLike> {
    let prog = build_c(dir, "daemon_workload");
    vec![
        OsLike::P(prog),
        OsLike::S("storm"),
        OsLike::S(mb),
        OsLike::S(secs),
    ]
}

/// `field VALUE` out of the start line, VALUE up to the next `,`/`;`/` (`.
fn after<'a>(line: &'a str, field: &str) -> &'a str {
    let rest = line
        .split_once(field)
        .unwrap_or_else(|| panic!("no {field:?} in {line:?}"))
        .1;
    rest.split([',', ';', ' ']).next().unwrap()
}

#[test]
fn exec_says_where_its_daemon_is_and_its_swap_file_is_sparse() {
    root();
    let progs = tempfile::tempdir().unwrap();
    let cmd = storm(progs.path(), "24", "3");
    let run = Running::start(&["--pool", "16M"], &cmd.iter().collect::<Vec<_>>());
    let line = run.start_line();
    let pid: u32 = after(&line, "daemon pid ")
        .trim_end_matches(':')
        .parse()
        .unwrap();
    assert_eq!(
        pid,
        run.child.id(),
        "the private daemon is usm exec itself: {line}"
    );
    assert!(line.contains("pool 16 MiB (4096 pages)"), "{line}");
    let socket = PathBuf::from(after(&line, "socket "));
    assert!(
        socket.starts_with("/run/usm") && socket.ends_with("usm.sock"),
        "{line}"
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "the socket the start line names is not there: {line}"
    );
    let swap = PathBuf::from(after(&line, "swap "));
    assert!(swap.starts_with(&run.swap_dir), "{line}");
    // The default size (64× the pool, at least 4 GiB, at most half the free space, never
    // under 8× the pool), as the start line says it.
    let mib: u64 = line
        .split_once(" MiB, sparse")
        .unwrap_or_else(|| panic!("no size in {line:?}"))
        .0
        .rsplit('(')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("size in {line:?}: {e}"));
    assert!(mib >= 8 * 16, "a swap file under 8× the pool: {line}");
    // Right after start the swap file holds (nearly) nothing: it is sparse, not written
    // full of zeros.
    let m = std::fs::metadata(&swap).unwrap();
    assert_eq!(m.len(), mib << 20, "{line}");
    assert!(
        m.blocks() * 512 < 8 << 20,
        "{} bytes of the swap file are allocated right after start",
        m.blocks() * 512
    );
    let (code, err) = run.wait();
    assert_eq!(code, 0, "{err}");
    assert!(!swap.exists(), "the private swap file outlived its daemon");
}

#[test]
fn stat_pid_finds_the_daemon_and_json_lines_carry_time_and_interval() {
    root();
    let progs = tempfile::tempdir().unwrap();
    // Long enough that the two JSON lines below fall inside the storm even when the
    // debug build starts slowly on a loaded machine (with 6 s, CI once read its second
    // line after the threads had finished: an interval without faults).
    let cmd = storm(progs.path(), "48", "15");
    let run = Running::start(&["--pool", "16M"], &cmd.iter().collect::<Vec<_>>());
    run.start_line();
    let prog = run.program_pid();
    // The human view of that program.
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let out = Command::new(USM)
            .args(["stat", "--pid", &prog.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("daemon_workload") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "usm stat --pid {prog}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        view.contains(&format!("usm daemon {}", run.child.id())),
        "{view}"
    );
    assert!(view.contains("policies: alloc first-fit"), "{view}");
    assert!(view.contains("MiB"), "{view}");
    // Two JSON lines a second apart: each with its time, the second with the interval.
    let mut watch = Command::new(USM)
        .args(["stat", "--json", "--watch", "1", "--pid", &prog.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for v in [&first, &second] {
        let ts = v["timestamp_ms"].as_i64().expect("timestamp_ms");
        assert!(
            (now_ms - ts).abs() < 30_000,
            "timestamp {ts} vs now {now_ms}"
        );
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(
            v["processes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pid"] == prog)
        );
    }
    assert!(first.get("interval").is_none());
    let i = &second["interval"];
    assert!(i["seconds"].as_f64().unwrap() >= 0.9, "{i}");
    assert!(
        i["faults_per_s"].as_f64().unwrap() > 0.0,
        "48 MiB rewritten through a 16 MiB pool faults every second: {i}"
    );
    assert!(i["fault_p50_us"].as_f64().unwrap() > 0.0, "{i}");
    assert!(
        second["timestamp_ms"].as_i64().unwrap() > first["timestamp_ms"].as_i64().unwrap(),
        "time goes forward"
    );
    // A pid no daemon serves is an error that says so.
    let out = Command::new(USM)
        .args(["stat", "--pid", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pid 1 is not served"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, err) = run.wait();
    assert_eq!(code, 0, "{err}");
}

/// `GET /metrics` from `addr`.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn value_of(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_have_a_latency_histogram_daemon_counters_and_build_info() {
    root();
    let progs = tempfile::tempdir().unwrap();
    let cmd = storm(progs.path(), "32", "3");
    // The flag, then the config's `metrics` line (which exec no longer drops).
    let cfg = progs.path().join("usm.cfg");
    std::fs::write(&cfg, "memory 4096\nmetrics 127.0.0.1:0\n").unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    for args in [
        vec!["--pool", "16M", "--metrics", "127.0.0.1:0"],
        vec!["--config", cfg.as_str()],
    ] {
        let run = Running::start(&args, &cmd.iter().collect::<Vec<_>>());
        let line = run.start_line();
        let addr = after(&line, "metrics on http://")
            .trim_end_matches("/metrics")
            .to_owned();
        // Wait for faults to show.
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = loop {
            let b = scrape(&addr);
            if b.contains("usm_faults_total") && value_of(&b, "usm_faults_total") > 0.0 {
                break b;
            }
            assert!(Instant::now() < deadline, "no faults in\n{b}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(
            body.contains("# TYPE usm_fault_latency_seconds histogram"),
            "{body}"
        );
        let count = value_of(&body, "usm_fault_latency_seconds_count");
        let inf = value_of(&body, "usm_fault_latency_seconds_bucket{le=\"+Inf\"}");
        let sum = value_of(&body, "usm_fault_latency_seconds_sum");
        assert!(count > 0.0 && inf == count, "{body}");
        assert!(
            sum > 0.0 && sum / count < 1.0,
            "the sum is in seconds: {sum} over {count} faults"
        );
        assert!(
            body.contains("# TYPE usm_process_fault_latency_seconds histogram"),
            "{body}"
        );
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            body.lines().any(|l| l.starts_with("usm_build_info{")
                && l.contains(&format!("version=\"{version}\""))
                && l.contains("commit=\"")
                && l.ends_with(" 1")),
            "{body}"
        );
        for counter in [
            "usm_evictions_total",
            "usm_swapins_total",
            "usm_zero_fills_total",
        ] {
            value_of(&body, counter);
        }
        let (code, err) = run.wait();
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn installed_usm_finds_its_tagger_completions_and_man_pages() {
    root();
    let prefix = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    tagger(); // built next to the usm under test
    let profile = target_profile_dir();
    let out = Command::new(repo.join("scripts/install"))
        .arg("--no-build")
        .args((profile.file_name().unwrap() == "debug").then_some("--debug"))
        .arg(prefix.path())
        .env("CARGO_TARGET_DIR", profile.parent().unwrap())
        .output()
        .expect("run scripts/install");
    assert!(
        out.status.success(),
        "scripts/install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p = prefix.path();
    let usm = p.join("bin/usm");
    assert!(p.join("lib/usm/libusm_tagger.so").is_file());
    let bash = std::fs::read_to_string(p.join("share/bash-completion/completions/usm")).unwrap();
    assert!(bash.contains("_usm") && bash.contains("exec"), "{bash}");
    assert!(p.join("share/zsh/site-functions/_usm").is_file());
    assert!(p.join("share/fish/vendor_completions.d/usm.fish").is_file());
    let man = std::fs::read_to_string(p.join("share/man/man1/usm.1")).unwrap();
    assert!(man.contains(".TH usm 1"), "{man}");
    let exec_man = std::fs::read_to_string(p.join("share/man/man1/usm-exec.1")).unwrap();
    assert!(exec_man.contains("metrics"), "{exec_man}");
    // --version names the commit.
    let v = Command::new(&usm).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&v.stdout).into_owned();
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo)
        .output()
        && head.status.success()
    {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        assert_eq!(
            v.trim(),
            format!("usm {} ({head})", env!("CARGO_PKG_VERSION"))
        );
    } else {
        assert!(v.starts_with("usm "), "{v}");
    }
    // The installed usm, with no USM_TAGGER, tags a program with the tagger it installed.
    let run = {
        let progs = tempfile::tempdir().unwrap();
        let prog = build_c(progs.path(), "daemon_workload");
        Command::new(&usm)
            .args(["exec", "--pool", "16M", "--report", "json", "--"])
            .arg(&prog)
            .args(["storm", "24", "1"])
            .env_remove("USM_TAGGER")
            .env("USM_SWAP_DIR", "/var/tmp")
            .output()
            .unwrap()
    };
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{err}");
    let report: serde_json::Value = err
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report in\n{err}"));
    assert_eq!(report["managed"], true, "{err}");
    assert!(report["faults"].as_u64().unwrap() > 0, "{report}");
}

/// The summary of `usm exec` still comes after the start line (a short program).
#[test]
fn exec_start_line_comes_first() {
    root();
    let r = usm_exec(&["--pool", "8M"], &["/bin/true"], Duration::from_secs(30));
    assert_eq!(r.code, 0, "{}", r.describe());
    let first = r.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("usm: private daemon pid "),
        "{}",
        r.describe()
    );
    assert_eq!(r.report["managed"], true, "{}", r.describe());
}

/// A small ext4 file system on a file, loop-mounted for one test; unmounted on drop.
struct SmallExt4 {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallExt4 {
    fn mount(mib: u64) -> SmallExt4 {
        let dir = disk_tempdir();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .output()
            .expect("mkfs.ext4 (e2fsprogs) is needed");
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount -o loop: {out:?}");
        SmallExt4 { mnt, _dir: dir }
    }
}

impl Drop for SmallExt4 {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.mnt).status();
        if !matches!(ok, Ok(s) if s.success()) {
            eprintln!("warning: umount {} failed", self.mnt.display());
        }
    }
}

/// The private swap file is sparse, so its file system can fill up under it: then the
/// daemon meets the *swap full* case — the device counts as full, the pages whose write
/// failed stay in memory, and the OOM policy (`fail`: SIGBUS) ends the program — never a
/// page read back wrong (the workload verifies every byte and would print BAD).
#[test]
fn a_full_file_system_under_the_swap_file_is_swap_full_not_data_loss() {
    root();
    let progs = tempfile::tempdir().unwrap();
    let prog = build_c(progs.path(), "daemon_workload");
    let fs = SmallExt4::mount(8);
    let out = Command::new(USM)
        .args(["exec", "--pool", "8M", "--swap-size", "64M", "--"])
        .arg(&prog)
        .args(["storm", "40", "5"])
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", &fs.mnt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
    assert!(
        !stdout.contains("BAD"),
        "data read back wrong:\n{stdout}\n{tail:?}"
    );
    assert!(
        stderr.contains("No space left on device"),
        "the 8 MiB file system never filled up?\n{tail:?}"
    );
    assert!(
        stderr.contains("treated as full") && stderr.contains("swap is full"),
        "a full file system is the swap-full case:\n{tail:?}"
    );
    // 40 MiB cannot live in an 8 MiB pool and ~7 MiB of swap: the OOM policy (`fail`)
    // ends it with SIGBUS, as it does when a swap device is full.
    assert_eq!(out.status.code(), Some(128 + 7), "{tail:?}");
    assert!(
        std::fs::read_dir(&fs.mnt)
            .unwrap()
            .filter_map(Result::ok)
            .all(|e| e.file_name() == "lost+found"),
        "the private swap file outlived its daemon"
    );
}
