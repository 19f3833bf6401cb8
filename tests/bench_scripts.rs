//! The benchmark scripts' reports (bench/*.py) are checked on synthetic results, so that a
//! mistake in them shows in `make test` rather than at the end of a quarter-hour `make bench`.

use std::process::Command;

#[test]
fn benchmark_reports_render_targets_and_sections_from_synthetic_results() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg("bench/selftest.py")
        .current_dir(root)
        .output()
        .expect("python3 runs (the Makefile's deps target installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "bench/selftest.py failed:\n{text}");
    assert!(text.contains("bench reports: ok"), "{text}");
}
