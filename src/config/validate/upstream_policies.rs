//! An upstream's tuning: cooldown, health checks, DNS refresh, CA file, probes, keep-warm, outliers.

use super::{KeepWarm, Scope};
use crate::config::source::ConfigSource;
use crate::config::types::{Api, UpstreamFile};
use crate::config::ConfigError;
use crate::keys::CooldownPolicy;
use crate::outlier::OutlierPolicy;
use std::path::Path;
use std::time::Duration;

/// `cooldown`: defaults filled in; `base` above zero and not above `max_backoff`.
pub(super) fn cooldown(at: &Scope, u: &UpstreamFile) -> Result<CooldownPolicy, ConfigError> {
    let defaults = CooldownPolicy::default();
    let cooldown = match &u.cooldown {
        None => defaults,
        Some(c) => CooldownPolicy {
            base: c.base.map_or(defaults.base, |d| d.0),
            max_backoff: c.max_backoff.map_or(defaults.max_backoff, |d| d.0),
            max: c.max.map_or(defaults.max, |d| d.0),
        },
    };
    if cooldown.base.is_zero() {
        return Err(at.err("cooldown.base", "must be greater than zero"));
    }
    if cooldown.max_backoff < cooldown.base {
        return Err(at.err(
            "cooldown.max_backoff",
            "must not be shorter than cooldown.base",
        ));
    }
    Ok(cooldown)
}

/// `health`: the check interval (default 10s, at least 100ms), or `None` when turned off.
pub(super) fn health_interval(
    at: &Scope,
    u: &UpstreamFile,
) -> Result<Option<Duration>, ConfigError> {
    let interval = match &u.health {
        Some(h) if h.enabled == Some(false) => None,
        Some(h) => Some(h.interval.map_or(Duration::from_secs(10), |d| d.0)),
        None => Some(Duration::from_secs(10)),
    };
    if interval.is_some_and(|d| d < Duration::from_millis(100)) {
        return Err(at.err("health.interval", "must be at least 100ms"));
    }
    Ok(interval)
}

/// `resolve_every`: default 60s, at least 1s.
pub(super) fn resolve_every(at: &Scope, u: &UpstreamFile) -> Result<Duration, ConfigError> {
    let every = u.resolve_every.map_or(Duration::from_secs(60), |d| d.0);
    if every < Duration::from_secs(1) {
        return Err(at.err("resolve_every", "must be at least 1s"));
    }
    Ok(every)
}

/// `ca_file`: only for https; every certificate in it must parse.
pub(super) fn ca_certs(
    at: &Scope,
    u: &UpstreamFile,
    tls: bool,
) -> Result<Option<Vec<Vec<u8>>>, ConfigError> {
    let Some(p) = &u.ca_file else { return Ok(None) };
    if !tls {
        return Err(at.err("ca_file", "is set but the url is not https"));
    }
    let certs = load_ca(at.cx.source, &at.cx.resolve(p)).map_err(|e| at.err("ca_file", e))?;
    Ok(Some(certs))
}

/// Reads PEM certificates and checks each one parses, so a bad file fails here, not per request.
fn load_ca(source: &dyn ConfigSource, path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let data = source
        .read(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    let mut store = tokio_rustls::rustls::RootCertStore::empty();
    for item in rustls_pemfile::certs(&mut data.as_slice()) {
        let der =
            item.map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
        store
            .add(der.clone())
            .map_err(|e| format!("{}: unusable certificate: {e}", path.display()))?;
        certs.push(der.to_vec());
    }
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// The default `probe_model` of an `api: anthropic` upstream: the cheapest current model.
pub const DEFAULT_ANTHROPIC_PROBE_MODEL: &str = "claude-3-5-haiku-latest";

/// `probe_interval` (default 5m, at least 100ms) and `probe_model` (default `gpt-4o-mini`, or
/// [`DEFAULT_ANTHROPIC_PROBE_MODEL`] with `api: anthropic`).
pub(super) fn probe(at: &Scope, u: &UpstreamFile) -> Result<(Duration, String), ConfigError> {
    let interval = u.probe_interval.map_or(Duration::from_secs(300), |d| d.0);
    if interval < Duration::from_millis(100) {
        return Err(at.err("probe_interval", "must be at least 100ms"));
    }
    let model = u.probe_model.clone().unwrap_or_else(|| match u.api {
        Api::Openai => "gpt-4o-mini".to_string(),
        Api::Anthropic => DEFAULT_ANTHROPIC_PROBE_MODEL.to_string(),
    });
    if model.trim().is_empty() {
        return Err(at.err("probe_model", "must not be empty"));
    }
    Ok((interval, model))
}

/// `keep_warm`: at least 1s idle, a path starting with `/`, a JSON body if any.
pub(super) fn keep_warm(at: &Scope, u: &UpstreamFile) -> Result<Option<KeepWarm>, ConfigError> {
    let Some(k) = &u.keep_warm else {
        return Ok(None);
    };
    if k.every.0 < Duration::from_secs(1) {
        return Err(at.err("keep_warm.every", "must be at least 1s"));
    }
    let path = k.path.clone().unwrap_or_else(|| "/v1/models".to_string());
    if !path.starts_with('/') {
        return Err(at.err("keep_warm.path", format!("must start with '/': {path:?}")));
    }
    if let Some(b) = &k.body {
        serde_json::from_str::<serde_json::Value>(b)
            .map_err(|e| at.err("keep_warm.body", format!("not JSON: {e}")))?;
    }
    Ok(Some(KeepWarm {
        every: k.every.0,
        path,
        body: k.body.clone(),
    }))
}

/// `outlier`: defaults filled in; at least one failure, a percentage, max not below base.
pub(super) fn outlier(at: &Scope, u: &UpstreamFile) -> Result<OutlierPolicy, ConfigError> {
    let d = OutlierPolicy::default();
    let outlier = match &u.outlier {
        None => d,
        Some(o) => OutlierPolicy {
            consecutive: o.consecutive.unwrap_or(d.consecutive),
            base_ejection: o.base_ejection.map_or(d.base_ejection, |x| x.0),
            max_ejection: o.max_ejection.map_or(d.max_ejection, |x| x.0),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
            count: o.count.unwrap_or(d.count),
        },
    };
    if outlier.consecutive == 0 {
        return Err(at.err("outlier.consecutive", "must be at least 1"));
    }
    if outlier.max_ejection_percent > 100 {
        return Err(at.err("outlier.max_ejection_percent", "must be between 0 and 100"));
    }
    if outlier.max_ejection < outlier.base_ejection {
        return Err(at.err(
            "outlier.max_ejection",
            "must not be shorter than base_ejection",
        ));
    }
    Ok(outlier)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use crate::outlier::FailureCount;
    use std::time::Duration;

    #[test]
    fn tuning_mistakes_are_named() {
        let cases = [
            (
                "cooldown: { base: 0s }",
                "cooldown.base",
                "must be greater than zero",
            ),
            (
                "cooldown: { base: 10s, max_backoff: 5s }",
                "cooldown.max_backoff",
                "must not be shorter than cooldown.base",
            ),
            (
                "health: { interval: 99ms }",
                "health.interval",
                "must be at least 100ms",
            ),
            (
                "resolve_every: 999ms",
                "resolve_every",
                "must be at least 1s",
            ),
            (
                "ca_file: ca.pem",
                "ca_file",
                "is set but the url is not https",
            ),
            (
                "probe_interval: 99ms",
                "probe_interval",
                "must be at least 100ms",
            ),
            ("probe_model: \" \"", "probe_model", "must not be empty"),
            (
                "keep_warm: { every: 999ms }",
                "keep_warm.every",
                "must be at least 1s",
            ),
            (
                "keep_warm: { every: 1m, path: v1/models }",
                "keep_warm.path",
                "must start with '/': \"v1/models\"",
            ),
            (
                "outlier: { consecutive: 0 }",
                "outlier.consecutive",
                "must be at least 1",
            ),
            (
                "outlier: { max_ejection_percent: 101 }",
                "outlier.max_ejection_percent",
                "must be between 0 and 100",
            ),
            (
                "outlier: { base_ejection: 60s, max_ejection: 30s }",
                "outlier.max_ejection",
                "must not be shorter than base_ejection",
            ),
        ];
        for (extra, field, reason) in cases {
            let field = format!("upstreams.openai.{field}");
            expect_error(&with_upstream(extra), &source(), &field, reason);
        }
        expect_error_containing(
            &with_upstream("keep_warm: { every: 1m, body: \"{model: x}\" }"),
            &source(),
            "upstreams.openai.keep_warm.body",
            "not JSON: key must be a string",
        );
    }

    #[test]
    fn tuning_values_and_defaults_are_kept() {
        let extra = "cooldown: { base: 2s }\nhealth: { enabled: false, interval: 1ms }\nkeep_warm: { every: 1s, body: \"{}\" }\noutlier: { consecutive: 1, max_ejection_percent: 100, count: all_5xx }";
        let u = &load(&with_upstream(extra), &source()).unwrap().upstreams[0];
        assert_eq!(u.cooldown.base, Duration::from_secs(2));
        assert_eq!(
            u.health_interval, None,
            "checks off: the interval is not checked"
        );
        let warm = u.keep_warm.as_ref().unwrap();
        assert_eq!(
            (warm.path.as_str(), warm.body.as_deref()),
            ("/v1/models", Some("{}"))
        );
        assert_eq!(
            (u.outlier.consecutive, u.outlier.max_ejection_percent),
            (1, 100)
        );
        assert_eq!(u.outlier.count, FailureCount::All5xx);
        let plain = &load(&with_upstream(""), &source()).unwrap().upstreams[0];
        assert_eq!(
            plain.outlier.count,
            FailureCount::GatewayErrors,
            "the default"
        );
    }

    fn https_with_ca(path: &str) -> String {
        config(
            "",
            &format!("url: https://relay.example\nkeys: [ {{ name: a, env: KG_TEST_KEY }} ]\nca_file: {path}"),
            ROUTE,
        )
    }

    #[test]
    fn ca_file_mistakes_are_named() {
        let file = "/etc/keygate/ca.pem";
        let yaml = https_with_ca("ca.pem");
        expect_error(
            &yaml,
            &source(),
            "upstreams.openai.ca_file",
            &format!("cannot read {file}: {}", no_such_file()),
        );
        expect_error(
            &yaml,
            &source().with_denied(file),
            "upstreams.openai.ca_file",
            &format!("cannot read {file}: {}", permission_denied()),
        );
        let cases = [
            (
                "no certificate here\n",
                format!("{file}: no PEM certificate found"),
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                format!("{file}: not a PEM certificate file: "),
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                format!("{file}: unusable certificate: "),
            ),
        ];
        for (text, start) in cases {
            let err = error_of(&yaml, &source().with_file(file, text, 0o644));
            assert_eq!(err.field, "upstreams.openai.ca_file");
            assert!(
                err.reason.starts_with(&start),
                "{err} does not start with {start:?}"
            );
        }
    }

    #[test]
    fn a_ca_file_of_real_certificates_is_loaded() {
        let cert = rcgen::generate_simple_self_signed(vec!["relay.example".into()]).unwrap();
        let pem = cert.cert.pem();
        let src = source().with_file("/ca/two.pem", format!("{pem}{pem}"), 0o644);
        let u = &load(&https_with_ca("/ca/two.pem"), &src).unwrap().upstreams[0];
        let certs = u.ca_certs.as_ref().unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0], cert.cert.der().to_vec());
    }
}
