//! The Helm chart as Helm itself renders it: scripts/helm-render lints and
//! renders charts/keyward with Helm v4's engine (PyPI's helm-python-sdk), and
//! these tests check the rendered objects for each values variant. The python
//! with helm-python-sdk is `KEYWARD_HELM_PYTHON` (scripts/test sets it), else
//! the venv scripts/test keeps in the cache; without either, each test prints a
//! SKIP line. tests/manifests.rs checks the templates as text; this checks what
//! they produce.

use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    process::{Command, Output},
};

use serde::Deserialize;
use serde_yaml::Value;

#[path = "support/helm_python.rs"]
mod helm_python;
use helm_python::helm_python;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NAMESPACE: &str = "keyward-system";

/// Runs scripts/helm-render with `args`, or `None` after a SKIP line.
fn helm_render(test: &str, args: &[&str]) -> Option<Output> {
    let Some(python) = helm_python() else {
        eprintln!(
            "SKIP: {test}: no python with helm-python-sdk (scripts/test installs it and sets KEYWARD_HELM_PYTHON)"
        );
        return None;
    };
    let output = Command::new(&python)
        .arg(format!("{ROOT}/scripts/helm-render"))
        .args(["--strict", "--namespace", NAMESPACE])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    Some(output)
}

/// The objects the chart renders to with `args`, or `None` to skip.
fn render(test: &str, args: &[&str]) -> Option<Rendering> {
    let output = helm_render(test, args)?;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "helm-render {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(Rendering(documents(&stdout)))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

fn config(file: &str) -> Vec<Value> {
    documents(&fs::read_to_string(format!("{ROOT}/config/{file}")).unwrap())
}

struct Rendering(Vec<Value>);

impl Rendering {
    fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .0
            .iter()
            .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), name(o)))
            .collect();
        kinds.sort();
        kinds
    }

    fn find(&self, kind: &str, name_: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|o| o["kind"] == kind && name(o) == name_)
    }

    fn get(&self, kind: &str, name_: &str) -> &Value {
        self.find(kind, name_)
            .unwrap_or_else(|| panic!("no {kind}/{name_} in {:?}", self.kinds()))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.0.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn container(&self) -> &Value {
        let containers =
            &self.get("Deployment", "keyward")["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_sequence().unwrap().len(), 1);
        &containers[0]
    }

    fn args(&self) -> Vec<String> {
        strings(&self.container()["args"])
    }

    fn cluster_rules(&self) -> &Value {
        &self.get("ClusterRole", "keyward")["rules"]
    }

    /// The apiVersion of the admission policy and of its binding.
    fn admission_versions(&self) -> [&str; 2] {
        [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
        .map(|kind| {
            self.get(kind, "keyward-apikey-policy")["apiVersion"]
                .as_str()
                .unwrap()
        })
    }
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

fn strings(list: &Value) -> Vec<String> {
    list.as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn config_object<'a>(objects: &'a [Value], kind: &str, name_: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && name(o) == name_)
        .unwrap_or_else(|| panic!("no {kind}/{name_} in config/"))
}

/// A rule granting `verbs` on `resources` of `group`, as the templates write it.
fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> Value {
    serde_yaml::to_value(serde_json::json!({
        "apiGroups": [group], "resources": resources, "verbs": verbs,
    }))
    .unwrap()
}

const APPS_RULE: (&str, &[&str], &[&str]) = (
    "apps",
    &["deployments", "statefulsets", "daemonsets"],
    &["get", "patch"],
);
const CRD_RULE: (&str, &[&str], &[&str]) = (
    "apiextensions.k8s.io",
    &["customresourcedefinitions"],
    &["get", "list", "watch", "patch"],
);

fn has_rule(rules: &Value, (group, resources, verbs): (&str, &[&str], &[&str])) -> bool {
    rules
        .as_sequence()
        .unwrap()
        .contains(&rule(group, resources, verbs))
}

#[test]
fn lint_or_render_errors_fail_the_script() {
    // A values mistake the chart refuses: the render fails with the chart's message.
    let Some(output) = helm_render(
        "lint_or_render_errors_fail_the_script",
        &["--set", "admission.apiVersion=v2"],
    ) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    assert!(
        stderr.contains("admission.apiVersion must be v1, v1beta1, or empty"),
        "{stderr}"
    );

    // A chart whose template is not YAML fails the lint.
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("keyward");
    copy_dir(&PathBuf::from(format!("{ROOT}/charts/keyward")), &chart);
    fs::write(
        chart.join("templates/broken.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [broken\n",
    )
    .unwrap();
    let output = helm_render(
        "lint_or_render_errors_fail_the_script",
        &["--chart", chart.to_str().unwrap()],
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("lint failed") && stderr.contains("broken.yaml"),
        "{stderr}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn defaults_render_what_config_ships_with_embedded_sqlite() {
    let Some(chart) = render(
        "defaults_render_what_config_ships_with_embedded_sqlite",
        &[],
    ) else {
        return;
    };
    assert_eq!(
        chart.kinds(),
        [
            "ClusterRole/keyward",
            "ClusterRole/keyward-edit",
            "ClusterRole/keyward-policy-admin",
            "ClusterRole/keyward-view",
            "ClusterRoleBinding/keyward",
            "Deployment/keyward",
            "PersistentVolumeClaim/keyward-data",
            "Role/keyward-leader-election",
            "RoleBinding/keyward-leader-election",
            "Service/keyward-metrics",
            "ServiceAccount/keyward",
            "ValidatingAdmissionPolicy/keyward-apikey-policy",
            "ValidatingAdmissionPolicyBinding/keyward-apikey-policy",
        ]
    );
    let cluster_scoped = ["ClusterRole", "ClusterRoleBinding"]
        .into_iter()
        .chain([
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ])
        .collect::<BTreeSet<_>>();
    for object in &chart.0 {
        let kind = object["kind"].as_str().unwrap();
        let namespace = object["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(kind) {
            assert_eq!(namespace, None, "{kind} is cluster-scoped");
        } else {
            assert_eq!(namespace, Some(NAMESPACE), "{kind}/{}", name(object));
        }
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/instance"],
            "keyward",
            "{kind}/{}",
            name(object)
        );
    }

    // The same RBAC as config/, compared as objects.
    let cluster_role = config("clusterrole.yaml");
    assert_eq!(
        chart.cluster_rules(),
        &config_object(&cluster_role, "ClusterRole", "keyward")["rules"]
    );
    let aggregated = config("aggregated-roles.yaml");
    for role in ["keyward-view", "keyward-edit", "keyward-policy-admin"] {
        let shipped = config_object(&aggregated, "ClusterRole", role);
        let rendered = chart.get("ClusterRole", role);
        assert_eq!(rendered["rules"], shipped["rules"], "{role}");
        let aggregation = |object: &Value| -> BTreeSet<String> {
            object["metadata"]["labels"]
                .as_mapping()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    k.as_str()
                        .unwrap()
                        .starts_with("rbac.authorization.k8s.io/")
                })
                .map(|(k, v)| format!("{}={}", k.as_str().unwrap(), v.as_str().unwrap()))
                .collect()
        };
        assert_eq!(aggregation(rendered), aggregation(shipped), "{role}");
    }
    let election = config("leader-election.yaml");
    for kind in ["Role", "RoleBinding"] {
        let shipped = config_object(&election, kind, "keyward-leader-election");
        let rendered = chart.get(kind, "keyward-leader-election");
        for field in ["rules", "roleRef", "subjects"] {
            assert_eq!(rendered[field], shipped[field], "{kind} {field}");
        }
    }
    let binding = config("clusterrolebinding.yaml");
    let shipped = config_object(&binding, "ClusterRoleBinding", "keyward");
    let rendered = chart.get("ClusterRoleBinding", "keyward");
    assert_eq!(rendered["roleRef"], shipped["roleRef"]);
    assert_eq!(rendered["subjects"], shipped["subjects"]);
    assert_eq!(
        chart.get("Deployment", "keyward")["spec"]["template"]["spec"]["serviceAccountName"],
        "keyward"
    );

    // The operator's flags are config/'s.
    let deployment = config("deployment.yaml");
    let shipped = &config_object(&deployment, "Deployment", "keyward")["spec"]["template"]["spec"]
        ["containers"][0]["args"];
    assert_eq!(chart.args(), strings(shipped));
    assert!(chart.args().contains(&"--leader-election".to_owned()));
    assert!(chart.args().contains(&"--skip-crd-install".to_owned()));
    assert!(!chart.args().contains(&"--require-policy".to_owned()));

    // No database Secret: embedded SQLite on a claim, one replica, recreated.
    let spec = &chart.get("Deployment", "keyward")["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["strategy"]["type"], "Recreate");
    let url = database_env(&chart);
    assert_eq!(url["value"], "sqlite:///data/keyward.db");
    assert!(url.get("valueFrom").is_none());
    let volumes = &spec["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["persistentVolumeClaim"]["claimName"],
        "keyward-data"
    );
    assert_eq!(chart.container()["volumeMounts"][0]["mountPath"], "/data");
    let claim = chart.get("PersistentVolumeClaim", "keyward-data");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert!(claim["spec"].get("storageClassName").is_none());
}

fn database_env(chart: &Rendering) -> &Value {
    chart.container()["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KEYWARD_DATABASE_URL")
        .expect("KEYWARD_DATABASE_URL")
}

#[test]
fn with_a_database_secret_there_are_replicas_and_no_claim() {
    let test = "with_a_database_secret_there_are_replicas_and_no_claim";
    let Some(chart) = render(
        test,
        &[
            "--set",
            "database.existingSecret=keyward-database,database.existingSecretKey=dsn",
            "--set",
            "podDisruptionBudget.enabled=true,replicaCount=3",
        ],
    ) else {
        return;
    };
    let spec = &chart.get("Deployment", "keyward")["spec"];
    assert_eq!(spec["replicas"], 3);
    assert!(spec.get("strategy").is_none());
    assert!(spec["template"]["spec"].get("volumes").is_none());
    assert!(chart.container().get("volumeMounts").is_none());
    assert!(chart.of_kind("PersistentVolumeClaim").is_empty());
    assert_eq!(
        database_env(&chart)["valueFrom"]["secretKeyRef"],
        serde_yaml::from_str::<Value>("{name: keyward-database, key: dsn}").unwrap()
    );
    assert_eq!(
        chart.get("PodDisruptionBudget", "keyward")["spec"]["minAvailable"],
        1
    );

    // With embedded SQLite the disruption budget is never rendered.
    let Some(sqlite) = render(test, &["--set", "podDisruptionBudget.enabled=true"]) else {
        return;
    };
    assert!(sqlite.of_kind("PodDisruptionBudget").is_empty());
    assert_eq!(sqlite.of_kind("PersistentVolumeClaim").len(), 1);
}

#[test]
fn require_policy_adds_the_flag() {
    let Some(chart) = render(
        "require_policy_adds_the_flag",
        &["--set", "requirePolicy=true"],
    ) else {
        return;
    };
    let args = chart.args();
    assert_eq!(
        args.iter().filter(|a| *a == "--require-policy").count(),
        1,
        "{args:?}"
    );
}

#[test]
fn admission_disabled_renders_no_admission_objects() {
    let test = "admission_disabled_renders_no_admission_objects";
    let (Some(off), Some(on)) = (
        render(test, &["--set", "admission.enabled=false"]),
        render(test, &[]),
    ) else {
        return;
    };
    let admission = |chart: &Rendering| {
        chart
            .0
            .iter()
            .filter(|o| {
                o["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("admissionregistration.k8s.io/")
            })
            .count()
    };
    assert_eq!(admission(&off), 0, "{:?}", off.kinds());
    assert_eq!(admission(&on), 2);
    assert_eq!(off.0.len(), on.0.len() - 2, "only the admission objects go");
}

#[test]
fn aggregated_roles_disabled_leaves_the_operators_role_only() {
    let Some(chart) = render(
        "aggregated_roles_disabled_leaves_the_operators_role_only",
        &["--set", "aggregatedRoles.enabled=false"],
    ) else {
        return;
    };
    let roles: Vec<&str> = chart.of_kind("ClusterRole").into_iter().map(name).collect();
    assert_eq!(roles, ["keyward"]);
}

#[test]
fn rollout_disabled_drops_the_workload_rule() {
    let test = "rollout_disabled_drops_the_workload_rule";
    let (Some(off), Some(on)) = (
        render(test, &["--set", "rollout.enabled=false"]),
        render(test, &[]),
    ) else {
        return;
    };
    assert!(has_rule(on.cluster_rules(), APPS_RULE));
    assert!(!has_rule(off.cluster_rules(), APPS_RULE));
    let mut expected = on.cluster_rules().as_sequence().unwrap().clone();
    expected.retain(|r| r["apiGroups"][0] != "apps");
    assert_eq!(off.cluster_rules().as_sequence().unwrap(), &expected);
}

#[test]
fn self_install_crd_grants_crds_and_drops_the_skip_flag() {
    let test = "self_install_crd_grants_crds_and_drops_the_skip_flag";
    let (Some(on), Some(off)) = (
        render(test, &["--set", "selfInstallCRD=true"]),
        render(test, &[]),
    ) else {
        return;
    };
    assert!(has_rule(on.cluster_rules(), CRD_RULE));
    assert!(!on.args().contains(&"--skip-crd-install".to_owned()));
    assert!(!has_rule(off.cluster_rules(), CRD_RULE));
    assert!(off.args().contains(&"--skip-crd-install".to_owned()));
}

#[test]
fn leader_election_disabled_drops_the_flag_and_the_lease_role() {
    let Some(chart) = render(
        "leader_election_disabled_drops_the_flag_and_the_lease_role",
        &["--set", "leaderElection.enabled=false"],
    ) else {
        return;
    };
    assert!(!chart.args().contains(&"--leader-election".to_owned()));
    assert!(chart.of_kind("Role").is_empty(), "{:?}", chart.kinds());
    assert!(chart.of_kind("RoleBinding").is_empty());
}

/// A cluster's capabilities, as `helm install` reads them by discovery: kinds
/// under their group versions (always `v1/Namespace`), plus `extra`.
fn cluster_capabilities<'a>(kube_version: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--kube-version",
        kube_version,
        "--api-versions",
        "v1/Namespace",
    ];
    for version in extra {
        args.extend(["--api-versions", version]);
    }
    args
}

#[test]
fn admission_objects_only_for_an_api_the_cluster_serves() {
    let test = "admission_objects_only_for_an_api_the_cluster_serves";
    // 1.28 and 1.29 without the feature gate serve admissionregistration v1
    // (webhooks) but no ValidatingAdmissionPolicy kind at all.
    for kube_version in ["1.28", "1.29", "1.30"] {
        let args = cluster_capabilities(
            kube_version,
            &[
                "admissionregistration.k8s.io/v1",
                "admissionregistration.k8s.io/v1/ValidatingWebhookConfiguration",
            ],
        );
        let Some(output) = helm_render(test, &[args.as_slice(), &["--notes"]].concat()) else {
            return;
        };
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            !stdout.contains("kind: ValidatingAdmissionPolicy"),
            "{kube_version}: no admission objects where none can be stored:\n{stdout}"
        );
        let notes = stdout
            .split("# Source: keyward/templates/NOTES.txt")
            .nth(1)
            .unwrap();
        assert!(
            notes.contains("serves no ValidatingAdmissionPolicy API")
                && notes.contains("the operator refuses to issue"),
            "{notes}"
        );
    }
    // Whatever the version, the kind the cluster serves decides.
    let cases: [(&str, &str, &str); 3] = [
        (
            "1.28",
            "admissionregistration.k8s.io/v1beta1/ValidatingAdmissionPolicy",
            "v1beta1",
        ),
        (
            "1.31",
            "admissionregistration.k8s.io/v1beta1/ValidatingAdmissionPolicy",
            "v1beta1",
        ),
        (
            "1.29",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
            "v1",
        ),
    ];
    for (kube_version, served, version) in cases {
        let args = cluster_capabilities(kube_version, &[served]);
        let Some(chart) = render(test, &args) else {
            return;
        };
        let expected = format!("admissionregistration.k8s.io/{version}");
        assert_eq!(
            chart.admission_versions(),
            [expected.as_str(); 2],
            "{served}"
        );
    }
    // Disabled, or served: no note.
    let args = cluster_capabilities("1.28", &[]);
    for extra in [
        ["--set", "admission.enabled=false"],
        [
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
        ],
    ] {
        let Some(output) = helm_render(test, &[args.as_slice(), &extra, &["--notes"]].concat())
        else {
            return;
        };
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            !stdout.contains("serves no ValidatingAdmissionPolicy API"),
            "{extra:?}"
        );
    }
}

#[test]
fn admission_api_version_follows_the_kubernetes_version() {
    let test = "admission_api_version_follows_the_kubernetes_version";
    let cases: [(&[&str], &str); 6] = [
        (&["--kube-version", "1.28"], "v1beta1"),
        (&["--kube-version", "1.29"], "v1beta1"),
        (&["--kube-version", "1.30"], "v1"),
        // A 1.28 cluster that serves v1 (the chart asks for the kind, as a real install does).
        (
            &[
                "--kube-version",
                "1.28",
                "--api-versions",
                "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
            ],
            "v1",
        ),
        // An explicit version wins either way.
        (
            &[
                "--kube-version",
                "1.30",
                "--set",
                "admission.apiVersion=v1beta1",
            ],
            "v1beta1",
        ),
        (
            &["--kube-version", "1.28", "--set", "admission.apiVersion=v1"],
            "v1",
        ),
    ];
    for (args, version) in cases {
        let Some(chart) = render(test, args) else {
            return;
        };
        let expected = format!("admissionregistration.k8s.io/{version}");
        assert_eq!(
            chart.admission_versions(),
            [expected.as_str(); 2],
            "{args:?}"
        );
        // The rendered objects are those `keyward admission` committed to config/.
        let file = match version {
            "v1" => "admission-policy.yaml",
            _ => "admission-policy-v1beta1.yaml",
        };
        let shipped = config(file);
        for kind in [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            let shipped = config_object(&shipped, kind, "keyward-apikey-policy");
            let rendered = chart.get(kind, "keyward-apikey-policy");
            assert_eq!(rendered["apiVersion"], shipped["apiVersion"], "{file}");
            assert_eq!(rendered["spec"], shipped["spec"], "{kind} {args:?}");
        }
    }
}

/// The verifier objects config/verifier.yaml ships.
fn config_verifier(kind: &str) -> Value {
    config_object(&config("verifier.yaml"), kind, "keyward-verifier").clone()
}

/// What tests/manifests.rs and these tests compare: the container's args, ports,
/// probes and security, the pod's security and account.
fn assert_same_container(rendered: &Value, shipped: &Value, what: &str) {
    for field in [
        "args",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "securityContext",
    ] {
        assert_eq!(rendered[field], shipped[field], "{what}: {field}");
    }
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

/// Whether a selector (matchLabels, or a Service's selector) matches a pod template's labels.
fn selects(selector: &Value, deployment: &Value) -> bool {
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    selector
        .as_mapping()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
}

#[test]
fn verifier_with_postgresql_is_the_deployment_config_ships() {
    let test = "verifier_with_postgresql_is_the_deployment_config_ships";
    let Some(chart) = render(
        test,
        &[
            "--set",
            "database.existingSecret=keyward-database,verifier.enabled=true",
            "--set",
            "verifier.database.existingSecret=keyward-verifier-database",
            "--set",
            "verifier.primaryDatabase.existingSecret=keyward-verifier-primary-database",
        ],
    ) else {
        return;
    };
    let verifier_objects: Vec<String> = chart
        .kinds()
        .into_iter()
        .filter(|k| k.ends_with("/keyward-verifier"))
        .collect();
    assert_eq!(
        verifier_objects,
        [
            "Deployment/keyward-verifier",
            "NetworkPolicy/keyward-verifier",
            "PodDisruptionBudget/keyward-verifier",
            "Service/keyward-verifier",
            "ServiceAccount/keyward-verifier",
        ]
    );
    let deployment = chart.get("Deployment", "keyward-verifier");
    let shipped = config_verifier("Deployment");
    let containers = pod_spec(deployment)["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let shipped_container = &pod_spec(&shipped)["containers"][0];
    assert_same_container(container, shipped_container, "verifier");
    assert_eq!(container["resources"], shipped_container["resources"]);
    // config/ marks the primary's Secret optional, so that it works without one; a
    // Secret named in the chart's values is required.
    let mut shipped_env = shipped_container["env"].clone();
    for entry in shipped_env.as_sequence_mut().unwrap() {
        if entry["name"] == "KEYWARD_PRIMARY_DATABASE_URL" {
            let key = &mut entry["valueFrom"]["secretKeyRef"];
            assert_eq!(key["optional"], true);
            key.as_mapping_mut().unwrap().remove("optional");
        }
    }
    assert_eq!(container["env"], shipped_env);
    for field in [
        "securityContext",
        "serviceAccountName",
        "automountServiceAccountToken",
    ] {
        assert_eq!(
            pod_spec(deployment)[field],
            pod_spec(&shipped)[field],
            "pod {field}"
        );
    }
    assert_eq!(pod_spec(deployment)["automountServiceAccountToken"], false);
    assert_eq!(deployment["spec"]["replicas"], shipped["spec"]["replicas"]);
    assert_eq!(deployment["spec"]["selector"], shipped["spec"]["selector"]);

    // The same security as the operator's pods.
    let operator = chart.get("Deployment", "keyward");
    assert_eq!(
        pod_spec(deployment)["securityContext"],
        pod_spec(operator)["securityContext"]
    );
    assert_eq!(
        container["securityContext"],
        chart.container()["securityContext"]
    );
    assert!(
        !chart
            .args()
            .iter()
            .any(|a| a.starts_with("--verifier-address")),
        "with PostgreSQL the operator does not serve the verifier"
    );
    // No operator selector matches the verifier's pods.
    assert!(!selects(
        &operator["spec"]["selector"]["matchLabels"],
        deployment
    ));
    assert!(!selects(
        &chart.get("Service", "keyward-metrics")["spec"]["selector"],
        deployment
    ));

    // Its own account: no token, no binding.
    let account = chart.get("ServiceAccount", "keyward-verifier");
    assert_eq!(account["automountServiceAccountToken"], false);
    for binding in chart
        .of_kind("ClusterRoleBinding")
        .into_iter()
        .chain(chart.of_kind("RoleBinding"))
    {
        for subject in binding["subjects"].as_sequence().unwrap() {
            assert_ne!(subject["name"], "keyward-verifier");
        }
    }

    // Service, disruption budget and network policy as config/ ships them.
    let service = chart.get("Service", "keyward-verifier");
    let shipped_service = config_verifier("Service");
    assert_eq!(service["spec"], shipped_service["spec"]);
    assert!(selects(&service["spec"]["selector"], deployment));
    let budget = chart.get("PodDisruptionBudget", "keyward-verifier");
    assert_eq!(
        budget["spec"],
        config_verifier("PodDisruptionBudget")["spec"]
    );
    let policy = chart.get("NetworkPolicy", "keyward-verifier");
    assert_eq!(policy["spec"], config_verifier("NetworkPolicy")["spec"]);

    // Without a Secret of its own, the verifier reads the operator's.
    let Some(shared) = render(
        test,
        &[
            "--set",
            "database.existingSecret=keyward-database,database.existingSecretKey=dsn,verifier.enabled=true",
        ],
    ) else {
        return;
    };
    let env = &pod_spec(shared.get("Deployment", "keyward-verifier"))["containers"][0]["env"];
    let url = env
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KEYWARD_DATABASE_URL")
        .unwrap();
    assert_eq!(
        url["valueFrom"]["secretKeyRef"],
        serde_yaml::from_str::<Value>("{name: keyward-database, key: dsn}").unwrap()
    );
}

/// The value of the environment variable `name` in a container, if set.
fn env_var<'a>(container: &'a Value, name_: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name_)
}

fn verifier_container(chart: &Rendering) -> &Value {
    &pod_spec(chart.get("Deployment", "keyward-verifier"))["containers"][0]
}

#[test]
fn a_shared_database_needs_a_cluster_name() {
    let test = "a_shared_database_needs_a_cluster_name";
    for (values, message) in [
        (
            "database.existingSecret=db,database.shared=true",
            "database.shared is true: set clusterName",
        ),
        (
            "database.shared=true,clusterName=eu-west",
            "only a PostgreSQL key database can be shared",
        ),
        (
            "database.existingSecret=db,clusterName=EU_West",
            "clusterName must be a DNS label",
        ),
    ] {
        let Some(output) = helm_render(test, &["--set", values]) else {
            return;
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{values}");
        assert!(stderr.contains(message), "{values}: {stderr}");
    }
}

#[test]
fn cluster_name_and_anti_entropy_interval_reach_the_operator() {
    let test = "cluster_name_and_anti_entropy_interval_reach_the_operator";
    let (Some(defaults), Some(shared)) = (
        render(test, &["--set", "database.existingSecret=db"]),
        render(
            test,
            &[
                "--set",
                "database.existingSecret=db,database.shared=true,clusterName=eu-west",
                "--set",
                "antiEntropyInterval=300",
                "--set",
                "usageRetention=720h",
            ],
        ),
    ) else {
        return;
    };
    // Unset: the operator's own default name, `default`.
    assert!(env_var(defaults.container(), "KEYWARD_CLUSTER_NAME").is_none());
    assert_eq!(
        env_var(defaults.container(), "KEYWARD_ANTI_ENTROPY_INTERVAL").unwrap()["value"],
        "60"
    );
    assert_eq!(
        env_var(shared.container(), "KEYWARD_CLUSTER_NAME").unwrap()["value"],
        "eu-west"
    );
    assert_eq!(
        env_var(shared.container(), "KEYWARD_ANTI_ENTROPY_INTERVAL").unwrap()["value"],
        "300"
    );
    assert_eq!(
        env_var(defaults.container(), "KEYWARD_USAGE_RETENTION").unwrap()["value"],
        "2160h"
    );
    assert_eq!(
        env_var(shared.container(), "KEYWARD_USAGE_RETENTION").unwrap()["value"],
        "720h"
    );
    // The same args as without them: the values travel as environment variables.
    assert_eq!(defaults.args(), shared.args());
}

#[test]
fn verifier_reads_the_primary_url_from_its_secret_and_accepts_listed_clusters() {
    let test = "verifier_reads_the_primary_url_from_its_secret_and_accepts_listed_clusters";
    let (Some(defaults), Some(replica)) = (
        render(
            test,
            &["--set", "database.existingSecret=db,verifier.enabled=true"],
        ),
        render(
            test,
            &[
                "--set",
                "database.existingSecret=db,verifier.enabled=true",
                "--set",
                "verifier.database.existingSecret=keyward-ro,verifier.primaryDatabase.existingSecret=keyward-rw",
                "--set",
                "verifier.primaryDatabase.existingSecretKey=uri",
                "--set-json",
                r#"verifier.acceptClusters=["eu-west","us-east"]"#,
            ],
        ),
    ) else {
        return;
    };
    let container = verifier_container(&defaults);
    assert!(env_var(container, "KEYWARD_PRIMARY_DATABASE_URL").is_none());
    assert!(env_var(container, "KEYWARD_ACCEPT_CLUSTERS").is_none());

    let container = verifier_container(&replica);
    assert_eq!(
        env_var(container, "KEYWARD_DATABASE_URL").unwrap()["valueFrom"]["secretKeyRef"],
        serde_yaml::from_str::<Value>("{name: keyward-ro, key: url}").unwrap()
    );
    assert_eq!(
        env_var(container, "KEYWARD_PRIMARY_DATABASE_URL").unwrap()["valueFrom"]["secretKeyRef"],
        serde_yaml::from_str::<Value>("{name: keyward-rw, key: uri}").unwrap()
    );
    assert_eq!(
        env_var(container, "KEYWARD_ACCEPT_CLUSTERS").unwrap()["value"],
        "eu-west,us-east"
    );
    // The operator keeps its own URL, and gets neither.
    for name_ in ["KEYWARD_PRIMARY_DATABASE_URL", "KEYWARD_ACCEPT_CLUSTERS"] {
        assert!(env_var(replica.container(), name_).is_none(), "{name_}");
    }
}

#[test]
fn verifier_with_embedded_sqlite_is_served_by_the_operator() {
    let test = "verifier_with_embedded_sqlite_is_served_by_the_operator";
    let Some(chart) = render(
        test,
        &["--set", "verifier.enabled=true,networkPolicy.enabled=true"],
    ) else {
        return;
    };
    // No Deployment, account or budget of its own: the database is one pod's file.
    for kind in ["Deployment", "ServiceAccount", "PodDisruptionBudget"] {
        assert!(
            chart.find(kind, "keyward-verifier").is_none(),
            "{kind}: {:?}",
            chart.kinds()
        );
    }
    // The operator serves it, with the tuning config/'s verifier has.
    let shipped = config_verifier("Deployment");
    let shipped_container = &pod_spec(&shipped)["containers"][0];
    let shipped_args = strings(&shipped_container["args"]);
    let address = shipped_args
        .iter()
        .find_map(|a| a.strip_prefix("--address="))
        .unwrap();
    let args = chart.args();
    assert!(
        args.contains(&format!("--verifier-address={address}")),
        "{args:?}"
    );
    for flag in shipped_args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with("--address=") && !a.starts_with("--log-format="))
    {
        assert!(args.contains(flag), "{flag} missing from {args:?}");
    }
    let ports = chart.container()["ports"].as_sequence().unwrap();
    assert!(
        ports.contains(&shipped_container["ports"][0]),
        "the operator's container has the verifier port: {ports:?}"
    );
    // The same Service and network policy, selecting the operator's pod; it adds
    // to the operator's own policy, which admits only the metrics port.
    let operator = chart.get("Deployment", "keyward");
    let service = chart.get("Service", "keyward-verifier");
    assert_eq!(
        service["spec"]["ports"],
        config_verifier("Service")["spec"]["ports"]
    );
    assert!(selects(&service["spec"]["selector"], operator));
    let policy = chart.get("NetworkPolicy", "keyward-verifier");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        operator
    ));
    assert_eq!(
        policy["spec"]["ingress"],
        config_verifier("NetworkPolicy")["spec"]["ingress"]
    );
    assert!(chart.find("NetworkPolicy", "keyward").is_some());
}

#[test]
fn verifier_network_policy_follows_its_values() {
    let test = "verifier_network_policy_follows_its_values";
    let (Some(off), Some(istio)) = (
        render(
            test,
            &[
                "--set",
                "database.existingSecret=db,verifier.enabled=true,verifier.networkPolicy.enabled=false",
            ],
        ),
        render(
            test,
            &[
                "--set",
                "database.existingSecret=db,verifier.enabled=true",
                "--set-json",
                r#"verifier.networkPolicy.gatewayNamespaceSelector={"matchExpressions":[],"matchLabels":{"istio-injection":"enabled"}}"#,
                "--set-json",
                "verifier.networkPolicy.metricsNamespaceSelector=null",
            ],
        ),
    ) else {
        return;
    };
    assert!(off.of_kind("NetworkPolicy").is_empty(), "{:?}", off.kinds());
    let from = &istio.get("NetworkPolicy", "keyward-verifier")["spec"]["ingress"][0]["from"];
    assert_eq!(
        from,
        &serde_yaml::from_str::<Value>(
            "[{namespaceSelector: {matchExpressions: [], matchLabels: {istio-injection: enabled}}}]"
        )
        .unwrap(),
        "the documented override, and no scraper namespace when its selector is null"
    );
}

#[test]
fn the_values_schema_names_the_field_of_every_mistake() {
    let test = "the_values_schema_names_the_field_of_every_mistake";
    // One mistake in each top-level block: a wrong type, a typo, a value out of range.
    let mistakes = [
        ("replicaCount=two", "/replicaCount"),
        ("image.pullpolicy=Always", "/image"),
        ("imagePullSecrets=regcred", "/imagePullSecrets"),
        ("database.sqlite.sise=2Gi", "/database/sqlite"),
        ("clusterName=7", "/clusterName"),
        ("antiEntropyInterval=0", "/antiEntropyInterval"),
        ("usageRetention=90d", "/usageRetention"),
        ("keyPrefix=KW", "/keyPrefix"),
        ("logFormat=xml", "/logFormat"),
        ("maxConcurrentReconciles=0", "/maxConcurrentReconciles"),
        ("maxIssuesPerSecond=-1", "/maxIssuesPerSecond"),
        ("requirePolicy=maybe", "/requirePolicy"),
        ("leaderElection.enable=true", "/leaderElection"),
        ("admission.enabled=yes", "/admission/enabled"),
        ("rollout.enabled=1", "/rollout/enabled"),
        ("aggregatedRoles=true", "/aggregatedRoles"),
        ("serviceAccount.create=no", "/serviceAccount/create"),
        ("metrics.port=70000", "/metrics/port"),
        (
            "metrics.serviceMonitor.interval=soon",
            "/metrics/serviceMonitor/interval",
        ),
        (
            "podDisruptionBudget.enabled=on",
            "/podDisruptionBudget/enabled",
        ),
        ("networkPolicy.enabled=sure", "/networkPolicy/enabled"),
        ("verifier.replica=3", "/verifier"),
        ("verifier.maxStaleness=0", "/verifier/maxStaleness"),
        ("replicas=2", "additional properties 'replicas'"),
    ];
    for (value, field) in mistakes {
        let Some(output) = helm_render(test, &["--set", value]) else {
            return;
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--set {value} was accepted");
        assert!(
            stderr.contains("lint failed") && stderr.contains(field),
            "--set {value}: {stderr}"
        );
    }
    // Every default, and the documented variants, pass the schema.
    for args in [
        &[][..],
        &[
            "--set",
            "database.existingSecret=db",
            "--set",
            "replicaCount=3",
        ],
        &[
            "--set",
            "verifier.enabled=true",
            "--set",
            "database.existingSecret=db",
        ],
        &["--set", "podDisruptionBudget.minAvailable=50%"],
    ] {
        assert!(render(test, args).is_some());
    }
}

/// The series names keyward's binaries export: the operator and the verifier
/// share one registry (`keyward run --verifier-address` serves both).
fn exported_series() -> BTreeSet<String> {
    keyward::telemetry::Metrics::default()
        .series()
        .iter()
        .cloned()
        .collect()
}

/// The series a PromQL expression reads: every identifier that is not a
/// function, keyword or label name (quoted values and ranges removed first).
fn queried_series(expr: &str) -> Vec<String> {
    const PROMQL: [&str; 17] = [
        "sum",
        "max",
        "by",
        "rate",
        "increase",
        "histogram_quantile",
        "time",
        "absent",
        "unless",
        "le",
        "state",
        "reason",
        "category",
        "protocol",
        "result",
        "policy",
        "operation",
    ];
    const LABELS: [&str; 4] = ["pod", "namespace", "outcome", "name"];
    let without_values = regex::Regex::new(r#""[^"]*"|\[[^\]]*\]"#)
        .unwrap()
        .replace_all(expr, "");
    regex::Regex::new(r"[A-Za-z_][A-Za-z0-9_]*")
        .unwrap()
        .find_iter(&without_values)
        .map(|m| m.as_str().to_owned())
        .filter(|t| !PROMQL.contains(&t.as_str()) && !LABELS.contains(&t.as_str()))
        .collect()
}

#[test]
fn every_alert_and_panel_queries_a_metric_keyward_exports() {
    let test = "every_alert_and_panel_queries_a_metric_keyward_exports";
    // Both are opt-in: nothing by default.
    let Some(defaults) = render(test, &[]) else {
        return;
    };
    assert!(defaults.of_kind("PrometheusRule").is_empty());
    assert!(defaults.find("ConfigMap", "keyward-dashboard").is_none());
    let chart = render(
        test,
        &[
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
        ],
    )
    .unwrap();
    let exported = exported_series();
    assert!(exported.contains("keyward_verify_total"), "{exported:?}");

    let rule = chart.get("PrometheusRule", "keyward");
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        for alert in group["rules"].as_sequence().unwrap() {
            let name = alert["alert"].as_str().unwrap();
            let expr = alert["expr"].as_str().unwrap();
            let series = queried_series(expr);
            assert!(!series.is_empty(), "{name}: {expr}");
            for s in series {
                assert!(
                    exported.contains(&s),
                    "{name} queries {s}, which keyward does not export"
                );
            }
            assert!(alert["annotations"]["summary"].as_str().is_some(), "{name}");
            alerts.insert(name.to_owned());
        }
    }
    // The alerts docs/operations.md and docs/verifier.md recommend are all in it.
    let docs = fs::read_to_string(format!("{ROOT}/docs/operations.md")).unwrap()
        + &fs::read_to_string(format!("{ROOT}/docs/verifier.md")).unwrap();
    for line in docs.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            let name = name.split_whitespace().next().unwrap();
            assert!(
                alerts.contains(name),
                "docs recommend {name}, the PrometheusRule lacks it"
            );
        }
    }

    let config_map = chart.get("ConfigMap", "keyward-dashboard");
    assert_eq!(
        config_map["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json = config_map["data"]["keyward.json"].as_str().unwrap();
    let example = fs::read_to_string(format!("{ROOT}/examples/grafana-dashboard.json")).unwrap();
    assert_eq!(
        json.trim_end(),
        example.trim_end(),
        "examples/grafana-dashboard.json drifted from the chart's"
    );
    let dashboard: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        titles.push(panel["title"].as_str().unwrap().to_owned());
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let series = queried_series(&expr.replace("$__rate_interval", "5m"));
            assert!(!series.is_empty(), "{expr}");
            for s in series {
                assert!(
                    exported.contains(&s),
                    "panel {:?} queries {s}, which keyward does not export",
                    panel["title"]
                );
            }
        }
    }
    for wanted in [
        "Keys by state",
        "Keys issued",
        "Keys revoked",
        "Reconcile latency",
        "Reconcile errors",
        "Verifier checks",
        "Check latency",
        "Verifier snapshot age",
        "Policy violations",
    ] {
        assert!(
            titles.iter().any(|t| t == wanted),
            "no {wanted} panel in {titles:?}"
        );
    }
}

#[test]
fn artifact_hub_metadata_matches_the_crds_and_the_icon_ships() {
    let chart: Value = serde_yaml::from_str(
        &fs::read_to_string(format!("{ROOT}/charts/keyward/Chart.yaml")).unwrap(),
    )
    .unwrap();
    let icon = chart["icon"].as_str().unwrap();
    let shipped = icon.rsplit_once("/main/").unwrap().1;
    assert!(
        fs::read_to_string(format!("{ROOT}/{shipped}"))
            .unwrap()
            .starts_with("<svg"),
        "{icon} is not in the repository"
    );
    let annotations = &chart["annotations"];
    for key in [
        "artifacthub.io/category",
        "artifacthub.io/license",
        "artifacthub.io/links",
        "artifacthub.io/images",
        "artifacthub.io/operator",
    ] {
        assert!(annotations[key].as_str().is_some(), "{key}");
    }
    // Each CRD annotation names a CRD in crds/, with its served version.
    let listed: Vec<Value> =
        serde_yaml::from_str(annotations["artifacthub.io/crds"].as_str().unwrap()).unwrap();
    let mut shipped_crds = Vec::new();
    for file in ["apikey", "apikeypolicy"] {
        let crd: Value = documents(
            &fs::read_to_string(format!("{ROOT}/charts/keyward/crds/{file}.yaml")).unwrap(),
        )
        .remove(0);
        shipped_crds.push((
            crd["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
            crd["metadata"]["name"].as_str().unwrap().to_owned(),
            crd["spec"]["versions"][0]["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        ));
    }
    let annotated: Vec<(String, String, String)> = listed
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["name"].as_str().unwrap().to_owned(),
                c["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(annotated, shipped_crds);
    // The examples are objects of those kinds (tests/cluster/chart.rs applies them).
    let examples: Vec<Value> =
        serde_yaml::from_str(annotations["artifacthub.io/crdsExamples"].as_str().unwrap()).unwrap();
    let kinds: Vec<&str> = examples
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ApiKey", "ApiKeyPolicy"]);
    let image = annotations["artifacthub.io/images"].as_str().unwrap();
    assert!(
        image.contains(&format!(
            "ghcr.io/keyward/keyward:{}",
            chart["appVersion"].as_str().unwrap()
        )),
        "{image}"
    );
}
