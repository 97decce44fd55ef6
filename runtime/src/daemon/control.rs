//! The `usm stat` socket: `SOCKET.stat`, a unix stream socket next to the taggers'.
//! A client writes one line `stat` and reads one line of JSON ([`DaemonStat`]); anything
//! else gets one line `{"error": ...}`. Same uid or root only (the socket is 0600).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, Ordering};

use super::stats::DaemonStat;
use super::{DaemonError, Shared};

/// The stat socket of the daemon whose taggers' socket is `socket`.
pub fn stat_socket_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".stat");
    PathBuf::from(s)
}

pub(crate) fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if UnixStream::connect(path).is_ok() {
        return Err(DaemonError::Setup {
            what: format!("stat socket {}", path.display()),
            source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
        });
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| DaemonError::Setup {
        what: format!("stat socket {}", path.display()),
        source: e,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    l.set_nonblocking(true).map_err(|e| DaemonError::Setup {
        what: "stat socket".into(),
        source: e,
    })?;
    Ok(l)
}

pub(crate) fn serve(sh: &Arc<Shared>, l: &UnixListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                let _ = answer(sh, s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!("stat socket: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn answer(sh: &Shared, s: UnixStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    BufReader::new(&s).take(4096).read_until(b'\n', &mut buf)?;
    let line = String::from_utf8_lossy(&buf).into_owned();
    let mut w = &s;
    if line.trim() == "stat" {
        let json = serde_json::to_string(&sh.stat()).map_err(std::io::Error::other)?;
        writeln!(w, "{json}")
    } else {
        let msg = serde_json::json!({ "error": format!("unknown request {:?} (expected `stat`)", line.trim()) });
        writeln!(w, "{msg}")
    }
}

/// Asks the daemon listening on `socket` (the taggers' socket path) for its counters.
pub fn query_stat(socket: &Path) -> std::io::Result<DaemonStat> {
    let path = stat_socket_path(socket);
    let s = UnixStream::connect(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("no USM daemon answers at {} ({e})", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(b"stat\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer: {e}"))
    })
}
