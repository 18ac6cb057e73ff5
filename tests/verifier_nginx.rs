//! A real nginx with `auth_request` in front of a small upstream, checking keys
//! with the verifier over its HTTP check endpoint: a good key reaches the
//! upstream with identity headers (and without the key), a missing, malformed,
//! unknown or revoked key gets 401 with `WWW-Authenticate: Bearer
//! error="invalid_token"`, and a key without the route's scope gets 403. The
//! keys never show in nginx's logs or the verifier's metrics.
//!
//! nginx runs as a child process in single-process mode (`master_process off`),
//! so that killing it on drop leaves no worker behind. The upstream is a second
//! `server` block of the same nginx that echoes what it received. Without nginx
//! the test prints a SKIP line, except under CI (`CI=true`), where it fails.

mod support;

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use keyward::{
    key::{KeyFactory, SeededEntropy},
    store::{KeyStore, RevokeReason, SqlStore},
    telemetry::Metrics,
    verifier::{VerifierConfig, listen::VerifierSettings},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The nginx binary: on `PATH`, or where Debian puts it (`/usr/sbin` is not on
/// every user's `PATH`).
fn nginx_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The nginx configuration: the gateway on `gateway`, the echoing upstream on
/// `upstream`, and the verifier at `verifier`.
fn nginx_conf(dir: &Path, gateway: u16, upstream: u16, verifier: SocketAddr) -> String {
    let dir = dir.display();
    // The identity headers the verifier answers with, and the variables that carry them.
    let identity = [
        ("key_id", "X-Keyward-Key-Id"),
        ("owner", "X-Keyward-Owner"),
        ("team", "X-Keyward-Team"),
        ("scopes", "X-Keyward-Scopes"),
        ("namespace", "X-Keyward-Namespace"),
        ("name", "X-Keyward-Name"),
    ];
    let protected = |prefix: &str, check: &str| {
        let mut location = format!(
            "        location {prefix} {{\n            auth_request {check};\n            auth_request_set $keyward_challenge $upstream_http_www_authenticate;\n"
        );
        for (var, header) in identity {
            let upstream_var = header.to_ascii_lowercase().replace('-', "_");
            location.push_str(&format!(
                "            auth_request_set $keyward_{var} $upstream_http_{upstream_var};\n"
            ));
        }
        for (var, header) in identity {
            location.push_str(&format!(
                "            proxy_set_header {header} $keyward_{var};\n"
            ));
        }
        location.push_str(
            "            proxy_set_header Authorization \"\";\n            proxy_set_header X-Api-Key \"\";\n            add_header WWW-Authenticate $keyward_403_challenge always;\n            proxy_pass http://echo;\n        }\n",
        );
        location
    };
    let check = |name: &str, scope: &str| {
        format!(
            "        location = {name} {{\n            internal;\n            proxy_pass http://keyward/check?scope={scope};\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_pass_request_body off;\n            proxy_set_header Content-Length \"\";\n            proxy_set_header X-Original-URI $request_uri;\n        }}\n"
        )
    };
    let echoed: String = identity
        .iter()
        .map(|(_, header)| {
            let request_var = header.to_ascii_lowercase().replace('-', "_");
            format!("            add_header Echo-{header} $http_{request_var};\n")
        })
        .collect();
    format!(
        r#"pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream keyward {{
        server {verifier};
        keepalive 8;
    }}
    upstream echo {{
        server 127.0.0.1:{upstream};
    }}

    # auth_request passes the subrequest's WWW-Authenticate on to the client
    # with a 401 only; this adds the verifier's insufficient_scope challenge to
    # a 403 (and nothing to any other status).
    map $status $keyward_403_challenge {{
        403 $keyward_challenge;
        default "";
    }}

    server {{
        listen 127.0.0.1:{gateway};

{api}
{admin}
{check_inference}
{check_admin}
    }}

    server {{
        listen 127.0.0.1:{upstream};
        location / {{
{echoed}            add_header Echo-Authorization $http_authorization;
            add_header Echo-X-Api-Key $http_x_api_key;
            return 200 "upstream saw owner=[$http_x_keyward_owner] scopes=[$http_x_keyward_scopes] authorization=[$http_authorization] x-api-key=[$http_x_api_key] uri=[$request_uri]\n";
        }}
    }}
}}
"#,
        api = protected("/api/", "/_keyward/inference"),
        admin = protected("/admin/", "/_keyward/admin"),
        check_inference = check("/_keyward/inference", "inference"),
        check_admin = check("/_keyward/admin", "admin"),
    )
}

/// nginx in the foreground, killed on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, conf: &str, gateway: u16) -> Nginx {
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            // The log for messages before the configuration is read; the default
            // (/var/log/nginx/error.log) may not be writable.
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let mut nginx = Nginx {
            child,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                panic!("nginx exited with {status}:\n{}", nginx.logs());
            }
            if std::net::TcpStream::connect(("127.0.0.1", gateway)).is_ok() {
                return nginx;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {gateway} within 10 s:\n{}",
                nginx.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// stderr, the error log and the access log.
    fn logs(&self) -> String {
        ["stderr.log", "error.log", "access.log"]
            .iter()
            .map(|name| {
                let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
                format!("--- {name}\n{text}")
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Names in lower case, in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// One HTTP/1.1 GET with `Connection: close`, read to the end.
async fn get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {address} took over 10 s"));
    parse(&raw)
}

fn parse(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut rest = body;
        let mut decoded = String::new();
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                break decoded;
            }
            decoded.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    } else {
        body.to_owned()
    };
    Response {
        status,
        headers,
        body,
    }
}

const INVALID_TOKEN: &str = "Bearer error=\"invalid_token\"";

#[track_caller]
fn assert_unauthorized(response: &Response, what: &str) {
    assert_eq!(response.status, 401, "{what}: {response:?}");
    assert_eq!(
        response.all("www-authenticate"),
        vec![INVALID_TOKEN],
        "{what}: {response:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_allows_good_keys_and_refuses_bad_revoked_and_unscoped_ones() {
    let test = "nginx_auth_request_allows_good_keys_and_refuses_bad_revoked_and_unscoped_ones";
    let Some(binary) = nginx_binary() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{test}: nginx is not installed; CI must run the nginx test (.ci/run installs it)"
            );
        }
        eprintln!(
            "SKIP: {test}: nginx is not installed (apt-get install nginx; it is looked for on PATH and in /usr/sbin)"
        );
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let store = Arc::new(SqlStore::connect(&url).await.unwrap());
    store.migrate().await.unwrap();
    let keys = KeyFactory::new("kw", Arc::new(SeededEntropy::new(7))).unwrap();
    let (good, good_record) = support::issue_active(
        &store,
        &keys,
        "inference",
        &["inference", "models:read"],
        None,
    )
    .await;
    let (doomed, doomed_record) =
        support::issue_active(&store, &keys, "doomed", &["inference"], None).await;
    let (admin, _) =
        support::issue_active(&store, &keys, "ops", &["admin", "inference"], None).await;
    // Well-formed, with a good checksum, and never stored.
    let unknown = keys.new_key().unwrap();
    let malformed = format!("{}x", &good.expose()[..good.expose().len() - 1]);

    let metrics = Arc::new(Metrics::default());
    let settings = VerifierSettings {
        address: "127.0.0.1:0".parse().unwrap(),
        key_header: "x-api-key".into(),
        config: VerifierConfig::default(),
        primary_database_url: None,
    };
    let (_verifier, verifier_address) =
        keyward::verifier::listen::start(store.clone(), &url, settings, metrics)
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(verifier_address, "/readyz", &[]).await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "the verifier was not ready within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let nginx_dir = dir.path().join("nginx");
    fs::create_dir(&nginx_dir).unwrap();
    let (gateway_port, upstream_port) = (free_port(), free_port());
    let conf = nginx_conf(&nginx_dir, gateway_port, upstream_port, verifier_address);
    let nginx = Nginx::start(&binary, &nginx_dir, &conf, gateway_port);
    let gateway: SocketAddr = ([127, 0, 0, 1], gateway_port).into();
    let logs = || nginx.logs();

    // A good key, as a bearer token and in X-Api-Key: the upstream sees the
    // identity, and neither the key nor a client's forged identity header.
    let bearer = format!("Bearer {}", good.expose());
    for (header, value) in [
        ("Authorization", bearer.as_str()),
        ("X-Api-Key", good.expose()),
    ] {
        let response = get(
            gateway,
            "/api/v1/models?x=1",
            &[(header, value), ("X-Keyward-Owner", "mallory@example.com")],
        )
        .await;
        assert_eq!(response.status, 200, "{header}: {response:?}\n{}", logs());
        assert_eq!(
            response.body,
            "upstream saw owner=[alice@example.com] scopes=[inference models:read] authorization=[] x-api-key=[] uri=[/api/v1/models?x=1]\n",
            "{header}"
        );
        let echoed = |name: &str| response.header(&format!("echo-x-keyward-{name}"));
        assert_eq!(echoed("key-id"), Some(good_record.key_id.as_str()));
        assert_eq!(echoed("owner"), Some("alice@example.com"));
        assert_eq!(echoed("team"), Some("ml"));
        assert_eq!(echoed("scopes"), Some("inference models:read"));
        assert_eq!(echoed("namespace"), Some("team-ml"));
        assert_eq!(echoed("name"), Some("inference"));
        assert_eq!(response.header("echo-authorization"), None);
        assert_eq!(response.header("echo-x-api-key"), None);
        assert_eq!(response.header("www-authenticate"), None);
    }

    // No key, a malformed key, an unknown well-formed key, a key that is not a
    // bearer token, and two keys at once: 401 with the invalid_token challenge.
    let unknown_bearer = format!("Bearer {}", unknown.expose());
    let malformed_bearer = format!("Bearer {malformed}");
    let basic = format!("Basic {}", good.expose());
    let refused: [(&str, Vec<(&str, &str)>); 6] = [
        ("no key", vec![]),
        ("malformed", vec![("Authorization", &malformed_bearer)]),
        ("malformed in X-Api-Key", vec![("X-Api-Key", &malformed)]),
        ("unknown", vec![("Authorization", &unknown_bearer)]),
        ("not a bearer token", vec![("Authorization", &basic)]),
        (
            "two keys",
            vec![("Authorization", &bearer), ("X-Api-Key", admin.expose())],
        ),
    ];
    for (what, headers) in &refused {
        let response = get(gateway, "/api/v1/models", headers).await;
        assert_unauthorized(&response, what);
    }

    // A key without the admin scope: 403 on the admin location, with the
    // verifier's insufficient_scope challenge; the admin key passes.
    let response = get(gateway, "/admin/users", &[("Authorization", &bearer)]).await;
    assert_eq!(response.status, 403, "{response:?}\n{}", logs());
    assert_eq!(
        response.all("www-authenticate"),
        vec!["Bearer error=\"insufficient_scope\", scope=\"admin\""],
        "{response:?}"
    );
    let response = get(gateway, "/admin/users", &[("X-Api-Key", admin.expose())]).await;
    assert_eq!(response.status, 200, "{response:?}\n{}", logs());
    assert_eq!(response.header("echo-x-keyward-name"), Some("ops"));
    let response = get(gateway, "/admin/users", &[]).await;
    assert_unauthorized(&response, "no key on the admin location");

    // Revocation: the key works, is revoked in the database, and is refused
    // through nginx within 1.5 s (SQLite is polled).
    let doomed_header = [("X-Api-Key", doomed.expose())];
    let response = get(gateway, "/api/v1/models", &doomed_header).await;
    assert_eq!(response.status, 200, "{response:?}");
    let revoked_at = Instant::now();
    store
        .revoke(
            &doomed_record.key_id,
            RevokeReason::Deleted,
            Timestamp::now(),
        )
        .await
        .unwrap();
    let refused_after = loop {
        let response = get(gateway, "/api/v1/models", &doomed_header).await;
        if response.status != 200 {
            assert_unauthorized(&response, "revoked");
            break revoked_at.elapsed();
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "the revoked key still passes after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("{test}: the revoked key was refused through nginx after {refused_after:?}");
    assert!(
        refused_after <= Duration::from_millis(1500),
        "the revoked key was refused only after {refused_after:?}"
    );
    // It stays refused, and the other keys are untouched.
    let response = get(
        gateway,
        "/api/v1/models",
        &[("Authorization", &format!("Bearer {}", doomed.expose()))],
    )
    .await;
    assert_unauthorized(&response, "revoked, again");
    let response = get(gateway, "/api/v1/models", &[("Authorization", &bearer)]).await;
    assert_eq!(response.status, 200, "{response:?}");

    // No key anywhere in nginx's logs or the verifier's metrics.
    let metrics = get(verifier_address, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("keyward_verify_total"),
        "{}",
        metrics.body
    );
    let nginx_logs = logs();
    drop(nginx);
    assert!(
        nginx_logs.contains("GET /api/v1/models"),
        "nginx logged no requests, so the log check below proves nothing:\n{nginx_logs}"
    );
    for key in [
        good.expose(),
        doomed.expose(),
        admin.expose(),
        unknown.expose(),
        malformed.as_str(),
    ] {
        // The body without its checksum too, in case a log truncates.
        let body = &key[..key.len() - 6];
        for (place, text) in [
            ("nginx's logs", &nginx_logs),
            ("the verifier's metrics", &metrics.body),
        ] {
            assert!(!text.contains(body), "a key is in {place}:\n{text}");
        }
    }
}
