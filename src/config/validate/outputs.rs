//! `metrics:` and `access_log:`: where keygate reports what it does.

use super::Ctx;
use crate::config::types::{AccessLogFile, MetricsFile};
use crate::config::ConfigError;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The metrics side port's address (the clash with a listener is checked by the caller).
pub(super) fn metrics_addr(cx: &Ctx, m: &MetricsFile) -> Result<SocketAddr, ConfigError> {
    m.addr.parse().map_err(|_| {
        cx.err(
            "metrics.addr",
            format!("not an IP:PORT address: {:?}", m.addr),
        )
    })
}

/// The access log: `None` off, `Some(None)` stdout, `Some(Some(path))` a file in an existing
/// directory (the file itself is opened, and created, at start-up).
pub(super) fn access_log(
    cx: &Ctx,
    a: Option<&AccessLogFile>,
) -> Result<Option<Option<PathBuf>>, ConfigError> {
    let Some(a) = a else { return Ok(None) };
    if a.path == "stdout" || a.path == "-" {
        return Ok(Some(None));
    }
    let p = cx.resolve(Path::new(&a.path));
    let dir_ok = p
        .parent()
        .is_none_or(|d| d.as_os_str().is_empty() || cx.source.is_dir(d));
    if !dir_ok {
        return Err(cx.err(
            "access_log.path",
            format!("no such directory for {}", p.display()),
        ));
    }
    Ok(Some(Some(p)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use std::path::PathBuf;

    #[test]
    fn metrics_and_access_log_mistakes_are_named() {
        let cases = [
            (
                "metrics: { addr: \"localhost:9091\" }",
                "metrics.addr",
                "not an IP:PORT address: \"localhost:9091\"",
            ),
            (
                "metrics: { addr: \"127.0.0.1:8080\" }",
                "metrics.addr",
                "127.0.0.1:8080 is also a proxy listener",
            ),
            (
                "access_log: { path: /var/log/keygate/access.log }",
                "access_log.path",
                "no such directory for /var/log/keygate/access.log",
            ),
            (
                "access_log: { path: logs/access.log }",
                "access_log.path",
                "no such directory for /etc/keygate/logs/access.log",
            ),
        ];
        for (top, field, reason) in cases {
            expect_error(&with_top(top), &source(), field, reason);
        }
        // A file where the directory should be is no directory either.
        let file_as_dir = source().with_file("/var/log/keygate", "", 0o644);
        expect_error(
            &with_top("access_log: { path: /var/log/keygate/access.log }"),
            &file_as_dir,
            "access_log.path",
            "no such directory for /var/log/keygate/access.log",
        );
    }

    #[test]
    fn access_log_goes_to_stdout_or_a_file_in_an_existing_directory() {
        let src = source().with_dir("/var/log/keygate", 0o750);
        for (path, expected) in [
            ("stdout", Some(None)),
            ("\"-\"", Some(None)),
            (
                "/var/log/keygate/access.log",
                Some(Some(PathBuf::from("/var/log/keygate/access.log"))),
            ),
        ] {
            let yaml = with_top(&format!("access_log: {{ path: {path} }}"));
            assert_eq!(load(&yaml, &src).unwrap().access_log, expected);
        }
        let config = load(&with_top("metrics: { addr: \"127.0.0.1:9091\" }"), &src).unwrap();
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9091".parse().unwrap()));
    }
}
