//! The starting inputs of each target: the committed files of `seeds/<target>/`, and for the
//! config loader the repository's own example configs.

use std::path::{Path, PathBuf};

/// The example configs the config target starts from (the Makefile's `FUZZ_CONFIG_SEEDS` names
/// the same files for `make fuzz`).
pub const CONFIG_EXAMPLES: [&str; 4] = [
    "conf/demo.yaml",
    "conf/openai.yaml",
    "deploy/docker/keygate.yaml",
    "deploy/systemd/keygate.yaml",
];

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed seed directory of `target`.
pub fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target)
}

/// Every seed of `target`, with where it came from; panics when one cannot be read (a missing
/// seed is a broken checkout, not something to skip).
pub fn load(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(seed_dir(target)) {
        Ok(dir) => dir.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => panic!("seeds of {target}: {e}"),
    };
    paths.sort();
    if target == "config" {
        paths.extend(CONFIG_EXAMPLES.iter().map(|p| repo_root().join(p)));
    }
    paths
        .into_iter()
        .map(|path| match std::fs::read(&path) {
            Ok(data) => (path, data),
            Err(e) => panic!("seed {}: {e}", path.display()),
        })
        .collect()
}
