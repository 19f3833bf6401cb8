//! An upstream's keys: `keys:` from environment variables and `keys_file:`, checked against `auth`.

use super::Scope;
use crate::config::secrets;
use crate::config::types::{AuthStyle, UpstreamFile};
use crate::config::ConfigError;
use crate::keys::{key_id, KeySpec, Secret};
use std::collections::HashSet;

/// Every key of the upstream, env keys first; none when `auth: none`, at least one otherwise.
pub(super) fn keys(at: &Scope, u: &UpstreamFile) -> Result<Vec<KeySpec>, ConfigError> {
    let source = at.cx.source;
    let mut keys = KeySet::default();
    for (i, k) in u.keys.iter().enumerate() {
        let f = format!("keys[{i}]");
        let secret =
            secrets::from_env(source, &k.env).map_err(|e| at.err(&format!("{f}.env"), e))?;
        if k.weight == Some(0) {
            return Err(at.err(&format!("{f}.weight"), "must be at least 1"));
        }
        let spec = KeySpec {
            name: k.name.clone().unwrap_or_else(|| key_id(&secret)),
            weight: k.weight.unwrap_or(1),
            account: k.account.clone(),
            organization: k.organization.clone(),
            project: k.project.clone(),
            secret: Secret::new(secret),
        };
        keys.push(at, spec, &f)?;
    }
    if let Some(p) = &u.keys_file {
        let lines = secrets::read_keys_file(source, &at.cx.resolve(p))
            .map_err(|e| at.err("keys_file", e))?;
        for line in lines {
            let spec = KeySpec {
                name: line.name.unwrap_or_else(|| line.secret.id()),
                weight: line.weight.unwrap_or(1),
                account: line.account,
                organization: line.organization,
                project: line.project,
                secret: line.secret,
            };
            keys.push(at, spec, "keys_file")?;
        }
    }
    if keys.keys.is_empty() && u.auth_style() != AuthStyle::None {
        return Err(at.err(
            "keys",
            "no keys: give `keys` (from env vars) or `keys_file`, or set `auth: none`",
        ));
    }
    if !keys.keys.is_empty() && u.auth_style() == AuthStyle::None {
        return Err(at.err("auth", "is `none` but keys are given; pick an auth style"));
    }
    Ok(keys.keys)
}

/// The keys so far, with what must stay unique among them.
#[derive(Default)]
struct KeySet {
    keys: Vec<KeySpec>,
    names: HashSet<String>,
    secrets: HashSet<String>,
}

impl KeySet {
    /// Adds `spec` (from `field`) if its name and secret are new and it can go in a header.
    fn push(&mut self, at: &Scope, spec: KeySpec, field: &str) -> Result<(), ConfigError> {
        if !self.names.insert(spec.name.clone()) {
            return Err(at.err(field, format!("key name {:?} is used twice", spec.name)));
        }
        for (option, value) in [
            ("organization", &spec.organization),
            ("project", &spec.project),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| v.is_empty() || http::HeaderValue::from_str(v).is_err())
            {
                return Err(at.err(
                    field,
                    format!(
                        "key {:?}: {option} must be a non-empty header value",
                        spec.name
                    ),
                ));
            }
        }
        if http::HeaderValue::from_str(spec.secret.expose()).is_err() {
            // Never echo the secret: name the key only.
            return Err(at.err(
                field,
                format!(
                    "key {:?} has characters that cannot be sent in a header",
                    spec.name
                ),
            ));
        }
        if !self.secrets.insert(spec.secret.expose().to_string()) {
            return Err(at.err(
                field,
                format!("key {:?} is the same secret as another key", spec.name),
            ));
        }
        self.keys.push(spec);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use crate::config::MemorySource;
    use crate::keys::key_id;

    fn with_keys(keys: &str) -> String {
        config("", &format!("url: http://127.0.0.1:9\n{keys}"), ROUTE)
    }

    #[test]
    fn env_key_mistakes_are_named() {
        let src = source()
            .with_env("K1", "sk-one")
            .with_env("K2", "sk-two")
            .with_env("SAME", "sk-one")
            .with_env("BLANK", "  ")
            .with_env("CTRL", "sk-\u{1}x");
        let cases = [
            (
                "keys: [ { name: a, env: NOPE } ]",
                "keys[0].env",
                "environment variable NOPE is not set",
            ),
            (
                "keys: [ { name: a, env: BLANK } ]",
                "keys[0].env",
                "environment variable BLANK is empty",
            ),
            (
                "keys: [ { name: a, env: K1, weight: 0 } ]",
                "keys[0].weight",
                "must be at least 1",
            ),
            (
                "keys: [ { name: a, env: K1 }, { name: a, env: K2 } ]",
                "keys[1]",
                "key name \"a\" is used twice",
            ),
            (
                "keys: [ { name: a, env: CTRL } ]",
                "keys[0]",
                "key \"a\" has characters that cannot be sent in a header",
            ),
            (
                "keys: [ { name: a, env: K1 }, { name: b, env: SAME } ]",
                "keys[1]",
                "key \"b\" is the same secret as another key",
            ),
            (
                "keys: []",
                "keys",
                "no keys: give `keys` (from env vars) or `keys_file`, or set `auth: none`",
            ),
            (
                "auth: none\nkeys: [ { name: a, env: K1 } ]",
                "auth",
                "is `none` but keys are given; pick an auth style",
            ),
        ];
        for (keys, field, reason) in cases {
            let field = format!("upstreams.openai.{field}");
            expect_error(&with_keys(keys), &src, &field, reason);
        }
    }

    #[test]
    fn account_scope_headers_of_a_key_are_taken_from_keys_and_key_files() {
        let file = "/etc/keygate/openai.keys";
        let src = source().with_env("K1", "sk-one").with_file(
            file,
            "sk-two name=b organization=org-b project=proj_b\n",
            0o600,
        );
        let yaml = with_keys(&format!(
            "keys: [ {{ name: a, env: K1, organization: org-a }} ]\nkeys_file: {file}"
        ));
        let config = load(&yaml, &src).unwrap();
        let keys = &config.upstreams[0].keys;
        assert_eq!(keys[0].organization.as_deref(), Some("org-a"));
        assert_eq!(keys[0].project, None);
        assert_eq!(keys[1].organization.as_deref(), Some("org-b"));
        assert_eq!(keys[1].project.as_deref(), Some("proj_b"));
    }

    #[test]
    fn an_account_scope_value_that_cannot_be_a_header_is_named() {
        let src = source().with_env("K1", "sk-one");
        expect_error(
            &with_keys("keys: [ { name: a, env: K1, project: \"\" } ]"),
            &src,
            "upstreams.openai.keys[0]",
            "key \"a\": project must be a non-empty header value",
        );
    }

    #[test]
    fn an_unset_key_variable_is_named() {
        expect_error(
            &with_top(""),
            &MemorySource::new(),
            "upstreams.openai.keys[0].env",
            "environment variable KG_TEST_KEY is not set",
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_key_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStringExt;
        let src = source().with_env("BIN", std::ffi::OsString::from_vec(vec![0x80]));
        expect_error(
            &with_keys("keys: [ { name: a, env: BIN } ]"),
            &src,
            "upstreams.openai.keys[0].env",
            "environment variable BIN is not valid UTF-8",
        );
    }

    #[test]
    fn key_file_mistakes_are_named() {
        let file = "/etc/keygate/openai.keys";
        let cases = [
            (
                0o644,
                "sk-1\n",
                format!("{file} is readable by group/others (mode 0644); run chmod 600 on it"),
            ),
            (
                0o640,
                "sk-1\n",
                format!("{file} is readable by group/others (mode 0640); run chmod 600 on it"),
            ),
            (
                0o604,
                "sk-1\n",
                format!("{file} is readable by group/others (mode 0604); run chmod 600 on it"),
            ),
            (
                0o600,
                "sk-1 oops\n",
                "line 1: expected name=, weight= or account= after the key".into(),
            ),
            (
                0o600,
                "# pool\nsk-1 weight=-1\n",
                "line 2: weight must be a positive integer".into(),
            ),
            (
                0o600,
                "sk-1 colour=red\n",
                "line 1: unknown option (use name=, weight=, account=, organization=, project=)"
                    .into(),
            ),
            (
                0o600,
                "sk-1 name=a\nsk-2 name=a\n",
                "key name \"a\" is used twice".into(),
            ),
            (
                0o600,
                "sk-1 name=a\nsk-1 name=b\n",
                "key \"b\" is the same secret as another key".into(),
            ),
            (
                0o600,
                "sk-\u{7f} name=a\n",
                "key \"a\" has characters that cannot be sent in a header".into(),
            ),
        ];
        let yaml = with_keys("keys_file: openai.keys");
        for (mode, text, reason) in cases {
            let src = source().with_file(file, text, mode);
            expect_error(&yaml, &src, "upstreams.openai.keys_file", &reason);
        }
        expect_error(
            &yaml,
            &source(),
            "upstreams.openai.keys_file",
            &format!("cannot read {file}: {}", no_such_file()),
        );
        expect_error(
            &yaml,
            &source().with_denied(file),
            "upstreams.openai.keys_file",
            &format!("cannot read {file}: {}", permission_denied()),
        );
        let empty = source().with_file(file, "# no keys yet\n", 0o600);
        expect_error(
            &yaml,
            &empty,
            "upstreams.openai.keys",
            "no keys: give `keys` (from env vars) or `keys_file`, or set `auth: none`",
        );
    }

    #[test]
    fn a_secret_in_the_file_is_never_echoed() {
        let src = source().with_file(
            "/k",
            "sk-supersecret-1 weight=zero\nsk-supersecret-1\n",
            0o600,
        );
        let err = error_of(&with_keys("keys_file: /k"), &src);
        assert!(!err.to_string().contains("supersecret"), "{err}");
        let src = source().with_file(
            "/k",
            "sk-supersecret-1 name=a\nsk-supersecret-1 name=b\n",
            0o600,
        );
        let err = error_of(&with_keys("keys_file: /k"), &src);
        assert!(!err.to_string().contains("supersecret"), "{err}");
    }

    #[test]
    fn env_keys_and_file_keys_are_one_pool() {
        let src = source().with_env("K1", "sk-one").with_file(
            "/k",
            "sk-two name=b weight=3 account=org\nsk-three\n",
            0o400,
        );
        let yaml = with_keys("keys: [ { name: a, env: K1 } ]\nkeys_file: /k");
        let keys = &load(&yaml, &src).unwrap().upstreams[0].keys;
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a", "b", key_id("sk-three").as_str()]);
        assert_eq!(
            (keys[1].weight, keys[1].account.as_deref()),
            (3, Some("org"))
        );
        // A file key that repeats an env key's name or secret is named by the file.
        let dup = source()
            .with_env("K1", "sk-one")
            .with_file("/k", "sk-one name=z\n", 0o600);
        expect_error(
            &yaml,
            &dup,
            "upstreams.openai.keys_file",
            "key \"z\" is the same secret as another key",
        );
        let auth_none = with_keys("auth: none");
        assert!(load(&auth_none, &source()).unwrap().upstreams[0]
            .keys
            .is_empty());
    }
}
