//! Pure decisions about usage: the per-ApiKey summary built from the key
//! database's counts, when status may show a new one (at most once an hour),
//! the `PreviousKeyInUse` condition and the `RevokedKeyInUse` report.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{DAY, HOUR, Outcome, day_start, hour_start};
use crate::{
    crd::{ApiKeyStatus, PREVIOUS_KEY_IN_USE, UsageSeries, UsageStatus},
    store::{KeyRecord, KeyState},
};

/// Days in `status.usage.daily`.
pub const DAYS: i64 = 30;
/// Hours in `status.usage.hourly`.
pub const HOURS: i64 = 24;
/// `status.usage` is rewritten at most this often per ApiKey.
pub const SUMMARY_RESOLUTION: SignedDuration = SignedDuration::from_hours(1);
/// The previous key counts as in use while a verifier saw it this recently
/// (last-used times are per minute and flushed about once a minute).
pub const IN_USE_WINDOW: SignedDuration = SignedDuration::from_mins(3);
/// A `RevokedKeyInUse` Event is published at most this often per ApiKey.
pub const REPORT_INTERVAL: SignedDuration = SignedDuration::from_hours(1);

/// Counts per bucket and outcome, built from rows of (bucket start, outcome, n).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buckets {
    by_outcome: [Vec<i64>; Outcome::COUNT],
}

impl Buckets {
    fn add(&mut self, len: usize, index: usize, outcome: Outcome, n: i64) {
        let series = &mut self.by_outcome[outcome.index()];
        if series.is_empty() {
            series.resize(len, 0);
        }
        series[index] = series[index].saturating_add(n);
    }

    fn total(&self, range: std::ops::Range<usize>, outcomes: &[Outcome]) -> i64 {
        outcomes
            .iter()
            .map(|o| {
                let series = &self.by_outcome[o.index()];
                series.get(range.clone()).map_or(0, |s| s.iter().sum())
            })
            .sum()
    }

    fn series(&self, start: i64) -> UsageSeries {
        let [valid, insufficient_scope, revoked, expired] = self.by_outcome.clone();
        UsageSeries {
            start: Time(Timestamp::from_second(start).unwrap_or_default()),
            valid,
            insufficient_scope,
            revoked,
            expired,
        }
    }
}

/// One ApiKey's counts over the summary's windows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Per day, [`DAYS`] up to today.
    pub daily: Buckets,
    /// Per hour, [`HOURS`] up to the current hour.
    pub hourly: Buckets,
}

/// Where the summary's windows start at `now`: (first day, first hour), epoch seconds.
pub fn windows(now: Timestamp) -> (i64, i64) {
    (
        day_start(now) - (DAYS - 1) * DAY.as_secs(),
        hour_start(now) - (HOURS - 1) * HOUR.as_secs(),
    )
}

/// Builds the summaries from the key database's rows: `daily` as (ApiKey uid,
/// day start, outcome, n) and `hourly` as (ApiKey uid, hour start, outcome,
/// n), epoch seconds. Rows outside the windows are ignored.
#[derive(Debug)]
pub struct SummaryBuilder {
    first_day: i64,
    first_hour: i64,
    /// Every ApiKey with a count in the windows.
    pub summaries: HashMap<String, Summary>,
}

impl SummaryBuilder {
    /// An empty builder for the windows at `now`.
    pub fn new(now: Timestamp) -> Self {
        let (first_day, first_hour) = windows(now);
        Self {
            first_day,
            first_hour,
            summaries: HashMap::new(),
        }
    }

    /// Adds a per-day row.
    pub fn day(&mut self, uid: &str, day: i64, outcome: Outcome, n: i64) {
        if let Some(index) = bucket(day, self.first_day, DAY, DAYS) {
            self.entry(uid).daily.add(DAYS as usize, index, outcome, n);
        }
    }

    /// Adds a per-hour row.
    pub fn hour(&mut self, uid: &str, hour: i64, outcome: Outcome, n: i64) {
        if let Some(index) = bucket(hour, self.first_hour, HOUR, HOURS) {
            self.entry(uid)
                .hourly
                .add(HOURS as usize, index, outcome, n);
        }
    }

    fn entry(&mut self, uid: &str) -> &mut Summary {
        if !self.summaries.contains_key(uid) {
            self.summaries.insert(uid.to_owned(), Summary::default());
        }
        self.summaries.get_mut(uid).expect("just inserted")
    }
}

fn bucket(start: i64, first: i64, width: SignedDuration, len: i64) -> Option<usize> {
    let offset = start - first;
    let index = offset.div_euclid(width.as_secs());
    (offset >= 0 && index < len).then(|| usize::try_from(index).unwrap_or(0))
}

/// The status summary of `summary` at `now` (`None`: no count in 30 days).
pub fn usage_status(summary: Option<&Summary>, now: Timestamp) -> UsageStatus {
    let (first_day, first_hour) = windows(now);
    let empty = Summary::default();
    let summary = summary.unwrap_or(&empty);
    let hours = 0..HOURS as usize;
    let week = (DAYS - 7) as usize..DAYS as usize;
    UsageStatus {
        updated_at: Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
        last24h: summary.hourly.total(hours.clone(), &Outcome::ALL),
        last7d: summary.daily.total(week, &Outcome::ALL),
        refused_last24h: summary.hourly.total(
            hours,
            &[
                Outcome::InsufficientScope,
                Outcome::Revoked,
                Outcome::Expired,
            ],
        ),
        daily: summary.daily.series(first_day),
        hourly: summary.hourly.series(first_hour),
    }
}

/// What status should show as `usage`: the shown summary until it is an hour
/// old, then a new one if the figures moved. Without a summary from the key
/// database yet (`summaries` is `None` right after the operator starts), the
/// shown one stays. An ApiKey never counted has none.
pub fn usage_to_show(
    shown: Option<&UsageStatus>,
    summaries: Option<&HashMap<String, Summary>>,
    uid: &str,
    now: Timestamp,
) -> Option<UsageStatus> {
    let Some(summaries) = summaries else {
        return shown.cloned();
    };
    let summary = summaries.get(uid);
    if summary.is_none() && shown.is_none() {
        return None;
    }
    if let Some(shown) = shown
        && now.duration_since(shown.updated_at.0) < SUMMARY_RESOLUTION
    {
        return Some(shown.clone());
    }
    let fresh = usage_status(summary, now);
    match shown {
        Some(shown) if same_figures(shown, &fresh) => Some(shown.clone()),
        _ => Some(fresh),
    }
}

/// Whether two summaries show the same figures, whenever they were computed.
/// The series' starts are left out: an idle key's windows move every hour,
/// but while its counts stay zero (or out of the windows) nothing is written.
fn same_figures(a: &UsageStatus, b: &UsageStatus) -> bool {
    let values = |s: &UsageSeries| {
        (
            s.valid.clone(),
            s.insufficient_scope.clone(),
            s.revoked.clone(),
            s.expired.clone(),
        )
    };
    a.last24h == b.last24h
        && a.last7d == b.last7d
        && a.refused_last24h == b.refused_last24h
        && values(&a.daily) == values(&b.daily)
        && values(&a.hourly) == values(&b.hourly)
}

/// A retiring or revoked key's recent checks, from the leader's scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentUse {
    /// The key.
    pub key_id: String,
    /// Retiring or revoked.
    pub state: KeyState,
    /// The minute a verifier last saw it verify.
    pub last_used: Option<Timestamp>,
    /// Retiring: the end of its grace period.
    pub expires_at: Option<Timestamp>,
    /// Revoked: when.
    pub revoked_at: Option<Timestamp>,
    /// Revoked: why (the database spelling).
    pub revoke_reason: Option<String>,
    /// Checks since [`since`](Self::since) that verified (valid, insufficient scope).
    pub used: i64,
    /// Checks since `since` refused because the key was revoked.
    pub refused_revoked: i64,
    /// The start of the window the counts cover.
    pub since: Timestamp,
}

/// Where the leader's scan of recent use starts: the previous hour's start.
pub fn recent_window(now: Timestamp) -> Timestamp {
    Timestamp::from_second(hour_start(now) - HOUR.as_secs()).unwrap_or(now)
}

/// The previous key clients still present, if any: a retiring key of `records`
/// a verifier saw verify within [`IN_USE_WINDOW`].
pub fn previous_in_use<'a>(
    recent: &'a [RecentUse],
    records: &[KeyRecord],
    now: Timestamp,
) -> Option<&'a RecentUse> {
    recent.iter().find(|u| {
        u.state == KeyState::Retiring
            && records
                .iter()
                .any(|r| r.key_id == u.key_id && r.state == KeyState::Retiring)
            && u.last_used
                .is_some_and(|at| now.duration_since(at) < IN_USE_WINDOW)
    })
}

/// The `PreviousKeyInUse` condition: True while clients present a previous
/// key in its grace period; False once they stop (only after it was True, so
/// keys that never rotate carry no such condition). `recent` is `None` before
/// the leader's first scan: the shown condition stays.
pub fn previous_key_condition(
    shown: Option<&ApiKeyStatus>,
    recent: Option<&[RecentUse]>,
    records: &[KeyRecord],
    secret_name: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Condition> {
    let shown = shown.and_then(|s| s.condition(PREVIOUS_KEY_IN_USE));
    let Some(recent) = recent else {
        return shown.cloned();
    };
    let (status, reason, message) = match previous_in_use(recent, records, now) {
        // The message is written when the condition turns True, not on every
        // count: a busy key would otherwise rewrite status at every reconcile.
        Some(_) if shown.is_some_and(|c| c.status == "True") => return shown.cloned(),
        Some(used) => (
            "True",
            "PreviousKeyInUse",
            format!(
                "{} requests since {} UTC presented the previous key {}, last at {}; it stops working at {}. \
                 Make every client read the new key from Secret {secret_name} before then, or it breaks",
                used.used,
                hour_minute(used.since),
                used.key_id,
                hour_minute(used.last_used.unwrap_or(now)),
                used.expires_at
                    .map_or("the end of its grace period".to_owned(), |t| t.to_string()),
            ),
        ),
        None => {
            let shown = shown?;
            if shown.status == "False" {
                return Some(shown.clone());
            }
            (
                "False",
                "PreviousKeyNotInUse",
                format!(
                    "no client presented a previous key in the last {} minutes",
                    IN_USE_WINDOW.as_mins()
                ),
            )
        }
    };
    Some(Condition {
        type_: PREVIOUS_KEY_IN_USE.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
    })
}

/// A revoked key of this ApiKey that clients still present, when a
/// `RevokedKeyInUse` report is due (none within [`REPORT_INTERVAL`]): the
/// Event's note.
pub fn revoked_key_report(
    last_reported: Option<Timestamp>,
    recent: &[RecentUse],
    now: Timestamp,
) -> Option<String> {
    if last_reported.is_some_and(|at| now.duration_since(at) < REPORT_INTERVAL) {
        return None;
    }
    let used = recent
        .iter()
        .filter(|u| u.state == KeyState::Revoked && u.refused_revoked > 0)
        .max_by_key(|u| u.refused_revoked)?;
    let why = match used.revoke_reason.as_deref() {
        Some("rotated") => "by rotation: a client did not pick up the new key".to_owned(),
        Some("emergency") => {
            "by an emergency rotation: a client still holds the key it replaced".to_owned()
        }
        Some(reason) => format!("({reason})"),
        None => String::new(),
    };
    Some(format!(
        "{} requests since {} UTC presented key {}, revoked at {} {why}",
        used.refused_revoked,
        hour_minute(used.since),
        used.key_id,
        used.revoked_at.map_or("?".to_owned(), |t| t.to_string()),
    ))
}

fn hour_minute(at: Timestamp) -> String {
    at.strftime("%H:%M").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{IssueReason, KeyMetadata};

    /// 2027-01-15T10:30:00Z.
    fn now() -> Timestamp {
        "2027-01-15T10:30:00Z".parse().unwrap()
    }

    fn secs(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn the_summary_counts_the_windows_and_nothing_outside_them() {
        let mut builder = SummaryBuilder::new(now());
        // The current hour and the first hour of the 24-hour window.
        builder.hour("u", secs("2027-01-15T10:00:00Z"), Outcome::Valid, 5);
        builder.hour("u", secs("2027-01-14T11:00:00Z"), Outcome::Revoked, 2);
        // An hour just before the window.
        builder.hour("u", secs("2027-01-14T10:00:00Z"), Outcome::Valid, 100);
        builder.day("u", secs("2027-01-15T00:00:00Z"), Outcome::Valid, 5);
        builder.day("u", secs("2027-01-09T00:00:00Z"), Outcome::Valid, 7);
        builder.day("u", secs("2027-01-08T00:00:00Z"), Outcome::Valid, 1_000);
        builder.day("u", secs("2026-12-17T00:00:00Z"), Outcome::Expired, 3);
        builder.day("u", secs("2026-12-16T00:00:00Z"), Outcome::Valid, 9_999);
        let status = usage_status(builder.summaries.get("u"), now());
        assert_eq!(status.last24h, 7);
        assert_eq!(status.refused_last24h, 2);
        assert_eq!(status.last7d, 12, "the 7 days up to today");
        assert_eq!(
            status.daily.start.0,
            "2026-12-17T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(status.daily.valid.len(), 30);
        assert_eq!(status.daily.valid[29], 5);
        assert_eq!(status.daily.valid[0], 0);
        assert_eq!(status.daily.expired[0], 3);
        assert!(status.daily.insufficient_scope.is_empty(), "never seen");
        assert_eq!(
            status.hourly.start.0,
            "2027-01-14T11:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(status.hourly.valid[23], 5);
        assert_eq!(status.hourly.revoked[0], 2);
    }

    #[test]
    fn status_shows_a_new_summary_at_most_hourly_and_only_when_it_moved() {
        let mut builder = SummaryBuilder::new(now());
        builder.hour("u", secs("2027-01-15T10:00:00Z"), Outcome::Valid, 5);
        builder.day("u", secs("2027-01-15T00:00:00Z"), Outcome::Valid, 5);
        let summaries = builder.summaries;
        // Never counted: nothing.
        assert_eq!(usage_to_show(None, Some(&summaries), "other", now()), None);
        // Not loaded yet: what is shown stays.
        assert_eq!(usage_to_show(None, None, "u", now()), None);
        // First counts: at once.
        let first = usage_to_show(None, Some(&summaries), "u", now()).unwrap();
        assert_eq!(first.last24h, 5);
        // Within the hour, never rewritten, whatever the counts say.
        let mut more = summaries.clone();
        more.get_mut("u").unwrap().hourly = Buckets::default();
        let later = now() + SignedDuration::from_mins(59);
        assert_eq!(
            usage_to_show(Some(&first), Some(&more), "u", later),
            Some(first.clone())
        );
        // An hour on, the same counts sit one bucket further back: rewritten.
        let hour_on = now() + SignedDuration::from_mins(60);
        let mut same = SummaryBuilder::new(hour_on);
        same.hour("u", secs("2027-01-15T10:00:00Z"), Outcome::Valid, 5);
        same.day("u", secs("2027-01-15T00:00:00Z"), Outcome::Valid, 5);
        let shifted = usage_to_show(Some(&first), Some(&same.summaries), "u", hour_on).unwrap();
        assert_eq!(
            shifted.updated_at.0, hour_on,
            "the hour moved one bucket back"
        );
        assert_eq!(shifted.hourly.valid[22], 5);
        // An hour on, with new counts: rewritten.
        same.hour("u", secs("2027-01-15T11:00:00Z"), Outcome::Valid, 1);
        let moved = usage_to_show(Some(&first), Some(&same.summaries), "u", hour_on).unwrap();
        assert_eq!(moved.last24h, 6);
        assert_eq!(moved.updated_at.0, hour_on);
        // Counts aged out of every window: zeros, not "never used".
        let idle = now() + SignedDuration::from_hours(24 * 31);
        let gone = usage_to_show(Some(&moved), Some(&HashMap::new()), "u", idle).unwrap();
        assert_eq!((gone.last24h, gone.last7d), (0, 0));
        // And idle from then on: never rewritten, though the windows move.
        let idler = idle + SignedDuration::from_hours(5);
        assert_eq!(
            usage_to_show(Some(&gone), Some(&HashMap::new()), "u", idler),
            Some(gone)
        );
    }

    fn record(key_id: &str, state: KeyState) -> KeyRecord {
        KeyRecord {
            key_id: key_id.into(),
            key_hash: crate::key::KeyHash::of(key_id.as_bytes()),
            key_hint: "kw_x".into(),
            apikey_uid: "u".into(),
            namespace: "ns".into(),
            name: "n".into(),
            metadata: KeyMetadata {
                owner: "o".into(),
                team: "t".into(),
                scopes: vec![],
            },
            state,
            created_at: now(),
            activated_at: None,
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            issue_reason: IssueReason::Initial,
            rotation_request: None,
            cluster: "default".into(),
        }
    }

    fn recent(key_id: &str, state: KeyState, last_used: Timestamp) -> RecentUse {
        RecentUse {
            key_id: key_id.into(),
            state,
            last_used: Some(last_used),
            expires_at: Some(now() + SignedDuration::from_hours(1)),
            revoked_at: (state == KeyState::Revoked).then(now),
            revoke_reason: (state == KeyState::Revoked).then(|| "rotated".into()),
            used: 37,
            refused_revoked: if state == KeyState::Revoked { 12 } else { 0 },
            since: recent_window(now()),
        }
    }

    #[test]
    fn the_previous_key_condition_turns_true_stays_and_clears() {
        let records = [
            record("kid_new", KeyState::Active),
            record("kid_old", KeyState::Retiring),
        ];
        let condition = |shown: Option<&ApiKeyStatus>, recent: Option<&[RecentUse]>, at| {
            previous_key_condition(shown, recent, &records, "s", Some(1), at)
        };
        // No previous key in use, never was: no condition at all.
        assert_eq!(condition(None, Some(&[]), now()), None);
        // The retiring key verified a minute ago: True, with counts and the deadline.
        let used = [recent(
            "kid_old",
            KeyState::Retiring,
            now() - SignedDuration::from_mins(1),
        )];
        let on = condition(None, Some(&used), now()).unwrap();
        assert_eq!(
            (on.status.as_str(), on.reason.as_str()),
            ("True", "PreviousKeyInUse")
        );
        assert!(
            on.message.contains("37 requests since 09:00 UTC"),
            "{}",
            on.message
        );
        assert!(on.message.contains("kid_old"));
        assert!(on.message.contains("2027-01-15T11:30:00Z"));
        let shown = ApiKeyStatus {
            conditions: vec![on.clone()],
            ..ApiKeyStatus::default()
        };
        // Still used, with other counts: the shown condition stays as is.
        let later = now() + SignedDuration::from_mins(10);
        let busier = [RecentUse {
            used: 500,
            ..recent("kid_old", KeyState::Retiring, later)
        }];
        assert_eq!(
            condition(Some(&shown), Some(&busier), later),
            Some(on.clone())
        );
        // Before the leader's first scan: unchanged.
        assert_eq!(condition(Some(&shown), None, later), Some(on.clone()));
        // Use stopped: False.
        let quiet = now() + IN_USE_WINDOW;
        let off = condition(Some(&shown), Some(&used), quiet).unwrap();
        assert_eq!(
            (off.status.as_str(), off.reason.as_str()),
            ("False", "PreviousKeyNotInUse")
        );
        // A key no longer retiring (revoked at the end of its grace) is not "previous".
        let gone = [record("kid_new", KeyState::Active)];
        assert_eq!(
            previous_key_condition(Some(&shown), Some(&used), &gone, "s", Some(1), now())
                .unwrap()
                .status,
            "False"
        );
    }

    #[test]
    fn a_revoked_key_in_use_is_reported_at_most_hourly() {
        let used = [recent("kid_old", KeyState::Revoked, now())];
        let note = revoked_key_report(None, &used, now()).unwrap();
        assert!(note.starts_with("12 requests since 09:00 UTC presented key kid_old, revoked at 2027-01-15T10:30:00Z by rotation"), "{note}");
        assert_eq!(
            revoked_key_report(Some(now() - SignedDuration::from_mins(59)), &used, now()),
            None
        );
        assert!(revoked_key_report(Some(now() - REPORT_INTERVAL), &used, now()).is_some());
        // Only attempts refused as revoked count.
        let retiring = [recent("kid_old", KeyState::Retiring, now())];
        assert_eq!(revoked_key_report(None, &retiring, now()), None);
    }
}
