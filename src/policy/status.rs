//! The status of each ApiKeyPolicy: how many namespaces and keys it governs and
//! which keys it forbids. Pure: computed from what the index holds and `now`.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use super::{
    crd::{ApiKeyPolicyStatus, PolicyViolationEntry},
    evaluate::{CompiledPolicy, KeyContext, evaluate},
    limit::{Holders, eligible, limited, place},
};
use crate::crd::{ApiKey, READY};

/// At most this many violating keys are listed in a policy's status.
pub const LISTED_VIOLATIONS: usize = 100;

/// The status every policy should show. `previous` conditions keep their
/// transition time while their status stays the same.
pub fn summarize(
    policies: &[CompiledPolicy],
    namespaces: &HashMap<String, BTreeMap<String, String>>,
    keys: &[&ApiKey],
    holders: &HashMap<String, Holders>,
    now: Timestamp,
) -> BTreeMap<String, ApiKeyPolicyStatus> {
    let mut by_namespace: HashMap<String, Vec<&ApiKey>> = HashMap::new();
    for key in keys {
        by_namespace
            .entry(key.namespace().unwrap_or_default())
            .or_default()
            .push(key);
    }
    let empty = BTreeMap::new();
    let no_holders = Holders::new();
    // Each key's place under maxKeysPerNamespace, ranked as the reconciler
    // ranks it ([`place`]), so that conditions and status agree.
    let mut places: HashMap<&str, usize> = HashMap::new();
    for (namespace, list) in &by_namespace {
        let labels = namespaces.get(namespace).unwrap_or(&empty);
        if !limited(policies, labels) {
            continue;
        }
        let eligible: HashMap<&str, bool> = list
            .iter()
            .map(|key| {
                let uid = key.metadata.uid.as_deref().unwrap_or_default();
                (uid, eligible(policies, key, labels, now))
            })
            .collect();
        let is_eligible = |key: &ApiKey| {
            eligible.get(key.metadata.uid.as_deref().unwrap_or_default()) == Some(&true)
        };
        let held = holders.get(namespace).unwrap_or(&no_holders);
        for key in list {
            let uid = key.metadata.uid.as_deref().unwrap_or_default();
            places.insert(uid, place(key, held, list, &is_eligible));
        }
    }
    policies
        .iter()
        .map(|policy| {
            let mut status = ApiKeyPolicyStatus {
                observed_generation: policy.generation,
                teams: policy.teams_summary(),
                namespaces: count(namespaces.values().filter(|l| policy.selects(l)).count()),
                ..ApiKeyPolicyStatus::default()
            };
            for (namespace, list) in &by_namespace {
                let labels = namespaces.get(namespace).unwrap_or(&empty);
                if !policy.selects(labels) {
                    continue;
                }
                for key in list {
                    status.governed_keys += 1;
                    let uid = key.metadata.uid.as_deref().unwrap_or_default();
                    let rank = || places.get(uid).copied().unwrap_or_default();
                    let context = KeyContext {
                        namespace,
                        namespace_labels: labels,
                        rank: &rank,
                        now,
                        activity: None,
                    };
                    let verdict =
                        evaluate(std::slice::from_ref(policy), &key.spec, &context, false);
                    if verdict.allowed() {
                        continue;
                    }
                    status.violating_keys += 1;
                    for violation in verdict.violations {
                        status.violations.push(PolicyViolationEntry {
                            namespace: namespace.clone(),
                            name: key.name_any(),
                            rule: violation.rule.to_owned(),
                            message: violation.message,
                        });
                    }
                }
            }
            status.violations.sort_by(|a, b| {
                (&a.namespace, &a.name, &a.rule).cmp(&(&b.namespace, &b.name, &b.rule))
            });
            status.violations.truncate(LISTED_VIOLATIONS);
            let (state, reason, message) = match &policy.defect {
                Some(defect) => ("False", "InvalidPolicy", defect.clone()),
                None => ("True", "Active", "the policy is enforced".to_owned()),
            };
            let since = policy
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .find(|c| c.type_ == READY && c.status == state)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(Timestamp::from_second(now.as_second()).unwrap_or(now)));
            status.conditions = vec![Condition {
                type_: READY.to_owned(),
                status: state.to_owned(),
                reason: reason.to_owned(),
                message,
                observed_generation: policy.generation,
                last_transition_time: since,
            }];
            (policy.name.clone(), status)
        })
        .collect()
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
