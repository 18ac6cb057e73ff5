//! `keyward verifier` on a PostgreSQL hot standby (real streaming replication,
//! tests/support/replication.rs): no LISTEN where it cannot, revocations on
//! the primary refused within the bound, last-used times on the primary, no
//! error loop without a primary URL, and a lagging replica shown in metrics.

// Only part of it serves these tests; tests/replication.rs uses all of it.
#[allow(dead_code)]
#[path = "support/replication.rs"]
mod replication;
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use keyward::{
    key::{KeyFactory, OsEntropy},
    store::{KeyStore, SqlStore},
    telemetry::Metrics,
    verifier::{
        Checked, Code, Verifier, VerifierConfig,
        listen::{VerifierSettings, start},
    },
};
use replication::{Server, wait_replayed};

/// A verifier as `keyward verifier` starts it, on `url`, with its metrics.
async fn verifier(url: &str, primary: Option<String>) -> (Arc<Verifier>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let settings = VerifierSettings {
        address: "127.0.0.1:0".parse().unwrap(),
        key_header: "x-api-key".into(),
        config: VerifierConfig {
            last_used_flush: Duration::from_secs(1),
            ..VerifierConfig::default()
        },
        primary_database_url: primary,
    };
    let store = Arc::new(SqlStore::connect_lazy(url).unwrap());
    let (verifier, _) = start(store, url, settings, metrics.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while verifier.is_ready().is_err() {
        assert!(Instant::now() < deadline, "the verifier loads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (verifier, metrics)
}

async fn code(verifier: &Verifier, key: &str) -> Option<Code> {
    match verifier.check(key, &[]).await {
        Checked::Answer(verdict) => Some(verdict.code),
        Checked::Unavailable(_) => None,
    }
}

/// Polls until the verifier answers `wanted`; returns how long that took.
async fn until(verifier: &Verifier, key: &str, wanted: Code, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if code(verifier, key).await == Some(wanted) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not {wanted:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100) - 1]
}

/// A primary with a streaming hot standby, a migrated store on the primary
/// and a key factory; the temp dir holds both servers.
async fn replicated() -> (tempfile::TempDir, Server, Server, SqlStore, KeyFactory) {
    let dir = tempfile::tempdir().unwrap();
    let primary = Server::primary(dir.path(), false);
    let standby = Server::standby_of(&primary.address(), dir.path());
    let writer = SqlStore::connect(&primary.url()).await.unwrap();
    writer.migrate().await.unwrap();
    let keys = KeyFactory::new("kw", Arc::new(OsEntropy)).unwrap();
    (dir, primary, standby, writer, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_on_a_hot_standby_follows_the_primary_within_the_bound() {
    let test = "a_verifier_on_a_hot_standby_follows_the_primary_within_the_bound";
    if !replication::available(test) {
        return;
    }
    let (_dir, primary, standby, writer, keys) = replicated().await;
    let mut issued = Vec::new();
    for i in 0..50 {
        let (plain, record) =
            support::issue_active(&writer, &keys, &format!("key-{i}"), &[], None).await;
        issued.push((plain.expose().to_owned(), record.key_id));
    }
    wait_replayed(&primary, &standby);

    // Verifiers on the standby: with the primary's URL, and without.
    let (woken, woken_metrics) = verifier(&standby.url(), Some(primary.url())).await;
    let (polling, polling_metrics) = verifier(&standby.url(), None).await;
    for (key, _) in &issued {
        assert_eq!(code(&woken, key).await, Some(Code::Valid));
        assert_eq!(code(&polling, key).await, Some(Code::Valid));
    }

    // Each revocation on the primary is refused on the standby within 1 s,
    // replay included (the p99 of 50; an idle loopback replica lags by
    // milliseconds).
    let mut woken_took = Vec::new();
    let mut polling_took = Vec::new();
    let now = jiff::Timestamp::now();
    for (key, key_id) in &issued {
        writer
            .revoke(key_id, keyward::store::RevokeReason::Deleted, now)
            .await
            .unwrap();
        let revoked = Instant::now();
        until(&woken, key, Code::Revoked, Duration::from_secs(5)).await;
        woken_took.push(revoked.elapsed());
        until(&polling, key, Code::Revoked, Duration::from_secs(5)).await;
        polling_took.push(revoked.elapsed());
    }
    let (woken_p99, polling_p99) = (p99(woken_took), p99(polling_took));
    eprintln!("standby with primary URL: p99 {woken_p99:?}; polling: p99 {polling_p99:?}");
    assert!(woken_p99 < Duration::from_secs(1), "{woken_p99:?}");
    assert!(polling_p99 < Duration::from_secs(1), "{polling_p99:?}");

    // Last-used times reach the primary through its URL; without one they are
    // off (said in a metric), and neither verifier loops on errors: no LISTEN
    // on the standby, so no listener reconnects.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = primary.sql("SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL");
        if used == "50" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last-used times on the primary: {used}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(woken_metrics.verifier_last_used_disabled.get(), 0);
    assert_eq!(polling_metrics.verifier_last_used_disabled.get(), 1);
    assert_eq!(polling_metrics.verifier_listener_reconnects.get(), 0);
    assert_eq!(woken_metrics.verifier_listener_reconnects.get(), 0);
    assert_eq!(polling_metrics.verifier_last_used_flushed.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_shows_in_the_metrics_and_keeps_the_staleness_bound() {
    let test = "a_lagging_replica_shows_in_the_metrics_and_keeps_the_staleness_bound";
    if !replication::available(test) {
        return;
    }
    let (_dir, primary, standby, writer, keys) = replicated().await;
    let (plain, record) = support::issue_active(&writer, &keys, "lagging", &[], None).await;
    let key = plain.expose().to_owned();
    wait_replayed(&primary, &standby);
    let (verifier, metrics) = verifier(&standby.url(), Some(primary.url())).await;
    assert_eq!(code(&verifier, &key).await, Some(Code::Valid));

    // The replica now applies changes 3 s late.
    standby.set_apply_delay(Duration::from_secs(3));
    writer
        .revoke(
            &record.key_id,
            keyward::store::RevokeReason::Deleted,
            jiff::Timestamp::now(),
        )
        .await
        .unwrap();
    let revoked = Instant::now();
    let mut behind = 0;
    while code(&verifier, &key).await != Some(Code::Revoked) {
        behind = behind.max(metrics.verifier_replica_behind.get());
        assert!(
            revoked.elapsed() < Duration::from_secs(3 + 2),
            "refused within the replay delay plus the bound"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = revoked.elapsed();
    eprintln!("refused {took:?} after the revocation, with a 3 s replay delay");
    assert!(took >= Duration::from_secs(2), "the replica held it back");
    assert!(
        behind >= 1,
        "the lag showed in keyward_verifier_replica_behind"
    );
    assert_eq!(metrics.verifier_replica_behind.get(), 0, "caught up");
}
