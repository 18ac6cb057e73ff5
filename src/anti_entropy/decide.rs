//! The pure half of anti-entropy: given one live record of this cluster and
//! what the cluster says about its ApiKey, is the key accounted for?
//!
//! A key is valid only while the cluster that issued it says so. After a
//! restore or a failover the database can hold live records that the cluster
//! has since revoked; these rules find them without reading any Secret data.

use jiff::{SignedDuration, Timestamp};

use crate::{
    crd::ApiKeyStatus,
    operator::core::PENDING_TIMEOUT,
    store::{KeyState, LiveRow},
};

/// What the cluster says about one ApiKey, from the watch caches or from fresh GETs.
#[derive(Clone, Debug)]
pub struct Account<'a> {
    /// The ApiKey's `metadata.uid`.
    pub uid: &'a str,
    /// Its status; `None` when the object cannot be read as an ApiKey (its keys
    /// are then left alone: nothing here can tell which is current).
    pub status: Option<&'a ApiKeyStatus>,
    /// Whether the object could be read as an ApiKey.
    pub readable: bool,
    /// The `keyward.dev/key-id` annotation of the Secret this ApiKey controls:
    /// the key in its Secret.
    pub secret_key_id: Option<String>,
}

/// What to do about one live record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Accounted for: the current key, a previous key in its grace period, or
    /// a record too young to judge.
    Accounted,
    /// No ApiKey with this uid exists: revoke (`orphaned`) once a direct GET confirms.
    Orphaned,
    /// The ApiKey exists and names another current key, and this is no
    /// previous key in its grace period: revoke (`superseded`) once fresh reads confirm.
    Superseded,
    /// The cluster's view is ambiguous (no current key in status): let the
    /// reconciler, which reads the Secret, decide.
    Reconcile,
}

/// Status times are whole seconds; a record's expiry is in milliseconds.
const STATUS_ROUNDING: SignedDuration = SignedDuration::from_secs(1);

/// Judges one live record. `account` is the cached ApiKey with the record's
/// namespace and name, if any; `cluster` is this operator's `--cluster-name`.
pub fn judge(
    row: &LiveRow,
    account: Option<&Account<'_>>,
    cluster: &str,
    now: Timestamp,
) -> Finding {
    // Another cluster's key: only that cluster can say whether it lives.
    if row.cluster != cluster {
        return Finding::Accounted;
    }
    // The issue path inserts the record before it writes the Secret and status.
    if row.state == KeyState::Pending && now.duration_since(row.created_at) < PENDING_TIMEOUT {
        return Finding::Accounted;
    }
    let Some(account) = account.filter(|a| a.uid == row.apikey_uid) else {
        return Finding::Orphaned;
    };
    if !account.readable {
        return Finding::Accounted;
    }
    let Some(current) = account.status.and_then(|s| s.key_id.as_deref()) else {
        // A first key activated just before a crash, or a key a policy revoked
        // that a restore brought back: only the Secret tells them apart.
        return Finding::Reconcile;
    };
    if row.key_id == current || account.secret_key_id.as_deref() == Some(row.key_id.as_str()) {
        return Finding::Accounted;
    }
    if in_grace(row, account.status, now) {
        return Finding::Accounted;
    }
    Finding::Superseded
}

/// A retiring key whose grace period status still shows running.
fn in_grace(row: &LiveRow, status: Option<&ApiKeyStatus>, now: Timestamp) -> bool {
    let grace_ends = status.and_then(|s| s.previous_key_expires_at.as_ref());
    match (row.state, row.expires_at, grace_ends) {
        (KeyState::Retiring, Some(expires), Some(ends)) => {
            expires > now && expires <= ends.0 + STATUS_ROUNDING
        }
        _ => false,
    }
}

/// Whether an ApiKey's status names a current key that has no live record: a
/// restored database lost it, and the reconciler re-issues it.
pub fn lost_current_key(status: Option<&ApiKeyStatus>, live: &dyn Fn(&str) -> bool) -> bool {
    status
        .and_then(|s| s.key_id.as_deref())
        .is_some_and(|key_id| !live(key_id))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    const NOW: i64 = 10_000;
    const CLUSTER: &str = "eu-1";

    fn row(key_id: &str, state: KeyState, created: i64, expires: Option<i64>) -> LiveRow {
        LiveRow {
            key_id: key_id.into(),
            apikey_uid: "uid-1".into(),
            namespace: "team".into(),
            name: "search".into(),
            state,
            created_at: at(created),
            expires_at: expires.map(at),
            cluster: CLUSTER.into(),
        }
    }

    fn status(current: Option<&str>, grace_ends: Option<i64>) -> ApiKeyStatus {
        ApiKeyStatus {
            key_id: current.map(String::from),
            previous_key_expires_at: grace_ends.map(|s| Time(at(s))),
            ..ApiKeyStatus::default()
        }
    }

    fn account<'a>(status: &'a ApiKeyStatus, secret: Option<&'a str>) -> Account<'a> {
        Account {
            uid: "uid-1",
            status: Some(status),
            readable: true,
            secret_key_id: secret.map(String::from),
        }
    }

    fn old(key_id: &str, state: KeyState) -> LiveRow {
        row(key_id, state, NOW - 3_600, None)
    }

    #[test]
    fn a_record_without_its_apikey_is_orphaned() {
        assert_eq!(
            judge(&old("kid_a", KeyState::Active), None, CLUSTER, at(NOW)),
            Finding::Orphaned
        );
    }

    #[test]
    fn an_apikey_recreated_under_the_same_name_does_not_own_the_old_records() {
        let status = status(Some("kid_new"), None);
        let recreated = Account {
            uid: "uid-2",
            ..account(&status, Some("kid_new"))
        };
        assert_eq!(
            judge(
                &old("kid_a", KeyState::Active),
                Some(&recreated),
                CLUSTER,
                at(NOW)
            ),
            Finding::Orphaned
        );
    }

    #[test]
    fn a_young_pending_record_is_left_alone_even_without_its_apikey() {
        let young = row("kid_p", KeyState::Pending, NOW - 119, None);
        assert_eq!(judge(&young, None, CLUSTER, at(NOW)), Finding::Accounted);
        let stale = row("kid_p", KeyState::Pending, NOW - 121, None);
        assert_eq!(judge(&stale, None, CLUSTER, at(NOW)), Finding::Orphaned);
    }

    #[test]
    fn the_current_key_and_the_key_in_the_secret_are_accounted_for() {
        let status = status(Some("kid_cur"), None);
        let account = account(&status, Some("kid_next"));
        for key_id in ["kid_cur", "kid_next"] {
            assert_eq!(
                judge(
                    &old(key_id, KeyState::Active),
                    Some(&account),
                    CLUSTER,
                    at(NOW)
                ),
                Finding::Accounted,
                "{key_id}"
            );
        }
    }

    #[test]
    fn a_key_an_emergency_rotation_revoked_is_superseded_when_a_restore_brings_it_back() {
        let status = status(Some("kid_cur"), None);
        let account = account(&status, Some("kid_cur"));
        for state in [KeyState::Active, KeyState::Retiring, KeyState::Pending] {
            assert_eq!(
                judge(&old("kid_old", state), Some(&account), CLUSTER, at(NOW)),
                Finding::Superseded,
                "{state}"
            );
        }
    }

    #[test]
    fn a_previous_key_in_its_grace_period_is_accounted_for_until_it_ends() {
        let grace_ends = NOW + 600;
        let status = status(Some("kid_cur"), Some(grace_ends));
        let account = account(&status, Some("kid_cur"));
        let retiring = row(
            "kid_prev",
            KeyState::Retiring,
            NOW - 3_600,
            Some(grace_ends),
        );
        assert_eq!(
            judge(&retiring, Some(&account), CLUSTER, at(NOW)),
            Finding::Accounted
        );
        // Over: the reconciler revokes it (rotated); it does not verify anyway.
        assert_eq!(
            judge(&retiring, Some(&account), CLUSTER, at(grace_ends + 1)),
            Finding::Superseded
        );
        // A retiring key that outlives the grace period status shows is not one.
        let longer = row(
            "kid_prev",
            KeyState::Retiring,
            NOW - 3_600,
            Some(grace_ends + 60),
        );
        assert_eq!(
            judge(&longer, Some(&account), CLUSTER, at(NOW)),
            Finding::Superseded
        );
        // An active key is never in a grace period.
        let active = row("kid_prev", KeyState::Active, NOW - 3_600, Some(grace_ends));
        assert_eq!(
            judge(&active, Some(&account), CLUSTER, at(NOW)),
            Finding::Superseded
        );
    }

    #[test]
    fn a_grace_period_status_no_longer_shows_is_over() {
        let status = status(Some("kid_cur"), None);
        let account = account(&status, Some("kid_cur"));
        let retiring = row("kid_prev", KeyState::Retiring, NOW - 3_600, Some(NOW + 600));
        assert_eq!(
            judge(&retiring, Some(&account), CLUSTER, at(NOW)),
            Finding::Superseded
        );
    }

    #[test]
    fn without_a_current_key_in_status_the_reconciler_decides() {
        let status = status(None, None);
        let account = account(&status, Some("kid_a"));
        assert_eq!(
            judge(
                &old("kid_a", KeyState::Active),
                Some(&account),
                CLUSTER,
                at(NOW)
            ),
            Finding::Reconcile
        );
    }

    #[test]
    fn another_clusters_records_are_never_judged() {
        let theirs = LiveRow {
            cluster: "us-1".into(),
            ..old("kid_a", KeyState::Active)
        };
        assert_eq!(judge(&theirs, None, CLUSTER, at(NOW)), Finding::Accounted);
    }

    #[test]
    fn the_keys_of_an_object_that_cannot_be_read_are_left_alone() {
        let unreadable = Account {
            uid: "uid-1",
            status: None,
            readable: false,
            secret_key_id: None,
        };
        assert_eq!(
            judge(
                &old("kid_a", KeyState::Active),
                Some(&unreadable),
                CLUSTER,
                at(NOW)
            ),
            Finding::Accounted
        );
    }

    #[test]
    fn a_current_key_without_a_live_record_was_lost() {
        let status = status(Some("kid_cur"), None);
        assert!(lost_current_key(Some(&status), &|id| id == "kid_other"));
        assert!(!lost_current_key(Some(&status), &|id| id == "kid_cur"));
        assert!(!lost_current_key(Some(&ApiKeyStatus::default()), &|_| {
            false
        }));
    }
}
