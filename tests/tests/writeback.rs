//! Issue 8: partners write back what they learn at the point of care. A partner confirms one
//! medication, reports a new one, contradicts a third and reports an allergy; the composite, its
//! history, the Provenance resources and `partner.inbound.v1` show exactly that, each once.
//! Retries with `If-None-Exist` create nothing, stale `If-Match` gets 412, another partner's
//! member answers as one that does not exist, invalid resources get 422 naming the element,
//! and a later system-of-record event resolves the contradiction.

use devtools::generator;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tests::*;

const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const SNOMED: &str = "http://snomed.info/sct";
const REPORT: &str = "urn:fhir-event-platform:extension:partner-report";
const WRITE_SCOPES: &str = "system/*.read system/MedicationStatement.write system/AllergyIntolerance.write";
const IDS: &str = "urn:example:pa:statements";

type Reply = (u16, reqwest::header::HeaderMap, Value);

async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
    let r = request.send().await?;
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await?;
    Ok((status, headers, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) }))
}

fn post(client: &reqwest::Client, url: String, body: &Value) -> reqwest::RequestBuilder {
    client.post(url).header("content-type", "application/fhir+json").body(body.to_string())
}

fn statement(member: &str, code: &str, status: &str, identifier: &str) -> Value {
    json!({
        "resourceType": "MedicationStatement",
        "identifier": [{ "system": IDS, "value": identifier }],
        "status": status,
        "medicationCodeableConcept": { "coding": [{ "system": RXNORM, "code": code }] },
        "subject": { "reference": format!("Patient/{member}") },
        "dateAsserted": "2026-11-20",
        "note": [{ "text": "reviewed with the member at home" }]
    })
}

/// A message of `partner.inbound.v1` as read back.
#[derive(Debug)]
struct Inbound {
    key: String,
    headers: BTreeMap<String, String>,
    value: Value,
}

async fn read_inbound(topic: &str, expected: usize) -> anyhow::Result<Vec<Inbound>> {
    read_topic(topic, expected)
        .await?
        .into_iter()
        .map(|r| Ok(Inbound { value: serde_json::from_slice(r.value.as_deref().unwrap_or_default())?, key: r.key, headers: r.headers }))
        .collect()
}

/// The MedicationStatement entries of a profile: code → (entry resource).
fn medications(profile: &Value) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut by_code = BTreeMap::new();
    for e in profile["entry"].as_array().into_iter().flatten() {
        let r = &e["resource"];
        if r["resourceType"] != "MedicationStatement" {
            continue;
        }
        let code = r["medicationCodeableConcept"]["coding"][0]["code"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(by_code.insert(code.clone(), r.clone()).is_none(), "code {code} is listed twice");
    }
    Ok(by_code)
}

/// The partner-report extensions of an entry: (assessment, partner, status, report reference).
fn reports(entry: &Value) -> Vec<(String, String, String, String)> {
    entry["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["url"] == REPORT)
        .map(|x| {
            let part = |name: &str| x["extension"].as_array().into_iter().flatten().find(|p| p["url"] == name).cloned().unwrap_or(Value::Null);
            (
                part("assessment")["valueCode"].as_str().unwrap_or_default().to_owned(),
                part("partner")["valueIdentifier"]["value"].as_str().unwrap_or_default().to_owned(),
                part("status")["valueCode"].as_str().unwrap_or_default().to_owned(),
                part("report")["valueReference"]["reference"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_write_back_confirmations_new_reports_and_contradictions_exactly_once() -> anyhow::Result<()> {
    let (url, pool) = fresh_database("writeback", true).await?;
    let prefix = format!("{}.", unique("writeback"));
    let kafka = kafka_config(&prefix);
    let (stop, _metrics, thread) = composer::spawn(composer_config(&url, &prefix, "writeback")).await?;
    let (relay_stop, relay) = start_relay(&url, &prefix).await?;
    let producer = generator::producer(&kafka)?;

    // W1 (served by pa, and by ro, which may only read) takes A, B and C by the pharmacy; W2 is pb's.
    let (a, b, c, d) = ("860975", "197361", "314076", "617314");
    let stream = vec![
        demographics("W1", json!({ "given_name": "Ada", "family_name": "Okafor", "sex": "female" })),
        medication("W1", "RX-A", 1, a, "active"),
        medication("W1", "RX-B", 1, b, "active"),
        medication("W1", "RX-C", 1, c, "active"),
        demographics("W2", json!({ "given_name": "Ada", "family_name": "Okafor", "sex": "female" })),
        medication("W2", "RX-W2", 1, a, "active"),
        attribution("W1", "pa"),
        attribution("W1", "ro"),
        attribution("W2", "pb"),
    ];
    generator::publish(&producer, &kafka, &stream).await?;
    wait_applied(&pool, "writeback", stream.len(), Duration::from_secs(60)).await?;

    let origin = start_api(&url, "http://fhir.test/fhir").await?;
    let fhir = format!("{origin}/fhir");
    let pa_partner = register_partner(&pool, "pa", WRITE_SCOPES, KeyKind::Es384, None).await?;
    let pa = bearer_client(&pa_partner.token_with(&origin, WRITE_SCOPES).await?)?;
    let reader = register_partner(&pool, "ro", "system/*.read", KeyKind::Es384, None).await?;
    let ro = reader.client(&origin).await?;
    let profile_url = format!("{fhir}/Patient/W1/$medication-profile");
    let (_, _, before) = send(pa.get(&profile_url)).await?;
    let v0: i64 = before["meta"]["versionId"].as_str().unwrap_or_default().parse()?;

    // Confirm A, report D, contradict C, report an allergy.
    let confirm = statement("W1", a, "active", "S-A");
    let (s, h, confirmed) =
        send(post(&pa, format!("{fhir}/MedicationStatement"), &confirm).header("If-None-Exist", format!("identifier={IDS}|S-A"))).await?;
    assert_eq!(s, 201, "{confirmed}");
    let id_a = confirmed["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(h["location"].to_str()?, format!("http://fhir.test/fhir/MedicationStatement/{id_a}/_history/1"));
    assert_eq!(h["etag"].to_str()?, "W/\"1\"");
    assert_eq!(confirmed["meta"]["source"], "urn:partner:pa");
    assert_eq!(confirmed["meta"]["versionId"], "1");
    assert_eq!(confirmed["note"][0]["text"], "reviewed with the member at home");
    let (s, _, new) = send(post(&pa, format!("{fhir}/MedicationStatement"), &statement("W1", d, "active", "S-D"))).await?;
    assert_eq!(s, 201, "{new}");
    let id_d = new["id"].as_str().unwrap_or_default().to_owned();
    let (s, _, contradiction) = send(post(&pa, format!("{fhir}/MedicationStatement"), &statement("W1", c, "stopped", "S-C"))).await?;
    assert_eq!(s, 201, "{contradiction}");
    let id_c = contradiction["id"].as_str().unwrap_or_default().to_owned();
    let allergy = json!({
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" }] },
        "code": { "coding": [{ "system": SNOMED, "code": "91936005", "display": "Allergy to penicillin" }] },
        "patient": { "reference": "Patient/W1" },
        "recordedDate": "2026-11-20"
    });
    let (s, _, reported_allergy) = send(post(&pa, format!("{fhir}/AllergyIntolerance"), &allergy)).await?;
    assert_eq!(s, 201, "{reported_allergy}");
    let id_allergy = reported_allergy["id"].as_str().unwrap_or_default().to_owned();

    // The composite: one entry per code; A confirmed, C contradicted (both facts), D listed.
    let (s, _, profile) = send(pa.get(&profile_url)).await?;
    assert_eq!(s, 200);
    assert_eq!(profile["meta"]["versionId"], (v0 + 4).to_string());
    let meds = medications(&profile)?;
    assert_eq!(
        meds.keys().map(String::as_str).collect::<Vec<_>>(),
        [b, a, c, d].into_iter().collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>()
    );
    assert_eq!(meds[a]["meta"]["source"], "urn:sor:rx-claims");
    assert_eq!(reports(&meds[a]), [("confirmed".into(), "pa".into(), "active".into(), format!("MedicationStatement/{id_a}"))]);
    assert_eq!(meds[c]["status"], "active", "the pharmacy's fact stays");
    assert_eq!(reports(&meds[c]), [("contradicted".into(), "pa".into(), "stopped".into(), format!("MedicationStatement/{id_c}"))]);
    assert!(reports(&meds[b]).is_empty());
    assert_eq!((meds[d]["id"].as_str(), meds[d]["meta"]["source"].as_str()), (Some(id_d.as_str()), Some("urn:partner:pa")));
    let allergies: Vec<&Value> =
        profile["entry"].as_array().into_iter().flatten().filter(|e| e["resource"]["resourceType"] == "AllergyIntolerance").collect();
    assert_eq!(allergies.len(), 1);
    assert_eq!(allergies[0]["resource"]["id"], id_allergy.as_str());
    let parsed = fhir::mapping::parse_bundle(&profile.to_string()).map_err(anyhow::Error::msg)?;
    assert_eq!(parsed.entry.len(), 6);

    // Its history: one version per write, each adding exactly its report.
    let history: Vec<_> = db::composer::all_history(&pool).await?.into_iter().filter(|h| h.member_id == "W1").collect();
    assert_eq!(history.iter().map(|h| h.version_id).collect::<Vec<_>>(), (1..=v0 + 4).collect::<Vec<_>>());
    let at = |v: i64| -> anyhow::Result<Value> { Ok(serde_json::from_str(history[(v - 1) as usize].body.as_deref().unwrap_or("null"))?) };
    let first = medications(&at(v0 + 1)?)?;
    assert_eq!((reports(&first[a]).len(), first.len(), reports(&first[c]).len()), (1, 3, 0));
    assert_eq!(medications(&at(v0 + 2)?)?.len(), 4);
    assert_eq!(reports(&medications(&at(v0 + 3)?)?[c]).len(), 1);
    check_composite_invariants(&pool).await?;

    // The partner's resources are served, and each version has its Provenance.
    let (s, _, read) = send(ro.get(format!("{fhir}/MedicationStatement/{id_c}"))).await?;
    assert_eq!((s, read["status"].as_str(), read["meta"]["source"].as_str()), (200, Some("stopped"), Some("urn:partner:pa")));
    let (s, _, search) = send(ro.get(format!("{fhir}/MedicationStatement?patient=W1&code={RXNORM}|{c}"))).await?;
    assert_eq!((s, search["total"].as_i64()), (200, Some(2)), "the pharmacy's and the partner's C: {search}");
    let provenance = |client: reqwest::Client| {
        let url = format!("{fhir}/Provenance?patient=W1");
        async move { send(client.get(url)).await }
    };
    let (s, _, prov) = provenance(ro.clone()).await?;
    assert_eq!((s, prov["total"].as_i64()), (200, Some(4)), "{prov}");
    let mut targets = BTreeSet::new();
    for e in prov["entry"].as_array().into_iter().flatten() {
        let p = &e["resource"];
        assert_eq!(p["agent"][0]["who"]["identifier"]["value"], "pa");
        assert_eq!(p["agent"][0]["type"]["coding"][0]["code"], "author");
        assert_eq!(p["activity"]["coding"][0]["code"], "CREATE");
        targets.insert(p["target"][0]["reference"].as_str().unwrap_or_default().to_owned());
    }
    let expected_targets: BTreeSet<String> = [
        format!("MedicationStatement/{id_a}/_history/1"),
        format!("MedicationStatement/{id_c}/_history/1"),
        format!("MedicationStatement/{id_d}/_history/1"),
        format!("AllergyIntolerance/{id_allergy}/_history/1"),
    ]
    .into();
    assert_eq!(targets, expected_targets);

    // A retry with If-None-Exist creates nothing and answers with the first one.
    let (s, h, again) =
        send(post(&pa, format!("{fhir}/MedicationStatement"), &confirm).header("If-None-Exist", format!("identifier={IDS}|S-A"))).await?;
    assert_eq!((s, again["id"].as_str(), h["etag"].to_str()?), (200, Some(id_a.as_str()), "W/\"1\""));
    // The header must name an identifier the resource carries.
    let (s, _, o) =
        send(post(&pa, format!("{fhir}/MedicationStatement"), &confirm).header("If-None-Exist", format!("identifier={IDS}|S-other"))).await?;
    assert_eq!((s, o["resourceType"].as_str()), (400, Some("OperationOutcome")));

    // Every message of partner.inbound.v1, once, with its headers.
    let drained = || async {
        eventually(Duration::from_secs(30), "the relay drains the outbox", || async {
            Ok((db::relay::backlog(&pool, time::OffsetDateTime::now_utc().date()).await?.0 == 0).then_some(()))
        })
        .await
    };
    drained().await?;
    let inbound_topic = format!("{prefix}{}", platform::topics::PARTNER_INBOUND);
    let inbound = read_inbound(&inbound_topic, 4).await?;
    assert_eq!(inbound.len(), 4, "{inbound:?}");
    let mut event_ids = BTreeSet::new();
    for (m, (rt, id)) in inbound.iter().zip([
        ("MedicationStatement", &id_a),
        ("MedicationStatement", &id_d),
        ("MedicationStatement", &id_c),
        ("AllergyIntolerance", &id_allergy),
    ]) {
        schemas::check_partner_inbound(&m.value).map_err(anyhow::Error::msg)?;
        assert_eq!(m.key, "W1");
        assert_eq!((m.headers["partner_id"].as_str(), m.headers["resource_type"].as_str()), ("pa", rt));
        assert_eq!(m.headers["event_id"], m.value["event_id"].as_str().unwrap_or_default());
        assert!(event_ids.insert(m.headers["event_id"].clone()));
        assert_eq!((m.value["resource_id"].as_str(), m.value["interaction"].as_str()), (Some(id.as_str()), Some("create")));
        assert_eq!(m.value["resource"]["meta"]["versionId"], "1");
    }
    let assessments = |m: &Inbound| {
        m.value["reconciliation"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| (r["record_id"].as_str().unwrap_or_default().to_owned(), r["assessment"].as_str().unwrap_or_default().to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(assessments(&inbound[0]), [("RX-A".to_owned(), "confirmed".to_owned())]);
    assert!(assessments(&inbound[1]).is_empty());
    assert_eq!(assessments(&inbound[2]), [("RX-C".to_owned(), "contradicted".to_owned())]);

    // Update with optimistic concurrency: missing If-Match 428, stale 412, current 200.
    let mut changed = statement("W1", d, "on-hold", "S-D");
    changed["id"] = json!(id_d);
    let put = |if_match: Option<&str>| {
        let mut r = pa.put(format!("{fhir}/MedicationStatement/{id_d}")).header("content-type", "application/fhir+json").body(changed.to_string());
        if let Some(m) = if_match {
            r = r.header("If-Match", m);
        }
        r
    };
    assert_eq!(send(put(None)).await?.0, 428);
    let (s, _, stale) = send(put(Some("W/\"7\""))).await?;
    assert_eq!((s, stale["resourceType"].as_str()), (412, Some("OperationOutcome")), "{stale}");
    let (s, h, updated) = send(put(Some("W/\"1\""))).await?;
    assert_eq!((s, updated["meta"]["versionId"].as_str(), updated["status"].as_str()), (200, Some("2"), Some("on-hold")), "{updated}");
    assert_eq!(h["etag"].to_str()?, "W/\"2\"");
    assert_eq!(send(put(Some("W/\"1\""))).await?.0, 412, "the same If-Match again is now stale");
    // Only a partner's own reports can be updated.
    let sor_b = meds[b]["id"].as_str().unwrap_or_default().to_owned();
    let mut other = statement("W1", b, "stopped", "S-B");
    other["id"] = json!(sor_b);
    let (s, _, o) = send(
        pa.put(format!("{fhir}/MedicationStatement/{sor_b}"))
            .header("content-type", "application/fhir+json")
            .header("If-Match", "W/\"1\"")
            .body(other.to_string()),
    )
    .await?;
    assert_eq!((s, o["resourceType"].as_str()), (403, Some("OperationOutcome")), "{o}");

    // Another partner's member answers exactly as a member that does not exist.
    let (s2, h2, w2) = send(post(&pa, format!("{fhir}/MedicationStatement"), &statement("W2", a, "active", "S-W2"))).await?;
    let (s9, h9, z9) = send(post(&pa, format!("{fhir}/MedicationStatement"), &statement("ZZ9", a, "active", "S-ZZ9"))).await?;
    assert_eq!(s2, 404, "{w2}");
    assert_eq!((s2, w2.to_string().replace("W2", "ZZ9")), (s9, z9.to_string()));
    assert_eq!(h2.get("content-type"), h9.get("content-type"));

    // Invalid resources: 422 naming the element; nothing stored.
    let refusals = [
        (
            "SNOMED-coded medication",
            {
                let mut v = statement("W1", a, "active", "S-X");
                v["medicationCodeableConcept"]["coding"][0]["system"] = json!(SNOMED);
                v
            },
            "MedicationStatement.medicationCodeableConcept.coding",
        ),
        (
            "impossible date",
            {
                let mut v = statement("W1", a, "active", "S-X");
                v["dateAsserted"] = json!("2026-02-30");
                v
            },
            "MedicationStatement.dateAsserted",
        ),
        (
            "date in the future",
            {
                let mut v = statement("W1", a, "active", "S-X");
                v["dateAsserted"] = json!("2035-01-01");
                v
            },
            "MedicationStatement.dateAsserted",
        ),
        (
            "unknown element",
            {
                let mut v = statement("W1", a, "active", "S-X");
                v["dosage"] = json!([{ "text": "daily", "colour": "blue" }]);
                v
            },
            "MedicationStatement.dosage[0].colour",
        ),
        (
            "status outside the value set",
            {
                let mut v = statement("W1", a, "sometimes", "S-X");
                v["status"] = json!("sometimes");
                v
            },
            "MedicationStatement.status",
        ),
        (
            "subject not a Patient",
            {
                let mut v = statement("W1", a, "active", "S-X");
                v["subject"] = json!({ "reference": "Group/1" });
                v
            },
            "MedicationStatement.subject",
        ),
    ];
    for (what, body, expression) in refusals {
        let (s, _, o) = send(post(&pa, format!("{fhir}/MedicationStatement"), &body)).await?;
        assert_eq!(s, 422, "{what}: {o}");
        assert_eq!(o["issue"][0]["expression"][0], expression, "{what}: {o}");
    }
    let (s, _, _) = send(pa.post(format!("{fhir}/MedicationStatement")).header("content-type", "application/fhir+json").body("{not json")).await?;
    assert_eq!(s, 400);
    let (s, _, _) = send(pa.post(format!("{fhir}/MedicationStatement")).header("content-type", "text/plain").body(confirm.to_string())).await?;
    assert_eq!(s, 415);
    let (s, h, _) = send(post(&ro, format!("{fhir}/MedicationStatement"), &statement("W1", a, "active", "S-RO"))).await?;
    assert_eq!(s, 403, "a read-only partner cannot write");
    assert!(h.contains_key("www-authenticate"));
    let (_, _, prov) = provenance(ro.clone()).await?;
    assert_eq!(prov["total"].as_i64(), Some(5), "four creates and one update, nothing from refusals or the retry");
    let (_, _, profile) = send(pa.get(&profile_url)).await?;
    assert_eq!(profile["meta"]["versionId"], (v0 + 5).to_string(), "the update changed the composite once");
    drained().await?;
    let inbound = read_inbound(&inbound_topic, 5).await?;
    assert_eq!(inbound.len(), 5);
    assert_eq!((inbound[4].value["interaction"].as_str(), inbound[4].value["version_id"].as_i64()), (Some("update"), Some(2)));

    // The pharmacy then says C was stopped: the contradiction resolves into a confirmation.
    generator::publish(&producer, &kafka, &[medication("W1", "RX-C", 2, c, "stopped")]).await?;
    let profile = eventually(Duration::from_secs(30), "the composite follows the pharmacy", || async {
        let (_, _, p) = send(pa.get(&profile_url)).await?;
        Ok((p["meta"]["versionId"] == (v0 + 6).to_string()).then_some(p))
    })
    .await?;
    let meds = medications(&profile)?;
    assert_eq!(meds[c]["status"], "stopped");
    assert_eq!(reports(&meds[c]), [("confirmed".into(), "pa".into(), "stopped".into(), format!("MedicationStatement/{id_c}"))]);

    relay_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    relay.await??;
    composer::stop(&stop, thread).await
}
