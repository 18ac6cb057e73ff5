//! `kubectl keyward dashboard` against a real API server and operator: the
//! whole scenario in headless Chromium (create with the form, reveal once,
//! rotate, emergency-rotate, revoke by typing the name), RBAC as a viewer and
//! as a user without Secret access, and the guard (URL token, Host, Origin,
//! CSRF, token passthrough). The API server's state is checked after each step.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{
    harness::{Cluster, Guard, OPERATOR, PLUGIN, verify, wait_for},
    verifier::free_address,
    webdriver::Browser,
};

const NS: &str = "default";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A running dashboard: its URL (with the token) and its log (stdout and stderr).
struct Dashboard {
    _process: Guard,
    url: String,
    address: SocketAddr,
    log: PathBuf,
}

impl Dashboard {
    /// `kubectl keyward dashboard --no-open` with `kubeconfig`.
    fn start(cluster: &Cluster, kubeconfig: &Path, name: &str) -> Dashboard {
        Self::spawn(
            Command::new(PLUGIN)
                .args(["dashboard", "--no-open"])
                .env("KUBECONFIG", kubeconfig),
            &cluster.dir.path().join(format!("dashboard-{name}.log")),
        )
    }

    fn spawn(command: &mut Command, log: &Path) -> Dashboard {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log.with_extension("stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("keyward dashboard: ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        // Keep reading stdout into the log, so nothing blocks and it can be searched.
        let mut file = fs::File::create(log).unwrap();
        file.write_all(line.as_bytes()).unwrap();
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = stdout.read_to_end(&mut rest);
            let _ = file.write_all(&rest);
        });
        let address: SocketAddr = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Dashboard {
            _process: Guard(child),
            url,
            address,
            log: log.to_owned(),
        }
    }

    /// Everything the dashboard printed and logged so far.
    fn log_text(&self) -> String {
        let mut text = fs::read_to_string(&self.log).unwrap_or_default();
        text.push_str(&fs::read_to_string(self.log.with_extension("stderr")).unwrap_or_default());
        text
    }

    /// The session cookie, from the URL's token.
    fn session(&self) -> String {
        let path = self
            .url
            .trim_start_matches(&format!("http://{}", self.address));
        let reply = http(self.address, "GET", path, &[], "");
        assert_eq!(reply.status, 303, "{}", reply.body);
        let cookie = reply.header("set-cookie").expect("a session cookie");
        cookie.split(';').next().unwrap().to_owned()
    }
}

/// One HTTP/1.1 exchange over a fresh connection.
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// The CSRF token of the page's first form.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a form with a CSRF token");
        let rest = &self.body[at + r#"name="csrf" value=""#.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

/// A request with `headers` (name, value); Host defaults to the address.
fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {address}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("Connection: close\r\n\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    Reply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The verifier's answer to `key` for `scope`.
fn check(verifier: SocketAddr, key: &str, scope: &str) -> u16 {
    let bearer = format!("Bearer {key}");
    http(
        verifier,
        "GET",
        &format!("/check?scope={scope}"),
        &[("Authorization", &bearer)],
        "",
    )
    .status
}

/// Presents `key` to the verifier every 200 ms until `stop` is set.
fn present(verifier: SocketAddr, key: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            check(verifier, &key, "inference");
            thread::sleep(Duration::from_millis(200));
        }
    })
}

fn apikey(name: &str) -> String {
    format!(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  owner: alice@example.com\n  team: ml\n  scopes: [inference]\n"
    )
}

/// An API server with the operator (SQLite, with `flags`) and keyward's user
/// roles; the database URL.
fn start(test: &str, flags: &[&str]) -> Option<(Cluster, crate::harness::Operator, String)> {
    let cluster = Cluster::start(test)?;
    let url = format!("sqlite://{}", cluster.dir.path().join("keys.db").display());
    let operator = cluster.operator(&url, flags, "info");
    wait_for("the CRDs", Duration::from_secs(60), || {
        cluster.try_kubectl(&["get", "apikeys,apikeypolicies"]).ok()
    });
    cluster.kubectl(&[
        "apply",
        "-f",
        &format!("{ROOT}/config/aggregated-roles.yaml"),
    ]);
    Some((cluster, operator, url))
}

fn ready(cluster: &Cluster, name: &str) -> String {
    wait_for(&format!("{name} Ready"), Duration::from_secs(60), || {
        let ready = cluster.field(
            &format!("apikey/{name}"),
            NS,
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        );
        (ready == "True").then_some(())
    });
    cluster.secret_key(NS, name).expect("the key in its Secret")
}

#[test]
fn the_dashboard_creates_reveals_rotates_and_revokes_in_chromium() {
    let test = "the_dashboard_creates_reveals_rotates_and_revokes_in_chromium";
    let Some(browser) = Browser::start(test) else {
        return;
    };
    // The operator's own verifier, flushing counts every second and scanning
    // use every 2 s, so usage and PreviousKeyInUse show within about a minute.
    let verifier = free_address();
    let verifier_flag = verifier.to_string();
    let flags = [
        "--verifier-address",
        &verifier_flag,
        "--last-used-flush",
        "1",
        "--usage-scan-interval",
        "2",
    ];
    let Some((cluster, _operator, database)) = start(test, &flags) else {
        return;
    };
    cluster.apply(
        "apiVersion: keyward.dev/v1alpha1\nkind: ApiKeyPolicy\nmetadata: {name: ml-keys}\nspec:\n  namespaceSelector: {}\n  teams: {allowed: [ml, search]}\n  scopes: {allowed: [inference, metrics, \"models:*\"]}\n",
    );
    cluster.apply(&apikey("existing"));
    let dashboard = Dashboard::start(&cluster, &cluster.kubeconfig, "admin");
    let long = Duration::from_secs(60);

    // The token opens a session and leaves the address bar.
    browser.goto(&dashboard.url);
    browser.wait_for_text("table.keys", "existing", long);
    assert!(!browser.url().contains("token"), "{}", browser.url());

    // Create with the form: the policy's teams and scopes are the choices.
    browser.find("header a.button").click();
    browser.wait_for("form.new", long);
    assert!(browser.source().contains(r#"<option value="search""#));
    browser.find("input[name=name]").send_keys("browser-key");
    browser
        .find("input[name=owner]")
        .send_keys("dana@example.com");
    browser.find("select[name=team] option[value=ml]").click();
    browser.find("input[name=scope][value=inference]").click();
    browser.find("#preview").click();
    let yaml = browser.wait_for("#yaml", long).text();
    assert!(
        yaml.contains("name: browser-key") && yaml.contains("- inference"),
        "{yaml}"
    );
    // A dry run so far: nothing exists yet.
    assert!(
        cluster
            .try_kubectl(&["get", "apikey", "browser-key", "-n", NS])
            .is_err()
    );
    browser.find("#apply").click();
    browser.wait_for_text("h1", "browser-key", long);
    let first = ready(&cluster, "browser-key");
    assert_eq!(
        cluster.field(
            "apikey/browser-key",
            NS,
            "{.spec.owner} {.spec.team} {.spec.scopes}"
        ),
        r#"dana@example.com ml ["inference"]"#
    );
    browser.wait_for_text("h1 .badge", "Ready", long);
    assert!(
        !browser.source().contains(&first),
        "the key is in the page before reveal"
    );

    // Reveal it once.
    browser.find("#reveal").click();
    let shown = browser.wait_for("#key", long);
    assert_eq!(shown.property("value").as_str(), Some(first.as_str()));
    assert!(!browser.url().contains(&first), "the key is in a URL");
    // The copy button's script runs under the CSP (headless Chromium may deny
    // the clipboard; either answer shows the script ran).
    browser.find("#copy").click();
    wait_for("the copy button to answer", long, || {
        let said = browser.find("#copy").text();
        (said == "Copied" || said == "Press Ctrl+C").then_some(())
    });
    // docs/dashboard.md's pictures: KEYWARD_SCREENSHOT_DIR=docs/dashboard.
    let screenshots = std::env::var("KEYWARD_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cluster.dir.path().to_owned());
    fs::create_dir_all(&screenshots).unwrap();
    browser.find("a[href='/keys/default/browser-key']").click();
    assert!(!browser.wait_for("h1", long).text().is_empty());
    assert!(
        !browser.source().contains(&first),
        "the key stays on the reveal page only"
    );

    // A client uses the key, once without the scope it needs.
    let stop = Arc::new(AtomicBool::new(false));
    let client = present(verifier, first.clone(), stop.clone());
    assert_eq!(check(verifier, &first, "admin"), 403);

    // Rotate: the new key is in the Secret, the previous one still verifies,
    // and the client that stays on it is flagged.
    browser.find("#rotate").click();
    browser.wait_for_text("p", "grace period", long);
    browser.find("#confirm").click();
    browser.wait_for_text(".notice", "Rotated", long);
    let second = cluster.secret_key(NS, "browser-key").unwrap();
    assert_ne!(second, first);
    assert!(
        cluster
            .field("apikey/browser-key", NS, "{.status.lastRotationRequest}")
            .starts_with("keyward-dashboard-")
    );
    assert_eq!(
        verify(&database, &first).0,
        0,
        "the previous key is in its grace period"
    );
    wait_for(
        "usage and PreviousKeyInUse",
        Duration::from_secs(180),
        || {
            let shown = cluster.field(
            "apikey/browser-key",
            NS,
            r#"{.status.usage.last24h} {.status.conditions[?(@.type=="PreviousKeyInUse")].status}"#,
        );
            let (requests, previous_in_use) = shown.split_once(' ')?;
            (!requests.is_empty() && previous_in_use == "True").then_some(())
        },
    );

    // The list flags it and shows its use; the key's page charts it.
    browser.set_window_size(1400, 1000);
    browser.goto(&format!("http://{}/", dashboard.address));
    let row = browser.wait_for("tr[data-key='default/browser-key']", long);
    assert!(row.attr("class").unwrap_or_default().contains("attention"));
    assert!(row.text().contains("previous key in use"), "{}", row.text());
    assert!(
        !row.find("td.last-used").text().contains("never"),
        "{}",
        row.text()
    );
    assert!(row.find("svg.spark polyline").attr("points").is_some());
    browser.screenshot(&screenshots.join("list.png"));
    browser.goto(&format!(
        "http://{}/keys/default/browser-key",
        dashboard.address
    ));
    browser.wait_for("#usage-chart rect", long);
    let legend = browser.find("figcaption").text();
    assert!(
        legend.contains("valid") && legend.contains("insufficient scope 1"),
        "{legend}"
    );
    browser.wait_for_text(".timeline", "PreviousKeyInUse", long);
    browser.set_window_size(1400, 1300);
    browser.screenshot(&screenshots.join("key.png"));

    // Emergency rotate: every older key is revoked at once.
    browser.find("#emergency-rotate").click();
    browser.wait_for_text("p.problem", "401 at once", long);
    browser.find("#confirm").click();
    browser.wait_for_text(".notice", "Emergency rotation", long);
    let third = cluster.secret_key(NS, "browser-key").unwrap();
    assert_ne!(third, second);
    for old in [&first, &second] {
        assert_eq!(verify(&database, old).0, 1, "an older key still verifies");
    }
    assert_eq!(verify(&database, &third).0, 0);
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();

    // The policies that select the namespace, with what they allow.
    browser.goto(&format!("http://{}/policies?ns=default", dashboard.address));
    let policy = browser
        .wait_for_text("section.policy", "ml-keys", long)
        .text();
    assert!(
        policy.contains("ml,search") && policy.contains("models:*"),
        "{policy}"
    );

    // Revoke: a wrong name is refused, the right one deletes and waits.
    browser.goto(&format!(
        "http://{}/keys/default/browser-key",
        dashboard.address
    ));
    browser.find("#revoke").click();
    browser.find("#confirm-name").send_keys("browser-ke");
    browser.find("#confirm").click();
    browser.wait_for("#mistyped", long);
    assert!(
        cluster
            .try_kubectl(&["get", "apikey", "browser-key", "-n", NS])
            .is_ok()
    );
    browser.find("#confirm-name").send_keys("browser-key");
    browser.find("#confirm").click();
    browser.wait_for_text("#revoked", "revoked and deleted", long);
    assert!(
        cluster
            .try_kubectl(&["get", "apikey", "browser-key", "-n", NS])
            .is_err()
    );
    assert_eq!(
        verify(&database, &third).0,
        1,
        "the revoked key still verifies"
    );

    let log = dashboard.log_text();
    for key in [&first, &second, &third] {
        assert!(
            !log.contains(key.as_str()),
            "a key is in the dashboard's output"
        );
    }
}

#[test]
fn a_viewer_is_refused_with_the_api_servers_message_and_offered_no_reveal() {
    let test = "a_viewer_is_refused_with_the_api_servers_message_and_offered_no_reveal";
    let Some((cluster, _operator, _)) = start(test, &[]) else {
        return;
    };
    cluster.apply(&apikey("watched"));
    ready(&cluster, "watched");
    for (user, role) in [("vera", "keyward-view"), ("eddie", "keyward-edit")] {
        cluster.kubectl(&[
            "create",
            "rolebinding",
            &format!("{user}-{role}"),
            &format!("--clusterrole={role}"),
            &format!("--user={user}"),
            "-n",
            NS,
        ]);
    }

    // vera may only read ApiKeys: she sees them, and every action is refused.
    let vera = Dashboard::start(&cluster, &cluster.impersonating("vera"), "vera");
    let cookie = vera.session();
    let get = |path: &str| http(vera.address, "GET", path, &[("Cookie", &cookie)], "");
    let list = get("/");
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("watched"), "{}", list.body);
    let page = get("/keys/default/watched");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        !page.body.contains(r#"id="reveal""#),
        "reveal offered without Secret access"
    );
    // The rotate confirmation is a form, so it carries the CSRF token.
    let csrf = get("/keys/default/watched/rotate").csrf();
    let post = |path: &str, form: &str| {
        http(
            vera.address,
            "POST",
            path,
            &[("Cookie", &cookie)],
            &format!("csrf={csrf}&{form}"),
        )
    };
    let rotate = post("/keys/default/watched/rotate", "emergency=1");
    assert_eq!(rotate.status, 403, "{}", rotate.body);
    assert!(
        rotate
            .body
            .contains(r#"User &quot;vera&quot; cannot patch resource &quot;apikeys&quot;"#),
        "{}",
        rotate.body
    );
    let revoke = post("/keys/default/watched/revoke", "confirm=watched");
    assert_eq!(revoke.status, 403, "{}", revoke.body);
    assert!(
        revoke.body.contains("cannot delete resource"),
        "{}",
        revoke.body
    );
    let create = post(
        "/new",
        "step=apply&namespace=default&name=veras&owner=vera%40example.com&team=ml&scope=inference",
    );
    assert_eq!(create.status, 422, "{}", create.body);
    assert!(
        create.body.contains("cannot create resource"),
        "{}",
        create.body
    );
    let policies = get("/policies");
    assert_eq!(policies.status, 403, "{}", policies.body);
    assert!(
        policies
            .body
            .contains("cannot list resource &quot;apikeypolicies&quot;"),
        "{}",
        policies.body
    );
    let reveal = post("/keys/default/watched/reveal", "");
    assert_eq!(reveal.status, 403, "{}", reveal.body);
    assert!(
        reveal
            .body
            .contains("cannot get resource &quot;secrets&quot;"),
        "{}",
        reveal.body
    );
    assert_eq!(
        cluster.field(
            "apikey/watched",
            NS,
            r"{.metadata.annotations.keyward\.dev/rotate}"
        ),
        "",
        "a refused rotation left an annotation"
    );
    assert!(
        cluster
            .try_kubectl(&["get", "apikey", "veras", "-n", NS])
            .is_err()
    );
    assert!(
        cluster
            .try_kubectl(&["get", "apikey", "watched", "-n", NS])
            .is_ok()
    );

    // eddie may edit ApiKeys but not read Secrets: no reveal, and rotation works.
    let eddie = Dashboard::start(&cluster, &cluster.impersonating("eddie"), "eddie");
    let cookie = eddie.session();
    let page = http(
        eddie.address,
        "GET",
        "/keys/default/watched",
        &[("Cookie", &cookie)],
        "",
    );
    assert!(page.body.contains(r#"id="rotate""#), "{}", page.body);
    assert!(
        !page.body.contains(r#"id="reveal""#),
        "reveal offered without Secret access"
    );
    let confirm = http(
        eddie.address,
        "GET",
        "/keys/default/watched/rotate",
        &[("Cookie", &cookie)],
        "",
    );
    let rotated = http(
        eddie.address,
        "POST",
        "/keys/default/watched/rotate",
        &[("Cookie", &cookie)],
        &format!("csrf={}", confirm.csrf()),
    );
    assert_eq!(rotated.status, 303, "{}", rotated.body);
    assert!(
        cluster
            .field("apikey/watched", NS, "{.status.lastRotationRequest}")
            .starts_with("keyward-dashboard-")
    );
}

#[test]
fn the_guard_refuses_no_token_foreign_host_or_origin_and_missing_csrf() {
    let test = "the_guard_refuses_no_token_foreign_host_or_origin_and_missing_csrf";
    let Some((cluster, _operator, _)) = start(test, &[]) else {
        return;
    };
    cluster.apply(&apikey("guarded"));
    let key = ready(&cluster, "guarded");
    let dashboard = Dashboard::start(&cluster, &cluster.kubeconfig, "guard");
    let address = dashboard.address;

    // No token, a wrong token: refused, and nothing of the cluster shown.
    for path in [
        "/",
        "/?token=0000",
        "/keys/default/guarded",
        "/assets/dashboard.css",
    ] {
        let reply = http(address, "GET", path, &[], "");
        assert_eq!(reply.status, 401, "{path}: {}", reply.body);
        assert!(!reply.body.contains("guarded"), "{path}");
    }
    let cookie = dashboard.session();
    let list = http(address, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("guarded"), "{}", list.body);
    let page = http(
        address,
        "GET",
        "/keys/default/guarded",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("cache-control").as_deref(), Some("no-store"));
    for absolute in [r#"src="http"#, r#"href="http"#, r#"src="//"#, r#"href="//"#] {
        assert!(
            !page.body.contains(absolute),
            "a resource from another origin"
        );
    }

    // DNS rebinding: the right cookie, another Host.
    let rebound = http(
        address,
        "GET",
        "/",
        &[
            ("Host", &format!("attacker.example:{}", address.port())),
            ("Cookie", &cookie),
        ],
        "",
    );
    assert_eq!(rebound.status, 403, "{}", rebound.body);

    // State changes: a foreign Origin, a cross-site fetch, no or a wrong CSRF token.
    let csrf = page.csrf();
    let rotate = |headers: &[(&str, &str)], form: &str| {
        let mut all = vec![("Cookie", cookie.as_str())];
        all.extend_from_slice(headers);
        http(address, "POST", "/keys/default/guarded/rotate", &all, form)
    };
    let with_csrf = format!("csrf={csrf}&emergency=1");
    for (headers, form, status) in [
        (
            vec![("Origin", "http://attacker.example")],
            with_csrf.as_str(),
            403,
        ),
        (
            vec![("Sec-Fetch-Site", "cross-site")],
            with_csrf.as_str(),
            403,
        ),
        (vec![], "emergency=1", 403),
        (vec![], "csrf=00&emergency=1", 403),
    ] {
        let reply = rotate(&headers, form);
        assert_eq!(reply.status, status, "{headers:?} {form}: {}", reply.body);
    }
    assert_eq!(
        cluster.field(
            "apikey/guarded",
            NS,
            r"{.metadata.annotations.keyward\.dev/rotate}"
        ),
        "",
        "a refused request rotated"
    );
    assert_eq!(
        cluster.secret_key(NS, "guarded").as_deref(),
        Some(key.as_str())
    );
    // The same request, from the dashboard's own page, works.
    let origin = format!("http://{address}");
    let done = rotate(
        &[("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
        &with_csrf,
    );
    assert_eq!(done.status, 303, "{}", done.body);
    assert_ne!(
        cluster.secret_key(NS, "guarded").as_deref(),
        Some(key.as_str())
    );

    // Revealed on request only, never cached, never logged.
    let revealed = http(
        address,
        "POST",
        "/keys/default/guarded/reveal",
        &[("Cookie", &cookie)],
        &format!("csrf={csrf}"),
    );
    let current = cluster.secret_key(NS, "guarded").unwrap();
    assert!(revealed.body.contains(&current), "{}", revealed.body);
    assert_eq!(
        revealed.header("cache-control").as_deref(),
        Some("no-store")
    );
    let log = dashboard.log_text();
    assert!(
        !log.contains(&current) && !log.contains(&key),
        "a key in the log"
    );
}

#[test]
fn token_passthrough_refuses_requests_without_a_token_and_acts_as_the_caller() {
    let test = "token_passthrough_refuses_requests_without_a_token_and_acts_as_the_caller";
    let Some((cluster, _operator, _)) = start(test, &[]) else {
        return;
    };
    cluster.apply(&apikey("passed"));
    let address = free_address();
    // The kubeconfig gives the server and CA; its admin token must never be used.
    let dashboard = Dashboard::spawn(
        Command::new(OPERATOR)
            .args([
                "dashboard",
                "--token-passthrough",
                "--address",
                &address.to_string(),
            ])
            .env("KUBECONFIG", &cluster.kubeconfig),
        &cluster.dir.path().join("dashboard-passthrough.log"),
    );
    assert_eq!(dashboard.address, address);
    // The example that runs it so is valid on this API server.
    cluster.kubectl(&["create", "namespace", "keyward-system"]);
    cluster.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        &format!("{ROOT}/examples/dashboard-in-cluster.yaml"),
    ]);
    for path in ["/", "/keys/default/passed", "/policies"] {
        let reply = http(address, "GET", path, &[], "");
        assert_eq!(reply.status, 401, "{path}: {}", reply.body);
        assert!(reply.body.contains("bearer token"), "{}", reply.body);
    }
    let as_admin = http(
        address,
        "GET",
        "/",
        &[("Authorization", "Bearer e2e-token")],
        "",
    );
    assert_eq!(as_admin.status, 200, "{}", as_admin.body);
    assert!(as_admin.body.contains("passed"), "{}", as_admin.body);
    // An unknown token is the API server's to refuse: no fallback to the kubeconfig.
    let stranger = http(
        address,
        "GET",
        "/",
        &[("Authorization", "Bearer not-a-token")],
        "",
    );
    assert_eq!(stranger.status, 401, "{}", stranger.body);
    assert!(stranger.body.contains("Unauthorized"), "{}", stranger.body);
    // oauth2-proxy's header works as well, and each caller has its own CSRF token.
    let forwarded = http(
        address,
        "GET",
        "/keys/default/passed",
        &[("X-Forwarded-Access-Token", "e2e-token")],
        "",
    );
    assert_eq!(forwarded.status, 200, "{}", forwarded.body);
    let refused = http(
        address,
        "POST",
        "/keys/default/passed/rotate",
        &[("Authorization", "Bearer e2e-token")],
        "csrf=0000",
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
}
