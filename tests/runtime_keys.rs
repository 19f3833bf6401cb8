//! Keys added and removed at run time, against the real binary: through the API and the CLI,
//! serving at once, kept (sealed) in the local store across a restart, refused to start under
//! another master key, and shared through Redis by every instance within a second.
#![allow(clippy::unwrap_used)]

mod utils;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use utils::redis::RedisServer;
use utils::*;

const ADMIN: &str = "adm-token-1234";
const MASTER: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const OTHER_MASTER: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn env(master: &str) -> [(&str, &str); 3] {
    [
        ("KA", "sk-good-aaaa"),
        ("KG_ADMIN", ADMIN),
        ("KG_MASTER", master),
    ]
}

/// keygate with config key `a` on upstream `mock`, runtime keys kept in `store` (or Redis when
/// `redis` is given); returns it with its admin address.
fn start(
    mock: &Mock,
    store: Option<&Path>,
    redis: Option<&str>,
    master: &str,
) -> (Keygate, String) {
    let port = free_port();
    let (path, redis) = match (store, redis) {
        (Some(p), None) => (format!(", path: {}", p.display()), String::new()),
        (None, Some(url)) => (String::new(), format!("redis: {{ url: \"{url}\" }}\n")),
        _ => unreachable!("a file store or Redis"),
    };
    let yaml = format!(
        "{redis}admin: {{ addr: \"127.0.0.1:{port}\", token_env: KG_ADMIN, runtime_keys: {{ master_key_env: KG_MASTER{path} }} }}\nupstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA }}\nroutes:\n  - {{ name: chat, upstreams: [mock] }}\n",
        mock.url
    );
    let kg = Keygate::start(&yaml, &env(master));
    kg.wait_for_port(port);
    (kg, format!("127.0.0.1:{port}"))
}

async fn call(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut req = client()
        .request(method.parse().unwrap(), format!("http://{addr}{path}"))
        .bearer_auth(ADMIN);
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

/// The names and sources of the keys the admin API lists.
async fn listed(addr: &str) -> Vec<(String, String)> {
    let (_, v) = call(addr, "GET", "/admin/v1/keys", "").await;
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["source"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Sends `n` chats through `kg`, each answered 200.
async fn chats(kg: &Keygate, n: usize) {
    for _ in 0..n {
        let r = kg.post_chat(&chat("gpt-4o")).await;
        assert_eq!(r.status(), 200);
    }
}

/// `keygate admin ARGS` with the admin token and `stdin`; (exit code, stdout, stderr).
fn cli(addr: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    admin_cli(addr, Some(ADMIN), args, stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_at_run_time_serves_at_once_survives_a_restart_and_leaves_when_removed() {
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("keys").join("runtime-keys.json");
    let (kg, admin) = start(&mock, Some(&store), None, MASTER);

    let (s, v) = call(
        &admin,
        "POST",
        "/admin/v1/keys/mock",
        r#"{"name":"k2","secret":"sk-run-2222"}"#,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["key"]["source"].as_str(), v["key"]["state"].as_str()),
        (Some("runtime"), Some("ready"))
    );
    // Round robin over a and k2: the next two requests use both.
    chats(&kg, 2).await;
    assert_eq!(
        mock.count("sk-run-2222").await,
        1,
        "the added key serves at once"
    );

    // The store is private and holds no secret in the clear.
    let text = std::fs::read_to_string(&store).unwrap();
    assert!(!text.contains("sk-run"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The CLI adds one from standard input.
    let (code, out, err) = cli(
        &admin,
        &["keys", "add", "mock", "k3", "--account", "org1"],
        "sk-run-3333\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("key mock/k3 added (key-") && out.trim_end().ends_with(": ready"),
        "{out}"
    );
    let log = kg.log_text();
    assert!(
        log.contains("admin: key mock/k2 (key-") && log.contains("added by admin token"),
        "{log}"
    );
    assert!(!log.contains("sk-run"), "no secret in the log: {log}");
    drop(kg);

    // A restart finds both.
    let (kg, admin) = start(&mock, Some(&store), None, MASTER);
    assert_eq!(
        listed(&admin).await,
        owned(&[("a", "config"), ("k2", "runtime"), ("k3", "runtime")])
    );
    let before = mock.count("sk-run-3333").await;
    chats(&kg, 3).await;
    assert_eq!(
        mock.count("sk-run-3333").await,
        before + 1,
        "k3 serves after the restart"
    );

    // Removed through the CLI: out of rotation and out of the store.
    let (code, out, err) = cli(&admin, &["keys", "remove", "mock", "k2"], "");
    assert_eq!((code, out.trim()), (0, "key mock/k2 removed"), "{err}");
    let before = mock.count("sk-run-2222").await;
    chats(&kg, 6).await;
    assert_eq!(
        mock.count("sk-run-2222").await,
        before,
        "a removed key is never used"
    );
    assert_eq!(
        listed(&admin).await,
        owned(&[("a", "config"), ("k3", "runtime")])
    );
    let (code, _, err) = cli(&admin, &["keys", "remove", "mock", "a"], "");
    assert_eq!(code, 1);
    assert!(err.contains("comes from the config"), "{err}");
    drop(kg);

    // Another master key cannot open the store: keygate refuses to start, naming it.
    let port = free_port();
    let yaml = format!(
        "admin: {{ addr: \"127.0.0.1:{port}\", token_env: KG_ADMIN, runtime_keys: {{ master_key_env: KG_MASTER, path: {} }} }}\nupstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        store.display(),
        mock.url
    );
    let (_cfg_dir, path, _) = write_config(&yaml);
    let mut child = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["-c", path.to_str().unwrap()])
            .envs(env(OTHER_MASTER))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "keygate",
    );
    let out = child
        .wait_output(Duration::from_secs(30))
        .expect("keygate must exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("admin.runtime_keys") && err.contains(&store.display().to_string()),
        "{err}"
    );
    assert!(err.contains("does not open with this master key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_keys_kept_in_redis_reach_every_instance_within_a_second() {
    let redis = RedisServer::start();
    let mock = Mock::start(&[]);
    let (a, admin_a) = start(&mock, None, Some(&redis.url()), MASTER);
    let (b, admin_b) = start(&mock, None, Some(&redis.url()), MASTER);
    // Both see Redis before the change (a key change needs it up).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, v) = call(
            &admin_a,
            "POST",
            "/admin/v1/keys/mock",
            r#"{"name":"k2","secret":"sk-run-2222"}"#,
        )
        .await;
        if s == 201 {
            break;
        }
        assert_eq!(v["error"]["code"], "key_store_unavailable", "{v}");
        assert!(
            Instant::now() < deadline,
            "Redis never came up: {}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let added = Instant::now();
    while !listed(&admin_b)
        .await
        .contains(&("k2".into(), "runtime".into()))
    {
        assert!(
            added.elapsed() < Duration::from_secs(10),
            "B never got k2: {}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = added.elapsed();
    // Read twice a second: about 0.5 s at most; the bound leaves room for a busy machine.
    assert!(took < Duration::from_secs(2), "B got k2 after {took:?}");
    chats(&b, 2).await;
    assert_eq!(mock.count("sk-run-2222").await, 1, "B serves with k2");
    let stored = redis.cmd(&["HGETALL", "keygate:{keys}:runtime"]);
    assert!(
        stored.contains("k2") && !stored.contains("sk-run"),
        "{stored}"
    );

    // A third instance started now finds it.
    let (_c, admin_c) = start(&mock, None, Some(&redis.url()), MASTER);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listed(&admin_c)
        .await
        .contains(&("k2".into(), "runtime".into()))
    {
        assert!(Instant::now() < deadline, "C never got k2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redis loses its data: the instances put k2 back rather than drop it.
    redis.cmd(&["FLUSHALL"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis
        .cmd(&["HEXISTS", "keygate:{keys}:runtime", "mock/k2"])
        .trim()
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "k2 was never put back: {}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for admin in [&admin_a, &admin_b] {
        assert!(listed(admin)
            .await
            .contains(&("k2".into(), "runtime".into())));
    }

    // Removed on B: A drops it too.
    let (s, v) = call(&admin_b, "DELETE", "/admin/v1/keys/mock/k2", "").await;
    assert_eq!(s, 200, "{v}");
    let removed = Instant::now();
    while listed(&admin_a).await.iter().any(|(n, _)| n == "k2") {
        assert!(
            removed.elapsed() < Duration::from_secs(10),
            "A kept k2: {}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        removed.elapsed() < Duration::from_secs(2),
        "A dropped k2 after {:?}",
        removed.elapsed()
    );
    let before = mock.count("sk-run-2222").await;
    chats(&a, 4).await;
    assert_eq!(mock.count("sk-run-2222").await, before);
}
