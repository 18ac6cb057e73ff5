//! The HTTP endpoints: `/healthz`, `/readyz` (database and watch sync) and
//! `/metrics` (Prometheus text with keyward's series), served on loopback.

mod support;

use std::sync::{Arc, atomic::Ordering};

use keyward::telemetry::{Endpoints, Health, Metrics, StateLabel, serve};
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

/// Just enough of a PostgreSQL server for sqlx to open connections: every
/// connection gets AuthenticationOk and ReadyForQuery, then is held open.
/// Aborting the returned task closes the port and every connection, as when the
/// database host goes away.
async fn fake_postgres() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            connections.spawn(async move {
                // The startup message: a length (itself included), then the body.
                let length = stream.read_i32().await.unwrap();
                let mut body = vec![0; usize::try_from(length).unwrap() - 4];
                stream.read_exact(&mut body).await.unwrap();
                // AuthenticationOk, then ReadyForQuery (idle).
                stream
                    .write_all(b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I")
                    .await
                    .unwrap();
                // Hold the connection open; reply to nothing else.
                let mut sink = [0; 1024];
                while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    (address, task)
}

/// With the database host gone, sqlx's pool would retry connecting until its
/// 5 s acquire timeout. The probes must not wait for that: the chart's probe
/// times out after 1 s, and the kubelet would see a timeout instead of the reason.
#[tokio::test]
async fn readiness_and_metrics_answer_promptly_while_the_database_is_down() {
    use std::time::{Duration, Instant};

    let (database, server) = fake_postgres().await;
    let store = keyward::store::SqlStore::connect(&format!(
        "postgres://keyward@{database}/keyward?sslmode=disable"
    ))
    .await
    .unwrap();
    let metrics = Arc::new(Metrics::default());
    // Counted by an earlier scrape; must not be served stale.
    metrics
        .keys_by_state
        .get_or_create(&StateLabel {
            state: "active".into(),
        })
        .set(3);
    let health = Arc::new(Health::default());
    health.watches_synced.store(true, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        Arc::new(Endpoints {
            metrics,
            store: Arc::new(store),
            health,
        }),
    ));

    server.abort();
    let _ = server.await;
    // Twice: the first check finds the pool's dead connection, the second none.
    for _ in 0..2 {
        let started = Instant::now();
        let (status, body) = get(address, "/readyz").await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("key database unreachable"), "{body}");
        // The bound is 0.5 s; 1 s is what the probe allows.
        assert!(took < Duration::from_secs(1), "/readyz took {took:?}");

        let started = Instant::now();
        let (status, text) = get(address, "/metrics").await;
        let took = started.elapsed();
        assert_eq!(status, 200);
        assert!(text.contains("keyward_leader 0"), "{text}");
        assert!(!text.contains("keyward_keys{"), "stale key counts:\n{text}");
        assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
    }
}
