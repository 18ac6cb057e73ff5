//! The kube-runtime controller: watches, the finalizer, error backoff, leader
//! election and start-up.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt, TryStreamExt};
use json_patch::{
    AddOperation, PatchOperation, RemoveOperation, TestOperation, jsonptr::PointerBuf,
};
use k8s_openapi::{
    api::core::v1::{Namespace, ObjectReference, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{PartialObjectMeta, Patch, PatchParams},
    core::{DeserializeGuard, error_boundary::InvalidObject},
    runtime::{
        Controller, WatchStreamExt,
        controller::{Action, Config as ControllerConfig},
        events::{Event, EventType},
        finalizer::{Event as Finalizer, finalizer},
        reflector,
        wait::{Condition, await_condition, conditions},
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{debug, error, info, warn};

use crate::{
    Error, Result,
    anti_entropy::AntiEntropy,
    clock::SystemClock,
    crd::{ApiKey, FIELD_MANAGER, FINALIZER, MANAGED_BY_LABEL, MANAGED_BY_VALUE},
    key::{KeyFactory, OsEntropy},
    operator::reconciler::{KubeCluster, RateLimiter, Reconciler, StatusMemo},
    operator::secret_cache::SecretCache,
    operator::wire::WireApiKey,
    policy::{PolicyIndex, watch as policy_watch},
    store::{KeyStore, SqlStore},
    telemetry::{Endpoints, Health, InstrumentedStore, Metrics},
    usage::follow::UsageFollower,
};

/// Lease duration: a standby takes over at most this long after the leader stops renewing.
pub const LEASE_DURATION_SECS: u64 = 15;
/// How long before the lease ends the leader renews it.
const LEASE_GRACE_SECS: u64 = 5;

/// Longest wait between retries of a failing ApiKey.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Objects per page of the watches' initial LIST. Each page is held whole
/// while it is decoded, so smaller pages lower the start-up peak at a few
/// more round trips.
const LIST_PAGE_SIZE: u32 = 100;
/// How long a reconcile at start-up waits for the Secret cache's first list,
/// so that a restart over a settled fleet reads no Secret; then it reads them.
const SECRET_CACHE_WAIT: Duration = Duration::from_secs(30);

/// How long a reconcile waits for the namespace watch to bring a new namespace.
const NEW_NAMESPACE_WAIT: Duration = Duration::from_secs(5);

/// What every reconcile shares.
pub struct Context {
    /// Used for the finalizer patches.
    pub client: Client,
    /// The shell that does the work.
    pub reconciler: Reconciler,
    /// The metadata-only cache of keyward's Secrets, once it is filled.
    secrets: Option<SecretCache>,
    /// The ApiKeyPolicies and namespace labels, once listed.
    policies: Option<PolicyIndex>,
    /// Consecutive failures per ApiKey uid, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When a watch event first asked for each ApiKey (namespace, name) to be reconciled.
    queued: Mutex<HashMap<(String, String), Instant>>,
}

impl Context {
    /// A context with no failures recorded. Without a Secret cache every
    /// reconcile reads its Secret from the API server.
    pub fn new(
        client: Client,
        reconciler: Reconciler,
        secrets: Option<SecretCache>,
        policies: Option<PolicyIndex>,
    ) -> Self {
        Self {
            client,
            reconciler,
            secrets,
            policies,
            failures: Mutex::default(),
            queued: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Instant>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that a watch event asked for this ApiKey; the first request counts.
    fn mark_queued(&self, namespace: Option<&str>, name: &str) {
        if let Some(namespace) = namespace {
            self.queued()
                .entry((namespace.to_owned(), name.to_owned()))
                .or_insert_with(Instant::now);
        }
    }

    /// Records how long the ApiKey waited since the watch event that asked for it.
    fn observe_queue_wait(&self, namespace: &str, name: &str) {
        let since = self
            .queued()
            .remove(&(namespace.to_owned(), name.to_owned()));
        if let Some(since) = since {
            self.reconciler
                .metrics
                .queue_wait
                .observe(since.elapsed().as_secs_f64());
        }
    }

    /// Waits (bounded) until the Secret cache has its first full list.
    async fn secret_cache_synced(&self) {
        let Some(cache) = &self.secrets else { return };
        let deadline = Instant::now() + SECRET_CACHE_WAIT;
        while !cache.is_synced() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until the ApiKeyPolicies and namespaces are listed, and
    /// briefly for a namespace created with its ApiKeys in one apply; until then
    /// the policy check fails and nothing is issued.
    async fn policies_synced(&self, namespace: &str) {
        let Some(index) = &self.policies else { return };
        let deadline = Instant::now() + SECRET_CACHE_WAIT;
        while !index.is_synced() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + NEW_NAMESPACE_WAIT;
        while !index.knows_namespace(namespace) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops what is kept for ApiKeys the cache no longer holds (deleted while
    /// the watch was away), so that create/delete churn never grows memory.
    fn keep_only(&self, cache: &reflector::Store<DeserializeGuard<ApiKey>>) {
        let objects = cache.state();
        let uids: HashSet<String> = objects.iter().filter_map(|k| k.uid()).collect();
        let names: HashSet<(String, String)> = objects
            .iter()
            .map(|k| (k.namespace().unwrap_or_default(), k.name_any()))
            .collect();
        self.failures().retain(|uid, _| uids.contains(uid));
        self.queued().retain(|name, _| names.contains(name));
        self.reconciler.status_memo.retain(&uids);
    }

    /// Drops what is kept per ApiKey once it is gone.
    fn forget(&self, uid: &str, namespace: &str, name: &str) {
        self.failures().remove(uid);
        self.queued()
            .remove(&(namespace.to_owned(), name.to_owned()));
        self.reconciler.status_memo.forget(uid);
    }
}

/// Reconciles whatever the watch delivered: an ApiKey, or an object stored
/// under the ApiKey kind that cannot be read as one (it must not stall the rest).
pub async fn reconcile_object(
    object: Arc<DeserializeGuard<ApiKey>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    match &object.0 {
        Ok(key) => reconcile(Arc::new(key.clone()), ctx).await,
        Err(invalid) => {
            invalid_object(invalid, &ctx).await;
            Ok(Action::await_change())
        }
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
    ctx.observe_queue_wait(&namespace, &key.name_any());
    ctx.secret_cache_synced().await;
    ctx.policies_synced(&namespace).await;
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &namespace);
    // Add the finalizer and go on in the same round: waiting for the watch to
    // bring the patched object back would cost every new ApiKey a second round.
    let key = if key.metadata.deletion_timestamp.is_none() && !has_finalizer(key) {
        Arc::new(add_finalizer(&api, key).await?)
    } else {
        key.clone()
    };
    let uid = key.uid().unwrap_or_default();
    let name = key.name_any();
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
    match result {
        Ok(action) => {
            if key.metadata.deletion_timestamp.is_some() {
                ctx.forget(&uid, &namespace, &name);
            } else {
                ctx.failures().remove(&uid);
            }
            Ok(action)
        }
        Err(error) => {
            ctx.reconciler.report_failure(&key, &error).await;
            Err(error)
        }
    }
}

fn has_finalizer(key: &ApiKey) -> bool {
    key.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds keyward's finalizer with the same guarded JSON patch the kube-runtime
/// helper uses, and returns the object as the API server now has it.
async fn add_finalizer(api: &Api<ApiKey>, key: &ApiKey) -> Result<ApiKey> {
    let path = |p: &str| PointerBuf::parse(p).expect("a valid JSON pointer");
    let finalizers = key.finalizers();
    let patch = if finalizers.is_empty() {
        vec![
            PatchOperation::Test(TestOperation {
                path: path("/metadata/finalizers"),
                value: serde_json::Value::Null,
            }),
            PatchOperation::Add(AddOperation {
                path: path("/metadata/finalizers"),
                value: vec![FINALIZER].into(),
            }),
        ]
    } else {
        vec![
            PatchOperation::Test(TestOperation {
                path: path("/metadata/finalizers"),
                value: finalizers.into(),
            }),
            PatchOperation::Add(AddOperation {
                path: path("/metadata/finalizers/-"),
                value: FINALIZER.into(),
            }),
        ]
    };
    Ok(api
        .patch(
            &key.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch::Patch(patch)),
        )
        .await?)
}

/// An object under the ApiKey kind that does not deserialize (stored before a
/// schema change, or written past validation). It gets a Warning Event and a
/// log line, and is otherwise left alone; the watch and the other ApiKeys go
/// on. If it is being deleted, its keys are revoked all the same (found by uid)
/// and its Secrets deleted, so a deletion still fails closed. The API server
/// refuses any update of an object that fails its schema, so the finalizer can
/// only go once someone fixes the field; the Event says so.
async fn invalid_object(invalid: &InvalidObject, ctx: &Context) {
    let meta = &invalid.metadata;
    let (namespace, name) = (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    warn!(apikey = name, namespace, error = %invalid.error, "cannot read this ApiKey; skipping it");
    let note = format!(
        "keyward cannot read this ApiKey ({}); fix the field with kubectl edit, or delete and recreate the ApiKey. Other ApiKeys are not affected.",
        invalid.error
    );
    publish_about(meta, note, ctx).await;
    let finalizing = meta.deletion_timestamp.is_some()
        && meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    if !finalizing {
        return;
    }
    match release_invalid(meta, ctx).await {
        Ok(()) => {}
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 422 => {
            let note = "keyward revoked this ApiKey's keys, but the API server refuses to remove the finalizer while the object fails its schema; fix the field with kubectl edit and the deletion completes.".to_owned();
            publish_about(meta, note, ctx).await;
        }
        // Retried on the next change or resync; the finalizer stays meanwhile.
        Err(e) => {
            warn!(apikey = name, namespace, error = %e, "could not revoke the keys of an unreadable ApiKey")
        }
    }
}

/// Publishes a Warning Event `InvalidObject` about an object known only by its metadata.
async fn publish_about(meta: &ObjectMeta, note: String, ctx: &Context) {
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidObject".into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .reconciler
        .cluster
        .publish(&reference_to(meta), event)
        .await
    {
        warn!(error = %e, "could not publish an Event");
    }
}

/// An object reference to an ApiKey known only by its metadata.
fn reference_to(meta: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(ApiKey::api_version(&()).into_owned()),
        kind: Some(ApiKey::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// Revokes the keys of an unreadable ApiKey being deleted, deletes the Secrets
/// it controls, then removes the finalizer.
async fn release_invalid(meta: &ObjectMeta, ctx: &Context) -> Result<()> {
    let uid = meta.uid.clone().ok_or(Error::MissingMetadata("uid"))?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let name = meta.name.clone().ok_or(Error::MissingMetadata("name"))?;
    ctx.reconciler.revoke_all(&reference_to(meta), &uid).await?;
    let owned = ctx
        .secrets
        .iter()
        .flat_map(|cache| cache.controlled_by(&namespace, &uid));
    for (secret_name, secret_uid) in owned {
        ctx.reconciler
            .cluster
            .delete_secret(&namespace, &secret_name, &secret_uid)
            .await?;
    }
    let finalizers = meta.finalizers.clone().unwrap_or_default();
    let index = finalizers
        .iter()
        .position(|f| f == FINALIZER)
        .expect("checked by the caller");
    let path =
        PointerBuf::parse(format!("/metadata/finalizers/{index}")).expect("a valid JSON pointer");
    let patch = json_patch::Patch(vec![
        PatchOperation::Test(TestOperation {
            path: path.clone(),
            value: FINALIZER.into(),
        }),
        PatchOperation::Remove(RemoveOperation { path }),
    ]);
    // The object cannot be deserialized, so the patch response is not either.
    let api: Api<DeserializeGuard<ApiKey>> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    info!(
        apikey = name,
        namespace, "revoked the keys of an unreadable ApiKey and released it"
    );
    ctx.forget(&uid, &namespace, &name);
    Ok(())
}

/// Retries a failed ApiKey after 1 s, 2 s, 4 s … up to five minutes.
pub fn error_policy(
    key: Arc<DeserializeGuard<ApiKey>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
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
    /// This cluster's name in the key database (`--cluster-name`).
    pub cluster_name: String,
    /// Time between the leader's anti-entropy passes.
    pub anti_entropy_interval: Duration,
    /// How long usage counts are kept.
    pub usage_retention: jiff::SignedDuration,
    /// Time between the leader's scans of recent key use.
    pub usage_scan_interval: Duration,
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
    /// Forbid keys in namespaces that no ApiKeyPolicy selects.
    pub require_policy: bool,
    /// Also serve the verifier from this process (`--verifier-address`).
    pub verifier: Option<crate::verifier::listen::VerifierSettings>,
}

/// Runs the operator until SIGTERM or SIGINT, or until it loses the leader lease
/// (then it exits with an error at once, so it never writes as a former leader).
pub async fn run(config: RunConfig) -> Result<()> {
    let keys = KeyFactory::new(&config.key_prefix, Arc::new(OsEntropy))?;
    // Connected on first use: a database that is down at start delays the
    // reconciles below, while the probes and the verifier answer at once.
    let store =
        Arc::new(SqlStore::connect_lazy(&config.database_url)?.with_cluster(&config.cluster_name));
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

    if let Some(settings) = config.verifier.clone() {
        crate::verifier::listen::start(
            store.clone(),
            &config.database_url,
            settings,
            metrics.clone(),
        )
        .await?;
    }

    tokio::select! {
        migrated = migrate_when_reachable(&store) => migrated?,
        () = shutdown_signal() => {
            info!("stopped before the key database was reachable");
            return Ok(());
        }
    }
    register_cluster(&store, &client).await?;

    let secrets = SecretCache::default();
    let policies = PolicyIndex::new(config.require_policy);
    let reconciler = Reconciler {
        cluster: Arc::new(KubeCluster::new(
            client.clone(),
            Some(config.identity.clone()),
            Some(secrets.clone()),
            metrics.clone(),
        )),
        store: Arc::new(InstrumentedStore {
            inner: store.clone(),
            metrics: metrics.clone(),
        }),
        clock: Arc::new(SystemClock),
        keys,
        issue_limiter: Arc::new(RateLimiter::per_second(config.max_issues_per_second)),
        metrics: metrics.clone(),
        status_memo: Arc::new(StatusMemo::default()),
        governance: Arc::new(policies.clone()),
        issue_turns: Arc::default(),
        usage: Arc::default(),
    };

    let parts = Parts {
        database: store.clone(),
        client,
        reconciler,
        secrets,
        policies,
    };
    let outcome = if config.leader_election {
        lead_then_run(&config, parts, &metrics, health).await
    } else {
        metrics.leader.set(1);
        run_controller(&config, parts, health).await
    };
    store.close().await;
    outcome
}

/// Applies the migrations, retrying (1 s, 2 s … 30 s apart) while the key
/// database cannot be reached: an operator started during a database outage
/// waits for it instead of exiting into a crash loop.
async fn migrate_when_reachable(store: &SqlStore) -> Result<()> {
    let mut delay = Duration::from_secs(1);
    loop {
        match store.migrate().await {
            Ok(()) => {
                info!(backend = ?store.backend(), "key database ready");
                return Ok(());
            }
            // A database that answers but refuses the migrations needs a person.
            Err(e) if !unreachable(&e) => return Err(e),
            Err(e) => {
                warn!(error = %e, retry_in_secs = delay.as_secs(), "cannot migrate the key database; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Registers `--cluster-name` in the key database under this Kubernetes
/// cluster's identity (the kube-system Namespace uid), or checks that it is
/// registered so; a name that belongs to another cluster, or a changed name,
/// stops the operator with a message that says what to do. Rows written
/// before migration 4 are claimed only when some of their ApiKeys exist here
/// with the same uid: another cluster's rows are never claimed, so never
/// judged as orphans by this one.
async fn register_cluster(store: &SqlStore, client: &Client) -> Result<()> {
    let kube_system = Api::<Namespace>::all(client.clone())
        .get_metadata("kube-system")
        .await?;
    let uid = kube_system
        .metadata
        .uid
        .ok_or(Error::MissingMetadata("uid"))?;
    let unclaimed = store.unclaimed_owners(20).await?;
    let mut claim = false;
    for (owner_uid, namespace, name) in &unclaimed {
        // Before the CRD is installed nothing here can own them.
        let found = Api::<PartialObjectMeta<ApiKey>>::namespaced(client.clone(), namespace)
            .get_metadata_opt(name)
            .await
            .ok()
            .flatten();
        if found.and_then(|key| key.metadata.uid).as_ref() == Some(owner_uid) {
            claim = true;
            break;
        }
    }
    store
        .register_cluster(&uid, claim, jiff::Timestamp::now())
        .await?;
    if claim {
        info!(
            cluster = store.cluster(),
            "claimed the keys written before the cluster name existed"
        );
    } else if !unclaimed.is_empty() {
        warn!(
            "the key database holds keys written before the cluster name existed, and none of the ApiKeys sampled is in this cluster: they are left to the cluster that owns them"
        );
    }
    info!(
        cluster = store.cluster(),
        "cluster registered in the key database"
    );
    Ok(())
}

/// Whether a migration failed for want of a connection (worth retrying).
fn unreachable(error: &Error) -> bool {
    use sqlx::migrate::MigrateError;
    let database = match error {
        Error::Migrate(MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) => e,
        Error::Database(e) => e,
        _ => return false,
    };
    matches!(
        database,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}

/// What the controller runs with, built once at start.
struct Parts {
    /// The key database, for the anti-entropy pass.
    database: Arc<SqlStore>,
    client: Client,
    reconciler: Reconciler,
    secrets: SecretCache,
    policies: PolicyIndex,
}

/// Waits for the leader Lease, then runs the controller while holding it.
async fn lead_then_run(
    config: &RunConfig,
    parts: Parts,
    metrics: &Metrics,
    health: Arc<Health>,
) -> Result<()> {
    health.standby.store(true, Ordering::SeqCst);
    let manager = LeaseManagerBuilder::new(parts.client.clone(), &config.lease_name)
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
        ran = run_controller(config, parts, health) => ran,
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
pub async fn shutdown_signal() {
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

/// Whether status shows the ApiKey holding a key.
fn holds_key(key: Option<&DeserializeGuard<ApiKey>>) -> bool {
    key.and_then(|k| k.0.as_ref().ok())
        .and_then(|k| k.status.as_ref())
        .is_some_and(|s| s.key_id.is_some())
}

/// Keeps only what the operator reads of an ApiKey: no managedFields, no
/// labels, and of the annotations only keyward's own.
fn slim_apikey(object: &mut DeserializeGuard<ApiKey>) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| k.starts_with("keyward.dev/"));
    }
}

/// Keeps only what finds a changed Secret's owner: name, namespace and the
/// controller reference.
fn slim_secret(secret: &mut PartialObjectMeta<Secret>) {
    let meta = std::mem::take(&mut secret.metadata);
    secret.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        owner_references: meta.owner_references.map(|refs| {
            refs.into_iter()
                .filter(|o| o.controller == Some(true))
                .collect()
        }),
        ..ObjectMeta::default()
    };
}

/// Runs the metadata-only watch of keyward's Secrets in its own task: it fills
/// the Secret cache (its data is never fetched, so no key is cached here) and
/// forwards each changed Secret, slimmed, to the controller, which reconciles its owner.
/// Driving it apart from the controller lets reconciles wait for its first list.
fn watch_secrets(
    client: Client,
    cache: SecretCache,
) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static {
    let owned_secrets = watcher::Config::default()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
        .page_size(LIST_PAGE_SIZE);
    let (sender, receiver) = tokio::sync::mpsc::channel(1024);
    let changes = watcher(Api::<PartialObjectMeta<Secret>>::all(client), owned_secrets)
        .default_backoff()
        .inspect_ok(move |event| {
            let first = !cache.is_synced();
            cache.apply(event);
            if first && cache.is_synced() {
                info!(secrets = cache.len(), "Secret watch synced");
            }
        })
        .modify(slim_secret)
        .touched_objects();
    tokio::spawn(async move {
        let mut changes = std::pin::pin!(changes);
        while let Some(change) = changes.next().await {
            match change {
                Ok(secret) => {
                    if sender.send(Ok(secret)).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "Secret watch error; retrying with backoff"),
            }
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
}

/// Installs the CRD if asked, then runs the controller until a shutdown signal.
async fn run_controller(config: &RunConfig, parts: Parts, health: Arc<Health>) -> Result<()> {
    let Parts {
        database,
        client,
        reconciler,
        secrets,
        policies,
    } = parts;
    if !config.skip_crd_install {
        install_crds(client.clone()).await?;
    }
    let (clock, metrics) = (reconciler.clock.clone(), reconciler.metrics.clone());
    let context = Arc::new(Context::new(
        client.clone(),
        reconciler,
        Some(secrets.clone()),
        Some(policies.clone()),
    ));
    info!("starting the ApiKey controller");
    let (keys, key_writer) = reflector::store();
    policies.attach_keys(keys.clone());
    let (requeue, requeued) = tokio::sync::mpsc::unbounded_channel();
    let policy_changed = Arc::new(tokio::sync::Notify::new());
    let store = context.reconciler.store.clone();
    let anti_entropy = AntiEntropy {
        client: client.clone(),
        store: database.clone(),
        keys: keys.clone(),
        secrets: secrets.clone(),
        requeue: requeue.clone(),
        cluster: context.reconciler.cluster.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
    };
    let anti_entropy =
        tokio::spawn(anti_entropy.follow(health.clone(), config.anti_entropy_interval));
    let usage = tokio::spawn(
        UsageFollower {
            store: database.clone(),
            keys: keys.clone(),
            requeue: requeue.clone(),
            clock: clock.clone(),
            book: context.reconciler.usage.clone(),
            metrics: metrics.clone(),
            retention: config.usage_retention,
            scan_interval: config.usage_scan_interval,
            policies: policies.clone(),
        }
        .follow(),
    );
    let policy_watches = [
        policy_watch::watch_policies(
            client.clone(),
            policies.clone(),
            requeue.clone(),
            policy_changed.clone(),
        ),
        policy_watch::watch_namespaces(
            client.clone(),
            policies.clone(),
            requeue.clone(),
            policy_changed.clone(),
        ),
        tokio::spawn(policy_watch::maintain_status(
            client.clone(),
            policies.clone(),
            store,
            policy_changed.clone(),
            clock,
            metrics,
        )),
    ];
    let requeued = futures::stream::unfold(requeued, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let queue = context.clone();
    let seen = context.clone();
    let known = keys.clone();
    let before = keys.clone();
    let (waiting_index, waiting_requeue) = (policies.clone(), requeue.clone());
    let key_changes = watcher(
        Api::<WireApiKey>::all(client.clone()),
        watcher::Config::default().page_size(LIST_PAGE_SIZE),
    )
    .map_ok(WireApiKey::guard_event)
    .default_backoff()
    .modify(slim_apikey)
    .inspect_ok(move |event| {
        // An ApiKey that lost its key (a policy revoked it) frees its place
        // under maxKeysPerNamespace: compared with the cache before it moves.
        if let watcher::Event::Apply(key) = event
            && holds_key(before.get(&reflector::ObjectRef::from_obj(key)).as_deref())
            && !holds_key(Some(key))
        {
            let namespace = key.namespace().unwrap_or_default();
            policy_watch::requeue_waiting(&waiting_index, &waiting_requeue, &namespace);
        }
    })
    .reflect(key_writer)
    .inspect_ok(move |event| {
        // Policy status follows ApiKey changes (debounced by its writer).
        policy_changed.notify_one();
        match event {
            watcher::Event::Delete(key) => {
                let namespace = key.namespace().unwrap_or_default();
                seen.forget(&key.uid().unwrap_or_default(), &namespace, &key.name_any());
                policy_watch::requeue_waiting(&policies, &requeue, &namespace);
            }
            watcher::Event::InitDone => seen.keep_only(&known),
            _ => {}
        }
    })
    .applied_objects()
    .inspect_ok(move |key| queue.mark_queued(key.meta().namespace.as_deref(), &key.name_any()));
    let queue = context.clone();
    let secret_changes = watch_secrets(client, secrets.clone()).inspect_ok(move |secret| {
        let owner = secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        if let Some(owner) = owner {
            queue.mark_queued(secret.metadata.namespace.as_deref(), &owner.name);
        }
    });
    let controller = Controller::for_stream(key_changes, keys.clone())
        .owns_stream(secret_changes)
        .reconcile_on(requeued)
        .with_config(ControllerConfig::default().concurrency(config.max_concurrent_reconciles))
        .shutdown_on_signal();
    tokio::spawn(async move {
        // Re-polled each second: a second waiter on the store's readiness is not
        // always woken when the controller's own waiter takes the value.
        loop {
            let ready = tokio::time::timeout(Duration::from_secs(1), keys.wait_until_ready());
            match ready.await {
                Ok(Ok(())) if secrets.is_synced() => {
                    health.watches_synced.store(true, Ordering::SeqCst);
                    info!("ApiKey watch synced");
                    return;
                }
                Ok(Ok(())) => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });
    controller
        .run(reconcile_object, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller event");
            }
        })
        .await;
    for task in policy_watches.into_iter().chain([usage, anti_entropy]) {
        task.abort();
    }
    info!("stopped");
    Ok(())
}

/// Annotation on the installed CRD: the SHA-256 of the CRD this binary applied.
const CRD_HASH_ANNOTATION: &str = "keyward.dev/crd-sha256";

/// Applies keyward's CRDs with the `keyward` field manager and waits until they
/// are established. A CRD this same binary already applied is left alone, so a
/// restart makes no write.
async fn install_crds(client: Client) -> Result<()> {
    for crd in crate::crd::all_crds() {
        install_crd(client.clone(), crd).await?;
    }
    Ok(())
}

async fn install_crd(client: Client, mut crd: CustomResourceDefinition) -> Result<()> {
    let name = crd.name_any();
    let bytes = serde_json::to_vec(&crd).map_err(|e| Error::Serialize(e.to_string()))?;
    let hash = crate::key::KeyHash::of(&bytes).as_str().to_owned();
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let installed = api.get_opt(&name).await?;
    let current = installed.as_ref().is_some_and(|c| {
        c.annotations().get(CRD_HASH_ANNOTATION) == Some(&hash)
            && conditions::is_crd_established().matches_object(Some(c))
    });
    if current {
        info!(crd = name, "CRD already installed");
        return Ok(());
    }
    crd.annotations_mut()
        .insert(CRD_HASH_ANNOTATION.to_owned(), hash);
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
