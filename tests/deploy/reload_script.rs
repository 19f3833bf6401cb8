//! `deploy/keygate-reload.sh`: valid bash that shellcheck accepts, validates the config before
//! any signal, leaves the old process alone on a bad config, and hands the sockets to a new one.

use crate::utils::{alive, free_port, pids_with_arg, ChildGuard, PidGuard};
use crate::{code_lines, deploy_dir, read, require, run, text};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_script_is_valid_bash_and_validates_before_any_signal() {
    let script = read("keygate-reload.sh");
    assert!(script.starts_with("#!/usr/bin/env bash\n"));
    let lines = code_lines(&script);
    assert_eq!(lines[0], "set -euo pipefail");
    let first = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}"))
    };
    let validate = first("\"$bin\" -t -c \"$config\"");
    let start_new = first("\"$bin\" -u -d -c \"$config\"");
    let quit = first("kill -QUIT \"$old_pid\"");
    assert!(
        validate < first("kill "),
        "`keygate -t` must come before any kill"
    );
    assert!(validate < start_new && start_new < quit);
    assert_eq!(
        lines.iter().filter(|l| l.contains("-QUIT")).count(),
        1,
        "one SIGQUIT"
    );

    require("bash", "bash");
    let out = run(Command::new("bash")
        .arg("-n")
        .arg(deploy_dir().join("keygate-reload.sh")));
    assert!(out.status.success(), "bash -n:\n{}", text(&out));
    require("shellcheck", "shellcheck");
    let out = run(Command::new("shellcheck").arg(deploy_dir().join("keygate-reload.sh")));
    assert!(out.status.success(), "shellcheck:\n{}", text(&out));
}

/// A temporary keygate setup: a config on loopback ports with its runtime files in a 0700
/// directory, and the daemons it started (and whatever its pid file names), stopped on drop
/// (SIGINT, then SIGKILL) also when an assertion fails.
struct Sandbox {
    // Declared first so that it drops before the directory holding their files goes.
    pids: PidGuard,
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            pids: PidGuard::default(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, proxy_port: u16, metrics_port: u16) -> PathBuf {
        let run_dir = self.path("run");
        std::fs::create_dir_all(&run_dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // daemon_wait_for_ready is off here: the script does not depend on it (it waits for the
        // upgrade socket), and this keeps the test independent of how the binary signals it.
        let yaml = format!(
            "server:\n  threads: 1\n  pid_file: {run}/keygate.pid\n  upgrade_sock: {run}/upgrade.sock\n  \
             error_log: {log}\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n\
             listen:\n  - addr: 127.0.0.1:{proxy_port}\n\
             metrics: {{ addr: 127.0.0.1:{metrics_port} }}\n\
             upstreams:\n  u:\n    url: http://127.0.0.1:9\n    keys: [ {{ name: a, env: KG_DEPLOY_TEST_KEY }} ]\n    \
             health: {{ enabled: false }}\n\
             routes:\n  - {{ upstreams: [u] }}\n",
            run = run_dir.display(),
            log = self.path("keygate.log").display(),
        );
        let path = self.path("keygate.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    fn pid_file(&self) -> PathBuf {
        self.path("run/keygate.pid")
    }

    fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Runs the reload script. Output goes to a file: the daemon it starts inherits it.
    fn reload(&self, config: &Path, old_pid: u32) -> (bool, String) {
        let out_path = self.path("reload.out");
        let out = std::fs::File::create(&out_path).unwrap();
        let status = Command::new("bash")
            .arg(deploy_dir().join("keygate-reload.sh"))
            .arg(config)
            .arg(old_pid.to_string())
            .env("KEYGATE_BIN", env!("CARGO_BIN_EXE_keygate"))
            .env("KEYGATE_PID_FILE", self.pid_file())
            .env("KEYGATE_UPGRADE_SOCK", self.path("run/upgrade.sock"))
            .env("KEYGATE_RELOAD_TIMEOUT", "20")
            .env("KG_DEPLOY_TEST_KEY", "sk-deploy-test")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .status()
            .unwrap();
        (
            status.success(),
            std::fs::read_to_string(out_path).unwrap_or_default(),
        )
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The pid file may name a daemon the test never saw (one the script started), and a
        // daemon that failed before writing it is found by its config path.
        if let Some(pid) = self.read_pid() {
            self.pids.push(pid);
        }
        for pid in pids_with_arg(&self.path("keygate.yaml")) {
            self.pids.push(pid);
        }
    }
}

/// Whether an HTTP answer's status line says 200.
fn is_200(answer: &str) -> bool {
    answer
        .lines()
        .next()
        .is_some_and(|l| l.starts_with("HTTP/1.") && l.contains(" 200 "))
}

/// The status line of `GET path` (Pingora keeps even HTTP/1.0 connections open, so this reads
/// no further than that line).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&answer).into_owned())
}

#[test]
fn reload_script_leaves_the_old_process_alone_when_the_config_is_bad() {
    require("bash", "bash");
    let sb = Sandbox::new();
    let good = sb.config(free_port(), free_port());
    let bad = sb.path("bad.yaml");
    let yaml = std::fs::read_to_string(&good).unwrap();
    std::fs::write(&bad, yaml.replace("http://127.0.0.1:9", "htp:/x")).unwrap();
    // Stands in for the running keygate: SIGQUIT would end it. Its guard stops it in any case.
    let mut old = ChildGuard::spawn(Command::new("sleep").arg("30"), "sleep");
    std::fs::write(sb.pid_file(), format!("{}\n", old.id())).unwrap();

    let (ok, out) = sb.reload(&bad, old.id());
    assert!(!ok, "a bad config must fail the reload:\n{out}");
    assert!(out.contains("config check failed"), "{out}");
    assert!(!old.exited(), "the old process was signalled");
    assert_eq!(sb.read_pid(), Some(old.id()));
    assert!(!sb.path("run/upgrade.sock").exists());
    // The sandbox stops whatever the pid file names: not this one, its guard does.
    std::fs::remove_file(sb.pid_file()).unwrap();
}

#[test]
fn reload_script_hands_the_sockets_to_a_new_process() {
    require("bash", "bash");
    let mut sb = Sandbox::new();
    let (proxy, metrics) = (free_port(), free_port());
    let config = sb.config(proxy, metrics);

    // Start keygate as the unit does (-d); the parent returns once the daemon is forked.
    let status = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("-d")
        .arg("-c")
        .arg(&config)
        .env("KG_DEPLOY_TEST_KEY", "sk-deploy-test")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "keygate -d failed");
    wait_until("the pid file", Duration::from_secs(10), || {
        sb.read_pid().is_some()
    });
    let old_pid = sb.read_pid().unwrap();
    sb.pids.push(old_pid);
    wait_until("the metrics port", Duration::from_secs(10), || {
        http_get(metrics, "/readyz").is_some_and(|a| is_200(&a))
    });

    let (ok, out) = sb.reload(&config, old_pid);
    let log = std::fs::read_to_string(sb.path("keygate.log")).unwrap_or_default();
    assert!(ok, "reload failed:\n{out}\nkeygate log:\n{log}");
    let new_pid = sb.read_pid().unwrap();
    sb.pids.push(new_pid);
    assert_ne!(new_pid, old_pid, "{out}");
    assert!(alive(new_pid), "the new process is gone:\n{out}\n{log}");
    assert!(log.contains("SIGQUIT received"), "old process log:\n{log}");
    assert!(!sb.path("run/upgrade.sock").exists());
    // The inherited sockets answer.
    assert!(TcpStream::connect(("127.0.0.1", proxy)).is_ok());
    let health = http_get(metrics, "/healthz").unwrap_or_default();
    assert!(is_200(&health), "{health}");
    // The old process drains (grace period 1 s here) and exits.
    wait_until("the old process to exit", Duration::from_secs(20), || {
        !alive(old_pid)
    });
    assert!(alive(new_pid));
}
