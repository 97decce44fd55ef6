//! The guards really change the machine and really restore it: a memory cgroup, a swap
//! file, zram swap, THP/mTHP knobs and PM-QoS — on drop, after a panic in the guard's
//! scope, on SIGTERM (in a child process), and after SIGKILL via `cleanup_leftovers`.
//!
//! Needs root. Tests are serialised (they share `/proc/swaps` and the THP knobs).

#![deny(unsafe_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use usm_sync::Mutex;

use usm_bench::guard::{self, MthpMode, ThpMode, active_swaps};
use usm_bench::{MemCgroup, MthpSetting, PmQos, SwapFile, ThpSetting, ZramSwap};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> usm_sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The guards change system settings: the tests need root and fail without it (CI runs
/// as root; a test that cannot run must not pass).
macro_rules! need_root {
    () => {
        assert!(
            is_root(),
            "needs root (swap, zram, THP and PM-QoS settings)"
        );
    };
}

fn swap_dir() -> PathBuf {
    PathBuf::from(guard::DEFAULT_SWAP_DIR)
}

fn knob(path: &str) -> String {
    let t = fs::read_to_string(path).unwrap();
    let (a, b) = (t.find('[').unwrap(), t.find(']').unwrap());
    t[a + 1..b].to_string()
}

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
const MTHP_64K: &str = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled";

#[test]
fn cgroup_places_child_before_exec_and_is_removed() {
    need_root!();
    let _s = serial();
    let cg = MemCgroup::create("test-place", 64 << 20).unwrap();
    let dir = cg.path().to_path_buf();
    assert!(dir.is_dir());
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let out = cg.command("cat").arg("/proc/self/cgroup").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("memory") || l.starts_with("0::"))
        .unwrap();
    assert!(text.contains(&name), "child not in {name}: {line}");
    let stats = cg.stats().unwrap();
    assert_eq!(stats.limit_bytes, 64 << 20);
    // The child's exec and run were charged to the group.
    assert!(stats.peak_bytes > 0, "{stats:?}");
    drop(cg);
    assert!(!dir.exists(), "cgroup dir left behind");
}

#[test]
fn cgroup_moves_live_task_out_on_drop() {
    need_root!();
    let _s = serial();
    let cg = MemCgroup::create("test-live", 64 << 20).unwrap();
    let dir = cg.path().to_path_buf();
    let mut child = cg.command("sleep").arg("30").spawn().unwrap();
    assert_eq!(cg.pids().unwrap(), vec![child.id()]);
    drop(cg);
    assert!(!dir.exists());
    // Moved to the parent, still alive.
    assert!(child.try_wait().unwrap().is_none());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn cgroup_removed_after_panic_in_scope() {
    need_root!();
    let _s = serial();
    let mut dir = PathBuf::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cg = MemCgroup::create("test-panic", 32 << 20).unwrap();
        dir = cg.path().to_path_buf();
        panic!("boom inside the guard's scope");
    }));
    assert!(res.is_err());
    assert!(!dir.as_os_str().is_empty());
    assert!(!dir.exists(), "cgroup survived the panic");
}

#[test]
fn swap_file_enabled_then_removed_and_state_restored() {
    need_root!();
    let _s = serial();
    let before = active_swaps().unwrap();
    let sw = SwapFile::create(&swap_dir(), 64 << 20, 7).unwrap();
    let path = sw.path().to_path_buf();
    let now = active_swaps().unwrap();
    let mine = now
        .iter()
        .find(|s| Path::new(&s.path) == path)
        .expect("swap file not active");
    assert_eq!(mine.priority, 7);
    assert!(
        mine.size_bytes >= (60 << 20) && mine.size_bytes <= 64 << 20,
        "{mine:?}"
    );
    drop(sw);
    assert!(!path.exists(), "swap file not deleted");
    assert_eq!(active_swaps().unwrap(), before);
}

#[test]
fn swap_file_removed_after_panic_in_scope() {
    need_root!();
    let _s = serial();
    let before = active_swaps().unwrap();
    let mut path = PathBuf::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let sw = SwapFile::create(&swap_dir(), 32 << 20, 3).unwrap();
        path = sw.path().to_path_buf();
        assert_eq!(active_swaps().unwrap().len(), before.len() + 1);
        panic!("boom");
    }));
    assert!(res.is_err());
    assert!(!path.exists());
    assert_eq!(active_swaps().unwrap(), before);
}

/// The cgroup limit is enforced and the excess goes to our swap file: a child allocating
/// 3× the limit finishes, its group peaks at the limit, and swap was used.
#[test]
fn cgroup_limit_pushes_child_memory_to_swap_file() {
    need_root!();
    let _s = serial();
    let before = active_swaps().unwrap();
    let sw = SwapFile::create(&swap_dir(), 256 << 20, 5).unwrap();
    let cg = MemCgroup::create("test-limit", 32 << 20).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = cg.command(&exe);
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("USM_BENCH_TEST_CHILD", "alloc:96");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ALLOC-VERIFIED"));
    let stats = cg.stats().unwrap();
    assert!(stats.peak_bytes <= 32 << 20, "{stats:?}");
    assert!(stats.peak_with_swap_bytes >= 64 << 20, "{stats:?}");
    assert!(stats.major_faults > 0 || stats.peak_with_swap_bytes > stats.peak_bytes);
    drop(cg);
    drop(sw);
    assert_eq!(active_swaps().unwrap(), before);
}

#[test]
fn zram_swap_enabled_then_reset() {
    need_root!();
    let _s = serial();
    let before = active_swaps().unwrap();
    let z = match ZramSwap::create(64 << 20, 9, Duration::from_secs(5)) {
        Ok(z) => z,
        // This machine's kernel has zram built in: absent or held by someone else is a
        // broken set-up, not a pass.
        Err(e) => panic!("zram swap: {e}"),
    };
    let now = active_swaps().unwrap();
    let mine = now
        .iter()
        .find(|s| s.path == "/dev/zram0")
        .expect("zram0 not active");
    assert_eq!(mine.priority, 9);
    assert_eq!(
        fs::read_to_string("/sys/block/zram0/disksize")
            .unwrap()
            .trim(),
        (64u64 << 20).to_string()
    );
    drop(z);
    assert_eq!(
        fs::read_to_string("/sys/block/zram0/disksize")
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(active_swaps().unwrap(), before);
}

#[test]
fn thp_and_mthp_settings_restored_on_drop_and_panic() {
    need_root!();
    let _s = serial();
    assert!(
        Path::new(MTHP_64K).exists(),
        "no mTHP 64K knob ({MTHP_64K}): this machine's kernel has one"
    );
    let thp0 = knob(THP_ENABLED);
    let m0 = knob(MTHP_64K);
    let other = if m0 == "always" {
        MthpMode::Never
    } else {
        MthpMode::Always
    };
    {
        let g = MthpSetting::set(64, other).unwrap();
        assert_eq!(g.original(), m0);
        assert_ne!(knob(MTHP_64K), m0);
        let t = ThpSetting::set_enabled(if thp0 == "never" {
            ThpMode::Madvise
        } else {
            ThpMode::Never
        })
        .unwrap();
        assert_ne!(knob(THP_ENABLED), thp0);
        drop(t);
        assert_eq!(knob(THP_ENABLED), thp0);
    }
    assert_eq!(knob(MTHP_64K), m0);
    let res = std::panic::catch_unwind(|| {
        let _g = MthpSetting::set(64, other).unwrap();
        let _t = ThpSetting::set_enabled(ThpMode::Always).unwrap();
        panic!("boom");
    });
    assert!(res.is_err());
    assert_eq!(knob(MTHP_64K), m0);
    assert_eq!(knob(THP_ENABLED), thp0);
}

fn read_dma_latency() -> i32 {
    let mut b = [0u8; 4];
    fs::File::open("/dev/cpu_dma_latency")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    i32::from_ne_bytes(b)
}

#[test]
fn pm_qos_held_then_released() {
    need_root!();
    let _s = serial();
    let q = match PmQos::hold(0) {
        Ok(q) => q,
        Err(e) => panic!("PM QoS (/dev/cpu_dma_latency): {e}"),
    };
    assert_eq!(read_dma_latency(), 0);
    drop(q);
    assert_ne!(read_dma_latency(), 0);
}

/// Spawns this test binary as a child that creates a cgroup, a swap file and an mTHP
/// setting, prints their paths and waits; returns (child, cgroup dir, swap file).
fn spawn_guard_holder() -> (std::process::Child, PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("USM_BENCH_TEST_CHILD", "hold")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut cg = None;
    let mut sw = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        // libtest prints "test child_entry ... " before the child's first line.
        if let Some(i) = line.find("CGROUP ") {
            cg = Some(PathBuf::from(&line[i + 7..]));
        } else if let Some(i) = line.find("SWAP ") {
            sw = Some(PathBuf::from(&line[i + 5..]));
        } else if line.ends_with("READY") {
            break;
        }
    }
    (
        child,
        cg.expect("no cgroup line"),
        sw.expect("no swap line"),
    )
}

#[test]
fn sigterm_runs_every_cleanup_then_dies_by_the_signal() {
    need_root!();
    let _s = serial();
    assert!(
        Path::new(MTHP_64K).exists(),
        "no mTHP 64K knob ({MTHP_64K}): this machine's kernel has one"
    );
    let before = active_swaps().unwrap();
    let m0 = knob(MTHP_64K);
    let (mut child, cg, sw) = spawn_guard_holder();
    assert!(cg.exists() && sw.exists());
    assert_eq!(active_swaps().unwrap().len(), before.len() + 1);
    assert_ne!(knob(MTHP_64K), m0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert!(!cg.exists(), "cgroup left after SIGTERM");
    assert!(!sw.exists(), "swap file left after SIGTERM");
    assert_eq!(active_swaps().unwrap(), before);
    assert_eq!(knob(MTHP_64K), m0);
}

#[test]
fn cleanup_leftovers_undoes_a_sigkilled_run() {
    need_root!();
    let _s = serial();
    assert!(
        Path::new(MTHP_64K).exists(),
        "no mTHP 64K knob ({MTHP_64K}): this machine's kernel has one"
    );
    let before = active_swaps().unwrap();
    let m0 = knob(MTHP_64K);
    let (mut child, cg, sw) = spawn_guard_holder();
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();
    assert!(
        cg.exists() && sw.exists(),
        "SIGKILL should leave state behind"
    );
    assert_ne!(knob(MTHP_64K), m0);
    let report = usm_bench::cleanup::cleanup_leftovers(&[]).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(report.undone.len() >= 3, "{report:?}");
    assert!(!cg.exists());
    assert!(!sw.exists());
    assert_eq!(active_swaps().unwrap(), before);
    assert_eq!(knob(MTHP_64K), m0);
    // Nothing left for a second pass.
    assert!(
        usm_bench::cleanup::cleanup_leftovers(&[])
            .unwrap()
            .is_clean()
    );
}

/// Not a test on its own: the body of the child processes above (inert without the env).
#[test]
fn child_entry() {
    let Ok(what) = std::env::var("USM_BENCH_TEST_CHILD") else {
        return;
    };
    if let Some(mib) = what.strip_prefix("alloc:") {
        let mib: usize = mib.parse().unwrap();
        let mut v = vec![0u8; mib << 20];
        for (i, b) in v.iter_mut().enumerate().step_by(4096) {
            *b = (i / 4096) as u8;
        }
        for (i, b) in v.iter().enumerate().step_by(4096) {
            assert_eq!(*b, (i / 4096) as u8);
        }
        println!("ALLOC-VERIFIED");
    } else if what == "hold" {
        let sw = SwapFile::create(&swap_dir(), 32 << 20, 4).unwrap();
        let cg = MemCgroup::create("test-hold", 32 << 20).unwrap();
        let m0 = knob(MTHP_64K);
        let _m = MthpSetting::set(
            64,
            if m0 == "always" {
                MthpMode::Never
            } else {
                MthpMode::Always
            },
        )
        .unwrap();
        println!("CGROUP {}", cg.path().display());
        println!("SWAP {}", sw.path().display());
        println!("READY");
        // Killed by the parent long before this; if not, the guards drop normally.
        std::thread::sleep(Duration::from_secs(30));
    }
}
