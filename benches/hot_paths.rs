//! Criterion micro-benchmarks of keygate's hot paths (filled in by the benchmarks work).
fn main() {}
