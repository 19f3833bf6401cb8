//! The command line: Pingora's flags (`-c FILE`, `-t`, `-u`, `-d`) with keygate's config handling,
//! and `keygate admin …` (the admin API's client, [`crate::admin::cli`]).

use crate::config;
use pingora_core::server::configuration::Opt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Default config path when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "conf/keygate.yaml";

/// Entry point of the `keygate` binary.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "admin") {
        return ExitCode::from(crate::admin::cli::main(&args[1..]));
    }
    init_logging();
    let opt = Opt::parse_args();
    let path = PathBuf::from(
        opt.conf
            .clone()
            .unwrap_or_else(|| DEFAULT_CONFIG.to_string()),
    );
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate: config error: {e}");
            return ExitCode::from(2);
        }
    };
    if opt.test {
        println!("keygate: {} is valid", path.display());
        return ExitCode::SUCCESS;
    }
    // Only a real start writes: `-t` above has touched nothing on disk.
    if let Err(e) = config::create_runtime_dirs(&config) {
        eprintln!("keygate: config error: {e}");
        return ExitCode::from(2);
    }
    // Pingora must not re-read the file as its own ServerConf: keygate passes `server:` itself.
    let mut opt = opt;
    opt.conf = None;
    match crate::server::run(opt, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: cannot start: {e}");
            ExitCode::from(1)
        }
    }
}

/// Sets up `env_logger` from `RUST_LOG` (default `info`) behind [`LogCap`], so that no
/// filter can turn on a dependency's DEBUG or TRACE output.
pub fn init_logging() {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let logger = LogCap::new(&spec, env_logger::Target::Stderr);
    let max = logger.max_level();
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

/// `env_logger` with DEBUG and TRACE kept to keygate's own modules.
///
/// Pingora's TRACE dumps the request as written to the upstream, credential included; its DEBUG
/// prints upstream response bodies, which may echo the key; other libraries trace raw bytes too.
/// Rewriting `RUST_LOG` cannot be trusted to catch every spelling (module paths, `pingora=`, a
/// bare `TRACE`, `/regex` suffixes), so the cap applies to each record instead: whatever the
/// directives say, a DEBUG or TRACE record whose target is not keygate's is dropped. INFO and
/// above pass as the directives allow.
pub struct LogCap {
    inner: env_logger::Logger,
}

impl LogCap {
    /// A logger filtered by the `RUST_LOG`-style `spec`, writing to `target`.
    pub fn new(spec: &str, target: env_logger::Target) -> Self {
        let inner = env_logger::Builder::new()
            .parse_filters(spec)
            .format_timestamp_millis()
            .target(target)
            .build();
        Self { inner }
    }

    /// The most verbose level any record may pass at, for [`log::set_max_level`].
    pub fn max_level(&self) -> log::LevelFilter {
        self.inner.filter()
    }

    /// Whether a record at `level` from `target` may be written at all, before the directives.
    fn may_write(target: &str, level: log::Level) -> bool {
        level <= log::Level::Info || is_keygate_target(target)
    }
}

/// Whether `target` is keygate's own (`keygate` or `keygate::…`).
fn is_keygate_target(target: &str) -> bool {
    target
        .strip_prefix("keygate")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

impl log::Log for LogCap {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        Self::may_write(metadata.target(), metadata.level()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        // The `log!` macros call `log` without asking `enabled` first: the cap is applied here.
        if Self::may_write(record.target(), record.level()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use log::{Level, Log};
    use parking_lot::Mutex;
    use std::sync::Arc;

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capped(spec: &str) -> (LogCap, Captured) {
        let out = Captured::default();
        let logger = LogCap::new(spec, env_logger::Target::Pipe(Box::new(out.clone())));
        (logger, out)
    }

    fn write(logger: &LogCap, target: &str, level: Level, text: &str) {
        logger.log(
            &log::Record::builder()
                .target(target)
                .level(level)
                .args(format_args!("{text}"))
                .build(),
        );
        logger.flush();
    }

    fn enabled(logger: &LogCap, target: &str, level: Level) -> bool {
        logger.enabled(&log::Metadata::builder().target(target).level(level).build())
    }

    /// Every way of asking for Pingora's TRACE that `env_logger` understands.
    const TRACE_SPELLINGS: &[&str] = &[
        "trace",
        "TRACE",
        "Trace",
        "pingora_core=trace",
        "pingora_core=Trace",
        "pingora_core::protocols=trace",
        "pingora_core::protocols::http::v1=trace",
        "pingora_core::protocols::http::v1::client=TRACE",
        "pingora=trace",
        "pingora_proxy=trace",
        "info,pingora_core::protocols=trace",
        "pingora_core=debug,pingora_core::protocols=trace",
        "trace/Writing",
        "pingora_core=trace/request",
        "warn,trace",
        " pingora_core::protocols = trace ",
        "pingora_core::protocols=5",
        "pingora_core::protocols",
        "=trace",
    ];

    #[test]
    fn no_directive_lets_pingora_trace_through() {
        const TARGET: &str = "pingora_core::protocols::http::v1::client";
        for spec in TRACE_SPELLINGS {
            let (logger, out) = capped(spec);
            assert!(!enabled(&logger, TARGET, Level::Trace), "{spec:?}");
            write(
                &logger,
                TARGET,
                Level::Trace,
                "Writing request header: sk-secret",
            );
            write(&logger, "rustls::client", Level::Trace, "raw sk-secret");
            let text = String::from_utf8(out.0.lock().clone()).unwrap();
            assert!(!text.contains("sk-secret"), "{spec:?} wrote: {text}");
        }
    }

    #[test]
    fn no_directive_lets_a_library_debug_through() {
        const TARGET: &str = "pingora_proxy::proxy_h1";
        for spec in TRACE_SPELLINGS
            .iter()
            .chain(&["debug", "pingora_proxy=debug"])
        {
            let (logger, out) = capped(spec);
            assert!(!enabled(&logger, TARGET, Level::Debug), "{spec:?}");
            write(&logger, TARGET, Level::Debug, "upstream body sk-secret");
            let text = String::from_utf8(out.0.lock().clone()).unwrap();
            assert!(!text.contains("sk-secret"), "{spec:?} wrote: {text}");
        }
    }

    #[test]
    fn the_cap_leaves_library_info_and_keygates_own_trace_alone() {
        let (logger, out) = capped("pingora_core::protocols=trace,keygate=trace");
        assert!(enabled(
            &logger,
            "pingora_core::protocols::tls",
            Level::Info
        ));
        assert!(enabled(&logger, "keygate::prober", Level::Trace));
        assert!(!enabled(&logger, "keygatex", Level::Trace));
        write(
            &logger,
            "pingora_core::protocols::tls",
            Level::Info,
            "pingora info",
        );
        write(&logger, "keygate::prober", Level::Trace, "keygate trace");
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        assert!(text.contains("pingora info"), "{text}");
        assert!(text.contains("keygate trace"), "{text}");
    }

    #[test]
    fn directives_still_choose_the_levels_below_the_cap() {
        let (logger, _) = capped("warn");
        assert!(!enabled(&logger, "pingora_core::server", Level::Info));
        assert!(enabled(&logger, "pingora_core::server", Level::Warn));
        let (logger, _) = capped("info");
        assert!(!enabled(&logger, "pingora_proxy", Level::Debug));
        assert!(enabled(&logger, "keygate::server", Level::Info));
    }
}
