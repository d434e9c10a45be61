//! Topic names: the contract in ../shared/PLATFORM.md. Use `KafkaConfig::topic` to place one
//! in the deployment's namespace.

pub const DEMOGRAPHICS: &str = "sor.member.demographics.v1";
pub const MEDICATIONS: &str = "sor.pharmacy.medications.v1";
pub const ALLERGIES: &str = "sor.emr.allergies.v1";
pub const IMMUNIZATIONS: &str = "sor.immunization.registry.v1";
pub const CARE_TASKS: &str = "sor.care.tasks.v1";
pub const ATTRIBUTION: &str = "sor.member.attribution.v1";
pub const DLQ: &str = "sor.dlq.v1";
pub const MEDICATION_PROFILE: &str = "fhir.medication-profile.v1";
/// Each member's insights: a `collection` Bundle of DetectedIssues (compacted).
pub const INSIGHTS: &str = "fhir.insights.v1";
pub const PARTNER_INBOUND: &str = "partner.inbound.v1";
/// Every audited access, as a FHIR AuditEvent (key: partner id).
pub const AUDIT_EVENTS: &str = "audit.events.v1";
/// The relay's own: what each of its Kafka transactions changed in PostgreSQL (one partition,
/// read back by a relay taking over; nobody else reads or writes it).
pub const RELAY_TRANSACTIONS: &str = "relay.transactions.v1";

/// Every inbound system-of-record topic.
pub const SOR_TOPICS: [&str; 6] = [DEMOGRAPHICS, MEDICATIONS, ALLERGIES, IMMUNIZATIONS, CARE_TASKS, ATTRIBUTION];

/// The topic of `partner_id`'s members' composites (created on first use; compacted).
pub fn partner_profile(partner_id: &str) -> String {
    format!("fhir.partner.{partner_id}.medication-profile.v1")
}

/// The topic of `partner_id`'s members' insights (created on first use; compacted).
pub fn partner_insights(partner_id: &str) -> String {
    format!("fhir.partner.{partner_id}.insights.v1")
}

/// The partner topic that carries a main topic's records for `partner_id`, if partners get it.
pub fn partner_topic(topic: &str, partner_id: &str) -> Option<String> {
    match topic {
        MEDICATION_PROFILE => Some(partner_profile(partner_id)),
        INSIGHTS => Some(partner_insights(partner_id)),
        _ => None,
    }
}

/// The Kafka channel of `partner_id`'s Subscriptions: notification Bundles.
pub fn partner_notifications(partner_id: &str) -> String {
    format!("fhir.partner.{partner_id}.subscription-notifications.v1")
}
