//! The tagger's side: connect, Hello with the un-negotiated userfaultfd, wait for the
//! verdict.
//!
//! ```no_run
//! # use std::os::fd::AsFd;
//! # fn demo(uffd: std::os::fd::OwnedFd) -> Result<(), usm_proto::ProtoError> {
//! let session = usm_proto::client::connect("/run/usm/usm.sock".as_ref())?;
//! let admission = session.hello(std::process::id(), "redis-server", uffd.as_fd())?;
//! println!("managed by policy {}", admission.policy);
//! # Ok(()) }
//! ```

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::PROTOCOL_VERSION;
use crate::error::ProtoError;
use crate::sys::Channel;
use crate::wire::Message;

/// How long the tagger waits for the daemon's verdict before running unmanaged.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the daemon, before or after the Hello.
#[derive(Debug)]
pub struct Session {
    channel: Channel,
}

/// The daemon's Ack (or, for a forked child, its [`Message::Adopted`]).
#[derive(Debug)]
pub struct Admission {
    /// `uffdio_api.features` the daemon negotiated on the shared userfaultfd.
    pub features: u64,
    /// Policy managing this process.
    pub policy: String,
    /// `Some` when the daemon adopted this forked child into the space it made from the
    /// parent's `FORK` event: the child's inherited userfaultfd context, to use in place
    /// of the one sent with Hello (which the daemon dropped un-negotiated).
    pub inherited: Option<OwnedFd>,
}

/// Connects to the daemon at `path` and checks who listens there (`SO_PEERCRED` of the
/// connected socket, taken by the kernel when the daemon called `listen`): the daemon
/// must run as this program's effective uid or as root, otherwise
/// [`ProtoError::UntrustedDaemon`] — whoever swapped a socket into the path would
/// otherwise receive the userfaultfd and write this program's memory.
pub fn connect(path: &Path) -> Result<Session, ProtoError> {
    let channel = Channel::connect(path)?;
    let daemon = channel.peer_credentials()?;
    let own_uid = crate::sys::effective_uid();
    if daemon.uid != own_uid && daemon.uid != 0 {
        return Err(ProtoError::UntrustedDaemon {
            daemon_uid: daemon.uid,
            own_uid,
        });
    }
    Ok(Session { channel })
}

impl Session {
    /// Sends Hello with `uffd` (un-negotiated) attached and waits up to
    /// [`VERDICT_TIMEOUT`] for Ack or Refused. `Refused` becomes [`ProtoError::Refused`].
    pub fn hello(
        &self,
        pid: u32,
        name: &str,
        uffd: BorrowedFd<'_>,
    ) -> Result<Admission, ProtoError> {
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            pid,
            name: name.to_owned(),
        };
        if let Err(e) = self.channel.send_with_fd(&hello, uffd) {
            return Err(if e.is_peer_gone() {
                self.queued_refusal().unwrap_or(e)
            } else {
                e
            });
        }
        self.channel.set_recv_timeout(Some(VERDICT_TIMEOUT))?;
        let verdict = match self.channel.recv_with_fds() {
            Err(e) if e.is_peer_gone() => Err(self.queued_refusal().unwrap_or(e)),
            other => other,
        };
        self.channel.set_recv_timeout(None)?;
        match verdict.map_err(|e| match e {
            ProtoError::Timeout { .. } => ProtoError::Timeout {
                what: "the daemon's verdict (Ack or Refused)",
            },
            other => other,
        })? {
            (Message::Ack { features, policy }, _) => Ok(Admission {
                features,
                policy,
                inherited: None,
            }),
            (Message::Adopted { features, policy }, mut fds) => Ok(Admission {
                features,
                policy,
                inherited: fds.pop(),
            }),
            (Message::Refused { reason, text }, _) => Err(ProtoError::Refused { reason, text }),
            (other, _) => Err(ProtoError::Unexpected {
                expected: "Ack, Adopted or Refused",
                got: other.name(),
            }),
        }
    }

    /// A daemon may turn a peer away on its credentials alone (a foreign uid, a
    /// session limit) before reading its Hello: its `Refused` is queued, then it closes.
    /// The close may be reported first (`EPIPE` on the send, `ECONNRESET` once on a
    /// receive, because the Hello was left unread): read past it for the reason.
    fn queued_refusal(&self) -> Option<ProtoError> {
        self.channel.set_recv_timeout(Some(VERDICT_TIMEOUT)).ok()?;
        for _ in 0..2 {
            match self.channel.recv() {
                Ok(Message::Refused { reason, text }) => {
                    return Some(ProtoError::Refused { reason, text });
                }
                Err(e) if e.errno() == Some(libc::ECONNRESET) => continue,
                _ => return None,
            }
        }
        None
    }

    /// The underlying channel (send notifications, receive daemon messages).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Gives up the session wrapper, keeping the channel.
    pub fn into_channel(self) -> Channel {
        self.channel
    }
}
