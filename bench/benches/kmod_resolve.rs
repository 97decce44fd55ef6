//! Benchmark `kmod_resolve` (being written).

fn main() {}
