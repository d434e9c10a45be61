//! Insights' own state beside their components (`fhir::insights`): each member's
//! `fhir.insights.v1` Bundle and its outbox rows, the day each member is evaluated again, and
//! the knowledge bases used.

use crate::composites::{CompositeState, CompositeVersion, VersionColumns};
use sqlx::{PgConnection, PgPool};
use time::{Date, OffsetDateTime};

/// Sets the day each member's insights are to be evaluated again (unchanged rows are not
/// rewritten).
pub async fn set_rechecks(tx: &mut PgConnection, rechecks: &[(String, Date)]) -> crate::Result<()> {
    if rechecks.is_empty() {
        return Ok(());
    }
    let (members, days): (Vec<&str>, Vec<Date>) = rechecks.iter().map(|(m, d)| (m.as_str(), *d)).unzip();
    sqlx::query(
        "INSERT INTO insight_rechecks (member_id, recheck_on) SELECT * FROM unnest($1::text[], $2::date[])
         ON CONFLICT (member_id) DO UPDATE SET recheck_on = EXCLUDED.recheck_on WHERE insight_rechecks.recheck_on <> EXCLUDED.recheck_on",
    )
    .bind(&members)
    .bind(&days)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Clears the rechecks of `members` due on or before `today` (they were just rebuilt; a day to
/// come that the rebuild set stays).
pub async fn clear_rechecks(pool: &PgPool, members: &[String], today: Date) -> crate::Result<()> {
    sqlx::query("DELETE FROM insight_rechecks WHERE member_id = ANY($1) AND recheck_on <= $2").bind(members).bind(today).execute(pool).await?;
    Ok(())
}

/// Members due to be evaluated again on `today`, at most `limit`, in member order.
pub async fn due_rechecks(pool: &PgPool, today: Date, limit: i64) -> crate::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT member_id FROM insight_rechecks WHERE recheck_on <= $1 ORDER BY member_id LIMIT $2")
        .bind(today)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Each of `members`' current insights Bundle (a Bundle is never deleted).
pub async fn bundle_states(tx: &mut PgConnection, members: &[String]) -> crate::Result<Vec<CompositeState>> {
    Ok(sqlx::query_as("SELECT member_id, version_id, false AS deleted, content_hash FROM insight_bundles WHERE member_id = ANY($1)")
        .bind(members)
        .fetch_all(&mut *tx)
        .await?)
}

/// A new version of a member's insights Bundle: versioned like a composite (its body always
/// there), with the DetectedIssue versions it brought, for the notifier.
#[derive(Debug, Clone)]
pub struct BundleVersion {
    pub version: CompositeVersion,
    pub changes: Vec<InsightChange>,
}

/// A new version of one DetectedIssue, as subscriptions filter it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InsightChange {
    pub id: String,
    pub version: i64,
    pub code: String,
    pub severity: String,
}

/// Stores new Bundle versions and their outbox rows (the body as the row's payload).
pub async fn write_bundles(tx: &mut PgConnection, versions: &[BundleVersion], now: OffsetDateTime) -> crate::Result<()> {
    if versions.is_empty() {
        return Ok(());
    }
    let c = VersionColumns::of(versions.iter().map(|b| &b.version));
    let bodies: Vec<&str> = versions.iter().map(|b| b.version.body.as_deref().unwrap_or("{}")).collect();
    let changes: Vec<String> = versions.iter().map(|v| serde_json::to_string(&v.changes).unwrap_or_else(|_| "[]".into())).collect();
    sqlx::query(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::text[], $5::text[], $6::uuid[], $8::text[], $9::jsonb[])
                    AS v(member_id, version_id, content_hash, body, topic, event_id, traceparent, changes)),
         cur AS (
           INSERT INTO insight_bundles (member_id, version_id, content_hash, last_updated, body)
           SELECT member_id, version_id, content_hash, $7, body FROM v
           ON CONFLICT (member_id) DO UPDATE SET version_id = EXCLUDED.version_id, content_hash = EXCLUDED.content_hash,
             last_updated = EXCLUDED.last_updated, body = EXCLUDED.body)
         INSERT INTO outbox (topic, message_key, event_id, member_id, version_id, traceparent, payload, changes)
         SELECT topic, member_id, event_id, member_id, version_id, traceparent, body::json, changes FROM v ORDER BY member_id, version_id",
    )
    .bind(&c.members)
    .bind(&c.ids)
    .bind(&c.hashes)
    .bind(&bodies)
    .bind(&c.topics)
    .bind(&c.events)
    .bind(now)
    .bind(&c.traces)
    .bind(&changes)
    .execute(&mut *tx)
    .await?;
    crate::notify(tx, crate::channels::OUTBOX).await
}

/// The current insights Bundle of each of `members` that has one: (member, version, body).
pub async fn current_bundles(tx: &mut PgConnection, members: &[String]) -> crate::Result<Vec<(String, i64, String)>> {
    Ok(sqlx::query_as("SELECT member_id, version_id, body FROM insight_bundles WHERE member_id = ANY($1) ORDER BY member_id")
        .bind(members)
        .fetch_all(&mut *tx)
        .await?)
}

/// A knowledge base the platform derived insights with.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredKnowledgeBase {
    pub version: String,
    pub digest: String,
    pub body: String,
    pub applied_at: Option<OffsetDateTime>,
}

/// The knowledge base whose insights every member has: the last one applied.
pub async fn applied_knowledge_base(pool: &PgPool) -> crate::Result<Option<StoredKnowledgeBase>> {
    Ok(sqlx::query_as(
        "SELECT version, digest, body, applied_at FROM insight_knowledge_bases WHERE applied_at IS NOT NULL ORDER BY applied_at DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?)
}

/// Records a knowledge base as loaded, not yet applied (a version loaded again with other
/// content replaces the stored one).
pub async fn record_knowledge_base(pool: &PgPool, version: &str, digest: &str, body: &str) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO insight_knowledge_bases (version, digest, body) VALUES ($1, $2, $3)
         ON CONFLICT (version) DO UPDATE SET digest = EXCLUDED.digest, body = EXCLUDED.body, loaded_at = now(), applied_at = NULL
         WHERE insight_knowledge_bases.digest <> EXCLUDED.digest OR insight_knowledge_bases.applied_at IS NULL",
    )
    .bind(version)
    .bind(digest)
    .bind(body)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn knowledge_base_applied(pool: &PgPool, version: &str) -> crate::Result<()> {
    sqlx::query("UPDATE insight_knowledge_bases SET applied_at = now() WHERE version = $1").bind(version).execute(pool).await?;
    Ok(())
}

/// Members with a live medication or allergy coded with one of `codes`, in member order after
/// `after`, at most `limit`.
pub async fn members_with_codes(pool: &PgPool, codes: &[String], after: &str, limit: i64) -> crate::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT member_id FROM components
         WHERE resource_type IN ('MedicationStatement', 'AllergyIntolerance') AND NOT deleted AND code = ANY($1) AND member_id > $2
         ORDER BY member_id LIMIT $3",
    )
    .bind(codes)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
