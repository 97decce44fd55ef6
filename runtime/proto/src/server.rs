//! The daemon's side: accept a tagger, check who it is, take its userfaultfd.
//!
//! [`accept`] returns a [`TaggedPeer`] whose Hello was valid and whose credentials
//! passed; the daemon then negotiates `UFFDIO_API` on [`TaggedPeer::uffd`] and answers
//! with [`TaggedPeer::ack`] or [`TaggedPeer::refuse`]. Errors that are the peer's fault
//! ([`ProtoError::is_peer_fault`]) concern that connection only: the refused peer has
//! been told why (best effort) and the daemon keeps accepting.
//!
//! [`accept`] is [`Listener::accept_channel`] followed by [`admit`], which waits up to
//! [`HELLO_TIMEOUT`] for the Hello: a daemon that must not let one silent peer delay the
//! others accepts with `accept_channel` and runs `admit` on another thread.
//!
//! After the Ack the daemon owns three things per peer: `uffd` (read it with one
//! non-blocking reader), `stream` (receive with [`Channel::recv_with_fds`] in its own
//! loop: `AgentReady` carries descriptors; send `SwapState`, `StartAgent`,
//! `CoverageRequest`, `Bye`), and the pid (open a pidfd for exit).
//!
//! ```no_run
//! # fn demo() -> Result<(), usm_proto::ProtoError> {
//! use usm_proto::server::{self, Listener};
//! let listener = Listener::bind("/run/usm/usm.sock".as_ref())?;
//! loop {
//!     match server::accept(&listener) {
//!         Ok(peer) => {
//!             // UFFDIO_API on peer.uffd with EVENT_FORK|REMAP|REMOVE|UNMAP|THREAD_ID ...
//!             peer.ack(0, "policyOne")?;
//!         }
//!         Err(e) if e.is_peer_fault() => eprintln!("tagger refused: {e}"),
//!         Err(e) => return Err(e),
//!     }
//! }
//! # }
//! ```

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

pub use crate::sys::{Listener, PeerCredentials, set_socket_file_mode};

use crate::error::ProtoError;
use crate::sys::{Channel, effective_uid};
use crate::wire::{Message, RefusalReason};

/// How long a connected peer has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A tagged process that said Hello and passed the credential check.
#[derive(Debug)]
pub struct TaggedPeer {
    /// Its pid (from `SO_PEERCRED`, equal to Hello's).
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its name (`comm`), used to choose a policy; control characters replaced
    /// ([`sanitize_name`]), so it is safe in a log line.
    pub name: String,
    /// Its userfaultfd, not negotiated yet: the daemon runs `UFFDIO_API` on it.
    pub uffd: OwnedFd,
    /// The connection, for the verdict and everything after it.
    pub stream: Channel,
}

impl TaggedPeer {
    /// Tells the tagger it is managed: `features` as negotiated, by `policy`.
    pub fn ack(&self, features: u64, policy: &str) -> Result<(), ProtoError> {
        self.stream.send(&Message::Ack {
            features,
            policy: policy.to_owned(),
        })
    }

    /// Tells the tagger it is not managed and drops the connection and the fd.
    pub fn refuse(self, reason: RefusalReason, text: &str) -> Result<(), ProtoError> {
        refuse_channel(&self.stream, reason, text)
    }

    /// Tells the tagger how many of its pages the daemon holds in swap.
    pub fn send_swap_state(&self, swapped_pages: u64) -> Result<(), ProtoError> {
        self.stream.send(&Message::SwapState { swapped_pages })
    }
}

fn refuse_channel(stream: &Channel, reason: RefusalReason, text: &str) -> Result<(), ProtoError> {
    let mut text = text;
    while text.len() > crate::wire::MAX_TEXT_LEN {
        // Cut on a char boundary rather than fail to say why.
        let mut cut = crate::wire::MAX_TEXT_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text = &text[..cut];
    }
    let text = text.replace('\0', " ");
    stream.send_nowait(&Message::Refused { reason, text })
}

/// May a peer with `peer_uid` attach to a daemon running as `daemon_uid`?
/// Same uid, or the daemon is root.
pub fn uid_allowed(peer_uid: u32, daemon_uid: u32) -> bool {
    daemon_uid == 0 || peer_uid == daemon_uid
}

/// Which users' programs a daemon accepts (checked on `SO_PEERCRED` before anything
/// else is read from the peer). The default — [`PeerRule::same_user`] — is the daemon's
/// own uid and root; a system daemon may add uids, or accept every user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerRule {
    /// Every uid is accepted.
    pub any_user: bool,
    /// Uids accepted besides the daemon's own and root.
    pub extra_uids: Vec<u32>,
}

impl PeerRule {
    /// The daemon's own uid and root only.
    pub fn same_user() -> PeerRule {
        PeerRule::default()
    }

    /// Parses a list of uids (`1000,1001`) or `*` (any user); empty = same user.
    pub fn parse(list: &str) -> Result<PeerRule, String> {
        let mut rule = PeerRule::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                rule.any_user = true;
            } else {
                let uid = item
                    .parse::<u32>()
                    .map_err(|_| format!("`{item}` is not a uid (expected numbers or `*`)"))?;
                rule.extra_uids.push(uid);
            }
        }
        Ok(rule)
    }

    /// May a peer running as `peer_uid` attach to a daemon running as `daemon_uid`?
    pub fn allows(&self, peer_uid: u32, daemon_uid: u32) -> bool {
        self.any_user
            || peer_uid == daemon_uid
            || peer_uid == 0
            || self.extra_uids.contains(&peer_uid)
    }

    /// Only the daemon's own uid (and root, who ignores file modes) can pass: the
    /// socket file may be `0600`. Otherwise it must be `0666` and this rule filters.
    pub fn socket_mode(&self) -> u32 {
        if self.any_user || !self.extra_uids.is_empty() {
            0o666
        } else {
            0o600
        }
    }
}

/// A process name made safe to print: control characters (newline, carriage return,
/// escape...) become `?`, so a name can never start a forged log line or move the
/// terminal's cursor. Applied at admission: every later use sees the safe form.
pub fn sanitize_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Accepts one tagger: waits for a connection, reads its Hello (at most
/// [`HELLO_TIMEOUT`]), checks `SO_PEERCRED` against the default [`PeerRule`] and takes
/// the attached userfaultfd.
///
/// On a peer fault the peer receives `Refused` with the reason (best effort) and the
/// error is returned; the listener is unaffected.
pub fn accept(listener: &Listener) -> Result<TaggedPeer, ProtoError> {
    let stream = listener.accept_channel()?;
    admit(stream)
}

/// The Hello/credential half of [`accept`], for a channel accepted elsewhere, with the
/// default [`PeerRule`] (same user and root).
pub fn admit(stream: Channel) -> Result<TaggedPeer, ProtoError> {
    admit_with(stream, &PeerRule::same_user())
}

/// [`admit`] with the daemon's [`PeerRule`].
pub fn admit_with(stream: Channel, rule: &PeerRule) -> Result<TaggedPeer, ProtoError> {
    match admit_inner(&stream, rule) {
        Ok((cred, name, uffd)) => Ok(TaggedPeer {
            pid: cred.pid,
            uid: cred.uid,
            name,
            uffd,
            stream,
        }),
        Err(err) => {
            let reason = match &err {
                ProtoError::ForeignUid { .. } | ProtoError::PidMismatch { .. } => {
                    RefusalReason::Credentials
                }
                ProtoError::Decode(crate::wire::DecodeError::UnsupportedVersion { .. }) => {
                    RefusalReason::VersionMismatch
                }
                _ => RefusalReason::Malformed,
            };
            if !err.is_peer_gone() {
                let _ = refuse_channel(&stream, reason, &err.to_string());
            }
            Err(err)
        }
    }
}

fn admit_inner(
    stream: &Channel,
    rule: &PeerRule,
) -> Result<(PeerCredentials, String, OwnedFd), ProtoError> {
    let cred = stream.peer_credentials()?;
    let daemon_uid = effective_uid();
    if !rule.allows(cred.uid, daemon_uid) {
        return Err(ProtoError::ForeignUid {
            peer_uid: cred.uid,
            daemon_uid,
        });
    }
    stream.set_recv_timeout(Some(HELLO_TIMEOUT))?;
    let (msg, mut fds) = stream.recv_with_fds().map_err(|e| match e {
        ProtoError::Timeout { .. } => ProtoError::Timeout { what: "Hello" },
        other => other,
    })?;
    stream.set_recv_timeout(None)?;
    let Message::Hello { pid, name, .. } = msg else {
        return Err(ProtoError::Unexpected {
            expected: "Hello",
            got: msg.name(),
        });
    };
    if fds.len() != 1 {
        return Err(ProtoError::BadFdCount {
            message: "Hello",
            count: fds.len(),
            expected: 1,
        });
    }
    if pid != cred.pid {
        return Err(ProtoError::PidMismatch {
            claimed: pid,
            actual: cred.pid,
        });
    }
    let uffd = fds.remove(0);
    // The daemon's reader must never block in `read`: a tagger could read its own copy
    // between the daemon's poll and read. (O_NONBLOCK is on the shared description.)
    crate::sys::set_nonblocking(uffd.as_fd())?;
    Ok((cred, sanitize_name(&name), uffd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_their_control_characters() {
        assert_eq!(
            sanitize_name("redis\nusm: pid 1 (sshd): managed\r\x1b[2J"),
            "redis?usm: pid 1 (sshd): managed??[2J"
        );
        assert_eq!(sanitize_name("stressapptest"), "stressapptest");
        assert_eq!(sanitize_name("été"), "été");
    }

    #[test]
    fn admission_makes_the_handed_fd_non_blocking_and_the_name_printable() {
        let (daemon, tagger) = Channel::pair().unwrap();
        let (r, _w) = crate::sys::hostile::pipe();
        assert!(!crate::sys::hostile::is_nonblocking(r.as_fd()));
        tagger
            .send_with_fd(
                &Message::Hello {
                    version: crate::PROTOCOL_VERSION,
                    pid: std::process::id(),
                    name: "a\nb".into(),
                },
                r.as_fd(),
            )
            .unwrap();
        let peer = admit(daemon).unwrap();
        assert_eq!(peer.name, "a?b");
        assert!(crate::sys::hostile::is_nonblocking(peer.uffd.as_fd()));
    }

    #[test]
    fn peer_rules() {
        let same = PeerRule::same_user();
        assert!(same.allows(1000, 1000) && same.allows(0, 1000) && same.allows(0, 0));
        assert!(!same.allows(1001, 1000) && !same.allows(1000, 0));
        assert_eq!(same.socket_mode(), 0o600);
        let some = PeerRule::parse("1000, 1001").unwrap();
        assert!(some.allows(1001, 0) && !some.allows(1002, 0));
        assert_eq!(some.socket_mode(), 0o666);
        assert!(PeerRule::parse("*").unwrap().allows(4242, 0));
        assert!(PeerRule::parse("bob").is_err());
        assert_eq!(PeerRule::parse("").unwrap(), same);
    }
}
