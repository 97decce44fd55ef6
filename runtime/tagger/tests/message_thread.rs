//! The tagger's message thread keeps serving the daemon while the program's threads are
//! stuck in faults inside malloc (issue 15's traced false OOM: a program thread faulted
//! holding the heap lock, the message thread answered a `CoverageRequest` by reading
//! `/proc/self/smaps` into the heap, blocked on the lock and stopped draining the
//! socket; the daemon's `SwapState`s then failed and eviction stalled).
//!
//! The daemon is played by the test (`support`): it stops serving faults while four
//! threads churn malloc/free, so every thread ends up waiting (in a fault, or for the
//! heap lock a faulting thread holds), then asks for coverage and sends `SwapState`s.
//! Every request must be answered within seconds with nothing served.

mod support;

use std::time::{Duration, Instant};

use support::*;
use usm_proto::Message;

/// Threads of `pid` blocked in a userfaultfd fault (`wchan` `handle_userfault`).
fn threads_in_faults(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("wchan"))
                .is_ok_and(|w| w.trim() == "handle_userfault")
        })
        .count()
}

#[test]
fn coverage_is_answered_while_program_threads_wait_in_faults_inside_malloc() {
    if let Some(why) = support::sys::userfaultfd_unavailable() {
        panic!("needs a handler-mode userfaultfd (run the tests as root, as CI does): {why}");
    }
    let tagger = tagger_so();
    let work = tempfile::tempdir().unwrap();
    let bin = compile(work.path(), "workload", &[]);
    let daemon = TestDaemon::new();
    let program = Program::spawn(&bin, &["churn"], &tagger, &daemon.socket());
    let served = daemon.accept_and_serve();
    // Serve only the start, so the threads meet unserved faults early: with 300 ms of
    // serving, one CI run (2026-12-07) saw no thread wait in a fault for 10 s. The
    // churn's new pages come most often while its heap is still growing.
    std::thread::sleep(Duration::from_millis(30));
    served.stop_serving();
    // Until the program's threads are stuck (some in faults, the rest behind them).
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads_in_faults(served.pid) == 0 {
        assert!(
            Instant::now() < deadline,
            "no thread of the program ever waited in a fault"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stuck = threads_in_faults(served.pid);
    let _ = served.drain();
    for round in 0..5 {
        served
            .stream
            .send(&Message::SwapState { swapped_pages: 0 })
            .unwrap();
        served.stream.send(&Message::CoverageRequest).unwrap();
        let asked = Instant::now();
        let reply = loop {
            match served.inbox.recv_timeout(Duration::from_secs(5)) {
                Ok((m @ Message::Coverage { .. }, _)) => break m,
                Ok(_) => continue,
                Err(_) => panic!(
                    "round {round}: no Coverage within 5 s while {stuck} thread(s) wait in \
                     faults: the message thread is blocked"
                ),
            }
        };
        let Message::Coverage {
            managed_anon_bytes,
            anon_bytes,
        } = reply
        else {
            unreachable!()
        };
        eprintln!(
            "round {round}: answered in {:?} with {stuck} thread(s) in faults: managed {managed_anon_bytes} of {anon_bytes}",
            asked.elapsed()
        );
        assert!(anon_bytes > 0 && managed_anon_bytes > 0 && managed_anon_bytes <= anon_bytes);
    }
    // The daemon dies; the tagger detaches and the program finishes on kernel memory.
    served.die();
    let (status, out, err) = program.wait_without_resuming(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("OK"), "{out}");
}
