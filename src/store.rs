//! The key database: records of issued keys (hash only) and an append-only audit
//! trail. One implementation over sqlx's `Any` driver serves SQLite and
//! PostgreSQL with the same queries; see docs/database.md for the contract.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
};

use async_trait::async_trait;
use jiff::Timestamp;
use sqlx::{
    AnyPool, Row,
    any::{AnyPoolOptions, AnyRow},
    migrate::{Migration, MigrationType, Migrator},
};

use crate::{
    Error, Result,
    key::KeyHash,
    usage::{Outcome, UsageBatch, summary::RecentUse},
};

/// Where a key is in its life. Every state but `revoked` verifies until `expires_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Recorded and being written to its Secret; revoked if it never gets there.
    Pending,
    /// The key in the Secret; verifies.
    Active,
    /// A replaced key in its grace period; verifies until `expires_at`.
    Retiring,
    /// Never verifies again.
    Revoked,
}

impl KeyState {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Revoked => "revoked",
        }
    }
}

impl FromStr for KeyState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => KeyState::Pending,
            "active" => KeyState::Active,
            "retiring" => KeyState::Retiring,
            "revoked" => KeyState::Revoked,
            other => return Err(Error::Serialize(format!("unknown key state {other:?}"))),
        })
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key was revoked; stored in `api_keys.revoke_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    /// The ApiKey was deleted.
    Deleted,
    /// A newer key took its place in the Secret (lost or edited Secret).
    Replaced,
    /// A pending key that never reached its Secret.
    Abandoned,
    /// Rotated out, and its grace period is over.
    Rotated,
    /// Rotated out by an emergency rotation: no grace period.
    Emergency,
    /// Replaced after its own expiry had passed: it never verifies again.
    Expired,
    /// An ApiKeyPolicy forbids the key (its `Revoke` or `RefuseRotation` action).
    PolicyViolation,
    /// Anti-entropy: the ApiKey that owned the key no longer exists (a restored
    /// or failed-over database brought back a key revoked since).
    Orphaned,
    /// Anti-entropy: the ApiKey exists, and the key is neither the one in its
    /// Secret nor a previous key in its grace period.
    Superseded,
}

impl RevokeReason {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Deleted => "deleted",
            RevokeReason::Replaced => "replaced",
            RevokeReason::Abandoned => "abandoned",
            RevokeReason::Rotated => "rotated",
            RevokeReason::Emergency => "emergency",
            RevokeReason::Expired => "expired",
            RevokeReason::PolicyViolation => "policy_violation",
            RevokeReason::Orphaned => "orphaned",
            RevokeReason::Superseded => "superseded",
        }
    }
}

/// Why a key was issued; stored in `api_keys.issue_reason`. After a crash it
/// tells the next reconcile whether the key it replaced gets a grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// The ApiKey's first key.
    Initial,
    /// The Secret was deleted while a key was active.
    SecretDeleted,
    /// The Secret's key was edited or removed.
    SecretAltered,
    /// `spec.rotation.schedule` was due.
    Scheduled,
    /// A new `keyward.dev/rotate` annotation value.
    Requested,
    /// A rotate request with `keyward.dev/revoke-previous`: older keys are revoked at once.
    Emergency,
}

impl IssueReason {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueReason::Initial => "initial",
            IssueReason::SecretDeleted => "secret_deleted",
            IssueReason::SecretAltered => "secret_altered",
            IssueReason::Scheduled => "scheduled",
            IssueReason::Requested => "requested",
            IssueReason::Emergency => "emergency",
        }
    }

    /// Whether this key came from a rotation (scheduled, requested or emergency).
    pub fn is_rotation(self) -> bool {
        matches!(
            self,
            IssueReason::Scheduled | IssueReason::Requested | IssueReason::Emergency
        )
    }
}

impl FromStr for IssueReason {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "initial" => IssueReason::Initial,
            "secret_deleted" => IssueReason::SecretDeleted,
            "secret_altered" => IssueReason::SecretAltered,
            "scheduled" => IssueReason::Scheduled,
            "requested" => IssueReason::Requested,
            "emergency" => IssueReason::Emergency,
            other => return Err(Error::Serialize(format!("unknown issue reason {other:?}"))),
        })
    }
}

/// Who the key belongs to and what it may do: the part of a record that follows the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMetadata {
    /// `spec.owner`.
    pub owner: String,
    /// `spec.team`.
    pub team: String,
    /// `spec.scopes`, in spec order.
    pub scopes: Vec<String>,
}

/// One issued key as the database holds it. There is no plaintext here, only the hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id, `kid_…`.
    pub key_id: String,
    /// SHA-256 of the whole key.
    pub key_hash: KeyHash,
    /// The key's first characters, safe to show.
    pub key_hint: String,
    /// `metadata.uid` of the ApiKey that owns the key.
    pub apikey_uid: String,
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub name: String,
    /// Owner, team and scopes.
    pub metadata: KeyMetadata,
    /// Life-cycle state.
    pub state: KeyState,
    /// When the record was inserted (pending).
    pub created_at: Timestamp,
    /// When the key became active.
    pub activated_at: Option<Timestamp>,
    /// When the key stops verifying: end of a retiring key's grace period, or `spec.expiresAfter`.
    pub expires_at: Option<Timestamp>,
    /// When the key was revoked.
    pub revoked_at: Option<Timestamp>,
    /// Why it was revoked (`deleted`, `replaced`, `abandoned`, `rotated`, `emergency`).
    pub revoke_reason: Option<String>,
    /// Why it was issued.
    pub issue_reason: IssueReason,
    /// The `keyward.dev/rotate` value in force when it was issued; that request is handled.
    pub rotation_request: Option<String>,
    /// The cluster whose operator issued it (`--cluster-name`); a store writes
    /// its own cluster's name, whatever this says.
    pub cluster: String,
}

/// The records of one ApiKey that are not revoked, and how many keys it has had.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    /// Records in state pending, active or retiring, oldest first.
    pub live: Vec<KeyRecord>,
    /// Keys ever activated for this ApiKey: `status.revision`.
    pub issued: i64,
    /// The latest minute any of its keys was presented to a verifier.
    pub last_used_at: Option<Timestamp>,
}

/// One row of the append-only audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// The key the entry is about.
    pub key_id: String,
    /// When it happened.
    pub at: Timestamp,
    /// `issued`, `activated`, `metadata_changed` or `revoked`.
    pub action: String,
    /// Human-readable detail (never the key).
    pub detail: String,
}

/// The key database as the reconciler and `verify` see it. Every write is
/// idempotent or guarded by the state it expects, and audited in the same transaction.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// The cluster whose records this store reads and writes (`--cluster-name`).
    fn cluster(&self) -> &str;
    /// The live records of one ApiKey and its issued count.
    async fn load(&self, apikey_uid: &str) -> Result<KeySet>;
    /// Inserts a new record in state `pending` and audits `issued`.
    async fn insert_pending(&self, record: &KeyRecord) -> Result<()>;
    /// Moves a `pending` record to `active` with its expiry; `StaleKeyState` if it is not pending.
    async fn activate(
        &self,
        key_id: &str,
        at: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<()>;
    /// Moves an `active` record to `retiring` until `expires_at`, or until its own
    /// earlier expiry; a no-op if it is not active.
    async fn retire(&self, key_id: &str, expires_at: Timestamp, at: Timestamp) -> Result<()>;
    /// Brings an `active` record's expiry forward to `expires_at` (spec.expiresAfter
    /// was tightened); a no-op when it already expires at or before that.
    async fn shorten_expiry(
        &self,
        key_id: &str,
        expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<()>;
    /// Rewrites owner, team and scopes of a live record and audits `metadata_changed`.
    async fn update_metadata(
        &self,
        key_id: &str,
        metadata: &KeyMetadata,
        at: Timestamp,
    ) -> Result<()>;
    /// Revokes a record unless it already is; revoking twice is a no-op.
    async fn revoke(&self, key_id: &str, reason: RevokeReason, at: Timestamp) -> Result<()>;
    /// The record whose hash matches, in any state.
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>>;
    /// Answers when the database is reachable.
    async fn ping(&self) -> Result<()>;
    /// The uids of the ApiKeys in `namespace` that hold a live (pending, active
    /// or retiring) key: the keys `maxKeysPerNamespace` counts, including those
    /// of ApiKeys being deleted whose keys are not revoked yet.
    async fn holders(&self, namespace: &str) -> Result<HashSet<String>>;
    /// The ApiKeys (by uid) any of whose keys was used at or after `since`,
    /// each with its latest use: how the operator learns of a use that should
    /// reach `status.lastUsedAt`.
    async fn used_since(&self, since: Timestamp) -> Result<Vec<(String, Timestamp)>>;
}

/// Which SQL database a URL selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:` URLs, the embedded default.
    Sqlite,
    /// `postgres:` / `postgresql:` URLs.
    Postgres,
}

impl Backend {
    fn of(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(Error::Config(
                "database URL must start with sqlite: or postgres:".into(),
            ))
        }
    }

    fn migrator(self) -> Migrator {
        let scripts = match self {
            Backend::Sqlite => [
                include_str!("../migrations/sqlite/0001_keys.sql"),
                include_str!("../migrations/sqlite/0002_changes.sql"),
                include_str!("../migrations/sqlite/0003_governance_and_use.sql"),
                include_str!("../migrations/sqlite/0004_clusters.sql"),
                include_str!("../migrations/sqlite/0005_usage.sql"),
            ],
            Backend::Postgres => [
                include_str!("../migrations/postgres/0001_keys.sql"),
                include_str!("../migrations/postgres/0002_changes.sql"),
                include_str!("../migrations/postgres/0003_governance_and_use.sql"),
                include_str!("../migrations/postgres/0004_clusters.sql"),
                include_str!("../migrations/postgres/0005_usage.sql"),
            ],
        };
        let names = ["keys", "changes", "governance_and_use", "clusters", "usage"];
        Migrator::with_migrations(
            scripts
                .into_iter()
                .zip(names)
                .zip(1..)
                .map(|((sql, name), version)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(name),
                        MigrationType::Simple,
                        sqlx::SqlSafeStr::into_sql_str(sql),
                        false,
                    )
                })
                .collect(),
        )
    }
}

/// The SQL key store.
#[derive(Clone, Debug)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// The cluster whose records the [`KeyStore`] methods read and write.
    cluster: String,
}

/// The PostgreSQL NOTIFY channel that carries each change number at commit.
pub const CHANGE_CHANNEL: &str = "keyward_key_changes";

/// Rows per statement in a usage flush: well under SQLite's and PostgreSQL's
/// bind-parameter limits, and few round trips for 100,000 counts.
const USAGE_ROWS_PER_STATEMENT: usize = 500;

/// A pause in verifier flushes longer than this starts the usage reporting
/// anew (`lifetime.maxUnused` then waits a whole window): keep
/// `--last-used-flush` well below it.
pub const REPORTING_GAP: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// `($1, $2), ($3, $4), …` for `rows` rows of `columns` parameters.
fn placeholders(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|row| {
            let params: Vec<String> = (1..=columns)
                .map(|column| format!("${}", row * columns + column))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The URL used when none is given: `keyward.db` in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://keyward.db";

/// The cluster name when `--cluster-name` is not given: enough for a key
/// database that one cluster uses.
pub const DEFAULT_CLUSTER_NAME: &str = "default";

/// A live record as the anti-entropy pass sees it: no hash, no metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRow {
    /// Public id.
    pub key_id: String,
    /// `metadata.uid` of the owning ApiKey.
    pub apikey_uid: String,
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub name: String,
    /// Pending, active or retiring.
    pub state: KeyState,
    /// When the record was inserted.
    pub created_at: Timestamp,
    /// When it stops verifying, if it does.
    pub expires_at: Option<Timestamp>,
    /// The cluster that issued it.
    pub cluster: String,
}

/// Where the change sequence stands: what a verifier compares with what it has
/// seen, to notice history that moved backwards (a restore, a failover).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangePosition {
    /// The last change number handed out.
    pub seq: i64,
    /// The change number the witness key's row carries now; `None` when the
    /// row does not exist.
    pub witness_seq: Option<i64>,
}
impl SqlStore {
    /// Connects to `url`. An SQLite file is created if missing.
    pub async fn connect(url: &str) -> Result<Self> {
        let (backend, url, options) = Self::pool_options(url)?;
        let pool = options.connect(&url).await?;
        Ok(Self {
            pool,
            backend,
            cluster: DEFAULT_CLUSTER_NAME.to_owned(),
        })
    }

    /// A store that connects on first use, so that a process started while the
    /// database is down starts anyway (the verifier then retries until it loads).
    pub fn connect_lazy(url: &str) -> Result<Self> {
        let (backend, url, options) = Self::pool_options(url)?;
        let pool = options.connect_lazy(&url)?;
        Ok(Self {
            pool,
            backend,
            cluster: DEFAULT_CLUSTER_NAME.to_owned(),
        })
    }

    /// The same database, scoped to another cluster's records.
    pub fn with_cluster(mut self, cluster: &str) -> Self {
        cluster.clone_into(&mut self.cluster);
        self
    }

    fn pool_options(url: &str) -> Result<(Backend, String, AnyPoolOptions)> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        // SQLite takes one writer at a time: four connections serve the reads
        // beside it, with half the page caches and worker threads of eight.
        let connections = match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        };
        let options = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL with a full sync: each commit is one WAL append and
                        // one fsync (a rollback journal costs several), still
                        // durable through a power loss, and readers (verify) never
                        // wait for the writer.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *connection)
                            .await?;
                        sqlx::query("PRAGMA synchronous = FULL")
                            .execute(&mut *connection)
                            .await?;
                        // 512 KiB of page cache per connection instead of 2 MiB:
                        // the OS caches the file anyway, and eight 2 MiB caches
                        // were a third of the operator's memory at 10,000 keys.
                        sqlx::query("PRAGMA cache_size = -512")
                            .execute(&mut *connection)
                            .await?;
                    }
                    Ok(())
                })
            });
        Ok((backend, url, options))
    }

    /// Applies the embedded migrations for this backend.
    pub async fn migrate(&self) -> Result<()> {
        self.backend.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Closes the connection pool; later calls fail. Used at shutdown.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The audit trail of one key, oldest first.
    pub async fn audit(&self, key_id: &str) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT key_id, at, action, detail FROM key_audit WHERE key_id = $1 ORDER BY id",
        )
        .bind(key_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    key_id: row.try_get("key_id")?,
                    at: from_millis(row.try_get("at")?)?,
                    action: row.try_get("action")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect()
    }

    /// How many keys are in each state (all four states, zero included).
    pub async fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM api_keys GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut counts: Vec<(String, i64)> = ["pending", "active", "retiring", "revoked"]
            .iter()
            .map(|s| ((*s).to_owned(), 0))
            .collect();
        for row in rows {
            let state: String = row.try_get("state")?;
            let n: i64 = row.try_get("n")?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }

    /// Every text value in every table, for tests that prove no key is stored.
    pub async fn dump_text(&self) -> Result<String> {
        let mut dump = String::new();
        for row in sqlx::query(
            "SELECT key_id, key_hash, key_hint, apikey_uid, namespace, name, owner, team, scopes, state, revoke_reason, issue_reason, rotation_request FROM api_keys",
        )
        .fetch_all(&self.pool)
        .await?
        {
            for i in 0..row.len() {
                let value: Option<String> = row.try_get(i)?;
                dump.push_str(value.as_deref().unwrap_or(""));
                dump.push('\n');
            }
        }
        for query in [
            "SELECT key_id, outcome FROM key_usage",
            "SELECT key_id, action, detail FROM key_audit",
        ] {
            for row in sqlx::query(query).fetch_all(&self.pool).await? {
                for i in 0..row.len() {
                    let value: String = row.try_get(i)?;
                    dump.push_str(&value);
                    dump.push('\n');
                }
            }
        }
        Ok(dump)
    }

    /// Stamps `key_id`'s row, written earlier in `tx`, with the next change
    /// number: the transaction's last statement before its commit. On
    /// PostgreSQL the counter row stays locked until the commit, so numbers
    /// follow commit order and a reader never skips a change; taking it last
    /// holds that one lock for a single round trip and the commit, not for the
    /// whole transaction. The NOTIFY (delivered at commit) wakes the verifiers.
    async fn stamp_change(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        key_id: &str,
    ) -> Result<()> {
        match self.backend {
            Backend::Postgres => {
                sqlx::query(
                    "WITH next AS (UPDATE key_change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq), \
                     stamped AS (UPDATE api_keys SET change_seq = next.seq FROM next WHERE api_keys.key_id = $1 RETURNING next.seq) \
                     SELECT pg_notify($2, seq::text) FROM stamped",
                )
                .bind(key_id)
                .bind(CHANGE_CHANNEL)
                .execute(&mut **tx)
                .await?;
            }
            // SQLite has one writer at a time: the order within it is free.
            Backend::Sqlite => {
                let change: i64 = sqlx::query(
                    "UPDATE key_change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq",
                )
                .fetch_one(&mut **tx)
                .await?
                .try_get("seq")?;
                sqlx::query("UPDATE api_keys SET change_seq = $1 WHERE key_id = $2")
                    .bind(change)
                    .bind(key_id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Every key that is not revoked, with the change number they are current
    /// to: the verifier's full load. The counter is read first, so no change
    /// after it can be missed by a reader that goes on from it.
    pub async fn live_keys(&self) -> Result<(i64, Vec<KeyRecord>)> {
        let mut records = Vec::new();
        let seq = self
            .each_live_key(&mut |record| records.push(record))
            .await?;
        Ok((seq, records))
    }

    /// [`live_keys`](Self::live_keys) one row at a time, so that a large key set
    /// is never held twice (as rows and as records) while it loads.
    pub async fn each_live_key(&self, sink: &mut (dyn FnMut(KeyRecord) + Send)) -> Result<i64> {
        use futures::TryStreamExt;
        let seq: i64 = sqlx::query("SELECT seq FROM key_change_counter WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("seq")?;
        let query = format!("SELECT {RECORD_COLUMNS} FROM api_keys WHERE state <> 'revoked'");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            sink(record_from_row(&row)?);
        }
        Ok(seq)
    }

    /// The rows written after change `after`, in change order, at most `limit`,
    /// each with its change number. Revoked rows are included: they tell a
    /// verifier to forget the key.
    pub async fn changes_since(&self, after: i64, limit: i64) -> Result<Vec<(i64, KeyRecord)>> {
        let query = format!(
            "SELECT change_seq, {RECORD_COLUMNS} FROM api_keys WHERE change_seq > $1 ORDER BY change_seq LIMIT $2"
        );
        sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("change_seq")?, record_from_row(row)?)))
            .collect()
    }

    /// Writes one part of a verifier flush in one transaction: the last-used times
    /// (forward-only, not a change: verifiers do not care, so the change
    /// number stays), the counts (added: `count = count + n`, so replicas add
    /// up), and the reporting heartbeat. Rows go in key order, so concurrent
    /// flushes lock them in the same order. Returns the last-used rows moved
    /// forward. A failed commit is [`Error::UncertainCommit`]: it may have
    /// landed, and the caller must not write the batch again.
    pub async fn record_usage(&self, batch: &UsageBatch, reported_at: Timestamp) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut moved = 0;
        for chunk in batch.last_used.chunks(USAGE_ROWS_PER_STATEMENT) {
            let values = placeholders(chunk.len(), 2);
            let query = format!(
                "UPDATE api_keys SET last_used_at = v.column2 FROM (VALUES {values}) AS v \
                 WHERE api_keys.key_id = v.column1 AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < v.column2)"
            );
            let mut statement = sqlx::query(sqlx::AssertSqlSafe(query));
            for (key_id, at) in chunk {
                statement = statement.bind(&**key_id).bind(at.as_millisecond());
            }
            moved += statement.execute(&mut *tx).await?.rows_affected();
        }
        for chunk in batch.counts.chunks(USAGE_ROWS_PER_STATEMENT) {
            let values = placeholders(chunk.len(), 4);
            let query = format!(
                "INSERT INTO key_usage (key_id, hour, outcome, count) VALUES {values} \
                 ON CONFLICT (key_id, hour, outcome) DO UPDATE SET count = key_usage.count + excluded.count"
            );
            let mut statement = sqlx::query(sqlx::AssertSqlSafe(query));
            for count in chunk {
                statement = statement
                    .bind(&*count.key_id)
                    .bind(count.hour.as_millisecond())
                    .bind(count.outcome.as_str())
                    .bind(i64::try_from(count.count).unwrap_or(i64::MAX));
            }
            statement.execute(&mut *tx).await?;
        }
        // Last, so the one shared row is locked only for the commit. A gap
        // longer than REPORTING_GAP starts the reporting anew.
        sqlx::query(
            "INSERT INTO usage_reporting (id, first_reported_at, last_reported_at) VALUES (1, $1, $1) \
             ON CONFLICT (id) DO UPDATE SET \
             first_reported_at = CASE WHEN usage_reporting.last_reported_at < excluded.last_reported_at - $2 \
                 THEN excluded.first_reported_at ELSE usage_reporting.first_reported_at END, \
             last_reported_at = CASE WHEN usage_reporting.last_reported_at > excluded.last_reported_at \
                 THEN usage_reporting.last_reported_at ELSE excluded.last_reported_at END",
        )
        .bind(reported_at.as_millisecond())
        .bind(REPORTING_GAP.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(Error::UncertainCommit)?;
        Ok(moved)
    }

    /// Since when verifiers have reported without a gap longer than
    /// [`REPORTING_GAP`], and when they last did; `None` if never.
    pub async fn usage_reporting(&self) -> Result<Option<(Timestamp, Timestamp)>> {
        sqlx::query("SELECT first_reported_at, last_reported_at FROM usage_reporting WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .map(|row| {
                Ok((
                    from_millis(row.try_get("first_reported_at")?)?,
                    from_millis(row.try_get("last_reported_at")?)?,
                ))
            })
            .transpose()
    }

    /// Deletes the counts of hours that started before `before`; returns how many rows.
    pub async fn prune_usage(&self, before: Timestamp) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM key_usage WHERE hour < $1")
            .bind(before.as_millisecond())
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// This cluster's counts since `since`, summed per ApiKey, bucket
    /// (`bucket_ms` wide: an hour or a day) and outcome, streamed to `sink` as
    /// (ApiKey uid, bucket start in epoch seconds, outcome, n): one query for
    /// every ApiKey.
    pub async fn each_usage_bucket(
        &self,
        since: Timestamp,
        bucket_ms: i64,
        sink: &mut (dyn FnMut(&str, i64, Outcome, i64) + Send),
    ) -> Result<()> {
        use futures::TryStreamExt;
        let mut rows = sqlx::query(
            "SELECT k.apikey_uid AS uid, u.hour - (u.hour % $1) AS bucket, u.outcome AS outcome, CAST(SUM(u.count) AS BIGINT) AS n \
             FROM key_usage u JOIN api_keys k ON k.key_id = u.key_id \
             WHERE u.hour >= $2 AND k.cluster = $3 \
             GROUP BY k.apikey_uid, u.hour - (u.hour % $1), u.outcome",
        )
        .bind(bucket_ms)
        .bind(since.as_millisecond())
        .bind(&self.cluster)
        .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let outcome: String = row.try_get("outcome")?;
            let Some(outcome) = Outcome::parse(&outcome) else {
                continue;
            };
            let uid: String = row.try_get("uid")?;
            let bucket: i64 = row.try_get("bucket")?;
            sink(&uid, bucket.div_euclid(1000), outcome, row.try_get("n")?);
        }
        Ok(())
    }

    /// This cluster's retiring and revoked keys presented since `since`, by
    /// ApiKey uid: whether clients still hold a previous key. Bounded by the
    /// keys used lately, whatever the number of ApiKeys.
    pub async fn recent_previous_key_use(
        &self,
        since: Timestamp,
    ) -> Result<HashMap<String, Vec<RecentUse>>> {
        let rows = sqlx::query(
            "SELECT k.apikey_uid AS uid, k.key_id AS key_id, k.state AS state, k.last_used_at AS last_used_at, \
             k.expires_at AS expires_at, k.revoked_at AS revoked_at, k.revoke_reason AS revoke_reason, \
             u.outcome AS outcome, CAST(SUM(u.count) AS BIGINT) AS n \
             FROM key_usage u JOIN api_keys k ON k.key_id = u.key_id \
             WHERE u.hour >= $1 AND k.cluster = $2 AND k.state IN ('retiring', 'revoked') \
             GROUP BY k.apikey_uid, k.key_id, k.state, k.last_used_at, k.expires_at, k.revoked_at, k.revoke_reason, u.outcome",
        )
        .bind(since.as_millisecond())
        .bind(&self.cluster)
        .fetch_all(&self.pool)
        .await?;
        let mut by_apikey: HashMap<String, Vec<RecentUse>> = HashMap::new();
        for row in rows {
            let time = |column: &str| -> Result<Option<Timestamp>> {
                row.try_get::<Option<i64>, _>(column)?
                    .map(from_millis)
                    .transpose()
            };
            let key_id: String = row.try_get("key_id")?;
            let outcome = Outcome::parse(&row.try_get::<String, _>("outcome")?);
            let n: i64 = row.try_get("n")?;
            let uses = by_apikey.entry(row.try_get("uid")?).or_default();
            let index = match uses.iter().position(|u| u.key_id == key_id) {
                Some(index) => index,
                None => {
                    uses.push(RecentUse {
                        key_id,
                        state: row.try_get::<String, _>("state")?.parse()?,
                        last_used: time("last_used_at")?,
                        expires_at: time("expires_at")?,
                        revoked_at: time("revoked_at")?,
                        revoke_reason: row.try_get("revoke_reason")?,
                        used: 0,
                        refused_revoked: 0,
                        since,
                    });
                    uses.len() - 1
                }
            };
            match outcome {
                Some(o) if o.used() => uses[index].used += n,
                Some(Outcome::Revoked) => uses[index].refused_revoked += n,
                _ => {}
            }
        }
        Ok(by_apikey)
    }

    /// A few ApiKeys (uid, namespace, name) that own rows written before
    /// migration 4, which no cluster has claimed yet: owners of live keys
    /// first, since their ApiKeys still exist.
    pub async fn unclaimed_owners(&self, limit: i64) -> Result<Vec<(String, String, String)>> {
        for only_live in ["AND state <> 'revoked'", ""] {
            let query = format!(
                "SELECT DISTINCT apikey_uid, namespace, name FROM api_keys WHERE cluster IS NULL {only_live} LIMIT $1"
            );
            let owners = sqlx::query(sqlx::AssertSqlSafe(query))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get("apikey_uid")?,
                        row.try_get("namespace")?,
                        row.try_get("name")?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            if !owners.is_empty() {
                return Ok(owners);
            }
        }
        Ok(Vec::new())
    }

    /// Registers this store's cluster under `kube_system_uid` (the uid of the
    /// Kubernetes cluster's `kube-system` Namespace), or checks an earlier
    /// registration. With `claim`, it also claims the rows written before
    /// migration 4 (the caller found its own ApiKeys among their owners).
    /// Refuses (`Error::Config`) a name that another Kubernetes cluster
    /// registered, and a cluster registered under another name: either would
    /// make this operator treat another cluster's keys, or its own, as unknown.
    pub async fn register_cluster(
        &self,
        kube_system_uid: &str,
        claim: bool,
        at: Timestamp,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if claim {
            sqlx::query("UPDATE api_keys SET cluster = $1 WHERE cluster IS NULL")
                .bind(&self.cluster)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE key_audit SET cluster = $1 WHERE cluster IS NULL")
                .bind(&self.cluster)
                .execute(&mut *tx)
                .await?;
        }
        let by_uid: Option<String> =
            sqlx::query("SELECT name FROM key_clusters WHERE kube_system_uid = $1")
                .bind(kube_system_uid)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get("name"))
                .transpose()?;
        if let Some(name) = by_uid {
            if name == self.cluster {
                tx.commit().await?;
                return Ok(());
            }
            return Err(Error::Config(format!(
                "this Kubernetes cluster's keys are in the key database under the cluster name {name:?}, but --cluster-name is {:?}. \
                 The name is stored in every record and audit row and cannot change on an existing database: start with --cluster-name {name}",
                self.cluster
            )));
        }
        let by_name: Option<String> =
            sqlx::query("SELECT kube_system_uid FROM key_clusters WHERE name = $1")
                .bind(&self.cluster)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get("kube_system_uid"))
                .transpose()?;
        if let Some(other) = by_name {
            return Err(Error::Config(format!(
                "the cluster name {:?} belongs to another Kubernetes cluster in this key database (kube-system uid {other}); \
                 give each cluster that shares the database its own --cluster-name",
                self.cluster
            )));
        }
        sqlx::query(
            "INSERT INTO key_clusters (name, kube_system_uid, registered_at) VALUES ($1, $2, $3)",
        )
        .bind(&self.cluster)
        .bind(kube_system_uid)
        .bind(at.as_millisecond())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Streams this cluster's live records (pending, active, retiring) to
    /// `sink` in one query, without hashes or metadata: the anti-entropy pass.
    pub async fn each_live_row(&self, sink: &mut (dyn FnMut(LiveRow) + Send)) -> Result<()> {
        use futures::TryStreamExt;
        let mut rows = sqlx::query(
            "SELECT key_id, apikey_uid, namespace, name, state, created_at, expires_at, cluster FROM api_keys \
             WHERE cluster = $1 AND state <> 'revoked'",
        )
        .bind(&self.cluster)
        .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            sink(LiveRow {
                key_id: row.try_get("key_id")?,
                apikey_uid: row.try_get("apikey_uid")?,
                namespace: row.try_get("namespace")?,
                name: row.try_get("name")?,
                state: row.try_get::<String, _>("state")?.parse()?,
                created_at: from_millis(row.try_get("created_at")?)?,
                expires_at: row
                    .try_get::<Option<i64>, _>("expires_at")?
                    .map(from_millis)
                    .transpose()?,
                cluster: row.try_get("cluster")?,
            });
        }
        Ok(())
    }

    /// The change counter, and the change number of `witness`'s row: a
    /// verifier that saw `witness` written at change N knows history moved
    /// backwards when the counter is below what it saw, or that row now
    /// carries a number below N (or is gone).
    pub async fn change_position(&self, witness: Option<&str>) -> Result<ChangePosition> {
        let seq: i64 = sqlx::query("SELECT seq FROM key_change_counter WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("seq")?;
        let witness_seq = match witness {
            Some(key_id) => sqlx::query("SELECT change_seq FROM api_keys WHERE key_id = $1")
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.try_get("change_seq"))
                .transpose()?,
            None => None,
        };
        Ok(ChangePosition { seq, witness_seq })
    }

    /// Whether this is a PostgreSQL hot standby (read-only, no LISTEN).
    pub async fn is_standby(&self) -> Result<bool> {
        if self.backend != Backend::Postgres {
            return Ok(false);
        }
        Ok(sqlx::query("SELECT pg_is_in_recovery() AS standby")
            .fetch_one(&self.pool)
            .await?
            .try_get("standby")?)
    }

    async fn audit_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        key_id: &str,
        at: Timestamp,
        action: &str,
        detail: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO key_audit (key_id, at, action, detail, cluster) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(key_id)
        .bind(at.as_millisecond())
        .bind(action)
        .bind(detail)
        .bind(&self.cluster)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

const RECORD_COLUMNS: &str = "key_id, key_hash, key_hint, apikey_uid, namespace, name, owner, team, scopes, state, created_at, activated_at, expires_at, revoked_at, revoke_reason, issue_reason, rotation_request, COALESCE(cluster, '') AS cluster";

fn from_millis(ms: i64) -> Result<Timestamp> {
    Timestamp::from_millisecond(ms).map_err(|e| Error::Serialize(e.to_string()))
}

fn record_from_row(row: &AnyRow) -> Result<KeyRecord> {
    let optional_time = |column: &str| -> Result<Option<Timestamp>> {
        row.try_get::<Option<i64>, _>(column)?
            .map(from_millis)
            .transpose()
    };
    let scopes: String = row.try_get("scopes")?;
    Ok(KeyRecord {
        key_id: row.try_get("key_id")?,
        key_hash: KeyHash::from_hex(row.try_get("key_hash")?),
        key_hint: row.try_get("key_hint")?,
        apikey_uid: row.try_get("apikey_uid")?,
        namespace: row.try_get("namespace")?,
        name: row.try_get("name")?,
        metadata: KeyMetadata {
            owner: row.try_get("owner")?,
            team: row.try_get("team")?,
            scopes: scopes
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        },
        state: row.try_get::<String, _>("state")?.parse()?,
        created_at: from_millis(row.try_get("created_at")?)?,
        activated_at: optional_time("activated_at")?,
        expires_at: optional_time("expires_at")?,
        revoked_at: optional_time("revoked_at")?,
        revoke_reason: row.try_get("revoke_reason")?,
        issue_reason: row.try_get::<String, _>("issue_reason")?.parse()?,
        rotation_request: row.try_get("rotation_request")?,
        cluster: row.try_get("cluster")?,
    })
}

#[async_trait]
impl KeyStore for SqlStore {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    async fn load(&self, apikey_uid: &str) -> Result<KeySet> {
        let query = format!(
            "SELECT {RECORD_COLUMNS} FROM api_keys WHERE apikey_uid = $1 AND cluster = $2 AND state <> 'revoked' ORDER BY created_at, key_id"
        );
        let live = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(apikey_uid)
            .bind(&self.cluster)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(record_from_row)
            .collect::<Result<Vec<_>>>()?;
        let row = sqlx::query(
            "SELECT COUNT(activated_at) AS issued, MAX(last_used_at) AS last_used_at FROM api_keys WHERE apikey_uid = $1 AND cluster = $2",
        )
        .bind(apikey_uid)
        .bind(&self.cluster)
        .fetch_one(&self.pool)
        .await?;
        let issued: i64 = row.try_get("issued")?;
        let last_used_at = row
            .try_get::<Option<i64>, _>("last_used_at")?
            .map(from_millis)
            .transpose()?;
        Ok(KeySet {
            live,
            issued,
            last_used_at,
        })
    }

    async fn insert_pending(&self, record: &KeyRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (key_id, key_hash, key_hint, apikey_uid, namespace, name, owner, team, scopes, state, created_at, issue_reason, rotation_request, change_seq, cluster) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, $12, 0, $13)",
        )
        .bind(&record.key_id)
        .bind(record.key_hash.as_str())
        .bind(&record.key_hint)
        .bind(&record.apikey_uid)
        .bind(&record.namespace)
        .bind(&record.name)
        .bind(&record.metadata.owner)
        .bind(&record.metadata.team)
        .bind(record.metadata.scopes.join(" "))
        .bind(record.created_at.as_millisecond())
        .bind(record.issue_reason.as_str())
        .bind(record.rotation_request.as_deref())
        .bind(&self.cluster)
        .execute(&mut *tx)
        .await?;
        let detail = format!(
            "issued for {}/{} ({})",
            record.namespace,
            record.name,
            record.issue_reason.as_str()
        );
        self.audit_in(
            &mut tx,
            &record.key_id,
            record.created_at,
            "issued",
            &detail,
        )
        .await?;
        self.stamp_change(&mut tx, &record.key_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn activate(
        &self,
        key_id: &str,
        at: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET state = 'active', activated_at = $2, expires_at = $3 WHERE key_id = $1 AND state = 'pending' AND cluster = $4",
        )
        .bind(key_id)
        .bind(at.as_millisecond())
        .bind(expires_at.map(|t| t.as_millisecond()))
        .bind(&self.cluster)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            return Err(Error::StaleKeyState {
                key_id: key_id.to_owned(),
                expected: "pending",
            });
        }
        self.audit_in(
            &mut tx,
            key_id,
            at,
            "activated",
            "key confirmed in its Secret",
        )
        .await?;
        self.stamp_change(&mut tx, key_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn retire(&self, key_id: &str, expires_at: Timestamp, at: Timestamp) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET state = 'retiring', \
             expires_at = CASE WHEN expires_at IS NOT NULL AND expires_at < $2 THEN expires_at ELSE $2 END \
             WHERE key_id = $1 AND state = 'active' AND cluster = $3",
        )
        .bind(key_id)
        .bind(expires_at.as_millisecond())
        .bind(&self.cluster)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated > 0 {
            let detail = format!("valid until {expires_at}");
            self.audit_in(&mut tx, key_id, at, "retired", &detail)
                .await?;
            self.stamp_change(&mut tx, key_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn shorten_expiry(
        &self,
        key_id: &str,
        expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET expires_at = $2 \
             WHERE key_id = $1 AND state = 'active' AND (expires_at IS NULL OR expires_at > $2) AND cluster = $3",
        )
        .bind(key_id)
        .bind(expires_at.as_millisecond())
        .bind(&self.cluster)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated > 0 {
            let detail = format!("expires at {expires_at}");
            self.audit_in(&mut tx, key_id, at, "expiry_changed", &detail)
                .await?;
            self.stamp_change(&mut tx, key_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn update_metadata(
        &self,
        key_id: &str,
        metadata: &KeyMetadata,
        at: Timestamp,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let scopes = metadata.scopes.join(" ");
        let updated = sqlx::query(
            "UPDATE api_keys SET owner = $2, team = $3, scopes = $4 \
             WHERE key_id = $1 AND state <> 'revoked' AND (owner <> $2 OR team <> $3 OR scopes <> $4) AND cluster = $5",
        )
        .bind(key_id)
        .bind(&metadata.owner)
        .bind(&metadata.team)
        .bind(&scopes)
        .bind(&self.cluster)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated > 0 {
            let detail = format!(
                "owner={} team={} scopes={}",
                metadata.owner, metadata.team, scopes
            );
            self.audit_in(&mut tx, key_id, at, "metadata_changed", &detail)
                .await?;
            self.stamp_change(&mut tx, key_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revoke(&self, key_id: &str, reason: RevokeReason, at: Timestamp) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET state = 'revoked', revoked_at = $2, revoke_reason = $3 \
             WHERE key_id = $1 AND state <> 'revoked' AND cluster = $4",
        )
        .bind(key_id)
        .bind(at.as_millisecond())
        .bind(reason.as_str())
        .bind(&self.cluster)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated > 0 {
            self.audit_in(&mut tx, key_id, at, "revoked", reason.as_str())
                .await?;
            self.stamp_change(&mut tx, key_id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        let query = format!("SELECT {RECORD_COLUMNS} FROM api_keys WHERE key_hash = $1");
        sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(hash.as_str())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(record_from_row)
            .transpose()
    }

    async fn used_since(&self, since: Timestamp) -> Result<Vec<(String, Timestamp)>> {
        // Grouped here, not in SQL: with GROUP BY, SQLite scans every row in
        // uid order instead of reading the few recent ones from their index.
        let mut latest: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        for row in sqlx::query(
            "SELECT apikey_uid, last_used_at FROM api_keys WHERE last_used_at >= $1 AND cluster = $2",
        )
        .bind(since.as_millisecond())
        .bind(&self.cluster)
        .fetch_all(&self.pool)
        .await?
        {
            let used: i64 = row.try_get("last_used_at")?;
            let slot = latest.entry(row.try_get("apikey_uid")?).or_insert(used);
            *slot = (*slot).max(used);
        }
        latest
            .into_iter()
            .map(|(uid, used)| Ok((uid, from_millis(used)?)))
            .collect()
    }

    async fn holders(&self, namespace: &str) -> Result<HashSet<String>> {
        sqlx::query(
            "SELECT DISTINCT apikey_uid FROM api_keys WHERE cluster = $1 AND namespace = $2 AND state <> 'revoked'",
        )
        .bind(&self.cluster)
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok(row.try_get("apikey_uid")?))
        .collect()
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
