//! Usage per key: how often each key is presented, per UTC hour and outcome.
//!
//! - [`tally`]: the verifier's bounded in-memory counts between two flushes.
//! - [`summary`]: pure: the status summary, the `PreviousKeyInUse` condition,
//!   the `RevokedKeyInUse` report and when each may be written.
//! - [`follow`]: the operator leader's scans of the key database (bounded
//!   queries per interval, never per key), the pruning, and the requeues.
//!
//! Verifiers add their counts to `key_usage` (count = count + n) in the same
//! batched transaction as the last-used times, so replicas add up exactly.

pub mod follow;
pub mod summary;
pub mod tally;

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};

/// What a counted check came to. Malformed and unknown keys are not counted:
/// they name no key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The key verified.
    Valid,
    /// The key verified but lacked a required scope.
    InsufficientScope,
    /// The key was revoked.
    Revoked,
    /// The key's validity had ended.
    Expired,
}

impl Outcome {
    /// How many outcomes there are.
    pub const COUNT: usize = 4;
    /// Every outcome, in [`index`](Self::index) order.
    pub const ALL: [Outcome; Self::COUNT] = [
        Outcome::Valid,
        Outcome::InsufficientScope,
        Outcome::Revoked,
        Outcome::Expired,
    ];

    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::Revoked => "revoked",
            Outcome::Expired => "expired",
        }
    }

    /// Parses the database spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// Its position in [`ALL`](Self::ALL) and in count arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the check was a use of a working key (it moves `last_used_at`).
    pub fn used(self) -> bool {
        matches!(self, Outcome::Valid | Outcome::InsufficientScope)
    }
}

/// Checks of one key in one UTC hour with one outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageCount {
    /// The key.
    pub key_id: Arc<str>,
    /// The start of the hour.
    pub hour: Timestamp,
    /// What the checks came to.
    pub outcome: Outcome,
    /// How many.
    pub count: u64,
}

/// What one verifier flush writes (in parts of at most
/// `FLUSH_ROWS_PER_TRANSACTION` counts, one transaction each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageBatch {
    /// The minute each key was last used, in key order.
    pub last_used: Vec<(Arc<str>, Timestamp)>,
    /// Counts to add, in (key, hour, outcome) order.
    pub counts: Vec<UsageCount>,
}

impl UsageBatch {
    /// The checks the batch counts.
    pub fn checks(&self) -> u64 {
        self.counts.iter().map(|c| c.count).sum()
    }

    /// Splits a batch in key order into batches of at most `rows` counts,
    /// each with the last uses of its keys; at least one (maybe empty).
    pub fn into_chunks(self, rows: usize) -> Vec<UsageBatch> {
        let mut chunks: Vec<UsageBatch> = Vec::new();
        let mut last_used = self.last_used.into_iter().peekable();
        let mut counts = self.counts.into_iter().peekable();
        while counts.peek().is_some() {
            let chunk: Vec<UsageCount> = counts.by_ref().take(rows.max(1)).collect();
            let last_key = chunk.last().map(|c| Arc::clone(&c.key_id));
            let mut uses = Vec::new();
            while let Some((key, _)) = last_used.peek()
                && last_key.as_ref().is_some_and(|last| key <= last)
            {
                uses.extend(last_used.next());
            }
            chunks.push(UsageBatch {
                last_used: uses,
                counts: chunk,
            });
        }
        let rest: Vec<_> = last_used.collect();
        match chunks.last_mut() {
            Some(last) => last.last_used.extend(rest),
            None => chunks.push(UsageBatch {
                last_used: rest,
                counts: Vec::new(),
            }),
        }
        chunks
    }
}

/// One hour.
pub const HOUR: SignedDuration = SignedDuration::from_hours(1);
/// One day.
pub const DAY: SignedDuration = SignedDuration::from_hours(24);

/// The start of `at`'s UTC hour, in epoch seconds.
pub fn hour_start(at: Timestamp) -> i64 {
    at.as_second() - at.as_second().rem_euclid(3600)
}

/// The start of `at`'s UTC day, in epoch seconds.
pub fn day_start(at: Timestamp) -> i64 {
    at.as_second() - at.as_second().rem_euclid(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_in_key_order_with_each_key_last_use_beside_its_counts() {
        let at = Timestamp::from_second(3_600).unwrap();
        let count = |key: &str, outcome| UsageCount {
            key_id: key.into(),
            hour: at,
            outcome,
            count: 1,
        };
        let batch = UsageBatch {
            last_used: vec![("a".into(), at), ("b".into(), at), ("c".into(), at)],
            counts: vec![
                count("a", Outcome::Valid),
                count("b", Outcome::Valid),
                count("b", Outcome::Revoked),
                count("c", Outcome::Valid),
            ],
        };
        let chunks = batch.clone().into_chunks(2);
        let keys = |b: &UsageBatch| {
            (
                b.last_used
                    .iter()
                    .map(|(k, _)| k.to_string())
                    .collect::<Vec<_>>(),
                b.counts.len(),
            )
        };
        assert_eq!(
            chunks.iter().map(keys).collect::<Vec<_>>(),
            [
                (vec!["a".to_owned(), "b".to_owned()], 2),
                (vec!["c".to_owned()], 2)
            ]
        );
        assert_eq!(batch.clone().into_chunks(10), [batch]);
        assert_eq!(
            UsageBatch::default().into_chunks(10),
            [UsageBatch::default()]
        );
    }
}
