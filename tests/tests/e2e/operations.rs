//! The operator's commands that act on composites: `fhirctl rebuild` after a bad deploy (only
//! the composites it built wrong get new versions) and `fhirctl replay` (a partner's topic,
//! lost, is complete again; everyone's topics get the current versions again, with no new
//! versions).

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tests::*;

const MEMBERS: usize = 10;

fn member(i: usize) -> String {
    format!("OP{i}")
}

/// The last record per key of `records` (the compacted view a partner keeps).
fn latest(records: &[ReadRecord]) -> BTreeMap<String, ReadRecord> {
    records.iter().map(|r| (r.key.clone(), r.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_gives_new_versions_only_where_a_bad_deploy_left_wrong_content() -> anyhow::Result<()> {
    let app = TestApp::new("rebuild").await?;
    let composer = app.composer(&[]).await?;
    let relay = app.relay(&[]).await?;
    let mut events = Vec::new();
    for i in 0..MEMBERS {
        events.push(demographics(&member(i), json!({ "given_name": "Re", "sex": "male" })));
        events.push(medication(&member(i), &format!("RX-OP{i}"), 1, "860975", "active"));
    }
    app.apply(&events).await?;
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let good = db::composites::all_composites(&app.pool).await?;
    assert_eq!(good.len(), MEMBERS);

    step("a bad deploy: three composites get a version without their medications");
    let topic = platform::topics::MEDICATION_PROFILE;
    let broken: Vec<db::composites::CompositeVersion> = good[..3]
        .iter()
        .map(|c| {
            let mut body: Value = serde_json::from_str(c.body.as_deref().unwrap_or("{}")).unwrap_or_default();
            body["entry"].as_array_mut().map(|e| e.truncate(1));
            body["meta"]["versionId"] = json!((c.version_id + 1).to_string());
            db::composites::CompositeVersion {
                member_id: c.member_id.clone(),
                version_id: c.version_id + 1,
                content_hash: vec![0; 32],
                body: Some(body.to_string()),
                topic: topic.to_owned(),
                event_id: fhir::composite::event_id(topic, &c.member_id, c.version_id + 1),
                traceparent: None,
            }
        })
        .collect();
    let mut tx = app.pool.begin().await?;
    db::composites::write_composites(&mut tx, &broken, time::OffsetDateTime::now_utc()).await?;
    tx.commit().await?;
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;

    step("rebuild one good member: nothing changes");
    let one = app.fhirctl(&["rebuild", "--member", &member(5)])?;
    assert!(one.contains("1 members rebuilt, 0 new versions"), "{one}");
    step("rebuild everyone: the three broken ones, and only they, get new versions");
    let done = app.fhirctl_json(&["rebuild", "--all"])?;
    assert_eq!(done, vec![json!({ "members": MEMBERS, "new_versions": 3 })]);
    let after = db::composites::all_composites(&app.pool).await?;
    for (before, now) in good.iter().zip(&after) {
        let fixed = broken.iter().any(|b| b.member_id == now.member_id);
        assert_eq!(now.version_id, before.version_id + if fixed { 2 } else { 0 }, "{}", now.member_id);
        let entries = |body: &Option<String>| serde_json::from_str::<Value>(body.as_deref().unwrap_or("{}")).map(|b| b["entry"].clone()).ok();
        assert_eq!(entries(&now.body), entries(&before.body), "{}: the content from its components", now.member_id);
    }
    step("rebuild again, and rebuild what changed since the start: nothing new");
    assert_eq!(app.fhirctl_json(&["rebuild", "--all"])?[0]["new_versions"], 0);
    let since = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let since = since.format(&time::format_description::well_known::Rfc3339)?;
    assert_eq!(app.fhirctl_json(&["rebuild", "--since", &since])?, vec![json!({ "members": MEMBERS, "new_versions": 0 })]);

    step("the rebuilt versions are published, in order after the broken ones");
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let published = latest(&read_topic(&app.topic(topic), MEMBERS + 6).await?);
    for c in &after {
        assert_eq!(published[&c.member_id].header("versionId"), c.version_id.to_string(), "{}", c.member_id);
    }
    relay.stop().await?;
    composer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_makes_a_lost_partner_topic_complete_again_without_new_versions() -> anyhow::Result<()> {
    let app = TestApp::new("replay").await?;
    let composer = app.composer(&[]).await?;
    let relay = app.relay(&[]).await?;
    let mut events = Vec::new();
    for i in 0..MEMBERS {
        events.push(demographics(&member(i), json!({ "given_name": "Rp", "sex": "female" })));
        events.push(medication(&member(i), &format!("RX-OP{i}"), 1, "860975", "active"));
        if i < 6 {
            events.push(attribution(&member(i), "prp"));
        }
    }
    // Two more versions for OP0: the partner's copy must end with the latest.
    events.push(medication(&member(0), "RX-OP0", 2, "860975", "stopped"));
    app.apply(&events).await?;
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let current: BTreeMap<String, i64> = db::composites::all_composites(&app.pool).await?.into_iter().map(|c| (c.member_id, c.version_id)).collect();
    let partner_topic = app.topic(&platform::topics::partner_profile("prp"));
    assert_eq!(latest(&read_topic(&partner_topic, 6).await?).len(), 6);

    step("the partner's topic is lost (deleted on the broker), and the relay restarted");
    relay.stop().await?;
    let admin = admin_client()?;
    let deleted = admin.delete_topics(&[partner_topic.as_str()], &rdkafka::admin::AdminOptions::new()).await?;
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    let topic_gone = || async {
        let metadata = admin.inner().fetch_metadata(Some(&partner_topic), Duration::from_secs(5));
        Ok(metadata.map(|m| m.topics().iter().all(|t| t.partitions().is_empty())).unwrap_or(true).then_some(()))
    };
    eventually(Duration::from_secs(30), "the topic deleted", topic_gone).await?;
    let relay = app.relay(&[]).await?;

    step("replay for that partner: its topic holds every attributed member's current version again");
    let versions_before = db::composites::all_composites(&app.pool).await?;
    assert!(app.fhirctl(&["replay", "--all", "--partner", "prp"])?.contains("6 current composites queued for partner prp's topic"));
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let again = latest(&read_topic(&partner_topic, 6).await?);
    assert_eq!(again.keys().cloned().collect::<Vec<_>>(), (0..6).map(member).collect::<Vec<_>>());
    for (m, record) in &again {
        assert_eq!(record.header("versionId"), current[m].to_string(), "{m}");
        assert!(record.value.is_some(), "{m}");
    }

    step("replay everyone's: the main topic gets each current version again, with its event id");
    let main = app.topic(platform::topics::MEDICATION_PROFILE);
    let before = read_topic(&main, MEMBERS).await?.len();
    let queued = app.fhirctl_json(&["replay", "--all"])?;
    assert_eq!(queued[0]["queued"], MEMBERS);
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let records = read_topic(&main, before + MEMBERS).await?;
    assert_eq!(records.len(), before + MEMBERS);
    for (m, version) in &current {
        let event_id = fhir::composite::event_id(platform::topics::MEDICATION_PROFILE, m, *version).to_string();
        let sent = records.iter().filter(|r| r.key == *m && r.header("event_id") == event_id && r.header("versionId") == version.to_string()).count();
        assert_eq!(sent, 2, "{m} v{version}: published when written and when replayed");
    }
    assert_eq!(
        latest(&records).iter().map(|(m, r)| (m.clone(), r.header("versionId").parse::<i64>().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
        current
    );
    assert_eq!(db::composites::all_composites(&app.pool).await?, versions_before, "a replay makes no new version");
    relay.stop().await?;
    composer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_every_table_and_drops_an_audit_month_only_after_its_verified_export() -> anyhow::Result<()> {
    let app = TestApp::new("retention").await?;
    let composer = app.composer(&[]).await?;
    let relay = app.relay(&["--retention-interval-secs", "0"]).await?;
    let notifier = app.notifier(&[]).await?;
    let origin = app.api(&[]).await?;
    let scopes = "system/*.read system/Subscription.write";
    let partner = bearer_client(&app.partner("pret", scopes, KeyKind::Es384).await?.token_with(&origin, scopes).await?)?;
    kafka_subscription(&partner, &origin, "retention").await?;
    let mut events: Vec<_> = (0..MEMBERS).map(|i| attribution(&member(i), "pret")).collect();
    app.apply(&events).await?;
    events.clear();
    for version in 1..=3 {
        for i in 0..MEMBERS {
            let data = json!({ "given_name": format!("Ret{version}"), "sex": "male" });
            events.push(upsert(platform::topics::DEMOGRAPHICS, "enrollment", version, &member(i), &member(i), data));
        }
        app.apply(&events).await?;
        events.clear();
    }
    wait_relayed(&app.pool, Duration::from_secs(30)).await?;
    let count = |sql: &'static str| {
        let pool = app.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    eventually(Duration::from_secs(20), "every event delivered", || async {
        Ok((count("SELECT count(*) FROM subscription_events WHERE delivered_at IS NULL").await? == 0).then_some(()))
    })
    .await?;

    step("time passes: half the applied ids, every published row, delivered event and version written a month ago");
    let exec = |sql: &'static str| {
        let pool = app.pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.map(|r| r.rows_affected()) }
    };
    let applied = count("SELECT count(*) FROM applied_events").await?;
    let old_applied = exec("UPDATE applied_events SET applied_at = now() - interval '30 days' WHERE event_id IN (SELECT event_id FROM applied_events ORDER BY event_id LIMIT (SELECT count(*) / 2 FROM applied_events))").await?;
    let old_outbox = exec("UPDATE outbox SET published_at = now() - interval '30 days' WHERE published_at IS NOT NULL").await?;
    let old_events = exec("UPDATE subscription_events SET delivered_at = now() - interval '30 days' WHERE delivered_at IS NOT NULL").await?;
    exec("UPDATE composite_history SET last_updated = now() - interval '30 days'").await?;
    exec("UPDATE resource_history SET last_updated = now() - interval '30 days'").await?;
    let replaced_versions =
        count("SELECT count(*) FROM composite_history h JOIN composites c USING (member_id) WHERE h.version_id < c.version_id").await?;
    let replaced_resources = count(
        "SELECT count(*) FROM resource_history h WHERE EXISTS (SELECT 1 FROM resource_history n
           WHERE n.resource_type = h.resource_type AND n.resource_id = h.resource_id AND n.version_id > h.version_id)",
    )
    .await?;
    let backdated = (old_applied, old_outbox, old_events, replaced_versions, replaced_resources);
    assert!(old_applied > 0 && old_outbox > 0 && old_events > 0 && replaced_versions >= MEMBERS as i64 && replaced_resources > 0, "{backdated:?}");

    step("an audit month two years ago, relayed to audit.events.v1 like the rest");
    let january = time::macros::datetime!(2025-01-15 12:00 UTC);
    db::audit::ensure_partition_for(&app.pool, january).await?;
    let old_audit = 50;
    sqlx::query(
        "INSERT INTO audit_events (recorded_at, partner_id, operation, method, path, status, outcome)
         SELECT $1 + make_interval(mins => n), 'pret', 'read', 'GET', '/fhir/Patient', 200, 'success' FROM generate_series(1, $2) AS n",
    )
    .bind(january)
    .bind(old_audit)
    .execute(&app.pool)
    .await?;
    let recent_audit = count("SELECT count(*) FROM audit_events WHERE recorded_at > now() - interval '1 day'").await?;
    assert!(recent_audit > 0, "the test's requests are audited");
    eventually(Duration::from_secs(30), "the trail relayed", || async { Ok((db::audit::unpublished(&app.pool).await? == 0).then_some(())) }).await?;

    step("retention: each table bounded, the month exported, verified and dropped");
    let export = state_dir().join(unique("audit-export"));
    let export_dir = export.display().to_string();
    let run =
        ["retention", "run", "--retention-history-days", "7", "--retention-audit-months", "12", "--retention-audit-export-dir", export_dir.as_str()];
    let report = app.fhirctl_json(&run)?.pop().unwrap_or_default();
    assert_eq!(report["skipped"], false, "{report}");
    assert_eq!(report["deleted"]["applied_events"], old_applied, "{report}");
    assert_eq!(report["deleted"]["outbox"], old_outbox, "{report}");
    assert_eq!(report["deleted"]["subscription_events"], old_events, "{report}");
    assert_eq!(report["deleted"]["composite_history"], replaced_versions, "{report}");
    assert_eq!(report["deleted"]["resource_history"], replaced_resources, "{report}");
    assert_eq!(count("SELECT count(*) FROM applied_events").await?, applied - old_applied as i64);
    assert_eq!(count("SELECT count(*) FROM composite_history").await?, MEMBERS as i64, "the current versions stay");
    for i in 0..MEMBERS {
        assert!(db::composites::current_composite(&app.pool, &member(i)).await?.is_some_and(|c| c.body.is_some()), "{}", member(i));
    }
    let manifests: Vec<String> = report["audit"].as_array().into_iter().flatten().filter_map(|m| m.as_str().map(str::to_owned)).collect();
    assert_eq!(manifests.len(), 1, "{report}");
    assert!(manifests[0].ends_with("audit_events_2025_01.manifest.json"), "{manifests:?}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifests[0])?)?;
    assert_eq!(manifest["rows"], old_audit);
    // The export, checked here independently of fhirctl: its SHA-256, then its lines.
    let file = export.join(manifest["file"].as_str().unwrap_or_default());
    let bytes = std::fs::read(&file)?;
    let digest: String = ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(manifest["sha256"], digest);
    let lines = std::process::Command::new("gzip").arg("-dc").arg(&file).output()?;
    let events: Vec<Value> = String::from_utf8(lines.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(events.len(), old_audit as usize);
    assert!(events.iter().all(|e| e["resourceType"] == "AuditEvent" && e["recorded"].as_str().unwrap_or_default().starts_with("2025-01")));
    assert!(app.fhirctl(&["retention", "verify", &manifests[0]])?.contains(&format!("{old_audit} events")));
    let partitions: Vec<String> = db::audit::partitions(&app.pool).await?.into_iter().map(|p| p.name).collect();
    assert!(!partitions.contains(&"audit_events_2025_01".to_owned()), "{partitions:?}");
    assert_eq!(count("SELECT count(*) FROM audit_events WHERE recorded_at < '2026-01-01'").await?, 0);
    assert!(count("SELECT count(*) FROM audit_events").await? >= recent_audit, "this month's trail stays");

    step("a second run finds nothing; a tampered export fails verification");
    let again = app.fhirctl_json(&run)?.pop().unwrap_or_default();
    assert!(again["deleted"].as_object().is_some_and(|d| d.values().all(|n| n == 0)), "{again}");
    let mut tampered = bytes.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0xff;
    std::fs::write(&file, tampered)?;
    assert!(app.fhirctl(&["retention", "verify", &manifests[0]]).is_err(), "a changed byte is found");
    std::fs::remove_dir_all(&export)?;
    notifier.stop().await?;
    relay.stop().await?;
    composer.stop().await
}
