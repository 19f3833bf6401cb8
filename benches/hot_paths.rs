//! Criterion micro-benchmarks of keygate's per-request hot paths.
//!
//! Run with `cargo bench --bench hot_paths` (or `make bench`, which also runs the load benchmark
//! in `bench/load.py`). A quick smoke run:
//! `cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 2`.
//!
//! Groups, as they appear in criterion's report (`target/criterion/report/index.html`):
//! - `key_pool_pick/<policy>/<keys>`: one `KeyPool::pick` (and dropping its lease) with 10,
//!   1 000 and 100 000 keys, every third key cooling for the model asked.
//! - `key_pool_pick_affine/<equal|weighted>/<keys>`: one `KeyPool::pick_affine` (prompt
//!   affinity: rendezvous over every key) with 10, 100 and 500 keys, every third one cooling;
//!   `weighted` gives the keys different weights (the path with logarithms).
//! - `affinity_hash/<size>`: the affinity hash of a scanned chat body (its prompt's first KiB).
//! - `scan_json/<size>/<where model is>`: reading `model`/`stream` from a chat body.
//! - `rewrite_model/<size>`: the alias rewrite of a body already scanned.
//! - `requested_cooldown/<header>`: reading how long a 429 asks a key to rest.
//! - `usage_meter/...` and `usage_stripper/...`: metering tokens from a response as it streams
//!   past, per SSE chunk and per whole stream, and hiding the usage-only chunk.
//! - `header_scan/<case>`: the connection guard's pass over a request header's raw bytes (an
//!   OpenAI SDK request in one read and in 16-byte reads; a 30 KiB header).
//! - `key_activity_record/<success|error>`: recording one attempt in a key's activity (the
//!   per-key counts the admin API shows), on the real clock.
//! - `objects_scan/<size>`: looking for account-scoped object ids (`file-…`, `vs_…`) in a chat
//!   body that names none, as every request does once keygate has seen an object created.
//! - `objects_owner/<hit|miss>`: finding an id's owner among 100 000 recorded ids.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::clock::{ManualClock, SharedClock};
use keygate::conn_guard::{HeaderScan, ScanVerdict};
use keygate::key_activity::{AttemptEnd, KeyActivity};
use keygate::keys::{CooldownPolicy, KeyPolicy, KeyPool, KeySpec, Pick};
use keygate::request_body::{scan_json, BodyInfo};
use keygate::retry_after::{parse_http_date, requested_cooldown};
use keygate::usage::{Usage, UsageChunkStripper, UsageMeter};

const MODEL: &str = "gpt-4o-mini";

// ---------------------------------------------------------------------------------------------
// KeyPool::pick

/// A pool of `n` keys under `policy`, with every third key (indices 0, 3, 6, ...) cooling for
/// [`MODEL`] for ten minutes. The clock is manual, so nothing expires during the run.
fn cooling_pool(n: usize, policy: KeyPolicy) -> KeyPool {
    let specs = (0..n)
        .map(|i| {
            KeySpec::named(
                format!("key-{i}"),
                format!("sk-bench-{i:08}-0123456789abcdef0123456789abcdef"),
            )
        })
        .collect();
    let clock: SharedClock = ManualClock::new();
    let pool = KeyPool::new("bench", specs, policy, CooldownPolicy::default(), clock);
    for idx in (0..n).step_by(3) {
        pool.cool_down(idx, MODEL, Some(Duration::from_secs(600)));
    }
    pool
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_pool_pick");
    for (label, policy) in [
        ("round_robin", KeyPolicy::RoundRobin),
        ("least_in_flight", KeyPolicy::LeastInFlight),
    ] {
        for n in [10usize, 1_000, 100_000] {
            let pool = cooling_pool(n, policy);
            // Sanity: the pool hands out keys, and never a cooling one.
            for _ in 0..(2 * n).min(10_000) {
                match pool.pick(MODEL, &[]) {
                    Pick::Key(lease) => {
                        assert!(!lease.index().is_multiple_of(3), "picked a cooling key")
                    }
                    other => panic!("expected a key from {n} keys, got {other:?}"),
                }
            }
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(BenchmarkId::new(label, n), &pool, |b, pool| {
                // The lease is dropped at once: the request "finishes" before the next pick,
                // so least_in_flight sees idle keys, as on a lightly loaded gateway.
                b.iter(|| black_box(pool.pick(black_box(MODEL), black_box(&[]))));
            });
        }
    }
    group.finish();
}

fn bench_pick_affine(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_pool_pick_affine");
    for weighted in [false, true] {
        for n in [10usize, 100, 500] {
            let specs = (0..n)
                .map(|i| KeySpec {
                    weight: if weighted { 1 + (i % 3) as u32 } else { 1 },
                    ..KeySpec::named(format!("key-{i}"), format!("sk-bench-{i:08}-affine"))
                })
                .collect();
            let clock: SharedClock = ManualClock::new();
            let pool = KeyPool::new(
                "bench",
                specs,
                KeyPolicy::RoundRobin,
                CooldownPolicy::default(),
                clock,
            );
            for idx in (0..n).step_by(3) {
                pool.cool_down(idx, MODEL, Some(Duration::from_secs(600)));
            }
            let mut hash = 0x9e37_79b9_7f4a_7c15u64;
            group.throughput(Throughput::Elements(1));
            let label = if weighted { "weighted" } else { "equal" };
            group.bench_with_input(BenchmarkId::new(label, n), &pool, |b, pool| {
                b.iter(|| {
                    // A new hash each time, as requests bring.
                    hash = hash.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    match pool.pick_affine(black_box(hash), black_box(MODEL), black_box(&[])) {
                        Pick::Key(lease) => assert!(!lease.index().is_multiple_of(3)),
                        other => panic!("expected a key, got {other:?}"),
                    }
                });
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// Prose with the escapes real chat contents carry (newlines, quotes, a non-ASCII escape).
const PARAGRAPH: &str = "You are reviewing a pull request. The change moves the retry logic \
    into its own module and adds a \\\"budget\\\" per route.\\nPlease list risks, then suggest \
    tests; keep the answer under 200 words. Caf\\u00e9 names and code like `fn main() {}` may \
    appear.\\n\\n";

/// A chat completion request of about `target` bytes: a system prompt and alternating
/// user/assistant turns with long contents. `model_first` puts `model` first (as most SDKs
/// do); otherwise it is the last key, so the scanner must walk the whole body to find it.
fn chat_body(target: usize, model_first: bool) -> Vec<u8> {
    let turn_len = if target >= 64 * 1024 { 4096 } else { 300 };
    let mut content = String::new();
    while content.len() < turn_len {
        content.push_str(PARAGRAPH);
    }
    let head = if model_first {
        format!("{{\"model\":\"{MODEL}\",\"messages\":[")
    } else {
        "{\"messages\":[".to_string()
    };
    let tail = if model_first {
        "],\"temperature\":0.7,\"max_tokens\":512,\"stream\":false}".to_string()
    } else {
        format!("],\"temperature\":0.7,\"max_tokens\":512,\"stream\":false,\"model\":\"{MODEL}\"}}")
    };
    let mut body = head.into_bytes();
    body.extend_from_slice(b"{\"role\":\"system\",\"content\":\"You are a helpful assistant.\"}");
    let mut turn = 0usize;
    while body.len() + tail.len() < target {
        let role = if turn.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        let msg = format!(",{{\"role\":\"{role}\",\"content\":\"{content}\"}}");
        let room = target.saturating_sub(body.len() + tail.len());
        if msg.len() > room && turn > 0 {
            // Fill the remainder with a shorter last turn so the size is close to the target.
            let short: String = content.chars().take(room.saturating_sub(40)).collect();
            // Do not cut an escape sequence in half.
            let short = short.trim_end_matches('\\');
            body.extend_from_slice(
                format!(",{{\"role\":\"{role}\",\"content\":\"{short}\"}}").as_bytes(),
            );
            break;
        }
        body.extend_from_slice(msg.as_bytes());
        turn += 1;
    }
    body.extend_from_slice(tail.as_bytes());
    body
}

fn body_cases() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        ("1KiB", "model_first", chat_body(1024, true)),
        ("1KiB", "model_last", chat_body(1024, false)),
        ("1MiB", "model_first", chat_body(1024 * 1024, true)),
        ("1MiB", "model_last", chat_body(1024 * 1024, false)),
    ]
}

fn scanned(body: &[u8]) -> BodyInfo {
    let info = scan_json(body).expect("the benchmark body is valid JSON");
    assert_eq!(info.model.as_deref(), Some(MODEL));
    // The scanner must agree with a full parser on what it read.
    let full: serde_json::Value = serde_json::from_slice(body).expect("serde_json parses it");
    assert_eq!(full["model"].as_str(), Some(MODEL));
    info
}

fn bench_scan_json(c: &mut Criterion) {
    let mut group = c.benchmark_group("scan_json");
    for (size, place, body) in body_cases() {
        scanned(&body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new(size, place), &body, |b, body| {
            b.iter(|| scan_json(black_box(body)));
        });
    }
    group.finish();
}

fn bench_affinity_hash(c: &mut Criterion) {
    let mut group = c.benchmark_group("affinity_hash");
    for (size, place, body) in body_cases()
        .into_iter()
        .filter(|(_, place, _)| *place == "model_first")
    {
        let info = scanned(&body);
        assert!(info.affinity(&body).is_some(), "{size} {place}: no hash");
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| black_box(info.affinity(black_box(body))));
        });
    }
    group.finish();
}

fn bench_rewrite_model(c: &mut Criterion) {
    let mut group = c.benchmark_group("rewrite_model");
    for (size, place, body) in body_cases() {
        if place != "model_last" {
            continue;
        }
        let info = scanned(&body);
        let rewritten = info.rewrite_model(&body, "gpt-4o-mini-2024-07-18");
        let again = scan_json(&rewritten).expect("the rewritten body is valid JSON");
        assert_eq!(again.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| info.rewrite_model(black_box(body), black_box("gpt-4o-mini-2024-07-18")));
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Retry-After

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for &(name, value) in pairs {
        map.append(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("a valid header value"),
        );
    }
    map
}

/// The headers a 429 from OpenAI carries besides the retry hint.
const TYPICAL: &[(&str, &str)] = &[
    ("date", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ("content-type", "application/json; charset=utf-8"),
    ("content-length", "312"),
    ("openai-processing-ms", "12"),
    ("x-request-id", "req_0123456789abcdef0123456789abcdef"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "2000000"),
];

fn bench_requested_cooldown(c: &mut Criterion) {
    let date = "Wed, 21 Oct 2015 07:28:30 GMT";
    let now = parse_http_date(date).expect("a valid HTTP-date") - Duration::from_secs(30);
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut all = TYPICAL.to_vec();
        all.extend_from_slice(extra);
        headers(&all)
    };
    let cases: Vec<(&str, HeaderMap, Option<Duration>)> = vec![
        (
            "retry_after_ms",
            with(&[("retry-after-ms", "1500"), ("retry-after", "2")]),
            Some(Duration::from_millis(1500)),
        ),
        (
            "retry_after_http_date",
            with(&[("retry-after", date)]),
            Some(Duration::from_secs(30)),
        ),
        (
            "x_ratelimit_reset_tokens",
            with(&[
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ]),
            Some(Duration::from_secs(360)),
        ),
        ("no_hint", with(&[]), None),
    ];
    let mut group = c.benchmark_group("requested_cooldown");
    for (label, map, expected) in cases {
        assert_eq!(requested_cooldown(&map, now), expected, "{label}");
        group.bench_with_input(BenchmarkId::from_parameter(label), &map, |b, map| {
            b.iter(|| requested_cooldown(black_box(map), black_box(now)));
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Usage metering

const CHUNK_HEAD: &str = "{\"id\":\"chatcmpl-AZb1x2y3z4w5v6u7t8s9r0q1p2o3\",\"object\":\"chat.completion.chunk\",\
    \"created\":1730000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\"";

/// One content chunk of an OpenAI chat stream, as the upstream sends it when the request set
/// `stream_options.include_usage` (so every chunk says `"usage":null`).
fn content_chunk(i: usize) -> String {
    let word = [
        " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog.",
    ][i % 9];
    format!(
        "data: {CHUNK_HEAD},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\
         \"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
    )
}

/// The usage-only chunk that ends such a stream.
fn usage_chunk() -> String {
    format!(
        "data: {CHUNK_HEAD},\"choices\":[],\"usage\":{{\"prompt_tokens\":1234,\
         \"completion_tokens\":100,\"total_tokens\":1334,\"prompt_tokens_details\":\
         {{\"cached_tokens\":0,\"audio_tokens\":0}},\"completion_tokens_details\":\
         {{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\
         \"rejected_prediction_tokens\":0}}}}}}\n\n"
    )
}

/// A whole stream as network chunks: `n` content events, the usage event, `[DONE]`.
fn sse_stream(n: usize) -> Vec<Bytes> {
    let mut chunks: Vec<Bytes> = (0..n).map(|i| Bytes::from(content_chunk(i))).collect();
    chunks.push(Bytes::from(usage_chunk()));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    chunks
}

const EXPECTED: Usage = Usage {
    prompt: 1234,
    completion: 100,
};

fn bench_usage(c: &mut Criterion) {
    const CHUNKS: usize = 100;
    let stream = sse_stream(CHUNKS);
    let one = Bytes::from(content_chunk(3));
    let json = {
        let content = "This is a mock reply. ".repeat(40);
        format!(
            "{{\"id\":\"chatcmpl-AZb1x2y3z4w5v6u7t8s9r0q1p2o3\",\"object\":\"chat.completion\",\
             \"created\":1730000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\
             \"message\":{{\"role\":\"assistant\",\"content\":\"{content}\",\"refusal\":null}},\
             \"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":1234,\
             \"completion_tokens\":100,\"total_tokens\":1334}},\"system_fingerprint\":\"fp_0ba0d124f1\"}}"
        )
        .into_bytes()
    };

    // Sanity: the meter and the stripper read what the stream says.
    let mut meter = UsageMeter::for_response("text/event-stream; charset=utf-8");
    let mut stripper = UsageChunkStripper::new();
    let mut passed = 0;
    for chunk in &stream {
        meter.feed(chunk);
        passed += stripper.filter(chunk.clone()).len();
    }
    passed += stripper.finish().len();
    assert_eq!(meter.finish(), Some(EXPECTED));
    assert_eq!(stripper.stripped_usage(), Some(EXPECTED));
    let total: usize = stream.iter().map(Bytes::len).sum();
    assert_eq!(
        passed,
        total - usage_chunk().len(),
        "only the usage chunk is removed"
    );
    let mut json_meter = UsageMeter::for_response("application/json");
    json_meter.feed(&json);
    assert_eq!(json_meter.finish(), Some(EXPECTED));

    let mut group = c.benchmark_group("usage_meter");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sse_content_chunk", |b| {
        // One long-lived meter, as on a long stream: the cost of one more chunk.
        let mut meter = UsageMeter::for_response("text/event-stream");
        b.iter(|| meter.feed(black_box(&one)));
    });
    group.throughput(Throughput::Elements(stream.len() as u64));
    group.bench_function(
        BenchmarkId::new("sse_stream", format!("{CHUNKS}_chunks")),
        |b| {
            b.iter(|| {
                let mut meter = UsageMeter::for_response(black_box("text/event-stream"));
                for chunk in &stream {
                    meter.feed(black_box(chunk));
                }
                meter.finish()
            });
        },
    );
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function(
        BenchmarkId::new("json_response", format!("{}B", json.len())),
        |b| {
            b.iter(|| {
                let mut meter = UsageMeter::for_response(black_box("application/json"));
                meter.feed(black_box(&json));
                meter.finish()
            });
        },
    );
    group.finish();

    let mut group = c.benchmark_group("usage_stripper");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sse_content_chunk", |b| {
        let mut stripper = UsageChunkStripper::new();
        b.iter(|| stripper.filter(black_box(one.clone())));
    });
    group.throughput(Throughput::Elements(stream.len() as u64));
    group.bench_function(
        BenchmarkId::new("sse_stream", format!("{CHUNKS}_chunks")),
        |b| {
            b.iter(|| {
                let mut stripper = UsageChunkStripper::new();
                for chunk in &stream {
                    black_box(stripper.filter(chunk.clone()));
                }
                (stripper.finish(), stripper.stripped_usage())
            });
        },
    );
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// HeaderScan::feed

/// The request header the OpenAI Python SDK sends for a chat completion (about 600 bytes).
const SDK_HEADER: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\n\
Host: keygate.internal:8080\r\n\
Accept-Encoding: gzip, deflate\r\n\
Connection: keep-alive\r\n\
Accept: application/json\r\n\
Content-Type: application/json\r\n\
User-Agent: OpenAI/Python 1.54.3\r\n\
X-Stainless-Lang: python\r\n\
X-Stainless-Package-Version: 1.54.3\r\n\
X-Stainless-OS: Linux\r\n\
X-Stainless-Arch: x64\r\n\
X-Stainless-Runtime: CPython\r\n\
X-Stainless-Runtime-Version: 3.12.7\r\n\
Authorization: Bearer kg-0123456789abcdef0123456789abcdef\r\n\
X-Stainless-Async: false\r\n\
x-stainless-retry-count: 0\r\n\
Content-Length: 412\r\n\r\n";

/// Feeds `reads` to a fresh scanner; the header must be complete after the last one.
fn scan_header(reads: &[&[u8]]) -> ScanVerdict {
    let mut scan = HeaderScan::default();
    let mut verdict = ScanVerdict::Partial;
    for r in reads {
        verdict = scan.feed(black_box(r), 32 * 1024, 100);
    }
    assert!(matches!(verdict, ScanVerdict::Complete(_)), "{verdict:?}");
    verdict
}

fn bench_header_scan(c: &mut Criterion) {
    let mut big = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nCookie: ".to_vec();
    big.extend(std::iter::repeat_n(b'c', 30 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let cases: [(&str, Vec<&[u8]>, usize); 3] = [
        ("sdk_post", vec![SDK_HEADER], SDK_HEADER.len()),
        (
            "sdk_post_16_byte_reads",
            SDK_HEADER.chunks(16).collect(),
            SDK_HEADER.len(),
        ),
        ("cookie_30k", vec![&big[..]], big.len()),
    ];
    let mut group = c.benchmark_group("header_scan");
    for (name, reads, len) in &cases {
        group.throughput(Throughput::Bytes(*len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), reads, |b, reads| {
            b.iter(|| scan_header(reads));
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// KeyActivity::record

/// One attempt recorded in a key's activity, on the real clock (reading it is part of the cost):
/// a success (two window buckets and the last use), and an error (which also replaces the last
/// error under the key's own lock).
fn bench_activity_record(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_activity_record");
    let activity = KeyActivity::new(16, keygate::clock::system());
    group.bench_function("success", |b| {
        b.iter(|| activity.record(black_box(3), AttemptEnd::Answered(black_box(200))))
    });
    group.bench_function("error", |b| {
        b.iter(|| activity.record(black_box(3), AttemptEnd::Answered(black_box(429))))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Account-scoped objects

/// The id scan of a request body that names no object, at three sizes.
fn bench_objects_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("objects_scan");
    for (name, size) in [("1k", 1024), ("16k", 16 * 1024), ("256k", 256 * 1024)] {
        let body = chat_body(size, true);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| keygate::resources::ids::in_body(black_box(&body)).len())
        });
    }
    group.finish();
}

/// An owner lookup in a full table.
fn bench_objects_owner(c: &mut Criterion) {
    use keygate::resources::{table::ResourceTable, Owner};
    let mut group = c.benchmark_group("objects_owner");
    let table = ResourceTable::new(100_000, Duration::from_secs(3600), ManualClock::new());
    let owner = std::sync::Arc::new(Owner {
        upstream: "openai".into(),
        account: "org1".into(),
    });
    for i in 0..100_000 {
        table.record(&format!("file-{i:08}"), owner.clone());
    }
    group.bench_function("hit", |b| {
        b.iter(|| table.owner(black_box("file-00054321")).is_some())
    });
    group.bench_function("miss", |b| {
        b.iter(|| table.owner(black_box("file-nothere")).is_some())
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------

/// Short defaults so `cargo bench` finishes in a few minutes; criterion's command line
/// (`--measurement-time`, `--warm-up-time`, a filter) still overrides them: `criterion_group!`
/// applies it after this.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = bench_pick, bench_pick_affine, bench_affinity_hash, bench_scan_json, bench_rewrite_model, bench_requested_cooldown,
        bench_usage, bench_header_scan, bench_activity_record, bench_objects_scan, bench_objects_owner
}
criterion_main!(hot_paths);
