//! `guards:`: limits on connections and request headers, and deny rules.

use super::{Ctx, GuardsConfig};
use crate::clients::addr::CidrList;
use crate::config::types::GuardsFile;
use crate::config::ConfigError;
use crate::glob::Glob;
use std::time::Duration;

/// The guards, defaults filled in: 10s header timeout, 120s body timeout, 32KiB and 100 header
/// lines, 60s idle.
pub(super) fn guards(cx: &Ctx, g: Option<&GuardsFile>) -> Result<GuardsConfig, ConfigError> {
    let at = cx.at("guards");
    let mut out = GuardsConfig {
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(120),
        max_header_bytes: 32 * 1024,
        max_headers: 100,
        idle_timeout: Duration::from_secs(60),
        deny_user_agents: Vec::new(),
        deny_cidrs: CidrList::default(),
    };
    let Some(g) = g else { return Ok(out) };
    if let Some(d) = g.header_timeout {
        if d.0 < Duration::from_millis(100) {
            return Err(at.err("header_timeout", "must be at least 100ms"));
        }
        out.header_timeout = d.0;
    }
    if let Some(d) = g.body_timeout {
        if d.0 < Duration::from_secs(1) {
            return Err(at.err("body_timeout", "must be at least 1s"));
        }
        out.body_timeout = d.0;
    }
    if let Some(b) = g.max_header_bytes {
        if !(1024..=1 << 20).contains(&b.0) {
            return Err(at.err("max_header_bytes", "must be between 1KiB and 1MiB"));
        }
        out.max_header_bytes = usize::try_from(b.0).unwrap_or(1 << 20);
    }
    if let Some(n) = g.max_headers {
        if !(8..=256).contains(&n) {
            return Err(at.err("max_headers", "must be between 8 and 256"));
        }
        out.max_headers = n;
    }
    if let Some(d) = g.idle_timeout {
        if d.0 < Duration::from_secs(1) {
            return Err(at.err("idle_timeout", "must be at least 1s"));
        }
        out.idle_timeout = d.0;
    }
    for (i, ua) in g.deny_user_agents.iter().enumerate() {
        out.deny_user_agents.push(
            Glob::new(ua).map_err(|e| at.err(&format!("deny_user_agents[{i}]"), e.to_string()))?,
        );
    }
    out.deny_cidrs = CidrList::parse(&g.deny_cidrs).map_err(|e| at.err("deny_cidrs", e))?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use std::time::Duration;

    #[test]
    fn guard_mistakes_are_named() {
        let cases = [
            (
                "header_timeout: 99ms",
                "header_timeout",
                "must be at least 100ms",
            ),
            (
                "max_header_bytes: 1023",
                "max_header_bytes",
                "must be between 1KiB and 1MiB",
            ),
            (
                "max_header_bytes: 1048577",
                "max_header_bytes",
                "must be between 1KiB and 1MiB",
            ),
            ("max_headers: 7", "max_headers", "must be between 8 and 256"),
            (
                "max_headers: 257",
                "max_headers",
                "must be between 8 and 256",
            ),
            ("idle_timeout: 999ms", "idle_timeout", "must be at least 1s"),
            ("body_timeout: 999ms", "body_timeout", "must be at least 1s"),
            (
                "deny_user_agents: [curl*, \"\"]",
                "deny_user_agents[1]",
                "model pattern is empty",
            ),
            (
                "deny_cidrs: [10.0.0.0/8, 300.1.1.1]",
                "deny_cidrs",
                "not a CIDR block or IP address: \"300.1.1.1\"",
            ),
        ];
        for (guard, field, reason) in cases {
            let yaml = with_top(&format!("guards: {{ {guard} }}"));
            expect_error(&yaml, &source(), &format!("guards.{field}"), reason);
        }
    }

    #[test]
    fn guards_have_defaults_and_take_the_values_given() {
        let config = load(&with_top(""), &source()).unwrap();
        assert_eq!(config.guards.header_timeout, Duration::from_secs(10));
        assert_eq!(config.guards.max_header_bytes, 32 * 1024);
        assert_eq!(config.guards.max_headers, 100);
        assert_eq!(config.guards.idle_timeout, Duration::from_secs(60));
        let yaml = with_top(
            "guards: { header_timeout: 100ms, max_header_bytes: 1MiB, max_headers: 8, idle_timeout: 1s, deny_cidrs: [10.0.0.0/8] }",
        );
        let config = load(&yaml, &source()).unwrap();
        assert_eq!(config.guards.header_timeout, Duration::from_millis(100));
        assert_eq!(config.guards.max_header_bytes, 1 << 20);
        assert_eq!(config.guards.max_headers, 8);
        assert!(config
            .guards
            .deny_cidrs
            .contains("10.1.2.3".parse().unwrap()));
    }
}
