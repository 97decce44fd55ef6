//! userfaultfd, safely: opening, negotiating, registering, resolving, reading events.
//!
//! # Protocol
//!
//! 1. **Open** ([`RawUserfaultfd::open`]): through `/dev/userfaultfd`
//!    (`USERFAULTFD_IOC_NEW`, Linux 6.1; access decided by the device's file mode), falling
//!    back to the `userfaultfd(2)` syscall (decided by `vm.unprivileged_userfaultfd` and
//!    `CAP_SYS_PTRACE`). [`OpenFlags::user_mode_only`] is an explicit opt-in: with it,
//!    *kernel-mode* accesses to a missing page (a `read(2)` into a managed buffer) fail
//!    with `EFAULT` instead of being reported. The embedded SIGBUS mode accepts that;
//!    daemon mode must never set it.
//! 2. **Negotiate** ([`RawUserfaultfd::negotiate`]): `UFFDIO_API` once per fd. It can run
//!    in another process than the one that opened the fd (the tagger hands the
//!    un-negotiated fd to the daemon over `SCM_RIGHTS`, see [`RawUserfaultfd::from_fd`],
//!    and the daemon negotiates with its own privileges, which `EVENT_FORK` needs).
//!    Optional features the kernel lacks are dropped; a *required* one that is absent is
//!    [`Error::MissingFeature`](crate::Error::MissingFeature), naming the feature and the
//!    Linux version that added it, before the fd is touched.
//! 3. **Register** ranges ([`Userfaultfd::register`]) in [`RegisterMode`]s; the kernel
//!    answers with the [`Ioctls`] it grants on that range.
//! 4. **Resolve** faults: copy, zeropage, move, continue, poison, writeprotect — all
//!    `unsafe fn`, because they replace memory another part of the program may be using —
//!    and wake. Each returns a [`Resolved`] state; only real failures are errors.
//! 5. **Events** ([`Userfaultfd::read_events`]): a non-blocking batched read of
//!    `uffd_msg` into [`UffdEvent`]s; "nothing to read" is an empty batch. The fd is
//!    [`AsFd`](std::os::fd::AsFd), so it can be polled or put in an io_uring.
//!
//! The [`Userfaultfd`] and [`RawUserfaultfd`] types and their methods are implemented in
//! `sys::uffd` (where every `unsafe` block of the crate lives) and re-exported here.

use crate::event::{Event, Fault, Origin};
use crate::flags::flag_set;
use crate::frame::PAGE_SIZE;
use crate::sys::uapi;
use std::os::fd::OwnedFd;

pub use crate::sys::uffd::{
    READ_BATCH, RawUserfaultfd, Userfaultfd, available_features, event_fork_permitted,
};

flag_set! {
    /// userfaultfd features (`UFFD_FEATURE_*`), as requested from and granted by
    /// `UFFDIO_API`. [`Features::since`] names the Linux version that added each.
    pub struct Features {
        /// Write-protect faults are reported (anonymous memory: Linux 5.7).
        const PAGEFAULT_FLAG_WP = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP;
        /// Fork events (needs `CAP_SYS_PTRACE`).
        const EVENT_FORK = uapi::UFFD_FEATURE_EVENT_FORK;
        /// `mremap` events; while one is unread, resolves return [`Resolved::MmapChanging`].
        const EVENT_REMAP = uapi::UFFD_FEATURE_EVENT_REMAP;
        /// `madvise(DONTNEED/REMOVE/FREE)` events.
        const EVENT_REMOVE = uapi::UFFD_FEATURE_EVENT_REMOVE;
        /// MISSING mode on hugetlbfs.
        const MISSING_HUGETLBFS = uapi::UFFD_FEATURE_MISSING_HUGETLBFS;
        /// MISSING mode on shmem.
        const MISSING_SHMEM = uapi::UFFD_FEATURE_MISSING_SHMEM;
        /// `munmap` events.
        const EVENT_UNMAP = uapi::UFFD_FEATURE_EVENT_UNMAP;
        /// Missing faults raise SIGBUS in the faulting thread instead of an event.
        const SIGBUS = uapi::UFFD_FEATURE_SIGBUS;
        /// Fault messages carry the faulting thread id.
        const THREAD_ID = uapi::UFFD_FEATURE_THREAD_ID;
        /// MINOR mode on hugetlbfs.
        const MINOR_HUGETLBFS = uapi::UFFD_FEATURE_MINOR_HUGETLBFS;
        /// MINOR mode on shmem.
        const MINOR_SHMEM = uapi::UFFD_FEATURE_MINOR_SHMEM;
        /// Fault addresses are exact, not page aligned.
        const EXACT_ADDRESS = uapi::UFFD_FEATURE_EXACT_ADDRESS;
        /// WP mode on hugetlbfs and shmem.
        const WP_HUGETLBFS_SHMEM = uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        /// WP applies to never-populated ptes too.
        const WP_UNPOPULATED = uapi::UFFD_FEATURE_WP_UNPOPULATED;
        /// `UFFDIO_POISON`.
        const POISON = uapi::UFFD_FEATURE_POISON;
        /// The kernel resolves WP faults itself (dirty tracking with `PAGEMAP_SCAN`).
        const WP_ASYNC = uapi::UFFD_FEATURE_WP_ASYNC;
        /// `UFFDIO_MOVE`.
        const MOVE = uapi::UFFD_FEATURE_MOVE;
    }
}

impl Features {
    /// The Linux version that added a single feature bit ("?" for an unknown bit).
    pub fn since(self) -> &'static str {
        match self {
            Self::PAGEFAULT_FLAG_WP => "5.7",
            Self::EVENT_FORK
            | Self::EVENT_REMAP
            | Self::EVENT_REMOVE
            | Self::MISSING_HUGETLBFS
            | Self::MISSING_SHMEM
            | Self::EVENT_UNMAP => "4.11",
            Self::SIGBUS | Self::THREAD_ID => "4.14",
            Self::MINOR_HUGETLBFS => "5.13",
            Self::MINOR_SHMEM => "5.14",
            Self::EXACT_ADDRESS => "5.18",
            Self::WP_HUGETLBFS_SHMEM => "5.19",
            Self::WP_UNPOPULATED => "6.4",
            Self::POISON => "6.6",
            Self::WP_ASYNC => "6.7",
            Self::MOVE => "6.8",
            _ => "?",
        }
    }

    /// The name of a single feature bit, or `"bit N"` for one this crate does not know.
    pub fn describe_bit(self) -> String {
        match self.name() {
            Some(n) => n.to_string(),
            None => format!("bit {}", self.bits().trailing_zeros()),
        }
    }

    /// The single-bit sets of `self`, known or not, lowest bit first.
    pub fn bits_iter(self) -> impl Iterator<Item = Features> {
        (0..64)
            .map(|b| 1u64 << b)
            .filter(move |m| self.0 & m != 0)
            .map(Features)
    }
}

flag_set! {
    /// What a registered range reports (`UFFDIO_REGISTER_MODE_*`); modes combine.
    pub struct RegisterMode {
        /// Faults on missing pages.
        const MISSING = uapi::UFFDIO_REGISTER_MODE_MISSING;
        /// Writes to write-protected pages.
        const WP = uapi::UFFDIO_REGISTER_MODE_WP;
        /// Minor faults (page in the page cache, pte missing; shmem / hugetlbfs).
        const MINOR = uapi::UFFDIO_REGISTER_MODE_MINOR;
    }
}

flag_set! {
    /// The ioctls the kernel grants on an fd (from `UFFDIO_API`) or on a registered range
    /// (from `UFFDIO_REGISTER`), as the bit mask `1 << _UFFDIO_*`.
    pub struct Ioctls {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << uapi::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << uapi::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << uapi::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << uapi::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << uapi::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << uapi::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << uapi::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << uapi::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << uapi::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << uapi::_UFFDIO_API;
    }
}

flag_set! {
    /// Modes of [`Userfaultfd::copy`].
    pub struct CopyMode {
        /// Do not wake the threads waiting on the range (wake later with
        /// [`Userfaultfd::wake`], for example once for a batch).
        const DONTWAKE = uapi::UFFDIO_COPY_MODE_DONTWAKE;
        /// Map the new page write-protected (the range must be registered in WP mode).
        const WP = uapi::UFFDIO_COPY_MODE_WP;
    }
}

flag_set! {
    /// Modes of [`Userfaultfd::zeropage`].
    pub struct ZeropageMode {
        /// Do not wake.
        const DONTWAKE = uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE;
    }
}

flag_set! {
    /// Modes of [`Userfaultfd::move_pages`].
    pub struct MoveMode {
        /// Do not wake.
        const DONTWAKE = uapi::UFFDIO_MOVE_MODE_DONTWAKE;
        /// Holes in the source are skipped (counted as moved) instead of `ENOENT`.
        const ALLOW_SRC_HOLES = uapi::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
    }
}

flag_set! {
    /// Modes of [`Userfaultfd::continue_pages`].
    pub struct ContinueMode {
        /// Do not wake.
        const DONTWAKE = uapi::UFFDIO_CONTINUE_MODE_DONTWAKE;
        /// Map write-protected (Linux 6.4).
        const WP = uapi::UFFDIO_CONTINUE_MODE_WP;
    }
}

flag_set! {
    /// Modes of [`Userfaultfd::poison`].
    pub struct PoisonMode {
        /// Do not wake.
        const DONTWAKE = uapi::UFFDIO_POISON_MODE_DONTWAKE;
    }
}

/// What [`Userfaultfd::writeprotect`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteProtect {
    /// Write-protect the range: later writes fault (WP fault events).
    Set,
    /// Remove write protection and wake the writers waiting on the range.
    Clear,
    /// Remove write protection, do not wake (wake later with [`Userfaultfd::wake`]).
    ClearDontWake,
}

/// The outcome of a resolve operation that did not fail.
///
/// The kernel reports progress in bytes; these are the states a fault handler acts on.
/// None of them is an error: a failure (`ENOENT`, `EINVAL`, `ESRCH`, …) is an
/// [`Error::Ioctl`](crate::Error::Ioctl) with classifier methods.
#[must_use = "a resolve may have done only part of the work"]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Resolved {
    /// The whole range was resolved (bytes).
    Done(u64),
    /// Only the first `bytes` were resolved (`EAGAIN` with progress). The page at
    /// `dst + bytes` stopped the operation: for a multi-page MOVE or COPY this is a page
    /// already present at the destination (or, for MOVE, a source hole or a pinned /
    /// shared source page). Issue the operation again from there to learn which: it then
    /// reports [`Resolved::AlreadyMapped`], [`Resolved::UseCopy`] or an error for that page.
    /// Never confuse this with [`Resolved::MmapChanging`]: here the mapping did not change.
    Partial(u64),
    /// `EEXIST` at the first page: the destination is already mapped (another resolver
    /// or the kernel won the race). The faulting thread is not woken by this: wake it.
    AlreadyMapped,
    /// `EAGAIN` with no progress: the address space is changing (`mmap_changing`: a
    /// fork / mremap / madvise(REMOVE) / munmap event is pending and unread). Read the
    /// events first, then retry — the destination may no longer be valid.
    MmapChanging,
    /// `EBUSY` from MOVE at the first page: the source page is pinned (O_DIRECT,
    /// io_uring fixed buffer) or shared by fork. Use COPY instead.
    UseCopy,
}

impl Resolved {
    /// Bytes resolved (0 for the states with no progress).
    pub fn bytes(self) -> u64 {
        match self {
            Resolved::Done(b) | Resolved::Partial(b) => b,
            _ => 0,
        }
    }
    /// The whole range was resolved.
    pub fn is_done(self) -> bool {
        matches!(self, Resolved::Done(_))
    }
}

/// How [`RawUserfaultfd::open`] opens the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFlags {
    /// `O_NONBLOCK`: `read` returns `EAGAIN` instead of blocking (reads are batched and
    /// non-blocking either way; this also matters to whoever polls the fd).
    pub nonblock: bool,
    /// `O_CLOEXEC`.
    pub cloexec: bool,
    /// `UFFD_USER_MODE_ONLY`: only faults from user mode are handled. **Consequence**: a
    /// *kernel-mode* access to a missing page of a registered range (a syscall reading or
    /// writing the buffer) fails with `EFAULT` instead of waiting for the page, and some
    /// syscalls lose data on `EFAULT`. Acceptable for the embedded SIGBUS mode (it
    /// pre-faults and pins syscall buffers); never for daemon mode. Opt-in only.
    pub user_mode_only: bool,
}

impl Default for OpenFlags {
    /// Non-blocking, close-on-exec, *not* user-mode-only.
    fn default() -> Self {
        OpenFlags {
            nonblock: true,
            cloexec: true,
            user_mode_only: false,
        }
    }
}

/// Which way a userfaultfd was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OpenPath {
    /// `open("/dev/userfaultfd")` + `USERFAULTFD_IOC_NEW`.
    DevUserfaultfd,
    /// The `userfaultfd(2)` syscall.
    Syscall,
    /// Adopted from an fd received from elsewhere (`SCM_RIGHTS`, a fork event).
    Adopted,
}

impl core::fmt::Display for OpenPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OpenPath::DevUserfaultfd => "/dev/userfaultfd",
            OpenPath::Syscall => "userfaultfd(2)",
            OpenPath::Adopted => "adopted fd",
        })
    }
}

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum UffdEvent {
    /// A fault to resolve (MISSING, WP or MINOR).
    Pagefault {
        /// The address reported (page aligned unless `EXACT_ADDRESS`).
        addr: u64,
        /// The access was a write.
        write: bool,
        /// A write-protect fault on a present page.
        wp: bool,
        /// A minor fault.
        minor: bool,
        /// The faulting thread (`THREAD_ID`), else 0.
        tid: u32,
    },
    /// The process forked: `child` is the child's userfaultfd (already negotiated with the
    /// parent's features; adopt it with [`Userfaultfd::from_fork`]). Closing it without
    /// adopting lets the child run unmanaged.
    Fork {
        /// The child's userfaultfd, owned by the reader now.
        child: OwnedFd,
    },
    /// `mremap` moved `[from, from+len)` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `madvise(DONTNEED/REMOVE/FREE)` dropped `[start, end)`.
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `munmap` unmapped `[start, end)`.
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

impl UffdEvent {
    /// The USM event for the policies, if this message is one (`Fault` or `Free`), for
    /// process `pid`. Remap and Fork need the runtime's bookkeeping and map to `None`.
    pub fn to_event(&self, pid: u32) -> Option<Event> {
        match *self {
            UffdEvent::Pagefault {
                addr,
                write,
                wp,
                minor,
                tid,
            } => Some(Event::Fault(Fault {
                addr: addr & !(PAGE_SIZE as u64 - 1),
                write,
                wp,
                minor,
                len_hint: PAGE_SIZE as u64,
                origin: Origin { pid, tid },
            })),
            UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => {
                Some(Event::Free {
                    origin: Origin { pid, tid: 0 },
                    start,
                    len: end - start,
                })
            }
            UffdEvent::Fork { .. } | UffdEvent::Remap { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_feature_has_a_version_and_single_bit() {
        for (name, f) in Features::NAMED {
            assert_eq!(f.bits().count_ones(), 1, "{name}");
            assert_ne!(f.since(), "?", "{name}");
            assert_eq!(f.describe_bit(), *name);
        }
        let unknown = Features::from_bits_retain(1 << 33);
        assert_eq!(unknown.describe_bit(), "bit 33");
        let bits: Vec<_> = (Features::MOVE | Features::SIGBUS | unknown)
            .bits_iter()
            .collect();
        assert_eq!(bits, vec![Features::SIGBUS, Features::MOVE, unknown]);
    }

    #[test]
    fn flag_sets_format_and_combine() {
        let m = RegisterMode::MISSING | RegisterMode::WP;
        assert_eq!(m.to_string(), "MISSING | WP");
        assert_eq!(format!("{m:?}"), "RegisterMode(MISSING | WP)");
        assert!(m.contains(RegisterMode::WP) && !m.contains(RegisterMode::MINOR));
        assert_eq!((m - RegisterMode::WP), RegisterMode::MISSING);
        assert_eq!(Ioctls::from_bits_retain(1 << 5).to_string(), "MOVE");
    }

    #[test]
    fn fault_messages_become_policy_events() {
        let ev = UffdEvent::Pagefault {
            addr: 0x1234,
            write: true,
            wp: false,
            minor: false,
            tid: 9,
        };
        match ev.to_event(42) {
            Some(Event::Fault(f)) => {
                assert_eq!(
                    (f.addr, f.write, f.origin.pid, f.origin.tid),
                    (0x1000, true, 42, 9)
                );
                assert_eq!(f.len_hint, 4096);
            }
            other => panic!("{other:?}"),
        }
        let ev = UffdEvent::Unmap {
            start: 0x2000,
            end: 0x5000,
        };
        assert!(matches!(
            ev.to_event(1),
            Some(Event::Free {
                start: 0x2000,
                len: 0x3000,
                ..
            })
        ));
        assert!(
            UffdEvent::Remap {
                from: 0,
                to: 0,
                len: 0
            }
            .to_event(1)
            .is_none()
        );
    }
}
