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

    /// Turns a serde_yaml error (which carries the field path in its message) into ours.
    pub fn from_yaml(file: &Path, e: &serde_yaml::Error) -> Self {
        let text = e.to_string();
        // serde_yaml writes "a.b[0].c: reason at line L column C"; split the path off so the
        // message reads the same as our own validation errors.
        match text.split_once(": ") {
            Some((field, reason)) if !field.contains(' ') => {
                Self::new(file, field, reason.to_string())
            }
            _ => Self::new(file, "", text),
        }
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
