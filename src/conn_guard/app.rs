//! [`GuardedApp`]: the guard's Pingora app. It wraps keygate's proxy app, puts each accepted
//! connection in a [`GuardedStream`], and runs HTTP/1 connections' keep-alive loop itself so that
//! `RequestHook` can tell the stream where each request starts and hand the session to the proxy
//! only once the request's first byte has arrived (the parent module says why).
//!
//! **This mirrors pingora-core 0.9.x internals: re-check it on every Pingora upgrade.**
//! `GuardedApp::process_new` and `GuardedApp::is_http1` copy `process_new` of the blanket
//! `impl<T: HttpServerApp> ServerApp for T` in pingora-core's `src/apps/mod.rs`
//! (`pingora-core-0.9.1` in cargo's registry): how it tells HTTP/1 from HTTP/2 or a custom
//! protocol (ALPN, `force_custom`, the h2c preface peek), and its HTTP/1 keep-alive loop
//! (`set_keepalive(Some(60))` unless shutting down, `keepalive_request_limit`,
//! `ReusedHttpStream::consume`, `HttpPersistentSettings::apply_to_session`). `RequestHook` also
//! takes an HTTP/1 `ServerSession` apart and rebuilds it around its stream (keep-alive, reuses
//! left, connection user context), so whatever else a newer Pingora keeps in a session must be
//! carried over too. The minor version is pinned in Cargo.toml for this reason.

use super::stream::GuardedStream;
use super::{GuardSettings, H2_PREFACE};
use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A Pingora HTTP app (keygate's proxy) behind the connection guard: a `ServerApp` to put in a
/// `pingora_core::services::listening::Service` in place of the bare app.
pub struct GuardedApp<A> {
    hook: Arc<RequestHook<A>>,
    settings: GuardSettings,
    open: OpenConnections,
}

/// How many client connections a [`GuardedApp`] is serving: a graceful stop waits for none.
#[derive(Debug, Clone, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    /// Connections being served now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Counts one connection until the returned guard is dropped.
    fn enter(&self) -> OpenConnection {
        self.0.fetch_add(1, Ordering::AcqRel);
        OpenConnection(self.0.clone())
    }
}

/// One counted connection.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<A: HttpServerApp> GuardedApp<A> {
    /// Wraps `app`, keeping its `server_options` (h2c, keep-alive limits) and setting
    /// `h2_idle_timeout` to `settings.idle_timeout` unless the app already sets one.
    pub fn new(app: A, settings: GuardSettings) -> Self {
        let mut options = app.server_options().cloned().unwrap_or_default();
        if options.h2_idle_timeout.is_none() {
            options.h2_idle_timeout = Some(settings.idle_timeout);
        }
        Self {
            hook: Arc::new(RequestHook {
                app: Arc::new(app),
                options,
                shutting_down: AtomicBool::new(false),
                shutdown: tokio::sync::Notify::new(),
            }),
            settings,
            open: OpenConnections::default(),
        }
    }

    /// A handle on the count of connections this app serves.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }

    /// The limits each connection is held to.
    pub fn settings(&self) -> &GuardSettings {
        &self.settings
    }

    /// The options Pingora's connection handling sees (the app's, plus the HTTP/2 idle timeout).
    pub fn server_options(&self) -> &HttpServerOptions {
        &self.hook.options
    }

    /// The wrapped app.
    pub fn app(&self) -> &A {
        &self.hook.app
    }
}

#[async_trait]
impl<A> ServerApp for GuardedApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Counted until its last request is answered (or the connection fails).
        let _open = self.open.enter();
        // A stream handed back for reuse is already guarded; wrapping it twice would restart
        // its timers and hide it from the request hook.
        let mut stream: Stream = if (*stream).as_any().is::<GuardedStream>() {
            stream
        } else {
            Box::new(GuardedStream::new(stream, self.settings))
        };
        if !self.is_http1(&mut stream).await? {
            // HTTP/2 (or a custom protocol): Pingora's generic connection handling, on the hook.
            return ServerApp::process_new(&self.hook, stream, shutdown).await;
        }
        // Pingora's HTTP/1 keep-alive loop (pingora-core 0.9 `apps`), run here so that an idle
        // connection holds this small future rather than the generic one, which also has room
        // for an HTTP/2 connection (3.5 KiB per connection).
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        session.set_keepalive_reuses_remaining(self.hook.options.keepalive_request_limit);
        let mut result = self.hook.process_new_http(session, shutdown).await;
        while let Some((stream, persistent)) = result.map(ReusedHttpStream::consume) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(persistent) = persistent {
                persistent.apply_to_session(&mut session);
            }
            result = self.hook.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.hook.cleanup().await
    }
}

impl<A: HttpServerApp> GuardedApp<A> {
    /// Whether the connection speaks HTTP/1, decided as Pingora decides it: by ALPN on TLS, by
    /// the HTTP/2 preface on plain connections when h2c is on. `None`: it closed first.
    async fn is_http1(&self, stream: &mut Stream) -> Option<bool> {
        let options = &self.hook.options;
        if options.force_custom || matches!(stream.selected_alpn_proto(), Some(ALPN::Custom(_))) {
            return Some(false);
        }
        if stream.get_ssl_digest().is_some() {
            return Some(!matches!(stream.selected_alpn_proto(), Some(ALPN::H2)));
        }
        if !options.h2c {
            return Some(true);
        }
        let mut buf = [0u8; H2_PREFACE.len()];
        // The guard keeps the peeked bytes for the reads that follow.
        let peeked = stream.try_peek(&mut buf).await.ok()?;
        Some(!(peeked && buf[..] == *H2_PREFACE))
    }
}

/// Delegates to the app, first telling the connection's guard that an HTTP/1 request starts.
///
/// It also waits for the request's first byte before calling the app: Pingora's proxy builds a
/// ~16 KB future per request as soon as it is called, and would otherwise hold it for as long as
/// a keep-alive connection sits idle.
struct RequestHook<A> {
    app: Arc<A>,
    options: HttpServerOptions,
    /// Set by `http_cleanup`: idle keep-alive connections close instead of waiting.
    shutting_down: AtomicBool,
    shutdown: tokio::sync::Notify,
}

impl<A> RequestHook<A> {
    /// Waits until the connection has bytes to read. `false` when it closed, timed out idle
    /// (the guard's own timer) or the service is shutting down: the caller closes it then.
    async fn first_byte(&self, stream: &mut Stream) -> bool {
        let notified = self.shutdown.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so a shutdown in between is not missed.
        notified.as_mut().enable();
        let shutdown = async {
            if !self.shutting_down.load(Ordering::Acquire) {
                notified.await;
            }
        };
        let mut byte = [0u8; 1];
        // Bytes first, as Pingora's own wait does: a request the client has already sent is
        // served (its answer closes the connection) even when the shutdown has begun.
        tokio::select! {
            biased;
            peeked = stream.try_peek(&mut byte) => peeked.is_ok(),
            () = shutdown => false,
        }
    }
}

#[async_trait]
impl<A> HttpServerApp for RequestHook<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    // Written out rather than `async fn`: an async fn keeps its `session` argument (680 bytes)
    // in its future for as long as the connection waits for its next request. Here the session
    // is taken apart first and only its stream and settings wait.
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        mut session: ServerSession,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        // Only HTTP/1 sessions carry their connection's stream; HTTP/2 streams are left alone.
        let Some(guard) = session
            .stream()
            .and_then(|s| (**s).as_any().downcast_ref::<GuardedStream>())
        else {
            return self.app.process_new_http(session, shutdown);
        };
        guard.request_starts();
        // With pipelining on, bytes of the next request may already sit in the session.
        if session.pipelining_enabled() {
            return self.app.process_new_http(session, shutdown);
        }
        let keepalive = session.get_keepalive();
        let reuses = session.get_keepalive_reuses_remaining();
        let user_context = session.take_connection_user_context();
        let ServerSession::H1(h1) = session else {
            return self.app.process_new_http(session, shutdown);
        };
        let mut stream = h1.into_inner();
        Box::pin(async move {
            if !self.first_byte(&mut stream).await {
                return None;
            }
            // The same session Pingora made, rebuilt around the stream.
            let mut session = ServerSession::new_http1(stream);
            session.set_keepalive(keepalive);
            session.set_keepalive_reuses_remaining(reuses);
            session.set_connection_user_context(user_context);
            self.app.process_new_http(session, shutdown).await
        })
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    async fn http_cleanup(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.shutdown.notify_waiters();
        self.app.http_cleanup().await
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.app
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::conn_guard::stream::LINGER;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::{sleep, Instant};

    /// Records whether the guard had been told of the request when the app got the session.
    struct SeesGuard(std::sync::Mutex<Vec<bool>>);

    #[async_trait]
    impl HttpServerApp for SeesGuard {
        async fn process_new_http(
            self: &Arc<Self>,
            session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            let marked = session
                .stream()
                .and_then(|s| (**s).as_any().downcast_ref::<GuardedStream>())
                .is_some_and(|g| g.request_started.load(Ordering::Relaxed) || g.first_request_seen);
            self.0.lock().unwrap().push(marked);
            None
        }
    }

    fn hooked() -> (GuardedApp<SeesGuard>, Stream, DuplexStream) {
        let app = GuardedApp::new(
            SeesGuard(std::sync::Mutex::new(Vec::new())),
            GuardSettings::default(),
        );
        let (server, client) = tokio::io::duplex(1024);
        let stream: Stream = Box::new(GuardedStream::new(Box::new(server), app.settings));
        (app, stream, client)
    }

    #[tokio::test(start_paused = true)]
    async fn request_hook_calls_the_app_only_once_the_request_starts_arriving() {
        let (app, stream, mut client) = hooked();
        let hook = app.hook.clone();
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            hook.process_new_http(ServerSession::new_http1(stream), &shutdown)
                .await
                .is_none()
        });
        sleep(Duration::from_secs(5)).await;
        assert!(app.app().0.lock().unwrap().is_empty(), "no byte yet");
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(task.await.unwrap());
        assert_eq!(*app.app().0.lock().unwrap(), vec![true]);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_are_counted_until_they_close() {
        let app = Arc::new(GuardedApp::new(
            SeesGuard(std::sync::Mutex::new(Vec::new())),
            GuardSettings::default(),
        ));
        let open = app.open_connections();
        let (server, client) = tokio::io::duplex(1024);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let serving = app.clone();
        let task =
            tokio::spawn(async move { serving.process_new(Box::new(server), &shutdown).await });
        sleep(Duration::from_secs(1)).await;
        assert_eq!(open.count(), 1, "waiting for its first request");
        drop(client);
        assert!(task.await.unwrap().is_none());
        assert_eq!(open.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_a_connection_waiting_for_its_next_request() {
        let (app, stream, _client) = hooked();
        let hook = app.hook.clone();
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let waiting = tokio::spawn(async move {
            hook.process_new_http(ServerSession::new_http1(stream), &shutdown)
                .await
                .is_none()
        });
        sleep(Duration::from_secs(1)).await;
        app.hook.http_cleanup().await;
        assert!(waiting.await.unwrap());
        assert!(app.app().0.lock().unwrap().is_empty());
        // A connection that starts waiting after the shutdown closes at once, too.
        let (app2, stream2, _client2) = hooked();
        app2.hook.http_cleanup().await;
        let (_tx2, shutdown2) = tokio::sync::watch::channel(false);
        let closed = app2
            .hook
            .process_new_http(ServerSession::new_http1(stream2), &shutdown2)
            .await;
        assert!(closed.is_none());
        assert!(app2.app().0.lock().unwrap().is_empty());
        // But a request the client has already sent is still handed to the app, as Pingora's
        // own wait does (the shutdown then closes the connection after the answer).
        let (app3, stream3, mut client3) = hooked();
        app3.hook.http_cleanup().await;
        client3
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (_tx3, shutdown3) = tokio::sync::watch::channel(true);
        app3.hook
            .process_new_http(ServerSession::new_http1(stream3), &shutdown3)
            .await;
        assert_eq!(*app3.app().0.lock().unwrap(), vec![true]);
    }

    #[test]
    fn guarded_app_keeps_h2c_and_bounds_idle_h2_connections() {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        struct WithOptions(HttpServerOptions);
        #[async_trait]
        impl HttpServerApp for WithOptions {
            async fn process_new_http(
                self: &Arc<Self>,
                _session: ServerSession,
                _shutdown: &ShutdownWatch,
            ) -> Option<ReusedHttpStream> {
                None
            }
            fn server_options(&self) -> Option<&HttpServerOptions> {
                Some(&self.0)
            }
        }
        let app = GuardedApp::new(WithOptions(options), GuardSettings::default());
        assert!(app.server_options().h2c);
        assert_eq!(
            app.server_options().h2_idle_timeout,
            Some(Duration::from_secs(60))
        );
    }

    /// Reads one request header the way keygate's proxy does, through Pingora's HTTP/1 session.
    struct ReadsHeader {
        options: HttpServerOptions,
        read_errors: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl HttpServerApp for ReadsHeader {
        async fn process_new_http(
            self: &Arc<Self>,
            mut session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            if session.read_request().await.is_err() {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
            }
            None
        }
        fn server_options(&self) -> Option<&HttpServerOptions> {
            Some(&self.options)
        }
    }

    /// With h2c on, Pingora's preface peek meets the guard first; without (as on TLS), its
    /// `read_request` does.
    #[tokio::test(start_paused = true)]
    async fn slowloris_through_pingora_http1_handling_gets_408_with_and_without_h2c() {
        for h2c in [true, false] {
            let mut options = HttpServerOptions::default();
            options.h2c = h2c;
            let app = Arc::new(GuardedApp::new(
                ReadsHeader {
                    options,
                    read_errors: Default::default(),
                },
                GuardSettings::default(),
            ));
            let (server, client) = tokio::io::duplex(64 * 1024);
            let (mut rd, mut wr) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                for b in b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    .iter()
                    .cycle()
                {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    sleep(Duration::from_secs(1)).await;
                }
            });
            let (_tx, shutdown) = tokio::sync::watch::channel(false);
            let start = Instant::now();
            let back = app.process_new(Box::new(server), &shutdown).await;
            assert!(back.is_none());
            assert!(start.elapsed() <= Duration::from_secs(10) + LINGER);
            let mut out = Vec::new();
            rd.read_to_end(&mut out).await.unwrap();
            assert!(
                out.starts_with(b"HTTP/1.1 408 "),
                "h2c {h2c}: {}",
                String::from_utf8_lossy(&out)
            );
            // The peek fails before any session exists; without it, read_request fails.
            let errors = app.app().read_errors.load(Ordering::Relaxed);
            assert_eq!(errors, usize::from(!h2c), "h2c {h2c}");
            writer.await.unwrap();
        }
    }
}
