//! The daemon runs the configured policies per fault, on real programs with the real
//! tagger and real userfaultfd: a panicking policy is replaced and the program completes;
//! `fhp` maps many pages per fault where `first-fit` maps one; a hint sent with
//! `libusm.so`'s `usm_hint` changes the allocation policy's decisions (`HUGE=4K`) and
//! the eviction policy's (`EVICTION=DENY` with `evict hints`).
//!
//! The daemon runs in the test process ([`Daemon::start`]), so a test can register a
//! policy of its own ([`DaemonOptions::register`]); the programs are separate processes
//! tagged with `LD_PRELOAD`. Needs root-like privileges (`EVENT_FORK`,
//! `process_vm_readv`) and gcc; skips with a reason without gcc.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use usm_kmod::event::Fault;
use usm_policies::{
    AllocPolicy, Cx, Decision, EvictCx, EvictPolicy, MappedPage, Param, PolicyError, Registry,
    VictimRequest, VictimScan,
};
use usm_runtime::config::Config;
use usm_runtime::daemon::{Daemon, DaemonOptions, ProcessStat};

/// The probe program: maps memory, optionally hints it with `usm_hint`, touches and
/// verifies every page.
///
/// - `free MB`: maps and touches `MB` MiB, unmaps its first half and `MADV_DONTNEED`s
///   the second, then maps, touches and verifies another `MB` MiB.
/// - `touch MB [HINT]`: one mapping of `MB` MiB; `HINT` (if given) on its first half.
/// - `deny AMB BMB [HINT]`: mapping A (`AMB` MiB, `HINT` on all of it if given) touched
///   first, then mapping B (`BMB` MiB) written twice; prints how many pages of A are
///   still present (`/proc/self/pagemap`), then verifies A and B.
const PROBE_C: &str = r#"
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int usm_hint_range(void *addr, size_t len, const char *hint);

#define PG 4096UL

static char *map(size_t len) {
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(3); }
    return p;
}

static void fill(char *p, size_t len, uint64_t salt) {
    for (size_t i = 0; i < len / PG; i++) *(uint64_t *)(p + i * PG) = i * 2654435761u ^ salt;
}

static int check(const char *p, size_t len, uint64_t salt, const char *what) {
    for (size_t i = 0; i < len / PG; i++) {
        if (*(const uint64_t *)(p + i * PG) != (i * 2654435761u ^ salt)) {
            printf("BAD %s page %zu\n", what, i);
            return 1;
        }
    }
    return 0;
}

static size_t present(const char *p, size_t len) {
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) { perror("pagemap"); exit(3); }
    size_t n = 0;
    for (size_t i = 0; i < len / PG; i++) {
        uint64_t e = 0;
        off_t off = (off_t)(((uintptr_t)p / PG + i) * 8);
        if (pread(fd, &e, 8, off) == 8 && (e >> 63)) n++;
    }
    close(fd);
    return n;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "touch")) {
        size_t len = strtoul(argv[2], NULL, 10) << 20;
        char *p = map(len);
        if (argc > 3) printf("hint=%d\n", usm_hint_range(p, len / 2, argv[3]));
        usleep(300000); /* the range and hint messages reach the daemon first */
        fill(p, len, 0x5a5a);
        if (check(p, len, 0x5a5a, "touch")) return 1;
        printf("OK\n");
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "deny")) {
        size_t alen = strtoul(argv[2], NULL, 10) << 20, blen = strtoul(argv[3], NULL, 10) << 20;
        char *a = map(alen);
        if (argc > 4) printf("hint=%d\n", usm_hint_range(a, alen, argv[4]));
        usleep(300000);
        fill(a, alen, 0xa);
        char *b = map(blen);
        usleep(100000);
        fill(b, blen, 0xb);
        fill(b, blen, 0xbb);
        printf("present=%zu of %zu\n", present(a, alen), alen / PG);
        if (check(a, alen, 0xa, "A") || check(b, blen, 0xbb, "B")) return 1;
        printf("OK\n");
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "free")) {
        size_t len = strtoul(argv[2], NULL, 10) << 20;
        char *p = map(len);
        usleep(300000);
        fill(p, len, 0xf);
        if (check(p, len, 0xf, "free")) return 1;
        if (munmap(p, len / 2)) { perror("munmap"); return 3; }
        if (madvise(p + len / 2, len / 2, MADV_DONTNEED)) { perror("madvise"); return 3; }
        char *q = map(len);
        usleep(300000);
        fill(q, len, 0xf2);
        if (check(q, len, 0xf2, "again")) return 1;
        printf("OK\n");
        return 0;
    }
    fprintf(stderr, "usage: polprobe touch MB [HINT] | deny AMB BMB [HINT] | free MB\n");
    return 2;
}
"#;

/// One test at a time: each fills a pool, and the CI machine has 2 vCPUs.
fn serial() -> usm_sync::MutexGuard<'static, ()> {
    static LOCK: usm_sync::Mutex<()> = usm_sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The target profile directory of this test binary (`target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds a cdylib of another package of the workspace next to the test binaries (cargo
/// does not build those for integration tests) and returns its path.
fn cdylib(package: &str, file: &str) -> PathBuf {
    let dir = profile_dir();
    let target = dir.parent().unwrap();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "-p", package]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build");
    assert!(st.success(), "cargo build -p {package}");
    let so = dir.join(file);
    assert!(so.exists(), "{} missing", so.display());
    so
}

/// `libusm_tagger.so` and `libusm.so`.
fn libraries() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        (
            cdylib("usm-tagger", "libusm_tagger.so"),
            cdylib("usm-capi", "libusm.so"),
        )
    })
}

/// One test's probe program, in a directory of its own, built under the serial lock.
struct Probe {
    dir: tempfile::TempDir,
    prog: PathBuf,
    _serial: usm_sync::MutexGuard<'static, ()>,
}

impl Probe {
    fn build() -> Probe {
        let _serial = serial();
        let dir = tempfile::tempdir().unwrap();
        let prog = probe(dir.path());
        Probe { dir, prog, _serial }
    }
}

/// Compiles the probe (linked with `libusm.so`; gcc required: `scripts/test` installs it).
fn probe(dir: &Path) -> PathBuf {
    let (_, libusm) = libraries();
    let libdir = libusm.parent().unwrap();
    let src = dir.join("polprobe.c");
    std::fs::write(&src, PROBE_C).unwrap();
    let out = dir.join("polprobe");
    let st = Command::new("gcc")
        .args(["-O1", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .arg(format!("-L{}", libdir.display()))
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-lusm")
        .status()
        .expect("gcc runs (scripts/test installs it)");
    assert!(
        st.success(),
        "gcc failed (is it installed? scripts/test installs it)"
    );
    out
}

/// A daemon in this process on `config` (a socket line is added), with a private swap
/// file in `dir`.
fn daemon(
    dir: &Path,
    config: &str,
    register: Option<usm_runtime::daemon::RegisterPolicies>,
) -> Daemon {
    let socket = dir.join("usm.sock");
    let text = format!("{config}\nworkers 1\nsocket {}\n", socket.display());
    let cfg = Config::parse(&text).expect("config");
    let opts = DaemonOptions {
        temp_swap_dir: dir.to_path_buf(),
        temp_swap_bytes: 128 << 20,
        register,
        ..DaemonOptions::default()
    };
    Daemon::start(&cfg, &opts).expect("daemon starts")
}

struct Run {
    stdout: String,
    status: std::process::ExitStatus,
    stat: ProcessStat,
}

/// Runs the probe tagged for `d`, waits for it (bounded) and for the daemon to record
/// its end; asserts it succeeded; returns its output and its final per-process stat.
fn run(d: &Daemon, prog: &Path, args: &[&str]) -> Run {
    let r = run_any(d, prog, args);
    assert!(
        r.status.success(),
        "probe {args:?} failed ({:?}): {}",
        r.status,
        r.stdout
    );
    r
}

/// [`run`] without the success check.
fn run_any(d: &Daemon, prog: &Path, args: &[&str]) -> Run {
    let (tagger, _) = libraries();
    let mut child = Command::new(prog)
        .args(args)
        .env("LD_PRELOAD", tagger)
        .env("USM_SOCKET", d.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the probe");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("probe {args:?} did not finish within 60 s: {:?}", d.stat());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = format!("{stdout}\n(stderr) {stderr}");
    let exited = Instant::now();
    let deadline = exited + Duration::from_secs(30);
    loop {
        let s = d.stat();
        if let Some(p) = s.ended.iter().find(|p| p.pid == pid) {
            if exited.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "the daemon saw pid {pid} end {:?} after it did",
                    exited.elapsed()
                );
            }
            return Run {
                stdout,
                status: out.status,
                stat: p.clone(),
            };
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never saw pid {pid} ({stdout} {stderr}) end: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An allocation policy that panics on every call.
struct PanicsOnAlloc;

impl AllocPolicy for PanicsOnAlloc {
    fn name(&self) -> &str {
        "panics-on-alloc"
    }

    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        let _taken = cx.take_frame(); // taken and never given back: the daemon reclaims it
        panic!("test policy: refusing the fault at {:#x}", fault.addr);
    }
}

/// An eviction policy that tracks nothing and panics when asked for victims.
struct PanicsOnVictims;

impl EvictPolicy for PanicsOnVictims {
    fn name(&self) -> &str {
        "panics-on-victims"
    }

    fn on_map(&mut self, _page: MappedPage, _cx: &mut dyn EvictCx) {}

    fn on_free(&mut self, _frame: usm_kmod::FrameNo) {}

    fn victims(
        &mut self,
        _req: VictimRequest,
        _cx: &mut dyn EvictCx,
        _out: &mut Vec<MappedPage>,
    ) -> VictimScan {
        panic!("test policy: no victims today");
    }

    fn tracked(&self) -> usize {
        0
    }
}

fn register_panicky(reg: &mut Registry) -> Result<(), PolicyError> {
    reg.register_alloc("panics-on-alloc", Param::None, |_| {
        Ok(Box::new(PanicsOnAlloc))
    })?;
    reg.register_evict("panics-on-victims", Param::None, |_| {
        Ok(Box::new(PanicsOnVictims))
    })
}

#[test]
fn a_panicking_allocation_policy_is_replaced_and_the_program_completes() {
    let Probe { dir, prog, _serial } = Probe::build();
    let d = daemon(
        dir.path(),
        "memory 64M\nprocess polprobe panics-on-alloc",
        Some(register_panicky),
    );
    let r = run(&d, &prog, &["touch", "8"]);
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    eprintln!(
        "panicking alloc: {} panics, policy now {}, {} faults",
        r.stat.policy_panics, r.stat.policy, r.stat.faults
    );
    assert!(r.stat.policy_panics >= 1, "{:?}", r.stat);
    // The default replaced it, and served every fault from then on.
    assert_eq!(r.stat.policy, "first-fit", "{:?}", r.stat);
    assert!(r.stat.faults >= 2048, "{:?}", r.stat);
    assert_eq!(r.stat.poisoned, 0);
    // Every frame came back, including the one the panicking call took.
    let s = d.stat();
    assert_eq!(s.frames_used, 0, "{s:?}");
    // The daemon keeps serving: a second program is served by a fresh policy instance
    // that panics again, and completes too.
    let r2 = run(&d, &prog, &["touch", "2"]);
    assert!(r2.stdout.contains("OK") && r2.stat.policy_panics >= 1);
    d.shutdown();
}

#[test]
fn a_panicking_eviction_policy_is_replaced_and_eviction_goes_on() {
    let Probe { dir, prog, _serial } = Probe::build();
    // 16 MiB of data through an 8 MiB pool: eviction must run.
    let d = daemon(
        dir.path(),
        "memory 8M\nevict panics-on-victims\nprocess polprobe first-fit",
        Some(register_panicky),
    );
    let r = run(&d, &prog, &["deny", "2", "14"]);
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    eprintln!(
        "panicking evict: {} panics, evict policy now {}, {} evictions, {} swap-ins",
        r.stat.policy_panics, r.stat.evict_policy, r.stat.evictions, r.stat.swapins
    );
    assert!(r.stat.policy_panics >= 1, "{:?}", r.stat);
    assert_eq!(r.stat.evict_policy, "fifo", "{:?}", r.stat);
    assert!(r.stat.evictions > 0 && r.stat.swapins > 0, "{:?}", r.stat);
    d.shutdown();
}

#[test]
fn fhp_maps_a_window_per_fault_where_first_fit_maps_a_page() {
    let Probe { dir, prog, _serial } = Probe::build();
    let d = daemon(dir.path(), "memory 64M\nprocess polprobe fhp:64K", None);
    let fhp = run(&d, &prog, &["touch", "16"]).stat;
    d.shutdown();
    let d = daemon(dir.path(), "memory 64M\nprocess polprobe first-fit", None);
    let ff = run(&d, &prog, &["touch", "16"]).stat;
    d.shutdown();
    eprintln!(
        "fhp:64K: {} faults, {} fhp pages; first-fit: {} faults, {} fhp pages",
        fhp.faults, fhp.fhp_pages, ff.faults, ff.fhp_pages
    );
    // 4096 pages: fhp:64K maps 16 per fault (clipped at the range's ends).
    assert_eq!(fhp.policy, "fhp:64K");
    assert!(fhp.fhp_pages >= 3500, "fhp: {fhp:?}");
    assert!(fhp.faults < 1500, "fhp: {fhp:?}");
    assert_eq!(ff.fhp_pages, 0, "first-fit: {ff:?}");
    assert!(ff.faults >= 4096, "first-fit: {ff:?}");
}

#[test]
fn a_huge_hint_from_usm_hint_changes_the_fhp_window() {
    let Probe { dir, prog, _serial } = Probe::build();
    let d = daemon(dir.path(), "memory 64M\nprocess polprobe fhp:64K", None);
    let plain = run(&d, &prog, &["touch", "16"]).stat;
    let hinted = run(&d, &prog, &["touch", "16", "HUGE=4K"]);
    d.shutdown();
    assert!(hinted.stdout.contains("hint=0"), "{}", hinted.stdout);
    let h = hinted.stat;
    eprintln!(
        "fhp:64K plain: {} faults, {} fhp pages; HUGE=4K on half: {} faults, {} fhp pages",
        plain.faults, plain.fhp_pages, h.faults, h.fhp_pages
    );
    assert_eq!(h.hints, 1, "{h:?}");
    // The first half (2048 pages) is served a page per fault, the second half as before.
    assert!(
        h.faults >= plain.faults + 1800,
        "plain {plain:?}\nhinted {h:?}"
    );
    assert!(
        h.fhp_pages + 1700 <= plain.fhp_pages,
        "plain {plain:?}\nhinted {h:?}"
    );
    assert!(
        h.fhp_pages >= 1700,
        "the unhinted half keeps its window: {h:?}"
    );
}

#[test]
fn an_eviction_deny_hint_keeps_its_range_resident_under_the_hints_policy() {
    let Probe { dir, prog, _serial } = Probe::build();
    let present = |out: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix("present="))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no present= line in {out}"))
    };
    // A (2 MiB = 512 pages) is touched first, then 14 MiB of B twice through an 8 MiB
    // pool: oldest-first eviction takes A; `hints` with EVICTION=DENY on A must not.
    let d = daemon(
        dir.path(),
        "memory 8M\nevict hints\nprocess polprobe first-fit",
        None,
    );
    let denied = run(&d, &prog, &["deny", "2", "14", "EVICTION=DENY"]);
    d.shutdown();
    let d = daemon(
        dir.path(),
        "memory 8M\nevict fifo\nprocess polprobe first-fit",
        None,
    );
    let fifo = run(&d, &prog, &["deny", "2", "14"]);
    d.shutdown();
    eprintln!(
        "hints+DENY: A {}, {} evictions; fifo: A {}, {} evictions",
        denied.stdout.trim(),
        denied.stat.evictions,
        fifo.stdout.trim(),
        fifo.stat.evictions
    );
    assert!(denied.stdout.contains("OK") && fifo.stdout.contains("OK"));
    assert_eq!(denied.stat.evict_policy, "hints");
    assert!(denied.stat.evictions > 0, "{:?}", denied.stat);
    assert_eq!(present(&denied.stdout), 512, "{}", denied.stdout);
    assert!(present(&fifo.stdout) < 256, "{}", fifo.stdout);
    assert!(fifo.stat.evictions > 0, "{:?}", fifo.stat);
}

#[test]
fn a_busy_poll_waker_serves_a_program_and_stat_reports_it() {
    let Probe { dir, prog, _serial } = Probe::build();
    let d = daemon(
        dir.path(),
        "memory 64M\nwaker busy-poll\nprocess polprobe first-fit",
        None,
    );
    let s = d.stat();
    assert_eq!(s.waker, "spin", "{s:?}");
    assert_eq!(s.fault_runner, "workers", "{s:?}");
    // What `usm stat` prints is this struct as JSON: the fields are there by name.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["waker"], "spin");
    let r = run(&d, &prog, &["touch", "4"]);
    d.shutdown();
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    assert!(r.stat.faults >= 1024, "{:?}", r.stat);
}

/// Bytes the `counted-quota` policy was told were freed, per pid.
static FREED: usm_sync::Mutex<Vec<(u32, u64)>> = usm_sync::Mutex::new(Vec::new());

/// `quota:1024` that records every [`AllocPolicy::free`] it hears.
struct CountedQuota(Box<dyn AllocPolicy>);

impl AllocPolicy for CountedQuota {
    fn name(&self) -> &str {
        "counted-quota"
    }

    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        self.0.alloc(fault, cx)
    }

    fn free(
        &mut self,
        origin: usm_kmod::event::Origin,
        range: std::ops::Range<u64>,
        cx: &mut dyn Cx,
    ) {
        FREED
            .lock()
            .unwrap()
            .push((origin.pid, range.end - range.start));
        self.0.free(origin, range, cx);
    }
}

fn register_counted_quota(reg: &mut Registry) -> Result<(), PolicyError> {
    reg.register_alloc("counted-quota", Param::None, |_| {
        Ok(Box::new(CountedQuota(
            Registry::with_builtins().build_alloc("quota:1024")?,
        )))
    })
}

#[test]
fn unmap_and_remove_reach_the_allocation_policy_free() {
    let Probe { dir, prog, _serial } = Probe::build();
    let d = daemon(
        dir.path(),
        "memory 64M\nprocess polprobe counted-quota",
        Some(register_counted_quota),
    );
    // 3 MiB = 768 pages, given back (munmap half, DONTNEED half) before 768 more are
    // touched: at quota 1024 nothing needs evicting once the frees are counted.
    let r = run(&d, &prog, &["free", "3"]);
    d.shutdown();
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    let freed: u64 = FREED
        .lock()
        .unwrap()
        .iter()
        .filter(|(pid, _)| *pid == r.stat.pid)
        .map(|(_, bytes)| bytes)
        .sum();
    eprintln!(
        "counted-quota: {freed} bytes freed, {} unmaps, {} removes, {} evictions",
        r.stat.unmaps, r.stat.removes, r.stat.evictions
    );
    assert!(r.stat.unmaps >= 1 && r.stat.removes >= 1, "{:?}", r.stat);
    assert!(freed >= 3 << 20, "the policy heard of {freed} bytes freed");
    assert_eq!(r.stat.evictions, 0, "{:?}", r.stat);
}

#[test]
fn quota_evicts_the_process_own_pages_at_its_cap() {
    let Probe { dir, prog, _serial } = Probe::build();
    // The pool (64 MiB) never runs low: every eviction is the quota's own (Cx::evict).
    let d = daemon(dir.path(), "memory 64M\nprocess polprobe quota:1024", None);
    let r = run(&d, &prog, &["touch", "12"]);
    d.shutdown();
    eprintln!(
        "quota:1024, 3072 pages touched: {} evictions, {} swap-ins",
        r.stat.evictions, r.stat.swapins
    );
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    assert_eq!(r.stat.policy, "quota:1024");
    assert!(r.stat.evictions >= 1500, "{:?}", r.stat);
    assert!(
        r.stat.swapins >= 1500,
        "the check reads them back: {:?}",
        r.stat
    );
}

#[test]
fn the_oom_policy_fails_the_access_when_nothing_can_be_evicted() {
    use std::os::unix::process::ExitStatusExt;
    let Probe { dir, prog, _serial } = Probe::build();
    // 8 MiB, all EVICTION=DENY, through a 4 MiB pool: the evictor can take nothing, so
    // the OOM policy (`fail`) fails the access: SIGBUS, never zeros.
    let d = daemon(
        dir.path(),
        "memory 4M\nevict hints\noom fail\nprocess polprobe first-fit",
        None,
    );
    let r = run_any(&d, &prog, &["deny", "8", "1", "EVICTION=DENY"]);
    eprintln!(
        "all pages denied: status {:?}, {} poisoned, {} evictions",
        r.status, r.stat.poisoned, r.stat.evictions
    );
    assert_eq!(r.status.signal(), Some(libc::SIGBUS), "{}", r.stdout);
    assert!(r.stat.poisoned >= 1, "{:?}", r.stat);
    assert_eq!(r.stat.oom_policy, "fail");
    // The daemon keeps serving, and got every frame back.
    let ok = run(&d, &prog, &["touch", "2"]);
    assert!(ok.stdout.contains("OK"));
    assert_eq!(d.stat().frames_used, 0);
    d.shutdown();
}
