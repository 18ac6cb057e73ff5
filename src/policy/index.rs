//! What the operator knows about ApiKeyPolicies and namespace labels, filled by
//! watches (src/policy/watch.rs) and read by every reconcile through [`Governance`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use jiff::Timestamp;
use kube::{ResourceExt, core::DeserializeGuard, runtime::reflector::Store};

use super::{
    evaluate::{Activity, CompiledPolicy, KeyContext, Verdict, evaluate},
    limit::{Holders, eligible, limited, place},
};
use crate::{Error, Result, crd::ApiKey};

/// Where the reconciler learns whether ApiKeyPolicies allow a key.
pub trait Governance: Send + Sync {
    /// Whether a policy limits the number of keys in `namespace`
    /// (`maxKeysPerNamespace`): then the reconciler reads the namespace's
    /// [`Holders`] from the key database for [`check`](Self::check), and
    /// issues a namespace's first keys one at a time.
    fn limits(&self, namespace: &str) -> bool;
    /// Checks the key against every policy that selects its namespace. Fails
    /// while the policies or namespaces are not known yet: nothing is issued
    /// then; and when a policy limits the namespace but `holders` is `None`
    /// (the policy came after [`limits`](Self::limits) was asked).
    /// `activity` is the key's use, for `lifetime.maxUnused`.
    fn check(
        &self,
        key: &ApiKey,
        holders: Option<&Holders>,
        activity: Option<Activity>,
        now: Timestamp,
    ) -> Result<Verdict>;
}

/// The ApiKeyPolicies and namespace labels as last seen, shared by the watches,
/// the reconciles and the policy status writer.
#[derive(Clone, Default)]
pub struct PolicyIndex {
    state: Arc<RwLock<State>>,
    /// The controller's ApiKey cache, for `maxKeysPerNamespace` and requeues.
    keys: Arc<RwLock<Option<Store<DeserializeGuard<ApiKey>>>>>,
    require_policy: bool,
}

#[derive(Default)]
struct State {
    /// Sorted by name: a slice the check reads in place, under the read lock.
    policies: Vec<CompiledPolicy>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    policies_synced: bool,
    namespaces_synced: bool,
}

impl PolicyIndex {
    /// An empty index. With `require_policy`, a namespace that no policy selects
    /// forbids every key (`--require-policy`).
    pub fn new(require_policy: bool) -> Self {
        Self {
            require_policy,
            ..Self::default()
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the index count and list ApiKeys from the controller's cache.
    pub fn attach_keys(&self, keys: Store<DeserializeGuard<ApiKey>>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(keys);
    }

    /// The ApiKey cache's objects (shared, not copied); read them with [`live`].
    pub fn keys(&self) -> Vec<Arc<DeserializeGuard<ApiKey>>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.as_ref().map(Store::state).unwrap_or_default()
    }

    /// Adds or replaces a policy; returns the one it replaced.
    pub fn upsert_policy(&self, policy: CompiledPolicy) -> Option<CompiledPolicy> {
        let policies = &mut self.write().policies;
        match policies.binary_search_by(|p| p.name.cmp(&policy.name)) {
            Ok(at) => Some(std::mem::replace(&mut policies[at], policy)),
            Err(at) => {
                policies.insert(at, policy);
                None
            }
        }
    }

    /// Removes a policy; returns it.
    pub fn remove_policy(&self, name: &str) -> Option<CompiledPolicy> {
        let policies = &mut self.write().policies;
        let at = policies
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()?;
        Some(policies.remove(at))
    }

    /// Replaces every policy at once (a watch's full list); marks policies synced.
    pub fn replace_policies(&self, mut policies: Vec<CompiledPolicy>) {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut state = self.write();
        state.policies_synced = true;
        state.policies = policies;
    }

    /// Every policy, by name.
    pub fn policies(&self) -> Vec<CompiledPolicy> {
        self.read().policies.clone()
    }

    /// Sets a namespace's labels; returns the old ones.
    pub fn upsert_namespace(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Option<BTreeMap<String, String>> {
        self.write().namespaces.insert(name.to_owned(), labels)
    }

    /// Forgets a namespace.
    pub fn remove_namespace(&self, name: &str) {
        self.write().namespaces.remove(name);
    }

    /// Replaces every namespace at once (a watch's full list); marks namespaces synced.
    pub fn replace_namespaces(&self, namespaces: HashMap<String, BTreeMap<String, String>>) {
        let mut state = self.write();
        state.namespaces = namespaces;
        state.namespaces_synced = true;
    }

    /// Every namespace with its labels.
    pub fn namespaces(&self) -> HashMap<String, BTreeMap<String, String>> {
        self.read().namespaces.clone()
    }

    /// Whether the namespace watch has seen this namespace.
    pub fn knows_namespace(&self, name: &str) -> bool {
        self.read().namespaces.contains_key(name)
    }

    /// Whether any policy has `lifetime.maxUnused`: then keys may be judged
    /// anew when verifiers start reporting usage.
    pub fn judges_unused(&self) -> bool {
        self.read().policies.iter().any(|p| {
            p.spec
                .lifetime
                .as_ref()
                .is_some_and(|l| l.max_unused.is_some())
        })
    }

    /// Whether both watches have delivered their first full list.
    pub fn is_synced(&self) -> bool {
        let state = self.read();
        state.policies_synced && state.namespaces_synced
    }

    /// `key`'s place in its namespace's line for `maxKeysPerNamespace` ([`place`]).
    fn rank(
        &self,
        state: &State,
        key: &ApiKey,
        holders: &Holders,
        labels: &Labels,
        now: Timestamp,
    ) -> usize {
        let namespace = key.metadata.namespace.as_deref();
        let cached = self.keys();
        let peers: Vec<&ApiKey> = cached
            .iter()
            .filter_map(|guarded| live(guarded))
            .filter(|other| other.metadata.namespace.as_deref() == namespace)
            .collect();
        let eligible = |other: &ApiKey| eligible(&state.policies, other, labels, now);
        place(key, holders, &peers, &eligible)
    }
}

type Labels = BTreeMap<String, String>;

/// A cached ApiKey that can be read and is not being deleted.
pub fn live(guarded: &DeserializeGuard<ApiKey>) -> Option<&ApiKey> {
    guarded
        .0
        .as_ref()
        .ok()
        .filter(|key| key.metadata.deletion_timestamp.is_none())
}

/// The order `maxKeysPerNamespace` keeps: oldest first, then by name.
pub fn age_order(key: &ApiKey) -> (Option<Timestamp>, Option<&str>) {
    (
        key.metadata.creation_timestamp.as_ref().map(|t| t.0),
        key.metadata.name.as_deref(),
    )
}

impl Governance for PolicyIndex {
    fn limits(&self, namespace: &str) -> bool {
        let state = self.read();
        let Some(labels) = state.namespaces.get(namespace) else {
            return false;
        };
        limited(&state.policies, labels)
    }

    fn check(
        &self,
        key: &ApiKey,
        holders: Option<&Holders>,
        activity: Option<Activity>,
        now: Timestamp,
    ) -> Result<Verdict> {
        let namespace = key.namespace().ok_or(Error::MissingMetadata("namespace"))?;
        let state = self.read();
        if !(state.policies_synced && state.namespaces_synced) {
            return Err(Error::PolicyUnavailable(
                "the ApiKeyPolicy and Namespace watches have not listed yet".into(),
            ));
        }
        let Some(labels) = state.namespaces.get(&namespace) else {
            return Err(Error::PolicyUnavailable(format!(
                "namespace {namespace} has not been seen yet"
            )));
        };
        let limited = limited(&state.policies, labels);
        let none = Holders::new();
        let holders = match holders {
            Some(holders) => holders,
            None if limited => {
                return Err(Error::PolicyUnavailable(format!(
                    "an ApiKeyPolicy now limits the keys in namespace {namespace}; checking again"
                )));
            }
            None => &none,
        };
        // Evaluated in place under the read lock: no copy of the policies or
        // labels per reconcile. `rank` reads the ApiKey cache, not this lock.
        let rank = || self.rank(&state, key, holders, labels, now);
        let context = KeyContext {
            namespace: &namespace,
            namespace_labels: labels,
            rank: &rank,
            now,
            activity,
        };
        Ok(evaluate(
            &state.policies,
            &key.spec,
            &context,
            self.require_policy,
        ))
    }
}
