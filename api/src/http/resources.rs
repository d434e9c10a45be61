//! read, vread, instance history and search for each served resource type. The handlers are
//! generated per type (so the OpenAPI document describes each path) and share the functions
//! below.

use crate::audit::with_members;
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::error::{ApiError, OperationOutcome};
use crate::rest::{self, ResourceType};
use crate::state::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Any FHIR resource (`application/fhir+json`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    #[schema(example = "Patient")]
    pub resource_type: String,
    pub id: Option<String>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[schema(example = "1")]
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    /// The system of record, `urn:sor:<source>`.
    pub source: Option<String>,
}

/// A FHIR `Bundle` (`searchset`, `history` or `collection`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    #[schema(example = "Bundle")]
    pub resource_type: String,
    #[schema(example = "searchset")]
    pub r#type: String,
    pub total: Option<i64>,
    pub link: Option<Vec<BundleLink>>,
    pub entry: Option<Vec<BundleEntry>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BundleLink {
    /// `self` or `next`.
    pub relation: String,
    pub url: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleEntry {
    pub full_url: Option<String>,
    pub resource: Option<Resource>,
}

/// Parameters every search accepts.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct CommonSearch {
    /// Last change, with an optional prefix: `eq`, `gt`, `ge`, `lt`, `le`, `sa`, `eb` and a date
    /// (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`) or an instant. May be repeated (AND).
    #[param(rename = "_lastUpdated", pattern = "^(eq|gt|ge|lt|le|sa|eb)?[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|1[0-9]|2[0-8]))?)?$")]
    pub last_updated: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(rename = "_count", minimum = 1, maximum = 500)]
    pub count: Option<i64>,
    /// Opaque paging position; use the `next` link.
    #[param(rename = "_cursor", pattern = "^[A-Za-z0-9.-]{1,64}$")]
    pub cursor: Option<String>,
    /// `json` (the only format served).
    #[param(rename = "_format", pattern = "^(json|application/json|application/fhir\\+json)$")]
    pub format: Option<String>,
}

/// `_format`, the only parameter of read, vread, history and operations.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct FormatOnly {
    /// `json` (the only format served).
    #[param(rename = "_format", pattern = "^(json|application/json|application/fhir\\+json)$")]
    pub format: Option<String>,
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PatientSearch {
    /// Logical id of the Patient (the member id).
    #[param(rename = "_id", pattern = "^[A-Za-z0-9.-]{1,64}$")]
    pub id: Option<String>,
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ClinicalSearch {
    /// The member: `<id>` or `Patient/<id>`.
    #[param(pattern = "^(Patient/)?[A-Za-z0-9.-]{1,64}$")]
    pub patient: Option<String>,
    /// `system|code` or `code` (RxNorm for medications, RxNorm or SNOMED CT for allergies, the
    /// system of record's task codes for Task).
    #[param(pattern = "^([^|,\\u0000-\\u001f\\u007f-\\u009f]*[|])?[^|,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub code: Option<String>,
    /// Status code of the resource.
    #[param(pattern = "^[^,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub status: Option<String>,
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct InsightSearch {
    /// The member: `<id>` or `Patient/<id>`.
    #[param(pattern = "^(Patient/)?[A-Za-z0-9.-]{1,64}$")]
    pub patient: Option<String>,
    /// `system|code` or `code`: `DRG` (drug interaction), `DUPTHPY` (duplicate therapy), `ALGY`
    /// (allergy alert) of v3 ActCode, or `refill-gap` of `urn:fhir-event-platform:insight-code`.
    #[param(pattern = "^([^|,\\u0000-\\u001f\\u007f-\\u009f]*[|])?[^|,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub code: Option<String>,
    /// `final` (holds) or `cancelled` (no longer holds).
    #[param(pattern = "^[^,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub status: Option<String>,
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ProvenanceSearch {
    /// The member whose partner-reported resources the Provenance is about: `<id>` or `Patient/<id>`.
    #[param(pattern = "^(Patient/)?[A-Za-z0-9.-]{1,64}$")]
    pub patient: Option<String>,
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AllergySearch {
    /// The member: `<id>` or `Patient/<id>`.
    #[param(pattern = "^(Patient/)?[A-Za-z0-9.-]{1,64}$")]
    pub patient: Option<String>,
    /// `system|code` or `code` (RxNorm or SNOMED CT).
    #[param(pattern = "^([^|,\\u0000-\\u001f\\u007f-\\u009f]*[|])?[^|,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub code: Option<String>,
    /// `active`, `inactive` or `resolved`.
    #[param(rename = "clinical-status", pattern = "^[^,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub clinical_status: Option<String>,
}

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ImmunizationSearch {
    /// The member: `<id>` or `Patient/<id>`.
    #[param(pattern = "^(Patient/)?[A-Za-z0-9.-]{1,64}$")]
    pub patient: Option<String>,
    /// `system|code` or `code` (CVX).
    #[param(rename = "vaccine-code", pattern = "^([^|,\\u0000-\\u001f\\u007f-\\u009f]*[|])?[^|,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub vaccine_code: Option<String>,
    /// `completed`, `entered-in-error` or `not-done`.
    #[param(pattern = "^[^,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub status: Option<String>,
}

pub async fn read(
    state: &AppState,
    caller: &Caller,
    rt: ResourceType,
    id: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    caller.require(&[rt.name()], Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(headers, query)?)?;
    let id = rest::parse_id(id)?;
    let v = db::resources::latest(&state.pool, caller.viewer(), rt.name(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{}/{id} is not known", rt.name())))?;
    let member = v.member_id.clone();
    Ok(with_members(rest::resource_response(headers, rt, v)?, vec![member]))
}

pub async fn vread(
    state: &AppState,
    caller: &Caller,
    rt: ResourceType,
    id: &str,
    vid: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    caller.require(&[rt.name()], Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(headers, query)?)?;
    let id = rest::parse_id(id)?;
    let vid = rest::parse_version(vid)?;
    let v = db::resources::version_of(&state.pool, caller.viewer(), rt.name(), id, vid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{}/{id} has no version {vid}", rt.name())))?;
    let member = v.member_id.clone();
    Ok(with_members(rest::resource_response(headers, rt, v)?, vec![member]))
}

pub async fn history(
    state: &AppState,
    caller: &Caller,
    rt: ResourceType,
    id: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    caller.require(&[rt.name()], Interaction::Read)?;
    let pairs = rest::query_pairs(headers, query)?;
    let mut count = rest::MAX_COUNT;
    for (k, v) in &pairs {
        match k.as_str() {
            "_count" => {
                count = v
                    .parse()
                    .ok()
                    .filter(|c| (1..=rest::MAX_COUNT).contains(c))
                    .ok_or_else(|| ApiError::BadRequest(format!("_count must be an integer from 1 to {}", rest::MAX_COUNT)))?
            }
            other => {
                return Err(ApiError::BadRequest(format!("unknown parameter '{other}' for _history; supported: _count, _format")));
            }
        }
    }
    let id = rest::parse_id(id)?;
    let (total, versions) = db::resources::history(&state.pool, caller.viewer(), rt.name(), id, count).await?;
    if total == 0 {
        return Err(ApiError::NotFound(format!("{}/{id} is not known", rt.name())));
    }
    let members = distinct_members(&versions);
    let base = &state.base_url;
    let self_url = rest::link(base, &format!("{}/{id}/_history", rt.name()), &pairs);
    Ok(with_members(rest::bundle_response(rest::history_bundle(base, rt, id, total, &versions, &self_url)), members))
}

pub async fn search(state: &AppState, caller: &Caller, rt: ResourceType, headers: &HeaderMap, query: Option<&str>) -> Result<Response, ApiError> {
    caller.require(&[rt.name()], Interaction::Search)?;
    let search = rest::parse_search(rt, rest::query_pairs(headers, query)?)?;
    let (total, page) =
        db::resources::search(&state.pool, caller.viewer(), rt.name(), &search.criteria, search.cursor.as_deref(), search.count).await?;
    let base = &state.base_url;
    let mut self_params = search.link_params.clone();
    if let Some(c) = &search.cursor {
        self_params.push(("_cursor".into(), c.clone()));
    }
    let self_url = rest::link(base, rt.name(), &self_params);
    let next = (page.len() as i64 == search.count).then(|| page.last()).flatten().map(|last| {
        let mut params = search.link_params.clone();
        params.push(("_cursor".into(), last.resource_id.clone()));
        rest::link(base, rt.name(), &params)
    });
    // The audit names the members in the page, and the one asked about even if none matched.
    let mut members = distinct_members(&page);
    let asked = if rt == ResourceType::Patient { &search.criteria.id } else { &search.criteria.member_id };
    if let Some(asked) = asked
        && !members.contains(asked)
    {
        members.push(asked.clone());
    }
    Ok(with_members(rest::bundle_response(rest::searchset(base, rt, total, &page, &self_url, next.as_deref())), members))
}

fn distinct_members(versions: &[db::resources::ResourceVersion]) -> Vec<String> {
    let mut members: Vec<String> = Vec::new();
    for v in versions {
        if !members.contains(&v.member_id) {
            members.push(v.member_id.clone());
        }
    }
    members
}

macro_rules! endpoints {
    ($module:ident, $rt:expr, $tag:literal, $search_params:ty) => {
        pub mod $module {
            use super::*;

            #[doc = concat!("Read the current version of a ", $tag, ".")]
            #[utoipa::path(get, path = concat!("/fhir/", $tag, "/{id}"), tag = $tag, operation_id = concat!("read", $tag),
                params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
                responses(
                    (status = 200, description = "The resource, with ETag and Last-Modified", body = Resource, content_type = "application/fhir+json"),
                    (status = 304, description = "Not modified (If-None-Match)"),
                    (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 404, description = "Not known", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NotAcceptable,
                    (status = 410, description = "Deleted", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NoToken,
                    crate::doc::OutOfScope,
                    crate::doc::RateLimited),
                security(("smart_backend" = [])))]
            pub async fn read(State(s): State<AppState>, Extension(caller): Extension<Caller>, Path(id): Path<String>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
                super::read(&s, &caller, $rt, &id, &headers, q.as_deref()).await
            }

            #[doc = concat!("Read one version of a ", $tag, ".")]
            #[utoipa::path(get, path = concat!("/fhir/", $tag, "/{id}/_history/{vid}"), tag = $tag, operation_id = concat!("vread", $tag),
                params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), ("vid" = String, Path, description = "Version id", pattern = "^[1-9][0-9]{0,17}$"), FormatOnly),
                responses(
                    (status = 200, description = "The version", body = Resource, content_type = "application/fhir+json"),
                    (status = 304, description = "Not modified (If-None-Match)"),
                    (status = 400, description = "Malformed id, version or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 404, description = "No such version", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NotAcceptable,
                    (status = 410, description = "This version is a deletion", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NoToken,
                    crate::doc::OutOfScope,
                    crate::doc::RateLimited),
                security(("smart_backend" = [])))]
            pub async fn vread(State(s): State<AppState>, Extension(caller): Extension<Caller>, Path((id, vid)): Path<(String, String)>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
                super::vread(&s, &caller, $rt, &id, &vid, &headers, q.as_deref()).await
            }

            #[doc = concat!("Every version of a ", $tag, ", newest first.")]
            #[utoipa::path(get, path = concat!("/fhir/", $tag, "/{id}/_history"), tag = $tag, operation_id = concat!("history", $tag),
                params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"),
                       ("_count" = Option<i64>, Query, description = "Most versions returned (1 to 500)", minimum = 1, maximum = 500), FormatOnly),
                responses(
                    (status = 200, description = "A history Bundle", body = Bundle, content_type = "application/fhir+json"),
                    (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 404, description = "Not known", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NotAcceptable,
                    crate::doc::NoToken,
                    crate::doc::OutOfScope,
                    crate::doc::RateLimited),
                security(("smart_backend" = [])))]
            pub async fn history(State(s): State<AppState>, Extension(caller): Extension<Caller>, Path(id): Path<String>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
                super::history(&s, &caller, $rt, &id, &headers, q.as_deref()).await
            }

            #[doc = concat!("Search current ", $tag, " resources (keyset paging in id order).")]
            #[utoipa::path(get, path = concat!("/fhir/", $tag), tag = $tag, operation_id = concat!("search", $tag),
                params($search_params, CommonSearch),
                responses(
                    (status = 200, description = "A searchset Bundle with total and self/next links", body = Bundle, content_type = "application/fhir+json"),
                    (status = 400, description = "Unknown or malformed parameter", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NotAcceptable,
                    crate::doc::NoToken,
                    crate::doc::OutOfScope,
                    crate::doc::RateLimited),
                security(("smart_backend" = [])))]
            pub async fn search(State(s): State<AppState>, Extension(caller): Extension<Caller>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
                super::search(&s, &caller, $rt, &headers, q.as_deref()).await
            }
        }
    };
}

endpoints!(patient, ResourceType::Patient, "Patient", PatientSearch);
endpoints!(medication_statement, ResourceType::MedicationStatement, "MedicationStatement", ClinicalSearch);
endpoints!(allergy_intolerance, ResourceType::AllergyIntolerance, "AllergyIntolerance", AllergySearch);
endpoints!(immunization, ResourceType::Immunization, "Immunization", ImmunizationSearch);
endpoints!(task, ResourceType::Task, "Task", ClinicalSearch);
endpoints!(provenance, ResourceType::Provenance, "Provenance", ProvenanceSearch);
endpoints!(detected_issue, ResourceType::DetectedIssue, "DetectedIssue", InsightSearch);

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(patient::read))
        .routes(routes!(patient::vread))
        .routes(routes!(patient::history))
        .routes(routes!(patient::search))
        .routes(routes!(medication_statement::read))
        .routes(routes!(medication_statement::vread))
        .routes(routes!(medication_statement::history))
        .routes(routes!(medication_statement::search))
        .routes(routes!(allergy_intolerance::read))
        .routes(routes!(allergy_intolerance::vread))
        .routes(routes!(allergy_intolerance::history))
        .routes(routes!(allergy_intolerance::search))
        .routes(routes!(immunization::read))
        .routes(routes!(immunization::vread))
        .routes(routes!(immunization::history))
        .routes(routes!(immunization::search))
        .routes(routes!(task::read))
        .routes(routes!(task::vread))
        .routes(routes!(task::history))
        .routes(routes!(task::search))
        .routes(routes!(provenance::read))
        .routes(routes!(provenance::vread))
        .routes(routes!(provenance::history))
        .routes(routes!(provenance::search))
        .routes(routes!(detected_issue::read))
        .routes(routes!(detected_issue::vread))
        .routes(routes!(detected_issue::history))
        .routes(routes!(detected_issue::search))
}
