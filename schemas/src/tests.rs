use super::*;
use proptest::prelude::*;
use serde_json::json;

fn contracts() -> Contracts {
    Contracts::load().expect("schemas compile")
}

fn native(op: &str, data: Option<Value>) -> Vec<u8> {
    let mut v = json!({
        "event_id": "0b6f5d0e-3f1c-4a49-9a55-4f4b0c1e8a10",
        "op": op,
        "source": "rx-claims",
        "occurred_at": "2026-11-20T10:15:00Z",
        "version": 42,
        "member_id": "M0001234",
        "record_id": "RX-889911"
    });
    if let Some(d) = data {
        v["data"] = d;
    }
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn the_platform_md_example_parses() {
    let bytes = native("upsert", Some(json!({ "rxnorm_code": "860975", "display": "metformin 500 MG Oral Tablet", "status": "active" })));
    let e = contracts().parse(RecordKind::Medication, Some(&bytes)).unwrap().unwrap();
    assert_eq!(e.envelope, EnvelopeKind::Native);
    assert_eq!(e.member_id.as_str(), "M0001234");
    assert_eq!(e.record_id.as_str(), "RX-889911");
    assert_eq!(e.source.as_str(), "rx-claims");
    assert_eq!(e.version.get(), 42);
    let Change::Upsert(data) = e.change else { panic!("upsert") };
    assert_eq!(data["rxnorm_code"], "860975");
}

#[test]
fn deletes_have_no_data_and_upserts_need_it() {
    let c = contracts();
    let e = c.parse(RecordKind::Medication, Some(&native("delete", None))).unwrap().unwrap();
    assert_eq!(e.change, Change::Delete);
    assert!(matches!(c.parse(RecordKind::Medication, Some(&native("upsert", None))), Err(Rejection::Schema { .. })));
    let with_data = native("delete", Some(json!({ "rxnorm_code": "1" })));
    assert!(matches!(c.parse(RecordKind::Medication, Some(&with_data)), Err(Rejection::Schema { .. })));
}

#[test]
fn rejections_name_the_path_and_never_the_value() {
    let c = contracts();
    let bytes = native("upsert", Some(json!({ "rxnorm_code": "860975", "status": "SECRET-VALUE" })));
    let err = c.parse(RecordKind::Medication, Some(&bytes)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/data/status"), "{text}");
    assert!(!text.contains("SECRET-VALUE"), "{text}");
    assert_eq!(err.class(), "schema");

    let bytes = native("upsert", Some(json!({ "given_name": "Ann", "birth_date": "1980/01/02" })));
    let text = c.parse(RecordKind::Demographics, Some(&bytes)).unwrap_err().to_string();
    assert!(text.contains("/data/birth_date") && !text.contains("1980"), "{text}");
}

#[test]
fn invalid_json_and_empty_values_are_rejected() {
    let c = contracts();
    assert!(matches!(c.parse(RecordKind::Allergy, Some(b"{not json")), Err(Rejection::InvalidJson { line: 1, .. })));
    assert_eq!(c.parse(RecordKind::Allergy, Some(b"  ")), Err(Rejection::Empty));
    assert!(matches!(c.parse(RecordKind::Allergy, Some(b"[1,2]")), Err(Rejection::Schema { .. })));
    assert_eq!(c.parse(RecordKind::Allergy, None), Ok(None));
}

#[test]
fn null_fields_count_as_absent() {
    let bytes = native("upsert", Some(json!({ "rxnorm_code": "860975", "effective_end": null })));
    let e = contracts().parse(RecordKind::Medication, Some(&bytes)).unwrap().unwrap();
    let Change::Upsert(data) = e.change else { panic!() };
    assert!(!data.contains_key("effective_end"));
}

fn debezium(op: &str, row: Value, wrapped: bool) -> Vec<u8> {
    let (before, after) = if op == "d" { (row, Value::Null) } else { (Value::Null, row) };
    let payload = json!({ "before": before, "after": after, "op": op, "ts_ms": 1,
        "source": { "name": "emr-cdc", "connector": "postgresql", "lsn": 123456, "ts_ms": 99 } });
    let v = if wrapped { json!({ "schema": { "type": "struct" }, "payload": payload }) } else { payload };
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn debezium_envelopes_with_and_without_wrapper() {
    let c = contracts();
    let row = json!({ "member_id": "M1", "record_id": "AL-1", "code_system": "snomed", "code": "91936005", "reaction": null });
    for wrapped in [false, true] {
        for op in ["c", "u", "r"] {
            let e = c.parse(RecordKind::Allergy, Some(&debezium(op, row.clone(), wrapped))).unwrap().unwrap();
            assert_eq!(e.envelope, EnvelopeKind::Debezium);
            assert_eq!(e.version.get(), 123456, "version is source.lsn");
            assert_eq!(e.source.as_str(), "emr-cdc");
            let Change::Upsert(data) = &e.change else { panic!() };
            assert!(!data.contains_key("member_id") && !data.contains_key("reaction"));
        }
        let e = c.parse(RecordKind::Allergy, Some(&debezium("d", row.clone(), wrapped))).unwrap().unwrap();
        assert_eq!(e.change, Change::Delete);
        assert_eq!(e.record_id.as_str(), "AL-1");
    }
    // Same change, same id: redelivery is recognised. Different op, different id.
    let a = c.parse(RecordKind::Allergy, Some(&debezium("u", row.clone(), false))).unwrap().unwrap();
    let b = c.parse(RecordKind::Allergy, Some(&debezium("u", row.clone(), true))).unwrap().unwrap();
    let d = c.parse(RecordKind::Allergy, Some(&debezium("d", row, true))).unwrap().unwrap();
    assert_eq!(a.event_id, b.event_id);
    assert_ne!(a.event_id, d.event_id);
}

#[test]
fn debezium_version_falls_back_to_ts_ms_and_rows_need_ids() {
    let c = contracts();
    let v = json!({ "op": "c", "after": { "member_id": "M1", "record_id": "I-1", "cvx_code": "208" }, "source": { "ts_ms": 1700000000000i64 } });
    let e = c.parse(RecordKind::Immunization, Some(&serde_json::to_vec(&v).unwrap())).unwrap().unwrap();
    assert_eq!(e.version.get(), 1700000000000);
    assert_eq!(e.source.as_str(), "debezium");
    let v = json!({ "op": "c", "after": { "record_id": "I-1", "cvx_code": "208" }, "source": { "ts_ms": 1 } });
    assert!(matches!(c.parse(RecordKind::Immunization, Some(&serde_json::to_vec(&v).unwrap())), Err(Rejection::Schema { .. })));
}

#[test]
fn topics_and_kinds_correspond() {
    for kind in RecordKind::ALL {
        assert_eq!(RecordKind::for_topic(kind.topic()), Some(kind));
        assert_eq!(RecordKind::parse(kind.as_str()), Some(kind));
    }
    assert_eq!(RecordKind::for_topic("sor.dlq.v1"), None);
}

proptest! {
    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let c = contracts();
        for kind in RecordKind::ALL {
            let _ = c.parse(kind, Some(&bytes));
        }
    }

    #[test]
    fn parsing_arbitrary_envelopes_never_panics(
        op in prop_oneof![Just("upsert"), Just("delete"), Just("c"), Just("d"), Just("x")],
        version in any::<i64>(),
        member in "[A-Za-z0-9 _.-]{0,70}",
        field in "[a-z_]{1,12}",
        value in prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from), "[ -~]{0,20}".prop_map(Value::from)],
    ) {
        let c = contracts();
        let v = json!({ "event_id": "0b6f5d0e-3f1c-4a49-9a55-4f4b0c1e8a10", "op": op, "source": "s",
            "occurred_at": "2026-11-20T10:15:00Z", "version": version, "member_id": member, "record_id": "r",
            "data": { field.clone(): value.clone() }, "after": { "member_id": member, "record_id": "r", field: value },
            "source_": {} });
        for kind in RecordKind::ALL {
            if let Ok(Some(e)) = c.parse(kind, Some(&serde_json::to_vec(&v).unwrap())) {
                prop_assert!(e.version.get() >= 0);
            }
        }
    }
}

#[test]
fn messages_are_keyed_by_their_member() {
    let member = platform::MemberId::parse("M0001234").unwrap();
    assert_eq!(check_key(Some(b"M0001234"), &member), Ok(()));
    assert_eq!(check_key(Some(br#"{"member_id":"M0001234"}"#), &member), Ok(()), "a Debezium key on member_id");
    assert_eq!(check_key(Some(br#"{"schema":{"type":"struct"},"payload":{"member_id":"M0001234"}}"#), &member), Ok(()));
    for bad in [&b"M0001235"[..], b"", b"m0001234", br#"{"member_id":"M9"}"#, br#"{"id":1}"#, b"\xff\xfe", br#"{"payload":"M0001234"}"#] {
        let err = check_key(Some(bad), &member).unwrap_err();
        assert_eq!(err.class(), "key");
        assert!(!err.to_string().contains("M0001234"), "the key is not quoted: {err}");
    }
    assert_eq!(check_key(None, &member).unwrap_err().class(), "key");
}

#[test]
fn a_nul_character_anywhere_is_refused_with_its_path() {
    let bytes = native("upsert", Some(json!({ "rxnorm_code": "860975", "display": "met\u{0}formin" })));
    let err = contracts().parse(RecordKind::Medication, Some(&bytes)).unwrap_err();
    assert_eq!(err, Rejection::Schema { schema: "envelope", path: "/data/display".into(), rule: NUL_RULE.into() });
    assert_eq!(nul_path(&json!({ "a": [1, { "b\u{0}": 2 }] }), String::new()).as_deref(), Some("/a/1/b\\u0000"));
    assert_eq!(nul_path(&json!({ "a": ["x", "y"] }), String::new()), None);
}
