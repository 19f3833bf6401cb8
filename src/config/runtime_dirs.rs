//! The directories keygate writes into, made at start-up: `keygate -t` only checks them.

use super::{Config, ConfigError};
use std::path::Path;

/// Creates the missing directories of `state_file`, the runtime key store and
/// `server.upgrade_sock`, mode 0700.
///
/// Both are private: the upgrade socket is created mode 0666 by Pingora, and the state file
/// names keys and clients. Errors name the field as a config error would.
pub fn create_runtime_dirs(config: &Config) -> Result<(), ConfigError> {
    let state_dir = config.state_file.as_deref().and_then(Path::parent);
    if let Some(dir) = state_dir.filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        create_private_dir(dir).map_err(|e| ConfigError::new(&config.path, "state_file", e))?;
    }
    let key_store = config.admin.as_ref().and_then(|a| a.runtime_keys.as_ref());
    if let Some(super::RuntimeKeyStore::File(path)) = key_store.map(|k| &k.store) {
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            create_private_dir(dir)
                .map_err(|e| ConfigError::new(&config.path, "admin.runtime_keys.path", e))?;
        }
    }
    let sock_dir = Path::new(&config.server.upgrade_sock).parent();
    if let Some(dir) = sock_dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        create_private_dir(dir)
            .map_err(|e| ConfigError::new(&config.path, "server.upgrade_sock", e))?;
    }
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{load_str_with, MemorySource};
    use std::os::unix::fs::PermissionsExt;

    fn config_in(dir: &Path) -> Config {
        let yaml = format!(
            "server: {{ upgrade_sock: {d}/run/sock/upgrade.sock }}\nstate_file: {d}/state/keys.json\n\
             listen: [ {{ addr: 127.0.0.1:8080 }} ]\n\
             upstreams: {{ u: {{ url: http://127.0.0.1:9, auth: none }} }}\nroutes: [ {{ upstreams: [u] }} ]\n",
            d = dir.display()
        );
        load_str_with(&dir.join("keygate.yaml"), &yaml, &MemorySource::new()).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn missing_state_and_socket_dirs_are_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config_in(tmp.path());
        assert!(!tmp.path().join("run").exists(), "loading wrote nothing");
        create_runtime_dirs(&config).unwrap();
        assert_eq!(mode(&tmp.path().join("state")), 0o700);
        assert_eq!(mode(&tmp.path().join("run")), 0o700);
        assert_eq!(mode(&tmp.path().join("run/sock")), 0o700);
        // Existing directories are left as they are.
        create_runtime_dirs(&config).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_made_names_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config_in(tmp.path());
        std::fs::write(tmp.path().join("state"), "a file, not a directory").unwrap();
        let err = create_runtime_dirs(&config).unwrap_err();
        assert_eq!(err.field, "state_file");
        let dir = tmp.path().join("state");
        assert!(
            err.reason
                .starts_with(&format!("cannot create {}: ", dir.display())),
            "{err}"
        );
    }
}
