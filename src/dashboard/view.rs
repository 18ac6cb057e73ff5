//! The pages' view model: what a key's row and page show, decided from the
//! ApiKey and `now` alone, so it is tested without a server or a browser.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;

use crate::crd::{ApiKey, ApiKeyStatus, POLICY_COMPLIANT, PREVIOUS_KEY_IN_USE, UsageSeries};

/// A key unused this long is flagged (the platforms' "idle key" warning).
pub const UNUSED_AFTER: SignedDuration = SignedDuration::from_hours(30 * 24);
/// A key that expires within this long is flagged.
pub const EXPIRING_WITHIN: SignedDuration = SignedDuration::from_hours(7 * 24);
/// Rows on one page of the key list.
pub const PAGE_SIZE: usize = 100;

/// Where a key is in its life, as the list shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Ready=True: the Secret holds an active key.
    Ready,
    /// No Ready condition yet: the operator has not reported on it.
    Pending,
    /// Ready=False, with the condition's reason and message.
    NotReady {
        /// The condition's reason, e.g. `PolicyViolation`.
        reason: String,
        /// The condition's message: what to fix.
        message: String,
    },
    /// Deleted and waiting for its keys to be revoked.
    Revoking,
}

impl State {
    /// The word shown in the state column.
    pub fn label(&self) -> &str {
        match self {
            State::Ready => "Ready",
            State::Pending => "Pending",
            State::NotReady { reason, .. } => reason,
            State::Revoking => "Revoking",
        }
    }
}

/// Why a key stands out in the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attention {
    /// Ready is False.
    NotReady,
    /// An ApiKeyPolicy forbids it (PolicyCompliant=False).
    PolicyViolation,
    /// Clients still present the previous key, and break when its grace period ends.
    PreviousKeyInUse,
    /// Its key expires within [`EXPIRING_WITHIN`], or has expired.
    Expiring,
    /// Not used for [`UNUSED_AFTER`] (or never, and older than that).
    Unused,
}

impl Attention {
    /// The flag's short text.
    pub fn label(self) -> &'static str {
        match self {
            Attention::NotReady => "not ready",
            Attention::PolicyViolation => "policy violation",
            Attention::PreviousKeyInUse => "previous key in use",
            Attention::Expiring => "expiring",
            Attention::Unused => "unused 30 days",
        }
    }
}

/// One row of the key list.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRow {
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub name: String,
    /// `spec.owner`.
    pub owner: String,
    /// `spec.team`.
    pub team: String,
    /// `spec.scopes`.
    pub scopes: Vec<String>,
    /// The state column.
    pub state: State,
    /// When the ApiKey was created.
    pub created: Option<Timestamp>,
    /// `status.lastUsedAt`; `None` is "never".
    pub last_used: Option<Timestamp>,
    /// `status.usage.last24h`.
    pub requests_24h: i64,
    /// Requests per day, oldest first, for the 30-day sparkline (empty without usage).
    pub daily: Vec<i64>,
    /// `status.nextRotationAt`.
    pub next_rotation: Option<Timestamp>,
    /// `status.expiresAt`.
    pub expires: Option<Timestamp>,
    /// `None` before the operator checked the policies, else whether they allow the key,
    /// with the policies it breaks.
    pub policy: Option<Result<(), Vec<String>>>,
    /// Why it stands out, most urgent first; empty when it does not.
    pub attention: Vec<Attention>,
}

impl KeyRow {
    /// The row for one ApiKey at `now`.
    pub fn new(key: &ApiKey, now: Timestamp) -> Self {
        let unset = ApiKeyStatus::default();
        let status = key.status.as_ref().unwrap_or(&unset);
        let state = state(key);
        let policy = status.condition(POLICY_COMPLIANT).map(|c| {
            if c.status == "True" {
                Ok(())
            } else {
                Err(status.violated_policies.clone())
            }
        });
        let attention = attention(key, now);
        let daily = status
            .usage
            .as_ref()
            .map(|u| aligned_daily(&u.daily, now))
            .unwrap_or_default();
        Self {
            namespace: key.namespace().unwrap_or_default(),
            name: key.name_any(),
            owner: key.spec.owner.clone(),
            team: key.spec.team.clone(),
            scopes: key.spec.scopes.clone(),
            state,
            created: key.metadata.creation_timestamp.as_ref().map(|t| t.0),
            last_used: status.last_used_at.as_ref().map(|t| t.0),
            requests_24h: status.usage.as_ref().map_or(0, |u| u.last24h),
            daily,
            next_rotation: status.next_rotation_at.as_ref().map(|t| t.0),
            expires: status.expires_at.as_ref().map(|t| t.0),
            policy,
            attention,
        }
    }
}

/// Why a key stands out at `now`, most urgent first; empty when it does not.
pub fn attention(key: &ApiKey, now: Timestamp) -> Vec<Attention> {
    let mut flags = Vec::new();
    if matches!(state(key), State::NotReady { .. }) {
        flags.push(Attention::NotReady);
    }
    let Some(status) = key.status.as_ref() else {
        return flags;
    };
    if status
        .condition(POLICY_COMPLIANT)
        .is_some_and(|c| c.status != "True")
    {
        flags.push(Attention::PolicyViolation);
    }
    if status
        .condition(PREVIOUS_KEY_IN_USE)
        .is_some_and(|c| c.status == "True")
    {
        flags.push(Attention::PreviousKeyInUse);
    }
    if status
        .expires_at
        .as_ref()
        .is_some_and(|at| at.0 <= now + EXPIRING_WITHIN)
    {
        flags.push(Attention::Expiring);
    }
    let idle_since = status
        .last_used_at
        .as_ref()
        .or(key.metadata.creation_timestamp.as_ref());
    if idle_since.is_some_and(|since| since.0 <= now - UNUSED_AFTER) {
        flags.push(Attention::Unused);
    }
    flags
}

/// The key's state from its deletion mark and Ready condition.
pub fn state(key: &ApiKey) -> State {
    if key.metadata.deletion_timestamp.is_some() {
        return State::Revoking;
    }
    match key.ready_condition() {
        None => State::Pending,
        Some(c) if c.status == "True" => State::Ready,
        Some(c) => State::NotReady {
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
    }
}

/// Days in the sparkline and the usage chart.
pub const DAYS: usize = 30;

/// The daily totals of the 30 UTC days that end with `now`'s day, oldest first:
/// `status.usage` is rewritten at most hourly, so its window may start a day
/// earlier than today's, and days it does not cover count zero.
pub fn aligned_daily(daily: &UsageSeries, now: Timestamp) -> Vec<i64> {
    let totals = daily.totals();
    shift_days(&totals, daily.start.0, now)
}

/// `values`, one per UTC day from `start`, placed on the [`DAYS`] days that end with `now`'s.
fn shift_days(values: &[i64], start: Timestamp, now: Timestamp) -> Vec<i64> {
    let day = SignedDuration::from_hours(24);
    let today = now.as_second().div_euclid(86_400) * 86_400;
    let first = Timestamp::from_second(today).unwrap_or(now) - day * (DAYS as i32 - 1);
    let offset = start.duration_since(first).as_secs().div_euclid(86_400);
    (0..DAYS as i64)
        .map(|i| {
            usize::try_from(i - offset)
                .ok()
                .and_then(|j| values.get(j).copied())
                .unwrap_or(0)
        })
        .collect()
}

/// The daily counts per outcome for the key page's chart, each aligned as
/// [`aligned_daily`]: (outcome, counts).
pub fn daily_by_outcome(daily: &UsageSeries, now: Timestamp) -> Vec<(&'static str, Vec<i64>)> {
    let start = daily.start.0;
    [
        ("valid", &daily.valid),
        ("insufficient scope", &daily.insufficient_scope),
        ("revoked", &daily.revoked),
        ("expired", &daily.expired),
    ]
    .into_iter()
    .map(|(name, values)| (name, shift_days(values, start, now)))
    .collect()
}

/// The points of a sparkline `width` by `height` for `values` (SVG polyline
/// syntax), scaled to the largest; empty when there is nothing to draw.
pub fn sparkline_points(values: &[i64], width: f64, height: f64) -> String {
    let most = values.iter().copied().max().unwrap_or(0);
    if values.len() < 2 || most <= 0 {
        return String::new();
    }
    let step = width / (values.len() - 1) as f64;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = height - (*v as f64 / most as f64) * (height - 1.0);
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which rows the list shows: the filter, the search and the page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this namespace; `None` for every namespace shown.
    pub namespace: Option<String>,
    /// Search text; case-insensitive.
    pub search: String,
    /// Only keys that need attention.
    pub attention_only: bool,
    /// The page, from 0.
    pub page: usize,
}

/// One page of the list and what the pager needs.
#[derive(Debug, PartialEq)]
pub struct ListPage {
    /// The rows on this page: those needing attention first, then by namespace and name.
    pub rows: Vec<KeyRow>,
    /// Keys matching the filter and search.
    pub matched: usize,
    /// Of those, how many need attention.
    pub needing_attention: usize,
    /// Keys in the shown namespaces before filtering.
    pub total: usize,
    /// The page shown (clamped to the last page).
    pub page: usize,
    /// How many pages there are.
    pub pages: usize,
}

/// Filters, orders and pages `keys`. Rows are built only for the keys on the
/// page, so a 10,000-key list costs one pass of cheap checks, one sort and 100 rows.
pub fn list_page(
    keys: &[impl std::borrow::Borrow<ApiKey>],
    query: &ListQuery,
    now: Timestamp,
) -> ListPage {
    let needle = query.search.trim().to_lowercase();
    let mut matched: Vec<(bool, &ApiKey)> = keys
        .iter()
        .map(std::borrow::Borrow::borrow)
        .filter(|key| {
            query
                .namespace
                .as_deref()
                .is_none_or(|ns| key.metadata.namespace.as_deref() == Some(ns))
        })
        .filter(|key| needle.is_empty() || search_matches(key, &needle))
        .map(|key| (!attention(key, now).is_empty(), key))
        .filter(|(flagged, _)| !query.attention_only || *flagged)
        .collect();
    matched.sort_by(|(a_flag, a), (b_flag, b)| {
        b_flag
            .cmp(a_flag)
            .then_with(|| a.metadata.namespace.cmp(&b.metadata.namespace))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    let pages = matched.len().div_ceil(PAGE_SIZE).max(1);
    let page = query.page.min(pages - 1);
    ListPage {
        rows: matched
            .iter()
            .skip(page * PAGE_SIZE)
            .take(PAGE_SIZE)
            .map(|(_, key)| KeyRow::new(key, now))
            .collect(),
        matched: matched.len(),
        needing_attention: matched.iter().filter(|(flag, _)| *flag).count(),
        total: keys.len(),
        page,
        pages,
    }
}

fn search_matches(key: &ApiKey, needle: &str) -> bool {
    let contains = |field: &str| field.to_lowercase().contains(needle);
    key.metadata.name.as_deref().is_some_and(contains)
        || key.metadata.namespace.as_deref().is_some_and(contains)
        || contains(&key.spec.owner)
        || contains(&key.spec.team)
        || key.spec.scopes.iter().any(|s| contains(s))
}

/// When an Event happened: its series' last time, else its own.
pub fn event_time(e: &Event) -> Option<Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or(e.last_timestamp.as_ref().map(|t| t.0))
        .or(e.event_time.as_ref().map(|t| t.0))
        .or(e.first_timestamp.as_ref().map(|t| t.0))
        .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// "3 h ago", "in 2 d", "just now": how people read times in a list.
pub fn relative(at: Timestamp, now: Timestamp) -> String {
    let seconds = at.duration_since(now).as_secs();
    let magnitude = seconds.unsigned_abs();
    let text = match magnitude {
        0..60 => return "just now".into(),
        60..3_600 => format!("{} min", magnitude / 60),
        3_600..86_400 => format!("{} h", magnitude / 3_600),
        _ => format!("{} d", magnitude / 86_400),
    };
    if seconds < 0 {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ApiKeySpec, READY, UsageStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn now() -> Timestamp {
        "2026-12-06T12:00:00Z".parse().unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{reason} message"),
            last_transition_time: Time(now()),
            observed_generation: None,
        }
    }

    fn key(name: &str, created_days_ago: i64, status: ApiKeyStatus) -> ApiKey {
        let mut key = ApiKey::new(name, ApiKeySpec::example());
        key.metadata.namespace = Some("team-a".into());
        key.metadata.creation_timestamp = Some(Time(
            now() - SignedDuration::from_hours(24 * created_days_ago),
        ));
        key.status = Some(status);
        key
    }

    fn ready() -> ApiKeyStatus {
        ApiKeyStatus {
            conditions: vec![
                condition(READY, "True", "KeyIssued"),
                condition(POLICY_COMPLIANT, "True", "Allowed"),
            ],
            last_used_at: Some(Time(now() - SignedDuration::from_hours(2))),
            ..Default::default()
        }
    }

    #[test]
    fn a_ready_recently_used_key_needs_no_attention() {
        let row = KeyRow::new(&key("a", 90, ready()), now());
        assert_eq!(row.state, State::Ready);
        assert_eq!(row.attention, vec![]);
        assert_eq!(row.policy, Some(Ok(())));
    }

    #[test]
    fn states_come_from_ready_and_the_deletion_mark() {
        let pending = key("p", 0, ApiKeyStatus::default());
        assert_eq!(state(&pending), State::Pending);
        assert_eq!(KeyRow::new(&pending, now()).attention, vec![]);
        let mut status = ready();
        status.conditions[0] = condition(READY, "False", "SecretConflict");
        let failed = key("f", 0, status);
        assert_eq!(state(&failed).label(), "SecretConflict");
        assert_eq!(
            KeyRow::new(&failed, now()).attention,
            vec![Attention::NotReady]
        );
        let mut deleting = key("d", 0, ready());
        deleting.metadata.deletion_timestamp = Some(Time(now()));
        assert_eq!(state(&deleting), State::Revoking);
    }

    #[test]
    fn every_attention_flag_has_its_cause() {
        let mut status = ready();
        status.conditions[1] = condition(POLICY_COMPLIANT, "False", "PolicyViolation");
        status.violated_policies = vec!["teams".into()];
        status.conditions.push(condition(
            PREVIOUS_KEY_IN_USE,
            "True",
            "PreviousKeyPresented",
        ));
        status.expires_at = Some(Time(now() + SignedDuration::from_hours(24 * 6)));
        status.last_used_at = Some(Time(now() - SignedDuration::from_hours(24 * 31)));
        let row = KeyRow::new(&key("x", 100, status), now());
        assert_eq!(
            row.attention,
            vec![
                Attention::PolicyViolation,
                Attention::PreviousKeyInUse,
                Attention::Expiring,
                Attention::Unused
            ]
        );
        assert_eq!(row.policy, Some(Err(vec!["teams".into()])));
    }

    #[test]
    fn never_used_counts_from_creation() {
        let mut status = ready();
        status.last_used_at = None;
        assert_eq!(
            KeyRow::new(&key("new", 29, status.clone()), now()).attention,
            vec![]
        );
        assert_eq!(
            KeyRow::new(&key("old", 30, status), now()).attention,
            vec![Attention::Unused]
        );
    }

    #[test]
    fn a_key_expiring_in_eight_days_is_not_flagged() {
        let mut status = ready();
        status.expires_at = Some(Time(now() + SignedDuration::from_hours(24 * 8)));
        assert_eq!(KeyRow::new(&key("k", 1, status), now()).attention, vec![]);
    }

    fn series(start: &str, valid: Vec<i64>, revoked: Vec<i64>) -> UsageSeries {
        UsageSeries {
            start: Time(start.parse().unwrap()),
            valid,
            insufficient_scope: vec![],
            revoked,
            expired: vec![],
        }
    }

    #[test]
    fn the_sparkline_ends_today_even_when_usage_is_a_day_old() {
        // 30 days ending yesterday: the first day falls off, today counts zero.
        let valid: Vec<i64> = (1..=30).collect();
        let daily = series("2026-11-06T00:00:00Z", valid, vec![]);
        let aligned = aligned_daily(&daily, now());
        assert_eq!(aligned.len(), DAYS);
        assert_eq!(aligned[0], 2);
        assert_eq!(aligned[28], 30);
        assert_eq!(aligned[29], 0);
        // Ending today: unchanged, outcomes summed.
        let daily = series("2026-11-07T00:00:00Z", vec![1; 30], vec![2; 30]);
        assert_eq!(aligned_daily(&daily, now()), vec![3; 30]);
        let by_outcome = daily_by_outcome(&daily, now());
        assert_eq!(by_outcome[0], ("valid", vec![1; 30]));
        assert_eq!(by_outcome[2], ("revoked", vec![2; 30]));
        assert_eq!(by_outcome[3], ("expired", vec![0; 30]));
    }

    #[test]
    fn sparkline_points_scale_to_the_largest_value() {
        assert_eq!(sparkline_points(&[0, 0, 0], 100.0, 20.0), "");
        assert_eq!(
            sparkline_points(&[0, 5, 10], 100.0, 20.0),
            "0.0,20.0 50.0,10.5 100.0,1.0"
        );
    }

    #[test]
    fn rows_carry_usage_and_last_use() {
        let mut status = ready();
        status.usage = Some(UsageStatus {
            updated_at: Time(now()),
            last24h: 42,
            last7d: 100,
            refused_last24h: 1,
            daily: series("2026-11-07T00:00:00Z", vec![1; 30], vec![]),
            hourly: series("2026-12-05T13:00:00Z", vec![1; 24], vec![]),
        });
        let row = KeyRow::new(&key("u", 1, status), now());
        assert_eq!(row.requests_24h, 42);
        assert_eq!(row.daily, vec![1; 30]);
        assert_eq!(row.last_used, Some(now() - SignedDuration::from_hours(2)));
        assert_eq!(relative(row.last_used.unwrap(), now()), "2 h ago");
        assert_eq!(
            relative(now() + SignedDuration::from_hours(49), now()),
            "in 2 d"
        );
    }

    #[test]
    fn the_list_filters_searches_puts_attention_first_and_pages() {
        let mut keys = Vec::new();
        for i in 0..250 {
            let mut k = key(&format!("key-{i:03}"), 1, ready());
            if i % 2 == 1 {
                k.metadata.namespace = Some("team-b".into());
            }
            keys.push(k);
        }
        let mut flagged = ready();
        flagged.conditions[0] = condition(READY, "False", "PolicyViolation");
        keys.push(key("zz-broken", 1, flagged));
        let all = list_page(&keys, &ListQuery::default(), now());
        assert_eq!((all.total, all.matched, all.pages), (251, 251, 3));
        assert_eq!(all.rows.len(), PAGE_SIZE);
        assert_eq!(all.rows[0].name, "zz-broken");
        assert_eq!(all.needing_attention, 1);
        let team_b = ListQuery {
            namespace: Some("team-b".into()),
            page: 9,
            ..Default::default()
        };
        let page = list_page(&keys, &team_b, now());
        assert_eq!((page.matched, page.page, page.rows.len()), (125, 1, 25));
        let search = ListQuery {
            search: " KEY-24".into(),
            ..Default::default()
        };
        let found = list_page(&keys, &search, now());
        assert_eq!(found.matched, 10, "key-240 to key-249");
        let attention = ListQuery {
            attention_only: true,
            ..Default::default()
        };
        assert_eq!(list_page(&keys, &attention, now()).matched, 1);
    }
}
