//! Prompt-cache affinity (`affinity: prompt`) against the real binary and the mock: repeats of a
//! prompt reach one key; when that key is disabled they move (only they do), and they come back
//! when it is enabled; a route's `affinity: none` keeps the key policy.
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use utils::*;

const ADMIN: &str = "adm-token-1234";
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn secret(name: &str) -> String {
    format!("sk-affinity-{name}")
}

/// keygate with keys a–d on upstream `mock` (`affinity: prompt`, round robin otherwise), a
/// route `plain` (models `plain-*`) that turns affinity off, and the admin API.
fn start(mock: &Mock) -> (Keygate, String) {
    let port = free_port();
    let keys: String = NAMES
        .iter()
        .map(|n| format!("      - {{ name: {n}, env: K{} }}\n", n.to_uppercase()))
        .collect();
    let yaml = format!(
        "admin: {{ addr: \"127.0.0.1:{port}\", token_env: KG_ADMIN }}\nupstreams:\n  mock:\n    url: {}\n    affinity: prompt\n    probe_interval: 1h\n    keys:\n{keys}routes:\n  - {{ name: plain, models: [\"plain-*\"], upstreams: [mock], affinity: none }}\n  - {{ name: chat, upstreams: [mock] }}\n",
        mock.url
    );
    let secrets: Vec<(String, String)> = NAMES
        .iter()
        .map(|n| (format!("K{}", n.to_uppercase()), secret(n)))
        .collect();
    let mut env: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.push(("KG_ADMIN", ADMIN));
    let kg = Keygate::start(&yaml, &env);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "admin port: {}", kg.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    (kg, format!("http://127.0.0.1:{port}"))
}

async fn counts(mock: &Mock) -> Vec<u64> {
    let mut out = Vec::new();
    for n in NAMES {
        out.push(mock.count(&secret(n)).await);
    }
    out
}

/// Sends `body` and returns the name of the key the mock saw it with.
async fn key_of(kg: &Keygate, mock: &Mock, body: &Value) -> &'static str {
    let before = counts(mock).await;
    let r = kg.post_chat(body).await;
    assert_eq!(r.status(), 200, "{}", kg.log_text());
    let after = counts(mock).await;
    let used: Vec<&'static str> = NAMES
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a > b)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(used.len(), 1, "one request, one key: {used:?}");
    used[0]
}

/// A chat body whose system prompt (over 1 KiB) is number `i`, then `question`.
fn prompt(i: usize, question: &str, model: &str) -> Value {
    let system = format!(
        "You are assistant number {i}. {}",
        "Be precise. ".repeat(120)
    );
    json!({"model": model, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": question}
    ]})
}

async fn admin(base: &str, path: &str) {
    let r = client()
        .post(format!("{base}{path}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_of_a_prompt_stay_on_one_key_move_when_it_is_disabled_and_come_back() {
    let mock = Mock::start(&[]);
    let (kg, base) = start(&mock);

    // Eight prompts, each asked three times with different questions after the shared first
    // KiB: every prompt keeps its key.
    let mut home = Vec::new();
    for i in 0..8 {
        let first = key_of(&kg, &mock, &prompt(i, "q0", "gpt-4o")).await;
        for q in ["q1", "a longer question"] {
            assert_eq!(
                key_of(&kg, &mock, &prompt(i, q, "gpt-4o")).await,
                first,
                "prompt {i}"
            );
        }
        home.push(first);
    }
    let distinct: std::collections::BTreeSet<_> = home.iter().collect();
    assert!(
        distinct.len() >= 2,
        "eight prompts all on one key: {home:?}"
    );

    // `prompt_cache_key` pins requests whatever their prompt.
    let pinned = |i: usize| {
        let mut body = prompt(i, "q", "gpt-4o");
        body["prompt_cache_key"] = json!("tenant-42");
        body
    };
    let k = key_of(&kg, &mock, &pinned(0)).await;
    for i in 1..4 {
        assert_eq!(key_of(&kg, &mock, &pinned(i)).await, k);
    }

    // Disable prompt 0's key: its repeats move together to one other key; prompts living on
    // other keys stay where they were.
    let gone = home[0];
    admin(&base, &format!("/admin/v1/keys/mock/{gone}/disable")).await;
    let moved = key_of(&kg, &mock, &prompt(0, "q2", "gpt-4o")).await;
    assert_ne!(moved, gone);
    assert_eq!(key_of(&kg, &mock, &prompt(0, "q3", "gpt-4o")).await, moved);
    for (i, &h) in home.iter().enumerate().filter(|(_, &h)| h != gone) {
        assert_eq!(
            key_of(&kg, &mock, &prompt(i, "q4", "gpt-4o")).await,
            h,
            "prompt {i}"
        );
    }

    // Enabled again: back home.
    admin(&base, &format!("/admin/v1/keys/mock/{gone}/enable")).await;
    assert_eq!(key_of(&kg, &mock, &prompt(0, "q5", "gpt-4o")).await, gone);
    assert_eq!(key_of(&kg, &mock, &prompt(0, "q6", "gpt-4o")).await, gone);

    // A route with `affinity: none` keeps round robin: four repeats, four keys.
    let mut plain = std::collections::BTreeSet::new();
    for _ in 0..4 {
        plain.insert(key_of(&kg, &mock, &prompt(0, "q", "plain-model")).await);
    }
    assert_eq!(plain.len(), 4, "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_retries_on_the_next_key_and_the_prompt_then_stays_there() {
    let mock = Mock::start(&[]);
    let (kg, _base) = start(&mock);
    let home = key_of(&kg, &mock, &prompt(3, "q", "gpt-4o")).await;
    // The home key now answers 401: the request is retried on another key, which keygate
    // disables the home key for; later repeats go straight to that same next key.
    mock.set_behavior(&secret(home), json!({"mode": "unauthorized"}))
        .await;
    let r = kg.post_chat(&prompt(3, "q1", "gpt-4o")).await;
    assert_eq!(r.status(), 200, "{}", kg.log_text());
    let next = key_of(&kg, &mock, &prompt(3, "q2", "gpt-4o")).await;
    assert_ne!(next, home);
    assert_eq!(key_of(&kg, &mock, &prompt(3, "q3", "gpt-4o")).await, next);
}
