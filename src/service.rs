//! Running one edge: the listeners bound before serving, serving them until SIGTERM/Ctrl-C
//! (public, admin and internal surfaces stopping together), and re-reading the configuration
//! on SIGHUP.
//!
//! The `cartedge serve` command and the local cluster launcher both run edges through this
//! module. It parses no command line, loads no configuration at start-up (its callers hand it a
//! built [`App`]) and starts no databases.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::app::App;
use crate::config::{Config, Sources};

/// The listeners of one edge, bound before serving (so a taken port fails start-up).
pub struct Listeners {
    pub public: TcpListener,
    pub admin: Option<TcpListener>,
    pub internal: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners> {
        let bind = |address: std::net::SocketAddr| async move {
            TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {address}"))
        };
        Ok(Listeners {
            public: bind(config.server.listen).await?,
            admin: match config.server.admin_listen {
                Some(address) => Some(bind(address).await?),
                None => None,
            },
            internal: match config.server.internal_listen {
                Some(address) => Some(bind(address).await?),
                None => None,
            },
        })
    }
}

/// On SIGHUP, re-reads the configuration and applies what may change without a restart
/// (keys, rate limits, the public certificate, a changed ring and the shards it adds, the log
/// filter and read sampling; see `App::reload`); a configuration that does not load is logged
/// and changes nothing.
pub fn reload_on_sighup(app: Arc<App>, sources: Sources) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangups.recv().await.is_some() {
            let outcome = Config::load(&sources, std::env::vars())
                .map_err(anyhow::Error::from)
                .and_then(|config| {
                    // The filter is checked before anything changes, so a bad one changes nothing.
                    crate::telemetry::check_filter(&config.log).map_err(anyhow::Error::msg)?;
                    app.reload(&config)?;
                    crate::telemetry::reload(&config.log).map_err(anyhow::Error::msg)?;
                    tracing::info!(filter = %config.log.filter, read_sample_rate = config.log.read_sample_rate, "log settings reloaded");
                    Ok(())
                });
            if let Err(error) = outcome {
                tracing::error!(error = %format!("{error:#}"), "reload refused; keeping the running configuration");
            }
        }
    });
}

/// Serves already-bound listeners until SIGTERM/Ctrl-C.
pub async fn serve_bound(app: Arc<App>, listeners: Listeners) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.changed().await;
    };
    let mut side_tasks = Vec::new();
    if let Some(listener) = listeners.admin {
        let (app, stop) = (app.clone(), stopped(stop_rx.clone()));
        side_tasks.push(tokio::spawn(async move {
            crate::server::run_admin(listener, app, stop).await
        }));
    }
    if let (Some(listener), Some(tls)) = (listeners.internal, app.internal_tls.clone()) {
        let (app, stop) = (app.clone(), stopped(stop_rx.clone()));
        side_tasks.push(tokio::spawn(async move {
            crate::server::run_internal(listener, app, tls, stop).await
        }));
    }
    crate::server::run(listeners.public, app.clone(), async move {
        crate::server::shutdown_signal().await;
        let _ = stop_tx.send(true);
    })
    .await;
    for task in side_tasks {
        let _ = task.await;
    }
}
