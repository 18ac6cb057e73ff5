//! Starting a verifier: the PostgreSQL LISTEN/NOTIFY wake-up, the follower, and
//! the server, for `keyward verifier` and `keyward run --verifier-address`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use axum::{
    Router,
    body::Body,
    http::HeaderName,
    serve::{Listener, ListenerExt},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use jiff::Timestamp;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tracing::{error, info, warn};

use super::{
    core::{Follow, KeySource, Verifier, VerifierConfig, follow},
    grpc, http,
    request::Endpoint,
};
use crate::{
    Error, Result,
    clock::SystemClock,
    key::KeyHash,
    store::{Backend, CHANGE_CHANNEL, ChangePosition, KeyRecord, KeyStore, SqlStore},
    telemetry::Metrics,
    usage::UsageBatch,
};

/// Every route on one port: gRPC ext_authz beside the HTTP check, `/v1/verify`
/// and the probes.
pub fn router(endpoint: Endpoint) -> Router {
    grpc::routes(endpoint.clone()).merge(http::routes(endpoint))
}

/// Serves [`router`] on `listener` until the process ends: HTTP/1 and HTTP/2
/// (gRPC) on each connection, as `axum::serve` would, except that a request
/// for exactly `/check` is answered by [`http::check_request`] without the
/// router. That is what nginx and Traefik call for every request they pass,
/// and the router's matching, extractors, body boxing and per-request
/// extensions are work it does not need (docs/benchmarks.md, "HTTP check on
/// loopback"); the answer is the same.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Endpoint) -> std::io::Result<()> {
    let router = router(endpoint.clone());
    // Without TCP_NODELAY every gRPC answer waits ~40 ms for a delayed ACK.
    let mut listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    loop {
        // As `axum::serve`: a failed accept is retried (after 1 s unless the
        // connection itself failed), never returned.
        let (stream, _) = listener.accept().await;
        let endpoint = endpoint.clone();
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let endpoint = endpoint.clone();
            let router = router.clone();
            async move {
                if request.uri().path() == "/check" {
                    let (query, headers) = (request.uri().query(), request.headers());
                    return Ok(http::check_request(&endpoint, None, query, headers).await);
                }
                router.oneshot(request.map(Body::new)).await
            }
        });
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "verifier connection ended");
            }
        });
    }
}

/// Settings of a verifier.
#[derive(Clone, Debug)]
pub struct VerifierSettings {
    /// Where the endpoints listen (gRPC and HTTP on one port).
    pub address: SocketAddr,
    /// The header that may carry a key besides `Authorization: Bearer`.
    pub key_header: String,
    /// Staleness limit, negative cache, fallback bounds and the last-used flush.
    pub config: VerifierConfig,
    /// The primary, when the database followed is a read replica: LISTEN
    /// there for the wake-up, and write last-used times there.
    pub primary_database_url: Option<String>,
}

/// How often to look for changes while a listener would wake the follower
/// (PostgreSQL's NOTIFY: the poll is a safety net), and while nothing would
/// (SQLite, a read replica without a primary URL, a listener reconnecting).
fn poll_intervals(backend: Backend) -> (Duration, Duration) {
    match backend {
        Backend::Sqlite => (Duration::from_millis(100), Duration::from_millis(100)),
        Backend::Postgres => (Duration::from_secs(1), Duration::from_millis(250)),
    }
}

/// Where the verifier reads and where it writes last-used times: the
/// database it follows (maybe a read replica), and the primary when given.
struct Databases {
    read: Arc<SqlStore>,
    primary: Option<Arc<SqlStore>>,
    /// Set while last-used times cannot be written (a replica, no primary URL).
    last_used_off: AtomicBool,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl KeySource for Databases {
    async fn live_keys(&self, sink: &mut (dyn FnMut(KeyRecord) + Send)) -> Result<i64> {
        self.read.each_live_key(sink).await
    }
    async fn changes_since(&self, after: i64, limit: i64) -> Result<Vec<(i64, KeyRecord)>> {
        self.read.changes_since(after, limit).await
    }
    async fn find(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        KeyStore::find_by_hash(&*self.read, hash).await
    }
    async fn position(&self, witness: Option<&str>) -> Result<ChangePosition> {
        self.read.change_position(witness).await
    }
    /// To the primary when given; otherwise to the database followed, unless
    /// it is a read replica: then the uses are dropped, said once in the log
    /// and in `keyward_verifier_last_used_disabled`, never retried in a loop.
    async fn record_usage(&self, batch: &UsageBatch, at: Timestamp) -> Result<u64> {
        if let Some(primary) = &self.primary {
            return primary.record_usage(batch, at).await;
        }
        let standby = self.read.is_standby().await?;
        self.metrics
            .verifier_last_used_disabled
            .set(i64::from(standby));
        let was_off = self.last_used_off.swap(standby, Ordering::SeqCst);
        if standby {
            if !was_off {
                warn!(
                    "last-used times and usage counts are not recorded: the key database is a read replica and no --primary-database-url is given"
                );
            }
            return Ok(0);
        }
        if was_off {
            info!("the key database accepts writes again; recording last-used times and usage");
        }
        self.read.record_usage(batch, at).await
    }
}

/// Keeps a LISTEN open for the change NOTIFYs: on the primary URL when given,
/// otherwise on the database followed unless it is a read replica (which
/// cannot LISTEN: the follower polls it instead). Each NOTIFY's change number
/// is announced to the verifier, so it knows how far a replica must replay;
/// it wakes the follower then, and once after each (re)connect, since
/// notifications sent while disconnected are lost.
async fn listen(
    read: Arc<SqlStore>,
    read_url: String,
    primary_url: Option<String>,
    verifier: Arc<Verifier>,
    wake: mpsc::Sender<()>,
    listening: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let mut said_replica = false;
    loop {
        let url = match &primary_url {
            Some(url) => url.clone(),
            None => match read.is_standby().await {
                Ok(false) => read_url.clone(),
                Ok(true) => {
                    if !said_replica {
                        info!(
                            "the key database is a read replica, which cannot LISTEN: polling it every 250 ms (give --primary-database-url for a wake-up at each change)"
                        );
                        said_replica = true;
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    continue;
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        match PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(CHANGE_CHANNEL).await {
                Ok(()) => {
                    listening.store(true, Ordering::SeqCst);
                    let _ = wake.try_send(());
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(notification)) => {
                                if let Ok(seq) = notification.payload().parse() {
                                    verifier.announce(seq);
                                }
                                let _ = wake.try_send(());
                            }
                            // The connection dropped; the next call reconnects.
                            Ok(None) => {
                                metrics.verifier_listener_reconnects.inc();
                                let _ = wake.try_send(());
                            }
                            Err(e) => {
                                warn!(error = %e, "change listener failed; reconnecting");
                                // Nothing wakes the follower until the listener is back:
                                // it polls faster from now on, not after its current wait.
                                listening.store(false, Ordering::SeqCst);
                                let _ = wake.try_send(());
                                break;
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "LISTEN failed; retrying"),
            },
            Err(e) => warn!(error = %e, "change listener cannot connect; retrying"),
        }
        listening.store(false, Ordering::SeqCst);
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
    let primary_url = settings.primary_database_url.clone();
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
    let primary = match &primary_url {
        Some(url) => Some(Arc::new(SqlStore::connect_lazy(url)?)),
        None => None,
    };
    let databases = Databases {
        read: store.clone(),
        primary,
        last_used_off: AtomicBool::new(false),
        metrics: metrics.clone(),
    };
    let verifier = Arc::new(Verifier::new(
        Arc::new(databases),
        Arc::new(SystemClock),
        settings.config,
        metrics.clone(),
    ));
    let (wake, woken) = mpsc::channel(1);
    let listening = Arc::new(AtomicBool::new(false));
    if backend == Backend::Postgres {
        tokio::spawn(listen(
            store,
            database_url.to_owned(),
            primary_url,
            verifier.clone(),
            wake.clone(),
            listening.clone(),
            metrics.clone(),
        ));
    }
    let (poll, unheard_poll) = poll_intervals(backend);
    let timing = Follow {
        poll,
        unheard_poll,
        listening,
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
