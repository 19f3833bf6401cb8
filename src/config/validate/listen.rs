//! `listen:`: the sockets clients connect to, and their TLS files.

use super::{Ctx, ListenerConfig};
use crate::config::types::{ListenFile, TlsFile};
use crate::config::ConfigError;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The listeners: at least one, each address once, TLS files present.
pub(super) fn listeners(cx: &Ctx, list: &[ListenFile]) -> Result<Vec<ListenerConfig>, ConfigError> {
    if list.is_empty() {
        return Err(cx.err(
            "listen",
            "at least one listener is needed, e.g. `- addr: 0.0.0.0:8080`",
        ));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, l) in list.iter().enumerate() {
        let field = format!("listen[{i}].addr");
        let addr: SocketAddr = l
            .addr
            .parse()
            .map_err(|_| cx.err(&field, format!("not an IP:PORT address: {:?}", l.addr)))?;
        if !seen.insert(addr) {
            return Err(cx.err(&field, format!("{addr} is listed twice")));
        }
        let tls = match &l.tls {
            None => None,
            Some(t) => Some(tls_files(cx, i, t)?),
        };
        out.push(ListenerConfig { addr, tls });
    }
    Ok(out)
}

/// The certificate and key paths, each of which must be a file.
fn tls_files(cx: &Ctx, i: usize, t: &TlsFile) -> Result<(PathBuf, PathBuf), ConfigError> {
    for (name, p) in [("cert", &t.cert), ("key", &t.key)] {
        let p = cx.resolve(p);
        if !cx.source.is_file(&p) {
            return Err(cx.err(
                format!("listen[{i}].tls.{name}"),
                format!("no such file: {}", p.display()),
            ));
        }
    }
    Ok((cx.resolve(&t.cert), cx.resolve(&t.key)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use std::path::PathBuf;

    #[test]
    fn listener_mistakes_are_named() {
        let tls =
            "listen:\n  - { addr: 127.0.0.1:8443, tls: { cert: tls/cert.pem, key: /k/key.pem } }";
        let cases = [
            (
                with_top("listen: []"),
                "listen",
                "at least one listener is needed, e.g. `- addr: 0.0.0.0:8080`".to_string(),
            ),
            (
                with_top("listen:\n  - addr: localhost-8080"),
                "listen[0].addr",
                "not an IP:PORT address: \"localhost-8080\"".into(),
            ),
            (
                with_top("listen:\n  - addr: 127.0.0.1:80\n  - addr: 127.0.0.1:80"),
                "listen[1].addr",
                "127.0.0.1:80 is listed twice".into(),
            ),
            (
                with_top(tls),
                "listen[0].tls.cert",
                "no such file: /etc/keygate/tls/cert.pem".into(),
            ),
        ];
        for (yaml, field, reason) in cases {
            expect_error(&yaml, &source(), field, &reason);
        }
        let cert_only = source().with_file("/etc/keygate/tls/cert.pem", "PEM", 0o644);
        expect_error(
            &with_top(tls),
            &cert_only,
            "listen[0].tls.key",
            "no such file: /k/key.pem",
        );
        // A directory is not a certificate.
        let dir_key = cert_only.clone().with_dir("/k/key.pem", 0o700);
        expect_error(
            &with_top(tls),
            &dir_key,
            "listen[0].tls.key",
            "no such file: /k/key.pem",
        );
        let both = cert_only.with_file("/k/key.pem", "PEM", 0o600);
        let config = load(&with_top(tls), &both).unwrap();
        assert_eq!(
            config.listen[0].tls,
            Some((
                PathBuf::from("/etc/keygate/tls/cert.pem"),
                PathBuf::from("/k/key.pem")
            ))
        );
    }
}
