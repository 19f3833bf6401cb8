//! `redis:`: the store that several instances share key states and client limits through.

use super::{RedisConfig, Scope};
use crate::config::secrets::from_env;
use crate::config::types::{RedisFile, RedisUrls};
use crate::config::ConfigError;
use crate::keys::Secret;
use std::time::Duration;

/// The prefix when none is given.
pub const DEFAULT_PREFIX: &str = "keygate:";
/// The longest a request waits for Redis when no `timeout` is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// The longest `timeout` accepted: beyond it Redis trouble would be felt by every client.
const MAX_TIMEOUT: Duration = Duration::from_secs(5);

/// The `redis:` section.
pub(super) fn redis(at: &Scope, r: &RedisFile) -> Result<RedisConfig, ConfigError> {
    let (urls, cluster) = match &r.url {
        RedisUrls::One(u) => (vec![u.clone()], false),
        RedisUrls::Cluster(list) if list.is_empty() => {
            return Err(at.err("url", "lists no cluster node"));
        }
        RedisUrls::Cluster(list) => (list.clone(), true),
    };
    for (i, u) in urls.iter().enumerate() {
        let field = if cluster {
            format!("url[{i}]")
        } else {
            "url".to_string()
        };
        check_url(u, cluster).map_err(|reason| at.err(&field, reason))?;
    }
    let password = match &r.password_env {
        None => None,
        Some(var) => Some(Secret::new(
            from_env(at.cx.source, var).map_err(|reason| at.err("password_env", reason))?,
        )),
    };
    let prefix = r
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    if prefix.is_empty() || prefix.len() > 64 {
        return Err(at.err("prefix", "must be 1 to 64 characters"));
    }
    if prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '{' || c == '}' || c == '*')
    {
        // Braces would change which cluster slot keygate's hash-tagged keys land in.
        return Err(at.err(
            "prefix",
            "must not contain spaces, control characters, `{`, `}` or `*`",
        ));
    }
    let timeout = r.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
    if timeout < Duration::from_millis(1) || timeout > MAX_TIMEOUT {
        return Err(at.err("timeout", "must be between 1ms and 5s"));
    }
    let instances = r.instances.unwrap_or(1);
    if instances == 0 || instances > 1000 {
        return Err(at.err("instances", "must be between 1 and 1000"));
    }
    Ok(RedisConfig {
        urls,
        cluster,
        password,
        prefix,
        timeout,
        instances,
    })
}

/// A `redis://` or `rediss://` URL with a host and no password; a cluster node names no
/// database (a cluster has only database 0).
fn check_url(u: &str, cluster: bool) -> Result<(), String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(format!(
            "scheme {:?} is not redis:// or rediss://",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("names no host".to_string());
    }
    if parsed.password().is_some() {
        // Never echo the URL: it holds the secret.
        return Err(
            "holds a password: put it in an environment variable and name that in redis.password_env"
                .to_string(),
        );
    }
    let path = parsed.path().trim_start_matches('/');
    if !path.is_empty() {
        let db: Result<u32, _> = path.parse();
        match db {
            Err(_) => return Err(format!("database {path:?} is not a number")),
            Ok(n) if cluster && n != 0 => {
                return Err("a cluster node has only database 0".to_string())
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn no_redis_section_keeps_every_state_local() {
        assert!(load(&with_top(""), &source()).unwrap().redis.is_none());
    }

    #[test]
    fn a_single_url_gets_the_defaults() {
        let c = load(
            &with_top("redis: { url: \"redis://127.0.0.1:6379/2\" }"),
            &source(),
        )
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.urls, ["redis://127.0.0.1:6379/2"]);
        assert!(!r.cluster);
        assert!(r.password.is_none());
        assert_eq!(r.prefix, DEFAULT_PREFIX);
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        assert_eq!(r.instances, 1);
    }

    #[test]
    fn a_list_of_urls_is_a_cluster_and_the_password_comes_from_the_environment() {
        let yaml = with_top(
            "redis:\n  url: [\"redis://10.0.0.1:7000\", \"rediss://10.0.0.2:7000/0\"]\n  password_env: KG_REDIS_PW\n  prefix: \"gw1:\"\n  timeout: 20ms\n  instances: 3",
        );
        let src = source().with_env("KG_REDIS_PW", "hunter2");
        let r = load(&yaml, &src).unwrap().redis.unwrap();
        assert!(r.cluster);
        assert_eq!(r.urls.len(), 2);
        assert_eq!(r.password.unwrap().expose(), "hunter2");
        assert_eq!(r.prefix, "gw1:");
        assert_eq!(r.timeout, Duration::from_millis(20));
        assert_eq!(r.instances, 3);
    }

    #[test]
    fn redis_mistakes_are_named() {
        let cases = [
            (
                "url: \"http://127.0.0.1:6379\"",
                "redis.url",
                "scheme \"http\" is not redis:// or rediss://",
            ),
            ("url: \"redis://\"", "redis.url", "names no host"),
            (
                "url: \"redis://127.0.0.1/x\"",
                "redis.url",
                "database \"x\" is not a number",
            ),
            ("url: []", "redis.url", "lists no cluster node"),
            (
                "url: [\"redis://a:1\", \"redis://b:1/3\"]",
                "redis.url[1]",
                "a cluster node has only database 0",
            ),
            (
                "url: \"redis://127.0.0.1\"\n  prefix: \"\"",
                "redis.prefix",
                "must be 1 to 64 characters",
            ),
            (
                "url: \"redis://127.0.0.1\"\n  prefix: \"a{b}\"",
                "redis.prefix",
                "must not contain spaces, control characters, `{`, `}` or `*`",
            ),
            (
                "url: \"redis://127.0.0.1\"\n  timeout: 0s",
                "redis.timeout",
                "must be between 1ms and 5s",
            ),
            (
                "url: \"redis://127.0.0.1\"\n  timeout: 10s",
                "redis.timeout",
                "must be between 1ms and 5s",
            ),
            (
                "url: \"redis://127.0.0.1\"\n  instances: 0",
                "redis.instances",
                "must be between 1 and 1000",
            ),
            (
                "url: \"redis://127.0.0.1\"\n  password_env: KG_UNSET",
                "redis.password_env",
                "environment variable KG_UNSET is not set",
            ),
        ];
        for (section, field, reason) in cases {
            expect_error(
                &with_top(&format!("redis:\n  {section}")),
                &source(),
                field,
                reason,
            );
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_being_echoed() {
        let err = error_of(
            &with_top("redis: { url: \"redis://:sekrit-pw@127.0.0.1:6379\" }"),
            &source(),
        );
        assert_eq!(err.field, "redis.url");
        assert!(err.reason.contains("password_env"), "{err}");
        assert!(!err.to_string().contains("sekrit"), "{err}");
    }
}
