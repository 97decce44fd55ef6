//! Message encoding and the strict decoder.
//!
//! # Layout (all integers little-endian)
//! ```text
//!  0        4        6        8            12           16
//!  +--------+--------+--------+------------+------------+---------------------+
//!  | magic  |version | kind   | payload len| reserved=0 | payload (len bytes) |
//!  | "USMP" |  u16   |  u16   |    u32     |    u32     |                     |
//!  +--------+--------+--------+------------+------------+---------------------+
//! ```
//! Payloads (`text` fields are a `u16` byte length followed by UTF-8 without NUL):
//!
//! | kind | message          | direction        | payload                                      |
//! |------|------------------|------------------|----------------------------------------------|
//! | 1    | `Hello`          | tagger → daemon  | version u16, reserved u16 = 0, pid u32, name |
//! | 2    | `Ack`            | daemon → tagger  | features u64, policy                         |
//! | 3    | `Refused`        | daemon → tagger  | reason u16, text                             |
//! | 4    | `RegisterRange`  | tagger → daemon  | start u64, len u64, kind u8, pad 7 × 0       |
//! | 5    | `UnregisterRange`| tagger → daemon  | start u64, len u64                           |
//! | 6    | `Hint`           | tagger → daemon  | addr u64, len u64, text                      |
//! | 7    | `SwapState`      | daemon → tagger  | swapped_pages u64                            |
//! | 8    | `CoverageRequest`| daemon → tagger  | (empty)                                      |
//! | 9    | `Coverage`       | tagger → daemon  | managed_anon_bytes u64, anon_bytes u64       |
//! | 10   | `Bye`            | both             | (empty)                                      |
//! | 11   | `StartAgent`     | daemon → tagger  | staging_pages u32, ring_entries u32          |
//! | 12   | `AgentReady`     | tagger → daemon  | staging_start u64, staging_pages u32, ring_entries u32; 3 fds |
//! | 13   | `AgentUnavailable`| tagger → daemon | text                                         |
//! | 14   | `Adopted`        | daemon → tagger  | features u64, policy; 1 fd                   |
//!
//! `Hello` carries exactly one descriptor (the userfaultfd), `Adopted` one (the forked
//! child's inherited userfaultfd context), `AgentReady` exactly three (ring memfd, kick
//! eventfd, done eventfd; see [`crate::agent`]), every other message none.
//!
//! Ranges (`RegisterRange`, `UnregisterRange`) are page-aligned (4 KiB), non-empty and do
//! not wrap. A hint's range is non-empty and does not wrap (any alignment).
//! The payload length in the header must equal the bytes that follow, and every payload
//! must be consumed exactly: trailing bytes are an error, never ignored.

use thiserror::Error;

use crate::PROTOCOL_VERSION;

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"USMP";
/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Longest process name accepted in `Hello` (bytes).
pub const MAX_NAME_LEN: usize = 255;
/// Longest policy name accepted in `Ack` (bytes).
pub const MAX_POLICY_LEN: usize = 255;
/// Longest text in `Refused` and `Hint` (bytes).
pub const MAX_TEXT_LEN: usize = 1024;
/// No message is longer than this; a receive buffer of this size always suffices.
pub const MAX_MESSAGE_LEN: usize = HEADER_LEN + 24 + 2 + MAX_TEXT_LEN;
/// Alignment required of range starts and lengths.
pub const RANGE_ALIGN: u64 = 4096;

/// What kind of memory a managed range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RangeKind {
    /// A segment of the tagger's malloc heap.
    Heap = 1,
    /// A private anonymous `mmap` made by the program (or a library such as jemalloc).
    Mmap = 2,
}

/// Why the daemon refused a tagger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RefusalReason {
    /// The config names no policy for this process.
    NotConfigured = 1,
    /// The peer speaks another protocol version.
    VersionMismatch = 2,
    /// `SO_PEERCRED` check failed (other uid, or Hello's pid is not the peer's pid).
    Credentials = 3,
    /// The Hello was malformed or came without its userfaultfd.
    Malformed = 4,
    /// `UFFDIO_API` failed on the handed-over file descriptor.
    UffdApi = 5,
    /// The daemon cannot take more processes (or is shutting down).
    Busy = 6,
}

impl RefusalReason {
    fn from_wire(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::NotConfigured,
            2 => Self::VersionMismatch,
            3 => Self::Credentials,
            4 => Self::Malformed,
            5 => Self::UffdApi,
            6 => Self::Busy,
            _ => return None,
        })
    }
}

/// One protocol message. See the module docs for direction and layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message of a session; carries the un-negotiated userfaultfd as `SCM_RIGHTS`.
    Hello {
        /// Protocol version of the tagger.
        version: u16,
        /// The tagger's pid (must match `SO_PEERCRED`).
        pid: u32,
        /// Process name (`/proc/self/comm`), used to choose the policy.
        name: String,
    },
    /// The daemon took the process.
    Ack {
        /// `uffdio_api.features` as negotiated by the daemon.
        features: u64,
        /// Name of the policy that will manage the process.
        policy: String,
    },
    /// The daemon took a forked child of a managed process *into the space it already
    /// keeps for it* (the one made from the parent's `FORK` event): the attached
    /// descriptor is that space's userfaultfd context (the child's inherited memory is
    /// registered on it, and only the daemon held it). The tagger uses it instead of the
    /// fresh one it sent with Hello, so all of the child's memory is one space with one
    /// eviction agent. Otherwise as [`Message::Ack`].
    Adopted {
        /// `uffdio_api.features` of the inherited context.
        features: u64,
        /// Name of the policy that manages the process.
        policy: String,
    },
    /// The daemon does not manage this process; the tagger continues unmanaged.
    Refused {
        /// Machine-readable reason.
        reason: RefusalReason,
        /// Human-readable detail.
        text: String,
    },
    /// A range the tagger registered (advisory; the userfaultfd is authoritative).
    RegisterRange {
        /// Page-aligned start.
        start: u64,
        /// Page-aligned, non-zero length.
        len: u64,
        /// Heap segment or direct mmap.
        kind: RangeKind,
    },
    /// A range the program unmapped (may name memory the daemon never saw: ignore it).
    UnregisterRange {
        /// Page-aligned start.
        start: u64,
        /// Page-aligned, non-zero length.
        len: u64,
    },
    /// A hint from `usm_hint()`/`usm_hint_range()`, to be applied to the process's
    /// space (the two-argument form's range is resolved in the program, by the tagger).
    Hint {
        /// Start of the hinted range.
        addr: u64,
        /// Non-zero length of the hinted range.
        len: u64,
        /// Hint text in the hint language (`usm_policies::hint`). `libusm` also sends a
        /// text it refused, so that the daemon counts and logs it; the daemon refuses it
        /// with the same parser.
        text: String,
    },
    /// How many pages of this process the daemon holds in swap (0 = none).
    SwapState {
        /// Pages swapped out and not yet back in the address space.
        swapped_pages: u64,
    },
    /// The daemon asks for a coverage report.
    CoverageRequest,
    /// Managed anonymous memory over all anonymous memory, from `/proc/self/smaps`.
    Coverage {
        /// Anonymous resident bytes in userfaultfd-registered ranges.
        managed_anon_bytes: u64,
        /// All anonymous resident bytes.
        anon_bytes: u64,
    },
    /// End of session (see the module docs for what it means from each side).
    Bye,
    /// The daemon asks for an eviction agent ([`crate::agent`]).
    StartAgent {
        /// Staging slots (4 KiB pages), 1..=[`crate::agent::MAX_STAGING_PAGES`].
        staging_pages: u32,
        /// Ring entries, a power of two up to [`crate::agent::MAX_RING_ENTRIES`].
        ring_entries: u32,
    },
    /// The agent runs; carries ring memfd, kick and done eventfds.
    AgentReady {
        /// Page-aligned start of the staging area in the tagged process.
        staging_start: u64,
        /// Staging slots.
        staging_pages: u32,
        /// Ring entries.
        ring_entries: u32,
    },
    /// The agent could not start (the process stays managed, without eviction).
    AgentUnavailable {
        /// Why.
        text: String,
    },
}

/// Why a datagram is not a valid message.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the fixed header.
    #[error("message of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    ShortHeader {
        /// Bytes received.
        len: usize,
    },
    /// The magic is not `USMP`.
    #[error("bad magic {found:02x?}, expected \"USMP\"")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// Another protocol version.
    #[error("protocol version {found} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// Unknown message kind.
    #[error("unknown message kind {kind}")]
    UnknownKind {
        /// The kind found.
        kind: u16,
    },
    /// Reserved bytes are not zero.
    #[error("reserved field is {found:#x}, must be 0")]
    ReservedNotZero {
        /// The value found.
        found: u64,
    },
    /// Header length and datagram length disagree.
    #[error("header declares {declared} payload bytes but {actual} follow")]
    LengthMismatch {
        /// Length in the header.
        declared: u32,
        /// Bytes actually present.
        actual: usize,
    },
    /// The payload ends before a field.
    #[error("payload truncated while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes left after the last field.
    #[error("{extra} trailing bytes after the payload")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A text field is too long, not UTF-8, contains NUL, or is empty where required.
    #[error("field {field}: {why}")]
    BadText {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A range is empty, misaligned or wraps around.
    #[error("bad range start={start:#x} len={len:#x}: {why}")]
    BadRange {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Unknown range kind.
    #[error("unknown range kind {kind}")]
    BadRangeKind {
        /// The byte found.
        kind: u8,
    },
    /// Unknown refusal reason.
    #[error("unknown refusal reason {code}")]
    BadReason {
        /// The code found.
        code: u16,
    },
    /// Hello's own version field differs from the header's.
    #[error("hello version {hello} differs from header version {header}")]
    VersionDisagrees {
        /// Version in the header.
        header: u16,
        /// Version in the Hello payload.
        hello: u16,
    },
    /// Hello with pid 0.
    #[error("hello with pid 0")]
    ZeroPid,
    /// An agent message's sizes are out of range.
    #[error("bad agent parameters: {why}")]
    BadAgent {
        /// What is wrong.
        why: &'static str,
    },
    /// Coverage claims more managed than total bytes.
    #[error("coverage managed {managed} > anonymous {anon}")]
    BadCoverage {
        /// Managed bytes.
        managed: u64,
        /// Total anonymous bytes.
        anon: u64,
    },
}

/// Why a message cannot be encoded (a caller bug: a field breaks the limits above).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The value would be refused by [`decode`].
    #[error("message would be refused by the decoder: {0}")]
    Invalid(#[from] DecodeError),
}

impl Message {
    /// Wire kind number.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => 1,
            Message::Ack { .. } => 2,
            Message::Refused { .. } => 3,
            Message::RegisterRange { .. } => 4,
            Message::UnregisterRange { .. } => 5,
            Message::Hint { .. } => 6,
            Message::SwapState { .. } => 7,
            Message::CoverageRequest => 8,
            Message::Coverage { .. } => 9,
            Message::Bye => 10,
            Message::StartAgent { .. } => 11,
            Message::AgentReady { .. } => 12,
            Message::AgentUnavailable { .. } => 13,
            Message::Adopted { .. } => 14,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Ack { .. } => "Ack",
            Message::Refused { .. } => "Refused",
            Message::RegisterRange { .. } => "RegisterRange",
            Message::UnregisterRange { .. } => "UnregisterRange",
            Message::Hint { .. } => "Hint",
            Message::SwapState { .. } => "SwapState",
            Message::CoverageRequest => "CoverageRequest",
            Message::Coverage { .. } => "Coverage",
            Message::Bye => "Bye",
            Message::StartAgent { .. } => "StartAgent",
            Message::AgentReady { .. } => "AgentReady",
            Message::AgentUnavailable { .. } => "AgentUnavailable",
            Message::Adopted { .. } => "Adopted",
        }
    }

    /// How many descriptors travel with this message (`SCM_RIGHTS`).
    pub fn expected_fds(&self) -> usize {
        match self {
            Message::Hello { .. } | Message::Adopted { .. } => 1,
            Message::AgentReady { .. } => 3,
            _ => 0,
        }
    }

    /// Checks the limits the decoder enforces, so nothing invalid is ever sent.
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Message::Hello { version, pid, name } => {
                if *version != PROTOCOL_VERSION {
                    return Err(DecodeError::UnsupportedVersion { found: *version });
                }
                if *pid == 0 {
                    return Err(DecodeError::ZeroPid);
                }
                check_text("name", name, MAX_NAME_LEN, false)
            }
            Message::Ack { policy, .. } | Message::Adopted { policy, .. } => {
                check_text("policy", policy, MAX_POLICY_LEN, false)
            }
            Message::Refused { text, .. } => check_text("text", text, MAX_TEXT_LEN, true),
            Message::RegisterRange { start, len, .. } | Message::UnregisterRange { start, len } => {
                check_range(*start, *len, true)
            }
            Message::Hint { addr, len, text } => {
                check_range(*addr, *len, false)?;
                check_text("hint", text, MAX_TEXT_LEN, false)
            }
            Message::Coverage {
                managed_anon_bytes,
                anon_bytes,
            } => {
                if managed_anon_bytes > anon_bytes {
                    return Err(DecodeError::BadCoverage {
                        managed: *managed_anon_bytes,
                        anon: *anon_bytes,
                    });
                }
                Ok(())
            }
            Message::StartAgent {
                staging_pages,
                ring_entries,
            }
            | Message::AgentReady {
                staging_pages,
                ring_entries,
                ..
            } => {
                if *staging_pages == 0 || *staging_pages > crate::agent::MAX_STAGING_PAGES {
                    return Err(DecodeError::BadAgent {
                        why: "staging pages out of range",
                    });
                }
                if !ring_entries.is_power_of_two() || *ring_entries > crate::agent::MAX_RING_ENTRIES
                {
                    return Err(DecodeError::BadAgent {
                        why: "ring entries not a power of two in range",
                    });
                }
                if let Message::AgentReady { staging_start, .. } = self {
                    check_range(
                        *staging_start,
                        u64::from(*staging_pages) * RANGE_ALIGN,
                        true,
                    )?;
                }
                Ok(())
            }
            // The daemon logs this text as it is: a line break in it would forge a line.
            Message::AgentUnavailable { text } => {
                check_text("text", text, MAX_TEXT_LEN, true)?;
                if text.chars().any(char::is_control) {
                    return Err(DecodeError::BadText {
                        field: "text",
                        why: "contains a control character",
                    });
                }
                Ok(())
            }
            Message::SwapState { .. } | Message::CoverageRequest | Message::Bye => Ok(()),
        }
    }
}

fn check_text(
    field: &'static str,
    text: &str,
    max: usize,
    may_be_empty: bool,
) -> Result<(), DecodeError> {
    if text.len() > max {
        return Err(DecodeError::BadText {
            field,
            why: "too long",
        });
    }
    if text.is_empty() && !may_be_empty {
        return Err(DecodeError::BadText {
            field,
            why: "empty",
        });
    }
    if text.as_bytes().contains(&0) {
        return Err(DecodeError::BadText {
            field,
            why: "contains NUL",
        });
    }
    Ok(())
}

fn check_range(start: u64, len: u64, aligned: bool) -> Result<(), DecodeError> {
    let bad = |why| Err(DecodeError::BadRange { start, len, why });
    if len == 0 {
        return bad("empty");
    }
    if start.checked_add(len).is_none() {
        return bad("wraps around the address space");
    }
    if aligned && (start % RANGE_ALIGN != 0 || len % RANGE_ALIGN != 0) {
        return bad("not page-aligned");
    }
    Ok(())
}

/// A fixed-capacity encoder: never allocates, so the tagger can encode inside its
/// allocator.
struct Writer<'a> {
    buf: &'a mut [u8; MAX_MESSAGE_LEN],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        // Every message's size is bounded by MAX_MESSAGE_LEN once validated.
        let end = self.pos + bytes.len();
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn text(&mut self, s: &str) {
        // Validated: s.len() <= MAX_TEXT_LEN < u16::MAX.
        self.u16(s.len() as u16);
        self.put(s.as_bytes());
    }
}

/// Encodes `msg` into `buf` and returns the message's length. Never allocates.
pub fn encode(msg: &Message, buf: &mut [u8; MAX_MESSAGE_LEN]) -> Result<usize, EncodeError> {
    msg.validate()?;
    let mut w = Writer { buf, pos: 0 };
    w.put(&MAGIC);
    w.u16(PROTOCOL_VERSION);
    w.u16(msg.kind());
    w.u32(0); // payload length, patched below
    w.u32(0);
    match msg {
        Message::Hello { version, pid, name } => {
            w.u16(*version);
            w.u16(0);
            w.u32(*pid);
            w.text(name);
        }
        Message::Ack { features, policy } | Message::Adopted { features, policy } => {
            w.u64(*features);
            w.text(policy);
        }
        Message::Refused { reason, text } => {
            w.u16(*reason as u16);
            w.text(text);
        }
        Message::RegisterRange { start, len, kind } => {
            w.u64(*start);
            w.u64(*len);
            w.u8(*kind as u8);
            w.put(&[0; 7]);
        }
        Message::UnregisterRange { start, len } => {
            w.u64(*start);
            w.u64(*len);
        }
        Message::Hint { addr, len, text } => {
            w.u64(*addr);
            w.u64(*len);
            w.text(text);
        }
        Message::SwapState { swapped_pages } => w.u64(*swapped_pages),
        Message::Coverage {
            managed_anon_bytes,
            anon_bytes,
        } => {
            w.u64(*managed_anon_bytes);
            w.u64(*anon_bytes);
        }
        Message::CoverageRequest | Message::Bye => {}
        Message::StartAgent {
            staging_pages,
            ring_entries,
        } => {
            w.u32(*staging_pages);
            w.u32(*ring_entries);
        }
        Message::AgentReady {
            staging_start,
            staging_pages,
            ring_entries,
        } => {
            w.u64(*staging_start);
            w.u32(*staging_pages);
            w.u32(*ring_entries);
        }
        Message::AgentUnavailable { text } => w.text(text),
    }
    let len = w.pos;
    let payload = (len - HEADER_LEN) as u32;
    buf[8..12].copy_from_slice(&payload.to_le_bytes());
    Ok(len)
}

/// Encodes into a fresh buffer (convenience for code that may allocate).
pub fn encode_to_vec(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let len = encode(msg, &mut buf)?;
    Ok(buf[..len].to_vec())
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn text(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::BadText {
                field,
                why: "too long",
            });
        }
        let bytes = self.take(len, field)?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::BadText {
            field,
            why: "not UTF-8",
        })?;
        Ok(text.to_owned())
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                extra: self.rest.len(),
            })
        }
    }
}

/// Decodes one whole message, refusing anything malformed. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::ShortHeader { len: bytes.len() });
    }
    let mut r = Reader { rest: bytes };
    let magic: [u8; 4] = r.array("magic")?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let version = r.u16("version")?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let kind = r.u16("kind")?;
    let declared = r.u32("length")?;
    let reserved = r.u32("reserved")?;
    if reserved != 0 {
        return Err(DecodeError::ReservedNotZero {
            found: u64::from(reserved),
        });
    }
    let actual = bytes.len() - HEADER_LEN;
    if usize::try_from(declared).ok() != Some(actual) {
        return Err(DecodeError::LengthMismatch { declared, actual });
    }
    let msg = match kind {
        1 => {
            let hello_version = r.u16("hello.version")?;
            let reserved = r.u16("hello.reserved")?;
            if reserved != 0 {
                return Err(DecodeError::ReservedNotZero {
                    found: u64::from(reserved),
                });
            }
            if hello_version != version {
                return Err(DecodeError::VersionDisagrees {
                    header: version,
                    hello: hello_version,
                });
            }
            let pid = r.u32("hello.pid")?;
            let name = r.text("name", MAX_NAME_LEN)?;
            Message::Hello {
                version: hello_version,
                pid,
                name,
            }
        }
        2 => {
            let features = r.u64("ack.features")?;
            let policy = r.text("policy", MAX_POLICY_LEN)?;
            Message::Ack { features, policy }
        }
        3 => {
            let code = r.u16("refused.reason")?;
            let reason = RefusalReason::from_wire(code).ok_or(DecodeError::BadReason { code })?;
            let text = r.text("text", MAX_TEXT_LEN)?;
            Message::Refused { reason, text }
        }
        4 => {
            let start = r.u64("range.start")?;
            let len = r.u64("range.len")?;
            let kind = match r.u8("range.kind")? {
                1 => RangeKind::Heap,
                2 => RangeKind::Mmap,
                other => return Err(DecodeError::BadRangeKind { kind: other }),
            };
            let pad: [u8; 7] = r.array("range.pad")?;
            if pad != [0; 7] {
                return Err(DecodeError::ReservedNotZero {
                    found: u64::from_le_bytes([
                        pad[0], pad[1], pad[2], pad[3], pad[4], pad[5], pad[6], 0,
                    ]),
                });
            }
            Message::RegisterRange { start, len, kind }
        }
        5 => {
            let start = r.u64("range.start")?;
            let len = r.u64("range.len")?;
            Message::UnregisterRange { start, len }
        }
        6 => {
            let addr = r.u64("hint.addr")?;
            let len = r.u64("hint.len")?;
            let text = r.text("hint", MAX_TEXT_LEN)?;
            Message::Hint { addr, len, text }
        }
        7 => Message::SwapState {
            swapped_pages: r.u64("swap.pages")?,
        },
        8 => Message::CoverageRequest,
        9 => Message::Coverage {
            managed_anon_bytes: r.u64("coverage.managed")?,
            anon_bytes: r.u64("coverage.anon")?,
        },
        10 => Message::Bye,
        11 => Message::StartAgent {
            staging_pages: r.u32("agent.staging_pages")?,
            ring_entries: r.u32("agent.ring_entries")?,
        },
        12 => Message::AgentReady {
            staging_start: r.u64("agent.staging_start")?,
            staging_pages: r.u32("agent.staging_pages")?,
            ring_entries: r.u32("agent.ring_entries")?,
        },
        13 => Message::AgentUnavailable {
            text: r.text("text", MAX_TEXT_LEN)?,
        },
        14 => Message::Adopted {
            features: r.u64("adopted.features")?,
            policy: r.text("policy", MAX_POLICY_LEN)?,
        },
        other => return Err(DecodeError::UnknownKind { kind: other }),
    };
    r.finish()?;
    msg.validate()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                pid: 42,
                name: "redis-server".into(),
            },
            Message::Ack {
                features: 0x1f,
                policy: "policyOne".into(),
            },
            Message::Refused {
                reason: RefusalReason::NotConfigured,
                text: String::new(),
            },
            Message::RegisterRange {
                start: 0x7f00_0000_0000,
                len: 1 << 20,
                kind: RangeKind::Heap,
            },
            Message::UnregisterRange {
                start: 0x1000,
                len: 0x2000,
            },
            Message::Hint {
                addr: 3,
                len: 5,
                text: "sequential".into(),
            },
            Message::SwapState { swapped_pages: 7 },
            Message::CoverageRequest,
            Message::Coverage {
                managed_anon_bytes: 1,
                anon_bytes: 2,
            },
            Message::Bye,
            Message::StartAgent {
                staging_pages: 64,
                ring_entries: 32,
            },
            Message::AgentReady {
                staging_start: 0x7f00_0000_0000,
                staging_pages: 64,
                ring_entries: 32,
            },
            Message::AgentUnavailable {
                text: "no UFFD_FEATURE_MOVE".into(),
            },
            Message::Adopted {
                features: 0x1f,
                policy: "default".into(),
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for msg in samples() {
            let bytes = encode_to_vec(&msg).unwrap();
            assert_eq!(decode(&bytes).unwrap(), msg, "{}", msg.name());
            // Every strict prefix is refused.
            for cut in 0..bytes.len() {
                assert!(
                    decode(&bytes[..cut]).is_err(),
                    "{} cut at {cut}",
                    msg.name()
                );
            }
        }
    }

    #[test]
    fn header_errors_are_typed() {
        let good = encode_to_vec(&Message::Bye).unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(DecodeError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(
            decode(&bad),
            Err(DecodeError::UnsupportedVersion { found: 9 })
        );
        let mut bad = good.clone();
        bad[6] = 99;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind { kind: 99 }));
        let mut bad = good.clone();
        bad[12] = 1;
        assert_eq!(decode(&bad), Err(DecodeError::ReservedNotZero { found: 1 }));
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(
            decode(&bad),
            Err(DecodeError::LengthMismatch {
                declared: 0,
                actual: 1
            })
        );
    }

    #[test]
    fn payload_errors_are_typed() {
        let mut hello = encode_to_vec(&Message::Hello {
            version: 1,
            pid: 1,
            name: "ab".into(),
        })
        .unwrap();
        let n = hello.len();
        hello[n - 1] = 0xff; // invalid UTF-8
        assert!(matches!(
            decode(&hello),
            Err(DecodeError::BadText {
                why: "not UTF-8",
                ..
            })
        ));
        hello[n - 1] = 0;
        assert!(matches!(
            decode(&hello),
            Err(DecodeError::BadText {
                why: "contains NUL",
                ..
            })
        ));
        // A line break in a text the daemon logs as it is: refused.
        assert!(matches!(
            encode_to_vec(&Message::AgentUnavailable {
                text: "no\nFORGED line".into()
            }),
            Err(EncodeError::Invalid(DecodeError::BadText {
                why: "contains a control character",
                ..
            }))
        ));

        let mut range = encode_to_vec(&Message::RegisterRange {
            start: 0x1000,
            len: 0x1000,
            kind: RangeKind::Mmap,
        })
        .unwrap();
        range[HEADER_LEN] = 1; // start 0x1001
        assert!(matches!(
            decode(&range),
            Err(DecodeError::BadRange {
                why: "not page-aligned",
                ..
            })
        ));
        range[HEADER_LEN] = 0;
        range[HEADER_LEN + 16] = 9;
        assert_eq!(decode(&range), Err(DecodeError::BadRangeKind { kind: 9 }));

        assert!(
            encode_to_vec(&Message::Hint {
                addr: u64::MAX,
                len: 2,
                text: "x".into()
            })
            .is_err()
        );
        assert!(
            encode_to_vec(&Message::Hello {
                version: 1,
                pid: 0,
                name: "x".into()
            })
            .is_err()
        );
    }
}
