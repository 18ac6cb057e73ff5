//! The pure decision core. Given what the shell observed (spec, database rows,
//! the Secret's state reduced to a hash, and `now`) it decides the steps to take
//! and the status to show. It reads no clock, no RNG and does no I/O.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    crd::{ApiKeyStatus, READY},
    key::KeyHash,
    store::{KeyMetadata, KeyRecord, KeyState, RevokeReason},
};

/// How long a pending key that no Secret holds is kept before it is revoked.
/// It never verifies meanwhile; the wait only lets a late Secret write land.
pub const PENDING_TIMEOUT: SignedDuration = SignedDuration::from_mins(2);

/// The target Secret as the core needs to see it: never its plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretView {
    /// No Secret with the target name.
    Absent,
    /// A Secret with the target name that this ApiKey does not control.
    Foreign,
    /// A Secret this ApiKey controls, with the SHA-256 of its `api-key` value if it has one.
    Owned {
        /// Hash of the `api-key` data value, `None` when the key is missing.
        key_hash: Option<KeyHash>,
    },
}

/// Why a new key is issued; tells the Event apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// The ApiKey has never had an active key.
    Initial,
    /// The Secret was deleted while a key was active.
    SecretDeleted,
    /// The Secret's key was edited or removed, so it matches no live record.
    SecretAltered,
}

/// One write the shell must make, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Generate a key, insert it pending, write the Secret, then activate it.
    Issue(IssueReason),
    /// The Secret already holds this pending key: mark it active.
    Activate {
        /// The pending record.
        key_id: String,
    },
    /// Owner, team or scopes changed in the spec: update the record in place.
    UpdateMetadata {
        /// The live record to update.
        key_id: String,
    },
    /// Revoke a key record.
    Revoke {
        /// The record to revoke.
        key_id: String,
        /// Why.
        reason: RevokeReason,
    },
}

/// What the core decided for an ApiKey that is not being deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The target Secret belongs to someone else: touch nothing, report the conflict.
    SecretConflict,
    /// Make these writes (possibly none), then come back after `requeue_after` if set.
    Converge {
        /// Ordered steps; empty in the steady state.
        steps: Vec<Step>,
        /// The live record the Secret already holds, if any (an `Issue` step replaces it).
        held: Option<String>,
        /// Earliest time something will need doing without any watch event.
        requeue_after: Option<SignedDuration>,
    },
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    /// Owner, team and scopes from the spec.
    pub desired: &'a KeyMetadata,
    /// The ApiKey's live (not revoked) records.
    pub records: &'a [KeyRecord],
    /// The target Secret.
    pub secret: &'a SecretView,
    /// The current time.
    pub now: Timestamp,
}

/// Decides the steps that bring the database and Secret to the desired state.
pub fn decide(obs: &Observation<'_>) -> Decision {
    let held_hash = match obs.secret {
        SecretView::Foreign => return Decision::SecretConflict,
        SecretView::Absent => None,
        SecretView::Owned { key_hash } => key_hash.as_ref(),
    };
    let held = held_hash.and_then(|hash| {
        obs.records.iter().find(|r| {
            &r.key_hash == hash && matches!(r.state, KeyState::Active | KeyState::Pending)
        })
    });

    let mut steps = Vec::new();
    let current = match held {
        Some(record) => {
            if record.state == KeyState::Pending {
                steps.push(Step::Activate {
                    key_id: record.key_id.clone(),
                });
            }
            if record.metadata != *obs.desired {
                steps.push(Step::UpdateMetadata {
                    key_id: record.key_id.clone(),
                });
            }
            Some(record.key_id.as_str())
        }
        None => {
            let had_active = obs.records.iter().any(|r| r.state == KeyState::Active);
            let reason = match obs.secret {
                _ if !had_active => IssueReason::Initial,
                SecretView::Absent => IssueReason::SecretDeleted,
                _ => IssueReason::SecretAltered,
            };
            steps.push(Step::Issue(reason));
            None
        }
    };

    let mut requeue_after: Option<SignedDuration> = None;
    for record in obs.records {
        if Some(record.key_id.as_str()) == current {
            continue;
        }
        match record.state {
            KeyState::Active => steps.push(Step::Revoke {
                key_id: record.key_id.clone(),
                reason: RevokeReason::Replaced,
            }),
            KeyState::Pending => {
                let age = obs.now.duration_since(record.created_at);
                if age >= PENDING_TIMEOUT {
                    steps.push(Step::Revoke {
                        key_id: record.key_id.clone(),
                        reason: RevokeReason::Abandoned,
                    });
                } else {
                    let wait = PENDING_TIMEOUT - age;
                    requeue_after = Some(requeue_after.map_or(wait, |w| w.min(wait)));
                }
            }
            KeyState::Retiring if record.metadata != *obs.desired => {
                steps.push(Step::UpdateMetadata {
                    key_id: record.key_id.clone(),
                });
            }
            KeyState::Retiring | KeyState::Revoked => {}
        }
    }
    Decision::Converge {
        steps,
        held: current.map(str::to_owned),
        requeue_after,
    }
}

/// How the reconcile ended, for the Ready condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret holds an active key.
    Ready,
    /// The target Secret belongs to someone else.
    SecretConflict {
        /// The Secret's name.
        secret_name: String,
    },
    /// A step failed; `reason` is the error's PascalCase reason.
    Failed {
        /// PascalCase reason, e.g. `DatabaseUnavailable`.
        reason: String,
        /// What happened and what to do, without secrets.
        message: String,
    },
}

/// The inputs of [`status_for`].
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    /// The status currently on the object.
    pub previous: Option<&'a ApiKeyStatus>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The target Secret's name.
    pub secret_name: &'a str,
    /// The record now held by the Secret, if known.
    pub current: Option<&'a KeyRecord>,
    /// Keys activated so far, if known.
    pub issued: Option<i64>,
    /// How the reconcile ended.
    pub outcome: &'a Outcome,
    /// The current time, used only when the Ready condition changes status.
    pub now: Timestamp,
}

/// The status to show. Equal to `previous` when nothing changed, so the shell can skip the write.
pub fn status_for(input: &StatusInput<'_>) -> ApiKeyStatus {
    let previous = input.previous.cloned().unwrap_or_default();
    let (status, reason, message) = match input.outcome {
        Outcome::Ready => {
            let key_id = input.current.map(|r| r.key_id.as_str()).unwrap_or("?");
            (
                "True",
                "KeyActive".to_owned(),
                format!("key {key_id} is active in Secret {}", input.secret_name),
            )
        }
        Outcome::SecretConflict { secret_name } => (
            "False",
            "SecretConflict".to_owned(),
            format!(
                "Secret {secret_name} already exists and is not controlled by this ApiKey; \
                 keyward will not modify it. Delete or rename that Secret, or recreate this ApiKey with another spec.secretName"
            ),
        ),
        Outcome::Failed { reason, message } => ("False", reason.clone(), message.clone()),
    };
    let last_transition_time = previous
        .conditions
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(input.now));
    let ready = Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason,
        message,
        observed_generation: input.generation,
        last_transition_time,
    };
    let mut conditions: Vec<Condition> = previous
        .conditions
        .into_iter()
        .filter(|c| c.type_ != READY)
        .collect();
    conditions.push(ready);

    let (key_id, key_hint, secret_name, issued_at) = match (input.outcome, input.current) {
        (Outcome::Ready, Some(current)) => (
            Some(current.key_id.clone()),
            Some(current.key_hint.clone()),
            Some(input.secret_name.to_owned()),
            current.activated_at.map(Time),
        ),
        (Outcome::SecretConflict { .. }, _) => (None, None, None, None),
        _ => (
            previous.key_id,
            previous.key_hint,
            previous.secret_name,
            previous.issued_at,
        ),
    };
    ApiKeyStatus {
        conditions,
        observed_generation: input.generation,
        key_id,
        key_hint,
        secret_name,
        issued_at,
        revision: input.issued.or(previous.revision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn meta() -> KeyMetadata {
        KeyMetadata {
            owner: "alice@example.com".into(),
            team: "ml".into(),
            scopes: vec!["inference".into()],
        }
    }

    fn record(id: &str, state: KeyState, created: Timestamp) -> KeyRecord {
        KeyRecord {
            key_id: id.into(),
            key_hash: KeyHash::of(id.as_bytes()),
            key_hint: format!("kw_{id}"),
            apikey_uid: "uid-1".into(),
            namespace: "ns".into(),
            name: "key".into(),
            metadata: meta(),
            state,
            created_at: created,
            activated_at: (state != KeyState::Pending).then_some(created),
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
        }
    }

    fn owned(id: &str) -> SecretView {
        SecretView::Owned {
            key_hash: Some(KeyHash::of(id.as_bytes())),
        }
    }

    fn decide_with(records: &[KeyRecord], secret: &SecretView, now: Timestamp) -> Decision {
        decide(&Observation {
            desired: &meta(),
            records,
            secret,
            now,
        })
    }

    fn steps(decision: Decision) -> Vec<Step> {
        match decision {
            Decision::Converge { steps, .. } => steps,
            Decision::SecretConflict => panic!("unexpected conflict"),
        }
    }

    #[test]
    fn first_reconcile_issues() {
        let decision = decide_with(&[], &SecretView::Absent, t(0));
        assert_eq!(steps(decision), vec![Step::Issue(IssueReason::Initial)]);
    }

    #[test]
    fn steady_state_makes_no_steps() {
        let records = [record("a", KeyState::Active, t(0))];
        let decision = decide_with(&records, &owned("a"), t(1000));
        assert_eq!(
            decision,
            Decision::Converge {
                steps: vec![],
                held: Some("a".into()),
                requeue_after: None
            }
        );
    }

    #[test]
    fn foreign_secret_is_a_conflict_whatever_the_records() {
        let records = [record("a", KeyState::Active, t(0))];
        assert_eq!(
            decide_with(&records, &SecretView::Foreign, t(0)),
            Decision::SecretConflict
        );
        assert_eq!(
            decide_with(&[], &SecretView::Foreign, t(0)),
            Decision::SecretConflict
        );
    }

    #[test]
    fn deleted_secret_reissues_then_revokes_old() {
        let records = [record("a", KeyState::Active, t(0))];
        assert_eq!(
            steps(decide_with(&records, &SecretView::Absent, t(10))),
            vec![
                Step::Issue(IssueReason::SecretDeleted),
                Step::Revoke {
                    key_id: "a".into(),
                    reason: RevokeReason::Replaced
                }
            ]
        );
    }

    #[test]
    fn edited_secret_reissues_then_revokes_old() {
        let records = [record("a", KeyState::Active, t(0))];
        for secret in [owned("not-ours"), SecretView::Owned { key_hash: None }] {
            assert_eq!(
                steps(decide_with(&records, &secret, t(10))),
                vec![
                    Step::Issue(IssueReason::SecretAltered),
                    Step::Revoke {
                        key_id: "a".into(),
                        reason: RevokeReason::Replaced
                    }
                ]
            );
        }
    }

    #[test]
    fn unknown_key_in_fresh_owned_secret_is_never_adopted() {
        let decision = decide_with(&[], &owned("planted"), t(0));
        assert_eq!(steps(decision), vec![Step::Issue(IssueReason::Initial)]);
    }

    #[test]
    fn secret_holding_pending_key_activates_it_and_revokes_the_old_active() {
        // Crash after the Secret write, before activation, during a re-issue.
        let records = [
            record("old", KeyState::Active, t(0)),
            record("new", KeyState::Pending, t(5)),
        ];
        assert_eq!(
            steps(decide_with(&records, &owned("new"), t(6))),
            vec![
                Step::Activate {
                    key_id: "new".into()
                },
                Step::Revoke {
                    key_id: "old".into(),
                    reason: RevokeReason::Replaced
                }
            ]
        );
    }

    #[test]
    fn young_unheld_pending_waits_then_is_revoked() {
        // Crash after the pending insert, before the Secret write.
        let records = [record("p", KeyState::Pending, t(0))];
        let young = decide_with(&records, &SecretView::Absent, t(30));
        assert_eq!(
            young,
            Decision::Converge {
                steps: vec![Step::Issue(IssueReason::Initial)],
                held: None,
                requeue_after: Some(PENDING_TIMEOUT - SignedDuration::from_secs(30)),
            }
        );
        let records = [
            record("p", KeyState::Pending, t(0)),
            record("a", KeyState::Active, t(31)),
        ];
        let later = decide_with(&records, &owned("a"), t(0) + PENDING_TIMEOUT);
        assert_eq!(
            steps(later),
            vec![Step::Revoke {
                key_id: "p".into(),
                reason: RevokeReason::Abandoned
            }]
        );
    }

    #[test]
    fn two_active_records_keep_the_held_one() {
        // Crash after activating the new key, before revoking the old.
        let records = [
            record("old", KeyState::Active, t(0)),
            record("new", KeyState::Active, t(5)),
        ];
        assert_eq!(
            steps(decide_with(&records, &owned("new"), t(6))),
            vec![Step::Revoke {
                key_id: "old".into(),
                reason: RevokeReason::Replaced
            }]
        );
    }

    #[test]
    fn metadata_change_updates_in_place_and_never_reissues() {
        let mut changed = record("a", KeyState::Active, t(0));
        changed.metadata.scopes.push("metrics".into());
        let mut retiring = record("r", KeyState::Retiring, t(0));
        retiring.metadata.owner = "bob@example.com".into();
        let records = [changed, retiring];
        assert_eq!(
            steps(decide_with(&records, &owned("a"), t(1))),
            vec![
                Step::UpdateMetadata { key_id: "a".into() },
                Step::UpdateMetadata { key_id: "r".into() }
            ]
        );
    }

    #[test]
    fn secret_holding_retiring_key_gets_a_new_key_but_retiring_stays() {
        let records = [record("r", KeyState::Retiring, t(0))];
        assert_eq!(
            steps(decide_with(&records, &owned("r"), t(1))),
            vec![Step::Issue(IssueReason::Initial)]
        );
    }

    fn ready_status(now: Timestamp, previous: Option<&ApiKeyStatus>) -> ApiKeyStatus {
        let current = record("a", KeyState::Active, t(0));
        status_for(&StatusInput {
            previous,
            generation: Some(1),
            secret_name: "key",
            current: Some(&current),
            issued: Some(1),
            outcome: &Outcome::Ready,
            now,
        })
    }

    #[test]
    fn ready_status_shows_the_key_and_is_stable() {
        let first = ready_status(t(10), None);
        assert_eq!(first.key_id.as_deref(), Some("a"));
        assert_eq!(first.key_hint.as_deref(), Some("kw_a"));
        assert_eq!(first.secret_name.as_deref(), Some("key"));
        assert_eq!(first.revision, Some(1));
        assert_eq!(first.issued_at, Some(Time(t(0))));
        let ready = &first.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "KeyActive")
        );
        assert_eq!(ready.last_transition_time, Time(t(10)));
        // Same facts later: identical status, so no write.
        assert_eq!(ready_status(t(500), Some(&first)), first);
    }

    #[test]
    fn failure_keeps_key_fields_and_moves_transition_time() {
        let ready = ready_status(t(10), None);
        let failed = status_for(&StatusInput {
            previous: Some(&ready),
            generation: Some(1),
            secret_name: "key",
            current: None,
            issued: None,
            outcome: &Outcome::Failed {
                reason: "DatabaseUnavailable".into(),
                message: "key database error: connection refused".into(),
            },
            now: t(20),
        });
        assert_eq!(failed.key_id, ready.key_id);
        assert_eq!(failed.revision, Some(1));
        let condition = &failed.conditions[0];
        assert_eq!(condition.status, "False");
        assert_eq!(condition.reason, "DatabaseUnavailable");
        assert_eq!(condition.last_transition_time, Time(t(20)));
    }

    #[test]
    fn conflict_status_says_what_to_fix_and_shows_no_key() {
        let status = status_for(&StatusInput {
            previous: None,
            generation: Some(2),
            secret_name: "key",
            current: None,
            issued: Some(0),
            outcome: &Outcome::SecretConflict {
                secret_name: "key".into(),
            },
            now: t(0),
        });
        let condition = &status.conditions[0];
        assert_eq!(condition.reason, "SecretConflict");
        assert!(condition.message.contains("Secret key already exists"));
        assert_eq!(condition.observed_generation, Some(2));
        assert_eq!(status.key_id, None);
    }
}
