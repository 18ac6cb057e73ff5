//! The `ApiKey` custom resource. crds/apikey.yaml is generated from these types
//! (`keyward crd`), and tests/crd.rs fails when the two drift apart.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The finalizer that holds an ApiKey until its keys are revoked in the database.
pub const FINALIZER: &str = "keyward.dev/revoke";
/// The one field manager for every server-side apply keyward makes.
pub const FIELD_MANAGER: &str = "keyward";
/// The Secret data key that holds the plaintext API key.
pub const SECRET_DATA_KEY: &str = "api-key";
/// The Secret annotation naming the key id it holds.
pub const KEY_ID_ANNOTATION: &str = "keyward.dev/key-id";
/// The label on every Secret keyward writes; the Secret watch selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "keyward";
/// The condition type that says whether the key is usable.
pub const READY: &str = "Ready";
/// The condition type that says whether every ApiKeyPolicy allows the key.
pub const POLICY_COMPLIANT: &str = "PolicyCompliant";
/// Annotation on an ApiKey: a new value requests one rotation.
pub const ROTATE_ANNOTATION: &str = "keyward.dev/rotate";
/// Annotation on an ApiKey: the next new rotate request revokes the previous keys at
/// once. keyward removes it when that emergency rotation is done.
pub const REVOKE_PREVIOUS_ANNOTATION: &str = "keyward.dev/revoke-previous";
/// The condition type that says whether clients still present the previous key
/// in its grace period (they break when it ends).
pub const PREVIOUS_KEY_IN_USE: &str = "PreviousKeyInUse";
/// Grace period of a rotated-out key when `spec.rotation.gracePeriod` is not set.
pub const DEFAULT_GRACE_PERIOD: &str = "1h";

/// The key to issue: who owns it, what it may do, and which Secret receives it.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    doc = "An API key for one owner and team with a set of scopes. keyward issues a random key, stores only its SHA-256 hash in the key database and writes the key into a Secret in the same namespace. Deleting the ApiKey revokes the key.",
    plural = "apikeys",
    singular = "apikey",
    namespaced,
    shortname = "ak",
    shortname = "apikey",
    category = "keyward",
    status = "ApiKeyStatus",
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"Team","type":"string","jsonPath":".spec.team"}"#,
    printcolumn = r#"{"name":"Scopes","type":"string","jsonPath":".spec.scopes"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.keyHint"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Next-Rotation","type":"string","jsonPath":".status.nextRotationAt"}"#,
    printcolumn = r#"{"name":"Last-Used","type":"date","jsonPath":".status.lastUsedAt","priority":1}"#,
    printcolumn = r#"{"name":"Requests-24h","type":"integer","jsonPath":".status.usage.last24h","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.secretName) == has(oldSelf.secretName)",
        "message": "secretName cannot be added or removed after creation; create a new ApiKey instead"
    }
]))]
pub struct ApiKeySpec {
    /// Who is accountable for the key: a user or a service, e.g. `alice@example.com`.
    #[schemars(length(min = 1, max = 253))]
    pub owner: String,

    /// The team that owns the key, as a DNS label (lower-case letters, digits and '-'), e.g. `ml-platform`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub team: String,

    /// What the key may do: 1 to 32 unique scopes, each matching `^[a-z][a-z0-9._:-]{0,62}$`, e.g. `inference` or `models:read`.
    #[schemars(
        length(min = 1, max = 32),
        inner(regex(pattern = r"^[a-z][a-z0-9._:-]{0,62}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub scopes: Vec<String>,

    /// Name of the Secret in this namespace that receives the key (data key `api-key`). Defaults to the ApiKey's name. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        extend("x-kubernetes-validations" = [
            {"rule": "self == oldSelf", "message": "secretName is immutable; create a new ApiKey instead"}
        ])
    )]
    pub secret_name: Option<String>,

    /// Free text for people: what the key is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Automatic rotation. Without it keys rotate only on request (annotation `keyward.dev/rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,

    /// How long each key stays valid after it is issued, e.g. `2160h`. Rotation starts a new period. Unset means no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')",
         "message": "expiresAfter must be a positive duration such as 720h, 90m or 1h30m"}
    ]))]
    pub expires_after: Option<String>,

    /// Workloads to restart when the key changes after a rotation or re-issue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// When and how keys rotate.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// When to rotate: 5 cron fields (`0 3 * * 1`), a macro (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`) or `@every <duration>` (`@every 720h`). Unset means rotation only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^(@(hourly|daily|weekly|monthly|yearly|annually)|@every ([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+|[0-9A-Za-z*/,?#-]+( +[0-9A-Za-z*/,?#-]+){4})$')",
         "message": "schedule must be 5 cron fields (minute hour day-of-month month day-of-week), @hourly, @daily, @weekly, @monthly, @yearly or @every <duration> such as @every 720h"},
        {"rule": "!self.startsWith('@every ') || duration(self.substring(7)) >= duration('1s')",
         "message": "the @every interval must be at least 1s"},
        {"rule": cron_fields_rule(),
         "message": "a cron field is out of range: minute 0-59, hour 0-23, day of month 1-31 (or L, ?, 15W), month 1-12 or JAN-DEC, day of week 0-7 or SUN-SAT (or ?, 5L, 1#2)"}
    ]))]
    pub schedule: Option<String>,

    /// IANA time zone the cron fields are read in, e.g. `Europe/Berlin`. Defaults to UTC. `@every` ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [
        {"rule": "timestamp('2000-01-01T00:00:00Z').getHours(self) >= 0",
         "message": "timeZone must be an IANA time zone name such as Europe/Berlin or UTC"}
    ]))]
    pub time_zone: Option<String>,

    /// How long the previous key keeps working after a rotation, e.g. `1h` (the default) or `30m`. `0s` revokes it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) >= duration('0s')",
         "message": "gracePeriod must be a non-negative duration such as 1h, 30m or 90s"}
    ]))]
    pub grace_period: Option<String>,
}

/// The CEL rule that checks each of the 5 cron fields against its range, so
/// `61 * * * *` fails at admission rather than later as `InvalidSpec`. Macros
/// and `@every` start with `@` and are checked by the other rules.
fn cron_fields_rule() -> String {
    /// A comma list of items: `*`, a value or a range, with an optional `/step`, or an extra form.
    fn field(value: &str, extra: &[&str]) -> String {
        let mut items = vec![format!("([*]|{value}(-{value})?)(/[0-9]{{1,2}})?")];
        items.extend(extra.iter().map(|e| e.replace("V", value)));
        let item = format!("({})", items.join("|"));
        format!("{item}(,{item})*")
    }
    let minute = field("[0-5]?[0-9]", &[]);
    let hour = field("(1?[0-9]|2[0-3])", &[]);
    let day = field("(0?[1-9]|[12][0-9]|3[01])", &["[?]", "L", "VW"]);
    let month = field(
        "(0?[1-9]|1[0-2]|jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)",
        &[],
    );
    let weekday = field(
        "([0-7]|sun|mon|tue|wed|thu|fri|sat)",
        &["[?]", "VL", "V#[1-5]"],
    );
    let fields = [minute, hour, day, month, weekday].join(" +");
    format!("self.startsWith('@') || self.matches('(?i)^{fields}$')")
}

/// Workloads that read the key and need a restart to pick up a new one.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Deployments, StatefulSets and DaemonSets in this namespace; each gets one rolling restart per new key.
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["kind", "name"]))]
    pub targets: Vec<RolloutTarget>,
}

/// One workload to restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTarget {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: RolloutKind,
    /// Name of the workload in the ApiKey's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kinds of workload keyward can restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutKind {
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
}

#[cfg(test)]
impl ApiKeySpec {
    /// The spec unit tests start from: alice's `inference` key for team `ml`.
    pub(crate) fn example() -> Self {
        Self {
            owner: "alice@example.com".into(),
            team: "ml".into(),
            scopes: vec!["inference".into()],
            secret_name: None,
            description: None,
            rotation: None,
            expires_after: None,
            rollout: None,
        }
    }
}

/// What keyward last observed and did for this ApiKey. It never holds the key itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// Standard conditions. `Ready` is True when the Secret holds an active key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Public id of the current key, as in the key database and the Secret's `keyward.dev/key-id` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,

    /// The first characters of the current key (prefix and four more), safe to show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hint: Option<String>,

    /// The Secret that holds the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// When the current key became active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,

    /// How many keys have been issued (activated) for this ApiKey so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,

    /// When a rotation (scheduled or requested) last put a new key in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated_at: Option<Time>,

    /// When the schedule rotates the key next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,

    /// When the last previous key still in its grace period stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_expires_at: Option<Time>,

    /// When the current key stops working (from spec.expiresAfter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// The target Secret's resourceVersion when keyward last read or wrote the key in it. While the Secret keeps this version it still holds `keyId`, so it is not read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_resource_version: Option<String>,

    /// The last `keyward.dev/rotate` annotation value that has been handled; the same value never rotates twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_request: Option<String>,

    /// When a verifier last saw any key of this ApiKey (minute resolution). Updated at most once an hour, so a busy fleet does not flood the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,

    /// The last `keyward.dev/rotate` value handled as an emergency (with `keyward.dev/revoke-previous`): every older key was revoked at once, with no grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_emergency_request: Option<String>,

    /// The ApiKeyPolicies this key breaks, by name, while its `PolicyCompliant` condition is False (`--require-policy` when no policy selects the namespace and the operator requires one). Read this, not the condition's message, which quotes the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violated_policies: Vec<String>,

    /// How much this ApiKey's keys were presented to verifiers, counted per UTC hour. Rewritten at most once an hour. Absent until a verifier first counts a check of one of its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,

    /// When a Warning Event `RevokedKeyInUse` last reported that clients present a revoked key of this ApiKey; reported at most once an hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_key_reported_at: Option<Time>,
}

/// Checks of an ApiKey's keys, from the verifiers' counts in the key database. Requests count every outcome; refused ones are those that lacked a scope or presented a revoked or expired key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// When these figures were computed.
    pub updated_at: Time,

    /// Requests in the 24 hours before `updatedAt` (the current hour included).
    pub last24h: i64,

    /// Requests in the 7 UTC days up to `updatedAt` (the current day included).
    pub last7d: i64,

    /// Refused requests in the 24 hours before `updatedAt`: insufficient scope, revoked or expired keys.
    pub refused_last24h: i64,

    /// Requests per UTC day, 30 days up to the day of `updatedAt`.
    pub daily: UsageSeries,

    /// Requests per UTC hour, 24 hours up to the hour of `updatedAt`.
    pub hourly: UsageSeries,
}

/// Counts per bucket (day or hour), one array per outcome, each as long as the series. An outcome with no request in the whole series is left out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSeries {
    /// The start of the first bucket (UTC); each next bucket starts one day (or hour) later.
    pub start: Time,

    /// Requests the key was good for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid: Vec<i64>,

    /// Requests refused for a missing scope.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insufficient_scope: Vec<i64>,

    /// Requests refused because the key was revoked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<i64>,

    /// Requests refused because the key had expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired: Vec<i64>,
}

impl UsageSeries {
    /// Requests per bucket, every outcome together.
    pub fn totals(&self) -> Vec<i64> {
        let outcomes = [
            &self.valid,
            &self.insufficient_scope,
            &self.revoked,
            &self.expired,
        ];
        let len = outcomes.iter().map(|v| v.len()).max().unwrap_or(0);
        (0..len)
            .map(|i| outcomes.iter().filter_map(|v| v.get(i)).sum())
            .collect()
    }
}

impl ApiKeyStatus {
    /// The Ready condition, if there is one.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.condition(READY)
    }

    /// The condition of this type, if there is one.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

impl ApiKey {
    /// The Secret name: `spec.secretName`, or the ApiKey's own name.
    pub fn target_secret_name(&self) -> Option<&str> {
        self.spec
            .secret_name
            .as_deref()
            .or(self.metadata.name.as_deref())
    }

    /// The Ready condition, if status has one.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status.as_ref()?.ready_condition()
    }
}

/// The CRD manifest as YAML: exactly the bytes of crds/apikey.yaml.
pub fn crd_yaml() -> String {
    generated_yaml(&ApiKey::crd())
}

/// The ApiKeyPolicy CRD as YAML: exactly the bytes of crds/apikeypolicy.yaml.
pub fn policy_crd_yaml() -> String {
    generated_yaml(&crate::policy::ApiKeyPolicy::crd())
}

/// Every CRD keyward installs.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![ApiKey::crd(), crate::policy::ApiKeyPolicy::crd()]
}

fn generated_yaml(crd: &impl Serialize) -> String {
    let yaml = serde_yaml::to_string(crd).expect("the CRD always serializes");
    format!("# Generated by `keyward crd` from the Rust types. Do not edit.\n---\n{yaml}")
}
