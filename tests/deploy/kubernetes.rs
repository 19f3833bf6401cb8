//! `deploy/kubernetes/`: the Deployment probes keygate's own ports, runs as non-root on a
//! read-only root and drains within its grace period; the Service, PodDisruptionBudget and
//! Secret fit it; the ConfigMap holds a config keygate accepts.

use crate::{env_vars_named, keygate_validates, port_of, read, s, seq, u, yaml_docs, yaml_file};
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};

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
