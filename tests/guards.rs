//! Connection guards below Pingora's parser, against the real binary: slow or oversized request
//! headers are answered 408/431 and closed while other clients are served; h2c and TLS still work.
//!
//! Some tests set `guards:` knobs (`header_timeout`, `idle_timeout`, caps); the others exercise
//! the defaults (10 s, 32 KiB, 100 fields, 60 s).
#![allow(clippy::unwrap_used)]

mod utils;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use utils::*;

fn config(mock: &Mock, guards: &str) -> String {
    format!(
        "{guards}upstreams:\n  mock:\n    url: {}\n    keys: [ {{ env: K1 }} ]\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    )
}

const KEYS: &[(&str, &str)] = &[("K1", "sk-one")];

/// A complete chat request with `extra` header lines (each ending in CRLF).
fn raw_chat(extra: &str) -> Vec<u8> {
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One HTTP/1.1 response read off a raw connection.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}{}", self.head, String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response (content-length, chunked or until close); `None` if the connection
/// closed before a whole header arrived.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut rest = buf[end..].to_vec();
    let lower = head.to_ascii_lowercase();
    let header = |name: &str| {
        lower
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let body = if let Some(len) = header("content-length:") {
        let len: usize = len.parse().unwrap();
        fill(s, &mut rest, len).await;
        rest.truncate(len);
        rest
    } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                let want = rest.len() + 1;
                fill(s, &mut rest, want).await;
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            let need = line_end + 2 + size + 2;
            fill(s, &mut rest, need).await;
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..need);
            if size == 0 {
                break body;
            }
        }
    } else {
        let mut all = rest;
        let _ = s.read_to_end(&mut all).await;
        all
    };
    Some(RawResponse { status, head, body })
}

/// Reads until `rest` holds at least `want` bytes.
async fn fill<S: AsyncRead + Unpin>(s: &mut S, rest: &mut Vec<u8>, want: usize) {
    let mut chunk = [0u8; 8192];
    while rest.len() < want {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-body");
        rest.extend_from_slice(&chunk[..n]);
    }
}

/// How a dribbling connection ended.
struct Dribbled {
    /// Everything the server sent.
    received: Vec<u8>,
    /// From the first byte sent until the server closed.
    lasted: Duration,
}

impl Dribbled {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// Sends `text` (cycled) one byte per `every` until the server gives up on the connection.
async fn dribble<S>(stream: S, text: &'static [u8], every: Duration) -> Dribbled
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        for b in text.iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut received = Vec::new();
    // An error (a reset after the server's close) still leaves what was read in `received`.
    let _ = tokio::time::timeout(Duration::from_secs(40), rd.read_to_end(&mut received)).await;
    let lasted = start.elapsed();
    writer.abort();
    Dribbled { received, lasted }
}

const SLOW_HEADER: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-slow: ";

async fn connect(kg: &Keygate) -> TcpStream {
    TcpStream::connect(("127.0.0.1", kg.port)).await.unwrap()
}

/// A normal request on a fresh connection: 200, and quickly (a bound generous enough for two
/// busy cores; a guard that stalled the server would take the whole header timeout).
async fn served_promptly(kg: &Keygate) {
    let start = Instant::now();
    let r = kg.post_chat(&chat("gpt-4o")).await;
    assert_eq!(r.status(), 200, "{}", kg.log_text());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a normal request took {:?}",
        start.elapsed()
    );
}

fn assert_error_response(text: &str, status: &str, code: &str) {
    assert!(
        text.starts_with(&format!("HTTP/1.1 {status}")),
        "wanted {status}, got {text:?}"
    );
    assert!(text
        .to_ascii_lowercase()
        .contains("\r\nconnection: close\r\n"));
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], code, "{text}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["param"].is_null());
    assert!(v["error"]["message"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_header_gets_408_at_the_default_header_timeout_while_others_are_served() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let slow = tokio::spawn(dribble(
        connect(&kg).await,
        SLOW_HEADER,
        Duration::from_secs(1),
    ));
    let mut silent = connect(&kg).await;
    let silent = tokio::spawn(async move {
        let start = Instant::now();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(40), silent.read_to_end(&mut got)).await;
        (got, start.elapsed())
    });
    // While both hold their connections, everyone else is served as usual.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        served_promptly(&kg).await;
    }
    let slow = slow.await.unwrap();
    assert_error_response(&slow.text(), "408", "request_timeout");
    assert!(
        slow.lasted >= Duration::from_secs(9) && slow.lasted <= Duration::from_secs(20),
        "cut after {:?}",
        slow.lasted
    );
    let (got, lasted) = silent.await.unwrap();
    assert!(
        got.is_empty(),
        "a silent connection gets no answer: {got:?}"
    );
    assert!(
        lasted >= Duration::from_secs(9) && lasted <= Duration::from_secs(20),
        "silent connection closed after {lasted:?}"
    );
    served_promptly(&kg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_header_gets_408_at_a_configured_header_timeout() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "guards: { header_timeout: 1s }\n"), KEYS);
    let slow = tokio::spawn(dribble(
        connect(&kg).await,
        SLOW_HEADER,
        Duration::from_millis(200),
    ));
    served_promptly(&kg).await;
    let slow = slow.await.unwrap();
    assert_error_response(&slow.text(), "408", "request_timeout");
    // At the configured 1 s, not the 10 s default: the upper bound only has to tell them apart.
    assert!(
        slow.lasted >= Duration::from_millis(900) && slow.lasted <= Duration::from_secs(6),
        "cut after {:?}",
        slow.lasted
    );
    served_promptly(&kg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_header_fields_get_431() {
    // Pingora alone accepts up to 256 fields; the guard's default cap is 100.
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let extra: String = (0..200).map(|i| format!("x-field-{i}: v\r\n")).collect();
    let mut s = connect(&kg).await;
    s.write_all(&raw_chat(&extra)).await.unwrap();
    let r = read_response(&mut s)
        .await
        .expect("an answer before the close");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "request_header_too_large");
    assert!(r.head.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(
        mock.count("sk-one").await,
        0,
        "nothing reached the upstream"
    );
    served_promptly(&kg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_kib_header_gets_431() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let extra = format!("x-pad: {}\r\n", "a".repeat(64 * 1024));
    let mut s = connect(&kg).await;
    s.write_all(&raw_chat(&extra)).await.unwrap();
    let r = read_response(&mut s)
        .await
        .expect("an answer before the close");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "request_header_too_large");
    // The connection is closed after the answer.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed after the answer");
    assert!(n.map_or(true, |n| n == 0));
    assert_eq!(mock.count("sk-one").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_kib_header_is_served() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("x-pad", "a".repeat(20 * 1024))
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", kg.log_text());
    let mut s = connect(&kg).await;
    s.write_all(&raw_chat(&format!("x-pad: {}\r\n", "b".repeat(20 * 1024))))
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_serves_requests_in_a_row() {
    // Each request after the first is guarded again; pauses under idle_timeout are fine.
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let mut s = connect(&kg).await;
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        s.write_all(&raw_chat("")).await.unwrap();
        let r = read_response(&mut s)
            .await
            .unwrap_or_else(|| panic!("request {i}: closed: {}", kg.log_text()));
        assert_eq!(r.status, 200, "request {i}: {}", r.head);
        assert_eq!(r.json()["object"], "chat.completion");
    }
    assert_eq!(mock.count("sk-one").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_100_continue_is_not_mistaken_for_a_header() {
    // The request body, over max_header_bytes, follows a response-side write (100 Continue).
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let content = "z".repeat(100 * 1024);
    let body = serde_json::to_vec(
        &serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}),
    )
    .unwrap();
    let mut s = connect(&kg).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Either a 100 Continue comes, or (as clients do) we send the body after a short wait.
    let mut first = [0u8; 12];
    let got_continue = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut first))
        .await
        .is_ok();
    if got_continue {
        assert_eq!(
            &first,
            b"HTTP/1.1 100",
            "{}",
            String::from_utf8_lossy(&first)
        );
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            line.push(b[0]);
        }
    }
    s.write_all(&body).await.unwrap();
    let r = read_response(&mut s).await.expect("a response");
    assert_eq!(r.status, 200, "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_still_served() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, ""), KEYS);
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = c
            .post(format!("{}/v1/chat/completions", kg.url))
            .header("x-pad", "a".repeat(20 * 1024))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", kg.log_text());
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_kept_alive_connection_is_closed_at_a_configured_idle_timeout() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "guards: { idle_timeout: 1s }\n"), KEYS);
    let mut s = connect(&kg).await;
    s.write_all(&raw_chat("")).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().status, 200);
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed when idle");
    assert!(rest.is_empty(), "no answer on an idle close: {rest:?}");
    let idle = start.elapsed();
    // At the configured 1 s, not the 60 s default.
    assert!(
        idle >= Duration::from_millis(900) && idle <= Duration::from_secs(10),
        "closed after {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_header_caps_apply() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(
        &config(
            &mock,
            "guards: { max_headers: 20, max_header_bytes: 4096 }\n",
        ),
        KEYS,
    );
    let many: String = (0..25).map(|i| format!("x-field-{i}: v\r\n")).collect();
    let big = format!("x-pad: {}\r\n", "a".repeat(5000));
    for extra in [many, big] {
        let mut s = connect(&kg).await;
        s.write_all(&raw_chat(&extra)).await.unwrap();
        assert_eq!(read_response(&mut s).await.unwrap().status, 431);
    }
    let mut s = connect(&kg).await;
    s.write_all(&raw_chat("x-ok: 1\r\n")).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_closes_are_counted_by_reason() {
    let mock = Mock::start(&[]);
    let mport = free_port();
    let guards = format!(
        "metrics: {{ addr: 127.0.0.1:{mport} }}\nguards: {{ header_timeout: 1s, idle_timeout: 1s, max_headers: 20 }}\n"
    );
    let kg = Keygate::start(&config(&mock, &guards), KEYS);
    // 431: too many header fields.
    let many: String = (0..25).map(|i| format!("x-field-{i}: v\r\n")).collect();
    let mut s = connect(&kg).await;
    s.write_all(&raw_chat(&many)).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().status, 431);
    // 400: a malformed request line.
    let mut bad = connect(&kg).await;
    bad.write_all(b"GET  /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut bad).await.unwrap().status, 400);
    // 408: a header still incomplete at the deadline.
    let slow = dribble(connect(&kg).await, SLOW_HEADER, Duration::from_millis(200)).await;
    assert_error_response(&slow.text(), "408", "request_timeout");
    // Idle: a kept-alive connection that goes quiet; silent: one that never says anything.
    let mut idle = connect(&kg).await;
    idle.write_all(&raw_chat("")).await.unwrap();
    assert_eq!(read_response(&mut idle).await.unwrap().status, 200);
    let mut silent = connect(&kg).await;
    for s in [&mut idle, &mut silent] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("closed by the guard")
            .unwrap();
    }
    // The count may be bumped just after the close the client saw.
    let name = "keygate_connection_closes_total";
    wait_for_metric(
        mport,
        name,
        &[("reason", "idle")],
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let m = wait_for_metric(
        mport,
        name,
        &[("reason", "silent")],
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let closes = |reason| sum(&m, name, &[("reason", reason)]);
    assert_eq!(closes("too_many_headers"), 1.0, "{m}");
    assert_eq!(closes("header_timeout"), 1.0, "{m}");
    assert_eq!(closes("malformed_header"), 1.0, "{m}");
    assert!(closes("idle") >= 1.0, "{m}");
    assert!(closes("silent") >= 1.0, "{m}");
    assert_eq!(closes("header_too_large"), 0.0, "{m}");
}

/// A CA and a server certificate for 127.0.0.1/localhost signed by it, as PEM files.
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A raw TLS connection offering only HTTP/1.1, trusting `ca`.
async fn tls_connect(
    port: u16,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_slow_header_gets_408_while_tls_h1_and_h2_clients_are_served() {
    // TLS is terminated before the guard, so it sees (and answers in) decrypted HTTP/1.1.
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(dir.path());
    let mock = Mock::start(&[]);
    let port = free_port();
    let yaml = format!(
        "listen:\n  - {{ addr: 127.0.0.1:{port}, tls: {{ cert: {}, key: {} }} }}\n{}",
        cert.display(),
        key.display(),
        config(&mock, "")
    );
    let (kdir, path, _) = write_config(&yaml);
    let kg = Keygate::start_with(kdir, &path, port, KEYS);
    let slow = tokio::spawn(dribble(
        tls_connect(port, &ca).await,
        SLOW_HEADER,
        Duration::from_secs(1),
    ));
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let h2 = round % 2 == 1;
        let mut b = reqwest::Client::builder().add_root_certificate(root.clone());
        if !h2 {
            b = b.http1_only();
        }
        let start = Instant::now();
        let r = b
            .build()
            .unwrap()
            .post(format!("https://localhost:{port}/v1/chat/completions"))
            .header("x-pad", "a".repeat(20 * 1024))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", kg.log_text());
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), want);
        assert!(start.elapsed() < Duration::from_secs(3));
    }
    let slow = slow.await.unwrap();
    assert_error_response(&slow.text(), "408", "request_timeout");
    assert!(
        slow.lasted >= Duration::from_secs(9) && slow.lasted <= Duration::from_secs(20),
        "cut after {:?}",
        slow.lasted
    );
}
