//! The HTTP endpoints: `/healthz`, `/readyz` (database and watch sync) and
//! `/metrics` (Prometheus text with keyward's series), served on loopback.

mod support;

use std::sync::{Arc, atomic::Ordering};

use keyward::telemetry::{Endpoints, Health, Metrics, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (store, _dir) = support::sqlite_store().await;
    let store = Arc::new(store);
    let mut h = support::Harness::new((*store).clone());
    let metrics: Arc<Metrics> = h.metrics.clone();
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let endpoints = Arc::new(Endpoints {
        metrics: metrics.clone(),
        store: store.clone(),
        health: health.clone(),
    });
    tokio::spawn(serve(listener, endpoints));

    assert_eq!(get(address, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(address, "/nope").await.0, 404);

    // Not ready until the watches are synced, unless waiting as a standby.
    let (status, body) = get(address, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "watches not synced yet\n"));
    health.standby.store(true, Ordering::SeqCst);
    assert_eq!(get(address, "/readyz").await.0, 200);
    health.standby.store(false, Ordering::SeqCst);
    health.watches_synced.store(true, Ordering::SeqCst);
    assert_eq!(get(address, "/readyz").await.0, 200);

    // A reconcile that issues a key shows up in the series.
    let mut key = support::api_key("inference", "uid-1");
    key.spec.rotation = Some(keyward::crd::RotationSpec {
        schedule: Some("@daily".into()),
        ..Default::default()
    });
    let started = std::time::Instant::now();
    h.reconciler().apply(&key).await.unwrap();
    metrics.observe_reconcile(started, None);
    let (status, text) = get(address, "/metrics").await;
    assert_eq!(status, 200);
    for series in [
        r#"keyward_reconciles_total{result="ok",category="none"} 1"#,
        r#"keyward_keys_issued_total{reason="initial"} 1"#,
        r#"keyward_keys{state="active"} 1"#,
        r#"keyward_keys{state="revoked"} 0"#,
        r#"keyward_next_rotation_timestamp_seconds{namespace="team-ml",name="inference"} 1795392000"#,
        "keyward_leader 0",
        "# TYPE keyward_reconcile_duration_seconds histogram",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );

    // The database goes away: not ready, and /readyz says why.
    store.close().await;
    let (status, body) = get(address, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("key database unreachable"), "{body}");
    assert_eq!(
        get(address, "/healthz").await.0,
        200,
        "liveness does not depend on the database"
    );
}
