//! Background upkeep: probing disabled keys back into rotation, checking keys suspected of an
//! empty quota, returning ejected endpoints when their time is up, and keep-warm pings.
//!
//! Why two probe kinds: listing models is free, so `GET /v1/models` proves a key authenticates
//! but says nothing about quota; a quota failure needs a 1-token completion on a cheap model.

use crate::keys::{DisableReason, KeyIndex};
use crate::retry_after;
use crate::upstream::probe::{self, ProbeAnswer, ProbeRequest};
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use log::{debug, info};
use parking_lot::Mutex;
use pingora_core::connectors::http::Connector;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// How often the upkeep loop looks for due work.
const TICK: Duration = Duration::from_millis(200);
/// Timeout of one probe or ping.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two quota checks of the same key.
const SUSPECT_SPACING: Duration = Duration::from_secs(30);

/// A key whose 429 may mean an empty quota rather than a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Suspect {
    /// Upstream index.
    pub upstream: usize,
    /// Key index.
    pub key: KeyIndex,
}

/// Sending side, held by the proxy.
pub type SuspectSender = UnboundedSender<Suspect>;

/// Makes the channel between the proxy and the prober.
pub fn suspect_channel() -> (SuspectSender, UnboundedReceiver<Suspect>) {
    tokio::sync::mpsc::unbounded_channel()
}

/// What a probe answer says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// The key works: put it back.
    Works,
    /// The key works but is rate limited right now: put it back cooling.
    WorksButLimited,
    /// Still refused, for this reason.
    Dead(DisableReason),
    /// The upstream itself failed; try again later.
    Inconclusive,
}

/// Reads a probe answer.
pub fn judge_probe(answer: &ProbeAnswer) -> ProbeVerdict {
    match answer.status {
        200..=299 => ProbeVerdict::Works,
        401 => ProbeVerdict::Dead(DisableReason::Unauthorized),
        403 => ProbeVerdict::Dead(DisableReason::Forbidden),
        429 if retry_after::quota_error_code(&answer.body).is_some() => {
            ProbeVerdict::Dead(DisableReason::InsufficientQuota)
        }
        429 => ProbeVerdict::WorksButLimited,
        // A 4xx other than these means the key was accepted and the request judged.
        400..=499 => ProbeVerdict::Works,
        _ => ProbeVerdict::Inconclusive,
    }
}

struct Inner {
    upstreams: Arc<[Upstream]>,
    connector: Connector,
    /// When each disabled key was last probed (or first seen disabled).
    last_probe: Mutex<HashMap<(usize, KeyIndex), Instant>>,
    /// When each suspect was last checked.
    last_suspect: Mutex<HashMap<(usize, KeyIndex), Instant>>,
    in_flight: Mutex<HashSet<(usize, KeyIndex)>>,
    last_ping: Mutex<HashMap<usize, Instant>>,
}

/// The background service.
pub struct Prober {
    inner: Arc<Inner>,
    rx: Mutex<Option<UnboundedReceiver<Suspect>>>,
}

impl Prober {
    /// A prober for every upstream in `upstreams`, fed suspects through `rx`.
    pub fn new(upstreams: Arc<[Upstream]>, rx: UnboundedReceiver<Suspect>) -> Self {
        Self {
            inner: Arc::new(Inner {
                upstreams,
                connector: Connector::new(None),
                last_probe: Mutex::new(HashMap::new()),
                last_suspect: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashSet::new()),
                last_ping: Mutex::new(HashMap::new()),
            }),
            rx: Mutex::new(Some(rx)),
        }
    }
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut rx = self.rx.lock().take();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.inner.clone().tick(),
                Some(s) = recv(&mut rx) => self.inner.clone().check_suspect(s),
            }
        }
    }
}

async fn recv(rx: &mut Option<UnboundedReceiver<Suspect>>) -> Option<Suspect> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

impl Inner {
    fn tick(self: Arc<Self>) {
        let now = Instant::now();
        for (u, up) in self.upstreams.iter().enumerate() {
            up.return_ejected();
            let disabled = up.keys.disabled();
            {
                let mut last = self.last_probe.lock();
                last.retain(|(lu, lk), _| *lu != u || disabled.iter().any(|(k, _)| k == lk));
            }
            for (k, reason) in disabled {
                let due = {
                    let mut last = self.last_probe.lock();
                    // The first sighting starts the clock: the key has just failed.
                    let seen = *last.entry((u, k)).or_insert(now);
                    now.duration_since(seen) >= up.probe_interval
                };
                if due && self.in_flight.lock().insert((u, k)) {
                    self.last_probe.lock().insert((u, k), now);
                    tokio::spawn(self.clone().probe_disabled(u, k, reason));
                }
            }
            if let Some(kw) = &up.keep_warm {
                let since_ping = self
                    .last_ping
                    .lock()
                    .get(&u)
                    .map(|t| now.duration_since(*t));
                if up.idle_for() >= kw.every && since_ping.is_none_or(|d| d >= kw.every) {
                    self.last_ping.lock().insert(u, now);
                    tokio::spawn(self.clone().keep_warm(u));
                }
            }
        }
    }

    fn check_suspect(self: Arc<Self>, s: Suspect) {
        let now = Instant::now();
        {
            let mut last = self.last_suspect.lock();
            if last
                .get(&(s.upstream, s.key))
                .is_some_and(|t| now.duration_since(*t) < SUSPECT_SPACING)
            {
                return;
            }
            last.insert((s.upstream, s.key), now);
        }
        if !self.in_flight.lock().insert((s.upstream, s.key)) {
            return;
        }
        tokio::spawn(async move {
            let up = &self.upstreams[s.upstream];
            let answer = probe::send(
                &self.connector,
                up,
                Some(s.key),
                &completion(up),
                PROBE_TIMEOUT,
            )
            .await;
            if let Ok(a) = &answer {
                if judge_probe(a) == ProbeVerdict::Dead(DisableReason::InsufficientQuota) {
                    up.keys.disable(s.key, DisableReason::InsufficientQuota);
                }
            }
            self.in_flight.lock().remove(&(s.upstream, s.key));
        });
    }

    async fn probe_disabled(self: Arc<Self>, u: usize, k: KeyIndex, reason: DisableReason) {
        let up = &self.upstreams[u];
        let req = if reason.needs_completion_probe() {
            completion(up)
        } else {
            ProbeRequest {
                method: "GET",
                path: "/v1/models",
                body: None,
            }
        };
        match probe::send(&self.connector, up, Some(k), &req, PROBE_TIMEOUT).await {
            Ok(answer) => match judge_probe(&answer) {
                ProbeVerdict::Works => {
                    info!(
                        "key {}/{}: probe passed ({})",
                        up.name,
                        up.keys.name(k),
                        answer.status
                    );
                    up.keys.enable(k);
                }
                ProbeVerdict::WorksButLimited => {
                    info!(
                        "key {}/{}: probe passed but rate limited",
                        up.name,
                        up.keys.name(k)
                    );
                    up.keys.enable(k);
                    up.keys.cool_down(k, crate::keys::ALL_MODELS, None);
                }
                ProbeVerdict::Dead(r) => debug!("key {}/{}: still {r}", up.name, up.keys.name(k)),
                ProbeVerdict::Inconclusive => {
                    debug!(
                        "key {}/{}: probe inconclusive ({})",
                        up.name,
                        up.keys.name(k),
                        answer.status
                    )
                }
            },
            Err(e) => debug!("key {}/{}: probe failed: {e}", up.name, up.keys.name(k)),
        }
        self.in_flight.lock().remove(&(u, k));
    }

    async fn keep_warm(self: Arc<Self>, u: usize) {
        let up: &Upstream = &self.upstreams[u];
        let Some(kw) = up.keep_warm.as_ref() else {
            return;
        };
        let key = if up.keys.is_empty() {
            None
        } else {
            // Without picking: a ping must not move the rotation past a key.
            let Some(k) = up.keys.peek(crate::keys::ALL_MODELS, &[]) else {
                return;
            };
            Some(k)
        };
        let req = ProbeRequest {
            method: if kw.body.is_some() { "POST" } else { "GET" },
            path: &kw.path,
            body: kw.body.clone().map(Bytes::from),
        };
        match probe::send(&self.connector, up, key, &req, PROBE_TIMEOUT).await {
            Ok(a) => debug!("upstream {}: keep-warm ping answered {}", up.name, a.status),
            Err(e) => info!("upstream {}: keep-warm ping failed: {e}", up.name),
        }
    }
}

fn completion(up: &Upstream) -> ProbeRequest<'static> {
    let body = serde_json::json!({
        "model": up.probe_model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    });
    ProbeRequest {
        method: "POST",
        path: "/v1/chat/completions",
        body: Some(Bytes::from(body.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> ProbeAnswer {
        ProbeAnswer {
            status,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn quota_errors_keep_a_key_dead_but_plain_429_means_it_works() {
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(
            judge_probe(&answer(429, quota)),
            ProbeVerdict::Dead(DisableReason::InsufficientQuota)
        );
        assert_eq!(
            judge_probe(&answer(429, "{}")),
            ProbeVerdict::WorksButLimited
        );
    }

    #[test]
    fn auth_failures_stay_dead_and_success_revives() {
        assert_eq!(
            judge_probe(&answer(401, "")),
            ProbeVerdict::Dead(DisableReason::Unauthorized)
        );
        assert_eq!(
            judge_probe(&answer(403, "")),
            ProbeVerdict::Dead(DisableReason::Forbidden)
        );
        assert_eq!(judge_probe(&answer(200, "")), ProbeVerdict::Works);
        assert_eq!(judge_probe(&answer(503, "")), ProbeVerdict::Inconclusive);
    }
}
