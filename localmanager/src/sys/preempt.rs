//! Time-slice preemption: the signal side (handler, text range, ticker's `pthread_kill`).
//!
//! # Mechanism
//! - A ticker thread per runtime wakes every `quantum / 2`. For each worker it compares the
//!   worker's switch counter with the one it saw last time; if the worker is running a
//!   uThread and has not switched for at least a quantum, it sends `SIGURG` to that worker
//!   thread (`pthread_kill`).
//! - The handler (installed once, `SA_SIGINFO | SA_NODEFER | SA_RESTART`, no alternate
//!   stack, so it runs on whatever stack was interrupted) switches the uThread out with
//!   `Suspend::Preempted` **only at a safe point**:
//!   1. the interrupted code is fiber code on the fiber's stack (`usm_fibers::on_fiber_stack`)
//!      and the worker has a current uThread;
//!   2. that uThread is inside [`crate::preemptible`] (its `preemptible` depth > 0) and not
//!      inside a runtime call (`no_preempt` == 0) nor parked in a fault handler;
//!   3. the interrupted instruction lies in the main executable's text (so not in libc — not
//!      inside `malloc` or stdio holding their locks — not in the vDSO, not in another
//!      shared library).
//!
//!   Otherwise it only sets the worker's `preempt_pending`; the uThread then yields at its
//!   next runtime call (every primitive of this crate starts with that check).
//! - A preempted uThread is suspended inside a signal handler: like a faulted one it is
//!   flagged `in_handler`, never stolen, and resumed on the same worker, where the handler
//!   returns and the kernel restores the interrupted registers.
//!
//! # What it cannot know
//! Code of the main executable includes the statically linked Rust standard library. A
//! section marked preemptible must therefore not take OS-level locks (`std::sync::Mutex`,
//! `println!`): a uThread preempted while holding one would block the next uThread of the
//! same worker that takes it. Use this crate's primitives (they are non-preemptible inside).
//!
//! State touched by the handler: the thread's worker and fiber pointers (const
//! thread-locals), the current task's `preemptible`, `no_preempt`, `in_handler` atomics, the
//! worker's `preempt_pending` and counters — no allocation, no lock.

use std::sync::Once;

use usm_fibers::Suspend;
use usm_sync::atomic::{AtomicUsize, Ordering};

use crate::sys::current::with_current_task;

/// The preemption signal.
pub(crate) const PREEMPT_SIGNAL: libc::c_int = libc::SIGURG;

static TEXT_START: AtomicUsize = AtomicUsize::new(0);
static TEXT_END: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Finds the executable segments of the main program (the first object `dl_iterate_phdr`
/// reports) and installs the handler. Idempotent.
pub(crate) fn install() -> Result<(), std::io::Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        record_main_text();
        // SAFETY: a zeroed sigaction is valid; we set the handler, flags and an empty mask
        // before passing it to sigaction, which only reads it.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_preempt_signal as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(PREEMPT_SIGNAL, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

fn record_main_text() {
    unsafe extern "C" fn first_object(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        _data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of the callback, whose
        // `dlpi_phdr` points at `dlpi_phnum` program headers.
        let (base, headers) = unsafe {
            let info = &*info;
            (
                info.dlpi_addr as usize,
                std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize),
            )
        };
        let mut start = usize::MAX;
        let mut end = 0;
        for header in headers {
            if header.p_type == libc::PT_LOAD && header.p_flags & libc::PF_X != 0 {
                start = start.min(base + header.p_vaddr as usize);
                end = end.max(base + header.p_vaddr as usize + header.p_memsz as usize);
            }
        }
        if start < end {
            TEXT_START.store(start, Ordering::Relaxed);
            TEXT_END.store(end, Ordering::Relaxed);
        }
        1 // stop after the main program
    }
    // SAFETY: the callback only reads the headers it is given.
    unsafe {
        libc::dl_iterate_phdr(Some(first_object), std::ptr::null_mut());
    }
}

fn in_main_text(pc: usize) -> bool {
    (TEXT_START.load(Ordering::Relaxed)..TEXT_END.load(Ordering::Relaxed)).contains(&pc)
}

fn interrupted_pc(context: *mut libc::c_void) -> usize {
    let context = context as *const libc::ucontext_t;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted ucontext.
    let pc = unsafe { (*context).uc_mcontext.gregs[libc::REG_RIP as usize] as usize };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above.
    let pc = unsafe { (*context).uc_mcontext.pc as usize };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let pc = {
        let _ = context;
        0
    };
    pc
}

extern "C" fn on_preempt_signal(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    if !usm_fibers::on_fiber_stack() {
        return; // the worker itself, or a switch in progress: next round
    }
    let pc = interrupted_pc(context);
    with_current_task(|local, task, _slot| {
        let manager = local.manager();
        let safe = task.preemptible.load(Ordering::Relaxed) > 0
            && task.no_preempt.load(Ordering::Relaxed) == 0
            && !task.in_handler.load(Ordering::Relaxed)
            && in_main_text(pc);
        if !safe {
            local.preempt_pending.store(true, Ordering::Relaxed);
            return;
        }
        task.in_handler.store(true, Ordering::Release);
        manager.counters.preemptions.fetch_add(1, Ordering::Relaxed);
        usm_fibers::suspend_current(Suspend::Preempted);
        task.in_handler.store(false, Ordering::Release);
    });
}

/// Sends the preemption signal to a worker thread.
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live worker thread of this runtime: the ticker stops before the
    // workers are joined.
    unsafe {
        libc::pthread_kill(thread, PREEMPT_SIGNAL);
    }
}

/// The calling thread's pthread id.
pub(crate) fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}
