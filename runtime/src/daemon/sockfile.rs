//! The daemon's socket files (`socket PATH` and `PATH.stat`): what may be replaced
//! before binding, and what may be deleted at shutdown.
//!
//! # Rules
//! 1. Before binding, whatever is at the path is looked at with `lstat` (never
//!    followed):
//!    - nothing: bind;
//!    - a socket owned by the daemon's effective uid that nobody answers on (a daemon
//!      that died): removed — after checking the inode is still the one looked at —
//!      then bind;
//!    - a socket somebody answers on: `EADDRINUSE` (another daemon runs there);
//!    - a socket owned by another user, a regular file, a directory, a symbolic link,
//!      anything else: an error naming the path and what is there. It is **not**
//!      deleted: a config line `socket /etc/passwd` must not cost the file.
//! 2. After binding, the socket file's mode is set explicitly (never the umask's) and
//!    its `(dev, ino)` recorded in a [`SocketFile`].
//! 3. At shutdown [`SocketFile::remove`] deletes the path only if it is still that
//!    inode: a file someone else put there since is left alone.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::DaemonError;

/// A socket file this daemon created.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn path_error(path: &Path, why: String) -> DaemonError {
    DaemonError::SocketPath {
        path: path.into(),
        why,
    }
}

/// What `lstat` found, in words for an error.
fn kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device or other special file"
    }
}

/// Rule 1: makes `path` free for a bind, or says why it cannot be. `answers` tells
/// whether a daemon listens on a socket at `path`.
pub(crate) fn clear_stale(path: &Path, answers: impl Fn(&Path) -> bool) -> Result<(), DaemonError> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(path_error(path, format!("cannot inspect it: {e}"))),
    };
    if !m.file_type().is_socket() {
        return Err(path_error(
            path,
            format!(
                "{} is there, not a socket: it is not removed; remove it yourself or choose \
                 another `socket` path",
                kind(&m)
            ),
        ));
    }
    if m.uid() != euid() {
        return Err(path_error(
            path,
            format!(
                "a socket owned by uid {} is there (this daemon runs as uid {}): it is not \
                 removed",
                m.uid(),
                euid()
            ),
        ));
    }
    if answers(path) {
        return Err(DaemonError::Socket {
            path: path.into(),
            source: usm_proto::ProtoError::Io {
                op: "bind",
                source: io::Error::from_raw_os_error(libc::EADDRINUSE),
            },
        });
    }
    // Stale: ours and silent. Remove exactly the inode we looked at.
    match std::fs::symlink_metadata(path) {
        Ok(again) if again.dev() == m.dev() && again.ino() == m.ino() => {
            std::fs::remove_file(path).map_err(|e| {
                path_error(path, format!("cannot remove the stale socket there: {e}"))
            })?;
            tracing::info!("removed the stale socket {}", path.display());
            Ok(())
        }
        Ok(_) => Err(path_error(
            path,
            "the file there changed while it was being checked".into(),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(path_error(path, format!("cannot inspect it: {e}"))),
    }
}

impl SocketFile {
    /// Rule 2 (after the bind, the mode already set): records the inode at `path`,
    /// which must be a socket owned by this daemon's uid.
    pub(crate) fn record(path: &Path) -> Result<SocketFile, DaemonError> {
        let m = std::fs::symlink_metadata(path)
            .map_err(|e| path_error(path, format!("vanished right after bind: {e}")))?;
        if !m.file_type().is_socket() || m.uid() != euid() {
            return Err(path_error(
                path,
                format!(
                    "{} owned by uid {} replaced the socket right after bind",
                    kind(&m),
                    m.uid()
                ),
            ));
        }
        Ok(SocketFile {
            path: path.into(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Rule 3: deletes the socket file if it is still the one this daemon created.
    pub(crate) fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::warn!(
                "{} is no longer the socket this daemon created: left alone",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}
