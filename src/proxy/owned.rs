//! The proxy's side of account-scoped objects ([`crate::resources`]): before a key is chosen,
//! which account a request's objects belong to; during the choice, only that account's keys;
//! after a successful answer, the ids it created.

use super::ctx::RequestCtx;
use super::Gateway;
use crate::keys::{KeyIndex, KeyState};
use crate::local_response::LocalResponse;
use crate::resources::{Asked, Owner, Requirement};
use log::debug;
use pingora_http::RequestHeader;
use std::time::Duration;

/// Most object ids remembered.
pub const MAX_IDS: u64 = 100_000;
/// How long an id is remembered: OpenAI keeps batches, stored responses and their files for 30
/// days by default.
pub const ID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A request's dealings with account-scoped objects (boxed in the context: most have none).
#[derive(Debug, Default)]
pub struct OwnedState {
    /// The account whose keys alone may serve it.
    pub need: Option<Requirement>,
    /// Whether its answer may create objects.
    pub may_create: bool,
    /// A fine-tuned model (`ft:…`) whose owner is not known yet: a success tells it.
    pub learn_model: Option<String>,
    /// Who asks (a client's name or address), for listings.
    pub client: String,
}

impl Gateway {
    /// Who asks, as listings remember it: the client's name, or its address on an open gateway.
    fn asker(&self, ctx: &RequestCtx) -> String {
        match (ctx.client, ctx.client_ip) {
            (Some(i), _) => format!("client:{}", self.options.clients.clients()[i].name),
            (None, Some(ip)) => format!("ip:{ip}"),
            (None, None) => "-".to_string(),
        }
    }

    /// Reads which account the request's objects belong to, and whether its answer may create
    /// some; refuses a request whose objects belong to two accounts.
    pub(crate) async fn note_objects(
        &self,
        req: &RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<(), LocalResponse> {
        let method = req.method.as_str();
        let path = req.uri.path();
        let may_create = crate::resources::ids::may_create(method, path);
        // A fine-tuned model exists in one account only: when its owner is unknown, one
        // success shows it.
        let fine_tuned = ctx
            .model
            .as_deref()
            .filter(|m| m.starts_with("ft:") && crate::resources::ids::looks_like_id(m));
        if !may_create && fine_tuned.is_none() && !self.resources.active() {
            return Ok(());
        }
        // Who asks matters for listings, and for requests whose objects are remembered: the
        // common request, naming nothing, builds no name.
        let listing = crate::resources::ids::is_listing(method, path);
        let asker = listing.then(|| self.asker(ctx));
        let asked = Asked {
            method,
            path,
            body: ctx.body.as_deref(),
            client: asker.as_deref().unwrap_or(""),
        };
        let need = self.resources.requirement(asked).await.map_err(|e| {
            LocalResponse::new(
                409,
                "invalid_request_error",
                "objects_of_two_accounts",
                e.to_string(),
            )
        })?;
        let learn_model = fine_tuned.filter(|_| need.is_none()).map(str::to_string);
        if need.is_none() && !may_create && learn_model.is_none() {
            return Ok(());
        }
        if let Some(n) = &need {
            debug!(
                "{} belongs to {}: only its keys serve",
                n.id,
                n.owner.describe()
            );
        }
        let client = asker.unwrap_or_else(|| self.asker(ctx));
        ctx.owned = Some(Box::new(OwnedState {
            need,
            may_create,
            learn_model,
            client,
        }));
        Ok(())
    }

    /// The keys of upstream `u` this attempt may not use: those already tried and, when the
    /// request's objects belong to an account, every key of another; `None` when no key of `u`
    /// may serve it.
    pub(crate) fn excluded_keys(&self, ctx: &RequestCtx, u: usize) -> Option<Vec<KeyIndex>> {
        let mut excluded = ctx.log.tried_keys(u);
        let Some(need) = ctx.requirement() else {
            return Some(excluded);
        };
        let up = &self.upstreams[u];
        if need.owner.upstream != up.name {
            return None;
        }
        let mut any = false;
        for s in up.keys.status() {
            let k = s.index;
            if need
                .owner
                .admits(&up.name, up.keys.account(k), up.keys.key_id(k))
            {
                any = true;
            } else if !excluded.contains(&k) {
                excluded.push(k);
            }
        }
        any.then_some(excluded)
    }

    /// How long until a key of `need`'s owner stops cooling, when all its keys not disabled
    /// are cooling (a pick that skipped other accounts' keys reports those, not the cooldowns).
    pub(crate) fn owner_wait(&self, need: &Requirement) -> Option<Duration> {
        let up = self
            .upstreams
            .iter()
            .find(|u| u.name == need.owner.upstream)?;
        let mut soonest: Option<Duration> = None;
        for s in up.keys.status() {
            if !need
                .owner
                .admits(&up.name, up.keys.account(s.index), up.keys.key_id(s.index))
            {
                continue;
            }
            match &s.state {
                KeyState::Ready => return None,
                KeyState::Cooling { cooldowns } => {
                    let wait = cooldowns.iter().map(|c| c.remaining).max()?;
                    soonest = Some(soonest.map_or(wait, |w| w.min(wait)));
                }
                KeyState::Disabled { .. } => {}
            }
        }
        soonest
    }

    /// After a successful answer's header: collect its ids if it may have created objects, and
    /// remember the account a request with objects was served from (for listings).
    pub(crate) fn note_owned_answer(&self, ctx: &mut RequestCtx, status: u16) {
        let Some(state) = ctx.owned.as_deref() else {
            return;
        };
        if !(200..300).contains(&status) {
            return;
        }
        if let Some(need) = &state.need {
            self.resources.used(&need.owner, &state.client);
        }
        if let Some(model) = state.learn_model.clone() {
            self.record_created(ctx, &[model]);
        }
        if state.may_create {
            if let Some(att) = ctx.attempt.as_mut() {
                att.ids = Some(Box::default());
            }
        }
    }

    /// The ids an answer created (or a fine-tuned model it served) belong to its key's account.
    pub(crate) fn record_created(&self, ctx: &RequestCtx, ids: &[String]) {
        let (Some(att), Some(state)) = (ctx.attempt.as_ref(), ctx.owned.as_deref()) else {
            return;
        };
        let Some(k) = att.key_index() else {
            return;
        };
        if ids.is_empty() {
            return;
        }
        let up = &self.upstreams[att.upstream];
        let owner = Owner::of_key(&up.name, up.keys.account(k), up.keys.key_id(k));
        debug!("{} created by {}", ids.join(", "), owner.describe());
        self.resources.created(ids, &owner, &state.client);
    }
}

/// The answer when no key of the account that owns the request's objects can serve it now.
pub(crate) fn owner_unavailable(need: &Requirement, soonest: Option<Duration>) -> LocalResponse {
    let whose = need.owner.describe();
    match soonest {
        Some(wait) => {
            let mut r = LocalResponse::all_cooling(wait);
            r.message = format!(
                "{} belongs to {whose}, whose keys are all cooling down; retry in {}s.",
                need.id,
                wait.as_secs().max(1)
            );
            r
        }
        None => LocalResponse::new(
            503,
            "server_error",
            "owner_keys_unavailable",
            format!(
                "{} belongs to {whose}, and none of its keys can serve now (disabled or removed); another account's key would get a 404.",
                need.id
            ),
        ),
    }
}
