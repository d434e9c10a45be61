//! `GET /fhir/metadata`: the CapabilityStatement, stating exactly what is supported.

use crate::error::ApiError;
use crate::fhir::{self, ResourceType};
use crate::http::resources::{FormatOnly, Resource};
use axum::extract::RawQuery;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

pub fn capability_statement(base_url: &str, token_url: &str) -> Value {
    let mut resources: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|rt| {
            let mut params: Vec<Value> = rt
                .search_params()
                .iter()
                .map(|(name, kind)| json!({ "name": name, "type": if *kind == "reference" { "reference" } else { "token" } }))
                .collect();
            params.push(json!({ "name": "_lastUpdated", "type": "date",
                "documentation": "Prefixes eq, gt, ge, lt, le, sa, eb; repeat to AND." }));
            let mut resource = json!({
                "type": rt.name(),
                "interaction": [{ "code": "read" }, { "code": "vread" }, { "code": "history-instance" }, { "code": "search-type" }],
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": false,
                "conditionalRead": "not-match",
                "searchParam": params,
            });
            if *rt == ResourceType::Patient {
                resource["operation"] = json!([{ "name": "medication-profile",
                    "definition": "urn:fhir-event-platform:OperationDefinition/Patient-medication-profile",
                    "documentation": "GET /Patient/{id}/$medication-profile: the member's composite (collection Bundle of Patient, MedicationStatement, AllergyIntolerance, Immunization). ETag W/\"versionId\"; If-None-Match gives 304." },
                    { "name": "hashed-match",
                    "definition": "urn:fhir-event-platform:OperationDefinition/Patient-hashed-match",
                    "documentation": "POST /Patient/$hashed-match with a Parameters resource (keyId, one to five PMM1 token values): on a match (exactly one member; T1 or two token types) a searchset Bundle of the member's open Tasks, whose 'for' is an opaque per-partner handle; every other outcome is the same 422. Needs Patient search and Task read scopes; rate limited separately; answers no sooner than a fixed floor." }]);
            }
            resource
        })
        .collect();
    resources.push(json!({
        "type": "AuditEvent",
        "documentation": "The audit trail of every access (operators only: needs the system/AuditEvent.read scope, which no wildcard grants). Also published on the audit.events.v1 topic.",
        "interaction": [{ "code": "read" }, { "code": "search-type" }],
        "versioning": "no-version",
        "searchParam": [
            { "name": "agent", "type": "reference", "documentation": "The partner id" },
            { "name": "patient", "type": "reference", "documentation": "A member whose data was accessed or asked for" },
            { "name": "subtype", "type": "token" },
            { "name": "date", "type": "date" },
        ],
    }));
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-27",
        "kind": "instance",
        "software": { "name": "fhir-event-platform", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "FHIR interoperability event platform", "url": base_url },
        "fhirVersion": "4.3.0",
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Read-only FHIR R4B over composites built from the plan's systems of record. Search results are paged by keyset (_count, then the next link); total is exact.",
            "security": {
                "cors": false,
                "service": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR" }] }],
                "description": "SMART Backend Services: POST the token endpoint with grant_type=client_credentials and a private_key_jwt client assertion (RS384 or ES384); send 'Authorization: Bearer <token>'. Scopes system/<Type|*>.read (or SMART v2 .rs). A partner sees only members attributed to it on the day of the request; any other member answers exactly as one that does not exist. Requests are rate limited per partner (429 with Retry-After) and audited.",
                "extension": [{ "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{ "url": "token", "valueUri": token_url }] }],
            },
            "resource": resources,
        }]
    })
}

/// The CapabilityStatement.
#[utoipa::path(get, path = "/fhir/metadata", tag = "conformance", operation_id = "capabilities",
    params(FormatOnly),
    responses(
        (status = 200, description = "CapabilityStatement", body = Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown parameter", body = crate::error::OperationOutcome, content_type = "application/fhir+json"),
        (status = 406, description = "Unacceptable media type", body = crate::error::OperationOutcome, content_type = "application/fhir+json")))]
pub async fn metadata(
    axum::extract::State(state): axum::extract::State<crate::startup::AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    fhir::no_parameters(&fhir::query_pairs(&headers, query.as_deref())?)?;
    Ok(fhir::bundle_response(capability_statement(&state.base_url, &state.auth.token_url).to_string()))
}
