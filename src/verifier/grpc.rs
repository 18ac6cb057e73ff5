//! Envoy's external authorization over gRPC (`envoy.service.auth.v3.Authorization/Check`).
//! Required scopes come from the route's `context_extensions` (`keyward-scopes`).

use std::time::Instant;

use envoy_types::{
    ext_authz::v3::{
        CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder,
        pb::{
            Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HeaderValue,
            HeaderValueOption, HttpResponse, HttpStatusCode, OkHttpResponse,
        },
    },
    pb::google::rpc,
};
use tonic::{Request, Response, Status};

use super::{
    core::Checked,
    request::{
        Endpoint, IDENTITY_HEADERS, KeySource, identity_values, presented_key, required_scopes,
        result_label,
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
            // Built as the protos themselves, each string made once: envoy-types'
            // builder and `tonic::Status` would copy them again.
            let headers = IDENTITY_HEADERS
                .into_iter()
                .zip(identity_values(identity))
                .map(|(name, value)| {
                    #[allow(deprecated)] // `append`, set to nothing as the builder does
                    HeaderValueOption {
                        header: Some(HeaderValue {
                            key: name.to_owned(),
                            value: value.into_owned(),
                            raw_value: Vec::new(),
                        }),
                        append: None,
                        // Overwrite, never append: a client's own `x-keyward-owner`
                        // must not reach the upstream beside ours. Said explicitly,
                        // because the default (`APPEND_IF_EXISTS_OR_ADD`) is honoured
                        // by Envoy releases that read `append_action` when `append`
                        // is unset.
                        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
                        keep_empty_value: false,
                    }
                })
                .collect();
            #[allow(deprecated)] // `dynamic_metadata`, left empty as the builder does
            let ok = OkHttpResponse {
                headers,
                headers_to_remove: removed.map(str::to_owned).into_iter().collect(),
                dynamic_metadata: None,
                response_headers_to_add: Vec::new(),
                query_parameters_to_remove: Vec::new(),
                query_parameters_to_set: Vec::new(),
            };
            CheckResponse {
                status: Some(rpc::Status {
                    code: tonic::Code::Ok.into(),
                    message: "key is valid".to_owned(),
                    details: Vec::new(),
                }),
                http_response: Some(HttpResponse::OkResponse(ok)),
                ..Default::default()
            }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envoy_types::ext_authz::v3::OkHttpResponseBuilder;

    use super::*;
    use crate::verifier::snapshot::Identity;

    /// The answer as envoy-types' builder makes it, which the direct
    /// construction replaced: the same protos, field for field.
    #[test]
    fn an_allowed_check_is_what_the_builder_made() {
        let identity = Identity {
            key_id: "kid".into(),
            namespace: "ns".into(),
            name: "n".into(),
            owner: "o@example.com".into(),
            team: "t".into(),
            scopes: ["inference".into(), "models:read".into()].into(),
            cluster: "default".into(),
        };
        let values = [
            "kid",
            "o@example.com",
            "t",
            "inference models:read",
            "ns",
            "n",
            "default",
        ];
        let checked = Checked::Answer(Verdict {
            code: Code::Valid,
            identity: Some(Arc::new(identity)),
        });
        for removed in [Some("authorization"), Some("x-api-key"), None] {
            let mut ok = OkHttpResponseBuilder::new();
            for (name, value) in IDENTITY_HEADERS.into_iter().zip(values) {
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
            let mut expected = CheckResponse::with_status(Status::ok("key is valid"));
            expected.set_http_response(ok);
            assert_eq!(check_response(&checked, &[], removed), expected);
        }
    }
}
