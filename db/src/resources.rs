//! FHIR resources as the API serves them: current versions (from `components`), every version
//! (`resource_history`), and composites.

use sqlx::{PgPool, Row};
use time::OffsetDateTime;

/// One version of a resource, as stored: the JSON without `meta.versionId`/`lastUpdated`
/// (the API adds them), or `None` when that version is a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceVersion {
    pub resource_id: String,
    pub version_id: i64,
    pub last_updated: OffsetDateTime,
    pub body: Option<String>,
}

fn version(r: sqlx::postgres::PgRow) -> ResourceVersion {
    ResourceVersion { resource_id: r.get(0), version_id: r.get(1), last_updated: r.get(2), body: r.get(3) }
}

/// The latest version of a resource (live or deleted), if it ever existed.
pub async fn latest(pool: &PgPool, resource_type: &str, id: &str) -> crate::Result<Option<ResourceVersion>> {
    let row = sqlx::query(
        "SELECT resource_id, resource_version, updated_at, body::text FROM components
         WHERE resource_type = $1 AND resource_id = $2 ORDER BY resource_version DESC LIMIT 1",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(version))
}

pub async fn version_of(pool: &PgPool, resource_type: &str, id: &str, version_id: i64) -> crate::Result<Option<ResourceVersion>> {
    let row = sqlx::query(
        "SELECT resource_id, version_id, last_updated, body::text FROM resource_history
         WHERE resource_type = $1 AND resource_id = $2 AND version_id = $3",
    )
    .bind(resource_type)
    .bind(id)
    .bind(version_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(version))
}

/// Every version of a resource, newest first, at most `limit`, and how many there are.
pub async fn history(pool: &PgPool, resource_type: &str, id: &str, limit: i64) -> crate::Result<(i64, Vec<ResourceVersion>)> {
    let rows = sqlx::query(
        "SELECT resource_id, version_id, last_updated, body::text FROM resource_history
         WHERE resource_type = $1 AND resource_id = $2 ORDER BY version_id DESC LIMIT $3",
    )
    .bind(resource_type)
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM resource_history WHERE resource_type = $1 AND resource_id = $2")
        .bind(resource_type)
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok((total, rows.into_iter().map(version).collect()))
}

/// Search criteria over the current, live resources of one type (all optional, AND-ed).
#[derive(Debug, Clone, Default)]
pub struct Criteria {
    pub member_id: Option<String>,
    pub id: Option<String>,
    pub code_system: Option<String>,
    pub code: Option<String>,
    pub status: Option<String>,
    /// `last_updated` in `[from, to)`.
    pub updated_from: Option<OffsetDateTime>,
    pub updated_to: Option<OffsetDateTime>,
}

const SEARCH_WHERE: &str = "resource_type = $1 AND NOT deleted
    AND ($2::text IS NULL OR member_id = $2) AND ($3::text IS NULL OR resource_id = $3)
    AND ($4::text IS NULL OR code_system = $4) AND ($5::text IS NULL OR code = $5)
    AND ($6::text IS NULL OR status = $6)
    AND ($7::timestamptz IS NULL OR updated_at >= $7) AND ($8::timestamptz IS NULL OR updated_at < $8)";

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds $1…$8 of [`SEARCH_WHERE`].
fn bind_criteria<'q>(query: PgQuery<'q>, resource_type: &'q str, c: &'q Criteria) -> PgQuery<'q> {
    query
        .bind(resource_type)
        .bind(&c.member_id)
        .bind(&c.id)
        .bind(&c.code_system)
        .bind(&c.code)
        .bind(&c.status)
        .bind(c.updated_from)
        .bind(c.updated_to)
}

/// A page of matches in resource-id order after `after` (keyset paging), and the total.
pub async fn search(
    pool: &PgPool,
    resource_type: &str,
    c: &Criteria,
    after: Option<&str>,
    count: i64,
) -> crate::Result<(i64, Vec<ResourceVersion>)> {
    let page = format!(
        "SELECT resource_id, resource_version, updated_at, body::text FROM components WHERE {SEARCH_WHERE}
         AND ($9::text IS NULL OR resource_id > $9) ORDER BY resource_id LIMIT $10"
    );
    let rows = bind_criteria(sqlx::query(sqlx::AssertSqlSafe(page)), resource_type, c)
        .bind(after)
        .bind(count)
        .fetch_all(pool)
        .await?;
    let total = format!("SELECT count(*) FROM components WHERE {SEARCH_WHERE}");
    let total: i64 = bind_criteria(sqlx::query(sqlx::AssertSqlSafe(total)), resource_type, c).fetch_one(pool).await?.get(0);
    Ok((total, rows.into_iter().map(version).collect()))
}

/// A member's current medication profile: (versionId, lastUpdated, body; `None` if deleted).
pub async fn medication_profile(pool: &PgPool, member_id: &str) -> crate::Result<Option<(i64, OffsetDateTime, Option<String>)>> {
    let row = sqlx::query(
        "SELECT c.version_id, c.last_updated, h.body::text FROM composites c
         JOIN composite_history h USING (member_id, version_id) WHERE c.member_id = $1",
    )
        .bind(member_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}
