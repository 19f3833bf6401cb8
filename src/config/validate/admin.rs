//! `admin:`: the admin API's listener and its tokens.

use super::{AdminConfig, ListenerConfig, Scope};
use crate::clients::digest;
use crate::config::secrets::from_env;
use crate::config::types::AdminFile;
use crate::config::ConfigError;
use std::net::SocketAddr;

/// The `admin:` section; `listen` and `metrics` are the other ports it must not share.
pub(super) fn admin(
    at: &Scope,
    a: &AdminFile,
    listen: &[ListenerConfig],
    metrics: Option<SocketAddr>,
) -> Result<AdminConfig, ConfigError> {
    let addr: SocketAddr = a
        .addr
        .parse()
        .map_err(|_| at.err("addr", format!("not an IP:PORT address: {:?}", a.addr)))?;
    if listen.iter().any(|l| same_port(l.addr, addr)) {
        return Err(at.err("addr", format!("{addr} is also a proxy listener")));
    }
    if metrics.is_some_and(|m| same_port(m, addr)) {
        return Err(at.err("addr", format!("{addr} is also the metrics port")));
    }
    let token = match &a.token_env {
        None => None,
        Some(var) => Some(from_env(at.cx.source, var).map_err(|r| at.err("token_env", r))?),
    };
    let read_token = match &a.read_token_env {
        None => None,
        Some(_) if token.is_none() => {
            return Err(at.err(
                "read_token_env",
                "needs admin.token_env: a read-only token alone would leave the actions open",
            ));
        }
        Some(var) => Some(from_env(at.cx.source, var).map_err(|r| at.err("read_token_env", r))?),
    };
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(at.err(
            "addr",
            format!(
                "{addr} is not a loopback address: set admin.token_env so the admin API asks for a token"
            ),
        ));
    }
    if token.is_some() && token == read_token {
        return Err(at.err(
            "read_token_env",
            "holds the same token as admin.token_env: the read-only token must differ",
        ));
    }
    Ok(AdminConfig {
        addr,
        token: token.map(|t| digest(t.as_bytes())),
        read_token: read_token.map(|t| digest(t.as_bytes())),
    })
}

/// Whether two listeners would take the same port: the same address, or one of them on every
/// address (`0.0.0.0`, `::`).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use crate::clients::digest;

    fn env() -> crate::config::MemorySource {
        source()
            .with_env("KG_ADMIN", "admin-secret-1")
            .with_env("KG_READ", "read-secret-2")
    }

    #[test]
    fn no_admin_section_means_no_admin_listener() {
        assert!(load(&with_top(""), &source()).unwrap().admin.is_none());
    }

    #[test]
    fn tokens_come_from_the_environment_and_only_their_digests_are_kept() {
        let yaml = with_top(
            "admin: { addr: \"0.0.0.0:9092\", token_env: KG_ADMIN, read_token_env: KG_READ }",
        );
        let a = load(&yaml, &env()).unwrap().admin.unwrap();
        assert_eq!(a.addr.to_string(), "0.0.0.0:9092");
        assert_eq!(a.token, Some(digest(b"admin-secret-1")));
        assert_eq!(a.read_token, Some(digest(b"read-secret-2")));
        let shown = format!("{a:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn a_loopback_admin_listener_may_go_without_a_token() {
        let yaml = with_top("admin: { addr: \"127.0.0.1:9092\" }");
        let a = load(&yaml, &source()).unwrap().admin.unwrap();
        assert!(a.token.is_none() && a.read_token.is_none());
        let yaml = with_top("admin: { addr: \"[::1]:9092\" }");
        assert!(load(&yaml, &source()).unwrap().admin.is_some());
    }

    #[test]
    fn admin_mistakes_are_named() {
        let cases = [
            (
                "admin: { addr: \"localhost:9092\" }",
                "admin.addr",
                "not an IP:PORT address: \"localhost:9092\"",
            ),
            (
                "admin: { addr: \"127.0.0.1:8080\" }",
                "admin.addr",
                "127.0.0.1:8080 is also a proxy listener",
            ),
            (
                "admin: { addr: \"0.0.0.0:8080\", token_env: KG_ADMIN }",
                "admin.addr",
                "0.0.0.0:8080 is also a proxy listener",
            ),
            (
                "metrics: { addr: \"127.0.0.1:9091\" }\nadmin: { addr: \"127.0.0.1:9091\" }",
                "admin.addr",
                "127.0.0.1:9091 is also the metrics port",
            ),
            (
                "admin: { addr: \"10.0.0.5:9092\" }",
                "admin.addr",
                "10.0.0.5:9092 is not a loopback address: set admin.token_env so the admin API asks for a token",
            ),
            (
                "admin: { addr: \"127.0.0.1:9092\", token_env: KG_UNSET }",
                "admin.token_env",
                "environment variable KG_UNSET is not set",
            ),
            (
                "admin: { addr: \"127.0.0.1:9092\", token_env: KG_ADMIN, read_token_env: KG_UNSET }",
                "admin.read_token_env",
                "environment variable KG_UNSET is not set",
            ),
            (
                "admin: { addr: \"127.0.0.1:9092\", read_token_env: KG_READ }",
                "admin.read_token_env",
                "needs admin.token_env: a read-only token alone would leave the actions open",
            ),
            (
                "admin: { addr: \"127.0.0.1:9092\", token_env: KG_ADMIN, read_token_env: KG_ADMIN }",
                "admin.read_token_env",
                "holds the same token as admin.token_env: the read-only token must differ",
            ),
        ];
        for (top, field, reason) in cases {
            expect_error(&with_top(top), &env(), field, reason);
        }
    }

    #[test]
    fn an_unknown_admin_field_is_an_error() {
        let err = error_of(
            &with_top("admin: { addr: \"127.0.0.1:9092\", token: abc }"),
            &env(),
        );
        assert!(err.reason.contains("unknown field"), "{err}");
    }
}
