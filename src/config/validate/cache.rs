//! `cache:` on a route and the global `cache_store:`: the response cache's settings.

use super::{Ctx, RouteConfig, Scope};
use crate::cache::{CachePolicy, DEFAULT_MAX_ENTRY, DEFAULT_MEMORY, DEFAULT_TTL, MAX_MAX_ENTRY};
use crate::config::types::{CacheStoreFile, RouteCacheFile};
use crate::config::ConfigError;
use std::time::Duration;

/// Longest `ttl` accepted: answers older than a month are no longer worth trusting.
const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);

/// A route's `cache:`.
pub(super) fn route_cache(at: &Scope, c: &RouteCacheFile) -> Result<CachePolicy, ConfigError> {
    let ttl = c.ttl.map_or(DEFAULT_TTL, |d| d.0);
    if ttl < Duration::from_secs(1) {
        return Err(at.err("ttl", "must be at least 1s"));
    }
    if ttl > MAX_TTL {
        return Err(at.err("ttl", "must be at most 30 days (720h)"));
    }
    let max_entry = match c.max_entry {
        None => DEFAULT_MAX_ENTRY,
        Some(s) => usize::try_from(s.0).unwrap_or(usize::MAX),
    };
    if max_entry == 0 {
        return Err(at.err("max_entry", "must be greater than zero"));
    }
    if max_entry > MAX_MAX_ENTRY {
        let reason = format!(
            "{max_entry} bytes is too large (at most 64MiB: a miss holds its answer in memory until it ends)"
        );
        return Err(at.err("max_entry", reason));
    }
    Ok(CachePolicy {
        ttl,
        max_entry,
        shared: c.shared.unwrap_or(false),
        only_deterministic: c.only_deterministic.unwrap_or(false),
        charge_hits: c.charge_hits.unwrap_or(false),
    })
}

/// `cache_store:`: the in-memory store's size, large enough for every route's `max_entry`, and
/// whether answers are shared through Redis (which needs the `redis:` section).
pub(super) fn cache_store(
    cx: &Ctx,
    store: Option<&CacheStoreFile>,
    routes: &[RouteConfig],
    has_redis: bool,
) -> Result<(u64, bool), ConfigError> {
    let shared = store.and_then(|s| s.redis).unwrap_or(false);
    if shared && !has_redis {
        let reason = "needs the `redis:` section (the server the instances share answers through)";
        return Err(cx.err("cache_store.redis", reason));
    }
    let memory = store.and_then(|s| s.memory).map_or(DEFAULT_MEMORY, |m| m.0);
    if memory == 0 {
        return Err(cx.err("cache_store.memory", "must be greater than zero"));
    }
    for (i, r) in routes.iter().enumerate() {
        let Some(policy) = r.cache.as_ref() else {
            continue;
        };
        if policy.max_entry as u64 > memory {
            let reason = format!(
                "{} bytes is larger than the whole store (cache_store.memory: {memory} bytes)",
                policy.max_entry
            );
            return Err(cx.err(format!("routes[{i}].cache.max_entry"), reason));
        }
    }
    Ok((memory, shared))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_route_without_cache_caches_nothing_and_the_store_has_its_default() {
        let c = load(&with_top(""), &source()).unwrap();
        assert!(c.routes[0].cache.is_none());
        assert_eq!(c.cache_memory, DEFAULT_MEMORY);
    }

    #[test]
    fn an_empty_cache_section_takes_the_defaults() {
        let c = load(&with_route("{ upstreams: [openai], cache: {} }"), &source()).unwrap();
        assert_eq!(c.routes[0].cache, Some(CachePolicy::default()));
    }

    #[test]
    fn every_cache_setting_is_read() {
        let yaml = config(
            "cache_store: { memory: 8MiB }",
            UPSTREAM,
            "{ upstreams: [openai], cache: { ttl: 10m, max_entry: 64KiB, shared: true, only_deterministic: true, charge_hits: true } }",
        );
        let c = load(&yaml, &source()).unwrap();
        assert_eq!(c.cache_memory, 8 << 20);
        assert_eq!(
            c.routes[0].cache,
            Some(CachePolicy {
                ttl: Duration::from_secs(600),
                max_entry: 64 << 10,
                shared: true,
                only_deterministic: true,
                charge_hits: true,
            })
        );
    }

    #[test]
    fn cache_mistakes_are_named() {
        let src = source();
        let route = |c: &str| with_route(&format!("{{ upstreams: [openai], cache: {c} }}"));
        let cases = [
            (route("{ ttl: 0s }"), "routes[0].cache.ttl", "must be at least 1s"),
            (route("{ ttl: 900ms }"), "routes[0].cache.ttl", "must be at least 1s"),
            (route("{ ttl: 31days }"), "routes[0].cache.ttl", "must be at most 30 days (720h)"),
            (route("{ max_entry: 0 }"), "routes[0].cache.max_entry", "must be greater than zero"),
            (
                route("{ max_entry: 65MiB }"),
                "routes[0].cache.max_entry",
                "68157440 bytes is too large (at most 64MiB: a miss holds its answer in memory until it ends)",
            ),
            (
                config("cache_store: { memory: 1MiB }", UPSTREAM, "{ upstreams: [openai], cache: { max_entry: 2MiB } }"),
                "routes[0].cache.max_entry",
                "2097152 bytes is larger than the whole store (cache_store.memory: 1048576 bytes)",
            ),
            (with_top("cache_store: { memory: 0 }"), "cache_store.memory", "must be greater than zero"),
            (
                with_top("cache_store: { redis: true }"),
                "cache_store.redis",
                "needs the `redis:` section (the server the instances share answers through)",
            ),
            (
                with_top("cache_store: redis"),
                "cache_store.redis",
                "needs the `redis:` section (the server the instances share answers through)",
            ),
        ];
        for (yaml, field, reason) in cases {
            expect_error(&yaml, &src, field, reason);
        }
    }

    #[test]
    fn a_redis_cache_store_shares_answers_through_the_redis_section() {
        let redis = "redis: { url: \"redis://127.0.0.1:6379\" }";
        for store in [
            "cache_store: redis",
            "cache_store: { memory: 8MiB, redis: true }",
        ] {
            let c = load(&with_top(&format!("{redis}\n{store}")), &source()).unwrap();
            assert!(c.cache_redis, "{store}");
        }
        let c = load(
            &with_top(&format!("{redis}\ncache_store: {{ redis: false }}")),
            &source(),
        )
        .unwrap();
        assert!(!c.cache_redis);
        assert!(
            !load(&with_top(redis), &source()).unwrap().cache_redis,
            "memory only by default"
        );
    }

    #[test]
    fn unknown_cache_fields_and_bad_values_are_parse_errors() {
        let src = source();
        let cases = [
            (
                with_route("{ upstreams: [openai], cache: { tll: 1h } }"),
                "routes[0].cache.tll",
                "unknown field `tll`",
            ),
            (
                with_route("{ upstreams: [openai], cache: { ttl: soon } }"),
                "routes[0].cache.ttl",
                "not a duration",
            ),
            (
                with_route("{ upstreams: [openai], cache: { shared: maybe } }"),
                "routes[0].cache.shared",
                "invalid type",
            ),
            (
                with_top("cache_store: { disk: 1GiB }"),
                "cache_store.disk",
                "unknown field `disk`",
            ),
            (
                with_top("cache_store: { memory: lots }"),
                "cache_store.memory",
                "not a size: \"lots\"",
            ),
            (
                with_top("cache_store: disk"),
                "cache_store",
                "unknown cache store \"disk\" (use `{ memory: 256MiB }` or `{ redis: true }`)",
            ),
            (
                with_top("cache_store: 5"),
                "cache_store",
                "expected `{ memory: SIZE }`",
            ),
        ];
        for (yaml, field, part) in cases {
            expect_error_containing(&yaml, &src, field, part);
        }
    }
}
