//! The admin API on its own listener: status of upstreams, keys, routes and clients; key
//! actions (disable, enable, test) on every key; and keys added and removed at run time
//! (through [`crate::key_store`]).
//!
//! [`auth`] decides who may ask, [`api`] what a request asks for, [`views`] the JSON answers;
//! [`Admin`] carries them out on the pools; [`app`] is the thin Pingora glue with the real
//! probes; [`cli`] is `keygate admin …` on top of the API; [`page`] is the status page a browser
//! opens at `/admin/`, which uses the API too. A passing `test` puts back a key disabled for a
//! non-manual reason, as a passing background probe would; it never changes a manually disabled
//! or a ready key.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod page;
pub mod views;

use crate::clients::limits::Limiter;
use crate::clock::SharedClock;
use crate::key_activity::KeyActivity;
use crate::key_store::{NewKey, RuntimeKeyError, RuntimeKeys};
use crate::keys::{DisableReason, KeyIndex, KeyPool, ALL_MODELS};
use crate::local_response::LocalResponse;
use crate::prober::{judge_probe, ProbeKind, ProbeVerdict};
use crate::upstream::probe::ProbeAnswer;
use api::{unknown_key, Action, AddKeyBody, AdminRequest, KeyVerb};
use async_trait::async_trait;
use auth::AdminAuth;
use log::info;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::Arc;
use views::{EndpointView, KeyView, Notes, RouteView, UpstreamView};

/// Who the admin token is, in the log of each change it makes.
const ACTOR: &str = "admin token";

/// Longest upstream message passed on from a test probe.
const MAX_MESSAGE_CHARS: usize = 300;

/// Minutes of request and error rates `GET /admin/v1/rates` answers with.
pub const RATE_MINUTES: usize = 15;

/// What the admin API needs from the network: endpoints and one probe.
#[async_trait]
pub trait Probes: Send + Sync {
    /// Upstream `u`'s endpoints now.
    fn endpoints(&self, u: usize) -> Vec<EndpointView>;
    /// Sends a `kind` probe to upstream `u` with key `k`; the error text names no secret.
    async fn send(&self, u: usize, k: KeyIndex, kind: ProbeKind) -> Result<ProbeAnswer, String>;
}

/// One upstream as the admin API sees it.
#[derive(Debug, Clone)]
pub struct AdminUpstream {
    /// Its name.
    pub name: String,
    /// `openai` or `anthropic`.
    pub api: &'static str,
    /// Its keys.
    pub keys: Arc<KeyPool>,
    /// What its keys did lately, by key index.
    pub activity: Arc<KeyActivity>,
}

/// An answer: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Vec<u8>,
}

impl AdminResponse {
    fn json(status: u16, value: &impl Serialize) -> Self {
        Self {
            status,
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    fn error(e: &LocalResponse) -> Self {
        Self {
            status: e.status,
            body: e.body().to_vec(),
        }
    }
}

/// The answer to `POST …/test`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestAnswer {
    /// Whether the upstream took the key (a 2xx, or a plain 429: the key works but is limited).
    pub ok: bool,
    /// The upstream's status.
    pub status: u16,
    /// What the upstream said, with any piece of the key and account ids masked.
    pub message: String,
}

/// The admin API's state and actions.
pub struct Admin {
    auth: AdminAuth,
    upstreams: Vec<AdminUpstream>,
    routes: Vec<RouteView>,
    clients: Vec<(String, Arc<Limiter>)>,
    probes: Arc<dyn Probes>,
    clock: SharedClock,
    notes: Mutex<Notes>,
    /// Adds and removes keys at run time; `None` when `admin.runtime_keys` is not configured.
    runtime: Option<Arc<RuntimeKeys>>,
}

impl Admin {
    /// The admin API over these upstreams, routes and clients.
    pub fn new(
        auth: AdminAuth,
        upstreams: Vec<AdminUpstream>,
        routes: Vec<RouteView>,
        clients: Vec<(String, Arc<Limiter>)>,
        probes: Arc<dyn Probes>,
        clock: SharedClock,
    ) -> Self {
        Self {
            auth,
            upstreams,
            routes,
            clients,
            probes,
            clock,
            notes: Mutex::new(Notes::new()),
            runtime: None,
        }
    }

    /// Lets the API add and remove keys through `runtime`.
    pub fn with_runtime_keys(mut self, runtime: Arc<RuntimeKeys>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Answers one request.
    pub async fn serve(&self, req: &AdminRequest<'_>) -> AdminResponse {
        match api::parse(&self.auth, req) {
            Err(e) => AdminResponse::error(&e),
            Ok(Action::Status) => AdminResponse::json(200, &self.status()),
            Ok(Action::Keys) => {
                AdminResponse::json(200, &serde_json::json!({ "keys": self.keys() }))
            }
            Ok(Action::AddKey { upstream, key }) => self.add_key(&upstream, key).await,
            Ok(Action::RemoveKey { upstream, key }) => self.remove_key(&upstream, &key).await,
            Ok(Action::Rates) => AdminResponse::json(200, &self.rates()),
            Ok(Action::Key {
                upstream,
                key,
                verb,
                note,
            }) => match self.find(&upstream, &key) {
                Err(e) => AdminResponse::error(&e),
                Ok((u, k)) => match verb {
                    KeyVerb::Disable => self.disable(u, k, note),
                    KeyVerb::Enable => self.enable(u, k),
                    KeyVerb::Test => self.test(u, k).await,
                },
            },
        }
    }

    fn find(&self, upstream: &str, key: &str) -> Result<(usize, KeyIndex), LocalResponse> {
        let u = self
            .upstreams
            .iter()
            .position(|x| x.name == upstream)
            .ok_or_else(|| unknown_key(upstream, None))?;
        let k = self.upstreams[u]
            .keys
            .index_of(key)
            .ok_or_else(|| unknown_key(upstream, Some(key)))?;
        Ok((u, k))
    }

    fn keys(&self) -> Vec<KeyView> {
        let notes = self.notes.lock();
        self.upstreams
            .iter()
            .flat_map(|u| views::keys(&u.keys, &u.activity, &notes))
            .collect()
    }

    fn key_view(&self, u: usize, k: KeyIndex) -> Option<KeyView> {
        let up = &self.upstreams[u];
        let name = up.keys.name(k);
        views::keys(&up.keys, &up.activity, &self.notes.lock())
            .into_iter()
            .find(|v| v.name == name)
    }

    fn runtime(&self) -> Result<&RuntimeKeys, LocalResponse> {
        self.runtime.as_deref().ok_or_else(|| {
            LocalResponse::new(
                409,
                "invalid_request_error",
                "runtime_keys_off",
                "runtime keys are off: configure admin.runtime_keys with master_key_env (32 bytes, e.g. from `openssl rand -hex 32`) to add and remove keys at run time",
            )
        })
    }

    async fn add_key(&self, upstream: &str, body: AddKeyBody) -> AdminResponse {
        let runtime = match self.runtime() {
            Ok(r) => r,
            Err(e) => return AdminResponse::error(&e),
        };
        let key = NewKey {
            name: body.name,
            secret: body.secret,
            account: body.account,
            weight: body.weight,
        };
        let Some(u) = self.upstreams.iter().position(|x| x.name == upstream) else {
            return AdminResponse::error(&unknown_key(upstream, None));
        };
        match runtime.add(upstream, key, ACTOR).await {
            Ok(k) => AdminResponse::json(201, &serde_json::json!({ "key": self.key_view(u, k) })),
            Err(e) => AdminResponse::error(&runtime_error(&e)),
        }
    }

    async fn remove_key(&self, upstream: &str, key: &str) -> AdminResponse {
        let runtime = match self.runtime() {
            Ok(r) => r,
            Err(e) => return AdminResponse::error(&e),
        };
        match runtime.remove(upstream, key, ACTOR).await {
            Ok(()) => {
                self.notes
                    .lock()
                    .remove(&(upstream.to_string(), key.to_string()));
                AdminResponse::json(
                    200,
                    &serde_json::json!({ "removed": true, "upstream": upstream, "key": key }),
                )
            }
            Err(e) => AdminResponse::error(&runtime_error(&e)),
        }
    }

    fn rates(&self) -> views::RatesView {
        views::RatesView {
            minutes: RATE_MINUTES,
            upstreams: self
                .upstreams
                .iter()
                .map(|u| {
                    let r = u.activity.per_minute(RATE_MINUTES);
                    views::UpstreamRates {
                        name: u.name.clone(),
                        requests: r.requests,
                        errors: r.errors,
                    }
                })
                .collect(),
        }
    }

    fn status(&self) -> serde_json::Value {
        let notes = self.notes.lock().clone();
        let upstreams: Vec<UpstreamView> = self
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| UpstreamView {
                name: u.name.clone(),
                api: u.api,
                endpoints: self.probes.endpoints(i),
                keys: views::keys(&u.keys, &u.activity, &notes),
            })
            .collect();
        let now = self.clock.wall();
        let clients: Vec<_> = self
            .clients
            .iter()
            .map(|(name, l)| views::client(name, l, now))
            .collect();
        serde_json::json!({
            "upstreams": upstreams,
            "routes": self.routes,
            "clients": clients,
        })
    }

    fn disable(&self, u: usize, k: KeyIndex, note: Option<String>) -> AdminResponse {
        let up = &self.upstreams[u];
        let name = up.keys.name(k).to_string();
        {
            let mut notes = self.notes.lock();
            match &note {
                Some(n) => notes.insert((up.name.clone(), name.clone()), n.clone()),
                None => notes.remove(&(up.name.clone(), name.clone())),
            };
        }
        let changed = up.keys.disable_manually(k);
        info!(
            "admin: key {}/{name} disabled by {ACTOR}{}",
            up.name,
            if changed { "" } else { " (it already was)" }
        );
        self.key_answer(u, k, changed)
    }

    fn enable(&self, u: usize, k: KeyIndex) -> AdminResponse {
        let up = &self.upstreams[u];
        let name = up.keys.name(k).to_string();
        let changed = up.keys.enable(k);
        self.notes.lock().remove(&(up.name.clone(), name.clone()));
        info!(
            "admin: key {}/{name} enabled by {ACTOR}{}",
            up.name,
            if changed {
                ""
            } else {
                " (it was not disabled)"
            }
        );
        self.key_answer(u, k, changed)
    }

    fn key_answer(&self, u: usize, k: KeyIndex, changed: bool) -> AdminResponse {
        AdminResponse::json(
            200,
            &serde_json::json!({ "changed": changed, "key": self.key_view(u, k) }),
        )
    }

    async fn test(&self, u: usize, k: KeyIndex) -> AdminResponse {
        let up = &self.upstreams[u];
        let reason = up
            .keys
            .disabled()
            .into_iter()
            .find_map(|(i, r)| (i == k).then_some(r));
        info!(
            "admin: key {}/{} tested by {ACTOR}",
            up.name,
            up.keys.name(k)
        );
        // The probe a disabled key would get from the prober; a models listing otherwise.
        let mut kind = reason
            .filter(DisableReason::probes_may_enable)
            .map_or(ProbeKind::Models, ProbeKind::for_reason);
        loop {
            let answer = match self.probes.send(u, k, kind).await {
                Ok(a) => a,
                Err(e) => {
                    return AdminResponse::error(&LocalResponse::bad_gateway(format!(
                        "the upstream did not answer the probe: {e}"
                    )))
                }
            };
            let verdict = judge_probe(&answer);
            if let ProbeVerdict::Refused { .. } = verdict {
                if let Some(next) = kind.after_refusal() {
                    kind = next;
                    continue;
                }
            }
            let ok = matches!(verdict, ProbeVerdict::Works | ProbeVerdict::WorksButLimited);
            if let (true, Some(r)) = (ok, reason) {
                // The prober's rule: a passing probe puts back a key out for a non-manual reason.
                if up.keys.enable_if_still(k, r) && verdict == ProbeVerdict::WorksButLimited {
                    up.keys.cool_down(k, ALL_MODELS, None);
                }
            }
            let message = sanitised_message(&answer, up.keys.secret(k).expose().as_bytes(), ok);
            return AdminResponse::json(
                200,
                &TestAnswer {
                    ok,
                    status: answer.status,
                    message,
                },
            );
        }
    }
}

/// The answer to a refused runtime key change.
fn runtime_error(e: &RuntimeKeyError) -> LocalResponse {
    let (status, code) = match e {
        RuntimeKeyError::UnknownUpstream(_) | RuntimeKeyError::UnknownKey { .. } => {
            (404, "key_not_found")
        }
        RuntimeKeyError::Invalid(_) => (400, "invalid_key"),
        RuntimeKeyError::Taken(_) => (409, "key_exists"),
        RuntimeKeyError::FromConfig { .. } | RuntimeKeyError::NoCredentials(_) => {
            (409, "key_not_changeable")
        }
        RuntimeKeyError::Store(_) => (503, "key_store_unavailable"),
        RuntimeKeyError::Seal(_) => (500, "key_store_error"),
    };
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    LocalResponse::new(status, kind, code, e.to_string())
}

/// The upstream's own words (`error.message`, or the body's start) with the key's pieces and
/// account ids masked.
fn sanitised_message(answer: &ProbeAnswer, secret: &[u8], ok: bool) -> String {
    if ok && (200..300).contains(&answer.status) {
        return "the key works".to_string();
    }
    let mut body = answer.body.to_vec();
    crate::redact::scrub(&mut body, secret);
    let text = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    let text: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if text.is_empty() {
        format!("the upstream answered {}", answer.status)
    } else {
        text
    }
}

#[cfg(test)]
mod tests;
