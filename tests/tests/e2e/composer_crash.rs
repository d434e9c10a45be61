//! Issue 3: SIGKILL the composer (a real child process) at three points of a 100k-event stream
//! and restart it; the result must equal an uninterrupted run over the same stream.
//!
//! What "equal" means: intermediate composite versions depend on how events of different
//! topics interleave into batches, which differs between any two runs, interrupted or not. So
//! the comparison is: identical components (every record at the same version, same body),
//! identical current composite content per member, identical deleted members; and in both
//! runs, every history is gapless and changes content at each version, the current composite
//! is its last version, and the outbox holds exactly one row per version in order — nothing
//! lost, duplicated or skipped (`check_composite_invariants`). Insights too: the same open
//! insights in both runs, and in each every DetectedIssue's versions and every member's
//! `fhir.insights.v1` records gapless, in order and without repeats (`check_insight_invariants`).

use devtools::generator::{self, GeneratorConfig};
use std::collections::BTreeMap;
use std::time::Duration;
use tests::*;

/// The composer as a child process, to SIGKILL: three transactions in flight when the kill
/// lands; the reference run has one.
fn start_child(url: &str, prefix: &str) -> anyhow::Result<std::process::Child> {
    spawn_child("composer", url, prefix, &[("COMPOSER_GROUP_ID", "crashing"), ("COMPOSER_APPLIERS", "3")])
}

/// Records (insights apart), live composites' content, and the open insights (without the time
/// each was found). Runs that batch differently may see an insight hold for a moment (and be
/// cancelled) in one and never in the other; what holds at the end is the same.
type Snapshot = (Vec<db::components::ComponentRow>, BTreeMap<String, (bool, Option<serde_json::Value>)>, BTreeMap<String, serde_json::Value>);

async fn snapshot(pool: &db::Pool) -> anyhow::Result<Snapshot> {
    let mut components = db::components::all_components(pool).await?;
    let mut open = BTreeMap::new();
    for c in components.iter().filter(|c| c.kind == fhir::insights::KIND) {
        let mut body: serde_json::Value = serde_json::from_str(c.body.as_deref().unwrap_or("null"))?;
        if body["status"] == fhir::insights::OPEN {
            body.as_object_mut().map(|o| o.remove("identifiedDateTime"));
            open.insert(c.record_id.clone(), body);
        }
    }
    components.retain(|c| c.kind != fhir::insights::KIND);
    let mut composites = BTreeMap::new();
    // A member deleted in the same batch that created it never had a composite row, while in
    // another run it has a deleted one: both mean "no current composite", so only live ones count.
    for c in db::composites::all_composites(pool).await? {
        if let Some(body) = c.body.as_deref() {
            composites.insert(c.member_id, (c.deleted, Some(content(body)?)));
        }
    }
    Ok((components, composites, open))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_three_points_changes_nothing() -> anyhow::Result<()> {
    // The uninterrupted run's database, and the topics both runs consume.
    let app = TestApp::with_database("crash_ref", false).await?;
    platform::kafka::ensure(&app.kafka).await?;
    let cfg = GeneratorConfig { members: 8_600, seed: 7, malformed: 20, ..GeneratorConfig::default() };
    let stream = generator::generate(&cfg);
    let total = stream.len();
    assert!(total >= 100_000, "the stream has {total} events");
    app.publish(&stream).await?;

    step("the uninterrupted run");
    let composer = app.composer(&[]).await?;
    app.wait_applied(Duration::from_secs(600)).await?;
    composer.stop().await?;
    let pool_a = &app.pool;

    step("the interrupted run: SIGKILL at about 20 %, 45 % and 70 % of the stream");
    let (url_b, pool_b) = fresh_database("crash_run", true).await?;
    let mut kills = Vec::new();
    for share in [0.20, 0.45, 0.70] {
        let mut child = start_child(&url_b, &app.prefix)?;
        let target = (total as f64 * share) as i64;
        eventually(Duration::from_secs(600), "progress before the kill", || async {
            Ok((applied_messages(&pool_b, "crashing").await? >= target).then_some(()))
        })
        .await?;
        child.kill()?; // SIGKILL
        child.wait()?;
        kills.push(applied_messages(&pool_b, "crashing").await?);
    }
    let mut child = start_child(&url_b, &app.prefix)?;
    let finished = wait_applied(&pool_b, "crashing", total, Duration::from_secs(600)).await;
    child.kill()?;
    child.wait()?;
    finished?;
    println!("{total} events; killed after {kills:?} applied");
    assert!(kills.windows(2).all(|w| w[0] < w[1]) && kills[2] < total as i64, "three distinct kill points: {kills:?}");

    step("both runs compared");
    let versions_a = check_composite_invariants(pool_a).await?;
    let versions_b = check_composite_invariants(&pool_b).await?;
    println!("composite versions: uninterrupted {versions_a}, interrupted {versions_b}");
    let insights_a = check_insight_invariants(pool_a).await?;
    let insights_b = check_insight_invariants(&pool_b).await?;
    println!("DetectedIssue versions: uninterrupted {insights_a}, interrupted {insights_b}");
    let (a, b) = (snapshot(pool_a).await?, snapshot(&pool_b).await?);
    let keys = |rows: &[db::components::ComponentRow]| -> std::collections::BTreeSet<(String, String, String)> {
        rows.iter().map(|c| (c.kind.clone(), c.source.clone(), c.record_id.clone())).collect()
    };
    let (ka, kb) = (keys(&a.0), keys(&b.0));
    assert_eq!(
        a.0.len(),
        b.0.len(),
        "component count; only uninterrupted: {:?}; only interrupted: {:?}",
        ka.difference(&kb).take(5).collect::<Vec<_>>(),
        kb.difference(&ka).take(5).collect::<Vec<_>>()
    );
    assert!(a.0 == b.0, "components differ between the runs");
    assert_eq!(a.1.len(), b.1.len(), "composite count");
    for (member, composite) in &a.1 {
        assert_eq!(Some(composite), b.1.get(member), "composite of {member}");
    }
    assert!(!a.2.is_empty(), "the stream gives members insights");
    assert!(a.2 == b.2, "the open insights differ between the runs ({} and {})", a.2.len(), b.2.len());
    // Members whose demographics were deleted have no live composite.
    let deleted_members: Vec<&String> = a.0.iter().filter(|c| c.kind == "demographics" && c.deleted).map(|c| &c.member_id).collect();
    assert!(!deleted_members.is_empty(), "the stream deletes some members");
    for member in deleted_members {
        assert!(!a.1.contains_key(member), "{member} still live");
    }
    Ok(())
}

/// A batch that fails in PostgreSQL is retried; the messages polled while it waits (to keep
/// the group membership) start the next batch instead of being dropped, so no event is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_polled_while_a_failed_batch_waits_are_not_lost() -> anyhow::Result<()> {
    let app = TestApp::new("outage").await?;
    let pool = &app.pool;
    let composer = app.composer(&[]).await?;
    app.apply(&[medication("OUT0", "RX-OUT0", 1, "860975", "active")]).await?;

    // Every component write now fails: the next batch is retried with backoff (0.2 s, 0.4 s,
    // 0.8 s, 1.6 s, ...), polling once between attempts.
    sqlx::query("ALTER TABLE components ADD CONSTRAINT outage CHECK (false) NOT VALID").execute(pool).await?;
    app.publish(&[medication("OUT1", "RX-OUT1", 1, "860975", "active")]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later: Vec<_> = (2..30).map(|i| medication(&format!("OUT{i}"), &format!("RX-OUT{i}"), 1, "860975", "active")).collect();
    app.publish(&later).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stalled = db::components::all_components(pool).await?.len();
    sqlx::query("ALTER TABLE components DROP CONSTRAINT outage").execute(pool).await?;

    app.wait_applied(Duration::from_secs(60)).await?;
    let result = eventually(Duration::from_secs(10), "a component for every event", || async {
        let n = db::components::all_components(pool).await?.len();
        Ok((n == 30).then_some(n))
    })
    .await;
    composer.stop().await?;
    let written = db::components::all_components(pool).await?;
    result.map_err(|e| anyhow::anyhow!("{e}: {} of 30 components written ({stalled} during the outage)", written.len()))?;
    assert_eq!(stalled, 1, "nothing was written while the batch failed");
    Ok(())
}
