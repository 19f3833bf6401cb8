//! Headroom end to end: under a steady load near the pool's capacity, keygate that reads the
//! upstream's `x-ratelimit-*` headers (`key_policy: headroom`, and the rest before a 429 that
//! every policy takes) meets far fewer upstream 429s than round-robin that only reacts to 429s
//! (`rest_before_limit: false`, keygate's behaviour before headroom), and serves as many.
#![allow(clippy::unwrap_used)]

mod utils;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use utils::*;

const KEYS: &[(&str, &str)] = &[("KA", "sk-a"), ("KB", "sk-b"), ("KC", "sk-c")];

/// Limits per mock minute, which `--time-scale 60` makes one real second: 3, 6 and 12 a second.
const LIMITS: [(&str, u64); 3] = [("sk-a", 3), ("sk-b", 6), ("sk-c", 12)];

fn config(mock: &Mock, policy: &str) -> String {
    format!(
        "upstreams:\n  mock:\n    url: {}\n    {policy}\n    keys:\n      - {{ name: a, env: KA }}\n      - {{ name: b, env: KB }}\n      - {{ name: c, env: KC }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    )
}

/// What one run came to: upstream 429s (as the mock counted them) and client successes.
struct Run {
    upstream_429s: u64,
    successes: usize,
    sent: usize,
}

/// Sends `rate` requests a second for `length`, each on its own task so the pace holds.
async fn steady_load(policy: &str, rate: u32, length: Duration) -> Run {
    let limits: Vec<String> = LIMITS
        .iter()
        .map(|(k, rpm)| format!("{k}=limit:rpm={rpm}"))
        .collect();
    let mut args = vec!["--time-scale", "60"];
    for l in &limits {
        args.extend(["--key", l.as_str()]);
    }
    let mock = Mock::start(&args);
    let kg = Keygate::start(&config(&mock, policy), KEYS);
    let url = format!("{}/v1/chat/completions", kg.url);
    let client = client();
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let end = Instant::now() + length;
    let mut sent = 0;
    while Instant::now() < end {
        tick.tick().await;
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let r = client.post(url).json(&chat("gpt-4o")).send().await;
            r.is_ok_and(|r| r.status() == 200)
        });
        sent += 1;
    }
    let mut successes = 0;
    while let Some(ok) = tasks.join_next().await {
        successes += usize::from(ok.unwrap());
    }
    let stats = mock.stats().await;
    let upstream_429s = LIMITS
        .iter()
        .map(|(k, _)| stats["keys"][k]["by_status"]["429"].as_u64().unwrap_or(0))
        .sum();
    Run {
        upstream_429s,
        successes,
        sent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headroom_meets_far_fewer_upstream_429s_than_round_robin_near_capacity() {
    // 21 a second in all; 90 % of it for four seconds.
    let length = Duration::from_secs(4);
    let rr = steady_load(
        "key_policy: round_robin\n    rest_before_limit: false",
        19,
        length,
    )
    .await;
    let hr = steady_load("key_policy: headroom", 19, length).await;
    eprintln!(
        "round_robin: {} upstream 429s, {}/{} served; headroom: {} upstream 429s, {}/{} served",
        rr.upstream_429s, rr.successes, rr.sent, hr.upstream_429s, hr.successes, hr.sent
    );
    // Round-robin sends each key a third: the 3-a-second key meets a 429 about once a second.
    assert!(
        rr.upstream_429s >= 4,
        "round-robin met {}",
        rr.upstream_429s
    );
    assert!(
        hr.upstream_429s * 2 <= rr.upstream_429s,
        "headroom met {} upstream 429s, round-robin {}",
        hr.upstream_429s,
        rr.upstream_429s
    );
    assert!(
        hr.successes * 10 >= hr.sent * 8,
        "headroom served {} of {}",
        hr.successes,
        hr.sent
    );
}

#[tokio::test]
async fn the_mock_reports_its_limits_and_lets_a_test_spend_them_from_outside() {
    let mock = Mock::start(&["--key", "sk-a=limit:rpm=3:tpm=100000"]);
    let direct = |key: &'static str| {
        client()
            .post(format!("{}/v1/chat/completions", mock.url))
            .bearer_auth(key)
            .json(&chat("gpt-4o"))
            .send()
    };
    let r = direct("sk-a").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "2");
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    let spent = client()
        .post(format!("{}/_mock/consume", mock.url))
        .json(&serde_json::json!({"key": "sk-a", "requests": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(spent.status(), 200);
    let r = direct("sk-a").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let unlisted = client()
        .post(format!("{}/_mock/consume", mock.url))
        .json(&serde_json::json!({"key": "sk-zz", "requests": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        unlisted.status(),
        400,
        "a key without limits has nothing to spend"
    );
}

#[tokio::test]
async fn the_mock_reports_anthropic_limits_on_the_messages_endpoint() {
    let mock = Mock::start(&["--key", "sk-ant=limit:rpm=1:tpm=100000"]);
    let send = || {
        client()
            .post(format!("{}/v1/messages", mock.url))
            .header("x-api-key", "sk-ant")
            .header("anthropic-version", "2023-06-01")
            .json(&serde_json::json!({
                "model": "claude-3-5-haiku-latest",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}]
            }))
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["anthropic-ratelimit-requests-limit"], "1");
    assert_eq!(r.headers()["anthropic-ratelimit-requests-remaining"], "0");
    let reset = r.headers()["anthropic-ratelimit-requests-reset"]
        .to_str()
        .unwrap();
    assert!(reset.ends_with('Z') && reset.contains('T'), "{reset}");
    assert!(r
        .headers()
        .contains_key("anthropic-ratelimit-tokens-remaining"));
    let r = send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
}
