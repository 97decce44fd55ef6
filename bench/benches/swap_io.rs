//! Benchmark `swap_io` (being written).

fn main() {}
