//! `clients:`, limits (per client and `ip_limits:`) and `trusted_proxies:`: who may call.

use super::{ClientConfig, Ctx, Scope};
use crate::clients::addr::{CidrList, ClientIpHeader, TrustedProxies};
use crate::clients::limits::{Budget, Limits};
use crate::clients::IpPolicy;
use crate::config::secrets;
use crate::config::types::{ClientFile, IpLimitsFile, LimitsFile};
use crate::config::ConfigError;
use crate::glob::Glob;
use crate::keys::Secret;

/// The clients: at least one, names and tokens unique.
pub(super) fn clients(cx: &Ctx, list: &[ClientFile]) -> Result<Vec<ClientConfig>, ConfigError> {
    if list.is_empty() {
        return Err(cx.err(
            "clients",
            "is empty: remove it for an open gateway, or list at least one client",
        ));
    }
    let mut out: Vec<ClientConfig> = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let at = cx.at(format!("clients[{i}]"));
        if c.name.trim().is_empty() {
            return Err(at.err("name", "must not be empty"));
        }
        if out.iter().any(|o| o.name == c.name) {
            return Err(at.err("name", format!("{:?} is used twice", c.name)));
        }
        let token = token(&at, c)?;
        if token.expose().len() > crate::clients::MAX_TOKEN_BYTES {
            return Err(at.err("token_env", "token is longer than 4096 bytes"));
        }
        if out.iter().any(|o| o.token.expose() == token.expose()) {
            return Err(at.err(
                "token_env",
                format!("client {:?} has the same token as another client", c.name),
            ));
        }
        let mut models = Vec::new();
        for (j, m) in c.models.iter().enumerate() {
            models.push(Glob::new(m).map_err(|e| at.err(&format!("models[{j}]"), e.to_string()))?);
        }
        let limits = match &c.limits {
            None => Limits::default(),
            Some(l) => limits(&cx.at(at.field("limits")), l)?,
        };
        out.push(ClientConfig {
            name: c.name.clone(),
            token,
            models,
            limits,
        });
    }
    Ok(out)
}

/// A client's gateway token, from exactly one of `token_env` and `token_file`.
fn token(at: &Scope, c: &ClientFile) -> Result<Secret, ConfigError> {
    let source = at.cx.source;
    match (&c.token_env, &c.token_file) {
        (Some(var), None) => secrets::from_env(source, var)
            .map(Secret::new)
            .map_err(|e| at.err("token_env", e)),
        (None, Some(p)) => {
            let keys = secrets::read_keys_file(source, &at.cx.resolve(p))
                .map_err(|e| at.err("token_file", e))?;
            match <[_; 1]>::try_from(keys) {
                Ok([one]) => Ok(one.secret),
                Err(_) => Err(at.err("token_file", "must hold exactly one token")),
            }
        }
        _ => Err(at.err("token_env", "give exactly one of token_env or token_file")),
    }
}

/// Limits of a client (`clients[i].limits`) or of each IP (`ip_limits`): no zero.
pub(super) fn limits(at: &Scope, l: &LimitsFile) -> Result<Limits, ConfigError> {
    if l.rpm == Some(0) {
        return Err(at.err("rpm", "must be at least 1"));
    }
    if l.tpm == Some(0) {
        return Err(at.err("tpm", "must be at least 1"));
    }
    if l.concurrency == Some(0) {
        return Err(at.err("concurrency", "must be at least 1"));
    }
    if l.budget.as_ref().is_some_and(|b| b.tokens == 0) {
        return Err(at.err("budget.tokens", "must be at least 1"));
    }
    Ok(Limits {
        rpm: l.rpm,
        tpm: l.tpm,
        concurrency: l.concurrency,
        budget: l.budget.as_ref().map(|b| Budget {
            tokens: b.tokens,
            per: b.per,
        }),
    })
}

/// `ip_limits:`: the limits of each address group, prefix lengths and the cap on groups.
pub(super) fn ip_limits(at: &Scope, l: &IpLimitsFile) -> Result<IpPolicy, ConfigError> {
    let default = IpPolicy::default();
    let ipv4_prefix = l.ipv4_prefix.unwrap_or(default.ipv4_prefix);
    if !(1..=32).contains(&ipv4_prefix) {
        return Err(at.err("ipv4_prefix", "must be between 1 and 32"));
    }
    let ipv6_prefix = l.ipv6_prefix.unwrap_or(default.ipv6_prefix);
    if !(1..=128).contains(&ipv6_prefix) {
        return Err(at.err("ipv6_prefix", "must be between 1 and 128"));
    }
    let max_entries = l.max_entries.unwrap_or(default.max_entries);
    if max_entries == 0 {
        return Err(at.err("max_entries", "must be at least 1"));
    }
    Ok(IpPolicy {
        limits: limits(at, &l.limits())?,
        ipv4_prefix,
        ipv6_prefix,
        max_entries,
    })
}

/// The proxies whose forwarding header is believed, and which header that is.
pub(super) fn trusted_proxies(
    cx: &Ctx,
    list: &[String],
    header: Option<&str>,
) -> Result<TrustedProxies, ConfigError> {
    let cidrs = CidrList::parse(list).map_err(|e| cx.err("trusted_proxies", e))?;
    let header = match header {
        None => ClientIpHeader::default(),
        Some(_) if cidrs.is_empty() => {
            let reason = "only applies with `trusted_proxies` (the proxies that set the header)";
            return Err(cx.err("client_ip_header", reason));
        }
        Some(name) => ClientIpHeader::parse(name).ok_or_else(|| {
            let reason = format!("{name:?} is not one of {}", ClientIpHeader::NAMES);
            cx.err("client_ip_header", reason)
        })?,
    };
    Ok(TrustedProxies { cidrs, header })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use crate::config::MemorySource;

    fn with_clients(clients: &str) -> String {
        with_top(&format!("clients:\n{clients}"))
    }

    #[test]
    fn client_mistakes_are_named() {
        let long = "t".repeat(4097);
        let src = source()
            .with_env("T", "tok")
            .with_env("T2", "tok")
            .with_env("LONG", long.as_str());
        let cases = [
            (
                "clients: []",
                "clients",
                "is empty: remove it for an open gateway, or list at least one client".to_string(),
            ),
            (
                "clients:\n  - { name: \" \", token_env: T }",
                "clients[0].name",
                "must not be empty".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: T }\n  - { name: a, token_env: T2 }",
                "clients[1].name",
                "\"a\" is used twice".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: KG_MISSING_TOKEN }",
                "clients[0].token_env",
                "environment variable KG_MISSING_TOKEN is not set".into(),
            ),
            (
                "clients:\n  - { name: a }",
                "clients[0].token_env",
                "give exactly one of token_env or token_file".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: T, token_file: t.token }",
                "clients[0].token_env",
                "give exactly one of token_env or token_file".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: LONG }",
                "clients[0].token_env",
                "token is longer than 4096 bytes".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: T }\n  - { name: b, token_env: T2 }",
                "clients[1].token_env",
                "client \"b\" has the same token as another client".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: T, models: [gpt-4o, \"\"] }",
                "clients[0].models[1]",
                "model pattern is empty".into(),
            ),
            (
                "clients:\n  - { name: a, token_env: T }\nip_limits: { rpm: 10 }",
                "ip_limits",
                "only applies to an open gateway (no `clients:`); use each client's `limits`"
                    .into(),
            ),
            (
                "trusted_proxies: [10.0.0.0/40]",
                "trusted_proxies",
                "not a CIDR block or IP address: \"10.0.0.0/40\"".into(),
            ),
            (
                "trusted_proxies: [10.0.0.0/8]\nclient_ip_header: x-forwarded",
                "client_ip_header",
                "\"x-forwarded\" is not one of x-forwarded-for, forwarded or x-real-ip".into(),
            ),
            (
                "client_ip_header: forwarded",
                "client_ip_header",
                "only applies with `trusted_proxies` (the proxies that set the header)".into(),
            ),
        ];
        for (top, field, reason) in cases {
            expect_error(&with_top(top), &src, field, &reason);
        }
    }

    #[test]
    fn every_zero_limit_is_named_for_clients_and_ips() {
        let src = source().with_env("T", "tok");
        for (limit, field) in [
            ("rpm: 0", "rpm"),
            ("tpm: 0", "tpm"),
            ("concurrency: 0", "concurrency"),
            ("budget: { tokens: 0, per: day }", "budget.tokens"),
        ] {
            let client = format!("  - {{ name: a, token_env: T, limits: {{ {limit} }} }}");
            let field_of_client = format!("clients[0].limits.{field}");
            expect_error(
                &with_clients(&client),
                &src,
                &field_of_client,
                "must be at least 1",
            );
            let ip = with_top(&format!("ip_limits: {{ {limit} }}"));
            expect_error(
                &ip,
                &src,
                &format!("ip_limits.{field}"),
                "must be at least 1",
            );
        }
    }

    #[test]
    fn token_files_are_checked_like_key_files() {
        let cases = [
            (
                0o644,
                "tok-1\n",
                "/etc/keygate/a.token is readable by group/others (mode 0644); run chmod 600 on it"
                    .to_string(),
            ),
            (
                0o600,
                "tok-1\ntok-2\n",
                "must hold exactly one token".into(),
            ),
            (0o600, "# nothing\n", "must hold exactly one token".into()),
            (
                0o600,
                "tok-1 weight=0\n",
                "line 1: weight must be a positive integer".into(),
            ),
        ];
        let yaml = with_clients("  - { name: a, token_file: a.token }");
        for (mode, text, reason) in cases {
            let src = source().with_file("/etc/keygate/a.token", text, mode);
            expect_error(&yaml, &src, "clients[0].token_file", &reason);
        }
        expect_error(
            &yaml,
            &source(),
            "clients[0].token_file",
            &format!("cannot read /etc/keygate/a.token: {}", no_such_file()),
        );
        let src = source().with_file("/etc/keygate/a.token", "tok-1 name=x\n", 0o600);
        let config = load(&yaml, &src).unwrap();
        assert_eq!(config.clients.unwrap()[0].token.expose(), "tok-1");
    }

    #[test]
    fn clients_get_their_token_models_and_limits() {
        let src: MemorySource = source().with_env("T", " tok \n");
        let yaml = with_clients(
            "  - { name: a, token_env: T, models: [\"gpt-*\"], limits: { rpm: 5, budget: { tokens: 9, per: month } } }",
        );
        let clients = load(&yaml, &src).unwrap().clients.unwrap();
        assert_eq!(clients[0].name, "a");
        assert_eq!(clients[0].token.expose(), "tok");
        assert_eq!(clients[0].models.len(), 1);
        assert_eq!(clients[0].limits.rpm, Some(5));
        assert_eq!(clients[0].limits.budget.map(|b| b.tokens), Some(9));
        let open = load(&with_top("ip_limits: { concurrency: 3 }"), &src).unwrap();
        assert!(open.clients.is_none());
        assert_eq!(open.ip_limits.limits.concurrency, Some(3));
    }

    #[test]
    fn ip_groups_default_to_v4_32_and_v6_64_and_are_checked() {
        let src = source();
        let open = load(&with_top("ip_limits: { rpm: 5 }"), &src).unwrap();
        let p = open.ip_limits;
        assert_eq!(
            (p.ipv4_prefix, p.ipv6_prefix, p.max_entries),
            (32, 64, 100_000)
        );
        let yaml =
            with_top("ip_limits: { rpm: 5, ipv4_prefix: 24, ipv6_prefix: 56, max_entries: 500 }");
        let p = load(&yaml, &src).unwrap().ip_limits;
        assert_eq!((p.ipv4_prefix, p.ipv6_prefix, p.max_entries), (24, 56, 500));
        for (setting, field, reason) in [
            (
                "ipv4_prefix: 0",
                "ip_limits.ipv4_prefix",
                "must be between 1 and 32",
            ),
            (
                "ipv4_prefix: 33",
                "ip_limits.ipv4_prefix",
                "must be between 1 and 32",
            ),
            (
                "ipv6_prefix: 0",
                "ip_limits.ipv6_prefix",
                "must be between 1 and 128",
            ),
            (
                "ipv6_prefix: 129",
                "ip_limits.ipv6_prefix",
                "must be between 1 and 128",
            ),
            (
                "max_entries: 0",
                "ip_limits.max_entries",
                "must be at least 1",
            ),
        ] {
            let yaml = with_top(&format!("ip_limits: {{ rpm: 5, {setting} }}"));
            expect_error(&yaml, &src, field, reason);
        }
    }

    #[test]
    fn the_client_ip_header_defaults_to_x_forwarded_for() {
        use crate::clients::addr::ClientIpHeader;
        let src = source();
        let config = load(&with_top("trusted_proxies: [10.0.0.0/8]"), &src).unwrap();
        assert_eq!(config.trusted_proxies.header, ClientIpHeader::XForwardedFor);
        assert!(config
            .trusted_proxies
            .cidrs
            .contains("10.1.2.3".parse().unwrap()));
        for (name, want) in [
            ("Forwarded", ClientIpHeader::Forwarded),
            ("x-real-ip", ClientIpHeader::XRealIp),
            ("X-Forwarded-For", ClientIpHeader::XForwardedFor),
        ] {
            let yaml = with_top(&format!(
                "trusted_proxies: [10.0.0.0/8]\nclient_ip_header: {name}"
            ));
            assert_eq!(load(&yaml, &src).unwrap().trusted_proxies.header, want);
        }
    }
}
