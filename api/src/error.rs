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
    #[error("database error")]
    Database(#[from] db::Error),
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
}

pub const FHIR_JSON: &str = "application/fhir+json";

pub fn fhir_json() -> HeaderValue {
    HeaderValue::from_static("application/fhir+json; charset=utf-8")
}

pub fn outcome_response(status: StatusCode, code: &'static str, diagnostics: String) -> Response {
    let body = OperationOutcome { resource_type: "OperationOutcome", issue: vec![Issue { severity: "error", code, diagnostics }] };
    let text = serde_json::to_string(&body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, fhir_json())], text).into_response()
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
            ApiError::Database(e) => {
                tracing::error!(error = %e, "database failure");
                return outcome_response(StatusCode::SERVICE_UNAVAILABLE, "transient", "the database is not available; retry later".into());
            }
        };
        outcome_response(status, code, self.to_string())
    }
}
