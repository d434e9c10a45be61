//! SMART Backend Services over HTTP: discovery, and `POST /auth/token` (the protocol itself is
//! `crate::auth::token`).

use crate::audit::Audited;
use crate::auth::token::{TokenRequest, TokenResponse, issue, smart_configuration};
use crate::error::{ApiError, TokenError};
use crate::limits::RequestBody;
use crate::routes as paths;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(smart_configuration_handler)).routes(routes!(smart_configuration_fhir)).routes(routes!(token))
}

/// SMART discovery document (also served under the FHIR base).
#[utoipa::path(get, path = paths::SMART_CONFIGURATION, tag = "authorization", operation_id = "smartConfiguration",
    responses((status = 200, description = "SMART configuration", body = Object, content_type = "application/json")))]
pub async fn smart_configuration_handler(State(state): State<AppState>) -> Response {
    Json(smart_configuration(&state.auth.token_url)).into_response()
}

/// SMART discovery document, relative to the FHIR base as SMART clients look for it.
#[utoipa::path(get, path = paths::SMART_CONFIGURATION_FHIR, tag = "authorization", operation_id = "smartConfigurationFhir",
    responses((status = 200, description = "SMART configuration", body = Object, content_type = "application/json")))]
pub async fn smart_configuration_fhir(state: State<AppState>) -> Response {
    smart_configuration_handler(state).await
}

/// Exchanges a signed client assertion for a short-lived bearer token. Refusals are RFC 6749
/// §5.2 JSON (`error`, `error_description`), as OAuth client libraries expect.
#[utoipa::path(post, path = paths::TOKEN, tag = "authorization", operation_id = "token",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "An access token", body = TokenResponse, content_type = "application/json"),
        (status = 400, description = "Malformed request (invalid_request), unsupported grant type (unsupported_grant_type) or scope (invalid_scope)", body = TokenError, content_type = "application/json"),
        (status = 401, description = "The client could not be authenticated (invalid_client): unknown, disabled, bad signature, expired or replayed assertion", body = TokenError, content_type = "application/json"),
        (status = 408, description = "The body did not arrive in time (temporarily_unavailable)", body = TokenError, content_type = "application/json"),
        (status = 413, description = "The body is over 16 KiB (invalid_request)", body = TokenError, content_type = "application/json"),
        (status = 415, description = "The body is not a form (invalid_request)", body = TokenError, content_type = "application/json"),
        (status = 429, description = "This client address sent too many token requests or unauthenticated requests (ADDRESS_RATE_LIMIT_*); see Retry-After (temporarily_unavailable)", body = TokenError, content_type = "application/json")))]
pub async fn token(State(state): State<AppState>, headers: HeaderMap, body: Result<RequestBody, ApiError>) -> Response {
    // The registered partner, once known, goes on the audit record of this request.
    let mut audited = Audited::operation("token");
    let result = match body {
        Ok(RequestBody(body)) => issue(&state.auth, &state.pool, &headers, &body, &mut audited).await,
        Err(refused) => Err(refused),
    };
    let mut response = result.unwrap_or_else(ApiError::into_oauth_response);
    response.extensions_mut().insert(audited);
    response
}
