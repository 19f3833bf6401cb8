//! Client limits held across instances: requests and tokens per minute, requests in flight and
//! the day's or month's token budget, counted in Redis by atomic Lua scripts.
//!
//! One Lua script ([`RESERVE`]) does it all. A client without a concurrency limit is served
//! from leases (see [`super::ledger`]): one Redis round trip buys a small share of each limit,
//! spent locally, so most requests cost no round trip at all and none costs more than one. A
//! client with a concurrency limit needs each slot counted where all instances see it: each of
//! its requests costs one round trip (a lease of exactly its need, with a slot), and its
//! settlement (real token count, slot given back) runs after the answer, off the request's
//! path.
//! Budgets are reserved by the request's estimate at admission and corrected with its real usage
//! at settlement, so concurrent requests on several instances cannot all pass a nearly spent
//! budget. Every key of one client carries the same hash tag, so the script works on a Redis
//! Cluster.
//!
//! With Redis down or slow, each instance admits on its own its share of every limit (the limit
//! divided by `instances`), and the tokens it spends meanwhile are added to the shared budget
//! when Redis returns.

use super::ledger::{lease_size, Lease, Ledger, Need, Outgoing, LEASE_TTL};
use super::link::{Link, LinkError};
use crate::clients::limits::{
    period_id, reset_text, Admission, LimitKind, Limiter, Limits, Rejection,
};
use crate::clock::SharedClock;
use log::debug;
use parking_lot::Mutex;
use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The one script of the shared limits: gives back an ended lease's rest and a request's
/// concurrency slot, applies corrections, then (unless it is asked for nothing: a flush or a
/// settlement) checks the limits and grants a lease, taking a concurrency slot when given one.
/// A client with a concurrency limit asks for a lease of exactly its request's need.
///
/// KEYS: requests per second (hash), tokens per second (hash), budget of the period (counter),
/// requests in flight (sorted set of slot expiries). ARGV: rpm, tpm, budget (0: no such limit);
/// the second an ended lease (or a refunded request) was counted in, its unused requests and
/// tokens; the token correction for the window, the budget correction; the request's need
/// (requests, tokens, budget tokens) and the lease wanted (the same three); the budget's ttl
/// (s); the concurrency limit (0: none), the slot to take ('' none), the slot to give back ('':
/// none), how long a slot is held at most (ms). Returns `{refused kind (0: granted), wait ms,
/// requests granted, tokens granted, budget granted, the second counted in, requests in the
/// window, tokens in it}`.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rsec, rr, rt = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local tdelta, bdelta = tonumber(ARGV[7]), tonumber(ARGV[8])
local need_r, need_t, need_b = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local want_r, want_t, want_b = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local ttl = tonumber(ARGV[15])
local conc, take, release, hold = tonumber(ARGV[16]), ARGV[17], ARGV[18], tonumber(ARGV[19])
if release ~= '' then redis.call('ZREM', KEYS[4], release) end
if rsec > sec - 60 then
  if rr > 0 then redis.call('HINCRBY', KEYS[1], rsec, -rr) end
  if rt > 0 then redis.call('HINCRBY', KEYS[2], rsec, -rt) end
end
if tdelta ~= 0 then
  redis.call('HINCRBY', KEYS[2], sec, tdelta)
  redis.call('EXPIRE', KEYS[2], 61)
end
if bdelta ~= 0 then
  redis.call('INCRBY', KEYS[3], bdelta)
  redis.call('EXPIRE', KEYS[3], ttl)
end
if take == '' and need_r + need_t + need_b + want_r + want_t + want_b == 0 then
  return {0, 0, 0, 0, 0, sec, 0, 0}
end
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
local gb = 0
if budget > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= budget then return {4, 0, 0, 0, 0, sec, 0, 0} end
  gb = math.min(want_b, math.max(need_b, budget - used))
end
if conc > 0 and take ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= conc then return {3, 1000, 0, 0, 0, sec, 0, 0} end
end
local rsum, roldest, gr = 0, sec, 0
if rpm > 0 then
  rsum, roldest = window(KEYS[1])
  if rsum + need_r > rpm then return {1, (roldest + 60) * 1000 - now, 0, 0, 0, sec, rsum, 0} end
  gr = math.min(want_r, rpm - rsum)
end
local tsum, toldest, gt = 0, sec, 0
if tpm > 0 then
  tsum, toldest = window(KEYS[2])
  if tsum > 0 and tsum + need_t > tpm then return {2, (toldest + 60) * 1000 - now, 0, 0, 0, sec, rsum, tsum} end
  gt = math.min(want_t, math.max(need_t, tpm - tsum))
end
if gr > 0 then
  redis.call('HINCRBY', KEYS[1], sec, gr)
  redis.call('EXPIRE', KEYS[1], 61)
end
if gt > 0 then
  redis.call('HINCRBY', KEYS[2], sec, gt)
  redis.call('EXPIRE', KEYS[2], 61)
end
if gb > 0 then
  redis.call('INCRBY', KEYS[3], gb)
  redis.call('EXPIRE', KEYS[3], ttl)
end
if take ~= '' then
  redis.call('ZADD', KEYS[4], now + hold, take)
  redis.call('PEXPIRE', KEYS[4], hold)
end
return {0, 0, gr, gt, gb, sec, rsum + gr, tsum + gt}
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
    /// Served from leases (no concurrency limit).
    leased: bool,
    /// Its lease and pending corrections.
    ledger: Mutex<Ledger>,
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
    reserve: Script,
    instances: u32,
    next_id: AtomicU64,
    /// Concurrency slots (set, request id) whose release did not reach Redis.
    unreleased: Mutex<Vec<(String, String)>>,
}

/// What the shared limits say of a request.
#[derive(Debug)]
pub enum Verdict {
    /// Admitted by the shared limits (from a lease, or in Redis).
    Admitted(Admitted),
    /// Refused by a shared limit.
    Refused(Rejection),
    /// Redis gave no answer in time: admit on the local share.
    Unavailable(LinkError),
}

/// An admission made in Redis: settled after the answer, off the request's path.
pub struct SharedAdmission {
    owner: Arc<SharedLimits>,
    client: usize,
    /// The budget period it was admitted in, and the time that was left in it.
    period: (u64, Duration),
    /// Its concurrency slot.
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
    /// By the limits shared in Redis, a round trip for this request.
    Shared(SharedAdmission),
    /// From this instance's lease of the shared limits.
    Leased(LeasedAdmission),
}

/// A request admitted from a lease: its corrections go to the client's ledger.
#[derive(Debug)]
pub struct LeasedAdmission {
    owner: Arc<SharedLimits>,
    client: usize,
    /// The second its lease was counted in.
    sec: u64,
    period: u64,
    reserved: u64,
    estimate: u64,
}

impl LeasedAdmission {
    fn correct(&self, delta: i64) {
        let Some(slot) = self.owner.clients.get(self.client) else {
            return;
        };
        let tpm = if slot.limits.tpm.is_some() { delta } else { 0 };
        let budget = if slot.limits.budget.is_some() {
            delta
        } else {
            0
        };
        slot.ledger.lock().correct(tpm, budget, self.period);
    }
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
            Admitted::Leased(s) => s.estimate = s.estimate.saturating_add(tokens),
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
            Admitted::Leased(s) => {
                s.owner.learn(s.client, actual);
                let used = actual.unwrap_or(s.estimate.max(s.reserved));
                s.correct(signed(used) - signed(s.reserved));
            }
        }
    }

    /// Gives back what admission took (a cache hit spent nothing upstream).
    pub fn refund(self) {
        match self {
            Admitted::Local { admission, .. } => admission.refund(),
            Admitted::Shared(mut s) => s.finish(0, true),
            Admitted::Leased(s) => {
                s.correct(-signed(s.reserved));
                if let Some(slot) = s.owner.clients.get(s.client) {
                    if slot.limits.rpm.is_some() {
                        slot.ledger.lock().give_back_request(s.sec);
                    }
                }
            }
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
        let refund = refund && self.owner.clients[self.client].limits.rpm.is_some();
        let job = Settlement {
            owner: self.owner.clone(),
            client: self.client,
            period: self.period,
            id: std::mem::take(&mut self.id),
            out: Outgoing {
                return_sec: self.admitted_sec,
                return_requests: u64::from(refund),
                return_tokens: 0,
                tpm_delta,
                budget_delta,
            },
            budget_period: self.budget_period,
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

/// One settlement on its way to Redis: the slot given back, the corrections, the refund.
struct Settlement {
    owner: Arc<SharedLimits>,
    client: usize,
    period: (u64, Duration),
    id: String,
    out: Outgoing,
    budget_period: Option<u64>,
}

impl Settlement {
    fn spawn(self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let owner = self.owner.clone();
            let ask = Ask {
                slots: Slot {
                    take: "",
                    release: &self.id,
                },
                ..Ask::lease(self.out, Need::default(), Need::default())
            };
            let out = owner
                .run_reserve(self.client, self.period, ask, "settle")
                .await;
            if let Err(e) = out {
                debug!("shared limits: settlement not written ({e}); kept for later");
                if let Some(period) = self.budget_period {
                    owner.correct_budget(self.client, period, self.out.budget_delta);
                }
                let set = owner.keys(self.client, None).conc;
                owner.unreleased.lock().push((set, self.id.clone()));
            }
        });
    }
}

/// What one call of [`RESERVE`] gives back and asks for.
#[derive(Debug, Clone, Copy)]
struct Ask<'a> {
    /// An ended lease's rest and the corrections.
    out: Outgoing,
    /// What the request needs.
    need: Need,
    /// The lease wanted.
    want: Need,
    /// The concurrency slots taken and given back.
    slots: Slot<'a>,
}

impl Ask<'static> {
    /// A call without concurrency slots.
    fn lease(out: Outgoing, need: Need, want: Need) -> Self {
        Ask {
            out,
            need,
            want,
            slots: Slot::NONE,
        }
    }
}

/// The concurrency slots one call takes and gives back (`""`: none).
#[derive(Debug, Clone, Copy)]
struct Slot<'a> {
    take: &'a str,
    release: &'a str,
}

impl Slot<'_> {
    /// No slot taken or given back.
    const NONE: Slot<'static> = Slot {
        take: "",
        release: "",
    };
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
                leased: limits.concurrency.is_none(),
                ledger: Mutex::new(Ledger::default()),
                typical: AtomicU64::new(0),
            })
            .collect();
        Arc::new(SharedLimits {
            link,
            prefix: prefix.to_string(),
            instance: instance.to_string(),
            clients,
            clock,
            reserve: Script::new(RESERVE),
            instances,
            next_id: AtomicU64::new(0),
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

    /// Admits a request of client `client` estimated at `estimate` tokens: from its lease, or
    /// by one call to Redis.
    pub async fn admit(self: &Arc<Self>, client: usize, estimate: u64) -> Verdict {
        let Some(slot) = self.clients.get(client) else {
            return Verdict::Unavailable(LinkError::Down);
        };
        let reserve = estimate.max(slot.typical.load(Ordering::Relaxed));
        if slot.leased {
            self.admit_leased(client, slot, reserve, estimate).await
        } else {
            self.admit_each(client, slot, reserve, estimate).await
        }
    }

    /// The budget period now (0 without a budget) and the time left in it.
    fn period(&self, l: &Limits) -> (u64, Duration) {
        l.budget
            .map_or((0, Duration::ZERO), |b| period_id(b.per, self.clock.wall()))
    }

    /// Runs [`RESERVE`] for client `client` in budget period `period`.
    async fn run_reserve(
        &self,
        client: usize,
        period: (u64, Duration),
        ask: Ask<'_>,
        op: &'static str,
    ) -> Result<[i64; 8], LinkError> {
        let Some(slot) = self.clients.get(client) else {
            return Err(LinkError::Down);
        };
        let l = slot.limits;
        let k = self.keys(client, l.budget.map(|_| period));
        let script = &self.reserve;
        let Ask {
            out,
            need,
            want,
            slots,
        } = ask;
        let (take, release) = (slots.take.to_string(), slots.release.to_string());
        let hold_ms = crate::clock::millis(LEASE);
        let call = |mut c: super::link::Conn| async move {
            script
                .key(&k.rpm)
                .key(&k.tpm)
                .key(&k.budget)
                .key(&k.conc)
                .arg(l.rpm.unwrap_or(0))
                .arg(l.tpm.unwrap_or(0))
                .arg(l.budget.map_or(0, |b| b.tokens))
                .arg(out.return_sec)
                .arg(out.return_requests)
                .arg(out.return_tokens)
                .arg(out.tpm_delta)
                .arg(out.budget_delta)
                .arg(need.requests)
                .arg(need.tokens)
                .arg(need.budget)
                .arg(want.requests)
                .arg(want.tokens)
                .arg(want.budget)
                .arg(k.budget_ttl_s)
                .arg(l.concurrency.unwrap_or(0))
                .arg(take)
                .arg(release)
                .arg(hold_ms)
                .invoke_async::<[i64; 8]>(&mut c)
                .await
        };
        if op == "admit" {
            self.link.call(op, call).await
        } else {
            self.link
                .timed(op, super::link::BACKGROUND_TIMEOUT, call)
                .await
        }
    }

    /// The leased path: the lease covers the request, or one call gives back what is left of
    /// it with the pending corrections and brings a new one.
    async fn admit_leased(
        self: &Arc<Self>,
        client: usize,
        slot: &ClientSlot,
        reserve: u64,
        estimate: u64,
    ) -> Verdict {
        let l = slot.limits;
        let need = need_of(&l, reserve);
        let period = self.period(&l);
        let now = self.clock.now();
        let admitted = |sec| {
            Verdict::Admitted(Admitted::Leased(LeasedAdmission {
                owner: self.clone(),
                client,
                sec,
                period: period.0,
                reserved: reserve,
                estimate,
            }))
        };
        let out = {
            let mut ledger = slot.ledger.lock();
            if let Some(sec) = ledger.take(&need, now, period.0) {
                return admitted(sec);
            }
            ledger.outgoing(now, period.0, true)
        };
        let n = self.instances;
        let want = Need {
            requests: lease_size(l.rpm.map(u64::from), n, need.requests),
            tokens: lease_size(l.tpm, n, need.tokens),
            budget: lease_size(l.budget.map(|b| b.tokens), n, need.budget),
        };
        let [kind, wait_ms, gr, gt, gb, sec, requests, tokens] = match self
            .run_reserve(client, period, Ask::lease(out, need, want), "admit")
            .await
        {
            Ok(v) => v,
            Err(e) => {
                slot.ledger.lock().restore(&out, period.0);
                return Verdict::Unavailable(e);
            }
        };
        if kind != 0 {
            let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
            return Verdict::Refused(refusal(&l, kind, wait, period.1, requests, tokens));
        }
        let left =
            |granted: i64, needed: u64| u64::try_from(granted).unwrap_or(0).saturating_sub(needed);
        let sec = u64::try_from(sec).unwrap_or(0);
        slot.ledger.lock().grant(Lease {
            sec,
            period: period.0,
            until: now + LEASE_TTL,
            requests: left(gr, need.requests),
            tokens: left(gt, need.tokens),
            budget: left(gb, need.budget),
        });
        admitted(sec)
    }

    /// Sends every client's pending corrections and expired leases (`all`: every lease) to
    /// Redis; what fails is kept for the next time.
    pub async fn flush(&self, all: bool) {
        let now = self.clock.now();
        // Clients with a concurrency limit have no lease; their ledgers hold only the budget
        // spent on the local share while Redis was away.
        for (client, slot) in self.clients.iter().enumerate() {
            let period = self.period(&slot.limits);
            let out = slot.ledger.lock().outgoing(now, period.0, all);
            if out.is_empty() {
                continue;
            }
            let op = if slot.leased { "flush" } else { "push_budget" };
            let give = Ask::lease(out, Need::default(), Need::default());
            if self.run_reserve(client, period, give, op).await.is_err() {
                slot.ledger.lock().restore(&out, period.0);
            }
        }
    }

    /// The per-request path, for clients with a concurrency limit: a lease of exactly the
    /// request's need, with a concurrency slot of its own.
    async fn admit_each(
        self: &Arc<Self>,
        client: usize,
        slot: &ClientSlot,
        reserve: u64,
        estimate: u64,
    ) -> Verdict {
        let l = slot.limits;
        let period = self.period(&l);
        let need = need_of(&l, reserve);
        let id = format!(
            "{}:{}",
            self.instance,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let ask = Ask {
            slots: Slot {
                take: &id,
                release: "",
            },
            ..Ask::lease(Outgoing::default(), need, need)
        };
        let [kind, wait_ms, _, _, _, sec, requests, tokens] =
            match self.run_reserve(client, period, ask, "admit").await {
                Ok(v) => v,
                Err(e) => return Verdict::Unavailable(e),
            };
        if kind != 0 {
            let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
            return Verdict::Refused(refusal(&l, kind, wait, period.1, requests, tokens));
        }
        Verdict::Admitted(Admitted::Shared(SharedAdmission {
            owner: self.clone(),
            client,
            period,
            id,
            budget_period: l.budget.map(|_| period.0),
            reserved: reserve,
            estimate,
            admitted_sec: u64::try_from(sec).unwrap_or(0),
            settled: false,
        }))
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
        self.correct_budget(client, period, signed(tokens));
    }

    /// Adds `tokens` to client `client`'s budget of `period` with the next call to Redis.
    fn correct_budget(&self, client: usize, period: u64, tokens: i64) {
        if let Some(slot) = self.clients.get(client) {
            slot.ledger.lock().correct(0, tokens, period);
        }
    }

    /// After Redis was away: gives back the concurrency slots whose release failed, and sends
    /// every pending correction and lease (budget spent on the local share included). What
    /// fails stays for the next time.
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
        self.flush(true).await;
    }
}

/// What one request of a client with limits `l` takes from them, reserving `reserve` tokens.
fn need_of(l: &Limits, reserve: u64) -> Need {
    Need {
        requests: u64::from(l.rpm.is_some()),
        tokens: if l.tpm.is_some() { reserve } else { 0 },
        budget: if l.budget.is_some() { reserve } else { 0 },
    }
}

/// The refusal for a script's refused `kind` (1 rpm, 2 tpm, 3 concurrency, 4 budget), with
/// `wait` from the script, or `budget_left` (the rest of the period) for a budget.
fn refusal(
    l: &Limits,
    kind: i64,
    wait: Duration,
    budget_left: Duration,
    requests: i64,
    tokens: i64,
) -> Rejection {
    let (kind, wait) = match kind {
        1 => (LimitKind::Requests, wait),
        2 => (LimitKind::Tokens, wait),
        3 => (LimitKind::Concurrency, wait),
        _ => (LimitKind::Budget, budget_left),
    };
    rejection(l, kind, wait, requests, tokens)
}

/// `v` as a signed token count.
fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
            leased: true,
            ledger: Mutex::new(Ledger::default()),
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
        let h: std::collections::HashMap<_, _> = r.headers.into_iter().collect();
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "750");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.500s");
    }
}
