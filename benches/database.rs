//! The key database in production (issue 14, "Performance").
//!
//! Four parts, each selectable by name (`cargo bench --bench database --
//! anti-entropy`, `-- replica`, `-- failover`, `-- writers`; no name runs all
//! four):
//!
//! - `anti-entropy`: one anti-entropy pass (`AntiEntropy::pass`) over N live
//!   records of cluster "bench" and N ApiKeys with nothing to revoke, for each
//!   N of `--sizes` (10,000 and 100,000), on an SQLite file and on PostgreSQL
//!   (`KEYWARD_BENCH_DATABASE_URL`, or a throwaway server from
//!   tests/support/replication.rs). The records are written with plain SQL in
//!   one transaction per 10,000 rows; the ApiKey watch cache (a kube-runtime
//!   reflector `Store<DeserializeGuard<ApiKey>>`) and the `SecretCache` are
//!   filled in memory through their watch events, as the operator's watches
//!   fill them. The kube `Client` points at a loopback port where the bench
//!   counts every connection: a pass that made any API request would show
//!   there. Each (backend, N) runs in a fresh child process (this binary,
//!   re-executed with a hidden argument), so its peak RSS (VmHWM) belongs to
//!   that size alone. Beside each pass, the same rows are streamed with
//!   `SqlStore::each_live_row` without judging them, so the cost of judging
//!   shows. Asserts: every record compared, nothing revoked or requeued, no
//!   API request, and a peak RSS within 64 MiB at 10,000 keys.
//! - `replica`: a real PostgreSQL 15 primary and hot standby (streaming,
//!   asynchronous). Keys issued on the primary through `SqlStore`; three
//!   verifiers started in this process by `keyward::verifier::listen::start`:
//!   on the primary; on the standby with `primary_database_url` (LISTEN on the
//!   primary, read the replica once it has replayed); on the standby without
//!   it (polling). Each key is revoked on the primary (`KeyStore::revoke`), and
//!   each verifier's `Verifier::check` is polled every millisecond until it
//!   answers REVOKED. The standby's replay of each revocation is timed beside
//!   them, since the bound is 1 s p99 plus the replay lag.
//! - `failover`: a primary, an asynchronous standby, and a `TcpProxy` as the
//!   Service address in front of the primary. A verifier (`listen::start`) and
//!   an operator-side writer (`SqlStore` with the operator's default pool) on
//!   the proxy's URL. The primary is killed, the standby promoted and the
//!   proxy retargeted; the bench times, from the kill, (a) the writer's first
//!   `insert_pending` + `activate` of a fresh key to succeed (retried every 50
//!   ms), and (b) the verifier answering VALID for that key from memory. Fresh
//!   servers for each of `--failovers` runs.
//! - `writers` (issue 15): `--writers` tasks issue `--keys` keys on one
//!   PostgreSQL primary, each an insert-pending and an activate transaction,
//!   with fsync off and on, three ways of taking the change number: as shipped
//!   (`SqlStore`, stamped last), taken first (as before issue 15, so the
//!   counter row is locked for the whole transaction), and from a sequence
//!   with no lock (not in commit order, so unsafe for the verifier: an upper
//!   bound of what the lock costs).
//!
//! PostgreSQL parts print SKIP and exit 0 without the PostgreSQL server
//! binaries (as root, also the `postgres` user). Run: `cargo bench --bench
//! database` (`-- --help` lists the options). Figures and their meaning are in
//! docs/benchmarks.md.

// Shared with tests/replication.rs; this bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/support/replication.rs"]
mod replication;

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time},
};
use keyward::{
    anti_entropy::AntiEntropy,
    clock::SystemClock,
    crd::{ApiKey, ApiKeySpec, ApiKeyStatus, FINALIZER, KEY_ID_ANNOTATION, READY},
    key::{KeyFactory, PlainKey, SeededEntropy},
    operator::reconciler::KubeCluster,
    operator::secret_cache::SecretCache,
    store::{IssueReason, KeyMetadata, KeyRecord, KeyState, KeyStore, RevokeReason, SqlStore},
    telemetry::{Metrics, OutcomeLabel},
    verifier::{
        Checked, Code, Verifier, VerifierConfig,
        listen::{VerifierSettings, start},
    },
};
use kube::{
    Client,
    api::PartialObjectMeta,
    core::DeserializeGuard,
    runtime::{reflector, watcher},
};
use replication::{Server, TcpProxy};
use sqlx::Connection as _;

/// The cluster name of every record the bench writes.
const CLUSTER: &str = "bench";
/// The key ids of part 1: `kid_ae` and 14 digits, as long as real key ids.
const ID_PREFIX: &str = "kid_ae";
/// Rows per transaction and per INSERT statement when filling part 1's database.
const ROWS_PER_TRANSACTION: usize = 10_000;
const ROWS_PER_STATEMENT: usize = 500;
/// The issue's memory bound for the pass at 10,000 keys.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
/// The seed of part 2's and part 3's keys.
const SEED: u64 = 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    AntiEntropy,
    Replica,
    Failover,
    Writers,
}

/// Options; `cargo bench` appends `--bench`, which is not one of them.
#[derive(Debug, Parser)]
#[command(about = "keyward's key-database benchmark (issue 14)")]
struct Args {
    /// Parts to run; none runs all three.
    #[arg(value_enum)]
    parts: Vec<Part>,
    /// Live records and ApiKeys of the anti-entropy part, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Measured anti-entropy passes at 100,000 keys; smaller sizes run
    /// proportionally more (at most 20), for the 10 ms resolution of CPU times.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// Revocations of the replica part.
    #[arg(long, default_value_t = 100)]
    revocations: usize,
    /// Failovers of the failover part, each with fresh servers.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Keys each way of the writers part issues, per round.
    #[arg(long, default_value_t = 2000)]
    writer_keys: usize,
    /// Concurrent writers of the writers part (the operator's PostgreSQL pool).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Internal: run one anti-entropy measurement in this (child) process.
    #[arg(long, hide = true)]
    child_pass: bool,
    /// Internal: the child's database URL.
    #[arg(long, hide = true)]
    database_url: Option<String>,
    /// Internal: the child's number of keys.
    #[arg(long, hide = true, default_value_t = 0)]
    keys: usize,
}

fn main() {
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    if args.child_pass {
        let url = args.database_url.as_deref().expect("--database-url");
        let line = runtime().block_on(child_pass(url, args.keys, args.passes));
        println!("{line}");
        return;
    }
    // `cargo test --all-targets` runs bench binaries too, without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("SKIP: database bench: run it with `cargo bench --bench database`");
        return;
    }
    // RUST_LOG=keyward=info shows what the verifiers and pools under test do.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let parts = if args.parts.is_empty() {
        vec![
            Part::AntiEntropy,
            Part::Replica,
            Part::Failover,
            Part::Writers,
        ]
    } else {
        args.parts.clone()
    };
    let mut report = String::new();
    let _ = writeln!(report, "=== keyward key-database benchmark (issue 14) ===");
    let _ = writeln!(
        report,
        "date               {}",
        Timestamp::now().strftime("%Y-%m-%d")
    );
    let _ = writeln!(report, "machine            {}", machine());
    let given: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let _ = writeln!(
        report,
        "command            cargo bench --bench database{}",
        if given.is_empty() {
            String::new()
        } else {
            format!(" -- {}", given.join(" "))
        }
    );
    eprint!("{report}");
    let mut failures = Vec::new();
    for part in parts {
        let (section, failed) = match part {
            Part::AntiEntropy => part_anti_entropy(&args),
            Part::Replica => part_replica(&args),
            Part::Failover => part_failover(&args),
            Part::Writers => part_writers(&args),
        };
        eprint!("{section}");
        report.push_str(&section);
        failures.extend(failed);
    }
    let _ = writeln!(report, "load average end   {}", load_average());
    print!("{report}");
    assert!(failures.is_empty(), "FAILED:\n  {}", failures.join("\n  "));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

// ---------------------------------------------------------------------------
// Part 1: the anti-entropy pass at scale, nothing to revoke

/// Key id, ApiKey uid, namespace and name of part 1's key `i`.
fn key_id(i: usize) -> String {
    format!("{ID_PREFIX}{i:014}")
}

fn apikey_uid(i: usize) -> String {
    format!("{:08x}-b0a7-4e5c-9d1f-{:012x}", i, i * 7919)
}

fn namespace(i: usize) -> String {
    format!("team-{}", i % 50)
}

fn name(i: usize) -> String {
    format!("key-{i}")
}

/// When part 1's records were issued: a day ago, so no pending rule applies.
fn issued_at() -> Timestamp {
    static AT: OnceLock<Timestamp> = OnceLock::new();
    *AT.get_or_init(|| {
        let now = Timestamp::now() - SignedDuration::from_hours(24);
        Timestamp::from_second(now.as_second()).expect("a whole second")
    })
}

/// Writes the schema (`migrate`), then part 1's records `from..to`, active,
/// with plain SQL: one transaction per 10,000 rows, 500 rows per INSERT.
async fn fill(url: &str, from: usize, to: usize) {
    let store = SqlStore::connect(url).await.expect("the key database");
    store.migrate().await.expect("migrations");
    store.close().await;
    let mut connection = sqlx::AnyConnection::connect(url)
        .await
        .expect("the key database");
    if from == 0 {
        // A database given by KEYWARD_BENCH_DATABASE_URL may hold an earlier run's rows.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM api_keys WHERE cluster = '{CLUSTER}' AND key_id LIKE '{ID_PREFIX}%'"
        )))
        .execute(&mut connection)
        .await
        .expect("no earlier bench rows");
    }
    let created = issued_at().as_millisecond();
    let mut start = from;
    while start < to {
        let end = (start + ROWS_PER_TRANSACTION).min(to);
        let mut tx = connection.begin().await.expect("a transaction");
        let mut first = start;
        while first < end {
            let last = (first + ROWS_PER_STATEMENT).min(end);
            let mut sql = String::from(
                "INSERT INTO api_keys (key_id, key_hash, key_hint, apikey_uid, namespace, name, owner, team, scopes, state, created_at, activated_at, expires_at, issue_reason, change_seq, cluster) VALUES ",
            );
            for i in first..last {
                let id = key_id(i);
                let hash = keyward::key::KeyHash::of(id.as_bytes());
                let _ = write!(
                    sql,
                    "{}('{id}', '{}', 'kw_{:04}', '{}', '{}', '{}', 'owner-{}@example.com', 'team-{}', 'inference models:read', 'active', {created}, {created}, NULL, 'initial', {}, '{CLUSTER}')",
                    if i == first { "" } else { ", " },
                    hash.as_str(),
                    i % 10_000,
                    apikey_uid(i),
                    namespace(i),
                    name(i),
                    i % 500,
                    i % 20,
                    i + 1,
                );
            }
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .expect("an INSERT of bench rows");
            first = last;
        }
        tx.commit().await.expect("a commit");
        start = end;
    }
    sqlx::query("UPDATE key_change_counter SET seq = $1 WHERE id = 1 AND seq < $1")
        .bind(i64::try_from(to).expect("a count"))
        .execute(&mut connection)
        .await
        .expect("the change counter");
    sqlx::query("ANALYZE api_keys")
        .execute(&mut connection)
        .await
        .expect("ANALYZE");
    connection.close().await.expect("a clean close");
}

/// ApiKey `i` as the operator's watch cache holds it after a settled
/// reconcile (slimmed as the operator slims it: no managedFields, no labels).
fn api_key(i: usize) -> ApiKey {
    let at = Time(issued_at());
    let mut key = ApiKey::new(
        &name(i),
        ApiKeySpec {
            owner: format!("owner-{}@example.com", i % 500),
            team: format!("team-{}", i % 20),
            scopes: vec!["inference".into(), "models:read".into()],
            secret_name: None,
            description: None,
            rotation: None,
            expires_after: None,
            rollout: None,
        },
    );
    key.metadata.namespace = Some(namespace(i));
    key.metadata.uid = Some(apikey_uid(i));
    key.metadata.generation = Some(1);
    key.metadata.resource_version = Some((100_000 + 2 * i).to_string());
    key.metadata.creation_timestamp = Some(at.clone());
    key.metadata.finalizers = Some(vec![FINALIZER.into()]);
    key.status = Some(ApiKeyStatus {
        conditions: vec![Condition {
            type_: READY.into(),
            status: "True".into(),
            reason: "KeyActive".into(),
            message: format!("key {} is active in Secret {}", key_id(i), name(i)),
            last_transition_time: at.clone(),
            observed_generation: Some(1),
        }],
        observed_generation: Some(1),
        key_id: Some(key_id(i)),
        key_hint: Some(format!("kw_{:04}", i % 10_000)),
        secret_name: Some(name(i)),
        issued_at: Some(at),
        revision: Some(1),
        secret_resource_version: Some((100_001 + 2 * i).to_string()),
        ..ApiKeyStatus::default()
    });
    key
}

/// The metadata of ApiKey `i`'s Secret, as the metadata-only Secret watch delivers it.
fn secret_meta(i: usize) -> PartialObjectMeta<Secret> {
    PartialObjectMeta::<Secret> {
        metadata: ObjectMeta {
            name: Some(name(i)),
            namespace: Some(namespace(i)),
            uid: Some(format!("{:08x}-5ec7-4e5c-9d1f-{:012x}", i, i * 7919)),
            resource_version: Some((100_001 + 2 * i).to_string()),
            owner_references: Some(vec![OwnerReference {
                api_version: "keyward.dev/v1alpha1".into(),
                kind: "ApiKey".into(),
                name: name(i),
                uid: apikey_uid(i),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            annotations: Some([(KEY_ID_ANNOTATION.to_owned(), key_id(i))].into()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "keyward".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..PartialObjectMeta::default()
    }
}

/// A loopback port that accepts and counts every connection, standing in for
/// the API server: any request the pass made would be counted here (and
/// fail, since nothing answers).
struct ApiTrap {
    address: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl ApiTrap {
    fn start() -> ApiTrap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for connection in listener.incoming() {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(connection);
            }
        });
        ApiTrap {
            address,
            connections,
        }
    }
}

/// Counts the statements sqlx runs, and the rows they return, from its
/// `sqlx::query` log events (one per statement, when it completes). SQLite's
/// per-connection PRAGMAs are counted apart, as connections opened.
#[derive(Clone, Default)]
struct QueryCounter {
    queries: Arc<AtomicUsize>,
    rows: Arc<AtomicU64>,
    connections: Arc<AtomicUsize>,
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

    /// Statements (PRAGMAs left out), rows, and SQLite connections opened so far.
    fn now(&self) -> (usize, u64, usize) {
        (
            self.queries.load(Ordering::SeqCst),
            self.rows.load(Ordering::SeqCst),
            self.connections.load(Ordering::SeqCst),
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
        if fields.summary.starts_with("PRAGMA foreign_keys") {
            // The first statement sqlx runs on a new SQLite connection.
            self.connections.fetch_add(1, Ordering::SeqCst);
        } else if !fields.summary.starts_with("PRAGMA") {
            self.queries.fetch_add(1, Ordering::SeqCst);
            self.rows.fetch_add(fields.rows, Ordering::SeqCst);
        }
    }
}

/// One (backend, N) measurement in this fresh process; one `key=value` line.
async fn child_pass(url: &str, n: usize, passes: usize) -> String {
    let queries = QueryCounter::install();
    let trap = ApiTrap::start();
    let config = kube::Config::new(format!("http://{}", trap.address).parse().expect("a URI"));
    let client = Client::try_from(config).expect("a kube client");
    let rss_start = status_kib("VmRSS");

    let (keys, mut writer) = reflector::store::<DeserializeGuard<ApiKey>>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for i in 0..n {
        writer.apply_watcher_event(&watcher::Event::InitApply(DeserializeGuard(Ok(api_key(i)))));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let secrets = SecretCache::default();
    secrets.apply(&watcher::Event::Init);
    for i in 0..n {
        secrets.apply(&watcher::Event::InitApply(secret_meta(i)));
    }
    secrets.apply(&watcher::Event::InitDone);
    let rss_caches = status_kib("VmRSS");

    let store = Arc::new(
        SqlStore::connect_lazy(url)
            .expect("the key database")
            .with_cluster(CLUSTER),
    );
    let metrics = Arc::new(Metrics::default());
    let (requeue, mut requeued) = tokio::sync::mpsc::unbounded_channel();
    let anti_entropy = AntiEntropy {
        client: client.clone(),
        store: store.clone(),
        keys,
        secrets: secrets.clone(),
        requeue,
        cluster: Arc::new(KubeCluster::new(
            client,
            None,
            Some(secrets),
            metrics.clone(),
        )),
        clock: Arc::new(SystemClock),
        metrics,
    };

    let mut records = Vec::new();
    let mut revoked = 0;
    let mut requeued_reported = 0;
    let mut errors = 0;
    let mut run_pass = async || {
        let started = Instant::now();
        match anti_entropy.pass().await {
            Ok(report) => {
                records.push(report.records);
                revoked += report.orphaned + report.superseded;
                requeued_reported += report.requeued;
            }
            Err(e) => {
                eprintln!("database bench: anti-entropy pass failed: {e}");
                errors += 1;
            }
        }
        started.elapsed()
    };
    // The first pass connects the pool and warms the caches: the operator's
    // pass at start.
    let first = run_pass().await;
    let mut pass_wall = Vec::new();
    let mut pass_cpu = 0.0;
    let mut stream_wall = Vec::new();
    let mut stream_cpu = 0.0;
    let mut streamed = Vec::new();
    // Statements and rows of each measured pass.
    let mut pass_queries = Vec::new();
    let mut connections_opened = 0;
    for _ in 0..passes {
        let cpu = cpu_seconds();
        let started = Instant::now();
        let mut rows = 0usize;
        store
            .each_live_row(&mut |_row| rows += 1)
            .await
            .expect("the rows stream");
        stream_wall.push(started.elapsed());
        stream_cpu += cpu_seconds() - cpu;
        streamed.push(rows);

        let cpu = cpu_seconds();
        let (statements, rows, opened) = queries.now();
        pass_wall.push(run_pass().await);
        pass_cpu += cpu_seconds() - cpu;
        let (statements_after, rows_after, opened_after) = queries.now();
        pass_queries.push((statements_after - statements, rows_after - rows));
        connections_opened += opened_after - opened;
    }
    let mut sent = 0;
    while requeued.try_recv().is_ok() {
        sent += 1;
    }
    let hwm = status_kib("VmHWM");
    drop(writer);
    let passes_f = passes.max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    pass_wall.sort_unstable();
    stream_wall.sort_unstable();
    let all_compared = records.iter().all(|&r| r == n);
    let all_streamed = streamed.iter().all(|&r| r == n);
    let one_query = pass_queries.iter().all(|&(q, r)| q == 1 && r == n as u64);
    let (most_queries, _) = pass_queries.iter().copied().max().unwrap_or_default();
    format!(
        "RESULT n={n} passes={passes} one_query={one_query} most_queries={most_queries} connections_opened={connections_opened} first_ms={:.1} pass_p50_ms={:.1} pass_min_ms={:.1} pass_max_ms={:.1} pass_cpu_ms={:.1} stream_p50_ms={:.1} stream_min_ms={:.1} stream_cpu_ms={:.1} records={} all_compared={all_compared} all_streamed={all_streamed} revoked={revoked} requeued={} errors={errors} api_connections={} rss_start_kib={rss_start} rss_caches_kib={rss_caches} hwm_kib={hwm}",
        ms(first),
        ms(percentile(&pass_wall, 0.5)),
        ms(pass_wall[0]),
        ms(*pass_wall.last().expect("passes")),
        pass_cpu * 1000.0 / passes_f,
        ms(percentile(&stream_wall, 0.5)),
        ms(stream_wall[0]),
        stream_cpu * 1000.0 / passes_f,
        records.first().copied().unwrap_or(0),
        requeued_reported.max(sent),
        trap.connections.load(Ordering::SeqCst),
    )
}

/// Runs one (backend, N) measurement in a fresh child process.
fn run_child(url: &str, n: usize, passes: usize) -> Result<HashMap<String, String>, String> {
    let output = Command::new(std::env::current_exe().expect("this binary"))
        .args(["--child-pass", "--database-url", url])
        .args(["--keys", &n.to_string(), "--passes", &passes.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start the child: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| format!("the child printed no result ({})", output.status))?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn part_anti_entropy(args: &Args) -> (String, Vec<String>) {
    let mut s = String::new();
    let mut failures = Vec::new();
    let _ = writeln!(
        s,
        "--- anti-entropy: AntiEntropy::pass over N live records and N ApiKeys, nothing to revoke ---"
    );
    let _ = writeln!(s, "load average       {}", load_average());
    let _ = writeln!(
        s,
        "setup              records of cluster \"{CLUSTER}\" written with plain SQL after migrate(); the ApiKey reflector store and the SecretCache filled in memory through watcher events; kube Client at a loopback port that counts connections; each row a fresh child process; wall and CPU (utime+stime of the process) per pass, after one first pass; \"stream\": each_live_row alone, counting rows"
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    let mut backends: Vec<(String, String, Option<Server>)> = vec![(
        "SQLite file (WAL)".into(),
        format!("sqlite://{}", dir.path().join("anti-entropy.db").display()),
        None,
    )];
    match std::env::var("KEYWARD_BENCH_DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => {
            backends.push(("PostgreSQL (KEYWARD_BENCH_DATABASE_URL)".into(), url, None));
        }
        _ => {
            if replication::available("database bench: anti-entropy on PostgreSQL") {
                eprintln!("database bench: starting a throwaway PostgreSQL");
                let server = Server::primary(dir.path(), false);
                backends.push((
                    "PostgreSQL 15, TCP loopback, fsync off".into(),
                    server.url(),
                    Some(server),
                ));
            } else {
                let _ = writeln!(
                    s,
                    "PostgreSQL         SKIP: no PostgreSQL server binaries (see the SKIP line above)"
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "| backend | N | first pass | pass wall p50 (min–max) | pass CPU | stream wall p50 | stream CPU | judging (pass − stream, p50) | records compared | SQL statements per pass | revoked | requeued | API connections | RSS, caches built | peak RSS (VmHWM) |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(15));
    for (label, url, _server) in &backends {
        let mut filled = 0;
        for &n in &sizes {
            eprintln!("database bench: filling {label} to {n} records");
            let started = Instant::now();
            runtime().block_on(fill(url, filled, n));
            filled = n;
            eprintln!(
                "database bench: filled in {:.1} s; measuring in a child process",
                started.elapsed().as_secs_f64()
            );
            let passes = (args.passes * 100_000 / n.max(1)).min(20).max(args.passes);
            let r = match run_child(url, n, passes) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("anti-entropy {label} N={n}: {e}"));
                    continue;
                }
            };
            let f = |k: &str| -> f64 { r.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN) };
            let mib = |k: &str| f(k) / 1024.0;
            let _ = writeln!(
                s,
                "| {label} | {n} | {:.0} ms | {:.0} ms ({:.0}–{:.0}) | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {} | {} | {} | {:.1} MiB | {:.1} MiB |",
                f("first_ms"),
                f("pass_p50_ms"),
                f("pass_min_ms"),
                f("pass_max_ms"),
                f("pass_cpu_ms"),
                f("stream_p50_ms"),
                f("stream_cpu_ms"),
                f("pass_p50_ms") - f("stream_p50_ms"),
                r["records"],
                match (r["one_query"].as_str(), r["connections_opened"].as_str()) {
                    ("true", "0") => "1, streaming every row".to_owned(),
                    ("true", opened) => format!(
                        "1, streaming every row (the pool opened {opened} connection(s) in {passes} passes)"
                    ),
                    _ => format!("up to {}", r["most_queries"]),
                },
                r["revoked"],
                r["requeued"],
                r["api_connections"],
                mib("rss_caches_kib"),
                mib("hwm_kib"),
            );
            let _ = writeln!(
                s,
                "|   | ({passes} passes; RSS at start {:.1} MiB) | | | | | | | | | | | | | |",
                mib("rss_start_kib")
            );
            let mut fail =
                |why: String| failures.push(format!("anti-entropy {label} N={n}: {why}"));
            if r["all_compared"] != "true" || r["all_streamed"] != "true" {
                fail(format!("not every record compared or streamed: {r:?}"));
            }
            if r["one_query"] != "true" {
                fail(format!(
                    "a pass ran {} SQL statements (sqlx's log), or its query did not return every row; expected one streamed query",
                    r["most_queries"]
                ));
            }
            if r["revoked"] != "0" || r["requeued"] != "0" || r["errors"] != "0" {
                fail(format!(
                    "the pass revoked {}, requeued {}, failed {} times; nothing should happen",
                    r["revoked"], r["requeued"], r["errors"]
                ));
            }
            if r["api_connections"] != "0" {
                fail(format!(
                    "the pass connected to the API server {} times; it must make no request",
                    r["api_connections"]
                ));
            }
            if n == 10_000 && f("hwm_kib") > PEAK_RSS_LIMIT_KIB as f64 {
                fail(format!(
                    "peak RSS {:.1} MiB at 10,000 keys, over the 64 MiB bound",
                    mib("hwm_kib")
                ));
            }
        }
    }
    (s, failures)
}

// ---------------------------------------------------------------------------
// Keys for parts 2 and 3

/// Fresh (key id, key) pairs from a seeded factory.
fn bench_keys(seed: u64, n: usize) -> Vec<(String, PlainKey)> {
    let factory = KeyFactory::new("kw", Arc::new(SeededEntropy::new(seed))).expect("a key factory");
    (0..n)
        .map(|_| {
            let key = factory.new_key().expect("a key");
            let id = factory.new_key_id().expect("a key id");
            (id, key)
        })
        .collect()
}

/// A record as the operator writes it for key `i`.
fn record(i: usize, key_id: &str, key: &PlainKey, now: Timestamp) -> KeyRecord {
    KeyRecord {
        key_id: key_id.to_owned(),
        key_hash: key.hash(),
        key_hint: key.hint(),
        apikey_uid: format!("uid-{i}"),
        namespace: "bench".into(),
        name: format!("key-{i}"),
        metadata: KeyMetadata {
            owner: "bench@example.com".into(),
            team: "bench".into(),
            scopes: vec!["inference".into()],
        },
        state: KeyState::Pending,
        created_at: now,
        activated_at: None,
        expires_at: None,
        revoked_at: None,
        revoke_reason: None,
        issue_reason: IssueReason::Initial,
        rotation_request: None,
        cluster: CLUSTER.into(),
    }
}

/// Issues one key as the operator's issue path does: insert pending, then activate.
async fn issue_one(
    store: &SqlStore,
    i: usize,
    key_id: &str,
    key: &PlainKey,
) -> keyward::Result<()> {
    let now = Timestamp::now();
    store.insert_pending(&record(i, key_id, key, now)).await?;
    store.activate(key_id, now, None).await
}

fn settings(primary_database_url: Option<String>) -> VerifierSettings {
    VerifierSettings {
        address: "127.0.0.1:0".parse().expect("an address"),
        key_header: "x-api-key".into(),
        config: VerifierConfig::default(),
        primary_database_url,
    }
}

/// Waits until `verifier` is ready and answers VALID for every key.
async fn wait_valid(verifier: &Verifier, keys: &[(String, PlainKey)], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (_, key) in keys {
        loop {
            match verifier.check(key.expose(), &[]).await {
                Checked::Answer(v) if v.code == Code::Valid => break,
                other => assert!(
                    Instant::now() < deadline,
                    "{what}: a key not VALID after 60 s: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Part 2: revocation latency with verifiers on a streaming replica

/// How long after their first load the verifiers' steady state is measured:
/// after a load, a follower's first look waits its LISTEN-time poll (1 s)
/// even where no listener will wake it (docs/benchmarks.md).
const SETTLE: Duration = Duration::from_millis(1500);

const VERIFIERS: [&str; 3] = [
    "primary (LISTEN, 1 s poll)",
    "standby + primary URL (LISTEN on the primary, 20 ms re-poll until replayed)",
    "standby, no primary URL (250 ms poll)",
];

fn part_replica(args: &Args) -> (String, Vec<String>) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "--- replica: KeyStore::revoke on the primary until each verifier's check answers REVOKED (polled every 1 ms) ---"
    );
    if !replication::available("database bench: replica") {
        let _ = writeln!(
            s,
            "SKIP: no PostgreSQL server binaries (see the SKIP line above)"
        );
        return (s, Vec::new());
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    eprintln!("database bench: starting a primary and a streaming standby");
    let primary = Server::primary(dir.path(), false);
    let standby = Server::standby_of(&primary.address(), dir.path());
    let _ = writeln!(s, "load average       {}", load_average());
    let _ = writeln!(
        s,
        "setup              PostgreSQL 15 primary + hot standby (pg_basebackup -R, asynchronous streaming, TCP loopback, fsync off); {} + 1 keys issued on the primary through SqlStore; three verifiers by listen::start in this process, each with its own pool; one revocation right after their first load, the others from 1.5 s after it; a random 0–250 ms pause before each revoke; times from the start of revoke (its commit included)",
        args.revocations
    );
    let rt = runtime();
    let (section, failures) = rt.block_on(measure_replica(args, &primary, &standby));
    rt.shutdown_background();
    s.push_str(&section);
    let _ = writeln!(
        s,
        "replay lag at the end (replication::replay_lag): {} B",
        replication::replay_lag(&primary, &standby)
    );
    (s, failures)
}

/// What one revocation measured, each from the start of `revoke`.
struct Revocation {
    commit: Duration,
    replayed: Duration,
    /// Bytes of WAL the standby had not replayed at the first look after the commit.
    behind: i64,
    /// Per verifier: when it refused the key, and how, if not as REVOKED.
    refused: [(Duration, Option<String>); 3],
}

/// Revokes `id` on the primary and polls every verifier's check every 1 ms
/// until each refuses the key (at most 30 s each); the standby's replay is
/// timed beside them.
async fn revoke_once(
    writer: &SqlStore,
    verifiers: &[Arc<Verifier>],
    pools: (&sqlx::PgPool, &sqlx::PgPool),
    (id, key): &(String, PlainKey),
    failures: &mut Vec<String>,
) -> Revocation {
    for (verifier, label) in verifiers.iter().zip(VERIFIERS) {
        match verifier.check(key.expose(), &[]).await {
            Checked::Answer(v) if v.code == Code::Valid => {}
            other => panic!("{label}: a key was not VALID before its revocation: {other:?}"),
        }
    }
    let started = Instant::now();
    writer
        .revoke(id, RevokeReason::Deleted, Timestamp::now())
        .await
        .expect("revoke");
    let commit = started.elapsed();
    let replay = tokio::spawn(replay_time(pools.0.clone(), pools.1.clone(), started));
    let mut done: [Option<(Duration, Option<String>)>; 3] = Default::default();
    while done.iter().any(Option::is_none) {
        for (j, verifier) in verifiers.iter().enumerate() {
            if done[j].is_some() {
                continue;
            }
            match verifier.check(key.expose(), &[]).await {
                Checked::Answer(v) if v.code == Code::Valid => {}
                Checked::Answer(v) if v.code == Code::Revoked => {
                    done[j] = Some((started.elapsed(), None));
                }
                // Fail-closed in another way: counted as refused, and reported.
                other => done[j] = Some((started.elapsed(), Some(format!("{other:?}")))),
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            for (j, slot) in done.iter_mut().enumerate() {
                if slot.is_none() {
                    failures.push(format!(
                        "replica: {}: {id} still VALID 30 s after its revocation",
                        VERIFIERS[j]
                    ));
                    *slot = Some((started.elapsed(), Some("still VALID after 30 s".into())));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (replayed, behind) = replay.await.expect("the replay task");
    Revocation {
        commit,
        replayed,
        behind,
        refused: done.map(|slot| slot.expect("set above")),
    }
}

async fn measure_replica(args: &Args, primary: &Server, standby: &Server) -> (String, Vec<String>) {
    use rand::{Rng, SeedableRng};
    let mut s = String::new();
    let mut failures = Vec::new();
    let (primary_url, standby_url) = (primary.url(), standby.url());
    let writer = SqlStore::connect(&primary_url)
        .await
        .expect("the primary")
        .with_cluster(CLUSTER);
    writer.migrate().await.expect("migrations");
    // One more key than measured: the first is revoked right after the start.
    let keys = bench_keys(SEED, args.revocations + 1);
    for (i, (id, key)) in keys.iter().enumerate() {
        issue_one(&writer, i, id, key).await.expect("a key issued");
    }
    // Replay measured beside the verifiers, on connections of its own.
    let primary_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&primary_url)
        .await
        .expect("the primary");
    let standby_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&standby_url)
        .await
        .expect("the standby");
    let pools = (&primary_pool, &standby_pool);
    let mut verifiers = Vec::new();
    for (url, primary_database_url) in [
        (&primary_url, None),
        (&standby_url, Some(primary_url.clone())),
        (&standby_url, None),
    ] {
        let store = Arc::new(SqlStore::connect_lazy(url).expect("a pool"));
        let (verifier, _) = start(
            store,
            url,
            settings(primary_database_url),
            Arc::new(Metrics::default()),
        )
        .await
        .expect("a verifier starts");
        verifiers.push(verifier);
    }
    for (verifier, label) in verifiers.iter().zip(VERIFIERS) {
        wait_valid(verifier, &keys, label).await;
    }
    // Right after the start: every verifier has loaded, none has looked again yet.
    let first = revoke_once(&writer, &verifiers, pools, &keys[0], &mut failures).await;
    // Then the steady state, from SETTLE after the first load.
    tokio::time::sleep(SETTLE).await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut commits = Vec::new();
    let mut replays = Vec::new();
    let mut lag_bytes = Vec::new();
    let mut refused: [Vec<Duration>; 3] = Default::default();
    let mut odd: [Vec<String>; 3] = Default::default();
    eprintln!("database bench: {} revocations", args.revocations);
    for pair in &keys[1..] {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        let r = revoke_once(&writer, &verifiers, pools, pair, &mut failures).await;
        commits.push(r.commit);
        replays.push(r.replayed);
        lag_bytes.push(r.behind);
        for (j, (at, how)) in r.refused.into_iter().enumerate() {
            refused[j].push(at);
            odd[j].extend(how);
        }
    }
    let replay_p99 = {
        let mut sorted = replays.clone();
        sorted.sort_unstable();
        percentile(&sorted, 0.99)
    };
    let bound = Duration::from_secs(1) + replay_p99;
    let _ = writeln!(
        s,
        "| | p50 | p90 | p99 | max | n | within 1 s + replay p99 ({:.0} ms)? |",
        ms(bound)
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    let _ = writeln!(
        s,
        "| revoke committed on the primary | {} | |",
        row(&commits)
    );
    let _ = writeln!(
        s,
        "| standby replayed the revocation (pg_last_wal_replay_lsn ≥ the primary's LSN after the commit, polled every 1 ms) | {} | |",
        row(&replays)
    );
    for (j, label) in VERIFIERS.iter().enumerate() {
        let mut sorted = refused[j].clone();
        sorted.sort_unstable();
        let p99 = percentile(&sorted, 0.99);
        let within = p99 <= bound;
        let _ = writeln!(
            s,
            "| **{label}** refused | {} | {} |",
            row(&refused[j]),
            if within { "yes" } else { "**no**" }
        );
        if !within {
            failures.push(format!(
                "replica: {label}: p99 {:.1} ms over the bound {:.1} ms (1 s + replay p99)",
                ms(p99),
                ms(bound)
            ));
        }
        if !odd[j].is_empty() {
            let _ = writeln!(
                s,
                "|   {label}: {} answers neither VALID nor REVOKED, e.g. {} | | | | | | |",
                odd[j].len(),
                odd[j][0]
            );
        }
    }
    lag_bytes.sort_unstable();
    let _ = writeln!(
        s,
        "replay lag sampled right after each commit (bytes of the primary's WAL the standby had not replayed, as replication::replay_lag computes it): p50 {} B, p99 {} B, max {} B",
        percentile(&lag_bytes, 0.5),
        percentile(&lag_bytes, 0.99),
        lag_bytes.last().copied().unwrap_or(0),
    );
    let _ = writeln!(
        s,
        "the first revocation, right after the verifiers' first load (not in the table): {}; replayed after {:.1} ms",
        first
            .refused
            .iter()
            .zip(VERIFIERS)
            .map(|((at, how), label)| format!(
                "{label} {:.1} ms{}",
                ms(*at),
                how.as_deref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        ms(first.replayed),
    );
    writer.close().await;
    (s, failures)
}

/// From `started` (the revoke's start), how long until the standby replayed
/// the primary's WAL as of just after the commit; and how many bytes behind
/// it was at the first look.
async fn replay_time(
    primary: sqlx::PgPool,
    standby: sqlx::PgPool,
    started: Instant,
) -> (Duration, i64) {
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&primary)
        .await
        .expect("the primary's LSN");
    let mut first = None;
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT greatest(pg_wal_lsn_diff($1::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint",
        )
        .bind(&lsn)
        .fetch_one(&standby)
        .await
        .expect("the standby's replay position");
        let first = *first.get_or_insert(behind);
        if behind == 0 {
            return (started.elapsed(), first);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the standby did not replay in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------------------
// Part 3: failover

/// What one failover measured, each from the kill.
struct FailoverRun {
    killed: Duration,
    promoted: Duration,
    retargeted: Duration,
    writer: Duration,
    writer_attempts: usize,
    writer_error: String,
    verifier: Duration,
    history_resets: u64,
    listener_reconnects: u64,
    old_key_checks: usize,
    old_key_not_valid: usize,
}

fn part_failover(args: &Args) -> (String, Vec<String>) {
    let mut s = String::new();
    let mut failures = Vec::new();
    let _ = writeln!(
        s,
        "--- failover: kill the primary, promote the standby, retarget the Service proxy; seconds from the kill ---"
    );
    if !replication::available("database bench: failover") {
        let _ = writeln!(
            s,
            "SKIP: no PostgreSQL server binaries (see the SKIP line above)"
        );
        return (s, failures);
    }
    let _ = writeln!(s, "load average       {}", load_average());
    let _ = writeln!(
        s,
        "setup              PostgreSQL 15 primary + asynchronous hot standby on loopback (fsync off), a TcpProxy in front of the primary as the Service address; the writer (SqlStore::connect_lazy, the operator's default pool: 8 connections, 5 s acquire timeout) and a verifier (listen::start, no primary URL) both on the proxy URL; 10 keys issued and replayed before the kill, which comes 0.5 s plus a random 0–1 s after the verifier's first load; a fresh key tried every 50 ms once the primary is gone; the verifier polled every 1 ms (its key set's change number, then check); fresh servers per run"
    );
    let mut runs = Vec::new();
    for run in 0..args.failovers {
        let dir = tempfile::tempdir().expect("a temp dir");
        eprintln!("database bench: failover {}/{}", run + 1, args.failovers);
        let primary = Arc::new(Server::primary(dir.path(), false));
        let standby = Arc::new(Server::standby_of(&primary.address(), dir.path()));
        let proxy = Arc::new(TcpProxy::start(&primary.address()));
        let rt = runtime();
        let outcome = rt.block_on(failover_once(
            run,
            primary.clone(),
            standby.clone(),
            proxy.clone(),
        ));
        // Ends the verifier's tasks and the pools before the servers go.
        rt.shutdown_background();
        drop(proxy);
        drop(standby);
        drop(primary);
        match outcome {
            Ok(r) => runs.push(r),
            Err(e) => failures.push(format!("failover run {}: {e}", run + 1)),
        }
    }
    let _ = writeln!(
        s,
        "| run | primary killed | standby promoted | proxy retargeted | (a) writer issued a key | attempts | (b) verifier VALID from memory | history resets | listener reconnects | old key during failover |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(10));
    let sec = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | **{}** | {} | **{}** | {} | {} | VALID {}/{} |",
            i + 1,
            sec(r.killed),
            sec(r.promoted),
            sec(r.retargeted),
            sec(r.writer),
            r.writer_attempts,
            sec(r.verifier),
            r.history_resets,
            r.listener_reconnects,
            r.old_key_checks - r.old_key_not_valid,
            r.old_key_checks,
        );
    }
    if !runs.is_empty() {
        let median = |f: &dyn Fn(&FailoverRun) -> Duration| {
            let mut v: Vec<Duration> = runs.iter().map(f).collect();
            v.sort_unstable();
            v[(v.len() - 1) / 2]
        };
        let _ = writeln!(
            s,
            "| median | {} | {} | {} | **{}** | | **{}** | | | |",
            sec(median(&|r| r.killed)),
            sec(median(&|r| r.promoted)),
            sec(median(&|r| r.retargeted)),
            sec(median(&|r| r.writer)),
            sec(median(&|r| r.verifier)),
        );
        let _ = writeln!(
            s,
            "| median after the retarget | | | | {} | | {} | | | |",
            sec(median(&|r| r.writer.saturating_sub(r.retargeted))),
            sec(median(&|r| r.verifier.saturating_sub(r.retargeted))),
        );
        for (i, r) in runs.iter().enumerate() {
            if !r.writer_error.is_empty() {
                let _ = writeln!(
                    s,
                    "run {}: the writer's last error before it succeeded: {}",
                    i + 1,
                    r.writer_error
                );
            }
            if r.old_key_not_valid > 0 {
                failures.push(format!(
                    "failover run {}: an existing key was not VALID in {} of {} checks during the failover",
                    i + 1,
                    r.old_key_not_valid,
                    r.old_key_checks
                ));
            }
        }
    }
    (s, failures)
}

/// Sum of the verifier's database fallbacks, whatever their outcome.
fn fallbacks(metrics: &Metrics) -> u64 {
    [
        "found",
        "unknown",
        "cached",
        "shed",
        "error",
        "timeout",
        "unreachable",
    ]
    .iter()
    .map(|&outcome| {
        metrics
            .verifier_fallbacks
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    })
    .sum()
}

async fn failover_once(
    run: usize,
    primary: Arc<Server>,
    standby: Arc<Server>,
    proxy: Arc<TcpProxy>,
) -> Result<FailoverRun, String> {
    const PATIENCE: Duration = Duration::from_secs(120);
    let url = proxy.url();
    let writer = SqlStore::connect_lazy(&url)
        .expect("a pool")
        .with_cluster(CLUSTER);
    writer.migrate().await.expect("migrations");
    let keys = bench_keys(SEED, 10);
    for (i, (id, key)) in keys.iter().enumerate() {
        issue_one(&writer, i, id, key).await.expect("a key issued");
    }
    let metrics = Arc::new(Metrics::default());
    let (verifier, _) = start(
        Arc::new(SqlStore::connect_lazy(&url).expect("a pool")),
        &url,
        settings(None),
        metrics.clone(),
    )
    .await
    .expect("a verifier starts");
    wait_valid(&verifier, &keys, "failover verifier").await;
    {
        let (primary, standby) = (primary.clone(), standby.clone());
        tokio::task::spawn_blocking(move || replication::wait_replayed(&primary, &standby))
            .await
            .expect("replayed");
    }
    // Let the verifier's listener settle on its connection, then de-phase
    // the kill from the verifier's 1 s poll (a fixed pause would lock onto it).
    let pause = {
        use rand::{Rng, SeedableRng};
        rand::rngs::StdRng::seed_from_u64(SEED + run as u64).random_range(0..1000)
    };
    tokio::time::sleep(Duration::from_millis(500 + pause)).await;
    let resets_before = metrics.verifier_history_resets.get();
    let reconnects_before = metrics.verifier_listener_reconnects.get();

    // The clock starts at the kill; the writer starts once the primary is
    // gone (`pg_ctl stop -m immediate` returned), so that no write can land
    // on the old primary; promotion and retargeting go on beside it.
    let t0 = Instant::now();
    let killed = {
        let primary = primary.clone();
        tokio::task::spawn_blocking(move || {
            primary.kill();
            t0.elapsed()
        })
        .await
        .map_err(|e| format!("the kill: {e}"))?
    };
    let failover = {
        let (standby, proxy) = (standby.clone(), proxy.clone());
        tokio::task::spawn_blocking(move || {
            standby.promote();
            let promoted = t0.elapsed();
            proxy.retarget(&standby.address());
            (promoted, t0.elapsed())
        })
    };
    // An existing key is checked every 10 ms throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (verifier, stop) = (verifier.clone(), stop.clone());
        let old = keys[0].1.expose().to_owned();
        tokio::spawn(async move {
            let (mut checks, mut not_valid) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                checks += 1;
                match verifier.check(&old, &[]).await {
                    Checked::Answer(v) if v.code == Code::Valid => {}
                    _ => not_valid += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (checks, not_valid)
        })
    };

    let fresh = bench_keys(SEED + 1 + run as u64, 1000);
    let mut attempts = 0;
    let mut last_error = String::new();
    let (written, new_id, new_key) = loop {
        let (id, key) = &fresh[attempts % fresh.len()];
        attempts += 1;
        match issue_one(&writer, 1000 + attempts, id, key).await {
            Ok(()) => break (t0.elapsed(), id.clone(), key),
            Err(e) => last_error = e.to_string(),
        }
        if t0.elapsed() > PATIENCE {
            stop.store(true, Ordering::SeqCst);
            return Err(format!(
                "the writer issued no key within {PATIENCE:?} of the kill ({attempts} attempts; last error: {last_error})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (promoted, retargeted) = failover.await.map_err(|e| format!("the failover: {e}"))?;

    // The change number of the new key's activation, read on the new primary.
    let mut direct = sqlx::PgConnection::connect(&standby.url())
        .await
        .map_err(|e| format!("the new primary: {e}"))?;
    let seq: i64 = sqlx::query_scalar("SELECT change_seq FROM api_keys WHERE key_id = $1")
        .bind(&new_id)
        .fetch_one(&mut direct)
        .await
        .map_err(|e| format!("the new key's change number: {e}"))?;
    let answered = loop {
        if verifier.position().is_some_and(|(at, _)| at >= seq) {
            let before = fallbacks(&metrics);
            let checked = verifier.check(new_key.expose(), &[]).await;
            if matches!(&checked, Checked::Answer(v) if v.code == Code::Valid)
                && fallbacks(&metrics) == before
            {
                break t0.elapsed();
            }
        }
        if t0.elapsed() > PATIENCE {
            stop.store(true, Ordering::SeqCst);
            return Err(format!(
                "the verifier did not answer VALID from memory for the new key within {PATIENCE:?} of the kill (its position {:?}, the key's change {seq}, history resets {}, listener reconnects {})",
                verifier.position(),
                metrics.verifier_history_resets.get() - resets_before,
                metrics.verifier_listener_reconnects.get() - reconnects_before,
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    stop.store(true, Ordering::SeqCst);
    let (old_key_checks, old_key_not_valid) = watcher.await.map_err(|e| e.to_string())?;
    let _ = direct.close().await;
    writer.close().await;
    Ok(FailoverRun {
        killed,
        promoted,
        retargeted,
        writer: written,
        writer_attempts: attempts,
        writer_error: last_error,
        verifier: answered,
        history_resets: metrics.verifier_history_resets.get() - resets_before,
        listener_reconnects: metrics.verifier_listener_reconnects.get() - reconnects_before,
        old_key_checks,
        old_key_not_valid,
    })
}

// ---------------------------------------------------------------------------
// Part 4: concurrent key writes, and what the change number's lock costs

/// How a write takes its change number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Numbering {
    /// `SqlStore` as shipped: stamped by the last statement before the commit.
    Shipped,
    /// Taken by the first statement, as before issue 15: the counter row stays
    /// locked for the whole transaction.
    First,
    /// `nextval` of a sequence, no lock: not in commit order, so a follower can
    /// skip a change. An upper bound, not an option.
    Unordered,
}

impl Numbering {
    const ALL: [Numbering; 3] = [Numbering::Shipped, Numbering::First, Numbering::Unordered];

    fn label(self) -> &'static str {
        match self {
            Numbering::Shipped => "as shipped: stamped last",
            Numbering::First => "taken first (before)",
            Numbering::Unordered => "sequence, no lock (unsafe)",
        }
    }
}

fn part_writers(args: &Args) -> (String, Vec<String>) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "--- writers: {} concurrent writers issuing {} keys (insert pending + activate, two transactions each) ---",
        args.writers, args.writer_keys
    );
    if !replication::available("database bench: writers") {
        let _ = writeln!(
            s,
            "SKIP: no PostgreSQL server binaries (see the SKIP line above)"
        );
        return (s, Vec::new());
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = Server::primary(dir.path(), false);
    let _ = writeln!(s, "load average       {}", load_average());
    let _ = writeln!(
        s,
        "setup              PostgreSQL 15 on TCP loopback, one database; each way issues its keys into emptied tables; two rounds in alternating order"
    );
    let _ = writeln!(
        s,
        "fsync  numbering                     | round | transactions/s | p50 | p99 per transaction"
    );
    let rt = runtime();
    for fsync in ["off", "on"] {
        server.sql(&format!("ALTER SYSTEM SET fsync = {fsync}"));
        server.sql("SELECT pg_reload_conf()");
        for round in 0..2 {
            let mut order = Numbering::ALL.to_vec();
            if round == 1 {
                order.reverse();
            }
            for numbering in order {
                let (rate, p50, p99) = rt.block_on(write_keys(args, &server, numbering));
                let line = format!(
                    "{fsync:<6} {:<29} | {} | {rate:>8.0} | {:.2} ms | {:.2} ms",
                    numbering.label(),
                    round + 1,
                    ms(p50),
                    ms(p99)
                );
                eprintln!("database bench: writers: {line}");
                let _ = writeln!(s, "{line}");
            }
        }
    }
    rt.shutdown_background();
    (s, Vec::new())
}

/// Issues `args.writer_keys` keys with `args.writers` writers; the rate of
/// transactions and their p50 and p99.
async fn write_keys(
    args: &Args,
    server: &Server,
    numbering: Numbering,
) -> (f64, Duration, Duration) {
    let store = SqlStore::connect(&server.url()).await.expect("connect");
    store.migrate().await.expect("migrate");
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(u32::try_from(args.writers).unwrap_or(8))
        .connect(&server.url())
        .await
        .expect("a pool");
    for sql in [
        "TRUNCATE api_keys, key_audit",
        "CREATE SEQUENCE IF NOT EXISTS bench_unordered_change",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    let keys = Arc::new(bench_keys(SEED + 100, args.writer_keys));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.writers)
        .map(|_| {
            let (store, pool, keys, next) =
                (store.clone(), pool.clone(), keys.clone(), next.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key_id, key)) = keys.get(i) else {
                        return times;
                    };
                    let now = Timestamp::now();
                    let record = record(i, key_id, key, now);
                    let t = Instant::now();
                    match numbering {
                        Numbering::Shipped => store.insert_pending(&record).await.expect("insert"),
                        _ => raw_write(&pool, numbering, Some(&record), key_id).await,
                    }
                    times.push(t.elapsed());
                    let t = Instant::now();
                    match numbering {
                        Numbering::Shipped => {
                            store.activate(key_id, now, None).await.expect("activate")
                        }
                        _ => raw_write(&pool, numbering, None, key_id).await,
                    }
                    times.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut times = Vec::new();
    for worker in workers {
        times.extend(worker.await.expect("a writer"));
    }
    let elapsed = started.elapsed();
    times.sort_unstable();
    let rate = times.len() as f64 / elapsed.as_secs_f64();
    (rate, percentile(&times, 0.5), percentile(&times, 0.99))
}

/// `SqlStore::insert_pending` (with `record`) or `activate`, statement for
/// statement, with the change number taken as `numbering` says.
async fn raw_write(
    pool: &sqlx::AnyPool,
    numbering: Numbering,
    record: Option<&KeyRecord>,
    key_id: &str,
) {
    use sqlx::Row as _;
    let mut tx = pool.begin().await.expect("begin");
    let change: Option<i64> = match numbering {
        Numbering::First => {
            let change: i64 = sqlx::query(
                "UPDATE key_change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq",
            )
            .fetch_one(&mut *tx)
            .await
            .expect("counter")
            .get("seq");
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(keyward::store::CHANGE_CHANNEL)
                .bind(change.to_string())
                .execute(&mut *tx)
                .await
                .expect("notify");
            Some(change)
        }
        _ => None,
    };
    let change_seq = match change {
        Some(n) => n.to_string(),
        None => "nextval('bench_unordered_change')".to_owned(),
    };
    let (action, detail) = match record {
        Some(record) => {
            let insert = format!(
                "INSERT INTO api_keys (key_id, key_hash, key_hint, apikey_uid, namespace, name, owner, team, scopes, state, created_at, issue_reason, rotation_request, change_seq, cluster) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, $12, {change_seq}, $13)"
            );
            sqlx::query(sqlx::AssertSqlSafe(insert))
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
                .bind(CLUSTER)
                .execute(&mut *tx)
                .await
                .expect("insert");
            (
                "issued",
                format!("issued for {}/{} (initial)", record.namespace, record.name),
            )
        }
        None => {
            let update = format!(
                "UPDATE api_keys SET state = 'active', activated_at = $2, expires_at = NULL, change_seq = {change_seq} WHERE key_id = $1 AND state = 'pending' AND cluster = $3"
            );
            sqlx::query(sqlx::AssertSqlSafe(update))
                .bind(key_id)
                .bind(Timestamp::now().as_millisecond())
                .bind(CLUSTER)
                .execute(&mut *tx)
                .await
                .expect("activate");
            ("activated", "key confirmed in its Secret".to_owned())
        }
    };
    sqlx::query(
        "INSERT INTO key_audit (key_id, at, action, detail, cluster) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(key_id)
    .bind(Timestamp::now().as_millisecond())
    .bind(action)
    .bind(detail)
    .bind(CLUSTER)
    .execute(&mut *tx)
    .await
    .expect("audit");
    if numbering == Numbering::Unordered {
        sqlx::query("SELECT pg_notify($1, 'unordered')")
            .bind(keyward::store::CHANGE_CHANNEL)
            .execute(&mut *tx)
            .await
            .expect("notify");
    }
    tx.commit().await.expect("commit");
}

// ---------------------------------------------------------------------------
// Figures and the machine

fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "p50 | p90 | p99 | max | n" of `samples`, in milliseconds.
fn row(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    format!(
        "{:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {}",
        ms(percentile(&sorted, 0.5)),
        ms(percentile(&sorted, 0.9)),
        ms(percentile(&sorted, 0.99)),
        ms(sorted.last().copied().unwrap_or_default()),
        sorted.len()
    )
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

/// A `kB` field of /proc/self/status, e.g. `VmHWM` (peak RSS) or `VmRSS`.
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
