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
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
    }
}

/// The CRD manifest as YAML: exactly the bytes of crds/apikey.yaml.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml::to_string(&ApiKey::crd()).expect("the CRD always serializes");
    format!("# Generated by `keyward crd` from src/crd.rs. Do not edit.\n---\n{yaml}")
}
