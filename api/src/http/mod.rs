//! The handlers, one module per resource or concern, each with its routes (`router`). They
//! share `crate::state::AppState`; the guard in front of them (`crate::guard`) has already
//! authenticated the caller and will record the access.

pub mod audit_events;
pub mod health;
pub mod matching;
pub mod metadata;
pub mod profile;
pub mod resources;
pub mod subscriptions;
pub mod token;
pub mod writeback;

use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;

/// Every handler's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(health::router())
        .merge(token::router())
        .merge(metadata::router())
        .merge(audit_events::router())
        .merge(profile::router())
        .merge(matching::router())
        .merge(resources::router())
        .merge(writeback::router())
        .merge(subscriptions::router())
}

/// Anything not routed: an unknown resource type or path.
pub async fn not_found(uri: axum::http::Uri) -> crate::error::ApiError {
    let path = uri.path();
    let what = match path.strip_prefix("/fhir/").and_then(|p| p.split('/').next()) {
        Some(t) if !t.is_empty() && crate::rest::ResourceType::ALL.iter().all(|rt| rt.name() != t) && !t.starts_with('$') => {
            format!("resource type '{t}' is not supported; see /fhir/metadata")
        }
        _ => "no such path; see /fhir/metadata and /openapi.json".to_owned(),
    };
    crate::error::ApiError::NotFound(what)
}

pub async fn method_not_allowed(method: axum::http::Method) -> crate::error::ApiError {
    crate::error::ApiError::MethodNotAllowed(format!("{method} is not supported here; see /fhir/metadata"))
}
