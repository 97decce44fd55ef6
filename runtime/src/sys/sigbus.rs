//! The SIGBUS fault handler of the embedded runtime and the lock-free tables it reads.
//!
//! # What runs in signal context (and nothing else)
//! 1. `si_code == BUS_ADRERR` and the address lies in a registered region ([`REGIONS`]:
//!    fixed array of atomic `[start, end)` + runtime id) — otherwise the signal is
//!    *chained* to the handler installed before ours (`SIG_DFL`: reset the disposition and
//!    return, so the retried access kills the process with SIGBUS, e.g. on a poisoned page,
//!    whose `si_code` is `BUS_MCEERR_AR`).
//! 2. read/write from the fault error code: x86-64 `REG_ERR` bit 1; aarch64 the `ESR`
//!    record's WnR bit (bit 6); unknown architectures report a write.
//! 3. On a uThread: `usm_localmanager::signal::park_current_on_fault(addr | write)`; when
//!    it returns the page is in place and the handler returns (the access is retried).
//! 4. Not on a uThread: claim a slot of [`EXTERNAL`] (CAS), store the fault, mark it
//!    POSTED, `write(2)` the runtime's eventfd, and `futex(WAIT)` until a worker marks it
//!    DONE; free the slot; return.
//!
//! Atomics, `write(2)`, `futex(2)`, `sched_yield(2)` and `sigaction(2)` only: no
//! allocation, no lock, no tracing.

// The tables are read in signal context and by the handler of every thread: std's
// lock-free atomics in statics, never a loom model.
#![allow(clippy::disallowed_types)]

use std::sync::Once;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Regions the handler knows (all runtimes of the process).
pub(crate) const MAX_REGIONS: usize = 4096;
/// Plain-thread faults that can be in flight at once (all runtimes).
pub(crate) const MAX_EXTERNAL: usize = 128;
/// Runtimes alive at once.
pub(crate) const MAX_RUNTIMES: usize = 64;

struct RegionSlot {
    start: AtomicU64,
    end: AtomicU64,
    runtime: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_REGION: RegionSlot = RegionSlot {
    start: AtomicU64::new(0),
    end: AtomicU64::new(0),
    runtime: AtomicU32::new(0),
};

static REGIONS: [RegionSlot; MAX_REGIONS] = [EMPTY_REGION; MAX_REGIONS];
/// One past the highest region slot ever used: the handler scans only below it.
static REGIONS_HIGH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// External fault slot states (the `state` word is also the futex word).
pub(crate) const EXT_FREE: u32 = 0;
const EXT_CLAIMED: u32 = 1;
pub(crate) const EXT_POSTED: u32 = 2;
pub(crate) const EXT_SERVING: u32 = 3;
pub(crate) const EXT_DONE: u32 = 4;

/// A fault posted by a thread that is not a uThread.
pub(crate) struct ExternalSlot {
    pub(crate) state: AtomicU32,
    pub(crate) payload: AtomicU64,
    pub(crate) runtime: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_EXT: ExternalSlot = ExternalSlot {
    state: AtomicU32::new(EXT_FREE),
    payload: AtomicU64::new(0),
    runtime: AtomicU32::new(0),
};

pub(crate) static EXTERNAL: [ExternalSlot; MAX_EXTERNAL] = [EMPTY_EXT; MAX_EXTERNAL];

#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);
/// Per runtime id: the eventfd the handler writes after posting an external fault.
static RUNTIME_FDS: [AtomicI32; MAX_RUNTIMES] = [NO_FD; MAX_RUNTIMES];

/// Pages poisoned with `UFFDIO_POISON` (0: free entry). Without `CONFIG_MEMORY_FAILURE`
/// the kernel reports an access to a poisoned page as `BUS_ADRERR`, like a missing page;
/// the handler looks the address up here and chains instead of parking again.
pub(crate) const MAX_POISONED: usize = 1024;
#[allow(clippy::declare_interior_mutable_const)]
const NO_PAGE: AtomicU64 = AtomicU64::new(0);
static POISONED: [AtomicU64; MAX_POISONED] = [NO_PAGE; MAX_POISONED];
/// One past the highest poisoned slot ever used (0: nothing was ever poisoned).
static POISONED_HIGH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records page `addr` as poisoned (see [`POISONED`]); `false` when the table is full.
pub(crate) fn mark_poisoned(addr: u64) -> bool {
    let page = addr & !0xfff;
    if is_poisoned(page) {
        return true;
    }
    for (i, slot) in POISONED.iter().enumerate() {
        if slot
            .compare_exchange(0, page, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            POISONED_HIGH.fetch_max(i + 1, Ordering::AcqRel);
            return true;
        }
    }
    false
}

/// Forgets poisoned pages in `[start, end)` (their region went away).
pub(crate) fn clear_poisoned(start: u64, end: u64) {
    for slot in POISONED.iter() {
        let p = slot.load(Ordering::Acquire);
        if p != 0 && p >= start && p < end {
            let _ = slot.compare_exchange(p, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

fn is_poisoned(page: u64) -> bool {
    POISONED
        .iter()
        .any(|slot| slot.load(Ordering::Acquire) == page)
}

#[allow(clippy::declare_interior_mutable_const)]
const NOT_PENDING: AtomicU32 = AtomicU32::new(0);
/// Per runtime id: set by the handler when it posts an external fault, taken by the
/// driver that scans the slots (so drivers scan only when something was posted).
static EXTERNAL_PENDING: [AtomicU32; MAX_RUNTIMES] = [NOT_PENDING; MAX_RUNTIMES];

/// Takes runtime `id`'s "external fault posted" flag.
pub(crate) fn take_external_pending(id: u32) -> bool {
    EXTERNAL_PENDING
        .get(id as usize)
        .is_some_and(|f| f.swap(0, Ordering::AcqRel) != 0)
}

/// The write bit of a fault payload (the rest is the page address).
pub(crate) const PAYLOAD_WRITE: u64 = 1;

static INSTALL: Once = Once::new();
static mut PREVIOUS: Option<libc::sigaction> = None;
static INSTALLED: AtomicU32 = AtomicU32::new(0);

/// Installs the handler (once per process). Returns the `sigaction` errno on failure.
pub(crate) fn install() -> Result<(), nix::Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: zeroed `sigaction` is a valid "no flags, empty mask" value; the fields
        // set below make it an SA_SIGINFO handler; `PREVIOUS` is written once, here,
        // before the handler is installed (so before anything can read it).
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = handler as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                result = Err(nix::Error::last());
                return;
            }
            *std::ptr::addr_of_mut!(PREVIOUS) = Some(old);
        }
        INSTALLED.store(1, Ordering::Release);
    });
    result
}

/// Claims a runtime id whose eventfd (`fd`, kept open by the caller until
/// [`release_runtime`]) the handler writes for external faults.
pub(crate) fn claim_runtime(fd: i32) -> Option<u32> {
    for (i, slot) in RUNTIME_FDS.iter().enumerate().skip(1) {
        if slot
            .compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Some(i as u32);
        }
    }
    None
}

/// Releases a runtime id (after all its regions are gone).
pub(crate) fn release_runtime(id: u32) {
    if let Some(slot) = RUNTIME_FDS.get(id as usize) {
        slot.store(-1, Ordering::Release);
    }
}

/// Makes `[start, end)` known to the handler as a region of runtime `runtime`.
pub(crate) fn add_region(start: u64, end: u64, runtime: u32) -> bool {
    for (i, slot) in REGIONS.iter().enumerate() {
        if slot
            .start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            slot.runtime.store(runtime, Ordering::Relaxed);
            REGIONS_HIGH.fetch_max(i + 1, Ordering::AcqRel);
            slot.end.store(end, Ordering::Release);
            return true;
        }
    }
    false
}

/// Forgets the region starting at `start`.
pub(crate) fn remove_region(start: u64) {
    for slot in REGIONS.iter() {
        if slot.start.load(Ordering::Acquire) == start && slot.end.load(Ordering::Acquire) != 0 {
            slot.end.store(0, Ordering::Release);
            slot.start.store(0, Ordering::Release);
            return;
        }
    }
}

/// The runtime id of the region holding `addr`, if any (lock-free scan).
pub(crate) fn region_runtime(addr: u64) -> Option<u32> {
    let high = REGIONS_HIGH.load(Ordering::Acquire).min(MAX_REGIONS);
    for slot in REGIONS[..high].iter() {
        let end = slot.end.load(Ordering::Acquire);
        if end == 0 {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        if addr >= start && addr < end {
            return Some(slot.runtime.load(Ordering::Relaxed));
        }
    }
    None
}

/// Marks external slot `i` DONE and wakes its thread.
pub(crate) fn complete_external(i: usize) {
    if let Some(slot) = EXTERNAL.get(i) {
        slot.state.store(EXT_DONE, Ordering::Release);
        futex_wake(&slot.state);
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 in static memory; no other memory touched.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 in static memory; returns at once if the
    // value differs; the timeout pointer is null (wait until woken).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// Reads the write bit of the faulting access from the signal context.
///
/// # Safety
/// `ctx` is the `ucontext_t` the kernel passed to an SA_SIGINFO handler.
unsafe fn is_write(ctx: *mut libc::c_void) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if ctx.is_null() {
            return true;
        }
        // SAFETY: per the contract, `ctx` points to the kernel's ucontext_t.
        let uc = unsafe { &*(ctx as *const libc::ucontext_t) };
        // Page-fault error code bit 1: the access was a write.
        (uc.uc_mcontext.gregs[libc::REG_ERR as usize] & 2) != 0
    }
    #[cfg(target_arch = "aarch64")]
    {
        if ctx.is_null() {
            return true;
        }
        // SAFETY: per the contract; the __reserved area holds a list of records, each
        // {magic: u32, size: u32}, ended by magic 0; ESR_MAGIC carries the ESR.
        unsafe {
            let uc = &*(ctx as *const libc::ucontext_t);
            let base = uc.uc_mcontext.__reserved.as_ptr() as *const u8;
            let len = std::mem::size_of_val(&uc.uc_mcontext.__reserved);
            let mut off = 0usize;
            while off + 8 <= len {
                let magic = (base.add(off) as *const u32).read_unaligned();
                let size = (base.add(off + 4) as *const u32).read_unaligned() as usize;
                if magic == 0 || size == 0 {
                    break;
                }
                if magic == 0x4553_5201 {
                    let esr = (base.add(off + 8) as *const u64).read_unaligned();
                    return esr & (1 << 6) != 0;
                }
                off += size;
            }
            true
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = ctx;
        true
    }
}

/// Passes the signal to the handler that was installed before ours.
///
/// # Safety
/// Called from our SA_SIGINFO handler with its arguments.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: PREVIOUS was written once before our handler was installed.
    let prev = unsafe { *std::ptr::addr_of!(PREVIOUS) };
    let Some(prev) = prev else {
        return;
    };
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // SAFETY: restoring the default disposition; the faulting access is retried on
        // return and the default action (terminate) happens.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut dfl.sa_mask);
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as an SA_SIGINFO function.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous handler was installed as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    let runtime = if code == libc::BUS_ADRERR && !is_poisoned(addr & !0xfff) {
        region_runtime(addr)
    } else {
        None
    };
    let Some(runtime) = runtime else {
        // SAFETY: forwarding our own handler's arguments.
        unsafe { chain(sig, info, ctx) };
        return;
    };
    // SAFETY: `ctx` is the ucontext_t of this SA_SIGINFO delivery.
    let write = unsafe { is_write(ctx) };
    let payload = (addr & !0xfff) | if write { PAYLOAD_WRITE } else { 0 };
    if !usm_localmanager::signal::park_current_on_fault(payload) {
        post_external(runtime, payload);
    }
    if is_poisoned(addr & !0xfff) {
        // The fault was answered with UFFDIO_POISON: the program gets the SIGBUS.
        // SAFETY: forwarding our own handler's arguments.
        unsafe { chain(sig, info, ctx) };
    }
}

/// Posts a plain thread's fault and waits on the slot's futex until a worker served it.
fn post_external(runtime: u32, payload: u64) {
    loop {
        for (i, slot) in EXTERNAL.iter().enumerate() {
            if slot
                .state
                .compare_exchange(EXT_FREE, EXT_CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            slot.payload.store(payload, Ordering::Relaxed);
            slot.runtime.store(runtime, Ordering::Relaxed);
            slot.state.store(EXT_POSTED, Ordering::Release);
            // Write the eventfd first, then raise the flag: a driver reads the fd only
            // after taking the flag, so every write is consumed.
            notify_runtime(runtime);
            if let Some(flag) = EXTERNAL_PENDING.get(runtime as usize) {
                flag.store(1, Ordering::Release);
            }
            loop {
                let s = slot.state.load(Ordering::Acquire);
                if s == EXT_DONE {
                    break;
                }
                futex_wait(&slot.state, s);
            }
            slot.state.store(EXT_FREE, Ordering::Release);
            let _ = i;
            return;
        }
        // Every slot is busy: let their threads finish.
        // SAFETY: sched_yield has no memory effects.
        unsafe { libc::sched_yield() };
    }
}

fn notify_runtime(runtime: u32) {
    let Some(fd) = RUNTIME_FDS.get(runtime as usize) else {
        return;
    };
    let fd = fd.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let one: u64 = 1;
    // SAFETY: write(2) of 8 bytes from a local to an eventfd; async-signal-safe.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}
