//! Which memory becomes managed, and telling the daemon about it.
//!
//! Managed: the tagger's heap segments, and private anonymous `mmap`s that are not
//! `MAP_STACK`, `MAP_GROWSDOWN` or `MAP_HUGETLB`. Left with the kernel: `MAP_SHARED`
//! (anonymous shared memory, memfd), file mappings, thread stacks (glibc maps them with
//! its internal `__mmap` anyway).
//!
//! Registration is `UFFDIO_REGISTER` (MISSING) on the tagger's own copy of the shared
//! userfaultfd, then an advisory `RegisterRange` sent without blocking. `mremap` needs
//! nothing: the kernel carries the registration along a move or an in-place growth
//! (the daemon negotiated `EVENT_REMAP` and hears about it on the userfaultfd).

use usm_proto::{Message, RangeKind};
use usm_sync::atomic::Ordering;

use crate::extents::{self, Kind};
use crate::state::{self, Mode};
use crate::sys::{self, PAGE_SIZE};

/// Makes `[start, start+len)` managed if the session is. Returns false while the
/// session is still starting (the caller may remember the range and retry).
pub(crate) fn adopt(start: usize, len: usize, kind: RangeKind) -> bool {
    match state::mode() {
        Mode::Starting => return false,
        Mode::Unmanaged => return true,
        Mode::Managed => {}
    }
    let Some(uffd) = state::managed_uffd() else {
        return true;
    };
    let len = len.next_multiple_of(PAGE_SIZE);
    match sys::uffd_register(uffd, start, len) {
        Ok(()) => {
            state::REGISTERED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
            notify(&Message::RegisterRange {
                start: start as u64,
                len: len as u64,
                kind,
            });
        }
        Err(_) => {
            state::REGISTER_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}

/// Tells the daemon `[start, start+len)` is gone (advisory).
pub(crate) fn forget(start: usize, len: usize) {
    if state::mode() != Mode::Managed || start % PAGE_SIZE != 0 || len == 0 {
        return;
    }
    notify(&Message::UnregisterRange {
        start: start as u64,
        len: len.next_multiple_of(PAGE_SIZE) as u64,
    });
}

/// Sends an advisory notice without blocking; counts it if the socket is full.
fn notify(msg: &Message) {
    if let Some(channel) = state::channel() {
        if channel.send_nowait(msg).is_err() {
            state::DROPPED_NOTICES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Should a successful `mmap` with these flags be managed?
pub(crate) fn mmap_is_managed(flags: i32) -> bool {
    let private = flags & 0x0f == libc::MAP_PRIVATE;
    let anonymous = flags & libc::MAP_ANONYMOUS != 0;
    let excluded = flags & (libc::MAP_STACK | libc::MAP_GROWSDOWN | libc::MAP_HUGETLB) != 0;
    private && anonymous && !excluded
}

/// After a successful `mmap` by the program.
pub(crate) fn after_mmap(addr: usize, len: usize, flags: i32) {
    if mmap_is_managed(flags) && len != 0 {
        adopt(addr, len, RangeKind::Mmap);
        extents::insert(addr, addr + len.next_multiple_of(PAGE_SIZE), Kind::Mapping);
    }
}

/// After a successful `munmap` by the program.
pub(crate) fn after_munmap(addr: usize, len: usize) {
    extents::remove(addr, addr.saturating_add(len.next_multiple_of(PAGE_SIZE)));
    forget(addr, len);
}

/// Before the program registers a range on *its own* userfaultfd: a range can belong to
/// one userfaultfd only, so the tagger steps aside (the program's handler wins).
pub(crate) fn before_foreign_register(fd: i32, start: u64, len: u64) {
    if let Some(uffd) = state::managed_uffd() {
        if fd != uffd && len != 0 {
            let _ = sys::uffd_unregister(uffd, start as usize, len as usize);
        }
    }
}
