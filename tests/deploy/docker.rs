//! `deploy/docker/`: a two-stage build that runs as non-root, a HEALTHCHECK that asks `/readyz`
//! without curl, and a config keygate accepts.

use crate::utils::free_port;
use crate::{code_lines, keygate_validates, port_of, read, require, s, yaml_file};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};

#[test]
fn docker_config_is_a_valid_keygate_config() {
    let config = yaml_file("docker/keygate.yaml");
    assert_eq!(port_of(s(&config["metrics"]["addr"])), 9091);
    keygate_validates(&config, "deploy/docker/keygate.yaml");
}

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
    let build = runs
        .iter()
        .find(|r| r.contains("cargo build --release"))
        .expect("a cargo build RUN");
    assert!(build.contains("--bin keygate"), "{build}");
    // Only the gateway package is built: the mock, a workspace member, stays out of the image.
    let args: Vec<&str> = build.split_whitespace().collect();
    assert!(
        args.windows(2).any(|w| w == ["-p", "keygate"]),
        "names the keygate package: {build}"
    );
    assert!(
        !args
            .iter()
            .any(|a| ["--workspace", "--all", "--bins"].contains(a) || a.contains("keygate-mock")),
        "builds nothing but the gateway: {build}"
    );
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
    require("bash", "bash");
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
