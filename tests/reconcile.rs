//! The reconciler shell against an in-memory cluster and a real SQLite key
//! database: every branch of the life cycle, outages, and a fault at each step
//! followed by a "restart" (a fresh reconciler) that must converge.

mod support;

use jiff::SignedDuration;
use keyward::{
    Error,
    clock::Clock,
    crd::{ApiKey, KEY_ID_ANNOTATION, MANAGED_BY_LABEL},
    key::KeyHash,
    operator::core::PENDING_TIMEOUT,
    store::{KeyState, KeyStore},
    verify::Rejection,
};
use kube::ResourceExt;
use support::{Harness, Op, StoreOp, api_key, foreign_secret, owner_uid};

const NS: &str = "team-ml";

async fn verdict(h: &Harness, key: &str) -> Result<String, Rejection> {
    keyward::verify(h.store.as_ref(), key, h.clock.now())
        .await
        .unwrap()
        .map(|v| v.key_id)
}

/// The invariants of a settled ApiKey: the Secret holds the one live key, it
/// verifies, status points at it, and every other record is revoked.
async fn assert_settled(h: &Harness, key: &ApiKey) -> String {
    let plain = h
        .cluster
        .key_in(NS, &key.name_any())
        .expect("Secret holds a key");
    let set = h.store.inner.load(&key.uid().unwrap()).await.unwrap();
    assert_eq!(set.live.len(), 1, "exactly one live key: {:?}", set.live);
    let live = &set.live[0];
    assert_eq!(live.state, KeyState::Active);
    assert_eq!(live.key_hash, KeyHash::of(plain.as_bytes()));
    assert_eq!(verdict(h, &plain).await, Ok(live.key_id.clone()));
    let status = key.status.as_ref().expect("status written");
    assert_eq!(status.key_id.as_ref(), Some(&live.key_id));
    let ready = key.ready_condition().unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "KeyActive")
    );
    let secret = h.cluster.secret(NS, &key.name_any()).unwrap();
    assert_eq!(
        secret.annotations().get(KEY_ID_ANNOTATION),
        Some(&live.key_id)
    );
    plain
}

#[tokio::test]
async fn issues_a_key_into_an_owned_secret() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let plain = assert_settled(&h, &key).await;

    assert!(regex_like_key(&plain), "{plain}");
    let secret = h.cluster.secret(NS, "inference").unwrap();
    assert_eq!(
        secret.labels().get(MANAGED_BY_LABEL).map(String::as_str),
        Some("keyward")
    );
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.uid, owner_uid(&key));
    assert_eq!(owner.controller, Some(true));
    let status = key.status.as_ref().unwrap();
    assert_eq!(status.key_hint.as_deref(), Some(&plain[..7]));
    assert_eq!(status.revision, Some(1));
    assert_eq!(status.secret_name.as_deref(), Some("inference"));
    let valid = keyward::verify(h.store.as_ref(), &plain, support::start_time())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            valid.owner.as_str(),
            valid.team.as_str(),
            valid.namespace.as_str(),
            valid.name.as_str()
        ),
        ("alice@example.com", "ml", NS, "inference")
    );
    let events = h.cluster.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "Issued");
}

fn regex_like_key(key: &str) -> bool {
    key.len() == 52 && key.starts_with("kw_") && key[3..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[tokio::test]
async fn settled_keys_see_no_writes_even_after_a_restart() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let (cluster_writes, store_writes) = (h.cluster.writes(), h.store.writes());
    h.clock.advance(SignedDuration::from_hours(30));
    for _ in 0..3 {
        h.reconciler().apply(&key).await.unwrap();
    }
    assert_eq!(h.cluster.writes(), cluster_writes);
    assert_eq!(h.store.writes(), store_writes);
    assert_eq!(h.cluster.events().len(), 1);
}

#[tokio::test]
async fn spec_metadata_edits_update_the_record_and_keep_the_key() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let before = h.cluster.key_in(NS, "inference").unwrap();
    let secret_version = h
        .cluster
        .secret(NS, "inference")
        .unwrap()
        .metadata
        .resource_version;

    key.spec.owner = "bob@example.com".into();
    key.spec.scopes = vec!["metrics".into()];
    key.metadata.generation = Some(2);
    h.converge(&mut key).await;

    assert_eq!(h.cluster.key_in(NS, "inference").unwrap(), before);
    assert_eq!(
        h.cluster
            .secret(NS, "inference")
            .unwrap()
            .metadata
            .resource_version,
        secret_version,
        "the Secret was not written"
    );
    let valid = keyward::verify(h.store.as_ref(), &before, support::start_time())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(valid.owner, "bob@example.com");
    assert_eq!(valid.scopes, ["metrics"]);
    assert_eq!(key.status.as_ref().unwrap().observed_generation, Some(2));
    assert_eq!(key.status.as_ref().unwrap().revision, Some(1));
}

#[tokio::test]
async fn a_deleted_secret_gets_a_new_key_and_the_old_one_is_revoked() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let old = h.cluster.key_in(NS, "inference").unwrap();

    h.cluster.remove_secret(NS, "inference");
    h.converge(&mut key).await;
    let new = assert_settled(&h, &key).await;
    assert_ne!(new, old);
    assert_eq!(verdict(&h, &old).await, Err(Rejection::Revoked));
    assert_eq!(key.status.as_ref().unwrap().revision, Some(2));
    let warning = h
        .cluster
        .events()
        .into_iter()
        .find(|e| e.reason == "Reissued")
        .expect("a Reissued event");
    assert!(warning.warning);
    assert!(warning.note.contains("was deleted"), "{}", warning.note);
}

#[tokio::test]
async fn an_edited_secret_gets_a_new_key_and_a_planted_key_is_never_accepted() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let old = h.cluster.key_in(NS, "inference").unwrap();

    // Someone with write access puts their own (well-formed) key into the Secret.
    let mut secret = h.cluster.secret(NS, "inference").unwrap();
    let planted = format!("kw_{}", &old[3..].chars().rev().collect::<String>());
    secret.data.as_mut().unwrap().insert(
        "api-key".into(),
        k8s_openapi::ByteString(planted.clone().into_bytes()),
    );
    h.cluster.put_secret(secret);
    h.converge(&mut key).await;

    let new = assert_settled(&h, &key).await;
    assert_ne!(new, planted);
    assert_eq!(verdict(&h, &old).await, Err(Rejection::Revoked));
    assert!(verdict(&h, &planted).await.is_err());
    assert!(
        h.cluster
            .events()
            .iter()
            .any(|e| e.reason == "Reissued" && e.note.contains("changed"))
    );
}

#[tokio::test]
async fn a_foreign_secret_is_never_touched() {
    let (mut h, _dir) = Harness::sqlite().await;
    h.cluster.put_secret(foreign_secret(NS, "inference"));
    let before = h.cluster.secret(NS, "inference").unwrap();
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    // No event announces the foreign Secret going away, so it looks again soon.
    let action = h.reconciler().apply(&key).await.unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(keyward::operator::reconciler::CONFLICT_RECHECK)
    );

    assert_eq!(h.cluster.secret(NS, "inference").unwrap(), before);
    let ready = key.ready_condition().unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretConflict")
    );
    assert!(ready.message.contains("Secret inference already exists"));
    assert!(
        h.store.inner.load("uid-1").await.unwrap().live.is_empty(),
        "no key issued"
    );

    // Repeated reconciles neither write nor repeat the Warning.
    let writes = h.cluster.writes();
    h.converge(&mut key).await;
    assert_eq!(h.cluster.writes(), writes);
    let warnings: Vec<_> = h
        .cluster
        .events()
        .into_iter()
        .filter(|e| e.warning)
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].reason, "SecretConflict");

    // Once the foreign Secret is gone, the key is issued.
    h.cluster.remove_secret(NS, "inference");
    h.converge(&mut key).await;
    assert_settled(&h, &key).await;
}

#[tokio::test]
async fn deletion_revokes_every_key_then_deletes_the_secret() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let plain = h.cluster.key_in(NS, "inference").unwrap();

    h.reconciler().cleanup(&key).await.unwrap();
    assert!(h.cluster.secret(NS, "inference").is_none());
    assert_eq!(verdict(&h, &plain).await, Err(Rejection::Revoked));
    let record = h
        .store
        .inner
        .find_by_hash(&KeyHash::of(plain.as_bytes()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.revoke_reason.as_deref(), Some("deleted"));
    assert!(h.cluster.events().iter().any(|e| e.reason == "Revoked"));
}

#[tokio::test]
async fn deletion_leaves_a_foreign_secret_alone() {
    let (mut h, _dir) = Harness::sqlite().await;
    h.cluster.put_secret(foreign_secret(NS, "inference"));
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    h.reconciler().cleanup(&key).await.unwrap();
    assert!(h.cluster.secret(NS, "inference").is_some());
}

#[tokio::test]
async fn deletion_during_a_database_outage_waits_and_says_why() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    let plain = h.cluster.key_in(NS, "inference").unwrap();
    key.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        support::start_time(),
    ));

    h.store.set_down(true);
    for _ in 0..3 {
        let reconciler = h.reconciler();
        let error = reconciler.cleanup(&key).await.unwrap_err();
        assert_eq!(error.category(), "database");
        reconciler.report_failure(&key, &error).await;
        h.cluster.refresh(&mut key);
    }
    let ready = key.ready_condition().unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "DatabaseUnavailable")
    );
    assert!(
        ready.message.contains("kept until its keys are revoked"),
        "{}",
        ready.message
    );
    assert!(
        h.cluster.secret(NS, "inference").is_some(),
        "nothing deleted before revocation"
    );
    let warnings = h
        .cluster
        .events()
        .into_iter()
        .filter(|e| e.reason == "DatabaseUnavailable")
        .count();
    assert_eq!(warnings, 1, "one Warning per transition, not per retry");

    h.store.set_down(false);
    h.reconciler().cleanup(&key).await.unwrap();
    assert_eq!(verdict(&h, &plain).await, Err(Rejection::Revoked));
    assert!(h.cluster.secret(NS, "inference").is_none());
}

#[tokio::test]
async fn an_outage_during_apply_shows_in_status_and_recovers() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.store.set_down(true);
    let reconciler = h.reconciler();
    let error = reconciler.apply(&key).await.unwrap_err();
    assert!(matches!(error, Error::Database(_)));
    reconciler.report_failure(&key, &error).await;
    h.cluster.refresh(&mut key);
    let ready = key.ready_condition().unwrap();
    assert_eq!(ready.reason, "DatabaseUnavailable");
    assert!(h.cluster.secret(NS, "inference").is_none());

    h.store.set_down(false);
    h.converge(&mut key).await;
    assert_settled(&h, &key).await;
}

/// A fault at one step of a first issuance, then restarts until settled.
async fn issuance_with_fault(inject: impl Fn(&Harness)) {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    inject(&h);
    let _ = h.reconciler().apply(&key).await;
    h.cluster.refresh(&mut key);
    // Nothing that was issued may verify unless it is in the Secret.
    check_no_stray_valid_key(&h, &key).await;
    h.converge(&mut key).await;
    h.clock.advance(PENDING_TIMEOUT);
    h.converge(&mut key).await;
    assert_settled(&h, &key).await;
    // One key became active, on the normal path or on recovery after the fault.
    let issued = h
        .metrics
        .keys_issued
        .get_or_create(&keyward::telemetry::ReasonLabel { reason: "initial" })
        .get();
    assert_eq!(issued, 1);
}

/// Every verifying key of the ApiKey is the one in its Secret, or an active key being replaced.
async fn check_no_stray_valid_key(h: &Harness, key: &ApiKey) {
    let held = h
        .cluster
        .key_in(NS, &key.name_any())
        .map(|k| KeyHash::of(k.as_bytes()));
    let set = h.store.inner.load(&key.uid().unwrap()).await.unwrap();
    let valid_unheld = set
        .live
        .iter()
        .filter(|r| r.state == KeyState::Active && Some(&r.key_hash) != held.as_ref())
        .count();
    assert!(valid_unheld <= 1, "{:?}", set.live);
}

#[tokio::test]
async fn issuance_converges_after_a_fault_at_every_step() {
    let store_faults = [StoreOp::Load, StoreOp::InsertPending, StoreOp::Activate];
    for op in store_faults {
        issuance_with_fault(|h| h.store.fail_next(op)).await;
    }
    let cluster_faults = [
        Op::GetSecret,
        Op::ApplySecret,
        Op::ApplySecretThenFail,
        Op::ApplyStatus,
    ];
    for op in cluster_faults {
        issuance_with_fault(|h| h.cluster.fail_next(op)).await;
    }
}

#[tokio::test]
async fn reissue_converges_after_a_fault_at_every_step() {
    let faults: [&dyn Fn(&Harness); 6] = [
        &|h| h.store.fail_next(StoreOp::InsertPending),
        &|h| h.cluster.fail_next(Op::ApplySecret),
        &|h| h.cluster.fail_next(Op::ApplySecretThenFail),
        &|h| h.store.fail_next(StoreOp::Activate),
        &|h| h.store.fail_next(StoreOp::Revoke),
        &|h| h.cluster.fail_next(Op::ApplyStatus),
    ];
    for inject in faults {
        let (mut h, _dir) = Harness::sqlite().await;
        let mut key = api_key("inference", "uid-1");
        h.converge(&mut key).await;
        let old = h.cluster.key_in(NS, "inference").unwrap();
        h.cluster.remove_secret(NS, "inference");

        inject(&h);
        let _ = h.reconciler().apply(&key).await;
        h.cluster.refresh(&mut key);
        check_no_stray_valid_key(&h, &key).await;
        h.converge(&mut key).await;
        h.clock.advance(PENDING_TIMEOUT);
        h.converge(&mut key).await;
        let new = assert_settled(&h, &key).await;
        assert_ne!(new, old);
        assert_eq!(verdict(&h, &old).await, Err(Rejection::Revoked));
    }
}

#[tokio::test]
async fn deletion_converges_after_a_fault_at_every_step() {
    let faults: [&dyn Fn(&Harness); 4] = [
        &|h| h.store.fail_next(StoreOp::Load),
        &|h| h.store.fail_next(StoreOp::Revoke),
        &|h| h.cluster.fail_next(Op::GetSecret),
        &|h| h.cluster.fail_next(Op::DeleteSecret),
    ];
    for inject in faults {
        let (mut h, _dir) = Harness::sqlite().await;
        let mut key = api_key("inference", "uid-1");
        h.converge(&mut key).await;
        let plain = h.cluster.key_in(NS, "inference").unwrap();

        inject(&h);
        let first = h.reconciler().cleanup(&key).await;
        assert!(first.is_err(), "the fault surfaces, so the finalizer stays");
        h.reconciler().cleanup(&key).await.unwrap();
        assert_eq!(verdict(&h, &plain).await, Err(Rejection::Revoked));
        assert!(h.cluster.secret(NS, "inference").is_none());
        assert!(h.store.inner.load("uid-1").await.unwrap().live.is_empty());
    }
}

#[tokio::test]
async fn an_abandoned_pending_key_is_revoked_after_the_timeout() {
    let (mut h, _dir) = Harness::sqlite().await;
    let mut key = api_key("inference", "uid-1");
    h.cluster.fail_next(Op::ApplySecret);
    assert!(h.reconciler().apply(&key).await.is_err());
    let pending = h.store.inner.load("uid-1").await.unwrap().live;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].state, KeyState::Pending);

    h.converge(&mut key).await;
    assert_eq!(
        h.store.inner.load("uid-1").await.unwrap().live.len(),
        2,
        "kept while young"
    );
    h.clock.advance(PENDING_TIMEOUT);
    h.converge(&mut key).await;
    assert_settled(&h, &key).await;
    let abandoned = h
        .store
        .inner
        .find_by_hash(&pending[0].key_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(abandoned.revoke_reason.as_deref(), Some("abandoned"));
}

#[tokio::test]
async fn a_settled_key_is_confirmed_from_the_watch_cache_without_a_request() {
    let (mut h, _dir) = Harness::sqlite().await;
    h.cluster.enable_cache();
    let mut key = api_key("inference", "uid-1");
    h.converge(&mut key).await;
    assert_settled(&h, &key).await;
    assert_eq!(
        h.cluster.gets(),
        0,
        "a new key needs no GET: the cache knows there is no Secret"
    );
    let status = key.status.clone().unwrap();
    let secret = h.cluster.secret(NS, "inference").unwrap();
    assert_eq!(
        status.secret_resource_version,
        secret.metadata.resource_version
    );

    // A restart (fresh reconciler and memo) over the settled key: no request at all.
    let writes = h.cluster.writes();
    h.reconcile(&mut key).await.unwrap();
    assert_eq!((h.cluster.gets(), h.cluster.writes()), (0, writes));

    // A changed Secret is read again and gets a new key.
    let mut edited = secret.clone();
    edited.data = Some(std::collections::BTreeMap::from([(
        "api-key".to_owned(),
        k8s_openapi::ByteString(b"edited".to_vec()),
    )]));
    h.cluster.put_secret(edited);
    h.converge(&mut key).await;
    assert_eq!(h.cluster.gets(), 1);
    assert_settled(&h, &key).await;
}

#[tokio::test]
async fn a_secret_made_by_someone_else_before_our_create_is_never_merged_into() {
    let (mut h, _dir) = Harness::sqlite().await;
    // The foreign Secret carries no keyward label, so the watch cache never saw it.
    h.cluster.enable_cache();
    h.cluster.put_secret(foreign_secret(NS, "inference"));
    let before = h.cluster.secret(NS, "inference").unwrap();
    let mut key = api_key("inference", "uid-1");
    h.reconcile(&mut key).await.unwrap();
    assert_eq!(h.cluster.secret(NS, "inference").unwrap(), before);
    assert_eq!(key.ready_condition().unwrap().reason, "SecretConflict");
    let set = h.store.inner.load("uid-1").await.unwrap();
    assert!(
        set.live.is_empty(),
        "the unused key is revoked: {:?}",
        set.live
    );
    // The next look reads the Secret (status says conflict) and issues nothing.
    h.reconcile(&mut key).await.unwrap();
    assert!(h.store.inner.load("uid-1").await.unwrap().live.is_empty());
    assert_eq!(key.ready_condition().unwrap().reason, "SecretConflict");
}

/// `maxKeysPerNamespace: 2` over `team-ml`.
fn limit_two() -> keyward::policy::CompiledPolicy {
    let policy: keyward::policy::ApiKeyPolicy = serde_yaml::from_str(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {name: two}\nspec:\n  namespaceSelector: {}\n  maxKeysPerNamespace: 2\n",
    )
    .unwrap();
    keyward::policy::CompiledPolicy::new(&policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_new_keys_never_passes_max_keys_per_namespace() {
    // One `kubectl apply` of five ApiKeys, reconciled all at once, in several
    // orders: never more than two hold a working key, and the first two keep them.
    let orders: [[&str; 5]; 3] = [
        ["key-e", "key-d", "key-c", "key-b", "key-a"],
        ["key-a", "key-b", "key-c", "key-d", "key-e"],
        ["key-c", "key-a", "key-e", "key-b", "key-d"],
    ];
    for order in orders {
        let (mut h, _dir) = Harness::sqlite().await;
        h.policies.upsert_policy(limit_two());
        let created = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let mut keys: Vec<ApiKey> = order
            .iter()
            .map(|name| {
                let mut key = api_key(name, &format!("uid-{name}"));
                key.metadata.creation_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created),
                );
                key
            })
            .collect();
        let reconcilers: Vec<_> = keys.iter().map(|_| h.reconciler()).collect();
        let runs = keys
            .iter()
            .zip(&reconcilers)
            .map(|(key, reconciler)| reconciler.apply(key));
        for result in futures::future::join_all(runs).await {
            result.unwrap();
        }
        let holders = h.store.inner.holders(NS).await.unwrap();
        assert_eq!(holders.len(), 2, "{order:?}: {holders:?}");
        // Later reconciles, in any order, move no place.
        for _ in 0..2 {
            for key in keys.iter_mut().rev() {
                h.reconcile(key).await.unwrap();
            }
        }
        assert_eq!(
            h.store.inner.holders(NS).await.unwrap(),
            holders,
            "{order:?}"
        );
        for key in &keys {
            let held = holders.contains(&key.uid().unwrap());
            assert_eq!(h.cluster.key_in(NS, &key.name_any()).is_some(), held);
            let status = key.status.clone().unwrap_or_default();
            let compliant = status
                .conditions
                .iter()
                .find(|c| c.type_ == keyward::crd::POLICY_COMPLIANT)
                .map(|c| c.status.clone());
            assert_eq!(
                compliant.as_deref(),
                Some(if held { "True" } else { "False" })
            );
            assert_eq!(
                status.violated_policies.is_empty(),
                held,
                "{}",
                key.name_any()
            );
        }
    }
}
