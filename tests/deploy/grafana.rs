//! `deploy/grafana/`: the dashboard's layout and data source are sound, its queries are built on
//! keygate's metrics and labels, and promtool parses every query.

use crate::promql::check_promql;
use crate::{read, require, run, text};
use std::collections::BTreeSet;
use std::process::Command;

pub fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("grafana/keygate-dashboard.json")).unwrap()
}

/// Every (panel title, expr) of the dashboard.
pub fn dashboard_exprs(d: &serde_json::Value) -> Vec<(String, String)> {
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

/// The series selector of every `label_values(selector, label)` template variable.
pub fn variable_selectors(d: &serde_json::Value) -> Vec<String> {
    let vars = d["templating"]["list"].as_array().unwrap();
    vars.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"].as_str().unwrap();
            q.strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| panic!("variable query {q}"))
        })
        .collect()
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
    for q in variable_selectors(&d) {
        check_promql(&q, &[]).unwrap_or_else(|e| panic!("variable {q}: {e}"));
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
    require("promtool", "prometheus");
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
