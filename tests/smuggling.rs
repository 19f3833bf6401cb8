//! Request smuggling and malformed HTTP: a corpus of raw requests sent over plain TCP to a
//! running keygate in front of the mock.
//!
//! - A request whose framing or syntax is invalid is answered with its documented status (400;
//!   501 for a transfer coding keygate does not implement),
//!   the connection is closed, and nothing reaches the upstream: neither a request (the mock's
//!   count) nor a connection (keygate never connects before a valid request).
//! - A form RFC 9112 lets a recipient accept (a bare LF line end, optional whitespace around a
//!   field value, a chunk extension, identical duplicate lengths) reaches the upstream as exactly
//!   one well-formed request with the body the client meant.
//! - A request with both `Content-Length` and `Transfer-Encoding` never lets a second request
//!   through, whichever framing wins; keygate refuses it (400).
#![allow(clippy::unwrap_used)]

mod utils;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use utils::h2_frames::{self, RawH2};
use utils::*;

const BODY: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

/// A short header timeout so that a request that never completes is cut quickly.
fn config(mock: &Mock) -> String {
    format!(
        "guards: {{ header_timeout: 2s }}\nupstreams:\n  mock:\n    url: {}\n    health: {{ enabled: false }}\n    keys: [ {{ env: K1 }} ]\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    )
}

const KEYS: &[(&str, &str)] = &[("K1", "sk-smuggling-test")];

/// The request line and the fields every case shares, each line ending in CRLF.
fn head() -> Vec<u8> {
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        .to_vec()
}

fn cl(n: usize) -> Vec<u8> {
    format!("Content-Length: {n}\r\n").into_bytes()
}

/// `body` as one chunk and the last chunk.
fn chunked(body: &[u8]) -> Vec<u8> {
    [
        format!("{:x}\r\n", body.len()).as_bytes(),
        body,
        b"\r\n0\r\n\r\n",
    ]
    .concat()
}

/// A request made of `parts`.
fn req(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A request with the shared head, `fields` (CRLF-terminated), the blank line and `body`.
fn with(fields: &[u8], body: &[u8]) -> Vec<u8> {
    req(&[&head(), fields, b"\r\n", body])
}

/// A valid body after `fields` that a correct recipient never reads as a request: framing,
/// field-syntax and request-line errors come before it.
fn plain(fields: &[u8]) -> Vec<u8> {
    with(&[&cl(BODY.len()), fields].concat(), BODY)
}

/// A chunked request whose chunk-size line is `size_line` (without its CRLF).
fn bad_chunk(size_line: &[u8]) -> Vec<u8> {
    with(
        b"Transfer-Encoding: chunked\r\n",
        &req(&[size_line, b"\r\n", BODY, b"\r\n0\r\n\r\n"]),
    )
}

/// Sends `bytes` on a fresh connection and reads for up to `limit`.
async fn exchange(port: u16, bytes: Vec<u8>, limit: Duration) -> RawExchange {
    tokio::task::spawn_blocking(move || raw_exchange(port, &bytes, limit))
        .await
        .unwrap()
}

/// Sends `bytes` on a fresh connection and reads one whole response (or for up to `limit`).
async fn exchange_one(port: u16, bytes: Vec<u8>, limit: Duration) -> RawExchange {
    tokio::task::spawn_blocking(move || raw_exchange_until(port, &bytes, limit, has_whole_response))
        .await
        .unwrap()
}

/// Requests and connections the mock has seen.
async fn upstream_seen(mock: &Mock) -> (u64, u64) {
    let s = mock.stats().await;
    (
        s["total"].as_u64().unwrap(),
        s["connections"].as_u64().unwrap(),
    )
}

/// The invalid-syntax corpus answered correctly today: (name, request, documented statuses).
fn refused_corpus() -> Vec<(&'static str, Vec<u8>, &'static [u16])> {
    const BAD: &[u16] = &[400];
    let te = |v: &[u8]| with(&req(&[b"Transfer-Encoding:", v, b"\r\n"]), &chunked(BODY));
    vec![
        // Framing.
        (
            "two different Content-Lengths",
            with(&[cl(BODY.len()), cl(BODY.len() + 5)].concat(), &[BODY, b"XXXXX"].concat()),
            BAD,
        ),
        (
            "a Content-Length list of different values",
            with(
                format!("Content-Length: {}, {}\r\n", BODY.len(), BODY.len() + 1).as_bytes(),
                &[BODY, b"X"].concat(),
            ),
            BAD,
        ),
        ("Content-Length -1", with(b"Content-Length: -1\r\n", BODY), BAD),
        (
            "Content-Length with a plus sign",
            with(format!("Content-Length: +{}\r\n", BODY.len()).as_bytes(), BODY),
            BAD,
        ),
        ("Content-Length in hex", with(b"Content-Length: 0x3e\r\n", BODY), BAD),
        (
            "a Content-Length past u64",
            with(b"Content-Length: 99999999999999999999999\r\n", BODY),
            BAD,
        ),
        ("Transfer-Encoding: chunked, identity", te(b" chunked, identity"), BAD),
        ("Transfer-Encoding: xchunked", te(b" xchunked"), BAD),
        ("Transfer-Encoding: chunked\\v (vertical tab)", te(b" \x0bchunked"), BAD),
        (
            "Transfer-Encoding: identity with a length",
            with(&[b"Transfer-Encoding: identity\r\n".to_vec(), cl(BODY.len())].concat(), BODY),
            BAD,
        ),
        ("Transfer-Encoding: gzip", with(b"Transfer-Encoding: gzip\r\n", BODY), BAD),
        (
            "Transfer-Encoding twice, chunked first",
            with(
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                &chunked(BODY),
            ),
            BAD,
        ),
        (
            "a space before the colon of Transfer-Encoding",
            with(b"Transfer-Encoding : chunked\r\n", &chunked(BODY)),
            BAD,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            req(&[
                b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &chunked(BODY),
            ]),
            BAD,
        ),
        // Obsolete line folding.
        ("obs-fold with a space", plain(b"X-Folded: a\r\n b\r\n"), BAD),
        ("obs-fold with a tab", plain(b"X-Folded: a\r\n\tb\r\n"), BAD),
        (
            "obs-fold hiding a Transfer-Encoding",
            plain(b"X-Folded: a\r\n Transfer-Encoding: chunked\r\n"),
            BAD,
        ),
        (
            "a first field line starting with a space",
            with(b" Transfer-Encoding: chunked\r\n", &chunked(BODY)),
            BAD,
        ),
        // Bytes a field may not hold.
        ("NUL in a value", plain(b"X-A: a\x00b\r\n"), BAD),
        ("NUL in a name", plain(b"X-\x00A: b\r\n"), BAD),
        ("a control byte in a value", plain(b"X-A: a\x01b\r\n"), BAD),
        ("DEL in a value", plain(b"X-A: a\x7fb\r\n"), BAD),
        ("a lone CR in a value", plain(b"X-A: a\rb\r\n"), BAD),
        ("a control byte in a name", plain(b"X-\x01A: b\r\n"), BAD),
        ("a space in a name", plain(b"X A: b\r\n"), BAD),
        ("a field without a colon", plain(b"X-A b\r\n"), BAD),
        ("an empty name", plain(b": b\r\n"), BAD),
        ("a separator in a name", plain(b"X(A): b\r\n"), BAD),
        ("a non-ASCII name", plain("X-Ä: b\r\n".as_bytes()), BAD),
        ("two Host fields", plain(b"Host: other\r\n"), BAD),
        ("lines ended by a bare CR", {
            let r = plain(b"");
            r.iter().map(|b| if *b == b'\n' { b'\r' } else { *b }).collect::<Vec<u8>>()
        }, BAD),
        // Request lines.
        ("a request line of garbage", b"GARBAGE\r\n\r\n".to_vec(), BAD),
        (
            "a method with a separator",
            req(&[b"P@ST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", &cl(BODY.len()), b"\r\n", BODY]),
            BAD,
        ),
        (
            "a request line without a version",
            req(&[b"POST /v1/chat/completions\r\nHost: x\r\n", &cl(BODY.len()), b"\r\n", BODY]),
            BAD,
        ),
        (
            "HTTP/1.2",
            req(&[b"POST /v1/chat/completions HTTP/1.2\r\nHost: x\r\n", &cl(BODY.len()), b"\r\n", BODY]),
            BAD,
        ),
        (
            "an HTTP/2.0 request line over HTTP/1",
            req(&[b"POST /v1/chat/completions HTTP/2.0\r\nHost: x\r\n", &cl(BODY.len()), b"\r\n", BODY]),
            BAD,
        ),
        ("HTTP/0.9 as a version", b"GET /v1/models HTTP/0.9\r\n\r\n".to_vec(), BAD),
        (
            "an HTTP/0.9 simple request",
            b"GET /v1/models\r\n".to_vec(),
            // A request line ended before its version: refused at its line end.
            BAD,
        ),
        ("tabs between the request line's parts", b"GET\t/v1/models\tHTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), BAD),
        (
            "an absolute URI naming another host than Host",
            b"GET http://elsewhere.example/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
            BAD,
        ),
    ]
}

/// Whether the first response's body is an OpenAI-style error (`{"error":{"message","type",
/// "code"}}`), as keygate's own answers are (Pingora's bare error pages have no body).
fn is_openai_error(got: &RawExchange) -> bool {
    let Some(end) = got.received.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let body: serde_json::Value = match serde_json::from_slice(&got.received[end + 4..]) {
        Ok(v) => v,
        Err(_) => return false,
    };
    ["message", "type", "code"]
        .iter()
        .all(|k| body["error"][k].is_string())
}

/// Sends each case on its own connection and checks: one answer with a documented status, the
/// connection closed, nothing of it upstream; with `json`, the answer is keygate's own
/// OpenAI-style error. Returns the failures, one line each.
async fn refusals(
    kg: &Keygate,
    mock: &Mock,
    corpus: Vec<(&'static str, Vec<u8>, &'static [u16])>,
    must_close: bool,
    json: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, bytes, statuses) in corpus {
        let before = upstream_seen(mock).await;
        let got = exchange(kg.port, bytes, Duration::from_secs(8)).await;
        let after = upstream_seen(mock).await;
        let status = got.status();
        let mut wrong = Vec::new();
        if !status.is_some_and(|s| statuses.contains(&s)) {
            wrong.push(format!("status {status:?}, wanted {statuses:?}"));
        }
        if got.responses() > 1 {
            wrong.push(format!("{} responses", got.responses()));
        }
        if must_close && !got.closed {
            wrong.push("left open".to_string());
        }
        if json && !is_openai_error(&got) {
            wrong.push("not an OpenAI-style error body".to_string());
        }
        if after.0 != before.0 {
            wrong.push(format!(
                "{} request(s) reached the upstream",
                after.0 - before.0
            ));
        }
        // A request the mock cannot parse is not counted, but keygate connected to send it.
        if after.1 != before.1 {
            wrong.push(format!(
                "{} connection(s) opened to the upstream",
                after.1 - before.1
            ));
        }
        if !wrong.is_empty() {
            let shown: String = got.text().chars().take(200).collect();
            failures.push(format!("{name}: {} ({shown:?})", wrong.join(", ")));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_closed_and_never_reach_the_upstream() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let failures = refusals(&kg, &mock, refused_corpus(), true, false).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        upstream_seen(&mock).await,
        (0, 0),
        "keygate never even connected to the upstream"
    );
    // And it still serves.
    assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
}

/// Malformed chunked bodies: a client error (400), nothing reaches the upstream, and the
/// connection closes (where the next request would start is unknown).
fn bad_chunk_corpus() -> Vec<(&'static str, Vec<u8>, &'static [u16])> {
    const BAD: &[u16] = &[400];
    vec![
        ("a chunk size that is not hex", bad_chunk(b"zz"), BAD),
        (
            "a chunk size past u64",
            bad_chunk(b"fffffffffffffffff1"),
            BAD,
        ),
        ("a negative chunk size", bad_chunk(b"-5"), BAD),
        (
            "a chunk size with 0x",
            bad_chunk(format!("0x{:x}", BODY.len()).as_bytes()),
            BAD,
        ),
        (
            "a chunk size with a plus sign",
            bad_chunk(format!("+{:x}", BODY.len()).as_bytes()),
            BAD,
        ),
        (
            "a 100 KB chunk extension",
            bad_chunk(
                &[
                    format!("{:x};", BODY.len()).into_bytes(),
                    vec![b'a'; 100_000],
                ]
                .concat(),
            ),
            &[400, 413],
        ),
        (
            "chunk data longer than its size",
            with(
                b"Transfer-Encoding: chunked\r\n",
                &req(&[
                    format!("{:x}\r\n", BODY.len() - 5).as_bytes(),
                    BODY,
                    b"\r\n0\r\n\r\n",
                ]),
            ),
            BAD,
        ),
        (
            "chunk lines ended by a bare LF",
            with(
                b"Transfer-Encoding: chunked\r\n",
                &req(&[format!("{:x}\n", BODY.len()).as_bytes(), BODY, b"\n0\n\n"]),
            ),
            BAD,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_never_reach_the_upstream() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    // Any final answer will do here; its status is the next test's business.
    let any: &[u16] = &[400, 408, 413, 500];
    let corpus = bad_chunk_corpus()
        .into_iter()
        .map(|(name, bytes, _)| (name, bytes, any))
        .collect();
    let failures = refusals(&kg, &mock, corpus, true, false).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(upstream_seen(&mock).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_get_400() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let failures = refusals(&kg, &mock, bad_chunk_corpus(), true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_body_gets_no_answer_and_is_not_keygates_error() {
    // Unlike a malformed body, a body cut short by the client leaving is nobody's to answer:
    // no local error is counted (it is not keygate's failure), nothing reaches the upstream.
    let mock = Mock::start(&[]);
    let mport = free_port();
    let yaml = format!(
        "metrics: {{ addr: 127.0.0.1:{mport} }}\naccess_log: {{ path: {{dir}}/access.log }}\n{}",
        config(&mock)
    );
    let kg = Keygate::start(&yaml, KEYS);
    let cut_short = [
        with(&cl(1000), &BODY[..10]),
        with(b"Transfer-Encoding: chunked\r\n", b"3e8\r\n0123456789"),
    ];
    for bytes in cut_short {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
        std::io::Write::write_all(&mut s, &bytes).unwrap();
        drop(s);
    }
    let log = wait_for_lines(
        &kg.dir.path().join("access.log"),
        2,
        Duration::from_secs(10),
    )
    .await;
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["status"], 0, "no answer was written: {line}");
    }
    let m = scrape(mport).await;
    assert_eq!(
        sum(&m, "keygate_local_responses_total", &[]),
        0.0,
        "no local answer: {m}"
    );
    assert_eq!(upstream_seen(&mock).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_line_closes_the_connection() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let corpus = vec![(
        "two spaces after the method",
        req(&[
            b"POST  /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
            &cl(BODY.len()),
            b"\r\n",
            BODY,
        ]),
        &[400u16][..],
    )];
    let failures = refusals(&kg, &mock, corpus, true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_with_whitespace_or_control_bytes_get_400() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let get = |target: &[u8]| req(&[b"GET ", target, b" HTTP/1.1\r\nHost: x\r\n\r\n"]);
    let corpus = vec![
        ("a space in the target", get(b"/v1/mo dels"), &[400u16][..]),
        ("NUL in the target", get(b"/v1/mo\x00dels"), &[400][..]),
        (
            "a control byte in the target",
            get(b"/v1/mo\x01dels"),
            &[400][..],
        ),
        ("DEL in the target", get(b"/v1/mo\x7fdels"), &[400][..]),
    ];
    let failures = refusals(&kg, &mock, corpus, true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_host_gets_400() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let corpus = vec![(
        "no Host",
        req(&[
            b"POST /v1/chat/completions HTTP/1.1\r\n",
            &cl(BODY.len()),
            b"\r\n",
            BODY,
        ]),
        &[400u16][..],
    )];
    let failures = refusals(&kg, &mock, corpus, true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_named_twice_is_refused() {
    // RFC 9112 §6.1: a sender MUST NOT chunk a body twice, so such framing is invalid (400).
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let corpus = vec![
        (
            "Transfer-Encoding: chunked, chunked",
            with(b"Transfer-Encoding: chunked, chunked\r\n", &chunked(BODY)),
            &[400u16][..],
        ),
        (
            "Transfer-Encoding: chunked on two lines",
            with(
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                &chunked(BODY),
            ),
            &[400u16][..],
        ),
    ];
    let failures = refusals(&kg, &mock, corpus, true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    // RFC 9112 §6.1: a server SHOULD answer 501 to a transfer coding it does not understand
    // (with chunked last the length is known, so this is not a framing error). Pingora would
    // decode the chunks and forward the still-gzipped bytes as the body.
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let corpus = vec![
        (
            "Transfer-Encoding: gzip, chunked",
            with(b"Transfer-Encoding: gzip, chunked\r\n", &chunked(BODY)),
            &[501u16][..],
        ),
        (
            "Transfer-Encoding: gzip then chunked on two lines",
            with(
                b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                &chunked(BODY),
            ),
            &[501u16][..],
        ),
    ];
    let failures = refusals(&kg, &mock, corpus, true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A request with both framings, followed on the same connection by a second request a
/// front-end reading the other framing would see.
fn conflicting_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let smuggled: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    vec![
        (
            "Content-Length then Transfer-Encoding",
            with(
                &[cl(6), b"Transfer-Encoding: chunked\r\n".to_vec()].concat(),
                &[&chunked(BODY)[..], smuggled].concat(),
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            with(
                &[b"Transfer-Encoding: chunked\r\n".to_vec(), cl(6)].concat(),
                &[&chunked(BODY)[..], smuggled].concat(),
            ),
        ),
        (
            "a Content-Length covering the smuggled request",
            with(
                &[
                    cl(chunked(BODY).len() + smuggled.len()),
                    b"Transfer-Encoding: chunked\r\n".to_vec(),
                ]
                .concat(),
                &[&chunked(BODY)[..], smuggled].concat(),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_content_length_and_transfer_encoding_never_smuggle_a_second_request() {
    // RFC 9112 §6.1 lets a server refuse such a request, or read it by Transfer-Encoding alone
    // and close the connection after answering. Either way no second request goes through.
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    for (name, bytes) in conflicting_corpus() {
        let before = upstream_seen(&mock).await.0;
        let got = exchange(kg.port, bytes, Duration::from_secs(8)).await;
        let stats = mock.stats().await;
        let reached = stats["total"].as_u64().unwrap() - before;
        assert!(got.closed, "{name}: left open: {}", got.text());
        assert_eq!(got.responses(), 1, "{name}: {}", got.text());
        match got.status() {
            Some(400) => assert_eq!(reached, 0, "{name}: refused but forwarded"),
            Some(200) => {
                assert_eq!(reached, 1, "{name}: only the first request goes upstream");
                let last = &stats["last_request"];
                assert_eq!(last["path"], "/v1/chat/completions", "{name}");
                assert_eq!(
                    last["body_sha256"],
                    hex_sha256(BODY),
                    "{name}: read by its chunks"
                );
            }
            other => panic!("{name}: {other:?}: {}", got.text()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_content_length_and_transfer_encoding_get_400() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let corpus = conflicting_corpus()
        .into_iter()
        .map(|(name, bytes)| (name, bytes, &[400u16][..]))
        .collect();
    let failures = refusals(&kg, &mock, corpus, true, true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_a_recipient_may_accept_reach_the_upstream_as_one_well_formed_request() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let te = |v: &[u8]| with(&req(&[b"Transfer-Encoding:", v, b"\r\n"]), &chunked(BODY));
    let bare_lf: Vec<u8> = plain(b"")
        .windows(2)
        .enumerate()
        .filter(|(_, w)| *w != b"\r\n")
        .map(|(_, w)| w[0])
        .chain(std::iter::once(*BODY.last().unwrap()))
        .collect();
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("bare LF line ends", bare_lf),
        (
            "an empty line before the request line",
            req(&[b"\r\n", &plain(b"")]),
        ),
        (
            "Transfer-Encoding with two spaces before chunked",
            te(b"  chunked"),
        ),
        (
            "Transfer-Encoding with a tab before chunked",
            te(b"\tchunked"),
        ),
        ("Transfer-Encoding: CHUNKED", te(b" CHUNKED")),
        ("trailing whitespace after chunked", te(b" chunked \t")),
        (
            "a chunk extension",
            with(
                b"Transfer-Encoding: chunked\r\n",
                &req(&[
                    format!("{:x};name=value\r\n", BODY.len()).as_bytes(),
                    BODY,
                    b"\r\n0\r\n\r\n",
                ]),
            ),
        ),
        (
            "several chunks and a trailer",
            with(
                b"Transfer-Encoding: chunked\r\n",
                &req(&[
                    format!("{:x}\r\n", 10).as_bytes(),
                    &BODY[..10],
                    format!("\r\n{:x}\r\n", BODY.len() - 10).as_bytes(),
                    &BODY[10..],
                    b"\r\n0\r\nX-Trailer: t\r\n\r\n",
                ]),
            ),
        ),
        (
            "the same Content-Length twice",
            with(&[cl(BODY.len()), cl(BODY.len())].concat(), BODY),
        ),
        (
            "a Content-Length list of one value",
            with(
                format!("Content-Length: {0}, {0}\r\n", BODY.len()).as_bytes(),
                BODY,
            ),
        ),
    ];
    for (name, bytes) in corpus {
        let before = upstream_seen(&mock).await.0;
        let got = exchange_one(kg.port, bytes, Duration::from_secs(10)).await;
        assert_eq!(got.status(), Some(200), "{name}: {}", got.text());
        assert_eq!(got.responses(), 1, "{name}: {}", got.text());
        let stats = mock.stats().await;
        assert_eq!(
            stats["total"].as_u64().unwrap() - before,
            1,
            "{name}: one request upstream"
        );
        let last = &stats["last_request"];
        assert_eq!(
            last["body_sha256"],
            hex_sha256(BODY),
            "{name}: the body as meant"
        );
        assert_eq!(
            last["headers"]["content-length"],
            BODY.len().to_string(),
            "{name}: {last}"
        );
        assert!(
            last["headers"].get("transfer-encoding").is_none(),
            "{name}: {last}"
        );
        assert!(last["headers"].get("x-trailer").is_none(), "{name}: {last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_on_http2_is_a_malformed_request_that_never_reaches_the_upstream() {
    // RFC 9113 §8.2.2: a connection-specific field makes the request malformed (a stream error
    // PROTOCOL_ERROR); an h2 client library refuses to send one, so the frames are written here.
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock), KEYS);
    let port = kg.port;
    let verdict = tokio::task::spawn_blocking(move || {
        let mut h2 = RawH2::connect(port);
        let mut bytes = h2_frames::post_headers(
            1,
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("transfer-encoding", "chunked"),
            ],
            false,
        );
        bytes.extend(h2_frames::frame(
            h2_frames::DATA,
            h2_frames::END_STREAM,
            1,
            BODY,
        ));
        h2.send(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The answer on stream 1: a reset, a GOAWAY, or HEADERS with an indexed `:status 400`.
        loop {
            let f = h2
                .next_on_stream(1, deadline)
                .expect("an answer on stream 1");
            match f.kind {
                h2_frames::RST_STREAM | h2_frames::GOAWAY => {
                    break format!("{} {:?}", f.kind, f.error_code());
                }
                h2_frames::HEADERS => break format!("headers {:02x?}", &f.payload[..1]),
                _ => continue,
            }
        }
    })
    .await
    .unwrap();
    let refused = [
        format!(
            "{} Some({})",
            h2_frames::RST_STREAM,
            h2_frames::PROTOCOL_ERROR
        ),
        format!("{} Some({})", h2_frames::GOAWAY, h2_frames::PROTOCOL_ERROR),
        "headers [8c]".to_string(),
    ];
    assert!(refused.contains(&verdict), "answered {verdict}");
    assert_eq!(upstream_seen(&mock).await, (0, 0));
    // A valid request over h2c is served: the refusal was for the field.
    let r = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
