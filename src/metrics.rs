//! Prometheus metrics (prefix `keygate_`) and the side port that serves them with `/healthz`
//! and `/readyz`. [`CATALOGUE`] lists every family (name, kind, labels, help); the families are
//! registered from it, and the deploy kit's dashboard and alerts are tested against it.
//!
//! Labels carry names from the config (routes, upstreams, key names) and model names; model
//! names come from clients, so [`ModelLabels`] caps how many distinct ones become labels.

use crate::keys::KeyPool;
use async_trait::async_trait;
use parking_lot::RwLock;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_prometheus::prometheus::{
    self, core::Collector, core::Desc, proto::MetricFamily, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Distinct model names kept as label values before the rest become `other`.
const MAX_MODEL_LABELS: usize = 200;

/// Every metric keygate records.
pub struct Metrics {
    /// Requests by route, upstream and final status.
    pub requests: IntCounterVec,
    /// Whole-request latency by route.
    pub request_duration: HistogramVec,
    /// Time to the upstream's response header, by upstream.
    pub ttfb: HistogramVec,
    /// Upstream attempts by outcome.
    pub attempts: IntCounterVec,
    /// Retries (attempts after the first) by route.
    pub retries: IntCounterVec,
    /// Key cooldowns and disablings by reason.
    pub cooldowns: IntCounterVec,
    /// Tokens by model, upstream, client and kind (prompt/completion).
    pub tokens: IntCounterVec,
    /// Requests being served.
    pub in_flight: IntGauge,
    /// Request-body bytes held against the buffer budget.
    pub buffered_body_bytes: IntGauge,
    /// Answers keygate wrote itself, by reason.
    pub local_responses: IntCounterVec,
    /// Client requests refused by client limits, by client and reason.
    pub client_rejections: IntCounterVec,
    /// Connections the request-header guard closed, by reason.
    pub connection_closes: IntCounterVec,
    /// Requests on cached routes by route and cache result (hit, miss, bypass).
    pub cache_requests: IntCounterVec,
    /// Bytes held by the response cache.
    pub cache_bytes: IntGauge,
    /// Tokens the upstream reported for answers served again from the cache, by route.
    pub cache_tokens_saved: IntCounterVec,
    /// 1 while the shared Redis answers, 0 while keygate goes on with local state.
    pub redis_up: IntGauge,
    /// Redis operation latency by operation.
    pub redis_op_duration: HistogramVec,
    /// Redis operations that failed or timed out, by operation.
    pub redis_errors: IntCounterVec,
    /// Key state changes sent to and applied from other instances.
    pub shared_key_events: IntCounterVec,
    /// Time from another instance's key state change to its application here.
    pub shared_key_event_delay: HistogramVec,
    models: ModelLabels,
}

/// What kind of Prometheus family a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only ever goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets: series `_bucket` (with `le`), `_sum` and `_count`.
    Histogram,
}

/// One metric family keygate exports: what dashboards and alerts may rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricInfo {
    /// The family name (`keygate_...`; histograms without their series suffixes).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Label names, in the order `with_label_values` takes their values.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const REQUESTS: MetricInfo = MetricInfo {
    name: "keygate_requests_total",
    kind: MetricKind::Counter,
    labels: &["route", "upstream", "status"],
    help: "Requests served, by route, upstream and status.",
};
const REQUEST_DURATION: MetricInfo = MetricInfo {
    name: "keygate_request_duration_seconds",
    kind: MetricKind::Histogram,
    labels: &["route"],
    help: "Time from request to the end of the response, by route.",
};
const TTFB: MetricInfo = MetricInfo {
    name: "keygate_ttfb_seconds",
    kind: MetricKind::Histogram,
    labels: &["upstream"],
    help: "Time from sending an attempt to the upstream's response header, by upstream.",
};
const ATTEMPTS: MetricInfo = MetricInfo {
    name: "keygate_upstream_attempts_total",
    kind: MetricKind::Counter,
    labels: &["upstream", "outcome"],
    help: "Upstream attempts by outcome.",
};
const RETRIES: MetricInfo = MetricInfo {
    name: "keygate_retries_total",
    kind: MetricKind::Counter,
    labels: &["route"],
    help: "Attempts after the first, by route.",
};
const KEYS: MetricInfo = MetricInfo {
    name: "keygate_keys",
    kind: MetricKind::Gauge,
    labels: &["upstream", "state"],
    help: "Keys by upstream and state (ready, cooling, disabled).",
};
const COOLDOWNS: MetricInfo = MetricInfo {
    name: "keygate_key_cooldowns_total",
    kind: MetricKind::Counter,
    labels: &["upstream", "key", "reason"],
    help: "Keys taken out of rotation, by key and reason.",
};
const TOKENS: MetricInfo = MetricInfo {
    name: "keygate_tokens_total",
    kind: MetricKind::Counter,
    labels: &["model", "upstream", "client", "kind"],
    help: "Tokens reported by upstreams, by model, upstream, client and kind.",
};
const IN_FLIGHT: MetricInfo = MetricInfo {
    name: "keygate_in_flight_requests",
    kind: MetricKind::Gauge,
    labels: &[],
    help: "Requests being served.",
};
const BUFFERED_BODY_BYTES: MetricInfo = MetricInfo {
    name: "keygate_buffered_body_bytes",
    kind: MetricKind::Gauge,
    labels: &[],
    help: "Request-body bytes held now against max_buffered_bytes.",
};
const LOCAL_RESPONSES: MetricInfo = MetricInfo {
    name: "keygate_local_responses_total",
    kind: MetricKind::Counter,
    labels: &["reason"],
    help: "Answers keygate wrote itself, by reason.",
};
const CLIENT_REJECTIONS: MetricInfo = MetricInfo {
    name: "keygate_client_rejections_total",
    kind: MetricKind::Counter,
    labels: &["client", "reason"],
    help: "Client requests refused by client limits, by client and reason.",
};
const CONNECTION_CLOSES: MetricInfo = MetricInfo {
    name: "keygate_connection_closes_total",
    kind: MetricKind::Counter,
    labels: &["reason"],
    help: "Connections closed by the request-header guard: 408, 431, idle or silent.",
};

const CACHE_REQUESTS: MetricInfo = MetricInfo {
    name: "keygate_cache_requests_total",
    kind: MetricKind::Counter,
    labels: &["route", "result"],
    help: "Requests on cached routes, by route and cache result (hit, miss, bypass).",
};
const CACHE_BYTES: MetricInfo = MetricInfo {
    name: "keygate_cache_bytes",
    kind: MetricKind::Gauge,
    labels: &[],
    help: "Bytes held by the response cache.",
};
const CACHE_TOKENS_SAVED: MetricInfo = MetricInfo {
    name: "keygate_cache_tokens_saved_total",
    kind: MetricKind::Counter,
    labels: &["route"],
    help: "Tokens of answers served from the response cache instead of the upstream, by route.",
};

const REDIS_UP: MetricInfo = MetricInfo {
    name: "keygate_redis_up",
    kind: MetricKind::Gauge,
    labels: &[],
    help: "1 while the shared Redis answers; 0 while state is kept locally (or no redis: section).",
};
const REDIS_OP_DURATION: MetricInfo = MetricInfo {
    name: "keygate_redis_op_duration_seconds",
    kind: MetricKind::Histogram,
    labels: &["op"],
    help: "Redis operation latency by operation.",
};
const REDIS_ERRORS: MetricInfo = MetricInfo {
    name: "keygate_redis_errors_total",
    kind: MetricKind::Counter,
    labels: &["op"],
    help: "Redis operations that failed or timed out, by operation.",
};
const SHARED_KEY_EVENTS: MetricInfo = MetricInfo {
    name: "keygate_shared_key_events_total",
    kind: MetricKind::Counter,
    labels: &["direction"],
    help: "Key state changes sent to other instances (sent) and applied from them (applied).",
};
const SHARED_KEY_EVENT_DELAY: MetricInfo = MetricInfo {
    name: "keygate_shared_key_event_delay_seconds",
    kind: MetricKind::Histogram,
    labels: &[],
    help: "Time from another instance's key state change to its application here.",
};

/// Every metric family keygate exports. The registrations below are built from these entries,
/// so the deploy kit's dashboard and alerts can be checked against this list.
pub const CATALOGUE: &[MetricInfo] = &[
    REQUESTS,
    REQUEST_DURATION,
    TTFB,
    ATTEMPTS,
    RETRIES,
    KEYS,
    COOLDOWNS,
    TOKENS,
    IN_FLIGHT,
    BUFFERED_BODY_BYTES,
    LOCAL_RESPONSES,
    CLIENT_REJECTIONS,
    CONNECTION_CLOSES,
    CACHE_REQUESTS,
    CACHE_BYTES,
    CACHE_TOKENS_SAVED,
    REDIS_UP,
    REDIS_OP_DURATION,
    REDIS_ERRORS,
    SHARED_KEY_EVENTS,
    SHARED_KEY_EVENT_DELAY,
];

fn opts(info: &MetricInfo) -> Opts {
    Opts::new(info.name, info.help)
}

fn counter(info: &MetricInfo) -> IntCounterVec {
    debug_assert_eq!(info.kind, MetricKind::Counter, "{}", info.name);
    IntCounterVec::new(opts(info), info.labels).expect("static metric definition is valid")
}

fn histogram(info: &MetricInfo, buckets: Vec<f64>) -> HistogramVec {
    debug_assert_eq!(info.kind, MetricKind::Histogram, "{}", info.name);
    let opts = HistogramOpts::new(info.name, info.help).buckets(buckets);
    HistogramVec::new(opts, info.labels).expect("static metric definition is valid")
}

fn gauge(info: &MetricInfo) -> IntGauge {
    debug_assert!(
        info.kind == MetricKind::Gauge && info.labels.is_empty(),
        "{}",
        info.name
    );
    IntGauge::with_opts(opts(info)).expect("static metric definition is valid")
}

/// Buckets from 5 ms to 10 min: LLM calls range from fast embeddings to long generations.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        600.0,
    ]
}

/// Buckets from 100 µs to 2.5 s: a loopback Redis answers in well under a millisecond, a
/// troubled one at the timeout.
fn redis_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ]
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            requests: counter(&REQUESTS),
            request_duration: histogram(&REQUEST_DURATION, latency_buckets()),
            ttfb: histogram(&TTFB, latency_buckets()),
            attempts: counter(&ATTEMPTS),
            retries: counter(&RETRIES),
            cooldowns: counter(&COOLDOWNS),
            tokens: counter(&TOKENS),
            in_flight: gauge(&IN_FLIGHT),
            buffered_body_bytes: gauge(&BUFFERED_BODY_BYTES),
            local_responses: counter(&LOCAL_RESPONSES),
            client_rejections: counter(&CLIENT_REJECTIONS),
            connection_closes: counter(&CONNECTION_CLOSES),
            cache_requests: counter(&CACHE_REQUESTS),
            cache_bytes: gauge(&CACHE_BYTES),
            cache_tokens_saved: counter(&CACHE_TOKENS_SAVED),
            redis_up: gauge(&REDIS_UP),
            redis_op_duration: histogram(&REDIS_OP_DURATION, redis_buckets()),
            redis_errors: counter(&REDIS_ERRORS),
            shared_key_events: counter(&SHARED_KEY_EVENTS),
            shared_key_event_delay: histogram(&SHARED_KEY_EVENT_DELAY, redis_buckets()),
            models: ModelLabels::default(),
        };
        for collector in m.collectors() {
            registry.register(collector)?;
        }
        Ok(m)
    }

    /// Every family of this struct, for registration (`keygate_keys` is [`KeyStateCollector`]'s).
    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.ttfb.clone()),
            Box::new(self.attempts.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.cooldowns.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.buffered_body_bytes.clone()),
            Box::new(self.local_responses.clone()),
            Box::new(self.client_rejections.clone()),
            Box::new(self.connection_closes.clone()),
            Box::new(self.cache_requests.clone()),
            Box::new(self.cache_bytes.clone()),
            Box::new(self.cache_tokens_saved.clone()),
            Box::new(self.redis_up.clone()),
            Box::new(self.redis_op_duration.clone()),
            Box::new(self.redis_errors.clone()),
            Box::new(self.shared_key_events.clone()),
            Box::new(self.shared_key_event_delay.clone()),
        ]
    }

    /// The label value for a model name (bounded cardinality).
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        self.models.label(model)
    }
}

/// The series every successful request records, looked up once per route and upstream.
///
/// A label lookup hashes each label value (SipHash) under a lock: four of them per request were
/// the largest item of keygate's own code in the profile.
pub struct RequestSeries {
    /// `request_duration` by route index.
    duration: Vec<Histogram>,
    /// `ttfb` by upstream index.
    ttfb: Vec<Histogram>,
    /// `attempts{outcome="success"}` by upstream index.
    attempt_ok: Vec<IntCounter>,
    /// `requests{status="200"}` by route: `(upstream index, series)` for the route's upstreams.
    request_ok: Vec<Vec<(usize, IntCounter)>>,
}

impl RequestSeries {
    /// Resolves the series of these routes (name, upstream indexes) and upstream names, both in
    /// config order.
    pub fn new(metrics: &Metrics, routes: &[(&str, &[usize])], upstreams: &[&str]) -> Self {
        RequestSeries {
            duration: routes
                .iter()
                .map(|(r, _)| metrics.request_duration.with_label_values(&[*r]))
                .collect(),
            ttfb: upstreams
                .iter()
                .map(|u| metrics.ttfb.with_label_values(&[*u]))
                .collect(),
            attempt_ok: upstreams
                .iter()
                .map(|u| {
                    let ok = crate::outcome::Outcome::Success.label();
                    metrics.attempts.with_label_values(&[*u, ok])
                })
                .collect(),
            request_ok: routes
                .iter()
                .map(|(r, ups)| {
                    ups.iter()
                        .filter_map(|&i| {
                            let u = upstreams.get(i)?;
                            Some((i, metrics.requests.with_label_values(&[*r, *u, "200"])))
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// `keygate_request_duration_seconds` of route `route`.
    pub fn duration(&self, route: usize) -> Option<&Histogram> {
        self.duration.get(route)
    }

    /// `keygate_ttfb_seconds` of upstream `upstream`.
    pub fn ttfb(&self, upstream: usize) -> Option<&Histogram> {
        self.ttfb.get(upstream)
    }

    /// `keygate_upstream_attempts_total{outcome="success"}` of upstream `upstream`.
    pub fn attempt_ok(&self, upstream: usize) -> Option<&IntCounter> {
        self.attempt_ok.get(upstream)
    }

    /// `keygate_requests_total{status="200"}` of a route and upstream.
    pub fn request_ok(&self, route: usize, upstream: usize) -> Option<&IntCounter> {
        let ups = self.request_ok.get(route)?;
        ups.iter().find(|(u, _)| *u == upstream).map(|(_, c)| c)
    }
}

/// The process-wide metrics, registered in Prometheus's default registry on first use.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        Metrics::new(prometheus::default_registry()).unwrap_or_else(|e| {
            // Only a second registration of the same names can fail; fall back to a private registry.
            log::error!("metrics registration failed: {e}");
            Metrics::new(&Registry::new()).expect("a fresh registry accepts the metrics")
        })
    })
}

/// Caps the distinct model names used as label values.
#[derive(Default)]
pub struct ModelLabels {
    seen: RwLock<HashSet<String>>,
}

impl ModelLabels {
    /// `model` itself while fewer than the cap have been seen, else `other`.
    pub fn label<'a>(&self, model: &'a str) -> &'a str {
        if self.seen.read().contains(model) {
            return model;
        }
        let mut seen = self.seen.write();
        if seen.len() < MAX_MODEL_LABELS {
            seen.insert(model.to_string());
            model
        } else {
            "other"
        }
    }
}

/// Reports `keygate_keys{upstream,state}` from the key pools at scrape time.
pub struct KeyStateCollector {
    pools: Vec<Arc<KeyPool>>,
    desc: Desc,
}

impl KeyStateCollector {
    /// A collector over these pools.
    pub fn new(pools: Vec<Arc<KeyPool>>) -> Self {
        let desc = Desc::new(
            KEYS.name.into(),
            KEYS.help.into(),
            KEYS.labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )
        .expect("static metric definition is valid");
        Self { pools, desc }
    }
}

impl Collector for KeyStateCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let gauge = prometheus::IntGaugeVec::new(opts(&KEYS), KEYS.labels)
            .expect("static metric definition is valid");
        for pool in &self.pools {
            let c = pool.counts();
            let up = pool.upstream();
            for (state, n) in [
                ("ready", c.ready),
                ("cooling", c.cooling),
                ("disabled", c.disabled),
            ] {
                gauge
                    .with_label_values(&[up, state])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        gauge.collect()
    }
}

/// The metrics side port: `/metrics`, `/healthz`, `/readyz`.
pub struct MetricsApp {
    listeners: Vec<SocketAddr>,
    ready: AtomicBool,
}

impl MetricsApp {
    /// An app that reports ready once every proxy listener accepts connections.
    pub fn new(listeners: Vec<SocketAddr>) -> Self {
        Self {
            listeners,
            ready: AtomicBool::new(false),
        }
    }

    fn is_ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let up = self.listeners.iter().all(|addr| {
            let mut target = *addr;
            if target.ip().is_unspecified() {
                target.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
        });
        if up {
            self.ready.store(true, Ordering::Relaxed);
        }
        up
    }
}

fn text(status: u16, body: &str) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body.as_bytes().to_vec())
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/healthz" => text(200, "ok\n"),
            "/readyz" => {
                if self.is_ready() {
                    text(200, "ready\n")
                } else {
                    text(503, "starting\n")
                }
            }
            "/metrics" | "/" => {
                pingora_prometheus::PrometheusHttpApp
                    .response(session)
                    .await
            }
            _ => text(404, "not found: try /metrics, /healthz or /readyz\n"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::keys::{CooldownPolicy, DisableReason, KeyPolicy, KeySpec};
    use pingora_prometheus::prometheus::Encoder;

    #[test]
    fn request_series_are_the_labelled_series_of_each_route_and_its_upstreams() {
        let m = Metrics::new(&Registry::new()).unwrap();
        let routes: [(&str, &[usize]); 2] = [("chat", &[0, 1]), ("embed", &[1])];
        let series = RequestSeries::new(&m, &routes, &["openai", "azure"]);
        series.request_ok(0, 1).unwrap().inc();
        series.ttfb(1).unwrap().observe(0.5);
        series.duration(1).unwrap().observe(1.0);
        series.attempt_ok(0).unwrap().inc_by(2);
        assert_eq!(
            m.requests
                .with_label_values(&["chat", "azure", "200"])
                .get(),
            1
        );
        assert_eq!(m.ttfb.with_label_values(&["azure"]).get_sample_count(), 1);
        assert_eq!(
            m.request_duration
                .with_label_values(&["embed"])
                .get_sample_count(),
            1
        );
        assert_eq!(
            m.attempts.with_label_values(&["openai", "success"]).get(),
            2
        );
        // A route's series exist only for its own upstreams; unknown indexes have none.
        assert!(series.request_ok(1, 0).is_none());
        assert!(series.request_ok(2, 0).is_none());
        assert!(series.ttfb(2).is_none());
    }

    #[test]
    fn model_labels_are_capped() {
        let labels = ModelLabels::default();
        for i in 0..MAX_MODEL_LABELS {
            let m = format!("m{i}");
            assert_eq!(labels.label(&m), m);
        }
        assert_eq!(labels.label("one-too-many"), "other");
        assert_eq!(labels.label("m3"), "m3");
    }

    #[test]
    fn key_state_gauge_reflects_the_pool() {
        let keys = (0..3)
            .map(|i| KeySpec::named(format!("k{i}"), format!("sk-{i}")))
            .collect();
        let pool = Arc::new(KeyPool::new(
            "up",
            keys,
            KeyPolicy::RoundRobin,
            CooldownPolicy::default(),
            ManualClock::new(),
        ));
        pool.disable(0, DisableReason::Unauthorized);
        pool.cool_down(1, "", Some(Duration::from_secs(5)));
        let registry = Registry::new();
        registry
            .register(Box::new(KeyStateCollector::new(vec![pool])))
            .unwrap();
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(r#"keygate_keys{state="disabled",upstream="up"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"keygate_keys{state="cooling",upstream="up"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"keygate_keys{state="ready",upstream="up"} 1"#),
            "{out}"
        );
    }

    #[test]
    fn metrics_register_in_a_fresh_registry() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        m.requests.with_label_values(&["r", "u", "200"]).inc();
        assert!(registry
            .gather()
            .iter()
            .any(|f| f.name() == "keygate_requests_total"));
    }

    /// `(kind, sorted label names)` of every family, by name.
    type Families = std::collections::BTreeMap<String, (MetricKind, Vec<String>)>;

    #[test]
    fn every_registered_family_is_in_the_catalogue_with_its_labels_and_the_reverse() {
        use prometheus::proto::MetricType;
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        let pool = Arc::new(KeyPool::new(
            "up",
            vec![KeySpec::named("k", "sk-k")],
            KeyPolicy::RoundRobin,
            CooldownPolicy::default(),
            ManualClock::new(),
        ));
        registry
            .register(Box::new(KeyStateCollector::new(vec![pool])))
            .unwrap();
        // A labelled family is gathered only once it has a series.
        m.requests.with_label_values(&["r", "u", "200"]).inc();
        m.request_duration.with_label_values(&["r"]).observe(1.0);
        m.ttfb.with_label_values(&["u"]).observe(1.0);
        m.attempts.with_label_values(&["u", "success"]).inc();
        m.retries.with_label_values(&["r"]).inc();
        m.cooldowns
            .with_label_values(&["u", "k", "rate_limit"])
            .inc();
        m.tokens.with_label_values(&["m", "u", "c", "prompt"]).inc();
        m.local_responses.with_label_values(&["not_found"]).inc();
        m.client_rejections.with_label_values(&["c", "rpm"]).inc();
        m.connection_closes.with_label_values(&["idle"]).inc();
        m.cache_requests.with_label_values(&["r", "hit"]).inc();
        m.cache_tokens_saved.with_label_values(&["r"]).inc();
        m.redis_op_duration
            .with_label_values(&["op"])
            .observe(0.001);
        m.redis_errors.with_label_values(&["op"]).inc();
        m.shared_key_events.with_label_values(&["sent"]).inc();
        m.shared_key_event_delay
            .with_label_values::<&str>(&[])
            .observe(0.001);

        let mut registered = Families::new();
        for family in registry.gather() {
            let kind = match family.get_field_type() {
                MetricType::COUNTER => MetricKind::Counter,
                MetricType::GAUGE => MetricKind::Gauge,
                MetricType::HISTOGRAM => MetricKind::Histogram,
                other => panic!("{}: unexpected type {other:?}", family.name()),
            };
            let series = family.get_metric();
            let mut labels: Vec<String> = series[0]
                .get_label()
                .iter()
                .map(|l| l.name().to_string())
                .collect();
            labels.sort();
            // Every series of a family carries the same label names.
            for s in series {
                let mut own: Vec<String> =
                    s.get_label().iter().map(|l| l.name().to_string()).collect();
                own.sort();
                assert_eq!(own, labels, "{}", family.name());
            }
            let entry = CATALOGUE.iter().find(|c| c.name == family.name());
            assert_eq!(
                entry.map(|c| c.help),
                Some(family.help()),
                "{} is registered but not in the catalogue",
                family.name()
            );
            registered.insert(family.name().to_string(), (kind, labels));
        }
        let mut catalogue = Families::new();
        for info in CATALOGUE {
            let mut labels: Vec<String> = info.labels.iter().map(|l| l.to_string()).collect();
            labels.sort();
            let before = catalogue.insert(info.name.to_string(), (info.kind, labels));
            assert!(before.is_none(), "{} twice in the catalogue", info.name);
        }
        assert_eq!(registered, catalogue);
    }
}
