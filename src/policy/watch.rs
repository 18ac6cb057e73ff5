//! The operator's side of governance: watches that keep the [`PolicyIndex`]
//! current and requeue the ApiKeys a change affects, and the task that writes
//! each ApiKeyPolicy's status.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{WatchStreamExt, reflector::ObjectRef, watcher},
};
use serde_json::json;
use tokio::sync::{Notify, mpsc::UnboundedSender};
use tracing::{info, warn};

use super::{
    crd::ApiKeyPolicy,
    evaluate::CompiledPolicy,
    index::{Governance, PolicyIndex, live},
    limit::{Holders, limited},
    status::summarize,
};
use crate::{
    clock::Clock,
    crd::{ApiKey, FIELD_MANAGER},
    store::KeyStore,
    telemetry::{Metrics, PolicyLabel},
};

/// Where requeue requests for ApiKeys go (the controller's `reconcile_on`).
pub type Requeue = UnboundedSender<ObjectRef<DeserializeGuard<ApiKey>>>;

/// How long the status writer waits after a change for more changes.
const STATUS_DEBOUNCE: Duration = Duration::from_secs(2);
/// How often policy status is recounted without any change (cron checks move with time).
const STATUS_RESYNC: Duration = Duration::from_secs(300);

/// Requeues every ApiKey in a namespace that `selected` picks.
fn requeue_where(index: &PolicyIndex, requeue: &Requeue, selected: impl Fn(&str) -> bool) {
    let mut count = 0;
    for guarded in index.keys() {
        let Some(key) = live(&guarded) else { continue };
        let namespace = key.namespace().unwrap_or_default();
        if selected(&namespace) {
            let reference = ObjectRef::new(&key.name_any()).within(&namespace);
            if requeue.send(reference).is_err() {
                return;
            }
            count += 1;
        }
    }
    if count > 0 {
        info!(apikeys = count, "requeued ApiKeys for a policy change");
    }
}

/// Requeues the ApiKeys of `namespace` that wait for a place under
/// `maxKeysPerNamespace` (no key in status): after a deletion there, the first
/// in line gets its key within seconds, not at the next resync.
pub fn requeue_waiting(index: &PolicyIndex, requeue: &Requeue, namespace: &str) {
    if !index.limits(namespace) {
        return;
    }
    for guarded in index.keys() {
        let Some(key) = live(&guarded) else { continue };
        let waiting = key.status.as_ref().is_none_or(|s| s.key_id.is_none());
        if waiting && key.metadata.namespace.as_deref() == Some(namespace) {
            let reference = ObjectRef::new(&key.name_any()).within(namespace);
            if requeue.send(reference).is_err() {
                return;
            }
        }
    }
}

/// Keeps the index's policies current. A changed spec requeues the ApiKeys in
/// the namespaces the old or the new version selects; a status-only change
/// (our own writes) requeues nothing.
pub fn watch_policies(
    client: Client,
    index: PolicyIndex,
    requeue: Requeue,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api = Api::<ApiKeyPolicy>::all(client);
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        let mut listing = Vec::new();
        let mut listed_before = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(policy)) => listing.push(CompiledPolicy::new(&policy)),
                Ok(watcher::Event::InitDone) => {
                    let count = listing.len();
                    index.replace_policies(std::mem::take(&mut listing));
                    info!(policies = count, "ApiKeyPolicy watch listed");
                    if listed_before {
                        // Changes may have been missed: look at every key again.
                        requeue_where(&index, &requeue, |_| true);
                    }
                    listed_before = true;
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(policy)) => {
                    let new = CompiledPolicy::new(&policy);
                    let old = index.upsert_policy(new.clone());
                    if old.as_ref().is_some_and(|old| old.spec == new.spec) {
                        continue;
                    }
                    info!(policy = new.name, "ApiKeyPolicy changed");
                    let namespaces = index.namespaces();
                    requeue_where(&index, &requeue, |ns| {
                        let labels = namespaces.get(ns).cloned().unwrap_or_default();
                        new.selects(&labels) || old.as_ref().is_some_and(|o| o.selects(&labels))
                    });
                    changed.notify_one();
                }
                Ok(watcher::Event::Delete(policy)) => {
                    let Some(old) = index.remove_policy(&policy.name_any()) else {
                        continue;
                    };
                    info!(policy = old.name, "ApiKeyPolicy deleted");
                    let namespaces = index.namespaces();
                    requeue_where(&index, &requeue, |ns| {
                        old.selects(&namespaces.get(ns).cloned().unwrap_or_default())
                    });
                    changed.notify_one();
                }
                Err(e) => warn!(error = %e, "ApiKeyPolicy watch error; retrying with backoff"),
            }
        }
    })
}

/// Keeps the index's namespace labels current (metadata only). A label change
/// requeues the ApiKeys in that namespace.
pub fn watch_namespaces(
    client: Client,
    index: PolicyIndex,
    requeue: Requeue,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api = Api::<PartialObjectMeta<Namespace>>::all(client);
        let config = watcher::Config::default().page_size(500);
        let mut events = std::pin::pin!(watcher(api, config).default_backoff());
        let mut listing = HashMap::new();
        let mut listed_before = false;
        let labels_of = |ns: &PartialObjectMeta<Namespace>| -> BTreeMap<String, String> {
            ns.metadata.labels.clone().unwrap_or_default()
        };
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(ns)) => {
                    listing.insert(ns.name_any(), labels_of(&ns));
                }
                Ok(watcher::Event::InitDone) => {
                    let count = listing.len();
                    index.replace_namespaces(std::mem::take(&mut listing));
                    info!(namespaces = count, "Namespace watch listed");
                    if listed_before {
                        requeue_where(&index, &requeue, |_| true);
                    }
                    listed_before = true;
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(ns)) => {
                    let name = ns.name_any();
                    let labels = labels_of(&ns);
                    let old = index.upsert_namespace(&name, labels.clone());
                    if old.as_ref() != Some(&labels) {
                        requeue_where(&index, &requeue, |n| n == name);
                        changed.notify_one();
                    }
                }
                Ok(watcher::Event::Delete(ns)) => {
                    index.remove_namespace(&ns.name_any());
                    changed.notify_one();
                }
                Err(e) => warn!(error = %e, "Namespace watch error; retrying with backoff"),
            }
        }
    })
}

/// Writes each ApiKeyPolicy's status after changes of policies, namespaces
/// and ApiKeys (debounced) and every few minutes, with server-side apply, only
/// where it differs from what is there. It also sets the
/// `keyward_policy_violating_keys` gauge. Under `maxKeysPerNamespace` it reads
/// who holds a key from the key database, as the reconciler does; while that
/// fails the statuses stay as they are and it tries again shortly.
pub async fn maintain_status(
    client: Client,
    index: PolicyIndex,
    store: Arc<dyn KeyStore>,
    changed: Arc<Notify>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) {
    let api = Api::<ApiKeyPolicy>::all(client);
    let mut wait = STATUS_RESYNC;
    // How long the last count took: while ApiKeys keep changing (a fleet
    // rotating), the writer rests four times that long, so at most a fifth of
    // a core goes to recounting however many keys there are.
    let mut took = Duration::ZERO;
    loop {
        let _ = tokio::time::timeout(wait, changed.notified()).await;
        tokio::time::sleep(STATUS_DEBOUNCE.max(took * 4)).await;
        wait = STATUS_RESYNC;
        if !index.is_synced() {
            continue;
        }
        let policies = index.policies();
        if policies.is_empty() {
            metrics.policy_violations.clear();
            continue;
        }
        let cached = index.keys();
        let keys: Vec<&ApiKey> = cached.iter().filter_map(|k| live(k)).collect();
        let namespaces = index.namespaces();
        let holders = match limited_holders(&*store, &policies, &namespaces).await {
            Ok(holders) => holders,
            Err(e) => {
                warn!(error = %e, "cannot read the key database for ApiKeyPolicy status; retrying");
                wait = STATUS_DEBOUNCE;
                continue;
            }
        };
        let counting = std::time::Instant::now();
        let statuses = summarize(&policies, &namespaces, &keys, &holders, clock.now());
        took = counting.elapsed();
        metrics.policy_violations.clear();
        for policy in &policies {
            let Some(status) = statuses.get(&policy.name) else {
                continue;
            };
            metrics
                .policy_violations
                .get_or_create(&PolicyLabel {
                    policy: policy.name.clone(),
                })
                .set(status.violating_keys);
            if policy.status.as_ref() == Some(status) {
                continue;
            }
            let patch = json!({
                "apiVersion": "keyward.dev/v1alpha1",
                "kind": "ApiKeyPolicy",
                "status": status,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&policy.name, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(written) => {
                    index.upsert_policy(CompiledPolicy::new(&written));
                }
                Err(e) => {
                    warn!(policy = policy.name, error = %e, "could not write ApiKeyPolicy status")
                }
            }
        }
    }
}

/// The holders of every namespace a `maxKeysPerNamespace` policy selects.
async fn limited_holders(
    store: &dyn KeyStore,
    policies: &[CompiledPolicy],
    namespaces: &HashMap<String, BTreeMap<String, String>>,
) -> crate::Result<HashMap<String, Holders>> {
    let mut holders = HashMap::new();
    for (namespace, labels) in namespaces {
        if limited(policies, labels) {
            holders.insert(namespace.clone(), store.holders(namespace).await?);
        }
    }
    Ok(holders)
}
