//! Prometheus metrics (prefix `keygate_`) and the side port that serves them with `/healthz`
//! and `/readyz`.
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
    /// Answers keygate wrote itself, by reason.
    pub local_responses: IntCounterVec,
    /// Client requests refused by client limits, by client and reason.
    pub client_rejections: IntCounterVec,
    /// Connections the request-header guard closed, by reason.
    pub connection_closes: IntCounterVec,
    models: ModelLabels,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition is valid")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric definition is valid")
}

/// Buckets from 5 ms to 10 min: LLM calls range from fast embeddings to long generations.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        600.0,
    ]
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Metrics {
            requests: counter(
                "keygate_requests_total",
                "Requests served, by route, upstream and status.",
                &["route", "upstream", "status"],
            ),
            request_duration: histogram(
                "keygate_request_duration_seconds",
                "Time from request to the end of the response, by route.",
                &["route"],
                latency_buckets(),
            ),
            ttfb: histogram(
                "keygate_ttfb_seconds",
                "Time from sending an attempt to the upstream's response header, by upstream.",
                &["upstream"],
                latency_buckets(),
            ),
            attempts: counter(
                "keygate_upstream_attempts_total",
                "Upstream attempts by outcome.",
                &["upstream", "outcome"],
            ),
            retries: counter(
                "keygate_retries_total",
                "Attempts after the first, by route.",
                &["route"],
            ),
            cooldowns: counter(
                "keygate_key_cooldowns_total",
                "Keys taken out of rotation, by key and reason.",
                &["upstream", "key", "reason"],
            ),
            tokens: counter(
                "keygate_tokens_total",
                "Tokens reported by upstreams, by model, upstream, client and kind.",
                &["model", "upstream", "client", "kind"],
            ),
            in_flight: IntGauge::new("keygate_in_flight_requests", "Requests being served.")
                .expect("static metric definition is valid"),
            local_responses: counter(
                "keygate_local_responses_total",
                "Answers keygate wrote itself, by reason.",
                &["reason"],
            ),
            client_rejections: counter(
                "keygate_client_rejections_total",
                "Client requests refused by client limits, by client and reason.",
                &["client", "reason"],
            ),
            connection_closes: counter(
                "keygate_connection_closes_total",
                "Connections closed by the request-header guard: 408, 431, idle or silent.",
                &["reason"],
            ),
            models: ModelLabels::default(),
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.ttfb.clone()))?;
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.cooldowns.clone()))?;
        registry.register(Box::new(m.tokens.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.local_responses.clone()))?;
        registry.register(Box::new(m.client_rejections.clone()))?;
        registry.register(Box::new(m.connection_closes.clone()))?;
        Ok(m)
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
            "keygate_keys".into(),
            "Keys by upstream and state (ready, cooling, disabled).".into(),
            vec!["upstream".into(), "state".into()],
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
        let gauge = prometheus::IntGaugeVec::new(
            Opts::new(
                "keygate_keys",
                "Keys by upstream and state (ready, cooling, disabled).",
            ),
            &["upstream", "state"],
        )
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
}
