//! Who may talk to the dashboard: the pure checks every request passes before
//! a handler sees it. A local web server that holds someone's cluster
//! credentials is a target for every page that person visits, so:
//!
//! - local mode needs the random token from the printed URL (then a cookie),
//!   as Jupyter does; token passthrough mode needs a bearer token per request;
//! - the Host header must name the dashboard (against DNS rebinding);
//! - an Origin header must be the dashboard's own (against cross-site requests);
//! - every form carries a CSRF token bound to the caller's credentials.

use sha2::{Digest, Sha256};

/// The Host and Origin rules and the credentials a request must carry.
#[derive(Clone)]
pub struct Guard {
    mode: Mode,
    /// Hosts (`host:port`) requests may name; empty allows any (token passthrough only).
    hosts: Vec<String>,
    /// The key of the CSRF tokens: random per process.
    csrf_secret: [u8; 32],
}

/// How callers prove who they are.
#[derive(Clone)]
pub enum Mode {
    /// One user, whose kubeconfig the dashboard uses: the URL's token, then a cookie.
    Local {
        /// The random token in the printed URL.
        session: String,
        /// The cookie's name (with the port: cookies are per host, not per port).
        cookie: String,
    },
    /// Many users behind an authenticating proxy: each request's bearer token is
    /// the credential the dashboard calls the API server with.
    Passthrough,
}

/// What the guard decided about one request. Its Debug output leaves the
/// credentials out.
#[derive(PartialEq, Eq)]
pub enum Admission {
    /// Go on, as the caller with this identity (a hash of its credential) and,
    /// in passthrough mode, its bearer token.
    Allowed {
        /// Binds CSRF tokens to the caller.
        identity: [u8; 32],
        /// The caller's token for the API server (passthrough mode).
        bearer: Option<String>,
    },
    /// The URL's token was right: set the session cookie and redirect to the
    /// same path without the token, so it leaves the address bar and history.
    StartSession {
        /// The cookie header value.
        set_cookie: String,
        /// Where to send the browser.
        location: String,
    },
    /// Refused, with the HTTP status and a reason for the caller.
    Refused {
        /// 400, 401 or 403.
        status: u16,
        /// Why; safe to show (it names no credential).
        reason: &'static str,
    },
}

/// The parts of a request the guard reads.
#[derive(Default)]
pub struct RequestFacts<'a> {
    /// Whether the method only reads (GET or HEAD).
    pub safe_method: bool,
    /// The path, without the query.
    pub path: &'a str,
    /// The query string, if any.
    pub query: Option<&'a str>,
    /// The Host header.
    pub host: Option<&'a str>,
    /// The Origin header.
    pub origin: Option<&'a str>,
    /// The Sec-Fetch-Site header, which browsers set on every request.
    pub fetch_site: Option<&'a str>,
    /// The Cookie header.
    pub cookie: Option<&'a str>,
    /// The Authorization header.
    pub authorization: Option<&'a str>,
    /// The X-Forwarded-Access-Token header (oauth2-proxy's `--pass-access-token`).
    pub forwarded_token: Option<&'a str>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admission::Allowed { bearer, .. } => f
                .debug_struct("Allowed")
                .field("bearer", &bearer.as_ref().map(|_| "<redacted>"))
                .finish_non_exhaustive(),
            Admission::StartSession { location, .. } => f
                .debug_struct("StartSession")
                .field("location", location)
                .finish_non_exhaustive(),
            Admission::Refused { status, reason } => f
                .debug_struct("Refused")
                .field("status", status)
                .field("reason", reason)
                .finish(),
        }
    }
}

impl Guard {
    /// A guard for `mode`, allowing `hosts` (`host:port`) and keying CSRF tokens with `csrf_secret`.
    pub fn new(mode: Mode, hosts: Vec<String>, csrf_secret: [u8; 32]) -> Self {
        Self {
            mode,
            hosts,
            csrf_secret,
        }
    }

    /// Decides about one request.
    pub fn admit(&self, request: &RequestFacts) -> Admission {
        let refuse = |status, reason| Admission::Refused { status, reason };
        let Some(host) = request.host else {
            return refuse(400, "the request names no Host");
        };
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return refuse(403, "the Host header does not name this dashboard");
        }
        if let Some(origin) = request.origin {
            let same = [format!("http://{host}"), format!("https://{host}")]
                .iter()
                .any(|own| own.eq_ignore_ascii_case(origin));
            if !same {
                return refuse(403, "cross-origin requests are refused");
            }
        }
        if !request.safe_method && request.fetch_site == Some("cross-site") {
            return refuse(403, "cross-site requests are refused");
        }
        match &self.mode {
            Mode::Local { session, cookie } => {
                let from_cookie = request
                    .cookie
                    .and_then(|header| cookie_value(header, cookie));
                if from_cookie.is_some_and(|value| same_secret(value, session)) {
                    return Admission::Allowed {
                        identity: sha256(session.as_bytes()),
                        bearer: None,
                    };
                }
                let from_query = request.query.and_then(|q| query_value(q, "token"));
                match from_query {
                    Some(token) if request.safe_method && same_secret(&token, session) => {
                        Admission::StartSession {
                            set_cookie: format!(
                                "{cookie}={session}; Path=/; HttpOnly; SameSite=Strict"
                            ),
                            location: request.path.to_owned(),
                        }
                    }
                    _ => refuse(
                        401,
                        "open the URL that `kubectl keyward dashboard` printed, with its token",
                    ),
                }
            }
            Mode::Passthrough => {
                let bearer = request
                    .authorization
                    .and_then(|h| {
                        h.strip_prefix("Bearer ")
                            .or_else(|| h.strip_prefix("bearer "))
                    })
                    .or(request.forwarded_token)
                    .map(str::trim)
                    .filter(|t| !t.is_empty());
                match bearer {
                    Some(token) => Admission::Allowed {
                        identity: sha256(token.as_bytes()),
                        bearer: Some(token.to_owned()),
                    },
                    None => refuse(
                        401,
                        "every request needs the caller's bearer token (Authorization or X-Forwarded-Access-Token); this dashboard has no credentials of its own",
                    ),
                }
            }
        }
    }

    /// The CSRF token for a caller: forms carry it, and a POST without it is refused.
    pub fn csrf_token(&self, identity: &[u8; 32]) -> String {
        let mut hash = Sha256::new();
        hash.update(b"keyward-dashboard-csrf\0");
        hash.update(self.csrf_secret);
        hash.update(identity);
        hex(&hash.finalize())
    }
}

/// A value from a Cookie header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A value from a query string, decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn local() -> Guard {
        Guard::new(
            Mode::Local {
                session: TOKEN.into(),
                cookie: "keyward_dashboard_8080".into(),
            },
            vec!["127.0.0.1:8080".into(), "localhost:8080".into()],
            [7; 32],
        )
    }

    fn get<'a>() -> RequestFacts<'a> {
        RequestFacts {
            safe_method: true,
            path: "/",
            host: Some("127.0.0.1:8080"),
            cookie: Some("other=1; keyward_dashboard_8080=0123456789abcdef0123456789abcdef"),
            ..Default::default()
        }
    }

    fn refused(admission: Admission) -> u16 {
        match admission {
            Admission::Refused { status, .. } => status,
            other => panic!("admitted: {other:?}"),
        }
    }

    #[test]
    fn the_session_cookie_admits_and_its_absence_refuses() {
        assert!(matches!(
            local().admit(&get()),
            Admission::Allowed { bearer: None, .. }
        ));
        let mut request = get();
        request.cookie = Some("keyward_dashboard_8080=0123456789abcdef0123456789abcdee");
        assert_eq!(refused(local().admit(&request)), 401);
        request.cookie = None;
        assert_eq!(refused(local().admit(&request)), 401);
    }

    #[test]
    fn the_url_token_starts_a_session_and_leaves_the_url() {
        let mut request = get();
        request.cookie = None;
        request.path = "/keys/a/b";
        request.query = Some("token=0123456789abcdef0123456789abcdef");
        assert_eq!(
            local().admit(&request),
            Admission::StartSession {
                set_cookie: format!(
                    "keyward_dashboard_8080={TOKEN}; Path=/; HttpOnly; SameSite=Strict"
                ),
                location: "/keys/a/b".into(),
            }
        );
        request.query = Some("token=wrong");
        assert_eq!(refused(local().admit(&request)), 401);
        // A POST cannot start a session.
        request.query = Some("token=0123456789abcdef0123456789abcdef");
        request.safe_method = false;
        assert_eq!(refused(local().admit(&request)), 401);
    }

    #[test]
    fn a_foreign_host_or_origin_is_refused() {
        let mut request = get();
        request.host = Some("attacker.example:8080");
        assert_eq!(refused(local().admit(&request)), 403);
        request.host = None;
        assert_eq!(refused(local().admit(&request)), 400);
        let mut request = get();
        request.origin = Some("http://attacker.example");
        assert_eq!(refused(local().admit(&request)), 403);
        request.origin = Some("http://127.0.0.1:8080");
        assert!(matches!(local().admit(&request), Admission::Allowed { .. }));
        let mut request = get();
        request.safe_method = false;
        request.fetch_site = Some("cross-site");
        assert_eq!(refused(local().admit(&request)), 403);
        request.fetch_site = Some("same-origin");
        assert!(matches!(local().admit(&request), Admission::Allowed { .. }));
    }

    #[test]
    fn passthrough_needs_a_bearer_token_on_every_request() {
        let guard = Guard::new(Mode::Passthrough, vec![], [1; 32]);
        let mut request = get();
        request.cookie = None;
        assert_eq!(refused(guard.admit(&request)), 401);
        request.authorization = Some("Bearer   ");
        assert_eq!(refused(guard.admit(&request)), 401);
        request.authorization = Some("Bearer alice-token");
        let Admission::Allowed { identity, bearer } = guard.admit(&request) else {
            panic!("refused")
        };
        assert_eq!(bearer.as_deref(), Some("alice-token"));
        request.authorization = None;
        request.forwarded_token = Some("bob-token");
        let Admission::Allowed { identity: bob, .. } = guard.admit(&request) else {
            panic!("refused")
        };
        // Each caller's CSRF token is its own.
        assert_ne!(guard.csrf_token(&identity), guard.csrf_token(&bob));
    }

    #[test]
    fn admissions_never_print_a_credential() {
        let allowed = Admission::Allowed {
            identity: [1; 32],
            bearer: Some("alice-token".into()),
        };
        let session = Admission::StartSession {
            set_cookie: format!("keyward_dashboard_8080={TOKEN}"),
            location: "/".into(),
        };
        for admission in [allowed, session] {
            let printed = format!("{admission:?}");
            assert!(
                !printed.contains("alice-token") && !printed.contains(TOKEN),
                "{printed}"
            );
        }
    }

    #[test]
    fn csrf_tokens_are_bound_to_the_caller_and_the_process() {
        let guard = local();
        let identity = [3; 32];
        let token = guard.csrf_token(&identity);
        assert_eq!(token.len(), 64);
        assert_eq!(token, guard.csrf_token(&identity));
        assert_ne!(token, guard.csrf_token(&[4; 32]));
        let other_process = Guard::new(Mode::Passthrough, vec![], [8; 32]);
        assert_ne!(token, other_process.csrf_token(&identity));
        assert!(same_secret(&token, &token.clone()));
        assert!(!same_secret(&token, ""));
        assert!(!same_secret(&token, &token[1..]));
    }
}
