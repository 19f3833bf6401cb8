//! Shared helpers for integration tests: start the real `keygate` binary and the mock upstream
//! (`keygate-mock`, run in process) on ephemeral loopback ports, and stop them when the test ends.
//!
//! Every process a test starts is owned by a guard whose `Drop` stops it ([`ChildGuard`],
//! [`PidGuard`], [`Keygate`]), so a failed assertion leaves nothing running. Waits poll with a
//! deadline ([`wait_for_lines`], [`wait_for_metric`]) instead of sleeping a fixed time. No helper
//! reads or sets this process's environment for a child: pass variables in `env` instead.
#![allow(dead_code, clippy::unwrap_used)]

pub mod chromium;
pub mod h2_frames;
pub mod redis;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a stopped process gets between SIGINT and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) only sends a signal; it touches no memory of ours.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A child process stopped on drop: SIGINT (keygate's fast stop), then SIGKILL if it is still
/// there after [`STOP_GRACE`].
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Starts `cmd`, panicking with `what` if it cannot.
    pub fn spawn(cmd: &mut Command, what: &str) -> ChildGuard {
        ChildGuard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
        )
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process has exited (reaped).
    pub fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `limit` for the process to exit; its exit status, or `None` if it still runs
    /// (the drop stops it then).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the process to exit, then reads its piped stdout and stderr
    /// (small outputs only: a child blocked on a full pipe would not exit). `None` on timeout.
    pub fn wait_output(&mut self, limit: Duration) -> Option<Output> {
        let status = self.wait_exit(limit)?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut out) = self.0.stdout.take() {
            out.read_to_end(&mut stdout).unwrap();
        }
        if let Some(mut err) = self.0.stderr.take() {
            err.read_to_end(&mut stderr).unwrap();
        }
        Some(Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited() {
            return;
        }
        signal(self.0.id(), libc::SIGINT);
        if self.wait_exit(STOP_GRACE).is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Processes known only by their id (daemons that fork away from the test), stopped on drop
/// like [`ChildGuard`] stops a child.
#[derive(Default)]
pub struct PidGuard {
    pids: Vec<u32>,
}

impl PidGuard {
    /// Adds a process to stop.
    pub fn push(&mut self, pid: u32) {
        if !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
    }
}

/// The processes (other than this one) with `arg` as one of their command-line arguments:
/// daemons that forked away from a test, found by their config file.
pub fn pids_with_arg(arg: &Path) -> Vec<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == want))
        })
        .collect()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| {
            st.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        for pid in &self.pids {
            signal(*pid, libc::SIGINT);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while self.pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in self.pids.iter().filter(|p| alive(**p)) {
            signal(*pid, libc::SIGKILL);
        }
    }
}

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

    /// The mock's `/_mock/stats` JSON, read in process (no connection of its own, so its
    /// `connections` count is exactly what keygate opened).
    pub async fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&self.running.stats_json()).unwrap()
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

/// How many ports [`Keygate::start`] tries.
const PORT_ATTEMPTS: usize = 4;

/// Whether process `pid` holds the socket listening on TCP `port` (Linux `/proc`): another
/// test's process may have taken a port between [`free_port`] and the bind.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode
            if f.len() > 9 && f[1].ends_with(&suffix) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.to_str() == Some(i.as_str())))
    })
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
    child: ChildGuard,
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
    /// A port another process took between [`free_port`] and keygate's bind is tried again with
    /// a fresh one.
    pub fn start(yaml: &str, env: &[(&str, &str)]) -> Keygate {
        for _ in 0..PORT_ATTEMPTS - 1 {
            let (dir, path, port) = write_config(yaml);
            match Self::spawn(dir, &path, port, env) {
                Ok(kg) => return kg,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("keygate exited early: {log}"),
            }
        }
        let (dir, path, port) = write_config(yaml);
        Self::start_with(dir, &path, port, env)
    }

    /// Starts keygate on an already written config. `RUST_LOG` is `info` (or `KEYGATE_TEST_LOG`,
    /// which only a person running the tests sets); a `RUST_LOG` in `env` overrides it.
    pub fn start_with(
        dir: tempfile::TempDir,
        path: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Keygate {
        Self::spawn(dir, path, port, env)
            .unwrap_or_else(|log| panic!("keygate exited early: {log}"))
    }

    /// [`Keygate::start_with`], but an early exit is returned (with the log) for a retry.
    fn spawn(
        dir: tempfile::TempDir,
        path: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Result<Keygate, String> {
        let log = dir.path().join("keygate.log");
        let child = ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_keygate"))
                .args(["-c", path.to_str().unwrap()])
                .env(
                    "RUST_LOG",
                    std::env::var("KEYGATE_TEST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
            "keygate",
        );
        let mut kg = Keygate {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            port,
            log,
        };
        kg.wait_listening().map(|()| kg)
    }

    /// Waits until this keygate (not another process that took the port) listens on its port;
    /// `Err` with the log if it exits first.
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.exited() {
                return Err(self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && listens_on(self.pid(), self.port)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("keygate did not listen within 30s: {}", self.log_text());
    }

    /// Waits (up to 10 s) until something listens on `port`, a second listener of this keygate
    /// (admin, metrics) that [`Keygate::start`] does not wait for.
    pub fn wait_for_port(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "port {port}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        self.child.exited()
    }

    /// The process's resident memory in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Sends `sig` (e.g. SIGTERM for a graceful stop) and waits up to `limit` for the process
    /// to exit, keeping its directory for inspection; whether it exited.
    pub fn stop(&mut self, sig: i32, limit: Duration) -> bool {
        signal(self.pid(), sig);
        self.wait_exit(limit)
    }

    /// Sends `sig` to the process without waiting.
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// Waits up to `limit` for the process to exit; whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        self.child.wait_exit(limit).is_some()
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
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

/// Runs `keygate admin ARGS` against `addr` with `token` (`None`: `KEYGATE_ADMIN_TOKEN` unset)
/// and `stdin`; (exit code, stdout, stderr).
pub fn admin_cli(
    addr: &str,
    token: Option<&str>,
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.arg("admin")
        .args(args)
        .env("KEYGATE_ADMIN_ADDR", addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match token {
        Some(t) => cmd.env("KEYGATE_ADMIN_TOKEN", t),
        None => cmd.env_remove("KEYGATE_ADMIN_TOKEN"),
    };
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
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

/// The Prometheus text from keygate's metrics port. The port may open a moment after the proxy
/// port [`Keygate::start`] waits for: a refused connection is retried for up to 10 s.
pub async fn scrape(port: u16) -> String {
    metrics_get(port, "/metrics").await.text().await.unwrap()
}

/// `GET path` on keygate's metrics port, retrying a refused connection for up to 10 s (the
/// metrics listener may start a moment after the proxy's).
pub async fn metrics_get(port: u16, path: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
            Ok(r) => return r,
            Err(e) if e.is_connect() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("GET {path} on the metrics port {port}: {e}"),
        }
    }
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

/// Polls `path` until it has at least `n` lines (the access log is written after the answer
/// goes out, so a read right after the last response may miss lines); returns its text. Panics
/// after `limit` showing what was there.
pub async fn wait_for_lines(path: &Path, n: usize, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, wanted {n} within {limit:?}:\n{text}",
            path.display(),
            text.lines().count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Scrapes `/metrics` until [`sum`] of `name` over `labels` reaches `want` (counters are bumped
/// in the logging hook, after the client has its answer); returns that scrape. Panics after
/// `limit` showing the last one.
pub async fn wait_for_metric(
    port: u16,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    limit: Duration,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = scrape(port).await;
        if sum(&text, name, labels) >= want {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} never reached {want} within {limit:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many characters in a row of a secret count as a leak.
pub const LEAK_RUN: usize = 8;

/// Fails if `text` contains any run of [`LEAK_RUN`] consecutive characters of `secret` (every
/// window, not only its start and end: a masked or cut echo still leaks what it shows).
/// `what` names the output in the message; the message shows the match, never the whole secret.
pub fn assert_no_canary(text: &str, secret: &str, what: &str) {
    if let Some(run) = leaked_run(text, secret) {
        let at = text.find(run).unwrap_or(0);
        let from = text[..at]
            .char_indices()
            .rev()
            .nth(40)
            .map_or(0, |(i, _)| i);
        let context: String = text[from..].chars().take(160).collect();
        panic!("{what} leaks {LEAK_RUN}+ characters of the key ({run:?}) near: {context:?}");
    }
}

/// The first [`LEAK_RUN`]-character window of `secret` found in `text`.
pub fn leaked_run<'a>(text: &str, secret: &'a str) -> Option<&'a str> {
    let starts: Vec<usize> = secret.char_indices().map(|(i, _)| i).collect();
    (0..starts.len().saturating_sub(LEAK_RUN - 1)).find_map(|w| {
        let end = starts.get(w + LEAK_RUN).copied().unwrap_or(secret.len());
        let run = &secret[starts[w]..end];
        text.contains(run).then_some(run)
    })
}

/// What one raw exchange on a fresh connection brought back.
pub struct RawExchange {
    /// Everything the server sent before it closed or `limit` passed.
    pub received: Vec<u8>,
    /// Whether the server closed (or reset) the connection within the limit.
    pub closed: bool,
}

impl RawExchange {
    /// The status of the first response, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.received);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// How many responses arrived (status lines, interim ones included).
    pub fn responses(&self) -> usize {
        self.received
            .windows(9)
            .filter(|w| w.starts_with(b"HTTP/1.") && w[8] == b' ')
            .count()
    }

    /// The bytes received, lossily as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// Sends `request` on a fresh blocking connection to `port`, then reads until the server closes
/// or `limit` passes. Run it in `spawn_blocking` from async tests.
pub fn raw_exchange(port: u16, request: &[u8], limit: Duration) -> RawExchange {
    raw_exchange_until(port, request, limit, |_| false)
}

/// Whether `bytes` start with one whole final response framed by `Content-Length` (interim
/// `1xx` responses before it are skipped).
pub fn has_whole_response(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    loop {
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        if head.starts_with("http/1.1 1") {
            rest = &rest[end + 4..];
            continue;
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        return len.is_some_and(|len| rest.len() >= end + 4 + len);
    }
}

/// Like [`raw_exchange`], but also stops reading once `done` says what arrived is enough.
pub fn raw_exchange_until(
    port: u16,
    request: &[u8],
    limit: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> RawExchange {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A server that refuses early may close before all of a large request is written.
    let _ = s.write_all(request);
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                if done(&received) {
                    break false;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false
            }
            // A reset after the answer is a close too.
            Err(_) => break true,
        }
    };
    RawExchange { received, closed }
}
