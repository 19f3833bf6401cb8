//! The dashboard and the alert rules against a running keygate: traffic that makes every labelled
//! series appear (success, failover past a refused key, a 429 cooldown, a client over its limit,
//! a local 404, a header-guard close, tokens), then a scrape of `/metrics`. Every metric a query
//! names must be in the scrape, every label it matches on or groups by must be on that metric
//! (in the catalogue and in the scrape), and every value it asks for with `=` must occur.

use crate::grafana::{dashboard, dashboard_exprs, variable_selectors};
use crate::prometheus::alert_exprs;
use crate::promql::{check_promql, TARGET_LABELS};
use crate::utils::redis::RedisServer;
use crate::utils::{chat, client, free_port, scrape, Keygate, Mock};
use keygate::metrics::{MetricKind, CATALOGUE};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Label values seen per series name and label name, from a Prometheus text scrape.
type Scraped = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// Reads the samples of a Prometheus text exposition: `name{label="value",...} number`.
fn parse_scrape(text: &str) -> Result<Scraped, String> {
    let mut out = Scraped::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let end = line.find(['{', ' ']).ok_or(format!("no value: {line}"))?;
        let labels = out.entry(line[..end].to_string()).or_default();
        let mut rest = &line[end..];
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            loop {
                rest = rest.trim_start_matches(',');
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (name, after) = rest.split_once("=\"").ok_or(format!("bad label: {line}"))?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let close = loop {
                    match chars.next() {
                        Some((i, '"')) => break i,
                        Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("unterminated value: {line}")),
                    }
                };
                labels.entry(name.to_string()).or_default().insert(value);
                rest = &after[close + 1..];
            }
        }
        rest.trim()
            .parse::<f64>()
            .map_err(|e| format!("{e}: {line}"))?;
    }
    Ok(out)
}

/// The series names a catalogue entry appears as, each with its label names.
fn expected_series() -> Vec<(String, BTreeSet<&'static str>)> {
    let mut out = Vec::new();
    for metric in CATALOGUE {
        let labels: BTreeSet<&str> = metric.labels.iter().copied().collect();
        if metric.kind == MetricKind::Histogram {
            let mut bucket = labels.clone();
            bucket.insert("le");
            out.push((format!("{}_bucket", metric.name), bucket));
            out.push((format!("{}_sum", metric.name), labels.clone()));
            out.push((format!("{}_count", metric.name), labels));
        } else {
            out.push((metric.name.to_string(), labels));
        }
    }
    out
}

/// Checks one expression against the scrape: metrics present, labels carried, values seen.
fn check_against_scrape(expr: &str, scraped: &Scraped) -> Result<(), String> {
    // The catalogue: every label used exists on a metric of the expression.
    let uses = check_promql(expr, &["up"])?;
    let ours: Vec<&String> = uses
        .metrics
        .iter()
        .filter(|m| m.starts_with("keygate_"))
        .collect();
    if ours.is_empty() {
        return Ok(());
    }
    for metric in &ours {
        if !scraped.contains_key(metric.as_str()) {
            return Err(format!("{metric} is not in the scrape: {expr}"));
        }
    }
    for (metric, label, op, value) in &uses.matchers {
        if !metric.starts_with("keygate_") || TARGET_LABELS.contains(&label.as_str()) {
            continue;
        }
        let values = scraped[metric.as_str()].get(label).ok_or(format!(
            "{metric} has no label {label:?} in the scrape: {expr}"
        ))?;
        if op == "=" && !values.contains(value) {
            return Err(format!(
                "{metric}{{{label}={value:?}}} never occurred (seen {values:?}): {expr}"
            ));
        }
    }
    for label in &uses.grouping {
        if TARGET_LABELS.contains(&label.as_str()) {
            continue;
        }
        if !ours.iter().any(|m| scraped[m.as_str()].contains_key(label)) {
            return Err(format!("no series of {ours:?} has label {label:?}: {expr}"));
        }
    }
    Ok(())
}

const MOCK_KEYS: &[&str] = &[
    "--key",
    "sk-live-good=ok",
    "--key",
    "sk-live-refused=unauthorized",
    "--key",
    "sk-live-busy=rate_limit:retry_after=60",
];

const ENV: &[(&str, &str)] = &[
    ("K_GOOD", "sk-live-good"),
    ("K_REFUSED", "sk-live-refused"),
    ("K_BUSY", "sk-live-busy"),
    ("TOKEN_TEAM", "kg-live-team-0123456789"),
    ("TOKEN_TINY", "kg-live-tiny-0123456789"),
];

/// The config: with `redis:` on a real server, so that the shared-state series exist too.
fn config(mock: &Mock, metrics_port: u16, redis_url: &str) -> String {
    format!(
        "metrics: {{ addr: 127.0.0.1:{metrics_port} }}\n\
         redis: {{ url: \"{redis_url}\" }}\n\
         guards: {{ max_headers: 20 }}\n\
         clients:\n  - {{ name: team, token_env: TOKEN_TEAM }}\n  \
         - {{ name: tiny, token_env: TOKEN_TINY, limits: {{ rpm: 1 }} }}\n\
         upstreams:\n  \
         main:\n    url: {url}\n    health: {{ enabled: false }}\n    keys:\n      \
         - {{ name: good, env: K_GOOD }}\n      - {{ name: refused, env: K_REFUSED }}\n  \
         busy:\n    url: {url}\n    health: {{ enabled: false }}\n    keys:\n      \
         - {{ name: busy, env: K_BUSY }}\n\
         routes:\n  - {{ name: chat, models: [\"gpt-*\"], upstreams: [main] }}\n  \
         - {{ name: busy, models: [\"busy-*\"], upstreams: [busy] }}\n  \
         - {{ name: cached, models: [\"cached-*\"], upstreams: [main], cache: {{}} }}\n",
        url = mock.url
    )
}

/// Posts a chat request for `model` as the client with `token`; returns the status.
async fn post(kg: &Keygate, token: &str, model: &str) -> u16 {
    client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .bearer_auth(token)
        .json(&chat(model))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Sends a request with more header fields than the guard allows; returns the answer's head.
async fn too_many_headers(kg: &Keygate) -> String {
    let fields: String = (0..25).map(|i| format!("x-field-{i}: v\r\n")).collect();
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n{fields}\r\n");
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", kg.port))
        .await
        .unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("the guard answers and closes")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_series_and_labels_a_running_keygate_exports() {
    let mock = Mock::start(MOCK_KEYS);
    let redis = RedisServer::start();
    let mport = free_port();
    let kg = Keygate::start(&config(&mock, mport, &redis.url()), ENV);
    // Limits are counted in Redis once it is reached; until then on the local share.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !scrape(mport).await.contains("\nkeygate_redis_up 1") {
        assert!(
            Instant::now() < deadline,
            "Redis never up:\n{}",
            kg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (team, tiny) = (ENV[3].1, ENV[4].1);

    // Successes; one of the first two meets the refused key, which is disabled, and is retried.
    for _ in 0..4 {
        assert_eq!(post(&kg, team, "gpt-4o").await, 200, "{}", kg.log_text());
    }
    // The only key of `busy` answers 429: it cools down and the client gets the 429.
    assert_eq!(post(&kg, team, "busy-1").await, 429);
    // A cached route: a miss, then a hit (cache requests, tokens saved, bytes held).
    assert_eq!(post(&kg, team, "cached-1").await, 200);
    assert_eq!(post(&kg, team, "cached-1").await, 200);
    // No route: keygate answers 404 itself.
    assert_eq!(post(&kg, team, "llama").await, 404);
    // A client over its rate.
    assert_eq!(post(&kg, tiny, "gpt-4o").await, 200);
    assert_eq!(post(&kg, tiny, "gpt-4o").await, 429);
    // The header guard closes a connection.
    let head = too_many_headers(&kg).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    // Counters may be bumped after the answer went out: wait until every family is there.
    let expected = expected_series();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, scraped) = loop {
        let text = scrape(mport).await;
        let scraped = parse_scrape(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        if expected.iter().all(|(name, _)| scraped.contains_key(name)) {
            break (text, scraped);
        }
        let missing: Vec<&String> = expected
            .iter()
            .map(|(name, _)| name)
            .filter(|name| !scraped.contains_key(name.as_str()))
            .collect();
        assert!(
            Instant::now() < deadline,
            "never scraped {missing:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The catalogue is what the binary exports: same families, same label names.
    for (name, labels) in &expected {
        let seen: BTreeSet<&str> = scraped[name].keys().map(String::as_str).collect();
        assert_eq!(&seen, labels, "labels of {name}:\n{text}");
    }
    let exported: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for name in scraped.keys().filter(|n| n.starts_with("keygate_")) {
        assert!(
            exported.contains(name.as_str()),
            "{name} is not in the catalogue"
        );
    }

    let d = dashboard();
    let mut exprs: Vec<(String, String)> = dashboard_exprs(&d)
        .into_iter()
        .map(|(title, expr)| (format!("panel {title:?}"), expr))
        .collect();
    exprs.extend(
        variable_selectors(&d)
            .into_iter()
            .map(|sel| ("a dashboard variable".to_string(), sel)),
    );
    exprs.extend(
        alert_exprs()
            .into_iter()
            .map(|(name, expr)| (format!("alert {name}"), expr)),
    );
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut failures = Vec::new();
    for (what, expr) in &exprs {
        if let Err(e) = check_against_scrape(expr, &scraped) {
            failures.push(format!("{what}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nscrape:\n{text}",
        failures.join("\n")
    );
}

#[test]
fn scrape_parser_reads_names_labels_and_escaped_values() {
    let scraped = parse_scrape(
        "# HELP x y\nkeygate_in_flight_requests 0\n\
         keygate_keys{state=\"ready\",upstream=\"a \\\"b\\\"\"} 2\n\
         keygate_ttfb_seconds_bucket{upstream=\"u\",le=\"+Inf\"} 1e3\n",
    )
    .unwrap();
    assert!(scraped["keygate_in_flight_requests"].is_empty());
    assert_eq!(
        scraped["keygate_keys"]["upstream"],
        BTreeSet::from(["a \"b\"".to_string()])
    );
    assert!(scraped["keygate_ttfb_seconds_bucket"].contains_key("le"));
    assert!(parse_scrape("keygate_keys{state=\"ready} 1\n").is_err());
    assert!(parse_scrape("keygate_keys{state=\"ready\"} one\n").is_err());
}

#[test]
fn scrape_check_catches_a_missing_metric_label_or_value() {
    let scraped = parse_scrape(
        "keygate_keys{state=\"ready\",upstream=\"u\"} 1\n\
         keygate_requests_total{route=\"r\",upstream=\"u\",status=\"200\"} 1\n",
    )
    .unwrap();
    check_against_scrape(
        r#"sum by (upstream) (keygate_keys{state="ready"})"#,
        &scraped,
    )
    .unwrap();
    check_against_scrape(r#"sum by (job) (up{job=~"keygate.*"}) == 0"#, &scraped).unwrap();
    for bad in [
        // In the catalogue, not in this scrape.
        r#"sum(rate(keygate_retries_total[5m]))"#,
        // A value that never occurred.
        r#"sum(keygate_keys{state="disabled"})"#,
        r#"sum(rate(keygate_requests_total{status="429"}[5m]))"#,
        // A label the metric does not have.
        r#"sum by (model) (keygate_keys)"#,
    ] {
        assert!(
            check_against_scrape(bad, &scraped).is_err(),
            "not caught: {bad}"
        );
    }
}
