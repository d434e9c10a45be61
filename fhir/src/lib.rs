//! The platform's FHIR R4B content, and the only crate that compiles fhir-sdk (its serde code
//! is compiled again in every crate that deserializes FHIR types: keep that here, behind plain
//! functions).
//!
//! - [`mapping`]: a validated system-of-record record becomes a FHIR resource.
//! - [`composite`]: the composites (a trait; the medication profile is one implementation),
//!   how they assemble from a member's components, and [`composite::rebuild`], which the
//!   composer's batches and partner write-back both run inside their transactions.
//! - [`insights`]: DetectedIssues derived from each medication profile with a knowledge base
//!   shipped as data, refreshed in the same transaction as the composite.
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
pub mod insights;
pub mod mapping;
pub mod subscriptions;
pub mod writeback;

/// The composites this deployment builds (the composer's, and the API's for write-back), with
/// its insights unless they are switched off. Fails when the configured knowledge base cannot
/// be read or is invalid.
pub fn composites(common: &platform::CommonConfig) -> Result<composite::Composites, insights::KnowledgeBaseError> {
    let base_url = common.fhir_base_url.trim_end_matches('/').to_owned();
    let config = &common.insights;
    let engine = if config.enabled {
        let kb = match &config.knowledge_base {
            Some(path) => insights::KnowledgeBase::parse(&std::fs::read_to_string(path)?)?,
            None => insights::KnowledgeBase::built_in()?,
        };
        Some(insights::Engine {
            kb: std::sync::Arc::new(kb),
            grace_days: i64::from(config.refill_grace_days),
            clock_skew_days: config.clock_skew_days,
        })
    } else {
        None
    };
    Ok(composite::Composites::new(
        vec![Box::new(composite::MedicationProfile { base_url: base_url.clone(), max_bytes: common.composite_max_bytes })],
        engine,
        base_url,
    ))
}
