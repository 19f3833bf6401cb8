//! The YAML configuration: its types, how it is read, and how mistakes are reported.
//!
//! Reading happens in two steps: [`load`] parses the file into [`ConfigFile`] (serde rejects
//! unknown fields in keygate's own sections), then [`validate`](validate::validate) checks
//! meaning (URLs, references between sections, secrets) and produces a [`Config`] with every
//! secret loaded. Each mistake becomes one [`ConfigError`] naming the file, the field and the reason.

pub mod error;
pub mod secrets;
pub mod sizes;
pub mod types;
pub mod validate;

pub use error::ConfigError;
pub use types::*;
pub use validate::{
    validate, ClientConfig, Config, GuardsConfig, KeepWarm, ListenerConfig, RouteConfig,
    UpstreamConfig,
};

use std::path::Path;

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "", format!("cannot read: {e}")))?;
    load_str(path, &text)
}

/// Parses and validates config text; `path` is used in messages and to resolve relative paths.
pub fn load_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
    // serde_path_to_error keeps the field path even through custom and untagged deserializers.
    let file: ConfigFile =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| ConfigError::from_yaml(path, &e))?;
    validate(path, file)
}
