//! The dashboard's key list at 10,000 ApiKeys on a real API server (issue 17).
//!
//! It starts a throwaway etcd and kube-apiserver the way the cluster tests do,
//! creates N ApiKeys across namespaces with a realistic status (Ready, 30 days
//! and 24 hours of usage, last use; some needing attention), starts the
//! release `kubectl-keyward dashboard`, and times over HTTP:
//!
//! - the first load of the list (it waits for the watch's initial list);
//! - later loads: the first page, a namespace filter, a search, "needs
//!   attention only" and the last page, each repeated;
//! - the baseline in the same run: one LIST of every ApiKey from the API server
//!   with a Rust client, which is what a page without a cache would pay at least;
//! - the dashboard's peak RSS with every namespace shown, and with one
//!   namespace shown (`--namespaces`), which is what watching only the shown
//!   namespaces buys.
//!
//! Run: `cargo bench --bench dashboard -- --keys 10000`. Figures are in
//! docs/benchmarks.md.

// Shared with the cluster tests; this bench uses only part of it.
#[allow(dead_code, unused_imports)]
#[path = "../tests/cluster/harness.rs"]
mod harness;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{StreamExt, stream};
use harness::{Cluster, Guard, PLUGIN};
use k8s_openapi::api::core::v1::Namespace;
use keyward::crd::ApiKey;
use kube::{
    Api, Client, Config,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// ApiKeys to create.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Namespaces they are spread over.
    #[arg(long, default_value_t = 20)]
    namespaces: usize,
    /// Loads of each later page.
    #[arg(long, default_value_t = 10)]
    repeat: usize,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let Some(cluster) = Cluster::start("dashboard benchmark") else {
        return;
    };
    let crd = Command::new(harness::OPERATOR)
        .args(["crd", "apikey"])
        .output()
        .unwrap();
    cluster
        .try_kubectl_with_input(
            &["apply", "--server-side", "-f", "-"],
            Some(&String::from_utf8(crd.stdout).unwrap()),
        )
        .unwrap();
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/apikeys.keyward.dev",
        "--timeout=60s",
    ]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(client(&cluster.kubeconfig));
    let started = Instant::now();
    runtime.block_on(create(&client, args.keys, args.namespaces));
    eprintln!(
        "dashboard: {} ApiKeys with status in {:.0?}",
        args.keys,
        started.elapsed()
    );
    let baseline: Vec<Duration> = (0..args.repeat)
        .map(|_| {
            let start = Instant::now();
            let listed = runtime
                .block_on(Api::<ApiKey>::all(client.clone()).list(&ListParams::default()))
                .unwrap();
            assert_eq!(listed.items.len(), args.keys);
            start.elapsed()
        })
        .collect();

    let everywhere = Dashboard::start(&cluster.kubeconfig, &[]);
    let cookie = everywhere.session();
    let start = Instant::now();
    let first = everywhere.get("/", &cookie);
    let first_load = start.elapsed();
    assert!(
        first.contains(&format!("of {} keys", args.keys)),
        "{}",
        &first[..first.len().min(2000)]
    );
    let pages = [
        ("first page", "/".to_owned()),
        ("one namespace", "/?ns=bench-3".to_owned()),
        ("search", "/?q=key-0042".to_owned()),
        ("needs attention", "/?attention=1".to_owned()),
        ("last page", format!("/?page={}", args.keys / 100)),
    ];
    let mut rows = Vec::new();
    for (what, path) in &pages {
        let times: Vec<Duration> = (0..args.repeat)
            .map(|_| {
                let start = Instant::now();
                let body = everywhere.get(path, &cookie);
                assert!(body.contains("table class=\"keys\""), "{what}");
                start.elapsed()
            })
            .collect();
        rows.push((what.to_string(), times));
    }
    let rss_everywhere = everywhere.peak_rss_kib();
    drop(everywhere);

    let one = Dashboard::start(&cluster.kubeconfig, &["--namespaces", "bench-3"]);
    let cookie = one.session();
    let body = one.get("/", &cookie);
    let per_namespace = args.keys.div_ceil(args.namespaces);
    assert!(body.contains(&format!("of {per_namespace} keys")) || body.contains(" keys"));
    let rss_one = one.peak_rss_kib();

    println!(
        "\n| {} ApiKeys in {} namespaces | median | max |",
        args.keys, args.namespaces
    );
    println!("| --- | --- | --- |");
    println!("| first load (watch's initial list) | {first_load:.0?} | |");
    for (what, times) in &rows {
        println!(
            "| {what} | {:.1?} | {:.1?} |",
            median(times),
            times.iter().max().unwrap()
        );
    }
    println!(
        "| baseline: one LIST of every ApiKey (Rust client) | {:.0?} | {:.0?} |",
        median(&baseline),
        baseline.iter().max().unwrap()
    );
    println!(
        "\npeak RSS: every namespace shown {:.1} MiB; one namespace shown {:.1} MiB",
        rss_everywhere as f64 / 1024.0,
        rss_one as f64 / 1024.0
    );
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

async fn client(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// `count` ApiKeys across `namespaces`, each with the status the operator would
/// write: Ready, usage for 30 days and 24 hours, a last use. Every 50th is not
/// Ready and every 70th was last used 40 days ago, so attention has rows.
async fn create(client: &Client, count: usize, namespaces: usize) {
    for n in 0..namespaces {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("bench-{n}")}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
    let now = jiff::Timestamp::now();
    let today = now.as_second().div_euclid(86_400) * 86_400;
    let day_start = jiff::Timestamp::from_second(today - 29 * 86_400).unwrap();
    let hour_start =
        jiff::Timestamp::from_second(now.as_second().div_euclid(3600) * 3600 - 23 * 3600).unwrap();
    stream::iter(0..count)
        .map(|i| {
            let namespace = format!("bench-{}", i % namespaces);
            let api: Api<ApiKey> = Api::namespaced(client.clone(), &namespace);
            let key: ApiKey = serde_json::from_value(json!({
                "apiVersion": "keyward.dev/v1alpha1",
                "kind": "ApiKey",
                "metadata": {"name": format!("key-{i:05}"), "namespace": namespace},
                "spec": {"owner": format!("owner-{}@example.com", i % 97), "team": format!("team-{}", i % 13), "scopes": ["inference", "metrics"]},
            }))
            .unwrap();
            let daily: Vec<i64> = (0..30).map(|d| ((i * 7 + d * 13) % 500) as i64).collect();
            let hourly: Vec<i64> = (0..24).map(|h| ((i + h * 3) % 40) as i64).collect();
            let ready = if i % 50 == 0 { ("False", "SecretConflict") } else { ("True", "KeyIssued") };
            let last_used = if i % 70 == 0 { now - jiff::SignedDuration::from_hours(40 * 24) } else { now };
            let status = json!({"status": {
                "conditions": [{"type": "Ready", "status": ready.0, "reason": ready.1, "message": "bench", "lastTransitionTime": now.to_string()}],
                "keyId": format!("kid{i:08}"), "keyHint": "kw_abcd", "secretName": format!("key-{i:05}"),
                "issuedAt": now.to_string(), "revision": 1, "lastUsedAt": last_used.to_string(),
                "usage": {"updatedAt": now.to_string(), "last24h": hourly.iter().sum::<i64>(), "last7d": daily[23..].iter().sum::<i64>(), "refusedLast24h": 0,
                    "daily": {"start": day_start.to_string(), "valid": daily},
                    "hourly": {"start": hour_start.to_string(), "valid": hourly}},
            }});
            async move {
                let name = key.metadata.name.clone().unwrap();
                api.create(&PostParams::default(), &key).await.unwrap();
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// A running release dashboard.
struct Dashboard {
    process: Guard,
    address: SocketAddr,
    path_and_token: String,
}

impl Dashboard {
    fn start(kubeconfig: &Path, extra: &[&str]) -> Dashboard {
        let mut child = Command::new(PLUGIN)
            .args(["dashboard", "--no-open"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("keyward dashboard: http://")
            .unwrap();
        let (address, path) = url.split_once('/').unwrap();
        Dashboard {
            process: Guard(child),
            address: address.parse().unwrap(),
            path_and_token: format!("/{path}"),
        }
    }

    fn session(&self) -> String {
        let reply = self.request(&self.path_and_token, "");
        let cookie = reply
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .unwrap();
        cookie.split(';').next().unwrap().to_owned()
    }

    fn get(&self, path: &str, cookie: &str) -> String {
        let reply = self.request(path, cookie);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "{path}: {}",
            &reply[..reply.len().min(500)]
        );
        reply
    }

    fn request(&self, path: &str, cookie: &str) -> String {
        let mut stream = TcpStream::connect(self.address).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
            self.address
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    /// VmHWM of the process, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.process.0.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
}
