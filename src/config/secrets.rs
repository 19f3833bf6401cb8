//! Loading secrets from the environment and from key files, and refusing unsafe key files.

use super::source::ConfigSource;
use crate::keys::Secret;
use std::path::Path;

/// One line of a key file.
///
/// The secret is a [`Secret`], so `{:?}` of a line shows its options but never the key.
#[derive(Debug)]
pub struct KeyLine {
    /// The secret.
    pub secret: Secret,
    /// `name=` option.
    pub name: Option<String>,
    /// `weight=` option.
    pub weight: Option<u32>,
    /// `account=` option.
    pub account: Option<String>,
    /// `organization=` option.
    pub organization: Option<String>,
    /// `project=` option.
    pub project: Option<String>,
}

/// Reads a secret from environment variable `var`.
pub fn from_env(source: &dyn ConfigSource, var: &str) -> Result<String, String> {
    if !is_variable_name(var) {
        // Never echo it: a secret pasted here in place of a variable's name is the usual cause.
        return Err(
            "is not an environment variable name (letters, digits and _; the secret itself goes in that variable, never in the config)"
                .to_string(),
        );
    }
    let value = source
        .env(var)
        .ok_or_else(|| format!("environment variable {var} is not set"))?
        .into_string()
        .map_err(|_| format!("environment variable {var} is not valid UTF-8"))?;
    if value.trim().is_empty() {
        return Err(format!("environment variable {var} is empty"));
    }
    Ok(value.trim().to_string())
}

/// Whether `name` can be an environment variable's name: `[A-Za-z_][A-Za-z0-9_]*`, at most 128.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// Options a key-file line may carry after the key.
const KEY_OPTIONS: [&str; 5] = ["name", "weight", "account", "organization", "project"];

/// The message for an option the key file does not know. The word is quoted only when it is a
/// near miss of a real option (a typo): anything else may be a piece of a secret split by a space.
fn unknown_option(line: usize, word: &str) -> String {
    let hint = KEY_OPTIONS
        .iter()
        .find(|o| edit_distance(o, word) <= 2)
        .map_or(String::new(), |o| format!(" {word:?}; did you mean {o}=?"));
    format!(
        "line {line}: unknown option{hint} (use name=, weight=, account=, organization=, project=)"
    )
}

/// Levenshtein distance, for typo hints on short option names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Reads a key file after checking that only its owner can read it.
pub fn read_keys_file(source: &dyn ConfigSource, path: &Path) -> Result<Vec<KeyLine>, String> {
    check_private(source, path)?;
    let text = source
        .read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_keys(&text)
}

/// Refuses a file that group or others may read (on platforms with Unix modes).
fn check_private(source: &dyn ConfigSource, path: &Path) -> Result<(), String> {
    let meta = source
        .metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match meta.mode {
        Some(mode) if mode & 0o077 != 0 => Err(format!(
            "{} is readable by group/others (mode {mode:04o}); run chmod 600 on it",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Parses key-file text: one key a line with optional `name=`, `weight=`, `account=`,
/// `organization=`, `project=`; `#` starts a comment.
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
            secret: Secret::new(secret),
            name: None,
            weight: None,
            account: None,
            organization: None,
            project: None,
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
                "organization" => key.organization = Some(v.to_string()),
                "project" => key.project = Some(v.to_string()),
                "weight" => {
                    key.weight = Some(v.parse().ok().filter(|w| *w > 0).ok_or_else(|| {
                        format!("line {}: weight must be a positive integer", n + 1)
                    })?)
                }
                _ => return Err(unknown_option(n + 1, k)),
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
    use crate::config::source::{MemorySource, SystemSource};

    #[test]
    fn key_lines_carry_options_and_skip_comments() {
        let keys =
            parse_keys("# pool\nsk-1 name=a weight=2 account=org1\n\nsk-2 # trailing\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].name.as_deref(), Some("a"));
        assert_eq!(keys[0].weight, Some(2));
        assert_eq!(keys[0].account.as_deref(), Some("org1"));
        assert_eq!(keys[1].secret.expose(), "sk-2");
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
        assert!(read_keys_file(&SystemSource, &path)
            .unwrap_err()
            .contains("readable by group/others"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_keys_file(&SystemSource, &path).unwrap().len(), 1);
    }

    #[test]
    fn key_line_debug_never_shows_the_secret() {
        let secret = "sk-proj-0123456789abcdefghijklmnopqrstuv";
        let keys = parse_keys(&format!("{secret} name=main weight=3 account=org")).unwrap();
        let shown = format!("{:?} {:#?}", keys[0], keys);
        for start in 0..=secret.len() - 8 {
            let run = &secret[start..start + 8];
            assert!(!shown.contains(run), "{run:?} of the secret in {shown}");
        }
        assert!(shown.contains("main"), "the name stays visible: {shown}");
    }

    #[cfg(unix)]
    #[test]
    fn env_secrets_are_trimmed_and_missing_empty_or_non_utf8_ones_are_named() {
        use std::os::unix::ffi::OsStringExt;
        let src = MemorySource::new()
            .with_env("K", "  sk-1\n")
            .with_env("BLANK", " ")
            .with_env("BYTES", std::ffi::OsString::from_vec(vec![0xff, 0xfe]));
        assert_eq!(from_env(&src, "K").unwrap(), "sk-1");
        assert_eq!(
            from_env(&src, "NOPE").unwrap_err(),
            "environment variable NOPE is not set"
        );
        assert_eq!(
            from_env(&src, "BLANK").unwrap_err(),
            "environment variable BLANK is empty"
        );
        assert_eq!(
            from_env(&src, "BYTES").unwrap_err(),
            "environment variable BYTES is not valid UTF-8"
        );
    }

    #[test]
    fn a_secret_in_place_of_a_variable_name_is_never_echoed() {
        let src = MemorySource::new();
        for pasted in ["sk-proj-abcdefgh12345678", "sk ant key", "1ABC", ""] {
            let e = from_env(&src, pasted).unwrap_err();
            assert!(e.starts_with("is not an environment variable name"), "{e}");
            assert!(pasted.is_empty() || !e.contains(pasted), "{e}");
        }
        assert!(from_env(&src, "OPENAI_KEY_1")
            .unwrap_err()
            .contains("OPENAI_KEY_1"));
    }

    #[test]
    fn unknown_key_file_options_are_quoted_only_as_typos() {
        assert_eq!(
            unknown_option(3, "wieght"),
            "line 3: unknown option \"wieght\"; did you mean weight=? (use name=, weight=, account=, organization=, project=)"
        );
        let split = unknown_option(1, "Xy7Qp2Lk9Rt4");
        assert!(!split.contains("Xy7Qp2Lk9Rt4"), "{split}");
        assert_eq!(edit_distance("name", "name"), 0);
        assert_eq!(edit_distance("acount", "account"), 1);
    }

    #[test]
    fn key_file_checks_go_through_the_source() {
        let src = MemorySource::new()
            .with_file("/k/open", "sk-1\n", 0o640)
            .with_file("/k/ok", "sk-1 name=a\nsk-2\n", 0o400)
            .with_file("/k/bin", vec![0xff, 0xfe], 0o600);
        assert_eq!(
            read_keys_file(&src, Path::new("/k/open")).unwrap_err(),
            "/k/open is readable by group/others (mode 0640); run chmod 600 on it"
        );
        assert_eq!(read_keys_file(&src, Path::new("/k/ok")).unwrap().len(), 2);
        assert_eq!(
            read_keys_file(&src, Path::new("/k/missing")).unwrap_err(),
            format!(
                "cannot read /k/missing: {}",
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
        assert_eq!(
            read_keys_file(&src, Path::new("/k/bin")).unwrap_err(),
            "cannot read /k/bin: stream did not contain valid UTF-8"
        );
    }
}
