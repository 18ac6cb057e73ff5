//! The I/O shell: reads the database and the Secret, asks the core what to do,
//! and carries the steps out in a crash-safe order. The Kubernetes side sits
//! behind [`Cluster`] so tests can run it in memory and inject faults.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::Secret,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use tracing::{debug, info, warn};
use zeroize::Zeroize;

use crate::{
    Error, Result,
    clock::Clock,
    core::{self, Decision, Observation, Outcome, Policy, SecretView, StatusInput, Step},
    crd::{
        ApiKey, ApiKeyStatus, FIELD_MANAGER, KEY_ID_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
        RolloutKind, RolloutTarget, SECRET_DATA_KEY,
    },
    key::{KeyFactory, KeyHash},
    store::{IssueReason, KeyMetadata, KeyRecord, KeyState, KeyStore, RevokeReason},
    telemetry::{Metrics, ReasonLabel},
};

/// How often a settled ApiKey is looked at again without any watch event.
pub const RESYNC: Duration = Duration::from_secs(3600);
/// How often an ApiKey blocked by a foreign Secret looks again: the Secret watch
/// sees only keyward's own Secrets, so the foreign one going away sends no event.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(30);

/// The Kubernetes calls the shell makes. Every write is a server-side apply
/// with the `keyward` field manager, or a delete with a uid precondition.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// GETs a Secret, data included; `None` when it does not exist.
    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>>;
    /// Applies a Secret. A `metadata.resourceVersion` in it is a precondition.
    async fn apply_secret(&self, secret: &Secret) -> Result<()>;
    /// Deletes a Secret only if its uid is still `uid`; a missing Secret is fine.
    async fn delete_secret(&self, namespace: &str, name: &str, uid: &str) -> Result<()>;
    /// Applies the status subresource.
    async fn apply_status(&self, key: &ApiKey, status: &ApiKeyStatus) -> Result<()>;
    /// Publishes an Event about the ApiKey.
    async fn publish(&self, key: &ApiKey, event: Event) -> Result<()>;
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
}

impl KubeCluster {
    /// Wraps a client; Events are reported as `keyward` from `instance`.
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "keyward".into(),
            instance,
        };
        Self { client, reporter }
    }
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>> {
        Ok(Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await?)
    }

    async fn apply_secret(&self, secret: &Secret) -> Result<()> {
        let namespace = secret.namespace().unwrap_or_default();
        let name = secret.name_any();
        Api::<Secret>::namespaced(self.client.clone(), &namespace)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(secret),
            )
            .await
            .map(drop)
            .map_err(|e| {
                let (code, reason) = match e {
                    kube::Error::Api(status) => (status.code, status.reason),
                    other => (0, error_kind(&other)),
                };
                Error::SecretWrite {
                    namespace,
                    name,
                    code,
                    reason,
                }
            })
    }

    async fn delete_secret(&self, namespace: &str, name: &str, uid: &str) -> Result<()> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match Api::<Secret>::namespaced(self.client.clone(), namespace)
            .delete(name, &params)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn apply_status(&self, key: &ApiKey, status: &ApiKeyStatus) -> Result<()> {
        let patch = serde_json::json!({
            "apiVersion": ApiKey::api_version(&()),
            "kind": ApiKey::kind(&()),
            "status": status,
        });
        Api::<ApiKey>::namespaced(self.client.clone(), &key.namespace().unwrap_or_default())
            .patch_status(
                &key.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await?;
        Ok(())
    }

    async fn publish(&self, key: &ApiKey, event: Event) -> Result<()> {
        // A fresh Recorder each time: a shared one folds Events with the same
        // reason into a series that keeps the first note, and every keyward
        // Event (published only on transitions) carries a different key id.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        Ok(recorder.publish(&event, &key.object_ref(&())).await?)
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
    namespace: String,
    name: String,
    uid: String,
    secret_name: String,
}

impl<'a> Target<'a> {
    fn of(key: &'a ApiKey) -> Result<Self> {
        Ok(Self {
            key,
            namespace: key.namespace().ok_or(Error::MissingMetadata("namespace"))?,
            name: key
                .metadata
                .name
                .clone()
                .ok_or(Error::MissingMetadata("name"))?,
            uid: key.uid().ok_or(Error::MissingMetadata("uid"))?,
            secret_name: key
                .target_secret_name()
                .ok_or(Error::MissingMetadata("name"))?
                .to_owned(),
        })
    }
}

/// The target Secret reduced to what decisions need; its data is hashed and wiped.
struct ObservedSecret {
    view: SecretView,
    uid: Option<String>,
    resource_version: Option<String>,
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

/// Carries out reconciles for ApiKeys; holds no state of its own, so a new one
/// after a crash behaves exactly like the old one would have.
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
}

impl Reconciler {
    /// Brings an ApiKey that is not being deleted to its desired state.
    #[tracing::instrument(skip_all, fields(apikey = %key.name_any(), namespace = key.namespace().unwrap_or_default()))]
    pub async fn apply(&self, key: &ApiKey) -> Result<Action> {
        let target = Target::of(key)?;
        let policy = match Policy::from_spec(&key.spec, key.annotations()) {
            Ok(policy) => policy,
            Err(message) => {
                warn!(%message, "invalid spec");
                let outcome = Outcome::InvalidSpec { message };
                self.finish(&target, None, &[], None, None, &outcome)
                    .await?;
                return Ok(Action::requeue(RESYNC));
            }
        };
        let desired = KeyMetadata {
            owner: key.spec.owner.clone(),
            team: key.spec.team.clone(),
            scopes: key.spec.scopes.clone(),
        };
        let set = self.store.load(&target.uid).await?;
        let secret = self.observe_secret(&target).await?;
        let now = self.clock.now();
        let decision = core::decide(&Observation {
            desired: &desired,
            policy: &policy,
            records: &set.live,
            secret: &secret.view,
            now,
        });
        debug!(?decision, "decided");
        let (steps, held, requeue_after) = match decision {
            Decision::SecretConflict => {
                let outcome = Outcome::SecretConflict {
                    secret_name: target.secret_name.clone(),
                };
                self.finish(&target, None, &[], Some(set.issued), None, &outcome)
                    .await?;
                return Ok(Action::requeue(CONFLICT_RECHECK));
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
        for step in steps {
            match step {
                Step::Issue { reason, expires_at } => {
                    self.issue_limiter.acquire().await;
                    let record = self
                        .issue(&target, &desired, &policy, &secret, reason, expires_at)
                        .await?;
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
                    }
                    info!(key_id, "activated a key its Secret already held");
                    let note = format!("key {key_id} is active in Secret {}", target.secret_name);
                    self.notify(key, EventType::Normal, "Issued", note).await;
                }
                Step::Retire { key_id, expires_at } => {
                    self.store.retire(&key_id, expires_at, now).await?;
                    if let Some(r) = find(&mut records, &key_id) {
                        r.state = KeyState::Retiring;
                        r.expires_at = Some(expires_at);
                    }
                    info!(key_id, %expires_at, "previous key retiring");
                }
                Step::SetExpiry { key_id, expires_at } => {
                    self.store.set_expiry(&key_id, expires_at, now).await?;
                    if let Some(r) = find(&mut records, &key_id) {
                        r.expires_at = expires_at;
                    }
                    info!(key_id, ?expires_at, "moved the key's expiry");
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
                        self.notify(key, EventType::Normal, "Revoked", note).await;
                    }
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
            Some(expires_at) if expires_at <= now => Outcome::KeyExpired,
            _ => Outcome::Ready,
        };
        self.finish(
            &target,
            current,
            &records,
            Some(issued),
            Some(&policy),
            &outcome,
        )
        .await?;
        Ok(Action::requeue(
            requeue_after
                .and_then(|d| d.unsigned_abs().checked_add(Duration::from_secs(1)))
                .map_or(RESYNC, |d| d.min(RESYNC)),
        ))
    }

    /// Revokes every key of a deleted ApiKey, then deletes its Secret. Errors keep the finalizer.
    #[tracing::instrument(skip_all, fields(apikey = %key.name_any(), namespace = key.namespace().unwrap_or_default()))]
    pub async fn cleanup(&self, key: &ApiKey) -> Result<Action> {
        let target = Target::of(key)?;
        let set = self.store.load(&target.uid).await?;
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
            self.notify(key, EventType::Normal, "Revoked", note).await;
        }
        let secret = self.observe_secret(&target).await?;
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

    /// Shows a failed reconcile in status and, on a change of reason, as a Warning Event.
    pub async fn report_failure(&self, key: &ApiKey, error: &Error) {
        let Ok(target) = Target::of(key) else { return };
        let message = if key.metadata.deletion_timestamp.is_some() {
            format!("the ApiKey is kept until its keys are revoked: {error}")
        } else {
            error.to_string()
        };
        let outcome = Outcome::Failed {
            reason: error.reason().to_owned(),
            message,
        };
        if let Err(e) = self.finish(&target, None, &[], None, None, &outcome).await {
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
                    self.notify(target.key, EventType::Normal, "RolledOut", note)
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Writes status if it changed, with a Warning Event when Ready turns to a new failure reason.
    async fn finish(
        &self,
        target: &Target<'_>,
        current: Option<&KeyRecord>,
        records: &[KeyRecord],
        issued: Option<i64>,
        policy: Option<&Policy>,
        outcome: &Outcome,
    ) -> Result<()> {
        let key = target.key;
        let previous = key.status.as_ref();
        let status = core::status_for(&StatusInput {
            previous,
            generation: key.metadata.generation,
            secret_name: &target.secret_name,
            current,
            records,
            issued,
            policy,
            outcome,
            now: self.clock.now(),
        });
        if policy.is_some() {
            let next = status.next_rotation_at.as_ref().map(|t| t.0);
            self.metrics
                .set_next_rotation(&target.namespace, &target.name, next);
        }
        if previous == Some(&status) {
            return Ok(());
        }
        let previous_reason = key.ready_condition().map(|c| c.reason.as_str());
        let ready = status.conditions.last().expect("status_for sets Ready");
        if ready.status == "False" && previous_reason != Some(ready.reason.as_str()) {
            self.notify(
                key,
                EventType::Warning,
                &ready.reason,
                ready.message.clone(),
            )
            .await;
        }
        self.cluster.apply_status(key, &status).await
    }

    /// Issues a key in the crash-safe order: pending record, Secret, active record.
    async fn issue(
        &self,
        target: &Target<'_>,
        desired: &KeyMetadata,
        policy: &Policy,
        secret: &ObservedSecret,
        reason: IssueReason,
        expires_at: Option<jiff::Timestamp>,
    ) -> Result<KeyRecord> {
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
        let written = self.cluster.apply_secret(&manifest).await;
        wipe(&mut manifest);
        written?;

        self.store.activate(&record.key_id, now, expires_at).await?;
        record.state = KeyState::Active;
        record.activated_at = Some(now);
        record.expires_at = expires_at;
        self.metrics
            .keys_issued
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        if reason.is_rotation() {
            self.metrics.keys_rotated.inc();
        }

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
        self.notify(target.key, kind, event_reason, note).await;
        Ok(record)
    }

    /// GETs the target Secret, hashes its key and wipes the plaintext at once.
    async fn observe_secret(&self, target: &Target<'_>) -> Result<ObservedSecret> {
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
        let controlled = secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid == target.uid);
        let view = if controlled {
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
        wipe(&mut secret);
        Ok(ObservedSecret {
            view,
            uid: secret.metadata.uid,
            resource_version: secret.metadata.resource_version,
        })
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    async fn notify(&self, key: &ApiKey, kind: EventType, reason: &str, note: String) {
        let event = Event {
            type_: kind,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.cluster.publish(key, event).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// The record with this id, to keep the in-memory copy in step with the database.
fn find<'a>(records: &'a mut [KeyRecord], key_id: &str) -> Option<&'a mut KeyRecord> {
    records.iter_mut().find(|r| r.key_id == key_id)
}

/// Overwrites every data value of a Secret in memory before it is dropped.
fn wipe(secret: &mut Secret) {
    for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
        value.0.zeroize();
    }
    secret.data = None;
}
