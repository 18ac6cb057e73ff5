//! The Helm chart and the kustomize base in config/ must agree with each other
//! and with the code: the same CRD bytes, RBAC rules and flags, and every value
//! documented. Helm is not available here, so templates are read as text: their
//! guards wrap whole rules or single list items (see the templates' comments).

use std::{collections::BTreeSet, fs};

use serde_yaml::Value;

fn read(path: &str) -> String {
    fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn values() -> Value {
    serde_yaml::from_str(&read("charts/keyward/values.yaml")).unwrap()
}

/// Whether a value counts as true in a template (`if`, `with`).
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Sequence(items) => !items.is_empty(),
        Value::Mapping(map) => !map.is_empty(),
        _ => true,
    }
}

/// Renders a template with the default values, the simple way: `{{ .Values.a.b }}`
/// becomes the value; `if`/`with` on `.Values.…` (optionally `not`) and on the
/// `keyward.sqlite` helper are evaluated, with `else` and `end`; every other
/// action renders as nothing.
fn render_defaults(template: &str) -> String {
    let values = values();
    let lookup = |path: &str| path.split('.').fold(&values, |v, key| &v[key]).clone();
    let condition = |expression: &str| -> bool {
        let (negate, expression) = match expression.strip_prefix("not ") {
            Some(rest) => (true, rest),
            None => (false, expression),
        };
        let value = if expression.starts_with("include \"keyward.sqlite\"") {
            !truthy(&lookup("database.existingSecret"))
        } else {
            truthy(&lookup(expression.trim_start_matches(".Values.")))
        };
        value != negate
    };
    let mut out = String::new();
    let mut active: Vec<bool> = Vec::new();
    let emitting = |active: &[bool]| active.iter().all(|a| *a);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if emitting(&active) {
            out.push_str(&rest[..start]);
        }
        let end = rest[start..].find("}}").expect("closed action") + start;
        let action = rest[start + 2..end].trim_matches(|c: char| c == '-' || c.is_whitespace());
        if let Some(expression) = action
            .strip_prefix("if ")
            .or_else(|| action.strip_prefix("with "))
        {
            active.push(condition(expression));
        } else if action == "else" {
            let last = active.pop().expect("else inside if");
            active.push(!last);
        } else if action == "end" {
            active.pop();
        } else if let Some(path) = action.strip_prefix(".Values.").filter(|p| !p.contains(' '))
            && emitting(&active)
        {
            out.push_str(serde_yaml::to_string(&lookup(path)).unwrap().trim_end());
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The items of the first `args:` list in a manifest.
fn args(manifest: &str) -> Vec<String> {
    let mut lines = manifest.lines().skip_while(|l| l.trim() != "args:").skip(1);
    let mut items = Vec::new();
    for line in lines.by_ref() {
        match line.trim().strip_prefix("- ") {
            Some(item) => items.push(item.to_owned()),
            None if line.trim().is_empty() || line.trim().starts_with('#') => {}
            None => break,
        }
    }
    items
}

#[test]
fn chart_crd_is_the_generated_crd() {
    assert!(
        read("charts/keyward/crds/apikey.yaml") == read("crds/apikey.yaml"),
        "charts/keyward/crds/apikey.yaml differs: cp crds/apikey.yaml charts/keyward/crds/"
    );
}

#[test]
fn chart_and_config_grant_the_same_rules() {
    let chart: Value = serde_yaml::from_str(&render_defaults(&read(
        "charts/keyward/templates/clusterrole.yaml",
    )))
    .unwrap();
    let config: Value = serde_yaml::from_str(&read("config/clusterrole.yaml")).unwrap();
    assert_eq!(chart["rules"], config["rules"]);
    // Nothing broader than needed: no wildcards anywhere.
    let text = read("config/clusterrole.yaml");
    assert!(!text.contains("\"*\""), "no wildcard rules");

    // The leader-election Role, too (the first document of each file).
    let first = |text: &str| -> Value {
        use serde::Deserialize;
        let document = serde_yaml::Deserializer::from_str(text).next().unwrap();
        Value::deserialize(document).unwrap()
    };
    let chart = first(&render_defaults(&read(
        "charts/keyward/templates/role.yaml",
    )));
    let config = first(&read("config/leader-election.yaml"));
    assert_eq!(chart["kind"], "Role");
    assert_eq!(chart["rules"], config["rules"]);
    // kube-lease-manager gets, creates and patches the Lease; it never updates,
    // lists or watches it.
    assert_eq!(
        config["rules"][0]["verbs"],
        serde_yaml::from_str::<Value>(r#"["get", "create", "patch"]"#).unwrap()
    );
}

#[test]
fn chart_and_config_run_the_operator_with_the_same_flags() {
    let chart = args(&render_defaults(&read(
        "charts/keyward/templates/deployment.yaml",
    )));
    let config = args(&read("config/deployment.yaml"));
    assert_eq!(chart, config);
    assert_eq!(chart.first().map(String::as_str), Some("run"));
    // Every flag exists on `keyward run`.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in chart.iter().skip(1) {
        let name = flag.split('=').next().unwrap();
        assert!(help.contains(name), "{name} is not a flag of keyward run");
    }
}

#[test]
fn every_value_is_documented_and_every_used_value_exists() {
    let text = read("charts/keyward/values.yaml");
    // Every key, nested ones included, has a comment line directly above it.
    let mut previous = "";
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        let is_key = !trimmed.is_empty()
            && !trimmed.starts_with('#')
            && !trimmed.starts_with("- ")
            && trimmed.contains(':');
        if is_key {
            let key = trimmed.split(':').next().unwrap_or_default();
            assert!(
                previous.trim_start().starts_with('#'),
                "values.yaml line {}: {key} has no comment line directly above it",
                number + 1
            );
        }
        previous = line;
    }

    let values = values();
    let mut used = BTreeSet::new();
    for entry in fs::read_dir(format!(
        "{}/charts/keyward/templates",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    {
        let template = fs::read_to_string(entry.unwrap().path()).unwrap();
        for part in template.split(".Values.").skip(1) {
            let path: String = part
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '.')
                .collect();
            used.insert(path.trim_end_matches('.').to_owned());
        }
    }
    for path in used {
        let value = path.split('.').fold(&values, |v, key| &v[key]);
        assert!(
            !value.is_null() || path.ends_with("storageClass"),
            "templates use .Values.{path}, which values.yaml lacks"
        );
    }
}

#[test]
fn argocd_health_check_is_an_argocd_cm_patch() {
    let manifest: Value = serde_yaml::from_str(&read("examples/argocd-health.yaml")).unwrap();
    assert_eq!(manifest["kind"], "ConfigMap");
    assert_eq!(manifest["metadata"]["name"], "argocd-cm");
    let lua = manifest["data"]["resource.customizations.health.keyward.dev_ApiKey"]
        .as_str()
        .expect("the health check key holds the Lua as a string");
    // It reads the condition and the annotation keyward uses, and returns a status.
    assert!(lua.contains(&format!("\"{}\"", keyward::crd::READY)));
    assert!(lua.contains(&format!("[\"{}\"]", keyward::crd::ROTATE_ANNOTATION)));
    assert!(lua.contains("lastRotationRequest") && lua.contains("observedGeneration"));
    for status in ["Healthy", "Progressing", "Degraded"] {
        assert!(lua.contains(&format!("\"{status}\"")), "{status}");
    }
    assert!(lua.trim_end().ends_with("return hs"));
}
