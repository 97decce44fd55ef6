//! Every `unsafe` line of `usm-kmod` lives under this module.
//!
//! - [`uapi`]: the userfaultfd uapi structs and constants (no code).
//! - `uffd`: [`Userfaultfd`](crate::Userfaultfd) and
//!   [`RawUserfaultfd`](crate::RawUserfaultfd): open, `UFFDIO_API`, register, the resolve
//!   ioctls, reading `uffd_msg`.
//! - [`mem`]: [`Mapping`](mem::Mapping), an owned anonymous mapping (mmap / madvise /
//!   mlock2 / munmap) whose bytes are only reached through raw pointers or atomics.
//! - `pool`: the half of [`FramePool`](crate::pool::FramePool) that touches frame memory
//!   (moving pages in and out of slots, refilling and zeroing slots).
//!
//! Each `unsafe` block carries a `// SAFETY:` comment naming the invariant and who keeps it.

pub mod mem;
pub(crate) mod pool;
pub mod uapi;
pub(crate) mod uffd;

use nix::errno::Errno;

/// Issues `ioctl(fd, request, arg)` with a pointer argument.
///
/// # Safety
/// - `request` must be an ioctl whose argument is a `T` (read and/or written by the kernel).
/// - Whatever memory the ioctl itself writes (another mapping, for the resolve ioctls)
///   must be the caller's to write.
pub(crate) unsafe fn ioctl_ptr<T>(fd: i32, request: u32, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: `arg` is a live, exclusive `T` for the duration of the call and the caller
    // guarantees `request` expects a `T`; the remaining obligations are the caller's.
    let ret = unsafe { libc::ioctl(fd, request as libc::c_ulong, arg as *mut T) };
    Errno::result(ret)
}

/// `madvise(MADV_POPULATE_WRITE)` (Linux 5.14); not in every `libc` release.
pub const MADV_POPULATE_WRITE: i32 = 23;
/// `madvise(MADV_POPULATE_READ)` (Linux 5.14).
pub const MADV_POPULATE_READ: i32 = 22;
