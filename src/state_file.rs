//! Key states that survive a restart or a graceful upgrade: kept in a small JSON file written
//! when they change (at most once a second) and at shutdown, and read at start.
//!
//! Keys are matched by upstream and key name (an unnamed key's name is a hash of its secret, so
//! it is stable too) *and* by the id of the secret ([`crate::keys::key_id`]): a key whose secret
//! was replaced under the same name (the usual fix for a revoked key) starts afresh instead of
//! coming back disabled. Cooldowns are stored as "remaining at write time" plus the write time,
//! so a reader subtracts the time the file sat on disk.
//!
//! A file written before ids were stored has none. Such an entry's cooldowns are restored (they
//! are short and end by themselves, so a wrong one costs a key minutes at most), its disable is
//! not: a disable lasts until a probe passes, so restoring it onto a replaced secret would keep
//! a good key out, while dropping it for a key that is still bad costs one refused request
//! (retried on another key) before the key is disabled again.

use crate::clients::limits::Limiter;
use crate::clock::epoch_ms;
use crate::keys::{DisableReason, KeyPool, KeyState, ALL_MODELS};
use crate::resources::{Owner, Resources};
use async_trait::async_trait;
use log::{info, warn};
use parking_lot::Mutex;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often the states are compared with what was last written.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Upstream name → key name → state.
pub type States = BTreeMap<String, BTreeMap<String, KeySnapshot>>;

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Wall-clock time of writing, in milliseconds since the Unix epoch.
    pub written_at_ms: u64,
    /// Upstream name → key name → state; keys that are simply ready are left out.
    pub upstreams: States,
    /// Client name → budget usage in the current period.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clients: BTreeMap<String, ClientUsage>,
    /// Object id → the account that owns it (see [`crate::resources`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub objects: BTreeMap<String, ObjectOwner>,
}

/// Who owns an object, until when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectOwner {
    /// The owner.
    #[serde(flatten)]
    pub owner: Owner,
    /// When keygate forgets it, ms since the epoch.
    pub expires_ms: u64,
}

/// The objects `resources` knows the owners of.
pub fn capture_objects(resources: &Resources) -> BTreeMap<String, ObjectOwner> {
    resources
        .table()
        .entries()
        .into_iter()
        .map(|(id, o)| {
            let owner = ObjectOwner {
                owner: (*o.owner).clone(),
                expires_ms: o.expires_ms,
            };
            (id, owner)
        })
        .collect()
}

/// Puts the file's objects back into `resources` (expired ones stay out).
pub fn restore_objects(resources: &Resources, snap: &Snapshot) {
    for (id, o) in &snap.objects {
        resources
            .table()
            .insert(id, Arc::new(o.owner.clone()), o.expires_ms);
    }
}

/// A client's budget usage.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientUsage {
    /// Which day or month (an opaque period number).
    pub period: u64,
    /// Tokens charged in it.
    pub used: u64,
}

/// A client's name and limiter, whose budget usage is kept in the file.
pub type ClientLimiter = (String, Arc<Limiter>);

/// One key's state.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySnapshot {
    /// [`crate::keys::key_id`] of the key's secret; absent in files of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Why the key is disabled, if it is (`unauthorized`, `forbidden`, `insufficient_quota`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
    /// Running cooldowns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cooling: Vec<CoolingSnapshot>,
}

/// One running cooldown.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CoolingSnapshot {
    /// The model, or none for every model.
    #[serde(default)]
    pub model: Option<String>,
    /// Milliseconds left when the file was written.
    pub remaining_ms: u64,
}

/// Takes a snapshot of the pools and client budgets (the time is filled in by the writer).
pub fn capture(pools: &[Arc<KeyPool>], clients: &[ClientLimiter]) -> Snapshot {
    let mut snap = Snapshot::default();
    for (name, limiter) in clients {
        let (period, used) = limiter.budget_used();
        if limiter.limits().budget.is_some() && used > 0 {
            snap.clients
                .insert(name.clone(), ClientUsage { period, used });
        }
    }
    for pool in pools {
        let mut keys = BTreeMap::new();
        for status in pool.status() {
            let ks = match status.state {
                KeyState::Ready => continue,
                KeyState::Disabled { reason } => KeySnapshot {
                    id: Some(pool.key_id(status.index).to_string()),
                    disabled: Some(reason.as_str().to_string()),
                    cooling: Vec::new(),
                },
                KeyState::Cooling { cooldowns } => KeySnapshot {
                    id: Some(pool.key_id(status.index).to_string()),
                    disabled: None,
                    cooling: cooldowns
                        .into_iter()
                        .map(|c| CoolingSnapshot {
                            model: c.model,
                            remaining_ms: u64::try_from(c.remaining.as_millis())
                                .unwrap_or(u64::MAX),
                        })
                        .collect(),
                },
            };
            keys.insert(status.name, ks);
        }
        if !keys.is_empty() {
            snap.upstreams.insert(pool.upstream().to_string(), keys);
        }
    }
    snap
}

/// Puts back the budget usage of the clients that are still configured.
pub fn restore_clients(clients: &[ClientLimiter], snap: &Snapshot) {
    for (name, limiter) in clients {
        if let Some(u) = snap.clients.get(name) {
            limiter.restore_budget(u.period, u.used);
        }
    }
}

/// Applies a snapshot written at `snap.written_at_ms` to the pools, as of wall time `now`.
/// Returns how many keys it changed.
pub fn restore(pools: &[Arc<KeyPool>], snap: &Snapshot, now: SystemTime) -> usize {
    let age = Duration::from_millis(epoch_ms(now).saturating_sub(snap.written_at_ms));
    let mut changed = 0;
    for pool in pools {
        let Some(keys) = snap.upstreams.get(pool.upstream()) else {
            continue;
        };
        for (name, ks) in keys {
            let Some(idx) = pool.index_of(name) else {
                continue;
            };
            let id_checked = match ks.id.as_deref() {
                Some(id) if id != pool.key_id(idx) => {
                    info!(
                        "state file: key {}/{name} has a new secret: its saved state is dropped",
                        pool.upstream()
                    );
                    continue;
                }
                Some(_) => true,
                None => false,
            };
            if let Some(reason) = ks.disabled.as_deref().and_then(DisableReason::parse) {
                if id_checked {
                    pool.disable(idx, reason);
                    changed += 1;
                    continue;
                }
                info!(
                    "state file: key {}/{name} was saved {reason} without a secret id (older \
                     file): not restored as disabled",
                    pool.upstream()
                );
            }
            let mut cooled = false;
            for c in &ks.cooling {
                let left = Duration::from_millis(c.remaining_ms).saturating_sub(age);
                if !left.is_zero() {
                    pool.cool_down(idx, c.model.as_deref().unwrap_or(ALL_MODELS), Some(left));
                    cooled = true;
                }
            }
            changed += usize::from(cooled);
        }
    }
    changed
}

/// Reads the state file, if there is one; a broken file is reported and ignored.
pub fn load(path: &Path, pools: &[Arc<KeyPool>], clients: &[ClientLimiter], resources: &Resources) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!("state file {}: cannot read: {e}", path.display());
            return;
        }
    };
    match serde_json::from_str::<Snapshot>(&text) {
        Ok(snap) => {
            restore_clients(clients, &snap);
            restore_objects(resources, &snap);
            let n = restore(pools, &snap, SystemTime::now());
            info!(
                "state file {}: restored the state of {n} key(s)",
                path.display()
            );
        }
        Err(e) => warn!("state file {}: ignored, not valid: {e}", path.display()),
    }
}

/// Writes `snap` atomically (temp file + rename), readable by the owner only.
pub fn write(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?;
    crate::private_file::write_atomically(path, &text)
}

/// The background service that keeps the file current.
pub struct StateKeeper {
    path: PathBuf,
    pools: Vec<Arc<KeyPool>>,
    clients: Vec<ClientLimiter>,
    resources: Arc<Resources>,
    /// What was last written (cooldown countdowns zeroed, with client usage) and when.
    last: Mutex<Option<(Shape, SystemTime)>>,
}

impl StateKeeper {
    /// A keeper writing `pools`' states, the clients' budget usage and the objects' owners to
    /// `path`.
    pub fn new(
        path: PathBuf,
        pools: Vec<Arc<KeyPool>>,
        clients: Vec<ClientLimiter>,
        resources: Arc<Resources>,
    ) -> Self {
        Self {
            path,
            pools,
            clients,
            resources,
            last: Mutex::new(None),
        }
    }

    /// The last write, once nothing is in flight any more: the states as the process leaves them
    /// (unless a newer process has written the file since).
    pub fn write_final(&self) {
        self.sync(true);
    }

    /// Writes if the states changed since the last write; cooldown countdowns alone do not count.
    fn sync(&self, at_shutdown: bool) {
        let mut snap = capture(&self.pools, &self.clients);
        snap.objects = capture_objects(&self.resources);
        let shape = (
            strip_remaining(&snap.upstreams),
            snap.clients.clone(),
            snap.objects.keys().cloned().collect(),
        );
        let mut last = self.last.lock();
        if let Some((prev, written)) = last.as_ref() {
            if *prev == shape && !at_shutdown {
                return;
            }
            // After a graceful upgrade the new process owns the file: do not overwrite its
            // newer state with this process's final one.
            let newer = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > *written);
            if at_shutdown && newer {
                return;
            }
        }
        let now = SystemTime::now();
        snap.written_at_ms = epoch_ms(now);
        match write(&self.path, &snap) {
            Ok(()) => {
                let written = std::fs::metadata(&self.path)
                    .and_then(|m| m.modified())
                    .unwrap_or(now);
                *last = Some((shape, written));
            }
            Err(e) => warn!("state file {}: cannot write: {e}", self.path.display()),
        }
    }
}

/// What decides whether the file needs writing.
type Shape = (States, BTreeMap<String, ClientUsage>, Vec<String>);

fn strip_remaining(ups: &States) -> States {
    ups.iter()
        .map(|(u, keys)| {
            let keys = keys
                .iter()
                .map(|(k, s)| {
                    let ks = KeySnapshot {
                        id: s.id.clone(),
                        disabled: s.disabled.clone(),
                        cooling: s
                            .cooling
                            .iter()
                            .map(|c| CoolingSnapshot {
                                model: c.model.clone(),
                                remaining_ms: 0,
                            })
                            .collect(),
                    };
                    (k.clone(), ks)
                })
                .collect();
            (u.clone(), keys)
        })
        .collect()
}

#[async_trait]
impl BackgroundService for StateKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    self.sync(true);
                    return;
                }
                _ = tick.tick() => self.sync(false),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::keys::{CooldownPolicy, KeyPolicy, KeySpec};

    fn pool(clock: crate::clock::SharedClock) -> Arc<KeyPool> {
        pool_with_secrets(clock, ["sk-0", "sk-1", "sk-2"])
    }

    /// Keys `k0`, `k1`, `k2` holding these secrets.
    fn pool_with_secrets(clock: crate::clock::SharedClock, secrets: [&str; 3]) -> Arc<KeyPool> {
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(i, secret)| KeySpec::named(format!("k{i}"), *secret))
            .collect();
        Arc::new(KeyPool::new(
            "up",
            keys,
            KeyPolicy::RoundRobin,
            CooldownPolicy::default(),
            clock,
        ))
    }

    #[test]
    fn disabled_and_cooling_keys_survive_a_round_trip() {
        let a = vec![pool(ManualClock::new())];
        a[0].disable(0, DisableReason::InsufficientQuota);
        a[0].cool_down(1, "gpt-4o", Some(Duration::from_secs(30)));
        let mut snap = capture(&a, &[]);
        let now = SystemTime::now();
        snap.written_at_ms = epoch_ms(now);
        let text = serde_json::to_string(&snap).unwrap();
        assert!(!text.contains("sk-"), "no secret in the state file");

        let b = vec![pool(ManualClock::new())];
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(restore(&b, &back, now + Duration::from_secs(10)), 2);
        assert_eq!(b[0].disabled(), vec![(0, DisableReason::InsufficientQuota)]);
        match &b[0].status()[1].state {
            KeyState::Cooling { cooldowns } => {
                assert_eq!(cooldowns[0].model.as_deref(), Some("gpt-4o"));
                let left = cooldowns[0].remaining;
                assert!(
                    left <= Duration::from_secs(20) && left > Duration::from_secs(19),
                    "{left:?}"
                );
            }
            other => panic!("expected cooling, got {other:?}"),
        }
    }

    #[test]
    fn a_manual_disable_survives_a_round_trip() {
        let a = vec![pool(ManualClock::new())];
        a[0].disable_manually(1);
        let mut snap = capture(&a, &[]);
        let now = SystemTime::now();
        snap.written_at_ms = epoch_ms(now);
        let text = serde_json::to_string(&snap).unwrap();
        assert!(text.contains("\"manual\""), "{text}");
        let b = vec![pool(ManualClock::new())];
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        restore(&b, &back, now);
        assert_eq!(b[0].disabled(), vec![(1, DisableReason::Manual)]);
    }

    fn is_cooling(pool: &KeyPool, idx: usize) -> bool {
        matches!(pool.status()[idx].state, KeyState::Cooling { .. })
    }

    #[test]
    fn a_key_whose_secret_was_replaced_starts_afresh() {
        let a = vec![pool(ManualClock::new())];
        a[0].disable(0, DisableReason::Unauthorized);
        a[0].cool_down(1, "gpt-4o", Some(Duration::from_secs(30)));
        a[0].cool_down(2, "gpt-4o", Some(Duration::from_secs(30)));
        let mut snap = capture(&a, &[]);
        let now = SystemTime::now();
        snap.written_at_ms = epoch_ms(now);
        let text = serde_json::to_string(&snap).unwrap();
        assert!(!text.contains("sk-"), "no secret in the state file: {text}");
        let back: Snapshot = serde_json::from_str(&text).unwrap();

        // The revoked k0 and the limited k2 were replaced under the same names.
        let b = vec![pool_with_secrets(
            ManualClock::new(),
            ["sk-new-0", "sk-1", "sk-new-2"],
        )];
        assert_eq!(restore(&b, &back, now), 1);
        assert!(b[0].disabled().is_empty(), "the new k0 works");
        assert!(is_cooling(&b[0], 1), "k1 kept its secret and its cooldown");
        assert!(!is_cooling(&b[0], 2));
    }

    #[test]
    fn a_file_without_secret_ids_restores_cooldowns_but_not_disables() {
        // Written by a keygate that stored no ids: whether k0 still holds the refused secret is
        // unknown, so it gets the benefit of the doubt; a cooldown ends by itself anyway.
        let now = SystemTime::now();
        let text = format!(
            r#"{{"written_at_ms":{},"upstreams":{{"up":{{"k0":{{"disabled":"unauthorized"}},"k1":{{"cooling":[{{"model":"gpt-4o","remaining_ms":30000}}]}}}}}}}}"#,
            epoch_ms(now)
        );
        let snap: Snapshot = serde_json::from_str(&text).unwrap();
        let b = vec![pool(ManualClock::new())];
        assert_eq!(restore(&b, &snap, now), 1);
        assert!(b[0].disabled().is_empty());
        assert!(is_cooling(&b[0], 1));
    }

    #[test]
    fn cooldowns_that_expired_on_disk_are_not_restored() {
        let a = vec![pool(ManualClock::new())];
        a[0].cool_down(1, "gpt-4o", Some(Duration::from_secs(5)));
        let mut snap = capture(&a, &[]);
        let now = SystemTime::now();
        snap.written_at_ms = epoch_ms(now);
        let b = vec![pool(ManualClock::new())];
        assert_eq!(restore(&b, &snap, now + Duration::from_secs(6)), 0);
        assert_eq!(b[0].counts().ready, 3);
    }

    #[test]
    fn client_budget_usage_survives_for_the_same_period() {
        use crate::clients::limits::{Budget, Limits, Period};
        let limits = Limits {
            budget: Some(Budget {
                tokens: 1000,
                per: Period::Day,
            }),
            ..Limits::default()
        };
        let a = Limiter::new(limits, ManualClock::new());
        a.admit(0).unwrap().settle(Some(700));
        let snap = capture(&[], &[("team".into(), a.clone())]);
        assert_eq!(snap.clients["team"].used, 700);
        let b = Limiter::new(limits, ManualClock::new());
        restore_clients(&[("team".into(), b.clone())], &snap);
        assert_eq!(b.budget_used().1, 700);
    }

    #[test]
    fn the_file_is_written_atomically_and_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &Snapshot::default()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let back: Snapshot =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, Snapshot::default());
    }
}
