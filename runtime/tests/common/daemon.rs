//! A `usm run` daemon on a config in a temp dir, for tests: started and waited for until
//! `usm stat` answers, killed on drop.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `usm` binary under test.
pub(crate) const USM: &str = env!("CARGO_BIN_EXE_usm");

/// A running `usm run` daemon.
pub(crate) struct RunDaemon {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RunDaemon {
    /// Starts a daemon on `config_body` (its socket line is added) with its stderr piped,
    /// so [`stop`](Self::stop) can return it.
    pub(crate) fn start(config_body: &str) -> RunDaemon {
        Self::start_with(config_body, Stdio::piped())
    }

    /// Starts a daemon whose stderr goes to `stderr`; waits until `usm stat` answers.
    pub(crate) fn start_with(config_body: &str, stderr: Stdio) -> RunDaemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("usm.sock");
        let cfg = dir.path().join("usm.cfg");
        std::fs::write(
            &cfg,
            format!("{config_body}\nsocket {}\n", socket.display()),
        )
        .unwrap();
        let child = Command::new(USM)
            .arg("run")
            .arg(&cfg)
            .env("USM_SWAP_DIR", dir.path())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let d = RunDaemon {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.stat().is_none() {
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// `usm stat --json` of this daemon, or `None` while it does not answer.
    pub(crate) fn stat(&self) -> Option<serde_json::Value> {
        let out = Command::new(USM)
            .args(["stat", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Polls `usm stat` until `f` holds; panics with the last stat after `limit`.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.stat() {
                if f(&s) {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}: {s}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns the exit status and stderr (started with [`start`](Self::start)).
    pub(crate) fn stop(mut self) -> (i32, String) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (self.child.wait().unwrap().code().unwrap_or(-1), err)
    }
}

impl Drop for RunDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
