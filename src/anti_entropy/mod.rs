//! Anti-entropy: the cluster is the source of truth for which keys live.
//!
//! A restored backup or a promoted asynchronous standby can hold live records
//! of keys the cluster has since revoked. Nothing else would ever visit a
//! record whose ApiKey is gone, so the leader compares this cluster's live
//! records with the ApiKeys it sees, at start (once the watches have synced)
//! and every `--anti-entropy-interval`. One streamed query, and the watch
//! caches: no API request unless something looks wrong. A suspect is revoked
//! only after fresh reads confirm it (`decide` holds the rules).

pub mod decide;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Resource, ResourceExt,
    core::DeserializeGuard,
    runtime::{
        events::{Event, EventType},
        reflector::{ObjectRef, Store},
    },
};
use tracing::{info, warn};

use self::decide::{Account, Finding, judge, lost_current_key};
use crate::{
    Result,
    clock::Clock,
    crd::ApiKey,
    operator::reconciler::Cluster,
    operator::secret_cache::{SecretCache, SecretFacts},
    policy::watch::Requeue,
    store::{KeyRecord, KeyStore, LiveRow, RevokeReason, SqlStore},
    telemetry::{Health, Metrics, OutcomeLabel, ReasonLabel},
};

/// What a pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Live records of this cluster compared.
    pub records: usize,
    /// Keys revoked as `orphaned`.
    pub orphaned: usize,
    /// Keys revoked as `superseded`.
    pub superseded: usize,
    /// ApiKeys handed to the reconciler (a lost current key, or an ambiguous status).
    pub requeued: usize,
}

/// Everything a pass reads and writes.
pub struct AntiEntropy {
    /// For the confirming GETs.
    pub client: Client,
    /// This cluster's records.
    pub store: Arc<SqlStore>,
    /// The ApiKey watch cache.
    pub keys: Store<DeserializeGuard<ApiKey>>,
    /// The metadata-only cache of keyward's Secrets.
    pub secrets: SecretCache,
    /// Hands ApiKeys to the reconciler.
    pub requeue: Requeue,
    /// Publishes Events.
    pub cluster: Arc<dyn Cluster>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Counters by reason.
    pub metrics: Arc<Metrics>,
}

/// A suspect awaiting confirmation.
struct Suspect {
    row: LiveRow,
    finding: Finding,
}

impl AntiEntropy {
    /// Runs a pass once the ApiKey and Secret watches have listed everything
    /// (never on a partial list), then one every `interval`, until the task is aborted.
    pub async fn follow(self, health: Arc<Health>, interval: Duration) {
        while !health.watches_synced.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            let started = Instant::now();
            let outcome = self.pass().await;
            self.metrics
                .anti_entropy_duration
                .observe(started.elapsed().as_secs_f64());
            let label = OutcomeLabel {
                outcome: if outcome.is_ok() { "ok" } else { "error" },
            };
            self.metrics.anti_entropy_passes.get_or_create(&label).inc();
            match outcome {
                Ok(report) if report.orphaned + report.superseded + report.requeued > 0 => info!(
                    records = report.records,
                    orphaned = report.orphaned,
                    superseded = report.superseded,
                    requeued = report.requeued,
                    "anti-entropy pass"
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "anti-entropy pass failed; trying again next interval"),
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// One pass: stream this cluster's live records, judge each against the
    /// caches, confirm the suspects with fresh reads, revoke what is confirmed.
    pub async fn pass(&self) -> Result<PassReport> {
        let now = self.clock.now();
        let cluster = self.store.cluster().to_owned();
        let mut report = PassReport::default();
        // Hashes of the key ids, not the ids: a tenth of the memory at 100,000
        // keys. A collision only delays a lost key's re-issue to the resync.
        let mut live_ids = HashSet::new();
        let mut suspects = Vec::new();
        let mut reconcile = HashSet::new();
        self.store
            .each_live_row(&mut |row| {
                report.records += 1;
                let reference = ObjectRef::new(&row.name).within(&row.namespace);
                let cached = self.keys.get(&reference);
                let account = cached
                    .as_deref()
                    .map(|object| account_of(object, &self.secrets));
                live_ids.insert(id_hash(&row.key_id));
                match judge(&row, account.as_ref(), &cluster, now) {
                    Finding::Accounted => {}
                    Finding::Reconcile => {
                        reconcile.insert(reference);
                    }
                    finding => suspects.push(Suspect { row, finding }),
                }
            })
            .await?;
        self.metrics
            .anti_entropy_records
            .set(i64::try_from(report.records).unwrap_or(i64::MAX));
        for object in self.keys.state() {
            if let Ok(key) = &object.0
                && key.metadata.deletion_timestamp.is_none()
                && lost_current_key(key.status.as_ref(), &|id| live_ids.contains(&id_hash(id)))
            {
                reconcile.insert(ObjectRef::from_obj(object.as_ref()));
            }
        }
        drop(live_ids);

        let mut by_apikey: BTreeMap<(String, String), Vec<Suspect>> = BTreeMap::new();
        for suspect in suspects {
            let id = (suspect.row.namespace.clone(), suspect.row.name.clone());
            by_apikey.entry(id).or_default().push(suspect);
        }
        for ((namespace, name), suspects) in by_apikey {
            let revoked = self.confirm(&namespace, &name, suspects).await?;
            report.orphaned += revoked.orphaned;
            report.superseded += revoked.superseded;
            if revoked.superseded > 0 {
                reconcile.insert(ObjectRef::new(&name).within(&namespace));
            }
        }
        report.requeued = reconcile.len();
        for reference in reconcile {
            if self.requeue.send(reference).is_err() {
                break;
            }
        }
        Ok(report)
    }

    /// Re-reads the ApiKey, its Secret's metadata and its records, judges the
    /// suspects again against them, and revokes those still unaccounted for.
    async fn confirm(
        &self,
        namespace: &str,
        name: &str,
        suspects: Vec<Suspect>,
    ) -> Result<PassReport> {
        let mut report = PassReport::default();
        let key = match Api::<ApiKey>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
        {
            Ok(key) => key,
            // An object the API server has but that does not read as an
            // ApiKey cannot say which key is current: leave its keys alone.
            Err(kube::Error::SerdeError(_)) => return Ok(report),
            // The API server cannot confirm: the pass fails (logged and
            // counted), nothing is revoked, and the next pass tries again.
            Err(e) => return Err(e.into()),
        };
        let now = self.clock.now();
        let secret_key_id = match &key {
            Some(key) => self.secret_key_id(key).await?,
            None => None,
        };
        let fresh: Vec<KeyRecord> = match key.as_ref().and_then(ResourceExt::uid) {
            Some(uid) => self.store.load(&uid).await?.live,
            None => Vec::new(),
        };
        let account = key.as_ref().map(|key| Account {
            uid: key.metadata.uid.as_deref().unwrap_or_default(),
            status: key.status.as_ref(),
            readable: true,
            secret_key_id,
        });
        for suspect in suspects {
            // Records of this ApiKey are judged as they are now; others (of a
            // deleted ApiKey) as they were streamed, since a revoke is guarded
            // by state anyway.
            let row = fresh
                .iter()
                .find(|r| r.key_id == suspect.row.key_id)
                .map_or(suspect.row.clone(), live_row);
            let finding = judge(&row, account.as_ref(), &row.cluster, now);
            if finding != suspect.finding
                && !(suspect.finding == Finding::Superseded && finding == Finding::Orphaned)
            {
                continue;
            }
            let reason = match finding {
                Finding::Orphaned => RevokeReason::Orphaned,
                Finding::Superseded => RevokeReason::Superseded,
                Finding::Accounted | Finding::Reconcile => continue,
            };
            self.store.revoke(&row.key_id, reason, now).await?;
            self.metrics
                .anti_entropy_revocations
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
            self.metrics
                .keys_revoked
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
            warn!(
                key_id = row.key_id,
                namespace,
                name,
                reason = reason.as_str(),
                "anti-entropy revoked a key the cluster does not account for"
            );
            match reason {
                RevokeReason::Superseded => report.superseded += 1,
                _ => report.orphaned += 1,
            }
            if let (Some(key), RevokeReason::Superseded) = (&key, reason) {
                let note = format!(
                    "revoked {}: the key database held it live, but it is neither the key in the Secret nor a previous key in its grace period (a restored or failed-over database)",
                    row.key_id
                );
                let event = Event {
                    type_: EventType::Warning,
                    reason: "Superseded".into(),
                    note: Some(note),
                    action: "Revoke".into(),
                    secondary: None,
                };
                if let Err(e) = self.cluster.publish(&key.object_ref(&()), event).await {
                    warn!(error = %e, "could not publish an Event");
                }
            }
        }
        Ok(report)
    }

    /// The key id in the Secret this ApiKey controls, read fresh (metadata only).
    async fn secret_key_id(&self, key: &ApiKey) -> Result<Option<String>> {
        let (Some(namespace), Some(secret_name), Some(uid)) =
            (key.namespace(), key.target_secret_name(), key.uid())
        else {
            return Ok(None);
        };
        let secret = Api::<Secret>::namespaced(self.client.clone(), &namespace)
            .get_metadata_opt(secret_name)
            .await?;
        Ok(secret.and_then(|secret| SecretFacts::of(&secret.metadata).key_id_controlled_by(&uid)))
    }
}

/// A key id's 64-bit hash, for the set of live ids a pass keeps.
fn id_hash(key_id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key_id)
}

/// The cached facts about one ApiKey, as [`judge`] takes them.
fn account_of<'a>(object: &'a DeserializeGuard<ApiKey>, secrets: &SecretCache) -> Account<'a> {
    let uid = object.meta().uid.as_deref().unwrap_or_default();
    let secret_key_id = object.0.as_ref().ok().and_then(|key| {
        secrets
            .get(key.namespace().as_deref()?, key.target_secret_name()?)??
            .key_id_controlled_by(uid)
    });
    Account {
        uid,
        status: object.0.as_ref().ok().and_then(|key| key.status.as_ref()),
        readable: object.0.is_ok(),
        secret_key_id,
    }
}

/// A record as the pass sees it.
fn live_row(record: &KeyRecord) -> LiveRow {
    LiveRow {
        key_id: record.key_id.clone(),
        apikey_uid: record.apikey_uid.clone(),
        namespace: record.namespace.clone(),
        name: record.name.clone(),
        state: record.state,
        created_at: record.created_at,
        expires_at: record.expires_at,
        cluster: record.cluster.clone(),
    }
}
