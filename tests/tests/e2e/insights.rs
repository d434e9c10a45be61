//! Issue 28 (insights): a member goes through warfarin → aspirin added (interaction) → aspirin
//! stopped (cancelled) → two strengths of simvastatin (duplicate therapy) → a penicillin
//! allergy and amoxicillin (allergy alert) → the warfarin supply lapses as time passes (refill
//! gap, with no event) → a new fill (cancelled). Each step is checked on the API (search, read,
//! vread, history, `$medication-profile`), on `fhir.insights.v1` and the partner's insights
//! topic (every version once, in order), and on a rest-hook subscription to the insights topic
//! filtered to high severity. Another partner's member stays out of sight; an unknown product
//! gives no insight and is counted.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use devtools::generator::SorMessage;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tests::*;

const M: &str = "M2800001";
const OTHER: &str = "M2800002";
const WARFARIN: &str = "855332";
const ASPIRIN: &str = "1191";
const SIMVA_20: &str = "312961";
const SIMVA_40: &str = "198211";
const AMOXICILLIN: &str = "308182";
const PENICILLIN_ALLERGY: &str = "91936005";
const SCOPES: &str = "system/*.read system/Subscription.write system/MedicationStatement.write";

fn day(offset: i64) -> String {
    (time::OffsetDateTime::now_utc().date() + time::Duration::days(offset)).to_string()
}

fn med(member: &str, record: &str, version: i64, code: &str, status: &str, fill: Option<(String, i64)>) -> SorMessage {
    let mut data = json!({ "rxnorm_code": code, "status": status });
    if let Some((date, days)) = fill {
        data["last_fill_date"] = json!(date);
        data["days_supply"] = json!(days);
    }
    upsert(platform::topics::MEDICATIONS, "rx-claims", version, member, record, data)
}

/// (code, status, severity) of each DetectedIssue, sorted.
type Findings = Vec<(String, String, String)>;

fn findings<'a>(resources: impl Iterator<Item = &'a Value>) -> Findings {
    let mut out: Findings = resources
        .filter(|r| r["resourceType"] == "DetectedIssue")
        .map(|r| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (text(&r["code"]["coding"][0]["code"]), text(&r["status"]), text(&r["severity"]))
        })
        .collect();
    out.sort();
    out
}

fn f(items: &[(&str, &str, &str)]) -> Findings {
    let mut v: Findings = items.iter().map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into())).collect();
    v.sort();
    v
}

/// A rest-hook endpoint that keeps the notifications it gets.
#[derive(Clone, Default)]
struct Hook(Arc<Mutex<Vec<Value>>>);

async fn receive(State(h): State<Hook>, body: Bytes) -> StatusCode {
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        h.0.lock().unwrap().push(v);
    }
    StatusCode::OK
}

impl Hook {
    async fn start() -> anyhow::Result<(Hook, u16)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let hook = Hook::default();
        let app = axum::Router::new().fallback(axum::routing::post(receive)).with_state(hook.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((hook, port))
    }

    /// The focus of every event notified so far, in order: (`DetectedIssue/<id>/_history/<v>`).
    fn foci(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in self.0.lock().unwrap().iter() {
            let status = &n["entry"][0]["resource"];
            if status["type"] != "event-notification" {
                continue;
            }
            for e in status["notificationEvent"].as_array().into_iter().flatten() {
                out.push(e["focus"]["reference"].as_str().unwrap_or_default().to_owned());
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insights_follow_the_medication_profile_on_every_path() -> anyhow::Result<()> {
    let app = TestApp::new("insights").await?;
    let composer = app.composer(&[]).await?;
    let relay = app.relay(&[]).await?;
    // The subscriber listens on loopback, which a deployment refuses.
    let notifier = app.notifier(&["--allowed-networks", "127.0.0.0/8"]).await?;
    let origin = app.api(&["--subscription-allow-http", "--subscription-allowed-networks", "127.0.0.0/8"]).await?;
    let fhir = format!("{origin}/fhir");
    let partner = app.partner("pins", SCOPES, KeyKind::Es384).await?;
    let client = bearer_client(&partner.token_with(&origin, SCOPES).await?)?;

    // The partner subscribes to insights about its members, high severity only.
    let (hook, port) = Hook::start().await?;
    let subscription = json!({
        "resourceType": "Subscription", "status": "requested", "reason": "high-severity insights",
        "criteria": fhir::subscriptions::INSIGHTS_TOPIC_URL,
        "_criteria": { "extension": [{ "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
                                         "valueString": "DetectedIssue?severity=high" }] },
        "channel": { "type": "rest-hook", "endpoint": format!("http://127.0.0.1:{port}/hook"), "payload": "application/fhir+json",
                     "_payload": { "extension": [{ "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content", "valueCode": "id-only" }] },
                     "extension": [{ "url": "urn:fhir-event-platform:extension:signing-secret", "valueString": "5e".repeat(32) }] }
    });
    let created = send(post_fhir(&client, &format!("{fhir}/Subscription"), &subscription)).await?;
    anyhow::ensure!(created.status == 201, "subscription: {} {}", created.status, created.body);

    let search = |query: String| {
        let (client, fhir) = (client.clone(), fhir.clone());
        async move {
            let reply = get(&client, &format!("{fhir}/DetectedIssue?{query}")).await?;
            anyhow::ensure!(reply.status == 200, "search {query}: {}", reply.body);
            Ok::<Vec<Value>, anyhow::Error>(
                reply.body["entry"].as_array().cloned().unwrap_or_default().into_iter().map(|e| e["resource"].clone()).collect(),
            )
        }
    };
    let profile = || {
        let (client, fhir) = (client.clone(), fhir.clone());
        async move {
            let reply = get(&client, &format!("{fhir}/Patient/{M}/$medication-profile")).await?;
            anyhow::ensure!(reply.status == 200, "profile: {}", reply.body);
            Ok::<Value, anyhow::Error>(reply.body)
        }
    };
    // After each step: what the API's search and the profile show.
    let expect = |all: Findings, open: Findings| {
        let (search, profile) = (search.clone(), profile.clone());
        async move {
            let found = search(format!("patient={M}&_count=50")).await?;
            anyhow::ensure!(findings(found.iter()) == all, "search: {:?}, expected {all:?}", findings(found.iter()));
            let p = profile().await?;
            let listed = findings(p["entry"].as_array().into_iter().flatten().map(|e| &e["resource"]));
            anyhow::ensure!(listed == open, "profile: {listed:?}, expected {open:?}");
            Ok::<Vec<Value>, anyhow::Error>(found)
        }
    };

    step("warfarin (filled 20 days ago for 30 days), an unknown product, another partner's member");
    app.apply(&[
        attribution(M, "pins"),
        attribution(OTHER, "pother"),
        demographics(M, json!({ "given_name": "Ines", "family_name": "Sight", "birth_date": "1950-02-03", "sex": "female" })),
        demographics(OTHER, json!({ "given_name": "Otto", "family_name": "Side", "birth_date": "1951-03-04", "sex": "male" })),
        med(M, "RX-W", 1, WARFARIN, "active", Some((day(-20), 30))),
        med(M, "RX-X", 1, "999999001", "active", None),
        med(OTHER, "RX-OW", 1, WARFARIN, "active", None),
        med(OTHER, "RX-OA", 1, ASPIRIN, "active", None),
    ])
    .await?;
    expect(f(&[]), f(&[])).await?;
    anyhow::ensure!(composer.metrics.unknown_products.get() >= 1, "the unknown product is counted");
    anyhow::ensure!(search(format!("patient={OTHER}")).await?.is_empty(), "another partner's member's insight is out of sight");

    step("aspirin added: a high-severity interaction");
    app.apply(&[med(M, "RX-A", 1, ASPIRIN, "active", None)]).await?;
    let found = expect(f(&[("DRG", "final", "high")]), f(&[("DRG", "final", "high")])).await?;
    let drg = found[0]["id"].as_str().unwrap_or_default().to_owned();
    let implicated: BTreeSet<&str> = found[0]["implicated"].as_array().into_iter().flatten().filter_map(|r| r["reference"].as_str()).collect();
    anyhow::ensure!(implicated.len() == 2 && implicated.iter().all(|r| r.starts_with("MedicationStatement/")), "{implicated:?}");
    let read = get(&client, &format!("{fhir}/DetectedIssue/{drg}")).await?;
    anyhow::ensure!(read.status == 200 && read.body["meta"]["versionId"] == "1", "read: {}", read.body);
    anyhow::ensure!(read.body["patient"]["reference"] == format!("Patient/{M}"));
    anyhow::ensure!(read.body["extension"][0]["valueString"].as_str().is_some_and(|v| !v.is_empty()), "the knowledge base version is on it");
    anyhow::ensure!(search("code=DRG&status=final".into()).await?.len() == 1);

    step("aspirin stopped: the interaction is cancelled, a new version");
    app.apply(&[med(M, "RX-A", 2, ASPIRIN, "stopped", None)]).await?;
    expect(f(&[("DRG", "cancelled", "high")]), f(&[])).await?;
    let history = get(&client, &format!("{fhir}/DetectedIssue/{drg}/_history")).await?;
    anyhow::ensure!(history.body["total"] == 2, "history: {}", history.body);
    let v1 = get(&client, &format!("{fhir}/DetectedIssue/{drg}/_history/1")).await?;
    let v2 = get(&client, &format!("{fhir}/DetectedIssue/{drg}/_history/2")).await?;
    anyhow::ensure!(v1.body["status"] == "final" && v2.body["status"] == "cancelled", "vread: {} / {}", v1.body, v2.body);
    anyhow::ensure!(v1.body["identifiedDateTime"] == v2.body["identifiedDateTime"], "identified stays");

    step("simvastatin 20 and 40: duplicate therapy");
    app.apply(&[med(M, "RX-S20", 1, SIMVA_20, "active", None), med(M, "RX-S40", 1, SIMVA_40, "active", None)]).await?;
    expect(f(&[("DRG", "cancelled", "high"), ("DUPTHPY", "final", "moderate")]), f(&[("DUPTHPY", "final", "moderate")])).await?;

    step("a penicillin allergy and amoxicillin: an allergy alert");
    app.apply(&[
        upsert(
            platform::topics::ALLERGIES,
            "emr",
            1,
            M,
            "AL-PEN",
            json!({ "code_system": "snomed", "code": PENICILLIN_ALLERGY,
            "display": "Allergy to penicillin", "clinical_status": "active", "criticality": "high" }),
        ),
        med(M, "RX-AMOX", 1, AMOXICILLIN, "active", None),
    ])
    .await?;
    let now_open = [("DUPTHPY", "final", "moderate"), ("ALGY", "final", "high")];
    expect(f(&[("DRG", "cancelled", "high"), now_open[0], now_open[1]]), f(&now_open)).await?;
    anyhow::ensure!(search("code=ALGY".into()).await?.len() == 1);

    step("20 days later (the composer's clock moved): the warfarin supply and its grace ran out, with no event");
    composer.stop().await?;
    let composer = app.composer(&["--insights-clock-skew-days", "20", "--insights-recheck-secs", "1"]).await?;
    let with_gap = [("DRG", "cancelled", "high"), now_open[0], now_open[1], ("refill-gap", "final", "moderate")];
    eventually(Duration::from_secs(30), "the refill gap opens", || async {
        let found = search(format!("patient={M}&_count=50")).await?;
        Ok((findings(found.iter()) == f(&with_gap)).then_some(()))
    })
    .await?;
    expect(f(&with_gap), f(&[now_open[0], now_open[1], ("refill-gap", "final", "moderate")])).await?;

    step("a new fill: the refill gap is cancelled");
    app.apply(&[med(M, "RX-W", 2, WARFARIN, "active", Some((day(0), 90)))]).await?;
    let closed = [("DRG", "cancelled", "high"), now_open[0], now_open[1], ("refill-gap", "cancelled", "moderate")];
    expect(f(&closed), f(&now_open)).await?;

    step("fhir.insights.v1 and the partner's insights topic: every version once, in order");
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let expected_versions = vec![
        f(&[("DRG", "final", "high")]),
        f(&[("DRG", "cancelled", "high")]),
        f(&[("DRG", "cancelled", "high"), now_open[0]]),
        f(&[("DRG", "cancelled", "high"), now_open[0], now_open[1]]),
        f(&with_gap),
        f(&closed),
    ];
    for topic in [app.topic(platform::topics::INSIGHTS), app.topic(&platform::topics::partner_insights("pins"))] {
        let records: Vec<ReadRecord> = read_topic(&topic, expected_versions.len()).await?.into_iter().filter(|r| r.key == M).collect();
        let versions: Vec<String> = records.iter().map(|r| r.header("versionId").to_owned()).collect();
        anyhow::ensure!(versions == ["1", "2", "3", "4", "5", "6"], "{topic}: versions {versions:?}");
        let seen: Vec<Findings> = records
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(r.value.as_deref().unwrap_or_default()).unwrap_or(Value::Null);
                findings(v["entry"].as_array().into_iter().flatten().map(|e| &e["resource"]))
            })
            .collect();
        anyhow::ensure!(seen == expected_versions, "{topic}: {seen:?}");
    }
    let partner_topic = read_topic(&app.topic(&platform::topics::partner_insights("pins")), 6).await?;
    anyhow::ensure!(partner_topic.iter().all(|r| r.key == M), "the partner's topic carries only its member");

    step("the high-severity subscription: the interaction, its cancellation and the allergy alert, once each, in order");
    let algy = search("code=ALGY".into()).await?[0]["id"].as_str().unwrap_or_default().to_owned();
    let base = tests::components::FHIR_BASE_URL;
    let expected_foci = vec![
        format!("{base}/DetectedIssue/{drg}/_history/1"),
        format!("{base}/DetectedIssue/{drg}/_history/2"),
        format!("{base}/DetectedIssue/{algy}/_history/1"),
    ];
    eventually(Duration::from_secs(30), "high-severity notifications", || async { Ok((hook.foci().len() >= expected_foci.len()).then_some(())) })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    anyhow::ensure!(hook.foci() == expected_foci, "notified {:?}, expected {expected_foci:?}", hook.foci());

    step("the partner reports over-the-counter ibuprofen: an interaction with warfarin, in the write-back's transaction");
    let report = json!({
        "resourceType": "MedicationStatement", "status": "active",
        "identifier": [{ "system": "urn:example:pins:statements", "value": "OTC-1" }],
        "medicationCodeableConcept": { "coding": [{ "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "310965" }] },
        "subject": { "reference": format!("Patient/{M}") }, "dateAsserted": day(0)
    });
    let written = send(post_fhir(&client, &format!("{fhir}/MedicationStatement"), &report)).await?;
    anyhow::ensure!(written.status == 201, "write-back: {} {}", written.status, written.body);
    let open = search("code=DRG&status=final".into()).await?;
    anyhow::ensure!(open.len() == 1 && open[0]["id"] != drg.as_str(), "a new interaction, not the aspirin one: {open:?}");
    let ibuprofen = open[0]["id"].as_str().unwrap_or_default().to_owned();
    let with_ibuprofen = format!("{base}/DetectedIssue/{ibuprofen}/_history/1");
    eventually(Duration::from_secs(30), "the write-back's interaction is notified", || async {
        Ok(hook.foci().contains(&with_ibuprofen).then_some(()))
    })
    .await?;
    anyhow::ensure!(hook.foci().len() == expected_foci.len() + 1, "one more notification: {:?}", hook.foci());

    step("a partner attributed later gets the member's current insights, and a tombstone when it ends");
    app.apply(&[attribution(OTHER, "plate")]).await?;
    let late = app.topic(&platform::topics::partner_insights("plate"));
    let records = read_topic(&late, 1).await?;
    anyhow::ensure!(records.len() == 1 && records[0].key == OTHER, "{} records", records.len());
    let bundle: Value = serde_json::from_slice(records[0].value.as_deref().unwrap_or_default())?;
    anyhow::ensure!(findings(bundle["entry"].as_array().into_iter().flatten().map(|e| &e["resource"])) == f(&[("DRG", "final", "high")]));
    app.apply(&[deletion(platform::topics::ATTRIBUTION, "attribution", 2, OTHER, &format!("AT-{OTHER}-plate"))]).await?;
    let records = read_topic(&late, 2).await?;
    anyhow::ensure!(records.len() == 2 && records[1].value.is_none(), "a tombstone follows: {} records", records.len());

    composer.stop().await?;
    relay.stop().await?;
    notifier.stop().await?;
    Ok(())
}

/// A new knowledge-base version recomputes the members it judges differently, and only them;
/// the version that produced each insight is on it; an invalid one stops the composer at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_knowledge_base_recomputes_only_the_members_it_affects() -> anyhow::Result<()> {
    let app = TestApp::new("kbchange").await?;
    let composer = app.composer(&[]).await?;
    let (a, b, c) = ("M2810001", "M2810002", "M2810003");
    let person = json!({ "given_name": "Kay", "sex": "other" });
    app.apply(&[
        demographics(a, person.clone()),
        demographics(b, person.clone()),
        demographics(c, person),
        med(a, "RX-A1", 1, WARFARIN, "active", None),
        med(a, "RX-A2", 1, "310965", "active", None),
        med(b, "RX-B1", 1, "860975", "active", None),
        med(b, "RX-B2", 1, "310429", "active", None),
        med(c, "RX-C1", 1, "314076", "active", None),
    ])
    .await?;
    let versions = || async {
        let all = db::composites::all_composites(&app.pool).await?;
        Ok::<std::collections::BTreeMap<String, i64>, anyhow::Error>(all.into_iter().map(|c| (c.member_id, c.version_id)).collect())
    };
    let insights = || async {
        let rows: Vec<(String, String, i64, String)> =
            sqlx::query_as("SELECT member_id, code, version, body::text FROM components WHERE kind = 'insight' ORDER BY member_id, record_id")
                .fetch_all(&app.pool)
                .await?;
        Ok::<Vec<(String, String, i64, String)>, anyhow::Error>(rows)
    };
    let before = versions().await?;
    let found = insights().await?;
    anyhow::ensure!(found.len() == 1 && found[0].0 == a && found[0].1 == "DRG", "warfarin and ibuprofen interact: {found:?}");
    let built_in = fhir::insights::KnowledgeBase::built_in()?.version().to_owned();
    composer.stop().await?;

    step("a new version adds a rule for metformin with furosemide");
    let mut doc: Value = serde_json::from_str(fhir::insights::BUILT_IN)?;
    doc["version"] = json!("test-next");
    let rules = doc["interactions"].as_array_mut().ok_or_else(|| anyhow::anyhow!("no interactions"))?;
    rules.push(json!({ "a": { "ingredient": "6809" }, "b": { "ingredient": "4603" }, "severity": "low",
        "note": "A rule made up for this test.", "source": "phansalkar-2012" }));
    let dir = state_dir().join(unique("kb"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("next.json");
    std::fs::write(&path, doc.to_string())?;
    let path = path.display().to_string();
    let composer = app.composer(&["--insights-knowledge-base", &path]).await?;
    eventually(Duration::from_secs(30), "the new knowledge base applied", || async {
        let applied: Option<bool> = sqlx::query_scalar("SELECT applied_at IS NOT NULL FROM insight_knowledge_bases WHERE version = 'test-next'")
            .fetch_optional(&app.pool)
            .await?;
        Ok(applied.filter(|a| *a))
    })
    .await?;
    let after = versions().await?;
    anyhow::ensure!(after[a] == before[a] && after[c] == before[c], "unaffected members keep their versions: {before:?} → {after:?}");
    anyhow::ensure!(after[b] == before[b] + 1, "the affected member has one new version: {before:?} → {after:?}");
    let found = insights().await?;
    anyhow::ensure!(found.len() == 2, "{found:?}");
    let version_on = |body: &str| serde_json::from_str::<Value>(body).ok().and_then(|v| v["extension"][0]["valueString"].as_str().map(str::to_owned));
    anyhow::ensure!(
        found[0].0 == a && found[0].2 == 1 && version_on(&found[0].3) == Some(built_in.clone()),
        "A's insight is untouched: {:?}",
        found[0]
    );
    anyhow::ensure!(found[1].0 == b && found[1].1 == "DRG" && version_on(&found[1].3).as_deref() == Some("test-next"), "B's is new: {:?}", found[1]);
    composer.stop().await?;

    step("an invalid knowledge base stops the composer at start, naming what is wrong");
    doc["interactions"][0]["severity"] = json!("catastrophic");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, doc.to_string())?;
    let refused = app.composer(&["--insights-knowledge-base", &bad.display().to_string()]).await;
    let message = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
    anyhow::ensure!(message.contains("knowledge-base.schema.json") && message.contains("/interactions/0/severity"), "{message}");
    Ok(())
}
