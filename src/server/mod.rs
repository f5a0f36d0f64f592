//! Sockets: the accept loop, HTTP/1.1 and HTTP/2 connections, and graceful shutdown.
//!
//! [`run`] takes a bound listener and a shutdown future (so tests run it on port 0). On
//! shutdown: readiness turns 503, `drain_grace` passes while the listener still accepts, the
//! listener closes, and open connections finish their requests within `drain_timeout`.
//! The public listener speaks TLS when configured ([`tls`]); the internal one always does,
//! with client certificates. Every connection's bytes pass [`framing`] on the way in, so a
//! request carrying both `Content-Length` and `Transfer-Encoding` is refused with 400 before
//! its body is read.

mod framing;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::api::error::ApiError;
use crate::api::{self, Surface};
use crate::app::App;
use crate::config::ServerConfig;
use crate::forward::tls as edge_tls;
use framing::{FramingWatch, Watched};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// Serves the public API on `listener` until `shutdown` resolves, then drains. Over TLS when
/// the configuration names a certificate (`server.tls_cert_file`), else plain HTTP.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let tls = app
        .public_tls
        .as_ref()
        .map(|tls| TlsAcceptor::from(tls.server_config()));
    serve(listener, app, Surface::Public, tls, shutdown).await
}

/// Serves other regions' edges (mutual TLS, HTTP/2) until `shutdown` resolves. A connection
/// whose client certificate names no region of the topology is closed after the handshake.
pub async fn run_internal(
    listener: TcpListener,
    app: Arc<App>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    serve(
        listener,
        app,
        Surface::Internal,
        Some(TlsAcceptor::from(tls)),
        shutdown,
    )
    .await
}

/// Serves the operator surface (`/health`, `/ready`) until `shutdown` resolves.
pub async fn run_admin(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    serve(listener, app, Surface::Admin, None, shutdown).await
}

fn builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout.0)
        .max_headers(config.max_headers)
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(config.http2_max_pending_reset_streams)
        .max_header_list_size(config.max_header_bytes as u32);
    builder
}

/// Bound on a TLS handshake on the internal listener (the public one uses
/// `server.header_read_timeout`, the bound on a client's first bytes).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn spawn_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    app: &Arc<App>,
    surface: Surface,
    tls: Option<&TlsAcceptor>,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let service_app = app.clone();
    let peer_address = peer.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let over_tls = tls.is_some();
    // The reader's view of each request's framing, and the position of the next request.
    let framing = Arc::new(FramingWatch::default());
    let watch = framing.clone();
    let next_position = Arc::new(AtomicU64::new(0));
    let service = service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        let position = next_position.fetch_add(1, Ordering::Relaxed);
        let conflicting = watch.conflicts_at(position);
        request.extensions_mut().insert(api::Peer(peer_address));
        if over_tls {
            request.extensions_mut().insert(api::OverTls);
        }
        let app = service_app.clone();
        async move {
            if conflicting {
                // Refused before its body is read; hyper closes the connection after it, so
                // nothing pipelined behind it is served.
                tracing::debug!(
                    ?peer,
                    "request with both Content-Length and Transfer-Encoding refused"
                );
                return Ok(ApiError::InvalidRequest(
                    "a request must not carry both Content-Length and Transfer-Encoding".into(),
                )
                .into_response());
            }
            api::handle(app, surface, request).await
        }
    });
    let Some(acceptor) = tls.cloned() else {
        let connection = builder
            .serve_connection(TokioIo::new(Watched::new(stream, framing)), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(?peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
        return;
    };
    let builder = builder.clone();
    let watcher = graceful.watcher();
    let app = app.clone();
    let handshake_timeout = match surface {
        Surface::Internal => TLS_HANDSHAKE_TIMEOUT,
        _ => app.config.server.header_read_timeout.0,
    };
    tokio::spawn(async move {
        let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                // Internet noise on the public listener; a misconfigured peer edge internally.
                if surface == Surface::Internal {
                    tracing::warn!(?peer, %error, "edge TLS handshake failed");
                } else {
                    tracing::debug!(?peer, %error, "TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                if surface == Surface::Internal {
                    tracing::warn!(?peer, "edge TLS handshake timed out");
                } else {
                    tracing::debug!(?peer, "TLS handshake timed out");
                }
                return;
            }
        };
        if surface == Surface::Internal {
            let region = edge_tls::peer_edge_name(stream.get_ref().1);
            if !region
                .as_ref()
                .is_some_and(|r| app.topology().regions.contains_key(r.as_str()))
            {
                tracing::warn!(
                    ?peer,
                    ?region,
                    "edge certificate names no region of the topology"
                );
                return;
            }
        }
        let connection = builder
            .serve_connection(TokioIo::new(Watched::new(stream, framing)), service)
            .into_owned();
        if let Err(error) = watcher.watch(connection).await {
            tracing::debug!(?peer, ?surface, %error, "TLS connection ended with an error");
        }
        drop(permit);
    });
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    surface: Surface,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(&app.config.server);
    let graceful = GracefulShutdown::new();
    // A permit per open connection: at the cap the loop stops accepting, so a connection flood
    // waits in the kernel's backlog instead of growing memory here.
    let permits = Arc::new(Semaphore::new(app.config.server.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(&builder, &graceful, &app, surface, tls.as_ref(), stream, permit),
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    app.start_draining();
    tracing::info!(?surface, "shutdown requested: readiness off, draining");
    // Keep accepting during the grace period so clients that have not yet noticed the
    // readiness change are not refused; those connections are drained like the rest.
    let deadline = tokio::time::sleep(app.config.server.drain_grace.0);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    // Past the cap during the grace period, refuse rather than queue.
                    if let Ok(permit) = permits.clone().try_acquire_owned() {
                        spawn_connection(&builder, &graceful, &app, surface, tls.as_ref(), stream, permit);
                    }
                }
            }
        }
    }
    drop(listener);
    let timeout = app.config.server.drain_timeout.0;
    if tokio::time::timeout(timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?timeout, "drain timed out; closing remaining connections");
    } else {
        tracing::info!(?surface, "all connections drained");
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
