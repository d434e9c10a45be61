//! `GET /fhir/metadata`: the CapabilityStatement, stating exactly what is supported.

use crate::error::ApiError;
use crate::fhir::{self, ResourceType};
use crate::http::resources::{FormatOnly, Resource};
use axum::extract::RawQuery;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

pub fn capability_statement(base_url: &str) -> Value {
    let resources: Vec<Value> = ResourceType::ALL
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
                    "documentation": "GET /Patient/{id}/$medication-profile: the member's composite (collection Bundle of Patient, MedicationStatement, AllergyIntolerance, Immunization). ETag W/\"versionId\"; If-None-Match gives 304." }]);
            }
            resource
        })
        .collect();
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
    Ok(fhir::bundle_response(capability_statement(&state.base_url).to_string()))
}
