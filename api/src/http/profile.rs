//! `GET /fhir/Patient/{id}/$medication-profile`: the member's composite medication profile.

use crate::audit::{self, Audited, with_members};
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::error::{ApiError, OperationOutcome};
use crate::http::resources::{Bundle, FormatOnly};
use crate::profile_reads::ServedProfile;
use crate::rest;
use crate::routes as paths;
use crate::state::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The resource types a medication profile holds: reading it needs read access to each.
pub(crate) const PROFILE_TYPES: [&str; 4] = ["Patient", "MedicationStatement", "AllergyIntolerance", "Immunization"];

/// The member's medication profile: a `collection` Bundle with the Patient and every current
/// MedicationStatement, AllergyIntolerance and Immunization. `ETag: W/"<versionId>"`;
/// `If-None-Match` with the current ETag gives 304.
#[utoipa::path(get, path = paths::MEDICATION_PROFILE, tag = "Patient", operation_id = "medicationProfile",
    params(("id" = String, Path, description = "The member id (the Patient's logical id)", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 200, description = "The composite, with ETag and Last-Modified", body = Bundle, content_type = "application/fhir+json"),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "No such member", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        (status = 410, description = "The member was deleted", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NoToken,
        (status = 403, description = "The token's scopes do not cover Patient, MedicationStatement, AllergyIntolerance and Immunization reads", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::RateLimited),
    security(("smart_backend" = [])))]
pub async fn medication_profile(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&PROFILE_TYPES, Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(&headers, query.as_deref())?)?;
    let id = rest::parse_id(&id)?;
    // Recorded with the status the statement decides, by the statement that reads the profile.
    let access = audit::record_for(&method, uri.path(), Some(caller.partner_id.clone()), Some(Audited::members(vec![id.to_owned()])), StatusCode::OK);
    let served = state.profiles.read(id, &caller.partner_id, rest::if_none_match(&headers), access).await?;
    let status = served.status;
    let response = match served.profile {
        None => ApiError::NotFound(format!("no medication profile for Patient/{id}")).into_response(),
        Some(ServedProfile { version_id, body: None, .. }) => {
            ApiError::Gone(format!("Patient/{id} was deleted (profile version {version_id})")).into_response()
        }
        Some(ServedProfile { version_id, last_updated, body: Some(body) }) => {
            rest::version_response(status == StatusCode::NOT_MODIFIED, version_id, last_updated, body)
        }
    };
    Ok(audit::recorded(with_members(response, vec![id.to_owned()]), status))
}

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(medication_profile))
}
