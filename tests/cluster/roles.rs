//! The ClusterRoles for keyward's users (config/aggregated-roles.yaml) and the
//! policy examples, on a real API server: what a user bound to them can and
//! cannot do. Users are impersonated (`kubectl --as`), so the API server
//! authorizes each request as that user, with RBAC.
//!
//! The API server here runs without kube-controller-manager, whose
//! clusterrole-aggregation controller fills in the built-in view, edit and admin
//! roles. So the tests bind keyward's roles directly, and check that the
//! built-in roles' own aggregation selectors pick keyward-view and keyward-edit
//! and never a role that grants ApiKeyPolicies.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cluster, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Starts an API server, or `None` to skip: these tests write ClusterRoles and
/// Namespaces, so they never run against an existing cluster.
fn start(test: &str) -> Option<Cluster> {
    if std::env::var("KEYWARD_E2E_KUBECONFIG").is_ok() {
        eprintln!(
            "SKIP: {test}: writes cluster-wide RBAC, needs the API server this harness starts"
        );
        return None;
    }
    let cluster = Cluster::start(test)?;
    // Both CRDs, as shipped, then the users' ClusterRoles.
    for crd in ["apikey", "apikeypolicy"] {
        cluster.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            &format!("{ROOT}/crds/{crd}.yaml"),
        ]);
    }
    wait_for("the CRDs to be served", Duration::from_secs(30), || {
        cluster
            .try_kubectl(&["get", "apikeys,apikeypolicies", "-A"])
            .ok()
    });
    cluster.kubectl(&[
        "apply",
        "-f",
        &format!("{ROOT}/config/aggregated-roles.yaml"),
    ]);
    Some(cluster)
}

/// kubectl as `user` in `groups`; `Err(stderr)` on failure.
fn kubectl_as(
    cluster: &Cluster,
    user: &str,
    groups: &[&str],
    args: &[&str],
    input: Option<&str>,
) -> Result<String, String> {
    let mut all = vec!["--as", user];
    for group in groups {
        all.extend(["--as-group", group]);
    }
    all.extend_from_slice(args);
    cluster.try_kubectl_with_input(&all, input)
}

/// Asserts that kubectl as `user` was refused by RBAC.
fn assert_forbidden(result: Result<String, String>, what: &str) {
    match result {
        Ok(out) => panic!("{what} was allowed: {out}"),
        Err(error) => assert!(error.contains("Forbidden"), "{what}: {error}"),
    }
}

/// `kubectl auth can-i` as `user` in `groups` (`resource` may name a subresource,
/// `apikeys.keyward.dev/status`); `namespace` `None` for the cluster scope.
fn can(
    cluster: &Cluster,
    (user, groups): (&str, &[&str]),
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    // `resource/sub` would be read as a resource and an object name.
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, sub)) => (resource, Some(format!("--subresource={sub}"))),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource];
    args.extend(subresource.as_deref());
    if let Some(namespace) = namespace {
        args.extend(["-n", namespace]);
    }
    kubectl_as(cluster, user, groups, &args, None).is_ok_and(|out| out.trim() == "yes")
}

fn apikey(name: &str, namespace: &str, owner: &str, team: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  owner: {owner}\n  team: {team}\n  scopes: [inference]\n"
    )
}

fn policy(name: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {{name: {name}}}\nspec:\n  namespaceSelector: {{}}\n  scopes: {{allowed: [\"*\"]}}\n"
    )
}

#[test]
fn keyward_edit_writes_apikeys_and_never_touches_policies() {
    let Some(cluster) = start("keyward_edit_writes_apikeys_and_never_touches_policies") else {
        return;
    };
    cluster.kubectl(&["create", "namespace", "team-a"]);
    cluster.kubectl(&[
        "create",
        "rolebinding",
        "erin-keyward-edit",
        "--clusterrole=keyward-edit",
        "--user=erin",
        "-n",
        "team-a",
    ]);
    let erin = |args: &[&str], input: Option<&str>| kubectl_as(&cluster, "erin", &[], args, input);
    let in_team_a = |args: &[&str]| {
        let mut all = vec!["-n", "team-a"];
        all.extend_from_slice(args);
        erin(&all, None)
    };

    // Every way a user writes an ApiKey: create, apply and patch (which read first),
    // annotate (the on-demand rotation), delete.
    let key = apikey("erins", "team-a", "erin@example.com", "ml");
    erin(&["create", "-f", "-"], Some(&key)).unwrap();
    erin(
        &["apply", "-f", "-"],
        Some(&key.replace("ml\n", "ml-platform\n")),
    )
    .unwrap();
    in_team_a(&[
        "patch",
        "apikey",
        "erins",
        "--type=merge",
        "-p",
        r#"{"spec":{"description":"patched"}}"#,
    ])
    .unwrap();
    in_team_a(&["annotate", "apikey", "erins", "keyward.dev/rotate=now"]).unwrap();
    let listed = in_team_a(&["get", "apikeys", "-o", "name"]).unwrap();
    assert_eq!(listed.trim(), "apikey.keyward.dev/erins");
    let spec = cluster.field("apikey/erins", "team-a", "{.spec.team} {.spec.description}");
    assert_eq!(spec, "ml-platform patched");
    assert_eq!(
        cluster.field(
            "apikey/erins",
            "team-a",
            r#"{.metadata.annotations.keyward\.dev/rotate}"#
        ),
        "now"
    );
    in_team_a(&["delete", "apikey", "erins", "--wait=false"]).unwrap();
    erin(&["create", "-f", "-"], Some(&key)).unwrap();
    in_team_a(&["delete", "apikeys", "--all", "--wait=false"]).unwrap();

    // Only in the namespace of the binding.
    assert_forbidden(
        erin(
            &["create", "-f", "-"],
            Some(&apikey("erins", "default", "erin@example.com", "ml")),
        ),
        "creating an ApiKey in another namespace",
    );
    // Status, finalizers and Secrets stay the operator's.
    let erin_id = ("erin", &[][..]);
    for (verb, resource) in [
        ("patch", "apikeys.keyward.dev/status"),
        ("update", "apikeys.keyward.dev/finalizers"),
        ("get", "secrets"),
    ] {
        assert!(
            !can(&cluster, erin_id, verb, resource, Some("team-a")),
            "{verb} {resource}"
        );
    }

    // ApiKeyPolicies: neither written nor read, not even in erin's namespace's name.
    cluster.apply(&policy("baseline"));
    assert_forbidden(
        erin(&["create", "-f", "-"], Some(&policy("erins-own"))),
        "creating an ApiKeyPolicy",
    );
    assert_forbidden(
        erin(&["get", "apikeypolicy", "baseline"], None),
        "reading an ApiKeyPolicy",
    );
    assert_forbidden(
        erin(&["get", "apikeypolicies"], None),
        "listing ApiKeyPolicies",
    );
    assert_forbidden(
        erin(
            &[
                "patch",
                "apikeypolicy",
                "baseline",
                "--type=merge",
                "-p",
                r#"{"spec":{"scopes":null}}"#,
            ],
            None,
        ),
        "loosening an ApiKeyPolicy",
    );
    assert_forbidden(
        erin(&["delete", "apikeypolicy", "baseline"], None),
        "deleting an ApiKeyPolicy",
    );
    assert!(!can(
        &cluster,
        erin_id,
        "watch",
        "apikeypolicies.keyward.dev",
        None
    ));

    // keyward-view alone reads and never writes.
    cluster.kubectl(&[
        "create",
        "rolebinding",
        "vic-keyward-view",
        "--clusterrole=keyward-view",
        "--user=vic",
        "-n",
        "team-a",
    ]);
    let vic = ("vic", &[][..]);
    assert!(can(
        &cluster,
        vic,
        "list",
        "apikeys.keyward.dev",
        Some("team-a")
    ));
    kubectl_as(
        &cluster,
        "vic",
        &[],
        &["get", "apikeys", "-n", "team-a"],
        None,
    )
    .unwrap();
    assert_forbidden(
        kubectl_as(
            &cluster,
            "vic",
            &[],
            &["create", "-f", "-"],
            Some(&apikey("vics", "team-a", "vic@example.com", "ml")),
        ),
        "creating an ApiKey with keyward-view",
    );
    assert!(!can(
        &cluster,
        vic,
        "get",
        "apikeypolicies.keyward.dev",
        None
    ));

    // keyward-policy-admin, bound cluster-wide, writes policies and nothing else.
    cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        "pia-keyward-policy-admin",
        "--clusterrole=keyward-policy-admin",
        "--user=pia",
    ]);
    kubectl_as(
        &cluster,
        "pia",
        &[],
        &["create", "-f", "-"],
        Some(&policy("pias")),
    )
    .unwrap();
    kubectl_as(
        &cluster,
        "pia",
        &[],
        &["delete", "apikeypolicy", "pias"],
        None,
    )
    .unwrap();
    assert!(!can(
        &cluster,
        ("pia", &[]),
        "list",
        "apikeys.keyward.dev",
        Some("team-a")
    ));

    // What the aggregation controller would pick: the built-in roles' selectors
    // match keyward-view (view, edit, admin) and keyward-edit (edit, admin), and
    // none of the roles they match grants anything on ApiKeyPolicies.
    for (builtin, expected) in [
        ("view", vec!["keyward-view"]),
        ("edit", vec!["keyward-edit", "keyward-view"]),
        ("admin", vec!["keyward-edit", "keyward-view"]),
    ] {
        let role: Value =
            serde_json::from_str(&cluster.kubectl(&["get", "clusterrole", builtin, "-o", "json"]))
                .unwrap();
        let selectors = role["aggregationRule"]["clusterRoleSelectors"]
            .as_array()
            .unwrap_or_else(|| panic!("{builtin} has no aggregationRule"));
        let mut picked = Vec::new();
        for selector in selectors {
            let labels: Vec<String> = selector["matchLabels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(key, value)| format!("{key}={}", value.as_str().unwrap()))
                .collect();
            let matched: Value = serde_json::from_str(&cluster.kubectl(&[
                "get",
                "clusterroles",
                "-l",
                &labels.join(","),
                "-o",
                "json",
            ]))
            .unwrap();
            for role in matched["items"].as_array().unwrap() {
                let name = role["metadata"]["name"].as_str().unwrap();
                for rule in role["rules"].as_array().into_iter().flatten() {
                    let resources = rule["resources"].as_array().into_iter().flatten();
                    for resource in resources.filter_map(Value::as_str) {
                        assert!(
                            !resource.starts_with("apikeypolicies") && resource != "*",
                            "{name}, aggregated into {builtin}, grants {resource}"
                        );
                    }
                }
                if name.starts_with("keyward") {
                    picked.push(name.to_owned());
                }
            }
        }
        picked.sort();
        assert_eq!(picked, expected, "keyward roles aggregated into {builtin}");
    }
}

#[test]
fn policy_examples_apply_and_grant_what_they_say() {
    let Some(cluster) = start("policy_examples_apply_and_grant_what_they_say") else {
        return;
    };
    let examples = ["platform-admin", "team-admin", "developer"]
        .map(|name| format!("{ROOT}/examples/policy-{name}.yaml"));
    // They apply for real (kubectl validates fields strictly), and a second apply
    // changes nothing.
    for example in &examples {
        cluster.kubectl(&["apply", "-f", example]);
    }
    for example in &examples {
        let again = cluster.kubectl(&["apply", "-f", example]);
        assert!(
            again.lines().all(|line| line.ends_with(" unchanged")),
            "{example}: {again}"
        );
    }
    let policies = cluster.kubectl(&["get", "apikeypolicies", "-o", "name"]);
    let mut policies: Vec<&str> = policies.lines().collect();
    policies.sort_unstable();
    assert_eq!(
        policies,
        [
            "apikeypolicy.keyward.dev/prod-lifetimes",
            "apikeypolicy.keyward.dev/sandbox-dev-alice",
            "apikeypolicy.keyward.dev/sandboxes",
            "apikeypolicy.keyward.dev/team-namespaces",
        ]
    );
    // Stored as written, nothing pruned.
    assert_eq!(
        cluster.field(
            "apikeypolicy/sandboxes",
            "",
            "{.spec.maxKeysPerNamespace} {.spec.lifetime.maxExpiresAfter} {.spec.onViolation}"
        ),
        "5 720h Revoke"
    );
    assert_eq!(
        cluster.field(
            "apikeypolicy/team-namespaces",
            "",
            "{.spec.teams.fromNamespaceLabel} {.spec.owner.pattern}"
        ),
        r"keyward.dev/team .+@example\.com"
    );

    // Platform admins: write policies, read every namespace's ApiKeys, write none.
    let platform = ("pat", &["platform-admins"][..]);
    assert!(can(
        &cluster,
        platform,
        "create",
        "apikeypolicies.keyward.dev",
        None
    ));
    assert!(can(
        &cluster,
        platform,
        "list",
        "apikeys.keyward.dev",
        Some("payments")
    ));
    assert!(!can(
        &cluster,
        platform,
        "create",
        "apikeys.keyward.dev",
        Some("payments")
    ));
    assert!(!can(&cluster, platform, "get", "secrets", Some("payments")));
    kubectl_as(
        &cluster,
        platform.0,
        platform.1,
        &["create", "-f", "-"],
        Some(&policy("by-platform")),
    )
    .unwrap();
    let all = kubectl_as(
        &cluster,
        platform.0,
        platform.1,
        &["get", "apikeys", "-A", "-o", "name"],
        None,
    )
    .unwrap();
    assert!(
        all.contains("checkout-inference") && all.contains("notebook"),
        "{all}"
    );

    // Payments admins: ApiKeys in payments, nothing elsewhere, no policies.
    let payments = ("pam", &["payments-admins"][..]);
    kubectl_as(
        &cluster,
        payments.0,
        payments.1,
        &[
            "-n",
            "payments",
            "annotate",
            "apikey",
            "checkout-inference",
            "keyward.dev/rotate=1",
        ],
        None,
    )
    .unwrap();
    kubectl_as(
        &cluster,
        payments.0,
        payments.1,
        &["create", "-f", "-"],
        Some(&apikey(
            "refunds",
            "payments",
            "refunds@example.com",
            "payments",
        )),
    )
    .unwrap();
    assert!(!can(
        &cluster,
        payments,
        "create",
        "apikeys.keyward.dev",
        Some("dev-alice")
    ));
    assert!(!can(
        &cluster,
        payments,
        "get",
        "apikeypolicies.keyward.dev",
        None
    ));

    // alice: ApiKeys in her sandbox only, no policies.
    let alice = ("alice@example.com", &[][..]);
    kubectl_as(
        &cluster,
        alice.0,
        alice.1,
        &["create", "-f", "-"],
        Some(&apikey(
            "scratch",
            "dev-alice",
            "alice@example.com",
            "personal",
        )),
    )
    .unwrap();
    assert!(!can(
        &cluster,
        alice,
        "create",
        "apikeys.keyward.dev",
        Some("payments")
    ));
    assert!(!can(
        &cluster,
        alice,
        "patch",
        "apikeypolicies.keyward.dev",
        None
    ));
    assert_forbidden(
        kubectl_as(
            &cluster,
            alice.0,
            alice.1,
            &["get", "apikeypolicy", "sandboxes"],
            None,
        ),
        "alice reading her sandbox's policy",
    );
}
