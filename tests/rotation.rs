//! Rotation through the reconciler shell with an in-memory cluster, a real SQLite
//! key database and a manual clock: schedules, grace periods, requests,
//! emergencies, rollouts, operator restarts and a fault at every step.

mod support;

use std::collections::BTreeMap;

use jiff::SignedDuration;
use keyward::{
    clock::Clock,
    crd::{ApiKey, RolloutKind, RolloutSpec, RolloutTarget, RotationSpec},
    operator::core::PENDING_TIMEOUT,
    store::{KeyState, KeyStore},
    verify::Rejection,
};
use support::{Harness, Op, StoreOp, api_key};

const NS: &str = "team-ml";

/// An ApiKey rotating `@every 20s` with a 10 s grace period and one rollout target.
fn rotating_key() -> ApiKey {
    let mut key = api_key("inference", "uid-1");
    key.spec.rotation = Some(RotationSpec {
        schedule: Some("@every 20s".into()),
        time_zone: None,
        grace_period: Some("10s".into()),
    });
    key.spec.rollout = Some(RolloutSpec {
        targets: vec![RolloutTarget {
            kind: RolloutKind::Deployment,
            name: "scorer".into(),
        }],
    });
    key
}

async fn verdict(h: &Harness, key: &str) -> Result<String, Rejection> {
    keyward::verify(h.store.as_ref(), key, h.clock.now())
        .await
        .unwrap()
        .map(|v| v.state)
}

fn secret_key(h: &Harness) -> String {
    h.cluster
        .key_in(NS, "inference")
        .expect("the Secret holds a key")
}

/// The rotation invariant: the Secret's key verifies, and the valid keys are
/// at most the current one plus the retiring ones (one active, or two while
/// an issuance is being confirmed).
async fn check_invariant(h: &Harness) {
    assert!(
        verdict(h, &secret_key(h)).await.is_ok(),
        "the Secret holds a key that does not verify"
    );
    let live = h.store.inner.load("uid-1").await.unwrap().live;
    let now = h.clock.now();
    let valid_active = live
        .iter()
        .filter(|r| r.state != KeyState::Retiring)
        .filter(|r| r.expires_at.is_none_or(|at| at > now))
        .count();
    assert!(valid_active <= 2, "{live:?}");
}

#[tokio::test]
async fn a_scheduled_rotation_keeps_the_old_key_for_the_grace_period() {
    let (mut h, _dir) = Harness::sqlite().await;
    h.cluster.add_workload("scorer");
    let mut key = rotating_key();
    h.converge(&mut key).await;
    let first = secret_key(&h);
    let status = key.status.clone().unwrap();
    let started = h.clock.now();
    assert_eq!(
        status.next_rotation_at.unwrap().0,
        started + SignedDuration::from_secs(20)
    );
    assert_eq!(
        h.cluster.restarts("scorer"),
        0,
        "the first key restarts nothing"
    );

    h.clock.advance(SignedDuration::from_secs(20));
    h.converge(&mut key).await;
    let second = secret_key(&h);
    assert_ne!(first, second);
    assert_eq!(verdict(&h, &first).await, Ok("retiring".into()));
    assert_eq!(verdict(&h, &second).await, Ok("active".into()));
    let status = key.status.clone().unwrap();
    let rotated = started + SignedDuration::from_secs(20);
    assert_eq!(status.last_rotated_at.unwrap().0, rotated);
    assert_eq!(
        status.next_rotation_at.unwrap().0,
        rotated + SignedDuration::from_secs(20)
    );
    assert_eq!(
        status.previous_key_expires_at.unwrap().0,
        rotated + SignedDuration::from_secs(10)
    );
    assert_eq!(status.revision, Some(2));
    assert_eq!(h.cluster.restarts("scorer"), 1);
    assert!(h.cluster.events().iter().any(|e| e.reason == "Rotated"));

    // More reconciles during the grace period change nothing and restart nothing.
    let writes = (h.cluster.writes(), h.store.writes());
    h.clock.advance(SignedDuration::from_secs(5));
    h.converge(&mut key).await;
    assert_eq!((h.cluster.writes(), h.store.writes()), writes);
    assert_eq!(h.cluster.restarts("scorer"), 1);

    // The grace period ends: the old key stops working, then is revoked.
    h.clock.advance(SignedDuration::from_secs(5));
    assert_eq!(verdict(&h, &first).await, Err(Rejection::Expired));
    h.converge(&mut key).await;
    assert_eq!(verdict(&h, &first).await, Err(Rejection::Revoked));
    assert_eq!(verdict(&h, &second).await, Ok("active".into()));
    assert_eq!(key.status.as_ref().unwrap().previous_key_expires_at, None);
}

#[tokio::test]
async fn downtime_over_many_slots_rotates_once_and_a_quiet_restart_writes_nothing() {
    let (mut h, _dir) = Harness::sqlite().await;
    h.cluster.add_workload("scorer");
    let mut key = rotating_key();
    h.converge(&mut key).await;

    // Restart with nothing due: no writes.
    let writes = (h.cluster.writes(), h.store.writes());
    h.clock.advance(SignedDuration::from_secs(10));
    h.converge(&mut key).await;
    assert_eq!((h.cluster.writes(), h.store.writes()), writes);

    // The operator was away for an hour (180 slots): one rotation.
    h.clock.advance(SignedDuration::from_hours(1));
    h.converge(&mut key).await;
    h.converge(&mut key).await;
    assert_eq!(key.status.as_ref().unwrap().revision, Some(2));
    assert_eq!(h.cluster.restarts("scorer"), 1);
}

#[tokio::test]
async fn a_rotate_annotation_rotates_once_per_value() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let first = secret_key(&h);

    key.metadata.annotations = Some(BTreeMap::from([(
        "keyward.dev/rotate".to_owned(),
        "2026-11-22".to_owned(),
    )]));
    h.converge(&mut key).await;
    let second = secret_key(&h);
    assert_ne!(first, second);
    assert_eq!(
        verdict(&h, &first).await,
        Ok("retiring".into()),
        "default 1h grace"
    );
    assert_eq!(
        key.status
            .as_ref()
            .unwrap()
            .last_rotation_request
            .as_deref(),
        Some("2026-11-22")
    );
    for _ in 0..3 {
        h.converge(&mut key).await;
    }
    assert_eq!(secret_key(&h), second, "the same value never rotates twice");
    assert_eq!(key.status.as_ref().unwrap().revision, Some(2));
}

#[tokio::test]
async fn an_emergency_rotation_revokes_every_previous_key_at_once() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = rotating_key();
    h.converge(&mut key).await;
    let first = secret_key(&h);
    h.clock.advance(SignedDuration::from_secs(20));
    h.converge(&mut key).await;
    let second = secret_key(&h);
    assert_eq!(verdict(&h, &first).await, Ok("retiring".into()));

    key.metadata.annotations = Some(BTreeMap::from([
        ("keyward.dev/rotate".to_owned(), "leak-42".to_owned()),
        ("keyward.dev/revoke-previous".to_owned(), "now".to_owned()),
    ]));
    h.converge(&mut key).await;
    let third = secret_key(&h);
    assert_eq!(verdict(&h, &first).await, Err(Rejection::Revoked));
    assert_eq!(verdict(&h, &second).await, Err(Rejection::Revoked));
    assert_eq!(verdict(&h, &third).await, Ok("active".into()));
    assert!(
        h.cluster
            .events()
            .iter()
            .any(|e| e.warning && e.reason == "Rotated" && e.note.contains("emergency"))
    );
    h.converge(&mut key).await;
    assert_eq!(secret_key(&h), third, "handled once");
}

#[tokio::test]
async fn expires_after_ends_validity_without_rotation() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    key.spec.expires_after = Some("1h".into());
    h.converge(&mut key).await;
    let plain = secret_key(&h);
    let expires = key.status.as_ref().unwrap().expires_at.clone().unwrap().0;
    assert_eq!(expires, h.clock.now() + SignedDuration::from_hours(1));

    h.clock.advance(SignedDuration::from_hours(1));
    assert_eq!(verdict(&h, &plain).await, Err(Rejection::Expired));
    h.converge(&mut key).await;
    assert_eq!(secret_key(&h), plain, "expiry does not rotate");
    assert_eq!(key.ready_condition().unwrap().reason, "KeyExpired");

    // A rotation request starts a new period.
    key.metadata.annotations = Some(BTreeMap::from([(
        "keyward.dev/rotate".to_owned(),
        "renew".to_owned(),
    )]));
    h.converge(&mut key).await;
    assert_eq!(verdict(&h, &secret_key(&h)).await, Ok("active".into()));
    assert_eq!(key.ready_condition().unwrap().reason, "KeyActive");
    // ... and the expired key stays dead: no grace period brings it back.
    assert_eq!(verdict(&h, &plain).await, Err(Rejection::Revoked));
    let hash = keyward::key::KeyHash::of(plain.as_bytes());
    let old = h.store.inner.find_by_hash(&hash).await.unwrap().unwrap();
    assert_eq!(old.revoke_reason.as_deref(), Some("expired"));
}

#[tokio::test]
async fn a_key_rotated_just_before_its_expiry_keeps_its_own_expiry() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = rotating_key();
    key.spec.rotation.as_mut().unwrap().grace_period = Some("1h".into());
    key.spec.expires_after = Some("15s".into());
    key.spec.rollout = None;
    h.converge(&mut key).await;
    let first = secret_key(&h);
    let first_expiry = key.status.as_ref().unwrap().expires_at.clone().unwrap().0;

    h.clock.advance(SignedDuration::from_secs(10));
    key.metadata.annotations = Some(BTreeMap::from([(
        "keyward.dev/rotate".to_owned(),
        "before-expiry".to_owned(),
    )]));
    h.converge(&mut key).await;
    assert_ne!(secret_key(&h), first);
    assert_eq!(verdict(&h, &first).await, Ok("retiring".into()));
    assert_eq!(
        key.status
            .as_ref()
            .unwrap()
            .previous_key_expires_at
            .clone()
            .unwrap()
            .0,
        first_expiry,
        "the grace period ends at the old key's own expiry, not an hour later"
    );
    h.clock.advance(SignedDuration::from_secs(5));
    assert_eq!(verdict(&h, &first).await, Err(Rejection::Expired));
    h.converge(&mut key).await;
    assert_eq!(verdict(&h, &first).await, Err(Rejection::Revoked));
}

#[tokio::test]
async fn revoke_previous_makes_exactly_one_rotation_an_emergency() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = rotating_key();
    key.spec.rotation.as_mut().unwrap().schedule = None;
    key.spec.rollout = None;
    h.converge(&mut key).await;
    let first = secret_key(&h);

    key.metadata.annotations = Some(BTreeMap::from([
        ("keyward.dev/rotate".to_owned(), "leak-1".to_owned()),
        ("keyward.dev/revoke-previous".to_owned(), "now".to_owned()),
    ]));
    h.converge(&mut key).await;
    let second = secret_key(&h);
    assert_eq!(verdict(&h, &first).await, Err(Rejection::Revoked));
    assert_eq!(
        h.cluster.consumed(),
        vec![("leak-1".to_owned(), "now".to_owned())],
        "the annotation is removed once the emergency is handled"
    );
    let status = key.status.clone().unwrap();
    assert_eq!(status.last_emergency_request.as_deref(), Some("leak-1"));
    assert_eq!(status.last_rotation_request.as_deref(), Some("leak-1"));

    // The API server dropped the annotation; months later a routine request keeps a grace period.
    key.metadata.annotations = Some(BTreeMap::from([(
        "keyward.dev/rotate".to_owned(),
        "routine-2".to_owned(),
    )]));
    h.clock.advance(SignedDuration::from_hours(24 * 90));
    h.converge(&mut key).await;
    assert_ne!(secret_key(&h), second);
    assert_eq!(verdict(&h, &second).await, Ok("retiring".into()));
    let status = key.status.clone().unwrap();
    assert_eq!(status.last_emergency_request.as_deref(), Some("leak-1"));
    assert_eq!(status.last_rotation_request.as_deref(), Some("routine-2"));
    assert_eq!(h.cluster.consumed().len(), 1);
}

#[tokio::test]
async fn an_invalid_schedule_is_reported_and_touches_nothing() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = rotating_key();
    h.converge(&mut key).await;
    let plain = secret_key(&h);
    key.spec.rotation.as_mut().unwrap().schedule = Some("0 25 * * *".into());
    h.converge(&mut key).await;
    let ready = key.ready_condition().unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready.message.contains("spec.rotation.schedule"),
        "{}",
        ready.message
    );
    assert_eq!(
        verdict(&h, &plain).await,
        Ok("active".into()),
        "the key keeps working"
    );
}

#[tokio::test]
async fn a_rotation_converges_after_a_fault_at_every_step() {
    let faults: [&dyn Fn(&Harness); 8] = [
        &|h| h.store.fail_next(StoreOp::InsertPending),
        &|h| h.cluster.fail_next(Op::ApplySecret),
        &|h| h.cluster.fail_next(Op::ApplySecretThenFail),
        &|h| h.store.fail_next(StoreOp::Activate),
        &|h| h.store.fail_next(StoreOp::Retire),
        &|h| h.cluster.fail_next(Op::Restart),
        &|h| h.cluster.fail_next(Op::ApplyStatus),
        &|h| h.cluster.fail_next(Op::GetSecret),
    ];
    for (i, inject) in faults.into_iter().enumerate() {
        let (mut h, _dir) = Harness::sqlite().await;
        h.cluster.add_workload("scorer");
        let mut key = rotating_key();
        h.converge(&mut key).await;
        let first = secret_key(&h);
        h.clock.advance(SignedDuration::from_secs(20));

        inject(&h);
        let _ = h.reconcile(&mut key).await;
        check_invariant(&h).await;
        // Restart: a fresh reconciler until settled.
        h.converge(&mut key).await;
        check_invariant(&h).await;
        let second = secret_key(&h);
        assert_ne!(first, second, "fault {i}: rotated");
        assert_eq!(
            verdict(&h, &first).await,
            Ok("retiring".into()),
            "fault {i}: grace kept"
        );
        assert_eq!(
            h.cluster.restarts("scorer"),
            1,
            "fault {i}: one restart per rotation"
        );

        // Past the pending timeout (and so one more scheduled rotation): any
        // abandoned pending key is revoked, one key is active, the first is gone.
        h.clock.advance(PENDING_TIMEOUT);
        h.converge(&mut key).await;
        check_invariant(&h).await;
        let live = h.store.inner.load("uid-1").await.unwrap().live;
        assert!(
            live.iter().all(|r| r.state != KeyState::Pending),
            "fault {i}: {live:?}"
        );
        assert_eq!(
            live.iter().filter(|r| r.state == KeyState::Active).count(),
            1,
            "fault {i}"
        );
        assert_eq!(
            verdict(&h, &first).await,
            Err(Rejection::Revoked),
            "fault {i}"
        );
        assert_eq!(h.cluster.restarts("scorer"), 2, "fault {i}");
    }
}
