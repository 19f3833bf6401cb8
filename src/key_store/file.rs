//! The local key store: one JSON file, readable by its owner only, replaced atomically on each
//! change.

use super::{KeyBackend, StoreError, StoredKey};
use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file's format version.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    keys: Vec<StoredKey>,
}

/// Runtime keys in a local file.
#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    /// Makes changes take turns (each one reads, edits and rewrites the file).
    turn: Mutex<()>,
}

impl FileBackend {
    /// The store at `path` (a missing file is an empty store).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            turn: Mutex::new(()),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, reason: impl ToString) -> StoreError {
        StoreError::File {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Every stored key, read now.
    pub fn read(&self) -> Result<Vec<StoredKey>, StoreError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.error(e)),
        };
        let file: StoreFile = serde_json::from_slice(&text)
            .map_err(|e| self.error(format!("not a keygate key store: {e}")))?;
        if file.version != VERSION {
            return Err(self.error(format!(
                "version {} is not the one this keygate reads ({VERSION})",
                file.version
            )));
        }
        Ok(file.keys)
    }

    fn write(&self, keys: Vec<StoredKey>) -> Result<(), StoreError> {
        let file = StoreFile {
            version: VERSION,
            keys,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| self.error(e))?;
        crate::private_file::write_atomically(&self.path, &text).map_err(|e| self.error(e))
    }
}

#[async_trait]
impl KeyBackend for FileBackend {
    async fn load(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read()
    }

    async fn put(&self, key: &StoredKey) -> Result<(), StoreError> {
        let _turn = self.turn.lock();
        let mut keys = self.read()?;
        keys.retain(|k| !(k.upstream == key.upstream && k.name == key.name));
        keys.push(key.clone());
        self.write(keys)
    }

    async fn delete(&self, upstream: &str, name: &str) -> Result<bool, StoreError> {
        let _turn = self.turn.lock();
        let mut keys = self.read()?;
        let before = keys.len();
        keys.retain(|k| !(k.upstream == upstream && k.name == name));
        if keys.len() == before {
            return Ok(false);
        }
        self.write(keys)?;
        Ok(true)
    }
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn stored(upstream: &str, name: &str) -> StoredKey {
        StoredKey {
            upstream: upstream.into(),
            name: name.into(),
            id: "key-00000000".into(),
            account: None,
            weight: 1,
            added_at_ms: 1,
            added_by: "admin".into(),
            nonce: "n".into(),
            secret: "s".into(),
        }
    }

    #[tokio::test]
    async fn keys_are_put_replaced_and_deleted_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileBackend::new(dir.path().join("keys.json"));
        assert!(store.load().await.unwrap().is_empty(), "no file: no keys");
        store.put(&stored("openai", "a")).await.unwrap();
        store.put(&stored("openai", "b")).await.unwrap();
        let mut again = stored("openai", "a");
        again.weight = 3;
        store.put(&again).await.unwrap();
        let keys = store.load().await.unwrap();
        let names: Vec<_> = keys.iter().map(|k| (k.name.as_str(), k.weight)).collect();
        assert_eq!(names, [("b", 1), ("a", 3)]);
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(store.delete("openai", "b").await.unwrap());
        assert!(!store.delete("openai", "b").await.unwrap());
        assert_eq!(store.load().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = FileBackend::new(path.clone()).load().await.unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}: not a keygate key store", path.display())),
            "{shown}"
        );
        std::fs::write(&path, r#"{"version":9,"keys":[]}"#).unwrap();
        let err = FileBackend::new(path).load().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("version 9 is not the one this keygate reads (1)"),
            "{err}"
        );
    }
}
