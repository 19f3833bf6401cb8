//! Where the loader's inputs come from: environment variables and files, behind one trait.
//!
//! The loader reads nothing on its own; everything (the YAML, key and token files with their
//! modes, CA files, TLS file checks, directories) goes through a [`ConfigSource`]. The binary
//! uses [`SystemSource`]; tests use [`MemorySource`] and need no process, no environment
//! variables and no temporary files.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// What kind of thing a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// Anything else (socket, device, fifo).
    Other,
}

/// What the loader needs to know about a path, symbolic links followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// File, directory or other.
    pub kind: FileKind,
    /// Permission bits (`0o777` mask); `None` where the platform has no Unix modes.
    pub mode: Option<u32>,
}

/// The environment and filesystem as the config loader sees them.
pub trait ConfigSource {
    /// The value of environment variable `name`, or `None` when it is not set.
    fn env(&self, name: &str) -> Option<OsString>;

    /// The whole content of the file at `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;

    /// Kind and mode of `path`, following symbolic links.
    fn metadata(&self, path: &Path) -> io::Result<FileMeta>;

    /// The file at `path` as UTF-8 text; bad UTF-8 fails as in `std::fs::read_to_string`.
    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        String::from_utf8(self.read(path)?).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            )
        })
    }

    /// Whether `path` is a regular file (like [`Path::is_file`]).
    fn is_file(&self, path: &Path) -> bool {
        self.metadata(path).is_ok_and(|m| m.kind == FileKind::File)
    }

    /// Whether `path` is a directory (like [`Path::is_dir`]).
    fn is_dir(&self, path: &Path) -> bool {
        self.metadata(path).is_ok_and(|m| m.kind == FileKind::Dir)
    }
}

/// The real process environment and filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemSource;

impl ConfigSource for SystemSource {
    fn env(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        let meta = std::fs::metadata(path)?;
        let kind = if meta.is_file() {
            FileKind::File
        } else if meta.is_dir() {
            FileKind::Dir
        } else {
            FileKind::Other
        };
        Ok(FileMeta {
            kind,
            mode: unix_mode(&meta),
        })
    }
}

#[cfg(unix)]
fn unix_mode(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(meta.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn unix_mode(_meta: &std::fs::Metadata) -> Option<u32> {
    None
}

/// A file or directory held by a [`MemorySource`].
#[derive(Debug, Clone)]
enum Entry {
    File {
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    /// Neither its kind nor its content may be read (`EACCES`).
    Denied,
}

/// An in-memory environment and filesystem, for tests.
///
/// The parents of every file or directory added exist implicitly as mode `0755` directories,
/// unless added explicitly with another mode. Missing paths fail the way the OS says it
/// (`No such file or directory (os error 2)`), so messages read as they do for real files.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    env: HashMap<String, OsString>,
    entries: BTreeMap<PathBuf, Entry>,
}

impl MemorySource {
    /// An empty environment and an empty filesystem.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets environment variable `name`.
    pub fn with_env(mut self, name: &str, value: impl Into<OsString>) -> Self {
        self.env.insert(name.to_string(), value.into());
        self
    }

    /// Adds a file with `data` and permission bits `mode`.
    pub fn with_file(
        mut self,
        path: impl Into<PathBuf>,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        let entry = Entry::File {
            data: data.into(),
            mode,
        };
        self.entries.insert(path.into(), entry);
        self
    }

    /// Adds a directory with permission bits `mode`.
    pub fn with_dir(mut self, path: impl Into<PathBuf>, mode: u32) -> Self {
        self.entries.insert(path.into(), Entry::Dir { mode });
        self
    }

    /// Adds a path that this process may not look at (as under a directory it cannot search).
    pub fn with_denied(mut self, path: impl Into<PathBuf>) -> Self {
        self.entries.insert(path.into(), Entry::Denied);
        self
    }

    /// Whether some entry lies below `path`, which then exists as an implicit directory.
    fn has_children(&self, path: &Path) -> bool {
        self.entries
            .keys()
            .any(|p| p != path && p.starts_with(path))
    }
}

fn not_found() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn denied() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

impl ConfigSource for MemorySource {
    fn env(&self, name: &str) -> Option<OsString> {
        self.env.get(name).cloned()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        match self.entries.get(path) {
            Some(Entry::File { data, .. }) => Ok(data.clone()),
            Some(Entry::Dir { .. }) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            Some(Entry::Denied) => Err(denied()),
            None if self.has_children(path) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            None => Err(not_found()),
        }
    }

    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        let (kind, mode) = match self.entries.get(path) {
            Some(Entry::File { mode, .. }) => (FileKind::File, *mode),
            Some(Entry::Dir { mode }) => (FileKind::Dir, *mode),
            Some(Entry::Denied) => return Err(denied()),
            None if self.has_children(path) => (FileKind::Dir, 0o755),
            None => return Err(not_found()),
        };
        Ok(FileMeta {
            kind,
            mode: Some(mode & 0o777),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn memory_source_serves_env_files_and_implicit_parent_dirs() {
        let src = MemorySource::new()
            .with_env("K", "v")
            .with_file("/etc/kg/keys", "sk-1\n", 0o600);
        assert_eq!(src.env("K"), Some(OsString::from("v")));
        assert_eq!(src.env("MISSING"), None);
        assert_eq!(src.read(Path::new("/etc/kg/keys")).unwrap(), b"sk-1\n");
        let meta = src.metadata(Path::new("/etc/kg/keys")).unwrap();
        assert_eq!((meta.kind, meta.mode), (FileKind::File, Some(0o600)));
        assert!(src.is_dir(Path::new("/etc/kg")));
        assert!(src.is_dir(Path::new("/")));
        assert!(!src.is_file(Path::new("/etc/kg")));
    }

    #[test]
    fn memory_source_missing_paths_fail_like_the_os() {
        let src = MemorySource::new().with_dir("/run/kg", 0o700);
        let err = src.read(Path::new("/nope")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            io::Error::from_raw_os_error(libc::ENOENT).to_string()
        );
        assert!(src.metadata(Path::new("/run/kg/x")).is_err());
        assert_eq!(
            src.metadata(Path::new("/run/kg")).unwrap().mode,
            Some(0o700)
        );
        assert!(src.read(Path::new("/run/kg")).is_err());
        let src = src.with_denied("/run/kg/secret");
        let err = src.metadata(Path::new("/run/kg/secret")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(src.read(Path::new("/run/kg/secret")).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn system_source_reads_real_files_and_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = SystemSource.metadata(&path).unwrap();
        assert_eq!((meta.kind, meta.mode), (FileKind::File, Some(0o640)));
        assert_eq!(SystemSource.read(&path).unwrap(), b"x");
        assert!(SystemSource.is_dir(dir.path()));
        assert!(SystemSource.metadata(&dir.path().join("missing")).is_err());
    }
}
