//! The relay's queries: unpublished outbox rows with their composite bodies, who is attributed
//! to their members, and which members each partner topic carries.

use sqlx::{PgConnection, Row};
use time::Date;
use uuid::Uuid;

/// One composite version to publish.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    /// Contract topic name (without the deployment's prefix).
    pub topic: String,
    pub key: String,
    pub event_id: Uuid,
    pub member_id: String,
    pub version_id: i64,
    /// `None`: a tombstone (the member was deleted).
    pub body: Option<String>,
    /// Headers beyond `versionId` and `event_id` (messages that are not composite versions).
    pub headers: Vec<(String, String)>,
}

/// Serializes relays: one publishes at a time, so per-member order holds across instances.
pub async fn lock(tx: &mut PgConnection) -> crate::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('fhir-event-platform relay'))").execute(&mut *tx).await?;
    Ok(())
}

/// The oldest unpublished rows, in id order (version order per member).
pub async fn unpublished(tx: &mut PgConnection, limit: i64) -> crate::Result<Vec<OutboxRow>> {
    let rows = sqlx::query(
        // Composite versions refer to their body in history; other messages carry their own.
        // The body is one lookup per row of the batch, not a join whose method the planner
        // chooses (a generic plan cached while the outbox was empty lives until autovacuum
        // analyzes it: see db::connect).
        "SELECT o.id, o.topic, o.message_key, o.event_id, o.member_id, o.version_id,
                coalesce(o.payload::text, (SELECT h.body::text FROM composite_history h
                                           WHERE o.payload IS NULL AND h.member_id = o.member_id AND h.version_id = o.version_id)),
                o.headers::text
         FROM (SELECT * FROM outbox WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT $1) o ORDER BY o.id",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxRow {
            id: r.get(0),
            topic: r.get(1),
            key: r.get(2),
            event_id: r.get(3),
            member_id: r.get(4),
            version_id: r.get(5),
            body: r.get(6),
            headers: r
                .get::<Option<String>, _>(7)
                .and_then(|h| serde_json::from_str::<std::collections::BTreeMap<String, String>>(&h).ok())
                .map(|h| h.into_iter().collect())
                .unwrap_or_default(),
        })
        .collect())
}

pub async fn mark_published(tx: &mut PgConnection, ids: &[i64]) -> crate::Result<()> {
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)").bind(ids).execute(&mut *tx).await?;
    Ok(())
}

/// Parks outbox rows the broker refused for what they are: (id, reason).
pub async fn park(tx: &mut PgConnection, rows: &[(i64, String)]) -> crate::Result<()> {
    let (ids, reasons): (Vec<i64>, Vec<&str>) = rows.iter().map(|(id, r)| (*id, r.as_str())).unzip();
    sqlx::query(
        "UPDATE outbox o SET parked_at = now(), park_reason = r.reason FROM unnest($1::int8[], $2::text[]) AS r(id, reason) WHERE o.id = r.id",
    )
    .bind(&ids)
    .bind(&reasons)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Parks a record for a partner topic that the relay could not publish while it reconciled
/// attribution (a new outbox row, already parked, already past the subscriptions' fan-out):
/// retried, it is published to that topic alone.
pub async fn park_partner_record(
    tx: &mut PgConnection,
    topic: &str,
    member_id: &str,
    version_id: i64,
    event_id: Uuid,
    reason: &str,
) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (topic, message_key, event_id, member_id, version_id, notified_at, parked_at, park_reason)
         VALUES ($1, $2, $3, $2, $4, now(), now(), $5)",
    )
    .bind(topic)
    .bind(member_id)
    .bind(event_id)
    .bind(version_id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A parked outbox row, for operators.
#[derive(Debug, Clone)]
pub struct ParkedRow {
    pub id: i64,
    pub topic: String,
    pub member_id: String,
    pub version_id: i64,
    pub parked_at: time::OffsetDateTime,
    pub reason: String,
    /// Bytes of the record's value.
    pub size: Option<i64>,
}

/// Parked rows (those of `ids` only, when given), oldest first.
pub async fn parked(pool: &sqlx::PgPool, ids: Option<&[i64]>) -> crate::Result<Vec<ParkedRow>> {
    let rows = sqlx::query(
        "SELECT o.id, o.topic, o.member_id, o.version_id, o.parked_at, coalesce(o.park_reason, ''),
                coalesce(octet_length(o.payload::text), (SELECT octet_length(h.body) FROM composite_history h
                                                         WHERE h.member_id = o.member_id AND h.version_id = o.version_id))::int8
         FROM outbox o WHERE o.published_at IS NULL AND o.parked_at IS NOT NULL AND ($1::int8[] IS NULL OR o.id = ANY($1)) ORDER BY o.id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ParkedRow {
            id: r.get(0),
            topic: r.get(1),
            member_id: r.get(2),
            version_id: r.get(3),
            parked_at: r.get(4),
            reason: r.get(5),
            size: r.get(6),
        })
        .collect())
}

/// Hands parked rows back to the relay (all when `ids` is `None`), and wakes it; returns how
/// many. The relay publishes them in id order with the rest.
pub async fn unpark(pool: &sqlx::PgPool, ids: Option<&[i64]>) -> crate::Result<u64> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE outbox SET parked_at = NULL WHERE published_at IS NULL AND parked_at IS NOT NULL AND ($1::int8[] IS NULL OR id = ANY($1))",
    )
    .bind(ids)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    crate::notify(&mut tx, crate::channels::OUTBOX).await?;
    tx.commit().await?;
    Ok(n)
}

/// Gives parked rows up (marks them published without publishing), noting `why` after the
/// reason they were parked for; returns how many.
pub async fn drop_parked(pool: &sqlx::PgPool, ids: &[i64], why: &str) -> crate::Result<u64> {
    Ok(sqlx::query(
        "UPDATE outbox SET published_at = now(), park_reason = coalesce(park_reason, '') || ' (dropped by an operator: ' || $2 || ')'
         WHERE published_at IS NULL AND parked_at IS NOT NULL AND id = ANY($1)",
    )
    .bind(ids)
    .bind(why)
    .execute(pool)
    .await?
    .rows_affected())
}

/// (member, partner) for every partner `members` are attributed to on `day`.
pub async fn partners_of(tx: &mut PgConnection, members: &[String], day: Date) -> crate::Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT DISTINCT member_id, body ->> 'partner_id' FROM components
         WHERE kind = 'attribution' AND NOT deleted AND member_id = ANY($1)
           AND (body ->> 'period_start')::date <= $2 AND coalesce((body ->> 'period_end')::date >= $2, true)",
    )
    .bind(members)
    .bind(day)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records which (partner, member) pairs the partner topics now carry, and which they no longer do.
pub async fn carried(tx: &mut PgConnection, added: &[(String, String)], removed: &[(String, String)]) -> crate::Result<()> {
    let (p, m): (Vec<&str>, Vec<&str>) = added.iter().map(|(p, m)| (p.as_str(), m.as_str())).unzip();
    sqlx::query("INSERT INTO partner_topic_members SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING")
        .bind(&p)
        .bind(&m)
        .execute(&mut *tx)
        .await?;
    let (p, m): (Vec<&str>, Vec<&str>) = removed.iter().map(|(p, m)| (p.as_str(), m.as_str())).unzip();
    sqlx::query("DELETE FROM partner_topic_members t USING unnest($1::text[], $2::text[]) AS r(p, m) WHERE t.partner_id = r.p AND t.member_id = r.m")
        .bind(&p)
        .bind(&m)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Members whose attribution changed ([`crate::composer::attribution_changed`]), oldest first:
/// (row ids, distinct members), at most `limit` rows.
pub async fn attribution_changes(tx: &mut PgConnection, limit: i64) -> crate::Result<(Vec<i64>, Vec<String>)> {
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, member_id FROM attribution_changes ORDER BY id LIMIT $1").bind(limit).fetch_all(&mut *tx).await?;
    let ids = rows.iter().map(|r| r.0).collect();
    let mut members: Vec<String> = rows.into_iter().map(|r| r.1).collect();
    members.sort();
    members.dedup();
    Ok((ids, members))
}

/// Removes handled `attribution_changes` rows.
pub async fn forget_attribution_changes(tx: &mut PgConnection, ids: &[i64]) -> crate::Result<()> {
    sqlx::query("DELETE FROM attribution_changes WHERE id = ANY($1)").bind(ids).execute(&mut *tx).await?;
    Ok(())
}

/// Runs `sql` with `$1` = `day` and `$2` = `limit`, its `{members}` replaced by the condition
/// that `column` is one of `members` (bound as `$3`), or by `true` for every member. Each text
/// is a separate prepared statement, so neither plan has to serve the other case.
async fn for_members(
    tx: &mut PgConnection,
    sql: &str,
    column: &str,
    day: Date,
    limit: i64,
    members: Option<&[String]>,
) -> crate::Result<Vec<sqlx::postgres::PgRow>> {
    let condition = if members.is_some() { format!("{column} = ANY($3)") } else { "true".to_owned() };
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.replace("{members}", &condition))).bind(day).bind(limit);
    if let Some(members) = members {
        query = query.bind(members);
    }
    Ok(query.fetch_all(&mut *tx).await?)
}

/// Attributed on `day` with a live composite, but not yet on the partner's topic:
/// (partner, member, versionId, body), at most `limit`; among `members` if given.
pub async fn newly_attributed(
    tx: &mut PgConnection,
    day: Date,
    limit: i64,
    members: Option<&[String]>,
) -> crate::Result<Vec<(String, String, i64, String)>> {
    let rows = for_members(
        tx,
        "SELECT DISTINCT a.body ->> 'partner_id', a.member_id, c.version_id, h.body::text
         FROM components a
         JOIN composites c ON c.member_id = a.member_id AND NOT c.deleted
         JOIN composite_history h ON h.member_id = c.member_id AND h.version_id = c.version_id
         WHERE a.kind = 'attribution' AND NOT a.deleted AND {members}
           AND (a.body ->> 'period_start')::date <= $1 AND coalesce((a.body ->> 'period_end')::date >= $1, true)
           AND NOT EXISTS (SELECT 1 FROM partner_topic_members t WHERE t.partner_id = a.body ->> 'partner_id' AND t.member_id = a.member_id)
         LIMIT $2",
        "a.member_id",
        day,
        limit,
        members,
    )
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
}

/// On a partner's topic, but no longer attributed to it on `day`: (partner, member, current
/// versionId), at most `limit`; among `members` if given.
pub async fn no_longer_attributed(
    tx: &mut PgConnection,
    day: Date,
    limit: i64,
    members: Option<&[String]>,
) -> crate::Result<Vec<(String, String, i64)>> {
    let rows = for_members(
        tx,
        "SELECT t.partner_id, t.member_id, coalesce(c.version_id, 0) FROM partner_topic_members t
         LEFT JOIN composites c ON c.member_id = t.member_id
         WHERE {members} AND NOT EXISTS (SELECT 1 FROM components a WHERE a.kind = 'attribution' AND NOT a.deleted
           AND a.member_id = t.member_id AND a.body ->> 'partner_id' = t.partner_id
           AND (a.body ->> 'period_start')::date <= $1 AND coalesce((a.body ->> 'period_end')::date >= $1, true))
         LIMIT $2",
        "t.member_id",
        day,
        limit,
        members,
    )
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// What the relay still has to do: unpublished outbox rows, members to add to partner topics,
/// members to remove from them (tests and metrics).
pub async fn backlog(pool: &sqlx::PgPool, day: Date) -> crate::Result<(i64, usize, usize)> {
    let mut tx = pool.begin().await?;
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL").fetch_one(&mut *tx).await?;
    let added = newly_attributed(&mut tx, day, 1_000_000, None).await?.len();
    let removed = no_longer_attributed(&mut tx, day, 1_000_000, None).await?.len();
    tx.rollback().await?;
    Ok((unpublished, added, removed))
}
