//! Workloads in a child process, placed in a cgroup before it allocates.
//!
//! The bench binary re-executes itself: [`ChildLauncher::run`] spawns `program args…` with
//! the request (a kind and a JSON payload) in the [`CHILD_ENV`] environment variable,
//! through [`crate::MemCgroup::place_before_exec`] so the child is charged from its first
//! allocation. The child's `main` calls [`serve_if_child`] first: it runs the handler for
//! the kind and prints one line `USM-BENCH-RESULT <json>` on stdout, which the parent
//! parses. Built-in kinds: [`crate::storm::STORM_THREADS_CHILD`] (the (a′) mode). USM's
//! modes register their own kinds by passing extra handlers.
//!
//! In a libtest binary (`harness = true`) the launcher's `args` select one `#[test]` that
//! calls [`serve_if_child`] (`--exact NAME --nocapture`); the marker line is still found.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::guard::MemCgroup;

/// Environment variable carrying the child request.
pub const CHILD_ENV: &str = "USM_BENCH_CHILD";

/// Prefix of the result line a child prints.
pub const RESULT_MARKER: &str = "USM-BENCH-RESULT ";

/// A handler for one kind of child request.
pub type ChildHandler = fn(Value) -> Result<Value>;

/// What the parent sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildRequest {
    /// Which handler runs.
    pub kind: String,
    /// Its parameters.
    pub payload: Value,
}

/// If this process is a benchmark child, runs the requested handler (built-ins, then
/// `extra`), prints the result line and returns the exit code to use; otherwise `None`.
pub fn serve_if_child(extra: &[(&str, ChildHandler)]) -> Option<i32> {
    let text = std::env::var(CHILD_ENV).ok()?;
    let outcome = (|| -> Result<Value> {
        let req: ChildRequest = serde_json::from_str(&text)?;
        let builtin: [(&str, ChildHandler); 1] = [(
            crate::storm::STORM_THREADS_CHILD,
            crate::storm::storm_threads_child,
        )];
        let handler = builtin
            .iter()
            .chain(extra.iter())
            .find(|(k, _)| *k == req.kind)
            .map(|(_, h)| *h)
            .ok_or_else(|| Error::Invalid(format!("unknown child kind {:?}", req.kind)))?;
        handler(req.payload)
    })();
    match outcome {
        Ok(v) => {
            println!("\n{RESULT_MARKER}{v}");
            Some(0)
        }
        Err(e) => {
            eprintln!("usm-bench child: {e}");
            Some(1)
        }
    }
}

/// How to start a benchmark child.
#[derive(Debug, Clone)]
pub struct ChildLauncher {
    /// The program (normally the running bench binary).
    pub program: PathBuf,
    /// Arguments placed before nothing else (empty for a bench binary; `--exact NAME
    /// --nocapture` for a libtest binary).
    pub args: Vec<String>,
}

impl ChildLauncher {
    /// Re-executes the running binary with no arguments.
    pub fn current_exe() -> Result<Self> {
        let program =
            std::env::current_exe().map_err(|e| Error::io("current_exe", "/proc/self/exe", e))?;
        Ok(Self {
            program,
            args: Vec::new(),
        })
    }

    /// Runs a child of `kind` with `payload`, inside `cgroup` when given, and returns the
    /// JSON value it printed.
    pub fn run(
        &self,
        kind: &str,
        payload: &impl Serialize,
        cgroup: Option<&MemCgroup>,
    ) -> Result<Value> {
        let req = ChildRequest {
            kind: kind.into(),
            payload: serde_json::to_value(payload)?,
        };
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env(CHILD_ENV, serde_json::to_string(&req)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::sys::kill_child_with_parent(&mut cmd);
        if let Some(cg) = cgroup {
            cg.place_before_exec(&mut cmd);
        }
        let out = cmd
            .output()
            .map_err(|e| Error::io("spawn", &self.program, e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result = stdout
            .lines()
            .find_map(|l| l.find(RESULT_MARKER).map(|i| &l[i + RESULT_MARKER.len()..]));
        match (out.status.success(), result) {
            (true, Some(json)) => Ok(serde_json::from_str(json)?),
            _ => {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: String = err
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ");
                match std::os::unix::process::ExitStatusExt::signal(&out.status) {
                    Some(signal) => Err(Error::ChildSignalled {
                        what: kind.into(),
                        signal,
                        detail: format!("stderr: {tail}"),
                    }),
                    None => Err(Error::Child {
                        what: kind.into(),
                        detail: format!("{} ; stderr: {tail}", out.status),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> ChildLauncher {
        ChildLauncher {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
        }
    }

    #[test]
    fn a_sigkilled_child_is_told_apart_from_one_that_failed() {
        let killed = shell("kill -9 $$").run("sh", &(), None).unwrap_err();
        assert!(killed.is_child_killed(), "{killed}");
        let failed = shell("echo oops >&2; exit 3")
            .run("sh", &(), None)
            .unwrap_err();
        assert!(!failed.is_child_killed(), "{failed}");
        assert!(failed.to_string().contains("oops"), "{failed}");
    }
}
