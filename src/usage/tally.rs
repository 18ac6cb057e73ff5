//! The verifier's in-memory tally of key uses between two flushes: per key, the
//! minute it was last used and its checks per UTC hour and outcome. Bounded:
//! past `max_entries` (key, hour) slots, further checks are dropped and counted.
//! Pure: the caller passes `now` and writes the batches it takes.
//! Minutes and hours are kept as counts since the epoch in 32 bits.

use std::{collections::HashMap, sync::Arc};

use jiff::Timestamp;

use super::{Outcome, UsageBatch, UsageCount, hour_start};

/// Counts of one hour, by [`Outcome::index`]. 32 bits: a flush interval
/// would need billions of checks of one key to fill one.
type Counts = [u32; Outcome::COUNT];

/// One key's latest hour of uses since the last flush, in 24 bytes: with
/// the hash table's key id beside it, a tally of 100,000 keys is a table of
/// about 5 MiB.
#[derive(Debug)]
struct KeyUses {
    /// The minute (minutes since the epoch) of its last valid or
    /// insufficient-scope check; 0 when it was only refused (revoked, expired).
    last_used: u32,
    /// The hour (hours since the epoch) `counts` belong to.
    hour: u32,
    /// Checks in `hour`.
    counts: Counts,
}

/// Uses noted since the last flush, bounded.
#[derive(Debug)]
pub struct Tally {
    keys: HashMap<Arc<str>, KeyUses>,
    /// Other hours of some keys, not written yet: an hour boundary between
    /// two flushes, a failed flush, or a clock that stepped back. Rare, so
    /// kept beside `keys` rather than in every entry.
    earlier: HashMap<Arc<str>, Vec<(u32, Counts)>>,
    /// (key, hour) slots held: what `max_entries` bounds.
    entries: usize,
    max_entries: usize,
    /// Keys the last detached tally held. The next table starts that large,
    /// so that a busy verifier's tally does not grow by doubling, which holds
    /// the old and the new table at once at every step.
    expected: usize,
}

impl Tally {
    /// An empty tally of at most `max_entries` (key, hour) slots.
    pub fn new(max_entries: usize) -> Self {
        Self {
            keys: HashMap::new(),
            earlier: HashMap::new(),
            entries: 0,
            max_entries,
            expected: 0,
        }
    }

    /// Keys with uses not flushed yet.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Notes one check of `key_id` at `now`. Returns false when it was dropped
    /// because the tally is full.
    pub fn note(&mut self, key_id: &Arc<str>, outcome: Outcome, now: Timestamp) -> bool {
        let minute = outcome.used().then(|| minutes(now));
        self.add(key_id, minute, hours(now), outcome, 1) == 0
    }

    /// Adds `n` checks; returns how many did not fit.
    fn add(
        &mut self,
        key_id: &Arc<str>,
        used: Option<u32>,
        hour: u32,
        outcome: Outcome,
        n: u32,
    ) -> u32 {
        let full = self.entries >= self.max_entries;
        let mut counts = [0; Outcome::COUNT];
        counts[outcome.index()] = n;
        let Some(uses) = self.keys.get_mut(key_id) else {
            if full {
                return n;
            }
            if self.keys.capacity() == 0 {
                self.keys.reserve(self.expected.min(self.max_entries));
            }
            self.keys.insert(
                Arc::clone(key_id),
                KeyUses {
                    last_used: used.unwrap_or(0),
                    hour,
                    counts,
                },
            );
            self.entries += 1;
            return 0;
        };
        if let Some(used) = used {
            uses.last_used = uses.last_used.max(used);
        }
        if uses.hour == hour {
            return add_saturating(&mut uses.counts[outcome.index()], n);
        }
        let earlier = self.earlier.get_mut(key_id);
        if let Some((_, slot)) = earlier.and_then(|e| e.iter_mut().find(|(h, _)| *h == hour)) {
            return add_saturating(&mut slot[outcome.index()], n);
        }
        if full {
            return n;
        }
        let earlier = self.earlier.entry(Arc::clone(key_id)).or_default();
        if hour > uses.hour {
            earlier.push((uses.hour, std::mem::replace(&mut uses.counts, counts)));
            uses.hour = hour;
        } else {
            earlier.push((hour, counts));
        }
        self.entries += 1;
        0
    }

    /// Takes everything noted as it is, leaving the tally empty: cheap, so
    /// that a caller holding a lock around the tally can build the parts to
    /// write ([`Taken::into_parts`]) after releasing it.
    pub fn detach(&mut self) -> Taken {
        self.entries = 0;
        self.expected = self.keys.len();
        Taken {
            keys: std::mem::take(&mut self.keys),
            earlier: std::mem::take(&mut self.earlier),
        }
    }

    /// Puts a batch that could not be written back, added to what was noted
    /// since. Returns the checks dropped because the tally is full.
    pub fn restore(&mut self, batch: UsageBatch) -> u64 {
        let mut dropped = 0;
        let mut used: HashMap<Arc<str>, u32> = batch
            .last_used
            .into_iter()
            .map(|(key, at)| (key, minutes(at)))
            .collect();
        for count in batch.counts {
            let minute = used.remove(&count.key_id);
            let n = u32::try_from(count.count).unwrap_or(u32::MAX);
            let lost = self.add(&count.key_id, minute, hours(count.hour), count.outcome, n);
            dropped += u64::from(lost) + (count.count - u64::from(n));
        }
        dropped
    }

    /// (key, hour) slots held.
    pub fn entries(&self) -> usize {
        debug_assert_eq!(
            self.entries,
            self.keys.len() + self.earlier.values().map(Vec::len).sum::<usize>()
        );
        self.entries
    }
}

/// Everything a tally held when it was detached.
#[derive(Debug)]
pub struct Taken {
    keys: HashMap<Arc<str>, KeyUses>,
    earlier: HashMap<Arc<str>, Vec<(u32, Counts)>>,
}

impl Taken {
    /// The batches to write, built one at a time so that a flush of many keys
    /// holds one part beside the tally, not a second copy of it. Each part has
    /// whole keys (their last use beside their counts) until it holds at least
    /// `rows` counts, and is in key order, so that every transaction locks its
    /// rows in one global order and concurrent flushes cannot deadlock on it.
    pub fn into_parts(self, rows: usize) -> impl Iterator<Item = UsageBatch> {
        let Taken { keys, mut earlier } = self;
        let mut keys = keys.into_iter();
        std::iter::from_fn(move || {
            let mut part = UsageBatch::default();
            for (key_id, uses) in keys.by_ref() {
                let earlier = earlier.remove(&key_id).unwrap_or_default();
                add_to(&mut part, key_id, uses, earlier);
                if part.counts.len() >= rows {
                    break;
                }
            }
            part.last_used.sort();
            part.counts.sort_by(|a, b| {
                (&a.key_id, a.hour, a.outcome).cmp(&(&b.key_id, b.hour, b.outcome))
            });
            (!part.counts.is_empty()).then_some(part)
        })
    }
}

/// Adds one key's uses to a batch.
fn add_to(batch: &mut UsageBatch, key_id: Arc<str>, uses: KeyUses, earlier: Vec<(u32, Counts)>) {
    if uses.last_used > 0 {
        batch
            .last_used
            .push((Arc::clone(&key_id), from_minutes(uses.last_used)));
    }
    for (hour, counts) in std::iter::once((uses.hour, uses.counts)).chain(earlier) {
        for outcome in Outcome::ALL {
            let count = counts[outcome.index()];
            if count > 0 {
                batch.counts.push(UsageCount {
                    key_id: Arc::clone(&key_id),
                    hour: from_hours(hour),
                    outcome,
                    count: u64::from(count),
                });
            }
        }
    }
}

/// Adds `n` to a count; returns how many did not fit in 32 bits.
fn add_saturating(count: &mut u32, n: u32) -> u32 {
    let room = u32::MAX - *count;
    *count += n.min(room);
    n.saturating_sub(room)
}

/// Minutes since the epoch (u32 lasts until the year 10136).
fn minutes(at: Timestamp) -> u32 {
    u32::try_from(at.as_second().div_euclid(60)).unwrap_or(0)
}

fn from_minutes(minutes: u32) -> Timestamp {
    Timestamp::from_second(i64::from(minutes) * 60).unwrap_or_default()
}

/// Hours since the epoch.
fn hours(at: Timestamp) -> u32 {
    u32::try_from(hour_start(at).div_euclid(3600)).unwrap_or(0)
}

fn from_hours(hours: u32) -> Timestamp {
    Timestamp::from_second(i64::from(hours) * 3600).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything taken, as one part.
    fn whole(taken: Taken) -> UsageBatch {
        taken.into_parts(usize::MAX).next().unwrap_or_default()
    }

    #[test]
    fn a_key_costs_twenty_four_bytes_beside_its_id() {
        assert_eq!(std::mem::size_of::<KeyUses>(), 24);
    }

    /// An hour's start (1,800,000,000 is one) plus `second`.
    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn counts(batch: &UsageBatch) -> Vec<(String, i64, &'static str, u64)> {
        batch
            .counts
            .iter()
            .map(|c| {
                (
                    c.key_id.to_string(),
                    c.hour.as_second() - at(0).as_second(),
                    c.outcome.as_str(),
                    c.count,
                )
            })
            .collect()
    }

    #[test]
    fn checks_count_per_hour_and_outcome_and_split_at_the_hour_boundary() {
        let mut tally = Tally::new(10);
        let key: Arc<str> = Arc::from("kid_a");
        assert!(tally.note(&key, Outcome::Valid, at(3_599)));
        assert!(tally.note(&key, Outcome::Valid, at(3_599)));
        assert!(tally.note(&key, Outcome::InsufficientScope, at(3_000)));
        // 3600 is the first second of the next hour.
        assert!(tally.note(&key, Outcome::Valid, at(3_600)));
        assert!(tally.note(&key, Outcome::Revoked, at(7_199)));
        assert_eq!(tally.entries(), 2);
        let batch = whole(tally.detach());
        assert_eq!(
            counts(&batch),
            [
                ("kid_a".into(), 0, "valid", 2),
                ("kid_a".into(), 0, "insufficient_scope", 1),
                ("kid_a".into(), 3600, "valid", 1),
                ("kid_a".into(), 3600, "revoked", 1),
            ]
        );
        // The last use is the latest minute of a check that verified.
        assert_eq!(
            batch.last_used,
            [(Arc::from("kid_a"), at(3_600))],
            "a refused attempt is no use"
        );
        assert_eq!(tally.entries(), 0);
        assert!(whole(tally.detach()).counts.is_empty());
    }

    #[test]
    fn parts_hold_whole_keys_in_key_order_and_every_count_once() {
        let mut tally = Tally::new(100);
        let keys: Vec<Arc<str>> = (0..7).map(|i| Arc::from(format!("kid_{i}"))).collect();
        for key in &keys {
            tally.note(key, Outcome::Valid, at(0));
            tally.note(key, Outcome::Revoked, at(3_600));
        }
        let parts: Vec<UsageBatch> = tally.detach().into_parts(3).collect();
        // Two counts a key: a part of at least 3 counts takes two keys.
        assert_eq!(
            parts.iter().map(|p| p.counts.len()).collect::<Vec<_>>(),
            [4, 4, 4, 2]
        );
        let mut seen = Vec::new();
        for part in &parts {
            let order: Vec<_> = part
                .counts
                .iter()
                .map(|c| (c.key_id.clone(), c.hour, c.outcome))
                .collect();
            assert!(order.is_sorted(), "{order:?}");
            let last_used: Vec<_> = part.last_used.iter().map(|(k, _)| k.clone()).collect();
            let counted: std::collections::BTreeSet<_> =
                part.counts.iter().map(|c| c.key_id.clone()).collect();
            assert_eq!(last_used, counted.into_iter().collect::<Vec<_>>());
            seen.extend(last_used);
        }
        seen.sort();
        assert_eq!(seen, keys);
    }

    #[test]
    fn a_tally_starts_as_large_as_the_last_one_was() {
        let mut tally = Tally::new(1_000);
        let keys: Vec<Arc<str>> = (0..200).map(|i| Arc::from(format!("kid_{i}"))).collect();
        for key in &keys {
            tally.note(key, Outcome::Valid, at(0));
        }
        drop(tally.detach());
        assert_eq!(tally.keys.capacity(), 0, "nothing held until a check");
        tally.note(&keys[0], Outcome::Valid, at(60));
        assert!(tally.keys.capacity() >= 200);
    }

    #[test]
    fn a_key_only_refused_has_counts_but_no_last_use() {
        let mut tally = Tally::new(10);
        let key: Arc<str> = Arc::from("kid_old");
        tally.note(&key, Outcome::Revoked, at(10));
        tally.note(&key, Outcome::Expired, at(20));
        let batch = whole(tally.detach());
        assert!(batch.last_used.is_empty());
        assert_eq!(counts(&batch).len(), 2);
    }

    #[test]
    fn past_the_cap_checks_are_dropped_not_counted() {
        let mut tally = Tally::new(2);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("kid_a"), Arc::from("kid_b"), Arc::from("kid_c"));
        assert!(tally.note(&a, Outcome::Valid, at(0)));
        assert!(tally.note(&b, Outcome::Valid, at(0)));
        assert!(!tally.note(&c, Outcome::Valid, at(0)), "a third key");
        assert!(!tally.note(&a, Outcome::Valid, at(3_600)), "a new hour");
        assert!(tally.note(&a, Outcome::Valid, at(1)), "a slot it has");
        let batch = whole(tally.detach());
        assert_eq!(
            counts(&batch),
            [
                ("kid_a".into(), 0, "valid", 2),
                ("kid_b".into(), 0, "valid", 1)
            ]
        );
    }

    #[test]
    fn a_failed_batch_goes_back_added_to_later_checks() {
        let mut tally = Tally::new(3);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("kid_a"), Arc::from("kid_b"));
        tally.note(&a, Outcome::Valid, at(0));
        tally.note(&a, Outcome::Valid, at(60));
        let failed = whole(tally.detach());
        tally.note(&a, Outcome::Valid, at(120));
        tally.note(&b, Outcome::Valid, at(3_700));
        assert_eq!(tally.restore(failed), 0);
        let batch = whole(tally.detach());
        assert_eq!(
            counts(&batch),
            [
                ("kid_a".into(), 0, "valid", 3),
                ("kid_b".into(), 3600, "valid", 1)
            ]
        );
        assert_eq!(
            batch.last_used,
            [
                (Arc::from("kid_a"), at(120)),
                (Arc::from("kid_b"), at(3_660))
            ]
        );
        // Restored into a full tally: what does not fit is dropped, and said.
        let mut full = Tally::new(1);
        full.note(&b, Outcome::Valid, at(0));
        assert_eq!(full.restore(batch), 4);
    }
}
