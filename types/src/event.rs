//! The USM event vocabulary (`usm_event` in the USM documents).
//!
//! The mechanism turns what the kernel reports (userfaultfd messages, pidfd exits, tagger
//! messages, hint calls) into these events, and the runtime hands them to the policies of
//! the process or region they belong to. Policies never see raw kernel structures.
//!
//! Addresses are virtual addresses in the address space of [`Origin::pid`]; a fault
//! address is always rounded down to its 4 KiB page.

/// Who caused an event: the process and, when the kernel says, the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct Origin {
    /// Process id (the embedded runtime uses its own pid).
    pub pid: u32,
    /// Thread id of the faulting thread, when known (`UFFD_FEATURE_THREAD_ID`), else 0.
    pub tid: u32,
}

/// A missing-page (or write-protect, or minor) fault on a managed page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Fault {
    /// The faulting page, rounded down to 4 KiB.
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
    /// The fault is a write-protect fault on a present page (`UFFD_PAGEFAULT_FLAG_WP`).
    pub wp: bool,
    /// The fault is a minor fault (`UFFD_PAGEFAULT_FLAG_MINOR`): the page is in the page
    /// cache and only needs a mapping.
    pub minor: bool,
    /// How many bytes from `addr` the faulting access is known to cover at least (4096 for
    /// a plain fault; more when the caller knows the access is a larger one, for example
    /// a pre-fault of an I/O buffer). A policy may map more, never needs to map less.
    pub len_hint: u64,
    /// Who faulted.
    pub origin: Origin,
}

/// One event for the policies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Event {
    /// A page of a managed range was touched and is not present.
    Fault(Fault),
    /// The pages of `[start, start + len)` were given back (`munmap`, `MADV_DONTNEED`,
    /// `MADV_FREE`, a region dropped): their frames and swap slots are free.
    Free {
        /// Who gave them back.
        origin: Origin,
        /// First byte, page aligned.
        start: u64,
        /// Length in bytes, a multiple of 4096.
        len: u64,
    },
    /// A process was tagged and attached (daemon) or an embedded runtime started.
    NewProcess {
        /// The new process.
        origin: Origin,
        /// Its name (`comm`, or the executable's file name).
        name: String,
        /// The parent, when the process was born by `fork` of a managed process.
        parent: Option<u32>,
    },
    /// A process exited; every frame and slot it held is free.
    Exit {
        /// The process that ended.
        origin: Origin,
    },
    /// The program gave a hint about `[start, start + len)` in the USM hint language
    /// (`"PRIORITY=HIGH; EVICTION=DENY"`); the policies crate parses it.
    Hint {
        /// Who gave the hint.
        origin: Origin,
        /// First byte.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The hint text as given.
        text: String,
    },
}

impl Event {
    /// The origin of any event.
    pub fn origin(&self) -> Origin {
        match self {
            Event::Fault(f) => f.origin,
            Event::Free { origin, .. }
            | Event::NewProcess { origin, .. }
            | Event::Exit { origin }
            | Event::Hint { origin, .. } => *origin,
        }
    }
}
