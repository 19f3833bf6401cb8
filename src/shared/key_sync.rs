//! Key states shared by every instance: a cooldown, a disable or a re-enable made on one
//! instance reaches the others within milliseconds.
//!
//! Each change is written to one Redis hash (the truth that a starting or reconnecting instance
//! loads) and published on a channel (for speed). Key selection never waits for Redis: changes
//! leave through a channel to a writer task, and arrive through the subscription to be applied
//! to the local [`KeyPool`]s, which picks keep reading lock-free.
//!
//! Keys are matched across instances by upstream, key name and [`crate::keys::key_id`] (a hash of
//! the secret), never by the secret: a key whose secret differs on another instance is left alone.
//! Cooldowns travel as wall-clock end times, so instances need clocks in step (NTP); a skew of
//! a few milliseconds only shifts a cooldown's end by as much.

use crate::clock::{epoch_ms, SharedClock};
use crate::keys::{DisableReason, KeyChange, KeyIndex, KeyPool, KeyState, ALL_MODELS};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A key state change as it travels on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The instance that made the change (it ignores its own messages).
    pub from: String,
    /// Wall-clock time of the change, in ms since the epoch (for the propagation delay).
    pub at_ms: u64,
    /// The upstream's name.
    pub upstream: String,
    /// The key's name.
    pub key: String,
    /// [`crate::keys::key_id`] of the key's secret.
    pub id: String,
    /// What changed.
    pub change: Wire,
}

/// A [`KeyChange`] in wire form: cooldowns carry their end time, not their length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Wire {
    /// Cooling for `model` (empty: every model) until `until_ms`.
    Cooled {
        /// The model scope.
        model: String,
        /// Wall-clock end, ms since the epoch.
        until_ms: u64,
    },
    /// Disabled for `reason`.
    Disabled {
        /// [`DisableReason::as_str`].
        reason: String,
    },
    /// Back in rotation.
    Enabled,
}

/// What a change does to the state hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashWrite {
    /// Set `field` to `value`.
    Set {
        /// The field.
        field: String,
        /// Its value.
        value: String,
    },
    /// Remove `field`.
    Delete {
        /// The field.
        field: String,
    },
}

/// The hash field of a key's cooldown for `model`, or of its disable (`model` `None`): a JSON
/// array, so that no name can be mistaken for another.
fn field(upstream: &str, key: &str, id: &str, model: Option<&str>) -> String {
    let parts: Vec<&str> = match model {
        Some(m) => vec![upstream, key, id, "cooled", m],
        None => vec![upstream, key, id, "disabled"],
    };
    serde_json::to_string(&parts).unwrap_or_default()
}

impl Event {
    /// The change as written to the state hash.
    pub fn hash_write(&self) -> HashWrite {
        let (up, key, id) = (&self.upstream, &self.key, &self.id);
        match &self.change {
            Wire::Cooled { model, until_ms } => HashWrite::Set {
                field: field(up, key, id, Some(model)),
                value: until_ms.to_string(),
            },
            Wire::Disabled { reason } => HashWrite::Set {
                field: field(up, key, id, None),
                value: reason.clone(),
            },
            Wire::Enabled => HashWrite::Delete {
                field: field(up, key, id, None),
            },
        }
    }

    /// The event a hash entry stands for (`from` empty: it came from the store), or `None` for
    /// a field this version does not understand.
    pub fn from_hash(field: &str, value: &str) -> Option<Event> {
        let parts: Vec<String> = serde_json::from_str(field).ok()?;
        let change = match parts.get(3).map(String::as_str) {
            Some("cooled") => Wire::Cooled {
                model: parts.get(4)?.clone(),
                until_ms: value.parse().ok()?,
            },
            Some("disabled") => Wire::Disabled {
                reason: value.to_string(),
            },
            _ => return None,
        };
        Some(Event {
            from: String::new(),
            at_ms: 0,
            upstream: parts.first()?.clone(),
            key: parts.get(1)?.clone(),
            id: parts.get(2)?.clone(),
            change,
        })
    }
}

/// Where an event lands locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The key's state changed.
    Changed,
    /// The key already was in that state (or the cooldown had already ended).
    Unchanged,
    /// No such upstream or key here, or its secret differs: left alone.
    Unknown,
}

/// The instance's key pools by upstream name, and the conversions between local changes and
/// events. Plain Rust: the Redis side lives in [`super::service`].
pub struct KeyBook {
    instance: String,
    pools: Vec<Arc<KeyPool>>,
    by_upstream: HashMap<String, usize>,
    clock: SharedClock,
}

impl KeyBook {
    /// The pools of instance `instance`.
    pub fn new(instance: String, pools: Vec<Arc<KeyPool>>, clock: SharedClock) -> Self {
        let by_upstream = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.upstream().to_string(), i))
            .collect();
        KeyBook {
            instance,
            pools,
            by_upstream,
            clock,
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The pools.
    pub fn pools(&self) -> &[Arc<KeyPool>] {
        &self.pools
    }

    fn now_ms(&self) -> u64 {
        epoch_ms(self.clock.wall())
    }

    /// The event for a change this instance made to key `idx` of pool `pool`.
    pub fn event(&self, pool: usize, idx: KeyIndex, change: &KeyChange) -> Option<Event> {
        let p = self.pools.get(pool)?;
        if idx >= p.len() {
            return None;
        }
        let now = self.now_ms();
        let change = match change {
            KeyChange::Cooled { model, remaining } => Wire::Cooled {
                model: model.clone(),
                until_ms: now
                    .saturating_add(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX)),
            },
            KeyChange::Disabled(r) => Wire::Disabled {
                reason: r.as_str().to_string(),
            },
            KeyChange::Enabled => Wire::Enabled,
        };
        Some(Event {
            from: self.instance.clone(),
            at_ms: now,
            upstream: p.upstream().to_string(),
            key: p.name(idx).to_string(),
            id: p.key_id(idx).to_string(),
            change,
        })
    }

    /// Applies an event from another instance (or from the store) to the local pools.
    pub fn apply(&self, ev: &Event) -> Applied {
        let Some(pool) = self.by_upstream.get(&ev.upstream).map(|&i| &self.pools[i]) else {
            return Applied::Unknown;
        };
        let Some(idx) = pool.index_of(&ev.key).filter(|&i| pool.key_id(i) == ev.id) else {
            return Applied::Unknown;
        };
        let change = match &ev.change {
            Wire::Cooled { model, until_ms } => {
                let left = until_ms.saturating_sub(self.now_ms());
                if left == 0 {
                    return Applied::Unchanged;
                }
                KeyChange::Cooled {
                    model: model.clone(),
                    remaining: Duration::from_millis(left),
                }
            }
            Wire::Disabled { reason } => match DisableReason::parse(reason) {
                Some(r) => KeyChange::Disabled(r),
                None => return Applied::Unknown,
            },
            Wire::Enabled => KeyChange::Enabled,
        };
        if pool.apply_shared(idx, &change) {
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }

    /// Every key state this instance holds that is not plain ready, as events: pushed to the
    /// store after it was unreachable (it may have lost them in a restart).
    pub fn local_states(&self) -> Vec<Event> {
        let mut out = Vec::new();
        for (pi, pool) in self.pools.iter().enumerate() {
            for status in pool.status() {
                let changes: Vec<KeyChange> = match status.state {
                    KeyState::Ready => continue,
                    KeyState::Disabled { reason } => vec![KeyChange::Disabled(reason)],
                    KeyState::Cooling { cooldowns } => cooldowns
                        .into_iter()
                        .map(|c| KeyChange::Cooled {
                            model: c.model.unwrap_or_else(|| ALL_MODELS.to_string()),
                            remaining: c.remaining,
                        })
                        .collect(),
                };
                out.extend(
                    changes
                        .iter()
                        .filter_map(|c| self.event(pi, status.index, c)),
                );
            }
        }
        out
    }

    /// Whether a hash entry's cooldown has ended (the entry can be removed).
    pub fn expired(&self, ev: &Event) -> bool {
        matches!(ev.change, Wire::Cooled { until_ms, .. } if until_ms <= self.now_ms())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::keys::{CooldownPolicy, KeyPolicy, KeySpec};

    fn pool(clock: &Arc<ManualClock>, secret_b: &str) -> Arc<KeyPool> {
        Arc::new(KeyPool::new(
            "openai",
            vec![KeySpec::named("a", "sk-aaa"), KeySpec::named("b", secret_b)],
            KeyPolicy::RoundRobin,
            CooldownPolicy::default(),
            clock.clone(),
        ))
    }

    fn book(name: &str, clock: &Arc<ManualClock>, secret_b: &str) -> KeyBook {
        KeyBook::new(name.into(), vec![pool(clock, secret_b)], clock.clone())
    }

    fn cooling_for(p: &KeyPool, model: &str) -> Vec<usize> {
        p.status()
            .into_iter()
            .filter(|s| match &s.state {
                KeyState::Cooling { cooldowns } => cooldowns
                    .iter()
                    .any(|c| c.model.as_deref().unwrap_or("") == model),
                _ => false,
            })
            .map(|s| s.index)
            .collect()
    }

    #[test]
    fn a_cooldown_made_on_one_instance_cools_the_same_key_on_another() {
        let clock = ManualClock::new();
        let (a, b) = (book("A", &clock, "sk-bbb"), book("B", &clock, "sk-bbb"));
        let change = KeyChange::Cooled {
            model: "gpt-4o".into(),
            remaining: Duration::from_secs(5),
        };
        let ev = a.event(0, 1, &change).unwrap();
        assert_eq!(ev.from, "A");
        assert_eq!(b.apply(&ev), Applied::Changed);
        assert_eq!(cooling_for(&b.pools()[0], "gpt-4o"), [1]);
        assert!(cooling_for(&b.pools()[0], "gpt-4o-mini").is_empty());
        // Applying it again changes nothing, and the cooldown ends on the end time it carried.
        assert_eq!(b.apply(&ev), Applied::Unchanged);
        clock.advance(Duration::from_millis(5_001));
        assert!(cooling_for(&b.pools()[0], "gpt-4o").is_empty());
        assert_eq!(
            b.apply(&ev),
            Applied::Unchanged,
            "an ended cooldown is not applied"
        );
    }

    #[test]
    fn a_disable_and_a_re_enable_travel_and_are_not_told_back() {
        let clock = ManualClock::new();
        let (a, b) = (book("A", &clock, "sk-bbb"), book("B", &clock, "sk-bbb"));
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = told.clone();
        b.pools()[0].observe(Arc::new(move |i, c: &KeyChange| {
            sink.lock().push((i, c.clone()))
        }));
        let off = a
            .event(0, 0, &KeyChange::Disabled(DisableReason::Unauthorized))
            .unwrap();
        assert_eq!(b.apply(&off), Applied::Changed);
        assert_eq!(b.pools()[0].disabled(), [(0, DisableReason::Unauthorized)]);
        let on = a.event(0, 0, &KeyChange::Enabled).unwrap();
        assert_eq!(b.apply(&on), Applied::Changed);
        assert!(b.pools()[0].disabled().is_empty());
        assert!(told.lock().is_empty(), "shared changes are not sent back");
        // A change made locally is told.
        b.pools()[0].disable(1, DisableReason::Forbidden);
        assert_eq!(
            *told.lock(),
            [(1, KeyChange::Disabled(DisableReason::Forbidden))]
        );
    }

    #[test]
    fn a_manual_disable_travels_and_overrides_another_reason() {
        let clock = ManualClock::new();
        let (a, b) = (book("A", &clock, "sk-bbb"), book("B", &clock, "sk-bbb"));
        b.pools()[0].disable(0, DisableReason::Unauthorized);
        let off = a
            .event(0, 0, &KeyChange::Disabled(DisableReason::Manual))
            .unwrap();
        assert_eq!(b.apply(&off), Applied::Changed);
        assert_eq!(b.pools()[0].disabled(), [(0, DisableReason::Manual)]);
        assert_eq!(b.apply(&off), Applied::Unchanged);
    }

    #[test]
    fn a_key_whose_secret_differs_or_is_unknown_is_left_alone() {
        let clock = ManualClock::new();
        let (a, b) = (book("A", &clock, "sk-bbb"), book("B", &clock, "sk-other"));
        let ev = a
            .event(0, 1, &KeyChange::Disabled(DisableReason::Unauthorized))
            .unwrap();
        assert_eq!(b.apply(&ev), Applied::Unknown);
        assert!(b.pools()[0].disabled().is_empty());
        let mut stray = ev.clone();
        stray.upstream = "azure".into();
        assert_eq!(b.apply(&stray), Applied::Unknown);
        let mut bad = ev;
        bad.change = Wire::Disabled {
            reason: "bored".into(),
        };
        assert_eq!(b.apply(&bad), Applied::Unknown);
    }

    #[test]
    fn hash_entries_round_trip_and_an_enable_deletes_the_disable() {
        let clock = ManualClock::new();
        let a = book("A", &clock, "sk-bbb");
        let cooled = a
            .event(
                0,
                0,
                &KeyChange::Cooled {
                    model: String::new(),
                    remaining: Duration::from_secs(3),
                },
            )
            .unwrap();
        let HashWrite::Set { field, value } = cooled.hash_write() else {
            panic!("a cooldown is set")
        };
        let back = Event::from_hash(&field, &value).unwrap();
        assert_eq!((back.upstream.as_str(), back.key.as_str()), ("openai", "a"));
        assert_eq!(back.change, cooled.change);
        assert!(!field.contains("sk-aaa"), "no secret in the store: {field}");
        let off = a
            .event(0, 0, &KeyChange::Disabled(DisableReason::InsufficientQuota))
            .unwrap();
        let on = a.event(0, 0, &KeyChange::Enabled).unwrap();
        let HashWrite::Set { field: f_off, .. } = off.hash_write() else {
            panic!("a disable is set")
        };
        assert_eq!(on.hash_write(), HashWrite::Delete { field: f_off });
        assert!(Event::from_hash("[\"x\"]", "1").is_none());
        assert!(Event::from_hash("not json", "1").is_none());
        assert!(!a.expired(&back));
        clock.advance(Duration::from_secs(4));
        assert!(a.expired(&back));
    }

    #[test]
    fn local_states_list_every_cooldown_and_disable() {
        let clock = ManualClock::new();
        let a = book("A", &clock, "sk-bbb");
        let p = &a.pools()[0];
        p.cool_down(0, "gpt-4o", Some(Duration::from_secs(9)));
        p.disable(1, DisableReason::Unauthorized);
        let states = a.local_states();
        assert_eq!(states.len(), 2, "{states:?}");
        assert!(states.iter().any(|e| e.key == "a"
            && matches!(&e.change, Wire::Cooled { model, .. } if model == "gpt-4o")));
        assert!(states
            .iter()
            .any(|e| e.key == "b" && matches!(&e.change, Wire::Disabled { .. })));
    }
}
