//! Decoding the operator's first ApiKey LIST (issue 15).
//!
//! At start-up the ApiKey watch LISTs every ApiKey in pages of 100 before the
//! first reconcile. kube's `DeserializeGuard<ApiKey>` decodes each object into
//! a generic value tree, clones it and decodes the clone; the operator now
//! decodes through `WireApiKey` (the JSON text kept raw, the ApiKey decoded
//! from it once). This bench decodes the same pages both ways in the same run,
//! with a plain `ApiKey` decode (no guard at all) as the floor.
//!
//! The pages are what the API server sends for a settled fleet: each ApiKey
//! with its finalizer, status and the managedFields of three managers.
//!
//! Run: `cargo bench --bench decode` (`-- KEYS ROUNDS`, default 10000 and 5).

use std::time::{Duration, Instant};

use keyward::{crd::ApiKey, operator::wire::WireApiKey};
use kube::core::{DeserializeGuard, ObjectList};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Objects per page, as the operator's watch asks for them.
const PAGE: usize = 100;

/// ApiKey `i` as a LIST returns it: spec, finalizer, status, managedFields.
fn api_key(i: usize) -> serde_json::Value {
    let at = "2026-12-06T07:00:00Z";
    let fields =
        |manager: &str, operation: &str, subresource: Option<&str>, set: serde_json::Value| {
            let mut entry = json!({
                "manager": manager, "operation": operation, "apiVersion": "keyward.dev/v1alpha1",
                "time": at, "fieldsType": "FieldsV1", "fieldsV1": set,
            });
            if let Some(sub) = subresource {
                entry["subresource"] = json!(sub);
            }
            entry
        };
    json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": {
            "name": format!("key-{i:05}"),
            "namespace": format!("team-{}", i % 50),
            "uid": format!("5f0c1e2a-0000-4000-8000-{i:012}"),
            "resourceVersion": (100_000 + 3 * i).to_string(),
            "generation": 1,
            "creationTimestamp": at,
            "finalizers": ["keyward.dev/revoke"],
            "annotations": {"keyward.dev/key-id": format!("kid_{i:016}")},
            "managedFields": [
                fields("kubectl", "Apply", None, json!({"f:spec": {".": {}, "f:owner": {}, "f:scopes": {}, "f:team": {}}})),
                fields("keyward", "Update", None, json!({"f:metadata": {"f:annotations": {".": {}, "f:keyward.dev/key-id": {}}, "f:finalizers": {".": {}, "v:\"keyward.dev/revoke\"": {}}}})),
                fields("keyward", "Apply", Some("status"), json!({"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:lastTransitionTime": {}, "f:message": {}, "f:observedGeneration": {}, "f:reason": {}, "f:status": {}, "f:type": {}}}, "f:issuedAt": {}, "f:keyHint": {}, "f:keyId": {}, "f:observedGeneration": {}, "f:revision": {}, "f:secretName": {}, "f:secretResourceVersion": {}}})),
            ],
        },
        "spec": {
            "owner": format!("owner-{}@example.com", i % 500),
            "team": format!("team-{}", i % 20),
            "scopes": ["inference", "models:read"],
        },
        "status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KeyActive",
                "message": format!("key kid_{i:016} is active in Secret key-{i:05}"),
                "lastTransitionTime": at, "observedGeneration": 1,
            }],
            "observedGeneration": 1,
            "keyId": format!("kid_{i:016}"),
            "keyHint": format!("kw_{:04}", i % 10_000),
            "secretName": format!("key-{i:05}"),
            "issuedAt": at,
            "revision": 1,
            "secretResourceVersion": (100_001 + 3 * i).to_string(),
        },
    })
}

/// Decodes every page as `ObjectList<K>`, `rounds` times; the fastest round.
fn decode_all<K: DeserializeOwned + Clone>(pages: &[String], rounds: usize) -> Duration {
    (0..rounds)
        .map(|_| {
            let started = Instant::now();
            for page in pages {
                let list: ObjectList<K> = serde_json::from_str(page).expect("a page decodes");
                std::hint::black_box(list);
            }
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("SKIP: decode bench: run it with `cargo bench --bench decode`");
        return;
    }
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let keys = numbers.first().copied().unwrap_or(10_000);
    let rounds = numbers.get(1).copied().unwrap_or(5);
    let pages: Vec<String> = (0..keys)
        .collect::<Vec<_>>()
        .chunks(PAGE)
        .map(|chunk| {
            json!({
                "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKeyList",
                "metadata": {"resourceVersion": "200000", "continue": "next"},
                "items": chunk.iter().map(|&i| api_key(i)).collect::<Vec<_>>(),
            })
            .to_string()
        })
        .collect();
    let bytes: usize = pages.iter().map(String::len).sum();
    println!("=== keyward decode benchmark: the first ApiKey LIST ===");
    println!(
        "{keys} ApiKeys in {} pages of {PAGE} ({:.1} MiB of JSON, {} bytes per ApiKey); fastest of {rounds} rounds; load average {}",
        pages.len(),
        bytes as f64 / 1_048_576.0,
        bytes / keys.max(1),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let guard = decode_all::<DeserializeGuard<ApiKey>>(&pages, rounds);
    let wire = decode_all::<WireApiKey>(&pages, rounds);
    let plain = decode_all::<ApiKey>(&pages, rounds);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / keys.max(1) as f64;
    for (what, took) in [
        ("DeserializeGuard<ApiKey> (kube, before)", guard),
        ("WireApiKey (the operator now)", wire),
        ("ApiKey, no guard (floor)", plain),
    ] {
        println!(
            "{what:<42} {:>8.1} ms for all pages, {:>6.2} µs per ApiKey",
            took.as_secs_f64() * 1000.0,
            per(took)
        );
    }
    println!(
        "WireApiKey takes {:.2}x DeserializeGuard's time and {:.2}x the unguarded decode's",
        wire.as_secs_f64() / guard.as_secs_f64(),
        wire.as_secs_f64() / plain.as_secs_f64()
    );
}
