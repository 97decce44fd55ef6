//! `usm.pc.in` and the link line of `README.md` work as written: installed under a
//! prefix, `pkg-config --cflags --libs usm` gives the documented flags, a C program
//! built with them finds `libusm.so` at run time through its rpath (no
//! `LD_LIBRARY_PATH`), and outside a tagged process `usm_hint` answers as documented:
//! `-ENOTCONN` for a valid hint, `-EINVAL` (and `errno`) for one the daemon would refuse.
//! Needs gcc and pkg-config (`scripts/test` installs them); skips with a reason without.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PROGRAM: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <usm.h>

int main(void) {
    char *buf = malloc(1 << 20);
    int valid = usm_hint(buf, "PRIORITY=HIGH; EVICTION=DENY");
    int range = usm_hint_range(buf, 1 << 20, "PREFETCH=16");
    errno = 0;
    int cold = usm_hint(buf, "cold");
    int cold_errno = errno;
    int null = usm_hint(buf, NULL);
    int empty = usm_hint_range(buf, 0, "PREFETCH=16");
    printf("valid=%d range=%d cold=%d/%d null=%d empty=%d\n", valid, range, cold, cold_errno,
           null, empty);
    return 0;
}
"#;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `libusm.so` of this workspace, built like the other tests build cdylibs.
fn libusm() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "-p", "usm-capi"]);
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd
        .env("CARGO_TARGET_DIR", profile.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build -p usm-capi");
    assert!(st.success());
    let so = profile.join("libusm.so");
    assert!(so.exists(), "{} missing", so.display());
    so
}

/// Installs header, library and `usm.pc` under `prefix` as the install script does.
fn install(prefix: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (include, lib) = (prefix.join("include"), prefix.join("lib"));
    std::fs::create_dir_all(lib.join("pkgconfig")).unwrap();
    std::fs::create_dir_all(&include).unwrap();
    std::fs::copy(crate_dir.join("include/usm.h"), include.join("usm.h")).unwrap();
    std::fs::copy(libusm(), lib.join("libusm.so")).unwrap();
    let template = std::fs::read_to_string(crate_dir.join("usm.pc.in")).unwrap();
    let pc = template
        .replace("@PREFIX@", prefix.to_str().unwrap())
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    assert!(!pc.contains('@'), "a placeholder is left in usm.pc:\n{pc}");
    std::fs::write(lib.join("pkgconfig/usm.pc"), pc).unwrap();
}

#[test]
fn pkg_config_link_line_builds_a_program_that_finds_libusm_at_run_time() {
    assert!(
        have("gcc") && have("pkg-config"),
        "gcc and pkg-config are needed (scripts/test installs them)"
    );
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let pc_path = prefix.join("lib/pkgconfig");
    let out = Command::new("pkg-config")
        .args(["--cflags", "--libs", "usm"])
        .env("PKG_CONFIG_PATH", &pc_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flags = String::from_utf8(out.stdout).unwrap();
    let p = prefix.display();
    // The exact line README.md documents.
    assert_eq!(
        flags.split_whitespace().collect::<Vec<_>>(),
        [
            format!("-I{p}/include"),
            format!("-L{p}/lib"),
            format!("-Wl,-rpath,{p}/lib"),
            "-lusm".to_owned()
        ],
        "{flags}"
    );
    let version = Command::new("pkg-config")
        .args(["--modversion", "usm"])
        .env("PKG_CONFIG_PATH", &pc_path)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        env!("CARGO_PKG_VERSION")
    );

    let src = dir.path().join("prog.c");
    std::fs::write(&src, PROGRAM).unwrap();
    let prog = dir.path().join("prog");
    let st = Command::new("gcc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&prog)
        .arg(&src)
        .args(flags.split_whitespace())
        .status()
        .unwrap();
    assert!(st.success(), "gcc with pkg-config's flags failed");
    let run = Command::new(&prog)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (enotconn, einval) = (-libc::ENOTCONN, -libc::EINVAL);
    assert_eq!(
        stdout.trim(),
        format!(
            "valid={enotconn} range={enotconn} cold={einval}/{} null={einval} empty={einval}",
            libc::EINVAL
        )
    );
}
