//! Shared pieces of the section tests: a valid config to vary, and assertions on the error.
#![allow(clippy::unwrap_used)]

use crate::config::{load_with, Config, ConfigError, MemorySource};
use std::path::Path;

/// Where the test config lives; relative paths in it resolve under `/etc/keygate`.
pub const FILE: &str = "/etc/keygate/keygate.yaml";

/// The one upstream's body in the valid config.
pub const UPSTREAM: &str = "url: http://127.0.0.1:9\nkeys: [ { name: a, env: KG_TEST_KEY } ]";

/// The one route of the valid config.
pub const ROUTE: &str = "{ upstreams: [openai] }";

/// A config: `top` lines first, a listener unless `top` has one, upstream `openai` with `upstream`
/// as its body, and `route` as the only route.
pub fn config(top: &str, upstream: &str, route: &str) -> String {
    let mut out = String::new();
    if !top.is_empty() {
        out.push_str(top);
        out.push('\n');
    }
    if !top.lines().any(|l| l.starts_with("listen:")) {
        out.push_str("listen:\n  - addr: 127.0.0.1:8080\n");
    }
    out.push_str("upstreams:\n  openai:\n");
    for line in upstream.lines() {
        out.push_str(&format!("    {line}\n"));
    }
    out.push_str(&format!("routes:\n  - {route}\n"));
    out
}

/// The valid config with `top` lines added.
pub fn with_top(top: &str) -> String {
    config(top, UPSTREAM, ROUTE)
}

/// The valid config with `extra` lines added to the upstream.
pub fn with_upstream(extra: &str) -> String {
    config("", &format!("{UPSTREAM}\n{extra}"), ROUTE)
}

/// The valid config with `route` as its only route.
pub fn with_route(route: &str) -> String {
    config("", UPSTREAM, route)
}

/// The environment of the valid config: `KG_TEST_KEY=sk-x`.
pub fn source() -> MemorySource {
    MemorySource::new().with_env("KG_TEST_KEY", "sk-x")
}

/// Loads `yaml` as [`FILE`] from `src`, as `keygate -t` would.
pub fn load(yaml: &str, src: &MemorySource) -> Result<Config, ConfigError> {
    let src = src.clone().with_file(FILE, yaml, 0o644);
    load_with(Path::new(FILE), &src)
}

/// The error `yaml` gives, after checking it names [`FILE`] and prints as `file: field: reason`.
pub fn error_of(yaml: &str, src: &MemorySource) -> ConfigError {
    let err = match load(yaml, src) {
        Ok(_) => panic!("config should be refused:\n{yaml}"),
        Err(e) => e,
    };
    assert_eq!(err.file, Path::new(FILE), "{err}");
    let shown = if err.field.is_empty() {
        format!("{FILE}: {}", err.reason)
    } else {
        format!("{FILE}: {}: {}", err.field, err.reason)
    };
    assert_eq!(err.to_string(), shown);
    err
}

/// Asserts that `yaml` is refused with exactly this field and reason.
pub fn expect_error(yaml: &str, src: &MemorySource, field: &str, reason: &str) {
    let err = error_of(yaml, src);
    assert_eq!(
        (err.field.as_str(), err.reason.as_str()),
        (field, reason),
        "{yaml}"
    );
}

/// Asserts that `yaml` is refused on `field` with a reason containing `part` (for reasons
/// worded by another crate).
pub fn expect_error_containing(yaml: &str, src: &MemorySource, field: &str, part: &str) {
    let err = error_of(yaml, src);
    assert_eq!(err.field, field, "{err}\n{yaml}");
    assert!(err.reason.contains(part), "{err} lacks {part:?}\n{yaml}");
}

/// How the OS words a missing file.
pub fn no_such_file() -> String {
    std::io::Error::from_raw_os_error(libc::ENOENT).to_string()
}

/// How the OS words a permission error.
pub fn permission_denied() -> String {
    std::io::Error::from_raw_os_error(libc::EACCES).to_string()
}
