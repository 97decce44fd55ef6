//! Real programs under the daemon, for the test files that run them: the tagger built
//! next to `usm`, C programs from `tests/programs/` built with gcc, `usm exec` with its
//! whole stderr kept (the daemon's log), the resident memory of a process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::daemon::USM;

/// The directory of the `usm` binary under test (`target/debug` or `target/release`).
pub(crate) fn target_profile_dir() -> PathBuf {
    Path::new(USM).parent().unwrap().to_path_buf()
}

/// Builds `libusm_tagger.so` next to the `usm` binary (cargo does not build a cdylib of
/// another package for integration tests).
pub(crate) fn tagger() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_profile_dir();
            let target = dir.parent().unwrap();
            let profile = dir.file_name().unwrap().to_str().unwrap().to_owned();
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "--quiet", "-p", "usm-tagger"]);
            if profile == "release" {
                cmd.arg("--release");
            }
            let st = cmd
                .env("CARGO_TARGET_DIR", target)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build -p usm-tagger");
            assert!(st.success());
            let so = dir.join("libusm_tagger.so");
            assert!(so.exists(), "{} missing", so.display());
            so
        })
        .clone()
}

/// Whether `tool` is on the PATH.
pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails the test when `tool` is missing: the tests run real programs from Debian's
/// packages, which `scripts/test` installs; a missing one is a broken set-up, never a
/// skip.
pub(crate) fn require(tool: &str) {
    assert!(
        have(tool),
        "{tool} is not installed: run scripts/test (it installs the Debian packages the \
         tests use)"
    );
}

/// Builds `tests/programs/NAME.c` into `dir` (gcc required).
pub(crate) fn build_c(dir: &Path, name: &str) -> PathBuf {
    require("gcc");
    let out = dir.join(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/programs/{name}.c"));
    let st = Command::new("gcc")
        .args(["-O1", "-Wall", "-Werror", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc failed on {}", src.display());
    out
}

/// What `usm exec --report json` left behind.
pub(crate) struct ExecRun {
    /// The program's exit code as usm reports it (128 + signal when killed).
    pub(crate) code: i32,
    pub(crate) stdout: String,
    /// usm's stderr: the daemon's log lines, the program's stderr, the JSON summary.
    pub(crate) stderr: String,
    /// The JSON summary (`Null` if usm printed none).
    pub(crate) report: serde_json::Value,
    /// Largest resident set of the `usm` process (the private daemon) seen, in KiB.
    pub(crate) max_usm_rss_kib: u64,
    pub(crate) wall: Duration,
}

impl ExecRun {
    /// The last `lines` lines of usm's stderr (for failure messages).
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.stderr.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Everything a failure message needs: exit code, stdout, the report, the first
    /// WARN/ERROR lines of the log (a poisoned page's line says which path poisoned it),
    /// the log tail.
    pub(crate) fn describe(&self) -> String {
        let warnings = self.warnings();
        format!(
            "exit code {} after {:?}\n--- stdout ---\n{}\n--- report ---\n{}\n--- usm WARN/ERROR lines (first 20 of {}) ---\n{}\n--- usm stderr (last 40 lines) ---\n{}",
            self.code,
            self.wall,
            self.stdout,
            self.report,
            warnings.len(),
            warnings[..warnings.len().min(20)].join("\n"),
            self.log_tail(40)
        )
    }

    /// Lines of the daemon's log at WARN or ERROR level.
    pub(crate) fn warnings(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect()
    }
}

/// `VmRSS` of process `pid` in KiB (None once it is gone).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `usm exec ARGS --report json -- CMD` with a private daemon (its swap file in the
/// system temp dir), bounded by `limit` (killed and reported past it, not a panic: the
/// caller asserts on [`ExecRun::code`]); samples usm's resident memory meanwhile.
pub(crate) fn usm_exec(args: &[&str], cmd: &[&str], limit: Duration) -> ExecRun {
    let out_dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let started = Instant::now();
    let mut child = Command::new(USM)
        .arg("exec")
        .args(args)
        .args(["--report", "json", "--"])
        .args(cmd)
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", std::env::temp_dir())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run usm exec");
    let pid = child.id();
    let mut max_rss = 0;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if let Some(kib) = rss_kib(pid) {
            max_rss = max_rss.max(kib);
        }
        if started.elapsed() > limit {
            timed_out = true;
            // The program first (usm reports it killed), then usm if it does not finish.
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = started.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let mut stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if timed_out {
        stderr.push_str(&format!(
            "\n(test: usm exec {cmd:?} killed after {limit:?})\n"
        ));
    }
    let report = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or(serde_json::Value::Null);
    ExecRun {
        code: if timed_out {
            -1
        } else {
            status.code().unwrap_or(-1)
        },
        stdout,
        stderr,
        report,
        max_usm_rss_kib: max_rss,
        wall,
    }
}
