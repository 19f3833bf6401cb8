//! `server:` (Pingora's own settings), the upgrade socket's directory, and `max_body_bytes`.

use super::Ctx;
use crate::config::sizes::ByteSize;
use crate::config::ConfigError;
use pingora_core::server::configuration::ServerConf;
use std::path::Path;

/// Default cap on request bodies: audio uploads reach 25 MB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 << 20;

/// Pingora's `ServerConf` from the `server:` section, checked by Pingora itself.
pub(super) fn server_conf(
    cx: &Ctx,
    section: Option<serde_yaml::Value>,
) -> Result<ServerConf, ConfigError> {
    let Some(v) = section else {
        return Ok(ServerConf::default());
    };
    let conf: ServerConf =
        serde_yaml::from_value(v).map_err(|e| cx.err("server", e.to_string()))?;
    conf.validate().map_err(|e| cx.err("server", e.to_string()))
}

/// The largest request body, in bytes.
/// `max_buffered_bytes`: when given, at least one body of `max_body_bytes`.
pub(super) fn max_buffered_bytes(
    cx: &Ctx,
    size: Option<ByteSize>,
    max_body_bytes: usize,
) -> Result<Option<usize>, ConfigError> {
    let Some(size) = size else { return Ok(None) };
    let bytes = usize::try_from(size.0).unwrap_or(usize::MAX);
    if bytes < max_body_bytes {
        let reason = format!(
            "must be at least max_body_bytes ({max_body_bytes} bytes), or no body that large could ever be read"
        );
        return Err(cx.err("max_buffered_bytes", reason));
    }
    Ok(Some(bytes))
}

pub(super) fn max_body_bytes(cx: &Ctx, size: Option<ByteSize>) -> Result<usize, ConfigError> {
    let bytes = size.map_or(DEFAULT_MAX_BODY_BYTES, |b| b.0);
    if bytes == 0 {
        return Err(cx.err("max_body_bytes", "must be greater than zero"));
    }
    usize::try_from(bytes).map_err(|_| cx.err("max_body_bytes", "too large"))
}

/// The upgrade socket is created mode 0666 by Pingora: its directory must keep others out.
///
/// A missing directory is fine here: start-up creates it with mode 0700
/// ([`create_runtime_dirs`](crate::config::create_runtime_dirs)).
pub(super) fn upgrade_sock_dir(cx: &Ctx, sock: &str) -> Result<(), ConfigError> {
    let err = |reason: String| cx.err("server.upgrade_sock", reason);
    let Some(dir) = Path::new(sock)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    else {
        return Ok(());
    };
    let meta = match cx.source.metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(format!("cannot read {}: {e}", dir.display()))),
    };
    // The shared /tmp default is tolerated for a first try, with a warning at start.
    if dir == Path::new("/tmp") {
        return Ok(());
    }
    match meta.mode {
        Some(mode) if mode & 0o077 != 0 => Err(err(format!(
            "directory {} is open to group/others (mode {mode:04o}); the upgrade socket needs a 0700 directory",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::*;
    use crate::config::MemorySource;

    #[test]
    fn server_and_body_size_mistakes_are_named() {
        expect_error(
            &with_top("max_body_bytes: 0"),
            &source(),
            "max_body_bytes",
            "must be greater than zero",
        );
        // Pingora words these two; keygate names the section.
        let cases = [
            (
                "server: { threads: many }",
                "invalid type: string \"many\", expected usize",
            ),
            (
                "server: { max_blocking_threads: 0 }",
                "max_blocking_threads must be greater than zero",
            ),
        ];
        for (top, part) in cases {
            expect_error_containing(&with_top(top), &source(), "server", part);
        }
    }

    #[test]
    fn a_body_buffer_smaller_than_one_body_is_refused() {
        expect_error(
            &with_top("max_body_bytes: 2MiB\nmax_buffered_bytes: 1MiB"),
            &source(),
            "max_buffered_bytes",
            "must be at least max_body_bytes (2097152 bytes), or no body that large could ever be read",
        );
        let config = load(&with_top("max_buffered_bytes: 64MiB"), &source()).unwrap();
        assert_eq!(config.max_buffered_bytes, Some(64 << 20));
        assert_eq!(
            load(&with_top(""), &source()).unwrap().max_buffered_bytes,
            None
        );
    }

    #[test]
    fn an_upgrade_socket_directory_open_to_others_is_refused() {
        let yaml = with_top("server: { upgrade_sock: /run/kg/upgrade.sock }");
        for mode in [0o750, 0o705, 0o777] {
            expect_error(
                &yaml,
                &source().with_dir("/run/kg", mode),
                "server.upgrade_sock",
                &format!("directory /run/kg is open to group/others (mode {mode:04o}); the upgrade socket needs a 0700 directory"),
            );
        }
        load(&yaml, &source().with_dir("/run/kg", 0o700)).unwrap();
    }

    #[test]
    fn an_upgrade_socket_directory_that_cannot_be_looked_at_is_named() {
        let yaml = with_top("server: { upgrade_sock: /run/kg/upgrade.sock }");
        expect_error(
            &yaml,
            &source().with_denied("/run/kg"),
            "server.upgrade_sock",
            &format!("cannot read /run/kg: {}", permission_denied()),
        );
    }

    #[test]
    fn a_missing_upgrade_socket_directory_is_left_for_start_up() {
        let yaml = with_top("server: { upgrade_sock: /run/kg/new/upgrade.sock }");
        let config = load(&yaml, &source()).unwrap();
        assert_eq!(config.server.upgrade_sock, "/run/kg/new/upgrade.sock");
    }

    #[test]
    fn the_shared_tmp_default_is_tolerated() {
        let src: MemorySource = source().with_dir("/tmp", 0o1777);
        let config = load(&with_top(""), &src).unwrap();
        assert!(config.server.upgrade_sock.starts_with("/tmp/"));
    }
}
