//! Real C programs run with `LD_PRELOAD=libusm_tagger.so` against a daemon played by
//! the test (`usm_proto::server` + a real userfaultfd fault server).
//!
//! The cdylibs are built by the tests themselves (`cargo build -p usm-tagger -p
//! usm-capi` with this test's cargo, target dir and profile), so `cargo test` from a
//! clean checkout works.

mod support;

use usm_sync::atomic::Ordering;

use support::*;
use usm_proto::{Message, RangeKind, RefusalReason};

fn warning_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("usm-tagger:"))
        .collect()
}

/// What must outlive a managed workload's test: its daemon and the directory of its binary.
struct Keep {
    _daemon: TestDaemon,
    _work: tempfile::TempDir,
}

/// The workload running with `args` under a fresh test daemon that admitted and serves it;
/// `None` (the reason printed) where this machine has no userfaultfd.
fn managed_workload(args: &[&str]) -> Option<(Program, Served, Keep)> {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    let tagger = tagger_so();
    let work = tempfile::tempdir().unwrap();
    let bin = compile(work.path(), "workload", &[]);
    let daemon = TestDaemon::new();
    let program = Program::spawn(&bin, args, &tagger, &daemon.socket());
    let served = daemon.accept_and_serve();
    let keep = Keep {
        _daemon: daemon,
        _work: work,
    };
    Some((program, served, keep))
}

#[test]
fn tagged_program_is_managed_and_keeps_its_data() {
    let Some((mut program, served, _keep)) = managed_workload(&["full", "pause"]) else {
        return;
    };
    assert_eq!(served.pid, program.child.id());
    assert_eq!(served.name, "workload");

    let before_peak = program.read_until("PEAK");
    // Coverage as the daemon sees it: ask the tagger over the protocol (kernel numbers
    // from /proc/self/smaps: VMAs flagged `um` over all anonymous memory).
    served.stream.send(&Message::CoverageRequest).unwrap();
    let Message::Coverage {
        managed_anon_bytes,
        anon_bytes,
    } = served.wait_for("Coverage", |m| matches!(m, Message::Coverage { .. }))
    else {
        unreachable!()
    };
    let ratio = managed_anon_bytes as f64 / anon_bytes as f64;
    eprintln!("coverage at peak: {managed_anon_bytes} / {anon_bytes} = {ratio:.4}");
    assert!(
        anon_bytes > 60 << 20,
        "the workload should hold > 60 MiB anonymous at its peak, smaps says {anon_bytes}"
    );
    assert!(
        ratio >= 0.90,
        "coverage {ratio:.3} ({managed_anon_bytes} of {anon_bytes} anonymous bytes) is below 90%"
    );
    // And from outside, straight from the kernel.
    let outside = usm_proto::coverage::Coverage::of_pid(served.pid).unwrap();
    assert!(outside.ratio() >= 0.90, "outside view: {outside:?}");
    // Shared memory (MAP_SHARED anonymous, memfd) and the main stack stay with the kernel.
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", served.pid)).unwrap();
    let mut kernel_only = 0;
    let mut header = "";
    for line in smaps.lines() {
        if line.starts_with("VmFlags:") {
            if ["memfd:workload", "/dev/zero", "[stack]"]
                .iter()
                .any(|n| header.contains(n))
            {
                kernel_only += 1;
                assert!(
                    !line.split_whitespace().any(|f| f == "um"),
                    "{header} must not be registered"
                );
            }
        } else if !line.split_whitespace().next().unwrap_or("").ends_with(':') {
            header = line;
        }
    }
    assert_eq!(
        kernel_only, 3,
        "expected the memfd, shared anonymous and stack VMAs in:\n{smaps}"
    );
    // The program's own report agrees that it is managed.
    let peak = before_peak
        .iter()
        .find(|l| l.starts_with("COVERAGE peak"))
        .unwrap();
    let (managed, anon, mode) = parse_coverage(peak).unwrap();
    assert_eq!(mode, 1, "tagger mode at peak: {peak}");
    assert!(managed as f64 >= 0.9 * anon as f64, "{peak}");

    program.resume();
    let (status, out, err) = program.finish();
    assert!(
        status.success(),
        "workload failed: {status:?}\nstdout: {out}\nstderr: {err}"
    );
    assert!(out.contains("OK"), "{out}");
    assert!(
        warning_lines(&err).is_empty(),
        "a managed program prints nothing: {err}"
    );

    let stats = &served.faults.stats;
    eprintln!("fault server: {stats:?}");
    let faults = stats.faults.load(Ordering::Relaxed);
    assert!(faults > 10_000, "the daemon served only {faults} faults");
    assert!(stats.copies.load(Ordering::Relaxed) > 0);
    assert!(
        stats.forks.load(Ordering::Relaxed) >= 1,
        "EVENT_FORK must reach the daemon"
    );
    assert!(
        stats.remaps.load(Ordering::Relaxed) >= 1,
        "mremap of a managed range"
    );
    assert!(
        stats.removes.load(Ordering::Relaxed) >= 1,
        "madvise(DONTNEED)"
    );
    assert!(stats.unmaps.load(Ordering::Relaxed) >= 1, "munmap");
    served.faults.stop();
    let notices = served.drain();
    assert!(
        notices.iter().any(|m| matches!(
            m,
            Message::RegisterRange {
                kind: RangeKind::Heap,
                ..
            }
        )),
        "heap segments are announced"
    );
    assert!(
        notices.iter().any(|m| matches!(
            m,
            Message::RegisterRange {
                kind: RangeKind::Mmap,
                ..
            }
        )),
        "direct mmaps are announced"
    );
    assert!(
        notices
            .iter()
            .any(|m| matches!(m, Message::UnregisterRange { .. }))
    );
    // The forked child attached on its own and its new memory was managed there.
    assert!(
        before_peak.iter().any(|l| l == "CHILD_MODE 1"),
        "{before_peak:?}"
    );
    let children = served.children.lock().unwrap();
    let child = children
        .iter()
        .find(|c| c.pid != served.pid)
        .expect("the forked child said Hello");
    assert_eq!(child.name, "workload");
    let child_faults = child.faults.stats.faults.load(Ordering::Relaxed);
    assert!(
        child_faults >= 1280,
        "the child's 5 MiB block faulted {child_faults} times on its own userfaultfd"
    );
}

#[test]
fn daemon_absent_one_warning_and_the_program_runs() {
    let tagger = tagger_so();
    let work = tempfile::tempdir().unwrap();
    let bin = compile(work.path(), "workload", &[]);
    let missing = work.path().join("no-daemon.sock");
    let program = Program::spawn(&bin, &["full"], &tagger, &missing);
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"));
    let warnings = warning_lines(&err);
    assert_eq!(warnings.len(), 1, "exactly one warning line, got: {err}");
    assert!(warnings[0].contains("no USM daemon") && warnings[0].contains("running unmanaged"));
    let end = out.lines().find(|l| l.starts_with("COVERAGE end")).unwrap();
    let (managed, _, mode) = parse_coverage(end).unwrap();
    assert_eq!((managed, mode), (0, 2), "unmanaged: {end}");
    assert!(
        out.contains("CHILD_MODE 2"),
        "an unmanaged parent's child stays unmanaged: {out}"
    );
}

#[test]
fn refused_program_runs_unmanaged_with_one_warning() {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    let tagger = tagger_so();
    let work = tempfile::tempdir().unwrap();
    let bin = compile(work.path(), "workload", &[]);
    let daemon = TestDaemon::new();
    let program = Program::spawn(&bin, &["small"], &tagger, &daemon.socket());
    let peer = daemon.accept();
    peer.refuse(
        RefusalReason::NotConfigured,
        "no process rule names workload",
    )
    .unwrap();
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    let warnings = warning_lines(&err);
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("refused") && warnings[0].contains("no process rule"),
        "{err}"
    );
}

#[test]
fn daemon_death_with_swapped_pages_kills_the_program() {
    let Some((mut program, served, _keep)) = managed_workload(&["full", "pause"]) else {
        return;
    };
    program.read_until("PEAK");
    served
        .stream
        .send(&Message::SwapState { swapped_pages: 12 })
        .unwrap();
    // Make sure the tagger has seen the state before the daemon dies.
    served.stream.send(&Message::CoverageRequest).unwrap();
    served.wait_for("Coverage", |m| matches!(m, Message::Coverage { .. }));
    served.die();
    // stdin stays open: only the tagger's kill can end the program.
    let (status, out, err) = program.wait_without_resuming(std::time::Duration::from_secs(20));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{status:?}\n{out}\n{err}"
    );
    assert!(!out.contains("OK"));
    assert!(
        err.contains("FATAL")
            && err.contains("12 swapped-out page(s)")
            && err.contains("rather than let it read zeros"),
        "{err}"
    );
}

#[test]
fn daemon_death_with_nothing_swapped_continues_unmanaged() {
    let Some((mut program, served, _keep)) = managed_workload(&["full", "pause"]) else {
        return;
    };
    program.read_until("PEAK");
    served
        .stream
        .send(&Message::SwapState { swapped_pages: 0 })
        .unwrap();
    served.die();
    // The second phase frees, reallocates and re-verifies everything without a daemon.
    program.resume();
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"));
    let warnings = warning_lines(&err);
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("continuing unmanaged"), "{err}");
    let end = out.lines().find(|l| l.starts_with("COVERAGE end")).unwrap();
    let (managed, _, mode) = parse_coverage(end).unwrap();
    assert_eq!(mode, 2, "{end}");
    assert_eq!(
        managed, 0,
        "every range was unregistered by the kernel: {end}"
    );
}

#[test]
fn daemon_death_while_threads_wait_inside_malloc() {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    // Threads fault (or wait for an UNMAP event) inside malloc/free, holding the heap
    // lock, when the daemon stops serving and then dies: the tagger must detach without
    // needing the heap, and every thread must continue on kernel memory.
    let tagger = tagger_so();
    let work = tempfile::tempdir().unwrap();
    let bin = compile(work.path(), "workload", &[]);
    let daemon = TestDaemon::new();
    let program = Program::spawn(&bin, &["churn"], &tagger, &daemon.socket());
    let served = daemon.accept_and_serve();
    std::thread::sleep(std::time::Duration::from_millis(300));
    served.stop_serving();
    std::thread::sleep(std::time::Duration::from_millis(300));
    served.die();
    let (status, out, err) = program.wait_without_resuming(std::time::Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"), "{out}");
    let warnings = warning_lines(&err);
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("continuing unmanaged"), "{err}");
}

#[test]
fn program_with_its_own_userfaultfd_still_works() {
    let Some((program, served, _keep)) = managed_workload(&["own-uffd"]) else {
        return;
    };
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"), "{out}");
    served.faults.stop();
}

#[test]
fn usm_hint_reaches_the_daemon() {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    let tagger = tagger_so();
    let libusm = libusm_so();
    let work = tempfile::tempdir().unwrap();
    let include = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../capi/include");
    let libdir = libusm.parent().unwrap().to_str().unwrap().to_owned();
    let bin = compile(
        work.path(),
        "hint",
        &[
            &format!("-I{}", include.display()),
            &format!("-L{libdir}"),
            &format!("-Wl,-rpath,{libdir}"),
            "-lusm",
        ],
    );
    let daemon = TestDaemon::new();
    let program = Program::spawn(&bin, &[], &tagger, &daemon.socket());
    let served = daemon.accept_and_serve();
    let mut hints = Vec::new();
    for _ in 0..8 {
        let Message::Hint { addr, len, text } =
            served.wait_for("Hint", |m| matches!(m, Message::Hint { .. }))
        else {
            unreachable!()
        };
        hints.push((addr, len, text));
    }
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    served.faults.stop();
    let at = |name: &str| -> u64 {
        let v = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=0x")))
            .unwrap_or_else(|| panic!("{name} in {out}"));
        u64::from_str_radix(v, 16).unwrap()
    };
    let mib = 1u64 << 20;
    // 1: the whole mapping of `a` (an interior address), not the VMA merged with `b`.
    assert_eq!(hints[0].0, at("a"), "{hints:?}\n{out}");
    assert_eq!(hints[0].1, mib, "{hints:?}");
    assert_eq!(
        at("b"),
        at("a") + mib,
        "the two mappings are neighbours\n{out}"
    );
    assert_eq!(hints[0].2, "PRIORITY=HIGH; EVICTION=DENY");
    // 2: the large block, from its pointer to the end of its mapping.
    assert_eq!(hints[1].0, at("big"), "{hints:?}");
    assert!((3 * mib..3 * mib + 8192).contains(&hints[1].1), "{hints:?}");
    // 3: the pages of a small block.
    let small = at("small");
    assert_eq!(hints[2].0, small & !4095, "{hints:?}");
    assert!(hints[2].1 == 4096 || hints[2].1 == 8192, "{hints:?}");
    // 4: the explicit range as given.
    assert_eq!((hints[3].0, hints[3].1), (at("buf"), mib), "{hints:?}");
    // 5: a refused hint still reaches the daemon (which counts it), on a's mapping.
    assert_eq!(
        (hints[4].0, hints[4].2.as_str()),
        (at("a"), "cold"),
        "{hints:?}"
    );
    // 6, 7: a hole punched in `a` splits its extent.
    assert_eq!((hints[5].0, hints[5].1), (at("a"), mib / 4), "{hints:?}");
    assert_eq!(
        (hints[6].0, hints[6].1),
        (at("a") + mib / 2, mib / 2),
        "{hints:?}"
    );
    // 8: `b` moved with mremap: its extent moved with it.
    assert_eq!((hints[7].0, hints[7].1), (at("moved"), mib), "{hints:?}");
    assert!(
        out.contains(
            "a=0 big=0 small=0 range=0 cold=-22/22 null=-22 empty=-22 unmapped=-12 \
             front=0 back=0 moved=0"
        ),
        "{out}"
    );

    // Without the tagger, usm_hint says ENOTCONN.
    let out = std::process::Command::new(&bin).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("a={} ", -libc::ENOTCONN)),
        "{stdout}"
    );
}

/// Expected word `i` of a buffer filled by the workload's `fill(seed)`.
fn pattern_word(seed: u64, i: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i)
}

fn collect(
    agent: &mut usm_proto::agent::AgentClient,
    n: usize,
) -> Vec<usm_proto::agent::AgentCompletion> {
    let mut done = Vec::new();
    while done.len() < n {
        assert!(agent.wait_done(20_000).unwrap(), "agent did not answer");
        done.extend(agent.completions());
    }
    done
}

/// The `BUF <hex addr> <pages>` line the workload prints before it stops.
fn buffer_of(lines: &[String]) -> (u64, u64) {
    let line = lines
        .iter()
        .find(|l| l.starts_with("BUF "))
        .expect("a BUF line");
    let mut words = line.split_whitespace().skip(1);
    let buf = u64::from_str_radix(words.next().unwrap(), 16).unwrap();
    let pages = words.next().map_or(0, |w| w.parse().unwrap());
    (buf, pages)
}

/// One agent request, kicked; returns its result.
fn agent_op(
    agent: &mut usm_proto::agent::AgentClient,
    op: usm_proto::agent::AgentOp,
    slot: u32,
    addr: u64,
    pages: u64,
    seq: u64,
) -> i64 {
    agent
        .submit(usm_proto::agent::AgentRequest {
            op,
            slot,
            addr,
            pages,
            seq,
        })
        .unwrap();
    agent.kick().unwrap();
    collect(agent, 1)[0].result
}

/// Evicts pages `0..pages` of `buf` one by one into staging slots `0..pages`; asserts
/// every move succeeded (`why` names the case).
fn evict_each(
    agent: &mut usm_proto::agent::AgentClient,
    buf: u64,
    pages: u64,
    seq0: u64,
    why: &str,
) {
    for i in 0..pages {
        agent
            .submit(usm_proto::agent::AgentRequest {
                op: usm_proto::agent::AgentOp::EvictToStaging,
                slot: i as u32,
                addr: buf + i * 4096,
                pages: 1,
                seq: seq0 + i,
            })
            .unwrap();
    }
    agent.kick().unwrap();
    let done = collect(agent, pages as usize);
    assert!(done.iter().all(|c| c.result == 4096), "{why}: {done:?}");
}

/// Reads `pages` staging slots from the program and checks them against `fill(seed)`.
fn staged_content(
    served: &Served,
    agent: &usm_proto::agent::AgentClient,
    pages: u64,
    seed: u64,
) -> Vec<u8> {
    let staged =
        support::sys::read_remote(served.pid, agent.staging_addr(0), (pages * 4096) as usize)
            .unwrap();
    assert_eq!(staged.len() as u64, pages * 4096);
    for (i, word) in staged.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap());
        assert_eq!(
            word,
            pattern_word(seed, i as u64),
            "staged word {i} differs from the program's data"
        );
    }
    staged
}

#[test]
fn eviction_agent_moves_pages_out_and_back() {
    use usm_proto::agent::AgentOp;
    let Some((mut program, served, _keep)) = managed_workload(&["evict"]) else {
        return;
    };
    let (buf, pages) = buffer_of(&program.read_until("PEAK"));
    assert_eq!(pages, 64);

    let mut agent = served.start_agent(64, 64);

    // Round 1: evict every page, keep its content "in swap", drop the staging slots,
    // then let the program fault everything back.
    evict_each(&mut agent, buf, pages, 0, "evictions");
    let staged = staged_content(&served, &agent, pages, 7);
    {
        let mut swapped = served.faults.swapped.lock().unwrap();
        for (i, page) in staged.chunks_exact(4096).enumerate() {
            let mut content = Box::new(support::sys::SourcePage([0; 4096]));
            content.0.copy_from_slice(page);
            swapped.insert(buf + i as u64 * 4096, content);
        }
    }
    served.send_swap_state(pages);
    assert_eq!(
        agent_op(&mut agent, AgentOp::DropSlots, 0, 0, pages, 1000),
        0
    );
    program.resume();
    program.read_until("PEAK2");
    // The program verified every page; the fault server counts a swap-in just after the
    // COPY that woke the program, so give the counter a moment to catch up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while served.faults.stats.swapins.load(Ordering::Relaxed) < pages
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        served.faults.stats.swapins.load(Ordering::Relaxed),
        pages,
        "every page came back by a fault"
    );
    assert!(served.faults.swapped.lock().unwrap().is_empty());
    served.send_swap_state(0);

    // Round 2: evict 8 pages; 4 come back through the agent, 4 stay staged when the
    // daemon dies. The tagger puts those back itself, so the program continues correctly.
    evict_each(&mut agent, buf, 8, 2000, "round 2 evictions");
    assert_eq!(
        agent_op(&mut agent, AgentOp::ReturnFromStaging, 0, buf, 4, 3000),
        4 * 4096
    );
    let swapins_before = served.faults.stats.swapins.load(Ordering::Relaxed);
    served.die();
    program.resume();
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"), "{out}");
    assert!(err.contains("continuing unmanaged"), "{err}");
    assert_eq!(
        swapins_before, pages,
        "round 2 needed no swap-in from the daemon"
    );
}

/// After `fork`, the parent's pages are shared copy-on-write with the child and
/// `UFFDIO_MOVE` refuses them (`EBUSY`): the agent makes each the parent's own first
/// (without writing to it) and moves it. The staged content is the data; the child keeps
/// its copy; the parent gets its pages back intact.
#[test]
fn eviction_agent_moves_pages_shared_with_a_fork_child() {
    use usm_proto::agent::AgentOp;
    let Some((mut program, served, _keep)) = managed_workload(&["evict-shared"]) else {
        return;
    };
    let (buf, pages) = buffer_of(&program.read_until("CHILD"));
    let mut agent = served.start_agent(16, 16);
    evict_each(&mut agent, buf, pages, 0, "shared pages were not evicted");
    staged_content(&served, &agent, pages, 5);
    assert_eq!(
        agent_op(&mut agent, AgentOp::ReturnFromStaging, 0, buf, pages, 100),
        (pages * 4096) as i64
    );
    program.resume();
    let (status, out, err) = program.finish();
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn forked_child_with_inherited_holes_is_killed_when_the_daemon_dies() {
    let Some((mut program, served, _keep)) = managed_workload(&["fork-at-risk"]) else {
        return;
    };
    let (buf, _) = buffer_of(&program.read_until("PEAK"));
    let mut agent = served.start_agent(4, 4);
    evict_each(&mut agent, buf, 1, 1, "page 0");
    // The parent forks while its page 0 is in staging: the child inherits a hole.
    program.resume();
    program.read_until("CHILD");
    served.die();
    program.resume();
    // If nobody kills the child, the parent waits for it forever: the watchdog ends that.
    let (status, out, err) = program.wait_without_resuming(std::time::Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(
        out.contains("CHILD_STATUS signal 9"),
        "the child must be killed: {out}\n{err}"
    );
    assert!(
        out.contains("OK"),
        "the parent restores its staged page and goes on: {out}"
    );
    assert!(
        err.contains("FATAL") && err.contains("1 swapped-out page(s)"),
        "the child's message: {err}"
    );
    assert!(err.contains("continuing unmanaged"), "{err}");
}
