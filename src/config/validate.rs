//! Meaning checks: turns a parsed [`ConfigFile`] into a [`Config`] or the first precise mistake.

use super::secrets;
use super::types::StreamUsage;
use super::types::*;
use super::ConfigError;
use crate::clients::addr::CidrList;
use crate::clients::limits::{Budget, Limits};
use crate::glob::Glob;
use crate::keys::{key_id, CooldownPolicy, KeyPolicy, KeySpec, Secret};
use crate::outlier::OutlierPolicy;
use crate::routes::RouteSpec;
use crate::strategy::{Strategy, DEFAULT_EXPLORE};
use pingora_core::server::configuration::ServerConf;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default cap on request bodies: audio uploads reach 25 MB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 << 20;
/// Default time to wait for an upstream's response header: the OpenAI SDK's own timeout.
pub const DEFAULT_TTFB_TIMEOUT: Duration = Duration::from_secs(600);
/// Default extra attempts after a failed one.
pub const DEFAULT_RETRIES: u32 = 2;

/// A validated configuration with every secret loaded.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Pingora's settings.
    pub server: ServerConf,
    /// Listening sockets.
    pub listen: Vec<ListenerConfig>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Upstreams, in name order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, in config order.
    pub routes: Vec<RouteConfig>,
    /// Metrics side port.
    pub metrics_addr: Option<SocketAddr>,
    /// Access log: `None` off, `Some(None)` stdout, `Some(Some(path))` a file.
    pub access_log: Option<Option<PathBuf>>,
    /// Key state file.
    pub state_file: Option<PathBuf>,
    /// Streaming usage handling.
    pub stream_usage: StreamUsage,
    /// Clients; `None` for an open gateway.
    pub clients: Option<Vec<ClientConfig>>,
    /// Per-IP limits (open gateway).
    pub ip_limits: Limits,
    /// Trusted proxies.
    pub trusted_proxies: CidrList,
    /// Guards.
    pub guards: GuardsConfig,
}

/// A validated client.
pub struct ClientConfig {
    /// Name.
    pub name: String,
    /// Gateway token (a secret).
    pub token: Secret,
    /// Allowed model globs (empty: any).
    pub models: Vec<Glob>,
    /// Limits.
    pub limits: Limits,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Validated guards.
#[derive(Debug, Clone)]
pub struct GuardsConfig {
    /// Request header deadline.
    pub header_timeout: Duration,
    /// Request header size cap.
    pub max_header_bytes: usize,
    /// Request header line cap.
    pub max_headers: usize,
    /// Keep-alive idle timeout.
    pub idle_timeout: Duration,
    /// Denied User-Agent globs.
    pub deny_user_agents: Vec<Glob>,
    /// Denied client address blocks.
    pub deny_cidrs: CidrList,
}

/// A validated listener.
#[derive(Debug)]
pub struct ListenerConfig {
    /// Bound address.
    pub addr: SocketAddr,
    /// Certificate and key paths when TLS is on.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A validated upstream.
#[derive(Debug)]
pub struct UpstreamConfig {
    /// Its name in the config.
    pub name: String,
    /// `https` when true.
    pub tls: bool,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port (default by scheme).
    pub port: u16,
    /// Value of the `Host` header sent upstream: the host, with the port unless it is the default.
    pub host_header: http::HeaderValue,
    /// Path prefix without a trailing slash (`""` or `/openai`).
    pub base_path: String,
    /// Credential style.
    pub auth: AuthStyle,
    /// Keys with their secrets.
    pub keys: Vec<KeySpec>,
    /// How keys are picked.
    pub key_policy: KeyPolicy,
    /// Cooldown tuning.
    pub cooldown: CooldownPolicy,
    /// Endpoint check interval; `None` when checks are off.
    pub health_interval: Option<Duration>,
    /// DNS refresh interval.
    pub resolve_every: Duration,
    /// Trusted CA certificates (DER) instead of the system roots.
    pub ca_certs: Option<Vec<Vec<u8>>>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Interval between probes of a disabled key.
    pub probe_interval: Duration,
    /// Model for quota probes.
    pub probe_model: String,
    /// Keep-warm pings, when configured.
    pub keep_warm: Option<KeepWarm>,
    /// Endpoint outlier ejection.
    pub outlier: OutlierPolicy,
    /// Models it declares for `GET /v1/models`.
    pub models: Vec<String>,
    /// Extra body text that marks an organisation-wide 429.
    pub org_limit_pattern: Option<String>,
}

/// A validated keep-warm setting.
#[derive(Debug, Clone)]
pub struct KeepWarm {
    /// Idle time before a ping.
    pub every: Duration,
    /// Path to request.
    pub path: String,
    /// POST body, or `None` for a GET.
    pub body: Option<String>,
}

/// A validated route.
#[derive(Debug)]
pub struct RouteConfig {
    /// What the route table needs.
    pub spec: RouteSpec,
    /// Indexes into [`Config::upstreams`], in fallback order.
    pub upstreams: Vec<usize>,
    /// Extra attempts after a failed one.
    pub retries: u32,
    /// Response-header timeout per attempt.
    pub ttfb_timeout: Duration,
    /// No new attempt after this long.
    pub deadline: Option<Duration>,
    /// Upstream order per request.
    pub strategy: Strategy,
    /// Weights for `weighted`, parallel to `upstreams`.
    pub weights: Vec<u32>,
    /// Exploration share for `fastest`.
    pub explore: f64,
}

/// Checks everything the file says and loads the secrets it points to.
pub fn validate(path: &Path, file: ConfigFile) -> Result<Config, ConfigError> {
    let err = |field: &str, reason: String| ConfigError::new(path, field, reason);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };

    let server = match file.server {
        None => ServerConf::default(),
        Some(v) => {
            let conf: ServerConf =
                serde_yaml::from_value(v).map_err(|e| err("server", e.to_string()))?;
            conf.validate().map_err(|e| err("server", e.to_string()))?
        }
    };

    if file.listen.is_empty() {
        return Err(err(
            "listen",
            "at least one listener is needed, e.g. `- addr: 0.0.0.0:8080`".into(),
        ));
    }
    let mut listen = Vec::new();
    let mut seen_addrs = HashSet::new();
    for (i, l) in file.listen.iter().enumerate() {
        let field = format!("listen[{i}].addr");
        let addr: SocketAddr = l
            .addr
            .parse()
            .map_err(|_| err(&field, format!("not an IP:PORT address: {:?}", l.addr)))?;
        if !seen_addrs.insert(addr) {
            return Err(err(&field, format!("{addr} is listed twice")));
        }
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                for (name, p) in [("cert", &t.cert), ("key", &t.key)] {
                    let p = resolve(p);
                    if !p.is_file() {
                        return Err(err(
                            &format!("listen[{i}].tls.{name}"),
                            format!("no such file: {}", p.display()),
                        ));
                    }
                }
                Some((resolve(&t.cert), resolve(&t.key)))
            }
        };
        listen.push(ListenerConfig { addr, tls });
    }

    let max_body_bytes = file.max_body_bytes.map_or(DEFAULT_MAX_BODY_BYTES, |b| b.0);
    if max_body_bytes == 0 {
        return Err(err("max_body_bytes", "must be greater than zero".into()));
    }
    let max_body_bytes =
        usize::try_from(max_body_bytes).map_err(|_| err("max_body_bytes", "too large".into()))?;

    if file.upstreams.is_empty() {
        return Err(err("upstreams", "at least one upstream is needed".into()));
    }
    let mut upstreams = Vec::new();
    for (name, u) in &file.upstreams {
        upstreams.push(validate_upstream(path, name, u, &resolve)?);
    }

    if file.routes.is_empty() {
        return Err(err(
            "routes",
            "at least one route is needed, e.g. `- { upstreams: [openai] }` as a catch-all".into(),
        ));
    }
    let mut routes = Vec::new();
    for (i, r) in file.routes.iter().enumerate() {
        let field = |f: &str| format!("routes[{i}].{f}");
        if r.upstreams.is_empty() {
            return Err(err(
                &field("upstreams"),
                "empty: name at least one upstream".into(),
            ));
        }
        let mut idx = Vec::new();
        for (j, name) in r.upstreams.iter().enumerate() {
            let pos = upstreams
                .iter()
                .position(|u| &u.name == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    err(
                        &format!("routes[{i}].upstreams[{j}]"),
                        format!("unknown upstream {name:?} (defined: {})", known.join(", ")),
                    )
                })?;
            if idx.contains(&pos) {
                return Err(err(
                    &format!("routes[{i}].upstreams[{j}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
            idx.push(pos);
        }
        let mut models = Vec::new();
        for (j, m) in r.models.iter().enumerate() {
            models.push(
                Glob::new(m)
                    .map_err(|e| err(&format!("routes[{i}].models[{j}]"), e.to_string()))?,
            );
        }
        if let Some(p) = &r.path_prefix {
            if !p.starts_with('/') {
                return Err(err(
                    &field("path_prefix"),
                    format!("must start with '/': {p:?}"),
                ));
            }
        }
        if let Some(m) = &r.rewrite_model {
            if m.trim().is_empty() {
                return Err(err(&field("rewrite_model"), "must not be empty".into()));
            }
        }
        let retries = r.retries.unwrap_or(DEFAULT_RETRIES);
        if retries > 10 {
            return Err(err(
                &field("retries"),
                format!("{retries} is too many (at most 10)"),
            ));
        }
        let ttfb_timeout = r.ttfb_timeout.map_or(DEFAULT_TTFB_TIMEOUT, |d| d.0);
        if ttfb_timeout.is_zero() {
            return Err(err(
                &field("ttfb_timeout"),
                "must be greater than zero".into(),
            ));
        }
        let strategy = r.strategy.unwrap_or_default();
        if !r.weights.is_empty() {
            if strategy != Strategy::Weighted {
                return Err(err(
                    &field("weights"),
                    "only used with `strategy: weighted`".into(),
                ));
            }
            if r.weights.len() != r.upstreams.len() {
                return Err(err(
                    &field("weights"),
                    format!(
                        "{} weights for {} upstreams: give one per upstream",
                        r.weights.len(),
                        r.upstreams.len()
                    ),
                ));
            }
            if r.weights.iter().all(|w| *w == 0) {
                return Err(err(
                    &field("weights"),
                    "at least one weight must be above 0".into(),
                ));
            }
        }
        let explore = r.explore.unwrap_or(DEFAULT_EXPLORE);
        if !(0.0..=1.0).contains(&explore) {
            return Err(err(
                &field("explore"),
                format!("{explore} is not between 0 and 1"),
            ));
        }
        if r.explore.is_some() && strategy != Strategy::Fastest {
            return Err(err(
                &field("explore"),
                "only used with `strategy: fastest`".into(),
            ));
        }
        let deadline = r.deadline.map(|d| d.0);
        if deadline.is_some_and(|d| d.is_zero()) {
            return Err(err(&field("deadline"), "must be greater than zero".into()));
        }
        routes.push(RouteConfig {
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
            retries,
            ttfb_timeout,
        });
    }

    let metrics_addr = match &file.metrics {
        None => None,
        Some(m) => {
            let addr: SocketAddr = m.addr.parse().map_err(|_| {
                err(
                    "metrics.addr",
                    format!("not an IP:PORT address: {:?}", m.addr),
                )
            })?;
            if listen.iter().any(|l| l.addr == addr) {
                return Err(err(
                    "metrics.addr",
                    format!("{addr} is also a proxy listener"),
                ));
            }
            Some(addr)
        }
    };
    let access_log = match &file.access_log {
        None => None,
        Some(a) if a.path == "stdout" || a.path == "-" => Some(None),
        Some(a) => {
            let p = resolve(Path::new(&a.path));
            let dir_ok = p
                .parent()
                .is_none_or(|d| d.as_os_str().is_empty() || d.is_dir());
            if !dir_ok {
                return Err(err(
                    "access_log.path",
                    format!("no such directory for {}", p.display()),
                ));
            }
            Some(Some(p))
        }
    };
    let state_file = match &file.state_file {
        None => None,
        Some(p) => {
            let p = resolve(p);
            if let Some(dir) = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
            {
                // Like the upgrade socket's: created private, since it names keys and clients.
                create_private_dir(dir).map_err(|e| err("state_file", e))?;
            }
            Some(p)
        }
    };
    check_upgrade_sock_dir(&server.upgrade_sock).map_err(|e| err("server.upgrade_sock", e))?;

    let clients = match &file.clients {
        None => None,
        Some(list) => Some(validate_clients(path, list, &resolve)?),
    };
    let ip_limits = match &file.ip_limits {
        None => Limits::default(),
        Some(l) => {
            if clients.is_some() {
                return Err(err(
                    "ip_limits",
                    "only applies to an open gateway (no `clients:`); use each client's `limits`"
                        .into(),
                ));
            }
            limits_from(path, "ip_limits", l)?
        }
    };
    let trusted_proxies =
        CidrList::parse(&file.trusted_proxies).map_err(|e| err("trusted_proxies", e))?;
    let guards = validate_guards(path, file.guards.as_ref())?;

    Ok(Config {
        path: path.to_path_buf(),
        metrics_addr,
        access_log,
        state_file,
        stream_usage: file.stream_usage.unwrap_or_default(),
        clients,
        ip_limits,
        trusted_proxies,
        guards,
        server,
        listen,
        max_body_bytes,
        upstreams,
        routes,
    })
}

fn validate_upstream(
    path: &Path,
    name: &str,
    u: &UpstreamFile,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<UpstreamConfig, ConfigError> {
    let field = |f: &str| format!("upstreams.{name}.{f}");
    let err = |f: &str, reason: String| ConfigError::new(path, field(f), reason);

    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            path,
            format!("upstreams.{name}"),
            "an upstream name may use only letters, digits, '-', '_' and '.'",
        ));
    }

    let url = url::Url::parse(&u.url).map_err(|_| err("url", format!("not a URL: {:?}", u.url)))?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        _ => {
            return Err(err(
                "url",
                format!("not a URL: {:?} (expected http:// or https://)", u.url),
            ))
        }
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(err("url", format!("no host in {:?}", u.url))),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(err(
            "url",
            "credentials in the URL are not allowed; use keys".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(err(
            "url",
            format!("a base URL takes no query or fragment: {:?}", u.url),
        ));
    }
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let base_path = url.path().trim_end_matches('/').to_string();
    let host_header = host_header_value(&host, port, tls).ok_or_else(|| {
        err(
            "url",
            format!("the host cannot be sent as a Host header: {:?}", u.url),
        )
    })?;

    let mut keys = Vec::new();
    let mut names = HashSet::new();
    let mut secrets_seen = HashSet::new();
    let mut push = |spec: KeySpec, f: String| -> Result<(), ConfigError> {
        if !names.insert(spec.name.clone()) {
            return Err(ConfigError::new(
                path,
                f,
                format!("key name {:?} is used twice", spec.name),
            ));
        }
        if http::HeaderValue::from_str(spec.secret.expose()).is_err() {
            // Never echo the secret: name the key only.
            return Err(ConfigError::new(
                path,
                f,
                format!(
                    "key {:?} has characters that cannot be sent in a header",
                    spec.name
                ),
            ));
        }
        if !secrets_seen.insert(spec.secret.expose().to_string()) {
            return Err(ConfigError::new(
                path,
                f,
                format!("key {:?} is the same secret as another key", spec.name),
            ));
        }
        keys.push(spec);
        Ok(())
    };
    for (i, k) in u.keys.iter().enumerate() {
        let f = format!("keys[{i}]");
        let secret = secrets::from_env(&k.env).map_err(|e| err(&format!("{f}.env"), e))?;
        if k.weight == Some(0) {
            return Err(err(&format!("{f}.weight"), "must be at least 1".into()));
        }
        push(
            KeySpec {
                name: k.name.clone().unwrap_or_else(|| key_id(&secret)),
                weight: k.weight.unwrap_or(1),
                account: k.account.clone(),
                secret: Secret::new(secret),
            },
            field(&f),
        )?;
    }
    if let Some(p) = &u.keys_file {
        let p = resolve(p);
        for line in secrets::read_keys_file(&p).map_err(|e| err("keys_file", e))? {
            push(
                KeySpec {
                    name: line.name.clone().unwrap_or_else(|| key_id(&line.secret)),
                    weight: line.weight.unwrap_or(1),
                    account: line.account,
                    secret: Secret::new(line.secret),
                },
                field("keys_file"),
            )?;
        }
    }
    if keys.is_empty() && u.auth != AuthStyle::None {
        return Err(err(
            "keys",
            "no keys: give `keys` (from env vars) or `keys_file`, or set `auth: none`".into(),
        ));
    }
    if !keys.is_empty() && u.auth == AuthStyle::None {
        return Err(err(
            "auth",
            "is `none` but keys are given; pick an auth style".into(),
        ));
    }

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
        return Err(err("cooldown.base", "must be greater than zero".into()));
    }
    if cooldown.max_backoff < cooldown.base {
        return Err(err(
            "cooldown.max_backoff",
            "must not be shorter than cooldown.base".into(),
        ));
    }

    let health_interval = match &u.health {
        Some(h) if h.enabled == Some(false) => None,
        Some(h) => Some(h.interval.map_or(Duration::from_secs(10), |d| d.0)),
        None => Some(Duration::from_secs(10)),
    };
    if health_interval.is_some_and(|d| d < Duration::from_millis(100)) {
        return Err(err("health.interval", "must be at least 100ms".into()));
    }
    let resolve_every = u.resolve_every.map_or(Duration::from_secs(60), |d| d.0);
    if resolve_every < Duration::from_secs(1) {
        return Err(err("resolve_every", "must be at least 1s".into()));
    }

    let ca_certs = match &u.ca_file {
        None => None,
        Some(p) => {
            if !tls {
                return Err(err("ca_file", "is set but the url is not https".into()));
            }
            Some(load_ca(&resolve(p)).map_err(|e| err("ca_file", e))?)
        }
    };

    let probe_interval = u.probe_interval.map_or(Duration::from_secs(300), |d| d.0);
    if probe_interval < Duration::from_millis(100) {
        return Err(err("probe_interval", "must be at least 100ms".into()));
    }
    let probe_model = u
        .probe_model
        .clone()
        .unwrap_or_else(|| "gpt-4o-mini".to_string());
    if probe_model.trim().is_empty() {
        return Err(err("probe_model", "must not be empty".into()));
    }
    let keep_warm = match &u.keep_warm {
        None => None,
        Some(k) => {
            if k.every.0 < Duration::from_secs(1) {
                return Err(err("keep_warm.every", "must be at least 1s".into()));
            }
            let path = k.path.clone().unwrap_or_else(|| "/v1/models".to_string());
            if !path.starts_with('/') {
                return Err(err(
                    "keep_warm.path",
                    format!("must start with '/': {path:?}"),
                ));
            }
            if let Some(b) = &k.body {
                serde_json::from_str::<serde_json::Value>(b)
                    .map_err(|e| err("keep_warm.body", format!("not JSON: {e}")))?;
            }
            Some(KeepWarm {
                every: k.every.0,
                path,
                body: k.body.clone(),
            })
        }
    };

    let outlier_defaults = OutlierPolicy::default();
    let outlier = match &u.outlier {
        None => outlier_defaults,
        Some(o) => OutlierPolicy {
            consecutive: o.consecutive.unwrap_or(outlier_defaults.consecutive),
            base_ejection: o
                .base_ejection
                .map_or(outlier_defaults.base_ejection, |d| d.0),
            max_ejection: o
                .max_ejection
                .map_or(outlier_defaults.max_ejection, |d| d.0),
            max_ejection_percent: o
                .max_ejection_percent
                .unwrap_or(outlier_defaults.max_ejection_percent),
        },
    };
    if outlier.consecutive == 0 {
        return Err(err("outlier.consecutive", "must be at least 1".into()));
    }
    if outlier.max_ejection_percent > 100 {
        return Err(err(
            "outlier.max_ejection_percent",
            "must be between 0 and 100".into(),
        ));
    }
    if outlier.max_ejection < outlier.base_ejection {
        return Err(err(
            "outlier.max_ejection",
            "must not be shorter than base_ejection".into(),
        ));
    }

    Ok(UpstreamConfig {
        name: name.to_string(),
        outlier,
        models: u.models.clone(),
        org_limit_pattern: u.org_limit_pattern.clone().filter(|p| !p.is_empty()),
        probe_interval,
        probe_model,
        keep_warm,
        tls,
        host,
        port,
        host_header,
        base_path,
        auth: u.auth,
        keys,
        key_policy: u.key_policy.unwrap_or_default(),
        cooldown,
        health_interval,
        resolve_every,
        ca_certs,
        connect_timeout: u.connect_timeout.map_or(Duration::from_secs(10), |d| d.0),
    })
}

/// `Host` for an upstream: IPv6 literals in brackets, the port only when it is not the scheme's.
fn host_header_value(host: &str, port: u16, tls: bool) -> Option<http::HeaderValue> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let value = if port == if tls { 443 } else { 80 } {
        host
    } else {
        format!("{host}:{port}")
    };
    http::HeaderValue::try_from(value).ok()
}

fn limits_from(path: &Path, field: &str, l: &LimitsFile) -> Result<Limits, ConfigError> {
    let err = |f: &str, reason: &str| ConfigError::new(path, format!("{field}.{f}"), reason);
    if l.rpm == Some(0) {
        return Err(err("rpm", "must be at least 1"));
    }
    if l.tpm == Some(0) {
        return Err(err("tpm", "must be at least 1"));
    }
    if l.concurrency == Some(0) {
        return Err(err("concurrency", "must be at least 1"));
    }
    if l.budget.as_ref().is_some_and(|b| b.tokens == 0) {
        return Err(err("budget.tokens", "must be at least 1"));
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

fn validate_clients(
    path: &Path,
    list: &[ClientFile],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<ClientConfig>, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::new(
            path,
            "clients",
            "is empty: remove it for an open gateway, or list at least one client",
        ));
    }
    let mut out: Vec<ClientConfig> = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let field = |f: &str| format!("clients[{i}].{f}");
        let err = |f: &str, reason: String| ConfigError::new(path, field(f), reason);
        if c.name.trim().is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        if out.iter().any(|o| o.name == c.name) {
            return Err(err("name", format!("{:?} is used twice", c.name)));
        }
        let token = match (&c.token_env, &c.token_file) {
            (Some(var), None) => secrets::from_env(var).map_err(|e| err("token_env", e))?,
            (None, Some(p)) => {
                let keys =
                    secrets::read_keys_file(&resolve(p)).map_err(|e| err("token_file", e))?;
                match keys.as_slice() {
                    [one] => one.secret.clone(),
                    _ => return Err(err("token_file", "must hold exactly one token".into())),
                }
            }
            _ => {
                return Err(err(
                    "token_env",
                    "give exactly one of token_env or token_file".into(),
                ))
            }
        };
        if token.len() > crate::clients::MAX_TOKEN_BYTES {
            return Err(err("token_env", "token is longer than 4096 bytes".into()));
        }
        if out.iter().any(|o| o.token.expose() == token) {
            return Err(err(
                "token_env",
                format!("client {:?} has the same token as another client", c.name),
            ));
        }
        let mut models = Vec::new();
        for (j, m) in c.models.iter().enumerate() {
            models.push(Glob::new(m).map_err(|e| err(&format!("models[{j}]"), e.to_string()))?);
        }
        let limits = match &c.limits {
            None => Limits::default(),
            Some(l) => limits_from(path, &field("limits"), l)?,
        };
        out.push(ClientConfig {
            name: c.name.clone(),
            token: Secret::new(token),
            models,
            limits,
        });
    }
    Ok(out)
}

fn validate_guards(path: &Path, g: Option<&GuardsFile>) -> Result<GuardsConfig, ConfigError> {
    let err = |f: &str, reason: String| ConfigError::new(path, format!("guards.{f}"), reason);
    let mut out = GuardsConfig {
        header_timeout: Duration::from_secs(10),
        max_header_bytes: 32 * 1024,
        max_headers: 100,
        idle_timeout: Duration::from_secs(60),
        deny_user_agents: Vec::new(),
        deny_cidrs: CidrList::default(),
    };
    let Some(g) = g else { return Ok(out) };
    if let Some(d) = g.header_timeout {
        if d.0 < Duration::from_millis(100) {
            return Err(err("header_timeout", "must be at least 100ms".into()));
        }
        out.header_timeout = d.0;
    }
    if let Some(b) = g.max_header_bytes {
        if !(1024..=1 << 20).contains(&b.0) {
            return Err(err(
                "max_header_bytes",
                "must be between 1KiB and 1MiB".into(),
            ));
        }
        out.max_header_bytes = usize::try_from(b.0).unwrap_or(1 << 20);
    }
    if let Some(n) = g.max_headers {
        if !(8..=256).contains(&n) {
            return Err(err("max_headers", "must be between 8 and 256".into()));
        }
        out.max_headers = n;
    }
    if let Some(d) = g.idle_timeout {
        if d.0 < Duration::from_secs(1) {
            return Err(err("idle_timeout", "must be at least 1s".into()));
        }
        out.idle_timeout = d.0;
    }
    for (i, ua) in g.deny_user_agents.iter().enumerate() {
        out.deny_user_agents.push(
            Glob::new(ua).map_err(|e| err(&format!("deny_user_agents[{i}]"), e.to_string()))?,
        );
    }
    out.deny_cidrs = CidrList::parse(&g.deny_cidrs).map_err(|e| err("deny_cidrs", e))?;
    Ok(out)
}

/// The upgrade socket is created mode 0666 by Pingora: its directory must keep others out.
/// A missing directory is created with mode 0700.
fn check_upgrade_sock_dir(sock: &str) -> Result<(), String> {
    let Some(dir) = Path::new(sock)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    else {
        return Ok(());
    };
    if !dir.exists() {
        return create_private_dir(dir);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The shared /tmp default is tolerated for a first try, with a warning at start.
        if dir == Path::new("/tmp") {
            return Ok(());
        }
        let mode = std::fs::metadata(dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "directory {} is open to group/others (mode {mode:04o}); the upgrade socket needs a 0700 directory",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Reads PEM certificates and checks each one parses, so a bad file fails here, not per request.
fn load_ca(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::host_header_value;

    #[test]
    fn host_header_has_the_port_only_when_it_is_not_the_schemes_default() {
        assert_eq!(
            host_header_value("api.openai.com", 443, true).unwrap(),
            "api.openai.com"
        );
        assert_eq!(host_header_value("relay", 80, false).unwrap(), "relay");
        assert_eq!(host_header_value("relay", 443, false).unwrap(), "relay:443");
        assert_eq!(
            host_header_value("127.0.0.1", 8080, false).unwrap(),
            "127.0.0.1:8080"
        );
    }

    #[test]
    fn host_header_puts_ipv6_literals_in_brackets() {
        assert_eq!(host_header_value("::1", 8443, true).unwrap(), "[::1]:8443");
        assert_eq!(host_header_value("::1", 443, true).unwrap(), "[::1]");
    }
}
