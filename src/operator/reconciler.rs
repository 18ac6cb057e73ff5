//! The I/O shell: reads the database and the Secret, asks the core what to do,
//! and carries the steps out in a crash-safe order. The Kubernetes side sits
//! behind [`Cluster`] so tests can run it in memory and inject faults.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use json_patch::{PatchOperation, RemoveOperation, TestOperation, jsonptr::PointerBuf};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::{ObjectReference, Secret},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    clock::Clock,
    crd::{
        ApiKey, ApiKeyStatus, FIELD_MANAGER, KEY_ID_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
        POLICY_COMPLIANT, PREVIOUS_KEY_IN_USE, REVOKE_PREVIOUS_ANNOTATION, ROTATE_ANNOTATION,
        RolloutKind, RolloutTarget, SECRET_DATA_KEY,
    },
    key::{KeyFactory, KeyHash, wipe_secret},
    operator::core::{
        self, Decision, Observation, Outcome, Policy, SecretView, StatusInput, Step, UsageView,
    },
    operator::secret_cache::{SecretCache, SecretFacts},
    policy::{Activity, Governance, Verdict, ViolationAction},
    store::{IssueReason, KeyMetadata, KeyRecord, KeySet, KeyState, KeyStore, RevokeReason},
    telemetry::{Metrics, NamespaceLabel, timed},
    usage::{
        follow::UsageBook,
        summary::{RecentUse, revoked_key_report},
    },
};

/// How often a settled ApiKey is looked at again without any watch event.
pub const RESYNC: Duration = Duration::from_secs(3600);
/// How often an ApiKey blocked by a foreign Secret looks again: the Secret watch
/// sees only keyward's own Secrets, so the foreign one going away sends no event.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(30);

/// What the watch cache knows about a Secret (keyward-labelled Secrets only, metadata only).
#[derive(Clone, Debug)]
pub enum CachedSecret {
    /// No synced cache: the Secret must be read from the API server.
    Unavailable,
    /// The cache has no keyward Secret by that name (a foreign one may still exist).
    Absent,
    /// What the cache knows of it.
    Present(SecretFacts),
}

/// The Kubernetes calls the shell makes. Writes are server-side applies with the
/// `keyward` field manager, a create-only POST for a new Secret, a delete with a
/// uid precondition, or a JSON patch guarded by `test` operations.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// The Secret's metadata from the watch cache, without a request.
    fn cached_secret(&self, namespace: &str, name: &str) -> CachedSecret;
    /// GETs a Secret, data included; `None` when it does not exist.
    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>>;
    /// Creates a Secret that must not exist yet (`SecretWrite` with code 409 if it
    /// does); returns its resourceVersion.
    async fn create_secret(&self, secret: &Secret) -> Result<Option<String>>;
    /// Applies a Secret. A `metadata.resourceVersion` in it is a precondition.
    /// Returns the new resourceVersion.
    async fn apply_secret(&self, secret: &Secret) -> Result<Option<String>>;
    /// Deletes a Secret only if its uid is still `uid`; a missing Secret is fine.
    async fn delete_secret(&self, namespace: &str, name: &str, uid: &str) -> Result<()>;
    /// Applies the status subresource; returns the ApiKey's new resourceVersion.
    async fn apply_status(&self, key: &ApiKey, status: &ApiKeyStatus) -> Result<Option<String>>;
    /// Removes `keyward.dev/revoke-previous` if it still reads `value` and
    /// `keyward.dev/rotate` still reads `rotation_request`; otherwise does nothing.
    async fn consume_revoke_previous(
        &self,
        key: &ApiKey,
        rotation_request: &str,
        value: &str,
    ) -> Result<()>;
    /// Publishes an Event about an object (an ApiKey, or an object stored as one).
    async fn publish(&self, object: &ObjectReference, event: Event) -> Result<()>;
    /// The `keyward.dev/key-id` annotation on a workload's pod template;
    /// `None` when the workload does not exist.
    async fn rollout_key_id(
        &self,
        namespace: &str,
        target: &RolloutTarget,
    ) -> Result<Option<Option<String>>>;
    /// Sets that annotation to `key_id`, which rolls the workload's pods.
    async fn restart(&self, namespace: &str, target: &RolloutTarget, key_id: &str) -> Result<()>;
}

/// [`Cluster`] over a real API server.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
    reporter: Reporter,
    secrets: Option<SecretCache>,
    metrics: Arc<Metrics>,
}

impl KubeCluster {
    /// Wraps a client; Events are reported as `keyward` from `instance`. Without a
    /// `secrets` cache every Secret is read from the API server.
    pub fn new(
        client: Client,
        instance: Option<String>,
        secrets: Option<SecretCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: "keyward".into(),
            instance,
        };
        Self {
            client,
            reporter,
            secrets,
            metrics,
        }
    }

    /// Runs one API call and records its latency under `operation`.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = kube::Result<T>>,
    ) -> kube::Result<T> {
        timed(&self.metrics.kube_duration, operation, call).await
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn api_keys(&self, key: &ApiKey) -> Api<ApiKey> {
        Api::namespaced(self.client.clone(), &key.namespace().unwrap_or_default())
    }
}

/// A Secret write error that keeps only the code and reason: the API server's
/// message could quote the request body, which holds the key.
fn secret_write_error(namespace: String, name: String, error: kube::Error) -> Error {
    let (code, reason) = match error {
        kube::Error::Api(status) => (status.code, status.reason),
        other => (0, error_kind(&other)),
    };
    Error::SecretWrite {
        namespace,
        name,
        code,
        reason,
    }
}

#[async_trait]
impl Cluster for KubeCluster {
    fn cached_secret(&self, namespace: &str, name: &str) -> CachedSecret {
        match self.secrets.as_ref().and_then(|c| c.get(namespace, name)) {
            None => CachedSecret::Unavailable,
            Some(None) => CachedSecret::Absent,
            Some(Some(facts)) => CachedSecret::Present(facts),
        }
    }

    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>> {
        Ok(self
            .timed("get_secret", self.secrets(namespace).get_opt(name))
            .await?)
    }

    async fn create_secret(&self, secret: &Secret) -> Result<Option<String>> {
        let namespace = secret.namespace().unwrap_or_default();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        let api = self.secrets(&namespace);
        match self
            .timed("create_secret", api.create(&params, secret))
            .await
        {
            Ok(created) => Ok(created.metadata.resource_version),
            Err(e) => Err(secret_write_error(namespace, secret.name_any(), e)),
        }
    }

    async fn apply_secret(&self, secret: &Secret) -> Result<Option<String>> {
        let namespace = secret.namespace().unwrap_or_default();
        let name = secret.name_any();
        let api = self.secrets(&namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match self
            .timed(
                "apply_secret",
                api.patch(&name, &params, &Patch::Apply(secret)),
            )
            .await
        {
            Ok(applied) => Ok(applied.metadata.resource_version),
            Err(e) => Err(secret_write_error(namespace, name, e)),
        }
    }

    async fn delete_secret(&self, namespace: &str, name: &str, uid: &str) -> Result<()> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let api = self.secrets(namespace);
        match self.timed("delete_secret", api.delete(name, &params)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn apply_status(&self, key: &ApiKey, status: &ApiKeyStatus) -> Result<Option<String>> {
        let patch = serde_json::json!({
            "apiVersion": ApiKey::api_version(&()),
            "kind": ApiKey::kind(&()),
            "status": status,
        });
        let api = self.api_keys(key);
        let name = key.name_any();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = self
            .timed(
                "apply_status",
                api.patch_status(&name, &params, &Patch::Apply(patch)),
            )
            .await?;
        Ok(applied.metadata.resource_version)
    }

    async fn consume_revoke_previous(
        &self,
        key: &ApiKey,
        rotation_request: &str,
        value: &str,
    ) -> Result<()> {
        let pointer =
            |annotation: &str| PointerBuf::from_tokens(["metadata", "annotations", annotation]);
        let patch = json_patch::Patch(vec![
            PatchOperation::Test(TestOperation {
                path: pointer(ROTATE_ANNOTATION),
                value: rotation_request.into(),
            }),
            PatchOperation::Test(TestOperation {
                path: pointer(REVOKE_PREVIOUS_ANNOTATION),
                value: value.into(),
            }),
            PatchOperation::Remove(RemoveOperation {
                path: pointer(REVOKE_PREVIOUS_ANNOTATION),
            }),
        ]);
        let api = self.api_keys(key);
        let name = key.name_any();
        let params = PatchParams::default();
        match self
            .timed(
                "consume_revoke_previous",
                api.patch(&name, &params, &Patch::Json::<()>(patch)),
            )
            .await
        {
            Ok(_) => Ok(()),
            // A failed `test` (the annotations changed meanwhile) or a deleted
            // ApiKey: the watch brings the newer object, and it decides again.
            Err(kube::Error::Api(status))
                if status.is_not_found() || matches!(status.code, 409 | 422) =>
            {
                debug!(
                    code = status.code,
                    "revoke-previous changed meanwhile; left alone"
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn publish(&self, object: &ObjectReference, event: Event) -> Result<()> {
        // A fresh Recorder each time: a shared one folds Events with the same
        // reason into a series that keeps the first note, and every keyward
        // Event (published only on transitions) carries a different key id.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        Ok(self
            .timed("publish_event", recorder.publish(&event, object))
            .await?)
    }

    async fn rollout_key_id(
        &self,
        namespace: &str,
        target: &RolloutTarget,
    ) -> Result<Option<Option<String>>> {
        let client = self.client.clone();
        let template = match target.kind {
            RolloutKind::Deployment => Api::<Deployment>::namespaced(client, namespace)
                .get_opt(&target.name)
                .await?
                .map(|w| w.spec.map(|s| s.template)),
            RolloutKind::StatefulSet => Api::<StatefulSet>::namespaced(client, namespace)
                .get_opt(&target.name)
                .await?
                .map(|w| w.spec.map(|s| s.template)),
            RolloutKind::DaemonSet => Api::<DaemonSet>::namespaced(client, namespace)
                .get_opt(&target.name)
                .await?
                .map(|w| w.spec.map(|s| s.template)),
        };
        Ok(template.map(|template| {
            template
                .and_then(|t| t.metadata)
                .and_then(|m| m.annotations)
                .and_then(|mut a| a.remove(KEY_ID_ANNOTATION))
        }))
    }

    async fn restart(&self, namespace: &str, target: &RolloutTarget, key_id: &str) -> Result<()> {
        let patch = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": format!("{:?}", target.kind),
            "metadata": {"name": target.name},
            "spec": {"template": {"metadata": {"annotations": {KEY_ID_ANNOTATION: key_id}}}},
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let client = self.client.clone();
        let name = target.name.as_str();
        match target.kind {
            RolloutKind::Deployment => Api::<Deployment>::namespaced(client, namespace)
                .patch(name, &params, &Patch::Apply(patch))
                .await
                .map(drop)?,
            RolloutKind::StatefulSet => Api::<StatefulSet>::namespaced(client, namespace)
                .patch(name, &params, &Patch::Apply(patch))
                .await
                .map(drop)?,
            RolloutKind::DaemonSet => Api::<DaemonSet>::namespaced(client, namespace)
                .patch(name, &params, &Patch::Apply(patch))
                .await
                .map(drop)?,
        }
        Ok(())
    }
}

/// A short, body-free description of a transport error.
fn error_kind(error: &kube::Error) -> String {
    match error {
        kube::Error::HyperError(_) | kube::Error::Service(_) => "transport error".into(),
        _ => "client error".into(),
    }
}

/// The facts about an ApiKey that every step needs.
struct Target<'a> {
    key: &'a ApiKey,
    /// Names the ApiKey in Events.
    reference: ObjectReference,
    namespace: String,
    name: String,
    uid: String,
    secret_name: String,
    /// The freshest status known: the object's, or the one this process last
    /// wrote if the watch cache has not caught up with that write yet.
    previous: Option<ApiKeyStatus>,
}

impl<'a> Target<'a> {
    fn of(key: &'a ApiKey, memo: &StatusMemo) -> Result<Self> {
        let uid = key.uid().ok_or(Error::MissingMetadata("uid"))?;
        Ok(Self {
            key,
            reference: key.object_ref(&()),
            namespace: key.namespace().ok_or(Error::MissingMetadata("namespace"))?,
            name: key
                .metadata
                .name
                .clone()
                .ok_or(Error::MissingMetadata("name"))?,
            secret_name: key
                .target_secret_name()
                .ok_or(Error::MissingMetadata("name"))?
                .to_owned(),
            previous: memo.previous(key, &uid),
            uid,
        })
    }

    /// The key id and Secret resourceVersion the last status recorded, if both.
    fn known_secret(&self) -> Option<(&str, &str)> {
        let status = self.previous.as_ref()?;
        Some((
            status.key_id.as_deref()?,
            status.secret_resource_version.as_deref()?,
        ))
    }

    /// Whether the last status reported a foreign Secret under the target name.
    fn was_conflicted(&self) -> bool {
        self.previous
            .as_ref()
            .and_then(ApiKeyStatus::ready_condition)
            .is_some_and(|c| c.reason == "SecretConflict")
    }
}

/// The status this process last wrote for each ApiKey uid, with the
/// resourceVersion that write produced. The watch cache lags behind our own
/// writes; comparing against it alone would repeat a write that changes nothing.
/// An entry lives only until the cache catches up, or the ApiKey is deleted.
#[derive(Debug, Default)]
pub struct StatusMemo(Mutex<HashMap<String, (u64, ApiKeyStatus)>>);

impl StatusMemo {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, ApiKeyStatus)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The status to compare with: ours while the object predates our last write.
    fn previous(&self, key: &ApiKey, uid: &str) -> Option<ApiKeyStatus> {
        let seen = key.resource_version().and_then(|v| v.parse::<u64>().ok());
        let mut entries = self.entries();
        match (entries.get(uid), seen) {
            (Some((written, status)), Some(seen)) if seen < *written => Some(status.clone()),
            _ => {
                entries.remove(uid);
                key.status.clone()
            }
        }
    }

    fn record(&self, uid: &str, resource_version: Option<String>, status: ApiKeyStatus) {
        if let Some(written) = resource_version.and_then(|v| v.parse::<u64>().ok()) {
            self.entries().insert(uid.to_owned(), (written, status));
        }
    }

    /// Drops what is known about a deleted ApiKey.
    pub fn forget(&self, uid: &str) {
        self.entries().remove(uid);
    }

    /// Keeps only the ApiKeys with these uids.
    pub fn retain(&self, uids: &std::collections::HashSet<String>) {
        self.entries().retain(|uid, _| uids.contains(uid));
    }
}

/// The target Secret reduced to what decisions need; its data is hashed and wiped.
struct ObservedSecret {
    view: SecretView,
    uid: Option<String>,
    resource_version: Option<String>,
}

/// How a reconcile ended, as far as status is concerned.
struct Report<'a> {
    current: Option<&'a KeyRecord>,
    records: &'a [KeyRecord],
    issued: Option<i64>,
    last_used: Option<jiff::Timestamp>,
    policy: Option<&'a Policy>,
    secret_version: Option<&'a str>,
    outcome: Outcome,
    verdict: Option<&'a Verdict>,
    /// Whether to bring usage, `PreviousKeyInUse` and the revoked-key report
    /// up to date (only a reconcile that read the key's records).
    usage: bool,
}

impl Report<'_> {
    /// A report that knows nothing but the outcome.
    fn only(outcome: Outcome) -> Self {
        Report {
            current: None,
            records: &[],
            issued: None,
            last_used: None,
            policy: None,
            secret_version: None,
            outcome,
            verdict: None,
            usage: false,
        }
    }
}

/// What `issue` achieved.
enum Issued {
    /// The key is active in its Secret, which now has this resourceVersion.
    Key(Box<KeyRecord>, Option<String>),
    /// A foreign Secret took the name first; the new key was revoked unused.
    SecretTaken,
}

/// Spaces out key issuance so a fleet of keys due at the same moment does not
/// hit the API server and the database at once (`--max-issues-per-second`).
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    /// At most `per_second` acquisitions per second, evenly spaced; 0 means no limit.
    pub fn per_second(per_second: f64) -> Self {
        let interval = if per_second > 0.0 {
            Duration::from_secs_f64(1.0 / per_second)
        } else {
            Duration::ZERO
        };
        Self {
            interval,
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for the next slot.
    pub async fn acquire(&self) {
        if self.interval.is_zero() {
            return;
        }
        let mut next = self.next.lock().await;
        let now = tokio::time::Instant::now();
        if *next > now {
            tokio::time::sleep_until(*next).await;
        }
        *next = (*next).max(now) + self.interval;
    }
}

/// Carries out reconciles for ApiKeys. It holds no state but a cache of its own
/// status writes, so a new one after a crash behaves exactly like the old one.
#[derive(Clone)]
pub struct Reconciler {
    /// The Kubernetes side.
    pub cluster: Arc<dyn Cluster>,
    /// The key database.
    pub store: Arc<dyn KeyStore>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Key material source.
    pub keys: KeyFactory,
    /// Paces key issuance.
    pub issue_limiter: Arc<RateLimiter>,
    /// Counters for issued and rotated keys and the next-rotation gauge.
    pub metrics: Arc<Metrics>,
    /// Statuses written but maybe not yet seen by the watch cache.
    pub status_memo: Arc<StatusMemo>,
    /// The ApiKeyPolicies every key is checked against before anything is issued.
    pub governance: Arc<dyn Governance>,
    /// Serializes first issues within a namespace under `maxKeysPerNamespace`.
    pub issue_turns: Arc<IssueTurns>,
    /// What the leader's usage scans learned.
    pub usage: Arc<UsageBook>,
}

/// One turn at a time per namespace for the reconciles that may give an ApiKey
/// its first key while a policy limits the namespace's keys: counting the
/// holders in the key database and recording the new pending key happen in one
/// turn, so concurrent reconciles never issue past the limit. Shared by every
/// reconcile of one operator process (only the leader reconciles).
#[derive(Debug, Default)]
pub struct IssueTurns {
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl IssueTurns {
    /// Waits for `namespace`'s turn; it ends when the guard is dropped.
    pub async fn take(&self, namespace: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            // Forget the namespaces nobody waits on, so the map stays small.
            turns.retain(|_, turn| Arc::strong_count(turn) > 1);
            turns.entry(namespace.to_owned()).or_default().clone()
        };
        turn.lock_owned().await
    }
}

impl Reconciler {
    /// Brings an ApiKey that is not being deleted to its desired state.
    #[tracing::instrument(skip_all, fields(apikey = %key.name_any(), namespace = key.namespace().unwrap_or_default()))]
    pub async fn apply(&self, key: &ApiKey) -> Result<Action> {
        let target = Target::of(key, &self.status_memo)?;
        let policy = match Policy::from_spec(&key.spec, key.annotations()) {
            Ok(policy) => policy,
            Err(message) => {
                warn!(%message, "invalid spec");
                let outcome = Outcome::InvalidSpec { message };
                self.finish(&target, Report::only(outcome)).await?;
                return Ok(Action::requeue(RESYNC));
            }
        };
        let desired = KeyMetadata {
            owner: key.spec.owner.clone(),
            team: key.spec.team.clone(),
            scopes: key.spec.scopes.clone(),
        };
        let now = self.clock.now();
        let set = self.store.load(&target.uid).await?;
        // Under maxKeysPerNamespace the key database says who holds a place; an
        // ApiKey without a live key waits for the namespace's turn first, and
        // keeps it until its new key is recorded.
        let (_turn, holders) = if self.governance.limits(&target.namespace) {
            let turn = if set.live.is_empty() {
                Some(self.issue_turns.take(&target.namespace).await)
            } else {
                None
            };
            (turn, Some(self.store.holders(&target.namespace).await?))
        } else {
            (None, None)
        };
        let activity = Activity {
            created: key
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now, |t| t.0),
            last_used: set.last_used_at,
            recorded_since: self.usage.recorded_since(now),
        };
        let verdict = self
            .governance
            .check(key, holders.as_ref(), Some(activity), now)?;
        let forbidden = (!verdict.allowed()).then(|| verdict.action().unwrap_or_default());
        if forbidden.is_some() {
            warn!(
                violations = verdict.message(),
                "an ApiKeyPolicy forbids this key"
            );
        }
        let secret = self.observe_secret(&target, &set.live).await?;
        let decision = core::decide(&Observation {
            desired: &desired,
            policy: &policy,
            records: &set.live,
            secret: &secret.view,
            now,
            forbidden,
        });
        debug!(?decision, "decided");
        let (steps, held, requeue_after) = match decision {
            Decision::SecretConflict => {
                return self.conflict(&target, set.issued, &verdict).await;
            }
            Decision::Converge {
                steps,
                held,
                requeue_after,
            } => (steps, held, requeue_after),
        };

        let mut records = set.live;
        let mut issued = set.issued;
        let mut current_id = held;
        let mut secret_version = secret.resource_version.clone();
        for step in steps {
            match step {
                Step::Issue { reason, expires_at } => {
                    self.issue_limiter.acquire().await;
                    let record = match self
                        .issue(&target, &desired, &policy, &secret, reason, expires_at)
                        .await?
                    {
                        Issued::Key(record, version) => {
                            secret_version = version;
                            *record
                        }
                        Issued::SecretTaken => {
                            return self.conflict(&target, issued, &verdict).await;
                        }
                    };
                    issued += 1;
                    current_id = Some(record.key_id.clone());
                    records.push(record);
                }
                Step::Activate { key_id, expires_at } => {
                    self.store.activate(&key_id, now, expires_at).await?;
                    issued += 1;
                    if let Some(r) = find(&mut records, &key_id) {
                        r.state = KeyState::Active;
                        r.activated_at = Some(now);
                        r.expires_at = expires_at;
                        self.metrics.count_issued(r.issue_reason);
                    }
                    info!(key_id, "activated a key its Secret already held");
                    let note = format!("key {key_id} is active in Secret {}", target.secret_name);
                    self.notify(&target.reference, EventType::Normal, "Issued", note)
                        .await;
                }
                Step::Retire { key_id, expires_at } => {
                    self.store.retire(&key_id, expires_at, now).await?;
                    if let Some(r) = find(&mut records, &key_id) {
                        r.state = KeyState::Retiring;
                        r.expires_at = Some(expires_at);
                    }
                    info!(key_id, %expires_at, "previous key retiring");
                }
                Step::ShortenExpiry { key_id, expires_at } => {
                    self.store.shorten_expiry(&key_id, expires_at, now).await?;
                    if let Some(r) = find(&mut records, &key_id) {
                        r.expires_at = Some(expires_at);
                    }
                    info!(key_id, %expires_at, "brought the key's expiry forward");
                }
                Step::UpdateMetadata { key_id } => {
                    self.store.update_metadata(&key_id, &desired, now).await?;
                    if let Some(r) = find(&mut records, &key_id) {
                        r.metadata = desired.clone();
                    }
                    info!(key_id, "updated owner, team and scopes in place");
                }
                Step::Revoke { key_id, reason } => {
                    self.store.revoke(&key_id, reason, now).await?;
                    records.retain(|r| r.key_id != key_id);
                    info!(key_id, reason = reason.as_str(), "revoked a key");
                    if reason != RevokeReason::Abandoned {
                        let note = format!("revoked key {key_id} ({})", reason.as_str());
                        self.notify(&target.reference, EventType::Normal, "Revoked", note)
                            .await;
                    }
                }
                Step::ConsumeRevokePrevious {
                    rotation_request,
                    value,
                } => {
                    self.cluster
                        .consume_revoke_previous(key, &rotation_request, &value)
                        .await?;
                    info!(
                        rotation_request,
                        "emergency rotation done; removed {REVOKE_PREVIOUS_ANNOTATION}"
                    );
                }
            }
        }

        let current = records
            .iter()
            .find(|r| Some(&r.key_id) == current_id.as_ref());
        if let Some(current) = current
            && current.issue_reason != IssueReason::Initial
        {
            self.roll_out(&target, current).await?;
        }
        let outcome = match current.and_then(|c| c.expires_at) {
            _ if current.is_none() && forbidden.is_some() => Outcome::PolicyViolation {
                message: format!(
                    "{}. No key is issued while a policy forbids it: change the ApiKey or the policy",
                    verdict.message()
                ),
            },
            Some(expires_at) if expires_at <= now => Outcome::KeyExpired,
            _ => Outcome::Ready,
        };
        self.finish(
            &target,
            Report {
                current,
                records: &records,
                issued: Some(issued),
                last_used: set.last_used_at,
                policy: Some(&policy),
                secret_version: secret_version.as_deref(),
                outcome,
                verdict: Some(&verdict),
                usage: true,
            },
        )
        .await?;
        let recheck = verdict.recheck_at.map(|at| at.duration_since(now));
        let requeue_after = [requeue_after, recheck].into_iter().flatten().min();
        Ok(Action::requeue(
            requeue_after
                .and_then(|d| d.unsigned_abs().checked_add(Duration::from_secs(1)))
                .map_or(RESYNC, |d| d.min(RESYNC)),
        ))
    }

    /// Reports a foreign Secret under the target name and looks again later: the
    /// Secret watch sees only keyward's Secrets, so its removal sends no event.
    async fn conflict(
        &self,
        target: &Target<'_>,
        issued: i64,
        verdict: &Verdict,
    ) -> Result<Action> {
        let outcome = Outcome::SecretConflict {
            secret_name: target.secret_name.clone(),
        };
        let report = Report {
            issued: Some(issued),
            verdict: Some(verdict),
            ..Report::only(outcome)
        };
        self.finish(target, report).await?;
        Ok(Action::requeue(CONFLICT_RECHECK))
    }

    /// Revokes every key of a deleted ApiKey, then deletes its Secret. Errors keep the finalizer.
    #[tracing::instrument(skip_all, fields(apikey = %key.name_any(), namespace = key.namespace().unwrap_or_default()))]
    pub async fn cleanup(&self, key: &ApiKey) -> Result<Action> {
        let target = Target::of(key, &self.status_memo)?;
        let set = self.revoke_all(&target.reference, &target.uid).await?;
        let secret = self.observe_secret(&target, &set.live).await?;
        if let (SecretView::Owned { .. }, Some(uid)) = (&secret.view, &secret.uid) {
            self.cluster
                .delete_secret(&target.namespace, &target.secret_name, uid)
                .await?;
            info!(secret = target.secret_name, "deleted the key's Secret");
        }
        self.metrics
            .set_next_rotation(&target.namespace, &target.name, None);
        Ok(Action::await_change())
    }

    /// Revokes every live key of the ApiKey with this uid (it is being deleted)
    /// and returns the records as they were.
    pub async fn revoke_all(&self, object: &ObjectReference, uid: &str) -> Result<KeySet> {
        let set = self.store.load(uid).await?;
        let now = self.clock.now();
        for record in &set.live {
            self.store
                .revoke(&record.key_id, RevokeReason::Deleted, now)
                .await?;
            info!(key_id = record.key_id, "revoked a key of a deleted ApiKey");
        }
        if !set.live.is_empty() {
            let ids: Vec<&str> = set.live.iter().map(|r| r.key_id.as_str()).collect();
            let note = format!(
                "revoked {} because the ApiKey is being deleted",
                ids.join(", ")
            );
            self.notify(object, EventType::Normal, "Revoked", note)
                .await;
        }
        Ok(set)
    }

    /// Shows a failed reconcile in status and, on a change of reason, as a Warning Event.
    pub async fn report_failure(&self, key: &ApiKey, error: &Error) {
        let Ok(target) = Target::of(key, &self.status_memo) else {
            return;
        };
        let message = if key.metadata.deletion_timestamp.is_some() {
            format!("the ApiKey is kept until its keys are revoked: {error}")
        } else {
            error.to_string()
        };
        let outcome = Outcome::Failed {
            reason: error.reason().to_owned(),
            message,
        };
        if let Err(e) = self.finish(&target, Report::only(outcome)).await {
            warn!(error = %e, "could not record the failure in status");
        }
    }

    /// Restarts each rollout target whose pods do not yet run with the current key:
    /// once per key, because the pod-template annotation records the key id.
    async fn roll_out(&self, target: &Target<'_>, current: &KeyRecord) -> Result<()> {
        let targets = target.key.spec.rollout.iter().flat_map(|r| &r.targets);
        for workload in targets {
            match self
                .cluster
                .rollout_key_id(&target.namespace, workload)
                .await?
            {
                None => {
                    warn!(kind = ?workload.kind, name = workload.name, "rollout target not found")
                }
                Some(seen) if seen.as_deref() == Some(current.key_id.as_str()) => {}
                Some(_) => {
                    self.cluster
                        .restart(&target.namespace, workload, &current.key_id)
                        .await?;
                    info!(kind = ?workload.kind, name = workload.name, key_id = current.key_id, "restarted a rollout target");
                    let note = format!(
                        "restarted {:?} {} to pick up key {}",
                        workload.kind, workload.name, current.key_id
                    );
                    self.notify(&target.reference, EventType::Normal, "RolledOut", note)
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Writes status if it changed, with a Warning Event when Ready turns to a new failure reason.
    async fn finish(&self, target: &Target<'_>, report: Report<'_>) -> Result<()> {
        let key = target.key;
        let previous = target.previous.as_ref();
        let now = self.clock.now();
        let pending = report
            .usage
            .then(|| self.usage.pending(&target.uid))
            .flatten();
        let recent = report
            .usage
            .then(|| self.usage.recent(&target.uid))
            .flatten();
        let usage = report.usage.then_some(UsageView {
            pending: pending.as_ref(),
            recent: recent.as_deref(),
        });
        let status = core::status_for(&StatusInput {
            previous,
            generation: key.metadata.generation,
            secret_name: &target.secret_name,
            current: report.current,
            records: report.records,
            issued: report.issued,
            last_used: report.last_used,
            policy: report.policy,
            secret_version: report.secret_version,
            outcome: &report.outcome,
            verdict: report.verdict,
            usage,
            now,
        });
        if report.policy.is_some() {
            let next = status.next_rotation_at.as_ref().map(|t| t.0);
            self.metrics
                .set_next_rotation(&target.namespace, &target.name, next);
        }
        if previous == Some(&status) {
            return Ok(());
        }
        let previous_reason = previous
            .and_then(ApiKeyStatus::ready_condition)
            .map(|c| c.reason.as_str());
        let ready = status.ready_condition().expect("status_for sets Ready");
        if ready.status == "False" && previous_reason != Some(ready.reason.as_str()) {
            self.notify(
                &target.reference,
                EventType::Warning,
                &ready.reason,
                ready.message.clone(),
            )
            .await;
        }
        // A key kept working while a policy forbids it is flagged once per change.
        let compliance = |s: Option<&ApiKeyStatus>| {
            s.and_then(|s| s.conditions.iter().find(|c| c.type_ == POLICY_COMPLIANT))
                .map(|c| (c.status.clone(), c.message.clone()))
        };
        if let Some((state, message)) = compliance(Some(&status))
            && state == "False"
            && ready.status == "True"
            && compliance(previous) != Some((state, message.clone()))
        {
            let next = match report.verdict.and_then(Verdict::action) {
                Some(ViolationAction::RefuseRotation) => {
                    "The key keeps working until its next rotation is due; then it is revoked, not rotated"
                }
                _ => "The key keeps working until it expires; no new key is issued for it",
            };
            let note = format!("{message}. {next}");
            self.notify(
                &target.reference,
                EventType::Warning,
                "PolicyViolation",
                note,
            )
            .await;
        }
        self.report_key_use(target, previous, &status, recent.as_deref(), now)
            .await;
        let version = self.cluster.apply_status(key, &status).await?;
        self.status_memo.record(&target.uid, version, status);
        Ok(())
    }

    /// Warns when clients still present a previous key (once, as the
    /// condition turns True) or a revoked one (as status records the report).
    async fn report_key_use(
        &self,
        target: &Target<'_>,
        previous: Option<&ApiKeyStatus>,
        status: &ApiKeyStatus,
        recent: Option<&[RecentUse]>,
        now: jiff::Timestamp,
    ) {
        fn in_use(status: Option<&ApiKeyStatus>) -> Option<&Condition> {
            status
                .and_then(|s| s.condition(PREVIOUS_KEY_IN_USE))
                .filter(|c| c.status == "True")
        }
        if let Some(condition) = in_use(Some(status))
            && in_use(previous).is_none()
        {
            self.notify(
                &target.reference,
                EventType::Warning,
                PREVIOUS_KEY_IN_USE,
                condition.message.clone(),
            )
            .await;
        }
        let reported = previous.and_then(|s| s.revoked_key_reported_at.as_ref());
        if status.revoked_key_reported_at.as_ref() != reported
            && let Some(note) =
                recent.and_then(|recent| revoked_key_report(reported.map(|t| t.0), recent, now))
        {
            self.metrics
                .revoked_key_in_use
                .get_or_create(&NamespaceLabel {
                    namespace: target.namespace.clone(),
                })
                .inc();
            self.notify(
                &target.reference,
                EventType::Warning,
                "RevokedKeyInUse",
                note,
            )
            .await;
        }
    }

    /// Issues a key in the crash-safe order: pending record, Secret, active record.
    /// A missing Secret is created with a create-only request, so a Secret someone
    /// else made meanwhile is never merged into.
    async fn issue(
        &self,
        target: &Target<'_>,
        desired: &KeyMetadata,
        policy: &Policy,
        secret: &ObservedSecret,
        reason: IssueReason,
        expires_at: Option<jiff::Timestamp>,
    ) -> Result<Issued> {
        let now = self.clock.now();
        let plain = self.keys.new_key()?;
        let mut record = KeyRecord {
            key_id: self.keys.new_key_id()?,
            key_hash: plain.hash(),
            key_hint: plain.hint(),
            apikey_uid: target.uid.clone(),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            metadata: desired.clone(),
            state: KeyState::Pending,
            created_at: now,
            activated_at: None,
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            issue_reason: reason,
            rotation_request: policy.rotation_request.clone(),
            cluster: self.store.cluster().to_owned(),
        };
        self.store.insert_pending(&record).await?;

        let owner = target
            .key
            .controller_owner_ref(&())
            .ok_or(Error::MissingMetadata("name"))?;
        let mut manifest = Secret {
            metadata: ObjectMeta {
                name: Some(target.secret_name.clone()),
                namespace: Some(target.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    MANAGED_BY_VALUE.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([(
                    KEY_ID_ANNOTATION.to_owned(),
                    record.key_id.clone(),
                )])),
                owner_references: Some(vec![owner]),
                resource_version: secret.resource_version.clone(),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([(
                SECRET_DATA_KEY.to_owned(),
                ByteString(plain.expose().as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        drop(plain);
        let written = if secret.resource_version.is_some() {
            self.cluster.apply_secret(&manifest).await
        } else {
            self.cluster.create_secret(&manifest).await
        };
        wipe_secret(&mut manifest);
        let version = match written {
            Ok(version) => version,
            Err(Error::SecretWrite { code: 409, .. }) => {
                // Nothing was written: the new key never reached a Secret.
                self.store
                    .revoke(&record.key_id, RevokeReason::Abandoned, now)
                    .await?;
                let now_there = self.read_secret(target).await?;
                if now_there.view == SecretView::Foreign {
                    warn!(
                        secret = target.secret_name,
                        "a foreign Secret took the name"
                    );
                    return Ok(Issued::SecretTaken);
                }
                return Err(Error::SecretChanged {
                    namespace: target.namespace.clone(),
                    name: target.secret_name.clone(),
                });
            }
            Err(e) => return Err(e),
        };

        self.store.activate(&record.key_id, now, expires_at).await?;
        record.state = KeyState::Active;
        record.activated_at = Some(now);
        record.expires_at = expires_at;
        self.metrics.count_issued(reason);

        let key_id = &record.key_id;
        let secret_name = &target.secret_name;
        info!(key_id, ?reason, "issued a key");
        let (kind, event_reason, note) = match reason {
            IssueReason::Initial => (
                EventType::Normal,
                "Issued",
                format!("issued key {key_id} into Secret {secret_name}"),
            ),
            IssueReason::SecretDeleted => (
                EventType::Warning,
                "Reissued",
                format!(
                    "Secret {secret_name} was deleted; issued key {key_id} and revoked the previous key"
                ),
            ),
            IssueReason::SecretAltered => (
                EventType::Warning,
                "Reissued",
                format!(
                    "the key in Secret {secret_name} was changed or removed; issued key {key_id} and revoked the previous key"
                ),
            ),
            IssueReason::Scheduled | IssueReason::Requested => (
                EventType::Normal,
                "Rotated",
                format!(
                    "rotated ({}): issued key {key_id} into Secret {secret_name}; the previous key keeps working for {}",
                    reason.as_str(),
                    format_args!("{:#}", policy.grace_period)
                ),
            ),
            IssueReason::Emergency => (
                EventType::Warning,
                "Rotated",
                format!(
                    "emergency rotation: issued key {key_id} into Secret {secret_name} and revoked every previous key"
                ),
            ),
        };
        self.notify(&target.reference, kind, event_reason, note)
            .await;
        Ok(Issued::Key(Box::new(record), version))
    }

    /// The target Secret as the core needs it. A Secret whose cached
    /// resourceVersion is the one the last status recorded still holds that
    /// status's key, so it is not read again; otherwise it is read (GET).
    async fn observe_secret(
        &self,
        target: &Target<'_>,
        live: &[KeyRecord],
    ) -> Result<ObservedSecret> {
        match self
            .cluster
            .cached_secret(&target.namespace, &target.secret_name)
        {
            CachedSecret::Present(facts) => {
                let unchanged = target.known_secret().and_then(|(key_id, version)| {
                    let same = facts.resource_version.as_deref() == Some(version)
                        && facts.controller_uid.as_deref() == Some(target.uid.as_str())
                        && facts.key_id.as_deref() == Some(key_id);
                    same.then(|| live.iter().find(|r| r.key_id == key_id))
                        .flatten()
                });
                if let Some(record) = unchanged {
                    return Ok(ObservedSecret {
                        view: SecretView::Owned {
                            key_hash: Some(record.key_hash.clone()),
                        },
                        uid: facts.uid,
                        resource_version: facts.resource_version,
                    });
                }
            }
            // No keyward Secret by that name, and the status knows of none either:
            // a foreign Secret, if any, makes the create-only write fail.
            CachedSecret::Absent if target.known_secret().is_none() && !target.was_conflicted() => {
                return Ok(ObservedSecret {
                    view: SecretView::Absent,
                    uid: None,
                    resource_version: None,
                });
            }
            _ => {}
        }
        self.read_secret(target).await
    }

    /// GETs the target Secret, hashes its key and wipes the plaintext at once.
    async fn read_secret(&self, target: &Target<'_>) -> Result<ObservedSecret> {
        let Some(mut secret) = self
            .cluster
            .get_secret(&target.namespace, &target.secret_name)
            .await?
        else {
            return Ok(ObservedSecret {
                view: SecretView::Absent,
                uid: None,
                resource_version: None,
            });
        };
        let controller = SecretFacts::of(&secret.metadata).controller_uid;
        let view = if controller.as_deref() == Some(target.uid.as_str()) {
            SecretView::Owned {
                key_hash: secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(SECRET_DATA_KEY))
                    .map(|value| KeyHash::of(&value.0)),
            }
        } else {
            SecretView::Foreign
        };
        wipe_secret(&mut secret);
        Ok(ObservedSecret {
            view,
            uid: secret.metadata.uid,
            resource_version: secret.metadata.resource_version,
        })
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    async fn notify(&self, object: &ObjectReference, kind: EventType, reason: &str, note: String) {
        let event = Event {
            type_: kind,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.cluster.publish(object, event).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// The record with this id, to keep the in-memory copy in step with the database.
fn find<'a>(records: &'a mut [KeyRecord], key_id: &str) -> Option<&'a mut KeyRecord> {
    records.iter_mut().find(|r| r.key_id == key_id)
}
