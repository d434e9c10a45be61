use super::*;

fn today() -> Date {
    Date::from_calendar_date(2026, time::Month::November, 27).unwrap()
}

fn statement() -> Value {
    json!({
        "resourceType": "MedicationStatement",
        "id": "ignored",
        "meta": { "versionId": "9", "source": "urn:whatever" },
        "identifier": [{ "system": "urn:partner:pa:statements", "value": "S-1" }],
        "status": "stopped",
        "medicationCodeableConcept": { "coding": [{ "system": RXNORM, "code": "860975", "display": "metformin" }] },
        "subject": { "reference": "Patient/M1" },
        "effectivePeriod": { "start": "2025-01-01", "end": "2026-11-01" },
        "dateAsserted": "2026-11-27T09:00:00Z",
        "note": [{ "text": "member stopped two weeks ago" }]
    })
}

fn refused(rt: Writable, v: Value) -> Invalid {
    validate(rt, v, today()).expect_err("must be refused")
}

#[test]
fn a_good_statement_is_kept_without_id_and_meta() {
    let r = validate(Writable::MedicationStatement, statement(), today()).unwrap();
    assert_eq!(r.member_id, "M1");
    assert_eq!(r.code, (RXNORM.to_owned(), "860975".to_owned()));
    assert_eq!(r.status, "stopped");
    assert_eq!(r.identifiers, vec![("urn:partner:pa:statements".to_owned(), "S-1".to_owned())]);
    let body = stored_body(Writable::MedicationStatement, "abc", "urn:partner:pa", &r.elements);
    assert!(body.starts_with(r#"{"resourceType":"MedicationStatement","id":"abc","meta":{"source":"urn:partner:pa"},"#), "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["note"][0]["text"], "member stopped two weeks ago");
    assert!(v["meta"].get("versionId").is_none());
    // What we store parses back as R4B.
    serde_json::from_str::<MedicationStatement>(&body).unwrap();
}

#[test]
fn refusals_name_the_element() {
    let rt = Writable::MedicationStatement;
    let mut v = statement();
    v["resourceType"] = json!("AllergyIntolerance");
    assert_eq!(refused(rt, v).expression, "MedicationStatement.resourceType");

    let mut v = statement();
    v["status"] = json!("sometimes");
    assert_eq!(refused(rt, v).expression, "MedicationStatement.status");

    let mut v = statement();
    v.as_object_mut().unwrap().remove("status");
    assert_eq!(refused(rt, v).expression, "MedicationStatement.status");

    let mut v = statement();
    v["medicationCodeableConcept"]["coding"][0]["system"] = json!(SNOMED);
    assert_eq!(refused(rt, v).expression, "MedicationStatement.medicationCodeableConcept.coding");

    let mut v = statement();
    v["subject"] = json!({ "reference": "Group/7" });
    assert_eq!(refused(rt, v).expression, "MedicationStatement.subject");

    let mut v = statement();
    v["effectivePeriod"]["start"] = json!("2026-13-45");
    let e = refused(rt, v);
    assert!(e.expression.starts_with("MedicationStatement.effectivePeriod"), "{e}");

    let mut v = statement();
    v["dateAsserted"] = json!("2031-01-01");
    assert_eq!(refused(rt, v).expression, "MedicationStatement.dateAsserted");

    let mut v = statement();
    v["effectivePeriod"] = json!({ "start": "2026-02-01", "end": "2026-01-01" });
    assert_eq!(refused(rt, v).expression, "MedicationStatement.effectivePeriod.end");

    let mut v = statement();
    v["effectiveDateTime"] = json!("1850-01-01");
    v.as_object_mut().unwrap().remove("effectivePeriod");
    assert_eq!(refused(rt, v).expression, "MedicationStatement.effectiveDateTime");

    let mut v = statement();
    v["dosage"] = json!([{ "text": "daily", "colour": "blue" }]);
    assert_eq!(refused(rt, v).expression, "MedicationStatement.dosage[0].colour");

    assert_eq!(refused(rt, json!([1, 2])).expression, "MedicationStatement");
}

#[test]
fn allergies_take_rxnorm_or_snomed_and_need_a_clinical_status() {
    let rt = Writable::AllergyIntolerance;
    let allergy = json!({
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": { "coding": [{ "system": ALLERGY_CLINICAL, "code": "active" }] },
        "code": { "coding": [{ "system": SNOMED, "code": "91936005" }] },
        "patient": { "reference": "Patient/M1" },
        "recordedDate": "2026-11-27"
    });
    let r = validate(rt, allergy.clone(), today()).unwrap();
    assert_eq!((r.code.0.as_str(), r.status.as_str()), (SNOMED, "active"));

    let mut v = allergy.clone();
    v.as_object_mut().unwrap().remove("clinicalStatus");
    assert_eq!(refused(rt, v).expression, "AllergyIntolerance.clinicalStatus");

    let mut v = allergy.clone();
    v["code"]["coding"][0]["system"] = json!("http://loinc.org");
    assert_eq!(refused(rt, v).expression, "AllergyIntolerance.code.coding");

    let mut v = allergy;
    v["subject"] = json!({ "reference": "Patient/M1" });
    assert_eq!(refused(rt, v).expression, "AllergyIntolerance.subject");
}

#[test]
fn elements_over_the_limits_are_refused_by_name() {
    let mut long = statement();
    long["note"][0]["text"] = json!("x".repeat(MAX_STRING_CHARS + 1));
    let i = refused(Writable::MedicationStatement, long);
    assert_eq!(i.expression, "MedicationStatement.note[0].text");
    assert!(i.message.contains("4096"), "{}", i.message);

    let mut many = statement();
    many["note"] = json!(vec![json!({ "text": "n" }); MAX_ARRAY_ITEMS + 1]);
    assert_eq!(refused(Writable::MedicationStatement, many).expression, "MedicationStatement.note");

    let mut nul = statement();
    nul["note"][0]["text"] = json!("a\u{0}b");
    let i = refused(Writable::MedicationStatement, nul);
    assert_eq!((i.expression.as_str(), i.message.as_str()), ("MedicationStatement.note[0].text", schemas::NUL_RULE));

    let mut deep = json!("leaf");
    for _ in 0..MAX_DEPTH + 2 {
        deep = json!({ "extension": [deep] });
    }
    let mut nested = statement();
    nested["note"][0]["extension"] = deep;
    assert!(refused(Writable::MedicationStatement, nested).message.contains("nest"));

    let mut fits = statement();
    fits["note"][0]["text"] = json!("x".repeat(MAX_STRING_CHARS));
    assert!(validate(Writable::MedicationStatement, fits, today()).is_ok());
}
