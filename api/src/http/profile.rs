//! `GET /fhir/Patient/{id}/$medication-profile`: the member's composite medication profile.

use crate::audit::{self, Audited, with_members};
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::batch::{Batcher, Overlap};
use crate::error::{ApiError, OperationOutcome};
use crate::http::resources::{Bundle, FormatOnly};
use crate::rest;
use crate::startup::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use db::audit::AuditRecord;
use db::resources::{IfNoneMatch, ProfileRead, ServedRead};
use std::sync::Arc;
use std::time::Duration;

/// The resource types a medication profile holds: reading it needs read access to each.
pub(crate) const PROFILE_TYPES: [&str; 4] = ["Patient", "MedicationStatement", "AllergyIntolerance", "Immunization"];

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

/// A read as served and recorded: its status, and the profile unless 404.
#[derive(Debug, Clone)]
pub struct Served {
    pub status: StatusCode,
    pub profile: Option<ServedProfile>,
}

/// A medication profile as served: `body` is `None` when the member was deleted.
#[derive(Debug, Clone)]
pub struct ServedProfile {
    pub version_id: i64,
    pub last_updated: time::OffsetDateTime,
    pub body: Option<Bytes>,
}

/// Reads medication profiles in groups: the reads waiting at one moment, whoever the partners,
/// share one statement (see `crate::batch`). Every read asks PostgreSQL for the current version
/// and the attribution; the body of a version already served comes from memory, since a
/// version's body never changes (this spares the database most of a read's work and bytes).
#[derive(Debug, Clone)]
pub struct ProfileReads {
    reads: Batcher<ProfileRead, Result<ServedRead, ()>>,
    /// By member: the last version served and its body (`None`: no cache).
    bodies: Option<Arc<BodyCache>>,
}

type BodyCache = quick_cache::sync::Cache<String, (i64, Bytes), BodyWeight>;

/// A cached body weighs its bytes plus its key and bookkeeping.
#[derive(Debug, Clone)]
struct BodyWeight;

impl quick_cache::Weighter<String, (i64, Bytes)> for BodyWeight {
    fn weight(&self, member_id: &String, (_, body): &(i64, Bytes)) -> u64 {
        (member_id.len() + body.len() + 64) as u64
    }
}

/// Most reads served by one statement.
const GROUP: usize = 256;

impl ProfileReads {
    /// A reader per pool (each with one connection, so that the first reader's statements all
    /// go to one server process); a group starts while another's statement is in flight only
    /// once that has run for `overlap_after`. `cache_bytes`: memory for bodies already served
    /// (0: none).
    pub fn start(pools: Vec<db::Pool>, overlap_after: Duration, cache_bytes: u64) -> Self {
        let pools = Arc::new(pools);
        let reads = Batcher::start(pools.len(), GROUP, Overlap::After(overlap_after), move |reader, reads: Vec<ProfileRead>| {
            let pool = pools[reader].clone();
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
        // A profile is about 5 kB.
        let bodies = (cache_bytes > 0).then(|| Arc::new(BodyCache::with_weighter((cache_bytes / 5_000) as usize, cache_bytes, BodyWeight)));
        ProfileReads { reads, bodies }
    }

    /// Serves one read and records its access (with the status served) in the same statement.
    pub async fn read(&self, member_id: &str, partner_id: &str, if_none_match: Option<IfNoneMatch>, access: AuditRecord) -> Result<Served, ApiError> {
        let known = self.bodies.as_ref().and_then(|cache| cache.get(member_id));
        let read = ProfileRead {
            member_id: member_id.to_owned(),
            partner_id: partner_id.to_owned(),
            known_version: known.as_ref().map(|k| k.0),
            if_none_match,
            access,
        };
        let served = match self.reads.submit(read).await {
            Some(Ok(served)) => served,
            _ => return Err(ApiError::Unavailable("the database is not available; retry later".into())),
        };
        let status = StatusCode::from_u16(served.status as u16).map_err(|_| ApiError::Unavailable("the profile read gave no status".into()))?;
        let Some(profile) = served.profile else { return Ok(Served { status, profile: None }) };
        let (version_id, last_updated) = (profile.version_id, profile.last_updated);
        let body = match (profile.deleted, profile.body, known) {
            (true, _, _) => {
                if let Some(cache) = &self.bodies {
                    cache.remove(member_id);
                }
                None
            }
            (false, Some(body), _) => {
                let body = Bytes::from(body);
                if let Some(cache) = &self.bodies {
                    cache.insert(member_id.to_owned(), (version_id, body.clone()));
                }
                Some(body)
            }
            (false, None, Some((known_version, body))) if known_version == version_id => Some(body),
            (false, None, _) => {
                // Recorded as served; the guard records the 503 as well.
                tracing::error!(member_id, version_id, "the current medication profile has no stored body");
                return Err(ApiError::Unavailable("the medication profile could not be read; retry later".into()));
            }
        };
        Ok(Served { status, profile: Some(ServedProfile { version_id, last_updated, body }) })
    }
}
