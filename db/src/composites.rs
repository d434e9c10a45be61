//! `composites` (each member's current version), `composite_history` (every version, its body
//! stored once) and the `outbox` rows that carry new versions to the relay, written together.

use sqlx::PgConnection;
#[cfg(feature = "test-support")]
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CompositeState {
    pub member_id: String,
    pub version_id: i64,
    pub deleted: bool,
    pub content_hash: Vec<u8>,
}

pub async fn composite_states(tx: &mut PgConnection, members: &[String]) -> crate::Result<Vec<CompositeState>> {
    Ok(sqlx::query_as("SELECT member_id, version_id, deleted, content_hash FROM composites WHERE member_id = ANY($1)")
        .bind(members)
        .fetch_all(&mut *tx)
        .await?)
}

/// A new version of a member's composite: `body` `None` is a deletion (tombstone).
#[derive(Debug, Clone)]
pub struct CompositeVersion {
    pub member_id: String,
    pub version_id: i64,
    pub content_hash: Vec<u8>,
    pub body: Option<String>,
    pub topic: String,
    pub event_id: Uuid,
    /// The W3C trace context its records and notifications carry (`platform::trace`).
    pub traceparent: Option<String>,
}

/// The columns every versioned record's outbox row has, one array each (for `unnest`).
pub(crate) struct VersionColumns<'a> {
    pub members: Vec<&'a str>,
    pub ids: Vec<i64>,
    pub hashes: Vec<&'a [u8]>,
    pub topics: Vec<&'a str>,
    pub events: Vec<Uuid>,
    pub traces: Vec<Option<&'a str>>,
}

impl<'a> VersionColumns<'a> {
    pub fn of(versions: impl Iterator<Item = &'a CompositeVersion>) -> Self {
        let mut c =
            VersionColumns { members: Vec::new(), ids: Vec::new(), hashes: Vec::new(), topics: Vec::new(), events: Vec::new(), traces: Vec::new() };
        for v in versions {
            c.members.push(v.member_id.as_str());
            c.ids.push(v.version_id);
            c.hashes.push(v.content_hash.as_slice());
            c.topics.push(v.topic.as_str());
            c.events.push(v.event_id);
            c.traces.push(v.traceparent.as_deref());
        }
        c
    }
}

/// Stores new composite versions: the body once in history, the current row and an outbox
/// row referring to it.
pub async fn write_composites(tx: &mut PgConnection, versions: &[CompositeVersion], now: OffsetDateTime) -> crate::Result<()> {
    if versions.is_empty() {
        return Ok(());
    }
    let c = VersionColumns::of(versions.iter());
    let bodies: Vec<Option<&str>> = versions.iter().map(|v| v.body.as_deref()).collect();
    sqlx::query(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::text[], $5::text[], $6::uuid[], $8::text[])
                    AS v(member_id, version_id, content_hash, body, topic, event_id, traceparent)),
         cur AS (
           INSERT INTO composites (member_id, version_id, last_updated, deleted, content_hash)
           SELECT member_id, version_id, $7, body IS NULL, content_hash FROM v
           ON CONFLICT (member_id) DO UPDATE SET version_id = EXCLUDED.version_id, last_updated = EXCLUDED.last_updated,
             deleted = EXCLUDED.deleted, content_hash = EXCLUDED.content_hash),
         hist AS (
           INSERT INTO composite_history (member_id, version_id, last_updated, deleted, body)
           SELECT member_id, version_id, $7, body IS NULL, body FROM v)
         INSERT INTO outbox (topic, message_key, event_id, member_id, version_id, traceparent)
         SELECT topic, member_id, event_id, member_id, version_id, traceparent FROM v ORDER BY member_id, version_id",
    )
    .bind(&c.members)
    .bind(&c.ids)
    .bind(&c.hashes)
    .bind(&bodies)
    .bind(&c.topics)
    .bind(&c.events)
    .bind(now)
    .bind(&c.traces)
    .execute(&mut *tx)
    .await?;
    crate::notify(tx, crate::channels::OUTBOX).await
}

/// A stored composite version or history row, for comparisons in tests.
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VersionRow {
    pub member_id: String,
    pub version_id: i64,
    pub deleted: bool,
    pub body: Option<String>,
}

/// Every current composite, by member.
#[cfg(feature = "test-support")]
pub async fn all_composites(pool: &PgPool) -> crate::Result<Vec<VersionRow>> {
    Ok(sqlx::query_as(
        "SELECT c.member_id, c.version_id, c.deleted, h.body::text AS body FROM composites c
         JOIN composite_history h USING (member_id, version_id) ORDER BY c.member_id",
    )
    .fetch_all(pool)
    .await?)
}

/// A member's current composite, whoever serves the member (the composer's own view; the API
/// reads through `resources::medication_profile`, which is scoped to a partner).
#[cfg(feature = "test-support")]
pub async fn current_composite(pool: &PgPool, member_id: &str) -> crate::Result<Option<VersionRow>> {
    Ok(sqlx::query_as(
        "SELECT c.member_id, c.version_id, c.deleted, h.body::text AS body FROM composites c
         JOIN composite_history h USING (member_id, version_id) WHERE c.member_id = $1",
    )
    .bind(member_id)
    .fetch_optional(pool)
    .await?)
}

/// Every history row, by member and version.
#[cfg(feature = "test-support")]
pub async fn all_history(pool: &PgPool) -> crate::Result<Vec<VersionRow>> {
    Ok(sqlx::query_as("SELECT member_id, version_id, deleted, body::text AS body FROM composite_history ORDER BY member_id, version_id")
        .fetch_all(pool)
        .await?)
}

/// An outbox row of a composite version, with the version it carries.
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxVersion {
    pub topic: String,
    pub message_key: String,
    pub event_id: Uuid,
    #[sqlx(flatten)]
    pub version: VersionRow,
}

/// Every outbox row of a composite version, in publication order.
#[cfg(feature = "test-support")]
pub async fn all_outbox(pool: &PgPool) -> crate::Result<Vec<OutboxVersion>> {
    Ok(sqlx::query_as(
        "SELECT o.topic, o.message_key, o.event_id, o.member_id, o.version_id, h.deleted, h.body::text AS body
         FROM outbox o JOIN composite_history h USING (member_id, version_id) WHERE o.payload IS NULL ORDER BY o.id",
    )
    .fetch_all(pool)
    .await?)
}

/// Members whose composites `fhirctl rebuild` looks at, in member order after `after`, at most
/// `limit`: every member with components or a composite, or (with `since`) those whose
/// components changed since then.
pub async fn members_to_rebuild(pool: &sqlx::PgPool, since: Option<OffsetDateTime>, after: &str, limit: i64) -> crate::Result<Vec<String>> {
    Ok(match since {
        None => sqlx::query_scalar(
            "SELECT member_id FROM (SELECT member_id FROM components WHERE member_id > $1 UNION SELECT member_id FROM composites WHERE member_id > $1) m
             ORDER BY member_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?,
        Some(since) => sqlx::query_scalar("SELECT DISTINCT member_id FROM components WHERE updated_at >= $3 AND member_id > $1 ORDER BY member_id LIMIT $2")
            .bind(after)
            .bind(limit)
            .bind(since)
            .fetch_all(pool)
            .await?,
    })
}

/// Live composites' current versions in member order after `after`, at most `limit`
/// (`member`: only that one).
pub async fn live_versions(pool: &sqlx::PgPool, member: Option<&str>, after: &str, limit: i64) -> crate::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT member_id, version_id FROM composites WHERE NOT deleted AND member_id > $1 AND ($3::text IS NULL OR member_id = $3)
         ORDER BY member_id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(member)
    .fetch_all(pool)
    .await?)
}
