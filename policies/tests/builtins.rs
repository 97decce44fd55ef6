//! Unit tests of every built-in policy, run on the simulated machine (`usm_policies::sim`,
//! a checked frame table — not the real pool; the runtime's tests cover the real path).

#![deny(unsafe_code)]

use usm_policies::sim::{FaultOutcome, SimMachine};
use usm_policies::{
    Decision, Fault, FrameNo, MappedPage, Mapping, OomAction, OomReason, OomSituation, Origin,
    Registry, RunMode, VictimRequest, VictimScan, Watermarks,
};

const P: u64 = 4096;
const BASE: u64 = 0x10_0000;

fn machine(frames: usize, low: usize, high: usize, evict: &str, oom: &str) -> SimMachine {
    let reg = Registry::with_builtins();
    SimMachine::new(
        frames,
        Watermarks { low, high },
        reg.build_evict(evict).unwrap(),
        reg.build_oom(oom).unwrap(),
    )
}

fn add(m: &mut SimMachine, pid: u32, alloc: &str, pages: u64) {
    let reg = Registry::with_builtins();
    m.add_process(
        pid,
        "app",
        BASE..BASE + pages * P,
        reg.build_alloc(alloc).unwrap(),
    );
}

fn page(i: u64) -> u64 {
    BASE + i * P
}

// ---- first-fit ------------------------------------------------------------------------

#[test]
fn first_fit_maps_one_distinct_frame_per_fault() {
    let mut m = machine(16, 0, 0, "fifo", "fail");
    add(&mut m, 1, "policyOne", 8);
    let mut frames = Vec::new();
    for i in 0..8 {
        assert_eq!(
            m.fault(1, page(i) + 123, i % 2 == 0),
            Ok(FaultOutcome::Mapped(1))
        );
        frames.push(m.frame_of(1, page(i)).unwrap());
    }
    frames.sort();
    frames.dedup();
    assert_eq!(frames.len(), 8);
    assert_eq!(m.fault(1, page(3), false), Ok(FaultOutcome::AlreadyPresent));
    assert_eq!(m.fault(1, page(8), false), Ok(FaultOutcome::Segv));
    assert_eq!(m.counters(1).resident, 8);
    assert_eq!(m.counters(1).faults, 8);
    m.check().unwrap();
}

#[test]
fn first_fit_swaps_evicted_pages_back_in_instead_of_zero_filling() {
    let mut m = machine(4, 0, 1, "fifo", "fail");
    add(&mut m, 1, "first-fit", 8);
    for i in 0..4 {
        m.fault(1, page(i), true).unwrap();
    }
    // Pool empty: ordinary eviction takes the oldest page, which goes to swap.
    assert_eq!(m.fault(1, page(4), true), Ok(FaultOutcome::Mapped(1)));
    assert!(m.is_swapped(1, page(0)));
    let before = m.stats().swap_ins;
    let FaultOutcome::Waiting(t) = m.fault(1, page(0), false).unwrap() else {
        panic!()
    };
    assert_eq!(m.stats().swap_ins, before + 1);
    // A second fault on the same page waits on the same ticket (no second read).
    assert_eq!(m.fault(1, page(0), false), Ok(FaultOutcome::Waiting(t)));
    assert_eq!(m.complete_swapins(8), 1);
    assert!(m.frame_of(1, page(0)).is_some());
    m.check().unwrap();
}

#[test]
fn first_fit_prefetch_hint_maps_following_vacant_pages_within_the_region() {
    let mut m = machine(32, 0, 0, "clock", "fail");
    add(&mut m, 1, "first-fit", 10);
    m.hint(1, page(0), 10 * P, "PREFETCH=3").unwrap();
    assert_eq!(m.fault(1, page(0), false), Ok(FaultOutcome::Mapped(4)));
    // The run stops at a present page...
    assert_eq!(m.fault(1, page(5), false), Ok(FaultOutcome::Mapped(4)));
    assert_eq!(m.fault(1, page(4), false), Ok(FaultOutcome::Mapped(1)));
    // ...and at the region's end.
    assert_eq!(m.fault(1, page(9), false), Ok(FaultOutcome::Mapped(1)));
    assert_eq!(m.present_pages(1).len(), 10);
    m.check().unwrap();
}

#[test]
fn first_fit_answers_oom_with_an_empty_pool_and_fail_says_why() {
    let mut m = machine(1, 0, 0, "fifo", "fail");
    add(&mut m, 1, "first-fit", 4);
    m.fault(1, page(0), true).unwrap();
    m.pin(1, page(0), true);
    match m.fault(1, page(1), true).unwrap() {
        FaultOutcome::Failed(
            r @ OomReason::PoolExhausted {
                pinned: 1,
                denied: 0,
            },
        ) => {
            assert!(r.to_string().contains("1 pinned"), "{r}");
        }
        other => panic!("{other:?}"),
    }
    m.check().unwrap();
}

// ---- fhp --------------------------------------------------------------------------------

#[test]
fn fhp_maps_the_aligned_window_clipped_to_the_region() {
    let mut m = machine(64, 0, 0, "clock", "fail");
    // The region starts one page into a 64K window and ends 5 pages into another.
    let reg = Registry::with_builtins();
    let (lo, hi) = (0x1_0000 + P, 0x3_0000 + 5 * P);
    m.add_process(2, "fhp", lo..hi, reg.build_alloc("fhp:64K").unwrap());
    assert_eq!(m.fault(2, 0x1_8000, true), Ok(FaultOutcome::Mapped(15)));
    assert_eq!(m.present_pages(2).first(), Some(&lo));
    assert_eq!(m.fault(2, 0x2_0000, true), Ok(FaultOutcome::Mapped(16)));
    assert_eq!(m.fault(2, 0x3_2000, true), Ok(FaultOutcome::Mapped(5)));
    assert_eq!(m.present_pages(2).last(), Some(&(hi - P)));
    m.check().unwrap();
}

#[test]
fn fhp_stops_at_pages_that_already_have_content() {
    let mut m = machine(64, 0, 0, "clock", "fail");
    add(&mut m, 1, "fhp:64K", 16);
    m.hint(1, page(5), P, "HUGE=4K").unwrap(); // page 5 alone
    assert_eq!(m.fault(1, page(5), true), Ok(FaultOutcome::Mapped(1)));
    assert_eq!(m.fault(1, page(2), true), Ok(FaultOutcome::Mapped(5))); // pages 0..5
    assert_eq!(m.fault(1, page(12), true), Ok(FaultOutcome::Mapped(10))); // pages 6..16
    m.check().unwrap();
}

#[test]
fn fhp_falls_back_to_smaller_windows_when_frames_run_low() {
    // 20 free frames, low watermark 8: 16 + 8 > 20, so 64K halves to 32K (8 + 8 <= 20).
    let mut m = machine(20, 8, 8, "clock", "fail");
    add(&mut m, 1, "fhp:64K", 16);
    assert_eq!(m.fault(1, page(3), true), Ok(FaultOutcome::Mapped(8)));
    assert_eq!(m.present_pages(1), (0..8).map(page).collect::<Vec<_>>());
    // 12 free: a 4-page window needs 4 + 8 = 12: fits.
    assert_eq!(m.fault(1, page(9), true), Ok(FaultOutcome::Mapped(4)));
    m.check().unwrap();
}

#[test]
fn fhp_reads_swapped_pages_back_and_honours_huge_hints() {
    let mut m = machine(64, 0, 0, "fifo", "fail");
    add(&mut m, 1, "fhp:16K", 64);
    assert_eq!(m.fault(1, page(1), true), Ok(FaultOutcome::Mapped(4)));
    assert_eq!(m.evict(VictimRequest::any(4)).unwrap().chosen, 4);
    assert_eq!(m.complete_writebacks(4), 4);
    assert!(matches!(
        m.fault(1, page(2), false),
        Ok(FaultOutcome::Waiting(_))
    ));
    m.complete_swapins(1);
    assert_eq!(m.present_pages(1), vec![page(2)]);
    // A HUGE hint widens the window for its range.
    m.hint(1, page(32), 32 * P, "HUGE=128K").unwrap();
    assert_eq!(m.fault(1, page(40), true), Ok(FaultOutcome::Mapped(32)));
    m.check().unwrap();
}

// ---- quota ------------------------------------------------------------------------------

#[test]
fn quota_caps_resident_pages_by_evicting_its_own() {
    let mut m = machine(64, 0, 0, "clock", "fail");
    add(&mut m, 1, "quota:4", 32);
    add(&mut m, 2, "first-fit", 32);
    for i in 0..6 {
        m.fault(2, page(i), true).unwrap();
    }
    for i in 0..12 {
        assert_eq!(m.fault(1, page(i), true), Ok(FaultOutcome::Mapped(1)));
        assert!(m.counters(1).resident <= 4, "{:?}", m.counters(1));
    }
    assert_eq!(m.counters(1).swapped, 8);
    assert_eq!(
        m.counters(2).resident,
        6,
        "another process's pages are not touched"
    );
    // Swap-ins count against the quota too.
    m.complete_writebacks(usize::MAX);
    assert!(matches!(
        m.fault(1, page(0), false),
        Ok(FaultOutcome::Waiting(_))
    ));
    assert!(m.counters(1).resident <= 4);
    m.check().unwrap();
}

#[test]
fn a_page_faulted_during_write_back_comes_back_from_staging_within_the_quota() {
    let mut m = machine(16, 0, 0, "fifo", "fail");
    add(&mut m, 1, "quota:2", 8);
    m.fault(1, page(0), true).unwrap();
    m.fault(1, page(1), true).unwrap();
    m.fault(1, page(2), true).unwrap(); // evicts page 0 into staging
    assert!(m.frame_of(1, page(0)).is_none() && !m.is_swapped(1, page(0)));
    // The write-back has not finished: the staged frame itself is mapped back, after the
    // quota made room by evicting page 1.
    assert_eq!(m.fault(1, page(0), false), Ok(FaultOutcome::Reclaimed));
    assert_eq!(m.counters(1).resident, 2);
    assert_eq!(m.stats().swap_ins, 0);
    assert_eq!(
        m.complete_writebacks(8),
        1,
        "page 0's write-back was cancelled"
    );
    assert!(m.is_swapped(1, page(1)));
    m.check().unwrap();
}

#[test]
fn quota_fails_when_nothing_of_its_own_can_leave() {
    let mut m = machine(64, 0, 0, "clock", "fail");
    add(&mut m, 1, "quota:2", 32);
    for i in 0..2 {
        m.fault(1, page(i), true).unwrap();
        m.pin(1, page(i), true);
    }
    assert!(matches!(
        m.fault(1, page(5), true),
        Ok(FaultOutcome::Failed(_))
    ));
    assert_eq!(m.counters(1).resident, 2);
    m.check().unwrap();
}

// ---- fifo / clock / two-list / hints ----------------------------------------------------

fn mapped(m: &mut SimMachine, pid: u32, n: u64) {
    mapped_from(m, pid, 0, n);
}

fn mapped_from(m: &mut SimMachine, pid: u32, first: u64, n: u64) {
    for i in first..first + n {
        assert_eq!(m.fault(pid, page(i), true), Ok(FaultOutcome::Mapped(1)));
    }
}

#[test]
fn fifo_evicts_oldest_first_and_skips_pinned_and_denied() {
    let mut m = machine(16, 0, 0, "fifo", "fail");
    add(&mut m, 1, "first-fit", 8);
    mapped(&mut m, 1, 6);
    m.touch(1, page(0), true); // fifo ignores accesses
    m.pin(1, page(1), true);
    m.hint(1, page(2), P, "EVICTION=DENY").unwrap();
    let s = m.evict(VictimRequest::any(2)).unwrap();
    assert_eq!(
        s,
        VictimScan {
            chosen: 2,
            denied: 1,
            pinned: 1
        }
    );
    assert_eq!(m.present_pages(1), vec![page(1), page(2), page(4), page(5)]);
    assert_eq!(m.evict_policy().tracked(), 4);
    m.check().unwrap();
}

#[test]
fn fifo_scoped_to_one_process() {
    let mut m = machine(16, 0, 0, "fifo", "fail");
    add(&mut m, 1, "first-fit", 8);
    add(&mut m, 2, "first-fit", 8);
    mapped(&mut m, 1, 3);
    mapped(&mut m, 2, 3);
    assert_eq!(m.evict(VictimRequest::of_process(2, 2)).unwrap().chosen, 2);
    assert_eq!(m.present_pages(1).len(), 3);
    assert_eq!(m.present_pages(2), vec![page(2)]);
    m.check().unwrap();
}

#[test]
fn clock_gives_accessed_pages_a_second_chance() {
    let mut m = machine(16, 0, 0, "clock", "fail");
    add(&mut m, 1, "first-fit", 8);
    mapped(&mut m, 1, 4);
    m.touch(1, page(0), false);
    m.touch(1, page(1), false);
    let s = m.evict(VictimRequest::any(1)).unwrap();
    assert_eq!(s.chosen, 1);
    assert_eq!(m.present_pages(1), vec![page(0), page(1), page(3)]);
    // Bits are cleared by the pass: the next round takes page 3, then page 0.
    m.evict(VictimRequest::any(2)).unwrap();
    assert_eq!(m.present_pages(1), vec![page(1)]);
    m.check().unwrap();
}

#[test]
fn clock_takes_referenced_pages_when_everything_is_referenced() {
    let mut m = machine(16, 0, 0, "clock", "fail");
    add(&mut m, 1, "first-fit", 8);
    mapped(&mut m, 1, 3);
    for i in 0..3 {
        m.touch(1, page(i), false);
    }
    assert_eq!(m.evict(VictimRequest::any(3)).unwrap().chosen, 3);
    m.check().unwrap();
}

#[test]
fn two_list_takes_victims_from_the_inactive_list_only() {
    let mut m = machine(16, 0, 0, "two-list", "fail");
    add(&mut m, 1, "first-fit", 8);
    mapped(&mut m, 1, 8);
    // Pages 0-4 are accessed while inactive: active now, although mapped first.
    for i in 0..5 {
        m.touch(1, page(i), false);
    }
    let s = m.evict(VictimRequest::any(2)).unwrap();
    assert_eq!(s.chosen, 2);
    assert_eq!(
        m.present_pages(1),
        (0..5).chain([7]).map(page).collect::<Vec<_>>()
    );
    assert_eq!(m.evict_policy().tracked(), 6);
    m.check().unwrap();
}

#[test]
fn two_list_ages_the_oldest_active_pages_out_when_the_inactive_list_runs_short() {
    let mut m = machine(16, 0, 0, "two-list", "fail");
    add(&mut m, 1, "first-fit", 16);
    mapped(&mut m, 1, 8);
    for i in 0..8 {
        m.touch(1, page(i), false);
    }
    // Everything is active: the two oldest go back to the inactive list, are asked about
    // once (their bits were set) and then leave.
    assert_eq!(m.evict(VictimRequest::any(2)).unwrap().chosen, 2);
    assert_eq!(m.present_pages(1), (2..8).map(page).collect::<Vec<_>>());
    // A page accessed again while inactive goes back to the active list and stays.
    mapped_from(&mut m, 1, 8, 2);
    m.touch(1, page(8), false);
    assert_eq!(m.evict(VictimRequest::any(1)).unwrap().chosen, 1);
    assert!(m.frame_of(1, page(8)).is_some());
    assert!(m.frame_of(1, page(9)).is_none());
    m.check().unwrap();
}

#[test]
fn two_list_scoped_to_one_process_deactivates_that_process_s_pages() {
    let mut m = machine(32, 0, 0, "two-list", "fail");
    add(&mut m, 1, "first-fit", 8);
    add(&mut m, 2, "first-fit", 8);
    mapped(&mut m, 1, 8);
    mapped(&mut m, 2, 4);
    for i in 0..4 {
        m.touch(2, page(i), false);
    }
    // Process 2 has only active pages, process 1 only inactive ones.
    assert_eq!(m.evict(VictimRequest::of_process(2, 3)).unwrap().chosen, 3);
    assert_eq!(m.present_pages(1).len(), 8);
    assert_eq!(m.present_pages(2), vec![page(3)]);
    m.check().unwrap();
}

#[test]
fn two_list_puts_a_victim_it_gets_back_on_the_active_list() {
    // A victim the runtime could not evict is announced again; it must not be chosen
    // again ahead of the pages that can go (a stopped program's pages, whose stages its
    // agent refused, starved everyone else's eviction in the daemon before this).
    let reg = Registry::with_builtins();
    let mut p = reg.build_evict("two-list").unwrap();
    let mut m = machine(16, 0, 0, "fifo", "fail");
    let pages: Vec<MappedPage> = (0..10)
        .map(|i| MappedPage {
            frame: FrameNo(i),
            pid: 1,
            addr: page(u64::from(i)),
        })
        .collect();
    for &pg in &pages {
        p.on_map(pg, m.cx());
    }
    let mut out = Vec::new();
    p.victims(VictimRequest::any(2), m.cx(), &mut out);
    assert_eq!(out, pages[..2].to_vec());
    // Page 0 could not leave (refused); page 1 did.
    p.on_refused(pages[0], m.cx());
    out.clear();
    p.victims(VictimRequest::any(2), m.cx(), &mut out);
    assert_eq!(out, pages[2..4].to_vec(), "page 0 is active now");
    assert_eq!(p.tracked(), 7);
}

#[test]
fn two_list_takes_its_inactive_share_as_a_parameter() {
    let reg = Registry::with_builtins();
    assert!(reg.build_evict("two-list").is_ok());
    assert!(reg.build_evict("two-list:50").is_ok());
    for bad in ["two-list:0", "two-list:101", "two-list:half"] {
        let e = reg.build_evict(bad).expect_err(bad);
        assert!(e.to_string().contains("percent"), "{bad}: {e}");
    }
}

#[test]
fn hints_prefers_low_keeps_high_and_refuses_deny() {
    let mut m = machine(16, 0, 0, "hints", "fail");
    add(&mut m, 1, "first-fit", 8);
    m.hint(1, page(0), 2 * P, "PRIORITY=HIGH").unwrap();
    m.hint(1, page(6), 2 * P, "PRIORITY=LOW").unwrap();
    m.hint(1, page(3), P, "EVICTION=DENY; PRIORITY=LOW")
        .unwrap();
    mapped(&mut m, 1, 8);
    // LOW pages (3 is denied) go first even though they were mapped last.
    m.evict(VictimRequest::any(2)).unwrap();
    assert!(m.frame_of(1, page(6)).is_none() && m.frame_of(1, page(7)).is_none());
    // Then NORMAL (2, 4, 5), HIGH (0, 1) last; DENY never with normal urgency.
    let s = m.evict(VictimRequest::any(10)).unwrap();
    assert_eq!(s.chosen, 5);
    assert!(s.denied >= 1);
    assert_eq!(m.present_pages(1), vec![page(3)]);
    // Hard urgency takes it once nothing else is left.
    assert_eq!(m.evict(VictimRequest::any(1).hard()).unwrap().chosen, 1);
    assert_eq!(m.stats().evicted_denied, 1);
    m.check().unwrap();
}

#[test]
fn hints_reclassifies_pages_hinted_after_they_were_mapped() {
    let mut m = machine(16, 0, 0, "hints", "fail");
    add(&mut m, 1, "first-fit", 8);
    mapped(&mut m, 1, 4);
    m.hint(1, page(3), P, "PRIORITY=LOW").unwrap();
    m.hint(1, page(0), P, "PRIORITY=HIGH").unwrap();
    m.evict(VictimRequest::any(1)).unwrap();
    assert!(m.frame_of(1, page(3)).is_none(), "the LOW page goes first");
    m.evict(VictimRequest::any(2)).unwrap();
    assert_eq!(m.present_pages(1), vec![page(0)], "the HIGH page goes last");
    m.check().unwrap();
}

#[test]
fn hard_urgency_takes_deny_pages_only_after_all_others() {
    for evict in ["fifo", "clock", "hints"] {
        let mut m = machine(16, 0, 0, evict, "fail");
        add(&mut m, 1, "first-fit", 8);
        m.hint(1, page(0), 2 * P, "EVICTION=DENY").unwrap();
        mapped(&mut m, 1, 4);
        let s = m.evict(VictimRequest::any(3).hard()).unwrap();
        assert_eq!(s.chosen, 3, "{evict}");
        assert_eq!(m.stats().evicted_denied, 1, "{evict}");
        m.check().unwrap();
    }
}

// ---- OOM --------------------------------------------------------------------------------

#[test]
fn fail_reports_denied_pages() {
    let mut m = machine(2, 0, 0, "clock", "fail");
    add(&mut m, 1, "first-fit", 8);
    m.hint(1, page(0), 8 * P, "EVICTION=DENY").unwrap();
    mapped(&mut m, 1, 2);
    let out = m.fault(1, page(2), true).unwrap();
    assert!(
        matches!(out, FaultOutcome::Failed(OomReason::PoolExhausted { denied, .. }) if denied >= 2),
        "{out:?}"
    );
    m.check().unwrap();
}

#[test]
fn evict_harder_takes_deny_pages_as_a_last_resort() {
    let mut m = machine(2, 0, 0, "clock", "evict-harder:1");
    add(&mut m, 1, "first-fit", 8);
    m.hint(1, page(0), 8 * P, "EVICTION=DENY").unwrap();
    mapped(&mut m, 1, 2);
    assert_eq!(m.fault(1, page(2), true), Ok(FaultOutcome::Mapped(1)));
    assert_eq!(m.stats().evicted_denied, 1);
    // Gives up after its attempts when even that is impossible.
    m.pin(1, page(1), true);
    m.pin(1, page(2), true);
    assert_eq!(
        m.fault(1, page(3), true),
        Ok(FaultOutcome::Failed(OomReason::GaveUp { attempts: 4 }))
    );
    m.check().unwrap();
}

#[test]
fn kill_largest_kills_the_process_holding_most_pages() {
    let mut m = machine(8, 0, 0, "clock", "kill-largest");
    add(&mut m, 1, "first-fit", 16);
    add(&mut m, 2, "first-fit", 16);
    mapped(&mut m, 1, 7);
    for i in 0..7 {
        m.pin(1, page(i), true);
    }
    mapped(&mut m, 2, 1);
    m.pin(2, page(0), true);
    assert_eq!(m.fault(2, page(1), true), Ok(FaultOutcome::Mapped(1)));
    assert_eq!(m.pids(), vec![2]);
    assert_eq!(m.stats().kills, 1);
    assert_eq!(m.free_frames(), 6);
    m.check().unwrap();
}

#[test]
fn oom_policies_answer_by_mode_and_attempt() {
    let reg = Registry::with_builtins();
    let mut m = machine(4, 0, 0, "clock", "fail");
    let fault = Fault {
        addr: page(0),
        write: true,
        wp: false,
        minor: false,
        len_hint: P,
        origin: Origin { pid: 1, tid: 1 },
    };
    let mut s = OomSituation {
        fault,
        attempt: 0,
        mode: RunMode::Embedded,
        last_scan: VictimScan {
            chosen: 0,
            denied: 3,
            pinned: 2,
        },
        free_frames: 0,
    };
    let mut kill = reg.build_oom("kill-largest").unwrap();
    assert_eq!(kill.on_oom(&s, m.cx()), OomAction::KillLargestTask);
    s.mode = RunMode::Daemon;
    assert_eq!(kill.on_oom(&s, m.cx()), OomAction::KillLargestProcess);
    let mut fail = reg.build_oom("fail").unwrap();
    assert_eq!(
        fail.on_oom(&s, m.cx()),
        OomAction::FailAccess(OomReason::PoolExhausted {
            denied: 3,
            pinned: 2
        })
    );
    let mut harder = reg.build_oom("evict-harder:32").unwrap();
    assert_eq!(harder.on_oom(&s, m.cx()), OomAction::EvictHarder(32));
    s.attempt = 4;
    assert!(matches!(
        harder.on_oom(&s, m.cx()),
        OomAction::FailAccess(_)
    ));
    assert!(matches!(kill.on_oom(&s, m.cx()), OomAction::FailAccess(_)));
}

// ---- direct calls through the context -----------------------------------------------------

#[test]
fn single_frame_decisions_are_inline_and_runs_are_checked() {
    let reg = Registry::with_builtins();
    let mut m = machine(8, 0, 0, "fifo", "fail");
    add(&mut m, 1, "first-fit", 8);
    let mut ff = reg.build_alloc("first-fit").unwrap();
    let fault = Fault {
        addr: page(2) + 5,
        write: false,
        wp: false,
        minor: false,
        len_hint: P,
        origin: Origin { pid: 1, tid: 1 },
    };
    let Decision::Map(map) = ff.alloc(&fault, m.cx()) else {
        panic!()
    };
    assert_eq!((map.start(), map.len()), (page(2), 1));
    assert_eq!(m.map_taken(1, page(2), map), Ok(1));
    // A mapping of frames nobody took is refused by the simulator.
    let forged = Mapping::run(page(4), vec![FrameNo(6), FrameNo(7)]).unwrap();
    assert!(m.map_taken(1, page(4), forged).is_err());
}
