//! Helpers shared by the integration tests: on-disk temp dirs, page patterns with
//! checksums, a pipelined driver, and RAII guards for loop devices.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use usm_swap::{Completion, Engine, IoBuf, IoOp, PAGE_SIZE, PageBuf, SwapEntry, Ticket};

/// A temp dir on the ext4 disk (O_DIRECT fails on tmpfs): /var/tmp, unless it is tmpfs.
pub fn disk_tempdir() -> tempfile::TempDir {
    for base in ["/var/tmp", "/tmp", "/work"] {
        if let Ok(st) = nix::sys::statfs::statfs(base) {
            if st.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
                return tempfile::Builder::new()
                    .prefix("usm-swap-test-")
                    .tempdir_in(base)
                    .unwrap();
            }
        }
    }
    panic!("no disk-backed directory for O_DIRECT test files");
}

/// Fills `page` with a pattern derived from (`entry`, `seed`) and a trailing checksum.
pub fn fill_page(page: &mut [u8], entry: SwapEntry, seed: u64) {
    let mut x = entry.to_raw() ^ seed.rotate_left(17) ^ 0x9E37_79B9_7F4A_7C15;
    page[..8].copy_from_slice(&entry.to_raw().to_le_bytes());
    page[8..16].copy_from_slice(&seed.to_le_bytes());
    for chunk in page[16..PAGE_SIZE - 8].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let sum = checksum(&page[..PAGE_SIZE - 8]);
    page[PAGE_SIZE - 8..PAGE_SIZE].copy_from_slice(&sum.to_le_bytes());
}

pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Checks a page written by `fill_page(entry, seed)`.
pub fn check_page(page: &[u8], entry: SwapEntry, seed: u64) -> Result<(), String> {
    let got_entry = u64::from_le_bytes(page[..8].try_into().unwrap());
    let got_seed = u64::from_le_bytes(page[8..16].try_into().unwrap());
    if got_entry != entry.to_raw() || got_seed != seed {
        return Err(format!(
            "{entry}: page holds entry {got_entry:#x} seed {got_seed} (want seed {seed})"
        ));
    }
    let sum = u64::from_le_bytes(page[PAGE_SIZE - 8..PAGE_SIZE].try_into().unwrap());
    if sum != checksum(&page[..PAGE_SIZE - 8]) {
        return Err(format!("{entry}: checksum mismatch"));
    }
    Ok(())
}

/// Drives `engine` until every request in `work` completed, keeping at most `depth` in
/// flight; each write carries `fill_page(entry, seed)`, each read is checked. Returns the
/// number of completions.
pub fn pipeline(engine: &mut Engine, work: &[(IoOp, SwapEntry)], seed: u64, depth: u32) -> usize {
    let mut next = 0;
    let mut done = 0;
    let mut tickets: HashMap<Ticket, (IoOp, SwapEntry)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < work.len() {
        while next < work.len() && engine.in_flight() < depth {
            let (op, entry) = work[next];
            let mut buf = PageBuf::page();
            let t = match op {
                IoOp::Write => {
                    fill_page(&mut buf, entry, seed);
                    engine.write(entry, buf)
                }
                IoOp::Read => engine.read(entry, buf),
            }
            .unwrap();
            tickets.insert(t, (op, entry));
            next += 1;
        }
        engine.submit().unwrap();
        engine.wait(1).unwrap();
        done += engine.reap(|c: Completion| {
            let (op, entry) = tickets.remove(&c.ticket).expect("unknown ticket");
            assert_eq!((c.op, c.entry), (op, entry));
            let n = c.result.unwrap_or_else(|e| panic!("{op:?} {entry}: {e}"));
            assert_eq!(n as usize, PAGE_SIZE);
            let Some(IoBuf::Owned(buf)) = c.buf else {
                panic!("owned buffer not returned")
            };
            if op == IoOp::Read {
                check_page(&buf, entry, seed).unwrap();
            }
        });
        assert!(Instant::now() < deadline, "pipeline stalled");
    }
    assert_eq!(engine.in_flight(), 0);
    done
}

/// A loop device attached to a file with `losetup`; detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// `None` (with the reason) if losetup is missing or refuses.
    pub fn attach(file: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup not runnable: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Ok(Self { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let ok = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !matches!(ok, Ok(s) if s.success()) {
            eprintln!("warning: losetup -d {} failed", self.path.display());
        }
    }
}
