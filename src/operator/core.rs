//! The pure decision core. Given what the shell observed (spec, database rows,
//! the Secret's state reduced to a hash, and `now`) it decides the steps to take
//! and the status to show. It reads no clock, no RNG and does no I/O.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    crd::{
        ApiKeySpec, ApiKeyStatus, DEFAULT_GRACE_PERIOD, POLICY_COMPLIANT, PREVIOUS_KEY_IN_USE,
        READY, REVOKE_PREVIOUS_ANNOTATION, ROTATE_ANNOTATION, UsageStatus,
    },
    key::KeyHash,
    policy::{Verdict, ViolationAction},
    schedule::{Schedule, parse_duration},
    store::{IssueReason, KeyMetadata, KeyRecord, KeyState, RevokeReason},
    usage::summary::{RecentUse, previous_key_condition, revoked_key_report},
};

/// `status.lastUsedAt` moves only when the last use is this much newer.
pub const LAST_USED_RESOLUTION: SignedDuration = SignedDuration::from_hours(1);

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

/// The rotation and expiry rules of one ApiKey, parsed from its spec and annotations.
#[derive(Clone, Debug)]
pub struct Policy {
    /// `spec.rotation.schedule` in its time zone.
    pub schedule: Option<Schedule>,
    /// How long a rotated-out key keeps working.
    pub grace_period: SignedDuration,
    /// `spec.expiresAfter`.
    pub expires_after: Option<SignedDuration>,
    /// The `keyward.dev/rotate` annotation value, if any.
    pub rotation_request: Option<String>,
    /// The `keyward.dev/revoke-previous` value, if set: the next new rotate request
    /// revokes older keys at once. keyward removes it once that request is handled.
    pub revoke_previous: Option<String>,
}

impl Policy {
    /// Reads the policy; the error names the field and what to fix (reason `InvalidSpec`).
    pub fn from_spec(
        spec: &ApiKeySpec,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let rotation = spec.rotation.clone().unwrap_or_default();
        let schedule = rotation
            .schedule
            .as_deref()
            .map(|s| Schedule::parse(s, rotation.time_zone.as_deref()))
            .transpose()
            .map_err(|e| format!("spec.rotation.schedule: {e}"))?;
        let grace_period = parse_duration(
            rotation
                .grace_period
                .as_deref()
                .unwrap_or(DEFAULT_GRACE_PERIOD),
        )
        .map_err(|e| format!("spec.rotation.gracePeriod: {e}"))?;
        let expires_after = spec
            .expires_after
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| format!("spec.expiresAfter: {e}"))?;
        if expires_after.is_some_and(|d| !d.is_positive()) {
            return Err("spec.expiresAfter must be positive".into());
        }
        Ok(Self {
            schedule,
            grace_period,
            expires_after,
            rotation_request: annotations
                .get(ROTATE_ANNOTATION)
                .filter(|v| !v.is_empty())
                .cloned(),
            revoke_previous: annotations.get(REVOKE_PREVIOUS_ANNOTATION).cloned(),
        })
    }

    /// When a key activated at `activated_at` expires, if it does.
    fn expiry_from(&self, activated_at: Timestamp) -> Option<Timestamp> {
        self.expires_after
            .and_then(|d| activated_at.checked_add(d).ok())
    }

    /// When a key activated at `activated_at` is due for rotation, if ever.
    pub fn next_rotation(&self, activated_at: Timestamp) -> Option<Timestamp> {
        self.schedule.as_ref()?.next_after(activated_at)
    }
}

/// One write the shell must make, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Generate a key, insert it pending, write the Secret, then activate it.
    Issue {
        /// Why.
        reason: IssueReason,
        /// Its expiry (spec.expiresAfter from now).
        expires_at: Option<Timestamp>,
    },
    /// The Secret already holds this pending key: mark it active.
    Activate {
        /// The pending record.
        key_id: String,
        /// Its expiry.
        expires_at: Option<Timestamp>,
    },
    /// A rotated-out key keeps working until `expires_at`.
    Retire {
        /// The active record being replaced.
        key_id: String,
        /// End of its grace period.
        expires_at: Timestamp,
    },
    /// spec.expiresAfter was tightened: bring the active key's expiry forward.
    /// A key's validity only ever shrinks, so there is no step that extends it.
    ShortenExpiry {
        /// The active record.
        key_id: String,
        /// The new, earlier expiry.
        expires_at: Timestamp,
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
    /// The emergency rotation asked for by `keyward.dev/revoke-previous` is done:
    /// remove that annotation, so that it applies to exactly one rotate request.
    ConsumeRevokePrevious {
        /// The rotate request it was handled with; the removal is conditional on it.
        rotation_request: String,
        /// The annotation value; the removal is conditional on it too.
        value: String,
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
        /// The live record the Secret holds and keeps holding; `None` when a step issues a new one.
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
    /// Rotation and expiry rules.
    pub policy: &'a Policy,
    /// The ApiKey's live (not revoked) records.
    pub records: &'a [KeyRecord],
    /// The target Secret.
    pub secret: &'a SecretView,
    /// The current time.
    pub now: Timestamp,
    /// `Some` when an ApiKeyPolicy forbids the spec: no key is issued, rotated or
    /// re-issued, and the strictest policy's action decides about issued keys.
    pub forbidden: Option<ViolationAction>,
}

/// Collects the earliest future instant something is due.
#[derive(Default)]
struct Wakeup(Option<Timestamp>);

impl Wakeup {
    fn at(&mut self, when: Option<Timestamp>) {
        if let Some(when) = when {
            self.0 = Some(self.0.map_or(when, |w| w.min(when)));
        }
    }
}

/// The steps decided so far and the earliest time something is due.
#[derive(Default)]
struct Plan {
    steps: Vec<Step>,
    wakeup: Wakeup,
}

/// The record that stays in the Secret (`None`: a new key is issued), why it
/// was issued, and when it became (or becomes) active.
struct Current<'r> {
    record: Option<&'r KeyRecord>,
    reason: IssueReason,
    since: Timestamp,
}

impl Current<'_> {
    /// No key stays: one is issued now (or, when forbidden, none is).
    fn replaced(reason: IssueReason, now: Timestamp) -> Self {
        Current {
            record: None,
            reason,
            since: now,
        }
    }
}

/// Decides the steps that bring the database and Secret to the desired state,
/// in four phases: observe what the Secret holds, decide the current key
/// (keep, activate, rotate or issue), settle every other live record (retire,
/// revoke or wait), and end a finished emergency request.
pub fn decide(obs: &Observation<'_>) -> Decision {
    let held = match held_record(obs) {
        Ok(held) => held,
        Err(conflict) => return conflict,
    };
    let mut plan = Plan::default();
    let current = current_key(obs, held, &mut plan);
    settle_others(obs, &current, &mut plan);
    end_emergency(obs, &current, &mut plan);
    Decision::Converge {
        steps: plan.steps,
        held: current.record.map(|r| r.key_id.clone()),
        requeue_after: plan.wakeup.0.map(|at| at.duration_since(obs.now)),
    }
}

/// Observe: the live record the Secret holds, or the conflict when the Secret
/// is someone else's.
fn held_record<'r>(obs: &Observation<'r>) -> Result<Option<&'r KeyRecord>, Decision> {
    let held_hash = match obs.secret {
        SecretView::Foreign => return Err(Decision::SecretConflict),
        SecretView::Absent => None,
        SecretView::Owned { key_hash } => key_hash.as_ref(),
    };
    Ok(held_hash.and_then(|hash| {
        obs.records.iter().find(|r| {
            &r.key_hash == hash && matches!(r.state, KeyState::Active | KeyState::Pending)
        })
    }))
}

/// Issue: the key that stays in the Secret, or a new one.
fn current_key<'r>(
    obs: &Observation<'r>,
    held: Option<&'r KeyRecord>,
    plan: &mut Plan,
) -> Current<'r> {
    let (policy, now, forbidden) = (obs.policy, obs.now, obs.forbidden);
    let current = match held {
        // A forbidden key is never issued: a pending one is not activated, nothing
        // new is issued, and `Revoke` takes the active one away too.
        Some(record) if forbidden.is_some() && record.state == KeyState::Pending => {
            Current::replaced(IssueReason::Initial, now)
        }
        None if forbidden.is_some() => Current::replaced(IssueReason::Initial, now),
        Some(_) if forbidden == Some(ViolationAction::Revoke) => {
            Current::replaced(IssueReason::Initial, now)
        }
        Some(record) if record.state == KeyState::Pending => {
            // A crash after the Secret write: finish the issuance.
            plan.steps.push(Step::Activate {
                key_id: record.key_id.clone(),
                expires_at: policy.expiry_from(now),
            });
            Current {
                record: Some(record),
                reason: record.issue_reason,
                since: now,
            }
        }
        Some(record) => keep_or_rotate(obs, record, plan),
        None => {
            let had_active = obs.records.iter().any(|r| r.state == KeyState::Active);
            let reason = match obs.secret {
                _ if !had_active => IssueReason::Initial,
                SecretView::Absent => IssueReason::SecretDeleted,
                _ => IssueReason::SecretAltered,
            };
            plan.steps.push(Step::Issue {
                reason,
                expires_at: policy.expiry_from(now),
            });
            Current::replaced(reason, now)
        }
    };
    if current.record.is_none() && forbidden.is_none() {
        plan.wakeup.at(policy.next_rotation(now));
        plan.wakeup.at(policy.expiry_from(now));
    }
    // A forbidden owner, team or scope never reaches a live record.
    if let Some(record) = current.record
        && forbidden.is_none()
        && record.metadata != *obs.desired
    {
        plan.steps.push(Step::UpdateMetadata {
            key_id: record.key_id.clone(),
        });
    }
    current
}

/// Rotate: the active key in the Secret, rotated when due or requested, else
/// kept (with its expiry shortened to a tighter spec).
fn keep_or_rotate<'r>(
    obs: &Observation<'r>,
    record: &'r KeyRecord,
    plan: &mut Plan,
) -> Current<'r> {
    let (policy, now, forbidden) = (obs.policy, obs.now, obs.forbidden);
    let since = record.activated_at.unwrap_or(record.created_at);
    let requested =
        policy.rotation_request.is_some() && policy.rotation_request != record.rotation_request;
    let next_rotation = policy.next_rotation(since);
    let due = requested || next_rotation.is_some_and(|next| next <= now);
    if due && forbidden == Some(ViolationAction::RefuseRotation) {
        // Revoked below instead of rotated.
        return Current::replaced(IssueReason::Initial, now);
    }
    if due && forbidden.is_none() {
        let reason = match (requested, policy.revoke_previous.is_some()) {
            (true, true) => IssueReason::Emergency,
            (true, false) => IssueReason::Requested,
            (false, _) => IssueReason::Scheduled,
        };
        plan.steps.push(Step::Issue {
            reason,
            expires_at: policy.expiry_from(now),
        });
        return Current::replaced(reason, now);
    }
    let expires_at = match (policy.expiry_from(since), record.expires_at) {
        (Some(tighter), current) if current.is_none_or(|c| tighter < c) => {
            plan.steps.push(Step::ShortenExpiry {
                key_id: record.key_id.clone(),
                expires_at: tighter,
            });
            Some(tighter)
        }
        (_, current) => current,
    };
    if !due {
        plan.wakeup.at(next_rotation);
    }
    plan.wakeup.at(expires_at.filter(|t| *t > now));
    Current {
        record: Some(record),
        reason: record.issue_reason,
        since,
    }
}

/// Retire: every live record but the current one is retired into its grace
/// period, revoked, or left to wait.
fn settle_others(obs: &Observation<'_>, current: &Current<'_>, plan: &mut Plan) {
    let (policy, now, forbidden) = (obs.policy, obs.now, obs.forbidden);
    let grace_ends = current
        .since
        .checked_add(policy.grace_period)
        .unwrap_or(current.since);
    let graceful = matches!(
        current.reason,
        IssueReason::Scheduled | IssueReason::Requested
    ) && grace_ends > now;
    let replaced_reason = match current.reason {
        _ if forbidden.is_some() => RevokeReason::PolicyViolation,
        IssueReason::Emergency => RevokeReason::Emergency,
        reason if reason.is_rotation() => RevokeReason::Rotated,
        _ => RevokeReason::Replaced,
    };
    let revoke_all = forbidden == Some(ViolationAction::Revoke);
    for record in obs.records {
        if current.record.is_some_and(|c| c.key_id == record.key_id) {
            continue;
        }
        let key_id = record.key_id.clone();
        // A key's validity only ever shrinks: a grace period never outlives the
        // key's own expiry, and an expired key is never brought back.
        let expired = record.expires_at.is_some_and(|at| at <= now);
        match record.state {
            KeyState::Active | KeyState::Retiring | KeyState::Pending if revoke_all => {
                plan.steps.push(Step::Revoke {
                    key_id,
                    reason: RevokeReason::PolicyViolation,
                });
            }
            KeyState::Active if expired => plan.steps.push(Step::Revoke {
                key_id,
                reason: RevokeReason::Expired,
            }),
            KeyState::Active if graceful => {
                let expires_at = record
                    .expires_at
                    .map_or(grace_ends, |own| own.min(grace_ends));
                plan.steps.push(Step::Retire { key_id, expires_at });
                plan.wakeup.at(Some(expires_at));
            }
            KeyState::Active => plan.steps.push(Step::Revoke {
                key_id,
                reason: replaced_reason,
            }),
            KeyState::Retiring => settle_retiring(obs, record, current.reason, plan),
            KeyState::Pending if forbidden.is_some() => plan.steps.push(Step::Revoke {
                key_id,
                reason: RevokeReason::PolicyViolation,
            }),
            KeyState::Pending => settle_pending(record, now, plan),
            KeyState::Revoked => {}
        }
    }
}

/// A pending key the Secret does not hold: a crashed issuance, abandoned after
/// [`PENDING_TIMEOUT`].
fn settle_pending(record: &KeyRecord, now: Timestamp, plan: &mut Plan) {
    let abandon_at = record
        .created_at
        .checked_add(PENDING_TIMEOUT)
        .unwrap_or(record.created_at);
    if abandon_at <= now {
        plan.steps.push(Step::Revoke {
            key_id: record.key_id.clone(),
            reason: RevokeReason::Abandoned,
        });
    } else {
        plan.wakeup.at(Some(abandon_at));
    }
}

/// A key in its grace period: revoked when the grace period is over or an
/// emergency rotation replaced it, else it waits (and follows the spec's metadata).
fn settle_retiring(
    obs: &Observation<'_>,
    record: &KeyRecord,
    current_reason: IssueReason,
    plan: &mut Plan,
) {
    let key_id = record.key_id.clone();
    let expired = record.expires_at.is_none_or(|at| at <= obs.now);
    if expired || current_reason == IssueReason::Emergency {
        let reason = if expired {
            RevokeReason::Rotated
        } else {
            RevokeReason::Emergency
        };
        plan.steps.push(Step::Revoke { key_id, reason });
    } else {
        plan.wakeup.at(record.expires_at);
        if obs.forbidden.is_none() && record.metadata != *obs.desired {
            plan.steps.push(Step::UpdateMetadata { key_id });
        }
    }
}

/// Status of the request: the emergency is over once the key in the Secret
/// came from it (issued now, or earlier by a run that crashed before removing
/// the annotation), so `keyward.dev/revoke-previous` applies to one request.
fn end_emergency(obs: &Observation<'_>, current: &Current<'_>, plan: &mut Plan) {
    let policy = obs.policy;
    let emergency_done = match current.record {
        Some(record) => {
            record.issue_reason == IssueReason::Emergency
                && record.rotation_request == policy.rotation_request
        }
        None => current.reason == IssueReason::Emergency,
    };
    if let (true, Some(value), Some(request)) = (
        emergency_done,
        &policy.revoke_previous,
        &policy.rotation_request,
    ) {
        plan.steps.push(Step::ConsumeRevokePrevious {
            rotation_request: request.clone(),
            value: value.clone(),
        });
    }
}

/// How the reconcile ended, for the Ready condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret holds an active key.
    Ready,
    /// The Secret holds a key whose `spec.expiresAfter` has passed.
    KeyExpired,
    /// The spec has a value the schema could not reject.
    InvalidSpec {
        /// What is wrong and where.
        message: String,
    },
    /// An ApiKeyPolicy forbids the key, and no key of it is working.
    PolicyViolation {
        /// Which policy and rule, and what to fix.
        message: String,
    },
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
    /// The ApiKey's live records after the reconcile, if known.
    pub records: &'a [KeyRecord],
    /// Keys activated so far, if known.
    pub issued: Option<i64>,
    /// When a verifier last saw any key of this ApiKey, if known.
    pub last_used: Option<Timestamp>,
    /// Rotation rules, if the spec is valid.
    pub policy: Option<&'a Policy>,
    /// The target Secret's resourceVersion after the reconcile, when it holds `current`.
    pub secret_version: Option<&'a str>,
    /// How the reconcile ended.
    pub outcome: &'a Outcome,
    /// The policy check, when it ran; sets the `PolicyCompliant` condition.
    pub verdict: Option<&'a Verdict>,
    /// What the leader's usage scans know of this ApiKey, when the reconcile
    /// got that far; sets `usage`, `PreviousKeyInUse` and the revoked-key report.
    pub usage: Option<UsageView<'a>>,
    /// The current time, used only when the Ready condition changes status.
    pub now: Timestamp,
}

/// What the usage scans know of one ApiKey.
#[derive(Clone, Copy, Debug)]
pub struct UsageView<'a> {
    /// The `status.usage` the last summary found due (at most hourly), if any.
    pub pending: Option<&'a UsageStatus>,
    /// This ApiKey's retiring and revoked keys that clients presented lately;
    /// `None` before the leader's first scan.
    pub recent: Option<&'a [RecentUse]>,
}

/// The status to show. Equal to `previous` when nothing changed, so the shell can skip the write.
pub fn status_for(input: &StatusInput<'_>) -> ApiKeyStatus {
    let previous = input.previous.cloned().unwrap_or_default();
    let key_id = input.current.map(|r| r.key_id.as_str()).unwrap_or("?");
    let (status, reason, message) = match input.outcome {
        Outcome::Ready => (
            "True",
            "KeyActive".to_owned(),
            format!("key {key_id} is active in Secret {}", input.secret_name),
        ),
        Outcome::KeyExpired => (
            "False",
            "KeyExpired".to_owned(),
            format!(
                "key {key_id} in Secret {} has expired (spec.expiresAfter); request a new key with \
                 kubectl annotate apikey <name> {ROTATE_ANNOTATION}=<new value> --overwrite",
                input.secret_name
            ),
        ),
        Outcome::InvalidSpec { message } => ("False", "InvalidSpec".to_owned(), message.clone()),
        Outcome::PolicyViolation { message } => {
            ("False", "PolicyViolation".to_owned(), message.clone())
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
    let condition = |type_: &str, status: &str, reason: String, message: String| Condition {
        last_transition_time: previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(seconds(input.now)),
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason,
        message,
        observed_generation: input.generation,
    };
    let mut replaced = vec![READY];
    let mut conditions = vec![condition(READY, status, reason, message)];
    if let Some(usage) = &input.usage {
        replaced.push(PREVIOUS_KEY_IN_USE);
        conditions.extend(previous_key_condition(
            Some(&previous),
            usage.recent,
            input.records,
            input.secret_name,
            input.generation,
            input.now,
        ));
    }
    if let Some(verdict) = input.verdict {
        replaced.push(POLICY_COMPLIANT);
        let (status, reason, message) = compliance(verdict);
        conditions.push(condition(POLICY_COMPLIANT, status, reason.into(), message));
    }
    conditions.splice(
        0..0,
        previous
            .conditions
            .iter()
            .filter(|c| !replaced.contains(&c.type_.as_str()))
            .cloned(),
    );

    let mut status = ApiKeyStatus {
        conditions,
        observed_generation: input.generation,
        revision: input.issued.or(previous.revision),
        ..previous.clone()
    };
    if let Some(verdict) = input.verdict {
        status.violated_policies = verdict.violated_policies();
    }
    if let Some(used) = input.last_used
        && shows_use(previous.last_used_at.as_ref().map(|t| t.0), used)
    {
        status.last_used_at = Some(seconds(used));
    }
    if let Some(usage) = &input.usage {
        // Never back to an older summary (the watch cache may lag our own write).
        if let Some(pending) = usage.pending
            && previous
                .usage
                .as_ref()
                .is_none_or(|shown| shown.updated_at.0 < pending.updated_at.0)
        {
            status.usage = Some(pending.clone());
        }
        let reported = previous.revoked_key_reported_at.as_ref().map(|t| t.0);
        if let Some(recent) = usage.recent
            && revoked_key_report(reported, recent, input.now).is_some()
        {
            status.revoked_key_reported_at = Some(seconds(input.now));
        }
    }
    match (input.outcome, input.current) {
        (Outcome::Ready | Outcome::KeyExpired, Some(current)) => {
            let since = current.activated_at.unwrap_or(current.created_at);
            status.key_id = Some(current.key_id.clone());
            status.key_hint = Some(current.key_hint.clone());
            status.secret_name = Some(input.secret_name.to_owned());
            status.issued_at = current.activated_at.map(seconds);
            status.expires_at = current.expires_at.map(seconds);
            status.next_rotation_at = input
                .policy
                .and_then(|p| p.next_rotation(since))
                .map(seconds);
            status.previous_key_expires_at = input
                .records
                .iter()
                .filter(|r| r.state == KeyState::Retiring)
                .filter_map(|r| r.expires_at)
                .max()
                .map(seconds);
            if current.issue_reason.is_rotation() {
                status.last_rotated_at = Some(seconds(since));
            }
            if let Some(version) = input.secret_version {
                status.secret_resource_version = Some(version.to_owned());
            }
            status.last_rotation_request = current
                .rotation_request
                .clone()
                .or(previous.last_rotation_request);
            if current.issue_reason == IssueReason::Emergency {
                status.last_emergency_request = current.rotation_request.clone();
            }
        }
        (Outcome::SecretConflict { .. } | Outcome::PolicyViolation { .. }, _) => {
            status.key_id = None;
            status.key_hint = None;
            status.secret_name = None;
            status.issued_at = None;
            status.expires_at = None;
            status.next_rotation_at = None;
            status.previous_key_expires_at = None;
            status.secret_resource_version = None;
        }
        _ => {}
    }
    status
}

/// Whether status should move `lastUsedAt` from `shown` to `used`: the first
/// use always, later ones at most once an hour per key, however busy it is.
pub fn shows_use(shown: Option<Timestamp>, used: Timestamp) -> bool {
    shown.is_none_or(|shown| used.duration_since(shown) >= LAST_USED_RESOLUTION)
}

/// The `PolicyCompliant` condition's status, reason and message.
fn compliance(verdict: &Verdict) -> (&'static str, &'static str, String) {
    if !verdict.allowed() {
        return ("False", "PolicyViolation", verdict.message());
    }
    if verdict.governing.is_empty() {
        return (
            "True",
            "NoPolicy",
            "no ApiKeyPolicy selects this namespace".into(),
        );
    }
    (
        "True",
        "Allowed",
        format!("allowed by ApiKeyPolicy {}", verdict.governing.join(", ")),
    )
}

/// A status time as the API server stores it: whole seconds. Anything finer
/// would never compare equal to the stored status, and every reconcile would write.
fn seconds(at: Timestamp) -> Time {
    Time(Timestamp::from_second(at.as_second()).unwrap_or(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ApiKeySpec;

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
            issue_reason: IssueReason::Initial,
            rotation_request: None,
            cluster: "default".into(),
        }
    }

    fn no_rotation() -> Policy {
        Policy::from_spec(&spec(), &BTreeMap::new()).unwrap()
    }

    fn spec() -> ApiKeySpec {
        ApiKeySpec::example()
    }

    fn owned(id: &str) -> SecretView {
        SecretView::Owned {
            key_hash: Some(KeyHash::of(id.as_bytes())),
        }
    }

    fn decide_with(records: &[KeyRecord], secret: &SecretView, now: Timestamp) -> Decision {
        decide_under(&no_rotation(), records, secret, now)
    }

    fn decide_under(
        policy: &Policy,
        records: &[KeyRecord],
        secret: &SecretView,
        now: Timestamp,
    ) -> Decision {
        decide_forbidden(policy, records, secret, now, None)
    }

    fn decide_forbidden(
        policy: &Policy,
        records: &[KeyRecord],
        secret: &SecretView,
        now: Timestamp,
        forbidden: impl Into<Option<ViolationAction>>,
    ) -> Decision {
        decide(&Observation {
            desired: &meta(),
            policy,
            records,
            secret,
            now,
            forbidden: forbidden.into(),
        })
    }

    fn issue(reason: IssueReason) -> Step {
        Step::Issue {
            reason,
            expires_at: None,
        }
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
        assert_eq!(steps(decision), vec![issue(IssueReason::Initial)]);
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
                issue(IssueReason::SecretDeleted),
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
                    issue(IssueReason::SecretAltered),
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
        assert_eq!(steps(decision), vec![issue(IssueReason::Initial)]);
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
                    key_id: "new".into(),
                    expires_at: None
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
                steps: vec![issue(IssueReason::Initial)],
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
        retiring.expires_at = Some(t(100));
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
        let mut retiring = record("r", KeyState::Retiring, t(0));
        retiring.expires_at = Some(t(100));
        let records = [retiring];
        assert_eq!(
            steps(decide_with(&records, &owned("r"), t(1))),
            vec![issue(IssueReason::Initial)]
        );
    }

    fn ready_status(now: Timestamp, previous: Option<&ApiKeyStatus>) -> ApiKeyStatus {
        let current = record("a", KeyState::Active, t(0));
        status_for(&StatusInput {
            previous,
            generation: Some(1),
            secret_name: "key",
            current: Some(&current),
            records: std::slice::from_ref(&current),
            issued: Some(1),
            last_used: None,
            policy: Some(&no_rotation()),
            secret_version: None,
            outcome: &Outcome::Ready,
            verdict: None,
            usage: None,
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
    fn last_use_shows_at_most_once_an_hour() {
        let with_use = |previous: Option<&ApiKeyStatus>, used: Timestamp| {
            status_for(&StatusInput {
                previous,
                generation: Some(1),
                secret_name: "key",
                current: None,
                records: &[],
                issued: None,
                last_used: Some(used),
                policy: None,
                secret_version: None,
                outcome: &Outcome::Ready,
                verdict: None,
                usage: None,
                now: t(0),
            })
        };
        let first = with_use(None, t(60));
        assert_eq!(first.last_used_at, Some(Time(t(60))));
        // Used again 59 minutes later: the status stays as it is (no write).
        assert_eq!(with_use(Some(&first), t(60 + 59 * 60)), first);
        // An hour later it moves.
        let later = with_use(Some(&first), t(60 + 3600));
        assert_eq!(later.last_used_at, Some(Time(t(60 + 3600))));
    }

    #[test]
    fn failure_keeps_key_fields_and_moves_transition_time() {
        let ready = ready_status(t(10), None);
        let failed = status_for(&StatusInput {
            previous: Some(&ready),
            generation: Some(1),
            secret_name: "key",
            current: None,
            records: &[],
            issued: None,
            last_used: None,
            policy: None,
            secret_version: None,
            outcome: &Outcome::Failed {
                reason: "DatabaseUnavailable".into(),
                message: "key database error: connection refused".into(),
            },
            verdict: None,
            usage: None,
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
            records: &[],
            issued: Some(0),
            last_used: None,
            policy: None,
            secret_version: None,
            outcome: &Outcome::SecretConflict {
                secret_name: "key".into(),
            },
            verdict: None,
            usage: None,
            now: t(0),
        });
        let condition = &status.conditions[0];
        assert_eq!(condition.reason, "SecretConflict");
        assert!(condition.message.contains("Secret key already exists"));
        assert_eq!(condition.observed_generation, Some(2));
        assert_eq!(status.key_id, None);
    }

    fn policy(
        rotation: crate::crd::RotationSpec,
        expires_after: Option<&str>,
        annotations: &[(&str, &str)],
    ) -> Policy {
        let mut spec = spec();
        spec.rotation = Some(rotation);
        spec.expires_after = expires_after.map(str::to_owned);
        let annotations = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Policy::from_spec(&spec, &annotations).unwrap()
    }

    fn every(schedule: &str, grace: &str) -> crate::crd::RotationSpec {
        crate::crd::RotationSpec {
            schedule: Some(schedule.into()),
            time_zone: None,
            grace_period: Some(grace.into()),
        }
    }

    fn requeue(decision: &Decision) -> Option<SignedDuration> {
        match decision {
            Decision::Converge { requeue_after, .. } => *requeue_after,
            Decision::SecretConflict => None,
        }
    }

    #[test]
    fn scheduled_rotation_issues_then_retires_the_old_key_for_the_grace_period() {
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let records = [record("a", KeyState::Active, t(0))];
        let early = decide_under(&p, &records, &owned("a"), t(19));
        assert_eq!(steps(early.clone()), vec![]);
        assert_eq!(
            requeue(&early),
            Some(SignedDuration::from_secs(1)),
            "wakes exactly at the rotation"
        );

        let due = decide_under(&p, &records, &owned("a"), t(20));
        assert_eq!(
            steps(due.clone()),
            vec![
                issue(IssueReason::Scheduled),
                Step::Retire {
                    key_id: "a".into(),
                    expires_at: t(30)
                }
            ]
        );
        assert_eq!(
            requeue(&due),
            Some(SignedDuration::from_secs(10)),
            "wakes at the end of the grace period"
        );
    }

    #[test]
    fn missed_slots_rotate_once() {
        // The operator was down for 100 slots: one rotation, then the next slot counts from now.
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let records = [record("a", KeyState::Active, t(0))];
        let decision = decide_under(&p, &records, &owned("a"), t(2000));
        let issued = steps(decision.clone())
            .iter()
            .filter(|s| matches!(s, Step::Issue { .. }))
            .count();
        assert_eq!(issued, 1);
        assert_eq!(requeue(&decision), Some(SignedDuration::from_secs(10)));
    }

    #[test]
    fn grace_period_end_revokes_the_retiring_key() {
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let mut new = record("b", KeyState::Active, t(20));
        new.issue_reason = IssueReason::Scheduled;
        let mut old = record("a", KeyState::Retiring, t(0));
        old.expires_at = Some(t(30));
        let records = [old, new];
        let during = decide_under(&p, &records, &owned("b"), t(29));
        assert_eq!(steps(during.clone()), vec![]);
        assert_eq!(requeue(&during), Some(SignedDuration::from_secs(1)));
        assert_eq!(
            steps(decide_under(&p, &records, &owned("b"), t(30))),
            vec![Step::Revoke {
                key_id: "a".into(),
                reason: RevokeReason::Rotated
            }]
        );
    }

    #[test]
    fn crash_after_rotating_retires_with_grace_counted_from_the_new_key() {
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let mut new = record("b", KeyState::Active, t(20));
        new.issue_reason = IssueReason::Scheduled;
        let records = [record("a", KeyState::Active, t(0)), new];
        assert_eq!(
            steps(decide_under(&p, &records, &owned("b"), t(25))),
            vec![Step::Retire {
                key_id: "a".into(),
                expires_at: t(30)
            }]
        );
        // Restarted after the grace period would have ended: revoke at once.
        assert_eq!(
            steps(decide_under(&p, &records, &owned("b"), t(31))),
            vec![Step::Revoke {
                key_id: "a".into(),
                reason: RevokeReason::Rotated
            }]
        );
    }

    #[test]
    fn a_rotate_annotation_is_handled_exactly_once() {
        let p = policy(
            crate::crd::RotationSpec::default(),
            None,
            &[("keyward.dev/rotate", "r1")],
        );
        let records = [record("a", KeyState::Active, t(0))];
        assert_eq!(
            steps(decide_under(&p, &records, &owned("a"), t(5))),
            vec![
                issue(IssueReason::Requested),
                Step::Retire {
                    key_id: "a".into(),
                    expires_at: t(5) + SignedDuration::from_hours(1)
                }
            ]
        );
        // The new key carries the request, so the same value does nothing more.
        let mut new = record("b", KeyState::Active, t(5));
        new.issue_reason = IssueReason::Requested;
        new.rotation_request = Some("r1".into());
        let mut old = record("a", KeyState::Retiring, t(0));
        old.expires_at = Some(t(3605));
        let records = [old, new];
        assert_eq!(steps(decide_under(&p, &records, &owned("b"), t(6))), vec![]);
        // A new value rotates again.
        let p2 = policy(
            crate::crd::RotationSpec::default(),
            None,
            &[("keyward.dev/rotate", "r2")],
        );
        assert!(matches!(
            steps(decide_under(&p2, &records, &owned("b"), t(7)))[0],
            Step::Issue {
                reason: IssueReason::Requested,
                ..
            }
        ));
    }

    #[test]
    fn emergency_rotation_revokes_every_previous_key_at_once() {
        let p = policy(
            every("@daily", "1h"),
            None,
            &[
                ("keyward.dev/rotate", "leak-1"),
                ("keyward.dev/revoke-previous", "now"),
            ],
        );
        let mut retiring = record("r", KeyState::Retiring, t(0));
        retiring.expires_at = Some(t(3600));
        let records = [retiring, record("a", KeyState::Active, t(10))];
        assert_eq!(
            steps(decide_under(&p, &records, &owned("a"), t(20))),
            vec![
                issue(IssueReason::Emergency),
                Step::Revoke {
                    key_id: "r".into(),
                    reason: RevokeReason::Emergency
                },
                Step::Revoke {
                    key_id: "a".into(),
                    reason: RevokeReason::Emergency
                },
                consume("leak-1"),
            ]
        );
    }

    fn consume(request: &str) -> Step {
        Step::ConsumeRevokePrevious {
            rotation_request: request.into(),
            value: "now".into(),
        }
    }

    #[test]
    fn revoke_previous_applies_to_exactly_one_rotate_request() {
        let emergency = policy(
            every("@daily", "1h"),
            None,
            &[
                ("keyward.dev/rotate", "leak-1"),
                ("keyward.dev/revoke-previous", "now"),
            ],
        );
        // A crash after the emergency rotation, before the annotation was removed:
        // nothing is issued again, and the annotation is removed.
        let mut new = record("b", KeyState::Active, t(20));
        new.issue_reason = IssueReason::Emergency;
        new.rotation_request = Some("leak-1".into());
        assert_eq!(
            steps(decide_under(&emergency, &[new.clone()], &owned("b"), t(30))),
            vec![consume("leak-1")]
        );
        // Months later a routine request, with the annotation gone, keeps a grace period.
        let routine = policy(
            every("@daily", "1h"),
            None,
            &[("keyward.dev/rotate", "routine-2")],
        );
        assert_eq!(
            steps(decide_under(&routine, &[new.clone()], &owned("b"), t(100))),
            vec![
                issue(IssueReason::Requested),
                Step::Retire {
                    key_id: "b".into(),
                    expires_at: t(100) + SignedDuration::from_hours(1)
                }
            ]
        );
        // revoke-previous set on its own, after a handled routine request, waits for
        // the next request and is not consumed by the old one.
        let mut routine_key = record("c", KeyState::Active, t(200));
        routine_key.issue_reason = IssueReason::Requested;
        routine_key.rotation_request = Some("routine-2".into());
        let armed = policy(
            every("@daily", "1h"),
            None,
            &[
                ("keyward.dev/rotate", "routine-2"),
                ("keyward.dev/revoke-previous", "now"),
            ],
        );
        assert_eq!(
            steps(decide_under(&armed, &[routine_key], &owned("c"), t(300))),
            vec![]
        );
    }

    #[test]
    fn expires_after_sets_and_follows_the_key_expiry() {
        let p = policy(crate::crd::RotationSpec::default(), Some("24h"), &[]);
        assert_eq!(
            steps(decide_under(&p, &[], &SecretView::Absent, t(0))),
            vec![Step::Issue {
                reason: IssueReason::Initial,
                expires_at: Some(t(86_400))
            }]
        );
        // A new or tightened expiresAfter brings the existing key's expiry forward; the key stays.
        let records = [record("a", KeyState::Active, t(0))];
        let decision = decide_under(&p, &records, &owned("a"), t(10));
        assert_eq!(
            steps(decision.clone()),
            vec![Step::ShortenExpiry {
                key_id: "a".into(),
                expires_at: t(86_400)
            }]
        );
        let mut settled = record("a", KeyState::Active, t(0));
        settled.expires_at = Some(t(86_400));
        let decision = decide_under(&p, &[settled.clone()], &owned("a"), t(10));
        assert_eq!(steps(decision.clone()), vec![]);
        assert_eq!(requeue(&decision), Some(SignedDuration::from_secs(86_390)));
        // A loosened or removed expiresAfter never extends the key it was issued with.
        for looser in [
            policy(crate::crd::RotationSpec::default(), Some("48h"), &[]),
            no_rotation(),
        ] {
            let decision = decide_under(&looser, &[settled.clone()], &owned("a"), t(10));
            assert_eq!(steps(decision.clone()), vec![]);
            assert_eq!(requeue(&decision), Some(SignedDuration::from_secs(86_390)));
        }
    }

    #[test]
    fn rotating_an_expired_key_never_brings_it_back() {
        // The key expired at t(15); a rotate request arrives at t(60).
        let p = policy(
            every("@daily", "1h"),
            Some("15s"),
            &[("keyward.dev/rotate", "renew")],
        );
        let mut expired = record("a", KeyState::Active, t(0));
        expired.expires_at = Some(t(15));
        assert_eq!(
            steps(decide_under(&p, &[expired], &owned("a"), t(60))),
            vec![
                Step::Issue {
                    reason: IssueReason::Requested,
                    expires_at: Some(t(75)),
                },
                Step::Revoke {
                    key_id: "a".into(),
                    reason: RevokeReason::Expired
                }
            ]
        );
    }

    #[test]
    fn a_grace_period_never_outlives_the_old_keys_own_expiry() {
        // The old key expires at t(600); a 1h grace period from t(100) would end at t(3700).
        let p = policy(
            every("@daily", "1h"),
            Some("24h"),
            &[("keyward.dev/rotate", "r1")],
        );
        let mut old = record("a", KeyState::Active, t(0));
        old.expires_at = Some(t(600));
        let decision = decide_under(&p, &[old.clone()], &owned("a"), t(100));
        assert_eq!(
            steps(decision.clone()),
            vec![
                Step::Issue {
                    reason: IssueReason::Requested,
                    expires_at: Some(t(100 + 86_400)),
                },
                Step::Retire {
                    key_id: "a".into(),
                    expires_at: t(600)
                }
            ]
        );
        assert_eq!(requeue(&decision), Some(SignedDuration::from_secs(500)));
        // After a crash between the new key's activation and the retire step, the same holds.
        let mut new = record("b", KeyState::Active, t(100));
        new.issue_reason = IssueReason::Requested;
        new.rotation_request = Some("r1".into());
        new.expires_at = Some(t(100 + 86_400));
        assert_eq!(
            steps(decide_under(
                &p,
                &[old.clone(), new.clone()],
                &owned("b"),
                t(200)
            )),
            vec![Step::Retire {
                key_id: "a".into(),
                expires_at: t(600)
            }]
        );
        // And once its own expiry has passed, it is revoked, not retired.
        assert_eq!(
            steps(decide_under(&p, &[old, new], &owned("b"), t(700))),
            vec![Step::Revoke {
                key_id: "a".into(),
                reason: RevokeReason::Expired
            }]
        );
    }

    #[test]
    fn a_schedule_change_recomputes_and_rotates_only_if_already_due() {
        // Key from t(0); @every 1h is not due at t(1800), @every 20m is.
        let records = [record("a", KeyState::Active, t(0))];
        let hourly = policy(every("@every 1h", "1m"), None, &[]);
        assert_eq!(
            steps(decide_under(&hourly, &records, &owned("a"), t(1800))),
            vec![]
        );
        let faster = policy(every("@every 20m", "1m"), None, &[]);
        assert!(matches!(
            steps(decide_under(&faster, &records, &owned("a"), t(1800)))[0],
            Step::Issue {
                reason: IssueReason::Scheduled,
                ..
            }
        ));
        let slower = policy(every("@every 2h", "1m"), None, &[]);
        let decision = decide_under(&slower, &records, &owned("a"), t(1800));
        assert_eq!(steps(decision.clone()), vec![]);
        assert_eq!(requeue(&decision), Some(SignedDuration::from_secs(5400)));
    }

    #[test]
    fn a_reissue_after_rotation_revokes_instead_of_retiring() {
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let records = [record("a", KeyState::Active, t(0))];
        assert_eq!(
            steps(decide_under(&p, &records, &SecretView::Absent, t(5))),
            vec![
                issue(IssueReason::SecretDeleted),
                Step::Revoke {
                    key_id: "a".into(),
                    reason: RevokeReason::Replaced
                }
            ]
        );
    }

    #[test]
    fn status_shows_rotation_times() {
        let p = policy(every("@every 20s", "10s"), Some("1h"), &[]);
        let mut current = record("b", KeyState::Active, t(20));
        current.issue_reason = IssueReason::Scheduled;
        current.expires_at = Some(t(3620));
        let mut old = record("a", KeyState::Retiring, t(0));
        old.expires_at = Some(t(30));
        let records = [old, current.clone()];
        let status = status_for(&StatusInput {
            previous: None,
            generation: Some(1),
            secret_name: "key",
            current: Some(&current),
            records: &records,
            issued: Some(2),
            last_used: None,
            policy: Some(&p),
            secret_version: None,
            outcome: &Outcome::Ready,
            verdict: None,
            usage: None,
            now: t(21),
        });
        assert_eq!(status.last_rotated_at, Some(Time(t(20))));
        assert_eq!(status.next_rotation_at, Some(Time(t(40))));
        assert_eq!(status.previous_key_expires_at, Some(Time(t(30))));
        assert_eq!(status.expires_at, Some(Time(t(3620))));
        assert_eq!(status.revision, Some(2));
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let mut bad = spec();
        bad.rotation = Some(every("61 * * * *", "1h"));
        let error = Policy::from_spec(&bad, &BTreeMap::new()).unwrap_err();
        assert!(error.starts_with("spec.rotation.schedule"), "{error}");
        bad.rotation = Some(every("@daily", "soon"));
        let error = Policy::from_spec(&bad, &BTreeMap::new()).unwrap_err();
        assert!(error.starts_with("spec.rotation.gracePeriod"), "{error}");
    }

    fn decision_parts(decision: Decision) -> (Vec<Step>, Option<String>) {
        match decision {
            Decision::Converge { steps, held, .. } => (steps, held),
            Decision::SecretConflict => panic!("unexpected conflict"),
        }
    }

    fn revoked(id: &str) -> Step {
        Step::Revoke {
            key_id: id.into(),
            reason: RevokeReason::PolicyViolation,
        }
    }

    #[test]
    fn a_forbidden_key_is_never_issued_whatever_the_action() {
        for action in [
            ViolationAction::Keep,
            ViolationAction::RefuseRotation,
            ViolationAction::Revoke,
        ] {
            let decision = decide_forbidden(&no_rotation(), &[], &SecretView::Absent, t(0), action);
            assert_eq!(requeue(&decision), None);
            assert_eq!(decision_parts(decision), (vec![], None), "{action:?}");
        }
    }

    #[test]
    fn a_forbidden_pending_key_is_revoked_not_activated() {
        let records = [record("p", KeyState::Pending, t(0))];
        let decision = decide_forbidden(
            &no_rotation(),
            &records,
            &owned("p"),
            t(1),
            ViolationAction::Keep,
        );
        assert_eq!(decision_parts(decision), (vec![revoked("p")], None));
    }

    #[test]
    fn keep_leaves_the_key_working_but_never_rotates_or_widens_it() {
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let mut a = record("a", KeyState::Active, t(0));
        a.metadata.scopes = vec!["old".into()];
        let decision = decide_forbidden(&p, &[a], &owned("a"), t(60), ViolationAction::Keep);
        // Overdue for rotation and with changed scopes: no Issue, no UpdateMetadata,
        // and no wake-up for a rotation that will not happen.
        assert_eq!(requeue(&decision), None);
        assert_eq!(decision_parts(decision), (vec![], Some("a".into())));
    }

    #[test]
    fn keep_still_shortens_expiry_and_ends_grace_periods() {
        let p = policy(every("@every 1h", "10s"), Some("30s"), &[]);
        let mut old = record("old", KeyState::Retiring, t(0));
        old.expires_at = Some(t(5));
        let records = [record("a", KeyState::Active, t(0)), old];
        let (steps, held) = decision_parts(decide_forbidden(
            &p,
            &records,
            &owned("a"),
            t(10),
            ViolationAction::Keep,
        ));
        assert_eq!(held, Some("a".into()));
        assert_eq!(
            steps,
            vec![
                Step::ShortenExpiry {
                    key_id: "a".into(),
                    expires_at: t(30)
                },
                Step::Revoke {
                    key_id: "old".into(),
                    reason: RevokeReason::Rotated
                }
            ]
        );
    }

    #[test]
    fn refuse_rotation_keeps_the_key_until_rotation_is_due_then_revokes_it() {
        let p = policy(every("@every 20s", "10s"), None, &[]);
        let records = [record("a", KeyState::Active, t(0))];
        let before = decide_forbidden(
            &p,
            &records,
            &owned("a"),
            t(10),
            ViolationAction::RefuseRotation,
        );
        assert_eq!(requeue(&before), Some(SignedDuration::from_secs(10)));
        assert_eq!(decision_parts(before), (vec![], Some("a".into())));
        let due = decide_forbidden(
            &p,
            &records,
            &owned("a"),
            t(20),
            ViolationAction::RefuseRotation,
        );
        assert_eq!(decision_parts(due), (vec![revoked("a")], None));
        // A rotate request counts as a rotation too.
        let requested = policy(every("@every 1h", "10s"), None, &[(ROTATE_ANNOTATION, "1")]);
        let decision = decide_forbidden(
            &requested,
            &records,
            &owned("a"),
            t(10),
            ViolationAction::RefuseRotation,
        );
        assert_eq!(decision_parts(decision), (vec![revoked("a")], None));
    }

    #[test]
    fn revoke_takes_every_live_key_away_at_once() {
        let mut retiring = record("old", KeyState::Retiring, t(0));
        retiring.expires_at = Some(t(100));
        let records = [record("a", KeyState::Active, t(0)), retiring];
        let decision = decide_forbidden(
            &no_rotation(),
            &records,
            &owned("a"),
            t(10),
            ViolationAction::Revoke,
        );
        assert_eq!(requeue(&decision), None);
        assert_eq!(
            decision_parts(decision),
            (vec![revoked("a"), revoked("old")], None)
        );
    }

    #[test]
    fn the_policy_condition_says_who_allows_or_forbids() {
        use crate::policy::{Verdict, Violation};
        let input = |verdict| {
            status_for(&StatusInput {
                previous: None,
                generation: Some(1),
                secret_name: "key",
                current: None,
                records: &[],
                issued: Some(0),
                last_used: None,
                policy: None,
                secret_version: None,
                outcome: &Outcome::PolicyViolation {
                    message: "forbidden".into(),
                },
                verdict: Some(verdict),
                usage: None,
                now: t(0),
            })
        };
        let forbidden = Verdict {
            governing: vec!["prod".into()],
            violations: vec![Violation {
                policy: Some("prod".into()),
                rule: "teams",
                message: "team \"x\" is not allowed".into(),
                action: ViolationAction::Keep,
            }],
            recheck_at: None,
        };
        let status = input(&forbidden);
        let ready = status.ready_condition().unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "PolicyViolation")
        );
        let compliant = status
            .conditions
            .iter()
            .find(|c| c.type_ == POLICY_COMPLIANT)
            .unwrap();
        assert_eq!(compliant.status, "False");
        assert_eq!(
            compliant.message,
            "ApiKeyPolicy prod rule teams: team \"x\" is not allowed"
        );
        let allowed = Verdict {
            governing: vec!["prod".into(), "base".into()],
            violations: vec![],
            recheck_at: None,
        };
        let status = input(&allowed);
        let compliant = status
            .conditions
            .iter()
            .find(|c| c.type_ == POLICY_COMPLIANT)
            .unwrap();
        assert_eq!(
            (compliant.status.as_str(), compliant.message.as_str()),
            ("True", "allowed by ApiKeyPolicy prod, base")
        );
    }
}
