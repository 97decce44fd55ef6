//! The userfaultfd fd types and their ioctls (see [`crate::uffd`] for the protocol).

use super::ioctl_ptr;
use super::uapi::{self, UffdMsg};
use crate::error::{Error, Result};
use crate::uffd::{
    ContinueMode, CopyMode, Features, Ioctls, MoveMode, OpenFlags, OpenPath, PoisonMode,
    RegisterMode, Resolved, UffdEvent, WriteProtect, ZeropageMode,
};
use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// How many messages one [`Userfaultfd::read_events`] call reads at most.
pub const READ_BATCH: usize = 64;

/// An opened userfaultfd on which `UFFDIO_API` has not run yet.
///
/// It can be negotiated here ([`RawUserfaultfd::negotiate`]) or passed to another process
/// (`SCM_RIGHTS`) which adopts it with [`RawUserfaultfd::from_fd`] and negotiates there.
#[derive(Debug)]
pub struct RawUserfaultfd {
    fd: OwnedFd,
    path: OpenPath,
}

impl RawUserfaultfd {
    /// Opens a userfaultfd: `/dev/userfaultfd` first, the syscall if that fails.
    pub fn open(flags: OpenFlags) -> Result<RawUserfaultfd> {
        match Self::open_via(OpenPath::DevUserfaultfd, flags) {
            Ok(raw) => Ok(raw),
            Err(dev_err) => {
                Self::open_via(OpenPath::Syscall, flags).map_err(|sys_err| Error::OpenFailed {
                    dev: dev_err.errno().unwrap_or(Errno::UnknownErrno),
                    syscall: sys_err.errno().unwrap_or(Errno::UnknownErrno),
                })
            }
        }
    }

    /// Opens a userfaultfd one given way ([`OpenPath::Adopted`] is `EINVAL`).
    pub fn open_via(path: OpenPath, flags: OpenFlags) -> Result<RawUserfaultfd> {
        let mut bits = 0;
        if flags.nonblock {
            bits |= libc::O_NONBLOCK;
        }
        if flags.cloexec {
            bits |= libc::O_CLOEXEC;
        }
        if flags.user_mode_only {
            bits |= uapi::UFFD_USER_MODE_ONLY;
        }
        let fd = match path {
            OpenPath::DevUserfaultfd => open_dev(bits),
            OpenPath::Syscall => {
                // SAFETY: userfaultfd(2) takes an int of flags and returns a new fd or -1.
                let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, bits) };
                Errno::result(ret).map(|fd| {
                    // SAFETY: the syscall returned a new fd that nothing else owns.
                    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
                })
            }
            OpenPath::Adopted => Err(Errno::EINVAL),
        }
        .map_err(|source| Error::Open { path, source })?;
        Ok(RawUserfaultfd { fd, path })
    }

    /// Adopts an fd received from elsewhere (the tagger's fd over `SCM_RIGHTS`), checking
    /// through `/proc/self/fd` that it is a userfaultfd. Whether it was negotiated already
    /// shows at [`RawUserfaultfd::negotiate`] (`EINVAL`).
    pub fn from_fd(fd: OwnedFd) -> Result<RawUserfaultfd> {
        check_is_userfaultfd(fd.as_raw_fd())?;
        Ok(RawUserfaultfd {
            fd,
            path: OpenPath::Adopted,
        })
    }

    /// How the fd was obtained.
    pub fn path(&self) -> OpenPath {
        self.path
    }

    /// Gives the fd up (to send it to the daemon).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Runs `UFFDIO_API`, enabling `required` and whichever of `requested` this kernel
    /// has (and this process may use).
    ///
    /// The kernel's feature list is learned first on a throw-away fd (a failed or
    /// zero-feature `UFFDIO_API` would consume this one), so a required feature that is
    /// absent is [`Error::MissingFeature`] and one that is refused (`EVENT_FORK` without
    /// `CAP_SYS_PTRACE`) is [`Error::FeatureNotPermitted`], and the fd is left untouched.
    pub fn negotiate(self, requested: Features, required: Features) -> Result<Userfaultfd> {
        let offered = available_features()?;
        let missing = required.difference(offered);
        if let Some(feature) = missing.bits_iter().next() {
            return Err(Error::MissingFeature {
                feature,
                name: feature.describe_bit(),
                since: feature.since(),
                offered,
            });
        }
        let mut want = required.union(requested.intersection(offered));
        if want.contains(Features::EVENT_FORK) && !event_fork_permitted()? {
            if required.contains(Features::EVENT_FORK) {
                return Err(Error::FeatureNotPermitted {
                    name: "EVENT_FORK".into(),
                    source: Errno::EPERM,
                });
            }
            want = want.difference(Features::EVENT_FORK);
        }
        let mut api = uapi::UffdioApi {
            api: uapi::UFFD_API,
            features: want.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `uffdio_api`; it touches no other memory.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_API, &mut api) }.map_err(
            |source| Error::Api {
                requested: want,
                source,
            },
        )?;
        // WP_ASYNC implies WP_UNPOPULATED (the kernel turns it on silently).
        let mut enabled = want;
        if enabled.contains(Features::WP_ASYNC) {
            enabled |= Features::WP_UNPOPULATED;
        }
        let nonblock = fd_is_nonblocking(self.fd.as_raw_fd())?;
        Ok(Userfaultfd {
            fd: self.fd,
            enabled,
            offered: Features::from_bits_retain(api.features),
            api_ioctls: Ioctls::from_bits_retain(api.ioctls),
            nonblock,
        })
    }
}

impl AsFd for RawUserfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn open_dev(flags: i32) -> core::result::Result<OwnedFd, Errno> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
    let ret = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            uapi::USERFAULTFD_IOC_NEW as libc::c_ulong,
            flags,
        )
    };
    let fd = Errno::result(ret)?;
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check_is_userfaultfd(fd: RawFd) -> Result<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| Error::Sys {
        what: "readlink /proc/self/fd",
        source: io_errno(&e),
    })?;
    let what = link.to_string_lossy().into_owned();
    if what == "anon_inode:[userfaultfd]" {
        Ok(())
    } else {
        Err(Error::NotUserfaultfd { fd, what })
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn fd_is_nonblocking(fd: RawFd) -> Result<bool> {
    // SAFETY: F_GETFL on a valid fd reads its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = Errno::result(flags).map_err(|source| Error::Sys {
        what: "fcntl(F_GETFL)",
        source,
    })?;
    Ok(flags & libc::O_NONBLOCK != 0)
}

fn probe_fd() -> Result<RawUserfaultfd> {
    // User-mode-only needs no privilege on the syscall path and does not change the
    // feature list.
    RawUserfaultfd::open(OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: true,
    })
}

/// Every feature this kernel offers (`UFFDIO_API` with no feature on a throw-away fd).
pub fn available_features() -> Result<Features> {
    let probe = probe_fd()?;
    let mut api = uapi::UffdioApi {
        api: uapi::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `uffdio_api` only.
    unsafe { ioctl_ptr(probe.fd.as_raw_fd(), uapi::UFFDIO_API, &mut api) }.map_err(|source| {
        Error::Api {
            requested: Features::empty(),
            source,
        }
    })?;
    Ok(Features::from_bits_retain(api.features))
}

/// Whether this process may enable `EVENT_FORK` (it needs `CAP_SYS_PTRACE`), tried on a
/// throw-away fd.
pub fn event_fork_permitted() -> Result<bool> {
    let probe = probe_fd()?;
    let mut api = uapi::UffdioApi {
        api: uapi::UFFD_API,
        features: uapi::UFFD_FEATURE_EVENT_FORK,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `uffdio_api` only.
    match unsafe { ioctl_ptr(probe.fd.as_raw_fd(), uapi::UFFDIO_API, &mut api) } {
        Ok(_) => Ok(true),
        Err(Errno::EPERM) => Ok(false),
        Err(source) => Err(Error::Api {
            requested: Features::EVENT_FORK,
            source,
        }),
    }
}

/// A negotiated userfaultfd: register ranges, resolve faults, read events.
///
/// `Userfaultfd` is `Send + Sync`: the kernel serialises the ioctls it needs to, and
/// several threads may resolve faults on one fd. Reading events from several threads at
/// once is allowed by the kernel but splits batches; USM has one reader per fd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    enabled: Features,
    offered: Features,
    api_ioctls: Ioctls,
    nonblock: bool,
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Userfaultfd {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

fn range_ok(start: u64, len: u64) -> Result<()> {
    let page = crate::frame::PAGE_SIZE as u64;
    if len == 0 || start % page != 0 || len % page != 0 {
        return Err(Error::InvalidArgument(
            "range must be non-empty and page aligned",
        ));
    }
    Ok(())
}

/// Turns the ioctl return and the kernel's progress field into a [`Resolved`] state.
///
/// The kernel writes the progress field only once it started working: bytes done, or
/// `-errno`. Before that (the `mmap_changing` check at entry) it returns `-EAGAIN` and
/// leaves the field as we set it (0). `EAGAIN` is returned both for "stopped after
/// `progress` bytes" and for "address space changing": progress > 0 tells them apart.
fn classify(
    op: &'static str,
    start: u64,
    len: u64,
    ret: core::result::Result<i32, Errno>,
    progress: i64,
    ebusy_is_use_copy: bool,
) -> Result<Resolved> {
    match ret {
        Ok(_) => Ok(Resolved::Done(if progress > 0 {
            progress as u64
        } else {
            len
        })),
        Err(Errno::EAGAIN) if progress > 0 => Ok(Resolved::Partial(progress as u64)),
        Err(Errno::EAGAIN) => Ok(Resolved::MmapChanging),
        Err(Errno::EEXIST) => Ok(Resolved::AlreadyMapped),
        Err(Errno::EBUSY) if ebusy_is_use_copy => Ok(Resolved::UseCopy),
        Err(source) => Err(Error::Ioctl {
            op,
            start,
            len,
            source,
        }),
    }
}

impl Userfaultfd {
    /// Adopts a child's userfaultfd from a [`UffdEvent::Fork`]: it was negotiated by the
    /// kernel with `parent`'s features.
    pub fn from_fork(child: OwnedFd, parent: &Userfaultfd) -> Result<Userfaultfd> {
        check_is_userfaultfd(child.as_raw_fd())?;
        let nonblock = fd_is_nonblocking(child.as_raw_fd())?;
        Ok(Userfaultfd {
            fd: child,
            enabled: parent.enabled,
            offered: parent.offered,
            api_ioctls: parent.api_ioctls,
            nonblock,
        })
    }

    /// The features enabled on this fd.
    pub fn features(&self) -> Features {
        self.enabled
    }
    /// Every feature the kernel offers.
    pub fn offered_features(&self) -> Features {
        self.offered
    }
    /// The fd-level ioctls `UFFDIO_API` reported.
    pub fn api_ioctls(&self) -> Ioctls {
        self.api_ioctls
    }

    /// Registers `[start, start+len)` (page aligned) in `mode`; returns the ioctls the
    /// kernel grants on the range (MOVE, POISON, … depend on the memory type and mode).
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<Ioctls> {
        range_ok(start, len)?;
        let mut reg = uapi::UffdioRegister {
            range: uapi::UffdioRange { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads/writes a `uffdio_register` and changes how faults
        // on the range are handled, not its content.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_REGISTER, &mut reg) }.map_err(
            |source| Error::Ioctl {
                op: "UFFDIO_REGISTER",
                start,
                len,
                source,
            },
        )?;
        Ok(Ioctls::from_bits_retain(reg.ioctls))
    }

    /// Unregisters `[start, start+len)`; threads waiting on it are woken.
    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        range_ok(start, len)?;
        let mut range = uapi::UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a `uffdio_range` and changes fault handling only.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_UNREGISTER, &mut range) }.map_err(
            |source| Error::Ioctl {
                op: "UFFDIO_UNREGISTER",
                start,
                len,
                source,
            },
        )?;
        Ok(())
    }

    /// Wakes the threads waiting on `[start, start+len)` (after `DONTWAKE` resolves, or an
    /// [`Resolved::AlreadyMapped`]).
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        range_ok(start, len)?;
        let mut range = uapi::UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a `uffdio_range`; waking threads writes no memory.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_WAKE, &mut range) }.map_err(
            |source| Error::Ioctl {
                op: "UFFDIO_WAKE",
                start,
                len,
                source,
            },
        )?;
        Ok(())
    }

    /// `UFFDIO_COPY`: allocates pages at `dst` and copies `len` bytes from `src` into them.
    ///
    /// # Safety
    /// - `[dst, dst+len)` is a registered range whose content the caller decides
    ///   (a missing page of a region it manages): nobody relies on it staying unmapped.
    /// - `[src, src+len)` is readable memory of this process not written concurrently.
    pub unsafe fn copy(&self, dst: u64, src: u64, len: u64, mode: CopyMode) -> Result<Resolved> {
        range_ok(dst, len)?;
        let mut arg = uapi::UffdioCopy {
            dst,
            src,
            len,
            mode: mode.bits(),
            copy: 0,
        };
        // SAFETY: the argument is a `uffdio_copy`; the caller owns the destination pages
        // and the source is readable (contract above).
        let ret = unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_COPY, &mut arg) };
        classify("UFFDIO_COPY", dst, len, ret, arg.copy, false)
    }

    /// `UFFDIO_ZEROPAGE`: maps the shared zero page at `[dst, dst+len)` (a write later
    /// gets a fresh zeroed page without a fault event).
    ///
    /// # Safety
    /// - `[dst, dst+len)` is a registered range whose content the caller decides.
    pub unsafe fn zeropage(&self, dst: u64, len: u64, mode: ZeropageMode) -> Result<Resolved> {
        range_ok(dst, len)?;
        let mut arg = uapi::UffdioZeropage {
            range: uapi::UffdioRange { start: dst, len },
            mode: mode.bits(),
            zeropage: 0,
        };
        // SAFETY: the argument is a `uffdio_zeropage`; the caller owns the destination.
        let ret = unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_ZEROPAGE, &mut arg) };
        classify("UFFDIO_ZEROPAGE", dst, len, ret, arg.zeropage, false)
    }

    /// `UFFDIO_MOVE` (Linux 6.8, [`Features::MOVE`]): moves the pages of
    /// `[src, src+len)` to `[dst, dst+len)` without copying; the source becomes a hole.
    ///
    /// Rules (verified on 6.18): same mm; `dst` registered on *this* fd; source and
    /// destination anonymous, private, with the same protection and the same lock state
    /// (else `EINVAL`); a pinned or fork-shared source page is [`Resolved::UseCopy`]; a
    /// page present at the destination stops the move ([`Resolved::AlreadyMapped`] at the
    /// first page, [`Resolved::Partial`] later).
    ///
    /// # Safety
    /// - `[dst, dst+len)` is a registered range whose content the caller decides.
    /// - `[src, src+len)` is memory of this process whose pages the caller may take away
    ///   (afterwards it reads as a hole: on a registered range, a fault).
    pub unsafe fn move_pages(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        mode: MoveMode,
    ) -> Result<Resolved> {
        range_ok(dst, len)?;
        range_ok(src, len)?;
        let mut arg = uapi::UffdioMove {
            dst,
            src,
            len,
            mode: mode.bits(),
            move_: 0,
        };
        // SAFETY: the argument is a `uffdio_move`; the caller owns both ranges' pages.
        let ret = unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_MOVE, &mut arg) };
        classify("UFFDIO_MOVE", dst, len, ret, arg.move_, true)
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages behind a MINOR-registered shmem or
    /// hugetlbfs range.
    ///
    /// # Safety
    /// - `[start, start+len)` is a MINOR-registered range whose mapping the caller decides.
    pub unsafe fn continue_pages(
        &self,
        start: u64,
        len: u64,
        mode: ContinueMode,
    ) -> Result<Resolved> {
        range_ok(start, len)?;
        let mut arg = uapi::UffdioContinue {
            range: uapi::UffdioRange { start, len },
            mode: mode.bits(),
            mapped: 0,
        };
        // SAFETY: the argument is a `uffdio_continue`; the caller owns the range.
        let ret = unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_CONTINUE, &mut arg) };
        classify("UFFDIO_CONTINUE", start, len, ret, arg.mapped, false)
    }

    /// `UFFDIO_POISON` (Linux 6.6): marks `[start, start+len)` poisoned; an access raises
    /// SIGBUS (used for a swap entry that cannot be read back: never zeros).
    ///
    /// # Safety
    /// - `[start, start+len)` is a registered range whose content the caller decides; any
    ///   code touching it afterwards gets SIGBUS.
    pub unsafe fn poison(&self, start: u64, len: u64, mode: PoisonMode) -> Result<Resolved> {
        range_ok(start, len)?;
        let mut arg = uapi::UffdioPoison {
            range: uapi::UffdioRange { start, len },
            mode: mode.bits(),
            updated: 0,
        };
        // SAFETY: the argument is a `uffdio_poison`; the caller owns the range.
        let ret = unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_POISON, &mut arg) };
        classify("UFFDIO_POISON", start, len, ret, arg.updated, false)
    }

    /// `UFFDIO_WRITEPROTECT`: sets or clears write protection on a WP-registered range.
    /// Returns [`Resolved::Done`] or [`Resolved::MmapChanging`].
    ///
    /// # Safety
    /// - `[start, start+len)` is a WP-registered range the caller manages: setting WP
    ///   blocks (or, with `WP_ASYNC`, tracks) every writer until it is cleared.
    pub unsafe fn writeprotect(
        &self,
        start: u64,
        len: u64,
        what: WriteProtect,
    ) -> Result<Resolved> {
        range_ok(start, len)?;
        let mode = match what {
            WriteProtect::Set => uapi::UFFDIO_WRITEPROTECT_MODE_WP,
            WriteProtect::Clear => 0,
            WriteProtect::ClearDontWake => uapi::UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
        };
        let mut arg = uapi::UffdioWriteprotect {
            range: uapi::UffdioRange { start, len },
            mode,
        };
        // SAFETY: the argument is a `uffdio_writeprotect`; the caller owns the range.
        let ret = unsafe { ioctl_ptr(self.fd.as_raw_fd(), uapi::UFFDIO_WRITEPROTECT, &mut arg) };
        classify("UFFDIO_WRITEPROTECT", start, len, ret, 0, false)
    }

    /// Waits up to `timeout_ms` (-1: forever) for the fd to become readable.
    pub fn wait_readable(&self, timeout_ms: i32) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, count 1.
            let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            match Errno::result(ret) {
                Ok(n) => return Ok(n > 0 && pfd.revents & libc::POLLIN != 0),
                Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(Error::Sys {
                        what: "poll(userfaultfd)",
                        source,
                    });
                }
            }
        }
    }

    /// Reads every message available now (up to [`READ_BATCH`]) and appends them to
    /// `out`; returns how many. Never blocks: with nothing to read it returns 0 (a
    /// blocking fd is polled first).
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> Result<usize> {
        if !self.nonblock && !self.wait_readable(0)? {
            return Ok(0);
        }
        let mut buf = [UffdMsg::ZEROED; READ_BATCH];
        let bytes = loop {
            // SAFETY: `buf` is writable for its whole size; the kernel writes whole messages.
            let ret = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    core::mem::size_of_val(&buf),
                )
            };
            match Errno::result(ret) {
                Ok(n) => break n as usize,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(0),
                Err(source) => {
                    return Err(Error::Sys {
                        what: "read(userfaultfd)",
                        source,
                    });
                }
            }
        };
        let count = bytes / core::mem::size_of::<UffdMsg>();
        for msg in &buf[..count] {
            if let Some(ev) = decode(msg) {
                out.push(ev);
            }
        }
        Ok(count)
    }
}

/// Decodes one message; unknown event codes are dropped.
fn decode(msg: &UffdMsg) -> Option<UffdEvent> {
    let arg = msg.arg;
    // SAFETY (all arms below): each union arm is read only for the event code the kernel
    // documents it for, and every arm is plain integers, valid for any bit pattern.
    match msg.event {
        uapi::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above.
            let pf = unsafe { arg.pagefault };
            let flags = pf.flags;
            // SAFETY: see above.
            let tid = unsafe { pf.feat.ptid };
            Some(UffdEvent::Pagefault {
                addr: pf.address,
                write: flags & uapi::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & uapi::UFFD_PAGEFAULT_FLAG_WP != 0,
                minor: flags & uapi::UFFD_PAGEFAULT_FLAG_MINOR != 0,
                tid,
            })
        }
        uapi::UFFD_EVENT_FORK => {
            // SAFETY: see above.
            let ufd = unsafe { arg.fork.ufd };
            // SAFETY: the kernel installed a new fd for the child's userfaultfd in our
            // table for this message; nobody else owns it.
            let child = unsafe { OwnedFd::from_raw_fd(ufd as RawFd) };
            Some(UffdEvent::Fork { child })
        }
        uapi::UFFD_EVENT_REMAP => {
            // SAFETY: see above.
            let r = unsafe { arg.remap };
            Some(UffdEvent::Remap {
                from: r.from,
                to: r.to,
                len: r.len,
            })
        }
        uapi::UFFD_EVENT_REMOVE => {
            // SAFETY: see above.
            let r = unsafe { arg.remove };
            Some(UffdEvent::Remove {
                start: r.start,
                end: r.end,
            })
        }
        uapi::UFFD_EVENT_UNMAP => {
            // SAFETY: see above.
            let r = unsafe { arg.remove };
            Some(UffdEvent::Unmap {
                start: r.start,
                end: r.end,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::classify;
    use crate::uffd::Resolved;
    use nix::errno::Errno;

    const LEN: u64 = 4 * 4096;

    #[test]
    fn progress_tells_partial_from_mmap_changing() {
        // EAGAIN after 2 pages: the kernel stopped at a page (present dst, src hole, pin).
        let r = classify("UFFDIO_MOVE", 0, LEN, Err(Errno::EAGAIN), 8192, true).unwrap();
        assert_eq!(r, Resolved::Partial(8192));
        // EAGAIN at entry (field untouched) or from mfill's own check (field = -EAGAIN).
        let r = classify("UFFDIO_MOVE", 0, LEN, Err(Errno::EAGAIN), 0, true).unwrap();
        assert_eq!(r, Resolved::MmapChanging);
        let r = classify(
            "UFFDIO_COPY",
            0,
            LEN,
            Err(Errno::EAGAIN),
            -(libc::EAGAIN as i64),
            false,
        )
        .unwrap();
        assert_eq!(r, Resolved::MmapChanging);
    }

    #[test]
    fn states_and_errors() {
        assert_eq!(
            classify("X", 0, LEN, Ok(0), LEN as i64, false).unwrap(),
            Resolved::Done(LEN)
        );
        assert_eq!(
            classify("X", 0, LEN, Ok(0), 0, false).unwrap(),
            Resolved::Done(LEN)
        );
        assert_eq!(
            classify("X", 0, LEN, Err(Errno::EEXIST), -17, false).unwrap(),
            Resolved::AlreadyMapped
        );
        assert_eq!(
            classify("UFFDIO_MOVE", 0, LEN, Err(Errno::EBUSY), -16, true).unwrap(),
            Resolved::UseCopy
        );
        // EBUSY from another op is an error, not "use copy".
        let e = classify("UFFDIO_COPY", 0, LEN, Err(Errno::EBUSY), -16, false).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::EBUSY));
        let e = classify("UFFDIO_COPY", 0x1000, LEN, Err(Errno::ESRCH), 0, false).unwrap_err();
        assert!(e.is_mm_gone() && !e.is_retryable());
        assert!(e.to_string().contains("UFFDIO_COPY on [0x1000"), "{e}");
        let e = classify("UFFDIO_MOVE", 0, LEN, Err(Errno::ENOENT), -2, true).unwrap_err();
        assert!(e.is_not_found());
        let e = classify("UFFDIO_MOVE", 0, LEN, Err(Errno::EINVAL), -22, true).unwrap_err();
        assert!(e.is_invalid());
    }
}
