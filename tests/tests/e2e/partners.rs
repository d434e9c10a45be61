//! Issue 5: partners authenticate with SMART Backend Services (RS384 and ES384 client
//! assertions), read only the members attributed to them, are rate limited one by one, and
//! every access is audited (table, AuditEvent resources, `audit.events.v1`).

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::{Value, json};
use std::time::Duration;
use tests::*;

/// A token endpoint refusal: RFC 6749 §5.2 JSON with the given `error` code (not an
/// OperationOutcome: OAuth client libraries read `error` at the top level), never cached.
#[track_caller]
fn token_refused(reply: &Reply, status: u16, code: &str, what: &str) {
    let body = &reply.body;
    assert_eq!(reply.status, status, "{what}: {body}");
    assert_eq!(body["error"], code, "{what}: {body}");
    assert!(!body["error_description"].as_str().unwrap_or_default().is_empty(), "{what}: {body}");
    assert!(body.get("resourceType").is_none(), "{what}: {body}");
    assert_eq!(reply.headers["content-type"], "application/json", "{what}");
    assert_eq!(reply.headers["cache-control"], "no-store", "{what}");
    if status == 401 {
        assert!(reply.headers["www-authenticate"].to_str().unwrap_or_default().contains(code), "{what}: no WWW-Authenticate");
    }
}

/// Members A1 (served by partner pa), B1 (pb), and C1 (pa, but that attribution ended).
async fn compose(app: &TestApp) -> anyhow::Result<()> {
    let composer = app.composer(&[]).await?;
    let mut stream = Vec::new();
    for m in ["A1", "B1", "C1"] {
        stream.push(demographics(m, json!({ "given_name": "Quinn", "family_name": "Harlow", "birth_date": "1961-04-09", "sex": "female" })));
        stream.push(medication(m, &format!("RX-{m}"), 1, "860975", "active"));
    }
    stream.push(attribution("A1", "pa"));
    stream.push(attribution("B1", "pb"));
    stream.push(attribution("A1", "rs"));
    stream.push(attribution("A1", "es"));
    let ended = json!({ "partner_id": "pa", "period_start": "2025-01-01", "period_end": "2025-12-31" });
    stream.push(upsert(platform::topics::ATTRIBUTION, "attribution", 1, "C1", "AT-C1", ended));
    app.apply(&stream).await?;
    composer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_backend_services_refuses_what_it_must_and_accepts_rs384_and_es384() -> anyhow::Result<()> {
    let app = TestApp::new("auth").await?;
    let pool = &app.pool;
    compose(&app).await?;
    let origin = app.api(&[]).await?;
    let fhir = format!("{origin}/fhir");
    let anonymous = reqwest::Client::new();

    // Discovery.
    let Reply { status: s, body: config, .. } = get(&anonymous, &format!("{origin}/.well-known/smart-configuration")).await?;
    assert_eq!(s, 200);
    assert_eq!(config["token_endpoint"], "http://fhir.test/auth/token");
    assert_eq!(config["token_endpoint_auth_signing_alg_values_supported"], json!(["RS384", "ES384"]));
    let Reply { status: s, body: same, .. } = get(&anonymous, &format!("{fhir}/.well-known/smart-configuration")).await?;
    assert_eq!((s, &same), (200, &config));

    // A valid assertion works end to end with both algorithms.
    let rs = app.partner("rs", "system/*.read", KeyKind::Rs384).await?;
    let es = app.partner("es", "system/*.read", KeyKind::Es384).await?;
    for partner in [&rs, &es] {
        let Reply { status: s, headers, body, .. } =
            TestPartner::request_token(&origin, &partner.assertion(&origin, 120).await?, "system/*.read").await?;
        assert_eq!(s, 200, "{}: {body}", partner.id);
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["scope"], "system/*.read");
        assert_eq!(body["expires_in"], 300);
        let client = bearer_client(body["access_token"].as_str().unwrap_or_default())?;
        let Reply { status: s, body: profile, .. } = get(&client, &format!("{fhir}/Patient/A1/$medication-profile")).await?;
        assert_eq!(s, 200, "{}: {profile}", partner.id);
        assert_eq!(profile["entry"][0]["resource"]["id"], "A1");
    }

    // No token, a malformed header, a token never issued.
    get(&anonymous, &format!("{fhir}/Patient/A1")).await?.assert_refused(401, "no token");
    let reply = send(anonymous.get(format!("{fhir}/Patient/A1")).header("Authorization", "Basic abc")).await?;
    reply.assert_refused(401, "not a bearer token");
    let reply = get(&bearer_client("not-a-token-we-issued")?, &format!("{fhir}/Patient/A1")).await?;
    reply.assert_refused(401, "unknown token");
    assert!(reply.headers["www-authenticate"].to_str()?.contains("invalid_token"));
    // metadata stays open.
    assert_eq!(get(&anonymous, &format!("{fhir}/metadata")).await?.status, 200);

    // An expired token: from an API instance that issues 1-second tokens.
    let short = app.api(&["--auth-token-lifetime-secs", "1"]).await?;
    let token = es.token(&short).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = get(&bearer_client(&token)?, &format!("{fhir}/Patient/A1")).await?;
    reply.assert_refused(401, "expired token");
    assert!(reply.body["issue"][0]["diagnostics"].as_str().unwrap_or_default().contains("expired"));

    // Wrong audience.
    let assertion = es.key.assertion("es", "http://elsewhere.test/auth/token", 120, None)?;
    token_refused(&TestPartner::request_token(&origin, &assertion, "system/*.read").await?, 401, "invalid_client", "wrong audience");

    // A replayed jti: the first use works, the second is refused.
    let token_url = TestPartner::token_url(&origin).await?;
    let assertion = es.key.assertion("es", &token_url, 120, Some("jti-used-once"))?;
    assert_eq!(TestPartner::request_token(&origin, &assertion, "system/*.read").await?.status, 200);
    let again = es.key.assertion("es", &token_url, 100, Some("jti-used-once"))?;
    token_refused(&TestPartner::request_token(&origin, &again, "system/*.read").await?, 401, "invalid_client", "replayed jti");

    // A bad signature: signed by another key that claims the registered key's id.
    let impostor = api::auth::client::ClientKey::generate_es384("es-key")?.0;
    let forged = impostor.assertion("es", &token_url, 120, None)?;
    token_refused(&TestPartner::request_token(&origin, &forged, "system/*.read").await?, 401, "invalid_client", "bad signature");
    // An RSA assertion whose signature was tampered with.
    let good = rs.key.assertion("rs", &token_url, 120, None)?;
    let tampered = format!("{}{}", &good[..good.len() - 4], if good.ends_with("AAAA") { "BBBB" } else { "AAAA" });
    token_refused(&TestPartner::request_token(&origin, &tampered, "system/*.read").await?, 401, "invalid_client", "tampered signature");

    // An expired assertion, and one that lives longer than 5 minutes.
    let old = es.key.assertion("es", &token_url, -120, None)?;
    token_refused(&TestPartner::request_token(&origin, &old, "system/*.read").await?, 401, "invalid_client", "expired assertion");
    let long = es.key.assertion("es", &token_url, 3600, None)?;
    token_refused(&TestPartner::request_token(&origin, &long, "system/*.read").await?, 401, "invalid_client", "exp beyond 5 minutes");

    // Unknown client.
    let stranger = api::auth::client::ClientKey::generate_es384("x")?.0;
    let assertion = stranger.assertion("nobody-registered", &token_url, 120, None)?;
    token_refused(&TestPartner::request_token(&origin, &assertion, "system/*.read").await?, 401, "invalid_client", "unknown client");

    // Disabled partner: no new token, and the token it holds stops working at once.
    let off = app.partner("off", "system/*.read", KeyKind::Es384).await?;
    let held = bearer_client(&off.token(&origin).await?)?;
    assert_eq!(get(&held, &format!("{fhir}/Patient/A1")).await?.status, 404, "not attributed, but authenticated");
    assert!(db::partners::set_disabled(pool, "off", true).await?);
    let assertion = off.assertion(&origin, 120).await?;
    token_refused(&TestPartner::request_token(&origin, &assertion, "system/*.read").await?, 401, "invalid_client", "disabled partner");
    get(&held, &format!("{fhir}/Patient/A1")).await?.assert_refused(401, "token of a disabled partner");

    // Insufficient scope: a scope the partner may not have, and a request its token does not cover.
    let assertion = es.assertion(&origin, 120).await?;
    token_refused(&TestPartner::request_token(&origin, &assertion, "system/AuditEvent.read").await?, 400, "invalid_scope", "scope not allowed");
    let tasks_only = bearer_client(&es.token_with(&origin, "system/Task.read").await?)?;
    assert_eq!(get(&tasks_only, &format!("{fhir}/Task?patient=A1")).await?.status, 200);
    for path in ["Patient/A1", "MedicationStatement?patient=A1", "Patient/A1/$medication-profile", "AuditEvent"] {
        let reply = get(&tasks_only, &format!("{fhir}/{path}")).await?;
        reply.assert_refused(403, path);
        assert!(reply.headers["www-authenticate"].to_str()?.contains("insufficient_scope"), "{path}");
    }

    // Malformed token requests.
    let form =
        |body: &str| anonymous.post(format!("{origin}/auth/token")).header("content-type", "application/x-www-form-urlencoded").body(body.to_owned());
    let reply = send(form("grant_type=password&scope=system/*.read")).await?;
    token_refused(&reply, 400, "unsupported_grant_type", "grant type");
    let reply = send(form("grant_type=client_credentials&scope=system/*.read&client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion=abc")).await?;
    token_refused(&reply, 401, "invalid_client", "not a JWT");
    let reply = send(anonymous.post(format!("{origin}/auth/token")).json(&json!({ "grant_type": "client_credentials" }))).await?;
    token_refused(&reply, 415, "invalid_request", "JSON body");
    Ok(())
}

/// The same request for two members, with the ids swapped back: equal when the API does not
/// tell them apart.
async fn same_answer(client: &reqwest::Client, fhir: &str, path: &str, id: &str, absent: &str) -> anyhow::Result<()> {
    let Reply { status: s1, headers: h1, body: b1, .. } = get(client, &format!("{fhir}/{}", path.replace("{}", id))).await?;
    let Reply { status: s2, headers: h2, body: b2, .. } = get(client, &format!("{fhir}/{}", path.replace("{}", absent))).await?;
    let b2 = serde_json::from_str::<Value>(&b2.to_string().replace(absent, id))?;
    assert_eq!((s1, &b1), (s2, &b2), "{path}: another partner's member vs no member");
    for h in ["content-type", "etag", "last-modified", "www-authenticate"] {
        assert_eq!(h1.get(h), h2.get(h), "{path}: header {h}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_read_only_their_members_within_their_rate_and_everything_is_audited() -> anyhow::Result<()> {
    let app = TestApp::new("partners").await?;
    let pool = &app.pool;
    compose(&app).await?;
    let origin = app.api(&[]).await?;
    let fhir = format!("{origin}/fhir");
    let pa = app.partner("pa", "system/*.read", KeyKind::Es384).await?;
    let pb = app.partner("pb", "system/*.read", KeyKind::Rs384).await?;
    let (a, b) = (pa.client(&origin).await?, pb.client(&origin).await?);
    let mut requests_by = std::collections::HashMap::<&str, usize>::from([("pa", 1), ("pb", 1)]); // the token requests

    let ms_of = |member: &str| {
        let record = format!("urn:sor:rx-claims/MedicationStatement/RX-{member}");
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, record.as_bytes()).to_string()
    };
    let (ms_a, ms_b) = (ms_of("A1"), ms_of("B1"));
    let absent_ms = uuid::Uuid::new_v4().to_string();

    // Each reads its own members.
    for (client, partner, member, ms) in [(&a, "pa", "A1", &ms_a), (&b, "pb", "B1", &ms_b)] {
        for path in [
            format!("Patient/{member}"),
            format!("Patient/{member}/_history/1"),
            format!("Patient/{member}/_history"),
            format!("Patient/{member}/$medication-profile"),
            format!("MedicationStatement/{ms}"),
            format!("MedicationStatement/{ms}/_history/1"),
            format!("MedicationStatement/{ms}/_history"),
        ] {
            let Reply { status: s, body, .. } = get(client, &format!("{fhir}/{path}")).await?;
            assert_eq!(s, 200, "{partner} {path}: {body}");
        }
        let Reply { body: page, .. } = get(client, &format!("{fhir}/MedicationStatement")).await?;
        assert_eq!(page["total"], 1, "{partner} searches only its members: {page}");
        assert_eq!(page["entry"][0]["resource"]["subject"]["reference"], format!("Patient/{member}"));
        let Reply { body: page, .. } = get(client, &format!("{fhir}/Patient")).await?;
        assert_eq!(page["total"], 1, "{partner}: {page}");
        *requests_by.get_mut(partner).expect("known") += 9;
    }

    // Every attempt on the other's member (or on one whose attribution ended) answers exactly
    // as for a member that does not exist.
    for (client, partner, theirs, theirs_ms) in [(&a, "pa", "B1", &ms_b), (&b, "pb", "A1", &ms_a), (&a, "pa", "C1", &ms_of("C1"))] {
        for path in [
            "Patient/{}",
            "Patient/{}/_history/1",
            "Patient/{}/_history",
            "Patient/{}/$medication-profile",
            "Patient?_id={}",
            "MedicationStatement?patient={}",
            "MedicationStatement?patient=Patient/{}&status=active",
        ] {
            same_answer(client, &fhir, path, theirs, "NOBODY").await?;
        }
        for path in ["MedicationStatement/{}", "MedicationStatement/{}/_history/1", "MedicationStatement/{}/_history"] {
            same_answer(client, &fhir, path, theirs_ms, &absent_ms).await?;
        }
        *requests_by.get_mut(partner).expect("known") += 20;
    }

    // A burst over the limit gets 429 with Retry-After; the other partners are unaffected.
    let hasty = register_partner(pool, "hasty", "system/*.read", KeyKind::Es384, Some((0.5, 5))).await?;
    let h = hasty.client(&origin).await?;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let reply = get(&h, &format!("{fhir}/Patient/NOBODY")).await?;
        if reply.status == 429 {
            reply.assert_refused(429, "burst");
            let retry: u64 = reply.headers["retry-after"].to_str()?.parse()?;
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
        }
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [404, 404, 404, 404, 404, 429, 429, 429]);
    for (client, member) in [(&a, "A1"), (&b, "B1")] {
        assert_eq!(get(client, &format!("{fhir}/Patient/{member}")).await?.status, 200, "other partners are not throttled");
    }
    *requests_by.get_mut("pa").expect("known") += 1;
    *requests_by.get_mut("pb").expect("known") += 1;

    // The audit trail: exactly one record per request, searchable by partner and by member.
    let ops = app.partner("ops", "system/AuditEvent.read", KeyKind::Es384).await?;
    let o = bearer_client(&ops.token_with(&origin, "system/AuditEvent.read").await?)?;
    for (partner, count) in &requests_by {
        let Reply { status: s, body: page, .. } = get(&o, &format!("{fhir}/AuditEvent?agent={partner}&_count=1")).await?;
        assert_eq!(s, 200, "{page}");
        assert_eq!(page["total"], *count as i64, "audit records of {partner}");
    }
    let Reply { body: page, .. } = get(&o, &format!("{fhir}/AuditEvent?agent=hasty&_count=100")).await?;
    let outcomes: Vec<&str> =
        page["entry"].as_array().into_iter().flatten().map(|e| e["resource"]["outcomeDesc"].as_str().unwrap_or_default()).collect();
    assert_eq!(outcomes.iter().filter(|o| o.starts_with("HTTP 429")).count(), 3, "{outcomes:?}");
    // Searching by member finds pa's attempts on B1, which pa never saw.
    let Reply { body: page, .. } = get(&o, &format!("{fhir}/AuditEvent?patient=B1&agent=pa&_count=100")).await?;
    let entries = page["entry"].as_array().cloned().unwrap_or_default();
    assert!(entries.len() >= 5, "{page}");
    for e in &entries {
        let event = &e["resource"];
        assert_eq!(event["resourceType"], "AuditEvent");
        assert_eq!(event["agent"][0]["who"]["identifier"]["value"], "pa");
        assert!(event["entity"].as_array().into_iter().flatten().any(|x| x["what"]["reference"] == "Patient/B1"), "{event}");
        if event["subtype"][0]["code"] != "search-type" {
            assert_eq!(event["outcome"], "4", "a refused read is a minor failure: {event}");
        }
    }
    // Reading B1's data as pb is a success on B1's record.
    let Reply { body: page, .. } = get(&o, &format!("{fhir}/AuditEvent?patient=Patient/B1&agent=pb&subtype=operation")).await?;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["entry"][0]["resource"]["outcome"], "0");
    let id = page["entry"][0]["resource"]["id"].as_str().unwrap_or_default().to_owned();
    let Reply { status: s, body: event, .. } = get(&o, &format!("{fhir}/AuditEvent/{id}")).await?;
    assert_eq!((s, &event["id"]), (200, &json!(id)));
    // Partners cannot read the audit trail, even with a wildcard scope.
    get(&a, &format!("{fhir}/AuditEvent")).await?.assert_refused(403, "partner reading audit");
    *requests_by.get_mut("pa").expect("known") += 1;

    // Append-only.
    assert!(sqlx::query("UPDATE audit_events SET status = 200").execute(pool).await.is_err());
    assert!(sqlx::query("DELETE FROM audit_events").execute(pool).await.is_err());

    // Every audit record reaches audit.events.v1, as an AuditEvent keyed by its partner.
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(pool).await?;
    eventually(Duration::from_secs(30), "the audit relay to publish every event", || async {
        Ok((db::audit::unpublished(pool).await? == 0).then_some(()))
    })
    .await?;
    let topic = format!("{}.{}", api_topic_prefix(&app.url), platform::topics::AUDIT_EVENTS);
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("audit-reader"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut ids = std::collections::BTreeSet::new();
    let mut pa_on_topic = 0;
    while (ids.len() as i64) < total {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let event: Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        assert_eq!(event["resourceType"], "AuditEvent");
        let key = std::str::from_utf8(m.key().unwrap_or_default())?.to_owned();
        assert_eq!(event["agent"][0]["who"]["identifier"]["value"].as_str().unwrap_or("-"), key);
        if key == "pa" {
            pa_on_topic += 1;
        }
        ids.insert(event["id"].as_str().unwrap_or_default().parse::<i64>()?);
    }
    assert_eq!(ids.len() as i64, total);
    assert_eq!(pa_on_topic, requests_by["pa"]);
    Ok(())
}

/// One group commit stores each record's own member ids (none, one, several) and nullable fields
/// as given, and each record then waits for the audit relay.
/// Two API instances share every partner's buckets (issue 27): hammered through both at once,
/// a partner gets its rate in total (a burst of 10, then 20/s), not that rate from each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_in_total_across_api_instances() -> anyhow::Result<()> {
    let app = TestApp::new("shared_limits").await?;
    let origins = [app.api(&[]).await?, app.api(&[]).await?];
    let (rate, burst) = (20.0, 10);
    let partner = register_partner(&app.pool, "busy", "system/*.read", KeyKind::Es384, Some((rate, burst))).await?;
    let mut clients = Vec::new();
    for origin in origins.iter().chain(&origins) {
        clients.push((partner.client(origin).await?, format!("{origin}/fhir/Patient/NOBODY")));
    }
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(3);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(client, url)| {
            tokio::spawn(async move {
                let (mut served, mut refused) = (0u32, 0u32);
                while std::time::Instant::now() < deadline {
                    let reply = get(&client, &url).await?;
                    match reply.status {
                        404 => served += 1,
                        429 => {
                            reply.assert_refused(429, "over the shared rate");
                            refused += 1;
                        }
                        other => anyhow::bail!("unexpected {other}: {}", reply.body),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                anyhow::Ok((served, refused))
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for task in tasks {
        let (s, r) = task.await??;
        served += s;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = f64::from(burst) + rate * elapsed;
    println!("{served} served and {refused} refused in {elapsed:.2} s through two instances; the limit allows {allowed:.1}");
    assert!(refused > served, "the clients did not press hard enough to test the limit");
    assert!(f64::from(served) <= allowed * 1.1 && f64::from(served) >= allowed * 0.9, "{served} served, {allowed:.1} allowed in total");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_audit_records_is_stored_exactly() -> anyhow::Result<()> {
    let (_, pool) = fresh_database("audit_group", true).await?;
    let record = |partner: Option<&str>, members: &[&str], status: i16, key: Option<&str>| db::audit::AuditRecord {
        partner_id: partner.map(str::to_owned),
        operation: "search".into(),
        resource_type: Some("MedicationStatement".into()),
        member_ids: members.iter().map(|m| m.to_string()).collect(),
        method: "GET".into(),
        path: "/fhir/MedicationStatement".into(),
        status,
        outcome: if status < 400 { "0" } else { "4" }.into(),
        key_id: key.map(str::to_owned),
        decision: key.map(|_| "match".to_owned()),
    };
    let records = vec![
        record(Some("pa"), &["M1", "M2", "M3"], 200, None),
        record(None, &[], 401, None),
        record(Some("pb"), &["M4"], 200, Some("k1")),
        record(Some("pa"), &[], 404, None),
        record(Some("pb"), &["M5", "M6"], 200, None),
    ];
    db::audit::append(&pool, &records).await?;
    let (total, rows) = db::audit::search(&pool, &db::audit::Criteria::default(), None, 100).await?;
    assert_eq!(total, 5);
    assert_eq!(rows.iter().map(|r| r.record.clone()).collect::<Vec<_>>(), records);
    assert_eq!(db::audit::unpublished(&pool).await?, 5);
    Ok(())
}

/// The audit relay follows the trail in the order its transactions ended: an event whose
/// transaction commits after later ones is neither skipped nor overtaken by the cursor, and
/// each claim resumes exactly where the last one was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_relay_never_skips_an_event_that_commits_late() -> anyhow::Result<()> {
    let (_, pool) = fresh_database("audit_late", true).await?;
    let record = |path: &str| db::audit::AuditRecord {
        partner_id: Some("pa".into()),
        operation: "read".into(),
        resource_type: Some("Patient".into()),
        member_ids: vec!["M1".into()],
        method: "GET".into(),
        path: path.into(),
        status: 200,
        outcome: "success".into(),
        key_id: None,
        decision: None,
    };
    let claim = |limit: i64| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            let claim = db::audit::claim_unpublished(&mut tx, limit).await?;
            db::audit::mark_published(&mut tx, claim.after).await?;
            tx.commit().await?;
            anyhow::Ok(claim.rows.into_iter().map(|r| r.record.path).collect::<Vec<_>>())
        }
    };
    // A transaction writes an event (taking the smaller id) and is still running while a later
    // one commits its own.
    let mut late = pool.begin().await?;
    sqlx::query("INSERT INTO audit_events (operation, method, path, status, outcome) VALUES ('read', 'GET', '/late', 200, 'success')")
        .execute(&mut *late)
        .await?;
    db::audit::append(&pool, &[record("/early")]).await?;
    assert_eq!(claim(100).await?, Vec::<String>::new(), "no event passes a transaction still running");
    assert_eq!(db::audit::unpublished(&pool).await?, 1, "the committed event waits");
    late.commit().await?;
    db::audit::append(&pool, &[record("/after")]).await?;
    // Transactions of other databases on the same server (other tests) may hold the horizon
    // back for a moment: the relay waits, as it would behind any transaction still running.
    let first = eventually(Duration::from_secs(30), "the late event to be claimable", || async {
        let mut tx = pool.begin().await?;
        let claim = db::audit::claim_unpublished(&mut tx, 2).await?;
        if claim.rows.len() < 2 {
            return Ok(None);
        }
        db::audit::mark_published(&mut tx, claim.after).await?;
        tx.commit().await?;
        Ok(Some(claim.rows.into_iter().map(|r| r.record.path).collect::<Vec<_>>()))
    })
    .await?;
    assert_eq!(first, ["/late", "/early"], "in the order of their transactions, the late one first");
    assert_eq!(db::audit::unpublished(&pool).await?, 1);
    let rest = eventually(Duration::from_secs(30), "the last event to be claimable", || async {
        let paths = claim(100).await?;
        Ok((!paths.is_empty()).then_some(paths))
    })
    .await?;
    assert_eq!(rest, ["/after"], "each claim resumes after the last one acknowledged");
    assert_eq!(db::audit::unpublished(&pool).await?, 0);
    assert_eq!(claim(100).await?, Vec::<String>::new(), "nothing is published twice");
    Ok(())
}
