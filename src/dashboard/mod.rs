//! `kubectl keyward dashboard`: the key page every platform gives its users,
//! served on the user's own machine with the user's own kubeconfig, or in the
//! cluster behind an authenticating proxy with each caller's bearer token. It
//! holds no permission of its own: every read and action is an API call as
//! the caller, refused with the API server's message when RBAC forbids it.
//!
//! - [`guard`]: the pure checks every request passes (URL token or bearer
//!   token, Host, Origin, CSRF).
//! - [`view`]: the pure view model (states, attention flags, sparklines, paging).
//! - [`form`]: the create form, its CRD-derived rules and the policies' choices.
//! - [`source`]: where the key list comes from (watches per namespace, or a list per request).
//! - [`html`]: the pages.
//! - [`actions`]: the API calls the pages make.
//! - this module: the server, its routes and the request shell.

pub mod actions;
pub mod form;
pub mod guard;
pub mod html;
pub mod source;
pub mod view;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use clap::Args;
use kube::{Client, Config, config::AuthInfo};
use maud::Markup;
use serde::Deserialize;

use self::{
    guard::{Admission, Guard, Mode, RequestFacts},
    html::Frame,
    view::ListQuery,
};
use crate::{
    Error, Result,
    key::{Entropy, OsEntropy},
};

/// Options of `kubectl keyward dashboard` (and `keyward dashboard` in a cluster).
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Where to listen. The default is loopback on a free port; anything else
    /// exposes the page (and, locally, your credentials) to that network.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub address: SocketAddr,
    /// Print the URL without opening a browser.
    #[arg(long)]
    pub no_open: bool,
    /// Run behind an authenticating proxy (oauth2-proxy and the like): use no
    /// credentials of its own, and call the API server with each request's
    /// bearer token (Authorization or X-Forwarded-Access-Token), refusing
    /// requests without one. The API server's address and CA come from the pod
    /// (or the kubeconfig); its credentials are never used.
    #[arg(long)]
    pub token_passthrough: bool,
    /// Host header values (`host` or `host:port`) the page may be reached by, besides
    /// the listen address: the proxy's public name in token passthrough mode.
    #[arg(long = "allowed-host")]
    pub allowed_hosts: Vec<String>,
    /// The namespaces to show, comma-separated. Default: every namespace when
    /// you may list ApiKeys cluster-wide, else the context's namespace.
    #[arg(long, value_delimiter = ',')]
    pub namespaces: Vec<String>,
}

/// Which namespaces the list covers when no filter is chosen.
#[derive(Clone, Debug)]
enum Shown {
    /// Every namespace: the user may list ApiKeys cluster-wide.
    Everywhere,
    /// These namespaces only.
    Namespaces(Vec<String>),
}

/// How callers are served.
enum Callers {
    /// One user: the kubeconfig's client and watches of the shown namespaces.
    Local {
        client: Client,
        watches: Box<source::KeyWatches>,
        shown: Shown,
    },
    /// Many users: a client per request from this config and the caller's token.
    Passthrough {
        config: Box<Config>,
        shown: Vec<String>,
    },
}

/// Everything the handlers share.
struct App {
    guard: Guard,
    callers: Callers,
    /// The API server's address, shown in the header.
    server: String,
}

type SharedApp = Arc<App>;

/// The caller of one request: the client that acts as them and the CSRF
/// token their forms carry.
#[derive(Clone)]
struct Caller {
    client: Client,
    csrf: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// Starts the dashboard and serves until Ctrl-C. `namespace` is the plugin's `-n`.
pub async fn run(args: DashboardArgs, namespace: Option<String>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.address)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", args.address)))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut configured = args.namespaces.clone();
    configured.extend(namespace);
    let mut config = Config::infer()
        .await
        .map_err(|e| Error::Config(format!("no Kubernetes configuration: {e}")))?;
    let server = config.cluster_url.to_string();
    let mut hosts = args.allowed_hosts.clone();
    let port = address.port();
    if address.ip().is_loopback() {
        hosts.extend([format!("127.0.0.1:{port}"), format!("localhost:{port}")]);
    } else if !address.ip().is_unspecified() {
        hosts.push(address.to_string());
    }
    let (mode, callers, url) = if args.token_passthrough {
        // Never the pod's own credentials: only the callers' tokens.
        config.auth_info = AuthInfo::default();
        let url = format!("http://{address}/");
        let callers = Callers::Passthrough {
            config: Box::new(config),
            shown: configured,
        };
        (Mode::Passthrough, callers, url)
    } else {
        let client = Client::try_from(config)?;
        let shown = if !configured.is_empty() {
            Shown::Namespaces(configured)
        } else if actions::may_list_everywhere(&client).await? {
            Shown::Everywhere
        } else {
            Shown::Namespaces(vec![client.default_namespace().to_owned()])
        };
        let session = guard::hex(&random_bytes(&OsEntropy)?);
        let url = format!("http://127.0.0.1:{port}/?token={session}");
        let mode = Mode::Local {
            session,
            cookie: format!("keyward_dashboard_{port}"),
        };
        let watches = Box::new(source::KeyWatches::new(
            client.clone(),
            namespaces_max(&shown),
        ));
        let callers = Callers::Local {
            client,
            watches,
            shown,
        };
        (mode, callers, url)
    };
    let secret = random_bytes(&OsEntropy)?;
    let app = Arc::new(App {
        guard: Guard::new(mode, hosts, secret),
        callers,
        server,
    });
    println!("keyward dashboard: {url}");
    if args.token_passthrough {
        println!("token passthrough: every request needs the caller's bearer token");
    } else if !args.no_open {
        open_browser(&url);
    }
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Config(format!("dashboard server: {e}")))
}

/// Watches kept: every configured namespace plus a few filtered views.
fn namespaces_max(shown: &Shown) -> usize {
    match shown {
        Shown::Everywhere => 4,
        Shown::Namespaces(list) => list.len() + 3,
    }
}

/// 32 random bytes: the URL token and the CSRF key.
fn random_bytes(entropy: &dyn Entropy) -> Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    entropy.fill(&mut bytes)?;
    Ok(bytes)
}

/// Opens the URL in the desktop's browser; the URL is printed either way.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    if let Err(error) = std::process::Command::new(opener)
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        eprintln!("could not open a browser ({opener}: {error}); open the URL above");
    }
}

fn router(app: SharedApp) -> Router {
    Router::new()
        .route("/", get(list))
        .route("/keys/{namespace}/{name}", get(key_page))
        .route(
            "/keys/{namespace}/{name}/rotate",
            get(rotate_form).post(rotate),
        )
        .route(
            "/keys/{namespace}/{name}/revoke",
            get(revoke_form).post(revoke),
        )
        .route("/keys/{namespace}/{name}/reveal", post(reveal))
        .route("/policies", get(policies))
        .route("/new", get(new_form).post(new_post))
        .route("/assets/{file}", get(asset))
        .layer(middleware::from_fn_with_state(app.clone(), admit))
        .with_state(app)
}

/// The request shell around [`Guard::admit`]: reads the headers, acts on the
/// decision, and sets the security headers on every response.
async fn admit(State(app): State<SharedApp>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let facts = RequestFacts {
        safe_method: matches!(*request.method(), Method::GET | Method::HEAD),
        path: request.uri().path(),
        query: request.uri().query(),
        host: text("host"),
        origin: text("origin"),
        fetch_site: text("sec-fetch-site"),
        cookie: text("cookie"),
        authorization: text("authorization"),
        forwarded_token: text("x-forwarded-access-token"),
    };
    let mut response = match app.guard.admit(&facts) {
        Admission::Allowed { identity, bearer } => match app.client_for(bearer) {
            Ok(client) => {
                let csrf = app.guard.csrf_token(&identity);
                request.extensions_mut().insert(Caller { client, csrf });
                next.run(request).await
            }
            Err(error) => PageError::from(error).into_response(),
        },
        Admission::StartSession {
            set_cookie,
            location,
        } => {
            let mut response = Redirect::to(&location).into_response();
            if let Ok(value) = HeaderValue::from_str(&set_cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Admission::Refused { status, reason } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
            Html(html::refused(reason).into_string()),
        )
            .into_response(),
    };
    secure_headers(response.headers_mut());
    response
}

/// No third-party origin, no inline script or style, no framing, no caching
/// (a revealed key must not stay in a cache), no referrer to other origins
/// (`no-referrer` would make Chromium send `Origin: null` on the forms).
fn secure_headers(headers: &mut HeaderMap) {
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

impl App {
    /// The client that acts as the caller.
    fn client_for(&self, bearer: Option<String>) -> Result<Client> {
        match (&self.callers, bearer) {
            (Callers::Local { client, .. }, _) => Ok(client.clone()),
            (Callers::Passthrough { config, .. }, Some(token)) => {
                let mut config = Config::clone(config);
                config.auth_info = AuthInfo {
                    token: Some(token.into()),
                    ..AuthInfo::default()
                };
                Ok(Client::try_from(config)?)
            }
            (Callers::Passthrough { .. }, None) => Err(Error::Config(
                "token passthrough needs the caller's bearer token".into(),
            )),
        }
    }

    fn frame<'a>(&'a self, csrf: &'a str) -> Frame<'a> {
        Frame {
            csrf,
            server: &self.server,
        }
    }

    /// The ApiKeys the list covers for this filter, and the namespaces to offer.
    async fn keys(
        &self,
        caller: &Caller,
        filter: Option<&str>,
    ) -> Result<(Vec<Arc<crate::crd::ApiKey>>, Vec<String>)> {
        match &self.callers {
            Callers::Local { watches, shown, .. } => {
                let (keys, mut offered) = match (shown, filter) {
                    (Shown::Everywhere, _) => {
                        let keys = watches.keys(None).await?;
                        let offered = keys
                            .iter()
                            .filter_map(|k| k.metadata.namespace.clone())
                            .collect();
                        (keys, offered)
                    }
                    (Shown::Namespaces(list), Some(ns)) => {
                        (watches.keys(Some(ns)).await?, list.clone())
                    }
                    (Shown::Namespaces(list), None) => {
                        let mut keys = Vec::new();
                        for ns in list {
                            keys.extend(watches.keys(Some(ns)).await?);
                        }
                        (keys, list.clone())
                    }
                };
                offered.sort();
                offered.dedup();
                Ok((keys, offered))
            }
            Callers::Passthrough { shown, .. } => {
                let keys = match filter {
                    Some(ns) => source::list_now(caller.client.clone(), Some(ns)).await?,
                    None if shown.is_empty() => {
                        source::list_now(caller.client.clone(), None).await?
                    }
                    None => {
                        let mut keys = Vec::new();
                        for ns in shown {
                            keys.extend(source::list_now(caller.client.clone(), Some(ns)).await?);
                        }
                        keys
                    }
                };
                let mut offered: Vec<String> = keys
                    .iter()
                    .filter_map(|k| k.metadata.namespace.clone())
                    .chain(shown.iter().cloned())
                    .collect();
                offered.sort();
                offered.dedup();
                Ok((keys, offered))
            }
        }
    }
}

/// A page that could not be served: the API server's own message when it refused.
#[derive(Debug)]
struct PageError {
    status: u16,
    message: String,
}

impl From<Error> for PageError {
    fn from(error: Error) -> Self {
        match error {
            Error::Kube(kube::Error::Api(status)) => PageError {
                status: status.code,
                message: status.message,
            },
            other => PageError {
                status: 502,
                message: other.to_string(),
            },
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let frame = Frame {
            csrf: "",
            server: "",
        };
        (
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY),
            page(html::error(&frame, self.status, &self.message)),
        )
            .into_response()
    }
}

type Page = std::result::Result<Response, PageError>;

fn page(markup: Markup) -> Html<String> {
    Html(markup.into_string())
}

/// The form fields of a POST, after its CSRF token was checked.
fn checked_form(
    caller: &Caller,
    body: &Bytes,
) -> std::result::Result<Vec<(String, String)>, PageError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|e| PageError {
            status: 400,
            message: format!("the form could not be read: {e}"),
        })?;
    let presented = pairs
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str());
    if !guard::same_secret(presented.unwrap_or_default(), &caller.csrf) {
        return Err(PageError {
            status: 403,
            message: "the form's CSRF token is missing or wrong; reload the page and try again"
                .into(),
        });
    }
    Ok(pairs)
}

fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The list's query string.
#[derive(Debug, Default, Deserialize)]
struct ListParams {
    ns: Option<String>,
    q: Option<String>,
    page: Option<usize>,
    attention: Option<String>,
}

async fn list(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> Page {
    let query = ListQuery {
        namespace: params.ns.filter(|ns| !ns.is_empty()),
        search: params.q.unwrap_or_default(),
        attention_only: params.attention.is_some(),
        page: params.page.unwrap_or(0),
    };
    let (keys, namespaces) = app.keys(&caller, query.namespace.as_deref()).await?;
    let now = jiff::Timestamp::now();
    let list = view::list_page(&keys, &query, now);
    Ok(page(html::list(
        &app.frame(&caller.csrf),
        &list,
        &query,
        &namespaces,
        now,
    ))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
struct KeyParams {
    notice: Option<String>,
    emergency: Option<String>,
}

/// The fixed notices a redirect may ask for; never free text from the URL.
fn notice(code: Option<&str>) -> Option<&'static str> {
    match code? {
        "created" => Some("ApiKey created. The operator issues its key in a moment."),
        "rotated" => Some(
            "Rotated: a new key is in the Secret; the previous key works until its grace period ends.",
        ),
        "emergency" => Some("Emergency rotation done: every older key is revoked."),
        _ => None,
    }
}

async fn key_page(
    State(app): State<SharedApp>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Query<KeyParams>,
) -> Page {
    let key = actions::get_key(&caller.client, &namespace, &name).await?;
    let events = actions::events(&caller.client, &key).await;
    let reveal = actions::may_read_secret(&caller.client, &key).await;
    let markup = html::key_page(
        &app.frame(&caller.csrf),
        &key,
        &events,
        &html::KeyActions { reveal },
        notice(params.notice.as_deref()),
        jiff::Timestamp::now(),
    );
    Ok(page(markup).into_response())
}

async fn rotate_form(
    State(app): State<SharedApp>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Query<KeyParams>,
) -> Page {
    let key = actions::get_key(&caller.client, &namespace, &name).await?;
    let emergency = params.emergency.is_some();
    Ok(page(html::confirm_rotate(
        &app.frame(&caller.csrf),
        &key,
        emergency,
    ))
    .into_response())
}

async fn rotate(
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Page {
    let pairs = checked_form(&caller, &body)?;
    let emergency = field(&pairs, "emergency") == Some("1");
    actions::rotate(&caller.client, &namespace, &name, emergency).await?;
    let code = if emergency { "emergency" } else { "rotated" };
    Ok(Redirect::to(&format!("/keys/{namespace}/{name}?notice={code}")).into_response())
}

async fn revoke_form(
    State(app): State<SharedApp>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Page {
    let key = actions::get_key(&caller.client, &namespace, &name).await?;
    Ok(page(html::confirm_revoke(&app.frame(&caller.csrf), &key, false)).into_response())
}

async fn revoke(
    State(app): State<SharedApp>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Page {
    let pairs = checked_form(&caller, &body)?;
    if field(&pairs, "confirm").map(str::trim) != Some(name.as_str()) {
        let key = actions::get_key(&caller.client, &namespace, &name).await?;
        let markup = html::confirm_revoke(&app.frame(&caller.csrf), &key, true);
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, page(markup)).into_response());
    }
    let outcome = actions::revoke(&caller.client, &namespace, &name).await?;
    Ok(page(html::revoked(
        &app.frame(&caller.csrf),
        &namespace,
        &name,
        outcome,
    ))
    .into_response())
}

async fn reveal(
    State(app): State<SharedApp>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Page {
    checked_form(&caller, &body)?;
    let (secret, key) = actions::read_key(&caller.client, &namespace, &name).await?;
    let markup = html::revealed(&app.frame(&caller.csrf), &namespace, &name, &secret, &key);
    Ok(page(markup).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct NamespaceParams {
    ns: Option<String>,
}

async fn policies(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(params): Query<NamespaceParams>,
) -> Page {
    let namespace = params.ns.filter(|ns| !ns.is_empty());
    let all = actions::policies(&caller.client).await?;
    let labels = match &namespace {
        Some(ns) => actions::namespace_labels(&caller.client, ns).await,
        None => None,
    };
    let shown: Vec<_> = all
        .into_iter()
        .filter_map(|policy| {
            let selects = labels.as_ref().map(|labels| {
                crate::policy::evaluate::governs(&policy.spec.namespace_selector, labels)
            });
            (selects != Some(false)).then_some((policy, selects))
        })
        .collect();
    let (_, namespaces) = app.namespaces_offered(&caller).await;
    let markup = html::policies(
        &app.frame(&caller.csrf),
        namespace.as_deref(),
        &shown,
        &namespaces,
    );
    Ok(page(markup).into_response())
}

impl App {
    /// The namespace the create form starts in, and the namespaces to offer.
    async fn namespaces_offered(&self, caller: &Caller) -> (String, Vec<String>) {
        let offered = self
            .keys(caller, None)
            .await
            .map(|(_, namespaces)| namespaces)
            .unwrap_or_default();
        let first = match &self.callers {
            Callers::Local { client, .. } => client.default_namespace().to_owned(),
            Callers::Passthrough { .. } => {
                offered.first().cloned().unwrap_or_else(|| "default".into())
            }
        };
        (first, offered)
    }

    /// The create form, with the policies' choices for its namespace.
    async fn new_form_page(
        &self,
        caller: &Caller,
        form: &form::NewKey,
        namespaces: &[String],
        error: Option<&str>,
    ) -> Markup {
        let policies = actions::policies(&caller.client).await.unwrap_or_default();
        let labels = actions::namespace_labels(&caller.client, &form.namespace).await;
        let choices = form::choices(&policies, labels.as_ref());
        html::new_key(
            &self.frame(&caller.csrf),
            form,
            &form::field_rules(),
            &choices,
            namespaces,
            error,
        )
    }
}

async fn new_form(
    State(app): State<SharedApp>,
    caller: Caller,
    Query(params): Query<NamespaceParams>,
) -> Page {
    let (default, namespaces) = app.namespaces_offered(&caller).await;
    let form = form::NewKey {
        namespace: params.ns.filter(|ns| !ns.is_empty()).unwrap_or(default),
        ..Default::default()
    };
    let markup = app.new_form_page(&caller, &form, &namespaces, None).await;
    Ok(page(markup).into_response())
}

async fn new_post(State(app): State<SharedApp>, caller: Caller, body: Bytes) -> Page {
    let pairs = checked_form(&caller, &body)?;
    let form = form::NewKey::from_pairs(&pairs);
    let step = field(&pairs, "step").unwrap_or("check");
    let dry_run = match step {
        "preview" => true,
        "apply" => false,
        _ => {
            let (_, namespaces) = app.namespaces_offered(&caller).await;
            let markup = app.new_form_page(&caller, &form, &namespaces, None).await;
            return Ok(page(markup).into_response());
        }
    };
    match actions::create(&caller.client, &form, dry_run).await {
        Ok(()) if dry_run => {
            Ok(page(html::preview(&app.frame(&caller.csrf), &form)).into_response())
        }
        Ok(()) => Ok(Redirect::to(&format!(
            "/keys/{}/{}?notice=created",
            form.namespace, form.name
        ))
        .into_response()),
        Err(error) => {
            let message = PageError::from(error).message;
            let (_, namespaces) = app.namespaces_offered(&caller).await;
            let markup = app
                .new_form_page(&caller, &form, &namespaces, Some(&message))
                .await;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, page(markup)).into_response())
        }
    }
}

/// The embedded assets: no CDN, nothing fetched from elsewhere.
async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "dashboard.css" => (
            include_str!("assets/dashboard.css"),
            "text/css; charset=utf-8",
        ),
        "dashboard.js" => (
            include_str!("assets/dashboard.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
