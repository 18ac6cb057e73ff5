//! The pure policy check: does an ApiKey's spec satisfy every ApiKeyPolicy that
//! selects its namespace? No I/O; the caller passes the namespace's labels, the
//! key's place among its namespace's ApiKeys, and `now`.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use regex::Regex;

use super::crd::{ApiKeyPolicy, ApiKeyPolicySpec, ViolationAction};
use crate::{
    crd::{ApiKeySpec, DEFAULT_GRACE_PERIOD},
    schedule::{Schedule, parse_duration},
};

/// The rule name for a namespace no policy selects while `--require-policy` is set.
pub const REQUIRE_POLICY_RULE: &str = "requirePolicy";

/// An ApiKeyPolicy with its pattern and durations parsed once.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// The policy's name.
    pub name: String,
    /// Its metadata.generation.
    pub generation: Option<i64>,
    /// Its status as last read.
    pub status: Option<super::crd::ApiKeyPolicyStatus>,
    /// Its spec.
    pub spec: ApiKeyPolicySpec,
    owner: Option<Regex>,
    max_expires_after: Option<SignedDuration>,
    max_rotation_interval: Option<SignedDuration>,
    max_grace_period: Option<SignedDuration>,
    max_unused: Option<SignedDuration>,
    /// Why the policy cannot be applied as written, if it cannot. Such a policy
    /// forbids every key in the namespaces it selects (it fails closed).
    pub defect: Option<String>,
}

impl CompiledPolicy {
    /// Parses the owner pattern and the durations. A part that does not parse
    /// becomes `defect`; the schema's CEL rules normally reject it first.
    pub fn new(policy: &ApiKeyPolicy) -> Self {
        let spec = policy.spec.clone();
        let mut defects = Vec::new();
        let owner = spec.owner.as_ref().and_then(|rule| {
            super::re2::anchored(&rule.pattern)
                .and_then(|pattern| Regex::new(&pattern).map_err(|e| e.to_string()))
                .map_err(|e| defects.push(format!("owner.pattern does not compile: {e}")))
                .ok()
        });
        let mut duration = |field: &str, value: Option<&String>| {
            value.and_then(|text| {
                parse_duration(text)
                    .map_err(|e| defects.push(format!("lifetime.{field}: {e}")))
                    .ok()
            })
        };
        let lifetime = spec.lifetime.clone().unwrap_or_default();
        let max_expires_after = duration("maxExpiresAfter", lifetime.max_expires_after.as_ref());
        let max_rotation_interval = duration(
            "maxRotationInterval",
            lifetime.max_rotation_interval.as_ref(),
        );
        let max_grace_period = duration("maxGracePeriod", lifetime.max_grace_period.as_ref());
        let max_unused = duration("maxUnused", lifetime.max_unused.as_ref());
        if let Err(e) = selects(&spec.namespace_selector, &BTreeMap::new()) {
            defects.push(format!("namespaceSelector: {e}"));
        }
        Self {
            name: policy.name_any(),
            generation: policy.metadata.generation,
            status: policy.status.clone(),
            spec,
            owner,
            max_expires_after,
            max_rotation_interval,
            max_grace_period,
            max_unused,
            defect: (!defects.is_empty()).then(|| defects.join("; ")),
        }
    }

    /// Whether this policy governs a namespace with these labels. A selector
    /// that cannot be read selects every namespace, so the policy fails closed.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        governs(&self.spec.namespace_selector, labels)
    }

    /// Whether this policy limits the keys of a namespace with these labels.
    pub fn limits(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec.max_keys_per_namespace.is_some() && self.selects(labels)
    }

    /// The teams this policy allows, as one line for `kubectl get`.
    pub fn teams_summary(&self) -> Option<String> {
        let rule = self.spec.teams.as_ref()?;
        let mut parts: Vec<String> = rule.allowed.clone().unwrap_or_default();
        if let Some(label) = &rule.from_namespace_label {
            parts.push(format!("ns:{label}"));
        }
        Some(parts.join(","))
    }
}

/// Whether a policy with this namespace selector governs a namespace with
/// these labels. A selector that cannot be read selects every namespace, so
/// the policy fails closed.
pub fn governs(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selects(selector, labels).unwrap_or(true)
}

/// Whether a label selector matches `labels`, as the API server reads it.
pub fn selects(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let mut by_expressions = true;
    for expression in selector.match_expressions.iter().flatten() {
        let value = labels.get(&expression.key);
        let values = expression.values.as_deref().unwrap_or_default();
        let matched = match expression.operator.as_str() {
            "In" if !values.is_empty() => value.is_some_and(|v| values.contains(v)),
            "NotIn" if !values.is_empty() => value.is_none_or(|v| !values.contains(v)),
            "Exists" if values.is_empty() => value.is_some(),
            "DoesNotExist" if values.is_empty() => value.is_none(),
            operator => {
                return Err(format!(
                    "operator {operator:?} on key {:?} with {} values is not a valid selector requirement",
                    expression.key,
                    values.len()
                ));
            }
        };
        by_expressions &= matched;
    }
    Ok(by_labels && by_expressions)
}

/// Whether a scope matches one allowed entry (`name`, `prefix*` or `*`).
pub fn scope_allowed(scope: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|entry| match entry.strip_suffix('*') {
        Some(prefix) => scope.starts_with(prefix),
        None => entry == scope,
    })
}

/// One rule of one policy that a key breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The policy's name; `None` for `--require-policy` with no policy selecting the namespace.
    pub policy: Option<String>,
    /// The rule, as in the policy's spec: `teams`, `scopes`, `owner`, `lifetime.maxExpiresAfter`, ….
    pub rule: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
    /// What the policy does with keys already issued.
    pub action: ViolationAction,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.policy {
            Some(policy) => write!(
                f,
                "ApiKeyPolicy {policy} rule {}: {}",
                self.rule, self.message
            ),
            None => write!(f, "{}", self.message),
        }
    }
}

/// The result of checking one key against every policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The policies that select the key's namespace.
    pub governing: Vec<String>,
    /// Every broken rule; empty when the key is allowed.
    pub violations: Vec<Violation>,
    /// When a rule that depends on time alone (`lifetime.maxUnused`) may
    /// judge the key differently: the reconciler looks again then.
    pub recheck_at: Option<Timestamp>,
}

impl Verdict {
    /// Whether every governing policy allows the key.
    pub fn allowed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The strictest action among the broken policies; `None` when allowed.
    pub fn action(&self) -> Option<ViolationAction> {
        self.violations.iter().map(|v| v.action).max()
    }

    /// The broken policies' names, sorted and once each; `--require-policy`
    /// stands for a namespace no policy selects while one is required.
    pub fn violated_policies(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .violations
            .iter()
            .map(|v| {
                v.policy
                    .clone()
                    .unwrap_or_else(|| "--require-policy".into())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// All violations in one line, for a condition message or an Event.
    pub fn message(&self) -> String {
        self.violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What the check needs to know about the key besides its spec.
#[derive(Clone, Copy)]
pub struct KeyContext<'a> {
    /// The key's namespace.
    pub namespace: &'a str,
    /// The namespace's labels.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// How many ApiKeys in the namespace are older than this one (by creation,
    /// then name); only asked when a policy limits the count.
    pub rank: &'a dyn Fn() -> usize,
    /// The current time, for cron schedules.
    pub now: Timestamp,
    /// The key's use, for `lifetime.maxUnused`; `None` where it is not known
    /// (admission, the policy's own status): the rule is not judged there.
    pub activity: Option<Activity>,
}

/// What the key database says of an ApiKey's use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// When the ApiKey was created.
    pub created: Timestamp,
    /// The latest use of any of its keys, by any verifier.
    pub last_used: Option<Timestamp>,
    /// Since when verifiers have reported usage without a gap; `None` while
    /// none reports (a verifier outage, last-used writes disabled).
    pub recorded_since: Option<Timestamp>,
}

/// Checks `spec` against every policy that selects its namespace. With
/// `require_policy`, a namespace that no policy selects forbids every key.
pub fn evaluate(
    policies: &[CompiledPolicy],
    spec: &ApiKeySpec,
    key: &KeyContext<'_>,
    require_policy: bool,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut recheck_at = None;
    for policy in policies.iter().filter(|p| p.selects(key.namespace_labels)) {
        verdict.governing.push(policy.name.clone());
        // A policy the operator cannot read stops new keys and rotations, but
        // never takes a working key away, whatever its onViolation says: the
        // defect may be the operator's, not the key's.
        let action = match policy.defect {
            Some(_) => ViolationAction::Keep,
            None => policy.spec.on_violation,
        };
        let mut broken = |rule: &'static str, message: String| {
            verdict.violations.push(Violation {
                policy: Some(policy.name.clone()),
                rule,
                message,
                action,
            });
        };
        if let Some(defect) = &policy.defect {
            broken(
                "spec",
                format!(
                    "the policy cannot be applied ({defect}); until it is fixed, no key is issued or rotated in the namespaces it selects, and working keys keep working"
                ),
            );
            continue;
        }
        check_team(policy, spec, key, &mut broken);
        if let Some(rule) = &policy.spec.scopes {
            let forbidden: Vec<&str> = spec
                .scopes
                .iter()
                .filter(|s| !scope_allowed(s, &rule.allowed))
                .map(String::as_str)
                .collect();
            if !forbidden.is_empty() {
                broken(
                    "scopes",
                    format!(
                        "scopes [{}] are not allowed; allowed: [{}]",
                        forbidden.join(", "),
                        rule.allowed.join(", ")
                    ),
                );
            }
        }
        if let (Some(pattern), Some(rule)) = (&policy.owner, &policy.spec.owner)
            && !pattern.is_match(&spec.owner)
        {
            broken(
                "owner",
                format!("owner {:?} does not match {:?}", spec.owner, rule.pattern),
            );
        }
        check_lifetime(policy, spec, key.now, &mut broken);
        if let (Some(max), Some(activity)) = (policy.max_unused, key.activity) {
            let limit = text(&policy.spec.lifetime, |l| &l.max_unused);
            let recheck = check_unused(max, &limit, &activity, key.now, &mut broken);
            recheck_at = [recheck_at, recheck].into_iter().flatten().min();
        }
        if let Some(max) = policy.spec.max_keys_per_namespace {
            let rank = (key.rank)();
            if rank >= usize::try_from(max).unwrap_or(0) {
                broken(
                    "maxKeysPerNamespace",
                    format!(
                        "namespace {} may hold {max} ApiKeys with working keys and {rank} come before this one; it waits for a place",
                        key.namespace
                    ),
                );
            }
        }
    }
    verdict.recheck_at = recheck_at;
    if require_policy && verdict.governing.is_empty() {
        verdict.violations.push(Violation {
            policy: None,
            rule: REQUIRE_POLICY_RULE,
            message: format!(
                "no ApiKeyPolicy selects namespace {} and the operator runs with --require-policy",
                key.namespace
            ),
            action: ViolationAction::Keep,
        });
    }
    verdict
}

fn check_team(
    policy: &CompiledPolicy,
    spec: &ApiKeySpec,
    key: &KeyContext<'_>,
    broken: &mut impl FnMut(&'static str, String),
) {
    let Some(rule) = &policy.spec.teams else {
        return;
    };
    let listed = rule.allowed.iter().flatten().any(|t| *t == spec.team);
    let from_label = rule
        .from_namespace_label
        .as_ref()
        .and_then(|label| key.namespace_labels.get(label));
    if listed || from_label == Some(&spec.team) {
        return;
    }
    let mut allowed: Vec<String> = rule.allowed.clone().unwrap_or_default();
    if let Some(label) = &rule.from_namespace_label {
        allowed.push(match from_label {
            Some(value) => value.clone(),
            None => format!("(namespace label {label} is not set)"),
        });
    }
    broken(
        "teams",
        format!(
            "team {:?} is not allowed in namespace {}; allowed: [{}]",
            spec.team,
            key.namespace,
            allowed.join(", ")
        ),
    );
}

fn check_lifetime(
    policy: &CompiledPolicy,
    spec: &ApiKeySpec,
    now: Timestamp,
    broken: &mut impl FnMut(&'static str, String),
) {
    let rotation = spec.rotation.clone().unwrap_or_default();
    if let Some(max) = policy.max_expires_after {
        let expires_after = spec.expires_after.as_deref().map(parse_duration);
        let within = matches!(expires_after, Some(Ok(d)) if d <= max);
        if !within {
            let limit = text(&policy.spec.lifetime, |l| &l.max_expires_after);
            broken(
                "lifetime.maxExpiresAfter",
                match &spec.expires_after {
                    Some(set) => format!("expiresAfter {set} is longer than {limit}"),
                    None => format!("expiresAfter must be set, at most {limit}"),
                },
            );
        }
    }
    if let Some(max) = policy.max_rotation_interval {
        let limit = text(&policy.spec.lifetime, |l| &l.max_rotation_interval);
        match rotation.schedule.as_deref() {
            None => broken(
                "lifetime.maxRotationInterval",
                format!("rotation.schedule must be set, rotating at least every {limit}"),
            ),
            Some(schedule) => {
                let within = Schedule::parse(schedule, rotation.time_zone.as_deref())
                    .is_ok_and(|s| s.rotates_within(max, now));
                if !within {
                    broken(
                        "lifetime.maxRotationInterval",
                        format!(
                            "rotation.schedule {schedule:?} does not rotate at least every {limit}"
                        ),
                    );
                }
            }
        }
    }
    if let Some(max) = policy.max_grace_period {
        let grace = rotation
            .grace_period
            .as_deref()
            .unwrap_or(DEFAULT_GRACE_PERIOD);
        if !parse_duration(grace).is_ok_and(|d| d <= max) {
            let limit = text(&policy.spec.lifetime, |l| &l.max_grace_period);
            broken(
                "lifetime.maxGracePeriod",
                format!("rotation.gracePeriod {grace} is longer than {limit}"),
            );
        }
    }
}

/// `lifetime.maxUnused`: a key older than `max` that no client used within it
/// breaks the rule, judged only while verifiers have reported usage for the
/// whole window. Returns when the judgement may change with time alone.
fn check_unused(
    max: SignedDuration,
    limit: &str,
    activity: &Activity,
    now: Timestamp,
    broken: &mut impl FnMut(&'static str, String),
) -> Option<Timestamp> {
    let horizon = now - max;
    let Some(recorded_since) = activity.recorded_since else {
        // Nothing reports: no data is not "unused". A report wakes the key
        // through the usage scan.
        return None;
    };
    let quiet_since = activity
        .created
        .max(recorded_since)
        .max(activity.last_used.unwrap_or(activity.created));
    if quiet_since > horizon {
        return Some(quiet_since + max);
    }
    broken(
        "lifetime.maxUnused",
        match activity.last_used {
            None => format!("the key was never used, and is older than maxUnused {limit}"),
            Some(at) => format!("the key was not used since {at}, longer than maxUnused {limit}"),
        },
    );
    None
}

/// A lifetime field's text as the policy wrote it.
fn text(
    lifetime: &Option<super::crd::LifetimeRule>,
    field: impl Fn(&super::crd::LifetimeRule) -> &Option<String>,
) -> String {
    lifetime
        .as_ref()
        .and_then(|l| field(l).clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;
    use crate::{
        crd::RotationSpec,
        policy::crd::{LifetimeRule, OwnerRule, ScopeRule, TeamRule},
    };

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn spec() -> ApiKeySpec {
        ApiKeySpec {
            owner: "alice@example.com".into(),
            team: "payments".into(),
            scopes: vec!["inference".into(), "models:read".into()],
            secret_name: None,
            description: None,
            rotation: Some(RotationSpec {
                schedule: Some("@every 720h".into()),
                time_zone: None,
                grace_period: None,
            }),
            expires_after: Some("2160h".into()),
            rollout: None,
        }
    }

    fn policy(name: &str, edit: impl FnOnce(&mut ApiKeyPolicySpec)) -> CompiledPolicy {
        let mut spec = ApiKeyPolicySpec {
            namespace_selector: LabelSelector::default(),
            teams: None,
            scopes: None,
            owner: None,
            lifetime: None,
            max_keys_per_namespace: None,
            on_violation: ViolationAction::Keep,
        };
        edit(&mut spec);
        CompiledPolicy::new(&ApiKeyPolicy::new(name, spec))
    }

    fn check(policies: &[CompiledPolicy], spec: &ApiKeySpec, ns: &[(&str, &str)]) -> Verdict {
        check_ranked(policies, spec, ns, 0, false)
    }

    fn check_ranked(
        policies: &[CompiledPolicy],
        spec: &ApiKeySpec,
        ns: &[(&str, &str)],
        rank: usize,
        require_policy: bool,
    ) -> Verdict {
        let labels = labels(ns);
        let rank = move || rank;
        let context = KeyContext {
            namespace: "team-a",
            namespace_labels: &labels,
            rank: &rank,
            now: now(),
            activity: None,
        };
        evaluate(policies, spec, &context, require_policy)
    }

    fn rules(verdict: &Verdict) -> Vec<&'static str> {
        verdict.violations.iter().map(|v| v.rule).collect()
    }

    #[test]
    fn no_policy_allows_and_require_policy_forbids() {
        let verdict = check(&[], &spec(), &[]);
        assert!(verdict.allowed() && verdict.governing.is_empty());
        let strict = check_ranked(&[], &spec(), &[], 0, true);
        assert_eq!(rules(&strict), vec![REQUIRE_POLICY_RULE]);
        assert!(strict.message().contains("--require-policy"));
    }

    #[test]
    fn teams_come_from_the_list_or_the_namespace_label() {
        let listed = policy("listed", |s| {
            s.teams = Some(TeamRule {
                allowed: Some(vec!["search".into()]),
                from_namespace_label: Some("keyward.dev/team".into()),
            });
        });
        let mut key = spec();
        assert!(
            check(
                std::slice::from_ref(&listed),
                &key,
                &[("keyward.dev/team", "payments")]
            )
            .allowed()
        );
        key.team = "search".into();
        assert!(check(std::slice::from_ref(&listed), &key, &[]).allowed());
        key.team = "admin".into();
        let verdict = check(&[listed], &key, &[("keyward.dev/team", "payments")]);
        assert_eq!(rules(&verdict), vec!["teams"]);
        assert_eq!(
            verdict.message(),
            "ApiKeyPolicy listed rule teams: team \"admin\" is not allowed in namespace team-a; allowed: [search, payments]"
        );
    }

    #[test]
    fn scope_wildcards_match_prefixes_only_at_the_end() {
        let allowed = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(scope_allowed("models:read", &allowed(&["models:*"])));
        assert!(scope_allowed("anything", &allowed(&["*"])));
        assert!(scope_allowed("inference", &allowed(&["inference"])));
        assert!(!scope_allowed("inference.admin", &allowed(&["inference"])));
        assert!(!scope_allowed(
            "admin",
            &allowed(&["models:*", "inference"])
        ));
        let p = policy("scopes", |s| {
            s.scopes = Some(ScopeRule {
                allowed: vec!["inference".into(), "models:*".into()],
            });
        });
        assert!(check(std::slice::from_ref(&p), &spec(), &[]).allowed());
        let mut key = spec();
        key.scopes.push("admin".into());
        let verdict = check(&[p], &key, &[]);
        assert_eq!(rules(&verdict), vec!["scopes"]);
        assert!(verdict.message().contains("scopes [admin] are not allowed"));
    }

    #[test]
    fn owner_patterns_match_the_whole_owner() {
        let p = policy("owners", |s| {
            s.owner = Some(OwnerRule {
                pattern: r".+@example\.com".into(),
            });
        });
        assert!(check(std::slice::from_ref(&p), &spec(), &[]).allowed());
        let mut key = spec();
        key.owner = "alice@example.com.evil.io".into();
        assert_eq!(
            rules(&check(std::slice::from_ref(&p), &key, &[])),
            vec!["owner"]
        );
        key.owner = "svc-bot".into();
        assert_eq!(rules(&check(&[p], &key, &[])), vec!["owner"]);
    }

    #[test]
    fn owner_patterns_are_read_as_go_reads_them() {
        let p = policy("quoted", |s| {
            s.owner = Some(OwnerRule {
                pattern: r"\Qalice@example.com\E".into(),
            });
        });
        assert_eq!(p.defect, None);
        assert!(check(std::slice::from_ref(&p), &spec(), &[]).allowed());
        let mut key = spec();
        key.owner = "alicexexample.com".into();
        assert_eq!(rules(&check(&[p], &key, &[])), vec!["owner"]);
    }

    #[test]
    fn a_pattern_too_large_to_compile_fails_closed() {
        // Go accepts it; `regex` compiles \pL into ~40 KiB, a thousand times over.
        let p = policy("huge", |s| {
            s.owner = Some(OwnerRule {
                pattern: r"\pL{1000}".into(),
            });
        });
        assert!(
            p.defect.as_ref().is_some_and(|d| d.contains("size limit")),
            "{:?}",
            p.defect
        );
    }

    #[test]
    fn lifetimes_bound_expiry_rotation_and_grace() {
        let p = policy("lifetime", |s| {
            s.lifetime = Some(LifetimeRule {
                max_expires_after: Some("2160h".into()),
                max_rotation_interval: Some("744h".into()),
                max_grace_period: Some("30m".into()),
                max_unused: None,
            });
        });
        // The default grace period (1h) is longer than 30m.
        assert_eq!(
            rules(&check(std::slice::from_ref(&p), &spec(), &[])),
            vec!["lifetime.maxGracePeriod"]
        );
        let mut key = spec();
        key.rotation.as_mut().unwrap().grace_period = Some("15m".into());
        assert!(check(std::slice::from_ref(&p), &key, &[]).allowed());
        for schedule in ["@monthly", "0 3 * * 1", "0 0 1,15 * *", "@every 744h"] {
            key.rotation.as_mut().unwrap().schedule = Some(schedule.into());
            assert!(
                check(std::slice::from_ref(&p), &key, &[]).allowed(),
                "{schedule}"
            );
        }
        for schedule in ["@yearly", "0 0 1 1,6 *", "@every 745h"] {
            key.rotation.as_mut().unwrap().schedule = Some(schedule.into());
            assert_eq!(
                rules(&check(std::slice::from_ref(&p), &key, &[])),
                vec!["lifetime.maxRotationInterval"],
                "{schedule}"
            );
        }
        key.rotation.as_mut().unwrap().schedule = None;
        key.expires_after = None;
        let verdict = check(std::slice::from_ref(&p), &key, &[]);
        assert_eq!(
            rules(&verdict),
            vec!["lifetime.maxExpiresAfter", "lifetime.maxRotationInterval"]
        );
        assert!(
            verdict
                .message()
                .contains("expiresAfter must be set, at most 2160h")
        );
        key.expires_after = Some("2161h".into());
        assert!(
            check(&[p], &key, &[])
                .message()
                .contains("expiresAfter 2161h is longer than 2160h")
        );
    }

    #[test]
    fn every_selecting_policy_must_allow_and_the_strictest_action_wins() {
        let prod = LabelSelector {
            match_labels: Some(labels(&[("tier", "prod")])),
            ..LabelSelector::default()
        };
        let teams = policy("teams", |s| {
            s.teams = Some(TeamRule {
                allowed: Some(vec!["search".into()]),
                from_namespace_label: None,
            });
        });
        let prod_scopes = policy("prod-scopes", |s| {
            s.namespace_selector = prod.clone();
            s.scopes = Some(ScopeRule {
                allowed: vec!["metrics".into()],
            });
            s.on_violation = ViolationAction::Revoke;
        });
        let both = [teams, prod_scopes];
        let dev = check(&both, &spec(), &[("tier", "dev")]);
        assert_eq!(dev.governing, vec!["teams"]);
        assert_eq!(rules(&dev), vec!["teams"]);
        assert_eq!(dev.action(), Some(ViolationAction::Keep));
        let prod = check(&both, &spec(), &[("tier", "prod")]);
        assert_eq!(prod.governing, vec!["teams", "prod-scopes"]);
        assert_eq!(rules(&prod), vec!["teams", "scopes"]);
        assert_eq!(prod.action(), Some(ViolationAction::Revoke));
    }

    #[test]
    fn selectors_follow_the_api_server() {
        let requirement = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        };
        let selector = LabelSelector {
            match_labels: Some(labels(&[("env", "prod")])),
            match_expressions: Some(vec![
                requirement("team", "In", &["a", "b"]),
                requirement("frozen", "DoesNotExist", &[]),
                requirement("tier", "NotIn", &["test"]),
                requirement("owner", "Exists", &[]),
            ]),
        };
        let ok = labels(&[("env", "prod"), ("team", "a"), ("owner", "x")]);
        assert_eq!(selects(&selector, &ok), Ok(true));
        for (key, value) in [
            ("team", "c"),
            ("frozen", "yes"),
            ("tier", "test"),
            ("env", "dev"),
        ] {
            let mut changed = ok.clone();
            changed.insert(key.into(), value.into());
            assert_eq!(selects(&selector, &changed), Ok(false), "{key}={value}");
        }
        let bad = LabelSelector {
            match_expressions: Some(vec![requirement("team", "Matches", &["a"])]),
            ..LabelSelector::default()
        };
        assert!(selects(&bad, &ok).is_err());
    }

    #[test]
    fn a_policy_that_cannot_be_read_stops_new_keys_but_never_revokes() {
        let broken = policy("broken", |s| {
            s.owner = Some(OwnerRule {
                pattern: "(unclosed".into(),
            });
            s.on_violation = ViolationAction::Revoke;
        });
        assert!(broken.defect.is_some());
        let verdict = check(&[broken], &spec(), &[]);
        assert_eq!(rules(&verdict), vec!["spec"]);
        // Forbidden (no issue, no rotation), but as Keep whatever onViolation says.
        assert_eq!(verdict.action(), Some(ViolationAction::Keep));
        assert!(verdict.message().contains("working keys keep working"));
    }

    #[test]
    fn the_count_limit_spares_the_oldest_keys() {
        let p = policy("count", |s| s.max_keys_per_namespace = Some(2));
        assert!(check_ranked(std::slice::from_ref(&p), &spec(), &[], 1, false).allowed());
        let third = check_ranked(&[p], &spec(), &[], 2, false);
        assert_eq!(rules(&third), vec!["maxKeysPerNamespace"]);
        assert!(
            third
                .message()
                .contains("may hold 2 ApiKeys with working keys and 2 come before this one")
        );
    }
}
