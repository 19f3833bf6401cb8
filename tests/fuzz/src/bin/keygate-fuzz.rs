//! The libFuzzer harness: one binary for every target, the target named by `KEYGATE_FUZZ_TARGET`.
//! `make fuzz` builds it with sanitizer-coverage instrumentation on stable Rust and runs each
//! target in turn; run it by hand as
//! `KEYGATE_FUZZ_TARGET=usage target/fuzz/<triple>/release/keygate-fuzz CORPUS_DIR [libFuzzer flags]`,
//! or with a crash file instead of a directory to replay that input.

#![no_main]

use std::sync::OnceLock;

use keygate_fuzz::alloc_count::CountingAlloc;
use keygate_fuzz::targets::{self, Target};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static TARGET: OnceLock<&'static Target> = OnceLock::new();

fn target() -> &'static Target {
    TARGET.get_or_init(|| {
        let name = std::env::var("KEYGATE_FUZZ_TARGET").unwrap_or_default();
        targets::by_name(&name).unwrap_or_else(|| {
            let names: Vec<&str> = targets::ALL.iter().map(|t| t.name).collect();
            eprintln!("set KEYGATE_FUZZ_TARGET to one of: {}", names.join(", "));
            std::process::exit(2)
        })
    })
}

libfuzzer_sys::fuzz_target!(init: {
    target();
    assert!(keygate_fuzz::alloc_count::is_installed());
}, |data: &[u8]| {
    (target().run)(data);
});
