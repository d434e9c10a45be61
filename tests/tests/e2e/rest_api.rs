//! Issue 4: events produced to the sor.* topics become readable through the FHIR REST API —
//! `$medication-profile`, read, vread, history and search with keyset paging — and every error
//! is an OperationOutcome with a fitting status.

use serde_json::{Value, json};
use std::collections::HashSet;
use tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_readable_and_searchable() -> anyhow::Result<()> {
    let app = TestApp::new("api").await?;
    let composer = app.composer(&[]).await?;
    let mut stream = vec![demographics("P1", json!({ "given_name": "Pat", "sex": "other" }))];
    for i in 0..250 {
        let status = if i % 5 == 0 { "stopped" } else { "active" };
        let code = if i == 7 { "314076" } else { "860975" };
        stream.push(medication("P1", &format!("RX-{i:03}"), 1, code, status));
    }
    stream.push(demographics("GONE", json!({ "given_name": "Gone" })));
    stream.push(attribution("P1", "p-api"));
    stream.push(attribution("GONE", "p-api"));
    app.apply(&stream).await?;
    // A second version of RX-000, and the deletion of member GONE.
    app.apply(&[medication("P1", "RX-000", 2, "860975", "completed"), deletion(platform::topics::DEMOGRAPHICS, "enrollment", 2, "GONE", "GONE")])
        .await?;
    composer.stop().await?;

    let base = app.api(&[]).await?;
    let fhir = format!("{base}/fhir");
    let client = app.partner("p-api", "system/*.read", KeyKind::Es384).await?.client(&base).await?;

    // $medication-profile, with ETag / If-None-Match.
    let Reply { status, headers, body: profile, .. } = get(&client, &format!("{fhir}/Patient/P1/$medication-profile")).await?;
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
    let Reply { status, .. } = get(&client, &format!("{fhir}/Patient/P1/$medication-profile?_format=json")).await?;
    assert_eq!(status, 200);

    // Paging over 250 results with _count=50 visits every result once.
    let mut next = Some(format!("{fhir}/MedicationStatement?patient=Patient/P1&_count=50"));
    let mut seen = HashSet::new();
    let mut pages = 0;
    while let Some(url) = next.take() {
        let url = url.replace("http://fhir.test/fhir", &fhir);
        let Reply { status, body: page, .. } = get(&client, &url).await?;
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
    let Reply { body: v, .. } = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&status=stopped&_count=1")).await?;
    assert_eq!(count(&v), 49, "every fifth, minus RX-000 which is now completed");
    let Reply { body: v, .. } = get(&client, &format!("{fhir}/MedicationStatement?code=http://www.nlm.nih.gov/research/umls/rxnorm|314076")).await?;
    assert_eq!(count(&v), 1);
    let Reply { body: v, .. } = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&_lastUpdated=gt2000-01-01&_lastUpdated=lt2999")).await?;
    assert_eq!(count(&v), 250);
    let Reply { body: v, .. } = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&_lastUpdated=lt2000")).await?;
    assert_eq!(count(&v), 0);
    let Reply { body: v, .. } = get(&client, &format!("{fhir}/Patient?_id=P1")).await?;
    assert_eq!(count(&v), 1);
    assert_eq!(v["entry"][0]["resource"]["meta"]["versionId"], "1");

    // read, vread, history.
    let id = v["entry"][0]["resource"]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(id, "P1");
    let Reply { body: page, .. } = get(&client, &format!("{fhir}/MedicationStatement?patient=P1&_count=1&status=completed")).await?;
    let ms = page["entry"][0]["resource"]["id"].as_str().unwrap_or_default().to_owned();
    let Reply { status, headers, body: r, .. } = get(&client, &format!("{fhir}/MedicationStatement/{ms}")).await?;
    assert_eq!(status, 200);
    assert_eq!(r["meta"]["versionId"], "2");
    assert_eq!(headers["etag"], "W/\"2\"");
    let Reply { status, body: r, .. } = get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history/1")).await?;
    assert_eq!(status, 200);
    assert_eq!(r["status"], "stopped");
    let Reply { status, body: h, .. } = get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history")).await?;
    assert_eq!(status, 200);
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 2);
    assert_eq!(h["entry"][0]["resource"]["meta"]["versionId"], "2");

    // Errors are OperationOutcomes.
    get(&client, &format!("{fhir}/Patient/GONE")).await?.assert_refused(410, "Patient/GONE");
    get(&client, &format!("{fhir}/Patient/GONE/$medication-profile")).await?.assert_refused(410, "Patient/GONE/$medication-profile");
    get(&client, &format!("{fhir}/Patient/NOBODY")).await?.assert_refused(404, "Patient/NOBODY");
    get(&client, &format!("{fhir}/Patient/NOBODY/$medication-profile")).await?.assert_refused(404, "Patient/NOBODY/$medication-profile");
    let unknown = get(&client, &format!("{fhir}/Observation/1")).await?;
    unknown.assert_refused(404, "Observation/1");
    assert!(unknown.body["issue"][0]["diagnostics"].as_str().unwrap_or_default().contains("Observation"));
    get(&client, &format!("{fhir}/Patient/bad%20id")).await?.assert_refused(400, "Patient/bad%20id");
    get(&client, &format!("{fhir}/MedicationStatement?colour=blue")).await?.assert_refused(400, "MedicationStatement?colour=blue");
    get(&client, &format!("{fhir}/MedicationStatement?_count=abc")).await?.assert_refused(400, "MedicationStatement?_count=abc");
    get(&client, &format!("{fhir}/MedicationStatement?_lastUpdated=yesterday"))
        .await?
        .assert_refused(400, "MedicationStatement?_lastUpdated=yesterday");
    get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history/0")).await?.assert_refused(400, &format!("MedicationStatement/{ms}/_history/0"));
    get(&client, &format!("{fhir}/MedicationStatement/{ms}/_history/9")).await?.assert_refused(404, &format!("MedicationStatement/{ms}/_history/9"));
    get(&client, &format!("{fhir}/Patient/P1?_format=xml")).await?.assert_refused(406, "Patient/P1?_format=xml");
    send(client.get(format!("{fhir}/Patient/P1")).header("Accept", "application/fhir+xml")).await?.assert_refused(406, "Accept: XML");
    send(client.delete(format!("{fhir}/Patient/P1"))).await?.assert_refused(405, "DELETE");

    // The CapabilityStatement.
    let Reply { status: s, body: cap, .. } = get(&client, &format!("{fhir}/metadata")).await?;
    assert_eq!(s, 200);
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(cap["fhirVersion"], "4.3.0");
    assert_eq!(
        cap["rest"][0]["resource"].as_array().map(Vec::len),
        Some(10),
        "five clinical types, Provenance, DetectedIssue, Subscription, SubscriptionTopic, AuditEvent"
    );
    assert_eq!(cap["rest"][0]["security"]["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    // metadata needs no token.
    assert_eq!(get(&reqwest::Client::new(), &format!("{fhir}/metadata")).await?.status, 200);
    Ok(())
}

/// The API keeps the bodies of profiles it served in memory; a read must still see every change
/// the composer commits: a new version, a deletion, the end of the partner's attribution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_served_before_is_never_staler_than_the_database() -> anyhow::Result<()> {
    let app = TestApp::new("api_cache").await?;
    let composer = app.composer(&[]).await?;
    let medication = |version: i64, status: &str| medication("C1", "RX-1", version, "860975", status);
    let attributed = |version: i64, period_end: Option<&str>| {
        let mut period = json!({ "partner_id": "p-cache", "relationship": "pcp", "period_start": "2026-01-01" });
        if let Some(end) = period_end {
            period["period_end"] = json!(end);
        }
        upsert(platform::topics::ATTRIBUTION, "attribution", version, "C1", "AT-C1-p-cache", period)
    };
    app.apply(&[demographics("C1", json!({ "given_name": "Cy" })), medication(1, "active"), attributed(1, None)]).await?;

    let base = app.api(&[]).await?;
    let client = app.partner("p-cache", "system/*.read", KeyKind::Es384).await?.client(&base).await?;
    let profile_url = format!("{base}/fhir/Patient/C1/$medication-profile");
    let status_of = |profile: &Value| {
        profile["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["resource"]["resourceType"] == "MedicationStatement")
            .map(|e| e["resource"]["status"].clone())
    };
    let Reply { status: s, headers: h, body: first, .. } = get(&client, &profile_url).await?;
    assert_eq!(s, 200, "{first}");
    assert_eq!(status_of(&first), Some(json!("active")));
    let Reply { status: s, headers: h2, body: again, .. } = get(&client, &profile_url).await?;
    assert_eq!((s, &again, &h2["etag"]), (200, &first, &h["etag"]), "the same version, served again");
    let not_modified = client.get(&profile_url).header("If-None-Match", format!("W/\"0\", {}", h["etag"].to_str()?)).send().await?;
    assert_eq!(not_modified.status().as_u16(), 304);

    // A new version is served at once, not the one held in memory.
    app.apply(&[medication(2, "completed")]).await?;
    let Reply { status: s, headers: h3, body: updated, .. } = get(&client, &profile_url).await?;
    assert_eq!(s, 200, "{updated}");
    assert_ne!(h3["etag"], h["etag"]);
    assert_eq!(status_of(&updated), Some(json!("completed")));

    // The end of the attribution hides it (404) although its body is held in memory.
    app.apply(&[attributed(2, Some("2026-01-31"))]).await?;
    get(&client, &profile_url).await?.assert_refused(404, "the profile");

    // Attributed again, then deleted: 410.
    app.apply(&[attributed(3, None)]).await?;
    let Reply { status: s, body: served, .. } = get(&client, &profile_url).await?;
    assert_eq!(s, 200, "{served}");
    app.apply(&[deletion(platform::topics::DEMOGRAPHICS, "enrollment", 2, "C1", "C1")]).await?;
    get(&client, &profile_url).await?.assert_refused(410, "the profile");

    // Each read is on the audit trail once, with the status it was served (the statement that
    // read the profile decided and recorded it), as the guard records any other access.
    let trail: Vec<(String, String, Vec<String>, String, String, i16, String)> = sqlx::query_as(
        "SELECT operation, resource_type, member_ids, method, path, status, outcome FROM audit_events
         WHERE partner_id = 'p-cache' AND operation <> 'token' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await?;
    let expected = [(200, "success"), (200, "success"), (304, "success"), (200, "success"), (404, "not-found"), (200, "success"), (410, "not-found")];
    assert_eq!(trail.len(), expected.len(), "{trail:?}");
    for (row, (status, outcome)) in trail.iter().zip(expected) {
        let want = ("operation", "Patient", vec!["C1".to_owned()], "GET", "/fhir/Patient/C1/$medication-profile", status, outcome);
        assert_eq!((row.0.as_str(), row.1.as_str(), row.2.clone(), row.3.as_str(), row.4.as_str(), row.5, row.6.as_str()), want);
    }
    composer.stop().await
}
