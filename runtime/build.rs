//! Records the commit `usm` is built from (`USM_GIT_COMMIT`, shown by `usm --version`,
//! `usm stat` and the `usm_build_info` metric): `git rev-parse --short=12 HEAD`, with
//! `-dirty` when tracked files differ from it; `unknown` when there is no git or no
//! checkout (a source tarball), so the build never fails for want of git.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=USM_GIT_COMMIT");
    let commit = if let Ok(c) = std::env::var("USM_GIT_COMMIT") {
        // Set by a packager building without the repository.
        c
    } else if let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) {
        // Rebuild when HEAD moves: HEAD itself, the branch it names, packed refs.
        for what in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", what]) {
                let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p);
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"])
            && let Some(p) = git(&["rev-parse", "--git-path", &r])
        {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p);
            println!("cargo:rerun-if-changed={}", p.display());
        }
        head
    } else {
        "unknown".to_owned()
    };
    println!("cargo:rustc-env=USM_GIT_COMMIT={commit}");
}
