//! [`PmQos`]: holds `/dev/cpu_dma_latency` at 0 µs so idle cores do not enter deep
//! C-states during a measurement (every side of a benchmark runs under the same setting).
//!
//! The kernel keeps the request only while the file stays open, so the guard is just the
//! open file: closing it — on drop, panic, or process death of any kind — restores the
//! previous latency target. Nothing needs a journal.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

const DMA_LATENCY: &str = "/dev/cpu_dma_latency";

/// A PM-QoS CPU latency request of `target_us`, held while this value lives.
#[derive(Debug)]
pub struct PmQos {
    _file: File,
    target_us: i32,
}

impl PmQos {
    /// Requests a CPU wake-up latency of `target_us` (0 = stay in C0/C1 polling).
    pub fn hold(target_us: i32) -> Result<Self> {
        if !Path::new(DMA_LATENCY).exists() {
            return Err(Error::Unavailable {
                facility: "PM-QoS",
                reason: format!("{DMA_LATENCY} does not exist"),
            });
        }
        let mut file = OpenOptions::new()
            .write(true)
            .open(DMA_LATENCY)
            .map_err(|e| Error::io("open", DMA_LATENCY, e))?;
        file.write_all(&target_us.to_ne_bytes())
            .map_err(|e| Error::io("write", DMA_LATENCY, e))?;
        Ok(Self {
            _file: file,
            target_us,
        })
    }

    /// The benchmarks' setting: hold 0 µs unless `disabled` (`--no-pmqos`); a machine
    /// without `/dev/cpu_dma_latency` (or without the right to open it) runs without it,
    /// with one line on stderr, and the report records `None`.
    pub fn hold_zero_unless(disabled: bool) -> Option<Self> {
        if disabled {
            return None;
        }
        Self::hold(0)
            .map_err(|e| eprintln!("PM-QoS not held: {e}"))
            .ok()
    }

    /// The requested latency in µs.
    pub fn target_us(&self) -> i32 {
        self.target_us
    }
}
