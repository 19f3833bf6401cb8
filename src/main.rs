//! The `keygate` binary: see [`keygate::cli`].

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
