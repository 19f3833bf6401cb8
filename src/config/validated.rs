//! The validated configuration, every secret loaded: what the rest of keygate reads.

use super::types::{Api, AuthStyle, StreamUsage};
use crate::clients::addr::{CidrList, TrustedProxies};
use crate::clients::limits::Limits;
use crate::clients::IpPolicy;
use crate::glob::Glob;
use crate::keys::{CooldownPolicy, KeyPolicy, KeySpec, Secret};
use crate::outlier::OutlierPolicy;
use crate::routes::RouteSpec;
use crate::strategy::Strategy;
use pingora_core::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Cap on body bytes held across requests; `None`: a default from the memory available.
    pub max_buffered_bytes: Option<usize>,
    /// Upstreams, in name order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, in config order.
    pub routes: Vec<RouteConfig>,
    /// Metrics side port.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin listener, when configured.
    pub admin: Option<AdminConfig>,
    /// Access log: `None` off, `Some(None)` stdout, `Some(Some(path))` a file.
    pub access_log: Option<Option<PathBuf>>,
    /// Key state file.
    pub state_file: Option<PathBuf>,
    /// Streaming usage handling.
    pub stream_usage: StreamUsage,
    /// Clients; `None` for an open gateway.
    pub clients: Option<Vec<ClientConfig>>,
    /// Per-IP limits and address grouping (open gateway).
    pub ip_limits: IpPolicy,
    /// Trusted proxies and the header they report the client in.
    pub trusted_proxies: TrustedProxies,
    /// Guards.
    pub guards: GuardsConfig,
    /// Bytes of the in-memory response cache (used when a route has `cache:`).
    pub cache_memory: u64,
    /// Whether cached answers are shared through [`Config::redis`].
    pub cache_redis: bool,
    /// The Redis shared by several instances; `None`: every state is local.
    pub redis: Option<RedisConfig>,
}

/// A validated `redis:` section.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One server's URL, or a cluster's seed nodes (`cluster` true).
    pub urls: Vec<String>,
    /// Whether `urls` are the nodes of a Redis Cluster.
    pub cluster: bool,
    /// The password from `password_env`.
    pub password: Option<Secret>,
    /// Before every key and channel name.
    pub prefix: String,
    /// The longest a request waits for Redis.
    pub timeout: Duration,
    /// How many instances share the limits (each admits its share when Redis is down).
    pub instances: u32,
}

/// A validated `admin:` section. Tokens are kept only as SHA-256 digests.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the admin API listens.
    pub addr: SocketAddr,
    /// SHA-256 of the admin token; `None`: no token (only allowed on a loopback address).
    pub token: Option<[u8; 32]>,
    /// SHA-256 of the read-only token, if any.
    pub read_token: Option<[u8; 32]>,
    /// Keys added at run time; `None`: adding keys is refused.
    pub runtime_keys: Option<RuntimeKeysConfig>,
}

/// Where keys added at run time are kept, and the key that encrypts their secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct RuntimeKeysConfig {
    /// The AES-256-GCM master key.
    pub master_key: [u8; 32],
    /// The store.
    pub store: RuntimeKeyStore,
}

/// Where runtime keys are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeKeyStore {
    /// A local file (mode 0600, written atomically).
    File(PathBuf),
    /// Redis (`redis:`), shared by every instance.
    Redis,
}

impl std::fmt::Debug for RuntimeKeysConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeKeysConfig")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.is_some())
            .field("read_token", &self.read_token.is_some())
            .field("runtime_keys", &self.runtime_keys)
            .finish()
    }
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
    /// Whole request body deadline.
    pub body_timeout: Duration,
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
    /// The API it speaks.
    pub api: Api,
    /// Keys with their secrets.
    pub keys: Vec<KeySpec>,
    /// How keys are picked.
    pub key_policy: KeyPolicy,
    /// Whether keys rest when their reported limits are about to run out.
    pub rest_before_limit: bool,
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
    /// Prompt-cache affinity for its requests (unless their route says otherwise).
    pub affinity: crate::keys::Affinity,
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
    /// OpenAI-to-Anthropic translation, when `translate: openai`.
    pub translate: Option<crate::routes::Translation>,
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
    /// The response cache's settings, when the route caches.
    pub cache: Option<crate::cache::CachePolicy>,
    /// Prompt-cache affinity for this route's requests; `None`: each upstream's own.
    pub affinity: Option<crate::keys::Affinity>,
}
