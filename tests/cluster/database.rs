//! The key database in production, against real API servers and real
//! PostgreSQL 15 (tests/support/replication.rs): a restore from an earlier
//! backup, a failover with asynchronous and with synchronous replication, and
//! two clusters sharing one database. In every case a key is valid only while
//! the cluster that issued it says so.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    harness::{Cluster, Guard, OPERATOR, Operator, verify, wait_for},
    replication::{self, Server, TcpProxy},
    verifier::{check, free_address},
};

const NS: &str = "default";

fn apikey(name: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  owner: alice@example.com\n  team: ml\n  scopes: [inference]\n"
    )
}

/// Waits until the ApiKey is Ready with a key in its Secret other than
/// `not`; returns the key and its id.
fn ready_key(cluster: &Cluster, name: &str, not: &[&str]) -> (String, String) {
    wait_for(&format!("{name}'s key"), Duration::from_secs(60), || {
        let ready = cluster.field(
            &format!("apikey/{name}"),
            NS,
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        );
        let key = cluster.secret_key(NS, name)?;
        let id = cluster.field(&format!("apikey/{name}"), NS, "{.status.keyId}");
        let secret_id = cluster.field(
            &format!("secret/{name}"),
            NS,
            r#"{.metadata.annotations.keyward\.dev/key-id}"#,
        );
        (ready == "True" && !not.contains(&key.as_str()) && id == secret_id).then_some((key, id))
    })
}

/// `keyward verify`'s one-word answer ("valid" for a valid key).
fn verdict(url: &str, key: &str) -> String {
    match verify(url, key) {
        (0, _) => "valid".into(),
        (_, word) => word,
    }
}

/// One HTTP/1.1 GET; the status and the whole reply (headers and body).
fn get(address: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: v\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, reply)
}

/// A metric's value on the verifier's /metrics (summed over its labels).
fn metric(address: SocketAddr, name: &str) -> f64 {
    let (_, text) = get(address, "/metrics", "");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts `keyward verifier` on a free address; ready once it has loaded.
pub(crate) fn start_verifier(cluster: &Cluster, url: &str, extra: &[&str]) -> (Guard, SocketAddr) {
    let address = free_address();
    let log = std::fs::File::create(
        cluster
            .dir
            .path()
            .join(format!("verifier-{}.log", address.port())),
    )
    .unwrap();
    let child = Command::new(OPERATOR)
        .args(["verifier", "--database-url", url, "--address"])
        .arg(address.to_string())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let guard = Guard(child);
    wait_for("the verifier to load", Duration::from_secs(30), || {
        (get(address, "/readyz", "").0 == 200).then_some(())
    });
    (guard, address)
}

/// Waits for an operator that should refuse to start; returns its log.
fn refused(mut operator: Operator) -> String {
    let status = wait_for("the operator to exit", Duration::from_secs(30), || {
        operator.process.0.try_wait().unwrap()
    });
    assert!(!status.success(), "it refused: {}", operator.log_text());
    operator.log_text()
}

fn pg_tool(tool: &str, args: &[&str]) {
    let output = Command::new(replication::tool(tool))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_restore_from_an_earlier_backup_never_brings_a_revoked_key_back() {
    let test = "a_restore_from_an_earlier_backup_never_brings_a_revoked_key_back";
    if !replication::available(test) {
        return;
    }
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let database = Server::primary(cluster.dir.path(), false);
    let url = database.url();
    let _operator = cluster.operator(&url, &["--anti-entropy-interval", "2"], "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    for name in ["deleted", "rotated", "kept"] {
        cluster.apply(&apikey(name));
    }
    let (deleted, deleted_id) = ready_key(&cluster, "deleted", &[]);
    let (leaked, leaked_id) = ready_key(&cluster, "rotated", &[]);
    let (kept, _) = ready_key(&cluster, "kept", &[]);
    let (_verifier, verifier) = start_verifier(&cluster, &url, &[]);

    // The backup; then an ApiKey deleted, an emergency rotation after a leak,
    // and an ApiKey created.
    let dump = cluster.dir.path().join("keys.dump");
    pg_tool(
        "pg_dump",
        &["-Fc", "-f", dump.to_str().unwrap(), "-d", &url],
    );
    cluster.kubectl(&["delete", "apikey", "deleted", "-n", NS]);
    cluster.kubectl(&[
        "annotate",
        "apikey",
        "rotated",
        "-n",
        NS,
        "keyward.dev/revoke-previous=leak",
        "keyward.dev/rotate=leak",
    ]);
    let (rotated, _) = ready_key(&cluster, "rotated", &[&leaked]);
    cluster.apply(&apikey("created"));
    let (created, _) = ready_key(&cluster, "created", &[]);
    for key in [&deleted, &leaked] {
        assert_eq!(verdict(&url, key), "revoked");
        wait_for("the verifier to refuse", Duration::from_secs(5), || {
            (check(verifier, key) == 401).then_some(())
        });
    }

    // The restore, in one transaction, with the operator and verifier running.
    pg_tool(
        "pg_restore",
        &[
            "--clean",
            "--if-exists",
            "--single-transaction",
            "-d",
            &url,
            dump.to_str().unwrap(),
        ],
    );
    let restored = Instant::now();
    assert_eq!(
        verdict(&url, &leaked),
        "valid",
        "the restored rows hold the leaked key as it was at backup time"
    );

    // The verifier that saw the revocations never takes them back, the
    // current key keeps verifying throughout, and keyward verify (which
    // remembers nothing) refuses both once the anti-entropy pass has run.
    let bound = Duration::from_secs(60 + 2);
    loop {
        assert_eq!(check(verifier, &deleted), 401, "deleted key, verifier");
        assert_eq!(check(verifier, &leaked), 401, "leaked key, verifier");
        assert_eq!(check(verifier, &kept), 200, "current key, verifier");
        assert_eq!(verdict(&url, &kept), "valid", "current key");
        let settled = verdict(&url, &deleted) == "revoked" && verdict(&url, &leaked) == "revoked";
        if settled {
            break;
        }
        assert!(
            restored.elapsed() < bound,
            "a revoked key still verifies {:?} after the restore",
            restored.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "revoked keys refused again {:?} after the restore",
        restored.elapsed()
    );
    let reason = |id: &str| {
        database.sql(&format!(
            "SELECT revoke_reason FROM api_keys WHERE key_id = '{id}'"
        ))
    };
    assert_eq!(reason(&deleted_id), "orphaned");
    assert_eq!(reason(&leaked_id), "superseded");
    let audit = database.sql(&format!(
        "SELECT action || ' ' || detail || ' ' || cluster FROM key_audit WHERE key_id = '{leaked_id}' ORDER BY id DESC LIMIT 1"
    ));
    assert_eq!(audit, "revoked superseded default");
    let events = cluster.kubectl(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        "reason=Superseded",
        "-o",
        "jsonpath={.items[*].involvedObject.name}",
    ]);
    assert_eq!(events.trim(), "rotated");

    // Keys missing from the backup are issued again, and verify.
    let (reissued, _) = ready_key(&cluster, "rotated", &[&leaked, &rotated]);
    let (recreated, _) = ready_key(&cluster, "created", &[&created]);
    for key in [&reissued, &recreated, &kept] {
        assert_eq!(verdict(&url, key), "valid");
        wait_for("the verifier to accept", Duration::from_secs(5), || {
            (check(verifier, key) == 200).then_some(())
        });
    }
    assert!(
        metric(verifier, "keyward_verifier_history_resets_total") >= 1.0,
        "the verifier noticed the history moved backwards"
    );
}

/// Creates the ApiKeys and waits for their keys.
fn keys(cluster: &Cluster, names: &[&str]) -> Vec<String> {
    for name in names {
        cluster.apply(&apikey(name));
    }
    names
        .iter()
        .map(|name| ready_key(cluster, name, &[]).0)
        .collect()
}

#[test]
fn a_failover_with_asynchronous_replication_restores_lost_revocations() {
    let test = "a_failover_with_asynchronous_replication_restores_lost_revocations";
    if !replication::available(test) {
        return;
    }
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let primary = Server::primary(cluster.dir.path(), false);
    // The standby streams through a link that the test can cut.
    let link = TcpProxy::start(&primary.address());
    let standby = Server::standby_of(&link.address().to_string(), cluster.dir.path());
    // The Service address both processes use.
    let service = TcpProxy::start(&primary.address());
    let url = service.url();
    let endpoints = free_address();
    let endpoints_flag = endpoints.to_string();
    let _operator = cluster.operator(
        &url,
        &[
            "--anti-entropy-interval",
            "3",
            "--http-address",
            &endpoints_flag,
        ],
        "info",
    );
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    let (_verifier, verifier) = start_verifier(&cluster, &url, &[]);
    let before = keys(&cluster, &["lost", "kept"]);
    let (lost, kept) = (&before[0], &before[1]);
    replication::wait_replayed(&primary, &standby);

    // The standby falls behind; the deletion is acknowledged on the primary only.
    link.cut();
    cluster.kubectl(&["delete", "apikey", "lost", "-n", NS]);
    assert_eq!(verdict(&primary.url(), lost), "revoked");
    wait_for("the verifier to refuse", Duration::from_secs(5), || {
        (check(verifier, lost) == 401).then_some(())
    });

    let killed = Instant::now();
    primary.kill();
    // Meanwhile /readyz says what is happening: the verifier answers from
    // memory, the operator's database does not answer.
    let said = wait_for("the verifier's /readyz", Duration::from_secs(10), || {
        let (status, reply) = get(verifier, "/readyz", "");
        (status == 200 && reply.contains("not answering")).then_some(reply)
    });
    assert!(said.contains("failing closed in"), "{said}");
    wait_for("the operator's /readyz", Duration::from_secs(10), || {
        let (status, reply) = get(endpoints, "/readyz", "");
        (status == 503 && reply.contains("database")).then_some(())
    });
    standby.promote();
    service.retarget(&standby.address());
    assert_eq!(
        verdict(&standby.url(), lost),
        "valid",
        "the promoted standby never got the revocation"
    );

    // Both processes recover by themselves: a new ApiKey gets a key, which
    // the verifier accepts from the new primary.
    let after = keys(&cluster, &["after-failover"]);
    wait_for("the verifier to accept", Duration::from_secs(30), || {
        (check(verifier, &after[0]) == 200).then_some(())
    });
    eprintln!(
        "a new key issued and verified {:?} after the primary was killed",
        killed.elapsed()
    );
    // The lost revocation is restored within the anti-entropy interval; the
    // verifier that saw it never accepted the key again.
    wait_for(
        "the lost revocation to be restored",
        Duration::from_secs(60),
        || (verdict(&url, lost) == "revoked").then_some(()),
    );
    assert_eq!(check(verifier, lost), 401);
    assert_eq!(check(verifier, kept), 200);
    assert_eq!(verdict(&url, kept), "valid");
    assert_eq!(
        standby.sql("SELECT revoke_reason FROM api_keys WHERE revoke_reason = 'orphaned'"),
        "orphaned"
    );
    let (status, _) = get(verifier, "/readyz", "");
    assert_eq!(status, 200);
}

#[test]
fn with_synchronous_replication_no_acknowledged_revocation_is_lost() {
    let test = "with_synchronous_replication_no_acknowledged_revocation_is_lost";
    if !replication::available(test) {
        return;
    }
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let primary = Server::primary(cluster.dir.path(), true);
    let standby = Server::standby_of(&primary.address(), cluster.dir.path());
    let service = TcpProxy::start(&primary.address());
    let url = service.url();
    // No anti-entropy pass within the test: only replication keeps the revocation.
    let _operator = cluster.operator(&url, &["--anti-entropy-interval", "3600"], "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    let before = keys(&cluster, &["deleted", "kept"]);
    // `kubectl delete` returns once the finalizer is gone: acknowledged.
    cluster.kubectl(&["delete", "apikey", "deleted", "-n", NS]);
    primary.kill();
    standby.promote();
    service.retarget(&standby.address());
    assert_eq!(verdict(&standby.url(), &before[0]), "revoked");
    assert_eq!(verdict(&standby.url(), &before[1]), "valid");
    let after = keys(&cluster, &["after-failover"]);
    assert_eq!(verdict(&url, &after[0]), "valid");
}

#[test]
fn two_clusters_share_one_database_without_touching_each_others_keys() {
    let test = "two_clusters_share_one_database_without_touching_each_others_keys";
    if !replication::available(test) {
        return;
    }
    let (Some(eu), Some(us)) = (Cluster::start(test), Cluster::start(test)) else {
        return;
    };
    let database = Server::primary(eu.dir.path(), false);
    let url = database.url();
    let flags = |name| ["--cluster-name", name, "--anti-entropy-interval", "1"];
    let _eu_operator = eu.operator(&url, &flags("eu-1"), "info");
    let _us_operator = us.operator(&url, &flags("us-1"), "info");
    for cluster in [&eu, &us] {
        wait_for("the CRDs", Duration::from_secs(60), || {
            cluster.try_kubectl(&["get", "apikeys"]).ok()
        });
    }
    // The same namespace and name in both clusters.
    let eu_keys = keys(&eu, &["shared", "eu-only"]);
    let us_keys = keys(&us, &["shared"]);
    let (_all, all) = start_verifier(&eu, &url, &[]);
    let (_eu_only, eu_only) = start_verifier(&eu, &url, &["--accept-clusters", "eu-1"]);
    for (key, cluster) in [(&eu_keys[0], "eu-1"), (&us_keys[0], "us-1")] {
        let (status, reply) = get(all, "/check", &format!("Authorization: Bearer {key}\r\n"));
        assert_eq!(status, 200);
        assert!(
            reply
                .to_ascii_lowercase()
                .contains(&format!("x-keyward-cluster: {cluster}\r\n")),
            "{reply}"
        );
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("x-keyward-name: shared\r\n")
        );
        assert_eq!(
            check(eu_only, key),
            if cluster == "eu-1" { 200 } else { 401 }
        );
    }
    let (_, json) = verify(&url, &us_keys[0]);
    assert!(json.contains(r#""cluster":"us-1""#), "{json}");

    // Deleting eu's "shared" revokes eu's key only, and several anti-entropy
    // passes of both clusters leave the other cluster's keys alone.
    eu.kubectl(&["delete", "apikey", "shared", "-n", NS]);
    assert_eq!(verdict(&url, &eu_keys[0]), "revoked");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(verdict(&url, &us_keys[0]), "valid");
    assert_eq!(verdict(&url, &eu_keys[1]), "valid");
    assert_eq!(
        database
            .sql("SELECT count(*) FROM api_keys WHERE revoke_reason IN ('orphaned', 'superseded')"),
        "0"
    );
    assert_eq!(
        database.sql("SELECT string_agg(name, ',' ORDER BY name) FROM key_clusters"),
        "eu-1,us-1"
    );

    // A changed name and a borrowed name are refused, and touch nothing.
    let renamed = refused(us.operator(&url, &flags("eu-2"), "info"));
    assert!(
        renamed.contains("start with --cluster-name us-1"),
        "{renamed}"
    );
    let Some(third) = Cluster::start(test) else {
        return;
    };
    let borrowed = refused(third.operator(&url, &flags("eu-1"), "info"));
    assert!(
        borrowed.contains("belongs to another Kubernetes cluster"),
        "{borrowed}"
    );
    assert_eq!(verdict(&url, &us_keys[0]), "valid");
    assert_eq!(verdict(&url, &eu_keys[1]), "valid");
}

#[test]
fn keys_from_before_cluster_names_are_claimed_only_by_their_own_cluster() {
    let test = "keys_from_before_cluster_names_are_claimed_only_by_their_own_cluster";
    if !replication::available(test) {
        return;
    }
    let (Some(owner), Some(newcomer)) = (Cluster::start(test), Cluster::start(test)) else {
        return;
    };
    let database = Server::primary(owner.dir.path(), false);
    let url = database.url();
    let operator = owner.operator(&url, &[], "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        owner.try_kubectl(&["get", "apikeys"]).ok()
    });
    let before = keys(&owner, &["upgraded"]);
    operator.stop();
    // The database as a release before migration 4 left it: no cluster names.
    database.sql(
        "ALTER TABLE key_audit DISABLE TRIGGER ALL; UPDATE key_audit SET cluster = NULL; \
         ALTER TABLE key_audit ENABLE TRIGGER ALL; UPDATE api_keys SET cluster = NULL; DELETE FROM key_clusters",
    );

    // Another cluster joining first claims nothing, so its anti-entropy never
    // sees those keys, let alone revokes them.
    let flags = |name| ["--cluster-name", name, "--anti-entropy-interval", "1"];
    let _newcomer = newcomer.operator(&url, &flags("us-1"), "info");
    wait_for("the newcomer to register", Duration::from_secs(60), || {
        (database.sql("SELECT count(*) FROM key_clusters") == "1").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        database.sql("SELECT count(*) FROM api_keys WHERE cluster IS NOT NULL"),
        "0"
    );
    assert_eq!(verdict(&url, &before[0]), "valid");

    // The owner claims its keys under its new name and keeps them: no new key.
    let _owner = owner.operator(&url, &flags("eu-1"), "info");
    wait_for(
        "the owner to claim its keys",
        Duration::from_secs(60),
        || {
            (database.sql("SELECT count(*) FROM api_keys WHERE cluster IS NULL") == "0")
                .then_some(())
        },
    );
    assert_eq!(
        database.sql("SELECT string_agg(DISTINCT cluster, ',') FROM key_audit"),
        "eu-1"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(verdict(&url, &before[0]), "valid");
    assert_eq!(owner.secret_key(NS, "upgraded").as_ref(), Some(&before[0]));
    assert_eq!(
        database.sql("SELECT count(*) FROM api_keys WHERE state = 'revoked'"),
        "0"
    );
}

#[test]
fn an_empty_database_reissues_every_key_and_touches_no_other_cluster() {
    let test = "an_empty_database_reissues_every_key_and_touches_no_other_cluster";
    if !replication::available(test) {
        return;
    }
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let database = Server::primary(cluster.dir.path(), false);
    let operator = cluster.operator(&database.url(), &[], "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    let before = keys(&cluster, &["first", "second"]);
    operator.stop();

    // Another, empty database that already holds a key of another cluster.
    database.sql("CREATE DATABASE emptied");
    let url = format!("postgres://postgres@{}/emptied", database.address());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let theirs = runtime.block_on(async {
        let store = keyward::store::SqlStore::connect(&url)
            .await
            .unwrap()
            .with_cluster("us-1");
        store.migrate().await.unwrap();
        let keys =
            keyward::key::KeyFactory::new("kw", std::sync::Arc::new(keyward::key::OsEntropy))
                .unwrap();
        let (plain, _) = crate::support::issue_active(&store, &keys, "first", &[], None).await;
        store.close().await;
        plain.expose().to_owned()
    });
    let _operator = cluster.operator(&url, &["--anti-entropy-interval", "1"], "info");
    for (name, old) in ["first", "second"].iter().zip(&before) {
        let (fresh, _) = ready_key(&cluster, name, &[old]);
        assert_eq!(verdict(&url, &fresh), "valid");
        assert_eq!(verdict(&url, old), "unknown");
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(verdict(&url, &theirs), "valid", "another cluster's key");
}
