//! Issue 3: a scripted scenario through the real Kafka and PostgreSQL — native and Debezium
//! events, out-of-order versions, redeliveries, deletes, malformed messages — ends with exactly
//! the expected composites, gapless histories, one outbox row per version, and every malformed
//! message in `sor.dlq.v1` with its reason.

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tests::*;
use uuid::Uuid;

const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";

fn debezium(op: &str, lsn: i64, row: Value, wrapped: bool) -> Vec<u8> {
    let (before, after) = if op == "d" { (row, Value::Null) } else { (Value::Null, row) };
    let payload = json!({ "before": before, "after": after, "op": op, "ts_ms": 1764000000000i64,
        "source": { "name": "emr-cdc", "connector": "postgresql", "lsn": lsn } });
    serde_json::to_vec(&if wrapped { json!({ "schema": { "type": "struct" }, "payload": payload }) } else { payload }).unwrap()
}

fn id(resource_type: &str, source: &str, record: &str) -> String {
    // The documented deterministic id: UUIDv5(URL namespace, "urn:sor:<source>/<type>/<record>").
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("urn:sor:{source}/{resource_type}/{record}").as_bytes()).to_string()
}

struct Sent {
    topic: String,
    partition: i32,
    offset: i64,
    value: Option<Vec<u8>>,
}

async fn send(producer: &FutureProducer, topic: &str, key: &str, value: Option<&[u8]>, headers: Option<OwnedHeaders>) -> anyhow::Result<Sent> {
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key);
    if let Some(v) = value {
        record = record.payload(v);
    }
    if let Some(h) = headers {
        record = record.headers(h);
    }
    let delivery = producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    Ok(Sent { topic: topic.to_owned(), partition: delivery.partition, offset: delivery.offset, value: value.map(<[u8]>::to_vec) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_scenario_ends_with_the_expected_composites() -> anyhow::Result<()> {
    // The composer migrates the empty database itself.
    let app = TestApp::with_database("scenario", false).await?;
    let composer = app.composer(&[]).await?;
    let pool = &app.pool;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).set("enable.idempotence", "true").set("acks", "all").create()?;
    let t = |name: &str| app.topic(name);
    let (demo, meds, allergies, imms) =
        (t("sor.member.demographics.v1"), t("sor.pharmacy.medications.v1"), t("sor.emr.allergies.v1"), t("sor.immunization.registry.v1"));

    step("phase 1: upserts in both envelopes, a redelivery, a tombstone, three malformed messages");
    let mut sent = 0usize;
    let ann = json!({ "given_name": "Ann", "family_name": "Lee", "birth_date": "1980-02-29", "sex": "female",
        "address_line": "12 Elm Street", "city": "Boston", "state": "MA", "postal_code": "02139", "phone": "617-555-0100" });
    send(&producer, &demo, "M1", Some(&native_event("upsert", "enrollment", 1, "M1", "M1", Some(ann.clone()))), None).await?;
    let rx1_v2 = native_event(
        "upsert",
        "rx-claims",
        2,
        "M1",
        "RX-1",
        Some(json!({ "rxnorm_code": "860975", "display": "metformin 500 MG Oral Tablet", "status": "active", "days_supply": 90 })),
    );
    let rx1_v1 = native_event("upsert", "rx-claims", 1, "M1", "RX-1", Some(json!({ "rxnorm_code": "860975", "status": "stopped" })));
    send(&producer, &meds, "M1", Some(&rx1_v2), None).await?;
    let rx2 =
        json!({ "member_id": "M1", "record_id": "RX-2", "rxnorm_code": "314076", "display": "lisinopril 10 MG Oral Tablet", "status": "active" });
    send(&producer, &meds, "M1", Some(&debezium("c", 500, rx2.clone(), true)), None).await?;
    let al1 = native_event(
        "upsert",
        "emr",
        3,
        "M1",
        "AL-1",
        Some(
            json!({ "code_system": "snomed", "code": "91936005", "display": "Allergy to penicillin", "clinical_status": "active", "criticality": "high" }),
        ),
    );
    send(&producer, &allergies, "M1", Some(&al1), None).await?;
    send(&producer, &allergies, "M1", Some(&al1), None).await?; // redelivered
    let im1 = json!({ "member_id": "M1", "record_id": "IM-1", "cvx_code": "208", "occurrence_date": "2021-04-01", "lot_number": null });
    send(&producer, &imms, "M1", Some(&debezium("r", 700, im1, false)), None).await?;
    send(&producer, &imms, "M1", None, None).await?; // a Debezium tombstone: no change
    send(
        &producer,
        &demo,
        "M2",
        Some(&native_event("upsert", "enrollment", 1, "M2", "M2", Some(json!({ "given_name": "Bo", "sex": "male" })))),
        None,
    )
    .await?;
    send(
        &producer,
        &meds,
        "M2",
        Some(&native_event("upsert", "rx-claims", 1, "M2", "RX-9", Some(json!({ "rxnorm_code": "197361", "status": "active" })))),
        None,
    )
    .await?;
    // Malformed: invalid JSON (with a header that must be kept), a schema violation, an impossible date.
    let mut malformed = Vec::new();
    let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some("abc") });
    malformed.push(("invalid-json", send(&producer, &meds, "M1", Some(b"{\"event_id\": nope"), Some(headers)).await?));
    malformed.push((
        "schema",
        send(
            &producer,
            &allergies,
            "M1",
            Some(&native_event("upsert", "emr", 1, "M1", "AL-9", Some(json!({ "code_system": "loinc", "code": "1" })))),
            None,
        )
        .await?,
    ));
    malformed.push((
        "mapping",
        send(&producer, &demo, "M3", Some(&native_event("upsert", "enrollment", 1, "M3", "M3", Some(json!({ "birth_date": "2023-02-30" })))), None)
            .await?,
    ));
    sent += 12;
    wait_applied(pool, &app.group, sent, Duration::from_secs(60)).await?;
    let first_m2 = db::composites::current_composite(pool, "M2").await?.expect("M2 composed");
    assert!(first_m2.body.is_some(), "M2 is live after phase 1");

    step("phase 2: a late older version, a redelivery, a Debezium delete, a member deleted");
    send(&producer, &meds, "M1", Some(&rx1_v1), None).await?;
    send(&producer, &meds, "M1", Some(&rx1_v2), None).await?;
    send(&producer, &meds, "M1", Some(&debezium("d", 900, rx2, false)), None).await?;
    send(&producer, &demo, "M2", Some(&native_event("delete", "enrollment", 2, "M2", "M2", None)), None).await?;
    sent += 4;
    wait_applied(pool, &app.group, sent, Duration::from_secs(60)).await?;
    let metrics = composer.metrics.clone();
    composer.stop().await?;
    assert_eq!(metrics.dead_letters(), 3);

    step("the composites, components and invariants");
    // M1: exactly the expected Bundle (meta and timestamp aside).
    let body = db::composites::current_composite(pool, "M1").await?.expect("M1 composed").body;
    let base = "http://fhir.test/fhir";
    let (ms1, al, im) =
        (id("MedicationStatement", "rx-claims", "RX-1"), id("AllergyIntolerance", "emr", "AL-1"), id("Immunization", "emr-cdc", "IM-1"));
    let expected = json!({
        "resourceType": "Bundle", "id": "M1", "type": "collection",
        "entry": [
            { "fullUrl": format!("{base}/Patient/M1"), "resource": {
                "resourceType": "Patient", "id": "M1", "meta": { "source": "urn:sor:enrollment" },
                "identifier": [{ "system": "urn:fhir-event-platform:member-id", "value": "M1" }],
                "name": [{ "family": "Lee", "given": ["Ann"] }],
                "telecom": [{ "system": "phone", "value": "617-555-0100" }],
                "gender": "female", "birthDate": "1980-02-29",
                "address": [{ "line": ["12 Elm Street"], "city": "Boston", "state": "MA", "postalCode": "02139" }] } },
            { "fullUrl": format!("{base}/MedicationStatement/{ms1}"), "resource": {
                "resourceType": "MedicationStatement", "id": ms1, "meta": { "source": "urn:sor:rx-claims" },
                "extension": [{ "url": "urn:fhir-event-platform:extension:days-supply", "valueInteger": 90 }],
                "identifier": [{ "system": "urn:sor:rx-claims", "value": "RX-1" }],
                "status": "active",
                "medicationCodeableConcept": { "coding": [{ "system": RXNORM, "code": "860975", "display": "metformin 500 MG Oral Tablet" }], "text": "metformin 500 MG Oral Tablet" },
                "subject": { "reference": "Patient/M1" } } },
            { "fullUrl": format!("{base}/AllergyIntolerance/{al}"), "resource": {
                "resourceType": "AllergyIntolerance", "id": al, "meta": { "source": "urn:sor:emr" },
                "identifier": [{ "system": "urn:sor:emr", "value": "AL-1" }],
                "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" }] },
                "criticality": "high",
                "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "91936005", "display": "Allergy to penicillin" }], "text": "Allergy to penicillin" },
                "patient": { "reference": "Patient/M1" } } },
            { "fullUrl": format!("{base}/Immunization/{im}"), "resource": {
                "resourceType": "Immunization", "id": im, "meta": { "source": "urn:sor:emr-cdc" },
                "identifier": [{ "system": "urn:sor:emr-cdc", "value": "IM-1" }],
                "status": "completed",
                "vaccineCode": { "coding": [{ "system": "http://hl7.org/fhir/sid/cvx", "code": "208" }] },
                "patient": { "reference": "Patient/M1" }, "occurrenceDateTime": "2021-04-01" } }
        ]
    });
    assert_eq!(content(&body.expect("live body"))?, expected);

    // M2: deleted, with a tombstone as its last version; M3 never existed (its only event was bad).
    let m2 = db::composites::current_composite(pool, "M2").await?.expect("M2 row kept");
    let (m2_version, m2_body) = (m2.version_id, m2.body);
    assert!(m2_body.is_none(), "M2 is deleted");
    assert_eq!(m2_version, first_m2.version_id + 1, "the delete is exactly one new version");
    assert!(db::composites::current_composite(pool, "M3").await?.is_none());

    // Components: every valid event's effect, stale and redelivered ones changed nothing.
    let components: HashMap<(String, String), (i64, bool)> =
        db::components::all_components(pool).await?.into_iter().map(|c| ((c.kind, c.record_id), (c.version, c.deleted))).collect();
    let expect = |kind: &str, record: &str, version: i64, deleted: bool| {
        assert_eq!(components.get(&(kind.to_owned(), record.to_owned())), Some(&(version, deleted)), "{kind} {record}");
    };
    expect("demographics", "M1", 1, false);
    expect("medication", "RX-1", 2, false);
    expect("medication", "RX-2", 900, true);
    expect("allergy", "AL-1", 3, false);
    expect("immunization", "IM-1", 700, false);
    expect("demographics", "M2", 2, true);
    expect("medication", "RX-9", 1, false);
    assert_eq!(components.len(), 7);

    let versions = check_composite_invariants(pool).await?;
    assert!(versions >= 3, "M1 at least once, M2 created then deleted");

    step("the dead letters");
    // Every malformed message is in the DLQ: same key and bytes, original headers, and headers
    // naming the reason, source topic, partition and offset.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("dlq"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&app.topic("sor.dlq.v1")])?;
    let mut dead = Vec::new();
    while dead.len() < malformed.len() {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await??;
        let headers: HashMap<String, String> = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
            .unwrap_or_default();
        dead.push((m.payload().map(<[u8]>::to_vec), headers));
    }
    assert!(tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await.is_err(), "only the malformed messages");
    for (reason, original) in &malformed {
        let found = dead.iter().find(|(value, h)| {
            value == &original.value
                && h.get("dlq.source.offset") == Some(&original.offset.to_string())
                && h.get("dlq.source.partition") == Some(&original.partition.to_string())
        });
        let (_, headers) = found.unwrap_or_else(|| panic!("{reason} message not in the DLQ"));
        assert_eq!(headers["dlq.reason"], *reason);
        assert_eq!(Some(headers["dlq.source.topic"].as_str()), app.kafka.contract_name(&original.topic));
        assert!(!headers["dlq.error"].is_empty());
        if *reason == "invalid-json" {
            assert_eq!(headers["trace"], "abc", "original headers are kept");
        }
        if *reason == "mapping" {
            assert!(headers["dlq.error"].contains("/birth_date") && !headers["dlq.error"].contains("2023"), "{}", headers["dlq.error"]);
        }
    }
    Ok(())
}

/// Two systems of record describe the same member: one Patient resource (id = member id) with
/// one version sequence. Before resource versions were counted per resource, the second
/// source's first version collided with the first source's in `resource_history`, and the
/// composer retried that batch forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demographics_sources_share_one_patient_history() -> anyhow::Result<()> {
    let app = TestApp::new("twosources").await?;
    let composer = app.composer(&[]).await?;
    let demo = |source: &str, version: i64, name: &str| {
        upsert(platform::topics::DEMOGRAPHICS, source, version, "M9", "M9", json!({ "given_name": name, "sex": "other" }))
    };
    for (i, message) in [demo("enrollment", 1, "Ann"), demo("crm", 1, "Anne"), demo("enrollment", 2, "Annie")].into_iter().enumerate() {
        app.publish(&[message]).await?;
        app.wait_applied(Duration::from_secs(30)).await.map_err(|e| anyhow::anyhow!("message {i}: {e}"))?;
    }
    composer.stop().await?;
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version_id FROM resource_history WHERE resource_type = 'Patient' AND resource_id = 'M9' ORDER BY version_id")
            .fetch_all(&app.pool)
            .await?;
    assert_eq!(versions, [1, 2, 3]);
    Ok(())
}

/// Only the changes that win on version claim their event ids, and an id applied before
/// changes nothing even when it comes back with a newer version: the record's next newest event
/// in the same batch wins instead. Batches are applied directly, so that these events share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_event_id_changes_nothing_and_the_next_newest_event_wins() -> anyhow::Result<()> {
    use composer::apply::{self as batch, Consumed};
    use schemas::RecordKind;
    let app = TestApp::new("reusedid").await?;
    let pool = &app.pool;
    let config = tests::components::composer_config(&app.url, &app.prefix, &app.group, &[])?;
    let composites = fhir::composites(&config.common)?;
    let contracts = schemas::Contracts::load()?;
    let event = |id: Uuid, kind: RecordKind, source: &str, version: i64, record: &str, data: Value| {
        let v = json!({ "event_id": id.to_string(), "op": "upsert", "source": source, "occurred_at": "2026-11-20T10:15:00Z",
            "version": version, "member_id": "M7", "record_id": record, "data": data });
        let outcome = batch::prepare(&contracts, kind, Some(b"M7"), Some(&serde_json::to_vec(&v).unwrap()), 262_144);
        Consumed { topic: "t".into(), partition: 0, offset: 0, outcome, trace: None }
    };
    let person = |name: &str| json!({ "given_name": name, "sex": "other" });
    let med = |status: &str| json!({ "rxnorm_code": "860975", "display": "metformin", "status": status });
    let (a, b, c, d) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());

    let first = [
        event(a, RecordKind::Demographics, "enrollment", 1, "M7", person("Ann")),
        event(b, RecordKind::Medication, "rx-claims", 2, "RX-1", med("active")),
        // Loses to version 2 in this batch: changes nothing and is not recorded.
        event(c, RecordKind::Medication, "rx-claims", 1, "RX-1", med("on-hold")),
    ];
    let applied = batch::apply(pool, "reusedid", &composites, None, &first, &[]).await?;
    assert_eq!((applied.components_written, applied.stale, applied.duplicates), (2, 1, 0));
    let recorded: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM applied_events ORDER BY applied_at, event_id").fetch_all(pool).await?;
    assert_eq!(recorded.len(), 2);
    assert!(recorded.contains(&a) && recorded.contains(&b) && !recorded.contains(&c));

    let second = [
        // Event id `b` again, now claiming version 4: a duplicate, ignored.
        event(b, RecordKind::Medication, "rx-claims", 4, "RX-1", med("stopped")),
        // So version 3 is the newest new change of RX-1.
        event(d, RecordKind::Medication, "rx-claims", 3, "RX-1", med("completed")),
    ];
    let applied = batch::apply(pool, "reusedid", &composites, None, &second, &[]).await?;
    assert_eq!((applied.components_written, applied.stale, applied.duplicates), (1, 0, 1));
    let (version, status): (i64, Option<String>) =
        sqlx::query_as("SELECT version, status FROM components WHERE kind = 'medication' AND record_id = 'RX-1'").fetch_one(pool).await?;
    assert_eq!((version, status.as_deref()), (3, Some("completed")));
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version_id FROM composite_history WHERE member_id = 'M7' ORDER BY version_id").fetch_all(pool).await?;
    assert_eq!(versions, [1, 2]);

    // The same batch delivered again: every event is stale or a duplicate.
    let applied = batch::apply(pool, "reusedid", &composites, None, &second, &[]).await?;
    assert_eq!((applied.components_written, applied.composite_versions), (0, 0));
    Ok(())
}
