//! The `usm stat` socket: `SOCKET.stat`, a unix stream socket next to the taggers'.
//! A client writes one line `stat` and reads one line of JSON ([`DaemonStat`]); anything
//! else gets one line `{"error": ...}`. Same uid or root only (the socket is 0600, and
//! `SO_PEERCRED` is checked).
//!
//! # Clients never hold the daemon
//! Each client is served on a thread of its own (at most [`MAX_CLIENTS`] at once; more
//! are closed at once), with one deadline for the whole exchange ([`CLIENT_DEADLINE`]):
//! the read and every write are bounded by what is left of it. A client that connects
//! and never reads (the answer is larger than the socket buffer) loses its answer at
//! the deadline; meanwhile the others are served, and shutdown (which only stops the
//! accept loop) never waits for it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::sockfile::SocketFile;
use super::stats::DaemonStat;
use super::{DaemonError, Shared};

/// The stat socket of the daemon whose taggers' socket is `socket`.
pub fn stat_socket_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".stat");
    PathBuf::from(s)
}

/// Binds the stat socket (its path checked by `sockfile::clear_stale` already) with
/// mode `0600`, set explicitly.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), DaemonError> {
    let setup = |e: std::io::Error| DaemonError::Setup {
        what: format!("stat socket {}", path.display()),
        source: e,
    };
    let l = UnixListener::bind(path).map_err(setup)?;
    // Created with the umask's mode; a client connecting before the chmod still meets
    // the `SO_PEERCRED` check.
    let file = usm_proto::server::set_socket_file_mode(path, 0o600)
        .map_err(setup)
        .and_then(|()| SocketFile::record(path));
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    l.set_nonblocking(true).map_err(setup)?;
    Ok((l, file))
}

pub(crate) fn serve(sh: &Arc<Shared>, l: &UnixListener, stop: &AtomicBool) {
    let clients = Arc::new(AtomicUsize::new(0));
    let own_uid = nix::unistd::geteuid().as_raw();
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                // Same uid or root only (the file mode says so too).
                match nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials) {
                    Ok(c) if c.uid() == own_uid || c.uid() == 0 => {}
                    _ => continue,
                }
                let (sh, clients) = (sh.clone(), clients.clone());
                spawn_client("usm-stat-client", &clients, move || {
                    let _ = answer(&sh, &s);
                });
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

/// Runs `serve` on a thread of its own, unless [`MAX_CLIENTS`] are being served
/// already (then the connection is dropped: the client sees EOF). Nobody joins these
/// threads — shutdown never waits for a client; each ends by its [`CLIENT_DEADLINE`].
pub(crate) fn spawn_client(
    name: &str,
    clients: &Arc<AtomicUsize>,
    serve: impl FnOnce() + Send + 'static,
) {
    if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        clients.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let count = clients.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            serve();
            count.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Clients served at once (stat and metrics each).
pub(crate) const MAX_CLIENTS: usize = 32;

/// Everything one client gets: reading its request and writing the answer, each I/O
/// also bounded by this.
pub(crate) const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// Writes `bytes` to a client, giving up at `deadline` (each `write` bounded by the
/// socket's send timeout, set to what is left).
pub(crate) fn write_by<W: Write>(
    w: &mut W,
    set_timeout: impl Fn(Duration) -> std::io::Result<()>,
    mut bytes: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        set_timeout(left)?;
        match w.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn answer(sh: &Shared, s: &UnixStream) -> std::io::Result<()> {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(CLIENT_DEADLINE))?;
    let mut buf = Vec::new();
    BufReader::new(s).take(4096).read_until(b'\n', &mut buf)?;
    let line = String::from_utf8_lossy(&buf).into_owned();
    let reply = if line.trim() == "stat" {
        serde_json::to_string(&sh.stat()).map_err(std::io::Error::other)?
    } else {
        serde_json::json!({ "error": format!("unknown request {:?} (expected `stat`)", line.trim()) })
            .to_string()
    };
    let mut w = s;
    write_by(
        &mut w,
        |t| s.set_write_timeout(Some(t)),
        format!("{reply}\n").as_bytes(),
        deadline,
    )
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
