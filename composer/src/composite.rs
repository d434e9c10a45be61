//! Composites: FHIR resources assembled from a member's components. A composite is one
//! implementation of [`Composite`]; the medication profile is the first.

use platform::MemberId;
use schemas::RecordKind;
use sha2::{Digest, Sha256};
use std::fmt::Write;

/// One live component of a member, as stored: its FHIR resource JSON and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub kind: RecordKind,
    pub source: String,
    pub record_id: String,
    pub version: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub json: String,
}

/// The content of a composite version, without its meta (versionId, lastUpdated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// The `entry` array, as JSON text.
    pub entries: String,
    /// SHA-256 of member id and entries: equal hashes mean equal content.
    pub hash: Vec<u8>,
}

/// A composite FHIR resource built per member from components.
pub trait Composite: Send + Sync {
    /// The contract topic its versions are published on.
    fn topic(&self) -> &'static str;
    /// The record kinds whose changes can change it.
    fn inputs(&self) -> &'static [RecordKind];
    /// Its content for a member from the member's live components (those of `inputs` kinds),
    /// or `None` when the member has no such composite (or no longer has one).
    fn assemble(&self, member: &MemberId, components: &[Component]) -> Option<Content>;
    /// The stored and served JSON of one version.
    fn render(&self, member: &MemberId, content: &Content, version_id: i64, last_updated: &str) -> String;
}

/// The member's medication profile: a `collection` Bundle with the member's Patient and every
/// current MedicationStatement, AllergyIntolerance and Immunization. It exists while the member
/// has demographics: records that arrive before them are kept and joined when they come.
pub struct MedicationProfile {
    /// Base of `fullUrl`s: `{base}/{type}/{id}`, where the API serves each entry.
    pub base_url: String,
}

const ENTRY_ORDER: [&str; 4] = ["Patient", "MedicationStatement", "AllergyIntolerance", "Immunization"];

impl Composite for MedicationProfile {
    fn topic(&self) -> &'static str {
        platform::topics::MEDICATION_PROFILE
    }

    fn inputs(&self) -> &'static [RecordKind] {
        &[RecordKind::Demographics, RecordKind::Medication, RecordKind::Allergy, RecordKind::Immunization]
    }

    fn assemble(&self, member: &MemberId, components: &[Component]) -> Option<Content> {
        // One Patient: if several systems publish demographics for a member, the newest version
        // wins, then the (source, record) order, so the choice depends only on stored state.
        let patient = components
            .iter()
            .filter(|c| c.kind == RecordKind::Demographics)
            .max_by(|a, b| (a.version, &a.source, &a.record_id).cmp(&(b.version, &b.source, &b.record_id)))?;
        let mut others: Vec<&Component> =
            components.iter().filter(|c| c.kind != RecordKind::Demographics && self.inputs().contains(&c.kind)).collect();
        others.sort_by(|a, b| {
            let rank = |c: &Component| ENTRY_ORDER.iter().position(|t| *t == c.resource_type).unwrap_or(usize::MAX);
            (rank(a), &a.resource_id).cmp(&(rank(b), &b.resource_id))
        });
        let mut entries = String::with_capacity(patient.json.len() + others.iter().map(|c| c.json.len() + 96).sum::<usize>() + 2);
        entries.push('[');
        for (i, c) in std::iter::once(patient).chain(others).enumerate() {
            if i > 0 {
                entries.push(',');
            }
            let _ = write!(
                entries,
                "{{\"fullUrl\":{},\"resource\":{}}}",
                serde_json::Value::String(format!("{}/{}/{}", self.base_url, c.resource_type, c.resource_id)),
                c.json
            );
        }
        entries.push(']');
        let mut hasher = Sha256::new();
        hasher.update(member.as_str().as_bytes());
        hasher.update([0u8]);
        hasher.update(entries.as_bytes());
        Some(Content { entries, hash: hasher.finalize().to_vec() })
    }

    fn render(&self, member: &MemberId, content: &Content, version_id: i64, last_updated: &str) -> String {
        format!(
            "{{\"resourceType\":\"Bundle\",\"id\":{},\"meta\":{{\"versionId\":\"{version_id}\",\"lastUpdated\":\"{last_updated}\"}},\"type\":\"collection\",\"timestamp\":\"{last_updated}\",\"entry\":{}}}",
            serde_json::Value::String(member.as_str().to_owned()),
            content.entries
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(kind: RecordKind, resource_type: &str, id: &str, version: i64) -> Component {
        Component {
            kind,
            source: "s".into(),
            record_id: id.into(),
            version,
            resource_type: resource_type.into(),
            resource_id: id.into(),
            json: format!("{{\"resourceType\":\"{resource_type}\",\"id\":\"{id}\"}}"),
        }
    }

    fn profile() -> MedicationProfile {
        MedicationProfile { base_url: "http://h/fhir".into() }
    }

    #[test]
    fn no_patient_no_profile() {
        let m = MemberId::parse("M1").unwrap();
        assert!(profile().assemble(&m, &[component(RecordKind::Medication, "MedicationStatement", "a", 1)]).is_none());
    }

    #[test]
    fn content_is_independent_of_component_order_and_meta() {
        let m = MemberId::parse("M1").unwrap();
        let a = vec![
            component(RecordKind::Immunization, "Immunization", "i", 1),
            component(RecordKind::Medication, "MedicationStatement", "b", 1),
            component(RecordKind::Demographics, "Patient", "M1", 1),
            component(RecordKind::Medication, "MedicationStatement", "a", 1),
        ];
        let mut b = a.clone();
        b.reverse();
        let (ca, cb) = (profile().assemble(&m, &a).unwrap(), profile().assemble(&m, &b).unwrap());
        assert_eq!(ca, cb);
        let body = profile().render(&m, &ca, 3, "2026-11-27T05:00:00.000Z");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["meta"]["versionId"], "3");
        let order: Vec<&str> = v["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap()).collect();
        assert_eq!(order, ["M1", "a", "b", "i"]);
        assert_eq!(v["entry"][0]["fullUrl"], "http://h/fhir/Patient/M1");
        let changed = profile().assemble(&m, &a[..3]).unwrap();
        assert_ne!(changed.hash, ca.hash);
    }
}
