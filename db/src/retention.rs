//! Retention's statements: each removes at most `batch` rows older than `before` and returns how
//! many it removed, so the caller loops with pauses and never holds locks the pipeline waits on
//! for long. (The audit trail is not here: its months are exported and their partitions dropped,
//! see `db::audit`.)

use sqlx::PgPool;
use time::OffsetDateTime;

/// Event ids applied before `before`: a redelivery of one is no longer possible once the
/// systems-of-record topics no longer hold it (the caller's margin over their retention).
pub async fn applied_events(pool: &PgPool, before: OffsetDateTime, batch: i64) -> crate::Result<u64> {
    delete(pool, "DELETE FROM applied_events WHERE event_id IN (SELECT event_id FROM applied_events WHERE applied_at < $1 LIMIT $2)", before, batch)
        .await
}

/// Outbox rows published before `before` and already fanned out to subscriptions (or not
/// composite versions): nothing reads them again. Parked and unpublished rows stay.
pub async fn published_outbox(pool: &PgPool, before: OffsetDateTime, batch: i64) -> crate::Result<u64> {
    delete(
        pool,
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE published_at < $1 AND parked_at IS NULL
                                           AND (notified_at IS NOT NULL OR (payload IS NOT NULL AND changes IS NULL)) ORDER BY id LIMIT $2)",
        before,
        batch,
    )
    .await
}

/// Subscription events delivered before `before`: past the `$events` replay window.
pub async fn delivered_subscription_events(pool: &PgPool, before: OffsetDateTime, batch: i64) -> crate::Result<u64> {
    delete(
        pool,
        "DELETE FROM subscription_events WHERE ctid = ANY(ARRAY(SELECT ctid FROM subscription_events WHERE delivered_at < $1 LIMIT $2))",
        before,
        batch,
    )
    .await
}

/// Composite versions written before `before` that are not the current one and that no
/// unpublished outbox row still needs (the relay reads bodies from history).
pub async fn composite_history(pool: &PgPool, before: OffsetDateTime, batch: i64) -> crate::Result<u64> {
    delete(
        pool,
        "DELETE FROM composite_history h USING (
           SELECT h.member_id, h.version_id FROM composite_history h JOIN composites c USING (member_id)
           WHERE h.version_id < c.version_id AND h.last_updated < $1
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.member_id = h.member_id AND o.version_id = h.version_id AND o.published_at IS NULL)
           LIMIT $2) old
         WHERE h.member_id = old.member_id AND h.version_id = old.version_id",
        before,
        batch,
    )
    .await
}

/// Resource versions (vread, `_history`) written before `before` that a newer version replaced.
pub async fn resource_history(pool: &PgPool, before: OffsetDateTime, batch: i64) -> crate::Result<u64> {
    delete(
        pool,
        "DELETE FROM resource_history h USING (
           SELECT h.resource_type, h.resource_id, h.version_id FROM resource_history h
           WHERE h.last_updated < $1 AND EXISTS (SELECT 1 FROM resource_history n WHERE n.resource_type = h.resource_type
                                                   AND n.resource_id = h.resource_id AND n.version_id > h.version_id)
           LIMIT $2) old
         WHERE h.resource_type = old.resource_type AND h.resource_id = old.resource_id AND h.version_id = old.version_id",
        before,
        batch,
    )
    .await
}

/// One batch: `sql` with `$1` the cutoff and `$2` the batch size, in a transaction of its own
/// that does not wait for its commit to reach the disk (`synchronous_commit = off`): a delete
/// lost in a crash is simply done again by the next run, and the pipeline's commits do not queue
/// behind retention's flushes.
async fn delete(pool: &PgPool, sql: &'static str, before: OffsetDateTime, batch: i64) -> crate::Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
    let n = sqlx::query(sql).bind(before).bind(batch).execute(&mut *tx).await?.rows_affected();
    tx.commit().await?;
    Ok(n)
}

/// Only one retention run at a time across every process: a session lock on `conn`, held until
/// [`unlock`] (or the connection closes). `false`: another run holds it.
pub async fn try_lock(conn: &mut sqlx::PgConnection) -> crate::Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('fhir-event-platform retention'))").fetch_one(conn).await?)
}

pub async fn unlock(conn: &mut sqlx::PgConnection) -> crate::Result<()> {
    sqlx::query("SELECT pg_advisory_unlock(hashtext('fhir-event-platform retention'))").execute(conn).await?;
    Ok(())
}
