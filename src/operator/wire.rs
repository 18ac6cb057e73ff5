//! ApiKeys as the operator's watch decodes them: once, not three times.
//!
//! kube's `DeserializeGuard` keeps a watch going through an ApiKey the Rust
//! types cannot read (its metadata still reaches the reconciler, which says
//! what is wrong with it). It does so by decoding every object into a generic
//! value tree, cloning the tree and decoding the clone, which at start-up was
//! most of the first LIST's cost. [`WireApiKey`] keeps the object's JSON text
//! unparsed, decodes the ApiKey from it once, and reads only the metadata from
//! it when that fails: the same result, the same `DeserializeGuard`.

use std::borrow::Cow;

use kube::{
    Resource,
    core::{DeserializeGuard, PartialObjectMeta, error_boundary::InvalidObject},
    runtime::watcher,
};
use serde::{Deserialize, de::Error as _};
use serde_json::value::RawValue;

use crate::crd::ApiKey;

/// An ApiKey off the wire: the decoded ApiKey, or its metadata and why it
/// could not be decoded, as [`guard_event`](Self::guard_event) hands it on.
#[derive(Clone, Debug)]
pub struct WireApiKey(DeserializeGuard<ApiKey>);

impl WireApiKey {
    /// The same watch event, holding the `DeserializeGuard` the rest of the
    /// operator works with.
    pub fn guard_event(event: watcher::Event<Self>) -> watcher::Event<DeserializeGuard<ApiKey>> {
        match event {
            watcher::Event::Apply(key) => watcher::Event::Apply(key.0),
            watcher::Event::Delete(key) => watcher::Event::Delete(key.0),
            watcher::Event::InitApply(key) => watcher::Event::InitApply(key.0),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
        }
    }
}

impl<'de> Deserialize<'de> for WireApiKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Box::<RawValue>::deserialize(deserializer)?;
        let guard = match serde_json::from_str::<ApiKey>(text.get()) {
            Ok(key) => Ok(key),
            Err(error) => {
                let PartialObjectMeta { metadata, .. } =
                    serde_json::from_str::<PartialObjectMeta<ApiKey>>(text.get())
                        .map_err(D::Error::custom)?;
                Err(InvalidObject {
                    error: error.to_string(),
                    metadata,
                })
            }
        };
        Ok(WireApiKey(DeserializeGuard(guard)))
    }
}

impl Resource for WireApiKey {
    type DynamicType = ();
    type Scope = <ApiKey as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        ApiKey::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        ApiKey::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        ApiKey::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        ApiKey::plural(dt)
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        self.0.meta()
    }

    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        self.0.meta_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `DeserializeGuard` makes of the same text, for comparison.
    fn guarded(value: &serde_json::Value) -> DeserializeGuard<ApiKey> {
        serde_json::from_value(value.clone()).unwrap()
    }

    fn wire(value: &serde_json::Value) -> DeserializeGuard<ApiKey> {
        serde_json::from_str::<WireApiKey>(&value.to_string())
            .unwrap()
            .0
    }

    #[test]
    fn a_valid_apikey_decodes_as_deserialize_guard_decodes_it() {
        let value = json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "a", "namespace": "n", "uid": "u", "resourceVersion": "7"},
            "spec": {"owner": "o@example.com", "team": "ml", "scopes": ["inference"]},
            "status": {"keyId": "kid_1", "revision": 2},
        });
        let (wire, guarded) = (wire(&value), guarded(&value));
        let key = wire.0.expect("valid");
        assert_eq!(
            serde_json::to_value(&key).unwrap(),
            serde_json::to_value(guarded.0.unwrap()).unwrap()
        );
        assert_eq!(key.metadata.name.as_deref(), Some("a"));
    }

    #[test]
    fn an_unreadable_apikey_keeps_its_metadata_and_says_why() {
        let value = json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "b", "namespace": "n", "uid": "u"},
            "spec": {"owner": 5, "team": "ml", "scopes": "inference"},
        });
        let (wire, guarded) = (wire(&value), guarded(&value));
        let (wire, guarded) = (wire.0.unwrap_err(), guarded.0.unwrap_err());
        assert_eq!(wire.metadata, guarded.metadata);
        assert_eq!(wire.metadata.name.as_deref(), Some("b"));
        assert!(wire.error.contains("invalid type"), "{}", wire.error);
    }

    #[test]
    fn an_object_without_readable_metadata_is_an_error() {
        assert!(serde_json::from_str::<WireApiKey>(r#"{"metadata": 5}"#).is_err());
        assert!(serde_json::from_str::<WireApiKey>("[1, 2]").is_err());
    }
}
