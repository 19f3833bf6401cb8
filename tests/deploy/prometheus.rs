//! `deploy/prometheus/`: the alert rules cover the required alerts with keygate's metrics, the
//! scrape configs point at keygate, and promtool accepts every file and passes the rule tests.

use crate::promql::check_promql;
use crate::{deploy_dir, require, run, s, seq, text, yaml_file};
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::process::{Command, Output};

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

/// Every (alert name, expr) of `alerts.yml`.
pub fn alert_exprs() -> Vec<(String, String)> {
    let rules = yaml_file("prometheus/alerts.yml");
    let mut out = Vec::new();
    for group in seq(&rules["groups"]) {
        for rule in seq(&group["rules"]) {
            out.push((s(&rule["alert"]).to_string(), s(&rule["expr"]).to_string()));
        }
    }
    out
}

fn promtool(args: &[&str]) -> Output {
    run(Command::new("promtool")
        .args(args)
        .current_dir(deploy_dir().join("prometheus")))
}

#[test]
fn prometheus_files_pass_promtool() {
    require("promtool", "prometheus");
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
        // Debian's promtool is built without Kubernetes discovery: check everything else of the
        // file with the discovery swapped for a static target, and the discovery itself here.
        println!("note: this promtool lacks Kubernetes discovery; checking the rest of the file");
        let mut config = yaml_file("prometheus/prometheus-kubernetes.yml");
        for job in config["scrape_configs"].as_sequence_mut().unwrap() {
            let job = job.as_mapping_mut().unwrap();
            if let Some(sd) = job.remove("kubernetes_sd_configs") {
                assert_eq!(
                    sd,
                    serde_yaml::from_str::<Value>("[{role: pod}]").unwrap(),
                    "keygate's pods are found by pod discovery"
                );
                let target = serde_yaml::from_str("[{targets: ['127.0.0.1:9091']}]").unwrap();
                job.insert("static_configs".into(), target);
            }
        }
        // The copy lives elsewhere: it loads the rules by their absolute path.
        let rules = deploy_dir().join("prometheus/alerts.yml");
        config["rule_files"] = vec![Value::from(rules.to_str().unwrap())].into();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("prometheus-kubernetes-static.yml");
        std::fs::write(&copy, serde_yaml::to_string(&config).unwrap()).unwrap();
        let out = promtool(&["check", "config", copy.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "prometheus-kubernetes.yml without its discovery:\n{}",
            text(&out)
        );
    } else {
        assert!(out.status.success(), "prometheus-kubernetes.yml:\n{all}");
    }
}
