//! The Helm chart and the kustomize base in config/ must agree with each other
//! and with the code: the same CRD bytes, RBAC rules and flags, and every value
//! documented. Helm is not available here, so templates are read as text: their
//! guards wrap whole rules or single list items (see the templates' comments).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

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

/// Every YAML document in a text (empty ones skipped).
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|document| !document.is_null())
        .collect()
}

const AGGREGATE_TO: &str = "rbac.authorization.k8s.io/aggregate-to-";

/// The built-in roles a ClusterRole's labels aggregate it into, e.g. {"admin", "edit"}.
fn aggregated_into(role: &Value) -> BTreeSet<String> {
    role["metadata"]["labels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter(|(_, value)| value.as_str() == Some("true"))
        .filter_map(|(key, _)| key.as_str()?.strip_prefix(AGGREGATE_TO))
        .map(str::to_owned)
        .collect()
}

/// The ClusterRoles among some documents, by name without the `keyward` prefix: config/'s
/// `keyward-view` and the chart's `{{ include "keyward.fullname" . }}-view` (which the text
/// renderer leaves as `-view`) are both `view`.
fn cluster_roles_by_suffix(documents: &[Value]) -> BTreeMap<String, Value> {
    documents
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .map(|role| {
            let name = role["metadata"]["name"].as_str().unwrap();
            let suffix = name.strip_prefix("keyward").unwrap_or(name);
            (suffix.trim_start_matches('-').to_owned(), role.clone())
        })
        .collect()
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|item| item.as_str().unwrap().to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

/// The verbs a role grants on one resource of keyward.dev.
fn verbs_on(role: &Value, resource: &str) -> BTreeSet<String> {
    role["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|rule| strings(&rule["apiGroups"]).contains("keyward.dev"))
        .filter(|rule| strings(&rule["resources"]).contains(resource))
        .flat_map(|rule| strings(&rule["verbs"]))
        .collect()
}

#[test]
fn chart_and_config_ship_the_same_aggregated_roles() {
    let config = cluster_roles_by_suffix(&documents(&read("config/aggregated-roles.yaml")));
    let chart = cluster_roles_by_suffix(&documents(&render_defaults(&read(
        "charts/keyward/templates/aggregated-roles.yaml",
    ))));
    assert_eq!(
        config.keys().collect::<Vec<_>>(),
        ["edit", "policy-admin", "view"]
    );
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        config.keys().collect::<Vec<_>>()
    );
    for (suffix, role) in &config {
        assert_eq!(role["metadata"]["name"], format!("keyward-{suffix}"));
        assert_eq!(
            chart[suffix]["rules"], role["rules"],
            "keyward-{suffix}: rules"
        );
        assert_eq!(
            aggregated_into(&chart[suffix]),
            aggregated_into(role),
            "keyward-{suffix}: aggregation labels"
        );
        assert!(
            role.get("aggregationRule").is_none() && chart[suffix].get("aggregationRule").is_none()
        );
    }
    // The chart names them after its other cluster-scoped objects.
    let template = read("charts/keyward/templates/aggregated-roles.yaml");
    for suffix in config.keys() {
        assert!(template.contains(&format!(
            "name: {{{{ include \"keyward.fullname\" . }}}}-{suffix}\n"
        )));
    }
    assert!(
        template.contains("{{- if .Values.aggregatedRoles.enabled }}"),
        "aggregatedRoles.enabled guards the whole file"
    );
    assert!(
        read("config/kustomization.yaml").contains("\n  - aggregated-roles.yaml\n"),
        "config/kustomization.yaml lists aggregated-roles.yaml"
    );

    // view: reads, for everyone who holds view, edit or admin in a namespace.
    let view = &config["view"];
    assert_eq!(aggregated_into(view), set(&["view", "edit", "admin"]));
    let reads = set(&["get", "list", "watch"]);
    assert_eq!(verbs_on(view, "apikeys"), reads);
    assert_eq!(verbs_on(view, "apikeys/status"), reads);
    // edit: writes (rotation is an annotation, i.e. a patch) for edit and admin, never view;
    // it reads too, so that it works when bound on its own.
    let edit = &config["edit"];
    assert_eq!(aggregated_into(edit), set(&["edit", "admin"]));
    assert_eq!(
        verbs_on(edit, "apikeys"),
        set(&[
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection"
        ])
    );
    assert_eq!(verbs_on(edit, "apikeys/status"), reads);
    // Status and finalizers stay the operator's.
    for role in [view, edit] {
        assert!(verbs_on(role, "apikeys/finalizers").is_empty());
        assert!(
            verbs_on(role, "apikeys/status")
                .iter()
                .all(|v| reads.contains(v))
        );
    }
    // policy-admin: for platform admins to bind; aggregated into nothing.
    let policy_admin = &config["policy-admin"];
    assert!(aggregated_into(policy_admin).is_empty());
    assert!(verbs_on(policy_admin, "apikeypolicies").contains("create"));
    assert!(verbs_on(policy_admin, "apikeys").is_empty());
}

#[test]
fn no_aggregated_role_grants_anything_on_apikeypolicies() {
    // Every ClusterRole keyward ships or shows: config/, the chart with default values, and
    // the examples.
    let root = env!("CARGO_MANIFEST_DIR");
    let mut roles = Vec::new();
    for (dir, render) in [
        ("config", false),
        ("charts/keyward/templates", true),
        ("examples", false),
    ] {
        for entry in fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let path = entry.unwrap().path();
            let text = fs::read_to_string(&path).unwrap();
            if !text.contains("kind: ClusterRole\n") {
                continue;
            }
            let text = if render { render_defaults(&text) } else { text };
            for document in documents(&text) {
                if document["kind"] == "ClusterRole" {
                    roles.push((path.display().to_string(), document));
                }
            }
        }
    }
    let aggregated: Vec<_> = roles
        .iter()
        .filter(|(_, role)| !aggregated_into(role).is_empty())
        .collect();
    // keyward-view and keyward-edit, in config/ and in the chart.
    assert_eq!(aggregated.len(), 4, "{aggregated:?}");
    for (path, role) in aggregated {
        let name = &role["metadata"]["name"];
        for rule in role["rules"].as_sequence().unwrap() {
            let groups = strings(&rule["apiGroups"]);
            assert!(
                !groups.contains("*"),
                "{path}: {name:?} grants every API group"
            );
            for resource in strings(&rule["resources"]) {
                assert!(
                    resource != "*" && !resource.starts_with("apikeypolicies"),
                    "{path}: {name:?} is aggregated into the built-in roles and grants {resource}"
                );
            }
        }
    }
    // The roles that do grant ApiKeyPolicies exist, so the check above is not vacuous.
    assert!(
        roles
            .iter()
            .any(|(_, role)| !verbs_on(role, "apikeypolicies").is_empty())
    );
}

#[test]
fn policy_examples_hold_policies_and_bind_packaged_roles() {
    let packaged = cluster_roles_by_suffix(&documents(&read("config/aggregated-roles.yaml")));
    for example in [
        "examples/policy-platform-admin.yaml",
        "examples/policy-team-admin.yaml",
        "examples/policy-developer.yaml",
    ] {
        let documents = documents(&read(example));
        let policies: Vec<keyward::policy::ApiKeyPolicy> = documents
            .iter()
            .filter(|d| d["kind"] == "ApiKeyPolicy")
            .map(|d| serde_yaml::from_value(d.clone()).unwrap_or_else(|e| panic!("{example}: {e}")))
            .collect();
        assert!(!policies.is_empty(), "{example} has an ApiKeyPolicy");
        // Every ClusterRole a binding names is in the same file or ships with keyward.
        let local = cluster_roles_by_suffix(&documents);
        for binding in documents
            .iter()
            .filter(|d| d["roleRef"]["kind"] == "ClusterRole")
        {
            let name = binding["roleRef"]["name"].as_str().unwrap();
            let known = documents
                .iter()
                .any(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
                || packaged
                    .values()
                    .any(|role| role["metadata"]["name"] == name);
            assert!(known, "{example}: binds {name}, which nothing defines");
        }
        assert!(local.values().all(|role| aggregated_into(role).is_empty()));
    }
}

/// The one object of `kind` in some documents.
fn only<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = documents.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// The verifier's address for gateways: the Service config/verifier.yaml ships.
const VERIFIER_SERVICE: &str = "keyward-verifier";
const VERIFIER_NAMESPACE: &str = "keyward-system";
const VERIFIER_PORT: u64 = 9000;

#[test]
fn config_runs_the_verifier_least_privileged_with_flags_it_has() {
    let verifier = documents(&read("config/verifier.yaml"));
    assert!(
        read("config/kustomization.yaml").contains("\n  - verifier.yaml\n"),
        "config/kustomization.yaml lists verifier.yaml"
    );
    let deployment = only(&verifier, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(pod["containers"].as_sequence().unwrap().len(), 1);

    // `keyward verifier`, with flags it has, listening on the Service's port.
    let args = strings_in_order(&container["args"]);
    assert_eq!(args.first().map(String::as_str), Some("verifier"));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["verifier", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().skip(1) {
        let name = flag.split('=').next().unwrap();
        assert!(
            help.contains(name),
            "{name} is not a flag of keyward verifier"
        );
    }
    assert!(args.contains(&format!("--address=0.0.0.0:{VERIFIER_PORT}")));
    assert_eq!(container["ports"][0]["name"], "verifier");
    assert_eq!(container["ports"][0]["containerPort"], VERIFIER_PORT);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "verifier", "{probe}");
    }

    // The operator's pod and container security, and the operator's image.
    let operator = documents(&read("config/deployment.yaml"));
    let operator_pod = &only(&operator, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"], operator_pod["securityContext"]);
    let operator_container = &operator_pod["containers"][0];
    assert_eq!(
        container["securityContext"],
        operator_container["securityContext"]
    );
    assert_eq!(container["image"], operator_container["image"]);

    // Its own ServiceAccount, with no token mounted and no role bound to it.
    let account = only(&verifier, "ServiceAccount");
    assert_eq!(account["metadata"]["name"], "keyward-verifier");
    assert_eq!(account["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "keyward-verifier");
    assert_eq!(pod["automountServiceAccountToken"], false);
    for entry in fs::read_dir(format!("{}/config", env!("CARGO_MANIFEST_DIR"))).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        for document in documents(&text) {
            for subject in document["subjects"].as_sequence().into_iter().flatten() {
                assert_ne!(
                    subject["name"],
                    "keyward-verifier",
                    "{}: the verifier needs no Kubernetes API access",
                    path.display()
                );
            }
        }
    }

    // Its pods are not the operator's: no operator selector matches them, and the
    // verifier's selectors match them.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selects = |selector: &Value| {
        selector
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
    };
    let operator_selector = &only(&operator, "Deployment")["spec"]["selector"]["matchLabels"];
    assert!(
        !selects(operator_selector),
        "the operator's selector matches verifier pods"
    );
    let service = only(&verifier, "Service");
    for selector in [
        &deployment["spec"]["selector"]["matchLabels"],
        &service["spec"]["selector"],
        &only(&verifier, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        &only(&verifier, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ] {
        assert!(selects(selector), "{selector:?}");
    }
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        only(&verifier, "PodDisruptionBudget")["spec"]["minAvailable"],
        1
    );

    // One Service port for gRPC and HTTP.
    assert_eq!(service["metadata"]["name"], VERIFIER_SERVICE);
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], VERIFIER_PORT);
    assert_eq!(ports[0]["targetPort"], "verifier");
    assert_eq!(ports[0]["appProtocol"], "grpc");

    // Ingress only to the verifier's port, only from selected namespaces.
    let policy = only(&verifier, "NetworkPolicy");
    let ingress = policy["spec"]["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(
        ingress[0]["ports"],
        serde_yaml::from_str::<Value>("[{port: verifier}]").unwrap()
    );
    for peer in ingress[0]["from"].as_sequence().unwrap() {
        let selector = &peer["namespaceSelector"];
        assert!(
            selector.as_mapping().is_some_and(|s| s
                .values()
                .any(|v| v.as_mapping().is_some_and(|m| !m.is_empty())
                    || v.as_sequence().is_some_and(|l| !l.is_empty()))),
            "{peer:?} admits every namespace"
        );
    }

    // The chart's defaults are config/'s: the same port and tuning.
    let values = values();
    assert_eq!(values["verifier"]["port"], VERIFIER_PORT);
    for (value, flag) in [
        ("keyHeader", "--key-header"),
        ("maxStaleness", "--max-staleness"),
        ("maxFallbacks", "--max-fallbacks"),
        ("fallbackTimeoutMs", "--fallback-timeout-ms"),
    ] {
        let expected = match &values["verifier"][value] {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
        };
        assert!(args.contains(&format!("{flag}={expected}")), "{flag}");
    }
    // The chart's verifier pods run with the operator's security contexts.
    let template = read("charts/keyward/templates/verifier-deployment.yaml");
    assert!(template.contains("toYaml .Values.podSecurityContext"));
    assert!(template.contains("toYaml .Values.securityContext"));
    assert!(template.contains("automountServiceAccountToken: false"));
}

fn strings_in_order(list: &Value) -> Vec<String> {
    list.as_sequence()
        .unwrap()
        .iter()
        .map(|item| item.as_str().unwrap().to_owned())
        .collect()
}

/// Every `<host>:<port>` and `<host>` naming the keyward verifier in a text.
fn verifier_addresses(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || "\"'{},[]".contains(c))
        .filter(|word| word.contains("keyward-verifier."))
        .map(|word| {
            let start = word.find("keyward-verifier.").unwrap();
            word[start..].to_owned()
        })
        .collect()
}

#[test]
fn verifier_examples_are_manifests_that_call_the_verifier_service() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut examples: Vec<_> = fs::read_dir(format!("{root}/examples"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("verifier-") && name.ends_with(".yaml"))
        .collect();
    examples.sort();
    assert_eq!(
        examples,
        [
            "verifier-envoy-gateway.yaml",
            "verifier-envoy.yaml",
            "verifier-ingress-nginx.yaml",
            "verifier-istio.yaml",
            "verifier-traefik.yaml",
        ]
    );
    let host = format!("{VERIFIER_SERVICE}.{VERIFIER_NAMESPACE}.svc.cluster.local");
    for example in &examples {
        let text = read(&format!("examples/{example}"));
        let documents = documents(&text);
        assert!(!documents.is_empty(), "{example}");
        for document in &documents {
            assert!(
                document["apiVersion"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty())
                    && document["kind"].as_str().is_some_and(|k| !k.is_empty()),
                "{example}: a document without apiVersion and kind"
            );
        }
        // Every address of the verifier is its Service's, on its port.
        for address in verifier_addresses(&text) {
            assert!(
                address.starts_with(&host),
                "{example}: {address} is not {host}"
            );
            if let Some(port) = address[host.len()..].strip_prefix(':') {
                let port: String = port.chars().take_while(char::is_ascii_digit).collect();
                assert_eq!(port, VERIFIER_PORT.to_string(), "{example}: {address}");
            }
        }
        assert!(
            text.contains(&VERIFIER_PORT.to_string()),
            "{example} names port {VERIFIER_PORT}"
        );
        assert!(
            text.contains(&host)
                || documents.iter().any(|d| {
                    yaml_contains(d, &|v| {
                        v["name"] == VERIFIER_SERVICE
                            && v["namespace"] == VERIFIER_NAMESPACE
                            && v["port"] == VERIFIER_PORT
                    })
                }),
            "{example} calls the verifier Service"
        );
    }

    // ingress-nginx: the check URL with a scope, the identity headers, and no auth cache.
    let nginx = documents(&read("examples/verifier-ingress-nginx.yaml"));
    let annotations = &only(&nginx, "Ingress")["metadata"]["annotations"];
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/auth-url"],
        format!("http://{host}:{VERIFIER_PORT}/check?scope=inference").as_str()
    );
    let headers = annotations["nginx.ingress.kubernetes.io/auth-response-headers"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    for header in keyward::verifier::request::IDENTITY_HEADERS {
        assert!(headers.split(',').any(|h| h == header), "{header}");
    }
    for (key, _) in annotations.as_mapping().unwrap() {
        assert!(
            !key.as_str().unwrap().contains("auth-cache"),
            "a gateway-side auth cache delays revocation"
        );
    }

    // Traefik: ForwardAuth to the check URL, used by the IngressRoute.
    let traefik = documents(&read("examples/verifier-traefik.yaml"));
    let middleware = only(&traefik, "Middleware");
    assert_eq!(
        middleware["spec"]["forwardAuth"]["address"],
        format!("http://{host}:{VERIFIER_PORT}/check?scope=inference").as_str()
    );
    let forwarded: Vec<String> =
        strings_in_order(&middleware["spec"]["forwardAuth"]["authResponseHeaders"])
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
    assert_eq!(forwarded, keyward::verifier::request::IDENTITY_HEADERS);
    assert_eq!(
        only(&traefik, "IngressRoute")["spec"]["routes"][0]["middlewares"][0]["name"],
        middleware["metadata"]["name"]
    );

    // Envoy: gRPC ext_authz, fail closed, scopes per route in context_extensions.
    let envoy = documents(&read("examples/verifier-envoy.yaml"));
    let config: Value = serde_yaml::from_str(
        only(&envoy, "ConfigMap")["data"]["envoy.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let manager = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filter = &manager["http_filters"][0];
    assert_eq!(filter["name"], "envoy.filters.http.ext_authz");
    let ext_authz = &filter["typed_config"];
    assert_eq!(ext_authz["transport_api_version"], "V3");
    assert_eq!(ext_authz["failure_mode_allow"], false);
    let cluster_name = &ext_authz["grpc_service"]["envoy_grpc"]["cluster_name"];
    let cluster = config["static_resources"]["clusters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| &c["name"] == cluster_name)
        .expect("the ext_authz cluster");
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(address["address"], host.as_str());
    assert_eq!(address["port_value"], VERIFIER_PORT);
    assert!(
        cluster["typed_extension_protocol_options"].is_mapping(),
        "gRPC needs HTTP/2 to the verifier"
    );
    let scoped: Vec<&Value> = manager["route_config"]["virtual_hosts"][0]["routes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|route| &route["typed_per_filter_config"]["envoy.filters.http.ext_authz"])
        .filter(|per_route| !per_route["check_settings"].is_null())
        .collect();
    assert!(!scoped.is_empty());
    for per_route in scoped {
        assert!(
            per_route["@type"]
                .as_str()
                .unwrap()
                .ends_with("ext_authz.v3.ExtAuthzPerRoute")
        );
        assert!(
            per_route["check_settings"]["context_extensions"]
                [keyward::verifier::grpc::SCOPES_EXTENSION]
                .is_string()
        );
    }

    // Istio: the providers name the verifier; the policies use them with action CUSTOM.
    let istio = documents(&read("examples/verifier-istio.yaml"));
    let providers = only(&istio, "IstioOperator")["spec"]["meshConfig"]["extensionProviders"]
        .as_sequence()
        .unwrap()
        .clone();
    for provider in &providers {
        let settings = if provider["envoyExtAuthzGrpc"].is_mapping() {
            &provider["envoyExtAuthzGrpc"]
        } else {
            let http = &provider["envoyExtAuthzHttp"];
            assert_eq!(http["pathPrefix"], "/check");
            assert!(
                http["includeAdditionalHeadersInCheck"][keyward::verifier::http::SCOPES_HEADER]
                    .is_string()
            );
            http
        };
        assert_eq!(settings["service"], host.as_str());
        assert_eq!(settings["port"], VERIFIER_PORT);
        assert_eq!(settings["failOpen"], false);
    }
    let policies: Vec<&Value> = istio
        .iter()
        .filter(|d| d["kind"] == "AuthorizationPolicy")
        .collect();
    assert!(!policies.is_empty());
    for policy in policies {
        assert_eq!(policy["spec"]["action"], "CUSTOM");
        assert!(
            providers
                .iter()
                .any(|p| p["name"] == policy["spec"]["provider"]["name"])
        );
    }

    // Envoy Gateway: gRPC to the verifier Service, allowed by a ReferenceGrant.
    let gateway = documents(&read("examples/verifier-envoy-gateway.yaml"));
    let ext_auth = &only(&gateway, "SecurityPolicy")["spec"]["extAuth"];
    assert_eq!(ext_auth["failOpen"], false);
    assert_eq!(
        strings_in_order(&ext_auth["headersToExtAuth"]),
        ["authorization", "x-api-key"]
    );
    let backend = &ext_auth["grpc"]["backendRefs"][0];
    assert_eq!(backend["name"], VERIFIER_SERVICE);
    assert_eq!(backend["namespace"], VERIFIER_NAMESPACE);
    assert_eq!(backend["port"], VERIFIER_PORT);
    let grant = only(&gateway, "ReferenceGrant");
    assert_eq!(grant["metadata"]["namespace"], VERIFIER_NAMESPACE);
    assert_eq!(grant["spec"]["to"][0]["name"], VERIFIER_SERVICE);
}

/// Whether a value or anything inside it satisfies `test`.
fn yaml_contains(value: &Value, test: &dyn Fn(&Value) -> bool) -> bool {
    test(value)
        || match value {
            Value::Mapping(map) => map.values().any(|v| yaml_contains(v, test)),
            Value::Sequence(items) => items.iter().any(|v| yaml_contains(v, test)),
            _ => false,
        }
}

/// The `KEYWARD_*` variables a manifest sets (commented-out ones are not read).
fn keyward_env_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.trim().strip_prefix("- name: KEYWARD_"))
        .map(|rest| format!("KEYWARD_{}", rest.trim()))
        .collect()
}

#[test]
fn every_keyward_variable_the_manifests_set_is_read_by_the_command() {
    for (command, files) in [
        (
            "run",
            [
                "config/deployment.yaml",
                "charts/keyward/templates/deployment.yaml",
            ],
        ),
        (
            "verifier",
            [
                "config/verifier.yaml",
                "charts/keyward/templates/verifier-deployment.yaml",
            ],
        ),
    ] {
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for file in files {
            let names = keyward_env_names(&read(file));
            assert!(names.contains("KEYWARD_DATABASE_URL"), "{file}: {names:?}");
            for name in names {
                assert!(
                    help.contains(&format!("[env: {name}")),
                    "{file} sets {name}, which keyward {command} does not read"
                );
            }
        }
    }
    // The new values travel as variables, not flags.
    let chart = read("charts/keyward/templates/deployment.yaml");
    assert!(keyward_env_names(&chart).contains("KEYWARD_CLUSTER_NAME"));
    assert!(keyward_env_names(&chart).contains("KEYWARD_ANTI_ENTROPY_INTERVAL"));
    let verifier = read("charts/keyward/templates/verifier-deployment.yaml");
    assert!(keyward_env_names(&verifier).contains("KEYWARD_PRIMARY_DATABASE_URL"));
    assert!(keyward_env_names(&verifier).contains("KEYWARD_ACCEPT_CLUSTERS"));
}

/// The SQL statements from `GRANT` to `;` in a text, whitespace collapsed.
fn grants(text: &str) -> Vec<String> {
    text.split("GRANT ")
        .skip(1)
        .map(|rest| {
            let statement = rest.split(';').next().unwrap();
            format!(
                "GRANT {}",
                statement.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })
        .collect()
}

#[test]
fn cloudnativepg_example_wires_the_urls_config_reads_and_the_documented_grants() {
    let example = documents(&read("examples/cloudnativepg.yaml"));
    let cluster = only(&example, "Cluster");
    assert_eq!(cluster["apiVersion"], "postgresql.cnpg.io/v1");
    let name = cluster["metadata"]["name"].as_str().unwrap();
    let spec = &cluster["spec"];
    assert_eq!(spec["instances"], 3);
    assert_eq!(spec["postgresql"]["synchronous"]["method"], "any");
    assert_eq!(spec["postgresql"]["synchronous"]["number"], 1);
    assert_eq!(
        spec["postgresql"]["parameters"]["synchronous_commit"],
        "remote_apply"
    );
    assert_eq!(spec["bootstrap"]["initdb"]["database"], "keyward");
    let roles = spec["managed"]["roles"].as_sequence().unwrap();
    assert!(
        roles
            .iter()
            .any(|r| r["name"] == "keyward_verifier" && r["login"] == true)
    );
    // Everything in the namespace the operator and the verifier run in.
    for object in &example {
        assert_eq!(object["metadata"]["namespace"], VERIFIER_NAMESPACE);
    }

    // The Secrets config/verifier.yaml reads: the replicas (-ro) and the primary (-rw).
    let verifier = documents(&read("config/verifier.yaml"));
    let env = &only(&verifier, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"];
    for (variable, service) in [
        ("KEYWARD_DATABASE_URL", format!("@{name}-ro.")),
        ("KEYWARD_PRIMARY_DATABASE_URL", format!("@{name}-rw.")),
    ] {
        let reference = &env
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == variable)
            .unwrap_or_else(|| panic!("config/verifier.yaml sets {variable}"))["valueFrom"]["secretKeyRef"];
        let secret = example
            .iter()
            .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == reference["name"])
            .unwrap_or_else(|| panic!("the example has no Secret {:?}", reference["name"]));
        let url = secret["stringData"][reference["key"].as_str().unwrap()]
            .as_str()
            .unwrap();
        assert!(
            url.starts_with("postgresql://keyward_verifier:") && url.contains(&service),
            "{variable}: {url}"
        );
    }
    // The operator's URL is the one CloudNativePG generates for the owner.
    let text = read("examples/cloudnativepg.yaml");
    assert!(text.contains(&format!(
        "database.existingSecret={name}-app,database.existingSecretKey=uri"
    )));

    // The Job grants exactly what docs/verifier.md grants.
    let docs = read("docs/verifier.md");
    let documented = docs
        .split("## The database role")
        .nth(1)
        .and_then(|section| section.split("```sql").nth(1))
        .and_then(|block| block.split("```").next())
        .unwrap();
    let job = only(&example, "Job");
    let script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        .as_str()
        .unwrap();
    assert_eq!(grants(script), grants(documented));
    assert_eq!(grants(script).len(), 6);
}
