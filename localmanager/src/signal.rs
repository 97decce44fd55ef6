//! The fault path's entry into the scheduler: async-signal-safe parking of the current
//! uThread on a page fault, and the PFQ keys the runtime uses to resume it.
//!
//! # `park_current_on_fault(payload)` — exactly what it touches
//! Called from a signal handler (e.g. the runtime's SIGBUS handler) running **on the
//! faulting uThread's stack**. The handler must be installed with `SA_NODEFER` (the
//! worker keeps running other uThreads before the handler returns, so the signal must not
//! stay blocked) and without an alternate stack. In order:
//! 1. reads this thread's worker pointer (a `const` thread-local `Cell`, no lazy init) and
//!    from it the running uThread's `Task` and slot — returns `false` if there is none
//!    (not a worker thread, or the worker is between uThreads);
//! 2. `task.no_preempt += 1` (time-slice preemption stays off until the handler is done),
//!    then `slots[slot].payload.store(payload)` (one atomic store);
//! 3. `task.in_handler.store(true)` — from now on no thief takes it, shutdown never drops it;
//! 4. CAS loop `task.state: RUNNING → FAULTED` (keeps a pending unpark token);
//! 5. `counters.faults += 1`, `pfq.set(slot)` (lock-free RMWs on the worker's PFQ), then
//!    `slots[slot].fault_seq += 1` (even → odd): this publishes the fault's key;
//! 6. `usm_fibers::suspend_current(Suspend::Fault)`: corosensei's register switch back into
//!    the LocalManager, which puts the entry back in its slot and schedules others;
//! 7. when resumed — always on the same worker thread, after someone moved it PFQ → IDQ with
//!    [`crate::Handle::resume_faulted`] / [`crate::DriverContext::resume_faulted`] —
//!    `task.in_handler.store(false)`, `task.no_preempt -= 1`, and returns `true`; the
//!    handler then returns and the kernel restores the interrupted context (the faulting
//!    access is retried).
//!
//! No allocation, no lock, no tracing, no refcount change. Faults taken while not on a
//! uThread must be handled by the caller (it gets `false`).
//!
//! # Resuming
//! The runtime lists PFQ with [`crate::Handle::faulted`] (or the driver context), each entry
//! a [`FaultedUThread`] with its payload, and calls `resume_faulted(key)` from any thread
//! once the page is in place. At most one resumer per fault: `resume_faulted` claims the
//! fault with a CAS of the slot's generation (odd → even), then clears the PFQ bit, so a
//! second call returns `false`.
//!
//! # Generations
//! A [`FaultKey`] names one fault, not just a slot: slots are reused (after the uThread
//! finishes, or when it is stolen away while ready) and a uThread faults many times. The
//! slot's generation only ever grows, so a key kept by a slow resumer — listed twice, or
//! resumed late by an I/O completion — can never resume a later fault of the same slot
//! (whose page is not there yet) or another uThread that now lives in the slot.

use serde::Serialize;

/// Identifies one fault a uThread is parked on: its worker, its slot there and the fault's
/// generation. Valid until that fault is resumed; afterwards it matches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FaultKey {
    /// Worker (LocalManager) index.
    pub worker: usize,
    /// Slot in that worker's IDQ/PFQ.
    pub slot: u32,
    /// Generation of the fault in that slot (odd; see the module docs).
    pub generation: u64,
}

/// A PFQ entry: who, and the payload recorded by the handler (fault address + write bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultedUThread {
    /// Where it is parked.
    pub key: FaultKey,
    /// The `payload` passed to [`park_current_on_fault`].
    pub payload: u64,
}

#[cfg(not(loom))]
pub use crate::sys::signal::{current_fault_key, park_current_on_fault};
