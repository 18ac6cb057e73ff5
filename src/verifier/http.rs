//! The verifier's HTTP endpoints (the gRPC one is in `grpc`; `listen` serves
//! both on one port): the plain HTTP check that nginx `auth_request`, Traefik ForwardAuth, Envoy's
//! and Istio's HTTP mode and Gateway API ExternalAuth call, `POST /v1/verify`
//! for services, and `/metrics`, `/healthz`, `/readyz`.

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use serde::{Deserialize, Serialize};

use super::{
    core::Checked,
    request::{
        Endpoint, IDENTITY_HEADER_NAMES, KeySource, MAX_KEY_HEADER, identity_header_values,
        presented_key, required_scopes, result_label,
    },
    snapshot::{Code, Identity, Verdict},
};

/// The header a gateway may set instead of `?scope=`: required scopes,
/// separated by spaces or commas.
pub const SCOPES_HEADER: &str = "x-keyward-required-scopes";

/// The `scope` values of a check URL's query: `?scope=a,b` or `?scope=a&scope=b`.
/// Anything else in the query is ignored (gateways may append the original
/// request's query).
pub fn query_scopes(query: Option<&str>) -> Vec<String> {
    // The usual check has no query: no parsing, no allocation.
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Vec::new();
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    pairs
        .into_iter()
        .filter(|(name, _)| name == "scope")
        .map(|(_, value)| value)
        .collect()
}

fn bearer_error(error: &str, scopes: Option<&[&str]>) -> HeaderValue {
    let mut value = format!("Bearer error=\"{error}\"");
    if let Some(scopes) = scopes {
        value.push_str(&format!(", scope=\"{}\"", scopes.join(" ")));
    }
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer"))
}

/// The HTTP answer to a check: 200 with identity headers, 401, 403 or 503.
pub fn check_response(checked: &Checked, required: &[&str]) -> Response {
    match checked {
        Checked::Unavailable(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            *why,
        )
            .into_response(),
        Checked::Answer(Verdict {
            code: Code::Valid,
            identity: Some(identity),
        }) => {
            // Room for the identity headers and the one naming the key's
            // header, so the map is allocated once.
            let mut headers = HeaderMap::with_capacity(IDENTITY_HEADER_NAMES.len() + 1);
            for (name, value) in IDENTITY_HEADER_NAMES
                .into_iter()
                .zip(identity_header_values(identity))
            {
                if let Some(value) = value {
                    headers.insert(name, value);
                }
            }
            let mut response = Response::new(Body::empty());
            *response.headers_mut() = headers;
            response
        }
        Checked::Answer(Verdict {
            code: Code::InsufficientScope,
            ..
        }) => (
            StatusCode::FORBIDDEN,
            [(
                header::WWW_AUTHENTICATE,
                bearer_error("insufficient_scope", Some(required)),
            )],
        )
            .into_response(),
        Checked::Answer(_) => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                bearer_error("invalid_token", None),
            )],
        )
            .into_response(),
    }
}

/// `/check/scopes/{scopes}/…`: scopes in the path, for gateways that append the
/// original request's path (and query) to a fixed prefix: Envoy's and Istio's
/// HTTP mode, Envoy Gateway.
async fn check_with_path_scopes(
    State(endpoint): State<Endpoint>,
    Path(path): Path<HashMap<String, String>>,
    request: Request,
) -> Response {
    let scopes = path.get("scopes").cloned();
    check_request(&endpoint, scopes, request.uri().query(), request.headers()).await
}

/// The request is taken whole and read in place: the `HeaderMap` extractor
/// would copy every header.
async fn check(State(endpoint): State<Endpoint>, request: Request) -> Response {
    check_request(&endpoint, None, request.uri().query(), request.headers()).await
}

/// The answer to a check: `path_scopes` from `/check/scopes/{scopes}/…`,
/// the query's `scope` values and the scopes header are all required.
pub async fn check_request(
    endpoint: &Endpoint,
    path_scopes: Option<String>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let started = Instant::now();
    let from_query = query_scopes(query);
    let from_header = headers
        .get_all(SCOPES_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let required = required_scopes(
        path_scopes
            .as_deref()
            .into_iter()
            .chain(from_query.iter().map(String::as_str))
            .chain(from_header),
    );
    let presented = presented_key(
        headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(HeaderValue::as_bytes),
        headers
            .get_all(&endpoint.key_header)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let (checked, source) = match presented {
        Some((key, source)) => (endpoint.verifier.check(key, &required).await, Some(source)),
        None => (
            Checked::Answer(Verdict {
                code: Code::Malformed,
                identity: None,
            }),
            None,
        ),
    };
    endpoint
        .metrics
        .observe_verify("http", result_label(&checked), started);
    let mut response = check_response(&checked, &required);
    // Envoy's HTTP mode removes the headers named here before going upstream,
    // so the key does not travel further (the gRPC mode does the same).
    if response.status() == StatusCode::OK
        && let Some(source) = source
    {
        let value = match source {
            KeySource::Authorization => Ok(HeaderValue::from_static("authorization")),
            KeySource::Custom => HeaderValue::from_str(endpoint.key_header.as_str()),
        };
        if let Ok(value) = value {
            response.headers_mut().insert(HEADERS_TO_REMOVE, value);
        }
    }
    response
}

/// Envoy's list of request headers to remove before going upstream.
const HEADERS_TO_REMOVE: HeaderName = HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// The body of `POST /v1/verify`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The presented key.
    pub key: String,
    /// Scopes the caller requires; empty means none.
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("key", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// The answer of `POST /v1/verify`.
#[derive(Debug, Serialize)]
pub struct VerifyResponse {
    /// Whether the key is good for the scopes.
    pub valid: bool,
    /// `VALID`, `MALFORMED`, `UNKNOWN`, `REVOKED`, `EXPIRED` or `INSUFFICIENT_SCOPE`.
    pub code: Code,
    /// The key's identity when it is known and live.
    pub key: Option<Arc<Identity>>,
}

/// Why a `/v1/verify` body asks no question: 415 without a JSON content type,
/// 422 for anything but `{"key": string, "scopes": [string]}` (not JSON, an
/// array, missing or unknown fields, wrong types). The reason names no value,
/// so the key is never echoed.
pub fn verify_request(
    content_type: Option<&[u8]>,
    body: &[u8],
) -> Result<VerifyRequest, (StatusCode, &'static str)> {
    let json = content_type
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|value| value.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| {
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if !json {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let malformed = (
        StatusCode::UNPROCESSABLE_ENTITY,
        r#"the body must be {"key": string, "scopes": [string]}"#,
    );
    // serde would also read a struct from an array (`["x"]`): only an object will do.
    if body.iter().find(|b| !b" \t\n\r".contains(b)) != Some(&b'{') {
        return Err(malformed);
    }
    serde_json::from_slice(body).map_err(|_| malformed)
}

async fn verify(State(endpoint): State<Endpoint>, headers: HeaderMap, body: Bytes) -> Response {
    let request = match verify_request(
        headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes),
        &body,
    ) {
        Ok(request) => request,
        Err((status, why)) => {
            return (status, Json(serde_json::json!({"error": why}))).into_response();
        }
    };
    let started = Instant::now();
    let required: Vec<&str> = request.scopes.iter().map(String::as_str).collect();
    let key = request.key.trim();
    let checked = if key.is_empty() || key.len() > MAX_KEY_HEADER {
        Checked::Answer(Verdict {
            code: Code::Malformed,
            identity: None,
        })
    } else {
        endpoint.verifier.check(key, &required).await
    };
    endpoint
        .metrics
        .observe_verify("json", result_label(&checked), started);
    match checked {
        Checked::Answer(verdict) => Json(VerifyResponse {
            valid: verdict.code == Code::Valid,
            code: verdict.code,
            key: verdict.identity,
        })
        .into_response(),
        Checked::Unavailable(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": why})),
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.verifier.is_ready() {
        Ok(()) => endpoint.verifier.readiness().into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(endpoint): State<Endpoint>) -> Response {
    if let Some(age) = endpoint.verifier.staleness() {
        endpoint
            .metrics
            .verifier_snapshot_age
            .set(age.as_secs_f64());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        endpoint.metrics.encode(),
    )
        .into_response()
}

/// The HTTP routes: the check (`/check`, and `/check/…` for gateways that
/// append the original path), `/v1/verify` and the probes.
pub fn routes(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/check", any(check))
        .route("/check/scopes/{scopes}", any(check_with_path_scopes))
        .route(
            "/check/scopes/{scopes}/{*path}",
            any(check_with_path_scopes),
        )
        .route("/check/{*path}", any(check))
        .route("/v1/verify", post(verify))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_json_object_of_key_and_scopes_is_a_question() {
        let json = Some(&b"application/json"[..]);
        let asked = verify_request(json, br#" {"key": "kw_x", "scopes": ["a"]}"#).unwrap();
        assert_eq!(
            (asked.key.as_str(), asked.scopes),
            ("kw_x", vec!["a".into()])
        );
        for body in [
            &br#"["kw_x"]"#[..],
            b"not json",
            b"",
            b"null",
            br#"{"key": 1}"#,
            br#"{"key": "kw_x", "scopes": "a"}"#,
            br#"{"key": "kw_x", "other": 1}"#,
        ] {
            let refused = verify_request(json, body).unwrap_err();
            assert_eq!(refused.0, StatusCode::UNPROCESSABLE_ENTITY);
        }
        for content_type in [None, Some(&b"text/plain"[..])] {
            let refused = verify_request(content_type, br#"{"key": "kw_x"}"#).unwrap_err();
            assert_eq!(refused.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        let problem = Some(&b"application/problem+json; charset=utf-8"[..]);
        assert!(verify_request(problem, br#"{"key": "kw_x"}"#).is_ok());
    }
}
