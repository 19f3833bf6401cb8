//! `affinity:` on an upstream or a route: prompt-cache affinity needs keys to choose among.

use super::{Scope, UpstreamConfig};
use crate::config::types::{RouteFile, UpstreamFile};
use crate::config::{AuthStyle, ConfigError};
use crate::keys::Affinity;

/// An upstream's `affinity` (default `none`); `prompt` needs keys, so not `auth: none`.
pub(super) fn upstream_affinity(at: &Scope, u: &UpstreamFile) -> Result<Affinity, ConfigError> {
    let affinity = u.affinity.unwrap_or_default();
    if affinity == Affinity::Prompt && u.auth_style() == AuthStyle::None {
        return Err(at.err(
            "affinity",
            "`prompt` chooses among the upstream's keys, and with `auth: none` it has none",
        ));
    }
    Ok(affinity)
}

/// A route's `affinity` (unset: each upstream's own); `prompt` needs an upstream with keys
/// among the route's (`idx`, indexes into `upstreams`).
pub(super) fn route_affinity(
    at: &Scope,
    r: &RouteFile,
    idx: &[usize],
    upstreams: &[UpstreamConfig],
) -> Result<Option<Affinity>, ConfigError> {
    if r.affinity == Some(Affinity::Prompt)
        && idx.iter().all(|&i| upstreams[i].auth == AuthStyle::None)
    {
        return Err(at.err(
            "affinity",
            "`prompt` chooses among keys, and every upstream of this route is `auth: none`",
        ));
    }
    Ok(r.affinity)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const KEYLESS: &str = "url: http://127.0.0.1:9\nauth: none";

    #[test]
    fn affinity_defaults_to_none_and_a_route_inherits_by_leaving_it_unset() {
        let c = load(&with_top(""), &source()).unwrap();
        assert_eq!(c.upstreams[0].affinity, Affinity::None);
        assert_eq!(c.routes[0].affinity, None);
        let c = load(&with_upstream("affinity: prompt"), &source()).unwrap();
        assert_eq!(c.upstreams[0].affinity, Affinity::Prompt);
        let c = load(
            &with_route("{ upstreams: [openai], affinity: prompt }"),
            &source(),
        )
        .unwrap();
        assert_eq!(c.routes[0].affinity, Some(Affinity::Prompt));
        let c = load(
            &with_route("{ upstreams: [openai], affinity: none }"),
            &source(),
        )
        .unwrap();
        assert_eq!(c.routes[0].affinity, Some(Affinity::None));
    }

    #[test]
    fn an_unknown_affinity_is_named_with_its_field() {
        expect_error_containing(
            &with_upstream("affinity: prefix"),
            &source(),
            "upstreams.openai.affinity",
            "unknown variant `prefix`, expected `none` or `prompt`",
        );
        expect_error_containing(
            &with_route("{ upstreams: [openai], affinity: Prompt }"),
            &source(),
            "routes[0].affinity",
            "unknown variant `Prompt`",
        );
        expect_error_containing(
            &with_upstream("affinity: [prompt]"),
            &source(),
            "upstreams.openai.affinity",
            "invalid type: sequence",
        );
    }

    #[test]
    fn prompt_affinity_on_an_upstream_without_keys_is_refused() {
        expect_error(
            &config("", &format!("{KEYLESS}\naffinity: prompt"), ROUTE),
            &source(),
            "upstreams.openai.affinity",
            "`prompt` chooses among the upstream's keys, and with `auth: none` it has none",
        );
        // `none` says nothing to refuse.
        assert!(load(
            &config("", &format!("{KEYLESS}\naffinity: none"), ROUTE),
            &source()
        )
        .is_ok());
    }

    #[test]
    fn prompt_affinity_on_a_route_needs_an_upstream_with_keys() {
        expect_error(
            &config("", KEYLESS, "{ upstreams: [openai], affinity: prompt }"),
            &source(),
            "routes[0].affinity",
            "`prompt` chooses among keys, and every upstream of this route is `auth: none`",
        );
        assert!(load(
            &config("", KEYLESS, "{ upstreams: [openai], affinity: none }"),
            &source()
        )
        .is_ok());
    }
}
