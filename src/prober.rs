//! Background upkeep: probing disabled keys back into rotation, checking keys suspected of an
//! empty quota, returning ejected endpoints when their time is up, and keep-warm pings.
//!
//! Why two probe kinds: listing models is free, so `GET /v1/models` proves a key authenticates
//! but says nothing about quota; a quota failure needs a 1-token completion on a cheap model.
//!
//! Only an answer that judges the key counts: a 4xx other than 401, 403 and 429 means the
//! upstream refused the probe request itself (`404 model_not_found` for a wrong `probe_model`,
//! a relay that serves no `GET /v1/models`), so it proves nothing and never re-enables a key.
//! A refused models listing is followed by a completion probe (which also proves the key
//! authenticates); a refused completion leaves the key disabled and says so in a WARN line, once
//! per key and status, naming the key and `probe_model`.

use crate::config::Api;
use crate::error_body;
use crate::key_activity::KeyActivity;
use crate::keys::{DisableReason, KeyIndex};
use crate::retry_after;
use crate::upstream::probe::{self, ProbeAnswer, ProbeRequest};
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use log::{debug, info, warn};
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

/// A key the proxy suspects of being unusable, though the answer it saw did not prove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Suspect {
    /// Upstream index.
    pub upstream: usize,
    /// Key index.
    pub key: KeyIndex,
    /// What the key is suspected of.
    pub kind: SuspectKind,
}

/// What a suspect key may be guilty of, and so how it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspectKind {
    /// A 429 without a rate-limit header may mean an empty quota: a 1-token completion tells.
    EmptyQuota,
    /// A 403 may refuse the request (a model, a region) or the key: `GET /v1/models` tells.
    Refused,
}

/// Sending side, held by the proxy.
pub type SuspectSender = UnboundedSender<Suspect>;

/// Makes the channel between the proxy and the prober.
pub fn suspect_channel() -> (SuspectSender, UnboundedReceiver<Suspect>) {
    tokio::sync::mpsc::unbounded_channel()
}

/// Which probe a key gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// `GET /v1/models`: free; proves the key authenticates, says nothing about quota.
    Models,
    /// A 1-token completion on the upstream's `probe_model`: proves the key can be used.
    Completion,
}

impl ProbeKind {
    /// The first probe for a key disabled for `reason`.
    pub fn for_reason(reason: DisableReason) -> Self {
        if reason.needs_completion_probe() {
            Self::Completion
        } else {
            Self::Models
        }
    }

    /// What to try after the upstream refused this probe's request
    /// ([`ProbeVerdict::Refused`]): a refused models listing proves nothing (the upstream may
    /// not serve that path), so a completion follows; after a refused completion nothing is
    /// left to try.
    pub fn after_refusal(self) -> Option<Self> {
        match self {
            Self::Models => Some(Self::Completion),
            Self::Completion => None,
        }
    }
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
    /// The upstream refused the probe request itself (a 4xx other than 401, 403 and 429: an
    /// unknown model or path, a bad parameter): the key was not judged and stays as it is.
    Refused {
        /// The status of the refusal.
        status: u16,
    },
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
        400 if error_body::is_credit_exhausted(&answer.body) => {
            ProbeVerdict::Dead(DisableReason::InsufficientQuota)
        }
        status @ 400..=499 => ProbeVerdict::Refused { status },
        _ => ProbeVerdict::Inconclusive,
    }
}

/// Remembers which (upstream, key, status) refusals were logged, so that a misconfigured probe
/// warns once rather than at every probe interval.
#[derive(Debug, Default)]
pub struct RefusalLog(Mutex<HashSet<(usize, KeyIndex, u16)>>);

impl RefusalLog {
    /// True the first time this key's probe is refused with `status` (since it last worked).
    pub fn first(&self, upstream: usize, key: KeyIndex, status: u16) -> bool {
        self.0.lock().insert((upstream, key, status))
    }

    /// The key's probe worked: a later refusal is news again.
    pub fn forget(&self, upstream: usize, key: KeyIndex) {
        self.0.lock().retain(|&(u, k, _)| (u, k) != (upstream, key));
    }
}

struct Inner {
    upstreams: Arc<[Upstream]>,
    connector: Connector,
    /// When each disabled key was last probed (or first seen disabled).
    last_probe: Mutex<HashMap<(usize, KeyIndex), Instant>>,
    /// When each suspect was last checked.
    last_suspect: Mutex<HashMap<Suspect, Instant>>,
    in_flight: Mutex<HashSet<(usize, KeyIndex)>>,
    last_ping: Mutex<HashMap<usize, Instant>>,
    refusals: RefusalLog,
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
                refusals: RefusalLog::default(),
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

/// Tells upstream `u`'s key activity when each of its keys is probed next: `interval` after its
/// last probe (or after it was first seen disabled) for a key in `last_probe`, which holds the
/// disabled keys only; none for every other key.
fn publish_next_probes(
    last_probe: &HashMap<(usize, KeyIndex), Instant>,
    u: usize,
    interval: Duration,
    activity: &KeyActivity,
) {
    for k in 0..activity.len() {
        let at = last_probe
            .get(&(u, k))
            .and_then(|seen| seen.checked_add(interval));
        activity.set_next_probe(k, at);
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
            // A key an operator disabled stays out until an operator enables it.
            let mut disabled = up.keys.disabled();
            disabled.retain(|(_, reason)| reason.probes_may_enable());
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
            publish_next_probes(&self.last_probe.lock(), u, up.probe_interval, &up.activity);
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
                .get(&s)
                .is_some_and(|t| now.duration_since(*t) < SUSPECT_SPACING)
            {
                return;
            }
            last.insert(s, now);
        }
        if !self.in_flight.lock().insert((s.upstream, s.key)) {
            return;
        }
        tokio::spawn(async move {
            let up = &self.upstreams[s.upstream];
            let request = match s.kind {
                SuspectKind::EmptyQuota => completion(up),
                SuspectKind::Refused => request(up, ProbeKind::Models),
            };
            let answer =
                probe::send(&self.connector, up, Some(s.key), &request, PROBE_TIMEOUT).await;
            if let Ok(a) = &answer {
                match (s.kind, judge_probe(a)) {
                    (
                        SuspectKind::EmptyQuota,
                        ProbeVerdict::Dead(DisableReason::InsufficientQuota),
                    ) => {
                        up.keys.disable(s.key, DisableReason::InsufficientQuota);
                    }
                    (SuspectKind::EmptyQuota, ProbeVerdict::Refused { status }) => {
                        self.warn_refused(s.upstream, s.key, status, "its quota cannot be checked");
                    }
                    (SuspectKind::Refused, ProbeVerdict::Dead(reason)) => {
                        up.keys.disable(s.key, reason);
                    }
                    (SuspectKind::Refused, ProbeVerdict::Works | ProbeVerdict::WorksButLimited) => {
                        info!(
                            "key {}/{}: authenticates; its refusal was about the request, so it rests for that model only",
                            up.name,
                            up.keys.name(s.key)
                        );
                    }
                    _ => {}
                }
            }
            self.in_flight.lock().remove(&(s.upstream, s.key));
        });
    }

    async fn probe_disabled(self: Arc<Self>, u: usize, k: KeyIndex, reason: DisableReason) {
        let up = &self.upstreams[u];
        let mut kind = ProbeKind::for_reason(reason);
        loop {
            let answer = match probe::send(
                &self.connector,
                up,
                Some(k),
                &request(up, kind),
                PROBE_TIMEOUT,
            )
            .await
            {
                Ok(answer) => answer,
                Err(e) => {
                    debug!("key {}/{}: probe failed: {e}", up.name, up.keys.name(k));
                    break;
                }
            };
            match judge_probe(&answer) {
                ProbeVerdict::Works => {
                    info!(
                        "key {}/{}: probe passed ({})",
                        up.name,
                        up.keys.name(k),
                        answer.status
                    );
                    self.refusals.forget(u, k);
                    up.keys.enable_if_still(k, reason);
                }
                ProbeVerdict::WorksButLimited => {
                    info!(
                        "key {}/{}: probe passed but rate limited",
                        up.name,
                        up.keys.name(k)
                    );
                    self.refusals.forget(u, k);
                    if up.keys.enable_if_still(k, reason) {
                        up.keys.cool_down(k, crate::keys::ALL_MODELS, None);
                    }
                }
                ProbeVerdict::Dead(r) => debug!("key {}/{}: still {r}", up.name, up.keys.name(k)),
                ProbeVerdict::Refused { status } => match kind.after_refusal() {
                    Some(next) => {
                        debug!(
                            "key {}/{}: {kind:?} probe refused ({status}), trying {next:?}",
                            up.name,
                            up.keys.name(k)
                        );
                        kind = next;
                        continue;
                    }
                    None => self.warn_refused(u, k, status, "it stays disabled"),
                },
                ProbeVerdict::Inconclusive => {
                    debug!(
                        "key {}/{}: probe inconclusive ({})",
                        up.name,
                        up.keys.name(k),
                        answer.status
                    )
                }
            }
            break;
        }
        self.in_flight.lock().remove(&(u, k));
    }

    /// A completion probe was refused as a request: says so once per key and status.
    fn warn_refused(&self, u: usize, k: KeyIndex, status: u16, consequence: &str) {
        if !self.refusals.first(u, k, status) {
            return;
        }
        let up = &self.upstreams[u];
        warn!(
            "key {}/{}: the probe completion was refused with {status}, which says nothing \
             about the key: probe_model {:?} is probably wrong for this upstream; {consequence}",
            up.name,
            up.keys.name(k),
            up.probe_model
        );
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

/// The request a `kind` probe of `up` sends (also used by the admin API's `test`).
pub fn request(up: &Upstream, kind: ProbeKind) -> ProbeRequest<'static> {
    match kind {
        ProbeKind::Models => ProbeRequest {
            method: "GET",
            path: "/v1/models",
            body: None,
        },
        ProbeKind::Completion => completion(up),
    }
}

/// The cheapest request that proves a key can be used: one token of `probe_model`, in the API
/// the upstream speaks (`GET /v1/models` is the same path at both and needs no change).
fn completion(up: &Upstream) -> ProbeRequest<'static> {
    if up.api == Api::Anthropic {
        let body = serde_json::json!({
            "model": up.probe_model,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
        });
        return ProbeRequest {
            method: "POST",
            path: "/v1/messages",
            body: Some(Bytes::from(body.to_string())),
        };
    }
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
    fn an_anthropic_credit_refusal_keeps_the_key_dead_but_other_400s_do_not_judge_it() {
        let credit = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#;
        assert_eq!(
            judge_probe(&answer(400, credit)),
            ProbeVerdict::Dead(DisableReason::InsufficientQuota)
        );
        let other = r#"{"type":"error","error":{"type":"invalid_request_error","message":"model: not found"}}"#;
        assert_eq!(
            judge_probe(&answer(400, other)),
            ProbeVerdict::Refused { status: 400 }
        );
        let overloaded =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            judge_probe(&answer(529, overloaded)),
            ProbeVerdict::Inconclusive
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

    #[test]
    fn a_refused_probe_request_does_not_revive_the_key() {
        let model_not_found = r#"{"error":{"message":"The model `gpt-4o-mini` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#;
        for (status, body) in [(404, model_not_found), (400, "{}"), (422, ""), (405, "")] {
            assert_eq!(
                judge_probe(&answer(status, body)),
                ProbeVerdict::Refused { status },
                "{status}"
            );
        }
    }

    #[test]
    fn a_refused_models_listing_is_followed_by_a_completion_and_that_is_the_last_word() {
        assert_eq!(
            ProbeKind::for_reason(DisableReason::Unauthorized),
            ProbeKind::Models
        );
        assert_eq!(
            ProbeKind::for_reason(DisableReason::Forbidden),
            ProbeKind::Models
        );
        assert_eq!(
            ProbeKind::for_reason(DisableReason::InsufficientQuota),
            ProbeKind::Completion
        );
        assert_eq!(
            ProbeKind::Models.after_refusal(),
            Some(ProbeKind::Completion)
        );
        assert_eq!(ProbeKind::Completion.after_refusal(), None);
    }

    #[test]
    fn a_refusal_is_logged_once_per_key_and_status_until_the_key_works() {
        let log = RefusalLog::default();
        assert!(log.first(0, 1, 404));
        assert!(!log.first(0, 1, 404));
        assert!(log.first(0, 1, 400), "another reason");
        assert!(log.first(0, 2, 404), "another key");
        assert!(log.first(1, 1, 404), "another upstream");
        log.forget(0, 1);
        assert!(log.first(0, 1, 404));
        assert!(!log.first(0, 2, 404), "other keys untouched");
    }

    #[test]
    fn the_next_probe_is_published_for_disabled_keys_of_this_upstream_only() {
        let clock = crate::clock::ManualClock::new();
        let activity = KeyActivity::new(3, clock.clone());
        let seen = crate::clock::Clock::now(&*clock);
        let interval = Duration::from_secs(30);
        let mut last = HashMap::new();
        last.insert((0, 1), seen);
        last.insert((1, 0), seen); // another upstream's key 0
        publish_next_probes(&last, 0, interval, &activity);
        clock.advance(Duration::from_secs(5));
        let next = |k| activity.snapshot(k).next_probe_in_ms;
        assert_eq!((next(0), next(1), next(2)), (None, Some(25_000), None));
        // Probed again: the countdown restarts from then.
        last.insert((0, 1), crate::clock::Clock::now(&*clock));
        publish_next_probes(&last, 0, interval, &activity);
        assert_eq!(next(1), Some(30_000));
        // Back in rotation, the key leaves the table and its next probe goes.
        last.remove(&(0, 1));
        publish_next_probes(&last, 0, interval, &activity);
        assert_eq!(next(1), None);
    }
}
