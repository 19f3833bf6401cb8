//! The YAML configuration: its types, how it is read, and how mistakes are reported.
//!
//! Reading happens in two steps: [`load`] parses the file into [`ConfigFile`] (serde rejects
//! unknown fields in keygate's own sections), then [`validate`](validate::validate) checks
//! meaning (URLs, references between sections, secrets) and produces a [`Config`] with every
//! secret loaded. Each mistake becomes one [`ConfigError`] naming the file, the field and the reason.
//!
//! Loading reads the environment and files only through a [`ConfigSource`] and writes nothing:
//! the directories keygate writes into are made at start-up by [`create_runtime_dirs`].

pub mod error;
pub mod runtime_dirs;
pub mod secrets;
pub mod sizes;
pub mod source;
pub mod types;
pub mod validate;
pub mod validated;

pub use error::ConfigError;
pub use runtime_dirs::create_runtime_dirs;
pub use source::{ConfigSource, MemorySource, SystemSource};
pub use types::*;
pub use validate::{validate, validate_with};
pub use validated::{
    AdminConfig, ClientConfig, Config, GuardsConfig, KeepWarm, ListenerConfig, RouteConfig,
    RuntimeKeyStore, RuntimeKeysConfig, UpstreamConfig,
};

use std::path::Path;

/// Reads, parses and validates the config file at `path` from the real environment and disk.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &SystemSource)
}

/// Reads, parses and validates the config file at `path`, with every input taken from `source`.
pub fn load_with(path: &Path, source: &dyn ConfigSource) -> Result<Config, ConfigError> {
    let text = source
        .read_to_string(path)
        .map_err(|e| ConfigError::new(path, "", format!("cannot read: {e}")))?;
    load_str_with(path, &text, source)
}

/// Parses and validates config text; `path` is used in messages and to resolve relative paths.
pub fn load_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
    load_str_with(path, text, &SystemSource)
}

/// Like [`load_str`], with secrets and referenced files taken from `source`.
pub fn load_str_with(
    path: &Path,
    text: &str,
    source: &dyn ConfigSource,
) -> Result<Config, ConfigError> {
    // serde_path_to_error keeps the field path even through custom and untagged deserializers.
    let file: ConfigFile =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| ConfigError::from_yaml(path, &e))?;
    validate_with(path, file, source)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::validate::test_support::{
        config, error_of, expect_error_containing, no_such_file, source, with_route, with_top,
        with_upstream, FILE, ROUTE,
    };
    use super::*;

    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let err =
            load_with(Path::new("/nonexistent/keygate.yaml"), &MemorySource::new()).unwrap_err();
        assert_eq!(err.file, Path::new("/nonexistent/keygate.yaml"));
        assert_eq!(
            (err.field.as_str(), err.reason.clone()),
            ("", format!("cannot read: {}", no_such_file()))
        );
        assert_eq!(
            err.to_string(),
            format!("/nonexistent/keygate.yaml: cannot read: {}", no_such_file())
        );
        let latin1 = MemorySource::new().with_file(FILE, b"listen: caf\xe9\n".to_vec(), 0o644);
        let err = load_with(Path::new(FILE), &latin1).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{FILE}: cannot read: stream did not contain valid UTF-8")
        );
    }

    #[test]
    fn parse_mistakes_name_the_field() {
        let src = source().with_env("T", "tok");
        let cases = [
            (with_top("").replace("url:", "ulr:"), "upstreams.openai.ulr", "unknown field `ulr`"),
            (with_upstream("health: { interval: soon }"), "upstreams.openai.health.interval", "not a duration: \"soon\""),
            (with_top("max_body_bytes: 32XB"), "max_body_bytes", "unknown size unit \"XB\" in \"32XB\" (use KiB, MiB or GiB)"),
            (with_route("{ upstreams: [openai], strategy: quickest }"), "routes[0].strategy", "unknown variant `quickest`"),
            (with_top("clients:\n  - { name: a, token_env: T, limits: { budget: { tokens: 5, per: week } } }"), "clients[0].limits.budget.per", "unknown variant `week`"),
            (with_upstream("key_policy: fastest"), "upstreams.openai.key_policy", "unknown variant `fastest`"),
            (with_upstream("auth: basic"), "upstreams.openai.auth", "unknown variant `basic`"),
            (with_upstream("outlier: { count: any_5xx }"), "upstreams.openai.outlier.count", "unknown variant `any_5xx`, expected `gateway_errors` or `all_5xx`"),
            (with_top("stream_usage: always"), "stream_usage", "unknown variant `always`"),
            (config("", "keys: []", ROUTE), "upstreams.openai", "missing field `url`"),
            (with_top("listen: 8080"), "listen", "invalid type: integer `8080`, expected a sequence"),
            (with_top("colour: blue"), "colour", "unknown field `colour`"),
        ];
        for (yaml, field, part) in cases {
            expect_error_containing(&yaml, &src, field, part);
        }
    }

    #[test]
    fn an_inline_secret_is_refused_without_being_echoed() {
        let yaml = config(
            "",
            "url: http://127.0.0.1:9\nkeys: [ { name: a, key: sk-inline } ]",
            ROUTE,
        );
        let err = error_of(&yaml, &source());
        assert_eq!(err.field, "upstreams.openai.keys[0].key");
        assert!(err.reason.contains("unknown field `key`"), "{err}");
        assert!(!err.to_string().contains("sk-inline"), "{err}");
    }

    #[test]
    fn a_valid_config_loads_from_any_source() {
        let config = load_with(
            Path::new(FILE),
            &source().with_file(FILE, with_top(""), 0o600),
        )
        .unwrap();
        assert_eq!(config.path, Path::new(FILE));
        assert_eq!(config.upstreams[0].keys[0].secret.expose(), "sk-x");
        let from_text = load_str_with(Path::new(FILE), &with_top(""), &source()).unwrap();
        assert_eq!(from_text.routes.len(), 1);
    }

    #[test]
    fn load_reads_the_real_disk_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.yaml");
        let yaml = "listen: [ { addr: 127.0.0.1:8080 } ]\nupstreams: { u: { url: http://127.0.0.1:9, auth: none } }\nroutes: [ { upstreams: [u] } ]\n";
        std::fs::write(&path, yaml).unwrap();
        assert_eq!(load(&path).unwrap().upstreams[0].name, "u");
        assert_eq!(load_str(&path, yaml).unwrap().routes.len(), 1);
    }
}
