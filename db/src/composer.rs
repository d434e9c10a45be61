//! The composer's queries. Everything here that takes a `PgConnection` runs inside the one
//! transaction of a batch; bulk statements use `unnest` so a batch is a handful of round trips.

use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

/// A stored consumer position: the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

pub async fn load_offsets(pool: &PgPool, group: &str, topics: &[String]) -> crate::Result<Vec<StoredOffset>> {
    let rows = sqlx::query("SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = ANY($2)")
        .bind(group)
        .bind(topics)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| StoredOffset { topic: r.get(0), partition: r.get(1), next_offset: r.get(2) }).collect())
}

/// Moves the group's positions forward, but only from where this consumer believes they are
/// (`expected`: `None` for a partition with no stored position). Returns false when another
/// consumer moved one of them in the meantime (this one lost the partition): roll back.
pub async fn advance_offsets(tx: &mut PgConnection, group: &str, moves: &[(StoredOffset, Option<i64>)]) -> crate::Result<bool> {
    let topics: Vec<&str> = moves.iter().map(|(o, _)| o.topic.as_str()).collect();
    let partitions: Vec<i32> = moves.iter().map(|(o, _)| o.partition).collect();
    let next: Vec<i64> = moves.iter().map(|(o, _)| o.next_offset).collect();
    let expected: Vec<Option<i64>> = moves.iter().map(|(_, e)| *e).collect();
    let updated = sqlx::query(
        "WITH m AS (SELECT * FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS m(topic, partition, next_offset, expected))
         INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)
         SELECT $1, topic, partition, next_offset FROM m
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset
         WHERE consumer_offsets.next_offset = (SELECT expected FROM m WHERE m.topic = EXCLUDED.topic AND m.partition = EXCLUDED.partition)",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(&next)
    .bind(&expected)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(updated == moves.len() as u64)
}

/// Serializes batches that touch the same members (several composer instances, or topics of
/// one member on different instances). Members are locked in sorted order.
pub async fn lock_members(tx: &mut PgConnection, members: &[String]) -> crate::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(m, 7)) FROM (SELECT DISTINCT unnest($1::text[]) AS m ORDER BY 1) s")
        .bind(members)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// How many locks PostgreSQL's shared lock table holds: `max_locks_per_transaction` ×
/// (`max_connections` + `max_prepared_transactions`). [`lock_members`] takes one per member
/// of a batch, so a batch must fit in it alongside everyone else's locks.
pub async fn lock_capacity(pool: &PgPool) -> crate::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT current_setting('max_locks_per_transaction')::bigint
                * (current_setting('max_connections')::bigint + current_setting('max_prepared_transactions')::bigint)",
    )
    .fetch_one(pool)
    .await?)
}

/// Records event ids as applied; returns those that were not applied before.
pub async fn claim_event_ids(tx: &mut PgConnection, ids: &[Uuid]) -> crate::Result<Vec<Uuid>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query("INSERT INTO applied_events (event_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id")
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// The identity of a component: (kind, source, record_id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentKey {
    pub kind: String,
    pub source: String,
    pub record_id: String,
}

#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub key: ComponentKey,
    pub member_id: String,
    pub version: i64,
}

pub async fn component_versions(tx: &mut PgConnection, keys: &[ComponentKey]) -> crate::Result<Vec<StoredVersion>> {
    let kinds: Vec<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
    let sources: Vec<&str> = keys.iter().map(|k| k.source.as_str()).collect();
    let records: Vec<&str> = keys.iter().map(|k| k.record_id.as_str()).collect();
    let rows = sqlx::query(
        "SELECT c.kind, c.source, c.record_id, c.member_id, c.version
         FROM unnest($1::text[], $2::text[], $3::text[]) AS k(kind, source, record_id)
         JOIN components c USING (kind, source, record_id)",
    )
    .bind(&kinds)
    .bind(&sources)
    .bind(&records)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredVersion {
            key: ComponentKey { kind: r.get(0), source: r.get(1), record_id: r.get(2) },
            member_id: r.get(3),
            version: r.get(4),
        })
        .collect())
}

/// A component change that won (its version is newer than the stored one).
#[derive(Debug, Clone)]
pub struct ComponentWrite {
    pub key: ComponentKey,
    pub member_id: String,
    pub version: i64,
    /// JSON text; `None` for a delete.
    pub body: Option<String>,
    pub event_id: Uuid,
    /// The FHIR resource this record is, if it is one: (type, id).
    pub resource: Option<(String, String)>,
    pub code_system: Option<String>,
    pub code: Option<String>,
    pub status: Option<String>,
}

/// Writes the winning component changes; each one that is a FHIR resource gets its next
/// resource version and a `resource_history` row, in the same statement.
pub async fn write_components(tx: &mut PgConnection, writes: &[ComponentWrite], now: OffsetDateTime) -> crate::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&ComponentWrite) -> Option<&str>| writes.iter().map(f).collect::<Vec<Option<&str>>>();
    let kinds = col(|w| Some(w.key.kind.as_str()));
    let sources = col(|w| Some(w.key.source.as_str()));
    let records = col(|w| Some(w.key.record_id.as_str()));
    let members = col(|w| Some(w.member_id.as_str()));
    let bodies = col(|w| w.body.as_deref());
    let types = col(|w| w.resource.as_ref().map(|r| r.0.as_str()));
    let ids = col(|w| w.resource.as_ref().map(|r| r.1.as_str()));
    let systems = col(|w| w.code_system.as_deref());
    let codes = col(|w| w.code.as_deref());
    let statuses = col(|w| w.status.as_deref());
    let versions: Vec<i64> = writes.iter().map(|w| w.version).collect();
    let events: Vec<Uuid> = writes.iter().map(|w| w.event_id).collect();
    let mut writes_to: std::collections::HashMap<(&str, &str), i64> = std::collections::HashMap::new();
    let ranks: Vec<i64> = writes
        .iter()
        .map(|w| match &w.resource {
            Some((t, id)) => {
                let n = writes_to.entry((t.as_str(), id.as_str())).or_default();
                *n += 1;
                *n
            }
            None => 0,
        })
        .collect();
    sqlx::query(
        // Resource versions count per resource, not per component: two systems of record can
        // describe one resource (a member's Patient from two demographics sources). The next
        // version is the resource's newest in history plus its rank among this batch's writes
        // to it (`n`, counted here rather than by a window over a sort of the whole batch).
        "WITH input AS (
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::uuid[],
                                $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::bigint[])
                         AS w(kind, source, record_id, member_id, version, body, event_id, rtype, rid, system, code, status, n)
         ),
         numbered AS (
           SELECT i.*, CASE WHEN i.rtype IS NULL THEN 0 ELSE coalesce((SELECT max(h.version_id) FROM resource_history h
                         WHERE h.resource_type = i.rtype AND h.resource_id = i.rid), 0) + i.n END AS rversion
           FROM input i
         ),
         w AS (
           INSERT INTO components (kind, source, record_id, member_id, version, deleted, body, event_id, updated_at,
                                   resource_type, resource_id, resource_version, code_system, code, status)
           SELECT kind, source, record_id, member_id, version, body IS NULL, body::json, event_id, $8,
                  rtype, rid, rversion, system, code, status
           FROM numbered
           ON CONFLICT (kind, source, record_id) DO UPDATE SET
             member_id = EXCLUDED.member_id, version = EXCLUDED.version, deleted = EXCLUDED.deleted,
             body = EXCLUDED.body, event_id = EXCLUDED.event_id, updated_at = EXCLUDED.updated_at,
             resource_type = EXCLUDED.resource_type, resource_id = EXCLUDED.resource_id,
             resource_version = EXCLUDED.resource_version,
             code_system = EXCLUDED.code_system, code = EXCLUDED.code, status = EXCLUDED.status
           WHERE components.version < EXCLUDED.version
           RETURNING resource_type, resource_id, resource_version, member_id, deleted, body)
         INSERT INTO resource_history (resource_type, resource_id, version_id, member_id, last_updated, deleted, body)
         SELECT resource_type, resource_id, resource_version, member_id, $8, deleted, body FROM w
         WHERE resource_type IS NOT NULL",
    )
    .bind(&kinds)
    .bind(&sources)
    .bind(&records)
    .bind(&members)
    .bind(&versions)
    .bind(&bodies)
    .bind(&events)
    .bind(now)
    .bind(&types)
    .bind(&ids)
    .bind(&systems)
    .bind(&codes)
    .bind(&statuses)
    .bind(&ranks)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Queues `members` (their attribution changed in this transaction) for the relay, which
/// reconciles their partner topics, and wakes it when the transaction commits.
pub async fn attribution_changed(tx: &mut PgConnection, members: &[String]) -> crate::Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    sqlx::query("INSERT INTO attribution_changes (member_id) SELECT unnest($1::text[])").bind(members).execute(&mut *tx).await?;
    crate::notify(tx, crate::channels::OUTBOX).await
}

/// A live component row, for assembling composites.
#[derive(Debug, Clone)]
pub struct LiveComponent {
    pub member_id: String,
    pub kind: String,
    pub source: String,
    pub record_id: String,
    pub version: i64,
    pub body: String,
    /// The FHIR resource this record is (type, id); empty for a record that is not one.
    pub resource_type: String,
    pub resource_id: String,
    /// Search columns: primary code and status, where the resource type has them.
    pub code_system: Option<String>,
    pub code: Option<String>,
    pub status: Option<String>,
    /// When this version of the record was applied (or, for a partner report, written).
    pub updated_at: OffsetDateTime,
}

pub async fn live_components(tx: &mut PgConnection, members: &[String], kinds: &[&str]) -> crate::Result<Vec<LiveComponent>> {
    let rows = sqlx::query(
        "SELECT member_id, kind, source, record_id, version, body::text, code_system, code, status, updated_at,
                coalesce(resource_type, ''), coalesce(resource_id, '') FROM components
         WHERE member_id = ANY($1) AND kind = ANY($2) AND NOT deleted",
    )
    .bind(members)
    .bind(kinds)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LiveComponent {
            member_id: r.get(0),
            kind: r.get(1),
            source: r.get(2),
            record_id: r.get(3),
            version: r.get(4),
            body: r.get(5),
            code_system: r.get(6),
            code: r.get(7),
            status: r.get(8),
            updated_at: r.get(9),
            resource_type: r.get(10),
            resource_id: r.get(11),
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct CompositeState {
    pub member_id: String,
    pub version_id: i64,
    pub deleted: bool,
    pub content_hash: Vec<u8>,
}

pub async fn composite_states(tx: &mut PgConnection, members: &[String]) -> crate::Result<Vec<CompositeState>> {
    let rows = sqlx::query("SELECT member_id, version_id, deleted, content_hash FROM composites WHERE member_id = ANY($1)")
        .bind(members)
        .fetch_all(&mut *tx)
        .await?;
    Ok(rows.into_iter().map(|r| CompositeState { member_id: r.get(0), version_id: r.get(1), deleted: r.get(2), content_hash: r.get(3) }).collect())
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
}

/// Stores new composite versions: the body once in history, the current row and an outbox
/// row referring to it.
pub async fn write_composites(tx: &mut PgConnection, versions: &[CompositeVersion], now: OffsetDateTime) -> crate::Result<()> {
    if versions.is_empty() {
        return Ok(());
    }
    let members: Vec<&str> = versions.iter().map(|v| v.member_id.as_str()).collect();
    let ids: Vec<i64> = versions.iter().map(|v| v.version_id).collect();
    let hashes: Vec<&[u8]> = versions.iter().map(|v| v.content_hash.as_slice()).collect();
    let bodies: Vec<Option<&str>> = versions.iter().map(|v| v.body.as_deref()).collect();
    let topics: Vec<&str> = versions.iter().map(|v| v.topic.as_str()).collect();
    let events: Vec<Uuid> = versions.iter().map(|v| v.event_id).collect();
    sqlx::query(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::text[], $5::text[], $6::uuid[])
                    AS v(member_id, version_id, content_hash, body, topic, event_id)),
         cur AS (
           INSERT INTO composites (member_id, version_id, last_updated, deleted, content_hash)
           SELECT member_id, version_id, $7, body IS NULL, content_hash FROM v
           ON CONFLICT (member_id) DO UPDATE SET version_id = EXCLUDED.version_id, last_updated = EXCLUDED.last_updated,
             deleted = EXCLUDED.deleted, content_hash = EXCLUDED.content_hash),
         hist AS (
           INSERT INTO composite_history (member_id, version_id, last_updated, deleted, body)
           SELECT member_id, version_id, $7, body IS NULL, body FROM v)
         INSERT INTO outbox (topic, message_key, event_id, member_id, version_id)
         SELECT topic, member_id, event_id, member_id, version_id FROM v ORDER BY member_id, version_id",
    )
    .bind(&members)
    .bind(&ids)
    .bind(&hashes)
    .bind(&bodies)
    .bind(&topics)
    .bind(&events)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    crate::notify(tx, crate::channels::OUTBOX).await
}

/// Sum of a group's stored positions (tests and progress reports).
pub async fn total_position(pool: &PgPool, group: &str) -> crate::Result<i64> {
    let total: Option<i64> =
        sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE consumer_group = $1").bind(group).fetch_one(pool).await?;
    Ok(total.unwrap_or(0))
}

/// A stored composite version or history row, for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub member_id: String,
    pub version_id: i64,
    pub deleted: bool,
    pub body: Option<String>,
}

fn version_rows(rows: Vec<sqlx::postgres::PgRow>) -> Vec<VersionRow> {
    rows.into_iter().map(|r| VersionRow { member_id: r.get(0), version_id: r.get(1), deleted: r.get(2), body: r.get(3) }).collect()
}

/// Every current composite, by member.
pub async fn all_composites(pool: &PgPool) -> crate::Result<Vec<VersionRow>> {
    let rows = sqlx::query(
        "SELECT c.member_id, c.version_id, c.deleted, h.body::text FROM composites c
         JOIN composite_history h USING (member_id, version_id) ORDER BY c.member_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(version_rows(rows))
}

/// A member's current composite, whoever serves the member (the composer's own view; the API
/// reads through `resources::medication_profile`, which is scoped to a partner).
pub async fn current_composite(pool: &PgPool, member_id: &str) -> crate::Result<Option<VersionRow>> {
    let row = sqlx::query(
        "SELECT c.member_id, c.version_id, c.deleted, h.body::text FROM composites c
         JOIN composite_history h USING (member_id, version_id) WHERE c.member_id = $1",
    )
    .bind(member_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| VersionRow { member_id: r.get(0), version_id: r.get(1), deleted: r.get(2), body: r.get(3) }))
}

/// Every history row, by member and version.
pub async fn all_history(pool: &PgPool) -> crate::Result<Vec<VersionRow>> {
    let rows = sqlx::query("SELECT member_id, version_id, deleted, body::text FROM composite_history ORDER BY member_id, version_id")
        .fetch_all(pool)
        .await?;
    Ok(version_rows(rows))
}

/// Every outbox row in publication order: (topic, key, event id, version row).
pub async fn all_outbox(pool: &PgPool) -> crate::Result<Vec<(String, String, Uuid, VersionRow)>> {
    let rows = sqlx::query(
        "SELECT o.topic, o.message_key, o.event_id, o.member_id, o.version_id, h.deleted, h.body::text
         FROM outbox o JOIN composite_history h USING (member_id, version_id) WHERE o.payload IS NULL ORDER BY o.id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let v = VersionRow { member_id: r.get(3), version_id: r.get(4), deleted: r.get(5), body: r.get(6) };
            (r.get(0), r.get(1), r.get(2), v)
        })
        .collect())
}

/// Every component row: (kind, source, record_id, member_id, version, deleted, body).
pub async fn all_components(pool: &PgPool) -> crate::Result<Vec<(String, String, String, String, i64, bool, Option<String>)>> {
    let rows =
        sqlx::query("SELECT kind, source, record_id, member_id, version, deleted, body::text FROM components ORDER BY kind, source, record_id")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))).collect())
}
