//! An audit record as a FHIR R4B `AuditEvent`, written straight from its row.

use db::audit::AuditRow;
use serde::Serialize;
use serde_json::Value;

pub const PARTNER_SYSTEM: &str = "urn:fhir-event-platform:partner";
pub const OPERATION_SYSTEM: &str = "urn:fhir-event-platform:audit-operation";

/// An audit event as a FHIR R4B `AuditEvent`.
pub fn audit_event(row: &AuditRow, base_url: &str) -> Value {
    serde_json::to_value(AuditEvent::of(row, base_url)).unwrap_or(Value::Null)
}

/// An audit event as the JSON text of a FHIR R4B `AuditEvent`, written straight from the row
/// (the relay writes one per request served; no intermediate JSON tree).
pub fn audit_event_json(row: &AuditRow, base_url: &str) -> String {
    serde_json::to_string(&AuditEvent::of(row, base_url)).unwrap_or_default()
}

/// The `AuditEvent` resource, borrowing from its row.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent<'a> {
    resource_type: &'static str,
    id: String,
    meta: Meta,
    #[serde(rename = "type")]
    kind: Coding<'a>,
    subtype: [Coding<'a>; 1],
    action: &'static str,
    recorded: String,
    outcome: &'static str,
    outcome_desc: String,
    agent: [Agent<'a>; 1],
    source: Source<'a>,
    entity: Vec<Entity<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    version_id: &'static str,
    last_updated: String,
}

#[derive(Serialize)]
struct Coding<'a> {
    system: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'static str>,
}

const fn coding(system: &'static str, code: &'static str, display: &'static str) -> Coding<'static> {
    Coding { system, code, display: Some(display) }
}

const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";

#[derive(Serialize)]
struct Agent<'a> {
    who: Who<'a>,
    requestor: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Who<'a> {
    Identifier { system: &'static str, value: &'a str },
    Display(&'static str),
}

#[derive(Serialize)]
struct Source<'a> {
    site: &'a str,
    observer: Display,
    #[serde(rename = "type")]
    kind: [Coding<'static>; 1],
}

#[derive(Serialize)]
struct Display {
    display: &'static str,
}

#[derive(Serialize)]
struct Reference {
    reference: String,
}

#[derive(Serialize)]
struct Detail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "valueString")]
    value: &'a str,
}

#[derive(Serialize)]
struct Entity<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    what: Option<Reference>,
    #[serde(rename = "type")]
    kind: Coding<'static>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Coding<'static>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    detail: Vec<Detail<'a>>,
}

impl<'a> AuditEvent<'a> {
    fn of(row: &'a AuditRow, base_url: &'a str) -> AuditEvent<'a> {
        let r = &row.record;
        let recorded = platform::time::instant(row.recorded_at);
        let rest = match r.operation.as_str() {
            "read" => Some("read"),
            "vread" => Some("vread"),
            "history" => Some("history-instance"),
            "search" => Some("search-type"),
            "operation" => Some("operation"),
            _ => None,
        };
        let subtype = match rest {
            Some(code) => Coding { system: "http://hl7.org/fhir/restful-interaction", code, display: None },
            None => Coding { system: OPERATION_SYSTEM, code: &r.operation, display: None },
        };
        let action = match (r.operation.as_str(), r.method.as_str()) {
            ("read" | "vread" | "history" | "operation", _) => "R",
            ("write", "PUT") => "U",
            ("write", _) => "C",
            _ => "E",
        };
        let outcome = match r.status {
            200..=399 => "0",
            400..=499 => "4",
            _ => "8",
        };
        let who = match &r.partner_id {
            Some(p) => Who::Identifier { system: PARTNER_SYSTEM, value: p },
            None => Who::Display("unauthenticated caller"),
        };
        let mut entity: Vec<Entity> = r
            .member_ids
            .iter()
            .map(|m| Entity {
                what: Some(Reference { reference: format!("Patient/{m}") }),
                kind: coding(ENTITY_TYPE, "1", "Person"),
                role: Some(coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient")),
                name: None,
                description: None,
                detail: Vec::new(),
            })
            .collect();
        let detail = [("keyId", &r.key_id), ("decision", &r.decision)]
            .into_iter()
            .filter_map(|(kind, v)| v.as_deref().map(|value| Detail { kind, value }))
            .collect();
        entity.push(Entity {
            what: None,
            kind: coding(ENTITY_TYPE, "2", "System Object"),
            role: None,
            name: r.resource_type.as_deref(),
            description: Some(format!("{} {}", r.method, r.path)),
            detail,
        });
        AuditEvent {
            resource_type: "AuditEvent",
            id: row.id.to_string(),
            meta: Meta { version_id: "1", last_updated: recorded.clone() },
            kind: coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "RESTful Operation"),
            subtype: [subtype],
            action,
            recorded,
            outcome,
            outcome_desc: format!("HTTP {} ({})", r.status, r.outcome),
            agent: [Agent { who, requestor: true }],
            source: Source {
                site: base_url,
                observer: Display { display: "fhir-event-platform api" },
                kind: [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "3", "Web Server")],
            },
            entity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use db::audit::AuditRecord;
    use serde_json::json;

    fn row(partner: Option<&str>, operation: &str, resource_type: Option<&str>, members: &[&str], key: Option<&str>) -> AuditRow {
        AuditRow {
            id: 42,
            recorded_at: time::macros::datetime!(2026-11-28 09:33:43.123 UTC),
            record: AuditRecord {
                partner_id: partner.map(str::to_owned),
                operation: operation.into(),
                resource_type: resource_type.map(str::to_owned),
                member_ids: members.iter().map(|m| m.to_string()).collect(),
                method: "GET".into(),
                path: "/fhir/Patient/M1/$medication-profile".into(),
                status: 200,
                outcome: "success".into(),
                key_id: key.map(str::to_owned),
                decision: key.map(|_| "match".to_owned()),
            },
        }
    }

    #[test]
    fn an_audit_event_names_the_partner_the_members_and_the_request() {
        let event = audit_event(&row(Some("partner-1"), "operation", Some("Patient"), &["M1", "M2"], Some("k1")), "http://h/fhir");
        let person = json!({ "system": ENTITY_TYPE, "code": "1", "display": "Person" });
        let patient = json!({ "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" });
        assert_eq!(
            event,
            json!({
                "resourceType": "AuditEvent",
                "id": "42",
                "meta": { "versionId": "1", "lastUpdated": "2026-11-28T09:33:43.123Z" },
                "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" },
                "subtype": [{ "system": "http://hl7.org/fhir/restful-interaction", "code": "operation" }],
                "action": "R",
                "recorded": "2026-11-28T09:33:43.123Z",
                "outcome": "0",
                "outcomeDesc": "HTTP 200 (success)",
                "agent": [{ "who": { "identifier": { "system": PARTNER_SYSTEM, "value": "partner-1" } }, "requestor": true }],
                "source": { "site": "http://h/fhir", "observer": { "display": "fhir-event-platform api" },
                    "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3", "display": "Web Server" }] },
                "entity": [
                    { "what": { "reference": "Patient/M1" }, "type": person, "role": patient },
                    { "what": { "reference": "Patient/M2" }, "type": person, "role": patient },
                    { "type": { "system": ENTITY_TYPE, "code": "2", "display": "System Object" }, "name": "Patient",
                      "description": "GET /fhir/Patient/M1/$medication-profile",
                      "detail": [{ "type": "keyId", "valueString": "k1" }, { "type": "decision", "valueString": "match" }] },
                ],
            })
        );
        assert_eq!(
            serde_json::from_str::<Value>(&audit_event_json(
                &row(Some("partner-1"), "operation", Some("Patient"), &["M1", "M2"], Some("k1")),
                "http://h/fhir"
            ))
            .ok(),
            Some(event)
        );
    }

    #[test]
    fn an_unauthenticated_call_is_attributed_to_no_partner_and_has_no_empty_fields() {
        let event = audit_event(&row(None, "token", None, &[], None), "http://h/fhir");
        assert_eq!(event["agent"], json!([{ "who": { "display": "unauthenticated caller" }, "requestor": true }]));
        assert_eq!(event["subtype"], json!([{ "system": OPERATION_SYSTEM, "code": "token" }]));
        assert_eq!(event["action"], "E");
        assert_eq!(
            event["entity"],
            json!([{ "type": { "system": ENTITY_TYPE, "code": "2", "display": "System Object" }, "description": "GET /fhir/Patient/M1/$medication-profile" }])
        );
    }
}
