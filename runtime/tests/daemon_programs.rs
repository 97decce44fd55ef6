//! The InstanceUSM daemon on real programs: `usm exec` and `usm run` with the real
//! tagger, real userfaultfd, real swap files. Every program verifies its own data while
//! the pool is a fraction of its working set.
//!
//! Needs root-like privileges for `EVENT_FORK` and `process_vm_readv` (the CI runs as
//! root); tests skip with a reason when gcc, stressapptest or redis are absent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::daemon::{RunDaemon, USM};
use common::programs::{build_c, require, tagger, usm_exec};
use common::redis::{free_port, plain_redis, redis_cmd, redis_info, redis_server, wait_for_ping};

/// The programs here each fill a pool several times over: run them one at a time (the
/// CI machine has 2 vCPUs), so a slow neighbour never reads as a failure.
fn serial() -> usm_sync::MutexGuard<'static, ()> {
    static LOCK: usm_sync::Mutex<()> = usm_sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a test keeps while its program runs: the serial lock and the program's directory.
struct Keep {
    _dir: tempfile::TempDir,
    _serial: usm_sync::MutexGuard<'static, ()>,
}

/// Builds `tests/programs/NAME.c` in a directory of its own under the serial lock.
fn built(name: &str) -> (PathBuf, Keep) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_c(dir.path(), name);
    (prog, Keep { _dir: dir, _serial })
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn mixed_workload_keeps_its_data_with_a_pool_a_sixth_of_its_working_set() {
    let (prog, _keep) = built("daemon_workload");
    let p = prog.to_str().unwrap();
    // 48 MiB of data (plus heap and threads) through an 8 MiB pool.
    let r = usm_exec(
        &["--pool", "8M"],
        &[p, "mixed", "48", "nofork"],
        Duration::from_secs(90),
    );
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    assert!(r.report["managed"].as_bool().unwrap());
    assert!(n(&r.report, "evictions") > 1000, "{}", r.report);
    assert!(n(&r.report, "swapins") > 1000, "{}", r.report);
    assert_eq!(n(&r.report, "poisoned"), 0, "{}", r.describe());
    // Everything was given back when the program exited.
    assert_eq!(n(&r.report, "frames_used_at_exit"), 0, "{}", r.report);
    assert_eq!(n(&r.report, "slots_used_at_exit"), 0, "{}", r.report);
    assert!(
        r.report["coverage"].as_f64().unwrap() >= 0.9,
        "{}",
        r.report
    );
}

#[test]
fn fork_children_inherit_managed_memory() {
    let (prog, _keep) = built("daemon_workload");
    let p = prog.to_str().unwrap();
    let r = usm_exec(
        &["--pool", "32M"],
        &[p, "mixed", "16"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert!(r.stdout.contains("OK"));
    assert!(n(&r.report, "forks") >= 1, "{}", r.report);
    assert_eq!(n(&r.report, "frames_used_at_exit"), 0, "{}", r.report);
}

/// A fork child reading a dataset four times the pool (a redis `BGSAVE` child does
/// this) holds its swap-ins as frames of the budget, and its own eviction agent takes
/// them out again: its resident anonymous memory stays near the pool instead of growing
/// to the whole dataset (131 MiB of 128 MiB data when its swap-ins were the kernel's;
/// 53–60 MiB adopted: its frames plus pages still shared with the parent). Every byte
/// is checked twice by the child, then by the parent.
#[test]
fn fork_children_reading_everything_stay_within_the_budget() {
    let (prog, _keep) = built("fork_reader");
    let r = usm_exec(
        &["--pool", "32M"],
        &[prog.to_str().unwrap(), "128"],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    let rss_kb = rss_anon_kb(&r, "CHILD");
    assert!(
        rss_kb < 96 * 1024,
        "the child holds {rss_kb} KiB of a 128 MiB dataset through a 32 MiB pool: its \
         swap-ins were not evicted"
    );
    assert!(n(&r.report, "forks") >= 1, "{}", r.report);
    assert_eq!(n(&r.report, "poisoned"), 0, "{}", r.describe());
    assert_eq!(n(&r.report, "frames_used_at_exit"), 0, "{}", r.report);
    assert_eq!(n(&r.report, "slots_used_at_exit"), 0, "{}", r.report);
}

/// The `TAG rss_anon_kb=N` line a test program printed (`rss_anon_kb()` of check.h).
fn rss_anon_kb(r: &common::programs::ExecRun, tag: &str) -> u64 {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{tag} rss_anon_kb=")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {tag} rss_anon_kb line: {}", r.stdout))
}

/// `MAP_POPULATE` on a managed mapping: the kernel would fill all 64 MiB before the tagger
/// registers the range, pages outside the budget the daemon never sees (64 MiB resident
/// through an 8 MiB pool). The tagger drops the flag for managed mappings, so the pages
/// fault in through the daemon; every byte is verified twice.
#[test]
fn map_populate_does_not_fill_a_managed_mapping_past_the_budget() {
    let (prog, _keep) = built("populate");
    let r = usm_exec(
        &["--pool", "8M"],
        &[prog.to_str().unwrap(), "64"],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert!(r.stdout.contains("OK"), "{}", r.stdout);
    let kb = |tag: &str| rss_anon_kb(&r, tag);
    assert!(
        kb("MAPPED") < 16 * 1024,
        "{} KiB resident right after mmap(64 MiB, MAP_POPULATE) with an 8 MiB pool",
        kb("MAPPED")
    );
    assert!(
        kb("END") < 24 * 1024,
        "{} KiB resident after writing 64 MiB through an 8 MiB pool",
        kb("END")
    );
    assert!(n(&r.report, "evictions") > 8192, "{}", r.report);
    assert_eq!(n(&r.report, "poisoned"), 0, "{}", r.describe());
    assert_eq!(n(&r.report, "frames_used_at_exit"), 0, "{}", r.report);
    assert_eq!(n(&r.report, "slots_used_at_exit"), 0, "{}", r.report);
}

/// Forks again and again while eviction runs: the working set is four times the pool,
/// two threads keep faulting and being evicted at every fork, and each child verifies
/// the parent's data as of its fork (much of it in swap) and writes its own copy.
/// Used to hang: after a fork every page of the parent was shared copy-on-write, the
/// agent's moves all failed (`EBUSY`), and the child's swap-ins filled the pool with
/// pages nobody could evict, so every fault waited for a frame.
#[test]
fn repeated_forks_under_eviction_finish_with_correct_data() {
    let (prog, _keep) = built("fork_storm");
    // 16 MiB of data + 2 × 8 MiB rewritten by threads, through an 8 MiB pool.
    let r = usm_exec(
        &["--pool", "8M"],
        &[prog.to_str().unwrap(), "16", "4"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert!(!r.stdout.contains("BAD"), "{}", r.stdout);
    assert!(
        r.stdout.contains("FORK 3") && r.stdout.contains("OK"),
        "{}",
        r.stdout
    );
    assert!(n(&r.report, "forks") >= 4, "{}", r.report);
    assert!(n(&r.report, "evictions") > 4096, "{}", r.report);
    assert!(n(&r.report, "swapins") > 4096, "{}", r.report);
    assert_eq!(n(&r.report, "poisoned"), 0, "{}", r.describe());
    assert_eq!(n(&r.report, "frames_used_at_exit"), 0, "{}", r.report);
    assert_eq!(n(&r.report, "slots_used_at_exit"), 0, "{}", r.report);
}

#[test]
fn own_userfaultfd_and_shared_memory_still_work() {
    let (prog, _keep) = built("daemon_workload");
    let r = usm_exec(
        &["--pool", "4M"],
        &[prog.to_str().unwrap(), "own-uffd"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert!(r.stdout.contains("OK"));
    assert!(n(&r.report, "faults") > 0);
}

#[test]
fn stressapptest_passes_with_memory_four_times_the_pool() {
    let _serial = serial();
    require("stressapptest");
    let r = usm_exec(
        &["--pool", "16M"],
        &["stressapptest", "-M", "64", "-s", "5", "-m", "2"],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains("Status: PASS"), "{}", r.stdout);
    assert!(n(&r.report, "evictions") > 0 && n(&r.report, "swapins") > 0);
    assert!(
        r.report["coverage"].as_f64().unwrap() >= 0.9,
        "{}",
        r.report
    );
}

/// Runs `cmd` tagged for daemon `d` (LD_PRELOAD of the tagger, its socket), all pipes.
fn tagged(d: &RunDaemon, cmd: &mut Command) -> Child {
    cmd.env("LD_PRELOAD", tagger())
        .env("USM_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn read_line_until(out: &mut impl BufRead, want: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("EOF before {want:?}; got {all}");
        }
        all.push_str(&line);
        if line.contains(want) {
            return all;
        }
        assert!(Instant::now() < deadline, "no {want:?} in time; got {all}");
    }
}

#[test]
fn sigkilled_program_leaves_frames_and_slots_idle() {
    let (prog, _keep) = built("daemon_workload");
    let d = RunDaemon::start("memory 2048\nworkers 2\nprocess daemon_workload first-fit");
    let mut c = tagged(&d, Command::new(&prog).args(["storm", "32", "30"]));
    let mut out = BufReader::new(c.stdout.take().unwrap());
    read_line_until(&mut out, "STARTED", Duration::from_secs(20));
    // Mid-storm: some pages out, some in.
    d.wait_for("a storm", Duration::from_secs(20), |s| {
        s["processes"][0]["evictions"].as_u64().unwrap_or(0) > 500
    });
    c.kill().unwrap();
    c.wait().unwrap();
    let s = d.wait_for("idle frames and slots", Duration::from_secs(10), |s| {
        s["processes"].as_array().unwrap().is_empty()
            && s["frames_used"] == 0
            && s["slots_used"] == 0
    });
    assert_eq!(s["frames_used"], 0);
    let (code, err) = d.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn sigkilled_daemon_never_lets_a_program_read_zeros() {
    let (prog, _keep) = built("daemon_workload");
    let mut d = RunDaemon::start("memory 2048\nworkers 2\nprocess daemon_workload first-fit");
    let mut c = tagged(&d, Command::new(&prog).args(["storm", "32", "4"]));
    let mut out = BufReader::new(c.stdout.take().unwrap());
    read_line_until(&mut out, "STARTED", Duration::from_secs(20));
    d.wait_for("pages in swap", Duration::from_secs(20), |s| {
        s["processes"][0]["swapped_pages"].as_u64().unwrap_or(0) > 500
    });
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // The program either dies with the tagger's message or finishes with its data intact.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "program hung after the daemon died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!rest.contains("BAD"), "the program read wrong data: {rest}");
    if status.success() {
        assert!(rest.contains("OK"), "{rest}");
    } else {
        assert!(
            err.contains("killing it rather than let it read zeros"),
            "status {status:?}, stderr: {err}"
        );
    }
}

#[test]
fn madv_free_gives_frames_back() {
    let (prog, _keep) = built("daemon_workload");
    let d = RunDaemon::start("memory 16384\nworkers 2\nprocess daemon_workload first-fit");
    let mut c = tagged(&d, Command::new(&prog).args(["free", "16"]));
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut input = c.stdin.take().unwrap();
    read_line_until(&mut out, "TOUCHED", Duration::from_secs(20));
    let before = d.wait_for("16 MiB resident", Duration::from_secs(5), |s| {
        s["processes"][0]["resident_pages"].as_u64().unwrap_or(0) >= 4096
    });
    let resident_before = before["processes"][0]["resident_pages"].as_u64().unwrap();
    writeln!(input).unwrap();
    read_line_until(&mut out, "FREED", Duration::from_secs(20));
    // The REMOVE event is read before madvise returns, but handled just after: wait for
    // its effect rather than for the counter alone.
    let after = d.wait_for("MADV_FREE accounted", Duration::from_secs(5), |s| {
        let p = &s["processes"][0];
        p["removes"].as_u64().unwrap_or(0) >= 1
            && p["resident_pages"].as_u64().unwrap_or(u64::MAX) + 4096 <= resident_before
    });
    let p = &after["processes"][0];
    assert!(
        p["resident_pages"].as_u64().unwrap() + 4096 <= resident_before,
        "MADV_FREE did not give the frames back: {p}"
    );
    assert!(p["released_frames"].as_u64().unwrap() >= 4096, "{p}");
    writeln!(input).unwrap();
    read_line_until(&mut out, "OK", Duration::from_secs(20));
    assert!(c.wait().unwrap().success());
    drop(d);
}

#[test]
fn unconfigured_programs_run_untouched_and_shutdown_is_graceful() {
    let (prog, _keep) = built("daemon_workload");
    let d = RunDaemon::start("memory 1024\nworkers 1\nprocess somebody-else first-fit");
    let mut c = tagged(&d, Command::new(&prog).args(["mixed", "8", "nofork"]));
    let st = c.wait().unwrap();
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(st.success() && out.contains("OK"), "{out}{err}");
    assert!(err.contains("refused"), "one warning line expected: {err}");
    let s = d.stat().unwrap();
    assert!(s["refused"].as_u64().unwrap() >= 1);
    assert!(s["processes"].as_array().unwrap().is_empty());
    // A managed program survives a daemon SIGTERM with its data: pages come back first.
    let d2 = RunDaemon::start("memory 2048\nworkers 2\nprocess daemon_workload first-fit");
    let mut c = tagged(&d2, Command::new(&prog).args(["storm", "32", "5"]));
    let mut out = BufReader::new(c.stdout.take().unwrap());
    read_line_until(&mut out, "STARTED", Duration::from_secs(20));
    d2.wait_for("pages in swap", Duration::from_secs(20), |s| {
        s["processes"][0]["swapped_pages"].as_u64().unwrap_or(0) > 500
    });
    let (code, err) = d2.stop();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("page(s) returned"), "{err}");
    let all = read_line_until(&mut out, "OK", Duration::from_secs(60));
    assert!(!all.contains("BAD"), "{all}");
    assert!(c.wait().unwrap().success());
    drop(d);
}

#[test]
fn redis_data_survives_swap_and_metrics_match_stat() {
    let _serial = serial();
    require("redis-server");
    require("redis-cli");
    let port = free_port();
    let mport = free_port();
    let d = RunDaemon::start(&format!(
        "memory 4096\nworkers 2\nprocess redis-server first-fit\nmetrics 127.0.0.1:{mport}"
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut r = tagged(
        &d,
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--enable-debug-command",
                "yes",
                "--dir",
            ])
            .arg(dir.path()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cmd(port, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // ~48 MiB of values through a 16 MiB pool.
    assert_eq!(
        redis_cmd(port, &["DEBUG", "POPULATE", "150000", "key", "300"]),
        "OK"
    );
    let digest = redis_cmd(port, &["DEBUG", "DIGEST"]);
    let s = d.wait_for("redis pages in swap", Duration::from_secs(20), |s| {
        s["processes"][0]["swapped_pages"].as_u64().unwrap_or(0) > 4096
    });
    assert!(s["processes"][0]["evictions"].as_u64().unwrap() > 4096);
    // Read everything back (the digest walks every value).
    assert_eq!(redis_cmd(port, &["DEBUG", "DIGEST"]), digest);
    let v = redis_cmd(port, &["GET", "key:12345"]);
    assert!(v.starts_with("value:12345"), "{v}");
    let s = d.stat().unwrap();
    assert!(s["processes"][0]["swapins"].as_u64().unwrap() > 1000, "{s}");
    // Prometheus exposition: the same numbers.
    let mut conn = TcpStream::connect(("127.0.0.1", mport)).unwrap();
    write!(conn, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert!(text.contains("200 OK"), "{text}");
    assert!(
        text.contains(&format!("usm_pool_pages {}", s["pool_pages"])),
        "{text}"
    );
    assert!(text.contains("usm_process_swapins_total{"), "{text}");
    assert!(text.contains("name=\"redis-server\""), "{text}");
    let _ = redis_cmd(port, &["SHUTDOWN", "NOSAVE"]);
    let _ = r.wait();
    drop(d);
}

/// The BGSAVE test: most of a managed redis-server's dataset is in swap when
/// it forks its RDB child; the child inherits those pages through the daemon's
/// reference-counted slots and writes an RDB that a plain redis-server (no USM) loads
/// to the digest of the same dataset built by a plain redis-server (`DEBUG POPULATE` is
/// deterministic; computing the reference outside USM also catches data the managed
/// server itself would have lost before the fork).
#[test]
fn redis_bgsave_with_the_dataset_in_swap_writes_a_correct_rdb() {
    let _serial = serial();
    require("redis-server");
    require("redis-cli");
    let dir = tempfile::tempdir().unwrap();
    let server = |port: u16, rdb: &str| redis_server(dir.path(), port, rdb);
    let plain = |port: u16, rdb: &str| plain_redis(dir.path(), port, rdb);
    // ~34 MiB of keys and values (about 8600 pages) through an 8 MiB pool.
    let populate = ["DEBUG", "POPULATE", "80000", "key", "300"];
    // The reference digest, from a plain redis-server.
    let ref_port = free_port();
    let mut reference = plain(ref_port, "reference.rdb");
    assert!(
        wait_for_ping(ref_port, Duration::from_secs(10)),
        "redis on {} did not answer",
        ref_port
    );
    assert_eq!(redis_cmd(ref_port, &populate), "OK");
    let digest = redis_cmd(ref_port, &["DEBUG", "DIGEST"]);
    let _ = redis_cmd(ref_port, &["SHUTDOWN", "NOSAVE"]);
    let _ = reference.wait();
    assert_eq!(digest.len(), 40, "{digest}");

    let d = RunDaemon::start("memory 2048\nworkers 2\nprocess redis-server first-fit");
    let port = free_port();
    let mut r = tagged(&d, &mut server(port, "bgsave.rdb"));
    assert!(
        wait_for_ping(port, Duration::from_secs(10)),
        "redis on {} did not answer",
        port
    );
    assert_eq!(redis_cmd(port, &populate), "OK");
    // Most of the dataset in swap before the fork.
    let s = d.wait_for("most of redis in swap", Duration::from_secs(20), |s| {
        let p = &s["processes"][0];
        let out = p["swapped_pages"].as_u64().unwrap_or(0);
        out > 4096 && out > 2 * p["resident_pages"].as_u64().unwrap_or(u64::MAX)
    });
    let before = s["processes"][0].clone();
    let t0 = Instant::now();
    assert!(redis_cmd(port, &["BGSAVE"]).contains("Background saving started"));
    let deadline = t0 + Duration::from_secs(60);
    while redis_info(port, "rdb_bgsave_in_progress").as_deref() != Some("0") {
        assert!(Instant::now() < deadline, "BGSAVE did not finish in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        redis_info(port, "rdb_last_bgsave_status").as_deref(),
        Some("ok")
    );
    eprintln!(
        "BGSAVE with {} of {} pages in swap took {:?}",
        before["swapped_pages"],
        n(&before, "swapped_pages") + n(&before, "resident_pages"),
        t0.elapsed()
    );
    let s = d.stat().unwrap();
    let forks: u64 = s["processes"]
        .as_array()
        .unwrap()
        .iter()
        .chain(s["ended"].as_array().unwrap())
        .map(|p| p["forks"].as_u64().unwrap_or(0))
        .sum();
    assert!(forks >= 1, "the daemon saw no fork: {s}");
    // The parent still has its data (a sample: the digest above covers the whole set).
    for k in [0, 12345, 40000, 79999] {
        let v = redis_cmd(port, &["GET", &format!("key:{k}")]);
        assert!(v.starts_with(&format!("value:{k}")), "key:{k} = {v:?}");
    }
    let _ = redis_cmd(port, &["SHUTDOWN", "NOSAVE"]);
    let _ = r.wait();
    drop(d);
    // A plain redis-server loads the RDB to the reference digest.
    let load_port = free_port();
    let mut loader = plain(load_port, "bgsave.rdb");
    assert!(
        wait_for_ping(load_port, Duration::from_secs(30)),
        "redis on {} did not answer",
        load_port
    );
    let loaded = redis_cmd(load_port, &["DBSIZE"]);
    let loaded_digest = redis_cmd(load_port, &["DEBUG", "DIGEST"]);
    let _ = redis_cmd(load_port, &["SHUTDOWN", "NOSAVE"]);
    let _ = loader.wait();
    assert_eq!(loaded, "80000");
    assert_eq!(
        loaded_digest, digest,
        "the RDB does not load to the same data"
    );
}

/// `usm exec` blocks SIGINT/SIGTERM for its signalfd; the program must not inherit that
/// mask, or the SIGTERM usm forwards (and Ctrl-C) never reaches it.
#[test]
fn usm_exec_forwards_sigterm_to_the_program() {
    let _serial = serial();
    let mut child = Command::new(USM)
        .args(["exec", "--report", "json", "--", "sleep", "60"])
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run usm exec");
    // Wait until usm has started the program (a `sleep` whose parent is usm).
    let usm_pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let sleep_pid = loop {
        let ps = Command::new("pgrep")
            .args(["-P", &usm_pid, "sleep"])
            .output()
            .expect("pgrep");
        if ps.status.success() {
            break String::from_utf8_lossy(&ps.stdout).trim().to_owned();
        }
        assert!(Instant::now() < deadline, "usm exec never started sleep");
        std::thread::sleep(Duration::from_millis(20));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-9", &sleep_pid]).status();
            let _ = child.kill();
            let _ = child.wait();
            panic!("the program did not die of the forwarded SIGTERM within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The exit code is the program's: killed by SIGTERM = 128 + 15.
    assert_eq!(status.code(), Some(143), "usm exit status {status:?}");
}
