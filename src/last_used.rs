//! Brings keys' use to `status.lastUsedAt` without waiting for something else
//! to reconcile their ApiKeys. Verifiers record uses in the key database
//! (minute resolution, flushed every few seconds); the operator's leader asks
//! it every [`SCAN_INTERVAL`] which ApiKeys were used lately and requeues those
//! whose status should move: a first use always, later ones at most once an
//! hour (the reconcile writes it, by [`shows_use`]).

use std::{collections::HashMap, sync::Arc, time::Duration};

use jiff::{SignedDuration, Timestamp};
use kube::{
    ResourceExt,
    core::DeserializeGuard,
    runtime::reflector::{ObjectRef, Store},
};
use tracing::{debug, warn};

use crate::{
    clock::Clock,
    core::shows_use,
    crd::ApiKey,
    policy::{index::live, watch::Requeue},
    store::KeyStore,
};

/// How often the leader asks the key database for recent uses.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(30);
/// How far each scan reaches back before the previous one: uses are stored
/// floored to the minute and flushed by verifiers a few seconds later.
const OVERLAP: SignedDuration = SignedDuration::from_mins(3);

/// The cached ApiKeys whose status should show a use from `used` (uid, latest use).
pub fn due(
    used: &[(String, Timestamp)],
    cache: &[&ApiKey],
) -> Vec<ObjectRef<DeserializeGuard<ApiKey>>> {
    let latest: HashMap<&str, Timestamp> =
        used.iter().map(|(uid, at)| (uid.as_str(), *at)).collect();
    cache
        .iter()
        .filter(|key| {
            let Some(used) = key.metadata.uid.as_deref().and_then(|uid| latest.get(uid)) else {
                return false;
            };
            let shown = key
                .status
                .as_ref()
                .and_then(|s| s.last_used_at.as_ref())
                .map(|t| t.0);
            shows_use(shown, *used)
        })
        .map(|key| ObjectRef::new(&key.name_any()).within(&key.namespace().unwrap_or_default()))
        .collect()
}

/// Scans for recent uses until the requeue channel closes.
pub async fn follow(
    store: Arc<dyn KeyStore>,
    keys: Store<DeserializeGuard<ApiKey>>,
    requeue: Requeue,
    clock: Arc<dyn Clock>,
) {
    let mut since = clock.now() - OVERLAP;
    loop {
        tokio::time::sleep(SCAN_INTERVAL).await;
        let started = clock.now();
        let used = match store.used_since(since).await {
            Ok(used) => used,
            Err(e) => {
                warn!(error = %e, "cannot read recent key uses; trying again");
                continue;
            }
        };
        since = started - OVERLAP;
        if used.is_empty() {
            continue;
        }
        let cached = keys.state();
        let live: Vec<&ApiKey> = cached.iter().filter_map(|k| live(k)).collect();
        let refs = due(&used, &live);
        if !refs.is_empty() {
            debug!(
                apikeys = refs.len(),
                "requeued ApiKeys whose last use should show"
            );
        }
        for reference in refs {
            if requeue.send(reference).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::{ApiKeySpec, ApiKeyStatus};

    fn key(name: &str, shown: Option<i64>) -> ApiKey {
        ApiKey {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team".into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: ApiKeySpec::example(),
            status: Some(ApiKeyStatus {
                last_used_at: shown.map(|s| Time(Timestamp::from_second(s).unwrap())),
                ..ApiKeyStatus::default()
            }),
        }
    }

    #[test]
    fn a_first_use_is_due_and_later_ones_hourly() {
        let keys = [
            key("never", None),
            key("recent", Some(1_000)),
            key("old", Some(1_000)),
        ];
        let cache: Vec<&ApiKey> = keys.iter().collect();
        let at = |s| Timestamp::from_second(s).unwrap();
        let used = vec![
            ("uid-never".to_owned(), at(1_060)),
            ("uid-recent".to_owned(), at(1_000 + 3_599)),
            ("uid-old".to_owned(), at(1_000 + 3_600)),
            ("uid-unknown".to_owned(), at(5_000)),
        ];
        let names: Vec<String> = due(&used, &cache).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["never", "old"]);
    }
}
