//! The listener and accept loop: one task per connection, HTTP/1.1 or h2 (prior knowledge or
//! ALPN) chosen per connection by hyper-util's auto builder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;

use crate::service::{self, App};

/// Binds `addr` with a deep accept backlog (load tests open many connections at once).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, app: Arc<App>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                log::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        app.stats.connection();
        let _ = stream.set_nodelay(true);
        let (app, builder, tls) = (Arc::clone(&app), Arc::clone(&builder), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| service::handle(Arc::clone(&app), req));
            let result = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => {
                        builder
                            .serve_connection(TokioIo::new(tls_stream), service)
                            .await
                    }
                    Err(e) => {
                        log::debug!("TLS handshake: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                // Broken connections are expected: clients hang up, break_stream breaks on purpose.
                log::debug!("connection: {e}");
            }
        });
    }
}
