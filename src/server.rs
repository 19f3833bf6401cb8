//! Turning a validated [`Config`] into a running Pingora server.

use crate::cache::ResponseCache;
use crate::clients::{Client, ClientTable, IpLimiters};
use crate::clock::{self, SharedClock};
use crate::config::Config;
use crate::drain::{Busy, Drain};
use crate::proxy::{Gateway, GatewayOptions, GatewayProxy};
use log::{info, warn};
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::Opt;
use pingora_core::server::Server;
use pingora_core::services::background::GenBackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A TLS listener's certificate or key could not be used.
    #[error("listen[{index}].tls: {reason}")]
    Tls {
        /// Listener index.
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// The access log could not be opened.
    #[error("access_log: {0}")]
    AccessLog(String),
    /// The runtime key store could not be read, or its keys not opened.
    #[error("admin.runtime_keys: {0}")]
    RuntimeKeys(String),
}

/// Keys added at run time: read from the local store now (a store that cannot be read or
/// opened stops the start), or kept in line with Redis by the shared service.
fn runtime_keys(
    cfg: &crate::config::RuntimeKeysConfig,
    gw: &Gateway,
    shared: Option<&Arc<crate::shared::Shared>>,
) -> Result<Arc<crate::key_store::RuntimeKeys>, StartError> {
    use crate::config::RuntimeKeyStore;
    use crate::key_store::{file::FileBackend, MasterKey, RuntimeKeys};
    let master = MasterKey::new(&cfg.master_key);
    match (&cfg.store, shared) {
        (RuntimeKeyStore::File(path), _) => {
            let backend = Arc::new(FileBackend::new(path.clone()));
            let stored = backend
                .read()
                .map_err(|e| StartError::RuntimeKeys(e.to_string()))?;
            let keys = Arc::new(RuntimeKeys::new(gw.shared_upstreams(), master, backend));
            let applied = keys.apply(&stored);
            if !applied.failed.is_empty() {
                return Err(StartError::RuntimeKeys(format!(
                    "{}: {}; is master_key_env the key they were stored with?",
                    path.display(),
                    applied.failed.join("; ")
                )));
            }
            info!(
                "runtime keys: {} loaded from {}",
                applied.added.len(),
                path.display()
            );
            Ok(keys)
        }
        (RuntimeKeyStore::Redis, Some(shared)) => {
            let keys = Arc::new(RuntimeKeys::new(
                gw.shared_upstreams(),
                master,
                shared.runtime_key_store(),
            ));
            shared.keep_runtime_keys(keys.clone());
            info!("runtime keys: kept in Redis, shared by every instance");
            Ok(keys)
        }
        (RuntimeKeyStore::Redis, None) => Err(StartError::RuntimeKeys(
            "the store is Redis but no redis: section is configured".into(),
        )),
    }
}

/// Who may get in and what they see: clients, per-IP limits, deny rules, the model list.
pub fn gateway_options(config: &Config, clock: SharedClock) -> GatewayOptions {
    let clients = match &config.clients {
        None => {
            warn!(
                "no `clients:` configured: this gateway is OPEN — anyone who can reach it uses your keys"
            );
            ClientTable::default()
        }
        Some(list) => ClientTable::new(
            list.iter()
                .map(|c| {
                    Client::new(
                        c.name.clone(),
                        c.token.expose(),
                        c.models.clone(),
                        c.limits,
                        clock.clone(),
                    )
                })
                .collect(),
        ),
    };
    let ip_limiters =
        (!config.ip_limits.is_empty()).then(|| IpLimiters::new(config.ip_limits, clock.clone()));
    let mut models: Vec<(String, String)> = Vec::new();
    for u in &config.upstreams {
        for m in &u.models {
            if !models.iter().any(|(x, _)| x == m) {
                models.push((m.clone(), u.name.clone()));
            }
        }
    }
    // Route aliases (`cheap` → gpt-4o-mini) are models too, as far as clients can tell.
    for r in &config.routes {
        if r.spec.rewrite_model.is_some() {
            for g in r.spec.models.iter().filter(|g| g.is_literal()) {
                if !models.iter().any(|(x, _)| x == g.as_str()) {
                    models.push((g.as_str().to_string(), "keygate".to_string()));
                }
            }
        }
    }
    GatewayOptions {
        access_log: None,
        stream_usage: config.stream_usage,
        clients,
        ip_limiters,
        trusted_proxies: config.trusted_proxies.clone(),
        deny_user_agents: config.guards.deny_user_agents.clone(),
        deny_cidrs: config.guards.deny_cidrs.clone(),
        models,
        cache: response_cache(config, clock),
    }
}

/// The response cache of the routes with `cache:`; `None` when no route caches (then no
/// request does any cache work).
fn response_cache(config: &Config, clock: SharedClock) -> Option<ResponseCache> {
    let policies: Vec<_> = config.routes.iter().map(|r| r.cache).collect();
    policies
        .iter()
        .any(Option::is_some)
        .then(|| ResponseCache::new(config.cache_memory, policies, clock))
}

/// The admin API over the gateway's upstreams, routes and clients.
fn admin_api(
    config: &Config,
    cfg: &crate::config::AdminConfig,
    gw: &Gateway,
    runtime: Option<Arc<crate::key_store::RuntimeKeys>>,
) -> crate::admin::app::AdminApp {
    use crate::admin::{views::RouteView, Admin, AdminUpstream};
    if cfg.token.is_none() {
        warn!(
            "admin.token_env is not set: anyone who can reach {} may use the admin API",
            cfg.addr
        );
    }
    let upstreams = gw
        .upstreams()
        .iter()
        .map(|u| AdminUpstream {
            name: u.name.clone(),
            api: match u.api {
                crate::config::Api::Openai => "openai",
                crate::config::Api::Anthropic => "anthropic",
            },
            keys: u.keys.clone(),
            activity: u.activity.clone(),
        })
        .collect();
    let routes = config
        .routes
        .iter()
        .map(|r| RouteView {
            name: r.spec.name.clone(),
            models: r
                .spec
                .models
                .iter()
                .map(|g| g.as_str().to_string())
                .collect(),
            path_prefix: r.spec.path_prefix.clone(),
            upstreams: r.spec.upstreams.clone(),
        })
        .collect();
    let admin = Admin::new(
        crate::admin::auth::AdminAuth::new(cfg.token, cfg.read_token),
        upstreams,
        routes,
        gw.client_limiters(),
        Arc::new(crate::admin::app::UpstreamProbes::new(
            gw.shared_upstreams(),
        )),
        clock::system(),
    );
    let admin = match runtime {
        Some(r) => admin.with_runtime_keys(r),
        None => admin,
    };
    crate::admin::app::AdminApp(Arc::new(admin))
}

/// Resolves every upstream once before listening, so the first requests have endpoints.
fn resolve_endpoints_now(gw: &Gateway) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!("cannot resolve upstreams before start: {e}");
            return;
        }
    };
    for up in gw.upstreams() {
        if let Err(e) = rt.block_on(up.endpoints.update()) {
            warn!("upstream {}: {e}; will retry in the background", up.name);
        }
    }
}

/// Per-connection read buffer: none. Pingora's default is 64 KiB, which every connection holds
/// even when idle; its HTTP/1 parser reads into buffers of its own, so without one the bytes go
/// from the socket straight there.
const L4_READ_BUFFER: usize = 0;

/// Pingora's grace period when `server.grace_period_seconds` is not set (`EXIT_TIMEOUT` in
/// pingora-core's `server` module).
const PINGORA_GRACE_PERIOD: u64 = 300;

/// How long a stopping process waits for its access log lines to be written.
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(5);

/// Runs keygate until it is told to stop. `opt` carries Pingora's `-u`/`-d` flags.
pub fn run(opt: Opt, config: Config) -> Result<(), StartError> {
    let listen: Vec<_> = config
        .listen
        .iter()
        .map(|l| (l.addr, l.tls.clone()))
        .collect();
    let config_metrics_addr = config.metrics_addr;
    let guard_settings = crate::conn_guard::GuardSettings::from(&config.guards);
    let access_log = match &config.access_log {
        None => None,
        Some(path) => Some(
            crate::access_log::AccessLog::open(path.as_deref())
                .map_err(|e| StartError::AccessLog(e.to_string()))?,
        ),
    };
    let access_log_flusher = access_log
        .as_ref()
        .map(crate::access_log::AccessLog::flusher);
    let mut options = gateway_options(&config, clock::system());
    options.access_log = access_log;
    let built = Gateway::build(&config, clock::system(), options);
    let (gw, services) = (built.gateway, built.endpoint_services);
    let prober = crate::prober::Prober::new(gw.shared_upstreams(), built.suspects);
    let pools: Vec<_> = gw.upstreams().iter().map(|u| u.keys.clone()).collect();
    let client_limiters = gw.client_limiters();
    let shared = config.redis.as_ref().map(|cfg| {
        let clients: Vec<_> = config
            .clients
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), c.limits))
            .collect();
        let shared = crate::shared::Shared::new(
            cfg,
            pools.clone(),
            &clients,
            clock::system(),
            crate::metrics::global(),
        );
        gw.share_limits(shared.limits().clone());
        gw.resources().share(shared.objects());
        if config.cache_redis {
            if let Some(cache) = gw.options.cache.as_ref() {
                cache.share(shared.answers());
            }
        }
        shared
    });
    // Before the state file: the states it keeps for runtime keys need the keys there.
    let runtime = match config.admin.as_ref().and_then(|a| a.runtime_keys.as_ref()) {
        None => None,
        Some(cfg) => Some(runtime_keys(cfg, &gw, shared.as_ref())?),
    };
    if let Some(path) = &config.state_file {
        crate::state_file::load(path, &pools, &client_limiters, gw.resources());
    }
    let state_keeper = config.state_file.clone().map(|path| {
        Arc::new(crate::state_file::StateKeeper::new(
            path,
            pools.clone(),
            client_limiters,
            gw.resources().clone(),
        ))
    });
    if let Err(e) = pingora_prometheus::prometheus::default_registry().register(Box::new(
        crate::metrics::KeyStateCollector::new(pools.clone()),
    )) {
        warn!("cannot register the key state gauge: {e}");
    }
    // Touch the metrics so every family is registered before the first scrape.
    let _ = crate::metrics::global();
    resolve_endpoints_now(&gw);

    let admin_app = config
        .admin
        .as_ref()
        .map(|cfg| (cfg.addr, admin_api(&config, cfg, &gw, runtime)));
    let mut server = Server::new_with_opt_and_conf(opt, config.server);
    // As a service (not `bootstrap()`): with `-d` and `daemon_wait_for_ready`, the parent is told
    // "ready" only once it has run, and `-u` takes the sockets over inside the daemon.
    let bootstrap = server.bootstrap_as_a_service();

    let mut app = pingora_proxy::http_proxy(&server.configuration, GatewayProxy(gw.clone()));
    let mut options = HttpServerOptions::default();
    // Plain listeners also speak HTTP/2 with prior knowledge; h1 clients are detected by preface.
    options.h2c = true;
    app.server_options = Some(options);
    // Every connection goes through the header timeout/size guards before Pingora's parser.
    let guarded = crate::conn_guard::GuardedApp::new(app, guard_settings);
    let open_connections = guarded.open_connections();
    let mut proxy = pingora_core::services::listening::Service::new("keygate".to_string(), guarded);
    for (index, (addr, tls)) in listen.iter().enumerate() {
        let addr = addr.to_string();
        let endpoint = ListenerConfig::tcp(addr.clone()).l4_buffer(L4BufferSettings::new(
            L4_READ_BUFFER,
            pingora_core::protocols::l4::stream::DEFAULT_L4_WRITE_BUFFER_SIZE,
        ));
        match tls {
            None => proxy.add_listener(endpoint),
            Some((cert, key)) => {
                let (Some(cert), Some(key)) = (cert.to_str(), key.to_str()) else {
                    return Err(StartError::Tls {
                        index,
                        reason: "certificate and key paths must be UTF-8".into(),
                    });
                };
                let mut settings =
                    TlsSettings::intermediate(cert, key).map_err(|e| StartError::Tls {
                        index,
                        reason: e.to_string(),
                    })?;
                settings.enable_h2();
                proxy.add_listener(endpoint.tls(settings));
            }
        }
        info!(
            "listening on {addr}{}",
            if tls.is_some() { " (TLS)" } else { "" }
        );
    }
    server.add_service(proxy).add_dependency(&bootstrap);
    if let Some(addr) = config_metrics_addr {
        let app = crate::metrics::MetricsApp::new(listen.iter().map(|(a, _)| *a).collect());
        let mut service = pingora_core::services::listening::Service::new(
            "keygate metrics".to_string(),
            pingora_core::apps::http_app::HttpServer::new_app(app),
        );
        service.add_tcp(&addr.to_string());
        server.add_service(service).add_dependency(&bootstrap);
        info!("metrics on http://{addr}/metrics");
    }
    if let Some((addr, admin)) = admin_app {
        let mut service = pingora_core::services::listening::Service::new(
            "keygate admin".to_string(),
            pingora_core::apps::http_app::HttpServer::new_app(admin),
        );
        service.add_tcp(&addr.to_string());
        server.add_service(service).add_dependency(&bootstrap);
        info!("admin API on http://{addr}/admin/v1/status");
    }
    for s in services {
        server.add_service(s);
    }
    server.add_service(pingora_core::services::background::background_service(
        "key prober",
        prober,
    ));
    if let Some(shared) = shared {
        server.add_service(pingora_core::services::background::background_service(
            "shared state",
            crate::shared::service::SharedService(shared),
        ));
    }
    server.add_service(pingora_core::services::background::background_service(
        "memory upkeep",
        crate::memory_upkeep::MemoryUpkeep,
    ));
    let grace = Duration::from_secs(
        server
            .configuration
            .grace_period_seconds
            .unwrap_or(PINGORA_GRACE_PERIOD),
    );
    let mut drain = Drain::new(grace, move || Busy {
        requests: crate::metrics::global().in_flight.get(),
        connections: open_connections.count(),
    });
    if let Some(keeper) = state_keeper {
        server.add_service(GenBackgroundService::new(
            "state file".to_string(),
            keeper.clone(),
        ));
        drain = drain.finally("writing the state file", move || keeper.write_final());
    }
    if let Some(flusher) = access_log_flusher {
        drain = drain.finally("flushing the access log", move || {
            if !flusher.flush(ACCESS_LOG_FLUSH) {
                warn!("access log: not flushed within {ACCESS_LOG_FLUSH:?}");
            }
        });
    }
    server.add_service(pingora_core::services::background::background_service(
        "graceful stop",
        drain,
    ));
    info!(
        "keygate ready: {} upstream(s), {} key(s)",
        gw.upstreams().len(),
        gw.upstreams().iter().map(|u| u.keys.len()).sum::<usize>()
    );
    server.run_forever()
}
