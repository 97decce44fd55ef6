//! The config parser (`usm_runtime::config`) on any text: never a panic; an accepted
//! config prints back (its `Display`) to text that parses to the same config; a refused
//! one names a line (≥ 1) and holds no control character that could forge a log line.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use usm_runtime::config::{Config, Machine};

/// A fixed machine, so a finding reproduces anywhere: 16 GiB, 8 cores.
const MACHINE: Machine = Machine {
    ram_pages: 1 << 22,
    online_cores: 8,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse_for(text, Path::new("fuzz.cfg"), &MACHINE) {
        Ok(cfg) => {
            let shown = cfg.to_string();
            let again = Config::parse_for(&shown, Path::new("again.cfg"), &MACHINE)
                .unwrap_or_else(|e| panic!("{text:?} printed as {shown:?}, which fails: {e}"));
            assert_eq!(again.to_string(), shown, "{text:?}");
            assert_eq!(again.memory_pages, cfg.memory_pages);
            assert_eq!(again.processes.len(), cfg.processes.len());
        }
        Err(e) => {
            assert!(e.line.is_some_and(|l| l >= 1), "{e:?}");
            let shown = e.to_string();
            assert!(
                !shown.chars().any(char::is_control),
                "control character in {shown:?}"
            );
        }
    }
});
