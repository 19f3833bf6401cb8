//! The kit as a whole: every file the README lists exists, and every YAML file parses.

use crate::{deploy_dir, yaml_docs};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
