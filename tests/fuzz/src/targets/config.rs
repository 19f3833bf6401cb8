//! The config loader: any YAML text (and any key file and CA file it may name) loads or fails
//! with a message, never panics, never allocates out of proportion, and no error message
//! repeats a secret that the environment or a file held.
//!
//! Input: `yaml NUL keys-file NUL ca-file`. The key file is served at every path the examples
//! name for key and token files; an empty field serves a valid default.

use std::path::Path;

use keygate::config::{load_str_with, MemorySource};

use crate::alloc_count::assert_peak_below;
use crate::input::{fields, text};

use super::memory_bound;

/// Where the config lives; relative paths in it resolve under `/etc/keygate`.
const FILE: &str = "/etc/keygate/keygate.yaml";

/// Environment variables the examples and seeds name, each holding a unique canary secret.
const ENV_SECRETS: [(&str, &str); 9] = [
    ("OPENAI_KEY_A", "sk-canary-Qz7vR2mK8pLw3xNc"),
    ("OPENAI_KEY_B", "sk-canary-Hj4tY9bV6sDf1gZa"),
    ("OPENAI_KEY_C", "sk-canary-Pe5uW8nM2qXk7rTb"),
    ("DEMO_KEY_A", "sk-canary-Lc3iO6yU9aSd4fGh"),
    ("DEMO_KEY_B", "sk-canary-Vb1nM5kJ7hGf2dSa"),
    ("DEMO_KEY_C", "sk-canary-Wq8eR4tY6uIo3pLk"),
    ("KG_TEST_KEY", "sk-canary-Zx9cV2bN5mAs7dFg"),
    ("TEAM_A_TOKEN", "tok-canary-Rt6yU3iO8pQw1eRt"),
    ("AZURE_KEY", "az-canary-Mn4bV7cX2zLk9jHg"),
];

/// The key file served when the input gives none: two keys, with names and attributes.
const DEFAULT_KEYS: &str = "sk-canary-file-Ab3dE5fG7hJ9kL1m name=f1 weight=2 account=org-1\n\
                            # a comment\n\
                            sk-canary-file-Nq2rS4tU6vW8xY0z name=f2\n";

/// Paths served with the key file: the examples' key files, and token files.
const KEY_PATHS: [&str; 5] = [
    "/etc/keygate/openai.keys",
    "/etc/keygate/keys/openai.keys",
    "/run/credentials/keygate.service/openai.keys",
    "/etc/keygate/team-a.token",
    "/etc/keygate/a.token",
];

/// Paths served with the CA file.
const CA_PATHS: [&str; 2] = ["/etc/keygate/certs/private-ca.pem", "/etc/keygate/ca.pem"];

/// Directories the examples write into (pid file, upgrade socket, state, access log).
const DIRS: [&str; 5] = [
    "/tmp/keygate",
    "/tmp/keygate-demo",
    "/run/keygate",
    "/var/lib/keygate",
    "/var/log/keygate",
];

/// How many characters of a secret in a row count as a leak (as the canary tests count).
const LEAK_RUN: usize = 8;

/// Checks one input; see the module doc.
pub fn run(data: &[u8]) {
    let parts = fields(data, 3);
    let yaml = text(parts[0]);
    let keys = if parts[1].is_empty() {
        DEFAULT_KEYS.as_bytes()
    } else {
        parts[1]
    };
    let source = source(keys, parts[2]);
    let limit = memory_bound(16 << 20, 512, data.len());
    let loaded = assert_peak_below("config", limit, || {
        load_str_with(Path::new(FILE), &yaml, &source)
    });
    if let Err(err) = loaded {
        let message = err.to_string();
        for (_, secret) in ENV_SECRETS {
            assert_no_leak(&message, secret, data);
        }
        for line in DEFAULT_KEYS.lines() {
            if let Some(secret) = line
                .split_whitespace()
                .next()
                .filter(|s| s.starts_with("sk-"))
            {
                assert_no_leak(&message, secret, data);
            }
        }
    }
}

/// The environment and files the loader sees.
fn source(keys: &[u8], ca: &[u8]) -> MemorySource {
    let mut source = MemorySource::new();
    for (name, value) in ENV_SECRETS {
        source = source.with_env(name, value);
    }
    for path in KEY_PATHS {
        source = source.with_file(path, keys, 0o600);
    }
    for path in CA_PATHS {
        source = source.with_file(path, ca, 0o644);
    }
    for dir in DIRS {
        source = source.with_dir(dir, 0o700);
    }
    source
        .with_file("/etc/keygate/certs/cert.pem", "", 0o644)
        .with_file("/etc/keygate/certs/key.pem", "", 0o600)
}

/// Panics when `message` holds a run of [`LEAK_RUN`] characters of `secret` that the input did
/// not itself contain (a message may quote the input back, but never what only a secret held).
fn assert_no_leak(message: &str, secret: &str, input: &[u8]) {
    let secret = secret.as_bytes();
    for run in secret.windows(LEAK_RUN) {
        let in_message = message.as_bytes().windows(LEAK_RUN).any(|w| w == run);
        let in_input = input.windows(LEAK_RUN).any(|w| w == run);
        assert!(
            !in_message || in_input,
            "a config error shows part of a secret ({}): {message}",
            String::from_utf8_lossy(run)
        );
    }
}
