//! Implementation of the async-signal-safe fault parking (see [`crate::signal`]).

use usm_fibers::Suspend;
use usm_sync::atomic::Ordering;

use crate::signal::FaultKey;
use crate::sys::current::with_current_task;

/// Parks the running uThread in PFQ with `payload` and switches to its LocalManager;
/// returns `true` once it has been resumed (on the same worker), `false` at once when not
/// called on a uThread. Async-signal-safe; see [`crate::signal`] for the exact state
/// touched.
pub fn park_current_on_fault(payload: u64) -> bool {
    with_current_task(|local, task, slot| {
        // No preemption from here until the handler returns (see `sys::preempt`).
        task.no_preempt.fetch_add(1, Ordering::Relaxed);
        let manager = local.manager();
        let Some(meta) = manager.slots.get(slot as usize) else {
            task.no_preempt.fetch_sub(1, Ordering::Relaxed);
            return false;
        };
        meta.payload.store(payload, Ordering::Release);
        task.in_handler.store(true, Ordering::Release);
        task.mark_faulted();
        manager.counters.faults.fetch_add(1, Ordering::Relaxed);
        manager.pfq.set(slot as usize);
        // Publish the fault's key (odd generation) last: from here a resumer can claim it.
        meta.fault_seq.fetch_add(1, Ordering::AcqRel);
        let switched = usm_fibers::suspend_current(Suspend::Fault);
        task.in_handler.store(false, Ordering::Release);
        task.no_preempt.fetch_sub(1, Ordering::Relaxed);
        switched
    })
    .unwrap_or(false)
}

/// The PFQ key the running uThread would get if it faulted now, generation included
/// (`None` off a uThread). Async-signal-safe.
pub fn current_fault_key() -> Option<FaultKey> {
    with_current_task(|local, _, slot| {
        let generation = local
            .manager()
            .slots
            .get(slot as usize)
            .map_or(1, |meta| meta.fault_seq.load(Ordering::Acquire) + 1);
        FaultKey {
            worker: local.index,
            slot,
            generation,
        }
    })
}
