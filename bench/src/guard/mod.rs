//! Guards that change machine state for a benchmark and always undo it.
//!
//! The registry, the journal, the signal watcher, [`MemCgroup`], [`SwapFile`] and
//! [`ZramSwap`] live in [`usm_runtime::baseline`] (`usm compare` runs the same kernel side);
//! see its docs for the protocol (journal first, change, undo on drop / panic /
//! SIGINT-SIGTERM-SIGHUP, cleanup of a SIGKILLed run). This module re-exports them and adds
//! the bench-only guards on the same registry: [`ThpSetting`], [`MthpSetting`],
//! [`SysfsKnob`] and [`PmQos`].

mod pmqos;
mod thp;

pub use pmqos::PmQos;
pub use thp::{MthpMode, MthpSetting, SysfsKnob, ThpMode, ThpSetting, mthp_sizes_kib, mthp_stat};
pub use usm_runtime::baseline::{
    ActiveSwap, CgroupStats, CgroupVersion, JOURNAL_DIR, MemCgroup, SwapFile, Undo, UndoCause,
    ZRAM_LOCK_PATH, ZramSwap, active_swaps, cgroup_base_dir, registered_count, undo_all,
    wait_for_signal_cleanup,
};

/// Default directory of the benchmarks' swap files: on the root ext4 disk, the project's
/// disk. Created when missing (by [`SwapFile::create`] and by every bench that puts a file
/// there).
pub const DEFAULT_SWAP_DIR: &str = "/var/tmp/usm-bench-swap";
