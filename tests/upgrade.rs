//! Graceful upgrade under load: a second keygate takes the sockets over (`-u` + SIGQUIT to the
//! old one) while clients stream and send short requests; nothing fails, nothing is cut short,
//! and key states carry over.
#![allow(clippy::unwrap_used)]

mod utils;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use utils::*;

fn fresh_client() -> reqwest::Client {
    // No pooling: every request opens its own connection, across the handover.
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_drops_nothing_and_keeps_key_states() {
    assert!(
        Command::new("python3")
            .args(["-c", "import openai"])
            .status()
            .unwrap()
            .success(),
        "the `openai` Python SDK is required (`make deps` installs it)"
    );
    let mock = Mock::start(&[
        "--key",
        "sk-a=ok",
        "--key",
        "sk-b=ok",
        "--key",
        "sk-cool=rate_limit:retry_after=120:first=1",
    ]);
    let yaml = format!(
        "server:\n  threads: 2\n  pid_file: {{dir}}/keygate.pid\n  upgrade_sock: {{dir}}/run/upgrade.sock\n  grace_period_seconds: 60\n  graceful_shutdown_timeout_seconds: 2\nlisten:\n  - addr: 127.0.0.1:{{port}}\nstate_file: {{dir}}/state.json\nupstreams:\n  mock:\n    url: {}\n    keys:\n      - {{ name: a, env: KA }}\n      - {{ name: b, env: KB }}\n      - {{ name: cool, env: KC }}\nroutes:\n  - {{ upstreams: [mock] }}\n",
        mock.url
    );
    let env = [("KA", "sk-a"), ("KB", "sk-b"), ("KC", "sk-cool")];
    let (dir, path, port) = write_config(&yaml);
    let old = Keygate::start_with(dir, &path, port, &env);
    let url = old.url.clone();

    // Cool one key down and let the state file catch up.
    while mock.count("sk-cool").await == 0 {
        let r = fresh_client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let state = old.dir.path().join("state.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&state).is_ok_and(|s| s.contains("cool")) {
        assert!(
            Instant::now() < deadline,
            "the state file never recorded the cooling key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // 50 streams of 10 chunks 500 ms apart, started over the first 3 s.
    for i in 0..50u64 {
        let (url, failures, done) = (url.clone(), failures.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(60 * i)).await;
            let body = serde_json::json!({"model": "gpt-4o", "stream": true, "mock": {"chunks": 10, "interval_ms": 500}});
            let ok = match fresh_client().post(format!("{url}/v1/chat/completions")).json(&body).send().await {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(t) => t.matches("chat.completion.chunk").count() == 10 && t.contains("[DONE]"),
                    Err(_) => false,
                },
                _ => false,
            };
            if ok {
                done.fetch_add(1, Ordering::Relaxed);
            } else {
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // 50 clients sending short requests for 10 s, each on a fresh connection.
    for _ in 0..50 {
        let (url, failures, done) = (url.clone(), failures.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(10);
            let c = fresh_client();
            while Instant::now() < end {
                let ok = match c
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&chat("gpt-4o"))
                    .send()
                    .await
                {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let mut sdk = ChildGuard::spawn(
        Command::new("python3")
            .args([
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/sdk_client.py"),
                &url,
                "10",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "the SDK client",
    );

    // The upgrade: a new process waits for the sockets, then the old one hands them over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let new_log = std::fs::File::create(old.dir.path().join("new.log")).unwrap();
    let new = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["-u", "-c", path.to_str().unwrap()])
            .envs(env)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(new_log),
        "the new keygate",
    );
    // The new process is ready for the sockets once it listens on the upgrade socket.
    let upgrade_sock = old.dir.path().join("run/upgrade.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !upgrade_sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never opened {}",
            upgrade_sock.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent_quit = Instant::now();
    assert!(Command::new("kill")
        .args(["-QUIT", &old.pid().to_string()])
        .status()
        .unwrap()
        .success());

    for t in tasks {
        t.await.unwrap();
    }
    let sdk = sdk
        .wait_output(Duration::from_secs(60))
        .expect("the SDK client finishes");
    assert!(
        sdk.status.success(),
        "SDK client failed: {}",
        String::from_utf8_lossy(&sdk.stderr)
    );
    let sdk_done: usize = String::from_utf8_lossy(&sdk.stdout).trim().parse().unwrap();
    assert!(sdk_done > 10, "the SDK client kept going ({sdk_done})");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed or truncated requests"
    );
    assert!(done.load(Ordering::Relaxed) > 200);

    // The old process keeps its sockets for Pingora's 5 s handover window, finishes what it
    // has in flight, and exits then: not at the end of its 60 s grace period.
    let mut old = old;
    let exited = wait_exit(&mut old, Duration::from_secs(40));
    assert!(
        exited.is_some(),
        "old process still running: {}",
        old.log_text()
    );
    let took = sent_quit.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "it served through the handover window ({took:?})"
    );
    assert!(
        took < Duration::from_secs(45),
        "it exited once drained, not at the end of its grace period ({took:?})"
    );
    assert!(
        old.log_text()
            .contains("graceful stop: nothing left in flight"),
        "{}",
        old.log_text()
    );

    // The new process serves, restored the state file, and still rests the cooled key.
    let new_text = std::fs::read_to_string(old.dir.path().join("new.log")).unwrap();
    assert!(new_text.contains("restored the state of"), "{new_text}");
    let before = mock.count("sk-cool").await;
    for _ in 0..9 {
        let r = fresh_client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        mock.count("sk-cool").await,
        before,
        "the cooling key is still cooling"
    );
    drop(new);
}

fn wait_exit(kg: &mut Keygate, limit: Duration) -> Option<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if kg.try_wait() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
