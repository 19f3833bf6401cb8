//! Keys added and removed at run time: checked, sealed, stored, then put into (or taken out
//! of) their upstream's pool; and the pools kept in line with what the store holds (at start,
//! and every second when the store is shared through Redis).
//!
//! Keys from the config stay read-only here: they can be disabled, enabled and tested, never
//! removed or replaced, and a stored key that has a configured key's name is left out (with a
//! warning) rather than shadowing it.

use super::{KeyBackend, MasterKey, SealError, StoreError, StoredKey};
use crate::config::AuthStyle;
use crate::keys::{AddKeyError, KeyIndex, KeySpec, Secret};
use crate::upstream::Upstream;
use log::{info, warn};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

/// Longest key name accepted.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 4096;
/// Longest account accepted.
const MAX_ACCOUNT_CHARS: usize = 128;

/// A key to add, as an operator gives it.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Its name: letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// Its secret.
    pub secret: Secret,
    /// Its account, if any (keys of one account share org-wide rate limits).
    pub account: Option<String>,
    /// Its weight (default 1).
    pub weight: Option<u32>,
}

/// Why a runtime key change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeKeyError {
    /// No upstream has that name.
    #[error("no upstream is named {0:?}")]
    UnknownUpstream(String),
    /// The upstream has no key of that name.
    #[error("upstream {upstream} has no key named {name:?}")]
    UnknownKey {
        /// The upstream.
        upstream: String,
        /// The name.
        name: String,
    },
    /// The key comes from the config.
    #[error("key {upstream}/{name} comes from the config: remove it there (disable and enable work at run time)")]
    FromConfig {
        /// The upstream.
        upstream: String,
        /// The name.
        name: String,
    },
    /// The upstream sends no key.
    #[error("upstream {0} sends no key (auth: none)")]
    NoCredentials(String),
    /// The request is not a valid key.
    #[error("{0}")]
    Invalid(String),
    /// The name or secret is in the pool already.
    #[error(transparent)]
    Taken(#[from] AddKeyError),
    /// The store could not be written.
    #[error("the key store refused the change: {0}")]
    Store(#[from] StoreError),
    /// The secret could not be sealed.
    #[error("the secret could not be sealed: {0}")]
    Seal(#[from] SealError),
}

/// What one pass of [`RuntimeKeys::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Keys put into pools, as `upstream/name`.
    pub added: Vec<String>,
    /// Keys taken out, as `upstream/name`.
    pub removed: Vec<String>,
    /// Stored keys that could not be used, with why (no secret in the text).
    pub failed: Vec<String>,
}

/// Runtime keys: the store and the pools they go into.
pub struct RuntimeKeys {
    upstreams: Arc<[Upstream]>,
    master: MasterKey,
    backend: Arc<dyn KeyBackend>,
    /// Makes changes and passes over the store take turns, so a pass that read the store
    /// before a change never undoes it.
    turn: tokio::sync::Mutex<()>,
    /// Stored keys already warned about, so that a pass every second does not repeat itself.
    warned: Mutex<HashSet<String>>,
    /// What the store held at the last pass, with this instance's changes since: put back if a
    /// shared store loses everything.
    known: Mutex<Vec<StoredKey>>,
}

impl std::fmt::Debug for RuntimeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeKeys").finish_non_exhaustive()
    }
}

impl RuntimeKeys {
    /// Runtime keys for `upstreams`, sealed with `master`, kept in `backend`.
    pub fn new(
        upstreams: Arc<[Upstream]>,
        master: MasterKey,
        backend: Arc<dyn KeyBackend>,
    ) -> Self {
        Self {
            upstreams,
            master,
            backend,
            turn: tokio::sync::Mutex::new(()),
            warned: Mutex::new(HashSet::new()),
            known: Mutex::new(Vec::new()),
        }
    }

    fn upstream(&self, name: &str) -> Result<&Upstream, RuntimeKeyError> {
        self.upstreams
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| RuntimeKeyError::UnknownUpstream(name.to_string()))
    }

    /// Adds `key` to upstream `upstream`: stored first, then in rotation; its index. `actor`
    /// names who asked, for the log.
    pub async fn add(
        &self,
        upstream: &str,
        key: NewKey,
        actor: &str,
    ) -> Result<KeyIndex, RuntimeKeyError> {
        let _turn = self.turn.lock().await;
        let up = self.upstream(upstream)?;
        if up.auth == AuthStyle::None {
            return Err(RuntimeKeyError::NoCredentials(up.name.clone()));
        }
        check(&key)?;
        let spec = KeySpec {
            name: key.name,
            weight: key.weight.unwrap_or(1),
            account: key.account,
            organization: None,
            project: None,
            secret: key.secret,
        };
        up.keys.check_add(&spec)?;
        let sealed = self.master.seal(
            &StoredKey::context(&up.name, &spec.name),
            spec.secret.expose().as_bytes(),
        )?;
        let record = StoredKey {
            upstream: up.name.clone(),
            name: spec.name.clone(),
            id: spec.secret.id(),
            account: spec.account.clone(),
            weight: spec.weight,
            added_at_ms: crate::clock::epoch_ms(SystemTime::now()),
            added_by: actor.to_string(),
            nonce: sealed.nonce,
            secret: sealed.ciphertext,
        };
        self.backend.put(&record).await?;
        let idx = up.add_key(spec)?;
        {
            let mut known = self.known.lock();
            known.retain(|k| !(k.upstream == record.upstream && k.name == record.name));
            known.push(record.clone());
        }
        info!(
            "admin: key {}/{} ({}) added by {actor}",
            up.name, record.name, record.id
        );
        Ok(idx)
    }

    /// Removes the runtime key `name` of `upstream`: out of the store, then out of rotation
    /// (requests using it finish).
    pub async fn remove(
        &self,
        upstream: &str,
        name: &str,
        actor: &str,
    ) -> Result<(), RuntimeKeyError> {
        let _turn = self.turn.lock().await;
        let up = self.upstream(upstream)?;
        let idx = up
            .keys
            .index_of(name)
            .ok_or_else(|| RuntimeKeyError::UnknownKey {
                upstream: up.name.clone(),
                name: name.to_string(),
            })?;
        if !up.keys.is_added(idx) {
            return Err(RuntimeKeyError::FromConfig {
                upstream: up.name.clone(),
                name: name.to_string(),
            });
        }
        self.backend.delete(&up.name, name).await?;
        up.keys.remove(idx);
        self.known
            .lock()
            .retain(|k| !(k.upstream == up.name && k.name == name));
        info!("admin: key {}/{name} removed by {actor}", up.name);
        Ok(())
    }

    /// Reads the store and brings the pools in line with it.
    pub async fn sync(&self) -> Result<Applied, StoreError> {
        let _turn = self.turn.lock().await;
        let stored = match self.backend.load().await {
            Ok(stored) => stored,
            Err(StoreError::Lost) => {
                let known = self.known.lock().clone();
                for k in &known {
                    self.backend.put(k).await?;
                }
                if !known.is_empty() {
                    warn!(
                        "runtime keys: the shared store was gone (a Redis restarted without its data?); put back the {} key(s) this instance holds",
                        known.len()
                    );
                }
                known
            }
            Err(e) => return Err(e),
        };
        // The usual pass finds what the last one found: the pools are in line already.
        if *self.known.lock() == stored {
            return Ok(Applied::default());
        }
        let applied = self.apply(&stored);
        *self.known.lock() = stored;
        Ok(applied)
    }

    /// Brings the pools in line with `stored`: runtime keys not stored (or stored with another
    /// secret) leave, stored keys missing from their pool join. Callers take turns with
    /// changes (see [`RuntimeKeys::sync`]); at start nothing else runs yet.
    pub fn apply(&self, stored: &[StoredKey]) -> Applied {
        let mut done = Applied::default();
        for up in self.upstreams.iter() {
            let wanted: Vec<&StoredKey> = stored.iter().filter(|k| k.upstream == up.name).collect();
            for status in up.keys.status() {
                let idx = status.index;
                let keep = wanted
                    .iter()
                    .any(|k| k.name == status.name && k.id == up.keys.key_id(idx));
                if up.keys.is_added(idx) && !keep && up.keys.remove(idx) {
                    done.removed.push(format!("{}/{}", up.name, status.name));
                }
            }
            for k in wanted {
                match up.keys.index_of(&k.name) {
                    Some(idx) if up.keys.is_added(idx) => {} // the same key: kept above
                    Some(_) => self.warn_once(
                        k,
                        "has the name of a key from the config, which wins; remove one of them",
                    ),
                    None => match self.add_stored(up, k) {
                        Ok(()) => done.added.push(format!("{}/{}", up.name, k.name)),
                        Err(why) => {
                            self.warn_once(k, &why);
                            done.failed
                                .push(format!("key {}/{}: {why}", k.upstream, k.name));
                        }
                    },
                }
            }
        }
        for k in stored {
            if !self.upstreams.iter().any(|u| u.name == k.upstream) {
                self.warn_once(k, "names an upstream the config does not have; left out");
            }
        }
        done
    }

    fn add_stored(&self, up: &Upstream, k: &StoredKey) -> Result<(), String> {
        let plain = self
            .master
            .open(&StoredKey::context(&k.upstream, &k.name), &k.sealed())
            .map_err(|e| e.to_string())?;
        let secret = String::from_utf8(plain).map_err(|_| "the secret is not UTF-8".to_string())?;
        let secret = Secret::new(secret);
        if secret.id() != k.id {
            return Err("the secret does not match its recorded id".into());
        }
        let spec = KeySpec {
            name: k.name.clone(),
            weight: k.weight.max(1),
            account: k.account.clone(),
            organization: None,
            project: None,
            secret,
        };
        up.add_key(spec).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn warn_once(&self, k: &StoredKey, why: &str) {
        let tag = format!("{}/{}/{}/{why}", k.upstream, k.name, k.id);
        if self.warned.lock().insert(tag) {
            warn!(
                "stored runtime key {}/{} ({}) {why}",
                k.upstream, k.name, k.id
            );
        }
    }
}

/// Whether `key` is a key keygate can store and send.
fn check(key: &NewKey) -> Result<(), RuntimeKeyError> {
    let invalid = |m: String| Err(RuntimeKeyError::Invalid(m));
    let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if key.name.is_empty()
        || key.name.chars().count() > MAX_NAME_CHARS
        || !key.name.chars().all(name_ok)
    {
        return invalid(format!(
            "name: 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-'"
        ));
    }
    let secret = key.secret.expose();
    if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
        return invalid(format!("secret: 1 to {MAX_SECRET_BYTES} bytes"));
    }
    if secret.trim() != secret || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        // Never echo it.
        return invalid("secret: printable ASCII without spaces, as API keys are".into());
    }
    if let Some(account) = &key.account {
        if account.is_empty()
            || account.chars().count() > MAX_ACCOUNT_CHARS
            || account.chars().any(char::is_control)
        {
            return invalid(format!(
                "account: 1 to {MAX_ACCOUNT_CHARS} characters, no control characters"
            ));
        }
    }
    if key.weight == Some(0) {
        return invalid("weight: must be at least 1".into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::validate::test_support::{load, source, with_top};
    use crate::key_store::file::FileBackend;
    use crate::keys::Pick;

    struct Fixture {
        keys: RuntimeKeys,
        upstreams: Arc<[Upstream]>,
        store: Arc<FileBackend>,
    }

    /// Upstream `openai` with config key `a` (secret `sk-x`), the store at `path`, master key
    /// `byte` repeated: one keygate process.
    fn keygate(byte: u8, path: &std::path::Path) -> Fixture {
        let store = Arc::new(FileBackend::new(path.to_path_buf()));
        let (keys, upstreams) = over(store.clone(), byte);
        Fixture {
            keys,
            upstreams,
            store,
        }
    }

    /// Upstream `openai` with config key `a` (secret `sk-x`), runtime keys kept in `backend`
    /// under master key `byte` repeated.
    fn over(backend: Arc<dyn KeyBackend>, byte: u8) -> (RuntimeKeys, Arc<[Upstream]>) {
        let cfg = load(&with_top(""), &source()).unwrap();
        let (up, _) = Upstream::build(&cfg.upstreams[0], crate::clock::ManualClock::new());
        let upstreams: Arc<[Upstream]> = Arc::from(vec![up]);
        let keys = RuntimeKeys::new(upstreams.clone(), MasterKey::new(&[byte; 32]), backend);
        (keys, upstreams)
    }

    fn new_key(name: &str, secret: &str) -> NewKey {
        NewKey {
            name: name.into(),
            secret: Secret::new(secret),
            account: None,
            weight: None,
        }
    }

    fn names(up: &Upstream) -> Vec<String> {
        up.keys.status().into_iter().map(|s| s.name).collect()
    }

    #[tokio::test]
    async fn an_added_key_is_stored_sealed_and_serves_with_its_own_credential() {
        let dir = tempfile::tempdir().unwrap();
        let f = keygate(1, &dir.path().join("keys.json"));
        let idx = f
            .keys
            .add("openai", new_key("k2", "sk-live-222"), "admin")
            .await
            .unwrap();
        let up = &f.upstreams[0];
        assert_eq!(names(up), ["a", "k2"]);
        assert_eq!(up.keys.secret(idx).expose(), "sk-live-222");
        assert!(up.credential(idx).is_some(), "its credential exists");
        assert_eq!(up.activity.len(), 2, "its activity is counted");
        let text = std::fs::read_to_string(f.store.path()).unwrap();
        assert!(!text.contains("sk-live"), "the secret is sealed: {text}");
        let stored = f.store.read().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            (stored[0].name.as_str(), stored[0].added_by.as_str()),
            ("k2", "admin")
        );
        assert_eq!(stored[0].id, Secret::new("sk-live-222").id());
        let picks: Vec<usize> = (0..4)
            .map(|_| match up.keys.pick("m", &[]) {
                Pick::Key(l) => l.index(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    #[tokio::test]
    async fn stored_keys_come_back_after_a_restart_and_need_the_same_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let first = keygate(1, &path);
        first
            .keys
            .add("openai", new_key("k2", "sk-live-222"), "admin")
            .await
            .unwrap();
        drop(first);

        let again = keygate(1, &path);
        let applied = again.keys.sync().await.unwrap();
        assert_eq!(applied.added, ["openai/k2"]);
        assert_eq!(names(&again.upstreams[0]), ["a", "k2"]);
        let k2 = again.upstreams[0].keys.index_of("k2").unwrap();
        assert_eq!(again.upstreams[0].keys.secret(k2).expose(), "sk-live-222");

        let wrong = keygate(2, &path);
        let applied = wrong.keys.sync().await.unwrap();
        assert!(applied.added.is_empty());
        assert_eq!(applied.failed.len(), 1);
        assert!(
            applied.failed[0].contains("does not open with this master key"),
            "{:?}",
            applied.failed
        );
        assert!(!applied.failed[0].contains("sk-live"));
        assert_eq!(names(&wrong.upstreams[0]), ["a"]);
    }

    #[tokio::test]
    async fn a_removed_key_leaves_the_store_and_the_rotation_but_config_keys_stay() {
        let dir = tempfile::tempdir().unwrap();
        let f = keygate(1, &dir.path().join("keys.json"));
        f.keys
            .add("openai", new_key("k2", "sk-live-222"), "admin")
            .await
            .unwrap();
        f.keys.remove("openai", "k2", "admin").await.unwrap();
        assert_eq!(names(&f.upstreams[0]), ["a"]);
        assert!(f.store.read().unwrap().is_empty());
        let err = f.keys.remove("openai", "a", "admin").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "key openai/a comes from the config: remove it there (disable and enable work at run time)"
        );
        let err = f.keys.remove("openai", "k2", "admin").await.unwrap_err();
        assert_eq!(err.to_string(), "upstream openai has no key named \"k2\"");
        let err = f.keys.remove("nope", "k2", "admin").await.unwrap_err();
        assert_eq!(err.to_string(), "no upstream is named \"nope\"");
    }

    #[tokio::test]
    async fn bad_keys_are_refused_before_anything_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let f = keygate(1, &dir.path().join("keys.json"));
        let cases = [
            (
                new_key("", "sk-1"),
                "name: 1 to 64 letters, digits, '.', '_' or '-'",
            ),
            (
                new_key("a/b", "sk-1"),
                "name: 1 to 64 letters, digits, '.', '_' or '-'",
            ),
            (new_key("k", ""), "secret: 1 to 4096 bytes"),
            (
                new_key("k", "sk 1"),
                "secret: printable ASCII without spaces, as API keys are",
            ),
            (
                new_key("k", "sk-1\n"),
                "secret: printable ASCII without spaces, as API keys are",
            ),
            (
                new_key("a", "sk-new"),
                "upstream openai already has a key named a",
            ),
            (
                new_key("k", "sk-x"),
                "upstream openai already has this secret, as key a",
            ),
            (
                NewKey {
                    weight: Some(0),
                    ..new_key("k", "sk-1")
                },
                "weight: must be at least 1",
            ),
        ];
        for (key, message) in cases {
            let err = f.keys.add("openai", key, "admin").await.unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert!(f.store.read().unwrap().is_empty());
        assert_eq!(names(&f.upstreams[0]), ["a"]);
    }

    #[tokio::test]
    async fn a_pass_over_the_store_adds_new_keys_drops_gone_ones_and_swaps_replaced_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let f = keygate(1, &dir.path().join("keys.json"));
        f.keys
            .add("openai", new_key("k2", "sk-live-222"), "admin")
            .await
            .unwrap();
        f.keys
            .add("openai", new_key("k3", "sk-live-333"), "admin")
            .await
            .unwrap();
        // Another instance removed k2, replaced k3's secret and added k4.
        let other = keygate(1, &dir.path().join("other.json"));
        other
            .keys
            .add("openai", new_key("k3", "sk-live-999"), "admin")
            .await
            .unwrap();
        other
            .keys
            .add("openai", new_key("k4", "sk-live-444"), "admin")
            .await
            .unwrap();
        let stored = other.store.read().unwrap();
        let applied = f.keys.apply(&stored);
        assert_eq!(applied.removed, ["openai/k2", "openai/k3"]);
        assert_eq!(applied.added, ["openai/k3", "openai/k4"]);
        let up = &f.upstreams[0];
        assert_eq!(names(up), ["a", "k3", "k4"]);
        let k3 = up.keys.index_of("k3").unwrap();
        assert_eq!(up.keys.secret(k3).expose(), "sk-live-999");
        assert_eq!(
            f.keys.apply(&stored),
            Applied::default(),
            "a second pass changes nothing"
        );
    }

    #[tokio::test]
    async fn a_stored_key_named_like_a_config_key_or_for_an_unknown_upstream_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let f = keygate(1, &dir.path().join("keys.json"));
        let other = keygate(1, &dir.path().join("other.json"));
        other
            .keys
            .add("openai", new_key("k2", "sk-live-222"), "admin")
            .await
            .unwrap();
        let mut stored = other.store.read().unwrap();
        let mut clash = stored[0].clone();
        clash.name = "a".into();
        let mut elsewhere = stored[0].clone();
        elsewhere.upstream = "gone".into();
        stored.extend([clash, elsewhere]);
        let applied = f.keys.apply(&stored);
        assert_eq!(applied.added, ["openai/k2"]);
        assert_eq!(names(&f.upstreams[0]), ["a", "k2"]);
        assert_eq!(
            f.upstreams[0].keys.secret(0).expose(),
            "sk-x",
            "the config key wins"
        );
    }

    /// A shared store in memory that can lose everything, as a Redis restarted without its
    /// data does.
    #[derive(Default)]
    struct Shared {
        keys: Mutex<Option<Vec<StoredKey>>>,
    }

    #[async_trait::async_trait]
    impl KeyBackend for Shared {
        async fn load(&self) -> Result<Vec<StoredKey>, StoreError> {
            self.keys.lock().clone().ok_or(StoreError::Lost)
        }
        async fn put(&self, key: &StoredKey) -> Result<(), StoreError> {
            let mut all = self.keys.lock();
            let list = all.get_or_insert_with(Vec::new);
            list.retain(|k| !(k.upstream == key.upstream && k.name == key.name));
            list.push(key.clone());
            Ok(())
        }
        async fn delete(&self, upstream: &str, name: &str) -> Result<bool, StoreError> {
            let mut all = self.keys.lock();
            let list = all.get_or_insert_with(Vec::new);
            let before = list.len();
            list.retain(|k| !(k.upstream == upstream && k.name == name));
            Ok(list.len() < before)
        }
    }

    #[tokio::test]
    async fn a_shared_store_that_lost_everything_gets_the_keys_back_but_an_emptied_one_does_not() {
        let shared = Arc::new(Shared::default());
        let (a, ups_a) = over(shared.clone(), 1);
        let (b, ups_b) = over(shared.clone(), 1);
        assert_eq!(
            a.sync().await.unwrap(),
            Applied::default(),
            "nothing ever stored"
        );
        a.add("openai", new_key("k2", "sk-live-222"), "admin")
            .await
            .unwrap();
        assert_eq!(b.sync().await.unwrap().added, ["openai/k2"]);
        // Redis restarts empty: the next pass of either instance puts k2 back; nobody drops it.
        *shared.keys.lock() = None;
        assert_eq!(b.sync().await.unwrap(), Applied::default());
        assert_eq!(shared.keys.lock().as_ref().map(Vec::len), Some(1));
        assert_eq!(a.sync().await.unwrap(), Applied::default());
        assert_eq!(names(&ups_a[0]), ["a", "k2"]);
        // A removal empties the store without losing it: the others drop the key.
        a.remove("openai", "k2", "admin").await.unwrap();
        assert_eq!(b.sync().await.unwrap().removed, ["openai/k2"]);
        assert_eq!(names(&ups_b[0]), ["a"]);
    }
}
