//! Request bodies under careless and hostile clients: `Expect: 100-continue` changes nothing
//! about failover and local answers, everything that can refuse a request does so before its
//! body is read, a body must arrive within its deadline, and the bytes held at once are capped.
#![allow(clippy::unwrap_used)]

mod utils;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use utils::*;

const KEYS: &[(&str, &str)] = &[("KA", "sk-a"), ("KB", "sk-b")];

fn config(mock: &Mock, top: &str) -> String {
    format!(
        "{top}upstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA }}\n      - {{ name: b, env: KB }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    )
}

/// A chat POST that says `Expect: 100-continue` (reqwest sends the body at once, which a server
/// must accept; keygate still writes its `100` first, which hyper reads past).
async fn post_expecting_continue(kg: &Keygate, model: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("expect", "100-continue")
        .json(&chat(model))
        .send()
        .await
        .unwrap()
}

/// Sends `head` (a request header without its body) and reads what comes back until the
/// connection closes or `wait` passes.
fn raw_exchange(port: u16, head: &str, wait: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.starts_with(b"HTTP/1.1 4") {
            // A final error header arrived; its short body follows in the same write.
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(n) = s.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a whole chat request with `Expect: 100-continue` over a raw connection (as curl does for
/// large bodies) and returns everything the client receives until keygate closes or answers.
fn raw_expect_continue_chat(port: u16) -> String {
    let body = serde_json::to_vec(&chat("gpt-4o")).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_still_fails_over_to_another_key() {
    let mock = Mock::start(&[
        "--key",
        "sk-a=rate_limit:retry_after=30",
        "--key",
        "sk-b=ok",
    ]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    for _ in 0..2 {
        let answer = raw_expect_continue_chat(kg.port);
        assert!(
            answer.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
            "{answer:?}"
        );
        let last = &answer["HTTP/1.1 100 Continue\r\n\r\n".len()..];
        assert!(last.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(last.contains("chat.completion"), "{answer:?}");
    }
    assert_eq!(
        mock.count("sk-a").await,
        1,
        "a answered 429 once, then rested"
    );
    assert_eq!(mock.count("sk-b").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_still_gets_keygates_own_answers() {
    // Every key rests after its 429: keygate answers 429 itself; then all disabled: 503.
    let mock = Mock::start(&[
        "--key",
        "sk-a=rate_limit:retry_after=30",
        "--key",
        "sk-b=rate_limit:retry_after=30",
    ]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let first = post_expecting_continue(&kg, "gpt-4o").await;
    assert_eq!(first.status(), 429, "the last upstream 429 passes");
    let r = post_expecting_continue(&kg, "gpt-4o").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_its_413_before_any_100() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "max_body_bytes: 1MiB\n"), KEYS);
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n";
    let answer = raw_exchange(kg.port, head, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(!answer.contains("100 Continue"), "{answer:?}");
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limits_refuse_before_the_body_is_invited() {
    let mock = Mock::start(&[]);
    let yaml = config(
        &mock,
        "clients:\n  - { name: one, token_env: TOKEN, limits: { rpm: 1 } }\n",
    );
    let kg = Keygate::start(&yaml, &[("KA", "sk-a"), ("KB", "sk-b"), ("TOKEN", "tok-1")]);
    let ok = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .bearer_auth("tok-1")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // The second request is over the limit: its 429 comes without reading (or inviting) a body.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\nContent-Type: application/json\r\nContent-Length: 500000\r\nExpect: 100-continue\r\n\r\n";
    let answer = raw_exchange(kg.port, head, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    assert!(answer.contains("rate_limit_requests"), "{answer:?}");
    // A wrong token is refused the same way.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Length: 500000\r\nExpect: 100-continue\r\n\r\n";
    let answer = raw_exchange(kg.port, head, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_past_its_deadline_gets_a_408() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "guards: { body_timeout: 1s }\n"), KEYS);
    let mut s = TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        .unwrap();
    let start = Instant::now();
    // A byte every 200 ms keeps any per-read timeout from firing; only the whole-body deadline can.
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(20) {
        if s.write_all(b" ").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "408 after {:?}",
        start.elapsed()
    );
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), 0);
}

/// keygate with 1 MiB bodies and a 1 MiB buffer budget, and its metrics port.
fn with_a_one_mib_buffer(mock: &Mock) -> (Keygate, u16) {
    let mport = free_port();
    let top = format!(
        "max_body_bytes: 1MiB\nmax_buffered_bytes: 1MiB\nmetrics: {{ addr: 127.0.0.1:{mport} }}\n"
    );
    (Keygate::start(&config(mock, &top), KEYS), mport)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_beyond_the_buffer_cap_wait_then_get_a_503() {
    let mock = Mock::start(&[]);
    let (kg, mport) = with_a_one_mib_buffer(&mock);
    // One client sends all but the last 40 KiB of a MiB, then stalls: its bytes hold the budget.
    let mut hog = TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    hog.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{")
        .unwrap();
    hog.write_all(&vec![b' '; (1 << 20) - (40 << 10)]).unwrap();
    // Let keygate read those bytes before the second request arrives.
    wait_for_metric(
        mport,
        "keygate_buffered_body_bytes",
        &[],
        900_000.0,
        Duration::from_secs(20),
    )
    .await;
    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let r = kg.post_chat(&body).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "server_busy");
    drop(hog);
    // Room comes back when the hog goes away.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = kg.post_chat(&body).await;
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {}", r.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Room in the buffer budget follows the bytes that came, not the bytes announced: clients that
/// announce the whole budget and send a byte do not keep others out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcing_a_large_body_holds_no_room_until_its_bytes_come() {
    let mock = Mock::start(&[]);
    let (kg, mport) = with_a_one_mib_buffer(&mock);
    let announcers: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
            c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{")
                .unwrap();
            c
        })
        .collect();
    // All four are reading their bodies: each holds its first room (64 KiB), not a MiB.
    let text = wait_for_metric(
        mport,
        "keygate_buffered_body_bytes",
        &[],
        4.0 * 65536.0,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        sum(&text, "keygate_buffered_body_bytes", &[]),
        4.0 * 65536.0
    );
    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    assert_eq!(kg.post_chat(&body).await.status(), 200);
    drop(announcers);
}

/// After a burst of large bodies, keygate gives the memory back instead of keeping it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_falls_back_near_idle_after_a_burst_of_large_bodies() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "max_body_bytes: 17MiB\n"), KEYS);
    // Warm up so the idle figure includes the first request's one-off allocations.
    assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    let idle = kg.rss_kib();
    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(16 << 20)}]});
    // Serialised once, and each request on its own task: serialising 16 MiB inside a shared
    // future would hold the other requests' connections silent past the header deadline on a
    // busy machine.
    let body = bytes::Bytes::from(serde_json::to_vec(&body).unwrap());
    let url = format!("{}/v1/chat/completions", kg.url);
    let sends = (0..8).map(|_| {
        let (url, body) = (url.clone(), body.clone());
        tokio::spawn(async move {
            client()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    for status in futures_util::future::join_all(sends).await {
        assert_eq!(status.unwrap(), 200);
    }
    // Generous: the bodies alone were 128 MiB; what stays must be a small fraction of that.
    let bound = idle + 48 * 1024;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = kg.rss_kib();
        if now < bound {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS {now} KiB stays above {bound} KiB (idle {idle} KiB)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
