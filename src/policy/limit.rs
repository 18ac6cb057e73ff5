//! `maxKeysPerNamespace`: a key's place in its namespace's line. Pure; the
//! reconciler and the policy status writer both rank with [`place`], so a key's
//! condition and its policy's status say the same.
//!
//! The ApiKeys that hold a live key (the key database says so: [`Holders`])
//! come first, oldest first, and keep their places: a key issued earlier is
//! never pushed out by a later one that ranks older by creation time or name.
//! A holder the cache does not show (being deleted, its keys not yet revoked)
//! still counts, ahead of all. The keys waiting for a place come next, oldest
//! first (creation time, then name); a waiting key that some other rule forbids
//! holds no place in the line, so it cannot block the keys behind it.

use std::collections::{BTreeMap, HashSet};

use jiff::Timestamp;
use kube::ResourceExt;

use super::{
    evaluate::{CompiledPolicy, KeyContext, evaluate},
    index::age_order,
};
use crate::crd::ApiKey;

/// The uids of a namespace's ApiKeys that hold a live key, from the key database.
pub type Holders = HashSet<String>;

/// Whether any policy limits the keys of a namespace with these labels.
pub fn limited(policies: &[CompiledPolicy], labels: &BTreeMap<String, String>) -> bool {
    policies.iter().any(|p| p.limits(labels))
}

/// Whether every rule but the limit allows `key`: only then does a waiting key
/// hold a place in the line.
pub fn eligible(
    policies: &[CompiledPolicy],
    key: &ApiKey,
    labels: &BTreeMap<String, String>,
    now: Timestamp,
) -> bool {
    let context = KeyContext {
        namespace: key.metadata.namespace.as_deref().unwrap_or_default(),
        namespace_labels: labels,
        rank: &|| 0,
        now,
        activity: None,
    };
    evaluate(policies, &key.spec, &context, false).allowed()
}

/// How many keys come before `key` in its namespace's line. `peers` are the
/// namespace's ApiKeys as the cache shows them (any order, `key` may be among
/// them); `eligible` says whether a waiting key is allowed by every rule but
/// the limit.
pub fn place(
    key: &ApiKey,
    holders: &Holders,
    peers: &[&ApiKey],
    eligible: &dyn Fn(&ApiKey) -> bool,
) -> usize {
    let uid = key.uid().unwrap_or_default();
    let mine = age_order(key);
    let same = |other: &ApiKey| other.metadata.uid.as_deref() == Some(uid.as_str());
    if holders.contains(&uid) {
        // Holders the cache shows and that are younger rank after this key;
        // every other holder (older, or unknown to the cache) ranks before it.
        let younger = peers
            .iter()
            .filter(|p| !same(p))
            .filter(|p| p.uid().is_some_and(|u| holders.contains(&u)))
            .filter(|p| age_order(p) > mine)
            .count();
        return holders.len() - 1 - younger;
    }
    let waiting_before = peers
        .iter()
        .filter(|p| !same(p))
        .filter(|p| !p.uid().is_some_and(|u| holders.contains(&u)))
        .filter(|p| age_order(p) < mine && eligible(p))
        .count();
    holders.len() + waiting_before
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::ApiKeySpec;

    fn key(name: &str, second: i64) -> ApiKey {
        ApiKey {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team".into()),
                uid: Some(format!("uid-{name}")),
                creation_timestamp: Some(Time(jiff::Timestamp::from_second(second).unwrap())),
                ..ObjectMeta::default()
            },
            spec: ApiKeySpec::example(),
            status: None,
        }
    }

    fn holders(names: &[&str]) -> Holders {
        names.iter().map(|n| format!("uid-{n}")).collect()
    }

    #[test]
    fn holders_keep_their_places_before_older_waiting_keys() {
        // key-e was issued first; key-a..d came in the same second and rank
        // older by name, yet none of them moves key-e out of its place.
        let keys: Vec<ApiKey> = ["key-e", "key-d", "key-c", "key-b", "key-a"]
            .into_iter()
            .map(|n| key(n, 100))
            .collect();
        let peers: Vec<&ApiKey> = keys.iter().collect();
        let held = holders(&["key-e"]);
        let all = |_: &ApiKey| true;
        assert_eq!(place(&keys[0], &held, &peers, &all), 0, "key-e holds");
        assert_eq!(place(&keys[4], &held, &peers, &all), 1, "key-a is next");
        assert_eq!(place(&keys[3], &held, &peers, &all), 2, "then key-b");
        assert_eq!(place(&keys[1], &held, &peers, &all), 4, "key-d last");
    }

    #[test]
    fn holders_rank_among_themselves_by_age() {
        let keys = [key("old", 1), key("mid", 2), key("new", 3)];
        let peers: Vec<&ApiKey> = keys.iter().collect();
        let held = holders(&["old", "mid", "new"]);
        let places: Vec<usize> = keys
            .iter()
            .map(|k| place(k, &held, &peers, &|_| true))
            .collect();
        assert_eq!(places, [0, 1, 2]);
    }

    #[test]
    fn a_holder_the_cache_does_not_show_counts_first() {
        // An ApiKey being deleted whose keys are not revoked yet.
        let keys = [key("a", 1), key("b", 2)];
        let peers: Vec<&ApiKey> = keys.iter().collect();
        let held = holders(&["a", "gone"]);
        assert_eq!(place(&keys[0], &held, &peers, &|_| true), 1);
        assert_eq!(place(&keys[1], &held, &peers, &|_| true), 2);
    }

    #[test]
    fn a_waiting_key_another_rule_forbids_holds_no_place() {
        let keys = [key("bad-team", 1), key("fine", 2)];
        let peers: Vec<&ApiKey> = keys.iter().collect();
        let eligible = |k: &ApiKey| k.name_any() != "bad-team";
        assert_eq!(place(&keys[1], &Holders::new(), &peers, &eligible), 0);
        assert_eq!(place(&keys[0], &Holders::new(), &peers, &eligible), 0);
    }
}
