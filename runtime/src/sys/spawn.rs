//! Starting a program with a clean signal mask.
//!
//! `usm exec` and `usm run` block SIGINT/SIGTERM in every thread and read them from a
//! signalfd. A child inherits the blocked mask across `execve`, so without this a program
//! started by `usm exec` would never see Ctrl-C or the SIGTERM usm forwards to it.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Makes `cmd` unblock SIGINT and SIGTERM in the child, between `fork` and `execve`.
pub fn unblock_termination_signals(cmd: &mut Command) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // SAFETY: the closure runs in the forked child before `execve`, where only
    // async-signal-safe calls are allowed: it calls `sigprocmask` (async-signal-safe) on a
    // `SigSet` built before the fork, allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)
                .map_err(std::io::Error::from)
        });
    }
}
