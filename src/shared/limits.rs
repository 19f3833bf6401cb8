//! Client limits held across instances: requests and tokens per minute, requests in flight and
//! the day's or month's token budget, counted in Redis by one atomic Lua script per request.
//!
//! A request costs one Redis round trip on its path (the admission script); its settlement
//! (the real token count, the concurrency slot given back) runs after the answer, off the path.
//! Budgets are reserved by the request's estimate at admission and corrected with its real usage
//! at settlement, so concurrent requests on several instances cannot all pass a nearly spent
//! budget. Every key of one client carries the same hash tag, so the script works on a Redis
//! Cluster.
//!
//! With Redis down or slow, each instance admits on its own its share of every limit (the limit
//! divided by `instances`), and the tokens it spends meanwhile are added to the shared budget
//! when Redis returns.

use super::link::{Link, LinkError};
use crate::clients::limits::{
    period_id, reset_text, Admission, LimitKind, Limiter, Limits, Rejection,
};
use crate::clock::SharedClock;
use log::debug;
use parking_lot::Mutex;
use redis::Script;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Checks every limit of one client and, if all pass, takes its place in each.
///
/// KEYS: requests per second (hash), tokens per second (hash), requests in flight (sorted set
/// of lease expiries), budget of the period (counter). ARGV: rpm, tpm, concurrency, budget (0:
/// no such limit), the estimate, the request's id, the lease length (ms), the budget's ttl (s).
/// Returns `{refused kind (0: admitted), wait ms, requests in the window, tokens in the window}`.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = tonumber(t[1])
local rpm, tpm, conc, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local est, lease, ttl = tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[8])
local function window(key)
  local h = redis.call('HGETALL', key)
  local sum, oldest = 0, nil
  for i = 1, #h, 2 do
    local s = tonumber(h[i])
    if s <= sec - 60 then
      redis.call('HDEL', key, h[i])
    else
      local n = tonumber(h[i + 1])
      sum = sum + n
      if n > 0 and (oldest == nil or s < oldest) then oldest = s end
    end
  end
  return sum, oldest or sec
end
if budget > 0 then
  local used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if used >= budget then return {4, 0, 0, 0} end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then return {3, 1000, 0, 0} end
end
local rsum, roldest = 0, sec
if rpm > 0 then
  rsum, roldest = window(KEYS[1])
  if rsum >= rpm then return {1, (roldest + 60) * 1000 - now, rsum, 0} end
end
local tsum, toldest = 0, sec
if tpm > 0 then
  tsum, toldest = window(KEYS[2])
  if tsum > 0 and tsum + est > tpm then return {2, (toldest + 60) * 1000 - now, rsum, tsum} end
end
if rpm > 0 then
  redis.call('HINCRBY', KEYS[1], sec, 1)
  redis.call('EXPIRE', KEYS[1], 61)
end
if tpm > 0 then
  redis.call('HINCRBY', KEYS[2], sec, est)
  redis.call('EXPIRE', KEYS[2], 61)
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[3], lease)
end
if budget > 0 then
  redis.call('INCRBY', KEYS[4], est)
  redis.call('EXPIRE', KEYS[4], ttl)
end
return {0, 0, rsum + 1, tsum + est}
"#;

/// Settles an admitted request. KEYS as [`ADMIT`]. ARGV: the request's id ('' when it held no
/// slot), the token correction for the minute window, the budget correction, the second it was
/// admitted in (to give its request back on a refund; 0: keep it), the budget's ttl.
const SETTLE: &str = r#"
local sec = tonumber(redis.call('TIME')[1])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[3], ARGV[1]) end
local d = tonumber(ARGV[2])
if d ~= 0 then
  redis.call('HINCRBY', KEYS[2], sec, d)
  redis.call('EXPIRE', KEYS[2], 61)
end
local b = tonumber(ARGV[3])
if b ~= 0 then
  redis.call('INCRBY', KEYS[4], b)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[5]))
end
local r = tonumber(ARGV[4])
if r > 0 then redis.call('HINCRBY', KEYS[1], r, -1) end
return 1
"#;

/// How long a request holds its concurrency slot in Redis if its instance dies before giving it
/// back: longer than any answer keygate waits for.
const LEASE: Duration = Duration::from_secs(15 * 60);

/// The Redis keys of one client in one budget period (all in one cluster slot).
#[derive(Debug, Clone)]
struct ClientKeys {
    rpm: String,
    tpm: String,
    conc: String,
    budget: String,
    budget_ttl_s: u64,
}

/// One client's shared limits and its local share for when Redis is away.
struct ClientSlot {
    name: String,
    limits: Limits,
    fallback: Arc<Limiter>,
    /// A moving average of the tokens its requests really used: a request's reservation is at
    /// least this, so that estimates that run short (no `max_tokens`) do not let concurrent
    /// requests overspend a budget.
    typical: AtomicU64,
}

impl ClientSlot {
    /// Folds one request's real usage into [`ClientSlot::typical`] (weight 1/8).
    fn learn(&self, used: u64) {
        let old = self.typical.load(Ordering::Relaxed);
        let new = if old == 0 {
            used
        } else {
            let (o, u) = (i128::from(old), i128::from(used));
            u64::try_from(o + (u - o) / 8).unwrap_or(old)
        };
        self.typical.store(new, Ordering::Relaxed);
    }
}

/// Client limits shared through Redis.
pub struct SharedLimits {
    link: Arc<Link>,
    prefix: String,
    instance: String,
    clients: Vec<ClientSlot>,
    clock: SharedClock,
    admit: Script,
    settle: Script,
    next_id: AtomicU64,
    /// Budget tokens spent while Redis was away, by client index and period: pushed on return.
    unpushed: Mutex<HashMap<(usize, u64), i64>>,
    /// Concurrency slots (set, request id) whose release did not reach Redis.
    unreleased: Mutex<Vec<(String, String)>>,
}

/// Why the shared admission gave no verdict: the caller uses the local share.
#[derive(Debug)]
pub enum Verdict {
    /// Admitted in Redis.
    Admitted(SharedAdmission),
    /// Refused by a shared limit.
    Refused(Rejection),
    /// Redis gave no answer in time: admit on the local share.
    Unavailable(LinkError),
}

/// An admission made in Redis: settled after the answer, off the request's path.
pub struct SharedAdmission {
    owner: Arc<SharedLimits>,
    client: usize,
    keys: ClientKeys,
    id: String,
    budget_period: Option<u64>,
    reserved: u64,
    estimate: u64,
    admitted_sec: u64,
    settled: bool,
}

impl std::fmt::Debug for SharedAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAdmission")
            .field("client", &self.client)
            .field("estimate", &self.estimate)
            .finish_non_exhaustive()
    }
}

/// A request admitted under a client's limits: shared in Redis, or on the local share.
#[derive(Debug)]
pub enum Admitted {
    /// By the limits of this instance alone (no `redis:`), or by its share while Redis is away.
    Local {
        /// The local admission.
        admission: Admission,
        /// Set when this is the share of shared limits: its spending is pushed to Redis later.
        shared: Option<(Arc<SharedLimits>, usize)>,
    },
    /// By the limits shared in Redis.
    Shared(SharedAdmission),
}

impl Admitted {
    /// A purely local admission.
    pub fn local(admission: Admission) -> Self {
        Admitted::Local {
            admission,
            shared: None,
        }
    }

    /// Adds to the token estimate once the body is known.
    pub fn add_tokens(&mut self, tokens: u64) {
        match self {
            Admitted::Local { admission, .. } => admission.add_tokens(tokens),
            Admitted::Shared(s) => s.estimate = s.estimate.saturating_add(tokens),
        }
    }

    /// Charges the real usage (or the estimate when the upstream reported none).
    pub fn settle(self, actual: Option<u64>) {
        match self {
            Admitted::Local { admission, shared } => {
                if let Some((owner, client)) = shared {
                    let used = actual.unwrap_or_else(|| admission.estimate());
                    owner.remember_spent(client, used);
                    owner.learn(client, actual);
                }
                admission.settle(actual);
            }
            Admitted::Shared(mut s) => {
                s.owner.learn(s.client, actual);
                let used = actual.unwrap_or(s.estimate.max(s.reserved));
                s.finish(used, false);
            }
        }
    }

    /// Gives back what admission took (a cache hit spent nothing upstream).
    pub fn refund(self) {
        match self {
            Admitted::Local { admission, .. } => admission.refund(),
            Admitted::Shared(mut s) => s.finish(0, true),
        }
    }
}

impl SharedAdmission {
    /// Sends the settlement to Redis on its own task; while Redis is away, budget spending is
    /// kept for later.
    fn finish(&mut self, used: u64, refund: bool) {
        self.settled = true;
        let tpm_delta = if self.owner.clients[self.client].limits.tpm.is_some() {
            i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(self.reserved).unwrap_or(i64::MAX)
        } else {
            0
        };
        let budget_delta = if self.budget_period.is_some() {
            i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(self.reserved).unwrap_or(i64::MAX)
        } else {
            0
        };
        let refund_sec = if refund && self.owner.clients[self.client].limits.rpm.is_some() {
            self.admitted_sec
        } else {
            0
        };
        let job = Settlement {
            owner: self.owner.clone(),
            client: self.client,
            keys: self.keys.clone(),
            id: if self.owner.clients[self.client].limits.concurrency.is_some() {
                self.id.clone()
            } else {
                String::new()
            },
            tpm_delta,
            budget_delta,
            budget_period: self.budget_period,
            refund_sec,
        };
        job.spawn();
    }
}

impl Drop for SharedAdmission {
    fn drop(&mut self) {
        if !self.settled {
            // Ended without an answer: the reservation stays charged, the slot is given back.
            self.finish(self.reserved, false);
        }
    }
}

/// One settlement on its way to Redis.
struct Settlement {
    owner: Arc<SharedLimits>,
    client: usize,
    keys: ClientKeys,
    id: String,
    tpm_delta: i64,
    budget_delta: i64,
    budget_period: Option<u64>,
    refund_sec: u64,
}

impl Settlement {
    fn spawn(self) {
        if self.id.is_empty()
            && self.tpm_delta == 0
            && self.budget_delta == 0
            && self.refund_sec == 0
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let owner = self.owner.clone();
            let out = owner
                .run_settle(
                    "settle",
                    &self.keys,
                    &self.id,
                    self.tpm_delta,
                    self.budget_delta,
                    self.refund_sec,
                )
                .await;
            if let Err(e) = out {
                debug!("shared limits: settlement not written ({e}); kept for later");
                if let Some(period) = self.budget_period {
                    owner.add_unpushed(self.client, period, self.budget_delta);
                }
                if !self.id.is_empty() {
                    owner
                        .unreleased
                        .lock()
                        .push((self.keys.conc.clone(), self.id.clone()));
                }
            }
        });
    }
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Shared limits for these clients (name and limits, in client order).
    pub fn new(
        link: Arc<Link>,
        prefix: &str,
        instance: &str,
        instances: u32,
        clients: &[(String, Limits)],
        clock: SharedClock,
    ) -> Arc<Self> {
        let clients = clients
            .iter()
            .map(|(name, limits)| ClientSlot {
                name: name.clone(),
                limits: *limits,
                fallback: Limiter::new(limits.share(instances), clock.clone()),
                typical: AtomicU64::new(0),
            })
            .collect();
        Arc::new(SharedLimits {
            link,
            prefix: prefix.to_string(),
            instance: instance.to_string(),
            clients,
            clock,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            next_id: AtomicU64::new(0),
            unpushed: Mutex::new(HashMap::new()),
            unreleased: Mutex::new(Vec::new()),
        })
    }

    fn keys(&self, client: usize, period: Option<(u64, Duration)>) -> ClientKeys {
        let name = self.clients.get(client).map_or("", |c| c.name.as_str());
        // One hash tag per client: its keys share a cluster slot, as a script needs.
        let base = format!("{}{{client:{name}}}", self.prefix);
        let (pid, left) = period.unwrap_or((0, Duration::ZERO));
        ClientKeys {
            rpm: format!("{base}:rpm"),
            tpm: format!("{base}:tpm"),
            conc: format!("{base}:conc"),
            budget: format!("{base}:budget:{pid}"),
            budget_ttl_s: left.as_secs() + 86_400,
        }
    }

    /// Runs the settlement script (see [`SETTLE`]) for one client and period.
    async fn run_settle(
        &self,
        op: &'static str,
        keys: &ClientKeys,
        id: &str,
        tpm_delta: i64,
        budget_delta: i64,
        refund_sec: u64,
    ) -> Result<i64, LinkError> {
        let script = &self.settle;
        let (k, id) = (keys.clone(), id.to_string());
        self.link
            .timed(op, super::link::BACKGROUND_TIMEOUT, |mut c| async move {
                script
                    .key(&k.rpm)
                    .key(&k.tpm)
                    .key(&k.conc)
                    .key(&k.budget)
                    .arg(id)
                    .arg(tpm_delta)
                    .arg(budget_delta)
                    .arg(refund_sec)
                    .arg(k.budget_ttl_s)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
    }

    /// Asks Redis to admit a request of client `client` estimated at `estimate` tokens.
    pub async fn admit(self: &Arc<Self>, client: usize, estimate: u64) -> Verdict {
        let Some(slot) = self.clients.get(client) else {
            return Verdict::Unavailable(LinkError::Down);
        };
        let l = slot.limits;
        let reserve = estimate.max(slot.typical.load(Ordering::Relaxed));
        let wall = self.clock.wall();
        let period = l.budget.map(|b| period_id(b.per, wall));
        let keys = self.keys(client, period);
        let id = format!(
            "{}:{}",
            self.instance,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let script = &self.admit;
        let k = keys.clone();
        let rid = id.clone();
        let out = self
            .link
            .call("admit", |mut c| async move {
                script
                    .key(&k.rpm)
                    .key(&k.tpm)
                    .key(&k.conc)
                    .key(&k.budget)
                    .arg(l.rpm.unwrap_or(0))
                    .arg(l.tpm.unwrap_or(0))
                    .arg(l.concurrency.unwrap_or(0))
                    .arg(l.budget.map_or(0, |b| b.tokens))
                    .arg(reserve)
                    .arg(rid)
                    .arg(u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX))
                    .arg(k.budget_ttl_s)
                    .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                    .await
            })
            .await;
        let (kind, wait_ms, requests, tokens) = match out {
            Ok(v) => v,
            Err(e) => return Verdict::Unavailable(e),
        };
        let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
        let kind = match kind {
            0 => {
                let admitted_sec = wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                return Verdict::Admitted(SharedAdmission {
                    owner: self.clone(),
                    client,
                    keys,
                    id,
                    budget_period: period.map(|p| p.0),
                    reserved: reserve,
                    estimate,
                    admitted_sec,
                    settled: false,
                });
            }
            1 => LimitKind::Requests,
            2 => LimitKind::Tokens,
            3 => LimitKind::Concurrency,
            _ => LimitKind::Budget,
        };
        let retry_after = match (kind, period) {
            (LimitKind::Budget, Some((_, left))) => left,
            _ => wait,
        };
        Verdict::Refused(rejection(&l, kind, retry_after, requests, tokens))
    }

    /// The local share of client `client`'s limits, for when Redis is away.
    pub fn fallback(&self, client: usize) -> Option<&Arc<Limiter>> {
        self.clients.get(client).map(|c| &c.fallback)
    }

    /// Folds a request's reported usage into the client's typical size.
    fn learn(&self, client: usize, actual: Option<u64>) {
        if let (Some(slot), Some(used)) = (self.clients.get(client), actual) {
            slot.learn(used);
        }
    }

    /// Notes budget tokens spent on the local share, to add to the shared budget later.
    fn remember_spent(&self, client: usize, tokens: u64) {
        let Some(b) = self.clients.get(client).and_then(|c| c.limits.budget) else {
            return;
        };
        let (period, _) = period_id(b.per, self.clock.wall());
        self.add_unpushed(client, period, i64::try_from(tokens).unwrap_or(i64::MAX));
    }

    fn add_unpushed(&self, client: usize, period: u64, tokens: i64) {
        if tokens != 0 {
            *self.unpushed.lock().entry((client, period)).or_default() += tokens;
        }
    }

    /// Adds the budget spent while Redis was away to the shared budgets; what fails stays for
    /// the next time.
    pub async fn push_unpushed(&self) {
        let slots: Vec<(String, String)> = std::mem::take(&mut *self.unreleased.lock());
        for (set, id) in slots {
            let out = self
                .link
                .timed("release", super::link::BACKGROUND_TIMEOUT, |mut c| {
                    let (set, id) = (set.clone(), id.clone());
                    async move {
                        redis::cmd("ZREM")
                            .arg(set)
                            .arg(id)
                            .query_async::<()>(&mut c)
                            .await
                    }
                })
                .await;
            if out.is_err() {
                self.unreleased.lock().push((set, id));
            }
        }
        let pending: Vec<((usize, u64), i64)> = self.unpushed.lock().drain().collect();
        for ((client, period), tokens) in pending {
            let Some(b) = self.clients.get(client).and_then(|c| c.limits.budget) else {
                continue;
            };
            let (now_period, left) = period_id(b.per, self.clock.wall());
            if now_period != period {
                continue; // that period is over: nothing to charge
            }
            let keys = self.keys(client, Some((period, left)));
            // The settlement script with only a budget correction: one slot, atomic.
            let out = self
                .run_settle("push_budget", &keys, "", 0, tokens, 0)
                .await;
            if out.is_err() {
                self.add_unpushed(client, period, tokens);
            }
        }
    }
}

/// A refusal with OpenAI's `x-ratelimit-*` headers for the shared counts.
fn rejection(l: &Limits, kind: LimitKind, wait: Duration, requests: i64, tokens: i64) -> Rejection {
    let mut headers = Vec::new();
    let reset = reset_text(wait);
    if let Some(rpm) = l.rpm {
        let used = u64::try_from(requests).unwrap_or(0);
        headers.push(("x-ratelimit-limit-requests", rpm.to_string()));
        headers.push((
            "x-ratelimit-remaining-requests",
            u64::from(rpm).saturating_sub(used).to_string(),
        ));
        headers.push(("x-ratelimit-reset-requests", reset.clone()));
    }
    if let Some(tpm) = l.tpm {
        let used = u64::try_from(tokens).unwrap_or(0);
        headers.push(("x-ratelimit-limit-tokens", tpm.to_string()));
        headers.push((
            "x-ratelimit-remaining-tokens",
            tpm.saturating_sub(used).to_string(),
        ));
        headers.push(("x-ratelimit-reset-tokens", reset));
    }
    Rejection {
        kind,
        retry_after: wait.max(Duration::from_millis(1)),
        headers,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_typical_size_starts_at_the_first_usage_and_moves_an_eighth_of_the_way() {
        let slot = ClientSlot {
            name: "app".into(),
            limits: Limits::default(),
            fallback: Limiter::new(Limits::default(), crate::clock::system()),
            typical: AtomicU64::new(0),
        };
        slot.learn(80);
        assert_eq!(slot.typical.load(Ordering::Relaxed), 80);
        slot.learn(160);
        assert_eq!(slot.typical.load(Ordering::Relaxed), 90);
        slot.learn(10);
        assert_eq!(slot.typical.load(Ordering::Relaxed), 80);
    }

    #[test]
    fn a_shared_refusal_carries_the_shared_counts_in_openai_headers() {
        let l = Limits {
            rpm: Some(600),
            tpm: Some(1000),
            ..Limits::default()
        };
        let r = rejection(
            &l,
            LimitKind::Requests,
            Duration::from_millis(1500),
            600,
            250,
        );
        assert_eq!(r.kind, LimitKind::Requests);
        assert_eq!(r.retry_after, Duration::from_millis(1500));
        let h: HashMap<_, _> = r.headers.into_iter().collect();
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "750");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.500s");
    }
}
