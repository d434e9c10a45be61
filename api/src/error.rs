//! The API's one error type, mapped once to a status and a FHIR `OperationOutcome`.
//! Internal details are logged (without PHI), never sent to the client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("database error")]
    Database(#[from] db::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Database(db::Error::Sqlx(e))
    }
}

/// A FHIR `OperationOutcome` with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }]
    })
}

pub const FHIR_JSON: &str = "application/fhir+json";

pub fn fhir_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, FHIR_JSON)], body.to_string()).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, diagnostics) = match &self {
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, "not-found", format!("{what} not found")),
            ApiError::Database(e) => {
                tracing::error!(error = %e, "database failure");
                (StatusCode::SERVICE_UNAVAILABLE, "transient", "the database is not available; retry later".to_owned())
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "internal failure");
                (StatusCode::INTERNAL_SERVER_ERROR, "exception", "internal error".to_owned())
            }
        };
        fhir_response(status, &operation_outcome("error", code, &diagnostics))
    }
}
