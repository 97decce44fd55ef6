//! The userfaultfd uapi (`include/uapi/linux/userfaultfd.h`) as Rust types and constants.
//!
//! Layouts are `#[repr(C)]` copies of the kernel structs; `tests/uapi.rs` compiles a C probe
//! against the system header and compares every constant, size and offset the header has
//! (the Debian header is 6.1: it lacks MOVE, POISON, WP_ASYNC and `CONTINUE_MODE_WP`); the
//! newer ioctl numbers are recomputed there from their documented `_IOC` fields and issued
//! against the running kernel.
//!
//! Who writes what: fields the kernel fills are marked *(kernel)*; the rest are ours.

/// The ioctl "type" byte of every userfaultfd ioctl (`UFFDIO`).
pub const UFFDIO: u32 = 0xAA;
/// The API version passed in [`UffdioApi::api`].
pub const UFFD_API: u64 = 0xAA;
/// The ioctl type of `/dev/userfaultfd` (`USERFAULTFD_IOC`).
pub const USERFAULTFD_IOC: u32 = 0xAA;
/// Open flag: only user-mode faults are handled; kernel-mode accesses to a missing page
/// fail with `EFAULT` instead (Linux 5.11).
pub const UFFD_USER_MODE_ONLY: i32 = 1;

// ---- ioctl number encoding (asm-generic/ioctl.h; x86-64 and aarch64 use it) ----
const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
/// `_IOC_NONE`.
pub const IOC_NONE: u32 = 0;
/// `_IOC_WRITE` (user → kernel).
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ` (kernel → user).
pub const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
}
/// `_IO(type, nr)`.
pub const fn io(ty: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}
/// `_IOR(type, nr, T)`.
pub const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, core::mem::size_of::<T>())
}
/// `_IOWR(type, nr, T)`.
pub const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, core::mem::size_of::<T>())
}

// ---- ioctl command numbers (`_UFFDIO_*`, also the bit numbers of the `ioctls` masks) ----
/// `_UFFDIO_REGISTER`.
pub const _UFFDIO_REGISTER: u32 = 0x00;
/// `_UFFDIO_UNREGISTER`.
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
/// `_UFFDIO_WAKE`.
pub const _UFFDIO_WAKE: u32 = 0x02;
/// `_UFFDIO_COPY`.
pub const _UFFDIO_COPY: u32 = 0x03;
/// `_UFFDIO_ZEROPAGE`.
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
/// `_UFFDIO_MOVE` (Linux 6.8).
pub const _UFFDIO_MOVE: u32 = 0x05;
/// `_UFFDIO_WRITEPROTECT`.
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
/// `_UFFDIO_CONTINUE`.
pub const _UFFDIO_CONTINUE: u32 = 0x07;
/// `_UFFDIO_POISON` (Linux 6.6).
pub const _UFFDIO_POISON: u32 = 0x08;
/// `_UFFDIO_API`.
pub const _UFFDIO_API: u32 = 0x3F;

/// `USERFAULTFD_IOC_NEW`: on `/dev/userfaultfd`, returns a new userfaultfd; the argument is
/// the open flags (`O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY`).
pub const USERFAULTFD_IOC_NEW: u32 = io(USERFAULTFD_IOC, 0x00);
/// `UFFDIO_API`.
pub const UFFDIO_API: u32 = iowr::<UffdioApi>(UFFDIO, _UFFDIO_API);
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u32 = iowr::<UffdioRegister>(UFFDIO, _UFFDIO_REGISTER);
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = ior::<UffdioRange>(UFFDIO, _UFFDIO_UNREGISTER);
/// `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: u32 = ior::<UffdioRange>(UFFDIO, _UFFDIO_WAKE);
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u32 = iowr::<UffdioCopy>(UFFDIO, _UFFDIO_COPY);
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u32 = iowr::<UffdioZeropage>(UFFDIO, _UFFDIO_ZEROPAGE);
/// `UFFDIO_MOVE` (Linux 6.8).
pub const UFFDIO_MOVE: u32 = iowr::<UffdioMove>(UFFDIO, _UFFDIO_MOVE);
/// `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: u32 = iowr::<UffdioWriteprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);
/// `UFFDIO_CONTINUE`.
pub const UFFDIO_CONTINUE: u32 = iowr::<UffdioContinue>(UFFDIO, _UFFDIO_CONTINUE);
/// `UFFDIO_POISON` (Linux 6.6).
pub const UFFDIO_POISON: u32 = iowr::<UffdioPoison>(UFFDIO, _UFFDIO_POISON);

// ---- events (`uffd_msg.event`) ----
/// A page fault on a registered range.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// The process forked; `arg.fork.ufd` is the child's userfaultfd (installed in our table).
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// `mremap` moved a registered range.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// `madvise(MADV_DONTNEED / MADV_REMOVE / MADV_FREE)` dropped pages.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `munmap` (or an `mmap`/`mremap` over a registered range) unmapped it.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

// ---- pagefault flags (`uffd_msg.arg.pagefault.flags`) ----
/// The faulting access was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// The fault is a write-protect fault.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// The fault is a minor fault.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

// ---- features (`uffdio_api.features`) ----
/// WP faults reported (Linux 5.7 for anonymous memory).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_EVENT_FORK` (Linux 4.11; needs `CAP_SYS_PTRACE`).
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_EVENT_REMAP` (Linux 4.11).
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_EVENT_REMOVE` (Linux 4.11).
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// MISSING mode on hugetlbfs (Linux 4.11).
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// MISSING mode on shmem (Linux 4.11).
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_EVENT_UNMAP` (Linux 4.11).
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Missing faults raise SIGBUS instead of an event (Linux 4.14).
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// The faulting thread id is reported (Linux 4.14).
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// MINOR mode on hugetlbfs (Linux 5.13).
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// MINOR mode on shmem (Linux 5.14).
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// The exact fault address is reported, not rounded (Linux 5.18).
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// WP on hugetlbfs and shmem (Linux 5.19).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// WP also applies to unpopulated ptes (Linux 6.4).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFDIO_POISON` (Linux 6.6).
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
/// Asynchronous WP: the kernel resolves WP faults itself (Linux 6.7).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_MOVE` (Linux 6.8).
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

// ---- register modes ----
/// Report missing-page faults.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Report write-protect faults.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Report minor faults (shmem / hugetlbfs).
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// ---- op modes ----
/// `UFFDIO_COPY`: do not wake the faulting threads.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_COPY`: map the page write-protected.
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_ZEROPAGE`: do not wake.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT`: set (else clear) write protection.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT`: do not wake when clearing.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE`: do not wake.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE`: map write-protected (Linux 6.4).
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_POISON`: do not wake.
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_MOVE`: do not wake.
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_MOVE`: a hole in the source is skipped instead of failing with `ENOENT`.
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioApi {
    /// [`UFFD_API`].
    pub api: u64,
    /// In: requested features; out *(kernel)*: every feature the kernel supports.
    pub features: u64,
    /// *(kernel)* bit mask of the ioctls available on the fd (`1 << _UFFDIO_*`).
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioRange {
    /// First byte, page aligned.
    pub start: u64,
    /// Length in bytes, page multiple.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioRegister {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// *(kernel)* ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioCopy {
    /// Destination (registered range).
    pub dst: u64,
    /// Source in our own address space.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*`.
    pub mode: u64,
    /// *(kernel)* bytes copied, or `-errno`.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioZeropage {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub mode: u64,
    /// *(kernel)* bytes mapped, or `-errno`.
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioWriteprotect {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioContinue {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_CONTINUE_MODE_*`.
    pub mode: u64,
    /// *(kernel)* bytes mapped, or `-errno`.
    pub mapped: i64,
}

/// `struct uffdio_poison` (Linux 6.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioPoison {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_POISON_MODE_*`.
    pub mode: u64,
    /// *(kernel)* bytes poisoned, or `-errno`.
    pub updated: i64,
}

/// `struct uffdio_move` (Linux 6.8).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdioMove {
    /// Destination (registered on this userfaultfd).
    pub dst: u64,
    /// Source, same mm.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `UFFDIO_MOVE_MODE_*`.
    pub mode: u64,
    /// *(kernel)* bytes moved, or `-errno`.
    pub move_: i64,
}

/// `uffd_msg.arg.pagefault.feat`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub union UffdPagefaultFeat {
    /// Faulting thread id (`UFFD_FEATURE_THREAD_ID`).
    pub ptid: u32,
}

/// `uffd_msg.arg.pagefault`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct UffdMsgPagefault {
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// Faulting address (page aligned unless `EXACT_ADDRESS`).
    pub address: u64,
    /// Feature-dependent extra data.
    pub feat: UffdPagefaultFeat,
}

/// `uffd_msg.arg.fork`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct UffdMsgFork {
    /// The child's userfaultfd, installed in the reader's fd table.
    pub ufd: u32,
}

/// `uffd_msg.arg.remap`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct UffdMsgRemap {
    /// Old start.
    pub from: u64,
    /// New start.
    pub to: u64,
    /// Old length.
    pub len: u64,
}

/// `uffd_msg.arg.remove` (used by REMOVE and UNMAP).
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct UffdMsgRemove {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// `uffd_msg.arg.reserved`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct UffdMsgReserved {
    /// Unused.
    pub reserved1: u64,
    /// Unused.
    pub reserved2: u64,
    /// Unused.
    pub reserved3: u64,
}

/// `uffd_msg.arg`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub union UffdMsgArg {
    /// `UFFD_EVENT_PAGEFAULT`.
    pub pagefault: UffdMsgPagefault,
    /// `UFFD_EVENT_FORK`.
    pub fork: UffdMsgFork,
    /// `UFFD_EVENT_REMAP`.
    pub remap: UffdMsgRemap,
    /// `UFFD_EVENT_REMOVE` / `UFFD_EVENT_UNMAP`.
    pub remove: UffdMsgRemove,
    /// Padding arm.
    pub reserved: UffdMsgReserved,
}

/// `struct uffd_msg` (packed, 32 bytes). Written by the kernel into `read(2)` buffers.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// Event payload.
    pub arg: UffdMsgArg,
}

impl UffdMsg {
    /// An all-zero message (a valid value for every arm), used to size read buffers.
    pub const ZEROED: UffdMsg = UffdMsg {
        event: 0,
        reserved1: 0,
        reserved2: 0,
        reserved3: 0,
        arg: UffdMsgArg {
            reserved: UffdMsgReserved {
                reserved1: 0,
                reserved2: 0,
                reserved3: 0,
            },
        },
    };
}

const _: () = assert!(core::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(core::mem::size_of::<UffdioMove>() == 40);
const _: () = assert!(core::mem::size_of::<UffdioPoison>() == 32);
