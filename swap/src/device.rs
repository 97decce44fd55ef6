//! Swap devices: a preallocated file or a block device (loop, zram), opened `O_DIRECT`.
//!
//! Life of a device:
//! 1. **Create / format.** [`create_swap_file`] makes a new file (`O_EXCL`, `fallocate`d to
//!    its full size and written out, so no first write is an extent conversion) and
//!    formats it; [`create_sparse_swap_file`] makes a sparse one instantly (blocks
//!    allocated as slots are first written; a full file system fails a write with
//!    `ENOSPC`, and the page stays in memory); [`format()`] writes the USM header (see
//!    [`header`](crate::header)) on an existing file or block device, refusing a first block
//!    that holds foreign data unless forced (`usm mkswap`).
//! 2. **Open.** [`SwapDevice::open`] opens `O_DIRECT` (block devices also `O_EXCL`, so a
//!    mounted or kernel-swapped device is refused with `EBUSY`), reads the header and refuses
//!    a path without a valid one ([`SwapError::NotUsmSwap`]) — it never writes to it.
//! 3. **Use.** Slot `s` lives at byte `(s + 1) * 4096`. Slot allocation is per device in a
//!    [`SlotMap`](crate::SlotMap) owned by the allocator ([`SwapSpace`](crate::SwapSpace));
//!    the device itself only keeps the *bad* map, an atomic bitfield that any engine on any
//!    worker sets when a read of a slot fails, so the slot is never handed out again.
//!
//! A `SwapDevice` is shared (`Arc`) between the allocator and the engines of all workers;
//! each engine registers the fd in its own ring.
//!
//! **zram**: `O_DIRECT` reads and writes on `/dev/zram*` complete synchronously inside the
//! block layer, so io_uring punts them to its io-wq kernel threads. That CPU time is not
//! the caller's thread time: benchmarks must count it (it shows up in the process's
//! `getrusage`, since io-wq workers belong to the thread group). Such a device is
//! *synchronous* ([`SwapDevice::is_synchronous`]: zram without a writeback backing device,
//! detected at open through `/sys/dev/block/MAJ:MIN`): a request costs a few µs of CPU and
//! never waits for hardware, so the engine performs a lone request on it inline
//! (see [`Engine`](crate::Engine), "Synchronous devices"), as the kernel's own swap-in does
//! for `SWP_SYNCHRONOUS_IO` devices.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, OFlag, fallocate, open};
use nix::sys::stat::Mode;
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{Whence, fsync, lseek};
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::entry::DeviceId;
use crate::error::{Result, SwapError};
use crate::header::{PAGE_SIZE, SwapHeader, describe_foreign};
use crate::sys::buf::PageBuf;

/// What backs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DeviceKind {
    /// A regular file on a filesystem that supports `O_DIRECT`.
    File,
    /// A block device (loop, zram, a disk partition), opened `O_EXCL`.
    Block,
}

/// How to open a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceOptions {
    /// Open read-only: every write then fails (and the page stays with the caller).
    pub read_only: bool,
}

/// How to format a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// Overwrite a first block that holds foreign data (a file system, a Linux swap
    /// signature, anything but zeros or an old USM header).
    pub force: bool,
}

fn is_block(path: &Path) -> Result<bool> {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .map_err(|e| SwapError::device("stat", path, e))
}

fn open_direct(path: &Path, read_only: bool) -> Result<(OwnedFd, DeviceKind)> {
    let block = is_block(path)?;
    let mut flags = OFlag::O_DIRECT | OFlag::O_CLOEXEC;
    flags |= if read_only {
        OFlag::O_RDONLY
    } else {
        OFlag::O_RDWR
    };
    if block {
        // Without O_CREAT, O_EXCL on a block device means "exclusive open": EBUSY if it
        // is mounted, swapped on by the kernel, or held by another exclusive opener.
        flags |= OFlag::O_EXCL;
    }
    let fd = open(path, flags, Mode::empty()).map_err(|e| {
        let op = match e {
            nix::errno::Errno::EINVAL => "open O_DIRECT (EINVAL: no O_DIRECT here, e.g. tmpfs)",
            nix::errno::Errno::EBUSY => "open O_EXCL (EBUSY: mounted, swapon'd or in use)",
            _ => "open",
        };
        SwapError::device(op, path, e.into())
    })?;
    let kind = if block {
        DeviceKind::Block
    } else {
        DeviceKind::File
    };
    Ok((fd, kind))
}

fn size_of(fd: BorrowedFd<'_>, path: &Path) -> Result<u64> {
    lseek(fd, 0, Whence::SeekEnd)
        .map(|n| n as u64)
        .map_err(|e| SwapError::device("lseek(SEEK_END)", path, e.into()))
}

fn read_first_block(fd: BorrowedFd<'_>, path: &Path, bytes: u64) -> Result<PageBuf> {
    let mut block = PageBuf::page();
    if bytes >= PAGE_SIZE as u64 {
        let n = pread(fd, &mut block, 0)
            .map_err(|e| SwapError::device("read header", path, e.into()))?;
        if n != PAGE_SIZE {
            return Err(SwapError::NotUsmSwap {
                path: path.into(),
                found: "less than one page",
            });
        }
    }
    Ok(block)
}

/// Writes a USM swap header on `path` (a file or a block device) and returns it.
///
/// Refuses ([`SwapError::ForeignData`]) when the first block holds anything but zeros or
/// an earlier USM header, unless `opts.force`. The slots are not cleared: a freshly
/// formatted device has no allocated slot, so nothing reads them before writing.
pub fn format(path: impl AsRef<Path>, opts: &FormatOptions) -> Result<SwapHeader> {
    let path = path.as_ref();
    let (fd, _) = open_direct(path, false)?;
    let bytes = size_of(fd.as_fd(), path)?;
    let header = SwapHeader::for_size(path, bytes)?;
    let mut block = read_first_block(fd.as_fd(), path, bytes)?;
    match describe_foreign(&block) {
        None | Some("only zeros") => {}
        Some(found) if !opts.force => {
            return Err(SwapError::ForeignData {
                path: path.into(),
                found,
            });
        }
        Some(_) => {}
    }
    header.encode(&mut block);
    let n = pwrite(fd.as_fd(), &block, 0)
        .map_err(|e| SwapError::device("write header", path, e.into()))?;
    if n != PAGE_SIZE {
        return Err(SwapError::device(
            "write header",
            path,
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    fsync(fd.as_fd()).map_err(|e| SwapError::device("fsync", path, e.into()))?;
    Ok(header)
}

/// Creates a new swap file of `bytes` bytes (rounded down to whole pages) and formats it.
///
/// The file is preallocated with `fallocate` (so writes never find the file system full)
/// and then **written out with zeros** through `O_DIRECT` and synced: `fallocate` leaves
/// *unwritten* extents, and on ext4 the first direct write into one is a journalled extent
/// conversion — measured here, it made every first write-back to a slot far slower than
/// the kernel's swap on the same file (which bypasses the file system). Writing costs about
/// a second per GiB, once. Refuses an existing path (`EEXIST`); removes the file again if
/// anything fails after creating it.
pub fn create_swap_file(path: impl AsRef<Path>, bytes: u64) -> Result<SwapHeader> {
    let path = path.as_ref();
    let bytes = bytes / PAGE_SIZE as u64 * PAGE_SIZE as u64;
    SwapHeader::for_size(path, bytes)?;
    let fd = open(
        path,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_DIRECT | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| SwapError::device("create", path, e.into()))?;
    let made = write_out(fd.as_fd(), path, bytes);
    drop(fd);
    let header = made.and_then(|()| format(path, &FormatOptions::default()));
    if header.is_err() {
        let _ = std::fs::remove_file(path);
    }
    header
}

/// Creates a new **sparse** swap file of `bytes` bytes (rounded down to whole pages) and
/// formats it: the file is only `ftruncate`d to its size, so creating it costs nothing
/// whatever its size, and blocks are allocated by the file system as slots are first
/// written (io_uring `O_DIRECT` writes into holes work; a first write into a hole costs a
/// block allocation, which [`create_swap_file`] pays up front instead).
///
/// Nothing is reserved: when the file system is full, a write-back completes with
/// `ENOSPC`, a [`SwapError::WriteFailed`] that is [`is_no_space`](SwapError::is_no_space)
/// and [`keeps_page`](SwapError::keeps_page) — the page stays in memory; no data is
/// lost — and the device counts as full from then on
/// ([`SwapDevice::mark_out_of_space`]): the memory manager meets the *swap full* case. Reading a slot never written reads zeros from the
/// hole (nothing reads a slot before writing it). This is what a private daemon
/// (`usm exec`) uses for its temporary swap file. Refuses an existing path (`EEXIST`);
/// removes the file again if anything fails after creating it.
pub fn create_sparse_swap_file(path: impl AsRef<Path>, bytes: u64) -> Result<SwapHeader> {
    let path = path.as_ref();
    let bytes = bytes / PAGE_SIZE as u64 * PAGE_SIZE as u64;
    SwapHeader::for_size(path, bytes)?;
    let fd = open(
        path,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| SwapError::device("create", path, e.into()))?;
    let sized = nix::unistd::ftruncate(&fd, bytes as libc::off_t)
        .map_err(|e| SwapError::device("ftruncate", path, e.into()));
    drop(fd);
    let header = sized.and_then(|()| format(path, &FormatOptions::default()));
    if header.is_err() {
        let _ = std::fs::remove_file(path);
    }
    header
}

/// `fallocate`s `bytes` on `fd`, then writes zeros over all of it in 1 MiB direct writes.
fn write_out(fd: BorrowedFd<'_>, path: &Path, bytes: u64) -> Result<()> {
    const CHUNK_PAGES: usize = 256;
    fallocate(fd, FallocateFlags::empty(), 0, bytes as libc::off_t)
        .map_err(|e| SwapError::device("fallocate", path, e.into()))?;
    let zeros = PageBuf::new(CHUNK_PAGES);
    let mut off = 0u64;
    while off < bytes {
        let len = (bytes - off).min(zeros.len() as u64) as usize;
        let n = pwrite(fd, &zeros[..len], off as libc::off_t)
            .map_err(|e| SwapError::device("write zeros to", path, e.into()))?;
        if n == 0 {
            return Err(SwapError::device(
                "write zeros to",
                path,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        off += n as u64;
    }
    fsync(fd).map_err(|e| SwapError::device("fsync", path, e.into()))
}

/// An open, validated USM swap device. Shared between the allocator and every engine.
#[derive(Debug)]
pub struct SwapDevice {
    id: DeviceId,
    path: PathBuf,
    fd: OwnedFd,
    kind: DeviceKind,
    header: SwapHeader,
    read_only: bool,
    synchronous: bool,
    bad: Box<[AtomicU64]>,
    bad_count: AtomicU64,
    /// A write failed with `ENOSPC` (the file system of a sparse file is full).
    out_of_space: AtomicBool,
}

/// Whether the block device behind `fd` is zram without a writeback backing device (its
/// I/O completes in the submitting context, in RAM). Any error reading sysfs means "no".
fn detect_synchronous(fd: BorrowedFd<'_>) -> bool {
    let Ok(stat) = nix::sys::stat::fstat(fd) else {
        return false;
    };
    let rdev = stat.st_rdev;
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let Ok(sys) = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")) else {
        return false;
    };
    let is_zram = sys
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("zram"));
    // With a backing device, pages written back are read from it: not synchronous.
    let backing = std::fs::read_to_string(sys.join("backing_dev")).unwrap_or_default();
    let backing = backing.trim();
    is_zram && (backing.is_empty() || backing == "none")
}

impl SwapDevice {
    /// Opens `path` read-write as device `id`; see [`open_with`](Self::open_with).
    pub fn open(id: DeviceId, path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(id, path, &DeviceOptions::default())
    }

    /// Opens `path` `O_DIRECT` (block devices `O_EXCL`) and validates its USM header.
    /// A path without one is refused with [`SwapError::NotUsmSwap`] and left untouched.
    pub fn open_with(id: DeviceId, path: impl AsRef<Path>, opts: &DeviceOptions) -> Result<Self> {
        let path = path.as_ref();
        if id.0 == u8::MAX {
            return Err(SwapError::UnknownDevice(id));
        }
        let (fd, kind) = open_direct(path, opts.read_only)?;
        let bytes = size_of(fd.as_fd(), path)?;
        let block = read_first_block(fd.as_fd(), path, bytes)?;
        let header = SwapHeader::decode(path, &block, bytes)?;
        let words = header.slots.div_ceil(64) as usize;
        let synchronous = kind == DeviceKind::Block && detect_synchronous(fd.as_fd());
        Ok(Self {
            id,
            path: path.into(),
            fd,
            kind,
            header,
            read_only: opts.read_only,
            synchronous,
            bad: (0..words).map(|_| AtomicU64::new(0)).collect(),
            bad_count: AtomicU64::new(0),
            out_of_space: AtomicBool::new(false),
        })
    }

    /// Whether the device is synchronous: zram without a writeback backing device, whose
    /// reads and writes complete in the caller's context in a few µs (see the module docs).
    pub fn is_synchronous(&self) -> bool {
        self.synchronous
    }

    /// The device's id (the device field of its swap entries).
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The validated header.
    pub fn header(&self) -> &SwapHeader {
        &self.header
    }

    /// Number of 4 KiB slots.
    pub fn slots(&self) -> u64 {
        self.header.slots
    }

    /// Whether it was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The `O_DIRECT` descriptor (engines register it in their rings).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Byte offset of `slot`.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        SwapHeader::slot_offset(slot)
    }

    /// Records that `slot`'s content is lost (a read of it failed). Any thread may call
    /// this; the allocator retires the slot instead of freeing it.
    pub fn mark_bad(&self, slot: u64) {
        if let Some(w) = self.bad.get((slot / 64) as usize) {
            let bit = 1u64 << (slot % 64);
            if w.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                self.bad_count.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = self.id.0, slot, path = %self.path.display(),
                    "swap slot marked bad");
            }
        }
    }

    /// Whether `slot` was marked bad.
    pub fn is_bad(&self, slot: u64) -> bool {
        self.bad
            .get((slot / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1u64 << (slot % 64)) != 0)
    }

    /// Number of slots marked bad.
    pub fn bad_slots(&self) -> u64 {
        self.bad_count.load(Ordering::Relaxed)
    }

    /// Records that a write failed with `ENOSPC`: the file system under a sparse file
    /// ([`create_sparse_swap_file`]) is full. From then on the device counts as full —
    /// [`SwapSpace`](crate::SwapSpace) hands out no more of its slots and counts none of
    /// them free — so the memory manager meets the *swap full* case (pages stay in
    /// memory; the OOM policy decides when frames run out too) instead of writes that
    /// keep failing. Pages already written stay readable; slots in use are freed as
    /// usual. It stays full for the device's life (freeing a slot gives no block back to
    /// the file system). Any thread may call this; said once.
    pub fn mark_out_of_space(&self) {
        if !self.out_of_space.swap(true, Ordering::AcqRel) {
            tracing::warn!(device = self.id.0, path = %self.path.display(),
                "the file system of this swap file is full: the device is treated as full from now on (pages already written stay readable)");
        }
    }

    /// Whether a write failed with `ENOSPC` ([`mark_out_of_space`](Self::mark_out_of_space)).
    pub fn is_out_of_space(&self) -> bool {
        self.out_of_space.load(Ordering::Acquire)
    }
}
