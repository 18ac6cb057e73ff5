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

/// What one transaction of a verifier flush writes (a flush is written in
/// parts of about `FLUSH_ROWS_PER_TRANSACTION` counts).
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
