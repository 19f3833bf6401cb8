//! Fuzz targets for keygate's parsers of untrusted input: the config loader, the `Retry-After`
//! and rate-limit headers of a 429, the JSON and multipart request-body scanners, the SSE usage
//! meter and stripper, and the error-body reader.
//!
//! Each target takes raw bytes, panics on any broken property (no panic inside keygate, answers
//! consistent with a reference parser, memory held bounded) and returns otherwise. Two engines
//! drive the same targets:
//!
//! - `tests/short_runs.rs`: seeds plus a few thousand proptest-mutated inputs per target, a
//!   normal test in `make test`;
//! - `src/bin/keygate-fuzz.rs`: libFuzzer, coverage-guided, on stable Rust (`make fuzz`).
//!
//! Layout: [`targets`] holds one module per target and the list of them, [`input`] cuts a byte
//! string into the fields and chunks a target needs, [`alloc_count`] measures the peak memory a
//! call allocates, [`seeds`] loads the committed starting inputs.

pub mod alloc_count;
pub mod input;
pub mod seeds;
pub mod targets;
