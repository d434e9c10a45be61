//! Every route's path, in one place (the handlers' OpenAPI annotations and the guard use these).
//! The FHIR resource types' read, vread, history and search routes follow one pattern, written
//! in `http::resources`: `/fhir/{Type}/{id}`, `/fhir/{Type}/{id}/_history/{vid}`,
//! `/fhir/{Type}/{id}/_history` and `/fhir/{Type}`.

/// Liveness.
pub const HEALTH: &str = "/health";
/// Readiness: PostgreSQL and Kafka answer.
pub const READY: &str = "/ready";

/// SMART Backend Services discovery, at the root and under the FHIR base.
pub const SMART_CONFIGURATION: &str = "/.well-known/smart-configuration";
pub const SMART_CONFIGURATION_FHIR: &str = "/fhir/.well-known/smart-configuration";
/// The token endpoint.
pub const TOKEN: &str = "/auth/token";

/// The FHIR base; every route under it needs a token but `METADATA` and the SMART discovery.
pub const FHIR: &str = "/fhir";
pub const METADATA: &str = "/fhir/metadata";

pub const MEDICATION_PROFILE: &str = "/fhir/Patient/{id}/$medication-profile";
pub const HASHED_MATCH: &str = "/fhir/Patient/$hashed-match";

pub const AUDIT_EVENTS: &str = "/fhir/AuditEvent";
pub const AUDIT_EVENT: &str = "/fhir/AuditEvent/{id}";

pub const SUBSCRIPTION_TOPICS: &str = "/fhir/SubscriptionTopic";
pub const SUBSCRIPTION_TOPIC: &str = "/fhir/SubscriptionTopic/{id}";
pub const SUBSCRIPTIONS: &str = "/fhir/Subscription";
pub const SUBSCRIPTION: &str = "/fhir/Subscription/{id}";
pub const SUBSCRIPTION_STATUS: &str = "/fhir/Subscription/{id}/$status";
pub const SUBSCRIPTION_EVENTS: &str = "/fhir/Subscription/{id}/$events";

/// Write-back: create and update, for the two types partners may write.
pub const MEDICATION_STATEMENTS: &str = "/fhir/MedicationStatement";
pub const MEDICATION_STATEMENT: &str = "/fhir/MedicationStatement/{id}";
pub const ALLERGY_INTOLERANCES: &str = "/fhir/AllergyIntolerance";
pub const ALLERGY_INTOLERANCE: &str = "/fhir/AllergyIntolerance/{id}";

/// Whether `path` needs a bearer token: everything under the FHIR base but the conformance and
/// discovery documents.
pub fn is_protected(path: &str) -> bool {
    (path == FHIR || path.starts_with("/fhir/")) && path != METADATA && path != SMART_CONFIGURATION_FHIR
}
