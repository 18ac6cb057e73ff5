//! The `ApiKeyPolicy` custom resource: which teams, scopes, owners and lifetimes
//! ApiKeys in the namespaces it selects may claim. crds/apikeypolicy.yaml is
//! generated from these types, and tests/crd.rs fails when the two drift apart.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go-style duration, as `duration()` in CEL reads it.
const DURATION_RULE: &str =
    "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) >= duration('0s')";

/// Rules for the ApiKeys in the namespaces this policy selects.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "ApiKeyPolicy",
    doc = "Which teams, scopes, owners and lifetimes the ApiKeys in the selected namespaces may have. When several policies select a namespace, every one of them must allow a key. A ValidatingAdmissionPolicy rejects a forbidden ApiKey at admission, and the operator never issues or rotates one.",
    plural = "apikeypolicies",
    singular = "apikeypolicy",
    shortname = "akp",
    category = "keyward",
    status = "ApiKeyPolicyStatus",
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.namespaces"}"#,
    printcolumn = r#"{"name":"Teams","type":"string","jsonPath":".status.teams"}"#,
    printcolumn = r#"{"name":"Scopes","type":"string","jsonPath":".spec.scopes.allowed"}"#,
    printcolumn = r#"{"name":"Keys","type":"integer","jsonPath":".status.governedKeys"}"#,
    printcolumn = r#"{"name":"Violations","type":"integer","jsonPath":".status.violatingKeys"}"#,
    printcolumn = r#"{"name":"On-Violation","type":"string","jsonPath":".spec.onViolation","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyPolicySpec {
    /// The namespaces this policy governs, by label. `{}` selects every namespace; use the `kubernetes.io/metadata.name` label to pick namespaces by name.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn'] ? (has(e.values) && size(e.values) > 0) : (e.operator in ['Exists', 'DoesNotExist'] && (!has(e.values) || size(e.values) == 0)))",
         "message": "each matchExpressions entry needs operator In or NotIn with values, or Exists or DoesNotExist without values"}
    ]))]
    pub namespace_selector: LabelSelector,

    /// Which teams keys may name (`spec.team`). Unset allows any team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teams: Option<TeamRule>,

    /// Which scopes keys may carry (`spec.scopes`). Unset allows any scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<ScopeRule>,

    /// Who may own keys (`spec.owner`). Unset allows any owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerRule>,

    /// Limits on how long keys live and how often they rotate. Unset sets no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<LifetimeRule>,

    /// The most ApiKeys one selected namespace may hold; the oldest keep their keys and newer ones are refused. Unset sets no limit. Enforced by the operator only (admission cannot count objects); a ResourceQuota on `count/apikeys.keyward.dev` rejects them at admission too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_keys_per_namespace: Option<i32>,

    /// What happens to a key issued before this policy forbade it: `Keep` (the default) leaves it working until it expires and issues no new key for it, `RefuseRotation` lets it work until its next rotation is due and then revokes it, `Revoke` revokes it at once. Every mode flags the key (condition `PolicyCompliant=False`, a Warning Event, a metric). A key never issued is never issued while forbidden.
    #[serde(default)]
    pub on_violation: ViolationAction,
}

/// The teams a key may name: the listed ones, plus the value of a namespace label.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.allowed) || has(self.fromNamespaceLabel)",
     "message": "teams needs allowed, fromNamespaceLabel or both"}
]))]
pub struct TeamRule {
    /// Team names keys may use, e.g. `[payments, search]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 63)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub allowed: Option<Vec<String>>,

    /// A namespace label whose value is also an allowed team, e.g. `keyward.dev/team`: one policy then serves every team namespace. A namespace without the label allows no team through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub from_namespace_label: Option<String>,
}

/// The scopes a key may carry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScopeRule {
    /// Allowed scopes. A name matches itself; a trailing `*` matches every scope that starts with what comes before it (`models:*` allows `models:read`), and `*` alone allows every scope. Every scope of a key must match one entry.
    #[schemars(
        length(max = 256),
        inner(regex(pattern = r"^([a-z][a-z0-9._:-]{0,62}[*]?|[*])$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub allowed: Vec<String>,
}

/// Who may own a key.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRule {
    /// A regular expression (RE2 syntax, as in CEL and Go) that the whole owner must match, e.g. `.+@example\.com` for one e-mail domain.
    #[schemars(
        length(min = 1, max = 256),
        extend("x-kubernetes-validations" = [
            {"rule": "''.matches(self) || !''.matches(self)",
             "message": "pattern must be a valid RE2 regular expression"}
        ])
    )]
    pub pattern: String,
}

/// Lifetime limits.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LifetimeRule {
    /// Every key must set `spec.expiresAfter`, at most this long, e.g. `2160h` (90 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": DURATION_RULE, "message": "maxExpiresAfter must be a duration such as 2160h"}
    ]))]
    pub max_expires_after: Option<String>,

    /// Every key must have `spec.rotation.schedule` and rotate at least this often, e.g. `2160h`. `@every` and the macros are checked at admission; 5-field cron schedules by the operator, over the next 366 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": DURATION_RULE, "message": "maxRotationInterval must be a duration such as 2160h"}
    ]))]
    pub max_rotation_interval: Option<String>,

    /// A rotated-out key may keep working at most this long (`spec.rotation.gracePeriod`, which defaults to 1h), e.g. `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": DURATION_RULE, "message": "maxGracePeriod must be a duration such as 24h"}
    ]))]
    pub max_grace_period: Option<String>,

    /// A key older than this that no client used within it breaks the policy, e.g. `720h` (30 days). Only the operator checks it, from the verifiers' usage records, and only while verifiers have reported usage for the whole window: no data is not "unused". Admission cannot know usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": DURATION_RULE, "message": "maxUnused must be a duration such as 720h"}
    ]))]
    pub max_unused: Option<String>,
}

/// What happens to an issued key that a policy now forbids.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord,
)]
pub enum ViolationAction {
    /// Flag it; it keeps working until it expires, and no new key is issued for it.
    #[default]
    Keep,
    /// Flag it; it works until its next rotation is due, then it is revoked instead of rotated.
    RefuseRotation,
    /// Flag it and revoke it at once.
    Revoke,
}

/// What the operator last found for this policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyPolicyStatus {
    /// `Ready` is False when the policy cannot be applied (e.g. a bad selector or pattern), with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// How many namespaces the selector picks.
    #[serde(default)]
    pub namespaces: i64,

    /// The allowed teams as one line, for `kubectl get`, e.g. `payments,search,ns:keyward.dev/team`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teams: Option<String>,

    /// How many ApiKeys live in the selected namespaces.
    #[serde(default)]
    pub governed_keys: i64,

    /// How many of them this policy forbids.
    #[serde(default)]
    pub violating_keys: i64,

    /// The forbidden ApiKeys, at most 100, with the rule each breaks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub violations: Vec<PolicyViolationEntry>,
}

/// One ApiKey that breaks the policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyViolationEntry {
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub name: String,
    /// The rule it breaks: `teams`, `scopes`, `owner`, `lifetime.maxExpiresAfter`, `lifetime.maxRotationInterval`, `lifetime.maxGracePeriod` or `maxKeysPerNamespace` (`lifetime.maxUnused` is judged per key, in its `PolicyCompliant` condition).
    pub rule: String,
    /// What is wrong, in words.
    pub message: String,
}
