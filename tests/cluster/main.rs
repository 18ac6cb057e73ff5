//! Cluster tests against a real API server (see harness.rs for how one is
//! found or started). Each test starts its own API server and operator.

mod admission;
mod chart;
mod dashboard;
mod database;
mod harness;
mod limits;
mod policy;
mod roles;
#[path = "../support/mod.rs"]
mod support;
mod usage;
mod verifier;
#[path = "../support/webdriver.rs"]
mod webdriver;
// Only part of it serves these tests; tests/replication.rs uses all of it.
#[allow(dead_code)]
#[path = "../support/replication.rs"]
mod replication;

use std::{collections::BTreeSet, time::Duration};

use harness::{Cluster, Operator, Postgres, verify, wait_for};
use keyward::store::{KeyStore, SqlStore};

const NS: &str = "default";

fn apikey(name: &str, scopes: &str, extra: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{team: ml}}\nspec:\n  owner: alice@example.com\n  team: ml\n  scopes: [{scopes}]\n{extra}"
    )
}

fn sqlite_url(cluster: &Cluster) -> String {
    format!("sqlite://{}", cluster.dir.path().join("keys.db").display())
}

/// Waits until the ApiKey is Ready and its Secret holds a key; returns the key.
fn ready_key(cluster: &Cluster, name: &str, secret: &str, timeout: Duration) -> String {
    wait_for(&format!("{name} to be ready"), timeout, || {
        let ready = cluster.field(
            &format!("apikey/{name}"),
            NS,
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        );
        (ready == "True")
            .then(|| cluster.secret_key(NS, secret))
            .flatten()
    })
}

/// The live (not revoked) key records of an ApiKey in the key database.
fn live_records(url: &str, cluster: &Cluster, name: &str, uid: Option<&str>) -> usize {
    let uid = uid.map_or_else(
        || cluster.field(&format!("apikey/{name}"), NS, "{.metadata.uid}"),
        str::to_owned,
    );
    harness::key_set(url, &uid).live.len()
}

/// A cluster with one operator on an SQLite key database, once the CRD is served.
fn start_with_operator(test: &str, rust_log: &str) -> Option<(Cluster, String, Operator)> {
    let cluster = Cluster::start(test)?;
    let url = sqlite_url(&cluster);
    let operator = cluster.operator(&url, &[], rust_log);
    wait_for("the CRD", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    Some((cluster, url, operator))
}

fn is_key(text: &str) -> bool {
    text.len() == 52
        && text.starts_with("kw_")
        && text[3..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[test]
fn crd_admission_columns_and_explain() {
    let Some(cluster) = Cluster::start("crd_admission_columns_and_explain") else {
        return;
    };
    // The committed CRD applies as is.
    let crd =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/apikey.yaml")).unwrap();
    cluster
        .try_kubectl_with_input(
            &[
                "apply",
                "--server-side",
                "--field-manager=keyward",
                "-f",
                "-",
            ],
            Some(&crd),
        )
        .unwrap();
    wait_for("the CRD to be established", Duration::from_secs(30), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });

    // The API server publishes the CRD's OpenAPI a moment after it is established.
    let explain = wait_for("kubectl explain", Duration::from_secs(30), || {
        cluster.try_kubectl(&["explain", "apikey.spec"]).ok()
    });
    for field in [
        "owner",
        "team",
        "scopes",
        "secretName",
        "description",
        "rotation",
        "expiresAfter",
        "rollout",
    ] {
        let line = explain
            .lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("{field} missing:\n{explain}"));
        assert!(!line.is_empty());
    }
    assert!(
        explain.contains("Who is accountable for the key"),
        "{explain}"
    );
    let rotation = cluster.kubectl(&["explain", "apikey.spec.rotation"]);
    assert!(rotation.contains("IANA time zone"), "{rotation}");

    let reject = |manifest: &str, expected: &str| {
        let error = cluster
            .try_kubectl_with_input(&["apply", "-f", "-"], Some(manifest))
            .unwrap_err();
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
    };
    reject(
        &apikey("a", "inference", "").replace("  owner: alice@example.com\n", ""),
        "spec.owner: Required value",
    );
    reject(
        &apikey("a", "inference", "").replace("team: ml\n  scopes", "team: Bad_Team\n  scopes"),
        "spec.team",
    );
    reject(&apikey("a", "", ""), "spec.scopes");
    reject(&apikey("a", "Inference!", ""), "spec.scopes[0]");
    reject(&apikey("a", "inference, inference", ""), "Duplicate value");
    reject(
        &apikey("a", "inference", "  rotation: {schedule: \"* * *\"}\n"),
        "schedule must be 5 cron fields",
    );
    for out_of_range in [
        "61 * * * *",
        "0 24 * * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
    ] {
        reject(
            &apikey(
                "a",
                "inference",
                &format!("  rotation: {{schedule: \"{out_of_range}\"}}\n"),
            ),
            "a cron field is out of range",
        );
    }
    for in_range in [
        "59 23 31 12 7",
        "*/15 9-17/2 L JAN-MAR MON-FRI",
        "0 0 ? * 5L",
        "0 0 15W * 1#2",
    ] {
        cluster
            .try_kubectl_with_input(
                &["apply", "--dry-run=server", "-f", "-"],
                Some(&apikey(
                    "a",
                    "inference",
                    &format!("  rotation: {{schedule: \"{in_range}\"}}\n"),
                )),
            )
            .unwrap_or_else(|e| panic!("{in_range} was rejected: {e}"));
    }
    reject(
        &apikey("a", "inference", "  rotation: {timeZone: Mars/Olympus}\n"),
        "IANA time zone",
    );
    reject(
        &apikey("a", "inference", "  rotation: {gracePeriod: -1h}\n"),
        "non-negative duration",
    );
    reject(
        &apikey("a", "inference", "  expiresAfter: 0s\n"),
        "positive duration",
    );
    reject(
        &apikey(
            "a",
            "inference",
            "  rollout: {targets: [{kind: Pod, name: x}]}\n",
        ),
        "Unsupported value",
    );

    cluster.apply(&apikey(
        "fixed",
        "inference",
        "  secretName: fixed-secret\n",
    ));
    reject(
        &apikey("fixed", "inference", "  secretName: other\n"),
        "secretName is immutable",
    );
    cluster.apply(&apikey("plain", "inference", ""));
    reject(
        &apikey("plain", "inference", "  secretName: added\n"),
        "cannot be added or removed",
    );

    let table = cluster.kubectl(&["get", "ak"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "OWNER",
            "TEAM",
            "SCOPES",
            "KEY",
            "READY",
            "REASON",
            "NEXT-ROTATION",
            "AGE"
        ]
    );
}

#[test]
fn lifecycle_and_no_leaks() {
    let Some((cluster, url, operator)) = start_with_operator("lifecycle_and_no_leaks", "trace")
    else {
        return;
    };

    cluster.apply(&apikey("inference", "inference, \"models:read\"", ""));
    let key = ready_key(&cluster, "inference", "inference", Duration::from_secs(5));
    assert!(is_key(&key), "{key}");
    let (code, json) = verify(&url, &key);
    assert_eq!(code, 0, "{json}");
    let verified: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(verified["owner"], "alice@example.com");
    assert_eq!(verified["team"], "ml");
    assert_eq!(
        verified["scopes"],
        serde_json::json!(["inference", "models:read"])
    );
    assert_eq!(verified["state"], "active");

    let key_id = cluster.field("apikey/inference", NS, "{.status.keyId}");
    assert_eq!(
        cluster.field(
            "secret/inference",
            NS,
            "{.metadata.annotations.keyward\\.dev/key-id}"
        ),
        key_id
    );
    assert_eq!(
        cluster.field(
            "secret/inference",
            NS,
            "{.metadata.labels.app\\.kubernetes\\.io/managed-by}"
        ),
        "keyward"
    );
    assert_eq!(
        cluster.field(
            "secret/inference",
            NS,
            "{.metadata.ownerReferences[0].controller}"
        ),
        "true"
    );
    assert_eq!(
        cluster.field("apikey/inference", NS, "{.status.keyHint}"),
        key[..7]
    );
    assert_eq!(
        cluster.field("apikey/inference", NS, "{.metadata.finalizers[0]}"),
        "keyward.dev/revoke"
    );

    // A scope edit keeps the key and updates the record.
    let secret_version = cluster.field("secret/inference", NS, "{.metadata.resourceVersion}");
    cluster.apply(&apikey("inference", "inference, metrics", ""));
    wait_for(
        "the new scopes in the database",
        Duration::from_secs(10),
        || {
            let (_, json) = verify(&url, &key);
            json.contains("metrics").then_some(())
        },
    );
    assert_eq!(
        cluster.field("secret/inference", NS, "{.metadata.resourceVersion}"),
        secret_version
    );

    // Deletion revokes, then the ApiKey and its Secret are gone.
    cluster.kubectl(&[
        "delete",
        "apikey",
        "inference",
        "--wait=true",
        "--timeout=30s",
    ]);
    assert_eq!(verify(&url, &key), (1, "revoked".to_owned()));
    wait_for("the Secret to go", Duration::from_secs(10), || {
        cluster
            .try_kubectl(&["get", "secret", "inference"])
            .is_err()
            .then_some(())
    });

    // The key appears nowhere but where it belonged.
    let (_, log) = operator.stop();
    let logs = std::fs::read_to_string(log).unwrap();
    assert!(logs.contains("TRACE"), "the operator logged at TRACE");
    let events = cluster.kubectl(&["get", "events", "-A", "-o", "yaml"]);
    let objects = cluster.kubectl(&["get", "apikeys", "-A", "-o", "yaml"]);
    let mut database = Vec::new();
    for entry in std::fs::read_dir(cluster.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("keys.db")
        {
            database.extend(std::fs::read(path).unwrap());
        }
    }
    let database = String::from_utf8_lossy(&database);
    let encoded = {
        let output = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s '{key}' | base64 -w0")])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(encoded.len(), 72, "base64 of the 52-character key");
    for needle in [key.as_str(), &key[3..], &encoded] {
        assert!(!logs.contains(needle), "key in the operator log");
        assert!(!events.contains(needle), "key in Events");
        assert!(!objects.contains(needle), "key in ApiKey objects");
        assert!(!database.contains(needle), "key in the database file");
    }
}

#[test]
fn restarts_write_nothing_and_crashes_converge() {
    let Some((cluster, url, operator)) =
        start_with_operator("restarts_write_nothing_and_crashes_converge", "info")
    else {
        return;
    };
    for name in ["one", "two", "three"] {
        cluster.apply(&apikey(name, "inference", ""));
    }
    for name in ["one", "two", "three"] {
        ready_key(&cluster, name, name, Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    let versions = || {
        cluster.kubectl(&[
            "get",
            "apikeys,secrets",
            "-n",
            NS,
            "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion} {end}",
        ])
    };
    let before = versions();
    operator.kill();
    let operator = cluster.operator(&url, &[], "info");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        versions(),
        before,
        "a restart on settled keys wrote something"
    );
    operator.kill();

    // SIGKILL at several points of an issuance, then restart: one live key, in the Secret, valid.
    for (i, delay) in [0u64, 30, 80, 150, 300, 600].into_iter().enumerate() {
        let name = format!("crash-{i}");
        let operator = cluster.operator(&url, &[], "info");
        wait_for("the operator to start", Duration::from_secs(30), || {
            operator
                .log_text()
                .contains("starting the ApiKey controller")
                .then_some(())
        });
        cluster.apply(&apikey(&name, "inference", ""));
        std::thread::sleep(Duration::from_millis(delay));
        operator.kill();
        let operator = cluster.operator(&url, &[], "info");
        let key = ready_key(&cluster, &name, &name, Duration::from_secs(20));
        assert_eq!(verify(&url, &key).0, 0, "{name}: the Secret's key verifies");
        let live = live_records(&url, &cluster, &name, None);
        assert!(live <= 2, "{name}: {live} live keys");
        // An abandoned pending key (its plaintext gone) may wait out its 2 minute timeout;
        // any other extra key is a leak. Only pending ones can be extra here.
        if live == 2 {
            let uid = cluster.field(&format!("apikey/{name}"), NS, "{.metadata.uid}");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let states: Vec<String> = runtime.block_on(async {
                let store = SqlStore::connect(&url).await.unwrap();
                store
                    .load(&uid)
                    .await
                    .unwrap()
                    .live
                    .iter()
                    .map(|r| r.state.to_string())
                    .collect()
            });
            assert!(states.contains(&"pending".to_owned()), "{name}: {states:?}");
        }
        operator.kill();
    }

    // SIGKILL during deletion, then restart: revoked and gone.
    for (i, delay) in [0u64, 50, 200].into_iter().enumerate() {
        let name = format!("crash-{i}");
        let key = cluster.secret_key(NS, &name).unwrap();
        let operator = cluster.operator(&url, &[], "info");
        wait_for("the operator to start", Duration::from_secs(30), || {
            operator
                .log_text()
                .contains("starting the ApiKey controller")
                .then_some(())
        });
        cluster.kubectl(&["delete", "apikey", &name, "--wait=false"]);
        std::thread::sleep(Duration::from_millis(delay));
        operator.kill();
        let operator = cluster.operator(&url, &[], "info");
        wait_for("the ApiKey to go", Duration::from_secs(20), || {
            cluster
                .try_kubectl(&["get", "apikey", &name])
                .is_err()
                .then_some(())
        });
        assert_eq!(verify(&url, &key), (1, "revoked".to_owned()), "{name}");
        operator.kill();
    }
}

#[test]
fn foreign_deleted_and_edited_secrets() {
    let Some((cluster, url, _operator)) =
        start_with_operator("foreign_deleted_and_edited_secrets", "info")
    else {
        return;
    };

    // A Secret keyward does not own is never modified.
    cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "taken",
        "--from-literal=api-key=theirs",
    ]);
    let version = cluster.field("secret/taken", NS, "{.metadata.resourceVersion}");
    cluster.apply(&apikey("taken", "inference", ""));
    let reason = wait_for("SecretConflict", Duration::from_secs(10), || {
        let reason = cluster.field(
            "apikey/taken",
            NS,
            r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
        );
        (reason == "SecretConflict").then_some(reason)
    });
    assert_eq!(reason, "SecretConflict");
    let message = cluster.field(
        "apikey/taken",
        NS,
        r#"{.status.conditions[?(@.type=="Ready")].message}"#,
    );
    assert!(message.contains("Secret taken already exists"), "{message}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster.field("secret/taken", NS, "{.metadata.resourceVersion}"),
        version
    );
    assert_eq!(cluster.secret_key(NS, "taken").as_deref(), Some("theirs"));
    let events = cluster.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=taken",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("SecretConflict"), "{events}");
    // Once the other Secret is gone, the key is issued without any edit.
    cluster.kubectl(&["delete", "secret", "taken"]);
    ready_key(&cluster, "taken", "taken", Duration::from_secs(45));

    // A deleted Secret: new key, old revoked, Warning Event.
    cluster.apply(&apikey("lost", "inference", ""));
    let old = ready_key(&cluster, "lost", "lost", Duration::from_secs(10));
    cluster.kubectl(&["delete", "secret", "lost"]);
    let new = wait_for("a new key", Duration::from_secs(10), || {
        cluster
            .secret_key(NS, "lost")
            .filter(|k| *k != old && is_key(k))
    });
    assert_eq!(verify(&url, &new).0, 0);
    wait_for("the old key revoked", Duration::from_secs(10), || {
        (verify(&url, &old) == (1, "revoked".to_owned())).then_some(())
    });
    let events = cluster.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=lost",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Reissued"), "{events}");

    // An edited key: new key, the edited value is never accepted.
    let before = cluster.secret_key(NS, "lost").unwrap();
    let planted = format!("kw_{}", &before[3..].chars().rev().collect::<String>());
    let patch = format!("{{\"stringData\":{{\"api-key\":\"{planted}\"}}}}");
    cluster.kubectl(&["patch", "secret", "lost", "--type=merge", "-p", &patch]);
    let replaced = wait_for("the edited key replaced", Duration::from_secs(10), || {
        cluster
            .secret_key(NS, "lost")
            .filter(|k| *k != planted && *k != before)
    });
    assert_eq!(verify(&url, &replaced).0, 0);
    assert_ne!(verify(&url, &planted).0, 0);
    wait_for(
        "the edited-over key revoked",
        Duration::from_secs(10),
        || (verify(&url, &before) == (1, "revoked".to_owned())).then_some(()),
    );
    // Each re-issue has its own Event, naming what happened.
    let notes = cluster.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=lost,reason=Reissued",
        "-o",
        "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
    ]);
    assert!(notes.contains("was deleted"), "{notes}");
    assert!(notes.contains("was changed"), "{notes}");
}

#[test]
fn deletion_waits_out_a_database_outage() {
    let Some(cluster) = Cluster::start("deletion_waits_out_a_database_outage") else {
        return;
    };
    let postgres = Postgres::start(cluster.dir.path());
    let _operator = cluster.operator(&postgres.url, &[], "info");
    wait_for("the CRD", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    cluster.apply(&apikey("outage", "inference", ""));
    let key = ready_key(&cluster, "outage", "outage", Duration::from_secs(10));

    postgres.stop();
    cluster.kubectl(&["delete", "apikey", "outage", "--wait=false"]);
    let reason = wait_for("DatabaseUnavailable", Duration::from_secs(30), || {
        let reason = cluster.field(
            "apikey/outage",
            NS,
            r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
        );
        (reason == "DatabaseUnavailable").then_some(reason)
    });
    assert_eq!(reason, "DatabaseUnavailable");
    assert!(
        !cluster
            .field("apikey/outage", NS, "{.metadata.deletionTimestamp}")
            .is_empty()
    );
    assert!(
        cluster.secret_key(NS, "outage").is_some(),
        "nothing deleted before the revocation"
    );

    postgres.restart();
    // Backoff doubles from 1 s; a few failures in, the next retry is well within a minute.
    wait_for("the ApiKey to go", Duration::from_secs(90), || {
        cluster
            .try_kubectl(&["get", "apikey", "outage"])
            .is_err()
            .then_some(())
    });
    assert_eq!(verify(&postgres.url, &key), (1, "revoked".to_owned()));
    assert!(cluster.secret_key(NS, "outage").is_none());
}

#[test]
fn rotation_keeps_a_valid_key_in_the_secret() {
    let Some((cluster, url, _operator)) =
        start_with_operator("rotation_keeps_a_valid_key_in_the_secret", "info")
    else {
        return;
    };
    cluster.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: scorer, namespace: default}\nspec:\n  replicas: 0\n  selector: {matchLabels: {app: scorer}}\n  template:\n    metadata: {labels: {app: scorer}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
    );
    cluster.apply(&apikey(
        "rotating",
        "inference",
        "  rotation: {schedule: \"@every 20s\", gracePeriod: 10s}\n  rollout: {targets: [{kind: Deployment, name: scorer}]}\n",
    ));
    let first = ready_key(&cluster, "rotating", "rotating", Duration::from_secs(5));
    let generation = || {
        cluster
            .field("deployment/scorer", NS, "{.metadata.generation}")
            .parse::<i64>()
            .unwrap()
    };
    assert_eq!(generation(), 1);

    // Sample the Secret for 45 s (two rotations): every key seen must verify when seen.
    let mut seen = BTreeSet::new();
    let started = std::time::Instant::now();
    let mut old_checked = false;
    while started.elapsed() < Duration::from_secs(45) {
        let key = cluster
            .secret_key(NS, "rotating")
            .expect("the Secret always holds a key");
        let (code, json) = verify(&url, &key);
        assert_eq!(code, 0, "the Secret held a key that did not verify: {json}");
        if key != first && !old_checked {
            // During the grace period the previous key still works.
            let (code, state) = verify(&url, &first);
            assert!(code == 0 && state.contains("retiring"), "{state}");
            let previous = cluster.field("apikey/rotating", NS, "{.status.previousKeyExpiresAt}");
            assert!(!previous.is_empty());
            old_checked = true;
        }
        seen.insert(key);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(seen.len() >= 3, "rotated at least twice: {}", seen.len());
    assert!(old_checked);
    assert_ne!(
        verify(&url, &first).0,
        0,
        "the first key stopped working after its grace period"
    );
    let revision: i64 = cluster
        .field("apikey/rotating", NS, "{.status.revision}")
        .parse()
        .unwrap();
    assert_eq!(
        generation(),
        revision,
        "one rollout per rotation (revision {revision})"
    );
    for field in ["lastRotatedAt", "nextRotationAt"] {
        assert!(
            !cluster
                .field("apikey/rotating", NS, &format!("{{.status.{field}}}"))
                .is_empty(),
            "{field}"
        );
    }
}

#[test]
fn kubectl_plugin_lists_rotates_and_revokes() {
    let Some((cluster, url, _operator)) =
        start_with_operator("kubectl_plugin_lists_rotates_and_revokes", "info")
    else {
        return;
    };
    for name in ["p1", "p2", "p3"] {
        cluster.apply(&apikey(name, "inference", ""));
    }
    cluster.kubectl(&["label", "apikey", "p3", "team=search", "--overwrite"]);
    let keys: Vec<String> = ["p1", "p2", "p3"]
        .iter()
        .map(|n| ready_key(&cluster, n, n, Duration::from_secs(10)))
        .collect();

    // Plain kubectl: each new rotate value rotates exactly once.
    let revision = || cluster.field("apikey/p2", NS, "{.status.revision}");
    cluster.kubectl(&[
        "annotate",
        "apikey",
        "p2",
        "keyward.dev/rotate=by-hand-1",
        "--overwrite",
    ]);
    wait_for("the annotated rotation", Duration::from_secs(10), || {
        (revision() == "2").then_some(())
    });
    cluster.kubectl(&[
        "annotate",
        "apikey",
        "p2",
        "keyward.dev/rotate=by-hand-1",
        "--overwrite",
    ]);
    cluster.kubectl(&["label", "apikey", "p2", "touched=yes"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(revision(), "2", "the same value rotated twice");
    assert_eq!(
        cluster.field("apikey/p2", NS, "{.status.lastRotationRequest}"),
        "by-hand-1"
    );
    let p2_after_hand = cluster.secret_key(NS, "p2").unwrap();

    let (ok, list, _) = cluster.plugin(&["list"]);
    assert!(ok);
    assert!(
        list.starts_with("NAME") && list.contains("p1") && list.contains("Ready"),
        "{list}"
    );
    let (ok, json, _) = cluster.plugin(&["list", "-A", "-o", "json"]);
    assert!(ok);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["items"].as_array().unwrap().len(), 3);

    let (ok, out, err) = cluster.plugin(&["rotate", "p1"]);
    assert!(ok, "{err}");
    assert!(out.contains("apikey p1 rotated"), "{out}");
    assert!(verify(&url, &keys[0]).1.contains("retiring"));

    let (ok, out, err) = cluster.plugin(&["rotate", "-l", "team=ml", "--immediate"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(verify(&url, &keys[1]), (1, "revoked".to_owned()));
    assert_eq!(
        verify(&url, &p2_after_hand),
        (1, "revoked".to_owned()),
        "--immediate revokes every previous key"
    );
    assert_eq!(verify(&url, &keys[2]).0, 0, "p3 is not team=ml");

    let (ok, out, err) = cluster.plugin(&["rotate", "--all"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");

    let (ok, status, _) = cluster.plugin(&["status", "p1"]);
    assert!(ok);
    assert!(
        status.contains("Rotated") && status.contains("Key hint:"),
        "{status}"
    );

    let p3 = cluster.secret_key(NS, "p3").unwrap();
    let (ok, out, err) = cluster.plugin(&["revoke", "p3"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(verify(&url, &p3), (1, "revoked".to_owned()));
    let (ok, _, err) = cluster.plugin(&["status", "p3"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[test]
fn one_leader_reconciles_and_a_standby_takes_over() {
    let Some(cluster) = Cluster::start("one_leader_reconciles_and_a_standby_takes_over") else {
        return;
    };
    let postgres = Postgres::start(cluster.dir.path());
    let url = postgres.url.clone();
    let election = ["--leader-election", "--lease-namespace", "default"];
    let first = cluster.operator(
        &url,
        &[&election[..], &["--identity", "first"]].concat(),
        "info",
    );
    wait_for("the first to lead", Duration::from_secs(60), || {
        first.log_text().contains("became leader").then_some(())
    });
    let second = cluster.operator(
        &url,
        &[&election[..], &["--identity", "second"]].concat(),
        "info",
    );
    wait_for("the second to wait", Duration::from_secs(30), || {
        second
            .log_text()
            .contains("waiting for the leader lease")
            .then_some(())
    });

    cluster.apply(&apikey("ha-1", "inference", ""));
    ready_key(&cluster, "ha-1", "ha-1", Duration::from_secs(10));
    assert!(first.log_text().contains("issued a key"));
    assert!(
        !second.log_text().contains("reconciling"),
        "the standby reconciled"
    );

    first.kill();
    let killed = std::time::Instant::now();
    wait_for("the standby to lead", Duration::from_secs(30), || {
        second.log_text().contains("became leader").then_some(())
    });
    let takeover = killed.elapsed();
    assert!(
        takeover <= Duration::from_secs(20),
        "takeover took {takeover:?}"
    );
    eprintln!("failover took {takeover:?}");

    cluster.apply(&apikey("ha-2", "inference", ""));
    ready_key(&cluster, "ha-2", "ha-2", Duration::from_secs(10));
    assert_eq!(
        live_records(&url, &cluster, "ha-1", None),
        1,
        "no key issued twice"
    );
    assert_eq!(live_records(&url, &cluster, "ha-2", None), 1);
}

#[test]
fn the_operator_runs_with_exactly_the_packaged_permissions() {
    let Some(cluster) = Cluster::start("the_operator_runs_with_exactly_the_packaged_permissions")
    else {
        return;
    };
    if std::env::var("KEYWARD_E2E_KUBECONFIG").is_ok() {
        eprintln!(
            "SKIP: the_operator_runs_with_exactly_the_packaged_permissions: needs the API server this harness starts"
        );
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    // The chart's CRDs and the kustomize base apply to a real API server. This
    // one is 1.28, so the admission objects are swapped for their v1beta1 form,
    // as docs/install.md tells users of 1.28 and 1.29 to do.
    let crds = format!("{root}/charts/keyward/crds/");
    cluster.kubectl(&["apply", "--server-side", "-f", &crds]);
    let config = cluster.dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    for entry in std::fs::read_dir(format!("{root}/config")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, config.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::rename(
        config.join("admission-policy-v1beta1.yaml"),
        config.join("admission-policy.yaml"),
    )
    .unwrap();
    let config = config.display().to_string();
    cluster.kubectl(&["create", "namespace", "keyward-system"]);
    cluster.kubectl(&["apply", "--dry-run=server", "-k", &config]);
    cluster.kubectl(&["apply", "-k", &config]);
    let can = |verb: &str, resource: &str| {
        cluster
            .try_kubectl(&[
                "auth",
                "can-i",
                verb,
                resource,
                "--as",
                harness::SERVICE_ACCOUNT,
            ])
            .is_ok_and(|out| out.trim() == "yes")
    };
    assert!(can("patch", "secrets"));
    assert!(!can("update", "secrets"), "no more than the code uses");
    assert!(
        !can("patch", "customresourcedefinitions"),
        "the CRD ships separately"
    );

    cluster.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: scorer, namespace: default}\nspec:\n  replicas: 0\n  selector: {matchLabels: {app: scorer}}\n  template:\n    metadata: {labels: {app: scorer}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
    );
    let url = sqlite_url(&cluster);
    let flags = [
        "--skip-crd-install",
        "--leader-election",
        "--lease-namespace",
        "keyward-system",
        "--identity",
        "rbac-test",
    ];
    let operator = cluster.operator_as(&cluster.service_account_kubeconfig(), &url, &flags, "info");
    wait_for("leadership", Duration::from_secs(60), || {
        operator.log_text().contains("became leader").then_some(())
    });

    // The whole life cycle under an ApiKeyPolicy (watched, its status written):
    // issue, rotate with a rollout, re-issue, revoke.
    cluster.apply(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {name: everywhere}\nspec:\n  namespaceSelector: {}\n  scopes: {allowed: [inference]}\n",
    );
    let rollout = "  rollout: {targets: [{kind: Deployment, name: scorer}]}\n";
    cluster.apply(&apikey("rbac", "inference", rollout));
    let first = ready_key(&cluster, "rbac", "rbac", Duration::from_secs(10));
    wait_for("the policy status", Duration::from_secs(20), || {
        (cluster.field("apikeypolicy/everywhere", "", "{.status.governedKeys}") == "1")
            .then_some(())
    });
    cluster.kubectl(&["annotate", "apikey", "rbac", "keyward.dev/rotate=rbac-1"]);
    wait_for("the rollout", Duration::from_secs(10), || {
        (cluster.field("deployment/scorer", NS, "{.metadata.generation}") == "2").then_some(())
    });
    assert!(verify(&url, &first).1.contains("retiring"));
    let rotated = cluster.secret_key(NS, "rbac").unwrap();
    cluster.kubectl(&["delete", "secret", "rbac"]);
    let current = wait_for("a re-issued key", Duration::from_secs(10), || {
        cluster
            .secret_key(NS, "rbac")
            .filter(|k| is_key(k) && *k != rotated)
    });
    cluster.kubectl(&["delete", "apikey", "rbac", "--timeout=30s"]);
    assert_eq!(verify(&url, &current), (1, "revoked".to_owned()));

    let log = operator.log_text();
    assert!(log.contains("issued a key"), "the operator worked");
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "a call was forbidden:\n{log}"
    );
}

/// `kubectl annotate --overwrite` of an ApiKey.
fn annotate(cluster: &Cluster, name: &str, annotations: &[&str]) {
    let object = format!("apikey/{name}");
    let mut args = vec!["annotate", object.as_str(), "-n", NS, "--overwrite"];
    args.extend_from_slice(annotations);
    cluster.kubectl(&args);
}

/// Waits until the Secret holds a key other than `old`; returns it.
fn next_key(cluster: &Cluster, name: &str, old: &str) -> String {
    wait_for(
        &format!("a new key in {name}"),
        Duration::from_secs(10),
        || cluster.secret_key(NS, name).filter(|key| key != old),
    )
}

#[test]
fn an_expired_key_stays_dead_and_revoke_previous_is_used_once() {
    let Some((cluster, url, _operator)) = start_with_operator(
        "an_expired_key_stays_dead_and_revoke_previous_is_used_once",
        "info",
    ) else {
        return;
    };
    cluster.apply(&apikey(
        "short",
        "inference",
        "  expiresAfter: 15s\n  rotation: {gracePeriod: 1h}\n",
    ));
    let first = ready_key(&cluster, "short", "short", Duration::from_secs(5));
    wait_for("the key to expire", Duration::from_secs(30), || {
        let (code, answer) = verify(&url, &first);
        (code == 1 && answer.contains("expired")).then_some(())
    });
    wait_for("Ready=False KeyExpired", Duration::from_secs(10), || {
        let reason = cluster.field(
            "apikey/short",
            NS,
            r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
        );
        (reason == "KeyExpired").then_some(())
    });

    // Rotating an expired key issues a new one; the expired key never verifies again.
    annotate(&cluster, "short", &["keyward.dev/rotate=renew"]);
    let second = next_key(&cluster, "short", &first);
    assert_eq!(verify(&url, &second).0, 0);
    for _ in 0..5 {
        let (code, answer) = verify(&url, &first);
        assert_ne!(code, 0, "the expired key came back to life: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // An emergency rotation revokes the previous key at once, and keyward removes
    // the revoke-previous annotation once it is handled.
    annotate(
        &cluster,
        "short",
        &[
            "keyward.dev/rotate=leak-1",
            "keyward.dev/revoke-previous=now",
        ],
    );
    let third = next_key(&cluster, "short", &second);
    let (code, answer) = verify(&url, &second);
    assert!(code == 1 && answer.contains("revoked"), "{answer}");
    wait_for(
        "revoke-previous to be removed",
        Duration::from_secs(10),
        || {
            let annotations = cluster.field("apikey/short", NS, "{.metadata.annotations}");
            (!annotations.contains("revoke-previous")).then_some(())
        },
    );
    assert_eq!(
        cluster.field("apikey/short", NS, "{.status.lastEmergencyRequest}"),
        "leak-1"
    );

    // A later routine request keeps the previous key for its grace period.
    annotate(&cluster, "short", &["keyward.dev/rotate=routine-2"]);
    let fourth = next_key(&cluster, "short", &third);
    assert_eq!(verify(&url, &fourth).0, 0);
    let (code, answer) = verify(&url, &third);
    assert!(code == 0 && answer.contains("retiring"), "{answer}");
    assert_eq!(
        cluster.field("apikey/short", NS, "{.status.lastRotationRequest}"),
        "routine-2"
    );
}

/// The messages of the `InvalidObject` Events about one ApiKey.
fn invalid_object_events(cluster: &Cluster, name: &str) -> String {
    let selector = format!("involvedObject.name={name},reason=InvalidObject");
    cluster.kubectl(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        &selector,
        "-o",
        "jsonpath={.items[*].message}",
    ])
}

#[test]
fn an_unreadable_apikey_does_not_stall_the_others() {
    let Some(cluster) = Cluster::start("an_unreadable_apikey_does_not_stall_the_others") else {
        return;
    };
    let crd = keyward::crd::crd_yaml();
    cluster
        .try_kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(&crd))
        .unwrap();
    wait_for("the CRD", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    // Relax the schema, store an ApiKey whose owner is a number (with keyward's
    // finalizer, as if it had been issued before), then restore the schema.
    let relaxed = r#"[{"op":"replace","path":"/spec/versions/0/schema/openAPIV3Schema","value":{"type":"object","x-kubernetes-preserve-unknown-fields":true}}]"#;
    cluster.kubectl(&[
        "patch",
        "crd",
        "apikeys.keyward.dev",
        "--type=json",
        "-p",
        relaxed,
    ]);
    wait_for("the relaxed schema", Duration::from_secs(30), || {
        cluster
            .try_kubectl_with_input(
                &["apply", "-f", "-"],
                Some(&format!(
                    "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: broken\n  namespace: {NS}\n  finalizers: [keyward.dev/revoke]\nspec:\n  owner: 42\n  team: ml\n  scopes: [inference]\n"
                )),
            )
            .ok()
    });
    cluster
        .try_kubectl_with_input(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&crd),
        )
        .unwrap();
    wait_for("the strict schema again", Duration::from_secs(30), || {
        cluster
            .try_kubectl_with_input(
                &["apply", "--dry-run=server", "-f", "-"],
                Some(&apikey("probe", "inference", "").replace("alice@example.com", "7")),
            )
            .err()
            .filter(|e| e.contains("owner"))
    });
    let names: Vec<String> = (0..20).map(|i| format!("valid-{i}")).collect();
    let manifests: Vec<String> = names.iter().map(|n| apikey(n, "inference", "")).collect();
    cluster.apply(&manifests.join("---\n"));

    let url = sqlite_url(&cluster);
    let operator = cluster.operator(&url, &[], "info");
    for name in &names {
        ready_key(&cluster, name, name, Duration::from_secs(60));
    }
    let log = operator.log_text();
    assert!(log.contains("cannot read this ApiKey"), "{log}");
    wait_for("an InvalidObject Event", Duration::from_secs(20), || {
        let events = invalid_object_events(&cluster, "broken");
        (events.contains("cannot read this ApiKey") && events.contains("42")).then_some(())
    });
    // Deleting it revokes its keys; the API server refuses to update an object that
    // fails its schema, so the finalizer goes once the field is fixed.
    cluster.kubectl(&["delete", "apikey/broken", "-n", NS, "--wait=false"]);
    wait_for("the finalizer explanation", Duration::from_secs(20), || {
        let events = invalid_object_events(&cluster, "broken");
        events
            .contains("fix the field with kubectl edit and the deletion completes")
            .then_some(())
    });
    cluster.kubectl(&[
        "patch",
        "apikey/broken",
        "-n",
        NS,
        "--type=merge",
        "-p",
        r#"{"spec":{"owner":"fixed@example.com"}}"#,
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cluster
        .try_kubectl(&["get", "apikey/broken", "-n", NS])
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the unreadable ApiKey was not released:\n{}",
            operator.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The operator's resident memory, from /proc.
fn rss_kib(operator: &Operator) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", operator.process.0.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn create_delete_churn_keeps_the_operator_memory_flat() {
    let test = "create_delete_churn_keeps_the_operator_memory_flat";
    let Some((cluster, _url, operator)) = start_with_operator(test, "info") else {
        return;
    };
    cluster.kubectl(&["create", "namespace", "churn"]);
    let round = |n: usize| {
        let manifest: Vec<String> = (0..60)
            .map(|i| apikey(&format!("churn-{n}-{i}"), "inference", "").replace(NS, "churn"))
            .collect();
        cluster.apply(&manifest.join("---\n"));
        wait_for("60 keys", Duration::from_secs(60), || {
            let secrets = cluster.kubectl(&["get", "secrets", "-n", "churn", "-o", "name"]);
            (secrets.lines().count() == 60).then_some(())
        });
        cluster.kubectl(&["delete", "apikeys", "--all", "-n", "churn"]);
        wait_for("the keys to go", Duration::from_secs(60), || {
            let left = cluster.kubectl(&["get", "apikeys,secrets", "-n", "churn", "-o", "name"]);
            left.trim().is_empty().then_some(())
        });
        std::thread::sleep(Duration::from_secs(2));
        rss_kib(&operator)
    };
    // The first rounds warm up the caches and the allocator; later rounds of
    // the same churn must not add to it.
    let warm = [round(0), round(1)].into_iter().max().unwrap();
    let after = [round(2), round(3), round(4)];
    eprintln!("operator RSS after warm-up {warm} KiB, then {after:?} KiB");
    for rss in after {
        assert!(
            rss <= warm + 8 * 1024,
            "the operator grew from {warm} KiB to {rss} KiB under create/delete churn"
        );
    }
}
