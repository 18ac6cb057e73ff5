//! ApiKeyPolicy enforcement by the operator alone: no ValidatingAdmissionPolicy
//! is installed here, as on a cluster where admission is missing or bypassed.

use std::time::Duration;

use crate::harness::{Cluster, key_set, verify, wait_for};

const NS: &str = "team-a";

fn apikey(name: &str, team: &str, scopes: &str, extra: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  owner: alice@example.com\n  team: {team}\n  scopes: [{scopes}]\n{extra}"
    )
}

/// A policy for namespaces labelled `tier: prod`: teams from the namespace's
/// `keyward.dev/team` label, the given scopes, 90-day expiry and rotation.
fn prod_policy(scopes: &str, on_violation: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata:\n  name: prod\nspec:\n  namespaceSelector: {{matchLabels: {{tier: prod}}}}\n  teams: {{fromNamespaceLabel: keyward.dev/team}}\n  scopes: {{allowed: [{scopes}]}}\n  lifetime: {{maxExpiresAfter: 2160h, maxRotationInterval: 2160h}}\n  onViolation: {on_violation}\n"
    )
}

const LIFETIME: &str = "  expiresAfter: 2160h\n  rotation: {schedule: \"@every 720h\"}\n";

fn condition(cluster: &Cluster, name: &str, type_: &str, field: &str) -> String {
    cluster.field(
        &format!("apikey/{name}"),
        NS,
        &format!(r#"{{.status.conditions[?(@.type=="{type_}")].{field}}}"#),
    )
}

/// Waits until Ready has `reason`; returns its message.
fn ready_reason(cluster: &Cluster, name: &str, reason: &str) -> String {
    wait_for(
        &format!("{name} to be {reason}"),
        Duration::from_secs(20),
        || {
            (condition(cluster, name, "Ready", "reason") == reason)
                .then(|| condition(cluster, name, "Ready", "message"))
        },
    )
}

/// (live, ever issued) key records of an ApiKey.
fn records(url: &str, cluster: &Cluster, name: &str) -> (usize, i64) {
    let uid = cluster.field(&format!("apikey/{name}"), NS, "{.metadata.uid}");
    assert!(!uid.is_empty(), "apikey/{name} exists");
    let set = key_set(url, &uid);
    (set.live.len(), set.issued)
}

fn start(test: &str, extra: &[&str]) -> Option<(Cluster, String, crate::harness::Operator)> {
    let cluster = Cluster::start(test)?;
    let url = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let operator = cluster.operator(&url, extra, "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys,apikeypolicies"]).ok()
    });
    cluster.kubectl(&["create", "namespace", NS]);
    cluster.kubectl(&[
        "label",
        "namespace",
        NS,
        "tier=prod",
        "keyward.dev/team=payments",
    ]);
    Some((cluster, url, operator))
}

#[test]
fn the_operator_alone_never_issues_a_forbidden_key() {
    let Some((cluster, url, operator)) =
        start("the_operator_alone_never_issues_a_forbidden_key", &[])
    else {
        return;
    };
    cluster.apply(&prod_policy("inference, \"models:*\"", "Keep"));
    let forbidden = [
        (
            "wrong-team",
            apikey("wrong-team", "search", "inference", LIFETIME),
            "rule teams: team \"search\" is not allowed",
        ),
        (
            "wrong-scope",
            apikey("wrong-scope", "payments", "admin", LIFETIME),
            "rule scopes: scopes [admin] are not allowed",
        ),
        (
            "long-expiry",
            apikey(
                "long-expiry",
                "payments",
                "inference",
                "  expiresAfter: 4000h\n  rotation: {schedule: \"@every 720h\"}\n",
            ),
            "rule lifetime.maxExpiresAfter: expiresAfter 4000h is longer than 2160h",
        ),
        (
            "no-rotation",
            apikey(
                "no-rotation",
                "payments",
                "inference",
                "  expiresAfter: 720h\n",
            ),
            "rule lifetime.maxRotationInterval: rotation.schedule must be set",
        ),
    ];
    for (_, manifest, _) in &forbidden {
        cluster.apply(manifest);
    }
    cluster.apply(&apikey(
        "allowed",
        "payments",
        "inference, \"models:read\"",
        LIFETIME,
    ));
    wait_for("the allowed key", Duration::from_secs(20), || {
        cluster.secret_key(NS, "allowed")
    });
    for (name, _, expected) in &forbidden {
        let message = ready_reason(&cluster, name, "PolicyViolation");
        assert!(
            message.contains(&format!("ApiKeyPolicy prod {expected}")),
            "{name}: {message}"
        );
        assert_eq!(
            condition(&cluster, name, "PolicyCompliant", "status"),
            "False"
        );
        assert_eq!(
            records(&url, &cluster, name),
            (0, 0),
            "{name} has no key record"
        );
        assert!(
            cluster
                .try_kubectl(&["get", "secret", name, "-n", NS])
                .is_err(),
            "{name} has no Secret"
        );
    }
    let events = cluster.kubectl(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        "reason=PolicyViolation",
        "-o",
        "jsonpath={range .items[*]}{.type} {.involvedObject.name}{\"\\n\"}{end}",
    ]);
    for (name, _, _) in &forbidden {
        assert!(events.contains(&format!("Warning {name}")), "{events}");
    }
    // The policy's status counts what it governs and names the violators.
    let status = wait_for("the policy status", Duration::from_secs(20), || {
        let violating = cluster.field("apikeypolicy/prod", "", "{.status.violatingKeys}");
        (violating == "4").then(|| cluster.kubectl(&["get", "apikeypolicy", "prod"]))
    });
    assert!(
        status.contains("NAMESPACES") && status.contains("VIOLATIONS"),
        "{status}"
    );
    assert_eq!(
        cluster.field("apikeypolicy/prod", "", "{.status.governedKeys}"),
        "5"
    );
    let listed = cluster.field("apikeypolicy/prod", "", "{.status.violations[*].name}");
    for (name, _, _) in &forbidden {
        assert!(listed.contains(name), "{listed}");
    }

    // Fixing the ApiKey issues it at once.
    cluster.apply(&apikey("wrong-scope", "payments", "inference", LIFETIME));
    wait_for("the fixed key", Duration::from_secs(20), || {
        cluster.secret_key(NS, "wrong-scope")
    });

    // --require-policy: a namespace no policy selects gets no keys.
    drop(operator);
    let _strict = cluster.operator(&url, &["--require-policy"], "info");
    cluster.kubectl(&["create", "namespace", "unselected"]);
    cluster.apply(&apikey("orphan", "payments", "inference", "").replace(NS, "unselected"));
    let message = wait_for("orphan to be refused", Duration::from_secs(30), || {
        let reason = cluster.field(
            "apikey/orphan",
            "unselected",
            r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
        );
        (reason == "PolicyViolation").then(|| {
            cluster.field(
                "apikey/orphan",
                "unselected",
                r#"{.status.conditions[?(@.type=="Ready")].message}"#,
            )
        })
    });
    assert!(
        message.contains("no ApiKeyPolicy selects namespace unselected"),
        "{message}"
    );
    assert!(
        cluster
            .try_kubectl(&["get", "secret", "orphan", "-n", "unselected"])
            .is_err()
    );
}

#[test]
fn tightening_a_policy_flags_keys_and_its_action_decides() {
    let Some((cluster, url, _operator)) =
        start("tightening_a_policy_flags_keys_and_its_action_decides", &[])
    else {
        return;
    };
    cluster.apply(&prod_policy("inference", "Keep"));
    cluster.apply(&apikey("issued", "payments", "inference", LIFETIME));
    let key = wait_for("the key", Duration::from_secs(20), || {
        cluster.secret_key(NS, "issued")
    });
    assert_eq!(verify(&url, &key).0, 0);

    // Tightened: the key is flagged, not revoked (the default, Keep).
    cluster.apply(&prod_policy("metrics", "Keep"));
    let flagged = wait_for("the key to be flagged", Duration::from_secs(20), || {
        let status = condition(&cluster, "issued", "PolicyCompliant", "status");
        (status == "False").then(|| condition(&cluster, "issued", "PolicyCompliant", "message"))
    });
    assert!(
        flagged.contains("ApiKeyPolicy prod rule scopes"),
        "{flagged}"
    );
    assert_eq!(condition(&cluster, "issued", "Ready", "status"), "True");
    assert_eq!(verify(&url, &key).0, 0, "Keep leaves the key working");
    wait_for("the flag Event", Duration::from_secs(20), || {
        let events = cluster.kubectl(&[
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            "reason=PolicyViolation,type=Warning",
            "-o",
            "jsonpath={.items[*].message}",
        ]);
        events.contains("The key keeps working").then_some(())
    });
    // A requested rotation is not carried out while the key is forbidden.
    cluster.kubectl(&[
        "annotate",
        "apikey",
        "issued",
        "-n",
        NS,
        "keyward.dev/rotate=1",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster.secret_key(NS, "issued").as_deref(),
        Some(key.as_str())
    );
    assert_eq!(records(&url, &cluster, "issued"), (1, 1));

    // RefuseRotation: the requested rotation is now due, so the key is revoked
    // instead of rotated.
    cluster.apply(&prod_policy("metrics", "RefuseRotation"));
    ready_reason(&cluster, "issued", "PolicyViolation");
    assert_ne!(
        verify(&url, &key).0,
        0,
        "the key is revoked at its rotation"
    );
    assert_eq!(records(&url, &cluster, "issued"), (0, 1));

    // Relaxed again: a new key is issued without a restart.
    cluster.apply(&prod_policy("inference", "Revoke"));
    let fresh = wait_for("a new key", Duration::from_secs(20), || {
        cluster.secret_key(NS, "issued").filter(|k| *k != key)
    });
    assert_eq!(verify(&url, &fresh).0, 0);
    assert_eq!(
        condition(&cluster, "issued", "PolicyCompliant", "status"),
        "True"
    );

    // Revoke mode takes a key away at once, without waiting for a rotation.
    cluster.apply(&prod_policy("metrics", "Revoke"));
    ready_reason(&cluster, "issued", "PolicyViolation");
    assert_ne!(verify(&url, &fresh).0, 0, "the key is revoked");
    assert_eq!(records(&url, &cluster, "issued"), (0, 2));
}
