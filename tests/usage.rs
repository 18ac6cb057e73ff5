//! Usage in the reconciler: `status.usage` (written at most hourly),
//! `PreviousKeyInUse`, `RevokedKeyInUse` and `lifetime.maxUnused`, against an
//! in-memory cluster and a real SQLite key database holding real counts. The
//! usage book is filled from the database exactly as the leader's scans fill it.

mod support;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keyward::{
    clock::Clock,
    crd::{ApiKey, POLICY_COMPLIANT, PREVIOUS_KEY_IN_USE},
    policy::{ApiKeyPolicy, CompiledPolicy},
    store::{KeyState, KeyStore},
    telemetry::NamespaceLabel,
    usage::{
        DAY, HOUR, Outcome, UsageBatch, UsageCount,
        follow::pending_usage,
        summary::{SummaryBuilder, recent_window, windows},
    },
};
use kube::ResourceExt;
use support::{Harness, api_key};

const NS: &str = "team-ml";

/// What the leader's scans would put in the book now.
async fn scan(h: &Harness, keys: &[&ApiKey]) {
    let store = &h.store.inner;
    let now = h.clock.now();
    let (first_day, first_hour) = windows(now);
    let mut builder = SummaryBuilder::new(now);
    let at = |s| Timestamp::from_second(s).unwrap();
    store
        .each_usage_bucket(
            at(first_day),
            DAY.as_millis() as i64,
            &mut |uid, b, o, n| builder.day(uid, b, o, n),
        )
        .await
        .unwrap();
    store
        .each_usage_bucket(
            at(first_hour),
            HOUR.as_millis() as i64,
            &mut |uid, b, o, n| builder.hour(uid, b, o, n),
        )
        .await
        .unwrap();
    let pending = pending_usage(&builder.summaries, keys, now);
    h.usage.set_pending(
        pending
            .into_iter()
            .map(|(uid, (_, usage))| (uid, usage))
            .collect(),
    );
    h.usage.set_recent(
        store
            .recent_previous_key_use(recent_window(now))
            .await
            .unwrap(),
    );
    h.usage
        .set_reporting(store.usage_reporting().await.unwrap());
}

/// A verifier's flush: `n` checks of `key_id` with `outcome` now.
async fn flush(h: &Harness, key_id: &str, outcome: Outcome, n: u64) {
    let now = h.clock.now();
    let minute = Timestamp::from_second(now.as_second() - now.as_second() % 60).unwrap();
    let hour = Timestamp::from_second(now.as_second() - now.as_second() % 3600).unwrap();
    let batch = UsageBatch {
        last_used: if outcome.used() {
            vec![(key_id.into(), minute)]
        } else {
            vec![]
        },
        counts: vec![UsageCount {
            key_id: key_id.into(),
            hour,
            outcome,
            count: n,
        }],
    };
    h.store.inner.record_usage(&batch, now).await.unwrap();
}

fn condition<'a>(
    key: &'a ApiKey,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    key.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn warnings(h: &Harness, reason: &str) -> Vec<String> {
    h.cluster
        .events()
        .into_iter()
        .filter(|e| e.warning && e.reason == reason)
        .map(|e| e.note)
        .collect()
}

/// Rotates `key` and returns (current key id, previous key id).
async fn rotate(
    h: &mut Harness,
    key: &mut ApiKey,
    request: &str,
    immediate: bool,
) -> (String, String) {
    let previous = key.status.as_ref().unwrap().key_id.clone().unwrap();
    let annotations = key
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert("keyward.dev/rotate".into(), request.into());
    if immediate {
        annotations.insert("keyward.dev/revoke-previous".into(), "true".into());
    }
    h.converge(key).await;
    let current = key.status.as_ref().unwrap().key_id.clone().unwrap();
    assert_ne!(current, previous);
    (current, previous)
}

#[tokio::test]
async fn status_shows_usage_at_most_hourly_and_a_previous_key_still_presented() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    // Before the leader's first scan nothing is claimed either way.
    assert!(key.status.as_ref().unwrap().usage.is_none());
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    assert!(
        key.status.as_ref().unwrap().usage.is_none(),
        "never used: no usage at all, not zeros"
    );
    let (current, previous) = rotate(&mut h, &mut key, "r1", false).await;

    // Clients present both keys; one still holds the previous one.
    flush(&h, &current, Outcome::Valid, 40).await;
    flush(&h, &current, Outcome::InsufficientScope, 2).await;
    flush(&h, &previous, Outcome::Valid, 37).await;
    scan(&h, &[&key]).await;
    let writes = h.cluster.writes();
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(h.cluster.writes(), writes + 1, "one status write");
    let usage = key.status.as_ref().unwrap().usage.clone().unwrap();
    assert_eq!(
        (usage.last24h, usage.refused_last24h, usage.last7d),
        (79, 2, 79)
    );
    assert_eq!(usage.daily.valid.len(), 30);
    assert_eq!(usage.daily.valid[29], 77);
    assert_eq!(usage.hourly.valid[23], 77);
    let in_use = condition(&key, PREVIOUS_KEY_IN_USE).unwrap();
    assert_eq!(in_use.status, "True");
    assert!(
        in_use.message.contains("37 requests since"),
        "{}",
        in_use.message
    );
    assert!(in_use.message.contains(&previous), "{}", in_use.message);
    let warned = warnings(&h, PREVIOUS_KEY_IN_USE);
    assert_eq!(warned.len(), 1, "{warned:?}");

    // Within the hour: more use changes nothing in status, and writes nothing.
    h.clock.advance(SignedDuration::from_mins(2));
    flush(&h, &current, Outcome::Valid, 100).await;
    flush(&h, &previous, Outcome::Valid, 5).await;
    scan(&h, &[&key]).await;
    let writes = h.cluster.writes();
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(
        h.cluster.writes(),
        writes,
        "at most one usage write an hour"
    );
    assert_eq!(key.status.as_ref().unwrap().usage.as_ref(), Some(&usage));

    // The last client picked up the new key: the condition clears, no new warning.
    h.clock.advance(SignedDuration::from_mins(4));
    flush(&h, &current, Outcome::Valid, 1).await;
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    let cleared = condition(&key, PREVIOUS_KEY_IN_USE).unwrap();
    assert_eq!(
        (cleared.status.as_str(), cleared.reason.as_str()),
        ("False", "PreviousKeyNotInUse")
    );
    assert_eq!(warnings(&h, PREVIOUS_KEY_IN_USE).len(), 1);

    // An hour after the last usage write: the new figures show.
    h.clock.advance(SignedDuration::from_mins(55));
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    let later = key.status.as_ref().unwrap().usage.clone().unwrap();
    assert_eq!(later.last24h, 79 + 105 + 1);
    assert_eq!(
        later.updated_at.0,
        Timestamp::from_second(h.clock.now().as_second()).unwrap()
    );
    // And a reconcile right after writes nothing.
    let writes = h.cluster.writes();
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(h.cluster.writes(), writes);
}

#[tokio::test]
async fn a_revoked_key_still_presented_is_reported_at_most_hourly() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-2");
    h.converge(&mut key).await;
    let (_, previous) = rotate(&mut h, &mut key, "leak", true).await;
    let set = h.store.inner.load("uid-2").await.unwrap();
    assert!(
        set.live.iter().all(|r| r.key_id != previous),
        "revoked at once"
    );

    flush(&h, &previous, Outcome::Revoked, 12).await;
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    let reported = warnings(&h, "RevokedKeyInUse");
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(
        reported[0].starts_with("12 requests since"),
        "{}",
        reported[0]
    );
    assert!(reported[0].contains(&previous));
    assert!(
        reported[0].contains("by an emergency rotation"),
        "{}",
        reported[0]
    );
    let counted = h
        .metrics
        .revoked_key_in_use
        .get_or_create(&NamespaceLabel {
            namespace: NS.into(),
        })
        .get();
    assert_eq!(counted, 1);
    // No previous key in its grace period: no PreviousKeyInUse condition.
    assert!(condition(&key, PREVIOUS_KEY_IN_USE).is_none());

    // More attempts within the hour: no second report.
    h.clock.advance(SignedDuration::from_mins(30));
    flush(&h, &previous, Outcome::Revoked, 3).await;
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(warnings(&h, "RevokedKeyInUse").len(), 1);
    // An hour after the report, still presented: reported again.
    h.clock.advance(SignedDuration::from_mins(31));
    flush(&h, &previous, Outcome::Revoked, 1).await;
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(warnings(&h, "RevokedKeyInUse").len(), 2);
    // Nobody presents it any more (counts older than the scanned window): silence.
    h.clock.advance(SignedDuration::from_hours(3));
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(warnings(&h, "RevokedKeyInUse").len(), 2);
}

fn unused_policy(action: &str) -> CompiledPolicy {
    let policy: ApiKeyPolicy = serde_yaml::from_str(&format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {{name: idle}}\nspec:\n  namespaceSelector: {{}}\n  lifetime: {{maxUnused: 24h}}\n  onViolation: {action}\n"
    ))
    .unwrap();
    CompiledPolicy::new(&policy)
}

/// An ApiKey created at the harness's start.
fn created_key(name: &str, uid: &str, h: &Harness) -> ApiKey {
    let mut key = api_key(name, uid);
    key.metadata.creation_timestamp = Some(Time(h.clock.now()));
    key
}

fn compliance(key: &ApiKey) -> (String, String) {
    let c = condition(key, POLICY_COMPLIANT).unwrap();
    (c.status.clone(), c.message.clone())
}

#[tokio::test]
async fn max_unused_flags_a_key_nobody_uses_under_each_on_violation_mode() {
    for action in ["Keep", "RefuseRotation", "Revoke"] {
        let (mut h, _dir) = Harness::sqlite().await;
        h.policies.upsert_policy(unused_policy(action));
        let mut idle = created_key("idle", "uid-idle", &h);
        let mut busy = created_key("busy", "uid-busy", &h);
        h.converge(&mut idle).await;
        h.converge(&mut busy).await;
        let busy_key = busy.status.as_ref().unwrap().key_id.clone().unwrap();
        // Verifiers report every 12 minutes from the start; only `busy` is
        // used, once an hour.
        for step in 0..26 * 5 {
            h.clock.advance(SignedDuration::from_mins(12));
            if step % 5 == 0 {
                flush(&h, &busy_key, Outcome::Valid, 1).await;
            } else {
                h.store
                    .inner
                    .record_usage(&UsageBatch::default(), h.clock.now())
                    .await
                    .unwrap();
            }
        }
        scan(&h, &[&idle, &busy]).await;
        h.reconcile(&mut idle).await.unwrap();
        h.reconcile(&mut busy).await.unwrap();
        assert_eq!(compliance(&busy).0, "True", "{action}: a used key is fine");
        let (status, message) = compliance(&idle);
        assert_eq!(status, "False", "{action}");
        assert!(
            message.contains("lifetime.maxUnused") && message.contains("never used"),
            "{action}: {message}"
        );
        assert_eq!(idle.status.as_ref().unwrap().violated_policies, ["idle"]);
        let live = h.store.inner.load("uid-idle").await.unwrap().live;
        match action {
            // Flagged; the key keeps working (RefuseRotation: until a rotation
            // is due, and this key has no schedule).
            "Keep" | "RefuseRotation" => {
                assert_eq!(live.len(), 1, "{action}");
                assert_eq!(live[0].state, KeyState::Active);
            }
            _ => assert!(live.is_empty(), "{action}: revoked at once"),
        }
        assert_eq!(warnings(&h, "PolicyViolation").len(), 1, "{action}");
    }
}

#[tokio::test]
async fn max_unused_never_judges_without_usage_reports() {
    let (mut h, _dir) = Harness::sqlite().await;
    h.policies.upsert_policy(unused_policy("Revoke"));
    let mut key = created_key("quiet", "uid-q", &h);
    h.converge(&mut key).await;
    // Two days with no verifier reporting at all: no data is not "unused".
    h.clock.advance(SignedDuration::from_hours(48));
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(compliance(&key).0, "True");
    // Verifiers start reporting: still not judged until they cover the window.
    h.store
        .inner
        .record_usage(&UsageBatch::default(), h.clock.now())
        .await
        .unwrap();
    scan(&h, &[&key]).await;
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(compliance(&key).0, "True");
    assert_eq!(h.store.inner.load("uid-q").await.unwrap().live.len(), 1);
    assert_eq!(key.name_any(), "quiet");
}
