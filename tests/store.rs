//! The key store contract, run unchanged against SQLite and PostgreSQL.

mod support;

use jiff::{SignedDuration, Timestamp};
use keyward::{
    Error,
    key::{KeyFactory, KeyHash, PlainKey, SeededEntropy},
    store::{IssueReason, KeyMetadata, KeyRecord, KeyState, KeyStore, RevokeReason, SqlStore},
    usage::{Outcome, UsageBatch, UsageCount},
    verify::Rejection,
};
use std::sync::Arc;
use support::start_time;

fn metadata() -> KeyMetadata {
    KeyMetadata {
        owner: "alice@example.com".into(),
        team: "ml".into(),
        scopes: vec!["inference".into(), "models:read".into()],
    }
}

fn pending(keys: &KeyFactory, uid: &str, at: Timestamp) -> (PlainKey, KeyRecord) {
    let plain = keys.new_key().unwrap();
    let record = KeyRecord {
        key_id: keys.new_key_id().unwrap(),
        key_hash: plain.hash(),
        key_hint: plain.hint(),
        apikey_uid: uid.into(),
        namespace: "team-ml".into(),
        name: "inference".into(),
        metadata: metadata(),
        state: KeyState::Pending,
        created_at: at,
        activated_at: None,
        expires_at: None,
        revoked_at: None,
        revoke_reason: None,
        issue_reason: IssueReason::Initial,
        rotation_request: None,
        cluster: "default".into(),
    };
    (plain, record)
}

fn factory() -> KeyFactory {
    KeyFactory::new("kw", Arc::new(SeededEntropy::new(42))).unwrap()
}

async fn pending_then_active(store: SqlStore) {
    let keys = factory();
    let t0 = start_time();
    let (_, record) = pending(&keys, "uid-1", t0);
    store.insert_pending(&record).await.unwrap();

    let set = store.load("uid-1").await.unwrap();
    assert_eq!(set.live, vec![record.clone()]);
    assert_eq!(set.issued, 0);

    let t1 = t0 + SignedDuration::from_secs(1);
    store.activate(&record.key_id, t1, None).await.unwrap();
    let set = store.load("uid-1").await.unwrap();
    assert_eq!(set.live[0].state, KeyState::Active);
    assert_eq!(set.live[0].activated_at, Some(t1));
    assert_eq!(set.issued, 1);

    // Activating twice is refused: the record is no longer pending.
    let again = store.activate(&record.key_id, t1, None).await;
    assert!(
        matches!(again, Err(Error::StaleKeyState { .. })),
        "{again:?}"
    );
    assert!(store.load("other-uid").await.unwrap().live.is_empty());
}

async fn revoke_is_final_and_idempotent(store: SqlStore) {
    let keys = factory();
    let t0 = start_time();
    let (_, record) = pending(&keys, "uid-1", t0);
    store.insert_pending(&record).await.unwrap();
    store.activate(&record.key_id, t0, None).await.unwrap();

    let t1 = t0 + SignedDuration::from_secs(5);
    store
        .revoke(&record.key_id, RevokeReason::Deleted, t1)
        .await
        .unwrap();
    store
        .revoke(
            &record.key_id,
            RevokeReason::Replaced,
            t1 + SignedDuration::from_secs(9),
        )
        .await
        .unwrap();

    let set = store.load("uid-1").await.unwrap();
    assert!(set.live.is_empty());
    assert_eq!(set.issued, 1, "revoked keys still count as issued");
    let found = store.find_by_hash(&record.key_hash).await.unwrap().unwrap();
    assert_eq!(found.state, KeyState::Revoked);
    assert_eq!(found.revoked_at, Some(t1));
    assert_eq!(found.revoke_reason.as_deref(), Some("deleted"));
    assert!(matches!(
        store.activate(&record.key_id, t1, None).await,
        Err(Error::StaleKeyState { .. })
    ));
}

async fn metadata_updates_in_place_and_audit_trail(store: SqlStore) {
    let keys = factory();
    let t0 = start_time();
    let (_, record) = pending(&keys, "uid-1", t0);
    store.insert_pending(&record).await.unwrap();
    store.activate(&record.key_id, t0, None).await.unwrap();

    let changed = KeyMetadata {
        owner: "bob@example.com".into(),
        team: "search".into(),
        scopes: vec!["metrics".into()],
    };
    store
        .update_metadata(&record.key_id, &changed, t0)
        .await
        .unwrap();
    // The same metadata again is not a change and is not audited.
    store
        .update_metadata(&record.key_id, &changed, t0)
        .await
        .unwrap();
    let found = store.find_by_hash(&record.key_hash).await.unwrap().unwrap();
    assert_eq!(found.metadata, changed);
    assert_eq!(found.key_hash, record.key_hash, "the key itself is kept");

    store
        .revoke(&record.key_id, RevokeReason::Deleted, t0)
        .await
        .unwrap();
    let actions: Vec<String> = store
        .audit(&record.key_id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        ["issued", "activated", "metadata_changed", "revoked"]
    );
}

async fn hashes_are_unique(store: SqlStore) {
    let keys = factory();
    let (_, record) = pending(&keys, "uid-1", start_time());
    store.insert_pending(&record).await.unwrap();
    let mut copy = record.clone();
    copy.key_id = keys.new_key_id().unwrap();
    assert!(matches!(
        store.insert_pending(&copy).await,
        Err(Error::Database(_))
    ));
}

async fn verify_answers_by_state(store: SqlStore) {
    let keys = factory();
    let now = start_time();
    let (plain, record) = pending(&keys, "uid-1", now);
    store.insert_pending(&record).await.unwrap();
    let pending = keyward::verify(&store, plain.expose(), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        pending.state, "pending",
        "a key on its way into its Secret verifies"
    );

    store.activate(&record.key_id, now, None).await.unwrap();
    let valid = keyward::verify(&store, plain.expose(), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(valid.key_id, record.key_id);
    assert_eq!(valid.owner, "alice@example.com");
    assert_eq!(valid.team, "ml");
    assert_eq!(valid.scopes, ["inference", "models:read"]);
    assert_eq!(valid.state, "active");

    let stranger = keys.new_key().unwrap();
    assert_eq!(
        keyward::verify(&store, stranger.expose(), now)
            .await
            .unwrap(),
        Err(Rejection::Unknown)
    );

    store
        .revoke(&record.key_id, RevokeReason::Deleted, now)
        .await
        .unwrap();
    assert_eq!(
        keyward::verify(&store, plain.expose(), now).await.unwrap(),
        Err(Rejection::Revoked)
    );
}

async fn migrations_are_idempotent(store: SqlStore) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
}

async fn database_never_holds_the_key(store: SqlStore) {
    let keys = factory();
    let (plain, record) = pending(&keys, "uid-1", start_time());
    store.insert_pending(&record).await.unwrap();
    store
        .activate(&record.key_id, start_time(), None)
        .await
        .unwrap();
    let dump = store.dump_text().await.unwrap();
    assert!(dump.contains(record.key_hash.as_str()));
    assert!(!dump.contains(plain.expose()));
    assert!(!dump.contains(&plain.expose()[3..20]));
    assert_ne!(record.key_hash, KeyHash::of(b""));
}

/// A flush adds its counts (replicas add up), moves last use forward only,
/// and notes the verifiers' reporting; the operator's grouped reads and the
/// pruning see exactly what was written.
async fn usage_counts_add_up_and_are_read_back_grouped(store: SqlStore) {
    let keys = factory();
    let t0 = start_time();
    let hour =
        |h: i64| Timestamp::from_second(t0.as_second() - t0.as_second() % 3600 + h * 3600).unwrap();
    let (_, current) = pending(&keys, "uid-u", t0);
    store.insert_pending(&current).await.unwrap();
    store.activate(&current.key_id, t0, None).await.unwrap();
    let (_, previous) = pending(&keys, "uid-u", t0);
    store.insert_pending(&previous).await.unwrap();
    store.activate(&previous.key_id, t0, None).await.unwrap();
    store
        .retire(&previous.key_id, t0 + SignedDuration::from_hours(5), t0)
        .await
        .unwrap();
    let count = |key: &KeyRecord, h, outcome, count| UsageCount {
        key_id: key.key_id.as_str().into(),
        hour: hour(h),
        outcome,
        count,
    };
    let first = UsageBatch {
        last_used: vec![(current.key_id.as_str().into(), hour(1))],
        counts: vec![
            count(&current, 0, Outcome::Valid, 5),
            count(&current, 1, Outcome::InsufficientScope, 1),
            count(&previous, 1, Outcome::Valid, 7),
        ],
    };
    // A second verifier's flush of the same keys and hours, with an older last use.
    let second = UsageBatch {
        last_used: vec![(current.key_id.as_str().into(), hour(0))],
        counts: vec![count(&current, 0, Outcome::Valid, 3)],
    };
    assert_eq!(store.record_usage(&first, hour(1)).await.unwrap(), 1);
    assert_eq!(
        store.record_usage(&second, hour(1)).await.unwrap(),
        0,
        "last use never moves back"
    );
    assert_eq!(
        store.load("uid-u").await.unwrap().last_used_at,
        Some(hour(1))
    );

    let mut by_hour = Vec::new();
    store
        .each_usage_bucket(hour(-1), 3_600_000, &mut |uid, bucket, outcome, n| {
            by_hour.push((uid.to_owned(), bucket, outcome, n));
        })
        .await
        .unwrap();
    by_hour.sort();
    assert_eq!(
        by_hour,
        [
            ("uid-u".to_owned(), hour(0).as_second(), Outcome::Valid, 8),
            ("uid-u".to_owned(), hour(1).as_second(), Outcome::Valid, 7),
            (
                "uid-u".to_owned(),
                hour(1).as_second(),
                Outcome::InsufficientScope,
                1
            ),
        ]
    );
    let mut by_day = Vec::new();
    store
        .each_usage_bucket(hour(-48), 86_400_000, &mut |_, _, outcome, n| {
            by_day.push((outcome, n));
        })
        .await
        .unwrap();
    assert_eq!(by_day.iter().map(|(_, n)| n).sum::<i64>(), 16);

    // The previous key is still presented: the leader's scan names it.
    let recent = store.recent_previous_key_use(hour(0)).await.unwrap();
    let uses = &recent["uid-u"];
    assert_eq!(uses.len(), 1);
    assert_eq!(
        (uses[0].key_id.as_str(), uses[0].used),
        (previous.key_id.as_str(), 7)
    );
    assert_eq!(uses[0].state, KeyState::Retiring);

    // Reporting: since the first flush; a long pause starts it anew.
    assert_eq!(
        store.usage_reporting().await.unwrap(),
        Some((hour(1), hour(1)))
    );
    let later = hour(1) + SignedDuration::from_mins(5);
    store
        .record_usage(&UsageBatch::default(), later)
        .await
        .unwrap();
    assert_eq!(
        store.usage_reporting().await.unwrap(),
        Some((hour(1), later))
    );
    let after_gap = later + SignedDuration::from_mins(16);
    store
        .record_usage(&UsageBatch::default(), after_gap)
        .await
        .unwrap();
    assert_eq!(
        store.usage_reporting().await.unwrap(),
        Some((after_gap, after_gap))
    );

    // Pruning deletes whole hours before the cut.
    assert_eq!(store.prune_usage(hour(1)).await.unwrap(), 1);
    let mut left = 0;
    store
        .each_usage_bucket(hour(-1), 3_600_000, &mut |_, _, _, n| left += n)
        .await
        .unwrap();
    assert_eq!(left, 8);
}

/// The verifier follows `changes_since` from the last change number it saw,
/// so numbers must become visible in order: a change committed with a number
/// below one a follower already passed would be skipped for good. Writers
/// interleave issue, activation, metadata and revocation of their own keys
/// while a follower reads as fast as it can; every revocation must reach it.
async fn concurrent_writers_never_hide_a_change_from_a_follower(store: SqlStore) {
    const WRITERS: u64 = 8;
    const KEYS_PER_WRITER: usize = 30;
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let follower = {
        let (store, writing) = (store.clone(), writing.clone());
        tokio::spawn(async move {
            let mut after = 0;
            let mut states = std::collections::HashMap::new();
            let mut reads = 0;
            loop {
                let done = !writing.load(std::sync::atomic::Ordering::SeqCst);
                loop {
                    let batch = store.changes_since(after, 50).await.unwrap();
                    reads += 1;
                    for (seq, record) in &batch {
                        assert!(*seq > after, "change {seq} came after {after}");
                        after = *seq;
                        states.insert(record.key_id.clone(), record.state);
                    }
                    if batch.len() < 50 {
                        break;
                    }
                }
                if done {
                    return (states, reads);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let t0 = start_time();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                let keys =
                    KeyFactory::new("kw", Arc::new(SeededEntropy::new(100 + writer))).unwrap();
                let mut ids = Vec::new();
                for i in 0..KEYS_PER_WRITER {
                    let (_, record) = pending(&keys, &format!("uid-{writer}-{i}"), t0);
                    store.insert_pending(&record).await.unwrap();
                    store.activate(&record.key_id, t0, None).await.unwrap();
                    ids.push(record.key_id);
                }
                for (i, key_id) in ids.iter().enumerate() {
                    let changed = KeyMetadata {
                        owner: format!("owner-{i}@example.com"),
                        ..metadata()
                    };
                    store.update_metadata(key_id, &changed, t0).await.unwrap();
                    store
                        .revoke(key_id, RevokeReason::Deleted, t0)
                        .await
                        .unwrap();
                }
                ids
            })
        })
        .collect();
    let mut written = Vec::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (seen, reads) = follower.await.unwrap();
    assert!(
        reads > 10,
        "the follower read only {reads} times while the writers ran"
    );
    let missed: Vec<_> = written
        .iter()
        .filter(|id| seen.get(*id) != Some(&KeyState::Revoked))
        .collect();
    assert!(
        missed.is_empty(),
        "{} of {} revocations never reached the follower: {missed:?}",
        missed.len(),
        written.len()
    );
}

/// Declares each case once per backend.
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let (store, _dir) = crate::support::sqlite_store().await;
                    super::$case(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(store) = crate::support::postgres_store(stringify!($case)).await {
                        super::$case(store).await;
                    }
                }
            )*
        }
    };
}

both_backends!(
    pending_then_active,
    revoke_is_final_and_idempotent,
    metadata_updates_in_place_and_audit_trail,
    hashes_are_unique,
    verify_answers_by_state,
    migrations_are_idempotent,
    database_never_holds_the_key,
    usage_counts_add_up_and_are_read_back_grouped,
    concurrent_writers_never_hide_a_change_from_a_follower,
);

#[tokio::test]
async fn malformed_keys_are_rejected_without_the_database() {
    let (store, _dir) = support::sqlite_store().await;
    let down = support::FaultyStore::new(store);
    down.set_down(true);
    let key = factory().new_key().unwrap();
    let mut typo = key.expose().to_owned();
    typo.replace_range(5..6, if &typo[5..6] == "a" { "b" } else { "a" });
    for presented in [typo.as_str(), "kw_short", "", "not a key at all"] {
        assert_eq!(
            keyward::verify(&down, presented, start_time())
                .await
                .unwrap(),
            Err(Rejection::Malformed),
            "{presented}"
        );
    }
    // A well-formed key does need the database, and the outage is an error, not a verdict.
    assert!(
        keyward::verify(&down, key.expose(), start_time())
            .await
            .is_err()
    );
}
