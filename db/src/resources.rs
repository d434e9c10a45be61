//! FHIR resources as the API serves them: current versions (from `components`), every version
//! (`resource_history`), and composites.

use crate::audit::{AuditRecord, Columns, outcome};
use sqlx::PgPool;
use std::sync::LazyLock;
use time::{Date, OffsetDateTime};

/// Who reads: a partner sees only members attributed to it on the given day. Every query below
/// filters by it, so a member the partner does not serve is indistinguishable from one that
/// does not exist.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    pub partner_id: &'a str,
    pub on: Date,
}

/// SQL: the member in `member_column` is attributed to partner `$p` on day `$d`.
pub(crate) fn attributed(member_column: &str, p: u8, d: u8) -> String {
    attributed_to(member_column, &format!("${p}"), &format!("${d}"))
}

/// SQL: the member in `member_column` is attributed to the partner in `partner` on `day`
/// (columns or parameters).
pub(crate) fn attributed_to(member_column: &str, partner: &str, day: &str) -> String {
    format!("EXISTS (SELECT 1 FROM components a WHERE {})", attribution_condition(member_column, partner, day))
}

/// The condition on `components a` that makes a row the attribution of `member_column` to
/// `partner` on `day`.
fn attribution_condition(member_column: &str, partner: &str, day: &str) -> String {
    format!(
        "a.kind = 'attribution' AND NOT a.deleted
           AND a.body ->> 'partner_id' = {partner} AND a.member_id = {member_column}
           AND (a.body ->> 'period_start')::date <= {day}
           AND coalesce((a.body ->> 'period_end')::date >= {day}, true)"
    )
}

/// One attribution row of `member_column` to `partner` on `day`, if any: for a `LEFT JOIN
/// LATERAL` that must probe the index per row (an `EXISTS` may be planned as a hash of all the
/// partner's attributions).
pub(crate) fn attribution_of(member_column: &str, partner: &str, day: &str) -> String {
    format!("SELECT a.member_id FROM components a WHERE {} LIMIT 1", attribution_condition(member_column, partner, day))
}

/// Whether `member_id` is attributed to the viewer on its day.
pub async fn is_attributed(pool: &PgPool, viewer: Viewer<'_>, member_id: &str) -> crate::Result<bool> {
    let sql = format!("SELECT {}", attributed("$1", 2, 3));
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(member_id).bind(viewer.partner_id).bind(viewer.on).fetch_one(pool).await?)
}

/// One version of a resource, as stored: the JSON without `meta.versionId`/`lastUpdated`
/// (the API adds them), or `None` when that version is a deletion.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ResourceVersion {
    pub resource_id: String,
    pub version_id: i64,
    pub last_updated: OffsetDateTime,
    pub body: Option<String>,
    /// The member the resource belongs to.
    pub member_id: String,
}

/// The columns of a [`ResourceVersion`] from `components` (its current version).
const CURRENT: &str = "resource_id, resource_version AS version_id, updated_at AS last_updated, body::text AS body, member_id";
/// The columns of a [`ResourceVersion`] from `resource_history h`.
const HISTORY: &str = "resource_id, version_id, last_updated, body::text AS body, h.member_id";

/// The latest version of a resource (live or deleted), if it ever existed.
pub async fn latest(pool: &PgPool, viewer: Viewer<'_>, resource_type: &str, id: &str) -> crate::Result<Option<ResourceVersion>> {
    let sql = format!(
        "SELECT {CURRENT} FROM components
         WHERE resource_type = $1 AND resource_id = $2 AND {}
         ORDER BY resource_version DESC LIMIT 1",
        attributed("components.member_id", 3, 4)
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(resource_type).bind(id).bind(viewer.partner_id).bind(viewer.on).fetch_optional(pool).await?)
}

pub async fn version_of(pool: &PgPool, viewer: Viewer<'_>, resource_type: &str, id: &str, version_id: i64) -> crate::Result<Option<ResourceVersion>> {
    let sql = format!(
        "SELECT {HISTORY} FROM resource_history h
         WHERE resource_type = $1 AND resource_id = $2 AND version_id = $3 AND {}",
        attributed("h.member_id", 4, 5)
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(resource_type)
        .bind(id)
        .bind(version_id)
        .bind(viewer.partner_id)
        .bind(viewer.on)
        .fetch_optional(pool)
        .await?)
}

/// Every version of a resource, newest first, at most `limit`, and how many there are.
pub async fn history(pool: &PgPool, viewer: Viewer<'_>, resource_type: &str, id: &str, limit: i64) -> crate::Result<(i64, Vec<ResourceVersion>)> {
    let visible = attributed("h.member_id", 3, 4);
    let sql = format!(
        "SELECT {HISTORY} FROM resource_history h
         WHERE resource_type = $1 AND resource_id = $2 AND {visible} ORDER BY version_id DESC LIMIT $5"
    );
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(resource_type)
        .bind(id)
        .bind(viewer.partner_id)
        .bind(viewer.on)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    let sql = format!("SELECT count(*) FROM resource_history h WHERE resource_type = $1 AND resource_id = $2 AND {visible}");
    let total: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(resource_type).bind(id).bind(viewer.partner_id).bind(viewer.on).fetch_one(pool).await?;
    Ok((total, rows))
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

/// $1…$10: the criteria, then the viewer ($9 partner, $10 day).
fn search_where() -> String {
    format!(
        "resource_type = $1 AND NOT deleted
        AND ($2::text IS NULL OR member_id = $2) AND ($3::text IS NULL OR resource_id = $3)
        AND ($4::text IS NULL OR code_system = $4) AND ($5::text IS NULL OR code = $5)
        AND ($6::text IS NULL OR status = $6)
        AND ($7::timestamptz IS NULL OR updated_at >= $7) AND ($8::timestamptz IS NULL OR updated_at < $8)
        AND {}",
        attributed("components.member_id", 9, 10)
    )
}

type PgQueryAs<'q, T> = sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>;

/// Binds $1…$10 of [`search_where`].
fn bind_criteria<'q, T>(query: PgQueryAs<'q, T>, viewer: Viewer<'q>, resource_type: &'q str, c: &'q Criteria) -> PgQueryAs<'q, T> {
    query
        .bind(resource_type)
        .bind(&c.member_id)
        .bind(&c.id)
        .bind(&c.code_system)
        .bind(&c.code)
        .bind(&c.status)
        .bind(c.updated_from)
        .bind(c.updated_to)
        .bind(viewer.partner_id)
        .bind(viewer.on)
}

/// A page of matches in resource-id order after `after` (keyset paging), and the total.
pub async fn search(
    pool: &PgPool,
    viewer: Viewer<'_>,
    resource_type: &str,
    c: &Criteria,
    after: Option<&str>,
    count: i64,
) -> crate::Result<(i64, Vec<ResourceVersion>)> {
    let page = format!(
        "SELECT {CURRENT} FROM components WHERE {}
         AND ($11::text IS NULL OR resource_id > $11) ORDER BY resource_id LIMIT $12",
        search_where()
    );
    let rows = bind_criteria(sqlx::query_as(sqlx::AssertSqlSafe(page)), viewer, resource_type, c).bind(after).bind(count).fetch_all(pool).await?;
    let total = format!("SELECT count(*) FROM components WHERE {}", search_where());
    let (total,): (i64,) = bind_criteria(sqlx::query_as(sqlx::AssertSqlSafe(total)), viewer, resource_type, c).fetch_one(pool).await?;
    Ok((total, rows))
}

/// One medication-profile read: whose, for which partner, the version whose body the reader
/// already holds (that body is then not sent again: a version's body never changes), what the
/// client holds (`If-None-Match`), and the access as the audit trail records it (its status
/// and outcome are decided by the statement that serves the read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRead {
    pub member_id: String,
    pub partner_id: String,
    pub known_version: Option<i64>,
    pub if_none_match: Option<IfNoneMatch>,
    pub access: AuditRecord,
}

/// One row of the profile statement: the read it answers (1-based), its status, and the
/// profile's current version when there is one.
#[derive(Debug, sqlx::FromRow)]
struct ServedRow {
    i: i64,
    status: i16,
    version_id: Option<i64>,
    last_updated: Option<OffsetDateTime>,
    deleted: Option<bool>,
    body: Option<String>,
}

/// What an `If-None-Match` header asks: `*` (any version), or the versions it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfNoneMatch {
    Any,
    Versions(Vec<i64>),
}

impl IfNoneMatch {
    pub fn matches(&self, version_id: i64) -> bool {
        match self {
            IfNoneMatch::Any => true,
            IfNoneMatch::Versions(versions) => versions.contains(&version_id),
        }
    }

    /// As the profile statement takes it: `*`, or the versions separated by commas.
    fn as_sql(&self) -> String {
        match self {
            IfNoneMatch::Any => "*".to_owned(),
            IfNoneMatch::Versions(versions) => versions.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

/// A member's current medication profile: its versionId and lastUpdated, whether it is deleted,
/// and its body, unless it is deleted or is the version the read already knew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub version_id: i64,
    pub last_updated: OffsetDateTime,
    pub deleted: bool,
    pub body: Option<String>,
}

/// What a read was served, as the audit trail holds it: 200, 304 (`If-None-Match` named the
/// current version), 404 (no such member, or not attributed to the partner) or 410 (deleted);
/// and the profile, unless 404.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRead {
    pub status: i16,
    pub profile: Option<Profile>,
}

/// The statement of `medication_profiles`, composed once.
static PROFILE_READS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS MATERIALIZED (
           SELECT * FROM unnest($1::text[], $2::text[], $4::int8[], $5::text[],
                                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                                $13::int4[], $15::int4[])
             WITH ORDINALITY AS r(member_id, partner_id, known, if_none_match, access_partner_id, operation, resource_type, method, path,
                                  key_id, decision, first, count, i)),
         current AS (
           SELECT r.i, c.version_id, c.last_updated, c.deleted,
             CASE WHEN NOT c.deleted AND c.version_id IS DISTINCT FROM r.known THEN
               (SELECT h.body FROM composite_history h WHERE h.member_id = c.member_id AND h.version_id = c.version_id) END AS body
           FROM r JOIN composites c ON c.member_id = r.member_id
           WHERE {}),
         served AS MATERIALIZED (
           SELECT r.*, c.version_id, c.last_updated, c.deleted, c.body,
             (CASE WHEN c.i IS NULL THEN 404 WHEN c.deleted THEN 410
                   WHEN r.if_none_match = '*' OR c.version_id = ANY(string_to_array(nullif(r.if_none_match, '*'), ',')::int8[]) THEN 304
                   ELSE 200 END)::int2 AS status
           FROM r LEFT JOIN current c ON c.i = r.i),
         accesses AS (
           SELECT access_partner_id AS partner_id, operation, resource_type, method, path, status,
             CASE status WHEN 200 THEN '{ok}' WHEN 304 THEN '{not_modified}' WHEN 404 THEN '{not_found}' WHEN 410 THEN '{gone}' END AS outcome,
             key_id, decision, first, count
           FROM served ORDER BY i),
         {}
         SELECT i, status, version_id, last_updated, deleted, body FROM served",
        attributed_to("c.member_id", "r.partner_id", "$3"),
        crate::audit::append_sql("accesses", "$14::text[]"),
        ok = outcome(200),
        not_modified = outcome(304),
        not_found = outcome(404),
        gone = outcome(410),
    )
});

/// Serves several medication-profile reads at once, in one statement that also appends their
/// accesses to the audit trail (so one commit records them all, and the outcome recorded is the
/// one served): for each read, in order, the profile if the member is attributed to that
/// partner on day `on`. Use a pool from `crate::connect_for_batches`.
pub async fn medication_profiles(pool: &PgPool, on: Date, reads: &[ProfileRead]) -> crate::Result<Vec<ServedRead>> {
    let members: Vec<&str> = reads.iter().map(|r| r.member_id.as_str()).collect();
    let partners: Vec<&str> = reads.iter().map(|r| r.partner_id.as_str()).collect();
    let known: Vec<Option<i64>> = reads.iter().map(|r| r.known_version).collect();
    let if_none_match: Vec<Option<String>> = reads.iter().map(|r| r.if_none_match.as_ref().map(IfNoneMatch::as_sql)).collect();
    let access = Columns::of(reads.iter().map(|r| &r.access));
    let rows: Vec<ServedRow> = sqlx::query_as(sqlx::AssertSqlSafe(PROFILE_READS.as_str()))
        .bind(&members)
        .bind(&partners)
        .bind(on)
        .bind(&known)
        .bind(&if_none_match)
        .bind(&access.partner_id)
        .bind(&access.operation)
        .bind(&access.resource_type)
        .bind(&access.method)
        .bind(&access.path)
        .bind(&access.key_id)
        .bind(&access.decision)
        .bind(&access.first)
        .bind(&access.ids)
        .bind(&access.count)
        .fetch_all(pool)
        .await?;
    let mut served = vec![None; reads.len()];
    for row in rows {
        let profile = match (row.version_id, row.last_updated) {
            (Some(version_id), Some(last_updated)) => {
                Some(Profile { version_id, last_updated, deleted: row.deleted.unwrap_or(false), body: row.body })
            }
            _ => None,
        };
        if let Some(slot) = usize::try_from(row.i - 1).ok().and_then(|i| served.get_mut(i)) {
            *slot = Some(ServedRead { status: row.status, profile });
        }
    }
    served
        .into_iter()
        .map(|s| s.ok_or_else(|| crate::Error::Sqlx(sqlx::Error::Protocol("the profile statement did not answer every read".into()))))
        .collect()
}
