//! Coverage: managed anonymous memory over all anonymous memory of a process.
//!
//! The numbers come from the kernel, not from the tagger's bookkeeping: every VMA in
//! `/proc/<pid>/smaps` lists its resident `Anonymous:` bytes and its `VmFlags:`, where
//! `um` means "registered with a userfaultfd in MISSING mode". Coverage is
//! `sum(Anonymous of VMAs with um) / sum(Anonymous of all VMAs)`. The denominator is the
//! strict one (the process's anonymous RSS, including thread stacks and copy-on-write
//! pages of libraries' data segments, which the tagger leaves to the kernel).

use std::io;

/// A coverage measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Anonymous resident bytes in userfaultfd-registered (MISSING) VMAs.
    pub managed_anon_bytes: u64,
    /// All anonymous resident bytes.
    pub anon_bytes: u64,
    /// Number of registered VMAs.
    pub managed_vmas: u64,
    /// Number of VMAs.
    pub vmas: u64,
}

impl Coverage {
    /// Parses the text of an `smaps` file. Unknown lines are ignored.
    pub fn from_smaps(text: &str) -> Coverage {
        let mut cov = Coverage::default();
        let mut anon = 0u64;
        let mut in_vma = false;
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let Some(first) = words.next() else { continue };
            if !first.ends_with(':') {
                // A VMA header: "start-end perms offset dev inode [path]".
                in_vma = first.contains('-');
                anon = 0;
                if in_vma {
                    cov.vmas += 1;
                }
                continue;
            }
            if !in_vma {
                continue;
            }
            match first {
                "Anonymous:" => {
                    let kib = words
                        .next()
                        .and_then(|w| w.parse::<u64>().ok())
                        .unwrap_or(0);
                    anon = kib.saturating_mul(1024);
                    cov.anon_bytes = cov.anon_bytes.saturating_add(anon);
                }
                "VmFlags:" if words.any(|w| w == "um") => {
                    cov.managed_vmas += 1;
                    cov.managed_anon_bytes = cov.managed_anon_bytes.saturating_add(anon);
                }
                _ => {}
            }
        }
        cov
    }

    /// Measures process `pid` (needs ptrace-read access to it).
    pub fn of_pid(pid: u32) -> io::Result<Coverage> {
        Ok(Self::from_smaps(&std::fs::read_to_string(format!(
            "/proc/{pid}/smaps"
        ))?))
    }

    /// Measures the calling process.
    pub fn of_self() -> io::Result<Coverage> {
        Ok(Self::from_smaps(&std::fs::read_to_string(
            "/proc/self/smaps",
        )?))
    }

    /// `managed / anonymous`, or 1.0 when there is no anonymous memory at all.
    pub fn ratio(&self) -> f64 {
        if self.anon_bytes == 0 {
            1.0
        } else {
            self.managed_anon_bytes as f64 / self.anon_bytes as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_um_vmas_as_managed() {
        let text = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Anonymous:           512 kB
VmFlags: rd wr mr mw me ac um 
7f0000100000-7f0000200000 rw-p 00000000 00:00 0                          [stack]
Anonymous:           128 kB
VmFlags: rd wr mr mw me gd ac 
55d0-55e0 r--p 00000000 08:01 1234                       /usr/bin/true
Anonymous:             0 kB
VmFlags: rd mr mw me 
";
        let cov = Coverage::from_smaps(text);
        assert_eq!(cov.anon_bytes, 640 * 1024);
        assert_eq!(cov.managed_anon_bytes, 512 * 1024);
        assert_eq!(cov.managed_vmas, 1);
        assert_eq!(cov.vmas, 3);
        assert!((cov.ratio() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn reads_own_smaps() {
        let cov = Coverage::of_self().unwrap();
        assert!(cov.vmas > 0);
        assert!(cov.anon_bytes > 0);
        assert!(cov.managed_anon_bytes <= cov.anon_bytes);
    }
}
