//! The tagger's process-wide state, read on every allocation: a few atomics.
//!
//! | field       | written by                                  | read by                      |
//! |-------------|---------------------------------------------|------------------------------|
//! | `MODE`      | constructor (Starting → Managed/Unmanaged), watcher (→ Unmanaged), fork child (→ Unmanaged) | everything |
//! | `UFFD`      | constructor (after Ack), never changed after; its *number* stays valid forever (replaced by `/dev/null` on detach) | range registration |
//! | `CHANNEL`   | constructor (set once, lives until exit)     | notifications, hints   |
//! | `SWAPPED`   | watcher (`SwapState`)                        | watcher on daemon loss       |
//! | `WATCHER_FD`| `session::install` (the watcher's clone of the socket) | fork child (closes it) |

use std::sync::OnceLock;
use usm_proto::Channel;

use usm_sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};

/// Where the tagger stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Mode {
    /// Constructor not finished: new heap segments are remembered for later.
    Starting = 0,
    /// The daemon acked: new anonymous memory is registered at once.
    Managed = 1,
    /// No daemon (absent, refused, lost, or this is a forked child): kernel memory.
    Unmanaged = 2,
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Starting as u8);
static UFFD: AtomicI32 = AtomicI32::new(-1);
/// Set once by the constructor. `OnceLock` because `usm_sync` has no once-cell and the
/// tagger is not modelled under loom; it lives until exit.
static CHANNEL: OnceLock<Channel> = OnceLock::new();
static SWAPPED: AtomicU64 = AtomicU64::new(0);
static DEVNULL: AtomicI32 = AtomicI32::new(-1);
static FEATURES: AtomicU64 = AtomicU64::new(0);
static INHERITED_SWAPPED: AtomicU64 = AtomicU64::new(0);
static WATCHER_FD: AtomicI32 = AtomicI32::new(-1);

/// Bytes registered on the userfaultfd so far (cumulative, for diagnostics).
pub(crate) static REGISTERED_BYTES: AtomicU64 = AtomicU64::new(0);
/// `UFFDIO_REGISTER` calls that failed (the range stays with the kernel).
pub(crate) static REGISTER_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Advisory notifications dropped because the socket was full.
pub(crate) static DROPPED_NOTICES: AtomicU64 = AtomicU64::new(0);

pub(crate) fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        0 => Mode::Starting,
        1 => Mode::Managed,
        _ => Mode::Unmanaged,
    }
}

pub(crate) fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Release);
}

/// The shared userfaultfd, if the process is managed.
pub(crate) fn managed_uffd() -> Option<i32> {
    if mode() == Mode::Managed {
        let fd = UFFD.load(Ordering::Acquire);
        (fd >= 0).then_some(fd)
    } else {
        None
    }
}

/// The raw number of the tagger's userfaultfd copy (even after detach), or -1.
pub(crate) fn uffd_number() -> i32 {
    UFFD.load(Ordering::Acquire)
}

pub(crate) fn set_uffd(fd: i32) {
    UFFD.store(fd, Ordering::Release);
}

/// The session's channel (set once; lives until exit).
pub(crate) fn channel() -> Option<&'static Channel> {
    CHANNEL.get()
}

pub(crate) fn set_channel(channel: Channel) -> &'static Channel {
    CHANNEL.get_or_init(|| channel)
}

/// Pages only the daemon can bring back: what it reported, plus (in a forked child)
/// the holes inherited from the parent.
pub(crate) fn swapped_pages() -> u64 {
    SWAPPED.load(Ordering::Acquire) + INHERITED_SWAPPED.load(Ordering::Acquire)
}

/// In a forked child: pages that were out of the parent at `fork`.
pub(crate) fn set_inherited_swapped(n: u64) {
    INHERITED_SWAPPED.store(n, Ordering::Release);
}

pub(crate) fn set_swapped_pages(n: u64) {
    SWAPPED.store(n, Ordering::Release);
}

pub(crate) fn devnull() -> i32 {
    DEVNULL.load(Ordering::Acquire)
}

pub(crate) fn set_devnull(fd: i32) {
    DEVNULL.store(fd, Ordering::Release);
}

/// `uffdio_api.features` the daemon negotiated (from the Ack).
pub(crate) fn features() -> u64 {
    FEATURES.load(Ordering::Acquire)
}

pub(crate) fn set_features(features: u64) {
    FEATURES.store(features, Ordering::Release);
}

/// Remembers the number of the watcher thread's clone of the session socket.
pub(crate) fn set_watcher_fd(fd: i32) {
    WATCHER_FD.store(fd, Ordering::Release);
}

/// Takes the watcher's socket number (-1 if none): in a forked child, whose watcher
/// thread does not exist, it is closed so the child does not keep the parent's session
/// open.
pub(crate) fn take_watcher_fd() -> i32 {
    WATCHER_FD.swap(-1, Ordering::AcqRel)
}
