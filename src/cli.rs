//! The command line: Pingora's flags (`-c FILE`, `-t`, `-u`, `-d`) with keygate's config handling.

use crate::config;
use pingora_core::server::configuration::Opt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Default config path when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "conf/keygate.yaml";

/// Entry point of the `keygate` binary.
pub fn main() -> ExitCode {
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

/// Sets up `env_logger` (default `info`), keeping Pingora's TRACE output off: it dumps raw
/// request bytes, keys included.
pub fn init_logging() {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    env_logger::Builder::new()
        .parse_filters(&spec)
        // Pingora's TRACE logs raw upstream request bytes; never let a filter turn it on.
        .filter_module("pingora_core", cap_level(&spec))
        .filter_module("pingora_proxy", cap_level(&spec))
        .format_timestamp_millis()
        .init();
}

/// The level for Pingora's crates: whatever `RUST_LOG` asks, but never above DEBUG.
fn cap_level(spec: &str) -> log::LevelFilter {
    let wanted = spec
        .split(',')
        .filter_map(|d| {
            let (module, level) = d.split_once('=').map_or(("", d), |(m, l)| (m, l));
            (module.is_empty() || module.starts_with("pingora"))
                .then(|| level.parse::<log::LevelFilter>().ok())?
        })
        .max()
        .unwrap_or(log::LevelFilter::Info);
    wanted.min(log::LevelFilter::Debug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_logging_never_reaches_trace() {
        assert_eq!(cap_level("trace"), log::LevelFilter::Debug);
        assert_eq!(
            cap_level("info,pingora_core=trace"),
            log::LevelFilter::Debug
        );
        assert_eq!(cap_level("warn"), log::LevelFilter::Warn);
    }
}
