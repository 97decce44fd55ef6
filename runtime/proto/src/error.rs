//! The crate's error type.

use std::io;

use thiserror::Error;

use crate::wire::{DecodeError, EncodeError, MAX_MESSAGE_LEN, RefusalReason};

/// Everything that can go wrong on either side of a session.
#[derive(Debug, Error)]
pub enum ProtoError {
    /// A socket system call failed; the errno is kept as the source.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation (`connect`, `sendmsg`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection (orderly EOF).
    #[error("peer closed the connection")]
    Closed,
    /// No message arrived within the timeout.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
    },
    /// The datagram is not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// We were asked to send something the peer's decoder would refuse.
    #[error("{0}")]
    Encode(#[from] EncodeError),
    /// The datagram (or its control data) was longer than any valid message.
    #[error("message truncated: longer than {MAX_MESSAGE_LEN} bytes or too many descriptors")]
    Truncated,
    /// A message came with the wrong number of file descriptors.
    #[error("{message} carried {count} file descriptor(s), expected {expected}")]
    BadFdCount {
        /// The message name.
        message: &'static str,
        /// Descriptors received (all were closed).
        count: usize,
        /// Descriptors expected.
        expected: usize,
    },
    /// A valid message arrived where another one was required.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol state requires.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The daemon refused the tagger.
    #[error("refused by the daemon ({reason:?}): {text}")]
    Refused {
        /// Machine-readable reason.
        reason: RefusalReason,
        /// Detail from the daemon.
        text: String,
    },
    /// The peer runs as another user and the daemon is not root.
    #[error("peer uid {peer_uid} may not attach to a daemon running as uid {daemon_uid}")]
    ForeignUid {
        /// The peer's uid (SO_PEERCRED).
        peer_uid: u32,
        /// The daemon's effective uid.
        daemon_uid: u32,
    },
    /// The process listening on the socket runs as another user than this program (and
    /// is not root): handing it the userfaultfd would let that user read and write this
    /// program's memory.
    #[error(
        "the daemon at the socket runs as uid {daemon_uid}, neither this program's uid \
         {own_uid} nor root: not handing it this program's memory"
    )]
    UntrustedDaemon {
        /// The listener's uid (SO_PEERCRED of the connected socket).
        daemon_uid: u32,
        /// This program's effective uid.
        own_uid: u32,
    },
    /// Hello's pid is not the socket peer's pid.
    #[error("Hello claims pid {claimed} but the socket peer is pid {actual}")]
    PidMismatch {
        /// The pid in Hello.
        claimed: u32,
        /// The pid from SO_PEERCRED.
        actual: u32,
    },
    /// The agent's ring or staging description is inconsistent.
    #[error("bad agent setup: {why}")]
    BadAgentSetup {
        /// What is wrong.
        why: &'static str,
    },
    /// As many agent requests are outstanding as the ring has entries.
    #[error("agent ring full: collect completions first")]
    AgentRingFull,
    /// The socket path does not fit in `sockaddr_un`.
    #[error("socket path is {len} bytes, longer than sun_path allows")]
    PathTooLong {
        /// Its length.
        len: usize,
    },
}

impl ProtoError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }

    pub(crate) fn last_os(op: &'static str) -> Self {
        Self::io(op, io::Error::last_os_error())
    }

    /// The errno behind this error, if it came from the OS.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Trying the same operation again may succeed (interrupted, would block, timed out).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::AgentRingFull)
            || matches!(self.errno(), Some(libc::EINTR | libc::EAGAIN))
    }

    /// The peer is gone: the session is over.
    pub fn is_peer_gone(&self) -> bool {
        matches!(self, Self::Closed)
            || matches!(
                self.errno(),
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ECONNREFUSED)
            )
    }

    /// The error is the peer's fault (malformed data, bad credentials, timeout): a daemon
    /// logs it, drops this connection and keeps serving the others.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(
            self,
            Self::Io { .. } | Self::Encode(_) | Self::PathTooLong { .. }
        ) || self.is_peer_gone()
    }
}
