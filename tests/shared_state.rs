//! Several keygate instances sharing key states and client limits through a real Redis (and a
//! real Redis Cluster), started by the tests on loopback ports: a cooldown, a disable and a
//! re-enable reach every instance; rpm and budgets hold across instances; Redis killed,
//! restarted or slowed never fails a request.

#![allow(clippy::unwrap_used)]

mod utils;

use std::time::{Duration, Instant};
use utils::redis::{LatencyProxy, RedisCluster, RedisServer};
use utils::{chat, client, scrape, sum, Keygate, Mock};

/// A gateway token every instance accepts.
const TOKEN: &str = "tok-shared-test";

/// One instance's config: upstream `mock` with `keys`, client `app` with `limits`, and `redis`.
/// Tests of shared counting give Redis a 1 s timeout: on 2 busy cores a 50 ms one can trip and
/// send requests to the local share, which its own tests cover.
fn instance_yaml(mock: &Mock, keys: &str, limits: &str, redis: &str, mport: u16) -> String {
    format!(
        "upstreams:\n  mock:\n    url: {}\n    health: {{ enabled: false }}\n    probe_interval: 200ms\n    keys: [{keys}]\nroutes:\n  - {{ upstreams: [mock] }}\nclients:\n  - {{ name: app, token_env: KG_TOKEN, limits: {{ {limits} }} }}\nmetrics: {{ addr: 127.0.0.1:{mport} }}\nredis: {redis}\n",
        mock.url
    )
}

/// A running instance and its metrics port.
struct Instance {
    kg: Keygate,
    mport: u16,
}

impl Instance {
    fn start(yaml_for: impl Fn(u16) -> String, env: &[(&str, &str)]) -> Instance {
        let mport = utils::free_port();
        let mut all = vec![("KG_TOKEN", TOKEN)];
        all.extend_from_slice(env);
        let kg = Keygate::start(&yaml_for(mport), &all);
        Instance { kg, mport }
    }

    async fn post(&self, model: &str) -> reqwest::Response {
        client()
            .post(format!("{}/v1/chat/completions", self.kg.url))
            .bearer_auth(TOKEN)
            .json(&chat(model))
            .send()
            .await
            .unwrap()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&scrape(self.mport).await, name, labels)
    }

    /// Waits (bounded) until `name{labels}` reaches `want`; panics with the log otherwise.
    async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(name, labels).await;
            if v >= want {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}{labels:?} is {v}, not {want}, after {limit:?}:\n{}",
                    self.kg.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn wait_redis_up(&self, up: bool) {
        let want = if up { 1.0 } else { 0.0 };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.metric("keygate_redis_up", &[]).await != want {
            assert!(
                Instant::now() < deadline,
                "keygate_redis_up never became {want}:\n{}",
                self.kg.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `N` instances on one mock and one Redis, each with Redis up.
async fn group<const N: usize>(
    mock: &Mock,
    keys: &str,
    limits: &str,
    section: &str,
) -> [Instance; N] {
    let all: [Instance; N] = std::array::from_fn(|_| {
        Instance::start(|m| instance_yaml(mock, keys, limits, section, m), KEY_ENV)
    });
    for i in &all {
        i.wait_redis_up(true).await;
    }
    all
}

fn redis_section(url: &str, extra: &str) -> String {
    format!("{{ url: \"{url}\"{extra} }}")
}

const KEYS_GOOD_BAD: &str = "{ name: good, env: K_GOOD }, { name: bad, env: K_BAD }";
const KEY_ENV: &[(&str, &str)] = &[("K_GOOD", "sk-good"), ("K_BAD", "sk-bad")];

/// Sends requests for `model` to `inst` until the mock has seen one more on `sk-bad` (at most
/// two are needed: round robin alternates the keys).
async fn hit_bad_key(inst: &Instance, mock: &Mock, model: &str) {
    let before = mock.count("sk-bad").await;
    for _ in 0..4 {
        let r = inst.post(model).await;
        assert_eq!(r.status(), 200, "the 429 is retried on the good key");
        if mock.count("sk-bad").await > before {
            return;
        }
    }
    panic!("the bad key was never tried for {model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_one_instance_keeps_the_others_off_that_key_within_100ms() {
    let redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok", "--key", "sk-bad=429:retry_after=120"]);
    // A 1 s timeout: a request's admission timing out on a busy machine would hold key changes
    // back until the link is checked again, which is not what this measures.
    let section = redis_section(&redis.url(), ", timeout: 1s");
    let [a, b, c] = group::<3>(&mock, KEYS_GOOD_BAD, "rpm: 100000", &section).await;
    let applied = [("direction", "applied")];
    let mut delays = Vec::new();
    for trial in 0..100 {
        // A model of its own per trial: cooldowns are per key and model, so each trial starts
        // with the bad key ready for it everywhere.
        let model = format!("m-{trial}");
        hit_bad_key(&a, &mock, &model).await;
        let t0 = Instant::now();
        let want = f64::from(trial + 1);
        let limit = Duration::from_secs(5);
        tokio::join!(
            b.wait_metric("keygate_shared_key_events_total", &applied, want, limit),
            c.wait_metric("keygate_shared_key_events_total", &applied, want, limit),
        );
        delays.push(t0.elapsed());
    }
    delays.sort();
    let (p50, p99) = (delays[49], delays[98]);
    println!(
        "cooldown propagation over 100 trials: p50 {p50:?}, p99 {p99:?}, max {:?}",
        delays[99]
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    // B and C now keep off the bad key for those models: their requests never reach it (the
    // last ones: a key keeps a bounded number of per-model cooldowns, the oldest go first).
    let before = mock.count("sk-bad").await;
    for trial in 95..100 {
        for other in [&b, &c] {
            assert_eq!(other.post(&format!("m-{trial}")).await.status(), 200);
        }
    }
    assert_eq!(
        mock.count("sk-bad").await,
        before,
        "B and C skipped the cooling key"
    );
    // The instance itself also measures the delay, from the change's time to its application.
    let count = b
        .metric("keygate_shared_key_event_delay_seconds_count", &[])
        .await;
    let total = b
        .metric("keygate_shared_key_event_delay_seconds_sum", &[])
        .await;
    println!(
        "as B measured it: mean {:.2} ms over {count} changes",
        total / count * 1000.0
    );
    assert!(count >= 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_and_a_probe_re_enable_reach_every_instance() {
    let redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok", "--key", "sk-bad=401"]);
    let section = redis_section(&redis.url(), "");
    let [a, b, c] = group::<3>(&mock, KEYS_GOOD_BAD, "rpm: 100000", &section).await;
    hit_bad_key(&a, &mock, "gpt-4o").await;
    let disabled = [("state", "disabled")];
    for i in [&a, &b, &c] {
        i.wait_metric("keygate_keys", &disabled, 1.0, Duration::from_secs(5))
            .await;
    }
    // The key works again: a probe (on whichever instance) re-enables it everywhere.
    mock.set_behavior("sk-bad", serde_json::json!({"mode": "ok"}))
        .await;
    let ready = [("state", "ready")];
    for i in [&a, &b, &c] {
        i.wait_metric("keygate_keys", &ready, 2.0, Duration::from_secs(10))
            .await;
    }
}

/// Sends `n` requests spread over `instances` (concurrently, 8 at a time) and counts statuses.
async fn spread(instances: &[&Instance], n: usize) -> (usize, usize, Vec<u64>) {
    let mut ok = 0;
    let mut limited = 0;
    let mut tokens = Vec::new();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for i in 0..n {
        let inst = instances[i % instances.len()];
        pending.push(async move {
            let r = inst.post("gpt-4o-mini").await;
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body)
        });
        if pending.len() >= 8 {
            if let Some(done) = pending.next().await {
                tally(done, &mut ok, &mut limited, &mut tokens);
            }
        }
    }
    while let Some(done) = pending.next().await {
        tally(done, &mut ok, &mut limited, &mut tokens);
    }
    (ok, limited, tokens)
}

fn tally(
    (status, body): (u16, serde_json::Value),
    ok: &mut usize,
    limited: &mut usize,
    tokens: &mut Vec<u64>,
) {
    match status {
        200 => {
            *ok += 1;
            tokens.push(body["usage"]["total_tokens"].as_u64().unwrap_or(0));
        }
        429 => *limited += 1,
        other => panic!("unexpected status {other}: {body}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_holds_across_three_instances() {
    let redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok"]);
    let section = redis_section(&redis.url(), ", instances: 3, timeout: 1s");
    let [a, b, c] = group::<3>(&mock, "{ name: good, env: K_GOOD }", "rpm: 600", &section).await;
    let (ok, limited, _) = spread(&[&a, &b, &c], 720).await;
    println!("rpm 600 over 3 instances: {ok} admitted, {limited} refused");
    // 600 ± 5 %: the cluster admits its limit, not 3 × 600.
    assert!((570..=630).contains(&ok), "admitted {ok}");
    assert_eq!(ok + limited, 720);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_not_overspent_by_more_than_one_request_per_instance() {
    let redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok"]);
    let section = redis_section(&redis.url(), ", instances: 3, timeout: 1s");
    let limits = "budget: { tokens: 2000, per: day }";
    let [a, b, c] = group::<3>(&mock, "{ name: good, env: K_GOOD }", limits, &section).await;
    let (ok, limited, tokens) = spread(&[&a, &b, &c], 300).await;
    let spent: u64 = tokens.iter().sum();
    let largest = tokens.iter().copied().max().unwrap_or(0);
    println!("budget 2000 over 3 instances: {ok} admitted spending {spent}, {limited} refused");
    assert!(limited > 0, "the budget ran out");
    // Up to 8 requests are in flight at once, holding reservations when the last ones come.
    assert!(spent + 8 * largest >= 2000, "the budget was used: {spent}");
    assert!(
        spent <= 2000 + 3 * largest,
        "overspent: {spent} (largest request {largest})"
    );
    // Every instance now refuses, with the budget's code.
    for i in [&a, &b, &c] {
        let r = i.post("gpt-4o-mini").await;
        assert_eq!(r.status(), 429);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "budget_exhausted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_fails_no_request_and_states_converge() {
    let mut redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok", "--key", "sk-bad=429:retry_after=120"]);
    let section = redis_section(&redis.url(), ", instances: 2");
    let [a, b] = group::<2>(&mock, KEYS_GOOD_BAD, "rpm: 100000", &section).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (n, url) in [
        a.kg.url.clone(),
        b.kg.url.clone(),
        a.kg.url.clone(),
        b.kg.url.clone(),
    ]
    .into_iter()
    .enumerate()
    {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let http = client();
            let (mut sent, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(TOKEN)
                    .json(&chat(&format!("load-{n}")))
                    .send()
                    .await;
                sent += 1;
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failed.push(r.status().as_u16()),
                    Err(e) => failed.push(if e.is_timeout() { 1 } else { 0 }),
                }
            }
            (sent, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill9();
    a.wait_redis_up(false).await;
    // A change made while Redis is away: A cools the bad key for this model.
    hit_bad_key(&a, &mock, "during-outage").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    a.wait_redis_up(true).await;
    b.wait_redis_up(true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for h in load {
        let (sent, failed) = h.await.unwrap();
        total += sent;
        assert!(failed.is_empty(), "failed requests: {failed:?}");
    }
    assert!(total > 20, "the load ran: {total} requests");
    // Converged: the cooldown A made during the outage was pushed to the restarted Redis and
    // reached B, which keeps off the key for that model.
    let before = mock.count("sk-bad").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = redis.cmd(&["HKEYS", "keygate:{keys}:state"]);
        if state.contains("during-outage") {
            break;
        }
        assert!(Instant::now() < deadline, "not pushed to Redis: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..4 {
        assert_eq!(b.post("during-outage").await.status(), 200);
    }
    assert_eq!(
        mock.count("sk-bad").await,
        before,
        "B keeps off the key A cooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_adds_no_wait_beyond_the_timeout() {
    let redis = RedisServer::start();
    let proxy = LatencyProxy::start(redis.port(), Duration::ZERO);
    let mock = Mock::start(&["--key", "sk-good=ok"]);
    let section = redis_section(&proxy.url(), ", timeout: 50ms");
    let inst = Instance::start(
        |m| {
            instance_yaml(
                &mock,
                "{ name: good, env: K_GOOD }",
                "rpm: 100000",
                &section,
                m,
            )
        },
        KEY_ENV,
    );
    inst.wait_redis_up(true).await;
    proxy.set_delay(Duration::from_millis(200));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(inst.post("gpt-4o-mini").await.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    let total = started.elapsed();
    println!("20 requests with Redis 200 ms slow: {total:?}, slowest {slowest:?}");
    // Without the fallback every request would wait 200 ms (4 s in all); with it at most the
    // first waits the 50 ms timeout.
    assert!(total < Duration::from_millis(2_000), "{total:?}");
    assert!(slowest < Duration::from_millis(200), "{slowest:?}");
    inst.wait_redis_up(false).await;
    proxy.set_delay(Duration::ZERO);
    inst.wait_redis_up(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_is_a_warning_and_traffic_flows() {
    let closed = utils::free_port();
    let mock = Mock::start(&["--key", "sk-good=ok"]);
    let section = redis_section(&format!("redis://127.0.0.1:{closed}/0"), "");
    let inst = Instance::start(
        |m| instance_yaml(&mock, "{ name: good, env: K_GOOD }", "rpm: 5", &section, m),
        KEY_ENV,
    );
    for _ in 0..5 {
        assert_eq!(inst.post("gpt-4o-mini").await.status(), 200);
    }
    assert_eq!(
        inst.post("gpt-4o-mini").await.status(),
        429,
        "local limits still hold"
    );
    assert_eq!(inst.metric("keygate_redis_up", &[]).await, 0.0);
    let metrics = scrape(inst.mport).await;
    assert!(
        sum(&metrics, "keygate_redis_errors_total", &[]) > 0.0
            || inst.kg.log_text().contains("Redis"),
        "the trouble is visible"
    );
    let ready = utils::metrics_get(inst.mport, "/readyz").await;
    assert_eq!(ready.status(), 200, "/readyz does not depend on Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_masters_works_like_a_single_server() {
    let cluster = RedisCluster::start(3);
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let section = format!("{{ url: [{}], timeout: 1s }}", urls.join(", "));
    let mock = Mock::start(&["--key", "sk-good=ok", "--key", "sk-bad=429:retry_after=120"]);
    let [a, b] = group::<2>(&mock, KEYS_GOOD_BAD, "rpm: 40", &section).await;
    // Key states travel.
    hit_bad_key(&a, &mock, "cluster-model").await;
    b.wait_metric(
        "keygate_shared_key_events_total",
        &[("direction", "applied")],
        1.0,
        Duration::from_secs(5),
    )
    .await;
    // Limits hold across both (the key-state requests above took 1 to 4 of the 40).
    let (ok, limited, _) = spread(&[&a, &b], 80).await;
    println!("rpm 40 over a cluster: {ok} admitted, {limited} refused");
    assert!((34..=40).contains(&ok), "admitted {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_holds_across_instances_and_slots_come_back() {
    let redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok:latency=1500ms"]);
    let section = redis_section(&redis.url(), ", instances: 2, timeout: 1s");
    let [a, b] = group::<2>(
        &mock,
        "{ name: good, env: K_GOOD }",
        "concurrency: 2",
        &section,
    )
    .await;
    // Two slow requests, one on each instance, hold both slots of the group.
    let (a_url, b_url) = (a.kg.url.clone(), b.kg.url.clone());
    let slow = |url: String| {
        tokio::spawn(async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(TOKEN)
                .json(&chat("gpt-4o-mini"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let held = [slow(a_url), slow(b_url)];
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.count("sk-good").await < 2 {
        assert!(Instant::now() < deadline, "the slow requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for inst in [&a, &b] {
        let r = inst.post("gpt-4o-mini").await;
        assert_eq!(r.status(), 429, "a third request anywhere is refused");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "concurrency_limit");
    }
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    // The slots are given back after the answers (settled off the request's path).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let held = redis.cmd(&["ZCARD", "keygate:{client:app}:conc"]);
        if held.trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "slots still held: {held}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_spent_while_redis_was_away_is_added_when_it_returns() {
    let mut redis = RedisServer::start();
    let mock = Mock::start(&["--key", "sk-good=ok"]);
    let section = redis_section(&redis.url(), ", instances: 2");
    let limits = "budget: { tokens: 100000, per: day }";
    let inst = Instance::start(
        |m| instance_yaml(&mock, "{ name: good, env: K_GOOD }", limits, &section, m),
        KEY_ENV,
    );
    inst.wait_redis_up(true).await;
    redis.kill9();
    inst.wait_redis_up(false).await;
    let mut spent = 0;
    for _ in 0..5 {
        let r = inst.post("gpt-4o-mini").await;
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        spent += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    redis.restart();
    inst.wait_redis_up(true).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = redis.cmd(&["KEYS", "keygate:{client:app}:budget:*"]);
        let used: u64 = keys
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| redis.cmd(&["GET", k]).trim().parse::<u64>().unwrap_or(0))
            .sum();
        if used == spent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis has {used} of the {spent} tokens spent alone:\n{}",
            inst.kg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
