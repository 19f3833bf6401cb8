//! The one error type for configuration mistakes.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration mistake: which file, which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Dotted path of the field, e.g. `upstreams.openai.url` (empty for the whole file).
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub reason: String,
}

impl ConfigError {
    /// Builds an error for `field` of `file`.
    pub fn new(file: &Path, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Turns a parse error (with the path of the field it happened in) into ours.
    pub fn from_yaml(file: &Path, e: &serde_path_to_error::Error<serde_yaml::Error>) -> Self {
        let field = e.path().to_string();
        let inner = e.inner().to_string();
        // serde_yaml may prefix its own copy of the path; keep one.
        let reason = match inner.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && field.ends_with(prefix) => {
                rest.to_string()
            }
            _ => inner,
        };
        let field = if field == "." { String::new() } else { field };
        Self::new(file, field, reason)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}
