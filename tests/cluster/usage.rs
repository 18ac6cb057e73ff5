//! Usage per key against a real API server, with the operator's own verifier
//! answering real HTTP checks: a client still on the previous key is reported
//! during the grace period (and the report clears when it stops), a revoked key
//! still presented is reported after it, `lifetime.maxUnused` flags the key
//! nobody uses, and status, `kubectl get -o wide` and the plugin show usage.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    database::start_verifier,
    harness::{Cluster, wait_for},
    verifier::{check, free_address},
};

const NS: &str = "default";

fn apikey(name: &str, grace: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  owner: alice@example.com\n  team: ml\n  scopes: [inference]\n  rotation: {{gracePeriod: {grace}}}\n"
    )
}

/// Presents `key` to the verifier every 100 ms until `stop` is set.
fn present(
    address: std::net::SocketAddr,
    key: String,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            check(address, &key);
            thread::sleep(Duration::from_millis(100));
        }
    })
}

fn condition(cluster: &Cluster, name: &str, type_: &str, field: &str) -> String {
    cluster.field(
        &format!("apikey/{name}"),
        NS,
        &format!(r#"{{.status.conditions[?(@.type=="{type_}")].{field}}}"#),
    )
}

fn events(cluster: &Cluster, reason: &str) -> String {
    cluster.kubectl(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        &format!("reason={reason}"),
        "-o",
        "jsonpath={range .items[*]}{.involvedObject.name}: {.message}{\"\\n\"}{end}",
    ])
}

fn rotate(cluster: &Cluster, name: &str) -> (String, String) {
    let previous = wait_for(&format!("{name}'s key"), Duration::from_secs(30), || {
        cluster.secret_key(NS, name)
    });
    cluster.kubectl(&[
        "annotate",
        "apikey",
        name,
        "-n",
        NS,
        "keyward.dev/rotate=first",
    ]);
    let current = wait_for(
        &format!("{name}'s new key"),
        Duration::from_secs(30),
        || cluster.secret_key(NS, name).filter(|k| *k != previous),
    );
    (previous, current)
}

#[test]
fn a_previous_key_still_presented_is_reported_and_unused_keys_are_flagged() {
    let test = "a_previous_key_still_presented_is_reported_and_unused_keys_are_flagged";
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let address = free_address();
    let url = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let flags = [
        "--verifier-address".to_owned(),
        address.to_string(),
        "--last-used-flush".to_owned(),
        "1".to_owned(),
        "--usage-scan-interval".to_owned(),
        "2".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _operator = cluster.operator(&url, &flags, "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys,apikeypolicies"]).ok()
    });
    cluster.apply(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {name: idle}\nspec:\n  namespaceSelector: {}\n  lifetime: {maxUnused: 1m}\n",
    );
    cluster.apply(&apikey("slow", "10m"));
    cluster.apply(&apikey("fast", "20s"));
    cluster.apply(&apikey("idle", "1h"));

    // Both rotated; clients keep presenting the previous keys.
    let (slow_previous, slow_current) = rotate(&cluster, "slow");
    let (fast_previous, _) = rotate(&cluster, "fast");
    let started = Instant::now();
    let stop_slow = Arc::new(AtomicBool::new(false));
    let stop_fast = Arc::new(AtomicBool::new(false));
    let slow_client = present(address, slow_previous.clone(), stop_slow.clone());
    let fast_client = present(address, fast_previous.clone(), stop_fast.clone());
    let current_client = present(address, slow_current.clone(), stop_fast.clone());

    // During the grace period: PreviousKeyInUse, with counts and the deadline.
    wait_for("PreviousKeyInUse on slow", Duration::from_secs(300), || {
        (condition(&cluster, "slow", "PreviousKeyInUse", "status") == "True").then_some(())
    });
    eprintln!("PreviousKeyInUse after {:?}", started.elapsed());
    let message = condition(&cluster, "slow", "PreviousKeyInUse", "message");
    assert!(
        message.contains("requests since") && message.contains("stops working at"),
        "{message}"
    );
    let warned = events(&cluster, "PreviousKeyInUse");
    assert!(warned.contains("slow: "), "{warned}");

    // After the grace period: the revoked key is refused, and reported.
    let reported = wait_for("RevokedKeyInUse on fast", Duration::from_secs(300), || {
        let reported = events(&cluster, "RevokedKeyInUse");
        reported.contains("fast: ").then_some(reported)
    });
    eprintln!("RevokedKeyInUse after {:?}", started.elapsed());
    assert!(
        reported.contains("revoked at") && reported.contains("by rotation"),
        "{reported}"
    );
    assert_eq!(check(address, &fast_previous), 401);
    let metrics = metrics(address);
    assert!(
        metrics.contains(r#"keyward_revoked_key_in_use_total{namespace="default"}"#),
        "{metrics}"
    );
    // Nobody used `idle`: maxUnused flags it; the keys in use stay compliant.
    wait_for("maxUnused to flag idle", Duration::from_secs(120), || {
        let message = condition(&cluster, "idle", "PolicyCompliant", "message");
        message.contains("lifetime.maxUnused").then_some(())
    });
    assert_eq!(
        condition(&cluster, "slow", "PolicyCompliant", "status"),
        "True"
    );

    stop_fast.store(true, Ordering::SeqCst);
    fast_client.join().unwrap();
    current_client.join().unwrap();

    // The last client moved to the new key: the condition clears. (From here
    // on nothing uses `slow`, and maxUnused will flag it too, a minute later.)
    stop_slow.store(true, Ordering::SeqCst);
    slow_client.join().unwrap();
    let stopped = Instant::now();
    wait_for(
        "PreviousKeyInUse to clear",
        Duration::from_secs(300),
        || (condition(&cluster, "slow", "PreviousKeyInUse", "status") == "False").then_some(()),
    );
    eprintln!(
        "PreviousKeyInUse cleared {:?} after the use stopped",
        stopped.elapsed()
    );

    // Usage in status, in `kubectl get -o wide`, and in the plugin.
    let requests = wait_for("status.usage on slow", Duration::from_secs(120), || {
        let n = cluster.field("apikey/slow", NS, "{.status.usage.last24h}");
        n.parse::<u64>().ok().filter(|n| *n > 0)
    });
    let wide = cluster.kubectl(&["get", "ak", "-n", NS, "-o", "wide"]);
    assert!(wide.contains("REQUESTS-24H"), "{wide}");
    let slow_line = wide.lines().find(|l| l.starts_with("slow")).unwrap();
    assert!(
        slow_line
            .split_whitespace()
            .any(|c| c == requests.to_string()),
        "{wide}"
    );
    let (ok, usage, _) = cluster.plugin(&["usage", "slow", "-n", NS, "--by", "hour"]);
    assert!(
        ok && usage.contains("VALID") && usage.contains(&format!("{requests} requests")),
        "{usage}"
    );
    let (ok, unused, _) = cluster.plugin(&["list", "--unused", "30d", "-n", NS]);
    assert!(ok, "{unused}");
    let idle_line = unused
        .lines()
        .find(|l| l.starts_with("idle"))
        .unwrap_or_default();
    assert!(idle_line.ends_with("never used"), "{unused}");
    assert!(!unused.contains("slow"), "{unused}");

    // No key reached status or an Event.
    let everything = cluster.kubectl(&["get", "apikeys,events", "-n", NS, "-o", "yaml"]);
    for key in [&slow_previous, &slow_current, &fast_previous] {
        assert!(!everything.contains(key.as_str()));
    }
}

/// The issue's bound, at the default intervals (a 60 s flush, a 30 s scan) and
/// with a separate `keyward verifier` process, as gateways call it: both reports
/// come within 5 minutes of the first request that should cause them.
#[test]
fn reports_come_within_five_minutes_at_the_default_intervals() {
    let test = "reports_come_within_five_minutes_at_the_default_intervals";
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let url = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let _operator = cluster.operator(&url, &[], "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    cluster.apply(&apikey("slow", "30m"));
    cluster.apply(&apikey("fast", "20s"));
    let (slow_previous, _) = rotate(&cluster, "slow");
    let (fast_previous, _) = rotate(&cluster, "fast");
    let (_verifier, address) = start_verifier(&cluster, &url, &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let first_previous_use = Instant::now();
    let clients = [
        present(address, slow_previous, stop.clone()),
        present(address, fast_previous.clone(), stop.clone()),
    ];
    // The first refused request is where the revoked key's bound starts.
    wait_for(
        "fast's previous key revoked",
        Duration::from_secs(60),
        || (check(address, &fast_previous) == 401).then_some(()),
    );
    let first_refused = Instant::now();

    let bound = Duration::from_secs(300);
    let (mut in_use, mut revoked) = (None, None);
    wait_for("both reports", bound, || {
        if in_use.is_none() && condition(&cluster, "slow", "PreviousKeyInUse", "status") == "True" {
            in_use = Some(first_previous_use.elapsed());
        }
        if revoked.is_none() && events(&cluster, "RevokedKeyInUse").contains("fast: ") {
            revoked = Some(first_refused.elapsed());
        }
        in_use.zip(revoked)
    });
    stop.store(true, Ordering::SeqCst);
    clients.into_iter().for_each(|c| c.join().unwrap());
    let (in_use, revoked) = (in_use.unwrap(), revoked.unwrap());
    eprintln!(
        "at the default intervals: PreviousKeyInUse after {in_use:?}, RevokedKeyInUse after {revoked:?}"
    );
    assert!(in_use < bound && revoked < bound);
    let message = condition(&cluster, "slow", "PreviousKeyInUse", "message");
    assert!(message.contains("requests since"), "{message}");
}

/// `/metrics` of the operator's verifier port (the process's one registry).
fn metrics(address: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}
