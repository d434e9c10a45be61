//! `POST /fhir/Patient/$hashed-match`: PMM1 hashed-identity matching (../shared/identity/PMM1.md).
//! A partner sends a key id and up to five tokens; on a match (exactly one member, and T1 or
//! at least two token types hit) it gets that member's open Tasks, under handles that reveal
//! neither the member id nor which token matched. Every other outcome is one and the same 422,
//! and no outcome answers before the latency floor.

use crate::audit::Audited;
use crate::auth::Caller;
use crate::auth::scope::Interaction;
use crate::error::{ApiError, OperationOutcome, fhir_json};
use crate::http::resources::Bundle;
use crate::limits::RequestBody;
use crate::matcher::Matcher;
use crate::routes as paths;
use crate::state::AppState;
use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub const HANDLE_SYSTEM: &str = "urn:fhir-event-platform:member-handle";
pub const MAX_TOKENS: usize = 5;

/// A FHIR `Parameters` resource: `keyId` (valueString) once, `token` (valueString, 64 hex
/// digits, as the PMM1 tokenizer prints them) one to five times.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchParameters {
    #[schema(example = "Parameters", pattern = "^Parameters$")]
    resource_type: String,
    /// `keyId` once and `token` one to five times.
    #[schema(min_items = 2, max_items = 6)]
    parameter: Vec<Parameter>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Parameter {
    /// `keyId` or `token`
    #[schema(example = "token", pattern = "^(keyId|token)$")]
    name: String,
    /// The key id, or a token (64 hexadecimal digits).
    #[schema(pattern = "^[A-Za-z0-9.-]{1,64}$")]
    value_string: String,
}

/// The one answer for every outcome but a match.
fn no_match() -> Response {
    const BODY: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found","diagnostics":"no single member matches these tokens"}]}"#;
    (StatusCode::UNPROCESSABLE_ENTITY, [(header::CONTENT_TYPE, fhir_json())], BODY).into_response()
}

/// Match a patient by PMM1 tokens; returns the member's open Tasks.
#[utoipa::path(post, path = paths::HASHED_MATCH, tag = "Patient", operation_id = "hashedMatch",
    request_body(content = MatchParameters, content_type = "application/fhir+json",
        description = "Parameters: keyId (valueString) and one to five token (valueString) from the PMM1 tokenizer"),
    responses(
        (status = 200, description = "A match: a searchset Bundle of the member's open Tasks, `for` an opaque handle", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Not a valid Parameters resource", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NoToken,
        (status = 403, description = "The token lacks Patient search and Task read", body = OperationOutcome, content_type = "application/fhir+json"),
        crate::doc::NotAcceptable,
        (status = 408, description = "The body did not arrive in time", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 413, description = "The body is over 16 KiB", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 415, description = "The body is not FHIR JSON", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 422, description = "No single member matches (the same answer for every reason)", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 429, description = "Match rate limit reached; see Retry-After", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 503, description = "Matching is not configured, or the database is unavailable", body = OperationOutcome, content_type = "application/fhir+json")),
    security(("smart_backend" = [])))]
pub async fn hashed_match(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Response {
    let mut audited = Audited::operation("match");
    let response = match &state.matcher {
        None => ApiError::Unavailable("hashed-identity matching is not configured on this server".into()).into_response(),
        Some(matcher) => {
            if let Err(retry_after) = state.auth.limiter.take(&format!("match:{}", caller.partner_id), matcher.limit).await {
                ApiError::TooManyRequests(retry_after).into_response()
            } else {
                let deadline = tokio::time::Instant::now() + matcher.floor;
                let result = decide(&state, matcher, &caller, &headers, &body, &mut audited).await;
                tokio::time::sleep_until(deadline).await;
                result.unwrap_or_else(IntoResponse::into_response)
            }
        }
    };
    let mut response = response;
    response.extensions_mut().insert(audited);
    response
}

async fn decide(
    state: &AppState,
    matcher: &Matcher,
    caller: &Caller,
    headers: &HeaderMap,
    body: &[u8],
    audited: &mut Audited,
) -> Result<Response, ApiError> {
    caller.require(&["Patient"], Interaction::Search)?;
    caller.require(&["Task"], Interaction::Read)?;
    crate::rest::negotiate(headers, None)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    if !(content_type.starts_with("application/fhir+json") || content_type.starts_with("application/json")) {
        return Err(ApiError::UnsupportedMediaType("the body must be a FHIR Parameters resource (application/fhir+json)".into()));
    }
    let (key_id, tokens) = parse(body)?;
    audited.key_id = Some(key_id.clone());

    let stored: Vec<Vec<u8>> = tokens.iter().map(|t| matcher.stored(t).to_vec()).collect();
    // The lookup runs whatever the key id, so every outcome does the same work.
    let hits = db::matching::lookup(&state.pool, &key_id, &stored).await?;
    let members: BTreeSet<&str> = hits.iter().map(|(_, m)| m.as_str()).collect();
    let types: BTreeSet<i16> = hits.iter().map(|(t, _)| *t).collect();
    let decision = if !caller.pmm1_key_ids.contains(&key_id) {
        "unknown-key"
    } else if members.is_empty() {
        "no-match"
    } else if members.len() > 1 {
        "ambiguous"
    } else if !(types.contains(&1) || types.len() >= 2) {
        "too-weak"
    } else {
        "match"
    };
    audited.decision = Some(decision);
    state.metrics.matched(decision);
    let Some(member) = members.first().filter(|_| decision == "match") else { return Ok(no_match()) };
    audited.member_ids = vec![(*member).to_owned()];

    let handle = matcher.handle("member", &caller.partner_id, member);
    let mut entries = Vec::new();
    for task in db::matching::open_tasks(&state.pool, member).await? {
        let task: Value = serde_json::from_str(&task).map_err(|_| ApiError::Unavailable("a stored Task is unreadable".into()))?;
        let id = matcher.handle("task", &caller.partner_id, task["id"].as_str().unwrap_or_default());
        let mut out = json!({ "resourceType": "Task", "id": id });
        // Only what says what should happen next; never identifiers (record ids name the member).
        for field in ["status", "intent", "priority", "code", "description", "restriction", "authoredOn", "lastModified"] {
            if !task[field].is_null() {
                out[field] = task[field].clone();
            }
        }
        if let Some(source) = task["meta"]["source"].as_str() {
            out["meta"] = json!({ "source": source });
        }
        out["for"] = json!({ "identifier": { "system": HANDLE_SYSTEM, "value": handle } });
        let full_url = format!("urn:uuid:{}-{}-{}-{}-{}", &id[..8], &id[8..12], &id[12..16], &id[16..20], &id[20..32]);
        entries.push(json!({ "fullUrl": full_url, "resource": out, "search": { "mode": "match" } }));
    }
    let bundle = json!({ "resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries });
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, fhir_json())], bundle.to_string()).into_response())
}

/// The key id and the tokens (as bytes) of a Parameters body.
fn parse(body: &[u8]) -> Result<(String, Vec<[u8; 32]>), ApiError> {
    let bad = |why: &str| ApiError::BadRequest(why.to_owned());
    let params: MatchParameters =
        serde_json::from_slice(body).map_err(|_| bad("the body must be a FHIR Parameters resource with keyId and token parameters"))?;
    if params.resource_type != "Parameters" {
        return Err(bad("resourceType must be Parameters"));
    }
    let mut key_id = None;
    let mut tokens = Vec::new();
    for p in &params.parameter {
        let value = p.value_string.as_str();
        match p.name.as_str() {
            "keyId" if key_id.is_none() => {
                key_id =
                    Some(crate::rest::parse_id(value).map_err(|_| bad("keyId must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '.'"))?.to_owned())
            }
            "keyId" => return Err(bad("keyId is given more than once")),
            "token" => tokens.push(token_bytes(value).ok_or_else(|| bad("a token is 64 hexadecimal digits"))?),
            _ => return Err(bad("the parameters are keyId (once) and token (one to five times)")),
        }
    }
    let key_id = key_id.ok_or_else(|| bad("keyId is required"))?;
    if tokens.is_empty() || tokens.len() > MAX_TOKENS {
        return Err(bad("give one to five token parameters"));
    }
    Ok((key_id, tokens))
}

fn token_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// This module's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(hashed_match))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked() {
        let token = "ab".repeat(32);
        let ok = json!({ "resourceType": "Parameters", "parameter": [{ "name": "keyId", "valueString": "k1" }, { "name": "token", "valueString": token }] });
        assert_eq!(parse(ok.to_string().as_bytes()).map(|(k, t)| (k, t.len())).ok(), Some(("k1".to_owned(), 1)));
        for bad in [
            json!({ "resourceType": "Bundle", "parameter": [] }),
            json!({ "resourceType": "Parameters", "parameter": [{ "name": "token", "valueString": token }] }),
            json!({ "resourceType": "Parameters", "parameter": [{ "name": "keyId", "valueString": "k1" }] }),
            json!({ "resourceType": "Parameters", "parameter": [{ "name": "keyId", "valueString": "k1" }, { "name": "token", "valueString": "xyz" }] }),
            json!({ "resourceType": "Parameters", "parameter": [{ "name": "keyId", "valueString": "k1" }, { "name": "given", "valueString": "Ann" }] }),
            json!({ "resourceType": "Parameters", "parameter": (0..6).map(|_| json!({ "name": "token", "valueString": token })).chain([json!({ "name": "keyId", "valueString": "k" })]).collect::<Vec<_>>() }),
        ] {
            assert!(parse(bad.to_string().as_bytes()).is_err(), "{bad}");
        }
    }
}
