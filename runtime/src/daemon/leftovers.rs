//! What a daemon leaves on disk, named after its pid so the next one can tell a
//! leftover of a dead daemon from a live daemon's file — and the fresh private socket
//! directory of `usm exec`.
//!
//! # Names
//! | what | name | where |
//! |---|---|---|
//! | private swap file | `usm-swap-PID-NONCE.img` (`usm-swap-PID.img` before) | `temp_swap_dir` (`/var/tmp`, `USM_SWAP_DIR`) |
//! | private socket directory | `usm-exec-PID` | `/run/usm` (root) or `$XDG_RUNTIME_DIR` |
//! | private socket directory | `usm-exec-PID-XXXXXX` (`mkdtemp`) | the temp dir (no usable runtime dir) |
//!
//! # Sweeping
//! At start the daemon looks for these names in the directories it uses and removes an
//! entry only if all hold: its name parses, its pid is dead (no `/proc/PID`; or it is
//! this process's own pid, which cannot be a live daemon's since the entry was not
//! created yet), it is owned by this daemon's effective uid, and it is of the expected
//! type (`lstat`: a regular file; a directory, of which only socket files and then the
//! empty directory are removed). Anything else — another user's file, a symbolic link,
//! a directory with other content — is left alone.
//!
//! # The private socket directory (`usm exec`)
//! Created fresh with `mkdir(0700)` (then `chmod 0700`, not trusting the umask) and
//! refused if it already exists; never a directory somebody else could have prepared.
//! Root: under `/run/usm` (created `0755` when missing; refused unless it is a real
//! directory owned by root and writable by nobody else). Other users:
//! `$XDG_RUNTIME_DIR` when it is a directory owned by them with mode `0700`, otherwise a
//! `mkdtemp` directory in the temp dir (a name nobody can guess in advance).
//!
//! # Finding the daemons (`usm stat --pid`)
//! [`daemon_sockets`] lists the taggers' sockets a `usm stat` of this user can ask:
//! the system daemon's (`/run/usm/usm.sock`) and [`PRIVATE_SOCKET_NAME`] in every
//! private socket directory of a live daemon, in the three places above. Each daemon
//! answers on its stat socket with the pids it serves; nothing else is written on disk
//! for this (a directory listing is the index, and the daemon itself is the truth).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::DaemonError;

/// Prefix of a private swap file.
const SWAP_PREFIX: &str = "usm-swap-";
/// Prefix of a private socket directory.
const EXEC_PREFIX: &str = "usm-exec-";
/// Where a root `usm exec` puts its private socket directory.
const ROOT_RUNTIME_DIR: &str = "/run/usm";
/// The taggers' socket in a private socket directory.
pub const PRIVATE_SOCKET_NAME: &str = "usm.sock";

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The pid in `PREFIX PID [-…] [SUFFIX]`.
fn owner_pid(name: &str, prefix: &str, suffix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let digits = rest.split('-').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Is `pid` dead, as far as leftovers go? (Our own pid counts as dead: see the docs.)
fn owner_dead(pid: u32) -> bool {
    pid == std::process::id() || !Path::new("/proc").join(pid.to_string()).exists()
}

/// A fresh private swap file path in `dir`: `usm-swap-PID-NONCE.img`.
pub(crate) fn swap_file_path(dir: &Path) -> PathBuf {
    let nonce = RandomState::new().build_hasher().finish() & 0xffff_ffff;
    dir.join(format!(
        "{SWAP_PREFIX}{}-{nonce:08x}.img",
        std::process::id()
    ))
}

/// Removes the private swap files of dead daemons of this uid from `dir`; returns how
/// many.
pub(crate) fn sweep_swap_files(dir: &Path) -> usize {
    let mut removed = 0;
    for (path, name, m) in entries(dir) {
        let Some(pid) = owner_pid(&name, SWAP_PREFIX, ".img") else {
            continue;
        };
        if m.file_type().is_file()
            && m.uid() == euid()
            && owner_dead(pid)
            && std::fs::remove_file(&path).is_ok()
        {
            tracing::info!(
                "removed {} (swap file of daemon {pid}, which is gone)",
                path.display()
            );
            removed += 1;
        }
    }
    removed
}

/// Removes the private socket directories of dead daemons of this uid from `dir` (their
/// socket files, then the directory if that left it empty); returns how many.
pub(crate) fn sweep_socket_dirs(dir: &Path) -> usize {
    let mut removed = 0;
    for (path, name, m) in entries(dir) {
        let Some(pid) = owner_pid(&name, EXEC_PREFIX, "") else {
            continue;
        };
        if !m.file_type().is_dir() || m.uid() != euid() || !owner_dead(pid) {
            continue;
        }
        for (inner, _, im) in entries(&path) {
            if im.file_type().is_socket() && im.uid() == euid() {
                let _ = std::fs::remove_file(&inner);
            }
        }
        if std::fs::remove_dir(&path).is_ok() {
            tracing::info!(
                "removed {} (sockets of daemon {pid}, which is gone)",
                path.display()
            );
            removed += 1;
        }
    }
    removed
}

/// `(path, file name, lstat)` of each entry of `dir` (nothing if it cannot be read).
fn entries(dir: &Path) -> Vec<(PathBuf, String, std::fs::Metadata)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let name = e.file_name().to_str()?.to_owned();
            let m = std::fs::symlink_metadata(&path).ok()?;
            Some((path, name, m))
        })
        .collect()
}

fn refuse(path: &Path, why: String) -> DaemonError {
    DaemonError::Setup {
        what: format!("private socket directory {}", path.display()),
        source: io::Error::new(io::ErrorKind::PermissionDenied, why),
    }
}

/// Creates `path` fresh, mode `0700` (set explicitly), and checks what was created.
fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                refuse(
                    path,
                    "it exists already (made by someone else, or by a live daemon): a \
                     private directory is only ever created fresh"
                        .into(),
                )
            } else {
                DaemonError::Setup {
                    what: format!("create {}", path.display()),
                    source: e,
                }
            }
        })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        DaemonError::Setup {
            what: format!("chmod 0700 {}", path.display()),
            source: e,
        }
    })?;
    check_own_private(path)
}

/// `path` is a real directory (not a link) owned by this uid with mode `0700`.
fn check_own_private(path: &Path) -> Result<(), DaemonError> {
    let m = std::fs::symlink_metadata(path).map_err(|e| DaemonError::Setup {
        what: format!("inspect {}", path.display()),
        source: e,
    })?;
    if !m.file_type().is_dir() || m.uid() != euid() || m.mode() & 0o777 != 0o700 {
        return Err(refuse(
            path,
            format!(
                "not a 0700 directory of uid {} (uid {}, mode {:o})",
                euid(),
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Root's base directory: `/run/usm`, created `0755` when missing, else it must be a
/// real directory owned by root that nobody else can write.
fn root_base() -> Result<PathBuf, DaemonError> {
    let base = PathBuf::from(ROOT_RUNTIME_DIR);
    match std::fs::symlink_metadata(&base) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o755).create(&base) {
                Ok(()) => std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| DaemonError::Setup {
                    what: format!("chmod 0755 {}", base.display()),
                    source: e,
                })?,
                // Another usm made it meanwhile: checked below like any existing one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(DaemonError::Setup {
                        what: format!("create {}", base.display()),
                        source: e,
                    });
                }
            }
        }
        Err(e) => {
            return Err(DaemonError::Setup {
                what: format!("inspect {}", base.display()),
                source: e,
            });
        }
        Ok(_) => {}
    }
    let m = std::fs::symlink_metadata(&base).map_err(|e| DaemonError::Setup {
        what: format!("inspect {}", base.display()),
        source: e,
    })?;
    if !m.file_type().is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(refuse(
            &base,
            format!(
                "must be a directory owned by root that only root can write (it is {} of \
                 uid {}, mode {:o})",
                if m.file_type().is_dir() {
                    "a directory"
                } else {
                    "not a directory"
                },
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(base)
}

/// Is `$XDG_RUNTIME_DIR` usable: a real directory owned by us, mode `0700`?
fn runtime_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    let m = std::fs::symlink_metadata(&dir).ok()?;
    (dir.is_absolute() && m.file_type().is_dir() && m.uid() == euid() && m.mode() & 0o777 == 0o700)
        .then_some(dir)
}

/// A fresh private directory for a `usm exec` daemon's sockets (see the module docs),
/// after sweeping the leftovers of dead ones next to it.
pub fn private_socket_dir() -> Result<PathBuf, DaemonError> {
    let pid = std::process::id();
    let base = if euid() == 0 {
        Some(root_base()?)
    } else {
        runtime_dir()
    };
    if let Some(base) = base {
        sweep_socket_dirs(&base);
        let dir = base.join(format!("{EXEC_PREFIX}{pid}"));
        create_private_dir(&dir)?;
        return Ok(dir);
    }
    let tmp = std::env::temp_dir();
    sweep_socket_dirs(&tmp);
    let template = tmp.join(format!("{EXEC_PREFIX}{pid}-XXXXXX"));
    let dir = nix::unistd::mkdtemp(&template).map_err(|e| DaemonError::Setup {
        what: format!("mkdtemp {}", template.display()),
        source: e.into(),
    })?;
    check_own_private(&dir)?;
    Ok(dir)
}

/// The taggers' sockets of the daemons this user can ask (see the module docs), the
/// system daemon's first, then private daemons' (live owner pid, ours or root's
/// directory), newest pid last.
pub fn daemon_sockets() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let system = PathBuf::from(crate::config::DEFAULT_SOCKET);
    if std::fs::symlink_metadata(&system).is_ok_and(|m| m.file_type().is_socket()) {
        out.push(system);
    }
    let mut bases = vec![PathBuf::from(ROOT_RUNTIME_DIR)];
    bases.extend(runtime_dir());
    bases.push(std::env::temp_dir());
    bases.dedup();
    let mut private = Vec::new();
    for base in bases {
        for (path, name, m) in entries(&base) {
            let Some(pid) = owner_pid(&name, EXEC_PREFIX, "") else {
                continue;
            };
            let sock = path.join(PRIVATE_SOCKET_NAME);
            if m.file_type().is_dir()
                && (m.uid() == euid() || m.uid() == 0)
                && Path::new("/proc").join(pid.to_string()).exists()
                && std::fs::symlink_metadata(&sock).is_ok_and(|s| s.file_type().is_socket())
            {
                private.push((pid, sock));
            }
        }
    }
    private.sort();
    out.extend(private.into_iter().map(|(_, s)| s));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_owner_pid() {
        assert_eq!(
            owner_pid("usm-swap-1234-00ab00cd.img", SWAP_PREFIX, ".img"),
            Some(1234)
        );
        assert_eq!(owner_pid("usm-swap-77.img", SWAP_PREFIX, ".img"), Some(77));
        assert_eq!(owner_pid("usm-exec-42", EXEC_PREFIX, ""), Some(42));
        assert_eq!(owner_pid("usm-exec-42-Ab3dE9", EXEC_PREFIX, ""), Some(42));
        assert_eq!(owner_pid("usm-swap-x.img", SWAP_PREFIX, ".img"), None);
        assert_eq!(owner_pid("usm-swap-.img", SWAP_PREFIX, ".img"), None);
        assert_eq!(owner_pid("other-12", EXEC_PREFIX, ""), None);
        let p = swap_file_path(Path::new("/var/tmp"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            owner_pid(name, SWAP_PREFIX, ".img"),
            Some(std::process::id())
        );
    }

    #[test]
    fn sweeping_removes_only_dead_owners_files_of_the_right_kind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A pid that is certainly dead: past pid_max.
        let dead = 4_194_305u32;
        let live = 1u32; // init
        std::fs::write(d.join(format!("usm-swap-{dead}-0000abcd.img")), b"x").unwrap();
        std::fs::write(d.join(format!("usm-swap-{live}-0000abcd.img")), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.join(format!("usm-swap-{dead}.img")))
            .unwrap();
        std::fs::create_dir(d.join(format!("usm-swap-{dead}-dir.img"))).unwrap();
        std::fs::write(d.join("unrelated.img"), b"x").unwrap();
        assert_eq!(sweep_swap_files(d), 1);
        assert!(!d.join(format!("usm-swap-{dead}-0000abcd.img")).exists());
        assert!(d.join(format!("usm-swap-{live}-0000abcd.img")).exists());
        assert!(
            std::fs::symlink_metadata(d.join(format!("usm-swap-{dead}.img"))).is_ok(),
            "a symbolic link is not a swap file of ours"
        );
        assert!(d.join("unrelated.img").exists());

        let exec = d.join(format!("usm-exec-{dead}"));
        std::fs::create_dir(&exec).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(exec.join("usm.sock")).unwrap();
        let kept = d.join(format!("usm-exec-{dead}-keep"));
        std::fs::create_dir(&kept).unwrap();
        std::fs::write(kept.join("notes.txt"), b"not a socket").unwrap();
        assert_eq!(sweep_socket_dirs(d), 1);
        assert!(!exec.exists());
        assert!(
            kept.join("notes.txt").exists(),
            "other content is left alone"
        );
    }
}
