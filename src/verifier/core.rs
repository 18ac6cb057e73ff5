//! [`Verifier`]: the in-memory key set with everything around it that a service
//! embedding it needs: the database fallback for keys not yet in memory (one
//! query per hash in flight, bounded), a short negative cache, the staleness
//! limit, and the last-used recorder. It follows the database through
//! [`Verifier::catch_up`] and [`Verifier::reload`], which `follow` drives.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use jiff::Timestamp;
use tokio::sync::{OnceCell, Semaphore};
use tracing::{info, warn};

use super::snapshot::{
    Code, Digest32, Snapshot, Verdict, answer, answer_from_record, digest, scoped,
};
use crate::{
    Error, Result,
    clock::Clock,
    key::KeyHash,
    store::{ChangePosition, KeyRecord, SqlStore},
    telemetry::Metrics,
    usage::{Outcome, UsageBatch, tally::Tally},
};

/// What a verifier reads from, and the one thing it writes (last used).
#[async_trait]
pub trait KeySource: Send + Sync {
    /// Hands every key that is not revoked to `sink`, one at a time; returns the
    /// change number they are current to.
    async fn live_keys(&self, sink: &mut (dyn FnMut(KeyRecord) + Send)) -> Result<i64>;
    /// Rows written after change `after`, in change order, at most `limit`.
    async fn changes_since(&self, after: i64, limit: i64) -> Result<Vec<(i64, KeyRecord)>>;
    /// The record with this hash, in any state.
    async fn find(&self, hash: &KeyHash) -> Result<Option<KeyRecord>>;
    /// Writes a flush of last-used times and usage counts (at `at`) in one
    /// transaction; returns the last-used rows moved forward.
    async fn record_usage(&self, batch: &UsageBatch, at: Timestamp) -> Result<u64>;
    /// The change counter, and the change number `witness`'s row carries now.
    async fn position(&self, witness: Option<&str>) -> Result<ChangePosition>;
}

#[async_trait]
impl KeySource for SqlStore {
    async fn live_keys(&self, sink: &mut (dyn FnMut(KeyRecord) + Send)) -> Result<i64> {
        SqlStore::each_live_key(self, sink).await
    }
    async fn changes_since(&self, after: i64, limit: i64) -> Result<Vec<(i64, KeyRecord)>> {
        SqlStore::changes_since(self, after, limit).await
    }
    async fn find(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        crate::store::KeyStore::find_by_hash(self, hash).await
    }
    async fn record_usage(&self, batch: &UsageBatch, at: Timestamp) -> Result<u64> {
        SqlStore::record_usage(self, batch, at).await
    }
    async fn position(&self, witness: Option<&str>) -> Result<ChangePosition> {
        SqlStore::change_position(self, witness).await
    }
}

/// Tuning of a [`Verifier`].
#[derive(Clone, Debug)]
pub struct VerifierConfig {
    /// How long to keep answering from memory when the database cannot be
    /// reached; past it every check fails closed.
    pub max_staleness: Duration,
    /// How long an "unknown" answer from the database is reused (a change clears it).
    pub negative_ttl: Duration,
    /// Database fallbacks in flight at most; more wait for a slot within `fallback_timeout`.
    pub max_fallbacks: usize,
    /// The whole database fallback's deadline (the wait for a slot and the
    /// query): well under a gateway's own timeout (Envoy's ext_authz: 200 ms).
    pub fallback_timeout: Duration,
    /// (key, UTC hour) slots of usage remembered between flushes; checks past
    /// it are not counted (`keyward_verifier_usage_dropped_total`).
    pub max_usage_entries: usize,
    /// How often remembered last uses and counts are written (by `follow`).
    pub last_used_flush: Duration,
    /// The clusters whose keys verify; `None` accepts every cluster's.
    pub accept_clusters: Option<Vec<String>>,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            max_staleness: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(2),
            max_fallbacks: 16,
            fallback_timeout: Duration::from_millis(100),
            max_usage_entries: 250_000,
            last_used_flush: Duration::from_secs(60),
            accept_clusters: None,
        }
    }
}

/// The answer to a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// A definite answer.
    Answer(Verdict),
    /// No answer can be trusted (never loaded, or stale past the limit): fail closed.
    Unavailable(&'static str),
}

/// A negative answer remembered: when, the code, and a revoked key's id.
type Remembered = (Instant, Code, Option<Arc<str>>);

/// Counts a flush writes per transaction: short transactions, so that the
/// operator's revocations (which lock the same rows, and on SQLite the whole
/// database) never wait long behind a flush of many keys.
pub const FLUSH_ROWS_PER_TRANSACTION: usize = 1_000;

/// Changes read per query while catching up.
const CHANGE_BATCH: i64 = 5_000;
/// Negative answers remembered at most; beyond, the oldest half goes.
const MAX_NEGATIVE: usize = 10_000;

/// Why a key not in memory gets no answer while the database cannot be asked.
const CANNOT_ASK: &str = "the key is not in memory and the key database did not answer";

/// What a database fallback came to.
#[derive(Clone, Debug)]
enum Asked {
    /// The database answered; judged without scopes. With the key id of a
    /// revoked or expired key, for its usage count.
    Answered(Verdict, Option<Arc<str>>),
    /// No slot before the deadline: a flood of keys not in memory.
    Shed,
    /// The query failed, or the deadline passed before its answer.
    Failed,
}

/// The answer to a check from what the database said of a key not in memory.
/// Shed keys are refused (well-formed garbage is cheap to mint); a database
/// that cannot answer makes the check unanswerable, never valid.
fn after_fallback(asked: Asked, required: &[&str]) -> Checked {
    match asked {
        Asked::Answered(
            Verdict {
                code: Code::Valid,
                identity: Some(identity),
            },
            _,
        ) => Checked::Answer(scoped(identity, required)),
        Asked::Answered(verdict, _) => Checked::Answer(verdict),
        Asked::Shed => Checked::Answer(Verdict {
            code: Code::Unknown,
            identity: None,
        }),
        Asked::Failed => Checked::Unavailable(CANNOT_ASK),
    }
}

/// An in-memory key set that answers checks in microseconds and follows the key
/// database. Cheap to share: wrap it in an `Arc`.
pub struct Verifier {
    source: Arc<dyn KeySource>,
    clock: Arc<dyn Clock>,
    config: VerifierConfig,
    metrics: Arc<Metrics>,
    snapshot: RwLock<Option<Snapshot>>,
    /// When the database last answered a catch-up or reload.
    synced_at: Mutex<Option<Instant>>,
    /// Set when the database last failed (a catch-up, reload or fallback
    /// query), cleared when it answers: keys not in memory are then
    /// answered at once instead of each waiting for the deadline.
    unreachable: AtomicBool,
    /// One reload or catch-up at a time, so that changes apply in order.
    updating: tokio::sync::Mutex<()>,
    /// Keys the database did not find live, briefly, with the key id of a
    /// revoked one (for its usage count).
    negative: Mutex<HashMap<Digest32, Remembered>>,
    in_flight: Mutex<HashMap<Digest32, Arc<OnceCell<Asked>>>>,
    fallbacks: Semaphore,
    /// Uses since the last flush.
    tally: Mutex<Tally>,
    /// The highest change number the primary announced (read replicas).
    announced: AtomicI64,
    /// Since when the key set has been behind an announced change: the read
    /// replica has not replayed it yet. Counts as staleness.
    behind_since: Mutex<Option<Instant>>,
}

impl Verifier {
    /// A verifier with nothing loaded yet: it answers `Unavailable` until the first [`reload`](Self::reload).
    pub fn new(
        source: Arc<dyn KeySource>,
        clock: Arc<dyn Clock>,
        config: VerifierConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            tally: Mutex::new(Tally::new(config.max_usage_entries)),
            fallbacks: Semaphore::new(config.max_fallbacks),
            source,
            clock,
            config,
            metrics,
            snapshot: RwLock::new(None),
            synced_at: Mutex::new(None),
            unreachable: AtomicBool::new(false),
            updating: tokio::sync::Mutex::new(()),
            negative: Mutex::default(),
            in_flight: Mutex::default(),
            announced: AtomicI64::new(0),
            behind_since: Mutex::default(),
        }
    }

    fn synced(&self) {
        *self.synced_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Notes whether the database answered, and passes the outcome on.
    fn reached<T>(&self, outcome: Result<T>) -> Result<T> {
        self.unreachable.store(outcome.is_err(), Ordering::Relaxed);
        outcome
    }

    /// How long since the database last answered, or since the key set fell
    /// behind a change the primary announced, whichever is longer; `None`
    /// before the first load.
    pub fn staleness(&self) -> Option<Duration> {
        let answered = self
            .synced_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())?;
        let behind = self
            .behind_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::ZERO, |since| since.elapsed());
        Some(answered.max(behind))
    }

    /// Changes the primary announced that the key set does not have yet.
    fn changes_behind(&self) -> i64 {
        let seen = self.position().map_or(0, |(seq, _)| seq);
        (self.announced.load(Ordering::SeqCst) - seen).max(0)
    }

    /// Notes a change number the primary announced (its NOTIFY), which a read
    /// replica may not have replayed yet.
    pub fn announce(&self, seq: i64) {
        self.announced.fetch_max(seq, Ordering::SeqCst);
    }

    /// Whether the key set is behind an announced change, after updating the
    /// replica metrics: the follower then looks again soon.
    pub fn behind(&self) -> bool {
        let missing = self.changes_behind();
        self.metrics.verifier_replica_behind.set(missing);
        let mut since = self.behind_since.lock().unwrap_or_else(|p| p.into_inner());
        if missing > 0 {
            since.get_or_insert_with(Instant::now);
            true
        } else {
            *since = None;
            false
        }
    }

    /// Whether checks are answered: loaded, and not stale past the limit.
    pub fn is_ready(&self) -> std::result::Result<(), &'static str> {
        match self.staleness() {
            None => Err("the key set has not been loaded yet"),
            Some(age) if age > self.config.max_staleness => {
                Err("the key database has not answered within --max-staleness")
            }
            Some(_) => Ok(()),
        }
    }

    /// What `/readyz` says while ready: `ok`, and what is happening when the
    /// answers come from memory alone (a database outage, a failover, a
    /// replica behind its primary), with the time left before checks fail closed.
    pub fn readiness(&self) -> String {
        let left = self
            .config
            .max_staleness
            .saturating_sub(self.staleness().unwrap_or_default());
        let behind = self.changes_behind();
        if self.unreachable.load(Ordering::Relaxed) {
            format!(
                "ok: the key database is not answering; answering from memory, failing closed in {}s",
                left.as_secs()
            )
        } else if behind > 0 {
            format!(
                "ok: the read replica is {behind} change(s) behind the primary; failing closed in {}s unless it catches up",
                left.as_secs()
            )
        } else {
            "ok".to_owned()
        }
    }

    /// The change number the key set is current to, and how many keys it holds.
    pub fn position(&self) -> Option<(i64, usize)> {
        let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        snapshot.as_ref().map(|s| (s.seq(), s.len()))
    }

    /// Brings the key set level with a full load from the database. The first
    /// load builds it; later ones update it in place (unchanged keys are kept,
    /// keys the load does not bring are dropped at its end), so there is never
    /// a second copy of the key set, and checks are answered throughout.
    pub async fn reload(&self) -> Result<usize> {
        let _one = self.updating.lock().await;
        self.reload_locked().await
    }

    /// [`reload`](Self::reload) under the `updating` lock.
    async fn reload_locked(&self) -> Result<usize> {
        if self.position().is_some() {
            self.write(Snapshot::begin_reload);
            let seq = self
                .source
                .live_keys(&mut |record| self.write(|snapshot| snapshot.reloaded(record)))
                .await;
            let seq = self.reached(seq)?;
            self.write(|snapshot| {
                snapshot.finish_reload(seq);
            });
        } else {
            let mut fresh = Snapshot::default();
            fresh.begin_reload();
            let seq = self
                .source
                .live_keys(&mut |record| fresh.reloaded(record))
                .await;
            fresh.finish_reload(self.reached(seq)?);
            *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh);
        }
        self.negative
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.synced();
        self.observe_position();
        Ok(self.position().map_or(0, |(_, keys)| keys))
    }

    /// Runs `change` on the loaded key set, under the write lock for just that long.
    fn write(&self, change: impl FnOnce(&mut Snapshot)) {
        if let Some(snapshot) = self
            .snapshot
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            change(snapshot);
        }
    }

    /// Applies every change since the last one seen; returns how many were
    /// applied. When the database's history moved backwards (a restore, a
    /// failover that lost commits, another database behind the URL), the
    /// changes since the last one seen would miss what was rewritten below
    /// it: the whole key set is reloaded at once instead.
    pub async fn catch_up(&self) -> Result<usize> {
        let _one = self.updating.lock().await;
        let Some((seen, witness)) = self.seen() else {
            return Ok(0);
        };
        let now = self.reached(
            self.source
                .position(witness.as_ref().map(|(id, _)| id.as_str()))
                .await,
        )?;
        let rewound = now.seq < seen
            || witness.is_some_and(|(_, at)| now.witness_seq.is_none_or(|current| current < at));
        if rewound {
            warn!(
                seen,
                counter = now.seq,
                "the key database's change history moved backwards (a restore or a failover); reloading every key"
            );
            self.metrics.verifier_history_resets.inc();
            return self.reload_locked().await;
        }
        let mut applied = 0;
        loop {
            let Some(after) = self.position().map(|(seq, _)| seq) else {
                return Ok(applied);
            };
            let changes = self.reached(self.source.changes_since(after, CHANGE_BATCH).await)?;
            let batch = changes.len();
            {
                let mut guard = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
                let Some(snapshot) = guard.as_mut() else {
                    return Ok(applied);
                };
                for (seq, record) in changes {
                    if snapshot.apply(seq, record).is_some() {
                        applied += 1;
                    }
                }
            }
            if batch < usize::try_from(CHANGE_BATCH).unwrap_or(usize::MAX) {
                break;
            }
        }
        if applied > 0 {
            // A change may have made an "unknown" key known.
            self.negative
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.synced();
        self.observe_position();
        Ok(applied)
    }

    /// The change number the key set is current to, and its witness.
    fn seen(&self) -> Option<(i64, Option<(String, i64)>)> {
        let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        snapshot
            .as_ref()
            .map(|s| (s.seq(), s.witness().map(|(id, seq)| (id.to_owned(), seq))))
    }

    fn observe_position(&self) {
        if let Some((seq, keys)) = self.position() {
            self.metrics.verifier_change_seq.set(seq);
            self.metrics
                .verifier_keys
                .set(i64::try_from(keys).unwrap_or(i64::MAX));
        }
    }

    /// Checks a presented key for the required scopes, and counts the check
    /// for the key it names (valid, insufficient scope, revoked or expired).
    pub async fn check(&self, presented: &str, required: &[&str]) -> Checked {
        if let Err(why) = self.is_ready() {
            return Checked::Unavailable(why);
        }
        let now = self.clock.now();
        let known = {
            let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
            match snapshot.as_ref() {
                Some(snapshot) => answer(snapshot, presented, required, now),
                None => return Checked::Unavailable("the key set has not been loaded yet"),
            }
        };
        let (checked, refused_key) = match known {
            Some(verdict) => (Checked::Answer(verdict), None),
            None => self.fall_back(presented, required, now).await,
        };
        let checked = self.only_accepted_clusters(checked);
        if let Checked::Answer(Verdict { code, identity }) = &checked {
            let key_id = match (identity, code) {
                (Some(identity), _) => Some(identity.key_id.clone()),
                (None, Code::Revoked | Code::Expired) => {
                    refused_key.or_else(|| self.refused_key_id(presented))
                }
                _ => None,
            };
            if let (Some(key_id), Some(outcome)) = (key_id, counted(*code)) {
                self.count(&key_id, outcome, now);
            }
        }
        checked
    }

    /// The key id of a revoked or expired key in memory: refused checks are
    /// rare, so the key is hashed again rather than slow the valid path.
    fn refused_key_id(&self, presented: &str) -> Option<Arc<str>> {
        let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        snapshot.as_ref()?.key_id_of(&digest(presented))
    }

    /// A key of a cluster outside `accept_clusters` is answered as unknown.
    fn only_accepted_clusters(&self, checked: Checked) -> Checked {
        let Some(accepted) = &self.config.accept_clusters else {
            return checked;
        };
        match &checked {
            Checked::Answer(Verdict {
                identity: Some(identity),
                ..
            }) if !accepted.iter().any(|c| **c == *identity.cluster) => Checked::Answer(Verdict {
                code: Code::Unknown,
                identity: None,
            }),
            _ => checked,
        }
    }

    /// Asks the database about a well-formed key that is not in memory: once per
    /// hash however many requests carry it, bounded, within `fallback_timeout`,
    /// with a short negative cache; not at all while the database is known to
    /// be unreachable.
    /// Also returns the key id of a revoked or expired key, for its count.
    async fn fall_back(
        &self,
        presented: &str,
        required: &[&str],
        now: Timestamp,
    ) -> (Checked, Option<Arc<str>>) {
        let hash = digest(presented);
        let cached = {
            let negative = self.negative.lock().unwrap_or_else(|p| p.into_inner());
            negative
                .get(&hash)
                .filter(|(at, _, _)| at.elapsed() < self.config.negative_ttl)
                .map(|(_, code, key_id)| (*code, key_id.clone()))
        };
        if let Some((code, key_id)) = cached {
            self.metrics.count_fallback("cached");
            let verdict = Verdict {
                code,
                identity: None,
            };
            return (Checked::Answer(verdict), key_id);
        }
        if self.unreachable.load(Ordering::Relaxed) {
            self.metrics.count_fallback("unreachable");
            return (after_fallback(Asked::Failed, required), None);
        }
        let cell = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.entry(hash).or_default().clone()
        };
        let asked = cell.get_or_init(|| self.ask(presented, now)).await.clone();
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
        let refused_key = match &asked {
            Asked::Answered(
                Verdict {
                    code: code @ (Code::Unknown | Code::Revoked),
                    ..
                },
                key_id,
            ) => {
                let mut negative = self.negative.lock().unwrap_or_else(|p| p.into_inner());
                if negative.len() >= MAX_NEGATIVE {
                    negative.clear();
                }
                negative.insert(hash, (Instant::now(), *code, key_id.clone()));
                key_id.clone()
            }
            Asked::Answered(_, key_id) => key_id.clone(),
            _ => None,
        };
        (after_fallback(asked, required), refused_key)
    }

    /// One database query for a key not in memory, slot wait included, within
    /// `fallback_timeout`.
    async fn ask(&self, presented: &str, now: Timestamp) -> Asked {
        let deadline = tokio::time::Instant::now() + self.config.fallback_timeout;
        let permit = tokio::time::timeout_at(deadline, self.fallbacks.acquire()).await;
        // A slot freed at the deadline is no use: the query would have no time.
        let (Ok(Ok(_permit)), false) = (permit, tokio::time::Instant::now() >= deadline) else {
            self.metrics.count_fallback("shed");
            return Asked::Shed;
        };
        let hash = KeyHash::of(presented.as_bytes());
        let found = match tokio::time::timeout_at(deadline, self.source.find(&hash)).await {
            Ok(found) => self.reached(found),
            // Not taken as "unreachable": under a flood the slot wait leaves a
            // query little time, and one slow answer says little.
            Err(_) => {
                self.metrics.count_fallback("timeout");
                return Asked::Failed;
            }
        };
        match found {
            Ok(record) => {
                self.metrics
                    .count_fallback(if record.is_some() { "found" } else { "unknown" });
                let verdict = answer_from_record(record.as_ref(), &[], now);
                let refused = matches!(verdict.code, Code::Revoked | Code::Expired);
                let key_id = record
                    .filter(|_| refused)
                    .map(|r| Arc::from(r.key_id.as_str()));
                Asked::Answered(verdict, key_id)
            }
            Err(e) => {
                warn!(error = %e, "key database fallback failed");
                self.metrics.count_fallback("error");
                Asked::Failed
            }
        }
    }

    /// Counts one check of `key_id` for the next flush.
    fn count(&self, key_id: &Arc<str>, outcome: Outcome, now: Timestamp) {
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        if tally.note(key_id, outcome, now) {
            self.metrics
                .verifier_last_used_pending
                .set(i64::try_from(tally.keys()).unwrap_or(i64::MAX));
        } else {
            self.metrics.verifier_usage_dropped.inc();
        }
    }

    /// Writes the counts and last uses noted since the last flush (a
    /// heartbeat when there are none), in transactions of about
    /// [`FLUSH_ROWS_PER_TRANSACTION`] counts, each in key order; returns how many count rows
    /// it added to. A part that fails before its commit goes back into the
    /// tally with the parts after it, for the next flush; a part whose commit
    /// outcome is unknown is given up (`keyward_verifier_usage_uncertain_total`),
    /// so nothing counts twice.
    pub async fn flush_usage(&self) -> Result<usize> {
        // Only the swap happens under the lock; building the parts (a sort
        // each) does not hold checks back, and one part at a time is built.
        let taken = self
            .tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .detach();
        self.metrics.verifier_last_used_pending.set(0);
        let now = self.clock.now();
        let mut parts = taken.into_parts(FLUSH_ROWS_PER_TRANSACTION);
        // Nothing noted: one empty part still writes the heartbeat.
        let first = parts.next().unwrap_or_default();
        let mut parts = std::iter::once(first).chain(parts);
        let mut written = 0;
        while let Some(part) = parts.next() {
            let error = match self.source.record_usage(&part, now).await {
                Ok(moved) => {
                    self.metrics.verifier_last_used_flushed.inc_by(moved);
                    self.metrics.verifier_usage_flushed.inc_by(part.checks());
                    written += part.counts.len();
                    continue;
                }
                Err(e @ Error::UncertainCommit(_)) => {
                    self.metrics.verifier_usage_uncertain.inc_by(part.checks());
                    e
                }
                Err(e) => {
                    self.keep(part);
                    e
                }
            };
            for rest in parts {
                self.keep(rest);
            }
            return Err(error);
        }
        Ok(written)
    }

    /// Puts a part of a flush that was not written back into the tally.
    fn keep(&self, part: UsageBatch) {
        let dropped = self
            .tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(part);
        self.metrics.verifier_usage_dropped.inc_by(dropped);
    }
}

/// The usage outcome a check's code is counted as; malformed and unknown
/// keys name no key.
fn counted(code: Code) -> Option<Outcome> {
    match code {
        Code::Valid => Some(Outcome::Valid),
        Code::InsufficientScope => Some(Outcome::InsufficientScope),
        Code::Revoked => Some(Outcome::Revoked),
        Code::Expired => Some(Outcome::Expired),
        Code::Malformed | Code::Unknown => None,
    }
}

/// How the follower learns that something changed.
pub struct Follow {
    /// Poll for changes this often while a listener wakes the follower.
    pub poll: Duration,
    /// Poll this often while nothing would wake it (no listener, or the
    /// listener's connection is down, as during a failover).
    pub unheard_poll: Duration,
    /// Set while a listener is connected (PostgreSQL LISTEN).
    pub listening: Arc<AtomicBool>,
    /// Reload everything this often, as a safety net.
    pub full_reload: Duration,
    /// Flush last-used times this often.
    pub flush: Duration,
}

/// How soon to look again while a read replica has not replayed an announced change.
const REPLAY_POLL: Duration = Duration::from_millis(20);

/// Keeps a verifier current until the process ends: the first full load (retried
/// until the database answers), then a catch-up on every wake-up and poll, a
/// full reload now and then, and the last-used flush.
pub async fn follow(
    verifier: Arc<Verifier>,
    timing: Follow,
    mut wake: tokio::sync::mpsc::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match verifier.reload().await {
            Ok(keys) => {
                info!(keys, "key set loaded");
                break;
            }
            Err(e) => {
                warn!(error = %e, "cannot load the key set; retrying");
                tokio::time::sleep(backoff).await;
                // At most a second apart: ready soon after the database is back.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    // Flushes run beside the catch-ups, never between them: a flush of many
    // keys takes seconds, and revocations must not wait for it.
    let flusher = Arc::clone(&verifier);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(timing.flush).await;
            if let Err(e) = flusher.flush_usage().await {
                warn!(error = %e, "could not record last-used times and usage");
            }
        }
    });
    let mut last_reload = Instant::now();
    // Until a listener says it is connected, nothing else would wake us.
    let mut next_poll = timing.unheard_poll;
    loop {
        tokio::select! {
            _ = wake.recv() => {}
            () = tokio::time::sleep(next_poll) => {}
        }
        let outcome = if last_reload.elapsed() >= timing.full_reload {
            last_reload = Instant::now();
            verifier.reload().await.map(|_| 0)
        } else {
            verifier.catch_up().await
        };
        if let Err(e) = outcome {
            warn!(error = %e, "cannot reach the key database; answering from memory");
        }
        next_poll = if verifier.behind() {
            REPLAY_POLL
        } else if timing.listening.load(Ordering::SeqCst) {
            timing.poll
        } else {
            timing.unheard_poll
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use jiff::SignedDuration;

    use super::*;
    use crate::{
        clock::ManualClock,
        key::{KeyFactory, SeededEntropy},
        store::{IssueReason, KeyMetadata, KeyState},
    };

    /// An in-memory key database: rows by key id, each with its change number.
    #[derive(Default)]
    struct FakeSource {
        rows: Mutex<Vec<(i64, KeyRecord)>>,
        seq: Mutex<i64>,
        finds: AtomicUsize,
        down: AtomicBool,
        /// `find` never answers (a database that accepts and hangs).
        hangs: AtomicBool,
        /// `find` calls running now, and the most at once.
        finding: AtomicUsize,
        most_finding: AtomicUsize,
        used: Mutex<Vec<(Arc<str>, Timestamp)>>,
        counted: Mutex<Vec<crate::usage::UsageCount>>,
        /// `record_usage` fails at the commit, outcome unknown.
        commit_lost: AtomicBool,
    }

    /// Counts a `find` call down when it ends.
    struct Finding<'a>(&'a AtomicUsize);

    impl Drop for Finding<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl FakeSource {
        fn write(&self, record: KeyRecord) {
            let mut seq = self.seq.lock().unwrap();
            *seq += 1;
            let mut rows = self.rows.lock().unwrap();
            rows.retain(|(_, r)| r.key_id != record.key_id);
            rows.push((*seq, record));
        }

        /// The rows and counter as they are now, as a backup holds them.
        fn backup(&self) -> (Vec<(i64, KeyRecord)>, i64) {
            (self.rows.lock().unwrap().clone(), *self.seq.lock().unwrap())
        }

        /// Puts a backup back: every later change is gone.
        fn restore(&self, (rows, seq): (Vec<(i64, KeyRecord)>, i64)) {
            *self.rows.lock().unwrap() = rows;
            *self.seq.lock().unwrap() = seq;
        }

        fn check_up(&self) -> Result<()> {
            if self.down.load(Ordering::SeqCst) {
                return Err(crate::Error::Config("database down".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl KeySource for FakeSource {
        async fn live_keys(&self, sink: &mut (dyn FnMut(KeyRecord) + Send)) -> Result<i64> {
            self.check_up()?;
            let seq = *self.seq.lock().unwrap();
            let rows = self.rows.lock().unwrap();
            for (_, record) in rows.iter().filter(|(_, r)| r.state != KeyState::Revoked) {
                sink(record.clone());
            }
            Ok(seq)
        }
        async fn changes_since(&self, after: i64, limit: i64) -> Result<Vec<(i64, KeyRecord)>> {
            self.check_up()?;
            let mut rows: Vec<_> = self
                .rows
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, _)| *s > after)
                .cloned()
                .collect();
            rows.sort_by_key(|(s, _)| *s);
            rows.truncate(usize::try_from(limit).unwrap());
            Ok(rows)
        }
        async fn find(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
            self.check_up()?;
            self.finds.fetch_add(1, Ordering::SeqCst);
            let now = self.finding.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_finding.fetch_max(now, Ordering::SeqCst);
            // Counted down however the call ends (a caller past its deadline drops it).
            let _done = Finding(&self.finding);
            let wait = if self.hangs.load(Ordering::SeqCst) {
                Duration::from_secs(3_600)
            } else {
                Duration::from_millis(20)
            };
            tokio::time::sleep(wait).await;
            let rows = self.rows.lock().unwrap();
            Ok(rows
                .iter()
                .find(|(_, r)| r.key_hash == *hash)
                .map(|(_, r)| r.clone()))
        }
        async fn record_usage(&self, batch: &UsageBatch, _at: Timestamp) -> Result<u64> {
            self.check_up()?;
            if self.commit_lost.load(Ordering::SeqCst) {
                return Err(Error::UncertainCommit(sqlx::Error::PoolClosed));
            }
            self.used
                .lock()
                .unwrap()
                .extend_from_slice(&batch.last_used);
            self.counted
                .lock()
                .unwrap()
                .extend_from_slice(&batch.counts);
            Ok(batch.last_used.len() as u64)
        }
        async fn position(&self, witness: Option<&str>) -> Result<ChangePosition> {
            self.check_up()?;
            let rows = self.rows.lock().unwrap();
            Ok(ChangePosition {
                seq: *self.seq.lock().unwrap(),
                witness_seq: witness
                    .and_then(|id| rows.iter().find(|(_, r)| r.key_id == id).map(|(s, _)| *s)),
            })
        }
    }

    fn start() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    struct World {
        source: Arc<FakeSource>,
        clock: Arc<ManualClock>,
        keys: KeyFactory,
        verifier: Verifier,
    }

    fn world(config: VerifierConfig) -> World {
        let source = Arc::new(FakeSource::default());
        let clock = Arc::new(ManualClock::new(start()));
        let verifier = Verifier::new(
            source.clone(),
            clock.clone(),
            config,
            Arc::new(Metrics::default()),
        );
        World {
            source,
            clock,
            keys: KeyFactory::new("kw", Arc::new(SeededEntropy::new(7))).unwrap(),
            verifier,
        }
    }

    impl World {
        /// A new key in the given state; returns the plaintext and its record.
        fn issue(&self, state: KeyState, scopes: &[&str]) -> (String, KeyRecord) {
            let plain = self.keys.new_key().unwrap();
            let record = KeyRecord {
                key_id: self.keys.new_key_id().unwrap(),
                key_hash: plain.hash(),
                key_hint: plain.hint(),
                apikey_uid: "uid-1".into(),
                namespace: "team-ml".into(),
                name: "inference".into(),
                metadata: KeyMetadata {
                    owner: "alice@example.com".into(),
                    team: "ml".into(),
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                },
                state,
                created_at: start(),
                activated_at: Some(start()),
                expires_at: None,
                revoked_at: None,
                revoke_reason: None,
                issue_reason: IssueReason::Initial,
                rotation_request: None,
                cluster: "default".into(),
            };
            self.source.write(record.clone());
            (plain.expose().to_owned(), record)
        }

        async fn code(&self, key: &str, scopes: &[&str]) -> Code {
            match self.verifier.check(key, scopes).await {
                Checked::Answer(verdict) => verdict.code,
                Checked::Unavailable(why) => panic!("unavailable: {why}"),
            }
        }
    }

    #[tokio::test]
    async fn a_loaded_set_answers_from_memory_and_follows_changes() {
        let w = world(VerifierConfig::default());
        let (key, mut record) = w.issue(KeyState::Active, &["inference"]);
        assert!(matches!(
            w.verifier.check(&key, &[]).await,
            Checked::Unavailable(_)
        ));
        w.verifier.reload().await.unwrap();
        assert_eq!(w.code(&key, &["inference"]).await, Code::Valid);
        assert_eq!(w.code(&key, &["admin"]).await, Code::InsufficientScope);
        assert_eq!(w.code("kw_garbage", &[]).await, Code::Malformed);
        assert_eq!(
            w.source.finds.load(Ordering::SeqCst),
            0,
            "no database query"
        );

        // A revocation is seen at the next catch-up and answered from memory.
        record.state = KeyState::Revoked;
        w.source.write(record);
        assert_eq!(w.verifier.catch_up().await.unwrap(), 1);
        assert_eq!(w.code(&key, &[]).await, Code::Revoked);
        assert_eq!(w.source.finds.load(Ordering::SeqCst), 0);
        // Catching up again applies nothing twice.
        assert_eq!(w.verifier.catch_up().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn expiry_is_checked_against_the_clock_on_every_request() {
        let w = world(VerifierConfig::default());
        let plain = w.keys.new_key().unwrap();
        let (key, mut record) = w.issue(KeyState::Retiring, &["inference"]);
        drop(plain);
        record.expires_at = Some(start() + SignedDuration::from_secs(60));
        w.source.write(record);
        w.verifier.reload().await.unwrap();
        assert_eq!(w.code(&key, &[]).await, Code::Valid);
        w.clock.advance(SignedDuration::from_secs(60));
        assert_eq!(w.code(&key, &[]).await, Code::Expired);
    }

    #[tokio::test]
    async fn a_key_issued_after_the_load_verifies_at_once_through_one_query() {
        let w = world(VerifierConfig::default());
        w.verifier.reload().await.unwrap();
        let (key, _) = w.issue(KeyState::Pending, &["inference"]);
        let checks = (0..20).map(|_| w.verifier.check(&key, &["inference"]));
        for checked in futures::future::join_all(checks).await {
            assert!(matches!(
                checked,
                Checked::Answer(Verdict {
                    code: Code::Valid,
                    ..
                })
            ));
        }
        assert_eq!(
            w.source.finds.load(Ordering::SeqCst),
            1,
            "one query per hash in flight"
        );
    }

    #[tokio::test]
    async fn unknown_answers_are_cached_briefly_and_a_change_clears_them() {
        let w = world(VerifierConfig::default());
        w.verifier.reload().await.unwrap();
        let stranger = w.keys.new_key().unwrap();
        for _ in 0..5 {
            assert_eq!(w.code(stranger.expose(), &[]).await, Code::Unknown);
        }
        assert_eq!(
            w.source.finds.load(Ordering::SeqCst),
            1,
            "a retried unknown key is not queried again"
        );
        // Any change clears the negative cache: the next check asks again.
        w.issue(KeyState::Active, &["inference"]);
        assert_eq!(w.verifier.catch_up().await.unwrap(), 1);
        assert_eq!(w.code(stranger.expose(), &[]).await, Code::Unknown);
        assert_eq!(w.source.finds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn past_the_staleness_limit_every_check_fails_closed() {
        let w = world(VerifierConfig {
            max_staleness: Duration::from_millis(50),
            ..VerifierConfig::default()
        });
        let (key, _) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        w.source.down.store(true, Ordering::SeqCst);
        assert!(w.verifier.catch_up().await.is_err());
        assert_eq!(
            w.code(&key, &[]).await,
            Code::Valid,
            "known keys keep verifying"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(matches!(
            w.verifier.check(&key, &[]).await,
            Checked::Unavailable(_)
        ));
        assert!(w.verifier.is_ready().is_err());
        // Back: one successful catch-up makes it answer again.
        w.source.down.store(false, Ordering::SeqCst);
        w.verifier.catch_up().await.unwrap();
        assert_eq!(w.code(&key, &[]).await, Code::Valid);
    }

    #[tokio::test]
    async fn a_verifier_that_never_loaded_never_says_valid() {
        let w = world(VerifierConfig::default());
        let (key, _) = w.issue(KeyState::Active, &[]);
        w.source.down.store(true, Ordering::SeqCst);
        assert!(w.verifier.reload().await.is_err());
        assert!(matches!(
            w.verifier.check(&key, &[]).await,
            Checked::Unavailable(_)
        ));
        assert!(w.verifier.is_ready().is_err());
    }

    #[tokio::test]
    async fn last_use_is_kept_per_minute_and_flushed_in_one_batch() {
        let w = world(VerifierConfig {
            max_usage_entries: 1,
            ..VerifierConfig::default()
        });
        let (key, record) = w.issue(KeyState::Active, &[]);
        let (other, _) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        w.clock.advance(SignedDuration::from_secs(75));
        for _ in 0..3 {
            w.code(&key, &[]).await;
        }
        w.code(&other, &[]).await; // the tally holds one key: this one is dropped
        assert_eq!(w.verifier.metrics.verifier_usage_dropped.get(), 1);
        assert_eq!(w.verifier.flush_usage().await.unwrap(), 1);
        let used = w.source.used.lock().unwrap().clone();
        let minute = Timestamp::from_second(start().as_second() + 60).unwrap();
        assert_eq!(used, vec![(Arc::from(record.key_id.as_str()), minute)]);
        let counted = w.source.counted.lock().unwrap().clone();
        assert_eq!(counted.len(), 1);
        assert_eq!(
            (&*counted[0].key_id, counted[0].outcome, counted[0].count),
            (record.key_id.as_str(), Outcome::Valid, 3)
        );
        assert_eq!(counted[0].hour.as_second() % 3600, 0, "an hour's start");
        assert_eq!(
            w.verifier.flush_usage().await.unwrap(),
            0,
            "nothing pending"
        );
    }

    #[tokio::test]
    async fn refused_keys_are_counted_for_the_key_they_name() {
        let w = world(VerifierConfig::default());
        let (followed, mut followed_record) = w.issue(KeyState::Active, &["inference"]);
        let (expiring, mut expiring_record) = w.issue(KeyState::Retiring, &[]);
        expiring_record.expires_at = Some(start() + SignedDuration::from_secs(1));
        w.source.write(expiring_record.clone());
        w.verifier.reload().await.unwrap();
        // Revoked while followed: from memory.
        followed_record.state = KeyState::Revoked;
        w.source.write(followed_record.clone());
        w.verifier.catch_up().await.unwrap();
        // Revoked before this verifier started: from the database, then the negative cache.
        let (before, mut before_record) = w.issue(KeyState::Active, &[]);
        before_record.state = KeyState::Revoked;
        w.source.write(before_record.clone());
        w.clock.advance(SignedDuration::from_secs(2));
        assert_eq!(w.code(&followed, &[]).await, Code::Revoked);
        assert_eq!(w.code(&expiring, &[]).await, Code::Expired);
        assert_eq!(w.code(&before, &[]).await, Code::Revoked);
        assert_eq!(w.code(&before, &[]).await, Code::Revoked);
        // Unknown and malformed keys name no key: not counted.
        w.code(w.keys.new_key().unwrap().expose(), &[]).await;
        w.code("kw_garbage", &[]).await;
        w.verifier.flush_usage().await.unwrap();
        let mut counted: Vec<(String, Outcome, u64)> = w
            .source
            .counted
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.key_id.to_string(), c.outcome, c.count))
            .collect();
        counted.sort();
        let mut expected = vec![
            (followed_record.key_id, Outcome::Revoked, 1),
            (expiring_record.key_id, Outcome::Expired, 1),
            (before_record.key_id, Outcome::Revoked, 2),
        ];
        expected.sort();
        assert_eq!(counted, expected);
        assert!(
            w.source.used.lock().unwrap().is_empty(),
            "a refused attempt is no use"
        );
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_its_counts_and_an_uncertain_commit_gives_them_up() {
        let w = world(VerifierConfig::default());
        let (key, record) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        w.code(&key, &[]).await;
        w.source.down.store(true, Ordering::SeqCst);
        assert!(w.verifier.flush_usage().await.is_err());
        w.source.down.store(false, Ordering::SeqCst);
        w.code(&key, &[]).await;
        w.verifier.flush_usage().await.unwrap();
        let counted = w.source.counted.lock().unwrap().clone();
        assert_eq!(
            (counted.len(), counted[0].count),
            (1, 2),
            "written once, added up"
        );
        assert_eq!(*counted[0].key_id, *record.key_id);

        // A commit that may have landed is never written again: nothing counts twice.
        w.code(&key, &[]).await;
        w.source.commit_lost.store(true, Ordering::SeqCst);
        assert!(w.verifier.flush_usage().await.is_err());
        assert_eq!(w.verifier.metrics.verifier_usage_uncertain.get(), 1);
        w.source.commit_lost.store(false, Ordering::SeqCst);
        assert_eq!(w.verifier.flush_usage().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_flood_of_unknown_keys_is_bounded_and_never_accepted() {
        let w = world(VerifierConfig {
            max_fallbacks: 2,
            fallback_timeout: Duration::from_millis(30),
            ..VerifierConfig::default()
        });
        w.verifier.reload().await.unwrap();
        let strangers: Vec<String> = (0..10)
            .map(|_| w.keys.new_key().unwrap().expose().to_owned())
            .collect();
        let checks = strangers.iter().map(|k| w.verifier.check(k, &[]));
        for checked in futures::future::join_all(checks).await {
            // Answered (401), shed (401) or out of time (503): never valid.
            assert!(
                matches!(
                    checked,
                    Checked::Answer(Verdict {
                        code: Code::Unknown,
                        ..
                    }) | Checked::Unavailable(_)
                ),
                "{checked:?}"
            );
        }
        assert!(
            w.source.most_finding.load(Ordering::SeqCst) <= 2,
            "at most the bound in flight"
        );
        assert!(
            w.source.finds.load(Ordering::SeqCst) < strangers.len(),
            "the rest shed"
        );
    }

    #[tokio::test]
    async fn a_key_not_in_memory_is_answered_within_the_deadline_and_never_accepted() {
        let w = world(VerifierConfig {
            fallback_timeout: Duration::from_millis(50),
            ..VerifierConfig::default()
        });
        w.verifier.reload().await.unwrap();
        let (fresh, _) = w.issue(KeyState::Active, &[]);
        w.source.hangs.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let checked = w.verifier.check(&fresh, &[]).await;
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(checked, Checked::Unavailable(CANNOT_ASK));
        // A query that missed its deadline is no proof of an outage: the next asks again.
        w.source.hangs.store(false, Ordering::SeqCst);
        assert_eq!(w.code(&fresh, &[]).await, Code::Valid);
    }

    #[tokio::test]
    async fn while_the_database_is_down_keys_not_in_memory_are_answered_at_once() {
        let w = world(VerifierConfig::default());
        let (known, _) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        let (fresh, _) = w.issue(KeyState::Active, &[]);
        w.source.down.store(true, Ordering::SeqCst);
        assert!(w.verifier.catch_up().await.is_err());
        let finds = w.source.finds.load(Ordering::SeqCst);
        assert_eq!(
            w.code(&known, &[]).await,
            Code::Valid,
            "memory still answers"
        );
        let stranger = w.keys.new_key().unwrap();
        for key in [fresh.as_str(), stranger.expose()] {
            assert_eq!(
                w.verifier.check(key, &[]).await,
                Checked::Unavailable(CANNOT_ASK)
            );
        }
        assert_eq!(w.source.finds.load(Ordering::SeqCst), finds, "not asked");
        // Back: the next catch-up clears it, and the fresh key verifies.
        w.source.down.store(false, Ordering::SeqCst);
        w.verifier.catch_up().await.unwrap();
        assert_eq!(w.code(&fresh, &[]).await, Code::Valid);
        assert_eq!(w.code(stranger.expose(), &[]).await, Code::Unknown);
    }

    #[tokio::test]
    async fn a_reload_updates_the_key_set_in_place_and_misses_no_revocation() {
        let w = world(VerifierConfig::default());
        let (kept, _) = w.issue(KeyState::Active, &["inference"]);
        let (changed, mut changed_record) = w.issue(KeyState::Active, &["inference"]);
        let (doomed, mut doomed_record) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        let identity = |key: &str| {
            let snapshot = w.verifier.snapshot.read().unwrap();
            match snapshot.as_ref().unwrap().lookup(&digest(key)) {
                crate::verifier::snapshot::Lookup::Live(entry) => entry.identity.clone(),
                other => panic!("{other:?}"),
            }
        };
        let before = identity(&kept);
        // Changes the verifier has not followed: only the reload brings them.
        doomed_record.state = KeyState::Revoked;
        w.source.write(doomed_record);
        changed_record.metadata.scopes = vec!["admin".into()];
        w.source.write(changed_record);
        let (added, _) = w.issue(KeyState::Active, &[]);
        assert_eq!(w.verifier.reload().await.unwrap(), 3);
        assert!(
            Arc::ptr_eq(&before, &identity(&kept)),
            "unchanged: kept as is"
        );
        assert_eq!(w.code(&changed, &["admin"]).await, Code::Valid);
        let finds = w.source.finds.load(Ordering::SeqCst);
        assert_eq!(w.code(&added, &[]).await, Code::Valid);
        assert_eq!(w.source.finds.load(Ordering::SeqCst), finds, "from memory");
        assert_eq!(w.code(&doomed, &[]).await, Code::Revoked);
        assert_eq!(
            w.verifier.position().unwrap().0,
            *w.source.seq.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn a_restore_reloads_at_once_and_a_key_seen_revoked_stays_revoked() {
        let w = world(VerifierConfig::default());
        let (leaked, mut leaked_record) = w.issue(KeyState::Active, &[]);
        let (kept, mut kept_record) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        let backup = w.source.backup();
        // After the backup: the leaked key is revoked, and the verifier sees it.
        leaked_record.state = KeyState::Revoked;
        w.source.write(leaked_record);
        w.verifier.catch_up().await.unwrap();
        assert_eq!(w.code(&leaked, &[]).await, Code::Revoked);

        // The restore brings the leaked key back as active, and the operator
        // writes enough afterwards that the counter passes what the verifier
        // saw: only the rewound witness row tells.
        w.source.restore(backup);
        kept_record.metadata.team = "search".into();
        w.source.write(kept_record.clone());
        let (fresh, _) = w.issue(KeyState::Active, &[]);
        assert!(*w.source.seq.lock().unwrap() > w.verifier.position().unwrap().0);
        w.verifier.catch_up().await.unwrap();
        assert_eq!(w.verifier.metrics.verifier_history_resets.get(), 1);
        assert_eq!(w.code(&fresh, &[]).await, Code::Valid);
        assert_eq!(
            w.verifier.position().unwrap().0,
            *w.source.seq.lock().unwrap(),
            "current to the restored history"
        );
        // Revocation is final, whatever the restored rows say.
        assert_eq!(w.code(&leaked, &[]).await, Code::Revoked);

        // A later revocation in the restored history is seen, though its
        // change number is below what the verifier had seen before.
        kept_record.state = KeyState::Revoked;
        w.source.write(kept_record);
        w.verifier.catch_up().await.unwrap();
        assert_eq!(w.code(&kept, &[]).await, Code::Revoked);
        assert_eq!(w.verifier.metrics.verifier_history_resets.get(), 1);
    }

    #[tokio::test]
    async fn a_counter_below_what_was_seen_reloads() {
        let w = world(VerifierConfig::default());
        let (_, _) = w.issue(KeyState::Active, &[]);
        let backup = w.source.backup();
        let (later, _) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        assert_eq!(w.code(&later, &[]).await, Code::Valid);
        w.source.restore(backup);
        w.verifier.catch_up().await.unwrap();
        assert_eq!(w.verifier.metrics.verifier_history_resets.get(), 1);
        let finds = w.source.finds.load(Ordering::SeqCst);
        assert_eq!(w.code(&later, &[]).await, Code::Unknown);
        assert_eq!(w.source.finds.load(Ordering::SeqCst), finds + 1);
    }

    #[tokio::test]
    async fn only_keys_of_accepted_clusters_verify() {
        let w = world(VerifierConfig {
            accept_clusters: Some(vec!["eu-1".into()]),
            ..VerifierConfig::default()
        });
        let (ours, mut record) = w.issue(KeyState::Active, &[]);
        record.cluster = "eu-1".into();
        w.source.write(record);
        let (theirs, _) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        assert_eq!(w.code(&ours, &[]).await, Code::Valid);
        assert_eq!(w.code(&theirs, &[]).await, Code::Unknown);
    }

    #[tokio::test]
    async fn a_replica_behind_an_announced_change_counts_as_stale() {
        let w = world(VerifierConfig {
            max_staleness: Duration::from_millis(50),
            ..VerifierConfig::default()
        });
        let (key, record) = w.issue(KeyState::Active, &[]);
        w.verifier.reload().await.unwrap();
        let seen = w.verifier.position().unwrap().0;
        w.verifier.announce(seen + 1);
        assert!(w.verifier.behind());
        tokio::time::sleep(Duration::from_millis(80)).await;
        w.verifier.catch_up().await.unwrap();
        assert!(
            matches!(w.verifier.check(&key, &[]).await, Checked::Unavailable(_)),
            "the database answers, but from a replica behind the primary"
        );
        w.source.write(record);
        w.verifier.catch_up().await.unwrap();
        assert!(!w.verifier.behind());
        assert_eq!(w.code(&key, &[]).await, Code::Valid);
    }
}
