//! The fleet scale benchmark against a real API server (issue 9).
//!
//! It starts a throwaway etcd and kube-apiserver the way the cluster tests do
//! (`$KUBEBUILDER_ASSETS`, default /usr/local/kubebuilder/bin), creates N
//! ApiKeys while the operator is stopped, then starts the release `keyward run`
//! and times it until every ApiKey is Ready. In the same run it measures:
//!
//! - a same-work baseline on the same API server (issue 15): 16 connections
//!   making keyward's own four writes per key (a merge patch of the object's
//!   metadata, a Secret POST, a status server-side apply, an Event POST) on
//!   copies of the ApiKeys under a copy of the CRD in another group, which
//!   nothing else watches; the operator's rate is read against it, so the ratio
//!   leaves out what the API server's CRD writes cost and shows what the
//!   operator itself leaves on the table;
//! - the raw floor beside it: the same connections making three writes per
//!   object (one create, two merge patches) on ConfigMaps;
//! - the requests each key cost, counted by the API server itself
//!   (`apiserver_request_total`), since that is what a cluster pays for;
//! - a restart over the settled fleet: what it sends until it goes idle, and
//!   when that is, since every restart and failover pays it;
//! - CPU seconds per process in each phase, to tell waiting from working and to
//!   show when something else on the machine competed for the cores;
//! - with `--usage`, a day of usage counts for every key written after the
//!   restart, and the operator's status writes and peak RSS until every
//!   ApiKey shows them (issue 16).
//!
//! Run: `cargo bench --bench scale -- --keys 1000 --database sqlite`
//! (`-- --help` lists the options). Figures and their meaning are in
//! docs/benchmarks.md.

// Shared with the cluster tests; this bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/cluster/harness.rs"]
mod harness;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use futures::{StreamExt, stream};
use harness::{Cluster, OPERATOR, Postgres};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Secret},
    events::v1::Event,
};
use kube::{
    Api, Client, Config,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Deserialize;
use serde_json::json;

/// Resources keyward reads or writes. Requests on any other resource come from
/// the API server's own controllers (its identity lease and the like).
const KEYWARD_RESOURCES: [&str; 4] = ["apikeys", "secrets", "events", "customresourcedefinitions"];
/// Verbs that change state, as `apiserver_request_total` names them.
const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
/// The namespace of the floor's ConfigMaps; the ApiKeys live in `scale-0`….
const FLOOR_NAMESPACE: &str = "scale-floor";
/// The group of the baseline's copy of the ApiKey CRD.
const BASELINE_GROUP: &str = "baseline.keyward.dev";
/// The baseline's field manager for its status applies.
const BASELINE_MANAGER: &str = "scale-baseline";
/// How often the API server's counters are scraped while waiting for quiet.
const SCRAPE_EVERY: Duration = Duration::from_millis(500);
/// No request on keyward's resources for this long counts as idle.
const QUIET: Duration = Duration::from_secs(3);
/// The shortest pause between two Ready polls of the cold start.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How often the operator's VmRSS is sampled during the cold start.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The longest a restart may take to go idle before the bench gives up waiting.
const RESTART_LIMIT: Duration = Duration::from_secs(600);

/// Key database of the operator under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Database {
    /// An SQLite file in the run's temp dir (the operator's default kind).
    Sqlite,
    /// A throwaway PostgreSQL on a unix socket (scripts/pg; fsync off).
    Postgres,
}

/// Options; `cargo bench` appends `--bench`, which is not one of them.
#[derive(Debug, Parser)]
#[command(about = "keyward's fleet scale benchmark against a real kube-apiserver")]
struct Args {
    /// ApiKeys to create before the operator starts.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// The operator's key database.
    #[arg(long, value_enum, default_value_t = Database::Sqlite)]
    database: Database,
    /// The operator's `--max-concurrent-reconciles`.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// The operator's `--max-issues-per-second`; `default` leaves the flag off,
    /// so the operator's own default limit applies.
    #[arg(long, default_value = "0", value_parser = issue_limit)]
    max_issues_per_second: IssueLimit,
    /// Namespaces the ApiKeys are spread across.
    #[arg(long, default_value_t = 4)]
    namespaces: usize,
    /// ApiKeyPolicies (each selecting every namespace, allowing every key) to
    /// check each key against.
    #[arg(long, default_value_t = 0)]
    policies: usize,
    /// Connections (each a client of its own, one request at a time) of the
    /// same-work baseline and of the floor.
    #[arg(long, default_value_t = 16)]
    floor_connections: usize,
    /// Create requests in flight while setting up the ApiKeys.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Seconds to watch the API server at least after restarting over the
    /// settled fleet; then until keyward's resources are quiet (at most 10 min).
    #[arg(long, default_value_t = 30)]
    restart_window: u64,
    /// Seconds the cold start may take; default 120 plus 0.2 per key.
    #[arg(long)]
    timeout: Option<u64>,
    /// `RUST_LOG` of the operator.
    #[arg(long, default_value = "info")]
    rust_log: String,
    /// After the restart, write 24 hours of usage counts for every key into
    /// the key database, as verifiers would flush them, and wait until every
    /// ApiKey shows them in `status.usage` (issue 16): the operator's reads
    /// and status writes at this fleet size, and its peak RSS with them.
    #[arg(long)]
    usage: bool,
}

/// The issue rate limit to run the operator with.
#[derive(Clone, Debug)]
enum IssueLimit {
    /// Leave `--max-issues-per-second` off.
    OperatorDefault,
    /// Pass this value (0: no limit).
    PerSecond(String),
}

fn issue_limit(value: &str) -> Result<IssueLimit, String> {
    if value == "default" {
        return Ok(IssueLimit::OperatorDefault);
    }
    match value.parse::<f64>() {
        Ok(rate) if rate >= 0.0 => Ok(IssueLimit::PerSecond(value.to_owned())),
        _ => Err("a number of keys per second (0: no limit) or `default`".to_owned()),
    }
}

fn main() {
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    // `cargo test --all-targets` runs bench binaries too, without `--bench`;
    // a run of minutes does not belong there.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("SKIP: scale bench: run it with `cargo bench --bench scale`");
        return;
    }
    if let Some(missing) = missing_prerequisite(&args) {
        eprintln!("SKIP: scale bench: {missing}");
        return;
    }
    let machine = Machine::describe();
    eprintln!("scale: starting etcd and kube-apiserver");
    let Some(cluster) = Cluster::start("scale bench") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime.block_on(run(&args, &cluster, machine));
    print!("{report}");
}

/// What keeps the bench from running, said so that the reader can fix it.
fn missing_prerequisite(args: &Args) -> Option<String> {
    if std::env::var_os("KEYWARD_E2E_KUBECONFIG").is_some() {
        return Some(
            "KEYWARD_E2E_KUBECONFIG is set, but this bench needs an API server of its own: \
             it leaves thousands of objects behind and reads the server's request counters, \
             which other clients would skew. Unset it."
                .into(),
        );
    }
    let assets = PathBuf::from(
        std::env::var("KUBEBUILDER_ASSETS").unwrap_or_else(|_| "/usr/local/kubebuilder/bin".into()),
    );
    let absent: Vec<&str> = ["etcd", "kube-apiserver"]
        .into_iter()
        .filter(|b| !assets.join(b).is_file())
        .collect();
    if !absent.is_empty() {
        return Some(format!(
            "no {} in {}. Put the envtest binaries there or point KUBEBUILDER_ASSETS at them, \
             e.g. KUBEBUILDER_ASSETS=$(setup-envtest use -p path 1.28.x)",
            absent.join(" or "),
            assets.display()
        ));
    }
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs("kubectl", "version") && !runs("kubectl", "help") {
        return Some(
            "kubectl is not on PATH (the harness uses it to wait for the API server)".into(),
        );
    }
    if !runs("openssl", "version") {
        return Some(
            "openssl is not on PATH (it makes the API server's service account key)".into(),
        );
    }
    if args.database == Database::Postgres && !initdb_exists() {
        return Some(
            "--database postgres needs the PostgreSQL server binaries (initdb, pg_ctl) on PATH \
             or in /usr/lib/postgresql/*/bin"
                .into(),
        );
    }
    None
}

fn initdb_exists() -> bool {
    Command::new("sh")
        .args([
            "-c",
            "command -v initdb || ls /usr/lib/postgresql/*/bin/initdb",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs every phase and returns what was measured.
async fn run(args: &Args, cluster: &Cluster, machine: Machine) -> Report {
    let client = client(&cluster.kubeconfig).await;
    let server_version = server_version(&client).await;
    install_crd(cluster);
    create_namespaces(&client, args.namespaces).await;
    create_policies(cluster, args.policies);

    eprintln!("scale: creating {} ApiKeys", args.keys);
    let started = Instant::now();
    create_api_keys(
        &client,
        &api_key_resource(),
        args.keys,
        args.namespaces,
        args.setup_concurrency,
    )
    .await;
    let setup = started.elapsed();
    eprintln!("scale: creating {} baseline copies", args.keys);
    let baseline_resource = install_baseline_crd(cluster);
    create_api_keys(
        &client,
        &baseline_resource,
        args.keys,
        args.namespaces,
        args.setup_concurrency,
    )
    .await;

    eprintln!("scale: floor, {} ConfigMaps", args.keys);
    let apiserver = child_pid("kube-apiserver");
    let server_pids = [
        ("kube-apiserver", apiserver),
        ("etcd", child_pid("etcd")),
        ("bench", Some(std::process::id())),
    ];
    eprintln!("scale: same-work baseline, {} copies", args.keys);
    let cpu_before = Cpu::sample(&server_pids);
    let before = scrape(&client).await;
    let baseline_time = baseline(
        &cluster.kubeconfig,
        &baseline_resource,
        args.floor_connections,
        args.keys,
        args.namespaces,
    )
    .await;
    let baseline_cpu = Cpu::sample(&server_pids).since(&cpu_before, baseline_time);
    let baseline_requests = scrape(&client).await.since(&before);

    let cpu_before = Cpu::sample(&server_pids);
    let before = scrape(&client).await;
    let floor_time = floor(&cluster.kubeconfig, args.floor_connections, args.keys).await;
    let floor_cpu = Cpu::sample(&server_pids).since(&cpu_before, floor_time);
    let floor_requests = scrape(&client).await.since(&before);

    let postgres;
    let (database_url, database) = match args.database {
        Database::Sqlite => (
            format!("sqlite://{}", cluster.dir.path().join("keys.db").display()),
            "SQLite file",
        ),
        Database::Postgres => {
            postgres = Postgres::start(cluster.dir.path());
            (
                postgres.url.clone(),
                "PostgreSQL (throwaway, unix socket, fsync=off; its CPU counts under other processes)",
            )
        }
    };
    let mut operator_flags = vec![
        "--max-concurrent-reconciles".to_owned(),
        args.concurrency.to_string(),
    ];
    if let IssueLimit::PerSecond(rate) = &args.max_issues_per_second {
        operator_flags.extend(["--max-issues-per-second".to_owned(), rate.clone()]);
    }
    let flags: Vec<&str> = operator_flags.iter().map(String::as_str).collect();

    eprintln!("scale: cold start");
    let timeout = Duration::from_secs(args.timeout.unwrap_or(120 + args.keys as u64 / 5));
    let before = scrape(&client).await;
    let operator = cluster.operator(&database_url, &flags, &args.rust_log);
    let started = Instant::now();
    let pids = with_operator(server_pids, &operator);
    let cpu_before = Cpu::sample(&pids);
    let cold = wait_all_ready(&client, args.keys, started, timeout, &operator).await;
    let cold_cpu = Cpu::sample(&pids).since(&cpu_before, cold.elapsed);
    let peak_rss = status_kib(operator.process.0.id(), "VmHWM:");
    let settled = observe(&client, Duration::ZERO, Duration::from_secs(60)).await;
    let mut cold_requests = settled.counters.since(&before);
    // The bench's own Ready polls are LISTs of apikeys too; they are not the operator's.
    if let Some(own) = cold_requests.requests.get_mut(&RequestKey::list_apikeys()) {
        *own -= cold.polls as f64;
    }
    let secrets = managed_secrets(&client).await;
    let (stop_code, _) = operator.stop();

    eprintln!("scale: restart over the settled fleet");
    let before = scrape(&client).await;
    let operator = cluster.operator(&database_url, &flags, &args.rust_log);
    let pids = with_operator(server_pids, &operator);
    let cpu_before = Cpu::sample(&pids);
    let window = Duration::from_secs(args.restart_window);
    let restart = observe(&client, window, RESTART_LIMIT).await;
    let restart_cpu = Cpu::sample(&pids).since(&cpu_before, restart.elapsed);
    let restart_requests = restart.counters.since(&before);
    let restart_peak_rss = status_kib(operator.process.0.id(), "VmHWM:");
    let usage = if args.usage {
        eprintln!("scale: usage counts for every key");
        Some(usage_phase(&client, &database_url, args.keys, &operator, pids).await)
    } else {
        None
    };
    drop(operator);
    let poll_cost = poll_cost(&client, apiserver).await;

    Report {
        machine,
        server_version,
        keys: args.keys,
        namespaces: args.namespaces,
        policies: args.policies,
        database,
        operator: format!(
            "keyward run {} (RUST_LOG={}, admin credentials)",
            operator_flags.join(" "),
            args.rust_log
        ),
        setup,
        setup_concurrency: args.setup_concurrency,
        floor_connections: args.floor_connections,
        baseline_time,
        baseline_cpu,
        baseline_requests,
        floor_time,
        floor_cpu,
        floor_requests,
        cold,
        cold_cpu,
        peak_rss,
        settled_after: settled.last_change,
        cold_requests,
        secrets,
        stop_code,
        restart,
        restart_cpu,
        restart_requests,
        restart_peak_rss,
        usage,
        poll_cost,
    }
}

/// The processes whose CPU is counted, with the operator just started.
fn with_operator(
    server: [(&'static str, Option<u32>); 3],
    operator: &harness::Operator,
) -> [(&'static str, Option<u32>); 4] {
    let [apiserver, etcd, bench] = server;
    [
        apiserver,
        etcd,
        bench,
        ("operator", Some(operator.process.0.id())),
    ]
}

/// Everything one run measured; its Display is the summary block.
struct Report {
    machine: Machine,
    server_version: String,
    keys: usize,
    namespaces: usize,
    policies: usize,
    database: &'static str,
    operator: String,
    setup: Duration,
    setup_concurrency: usize,
    floor_connections: usize,
    baseline_time: Duration,
    baseline_cpu: CpuUse,
    baseline_requests: Scrape,
    floor_time: Duration,
    floor_cpu: CpuUse,
    floor_requests: Scrape,
    cold: ColdStart,
    cold_cpu: CpuUse,
    peak_rss: Option<u64>,
    /// When keyward's resources last saw a request after the last Ready.
    settled_after: Option<Duration>,
    cold_requests: Scrape,
    secrets: usize,
    stop_code: Option<i32>,
    restart: Observation,
    restart_cpu: CpuUse,
    restart_requests: Scrape,
    restart_peak_rss: Option<u64>,
    usage: Option<UsagePhase>,
    /// Wall time and kube-apiserver CPU seconds of one Ready poll.
    poll_cost: (Duration, Option<f64>),
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys as f64;
        let cold = &self.cold;
        let keys_per_second = keys / cold.elapsed.as_secs_f64();
        let floor_objects = keys / self.floor_time.as_secs_f64();
        let baseline_objects = keys / self.baseline_time.as_secs_f64();
        writeln!(f, "=== keyward scale benchmark ===")?;
        writeln!(f, "machine            {}", self.machine)?;
        writeln!(
            f,
            "API server         kube-apiserver {} with etcd, loopback",
            self.server_version
        )?;
        writeln!(
            f,
            "keys               {} ApiKeys in {} namespaces, {} ApiKeyPolicies",
            self.keys, self.namespaces, self.policies
        )?;
        writeln!(f, "database           {}", self.database)?;
        writeln!(f, "operator           {}", self.operator)?;
        writeln!(
            f,
            "setup              {} ApiKeys created in {:.1} s ({} in flight)",
            self.keys,
            self.setup.as_secs_f64(),
            self.setup_concurrency
        )?;
        let settled = self.settled_after.map_or_else(
            || "no request on keyward's resources after the last Ready".to_owned(),
            |t| {
                format!(
                    "last request on keyward's resources {:.1} s after the last Ready",
                    t.as_secs_f64()
                )
            },
        );
        writeln!(
            f,
            "cold start         all {} Ready after {:.1} s: {keys_per_second:.1} keys/s (the poll before, at {:.1} s, saw {}; first Ready after {:.1} s; {settled})",
            self.keys,
            cold.elapsed.as_secs_f64(),
            cold.before_last.0.as_secs_f64(),
            cold.before_last.1,
            cold.first_ready.as_secs_f64(),
        )?;
        writeln!(
            f,
            "same-work baseline {} connections, keyward's 4 writes per key on a copy of the CRD ({BASELINE_GROUP}): {baseline_objects:.1} keys/s ({:.1} s)",
            self.floor_connections,
            self.baseline_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "baseline, per write {}",
            server_time(&self.baseline_requests, |key| key.group == BASELINE_GROUP
                || (key.group.is_empty() && key.resource == "secrets")
                || key.resource == "events")
        )?;
        writeln!(
            f,
            "ratio              operator / same-work baseline = {:.2}x (keys/s over keys/s)",
            keys_per_second / baseline_objects
        )?;
        writeln!(
            f,
            "floor              {} connections, 3 writes per object: {:.0} writes/s, {floor_objects:.0} objects/s ({:.1} s)",
            self.floor_connections,
            3.0 * floor_objects,
            self.floor_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "floor, per write   {}",
            server_time(&self.floor_requests, |key| key.resource == "configmaps")
        )?;
        writeln!(
            f,
            "raw ratio          operator / floor = {:.2}x (keys/s over objects/s)",
            keys_per_second / floor_objects
        )?;
        writeln!(
            f,
            "peak RSS           {} (VmHWM at the last Ready); VmRSS sampled every 0.5 s: max {}",
            mib(self.peak_rss),
            mib(cold.max_rss_kib)
        )?;
        writeln!(
            f,
            "Secrets            {} managed by keyward; the first operator exited with {:?} on SIGTERM",
            self.secrets, self.stop_code
        )?;
        let (poll_wall, poll_cpu) = self.poll_cost;
        let poll_cpu = poll_cpu.map_or_else(
            || "unknown kube-apiserver CPU".to_owned(),
            |c| {
                format!(
                    "{:.0} ms of kube-apiserver CPU, {:.1} CPU-s for all of them",
                    c * 1000.0,
                    c * cold.polls as f64
                )
            },
        );
        writeln!(
            f,
            "Ready polls        {} during the cold start; on the settled fleet one takes {:.0} ms and {poll_cpu}",
            cold.polls,
            poll_wall.as_secs_f64() * 1000.0,
        )?;
        writeln!(f, "CPU, baseline      {}", self.baseline_cpu)?;
        writeln!(f, "CPU, floor         {}", self.floor_cpu)?;
        writeln!(f, "CPU, cold start    {}", self.cold_cpu)?;
        writeln!(
            f,
            "CPU per object     baseline: {}; floor: {}; cold start, per key: {}",
            self.baseline_cpu.per(self.keys),
            self.floor_cpu.per(self.keys),
            self.cold_cpu.per(self.keys)
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "requests per key, cold start (apiserver_request_total after quiet minus before; the bench's {} Ready polls removed from the count, not from server ms)",
            cold.polls
        )?;
        write_table(f, &self.cold_requests, keys)?;
        writeln!(f)?;
        let restart = &self.restart;
        let idle = match restart.last_change {
            None => "no request on keyward's resources".to_owned(),
            Some(_) if !restart.quiet => {
                format!("still busy after {:.0} s", restart.elapsed.as_secs_f64())
            }
            Some(t) => format!(
                "idle {:.1} s after start (its last request on keyward's resources)",
                t.as_secs_f64()
            ),
        };
        writeln!(
            f,
            "restart over the settled fleet: requests in the {:.0} s after start; {idle}; peak RSS {}",
            restart.elapsed.as_secs_f64(),
            mib(self.restart_peak_rss)
        )?;
        write_table(f, &self.restart_requests, keys)?;
        writeln!(f, "CPU, restart       {}", self.restart_cpu)?;
        if let Some(usage) = &self.usage {
            writeln!(f)?;
            writeln!(
                f,
                "usage: {} count rows for every key written in {:.1} s (as verifier flushes); all {} ApiKeys showed them in status.usage {:.1} s later ({} Requests-24h polls); the operator's peak RSS (VmHWM, whole process since its restart) {}; VmRSS sampled every 0.5 s while waiting: max {}",
                usage.rows,
                usage.written_in.as_secs_f64(),
                usage.shown,
                usage.elapsed.as_secs_f64(),
                usage.polls,
                mib(usage.peak_rss),
                mib(usage.max_rss_kib),
            )?;
            writeln!(f, "RSS, usage         {}", usage.timeline.join("; "))?;
            writeln!(f, "CPU, usage         {}", usage.cpu)?;
            write_table(f, &usage.requests, keys)?;
        }
        Ok(())
    }
}

/// The usage phase: what the operator did with a fleet's usage counts.
struct UsagePhase {
    /// Count rows written (every key, 24 hours).
    rows: usize,
    written_in: Duration,
    /// From the last count written until every ApiKey showed its usage.
    elapsed: Duration,
    shown: usize,
    polls: usize,
    max_rss_kib: Option<u64>,
    peak_rss: Option<u64>,
    /// At each poll: seconds since the counts were written, ApiKeys showing
    /// them, and the operator's VmRSS.
    timeline: Vec<String>,
    cpu: CpuUse,
    requests: Scrape,
}

/// Count rows each key gets: 24 hours of valid checks, and insufficient-scope
/// checks in the current hour.
const USAGE_HOURS: i64 = 24;

/// Writes usage for every live key through `SqlStore::record_usage` (what a
/// verifier's flush calls), in parts of about 1,000 rows, then waits until
/// every ApiKey's `Requests-24h` column shows it, sampling the operator's RSS.
async fn usage_phase(
    client: &Client,
    database_url: &str,
    keys: usize,
    operator: &harness::Operator,
    pids: [(&'static str, Option<u32>); 4],
) -> UsagePhase {
    use keyward::{
        usage::{Outcome, UsageBatch, UsageCount},
        verifier::KeySource,
    };
    let store = keyward::store::SqlStore::connect(database_url)
        .await
        .expect("the key database");
    let mut ids: Vec<std::sync::Arc<str>> = Vec::new();
    KeySource::live_keys(&store, &mut |record| ids.push(record.key_id.into()))
        .await
        .expect("the live keys");
    let now = jiff::Timestamp::now();
    let hour = |back: i64| {
        let at = now - jiff::SignedDuration::from_hours(back);
        jiff::Timestamp::from_second(keyward::usage::hour_start(at)).expect("an hour")
    };
    let before = scrape(client).await;
    let pid = operator.process.0.id();
    let cpu_before = Cpu::sample(&pids);
    let started = Instant::now();
    let mut rows = 0;
    for part in ids.chunks(1_000 / (USAGE_HOURS as usize + 1)) {
        let mut batch = UsageBatch::default();
        for id in part {
            batch.last_used.push((id.clone(), now));
            for back in 0..USAGE_HOURS {
                batch.counts.push(UsageCount {
                    key_id: id.clone(),
                    hour: hour(back),
                    outcome: Outcome::Valid,
                    count: 10,
                });
            }
            batch.counts.push(UsageCount {
                key_id: id.clone(),
                hour: hour(0),
                outcome: Outcome::InsufficientScope,
                count: 1,
            });
        }
        rows += batch.counts.len();
        store
            .record_usage(&batch, now)
            .await
            .expect("usage recorded");
    }
    let written_in = started.elapsed();
    let started = Instant::now();
    let mut max_rss_kib = None;
    let mut polls = 0;
    let mut timeline = Vec::new();
    let mut next_poll = Instant::now();
    let shown = loop {
        max_rss_kib = max_rss_kib.max(status_kib(pid, "VmRSS:"));
        if Instant::now() >= next_poll {
            let shown = requests_shown(client).await;
            polls += 1;
            timeline.push(format!(
                "{:.0} s: {shown} shown, {}",
                started.elapsed().as_secs_f64(),
                mib(status_kib(pid, "VmRSS:"))
            ));
            if shown >= keys {
                break shown;
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "only {shown} of {keys} ApiKeys showed their usage after 15 minutes"
            );
            next_poll = Instant::now() + Duration::from_secs(5);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    };
    let elapsed = started.elapsed();
    let cpu = Cpu::sample(&pids).since(&cpu_before, written_in + elapsed);
    UsagePhase {
        rows,
        written_in,
        elapsed,
        shown,
        polls,
        max_rss_kib,
        peak_rss: status_kib(pid, "VmHWM:"),
        timeline,
        cpu,
        requests: scrape(client).await.since(&before),
    }
}

/// How many ApiKeys show requests in their `Requests-24h` column.
async fn requests_shown(client: &Client) -> usize {
    let table = apikey_table(client).await;
    let column = table
        .column_definitions
        .iter()
        .position(|c| c.name == "Requests-24h")
        .expect("the ApiKey CRD's Requests-24h printer column");
    table
        .rows
        .iter()
        .filter(|row| row.cells.get(column).and_then(|c| c.as_u64()) > Some(0))
        .count()
}

async fn client(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("the harness's kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config from the kubeconfig");
    Client::try_from(config).expect("a kube client")
}

async fn server_version(client: &Client) -> String {
    client
        .apiserver_version()
        .await
        .map_or_else(|e| format!("(version unknown: {e})"), |v| v.git_version)
}

/// `keyward crd | kubectl apply --server-side -f -`, then waits until both are served.
fn install_crd(cluster: &Cluster) {
    let crd = Command::new(OPERATOR)
        .arg("crd")
        .output()
        .expect("keyward crd");
    assert!(crd.status.success(), "keyward crd failed");
    let yaml = String::from_utf8(crd.stdout).expect("the CRD is UTF-8");
    cluster
        .try_kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(&yaml))
        .unwrap_or_else(|e| panic!("applying the CRD failed: {e}"));
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/apikeys.keyward.dev",
        "crd/apikeypolicies.keyward.dev",
        "--timeout=60s",
    ]);
}

/// `count` ApiKeyPolicies that select every namespace and allow the bench's
/// keys, so every reconcile checks each rule kind (team, scope wildcard, owner
/// pattern) against all of them.
fn create_policies(cluster: &Cluster, count: usize) {
    for i in 0..count {
        cluster.apply(&format!(
            "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {{name: bench-{i}}}\nspec:\n  namespaceSelector: {{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: Exists}}]}}\n  teams: {{allowed: [bench, other]}}\n  scopes: {{allowed: [inference, \"models:*\"]}}\n  owner: {{pattern: '.+@example\\.com'}}\n"
        ));
    }
}

async fn create_namespaces(client: &Client, count: usize) {
    let api: Api<Namespace> = Api::all(client.clone());
    let names = (0..count)
        .map(|i| format!("scale-{i}"))
        .chain([FLOOR_NAMESPACE.to_owned()]);
    for name in names {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("a Namespace");
        api.create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    }
}

fn api_key_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keyward.dev", "v1alpha1", "ApiKey"),
        "apikeys",
    )
}

/// Creates `count` ApiKeys (of `resource`'s group) round-robin across the
/// namespaces, `in_flight` at a time. Written as plain JSON, so the bench
/// measures the binary without depending on the crate's Rust types.
async fn create_api_keys(
    client: &Client,
    resource: &ApiResource,
    count: usize,
    namespaces: usize,
    in_flight: usize,
) {
    stream::iter(0..count)
        .map(|i| {
            let namespace = format!("scale-{}", i % namespaces);
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, resource);
            let key: DynamicObject = serde_json::from_value(json!({
                "apiVersion": resource.api_version,
                "kind": "ApiKey",
                "metadata": {"name": format!("key-{i:05}"), "namespace": namespace},
                "spec": {"owner": "bench@example.com", "team": "bench", "scopes": ["inference"]},
            }))
            .expect("an ApiKey");
            async move { create_with_retry(&api, &key).await }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
}

/// Creates an object, retrying briefly: a CRD that was just Established can
/// still answer 404 for a moment, and a create whose response was lost shows up
/// as AlreadyExists on the retry.
async fn create_with_retry(api: &Api<DynamicObject>, object: &DynamicObject) {
    for attempt in 1..=10 {
        match api.create(&PostParams::default(), object).await {
            Ok(_) => return,
            Err(kube::Error::Api(status)) if status.code == 409 => return,
            Err(e) if attempt < 10 => {
                eprintln!("scale: create retry {attempt}: {e}");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => panic!("creating an ApiKey failed 10 times: {e}"),
        }
    }
}

/// Applies a copy of the ApiKey CRD under [`BASELINE_GROUP`], the same
/// schema, CEL rules and printer columns, and waits until it is served.
fn install_baseline_crd(cluster: &Cluster) -> ApiResource {
    let crd = Command::new(OPERATOR)
        .args(["crd", "apikey"])
        .output()
        .expect("keyward crd apikey");
    assert!(crd.status.success(), "keyward crd apikey failed");
    let yaml = String::from_utf8(crd.stdout)
        .expect("the CRD is UTF-8")
        .replace(
            "name: apikeys.keyward.dev",
            &format!("name: apikeys.{BASELINE_GROUP}"),
        )
        .replace("group: keyward.dev", &format!("group: {BASELINE_GROUP}"));
    cluster
        .try_kubectl_with_input(&["apply", "--server-side", "-f", "-"], Some(&yaml))
        .unwrap_or_else(|e| panic!("applying the baseline CRD failed: {e}"));
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/apikeys.{BASELINE_GROUP}"),
        "--timeout=60s",
    ]);
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(BASELINE_GROUP, "v1alpha1", "ApiKey"),
        "apikeys",
    )
}

/// Runs `work` for objects `0..count` on `connections` workers, each with a
/// client (and so an HTTP/1.1 connection) of its own and one request at a
/// time; returns the time it took, the clients' set-up left out.
async fn spread<F, Fut>(kubeconfig: &Path, connections: usize, count: usize, work: F) -> Duration
where
    F: Fn(Client, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(client(kubeconfig).await);
    }
    let started = Instant::now();
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(worker, client)| {
            let work = work.clone();
            tokio::spawn(async move {
                for i in (worker..count).step_by(connections) {
                    work(client.clone(), i).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a worker");
    }
    started.elapsed()
}

/// The same-work baseline: keyward's four writes for each of `count` copies,
/// spread over `connections` workers.
async fn baseline(
    kubeconfig: &Path,
    resource: &ApiResource,
    connections: usize,
    count: usize,
    namespaces: usize,
) -> Duration {
    let resource = resource.clone();
    spread(kubeconfig, connections, count, move |client, i| {
        let resource = resource.clone();
        async move { baseline_key(&client, &resource, i, namespaces).await }
    })
    .await
}

/// keyward's writes for one new key, in its order and shapes: the finalizer
/// and key-id annotation (merge patch), the Secret with its owner reference
/// (create), the status (server-side apply) and the `Issued` Event.
async fn baseline_key(client: &Client, resource: &ApiResource, i: usize, namespaces: usize) {
    let namespace = format!("scale-{}", i % namespaces);
    let name = format!("key-{i:05}");
    let key_id = format!("kid_{i:016}");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, resource);
    let metadata = json!({"metadata": {
        "finalizers": ["keyward.dev/revoke"],
        "annotations": {"keyward.dev/key-id": key_id},
    }});
    let object = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(metadata))
        .await
        .expect("baseline metadata patch");
    let uid = object.metadata.uid.clone().expect("a uid");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{name}-baseline"),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "keyward-baseline"},
            "annotations": {"keyward.dev/key-id": key_id},
            "ownerReferences": [{
                "apiVersion": resource.api_version, "kind": "ApiKey", "name": name,
                "uid": uid, "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "type": "Opaque",
        "data": {"api-key": "a3dfMDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6QUJDREVGR0g="},
    }))
    .expect("a Secret");
    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("baseline Secret create");
    let now = jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .expect("a time");
    let status = json!({
        "apiVersion": resource.api_version,
        "kind": "ApiKey",
        "status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Issued",
                "message": "the key is in its Secret", "lastTransitionTime": now.to_string(),
                "observedGeneration": object.metadata.generation,
            }],
            "observedGeneration": object.metadata.generation,
            "keyId": key_id,
            "keyHint": "kw_0…FGH",
            "secretName": format!("{name}-baseline"),
            "issuedAt": now.to_string(),
            "revision": 1,
            "secretResourceVersion": secret.metadata.resource_version,
        },
    });
    api.patch_status(
        &name,
        &PatchParams::apply(BASELINE_MANAGER).force(),
        &Patch::Apply(status),
    )
    .await
    .expect("baseline status apply");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}.issued"), "namespace": namespace},
        "eventTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        "reportingController": "keyward.dev/baseline",
        "reportingInstance": "scale-baseline",
        "action": "Issue",
        "reason": "Issued",
        "note": format!("issued key {key_id} into Secret {name}-baseline"),
        "type": "Normal",
        "regarding": {
            "apiVersion": resource.api_version, "kind": "ApiKey", "name": name,
            "namespace": namespace, "uid": uid,
        },
    }))
    .expect("an Event");
    Api::<Event>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &event)
        .await
        .expect("baseline Event create");
}

/// The bare-client floor: one create and two merge patches per ConfigMap,
/// about what a key needs at least (the Secret, the status, the finalizer),
/// spread over `connections` workers.
async fn floor(kubeconfig: &Path, connections: usize, count: usize) -> Duration {
    spread(kubeconfig, connections, count, floor_object).await
}

/// The requests `shown` picks, by verb, with the API server's mean time for
/// each, to set beside the operator's in the tables.
fn server_time(scrape: &Scrape, shown: impl Fn(&RequestKey) -> bool) -> String {
    scrape
        .requests
        .iter()
        .filter(|(k, _)| shown(k))
        .map(|(key, count)| {
            let mean = scrape.mean_seconds(key).unwrap_or(0.0);
            let resource = if key.subresource.is_empty() {
                key.resource.clone()
            } else {
                format!("{}/{}", key.resource, key.subresource)
            };
            format!(
                "{} {resource} {}: {count:.0} at {:.1} ms",
                key.verb,
                key.code,
                mean * 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The floor's three writes for ConfigMap `i`.
async fn floor_object(client: Client, i: usize) {
    let api: Api<ConfigMap> = Api::namespaced(client, FLOOR_NAMESPACE);
    let params = PatchParams::default();
    let name = format!("floor-{i:05}");
    let map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("a ConfigMap");
    api.create(&PostParams::default(), &map)
        .await
        .expect("floor create");
    let data = json!({"data": {"api-key": "kw_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH"}});
    api.patch(&name, &params, &Patch::Merge(data))
        .await
        .expect("floor patch");
    let annotation =
        json!({"metadata": {"annotations": {"keyward.dev/key-id": format!("{i:032x}")}}});
    api.patch(&name, &params, &Patch::Merge(annotation))
        .await
        .expect("floor patch");
}

/// One row of a Table response: the printer columns of one ApiKey.
#[derive(Deserialize)]
struct TableRow {
    cells: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct TableColumn {
    name: String,
}

/// `meta.k8s.io/v1` Table: the ApiKeys' printer columns (Ready, Reason) without
/// the objects, so that polling 10,000 keys stays cheap for both sides.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Table {
    column_definitions: Vec<TableColumn>,
    #[serde(default)]
    rows: Vec<TableRow>,
}

/// What the cold start took.
struct ColdStart {
    /// When a poll first saw every ApiKey Ready.
    elapsed: Duration,
    /// The poll before that one: when, and how many it saw Ready, which bounds
    /// the error of `elapsed`.
    before_last: (Duration, usize),
    first_ready: Duration,
    polls: usize,
    max_rss_kib: Option<u64>,
}

/// Polls one LIST of all ApiKeys until `count` are Ready=True, timed from the
/// operator's start, and samples the operator's VmRSS every 500 ms. A poll of
/// 10,000 keys costs the API server about 0.2 CPU-s, which the operator would
/// compete for on a small machine, so the gap between polls is 20 times a
/// poll's duration (polls take at most 5% of the time; the end is seen within
/// 5%), shrinking to half the estimated time left, but not below 4 times a
/// poll's duration, as the end nears. Panics after `timeout` with what is not
/// Ready.
async fn wait_all_ready(
    client: &Client,
    count: usize,
    started: Instant,
    timeout: Duration,
    operator: &harness::Operator,
) -> ColdStart {
    let pid = operator.process.0.id();
    let mut first_ready = None;
    let mut polls = 0;
    let mut max_rss_kib = None;
    let mut last_report = Instant::now();
    let mut next_poll = Instant::now();
    let mut previous = (Instant::now(), 0);
    loop {
        max_rss_kib = max_rss_kib.max(status_kib(pid, "VmRSS:"));
        if Instant::now() >= next_poll {
            let poll_started = Instant::now();
            let Readiness { ready, waiting } = readiness(client).await;
            polls += 1;
            if ready > 0 && first_ready.is_none() {
                first_ready = Some(started.elapsed());
            }
            if ready >= count {
                let (then, ready_then) = previous;
                return ColdStart {
                    elapsed: started.elapsed(),
                    before_last: (then.saturating_duration_since(started), ready_then),
                    first_ready: first_ready.unwrap_or_default(),
                    polls,
                    max_rss_kib,
                };
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                eprintln!(
                    "scale: {ready}/{count} Ready after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            if started.elapsed() > timeout {
                let log = operator.log_text();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "only {ready} of {count} ApiKeys Ready after {timeout:?}; the others: {waiting:?}\noperator log, last lines first:\n{}",
                    tail.join("\n")
                );
            }
            let (then, ready_then) = previous;
            let gained = ready.saturating_sub(ready_then);
            let left = if gained == 0 {
                Duration::ZERO
            } else {
                then.elapsed()
                    .mul_f64((count - ready) as f64 / gained as f64)
            };
            let took = poll_started.elapsed();
            let gap = (left / 2).clamp((took * 4).max(POLL_EVERY), (took * 20).max(POLL_EVERY));
            next_poll = poll_started + gap;
            previous = (poll_started, ready);
        }
        let until_poll = next_poll.saturating_duration_since(Instant::now());
        tokio::time::sleep(until_poll.min(SAMPLE_EVERY)).await;
    }
}

/// How many ApiKeys are Ready, and why the others are not (by Ready reason).
struct Readiness {
    ready: usize,
    waiting: BTreeMap<String, usize>,
}

/// One LIST of every ApiKey, as a Table of printer columns.
async fn apikey_table(client: &Client) -> Table {
    let request = hyper::Request::get(
        "/apis/keyward.dev/v1alpha1/apikeys?includeObject=None&resourceVersion=0",
    )
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .expect("a LIST request");
    client
        .request(request)
        .await
        .expect("LIST apikeys as a Table")
}

/// How many ApiKeys are Ready, and why the others are not.
async fn readiness(client: &Client) -> Readiness {
    let table = apikey_table(client).await;
    let column = |name: &str| {
        table
            .column_definitions
            .iter()
            .position(|c| c.name == name)
            .unwrap_or_else(|| panic!("the ApiKey CRD has no {name} printer column"))
    };
    let (ready_column, reason_column) = (column("Ready"), column("Reason"));
    let mut readiness = Readiness {
        ready: 0,
        waiting: BTreeMap::new(),
    };
    for row in &table.rows {
        if row.cells.get(ready_column).and_then(|c| c.as_str()) == Some("True") {
            readiness.ready += 1;
        } else {
            let reason = row
                .cells
                .get(reason_column)
                .and_then(|c| c.as_str())
                .filter(|r| !r.is_empty())
                .unwrap_or("no status yet");
            *readiness.waiting.entry(reason.to_owned()).or_default() += 1;
        }
    }
    readiness
}

/// What one Ready poll costs: wall time and kube-apiserver CPU, averaged over
/// ten polls of the settled fleet while nothing else runs, so the summary can
/// say how much of the API server the bench itself took during the cold start.
async fn poll_cost(client: &Client, apiserver: Option<u32>) -> (Duration, Option<f64>) {
    const POLLS: u32 = 10;
    let cpu_before = apiserver.and_then(process_cpu_seconds);
    let started = Instant::now();
    for _ in 0..POLLS {
        readiness(client).await;
    }
    let wall = started.elapsed() / POLLS;
    let cpu_after = apiserver.and_then(process_cpu_seconds);
    let cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| (after - before) / f64::from(POLLS));
    (wall, cpu)
}

/// The Secrets that carry keyward's managed-by label, as a check that every
/// Ready key has its Secret.
async fn managed_secrets(client: &Client) -> usize {
    let api: Api<Secret> = Api::all(client.clone());
    let params = ListParams::default().labels("app.kubernetes.io/managed-by=keyward");
    api.list_metadata(&params)
        .await
        .expect("LIST secrets")
        .items
        .len()
}

/// One `apiserver_request_total` series, summed over the labels that do not
/// matter here (component, scope, version, dry run).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RequestKey {
    verb: String,
    group: String,
    resource: String,
    subresource: String,
    code: String,
}

impl RequestKey {
    fn list_apikeys() -> RequestKey {
        RequestKey {
            verb: "LIST".into(),
            group: "keyward.dev".into(),
            resource: "apikeys".into(),
            subresource: String::new(),
            code: "200".into(),
        }
    }

    fn is_keyward(&self) -> bool {
        KEYWARD_RESOURCES.contains(&self.resource.as_str())
    }

    fn is_write(&self) -> bool {
        WRITE_VERBS.contains(&self.verb.as_str())
    }
}

type Counters = BTreeMap<RequestKey, f64>;

/// What the API server counted: requests by series (`apiserver_request_total`),
/// and the seconds spent serving them with the count of requests timed
/// (`apiserver_request_duration_seconds`, keyed without the code), which shows
/// where the server's time goes.
#[derive(Default)]
struct Scrape {
    requests: Counters,
    seconds: Counters,
    timed: Counters,
}

impl Scrape {
    /// The requests and seconds between two scrapes, only the series that grew.
    fn since(&self, earlier: &Scrape) -> Scrape {
        let grown = |after: &Counters, before: &Counters| -> Counters {
            after
                .iter()
                .filter_map(|(key, value)| {
                    let grown = value - before.get(key).copied().unwrap_or(0.0);
                    (grown > 0.0).then(|| (key.clone(), grown))
                })
                .collect()
        };
        Scrape {
            requests: grown(&self.requests, &earlier.requests),
            seconds: grown(&self.seconds, &earlier.seconds),
            timed: grown(&self.timed, &earlier.timed),
        }
    }

    /// Requests on keyward's resources, of any verb and code.
    fn keyward_total(&self) -> f64 {
        self.requests
            .iter()
            .filter(|(k, _)| k.is_keyward())
            .map(|(_, v)| v)
            .sum()
    }

    /// Mean seconds per request of the series' verb and resource (all codes,
    /// whoever sent them).
    fn mean_seconds(&self, key: &RequestKey) -> Option<f64> {
        let any_code = RequestKey {
            code: String::new(),
            ..key.clone()
        };
        let count = self.timed.get(&any_code).copied().unwrap_or(0.0);
        let seconds = self.seconds.get(&any_code)?;
        (count > 0.0).then(|| seconds / count)
    }
}

/// The API server's request counters, from its own /metrics. Requests without
/// a resource (/metrics, /healthz, discovery) are left out.
async fn scrape(client: &Client) -> Scrape {
    let request = hyper::Request::get("/metrics")
        .body(Vec::new())
        .expect("a GET request");
    let text = client.request_text(request).await.expect("GET /metrics");
    let mut scrape = Scrape::default();
    for line in text.lines() {
        let (counters, rest) = if let Some(rest) = line.strip_prefix("apiserver_request_total{") {
            (&mut scrape.requests, rest)
        } else if let Some(rest) = line.strip_prefix("apiserver_request_duration_seconds_sum{") {
            (&mut scrape.seconds, rest)
        } else if let Some(rest) = line.strip_prefix("apiserver_request_duration_seconds_count{") {
            (&mut scrape.timed, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = labels
            .split("\",")
            .filter_map(|pair| {
                let (name, value) = pair.split_once("=\"")?;
                Some((name, value.trim_end_matches('"')))
            })
            .collect();
        let label = |name: &str| labels.get(name).copied().unwrap_or_default().to_owned();
        let key = RequestKey {
            verb: label("verb"),
            group: label("group"),
            resource: label("resource"),
            subresource: label("subresource"),
            code: label("code"),
        };
        if key.resource.is_empty() {
            continue;
        }
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        *counters.entry(key).or_default() += value;
    }
    scrape
}

/// The counters at the end of an observation, how long it lasted, whether it
/// ended quiet, and when keyward's resources last saw a request (from its start).
struct Observation {
    counters: Scrape,
    elapsed: Duration,
    quiet: bool,
    last_change: Option<Duration>,
}

/// Scrapes the API server every 500 ms for at least `at_least`, then until
/// keyward's resources saw no request for [`QUIET`], or until `at_most`.
async fn observe(client: &Client, at_least: Duration, at_most: Duration) -> Observation {
    let started = Instant::now();
    let mut counters = scrape(client).await;
    let mut total = counters.keyward_total();
    let mut last_change = None;
    loop {
        let elapsed = started.elapsed();
        let quiet = elapsed.saturating_sub(last_change.unwrap_or_default()) >= QUIET;
        if (elapsed >= at_least && quiet) || elapsed >= at_most {
            return Observation {
                counters,
                elapsed,
                quiet,
                last_change,
            };
        }
        tokio::time::sleep(SCRAPE_EVERY).await;
        counters = scrape(client).await;
        let now_total = counters.keyward_total();
        if now_total > total {
            total = now_total;
            last_change = Some(started.elapsed());
        }
    }
}

/// Prints the requests as a table: per series the count, the count per key and
/// the API server's mean time per request of that verb and resource, then
/// totals for keyward's resources. Series on other resources are marked, since
/// the API server's own controllers make them.
fn write_table(w: &mut std::fmt::Formatter<'_>, scrape: &Scrape, keys: f64) -> std::fmt::Result {
    let mut rows: Vec<(&RequestKey, &f64)> = scrape.requests.iter().collect();
    rows.sort_by(|a, b| {
        b.0.is_keyward()
            .cmp(&a.0.is_keyward())
            .then(b.1.total_cmp(a.1))
    });
    writeln!(
        w,
        "  {:<8} {:<50} {:>5} {:>8} {:>8} {:>9}",
        "verb", "resource", "code", "count", "per key", "server ms"
    )?;
    for (key, count) in rows {
        let mut resource = key.resource.clone();
        if !key.subresource.is_empty() {
            resource = format!("{resource}/{}", key.subresource);
        }
        let group = if key.group.is_empty() {
            "core"
        } else {
            &key.group
        };
        let mean = scrape
            .mean_seconds(key)
            .map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s * 1000.0));
        let mark = if key.is_keyward() { "" } else { " *" };
        writeln!(
            w,
            "  {:<8} {:<50} {:>5} {count:>8.0} {:>8.3} {mean:>9}{mark}",
            key.verb,
            format!("{resource} ({group})"),
            key.code,
            count / keys
        )?;
    }
    let keyward = |pick: &dyn Fn(&RequestKey) -> bool, counters: &Counters| -> f64 {
        counters
            .iter()
            .filter(|(k, _)| k.is_keyward() && pick(k))
            .map(|(_, v)| v)
            .sum()
    };
    let all = keyward(&|_| true, &scrape.requests);
    let writes = keyward(&RequestKey::is_write, &scrape.requests);
    let gets = keyward(&|k| k.verb == "GET", &scrape.requests);
    let seconds = keyward(&|k| k.verb != "WATCH", &scrape.seconds);
    writeln!(
        w,
        "  on keyward's resources: {all:.0} requests ({:.2} per key), {writes:.0} writes ({:.2} per key), {gets:.0} GETs ({:.2} per key); {seconds:.1} s of API server time",
        all / keys,
        writes / keys,
        gets / keys
    )?;
    if scrape.requests.keys().any(|k| !k.is_keyward()) {
        writeln!(
            w,
            "  * not a resource keyward uses: the API server's own background requests"
        )?;
    }
    Ok(())
}

/// The CPU time of the machine and of the processes named, at one moment.
struct Cpu {
    machine_busy: f64,
    processes: Vec<(&'static str, f64)>,
}

impl Cpu {
    fn sample(processes: &[(&'static str, Option<u32>)]) -> Cpu {
        Cpu {
            machine_busy: machine_busy_seconds(),
            processes: processes
                .iter()
                .map(|(name, pid)| (*name, pid.and_then(process_cpu_seconds).unwrap_or(0.0)))
                .collect(),
        }
    }

    /// The CPU used between `earlier` and this sample, `wall` apart.
    fn since(&self, earlier: &Cpu, wall: Duration) -> CpuUse {
        let processes: Vec<(&'static str, f64)> = self
            .processes
            .iter()
            .zip(&earlier.processes)
            .map(|((name, now), (_, then))| (*name, now - then))
            .collect();
        let named: f64 = processes.iter().map(|(_, used)| used).sum();
        let busy = self.machine_busy - earlier.machine_busy;
        CpuUse {
            wall,
            processes,
            other: (busy - named).max(0.0),
            busy,
        }
    }
}

/// CPU seconds used in a phase: per process, by the rest of the machine (other
/// work competing for the cores), and in all.
struct CpuUse {
    wall: Duration,
    processes: Vec<(&'static str, f64)>,
    other: f64,
    busy: f64,
}

impl CpuUse {
    /// Milliseconds of CPU per object, per process: on a machine whose cores
    /// are all busy, the rate is about the cores divided by their sum.
    fn per(&self, objects: usize) -> String {
        let per = |seconds: f64| seconds * 1000.0 / objects as f64;
        let total: f64 = self.processes.iter().map(|(_, used)| used).sum();
        let parts: Vec<String> = self
            .processes
            .iter()
            .map(|(name, used)| format!("{name} {:.2}", per(*used)))
            .collect();
        format!("{} = {:.2} ms", parts.join(" + "), per(total))
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, used) in &self.processes {
            write!(f, "{name} {used:.1} s, ")?;
        }
        write!(
            f,
            "other processes {:.1} s; {:.2} of {} cores busy over {:.1} s",
            self.other,
            self.busy / self.wall.as_secs_f64(),
            cores(),
            self.wall.as_secs_f64()
        )
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
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

/// CPU seconds all cores spent not idle since boot (/proc/stat).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (ticks.iter().sum::<f64>() - idle) / clock_ticks()
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces).
fn proc_stat(pid: u32) -> Option<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    Some((name, rest.split_whitespace().map(str::to_owned).collect()))
}

/// User plus system CPU seconds of a process.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let (_, fields) = proc_stat(pid)?;
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / clock_ticks())
}

/// The pid of this process's child with that command name (the harness starts
/// etcd and kube-apiserver but does not expose their pids).
fn child_pid(name: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            proc_stat(pid)
                .is_some_and(|(command, fields)| command == name && fields.get(1) == Some(&me))
        })
}

/// A `kB` field of /proc/PID/status, e.g. `VmHWM:` (peak RSS) or `VmRSS:`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "unknown".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

/// The machine, for the summary: cores, CPU model and load at the start, since
/// figures from a busy 2-core machine read differently from an idle one.
struct Machine {
    model: String,
    load: String,
}

impl Machine {
    fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        Machine { model, load }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cores, {}; load average at start {}",
            cores(),
            self.model,
            self.load
        )
    }
}
