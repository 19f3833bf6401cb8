//! Operators scrape keygate and read its access log; what they find matches the traffic sent.
//! (That no secret appears in anything keygate writes is `tests/canary.rs`.)
#![allow(clippy::unwrap_used)]

mod utils;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use utils::*;

/// How long a counter or log line may take to appear after the answer (a bound, not a pause).
const WAIT: Duration = Duration::from_secs(10);

fn config(mock: &Mock, metrics_port: u16, extra: &str) -> String {
    format!(
        "metrics: {{ addr: 127.0.0.1:{metrics_port} }}\naccess_log: {{ path: {{dir}}/access.log }}\n{extra}upstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA }}\n      - {{ name: b, env: KB }}\nroutes:\n  - {{ name: chat, models: [\"gpt-*\"], upstreams: [mock] }}\n",
        mock.url
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_traffic_sent() {
    let mock = Mock::start(&["--key", "sk-aaaa=rate_limit:retry_after=30:first=1"]);
    let mport = free_port();
    let kg = Keygate::start(
        &config(&mock, mport, ""),
        &[("KA", "sk-aaaa"), ("KB", "sk-bbbb")],
    );
    let c = client();
    for _ in 0..50 {
        let r = c
            .post(format!("{}/v1/chat/completions", kg.url))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&chat("llama"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Counters are bumped in the logging hook, after each answer went out.
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 51.0, WAIT).await;
    assert_eq!(sum(&m, "keygate_requests_total", &[]), 51.0, "{m}");
    assert_eq!(
        sum(
            &m,
            "keygate_requests_total",
            &[("route", "chat"), ("status", "200")]
        ),
        50.0
    );
    assert_eq!(
        sum(
            &m,
            "keygate_upstream_attempts_total",
            &[("outcome", "rate_limited")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "keygate_upstream_attempts_total",
            &[("outcome", "success")]
        ),
        50.0
    );
    assert_eq!(sum(&m, "keygate_retries_total", &[("route", "chat")]), 1.0);
    assert_eq!(
        sum(
            &m,
            "keygate_key_cooldowns_total",
            &[("key", "a"), ("reason", "rate_limit")]
        ),
        1.0
    );
    assert_eq!(sum(&m, "keygate_keys", &[("state", "cooling")]), 1.0);
    assert_eq!(sum(&m, "keygate_keys", &[("state", "ready")]), 1.0);
    assert_eq!(
        sum(
            &m,
            "keygate_local_responses_total",
            &[("reason", "not_found")]
        ),
        1.0
    );
    assert_eq!(sum(&m, "keygate_ttfb_seconds_count", &[]), 51.0);
    assert_eq!(sum(&m, "keygate_in_flight_requests", &[]), 0.0);

    // Every request got one access log line, with names and numbers only.
    let text = wait_for_lines(&kg.dir.path().join("access.log"), 51, WAIT).await;
    assert_eq!(text.lines().count(), 51);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for field in [
        "time", "route", "model", "upstream", "key", "attempts", "status", "bytes", "ttfb_ms",
        "total_ms",
    ] {
        assert!(first.get(field).is_some(), "missing {field}: {first}");
    }
    assert!(!text.contains("hi\""), "no prompt text in the access log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_output_passes_promtool() {
    let Ok(promtool) = which("promtool") else {
        panic!("promtool is required (Debian package `prometheus`; `make deps` installs it)");
    };
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(
        &config(&mock, mport, ""),
        &[("KA", "sk-aaaa"), ("KB", "sk-bbbb")],
    );
    for _ in 0..5 {
        kg.post_chat(&chat("gpt-4o")).await;
    }
    let m = scrape(mport).await;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_on_the_metrics_port() {
    let mock = Mock::start(&[
        "--key",
        "sk-aaaa=429:retry_after=60",
        "--key",
        "sk-bbbb=429:retry_after=60",
    ]);
    let mport = free_port();
    let kg = Keygate::start(
        &config(&mock, mport, ""),
        &[("KA", "sk-aaaa"), ("KB", "sk-bbbb")],
    );
    for path in ["/healthz", "/readyz"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = metrics_get(mport, path).await;
            if r.status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{path} never became 200");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A 429 storm does not make the instance unready.
    kg.post_chat(&chat("gpt-4o")).await;
    let r = metrics_get(mport, "/readyz").await;
    assert_eq!(r.status(), 200);
    let r = metrics_get(mport, "/nope").await;
    assert_eq!(r.status(), 404);
}

fn which(cmd: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(cmd))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_match_the_usage_the_upstream_reported() {
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(
        &config(&mock, mport, ""),
        &[("KA", "sk-aaaa"), ("KB", "sk-bbbb")],
    );
    let c = client();
    let (mut prompt, mut completion) = (0u64, 0u64);
    for i in 0..5 {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100 * i)}]});
        let v: serde_json::Value = c
            .post(format!("{}/v1/chat/completions", kg.url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    for _ in 0..3 {
        let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hello"}], "mock": {"chunks": 4}});
        let text = c
            .post(format!("{}/v1/chat/completions", kg.url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let usage_line = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .expect("the client asked for usage and got it");
        prompt += usage_line["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += usage_line["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 8.0, WAIT).await;
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "prompt")]) as u64,
        prompt,
        "{m}"
    );
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "completion")]) as u64,
        completion
    );
    assert!(
        sum(
            &m,
            "keygate_tokens_total",
            &[("model", "gpt-4o-mini"), ("kind", "completion")]
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_stream_usage_is_metered_but_hidden_from_the_client() {
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(
        &config(&mock, mport, "stream_usage: inject\n"),
        &[("KA", "sk-aaaa"), ("KB", "sk-bbbb")],
    );
    let body = serde_json::json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hello"}],
        "mock": {"chunks": 6, "completion_tokens": 7}});
    let text = kg.post_chat(&body).await.text().await.unwrap();
    assert_eq!(text.matches("chat.completion.chunk").count(), 6, "{text}");
    assert!(
        !text.contains("\"prompt_tokens\""),
        "the client did not ask for usage: {text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    // The mock sends a usage chunk only when asked: tokens counted prove keygate asked.
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 1.0, WAIT).await;
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "completion")]),
        7.0,
        "{m}"
    );
    assert!(sum(&m, "keygate_tokens_total", &[("kind", "prompt")]) > 0.0);
}
