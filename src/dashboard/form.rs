//! The create form: its fields, the CRD's own rules for them (read from the
//! generated schema, so the form and admission never disagree), and the
//! choices the ApiKeyPolicies selecting the namespace allow.

use std::collections::BTreeMap;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::{
    crd::{ApiKey, ApiKeySpec, RotationSpec},
    policy::{ApiKeyPolicy, evaluate::governs},
};

/// What the user typed, kept as typed so a refused form comes back whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewKey {
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.name.
    pub name: String,
    /// spec.owner.
    pub owner: String,
    /// spec.team.
    pub team: String,
    /// spec.scopes: the ticked choices and the comma-separated extra ones.
    pub scopes: Vec<String>,
    /// spec.description.
    pub description: String,
    /// spec.rotation.schedule.
    pub schedule: String,
    /// spec.rotation.timeZone.
    pub time_zone: String,
    /// spec.rotation.gracePeriod.
    pub grace_period: String,
    /// spec.expiresAfter.
    pub expires_after: String,
    /// spec.secretName.
    pub secret_name: String,
}

impl NewKey {
    /// From the form's fields; `scope` may repeat, `extra_scopes` is comma-separated.
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        let one = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        let mut scopes: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.trim().to_owned())
            .chain(one("extra_scopes").split(',').map(|s| s.trim().to_owned()))
            .filter(|s| !s.is_empty())
            .collect();
        let mut seen = std::collections::HashSet::new();
        scopes.retain(|s| seen.insert(s.clone()));
        Self {
            namespace: one("namespace"),
            name: one("name"),
            owner: one("owner"),
            team: one("team"),
            scopes,
            description: one("description"),
            schedule: one("schedule"),
            time_zone: one("time_zone"),
            grace_period: one("grace_period"),
            expires_after: one("expires_after"),
            secret_name: one("secret_name"),
        }
    }

    /// The ApiKey this form describes; empty fields are left unset.
    pub fn to_apikey(&self) -> ApiKey {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let rotation = RotationSpec {
            schedule: some(&self.schedule),
            time_zone: some(&self.time_zone),
            grace_period: some(&self.grace_period),
        };
        let mut key = ApiKey::new(
            &self.name,
            ApiKeySpec {
                owner: self.owner.clone(),
                team: self.team.clone(),
                scopes: self.scopes.clone(),
                secret_name: some(&self.secret_name),
                description: some(&self.description),
                rotation: (rotation != RotationSpec::default()).then_some(rotation),
                expires_after: some(&self.expires_after),
                rollout: None,
            },
        );
        key.metadata.namespace = Some(self.namespace.clone());
        key
    }

    /// The manifest to commit, for GitOps.
    pub fn yaml(&self) -> String {
        serde_yaml::to_string(&self.to_apikey()).unwrap_or_default()
    }
}

/// The HTML constraints of one field, from the CRD schema.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldRule {
    /// The schema's `pattern`, rewritten for HTML's `pattern` attribute.
    pub pattern: Option<String>,
    /// `minLength`.
    pub min_length: Option<u64>,
    /// `maxLength`.
    pub max_length: Option<u64>,
    /// The field's doc comment, shown as help.
    pub help: String,
}

/// The rules of the spec's fields by JSON name (`owner`, `team`, `scopes`,
/// `rotation.schedule`, ...), from the ApiKey CRD keyward installs.
pub fn field_rules() -> BTreeMap<String, FieldRule> {
    let crd = serde_json::to_value(ApiKey::crd()).unwrap_or_default();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut rules = BTreeMap::new();
    collect_rules(spec, "", &mut rules);
    rules
}

fn collect_rules(schema: &Value, prefix: &str, rules: &mut BTreeMap<String, FieldRule>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    for (name, field) in properties {
        let path = format!("{prefix}{name}");
        if field["type"] == "object" {
            collect_rules(field, &format!("{path}."), rules);
            continue;
        }
        // For arrays of strings, the rule of each item.
        let item = if field["type"] == "array" {
            &field["items"]
        } else {
            field
        };
        rules.insert(
            path,
            FieldRule {
                pattern: item["pattern"].as_str().map(html_pattern),
                min_length: item["minLength"].as_u64(),
                max_length: item["maxLength"].as_u64(),
                // The doc comments' Markdown code marks read as noise in a form.
                help: field["description"]
                    .as_str()
                    .unwrap_or_default()
                    .replace('`', ""),
            },
        );
    }
}

/// A schema regex as an HTML `pattern`: browsers compile it with the `v` flag,
/// where a `-` inside a character class must be escaped.
fn html_pattern(pattern: &str) -> String {
    pattern.replace("[-", "[\\-").replace("-]", "\\-]")
}

/// What the policies selecting a namespace allow, offered as choices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Choices {
    /// The policies that select the namespace, by name.
    pub policies: Vec<String>,
    /// Teams every policy allows, when some policy limits teams.
    pub teams: Option<Vec<String>>,
    /// Plain scopes every policy allows, when some policy limits scopes; wildcard
    /// entries (`models:*`) are listed in `scope_patterns`.
    pub scopes: Option<Vec<String>>,
    /// Every policy's allowed scope entries, as written, for the help text.
    pub scope_patterns: Vec<String>,
    /// The owner patterns keys must match.
    pub owner_patterns: Vec<String>,
    /// Lifetime limits, as `maxExpiresAfter: 2160h` lines.
    pub lifetime: Vec<String>,
}

/// The choices for a namespace with `labels` (`None` when the user may not
/// read the namespace: then no policy can be matched, and none is offered).
pub fn choices(policies: &[ApiKeyPolicy], labels: Option<&BTreeMap<String, String>>) -> Choices {
    let Some(labels) = labels else {
        return Choices::default();
    };
    let selecting: Vec<&ApiKeyPolicy> = policies
        .iter()
        .filter(|p| governs(&p.spec.namespace_selector, labels))
        .collect();
    let mut choices = Choices {
        policies: selecting
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect(),
        ..Default::default()
    };
    for policy in &selecting {
        let spec = &policy.spec;
        if let Some(rule) = &spec.teams {
            let mut allowed: Vec<String> = rule.allowed.clone().unwrap_or_default();
            if let Some(team) = rule
                .from_namespace_label
                .as_ref()
                .and_then(|label| labels.get(label))
            {
                allowed.push(team.clone());
            }
            choices.teams = Some(match choices.teams.take() {
                None => allowed,
                Some(before) => before.into_iter().filter(|t| allowed.contains(t)).collect(),
            });
        }
        if let Some(rule) = &spec.scopes {
            choices.scope_patterns.extend(rule.allowed.iter().cloned());
        }
        if let Some(rule) = &spec.owner {
            choices.owner_patterns.push(rule.pattern.clone());
        }
        if let Some(lifetime) = &spec.lifetime {
            for (name, value) in [
                ("maxExpiresAfter", &lifetime.max_expires_after),
                ("maxRotationInterval", &lifetime.max_rotation_interval),
                ("maxGracePeriod", &lifetime.max_grace_period),
                ("maxUnused", &lifetime.max_unused),
            ] {
                if let Some(value) = value {
                    choices.lifetime.push(format!(
                        "{name}: {value} ({})",
                        policy.metadata.name.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
    }
    let scope_rules: Vec<&Vec<String>> = selecting
        .iter()
        .filter_map(|p| p.spec.scopes.as_ref().map(|r| &r.allowed))
        .collect();
    if !scope_rules.is_empty() {
        let mut plain: Vec<String> = choices
            .scope_patterns
            .iter()
            .filter(|s| !s.ends_with('*'))
            .filter(|s| {
                scope_rules
                    .iter()
                    .all(|allowed| crate::policy::evaluate::scope_allowed(s, allowed))
            })
            .cloned()
            .collect();
        plain.sort();
        plain.dedup();
        choices.scopes = Some(plain);
    }
    if let Some(teams) = choices.teams.as_mut() {
        teams.sort();
        teams.dedup();
    }
    choices
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        ApiKeyPolicySpec,
        crd::{ScopeRule, TeamRule},
    };

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn the_form_becomes_the_apikey_and_its_yaml() {
        let form = NewKey::from_pairs(&pairs(&[
            ("namespace", "team-a"),
            ("name", "batch-job"),
            ("owner", " alice@example.com "),
            ("team", "ml"),
            ("scope", "inference"),
            ("scope", "metrics"),
            ("extra_scopes", "models:read, inference"),
            ("schedule", "@every 720h"),
            ("expires_after", ""),
        ]));
        assert_eq!(form.scopes, vec!["inference", "metrics", "models:read"]);
        let key = form.to_apikey();
        assert_eq!(key.spec.owner, "alice@example.com");
        assert_eq!(key.spec.expires_after, None);
        assert_eq!(
            key.spec.rotation.unwrap().schedule.as_deref(),
            Some("@every 720h")
        );
        let yaml = form.yaml();
        assert!(yaml.contains("kind: ApiKey"), "{yaml}");
        assert!(yaml.contains("namespace: team-a"), "{yaml}");
        assert!(!yaml.contains("expiresAfter"), "{yaml}");
    }

    #[test]
    fn field_rules_come_from_the_crd() {
        let rules = field_rules();
        assert_eq!(
            rules["team"].pattern.as_deref(),
            Some("^[a-z0-9]([\\-a-z0-9]*[a-z0-9])?$")
        );
        assert_eq!(rules["team"].max_length, Some(63));
        assert_eq!(rules["owner"].max_length, Some(253));
        assert!(
            rules["scopes"]
                .pattern
                .as_deref()
                .unwrap()
                .ends_with("._:\\-]{0,62}$")
        );
        assert!(rules.contains_key("rotation.schedule"));
        assert!(rules["expiresAfter"].help.contains("valid"));
    }

    fn policy(name: &str, teams: &[&str], scopes: &[&str]) -> ApiKeyPolicy {
        let mut spec: ApiKeyPolicySpec = serde_json::from_value(serde_json::json!({
            "namespaceSelector": {"matchLabels": {"tier": "prod"}}
        }))
        .unwrap();
        spec.teams = (!teams.is_empty()).then(|| TeamRule {
            allowed: Some(teams.iter().map(|t| (*t).into()).collect()),
            from_namespace_label: Some("keyward.dev/team".into()),
        });
        spec.scopes = (!scopes.is_empty()).then(|| ScopeRule {
            allowed: scopes.iter().map(|s| (*s).into()).collect(),
        });
        ApiKeyPolicy::new(name, spec)
    }

    #[test]
    fn choices_are_what_every_selecting_policy_allows() {
        let policies = [
            policy(
                "a",
                &["ml", "search"],
                &["inference", "metrics", "models:*"],
            ),
            policy(
                "b",
                &["ml", "payments"],
                &["inference", "models:read", "admin"],
            ),
        ];
        let labels = BTreeMap::from([
            ("tier".to_owned(), "prod".to_owned()),
            ("keyward.dev/team".to_owned(), "data".to_owned()),
        ]);
        let choices = choices(&policies, Some(&labels));
        assert_eq!(choices.policies, vec!["a", "b"]);
        assert_eq!(choices.teams, Some(vec!["data".into(), "ml".into()]));
        assert_eq!(
            choices.scopes,
            Some(vec!["inference".into(), "models:read".into()])
        );
        let elsewhere = BTreeMap::from([("tier".to_owned(), "dev".to_owned())]);
        assert_eq!(
            self::choices(&policies, Some(&elsewhere)),
            Choices::default()
        );
        assert_eq!(self::choices(&policies, None), Choices::default());
    }
}
