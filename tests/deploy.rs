//! The deploy kit under `deploy/`: every file parses, the pieces agree with each other and with
//! keygate (ports, paths, metric names), and the external checkers pass where they are installed
//! (`promtool`, `systemd-analyze`, `bash`). No network beyond loopback, no Docker.
#![allow(clippy::unwrap_used)]

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers

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

/// Whether `program` can be run (found on PATH).
fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn skip(what: &str, why: &str) {
    println!("note: skipped {what}: {why}");
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| {
            st.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The environment variables a keygate config names with `env:`.
fn env_vars_named(config: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(ups) = config["upstreams"].as_mapping() {
        for (_, up) in ups {
            for k in up["keys"].as_sequence().into_iter().flatten() {
                out.insert(s(&k["env"]).to_string());
            }
        }
    }
    out
}

/// Runs `keygate -t` on `config` with its pid file, upgrade socket and state file moved into a
/// temporary directory (`-t` only checks the socket's directory; a start makes it) and every named variable set.
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

// ---------------------------------------------------------------------------------------------
// Every file

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&deploy_dir(), &mut files);
    let mut yaml = BTreeMap::new();
    for f in &files {
        let name = f.to_str().unwrap();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            let docs = yaml_docs(&std::fs::read_to_string(f).unwrap(), name);
            assert!(!docs.is_empty(), "{name} has no YAML document");
            let rel = f.strip_prefix(deploy_dir()).unwrap();
            yaml.insert(rel.to_str().unwrap().to_string(), docs.len());
        }
    }
    for expected in [
        "systemd/keygate.yaml",
        "docker/keygate.yaml",
        "kubernetes/keygate.yaml",
        "kubernetes/secret.yaml",
        "prometheus/prometheus.yml",
        "prometheus/prometheus-kubernetes.yml",
        "prometheus/alerts.yml",
        "prometheus/alerts.test.yml",
    ] {
        assert!(yaml.contains_key(expected), "missing deploy/{expected}");
    }
    assert_eq!(
        yaml["kubernetes/keygate.yaml"], 4,
        "ConfigMap, Deployment, Service, PDB"
    );
    for other in [
        "README.md",
        "keygate-reload.sh",
        "systemd/keygate.service",
        "systemd/keys.env.example",
        "docker/Dockerfile",
        "docker/Dockerfile.dockerignore",
        "grafana/keygate-dashboard.json",
    ] {
        assert!(deploy_dir().join(other).is_file(), "missing deploy/{other}");
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct Manifests {
    by_kind: BTreeMap<String, Value>,
    secret: Value,
}

fn manifests() -> Manifests {
    let mut by_kind = BTreeMap::new();
    for doc in yaml_docs(&read("kubernetes/keygate.yaml"), "kubernetes/keygate.yaml") {
        let kind = s(&doc["kind"]).to_string();
        assert!(doc["apiVersion"].is_string(), "{kind} has no apiVersion");
        assert!(
            by_kind.insert(kind.clone(), doc).is_none(),
            "two {kind} objects"
        );
    }
    let secret = yaml_file("kubernetes/secret.yaml");
    Manifests { by_kind, secret }
}

impl Manifests {
    fn get(&self, kind: &str) -> &Value {
        self.by_kind
            .get(kind)
            .unwrap_or_else(|| panic!("no {kind} in kubernetes/keygate.yaml"))
    }

    /// The keygate.yaml embedded in the ConfigMap.
    fn keygate_config(&self) -> Value {
        let text = s(&self.get("ConfigMap")["data"]["keygate.yaml"]);
        let mut docs = yaml_docs(text, "ConfigMap keygate.yaml");
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    fn pod_spec(&self) -> &Value {
        &self.get("Deployment")["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = seq(&self.pod_spec()["containers"]);
        assert_eq!(containers.len(), 1, "one container");
        &containers[0]
    }

    /// A probe's or Service's port, by name or number, as a container port number.
    fn container_port(&self, port: &Value) -> u64 {
        if let Some(n) = port.as_u64() {
            return n;
        }
        let name = s(port);
        seq(&self.container()["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .map(|p| u(&p["containerPort"]))
            .unwrap_or_else(|| panic!("no container port named {name}"))
    }
}

fn labels_match(selector: &Value, labels: &Value) {
    let sel = selector.as_mapping().expect("a selector");
    assert!(!sel.is_empty());
    for (k, v) in sel {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "label {k:?} does not match"
        );
    }
}

#[test]
fn kubernetes_deployment_probes_runs_as_non_root_and_drains() {
    let m = manifests();
    let dep = m.get("Deployment");
    let spec = &dep["spec"];
    assert_eq!(u(&spec["replicas"]), 2);
    assert_eq!(s(&spec["strategy"]["type"]), "RollingUpdate");
    assert_eq!(u(&spec["strategy"]["rollingUpdate"]["maxUnavailable"]), 0);
    let pod_labels = &spec["template"]["metadata"]["labels"];
    labels_match(&spec["selector"]["matchLabels"], pod_labels);

    let config = m.keygate_config();
    let metrics_port = u64::from(port_of(s(&config["metrics"]["addr"])));
    let c = m.container();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(s(&get["path"]), path, "{probe}");
        assert_eq!(
            m.container_port(&get["port"]),
            metrics_port,
            "{probe} must ask keygate's metrics port"
        );
    }
    let listen_port = u64::from(port_of(s(&seq(&config["listen"])[0]["addr"])));
    assert_eq!(
        m.container_port(&Value::from("http")),
        listen_port,
        "container port http = keygate's listener"
    );

    // Non-root, read-only, nothing extra.
    let pod_sc = &m.pod_spec()["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"].as_bool(), Some(true));
    assert!(u(&pod_sc["runAsUser"]) > 0);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(seq(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")));
    assert!(c["resources"]["requests"].is_mapping() && c["resources"]["limits"].is_mapping());

    // Drain: preStop sleeps, then SIGTERM; the grace period covers preStop + keygate's drain.
    let pre_stop = seq(&c["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(s(&pre_stop[0]), "sleep");
    let sleep: u64 = s(&pre_stop[1]).parse().unwrap();
    assert!((1..=30).contains(&sleep));
    let drain = u(&config["server"]["grace_period_seconds"])
        + config["server"]["graceful_shutdown_timeout_seconds"]
            .as_u64()
            .unwrap_or(5);
    let termination = u(&m.pod_spec()["terminationGracePeriodSeconds"]);
    assert!(
        termination >= sleep + drain && termination >= 600,
        "terminationGracePeriodSeconds {termination} < preStop {sleep} + drain {drain}"
    );

    // The config is mounted, and the upgrade socket lands on a writable emptyDir.
    let volumes = seq(&m.pod_spec()["volumes"]);
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = seq(&c["volumeMounts"]);
    let config_path = format!("{}/keygate.yaml", {
        let mount = mounts
            .iter()
            .find(|mnt| volume(s(&mnt["name"]))["configMap"].is_mapping())
            .expect("the ConfigMap is mounted");
        assert_eq!(
            volume(s(&mount["name"]))["configMap"]["name"],
            m.get("ConfigMap")["metadata"]["name"]
        );
        s(&mount["mountPath"]).to_string()
    });
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    assert_eq!(args, ["-c", config_path.as_str()]);
    // keygate writes these; the root filesystem is read-only, so they must be on an emptyDir.
    let mut written = vec![s(&config["server"]["upgrade_sock"])];
    written.extend(config["state_file"].as_str());
    for file in written {
        assert!(
            mounts.iter().any(|mnt| {
                file.starts_with(&format!("{}/", s(&mnt["mountPath"])))
                    && volume(s(&mnt["name"]))["emptyDir"].is_mapping()
            }),
            "{file} must be on an emptyDir (the root filesystem is read-only)"
        );
    }
}

#[test]
fn kubernetes_service_pdb_and_secret_fit_the_deployment() {
    let m = manifests();
    let pod_labels = &m.get("Deployment")["spec"]["template"]["metadata"]["labels"];
    let svc = &m.get("Service")["spec"];
    labels_match(&svc["selector"], pod_labels);
    let ports = seq(&svc["ports"]);
    let http = ports
        .iter()
        .find(|p| u(&p["port"]) == 80)
        .expect("Service port 80");
    assert_eq!(m.container_port(&http["targetPort"]), 8080);
    assert!(
        ports
            .iter()
            .any(|p| m.container_port(&p["targetPort"]) == 9091),
        "the Service exposes the metrics port"
    );
    labels_match(
        &m.get("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        pod_labels,
    );

    // The Secret holds placeholders for exactly the variables the config names.
    assert_eq!(s(&m.secret["kind"]), "Secret");
    let data = m.secret["stringData"].as_mapping().expect("stringData");
    let provided: BTreeSet<String> = data.keys().map(|k| s(k).to_string()).collect();
    assert!(data.values().all(|v| s(v) == "REPLACE_ME"));
    assert_eq!(provided, env_vars_named(&m.keygate_config()));
    let env_from = seq(&m.container()["envFrom"]);
    assert!(env_from
        .iter()
        .any(|e| e["secretRef"]["name"] == m.secret["metadata"]["name"]));
}

#[test]
fn kubernetes_configmap_holds_a_valid_keygate_config() {
    let config = manifests().keygate_config();
    assert!(config["metrics"]["addr"].is_string(), "metrics: is set");
    keygate_validates(&config, "the ConfigMap's keygate.yaml");
}

#[test]
fn docker_config_is_a_valid_keygate_config() {
    let config = yaml_file("docker/keygate.yaml");
    assert_eq!(port_of(s(&config["metrics"]["addr"])), 9091);
    keygate_validates(&config, "deploy/docker/keygate.yaml");
}

// ---------------------------------------------------------------------------------------------
// systemd

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
    if !have("systemd-analyze") {
        skip(
            "systemd-analyze verify",
            "not installed (Debian: apt-get install systemd)",
        );
        return;
    }
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
    match systemd_verify(&unit, dir.path(), "keygate.service") {
        Err(why) => skip(
            "systemd-analyze verify",
            &format!("it cannot run here: {why}"),
        ),
        Ok(complaints) => {
            assert!(
                complaints.is_empty(),
                "systemd-analyze verify:\n{complaints}"
            );
            // And it does catch mistakes in this environment.
            let broken = unit.replace("Type=forking", "Type=forkin");
            let caught = systemd_verify(&broken, dir.path(), "broken.service").unwrap_or_default();
            if caught.is_empty() {
                skip(
                    "trusting systemd-analyze verify",
                    "it did not flag a bad Type= here",
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reload script

fn code_lines(script: &str) -> Vec<&str> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
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

    if !have("bash") {
        skip("bash -n", "bash is not installed");
        return;
    }
    let out = run(Command::new("bash")
        .arg("-n")
        .arg(deploy_dir().join("keygate-reload.sh")));
    assert!(out.status.success(), "bash -n:\n{}", text(&out));
    if have("shellcheck") {
        let out = run(Command::new("shellcheck").arg(deploy_dir().join("keygate-reload.sh")));
        assert!(out.status.success(), "shellcheck:\n{}", text(&out));
    } else {
        skip(
            "shellcheck",
            "not installed (Debian: apt-get install shellcheck)",
        );
    }
}

/// A temporary keygate setup: a config on loopback ports with its runtime files in a 0700
/// directory, and the processes it started, stopped on drop.
struct Sandbox {
    dir: tempfile::TempDir,
    pids: Vec<u32>,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
            pids: Vec::new(),
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
        if let Some(pid) = self.read_pid() {
            self.pids.push(pid);
        }
        for pid in &self.pids {
            signal(*pid, "-INT");
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
    if !have("bash") {
        skip("running keygate-reload.sh", "bash is not installed");
        return;
    }
    let sb = Sandbox::new();
    let good = sb.config(free_port(), free_port());
    let bad = sb.path("bad.yaml");
    let yaml = std::fs::read_to_string(&good).unwrap();
    std::fs::write(&bad, yaml.replace("http://127.0.0.1:9", "htp:/x")).unwrap();
    // Stands in for the running keygate: SIGQUIT would end it.
    let mut old = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(sb.pid_file(), format!("{}\n", old.id())).unwrap();

    let (ok, out) = sb.reload(&bad, old.id());
    assert!(!ok, "a bad config must fail the reload:\n{out}");
    assert!(out.contains("config check failed"), "{out}");
    assert!(
        old.try_wait().unwrap().is_none(),
        "the old process was signalled"
    );
    assert_eq!(sb.read_pid(), Some(old.id()));
    assert!(!sb.path("run/upgrade.sock").exists());
    let _ = old.kill();
    let _ = old.wait();
    // The sandbox stops whatever the pid file names: not this one, it is gone.
    std::fs::remove_file(sb.pid_file()).unwrap();
}

#[test]
fn reload_script_hands_the_sockets_to_a_new_process() {
    if !have("bash") {
        skip("running keygate-reload.sh", "bash is not installed");
        return;
    }
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

// ---------------------------------------------------------------------------------------------
// PromQL: which metrics and labels an expression uses

/// Every series keygate exports, and its labels (histograms add `le` on `_bucket`).
const METRICS: &[(&str, &[&str])] = &[
    ("keygate_requests_total", &["route", "upstream", "status"]),
    ("keygate_request_duration_seconds", &["route"]),
    ("keygate_ttfb_seconds", &["upstream"]),
    ("keygate_upstream_attempts_total", &["upstream", "outcome"]),
    ("keygate_retries_total", &["route"]),
    ("keygate_keys", &["upstream", "state"]),
    (
        "keygate_key_cooldowns_total",
        &["upstream", "key", "reason"],
    ),
    (
        "keygate_tokens_total",
        &["model", "upstream", "client", "kind"],
    ),
    ("keygate_in_flight_requests", &[]),
    ("keygate_local_responses_total", &["reason"]),
    ("keygate_client_rejections_total", &["client", "reason"]),
    ("keygate_connection_closes_total", &["reason"]),
];
const HISTOGRAMS: &[&str] = &["keygate_request_duration_seconds", "keygate_ttfb_seconds"];
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];
/// Values of the labels with a closed set.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    ("state", &["ready", "cooling", "disabled"]),
    ("kind", &["prompt", "completion"]),
    (
        "outcome",
        &[
            "success",
            "rate_limited",
            "key_refused",
            "server_error",
            "client_error",
            "connect_error",
            "timeout",
        ],
    ),
];
const FUNCTIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "vector",
    "clamp_min",
    "clamp_max",
    "abs",
    "round",
    "absent",
    "label_replace",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OPERATORS: &[&str] = &["and", "or", "unless", "bool", "offset"];

/// What an expression selects: metric names, with the labels it matches on or groups by.
#[derive(Debug, Default)]
struct Uses {
    metrics: Vec<String>,
    /// `(metric, label, op, value)` from selectors.
    matchers: Vec<(String, String, String, String)>,
    grouping: Vec<String>,
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A cursor over an expression that reports running off its end as an error.
struct Scan<'a> {
    chars: Vec<char>,
    i: usize,
    expr: &'a str,
}

impl Scan<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn at(&self) -> Result<char, String> {
        self.peek()
            .ok_or_else(|| format!("unexpected end of {}", self.expr))
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.i += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        self.chars[start..self.i].iter().collect()
    }

    /// Skips a quoted string starting at the quote; returns its content.
    fn string(&mut self) -> Result<String, String> {
        let quote = self.at()?;
        self.i += 1;
        let mut value = String::new();
        loop {
            match self.at()? {
                c if c == quote => break,
                '\\' => {
                    self.i += 1;
                    value.push(self.at()?);
                }
                c => value.push(c),
            }
            self.i += 1;
        }
        self.i += 1;
        Ok(value)
    }

    /// Parses `label op "value", ...` after a `{`, up to and including the `}`.
    fn matchers(&mut self, metric: &str, uses: &mut Uses) -> Result<(), String> {
        let expr = self.expr;
        loop {
            while self.peek().is_some_and(|c| c.is_whitespace() || c == ',') {
                self.i += 1;
            }
            if self.at()? == '}' {
                self.i += 1;
                return Ok(());
            }
            let label = self.take_while(ident_char);
            if label.is_empty() {
                return Err(format!("bad matcher in {expr}"));
            }
            self.skip_space();
            let op = self.take_while(|c| matches!(c, '=' | '!' | '~'));
            if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                return Err(format!("bad operator {op:?} in {expr}"));
            }
            self.skip_space();
            if !matches!(self.at()?, '"' | '\'') {
                return Err(format!("unquoted value in {expr}"));
            }
            let value = self.string()?;
            uses.matchers.push((metric.to_string(), label, op, value));
        }
    }
}

fn promql_uses(expr: &str) -> Result<Uses, String> {
    let mut sc = Scan {
        chars: expr.chars().collect(),
        i: 0,
        expr,
    };
    let mut uses = Uses::default();
    while let Some(c) = sc.peek() {
        if c == '"' || c == '\'' {
            sc.string()?;
        } else if c == '[' {
            // A range or subquery: `[5m]`, `[$__rate_interval]`.
            sc.take_while(|c| c != ']');
            sc.at()?;
            sc.i += 1;
        } else if c == '{' {
            sc.i += 1;
            sc.matchers("", &mut uses)?;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable or a number (0.99, 1e3): skip it whole.
            sc.i += 1;
            sc.take_while(|c| ident_char(c) || c == '.');
        } else if ident_char(c) {
            let word = sc.take_while(ident_char);
            sc.skip_space();
            let next = sc.peek();
            if GROUPING.contains(&word.as_str()) {
                if next == Some('(') {
                    sc.i += 1;
                    let inner = sc.take_while(|c| c != ')');
                    sc.at()?;
                    sc.i += 1;
                    uses.grouping.extend(
                        inner
                            .split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                }
            } else if OPERATORS.contains(&word.as_str()) || FUNCTIONS.contains(&word.as_str()) {
                // `sum by (le) (...)`: an aggregation need not be followed by its `(`.
            } else if next == Some('(') {
                return Err(format!("unknown function {word} in {expr}"));
            } else {
                if next == Some('{') {
                    sc.i += 1;
                    sc.matchers(&word, &mut uses)?;
                }
                uses.metrics.push(word);
            }
        } else {
            sc.i += 1;
        }
    }
    Ok(uses)
}

/// The labels of a series name (`keygate_ttfb_seconds_bucket` → upstream, le), or `None` when
/// keygate does not export it.
fn series_labels(name: &str) -> Option<Vec<&'static str>> {
    for (metric, labels) in METRICS {
        let mut labels = labels.to_vec();
        if !HISTOGRAMS.contains(metric) {
            if name == *metric {
                return Some(labels);
            }
        } else if name == format!("{metric}_bucket") {
            labels.push("le");
            return Some(labels);
        } else if name == format!("{metric}_sum") || name == format!("{metric}_count") {
            return Some(labels);
        }
    }
    None
}

/// Checks an expression against what keygate exports; `extra` names other allowed series.
fn check_promql(expr: &str, extra: &[&str]) -> Result<Uses, String> {
    let uses = promql_uses(expr)?;
    if uses.metrics.is_empty() {
        return Err(format!("no metric in {expr}"));
    }
    let mut labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
    for m in &uses.metrics {
        if extra.contains(&m.as_str()) {
            continue;
        }
        let own = series_labels(m).ok_or_else(|| format!("{m} is not a keygate metric: {expr}"))?;
        labels.extend(own);
    }
    for l in &uses.grouping {
        if !labels.contains(l.as_str()) {
            return Err(format!("no label {l:?} here: {expr}"));
        }
    }
    for (metric, label, op, value) in &uses.matchers {
        if !labels.contains(label.as_str()) {
            return Err(format!("{metric} has no label {label:?}: {expr}"));
        }
        let closed = LABEL_VALUES.iter().find(|(l, _)| l == label);
        if let (true, Some((_, values))) = (op == "=" || op == "!=", closed) {
            if !values.contains(&value.as_str()) {
                return Err(format!("{label}={value:?} never occurs: {expr}"));
            }
        }
    }
    Ok(uses)
}

#[test]
fn promql_scanner_sees_metrics_labels_and_mistakes() {
    let uses = promql_uses(
        r#"histogram_quantile(0.99, sum by (le, upstream) (rate(keygate_ttfb_seconds_bucket{job=~"$job"}[5m]))) > 10"#,
    )
    .unwrap();
    assert_eq!(uses.metrics, ["keygate_ttfb_seconds_bucket"]);
    assert_eq!(uses.grouping, ["le", "upstream"]);
    assert_eq!(uses.matchers[0].1, "job");
    check_promql(r#"sum(keygate_keys{state!="disabled"}) or vector(0)"#, &[]).unwrap();
    for bad in [
        r#"rate(process_cpu_seconds_total[5m])"#,
        r#"sum(keygate_keys{state="disable"})"#,
        r#"sum by (model) (keygate_keys)"#,
        r#"rat(keygate_keys[5m])"#,
        r#"keygate_ttfb_seconds"#,
        r#"sum(keygate_keys{state="ready"#,
    ] {
        assert!(check_promql(bad, &[]).is_err(), "not caught: {bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn alert_rules_cover_the_required_alerts_with_keygate_metrics() {
    let rules = yaml_file("prometheus/alerts.yml");
    let mut alerts = BTreeMap::new();
    for group in seq(&rules["groups"]) {
        for rule in seq(&group["rules"]) {
            let name = s(&rule["alert"]).to_string();
            let expr = s(&rule["expr"]);
            check_promql(expr, &["up"]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            alerts.insert(name, expr.to_string());
        }
    }
    for required in [
        "KeygateUpstreamAllKeysDisabled",
        "Keygate429RatioHigh",
        "KeygateTTFBP99High",
        "KeygateDown",
        "Keygate5xxRatioHigh",
    ] {
        assert!(alerts.contains_key(required), "no alert {required}");
    }
    assert!(alerts["KeygateUpstreamAllKeysDisabled"].contains("keygate_keys{state!=\"disabled\"}"));
    assert!(alerts["Keygate429RatioHigh"].contains("status=\"429\""));
    assert!(alerts["KeygateTTFBP99High"].contains(
        "histogram_quantile(0.99, sum by (le, upstream) (rate(keygate_ttfb_seconds_bucket[5m]))) > 10"
    ));

    // The scrape configs load these rules and point at the metrics port.
    for file in [
        "prometheus/prometheus.yml",
        "prometheus/prometheus-kubernetes.yml",
    ] {
        let config = yaml_file(file);
        assert!(seq(&config["rule_files"]).contains(&Value::from("alerts.yml")));
        let jobs = seq(&config["scrape_configs"]);
        assert!(jobs
            .iter()
            .any(|j| s(&j["job_name"]).starts_with("keygate")));
    }
    let config = yaml_file("prometheus/prometheus.yml");
    let systemd = yaml_file("systemd/keygate.yaml");
    let target = s(&seq(&seq(&config["scrape_configs"])[0]["static_configs"])[0]["targets"][0]);
    assert_eq!(target, s(&systemd["metrics"]["addr"]));
}

fn promtool(args: &[&str]) -> Output {
    run(Command::new("promtool")
        .args(args)
        .current_dir(deploy_dir().join("prometheus")))
}

#[test]
fn prometheus_files_pass_promtool() {
    if !have("promtool") {
        skip(
            "promtool checks",
            "promtool is not installed (Debian: apt-get install prometheus)",
        );
        return;
    }
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["check", "config", "prometheus.yml"],
        &["test", "rules", "alerts.test.yml"],
    ] {
        let out = promtool(args);
        assert!(
            out.status.success(),
            "promtool {}:\n{}",
            args.join(" "),
            text(&out)
        );
    }
    let out = promtool(&["check", "config", "prometheus-kubernetes.yml"]);
    let all = text(&out);
    if all.contains("field kubernetes_sd_configs not found") {
        skip(
            "promtool check config prometheus-kubernetes.yml",
            "this promtool is built without Kubernetes discovery",
        );
    } else {
        assert!(out.status.success(), "prometheus-kubernetes.yml:\n{all}");
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("grafana/keygate-dashboard.json")).unwrap()
}

/// Every (panel title, expr) of the dashboard.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

#[test]
fn grafana_dashboard_is_built_on_keygate_metrics() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(d["uid"].is_string() && d["title"].is_string());
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }

    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_exprs(&d) {
        let uses = check_promql(&expr, &[]).unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
        used.extend(uses.metrics);
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"].as_str().unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _)| sel)
            .unwrap_or_else(|| panic!("variable query {q}"));
        check_promql(inner, &[]).unwrap_or_else(|e| panic!("variable {q}: {e}"));
    }
    for required in [
        "keygate_requests_total",
        "keygate_ttfb_seconds_bucket",
        "keygate_keys",
        "keygate_key_cooldowns_total",
        "keygate_tokens_total",
        "keygate_retries_total",
        "keygate_in_flight_requests",
    ] {
        assert!(used.contains(required), "no panel shows {required}");
    }
}

#[test]
fn grafana_queries_are_valid_promql() {
    if !have("promtool") {
        skip(
            "checking the dashboard's PromQL",
            "promtool is not installed",
        );
        return;
    }
    // Grafana's variables replaced by what they expand to, each query as a recording rule.
    let rules: Vec<serde_yaml::Value> = dashboard_exprs(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            let mut rule = serde_yaml::Mapping::new();
            rule.insert("record".into(), format!("keygate:dashboard:{i}").into());
            rule.insert("expr".into(), expr.into());
            serde_yaml::Value::Mapping(rule)
        })
        .collect();
    let doc = serde_yaml::to_string(&serde_json::json!({
        "groups": [{ "name": "dashboard", "rules": rules }]
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, doc).unwrap();
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path));
    assert!(out.status.success(), "dashboard PromQL:\n{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// Docker

/// `(instruction, arguments)` of a Dockerfile, continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("docker/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (inst, args) = current.split_once(' ').unwrap();
        out.push((inst.to_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_in_stages_and_runs_as_non_root() {
    let d = dockerfile();
    let froms: Vec<&str> = d
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(froms.len(), 2, "two stages: {froms:?}");
    assert!(
        froms[0].starts_with("rust:")
            && froms[0].contains("bookworm")
            && froms[0].ends_with(" AS build")
    );
    assert_eq!(froms[1], "debian:bookworm-slim");
    let runs: Vec<&str> = d
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(runs
        .iter()
        .any(|r| r.contains("install") && r.contains("cmake")));
    assert!(runs
        .iter()
        .any(|r| r.contains("cargo build --release") && r.contains("--bin keygate")));
    assert!(runs.iter().any(|r| r.contains("ca-certificates")));
    assert!(runs.iter().any(|r| r.contains("--uid 10001")));
    let last = |inst: &str| {
        d.iter()
            .rev()
            .find(|(i, _)| i == inst)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("no {inst}"))
    };
    assert_eq!(last("USER"), "10001:10001");
    assert_eq!(last("ENTRYPOINT"), r#"["/usr/local/bin/keygate"]"#);
    assert_eq!(last("CMD"), r#"["-c", "/etc/keygate/keygate.yaml"]"#);
    assert!(last("COPY").starts_with("--from=build "));
    // No key or config is baked in.
    assert!(!d
        .iter()
        .any(|(i, a)| (i == "COPY" || i == "ADD") && a.contains("keys")));

    let ignore = read("docker/Dockerfile.dockerignore");
    let rules: Vec<&str> = code_lines(&ignore);
    assert_eq!(rules[0], "*", "everything is excluded unless listed");
    assert!(!rules.iter().any(|r| r.contains("target")));
}

/// A one-shot HTTP server on loopback that answers every connection with `status_line`.
fn stub_server(status_line: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(1) {
            let mut conn = conn.unwrap();
            // Read the whole request first: closing on unread data would reset the connection.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(conn, "{status_line}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    port
}

#[test]
fn dockerfile_healthcheck_asks_readyz_without_curl() {
    let d = dockerfile();
    let hc = &d
        .iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .expect("HEALTHCHECK")
        .1;
    let json = &hc[hc.find("CMD [").expect("exec form") + 4..];
    let argv: Vec<String> = serde_json::from_str(json).unwrap();
    assert_eq!(argv[..2], ["/bin/bash", "-c"]);
    assert!(argv[2].contains("/readyz") && !argv[2].contains("curl"));
    if !have("bash") {
        skip("running the HEALTHCHECK command", "bash is not installed");
        return;
    }
    let probe = |port: u16| {
        Command::new("bash")
            .arg("-c")
            .arg(&argv[2])
            .env("KEYGATE_HEALTH_PORT", port.to_string())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(probe(stub_server("HTTP/1.1 200 OK")), "a 200 is healthy");
    assert!(
        !probe(stub_server("HTTP/1.1 503 Service Unavailable")),
        "a 503 is not"
    );
    assert!(!probe(free_port()), "nothing listening is not");
}
