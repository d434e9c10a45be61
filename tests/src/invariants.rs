//! What must hold of the stored composites after any run.

/// A composite's content: the Bundle without `meta` and `timestamp` (the time of the change),
/// and without its insights' `identifiedDateTime` (the time each was found).
pub fn content(body: &str) -> anyhow::Result<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(body)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("meta");
        o.remove("timestamp");
    }
    for entry in v.get_mut("entry").and_then(serde_json::Value::as_array_mut).into_iter().flatten() {
        if let Some(r) = entry.get_mut("resource").and_then(serde_json::Value::as_object_mut) {
            r.remove("identifiedDateTime");
        }
    }
    Ok(v)
}

/// What must hold of insights after any run, interrupted or not:
/// - each DetectedIssue's versions are 1..n, no gaps or repeats, each a change of content;
/// - each member's `fhir.insights.v1` outbox rows are versions 1..n in order, with unique event
///   ids, the last one the member's current Bundle, each an R4B Bundle whose DetectedIssues are
///   about the member.
///
/// Returns the number of DetectedIssue versions checked.
pub async fn check_insight_invariants(pool: &db::Pool) -> anyhow::Result<usize> {
    use anyhow::ensure;
    use std::collections::{BTreeMap, HashSet};
    let versions: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT resource_id, version_id, body::text FROM resource_history WHERE resource_type = 'DetectedIssue' ORDER BY resource_id, version_id",
    )
    .fetch_all(pool)
    .await?;
    let mut by_id: BTreeMap<&str, Vec<(i64, Option<&str>)>> = BTreeMap::new();
    for (id, v, body) in &versions {
        by_id.entry(id).or_default().push((*v, body.as_deref()));
    }
    for (id, list) in &by_id {
        for (i, (v, body)) in list.iter().enumerate() {
            ensure!(*v == i as i64 + 1, "DetectedIssue/{id}: versions {:?}", list.iter().map(|(v, _)| *v).collect::<Vec<_>>());
            let body = body.ok_or_else(|| anyhow::anyhow!("DetectedIssue/{id} v{v}: no body"))?;
            fhir::mapping::parse_detected_issue(body).map_err(|e| anyhow::anyhow!("DetectedIssue/{id} v{v}: {e}"))?;
            ensure!(i == 0 || list[i - 1].1 != Some(body), "DetectedIssue/{id}: v{v} repeats v{}", v - 1);
        }
    }
    let rows: Vec<(String, i64, uuid::Uuid, Option<String>)> =
        sqlx::query_as("SELECT member_id, version_id, event_id, payload::text FROM outbox WHERE topic = $1 ORDER BY id")
            .bind(platform::topics::INSIGHTS)
            .fetch_all(pool)
            .await?;
    let current: BTreeMap<String, (i64, String)> =
        sqlx::query_as::<_, (String, i64, String)>("SELECT member_id, version_id, body FROM insight_bundles")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(m, v, b)| (m, (v, b)))
            .collect();
    let mut next: BTreeMap<&str, i64> = BTreeMap::new();
    let mut last: BTreeMap<&str, &str> = BTreeMap::new();
    let mut ids = HashSet::new();
    for (member, version, event_id, payload) in &rows {
        let expected = next.entry(member).or_insert(1);
        ensure!(version == expected, "{member}: insights outbox version {version} where {expected} was next");
        *expected += 1;
        ensure!(ids.insert(*event_id), "duplicate insights event id {event_id}");
        let payload = payload.as_deref().ok_or_else(|| anyhow::anyhow!("{member} insights v{version}: no payload"))?;
        let bundle = fhir::mapping::parse_bundle(payload).map_err(|e| anyhow::anyhow!("{member} insights v{version}: {e}"))?;
        let (_, links) = fhir::mapping::bundle_patient_links(&bundle);
        for (kind, id, reference) in links {
            ensure!(
                kind == "DetectedIssue" && reference == format!("Patient/{member}"),
                "{member} insights v{version}: {kind}/{id} references {reference:?}"
            );
        }
        last.insert(member, payload);
    }
    ensure!(last.len() == current.len(), "{} members with insights records, {} current Bundles", last.len(), current.len());
    for (member, payload) in last {
        let (version, body) = current.get(member).ok_or_else(|| anyhow::anyhow!("{member}: insights records without a current Bundle"))?;
        ensure!(next[member] - 1 == *version, "{member}: current insights Bundle v{version} is not the last record");
        let same = serde_json::from_str::<serde_json::Value>(payload)? == serde_json::from_str::<serde_json::Value>(body)?;
        ensure!(same, "{member}: the last insights record differs from the current Bundle");
    }
    Ok(versions.len())
}

/// What must hold of stored composites after any run, interrupted or not:
/// - each member's history is versions 1..n, no gaps or repeats, and the current row is the last;
/// - consecutive versions differ in content (a version only when content changes);
/// - the outbox has exactly one row per history row, in version order per member, with the
///   same body (or a tombstone), keyed by member, with unique event ids;
/// - every stored body parses with fhir-sdk as an R4B Bundle whose id and versionId match, with
///   the member's Patient and every other entry referencing `Patient/<member>`.
///
/// Returns the number of versions checked.
pub async fn check_composite_invariants(pool: &db::Pool) -> anyhow::Result<usize> {
    use anyhow::{bail, ensure};
    use db::composites::{all_composites, all_history, all_outbox};
    use std::collections::{BTreeMap, HashSet};

    let history = all_history(pool).await?;
    let current: BTreeMap<String, db::composites::VersionRow> = all_composites(pool).await?.into_iter().map(|c| (c.member_id.clone(), c)).collect();
    let mut by_member: BTreeMap<&str, Vec<&db::composites::VersionRow>> = BTreeMap::new();
    for h in &history {
        by_member.entry(&h.member_id).or_default().push(h);
    }
    ensure!(by_member.len() == current.len(), "{} members with history, {} composites", by_member.len(), current.len());
    for (member, versions) in &by_member {
        for (i, v) in versions.iter().enumerate() {
            ensure!(v.version_id == i as i64 + 1, "{member}: history versions {:?}", versions.iter().map(|v| v.version_id).collect::<Vec<_>>());
            ensure!(v.deleted == v.body.is_none(), "{member} v{}: deleted flag and body disagree", v.version_id);
            if let Some(body) = &v.body {
                check_bundle(member, v.version_id, body)?;
            }
            if i > 0 {
                let prev = versions[i - 1];
                let same = match (&prev.body, &v.body) {
                    (Some(a), Some(b)) => content(a)? == content(b)?,
                    (None, None) => true,
                    _ => false,
                };
                ensure!(!same, "{member}: v{} repeats v{} without a content change", v.version_id, prev.version_id);
            }
        }
        let last = versions.last().expect("non-empty");
        let cur = current.get(*member).ok_or_else(|| anyhow::anyhow!("{member}: history without a composite"))?;
        ensure!(cur == *last, "{member}: current composite is not the last history version");
    }

    let outbox = all_outbox(pool).await?;
    ensure!(outbox.len() == history.len(), "{} outbox rows for {} versions", outbox.len(), history.len());
    let mut ids = HashSet::new();
    let mut next_version: BTreeMap<&str, i64> = BTreeMap::new();
    let by_key: BTreeMap<(&str, i64), &db::composites::VersionRow> = history.iter().map(|h| ((h.member_id.as_str(), h.version_id), h)).collect();
    for o in &outbox {
        let (topic, key, event_id, row) = (&o.topic, &o.message_key, &o.event_id, &o.version);
        ensure!(topic == platform::topics::MEDICATION_PROFILE, "outbox topic {topic}");
        ensure!(key == &row.member_id, "outbox key {key} for member {}", row.member_id);
        ensure!(ids.insert(*event_id), "duplicate outbox event id {event_id}");
        let expected = next_version.entry(&row.member_id).or_insert(1);
        ensure!(row.version_id == *expected, "{}: outbox version {} where {} was next", row.member_id, row.version_id, expected);
        *expected += 1;
        match by_key.get(&(row.member_id.as_str(), row.version_id)) {
            Some(h) if *h == row => {}
            _ => bail!("{} v{}: outbox row differs from history", row.member_id, row.version_id),
        }
    }
    Ok(history.len())
}

fn check_bundle(member: &str, version: i64, body: &str) -> anyhow::Result<()> {
    use anyhow::ensure;
    let bundle = fhir::mapping::parse_bundle(body).map_err(|e| anyhow::anyhow!("{member} v{version}: not an R4B Bundle: {e}"))?;
    ensure!(bundle.id.as_deref() == Some(member), "{member}: bundle id {:?}", bundle.id);
    let version_id = bundle.meta.as_ref().and_then(|m| m.version_id.clone());
    ensure!(version_id == Some(version.to_string()), "{member} v{version}: meta.versionId {version_id:?}");
    let (patients, links) = fhir::mapping::bundle_patient_links(&bundle);
    ensure!(patients == [member], "{member} v{version}: Patient entries {patients:?}");
    for (kind, id, reference) in links {
        ensure!(reference == format!("Patient/{member}"), "{member} v{version}: {kind}/{id} references {reference:?}");
    }
    Ok(())
}
