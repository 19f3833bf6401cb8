//! The floor Pingora itself sets: a pass-through `ProxyHttp` that only injects one key, no body
//! reading, routing, metrics or retries. `bench/load.py` measures it beside keygate so the cost
//! of keygate's own work is visible.
//!
//! Usage: `bare_passthrough LISTEN_ADDR UPSTREAM_ADDR KEY [KEY...]` (keys in strict rotation),
//! e.g. `bare_passthrough 127.0.0.1:19081 127.0.0.1:19000 sk-a sk-b`.

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Bare {
    upstream: SocketAddr,
    auth: Vec<String>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        _ctx: &mut (),
    ) -> pingora_error::Result<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.auth.len();
        req.insert_header("authorization", self.auth[i].as_str())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare_passthrough LISTEN_ADDR UPSTREAM_ADDR KEY [KEY...]");
        std::process::exit(2);
    };
    if args.len() < 4 {
        eprintln!("usage: bare_passthrough LISTEN_ADDR UPSTREAM_ADDR KEY [KEY...]");
        std::process::exit(2);
    }
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("bare_passthrough: not an address: {upstream}");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let bare = Bare {
        upstream,
        auth: args[3..].iter().map(|k| format!("Bearer {k}")).collect(),
        next: AtomicUsize::new(0),
    };
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, bare);
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
