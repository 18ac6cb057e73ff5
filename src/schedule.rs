//! Rotation schedules and durations. Pure: callers pass the instant to count from.
//!
//! Forms: a 5-field cron expression or a macro (`@hourly`, `@daily`, `@weekly`,
//! `@monthly`, `@yearly`), evaluated in an IANA time zone by croner (DST gaps and
//! repeats as in Vixie cron and OCPS), or `@every <duration>` counted in real time.

use std::fmt;

use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};
use jiff::{SignedDuration, Timestamp, tz::TimeZone};

/// A parsed `spec.rotation.schedule`.
#[derive(Clone)]
pub enum Schedule {
    /// A cron expression in a time zone.
    Cron {
        /// The parsed expression.
        cron: Box<Cron>,
        /// The zone the wall-clock fields are read in.
        zone: TimeZone,
    },
    /// A fixed interval after the previous rotation.
    Every(SignedDuration),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron { cron, zone } => write!(
                f,
                "Cron({:?} in {})",
                cron.as_str(),
                zone.iana_name().unwrap_or("a fixed offset")
            ),
            Schedule::Every(every) => write!(f, "Every({every:?})"),
        }
    }
}

impl Schedule {
    /// Parses a schedule; `time_zone` is an IANA name and defaults to UTC.
    /// The error says what is wrong in words a user can act on.
    pub fn parse(expression: &str, time_zone: Option<&str>) -> Result<Self, String> {
        let expression = expression.trim();
        if let Some(interval) = expression.strip_prefix("@every ") {
            let every = parse_duration(interval.trim())?;
            if every < SignedDuration::from_secs(1) {
                return Err(format!(
                    "@every {interval}: the interval must be at least 1s"
                ));
            }
            return Ok(Schedule::Every(every));
        }
        let zone = match time_zone {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|_| {
                format!("unknown time zone {name:?}; use an IANA name such as Europe/Berlin")
            })?,
        };
        let macro_or_cron = match expression {
            "@hourly" | "@daily" | "@weekly" | "@monthly" | "@yearly" | "@annually" => expression,
            _ if expression.starts_with('@') => {
                return Err(format!(
                    "unknown schedule {expression:?}; use @hourly, @daily, @weekly, @monthly, @yearly, @every <duration> or 5 cron fields"
                ));
            }
            _ if expression.split_whitespace().count() != 5 => {
                return Err(format!(
                    "schedule {expression:?} must have 5 fields: minute hour day-of-month month day-of-week"
                ));
            }
            _ => expression,
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(macro_or_cron)
            .map_err(|e| format!("invalid cron expression {expression:?}: {e}"))?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            zone,
        })
    }

    /// The first rotation time strictly after `after`; `None` if the expression never fires again.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(every) => after.checked_add(*every).ok(),
            Schedule::Cron { cron, zone } => cron
                .find_next_occurrence(&after.to_zoned(zone.clone()), false)
                .ok()
                .map(|zoned| zoned.timestamp()),
        }
    }
}

impl Schedule {
    /// Whether no two rotations from `from` on are more than `limit` apart, nor
    /// the first more than `limit` away. Cron schedules are checked over the next
    /// 366 days (at most 10,000 intervals), which covers every macro and the
    /// yearly cycle of day and month fields.
    pub fn rotates_within(&self, limit: SignedDuration, from: Timestamp) -> bool {
        let (cron, zone) = match self {
            Schedule::Every(every) => return *every <= limit,
            Schedule::Cron { cron, zone } => (cron, zone),
        };
        if !limit.is_positive() {
            return false;
        }
        let horizon = SignedDuration::from_hours(366 * 24).min(limit * 10_000);
        let Ok(end) = from.checked_add(horizon) else {
            return true;
        };
        let mut at = from;
        while at < end {
            // The latest rotation in (at, at + limit]; none means a gap longer than limit.
            let Ok(window_end) = at.checked_add(limit) else {
                return true;
            };
            let latest = cron
                .find_previous_occurrence(&window_end.to_zoned(zone.clone()), true)
                .map(|zoned| zoned.timestamp());
            match latest {
                Ok(latest) if latest > at => at = latest,
                _ => return false,
            }
        }
        true
    }
}

/// Parses a Go-style duration as Kubernetes CEL's `duration()` does:
/// one or more `<number><unit>` with units `h`, `m`, `s`, `ms`, `us`, `ns`, e.g. `720h`, `1h30m`, `1.5h`.
pub fn parse_duration(text: &str) -> Result<SignedDuration, String> {
    let invalid = || format!("{text:?} is not a duration such as 90s, 30m, 1h30m or 720h");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut rest = text;
    let mut total_nanos: i128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: i128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            _ => return Err(invalid()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(invalid());
        }
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| invalid())?
        };
        let mut part = whole.checked_mul(unit_nanos).ok_or_else(invalid)?;
        let mut scale = unit_nanos;
        for digit in fraction.chars() {
            scale /= 10;
            part += i128::from(digit.to_digit(10).ok_or_else(invalid)?) * scale;
        }
        total_nanos = total_nanos.checked_add(part).ok_or_else(invalid)?;
        rest = tail;
    }
    let secs = i64::try_from(total_nanos / 1_000_000_000).map_err(|_| invalid())?;
    Ok(SignedDuration::new(
        secs,
        (total_nanos % 1_000_000_000) as i32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn next(expression: &str, zone: Option<&str>, after: &str) -> String {
        Schedule::parse(expression, zone)
            .unwrap()
            .next_after(at(after))
            .unwrap()
            .to_string()
    }

    #[test]
    fn durations_follow_go_syntax() {
        assert_eq!(
            parse_duration("90s").unwrap(),
            SignedDuration::from_secs(90)
        );
        assert_eq!(
            parse_duration("720h").unwrap(),
            SignedDuration::from_hours(720)
        );
        assert_eq!(
            parse_duration("1h30m").unwrap(),
            SignedDuration::from_mins(90)
        );
        assert_eq!(
            parse_duration("1.5h").unwrap(),
            SignedDuration::from_mins(90)
        );
        assert_eq!(
            parse_duration("250ms").unwrap(),
            SignedDuration::from_millis(250)
        );
        for bad in ["", "10", "h", "-1h", "1d", "1h 30m", "1..5h", " 1h", "1H"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macros_and_cron_in_utc() {
        assert_eq!(
            next("@hourly", None, "2026-03-01T10:15:00Z"),
            "2026-03-01T11:00:00Z"
        );
        assert_eq!(
            next("@daily", None, "2026-03-01T10:15:00Z"),
            "2026-03-02T00:00:00Z"
        );
        assert_eq!(
            next("@weekly", None, "2026-03-04T10:15:00Z"),
            "2026-03-08T00:00:00Z"
        );
        assert_eq!(
            next("@monthly", None, "2026-03-04T10:15:00Z"),
            "2026-04-01T00:00:00Z"
        );
        assert_eq!(
            next("@yearly", None, "2026-03-04T10:15:00Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            next("30 2 * * 1-5", None, "2026-03-06T03:00:00Z"),
            "2026-03-09T02:30:00Z"
        );
        // Strictly after: a rotation at the slot does not fire again for the same slot.
        assert_eq!(
            next("0 0 * * *", None, "2026-03-02T00:00:00Z"),
            "2026-03-03T00:00:00Z"
        );
    }

    #[test]
    fn every_counts_real_time_from_the_last_rotation() {
        assert_eq!(
            next("@every 90s", None, "2026-03-01T10:00:00Z"),
            "2026-03-01T10:01:30Z"
        );
        assert_eq!(
            next("@every 720h", None, "2026-03-01T10:00:00Z"),
            "2026-03-31T10:00:00Z"
        );
        // A time zone does not change an interval.
        assert_eq!(
            next("@every 24h", Some("Europe/Berlin"), "2026-03-28T12:00:00Z"),
            "2026-03-29T12:00:00Z"
        );
    }

    #[test]
    fn cron_in_a_zone_across_spring_forward() {
        // Europe/Berlin skips 02:00-03:00 on 2026-03-29. A job fixed at 02:30
        // runs right after the gap that day (03:00 CEST = 01:00Z), as OCPS says.
        assert_eq!(
            next("30 2 * * *", Some("Europe/Berlin"), "2026-03-28T12:00:00Z"),
            "2026-03-29T01:00:00Z"
        );
        // 09:00 local is 08:00Z before the change and 07:00Z after it.
        assert_eq!(
            next("0 9 * * *", Some("Europe/Berlin"), "2026-03-28T09:00:00Z"),
            "2026-03-29T07:00:00Z"
        );
        assert_eq!(
            next("0 9 * * *", Some("Europe/Berlin"), "2026-03-27T09:00:00Z"),
            "2026-03-28T08:00:00Z"
        );
    }

    #[test]
    fn cron_in_a_zone_across_fall_back() {
        // Europe/Berlin repeats 02:00-03:00 on 2026-10-25. A fixed-time job runs
        // once, at the first 02:30 (CEST, 00:30Z), not again at 02:30 CET (01:30Z).
        let first = next("30 2 * * *", Some("Europe/Berlin"), "2026-10-24T12:00:00Z");
        assert_eq!(first, "2026-10-25T00:30:00Z");
        assert_eq!(
            next("30 2 * * *", Some("Europe/Berlin"), &first),
            "2026-10-26T01:30:00Z"
        );
    }

    #[test]
    fn invalid_schedules_say_what_is_wrong() {
        let error =
            |expression: &str, zone: Option<&str>| Schedule::parse(expression, zone).unwrap_err();
        assert!(error("61 * * * *", None).contains("invalid cron expression"));
        assert!(error("* * * *", None).contains("5 fields"));
        assert!(error("0 * * * * *", None).contains("5 fields"));
        assert!(error("@fortnightly", None).contains("unknown schedule"));
        assert!(error("@every soon", None).contains("not a duration"));
        assert!(error("@every 0s", None).contains("at least 1s"));
        assert!(error("@daily", Some("Mars/Olympus")).contains("unknown time zone"));
    }
}
