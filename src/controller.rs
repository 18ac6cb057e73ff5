//! The kube-runtime controller: watches, the finalizer, error backoff and start-up.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

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
use tracing::{info, warn};

use crate::{
    Error, Result,
    clock::SystemClock,
    crd::{ApiKey, FIELD_MANAGER, FINALIZER, MANAGED_BY_LABEL, MANAGED_BY_VALUE},
    key::{KeyFactory, OsEntropy},
    reconciler::{KubeCluster, RateLimiter, Reconciler},
    store::SqlStore,
};

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
    let namespace = key.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, key.clone(), |event| async {
        match event {
            Finalizer::Apply(key) => ctx.reconciler.apply(&key).await,
            Finalizer::Cleanup(key) => ctx.reconciler.cleanup(&key).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let uid = key.uid().unwrap_or_default();
    match result {
        Ok(action) => {
            ctx.failures().remove(&uid);
            Ok(action)
        }
        Err(error) => {
            ctx.reconciler.report_failure(&key, &error).await;
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
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(config: RunConfig) -> Result<()> {
    let keys = KeyFactory::new(&config.key_prefix, Arc::new(OsEntropy))?;
    let store = SqlStore::connect(&config.database_url).await?;
    store.migrate().await?;
    info!(backend = ?store.backend(), "key database ready");

    let client = Client::try_default().await?;
    if !config.skip_crd_install {
        install_crd(client.clone()).await?;
    }
    let reconciler = Reconciler {
        cluster: Arc::new(KubeCluster::new(
            client.clone(),
            std::env::var("POD_NAME").ok(),
        )),
        store: Arc::new(store),
        clock: Arc::new(SystemClock),
        keys,
        issue_limiter: Arc::new(RateLimiter::per_second(config.max_issues_per_second)),
    };
    let context = Arc::new(Context::new(client.clone(), reconciler));
    let owned_secrets =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    info!("starting the ApiKey controller");
    Controller::new(
        Api::<ApiKey>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(ControllerConfig::default().concurrency(config.max_concurrent_reconciles))
    // `owns` watches metadata only: Secret data is never cached here.
    .owns(Api::<Secret>::all(client), owned_secrets)
    .shutdown_on_signal()
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
