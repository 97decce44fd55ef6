//! The tagger's session with the daemon, from the constructor to exit.
//!
//! # States
//! ```text
//!            constructor                         Ack
//! Starting ─────────────► Hello + uffd sent ───────────► Managed ──┐
//!     │                         │ Refused / timeout /       │      │ socket closed,
//!     │ no daemon / no uffd     │ socket error              │      │ SwapState said 0 pages,
//!     ▼                         ▼                           │      │ or daemon Bye
//! Unmanaged ◄───────────────────┴───────────────────────────┼──────┘
//!  (one warning line on stderr when it was not by choice)   │ socket closed while pages
//!                                                           ▼ are swapped
//!                                             message on stderr + SIGKILL
//! ```
//! - *Starting*: heap segments are remembered; `mmap`s are left alone.
//! - *Managed*: the tagger keeps its copy of the userfaultfd and registers new memory on
//!   it; a watcher thread (`usm-tagger`) reads the daemon's messages.
//! - *Unmanaged*: nothing is registered any more. Detaching replaces the tagger's copy
//!   of the userfaultfd with `/dev/null`; once the daemon's copies are gone too the
//!   kernel unregisters every range and the program continues on kernel memory.
//! - *fork*: the child inherits the ranges on a new userfaultfd context that only the
//!   daemon holds (`EVENT_FORK`); the tagger's inherited copy belongs to the *parent's*
//!   context, so the child points it (and the parent's socket) at `/dev/null`, goes
//!   back to *Starting* and attaches on its own from a thread (see
//!   `after_fork_in_child`); the daemon hands it the inherited context back
//!   (`Adopted`), so the child ends up an ordinary managed process. Pages that were out of the parent at `fork` count as the
//!   child's swapped pages: the daemon's death kills the child with a message. The
//!   child also forgets the parent's eviction agent (its thread and staging area were
//!   not inherited; the child's own session may start one) and closes the watcher's
//!   clone of the parent's socket (else the parent's session stays open as long as the
//!   child lives).
//!
//! # The message thread never waits for the managed heap
//! Program threads hold the heap lock (`sys::heap`) while dlmalloc touches managed
//! memory, so they may hold it across a fault that only the daemon can serve. The
//! daemon in turn needs the message thread to keep draining the socket (its
//! `SwapState`s, coverage requests) to make progress with eviction. So once the session
//! is managed, the message loop (`watch`) never allocates and takes no lock a program
//! thread can hold:
//! - messages are received into a buffer on its stack, and only the kinds it serves
//!   (`SwapState`, `CoverageRequest`, `StartAgent`, `Bye`) are decoded (decoding a text
//!   message would allocate its `String`); anything else is reported by kind number;
//! - coverage is parsed from `/proc/self/smaps` as it streams through a fixed buffer
//!   (`sys::self_coverage`), and the reply is sent without blocking (a daemon that does
//!   not read its socket gets no answer, and asks again);
//! - warnings are formatted on the stack (`warn_fmt`), never with `format!`, and no
//!   error is displayed through `io::Error` (whose `Display` allocates).
//!
//! What the message thread (and a fork child's attach thread) does allocate comes from
//! the tagger's own arena (`sys::arena`: unmanaged memory, its own lock), never from
//! the managed heap: `StartAgent` runs `agent::start`, which spawns the agent thread
//! (its name, handles, closure, glibc's thread bookkeeping), and a daemon that attaches
//! descriptors to a message makes the receive path allocate their list (the daemon
//! never does). Setup in the constructor allocates on the managed heap before the
//! program runs.

use std::fmt::Write as _;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use usm_proto::coverage::Coverage;
use usm_proto::{Channel, DEFAULT_SOCKET_PATH, Message, ProtoError, SOCKET_ENV, client, wire};

use crate::state::{self, Mode};
use crate::sys;

/// Prefix of every line the tagger writes.
const TAG: &str = "usm-tagger";

pub(crate) fn warn(line: &str) {
    warn_fmt(format_args!("{line}"));
}

/// Writes `usm-tagger: ARGS` as one line, formatted on the stack (no allocation; a
/// line longer than [`StackLine`]'s buffer is cut short).
pub(crate) fn warn_fmt(args: std::fmt::Arguments<'_>) {
    // One write(2) per line, so lines from several processes do not interleave.
    let mut line = StackLine::new();
    let _ = write!(line, "{TAG}: {args}");
    line.end_line();
    sys::write_stderr(line.as_bytes());
}

/// The daemon's socket, for forked children to attach on their own.
static SOCKET_PATH: OnceLock<PathBuf> = OnceLock::new();

/// Runs in the library constructor. Never fails: every problem ends in Unmanaged.
pub(crate) fn start() {
    if std::env::var_os("USM_TAGGER_MALLOC_ZERO").is_some_and(|v| v == "0") {
        sys::heap::set_zero_on_malloc(false);
    }
    state::set_devnull(sys::open_devnull());
    if let Err(rc) = sys::install_atfork() {
        warn(&format!("pthread_atfork failed ({rc}); running unmanaged"));
        state::set_mode(Mode::Unmanaged);
        return;
    }
    let path = std::env::var_os(SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
    let _ = SOCKET_PATH.set(path.clone());
    match attach(&path) {
        Ok(policy) => {
            if std::env::var_os("USM_TAGGER_VERBOSE").is_some() {
                warn(&format!(
                    "managed by the USM daemon at {} (policy {policy})",
                    path.display()
                ));
            }
        }
        Err(why) => {
            state::set_mode(Mode::Unmanaged);
            warn(&format!("{why}; running unmanaged"));
        }
    }
}

fn process_name() -> String {
    let mut name = String::new();
    let _ = std::fs::File::open("/proc/self/comm").and_then(|mut f| f.read_to_string(&mut name));
    let name: String = name
        .trim_end_matches('\n')
        .chars()
        .filter(|c| *c != '\0')
        .take(wire::MAX_NAME_LEN)
        .collect();
    if name.is_empty() {
        "unknown".to_owned()
    } else {
        name
    }
}

fn attach(path: &std::path::Path) -> Result<String, String> {
    let (channel, uffd, admission) = handshake(path)?;
    let reader = install(channel, uffd, admission.features)?;
    std::thread::Builder::new()
        .name("usm-tagger".into())
        .spawn(move || {
            sys::arena::enter();
            watch(reader);
            sys::arena::leave();
        })
        .map_err(|e| {
            detach();
            format!("cannot start the watcher thread ({e})")
        })?;
    Ok(admission.policy)
}

/// Connect, Hello with a fresh un-negotiated userfaultfd, verdict. Returns the context
/// to keep: the fresh one, or for an adopted fork child its inherited one.
fn handshake(path: &std::path::Path) -> Result<(Channel, OwnedFd, client::Admission), String> {
    let session =
        client::connect(path).map_err(|e| format!("no USM daemon at {} ({e})", path.display()))?;
    let raw = sys::open_userfaultfd().map_err(|errno| {
        format!(
            "cannot open a userfaultfd ({})",
            std::io::Error::from_raw_os_error(errno)
        )
    })?;
    let uffd = owned(raw);
    let mut admission = match session.hello(
        sys::getpid(),
        &process_name(),
        std::os::fd::AsFd::as_fd(&uffd),
    ) {
        Ok(a) => a,
        Err(ProtoError::Refused { reason, text }) => {
            return Err(format!(
                "the USM daemon refused this process ({reason:?}: {text})"
            ));
        }
        Err(e) => return Err(format!("USM daemon handshake failed ({e})")),
    };
    // A forked child adopted into the space the daemon made at `fork`: from now on its
    // memory, inherited and new, is on that one context (the fresh one is dropped).
    let uffd = admission.inherited.take().unwrap_or(uffd);
    Ok((session.into_channel(), uffd, admission))
}

/// Makes an acked session current and returns the watcher's handle on its socket.
///
/// The first time, the descriptors are stored. In a forked child, `state` still names
/// the parent's descriptor *numbers* (pointing at `/dev/null` since the fork): the new
/// descriptors are moved onto those numbers, so everything holding them stays right.
/// Our userfaultfd copy is kept for good: registration goes through it, and its number
/// must stay ours until exit (see `detach`).
fn install(channel: Channel, uffd: OwnedFd, features: u64) -> Result<Channel, String> {
    let old_uffd = state::uffd_number();
    if old_uffd >= 0 {
        sys::replace_fd(old_uffd, uffd.as_raw_fd());
        drop(uffd);
    } else {
        state::set_uffd(into_raw(uffd));
    }
    let channel = match state::channel() {
        Some(existing) => {
            sys::replace_fd(existing.as_raw_fd(), channel.as_raw_fd());
            drop(channel);
            existing
        }
        None => state::set_channel(channel),
    };
    state::set_features(features);
    let reader = channel
        .try_clone()
        .map_err(|e| format!("cannot clone the daemon socket ({e})"))?;
    state::set_watcher_fd(reader.as_raw_fd());
    state::set_mode(Mode::Managed);
    crate::sys::heap::adopt_pending();
    make_fork_gate();
    Ok(reader)
}

/// The fork gate: one managed page this process never touches. A forked child reads it
/// first thing (`after_fork_in_child`), which faults on the child's userfaultfd; the
/// daemon reads that only once it has made the child's space from the parent's (the
/// `FORK` event), so the child changes nothing (no `munmap`, no `madvise`) while the
/// daemon gives it copies of the parent's staged pages — an address-space change pending
/// in the child would make those copies fail.
fn make_fork_gate() {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if let Ok(addr) = sys::mmap_raw(0, sys::PAGE_SIZE, prot, flags, -1, 0) {
        crate::ranges::adopt(addr, sys::PAGE_SIZE, usm_proto::RangeKind::Mmap);
        FORK_GATE.store(addr, usm_sync::atomic::Ordering::Release);
    }
}

/// The fork gate's address (0: none).
static FORK_GATE: usm_sync::atomic::AtomicUsize = usm_sync::atomic::AtomicUsize::new(0);

/// In a forked child of a managed process: waits at the fork gate (see
/// [`make_fork_gate`]), then empties it again for the child's own children.
fn pass_fork_gate() {
    let gate = FORK_GATE.load(usm_sync::atomic::Ordering::Acquire);
    if gate != 0 {
        sys::touch(gate);
        let _ = sys::madvise_raw(gate, sys::PAGE_SIZE, libc::MADV_DONTNEED);
    }
}

fn owned(raw: i32) -> OwnedFd {
    sys::own_fd(raw)
}

fn into_raw(fd: OwnedFd) -> i32 {
    std::os::fd::IntoRawFd::into_raw_fd(fd)
}

/// Forgets the watcher's socket number before the watcher's `Channel` closes it (locals
/// drop before parameters), so a later fork child never closes a reused number.
struct ForgetWatcherFd;

impl Drop for ForgetWatcherFd {
    fn drop(&mut self) {
        state::take_watcher_fd();
    }
}

/// What the watcher received.
enum Incoming {
    /// A message the watcher serves (decoded without allocating).
    Served(Message),
    /// A well-formed datagram of another kind (not decoded: text kinds allocate).
    Unexpected(u16),
    /// A datagram carrying descriptors (closed): the daemon never sends any.
    WithFds(usize),
}

/// Whether the watcher serves messages of wire kind `kind`; none of them carries text,
/// so decoding them allocates nothing.
fn served_kind(kind: u16) -> bool {
    let served = [
        Message::SwapState { swapped_pages: 0 },
        Message::CoverageRequest,
        Message::StartAgent {
            staging_pages: 0,
            ring_entries: 0,
        },
        Message::Bye,
    ];
    served.iter().any(|m| m.kind() == kind)
}

/// Receives one datagram into a buffer on this stack; decodes it only if it is a kind
/// the watcher serves. The kind is the little-endian `u16` at bytes 6..8 of the header
/// (magic, version, kind, see `usm_proto::wire`); a served kind is then checked whole
/// by `wire::decode`, a datagram without the magic is refused by it.
fn receive(reader: &Channel) -> Result<Incoming, ProtoError> {
    let mut buf = [0u8; wire::MAX_MESSAGE_LEN];
    let (len, fds) = reader.recv_bytes(&mut buf)?;
    if len == 0 {
        return Err(ProtoError::Closed);
    }
    if !fds.is_empty() {
        return Ok(Incoming::WithFds(fds.len()));
    }
    let bytes = &buf[..len];
    if len >= wire::HEADER_LEN && bytes[..4] == wire::MAGIC {
        let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
        if !served_kind(kind) {
            return Ok(Incoming::Unexpected(kind));
        }
    }
    Ok(Incoming::Served(wire::decode(bytes)?))
}

/// Answers a `CoverageRequest` (see the module doc: no allocation, no blocking send).
fn answer_coverage(reader: &Channel) -> Result<(), ProtoError> {
    let cov = sys::self_coverage().unwrap_or_default();
    let reply = Message::Coverage {
        managed_anon_bytes: cov.managed_anon_bytes.min(cov.anon_bytes),
        anon_bytes: cov.anon_bytes,
    };
    match reader.send_nowait(&reply) {
        Err(e) if e.is_retryable() => {
            // The daemon's queue is full: it asks again later.
            state::DROPPED_NOTICES.fetch_add(1, usm_sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        other => other,
    }
}

/// The watcher: reads the daemon's messages until the session ends. Never allocates
/// and never waits for the heap once running (see the module doc).
fn watch(reader: Channel) {
    let _forget = ForgetWatcherFd;
    loop {
        match receive(&reader) {
            Ok(Incoming::Served(Message::SwapState { swapped_pages })) => {
                state::set_swapped_pages(swapped_pages);
            }
            Ok(Incoming::Served(Message::CoverageRequest)) => {
                if let Err(e) = answer_coverage(&reader) {
                    if e.is_peer_gone() {
                        return daemon_lost(&e);
                    }
                }
            }
            Ok(Incoming::Served(Message::StartAgent {
                staging_pages,
                ring_entries,
            })) => crate::agent::start(&reader, staging_pages, ring_entries),
            Ok(Incoming::Served(Message::Bye)) => {
                // The daemon gave every page back before saying Bye.
                detach();
                return;
            }
            Ok(Incoming::Served(other)) => warn_fmt(format_args!(
                "ignoring unexpected {} from the daemon",
                other.name()
            )),
            Ok(Incoming::Unexpected(kind)) => warn_fmt(format_args!(
                "ignoring an unexpected message of kind {kind} from the daemon"
            )),
            Ok(Incoming::WithFds(n)) => warn_fmt(format_args!(
                "ignoring a message with {n} file descriptor(s) from the daemon"
            )),
            Err(e) if e.is_retryable() => continue,
            Err(
                e @ (ProtoError::Decode(_) | ProtoError::BadFdCount { .. } | ProtoError::Truncated),
            ) => {
                // These variants display without allocating (no io::Error inside).
                warn_fmt(format_args!(
                    "ignoring a malformed message from the daemon ({e})"
                ));
            }
            Err(e) => return daemon_lost(&e),
        }
        if state::mode() != Mode::Managed {
            return;
        }
    }
}

/// A line formatted on the stack: the daemon-loss path must not allocate (another
/// thread may hold the heap lock while it waits for a fault or an UNMAP event that only
/// the dead daemon would have served; the kernel releases it once we detach).
struct StackLine {
    buf: [u8; 512],
    len: usize,
}

impl StackLine {
    fn new() -> StackLine {
        StackLine {
            buf: [0; 512],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Ends the line with `\n`, replacing the last byte if the buffer is full.
    fn end_line(&mut self) {
        if self.len == self.buf.len() {
            self.len -= 1;
        }
        self.buf[self.len] = b'\n';
        self.len += 1;
    }
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Why the session ended, without allocating (no `io::Error` Display: it allocates).
fn describe(e: &ProtoError) -> (&'static str, i32) {
    match e {
        ProtoError::Closed => ("socket closed", 0),
        other => ("socket error", other.errno().unwrap_or(0)),
    }
}

/// The daemon's socket closed without Bye.
///
/// Order matters. The verdict is written first (the program may finish any moment once
/// pages are back). Pages the daemon holds in swap cannot come back: the process is
/// killed. Otherwise pages still in staging are moved back (without waking anyone; a
/// page that cannot be moved back is fatal too), then waiting threads are released and
/// the tagger's userfaultfd is dropped. Nothing here allocates.
fn daemon_lost(e: &ProtoError) {
    let (why, errno) = describe(e);
    let swapped = state::swapped_pages();
    if swapped > 0 {
        fatal(why, errno, swapped);
    }
    let mut line = StackLine::new();
    let _ = write!(line, "{TAG}: lost the USM daemon ({why}");
    if errno != 0 {
        let _ = write!(line, ", errno {errno}");
    }
    let _ = writeln!(line, "); no page was swapped out, continuing unmanaged");
    sys::write_stderr(line.as_bytes());
    let unrestored = crate::agent::restore_staged();
    if unrestored > 0 {
        fatal(why, errno, unrestored);
    }
    crate::agent::wake_restored();
    detach();
}

/// Writes the FATAL line and kills the process.
fn fatal(why: &str, errno: i32, pages: u64) -> ! {
    let mut line = StackLine::new();
    let _ = write!(line, "{TAG}: FATAL: the USM daemon went away ({why}");
    if errno != 0 {
        let _ = write!(line, ", errno {errno}");
    }
    let _ = writeln!(
        line,
        ") while holding {pages} swapped-out page(s) of process {}; killing it rather than \
         let it read zeros",
        sys::getpid()
    );
    sys::write_stderr(line.as_bytes());
    sys::kill_self()
}

/// Stops managing: no new registrations, and our copy of the userfaultfd is dropped
/// (its number now names `/dev/null`).
pub(crate) fn detach() {
    state::set_mode(Mode::Unmanaged);
    let uffd = state::uffd_number();
    if uffd >= 0 {
        sys::replace_fd(uffd, state::devnull());
    }
}

/// In a forked child (single-threaded, from the `pthread_atfork` child handler).
///
/// The parent's userfaultfd copy and socket must not be used here (registering on the
/// parent's context would register ranges in the *parent's* address space; messages
/// would speak for the parent): both numbers are pointed at `/dev/null` at once. The
/// child's inherited memory lives on a context only the daemon holds (`EVENT_FORK`).
/// The child attaches on its own, from a thread so `fork` does not wait for the daemon:
/// a new connection and userfaultfd, Hello with the child's pid. The daemon normally
/// answers `Adopted` with the inherited context attached (it learned the child's pid
/// from the fork-gate fault), and the child keeps that one context for all its memory,
/// with its own eviction agent; an older daemon's plain `Ack` leaves the new memory on
/// the fresh context.
/// Heap segments made meanwhile are remembered and registered at the Ack.
///
/// Pages that were out of the parent at `fork` (swapped, or in the parent's staging
/// area, which is `MADV_DONTFORK`) are holes in the child that only the daemon can
/// fill: they count as this process's swapped pages (a floor under what the daemon
/// reports), so the daemon's death kills the child with a message. If the child cannot
/// attach, it keeps a duplicate of the parent's socket only to notice that death.
pub(crate) fn after_fork_in_child() {
    let was_managed = state::mode() == Mode::Managed;
    if !was_managed {
        state::set_mode(Mode::Unmanaged);
        return;
    }
    pass_fork_gate();
    let inherited = state::swapped_pages() + crate::agent::staged_pages();
    crate::agent::forget_in_child();
    // The watcher thread (and its `Channel`) does not exist here; its socket would keep
    // the parent's session open for as long as this process lives.
    let watcher = state::take_watcher_fd();
    if watcher >= 0 {
        sys::close_raw(watcher);
    }
    state::set_swapped_pages(0);
    state::set_inherited_swapped(inherited);
    state::set_mode(Mode::Starting);
    let devnull = state::devnull();
    let uffd = state::uffd_number();
    if uffd >= 0 {
        sys::replace_fd(uffd, devnull);
    }
    let parent_sock = match state::channel() {
        Some(channel) => {
            let keep = if inherited > 0 {
                sys::dup_cloexec(channel.as_raw_fd())
            } else {
                None
            };
            sys::replace_fd(channel.as_raw_fd(), devnull);
            keep
        }
        None => None,
    };
    let Some(path) = SOCKET_PATH.get() else {
        state::set_mode(Mode::Unmanaged);
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("usm-tagger".into())
        .spawn(move || {
            sys::arena::enter();
            attach_child(path, parent_sock);
            sys::arena::leave();
        });
    if spawned.is_err() {
        state::set_mode(Mode::Unmanaged);
        warn("cannot start the watcher thread in this forked process; running unmanaged");
    }
}

/// The forked child's own session (see `after_fork_in_child`).
fn attach_child(path: &std::path::Path, parent_sock: Option<OwnedFd>) {
    match handshake(path)
        .and_then(|(channel, uffd, admission)| install(channel, uffd, admission.features))
    {
        Ok(reader) => {
            drop(parent_sock);
            watch(reader);
        }
        Err(why) => {
            state::set_mode(Mode::Unmanaged);
            warn(&format!("{why}; this forked process runs unmanaged"));
            if let Some(sock) = parent_sock {
                if sys::wait_peer_hangup(sock.as_raw_fd()) && state::swapped_pages() > 0 {
                    fatal("socket closed", 0, state::swapped_pages());
                }
            }
        }
    }
}

/// `usm_hint`: sends a Hint. Returns 0 or a negative errno.
pub(crate) fn hint(addr: usize, len: usize, text: &str) -> i32 {
    let msg = Message::Hint {
        addr: addr as u64,
        len: len as u64,
        text: text.to_owned(),
    };
    if msg.validate().is_err() {
        return -libc::EINVAL;
    }
    if state::mode() != Mode::Managed {
        return -libc::ENOTCONN;
    }
    let Some(channel) = state::channel() else {
        return -libc::ENOTCONN;
    };
    match channel.send(&msg) {
        Ok(()) => 0,
        Err(e) => -e.errno().unwrap_or(libc::EIO),
    }
}

/// Coverage of this process, as `usm_tagger_coverage` reports it.
pub(crate) fn coverage() -> Result<Coverage, i32> {
    sys::self_coverage()
}
