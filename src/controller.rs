//! The kube-runtime controller: watches, the finalizer, error backoff, leader
//! election and start-up.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::Secret,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::{Action, Config as ControllerConfig},
        finalizer::{Event as Finalizer, finalizer},
        wait::{await_condition, conditions},
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

use crate::{
    Error, Result,
    clock::SystemClock,
    crd::{ApiKey, FIELD_MANAGER, FINALIZER, MANAGED_BY_LABEL, MANAGED_BY_VALUE},
    key::{KeyFactory, OsEntropy},
    reconciler::{KubeCluster, RateLimiter, Reconciler},
    store::SqlStore,
    telemetry::{Endpoints, Health, InstrumentedStore, Metrics},
};

/// Lease duration: a standby takes over at most this long after the leader stops renewing.
pub const LEASE_DURATION_SECS: u64 = 15;
/// How long before the lease ends the leader renews it.
const LEASE_GRACE_SECS: u64 = 5;

/// Longest wait between retries of a failing ApiKey.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    /// Used for the finalizer patches.
    pub client: Client,
    /// The shell that does the work.
    pub reconciler: Reconciler,
    /// Consecutive failures per ApiKey uid, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context with no failures recorded.
    pub fn new(client: Client, reconciler: Reconciler) -> Self {
        Self {
            client,
            reconciler,
            failures: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reconciles one ApiKey: adds the finalizer first, then issues or revokes.
pub async fn reconcile(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&key, &ctx).await;
    ctx.reconciler
        .metrics
        .observe_reconcile(started, result.as_ref().err());
    result
}

async fn reconcile_inner(key: &Arc<ApiKey>, ctx: &Arc<Context>) -> Result<Action> {
    let namespace = key.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, key.clone(), |event| async {
        match event {
            Finalizer::Apply(key) => ctx.reconciler.apply(&key).await,
            Finalizer::Cleanup(key) => ctx.reconciler.cleanup(&key).await,
        }
    })
    .await;
    let result = match result {
        // A stale cached copy of an ApiKey that is already gone: nothing left to do.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(status)))
            if status.is_not_found() =>
        {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    };
    let uid = key.uid().unwrap_or_default();
    match result {
        Ok(action) => {
            ctx.failures().remove(&uid);
            Ok(action)
        }
        Err(error) => {
            ctx.reconciler.report_failure(key, &error).await;
            Err(error)
        }
    }
}

/// Retries a failed ApiKey after 1 s, 2 s, 4 s … up to five minutes.
pub fn error_policy(key: Arc<ApiKey>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures();
    let count = failures.entry(key.uid().unwrap_or_default()).or_insert(0);
    *count = count.saturating_add(1);
    let delay = Duration::from_secs(1u64 << (*count - 1).min(9)).min(MAX_BACKOFF);
    warn!(
        apikey = %key.name_any(),
        namespace = key.namespace().unwrap_or_default(),
        category = error.category(),
        %error,
        retry_in_secs = delay.as_secs(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Settings for `keyward run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// sqlite: or postgres: URL of the key database.
    pub database_url: String,
    /// Key prefix, e.g. `kw`.
    pub key_prefix: String,
    /// Leave the CRD alone at start.
    pub skip_crd_install: bool,
    /// ApiKeys reconciled at the same time.
    pub max_concurrent_reconciles: u16,
    /// Keys issued (first, rotated or re-issued) per second at most; 0 is unlimited.
    pub max_issues_per_second: f64,
    /// Where `/metrics`, `/healthz` and `/readyz` listen; `None` serves nothing.
    pub http_address: Option<SocketAddr>,
    /// Reconcile only while holding a Lease.
    pub leader_election: bool,
    /// Name of that Lease.
    pub lease_name: String,
    /// Namespace of the Lease (the pod's namespace in a cluster).
    pub lease_namespace: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    pub identity: String,
}

/// Runs the operator until SIGTERM or SIGINT, or until it loses the leader lease
/// (then it exits with an error at once, so it never writes as a former leader).
pub async fn run(config: RunConfig) -> Result<()> {
    let keys = KeyFactory::new(&config.key_prefix, Arc::new(OsEntropy))?;
    let store = Arc::new(SqlStore::connect(&config.database_url).await?);
    store.migrate().await?;
    info!(backend = ?store.backend(), "key database ready");
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());

    if let Some(address) = config.http_address {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {address}: {e}")))?;
        info!(%address, "serving /metrics, /healthz and /readyz");
        let endpoints = Arc::new(Endpoints {
            metrics: metrics.clone(),
            store: store.clone(),
            health: health.clone(),
        });
        tokio::spawn(async move {
            if let Err(e) = crate::telemetry::serve(listener, endpoints).await {
                error!(error = %e, "HTTP endpoints stopped");
            }
        });
    }

    let reconciler = Reconciler {
        cluster: Arc::new(KubeCluster::new(
            client.clone(),
            Some(config.identity.clone()),
        )),
        store: Arc::new(InstrumentedStore {
            inner: store.clone(),
            metrics: metrics.clone(),
        }),
        clock: Arc::new(SystemClock),
        keys,
        issue_limiter: Arc::new(RateLimiter::per_second(config.max_issues_per_second)),
        metrics: metrics.clone(),
    };

    let outcome = if config.leader_election {
        lead_then_run(&config, client, reconciler, &metrics, health).await
    } else {
        metrics.leader.set(1);
        run_controller(&config, client, reconciler, health).await
    };
    store.close().await;
    outcome
}

/// Waits for the leader Lease, then runs the controller while holding it.
async fn lead_then_run(
    config: &RunConfig,
    client: Client,
    reconciler: Reconciler,
    metrics: &Metrics,
    health: Arc<Health>,
) -> Result<()> {
    health.standby.store(true, Ordering::SeqCst);
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(&config.identity)
        .with_duration(LEASE_DURATION_SECS)
        .with_grace(LEASE_GRACE_SECS)
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await
        .map_err(|e| Error::Leadership(e.to_string()))?;
    let (mut leading, lease_task) = manager.watch().await;
    info!(
        lease = config.lease_name,
        identity = config.identity,
        "waiting for the leader lease"
    );
    tokio::select! {
        became = leading.wait_for(|is_leader| *is_leader) => {
            became.map_err(|_| Error::Leadership("the lease manager stopped".into()))?;
        }
        () = shutdown_signal() => {
            info!("stopped before becoming leader");
            return Ok(());
        }
    }
    info!("became leader");
    health.standby.store(false, Ordering::SeqCst);
    metrics.leader.set(1);
    let outcome = tokio::select! {
        ran = run_controller(config, client, reconciler, health) => ran,
        lost = leading.wait_for(|is_leader| !*is_leader) => {
            metrics.leader.set(0);
            let why = if lost.is_ok() { "lost the leader lease" } else { "the lease manager stopped" };
            error!("{why}; exiting so that another replica takes over");
            return Err(Error::Leadership(why.into()));
        }
    };
    // Hand the lease over at once instead of letting it run out.
    drop(leading);
    match lease_task.await {
        Ok(Ok(manager)) => {
            if let Err(e) = manager.release().await {
                warn!(error = %e, "could not release the lease");
            }
        }
        Ok(Err(e)) => warn!(error = %e, "lease manager failed"),
        Err(e) => warn!(error = %e, "lease manager task failed"),
    }
    outcome
}

/// Waits for SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Installs the CRD if asked, then runs the controller until a shutdown signal.
async fn run_controller(
    config: &RunConfig,
    client: Client,
    reconciler: Reconciler,
    health: Arc<Health>,
) -> Result<()> {
    if !config.skip_crd_install {
        install_crd(client.clone()).await?;
    }
    let context = Arc::new(Context::new(client.clone(), reconciler));
    let owned_secrets =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    info!("starting the ApiKey controller");
    let controller = Controller::new(
        Api::<ApiKey>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(ControllerConfig::default().concurrency(config.max_concurrent_reconciles))
    // `owns` watches metadata only: Secret data is never cached here.
    .owns(Api::<Secret>::all(client), owned_secrets)
    .shutdown_on_signal();
    let synced = controller.store();
    tokio::spawn(async move {
        // Re-polled each second: a second waiter on the store's readiness is not
        // always woken when the controller's own waiter takes the value.
        loop {
            let ready = tokio::time::timeout(Duration::from_secs(1), synced.wait_until_ready());
            match ready.await {
                Ok(Ok(())) => {
                    health.watches_synced.store(true, Ordering::SeqCst);
                    info!("ApiKey watch synced");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
    controller
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    info!("stopped");
    Ok(())
}

/// Applies the CRD with the `keyward` field manager and waits until it is established.
async fn install_crd(client: Client) -> Result<()> {
    let crd = ApiKey::crd();
    let name = crd.name_any();
    let api: Api<CustomResourceDefinition> = Api::all(client);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let established = await_condition(api, &name, conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .map_err(|_| Error::Config(format!("CRD {name} was not established within 30s")))?
        .map_err(|e| Error::Config(format!("waiting for CRD {name}: {e}")))?;
    info!(crd = name, "CRD installed");
    Ok(())
}
