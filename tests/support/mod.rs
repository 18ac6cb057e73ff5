//! Test doubles shared by the integration tests: an in-memory Kubernetes
//! ([`FakeCluster`]), a key store wrapper that injects faults ([`FaultyStore`]),
//! and databases for both backends.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ObjectReference, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use keyward::{
    Error, Result,
    clock::ManualClock,
    crd::{ApiKey, ApiKeySpec, ApiKeyStatus, RolloutTarget},
    key::{KeyFactory, KeyHash, SeededEntropy},
    operator::reconciler::{
        CachedSecret, Cluster, IssueTurns, RateLimiter, Reconciler, StatusMemo,
    },
    operator::secret_cache::SecretFacts,
    policy::PolicyIndex,
    store::{KeyMetadata, KeyRecord, KeySet, KeyStore, RevokeReason, SqlStore},
    telemetry::Metrics,
};
use kube::{
    Resource, ResourceExt,
    runtime::events::{Event, EventType},
};

/// A fixed start time for the manual clock.
pub fn start_time() -> Timestamp {
    "2026-11-22T12:00:00Z".parse().unwrap()
}

/// An ApiKey as the API server would hand it to the controller.
pub fn api_key(name: &str, uid: &str) -> ApiKey {
    let mut key = ApiKey::new(
        name,
        ApiKeySpec {
            owner: "alice@example.com".into(),
            team: "ml".into(),
            scopes: vec!["inference".into(), "models:read".into()],
            secret_name: None,
            description: None,
            rotation: None,
            expires_after: None,
            rollout: None,
        },
    );
    key.metadata.namespace = Some("team-ml".into());
    key.metadata.uid = Some(uid.into());
    key.metadata.generation = Some(1);
    key.metadata.finalizers = Some(vec![keyward::crd::FINALIZER.into()]);
    key
}

/// Where a fault is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    GetSecret,
    ApplySecret,
    /// The Secret write lands but the response is lost.
    ApplySecretThenFail,
    DeleteSecret,
    ApplyStatus,
    Restart,
}

/// An Event as the fake recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

#[derive(Default)]
struct ClusterState {
    secrets: BTreeMap<(String, String), Secret>,
    statuses: BTreeMap<String, ApiKeyStatus>,
    events: Vec<RecordedEvent>,
    faults: HashMap<Op, usize>,
    writes: usize,
    /// Pod-template `keyward.dev/key-id` annotation per workload name, and restarts per workload.
    workloads: BTreeMap<String, (Option<String>, usize)>,
    next_version: u64,
    /// Serve `cached_secret` from the stored Secrets, as a synced watch cache would.
    cache: bool,
    /// Secret GETs made so far.
    gets: usize,
    /// (rotate request, value) of each `keyward.dev/revoke-previous` removal.
    consumed: Vec<(String, String)>,
}

/// An in-memory API server for Secrets, ApiKey status and Events.
#[derive(Default)]
pub struct FakeCluster(Mutex<ClusterState>);

impl FakeCluster {
    fn state(&self) -> std::sync::MutexGuard<'_, ClusterState> {
        self.0.lock().unwrap()
    }

    /// Makes the next `Op` call fail.
    pub fn fail_next(&self, op: Op) {
        *self.state().faults.entry(op).or_default() += 1;
    }

    fn take_fault(state: &mut ClusterState, op: Op) -> bool {
        match state.faults.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Serves Secret metadata from memory from now on, like a synced watch cache.
    pub fn enable_cache(&self) {
        self.state().cache = true;
    }

    /// Secret GETs made so far.
    pub fn gets(&self) -> usize {
        self.state().gets
    }

    /// The `keyward.dev/revoke-previous` removals so far, as (rotate request, value).
    pub fn consumed(&self) -> Vec<(String, String)> {
        self.state().consumed.clone()
    }

    /// Writes made so far: Secret applies and deletes, status applies. Events are not counted.
    pub fn writes(&self) -> usize {
        self.state().writes
    }

    /// A copy of a stored Secret.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.state()
            .secrets
            .get(&(namespace.into(), name.into()))
            .cloned()
    }

    /// The plaintext key in a stored Secret.
    pub fn key_in(&self, namespace: &str, name: &str) -> Option<String> {
        let secret = self.secret(namespace, name)?;
        let value = secret.data?.get("api-key")?.0.clone();
        Some(String::from_utf8(value).unwrap())
    }

    /// Stores a Secret as another client would (no keyward involvement).
    pub fn put_secret(&self, secret: Secret) {
        let mut state = self.state();
        state.next_version += 1;
        let mut secret = secret;
        secret.metadata.resource_version = Some(state.next_version.to_string());
        secret
            .metadata
            .uid
            .get_or_insert_with(|| format!("secret-uid-{}", state.next_version));
        let id = (
            secret.namespace().unwrap(),
            secret.metadata.name.clone().unwrap(),
        );
        state.secrets.insert(id, secret);
    }

    /// Removes a Secret as another client would.
    pub fn remove_secret(&self, namespace: &str, name: &str) {
        self.state()
            .secrets
            .remove(&(namespace.into(), name.into()));
    }

    /// The last status applied for an ApiKey name.
    pub fn status(&self, name: &str) -> Option<ApiKeyStatus> {
        self.state().statuses.get(name).cloned()
    }

    /// Adds a workload (any kind) that rollouts can target.
    pub fn add_workload(&self, name: &str) {
        self.state().workloads.insert(name.into(), (None, 0));
    }

    /// How many times a workload was restarted.
    pub fn restarts(&self, name: &str) -> usize {
        self.state().workloads.get(name).map_or(0, |w| w.1)
    }

    /// Events so far.
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.state().events.clone()
    }

    /// Copies the stored status into the object, as a watch event would.
    /// The status goes through JSON, as it does through the API server (which
    /// keeps times to the second), so a status that does not survive that shows.
    pub fn refresh(&self, key: &mut ApiKey) {
        key.status = self
            .status(&key.name_any())
            .map(|status| serde_json::from_value(serde_json::to_value(status).unwrap()).unwrap());
    }
}

fn injected(op: Op) -> Error {
    Error::Config(format!("injected fault at {op:?}"))
}

#[async_trait]
impl Cluster for FakeCluster {
    fn cached_secret(&self, namespace: &str, name: &str) -> CachedSecret {
        let state = self.state();
        if !state.cache {
            return CachedSecret::Unavailable;
        }
        // The watch selects keyward's label, so foreign Secrets are not cached.
        match state.secrets.get(&(namespace.into(), name.into())) {
            Some(secret)
                if secret.metadata.labels.as_ref().is_some_and(|l| {
                    l.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("keyward")
                }) =>
            {
                CachedSecret::Present(SecretFacts::of(&secret.metadata))
            }
            _ => CachedSecret::Absent,
        }
    }

    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>> {
        let mut state = self.state();
        if Self::take_fault(&mut state, Op::GetSecret) {
            return Err(injected(Op::GetSecret));
        }
        state.gets += 1;
        Ok(state.secrets.get(&(namespace.into(), name.into())).cloned())
    }

    async fn create_secret(&self, secret: &Secret) -> Result<Option<String>> {
        let id = (
            secret.namespace().unwrap(),
            secret.metadata.name.clone().unwrap(),
        );
        if self.state().secrets.contains_key(&id) {
            return Err(Error::SecretWrite {
                namespace: id.0,
                name: id.1,
                code: 409,
                reason: "AlreadyExists".into(),
            });
        }
        self.apply_secret(secret).await
    }

    async fn apply_secret(&self, secret: &Secret) -> Result<Option<String>> {
        let mut state = self.state();
        if Self::take_fault(&mut state, Op::ApplySecret) {
            return Err(injected(Op::ApplySecret));
        }
        let id = (
            secret.namespace().unwrap(),
            secret.metadata.name.clone().unwrap(),
        );
        let existing = state.secrets.get(&id).cloned();
        if let (Some(expected), Some(current)) = (&secret.metadata.resource_version, &existing) {
            assert_eq!(
                current.metadata.resource_version.as_ref(),
                Some(expected),
                "keyward applied over a Secret it had not seen"
            );
        }
        if let Some(current) = &existing {
            let ours = current.metadata.owner_references.iter().flatten().any(|o| {
                Some(&o.uid)
                    == secret
                        .metadata
                        .owner_references
                        .as_ref()
                        .and_then(|r| r.first())
                        .map(|r| &r.uid)
            });
            assert!(ours, "keyward wrote to a Secret it does not control");
        }
        state.next_version += 1;
        state.writes += 1;
        let mut stored = secret.clone();
        stored.metadata.resource_version = Some(state.next_version.to_string());
        stored.metadata.uid = existing
            .and_then(|s| s.metadata.uid)
            .or_else(|| Some(format!("secret-uid-{}", state.next_version)));
        state.secrets.insert(id, stored);
        if Self::take_fault(&mut state, Op::ApplySecretThenFail) {
            return Err(injected(Op::ApplySecretThenFail));
        }
        Ok(Some(state.next_version.to_string()))
    }

    async fn delete_secret(&self, namespace: &str, name: &str, uid: &str) -> Result<()> {
        let mut state = self.state();
        if Self::take_fault(&mut state, Op::DeleteSecret) {
            return Err(injected(Op::DeleteSecret));
        }
        let id = (namespace.to_owned(), name.to_owned());
        if state
            .secrets
            .get(&id)
            .and_then(|s| s.metadata.uid.as_deref())
            == Some(uid)
        {
            state.secrets.remove(&id);
            state.writes += 1;
        }
        Ok(())
    }

    async fn apply_status(&self, key: &ApiKey, status: &ApiKeyStatus) -> Result<Option<String>> {
        let mut state = self.state();
        if Self::take_fault(&mut state, Op::ApplyStatus) {
            return Err(injected(Op::ApplyStatus));
        }
        state.writes += 1;
        state.statuses.insert(key.name_any(), status.clone());
        Ok(None)
    }

    async fn consume_revoke_previous(
        &self,
        _key: &ApiKey,
        rotation_request: &str,
        value: &str,
    ) -> Result<()> {
        let mut state = self.state();
        state.writes += 1;
        state
            .consumed
            .push((rotation_request.to_owned(), value.to_owned()));
        Ok(())
    }

    async fn rollout_key_id(
        &self,
        _namespace: &str,
        target: &RolloutTarget,
    ) -> Result<Option<Option<String>>> {
        Ok(self
            .state()
            .workloads
            .get(&target.name)
            .map(|w| w.0.clone()))
    }

    async fn restart(&self, _namespace: &str, target: &RolloutTarget, key_id: &str) -> Result<()> {
        let mut state = self.state();
        if Self::take_fault(&mut state, Op::Restart) {
            return Err(injected(Op::Restart));
        }
        state.writes += 1;
        let workload = state
            .workloads
            .get_mut(&target.name)
            .expect("restart of a missing workload");
        workload.0 = Some(key_id.into());
        workload.1 += 1;
        Ok(())
    }

    async fn publish(&self, _object: &ObjectReference, event: Event) -> Result<()> {
        self.state().events.push(RecordedEvent {
            warning: event.type_ == EventType::Warning,
            reason: event.reason,
            note: event.note.unwrap_or_default(),
        });
        Ok(())
    }
}

/// Which store method a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Load,
    InsertPending,
    Activate,
    Retire,
    UpdateMetadata,
    Revoke,
}

/// A [`SqlStore`] that can fail on chosen calls or be entirely down.
pub struct FaultyStore {
    pub inner: SqlStore,
    faults: Mutex<HashMap<StoreOp, usize>>,
    down: AtomicBool,
    writes: AtomicUsize,
}

impl FaultyStore {
    pub fn new(inner: SqlStore) -> Self {
        Self {
            inner,
            faults: Mutex::default(),
            down: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
        }
    }

    /// Makes the next call of `op` fail.
    pub fn fail_next(&self, op: StoreOp) {
        *self.faults.lock().unwrap().entry(op).or_default() += 1;
    }

    /// Simulates a database outage (every call fails) or its end.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Successful writes so far.
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    fn check(&self, op: StoreOp) -> Result<()> {
        let mut faults = self.faults.lock().unwrap();
        let injected = match faults.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        if injected || self.down.load(Ordering::SeqCst) {
            return Err(Error::Database(sqlx::Error::PoolTimedOut));
        }
        Ok(())
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl KeyStore for FaultyStore {
    fn cluster(&self) -> &str {
        self.inner.cluster()
    }
    async fn load(&self, apikey_uid: &str) -> Result<KeySet> {
        self.check(StoreOp::Load)?;
        self.inner.load(apikey_uid).await
    }
    async fn insert_pending(&self, record: &KeyRecord) -> Result<()> {
        self.check(StoreOp::InsertPending)?;
        self.inner.insert_pending(record).await?;
        self.wrote();
        Ok(())
    }
    async fn activate(
        &self,
        key_id: &str,
        at: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<()> {
        self.check(StoreOp::Activate)?;
        self.inner.activate(key_id, at, expires_at).await?;
        self.wrote();
        Ok(())
    }
    async fn retire(&self, key_id: &str, expires_at: Timestamp, at: Timestamp) -> Result<()> {
        self.check(StoreOp::Retire)?;
        self.inner.retire(key_id, expires_at, at).await?;
        self.wrote();
        Ok(())
    }
    async fn shorten_expiry(
        &self,
        key_id: &str,
        expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<()> {
        self.check(StoreOp::UpdateMetadata)?;
        self.inner.shorten_expiry(key_id, expires_at, at).await?;
        self.wrote();
        Ok(())
    }
    async fn update_metadata(
        &self,
        key_id: &str,
        metadata: &KeyMetadata,
        at: Timestamp,
    ) -> Result<()> {
        self.check(StoreOp::UpdateMetadata)?;
        self.inner.update_metadata(key_id, metadata, at).await?;
        self.wrote();
        Ok(())
    }
    async fn revoke(&self, key_id: &str, reason: RevokeReason, at: Timestamp) -> Result<()> {
        self.check(StoreOp::Revoke)?;
        self.inner.revoke(key_id, reason, at).await?;
        self.wrote();
        Ok(())
    }
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Database(sqlx::Error::PoolTimedOut));
        }
        self.inner.find_by_hash(hash).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
    async fn holders(&self, namespace: &str) -> Result<HashSet<String>> {
        self.check(StoreOp::Load)?;
        self.inner.holders(namespace).await
    }
    async fn used_since(&self, since: Timestamp) -> Result<Vec<(String, Timestamp)>> {
        self.check(StoreOp::Load)?;
        self.inner.used_since(since).await
    }
}

/// Issues an active key straight into the key database as the operator does
/// (insert pending, then activate): owner alice@example.com, team ml, namespace
/// team-ml, ApiKey `name` (uid `uid-<name>`).
pub async fn issue_active(
    store: &SqlStore,
    keys: &KeyFactory,
    name: &str,
    scopes: &[&str],
    expires_at: Option<Timestamp>,
) -> (keyward::key::PlainKey, KeyRecord) {
    let plain = keys.new_key().unwrap();
    let now = Timestamp::now();
    let record = KeyRecord {
        key_id: keys.new_key_id().unwrap(),
        key_hash: plain.hash(),
        key_hint: plain.hint(),
        apikey_uid: format!("uid-{name}"),
        namespace: "team-ml".into(),
        name: name.into(),
        metadata: KeyMetadata {
            owner: "alice@example.com".into(),
            team: "ml".into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        },
        state: keyward::store::KeyState::Pending,
        created_at: now,
        activated_at: None,
        expires_at: None,
        revoked_at: None,
        revoke_reason: None,
        issue_reason: keyward::store::IssueReason::Initial,
        rotation_request: None,
        cluster: "default".into(),
    };
    store.insert_pending(&record).await.unwrap();
    store
        .activate(&record.key_id, now, expires_at)
        .await
        .unwrap();
    (plain, record)
}

/// A migrated SQLite store in a temp dir (kept alive by the returned guard).
pub async fn sqlite_store() -> (SqlStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    (store, dir)
}

/// A fresh, migrated database on the PostgreSQL server named by
/// `KEYWARD_TEST_POSTGRES_URL`. Without it the test is skipped loudly, except
/// under CI (`CI=true`), where a missing PostgreSQL fails the run.
pub async fn postgres_store(test: &str) -> Option<SqlStore> {
    let url = postgres_database(test).await?;
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Some(store)
}

/// The URL of a fresh, empty database on the `KEYWARD_TEST_POSTGRES_URL`
/// server, skipped (or failed under CI) as [`postgres_store`] is.
pub async fn postgres_database(test: &str) -> Option<String> {
    let Ok(admin_url) = std::env::var("KEYWARD_TEST_POSTGRES_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{test}: KEYWARD_TEST_POSTGRES_URL is not set; CI must run the PostgreSQL tests"
            );
        }
        eprintln!("SKIP: {test}: KEYWARD_TEST_POSTGRES_URL is not set (scripts/test sets it)");
        return None;
    };
    let database = format!(
        "keyward_{}_{}",
        test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        std::process::id()
    );
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&admin_url).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {database}"),
        format!("CREATE DATABASE {database}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let url = match admin_url.split_once('?') {
        Some((base, query)) => format!("{}/{database}?{query}", base.rsplit_once('/').unwrap().0),
        None => format!("{}/{database}", admin_url.rsplit_once('/').unwrap().0),
    };
    Some(url)
}

/// A reconciler over the fakes with a manual clock and seeded entropy.
pub struct Harness {
    pub cluster: Arc<FakeCluster>,
    pub store: Arc<FaultyStore>,
    pub clock: Arc<ManualClock>,
    pub metrics: Arc<Metrics>,
    pub seed: u64,
    /// The ApiKeyPolicies reconciles check against: none, and namespace
    /// `team-ml` (labelled `team: ml`) known, until a test adds policies.
    pub policies: PolicyIndex,
    /// Shared by the reconcilers of one harness, as by one operator process.
    pub issue_turns: Arc<IssueTurns>,
    /// What the usage scans learned, as the leader's follower fills it.
    pub usage: Arc<keyward::usage::follow::UsageBook>,
}

/// A policy index that has listed no policies and the namespace `team-ml`.
pub fn synced_policies() -> PolicyIndex {
    let index = PolicyIndex::new(false);
    index.replace_policies(Vec::new());
    index.replace_namespaces(
        [(
            "team-ml".to_owned(),
            [("team".to_owned(), "ml".to_owned())].into(),
        )]
        .into(),
    );
    index
}

impl Harness {
    pub fn new(store: SqlStore) -> Self {
        Self {
            cluster: Arc::new(FakeCluster::default()),
            store: Arc::new(FaultyStore::new(store)),
            clock: Arc::new(ManualClock::new(start_time())),
            metrics: Arc::new(Metrics::default()),
            seed: 1,
            policies: synced_policies(),
            issue_turns: Arc::default(),
            usage: Arc::default(),
        }
    }

    /// A fresh reconciler over the same cluster and database: what a restarted
    /// operator process is. Each gets new entropy so keys never repeat.
    pub fn reconciler(&mut self) -> Reconciler {
        self.seed += 1;
        Reconciler {
            cluster: self.cluster.clone(),
            store: self.store.clone(),
            clock: self.clock.clone(),
            keys: KeyFactory::new("kw", Arc::new(SeededEntropy::new(self.seed))).unwrap(),
            issue_limiter: Arc::new(RateLimiter::per_second(0.0)),
            metrics: self.metrics.clone(),
            status_memo: Arc::new(StatusMemo::default()),
            governance: Arc::new(self.policies.clone()),
            issue_turns: self.issue_turns.clone(),
            usage: self.usage.clone(),
        }
    }
}

impl Harness {
    /// A harness over a fresh SQLite database (kept alive by the returned guard).
    pub async fn sqlite() -> (Self, tempfile::TempDir) {
        let (store, dir) = sqlite_store().await;
        (Self::new(store), dir)
    }

    /// One reconcile by a fresh reconciler, with the resulting status fed back
    /// into the object as the next watch event would.
    pub async fn reconcile(&mut self, key: &mut ApiKey) -> Result<()> {
        let result = self.reconciler().apply(key).await.map(drop);
        self.cluster.refresh(key);
        result
    }

    /// Reconciles as the controller would, retrying errors, until one succeeds.
    pub async fn converge(&mut self, key: &mut ApiKey) {
        for _ in 0..6 {
            if self.reconcile(key).await.is_ok() {
                return;
            }
        }
        panic!("did not converge");
    }
}

/// A Secret owned by nobody, as `kubectl create secret` makes it.
pub fn foreign_secret(namespace: &str, name: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "api-key".to_owned(),
            ByteString(b"somebody-elses-value".to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The owner reference uid an ApiKey gives its Secret.
pub fn owner_uid(key: &ApiKey) -> String {
    key.controller_owner_ref(&()).unwrap().uid
}
