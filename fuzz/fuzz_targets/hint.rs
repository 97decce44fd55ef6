//! The hint language (`usm_policies::hint`) on any text a program can pass with a hint,
//! and `HintMap` under any sequence of apply/remove against a plain per-address model.
//!
//! Input: hint text, then (after the first NUL byte) operations of 4 bytes each:
//! `[op, start, len, which hint]`, in a 256-address window at 0 or just below `u64::MAX`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usm_policies::hint::{Hint, HintMap, parse_size};

const WINDOW: u64 = 256;

fuzz_target!(|data: &[u8]| {
    let (text, ops) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let parsed = Hint::parse(text);
    match &parsed {
        Ok(h) => {
            let shown = h.to_string();
            let again = Hint::parse(&shown)
                .unwrap_or_else(|e| panic!("{text:?} printed as {shown:?}, which fails: {e}"));
            assert_eq!(again, *h, "{text:?}");
        }
        Err(e) => {
            assert!(e.offset <= text.len(), "{e:?} in {text:?}");
            assert!(text.is_char_boundary(e.offset), "{e:?} in {text:?}");
            let _ = e.to_string();
        }
    }
    let _ = parse_size(text);

    // HintMap against a model of one hint per address.
    let hints = [
        parsed.unwrap_or_default(),
        Hint::parse("PRIORITY=HIGH").unwrap_or_default(),
        Hint::parse("EVICTION=DENY; PREFETCH=8").unwrap_or_default(),
        Hint::parse("HUGE=64K").unwrap_or_default(),
    ];
    let Some((&flags, ops)) = ops.split_first() else {
        return;
    };
    let base = if flags & 1 == 0 { 0 } else { u64::MAX - WINDOW + 1 };
    let mut map = HintMap::new();
    let mut model = vec![Hint::default(); WINDOW as usize];
    for op in ops.chunks_exact(4) {
        let start = base + u64::from(op[1]);
        let len = u64::from(op[2]);
        let hint = hints[usize::from(op[3] % 4)];
        // The map's end saturates at u64::MAX (that last address is never covered).
        let end = start.saturating_add(len);
        let covered = |i: usize| {
            let a = base + i as u64;
            start <= a && a < end
        };
        if op[0] % 2 == 0 {
            map.apply(start, len, &hint);
            if !hint.is_empty() {
                for (i, m) in model.iter_mut().enumerate() {
                    if covered(i) {
                        *m = m.overlay(&hint);
                    }
                }
            }
        } else {
            map.remove(start, len);
            for (i, m) in model.iter_mut().enumerate() {
                if covered(i) {
                    *m = Hint::default();
                }
            }
        }
    }
    for (i, m) in model.iter().enumerate() {
        assert_eq!(map.hint_at(base + i as u64), *m, "address {i} of the window");
    }
    // Ranges sorted, disjoint, non-empty, never empty hints, adjacent equal ones merged.
    let ranges: Vec<_> = map.iter().map(|(r, h)| (r, *h)).collect();
    for (r, h) in &ranges {
        assert!(r.start < r.end && !h.is_empty(), "{ranges:?}");
    }
    for w in ranges.windows(2) {
        assert!(w[0].0.end <= w[1].0.start, "{ranges:?}");
        assert!(
            !(w[0].0.end == w[1].0.start && w[0].1 == w[1].1),
            "not merged: {ranges:?}"
        );
    }
});
