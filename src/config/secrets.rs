//! Loading secrets from the environment and from key files, and refusing unsafe key files.

use std::path::Path;

/// One line of a key file.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyLine {
    /// The secret.
    pub secret: String,
    /// `name=` option.
    pub name: Option<String>,
    /// `weight=` option.
    pub weight: Option<u32>,
    /// `account=` option.
    pub account: Option<String>,
}

/// Reads a secret from environment variable `var`.
pub fn from_env(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(v) if v.trim().is_empty() => Err(format!("environment variable {var} is empty")),
        Ok(v) => Ok(v.trim().to_string()),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("environment variable {var} is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("environment variable {var} is not valid UTF-8"))
        }
    }
}

/// Reads a key file after checking that only its owner can read it.
pub fn read_keys_file(path: &Path) -> Result<Vec<KeyLine>, String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_keys(&text)
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group/others (mode {mode:04o}); run chmod 600 on it",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), String> {
    Ok(())
}

/// Parses key-file text: one key a line with optional `name=`, `weight=`, `account=`; `#` starts a comment.
pub fn parse_keys(text: &str) -> Result<Vec<KeyLine>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(secret) = words.next() else { continue };
        let mut key = KeyLine {
            secret: secret.to_string(),
            name: None,
            weight: None,
            account: None,
        };
        for word in words {
            // Never echo the word: on a malformed line it might be part of a secret.
            let (k, v) = word.split_once('=').ok_or_else(|| {
                format!(
                    "line {}: expected name=, weight= or account= after the key",
                    n + 1
                )
            })?;
            match k {
                "name" => key.name = Some(v.to_string()),
                "account" => key.account = Some(v.to_string()),
                "weight" => {
                    key.weight = Some(v.parse().ok().filter(|w| *w > 0).ok_or_else(|| {
                        format!("line {}: weight must be a positive integer", n + 1)
                    })?)
                }
                _ => {
                    return Err(format!(
                        "line {}: unknown option {k:?} (use name=, weight=, account=)",
                        n + 1
                    ))
                }
            }
        }
        out.push(key);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_carry_options_and_skip_comments() {
        let keys =
            parse_keys("# pool\nsk-1 name=a weight=2 account=org1\n\nsk-2 # trailing\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].name.as_deref(), Some("a"));
        assert_eq!(keys[0].weight, Some(2));
        assert_eq!(keys[0].account.as_deref(), Some("org1"));
        assert_eq!(keys[1].secret, "sk-2");
    }

    #[test]
    fn bad_key_line_names_the_line_but_not_the_secret() {
        let err = parse_keys("sk-secret-value weight=zero").unwrap_err();
        assert!(err.contains("line 1"));
        assert!(!err.contains("sk-secret"));
    }

    #[cfg(unix)]
    #[test]
    fn group_readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "sk-1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_keys_file(&path)
            .unwrap_err()
            .contains("readable by group/others"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_keys_file(&path).unwrap().len(), 1);
    }
}
