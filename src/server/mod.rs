//! Sockets: the accept loop, HTTP/1.1 and HTTP/2 connections, and graceful shutdown.
//!
//! [`run`] takes a bound listener and a shutdown future (so tests run it on port 0). On
//! shutdown: readiness turns 503, `drain_grace` passes while the listener still accepts, the
//! listener closes, and open connections finish their requests within `drain_timeout`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::api::{self, Surface};
use crate::app::App;

/// Bound on reading a request head, so idle or slow clients cannot hold connections forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the public API on `listener` until `shutdown` resolves, then drains.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    serve(listener, app, Surface::Public, shutdown).await
}

/// Serves the operator surface (`/health`, `/ready`) until `shutdown` resolves.
pub async fn run_admin(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    serve(listener, app, Surface::Admin, shutdown).await
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    builder
}

fn spawn_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    app: &Arc<App>,
    surface: Surface,
    stream: TcpStream,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let app = app.clone();
    let service = service_fn(move |request| api::handle(app.clone(), surface, request));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(?peer, %error, "connection ended with an error");
        }
    });
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    surface: Surface,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder();
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(&builder, &graceful, &app, surface, stream),
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
                    spawn_connection(&builder, &graceful, &app, surface, stream);
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
