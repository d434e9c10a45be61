//! Partner write-back: the queries of a write, all inside its one transaction (the member is
//! locked first with `composer::lock_members`).

use sqlx::PgConnection;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

/// Whether `member_id` is a live member (its Patient exists) attributed to `partner_id` on `day`.
/// A write for any other member is refused exactly as for one that does not exist.
pub async fn serves(tx: &mut PgConnection, partner_id: &str, day: Date, member_id: &str) -> crate::Result<bool> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM components p WHERE p.kind = 'demographics' AND NOT p.deleted AND p.member_id = $1) AND {}",
        crate::resources::attributed("$1", 2, 3)
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(member_id).bind(partner_id).bind(day).fetch_one(&mut *tx).await?)
}

/// The resource of `resource_type` that a partner's identifier names, if any.
pub async fn by_identifier(tx: &mut PgConnection, partner_id: &str, resource_type: &str, system: &str, value: &str) -> crate::Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT resource_id FROM partner_identifiers WHERE partner_id = $1 AND resource_type = $2 AND system = $3 AND value = $4")
        .bind(partner_id)
        .bind(resource_type)
        .bind(system)
        .bind(value)
        .fetch_optional(&mut *tx)
        .await?)
}

/// Records that the partner's identifiers name `resource_id`. An identifier that already names
/// another resource keeps naming it; returns the identifiers that were recorded now.
pub async fn claim_identifiers(
    tx: &mut PgConnection,
    partner_id: &str,
    resource_type: &str,
    resource_id: &str,
    identifiers: &[(String, String)],
) -> crate::Result<Vec<(String, String)>> {
    let (systems, values): (Vec<&str>, Vec<&str>) = identifiers.iter().map(|(s, v)| (s.as_str(), v.as_str())).unzip();
    Ok(sqlx::query_as(
        "INSERT INTO partner_identifiers (partner_id, resource_type, system, value, resource_id)
         SELECT $1, $2, s, v, $3 FROM unnest($4::text[], $5::text[]) AS i(s, v)
         ON CONFLICT DO NOTHING RETURNING system, value",
    )
    .bind(partner_id)
    .bind(resource_type)
    .bind(resource_id)
    .bind(&systems)
    .bind(&values)
    .fetch_all(&mut *tx)
    .await?)
}

/// A resource as stored in `components`, for write-back decisions.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredResource {
    pub source: String,
    pub member_id: String,
    pub version: i64,
    pub resource_version: i64,
    pub deleted: bool,
    pub updated_at: OffsetDateTime,
    pub body: Option<String>,
}

/// The current row of a resource (any source), locked for the rest of the transaction.
pub async fn resource_for_update(tx: &mut PgConnection, resource_type: &str, resource_id: &str) -> crate::Result<Option<StoredResource>> {
    Ok(sqlx::query_as(
        "SELECT source, member_id, version, resource_version, deleted, updated_at, body::text AS body FROM components
         WHERE resource_type = $1 AND resource_id = $2 ORDER BY resource_version DESC LIMIT 1 FOR UPDATE",
    )
    .bind(resource_type)
    .bind(resource_id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// A message for a topic that is not a composite version (it carries its own payload and
/// headers), published by the relay in outbox order once the transaction commits.
#[derive(Debug, Clone)]
pub struct OutboxMessage<'a> {
    pub topic: &'a str,
    pub key: &'a str,
    pub event_id: Uuid,
    pub member_id: &'a str,
    pub version_id: i64,
    pub payload: &'a str,
    pub headers: &'a serde_json::Value,
}

pub async fn enqueue(tx: &mut PgConnection, m: &OutboxMessage<'_>) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (topic, message_key, event_id, member_id, version_id, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6::json, $7::jsonb)",
    )
    .bind(m.topic)
    .bind(m.key)
    .bind(m.event_id)
    .bind(m.member_id)
    .bind(m.version_id)
    .bind(m.payload)
    .bind(m.headers.to_string())
    .execute(&mut *tx)
    .await?;
    crate::notify(tx, crate::channels::OUTBOX).await
}
