//! `kubectl keyward`: list, rotate, revoke and inspect ApiKeys from the current
//! kube context. It only reads and annotates ApiKeys and reads Events; the
//! operator does the work. Exit code 0 on success, 1 on any failure.

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::SignedDuration;
// Core Events, not events.k8s.io: the built-in `view` role grants these, so any
// user who may read an ApiKey can also read what happened to it.
use k8s_openapi::api::core::v1::Event;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};

use crate::{
    Error, Result,
    crd::{ApiKey, POLICY_COMPLIANT, REVOKE_PREVIOUS_ANNOTATION, ROTATE_ANNOTATION},
};

/// Manage keyward ApiKeys.
#[derive(Debug, Parser)]
#[command(name = "kubectl-keyward", bin_name = "kubectl keyward", version, about)]
pub struct Plugin {
    /// Namespace to use instead of the context's.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// Output formats, as in kubectl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The default table.
    Table,
    /// The table with more columns.
    Wide,
    /// The ApiKey objects as JSON.
    Json,
    /// The ApiKey objects as YAML.
    Yaml,
}

/// Which ApiKeys a command applies to.
#[derive(Debug, Args)]
pub struct Selection {
    /// ApiKey name.
    pub name: Option<String>,
    /// Label selector, e.g. `team=ml`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Every ApiKey in the namespace (with -A: in every namespace).
    #[arg(long)]
    pub all: bool,
    /// Across all namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// List ApiKeys: owner, team, scopes, key hint, state, issued, next rotation, last use.
    List {
        /// Across all namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Label selector, e.g. `team=ml`.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Only keys not used within this window, e.g. `30d` or `720h`, and
        /// keys never used. From `status.lastUsedAt`, which moves at most once
        /// an hour.
        #[arg(long, value_parser = parse_window)]
        unused: Option<SignedDuration>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show an ApiKey's requests by hour or by day, split by outcome, with a sparkline.
    Usage {
        /// ApiKey name.
        name: String,
        /// Buckets: `hour` (the last 24 hours at most) or `day` (30 days at most).
        #[arg(long, value_enum, default_value_t = Bucket::Day)]
        by: Bucket,
        /// How far back, in buckets up to the current one: `7d` is the last 7 days, `12h` the last 12 hours; the default is the whole series.
        #[arg(long, value_parser = parse_window)]
        window: Option<SignedDuration>,
        /// Output format (json and yaml print `status.usage`).
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Rotate keys now: one by name, by label selector, or --all.
    Rotate {
        /// Which ApiKeys.
        #[command(flatten)]
        selection: Selection,
        /// Revoke the previous keys at once instead of after the grace period (after a leak).
        #[arg(long)]
        immediate: bool,
        /// How long to wait for the operator to confirm each rotation.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Delete an ApiKey and wait until its key is revoked and it is gone.
    Revoke {
        /// ApiKey name.
        name: String,
        /// How long to wait.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Serve the keyward dashboard: a web page on 127.0.0.1 with your kubeconfig's permissions.
    Dashboard(crate::dashboard::DashboardArgs),
    /// Show an ApiKey's conditions, key, rotation times and recent Events.
    Status {
        /// ApiKey name.
        name: String,
        /// Output format (json and yaml print the object).
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// The buckets of `kubectl keyward usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Bucket {
    /// Per UTC hour, from `status.usage.hourly`.
    Hour,
    /// Per UTC day, from `status.usage.daily`.
    Day,
}

/// A window: `30d`, or a duration such as `720h` or `90m`.
fn parse_window(text: &str) -> std::result::Result<SignedDuration, String> {
    let duration = match text.strip_suffix('d').map(str::parse::<i64>) {
        Some(Ok(days)) => SignedDuration::from_hours(days.saturating_mul(24)),
        _ => crate::schedule::parse_duration(text)?,
    };
    if duration <= SignedDuration::ZERO {
        return Err(format!("{text}: must be longer than zero"));
    }
    Ok(duration)
}

fn parse_timeout(text: &str) -> std::result::Result<Duration, String> {
    crate::schedule::parse_duration(text)?
        .try_into()
        .map_err(|_| format!("{text}: must not be negative"))
}

/// Runs the plugin and returns the exit code.
pub async fn execute(plugin: Plugin) -> ExitCode {
    match dispatch(plugin).await {
        Ok(code) => code,
        Err(Error::Kube(kube::Error::Api(status))) => {
            eprintln!("error: {}", status.message);
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(plugin: Plugin) -> Result<ExitCode> {
    if let PluginCommand::Dashboard(args) = plugin.command {
        crate::dashboard::run(args, plugin.namespace).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::try_default().await?;
    let namespace = plugin
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let namespaced: Api<ApiKey> = Api::namespaced(client.clone(), &namespace);
    match plugin.command {
        PluginCommand::List {
            all_namespaces,
            selector,
            unused,
            output,
        } => {
            let api = if all_namespaces {
                Api::all(client)
            } else {
                namespaced
            };
            let mut params = ListParams::default();
            if let Some(selector) = &selector {
                params = params.labels(selector);
            }
            let mut keys = api.list(&params).await?.items;
            if let Some(window) = unused {
                let now = jiff::Timestamp::now();
                keys.retain(|key| unused_within(key, window, now));
                print!("{}", render_unused(&keys, all_namespaces, output)?);
            } else {
                print!("{}", render_list(&keys, all_namespaces, output)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Rotate {
            selection,
            immediate,
            timeout,
        } => {
            let keys = select(&client, &namespaced, &selection).await?;
            if keys.is_empty() {
                return Err(Error::Config("no ApiKey matched".into()));
            }
            let request = format!(
                "kubectl-keyward-{}",
                jiff::Timestamp::now().as_millisecond()
            );
            let mut failed = false;
            for key in &keys {
                let api: Api<ApiKey> =
                    Api::namespaced(client.clone(), &key.namespace().unwrap_or_default());
                match rotate(&api, &key.name_any(), &request, immediate, timeout).await {
                    Ok(done) => println!("{done}"),
                    Err(e) => {
                        eprintln!(
                            "{}/{}: {e}",
                            key.namespace().unwrap_or_default(),
                            key.name_any()
                        );
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        PluginCommand::Revoke { name, timeout } => {
            revoke(&namespaced, &name, timeout, |blocked| {
                eprintln!("waiting: revocation is blocked{blocked}");
            })
            .await?;
            println!("apikey {name} revoked and deleted");
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Usage {
            name,
            by,
            window,
            output,
        } => {
            let key = namespaced.get(&name).await?;
            let usage = key.status.as_ref().and_then(|s| s.usage.as_ref());
            let text = match output {
                Output::Json => to_json(&usage)?,
                Output::Yaml => to_yaml(&usage)?,
                Output::Table | Output::Wide => render_usage(&key, by, window),
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Dashboard(_) => unreachable!("served above"),
        PluginCommand::Status { name, output } => {
            let key = namespaced.get(&name).await?;
            let text = match output {
                Output::Json => to_json(&key)?,
                Output::Yaml => to_yaml(&key)?,
                Output::Table | Output::Wide => {
                    let events = Api::<Event>::namespaced(client, &namespace)
                        .list(&ListParams::default().fields(&format!(
                            "involvedObject.kind=ApiKey,involvedObject.name={name}"
                        )))
                        .await?
                        .items;
                    render_status(&key, &events)
                }
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The ApiKeys a rotate applies to.
async fn select(
    client: &Client,
    namespaced: &Api<ApiKey>,
    selection: &Selection,
) -> Result<Vec<ApiKey>> {
    let api = if selection.all_namespaces {
        Api::all(client.clone())
    } else {
        namespaced.clone()
    };
    match (&selection.name, &selection.selector, selection.all) {
        (Some(name), None, false) => Ok(vec![namespaced.get(name).await?]),
        (None, Some(selector), false) => Ok(api
            .list(&ListParams::default().labels(selector))
            .await?
            .items),
        (None, None, true) => Ok(api.list(&ListParams::default()).await?.items),
        _ => Err(Error::Config(
            "give exactly one of NAME, -l SELECTOR or --all".into(),
        )),
    }
}

/// Sets the rotate annotation and waits until the operator reports it handled.
pub(crate) async fn rotate(
    api: &Api<ApiKey>,
    name: &str,
    request: &str,
    immediate: bool,
    timeout: Duration,
) -> Result<String> {
    let mut annotations =
        BTreeMap::from([(ROTATE_ANNOTATION.to_owned(), Some(request.to_owned()))]);
    annotations.insert(
        REVOKE_PREVIOUS_ANNOTATION.to_owned(),
        immediate.then(|| "now".to_owned()),
    );
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let key = api.get(name).await?;
        let status = key.status.clone().unwrap_or_default();
        if status.last_rotation_request.as_deref() == Some(request) {
            let how = if immediate {
                "previous keys revoked"
            } else {
                "previous key in its grace period"
            };
            return Ok(format!(
                "apikey {name} rotated: key {} ({}), {how}",
                status.key_id.unwrap_or_default(),
                status.key_hint.unwrap_or_default()
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Config(format!(
                "not confirmed within {}s{}",
                timeout.as_secs(),
                blocked_reason(&key)
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deletes the ApiKey and waits until the finalizer has revoked its key and it
/// is gone, telling `progress` each new reason the revocation is blocked.
pub(crate) async fn revoke(
    api: &Api<ApiKey>,
    name: &str,
    timeout: Duration,
    mut progress: impl FnMut(&str),
) -> Result<()> {
    api.delete(name, &DeleteParams::default()).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut said = String::new();
    loop {
        let Some(key) = api.get_opt(name).await? else {
            return Ok(());
        };
        let blocked = blocked_reason(&key);
        if !blocked.is_empty() && blocked != said {
            progress(&blocked);
            said = blocked.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Config(format!(
                "apikey {name} is still terminating after {}s{blocked}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `: Reason: message` when Ready is False, else empty.
fn blocked_reason(key: &ApiKey) -> String {
    key.ready_condition()
        .filter(|c| c.status == "False")
        .map(|c| format!(": {}: {}", c.reason, c.message))
        .unwrap_or_default()
}

fn to_json(value: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| Error::Serialize(e.to_string()))
}

fn to_yaml(value: &impl serde::Serialize) -> Result<String> {
    serde_yaml::to_string(value).map_err(|e| Error::Serialize(e.to_string()))
}

fn time(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.0.to_string())
}

/// A last use, or "never": no verifier saw the key verify.
fn last_used(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map_or_else(|| "never".to_owned(), |t| t.0.to_string())
}

/// The `list` output.
pub fn render_list(keys: &[ApiKey], all_namespaces: bool, output: Output) -> Result<String> {
    match output {
        Output::Json => {
            return to_json(
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": keys}),
            );
        }
        Output::Yaml => {
            return to_yaml(
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": keys}),
            );
        }
        Output::Table | Output::Wide => {}
    }
    let wide = output == Output::Wide;
    let mut header = vec![
        "NAME",
        "OWNER",
        "TEAM",
        "SCOPES",
        "KEY",
        "STATE",
        "POLICY",
        "ISSUED",
        "NEXT-ROTATION",
        "LAST-USED",
    ];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    if wide {
        header.extend(["KEY-ID", "SECRET", "REVISION", "EXPIRES", "REQUESTS-24H"]);
    }
    let mut rows = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for key in keys {
        let status = key.status.clone().unwrap_or_default();
        let state = key.ready_condition().map_or("Pending".to_owned(), |c| {
            if c.status == "True" {
                "Ready".to_owned()
            } else {
                c.reason.clone()
            }
        });
        let mut row = vec![
            key.name_any(),
            key.spec.owner.clone(),
            key.spec.team.clone(),
            key.spec.scopes.join(","),
            status.key_hint.clone().unwrap_or_else(|| "-".into()),
            state,
            policy_column(&status),
            time(status.issued_at.as_ref()),
            time(status.next_rotation_at.as_ref()),
            last_used(status.last_used_at.as_ref()),
        ];
        if all_namespaces {
            row.insert(0, key.namespace().unwrap_or_default());
        }
        if wide {
            row.extend([
                status.key_id.clone().unwrap_or_else(|| "-".into()),
                status.secret_name.clone().unwrap_or_else(|| "-".into()),
                status.revision.map_or("-".into(), |r| r.to_string()),
                time(status.expires_at.as_ref()),
                status
                    .usage
                    .as_ref()
                    .map_or("-".into(), |u| u.last24h.to_string()),
            ]);
        }
        rows.push(row);
    }
    Ok(table(&rows))
}

/// Whether `key` was not used within `window` before `now`: never used (no
/// `status.lastUsedAt`), or last used before the window.
pub fn unused_within(key: &ApiKey, window: SignedDuration, now: jiff::Timestamp) -> bool {
    key.status
        .as_ref()
        .and_then(|s| s.last_used_at.as_ref())
        .is_none_or(|used| used.0 < now - window)
}

/// The `list --unused` output: each key with "never used" or when it was last seen.
pub fn render_unused(keys: &[ApiKey], all_namespaces: bool, output: Output) -> Result<String> {
    if matches!(output, Output::Json | Output::Yaml) {
        return render_list(keys, all_namespaces, output);
    }
    let mut header = vec!["NAME", "OWNER", "TEAM", "CREATED", "USE"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut rows = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for key in keys {
        let used = key.status.as_ref().and_then(|s| s.last_used_at.as_ref());
        let mut row = vec![
            key.name_any(),
            key.spec.owner.clone(),
            key.spec.team.clone(),
            time(key.metadata.creation_timestamp.as_ref()),
            used.map_or_else(
                || "never used".to_owned(),
                |t| format!("not seen since {}", t.0),
            ),
        ];
        if all_namespaces {
            row.insert(0, key.namespace().unwrap_or_default());
        }
        rows.push(row);
    }
    Ok(table(&rows))
}

/// The `usage` output: a summary line, a table of buckets split by outcome,
/// and a one-line sparkline per outcome that had requests.
pub fn render_usage(key: &ApiKey, by: Bucket, window: Option<SignedDuration>) -> String {
    let status = key.status.clone().unwrap_or_default();
    let last_used = last_used(status.last_used_at.as_ref());
    let Some(usage) = status.usage else {
        return format!(
            "apikey {}: no request recorded for any of its keys (last used: {last_used})\n",
            key.name_any()
        );
    };
    let mut out = format!(
        "apikey {}: {} requests in the last 24 h ({} refused), {} in the last 7 days; last used: {last_used}; as of {}\n",
        key.name_any(),
        usage.last24h,
        usage.refused_last24h,
        usage.last7d,
        usage.updated_at.0
    );
    let (series, width) = match by {
        Bucket::Hour => (&usage.hourly, crate::usage::HOUR),
        Bucket::Day => (&usage.daily, crate::usage::DAY),
    };
    let outcomes = [
        ("VALID", &series.valid),
        ("INSUFFICIENT-SCOPE", &series.insufficient_scope),
        ("REVOKED", &series.revoked),
        ("EXPIRED", &series.expired),
    ];
    let totals = series.totals();
    let len = totals.len();
    let value = |values: &Vec<i64>, i: usize| values.get(i).copied().unwrap_or(0);
    // The window's length in buckets, the current one included.
    let first = window.map_or(0, |window| {
        let buckets = (window.as_secs() + width.as_secs() - 1) / width.as_secs();
        len.saturating_sub(usize::try_from(buckets).unwrap_or(usize::MAX))
    });
    let mut rows = vec![vec![
        match by {
            Bucket::Hour => "HOUR (UTC)".to_owned(),
            Bucket::Day => "DAY (UTC)".to_owned(),
        },
        "TOTAL".into(),
    ]];
    rows[0].extend(outcomes.iter().map(|(name, _)| (*name).to_owned()));
    for (i, total) in totals.iter().enumerate().skip(first) {
        let start = series.start.0 + width * i as i32;
        let label = match by {
            Bucket::Hour => start.strftime("%Y-%m-%d %H:00").to_string(),
            Bucket::Day => start.strftime("%Y-%m-%d").to_string(),
        };
        let mut row = vec![label, total.to_string()];
        row.extend(outcomes.iter().map(|(_, v)| value(v, i).to_string()));
        rows.push(row);
    }
    out.push_str(&table(&rows));
    out.push_str(&format!("{:<19}{}\n", "total", sparkline(&totals[first..])));
    for (name, values) in outcomes {
        if values.iter().any(|v| *v > 0) {
            let shown: Vec<i64> = (first..len).map(|i| value(values, i)).collect();
            out.push_str(&format!(
                "{:<19}{}\n",
                name.to_ascii_lowercase(),
                sparkline(&shown)
            ));
        }
    }
    out
}

/// One character per value, from ` ` (none) through `▁` to `█` (the most).
pub fn sparkline(values: &[i64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let most = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| {
            if v <= 0 || most <= 0 {
                ' '
            } else {
                let level = (v as f64 / most as f64 * (BARS.len() - 1) as f64).round() as usize;
                BARS[level.min(BARS.len() - 1)]
            }
        })
        .collect()
}

/// `ok`, `violates:<policies>` from the PolicyCompliant condition and
/// `status.violatedPolicies`, or `-` before
/// the operator has checked the key.
fn policy_column(status: &crate::crd::ApiKeyStatus) -> String {
    let Some(condition) = status
        .conditions
        .iter()
        .find(|c| c.type_ == POLICY_COMPLIANT)
    else {
        return "-".into();
    };
    if condition.status == "True" {
        return "ok".into();
    }
    // From the structured field: the message quotes the spec's free text.
    if status.violated_policies.is_empty() {
        return "violates".into();
    }
    format!("violates:{}", status.violated_policies.join(","))
}

/// The `status` output.
pub fn render_status(key: &ApiKey, events: &[Event]) -> String {
    let status = key.status.clone().unwrap_or_default();
    let fields = [
        ("Name", Some(key.name_any())),
        ("Namespace", Some(key.namespace().unwrap_or_default())),
        ("Owner", Some(key.spec.owner.clone())),
        ("Team", Some(key.spec.team.clone())),
        ("Scopes", Some(key.spec.scopes.join(", "))),
        ("Key ID", status.key_id.clone()),
        ("Key hint", status.key_hint.clone()),
        ("Secret", status.secret_name.clone()),
        ("Revision", status.revision.map(|r| r.to_string())),
        ("Issued", status.issued_at.as_ref().map(|t| t.0.to_string())),
        (
            "Expires",
            status.expires_at.as_ref().map(|t| t.0.to_string()),
        ),
        (
            "Last rotated",
            status.last_rotated_at.as_ref().map(|t| t.0.to_string()),
        ),
        (
            "Next rotation",
            status.next_rotation_at.as_ref().map(|t| t.0.to_string()),
        ),
        (
            "Previous key until",
            status
                .previous_key_expires_at
                .as_ref()
                .map(|t| t.0.to_string()),
        ),
        ("Rotate request", status.last_rotation_request.clone()),
        ("Last used", Some(last_used(status.last_used_at.as_ref()))),
        (
            "Requests",
            status.usage.as_ref().map(|u| {
                format!(
                    "{} in the last 24 h ({} refused), {} in the last 7 days; daily: {}",
                    u.last24h,
                    u.refused_last24h,
                    u.last7d,
                    sparkline(&u.daily.totals())
                )
            }),
        ),
        (
            "Deleting since",
            key.metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
        ),
    ];
    // Every label padded to one width: the longest label, its colon and a space.
    let width = fields
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0)
        + 2;
    let mut out = String::new();
    for (label, value) in fields {
        if let Some(value) = value {
            out.push_str(&format!("{:<width$}{value}\n", format!("{label}:")));
        }
    }
    out.push_str("Conditions:\n");
    let mut rows = vec![vec![
        "TYPE".to_owned(),
        "STATUS".into(),
        "REASON".into(),
        "SINCE".into(),
        "MESSAGE".into(),
    ]];
    for c in &status.conditions {
        rows.push(vec![
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.last_transition_time.0.to_string(),
            c.message.clone(),
        ]);
    }
    out.push_str(&indent(&table(&rows)));
    out.push_str("Events:\n");
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    let mut rows = vec![vec![
        "TIME".to_owned(),
        "TYPE".into(),
        "REASON".into(),
        "MESSAGE".into(),
    ]];
    for e in events.iter().rev().take(20).rev() {
        rows.push(vec![
            e.event_time
                .as_ref()
                .map_or("-".into(), |t| t.0.to_string()),
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.message.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&indent(&table(&rows)));
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell:<width$}", width = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ApiKeySpec, ApiKeyStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn key(name: &str, ready: Option<(&str, &str)>) -> ApiKey {
        let mut key = ApiKey::new(
            name,
            ApiKeySpec {
                owner: "alice@example.com".into(),
                team: "ml".into(),
                scopes: vec!["inference".into(), "models:read".into()],
                secret_name: None,
                description: None,
                rotation: None,
                expires_after: None,
                rollout: None,
            },
        );
        key.metadata.namespace = Some("team-ml".into());
        let at = Time("2026-11-22T12:00:00Z".parse().unwrap());
        key.status = ready.map(|(status, reason)| ApiKeyStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: "m".into(),
                observed_generation: None,
                last_transition_time: at.clone(),
            }],
            key_id: Some("kid_abc".into()),
            key_hint: Some("kw_AbC1".into()),
            issued_at: Some(at),
            revision: Some(3),
            ..ApiKeyStatus::default()
        });
        key
    }

    #[test]
    fn list_table_has_the_promised_columns() {
        let keys = [
            key("a", Some(("True", "KeyActive"))),
            key("b", Some(("False", "SecretConflict"))),
            key("c", None),
        ];
        let text = render_list(&keys, false, Output::Table).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAME",
                "OWNER",
                "TEAM",
                "SCOPES",
                "KEY",
                "STATE",
                "POLICY",
                "ISSUED",
                "NEXT-ROTATION",
                "LAST-USED"
            ]
        );
        assert!(
            lines[1].contains("kw_AbC1")
                && lines[1].contains("Ready")
                && lines[1].contains("inference,models:read")
        );
        assert!(lines[2].contains("SecretConflict"));
        assert!(lines[3].contains("Pending"));
        assert_eq!(lines[3].split_whitespace().nth(6), Some("-"));
        let wide = render_list(&keys, true, Output::Wide).unwrap();
        assert!(wide.starts_with("NAMESPACE"));
        assert!(wide.contains("KEY-ID") && wide.contains("kid_abc"));
        let json: serde_json::Value =
            serde_json::from_str(&render_list(&keys, false, Output::Json).unwrap()).unwrap();
        assert_eq!(json["items"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn status_shows_conditions_and_blocked_reasons() {
        let blocked = key("a", Some(("False", "DatabaseUnavailable")));
        assert_eq!(blocked_reason(&blocked), ": DatabaseUnavailable: m");
        assert_eq!(blocked_reason(&key("b", Some(("True", "KeyActive")))), "");
        let text = render_status(&blocked, &[]);
        assert!(text.contains("Key hint:           kw_AbC1"), "{text}");
        assert!(text.contains("DatabaseUnavailable"));
        assert!(text.contains("Revision:           3"));
    }

    #[test]
    fn status_aligns_every_label() {
        let mut rotated = key("inference", Some(("True", "KeyActive")));
        let time = |at: &str| Some(Time(at.parse().unwrap()));
        let status = rotated.status.as_mut().unwrap();
        status.secret_name = Some("inference-api-key".into());
        status.expires_at = time("2027-02-20T12:00:00Z");
        status.last_rotated_at = time("2026-11-22T12:00:00Z");
        status.next_rotation_at = time("2026-11-23T03:00:00Z");
        status.previous_key_expires_at = time("2026-11-22T13:00:00Z");
        status.last_rotation_request = Some("1795000000".into());
        rotated.metadata.deletion_timestamp = time("2026-11-22T12:30:00Z");
        let event = Event {
            event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                "2026-11-22T12:00:01Z".parse().unwrap(),
            )),
            type_: Some("Normal".into()),
            reason: Some("Rotated".into()),
            message: Some("issued kid_abc".into()),
            ..Event::default()
        };
        assert_eq!(
            render_status(&rotated, &[event]),
            "\
Name:               inference
Namespace:          team-ml
Owner:              alice@example.com
Team:               ml
Scopes:             inference, models:read
Key ID:             kid_abc
Key hint:           kw_AbC1
Secret:             inference-api-key
Revision:           3
Issued:             2026-11-22T12:00:00Z
Expires:            2027-02-20T12:00:00Z
Last rotated:       2026-11-22T12:00:00Z
Next rotation:      2026-11-23T03:00:00Z
Previous key until: 2026-11-22T13:00:00Z
Rotate request:     1795000000
Last used:          never
Deleting since:     2026-11-22T12:30:00Z
Conditions:
  TYPE    STATUS   REASON      SINCE                  MESSAGE
  Ready   True     KeyActive   2026-11-22T12:00:00Z   m
Events:
  TIME                   TYPE     REASON    MESSAGE
  2026-11-22T12:00:01Z   Normal   Rotated   issued kid_abc
"
        );
    }

    #[test]
    fn selections_are_exclusive() {
        let parse = |args: &[&str]| {
            Plugin::try_parse_from(["kubectl-keyward", "rotate"].iter().chain(args))
        };
        assert!(parse(&["a"]).is_ok());
        assert!(parse(&["-l", "team=ml", "--immediate"]).is_ok());
        assert!(parse(&["--all", "-A"]).is_ok());
        assert!(parse(&["--timeout", "-1s", "a"]).is_err());
    }

    #[test]
    fn the_policy_column_names_the_violated_policies() {
        let mut flagged = key("a", Some(("True", "KeyActive")));
        let status = flagged.status.as_mut().unwrap();
        let mut condition = status.conditions[0].clone();
        condition.type_ = POLICY_COMPLIANT.into();
        condition.status = "False".into();
        // The owner is free text and quoted in the message: it must not spoof the column.
        condition.message =
            "ApiKeyPolicy prod rule owner: owner \"x ApiKeyPolicy prod-baseline y\" \
                             does not match; ApiKeyPolicy base rule scopes: no"
                .into();
        status.conditions.push(condition.clone());
        status.violated_policies = vec!["base".into(), "prod".into()];
        let mut fine = key("b", Some(("True", "KeyActive")));
        condition.status = "True".into();
        fine.status.as_mut().unwrap().conditions.push(condition);
        let text = render_list(&[flagged, fine], false, Output::Table).unwrap();
        let column: Vec<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(6).unwrap())
            .collect();
        assert_eq!(column, ["violates:base,prod", "ok"]);
    }

    fn used(name: &str, last_used: Option<&str>) -> ApiKey {
        let mut key = key(name, Some(("True", "KeyActive")));
        let status = key.status.as_mut().unwrap();
        status.last_used_at = last_used.map(|t| Time(t.parse().unwrap()));
        key
    }

    #[test]
    fn unused_keys_are_those_never_used_or_not_seen_within_the_window() {
        let now: jiff::Timestamp = "2026-12-31T00:00:00Z".parse().unwrap();
        let keys = [
            used("never", None),
            used("idle", Some("2026-11-01T10:00:00Z")),
            used("busy", Some("2026-12-30T10:00:00Z")),
        ];
        let window = parse_window("30d").unwrap();
        let unused: Vec<ApiKey> = keys
            .iter()
            .filter(|k| unused_within(k, window, now))
            .cloned()
            .collect();
        let text = render_unused(&unused, false, Output::Table).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("never") && lines[1].ends_with("never used"));
        assert!(
            lines[2].starts_with("idle")
                && lines[2].ends_with("not seen since 2026-11-01T10:00:00Z"),
            "{text}"
        );
        assert_eq!(parse_window("720h").unwrap(), window);
        assert!(parse_window("0d").is_err() && parse_window("soon").is_err());
        // The list says "never" rather than a dash.
        let list = render_list(&keys, false, Output::Table).unwrap();
        assert!(list.lines().nth(1).unwrap().ends_with("never"), "{list}");
    }

    fn with_usage(key: &mut ApiKey) {
        let start = |t: &str| Time(t.parse().unwrap());
        let mut daily = vec![0; 30];
        daily[27] = 4;
        daily[29] = 10;
        let mut hourly = vec![0; 24];
        hourly[22] = 3;
        hourly[23] = 7;
        let mut revoked = vec![0; 24];
        revoked[23] = 2;
        key.status.as_mut().unwrap().usage = Some(crate::crd::UsageStatus {
            updated_at: start("2026-12-30T10:20:00Z"),
            last24h: 12,
            last7d: 16,
            refused_last24h: 2,
            daily: crate::crd::UsageSeries {
                start: start("2026-12-01T00:00:00Z"),
                valid: daily,
                insufficient_scope: vec![],
                revoked: {
                    let mut r = vec![0; 30];
                    r[29] = 2;
                    r
                },
                expired: vec![],
            },
            hourly: crate::crd::UsageSeries {
                start: start("2026-12-29T11:00:00Z"),
                valid: hourly,
                insufficient_scope: vec![],
                revoked,
                expired: vec![],
            },
        });
    }

    #[test]
    fn usage_prints_buckets_split_by_outcome_and_a_sparkline() {
        let mut key = used("busy", Some("2026-12-30T10:00:00Z"));
        with_usage(&mut key);
        let by_day = render_usage(&key, Bucket::Day, Some(parse_window("3d").unwrap()));
        let lines: Vec<&str> = by_day.lines().collect();
        assert!(
            lines[0].contains("12 requests in the last 24 h (2 refused), 16 in the last 7 days")
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "DAY",
                "(UTC)",
                "TOTAL",
                "VALID",
                "INSUFFICIENT-SCOPE",
                "REVOKED",
                "EXPIRED"
            ]
        );
        // Three days: the 28th, 29th and 30th.
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["2026-12-28", "4", "4", "0", "0", "0"]
        );
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["2026-12-30", "12", "10", "0", "2", "0"]
        );
        assert_eq!(lines[5], "total              ▃ █");
        assert!(lines[6].starts_with("valid") && lines[7].starts_with("revoked"));
        assert_eq!(
            lines.len(),
            8,
            "outcomes never seen get no sparkline: {by_day}"
        );
        let by_hour = render_usage(&key, Bucket::Hour, None);
        assert_eq!(by_hour.lines().count(), 1 + 1 + 24 + 3);
        assert!(by_hour.contains("2026-12-30 10:00"));
        // Never counted: said so, not zeros.
        let never = render_usage(&used("never", None), Bucket::Day, None);
        assert!(never.contains("no request recorded") && never.contains("last used: never"));
    }

    #[test]
    fn sparklines_scale_to_the_busiest_bucket() {
        assert_eq!(sparkline(&[0, 1, 4, 8]), " ▂▅█");
        assert_eq!(sparkline(&[0, 0]), "  ");
        assert_eq!(sparkline(&[]), "");
    }
}
