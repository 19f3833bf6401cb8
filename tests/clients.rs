//! Who gets in, what they may use, and how much: gateway tokens, model permissions, limits,
//! budgets, per-IP limits behind trusted proxies, deny rules and the model list.
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::Value;
use utils::*;

const ENV: &[(&str, &str)] = &[
    ("K1", "sk-one"),
    ("TOKEN_A", "kg-team-a-0123456789"),
    ("TOKEN_B", "kg-team-b-9876543210"),
];

fn config(mock: &Mock, clients: &str, extra: &str) -> String {
    format!(
        "{extra}{clients}upstreams:\n  mock:\n    url: {}\n    keys: [ {{ name: one, env: K1 }} ]\n    models: [gpt-4o, gpt-4o-mini, o1, text-embedding-3-small]\nroutes:\n  - {{ models: [\"cheap\"], upstreams: [mock], rewrite_model: gpt-4o-mini }}\n  - {{ models: [\"gpt-*\", \"text-*\"], upstreams: [mock] }}\n",
        mock.url
    )
}

/// A `metrics:` line for `port`.
fn metrics(port: u16) -> String {
    format!("metrics: {{ addr: 127.0.0.1:{port} }}\n")
}

/// Waits until keygate has logged `n` requests: a client's usage is settled in the logging hook,
/// after the client has its answer, so the next request could otherwise overtake it.
async fn settled(metrics_port: u16, n: u64) {
    let limit = std::time::Duration::from_secs(10);
    wait_for_metric(metrics_port, "keygate_requests_total", &[], n as f64, limit).await;
}

async fn chat_as(kg: &Keygate, header: (&str, &str), model: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header(header.0, header.1)
        .json(&chat(model))
        .send()
        .await
        .unwrap()
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_empty_and_huge_tokens_get_the_same_401() {
    let mock = Mock::start(&[]);
    let clients = "clients:\n  - { name: a, token_env: TOKEN_A }\n";
    let kg = Keygate::start(&config(&mock, clients, ""), ENV);
    let huge = "x".repeat(10 * 1024);
    let mut bodies = Vec::new();
    for (name, value) in [
        ("authorization", "Bearer kg-wrong".to_string()),
        ("authorization", "Bearer ".to_string()),
        ("authorization", format!("Bearer {huge}")),
        ("x-unrelated", "nothing".to_string()),
    ] {
        let r = chat_as(&kg, (name, &value), "gpt-4o").await;
        assert_eq!(r.status(), 401);
        bodies.push(r.text().await.unwrap());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    assert!(bodies[0].contains("invalid_api_key"));
    // The right token works in every header SDKs use.
    for header in ["authorization", "api-key", "x-api-key"] {
        let value = if header == "authorization" {
            "Bearer kg-team-a-0123456789"
        } else {
            "kg-team-a-0123456789"
        };
        assert_eq!(
            chat_as(&kg, (header, value), "gpt-4o").await.status(),
            200,
            "{header}"
        );
    }
    // The client's token never reaches the upstream.
    let stats = mock.stats().await;
    assert_eq!(
        stats["last_request"]["headers"]["authorization"],
        "Bearer sk-one"
    );
    assert!(!stats.to_string().contains("kg-team-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_only_use_its_models() {
    let mock = Mock::start(&[]);
    let clients =
        "clients:\n  - { name: a, token_env: TOKEN_A, models: [\"gpt-4o-mini\", \"cheap\"] }\n";
    let kg = Keygate::start(&config(&mock, clients, ""), ENV);
    let (h, v) = bearer("kg-team-a-0123456789");
    assert_eq!(chat_as(&kg, (h, &v), "gpt-4o-mini").await.status(), 200);
    let r = chat_as(&kg, (h, &v), "gpt-4o").await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert_eq!(mock.stats().await["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_lets_the_limit_through_and_spares_other_clients() {
    let mock = Mock::start(&[]);
    let clients = "clients:\n  - { name: a, token_env: TOKEN_A, limits: { rpm: 60 } }\n  - { name: b, token_env: TOKEN_B, limits: { rpm: 60 } }\n";
    let kg = Keygate::start(&config(&mock, clients, ""), ENV);
    let (h, va) = bearer("kg-team-a-0123456789");
    let (_, vb) = bearer("kg-team-b-9876543210");
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..120 {
        let r = chat_as(&kg, (h, &va), "gpt-4o").await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry));
                assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
                assert_eq!(r.headers()["x-ratelimit-limit-requests"], "60");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "rate_limit_requests");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!((58..=62).contains(&ok), "{ok} passed");
    assert_eq!(ok + limited, 120);
    assert_eq!(
        mock.count("sk-one").await,
        ok as u64,
        "rejections cost nothing upstream"
    );
    assert_eq!(
        chat_as(&kg, (h, &vb), "gpt-4o").await.status(),
        200,
        "b is unaffected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_stops_a_client_once_reported_usage_passes_the_limit() {
    let mock = Mock::start(&["--completion-tokens", "300"]);
    let mport = free_port();
    let clients = "clients:\n  - { name: a, token_env: TOKEN_A, limits: { tpm: 1000 } }\n";
    let kg = Keygate::start(&config(&mock, clients, &metrics(mport)), ENV);
    let (h, v) = bearer("kg-team-a-0123456789");
    let mut used = 0u64;
    let mut stopped = false;
    for sent in 1..=8 {
        let r = chat_as(&kg, (h, &v), "gpt-4o").await;
        if r.status() == 429 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limit_tokens");
            stopped = true;
            break;
        }
        let body: Value = r.json().await.unwrap();
        used += body["usage"]["total_tokens"].as_u64().unwrap();
        settled(mport, sent).await;
    }
    assert!(stopped, "never stopped after {used} tokens");
    assert!(
        used > 600 && used <= 1000 + 400,
        "stopped once usage passed the limit: {used}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_answers_budget_exhausted_without_going_upstream() {
    let mock = Mock::start(&["--completion-tokens", "300"]);
    let mport = free_port();
    let clients = "clients:\n  - { name: a, token_env: TOKEN_A, limits: { budget: { tokens: 100, per: day } } }\n";
    let kg = Keygate::start(&config(&mock, clients, &metrics(mport)), ENV);
    let (h, v) = bearer("kg-team-a-0123456789");
    assert_eq!(chat_as(&kg, (h, &v), "gpt-4o").await.status(), 200);
    settled(mport, 1).await;
    let r = chat_as(&kg, (h, &v), "gpt-4o").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exhausted");
    assert_eq!(
        mock.stats().await["total"],
        1,
        "nothing sent upstream once spent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_trust_forwarded_addresses_only_from_trusted_proxies() {
    let mock = Mock::start(&[]);
    for (trusted, spoof_helps) in [(true, true), (false, false)] {
        let extra = if trusted {
            "ip_limits: { rpm: 2 }\ntrusted_proxies: [127.0.0.1]\n"
        } else {
            "ip_limits: { rpm: 2 }\n"
        };
        let kg = Keygate::start(&config(&mock, "", extra), ENV);
        let send = |xff: &'static str| {
            let url = format!("{}/v1/chat/completions", kg.url);
            async move {
                client()
                    .post(url)
                    .header("x-forwarded-for", xff)
                    .json(&chat("gpt-4o"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(send("198.51.100.1").await, 200);
        assert_eq!(send("198.51.100.1").await, 200);
        assert_eq!(send("198.51.100.1").await, 429);
        let other = send("198.51.100.2").await;
        if spoof_helps {
            assert_eq!(other, 200, "a different forwarded client has its own limit");
        } else {
            assert_eq!(
                other, 429,
                "without trusted proxies a spoofed X-Forwarded-For changes nothing"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_xff_proxy_a_client_cannot_pick_its_address() {
    let mock = Mock::start(&[]);
    let extra = "ip_limits: { rpm: 2 }\ntrusted_proxies: [127.0.0.1]\n";
    let kg = Keygate::start(&config(&mock, "", extra), ENV);
    let send = |n: u32, headers: &[(&'static str, String)]| {
        let mut req = client().post(format!("{}/v1/chat/completions", kg.url));
        for (k, v) in headers {
            req = req.header(*k, v.replace("{n}", &n.to_string()));
        }
        async move {
            req.json(&chat("gpt-4o"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The proxy appends the real address to XFF and passes the client's own `Forwarded` through.
    let forged = [
        ("forwarded", "for=203.0.113.{n}".to_string()),
        ("x-forwarded-for", "198.51.100.1".to_string()),
    ];
    let statuses = [
        send(1, &forged).await,
        send(2, &forged).await,
        send(3, &forged).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "one client, one limit");
    // A hop the proxy forwarded but keygate cannot read: the proxy (127.0.0.1) is the client,
    // not the address the client wrote in front of it.
    let garbage = [(
        "x-forwarded-for",
        "203.0.113.{n}, not-an-address".to_string(),
    )];
    let statuses = [
        send(4, &garbage).await,
        send(5, &garbage).await,
        send(6, &garbage).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "the proxy's own limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_share_a_limit_per_64() {
    let mock = Mock::start(&[]);
    let extra = "ip_limits: { rpm: 1 }\ntrusted_proxies: [127.0.0.1]\n";
    let kg = Keygate::start(&config(&mock, "", extra), ENV);
    let send = |xff: &'static str| {
        let url = format!("{}/v1/chat/completions", kg.url);
        async move {
            let r = client().post(url).header("x-forwarded-for", xff);
            r.json(&chat("gpt-4o"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let statuses = [
        send("2001:db8:1:2::1").await,
        send("2001:db8:1:2::2").await,
        send("2001:db8:1:2:ffff:ffff:ffff:ffff").await,
        send("2001:db8:1:3::1").await,
    ];
    assert_eq!(statuses, [200, 429, 429, 200], "one limit per /64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_upstream_addresses_are_ignored() {
    let mock = Mock::start(&[]);
    let elsewhere = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "", ""), ENV);
    let body = serde_json::json!({"model": "gpt-4o", "messages": [], "api_base": elsewhere.url, "base_url": elsewhere.url});
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("x-api-base", elsewhere.url.as_str())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.stats().await["total"], 1);
    assert_eq!(elsewhere.stats().await["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_by_keygate_for_what_a_client_may_use() {
    let mock = Mock::start(&[]);
    let clients = "clients:\n  - { name: a, token_env: TOKEN_A, models: [\"gpt-4o*\", \"cheap\"] }\n  - { name: b, token_env: TOKEN_B }\n";
    let kg = Keygate::start(&config(&mock, clients, ""), ENV);
    let list = |token: &'static str| {
        let url = format!("{}/v1/models", kg.url);
        async move {
            let v: Value = client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    // o1 is declared but no route serves it; `cheap` is a route alias.
    assert_eq!(
        list("kg-team-a-0123456789").await,
        ["cheap", "gpt-4o", "gpt-4o-mini"]
    );
    assert_eq!(
        list("kg-team-b-9876543210").await,
        ["cheap", "gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
    );
    assert_eq!(mock.stats().await["total"], 0, "answered by keygate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_user_agents_and_addresses_get_403() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(
        &config(&mock, "", "guards: { deny_user_agents: [\"*BadBot*\"] }\n"),
        ENV,
    );
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .header("user-agent", "Mozilla/5.0 BadBot/1.0")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let kg2 = Keygate::start(
        &config(&mock, "", "guards: { deny_cidrs: [127.0.0.0/8] }\n"),
        ENV,
    );
    let r = kg2.post_chat(&chat("gpt-4o")).await;
    assert_eq!(r.status(), 403);
    assert_eq!(mock.stats().await["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_declared_models_the_upstream_list_passes_through() {
    let mock = Mock::start(&[]);
    let yaml = format!(
        "upstreams:\n  mock:\n    url: {}\n    keys: [ {{ name: one, env: K1 }} ]\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, ENV);
    let v: Value = client()
        .get(format!("{}/v1/models", kg.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["data"].as_array().is_some_and(|d| !d.is_empty()), "{v}");
    assert_eq!(mock.stats().await["total"], 1, "asked upstream");
}
