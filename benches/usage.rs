//! The usage-per-key benchmark (issue 16, "Performance").
//!
//! Parts, each selectable with `--parts` (the default runs all four):
//!
//! - `check`: `Verifier::check`, which counts every check into the usage
//!   tally, in a child process pinned to one CPU (a current-thread runtime),
//!   over `--keys` (100,000) active keys loaded from an SQLite file: one key,
//!   4,096 keys in turn, and every key in turn (the tally then holds one entry
//!   per key); the first check of every key right after a flush (each one a
//!   new tally entry). Beside them, the same loops on a verifier whose tally
//!   has no room (`max_usage_entries: 0`: each count is dropped at once after
//!   the lock), and `snapshot::answer` alone (no lock, clock or count).
//! - `memory`: a fresh process's VmRSS and VmHWM (/proc/self/status):
//!   connected, after loading the key set, after checking every key once (the
//!   tally holds `--keys` entries), after `Verifier::flush_usage`, and after
//!   three more cycles of check-every-key + flush.
//! - `flush`: `Verifier::flush_usage` of `--keys` counts (every key, one hour,
//!   valid) and as many last-used times, one transaction, on an SQLite file and
//!   on PostgreSQL, `--flushes` times (the first inserts the count rows, the
//!   later ones add to them; the verifier's clock moves one minute before each,
//!   so every flush moves every last-used time, as flushes a minute apart do);
//!   `Tally::take` of as many entries alone (what a flush does under the
//!   tally's lock). Then one thread pinned to CPU 0 checks every key in turn
//!   while the rest of the process (and the throwaway PostgreSQL) stays on CPU
//!   1: `--phase-seconds` without a flush, the same with flushes back to back,
//!   and again without; the check rate of each phase, its worst 10 ms slice
//!   and its longest 256 checks.
//! - `reads`: the operator leader's usage reads over `--apikeys` (10,000)
//!   ApiKeys, each with one active key, plus 1 % with a retiring previous key
//!   still presented and 1 % with a revoked key still presented, and the counts
//!   described by `--hourly-history` and `--older-days` (see `fill_usage`):
//!   the summary (two `SqlStore::each_usage_bucket` queries and
//!   `SummaryBuilder`, as `UsageFollower::summarize` does) and the scan of
//!   recent use (`used_since`, `recent_previous_key_use`, `usage_reporting`,
//!   as `UsageFollower::scan_recent` does), timed over `--passes` passes in a
//!   fresh child process, the SQL statements counted from sqlx's log, the
//!   summaries checked against what was written, and the RSS of the process
//!   that holds them (and the `status.usage` of every ApiKey built from them).
//!
//! PostgreSQL is `KEYWARD_BENCH_DATABASE_URL` (a `postgres://` URL; the bench
//! creates and drops its own databases on that server) or a throwaway server
//! from scripts/pg; without either the PostgreSQL rows print SKIP.
//!
//! Run: `cargo bench --bench usage` (`-- --help` lists the options). Figures and
//! their meaning are in docs/benchmarks.md.

use std::{
    collections::HashMap,
    fmt::Write as _,
    hint::black_box,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use jiff::{SignedDuration, Timestamp};
use keyward::{
    clock::{Clock, SystemClock},
    key::KeyHash,
    key::{KeyFactory, PlainKey, SeededEntropy},
    store::{ChangePosition, KeyRecord},
    store::{KeyStore, RevokeReason, SqlStore},
    telemetry::Metrics,
    usage::{
        DAY, HOUR, Outcome, UsageBatch, UsageCount, day_start, hour_start,
        summary::{Summary, SummaryBuilder, recent_window, usage_status, windows},
        tally::Tally,
    },
    verifier::{
        Checked, Code, KeySource, Verifier, VerifierConfig,
        core::FLUSH_ROWS_PER_TRANSACTION,
        snapshot::{Snapshot, answer},
    },
};
use sha2::{Digest, Sha256};
use sqlx::Connection as _;

/// The seed of the bench's keys: the same keys as benches/verifier.rs, so its
/// cached key set can be reused.
const SEED: u64 = 7;
/// Distinct keys of the "hot" check loop, as in benches/verifier.rs.
const HOT_KEYS: usize = 4096;
/// The cluster the records belong to (`SqlStore`'s default).
const CLUSTER: &str = "default";
/// Checks between two looks at the clock in the concurrent phases.
const BATCH: usize = 256;
/// The length of one slice of the concurrent phases' timeline.
const SLICE: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Check,
    Memory,
    Flush,
    Reads,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Database {
    Sqlite,
    Postgres,
}

/// What a child process of the bench does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    Check,
    Memory,
    Flush,
    Reads,
}

/// Options; `cargo bench` appends `--bench`, which is not one of them.
#[derive(Debug, Parser)]
#[command(about = "keyward's usage-per-key benchmark (issue 16)")]
struct Args {
    /// Parts to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "check,memory,flush,reads"
    )]
    parts: Vec<Part>,
    /// Keys in the verifier's key set, all checked (check, memory, flush).
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// ApiKeys of the operator's reads (reads).
    #[arg(long, default_value_t = 10_000)]
    apikeys: usize,
    /// Seconds per in-process check figure (check).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Timed flushes per database (flush).
    #[arg(long, default_value_t = 3)]
    flushes: usize,
    /// Seconds of each phase of checks with and without flushes (flush); the
    /// phases with flushes last at least two flushes.
    #[arg(long, default_value_t = 4.0)]
    phase_seconds: f64,
    /// Timed passes of the operator's reads after the first (reads).
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Hours of per-hour count rows per key up to the current one (reads);
    /// 720 fills every hour of the 30-day window.
    #[arg(long, default_value_t = 24)]
    hourly_history: i64,
    /// Days of one count row per key before the 30-day window, as the 90-day
    /// retention keeps them (reads).
    #[arg(long, default_value_t = 60)]
    older_days: i64,
    /// Databases of the flush and reads parts.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    databases: Vec<Database>,
    /// Do not pin the check loops to CPU 0 (and the rest to CPU 1).
    #[arg(long)]
    no_pin: bool,
    /// Internal: what a child process does.
    #[arg(long, value_enum, hide = true)]
    role: Option<Role>,
    /// Internal: the child's database URL.
    #[arg(long, hide = true)]
    database_url: Option<String>,
    /// Internal: the reads' `now`, epoch seconds.
    #[arg(long, hide = true, default_value_t = 0)]
    at: i64,
    /// Internal: pin the flush child's check thread to CPU 0.
    #[arg(long, hide = true)]
    pin_checks: bool,
}

fn main() {
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    if let Some(role) = args.role {
        child(role, &args);
        return;
    }
    // `cargo test --all-targets` runs bench binaries too, without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("SKIP: usage bench: run it with `cargo bench --bench usage`");
        return;
    }
    let mut report = String::new();
    let _ = writeln!(report, "=== keyward usage-per-key benchmark (issue 16) ===");
    let _ = writeln!(report, "machine            {}", machine());
    let _ = writeln!(
        report,
        "command            cargo bench --bench usage -- {}",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ")
    );
    let pin = !args.no_pin && which("taskset") && cores() >= 2;
    let _ = writeln!(
        report,
        "pinning            {}",
        if pin {
            "the one-core check loops on CPU 0 (taskset); in the flush part the rest of the process and the throwaway PostgreSQL on CPU 1"
        } else {
            "none"
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cache = target_dir().join("usage-bench");
    std::fs::create_dir_all(&cache).expect("the bench's cache directory");
    let work = tempfile::tempdir_in(&cache).expect("a scratch directory");
    let needs_set = args
        .parts
        .iter()
        .any(|p| matches!(p, Part::Check | Part::Memory | Part::Flush));
    let key_set = needs_set.then(|| runtime.block_on(key_set_file(&cache, args.keys)));
    let wants_postgres = args.databases.contains(&Database::Postgres)
        && args
            .parts
            .iter()
            .any(|p| matches!(p, Part::Flush | Part::Reads));
    let postgres = if wants_postgres {
        Postgres::find(pin)
    } else {
        Err("not asked for (--databases)".to_owned())
    };
    match &postgres {
        Ok(pg) => {
            let _ = writeln!(report, "PostgreSQL         {}", pg.label);
        }
        Err(why) => {
            let _ = writeln!(report, "PostgreSQL         SKIP: {why}");
        }
    }
    for part in &args.parts {
        let section = match (part, &key_set) {
            (Part::Check, Some(file)) => part_check(&args, file, work.path(), pin),
            (Part::Memory, Some(file)) => part_memory(&args, file, work.path()),
            (Part::Flush, Some(file)) => {
                part_flush(&args, file, work.path(), pin, &postgres, &runtime)
            }
            (Part::Reads, _) => part_reads(&args, work.path(), &postgres, &runtime),
            _ => unreachable!("the key set is built for these parts"),
        };
        eprint!("{section}");
        report.push_str(&section);
    }
    let _ = writeln!(report, "load average end   {}", load_average());
    drop(postgres);
    print!("{report}");
}

// ---------------------------------------------------------------------------
// Keys and their records

fn factory() -> KeyFactory {
    KeyFactory::new("kw", Arc::new(SeededEntropy::new(SEED))).expect("a key factory")
}

/// The bench's keys in issue order, as benches/verifier.rs makes them: (key
/// id, key). The first `n` of a longer list are the same keys.
fn bench_keys(n: usize) -> Vec<(String, PlainKey)> {
    let factory = factory();
    (0..n)
        .map(|_| {
            let key = factory.new_key().expect("a key");
            let id = factory.new_key_id().expect("a key id");
            (id, key)
        })
        .collect()
}

/// One row of `api_keys` as the bench writes it.
struct KeyRow {
    key_id: String,
    hash: String,
    hint: String,
    /// The ApiKey: `uid-{owner}` in namespace `team-{owner % 50}`, named `key-{owner}`.
    owner: usize,
    state: &'static str,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    revoke_reason: Option<&'static str>,
}

impl KeyRow {
    fn active(owner: usize, key_id: &str, key: &PlainKey) -> Self {
        Self {
            key_id: key_id.to_owned(),
            hash: key.hash().as_str().to_owned(),
            hint: key.hint(),
            owner,
            state: "active",
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
        }
    }
}

/// Rows per INSERT and per transaction when filling a key database.
const ROWS_PER_STATEMENT: usize = 500;
const ROWS_PER_TRANSACTION: usize = 10_000;

/// Writes `rows` into a migrated key database with plain multi-row INSERTs
/// (values the bench made: base62 ids, hex hashes), one transaction per
/// 10,000 rows, as benches/database.rs fills its databases. `SqlStore`'s
/// `insert_pending` + `activate` (two fsynced transactions per key) took 239 s
/// for 100,000 keys on SQLite.
async fn write_keys(url: &str, rows: &[KeyRow], created_ms: i64) {
    let store = SqlStore::connect(url).await.expect("the key database");
    store.migrate().await.expect("migrations");
    store.close().await;
    let plain = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let mut connection = sqlx::AnyConnection::connect(url)
        .await
        .expect("the key database");
    for chunk in rows.chunks(ROWS_PER_TRANSACTION) {
        let mut tx = connection.begin().await.expect("a transaction");
        for statement in chunk.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO api_keys (key_id, key_hash, key_hint, apikey_uid, namespace, name, owner, team, scopes, state, created_at, activated_at, expires_at, revoked_at, revoke_reason, issue_reason, change_seq, cluster) VALUES ",
            );
            for (j, row) in statement.iter().enumerate() {
                assert!(plain(&row.key_id) && plain(&row.hash) && plain(&row.hint));
                let i = row.owner;
                let opt = |v: Option<i64>| v.map_or("NULL".to_owned(), |v| v.to_string());
                let _ = write!(
                    sql,
                    "{}('{}', '{}', '{}', 'uid-{i}', 'team-{}', 'key-{i}', 'owner-{}@example.com', 'team-{}', 'inference models:read', '{}', {created_ms}, {created_ms}, {}, {}, {}, 'initial', 1, '{CLUSTER}')",
                    if j == 0 { "" } else { ", " },
                    row.key_id,
                    row.hash,
                    row.hint,
                    i % 50,
                    i % 500,
                    i % 20,
                    row.state,
                    opt(row.expires_at),
                    opt(row.revoked_at),
                    row.revoke_reason
                        .map_or("NULL".to_owned(), |r| format!("'{r}'")),
                );
            }
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .expect("an INSERT of bench rows");
        }
        tx.commit().await.expect("a commit");
    }
    // Every row is change 1 of the key set: what a verifier's load reads.
    sqlx::query("UPDATE key_change_counter SET seq = 1 WHERE id = 1")
        .execute(&mut connection)
        .await
        .expect("the change counter");
    sqlx::query("ANALYZE")
        .execute(&mut connection)
        .await
        .expect("ANALYZE");
    connection.close().await.expect("a clean close");
}

/// Active keys in a key database (or 0 when it cannot be read).
async fn active_keys(url: &str) -> i64 {
    let Ok(store) = SqlStore::connect(url).await else {
        return 0;
    };
    let active = store
        .count_by_state()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|(state, _)| state == "active")
        .map(|(_, count)| count)
        .sum();
    store.close().await;
    active
}

/// An SQLite file holding the first `n` bench keys, active: the verifier
/// bench's cached one when it exists (the same keys), else one filled here
/// once and kept in the target directory. Children get copies of it.
async fn key_set_file(cache: &Path, n: usize) -> PathBuf {
    let theirs = cache
        .parent()
        .expect("the target directory")
        .join("verifier-bench")
        .join(format!("keys-{n}-seed{SEED}.db"));
    let ours = cache.join(format!("keys-{n}-seed{SEED}.db"));
    for path in [&theirs, &ours] {
        if path.exists()
            && !sidecar(path, "-wal").exists()
            && usize::try_from(active_keys(&sqlite_url(path)).await) == Ok(n)
        {
            eprintln!("usage bench: reusing {} ({n} active keys)", path.display());
            return path.clone();
        }
    }
    eprintln!(
        "usage bench: filling {} with {n} keys (plain SQL, once)",
        ours.display()
    );
    let started = Instant::now();
    let building = cache.join(format!("building-{}.db", std::process::id()));
    let rows: Vec<KeyRow> = bench_keys(n)
        .iter()
        .enumerate()
        .map(|(i, (id, key))| KeyRow::active(i, id, key))
        .collect();
    write_keys(
        &sqlite_url(&building),
        &rows,
        Timestamp::now().as_millisecond(),
    )
    .await;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(sidecar(&building, suffix));
    }
    std::fs::rename(&building, &ours).expect("the key set moved into place");
    eprintln!(
        "usage bench: filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    ours
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// A fresh copy of the key set file for a child that writes to it.
fn copy_of(file: &Path, dir: &Path, name: &str) -> String {
    let copy = dir.join(name);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(sidecar(&copy, suffix));
    }
    std::fs::copy(file, &copy).expect("a copy of the key set");
    sqlite_url(&copy)
}

/// The verifier the bench measures: the shipped defaults, except a staleness
/// limit of a day, since no follower keeps it fresh here (past the default
/// 30 s every check would answer "unavailable").
fn bench_verifier(
    store: Arc<SqlStore>,
    clock: Arc<dyn Clock>,
    max_usage_entries: usize,
    metrics: Arc<Metrics>,
) -> Verifier {
    Verifier::new(
        store,
        clock,
        VerifierConfig {
            max_staleness: Duration::from_secs(86_400),
            max_usage_entries,
            ..VerifierConfig::default()
        },
        metrics,
    )
}

fn valid(checked: &Checked) -> bool {
    matches!(checked, Checked::Answer(v) if v.code == Code::Valid)
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// The PostgreSQL server of the flush and reads parts.
struct Postgres {
    /// A URL of the server's `postgres` database, to create the bench's.
    admin_url: String,
    label: String,
    /// The scripts/pg directory of a throwaway server, stopped on drop.
    throwaway: Option<PathBuf>,
    /// Where that directory is (under the system's temp directory, which the
    /// `postgres` user can enter); removed after the server stops.
    _scratch: Option<tempfile::TempDir>,
    created: std::sync::Mutex<Vec<String>>,
}

impl Postgres {
    fn find(pin: bool) -> Result<Postgres, String> {
        if let Ok(url) = std::env::var("KEYWARD_BENCH_DATABASE_URL")
            && url.starts_with("postgres")
        {
            return Ok(Postgres {
                admin_url: url,
                label: "KEYWARD_BENCH_DATABASE_URL".into(),
                throwaway: None,
                _scratch: None,
                created: Default::default(),
            });
        }
        let has_initdb = Command::new("sh")
            .args([
                "-c",
                "command -v initdb || ls /usr/lib/postgresql/*/bin/initdb",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_initdb {
            return Err(
                "no initdb (install the PostgreSQL server binaries, or set KEYWARD_BENCH_DATABASE_URL)"
                    .into(),
            );
        }
        eprintln!("usage bench: starting a throwaway PostgreSQL (scripts/pg)");
        let scratch = tempfile::tempdir().map_err(|e| format!("a temp dir: {e}"))?;
        let pg = scratch.path().join("pg");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg");
        let mut command = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "1", "bash"]);
            c
        } else {
            Command::new("bash")
        };
        let output = command
            .args([script, "start"])
            .arg(&pg)
            .output()
            .map_err(|e| format!("scripts/pg: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "scripts/pg start failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let version = Command::new("sh")
            .args([
                "-c",
                "$( (command -v postgres || ls /usr/lib/postgresql/*/bin/postgres) | head -1) --version",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Ok(Postgres {
            admin_url: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            label: format!(
                "throwaway server from scripts/pg ({version}; unix socket, fsync=off{})",
                if pin { ", taskset -c 1" } else { "" }
            ),
            throwaway: Some(pg),
            _scratch: Some(scratch),
            created: Default::default(),
        })
    }

    /// A fresh, empty database `name` on the server; its URL.
    async fn fresh_database(&self, name: &str) -> String {
        sqlx::any::install_default_drivers();
        let mut admin = sqlx::AnyConnection::connect(&self.admin_url)
            .await
            .expect("the PostgreSQL server");
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .expect("a fresh database");
        }
        admin.close().await.expect("a clean close");
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_owned());
        database_url(&self.admin_url, name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.throwaway {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg");
            let _ = Command::new("bash")
                .args([script, "stop"])
                .arg(dir)
                .output();
            return;
        }
        // A server given by KEYWARD_BENCH_DATABASE_URL keeps running: drop
        // the bench's databases.
        let names = std::mem::take(self.created.get_mut().unwrap_or_else(|p| p.into_inner()));
        if names.is_empty() {
            return;
        }
        let admin_url = self.admin_url.clone();
        let _ = std::thread::spawn(move || {
            current_thread().block_on(async {
                let Ok(mut admin) = sqlx::AnyConnection::connect(&admin_url).await else {
                    return;
                };
                for name in names {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name}"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}

/// `url` with its database replaced by `name`.
fn database_url(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let server = rest.split_once('/').map_or(rest, |(server, _)| server);
    match query {
        Some(q) => format!("{scheme}://{server}/{name}?{q}"),
        None => format!("{scheme}://{server}/{name}"),
    }
}

// ---------------------------------------------------------------------------
// Child processes

fn child(role: Role, args: &Args) {
    let url = args.database_url.clone().unwrap_or_default();
    match role {
        Role::Check => current_thread().block_on(child_check(&url, args)),
        Role::Memory => current_thread().block_on(child_memory(&url, args.keys)),
        Role::Flush => child_flush(&url, args),
        Role::Reads => current_thread().block_on(child_reads(&url, args)),
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// This thread's time on a CPU and waiting for one, in nanoseconds
/// (/proc/thread-self/schedstat): another process on the same CPU shows as
/// wait.
fn thread_sched() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

/// A measured rate, and the share of the wall time the measuring thread was
/// on a CPU (below 1 when something else ran on its CPU).
#[derive(Clone, Copy)]
struct Rate {
    per_second: f64,
    on_cpu: f64,
}

impl Rate {
    fn of(calls: usize, started: Instant, run_before: u64) -> Rate {
        let wall = started.elapsed().as_secs_f64();
        let run = (thread_sched().0 - run_before) as f64 / 1e9;
        Rate {
            per_second: calls as f64 / wall,
            on_cpu: run / wall,
        }
    }
}

/// Runs `step` in batches for `seconds`; returns calls per second.
fn per_second(seconds: f64, mut step: impl FnMut(usize)) -> Rate {
    let limit = Duration::from_secs_f64(seconds);
    let run = thread_sched().0;
    let started = Instant::now();
    let mut calls = 0usize;
    while started.elapsed() < limit {
        for i in 0..1024 {
            step(calls + i);
        }
        calls += 1024;
    }
    Rate::of(calls, started, run)
}

/// The async form of [`per_second`] for checks; every answer must be VALID.
async fn checks_per_second<F: Future<Output = Checked>>(
    seconds: f64,
    mut step: impl FnMut(usize) -> F,
) -> Rate {
    let limit = Duration::from_secs_f64(seconds);
    let run = thread_sched().0;
    let started = Instant::now();
    let mut calls = 0usize;
    let mut bad = 0usize;
    while started.elapsed() < limit {
        for i in 0..1024 {
            bad += usize::from(!valid(&black_box(step(calls + i).await)));
        }
        calls += 1024;
    }
    assert_eq!(bad, 0, "every check of a bench key answers VALID");
    Rate::of(calls, started, run)
}

async fn child_check(url: &str, args: &Args) {
    let store = Arc::new(SqlStore::connect(url).await.expect("the key set"));
    let counting = bench_verifier(
        store.clone(),
        Arc::new(SystemClock),
        VerifierConfig::default().max_usage_entries,
        Arc::new(Metrics::default()),
    );
    let loaded = counting.reload().await.expect("the key set loads");
    let no_room = bench_verifier(
        store.clone(),
        Arc::new(SystemClock),
        0,
        Arc::new(Metrics::default()),
    );
    no_room.reload().await.expect("the key set loads");
    let mut snapshot = Snapshot::default();
    store
        .each_live_key(&mut |record| {
            snapshot.apply(1, record);
        })
        .await
        .expect("the key set streams");
    let keys: Vec<String> = bench_keys(loaded)
        .into_iter()
        .map(|(_, k)| k.expose().to_owned())
        .collect();
    let n = keys.len();
    let hot = HOT_KEYS.min(n);
    let one = keys[0].as_str();
    let now = Timestamp::now();
    let seconds = args.seconds;
    let mut out: Vec<(&str, Rate)> = Vec::new();
    out.push((
        "answer_one",
        per_second(seconds, |_| {
            black_box(answer(&snapshot, black_box(one), &[], now));
        }),
    ));
    out.push((
        "answer_all",
        per_second(seconds, |i| {
            black_box(answer(&snapshot, black_box(&keys[i % n]), &[], now));
        }),
    ));
    out.push((
        "check_one",
        checks_per_second(seconds, |_| counting.check(one, &[])).await,
    ));
    out.push((
        "check_hot",
        checks_per_second(seconds, |i| counting.check(&keys[i % hot], &[])).await,
    ));
    out.push((
        "check_all",
        checks_per_second(seconds, |i| counting.check(&keys[i % n], &[])).await,
    ));
    // Right after a flush the tally is empty: every key's first check makes an entry.
    let mut first = Duration::ZERO;
    let mut first_run = 0;
    let passes = 3;
    for _ in 0..passes {
        counting.flush_usage().await.expect("a flush");
        let run = thread_sched().0;
        let started = Instant::now();
        for key in &keys {
            assert!(valid(&counting.check(key, &[]).await));
        }
        first += started.elapsed();
        first_run += thread_sched().0 - run;
    }
    out.push((
        "check_first",
        Rate {
            per_second: (passes * n) as f64 / first.as_secs_f64(),
            on_cpu: first_run as f64 / 1e9 / first.as_secs_f64(),
        },
    ));
    out.push((
        "noroom_one",
        checks_per_second(seconds, |_| no_room.check(one, &[])).await,
    ));
    out.push((
        "noroom_all",
        checks_per_second(seconds, |i| no_room.check(&keys[i % n], &[])).await,
    ));
    println!("keys {loaded}");
    for (name, rate) in out {
        println!("{name} {:.0}", rate.per_second);
        println!("{name}_on_cpu {:.3}", rate.on_cpu);
    }
}

/// Checks every bench key once, made one at a time so the bench holds no list
/// of keys; returns how many.
async fn check_every_key(verifier: &Verifier, n: usize) -> usize {
    let factory = factory();
    for _ in 0..n {
        let key = factory.new_key().expect("a key");
        let _id = factory.new_key_id().expect("a key id");
        assert!(
            valid(&verifier.check(key.expose(), &[]).await),
            "a bench key verifies"
        );
    }
    n
}

/// Check-every-key + flush cycles after the first, in the memory part.
const CYCLES: usize = 10;

async fn child_memory(url: &str, n: usize) {
    let rss_start = status_kib("VmRSS");
    let store = Arc::new(SqlStore::connect(url).await.expect("the key set"));
    let metrics = Arc::new(Metrics::default());
    let verifier = bench_verifier(
        store.clone(),
        Arc::new(SystemClock),
        VerifierConfig::default().max_usage_entries,
        metrics.clone(),
    );
    store.usage_reporting().await.expect("a first query");
    let rss_connected = status_kib("VmRSS");
    let loaded = verifier.reload().await.expect("the key set loads");
    let rss_loaded = status_kib("VmRSS");
    let hwm_loaded = status_kib("VmHWM");
    // Writing 5 to clear_refs resets VmHWM to the current RSS, so the peaks
    // below are the counting's and the flushes' own.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let checked = check_every_key(&verifier, n.min(loaded)).await;
    let pending = metrics.verifier_last_used_pending.get();
    let rss_counted = status_kib("VmRSS");
    let hwm_counted = status_kib("VmHWM");
    let started = Instant::now();
    let rows = verifier.flush_usage().await.expect("a flush");
    let flush_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss_flushed = status_kib("VmRSS");
    let hwm_flushed = status_kib("VmHWM");
    let mut after_each = Vec::new();
    for _ in 0..CYCLES {
        check_every_key(&verifier, n.min(loaded)).await;
        verifier.flush_usage().await.expect("a flush");
        after_each.push(format!("{:.1}", status_kib("VmRSS") as f64 / 1024.0));
    }
    println!("rss_each {}", after_each.join(","));
    let rss_cycles = status_kib("VmRSS");
    let hwm_cycles = status_kib("VmHWM");
    println!("keys {loaded}");
    println!("checked {checked}");
    println!("tally_keys {pending}");
    println!("dropped {}", metrics.verifier_usage_dropped.get());
    println!("flushed_rows {rows}");
    println!("flush_ms {flush_ms:.0}");
    println!("hwm_reset {}", u8::from(reset));
    for (name, value) in [
        ("rss_start", rss_start),
        ("rss_connected", rss_connected),
        ("rss_loaded", rss_loaded),
        ("hwm_loaded", hwm_loaded),
        ("rss_counted", rss_counted),
        ("hwm_counted", hwm_counted),
        ("rss_flushed", rss_flushed),
        ("hwm_flushed", hwm_flushed),
        ("rss_cycles", rss_cycles),
        ("hwm_cycles", hwm_cycles),
    ] {
        println!("{name} {value}");
    }
}

/// The system clock moved forward by whole seconds when told to: the flush
/// part's flushes then come "a minute apart" without waiting a minute.
#[derive(Default)]
struct OffsetClock(AtomicI64);

impl OffsetClock {
    fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::Relaxed);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        Timestamp::now() + SignedDuration::from_secs(self.0.load(Ordering::Relaxed))
    }
}

/// The key database, except that usage batches are dropped unwritten while
/// `discard` is set: a flush is then the tally's part alone (take, sort,
/// drop), without the database.
struct Switchable {
    store: SqlStore,
    discard: AtomicBool,
}

#[async_trait::async_trait]
impl KeySource for Switchable {
    async fn live_keys(&self, sink: &mut (dyn FnMut(KeyRecord) + Send)) -> keyward::Result<i64> {
        KeySource::live_keys(&self.store, sink).await
    }
    async fn changes_since(
        &self,
        after: i64,
        limit: i64,
    ) -> keyward::Result<Vec<(i64, KeyRecord)>> {
        KeySource::changes_since(&self.store, after, limit).await
    }
    async fn find(&self, hash: &KeyHash) -> keyward::Result<Option<KeyRecord>> {
        KeySource::find(&self.store, hash).await
    }
    async fn record_usage(&self, batch: &UsageBatch, at: Timestamp) -> keyward::Result<u64> {
        if self.discard.load(Ordering::SeqCst) {
            return Ok(0);
        }
        KeySource::record_usage(&self.store, batch, at).await
    }
    async fn position(&self, witness: Option<&str>) -> keyward::Result<ChangePosition> {
        KeySource::position(&self.store, witness).await
    }
}

/// A flush, timed: how long it took and what came of it.
async fn timed_flush(name: &str, verifier: &Verifier) -> String {
    let started = Instant::now();
    let outcome = verifier.flush_usage().await;
    let took = ms(started.elapsed());
    match outcome {
        Ok(rows) => format!("{name} {took:.0} ms ({rows} rows)"),
        Err(e) => format!("{name} failed after {took:.0} ms: {e}"),
    }
}

/// One slice of the concurrent phases' timeline, offsets from the origin.
#[derive(Clone, Copy)]
struct Slice {
    start: Duration,
    end: Duration,
    checks: u64,
    /// The longest run of `BATCH` checks in it.
    longest: Duration,
    /// The check thread's time on a CPU in it, nanoseconds.
    run_ns: u64,
    /// Its time waiting for a CPU (another runnable thread had it), nanoseconds.
    wait_ns: u64,
}

impl Slice {
    /// Neither running nor waiting for a CPU: asleep, here on the tally's lock.
    fn blocked(&self) -> Duration {
        (self.end - self.start).saturating_sub(Duration::from_nanos(self.run_ns + self.wait_ns))
    }
}

/// Time the hypervisor took CPU 0 away from this VM so far (/proc/stat's
/// steal column), in milliseconds.
fn cpu0_steal_ms() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu0 "))
                .and_then(|l| l.split_whitespace().nth(8)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |ticks| ticks * 1000.0 / clock_ticks())
}

/// Pins the calling thread to `cpu` (`taskset -p` on its thread id).
fn pin_this_thread(cpu: u32) -> bool {
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return false;
    };
    let Some(tid) = link.file_name().map(|t| t.to_string_lossy().into_owned()) else {
        return false;
    };
    Command::new("taskset")
        .args(["-p", "-c", &cpu.to_string(), &tid])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn thread_cpus() -> String {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "?".into())
}

fn child_flush(url: &str, args: &Args) {
    let runtime = current_thread();
    let clock = Arc::new(OffsetClock::default());
    let metrics = Arc::new(Metrics::default());
    let (verifier, source, loaded) = runtime.block_on(async {
        let source = Arc::new(Switchable {
            store: SqlStore::connect(url).await.expect("the key database"),
            discard: AtomicBool::new(false),
        });
        let verifier = Verifier::new(
            source.clone(),
            clock.clone(),
            VerifierConfig {
                max_staleness: Duration::from_secs(86_400),
                ..VerifierConfig::default()
            },
            metrics.clone(),
        );
        let loaded = verifier.reload().await.expect("the key set loads");
        (Arc::new(verifier), source, loaded)
    });
    let all = bench_keys(loaded.min(args.keys));
    let ids: Vec<Arc<str>> = all.iter().map(|(id, _)| Arc::from(id.as_str())).collect();
    let keys: Arc<Vec<String>> = Arc::new(all.iter().map(|(_, k)| k.expose().to_owned()).collect());
    drop(all);
    let n = keys.len();
    println!("keys {n}");

    // Building the parts from n detached entries (outside the tally's lock).
    let mut takes = Vec::new();
    for _ in 0..3 {
        let mut tally = Tally::new(VerifierConfig::default().max_usage_entries);
        let now = Timestamp::now();
        for id in &ids {
            assert!(tally.note(id, Outcome::Valid, now));
        }
        let started = Instant::now();
        let counts: usize = tally
            .detach()
            .into_parts(FLUSH_ROWS_PER_TRANSACTION)
            .map(|part| black_box(part).counts.len())
            .sum();
        takes.push(started.elapsed());
        assert_eq!(counts, n);
    }
    takes.sort_unstable();
    println!(
        "take_ms {}",
        takes
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(",")
    );

    // Timed flushes: every key checked once (one count, one last use each), then one flush.
    let mut previous_hour = None;
    for f in 0..args.flushes {
        if f > 0 {
            clock.advance(60);
        }
        let hour = hour_start(clock.now());
        let new_hour = previous_hour != Some(hour);
        previous_hour = Some(hour);
        runtime.block_on(async {
            for key in keys.iter() {
                assert!(valid(&verifier.check(key, &[]).await));
            }
        });
        let moved_before = metrics.verifier_last_used_flushed.get();
        let started = Instant::now();
        let rows = runtime.block_on(verifier.flush_usage()).expect("a flush");
        let elapsed = started.elapsed();
        let moved = metrics.verifier_last_used_flushed.get() - moved_before;
        println!(
            "flush{f} {:.0} {rows} {moved} {}",
            elapsed.as_secs_f64() * 1000.0,
            if new_hour { "insert" } else { "add" }
        );
    }

    // Checks on CPU 0 while flushes run on CPU 1, against none.
    let stop = Arc::new(AtomicBool::new(false));
    let started_checks = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let checker = {
        let (verifier, keys, stop, started_checks) = (
            verifier.clone(),
            keys.clone(),
            stop.clone(),
            started_checks.clone(),
        );
        let pin = args.pin_checks;
        std::thread::spawn(move || {
            let pinned = pin && pin_this_thread(0);
            let cpus = thread_cpus();
            started_checks.store(true, Ordering::SeqCst);
            let runtime = current_thread();
            let (slices, bad) = runtime.block_on(async {
                let mut slices = Vec::new();
                let mut bad = 0u64;
                let mut i = 0usize;
                let mut slice = Slice {
                    start: origin.elapsed(),
                    end: Duration::ZERO,
                    checks: 0,
                    longest: Duration::ZERO,
                    run_ns: 0,
                    wait_ns: 0,
                };
                let mut sched = thread_sched();
                while !stop.load(Ordering::Relaxed) {
                    let before = Instant::now();
                    for _ in 0..BATCH {
                        bad += u64::from(!valid(&black_box(
                            verifier.check(&keys[i % keys.len()], &[]).await,
                        )));
                        i += 1;
                    }
                    let after = origin.elapsed();
                    slice.longest = slice.longest.max(before.elapsed());
                    slice.checks += BATCH as u64;
                    if after - slice.start >= SLICE {
                        let now_sched = thread_sched();
                        slice.end = after;
                        slice.run_ns = now_sched.0 - sched.0;
                        slice.wait_ns = now_sched.1 - sched.1;
                        sched = now_sched;
                        slices.push(slice);
                        slice = Slice {
                            start: after,
                            end: Duration::ZERO,
                            checks: 0,
                            longest: Duration::ZERO,
                            run_ns: 0,
                            wait_ns: 0,
                        };
                    }
                }
                (slices, bad)
            });
            (slices, bad, pinned, cpus)
        })
    };
    while !started_checks.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let the tally fill with every key before the first phase.
    std::thread::sleep(Duration::from_secs(1));
    let phase = Duration::from_secs_f64(args.phase_seconds);
    let mut steal = HashMap::new();
    let idle = || {
        let from = origin.elapsed();
        std::thread::sleep(phase);
        (from, origin.elapsed())
    };
    let mut stolen = cpu0_steal_ms();
    // A: nothing else runs.
    let a = idle();
    steal.insert("a", cpu0_steal_ms() - stolen);
    stolen = cpu0_steal_ms();
    // B: flushes to the database back to back, each "a minute" after the last.
    let mut flushes = Vec::new();
    let b_start = origin.elapsed();
    while origin.elapsed() - b_start < phase || flushes.len() < 2 {
        // A minute later, as flushes are: every last-used time moves.
        clock.advance(60);
        let started = origin.elapsed();
        let rows = runtime.block_on(verifier.flush_usage()).expect("a flush");
        flushes.push((started, origin.elapsed(), rows));
    }
    let b = (b_start, origin.elapsed());
    steal.insert("b", cpu0_steal_ms() - stolen);
    stolen = cpu0_steal_ms();
    // C: nothing else runs, again.
    let c = idle();
    steal.insert("c", cpu0_steal_ms() - stolen);
    stolen = cpu0_steal_ms();
    // D: the other CPU busy with work that touches neither the verifier nor
    // the database: what sharing the machine costs the check thread.
    let d_start = origin.elapsed();
    let mut block = vec![0u8; 4096];
    while origin.elapsed() - d_start < phase {
        for _ in 0..64 {
            let digest = Sha256::digest(&block);
            block[..32].copy_from_slice(&digest);
        }
    }
    black_box(&block);
    let d = (d_start, origin.elapsed());
    steal.insert("d", cpu0_steal_ms() - stolen);
    stolen = cpu0_steal_ms();
    // E: flushes whose batch is dropped unwritten (take, sort, drop, and the
    // tally filling again), paced like B's flushes: the tally's part alone.
    let paced = flushes
        .iter()
        .map(|(s, e, _)| *e - *s)
        .sum::<Duration>()
        .checked_div(u32::try_from(flushes.len()).unwrap_or(1).max(1))
        .unwrap_or_default();
    source.discard.store(true, Ordering::SeqCst);
    let mut discards = Vec::new();
    let e_start = origin.elapsed();
    while origin.elapsed() - e_start < phase || discards.len() < 2 {
        clock.advance(60);
        let started = origin.elapsed();
        let rows = runtime.block_on(verifier.flush_usage()).expect("a flush");
        discards.push((started, origin.elapsed(), rows));
        std::thread::sleep(paced.saturating_sub(origin.elapsed() - started));
    }
    let e = (e_start, origin.elapsed());
    steal.insert("e", cpu0_steal_ms() - stolen);
    source.discard.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    let (slices, bad, pinned, cpus) = checker.join().expect("the check thread");
    println!("bad {bad}");
    println!("check_thread_pinned {}", u8::from(pinned));
    println!("check_thread_cpus {cpus}");
    println!("process_cpus {}", thread_cpus());
    for (name, (from, to)) in [("a", a), ("b", b), ("c", c), ("d", d), ("e", e)] {
        let inside: Vec<&Slice> = slices
            .iter()
            .filter(|s| s.start >= from && s.end <= to)
            .collect();
        let checks: u64 = inside.iter().map(|s| s.checks).sum();
        let time: f64 = inside.iter().map(|s| (s.end - s.start).as_secs_f64()).sum();
        let worst = inside
            .iter()
            .map(|s| s.checks as f64 / (s.end - s.start).as_secs_f64())
            .fold(f64::INFINITY, f64::min);
        let longest = inside.iter().map(|s| s.longest).max().unwrap_or_default();
        let run: u64 = inside.iter().map(|s| s.run_ns).sum();
        let wait: u64 = inside.iter().map(|s| s.wait_ns).sum();
        // Net over the phase: per slice, the run time read lags by up to a tick.
        let blocked =
            Duration::from_secs_f64(time).saturating_sub(Duration::from_nanos(run + wait));
        let most_blocked = inside.iter().map(|s| s.blocked()).max().unwrap_or_default();
        println!("{name}_rate {:.0}", checks as f64 / time);
        println!(
            "{name}_steal_ms {:.0}",
            steal.get(name).copied().unwrap_or(f64::NAN)
        );
        println!("{name}_on_cpu {:.3}", run as f64 / 1e9 / time);
        println!("{name}_waiting {:.3}", wait as f64 / 1e9 / time);
        println!("{name}_blocked_ms {:.1}", blocked.as_secs_f64() * 1000.0);
        println!(
            "{name}_most_blocked_ms {:.1}",
            most_blocked.as_secs_f64() * 1000.0
        );
        println!("{name}_worst_slice {worst:.0}");
        println!("{name}_longest_us {}", longest.as_micros());
        println!("{name}_seconds {:.2}", (to - from).as_secs_f64());
    }
    // Operator writes during a flush: KeyStore::revoke through a second pool,
    // as the operator revokes, of keys in the flush's first statement (the
    // lowest key ids), alone and 0.3 s after a flush started.
    let writer = runtime
        .block_on(SqlStore::connect(url))
        .expect("the operator's pool");
    let mut victims: Vec<&str> = ids.iter().map(|id| &**id).collect();
    victims.sort_unstable();
    let mut idle_revokes = Vec::new();
    for id in &victims[..3] {
        let started = Instant::now();
        runtime
            .block_on(writer.revoke(id, RevokeReason::Deleted, Timestamp::now()))
            .expect("a revoke");
        idle_revokes.push(format!("{:.0} ms", ms(started.elapsed())));
    }
    let mut flush_revokes = Vec::new();
    for id in &victims[3..6] {
        clock.advance(60);
        let (flushed, (revoked, outcome)) = runtime.block_on(async {
            for key in keys.iter() {
                black_box(verifier.check(key, &[]).await);
            }
            let flush = async {
                let started = Instant::now();
                verifier.flush_usage().await.expect("a flush");
                started.elapsed()
            };
            let revoke = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let started = Instant::now();
                let outcome = writer
                    .revoke(id, RevokeReason::Deleted, Timestamp::now())
                    .await;
                (started.elapsed(), outcome)
            };
            tokio::join!(flush, revoke)
        });
        flush_revokes.push(match outcome {
            Ok(()) => format!("{:.0} ms (flush {:.0} ms)", ms(revoked), ms(flushed)),
            Err(e) => format!(
                "failed after {:.0} ms: {e} (flush {:.0} ms)",
                ms(revoked),
                ms(flushed)
            ),
        });
    }
    // Two verifiers (replicas, each with its own pool) flushing the same keys at once.
    let mut pairs = Vec::new();
    let second = runtime.block_on(async {
        let other = bench_verifier(
            Arc::new(SqlStore::connect(url).await.expect("a second pool")),
            clock.clone(),
            VerifierConfig::default().max_usage_entries,
            Arc::new(Metrics::default()),
        );
        other.reload().await.expect("the key set loads");
        other
    });
    for _ in 0..2 {
        clock.advance(60);
        let (one, two) = runtime.block_on(async {
            for key in keys.iter() {
                black_box(verifier.check(key, &[]).await);
                black_box(second.check(key, &[]).await);
            }
            tokio::join!(
                timed_flush("first", &verifier),
                timed_flush("second", &second)
            )
        });
        pairs.push(format!("{one}, {two}"));
    }
    drop(second);
    println!("two_flushes {}", pairs.join("; "));
    println!("revoke_idle {}", idle_revokes.join(", "));
    println!("revoke_during_flush {}", flush_revokes.join("; "));

    // The stall at each flush's start, where it takes the tally under its
    // lock: the checks' blocked time in the slices around it.
    let stall = |at: Duration| -> Duration {
        slices
            .iter()
            .filter(|s| s.end > at && s.start < at + Duration::from_millis(500))
            .map(|s| s.blocked())
            .max()
            .unwrap_or_default()
    };
    for (name, list) in [("b_flushes", &flushes), ("e_flushes", &discards)] {
        println!(
            "{name} {}",
            list.iter()
                .map(|(s, e, rows)| format!(
                    "{:.0} ms/{rows} rows/stall {:.0} ms",
                    (*e - *s).as_secs_f64() * 1000.0,
                    stall(*s).as_secs_f64() * 1000.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

// ---------------------------------------------------------------------------
// The operator's reads

/// Counts the statements sqlx runs, and the rows they return, from its
/// `sqlx::query` log events (one per statement), as benches/database.rs does.
/// SQLite's per-connection PRAGMAs are left out.
#[derive(Clone, Default)]
struct QueryCounter {
    queries: Arc<AtomicUsize>,
    rows: Arc<AtomicU64>,
}

impl QueryCounter {
    fn install() -> QueryCounter {
        use tracing_subscriber::{Layer as _, filter::Targets, layer::SubscriberExt as _};
        let counter = QueryCounter::default();
        let only_queries = Targets::new().with_target("sqlx::query", tracing::Level::TRACE);
        let subscriber =
            tracing_subscriber::registry().with(counter.clone().with_filter(only_queries));
        tracing::subscriber::set_global_default(subscriber).expect("the first subscriber");
        counter
    }

    fn now(&self) -> (usize, u64) {
        (
            self.queries.load(Ordering::SeqCst),
            self.rows.load(Ordering::SeqCst),
        )
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QueryCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            summary: String,
            rows: u64,
        }
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "rows_returned" {
                    self.rows = value;
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "summary" {
                    value.clone_into(&mut self.summary);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if !fields.summary.starts_with("PRAGMA") {
            self.queries.fetch_add(1, Ordering::SeqCst);
            self.rows.fetch_add(fields.rows, Ordering::SeqCst);
        }
    }
}

/// What `UsageFollower::summarize` does: two grouped queries into a `SummaryBuilder`.
async fn summarize(store: &SqlStore, now: Timestamp) -> keyward::Result<HashMap<String, Summary>> {
    let (first_day, first_hour) = windows(now);
    let mut builder = SummaryBuilder::new(now);
    let at = |seconds: i64| Timestamp::from_second(seconds).unwrap_or(now);
    store
        .each_usage_bucket(
            at(first_day),
            DAY.as_millis() as i64,
            &mut |uid, day, outcome, n| builder.day(uid, day, outcome, n),
        )
        .await?;
    store
        .each_usage_bucket(
            at(first_hour),
            HOUR.as_millis() as i64,
            &mut |uid, hour, outcome, n| builder.hour(uid, hour, outcome, n),
        )
        .await?;
    Ok(builder.summaries)
}

/// The follower's scan interval plus its overlap: how far back `used_since` reads.
const SCAN_REACH: SignedDuration = SignedDuration::from_secs(30 + 180);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn child_reads(url: &str, args: &Args) {
    let queries = QueryCounter::install();
    let now = Timestamp::from_second(args.at).expect("--at");
    let rss_start = status_kib("VmRSS");
    let store = SqlStore::connect(url).await.expect("the key database");
    store.usage_reporting().await.expect("a first query");
    let rss_connected = status_kib("VmRSS");

    // The summary: a first pass, then the timed ones. The previous summaries
    // stay alive while the next are built, as in the UsageBook.
    let (q0, r0) = queries.now();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let mut held = summarize(&store, now).await.expect("the summaries");
    let first_ms = ms(started.elapsed());
    let first_cpu_ms = (cpu_seconds() - cpu0) * 1000.0;
    let (q1, r1) = queries.now();
    let rss_summaries = status_kib("VmRSS");
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..args.passes {
        let cpu = cpu_seconds();
        let started = Instant::now();
        let next = summarize(&store, now).await.expect("the summaries");
        walls.push(ms(started.elapsed()));
        cpus.push((cpu_seconds() - cpu) * 1000.0);
        held = next;
    }
    let (q2, r2) = queries.now();
    let rss_passes = status_kib("VmRSS");
    // What reconciles make of them: every ApiKey's status.usage.
    let statuses: Vec<_> = held
        .values()
        .map(|summary| usage_status(Some(summary), now))
        .collect();
    let rss_statuses = status_kib("VmRSS");
    let heap: usize = statuses
        .iter()
        .map(|s| {
            std::mem::size_of_val(s)
                + [&s.daily, &s.hourly]
                    .iter()
                    .flat_map(|d| [&d.valid, &d.insufficient_scope, &d.revoked, &d.expired])
                    .map(|v| v.capacity() * std::mem::size_of::<i64>())
                    .sum::<usize>()
        })
        .sum();
    let json: usize = statuses
        .iter()
        .map(|s| serde_json::to_string(s).map_or(0, |j| j.len()))
        .sum();
    let last24h: i64 = statuses.iter().map(|s| s.last24h).sum();
    let daily: i64 = statuses
        .iter()
        .map(|s| {
            let d = &s.daily;
            [&d.valid, &d.insufficient_scope, &d.revoked, &d.expired]
                .iter()
                .map(|v| v.iter().sum::<i64>())
                .sum::<i64>()
        })
        .sum();

    // The scan of recent use, three queries.
    let mut scan = [Vec::new(), Vec::new(), Vec::new()];
    let (q3, r3) = queries.now();
    let mut used_rows = 0;
    let mut recent_apikeys = 0;
    let mut recent_keys = 0;
    let mut reporting = false;
    for _ in 0..=args.passes {
        let started = Instant::now();
        let used = store
            .used_since(now - SCAN_REACH)
            .await
            .expect("used_since");
        scan[0].push(ms(started.elapsed()));
        let started = Instant::now();
        let recent = store
            .recent_previous_key_use(recent_window(now))
            .await
            .expect("recent_previous_key_use");
        scan[1].push(ms(started.elapsed()));
        let started = Instant::now();
        reporting = store
            .usage_reporting()
            .await
            .expect("usage_reporting")
            .is_some();
        scan[2].push(ms(started.elapsed()));
        used_rows = used.len();
        recent_apikeys = recent.len();
        recent_keys = recent.values().map(Vec::len).sum::<usize>();
    }
    let (q4, r4) = queries.now();
    let passes = args.passes.max(1);
    println!("apikeys {}", held.len());
    println!("first_ms {first_ms:.0}");
    println!("first_cpu_ms {first_cpu_ms:.0}");
    println!("first_statements {}", q1 - q0);
    println!("first_rows {}", r1 - r0);
    println!("summary_p50_ms {:.0}", median(walls.clone()));
    println!(
        "summary_min_ms {:.0}",
        walls.iter().copied().fold(f64::INFINITY, f64::min)
    );
    println!(
        "summary_max_ms {:.0}",
        walls.iter().copied().fold(0.0, f64::max)
    );
    println!("summary_cpu_ms {:.0}", median(cpus));
    println!("summary_statements {:.1}", (q2 - q1) as f64 / passes as f64);
    println!("summary_rows {:.0}", (r2 - r1) as f64 / passes as f64);
    println!("last24h_total {last24h}");
    println!("daily_total {daily}");
    println!(
        "status_json_bytes {:.0}",
        json as f64 / statuses.len().max(1) as f64
    );
    println!(
        "status_heap_bytes {:.0}",
        heap as f64 / statuses.len().max(1) as f64
    );
    println!("used_ms {:.1}", median(scan[0].clone()));
    println!("recent_ms {:.1}", median(scan[1].clone()));
    println!("reporting_ms {:.1}", median(scan[2].clone()));
    println!(
        "scan_statements {:.1}",
        (q4 - q3) as f64 / (args.passes + 1) as f64
    );
    println!(
        "scan_rows {:.0}",
        (r4 - r3) as f64 / (args.passes + 1) as f64
    );
    println!("used_rows {used_rows}");
    println!("recent_apikeys {recent_apikeys}");
    println!("recent_keys {recent_keys}");
    println!("reporting {}", u8::from(reporting));
    for (name, value) in [
        ("rss_start", rss_start),
        ("rss_connected", rss_connected),
        ("rss_summaries", rss_summaries),
        ("rss_passes", rss_passes),
        ("rss_statuses", rss_statuses),
        ("hwm", status_kib("VmHWM")),
    ] {
        println!("{name} {value}");
    }
    drop(statuses);
    drop(held);
}

/// What `fill_usage` wrote, to check the summaries against.
struct Filled {
    rows: usize,
    seconds: f64,
    /// Checks counted in the 24-hour window (every outcome).
    last24h: i64,
    /// Checks counted in the 30-day window.
    daily: i64,
}

/// Fills a key database for the reads part at `now`: `apikeys` ApiKeys
/// (`uid-0` …), each with one active key; 1 % also with a retiring previous
/// key (grace period ending in an hour) and 1 % with a revoked one (rotated).
/// Counts, written through `SqlStore::record_usage` (the verifiers' path), 50,000 rows per
/// transaction:
///
/// - every active key: `valid` in each of the last `hourly` hours (the current
///   one included), 1–50 checks per hour; every 10th key also
///   `insufficient_scope`, 1 per hour;
/// - every active key: one `valid` row at 00:00 of each earlier day of the
///   30-day window that the hourly rows do not reach (standing for that day's
///   count, 100–1,099), and one per day for `older_days` days before the
///   window (kept by the 90-day retention, outside both windows);
/// - the retiring keys: `valid` in the current and the previous hour; the
///   revoked keys: `revoked` in the same two hours;
/// - every active and retiring key's last use: the current minute.
async fn fill_usage(url: &str, args: &Args, now: Timestamp) -> Filled {
    let started = Instant::now();
    let n = args.apikeys;
    let extra = n.div_ceil(100);
    let keys = bench_keys(n + 2 * extra);
    let mut rows: Vec<KeyRow> = Vec::with_capacity(keys.len());
    for (i, (id, key)) in keys.iter().enumerate() {
        let mut row = KeyRow::active(i % n, id, key);
        if i >= n + extra {
            row.state = "revoked";
            row.revoked_at = Some((now - SignedDuration::from_mins(30)).as_millisecond());
            row.revoke_reason = Some("rotated");
            row.owner = (i - n - extra) * 97 % n;
        } else if i >= n {
            row.state = "retiring";
            row.expires_at = Some((now + HOUR).as_millisecond());
            row.owner = (i - n) * 89 % n;
        }
        rows.push(row);
    }
    write_keys(
        url,
        &rows,
        (now - SignedDuration::from_hours(24 * 95)).as_millisecond(),
    )
    .await;

    let store = SqlStore::connect(url).await.expect("the key database");
    let hour = hour_start(now);
    let (first_day, first_hour) = windows(now);
    let earliest_hourly = hour - (args.hourly_history - 1) * 3600;
    let mut counts: Vec<UsageCount> = Vec::new();
    let mut filled = Filled {
        rows: 0,
        seconds: 0.0,
        last24h: 0,
        daily: 0,
    };
    let at = |s: i64| Timestamp::from_second(s).expect("a time");
    let mut push = |counts: &mut Vec<UsageCount>, key_id: &str, h: i64, outcome, count: u64| {
        if h >= first_hour {
            filled.last24h += count as i64;
        }
        if h >= first_day {
            filled.daily += count as i64;
        }
        filled.rows += 1;
        counts.push(UsageCount {
            key_id: key_id.into(),
            hour: at(h),
            outcome,
            count,
        });
    };
    let mut last_used = Vec::new();
    let minute =
        Timestamp::from_second(now.as_second() - now.as_second().rem_euclid(60)).expect("a minute");
    let flush = |store: &SqlStore, batch: UsageBatch| {
        let store = store.clone();
        async move {
            store
                .record_usage(&batch, now)
                .await
                .expect("a usage batch");
        }
    };
    for (i, row) in rows.iter().enumerate() {
        let id = row.key_id.as_str();
        match row.state {
            "active" => {
                for k in 0..args.hourly_history {
                    let h = hour - k * 3600;
                    push(
                        &mut counts,
                        id,
                        h,
                        Outcome::Valid,
                        1 + ((i * 7 + k as usize) % 50) as u64,
                    );
                    if i % 10 == 0 {
                        push(&mut counts, id, h, Outcome::InsufficientScope, 1);
                    }
                }
                let mut day = day_start(now) - 29 * 86_400;
                while day < earliest_hourly && day < day_start(now) {
                    push(
                        &mut counts,
                        id,
                        day,
                        Outcome::Valid,
                        100 + ((i * 13 + day as usize / 86_400) % 1000) as u64,
                    );
                    day += 86_400;
                }
                for k in 1..=args.older_days {
                    let day = first_day - k * 86_400;
                    push(
                        &mut counts,
                        id,
                        day,
                        Outcome::Valid,
                        100 + (i % 1000) as u64,
                    );
                }
                last_used.push((row.key_id.as_str().into(), minute));
            }
            "retiring" => {
                for h in [hour - 3600, hour] {
                    push(&mut counts, id, h, Outcome::Valid, 20);
                }
                last_used.push((row.key_id.as_str().into(), minute));
            }
            _ => {
                for h in [hour - 3600, hour] {
                    push(&mut counts, id, h, Outcome::Revoked, 5);
                }
            }
        }
        if counts.len() >= 50_000 {
            counts.sort_by(|a, b| {
                (&a.key_id, a.hour, a.outcome).cmp(&(&b.key_id, b.hour, b.outcome))
            });
            let batch = UsageBatch {
                last_used: Vec::new(),
                counts: std::mem::take(&mut counts),
            };
            flush(&store, batch).await;
        }
    }
    last_used.sort();
    counts.sort_by(|a, b| (&a.key_id, a.hour, a.outcome).cmp(&(&b.key_id, b.hour, b.outcome)));
    flush(&store, UsageBatch { last_used, counts }).await;
    store.close().await;
    filled.seconds = started.elapsed().as_secs_f64();
    filled
}

// ---------------------------------------------------------------------------
// The parts

/// Runs this bench binary in `role`, pinned to `cpu` when given; returns its
/// stdout as `name value` pairs.
fn run_child(role: &str, extra: &[String], cpu: Option<u32>) -> HashMap<String, String> {
    let exe = std::env::current_exe().expect("the bench binary");
    let mut command = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let output = command
        .args(["--role", role])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("the bench's child process");
    assert!(output.status.success(), "child {role} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn num(pairs: &HashMap<String, String>, name: &str) -> f64 {
    pairs
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn text<'a>(pairs: &'a HashMap<String, String>, name: &str) -> &'a str {
    pairs.get(name).map_or("?", String::as_str)
}

fn part_check(args: &Args, file: &Path, dir: &Path, pin: bool) -> String {
    eprintln!("usage bench: Verifier::check with counting, one core");
    let load = load_average();
    let url = copy_of(file, dir, "check.db");
    let r = run_child(
        "check",
        &[
            "--database-url".into(),
            url,
            "--seconds".into(),
            args.seconds.to_string(),
        ],
        pin.then_some(0),
    );
    let m = |name: &str| num(&r, name) / 1e6;
    let ns = |name: &str| 1e9 / num(&r, name);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "--- Verifier::check with counting, one core (current-thread runtime{}) ---",
        if pin { ", taskset -c 0" } else { "" }
    );
    let _ = writeln!(s, "load average       {load}");
    let _ = writeln!(
        s,
        "key set            {} keys from SQLite, {} s per figure; every answer checked VALID",
        num(&r, "keys"),
        args.seconds
    );
    let n = num(&r, "keys");
    let _ = writeln!(
        s,
        "| loop | checks/s (wall) | ns per check | on CPU | checks per second on CPU |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    for (name, label) in [
        (
            "check_one",
            "Verifier::check, one key (target >= 1.00 M/s)".to_owned(),
        ),
        (
            "check_hot",
            format!("Verifier::check, {HOT_KEYS} keys in turn"),
        ),
        (
            "check_all",
            format!("Verifier::check, all {n} keys in turn (the tally holds {n} entries)"),
        ),
        (
            "check_first",
            format!(
                "Verifier::check, all {n} keys once right after a flush (each a new tally entry; 3 passes)"
            ),
        ),
        (
            "noroom_one",
            "Verifier::check, one key, tally with no room (max_usage_entries 0)".to_owned(),
        ),
        (
            "noroom_all",
            format!("Verifier::check, all {n} keys in turn, tally with no room"),
        ),
        (
            "answer_one",
            "snapshot::answer alone, one key (no lock, clock or count)".to_owned(),
        ),
        (
            "answer_all",
            format!("snapshot::answer alone, all {n} keys in turn"),
        ),
    ] {
        let on_cpu = num(&r, &format!("{name}_on_cpu"));
        let _ = writeln!(
            s,
            "| {label} | {:.2} M/s | {:.0} | {:.0} % | {:.2} M/s |",
            m(name),
            ns(name),
            on_cpu * 100.0,
            m(name) / on_cpu
        );
    }
    let _ = writeln!(
        s,
        "counting costs     {:.0} ns per check over one key, {:.0} ns over all keys (check − check with no room); check − answer: {:.0} ns and {:.0} ns",
        ns("check_one") - ns("noroom_one"),
        ns("check_all") - ns("noroom_all"),
        ns("check_one") - ns("answer_one"),
        ns("check_all") - ns("answer_all"),
    );
    s
}

fn part_memory(args: &Args, file: &Path, dir: &Path) -> String {
    eprintln!("usage bench: verifier memory with every key counted");
    let load = load_average();
    let url = copy_of(file, dir, "memory.db");
    let r = run_child(
        "memory",
        &[
            "--database-url".into(),
            url,
            "--keys".into(),
            args.keys.to_string(),
        ],
        None,
    );
    let mib = |name: &str| num(&r, name) / 1024.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "--- verifier memory, every key used within the hour (a fresh process; VmRSS / VmHWM from /proc/self/status) ---"
    );
    let _ = writeln!(s, "load average       {load}");
    let _ = writeln!(
        s,
        "setup              {} keys loaded from SQLite; each checked once ({} tally keys, {} dropped); Verifier::flush_usage wrote {} count rows in {} ms; then {CYCLES} more check-every-key + flush cycles; {}",
        num(&r, "keys"),
        num(&r, "tally_keys"),
        num(&r, "dropped"),
        num(&r, "flushed_rows"),
        num(&r, "flush_ms"),
        if num(&r, "hwm_reset") > 0.0 {
            "VmHWM reset after the load (clear_refs)"
        } else {
            "VmHWM since the start: /proc/self/clear_refs not writable"
        }
    );
    let _ = writeln!(s, "| stage | VmRSS | VmHWM |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let _ = writeln!(s, "| started | {:.1} MiB | |", mib("rss_start"));
    let _ = writeln!(
        s,
        "| database connected | {:.1} MiB | |",
        mib("rss_connected")
    );
    let _ = writeln!(
        s,
        "| key set loaded | {:.1} MiB | {:.1} MiB |",
        mib("rss_loaded"),
        mib("hwm_loaded")
    );
    let _ = writeln!(
        s,
        "| every key checked once (tally full) | {:.1} MiB | {:.1} MiB |",
        mib("rss_counted"),
        mib("hwm_counted")
    );
    let _ = writeln!(
        s,
        "| after the flush | {:.1} MiB | {:.1} MiB |",
        mib("rss_flushed"),
        mib("hwm_flushed")
    );
    let _ = writeln!(
        s,
        "| after {CYCLES} more cycles | {:.1} MiB | {:.1} MiB |",
        mib("rss_cycles"),
        mib("hwm_cycles")
    );
    let _ = writeln!(s, "RSS after each cycle {} MiB", text(&r, "rss_each"));
    let _ = writeln!(
        s,
        "tally              {:.1} MiB for {} keys ({:.0} bytes per key); the flush's peak {:.1} MiB above the counted tally; process peak {:.1} MiB  [target <= 64 MiB]",
        mib("rss_counted") - mib("rss_loaded"),
        num(&r, "tally_keys"),
        (num(&r, "rss_counted") - num(&r, "rss_loaded")) * 1024.0 / num(&r, "tally_keys"),
        mib("hwm_flushed") - mib("rss_counted"),
        mib("hwm_cycles").max(mib("hwm_loaded")),
    );
    s
}

fn part_flush(
    args: &Args,
    file: &Path,
    dir: &Path,
    pin: bool,
    postgres: &Result<Postgres, String>,
    runtime: &tokio::runtime::Runtime,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "--- flush of {} counts + last uses (Verifier::flush_usage, one transaction), and checks during flushes ---",
        args.keys
    );
    let _ = writeln!(
        s,
        "setup              every key checked once, then one flush; the verifier's clock one minute later before each next flush (so each moves every last-used time); then one thread checks every key in turn{} through five phases of {} s each (below; B and E last at least two flushes)",
        if pin {
            " (pinned to CPU 0; the flushes, the rest of the process and the throwaway PostgreSQL on CPU 1)"
        } else {
            ""
        },
        args.phase_seconds,
    );
    for database in &args.databases {
        let load = load_average();
        let (label, url) = match database {
            Database::Sqlite => (
                "SQLite file (WAL, synchronous=FULL)".to_owned(),
                copy_of(file, dir, "flush.db"),
            ),
            Database::Postgres => match postgres {
                Ok(pg) => {
                    eprintln!("usage bench: filling PostgreSQL with {} keys", args.keys);
                    let url = runtime.block_on(pg.fresh_database("keyward_usage_flush"));
                    let rows: Vec<KeyRow> = bench_keys(args.keys)
                        .iter()
                        .enumerate()
                        .map(|(i, (id, key))| KeyRow::active(i, id, key))
                        .collect();
                    runtime.block_on(write_keys(&url, &rows, Timestamp::now().as_millisecond()));
                    ("PostgreSQL".to_owned(), url)
                }
                Err(why) => {
                    let _ = writeln!(s, "PostgreSQL         SKIP: {why}");
                    continue;
                }
            },
        };
        eprintln!("usage bench: flushes on {label}");
        let mut extra = vec![
            "--database-url".into(),
            url,
            "--keys".into(),
            args.keys.to_string(),
            "--flushes".into(),
            args.flushes.to_string(),
            "--phase-seconds".into(),
            args.phase_seconds.to_string(),
        ];
        if pin {
            extra.push("--pin-checks".into());
        }
        let r = run_child("flush", &extra, pin.then_some(1));
        let _ = writeln!(s, "{label} (load average {load})");
        let _ = writeln!(
            s,
            "  building the parts of {} detached entries (outside the lock): {} ms (3 runs)",
            num(&r, "keys"),
            text(&r, "take_ms")
        );
        for f in 0..args.flushes {
            let fields: Vec<&str> = text(&r, &format!("flush{f}")).split(' ').collect();
            if let [ms, rows, moved, kind] = fields[..] {
                let _ = writeln!(
                    s,
                    "  flush {}: {ms} ms, {rows} count rows ({}), {moved} last-used times moved",
                    f + 1,
                    if kind == "insert" {
                        "new rows: INSERT"
                    } else {
                        "existing rows: count = count + n"
                    }
                );
            }
        }
        let _ = writeln!(
            s,
            "  check thread on CPU(s) {} (pinned: {}), the rest on {}; answers not VALID: {}",
            text(&r, "check_thread_cpus"),
            text(&r, "check_thread_pinned"),
            text(&r, "process_cpus"),
            text(&r, "bad")
        );
        let _ = writeln!(
            s,
            "  | phase | checks/s (wall) | on CPU | waiting for a CPU | checks per second on CPU | neither (asleep on the lock, or stolen): total, longest in a slice | CPU 0 stolen by the hypervisor | worst 10 ms slice | longest {BATCH} checks |"
        );
        let _ = writeln!(
            s,
            "  | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (phase, label) in [
            ("a", "A: no flush"),
            ("b", "B: flushes back to back"),
            ("c", "C: no flush, again"),
            ("d", "D: no flush, the other CPU busy hashing (control)"),
            (
                "e",
                "E: flushes that drop their batch unwritten, paced like B (control)",
            ),
        ] {
            let rate = num(&r, &format!("{phase}_rate")) / 1e6;
            let on_cpu = num(&r, &format!("{phase}_on_cpu"));
            let _ = writeln!(
                s,
                "  | {label} ({} s) | {rate:.2} M/s | {:.0} % | {:.0} % | {:.2} M/s | {} ms, {} ms | {} ms | {:.2} M/s | {:.1} ms |",
                text(&r, &format!("{phase}_seconds")),
                on_cpu * 100.0,
                num(&r, &format!("{phase}_waiting")) * 100.0,
                rate / on_cpu,
                text(&r, &format!("{phase}_blocked_ms")),
                text(&r, &format!("{phase}_most_blocked_ms")),
                text(&r, &format!("{phase}_steal_ms")),
                num(&r, &format!("{phase}_worst_slice")) / 1e6,
                num(&r, &format!("{phase}_longest_us")) / 1000.0
            );
        }
        let _ = writeln!(
            s,
            "  flushes during B (time / count rows / the checks' longest sleep within 0.5 s of the flush's start): {}",
            text(&r, "b_flushes")
        );
        let _ = writeln!(
            s,
            "  flushes during E (the same; each followed by a pause to B's mean flush time): {}",
            text(&r, "e_flushes")
        );
        let _ = writeln!(
            s,
            "  KeyStore::revoke through a second pool (as the operator), of keys in the flush's first statement: alone {}; started 0.3 s into a flush: {}",
            text(&r, "revoke_idle"),
            text(&r, "revoke_during_flush")
        );
        let _ = writeln!(
            s,
            "  two verifiers (own pools, as two replicas) flushing the same {} keys at once: {}",
            num(&r, "keys"),
            text(&r, "two_flushes")
        );
    }
    s
}

fn part_reads(
    args: &Args,
    dir: &Path,
    postgres: &Result<Postgres, String>,
    runtime: &tokio::runtime::Runtime,
) -> String {
    let mut s = String::new();
    let extra = args.apikeys.div_ceil(100);
    let _ = writeln!(
        s,
        "--- the operator's usage reads over {} ApiKeys ---",
        args.apikeys
    );
    let _ = writeln!(
        s,
        "setup              {} ApiKeys, one active key each, {extra} also with a retiring key and {extra} with a revoked one, both presented in the last two hours; counts: every active key valid in each of the last {} hours (every 10th also insufficient_scope), one row per earlier day of the 30-day window, one row per day for {} days before it; written through SqlStore::record_usage; each database read in a fresh child process, a first pass then {} timed ones",
        args.apikeys, args.hourly_history, args.older_days, args.passes
    );
    let _ = writeln!(
        s,
        "| database | count rows | filled in | summary: first pass | summary p50 (min–max) | summary CPU | statements per summary | rows streamed | ApiKeys summarized | totals match | used_since / recent_previous_key_use / usage_reporting | statements per scan | RSS connected → with summaries → after the passes | peak RSS |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(14));
    let mut notes = String::new();
    for database in &args.databases {
        let now = Timestamp::now();
        let (label, url) = match database {
            Database::Sqlite => (
                "SQLite file (WAL)",
                sqlite_url(&dir.join(format!("reads-{}.db", args.apikeys))),
            ),
            Database::Postgres => match postgres {
                Ok(pg) => (
                    "PostgreSQL",
                    runtime.block_on(pg.fresh_database("keyward_usage_reads")),
                ),
                Err(why) => {
                    let _ = writeln!(s, "| PostgreSQL | SKIP: {why} |");
                    continue;
                }
            },
        };
        if *database == Database::Sqlite {
            let path = dir.join(format!("reads-{}.db", args.apikeys));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(sidecar(&path, suffix));
            }
        }
        eprintln!("usage bench: filling {label} for the operator's reads");
        let filled = runtime.block_on(fill_usage(&url, args, now));
        let load = load_average();
        eprintln!("usage bench: reads on {label}");
        let r = run_child(
            "reads",
            &[
                "--database-url".into(),
                url,
                "--at".into(),
                now.as_second().to_string(),
                "--passes".into(),
                args.passes.to_string(),
            ],
            None,
        );
        let mib = |name: &str| num(&r, name) / 1024.0;
        let matches = num(&r, "last24h_total") == filled.last24h as f64
            && num(&r, "daily_total") == filled.daily as f64;
        let _ = writeln!(
            s,
            "| {label} | {} | {:.1} s | {:.0} ms ({:.0} ms CPU) | {:.0} ms ({:.0}–{:.0}) | {:.0} ms | {} | {} | {} | {} | {:.1} / {:.1} / {:.1} ms ({} and {} rows) | {} | {:.1} → {:.1} → {:.1} MiB | {:.1} MiB |",
            filled.rows,
            filled.seconds,
            num(&r, "first_ms"),
            num(&r, "first_cpu_ms"),
            num(&r, "summary_p50_ms"),
            num(&r, "summary_min_ms"),
            num(&r, "summary_max_ms"),
            num(&r, "summary_cpu_ms"),
            text(&r, "summary_statements"),
            text(&r, "summary_rows"),
            text(&r, "apikeys"),
            if matches { "yes" } else { "**no**" },
            num(&r, "used_ms"),
            num(&r, "recent_ms"),
            num(&r, "reporting_ms"),
            text(&r, "used_rows"),
            text(&r, "recent_keys"),
            text(&r, "scan_statements"),
            mib("rss_connected"),
            mib("rss_summaries"),
            mib("rss_passes"),
            mib("hwm"),
        );
        let _ = writeln!(
            notes,
            "{label}: load average {load}; summaries hold {:.1} MiB ({:.0} bytes per ApiKey, RSS growth); status.usage of every ApiKey (as the ApiKey cache holds it) {:.0} bytes per ApiKey on the heap, counted from the structures without malloc's overhead ({:.1} MiB of RSS more when built here, after freed pages), {:.0} bytes as JSON; RSS after {} more passes {:.1} MiB; 24-hour total {} (written {}), 30-day total {} (written {}); recent use: {} ApiKeys, {} keys; reporting row {}",
            mib("rss_summaries") - mib("rss_connected"),
            (num(&r, "rss_summaries") - num(&r, "rss_connected")) * 1024.0 / num(&r, "apikeys"),
            num(&r, "status_heap_bytes"),
            mib("rss_statuses") - mib("rss_passes"),
            num(&r, "status_json_bytes"),
            args.passes,
            mib("rss_passes"),
            text(&r, "last24h_total"),
            filled.last24h,
            text(&r, "daily_total"),
            filled.daily,
            text(&r, "recent_apikeys"),
            text(&r, "recent_keys"),
            if text(&r, "reporting") == "1" {
                "present"
            } else {
                "missing"
            },
        );
    }
    s.push_str(&notes);
    s
}

// ---------------------------------------------------------------------------
// The machine

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(&format!("{field}:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User plus system CPU seconds of this process, all threads (/proc/self/stat).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!(
        "{} cores, {model}; load average at start {}; {} build",
        cores(),
        load_average(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )
}

fn which(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}
