//! The API's one error type, mapped once to a status and a FHIR `OperationOutcome`.
//! Internal details are logged (without PHI), never sent to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a malformed id, an unknown or malformed parameter.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 401: no usable bearer token (`WWW-Authenticate` says why).
    #[error("{diagnostics}")]
    Unauthorized { diagnostics: String, error: Option<&'static str> },
    /// 403: the token's scopes do not cover the request.
    #[error("{diagnostics}")]
    Forbidden { diagnostics: String, scope: String },
    /// 429: the partner's rate limit; retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    TooManyRequests(u64),
    /// A refusal of the token endpoint, with its OAuth 2.0 error code (RFC 6749 §5.2).
    #[error("{description}")]
    OAuth { status: StatusCode, error: &'static str, description: String },
    /// 422: a resource that is well-formed JSON but not acceptable; `expression` names the element.
    #[error("{diagnostics}")]
    Unprocessable { expression: String, diagnostics: String },
    /// 422 for a rule of this server rather than of FHIR (e.g. a composite's size limit).
    #[error("{0}")]
    BusinessRule(String),
    /// 412: `If-Match` does not name the current version.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 428: an update without `If-Match`.
    #[error("{0}")]
    PreconditionRequired(String),
    /// 403 for a reason other than scopes (e.g. updating a resource another source reported).
    #[error("{0}")]
    NotPermitted(String),
    /// 503: a dependency or a capability is not available.
    #[error("{0}")]
    Unavailable(String),
    /// 413: the body is larger than this route takes.
    #[error("the request body is larger than the {limit} bytes this endpoint takes")]
    PayloadTooLarge { limit: usize },
    /// 408: the body, or the whole request, took too long.
    #[error("{0}")]
    RequestTimeout(String),
    /// 500: a handler failed in a way it did not expect (a panic); nothing more is said.
    #[error("the server failed to handle this request; it has been recorded")]
    Internal,
    #[error("database error")]
    Database(#[from] db::Error),
    /// The access could not be put on record, so nothing is returned.
    #[error("the access could not be audited")]
    AuditUnavailable,
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Database(db::Error::Sqlx(e))
    }
}

/// A FHIR `OperationOutcome` (the body of every error).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationOutcome {
    #[schema(example = "OperationOutcome")]
    pub resource_type: &'static str,
    pub issue: Vec<Issue>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Issue {
    /// `fatal | error | warning | information`
    #[schema(example = "error")]
    pub severity: &'static str,
    /// An IssueType code, e.g. `not-found`, `invalid`, `processing`.
    #[schema(example = "not-found")]
    pub code: &'static str,
    /// What went wrong, for a person to read.
    pub diagnostics: String,
    /// The element at fault (FHIRPath), for refused resources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expression: Option<Vec<String>>,
}

pub const FHIR_JSON: &str = "application/fhir+json";

pub fn fhir_json() -> HeaderValue {
    HeaderValue::from_static("application/fhir+json; charset=utf-8")
}

pub fn outcome_response(status: StatusCode, code: &'static str, diagnostics: String) -> Response {
    let body = OperationOutcome { resource_type: "OperationOutcome", issue: vec![Issue { severity: "error", code, diagnostics, expression: None }] };
    let text = serde_json::to_string(&body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, fhir_json())], text).into_response()
}

/// The body of every refusal of the token endpoint (RFC 6749 §5.2), which OAuth client
/// libraries parse; FHIR endpoints answer `OperationOutcome` instead.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenError {
    /// `invalid_request | invalid_client | invalid_scope | unsupported_grant_type`, or
    /// `temporarily_unavailable` / `server_error` (RFC 6749 §4.1.2.1) when the refusal is not
    /// about the request.
    #[schema(example = "invalid_client")]
    pub error: &'static str,
    /// What went wrong, for a person to read.
    pub error_description: String,
}

impl ApiError {
    /// The RFC 6749 §5.2 code of this refusal on the token endpoint.
    fn oauth_code(&self) -> &'static str {
        match self {
            ApiError::OAuth { error, .. } => error,
            ApiError::TooManyRequests(_)
            | ApiError::Unavailable(_)
            | ApiError::Database(_)
            | ApiError::AuditUnavailable
            | ApiError::RequestTimeout(_) => "temporarily_unavailable",
            ApiError::Internal => "server_error",
            ApiError::Unauthorized { .. } => "invalid_client",
            ApiError::Forbidden { .. } => "invalid_scope",
            _ => "invalid_request",
        }
    }

    /// This refusal as the token endpoint answers it: the status it has anywhere, an RFC 6749
    /// JSON body, `Cache-Control: no-store`, and `WWW-Authenticate` on 401.
    pub fn into_oauth_response(self) -> Response {
        let error = self.oauth_code();
        let (status, description, retry_after) = match self {
            ApiError::OAuth { status, description, .. } => (status, description, None),
            other => {
                let description = match &other {
                    ApiError::Database(_) => "the database is not available; retry later".to_owned(),
                    ApiError::AuditUnavailable => "the request could not be audited, so nothing is issued; retry later".to_owned(),
                    _ => other.to_string(),
                };
                // The status (and the log line of a database failure) as on every other route.
                let general = other.into_response();
                (general.status(), description, general.headers().get(header::RETRY_AFTER).cloned())
            }
        };
        let text = serde_json::to_string(&TokenError { error, error_description: description }).unwrap_or_default();
        let mut r = (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], text).into_response();
        let headers = r.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, seconds);
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, header_value(&format!("private_key_jwt error=\"{error}\"")));
        }
        r
    }

    /// This refusal as `path` answers it: RFC 6749 JSON on the token endpoint, an
    /// `OperationOutcome` everywhere else.
    pub fn respond_on(self, path: &str) -> Response {
        if path == crate::routes::TOKEN { self.into_oauth_response() } else { self.into_response() }
    }
}

/// Header values built from our own text (never from client input).
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::Gone(_) => (StatusCode::GONE, "deleted"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "not-supported"),
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "not-supported"),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-supported"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            ApiError::BusinessRule(_) => (StatusCode::UNPROCESSABLE_ENTITY, "business-rule"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
            ApiError::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "conflict"),
            ApiError::PreconditionRequired(_) => (StatusCode::PRECONDITION_REQUIRED, "required"),
            ApiError::NotPermitted(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Unprocessable { expression, diagnostics } => {
                let issue =
                    Issue { severity: "error", code: "invalid", diagnostics: diagnostics.clone(), expression: Some(vec![expression.clone()]) };
                let text = serde_json::to_string(&OperationOutcome { resource_type: "OperationOutcome", issue: vec![issue] }).unwrap_or_default();
                return (StatusCode::UNPROCESSABLE_ENTITY, [(header::CONTENT_TYPE, fhir_json())], text).into_response();
            }
            ApiError::Database(e) => {
                tracing::error!(error = %e, "database failure");
                return outcome_response(StatusCode::SERVICE_UNAVAILABLE, "transient", "the database is not available; retry later".into());
            }
            ApiError::AuditUnavailable => {
                return outcome_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transient",
                    "the access could not be audited, so nothing is returned; retry later".into(),
                );
            }
            ApiError::Unauthorized { diagnostics, error } => {
                let challenge = match error {
                    Some(e) => format!("Bearer realm=\"fhir\", error=\"{e}\""),
                    None => "Bearer realm=\"fhir\"".to_owned(),
                };
                let mut r = outcome_response(StatusCode::UNAUTHORIZED, "login", diagnostics.clone());
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header_value(&challenge));
                return r;
            }
            ApiError::Forbidden { diagnostics, scope } => {
                let challenge = format!("Bearer realm=\"fhir\", error=\"insufficient_scope\", scope=\"{scope}\"");
                let mut r = outcome_response(StatusCode::FORBIDDEN, "forbidden", diagnostics.clone());
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header_value(&challenge));
                return r;
            }
            ApiError::TooManyRequests(seconds) => {
                let mut r = outcome_response(StatusCode::TOO_MANY_REQUESTS, "throttled", self.to_string());
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
                return r;
            }
            // Only the token endpoint refuses with OAuth codes, and it answers the OAuth way.
            ApiError::OAuth { .. } => return self.into_oauth_response(),
        };
        outcome_response(status, code, self.to_string())
    }
}
