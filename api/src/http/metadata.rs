//! `GET /fhir/metadata`: the CapabilityStatement, stating exactly what is supported.

use crate::error::ApiError;
use crate::http::resources::{FormatOnly, Resource};
use crate::rest::{self, ResourceType};
use crate::routes as paths;
use axum::extract::RawQuery;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// How partner write-back works and how reports show in the medication profile.
const WRITE_BACK: &str = "Partner write-back (scope system/{Type}.write), for attributed members only: POST creates (If-None-Exist: identifier={system}|{value} makes retries create nothing; the resource must carry that identifier); PUT updates the partner's own reports and requires If-Match: W/\"{versionId}\" (412 when stale, 428 when missing). The subject/patient must be Patient/{member id} of an attributed member (otherwise 404, as for a member that does not exist); medications are coded with RxNorm, allergies with RxNorm or SNOMED CT; dates lie between 1900 and tomorrow. A refused resource gets 422 with the element in OperationOutcome.issue.expression, and nothing is stored. Each accepted write is stored with meta.source urn:partner:{id}, a Provenance, the member's new $medication-profile version and a partner.inbound.v1 message, all in one transaction. In $medication-profile, one entry per code: a system of record's record (an active one first) is the entry, and each partner report of that code is shown on it as extension urn:fhir-event-platform:extension:partner-report (assessment confirmed when the statuses agree, contradicted when they differ and the system of record has not changed since the report; partner; reported; status; report). When the system of record changes after a contradicting report, the report is superseded and leaves the entry (it stays readable). A code only partners reported is listed as the oldest report, with the others on it. Other records of the systems of record with the same code are named by urn:fhir-event-platform:extension:same-code-record.";

pub fn capability_statement(base_url: &str, token_url: &str, limits: &str) -> Value {
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
            if matches!(rt, ResourceType::MedicationStatement | ResourceType::AllergyIntolerance) {
                resource["interaction"].as_array_mut().into_iter().for_each(|i| i.extend([json!({ "code": "create" }), json!({ "code": "update" })]));
                resource["versioning"] = json!("versioned-update");
                resource["conditionalCreate"] = json!(true);
                resource["conditionalUpdate"] = json!(false);
                resource["documentation"] = json!(WRITE_BACK);
            }
            if *rt == ResourceType::Provenance {
                resource["documentation"] = json!("One per accepted partner write: target is the version written, agent.who the partner (identifier system urn:fhir-event-platform:partner-id), activity CREATE or UPDATE.");
            }
            if *rt == ResourceType::DetectedIssue {
                resource["documentation"] = json!("Insights derived from each member's medication profile with the knowledge base named on each (extension urn:fhir-event-platform:extension:knowledge-base-version): code DRG (drug interaction), DUPTHPY (duplicate therapy) or ALGY (allergy alert) of v3 ActCode, or refill-gap of urn:fhir-event-platform:insight-code; severity; implicated the statements and allergies involved. status final while it holds; one that stops holding gets a new version with status cancelled and is kept. The same finding on the same member keeps its id. Open insights are also entries of $medication-profile; every insight of a member is on fhir.insights.v1.");
            }
            if *rt == ResourceType::Patient {
                resource["operation"] = json!([{ "name": "medication-profile",
                    "definition": "urn:fhir-event-platform:OperationDefinition/Patient-medication-profile",
                    "documentation": "GET /Patient/{id}/$medication-profile: the member's composite (collection Bundle of Patient, MedicationStatement, AllergyIntolerance, Immunization, and the open DetectedIssues). ETag W/\"versionId\"; If-None-Match gives 304." },
                    { "name": "hashed-match",
                    "definition": "urn:fhir-event-platform:OperationDefinition/Patient-hashed-match",
                    "documentation": "POST /Patient/$hashed-match with a Parameters resource (keyId, one to five PMM1 token values): on a match (exactly one member; T1 or two token types) a searchset Bundle of the member's open Tasks, whose 'for' is an opaque per-partner handle; every other outcome is the same 422. Needs Patient search and Task read scopes; rate limited separately; answers no sooner than a fixed floor." }]);
            }
            resource
        })
        .collect();
    resources.push(json!({
        "type": "Subscription",
        "supportedProfile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"],
        "documentation": "Topic-based subscriptions (Subscriptions R5 Backport) to the topic in SubscriptionTopic. A partner manages its own (scope system/Subscription.read and .write); notifications carry only members attributed to it. criteria: the topic's canonical URL; filter (backport-filter-criteria): patient=Patient/{id}; channel rest-hook (HTTPS, with the extension urn:fhir-event-platform:extension:signing-secret: each notification is signed in the X-Fhir-Event-Signature header, t={unix},v1=<hex HMAC-SHA256(secret, \"{t}.{body}\")>) or kafka (backport-channel-type urn:fhir-event-platform:subscription-channel-type#kafka: Bundles on fhir.partner.{partner}.subscription-notifications.v1, key the subscription id); payload content empty, id-only (default) or full-resource; heartbeat period, timeout and max count per the Backport. Each subscription has its own queue: failures are retried with exponential backoff and jitter, in order, for 24 hours by default, then the status is error and the queue is kept for $events.",
        "interaction": [{ "code": "create" }, { "code": "read" }, { "code": "delete" }, { "code": "search-type" }],
        "versioning": "no-version",
        "searchParam": [{ "name": "status", "type": "token" }],
        "operation": [
            { "name": "status", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status" },
            { "name": "events", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events" }
        ],
    }));
    resources.push(json!({
        "type": "SubscriptionTopic",
        "documentation": format!("Two topics: {} (a member's $medication-profile has a new version; filter: patient) and {} (a DetectedIssue about a member appeared, changed or stopped holding; filters: patient, severity, code).", fhir::subscriptions::TOPIC_URL, fhir::subscriptions::INSIGHTS_TOPIC_URL),
        "interaction": [{ "code": "read" }, { "code": "search-type" }],
        "versioning": "no-version",
    }));
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
        "instantiates": ["http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/backport-subscription-server-r4b"],
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": format!("FHIR R4B over composites built from the plan's systems of record, with partner write-back of MedicationStatement and AllergyIntolerance. Search results are paged by keyset (_count, then the next link); total is exact. Limits: {limits}"),
            "security": {
                "cors": false,
                "service": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR" }] }],
                "description": format!("SMART Backend Services (discovery: {base_url}/.well-known/smart-configuration): POST {token_url} with grant_type=client_credentials and a private_key_jwt client assertion (RS384 or ES384); send 'Authorization: Bearer {{token}}'. Scopes system/{{Type|*}}.read (or SMART v2 .rs), and system/{{Type}}.write (or .cu) for write-back. A partner sees only members attributed to it on the day of the request; any other member answers exactly as one that does not exist. Requests are rate limited per partner (429 with Retry-After) and audited."),
            },
            "resource": resources,
        }]
    })
}

/// The CapabilityStatement.
#[utoipa::path(get, path = paths::METADATA, tag = "conformance", operation_id = "capabilities",
    params(FormatOnly),
    responses(
        (status = 200, description = "CapabilityStatement", body = Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown parameter", body = crate::error::OperationOutcome, content_type = "application/fhir+json"),
        (status = 406, description = "Unacceptable media type", body = crate::error::OperationOutcome, content_type = "application/fhir+json")))]
pub async fn metadata(
    axum::extract::State(state): axum::extract::State<crate::state::AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    rest::no_parameters(&rest::query_pairs(&headers, query.as_deref())?)?;
    Ok(rest::bundle_response(capability_statement(&state.base_url, &state.auth.token_url, &state.limits_text).to_string()))
}

/// This module's routes.
pub fn router() -> OpenApiRouter<crate::state::AppState> {
    OpenApiRouter::new().routes(routes!(metadata))
}
