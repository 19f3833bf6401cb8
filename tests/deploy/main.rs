//! The deploy kit under `deploy/`: every file parses, the pieces agree with each other and with
//! keygate (ports, paths, metric names), and the external checkers pass (`promtool`,
//! `systemd-analyze`, `shellcheck`, `bash`; a missing one fails its test, `make deps` installs
//! them). The dashboard and alerts are checked against the metric catalogue keygate exports and
//! against a live scrape of a running keygate. No network beyond loopback, no Docker.
//!
//! One file per artefact; the helpers they share are here.
#![allow(clippy::unwrap_used)]

#[path = "../utils/mod.rs"]
mod utils;

mod compose;
mod docker;
mod grafana;
mod kit;
mod kubernetes;
mod live_scrape;
mod prometheus;
mod promql;
mod reload_script;
mod systemd;

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a (possibly multi-document) YAML text; empty documents are skipped.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_file(rel: &str) -> Value {
    let mut docs = yaml_docs(&read(rel), rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected a number, got {v:?}"))
}

fn seq(v: &Value) -> &Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
}

/// Fails the test unless `program` runs: a checker that is not installed must not let a test
/// pass without checking. `package` is the Debian package that provides it.
fn require(program: &str, package: &str) {
    let runs = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        runs,
        "{program} is required by this test but is not installed \
         (Debian: apt-get install {package}; `make deps` installs it)"
    );
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The lines of a script or ignore file that are neither blank nor comments, trimmed.
fn code_lines(script: &str) -> Vec<&str> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The environment variables a keygate config names: keys' `env:`, clients' `token_env:` and
/// Redis's `password_env:`.
fn env_vars_named(config: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(ups) = config["upstreams"].as_mapping() {
        for (_, up) in ups {
            for k in up["keys"].as_sequence().into_iter().flatten() {
                out.insert(s(&k["env"]).to_string());
            }
        }
    }
    for c in config["clients"].as_sequence().into_iter().flatten() {
        if let Some(var) = c["token_env"].as_str() {
            out.insert(var.to_string());
        }
    }
    if let Some(var) = config["redis"]["password_env"].as_str() {
        out.insert(var.to_string());
    }
    out
}

/// Runs `keygate -t` on `config` with its pid file, upgrade socket and state file moved into a
/// temporary directory (`-t` only checks the socket's directory; a start makes it) and every
/// named variable set.
fn keygate_validates(config: &Value, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config.clone();
    let run_dir = dir.path().join("run");
    let server = config["server"].as_mapping_mut().unwrap();
    for (key, file) in [
        ("pid_file", "keygate.pid"),
        ("upgrade_sock", "upgrade.sock"),
    ] {
        server.insert(
            key.into(),
            run_dir.join(file).to_str().unwrap().to_string().into(),
        );
    }
    if let Some(state) = config["state_file"].as_str() {
        let name = Path::new(state).file_name().unwrap().to_owned();
        let path = dir.path().join(name).to_str().unwrap().to_string();
        config["state_file"] = path.into();
    }
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.arg("-t").arg("-c").arg(&path);
    // Distinct values: keygate refuses two keys with the same secret.
    for var in env_vars_named(&config) {
        cmd.env(&var, format!("sk-deploy-test-{var}"));
    }
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{what} does not pass keygate -t:\n{}",
        text(&out)
    );
}
