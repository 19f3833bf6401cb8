//! `deploy/systemd/`: the unit's upgrade wiring matches the config beside it, the config is
//! valid, and `systemd-analyze verify` accepts the unit.

use crate::{
    deploy_dir, env_vars_named, keygate_validates, read, require, run, s, text, u, yaml_file,
};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// `(section, key, value)` for every assignment of a unit file.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn unit_value<'a>(entries: &'a [(String, String, String)], key: &str) -> &'a str {
    let found: Vec<&str> = entries
        .iter()
        .filter(|(sec, k, _)| sec == "Service" && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect();
    assert_eq!(found.len(), 1, "[Service] {key}= once, found {found:?}");
    found[0]
}

fn unit_env(entries: &[(String, String, String)], var: &str) -> String {
    entries
        .iter()
        .filter(|(sec, k, _)| sec == "Service" && k == "Environment")
        .find_map(|(_, _, v)| v.strip_prefix(&format!("{var}=")))
        .unwrap_or_else(|| panic!("no Environment={var}=..."))
        .to_string()
}

#[test]
fn systemd_unit_has_the_upgrade_wiring() {
    let unit = read("systemd/keygate.service");
    let e = unit_entries(&unit);
    let config = yaml_file("systemd/keygate.yaml");
    let server = &config["server"];

    assert_eq!(unit_value(&e, "Type"), "forking");
    let pid_file = unit_value(&e, "PIDFile");
    assert_eq!(pid_file, s(&server["pid_file"]));
    assert_eq!(unit_env(&e, "KEYGATE_PID_FILE"), pid_file);
    assert_eq!(
        unit_env(&e, "KEYGATE_UPGRADE_SOCK"),
        s(&server["upgrade_sock"])
    );
    // The upgrade socket sits in the 0700 runtime directory.
    let runtime = format!("/run/{}/", unit_value(&e, "RuntimeDirectory"));
    assert!(s(&server["upgrade_sock"]).starts_with(&runtime));
    assert!(pid_file.starts_with(&runtime));
    assert_eq!(unit_value(&e, "RuntimeDirectoryMode"), "0700");
    if let Some(state) = config["state_file"].as_str() {
        let dir = format!("/var/lib/{}/", unit_value(&e, "StateDirectory"));
        assert!(state.starts_with(&dir), "state_file {state} outside {dir}");
    }
    assert_eq!(server["daemon_wait_for_ready"].as_bool(), Some(true));

    let user = unit_value(&e, "User");
    assert!(!user.is_empty() && user != "root" && user != "0");
    assert!(unit_value(&e, "EnvironmentFile").contains("/etc/keygate/"));
    let config_arg = "-c /etc/keygate/keygate.yaml";
    assert!(unit_value(&e, "ExecStartPre").ends_with(&format!("keygate -t {config_arg}")));
    assert!(unit_value(&e, "ExecStart").ends_with(&format!("keygate -d {config_arg}")));
    let reload = unit_value(&e, "ExecReload");
    assert!(
        reload.contains("keygate-reload.sh /etc/keygate/keygate.yaml $MAINPID"),
        "{reload}"
    );
    assert_eq!(unit_value(&e, "KillSignal"), "SIGTERM");

    // A graceful stop lasts grace_period_seconds + graceful_shutdown_timeout_seconds.
    let stop: u64 = unit_value(&e, "TimeoutStopSec").parse().unwrap();
    let drain =
        u(&server["grace_period_seconds"]) + u(&server["graceful_shutdown_timeout_seconds"]);
    assert!(stop > drain, "TimeoutStopSec {stop} <= drain {drain}");
    // Start waits up to daemon_ready_timeout_seconds; reload up to two script timeouts.
    let start: u64 = unit_value(&e, "TimeoutStartSec").parse().unwrap();
    let reload_timeout: u64 = unit_env(&e, "KEYGATE_RELOAD_TIMEOUT").parse().unwrap();
    assert!(start > u(&server["daemon_ready_timeout_seconds"]));
    assert!(start > 2 * reload_timeout + 10);

    // Every variable the config names is in the example env file.
    let example = read("systemd/keys.env.example");
    let provided: BTreeSet<String> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect();
    assert_eq!(provided, env_vars_named(&config));
}

#[test]
fn systemd_config_is_a_valid_keygate_config() {
    keygate_validates(
        &yaml_file("systemd/keygate.yaml"),
        "deploy/systemd/keygate.yaml",
    );
}

/// Runs `systemd-analyze verify` on `unit_text`; `Err` when verify cannot judge units here.
fn systemd_verify(unit_text: &str, dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::write(&path, unit_text).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let all = text(&out);
    let about_unit: Vec<&str> = all.lines().filter(|l| l.contains(name)).collect();
    if !out.status.success() && about_unit.is_empty() {
        return Err(all);
    }
    Ok(about_unit.join("\n"))
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    // verify wants the executables to exist: point the installed paths at the built binary and
    // at the script in this repository.
    let script = deploy_dir().join("keygate-reload.sh");
    let unit = read("systemd/keygate.service")
        .replace(
            "/usr/local/lib/keygate/keygate-reload.sh",
            script.to_str().unwrap(),
        )
        .replace("/usr/local/bin/keygate", env!("CARGO_BIN_EXE_keygate"));
    let dir = tempfile::tempdir().unwrap();
    let complaints = systemd_verify(&unit, dir.path(), "keygate.service")
        .unwrap_or_else(|why| panic!("systemd-analyze verify cannot judge units here:\n{why}"));
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
    // And it does catch mistakes in this environment: otherwise the check above proves nothing.
    let broken = unit.replace("Type=forking", "Type=forkin");
    let caught = systemd_verify(&broken, dir.path(), "broken.service").unwrap_or_default();
    assert!(
        !caught.is_empty(),
        "systemd-analyze verify did not flag a bad Type= here, so it cannot be trusted"
    );
}
