//! `outbox`: what the relay publishes, in the order it was written (composite versions, which
//! refer to their body in history, and partner write-backs, which carry their own), and what it
//! parked because the broker refused it.

use sqlx::PgConnection;
use std::collections::BTreeMap;
use uuid::Uuid;

/// One record to publish.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    /// Contract topic name (without the deployment's prefix).
    pub topic: String,
    #[sqlx(rename = "message_key")]
    pub key: String,
    pub event_id: Uuid,
    pub member_id: String,
    pub version_id: i64,
    /// `None`: a tombstone (the member was deleted).
    pub body: Option<String>,
    /// Headers beyond `versionId` and `event_id` (messages that are not composite versions).
    #[sqlx(json(nullable))]
    pub headers: Option<BTreeMap<String, String>>,
    /// The W3C trace context of a composite version (`platform::trace`).
    pub traceparent: Option<String>,
}

/// Takes the relays' lead on this connection if no other relay holds it: one publishes at a
/// time (per-member order, and one Kafka transactional id), until its connection ends.
pub async fn lead(conn: &mut PgConnection) -> crate::Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('fhir-event-platform relay'))").fetch_one(&mut *conn).await?)
}

/// The number of the relay's last step committed here and this database's lineage of steps,
/// locked until the transaction ends.
pub async fn relay_step(tx: &mut PgConnection) -> crate::Result<(i64, Uuid)> {
    Ok(sqlx::query_as("SELECT step, lineage FROM relay_state FOR UPDATE").fetch_one(&mut *tx).await?)
}

pub async fn set_relay_step(tx: &mut PgConnection, step: i64) -> crate::Result<()> {
    sqlx::query("UPDATE relay_state SET step = $1").bind(step).execute(&mut *tx).await?;
    Ok(())
}

/// The oldest rows neither published nor parked, in id order (version order per member).
pub async fn unpublished(tx: &mut PgConnection, limit: i64) -> crate::Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as(
        // Composite versions refer to their body in history; other messages carry their own.
        // The body is one lookup per row of the batch, not a join whose method the planner
        // chooses (a generic plan cached while the outbox was empty lives until autovacuum
        // analyzes it: see db::connect).
        "SELECT o.id, o.topic, o.message_key, o.event_id, o.member_id, o.version_id,
                coalesce(o.payload::text, (SELECT h.body::text FROM composite_history h
                                           WHERE o.payload IS NULL AND h.member_id = o.member_id AND h.version_id = o.version_id)) AS body,
                o.headers, o.traceparent
         FROM (SELECT * FROM outbox WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT $1) o ORDER BY o.id",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?)
}

pub async fn mark_published(tx: &mut PgConnection, ids: &[i64]) -> crate::Result<()> {
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)").bind(ids).execute(&mut *tx).await?;
    Ok(())
}

/// Parks outbox rows the broker refused for what they are: (id, reason).
pub async fn park(tx: &mut PgConnection, rows: &[(i64, String)]) -> crate::Result<()> {
    if rows.is_empty() {
        return Ok(()); // the usual case: a statement per batch saved
    }
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
/// retried, it is published to that topic alone. A record that is not a composite version (an
/// insights Bundle) carries its `payload`.
pub async fn park_partner_record(
    tx: &mut PgConnection,
    topic: &str,
    member_id: &str,
    version_id: i64,
    event_id: Uuid,
    reason: &str,
    payload: Option<&str>,
) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (topic, message_key, event_id, member_id, version_id, notified_at, parked_at, park_reason, payload)
         VALUES ($1, $2, $3, $2, $4, now(), now(), $5, $6::json)",
    )
    .bind(topic)
    .bind(member_id)
    .bind(event_id)
    .bind(version_id)
    .bind(reason)
    .bind(payload)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A parked outbox row, for operators.
#[derive(Debug, Clone, sqlx::FromRow)]
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
    Ok(sqlx::query_as(
        "SELECT o.id, o.topic, o.member_id, o.version_id, o.parked_at, coalesce(o.park_reason, '') AS reason,
                coalesce(octet_length(o.payload::text), (SELECT octet_length(h.body) FROM composite_history h
                                                         WHERE h.member_id = o.member_id AND h.version_id = o.version_id))::int8 AS size
         FROM outbox o WHERE o.published_at IS NULL AND o.parked_at IS NOT NULL AND ($1::int8[] IS NULL OR o.id = ANY($1)) ORDER BY o.id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
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

/// Rows not yet published (parked ones aside): the relay's backlog.
pub async fn unpublished_count(tx: &mut PgConnection) -> crate::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL").fetch_one(&mut *tx).await?)
}

/// The outbox's lag, for operators: rows not yet acknowledged by Kafka, the age of the oldest in
/// seconds (0 when none), and rows parked for an operator (`fhirctl outbox`).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct Lag {
    pub unpublished: i64,
    pub oldest_secs: f64,
    pub parked: i64,
}

pub async fn lag(pool: &sqlx::PgPool) -> crate::Result<Lag> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE parked_at IS NULL) AS unpublished,
                coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL))::float8, 0) AS oldest_secs,
                count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await?)
}

/// Queues the current versions `rows` (member, version, the version's event id) of `topic`
/// again, for `fhirctl replay`: the relay publishes them in outbox order with everything else,
/// so a replayed version never lands after a newer one. They are marked fanned out: a replay
/// republishes records, it does not notify subscribers again.
pub async fn replay(pool: &sqlx::PgPool, topic: &str, rows: &[(String, i64, Uuid)]) -> crate::Result<u64> {
    let mut tx = pool.begin().await?;
    let members: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let versions: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let events: Vec<Uuid> = rows.iter().map(|r| r.2).collect();
    let n = sqlx::query(
        "INSERT INTO outbox (topic, message_key, event_id, member_id, version_id, notified_at)
         SELECT $1, m, e, m, v, now() FROM unnest($2::text[], $3::bigint[], $4::uuid[]) AS r(m, v, e) ORDER BY m",
    )
    .bind(topic)
    .bind(&members)
    .bind(&versions)
    .bind(&events)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    crate::notify(&mut tx, crate::channels::OUTBOX).await?;
    tx.commit().await?;
    Ok(n)
}
