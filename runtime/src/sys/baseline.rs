//! The system calls of [`crate::baseline`]: the termination-signal handler, `swapon` /
//! `swapoff`, and the `pre_exec` hook that puts a child in its cgroup before it execs.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use usm_sync::Arc;
use usm_sync::atomic::{AtomicI32, Ordering};

use crate::baseline::{Error, Result};

/// Write end of the self-pipe the termination handler writes the signal number to
/// (-1 before installation).
static TERMINATION_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_termination_signal(signo: libc::c_int) {
    let fd = TERMINATION_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signo as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives on this stack frame for the
        // call; the fd stays open for the life of the process (leaked on purpose).
        let _ = unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Installs a handler for `signals` that only writes the signal number (one byte) to
/// `pipe_write`, which is leaked and stays open until exit. The reader runs the cleanups in
/// normal context.
pub(crate) fn install_termination_pipe(pipe_write: OwnedFd, signals: &[libc::c_int]) -> Result<()> {
    TERMINATION_PIPE.store(
        std::os::fd::IntoRawFd::into_raw_fd(pipe_write),
        Ordering::SeqCst,
    );
    for &signo in signals {
        // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_termination_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: the handler only calls write(2) on an fd that is never closed; `action`
        // is fully initialised; a null old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(signo, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::sys("sigaction", nix::Error::last()));
        }
    }
    Ok(())
}

/// Restores the default action of `signo`, unblocks it and raises it in the calling
/// process, so the process ends the way the signal asked (exit status "killed by
/// SIGINT/SIGTERM").
pub(crate) fn reraise_default(signo: libc::c_int) {
    // SAFETY: SIG_DFL is always a valid disposition; raise(3) is safe to call from any
    // thread; the sigset is a local, fully initialised by sigemptyset before use.
    unsafe {
        libc::signal(signo, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signo);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signo);
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path with NUL: {}", path.display())))
}

/// `swapon(2)` with an explicit priority (`SWAP_FLAG_PREFER`).
pub(crate) fn swapon(path: &Path, priority: i16) -> Result<()> {
    let c = c_path(path)?;
    // <linux/swap.h>: SWAP_FLAG_PREFER 0x8000, SWAP_FLAG_PRIO_MASK 0x7fff, shift 0.
    const SWAP_FLAG_PREFER: libc::c_int = 0x8000;
    const SWAP_FLAG_PRIO_MASK: libc::c_int = 0x7fff;
    let prio = (priority.max(0) as libc::c_int) & SWAP_FLAG_PRIO_MASK;
    let flags = SWAP_FLAG_PREFER | prio;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::swapon(c.as_ptr(), flags) };
    if rc != 0 {
        return Err(Error::io("swapon", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `swapoff(2)`.
pub(crate) fn swapoff(path: &Path) -> Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::swapoff(c.as_ptr()) };
    if rc != 0 {
        return Err(Error::io("swapoff", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the child of `cmd` join a cgroup before it execs: between fork and exec it writes
/// `"0"` ("the writing process") to the already-open `cgroup.procs` of the target group.
/// So every byte the program allocates, from the dynamic loader on, is charged there.
pub(crate) fn join_cgroup_before_exec(cmd: &mut Command, procs: Arc<OwnedFd>) {
    let hook = move || -> std::io::Result<()> {
        let fd = procs.as_raw_fd();
        // SAFETY: write(2) is async-signal-safe and allocates nothing; the buffer is a
        // static byte string; `procs` keeps the fd open while the hook can run.
        let rc = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if rc == 1 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the hook only performs write(2) on an inherited fd — async-signal-safe and
    // without allocation or locks, as required between fork and exec.
    unsafe {
        cmd.pre_exec(hook);
    }
}
