//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.
//! Labels carry ids, names and reasons only, never key material.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Metric, Registry},
};
use tracing::{debug, warn};

use crate::{
    Error, Result,
    key::KeyHash,
    store::{KeyMetadata, KeyRecord, KeySet, KeyStore, RevokeReason, SqlStore},
};

/// Awaits `call` and records how long it took in `histograms` under `operation`.
pub async fn timed<T>(
    histograms: &Family<OperationLabel, Histogram>,
    operation: &'static str,
    call: impl Future<Output = T>,
) -> T {
    let started = Instant::now();
    let result = call.await;
    histograms
        .get_or_create(&OperationLabel { operation })
        .observe(started.elapsed().as_secs_f64());
    result
}

/// `result` and error `category` of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok` or `error`.
    pub result: &'static str,
    /// [`Error::category`], or `none`.
    pub category: &'static str,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Issue or revoke reason as stored in the database.
    pub reason: &'static str,
}

/// A database `operation` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// The [`KeyStore`] method.
    pub operation: &'static str,
}

/// A key `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `pending`, `active`, `retiring` or `revoked`.
    pub state: String,
}

/// An ApiKey's namespace and name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiKeyLabels {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// An ApiKeyPolicy's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// The policy.
    pub policy: String,
}

/// A namespace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    /// The namespace.
    pub namespace: String,
}

/// A verifier check's protocol and result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    /// `grpc`, `http` or `json`.
    pub protocol: &'static str,
    /// The answer's code in lower case, or `unavailable`.
    pub result: &'static str,
}

/// A database fallback's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `found`, `unknown`, `cached`, `shed` or `error`.
    pub outcome: &'static str,
}

/// Every metric keyward exports.
pub struct Metrics {
    registry: Registry,
    /// Every series name `/metrics` can show, for the alerts and dashboard checks.
    series: Vec<String>,
    /// Reconciles by result and error category.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Reconcile duration.
    pub reconcile_duration: Family<ReconcileLabels, Histogram>,
    /// Keys issued, by issue reason (`scheduled`, `requested` and `emergency` are rotations).
    pub keys_issued: Family<ReasonLabel, Counter>,
    /// Keys rotated (a subset of issued).
    pub keys_rotated: Counter,
    /// Keys revoked, by revoke reason.
    pub keys_revoked: Family<ReasonLabel, Counter>,
    /// Key database call latency by operation.
    pub database_duration: Family<OperationLabel, Histogram>,
    /// Kubernetes API call latency by operation (`get_secret`, `create_secret`, `apply_status`, …).
    pub kube_duration: Family<OperationLabel, Histogram>,
    /// How long an ApiKey waited between a watch event and the start of its reconcile.
    pub queue_wait: Histogram,
    /// Keys in the database by state, refreshed on each scrape.
    pub keys_by_state: Family<StateLabel, Gauge>,
    /// Next scheduled rotation per ApiKey, as a Unix timestamp.
    pub next_rotation: Family<ApiKeyLabels, Gauge>,
    /// 1 while this replica holds the leader lease (or runs without election).
    pub leader: Gauge,
    /// ApiKeys each ApiKeyPolicy forbids, as its status last counted them.
    pub policy_violations: Family<PolicyLabel, Gauge>,
    /// Verifier checks by protocol and result.
    pub verify_total: Family<VerifyLabels, Counter>,
    /// Verifier check latency, from 10 µs.
    pub verify_duration: Family<VerifyLabels, Histogram>,
    /// Keys in the verifier's memory.
    pub verifier_keys: Gauge,
    /// The change sequence number the verifier's key set is current to.
    pub verifier_change_seq: Gauge,
    /// Seconds since the key database last answered the verifier.
    pub verifier_snapshot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Database fallbacks for keys not in memory, by outcome.
    pub verifier_fallbacks: Family<OutcomeLabel, Counter>,
    /// Reconnects of the PostgreSQL change listener.
    pub verifier_listener_reconnects: Counter,
    /// Keys whose last use and counts wait for the next flush.
    pub verifier_last_used_pending: Gauge,
    /// Last-used times that moved a key's `last_used_at` forward in the database.
    pub verifier_last_used_flushed: Counter,
    /// Checks not counted (nor their last use) because the usage tally was full.
    pub verifier_usage_dropped: Counter,
    /// Checks counted into the key database by the verifier's flushes.
    pub verifier_usage_flushed: Counter,
    /// Checks given up after a flush whose commit outcome is unknown.
    pub verifier_usage_uncertain: Counter,
    /// `RevokedKeyInUse` reports: clients presenting a revoked key of an
    /// ApiKey that still exists, by namespace.
    pub revoked_key_in_use: Family<NamespaceLabel, Counter>,
    /// Usage rows deleted past their retention.
    pub usage_rows_pruned: Counter,
    /// 1 while last-used times are not recorded (a read replica and no primary URL).
    pub verifier_last_used_disabled: Gauge,
    /// Full reloads because the change history moved backwards (a restore or failover).
    pub verifier_history_resets: Counter,
    /// Changes the primary announced that the read replica has not replayed yet.
    pub verifier_replica_behind: Gauge,
    /// Keys revoked by the anti-entropy pass, by reason (`orphaned`, `superseded`).
    pub anti_entropy_revocations: Family<ReasonLabel, Counter>,
    /// Anti-entropy passes by outcome (`ok`, `error`).
    pub anti_entropy_passes: Family<OutcomeLabel, Counter>,
    /// Live records of this cluster the last anti-entropy pass compared.
    pub anti_entropy_records: Gauge,
    /// Duration of an anti-entropy pass.
    pub anti_entropy_duration: Histogram,
    /// The `verify_total` and `verify_duration` series of each (protocol,
    /// result), looked up in their families at the first check that needs
    /// them (so `/metrics` shows only the series seen, as before), then used
    /// directly: a check costs no label hashing or family lock.
    verify_series: [[OnceLock<(Counter, Histogram)>; VERIFY_RESULTS.len()]; VERIFY_PROTOCOLS.len()],
}

/// The `protocol` label values of the verifier's checks.
const VERIFY_PROTOCOLS: [&str; 3] = ["grpc", "http", "json"];
/// The `result` label values: every code's, and `unavailable`.
const VERIFY_RESULTS: [&str; 7] = [
    "valid",
    "malformed",
    "unknown",
    "revoked",
    "expired",
    "insufficient_scope",
    "unavailable",
];

fn verify_histogram() -> Histogram {
    Histogram::new([
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
        0.25, 1.0,
    ])
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keyward");
        let metrics = Self {
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(latency_histogram),
            keys_issued: Family::default(),
            keys_rotated: Counter::default(),
            keys_revoked: Family::default(),
            database_duration: Family::new_with_constructor(latency_histogram),
            kube_duration: Family::new_with_constructor(latency_histogram),
            queue_wait: latency_histogram(),
            keys_by_state: Family::default(),
            next_rotation: Family::default(),
            leader: Gauge::default(),
            policy_violations: Family::default(),
            verify_total: Family::default(),
            verify_duration: Family::new_with_constructor(verify_histogram),
            verifier_keys: Gauge::default(),
            verifier_change_seq: Gauge::default(),
            verifier_snapshot_age: Gauge::default(),
            verifier_fallbacks: Family::default(),
            verifier_listener_reconnects: Counter::default(),
            verifier_last_used_pending: Gauge::default(),
            verifier_last_used_flushed: Counter::default(),
            verifier_usage_dropped: Counter::default(),
            verifier_usage_flushed: Counter::default(),
            verifier_usage_uncertain: Counter::default(),
            revoked_key_in_use: Family::default(),
            usage_rows_pruned: Counter::default(),
            verifier_last_used_disabled: Gauge::default(),
            verifier_history_resets: Counter::default(),
            verifier_replica_behind: Gauge::default(),
            anti_entropy_revocations: Family::default(),
            anti_entropy_passes: Family::default(),
            anti_entropy_records: Gauge::default(),
            anti_entropy_duration: latency_histogram(),
            registry: Registry::default(),
            series: Vec::new(),
            verify_series: Default::default(),
        };
        let mut series = Vec::new();
        register(
            &mut registry,
            &mut series,
            "reconciles",
            "ApiKey reconciles by result and error category",
            metrics.reconciles.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "reconcile_duration_seconds",
            "ApiKey reconcile duration",
            metrics.reconcile_duration.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "kube_request_duration_seconds",
            "Kubernetes API call latency by operation",
            metrics.kube_duration.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "reconcile_queue_wait_seconds",
            "Time from a watch event to the start of the ApiKey's reconcile",
            metrics.queue_wait.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "keys_issued",
            "Keys issued, by reason",
            metrics.keys_issued.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "keys_rotated",
            "Keys issued by a rotation",
            metrics.keys_rotated.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "keys_revoked",
            "Keys revoked, by reason",
            metrics.keys_revoked.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "database_duration_seconds",
            "Key database call latency",
            metrics.database_duration.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "keys",
            "Keys in the key database by state",
            metrics.keys_by_state.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "next_rotation_timestamp_seconds",
            "When each ApiKey rotates next",
            metrics.next_rotation.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "leader",
            "1 when this replica is the leader",
            metrics.leader.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "policy_violating_keys",
            "ApiKeys that each ApiKeyPolicy forbids",
            metrics.policy_violations.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verify",
            "Verifier checks by protocol and result",
            metrics.verify_total.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verify_duration_seconds",
            "Verifier check latency",
            metrics.verify_duration.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_keys",
            "Keys in the verifier's memory",
            metrics.verifier_keys.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_change_sequence",
            "The change number the verifier's key set is current to",
            metrics.verifier_change_seq.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_snapshot_age_seconds",
            "Seconds since the key database last answered the verifier",
            metrics.verifier_snapshot_age.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_fallbacks",
            "Database lookups for keys not in memory, by outcome",
            metrics.verifier_fallbacks.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_listener_reconnects",
            "Reconnects of the PostgreSQL change listener",
            metrics.verifier_listener_reconnects.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_last_used_pending",
            "Keys whose last use and counts wait for the next flush",
            metrics.verifier_last_used_pending.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_last_used_flushed",
            "Last-used times that moved a key's last_used_at forward in the key database",
            metrics.verifier_last_used_flushed.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_usage_dropped",
            "Checks not counted, nor their last use, because the usage tally was full",
            metrics.verifier_usage_dropped.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_usage_flushed",
            "Checks counted into the key database by the verifier's flushes",
            metrics.verifier_usage_flushed.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_usage_uncertain",
            "Checks given up after a usage flush whose commit outcome is unknown",
            metrics.verifier_usage_uncertain.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "revoked_key_in_use",
            "RevokedKeyInUse reports: clients presenting a revoked key of an ApiKey that still exists, by namespace",
            metrics.revoked_key_in_use.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "usage_rows_pruned",
            "Usage rows deleted past their retention",
            metrics.usage_rows_pruned.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_last_used_disabled",
            "1 while last-used times are not recorded (a read replica and no --primary-database-url)",
            metrics.verifier_last_used_disabled.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_history_resets",
            "Full reloads because the key database's change history moved backwards (a restore or a failover)",
            metrics.verifier_history_resets.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "verifier_replica_behind",
            "Changes the primary announced that the read replica has not replayed yet",
            metrics.verifier_replica_behind.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "anti_entropy_revocations",
            "Keys revoked by the anti-entropy pass because no ApiKey of this cluster accounts for them, by reason",
            metrics.anti_entropy_revocations.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "anti_entropy_passes",
            "Anti-entropy passes by outcome",
            metrics.anti_entropy_passes.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "anti_entropy_records",
            "Live records of this cluster that the last anti-entropy pass compared with the ApiKeys",
            metrics.anti_entropy_records.clone(),
        );
        register(
            &mut registry,
            &mut series,
            "anti_entropy_duration_seconds",
            "Duration of an anti-entropy pass",
            metrics.anti_entropy_duration.clone(),
        );
        Self {
            registry,
            series,
            ..metrics
        }
    }
}

/// Registers `metric` as `keyward_<name>` and notes the series names it shows:
/// a counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`.
fn register(
    registry: &mut Registry,
    series: &mut Vec<String>,
    name: &str,
    help: &str,
    metric: impl Metric,
) {
    let full = format!("keyward_{name}");
    match metric.metric_type() {
        MetricType::Counter => series.push(format!("{full}_total")),
        MetricType::Histogram => {
            series.extend(["_bucket", "_sum", "_count"].map(|suffix| format!("{full}{suffix}")))
        }
        _ => series.push(full),
    }
    registry.register(name, help, metric);
}

impl Metrics {
    /// Records one reconcile.
    pub fn observe_reconcile(&self, started: Instant, error: Option<&Error>) {
        let labels = ReconcileLabels {
            result: if error.is_some() { "error" } else { "ok" },
            category: error.map_or("none", Error::category),
        };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a key that became active, on the normal path or after a crash.
    pub fn count_issued(&self, reason: crate::store::IssueReason) {
        self.keys_issued
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        if reason.is_rotation() {
            self.keys_rotated.inc();
        }
    }

    /// Sets or clears an ApiKey's next rotation time.
    pub fn set_next_rotation(&self, namespace: &str, name: &str, at: Option<Timestamp>) {
        let labels = ApiKeyLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        match at {
            Some(at) => {
                self.next_rotation
                    .get_or_create(&labels)
                    .set(at.as_second());
            }
            None => {
                self.next_rotation.remove(&labels);
            }
        }
    }

    /// Counts a verifier database fallback.
    pub fn count_fallback(&self, outcome: &'static str) {
        self.verifier_fallbacks
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Records one verifier check.
    pub fn observe_verify(&self, protocol: &'static str, result: &'static str, started: Instant) {
        let labels = VerifyLabels { protocol, result };
        let family_series = || {
            (
                self.verify_total.get_or_create(&labels).clone(),
                self.verify_duration.get_or_create(&labels).clone(),
            )
        };
        let held = VERIFY_PROTOCOLS
            .iter()
            .position(|p| *p == protocol)
            .zip(VERIFY_RESULTS.iter().position(|r| *r == result))
            .map(|(p, r)| self.verify_series[p][r].get_or_init(family_series));
        let fetched;
        let (total, duration) = match held {
            Some(series) => series,
            None => {
                fetched = family_series();
                &fetched
            }
        };
        total.inc();
        duration.observe(started.elapsed().as_secs_f64());
    }

    /// Every series name `/metrics` can show, whether or not it has samples
    /// yet: what an alert or a dashboard panel may query.
    pub fn series(&self) -> &[String] {
        &self.series
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// A [`KeyStore`] that times every call into `keyward_database_duration_seconds`.
pub struct InstrumentedStore {
    /// The store doing the work.
    pub inner: Arc<dyn KeyStore>,
    /// Where latencies go.
    pub metrics: Arc<Metrics>,
}

impl InstrumentedStore {
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        timed(&self.metrics.database_duration, operation, call).await
    }
}

#[async_trait]
impl KeyStore for InstrumentedStore {
    fn cluster(&self) -> &str {
        self.inner.cluster()
    }
    async fn load(&self, apikey_uid: &str) -> Result<KeySet> {
        self.timed("load", self.inner.load(apikey_uid)).await
    }
    async fn insert_pending(&self, record: &KeyRecord) -> Result<()> {
        self.timed("insert_pending", self.inner.insert_pending(record))
            .await
    }
    async fn activate(
        &self,
        key_id: &str,
        at: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<()> {
        self.timed("activate", self.inner.activate(key_id, at, expires_at))
            .await
    }
    async fn retire(&self, key_id: &str, expires_at: Timestamp, at: Timestamp) -> Result<()> {
        self.timed("retire", self.inner.retire(key_id, expires_at, at))
            .await
    }
    async fn shorten_expiry(
        &self,
        key_id: &str,
        expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<()> {
        self.timed(
            "shorten_expiry",
            self.inner.shorten_expiry(key_id, expires_at, at),
        )
        .await
    }
    async fn update_metadata(
        &self,
        key_id: &str,
        metadata: &KeyMetadata,
        at: Timestamp,
    ) -> Result<()> {
        self.timed(
            "update_metadata",
            self.inner.update_metadata(key_id, metadata, at),
        )
        .await
    }
    async fn revoke(&self, key_id: &str, reason: RevokeReason, at: Timestamp) -> Result<()> {
        let result = self
            .timed("revoke", self.inner.revoke(key_id, reason, at))
            .await;
        if result.is_ok() {
            self.metrics
                .keys_revoked
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
        }
        result
    }
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        self.timed("find_by_hash", self.inner.find_by_hash(hash))
            .await
    }
    async fn ping(&self) -> Result<()> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn holders(&self, namespace: &str) -> Result<HashSet<String>> {
        self.timed("holders", self.inner.holders(namespace)).await
    }
    async fn used_since(&self, since: Timestamp) -> Result<Vec<(String, Timestamp)>> {
        self.timed("used_since", self.inner.used_since(since)).await
    }
}

/// What `/readyz` needs to know besides the database.
#[derive(Debug, Default)]
pub struct Health {
    /// The ApiKey watch has listed everything once.
    pub watches_synced: AtomicBool,
    /// This replica is waiting for the lease (a standby is ready to take over).
    pub standby: AtomicBool,
}

/// How long `/readyz` and `/metrics` wait for the key database. The pool's own
/// acquire timeout (5 s, spent retrying a refused connection) is longer than a
/// kubelet probe's timeout (1 s in the chart), which would then see a timeout
/// instead of the reason.
pub const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// Runs a database call for an endpoint, giving up after [`DATABASE_CHECK_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = Result<T>>) -> std::result::Result<T, String> {
    match tokio::time::timeout(DATABASE_CHECK_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            DATABASE_CHECK_TIMEOUT.as_millis()
        )),
    }
}

/// Shared state of the HTTP endpoints.
pub struct Endpoints {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// The key database, pinged by `/readyz` and counted for `keyward_keys`,
    /// each within [`DATABASE_CHECK_TIMEOUT`].
    pub store: Arc<SqlStore>,
    /// Sync and leadership flags.
    pub health: Arc<Health>,
}

impl Endpoints {
    async fn respond(&self, path: &str) -> (StatusCode, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match path {
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => {
                if let Err(why) = bounded(self.store.ping()).await {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        format!("key database unreachable: {why}\n"),
                    );
                }
                let synced = self.health.watches_synced.load(Ordering::SeqCst);
                if synced || self.health.standby.load(Ordering::SeqCst) {
                    (StatusCode::OK, TEXT, "ok\n".into())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        "watches not synced yet\n".into(),
                    )
                }
            }
            "/metrics" => {
                // Every other series is served even when the database does not
                // answer in time; `keyward_keys` is left out then, not stale.
                match bounded(self.store.count_by_state()).await {
                    Ok(counts) => {
                        for (state, count) in counts {
                            self.metrics
                                .keys_by_state
                                .get_or_create(&StateLabel { state })
                                .set(count);
                        }
                    }
                    Err(why) => {
                        self.metrics.keys_by_state.clear();
                        warn!(error = %why, "could not count keys for /metrics");
                    }
                }
                (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

/// Serves the endpoints on `address` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, endpoints: Arc<Endpoints>) -> Result<()> {
    loop {
        let (stream, peer): (_, SocketAddr) = listener
            .accept()
            .await
            .map_err(|e| Error::Config(format!("HTTP accept failed: {e}")))?;
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let endpoints = endpoints.clone();
                async move {
                    let (status, content_type, body) =
                        endpoints.respond(request.uri().path()).await;
                    let response = Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid");
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_series_are_the_families_own_and_appear_once_used() {
        let metrics = Metrics::default();
        assert!(!metrics.encode().contains("keyward_verify_total{"));
        let started = Instant::now();
        for _ in 0..2 {
            metrics.observe_verify("http", "valid", started);
        }
        metrics.observe_verify("grpc", "unavailable", started);
        // A label outside the fixed set still counts, through the family.
        metrics.observe_verify("other", "valid", started);
        let text = metrics.encode();
        for line in [
            r#"keyward_verify_total{protocol="http",result="valid"} 2"#,
            r#"keyward_verify_total{protocol="grpc",result="unavailable"} 1"#,
            r#"keyward_verify_total{protocol="other",result="valid"} 1"#,
            r#"keyward_verify_duration_seconds_count{protocol="http",result="valid"} 2"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains(r#"protocol="json""#), "{text}");
    }
}
