//! One upstream at run time: where it is, how it wants its key, its keys and its endpoints.
//!
//! Two levels of rotation: keys (credentials) live in keygate's [`KeyPool`]; endpoints
//! (resolved addresses) live in a Pingora `LoadBalancer`, health-checked in the background.

pub mod discovery;
pub mod probe;

use crate::append_only::AppendOnly;
use crate::clock::SharedClock;
use crate::config::{Api, AuthStyle, KeepWarm, UpstreamConfig};
use crate::header_rules::Credential;
use crate::key_activity::KeyActivity;
use crate::keys::{AddKeyError, KeyIndex, KeyPool, KeySpec};
use crate::outlier::{OutlierDetector, Verdict};
use discovery::DnsDiscovery;
use pingora_core::protocols::tls::CaType;
use pingora_core::services::background::{background_service, GenBackgroundService};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::WrappedX509;
use pingora_load_balancing::health_check::TcpHealthCheck;
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The endpoint pool of one upstream.
pub type Endpoints = LoadBalancer<RoundRobin>;

/// The background service that resolves and health-checks one upstream's endpoints.
pub type EndpointService = GenBackgroundService<Endpoints>;

/// One upstream, ready to serve requests.
pub struct Upstream {
    /// Its config name.
    pub name: String,
    /// Credential style.
    pub auth: AuthStyle,
    /// The API it speaks.
    pub api: Api,
    /// Keys and their state.
    pub keys: Arc<KeyPool>,
    /// Each key's recent requests, errors and next probe, by the same index as `keys`.
    pub activity: Arc<KeyActivity>,
    /// Resolved, health-checked addresses.
    pub endpoints: Arc<Endpoints>,
    /// Value of the `Host` header sent upstream.
    pub host_header: http::HeaderValue,
    /// Path prefix put before the client's path.
    pub base_path: String,
    /// Interval between probes of a disabled key.
    pub probe_interval: Duration,
    /// Model for quota probes.
    pub probe_model: String,
    /// Keep-warm pings, when configured.
    pub keep_warm: Option<KeepWarm>,
    /// Consecutive-failure tracking per endpoint.
    pub outliers: OutlierDetector,
    /// Extra body text that marks an organisation-wide 429.
    pub org_limit_pattern: Option<String>,
    /// Each key's credential and account-scope headers, built once (marked sensitive).
    credentials: AppendOnly<Credential>,
    clock: SharedClock,
    born: std::time::Instant,
    /// Milliseconds after `born` of the last request sent (for keep-warm).
    last_activity_ms: AtomicU64,
    tls: bool,
    sni: String,
    ca: Option<Arc<CaType>>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the upstream and the background service that resolves and checks its endpoints.
    pub fn build(
        cfg: &UpstreamConfig,
        clock: SharedClock,
    ) -> (Upstream, GenBackgroundService<Endpoints>) {
        let ca = cfg.ca_certs.as_ref().map(|certs| {
            let list: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), pingora_core::utils::tls::parse_x509))
                .collect();
            Arc::<CaType>::from(list.into_boxed_slice())
        });
        let discovery = DnsDiscovery {
            upstream: cfg.name.clone(),
            host: cfg.host.clone(),
            port: cfg.port,
        };
        let mut lb = LoadBalancer::<RoundRobin>::from_backends(Backends::new(Box::new(discovery)));
        if let Some(interval) = cfg.health_interval {
            let mut check = if cfg.tls {
                TcpHealthCheck::new_tls(&cfg.host)
            } else {
                TcpHealthCheck::new()
            };
            check.peer_template.options.ca = ca.clone();
            check.peer_template.options.connection_timeout =
                Some(cfg.connect_timeout.min(Duration::from_secs(5)));
            lb.set_health_check(check);
            lb.health_check_frequency = Some(interval);
            lb.parallel_health_check = true;
        }
        lb.update_frequency = Some(cfg.resolve_every);
        let service = background_service(&format!("endpoints {}", cfg.name), lb);
        let endpoints = service.task();

        let upstream = Upstream {
            name: cfg.name.clone(),
            auth: cfg.auth,
            api: cfg.api,
            keys: Arc::new(
                KeyPool::new(
                    &cfg.name,
                    cfg.keys.clone(),
                    cfg.key_policy,
                    cfg.cooldown,
                    clock.clone(),
                )
                .resting_before_limit(cfg.rest_before_limit),
            ),
            activity: Arc::new(KeyActivity::new(cfg.keys.len(), clock.clone())),
            probe_interval: cfg.probe_interval,
            probe_model: cfg.probe_model.clone(),
            keep_warm: cfg.keep_warm.clone(),
            org_limit_pattern: cfg.org_limit_pattern.clone(),
            credentials: AppendOnly::new(
                cfg.keys
                    .iter()
                    .map(|k| {
                        Credential::new(
                            cfg.auth,
                            k.secret.expose(),
                            k.organization.as_deref(),
                            k.project.as_deref(),
                        )
                    })
                    .collect(),
            ),
            outliers: OutlierDetector::new(&cfg.name, cfg.outlier.clone(), clock.clone()),
            born: clock.now(),
            clock,
            last_activity_ms: AtomicU64::new(0),
            endpoints,
            host_header: cfg.host_header.clone(),
            base_path: cfg.base_path.clone(),
            tls: cfg.tls,
            sni: cfg.host.clone(),
            ca,
            connect_timeout: cfg.connect_timeout,
        };
        (upstream, service)
    }

    /// Picks a live endpoint, or `None` when every endpoint is down.
    pub fn pick_endpoint(&self) -> Option<Backend> {
        self.endpoints.select(b"", 256)
    }

    /// Builds the Pingora peer for one attempt on `endpoint`.
    pub fn peer(&self, endpoint: &Backend, ttfb_timeout: Duration) -> Option<HttpPeer> {
        let addr = *endpoint.addr.as_inet()?;
        // SNI is always the configured host: with rustls an empty SNI turns certificate checks off.
        let mut peer = HttpPeer::new(addr, self.tls, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout + Duration::from_secs(5));
        // Per read: bounds the wait for the response header; a flowing stream is never cut by it.
        peer.options.read_timeout = Some(ttfb_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        peer.options.ca = self.ca.clone();
        Some(peer)
    }

    /// What key `idx` puts on a request (`None` for `auth: none`).
    pub fn credential(&self, idx: usize) -> Option<&Credential> {
        self.credentials.get(idx)
    }

    /// Adds a key at run time; its index. Its credential and activity counters exist before
    /// any request can pick it.
    pub fn add_key(&self, key: KeySpec) -> Result<KeyIndex, AddKeyError> {
        let credential = Credential::new(
            self.auth,
            key.secret.expose(),
            key.organization.as_deref(),
            key.project.as_deref(),
        );
        self.keys.add_with(key, |idx| {
            let at = self.credentials.push(credential);
            debug_assert_eq!(at, idx, "credentials follow the pool's indices");
            self.activity.grow_to(idx + 1);
        })
    }

    /// Records an upstream answer from `endpoint`: a failure when the upstream's outlier policy
    /// counts its status (by default 502/503/504 only), a success otherwise.
    pub fn endpoint_answered(&self, endpoint: &Backend, status: u16) {
        if self.outliers.is_failure(status) {
            self.endpoint_failed(endpoint);
        } else {
            self.endpoint_ok(endpoint);
        }
    }

    /// Records a failure of `endpoint` (connect error, timeout, or an answer that counts);
    /// ejects it from rotation when it is an outlier.
    pub fn endpoint_failed(&self, endpoint: &Backend) {
        let Some(addr) = endpoint.addr.as_inet() else {
            return;
        };
        self.outliers
            .set_endpoint_count(self.endpoints.backends().get_backend().len());
        if let Verdict::Eject { .. } = self.outliers.on_failure(*addr) {
            // Pingora never re-enables a backend by itself: `return_ejected` does, when time is up.
            self.endpoints.backends().set_enable(endpoint, false);
        }
    }

    /// Records a good answer from `endpoint`.
    pub fn endpoint_ok(&self, endpoint: &Backend) {
        if let Some(addr) = endpoint.addr.as_inet() {
            self.outliers.on_success(*addr);
        }
    }

    /// Puts endpoints whose ejection time is over back into rotation (their health check still
    /// has to pass before traffic flows).
    pub fn return_ejected(&self) {
        for addr in self.outliers.due_returns() {
            let backend = Backend {
                addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: 1,
                ext: http::Extensions::new(),
            };
            self.endpoints.backends().set_enable(&backend, true);
        }
    }

    /// Notes that a request is being sent now.
    pub fn touch(&self) {
        let ms = self
            .clock
            .now()
            .saturating_duration_since(self.born)
            .as_millis();
        self.last_activity_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long since the last request was sent (or since start).
    pub fn idle_for(&self) -> Duration {
        let now = self.clock.now().saturating_duration_since(self.born);
        now.saturating_sub(Duration::from_millis(
            self.last_activity_ms.load(Ordering::Relaxed),
        ))
    }

    /// The path sent upstream: base path + the client's path and query.
    pub fn upstream_path(&self, client_path_and_query: &str) -> String {
        let mut p = String::with_capacity(self.base_path.len() + client_path_and_query.len());
        p.push_str(&self.base_path);
        p.push_str(client_path_and_query);
        p
    }
}
