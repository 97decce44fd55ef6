//! `usm-mm`: the memory manager both modes run on — the embedded runtime (one space: its
//! own process) and the InstanceUSM daemon (one space per tagged process and fork child).
//! What differs between the modes enters through two seams only: the [`Installer`] of a
//! space (how pages get in and out of it) and the frame pool handed to [`MmCore::new`]
//! (embedded: the pool the regions' pages live in; daemon: a lazy pool that is the
//! budget, its slots the daemon's copy of a page on its way in or out).
//!
//! # Pieces
//! - [`Space`] ([`space`]): one address space — page states keyed by page address
//!   ([`PageState`]: Resident / Sampled / Copied / Leaving / Staging / Swapped / SwapIn /
//!   Poisoned), managed
//!   ranges with a per-range generation (fencing address reuse), a [`usm_policies::HintMap`],
//!   pins, counters.
//! - [`MmCore`] (module `core`): shared by all workers — the frame pool, the
//!   [`Installer`], the policy registry, the swap devices and slot map, the eviction and
//!   OOM policies and every [`Space`], under one lock. Its code is split by concern
//!   (`core/`: fault, swap-in, eviction, completion, OOM, the policy `Cx`, ranges,
//!   processes); `core.rs` maps the files and states the locking protocol: what the lock
//!   guards, what runs under it (policy and installer calls) and what runs outside it
//!   (submitting and reaping I/O, an asynchronous stage's work).
//! - [`WorkerMm`]: one per worker thread — its lArena, its io_uring engine (`!Send`) and
//!   the operations in flight on it. It implements `usm_policies::Cx` for policy calls
//!   (a private `WorkerCx` over the locked state, with memory state and eviction policy
//!   in separate fields so `Cx::evict` can run the eviction policy mid-allocation).
//! - [`Installer`] ([`installer`]): *how* frames get into and out of an address space
//!   (embedded: `usm_runtime`'s `SameMmInstaller`, same-mm `UFFDIO_COPY` in /
//!   `UFFDIO_MOVE` out, see [`InstallMode`]; daemon: `usm_runtime`'s `RemoteInstaller`,
//!   cross-process `UFFDIO_COPY` in, the tagger's agent out). The core's installer is the
//!   default; a space may bring its own ([`MmCore::add_process`]).
//! - Address spaces of other processes (module `core::process`): spaces with their own
//!   installer and one allocation policy per process, ranges that follow the
//!   userfaultfd events (`munmap` / `madvise(DONTNEED)` → [`MmCore::discard`], `mremap`
//!   → [`MmCore::remap`], `fork` → [`MmCore::fork_space`], exit →
//!   [`MmCore::remove_space`]), faults on unmanaged addresses answered
//!   [`FaultResult::Foreign`] so the host makes the mapping managed
//!   ([`MmCore::manage`]), policy notifications with a full `Cx`
//!   ([`WorkerMm::notify_alloc`]), and asynchronous stages ([`WorkerMm::finish_stage`]).
//! - [`MmStats`] ([`stats`]): counters and latency histograms per [`FaultPath`];
//!   [`StatsSnapshot`] is `serde::Serialize`.
//!
//! # The fault protocol (who owns what)
//! 1. A worker gets a fault (embedded: a uThread parked by the SIGBUS handler, or a plain
//!    thread's posted fault) and calls [`WorkerMm::handle_fault`] in normal context.
//! 2. Under the core lock: a present page → [`FaultResult::AlreadyPresent`]; a swap-in in
//!    flight → [`FaultResult::Wait`] (the worker's bit is added to the page's waiters);
//!    otherwise the range's allocation policy runs (through `usm_policies::guarded`: a
//!    panic restores every frame the call took — fresh ones to the lArena, staged ones to
//!    staging — logs, and replaces the policy by the registry's default allocation
//!    policy, then retries).
//! 3. `Map`: fresh frames are installed (one `UFFDIO_COPY` from the zero source — or, in
//!    [`InstallMode::Move`], one `UFFDIO_MOVE` — per run of consecutive pages; `Partial`
//!    results re-issued from the stop point and classified page by page; MOVE's
//!    `UseCopy` → `UFFDIO_COPY`, page recorded `Copied` and the frame given back); staged
//!    frames (swap-cache hits) are copied back (Move mode: moved back, or — while their
//!    write-back pins the slot — copied into a fresh frame that is moved in, the staging
//!    frame becoming an *orphan*, released when its write completes).
//!    → [`FaultResult::Resolved`]. A write-back whose page was taken back by a copy
//!    completes against a page state that no longer names its ticket: it only frees its
//!    swap slot.
//!    `Yield(ticket)`: `Cx::swap_in` queued `O_DIRECT` read straight into the Taken
//!    frame's slot; the page is `SwapIn` → [`FaultResult::Wait`]. With `PREFETCH=N` on the
//!    page, up to N following swapped pages are read too.
//!    `Oom`: wait for write-backs in flight ([`FaultResult::NeedMemory`]; the next
//!    write-back to complete on any worker wakes the waiting worker), else evict to the
//!    high watermark, else ask the OOM policy (`EvictHarder` / `FailAccess` / kill → the
//!    page is poisoned and the access fails with SIGBUS, logged).
//! 4. [`WorkerMm::poll`] (every scheduling round) reaps the worker's io_uring:
//!    - write-back done: the page becomes `Swapped(entry)` **before** its staging frame is
//!      released to the zeroing queue (zeroing happens off the fault path, in kmod's
//!      zeroer); if a fault took the page back meanwhile, the slot is freed instead; a
//!      failed write moves the page back (nothing lost);
//!    - swap-in done: the frame is installed at the page (COPY: the slot's page is
//!      queued for a batched drop; Move mode: MOVE), the swap slot freed (or kept as
//!      the clean copy), and every worker
//!      in the page's waiter mask woken ([`MmCore::set_waker`]); a read that lost data
//!      (`must_poison`) makes the page `Poisoned` with `UFFDIO_POISON` — never zeros.
//!
//!    Operations whose range went away (or was replaced: generation check) are *fenced*:
//!    their frame and slot are freed, nothing is installed.
//! 5. Eviction (below the low watermark after a fault or completion, up to the high one;
//!    or on `Oom`): victims from the eviction policy; pinned pages and pages that are not
//!    Resident are skipped (and re-announced with `on_map`); each victim is moved out with
//!    `UFFDIO_MOVE` into its staging slot *before* its write is queued (`O_DIRECT`
//!    straight from the slot), so no write of the application can be lost; writes are
//!    submitted in one batch per round.
//!
//! # Install by COPY, drop slots in batches (no TLB flush per installed page)
//! [`InstallMode::Copy`] (the embedded default) installs with `UFFDIO_COPY`, which fills
//! an empty PTE and only reads the source: no TLB flush. `UFFDIO_MOVE` clears the
//! source's present PTE and flushes per page; with the process active on the other CPU
//! that is an IPI and, in a VM, an exit on both sides. The
//! frame is Mapped as with MOVE; its slot still holds the copied page
//! (`SlotContent::PendingDrop` in kmod), dropped in batches of 64 with one
//! `process_madvise(MADV_DONTNEED)` (one flush per batch) so memory stays ≈ the pool.
//! Invariant: a MOVE into a slot (stage, sampling) needs a hole, so the pool drops the
//! pending batch first; a frame released while pending is just taken off the batch. Its
//! pool has lazy slots (`FramePool::new_lazy`): nothing populated, a first touch copies
//! from the zero source, a swap-in read fills its slot on demand. Eviction and sampling
//! still MOVE the page out (the app's PTE must be cleared atomically so no write is lost):
//! one flush per victim or sample. Why COPY: [`installer`]; the figures (the flushes' share
//! of the CPU, throughput, first touch and fault latency in each mode) are in
//! `bench/results/` (`storm.md`, `fhp.md`, `usm_fault.md`, "COPY installs" sections).
//!
//! # Asynchronous stages (daemon: eviction through the tagger's agent)
//! [`Installer::stage_many`] may answer [`StageOutcome::Pending`]: the page becomes
//! [`PageState::Leaving`] (its frame still the core's, its swap entry reserved) and the
//! core's lock is released — nothing waits for another process. When the installer's
//! owner learns the outcome it calls [`WorkerMm::finish_stage`] on a worker: moved (the
//! content is in the frame's slot, the frame Staging) → the write-back is queued as for
//! any staged page; stayed → Resident again. Faults on a Leaving page wait (woken by the
//! finish). A Leaving page freed meanwhile is fenced: its frame is released at the finish;
//! if the address holds a newer page by then, what was moved (the agent only names an
//! address) is that page's content and is copied back. Stages in flight count against
//! eviction's room only up to half of it, and a fault waits for them only when nothing
//! else can be evicted: a stopped program delays only its own eviction. Access samples
//! leave the same way (`Leaving { entry: None }`, below).
//!
//! A Leaving page counts as *away* ([`PageState::is_away`], [`SpaceCounters::away`], what
//! the daemon tells the tagger): once the agent moved it and the daemon dropped the
//! staging copy, its content is only in the daemon, and the stage may not be finished
//! here yet. Counting it before is the safe side: if the daemon dies meanwhile, the
//! program is killed rather than left to read zeros.
//!
//! # Never vacant, never zeros
//! A swap-in or swap-cache hit whose install cannot be done *now* (`EAGAIN`: the address
//! space is changing, an event waits for its reader — daemon mode) leaves the page
//! `Swapped` / staged, never vacant: the fault comes again after the event is applied.
//! A write-back whose page cannot be put back after a failed queueing stays in its frame's
//! slot as a `Sampled` page. A panicking eviction policy is replaced by `fifo`, which is
//! told every resident page.
//!
//! # Pins
//! [`MmCore::pin`] / [`MmCore::unpin`] count pins per page; a pinned page is never chosen
//! or staged. The embedded I/O helpers pin, then pre-fault, then run the syscall.
//!
//! # Clean pages (no write-back when the swap copy is still valid)
//! With an installer that tracks writes (`usm_runtime`'s `TrackingInstaller`: `WP_ASYNC`), a page read
//! back from swap keeps its slot and a 128-bit hash of the content read; the page is
//! write-protected asynchronously. At eviction, `PAGEMAP_SCAN` says whether it was written
//! (written: the slot is freed, normal write-back); if not, the page is moved out and the
//! staged content hashed — a write racing between the scan and the move changes the hash
//! and falls back to a write-back to the same slot — then `Swapped(entry)` is recorded and
//! the frame recycled with no I/O.
//!
//! # Access information for eviction: re-fault sampling
//! `/sys/kernel/mm/page_idle` is not available to us and `WP_ASYNC` sees writes only, so
//! the eviction policy learns about accesses by *sampling* (on by default,
//! [`MmConfig::access_sampling`]; the daemon's host still turns it off in its `MmConfig`
//! setup). During a victim search, `EvictCx::access(frame)` on a
//! `Resident` page takes it out to its own pool slot (no I/O; the page is then
//! [`PageState::Sampled`], still counted resident, still tracked by the policy) and
//! answers *accessed*, so `clock` spares it for one revolution of its hand. Then either:
//! - the program touches the page: the fault finds it `Sampled`, puts it back at once
//!   (`FaultPath::SampleRefault`, no policy call, no I/O) and reports
//!   `EvictPolicy::on_access(accessed)`; the next time the hand comes it is sampled again;
//! - or the hand comes back while it is still out: `access` answers *not accessed*, the
//!   page becomes a victim, and since it is already in its slot its write-back is queued
//!   without another move (`sampled_evictions`).
//!
//! So a page leaves memory only after a full revolution without an access, reads included
//! (a written-bit scan would miss reads). Cost under `clock`: one move out per page per
//! revolution and one cheap re-fault per *used* page per revolution. The default policy,
//! `two-list`, asks only about the pages on its inactive list: a page whose re-fault
//! showed it in use moves to the active list and is not sampled again until it ages back
//! (`usm-kv` under pressure: 50–88 % fewer sampled re-faults than `clock`).
//!
//! How the page goes out and comes back depends on the installer:
//! - **synchronous** (embedded): `UFFDIO_MOVE` to the slot during the search, at most 4096
//!   pages per search (the first search under pressure finds every page unsampled); the
//!   re-fault copies it back (COPY mode: flush-free, the slot dropped in a batch; Move
//!   mode: moved back, two flushes in all). A swapped-in page whose clean copy is kept is
//!   copied back write-protected (Move mode: loses its write-protection in the MOVE back;
//!   a read re-fault re-arms it); a write re-fault drops the copy.
//! - **asynchronous** ([`Installer::stages_async`], the daemon: only the tagger's agent
//!   can take a page out of its process): `access` marks the page
//!   `Leaving { entry: None }` and queues it; after the search, the queued samples go to
//!   [`Installer::stage_many`] with the batch's victims (one agent round trip; the
//!   victims of a space first, so samples never take the staging room a victim needs). At
//!   most 192 samples are queued per search; beyond that the policy gets "no information"
//!   (not accessed). While a sample is in flight the page is reported *accessed* (no news
//!   yet), a fault on it waits, and a policy that chooses it anyway gets it back
//!   (`on_map`). When the agent's answer is reaped ([`WorkerMm::finish_stage`]): moved →
//!   `Sampled` (the content in the frame's slot in the daemon; counted away, so the
//!   tagger knows), stayed → `Resident`. The re-fault installs it from the slot with
//!   `UFFDIO_COPY` into the program ([`Installer::unstage`]). A sample in flight behaves
//!   like any Leaving page on `munmap` (fenced: the frame is released at the finish),
//!   `mremap` (the stage finishes at the new address) and fork (the child waits for the
//!   stage and gets the content from the frame, `core/fork_wait.rs`), and when the
//!   process exits.
//!
//! Counters: `samples_taken` / `sample_refaults` / `sampled_evictions` in [`MmStats`],
//! `samples` / `sample_refaults` per space ([`SpaceCounters`]).
//!
//! # API stability
//! Extend, don't break: both modes build on these types. Changes are noted here.
//! - 2026-12-07 (later): [`Installer::stages_async`] (access sampling through an
//!   asynchronous stage); `PageState::Leaving::entry` is an `Option` (`None`: an access
//!   sample); `SpaceCounters::{samples, sample_refaults}`; `PageState::is_away` includes
//!   `Leaving`.
//! - 2026-12-07: crate `usm-mm` (was `usm_runtime::mm`, still re-exported there);
//!   per-space installers and policies (`add_process`, `fork_space`, `discard`, `remap`,
//!   `manage`, `remove_space`), `Installer::{stage_many, copy_staged, kill}`,
//!   [`StageOutcome`], [`PageState::Leaving`], [`WorkerMm::finish_stage`],
//!   [`WorkerMm::notify_alloc`]; `MmConfig::priorities`.
//! - 2026-11-22: [`InstallMode`]; [`Installer::install_zeroed`] (default: `install`);
//!   `SameMmInstaller` is a struct with a `mode` field (was a unit struct: use
//!   `SameMmInstaller::default()` / `::new(mode)`).

#![deny(unsafe_code)]

mod core;
mod error;
pub mod installer;
pub mod space;
pub mod stats;
#[allow(unsafe_code)] // the system calls: every unsafe block of the crate lives here
mod sys;

pub use self::core::{
    FaultClock, FaultResult, MemState, MmConfig, MmCore, RangeRelease, Waker, WorkerMm,
};
pub use error::MmError;
pub use installer::{InstallMode, InstallReport, Installer, StageOutcome};
pub use space::{ManagedRange, PageState, RangeKey, Space, SpaceCounters, SpacePolicy};
pub use stats::{FaultPath, Latency, MmStats, StatsSnapshot};
