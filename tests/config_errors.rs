//! What only the process shows about the config: `-t` output and exit codes, refusing to start
//! (nothing listening), a few end-to-end errors read from the real environment and disk, and
//! that `-t` writes nothing while a real start makes its directories.
//!
//! Every other config mistake is a unit test of the section that finds it (`src/config/validate/`),
//! driven by an in-memory `MemorySource`.
#![allow(clippy::unwrap_used)]

mod utils;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use utils::*;

const GOOD_UPSTREAM: &str = "upstreams:\n  openai:\n    url: http://127.0.0.1:9\n    keys: [ { name: a, env: KG_TEST_KEY } ]\nroutes:\n  - { upstreams: [openai] }\n";

fn expect_error(yaml: &str, env: &[(&str, &str)], needles: &[&str]) {
    let (code, stderr) = check_config(yaml, env);
    assert_eq!(
        code, 2,
        "config should be refused with exit code 2:\n{yaml}\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    assert!(
        stderr.contains("keygate.yaml"),
        "message names the file: {stderr}"
    );
}

/// Runs `keygate -t -c path` with `env`.
fn check(path: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["-t", "-c", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Names of the entries directly in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn valid_config_passes_the_check() {
    let (dir, path, _) = write_config(GOOD_UPSTREAM);
    let out = check(&path, &[("KG_TEST_KEY", "sk-x")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("keygate: {} is valid\n", path.display())
    );
    drop(dir);
}

#[test]
fn a_bad_config_is_one_line_naming_file_field_and_reason_and_exit_code_2() {
    let yaml = GOOD_UPSTREAM.replace("http://127.0.0.1:9", "\"htp:/x\"");
    let (dir, path, _) = write_config(&yaml);
    let out = check(&path, &[("KG_TEST_KEY", "sk-x")]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "keygate: config error: {}: upstreams.openai.url: not a URL: \"htp:/x\" (expected http:// or https://)\n",
            path.display()
        )
    );
    assert!(out.stdout.is_empty());
    drop(dir);
}

#[test]
fn missing_env_var_is_named() {
    expect_error(
        GOOD_UPSTREAM,
        &[],
        &["upstreams.openai.keys[0].env", "KG_TEST_KEY", "not set"],
    );
}

#[cfg(unix)]
#[test]
fn key_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("openai.keys");
    std::fs::write(&keys, "sk-file-1\nsk-file-2 name=b\n").unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let yaml = GOOD_UPSTREAM.replace(
        "keys: [ { name: a, env: KG_TEST_KEY } ]",
        &format!("keys_file: {}", keys.display()),
    );
    expect_error(
        &yaml,
        &[],
        &["upstreams.openai.keys_file", "readable by group/others"],
    );
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = check_config(&yaml, &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn missing_file_is_reported() {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["-t", "-c", "/nonexistent/keygate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("keygate: config error: /nonexistent/keygate.yaml: cannot read: "));
}

#[test]
fn server_refuses_to_start_on_bad_config() {
    let (dir, path, port) = write_config(&GOOD_UPSTREAM.replace("url:", "ulr:"));
    let mut server = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["-c", path.to_str().unwrap()])
            .env("KG_TEST_KEY", "sk-x")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "keygate",
    );
    // Watch the port while the process runs: a check after it exited would pass whatever it
    // did before. A server that starts anyway is stopped by the guard when this fails.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut listened = false;
    while !server.exited() && Instant::now() < deadline {
        listened |= std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = server
        .wait_output(Duration::ZERO)
        .expect("keygate must exit on a bad config, not run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!listened, "must not listen on a bad config");
    assert!(String::from_utf8_lossy(&out.stderr).contains("config error"));
    drop(dir);
}

/// A config whose upgrade socket and state file live in directories that do not exist yet, and
/// whose access log is `access_log` (relative to the temp dir).
fn config_with_outputs(access_log: &str) -> String {
    format!(
        "server:\n  threads: 1\n  pid_file: {{dir}}/keygate.pid\n  upgrade_sock: {{dir}}/run/sock/upgrade.sock\n\
         state_file: {{dir}}/state/keys.json\naccess_log: {{ path: {{dir}}/{access_log} }}\n\
         upstreams:\n  openai:\n    url: http://127.0.0.1:9\n    keys: [ {{ name: a, env: KG_TEST_KEY }} ]\n    \
         health: {{ enabled: false }}\nroutes:\n  - {{ upstreams: [openai] }}\n"
    )
}

#[test]
fn check_creates_and_writes_nothing() {
    let (dir, path, _) = write_config(&config_with_outputs("access.log"));
    let out = check(&path, &[("KG_TEST_KEY", "sk-x")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No socket directory, no state directory, no access log, no pid file.
    assert_eq!(entries(dir.path()), ["keygate.yaml"]);
}

#[test]
fn check_refuses_a_missing_access_log_directory_without_making_it() {
    let (dir, path, _) = write_config(&config_with_outputs("logs/access.log"));
    let out = check(&path, &[("KG_TEST_KEY", "sk-x")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("access_log.path: no such directory for "),
        "{stderr}"
    );
    assert_eq!(entries(dir.path()), ["keygate.yaml"]);
}

#[cfg(unix)]
#[test]
fn a_real_start_makes_the_socket_and_state_directories_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let kg = Keygate::start(
        &config_with_outputs("access.log"),
        &[("KG_TEST_KEY", "sk-x")],
    );
    let dir = kg.dir.path();
    assert_eq!(mode(&dir.join("run")), 0o700, "{}", kg.log_text());
    assert_eq!(mode(&dir.join("run/sock")), 0o700);
    assert_eq!(mode(&dir.join("state")), 0o700);
    let log = dir.join("access.log");
    assert!(log.is_file(), "the access log is opened at start");
    assert_eq!(mode(&log) & 0o027, 0, "created 0640 (or stricter by umask)");
}

#[test]
fn the_shipped_configs_are_valid() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
    for (file, env) in [
        (
            "demo.yaml",
            [
                ("DEMO_KEY_A", "sk-demo-alpha"),
                ("DEMO_KEY_B", "sk-demo-bravo"),
                ("DEMO_KEY_C", "sk-demo-charlie"),
                (
                    "DEMO_MASTER_KEY",
                    "00000000000000000000000000000000000000000000000000000000000000de",
                ),
            ],
        ),
        (
            "openai.yaml",
            [
                ("OPENAI_KEY_A", "sk-test-a"),
                ("OPENAI_KEY_B", "sk-test-b"),
                ("OPENAI_KEY_C", "sk-test-c"),
                ("UNUSED", "x"),
            ],
        ),
        (
            "anthropic.yaml",
            [
                ("ANTHROPIC_KEY_A", "sk-ant-test-a"),
                ("ANTHROPIC_KEY_B", "sk-ant-test-b"),
                ("UNUSED", "x"),
                ("UNUSED_TOO", "x"),
            ],
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["-t", "-c", &format!("{conf}/{file}")])
            .envs(env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
