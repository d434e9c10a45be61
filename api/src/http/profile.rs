//! `GET /fhir/Patient/{id}/$medication-profile`: the member's composite medication profile.

use crate::audit::with_members;
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::batch::Batcher;
use crate::error::{ApiError, OperationOutcome};
use crate::fhir;
use crate::http::resources::{Bundle, FormatOnly};
use crate::startup::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use db::resources::Profile;

/// The resource types a medication profile holds: reading it needs read access to each.
const PROFILE_TYPES: [&str; 4] = ["Patient", "MedicationStatement", "AllergyIntolerance", "Immunization"];

/// The member's medication profile: a `collection` Bundle with the Patient and every current
/// MedicationStatement, AllergyIntolerance and Immunization. `ETag: W/"<versionId>"`;
/// `If-None-Match` with the current ETag gives 304.
#[utoipa::path(get, path = "/fhir/Patient/{id}/$medication-profile", tag = "Patient", operation_id = "medicationProfile",
    params(("id" = String, Path, description = "The member id (the Patient's logical id)", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 200, description = "The composite, with ETag and Last-Modified", body = Bundle, content_type = "application/fhir+json"),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "No such member", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 406, description = "Unacceptable media type", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 410, description = "The member was deleted", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 401, description = "No valid bearer token", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 403, description = "The token's scopes do not cover Patient, MedicationStatement, AllergyIntolerance and Immunization reads", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 429, description = "Rate limit reached; see Retry-After", body = OperationOutcome, content_type = "application/fhir+json")),
    security(("smart_backend" = [])))]
pub async fn medication_profile(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&PROFILE_TYPES, Interaction::Read)?;
    fhir::no_parameters(&fhir::query_pairs(&headers, query.as_deref())?)?;
    let id = fhir::parse_id(&id)?;
    let profile =
        state.profiles.read(id, &caller.partner_id).await?.ok_or_else(|| ApiError::NotFound(format!("no medication profile for Patient/{id}")))?;
    let body = profile.body.ok_or_else(|| ApiError::Gone(format!("Patient/{id} was deleted (profile version {})", profile.version_id)))?;
    Ok(with_members(fhir::versioned_response(&headers, profile.version_id, profile.last_updated, body), vec![id.to_owned()]))
}

/// Reads medication profiles in groups: the reads waiting at one moment, whoever the partners,
/// share one statement (see `crate::batch`).
#[derive(Debug, Clone)]
pub struct ProfileReads {
    reads: Batcher<(String, String), Result<Option<Profile>, ()>>,
}

/// Most reads served by one statement.
const GROUP: usize = 256;

impl ProfileReads {
    pub fn start(pool: db::Pool, workers: usize) -> Self {
        let reads = Batcher::start(workers, GROUP, move |reads: Vec<(String, String)>| {
            let pool = pool.clone();
            async move {
                // Attribution is by calendar day, UTC, as for every read.
                let on = time::OffsetDateTime::now_utc().date();
                match db::resources::medication_profiles(&pool, on, &reads).await {
                    Ok(profiles) => profiles.into_iter().map(Ok).collect(),
                    Err(e) => {
                        tracing::error!(error = %e, reads = reads.len(), "medication profiles could not be read");
                        vec![Err(()); reads.len()]
                    }
                }
            }
        });
        ProfileReads { reads }
    }

    /// The member's profile if it is attributed to the partner today.
    pub async fn read(&self, member_id: &str, partner_id: &str) -> Result<Option<Profile>, ApiError> {
        match self.reads.submit((member_id.to_owned(), partner_id.to_owned())).await {
            Some(Ok(profile)) => Ok(profile),
            _ => Err(ApiError::Unavailable("the database is not available; retry later".into())),
        }
    }
}
