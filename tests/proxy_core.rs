//! The core promise: one endpoint in front of many keys, keys injected, bodies and streams intact.
#![allow(clippy::unwrap_used)]

mod utils;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use utils::*;

const THREE_KEYS: &[(&str, &str)] = &[("K1", "sk-one"), ("K2", "sk-two"), ("K3", "sk-three")];

fn three_key_config(mock: &Mock, extra_routes: &str) -> String {
    format!(
        "upstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: one, env: K1 }}\n      - {{ name: two, env: K2 }}\n      - {{ name: three, env: K3 }}\nroutes:\n{extra_routes}  - {{ upstreams: [mock] }}\n",
        mock.url
    )
}

async fn post_chat(kg: &Keygate, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("authorization", "Bearer client-own-token")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_exactly_one_credential_the_pools() {
    let mock = Mock::start(&[
        "--strict",
        "--key",
        "sk-one=ok",
        "--key",
        "sk-two=ok",
        "--key",
        "sk-three=ok",
    ]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("authorization", "Bearer client-own-token")
        .header("api-key", "client-azure")
        .header("x-api-key", "client-x")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stats = mock.stats().await;
    let headers = &stats["last_request"]["headers"];
    let auth = headers["authorization"].as_str().unwrap();
    assert!(
        ["Bearer sk-one", "Bearer sk-two", "Bearer sk-three"].contains(&auth),
        "{auth}"
    );
    assert!(headers.get("api-key").is_none(), "{headers}");
    assert!(headers.get("x-api-key").is_none(), "{headers}");
    assert!(!stats.to_string().contains("client-own-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_remove_the_injected_key() {
    let mock = Mock::start(&[
        "--strict",
        "--key",
        "sk-one=ok",
        "--key",
        "sk-two=ok",
        "--key",
        "sk-three=ok",
    ]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let port = kg.port;
    let raw = tokio::task::spawn_blocking(move || {
        let body = r#"{"model":"gpt-4o","messages":[]}"#;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer client\r\nConnection: close, authorization\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let stats = mock.stats().await;
    let auth = stats["last_request"]["headers"]["authorization"]
        .as_str()
        .unwrap();
    assert!(auth.starts_with("Bearer sk-"), "{auth}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_naming_host_gets_a_json_400() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let port = kg.port;
    let raw = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close, host\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("\"error\""), "{raw}");
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_round_robin() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = c.clone();
        let url = format!("{}/v1/chat/completions", kg.url);
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let r = c.post(&url).json(&chat("gpt-4o")).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for key in ["sk-one", "sk-two", "sk-three"] {
        let n = mock.count(key).await;
        assert!((99..=101).contains(&n), "{key} got {n} of 300");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_and_x_api_key_styles_are_injected() {
    let mock = Mock::start(&[]);
    let yaml = format!(
        "upstreams:\n  az:\n    url: {u}\n    auth: azure\n    keys: [ {{ env: K1 }} ]\n  anth:\n    url: {u}\n    auth: x-api-key\n    keys: [ {{ env: K2 }} ]\nroutes:\n  - {{ models: [\"az-*\"], upstreams: [az] }}\n  - {{ upstreams: [anth] }}\n",
        u = mock.url
    );
    let kg = Keygate::start(&yaml, THREE_KEYS);
    assert_eq!(post_chat(&kg, &chat("az-gpt")).await.status(), 200);
    let h = mock.stats().await["last_request"]["headers"].clone();
    assert_eq!(h["api-key"], "sk-one");
    assert!(h.get("authorization").is_none(), "{h}");
    assert_eq!(post_chat(&kg, &chat("claude")).await.status(), 200);
    let h = mock.stats().await["last_request"]["headers"].clone();
    assert_eq!(h["x-api-key"], "sk-two");
    assert!(h.get("authorization").is_none(), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_model_glob_and_path_and_rewrites_aliases() {
    let a = Mock::start(&["--name", "a"]);
    let b = Mock::start(&["--name", "b"]);
    let yaml = format!(
        "upstreams:\n  a:\n    url: {}\n    keys: [ {{ env: K1 }} ]\n  b:\n    url: {}/relay\n    keys: [ {{ env: K2 }} ]\nroutes:\n  - {{ models: [\"gpt-4*\"], upstreams: [a] }}\n  - {{ path_prefix: /v1/embeddings, upstreams: [b] }}\n  - {{ models: [\"cheap\"], upstreams: [b], rewrite_model: gpt-4o-mini-2024-07-18 }}\n",
        a.url, b.url
    );
    let kg = Keygate::start(&yaml, THREE_KEYS);

    let r = post_chat(&kg, &chat("gpt-4o")).await;
    assert_eq!(r.headers()["x-mock-name"], "a");

    let r = client()
        .post(format!("{}/v1/embeddings", kg.url))
        .json(&serde_json::json!({"model": "text-embedding-3-small", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-name"], "b");
    assert_eq!(
        b.stats().await["last_request"]["path"],
        "/relay/v1/embeddings"
    );

    let r = post_chat(&kg, &chat("cheap")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-name"], "b");
    let last = b.stats().await["last_request"].clone();
    assert_eq!(last["model"], "gpt-4o-mini-2024-07-18");
    let cl: u64 = last["headers"]["content-length"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cl, last["body_len"].as_u64().unwrap());
    let expected = serde_json::to_vec(&chat("gpt-4o-mini-2024-07-18")).unwrap();
    assert_eq!(cl as usize, expected.len());

    let r = post_chat(&kg, &chat("llama-3")).await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_size_are_proxied_intact() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    // Around Pingora's 64 KiB retry buffer and well past it.
    for size in [200usize, 65_000, 65_536, 70_000, 300_000, 1 << 20] {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(size)}]});
        let bytes = serde_json::to_vec(&body).unwrap();
        let digest = hex(&Sha256::digest(&bytes));
        let r = client()
            .post(format!("{}/v1/chat/completions", kg.url))
            .header("content-type", "application/json")
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "size {size}");
        let last = mock.stats().await["last_request"].clone();
        assert_eq!(
            last["body_len"].as_u64().unwrap() as usize,
            bytes.len(),
            "size {size}"
        );
        assert_eq!(last["body_sha256"].as_str().unwrap(), digest, "size {size}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_chunks_arrive_as_they_are_produced() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let start = Instant::now();
    let mut r = post_chat(
        &kg,
        &serde_json::json!({"model": "gpt-4o", "stream": true, "mock": {"chunks": 10, "interval_ms": 200}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        let s = String::from_utf8_lossy(&chunk).into_owned();
        for _ in 0..s.matches("chat.completion.chunk").count() {
            arrivals.push(start.elapsed());
        }
        text.push_str(&s);
    }
    assert_eq!(arrivals.len(), 10, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let first = arrivals[0];
    let last = arrivals[9];
    // The mock spreads them over 9 × 200 ms; buffering would bunch them up. Bounds at half
    // that leave room for a busy machine delaying the first chunk.
    assert!(
        last >= Duration::from_millis(1500),
        "last chunk at {last:?}"
    );
    assert!(
        last - first >= Duration::from_millis(900),
        "first {first:?} last {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "y".repeat(200_000)}]});
    let r = c
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        mock.stats().await["last_request"]["body_len"]
            .as_u64()
            .unwrap() as usize,
        serde_json::to_vec(&body).unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_style_errors() {
    let mock = Mock::start(&[]);
    let yaml = format!(
        "max_body_bytes: 4KiB\nupstreams:\n  mock:\n    url: {}\n    keys: [ {{ env: K1 }} ]\nroutes:\n  - {{ models: [\"gpt-*\"], upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, THREE_KEYS);
    let c = client();
    let url = format!("{}/v1/chat/completions", kg.url);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_request"),
        (br#"{"model": 42}"#.to_vec(), 400, "invalid_request"),
        (br#"{"messages": []}"#.to_vec(), 400, "invalid_request"),
        (br#"{"model": "llama-3"}"#.to_vec(), 404, "model_not_found"),
        // Model names become per-key state and labels: a long one is refused, not stored.
        (
            serde_json::to_vec(&chat(&format!("gpt-{}", "x".repeat(253)))).unwrap(),
            400,
            "invalid_request",
        ),
        (
            serde_json::to_vec(&chat(&"x".repeat(5000))).unwrap(),
            413,
            "request_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"].get("type").is_some());
    }
    assert_eq!(
        mock.stats().await["total"].as_u64().unwrap(),
        0,
        "nothing reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_revealing_response_headers_are_dropped() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let r = post_chat(&kg, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 200);
    for h in ["set-cookie", "openai-organization", "openai-project"] {
        assert!(r.headers().get(h).is_none(), "{h} leaked");
    }
    assert!(
        r.headers().get("x-request-id").is_some(),
        "other headers pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_route_by_their_model_field() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(
        &three_key_config(
            &mock,
            "  - { models: [\"whisper-1\"], upstreams: [mock], rewrite_model: whisper-large }\n",
        ),
        THREE_KEYS,
    );
    let mut body = Vec::new();
    body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n");
    body.extend_from_slice(&[0u8, 1, 2, 255, 13, 10, 45, 45]);
    body.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n");
    let r = client()
        .post(format!("{}/v1/audio/transcriptions", kg.url))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let last = mock.stats().await["last_request"].clone();
    assert_eq!(last["path"], "/v1/audio/transcriptions");
    let cl: u64 = last["headers"]["content-length"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cl, last["body_len"].as_u64().unwrap());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends a chat request carrying the client's own organization and project headers, and returns
/// the headers the upstream saw.
async fn upstream_headers_for_a_scoped_client(kg: &Keygate, mock: &Mock) -> serde_json::Value {
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("OpenAI-Organization", "org-client")
        .header("OpenAI-Project", "proj_client")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    mock.stats().await["last_request"]["headers"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_organization_and_project_never_reach_the_upstream() {
    // The OpenAI SDK sends these whenever OPENAI_ORG_ID / OPENAI_PROJECT_ID are set on the
    // client's machine; against a pool key of another account OpenAI answers 401.
    let mock = Mock::start(&["--key", "sk-one=ok"]);
    let yaml = format!(
        "upstreams:\n  mock:\n    url: {}\n    keys: [ {{ name: one, env: K1 }} ]\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, THREE_KEYS);
    let headers = upstream_headers_for_a_scoped_client(&kg, &mock).await;
    assert!(headers.get("openai-organization").is_none(), "{headers}");
    assert!(headers.get("openai-project").is_none(), "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_configured_organization_and_project_are_sent_instead() {
    let mock = Mock::start(&["--key", "sk-one=ok"]);
    let yaml = format!(
        "upstreams:\n  mock:\n    url: {}\n    keys: [ {{ name: one, env: K1, organization: org-pool, project: proj_pool }} ]\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, THREE_KEYS);
    let headers = upstream_headers_for_a_scoped_client(&kg, &mock).await;
    assert_eq!(headers["openai-organization"], "org-pool");
    assert_eq!(headers["openai-project"], "proj_pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_without_a_body_gets_a_complete_replacement() {
    // A bare 401 with Content-Length: 0: the replacement body must still be sent in full.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flag = stop.clone();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 65536];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let yaml = format!(
        "upstreams:\n  bare:\n    url: http://{addr}\n    health: {{ enabled: false }}\n    keys: [ {{ name: one, env: K1 }} ]\nroutes:\n  - {{ upstreams: [bare], retries: 0 }}\n"
    );
    let kg = Keygate::start(&yaml, THREE_KEYS);
    let r = post_chat(&kg, &chat("gpt-4o")).await;
    let status = r.status();
    let body = tokio::time::timeout(Duration::from_secs(10), r.text())
        .await
        .expect("the body arrives")
        .expect("the body is complete");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(status, 401);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "upstream_auth_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderations_may_leave_the_model_to_the_provider() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&three_key_config(&mock, ""), THREE_KEYS);
    let r = client()
        .post(format!("{}/v1/moderations", kg.url))
        .json(&serde_json::json!({"input": "is this fine?"}))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 400, "{:?}", r.text().await);
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), 1);
    // A chat request still needs its model.
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&serde_json::json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// The harness waits for *its* keygate on the port, not for whatever process holds it (two
/// tests can draw the same free port; the loser's requests went to the winner's keygate).
#[test]
fn the_harness_tells_its_own_listener_from_another_process() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(utils::listens_on(std::process::id(), port));
    assert!(
        !utils::listens_on(1, port),
        "pid 1 does not hold this test's socket"
    );
    drop(listener);
    assert!(!utils::listens_on(std::process::id(), port));
}
