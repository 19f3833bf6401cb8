//! Shared helpers for integration tests: start the real `keygate` binary and the mock upstream
//! (`keygate-mock`, run in process) on ephemeral loopback ports, and stop them when the test ends.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `keygate-mock`, on a runtime of its own in this process; stopped on drop.
pub struct Mock {
    /// The mock itself: dropping it stops the mock.
    running: keygate_mock::RunningMock,
    /// `http://127.0.0.1:PORT` (or https).
    pub url: String,
    /// Bound address.
    pub addr: SocketAddr,
}

impl Mock {
    /// Starts the mock with extra CLI args on a free loopback port.
    pub fn start(args: &[&str]) -> Mock {
        let all: Vec<&str> = ["--listen", "127.0.0.1:0"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let running =
            keygate_mock::spawn(&all).unwrap_or_else(|e| panic!("start keygate-mock: {e}"));
        Mock {
            url: running.url(),
            addr: running.addr(),
            running,
        }
    }

    /// The mock's `/_mock/stats` JSON.
    pub async fn stats(&self) -> serde_json::Value {
        let url = format!("http://{}/_mock/stats", self.addr);
        reqwest::get(url).await.unwrap().json().await.unwrap()
    }

    /// Requests the mock saw with this key.
    pub async fn count(&self, key: &str) -> u64 {
        self.stats().await["keys"][key]["requests"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Changes one key's behaviour at run time.
    pub async fn set_behavior(&self, key: &str, spec: serde_json::Value) {
        let url = format!("http://{}/_mock/behavior", self.addr);
        let r = reqwest::Client::new()
            .post(url)
            .json(&serde_json::json!({"key": key, "spec": spec}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "set_behavior: {}", r.status());
    }
}

/// A free loopback port (bound then released: the window for a clash is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `keygate`, stopped on drop.
pub struct Keygate {
    child: Child,
    /// Its directory (config, pid file, upgrade socket).
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The listening port.
    pub port: u16,
    /// Where its stderr goes.
    pub log: PathBuf,
}

/// Writes a config into a fresh temp dir. `{port}` and `{dir}` in `yaml` are filled in;
/// `server:` is added (pid file and upgrade socket in the temp dir) unless the text has one.
pub fn write_config(yaml: &str) -> (tempfile::TempDir, PathBuf, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut text = yaml
        .replace("{port}", &port.to_string())
        .replace("{dir}", dir.path().to_str().unwrap());
    if !text.contains("server:") {
        text = format!(
            "server:\n  threads: 2\n  pid_file: {d}/keygate.pid\n  upgrade_sock: {d}/run/upgrade.sock\n{text}",
            d = dir.path().display()
        );
    }
    if !text.contains("listen:") {
        text.push_str(&format!("\nlisten:\n  - addr: 127.0.0.1:{port}\n"));
    }
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path, port)
}

impl Keygate {
    /// Starts keygate with `yaml` (see [`write_config`]) and env vars; waits until it listens.
    pub fn start(yaml: &str, env: &[(&str, &str)]) -> Keygate {
        let (dir, path, port) = write_config(yaml);
        Self::start_with(dir, &path, port, env)
    }

    /// Starts keygate on an already written config.
    pub fn start_with(
        dir: tempfile::TempDir,
        path: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Keygate {
        let log = dir.path().join("keygate.log");
        let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["-c", path.to_str().unwrap()])
            .env(
                "RUST_LOG",
                std::env::var("KEYGATE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keygate");
        let mut kg = Keygate {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            port,
            log,
        };
        kg.wait_listening();
        kg
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("keygate exited early ({status}): {}", self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("keygate did not listen within 30s: {}", self.log_text());
    }

    /// Everything keygate wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// POSTs `body` to `/v1/chat/completions` with a fresh client.
    pub async fn post_chat(&self, body: &serde_json::Value) -> reqwest::Response {
        client()
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Whether the process has exited.
    pub fn try_wait(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends `signal` (`TERM`, `QUIT`, `INT`…) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `within` for the process to exit; whether it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.try_wait()
    }

    /// Stops it with SIGINT (Pingora's fast stop); whether it exited within `within`.
    pub fn stop(&mut self, within: Duration) -> bool {
        self.signal("INT");
        self.wait_exit(within)
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        if self.try_wait() {
            return;
        }
        // SIGINT is Pingora's fast stop; fall back to SIGKILL if it lingers.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `keygate -t -c FILE` on `yaml` and returns (exit code, stderr).
pub fn check_config(yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let (dir, path, _) = write_config(yaml);
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["-t", "-c", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    drop(dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal chat request body.
pub fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A reqwest client that never pools connections across tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The Prometheus text from keygate's metrics port.
pub async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sum of a metric's samples whose label set contains every `labels` pair.
pub fn sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
