//! Host pre-warming.
//!
//! This machine is a VM: the first touch of a guest-physical page that the host has never
//! backed (or has reclaimed, e.g. by free-page reporting) costs ~9.5 µs, far more than a
//! guest page fault. Freshly freed guest memory is reused first by the next allocations,
//! so allocating, touching and freeing a bit more than a benchmark side is about to use,
//! *right before that side*, makes every side start from host-backed memory.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sys::{Advice, AnonMemory};

/// What [`prewarm_host`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PrewarmReport {
    /// Bytes touched.
    pub bytes: u64,
    /// Seconds it took.
    pub secs: f64,
}

/// Allocates `bytes` of anonymous memory, writes one byte in every 4 KiB page, and frees it.
pub fn prewarm_host(bytes: u64) -> Result<PrewarmReport> {
    let t0 = Instant::now();
    let mut mem = AnonMemory::new(bytes as usize)?;
    // Huge pages make the guest side cheap; every 4 KiB is still written so the host backs
    // every guest-physical page under it.
    let _ = mem.advise(Advice::HugePage);
    for off in (0..mem.len()).step_by(4096) {
        mem.touch(off, 1);
    }
    drop(mem);
    Ok(PrewarmReport {
        bytes,
        secs: t0.elapsed().as_secs_f64(),
    })
}
