//! A bad config names the field and the reason, and keygate exits non-zero before listening.
#![allow(clippy::unwrap_used)]

mod utils;
use utils::*;

const GOOD_UPSTREAM: &str = "upstreams:\n  openai:\n    url: http://127.0.0.1:9\n    keys: [ { name: a, env: KG_TEST_KEY } ]\nroutes:\n  - { upstreams: [openai] }\n";

fn expect_error(yaml: &str, env: &[(&str, &str)], needles: &[&str]) {
    let (code, stderr) = check_config(yaml, env);
    assert_ne!(code, 0, "config should be refused:\n{yaml}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
    assert!(
        stderr.contains("keygate.yaml"),
        "message names the file: {stderr}"
    );
}

#[test]
fn valid_config_passes_the_check() {
    let (code, stderr) = check_config(GOOD_UPSTREAM, &[("KG_TEST_KEY", "sk-x")]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn url_that_is_not_a_url_is_named() {
    let yaml = GOOD_UPSTREAM.replace("http://127.0.0.1:9", "\"htp:/x\"");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["upstreams.openai.url", "not a URL", "htp:/x"],
    );
}

#[test]
fn route_to_unknown_upstream_is_named() {
    let yaml = GOOD_UPSTREAM.replace("upstreams: [openai]", "upstreams: [opnai]");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["routes[0].upstreams[0]", "unknown upstream", "opnai"],
    );
}

#[test]
fn upstream_without_keys_is_refused() {
    let yaml = GOOD_UPSTREAM.replace("keys: [ { name: a, env: KG_TEST_KEY } ]", "keys: []");
    expect_error(&yaml, &[], &["upstreams.openai.keys", "no keys"]);
}

#[test]
fn missing_env_var_is_named() {
    expect_error(
        GOOD_UPSTREAM,
        &[],
        &["upstreams.openai.keys[0].env", "KG_TEST_KEY", "not set"],
    );
}

#[test]
fn misspelt_field_is_named() {
    let yaml = GOOD_UPSTREAM.replace("url:", "ulr:");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["upstreams.openai", "unknown field `ulr`"],
    );
}

#[test]
fn inline_secret_is_not_accepted() {
    let yaml = GOOD_UPSTREAM.replace(
        "{ name: a, env: KG_TEST_KEY }",
        "{ name: a, key: sk-inline }",
    );
    let (code, stderr) = check_config(&yaml, &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown field `key`"), "{stderr}");
    assert!(
        !stderr.contains("sk-inline"),
        "a secret must not be echoed: {stderr}"
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
fn bad_duration_is_named() {
    let yaml = GOOD_UPSTREAM.replace(
        "url: http://127.0.0.1:9",
        "url: http://127.0.0.1:9\n    health: { interval: soon }",
    );
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["upstreams.openai.health.interval", "not a duration"],
    );
}

#[test]
fn bad_listen_address_is_named() {
    let yaml = format!("listen:\n  - addr: localhost-8080\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["listen[0].addr", "localhost-8080"],
    );
}

#[test]
fn bad_model_glob_and_missing_routes_are_named() {
    let yaml = GOOD_UPSTREAM.replace(
        "- { upstreams: [openai] }",
        "- { models: [\"\"], upstreams: [openai] }",
    );
    expect_error(&yaml, &[("KG_TEST_KEY", "sk-x")], &["routes[0].models[0]"]);
    let yaml = GOOD_UPSTREAM.replace("routes:\n  - { upstreams: [openai] }\n", "");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["routes", "at least one route"],
    );
}

#[test]
fn oversized_body_limit_typo_is_named() {
    let yaml = format!("max_body_bytes: 32XB\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["max_body_bytes", "unknown size unit"],
    );
}

#[test]
fn missing_file_is_reported() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["-t", "-c", "/nonexistent/keygate.yaml"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn server_refuses_to_start_on_bad_config() {
    let (dir, path, port) = write_config(&GOOD_UPSTREAM.replace("url:", "ulr:"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["-c", path.to_str().unwrap()])
        .env("KG_TEST_KEY", "sk-x")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "must not listen"
    );
    drop(dir);
}

#[test]
fn strategy_settings_are_checked() {
    let yaml = GOOD_UPSTREAM.replace(
        "- { upstreams: [openai] }",
        "- { upstreams: [openai], weights: [1] }",
    );
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["routes[0].weights", "weighted"],
    );
    let yaml = GOOD_UPSTREAM.replace(
        "- { upstreams: [openai] }",
        "- { upstreams: [openai], strategy: weighted, weights: [1, 2] }",
    );
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["routes[0].weights", "one per upstream"],
    );
    let yaml = GOOD_UPSTREAM.replace(
        "- { upstreams: [openai] }",
        "- { upstreams: [openai], strategy: quickest }",
    );
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["routes[0].strategy", "quickest"],
    );
}

#[test]
fn client_mistakes_are_named() {
    let yaml = format!("clients:\n  - {{ name: a, token_env: KG_MISSING_TOKEN }}\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["clients[0].token_env", "KG_MISSING_TOKEN"],
    );
    let yaml = format!("clients:\n  - {{ name: a }}\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["clients[0].token_env", "exactly one"],
    );
    let yaml =
        format!("clients:\n  - {{ name: a, token_env: T, limits: {{ rpm: 0 }} }}\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x"), ("T", "tok")],
        &["clients[0].limits.rpm"],
    );
    let yaml = format!("clients:\n  - {{ name: a, token_env: T, limits: {{ budget: {{ tokens: 5, per: week }} }} }}\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x"), ("T", "tok")],
        &["clients[0].limits.budget.per", "week"],
    );
    let yaml = format!("trusted_proxies: [10.0.0.0/40]\n{GOOD_UPSTREAM}");
    expect_error(
        &yaml,
        &[("KG_TEST_KEY", "sk-x")],
        &["trusted_proxies", "10.0.0.0/40"],
    );
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
            ],
        ),
        (
            "openai.yaml",
            [
                ("OPENAI_KEY_A", "sk-test-a"),
                ("OPENAI_KEY_B", "sk-test-b"),
                ("OPENAI_KEY_C", "sk-test-c"),
            ],
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
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
