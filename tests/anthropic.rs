//! Anthropic upstreams pooled natively: clients call `POST /v1/messages` as they would call
//! Anthropic, and keygate rotates keys and applies Anthropic's status rules (the real binary
//! against the mock, which speaks Anthropic's API).
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use utils::*;

const KEYS: &[(&str, &str)] = &[("KA", "sk-ant-a"), ("KB", "sk-ant-b"), ("KC", "sk-ant-c")];
const WAIT: Duration = Duration::from_secs(10);

/// Three keys on an `api: anthropic` upstream, a metrics port and an access log.
fn config(mock: &Mock, mport: u16) -> String {
    format!(
        "upstreams:\n  claude:\n    url: {}\n    api: anthropic\n    health: {{ enabled: false }}\n    keys:\n      - {{ name: a, env: KA }}\n      - {{ name: b, env: KB }}\n      - {{ name: c, env: KC }}\nroutes:\n  - {{ models: [\"claude-*\"], upstreams: [claude] }}\nmetrics: {{ addr: 127.0.0.1:{mport} }}\naccess_log: {{ path: \"{{dir}}/access.log\" }}\n",
        mock.url
    )
}

fn message(model: &str) -> Value {
    json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})
}

async fn post(
    kg: &Keygate,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client().post(format!("{}{path}", kg.url)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn send(kg: &Keygate) -> reqwest::Response {
    post(kg, "/v1/messages", &message("claude-sonnet-4-5"), &[]).await
}

/// The mock's request log entries for `key`, oldest first.
fn statuses_of(stats: &Value, key: &str) -> Vec<u64> {
    stats["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key"] == key)
        .map(|r| r["status"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_rotate_over_the_keys_with_anthropics_headers() {
    let mock = Mock::start(&[
        "--strict",
        "--key",
        "sk-ant-a=ok",
        "--key",
        "sk-ant-b=ok",
        "--key",
        "sk-ant-c=ok",
    ]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    for _ in 0..6 {
        let r = post(
            &kg,
            "/v1/messages",
            &message("claude-sonnet-4-5"),
            &[
                ("x-api-key", "sk-ant-client-own"),
                ("anthropic-beta", "tools-2024-04-04"),
            ],
        )
        .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "message", "{v}");
        assert_eq!(v["stop_reason"], "end_turn");
    }
    for key in ["sk-ant-a", "sk-ant-b", "sk-ant-c"] {
        assert_eq!(mock.count(key).await, 2, "{key}");
    }
    let stats = mock.stats().await;
    let headers = &stats["last_request"]["headers"];
    assert_eq!(headers["anthropic-version"], "2023-06-01", "{headers}");
    assert_eq!(headers["anthropic-beta"], "tools-2024-04-04");
    assert!(headers.get("authorization").is_none());
    assert_ne!(headers["x-api-key"], "sk-ant-client-own");
    // The client's own version choice passes unchanged.
    let r = post(
        &kg,
        "/v1/messages",
        &message("claude-sonnet-4-5"),
        &[("anthropic-version", "2023-01-01")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        mock.stats().await["last_request"]["headers"]["anthropic-version"],
        "2023-01-01"
    );
    // count_tokens routes on the model like a message.
    let r = post(
        &kg,
        "/v1/messages/count_tokens",
        &message("claude-sonnet-4-5"),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.json::<Value>().await.unwrap()["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_rests_the_key_and_the_request_fails_over() {
    for spec in ["429:retry_after=60", "429:reset_in=60"] {
        let mock = Mock::start(&["--key", &format!("sk-ant-a={spec}")]);
        let kg = Keygate::start(&config(&mock, free_port()), KEYS);
        for _ in 0..6 {
            assert_eq!(send(&kg).await.status(), 200, "{spec}");
        }
        let stats = mock.stats().await;
        assert_eq!(
            statuses_of(&stats, "sk-ant-a"),
            vec![429],
            "{spec}: rests after its 429"
        );
        assert_eq!(
            statuses_of(&stats, "sk-ant-b").len() + statuses_of(&stats, "sk-ant-c").len(),
            6,
            "{spec}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_rests_the_key_as_long_as_retry_after_or_the_ratelimit_reset_says() {
    for spec in ["429:retry_after=60", "429:reset_in=60"] {
        let mock = Mock::start(&["--key", &format!("sk-ant-a={spec}")]);
        let yaml = config(&mock, free_port()).replace(
            "      - { name: b, env: KB }\n      - { name: c, env: KC }\n",
            "",
        );
        let kg = Keygate::start(&yaml, KEYS);
        let r = send(&kg).await;
        assert_eq!(r.status(), 429, "{spec}: the only key's 429 passes on");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
        let r = send(&kg).await;
        assert_eq!(r.status(), 429, "{spec}");
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (50..=60).contains(&wait),
            "{spec}: keygate's own 429 asks {wait}s"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
        assert_eq!(mock.count("sk-ant-a").await, 1, "{spec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_529_overload_is_retried_elsewhere_without_resting_the_key() {
    let mock = Mock::start(&["--key", "sk-ant-a=529:first=1"]);
    let mport = free_port();
    let kg = Keygate::start(&config(&mock, mport), KEYS);
    for _ in 0..6 {
        assert_eq!(send(&kg).await.status(), 200);
    }
    let a = statuses_of(&mock.stats().await, "sk-ant-a");
    assert_eq!(a[0], 529);
    assert!(a[1..].contains(&200), "the key stays in rotation: {a:?}");
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 6.0, WAIT).await;
    assert_eq!(sum(&m, "keygate_key_cooldowns_total", &[]), 0.0, "{m}");
    assert_eq!(
        sum(
            &m,
            "keygate_upstream_attempts_total",
            &[("outcome", "server_error")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_overloaded_pass_the_529_on() {
    let mock = Mock::start(&[
        "--key",
        "sk-ant-a=529",
        "--key",
        "sk-ant-b=529",
        "--key",
        "sk-ant-c=529",
    ]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    let r = send(&kg).await;
    assert_eq!(r.status(), 529);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
    // Not one key rests: the next request is tried again.
    assert_eq!(send(&kg).await.status(), 529);
    assert!(mock.stats().await["total"].as_u64().unwrap() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_balance_400_disables_the_key_for_every_model() {
    let mock = Mock::start(&["--key", "sk-ant-a=insufficient_quota"]);
    let mport = free_port();
    let kg = Keygate::start(&config(&mock, mport), KEYS);
    let mut saw_credit = false;
    for _ in 0..3 {
        let r = send(&kg).await;
        if r.status() == 400 {
            let v: Value = r.json().await.unwrap();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("credit balance"),
                "{v}"
            );
            saw_credit = true;
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert!(saw_credit, "the first request on the key passes its 400 on");
    wait_for_metric(
        mport,
        "keygate_key_cooldowns_total",
        &[("key", "a"), ("reason", "insufficient_quota")],
        1.0,
        WAIT,
    )
    .await;
    for model in ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"] {
        for _ in 0..3 {
            let r = post(&kg, "/v1/messages", &message(model), &[]).await;
            assert_eq!(r.status(), 200, "{model}");
        }
    }
    assert_eq!(statuses_of(&mock.stats().await, "sk-ant-a"), vec![400]);
}

/// A key disabled for its credit stays out of rotation across a restart: the state file keeps
/// Anthropic keys like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_disabled_for_its_credit_stays_disabled_across_a_restart() {
    let mock = Mock::start(&["--key", "sk-ant-a=insufficient_quota"]);
    let state = tempfile::tempdir().unwrap();
    let mport = free_port();
    let yaml = format!(
        "{}state_file: {}/state.json\n",
        config(&mock, mport),
        state.path().display()
    );
    let mut first = Keygate::start(&yaml, KEYS);
    for _ in 0..3 {
        send(&first).await.bytes().await.unwrap();
    }
    wait_for_metric(
        mport,
        "keygate_key_cooldowns_total",
        &[("key", "a"), ("reason", "insufficient_quota")],
        1.0,
        WAIT,
    )
    .await;
    assert!(
        first.stop(libc::SIGTERM, Duration::from_secs(15)),
        "{}",
        first.log_text()
    );
    let kept = std::fs::read_to_string(state.path().join("state.json")).unwrap();
    assert!(kept.contains("insufficient_quota"), "{kept}");

    let second = Keygate::start(&yaml, KEYS);
    for _ in 0..6 {
        assert_eq!(send(&second).await.status(), 200);
    }
    // Only the first keygate's one request ever reached the key without credit.
    assert_eq!(statuses_of(&mock.stats().await, "sk-ant-a"), vec![400]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_credit_is_probed_with_an_anthropic_message_and_comes_back() {
    let mock = Mock::start(&["--key", "sk-ant-a=insufficient_quota:first=1"]);
    let yaml = config(&mock, free_port()).replace(
        "    api: anthropic\n",
        "    api: anthropic\n    probe_interval: 200ms\n    probe_model: claude-probe\n",
    );
    let kg = Keygate::start(&yaml, KEYS);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = send(&kg).await;
        assert!(r.status() == 200 || r.status() == 400, "{}", r.status());
        let stats = mock.stats().await;
        let probed = stats["requests"].as_array().unwrap().iter().any(|r| {
            r["key"] == "sk-ant-a"
                && r["model"] == "claude-probe"
                && r["path"] == "/v1/messages"
                && r["status"] == 200
        });
        if probed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no probe: {stats}\n{}",
            kg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back in rotation: it serves clients' models again.
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(send(&kg).await.status(), 200);
        let stats = mock.stats().await;
        let served = stats["requests"].as_array().unwrap().iter().any(|r| {
            r["key"] == "sk-ant-a" && r["model"] == "claude-sonnet-4-5" && r["status"] == 200
        });
        if served {
            break;
        }
        assert!(Instant::now() < deadline, "never back: {stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_permission_error_rests_the_key_for_that_model_only() {
    let mock = Mock::start(&["--key", "sk-ant-a=403:models=claude-opus-4-1"]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    for _ in 0..4 {
        let r = post(&kg, "/v1/messages", &message("claude-opus-4-1"), &[]).await;
        assert_eq!(r.status(), 200);
    }
    // The probe (`GET /v1/models` with the key) finds the key itself accepted: it keeps serving
    // the models it may use.
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(send(&kg).await.status(), 200);
        let stats = mock.stats().await;
        let served = stats["requests"].as_array().unwrap().iter().any(|r| {
            r["key"] == "sk-ant-a" && r["model"] == "claude-sonnet-4-5" && r["status"] == 200
        });
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never back for other models: {stats}"
        );
    }
    let opus: Vec<u64> = mock.stats().await["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key"] == "sk-ant-a" && r["model"] == "claude-opus-4-1")
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(opus, vec![403], "rests for the refused model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_disables_the_key_and_its_body_never_reaches_the_client() {
    let mock = Mock::start(&["--key", "sk-ant-a=401", "--key", "sk-ant-b=401"]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    for _ in 0..6 {
        assert_eq!(send(&kg).await.status(), 200);
    }
    let stats = mock.stats().await;
    assert_eq!(statuses_of(&stats, "sk-ant-a"), vec![401]);
    assert_eq!(statuses_of(&stats, "sk-ant-b"), vec![401]);
    assert_eq!(statuses_of(&stats, "sk-ant-c").len(), 6);
    // With every key dead the client gets keygate's 503, in Anthropic's error shape.
    let mock = Mock::start(&[
        "--key",
        "sk-ant-a=401",
        "--key",
        "sk-ant-b=401",
        "--key",
        "sk-ant-c=401",
    ]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    let r = send(&kg).await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert!(status == 401 || status == 503, "{status} {v}");
    if status == 401 {
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    }
    assert!(!v.to_string().contains("sk-ant-"), "{v}");
    let r = send(&kg).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error", "{v}");
}

/// A native route with `cache:` stores a whole Anthropic stream (it ends with `message_stop`,
/// not `[DONE]`) and a JSON answer, and replays each byte for byte without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_native_routes_replay_anthropic_streams_and_answers() {
    let mock = Mock::start(&[]);
    let yaml = config(&mock, free_port()).replace(
        "upstreams: [claude] }",
        "upstreams: [claude], cache: { ttl: 1h, shared: true } }",
    );
    let kg = Keygate::start(&yaml, KEYS);
    let mut streamed = message("claude-sonnet-4-5");
    streamed["stream"] = json!(true);
    for body in [streamed, message("claude-haiku-4-5")] {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = post(&kg, "/v1/messages", &body, &[]).await;
            assert_eq!(r.status(), 200);
            let cache = r.headers()["x-keygate-cache"].to_str().unwrap().to_string();
            seen.push((cache, r.bytes().await.unwrap()));
        }
        assert_eq!(seen[0].0, "miss", "{body}");
        assert_eq!(seen[1].0, "hit", "{body}");
        assert_eq!(
            seen[0].1, seen[1].1,
            "a hit replays the answer byte for byte"
        );
    }
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygates_own_errors_on_messages_routes_take_anthropics_shape() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    let r = post(&kg, "/v1/messages", &message("gpt-4o"), &[]).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");
    let r = post(&kg, "/v1/messages", &json!({"max_tokens": 5}), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // OpenAI paths keep OpenAI's shape.
    let r = kg.post_chat(&chat("gpt-4o")).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert_eq!(mock.stats().await["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_event_by_event_and_are_metered_once() {
    use futures_util::StreamExt;
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(&config(&mock, mport), KEYS);
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "hello"}],
        "mock": {"chunks": 3, "interval_ms": 400, "completion_tokens": 9}});
    let started = Instant::now();
    let r = post(&kg, "/v1/messages", &body, &[]).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    let mut text = Vec::new();
    let mut first_at = None;
    while let Some(chunk) = stream.next().await {
        first_at.get_or_insert_with(|| started.elapsed());
        text.extend_from_slice(&chunk.unwrap());
    }
    let total = started.elapsed();
    let first_at = first_at.unwrap();
    assert!(
        total.saturating_sub(first_at) >= Duration::from_millis(600),
        "the first events arrive before the paced ones: first {first_at:?}, end {total:?}"
    );
    let text = String::from_utf8(text).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let input = data[0]["message"]["usage"]["input_tokens"]
        .as_u64()
        .unwrap();
    let output = data[7]["usage"]["output_tokens"].as_u64().unwrap();
    assert_eq!(output, 9);
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 1.0, WAIT).await;
    assert_eq!(
        sum(
            &m,
            "keygate_tokens_total",
            &[("model", "claude-sonnet-4-5"), ("kind", "prompt")]
        ) as u64,
        input,
        "{m}"
    );
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "completion")]) as u64,
        output,
        "{m}"
    );
    let log = wait_for_lines(&kg.dir.path().join("access.log"), 1, WAIT).await;
    let line: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(line["prompt_tokens"].as_u64(), Some(input), "{line}");
    assert_eq!(line["completion_tokens"].as_u64(), Some(output), "{line}");
    assert_eq!(line["upstream"], "claude");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_inject_leaves_anthropic_bodies_as_the_client_sent_them() {
    use sha2::{Digest, Sha256};
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(&(config(&mock, mport) + "stream_usage: inject\n"), KEYS);
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 20, "stream": true,
        "messages": [{"role": "user", "content": "hello"}]});
    let bytes = serde_json::to_vec(&body).unwrap();
    let r = client()
        .post(format!("{}/v1/messages", kg.url))
        .header("content-type", "application/json")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stats = mock.stats().await;
    assert_eq!(
        stats["last_request"]["body_sha256"],
        digest.as_str(),
        "{stats}"
    );
    // Still metered, from Anthropic's own events.
    let m = wait_for_metric(
        mport,
        "keygate_tokens_total",
        &[("kind", "completion")],
        1.0,
        WAIT,
    )
    .await;
    assert!(
        sum(&m, "keygate_tokens_total", &[("kind", "prompt")]) > 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_metered_and_count_against_client_budgets() {
    let mock = Mock::start(&[]);
    let mport = free_port();
    let yaml = config(&mock, mport)
        + "clients:\n  - { name: team, token_env: TEAM, limits: { budget: { tokens: 30, per: day } } }\n";
    let mut env = KEYS.to_vec();
    env.push(("TEAM", "kg-team-token"));
    let kg = Keygate::start(&yaml, &env);
    let auth = [("authorization", "Bearer kg-team-token")];
    let r = post(&kg, "/v1/messages", &message("claude-sonnet-4-5"), &auth).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let used = v["usage"]["input_tokens"].as_u64().unwrap()
        + v["usage"]["output_tokens"].as_u64().unwrap();
    assert!(used >= 30, "one answer spends the budget: {v}");
    wait_for_metric(
        mport,
        "keygate_tokens_total",
        &[("client", "team")],
        used as f64,
        WAIT,
    )
    .await;
    let r = post(&kg, "/v1/messages", &message("claude-sonnet-4-5"), &auth).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    // The gateway token never reaches Anthropic.
    let headers = &mock.stats().await["last_request"]["headers"];
    assert!(headers.get("authorization").is_none(), "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_python_sdk_works_against_a_native_route() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, free_port()), KEYS);
    run_sdk_client(&kg, "anthropic_sdk").await;
}

/// An OpenAI-speaking route translated for the Anthropic upstream.
fn translated_config(mock: &Mock, mport: u16, extra: &str) -> String {
    config(mock, mport).replace(
        "  - { models: [\"claude-*\"], upstreams: [claude] }",
        &format!("  - {{ models: [\"claude-*\"], upstreams: [claude], translate: openai{extra} }}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_translated_route_answers_openai_clients_from_anthropic_keys() {
    let mock = Mock::start(&[
        "--strict",
        "--key",
        "sk-ant-a=ok",
        "--key",
        "sk-ant-b=ok",
        "--key",
        "sk-ant-c=ok",
    ]);
    let mport = free_port();
    let kg = Keygate::start(
        &translated_config(&mock, mport, ", default_max_tokens: 5"),
        KEYS,
    );
    let body = json!({"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]});
    let r = kg.post_chat(&body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(
        v["choices"][0]["finish_reason"], "length",
        "the default max_tokens caps it: {v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let stats = mock.stats().await;
    let last = &stats["last_request"];
    assert_eq!(last["path"], "/v1/messages", "{last}");
    assert_eq!(last["headers"]["anthropic-version"], "2023-06-01");
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 1.0, WAIT).await;
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "prompt")]) as u64,
        prompt,
        "{m}"
    );
    // Refusals are OpenAI-shaped 400s that name the parameter, and nothing goes upstream.
    let before = mock.stats().await["total"].as_u64().unwrap();
    for extra in [
        json!({"n": 3}),
        json!({"response_format": {"type": "json_object"}}),
        json!({"logprobs": true}),
    ] {
        let mut b = body.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = kg.post_chat(&b).await;
        assert_eq!(r.status(), 400, "{extra}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cannot be translated"),
            "{v}"
        );
    }
    // Only chat completions are translated.
    let r = post(
        &kg,
        "/v1/embeddings",
        &json!({"model": "claude-sonnet-4-5", "input": "x"}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("translates only"),
        "{v}"
    );
    assert_eq!(mock.stats().await["total"].as_u64().unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_translated_routes_upstream_errors_reach_the_client_in_openais_shape() {
    let mock = Mock::start(&[
        "--key",
        "sk-ant-a=529",
        "--key",
        "sk-ant-b=529",
        "--key",
        "sk-ant-c=529",
    ]);
    let kg = Keygate::start(&translated_config(&mock, free_port(), ""), KEYS);
    let r = kg.post_chat(&chat("claude-sonnet-4-5")).await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 529, "{text}\n{}", kg.log_text());
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
    assert_eq!(v["error"]["message"], "Overloaded");
    let mock = Mock::start(&[
        "--key",
        "sk-ant-a=insufficient_quota",
        "--key",
        "sk-ant-b=insufficient_quota",
        "--key",
        "sk-ant-c=insufficient_quota",
    ]);
    let kg = Keygate::start(&translated_config(&mock, free_port(), ""), KEYS);
    let r = kg.post_chat(&chat("claude-sonnet-4-5")).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("credit balance"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_translated_stream_becomes_chat_chunks_event_by_event_and_is_metered() {
    use futures_util::StreamExt;
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(&translated_config(&mock, mport, ""), KEYS);
    let body = json!({"model": "claude-sonnet-4-5", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello"}],
        "mock": {"chunks": 3, "interval_ms": 400, "completion_tokens": 9}});
    let started = Instant::now();
    let r = kg.post_chat(&body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    let mut text = Vec::new();
    let mut first_at = None;
    while let Some(chunk) = stream.next().await {
        first_at.get_or_insert_with(|| started.elapsed());
        text.extend_from_slice(&chunk.unwrap());
    }
    let total = started.elapsed();
    assert!(
        total.saturating_sub(first_at.unwrap()) >= Duration::from_millis(600),
        "chunks are not held back: first {first_at:?}, end {total:?}"
    );
    let text = String::from_utf8(text).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{text}"
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "This is a mock reply. This is a", "{text}");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 9, "{text}");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let m = wait_for_metric(mport, "keygate_requests_total", &[], 1.0, WAIT).await;
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "prompt")]) as u64,
        prompt,
        "{m}"
    );
    assert_eq!(
        sum(&m, "keygate_tokens_total", &[("kind", "completion")]) as u64,
        9,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_against_a_translated_route() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&translated_config(&mock, free_port(), ""), KEYS);
    run_sdk_client(&kg, "openai_translated").await;
}

/// Runs `tests/clients/NAME.py` against keygate; it prints `ok` when every check passed.
async fn run_sdk_client(kg: &Keygate, name: &str) {
    let script = format!("{}/tests/clients/{name}.py", env!("CARGO_MANIFEST_DIR"));
    let url = kg.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(url)
            .output()
            .expect("python3 runs (the Makefile's deps target installs the SDKs)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{name}: stdout: {}\nstderr: {}\nkeygate: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        kg.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
