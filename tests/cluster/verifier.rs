//! The verifier served by the operator (`keyward run --verifier-address`)
//! against a real API server: `kubectl delete` and an emergency rotation are
//! refused within the bound, and a first use reaches status (untouched) and the plugin.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::harness::{Cluster, Postgres, wait_for};

const NS: &str = "default";

/// The HTTP status of `GET /check` with the key as a Bearer token.
pub(crate) fn check(address: SocketAddr, key: &str) -> u16 {
    get(
        address,
        "/check?scope=inference",
        &format!("Authorization: Bearer {key}\r\n"),
    )
}

/// The HTTP status of a GET with these raw header lines; 0 when nothing answers.
fn get(address: SocketAddr, path: &str, headers: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: v\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Polls until the key gets `status`; returns how long that took.
fn until_status(address: SocketAddr, key: &str, status: u16) -> Duration {
    let started = Instant::now();
    wait_for(
        &format!("/check to answer {status}"),
        Duration::from_secs(10),
        || (check(address, key) == status).then_some(()),
    );
    started.elapsed()
}

pub(crate) fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn apikey(name: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  owner: alice@example.com\n  team: ml\n  scopes: [inference]\n"
    )
}

#[test]
fn the_verifier_refuses_deleted_and_emergency_rotated_keys_and_reports_last_use() {
    let Some(cluster) = Cluster::start(
        "the_verifier_refuses_deleted_and_emergency_rotated_keys_and_reports_last_use",
    ) else {
        return;
    };
    let address = free_address();
    let url = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let flags = [
        "--verifier-address".to_owned(),
        address.to_string(),
        "--last-used-flush".to_owned(),
        "1".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _operator = cluster.operator(&url, &flags, "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    cluster.apply(&apikey("gone"));
    cluster.apply(&apikey("rotated"));
    let key = |name: &str| {
        wait_for(&format!("{name}'s key"), Duration::from_secs(20), || {
            cluster.secret_key(NS, name)
        })
    };
    let gone = key("gone");
    let rotated = key("rotated");
    until_status(address, &gone, 200);
    until_status(address, &rotated, 200);

    // Last use: flushed within a second, and the first use reaches status
    // within two minutes with nothing else touching the ApiKey.
    let used = wait_for("status.lastUsedAt", Duration::from_secs(120), || {
        let used = cluster.field("apikey/gone", NS, "{.status.lastUsedAt}");
        (!used.is_empty()).then_some(used)
    });
    assert!(used.ends_with(":00Z"), "minute resolution: {used}");
    let (ok, list, _) = cluster.plugin(&["list", "-n", NS]);
    assert!(
        ok && list.contains("LAST-USED") && list.contains(&used),
        "{list}"
    );

    // kubectl delete: refused within the bound.
    cluster.kubectl(&["delete", "apikey", "gone", "-n", NS, "--wait=false"]);
    let took = until_status(address, &gone, 401);
    // The latency bound is measured by benches/verifier.rs, not asserted here.
    eprintln!("deleted key refused after {took:?}");

    // An emergency rotation: the old key is refused at once, the new one verifies.
    cluster.kubectl(&[
        "annotate",
        "apikey",
        "rotated",
        "-n",
        NS,
        "keyward.dev/revoke-previous=incident-1",
        "keyward.dev/rotate=incident-1",
    ]);
    let took = until_status(address, &rotated, 401);
    eprintln!("emergency-rotated key refused after {took:?}");
    let fresh = wait_for("the new key", Duration::from_secs(20), || {
        cluster.secret_key(NS, "rotated").filter(|k| *k != rotated)
    });
    assert_eq!(check(address, &fresh), 200);
}

#[test]
fn an_operator_started_during_a_database_outage_serves_probes_and_waits_for_it() {
    let test = "an_operator_started_during_a_database_outage_serves_probes_and_waits_for_it";
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let postgres = Postgres::start(cluster.dir.path());
    postgres.stop();
    let (verifier, endpoints) = (free_address(), free_address());
    let (verifier_flag, endpoints_flag) = (verifier.to_string(), endpoints.to_string());
    let mut operator = cluster.operator(
        &postgres.url,
        &[
            "--verifier-address",
            &verifier_flag,
            "--http-address",
            &endpoints_flag,
        ],
        "info",
    );
    // The probes answer at once: alive, not ready.
    for address in [verifier, endpoints] {
        wait_for("the probes", Duration::from_secs(5), || {
            (get(address, "/healthz", "") == 200).then_some(())
        });
        assert_eq!(get(address, "/readyz", ""), 503, "{address} is not ready");
    }
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        operator.process.0.try_wait().unwrap().is_none(),
        "the operator waits for its database instead of exiting: {}",
        operator.log_text()
    );
    // Before its first load the verifier answers nothing but 503.
    assert_eq!(check(verifier, "kw_not-a-key"), 503);

    postgres.restart();
    wait_for("the CRD", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    cluster.apply(&apikey("after-outage"));
    let key = wait_for(
        "a key once the database is back",
        Duration::from_secs(60),
        || cluster.secret_key(NS, "after-outage"),
    );
    until_status(verifier, &key, 200);
    wait_for("the verifier to be ready", Duration::from_secs(10), || {
        (get(verifier, "/readyz", "") == 200).then_some(())
    });
}
