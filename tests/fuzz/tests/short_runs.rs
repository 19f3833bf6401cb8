//! The short fuzz run of `make test`: every target on each of its seeds, then on a few
//! thousand inputs made by mutating the seeds (byte edits, insertions of tokens the parsers
//! care about, deletions, duplicated ranges) or drawn at random. A failure prints the smallest
//! input proptest could shrink it to. The seed of the draws is fixed, so that the suite is
//! repeatable; `PROPTEST_RNG_SEED=<n>` explores elsewhere, and `make fuzz` runs the same
//! targets coverage-guided.
#![allow(clippy::unwrap_used)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use keygate_fuzz::alloc_count::{self, CountingAlloc};
use keygate_fuzz::{seeds, targets};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestRunner};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Fragments worth inserting (the syntax of JSON, YAML, SSE, multipart, HTTP-dates): the
/// entries of the libFuzzer dictionary `fuzz.dict`, which `make fuzz` uses too.
fn tokens() -> Vec<Vec<u8>> {
    let dict = include_str!("../fuzz.dict");
    dict.lines()
        .filter(|line| line.starts_with('"'))
        .map(|line| unescape(&line[1..line.len() - 1]))
        .collect()
}

/// A dictionary entry's bytes: `\\`, `\"` and `\xHH` escapes.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next().unwrap() {
            b'x' => {
                let hex = [bytes.next().unwrap(), bytes.next().unwrap()];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap());
            }
            other => out.push(other),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Edit {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, Index),
    Delete(Index, u8),
    Duplicate(Index, u8, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, token)| Edit::Token(at, token)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, len)| Edit::Delete(at, len)),
        (any::<Index>(), any::<u8>(), any::<Index>())
            .prop_map(|(from, len, to)| Edit::Duplicate(from, len, to)),
    ]
}

fn apply(mut data: Vec<u8>, edits: &[Edit], tokens: &[Vec<u8>]) -> Vec<u8> {
    for edit in edits {
        let at = |i: &Index| i.index(data.len() + 1);
        match edit {
            Edit::Set(i, b) if !data.is_empty() => {
                let i = i.index(data.len());
                data[i] = *b;
            }
            Edit::Set(..) => {}
            Edit::Insert(i, bytes) => {
                let i = at(i);
                data.splice(i..i, bytes.iter().copied());
            }
            Edit::Token(i, token) => {
                let (i, token) = (at(i), &tokens[token.index(tokens.len())]);
                data.splice(i..i, token.iter().copied());
            }
            Edit::Delete(i, len) => {
                let i = at(i).min(data.len());
                let end = (i + usize::from(*len % 16) + 1).min(data.len());
                data.drain(i..end);
            }
            Edit::Duplicate(from, len, to) => {
                let from = at(from).min(data.len());
                let end = (from + usize::from(*len)).min(data.len());
                let piece = data[from..end].to_vec();
                let to = at(to);
                data.splice(to..to, piece);
            }
        }
    }
    data
}

/// Seeds with a few edits each, and random bytes.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let tokens = tokens();
    let mutated = (
        prop::sample::select(seeds),
        prop::collection::vec(edit(), 1..6),
    )
        .prop_map(move |(seed, edits)| apply(seed, &edits, &tokens));
    prop_oneof![
        4 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Runs target `name` on its seeds, then on `cases` generated inputs.
fn short_run(name: &str, cases: u32) {
    assert!(
        alloc_count::is_installed(),
        "the counting allocator is not in use"
    );
    let target = targets::by_name(name).unwrap();
    let seeds = seeds::load(name);
    assert!(!seeds.is_empty(), "{name} has no seeds");
    for (path, data) in &seeds {
        let passed = catch_unwind(AssertUnwindSafe(|| (target.run)(data))).is_ok();
        assert!(passed, "{name} fails on its seed {}", path.display());
    }
    let defaults = Config::default();
    let rng_seed = match defaults.rng_seed {
        RngSeed::Random => RngSeed::Fixed(0x6b65_7967_6174_6521),
        chosen => chosen,
    };
    let config = Config {
        cases,
        rng_seed,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..defaults
    };
    let seeds = seeds.into_iter().map(|(_, data)| data).collect();
    TestRunner::new(config)
        .run(&inputs(seeds), |data| {
            (target.run)(&data);
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_config_loader_survives_mutated_configs() {
    short_run("config", 400);
}

#[test]
fn the_rate_limit_header_parsers_survive_any_values() {
    short_run("headers", 3000);
}

#[test]
fn the_json_body_scanner_agrees_with_serde_json_on_mutated_bodies() {
    short_run("json_body", 3000);
}

#[test]
fn the_multipart_reader_and_rewrite_survive_mutated_uploads() {
    short_run("multipart", 3000);
}

#[test]
fn the_usage_meter_and_stripper_hold_bounded_memory_on_mutated_streams() {
    short_run("usage", 300);
}

#[test]
fn the_error_body_reader_survives_mutated_bodies() {
    short_run("error_body", 3000);
}

#[test]
fn the_dictionary_reads_back_its_escapes() {
    let tokens = tokens();
    assert!(tokens.len() > 40);
    for expected in [
        &b"\""[..],
        b"\\",
        b"\r\n\r\n",
        b"\0",
        b"\xc2\xb5s",
        b"name=\"model\"",
    ] {
        assert!(tokens.iter().any(|t| t == expected), "{expected:?}");
    }
}

#[test]
fn every_target_has_a_short_run() {
    let source = include_str!("short_runs.rs");
    for target in targets::ALL {
        let call = format!("short_run(\"{}\"", target.name);
        assert!(source.contains(&call), "no short run for {}", target.name);
    }
}
