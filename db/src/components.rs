//! `components` (the systems of record's records, and partners' reports, by member), with
//! `applied_events` (event ids already applied) and `attribution_changes` (members whose partner
//! topics the relay must reconcile). Everything that takes a `PgConnection` runs inside a batch's
//! (or a write-back's) one transaction; bulk statements use `unnest`, so a batch is a handful of
//! round trips.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

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
    Ok(sqlx::query_scalar("INSERT INTO applied_events (event_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id")
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?)
}

/// The identity of a component: (kind, source, record_id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::FromRow)]
pub struct ComponentKey {
    pub kind: String,
    pub source: String,
    pub record_id: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredVersion {
    #[sqlx(flatten)]
    pub key: ComponentKey,
    pub member_id: String,
    pub version: i64,
}

pub async fn component_versions(tx: &mut PgConnection, keys: &[ComponentKey]) -> crate::Result<Vec<StoredVersion>> {
    let kinds: Vec<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
    let sources: Vec<&str> = keys.iter().map(|k| k.source.as_str()).collect();
    let records: Vec<&str> = keys.iter().map(|k| k.record_id.as_str()).collect();
    Ok(sqlx::query_as(
        "SELECT c.kind, c.source, c.record_id, c.member_id, c.version
         FROM unnest($1::text[], $2::text[], $3::text[]) AS k(kind, source, record_id)
         JOIN components c USING (kind, source, record_id)",
    )
    .bind(&kinds)
    .bind(&sources)
    .bind(&records)
    .fetch_all(&mut *tx)
    .await?)
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
#[derive(Debug, Clone, sqlx::FromRow)]
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
    Ok(sqlx::query_as(
        "SELECT member_id, kind, source, record_id, version, body::text AS body, code_system, code, status, updated_at,
                coalesce(resource_type, '') AS resource_type, coalesce(resource_id, '') AS resource_id FROM components
         WHERE member_id = ANY($1) AND kind = ANY($2) AND NOT deleted",
    )
    .bind(members)
    .bind(kinds)
    .fetch_all(&mut *tx)
    .await?)
}

/// A component row as stored, for comparisons in tests.
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ComponentRow {
    pub kind: String,
    pub source: String,
    pub record_id: String,
    pub member_id: String,
    pub version: i64,
    pub deleted: bool,
    pub body: Option<String>,
}

/// Every component row, by key.
#[cfg(feature = "test-support")]
pub async fn all_components(pool: &PgPool) -> crate::Result<Vec<ComponentRow>> {
    Ok(sqlx::query_as(
        "SELECT kind, source, record_id, member_id, version, deleted, body::text AS body FROM components ORDER BY kind, source, record_id",
    )
    .fetch_all(pool)
    .await?)
}
