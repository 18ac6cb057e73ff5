//! Envoy's external authorization over gRPC (`envoy.service.auth.v3.Authorization/Check`).
//! Required scopes come from the route's `context_extensions` (`keyward-scopes`).

use std::time::Instant;

use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
    pb::{Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode},
};
use tonic::{Request, Response, Status};

use super::{
    core::Checked,
    request::{
        Endpoint, KeySource, identity_headers, presented_key, required_scopes, result_label,
    },
    snapshot::{Code, Verdict},
};

/// The `context_extensions` key that lists a route's required scopes.
pub const SCOPES_EXTENSION: &str = "keyward-scopes";

/// The ext_authz service.
pub struct ExtAuthz {
    /// The shared endpoint state.
    pub endpoint: Endpoint,
}

/// A denial with an explicit HTTP status (Envoy's default would be 403).
fn denied(status: Status, http: HttpStatusCode, www_authenticate: Option<String>) -> CheckResponse {
    let mut body = DeniedHttpResponseBuilder::new();
    body.set_http_status(http);
    if let Some(value) = www_authenticate {
        body.add_header("www-authenticate", value, None, false);
    }
    let mut response = CheckResponse::with_status(status);
    response.set_http_response(body);
    response
}

/// The gRPC route: `envoy.service.auth.v3.Authorization/Check`.
pub fn routes(endpoint: Endpoint) -> axum::Router {
    tonic::service::Routes::new(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(
        ExtAuthz { endpoint },
    ))
    .into_axum_router()
}

/// The CheckResponse for an answer; `removed` is the header that carried the key.
pub fn check_response(
    checked: &Checked,
    required: &[&str],
    removed: Option<&str>,
) -> CheckResponse {
    match checked {
        Checked::Unavailable(why) => denied(
            Status::unavailable(*why),
            HttpStatusCode::ServiceUnavailable,
            None,
        ),
        Checked::Answer(Verdict {
            code: Code::Valid,
            identity: Some(identity),
        }) => {
            let mut ok = OkHttpResponseBuilder::new();
            // Overwrite, never append: a client's own `x-keyward-owner` must not
            // reach the upstream beside ours. Said explicitly, because the
            // builder's default (`APPEND_IF_EXISTS_OR_ADD`) is honoured by Envoy
            // releases that read `append_action` when `append` is unset.
            for (name, value) in identity_headers(identity) {
                ok.add_header(
                    name,
                    value,
                    Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                    false,
                );
            }
            if let Some(header) = removed {
                ok.remove_header(header);
            }
            let mut response = CheckResponse::with_status(Status::ok("key is valid"));
            response.set_http_response(ok);
            response
        }
        Checked::Answer(Verdict {
            code: Code::InsufficientScope,
            ..
        }) => denied(
            Status::permission_denied("the key lacks a required scope"),
            HttpStatusCode::Forbidden,
            Some(format!(
                "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                required.join(" ")
            )),
        ),
        Checked::Answer(_) => denied(
            Status::unauthenticated("no valid key"),
            HttpStatusCode::Unauthorized,
            Some("Bearer error=\"invalid_token\"".to_owned()),
        ),
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let empty = Default::default();
        let headers = request.get_client_headers().unwrap_or(&empty);
        let extensions = request
            .attributes
            .as_ref()
            .map(|a| &a.context_extensions)
            .unwrap_or(&empty);
        let required = required_scopes(
            extensions
                .get(SCOPES_EXTENSION)
                .map(String::as_str)
                .into_iter(),
        );
        let key_header = self.endpoint.key_header.as_str();
        let presented = presented_key(
            headers
                .get("authorization")
                .map(String::as_bytes)
                .into_iter(),
            headers.get(key_header).map(String::as_bytes).into_iter(),
        );
        let (checked, removed) = match presented {
            Some((key, source)) => {
                let removed = match source {
                    KeySource::Authorization => "authorization",
                    KeySource::Custom => key_header,
                };
                (
                    self.endpoint.verifier.check(key, &required).await,
                    Some(removed),
                )
            }
            None => (
                Checked::Answer(Verdict {
                    code: Code::Malformed,
                    identity: None,
                }),
                None,
            ),
        };
        self.endpoint
            .metrics
            .observe_verify("grpc", result_label(&checked), started);
        Ok(Response::new(check_response(&checked, &required, removed)))
    }
}
