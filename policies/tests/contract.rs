//! The runtime-facing contract, on the simulator: a panicking policy costs one access and
//! nothing else; `deliver` routes every event kind.

#![deny(unsafe_code)]

use usm_policies::sim::{FaultOutcome, SimMachine};
use usm_policies::{
    AllocPolicy, Cx, Decision, Event, Fault, HintErrorKind, Mapping, Origin, Registry,
    VictimRequest, Watermarks, deliver, page_floor,
};

const P: u64 = 4096;
const BASE: u64 = 0x40_0000;

/// Takes frames (and the staged frame of the faulting page, if any), then panics.
struct Saboteur;

impl AllocPolicy for Saboteur {
    fn name(&self) -> &str {
        "saboteur"
    }
    fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
        let _staged = cx.take_staged(fault.origin.pid, page_floor(fault.addr));
        let mut v = Vec::new();
        assert!(cx.take_frames(3, &mut v));
        panic!("saboteur holds {} frames", v.len());
    }
}

fn machine() -> SimMachine {
    let reg = Registry::with_builtins();
    SimMachine::new(
        16,
        Watermarks::default(),
        reg.build_evict("fifo").unwrap(),
        reg.build_oom("fail").unwrap(),
    )
}

#[test]
fn a_panicking_policy_costs_one_access_and_is_replaced() {
    let mut m = machine();
    let reg = Registry::with_builtins();
    m.add_process(
        1,
        "victim",
        BASE..BASE + 16 * P,
        reg.build_alloc("first-fit").unwrap(),
    );
    m.fault(1, BASE, true).unwrap();
    m.evict(VictimRequest::any(1)).unwrap(); // page 0 now in staging
    m.add_process(2, "bad", BASE..BASE + 16 * P, Box::new(Saboteur));
    let free = m.free_frames();

    let out = m.fault(2, BASE + P, true).unwrap();
    let FaultOutcome::PolicyPanicked(p) = out else {
        panic!("{out:?}")
    };
    assert_eq!(p.policy, "saboteur");
    assert_eq!(p.message, "saboteur holds 3 frames");
    assert_eq!(m.free_frames(), free, "taken frames were reclaimed");
    m.check().unwrap();

    // The replacement serves the next fault; the other process is unaffected.
    assert_eq!(m.fault(2, BASE + P, true), Ok(FaultOutcome::Mapped(1)));
    assert_eq!(m.fault(1, BASE, false), Ok(FaultOutcome::Reclaimed));
    m.check().unwrap();
}

#[test]
fn a_staged_frame_taken_by_a_panicking_policy_keeps_its_content() {
    let mut m = machine();
    m.add_process(1, "bad", BASE..BASE + 16 * P, Box::new(Saboteur));
    m.set_respawn(|| Box::new(Saboteur));
    // Map page 0 through a well-behaved call: use the context directly.
    let f = m.cx().take_frame().unwrap();
    m.map_taken(1, BASE, Mapping::one(BASE, f)).unwrap();
    m.evict(VictimRequest::any(1)).unwrap();
    assert!(matches!(
        m.fault(1, BASE, false),
        Ok(FaultOutcome::PolicyPanicked(_))
    ));
    m.check().unwrap();
    // The page went back to staging and its write-back still lands in swap.
    assert_eq!(m.complete_writebacks(4), 1);
    assert!(m.is_swapped(1, BASE));
    m.check().unwrap();
}

#[test]
fn deliver_routes_events_and_rejects_bad_hints() {
    let mut m = machine();
    let reg = Registry::with_builtins();
    m.add_process(
        1,
        "app",
        BASE..BASE + 16 * P,
        reg.build_alloc("first-fit").unwrap(),
    );
    let mut ff = reg.build_alloc("first-fit").unwrap();
    let origin = Origin { pid: 1, tid: 1 };
    let fault = Event::Fault(Fault {
        addr: BASE + 3 * P,
        write: true,
        wp: false,
        minor: false,
        len_hint: P,
        origin,
    });
    let d = deliver(&mut *ff, &fault, m.cx()).unwrap();
    let Some(Decision::Map(map)) = d else {
        panic!("{d:?}")
    };
    assert_eq!(map.start(), BASE + 3 * P);
    m.map_taken(1, BASE + 3 * P, map).unwrap();

    let free = Event::Free {
        origin,
        start: BASE,
        len: 4 * P,
    };
    assert_eq!(deliver(&mut *ff, &free, m.cx()), Ok(None));
    let exit = Event::Exit { origin };
    assert_eq!(deliver(&mut *ff, &exit, m.cx()), Ok(None));
    let np = Event::NewProcess {
        origin,
        name: "x".into(),
        parent: Some(1),
    };
    assert_eq!(deliver(&mut *ff, &np, m.cx()), Ok(None));

    let good = Event::Hint {
        origin,
        start: BASE,
        len: P,
        text: "PRIORITY=LOW".into(),
    };
    assert_eq!(deliver(&mut *ff, &good, m.cx()), Ok(None));
    let bad = Event::Hint {
        origin,
        start: BASE,
        len: P,
        text: "PRIORITY=LOWEST".into(),
    };
    let e = deliver(&mut *ff, &bad, m.cx()).unwrap_err();
    assert_eq!((e.offset, e.token.as_str()), (9, "LOWEST"));
    assert!(matches!(e.kind, HintErrorKind::BadValue { .. }));
    m.check().unwrap();
}
