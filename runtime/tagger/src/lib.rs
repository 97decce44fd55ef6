//! `libusm_tagger.so`: the `LD_PRELOAD` library that attaches a program to a USM daemon.
//!
//! ```text
//! LD_PRELOAD=/path/to/libusm_tagger.so USM_SOCKET=/run/usm/usm.sock redis-server
//! ```
//! On load (an `.init_array` constructor) it connects to the daemon, sends Hello with an
//! un-negotiated userfaultfd (`usm_proto`), and once acked registers all anonymous
//! memory the program touches from then on:
//! - the heap: the malloc family is replaced by dlmalloc over managed segments, with
//!   blocks of 256 KiB and more in mappings of their own (`sys::heap`), because glibc's
//!   malloc maps memory through internal calls no wrapper sees;
//! - private anonymous `mmap`s (jemalloc's included), which stay managed across
//!   `mremap` (`ranges`).
//!
//! Thread stacks, `MAP_SHARED` memory, memfd and file mappings stay with the kernel.
//! Without a daemon (or if refused) the program runs unmanaged after one warning line.
//! Session states and the daemon-loss rule are in `session`; the process-wide atomics
//! in `state`; all `unsafe` in `sys`.
//!
//! Environment: `USM_SOCKET` (daemon socket, default `/run/usm/usm.sock`),
//! `USM_TAGGER_VERBOSE` (say which policy manages the process),
//! `USM_TAGGER_MALLOC_ZERO=0` (do not zero recycled heap memory; see `sys::heap`).
//!
//! Exported for other code: `usm_tagger_hint` and `usm_tagger_extent` (used by
//! `libusm.so`'s `usm_hint_range` and `usm_hint`; extents in `extents`),
//! `usm_tagger_coverage` (managed anonymous bytes vs anonymous RSS from
//! `/proc/self/smaps`), `usm_tagger_state`.
//!
//! The eviction agent (`agent`) moves pages app ↔ staging with same-mm `UFFDIO_MOVE` on
//! the daemon's request. A forked child attaches on its own (new connection and
//! userfaultfd) for its new memory; its inherited memory is the daemon's through
//! `EVENT_FORK`. Not managed: anonymous `mmap`s made before the Ack (or, in a forked
//! child, before its own Ack), `brk`/`sbrk` called directly by the program.

#![deny(unsafe_code)]

mod agent;
mod extents;
mod ranges;
mod session;
mod state;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
mod sys;
