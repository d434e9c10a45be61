//! The platform's FHIR R4B content, and the only crate that compiles fhir-sdk (its serde code
//! is compiled again in every crate that deserializes FHIR types: keep that here, behind plain
//! functions).
//!
//! - [`mapping`]: a validated system-of-record record becomes a FHIR resource.
//! - [`composite`]: the composites (a trait; the medication profile is one implementation),
//!   how they assemble from a member's components, and [`composite::rebuild`], which the
//!   composer's batches and partner write-back both run inside their transactions.
//! - [`writeback`]: a partner's MedicationStatement or AllergyIntolerance, validated and
//!   written in one transaction.
//! - [`subscriptions`]: the SubscriptionTopic, what a partner's Subscription may ask for, and
//!   the notification Bundles.
//! - [`audit`]: an audit record as an `AuditEvent` (the API serves and relays them; retention
//!   exports them).
//!
//! It reads and writes PostgreSQL through `db` only; it never talks to Kafka or HTTP.

pub mod audit;
pub mod composite;
pub mod mapping;
pub mod subscriptions;
pub mod writeback;

/// The composites this deployment builds (the composer's, and the API's for write-back).
pub fn composites(common: &platform::CommonConfig) -> Vec<Box<dyn composite::Composite>> {
    let base_url = common.fhir_base_url.trim_end_matches('/').to_owned();
    vec![Box::new(composite::MedicationProfile { base_url, max_bytes: common.composite_max_bytes })]
}
