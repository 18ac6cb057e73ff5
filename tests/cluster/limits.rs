//! `maxKeysPerNamespace` on a real API server with the operator alone (no
//! admission): bursts of ApiKeys in one `kubectl apply`, in several orders,
//! never pass the limit; the policy's status follows within seconds and agrees
//! with the keys' conditions; a deletion issues the next key in line. Also the
//! owner patterns only RE2 reads, and an owner that tries to spoof the plugin's
//! POLICY column.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::harness::{Cluster, holders, verify, wait_for};

fn apikey(namespace: &str, name: &str, owner: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  owner: {owner:?}\n  team: ml\n  scopes: [inference]\n"
    )
}

fn start(test: &str) -> Option<(Cluster, String, crate::harness::Operator)> {
    let cluster = Cluster::start(test)?;
    let url = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let operator = cluster.operator(&url, &[], "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys,apikeypolicies"]).ok()
    });
    Some((cluster, url, operator))
}

/// `namespace/name` of every ApiKey whose PolicyCompliant condition is False.
fn flagged(cluster: &Cluster) -> BTreeSet<String> {
    let out = cluster.kubectl(&[
        "get",
        "apikeys",
        "-A",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.status.conditions[?(@.type=="PolicyCompliant")].status}{"\n"}{end}"#,
    ]);
    out.lines()
        .filter_map(|l| l.strip_suffix(" False"))
        .map(str::to_owned)
        .collect()
}

/// `namespace/name` of every violation the policy's status lists.
fn listed(cluster: &Cluster, policy: &str) -> BTreeSet<String> {
    let out = cluster.field(
        &format!("apikeypolicy/{policy}"),
        "",
        r#"{range .status.violations[*]}{.namespace}/{.name}{"\n"}{end}"#,
    );
    out.lines().map(str::to_owned).collect()
}

#[test]
fn a_burst_never_passes_max_keys_per_namespace_and_a_deletion_frees_a_place() {
    let Some((cluster, url, _operator)) =
        start("a_burst_never_passes_max_keys_per_namespace_and_a_deletion_frees_a_place")
    else {
        return;
    };
    cluster.apply(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata:\n  name: two\nspec:\n  namespaceSelector: {matchLabels: {burst: \"yes\"}}\n  maxKeysPerNamespace: 2\n",
    );
    let orders = [
        ("burst-1", ["key-e", "key-d", "key-c", "key-b", "key-a"]),
        ("burst-2", ["key-a", "key-b", "key-c", "key-d", "key-e"]),
        ("burst-3", ["key-c", "key-e", "key-a", "key-d", "key-b"]),
    ];
    for (namespace, _) in &orders {
        cluster.kubectl(&["create", "namespace", namespace]);
        cluster.kubectl(&["label", "namespace", namespace, "burst=yes"]);
    }
    // Count the holders of every namespace as often as we can, all along.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, most, url) = (done.clone(), most.clone(), url.clone());
        let namespaces: Vec<&'static str> = orders.iter().map(|(ns, _)| *ns).collect();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                for namespace in &namespaces {
                    most.fetch_max(holders(&url, namespace), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let applied = Instant::now();
    for (namespace, names) in &orders {
        // One apply of five ApiKeys, in this order, within the same second.
        let manifest: Vec<String> = names
            .iter()
            .map(|name| apikey(namespace, name, "alice@example.com"))
            .collect();
        cluster.apply(&manifest.join("---\n"));
    }
    for (namespace, _) in &orders {
        wait_for(
            &format!("two keys in {namespace}"),
            Duration::from_secs(30),
            || (holders(&url, namespace) == 2).then_some(()),
        );
    }
    // The policy's status follows the ApiKeys within seconds (not at its
    // 5-minute resync), and agrees with the keys' conditions.
    wait_for(
        "the policy status to count the keys",
        Duration::from_secs(20),
        || {
            let keys = cluster.field("apikeypolicy/two", "", "{.status.governedKeys}");
            let violating = cluster.field("apikeypolicy/two", "", "{.status.violatingKeys}");
            (keys == "15" && violating == "9").then_some(())
        },
    );
    eprintln!(
        "policy status current {:?} after the applies",
        applied.elapsed()
    );
    let agreed = wait_for(
        "status and conditions to agree",
        Duration::from_secs(20),
        || {
            let (flagged, listed) = (flagged(&cluster), listed(&cluster, "two"));
            (flagged.len() == 9 && flagged == listed).then_some(flagged)
        },
    );
    for (namespace, names) in &orders {
        for name in names {
            let holds = cluster.secret_key(namespace, name).is_some();
            let waits = agreed.contains(&format!("{namespace}/{name}"));
            assert!(
                holds != waits,
                "{namespace}/{name}: holds {holds}, waits {waits}"
            );
        }
    }
    let keys = cluster.kubectl(&[
        "get",
        "apikeys",
        "-n",
        "burst-1",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name}={.status.violatedPolicies}{"\n"}{end}"#,
    ]);
    assert_eq!(keys.matches(r#"=["two"]"#).count(), 3, "{keys}");

    // Deleting a holder frees its place: the next key in line gets a key
    // within seconds, and nothing else touches the ApiKeys.
    let holder = orders[0]
        .1
        .iter()
        .find(|name| cluster.secret_key("burst-1", name).is_some())
        .unwrap();
    let old_key = cluster.secret_key("burst-1", holder).unwrap();
    let deleted = Instant::now();
    cluster.kubectl(&["delete", "apikey", holder, "-n", "burst-1"]);
    assert_ne!(verify(&url, &old_key).0, 0, "the deleted key is revoked");
    let next = wait_for("the next key in line", Duration::from_secs(15), || {
        orders[0].1.iter().find(|name| {
            *name != holder
                && agreed.contains(&format!("burst-1/{name}"))
                && cluster.secret_key("burst-1", name).is_some()
        })
    });
    eprintln!(
        "{next} got the freed place {:?} after the deletion",
        deleted.elapsed()
    );
    wait_for(
        "the policy status after the deletion",
        Duration::from_secs(20),
        || {
            let violating = cluster.field("apikeypolicy/two", "", "{.status.violatingKeys}");
            (violating == "8" && flagged(&cluster) == listed(&cluster, "two")).then_some(())
        },
    );

    // A holder whose key a policy revokes frees its place as well: its team
    // becomes one a `Revoke` policy forbids, and the next in line gets a key
    // within seconds.
    cluster.apply(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata:\n  name: ml-only\nspec:\n  namespaceSelector: {matchLabels: {burst: \"yes\"}}\n  teams: {allowed: [ml]}\n  onViolation: Revoke\n",
    );
    let holding = |namespace: &str| -> BTreeSet<&str> {
        orders[1]
            .1
            .iter()
            .copied()
            .filter(|name| cluster.secret_key(namespace, name).is_some())
            .collect()
    };
    let before = holding("burst-2");
    let moved = *before.iter().next().unwrap();
    let key = cluster.secret_key("burst-2", moved).unwrap();
    cluster.kubectl(&[
        "patch",
        "apikey",
        moved,
        "-n",
        "burst-2",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"team":"search"}}"#,
    ]);
    // Its Secret stays (with the revoked key); the key database counts holders.
    wait_for("a new holder in burst-2", Duration::from_secs(15), || {
        let now = holding("burst-2");
        (now.len() == 3 && now.is_superset(&before) && holders(&url, "burst-2") == 2).then_some(())
    });
    assert_ne!(verify(&url, &key).0, 0, "the moved key is revoked");

    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(holders(&url, "burst-1"), 2);
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "at some moment {} ApiKeys of one namespace held a key",
        most.load(Ordering::SeqCst)
    );
}

#[test]
fn owner_patterns_only_re2_reads_match_alike_and_never_revoke() {
    let Some((cluster, url, operator)) =
        start("owner_patterns_only_re2_reads_match_alike_and_never_revoke")
    else {
        return;
    };
    cluster.kubectl(&["create", "namespace", "team-a"]);
    cluster.apply(&apikey("team-a", "alice", "alice@example.com"));
    let key = wait_for("alice's key", Duration::from_secs(20), || {
        cluster.secret_key("team-a", "alice")
    });
    // Valid RE2 that the `regex` crate alone refuses: `\Q…\E`, and a group
    // name starting with a digit. With `Revoke` a misread pattern once revoked
    // alice's working key within seconds.
    for pattern in [r"\Qalice@example.com\E", r"(?P<1st>alice)@example\.com"] {
        cluster.apply(&format!(
            "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata:\n  name: prod-owners\nspec:\n  namespaceSelector: {{}}\n  owner: {{pattern: '{pattern}'}}\n  onViolation: Revoke\n"
        ));
        wait_for("the policy to be read", Duration::from_secs(20), || {
            let reason = cluster.field(
                "apikeypolicy/prod-owners",
                "",
                r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
            );
            let message = cluster.field(
                "apikey/alice",
                "team-a",
                r#"{.status.conditions[?(@.type=="PolicyCompliant")].message}"#,
            );
            (reason == "Active" && message.contains("prod-owners")).then_some(())
        });
        std::thread::sleep(Duration::from_secs(3));
        let compliant = cluster.field(
            "apikey/alice",
            "team-a",
            r#"{.status.conditions[?(@.type=="PolicyCompliant")].status}"#,
        );
        assert_eq!(compliant, "True", "{pattern} matches alice");
        assert_eq!(
            verify(&url, &key).0,
            0,
            "{pattern}: alice's key still works"
        );
    }
    // A hostile owner, quoted in the condition's message, cannot spoof the
    // plugin's POLICY column: it shows the policies the status names.
    let hostile = "x ApiKeyPolicy prod-baseline y";
    cluster.apply(&apikey("team-a", "mallory", hostile));
    let message = wait_for("mallory to be refused", Duration::from_secs(20), || {
        let message = cluster.field(
            "apikey/mallory",
            "team-a",
            r#"{.status.conditions[?(@.type=="PolicyCompliant")].message}"#,
        );
        message.contains(hostile).then_some(message)
    });
    assert!(
        message.contains("ApiKeyPolicy prod-owners rule owner"),
        "{message}"
    );
    assert!(cluster.secret_key("team-a", "mallory").is_none());
    let (ok, list, _) = cluster.plugin(&["list", "-n", "team-a"]);
    assert!(ok, "{list}");
    let row = list.lines().find(|l| l.starts_with("mallory ")).unwrap();
    // The OWNER column shows the owner as it is; the POLICY column names one policy.
    assert!(row.contains("violates:prod-owners "), "{row}");
    assert_eq!(row.matches("violates:").count(), 1, "{row}");
    assert!(
        !operator
            .log_text()
            .contains("owner.pattern does not compile"),
        "the operator read every pattern"
    );
}
