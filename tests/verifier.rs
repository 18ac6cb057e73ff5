//! The verifier against real databases (SQLite and the throwaway PostgreSQL):
//! the HTTP check, `/v1/verify` and Envoy ext_authz over gRPC, revocation,
//! rotation grace, scopes, last used, bad requests, a PostgreSQL restart, and
//! the leak check of its logs and metrics.

#[path = "support/postgres.rs"]
mod postgres;
mod support;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use envoy_types::{
    ext_authz::v3::pb::CheckRequest,
    pb::envoy::service::auth::v3::{
        AttributeContext,
        attribute_context::{HttpRequest, Request as AttributeRequest},
        authorization_client::AuthorizationClient,
    },
};
use jiff::Timestamp;
use keyward::{
    key::{KeyFactory, SeededEntropy},
    store::{KeyRecord, KeyStore, RevokeReason, SqlStore},
    telemetry::Metrics,
    verifier::{
        Checked, Code, Verifier, VerifierConfig,
        listen::{VerifierSettings, start},
    },
};

/// Issues keys straight into a key database, as the operator would.
struct Issuer {
    store: Arc<SqlStore>,
    keys: KeyFactory,
}

impl Issuer {
    fn new(store: Arc<SqlStore>, seed: u64) -> Self {
        Self {
            store,
            keys: KeyFactory::new("kw", Arc::new(SeededEntropy::new(seed))).unwrap(),
        }
    }

    /// A new active key with these scopes, expiring at `expires_at`.
    async fn issue(&self, scopes: &[&str], expires_at: Option<Timestamp>) -> (String, KeyRecord) {
        let (plain, record) =
            support::issue_active(&self.store, &self.keys, "inference", scopes, expires_at).await;
        (plain.expose().to_owned(), record)
    }

    /// A well-formed key that is in no database.
    fn stranger(&self) -> String {
        self.keys.new_key().unwrap().expose().to_owned()
    }
}

/// A plain HTTP/1.1 response.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 request over a fresh connection; `headers` are raw lines.
fn http(address: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> Reply {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: verifier\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    if !body.is_empty() {
        // JSON unless the caller names a content type (or none: "Content-Type:").
        if !headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("content-type:"))
        {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `POST /v1/verify` → (code, whole answer).
fn verify_json(address: SocketAddr, key: &str, scopes: &[&str]) -> (String, serde_json::Value) {
    let body = serde_json::json!({"key": key, "scopes": scopes}).to_string();
    let reply = http(address, "POST", "/v1/verify", &[], &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    (answer["code"].as_str().unwrap().to_owned(), answer)
}

/// Polls `/v1/verify` until it answers `code`; panics after `limit`.
fn wait_for_code(address: SocketAddr, key: &str, code: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if verify_json(address, key, &[]).0 == code {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "no {code} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn start_verifier(store: Arc<SqlStore>, url: &str) -> (Arc<Verifier>, SocketAddr) {
    let settings = VerifierSettings {
        address: "127.0.0.1:0".parse().unwrap(),
        key_header: "X-Api-Key".into(),
        config: VerifierConfig {
            max_staleness: Duration::from_secs(10),
            ..VerifierConfig::default()
        },
        primary_database_url: None,
    };
    start(store, url, settings, Arc::new(Metrics::default()))
        .await
        .unwrap()
}

async fn wait_ready(address: SocketAddr) {
    let started = Instant::now();
    while tokio::task::spawn_blocking(move || http(address, "GET", "/readyz", &[], "").status)
        .await
        .unwrap()
        != 200
    {
        assert!(started.elapsed() < Duration::from_secs(10), "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gRPC CheckRequest with these request headers and route scopes.
fn check_request(headers: &[(&str, &str)], scopes: Option<&str>) -> CheckRequest {
    let http = HttpRequest {
        method: "GET".into(),
        path: "/v1/models".into(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..HttpRequest::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttributeRequest {
                http: Some(http),
                ..AttributeRequest::default()
            }),
            context_extensions: scopes
                .map(|s| HashMap::from([("keyward-scopes".to_owned(), s.to_owned())]))
                .unwrap_or_default(),
            ..AttributeContext::default()
        }),
    }
}

/// The whole contract on one database.
async fn contract(store: SqlStore, url: &str, revocation_limit: Duration) {
    let store = Arc::new(store);
    let issuer = Issuer::new(store.clone(), 11);
    let (key, record) = issuer.issue(&["inference", "models:read"], None).await;
    let grace_ends = Timestamp::now() + jiff::SignedDuration::from_secs(2);
    let (retiring, retiring_record) = issuer.issue(&["inference"], None).await;
    store
        .retire(&retiring_record.key_id, grace_ends, Timestamp::now())
        .await
        .unwrap();
    let (verifier, address) = start_verifier(store.clone(), url).await;
    wait_ready(address).await;

    let key_for = key.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let key = key_for;
        let bearer = format!("Authorization: Bearer {key}");
        // The HTTP check: 200 with identity headers, by either header.
        let ok = http(address, "GET", "/check?scope=inference", &[&bearer], "");
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers["x-keyward-owner"], "alice@example.com");
        assert_eq!(ok.headers["x-keyward-team"], "ml");
        assert_eq!(ok.headers["x-keyward-scopes"], "inference models:read");
        assert_eq!(ok.headers["x-keyward-namespace"], "team-ml");
        assert_eq!(ok.headers["x-keyward-name"], "inference");
        let by_header = http(
            address,
            "GET",
            "/check/v1/models?scope=models:read",
            &[&format!("X-Api-Key: {key}")],
            "",
        );
        assert_eq!(by_header.status, 200);
        let by_scope_header = http(
            address,
            "GET",
            "/check",
            &[&bearer, "X-Keyward-Required-Scopes: inference, admin"],
            "",
        );
        assert_eq!(by_scope_header.status, 403);
        assert_eq!(
            ok.headers["x-envoy-auth-headers-to-remove"],
            "authorization"
        );
        assert_eq!(
            by_header.headers["x-envoy-auth-headers-to-remove"],
            "x-api-key"
        );
        // Repeated scope parameters all count; so do scopes in the path, for
        // gateways that append the original path and query to a prefix.
        let repeated = http(
            address,
            "GET",
            "/check?scope=inference&scope=admin",
            &[&bearer],
            "",
        );
        assert_eq!(repeated.status, 403);
        let in_path = http(
            address,
            "GET",
            "/check/scopes/inference,models:read/v1/models?scope=x",
            &[&bearer],
            "",
        );
        assert_eq!(in_path.status, 403, "the appended query's scope counts too");
        let in_path = http(
            address,
            "GET",
            "/check/scopes/inference,models:read/v1/models?a=b",
            &[&bearer],
            "",
        );
        assert_eq!(in_path.status, 200);
        let in_path = http(
            address,
            "GET",
            "/check/scopes/admin/v1/models",
            &[&bearer],
            "",
        );
        assert_eq!(in_path.status, 403);
        // A missing scope: 403 naming it.
        let forbidden = http(address, "GET", "/check?scope=admin", &[&bearer], "");
        assert_eq!(forbidden.status, 403);
        assert_eq!(
            forbidden.headers["www-authenticate"],
            "Bearer error=\"insufficient_scope\", scope=\"admin\""
        );
        // Bad requests: each a definite 401.
        let long = format!("Authorization: Bearer {}", "k".repeat(300));
        let two = [bearer.as_str(), bearer.as_str()];
        let both = [bearer.as_str(), &format!("X-Api-Key: {key}")];
        let mut bad_checksum = key.clone();
        bad_checksum.pop();
        bad_checksum.push(if key.ends_with('A') { 'B' } else { 'A' });
        let stranger_line = format!(
            "Authorization: Bearer {}",
            "kw_".to_owned() + &"a".repeat(49)
        );
        let bad: Vec<Vec<&str>> = vec![
            vec![],
            vec!["Authorization: "],
            vec!["Authorization: Bearer"],
            vec![&long],
            two.to_vec(),
            both.to_vec(),
            vec![&stranger_line],
            vec!["X-Token: whatever"],
        ];
        for headers in bad {
            let reply = http(address, "GET", "/check", &headers, "");
            assert_eq!(reply.status, 401, "{headers:?}");
            assert_eq!(
                reply.headers["www-authenticate"],
                "Bearer error=\"invalid_token\""
            );
        }
        let checksum_line = format!("Authorization: Bearer {bad_checksum}");
        assert_eq!(
            http(address, "GET", "/check", &[&checksum_line], "").status,
            401
        );
        assert_eq!(verify_json(address, &bad_checksum, &[]).0, "MALFORMED");
        // The key in a header that is not a key header.
        let wrong = format!("X-Token: {key}");
        assert_eq!(http(address, "GET", "/check", &[&wrong], "").status, 401);

        // POST /v1/verify: always 200 for an answered question.
        let (code, answer) = verify_json(address, &key, &["inference"]);
        assert_eq!(code, "VALID");
        assert_eq!(answer["valid"], true);
        assert_eq!(answer["key"]["owner"], "alice@example.com");
        assert_eq!(
            verify_json(address, &key, &["admin"]).0,
            "INSUFFICIENT_SCOPE"
        );
        // A body that is not {"key": string, "scopes": [string]} asks nothing: 422.
        let scopes_as_key = serde_json::json!({"key": key, "scopes": key}).to_string();
        for body in [
            r#"["x"]"#,
            &format!(r#"["{key}"]"#),
            "not json",
            "{",
            r#"{"key": 1}"#,
            r#"{"scopes": []}"#,
            r#"{"key": "x", "other": 1}"#,
            "null",
            &scopes_as_key,
        ] {
            let reply = http(address, "POST", "/v1/verify", &[], body);
            assert_eq!(reply.status, 422, "{body}: {}", reply.body);
            let answer: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            assert!(answer["error"].is_string(), "{}", reply.body);
            assert!(!reply.body.contains(&key[3..]), "the key is not echoed");
        }
        let body = serde_json::json!({"key": key}).to_string();
        for content_type in ["Content-Type: text/plain", "Content-Type:"] {
            let reply = http(address, "POST", "/v1/verify", &[content_type], &body);
            assert_eq!(reply.status, 415, "{content_type}");
        }
        let reply = http(
            address,
            "POST",
            "/v1/verify",
            &["Content-Type: application/json; charset=utf-8"],
            &body,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(http(address, "GET", "/v1/verify", &[], "").status, 405);
    });
    checks.await.unwrap();

    // A well-formed unknown key, asked many times, costs one query.
    let stranger = issuer.stranger();
    for _ in 0..20 {
        let address_copy = address;
        let stranger = stranger.clone();
        let code = tokio::task::spawn_blocking(move || verify_json(address_copy, &stranger, &[]).0)
            .await
            .unwrap();
        assert_eq!(code, "UNKNOWN");
    }

    // Envoy ext_authz over gRPC.
    let mut client = AuthorizationClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let bearer = format!("Bearer {key}");
    let allowed = client
        .check(check_request(
            &[("authorization", &bearer)],
            Some("inference"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.status.as_ref().unwrap().code, 0, "OK");
    let ok = match allowed.http_response.unwrap() {
        envoy_types::ext_authz::v3::pb::HttpResponse::OkResponse(ok) => ok,
        other => panic!("expected an OkResponse, got {other:?}"),
    };
    let added: HashMap<String, String> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert_eq!(added["x-keyward-key-id"], record.key_id);
    assert_eq!(added["x-keyward-scopes"], "inference models:read");
    // Every identity header replaces what the client sent, whatever the Envoy
    // release: `append_action` is OVERWRITE_IF_EXISTS_OR_ADD and the deprecated
    // `append` is left unset (Envoy refuses both at once).
    let identity: Vec<&str> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| h.key.as_str())
        .collect();
    assert_eq!(
        identity,
        [
            "x-keyward-key-id",
            "x-keyward-owner",
            "x-keyward-team",
            "x-keyward-scopes",
            "x-keyward-namespace",
            "x-keyward-name",
            "x-keyward-cluster"
        ]
    );
    assert_eq!(added["x-keyward-cluster"], "default");
    for option in &ok.headers {
        assert_eq!(
            option.append_action(),
            envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd,
            "{:?} must overwrite",
            option.header.as_ref().map(|h| &h.key)
        );
        #[allow(deprecated)]
        let append = option.append;
        assert_eq!(append, None);
    }
    assert_eq!(ok.headers_to_remove, vec!["authorization".to_owned()]);
    let denied_status = |response: envoy_types::ext_authz::v3::pb::CheckResponse| match response
        .http_response
        .unwrap()
    {
        envoy_types::ext_authz::v3::pb::HttpResponse::DeniedResponse(denied) => {
            denied.status.unwrap().code
        }
        other => panic!("expected a DeniedResponse, got {other:?}"),
    };
    let no_scope = client
        .check(check_request(&[("x-api-key", &key)], Some("admin")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        no_scope.status.as_ref().unwrap().code,
        7,
        "PERMISSION_DENIED"
    );
    assert_eq!(denied_status(no_scope), 403);
    let no_key = client
        .check(check_request(&[], Some("inference")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(no_key.status.as_ref().unwrap().code, 16, "UNAUTHENTICATED");
    assert_eq!(denied_status(no_key), 401);

    // A key issued now verifies at once, before the verifier follows the change.
    let (fresh, _) = issuer.issue(&["inference"], None).await;
    let address_copy = address;
    let fresh_code = tokio::task::spawn_blocking(move || verify_json(address_copy, &fresh, &[]).0)
        .await
        .unwrap();
    assert_eq!(fresh_code, "VALID");

    // A rotated-out key verifies until its grace period ends.
    let retiring_copy = retiring.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(verify_json(address, &retiring_copy, &[]).0, "VALID");
        wait_for_code(address, &retiring_copy, "EXPIRED", Duration::from_secs(5));
    })
    .await
    .unwrap();

    // Revocation reaches the verifier within the bound.
    store
        .revoke(&record.key_id, RevokeReason::Deleted, Timestamp::now())
        .await
        .unwrap();
    let key_copy = key.clone();
    let took = tokio::task::spawn_blocking(move || {
        wait_for_code(address, &key_copy, "REVOKED", revocation_limit)
    })
    .await
    .unwrap();
    eprintln!("revocation seen after {took:?}");

    // Last used: one batched, forward-only write at minute resolution.
    let flushed = verifier.flush_usage().await.unwrap();
    assert!(flushed >= 1, "{flushed}");
    let used = store.load(&record.apikey_uid).await.unwrap().last_used_at;
    let used = used.expect("last_used_at recorded");
    assert_eq!(used.as_second() % 60, 0, "minute resolution");
    assert!(
        used <= Timestamp::now() && used > Timestamp::now() - jiff::SignedDuration::from_mins(2)
    );

    // The key never reaches the metrics.
    let metrics =
        tokio::task::spawn_blocking(move || http(address, "GET", "/metrics", &[], "").body)
            .await
            .unwrap();
    assert!(metrics.contains("keyward_verify_total"), "{metrics}");
    // The stranger asked 20 times cost one database query; the rest came from memory.
    assert!(
        metrics.contains(r#"keyward_verifier_fallbacks_total{outcome="unknown"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(&key[3..]) && !metrics.contains(&retiring[3..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_verifier_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    contract(store, &url, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verifier_keeps_the_contract() {
    let Some(url) = support::postgres_database("postgres_verifier_keeps_the_contract").await else {
        return;
    };
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    contract(store, &url, Duration::from_secs(3)).await;
}

/// Whether PostgreSQL's server binaries are here for a test that stops and
/// starts its own server; skips (or fails under CI) when not.
fn postgres_binaries(test: &str) -> bool {
    if !std::path::Path::new("/usr/lib/postgresql").exists()
        && Command::new("sh")
            .args(["-c", "command -v initdb"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: PostgreSQL is required in CI");
        }
        eprintln!("SKIP: {test}: no PostgreSQL server binaries");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_no_revocation() {
    if !postgres_binaries("a_postgres_restart_loses_no_revocation") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = postgres::Postgres::start(dir.path());
    let store = Arc::new(SqlStore::connect(&pg.url).await.unwrap());
    store.migrate().await.unwrap();
    let issuer = Issuer::new(store.clone(), 21);
    let (kept, _) = issuer.issue(&["inference"], None).await;
    let (doomed, doomed_record) = issuer.issue(&["inference"], None).await;
    let (verifier, address) = start_verifier(store.clone(), &pg.url).await;
    wait_ready(address).await;

    // Down: known keys keep verifying from memory.
    pg.stop();
    let kept_copy = kept.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(verify_json(address, &kept_copy, &[]).0, "VALID");
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Back: a revocation made at once (its NOTIFY may reach no listener yet) is seen.
    pg.restart();
    let revoker = SqlStore::connect(&pg.url).await.unwrap();
    revoker
        .revoke(
            &doomed_record.key_id,
            RevokeReason::Deleted,
            Timestamp::now(),
        )
        .await
        .unwrap();
    let took = tokio::task::spawn_blocking(move || {
        wait_for_code(address, &doomed, "REVOKED", Duration::from_secs(3))
    })
    .await
    .unwrap();
    eprintln!("revocation after the restart seen after {took:?}");
    assert!(verifier.is_ready().is_ok());

    // A verifier started while the database is down is not ready and never says valid.
    pg.stop();
    let (_late, late_address) = start_verifier(store.clone(), &pg.url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept_copy = kept.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(http(late_address, "GET", "/readyz", &[], "").status, 503);
        let bearer = format!("Authorization: Bearer {kept_copy}");
        assert_eq!(
            http(late_address, "GET", "/check", &[&bearer], "").status,
            503
        );
        let body = serde_json::json!({"key": kept_copy}).to_string();
        assert_eq!(
            http(late_address, "POST", "/v1/verify", &[], &body).status,
            503
        );
    })
    .await
    .unwrap();
    pg.restart();
    wait_ready(late_address).await;
}

/// Leaves a socket file nobody listens on where the stopped server's was, as a
/// killed postmaster does: connecting is then refused (ECONNREFUSED), which
/// sqlx retries until its acquire timeout, rather than failing at once on a
/// missing file. The server removes it when it starts again.
fn stale_socket(pg_dir: &std::path::Path) {
    let path = pg_dir.join(".s.PGSQL.5432");
    let _ = std::fs::remove_file(&path);
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
}

/// `keyward verifier` on a free local port, its log in `log`; killed on drop.
struct VerifierProcess {
    child: std::process::Child,
    address: SocketAddr,
}

impl VerifierProcess {
    fn start(url: &str, log: &std::path::Path) -> Self {
        Self::start_with(url, log, &[])
    }

    fn start_with(url: &str, log: &std::path::Path, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["verifier", "--database-url", url, "--address"])
            .arg(address.to_string())
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Self { child, address }
    }

    /// Waits until the port answers; panics if the process exits first.
    fn wait_listening(&mut self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(self.address).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("keyward verifier exited with {status}");
            }
            assert!(started.elapsed() < Duration::from_secs(20), "not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VerifierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gRPC status code of an ext_authz Check.
async fn grpc_code(address: SocketAddr, key: &str) -> i32 {
    let mut client = AuthorizationClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let bearer = format!("Bearer {key}");
    client
        .check(check_request(&[("authorization", &bearer)], None))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_started_while_postgres_is_down_serves_probes_and_becomes_ready() {
    let test = "a_verifier_started_while_postgres_is_down_serves_probes_and_becomes_ready";
    if !postgres_binaries(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = postgres::Postgres::start(dir.path());
    let key = {
        let store = Arc::new(SqlStore::connect(&pg.url).await.unwrap());
        store.migrate().await.unwrap();
        let key = Issuer::new(store.clone(), 41)
            .issue(&["inference"], None)
            .await
            .0;
        store.close().await;
        key
    };
    pg.stop();
    stale_socket(&pg.dir);

    // The library entry, and the real binary.
    let started = Instant::now();
    let lazy = Arc::new(SqlStore::connect_lazy(&pg.url).unwrap());
    let (_verifier, library) = start_verifier(lazy, &pg.url).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "started at once"
    );
    let (url, log) = (pg.url.clone(), dir.path().join("verifier.log"));
    let mut process = tokio::task::spawn_blocking(move || {
        let mut process = VerifierProcess::start(&url, &log);
        process.wait_listening();
        process
    })
    .await
    .unwrap();
    let binary = process.address;

    for address in [library, binary] {
        let key_copy = key.clone();
        let asked = Instant::now();
        tokio::task::spawn_blocking(move || {
            let key = key_copy;
            assert_eq!(http(address, "GET", "/healthz", &[], "").status, 200);
            let readyz = http(address, "GET", "/readyz", &[], "");
            assert_eq!(readyz.status, 503, "{}", readyz.body);
            let bearer = format!("Authorization: Bearer {key}");
            assert_eq!(http(address, "GET", "/check", &[&bearer], "").status, 503);
            let body = serde_json::json!({"key": key}).to_string();
            assert_eq!(http(address, "POST", "/v1/verify", &[], &body).status, 503);
        })
        .await
        .unwrap();
        assert_eq!(grpc_code(address, &key).await, 14, "UNAVAILABLE");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "answered at once: {:?}",
            asked.elapsed()
        );
    }
    // Still serving well past the pool's 5 s acquire timeout: no exit, no crash loop.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(started.elapsed())).await;
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the verifier exited"
    );

    pg.restart();
    for address in [library, binary] {
        wait_ready(address).await;
        let key = key.clone();
        let code = tokio::task::spawn_blocking(move || verify_json(address, &key, &[]).0)
            .await
            .unwrap();
        assert_eq!(code, "VALID");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_postgres_outage_a_key_not_in_memory_is_answered_at_once_and_refused() {
    let test = "during_a_postgres_outage_a_key_not_in_memory_is_answered_at_once_and_refused";
    if !postgres_binaries(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = postgres::Postgres::start(dir.path());
    let store = Arc::new(SqlStore::connect(&pg.url).await.unwrap());
    store.migrate().await.unwrap();
    let issuer = Issuer::new(store.clone(), 51);
    let (known, _) = issuer.issue(&["inference"], None).await;
    let (_verifier, address) = start_verifier(store.clone(), &pg.url).await;
    wait_ready(address).await;
    pg.stop();

    let strangers: Vec<String> = (0..4).map(|_| issuer.stranger()).collect();
    let pg_dir = pg.dir.clone();
    tokio::task::spawn_blocking(move || {
        // Right after the stop, and again once the verifier knows it is down;
        // first with the socket gone, then with a stale one that refuses.
        for (round, stranger) in strangers.iter().enumerate() {
            if round == 2 {
                stale_socket(&pg_dir);
            }
            let bearer = format!("Authorization: Bearer {stranger}");
            let asked = Instant::now();
            let check = http(address, "GET", "/check", &[&bearer], "");
            let body = serde_json::json!({"key": stranger}).to_string();
            let verify = http(address, "POST", "/v1/verify", &[], &body);
            let took = asked.elapsed();
            assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
            assert_eq!(check.status, 503, "round {round}: {}", check.body);
            assert_eq!(verify.status, 503, "round {round}: {}", verify.body);
            assert!(!verify.body.contains("VALID"));
            // Known keys still answer from memory.
            assert_eq!(verify_json(address, &known, &[]).0, "VALID");
            std::thread::sleep(Duration::from_millis(700));
        }
    })
    .await
    .unwrap();
}

/// A full reload over a real database keeps unchanged keys as they are and
/// drops the revoked ones, without the follower.
async fn reload_in_place(store: SqlStore) {
    let store = Arc::new(store);
    let issuer = Issuer::new(store.clone(), 61);
    let (kept, _) = issuer.issue(&["inference"], None).await;
    let (doomed, doomed_record) = issuer.issue(&["inference"], None).await;
    let verifier = Verifier::new(
        store.clone(),
        Arc::new(keyward::clock::SystemClock),
        VerifierConfig::default(),
        Arc::new(Metrics::default()),
    );
    assert_eq!(verifier.reload().await.unwrap(), 2);
    let identity = |checked: Checked| match checked {
        Checked::Answer(verdict) => verdict.identity.unwrap(),
        other => panic!("{other:?}"),
    };
    let before = identity(verifier.check(&kept, &[]).await);
    store
        .revoke(
            &doomed_record.key_id,
            RevokeReason::Deleted,
            Timestamp::now(),
        )
        .await
        .unwrap();
    let (added, _) = issuer.issue(&[], None).await;
    assert_eq!(verifier.reload().await.unwrap(), 2);
    let after = identity(verifier.check(&kept, &[]).await);
    assert!(
        Arc::ptr_eq(&before, &after),
        "the unchanged key was kept in place"
    );
    for (key, code) in [
        (&kept, Code::Valid),
        (&added, Code::Valid),
        (&doomed, Code::Revoked),
    ] {
        match verifier.check(key, &[]).await {
            Checked::Answer(verdict) => assert_eq!(verdict.code, code),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn sqlite_reload_updates_the_key_set_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    reload_in_place(store).await;
}

#[tokio::test]
async fn postgres_reload_updates_the_key_set_in_place() {
    let Some(store) = support::postgres_store("postgres_reload_updates_the_key_set_in_place").await
    else {
        return;
    };
    reload_in_place(store).await;
}

#[test]
fn verifier_logs_never_show_a_key() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let (store, key, record, stranger) = runtime.block_on(async {
        let store = Arc::new(SqlStore::connect(&url).await.unwrap());
        store.migrate().await.unwrap();
        let issuer = Issuer::new(store.clone(), 31);
        let (key, record) = issuer.issue(&["inference"], None).await;
        (store, key, record, issuer.stranger())
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("verifier.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["verifier", "--database-url", &url, "--address"])
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(address).is_err()
        || http(address, "GET", "/readyz", &[], "").status != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "verifier did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for presented in [&key, &stranger] {
        let bearer = format!("Authorization: Bearer {presented}");
        http(address, "GET", "/check?scope=inference", &[&bearer], "");
        verify_json(address, presented, &["admin"]);
    }
    runtime.block_on(async {
        store
            .revoke(&record.key_id, RevokeReason::Deleted, Timestamp::now())
            .await
            .unwrap();
    });
    wait_for_code(address, &key, "REVOKED", Duration::from_secs(3));
    let metrics = http(address, "GET", "/metrics", &[], "").body;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap() + &metrics;
    assert!(text.contains("key set loaded"), "the log was captured");
    for secret in [&key, &stranger] {
        assert!(
            !text.contains(&secret[3..]),
            "a key body in the verifier's log or metrics"
        );
    }
}

/// The `GRANT` statements of the verifier's role in docs/verifier.md, for
/// `role` on `database`.
fn documented_grants(role: &str, database: &str) -> Vec<String> {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/verifier.md")).unwrap();
    let block = docs
        .split("```sql\n")
        .find(|block| block.starts_with("CREATE ROLE keyward_verifier"))
        .and_then(|block| block.split("```").next())
        .expect("docs/verifier.md has the role's SQL");
    block
        .lines()
        .filter(|line| line.starts_with("GRANT "))
        .map(|line| {
            line.replace("keyward_verifier", role)
                .replace("DATABASE keyward ", &format!("DATABASE \"{database}\" "))
        })
        .collect()
}

/// Two verifier replicas, each with the role docs/verifier.md grants, count
/// into one PostgreSQL: the counts per key, hour and outcome add up exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_verifiers_count_into_one_postgres_exactly() {
    let test = "two_verifiers_count_into_one_postgres_exactly";
    let Some(url) = support::postgres_database(test).await else {
        return;
    };
    let owner = Arc::new(SqlStore::connect(&url).await.unwrap());
    owner.migrate().await.unwrap();
    let database = url
        .split('?')
        .next()
        .and_then(|base| base.rsplit('/').next())
        .unwrap()
        .to_owned();
    let role = format!("kv_{}", std::process::id());
    let admin = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )))
    .execute(&admin)
    .await
    .unwrap();
    for grant in documented_grants(&role, &database) {
        sqlx::query(sqlx::AssertSqlSafe(grant))
            .execute(&admin)
            .await
            .unwrap();
    }
    let role_url = url.replacen("://postgres@", &format!("://{role}@"), 1);
    assert_ne!(
        role_url, url,
        "the test server's URL names the postgres user"
    );

    let issuer = Issuer::new(owner.clone(), 23);
    let (key, record) = issuer.issue(&["inference"], None).await;
    let (revoked, revoked_record) = issuer.issue(&[], None).await;
    owner
        .revoke(
            &revoked_record.key_id,
            RevokeReason::Deleted,
            Timestamp::now(),
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let mut process = VerifierProcess::start_with(
            &role_url,
            &dir.path().join(name),
            &["--last-used-flush", "1"],
        );
        process.wait_listening();
        process
    };
    let (a, b) = (start("a.log"), start("b.log"));
    for verifier in [&a, &b] {
        wait_ready(verifier.address).await;
    }
    let (a_address, b_address) = (a.address, b.address);
    let sent = tokio::task::spawn_blocking(move || {
        let bearer = format!("Authorization: Bearer {key}");
        let revoked_bearer = format!("Authorization: Bearer {revoked}");
        let send = |address, path: &str, header: &str, expected: u16, times: usize| {
            for _ in 0..times {
                assert_eq!(http(address, "GET", path, &[header], "").status, expected);
            }
        };
        send(a_address, "/check?scope=inference", &bearer, 200, 37);
        send(b_address, "/check?scope=inference", &bearer, 200, 25);
        send(b_address, "/check?scope=admin", &bearer, 403, 4);
        send(a_address, "/check", &revoked_bearer, 401, 3);
        send(b_address, "/check", &revoked_bearer, 401, 2);
    });
    sent.await.unwrap();

    let totals = || async {
        let mut totals: HashMap<(String, String), i64> = HashMap::new();
        for row in sqlx::query("SELECT key_id, outcome, CAST(SUM(count) AS BIGINT) AS n FROM key_usage GROUP BY key_id, outcome")
            .fetch_all(&admin)
            .await
            .unwrap()
        {
            use sqlx::Row;
            totals.insert((row.get("key_id"), row.get("outcome")), row.get("n"));
        }
        totals
    };
    let expected = HashMap::from([
        ((record.key_id.clone(), "valid".to_owned()), 62),
        ((record.key_id.clone(), "insufficient_scope".to_owned()), 4),
        ((revoked_record.key_id.clone(), "revoked".to_owned()), 5),
    ]);
    let started = Instant::now();
    loop {
        let now = totals().await;
        if now == expected {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "counts in the database: {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Exactly: more flushes add nothing.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(totals().await, expected);
    let used = owner.load(&record.apikey_uid).await.unwrap().last_used_at;
    assert!(used.is_some(), "last use recorded by the same flushes");
    assert!(
        owner.usage_reporting().await.unwrap().is_some(),
        "the verifiers report"
    );
    // The documented role may not delete usage, nor touch the audit trail.
    let as_role = sqlx::AnyPool::connect(&role_url).await.unwrap();
    for forbidden in [
        "DELETE FROM key_usage",
        "UPDATE key_usage SET outcome = 'valid'",
        "SELECT count(*) FROM key_audit",
    ] {
        assert!(
            sqlx::query(forbidden).execute(&as_role).await.is_err(),
            "{forbidden} was allowed"
        );
    }
}
