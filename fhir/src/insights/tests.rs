use super::*;
use crate::mapping::{EXT_DAYS_SUPPLY, EXT_LAST_FILL_DATE};
use schemas::RecordKind;
use time::macros::date;

fn engine() -> Engine {
    Engine { kb: Arc::new(KnowledgeBase::built_in().unwrap()), grace_days: 7, clock_skew_days: 0 }
}

fn patient() -> Component {
    component(RecordKind::Demographics, "Patient", "M1", None, None, "{}".into())
}

fn component(kind: RecordKind, rtype: &str, id: &str, code: Option<(&str, &str)>, status: Option<&str>, json: String) -> Component {
    Component {
        kind,
        source: "rx-claims".into(),
        record_id: id.into(),
        version: 1,
        resource_type: rtype.into(),
        resource_id: id.into(),
        json,
        code: code.map(|(s, c)| (s.to_owned(), c.to_owned())),
        status: status.map(str::to_owned),
        updated_at: OffsetDateTime::UNIX_EPOCH,
    }
}

fn med(id: &str, rxnorm: &str, status: &str) -> Component {
    component(RecordKind::Medication, "MedicationStatement", id, Some((RXNORM, rxnorm)), Some(status), "{}".into())
}

fn filled(id: &str, rxnorm: &str, last_fill: &str, days: i64) -> Component {
    let json = json!({ "extension": [{ "url": EXT_LAST_FILL_DATE, "valueDate": last_fill }, { "url": EXT_DAYS_SUPPLY, "valueInteger": days }] });
    component(RecordKind::Medication, "MedicationStatement", id, Some((RXNORM, rxnorm)), Some("active"), json.to_string())
}

fn allergy(id: &str, system: &str, code: &str, criticality: &str) -> Component {
    component(RecordKind::Allergy, "AllergyIntolerance", id, Some((system, code)), Some("active"), json!({ "criticality": criticality }).to_string())
}

fn found(components: &[Component]) -> Vec<(Kind, Severity, Vec<String>)> {
    let mut all = vec![patient()];
    all.extend_from_slice(components);
    evaluate(&engine(), "M1", &all, date!(2026 - 12 - 07)).insights.into_iter().map(|d| (d.kind, d.severity, d.implicated)).collect()
}

const WARFARIN: &str = "855332";
const ASPIRIN: &str = "1191";
const SIMVA_20: &str = "312961";
const SIMVA_40: &str = "198211";
const AMOXICILLIN: &str = "308182";
const AMOX_CLAV: &str = "562251";
const CLARITHROMYCIN: &str = "197517";

#[test]
fn the_built_in_knowledge_base_is_valid_and_covers_every_generated_product() {
    let kb = KnowledgeBase::built_in().unwrap();
    let codes: Value = serde_json::from_str(include_str!("../../../devtools/data/codes.json")).unwrap();
    for product in codes["rxnorm"].as_array().unwrap() {
        let code = product[0].as_str().unwrap();
        assert!(kb.ingredients_of(code).is_some(), "the generator's product {code} is not in the knowledge base");
    }
}

#[test]
fn warfarin_and_aspirin_interact_and_stop_interacting_when_aspirin_stops() {
    let both = found(&[med("w", WARFARIN, "active"), med("a", ASPIRIN, "active")]);
    assert_eq!(both, vec![(Kind::Interaction, Severity::High, vec!["MedicationStatement/a".into(), "MedicationStatement/w".into()])]);
    assert_eq!(found(&[med("w", WARFARIN, "active"), med("a", ASPIRIN, "stopped")]), vec![]);
}

#[test]
fn one_insight_per_pair_with_the_most_severe_rule() {
    // Simvastatin + clarithromycin: the ONC panel's pair (high), not only a CYP3A4 caution.
    let hits = found(&[med("s", SIMVA_20, "active"), med("c", CLARITHROMYCIN, "active")]);
    assert_eq!(hits.len(), 1);
    assert_eq!((hits[0].0, hits[0].1), (Kind::Interaction, Severity::High));
}

#[test]
fn two_strengths_of_one_statin_are_duplicate_therapy() {
    let hits = found(&[med("s20", SIMVA_20, "active"), med("s40", SIMVA_40, "active")]);
    assert_eq!(hits, vec![(Kind::Duplication, Severity::Moderate, vec!["MedicationStatement/s20".into(), "MedicationStatement/s40".into()])]);
}

#[test]
fn a_penicillin_allergy_conflicts_with_amoxicillin_and_amoxicillin_clavulanate() {
    for (system, code) in [(SNOMED, "91936005"), (RXNORM, "7980"), (SNOMED, "294505008")] {
        let hits = found(&[allergy("al", system, code, "high"), med("am", AMOXICILLIN, "active")]);
        assert_eq!(hits, vec![(Kind::Allergy, Severity::High, vec!["AllergyIntolerance/al".into(), "MedicationStatement/am".into()])], "{code}");
    }
    let hits = found(&[allergy("al", SNOMED, "91936005", "low"), med("ac", AMOX_CLAV, "active")]);
    assert_eq!(hits[0].0, Kind::Allergy);
    assert_eq!(hits[0].1, Severity::Moderate, "a low-criticality allergy is a moderate alert");
}

#[test]
fn one_allergy_alert_per_allergy_and_ingredient_implicating_every_product_with_it() {
    let hits = found(&[allergy("al", SNOMED, "91936005", "high"), med("am", AMOXICILLIN, "active"), med("ac", AMOX_CLAV, "active")]);
    let alerts: Vec<_> = hits.iter().filter(|h| h.0 == Kind::Allergy).collect();
    assert_eq!(alerts.len(), 1, "{hits:?}");
    assert_eq!(alerts[0].2, vec!["AllergyIntolerance/al".to_owned(), "MedicationStatement/ac".into(), "MedicationStatement/am".into()]);
    let all = vec![patient(), allergy("al", SNOMED, "91936005", "high"), med("am", AMOXICILLIN, "active"), med("ac", AMOX_CLAV, "active")];
    let keys: BTreeSet<String> = evaluate(&engine(), "M1", &all, date!(2026 - 12 - 07)).insights.into_iter().map(|d| d.key).collect();
    assert_eq!(keys.len(), 2, "the alert and the penicillin duplication, each once: {keys:?}");
}

#[test]
fn an_allergy_coded_as_the_ingredient_conflicts_with_its_products() {
    let hits = found(&[allergy("al", RXNORM, "1191", "high"), med("a", ASPIRIN, "active")]);
    assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![Kind::Allergy]);
}

#[test]
fn unknown_products_are_counted_and_produce_nothing() {
    let all = vec![patient(), med("x", "999999999", "active"), med("w", WARFARIN, "active")];
    let e = evaluate(&engine(), "M1", &all, date!(2026 - 12 - 07));
    assert_eq!((e.insights.len(), e.unknown_products), (0, 1));
}

#[test]
fn no_patient_no_insights() {
    let e = evaluate(&engine(), "M1", &[med("w", WARFARIN, "active"), med("a", ASPIRIN, "active")], date!(2026 - 12 - 07));
    assert_eq!(e, Evaluation::default());
}

#[test]
fn a_maintenance_drug_past_its_supply_and_grace_is_a_refill_gap_and_time_alone_opens_it() {
    // Filled 2026-11-01 for 30 days: runs out 2026-12-01; with 7 days of grace the gap opens on
    // 2026-12-09.
    let statin = filled("s", SIMVA_20, "2026-11-01", 30);
    let all = vec![patient(), statin.clone()];
    let before = evaluate(&engine(), "M1", &all, date!(2026 - 12 - 08));
    assert!(before.insights.is_empty());
    assert_eq!(before.recheck_on, Some(date!(2026 - 12 - 09)));
    let after = evaluate(&engine(), "M1", &all, date!(2026 - 12 - 09));
    assert_eq!(
        after.insights.iter().map(|d| (d.kind, d.implicated.clone())).collect::<Vec<_>>(),
        vec![(Kind::RefillGap, vec!["MedicationStatement/s".into()])]
    );
    assert_eq!(after.recheck_on, None);
    // An antibiotic is not a maintenance drug.
    let short = vec![patient(), filled("a", AMOXICILLIN, "2026-01-01", 10)];
    assert_eq!(evaluate(&engine(), "M1", &short, date!(2026 - 12 - 09)), Evaluation::default());
}

#[test]
fn ids_are_stable_per_member_and_pair() {
    let all = vec![patient(), med("w", WARFARIN, "active"), med("a", ASPIRIN, "active")];
    let a = evaluate(&engine(), "M1", &all, date!(2026 - 12 - 07));
    let mut reversed = all.clone();
    reversed.reverse();
    let b = evaluate(&engine(), "M1", &reversed, date!(2026 - 12 - 07));
    assert_eq!(a, b);
    let other = evaluate(&engine(), "M2", &all, date!(2026 - 12 - 07));
    assert_ne!(a.insights[0].id(), other.insights[0].id());
}

#[test]
fn a_rendered_insight_is_a_detected_issue() {
    let all = vec![patient(), med("w", WARFARIN, "active"), med("a", ASPIRIN, "active")];
    let d = &evaluate(&engine(), "M1", &all, date!(2026 - 12 - 07)).insights[0];
    let body: Value = serde_json::from_str(&render("M1", d, OPEN, "2026-12-07T00:00:00.000Z", "v1")).unwrap();
    assert_eq!(body["resourceType"], "DetectedIssue");
    assert_eq!(body["code"]["coding"][0]["system"], ACT_CODE);
    assert_eq!(body["code"]["coding"][0]["code"], "DRG");
    assert_eq!(body["severity"], "high");
    assert_eq!(body["patient"]["reference"], "Patient/M1");
    assert_eq!(body["implicated"].as_array().unwrap().len(), 2);
    assert_eq!(body["extension"][0]["valueString"], "v1");
    crate::mapping::parse_detected_issue(&body.to_string()).unwrap();
}

#[test]
fn a_knowledge_base_that_breaks_its_schema_or_names_undefined_things_is_refused() {
    let mut doc: Value = serde_json::from_str(BUILT_IN).unwrap();
    doc["interactions"][0]["severity"] = json!("catastrophic");
    assert!(matches!(KnowledgeBase::parse(&doc.to_string()), Err(KnowledgeBaseError::Schema(_))));
    let mut doc: Value = serde_json::from_str(BUILT_IN).unwrap();
    doc["ingredients"]["11289"]["classes"] = json!(["no-such-class"]);
    assert!(matches!(KnowledgeBase::parse(&doc.to_string()), Err(KnowledgeBaseError::Dangling(_))));
    let mut doc: Value = serde_json::from_str(BUILT_IN).unwrap();
    doc["interactions"][0]["source"] = json!("unknown-source");
    assert!(matches!(KnowledgeBase::parse(&doc.to_string()), Err(KnowledgeBaseError::Dangling(_))));
    assert!(matches!(KnowledgeBase::parse("{"), Err(KnowledgeBaseError::Json(_))));
}

#[test]
fn a_new_version_affects_only_the_codes_it_judges_differently() {
    let old = KnowledgeBase::built_in().unwrap();
    let mut doc: Value = serde_json::from_str(BUILT_IN).unwrap();
    doc["version"] = json!("next");
    // Metformin becomes a class of its own with a new rule against furosemide.
    doc["interactions"].as_array_mut().unwrap().push(json!({ "a": { "ingredient": "6809" }, "b": { "ingredient": "4603" },
        "severity": "low", "note": "Furosemide can raise metformin levels.", "source": "phansalkar-2012" }));
    let new = KnowledgeBase::parse(&doc.to_string()).unwrap();
    let affected = old.affected_codes(&new);
    assert!(affected.contains("860975") && affected.contains("310429"), "{affected:?}");
    assert!(!affected.contains(WARFARIN) && !affected.contains(SIMVA_20), "{affected:?}");
    assert!(old.affected_codes(&old).is_empty());
}

proptest::proptest! {
    /// Any text is either a knowledge base or an error, never a panic.
    #[test]
    fn parsing_never_panics(text in ".{0,200}") {
        let _ = KnowledgeBase::parse(&text);
    }

    /// Damaging any value of the built-in base by replacing it gives a base or an error.
    #[test]
    fn damaged_bases_never_panic(path in 0usize..400, value in proptest::prelude::any::<i32>()) {
        let mut doc: Value = serde_json::from_str(BUILT_IN).unwrap();
        let mut n = 0;
        fn walk(v: &mut Value, n: &mut usize, target: usize, with: &Value) {
            *n += 1;
            if *n == target { *v = with.clone(); return; }
            match v {
                Value::Object(m) => m.values_mut().for_each(|x| walk(x, n, target, with)),
                Value::Array(a) => a.iter_mut().for_each(|x| walk(x, n, target, with)),
                _ => {}
            }
        }
        walk(&mut doc, &mut n, path, &json!(value));
        let _ = KnowledgeBase::parse(&doc.to_string());
    }
}
