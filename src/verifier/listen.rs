//! Starting a verifier: the PostgreSQL LISTEN/NOTIFY wake-up, the follower, and
//! the server, for `keyward verifier` and `keyward run --verifier-address`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::http::HeaderName;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{
    core::{Follow, Verifier, VerifierConfig, follow},
    http::{Endpoint, serve},
};
use crate::{
    Error, Result,
    clock::SystemClock,
    store::{Backend, CHANGE_CHANNEL, SqlStore},
    telemetry::Metrics,
};

/// Settings of a verifier.
#[derive(Clone, Debug)]
pub struct VerifierSettings {
    /// Where the endpoints listen (gRPC and HTTP on one port).
    pub address: SocketAddr,
    /// The header that may carry a key besides `Authorization: Bearer`.
    pub key_header: String,
    /// Staleness limit, negative cache, fallback bounds and the last-used flush.
    pub config: VerifierConfig,
}

/// How often to look for changes without a wake-up: SQLite has no NOTIFY, so
/// it is polled often; PostgreSQL's NOTIFY makes the poll a safety net.
fn poll_interval(backend: Backend) -> Duration {
    match backend {
        Backend::Sqlite => Duration::from_millis(100),
        Backend::Postgres => Duration::from_secs(1),
    }
}

/// Wakes the follower on every NOTIFY, and once after each (re)connect, since
/// notifications sent while disconnected are lost.
async fn listen(url: String, wake: mpsc::Sender<()>, metrics: Arc<Metrics>) {
    loop {
        match PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(CHANGE_CHANNEL).await {
                Ok(()) => {
                    let _ = wake.try_send(());
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(_)) => {
                                let _ = wake.try_send(());
                            }
                            // The connection dropped; the next call reconnects.
                            Ok(None) => {
                                metrics.verifier_listener_reconnects.inc();
                                let _ = wake.try_send(());
                            }
                            Err(e) => {
                                warn!(error = %e, "change listener failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "LISTEN failed; retrying"),
            },
            Err(e) => warn!(error = %e, "change listener cannot connect; retrying"),
        }
        metrics.verifier_listener_reconnects.inc();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Binds the address, then runs the follower (and, on PostgreSQL, the change
/// listener) and serves in background tasks. Returns the verifier and the bound
/// address once the port is bound; it answers `Unavailable` until the first load.
pub async fn start(
    store: Arc<SqlStore>,
    database_url: &str,
    settings: VerifierSettings,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Verifier>, SocketAddr)> {
    let key_header = HeaderName::from_bytes(settings.key_header.to_ascii_lowercase().as_bytes())
        .map_err(|e| Error::Config(format!("--key-header {:?}: {e}", settings.key_header)))?;
    let listener = tokio::net::TcpListener::bind(settings.address)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", settings.address)))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the bound address: {e}")))?;
    let backend = store.backend();
    let flush = settings.config.last_used_flush;
    let verifier = Arc::new(Verifier::new(
        store,
        Arc::new(SystemClock),
        settings.config,
        metrics.clone(),
    ));
    let (wake, woken) = mpsc::channel(1);
    if backend == Backend::Postgres {
        tokio::spawn(listen(
            database_url.to_owned(),
            wake.clone(),
            metrics.clone(),
        ));
    }
    let timing = Follow {
        poll: poll_interval(backend),
        full_reload: Duration::from_secs(300),
        flush,
    };
    tokio::spawn(follow(verifier.clone(), timing, woken));
    let endpoint = Endpoint {
        verifier: verifier.clone(),
        metrics,
        key_header,
    };
    info!(%address, "verifier serving gRPC ext_authz, /check, /v1/verify and probes");
    tokio::spawn(async move {
        if let Err(e) = serve(listener, endpoint).await {
            error!(error = %e, "verifier server stopped");
        }
        drop(wake);
    });
    Ok((verifier, address))
}
