use super::*;
use schemas::{Change, Contracts};
use serde_json::json;

fn event(kind: RecordKind, data: Value) -> (Event, Map<String, Value>) {
    let bytes = serde_json::to_vec(&json!({
        "event_id": "0b6f5d0e-3f1c-4a49-9a55-4f4b0c1e8a10", "op": "upsert", "source": "rx-claims",
        "occurred_at": "2026-11-20T10:15:00Z", "version": 42, "member_id": "M0001234", "record_id": "RX-889911",
        "data": data
    }))
    .unwrap();
    let e = Contracts::load().unwrap().parse(kind, Some(&bytes)).unwrap().unwrap();
    let Change::Upsert(d) = e.change.clone() else { panic!() };
    (e, d)
}

fn mapped(kind: RecordKind, data: Value) -> Value {
    let (e, d) = event(kind, data);
    let r = map_record(&e, &d).unwrap().unwrap();
    let v: Value = serde_json::from_str(&r.json).unwrap();
    assert_eq!(v["resourceType"], r.resource_type);
    assert_eq!(v["id"], r.id.as_str());
    assert_eq!(v["meta"]["source"], "urn:sor:rx-claims");
    // Parses back as an R4B resource.
    let _: fhir_sdk::r4b::resources::Resource = serde_json::from_str(&r.json).unwrap();
    v
}

#[test]
fn medication_statement_uses_rxnorm_npi_and_deterministic_ids() {
    let v = mapped(
        RecordKind::Medication,
        json!({ "rxnorm_code": "860975", "display": "metformin 500 MG Oral Tablet",
        "status": "active", "effective_start": "2025-01-02", "days_supply": 30, "quantity": 0.5, "prescriber_npi": "1234567893",
        "last_fill_date": "2026-11-01", "dosage_text": "1 tablet daily" }),
    );
    assert_eq!(v["medicationCodeableConcept"]["coding"][0]["system"], RXNORM);
    assert_eq!(v["medicationCodeableConcept"]["coding"][0]["code"], "860975");
    assert_eq!(v["subject"]["reference"], "Patient/M0001234");
    assert_eq!(v["informationSource"]["identifier"]["system"], NPI);
    assert_eq!(v["effectivePeriod"]["start"], "2025-01-02");
    assert_eq!(v["status"], "active");
    assert_eq!(v["id"], resource_id("MedicationStatement", "rx-claims", "RX-889911"));
    assert_ne!(resource_id("MedicationStatement", "rx-claims", "RX-1"), resource_id("MedicationStatement", "emr", "RX-1"));
}

#[test]
fn patient_allergy_immunization_task() {
    let p = mapped(
        RecordKind::Demographics,
        json!({ "given_name": "Ann", "family_name": "Lee", "birth_date": "1980-02-29",
        "sex": "female", "address_line": "1 Main St", "postal_code": "02139", "phone": "617-555-0100" }),
    );
    assert_eq!(p["id"], "M0001234");
    assert_eq!(p["gender"], "female");
    assert_eq!(p["birthDate"], "1980-02-29");
    let a = mapped(
        RecordKind::Allergy,
        json!({ "code_system": "snomed", "code": "91936005", "clinical_status": "active",
        "criticality": "high", "reaction": "Hives" }),
    );
    assert_eq!(a["code"]["coding"][0]["system"], SNOMED);
    assert_eq!(a["patient"]["reference"], "Patient/M0001234");
    assert_eq!(a["clinicalStatus"]["coding"][0]["code"], "active");
    assert_eq!(a["reaction"][0]["manifestation"][0]["text"], "Hives");
    let i = mapped(RecordKind::Immunization, json!({ "cvx_code": "208", "occurrence_date": "2021-04-01" }));
    assert_eq!(i["vaccineCode"]["coding"][0]["system"], CVX);
    assert_eq!(i["occurrenceDateTime"], "2021-04-01");
    assert_eq!(i["status"], "completed");
    let t = mapped(RecordKind::CareTask, json!({ "task_code": "AWV", "status": "requested", "priority": "urgent", "due_date": "2026-12-01" }));
    assert_eq!(t["for"]["reference"], "Patient/M0001234");
    assert_eq!(t["priority"], "urgent");
    assert_eq!(t["restriction"]["period"]["end"], "2026-12-01");
}

#[test]
fn impossible_dates_are_mapping_errors_that_name_the_field() {
    let (e, d) = event(RecordKind::Demographics, json!({ "birth_date": "2023-02-30" }));
    let err = map_record(&e, &d).unwrap_err().to_string();
    assert!(err.contains("/birth_date") && !err.contains("2023"), "{err}");
    let (e, d) = event(RecordKind::Attribution, json!({ "partner_id": "p1", "period_start": "2026-02-01", "period_end": "2026-01-01" }));
    assert!(map_record(&e, &d).is_err());
    let (e, d) = event(RecordKind::Attribution, json!({ "partner_id": "p1", "period_start": "2026-01-01" }));
    assert!(map_record(&e, &d).unwrap().is_none());
    // Year 0: PostgreSQL refuses it as a date, so every query reading this period would fail.
    let (e, d) = event(RecordKind::Attribution, json!({ "partner_id": "p1", "period_start": "0000-01-01" }));
    assert!(map_record(&e, &d).unwrap_err().to_string().contains("/period_start"));
    let (e, d) = event(RecordKind::Attribution, json!({ "partner_id": "p1", "period_start": "0001-01-01" }));
    assert!(map_record(&e, &d).unwrap().is_none());
}

#[test]
fn parse_bundle_checks_resource_type() {
    assert!(parse_bundle(r#"{"resourceType":"Patient","type":"collection"}"#).is_err());
    let b = parse_bundle(r#"{"resourceType":"Bundle","type":"collection","entry":[{"fullUrl":"http://h/fhir/Patient/M1","resource":{"resourceType":"Patient","id":"M1"}}]}"#).unwrap();
    let (patients, links) = bundle_patient_links(&b);
    assert_eq!(patients, ["M1"]);
    assert!(links.is_empty());
}
