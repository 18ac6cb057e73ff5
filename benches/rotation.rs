//! How long rotating 1,000 keys takes, and the peak memory, through the real
//! reconciler shell and key database (SQLite file, or PostgreSQL with
//! `KEYWARD_BENCH_DATABASE_URL`) with the in-memory cluster of the tests.
//!
//! Run: `cargo bench --bench rotation` (optional args: KEYS CONCURRENCY).
//! Figures and their meaning are in docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{sync::Arc, time::Instant};

use futures::{StreamExt, stream};
use jiff::SignedDuration;
use keyward::{
    crd::{ApiKey, RotationSpec},
    operator::reconciler::RateLimiter,
    store::SqlStore,
};
use support::{Harness, api_key};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Reconciles every key once with `concurrency` in flight; returns seconds taken.
async fn reconcile_all(
    h: &mut Harness,
    keys: &mut [ApiKey],
    concurrency: usize,
    per_second: f64,
) -> f64 {
    let mut reconciler = h.reconciler();
    reconciler.issue_limiter = Arc::new(RateLimiter::per_second(per_second));
    let started = Instant::now();
    let results: Vec<_> = stream::iter(keys.iter())
        .map(|key| {
            let reconciler = reconciler.clone();
            async move { reconciler.apply(key).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        results.iter().all(Result::is_ok),
        "every reconcile succeeded"
    );
    for key in keys.iter_mut() {
        h.cluster.refresh(key);
    }
    elapsed
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let count = args.first().copied().unwrap_or(1000);
    let concurrency = args.get(1).copied().unwrap_or(8);

    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("KEYWARD_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let backend = format!("{:?}", store.backend());
    let mut h = Harness::new(store);

    let mut keys: Vec<ApiKey> = (0..count)
        .map(|i| {
            let mut key = api_key(
                &format!("key-{i}"),
                &format!("uid-{i}-{}", std::process::id()),
            );
            key.spec.rotation = Some(RotationSpec {
                schedule: Some("@daily".into()),
                time_zone: None,
                grace_period: Some("1h".into()),
            });
            key
        })
        .collect();

    println!(
        "keyward rotation benchmark: {count} keys, concurrency {concurrency}, {backend} key database"
    );
    let issue = reconcile_all(&mut h, &mut keys, concurrency, 0.0).await;
    println!(
        "  first issue of {count} keys:      {issue:>7.2} s  ({:.0} keys/s)",
        count as f64 / issue
    );
    let settled = reconcile_all(&mut h, &mut keys, concurrency, 0.0).await;
    println!("  settled reconcile of {count} keys: {settled:>7.2} s  (no writes)");

    h.clock.advance(SignedDuration::from_hours(24));
    let rotate = reconcile_all(&mut h, &mut keys, concurrency, 0.0).await;
    println!(
        "  rotation of {count} keys:          {rotate:>7.2} s  ({:.0} keys/s), no rate limit",
        count as f64 / rotate
    );

    let limit = (count as f64 / 4.0).max(1.0);
    h.clock.advance(SignedDuration::from_hours(24));
    let limited = reconcile_all(&mut h, &mut keys, concurrency, limit).await;
    println!(
        "  rotation of {count} keys:          {limited:>7.2} s  with --max-issues-per-second {limit:.0} (floor {:.2} s)",
        (count as f64 - 1.0) / limit
    );
    assert!(
        limited >= (count as f64 - 1.0) / limit * 0.99,
        "the rate limit held"
    );
    println!(
        "  peak resident memory:            {:>7.1} MiB",
        peak_rss_mib()
    );
}
