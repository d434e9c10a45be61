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
