//! The `unsafe` helpers of the kmod tests: raw memory access at arbitrary addresses,
//! mmap / mremap / munmap / madvise on raw ranges, fork, and the SIGBUS handler.

use std::sync::OnceLock;
use usm_kmod::{CopyMode, MoveMode, Resolved, Userfaultfd, ZeropageMode};
use usm_sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Maps `len` bytes of private anonymous RW memory (not populated); returns the address.
pub fn mmap_anon(len: usize) -> u64 {
    // SAFETY: a new anonymous mapping at a kernel-chosen address overlaps nothing.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as u64
}

/// `munmap`; returns the errno on failure.
pub fn munmap(addr: u64, len: usize) -> i32 {
    // SAFETY: the tests unmap only ranges they mapped and no longer reference.
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// `madvise`; returns 0 or the errno.
pub fn madvise(addr: u64, len: usize, advice: i32) -> i32 {
    // SAFETY: advice on ranges the tests own; no Rust reference points into them.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// `mlock2(MLOCK_ONFAULT)`; returns 0 or the errno.
pub fn mlock_onfault(addr: u64, len: usize) -> i32 {
    // SAFETY: locking pages of our own mapping.
    let r = unsafe { libc::mlock2(addr as *const libc::c_void, len, libc::MLOCK_ONFAULT) };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// `mremap(old, len, len, MAYMOVE | FIXED, new)`; returns the new address or panics.
pub fn mremap_fixed(old: u64, len: usize, new: u64) -> u64 {
    // SAFETY: both ranges belong to the test; `new` is a reservation it made to be replaced.
    let p = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            new as *mut libc::c_void,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    p as u64
}

/// Atomic load of the `u64` at `addr` (faults like any access).
pub fn load(addr: u64) -> u64 {
    // SAFETY: tests pass addresses inside live mappings they own, 8-byte aligned; all test
    // accesses to those words are atomic.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }.load(Ordering::SeqCst)
}

/// Atomic store of `v` at `addr`.
pub fn store(addr: u64, v: u64) {
    // SAFETY: as in `load`.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }.store(v, Ordering::SeqCst)
}

/// Fills the page at `addr` with `v` repeated.
pub fn fill_page(addr: u64, v: u64) {
    for i in 0..512 {
        store(addr + i * 8, v);
    }
}

/// Whether the page at `addr` holds `v` in every word.
pub fn page_is(addr: u64, v: u64) -> bool {
    (0..512).all(|i| load(addr + i * 8) == v)
}

/// The calling thread's id.
pub fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// Forks; the child runs `child` and `_exit`s with its return value. Returns the pid.
/// The child must only do async-signal-safe things (plain memory accesses, read, write).
pub fn fork_with(child: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child only runs `child`, which per this function's contract uses no
    // lock or allocator another thread of the parent could have held, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: leaving the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for `pid`: `Ok(exit code)` or `Err(signal number)`.
pub fn wait_child(pid: libc::pid_t) -> Result<i32, i32> {
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

/// A raw `read(fd, addr, len)`; returns bytes or `-errno` (kernel-mode write into `addr`).
pub fn read_into(fd: i32, addr: u64, len: usize) -> isize {
    // SAFETY: `addr..addr+len` is a mapping the test owns and accesses only through
    // atomics elsewhere; the kernel writes it.
    let r = unsafe { libc::read(fd, addr as *mut libc::c_void, len) };
    if r < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as isize)
    } else {
        r
    }
}

// ---------------------------------------------------------------------------------
// SIGBUS mode: the faulting thread resolves its own fault in its handler.

/// What the SIGBUS handler resolves with, per page of the region.
pub struct SigbusSetup {
    /// The userfaultfd (negotiated with SIGBUS).
    pub uffd: Userfaultfd,
    /// The registered region.
    pub region: u64,
    /// Its length.
    pub len: u64,
    /// Source page for COPY (page 0 of the region).
    pub copy_src: u64,
    /// Source pages for MOVE (page 2 + i of the region takes page i of this).
    pub move_src: u64,
}

static SETUP: OnceLock<SigbusSetup> = OnceLock::new();
/// Resolutions done by the handler, by kind: [copy, zeropage, move].
pub static RESOLVED: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];
/// Signals that arrived for addresses outside the region (would be chained in the runtime).
pub static FOREIGN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as u64 & !4095;
    let Some(s) = SETUP.get() else { return };
    if addr < s.region || addr >= s.region + s.len {
        FOREIGN.fetch_add(1, Ordering::SeqCst);
        // Restore the default action so the retried access kills the process loudly.
        // SAFETY: resetting a signal disposition is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    let page = (addr - s.region) / 4096;
    // Nothing here allocates or locks: the resolve calls build a struct and issue one ioctl.
    let r = match page {
        // SAFETY: the page is a missing page of the test's registered region; the source
        // page is the test's, never written after setup.
        0 => unsafe { s.uffd.copy(addr, s.copy_src, 4096, CopyMode::empty()) },
        // SAFETY: as above.
        1 => unsafe { s.uffd.zeropage(addr, 4096, ZeropageMode::empty()) },
        // SAFETY: as above; the move source pages belong to the test and are given up.
        _ => unsafe {
            s.uffd.move_pages(
                addr,
                s.move_src + (page - 2) * 4096,
                4096,
                MoveMode::empty(),
            )
        },
    };
    if let Ok(Resolved::Done(_)) = r {
        RESOLVED[page.min(2) as usize].fetch_add(1, Ordering::SeqCst);
    }
}

/// Installs the SIGBUS handler (SA_SIGINFO | SA_NODEFER, no alt stack) for `setup`.
pub fn install_sigbus(setup: SigbusSetup) {
    assert!(SETUP.set(setup).is_ok(), "SIGBUS setup installed twice");
    // SAFETY: a zeroed sigaction is a valid starting value; the handler only does
    // async-signal-safe work (atomics, one ioctl).
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGBUS, &sa, core::ptr::null_mut()), 0);
    }
}

/// The installed SIGBUS setup.
pub fn setup() -> &'static SigbusSetup {
    SETUP.get().expect("install_sigbus ran")
}

// ---------------------------------------------------------------------------------
// The resolve operations, for the tests. Each test passes ranges it mapped and owns:
// destinations are missing pages of its own registered regions, sources its own buffers.

use usm_kmod::pool::{FrameOwner, FramePool};
use usm_kmod::{FrameNo, PoisonMode, WriteProtect};

/// `Userfaultfd::copy` on test-owned ranges.
pub fn copy(
    u: &Userfaultfd,
    dst: u64,
    src: u64,
    len: u64,
    mode: CopyMode,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: test-owned destination (missing pages of its region) and source.
    unsafe { u.copy(dst, src, len, mode) }
}

/// `Userfaultfd::zeropage` on a test-owned range.
pub fn zeropage(
    u: &Userfaultfd,
    dst: u64,
    len: u64,
    mode: ZeropageMode,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: test-owned destination.
    unsafe { u.zeropage(dst, len, mode) }
}

/// `Userfaultfd::move_pages` on test-owned ranges.
pub fn move_pages(
    u: &Userfaultfd,
    dst: u64,
    src: u64,
    len: u64,
    mode: MoveMode,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: test-owned destination and source; the source pages are given up.
    unsafe { u.move_pages(dst, src, len, mode) }
}

/// `Userfaultfd::poison` on a test-owned range.
pub fn poison(u: &Userfaultfd, dst: u64, len: u64, mode: PoisonMode) -> usm_kmod::Result<Resolved> {
    // SAFETY: test-owned range; only a forked child touches it afterwards.
    unsafe { u.poison(dst, len, mode) }
}

/// `Userfaultfd::writeprotect` on a test-owned range.
pub fn writeprotect(
    u: &Userfaultfd,
    start: u64,
    len: u64,
    what: WriteProtect,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: test-owned WP-registered range.
    unsafe { u.writeprotect(start, len, what) }
}

/// `FramePool::install` into a test-owned region page.
pub fn install(
    p: &FramePool,
    f: FrameNo,
    dst: u64,
    owner: FrameOwner,
    mode: MoveMode,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: `dst` is a missing page of the test's region, registered on the pool's uffd;
    // the test took `f`.
    unsafe { p.install(f, dst, owner, mode) }
}

/// `FramePool::stage` of a frame mapped in a test-owned region.
pub fn stage(p: &FramePool, f: FrameNo, mode: MoveMode) -> usm_kmod::Result<Resolved> {
    // SAFETY: the region page is the test's.
    unsafe { p.stage(f, mode) }
}

/// `FramePool::unstage` back into a test-owned region page.
pub fn unstage(p: &FramePool, f: FrameNo, mode: MoveMode) -> usm_kmod::Result<Resolved> {
    // SAFETY: the region page is the test's and a hole again.
    unsafe { p.unstage(f, mode) }
}

/// `FramePool::reclaim` of a frame mapped in a test-owned region.
pub fn reclaim(p: &FramePool, f: FrameNo) -> usm_kmod::Result<Resolved> {
    // SAFETY: the region page is the test's.
    unsafe { p.reclaim(f) }
}

/// Reads one byte from `fd` (async-signal-safe; for forked children). True if one came.
pub fn read_one(fd: i32) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reading at most one byte into a live stack buffer.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) == 1 }
}

/// Takes ownership of an fd that SCM_RIGHTS just installed in our table.
pub fn own_fd(fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the fd was just installed for this process by recvmsg; nothing else owns it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Like [`mmap_anon`], `MADV_DONTFORK`: for MOVE sources, whose pages would turn
/// fork-shared (MOVE: EBUSY) if another test of the same binary forks meanwhile.
pub fn mmap_anon_dontfork(len: usize) -> u64 {
    let a = mmap_anon(len);
    assert_eq!(madvise(a, len, libc::MADV_DONTFORK), 0);
    a
}

/// A shmem file (memfd) of `len` bytes mapped shared twice: returns (fd, first, second).
/// Writing through the second populates the page cache the first maps on a minor fault.
pub fn memfd_mapped_twice(len: usize) -> (std::os::fd::OwnedFd, u64, u64) {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a NUL-terminated name; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"usm-minor".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the fd was just created and is owned here only.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: resizing our own memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0);
    let map = || {
        // SAFETY: a new shared mapping of our memfd at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    };
    let (a, b) = (map(), map());
    (fd, a, b)
}

/// `Userfaultfd::continue_pages` on a test-owned MINOR-registered range.
pub fn continue_pages(
    u: &Userfaultfd,
    start: u64,
    len: u64,
    mode: usm_kmod::ContinueMode,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: test-owned MINOR-registered shmem range.
    unsafe { u.continue_pages(start, len, mode) }
}

/// In a forked child that drops to uid/gid 65534 (nobody), tries the userfaultfd syscall
/// without and with `UFFD_USER_MODE_ONLY`. Returns (handler mode ok, user-mode-only ok).
pub fn unprivileged_userfaultfd_attempts() -> (bool, bool) {
    let pid = fork_with(|| {
        // SAFETY: setgid/setuid/syscall/close are async-signal-safe; nothing allocates.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return 100;
            }
            let try_open = |flags: i32| {
                let fd = libc::syscall(libc::SYS_userfaultfd, flags | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::close(fd as i32);
                }
                fd >= 0
            };
            let handler = try_open(0);
            let umo = try_open(usm_kmod::sys::uapi::UFFD_USER_MODE_ONLY);
            i32::from(handler) | (i32::from(umo) << 1)
        }
    });
    let code = wait_child(pid).expect("the child exits");
    assert_ne!(code, 100, "the child could not drop privileges");
    (code & 1 != 0, code & 2 != 0)
}

/// `FramePool::install_many` into test-owned region pages.
pub fn install_many(
    p: &FramePool,
    frames: &[FrameNo],
    dst: u64,
    owner: FrameOwner,
    mode: MoveMode,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: the destination pages are missing pages of the test's region, registered on
    // the pool's uffd; the test took the frames.
    unsafe { p.install_many(frames, dst, owner, mode) }
}

/// `FramePool::install_many_copy` into test-owned region pages.
pub fn install_many_copy(
    p: &FramePool,
    frames: &[FrameNo],
    dst: u64,
    owner: FrameOwner,
    from: usm_kmod::pool::CopyFrom,
) -> usm_kmod::Result<Resolved> {
    // SAFETY: the destination pages are missing pages of the test's region, registered on
    // the pool's uffd; the test took the frames.
    unsafe { p.install_many_copy(frames, dst, owner, from, usm_kmod::CopyMode::empty()) }
}

/// `FramePool::unstage_copy` back into a test-owned region page.
pub fn unstage_copy(p: &FramePool, f: FrameNo) -> usm_kmod::Result<Resolved> {
    // SAFETY: the region page is the test's and a hole again.
    unsafe { p.unstage_copy(f, usm_kmod::CopyMode::empty()) }
}

/// Which of the `pages` pages from `addr` are resident (`mincore`).
pub fn resident(addr: u64, pages: usize) -> Vec<bool> {
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore only reads the page tables of `[addr, addr + pages * 4096)` (a
    // mapping of ours) and writes `pages` bytes into a live buffer of that size.
    let ret = unsafe { libc::mincore(addr as *mut libc::c_void, pages * 4096, vec.as_mut_ptr()) };
    assert_eq!(ret, 0, "mincore");
    vec.iter().map(|&b| b & 1 != 0).collect()
}
