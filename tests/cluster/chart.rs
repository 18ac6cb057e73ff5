//! The Helm chart as Helm renders it (scripts/helm-render, see tests/helm.rs),
//! accepted by a real API server: the chart's CRDs applied, then the rendering
//! applied with `--dry-run=server` (every object through validation, defaulting
//! and admission) and for real into the release namespace.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::harness::{Cluster, wait_for};

#[path = "../support/helm_python.rs"]
mod helm_python;
use helm_python::helm_python;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NAMESPACE: &str = "keyward-system";
/// The harness's API server (kubebuilder assets) is 1.28; its binary reports
/// v0.0.0-master, so the version is not read from the server.
const KUBE_VERSION: &str = "1.28";

fn render(python: &PathBuf, args: &[&str]) -> String {
    let output = Command::new(python)
        .arg(format!("{ROOT}/scripts/helm-render"))
        .args([
            "--strict",
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm-render {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_rendered_chart_is_accepted_by_the_api_server() {
    let test = "the_rendered_chart_is_accepted_by_the_api_server";
    let Some(python) = helm_python() else {
        eprintln!(
            "SKIP: {test}: no python with helm-python-sdk (scripts/test installs it and sets KEYWARD_HELM_PYTHON)"
        );
        return;
    };
    if std::env::var("KEYWARD_E2E_KUBECONFIG").is_ok() {
        eprintln!(
            "SKIP: {test}: installs cluster-wide objects, needs the API server this harness starts"
        );
        return;
    }
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let defaults = render(&python, &[]);
    assert_eq!(
        defaults
            .matches("apiVersion: admissionregistration.k8s.io/v1beta1\n")
            .count(),
        2,
        "Kubernetes {KUBE_VERSION} gets the v1beta1 admission objects:\n{defaults}"
    );
    // Every optional object that needs no third-party CRD, with a database Secret.
    let everything = render(
        &python,
        &[
            "--set",
            "database.existingSecret=keyward-database,requirePolicy=true,selfInstallCRD=true",
            "--set",
            "podDisruptionBudget.enabled=true,networkPolicy.enabled=true",
            "--set",
            "verifier.enabled=true,metrics.grafanaDashboard.enabled=true",
        ],
    );
    for kind in ["PodDisruptionBudget", "NetworkPolicy"] {
        assert!(everything.contains(&format!("kind: {kind}\n")), "{kind}");
    }

    cluster.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &format!("{ROOT}/charts/keyward/crds/"),
    ]);
    wait_for("the CRDs to be served", Duration::from_secs(30), || {
        cluster
            .try_kubectl(&["get", "apikeys,apikeypolicies", "-A"])
            .ok()
    });
    // Artifact Hub's CRD examples are objects the API server accepts.
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{ROOT}/charts/keyward/Chart.yaml")).unwrap(),
    )
    .unwrap();
    let examples: Vec<serde_yaml::Value> = serde_yaml::from_str(
        chart["annotations"]["artifacthub.io/crdsExamples"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    for example in examples {
        let manifest = serde_yaml::to_string(&example).unwrap();
        cluster
            .try_kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], Some(&manifest))
            .unwrap_or_else(|e| panic!("the Artifact Hub example is refused: {e}\n{manifest}"));
    }
    cluster.kubectl(&["create", "namespace", NAMESPACE]);
    let apply = |manifest: &str, extra: &[&str]| {
        let mut args = vec!["apply", "-n", NAMESPACE, "-f", "-"];
        args.extend_from_slice(extra);
        cluster
            .try_kubectl_with_input(&args, Some(manifest))
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}\n{manifest}"))
    };
    let accepted = apply(&everything, &["--dry-run=server"]);
    for object in [
        "poddisruptionbudget.policy/keyward",
        "deployment.apps/keyward-verifier",
        "service/keyward-verifier",
        "poddisruptionbudget.policy/keyward-verifier",
        "networkpolicy.networking.k8s.io/keyward-verifier",
        "serviceaccount/keyward-verifier",
        "configmap/keyward-dashboard",
    ] {
        assert!(
            accepted.contains(&format!("{object} created (server dry run)")),
            "{object}:\n{accepted}"
        );
    }
    let accepted = apply(&defaults, &["--dry-run=server"]);
    for object in [
        "validatingadmissionpolicy.admissionregistration.k8s.io/keyward-apikey-policy",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/keyward-apikey-policy",
        "deployment.apps/keyward",
        "persistentvolumeclaim/keyward-data",
        "clusterrole.rbac.authorization.k8s.io/keyward",
        "role.rbac.authorization.k8s.io/keyward-leader-election",
    ] {
        assert!(
            accepted.contains(&format!("{object} created (server dry run)")),
            "{object}:\n{accepted}"
        );
    }

    // Installed for real, the objects are there in the release namespace.
    apply(&defaults, &[]);
    assert_eq!(
        cluster.field(
            "deployment/keyward",
            NAMESPACE,
            "{.spec.template.spec.serviceAccountName}"
        ),
        "keyward"
    );
    assert_eq!(
        cluster.field(
            "validatingadmissionpolicybinding/keyward-apikey-policy",
            "",
            "{.spec.policyName}"
        ),
        "keyward-apikey-policy"
    );
}

#[test]
fn helm_test_runs_keyward_selftest_with_its_own_narrow_role() {
    let test = "helm_test_runs_keyward_selftest_with_its_own_narrow_role";
    let Some(python) = helm_python() else {
        eprintln!(
            "SKIP: {test}: no python with helm-python-sdk (scripts/test installs it and sets KEYWARD_HELM_PYTHON)"
        );
        return;
    };
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    // The operator with its endpoints and verifier, as the chart runs it with embedded SQLite.
    let (verifier, endpoints) = (
        crate::verifier::free_address(),
        crate::verifier::free_address(),
    );
    let database = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let (verifier_flag, endpoints_flag) = (verifier.to_string(), endpoints.to_string());
    let operator = cluster.operator(
        &database,
        &[
            "--verifier-address",
            &verifier_flag,
            "--http-address",
            &endpoints_flag,
        ],
        "info",
    );
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys"]).ok()
    });
    cluster.kubectl(&["create", "namespace", NAMESPACE]);

    // The hook's ServiceAccount, Role and RoleBinding as the chart renders them.
    let rendered = render(
        &python,
        &["--include-tests", "--set", "verifier.enabled=true"],
    );
    let hooks: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &serde_yaml::Value| {
            d["metadata"]["annotations"]["helm.sh/hook"].as_str() == Some("test")
        })
        .collect();
    let kinds: Vec<&str> = hooks.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Pod",
            "NetworkPolicy"
        ]
    );
    let pod = &hooks[3];
    let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "selftest",
            "--operator-url=http://keyward-metrics:8080",
            "--verifier-url=http://keyward-verifier:9000",
            "--namespace=keyward-system",
        ]
    );
    // The Pod cannot run here (no kubelet); the NetworkPolicy is checked by the API server.
    for object in hooks.iter().filter(|d| d["kind"] != "Pod") {
        let manifest = serde_yaml::to_string(object).unwrap();
        cluster.apply(&manifest);
    }

    // The Pod's command, with the Pod's identity, against this API server; the
    // Services' addresses replaced by the processes'.
    let kubeconfig = cluster.impersonating("system:serviceaccount:keyward-system:keyward-selftest");
    let selftest = |extra: &[&str]| {
        Command::new(crate::harness::OPERATOR)
            .args([
                "selftest",
                &format!("--operator-url=http://{endpoints}"),
                &format!("--verifier-url=http://{verifier}"),
                "--namespace=keyward-system",
            ])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap()
    };
    let passed = selftest(&[]);
    let stdout = String::from_utf8_lossy(&passed.stdout);
    assert!(
        passed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    for step in [
        "ok: the operator is ready",
        "ok: the verifier is ready",
        "ok: the operator issued its key",
        "ok: the verifier accepts the key",
        "ok: deleted, the key is refused",
        "keyward selftest passed",
    ] {
        assert!(stdout.contains(step), "{step}:\n{stdout}");
    }
    assert!(!stdout.contains("kw_"), "a key in the output:\n{stdout}");
    assert!(
        cluster
            .try_kubectl(&["get", "apikey", "keyward-selftest", "-n", NAMESPACE])
            .is_err(),
        "the throwaway ApiKey is left behind"
    );

    // The Role allows nothing else: not another ApiKey, not another Secret.
    let as_selftest = |args: &[&str]| {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap()
    };
    for args in [
        &["get", "apikeys", "-n", NAMESPACE][..],
        &["get", "secret", "keyward-database", "-n", NAMESPACE],
        &["delete", "apikey", "someone-elses", "-n", NAMESPACE],
    ] {
        let refused = as_selftest(args);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("forbidden"),
            "{args:?}"
        );
    }

    // Without an operator, it fails and says what it waited for.
    operator.kill();
    let failed = selftest(&["--timeout-seconds=3"]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("the operator's /readyz"), "{stderr}");
}
