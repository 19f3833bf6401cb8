//! Account-scoped objects against the real binary: a file uploaded through keygate, then used
//! in a batch and a chat request, reaches the account that owns it every time (a pool spanning
//! two accounts would otherwise send most of those to the other account and get 404s), also
//! after a restart; a listing follows the client's account; when none of the owner's keys can
//! serve, the client is told so.
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use utils::*;

const ENV: &[(&str, &str)] = &[("KA1", "sk-a1"), ("KA2", "sk-a2"), ("KB1", "sk-b1")];

/// keygate over keys a1 and a2 (account org1) and b1 (org2), round robin, its state in `state`
/// and an admin listener; returns it with the admin address.
fn start(mock: &Mock, state: &std::path::Path) -> (Keygate, String) {
    let port = free_port();
    let yaml = format!(
        "state_file: {}\nadmin: {{ addr: \"127.0.0.1:{port}\" }}\nupstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a1, env: KA1, account: org1 }}\n      - {{ name: b1, env: KB1, account: org2 }}\n      - {{ name: a2, env: KA2, account: org1 }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        state.display(),
        mock.url
    );
    let kg = Keygate::start(&yaml, ENV);
    kg.wait_for_port(port);
    (kg, format!("127.0.0.1:{port}"))
}

async fn send(kg: &Keygate, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method.parse().unwrap(), format!("{}{path}", kg.url));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The mock with keys a1 and a2 in account org1 and b1 in org2.
fn two_accounts() -> Mock {
    Mock::start(&[
        "--account",
        "sk-a1=org1",
        "--account",
        "sk-a2=org1",
        "--account",
        "sk-b1=org2",
    ])
}

/// Every request the mock answered 404.
async fn not_found_count(mock: &Mock) -> usize {
    let stats = mock.stats().await;
    stats["requests"]
        .as_array()
        .map_or(0, |all| all.iter().filter(|r| r["status"] == 404).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_and_its_batches_and_chats_stay_on_the_account_that_uploaded_it() {
    let mock = two_accounts();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let (kg, admin) = start(&mock, &state);

    // Round robin starts at a1: the file belongs to org1.
    let r = client()
        .post(format!("{}/v1/files", kg.url))
        .header("content-type", "multipart/form-data; boundary=x")
        .body("--x\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--x--\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let file: Value = r.json().await.unwrap();
    let id = file["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file-"), "{file}");

    // Without keygate's help, org2's key would get a 404 for it.
    let direct = client()
        .get(format!("{}/v1/files/{id}", mock.url))
        .bearer_auth("sk-b1")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 404);
    let before = not_found_count(&mock).await;

    let chat_with_file = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": id}}, {"type": "text", "text": "summarise"}]}]});
    let mut batches = Vec::new();
    for _ in 0..6 {
        assert_eq!(
            send(&kg, "GET", &format!("/v1/files/{id}"), None).await.0,
            200
        );
        let (s, b) = send(&kg, "POST", "/v1/batches", Some(json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))).await;
        assert_eq!(s, 200, "{b}");
        batches.push(b["id"].as_str().unwrap().to_string());
        assert_eq!(
            send(
                &kg,
                "POST",
                "/v1/chat/completions",
                Some(chat_with_file.clone())
            )
            .await
            .0,
            200
        );
    }
    // The batches are org1's too.
    for b in &batches {
        assert_eq!(
            send(&kg, "GET", &format!("/v1/batches/{b}"), None).await.0,
            200
        );
    }
    // A listing follows the client's last account.
    let (s, list) = send(&kg, "GET", "/v1/files", None).await;
    assert_eq!(s, 200);
    assert!(list.to_string().contains(&id), "{list}");
    assert_eq!(
        not_found_count(&mock).await,
        before,
        "no request reached org2"
    );
    // Other requests still use every key.
    for _ in 0..3 {
        assert_eq!(kg.post_chat(&chat("gpt-4o")).await.status(), 200);
    }
    assert!(mock.count("sk-b1").await >= 1);
    let mut kg = kg;
    assert!(
        kg.stop(libc::SIGTERM, Duration::from_secs(30)),
        "a graceful stop"
    );

    // After a restart the owners come back from the state file.
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains(&id) && text.contains("org1"), "{text}");
    let (kg, admin2) = start(&mock, &state);
    let _ = admin;
    for _ in 0..4 {
        assert_eq!(
            send(&kg, "GET", &format!("/v1/files/{id}"), None).await.0,
            200
        );
    }
    assert_eq!(not_found_count(&mock).await, before);

    // Both of org1's keys rate limited: tried in turn, then keygate answers 429 itself, naming
    // the account, rather than trying org2's key.
    for k in ["sk-a1", "sk-a2"] {
        mock.set_behavior(k, json!("rate_limit:retry_after=30"))
            .await;
    }
    let b1_before = mock.count("sk-b1").await;
    let (s, _) = send(
        &kg,
        "POST",
        "/v1/chat/completions",
        Some(chat_with_file.clone()),
    )
    .await;
    assert_eq!(s, 429, "the upstream's own 429");
    let r = client()
        .post(format!("{}/v1/chat/completions", kg.url))
        .json(&chat_with_file)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&id) && message.contains("cooling"),
        "{message}"
    );
    assert_eq!(
        mock.count("sk-b1").await,
        b1_before,
        "org2's key was never tried"
    );
    for k in ["sk-a1", "sk-a2"] {
        mock.set_behavior(k, json!("ok")).await;
    }

    // With both of org1's keys out, the client is told whose keys are missing.
    for k in ["a1", "a2"] {
        let r = client()
            .post(format!("http://{admin2}/admin/v1/keys/mock/{k}/disable"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (s, v) = send(&kg, "GET", &format!("/v1/files/{id}"), None).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "owner_keys_unavailable");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&id) && message.contains("account org1"),
        "{message}"
    );
    assert_eq!(
        not_found_count(&mock).await,
        before,
        "nothing was sent to org2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_created_through_one_instance_is_routed_to_its_account_by_the_others() {
    let redis = utils::redis::RedisServer::start();
    let mock = two_accounts();
    let yaml = format!(
        "redis: {{ url: \"{}\" }}\nupstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a1, env: KA1, account: org1 }}\n      - {{ name: b1, env: KB1, account: org2 }}\n      - {{ name: a2, env: KA2, account: org1 }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        redis.url(),
        mock.url
    );
    let a = Keygate::start(&yaml, ENV);
    let b = Keygate::start(&yaml, ENV);
    // Both must have Redis up before the upload (the id is shared as it is recorded).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(a.log_text().contains("Redis is reachable")
        && b.log_text().contains("Redis is reachable"))
    {
        assert!(Instant::now() < deadline, "Redis never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, file) = send(&a, "POST", "/v1/files", Some(json!({"purpose": "batch"}))).await;
    assert_eq!(s, 200, "{file}");
    let id = file["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.cmd(&["EXISTS", &format!("keygate:obj:{id}")]).trim() != "1" {
        assert!(Instant::now() < deadline, "the owner never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = not_found_count(&mock).await;
    for _ in 0..6 {
        assert_eq!(
            send(&b, "GET", &format!("/v1/files/{id}"), None).await.0,
            200
        );
    }
    assert_eq!(
        not_found_count(&mock).await,
        before,
        "B sent nothing to org2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tuned_model_stays_on_the_account_that_first_served_it() {
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (kg, _) = start(&mock, &dir.path().join("state.json"));
    let model = "ft:gpt-4o-mini-2024-07-18:acme::x1y2";
    for _ in 0..7 {
        assert_eq!(kg.post_chat(&chat(model)).await.status(), 200);
    }
    let stats = mock.stats().await;
    let keys: Vec<String> = stats["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["model"] == model)
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 7);
    // The first went to a1 (org1); the rest to org1's keys only, never b1 (org2).
    assert_eq!(keys[0], "sk-a1");
    assert!(keys.iter().all(|k| k != "sk-b1"), "{keys:?}");
    assert!(
        keys.iter().any(|k| k == "sk-a2"),
        "both of org1's keys serve: {keys:?}"
    );
}
