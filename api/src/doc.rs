//! The OpenAPI document's frame: its title, tags and security scheme. The operations come from
//! the handlers' annotations (`http::router`); `startup::openapi` puts the two together.

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "FHIR interoperability event platform", description = "FHIR R4B REST API over the composites the platform builds from the plan's systems of record. Besides the answers listed per operation, any request may get 408 (its headers, body or whole request took too long), 429 (its client address sent too many requests without a valid token), 500 (an unexpected failure, recorded) or 503 (a dependency is unavailable), each with an OperationOutcome; GET /fhir/metadata states the limits this deployment sets."),
    tags(
        (name = "operations", description = "Liveness and readiness"),
        (name = "conformance", description = "What this FHIR server supports"),
        (name = "Patient", description = "Members, and their composite medication profile"),
        (name = "MedicationStatement"), (name = "AllergyIntolerance"), (name = "Immunization"),
        (name = "Task", description = "Care gaps and next actions"),
        (name = "Provenance", description = "Who wrote each version of a partner's report"),
        (name = "DetectedIssue", description = "Insights derived from each medication profile: drug interactions, duplicate therapy, allergy alerts, refill gaps"),
        (name = "Subscription", description = "Topic-based subscriptions (R4B + Subscriptions Backport) to medication-profile changes"),
        (name = "AuditEvent", description = "The audit trail, for operators (system/AuditEvent.read)"),
        (name = "authorization", description = "SMART Backend Services: discovery and the token endpoint")
    ),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// The bearer tokens of SMART Backend Services (client credentials with a signed assertion).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ClientCredentials, Flow, OAuth2, Scopes, SecurityScheme};
        let scopes = Scopes::from_iter([
            ("system/*.read", "Read every clinical resource type of attributed members"),
            ("system/Patient.read", "Read Patients (and, with the other three types, $medication-profile)"),
            ("system/MedicationStatement.read", "Read MedicationStatements"),
            ("system/AllergyIntolerance.read", "Read AllergyIntolerances"),
            ("system/Immunization.read", "Read Immunizations"),
            ("system/Task.read", "Read Tasks"),
            ("system/Provenance.read", "Read the Provenance of partners' reports"),
            ("system/DetectedIssue.read", "Read insights (DetectedIssues) about attributed members"),
            ("system/MedicationStatement.write", "Report and update MedicationStatements for attributed members (write-back)"),
            ("system/AllergyIntolerance.write", "Report and update AllergyIntolerances for attributed members (write-back)"),
            ("system/Subscription.write", "Create and delete the partner's Subscriptions (read with system/Subscription.read)"),
            ("system/AuditEvent.read", "Operators: read the audit trail (never granted by a wildcard)"),
        ]);
        let flow = Flow::ClientCredentials(ClientCredentials::new(crate::routes::TOKEN, scopes));
        let mut scheme = OAuth2::with_description(
            [flow],
            "SMART Backend Services: POST /auth/token with grant_type=client_credentials and a private_key_jwt client assertion (RS384 or ES384); send the token as 'Authorization: Bearer <token>'.",
        );
        scheme.extensions = None;
        openapi.components.get_or_insert_with(Default::default).add_security_scheme("smart_backend", SecurityScheme::OAuth2(scheme));
    }
}

/// An OperationOutcome answer, as every refusal of the API is.
fn outcome(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::{Content, Ref, Response};
    let mut response = Response::new(description);
    response.content.insert("application/fhir+json".to_owned(), Content::new(Some(Ref::from_schema_name("OperationOutcome"))).into());
    response.into()
}

/// Declares a refusal shared by many operations: listed in an operation's `responses(...)` by
/// its name, described once here.
macro_rules! refusal {
    ($(#[$doc:meta])* $name:ident, $status:literal, $description:literal) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::Response>> {
                std::collections::BTreeMap::from([($status.to_owned(), outcome($description))])
            }
        }
    };
}

refusal!(
    /// 401: no token, or one that is unknown, expired or revoked.
    NoToken, "401", "No valid bearer token"
);
refusal!(
    /// 403: a valid token whose scopes do not reach the operation.
    OutOfScope, "403", "The token's scopes do not cover this request"
);
refusal!(
    /// 406: the client accepts no media type the API serves.
    NotAcceptable, "406", "Unacceptable media type"
);
refusal!(
    /// 413: a request body over the configured limit.
    TooLarge, "413", "The body is larger than REQUEST_BODY_MAX_BYTES (64 KiB by default)"
);
refusal!(
    /// 415: a request body that is not FHIR JSON.
    NotFhirJson, "415", "The body is not application/fhir+json"
);
refusal!(
    /// 429: the partner's request rate is spent.
    RateLimited, "429", "Rate limit reached; see Retry-After"
);
