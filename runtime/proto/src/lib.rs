//! The wire protocol between tagged programs and the USM daemon.
//!
//! Both sides link this crate: the tagger (`libusm_tagger.so`, loaded with `LD_PRELOAD`)
//! uses [`client`], the daemon (`usm run`) uses [`server`]. Nothing here depends on the
//! daemon, so a tagged program never loads it.
//!
//! # Transport
//! A unix `SOCK_SEQPACKET` socket (default path [`DEFAULT_SOCKET_PATH`], overridden in
//! the tagger by `USM_SOCKET`). One datagram carries exactly one message; the message is
//! also length-prefixed (see [`wire`]) so the decoder can check that the datagram is
//! exactly one whole message. Messages larger than [`wire::MAX_MESSAGE_LEN`] do not exist.
//!
//! # Session, step by step (who owns what)
//! 1. **Connect.** The tagger connects ([`client::connect`]) and checks who listens
//!    (`SO_PEERCRED`): a daemon running as another user than the program (and not as
//!    root) never receives anything.
//! 2. **Hello + fd.** The tagger opens a userfaultfd (`/dev/userfaultfd`, falling back to
//!    the syscall), *does not* negotiate it, and sends [`Message::Hello`] with that fd
//!    attached as `SCM_RIGHTS`. From here the same open file description is shared: the
//!    tagger keeps its copy, the daemon owns its copy.
//! 3. **Verdict.** The daemon ([`server::accept`]) checks `SO_PEERCRED` against its
//!    [`server::PeerRule`] (default: its own uid and root; the pid in Hello equals the
//!    credential's pid) and sanitises the name ([`server::sanitize_name`]), runs `UFFDIO_API` on
//!    its copy with its own privileges (handler mode, `EVENT_FORK | EVENT_REMAP |
//!    EVENT_REMOVE | EVENT_UNMAP | THREAD_ID`, never `UFFD_USER_MODE_ONLY`), and answers
//!    [`Message::Ack`] (features negotiated, policy name) or [`Message::Refused`].
//!    A refused tagger closes its copy and runs unmanaged. A forked child of a managed
//!    process may instead get [`Message::Adopted`] with its *inherited* userfaultfd
//!    context attached: it closes the fresh one and keeps that one.
//! 4. **Managed.** After the Ack the tagger registers its ranges itself
//!    (`UFFDIO_REGISTER` MISSING on its own copy works because the context is shared) and
//!    tells the daemon with advisory [`Message::RegisterRange`] / [`Message::UnregisterRange`]
//!    (sent `MSG_DONTWAIT`: a full socket drops them, the kernel's UNMAP/REMAP events on
//!    the userfaultfd stay authoritative). It may send [`Message::Hint`] (from `usm_hint`)
//!    and answers [`Message::CoverageRequest`] with [`Message::Coverage`].
//!    The daemon keeps the tagger informed with [`Message::SwapState`]: whether it holds
//!    swapped pages of this process. It may start the eviction agent
//!    ([`Message::StartAgent`] → [`Message::AgentReady`] with a shared ring, see
//!    [`agent`]).
//! 5. **End.** Either side sends [`Message::Bye`]. A daemon's Bye means "every page is
//!    back in your address space": the tagger closes its copy of the userfaultfd (the
//!    kernel then unregisters every range) and continues unmanaged. If the socket closes
//!    without Bye while the last [`Message::SwapState`] said pages are swapped, the
//!    tagger kills its process with a message: it must never read zeros in place of data.
//!
//! # What the daemon must do (the contract the tagger relies on)
//! - Negotiate `UFFDIO_API` on [`server::TaggedPeer::uffd`] *before* the Ack (the tagger
//!   registers ranges right after it, which fails on an un-negotiated context) with at
//!   least `EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP`; add `MOVE` to be able
//!   to start the eviction agent, `THREAD_ID` for per-thread accounting. Never
//!   `UFFD_USER_MODE_ONLY`, never `SIGBUS` (faults must reach the daemon's reader).
//! - Read the userfaultfd with one non-blocking reader; serve `PAGEFAULT`s, take the new
//!   descriptor of every `FORK` event (the child's context: nobody else has it), treat
//!   `REMAP`/`REMOVE`/`UNMAP` as authoritative for range changes.
//! - Keep [`Message::SwapState`] current: `swapped_pages` counts pages whose only copy
//!   is outside the process (written to swap *and* dropped from staging). Send it
//!   before asking the agent to drop slots; pages still in staging are not counted
//!   (the tagger puts those back itself if the daemon disappears).
//! - Serve a page that was never evicted as zeros (`UFFDIO_ZEROPAGE`, or a zeroed
//!   `UFFDIO_COPY`): the tagger's `calloc` relies on fresh heap memory being zero.
//! - Never make the userfaultfd reader wait for a reply on the socket: threads of the
//!   program may hold its heap lock while they wait for a fault.
//! - Expect a Hello from every forked child of a managed process (its own pid, the
//!   same name, a new userfaultfd); the child's *inherited* memory is on the context
//!   delivered by the parent's `FORK` event (the child's `PPid` in `/proc/<pid>/status`
//!   names the parent). Answer `Adopted` with that context attached to make the child
//!   one space with one context (drop the new one un-negotiated), or `Ack` to keep the
//!   two apart.
//! - Treat [`Message::RegisterRange`]/[`Message::UnregisterRange`] as advisory (they may
//!   be dropped when the socket is full, and may name memory never seen).
//! - To let a process go while alive: put every page back, then send [`Message::Bye`].
//!
//! # Strictness
//! [`wire::decode`] refuses anything malformed with a typed [`wire::DecodeError`] and never
//! panics (fuzzed with proptest). A datagram that was truncated, or that carries a file
//! descriptor where none is expected (or none where Hello needs one), is refused at the
//! socket layer with a [`ProtoError`].

#![deny(unsafe_code)]

pub mod agent;
pub mod client;
pub mod coverage;
mod error;
pub mod maps;
pub mod preload;
pub mod server;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
mod sys;
pub mod wire;

pub use error::ProtoError;
pub use wire::{Message, RangeKind, RefusalReason};

/// Protocol version spoken by this crate; a peer speaking another one is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Where the daemon listens unless configured otherwise (`USM_SOCKET` in the tagger).
pub const DEFAULT_SOCKET_PATH: &str = "/run/usm/usm.sock";

/// Environment variable the tagger reads for the socket path.
pub const SOCKET_ENV: &str = "USM_SOCKET";

pub use sys::Channel;
