//! `admin:`: the admin API's listener and its tokens.

use super::{AdminConfig, ListenerConfig, Scope};
use crate::clients::digest;
use crate::config::secrets::from_env;
use crate::config::types::{AdminFile, RuntimeKeysFile};
use crate::config::{ConfigError, RuntimeKeyStore, RuntimeKeysConfig};
use base64::Engine;
use std::net::SocketAddr;
use std::path::Path;

/// The local key store's file name beside the state file.
const KEY_STORE_FILE: &str = "runtime-keys.json";

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
        runtime_keys: None,
    })
}

/// `admin.runtime_keys`: the master key from the environment, and the store: Redis when
/// `redis:` is configured, else `path`, else a file beside `state_file`.
pub(super) fn runtime_keys(
    at: &Scope,
    r: &RuntimeKeysFile,
    state_file: Option<&Path>,
    redis: bool,
) -> Result<RuntimeKeysConfig, ConfigError> {
    let text =
        from_env(at.cx.source, &r.master_key_env).map_err(|e| at.err("master_key_env", e))?;
    let master_key = master_key(text.trim()).map_err(|e| {
        at.err(
            "master_key_env",
            format!("environment variable {}: {e}", r.master_key_env),
        )
    })?;
    let store = match (&r.path, redis) {
        (Some(_), true) => {
            return Err(at.err(
                "path",
                "not used with redis: runtime keys are kept in Redis, shared by every instance",
            ))
        }
        (None, true) => RuntimeKeyStore::Redis,
        (Some(p), false) => RuntimeKeyStore::File(at.cx.resolve(p)),
        (None, false) => match state_file.and_then(Path::parent) {
            Some(dir) => RuntimeKeyStore::File(dir.join(KEY_STORE_FILE)),
            None => {
                return Err(at.err(
                    "path",
                    "needed: there is no state_file to keep the key store beside, and no redis",
                ))
            }
        },
    };
    Ok(RuntimeKeysConfig { master_key, store })
}

/// 32 bytes from 64 hex digits or base64; the error never echoes the value.
fn master_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| "not hexadecimal".to_string())?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| {
                format!(
                    "must hold 32 bytes as 64 hex digits or base64 (make one with `openssl rand -hex 32`); it holds {} characters of neither",
                    text.chars().count()
                )
            })?
    };
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "must hold 32 bytes (make one with `openssl rand -hex 32`); it holds {}",
            bytes.len()
        )
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
    use crate::config::RuntimeKeyStore;

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

    const HEX_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn with_master() -> crate::config::MemorySource {
        env().with_env("KG_MASTER", HEX_KEY)
    }

    fn store_of(top: &str, src: &crate::config::MemorySource) -> RuntimeKeyStore {
        let a = load(&with_top(top), src).unwrap().admin.unwrap();
        a.runtime_keys.unwrap().store
    }

    #[test]
    fn runtime_keys_are_off_unless_configured() {
        let a = load(&with_top("admin: { addr: \"127.0.0.1:9092\" }"), &env()).unwrap();
        assert!(a.admin.unwrap().runtime_keys.is_none());
    }

    #[test]
    fn the_key_store_sits_beside_the_state_file_unless_given_a_path_or_redis() {
        let beside = store_of(
            "state_file: /var/lib/kg/state.json\nadmin: { addr: \"127.0.0.1:9092\", runtime_keys: { master_key_env: KG_MASTER } }",
            &with_master(),
        );
        assert_eq!(
            beside,
            RuntimeKeyStore::File("/var/lib/kg/runtime-keys.json".into())
        );
        let given = store_of(
            "admin: { addr: \"127.0.0.1:9092\", runtime_keys: { master_key_env: KG_MASTER, path: /srv/keys.json } }",
            &with_master(),
        );
        assert_eq!(given, RuntimeKeyStore::File("/srv/keys.json".into()));
        let shared = store_of(
            "redis: { url: \"redis://127.0.0.1:6379\" }\nadmin: { addr: \"127.0.0.1:9092\", runtime_keys: { master_key_env: KG_MASTER } }",
            &with_master(),
        );
        assert_eq!(shared, RuntimeKeyStore::Redis);
    }

    #[test]
    fn the_master_key_may_be_hex_or_base64_and_is_never_shown() {
        use base64::Engine;
        let bytes: Vec<u8> = (0u8..32).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let src = env().with_env("KG_MASTER", &b64);
        let top = "admin: { addr: \"127.0.0.1:9092\", runtime_keys: { master_key_env: KG_MASTER, path: k.json } }";
        let keys = load(&with_top(top), &src)
            .unwrap()
            .admin
            .unwrap()
            .runtime_keys
            .unwrap();
        assert_eq!(keys.master_key.to_vec(), bytes);
        let keys = load(&with_top(top), &with_master())
            .unwrap()
            .admin
            .unwrap()
            .runtime_keys
            .unwrap();
        assert_eq!(keys.master_key[..2], [0x00, 0x11]);
        let shown = format!("{keys:?}");
        assert!(
            !shown.contains("master_key") && !shown.contains("0011"),
            "{shown}"
        );
    }

    #[test]
    fn runtime_key_mistakes_are_named() {
        let m = "admin: { addr: \"127.0.0.1:9092\", runtime_keys: { master_key_env: KG_MASTER";
        let cases = [
            (
                format!("{m} }} }}"),
                with_master(),
                "admin.runtime_keys.path",
                "needed: there is no state_file to keep the key store beside, and no redis",
            ),
            (
                format!("redis: {{ url: \"redis://127.0.0.1:6379\" }}\n{m}, path: k.json }} }}"),
                with_master(),
                "admin.runtime_keys.path",
                "not used with redis: runtime keys are kept in Redis, shared by every instance",
            ),
            (
                format!("{m}, path: k.json }} }}"),
                env(),
                "admin.runtime_keys.master_key_env",
                "environment variable KG_MASTER is not set",
            ),
            (
                format!("{m}, path: k.json }} }}"),
                env().with_env("KG_MASTER", "too-short-to-be-a-key"),
                "admin.runtime_keys.master_key_env",
                "environment variable KG_MASTER: must hold 32 bytes as 64 hex digits or base64 (make one with `openssl rand -hex 32`); it holds 21 characters of neither",
            ),
            (
                format!("{m}, path: k.json }} }}"),
                env().with_env("KG_MASTER", "c2hvcnQ="),
                "admin.runtime_keys.master_key_env",
                "environment variable KG_MASTER: must hold 32 bytes (make one with `openssl rand -hex 32`); it holds 5",
            ),
        ];
        for (top, src, field, reason) in cases {
            expect_error(&with_top(&top), &src, field, reason);
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
