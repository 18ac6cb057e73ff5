//! The committed admission manifests must be exactly what `keyward admission`
//! generates: config/admission-policy.yaml (v1), config/admission-policy-v1beta1.yaml,
//! and the chart's template, which is the v1 output with its apiVersion and
//! labels templated. `KEYWARD_BLESS=1 cargo nextest run --test admission`
//! rewrites all three from the generator.

use keyward::policy::admission::{AdmissionVersion, NAME, manifests};

const CHART_TEMPLATE: &str = "charts/keyward/templates/admission-policy.yaml";

/// What the chart template has before the generated text.
const CHART_HEADER: &str = r#"{{- /*
The ValidatingAdmissionPolicy that enforces ApiKeyPolicies at admission, and its
binding. Generated: this is `keyward admission` with the apiVersion and labels
templated; tests/admission.rs fails on drift, and
`KEYWARD_BLESS=1 cargo nextest run --test admission` rewrites it.
*/}}
{{- $version := include "keyward.admission.apiVersion" . }}
{{- if and .Values.admission.enabled $version }}
{{- if not (has $version (list "v1" "v1beta1")) }}
{{- fail "admission.apiVersion must be v1, v1beta1, or empty to pick by the cluster's API versions" }}
{{- end }}
"#;

/// The labels every chart resource carries, after each `name:`.
const CHART_LABELS: &str = "\n  labels:\n    {{- include \"keyward.labels\" . | nindent 4 }}";

fn path(file: &str) -> String {
    format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// Asserts that `file` holds `expected`, or writes it with `KEYWARD_BLESS=1`.
fn check(file: &str, expected: &str) {
    if std::env::var_os("KEYWARD_BLESS").is_some() {
        std::fs::write(path(file), expected).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(
        committed == expected,
        "{file} is stale: run `KEYWARD_BLESS=1 cargo nextest run --test admission`"
    );
}

/// The chart template as generated from the v1 manifests.
fn chart_template() -> String {
    let body = manifests(AdmissionVersion::V1)
        .replace(
            "apiVersion: admissionregistration.k8s.io/v1\n",
            "apiVersion: admissionregistration.k8s.io/{{ $version }}\n",
        )
        .replace(
            &format!("\n  name: {NAME}\n"),
            &format!("\n  name: {NAME}{CHART_LABELS}\n"),
        );
    format!("{CHART_HEADER}{body}{{{{- end }}}}\n")
}

#[test]
fn config_files_are_the_generated_manifests() {
    check(
        "config/admission-policy.yaml",
        &manifests(AdmissionVersion::V1),
    );
    check(
        "config/admission-policy-v1beta1.yaml",
        &manifests(AdmissionVersion::V1beta1),
    );
}

#[test]
fn chart_template_is_the_generated_manifest_templated() {
    let template = chart_template();
    // Both objects got the templated apiVersion and the labels.
    assert_eq!(template.matches("/{{ $version }}\n").count(), 2);
    assert_eq!(template.matches(CHART_LABELS).count(), 2);
    check(CHART_TEMPLATE, &template);
}

#[test]
fn keyward_admission_prints_the_committed_bytes() {
    for (args, file) in [
        (&["admission"][..], "config/admission-policy.yaml"),
        (
            &["admission", "--api-version", "v1"][..],
            "config/admission-policy.yaml",
        ),
        (
            &["admission", "--api-version", "v1beta1"][..],
            "config/admission-policy-v1beta1.yaml",
        ),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}");
        let version = if file.contains("v1beta1") {
            AdmissionVersion::V1beta1
        } else {
            AdmissionVersion::V1
        };
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            manifests(version)
        );
    }
}

#[test]
fn kustomize_base_installs_the_v1_policy_only() {
    let kustomization = std::fs::read_to_string(path("config/kustomization.yaml")).unwrap();
    let kustomization: serde_yaml::Value = serde_yaml::from_str(&kustomization).unwrap();
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert!(resources.contains(&"admission-policy.yaml"));
    assert!(!resources.contains(&"admission-policy-v1beta1.yaml"));
}

#[test]
fn chart_enables_admission_with_an_automatic_api_version() {
    let values = std::fs::read_to_string(path("charts/keyward/values.yaml")).unwrap();
    let values: serde_yaml::Value = serde_yaml::from_str(&values).unwrap();
    assert_eq!(
        values["admission"]["enabled"],
        serde_yaml::Value::Bool(true)
    );
    assert_eq!(values["admission"]["apiVersion"], "");
}

#[test]
fn manifests_are_a_policy_and_its_binding() {
    use serde::Deserialize;
    for version in [AdmissionVersion::V1, AdmissionVersion::V1beta1] {
        let documents: Vec<serde_json::Value> =
            serde_yaml::Deserializer::from_str(&manifests(version))
                .map(|d| serde_json::Value::deserialize(d).unwrap())
                .collect();
        assert_eq!(documents.len(), 2);
        let (policy, binding) = (&documents[0], &documents[1]);
        assert_eq!(policy["kind"], "ValidatingAdmissionPolicy");
        assert_eq!(binding["kind"], "ValidatingAdmissionPolicyBinding");
        for document in &documents {
            assert_eq!(document["apiVersion"], version.api_version());
            assert_eq!(document["metadata"]["name"], NAME);
        }
        let spec = &policy["spec"];
        assert_eq!(spec["paramKind"]["kind"], "ApiKeyPolicy");
        assert_eq!(spec["paramKind"]["apiVersion"], "keyward.dev/v1alpha1");
        assert_eq!(spec["failurePolicy"], "Fail");
        let binding = &binding["spec"];
        assert_eq!(binding["policyName"], NAME);
        assert_eq!(binding["paramRef"]["selector"], serde_json::json!({}));
        assert_eq!(binding["paramRef"]["parameterNotFoundAction"], "Allow");
        assert_eq!(binding["validationActions"], serde_json::json!(["Deny"]));
    }
}
