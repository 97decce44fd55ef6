//! Raw system calls of the tagger: the only place with `unsafe`.
//!
//! Every system call the tagger makes for itself goes straight to `syscall(2)`: the
//! tagger exports `mmap`, `munmap`, `mremap` and `ioctl`, so calling the libc names from
//! inside would re-enter its own wrappers.

// Words and pointers in raw memory outside the managed heap: std's atomics.
#![allow(clippy::disallowed_types)]

pub(crate) mod arena;
pub(crate) mod exports;
pub(crate) mod heap;
mod init;

use std::io;
use std::os::fd::RawFd;

/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// `UFFDIO_REGISTER` = `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub(crate) const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `UFFDIO_UNREGISTER` = `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// Page size the tagger assumes (x86-64 and aarch64 4 KiB kernels).
pub(crate) const PAGE_SIZE: usize = 4096;

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

unsafe extern "C" {
    fn __errno_location() -> *mut libc::c_int;
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> libc::c_int;
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Sets the calling thread's `errno` (the malloc family reports ENOMEM this way).
pub(crate) fn set_errno(value: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *__errno_location() = value };
}

/// A `pthread_mutex_t` for a static lock of the tagger (heap, arena, address-space
/// changes): futex-based, never allocating, and usable in a forked child — each is held
/// across `fork` by the atfork prepare handler, released by the parent handler and
/// re-initialised in the child, where the thread that held it does not exist.
pub(crate) struct ForkMutex(std::cell::UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: the mutex is only used through pthread calls, which synchronise themselves.
unsafe impl Sync for ForkMutex {}

impl ForkMutex {
    /// An unlocked mutex.
    pub(crate) const fn new() -> ForkMutex {
        ForkMutex(std::cell::UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER))
    }

    /// Locks it (not re-entrant).
    pub(crate) fn lock(&self) {
        // SAFETY: an initialised mutex that lives as long as `self`.
        unsafe { libc::pthread_mutex_lock(self.0.get()) };
    }

    /// Unlocks it; only the thread that locked it may call this.
    pub(crate) fn unlock(&self) {
        // SAFETY: called by the thread that locked it (the callers' contract).
        unsafe { libc::pthread_mutex_unlock(self.0.get()) };
    }

    /// In the `fork` child handler: a fresh, unlocked mutex (the inherited one may be held
    /// by a thread that does not exist here; unlocking it would be undefined).
    pub(crate) fn reinit_in_child(&self) {
        // SAFETY: the child has one thread, in its atfork handler: nobody else can touch
        // the mutex right now.
        unsafe { self.0.get().write(libc::PTHREAD_MUTEX_INITIALIZER) };
    }
}

/// Changes of the program's address space (`mmap`, `munmap`, `mremap`, `fork`), one at
/// a time.
///
/// The kernel posts a `munmap`/`mremap` event on the userfaultfd *after* it released the
/// address-space lock, each thread its own, and the system call returns once the daemon
/// has read the event. Two threads' changes can therefore reach the daemon in another
/// order than they happened: thread A's `mremap` frees `R` and thread B's `mremap` moves a
/// block into `R` at once; if B's event is read before A's `UNMAP(R)`, the daemon drops
/// B's pages with A's range, and B reads zeros where its data was. Held from before the
/// system call until it returns, this lock makes the daemon read every change before the
/// next one is made, which is all the ordering it needs (a fault can only name memory that
/// exists, so it cannot overtake the change that made it).
///
/// Re-entered by the thread that holds it (a signal handler that unmaps), it lets that
/// thread through rather than deadlock.
struct ChangeLock {
    mutex: ForkMutex,
    /// `pthread_self()` of the holder, 0 when free.
    owner: std::sync::atomic::AtomicUsize,
}

static CHANGES: ChangeLock = ChangeLock {
    mutex: ForkMutex::new(),
    owner: std::sync::atomic::AtomicUsize::new(0),
};

fn changes_lock() {
    CHANGES.mutex.lock();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    CHANGES
        .owner
        .store(me, std::sync::atomic::Ordering::Relaxed);
}

fn changes_unlock() {
    CHANGES.owner.store(0, std::sync::atomic::Ordering::Relaxed);
    CHANGES.mutex.unlock();
}

/// Runs the address-space change `f` under [`ChangeLock`].
fn in_order<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    if CHANGES.owner.load(std::sync::atomic::Ordering::Relaxed) == me {
        return f();
    }
    changes_lock();
    let r = f();
    changes_unlock();
    r
}

/// `fork` prepare handler (after the heap's and the arena's): the fork is a change too.
pub(crate) fn changes_fork_prepare() {
    changes_lock();
}

/// `fork` parent handler.
pub(crate) fn changes_fork_parent() {
    changes_unlock();
}

/// `fork` child handler: one thread; re-initialise the lock it inherited held.
pub(crate) fn changes_fork_child() {
    CHANGES.owner.store(0, std::sync::atomic::Ordering::Relaxed);
    CHANGES.mutex.reinit_in_child();
}

/// `mmap(2)` without going through the exported wrapper. Returns the address or errno.
pub(crate) fn mmap_raw(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> Result<usize, i32> {
    // SAFETY: mmap only creates or replaces mappings as asked; replacing memory the
    // program still uses (MAP_FIXED) is the caller's contract, as with libc's mmap.
    let rc =
        in_order(|| unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) });
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as usize)
    }
}

/// `munmap(2)` without going through the exported wrapper.
pub(crate) fn munmap_raw(addr: usize, len: usize) -> Result<(), i32> {
    // SAFETY: as for munmap(2): the caller owns the range it unmaps.
    let rc = in_order(|| unsafe { libc::syscall(libc::SYS_munmap, addr, len) });
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// `mremap(2)` without going through the exported wrapper.
pub(crate) fn mremap_raw(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: usize,
) -> Result<usize, i32> {
    // SAFETY: as for mremap(2): the caller owns the old range (and the new one with
    // MREMAP_FIXED).
    let rc = in_order(|| unsafe {
        libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr)
    });
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as usize)
    }
}

/// `ioctl(2)` without going through the exported wrapper.
///
/// # Safety
/// - `arg` must be what `request` expects on `fd` (a valid pointer for pointer requests).
pub(crate) unsafe fn ioctl_raw(fd: i32, request: libc::c_ulong, arg: usize) -> libc::c_long {
    // SAFETY: forwarded to the caller's contract.
    unsafe { libc::syscall(libc::SYS_ioctl, fd, request, arg) }
}

/// Opens a userfaultfd for this process, *not* negotiated (no `UFFDIO_API`):
/// `/dev/userfaultfd` first, then the `userfaultfd(2)` system call. Never
/// `UFFD_USER_MODE_ONLY`: faults from system calls must reach the handler too.
pub(crate) fn open_userfaultfd() -> Result<RawFd, i32> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the path is a NUL-terminated literal.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev >= 0 {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value.
        let fd = unsafe { ioctl_raw(dev, USERFAULTFD_IOC_NEW, flags as usize) };
        let err = errno();
        close_raw(dev);
        if fd >= 0 {
            return Ok(fd as RawFd);
        }
        let _ = err;
    }
    // SAFETY: userfaultfd(2) takes flags by value.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd as RawFd)
    }
}

/// `UFFDIO_REGISTER` (MISSING) of `[start, start+len)` on `uffd`.
pub(crate) fn uffd_register(uffd: RawFd, start: usize, len: usize) -> Result<(), i32> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: start as u64,
            len: len as u64,
        },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: `reg` is a valid uffdio_register the kernel reads and writes (ioctls).
    let rc = unsafe { ioctl_raw(uffd, UFFDIO_REGISTER, (&raw mut reg) as usize) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// `UFFDIO_UNREGISTER` of `[start, start+len)` on `uffd`.
pub(crate) fn uffd_unregister(uffd: RawFd, start: usize, len: usize) -> Result<(), i32> {
    let range = UffdioRange {
        start: start as u64,
        len: len as u64,
    };
    // SAFETY: `range` is a valid uffdio_range the kernel only reads.
    let rc = unsafe { ioctl_raw(uffd, UFFDIO_UNREGISTER, (&raw const range) as usize) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// Reads the range of a `struct uffdio_register` the *program* passes to its own
/// userfaultfd.
///
/// # Safety
/// - `arg` must be null or point to a readable `struct uffdio_register`.
pub(crate) unsafe fn read_register_range(arg: usize) -> Option<UffdioRange> {
    if arg == 0 {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    Some(unsafe { (*(arg as *const UffdioRegister)).range })
}

/// Closes a raw descriptor (errors ignored: nothing useful to do).
pub(crate) fn close_raw(fd: RawFd) {
    // SAFETY: the caller owns `fd` and does not use it afterwards.
    unsafe { libc::close(fd) };
}

/// Replaces descriptor `fd` with a duplicate of `with` (atomically closing what `fd`
/// was), so the number stays taken: a racing `ioctl` on it fails instead of reaching a
/// file the program opened meanwhile.
pub(crate) fn replace_fd(fd: RawFd, with: RawFd) {
    // SAFETY: dup3 only changes our descriptor table; `fd` is ours.
    unsafe { libc::dup3(with, fd, libc::O_CLOEXEC) };
}

/// Opens `/dev/null` (the stand-in for descriptors the tagger gives up).
pub(crate) fn open_devnull() -> RawFd {
    // SAFETY: the path is a NUL-terminated literal.
    unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) }
}

/// Writes a whole line to stderr with one `write(2)` (no allocation, no lock).
pub(crate) fn write_stderr(line: &[u8]) {
    let mut rest = line;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid readable buffer of its length.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Measures this process's coverage from `/proc/self/smaps` without allocating: raw
/// `open`/`read` into a buffer on the caller's stack (a thread stack, never managed),
/// parsed as it streams ([`usm_proto::coverage::SmapsParser`]). Safe for the tagger's
/// message thread, which must never take the heap lock. Returns the errno on failure.
pub(crate) fn self_coverage() -> Result<usm_proto::coverage::Coverage, i32> {
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe {
        libc::open(
            c"/proc/self/smaps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    let mut parser = usm_proto::coverage::SmapsParser::new();
    let mut buf = [0u8; usm_proto::coverage::SMAPS_CHUNK];
    let result = loop {
        // SAFETY: `buf` is a valid writable buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            break Err(e);
        }
        if n == 0 {
            break Ok(());
        }
        parser.feed(&buf[..n as usize]);
    };
    close_raw(fd);
    result.map(|()| parser.finish())
}

/// The mapping holding `addr` from `/proc/self/maps`, read like [`self_coverage`]: raw
/// `open`/`read` into a buffer on the caller's stack, parsed as it streams
/// ([`usm_proto::maps::VmaFinder`]), nothing allocated. `Ok(None)`: no mapping holds it.
pub(crate) fn vma_containing(addr: usize) -> Result<Option<(usize, usize)>, i32> {
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    let mut finder = usm_proto::maps::VmaFinder::new(addr as u64);
    let mut buf = [0u8; 1024];
    let result = loop {
        // SAFETY: `buf` is a valid writable buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            break Err(e);
        }
        if n == 0 || finder.feed(&buf[..n as usize]) {
            break Ok(());
        }
    };
    close_raw(fd);
    result.map(|()| finder.finish().map(|r| (r.start as usize, r.end as usize)))
}

/// Kills the whole process with `SIGKILL` (used when continuing would read zeros).
pub(crate) fn kill_self() -> ! {
    // SAFETY: signals our own process; no memory arguments.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
        libc::_exit(137)
    }
}

/// This process's pid.
pub(crate) fn getpid() -> u32 {
    // SAFETY: getpid(2) cannot fail.
    unsafe { libc::getpid() as u32 }
}

/// Installs the fork handlers (heap lock around `fork`, session reset in the child).
pub(crate) fn install_atfork() -> Result<(), i32> {
    // SAFETY: the three handlers are `extern "C"` functions that live as long as the
    // library (it is never unloaded: LD_PRELOAD objects stay until exit).
    let rc = unsafe {
        pthread_atfork(
            Some(init::atfork_prepare),
            Some(init::atfork_parent),
            Some(init::atfork_child),
        )
    };
    if rc != 0 { Err(rc) } else { Ok(()) }
}

/// Takes ownership of a descriptor the kernel just returned to the tagger.
pub(crate) fn own_fd(raw: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `raw` is a fresh descriptor (open_userfaultfd) that nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}

/// `UFFDIO_MOVE` = `_IOWR(0xAA, 0x05, struct uffdio_move)` (Linux 6.8).
const UFFDIO_MOVE: libc::c_ulong = 0xC028_AA05;

/// `struct uffdio_move`.
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// `UFFDIO_MOVE_MODE_DONTWAKE`.
const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1;
/// `UFFDIO_WAKE` = `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;

/// `UFFDIO_MOVE` of `len` bytes from `src` to `dst` in this process, waking threads
/// waiting on `dst` if `wake`. Returns the bytes moved; on an error after a partial
/// move, the partial count; otherwise the errno.
pub(crate) fn uffd_move(
    uffd: RawFd,
    dst: usize,
    src: usize,
    len: usize,
    wake: bool,
) -> Result<usize, i32> {
    let mut mv = UffdioMove {
        dst: dst as u64,
        src: src as u64,
        len: len as u64,
        mode: if wake { 0 } else { UFFDIO_MOVE_MODE_DONTWAKE },
        moved: 0,
    };
    // SAFETY: `mv` is a valid uffdio_move. The move transfers pages between two
    // ranges of this process that the agent's protocol owns at this moment: the source
    // page leaves the application (it becomes a hole that faults to the daemon) or the
    // staging slot; the kernel checks both ranges.
    let rc = unsafe { ioctl_raw(uffd, UFFDIO_MOVE, (&raw mut mv) as usize) };
    if rc >= 0 {
        return Ok(mv.moved.max(0) as usize);
    }
    let err = errno();
    if mv.moved > 0 {
        Ok(mv.moved as usize)
    } else {
        Err(err)
    }
}

/// `UFFDIO_WAKE` of `[start, start+len)`: threads waiting on it retry their access.
pub(crate) fn uffd_wake(uffd: RawFd, start: usize, len: usize) {
    let range = UffdioRange {
        start: start as u64,
        len: len as u64,
    };
    // SAFETY: `range` is a valid uffdio_range the kernel only reads.
    unsafe { ioctl_raw(uffd, UFFDIO_WAKE, (&raw const range) as usize) };
}

/// Reads one byte at `addr` (a page of this process's memory), so that a missing page
/// faults in, through the userfaultfd if the range is registered.
pub(crate) fn touch(addr: usize) {
    // SAFETY: the caller names a readable page of this process (the fork gate: a private
    // anonymous mapping the tagger made and never unmaps); a volatile read of a byte has
    // no other effect.
    unsafe { std::ptr::read_volatile(addr as *const u8) };
}

/// `madvise(2)`.
pub(crate) fn madvise_raw(addr: usize, len: usize, advice: i32) -> Result<(), i32> {
    // SAFETY: madvise on a range the caller owns; DONTNEED/DONTFORK/NOHUGEPAGE do not
    // invalidate Rust references (the staging area is never referenced from Rust).
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// Blocks until the peer of socket `fd` hangs up (`POLLRDHUP`/`POLLHUP`: true),
/// without reading anything from it (another process reads its messages). False if the
/// socket can no longer be watched (the program closed it, or poll failed).
pub(crate) fn wait_peer_hangup(fd: RawFd) -> bool {
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        if pfd.revents & libc::POLLNVAL != 0 {
            return false;
        }
        if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
            return true;
        }
    }
}

/// A close-on-exec duplicate of `fd`.
pub(crate) fn dup_cloexec(fd: RawFd) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only adds a descriptor to our table.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    (dup >= 0).then(|| own_fd(dup))
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): write-fault every page of the range without
/// changing its content — breaks copy-on-write sharing with a fork child.
const MADV_POPULATE_WRITE: i32 = 23;

/// Makes the present page at `addr` this process's own (breaks copy-on-write sharing
/// with a fork child) without writing to it: `madvise(MADV_POPULATE_WRITE)`. Fails with
/// `ENOMEM`/`EFAULT` instead of faulting if the range is gone meanwhile.
pub(crate) fn break_cow(addr: usize, len: usize) -> Result<(), i32> {
    madvise_raw(addr, len, MADV_POPULATE_WRITE)
}

/// A zeroed array of `n` atomic words in memory of its own, outside the managed heap
/// (a private anonymous mapping the tagger never registers), never freed. Used for the
/// agent's bookkeeping: an evicted heap page under it would make the agent fault on its
/// own data in the middle of an eviction.
pub(crate) fn unmanaged_words(n: usize) -> Result<&'static [std::sync::atomic::AtomicU64], i32> {
    let len = (n.max(1) * 8).next_multiple_of(PAGE_SIZE);
    let addr = mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )?;
    // SAFETY: `addr` is a fresh, page-aligned, zero-filled private mapping of at least
    // `8 * n` bytes that nothing else refers to and that is never unmapped, so it is
    // valid for `'static`; `AtomicU64` has the size and alignment of `u64`, and all-zero
    // bytes are a valid value.
    Ok(unsafe { std::slice::from_raw_parts(addr as *const std::sync::atomic::AtomicU64, n) })
}

/// Moves `value` into memory of its own outside the managed heap (a private anonymous
/// mapping the tagger never registers, never unmapped) and returns a reference to it
/// for the rest of the process. Gives the value back with the errno if `mmap` fails.
pub(crate) fn leak_unmanaged<T: Sync + 'static>(value: T) -> Result<&'static T, (T, i32)> {
    const { assert!(std::mem::align_of::<T>() <= PAGE_SIZE) };
    let len = std::mem::size_of::<T>().max(1).next_multiple_of(PAGE_SIZE);
    let addr = match mmap_raw(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    ) {
        Ok(addr) => addr,
        Err(e) => return Err((value, e)),
    };
    let p = addr as *mut T;
    // SAFETY: `p` is a fresh, page-aligned (so aligned for `T`, checked above) writable
    // mapping of at least `size_of::<T>()` bytes that nothing else refers to; after the
    // write it holds a valid `T` that is never moved, dropped or unmapped, so a shared
    // reference to it is valid for `'static` (`T: Sync` for sharing across threads).
    unsafe {
        p.write(value);
        Ok(&*p)
    }
}

/// A process-wide reference to a leaked value that can be set, and *forgotten* in a
/// forked child (whose copy describes the parent's threads), then set again.
///
/// Values live outside the managed heap ([`leak_unmanaged`]) and are never freed, so a
/// reference handed out stays valid for the rest of the process even after
/// [`LeakedRef::forget`].
pub(crate) struct LeakedRef<T: 'static> {
    ptr: std::sync::atomic::AtomicPtr<T>,
}

impl<T: 'static> LeakedRef<T> {
    /// Empty.
    pub(crate) const fn new() -> LeakedRef<T> {
        LeakedRef {
            ptr: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The current value, if any.
    pub(crate) fn get(&self) -> Option<&'static T> {
        let p = self.ptr.load(std::sync::atomic::Ordering::Acquire);
        // SAFETY: `p` is null or came from `leak_unmanaged` in `set` and is never freed
        // (nothing can free it), so it is valid and immutably shared for `'static`; it is
        // only ever read through shared references.
        unsafe { p.as_ref() }
    }

    /// Sets the value if none is set (`None`, and `value` dropped, otherwise, or if no
    /// memory could be mapped for it).
    pub(crate) fn set(&self, value: T) -> Option<&'static T>
    where
        T: Sync,
    {
        if self.get().is_some() {
            return None;
        }
        let leaked: &'static T = leak_unmanaged(value).ok()?;
        let p = std::ptr::from_ref(leaked).cast_mut();
        self.ptr
            .compare_exchange(
                std::ptr::null_mut(),
                p,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            // Lost a race (only the watcher thread sets it): this value stays leaked.
            .ok()
            .map(|_| leaked)
    }

    /// Forgets the value (it stays allocated). Does not allocate: safe in a
    /// `pthread_atfork` child handler.
    pub(crate) fn forget(&self) {
        self.ptr
            .store(std::ptr::null_mut(), std::sync::atomic::Ordering::Release);
    }
}
