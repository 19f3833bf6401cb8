//! Meaning checks: turns a parsed [`ConfigFile`] into a [`Config`] or the first precise mistake.
//!
//! One file per section; [`validate_with`] calls them in the file's order (so the first mistake
//! reported is the same whatever the layout of the code) and checks references between sections.

mod admin;
mod affinity;
mod cache;
mod clients;
mod guards;
mod keys;
mod listen;
mod outputs;
mod redis;
mod routes;
mod server;
#[cfg(test)]
pub(crate) mod test_support;
mod upstream_policies;
mod upstream_url;
mod upstreams;

pub use super::validated::*;
pub use routes::{DEFAULT_RETRIES, DEFAULT_TTFB_TIMEOUT};
pub use server::DEFAULT_MAX_BODY_BYTES;

use super::source::{ConfigSource, SystemSource};
use super::types::ConfigFile;
use super::ConfigError;
use std::path::{Path, PathBuf};

/// What every section check needs: the file (for messages and relative paths) and the source.
struct Ctx<'a> {
    /// The config file.
    path: &'a Path,
    /// Its directory: relative paths in the file are relative to it.
    base_dir: PathBuf,
    /// Environment and files.
    source: &'a dyn ConfigSource,
}

impl<'a> Ctx<'a> {
    fn new(path: &'a Path, source: &'a dyn ConfigSource) -> Self {
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self {
            path,
            base_dir,
            source,
        }
    }

    /// An error about `field` of this file.
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, field, reason)
    }

    /// `p` as written, or under the config file's directory when relative.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// A scope whose errors name fields under `prefix` (`upstreams.openai`, `clients[0]`).
    fn at(&self, prefix: impl Into<String>) -> Scope<'_, 'a> {
        Scope {
            cx: self,
            prefix: prefix.into(),
        }
    }
}

/// A part of the file, for errors about its fields.
struct Scope<'c, 'a> {
    cx: &'c Ctx<'a>,
    prefix: String,
}

impl Scope<'_, '_> {
    /// The full dotted path of `field` in this scope.
    fn field(&self, field: &str) -> String {
        format!("{}.{field}", self.prefix)
    }

    /// An error about `field` in this scope.
    fn err(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        self.cx.err(self.field(field), reason)
    }
}

impl<'c, 'a> Scope<'c, 'a> {
    /// The scope of `field` inside this one (`routes[0].cache`).
    fn nested(&self, field: &str) -> Scope<'c, 'a> {
        self.cx.at(self.field(field))
    }
}

/// Checks everything the file says and loads the secrets it points to, from the real system.
pub fn validate(path: &Path, file: ConfigFile) -> Result<Config, ConfigError> {
    validate_with(path, file, &SystemSource)
}

/// Checks everything the file says, reading secrets and files from `source`. Writes nothing.
pub fn validate_with(
    path: &Path,
    file: ConfigFile,
    source: &dyn ConfigSource,
) -> Result<Config, ConfigError> {
    let cx = Ctx::new(path, source);
    let server = server::server_conf(&cx, file.server)?;
    let listen = listen::listeners(&cx, &file.listen)?;
    let max_body_bytes = server::max_body_bytes(&cx, file.max_body_bytes)?;
    let max_buffered_bytes =
        server::max_buffered_bytes(&cx, file.max_buffered_bytes, max_body_bytes)?;
    let upstreams = upstreams::upstreams(&cx, &file.upstreams)?;
    let routes = routes::routes(&cx, &file.routes, &upstreams)?;
    let metrics_addr = match &file.metrics {
        None => None,
        Some(m) => {
            let addr = outputs::metrics_addr(&cx, m)?;
            if listen.iter().any(|l| l.addr == addr) {
                let reason = format!("{addr} is also a proxy listener");
                return Err(cx.err("metrics.addr", reason));
            }
            Some(addr)
        }
    };
    let access_log = outputs::access_log(&cx, file.access_log.as_ref())?;
    let state_file = file.state_file.as_deref().map(|p| cx.resolve(p));
    server::upgrade_sock_dir(&cx, &server.upgrade_sock)?;
    let clients = match &file.clients {
        None => None,
        Some(list) => Some(clients::clients(&cx, list)?),
    };
    let ip_limits = match &file.ip_limits {
        None => Default::default(),
        Some(_) if clients.is_some() => {
            let reason =
                "only applies to an open gateway (no `clients:`); use each client's `limits`";
            return Err(cx.err("ip_limits", reason));
        }
        Some(l) => clients::ip_limits(&cx.at("ip_limits"), l)?,
    };
    let trusted_proxies =
        clients::trusted_proxies(&cx, &file.trusted_proxies, file.client_ip_header.as_deref())?;
    let guards = guards::guards(&cx, file.guards.as_ref())?;
    let redis = match &file.redis {
        None => None,
        Some(r) => Some(redis::redis(&cx.at("redis"), r)?),
    };
    let (cache_memory, cache_redis) =
        cache::cache_store(&cx, file.cache_store.as_ref(), &routes, redis.is_some())?;
    let admin = match &file.admin {
        None => None,
        Some(a) => {
            let at = cx.at("admin");
            let mut admin = admin::admin(&at, a, &listen, metrics_addr)?;
            if let Some(r) = &a.runtime_keys {
                let beside = state_file.as_deref();
                let keys =
                    admin::runtime_keys(&at.nested("runtime_keys"), r, beside, redis.is_some())?;
                admin.runtime_keys = Some(keys);
            }
            Some(admin)
        }
    };
    Ok(Config {
        cache_memory,
        cache_redis,
        redis,
        path: path.to_path_buf(),
        server,
        listen,
        max_body_bytes,
        max_buffered_bytes,
        upstreams,
        routes,
        metrics_addr,
        admin,
        access_log,
        state_file,
        stream_usage: file.stream_usage.unwrap_or_default(),
        clients,
        ip_limits,
        trusted_proxies,
        guards,
    })
}
