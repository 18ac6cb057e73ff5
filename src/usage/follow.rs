//! The operator leader's view of usage. Every scan interval (30 s) it asks the
//! key database which keys were used lately (for `status.lastUsedAt`) and
//! which retiring or revoked keys clients still present; every
//! [`SUMMARY_INTERVAL`] (sooner after an ApiKey's first use, at most once a
//! minute) it reads the 30-day and 24-hour counts of every ApiKey in two
//! grouped queries; every hour it prunes counts past their
//! retention. What it learns goes into the [`UsageBook`] that reconciles read,
//! and the ApiKeys whose status should move are requeued. The number of
//! queries per interval is fixed, whatever the number of ApiKeys.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use kube::{
    ResourceExt,
    core::DeserializeGuard,
    runtime::reflector::{ObjectRef, Store},
};
use tracing::{debug, info, warn};

use super::{
    DAY, HOUR,
    summary::{
        IN_USE_WINDOW, RecentUse, Summary, SummaryBuilder, recent_window, revoked_key_report,
        usage_to_show, windows,
    },
};
use crate::{
    clock::Clock,
    crd::{ApiKey, PREVIOUS_KEY_IN_USE, UsageStatus},
    operator::core::shows_use,
    policy::{PolicyIndex, index::live, watch::Requeue},
    store::{KeyState, KeyStore, REPORTING_GAP, SqlStore},
    telemetry::Metrics,
};

/// How often the leader reads every ApiKey's counts for `status.usage`.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// A first use of an ApiKey brings the next summary forward, but summaries
/// still run at most this often.
const FIRST_USE_SUMMARY_GAP: Duration = Duration::from_secs(60);
/// How often counts past their retention are deleted.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// How far each scan for recent uses reaches back before the previous one:
/// uses are stored floored to the minute and flushed by verifiers a few
/// seconds later.
const OVERLAP: SignedDuration = SignedDuration::from_mins(3);

/// What the leader's scans learned, read by every reconcile. Each part is
/// `None` until its first scan, so that a restarted operator never reads "no
/// data yet" as "no use".
#[derive(Debug, Default)]
pub struct UsageBook {
    state: RwLock<BookState>,
}

#[derive(Debug, Default)]
struct BookState {
    /// The `status.usage` due to be shown, by uid (only ApiKeys due).
    pending: HashMap<String, UsageStatus>,
    recent: Option<HashMap<String, Vec<RecentUse>>>,
    /// Verifiers' reporting: (since, last).
    reporting: Option<(Timestamp, Timestamp)>,
}

impl UsageBook {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BookState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BookState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The `status.usage` the last summary found due for this ApiKey, if any.
    pub fn pending(&self, uid: &str) -> Option<UsageStatus> {
        self.read().pending.get(uid).cloned()
    }

    /// The retiring and revoked keys of one ApiKey that clients presented
    /// lately, once the first scan ran.
    pub fn recent(&self, uid: &str) -> Option<Vec<RecentUse>> {
        let state = self.read();
        let recent = state.recent.as_ref()?;
        Some(recent.get(uid).cloned().unwrap_or_default())
    }

    /// Since when verifiers have reported usage without a gap, while they
    /// still report; `None` when none reported within [`REPORTING_GAP`].
    pub fn recorded_since(&self, now: Timestamp) -> Option<Timestamp> {
        let (since, last) = self.read().reporting?;
        let gap = SignedDuration::try_from(REPORTING_GAP).unwrap_or(SignedDuration::MAX);
        (now.duration_since(last) <= gap).then_some(since)
    }

    /// Sets what a summary scan found due.
    pub fn set_pending(&self, pending: HashMap<String, UsageStatus>) {
        self.write().pending = pending;
    }

    /// Sets what a scan of recent use read.
    pub fn set_recent(&self, recent: HashMap<String, Vec<RecentUse>>) {
        self.write().recent = Some(recent);
    }

    /// Sets the verifiers' reporting (since, last).
    pub fn set_reporting(&self, reporting: Option<(Timestamp, Timestamp)>) {
        self.write().reporting = reporting;
    }
}

/// The cached ApiKeys whose status should show a use from `used` (uid, latest use).
pub fn use_due(
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
        .map(reference)
        .collect()
}

/// The cached ApiKeys whose `PreviousKeyInUse` condition should turn, or
/// whose `RevokedKeyInUse` report is due, after a scan of recent use.
pub fn attention_due(
    recent: &HashMap<String, Vec<RecentUse>>,
    cache: &[&ApiKey],
    now: Timestamp,
) -> Vec<ObjectRef<DeserializeGuard<ApiKey>>> {
    let none = Vec::new();
    cache
        .iter()
        .filter(|key| {
            let uses = key
                .metadata
                .uid
                .as_deref()
                .and_then(|uid| recent.get(uid))
                .unwrap_or(&none);
            let status = key.status.as_ref();
            let in_use = uses.iter().any(|u| {
                u.state == KeyState::Retiring
                    && u.last_used
                        .is_some_and(|at| now.duration_since(at) < IN_USE_WINDOW)
            });
            let shown = status
                .and_then(|s| s.condition(PREVIOUS_KEY_IN_USE))
                .is_some_and(|c| c.status == "True");
            let reported = status
                .and_then(|s| s.revoked_key_reported_at.as_ref())
                .map(|t| t.0);
            in_use != shown || revoked_key_report(reported, uses, now).is_some()
        })
        .map(reference)
        .collect()
}

/// The `status.usage` each cached ApiKey should show now that differs from
/// what it shows (at most hourly, [`usage_to_show`]), by uid: what the book
/// keeps until the next summary, so that only the ApiKeys due hold a summary
/// in memory, not every ApiKey ever used.
pub fn pending_usage(
    summaries: &HashMap<String, Summary>,
    cache: &[&ApiKey],
    now: Timestamp,
) -> HashMap<String, (ObjectRef<DeserializeGuard<ApiKey>>, UsageStatus)> {
    cache
        .iter()
        .filter_map(|key| {
            let shown = key.status.as_ref().and_then(|s| s.usage.as_ref());
            let uid = key.metadata.uid.as_deref()?;
            let fresh = usage_to_show(shown, Some(summaries), uid, now)?;
            (Some(&fresh) != shown).then(|| (uid.to_owned(), (reference(key), fresh)))
        })
        .collect()
}

fn reference(key: &&ApiKey) -> ObjectRef<DeserializeGuard<ApiKey>> {
    ObjectRef::new(&key.name_any()).within(&key.namespace().unwrap_or_default())
}

/// The leader's usage scans, until the requeue channel closes.
pub struct UsageFollower {
    /// The key database.
    pub store: Arc<SqlStore>,
    /// The controller's ApiKey cache.
    pub keys: Store<DeserializeGuard<ApiKey>>,
    /// Where ApiKeys whose status should move are sent.
    pub requeue: Requeue,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// What reconciles read.
    pub book: Arc<UsageBook>,
    /// `keyward_usage_rows_pruned_total`.
    pub metrics: Arc<Metrics>,
    /// How long counts are kept (`--usage-retention`).
    pub retention: SignedDuration,
    /// Time between scans of recent use (`--usage-scan-interval`).
    pub scan_interval: Duration,
    /// The ApiKeyPolicies, to know whether any judges unused keys.
    pub policies: PolicyIndex,
}

impl UsageFollower {
    /// Scans until the requeue channel closes.
    pub async fn follow(self) {
        let mut since = self.clock.now() - OVERLAP;
        let mut last_summary: Option<std::time::Instant> = None;
        let mut last_prune: Option<std::time::Instant> = None;
        loop {
            let started = self.clock.now();
            let mut due = Vec::new();
            let mut first_use = false;
            match self.scan_recent(since, started, &mut due).await {
                Ok(first) => {
                    since = started - OVERLAP;
                    first_use = first;
                }
                Err(e) => warn!(error = %e, "cannot read recent key use; trying again"),
            }
            let summarize = last_summary.is_none_or(|at| {
                at.elapsed() >= SUMMARY_INTERVAL
                    || (first_use && at.elapsed() >= FIRST_USE_SUMMARY_GAP)
            });
            if summarize {
                match self.summarize(started).await {
                    Ok(summaries) => {
                        last_summary = Some(std::time::Instant::now());
                        let cached = self.keys.state();
                        let live: Vec<&ApiKey> = cached.iter().filter_map(|k| live(k)).collect();
                        let pending = pending_usage(&summaries, &live, started);
                        debug!(
                            apikeys = summaries.len(),
                            due = pending.len(),
                            "read every ApiKey's usage"
                        );
                        drop(summaries);
                        let mut shown = HashMap::with_capacity(pending.len());
                        for (uid, (reference, usage)) in pending {
                            due.push(reference);
                            shown.insert(uid, usage);
                        }
                        self.book.set_pending(shown);
                    }
                    Err(e) => warn!(error = %e, "cannot read usage counts; trying again"),
                }
            }
            if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_INTERVAL) {
                match self.store.prune_usage(started - self.retention).await {
                    Ok(pruned) => {
                        last_prune = Some(std::time::Instant::now());
                        self.metrics.usage_rows_pruned.inc_by(pruned);
                        if pruned > 0 {
                            info!(rows = pruned, "pruned usage counts past their retention");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot prune usage counts; trying again"),
                }
            }
            due.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            due.dedup();
            if !due.is_empty() {
                debug!(
                    apikeys = due.len(),
                    "requeued ApiKeys whose usage should show"
                );
            }
            for reference in due {
                if self.requeue.send(reference).is_err() {
                    return;
                }
            }
            tokio::time::sleep(self.scan_interval).await;
        }
    }

    /// Recent uses, retiring and revoked keys still presented, and the
    /// verifiers' reporting: three queries. Returns whether an ApiKey whose
    /// status shows no usage yet was used.
    async fn scan_recent(
        &self,
        since: Timestamp,
        now: Timestamp,
        due: &mut Vec<ObjectRef<DeserializeGuard<ApiKey>>>,
    ) -> crate::Result<bool> {
        let used = self.store.used_since(since).await?;
        let recent = self
            .store
            .recent_previous_key_use(recent_window(now))
            .await?;
        let was_reporting = self.book.recorded_since(now).is_some();
        self.book.set_reporting(self.store.usage_reporting().await?);
        let cached = self.keys.state();
        let live: Vec<&ApiKey> = cached.iter().filter_map(|k| live(k)).collect();
        if !was_reporting
            && self.book.recorded_since(now).is_some()
            && self.policies.judges_unused()
        {
            // lifetime.maxUnused could not judge any key until now.
            due.extend(live.iter().map(reference));
        }
        due.extend(use_due(&used, &live));
        due.extend(attention_due(&recent, &live, now));
        self.book.set_recent(recent);
        let used_uids: HashSet<&str> = used.iter().map(|(uid, _)| uid.as_str()).collect();
        let first_use = live.iter().any(|key| {
            key.status.as_ref().is_none_or(|s| s.usage.is_none())
                && key
                    .metadata
                    .uid
                    .as_deref()
                    .is_some_and(|uid| used_uids.contains(uid))
        });
        Ok(first_use)
    }

    /// Every ApiKey's counts over the status windows: two grouped queries.
    async fn summarize(&self, now: Timestamp) -> crate::Result<HashMap<String, Summary>> {
        let (first_day, first_hour) = windows(now);
        let mut builder = SummaryBuilder::new(now);
        let at = |seconds: i64| Timestamp::from_second(seconds).unwrap_or(now);
        self.store
            .each_usage_bucket(
                at(first_day),
                DAY.as_millis() as i64,
                &mut |uid, day, outcome, n| {
                    builder.day(uid, day, outcome, n);
                },
            )
            .await?;
        self.store
            .each_usage_bucket(
                at(first_hour),
                HOUR.as_millis() as i64,
                &mut |uid, hour, outcome, n| {
                    builder.hour(uid, hour, outcome, n);
                },
            )
            .await?;
        Ok(builder.summaries)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::{ApiKeySpec, ApiKeyStatus};

    fn key(name: &str, status: ApiKeyStatus) -> ApiKey {
        ApiKey {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team".into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: ApiKeySpec::example(),
            status: Some(status),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_first_use_is_due_and_later_ones_hourly() {
        let shown = |s: Option<i64>| ApiKeyStatus {
            last_used_at: s.map(|s| Time(at(s))),
            ..ApiKeyStatus::default()
        };
        let keys = [
            key("never", shown(None)),
            key("recent", shown(Some(1_000))),
            key("old", shown(Some(1_000))),
        ];
        let cache: Vec<&ApiKey> = keys.iter().collect();
        let used = vec![
            ("uid-never".to_owned(), at(1_060)),
            ("uid-recent".to_owned(), at(1_000 + 3_599)),
            ("uid-old".to_owned(), at(1_000 + 3_600)),
            ("uid-unknown".to_owned(), at(5_000)),
        ];
        let names: Vec<String> = use_due(&used, &cache).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["never", "old"]);
    }

    #[test]
    fn previous_key_use_and_revoked_key_use_requeue_only_on_a_change() {
        let now = at(10_000);
        let flagged = ApiKeyStatus {
            conditions: vec![Condition {
                type_: PREVIOUS_KEY_IN_USE.into(),
                status: "True".into(),
                reason: "PreviousKeyInUse".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(now),
            }],
            ..ApiKeyStatus::default()
        };
        let keys = [
            key("starts", ApiKeyStatus::default()),
            key("continues", flagged.clone()),
            key("stops", flagged),
            key("revoked", ApiKeyStatus::default()),
            key("idle", ApiKeyStatus::default()),
        ];
        let cache: Vec<&ApiKey> = keys.iter().collect();
        let use_of = |state, last_used: Timestamp, refused| RecentUse {
            key_id: "kid".into(),
            state,
            last_used: Some(last_used),
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            used: 1,
            refused_revoked: refused,
            since: recent_window(now),
        };
        let recent = HashMap::from([
            (
                "uid-starts".to_owned(),
                vec![use_of(KeyState::Retiring, now, 0)],
            ),
            (
                "uid-continues".to_owned(),
                vec![use_of(KeyState::Retiring, now, 0)],
            ),
            (
                "uid-stops".to_owned(),
                vec![use_of(KeyState::Retiring, now - IN_USE_WINDOW, 0)],
            ),
            (
                "uid-revoked".to_owned(),
                vec![use_of(KeyState::Revoked, now, 4)],
            ),
        ]);
        let names: Vec<String> = attention_due(&recent, &cache, now)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["starts", "stops", "revoked"]);
    }

    #[test]
    fn the_book_knows_nothing_before_its_scans_and_forgets_silent_verifiers() {
        let book = UsageBook::default();
        assert!(book.pending("u").is_none());
        assert_eq!(book.recent("u"), None);
        book.set_recent(HashMap::new());
        assert_eq!(book.recent("u"), Some(vec![]));
        assert_eq!(book.recorded_since(at(0)), None);
        book.set_reporting(Some((at(0), at(100))));
        assert_eq!(book.recorded_since(at(100 + 15 * 60)), Some(at(0)));
        assert_eq!(
            book.recorded_since(at(101 + 15 * 60)),
            None,
            "silent too long"
        );
    }
}
