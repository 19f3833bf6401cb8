//! The response cache against the mock: hits, misses and bypasses for chat, streams and
//! embeddings; clients kept apart; `Cache-Control`; a hit spends no key and no rate-limit slot;
//! identical concurrent misses send one request upstream.
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::{json, Value};
use std::time::Duration;
use utils::*;

const ENV: &[(&str, &str)] = &[
    ("K1", "sk-one"),
    ("TOKEN_A", "kg-team-a-0123456789"),
    ("TOKEN_B", "kg-team-b-9876543210"),
];
const TOKEN_A: &str = "kg-team-a-0123456789";
const TOKEN_B: &str = "kg-team-b-9876543210";

/// Clients `a` (with `limits_a`) and `b`; route `cached` (gpt-*, text-*) with `cache`, route
/// `plain` (`plain-*`) without; an access log and a metrics port.
fn config(mock: &Mock, cache: &str, limits_a: &str, metrics_port: u16) -> String {
    format!(
        "metrics: {{ addr: 127.0.0.1:{metrics_port} }}\n\
         access_log: {{ path: {{dir}}/access.log }}\n\
         clients:\n  - {{ name: a, token_env: TOKEN_A{limits_a} }}\n  - {{ name: b, token_env: TOKEN_B }}\n\
         upstreams:\n  mock:\n    url: {url}\n    health: {{ enabled: false }}\n    keys: [ {{ name: one, env: K1 }} ]\n\
         routes:\n  - {{ name: plain, models: [\"plain-*\"], upstreams: [mock] }}\n  \
         - {{ name: cached, models: [\"gpt-*\", \"text-*\"], upstreams: [mock], cache: {cache} }}\n",
        url = mock.url
    )
}

/// Posts `body` to `path` as the client with `token`, with extra headers.
async fn post(
    kg: &Keygate,
    token: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}{path}", kg.url))
        .bearer_auth(token)
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// (status, `x-keygate-cache`, body) of a chat request.
async fn chat_as(
    kg: &Keygate,
    token: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let r = post(kg, token, "/v1/chat/completions", body, headers).await;
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-keygate-cache")
        .map_or("-".to_string(), |v| v.to_str().unwrap().to_string());
    (status, cache, r.text().await.unwrap())
}

fn question(text: &str) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_chat_is_a_hit_without_a_key_or_account_headers() {
    let mock = Mock::start(&[]);
    let mport = free_port();
    let kg = Keygate::start(&config(&mock, "{ ttl: 1h }", "", mport), ENV);
    let body = question("hello");
    let (status, cache, first) = chat_as(&kg, TOKEN_A, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"), "{}", kg.log_text());

    // The same request written differently: other field order and whitespace, ignored fields.
    let reordered = json!({"temperature": 0, "user": "someone", "messages": [{"content": "hello", "role": "user"}], "model": "gpt-4o"});
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &reordered, &[]).await;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["x-keygate-cache"], "hit");
    let age: u64 = h["age"].to_str().unwrap().parse().unwrap();
    assert!(age < 60, "age {age}");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    for account in [
        "openai-organization",
        "openai-project",
        "set-cookie",
        "x-request-id",
    ] {
        assert!(h.get(account).is_none(), "{account} in a hit: {h:?}");
    }
    assert_eq!(
        r.text().await.unwrap(),
        first,
        "the stored answer, byte for byte"
    );
    assert_eq!(mock.count("sk-one").await, 1, "a hit spends no key");

    // Another prompt is another entry.
    let (_, cache, _) = chat_as(&kg, TOKEN_A, &question("other"), &[]).await;
    assert_eq!(cache, "miss");
    assert_eq!(mock.count("sk-one").await, 2);

    // The log and the metrics say what the cache did; a hit names no upstream key.
    let log = wait_for_lines(
        &kg.dir.path().join("access.log"),
        3,
        Duration::from_secs(10),
    )
    .await;
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut caches: Vec<&str> = lines.iter().map(|l| l["cache"].as_str().unwrap()).collect();
    caches.sort();
    assert_eq!(caches, ["hit", "miss", "miss"], "{log}");
    let hit = lines.iter().find(|l| l["cache"] == "hit").unwrap();
    assert_eq!(
        (&hit["key"], &hit["attempts"]),
        (&json!("-"), &json!(0)),
        "{log}"
    );
    let text = wait_for_metric(
        mport,
        "keygate_cache_requests_total",
        &[("route", "cached")],
        3.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        sum(&text, "keygate_cache_requests_total", &[("result", "hit")]),
        1.0
    );
    assert_eq!(
        sum(&text, "keygate_cache_requests_total", &[("result", "miss")]),
        2.0
    );
    assert!(
        sum(
            &text,
            "keygate_cache_tokens_saved_total",
            &[("route", "cached")]
        ) > 0.0,
        "{text}"
    );
    assert!(sum(&text, "keygate_cache_bytes", &[]) > 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_never_see_each_others_entries_unless_the_route_shares() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "{}", "", free_port()), ENV);
    let body = question("private");
    assert_eq!(chat_as(&kg, TOKEN_A, &body, &[]).await.1, "miss");
    assert_eq!(
        chat_as(&kg, TOKEN_B, &body, &[]).await.1,
        "miss",
        "b has its own entry"
    );
    assert_eq!(chat_as(&kg, TOKEN_B, &body, &[]).await.1, "hit");
    assert_eq!(mock.count("sk-one").await, 2);
    drop(kg);

    let shared = Keygate::start(&config(&mock, "{ shared: true }", "", free_port()), ENV);
    assert_eq!(chat_as(&shared, TOKEN_A, &body, &[]).await.1, "miss");
    assert_eq!(chat_as(&shared, TOKEN_B, &body, &[]).await.1, "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_replayed_as_their_events_and_kept_apart_from_plain_answers() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "{}", "", free_port()), ENV);
    let mut body = question("stream me");
    body["stream"] = json!(true);
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.headers()["x-keygate-cache"], "miss");
    let first = r.text().await.unwrap();
    assert!(first.trim_end().ends_with("data: [DONE]"), "{first}");

    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(r.headers()["x-keygate-cache"], "hit");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(
        r.text().await.unwrap(),
        first,
        "the same events in the same order"
    );

    // The plain request and the stream with its usage chunk are other entries.
    let (_, cache, plain) = chat_as(&kg, TOKEN_A, &question("stream me"), &[]).await;
    assert_eq!(cache, "miss");
    assert!(!plain.contains("data:"), "{plain}");
    let mut with_usage = body.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let (_, cache, _) = chat_as(&kg, TOKEN_A, &with_usage, &[]).await;
    assert_eq!(cache, "miss");
    assert_eq!(chat_as(&kg, TOKEN_A, &with_usage, &[]).await.1, "hit");
    assert_eq!(mock.count("sk-one").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_cached_and_uncached_routes_are_left_alone() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(
        &config(&mock, "{ only_deterministic: true }", "", free_port()),
        ENV,
    );
    let body = json!({"model": "text-embedding-3-small", "input": "a sentence"});
    let mut caches = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let r = post(&kg, TOKEN_A, "/v1/embeddings", &body, &[]).await;
        assert_eq!(r.status(), 200);
        caches.push(r.headers()["x-keygate-cache"].to_str().unwrap().to_string());
        bodies.push(r.text().await.unwrap());
    }
    assert_eq!(caches, ["miss", "hit"]);
    assert_eq!(bodies[0], bodies[1]);
    // Sampling without a seed is not deterministic: bypassed on this route.
    let sampled = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": 0.7});
    assert_eq!(chat_as(&kg, TOKEN_A, &sampled, &[]).await.1, "bypass");
    assert_eq!(chat_as(&kg, TOKEN_A, &sampled, &[]).await.1, "bypass");
    // A route without `cache:` does no cache work at all.
    let plain = json!({"model": "plain-1", "messages": [], "temperature": 0});
    assert_eq!(chat_as(&kg, TOKEN_A, &plain, &[]).await.1, "-");
    assert_eq!(chat_as(&kg, TOKEN_A, &plain, &[]).await.1, "-");
    assert_eq!(mock.count("sk-one").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_skips_the_lookup_the_store_or_old_entries() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(&config(&mock, "{}", "", free_port()), ENV);
    let body = question("controlled");
    let (_, cache, first) = chat_as(&kg, TOKEN_A, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(cache, "bypass");
    assert_eq!(
        chat_as(&kg, TOKEN_A, &body, &[]).await.1,
        "miss",
        "no-store stored nothing"
    );
    let (_, cache, fresh) = chat_as(&kg, TOKEN_A, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(cache, "miss", "no-cache skips the lookup");
    assert_ne!(fresh, first);
    let (_, cache, again) = chat_as(&kg, TOKEN_A, &body, &[]).await;
    assert_eq!(cache, "hit");
    assert_eq!(again, fresh, "no-cache stored its fresh answer");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, cache, _) = chat_as(&kg, TOKEN_A, &body, &[("cache-control", "max-age=0")]).await;
    assert_eq!(cache, "miss", "the entry is older than max-age");
    assert_eq!(
        chat_as(&kg, TOKEN_A, &body, &[("cache-control", "max-age=3600")])
            .await
            .1,
        "hit"
    );
    assert_eq!(mock.count("sk-one").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_takes_no_rate_limit_slot() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(
        &config(&mock, "{}", ", limits: { rpm: 2 }", free_port()),
        ENV,
    );
    let body = question("limited");
    assert_eq!(chat_as(&kg, TOKEN_A, &body, &[]).await.1, "miss");
    for _ in 0..4 {
        let (status, cache, _) = chat_as(&kg, TOKEN_A, &body, &[]).await;
        assert_eq!((status, cache.as_str()), (200, "hit"), "{}", kg.log_text());
    }
    // The second slot of the minute is still free for a real request, and then none is.
    let (status, cache, _) = chat_as(&kg, TOKEN_A, &question("second"), &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert_eq!(chat_as(&kg, TOKEN_A, &question("third"), &[]).await.0, 429);
    assert_eq!(mock.count("sk-one").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_misses_send_one_request_upstream() {
    // The answer takes a while: every request arrives while the first is upstream.
    let mock = Mock::start(&["--latency", "2s"]);
    let kg = Keygate::start(&config(&mock, "{}", "", free_port()), ENV);
    let body = question("everyone at once");
    let http = client();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let req = http
                .post(format!("{}/v1/chat/completions", kg.url))
                .bearer_auth(TOKEN_A)
                .json(&body);
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let cache = r.headers()["x-keygate-cache"].to_str().unwrap().to_string();
                (status, cache, r.text().await.unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(mock.count("sk-one").await, 1, "{}", kg.log_text());
    assert!(answers.iter().all(|(s, _, _)| *s == 200));
    let misses = answers.iter().filter(|(_, c, _)| c == "miss").count();
    assert_eq!(misses, 1);
    assert!(
        answers.iter().all(|(_, _, b)| *b == answers[0].2),
        "one answer for all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_cut_streams_and_oversized_answers_are_never_stored() {
    // The first request gets a 400, the first stream is cut after two chunks.
    let mock = Mock::start(&["--key", "sk-one=bad_request:first=1:models=gpt-4o"]);
    let kg = Keygate::start(&config(&mock, "{}", "", free_port()), ENV);
    let body = question("fails first");
    let (status, cache, _) = chat_as(&kg, TOKEN_A, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (400, "miss"));
    let (status, cache, _) = chat_as(&kg, TOKEN_A, &body, &[]).await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "miss"),
        "the error was not stored"
    );
    assert_eq!(chat_as(&kg, TOKEN_A, &body, &[]).await.1, "hit");
    drop(kg);

    let broken = Mock::start(&["--key", "sk-one=break_stream:after=2:first=1"]);
    let kg = Keygate::start(&config(&broken, "{}", "", free_port()), ENV);
    let mut stream = question("cut short");
    stream["stream"] = json!(true);
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &stream, &[]).await;
    assert_eq!(r.headers()["x-keygate-cache"], "miss");
    let cut = r.text().await.unwrap_or_default();
    assert!(!cut.contains("[DONE]"), "{cut}");
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &stream, &[]).await;
    assert_eq!(
        r.headers()["x-keygate-cache"],
        "miss",
        "the cut stream was not stored"
    );
    assert!(r.text().await.unwrap().contains("[DONE]"));
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &stream, &[]).await;
    assert_eq!(r.headers()["x-keygate-cache"], "hit");
    drop(kg);

    let small = Keygate::start(&config(&mock, "{ max_entry: 100 }", "", free_port()), ENV);
    let body = question("too long to keep");
    for _ in 0..2 {
        let (status, cache, answer) = chat_as(&small, TOKEN_A, &body, &[]).await;
        assert_eq!((status, cache.as_str()), (200, "miss"));
        assert!(answer.len() > 100, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_replays_what_the_client_received_when_keygate_injected_usage() {
    let mock = Mock::start(&[]);
    let yaml = format!(
        "stream_usage: inject\n{}",
        config(&mock, "{}", "", free_port())
    );
    let kg = Keygate::start(&yaml, ENV);
    let mut stream = question("metered");
    stream["stream"] = json!(true);
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &stream, &[]).await;
    assert_eq!(r.headers()["x-keygate-cache"], "miss");
    let first = r.text().await.unwrap();
    assert!(
        !first.contains("\"usage\":{"),
        "the usage chunk is hidden: {first}"
    );
    let r = post(&kg, TOKEN_A, "/v1/chat/completions", &stream, &[]).await;
    assert_eq!(r.headers()["x-keygate-cache"], "hit");
    assert_eq!(r.text().await.unwrap(), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_hits_counts_hits_against_the_clients_limits() {
    let mock = Mock::start(&[]);
    let kg = Keygate::start(
        &config(
            &mock,
            "{ charge_hits: true }",
            ", limits: { rpm: 2 }",
            free_port(),
        ),
        ENV,
    );
    let body = question("charged");
    assert_eq!(chat_as(&kg, TOKEN_A, &body, &[]).await.1, "miss");
    assert_eq!(chat_as(&kg, TOKEN_A, &body, &[]).await.1, "hit");
    assert_eq!(chat_as(&kg, TOKEN_A, &body, &[]).await.0, 429);
    assert_eq!(mock.count("sk-one").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_answer_of_the_attempt_that_succeeded_is_stored() {
    // The first key fails once with a 500: keygate retries on the second key.
    let mock = Mock::start(&["--key", "sk-one=server_error:first=1", "--key", "sk-two=ok"]);
    let yaml = format!(
        "upstreams:\n  mock:\n    url: {}\n    health: {{ enabled: false }}\n    key_policy: round_robin\n    \
         keys: [ {{ name: one, env: K1 }}, {{ name: two, env: K2 }} ]\n\
         routes:\n  - {{ upstreams: [mock], cache: {{}} }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, &[("K1", "sk-one"), ("K2", "sk-two")]);
    let body = question("retried");
    let first = kg.post_chat(&body).await;
    assert_eq!(first.status(), 200, "{}", kg.log_text());
    assert_eq!(first.headers()["x-keygate-cache"], "miss");
    let first = first.text().await.unwrap();
    let (one, two) = (mock.count("sk-one").await, mock.count("sk-two").await);
    assert_eq!(one + two, 2, "one failed attempt and one retry");
    let again = kg.post_chat(&body).await;
    assert_eq!(again.headers()["x-keygate-cache"], "hit");
    assert_eq!(
        again.text().await.unwrap(),
        first,
        "the retry's answer, not the 500"
    );
    assert_eq!(mock.count("sk-one").await + mock.count("sk-two").await, 2);
}

/// Waits (bounded) until the instance on `mport` reports Redis up.
async fn wait_redis_up(mport: u16, kg: &Keygate) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !scrape(mport).await.contains("\nkeygate_redis_up 1") {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never up:\n{}",
            kg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_answers_through_redis_and_a_dead_redis_means_misses() {
    let mut redis = utils::redis::RedisServer::start();
    let mock = Mock::start(&[]);
    let shared = format!(
        "redis: {{ url: \"{}\" }}\ncache_store: {{ memory: 8MiB, redis: true }}\n",
        redis.url()
    );
    let (pa, pb) = (free_port(), free_port());
    let a = Keygate::start(
        &format!("{shared}{}", config(&mock, "{ ttl: 1h }", "", pa)),
        ENV,
    );
    let b = Keygate::start(
        &format!("{shared}{}", config(&mock, "{ ttl: 1h }", "", pb)),
        ENV,
    );
    wait_redis_up(pa, &a).await;
    wait_redis_up(pb, &b).await;

    // A fetches the answer; B, which never saw the request, answers it from Redis.
    let body = question("shared between instances");
    let (status, cache, first) = chat_as(&a, TOKEN_A, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    let upstream = mock.count("sk-one").await;
    // The answer is written to Redis after A's answer went out: B asks once it is there (asked
    // earlier, B would fetch and store an answer of its own).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while redis.cmd(&["KEYS", "keygate:cache:*"]).trim().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "A's answer never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, cache, again) = chat_as(&b, TOKEN_A, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "hit"));
    assert_eq!(again, first, "the same answer, byte for byte");
    let keys = redis.cmd(&["KEYS", "keygate:cache:*"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 1, "{keys}");
    let ttl: i64 = redis.cmd(&["PTTL", keys.trim()]).trim().parse().unwrap();
    assert!(
        ttl > 3_500_000 && ttl <= 3_600_000,
        "the route's ttl: {ttl}"
    );
    // Client isolation holds across instances too.
    let (_, cache, _) = chat_as(&b, TOKEN_B, &body, &[]).await;
    assert_eq!(cache, "miss", "client b never gets client a's answer");
    let seen = mock.count("sk-one").await;
    assert!(seen >= upstream, "{seen}");

    // Redis gone: a new question is a miss answered normally, never an error.
    redis.kill9();
    for i in 0..3 {
        let (status, cache, _) =
            chat_as(&b, TOKEN_A, &question(&format!("while down {i}")), &[]).await;
        assert_eq!((status, cache.as_str()), (200, "miss"));
    }
}
