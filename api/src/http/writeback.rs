//! Partner write-back: `POST` (with optional `If-None-Exist`) and `PUT` (with `If-Match`) of
//! MedicationStatement and AllergyIntolerance for members attributed to the partner. The
//! validation and the one transaction of a write are `fhir::writeback`'s; this module is
//! the HTTP around them.

use crate::audit::with_members;
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::error::{ApiError, OperationOutcome};
use crate::http::resources::Resource;
use crate::limits::RequestBody;
use crate::rest;
use crate::routes as paths;
use crate::state::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use fhir::writeback::{self as wb, Author, Effect, Mode, Writable, WriteError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) fn content_is_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    if content_type.starts_with("application/fhir+json") || content_type.starts_with("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType("the body must be a FHIR resource as application/fhir+json".into()))
    }
}

/// The body as a JSON value (400 when it is not JSON at all).
pub(crate) fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: line {}, column {}", e.line(), e.column())))
}

/// `If-None-Exist: identifier=<system>|<value>`, the one criterion supported, as the bare query
/// (the specification's examples), as `<Type>?…`, or as a URL on this server's base
/// (`<base>/<Type>?…`, what HAPI FHIR's client sends).
fn if_none_exist(headers: &HeaderMap, base_url: &str, type_name: &str) -> Result<Option<(String, String)>, ApiError> {
    let Some(raw) = headers.get("if-none-exist") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::BadRequest(format!(
            "If-None-Exist must be 'identifier=<system>|<value>' (the one criterion supported), or that query on this server's \
             URL for the type: '{base_url}/{type_name}?identifier=<system>|<value>'"
        ))
    };
    let raw = raw.to_str().map_err(|_| bad())?.trim();
    let query = match raw.split_once('?') {
        None => raw,
        Some((target, query)) => {
            let target = target.trim_end_matches('/');
            let on_this_server = target.strip_prefix(base_url).is_some_and(|rest| rest == format!("/{type_name}"));
            if !(target.is_empty() || target == type_name || on_this_server) {
                return Err(bad());
            }
            query
        }
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|_| bad())?;
    match pairs.as_slice() {
        [(name, value)] if name == "identifier" => match value.split_once('|') {
            Some((system, value)) if !system.is_empty() && !value.is_empty() && !value.contains('|') => {
                Ok(Some((system.to_owned(), value.to_owned())))
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// `If-Match: W/"<versionId>"` (or `"<versionId>"`): required on update.
fn if_match(headers: &HeaderMap) -> Result<i64, ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else {
        return Err(ApiError::PreconditionRequired("an update needs If-Match: W/\"<versionId>\" naming the version it replaces".into()));
    };
    raw.to_str()
        .ok()
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|v| rest::parse_version(v).ok())
        .ok_or_else(|| ApiError::BadRequest("If-Match must be W/\"<versionId>\"".into()))
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::UnknownMember(_) | WriteError::NotFound(_) => ApiError::NotFound(e.to_string()),
            WriteError::NotOwner(_) => ApiError::NotPermitted(e.to_string()),
            WriteError::VersionConflict { .. } => ApiError::PreconditionFailed(e.to_string()),
            WriteError::Invalid(i) => ApiError::Unprocessable { expression: i.expression, diagnostics: i.message },
            WriteError::CompositeTooLarge { .. } => ApiError::BusinessRule(e.to_string()),
            WriteError::Db(e) => ApiError::Database(e),
        }
    }
}

async fn write(
    state: &AppState,
    caller: &Caller,
    rt: Writable,
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
    update_id: Option<&str>,
) -> Result<Response, ApiError> {
    let interaction = if update_id.is_some() { Interaction::Update } else { Interaction::Create };
    caller.require(&[rt.name()], interaction)?;
    rest::no_parameters(&rest::query_pairs(headers, query)?)?;
    content_is_json(headers)?;
    let value = json_body(body)?;
    let mode = match update_id {
        Some(id) => {
            let id = rest::parse_id(id)?;
            match value.get("id").and_then(|v| v.as_str()) {
                Some(body_id) if body_id == id => {}
                _ => {
                    return Err(ApiError::BadRequest(format!("the resource's id must be '{id}', as in the URL")));
                }
            }
            Mode::Update { id: id.to_owned(), if_match: if_match(headers)? }
        }
        None => Mode::Create { if_none_exist: if_none_exist(headers, &state.base_url, rt.name())? },
    };
    let report = wb::validate(rt, value, time::OffsetDateTime::now_utc().date()).map_err(WriteError::from)?;
    if let Mode::Create { if_none_exist: Some(key) } = &mode
        && !report.identifiers.contains(key)
    {
        return Err(ApiError::BadRequest(format!("If-None-Exist names identifier {}|{}, which the resource does not carry", key.0, key.1)));
    }
    let member = report.member_id.clone();
    let partner = db::partners::get(&state.pool, &caller.partner_id).await?;
    let name = partner.as_ref().map_or(caller.partner_id.as_str(), |p| p.name.as_str());
    let author = Author { partner_id: &caller.partner_id, name, trace: crate::trace::of(headers) };
    let written = match wb::write(&state.pool, &state.composites, author, report, mode).await {
        Ok(w) => w,
        // A refused member is named in the audit like any other access attempt.
        Err(e) => {
            return Ok(with_members(axum::response::IntoResponse::into_response(ApiError::from(e)), vec![member]));
        }
    };
    let body = rest::with_meta(&written.body, written.version_id, written.last_updated);
    let status = if written.effect == Effect::Created { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = rest::versioned_response(&HeaderMap::new(), written.version_id, written.last_updated, body);
    *response.status_mut() = status;
    // The version written: Location for a create (and a matched If-None-Exist), Content-Location
    // for an update, where clients such as HAPI FHIR's read the new version's id.
    let location = format!("{}/{}/{}/_history/{}", state.base_url, rt.name(), written.id, written.version_id);
    let name = if written.effect == Effect::Updated { header::CONTENT_LOCATION } else { header::LOCATION };
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(name, v);
    }
    Ok(with_members(response, vec![written.member_id]))
}

macro_rules! write_endpoints {
    ($module:ident, $rt:expr, $tag:literal, create = $create:expr, update = $update:expr) => {
        pub mod $module {
            use super::*;

            #[doc = concat!("Report a ", $tag, " for an attributed member (partner write-back). With `If-None-Exist: identifier=<system>|<value>`, a retry creates nothing and returns the resource the identifier names.")]
            #[utoipa::path(post, path = $create, tag = $tag, operation_id = concat!("create", $tag),
                params(("If-None-Exist" = Option<String>, Header, description = "identifier=<system>|<value> (or that query on this server's URL for the type, <base>/<Type>?identifier=<system>|<value>): create only if this partner has no resource with that identifier"),
                       crate::http::resources::FormatOnly),
                request_body(content = Resource, content_type = "application/fhir+json", description = concat!("The ", $tag, " (at most REQUEST_BODY_MAX_BYTES, 64 KiB by default)")),
                responses(
                    (status = 201, description = "Created; Location names the new version", body = Resource, content_type = "application/fhir+json"),
                    (status = 200, description = "If-None-Exist matched: nothing was created; the matching resource", body = Resource, content_type = "application/fhir+json"),
                    (status = 400, description = "Not JSON, a malformed parameter or header", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 404, description = "The member is not known", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NotAcceptable,
                    (status = 408, description = "The body did not arrive in time", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::TooLarge,
                    crate::doc::NotFhirJson,
                    (status = 422, description = "Not an acceptable resource (expression names the element: a string over 4,096 characters, more than 100 entries, nesting over 16 deep, U+0000), or the member's medication profile would grow past COMPOSITE_MAX_BYTES (code business-rule)", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NoToken,
                    crate::doc::OutOfScope,
                    crate::doc::RateLimited),
                security(("smart_backend" = [])))]
            pub async fn create(State(s): State<AppState>, Extension(caller): Extension<Caller>, headers: HeaderMap, RawQuery(q): RawQuery, RequestBody(body): RequestBody) -> Result<Response, ApiError> {
                super::write(&s, &caller, $rt, &headers, q.as_deref(), &body, None).await
            }

            #[doc = concat!("Update a ", $tag, " this partner reported. `If-Match: W/\"<versionId>\"` is required; a stale version gets 412.")]
            #[utoipa::path(put, path = $update, tag = $tag, operation_id = concat!("update", $tag),
                params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"),
                       ("If-Match" = String, Header, description = "W/\"<versionId>\" of the version this one replaces"),
                       crate::http::resources::FormatOnly),
                request_body(content = Resource, content_type = "application/fhir+json", description = concat!("The ", $tag, ", with the id of the URL (at most REQUEST_BODY_MAX_BYTES, 64 KiB by default)")),
                responses(
                    (status = 200, description = "Updated; Content-Location names the new version", body = Resource, content_type = "application/fhir+json"),
                    (status = 400, description = "Not JSON, a malformed id, parameter or header, or an id that differs from the URL's", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 403, description = "The token's scopes do not cover this request, or another source reported the resource", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 404, description = "Not known", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NotAcceptable,
                    (status = 412, description = "If-Match does not name the current version", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 408, description = "The body did not arrive in time", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::TooLarge,
                    crate::doc::NotFhirJson,
                    (status = 422, description = "Not an acceptable resource (expression names the element: a string over 4,096 characters, more than 100 entries, nesting over 16 deep, U+0000), or the member's medication profile would grow past COMPOSITE_MAX_BYTES (code business-rule)", body = OperationOutcome, content_type = "application/fhir+json"),
                    (status = 428, description = "If-Match is missing", body = OperationOutcome, content_type = "application/fhir+json"),
                    crate::doc::NoToken,
                    crate::doc::RateLimited),
                security(("smart_backend" = [])))]
            pub async fn update(State(s): State<AppState>, Extension(caller): Extension<Caller>, Path(id): Path<String>, headers: HeaderMap, RawQuery(q): RawQuery, RequestBody(body): RequestBody) -> Result<Response, ApiError> {
                super::write(&s, &caller, $rt, &headers, q.as_deref(), &body, Some(&id)).await
            }
        }
    };
}

write_endpoints!(
    medication_statement,
    Writable::MedicationStatement,
    "MedicationStatement",
    create = paths::MEDICATION_STATEMENTS,
    update = paths::MEDICATION_STATEMENT
);
write_endpoints!(
    allergy_intolerance,
    Writable::AllergyIntolerance,
    "AllergyIntolerance",
    create = paths::ALLERGY_INTOLERANCES,
    update = paths::ALLERGY_INTOLERANCE
);

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(medication_statement::create))
        .routes(routes!(medication_statement::update))
        .routes(routes!(allergy_intolerance::create))
        .routes(routes!(allergy_intolerance::update))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "https://fhir.example.org/fhir";

    fn parse(value: &str) -> Result<Option<(String, String)>, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert("if-none-exist", HeaderValue::from_str(value).unwrap());
        if_none_exist(&headers, BASE, "MedicationStatement")
    }

    #[test]
    fn if_none_exist_takes_the_query_bare_relative_or_on_this_servers_url() {
        let key = Some(("urn:sys".to_owned(), "R-1".to_owned()));
        for form in [
            "identifier=urn:sys|R-1",
            "?identifier=urn:sys|R-1",
            "MedicationStatement?identifier=urn:sys|R-1",
            "https://fhir.example.org/fhir/MedicationStatement?identifier=urn%3Asys%7CR-1",
            "https://fhir.example.org/fhir/MedicationStatement/?identifier=urn:sys|R-1",
        ] {
            assert_eq!(parse(form).map_err(|e| e.to_string()), Ok(key.clone()), "{form}");
        }
        assert_eq!(if_none_exist(&HeaderMap::new(), BASE, "MedicationStatement").map_err(|e| e.to_string()), Ok(None));
    }

    #[test]
    fn if_none_exist_refuses_other_servers_types_and_criteria_naming_the_form() {
        for form in [
            "https://elsewhere.example.org/fhir/MedicationStatement?identifier=urn:sys|R-1",
            "https://fhir.example.org/fhir/AllergyIntolerance?identifier=urn:sys|R-1",
            "https://fhir.example.org/fhir/MedicationStatement/x?identifier=urn:sys|R-1",
            "https://fhir.example.org/fhirMedicationStatement?identifier=urn:sys|R-1",
            "AllergyIntolerance?identifier=urn:sys|R-1",
            "identifier=urn:sys|R-1&status=active",
            "patient=M1",
            "identifier=R-1",
            "identifier=|R-1",
        ] {
            let refused = parse(form).expect_err(form).to_string();
            assert!(refused.contains(&format!("'{BASE}/MedicationStatement?identifier=<system>|<value>'")), "{form}: {refused}");
        }
    }

    proptest! {
        /// Whatever the header holds, the parser answers (never panics), and an accepted key
        /// is exactly the system and value that were encoded.
        #[test]
        fn if_none_exist_never_panics_and_round_trips(raw in "[ -~]{0,80}", system in "[a-z:./]{1,20}", value in "[A-Za-z0-9-]{1,20}") {
            let _ = parse(&raw);
            let encoded = serde_urlencoded::to_string([("identifier", format!("{system}|{value}"))]).unwrap();
            for form in [encoded.clone(), format!("{BASE}/MedicationStatement?{encoded}")] {
                prop_assert_eq!(parse(&form).map_err(|e| e.to_string()), Ok(Some((system.clone(), value.clone()))));
            }
        }
    }
}
