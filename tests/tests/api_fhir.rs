//! Issue 4: events produced to the sor.* topics become readable through the FHIR REST API —
//! `$medication-profile`, read, vread, history and search with keyset paging — and every error
//! is an OperationOutcome with a fitting status.

use devtools::generator::{self, SorMessage};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;
use tests::*;

async fn get(client: &reqwest::Client, url: &str) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
    let r = client.get(url).send().await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await?;
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? };
    Ok((status, headers, body))
}

fn outcome(status: u16, body: &Value, expected: u16) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert!(!body["issue"][0]["diagnostics"].as_str().unwrap_or_default().is_empty(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_readable_and_searchable() -> anyhow::Result<()> {
    let (url, pool) = fresh_database("api", true).await?;
    let prefix = format!("{}.", unique("api"));
    let kafka = kafka_config(&prefix);
    let group = "composer-api";
    let (stop, _metrics, thread) = composer::spawn(composer_config(&url, &prefix, group)).await?;

    let mut stream = vec![SorMessage {
        topic: "sor.member.demographics.v1",
        key: "P1".into(),
        value: Some(native_event("upsert", "enrollment", 1, "P1", "P1", Some(json!({ "given_name": "Pat", "sex": "other" })))),
    }];
    for i in 0..250 {
        let status = if i % 5 == 0 { "stopped" } else { "active" };
        let code = if i == 7 { "314076" } else { "860975" };
        stream.push(SorMessage {
            topic: "sor.pharmacy.medications.v1",
            key: "P1".into(),
            value: Some(native_event("upsert", "rx-claims", 1, "P1", &format!("RX-{i:03}"), Some(json!({ "rxnorm_code": code, "status": status })))),
        });
    }
    stream.push(SorMessage {
        topic: "sor.member.demographics.v1",
        key: "GONE".into(),
        value: Some(native_event("upsert", "enrollment", 1, "GONE", "GONE", Some(json!({ "given_name": "Gone" })))),
    });
    stream.push(attribution("P1", "p-api"));
    stream.push(attribution("GONE", "p-api"));
    generator::publish(&generator::producer(&kafka)?, &kafka, &stream).await?;
    wait_applied(&pool, group, stream.len(), Duration::from_secs(60)).await?;
    // A second version of RX-000, and the deletion of member GONE.
    let later = vec![
        SorMessage {
            topic: "sor.pharmacy.medications.v1",
            key: "P1".into(),
            value: Some(native_event("upsert", "rx-claims", 2, "P1", "RX-000", Some(json!({ "rxnorm_code": "860975", "status": "completed" })))),
        },
        SorMessage {
            topic: "sor.member.demographics.v1",
            key: "GONE".into(),
            value: Some(native_event("delete", "enrollment", 2, "GONE", "GONE", None)),
        },
    ];
    generator::publish(&generator::producer(&kafka)?, &kafka, &later).await?;
    wait_applied(&pool, group, stream.len() + later.len(), Duration::from_secs(60)).await?;
    composer::stop(&stop, thread).await?;

    let base = start_api(&url, "http://fhir.test/fhir").await?;
    let fhir = format!("{base}/fhir");
    let partner = register_partner(&pool, "p-api", "system/*.read", KeyKind::Es384, None).await?;
    let client = partner.client(&base).await?;

    // $medication-profile, with ETag / If-None-Match.
    let (status, headers, profile) = get(&client, &format!("{fhir}/Patient/P1/$medication-profile")).await?;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(headers["content-type"], "application/fhir+json; charset=utf-8");
    assert_eq!(profile["resourceType"], "Bundle");
    // One entry per medication code: the 249 records of 860975 are one entry naming the
    // other 248; 314076 is the other entry.
    assert_eq!(profile["entry"].as_array().map(Vec::len), Some(3));
    let same_code = profile["entry"][1]["resource"]["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["url"] == "urn:fhir-event-platform:extension:same-code-record")
        .count();
    assert_eq!(
        same_code
            + profile["entry"][2]["resource"]["extension"]
                .as_array()
                .map_or(0, |x| x.iter().filter(|x| x["url"] == "urn:fhir-event-platform:extension:same-code-record").count()),
        248
    );
    let etag = headers["etag"].to_str()?.to_owned();
    assert_eq!(etag, format!("W/\"{}\"", profile["meta"]["versionId"].as_str().unwrap_or_default()));
    assert!(headers.contains_key("last-modified"));
    let r = client.get(format!("{fhir}/Patient/P1/$medication-profile")).header("If-None-Match", &etag).send().await?;
    assert_eq!(r.status().as_u16(), 304);
    let (status, _, _) = get(&client, &format!("{fhir}/Patient/P1/$medication-profile?_format=json")).await?;
    assert_eq!(status, 200);

    // Paging over 250 results with _count=50 visits every result once.
    let mut next = Some(format!("{fhir}/MedicationStatement?patient=Patient/P1&_count=50"));
    let mut seen = HashSet::new();
    let mut pages = 0;
    while let Some(url) = next.take() {
        let url = url.replace("http://fhir.test/fhir", &fhir);
        let (status, _, page) = get(&client, &url).await?;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["type"], "searchset");
        assert_eq!(page["total"], 250);
        for e in page["entry"].as_array().into_iter().flatten() {
            assert!(seen.insert(e["resource"]["id"].as_str().unwrap_or_default().to_owned()), "seen twice");
            assert_eq!(e["resource"]["subject"]["reference"], "Patient/P1");
        }
        next = page["link"].as_array().into_iter().flatten().find(|l| l["relation"] == "next").and_then(|l| l["url"].as_str()).map(str::to_owned);
        pages += 1;
        assert!(pages <= 6, "paging does not end");
    }
    assert_eq!(seen.len(), 250);

    // Search filters.
    let count = |v: &Value| v["total"].as_i64().unwrap_or(-1);
    let (_, _, v) = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&status=stopped&_count=1")).await?;
    assert_eq!(count(&v), 49, "every fifth, minus RX-000 which is now completed");
    let (_, _, v) = get(&client, &format!("{fhir}/MedicationStatement?code=http://www.nlm.nih.gov/research/umls/rxnorm|314076")).await?;
    assert_eq!(count(&v), 1);
    let (_, _, v) = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&_lastUpdated=gt2000-01-01&_lastUpdated=lt2999")).await?;
    assert_eq!(count(&v), 250);
    let (_, _, v) = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&_lastUpdated=lt2000")).await?;
    assert_eq!(count(&v), 0);
    let (_, _, v) = get(&client, &format!("{fhir}/Patient?_id=P1")).await?;
    assert_eq!(count(&v), 1);
    assert_eq!(v["entry"][0]["resource"]["meta"]["versionId"], "1");

    // read, vread, history.
    let id = v["entry"][0]["resource"]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(id, "P1");
    let (_, _, page) = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&_count=1&status=completed")).await?;
    let ms = page["entry"][0]["resource"]["id"].as_str().unwrap_or_default().to_owned();
    let (status, headers, r) = get(&client, &format!("{fhir}/MedicationStatement/{ms}")).await?;
    assert_eq!(status, 200);
    assert_eq!(r["meta"]["versionId"], "2");
    assert_eq!(headers["etag"], "W/\"2\"");
    let (status, _, r) = get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history/1")).await?;
    assert_eq!(status, 200);
    assert_eq!(r["status"], "stopped");
    let (status, _, h) = get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history")).await?;
    assert_eq!(status, 200);
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 2);
    assert_eq!(h["entry"][0]["resource"]["meta"]["versionId"], "2");

    // Errors are OperationOutcomes.
    let (s, _, b) = get(&client, &format!("{fhir}/Patient/GONE")).await?;
    outcome(s, &b, 410);
    let (s, _, b) = get(&client, &format!("{fhir}/Patient/GONE/$medication-profile")).await?;
    outcome(s, &b, 410);
    let (s, _, b) = get(&client, &format!("{fhir}/Patient/NOBODY")).await?;
    outcome(s, &b, 404);
    let (s, _, b) = get(&client, &format!("{fhir}/Patient/NOBODY/$medication-profile")).await?;
    outcome(s, &b, 404);
    let (s, _, b) = get(&client, &format!("{fhir}/Observation/1")).await?;
    outcome(s, &b, 404);
    assert!(b["issue"][0]["diagnostics"].as_str().unwrap_or_default().contains("Observation"));
    let (s, _, b) = get(&client, &format!("{fhir}/Patient/bad%20id")).await?;
    outcome(s, &b, 400);
    let (s, _, b) = get(&client, &format!("{fhir}/MedicationStatement?colour=blue")).await?;
    outcome(s, &b, 400);
    let (s, _, b) = get(&client, &format!("{fhir}/MedicationStatement?_count=abc")).await?;
    outcome(s, &b, 400);
    let (s, _, b) = get(&client, &format!("{fhir}/MedicationStatement?_lastUpdated=yesterday")).await?;
    outcome(s, &b, 400);
    let (s, _, b) = get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history/0")).await?;
    outcome(s, &b, 400);
    let (s, _, b) = get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history/9")).await?;
    outcome(s, &b, 404);
    let (s, _, b) = get(&client, &format!("{fhir}/Patient/P1?_format=xml")).await?;
    outcome(s, &b, 406);
    let r = client.get(format!("{fhir}/Patient/P1")).header("Accept", "application/fhir+xml").send().await?;
    let s = r.status().as_u16();
    outcome(s, &r.json().await?, 406);
    let r = client.delete(format!("{fhir}/Patient/P1")).send().await?;
    let s = r.status().as_u16();
    outcome(s, &r.json().await?, 405);

    // The CapabilityStatement.
    let (s, _, cap) = get(&client, &format!("{fhir}/metadata")).await?;
    assert_eq!(s, 200);
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(cap["fhirVersion"], "4.3.0");
    assert_eq!(
        cap["rest"][0]["resource"].as_array().map(Vec::len),
        Some(9),
        "five clinical types, Provenance, Subscription, SubscriptionTopic, AuditEvent"
    );
    assert_eq!(cap["rest"][0]["security"]["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    // metadata needs no token.
    assert_eq!(get(&reqwest::Client::new(), &format!("{fhir}/metadata")).await?.0, 200);
    Ok(())
}

/// The API keeps the bodies of profiles it served in memory; a read must still see every change
/// the composer commits: a new version, a deletion, the end of the partner's attribution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_served_before_is_never_staler_than_the_database() -> anyhow::Result<()> {
    let (url, pool) = fresh_database("api_cache", true).await?;
    let prefix = format!("{}.", unique("api_cache"));
    let kafka = kafka_config(&prefix);
    let group = "composer-api-cache";
    let (stop, _metrics, thread) = composer::spawn(composer_config(&url, &prefix, group)).await?;
    let producer = generator::producer(&kafka)?;
    let mut sent = 0;
    // Publishes and waits until the composer applied everything sent so far.
    let mut apply = async |messages: Vec<SorMessage>| -> anyhow::Result<()> {
        generator::publish(&producer, &kafka, &messages).await?;
        sent += messages.len();
        wait_applied(&pool, group, sent, Duration::from_secs(60)).await
    };
    let medication = |version: i64, status: &str| SorMessage {
        topic: "sor.pharmacy.medications.v1",
        key: "C1".into(),
        value: Some(native_event("upsert", "rx-claims", version, "C1", "RX-1", Some(json!({ "rxnorm_code": "860975", "status": status })))),
    };
    let attributed = |version: i64, period_end: Option<&str>| {
        let mut period = json!({ "partner_id": "p-cache", "relationship": "pcp", "period_start": "2026-01-01" });
        if let Some(end) = period_end {
            period["period_end"] = json!(end);
        }
        SorMessage {
            topic: platform::topics::ATTRIBUTION,
            key: "C1".into(),
            value: Some(native_event("upsert", "attribution", version, "C1", "AT-C1-p-cache", Some(period))),
        }
    };
    let demographics = SorMessage {
        topic: "sor.member.demographics.v1",
        key: "C1".into(),
        value: Some(native_event("upsert", "enrollment", 1, "C1", "C1", Some(json!({ "given_name": "Cy" })))),
    };
    apply(vec![demographics, medication(1, "active"), attributed(1, None)]).await?;

    let base = start_api(&url, "http://fhir.test/fhir").await?;
    let partner = register_partner(&pool, "p-cache", "system/*.read", KeyKind::Es384, None).await?;
    let client = partner.client(&base).await?;
    let profile_url = format!("{base}/fhir/Patient/C1/$medication-profile");
    let status_of = |profile: &Value| {
        profile["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["resource"]["resourceType"] == "MedicationStatement")
            .map(|e| e["resource"]["status"].clone())
    };
    let (s, h, first) = get(&client, &profile_url).await?;
    assert_eq!(s, 200, "{first}");
    assert_eq!(status_of(&first), Some(json!("active")));
    let (s, h2, again) = get(&client, &profile_url).await?;
    assert_eq!((s, &again, &h2["etag"]), (200, &first, &h["etag"]), "the same version, served again");
    let not_modified = client.get(&profile_url).header("If-None-Match", format!("W/\"0\", {}", h["etag"].to_str()?)).send().await?;
    assert_eq!(not_modified.status().as_u16(), 304);

    // A new version is served at once, not the one held in memory.
    apply(vec![medication(2, "completed")]).await?;
    let (s, h3, updated) = get(&client, &profile_url).await?;
    assert_eq!(s, 200, "{updated}");
    assert_ne!(h3["etag"], h["etag"]);
    assert_eq!(status_of(&updated), Some(json!("completed")));

    // The end of the attribution hides it (404) although its body is held in memory.
    apply(vec![attributed(2, Some("2026-01-31"))]).await?;
    let (s, _, b) = get(&client, &profile_url).await?;
    outcome(s, &b, 404);

    // Attributed again, then deleted: 410.
    apply(vec![attributed(3, None)]).await?;
    let (s, _, served) = get(&client, &profile_url).await?;
    assert_eq!(s, 200, "{served}");
    apply(vec![SorMessage {
        topic: "sor.member.demographics.v1",
        key: "C1".into(),
        value: Some(native_event("delete", "enrollment", 2, "C1", "C1", None)),
    }])
    .await?;
    let (s, _, b) = get(&client, &profile_url).await?;
    outcome(s, &b, 410);

    // Each read is on the audit trail once, with the status it was served (the statement that
    // read the profile decided and recorded it), as the guard records any other access.
    let trail: Vec<(String, String, Vec<String>, String, String, i16, String)> = sqlx::query_as(
        "SELECT operation, resource_type, member_ids, method, path, status, outcome FROM audit_events
         WHERE partner_id = 'p-cache' AND operation <> 'token' ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    let expected = [(200, "success"), (200, "success"), (304, "success"), (200, "success"), (404, "not-found"), (200, "success"), (410, "not-found")];
    assert_eq!(trail.len(), expected.len(), "{trail:?}");
    for (row, (status, outcome)) in trail.iter().zip(expected) {
        let want = ("operation", "Patient", vec!["C1".to_owned()], "GET", "/fhir/Patient/C1/$medication-profile", status, outcome);
        assert_eq!((row.0.as_str(), row.1.as_str(), row.2.clone(), row.3.as_str(), row.4.as_str(), row.5, row.6.as_str()), want);
    }
    composer::stop(&stop, thread).await?;
    Ok(())
}
