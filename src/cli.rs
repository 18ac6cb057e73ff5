//! The `keyward` command line: `run`, `verifier`, `crd`, `admission`, `verify`, `dashboard`, `selftest`, `migrate`.

use std::{process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use crate::{
    Result,
    crd::{crd_yaml, policy_crd_yaml},
    operator::controller::{self, RunConfig},
    policy::admission::{self, AdmissionVersion},
    store::{DEFAULT_CLUSTER_NAME, DEFAULT_DATABASE_URL, SqlStore},
    verifier::{
        VerifierConfig,
        listen::{self, VerifierSettings},
    },
};

/// keyward: API keys as Kubernetes resources.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The CRDs keyward defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CrdName {
    /// ApiKey (crds/apikey.yaml).
    Apikey,
    /// ApiKeyPolicy (crds/apikeypolicy.yaml).
    Apikeypolicy,
}

/// Verifier tuning shared by `keyward verifier` and `keyward run --verifier-address`.
#[derive(Debug, clap::Args)]
pub struct VerifierArgs {
    /// The header that may carry a key besides `Authorization: Bearer`.
    #[arg(long, env = "KEYWARD_KEY_HEADER", default_value = "x-api-key")]
    pub key_header: String,
    /// Seconds to keep answering from memory while the key database cannot be
    /// reached; past it every check fails closed (503) and /readyz fails.
    #[arg(long, env = "KEYWARD_MAX_STALENESS", default_value_t = 30)]
    pub max_staleness: u64,
    /// Database lookups in flight at most for keys not in memory.
    #[arg(long, env = "KEYWARD_MAX_FALLBACKS", default_value_t = 16)]
    pub max_fallbacks: usize,
    /// Milliseconds a database lookup for a key not in memory may take, slot
    /// wait included; past it the check answers 503. Keep it well under the
    /// gateway's own timeout (Envoy's ext_authz default is 200 ms).
    #[arg(long, env = "KEYWARD_FALLBACK_TIMEOUT_MS", default_value_t = 100)]
    pub fallback_timeout_ms: u64,
    /// Seconds between the batched writes of last-used times.
    #[arg(long, env = "KEYWARD_LAST_USED_FLUSH", default_value_t = 60)]
    pub last_used_flush: u64,
    /// Accept only keys issued by these clusters (`--cluster-name` of their
    /// operators), comma-separated; keys of other clusters answer unknown.
    /// Empty accepts every cluster's keys.
    #[arg(long, env = "KEYWARD_ACCEPT_CLUSTERS", value_delimiter = ',', value_parser = cluster_name)]
    pub accept_clusters: Vec<String>,
}

impl VerifierArgs {
    fn settings(
        &self,
        address: std::net::SocketAddr,
        primary_database_url: Option<String>,
    ) -> VerifierSettings {
        VerifierSettings {
            address,
            primary_database_url,
            key_header: self.key_header.clone(),
            config: VerifierConfig {
                last_used_flush: std::time::Duration::from_secs(self.last_used_flush.max(1)),
                max_staleness: std::time::Duration::from_secs(self.max_staleness),
                max_fallbacks: self.max_fallbacks.max(1),
                fallback_timeout: std::time::Duration::from_millis(self.fallback_timeout_ms.max(1)),
                accept_clusters: (!self.accept_clusters.is_empty())
                    .then(|| self.accept_clusters.clone()),
                ..VerifierConfig::default()
            },
        }
    }
}

/// The key database location, shared by the subcommands that need it.
#[derive(Debug, clap::Args)]
pub struct DatabaseArgs {
    /// Key database URL: sqlite://PATH (created if missing) or postgres://…
    #[arg(long, env = "KEYWARD_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
}

/// A usage retention: a duration of at least the 30 days `status.usage` shows.
fn usage_retention(value: &str) -> std::result::Result<jiff::SignedDuration, String> {
    let retention = crate::schedule::parse_duration(value)?;
    let shown = jiff::SignedDuration::from_hours(24 * crate::usage::summary::DAYS);
    if retention < shown {
        return Err(format!(
            "{value}: must be at least {}h, the 30 days status.usage shows",
            shown.as_hours()
        ));
    }
    Ok(retention)
}

/// A cluster name: a DNS label (lower-case letters, digits and `-`, at most 63),
/// since it travels in headers and metric labels.
fn cluster_name(value: &str) -> std::result::Result<String, String> {
    let label = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if label {
        Ok(value.to_owned())
    } else {
        Err("a cluster name is a DNS label: lower-case letters, digits and '-', at most 63 characters".into())
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator against the current kube context.
    Run {
        /// The key database.
        #[command(flatten)]
        database: DatabaseArgs,
        /// This cluster's name in the key database. It is stored in every record
        /// and audit row and names the cluster to gateways; the operator touches
        /// only its own cluster's records. Give each cluster that shares a
        /// database its own name; it cannot change once used (docs/database.md).
        #[arg(long, env = "KEYWARD_CLUSTER_NAME", default_value = DEFAULT_CLUSTER_NAME, value_parser = cluster_name)]
        cluster_name: String,
        /// Seconds between the leader's anti-entropy passes, which revoke the
        /// keys that no ApiKey of this cluster accounts for (docs/database.md).
        #[arg(long, env = "KEYWARD_ANTI_ENTROPY_INTERVAL", default_value_t = 60)]
        anti_entropy_interval: u64,
        /// How long per-key usage counts are kept before the leader deletes
        /// them, e.g. `2160h` (90 days); at least the 30 days status shows.
        #[arg(long, env = "KEYWARD_USAGE_RETENTION", default_value = "2160h", value_parser = usage_retention)]
        usage_retention: jiff::SignedDuration,
        /// Seconds between the leader's scans of recent key use (last use,
        /// previous and revoked keys still presented, verifiers' reporting).
        #[arg(long, env = "KEYWARD_USAGE_SCAN_INTERVAL", default_value_t = 30)]
        usage_scan_interval: u64,
        /// Prefix of every issued key, before the `_`.
        #[arg(long, env = "KEYWARD_KEY_PREFIX", default_value = "kw")]
        key_prefix: String,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Do not install or update the ApiKey CRD at start.
        #[arg(long)]
        skip_crd_install: bool,
        /// ApiKeys reconciled at the same time.
        #[arg(long, env = "KEYWARD_MAX_CONCURRENT_RECONCILES", default_value_t = 8)]
        max_concurrent_reconciles: u16,
        /// Keys issued (first, rotated or re-issued) per second at most, so that many
        /// keys due together do not flood the API server and database; 0 is unlimited.
        #[arg(long, env = "KEYWARD_MAX_ISSUES_PER_SECOND", default_value_t = 20.0)]
        max_issues_per_second: f64,
        /// Serve /metrics, /healthz and /readyz on this address, e.g. 0.0.0.0:8080.
        #[arg(long, env = "KEYWARD_HTTP_ADDRESS")]
        http_address: Option<std::net::SocketAddr>,
        /// Reconcile only while holding the leader Lease (for more than one replica).
        #[arg(long)]
        leader_election: bool,
        /// Name of the leader Lease.
        #[arg(long, default_value = "keyward")]
        lease_name: String,
        /// Namespace of the leader Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the Lease; defaults to the host name.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Forbid keys in namespaces that no ApiKeyPolicy selects (by default such
        /// namespaces are unrestricted, so a new install works without policies).
        #[arg(long, env = "KEYWARD_REQUIRE_POLICY")]
        require_policy: bool,
        /// Also serve the verifier endpoints (gRPC ext_authz, /check, /v1/verify)
        /// on this address, from this process: the one-machine setup with SQLite.
        #[arg(long, env = "KEYWARD_VERIFIER_ADDRESS")]
        verifier_address: Option<std::net::SocketAddr>,
        /// Verifier tuning, used with --verifier-address.
        #[command(flatten)]
        verifier: VerifierArgs,
    },
    /// Serve the verifier for gateways and services: Envoy ext_authz over gRPC,
    /// the HTTP check (/check), POST /v1/verify, /metrics, /healthz and /readyz,
    /// all on one port, from an in-memory key set that follows the key database.
    Verifier {
        /// The key database (read-only, except last-used times).
        #[command(flatten)]
        database: DatabaseArgs,
        /// Where to listen, e.g. 0.0.0.0:9000.
        #[arg(long, env = "KEYWARD_VERIFIER_ADDRESS", default_value = "0.0.0.0:9000")]
        address: std::net::SocketAddr,
        /// The primary's URL when --database-url is a read replica (a hot
        /// standby): the verifier LISTENs there for changes and writes
        /// last-used times there. Without it, a replica is polled every 250 ms
        /// and last-used times are not recorded.
        #[arg(long, env = "KEYWARD_PRIMARY_DATABASE_URL", hide_env_values = true)]
        primary_database_url: Option<String>,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Verifier tuning.
        #[command(flatten)]
        verifier: VerifierArgs,
    },
    /// Print the CRDs as YAML: both by default (crds/apikey.yaml, then
    /// crds/apikeypolicy.yaml), or the one named.
    Crd {
        /// `apikey` or `apikeypolicy`; unset prints both.
        #[arg(value_enum)]
        only: Option<CrdName>,
    },
    /// Read one key from stdin and check it against the key database.
    /// Exit 0 and JSON when valid; exit 1 and the reason when not; exit 2 on errors.
    Verify {
        /// The key database.
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Print the ValidatingAdmissionPolicy (and its binding) that enforces
    /// ApiKeyPolicies at admission, as YAML (config/admission-policy.yaml).
    Admission {
        /// `v1` for Kubernetes 1.30 and later, `v1beta1` for 1.28 and 1.29.
        #[arg(long, value_enum, default_value_t = AdmissionVersion::V1)]
        api_version: AdmissionVersion,
    },
    /// Serve the dashboard (as `kubectl keyward dashboard` does); in a cluster,
    /// with `--token-passthrough` behind an authenticating proxy (docs/dashboard.md).
    Dashboard(crate::dashboard::DashboardArgs),
    /// Check an installation from inside the cluster (the chart's `helm test`):
    /// the operator and the verifier answer, a throwaway ApiKey is issued and
    /// verifies, and once deleted it is refused. Exit 0 when every check passes.
    Selftest(crate::selftest::SelftestArgs),
    /// Apply the key database migrations and exit.
    Migrate {
        /// The key database.
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// The host name, or `keyward-<pid>` when there is none.
fn default_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .map_or_else(
            || format!("keyward-{}", std::process::id()),
            |h| format!("{h}-{}", std::process::id()),
        )
}

/// Sets up logging to stderr. `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs a parsed command line and returns the process exit code.
pub async fn execute(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("keyward: {error}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            database,
            cluster_name,
            anti_entropy_interval,
            usage_retention,
            usage_scan_interval,
            key_prefix,
            log_format,
            skip_crd_install,
            max_concurrent_reconciles,
            max_issues_per_second,
            http_address,
            leader_election,
            lease_name,
            lease_namespace,
            identity,
            require_policy,
            verifier_address,
            verifier,
        } => {
            init_logging(log_format);
            controller::run(RunConfig {
                database_url: database.database_url,
                cluster_name,
                anti_entropy_interval: std::time::Duration::from_secs(anti_entropy_interval.max(1)),
                usage_retention,
                usage_scan_interval: std::time::Duration::from_secs(usage_scan_interval.max(1)),
                key_prefix,
                skip_crd_install,
                max_concurrent_reconciles,
                max_issues_per_second,
                http_address,
                leader_election,
                lease_name,
                lease_namespace,
                identity: identity.unwrap_or_else(default_identity),
                require_policy,
                verifier: verifier_address.map(|address| verifier.settings(address, None)),
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest(args) => {
            crate::selftest::run(args).await?;
            println!("keyward selftest passed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dashboard(args) => {
            crate::dashboard::run(args, None).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd { only } => {
            match only {
                Some(CrdName::Apikey) => print!("{}", crd_yaml()),
                Some(CrdName::Apikeypolicy) => print!("{}", policy_crd_yaml()),
                None => print!("{}{}", crd_yaml(), policy_crd_yaml()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { database } => {
            let mut input = Zeroizing::new(String::new());
            tokio::io::stdin()
                .read_to_string(&mut input)
                .await
                .map_err(|e| crate::Error::Config(format!("reading stdin: {e}")))?;
            let store = SqlStore::connect(&database.database_url).await?;
            match crate::verify(&store, input.trim(), jiff::Timestamp::now()).await? {
                Ok(valid) => {
                    let json = serde_json::to_string(&valid)
                        .map_err(|e| crate::Error::Serialize(e.to_string()))?;
                    println!("{json}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(rejection) => {
                    println!("{}", rejection.as_str());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Verifier {
            database,
            address,
            primary_database_url,
            log_format,
            verifier,
        } => {
            init_logging(log_format);
            // Lazily: a verifier started while the database is down serves its
            // probes (not ready) and loads the key set once the database answers.
            let store = Arc::new(SqlStore::connect_lazy(&database.database_url)?);
            let metrics = Arc::new(crate::telemetry::Metrics::default());
            listen::start(
                store,
                &database.database_url,
                verifier.settings(address, primary_database_url),
                metrics,
            )
            .await?;
            crate::operator::controller::shutdown_signal().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admission { api_version } => {
            print!("{}", admission::manifests(api_version));
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { database } => {
            SqlStore::connect(&database.database_url)
                .await?
                .migrate()
                .await?;
            eprintln!("keyward: key database is up to date");
            Ok(ExitCode::SUCCESS)
        }
    }
}
