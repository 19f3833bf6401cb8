//! Which route serves a request, by model pattern and/or path prefix, in config order.
//!
//! These types know nothing about the YAML config: the config module converts its routes into
//! [`RouteSpec`]s, so routing can be tested (and reasoned about) on its own.

use std::collections::HashMap;
use std::time::Duration;

use crate::glob::Glob;
use crate::retry_policy::RetryBudget;
use crate::strategy::RouteOrder;

/// One route, as the config describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Name for logs and metrics.
    pub name: String,
    /// Model patterns; empty means "any model, or none".
    pub models: Vec<Glob>,
    /// Path prefix, matched on whole path segments; `None` means any path.
    pub path_prefix: Option<String>,
    /// Upstream names in fallback order.
    pub upstreams: Vec<String>,
    /// Model name to send upstream instead of the one the client asked for.
    pub rewrite_model: Option<String>,
}

impl RouteSpec {
    /// Whether this route takes a request for `path` (query string already removed) and `model`.
    /// A route with model patterns never takes a request without a model.
    fn matches(&self, path: &str, model: Option<&str>) -> bool {
        if let Some(prefix) = &self.path_prefix {
            if !path_has_prefix(path, prefix) {
                return false;
            }
        }
        if self.models.is_empty() {
            return true;
        }
        model.is_some_and(|m| self.models.iter().any(|g| g.matches(m)))
    }

    /// Whether this is a catch-all route: neither models nor a path prefix.
    pub fn is_default(&self) -> bool {
        self.models.is_empty() && self.path_prefix.is_none()
    }

    /// Whether every model pattern is a literal, so the route can only match the names it lists.
    fn only_literal_models(&self) -> bool {
        !self.models.is_empty() && self.models.iter().all(Glob::is_literal)
    }
}

/// How a matched route serves its requests at run time.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Upstream indexes and the strategy that orders them per request.
    pub order: RouteOrder,
    /// How many attempts, for how long.
    pub budget: RetryBudget,
    /// Response-header timeout per attempt.
    pub ttfb_timeout: Duration,
    /// OpenAI chat completions translated for Anthropic upstreams, when the route says so.
    pub translate: Option<Translation>,
    /// The upstreams (indexes) whose key is chosen by prompt affinity for this route's
    /// requests that yield an affinity hash: the route's `affinity`, else each upstream's.
    pub affinity: Vec<usize>,
}

/// A route's translation of OpenAI chat completions into Anthropic messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// `max_tokens` sent when the client set none.
    pub default_max_tokens: u64,
}

/// The default of [`Translation::default_max_tokens`].
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Whether `path` lies under `prefix`, comparing whole segments: `/v1/embeddings` covers
/// `/v1/embeddings` and `/v1/embeddings/x` but not `/v1/embeddingsfoo`. A trailing `/` on the
/// prefix makes no difference, and `/` covers every path.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The request path without its query string or fragment.
fn strip_query(path: &str) -> &str {
    // memchr: a char-set `find` walks the path one char at a time, twice per request.
    memchr::memchr2(b'?', b'#', path.as_bytes()).map_or(path, |i| &path[..i])
}

/// The routes in config order, with an index that skips routes which cannot match a model.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<RouteSpec>,
    /// For each literal model name, the routes (ascending) whose patterns are all literals and
    /// include that name. Such a route cannot match any other model, so a lookup only has to try
    /// these plus `unindexed`.
    by_exact_model: HashMap<String, Vec<usize>>,
    /// Routes that may match models not listed literally (wildcards, or no model patterns), ascending.
    unindexed: Vec<usize>,
}

impl RouteTable {
    /// Builds the table; routes keep their order.
    pub fn new(routes: Vec<RouteSpec>) -> RouteTable {
        let mut by_exact_model: HashMap<String, Vec<usize>> = HashMap::new();
        let mut unindexed = Vec::new();
        for (idx, route) in routes.iter().enumerate() {
            if route.only_literal_models() {
                for glob in &route.models {
                    let list = by_exact_model.entry(glob.as_str().to_owned()).or_default();
                    // The same name listed twice in one route must not make it a candidate twice.
                    if list.last() != Some(&idx) {
                        list.push(idx);
                    }
                }
            } else {
                unindexed.push(idx);
            }
        }
        RouteTable {
            routes,
            by_exact_model,
            unindexed,
        }
    }

    /// The first route, in config order, whose path prefix (if any) covers the request path and whose
    /// model patterns (if any) match the model. A route with neither is a catch-all. A route with model
    /// patterns does not match a request without a model. The query string is ignored.
    /// Never allocates.
    pub fn route(&self, path: &str, model: Option<&str>) -> Option<(usize, &RouteSpec)> {
        let path = strip_query(path);
        let Some(model) = model else {
            // Without a model only routes without patterns can match; those are all in `unindexed`.
            return self.first_match(self.unindexed.iter().copied(), path, None);
        };
        let exact = self
            .by_exact_model
            .get(model)
            .map_or(&[][..], Vec::as_slice);
        // Merge the two ascending candidate lists so the first hit is also first in config order.
        let (mut a, mut b) = (exact.iter().peekable(), self.unindexed.iter().peekable());
        let merged = std::iter::from_fn(|| match (a.peek(), b.peek()) {
            (Some(&&x), Some(&&y)) if x < y => a.next().copied(),
            (_, Some(_)) => b.next().copied(),
            (Some(_), None) => a.next().copied(),
            (None, None) => None,
        });
        self.first_match(merged, path, Some(model))
    }

    fn first_match(
        &self,
        candidates: impl Iterator<Item = usize>,
        path: &str,
        model: Option<&str>,
    ) -> Option<(usize, &RouteSpec)> {
        candidates
            .map(|idx| (idx, &self.routes[idx]))
            .find(|(_, route)| route.matches(path, model))
    }

    /// The route at `idx`, as returned by [`RouteTable::route`].
    ///
    /// # Panics
    /// If `idx` is not below [`RouteTable::len`].
    pub fn get(&self, idx: usize) -> &RouteSpec {
        &self.routes[idx]
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes at all.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The routes in config order.
    pub fn iter(&self) -> std::slice::Iter<'_, RouteSpec> {
        self.routes.iter()
    }
}

impl<'a> IntoIterator for &'a RouteTable {
    type Item = &'a RouteSpec;
    type IntoIter = std::slice::Iter<'a, RouteSpec>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Last path segments (after any base such as `/v1` or `/openai/v1`) of the OpenAI endpoints that carry
/// the model in their body.
const MODEL_ENDPOINTS: [&str; 7] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/moderations",
    // Anthropic's Messages API. With `/v1` in front, so that OpenAI's Assistants
    // `POST /v1/threads/{id}/messages` (no model) is not taken for it.
    ANTHROPIC_ENDPOINTS[0],
    ANTHROPIC_ENDPOINTS[1],
];

/// Anthropic's endpoints that carry the model in their body: Messages and its token count.
const ANTHROPIC_ENDPOINTS: [&str; 2] = ["/v1/messages", "/v1/messages/count_tokens"];

/// Whether `path` is one of Anthropic's Messages endpoints (any base path in front, query string
/// ignored): its clients speak Anthropic's API, so keygate's own errors take Anthropic's shape.
pub fn is_anthropic_endpoint(path: &str) -> bool {
    let path = strip_query(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    ANTHROPIC_ENDPOINTS.iter().any(|e| path.ends_with(e))
}

/// Endpoint families whose every `POST /family/<action>` carries the model in its body.
const MODEL_FAMILIES: [&str; 2] = ["audio", "images"];

/// Endpoints whose `model` may be left out: the provider then picks its default
/// (`omni-moderation-latest`, `dall-e-2`).
const OPTIONAL_MODEL: [&str; 2] = ["/moderations", "/images/"];

/// The longest model name accepted (OpenAI's and Anthropic's are well under 100 bytes).
pub const MAX_MODEL_NAME: usize = 256;

/// What an endpoint's body says about the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelField {
    /// The body names the model and must: 400 when it does not.
    Required,
    /// The body may name the model; without one the request routes by path alone.
    Optional,
    /// The endpoint takes no model in its body.
    Absent,
}

/// Where a request to this endpoint carries its `model` (JSON, or a multipart form field for
/// audio and image uploads): chat/completions, completions, embeddings, responses, moderations,
/// audio/*, images/*. Used to answer 400 when such a body cannot be read, instead of routing it
/// blind. Only `POST` qualifies (`GET /v1/responses/{id}` has no body). Matches on the last path
/// segments, so a base path in front (`/v1`, `/openai/v1`) does not matter; the query string is
/// ignored.
pub fn model_field(method: &str, path: &str) -> ModelField {
    if !method.eq_ignore_ascii_case("POST") {
        return ModelField::Absent;
    }
    let path = strip_query(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    let carries = MODEL_ENDPOINTS.iter().any(|e| path.ends_with(e)) || {
        // `.../audio/transcriptions`, `.../images/generations`, ...: the segment before the last.
        path.rsplit_once('/').is_some_and(|(parent, action)| {
            let family = parent.rsplit_once('/').map_or(parent, |(_, f)| f);
            !action.is_empty() && MODEL_FAMILIES.contains(&family)
        })
    };
    if !carries {
        ModelField::Absent
    } else if OPTIONAL_MODEL
        .iter()
        .any(|e| path.ends_with(e) || path.contains(e))
    {
        ModelField::Optional
    } else {
        ModelField::Required
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(name: &str, models: &[&str], prefix: Option<&str>) -> RouteSpec {
        RouteSpec {
            name: name.to_owned(),
            models: models.iter().map(|m| Glob::new(m).unwrap()).collect(),
            path_prefix: prefix.map(str::to_owned),
            upstreams: vec![format!("{name}-up")],
            rewrite_model: None,
        }
    }

    fn name<'a>(t: &'a RouteTable, path: &str, model: Option<&str>) -> Option<&'a str> {
        t.route(path, model).map(|(_, r)| r.name.as_str())
    }

    const CHAT: &str = "/v1/chat/completions";

    #[test]
    fn first_matching_route_in_config_order_wins() {
        let t = RouteTable::new(vec![
            route("mini", &["gpt-4o-mini"], None),
            route("gpt4", &["gpt-4*"], None),
            route("exact-after-glob", &["gpt-4o"], None),
        ]);
        assert_eq!(name(&t, CHAT, Some("gpt-4o-mini")), Some("mini"));
        // `gpt-4*` comes first, so the later literal route never sees gpt-4o.
        assert_eq!(name(&t, CHAT, Some("gpt-4o")), Some("gpt4"));
        assert_eq!(name(&t, CHAT, Some("o1")), None);
        assert_eq!(t.route(CHAT, Some("gpt-4o")).unwrap().0, 1);
    }

    #[test]
    fn literal_route_listed_after_a_default_route_is_shadowed() {
        let t = RouteTable::new(vec![
            route("default", &[], None),
            route("exact", &["gpt-4o"], None),
        ]);
        assert_eq!(name(&t, CHAT, Some("gpt-4o")), Some("default"));
    }

    #[test]
    fn model_patterns_and_path_prefix_must_both_match() {
        let t = RouteTable::new(vec![
            route(
                "emb-small",
                &["text-embedding-3-small"],
                Some("/v1/embeddings"),
            ),
            route("chat-4", &["gpt-4*"], Some("/v1/chat")),
            route("emb", &[], Some("/v1/embeddings")),
        ]);
        assert_eq!(
            name(&t, "/v1/embeddings", Some("text-embedding-3-small")),
            Some("emb-small")
        );
        assert_eq!(
            name(&t, "/v1/embeddings", Some("text-embedding-3-large")),
            Some("emb")
        );
        assert_eq!(name(&t, CHAT, Some("gpt-4o")), Some("chat-4"));
        // Right model, wrong path.
        assert_eq!(name(&t, "/v1/completions", Some("gpt-4o")), None);
    }

    #[test]
    fn default_route_catches_what_nothing_else_takes() {
        let t = RouteTable::new(vec![
            route("gpt4", &["gpt-4*"], None),
            route("default", &[], None),
        ]);
        assert_eq!(name(&t, CHAT, Some("claude-3")), Some("default"));
        assert_eq!(name(&t, "/v1/models", None), Some("default"));
        assert!(t.get(1).is_default());
        assert!(!t.get(0).is_default());
    }

    #[test]
    fn request_without_model_skips_model_routes() {
        let t = RouteTable::new(vec![
            route("any", &["*"], None),
            route("files", &[], Some("/v1/files")),
            route("default", &[], None),
        ]);
        // Even `*` needs a model to match.
        assert_eq!(name(&t, "/v1/files/abc", None), Some("files"));
        assert_eq!(name(&t, "/v1/models", None), Some("default"));
        assert_eq!(name(&t, "/v1/models", Some("")), Some("any"));
    }

    #[test]
    fn path_prefix_matches_whole_segments_only() {
        let t = RouteTable::new(vec![route("emb", &[], Some("/v1/embeddings"))]);
        assert_eq!(name(&t, "/v1/embeddings", None), Some("emb"));
        assert_eq!(name(&t, "/v1/embeddings/x", None), Some("emb"));
        assert_eq!(name(&t, "/v1/embeddings/", None), Some("emb"));
        assert_eq!(name(&t, "/v1/embeddingsfoo", None), None);
        assert_eq!(name(&t, "/v1/embedding", None), None);
        assert_eq!(name(&t, "/v2/embeddings", None), None);
    }

    #[test]
    fn path_prefix_ignores_the_query_string() {
        let t = RouteTable::new(vec![route("emb", &[], Some("/v1/embeddings"))]);
        assert_eq!(name(&t, "/v1/embeddings?api-version=1", None), Some("emb"));
        assert_eq!(name(&t, "/v1/embeddingsfoo?x=/", None), None);
    }

    #[test]
    fn trailing_slash_on_prefix_and_root_prefix() {
        let t = RouteTable::new(vec![route("v1", &[], Some("/v1/"))]);
        assert_eq!(name(&t, "/v1", None), Some("v1"));
        assert_eq!(name(&t, "/v1/models", None), Some("v1"));
        assert_eq!(name(&t, "/v10/models", None), None);
        let root = RouteTable::new(vec![route("root", &[], Some("/"))]);
        assert_eq!(name(&root, "/anything/at/all", None), Some("root"));
    }

    #[test]
    fn same_literal_in_several_routes_respects_path_and_order() {
        let t = RouteTable::new(vec![
            route("a", &["m", "m"], Some("/a")),
            route("b", &["m"], Some("/b")),
            route("wild", &["m*"], None),
            route("c", &["m"], None),
        ]);
        assert_eq!(name(&t, "/a", Some("m")), Some("a"));
        assert_eq!(name(&t, "/b", Some("m")), Some("b"));
        assert_eq!(name(&t, "/c", Some("m")), Some("wild"));
    }

    #[test]
    fn empty_table_routes_nothing() {
        let t = RouteTable::new(vec![]);
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
        assert!(t.route(CHAT, Some("gpt-4o")).is_none());
    }

    #[test]
    fn iter_and_get_keep_config_order() {
        let t = RouteTable::new(vec![route("x", &[], None), route("y", &["m"], None)]);
        let names: Vec<&str> = t.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(t.get(1).name, "y");
        assert_eq!((&t).into_iter().count(), 2);
    }

    #[test]
    fn model_endpoints_need_a_model() {
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/audio/transcriptions",
            "/v1/audio/translations",
            "/v1/audio/speech",
            "/v1/chat/completions?stream=true",
            "/v1/chat/completions/",
            "/openai/v1/chat/completions",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/anthropic/v1/messages?beta=true",
        ] {
            assert_eq!(model_field("POST", path), ModelField::Required, "{path}");
        }
    }

    #[test]
    fn anthropic_endpoints_are_told_from_openai_thread_messages() {
        for path in [
            "/v1/messages",
            "/v1/messages/",
            "/v1/messages/count_tokens",
            "/relay/v1/messages?beta=true",
        ] {
            assert!(is_anthropic_endpoint(path), "{path}");
        }
        for path in [
            "/v1/threads/thread_1/messages",
            "/v1/chat/completions",
            "/v1/messages/batches",
            "/v1/messagesx",
        ] {
            assert!(!is_anthropic_endpoint(path), "{path}");
        }
        assert_eq!(
            model_field("POST", "/v1/threads/thread_1/messages"),
            ModelField::Absent
        );
    }

    #[test]
    fn moderations_and_images_may_leave_the_model_to_the_provider() {
        for path in [
            "/v1/moderations",
            "/v1/moderations/",
            "/v1/images/generations",
            "/v1/images/edits",
            "/openai/v1/images/variations",
        ] {
            assert_eq!(model_field("POST", path), ModelField::Optional, "{path}");
        }
    }

    #[test]
    fn other_endpoints_and_methods_do_not_need_a_model() {
        for (method, path) in [
            ("GET", "/v1/models"),
            ("GET", "/v1/responses/resp_123"),
            ("POST", "/v1/responses/resp_123/cancel"),
            ("GET", "/v1/chat/completions"),
            ("POST", "/v1/files"),
            ("POST", "/v1/batches"),
            ("POST", "/v1/audio"),
            ("POST", "/v1/audio/"),
            ("POST", "/v1/embeddingsfoo"),
            ("DELETE", "/v1/chat/completions/chatcmpl-1"),
        ] {
            assert_eq!(
                model_field(method, path),
                ModelField::Absent,
                "{method} {path}"
            );
        }
    }

    fn arb_route() -> impl Strategy<Value = RouteSpec> {
        (
            proptest::collection::vec(
                prop::sample::select(vec!["a", "b", "ab", "a*", "*b", "?"]),
                0..3,
            ),
            prop::option::of(prop::sample::select(vec!["/x", "/x/y", "/", "/z"])),
        )
            .prop_map(|(models, prefix)| route("r", &models, prefix))
    }

    proptest! {
        #[test]
        fn indexed_lookup_agrees_with_a_plain_scan(
            routes in proptest::collection::vec(arb_route(), 0..8),
            path in prop::sample::select(vec!["/x", "/x/y", "/xy", "/z/q", "/"]),
            model in prop::option::of(prop::sample::select(vec!["a", "b", "ab", "c", "ba"])),
        ) {
            let t = RouteTable::new(routes.clone());
            let expected = routes.iter().position(|r| r.matches(path, model));
            prop_assert_eq!(t.route(path, model).map(|(i, _)| i), expected);
        }
    }
}
