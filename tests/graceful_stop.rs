//! A graceful stop (SIGTERM) finishes what is in flight, writes the state file and the access
//! log, and exits as soon as nothing is left, without sitting out a long grace period.
#![allow(clippy::unwrap_used)]

mod utils;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use utils::*;

/// Far longer than any wait below: a stop that sits it out fails the test.
const GRACE: &str = "grace_period_seconds: 60";

/// Upstream `mock` (key `a`) for every model, and upstream `slow` (key `slow`) for `slow-*`.
fn config(mock: &Mock) -> String {
    format!(
        "server:\n  threads: 2\n  pid_file: {{dir}}/keygate.pid\n  upgrade_sock: {{dir}}/run/upgrade.sock\n  {GRACE}\n  graceful_shutdown_timeout_seconds: 5\nlisten:\n  - addr: 127.0.0.1:{{port}}\nstate_file: {{dir}}/state.json\naccess_log: {{ path: {{dir}}/access.log }}\nupstreams:\n  mock:\n    url: {url}\n    keys:\n      - {{ name: a, env: KA }}\n  slow:\n    url: {url}\n    keys:\n      - {{ name: slow, env: KSLOW }}\nroutes:\n  - {{ models: [\"slow-*\"], upstreams: [slow] }}\n  - {{ upstreams: [mock] }}\n",
        url = mock.url
    )
}

const ENV: &[(&str, &str)] = &[("KA", "sk-a"), ("KSLOW", "sk-slow")];

fn mock() -> Mock {
    Mock::start(&[
        "--key",
        "sk-a=ok",
        "--key",
        "sk-slow=rate_limit:latency=2s:retry_after=120",
    ])
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_exits_at_once_on_sigterm_and_writes_its_state() {
    let mock = mock();
    let mut kg = Keygate::start(&config(&mock), ENV);
    let r = kg.post_chat(&chat("gpt-4o")).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let sent = Instant::now();
    kg.signal(libc::SIGTERM);
    assert!(
        kg.wait_exit(Duration::from_secs(15)),
        "still running 15 s after SIGTERM (grace period 60 s): {}",
        kg.log_text()
    );
    assert!(sent.elapsed() < Duration::from_secs(15));
    let log = kg.log_text();
    assert!(
        log.contains("graceful stop: nothing left in flight"),
        "{log}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kg.dir.path().join("state.json")).unwrap())
            .unwrap();
    assert!(state["written_at_ms"].as_u64().unwrap() > 0);
    assert_eq!(lines(&kg.dir.path().join("access.log")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_streams_and_requests_in_flight_then_exits() {
    let mock = mock();
    let mut kg = Keygate::start(&config(&mock), ENV);
    // A 4 s stream, and a request the upstream answers 429 after 2 s (which cools its key).
    let body = serde_json::json!({"model": "gpt-4o", "stream": true, "messages": [], "mock": {"chunks": 20, "interval_ms": 200}});
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let slow = {
        let url = format!("{}/v1/chat/completions", kg.url);
        tokio::spawn(async move {
            let r = client()
                .post(url)
                .json(&chat("slow-1"))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.count("sk-slow").await == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    kg.signal(libc::SIGTERM);
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_eq!(
        text.matches("chat.completion.chunk").count(),
        20,
        "the whole stream: {text}"
    );
    assert!(text.contains("data: [DONE]"), "{text}");
    assert_eq!(slow.await.unwrap(), 429, "the slow request got its answer");

    assert!(
        kg.wait_exit(Duration::from_secs(15)),
        "still running 15 s after its last request (grace period 60 s): {}",
        kg.log_text()
    );
    // Written after the slow request ended: its key's cooldown is in the file.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kg.dir.path().join("state.json")).unwrap())
            .unwrap();
    let cooling = &state["upstreams"]["slow"]["slow"]["cooling"];
    assert!(cooling.as_array().is_some_and(|c| !c.is_empty()), "{state}");
    assert_eq!(
        lines(&kg.dir.path().join("access.log")),
        2,
        "one line per request"
    );
}
