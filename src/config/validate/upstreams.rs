//! `upstreams:`: each API behind keygate, from its name, URL and keys to its tuning.

use super::keys::keys;
use super::upstream_policies as policy;
use super::upstream_url::base_url;
use super::{Ctx, UpstreamConfig};
use crate::config::types::UpstreamFile;
use crate::config::ConfigError;
use std::collections::BTreeMap;
use std::time::Duration;

/// The upstreams, in name order: at least one.
pub(super) fn upstreams(
    cx: &Ctx,
    map: &BTreeMap<String, UpstreamFile>,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    if map.is_empty() {
        return Err(cx.err("upstreams", "at least one upstream is needed"));
    }
    map.iter().map(|(name, u)| upstream(cx, name, u)).collect()
}

/// One upstream, its fields checked in the order the file documents them.
fn upstream(cx: &Ctx, name: &str, u: &UpstreamFile) -> Result<UpstreamConfig, ConfigError> {
    let at = cx.at(format!("upstreams.{name}"));
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(cx.err(
            format!("upstreams.{name}"),
            "an upstream name may use only letters, digits, '-', '_' and '.'",
        ));
    }
    let url = base_url(&at, &u.url)?;
    let keys = keys(&at, u)?;
    let cooldown = policy::cooldown(&at, u)?;
    let health_interval = policy::health_interval(&at, u)?;
    let resolve_every = policy::resolve_every(&at, u)?;
    let ca_certs = policy::ca_certs(&at, u, url.tls)?;
    let (probe_interval, probe_model) = policy::probe(&at, u)?;
    let keep_warm = policy::keep_warm(&at, u)?;
    let outlier = policy::outlier(&at, u)?;
    let affinity = super::affinity::upstream_affinity(&at, u)?;
    Ok(UpstreamConfig {
        affinity,
        name: name.to_string(),
        outlier,
        models: u.models.clone(),
        org_limit_pattern: u.org_limit_pattern.clone().filter(|p| !p.is_empty()),
        probe_interval,
        probe_model,
        keep_warm,
        tls: url.tls,
        host: url.host,
        port: url.port,
        host_header: url.host_header,
        base_path: url.base_path,
        auth: u.auth_style(),
        api: u.api,
        keys,
        key_policy: u.key_policy.unwrap_or_default(),
        rest_before_limit: u.rest_before_limit.unwrap_or(true),
        cooldown,
        health_interval,
        resolve_every,
        ca_certs,
        connect_timeout: u.connect_timeout.map_or(Duration::from_secs(10), |d| d.0),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use std::time::Duration;

    #[test]
    fn upstream_names_and_presence_are_checked() {
        let reason = "an upstream name may use only letters, digits, '-', '_' and '.'";
        for (name, field) in [
            ("\"open ai\"", "upstreams.open ai"),
            ("\"\"", "upstreams."),
            ("a/b", "upstreams.a/b"),
        ] {
            let yaml = format!(
                "listen: [ {{ addr: 127.0.0.1:8080 }} ]\nupstreams:\n  {name}: {{ url: http://127.0.0.1:9, auth: none }}\nroutes: [ {{ upstreams: [x] }} ]\n"
            );
            expect_error(&yaml, &source(), field, reason);
        }
        let none = "listen: [ { addr: 127.0.0.1:8080 } ]\nroutes: [ { upstreams: [x] } ]\n";
        expect_error(
            none,
            &source(),
            "upstreams",
            "at least one upstream is needed",
        );
        let empty = format!("upstreams: {{}}\n{none}");
        expect_error(
            &empty,
            &source(),
            "upstreams",
            "at least one upstream is needed",
        );
    }

    #[test]
    fn an_upstream_gets_defaults_for_what_is_not_said() {
        let config = load(&with_top(""), &source()).unwrap();
        let u = &config.upstreams[0];
        assert_eq!(u.name, "openai");
        assert_eq!(u.health_interval, Some(Duration::from_secs(10)));
        assert_eq!(u.resolve_every, Duration::from_secs(60));
        assert_eq!(u.connect_timeout, Duration::from_secs(10));
        assert_eq!(u.probe_interval, Duration::from_secs(300));
        assert_eq!(u.probe_model, "gpt-4o-mini");
        assert!(u.keep_warm.is_none() && u.ca_certs.is_none());
        let yaml = with_upstream("connect_timeout: 2s\norg_limit_pattern: \"\"\nmodels: [gpt-4o]");
        let u = &load(&yaml, &source()).unwrap().upstreams[0];
        assert_eq!(u.connect_timeout, Duration::from_secs(2));
        assert_eq!(u.org_limit_pattern, None);
        assert_eq!(u.models, vec!["gpt-4o".to_string()]);
    }

    #[test]
    fn an_anthropic_upstream_defaults_to_x_api_key_and_a_claude_probe() {
        use crate::config::{Api, AuthStyle};
        let u = &load(&with_top(""), &source()).unwrap().upstreams[0];
        assert_eq!((u.api, u.auth), (Api::Openai, AuthStyle::Bearer));
        let u = &load(&with_upstream("api: anthropic"), &source())
            .unwrap()
            .upstreams[0];
        assert_eq!((u.api, u.auth), (Api::Anthropic, AuthStyle::XApiKey));
        assert_eq!(
            u.probe_model,
            super::super::upstream_policies::DEFAULT_ANTHROPIC_PROBE_MODEL
        );
        let yaml = with_upstream("api: anthropic\nauth: bearer\nprobe_model: claude-x");
        let u = &load(&yaml, &source()).unwrap().upstreams[0];
        assert_eq!((u.api, u.auth), (Api::Anthropic, AuthStyle::Bearer));
        assert_eq!(u.probe_model, "claude-x");
        expect_error_containing(
            &with_upstream("api: gemini"),
            &source(),
            "upstreams.openai.api",
            "unknown variant `gemini`",
        );
    }
}
