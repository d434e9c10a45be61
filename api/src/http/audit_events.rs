//! `GET /fhir/AuditEvent` and `GET /fhir/AuditEvent/{id}`: the audit trail, for operators
//! holding the `system/AuditEvent.read` scope (never granted by a wildcard).

use crate::auth::Caller;
use crate::auth::scope::{ADMIN_TYPE, Interaction};
use crate::error::{ApiError, OperationOutcome};
use crate::http::resources::{Bundle, FormatOnly, Resource};
use crate::rest;
use crate::routes as paths;
use crate::state::AppState;
use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhir::audit::audit_event;
use serde_json::{Value, json};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AuditSearch {
    /// The partner that made the request: its id (or `urn:fhir-event-platform:partner|<id>`).
    #[param(pattern = "^([^|,\\u0000-\\u001f\\u007f-\\u009f]*[|])?[A-Za-z0-9.-]{1,64}$")]
    pub agent: Option<String>,
    /// A member whose data was accessed or asked for: `<id>` or `Patient/<id>`.
    #[param(pattern = "^(Patient/)?[A-Za-z0-9.-]{1,64}$")]
    pub patient: Option<String>,
    /// The operation: `read`, `vread`, `history-instance`, `search-type`, `operation`, `token`,
    /// `match`, `write`.
    #[param(pattern = "^[^,\\u0000-\\u001f\\u007f-\\u009f]+$")]
    pub subtype: Option<String>,
    /// When it was recorded, with an optional prefix (`eq`, `gt`, `ge`, `lt`, `le`, `sa`, `eb`).
    /// May be repeated (AND).
    #[param(pattern = "^(eq|gt|ge|lt|le|sa|eb)?[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|1[0-9]|2[0-8]))?)?$")]
    pub date: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(rename = "_count", minimum = 1, maximum = 500)]
    pub count: Option<i64>,
    /// Opaque paging position; use the `next` link.
    #[param(rename = "_cursor", pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

fn operation_code(subtype: &str) -> Result<&'static str, ApiError> {
    Ok(match subtype.rsplit('|').next().unwrap_or_default() {
        "read" => "read",
        "vread" => "vread",
        "history-instance" => "history",
        "search-type" => "search",
        "operation" => "operation",
        "token" => "token",
        "match" => "match",
        "write" => "write",
        _ => return Err(ApiError::BadRequest("subtype: one of read, vread, history-instance, search-type, operation, token, match, write".into())),
    })
}

/// Search the audit trail (oldest first, keyset paging).
#[utoipa::path(get, path = paths::AUDIT_EVENTS, tag = "AuditEvent", operation_id = "searchAuditEvent",
    params(AuditSearch, FormatOnly),
    responses(
        (status = 200, description = "A searchset Bundle of AuditEvents", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown or malformed parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NoToken,
        (status = 403, description = "The token lacks system/AuditEvent.read", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::RateLimited),
    security(("smart_backend" = ["system/AuditEvent.read"])))]
pub async fn search(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[ADMIN_TYPE], Interaction::Search)?;
    let pairs = rest::query_pairs(&headers, q.as_deref())?;
    let mut criteria = db::audit::Criteria::default();
    let (mut count, mut cursor) = (rest::DEFAULT_COUNT, None);
    let mut link_params = Vec::new();
    for (name, value) in pairs {
        if value.is_empty() {
            return Err(ApiError::BadRequest(format!("parameter '{name}' has no value")));
        }
        if name != "_cursor" {
            link_params.push((name.clone(), value.clone()));
        }
        match name.as_str() {
            "agent" => {
                let id = value.strip_prefix(fhir::audit::PARTNER_SYSTEM).and_then(|v| v.strip_prefix('|')).unwrap_or(&value);
                criteria.partner_id = Some(rest::parse_id(id).map_err(|_| ApiError::BadRequest("agent must be a partner id".into()))?.to_owned());
            }
            "patient" => {
                let id = value.strip_prefix("Patient/").unwrap_or(&value);
                criteria.member_id =
                    Some(rest::parse_id(id).map_err(|_| ApiError::BadRequest("patient must be an id or Patient/<id>".into()))?.to_owned());
            }
            "subtype" => criteria.operation = Some(operation_code(&value)?.to_owned()),
            "date" => {
                let (lo, hi) = rest::parse_date_param("date", &value)?;
                if let Some(lo) = lo {
                    criteria.from = Some(criteria.from.map_or(lo, |f| f.max(lo)));
                }
                if let Some(hi) = hi {
                    criteria.to = Some(criteria.to.map_or(hi, |t| t.min(hi)));
                }
            }
            "_count" => {
                count = value
                    .parse()
                    .ok()
                    .filter(|c| (1..=rest::MAX_COUNT).contains(c))
                    .ok_or_else(|| ApiError::BadRequest(format!("_count must be an integer from 1 to {}", rest::MAX_COUNT)))?
            }
            "_cursor" => cursor = Some(value.parse::<i64>().map_err(|_| ApiError::BadRequest("_cursor is not valid".into()))?),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown search parameter '{other}' for AuditEvent; supported: agent, patient, subtype, date, _count, _format"
                )));
            }
        }
    }
    let (total, rows) = db::audit::search(&state.pool, &criteria, cursor, count).await?;
    let base = &state.base_url;
    let mut self_params = link_params.clone();
    if let Some(c) = cursor {
        self_params.push(("_cursor".into(), c.to_string()));
    }
    let mut links = vec![json!({ "relation": "self", "url": rest::link(base, "AuditEvent", &self_params) })];
    if rows.len() as i64 == count
        && let Some(last) = rows.last()
    {
        let mut params = link_params;
        params.push(("_cursor".into(), last.id.to_string()));
        links.push(json!({ "relation": "next", "url": rest::link(base, "AuditEvent", &params) }));
    }
    let entries: Vec<Value> = rows
        .iter()
        .map(|r| json!({ "fullUrl": format!("{base}/AuditEvent/{}", r.id), "resource": audit_event(r, base), "search": { "mode": "match" } }))
        .collect();
    let bundle = json!({ "resourceType": "Bundle", "type": "searchset", "total": total, "link": links, "entry": entries });
    Ok(rest::bundle_response(bundle.to_string()))
}

/// Read one AuditEvent.
#[utoipa::path(get, path = paths::AUDIT_EVENT, tag = "AuditEvent", operation_id = "readAuditEvent",
    params(("id" = String, Path, description = "Logical id", pattern = "^[A-Za-z0-9.-]{1,64}$"), FormatOnly),
    responses(
        (status = 200, description = "The AuditEvent", body = Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NoToken,
        (status = 403, description = "The token lacks system/AuditEvent.read", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 404, description = "Not known", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        crate::doc::RateLimited),
    security(("smart_backend" = ["system/AuditEvent.read"])))]
pub async fn read(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&[ADMIN_TYPE], Interaction::Read)?;
    rest::no_parameters(&rest::query_pairs(&headers, q.as_deref())?)?;
    let id = rest::parse_id(&id)?;
    let not_found = || ApiError::NotFound(format!("AuditEvent/{id} is not known"));
    let n: i64 = id.parse().map_err(|_| not_found())?;
    let row = db::audit::get(&state.pool, n).await?.ok_or_else(not_found)?;
    let body = audit_event(&row, &state.base_url);
    Ok(rest::versioned_response(&headers, 1, row.recorded_at, body.to_string()))
}

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search)).routes(routes!(read))
}
