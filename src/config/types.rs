//! The config file as written: serde types, one per YAML section.
//!
//! keygate's own sections reject unknown fields so that a typo is an error, not a silently
//! ignored setting. `server:` is Pingora's `ServerConf`, which ignores unknown keys by design.

use super::sizes::{ByteSize, Dur};
use crate::keys::KeyPolicy;
use crate::outlier::FailureCount;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Pingora's own settings (threads, pid_file, upgrade_sock, grace_period_seconds…).
    #[serde(default)]
    pub server: Option<serde_yaml::Value>,
    /// Where clients connect.
    #[serde(default)]
    pub listen: Vec<ListenFile>,
    /// Largest request body accepted (default 32 MiB); larger ones get 413.
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    /// Most request-body bytes held across all requests at once (default a quarter of memory,
    /// 256 MiB to 4 GiB); beyond it new bodies wait briefly, then get 503.
    #[serde(default)]
    pub max_buffered_bytes: Option<ByteSize>,
    /// The OpenAI-compatible APIs behind keygate, by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamFile>,
    /// Which requests go to which upstreams, first match wins.
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    /// The Prometheus side port (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub metrics: Option<MetricsFile>,
    /// The admin API's own listener (status and key actions), never on a proxy port.
    #[serde(default)]
    pub admin: Option<AdminFile>,
    /// One JSON line per request.
    #[serde(default)]
    pub access_log: Option<AccessLogFile>,
    /// Where key states are kept across restarts and upgrades.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// `inject`: add `stream_options.include_usage` to streams that lack it (and hide the extra
    /// usage chunk from the client) so every stream is metered; `pass` (default): leave requests as they are.
    #[serde(default)]
    pub stream_usage: Option<StreamUsage>,
    /// Callers with gateway tokens; absent: an open gateway (keygate warns at start).
    #[serde(default)]
    pub clients: Option<Vec<ClientFile>>,
    /// Limits per client IP (or address block), for an open gateway.
    #[serde(default)]
    pub ip_limits: Option<IpLimitsFile>,
    /// Proxies (CIDR blocks) whose `client_ip_header` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The one header trusted proxies report the client in: `x-forwarded-for` (default),
    /// `forwarded` or `x-real-ip`.
    #[serde(default)]
    pub client_ip_header: Option<String>,
    /// Connection and request guards.
    #[serde(default)]
    pub guards: Option<GuardsFile>,
    /// Where routes with `cache:` keep their answers (default `{ memory: 256MiB }`).
    #[serde(default)]
    pub cache_store: Option<CacheStoreFile>,
    /// Redis (or Valkey) through which several instances share key states and client limits.
    #[serde(default)]
    pub redis: Option<RedisFile>,
}

/// `redis:`: the store shared by the instances of one gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// `redis://host:6379/0` or `rediss://…`; a list of nodes means a Redis Cluster.
    pub url: RedisUrls,
    /// The environment variable holding the password (when the URL has none).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Put before every Redis key and channel name (default `keygate:`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// The longest a request waits for Redis before going on with local state (default 50ms).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// How many instances share the limits: with Redis down each admits its share of them.
    #[serde(default)]
    pub instances: Option<u32>,
}

/// One Redis URL, or the seed nodes of a cluster.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RedisUrls {
    /// A single server.
    One(String),
    /// The nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// The response cache's store (`cache_store:`): `{ memory: 256MiB, redis: true }`, or `memory`
/// or `redis` alone.
#[derive(Debug, Default)]
pub struct CacheStoreFile {
    /// Bytes of answers kept in memory (in front of Redis when `redis` is true).
    pub memory: Option<ByteSize>,
    /// Share answers with the other instances through the `redis:` section's server.
    pub redis: Option<bool>,
}

/// `cache_store:` written as a section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheStoreMap {
    #[serde(default)]
    memory: Option<ByteSize>,
    #[serde(default)]
    redis: Option<bool>,
}

impl<'de> Deserialize<'de> for CacheStoreFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StoreVisitor;
        impl<'de> serde::de::Visitor<'de> for StoreVisitor {
            type Value = CacheStoreFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`{ memory: SIZE }`")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
                match name {
                    "memory" => Ok(CacheStoreFile::default()),
                    "redis" => Ok(CacheStoreFile {
                        memory: None,
                        redis: Some(true),
                    }),
                    other => Err(E::custom(format!(
                        "unknown cache store {other:?} (use `{{ memory: 256MiB }}` or `{{ redis: true }}`)"
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let m =
                    CacheStoreMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(CacheStoreFile {
                    memory: m.memory,
                    redis: m.redis,
                })
            }
        }
        d.deserialize_any(StoreVisitor)
    }
}

/// A route's response cache (`cache:`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheFile {
    /// How long an answer is served (default 1h).
    #[serde(default)]
    pub ttl: Option<Dur>,
    /// Largest answer stored (default 1MiB).
    #[serde(default)]
    pub max_entry: Option<ByteSize>,
    /// Clients share entries (default false: each client has its own).
    #[serde(default)]
    pub shared: Option<bool>,
    /// Cache only `temperature: 0` or seeded requests, and embeddings (default false).
    #[serde(default)]
    pub only_deterministic: Option<bool>,
    /// Charge hits to the client's token limits and budget (default false).
    #[serde(default)]
    pub charge_hits: Option<bool>,
}

/// One client of the gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Name for logs and metrics.
    pub name: String,
    /// Environment variable holding its gateway token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding its gateway token (mode 0600 or stricter).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Model globs it may use (default: any).
    #[serde(default)]
    pub models: Vec<String>,
    /// Its limits.
    #[serde(default)]
    pub limits: Option<LimitsFile>,
}

/// Limits of a client or an IP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Tokens per UTC day or month.
    #[serde(default)]
    pub budget: Option<BudgetFile>,
}

/// Limits per client address group, and how addresses are grouped (`ip_limits:`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpLimitsFile {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Tokens per UTC day or month.
    #[serde(default)]
    pub budget: Option<BudgetFile>,
    /// IPv4 addresses sharing this many leading bits share a limit (default 32).
    #[serde(default)]
    pub ipv4_prefix: Option<u8>,
    /// IPv6 addresses sharing this many leading bits share a limit (default 64).
    #[serde(default)]
    pub ipv6_prefix: Option<u8>,
    /// Most address groups tracked at once (default 100000).
    #[serde(default)]
    pub max_entries: Option<usize>,
}

impl IpLimitsFile {
    /// The limits part, as a client's `limits:` would say it.
    pub fn limits(&self) -> LimitsFile {
        LimitsFile {
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
            budget: self.budget.clone(),
        }
    }
}

/// A token budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    /// Tokens per period.
    pub tokens: u64,
    /// `day` or `month` (UTC calendar).
    pub per: crate::clients::limits::Period,
}

/// Guards against abusive connections and requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardsFile {
    /// The whole request header must arrive within this (default 10s); else 408.
    #[serde(default)]
    pub header_timeout: Option<Dur>,
    /// The whole request body must arrive within this (default 120s); else 408.
    #[serde(default)]
    pub body_timeout: Option<Dur>,
    /// Largest request header (default 32KiB); else 431.
    #[serde(default)]
    pub max_header_bytes: Option<ByteSize>,
    /// Most request header lines (default 100); else 431.
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// Close keep-alive connections idle this long (default 60s).
    #[serde(default)]
    pub idle_timeout: Option<Dur>,
    /// User-Agent globs answered with 403.
    #[serde(default)]
    pub deny_user_agents: Vec<String>,
    /// Client address blocks answered with 403.
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
}

/// The metrics side port.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// `IP:PORT`, e.g. `127.0.0.1:9091`.
    pub addr: String,
}

/// The admin listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// `IP:PORT`, e.g. `127.0.0.1:9092`.
    pub addr: String,
    /// The environment variable holding the admin token (may read and act).
    #[serde(default)]
    pub token_env: Option<String>,
    /// The environment variable holding a read-only token (may only read).
    #[serde(default)]
    pub read_token_env: Option<String>,
    /// Keys added through the admin API: where they are kept, under which master key.
    #[serde(default)]
    pub runtime_keys: Option<RuntimeKeysFile>,
}

/// `admin.runtime_keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeKeysFile {
    /// The environment variable holding the AES-256 master key (64 hex digits or base64).
    pub master_key_env: String,
    /// The local key store; default: `runtime-keys.json` beside `state_file`. Not used with
    /// `redis:` (the keys are kept in Redis).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// Access log destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    /// A file path, or `stdout`.
    pub path: String,
}

/// What to do with streaming requests that do not ask for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamUsage {
    /// Leave them alone (such streams are not metered).
    #[default]
    Pass,
    /// Ask for usage upstream and strip the usage chunk from the client's stream.
    Inject,
}

/// One listening socket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// `IP:PORT` to bind, e.g. `0.0.0.0:8080`.
    pub addr: String,
    /// Serve TLS (HTTP/1.1 and h2 by ALPN) with this certificate and key.
    #[serde(default)]
    pub tls: Option<TlsFile>,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// How an upstream wants its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthStyle {
    /// `Authorization: Bearer KEY` (OpenAI and most relays).
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure OpenAI).
    Azure,
    /// `x-api-key: KEY`.
    XApiKey,
    /// No credential (self-hosted servers without auth).
    None,
}

/// Which API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI's API and the many compatible ones.
    #[default]
    Openai,
    /// Anthropic's Messages API (`x-api-key`, `anthropic-version`, typed stream events).
    Anthropic,
}

/// One upstream API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Base URL, optionally with a path prefix: `https://relay.example/openai`.
    pub url: String,
    /// The API it speaks: `openai` (default) or `anthropic`.
    #[serde(default)]
    pub api: Api,
    /// Credential style; default `bearer`, or `x-api-key` with `api: anthropic`.
    #[serde(default)]
    pub auth: Option<AuthStyle>,
    /// Keys given one by one, each from an environment variable.
    #[serde(default)]
    pub keys: Vec<KeyFile>,
    /// A file with one key a line (`KEY [name=N] [weight=W] [account=A]`); must be mode 0600 or stricter.
    #[serde(default)]
    pub keys_file: Option<PathBuf>,
    /// How a key is picked: `round_robin` (default), `weighted`, `random`, `least_in_flight`,
    /// `headroom` (the key with the most of its rate limits left).
    #[serde(default)]
    pub key_policy: Option<KeyPolicy>,
    /// Rest a key whose reported rate limits are about to run out until they reset, before the
    /// upstream answers 429 (default true); false rests keys only after a 429.
    #[serde(default)]
    pub rest_before_limit: Option<bool>,
    /// Cooldown after a 429 without usable headers, and the cap on what headers may ask.
    #[serde(default)]
    pub cooldown: Option<CooldownFile>,
    /// Endpoint liveness checks (TCP/TLS connect).
    #[serde(default)]
    pub health: Option<HealthFile>,
    /// How often the host name is resolved again (default 60s).
    #[serde(default)]
    pub resolve_every: Option<Dur>,
    /// PEM file of CA certificates to trust for this upstream instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// TCP (and TLS) connect timeout (default 10s).
    #[serde(default)]
    pub connect_timeout: Option<Dur>,
    /// How often a disabled key is probed to see whether it works again (default 5m).
    #[serde(default)]
    pub probe_interval: Option<Dur>,
    /// Cheap model for the 1-token completion that checks a key's quota (default `gpt-4o-mini`).
    #[serde(default)]
    pub probe_model: Option<String>,
    /// Ping the upstream when it had no traffic for a while (serverless relays fall asleep).
    #[serde(default)]
    pub keep_warm: Option<KeepWarmFile>,
    /// Endpoint outlier ejection after consecutive gateway errors (or any 5xx) or connect errors.
    #[serde(default)]
    pub outlier: Option<OutlierFile>,
    /// Models this upstream serves, listed by keygate's `GET /v1/models`.
    #[serde(default)]
    pub models: Vec<String>,
    /// Text in a 429 body that marks an organisation-wide limit (cools every key of the account).
    #[serde(default)]
    pub org_limit_pattern: Option<String>,
    /// `prompt`: requests that carry a `prompt_cache_key`, a `user` or a prompt go to a key by
    /// rendezvous hashing of it, so repeats hit the provider's prompt cache (default `none`).
    #[serde(default)]
    pub affinity: Option<crate::keys::Affinity>,
}

impl UpstreamFile {
    /// The credential style: as written, else the API's own (`x-api-key` for Anthropic).
    pub fn auth_style(&self) -> AuthStyle {
        self.auth.unwrap_or(match self.api {
            Api::Openai => AuthStyle::Bearer,
            Api::Anthropic => AuthStyle::XApiKey,
        })
    }
}

/// Outlier ejection settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    /// Consecutive failures that eject an endpoint (default 5).
    #[serde(default)]
    pub consecutive: Option<u32>,
    /// First ejection time, multiplied by ejections in a row (default 30s).
    #[serde(default)]
    pub base_ejection: Option<Dur>,
    /// Longest ejection (default 300s).
    #[serde(default)]
    pub max_ejection: Option<Dur>,
    /// Most endpoints ejected at once, in percent (default 50; one is always ejectable, the
    /// last one in rotation never).
    #[serde(default)]
    pub max_ejection_percent: Option<u8>,
    /// Which answers count as failures: `gateway_errors` (502/503/504, the default) or `all_5xx`.
    #[serde(default)]
    pub count: Option<FailureCount>,
}

/// Keep-warm pings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepWarmFile {
    /// Ping after this long without traffic.
    pub every: Dur,
    /// Path to request (default `/v1/models`).
    #[serde(default)]
    pub path: Option<String>,
    /// JSON body; when given the ping is a POST, otherwise a GET.
    #[serde(default)]
    pub body: Option<String>,
}

/// One key, taken from the environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Name used in logs and metrics; default `key-<hash>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Environment variable holding the secret.
    pub env: String,
    /// Relative share for the `weighted` policy (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// The organisation behind the key.
    #[serde(default)]
    pub account: Option<String>,
    /// `OpenAI-Organization` sent with this key (clients' own values never pass).
    #[serde(default)]
    pub organization: Option<String>,
    /// `OpenAI-Project` sent with this key (clients' own values never pass).
    #[serde(default)]
    pub project: Option<String>,
}

/// Cooldown settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CooldownFile {
    /// First cooldown when the upstream gives no usable header (default 1s).
    #[serde(default)]
    pub base: Option<Dur>,
    /// Longest exponential cooldown (default 60s).
    #[serde(default)]
    pub max_backoff: Option<Dur>,
    /// Cap on what an upstream may ask for (default 300s).
    #[serde(default)]
    pub max: Option<Dur>,
}

/// Endpoint health checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// How often each endpoint is checked (default 10s).
    #[serde(default)]
    pub interval: Option<Dur>,
    /// Set false to turn the checks off.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// One route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Name for logs; default `route-N`.
    #[serde(default)]
    pub name: Option<String>,
    /// Model globs (`gpt-4*`); the route matches only requests naming one of them.
    #[serde(default)]
    pub models: Vec<String>,
    /// Path prefix (`/v1/embeddings`), matched on whole segments.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Upstreams to use, in fallback order.
    pub upstreams: Vec<String>,
    /// Model name sent upstream instead of the one asked.
    #[serde(default)]
    pub rewrite_model: Option<String>,
    /// Extra attempts after a failed one (default 2, i.e. at most 3 attempts).
    #[serde(default)]
    pub retries: Option<u32>,
    /// How long to wait for a response header from the upstream (default 600s).
    #[serde(default)]
    pub ttfb_timeout: Option<Dur>,
    /// No new attempt starts after this long since the request arrived.
    #[serde(default)]
    pub deadline: Option<Dur>,
    /// Order of upstreams per request: `fallback` (default), `weighted`, `fastest`.
    #[serde(default)]
    pub strategy: Option<crate::strategy::Strategy>,
    /// Weights for `weighted`, one per upstream in `upstreams` (default 1 each).
    #[serde(default)]
    pub weights: Vec<u32>,
    /// Share of requests `fastest` sends elsewhere to keep measuring (default 0.05).
    #[serde(default)]
    pub explore: Option<f64>,
    /// `openai`: the route takes OpenAI chat completion requests and its upstreams, all
    /// `api: anthropic`, get them as Anthropic Messages requests.
    #[serde(default)]
    pub translate: Option<String>,
    /// With `translate`: `max_tokens` sent when the client set none (default 4096; Anthropic
    /// requires one).
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    /// Answer identical requests from the response cache.
    #[serde(default)]
    pub cache: Option<RouteCacheFile>,
    /// `prompt` or `none` for this route's requests, whatever its upstreams say (unset: each
    /// upstream's own `affinity`).
    #[serde(default)]
    pub affinity: Option<crate::keys::Affinity>,
}
