//! Benchmark `sched` (being written).

fn main() {}
