//! The `keygate-mock` command; everything but the logger lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    keygate_mock::cli_main(std::env::args().skip(1))
}
