//! For the hardening tests: a throwaway second user (created with `useradd`, removed on
//! drop even when the test fails), steps run as that user (`setpriv`), and the tagger
//! library built next to the `usm` binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// A system user that exists for one test: `useradd --system`, `userdel` on drop.
pub(crate) struct ThrowawayUser {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl ThrowawayUser {
    /// Creates `usmh-TAG-PID` (no home, no login shell). Needs root: fails loudly
    /// otherwise.
    pub(crate) fn create(tag: &str) -> ThrowawayUser {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "this test needs root (it creates a second user with useradd)"
        );
        let name = format!("usmh-{tag}-{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .output()
            .expect("useradd (package passwd) is needed to create the second user");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        assert_ne!(uid, 0);
        ThrowawayUser { name, uid, gid }
    }

    /// `program args...` run as this user (real and effective ids, no supplementary
    /// groups), through util-linux's `setpriv`.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        c
    }

    /// Runs a Python 3 script as this user; returns its output.
    pub(crate) fn python(&self, script: &str, args: &[&str]) -> Output {
        self.command("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .expect("setpriv + /usr/bin/python3")
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        // The user and its group. The tests wait for or kill (by pid) every process they
        // started as this user; a step still ending makes userdel fail: retry a while.
        for _ in 0..50 {
            let out = Command::new("userdel").arg(&self.name).output();
            if out.is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("warning: could not remove the test user {}", self.name);
    }
}

/// Kills (by pid) and reaps a child on drop: a failing test leaves no process behind.
pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a directory tree on drop (directories a test made outside a `TempDir`).
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
