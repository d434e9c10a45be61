//! Issue 8: partners write back what they learn at the point of care. A partner confirms one
//! medication, reports a new one, contradicts a third and reports an allergy; the composite, its
//! history, the Provenance resources and `partner.inbound.v1` show exactly that, each once.
//! Retries with `If-None-Exist` create nothing, stale `If-Match` gets 412, another partner's
//! member answers as one that does not exist, invalid resources get 422 naming the element,
//! and a later system-of-record event resolves the contradiction.

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tests::*;

const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const SNOMED: &str = "http://snomed.info/sct";
const REPORT: &str = "urn:fhir-event-platform:extension:partner-report";
const WRITE_SCOPES: &str = "system/*.read system/MedicationStatement.write system/AllergyIntolerance.write";
const IDS: &str = "urn:example:pa:statements";

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
/// The codes of the scenario: A, B and C by the pharmacy, D new from the partner.
const CODES: (&str, &str, &str, &str) = ("860975", "197361", "314076", "617314");

/// The write-back scenario's platform: a composer, a relay and an API over members W1 (served by
/// pa, which may write, and by ro, which may only read) and W2 (pb's).
struct Scene {
    app: TestApp,
    fhir: String,
    pa: reqwest::Client,
    ro: reqwest::Client,
    profile_url: String,
    /// W1's profile version before any write-back.
    v0: i64,
}

/// The ids of the resources pa created: confirming A, contradicting C, reporting D, the allergy.
struct Reported {
    a: String,
    c: String,
    d: String,
    allergy: String,
}

impl Scene {
    async fn start() -> anyhow::Result<(Scene, Composer, Task)> {
        let app = TestApp::new("writeback").await?;
        let composer = app.composer(&[]).await?;
        let relay = app.relay(&[]).await?;
        let (a, b, c, _) = CODES;
        app.apply(&[
            demographics("W1", json!({ "given_name": "Ada", "family_name": "Okafor", "sex": "female" })),
            medication("W1", "RX-A", 1, a, "active"),
            medication("W1", "RX-B", 1, b, "active"),
            medication("W1", "RX-C", 1, c, "active"),
            demographics("W2", json!({ "given_name": "Ada", "family_name": "Okafor", "sex": "female" })),
            medication("W2", "RX-W2", 1, a, "active"),
            attribution("W1", "pa"),
            attribution("W1", "ro"),
            attribution("W2", "pb"),
        ])
        .await?;
        let origin = app.api(&[]).await?;
        let fhir = format!("{origin}/fhir");
        let pa = bearer_client(&app.partner("pa", WRITE_SCOPES, KeyKind::Es384).await?.token_with(&origin, WRITE_SCOPES).await?)?;
        let ro = app.partner("ro", "system/*.read", KeyKind::Es384).await?.client(&origin).await?;
        let profile_url = format!("{fhir}/Patient/W1/$medication-profile");
        let Reply { body: before, .. } = send(pa.get(profile_url.as_str())).await?;
        let v0: i64 = before["meta"]["versionId"].as_str().unwrap_or_default().parse()?;
        Ok((Scene { app, fhir, pa, ro, profile_url, v0 }, composer, relay))
    }
}

/// W1's Provenance resources, as ro reads them.
async fn provenance(scene: &Scene) -> anyhow::Result<Reply> {
    send(scene.ro.get(format!("{}/Provenance?patient=W1", scene.fhir))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_write_back_confirmations_new_reports_and_contradictions_exactly_once() -> anyhow::Result<()> {
    let (scene, composer, relay) = Scene::start().await?;
    step("pa confirms A, reports D, contradicts C and reports an allergy");
    let (ids, meds) = report(&scene).await?;
    step("the reports are served, each version with its Provenance");
    served_with_provenance(&scene, &ids).await?;
    step("a retry creates nothing; partner.inbound.v1 carries each write once");
    retried_once_and_published_once(&scene, &ids).await?;
    step("updates need the current version, and only pa's own reports");
    updates_need_the_current_version(&scene, &ids, &meds).await?;
    step("refusals store nothing");
    refusals_store_nothing(&scene).await?;
    step("the pharmacy resolves the contradiction");
    the_pharmacy_resolves_the_contradiction(&scene, &ids).await?;
    relay.stop().await?;
    composer.stop().await
}

/// The composite after the four reports (one entry per code; A confirmed, C contradicted with
/// both facts kept, D listed) and its history (one version per write).
async fn report(scene: &Scene) -> anyhow::Result<(Reported, BTreeMap<String, Value>)> {
    let Scene { app, fhir, pa, profile_url, v0, .. } = scene;
    let (pool, v0) = (&app.pool, *v0);
    let (a, b, c, d) = CODES;
    // Confirm A, report D, contradict C, report an allergy.
    let confirm = statement("W1", a, "active", "S-A");
    let Reply { status: s, headers: h, body: confirmed, .. } =
        send(post_fhir(pa, &format!("{fhir}/MedicationStatement"), &confirm).header("If-None-Exist", format!("identifier={IDS}|S-A"))).await?;
    assert_eq!(s, 201, "{confirmed}");
    let id_a = confirmed["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(h["location"].to_str()?, format!("http://fhir.test/fhir/MedicationStatement/{id_a}/_history/1"));
    assert_eq!(h["etag"].to_str()?, "W/\"1\"");
    assert_eq!(confirmed["meta"]["source"], "urn:partner:pa");
    assert_eq!(confirmed["meta"]["versionId"], "1");
    assert_eq!(confirmed["note"][0]["text"], "reviewed with the member at home");
    let Reply { status: s, body: new, .. } =
        send(post_fhir(pa, &format!("{fhir}/MedicationStatement"), &statement("W1", d, "active", "S-D"))).await?;
    assert_eq!(s, 201, "{new}");
    let id_d = new["id"].as_str().unwrap_or_default().to_owned();
    let Reply { status: s, body: contradiction, .. } =
        send(post_fhir(pa, &format!("{fhir}/MedicationStatement"), &statement("W1", c, "stopped", "S-C"))).await?;
    assert_eq!(s, 201, "{contradiction}");
    let id_c = contradiction["id"].as_str().unwrap_or_default().to_owned();
    let allergy = json!({
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" }] },
        "code": { "coding": [{ "system": SNOMED, "code": "91936005", "display": "Allergy to penicillin" }] },
        "patient": { "reference": "Patient/W1" },
        "recordedDate": "2026-11-20"
    });
    let Reply { status: s, body: reported_allergy, .. } = send(post_fhir(pa, &format!("{fhir}/AllergyIntolerance"), &allergy)).await?;
    assert_eq!(s, 201, "{reported_allergy}");
    let id_allergy = reported_allergy["id"].as_str().unwrap_or_default().to_owned();

    // The composite: one entry per code; A confirmed, C contradicted (both facts), D listed.
    let Reply { status: s, body: profile, .. } = send(pa.get(profile_url.as_str())).await?;
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
    let history: Vec<_> = db::composites::all_history(pool).await?.into_iter().filter(|h| h.member_id == "W1").collect();
    assert_eq!(history.iter().map(|h| h.version_id).collect::<Vec<_>>(), (1..=v0 + 4).collect::<Vec<_>>());
    let at = |v: i64| -> anyhow::Result<Value> { Ok(serde_json::from_str(history[(v - 1) as usize].body.as_deref().unwrap_or("null"))?) };
    let first = medications(&at(v0 + 1)?)?;
    assert_eq!((reports(&first[a]).len(), first.len(), reports(&first[c]).len()), (1, 3, 0));
    assert_eq!(medications(&at(v0 + 2)?)?.len(), 4);
    assert_eq!(reports(&medications(&at(v0 + 3)?)?[c]).len(), 1);
    check_composite_invariants(pool).await?;
    Ok((Reported { a: id_a, c: id_c, d: id_d, allergy: id_allergy }, meds))
}

/// The partner's resources are served, and each version has its Provenance.
async fn served_with_provenance(scene: &Scene, ids: &Reported) -> anyhow::Result<()> {
    let Scene { fhir, ro, .. } = scene;
    let (_, _, c, _) = CODES;
    // The partner's resources are served, and each version has its Provenance.
    let Reply { status: s, body: read, .. } = send(ro.get(format!("{fhir}/MedicationStatement/{}", ids.c))).await?;
    assert_eq!((s, read["status"].as_str(), read["meta"]["source"].as_str()), (200, Some("stopped"), Some("urn:partner:pa")));
    let Reply { status: s, body: search, .. } = send(ro.get(format!("{fhir}/MedicationStatement?patient=W1&code={RXNORM}|{c}"))).await?;
    assert_eq!((s, search["total"].as_i64()), (200, Some(2)), "the pharmacy's and the partner's C: {search}");
    let Reply { status: s, body: prov, .. } = provenance(scene).await?;
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
        format!("MedicationStatement/{}/_history/1", ids.a),
        format!("MedicationStatement/{}/_history/1", ids.c),
        format!("MedicationStatement/{}/_history/1", ids.d),
        format!("AllergyIntolerance/{}/_history/1", ids.allergy),
    ]
    .into();
    assert_eq!(targets, expected_targets);
    Ok(())
}

/// A retry with If-None-Exist creates nothing, and `partner.inbound.v1` carries each write once.
async fn retried_once_and_published_once(scene: &Scene, ids: &Reported) -> anyhow::Result<()> {
    let Scene { fhir, pa, .. } = scene;
    let (a, _, _, _) = CODES;
    // A retry with If-None-Exist creates nothing and answers with the first one.
    let Reply { status: s, headers: h, body: again, .. } = send(
        post_fhir(pa, &format!("{fhir}/MedicationStatement"), &statement("W1", a, "active", "S-A"))
            .header("If-None-Exist", format!("identifier={IDS}|S-A")),
    )
    .await?;
    assert_eq!((s, again["id"].as_str(), h["etag"].to_str()?), (200, Some(ids.a.as_str()), "W/\"1\""));
    // The header must name an identifier the resource carries.
    let Reply { status: s, body: o, .. } = send(
        post_fhir(pa, &format!("{fhir}/MedicationStatement"), &statement("W1", a, "active", "S-A"))
            .header("If-None-Exist", format!("identifier={IDS}|S-other")),
    )
    .await?;
    assert_eq!((s, o["resourceType"].as_str()), (400, Some("OperationOutcome")));

    // Every message of partner.inbound.v1, once, with its headers.
    wait_relayed(&scene.app.pool, Duration::from_secs(30)).await?;
    let inbound = read_inbound(&scene.app.topic(platform::topics::PARTNER_INBOUND), 4).await?;
    assert_eq!(inbound.len(), 4, "{inbound:?}");
    let mut event_ids = BTreeSet::new();
    let mut traces = BTreeSet::new();
    for (m, (rt, id)) in inbound.iter().zip([
        ("MedicationStatement", &ids.a),
        ("MedicationStatement", &ids.d),
        ("MedicationStatement", &ids.c),
        ("AllergyIntolerance", &ids.allergy),
    ]) {
        schemas::check_partner_inbound(&m.value).map_err(anyhow::Error::msg)?;
        assert_eq!(m.key, "W1");
        assert_eq!((m.headers["partner_id"].as_str(), m.headers["resource_type"].as_str()), ("pa", rt));
        assert_eq!(m.headers["event_id"], m.value["event_id"].as_str().unwrap_or_default());
        assert!(event_ids.insert(m.headers["event_id"].clone()));
        // Each write's request trace (the API started one: the partner sent none).
        let trace = m.headers.get("traceparent").and_then(|t| platform::trace::TraceParent::parse(t)).map(|t| t.trace_id());
        assert!(trace.is_some_and(|t| traces.insert(t)), "a trace of its own: {:?}", m.headers);
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
    Ok(())
}

/// Optimistic concurrency: a missing If-Match is 428, a stale one 412; only pa's own reports.
async fn updates_need_the_current_version(scene: &Scene, ids: &Reported, meds: &BTreeMap<String, Value>) -> anyhow::Result<()> {
    let Scene { fhir, pa, .. } = scene;
    let (_, b, _, d) = CODES;
    // Update with optimistic concurrency: missing If-Match 428, stale 412, current 200.
    let mut changed = statement("W1", d, "on-hold", "S-D");
    changed["id"] = json!(ids.d);
    let put = |if_match: Option<&str>| {
        let mut r = pa.put(format!("{fhir}/MedicationStatement/{}", ids.d)).header("content-type", "application/fhir+json").body(changed.to_string());
        if let Some(m) = if_match {
            r = r.header("If-Match", m);
        }
        r
    };
    assert_eq!(send(put(None)).await?.status, 428);
    let Reply { status: s, body: stale, .. } = send(put(Some("W/\"7\""))).await?;
    assert_eq!((s, stale["resourceType"].as_str()), (412, Some("OperationOutcome")), "{stale}");
    let Reply { status: s, headers: h, body: updated, .. } = send(put(Some("W/\"1\""))).await?;
    assert_eq!((s, updated["meta"]["versionId"].as_str(), updated["status"].as_str()), (200, Some("2"), Some("on-hold")), "{updated}");
    assert_eq!(h["etag"].to_str()?, "W/\"2\"");
    assert_eq!(send(put(Some("W/\"1\""))).await?.status, 412, "the same If-Match again is now stale");
    // Only a partner's own reports can be updated.
    let sor_b = meds[b]["id"].as_str().unwrap_or_default().to_owned();
    let mut other = statement("W1", b, "stopped", "S-B");
    other["id"] = json!(sor_b);
    let Reply { status: s, body: o, .. } = send(
        pa.put(format!("{fhir}/MedicationStatement/{sor_b}"))
            .header("content-type", "application/fhir+json")
            .header("If-Match", "W/\"1\"")
            .body(other.to_string()),
    )
    .await?;
    assert_eq!((s, o["resourceType"].as_str()), (403, Some("OperationOutcome")), "{o}");
    Ok(())
}

/// Another partner's member, invalid resources, wrong media types, a read-only partner: refused,
/// and nothing stored or published.
async fn refusals_store_nothing(scene: &Scene) -> anyhow::Result<()> {
    let Scene { fhir, pa, ro, profile_url, v0, .. } = scene;
    let v0 = *v0;
    let (a, _, _, _) = CODES;
    // Another partner's member answers exactly as a member that does not exist.
    let Reply { status: s2, headers: h2, body: w2, .. } =
        send(post_fhir(pa, &format!("{fhir}/MedicationStatement"), &statement("W2", a, "active", "S-W2"))).await?;
    let Reply { status: s9, headers: h9, body: z9, .. } =
        send(post_fhir(pa, &format!("{fhir}/MedicationStatement"), &statement("ZZ9", a, "active", "S-ZZ9"))).await?;
    assert_eq!(s2, 404, "{w2}");
    assert_eq!((s2, w2.to_string().replace("W2", "ZZ9")), (s9, z9.to_string()));
    assert_eq!(h2.get("content-type"), h9.get("content-type"));

    // Invalid resources: 422 naming the element; nothing stored.
    // Each a valid statement with one thing wrong.
    let altered = |status: &str, edit: &dyn Fn(&mut Value)| {
        let mut v = statement("W1", a, status, "S-X");
        edit(&mut v);
        v
    };
    let refusals = [
        (
            "SNOMED-coded medication",
            altered("active", &|v| v["medicationCodeableConcept"]["coding"][0]["system"] = json!(SNOMED)),
            "MedicationStatement.medicationCodeableConcept.coding",
        ),
        ("impossible date", altered("active", &|v| v["dateAsserted"] = json!("2026-02-30")), "MedicationStatement.dateAsserted"),
        ("date in the future", altered("active", &|v| v["dateAsserted"] = json!("2035-01-01")), "MedicationStatement.dateAsserted"),
        (
            "unknown element",
            altered("active", &|v| v["dosage"] = json!([{ "text": "daily", "colour": "blue" }])),
            "MedicationStatement.dosage[0].colour",
        ),
        ("status outside the value set", altered("sometimes", &|v| v["status"] = json!("sometimes")), "MedicationStatement.status"),
        ("subject not a Patient", altered("active", &|v| v["subject"] = json!({ "reference": "Group/1" })), "MedicationStatement.subject"),
    ];
    for (what, body, expression) in refusals {
        let Reply { status: s, body: o, .. } = send(post_fhir(pa, &format!("{fhir}/MedicationStatement"), &body)).await?;
        assert_eq!(s, 422, "{what}: {o}");
        assert_eq!(o["issue"][0]["expression"][0], expression, "{what}: {o}");
    }
    let Reply { status: s, .. } =
        send(pa.post(format!("{fhir}/MedicationStatement")).header("content-type", "application/fhir+json").body("{not json")).await?;
    assert_eq!(s, 400);
    let Reply { status: s, .. } = send(
        pa.post(format!("{fhir}/MedicationStatement")).header("content-type", "text/plain").body(statement("W1", a, "active", "S-A").to_string()),
    )
    .await?;
    assert_eq!(s, 415);
    let Reply { status: s, headers: h, .. } =
        send(post_fhir(ro, &format!("{fhir}/MedicationStatement"), &statement("W1", a, "active", "S-RO"))).await?;
    assert_eq!(s, 403, "a read-only partner cannot write");
    assert!(h.contains_key("www-authenticate"));
    let prov = provenance(scene).await?.body;
    assert_eq!(prov["total"].as_i64(), Some(5), "four creates and one update, nothing from refusals or the retry");
    let Reply { body: profile, .. } = send(pa.get(profile_url.as_str())).await?;
    assert_eq!(profile["meta"]["versionId"], (v0 + 5).to_string(), "the update changed the composite once");
    wait_relayed(&scene.app.pool, Duration::from_secs(30)).await?;
    let inbound = read_inbound(&scene.app.topic(platform::topics::PARTNER_INBOUND), 5).await?;
    assert_eq!(inbound.len(), 5);
    assert_eq!((inbound[4].value["interaction"].as_str(), inbound[4].value["version_id"].as_i64()), (Some("update"), Some(2)));
    Ok(())
}

/// The pharmacy then says C was stopped: the contradiction resolves into a confirmation.
async fn the_pharmacy_resolves_the_contradiction(scene: &Scene, ids: &Reported) -> anyhow::Result<()> {
    let Scene { pa, profile_url, v0, .. } = scene;
    let v0 = *v0;
    let (_, _, c, _) = CODES;
    // The pharmacy then says C was stopped: the contradiction resolves into a confirmation.
    scene.app.publish(&[medication("W1", "RX-C", 2, c, "stopped")]).await?;
    let profile = eventually(Duration::from_secs(30), "the composite follows the pharmacy", || async {
        let Reply { body: p, .. } = send(pa.get(profile_url.as_str())).await?;
        Ok((p["meta"]["versionId"] == (v0 + 6).to_string()).then_some(p))
    })
    .await?;
    let meds = medications(&profile)?;
    assert_eq!(meds[c]["status"], "stopped");
    assert_eq!(reports(&meds[c]), [("confirmed".into(), "pa".into(), "stopped".into(), format!("MedicationStatement/{}", ids.c))]);
    Ok(())
}
