//! The admin API and `keygate admin` against the real binary: the token rules, every endpoint,
//! bad input, and a manual disable that takes a key out of rotation until it is enabled.
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::Value;
use std::time::{Duration, Instant};
use utils::*;

const ADMIN: &str = "adm-token-1234";
const READ: &str = "read-token-5678";
const ENV: &[(&str, &str)] = &[
    ("KA", "sk-good-aaaa"),
    ("KB", "sk-bad-bbbb"),
    ("KG_ADMIN", ADMIN),
    ("KG_READ", READ),
];

/// keygate with keys `a` (works) and `b` (401 at the mock), probes every 200 ms, and the admin
/// API on its own port; returns it with the admin base URL and address.
fn start(mock: &Mock) -> (Keygate, String, String) {
    let port = free_port();
    let yaml = format!(
        "admin: {{ addr: \"127.0.0.1:{port}\", token_env: KG_ADMIN, read_token_env: KG_READ }}\nupstreams:\n  mock:\n    url: {}\n    probe_interval: 200ms\n    keys:\n      - {{ name: a, env: KA }}\n      - {{ name: b, env: KB }}\nroutes:\n  - {{ name: chat, upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, ENV);
    kg.wait_for_port(port);
    let addr = format!("127.0.0.1:{port}");
    (kg, format!("http://{addr}"), addr)
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut req = client().request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if !body.is_empty() {
        req = req.body(body.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn key<'a>(keys: &'a Value, name: &str) -> &'a Value {
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_endpoints_and_bad_input() {
    let mock = Mock::start(&["--key", "sk-bad-bbbb=unauthorized"]);
    let (kg, base, _) = start(&mock);

    // Token rules.
    assert_eq!(call(&base, "GET", "/admin/v1/keys", None, "").await.0, 401);
    let (s, v) = call(&base, "GET", "/admin/v1/keys", Some("wrong"), "").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_admin_token"))
    );
    assert_eq!(
        call(&base, "GET", "/admin/v1/keys", Some(READ), "").await.0,
        200
    );
    let (s, v) = call(
        &base,
        "POST",
        "/admin/v1/keys/mock/a/disable",
        Some(READ),
        "",
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("read_only_token"))
    );

    // Status.
    let (s, v) = call(&base, "GET", "/admin/v1/status", Some(READ), "").await;
    assert_eq!(s, 200, "{v}");
    let up = &v["upstreams"][0];
    assert_eq!(up["name"], "mock");
    assert_eq!(up["api"], "openai");
    assert_eq!(up["endpoints"][0]["addr"], mock.addr.to_string());
    assert_eq!(up["endpoints"][0]["healthy"], true);
    assert_eq!(up["endpoints"][0]["ejected"], false);
    assert_eq!(up["keys"].as_array().unwrap().len(), 2);
    assert_eq!(v["routes"][0]["name"], "chat");
    assert_eq!(v["routes"][0]["upstreams"][0], "mock");
    assert!(v["clients"].as_array().unwrap().is_empty());
    let text = v.to_string();
    assert!(
        !text.contains("sk-good") && !text.contains("sk-bad"),
        "{text}"
    );

    // Keys.
    let (_, keys) = call(&base, "GET", "/admin/v1/keys", Some(ADMIN), "").await;
    let a = key(&keys, "a");
    assert_eq!(
        (a["upstream"].as_str(), a["state"].as_str()),
        (Some("mock"), Some("ready"))
    );
    assert!(a["id"]
        .as_str()
        .is_some_and(|id| !id.is_empty() && !id.contains("sk-")));

    // Bad input.
    let cases: [(&str, &str, &str, u16); 6] = [
        ("POST", "/admin/v1/keys/mock/zz/disable", "", 404),
        ("POST", "/admin/v1/keys/nope/a/disable", "", 404),
        ("GET", "/admin/v1/nothing", "", 404),
        ("DELETE", "/admin/v1/keys", "", 405),
        ("POST", "/admin/v1/keys/mock/a/disable", "{not json", 400),
        ("GET", "/v1/models", "", 404),
    ];
    for (method, path, body, want) in cases {
        let (s, v) = call(&base, method, path, Some(ADMIN), body).await;
        assert_eq!(s, want, "{method} {path}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let big = format!("{{\"reason\":\"{}\"}}", "x".repeat(70 * 1024));
    let (s, _) = call(
        &base,
        "POST",
        "/admin/v1/keys/mock/a/disable",
        Some(ADMIN),
        &big,
    )
    .await;
    assert_eq!(s, 413);
    let (_, keys) = call(&base, "GET", "/admin/v1/keys", Some(ADMIN), "").await;
    assert_eq!(
        key(&keys, "a")["state"],
        "ready",
        "no bad request changed anything"
    );

    // The proxy port does not serve the admin API.
    let r = client()
        .get(format!("{}/admin/v1/status", kg.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_disable_holds_through_probes_until_enabled_and_test_reports_the_verdict() {
    let mock = Mock::start(&["--key", "sk-bad-bbbb=unauthorized"]);
    let (kg, base, _) = start(&mock);

    // Test: the good key passes, the bad one gets the upstream's 401.
    let (s, v) = call(&base, "POST", "/admin/v1/keys/mock/a/test", Some(ADMIN), "").await;
    assert_eq!(
        (s, v["ok"].as_bool(), v["status"].as_u64()),
        (200, Some(true), Some(200)),
        "{v}"
    );
    let (s, v) = call(&base, "POST", "/admin/v1/keys/mock/b/test", Some(ADMIN), "").await;
    assert_eq!(
        (s, v["ok"].as_bool(), v["status"].as_u64()),
        (200, Some(false), Some(401)),
        "{v}"
    );
    assert!(
        !v["message"].as_str().unwrap().contains("sk-bad-bbbb"),
        "{v}"
    );

    // Disable a by hand; b is refused by the mock, so nothing else can serve.
    let (s, v) = call(
        &base,
        "POST",
        "/admin/v1/keys/mock/a/disable",
        Some(ADMIN),
        r#"{"reason":"rotating"}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["key"]["state"].as_str(), v["key"]["reason"].as_str()),
        (Some("disabled"), Some("manual"))
    );
    assert_eq!(v["key"]["note"], "rotating");
    let before = mock.count("sk-good-aaaa").await;
    for _ in 0..6 {
        kg.post_chat(&chat("gpt-4o")).await;
    }
    // Well past the 200 ms probe interval: the prober must leave a manual disable alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        mock.count("sk-good-aaaa").await,
        before,
        "a is out of rotation and unprobed"
    );
    let (_, keys) = call(&base, "GET", "/admin/v1/keys", Some(READ), "").await;
    assert_eq!(key(&keys, "a")["reason"], "manual");

    // Enable brings it back.
    let (s, v) = call(
        &base,
        "POST",
        "/admin/v1/keys/mock/a/enable",
        Some(ADMIN),
        "",
    )
    .await;
    assert_eq!((s, v["changed"].as_bool()), (200, Some(true)), "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.count("sk-good-aaaa").await == before {
        assert!(
            Instant::now() < deadline,
            "a never came back: {}",
            kg.log_text()
        );
        kg.post_chat(&chat("gpt-4o")).await;
    }
    let log = kg.log_text();
    assert!(log.contains("admin: key mock/a disabled by admin"), "{log}");
    assert!(log.contains("admin: key mock/a enabled by admin"), "{log}");
    assert!(
        !log.contains("sk-good-aaaa") && !log.contains(ADMIN),
        "{log}"
    );
}

fn cli(addr: &str, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    admin_cli(addr, token, args, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_disables_enables_and_tests_keys() {
    let mock = Mock::start(&["--key", "sk-bad-bbbb=unauthorized"]);
    let (kg, _, addr) = start(&mock);

    let (code, out, err) = cli(&addr, Some(READ), &["keys", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("UPSTREAM"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("mock") && l.contains(" a ") && l.contains("ready")),
        "{out}"
    );

    let (code, out, err) = cli(
        &addr,
        Some(ADMIN),
        &["keys", "disable", "mock", "a", "--reason", "rotating"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "key mock/a: disabled");
    let (code, out, _) = cli(&addr, Some(ADMIN), &["--json", "keys", "list"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(key(&v, "a")["reason"], "manual");
    assert_eq!(key(&v, "a")["note"], "rotating");

    let (code, out, _) = cli(&addr, Some(ADMIN), &["keys", "enable", "mock", "a"]);
    assert_eq!((code, out.trim()), (0, "key mock/a: ready"));

    let (code, out, _) = cli(&addr, Some(ADMIN), &["keys", "test", "mock", "a"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (200)"), "{out}");
    let (code, out, _) = cli(&addr, Some(ADMIN), &["keys", "test", "mock", "b"]);
    assert_eq!(code, 1, "a refused key exits 1: {out}");
    assert!(out.contains("REFUSED (401)"), "{out}");

    let (code, out, err) = cli(&addr, Some(READ), &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ENDPOINTS") && out.contains("ROUTE"), "{out}");

    // HTTP errors: a clear message and a non-zero exit.
    let (code, _, err) = cli(&addr, Some(READ), &["keys", "disable", "mock", "a"]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 403"), "{err}");
    let (code, _, err) = cli(&addr, None, &["keys", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 401"), "{err}");
    let (code, _, err) = cli(&addr, Some(ADMIN), &["keys", "enable", "mock", "zz"]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 404") && err.contains("zz"), "{err}");
    let (code, _, err) = cli(&addr, Some(ADMIN), &["--token", ADMIN, "status"]);
    assert_eq!(code, 2);
    assert!(!err.contains(ADMIN), "{err}");
    drop(kg);
    let (code, _, err) = cli(&addr, Some(ADMIN), &["status"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_show_their_recent_requests_errors_last_error_and_next_probe() {
    let mock = Mock::start(&["--key", "sk-bad-bbbb=unauthorized:echo_key=true"]);
    let (kg, base, _) = start(&mock);
    // Round robin reaches b within two requests; its 401 disables it and the request is
    // retried on a.
    for _ in 0..4 {
        assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let (_, keys) = call(&base, "GET", "/admin/v1/keys", Some(READ), "").await;
        if key(&keys, "b")["next_probe_in_ms"].is_u64() {
            break keys;
        }
        assert!(Instant::now() < deadline, "no next probe for b: {keys}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (a, b) = (key(&keys, "a"), key(&keys, "b"));
    assert!(a["requests_1m"].as_u64().unwrap() >= 4, "{a}");
    assert_eq!(a["errors_1m"], 0, "{a}");
    assert!(a["last_used_ms_ago"].is_u64(), "{a}");
    assert_eq!(b["errors_1m"].as_u64(), b["requests_1m"].as_u64(), "{b}");
    assert!(b["errors_1h"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(b["last_error"]["status"], 401, "{b}");
    let message = b["last_error"]["message"].as_str().unwrap();
    assert!(!message.is_empty(), "{b}");
    assert_no_canary(&keys.to_string(), "sk-bad-bbbb", "the admin key list");
}
