//! `routes:`: which requests go where, checked against the upstreams defined.

use super::{Ctx, RouteConfig, Scope, UpstreamConfig};
use crate::config::types::RouteFile;
use crate::config::Api;
use crate::config::ConfigError;
use crate::glob::Glob;
use crate::routes::{RouteSpec, Translation, DEFAULT_MAX_TOKENS};
use crate::strategy::{Strategy, DEFAULT_EXPLORE};
use std::time::Duration;

/// Default time to wait for an upstream's response header: the OpenAI SDK's own timeout.
pub const DEFAULT_TTFB_TIMEOUT: Duration = Duration::from_secs(600);
/// Default extra attempts after a failed one.
pub const DEFAULT_RETRIES: u32 = 2;

/// The routes: at least one, each naming upstreams that exist.
pub(super) fn routes(
    cx: &Ctx,
    list: &[RouteFile],
    upstreams: &[UpstreamConfig],
) -> Result<Vec<RouteConfig>, ConfigError> {
    if list.is_empty() {
        return Err(cx.err(
            "routes",
            "at least one route is needed, e.g. `- { upstreams: [openai] }` as a catch-all",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| route(&cx.at(format!("routes[{i}]")), i, r, upstreams))
        .collect()
}

/// One route, `i`-th in the file.
fn route(
    at: &Scope,
    i: usize,
    r: &RouteFile,
    upstreams: &[UpstreamConfig],
) -> Result<RouteConfig, ConfigError> {
    let idx = upstream_indexes(at, r, upstreams)?;
    let translate = translation(at, r, &idx, upstreams)?;
    let mut models = Vec::new();
    for (j, m) in r.models.iter().enumerate() {
        models.push(Glob::new(m).map_err(|e| at.err(&format!("models[{j}]"), e.to_string()))?);
    }
    if let Some(p) = r.path_prefix.as_ref().filter(|p| !p.starts_with('/')) {
        return Err(at.err("path_prefix", format!("must start with '/': {p:?}")));
    }
    if r.rewrite_model
        .as_ref()
        .is_some_and(|m| m.trim().is_empty())
    {
        return Err(at.err("rewrite_model", "must not be empty"));
    }
    let retries = r.retries.unwrap_or(DEFAULT_RETRIES);
    if retries > 10 {
        return Err(at.err("retries", format!("{retries} is too many (at most 10)")));
    }
    let ttfb_timeout = r.ttfb_timeout.map_or(DEFAULT_TTFB_TIMEOUT, |d| d.0);
    if ttfb_timeout.is_zero() {
        return Err(at.err("ttfb_timeout", "must be greater than zero"));
    }
    let strategy = r.strategy.unwrap_or_default();
    check_weights(at, r, strategy)?;
    let explore = explore(at, r, strategy)?;
    let deadline = r.deadline.map(|d| d.0);
    if deadline.is_some_and(|d| d.is_zero()) {
        return Err(at.err("deadline", "must be greater than zero"));
    }
    let cache = match &r.cache {
        None => None,
        Some(c) => Some(super::cache::route_cache(&at.nested("cache"), c)?),
    };
    let affinity = super::affinity::route_affinity(at, r, &idx, upstreams)?;
    Ok(RouteConfig {
        affinity,
        cache,
        deadline,
        strategy,
        weights: r.weights.clone(),
        explore,
        spec: RouteSpec {
            name: r.name.clone().unwrap_or_else(|| format!("route-{i}")),
            models,
            path_prefix: r.path_prefix.clone(),
            upstreams: r.upstreams.clone(),
            rewrite_model: r.rewrite_model.clone(),
        },
        upstreams: idx,
        translate,
        retries,
        ttfb_timeout,
    })
}

/// The route's upstreams as indexes into `upstreams`: each defined, none twice.
fn upstream_indexes(
    at: &Scope,
    r: &RouteFile,
    upstreams: &[UpstreamConfig],
) -> Result<Vec<usize>, ConfigError> {
    if r.upstreams.is_empty() {
        return Err(at.err("upstreams", "empty: name at least one upstream"));
    }
    let mut idx = Vec::new();
    for (j, name) in r.upstreams.iter().enumerate() {
        let field = format!("upstreams[{j}]");
        let Some(pos) = upstreams.iter().position(|u| &u.name == name) else {
            let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            let reason = format!("unknown upstream {name:?} (defined: {})", known.join(", "));
            return Err(at.err(&field, reason));
        };
        if idx.contains(&pos) {
            return Err(at.err(&field, format!("{name:?} is listed twice")));
        }
        idx.push(pos);
    }
    Ok(idx)
}

/// A route's upstreams speak one API: a fallback from Anthropic to OpenAI would send a Messages
/// body to an OpenAI server. `translate: openai` needs Anthropic upstreams.
fn translation(
    at: &Scope,
    r: &RouteFile,
    idx: &[usize],
    upstreams: &[UpstreamConfig],
) -> Result<Option<Translation>, ConfigError> {
    let first = idx.first().map(|&i| upstreams[i].api);
    if let Some(j) = idx.iter().position(|&i| Some(upstreams[i].api) != first) {
        return Err(at.err(
            &format!("upstreams[{j}]"),
            "speaks another API than the route's first upstream (`api:`); \
             a route's upstreams must all speak the same API",
        ));
    }
    let Some(kind) = r.translate.as_deref() else {
        if r.default_max_tokens.is_some() {
            return Err(at.err("default_max_tokens", "only used with `translate: openai`"));
        }
        return Ok(None);
    };
    if kind != "openai" {
        return Err(at.err(
            "translate",
            format!(
                "{kind:?}: the one translation is `openai` (OpenAI clients, Anthropic upstreams)"
            ),
        ));
    }
    if first != Some(Api::Anthropic) {
        return Err(at.err(
            "translate",
            "`openai` translates for Anthropic upstreams: give the route upstreams with `api: anthropic`",
        ));
    }
    let default_max_tokens = r.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if default_max_tokens == 0 {
        return Err(at.err("default_max_tokens", "must be greater than zero"));
    }
    Ok(Some(Translation { default_max_tokens }))
}

/// `weights`: only for `weighted`, one per upstream, not all zero.
fn check_weights(at: &Scope, r: &RouteFile, strategy: Strategy) -> Result<(), ConfigError> {
    if r.weights.is_empty() {
        return Ok(());
    }
    if strategy != Strategy::Weighted {
        return Err(at.err("weights", "only used with `strategy: weighted`"));
    }
    if r.weights.len() != r.upstreams.len() {
        let reason = format!(
            "{} weights for {} upstreams: give one per upstream",
            r.weights.len(),
            r.upstreams.len()
        );
        return Err(at.err("weights", reason));
    }
    if r.weights.iter().all(|w| *w == 0) {
        return Err(at.err("weights", "at least one weight must be above 0"));
    }
    Ok(())
}

/// `explore`: a share between 0 and 1, only for `fastest`.
fn explore(at: &Scope, r: &RouteFile, strategy: Strategy) -> Result<f64, ConfigError> {
    let explore = r.explore.unwrap_or(DEFAULT_EXPLORE);
    if !(0.0..=1.0).contains(&explore) {
        return Err(at.err("explore", format!("{explore} is not between 0 and 1")));
    }
    if r.explore.is_some() && strategy != Strategy::Fastest {
        return Err(at.err("explore", "only used with `strategy: fastest`"));
    }
    Ok(explore)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use crate::routes::{Translation, DEFAULT_MAX_TOKENS};
    use crate::strategy::Strategy;
    use std::time::Duration;

    #[test]
    fn route_mistakes_are_named() {
        let cases = [
            (
                "{ upstreams: [] }",
                "routes[0].upstreams",
                "empty: name at least one upstream",
            ),
            (
                "{ upstreams: [opnai] }",
                "routes[0].upstreams[0]",
                "unknown upstream \"opnai\" (defined: openai)",
            ),
            (
                "{ upstreams: [openai, openai] }",
                "routes[0].upstreams[1]",
                "\"openai\" is listed twice",
            ),
            (
                "{ models: [\"\"], upstreams: [openai] }",
                "routes[0].models[0]",
                "model pattern is empty",
            ),
            (
                "{ path_prefix: v1/embeddings, upstreams: [openai] }",
                "routes[0].path_prefix",
                "must start with '/': \"v1/embeddings\"",
            ),
            (
                "{ rewrite_model: \" \", upstreams: [openai] }",
                "routes[0].rewrite_model",
                "must not be empty",
            ),
            (
                "{ retries: 11, upstreams: [openai] }",
                "routes[0].retries",
                "11 is too many (at most 10)",
            ),
            (
                "{ ttfb_timeout: 0s, upstreams: [openai] }",
                "routes[0].ttfb_timeout",
                "must be greater than zero",
            ),
        ];
        for (route, field, reason) in cases {
            expect_error(&with_route(route), &source(), field, reason);
        }
        let missing = config("", UPSTREAM, "").replace("routes:\n  - \n", "");
        expect_error(
            &missing,
            &source(),
            "routes",
            "at least one route is needed, e.g. `- { upstreams: [openai] }` as a catch-all",
        );
    }

    #[test]
    fn strategy_and_deadline_settings_are_checked() {
        let cases = [
            (
                "{ upstreams: [openai], weights: [1] }",
                "routes[0].weights",
                "only used with `strategy: weighted`",
            ),
            (
                "{ upstreams: [openai], strategy: weighted, weights: [1, 2] }",
                "routes[0].weights",
                "2 weights for 1 upstreams: give one per upstream",
            ),
            (
                "{ upstreams: [openai], strategy: weighted, weights: [0] }",
                "routes[0].weights",
                "at least one weight must be above 0",
            ),
            (
                "{ upstreams: [openai], strategy: fastest, explore: 1.5 }",
                "routes[0].explore",
                "1.5 is not between 0 and 1",
            ),
            (
                "{ upstreams: [openai], strategy: fastest, explore: -0.1 }",
                "routes[0].explore",
                "-0.1 is not between 0 and 1",
            ),
            (
                "{ upstreams: [openai], explore: 0.1 }",
                "routes[0].explore",
                "only used with `strategy: fastest`",
            ),
            (
                "{ upstreams: [openai], deadline: 0s }",
                "routes[0].deadline",
                "must be greater than zero",
            ),
        ];
        for (route, field, reason) in cases {
            expect_error(&with_route(route), &source(), field, reason);
        }
    }

    #[test]
    fn translation_needs_anthropic_upstreams_and_a_positive_default() {
        let claude = "  claude:\n    url: http://127.0.0.1:9\n    api: anthropic\n    keys: [ { name: c, env: KG_TEST_KEY } ]\nroutes:";
        let yaml = |route: &str| with_route(route).replace("routes:", claude);
        expect_error_containing(
            &yaml("{ upstreams: [openai], translate: openai }"),
            &source(),
            "routes[0].translate",
            "give the route upstreams with `api: anthropic`",
        );
        expect_error_containing(
            &yaml("{ upstreams: [claude], translate: gemini }"),
            &source(),
            "routes[0].translate",
            "the one translation is `openai`",
        );
        expect_error_containing(
            &yaml("{ upstreams: [claude], translate: openai, default_max_tokens: 0 }"),
            &source(),
            "routes[0].default_max_tokens",
            "must be greater than zero",
        );
        expect_error_containing(
            &yaml("{ upstreams: [claude], default_max_tokens: 5 }"),
            &source(),
            "routes[0].default_max_tokens",
            "only used with `translate: openai`",
        );
        let config = load(
            &yaml("{ upstreams: [claude], translate: openai }"),
            &source(),
        )
        .unwrap();
        assert_eq!(
            config.routes[0].translate,
            Some(Translation {
                default_max_tokens: DEFAULT_MAX_TOKENS
            })
        );
        assert_eq!(
            load(&with_route(ROUTE), &source()).unwrap().routes[0].translate,
            None
        );
    }

    #[test]
    fn a_route_may_not_mix_apis() {
        let yaml = with_route("{ upstreams: [openai, claude] }").replace(
            "routes:",
            "  claude:\n    url: http://127.0.0.1:9\n    api: anthropic\n    keys: [ { name: c, env: KG_TEST_KEY } ]\nroutes:",
        );
        expect_error_containing(
            &yaml,
            &source(),
            "routes[0].upstreams[1]",
            "speaks another API than the route's first upstream",
        );
        let same = yaml.replace("[openai, claude]", "[claude]");
        assert!(load(&same, &source()).is_ok());
    }

    #[test]
    fn the_second_route_is_named_by_its_index() {
        let yaml = with_route("{ upstreams: [openai] }\n  - { upstreams: [nope] }");
        expect_error(
            &yaml,
            &source(),
            "routes[1].upstreams[0]",
            "unknown upstream \"nope\" (defined: openai)",
        );
    }

    #[test]
    fn routes_get_defaults_and_their_settings() {
        let config = load(&with_route(ROUTE), &source()).unwrap();
        let r = &config.routes[0];
        assert_eq!(r.spec.name, "route-0");
        assert_eq!((r.retries, r.ttfb_timeout), (2, Duration::from_secs(600)));
        assert_eq!((r.strategy, r.deadline), (Strategy::Fallback, None));
        let yaml = with_route(
            "{ name: chat, upstreams: [openai], strategy: fastest, explore: 0.2, retries: 0, deadline: 30s }",
        );
        let config = load(&yaml, &source()).unwrap();
        let r = &config.routes[0];
        assert_eq!(
            (r.spec.name.as_str(), r.explore, r.retries),
            ("chat", 0.2, 0)
        );
        assert_eq!(r.deadline, Some(Duration::from_secs(30)));
        assert_eq!(r.upstreams, vec![0]);
    }
}
