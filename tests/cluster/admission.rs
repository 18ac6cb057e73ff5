//! ApiKeyPolicy at admission: the CRDs and `keyward admission` on a real API
//! server, no operator. Every forbidden ApiKey is rejected by `kubectl apply`
//! with a message that names the policy and the rule, and what is allowed
//! passes.

use std::{collections::BTreeMap, time::Duration};

use keyward::{
    crd::ApiKey,
    policy::{ApiKeyPolicy, CompiledPolicy, KeyContext, evaluate},
};

use crate::harness::{Cluster, OPERATOR, wait_for};

/// The CRDs, established.
fn install_crds(cluster: &Cluster) {
    for file in ["apikey.yaml", "apikeypolicy.yaml"] {
        let crd =
            std::fs::read_to_string(format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        cluster
            .try_kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(&crd))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/apikeys.keyward.dev",
        "crd/apikeypolicies.keyward.dev",
    ]);
}

/// Applies `keyward admission` in the version the API server serves.
fn install_admission_policy(cluster: &Cluster) {
    let served = |version: &str| {
        cluster
            .try_kubectl(&[
                "get",
                "--raw",
                &format!("/apis/admissionregistration.k8s.io/{version}"),
            ])
            .is_ok_and(|list| list.contains("\"validatingadmissionpolicies\""))
    };
    let version = if served("v1") {
        "v1"
    } else {
        assert!(
            served("v1beta1"),
            "the API server serves no ValidatingAdmissionPolicy (1.28 and 1.29 need the feature gate and admissionregistration.k8s.io/v1beta1)"
        );
        "v1beta1"
    };
    let output = std::process::Command::new(OPERATOR)
        .args(["admission", "--api-version", version])
        .output()
        .unwrap();
    assert!(output.status.success());
    cluster.apply(&String::from_utf8(output.stdout).unwrap());
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

/// An ApiKey; `extra` is more of its spec, indented by two spaces.
fn apikey(
    name: &str,
    namespace: &str,
    owner: &str,
    team: &str,
    scopes: &str,
    extra: &str,
) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  owner: {owner}\n  team: {team}\n  scopes: [{scopes}]\n{extra}"
    )
}

/// Lifetime settings that every policy below allows.
const COMPLIANT: &str = "  expiresAfter: 720h\n  rotation: {schedule: \"@every 168h\"}\n";

/// `kubectl apply` must fail with `message` in the error.
fn rejected(cluster: &Cluster, manifest: &str, message: &str) {
    match cluster.try_kubectl_with_input(&["apply", "-f", "-"], Some(manifest)) {
        Ok(out) => panic!("accepted ({out}), but it should be rejected:\n{manifest}"),
        Err(error) => {
            assert!(
                error.contains(message),
                "expected {message:?} in:\n{error}\nfor:\n{manifest}"
            );
            assert!(error.contains("keyward-apikey-policy"), "{error}");
        }
    }
}

/// `kubectl apply` must succeed.
fn accepted(cluster: &Cluster, manifest: &str) {
    cluster.apply(manifest);
}

/// Waits until the admission plugin sees `policy` (its informers catch up a
/// moment after a write): a server-side dry run of `manifest` is rejected with
/// a message naming it.
fn wait_until_enforced(cluster: &Cluster, policy: &str, manifest: &str) {
    let expected = format!("ApiKeyPolicy {policy} rule ");
    wait_for(
        &format!("ApiKeyPolicy {policy} at admission"),
        Duration::from_secs(30),
        || {
            cluster
                .try_kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], Some(manifest))
                .err()
                .filter(|e| e.contains(&expected))
        },
    );
}

/// The policies and namespaces of a test, so that every admission answer can be
/// compared with the operator's own check ([`evaluate`]) of the same key.
struct World<'a> {
    cluster: &'a Cluster,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: BTreeMap<String, ApiKeyPolicy>,
}

impl<'a> World<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        World {
            cluster,
            namespaces: BTreeMap::new(),
            policies: BTreeMap::new(),
        }
    }

    fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let manifest = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {}\n",
            serde_json::to_string(&labels).unwrap()
        );
        self.cluster.apply(&manifest);
        self.namespaces.insert(name.to_owned(), labels);
    }

    /// Creates an ApiKeyPolicy and waits until admission enforces it: `probe`,
    /// a key it forbids, is rejected in its name.
    fn policy(&mut self, name: &str, spec: &str, probe: &str) {
        let manifest = policy(name, spec);
        self.cluster.apply(&manifest);
        self.policies
            .insert(name.to_owned(), serde_yaml::from_str(&manifest).unwrap());
        wait_until_enforced(self.cluster, name, probe);
    }

    fn delete_policy(&mut self, name: &str) {
        self.cluster.kubectl(&["delete", "apikeypolicy", name]);
        self.policies.remove(name);
    }

    /// What the operator says about the key: every violation, in its words.
    fn operator_violations(&self, manifest: &str) -> Vec<String> {
        let key: ApiKey = serde_yaml::from_str(manifest).unwrap();
        let namespace = key.metadata.namespace.clone().unwrap();
        let compiled: Vec<CompiledPolicy> =
            self.policies.values().map(CompiledPolicy::new).collect();
        let context = KeyContext {
            namespace: &namespace,
            namespace_labels: &self.namespaces[&namespace],
            rank: &|| 0,
            now: jiff::Timestamp::now(),
            activity: None,
        };
        evaluate(&compiled, &key.spec, &context, false)
            .violations
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Applies the key. Admission and the operator must agree: both allow it
    /// (`expected` is `None`), or both forbid it, admission with the message
    /// `expected`, which is one of the operator's violations word for word.
    fn check(&self, manifest: &str, expected: Option<&str>) {
        let violations = self.operator_violations(manifest);
        match expected {
            None => {
                assert!(
                    violations.is_empty(),
                    "the operator forbids {violations:?}:\n{manifest}"
                );
                self.cluster.apply(manifest);
            }
            Some(message) => {
                assert!(
                    violations.iter().any(|v| v == message),
                    "the operator says {violations:?}, not {message:?}"
                );
                rejected(self.cluster, manifest, message);
            }
        }
    }
}

#[test]
fn admission_rejects_what_an_apikeypolicy_forbids() {
    let Some(cluster) = Cluster::start("admission_rejects_what_an_apikeypolicy_forbids") else {
        return;
    };
    install_crds(&cluster);
    let mut world = World::new(&cluster);
    world.namespace("pay", &[("env", "prod"), ("keyward.dev/team", "payments")]);
    world.namespace("lab", &[("env", "dev")]);
    world.namespace("bare", &[]);
    install_admission_policy(&cluster);
    let alice = "alice@example.com";
    let key = |name: &str, owner: &str, team: &str, scopes: &str, extra: &str| {
        apikey(name, "pay", owner, team, scopes, extra)
    };

    // No ApiKeyPolicy at all: anything goes.
    world.check(&key("free", "x", "anyone", "admin", ""), None);

    world.policy(
        "prod",
        "  namespaceSelector: {matchLabels: {env: prod}}
  teams: {allowed: [search], fromNamespaceLabel: keyward.dev/team}
  scopes: {allowed: [inference, \"models:*\"]}
  owner: {pattern: '.+@example\\.com'}
  lifetime: {maxExpiresAfter: 2160h, maxRotationInterval: 720h, maxGracePeriod: 2h}
",
        &key("probe", alice, "ml", "inference", COMPLIANT),
    );

    // Allowed: a listed team, the team from the namespace label, a prefix
    // scope, the limits themselves, a macro, a cron schedule, the default
    // grace period.
    for manifest in [
        key("listed", alice, "search", "inference", COMPLIANT),
        key(
            "labelled",
            alice,
            "payments",
            "inference, \"models:read\"",
            COMPLIANT,
        ),
        key(
            "at-the-limits",
            alice,
            "payments",
            "inference",
            "  expiresAfter: 2160h\n  rotation: {schedule: \"@every 720h\", gracePeriod: 2h}\n",
        ),
        key(
            "weekly",
            alice,
            "payments",
            "inference",
            "  expiresAfter: 1h\n  rotation: {schedule: \"@weekly\"}\n",
        ),
        key(
            "cron",
            alice,
            "payments",
            "inference",
            "  expiresAfter: 720h\n  rotation: {schedule: \"0 3 * * 1\", timeZone: Europe/Berlin}\n",
        ),
    ] {
        world.check(&manifest, None);
    }

    // Each rule, in the operator's words.
    for (manifest, message) in [
        (
            key("team", alice, "ml", "inference", COMPLIANT),
            r#"ApiKeyPolicy prod rule teams: team "ml" is not allowed in namespace pay; allowed: [search, payments]"#,
        ),
        (
            key(
                "scope",
                alice,
                "payments",
                "inference, admin, models",
                COMPLIANT,
            ),
            "ApiKeyPolicy prod rule scopes: scopes [admin, models] are not allowed; allowed: [inference, models:*]",
        ),
        (
            key(
                "owner",
                "alice@example.com.evil.org",
                "payments",
                "inference",
                COMPLIANT,
            ),
            r#"ApiKeyPolicy prod rule owner: owner "alice@example.com.evil.org" does not match ".+@example\\.com""#,
        ),
        (
            key(
                "no-expiry",
                alice,
                "payments",
                "inference",
                "  rotation: {schedule: \"@every 168h\"}\n",
            ),
            "ApiKeyPolicy prod rule lifetime.maxExpiresAfter: expiresAfter must be set, at most 2160h",
        ),
        (
            key(
                "long-expiry",
                alice,
                "payments",
                "inference",
                "  expiresAfter: 2161h\n  rotation: {schedule: \"@every 168h\"}\n",
            ),
            "ApiKeyPolicy prod rule lifetime.maxExpiresAfter: expiresAfter 2161h is longer than 2160h",
        ),
        (
            key(
                "no-schedule",
                alice,
                "payments",
                "inference",
                "  expiresAfter: 720h\n",
            ),
            "ApiKeyPolicy prod rule lifetime.maxRotationInterval: rotation.schedule must be set, rotating at least every 720h",
        ),
        (
            key(
                "long-every",
                alice,
                "payments",
                "inference",
                "  expiresAfter: 720h\n  rotation: {schedule: \"@every 721h\"}\n",
            ),
            r#"ApiKeyPolicy prod rule lifetime.maxRotationInterval: rotation.schedule "@every 721h" does not rotate at least every 720h"#,
        ),
        (
            key(
                "monthly",
                alice,
                "payments",
                "inference",
                "  expiresAfter: 720h\n  rotation: {schedule: \"@monthly\"}\n",
            ),
            r#"ApiKeyPolicy prod rule lifetime.maxRotationInterval: rotation.schedule "@monthly" does not rotate at least every 720h"#,
        ),
        (
            key(
                "long-grace",
                alice,
                "payments",
                "inference",
                "  expiresAfter: 720h\n  rotation: {schedule: \"@every 168h\", gracePeriod: 3h}\n",
            ),
            "ApiKeyPolicy prod rule lifetime.maxGracePeriod: rotation.gracePeriod 3h is longer than 2h",
        ),
    ] {
        world.check(&manifest, Some(message));
    }

    // A 5-field cron schedule passes admission; the operator checks its real
    // intervals (here every 3 months) and refuses the key.
    let quarterly = key(
        "quarterly",
        alice,
        "payments",
        "inference",
        "  expiresAfter: 720h\n  rotation: {schedule: \"0 3 1 */3 *\"}\n",
    );
    assert_eq!(
        world.operator_violations(&quarterly),
        [
            r#"ApiKeyPolicy prod rule lifetime.maxRotationInterval: rotation.schedule "0 3 1 */3 *" does not rotate at least every 720h"#
        ]
    );
    cluster.apply(&quarterly);

    // The selector picks env=prod only.
    world.check(&apikey("elsewhere", "lab", "x", "ml", "admin", ""), None);

    // A second policy over every namespace: both apply, each on its own.
    world.policy(
        "team-label",
        "  namespaceSelector: {}\n  teams: {fromNamespaceLabel: keyward.dev/team}\n",
        &apikey("probe", "lab", "x", "ml", "admin", ""),
    );
    world.check(
        &apikey("unlabelled", "bare", "x", "ml", "admin", ""),
        Some(
            r#"ApiKeyPolicy team-label rule teams: team "ml" is not allowed in namespace bare; allowed: [(namespace label keyward.dev/team is not set)]"#,
        ),
    );
    world.check(
        &key("search", alice, "search", "inference", COMPLIANT),
        Some(
            r#"ApiKeyPolicy team-label rule teams: team "search" is not allowed in namespace pay; allowed: [payments]"#,
        ),
    );
    world.check(
        &key("both", alice, "payments", "admin", COMPLIANT),
        Some(
            "ApiKeyPolicy prod rule scopes: scopes [admin] are not allowed; allowed: [inference, models:*]",
        ),
    );
    world.check(
        &key("both-allow", alice, "payments", "inference", COMPLIANT),
        None,
    );

    // Selector expressions, and explicit nulls (read as unset, as the operator
    // reads them); `kubectl create` keeps the nulls that `apply` would drop.
    world.delete_policy("team-label");
    world.delete_policy("prod");
    let spec = "  namespaceSelector:
    matchExpressions:
    - {key: env, operator: In, values: [dev, test]}
    - {key: keyward.dev/team, operator: DoesNotExist}
    - {key: tier, operator: NotIn, values: [gold]}
  teams: {allowed: [devs], fromNamespaceLabel: null}
  scopes: null
  owner: null
  lifetime: {maxExpiresAfter: null, maxGracePeriod: 1h}
";
    cluster
        .try_kubectl_with_input(&["create", "-f", "-"], Some(&policy("lab", spec)))
        .unwrap();
    world.policies.insert(
        "lab".into(),
        serde_yaml::from_str(&policy("lab", spec)).unwrap(),
    );
    wait_until_enforced(
        &cluster,
        "lab",
        &apikey("probe", "lab", "x", "ml", "admin", ""),
    );
    world.check(
        &apikey("lab-team", "lab", "x", "ml", "admin", ""),
        Some(r#"ApiKeyPolicy lab rule teams: team "ml" is not allowed in namespace lab; allowed: [devs]"#),
    );
    world.check(
        &apikey(
            "lab-ok",
            "lab",
            "x",
            "devs",
            "admin",
            "  expiresAfter: null\n",
        ),
        None,
    );
    world.check(
        &apikey("lab-grace", "lab", "x", "devs", "admin", "  rotation: {gracePeriod: 90m}\n"),
        Some("ApiKeyPolicy lab rule lifetime.maxGracePeriod: rotation.gracePeriod 90m is longer than 1h"),
    );
    world.check(&apikey("not-lab", "bare", "x", "ml", "admin", ""), None);
    world.check(&key("not-lab", alice, "ml", "admin", ""), None);

    // A selector the API server could not read never gets stored: the CRD's
    // schema rejects it (the operator and the admission policy would fail closed).
    world.delete_policy("lab");
    let broken = policy(
        "broken",
        "  namespaceSelector:\n    matchExpressions:\n    - {key: env, operator: Equals, values: [prod]}\n",
    );
    let refused = world
        .cluster
        .try_kubectl_with_input(&["apply", "-f", "-"], Some(&broken))
        .unwrap_err();
    assert!(
        refused.contains("each matchExpressions entry needs operator In or NotIn with values"),
        "{refused}"
    );
}

#[test]
fn admission_never_blocks_an_existing_key_from_being_annotated_or_deleted() {
    let Some(cluster) =
        Cluster::start("admission_never_blocks_an_existing_key_from_being_annotated_or_deleted")
    else {
        return;
    };
    install_crds(&cluster);
    install_admission_policy(&cluster);

    // A key from before the policy, held by the operator's finalizer.
    let old = "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: old\n  namespace: default\n  finalizers: [keyward.dev/revoke]\nspec:\n  owner: bob@example.org\n  team: ml\n  scopes: [admin]\n";
    accepted(&cluster, old);
    cluster.apply(&policy(
        "strict",
        "  namespaceSelector: {}\n  teams: {allowed: [search]}\n",
    ));
    let forbidden = "ApiKeyPolicy strict rule teams: team \"ml\" is not allowed in namespace default; allowed: [search]";
    wait_until_enforced(
        &cluster,
        "strict",
        &apikey("probe", "default", "x", "ml", "admin", ""),
    );

    // Metadata and status writes on it pass: the spec does not change.
    cluster.kubectl(&["annotate", "apikey/old", "keyward.dev/rotate=now"]);
    accepted(
        &cluster,
        &old.replace(
            "  namespace: default\n",
            "  namespace: default\n  labels: {a: b}\n",
        ),
    );
    cluster.kubectl(&[
        "patch",
        "apikey/old",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"keyHint":"kw_AbC1"}}"#,
    ]);
    // A change to its spec is judged like a new key.
    let error = cluster
        .try_kubectl(&[
            "patch",
            "apikey/old",
            "--type=merge",
            "-p",
            r#"{"spec":{"description":"x"}}"#,
        ])
        .unwrap_err();
    assert!(error.contains(forbidden), "{error}");

    // Deleting it: the finalizer can be removed, and then it is gone.
    cluster.kubectl(&["delete", "apikey/old", "--wait=false"]);
    cluster.kubectl(&[
        "patch",
        "apikey/old",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    wait_for("the ApiKey to be gone", Duration::from_secs(10), || {
        cluster
            .try_kubectl(&["get", "apikey/old"])
            .is_err()
            .then_some(())
    });
}
