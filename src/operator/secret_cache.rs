//! The operator's cache of its own Secrets, filled by a metadata-only watch.
//! For each Secret it keeps only what decides whether the key in it must be
//! read again: no data, and not even the whole metadata (at 10,000 keys whole
//! metadata was a quarter of the operator's memory).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{api::PartialObjectMeta, runtime::watcher};

use crate::crd::KEY_ID_ANNOTATION;

/// What keyward needs to know about one of its Secrets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretFacts {
    /// `metadata.uid`, for deletes with a uid precondition.
    pub uid: Option<String>,
    /// `metadata.resourceVersion`: unchanged means the key in it is unchanged.
    pub resource_version: Option<String>,
    /// The uid of the controlling owner (an ApiKey), if any.
    pub controller_uid: Option<String>,
    /// The `keyward.dev/key-id` annotation.
    pub key_id: Option<String>,
}

impl SecretFacts {
    /// The facts in a Secret's metadata.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            controller_uid: meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| o.uid.clone()),
            key_id: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(KEY_ID_ANNOTATION))
                .cloned(),
        }
    }

    /// The `keyward.dev/key-id` annotation, if the object with `owner_uid`
    /// controls the Secret.
    pub fn key_id_controlled_by(self, owner_uid: &str) -> Option<String> {
        (self.controller_uid.as_deref() == Some(owner_uid))
            .then_some(self.key_id)
            .flatten()
    }
}

type Entries = HashMap<(String, String), SecretFacts>;

#[derive(Debug, Default)]
struct State {
    entries: Entries,
    /// A (re)list in progress: it replaces `entries` when complete.
    relisting: Option<Entries>,
    /// Set once the first list is complete; a miss before that says nothing.
    synced: bool,
}

/// Shared by the watch task that fills it and the reconciles that read it.
#[derive(Clone, Debug, Default)]
pub struct SecretCache(Arc<RwLock<State>>);

fn id(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

impl SecretCache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one event of the Secret watch.
    pub fn apply(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let mut state = self.write();
        match event {
            watcher::Event::Init => state.relisting = Some(Entries::new()),
            watcher::Event::InitApply(secret) => {
                if let (Some(relisting), Some(id)) = (&mut state.relisting, id(&secret.metadata)) {
                    relisting.insert(id, SecretFacts::of(&secret.metadata));
                }
            }
            watcher::Event::InitDone => {
                if let Some(entries) = state.relisting.take() {
                    state.entries = entries;
                }
                state.synced = true;
            }
            watcher::Event::Apply(secret) => {
                if let Some(id) = id(&secret.metadata) {
                    state.entries.insert(id, SecretFacts::of(&secret.metadata));
                }
            }
            watcher::Event::Delete(secret) => {
                if let Some(id) = id(&secret.metadata) {
                    state.entries.remove(&id);
                }
            }
        }
    }

    /// Whether the first list is complete.
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// `None` before the first list is complete; then the Secret's facts, or
    /// `Some(None)` when keyward has no Secret by that name.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Option<SecretFacts>> {
        let state = self.read();
        state.synced.then(|| {
            state
                .entries
                .get(&(namespace.to_owned(), name.to_owned()))
                .cloned()
        })
    }

    /// The names and uids of the Secrets in `namespace` that the object with
    /// `owner_uid` controls.
    pub fn controlled_by(&self, namespace: &str, owner_uid: &str) -> Vec<(String, String)> {
        self.read()
            .entries
            .iter()
            .filter(|((ns, _), facts)| {
                ns == namespace && facts.controller_uid.as_deref() == Some(owner_uid)
            })
            .filter_map(|((_, name), facts)| Some((name.clone(), facts.uid.clone()?)))
            .collect()
    }

    /// How many Secrets the cache holds.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether the cache holds no Secret.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn secret(name: &str, version: &str, owner: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(version.into()),
                owner_references: Some(vec![OwnerReference {
                    controller: Some(true),
                    uid: owner.into(),
                    ..OwnerReference::default()
                }]),
                annotations: Some([(KEY_ID_ANNOTATION.to_owned(), "kid_1".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    #[test]
    fn a_miss_counts_only_after_the_first_list() {
        let cache = SecretCache::default();
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(secret("a", "1", "owner")));
        assert_eq!(cache.get("ns", "a"), None);
        assert_eq!(cache.get("ns", "b"), None);
        cache.apply(&watcher::Event::InitDone);
        let facts = cache.get("ns", "a").unwrap().unwrap();
        assert_eq!(facts.resource_version.as_deref(), Some("1"));
        assert_eq!(facts.controller_uid.as_deref(), Some("owner"));
        assert_eq!(facts.key_id.as_deref(), Some("kid_1"));
        assert_eq!(cache.get("ns", "b"), Some(None));
    }

    #[test]
    fn changes_and_relists_replace_what_is_known() {
        let cache = SecretCache::default();
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(secret("a", "1", "owner")));
        cache.apply(&watcher::Event::InitDone);
        cache.apply(&watcher::Event::Apply(secret("a", "2", "owner")));
        cache.apply(&watcher::Event::Apply(secret("b", "3", "other")));
        assert_eq!(
            cache
                .get("ns", "a")
                .unwrap()
                .unwrap()
                .resource_version
                .as_deref(),
            Some("2")
        );
        assert_eq!(
            cache.controlled_by("ns", "owner"),
            vec![("a".to_owned(), "uid-a".to_owned())]
        );
        cache.apply(&watcher::Event::Delete(secret("a", "2", "owner")));
        assert_eq!(cache.get("ns", "a"), Some(None));
        // A relist keeps serving the old entries until it is complete.
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(secret("c", "4", "owner")));
        assert_eq!(cache.len(), 1);
        cache.apply(&watcher::Event::InitDone);
        assert_eq!(cache.get("ns", "b"), Some(None));
        assert!(cache.get("ns", "c").unwrap().is_some());
    }
}
