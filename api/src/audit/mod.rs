//! The audit trail: every access to a protected route and every token request is recorded
//! (who, what, when, outcome) before its response leaves, in the append-only `audit_events`
//! table ([`writer`], in groups: one commit per group, not per request); [`relay`] then publishes
//! each event, as the FHIR `AuditEvent` [`event`] renders, on `audit.events.v1`. This module says
//! what goes on the record of a request.

pub mod relay;
pub mod writer;

use crate::rest;
use axum::http::{Method, StatusCode};
use db::audit::AuditRecord;

/// What a handler tells the guard about the access it served (as a response extension).
#[derive(Debug, Clone, Default)]
pub struct Audited {
    pub operation: Option<&'static str>,
    /// For the token endpoint: the registered client that asked.
    pub partner_id: Option<String>,
    /// The members whose data the response holds (or was asked for).
    pub member_ids: Vec<String>,
    /// For $hashed-match: the key id named and the decision (never the tokens).
    pub key_id: Option<String>,
    pub decision: Option<&'static str>,
}

impl Audited {
    pub fn operation(operation: &'static str) -> Self {
        Audited { operation: Some(operation), ..Audited::default() }
    }

    pub fn members(member_ids: Vec<String>) -> Self {
        Audited { member_ids, ..Audited::default() }
    }
}

/// Marks a response with the members it concerns.
pub fn with_members(mut response: axum::response::Response, member_ids: Vec<String>) -> axum::response::Response {
    response.extensions_mut().insert(Audited::members(member_ids));
    response
}

/// Marks a response whose access was already recorded, with this status, by the statement that
/// served its data (`$medication-profile`); the guard then records nothing more, unless the
/// response left with another status.
#[derive(Debug, Clone, Copy)]
pub struct Recorded(pub StatusCode);

pub fn recorded(mut response: axum::response::Response, status: StatusCode) -> axum::response::Response {
    response.extensions_mut().insert(Recorded(status));
    response
}

/// The operation, resource type and requested member of a request, from its method and path.
fn classify(method: &Method, path: &str) -> (&'static str, Option<String>, Option<String>) {
    if path == crate::routes::TOKEN {
        return ("token", None, None);
    }
    let segments: Vec<&str> = path.trim_start_matches("/fhir").split('/').filter(|s| !s.is_empty()).collect();
    let resource_type = segments.first().filter(|t| t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphabetic())).map(|t| (*t).to_owned());
    let write = matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let operation = match (segments.as_slice(), write) {
        ([_, op], true) if op.starts_with('$') => {
            if *op == "$hashed-match" {
                "match"
            } else {
                "operation"
            }
        }
        (_, true) => "write",
        ([_], false) => "search",
        ([_, _], false) => "read",
        ([_, _, "_history"], false) => "history",
        ([_, _, "_history", _], false) => "vread",
        ([_, _, op], false) if op.starts_with('$') => "operation",
        _ => "other",
    };
    let member = match segments.as_slice() {
        ["Patient", id, ..] if !id.starts_with('$') && rest::parse_id(id).is_ok() => Some((*id).to_owned()),
        _ => None,
    };
    (operation, resource_type, member)
}

/// The audit record of one request.
pub fn record_for(method: &Method, path: &str, partner_id: Option<String>, audited: Option<Audited>, status: StatusCode) -> AuditRecord {
    let (operation, resource_type, requested) = classify(method, path);
    let audited = audited.unwrap_or_default();
    let mut member_ids = audited.member_ids.clone();
    if let Some(m) = requested
        && !member_ids.contains(&m)
    {
        member_ids.insert(0, m);
    }
    let path: String = path.chars().take(512).collect();
    AuditRecord {
        partner_id,
        operation: audited.operation.unwrap_or(operation).to_owned(),
        resource_type,
        member_ids,
        method: method.as_str().to_owned(),
        path,
        status: status.as_u16() as i16,
        outcome: db::audit::outcome(status.as_u16()).to_owned(),
        key_id: audited.key_id,
        decision: audited.decision.map(str::to_owned),
    }
}

/// The audit record of a request whose caller did not prove who it is (no valid token, or a
/// token request refused before its signature was verified): no partner, no member, and the
/// route template instead of the path, which can name a member. What the caller claimed is
/// not evidence of anything.
pub fn anonymous_record_for(method: &Method, path: &str, route: Option<&str>, audited: Option<Audited>, status: StatusCode) -> AuditRecord {
    let (operation, resource_type, _) = classify(method, path);
    let path = match route {
        Some(template) => template.chars().take(512).collect(),
        None => "(no such route)".to_owned(),
    };
    AuditRecord {
        partner_id: None,
        operation: audited.and_then(|a| a.operation).unwrap_or(operation).to_owned(),
        resource_type,
        member_ids: Vec::new(),
        method: method.as_str().to_owned(),
        path,
        status: status.as_u16() as i16,
        outcome: db::audit::outcome(status.as_u16()).to_owned(),
        key_id: None,
        decision: None,
    }
}
