//! The leak test: a whole life cycle, outages included, with every log at
//! TRACE; then logs, Events, status, metrics, error messages and the database files are
//! searched for any key that was ever in a Secret. Nothing may be found.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use jiff::SignedDuration;
use keyward::{
    clock::Clock,
    operator::core::PENDING_TIMEOUT,
    usage::summary::recent_window,
    verifier::{Verifier, VerifierConfig},
};
use support::{Harness, Op, StoreOp, api_key, sqlite_store};

/// Collects everything every tracing subscriber layer writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_key_escapes_into_logs_events_status_errors_or_the_database() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .init();

    let (store, dir) = sqlite_store().await;
    let mut h = Harness::new(store);
    let mut key = api_key("inference", "uid-1");
    let mut keys_seen = Vec::new();
    let mut errors = Vec::new();

    // Issue, with a lost Secret response and a failed activation on the way.
    h.cluster.fail_next(Op::ApplySecretThenFail);
    h.store.fail_next(StoreOp::Activate);
    for _ in 0..4 {
        let reconciler = h.reconciler();
        if let Err(e) = &reconciler.apply(&key).await {
            reconciler.report_failure(&key, e).await;
            errors.push(format!("{e} {e:?}"));
        }
        h.cluster.refresh(&mut key);
        keys_seen.extend(h.cluster.key_in("team-ml", "inference"));
    }
    // Metadata edit, then a lost Secret, then an outage, then deletion.
    key.spec.scopes.push("metrics".into());
    h.reconciler().apply(&key).await.unwrap();
    h.cluster.refresh(&mut key);
    h.cluster.remove_secret("team-ml", "inference");
    h.reconciler().apply(&key).await.unwrap();
    h.cluster.refresh(&mut key);
    keys_seen.extend(h.cluster.key_in("team-ml", "inference"));
    // A verifier counts every key seen (the replaced ones are refused as
    // revoked), flushes, and the operator reports the revoked key in use.
    let verifier = Verifier::new(
        Arc::new(h.store.inner.clone()),
        h.clock.clone(),
        VerifierConfig::default(),
        h.metrics.clone(),
    );
    verifier.reload().await.unwrap();
    for plain in &keys_seen {
        verifier.check(plain, &["inference"]).await;
    }
    assert!(verifier.flush_usage().await.unwrap() >= 2, "counted");
    h.usage.set_recent(
        h.store
            .inner
            .recent_previous_key_use(recent_window(h.clock.now()))
            .await
            .unwrap(),
    );
    h.reconciler().apply(&key).await.unwrap();
    h.cluster.refresh(&mut key);
    assert!(
        h.cluster
            .events()
            .iter()
            .any(|e| e.reason == "RevokedKeyInUse"),
        "the revoked key's use was reported"
    );
    h.store.set_down(true);
    let reconciler = h.reconciler();
    let outage = reconciler.cleanup(&key).await.unwrap_err();
    reconciler.report_failure(&key, &outage).await;
    errors.push(format!("{outage} {outage:?}"));
    h.store.set_down(false);
    h.clock
        .advance(PENDING_TIMEOUT + SignedDuration::from_secs(1));
    h.reconciler().cleanup(&key).await.unwrap();

    keys_seen.sort();
    keys_seen.dedup();
    assert!(
        keys_seen.len() >= 2,
        "the scenario issued keys: {}",
        keys_seen.len()
    );

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("issued a key"), "TRACE logs were captured");
    let events = format!("{:?}", h.cluster.events());
    let status = serde_json::to_string(&h.cluster.status("inference")).unwrap();
    let dump = h.store.inner.dump_text().await.unwrap();
    let metrics = h.metrics.encode();
    assert!(
        metrics.contains("keyward_keys_issued_total"),
        "metrics were recorded"
    );
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        files.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let files = String::from_utf8_lossy(&files);

    for plain in &keys_seen {
        // The whole key, and the random part alone, in case a prefix was stripped.
        for needle in [plain.as_str(), &plain[3..]] {
            assert!(!logs.contains(needle), "key in logs");
            assert!(!events.contains(needle), "key in Events");
            assert!(!status.contains(needle), "key in status");
            assert!(!dump.contains(needle), "key in database rows");
            assert!(!metrics.contains(needle), "key in /metrics");
            assert!(!files.contains(needle), "key in database files");
            for error in &errors {
                assert!(!error.contains(needle), "key in an error: {error}");
            }
        }
    }
}
