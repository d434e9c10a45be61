//! The append-only audit trail, and the audit relay's place on it towards `audit.events.v1`.

use sqlx::{PgConnection, PgPool};
use std::sync::LazyLock;
use time::OffsetDateTime;

/// One access, as the API records it. Never holds names, tokens or keys: member ids at most.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRecord {
    pub partner_id: Option<String>,
    pub operation: String,
    pub resource_type: Option<String>,
    pub member_ids: Vec<String>,
    pub method: String,
    pub path: String,
    pub status: i16,
    pub outcome: String,
    /// For $hashed-match: the PMM1 key id the partner named, and the decision.
    pub key_id: Option<String>,
    pub decision: Option<String>,
}

/// The outcome recorded for an HTTP status.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=399 => "success",
        401 | 403 | 429 => "refused",
        404 | 410 => "not-found",
        400..=499 => "invalid",
        _ => "error",
    }
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub recorded_at: OffsetDateTime,
    #[sqlx(flatten)]
    pub record: AuditRecord,
}

/// An audit event with the transaction that wrote it (the relay's order).
#[derive(Debug, sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    row: AuditRow,
    txid: i64,
}

const COLUMNS: &str = "id, recorded_at, partner_id, operation, resource_type, member_ids, method, path, status, outcome, key_id, decision";

/// Records as one array per column, for statements that unnest them. A record's member ids are
/// the slice `ids[first + 1 .. first + count]` of all the records' ids.
pub(crate) struct Columns<'a> {
    pub partner_id: Vec<Option<&'a str>>,
    pub operation: Vec<&'a str>,
    pub resource_type: Vec<Option<&'a str>>,
    pub method: Vec<&'a str>,
    pub path: Vec<&'a str>,
    pub status: Vec<i16>,
    pub outcome: Vec<&'a str>,
    pub key_id: Vec<Option<&'a str>>,
    pub decision: Vec<Option<&'a str>>,
    pub first: Vec<i32>,
    pub count: Vec<i32>,
    pub ids: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(records: impl ExactSizeIterator<Item = &'a AuditRecord>) -> Self {
        let n = records.len();
        let mut c = Columns {
            partner_id: Vec::with_capacity(n),
            operation: Vec::with_capacity(n),
            resource_type: Vec::with_capacity(n),
            method: Vec::with_capacity(n),
            path: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            key_id: Vec::with_capacity(n),
            decision: Vec::with_capacity(n),
            first: Vec::with_capacity(n),
            count: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
        };
        for r in records {
            c.partner_id.push(r.partner_id.as_deref());
            c.operation.push(&r.operation);
            c.resource_type.push(r.resource_type.as_deref());
            c.method.push(&r.method);
            c.path.push(&r.path);
            c.status.push(r.status);
            c.outcome.push(&r.outcome);
            c.key_id.push(r.key_id.as_deref());
            c.decision.push(r.decision.as_deref());
            c.first.push(c.ids.len() as i32);
            c.count.push(r.member_ids.len() as i32);
            c.ids.extend(r.member_ids.iter().map(String::as_str));
        }
        c
    }
}

/// SQL: the common table expressions that append the rows of `{records}` (columns partner_id,
/// operation, resource_type, method, path, status, outcome, key_id, decision, first and count,
/// as in `Columns`; member ids in `{ids}`) to the trail; `added` returns the ids appended.
pub(crate) fn append_sql(records: &str, ids: &str) -> String {
    format!(
        "added AS (
           INSERT INTO audit_events (partner_id, operation, resource_type, member_ids, method, path, status, outcome, key_id, decision)
           SELECT partner_id, operation, resource_type, ({ids})[first + 1 : first + count], method, path, status, outcome, key_id, decision
           FROM {records}
           RETURNING id)"
    )
}

/// The statement of `append`, composed once.
static APPEND: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::text[], $8::text[], $9::text[],
                                         $10::int4[], $12::int4[])
                      AS r(partner_id, operation, resource_type, method, path, status, outcome, key_id, decision, first, count)),
         {}
         SELECT count(*) FROM added",
        append_sql("r", "$11::text[]")
    )
});

/// Appends records in one statement, so one commit covers a group.
pub async fn append(pool: &PgPool, records: &[AuditRecord]) -> crate::Result<()> {
    let c = Columns::of(records.iter());
    let appended: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(APPEND.as_str()))
        .bind(&c.partner_id)
        .bind(&c.operation)
        .bind(&c.resource_type)
        .bind(&c.method)
        .bind(&c.path)
        .bind(&c.status)
        .bind(&c.outcome)
        .bind(&c.key_id)
        .bind(&c.decision)
        .bind(&c.first)
        .bind(&c.ids)
        .bind(&c.count)
        .fetch_one(pool)
        .await?;
    if appended != records.len() as i64 {
        return Err(crate::Error::Sqlx(sqlx::Error::Protocol(format!("{appended} of {} audit records appended", records.len()))));
    }
    Ok(())
}

/// Search criteria (all optional, AND-ed); results in id order after `after_id`.
#[derive(Debug, Clone, Default)]
pub struct Criteria {
    pub partner_id: Option<String>,
    pub member_id: Option<String>,
    pub operation: Option<String>,
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
}

const WHERE: &str = "($1::text IS NULL OR partner_id = $1)
    AND ($2::text IS NULL OR member_ids @> ARRAY[$2::text])
    AND ($3::text IS NULL OR operation = $3)
    AND ($4::timestamptz IS NULL OR recorded_at >= $4) AND ($5::timestamptz IS NULL OR recorded_at < $5)";

type PgQueryAs<'q, T> = sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>;

fn bind<'q, T>(q: PgQueryAs<'q, T>, c: &'q Criteria) -> PgQueryAs<'q, T> {
    q.bind(&c.partner_id).bind(&c.member_id).bind(&c.operation).bind(c.from).bind(c.to)
}

/// A page of matching events and the total.
pub async fn search(pool: &PgPool, c: &Criteria, after_id: Option<i64>, count: i64) -> crate::Result<(i64, Vec<AuditRow>)> {
    let page = format!("SELECT {COLUMNS} FROM audit_events WHERE {WHERE} AND ($6::bigint IS NULL OR id > $6) ORDER BY id LIMIT $7");
    let rows = bind(sqlx::query_as(sqlx::AssertSqlSafe(page)), c).bind(after_id).bind(count).fetch_all(pool).await?;
    let total = format!("SELECT count(*) FROM audit_events WHERE {WHERE}");
    let (total,): (i64,) = bind(sqlx::query_as(sqlx::AssertSqlSafe(total)), c).fetch_one(pool).await?;
    Ok((total, rows))
}

pub async fn get(pool: &PgPool, id: i64) -> crate::Result<Option<AuditRow>> {
    let sql = format!("SELECT {COLUMNS} FROM audit_events WHERE id = $1");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await?)
}

/// Where the audit relay stands on the trail: the last event it published, in the order of
/// (writing transaction, id). Events come to `audit.events.v1` in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    txid: i64,
    id: i64,
}

/// Events the relay may publish, and where it will stand once they are acknowledged.
#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<AuditRow>,
    pub after: Cursor,
}

/// The events after the relay's cursor, oldest first, at most `limit`: only those written by
/// transactions older than every transaction still running (`pg_snapshot_xmin`). An event of a
/// transaction still running may hold a smaller id than one already committed, but never a
/// smaller transaction id than the horizon, so no event commits behind the cursor. Takes the
/// relay's lock (one relay at a time, for the rest of the transaction).
pub async fn claim_unpublished(tx: &mut PgConnection, limit: i64) -> crate::Result<Claim> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('fhir-event-platform audit relay'))").execute(&mut *tx).await?;
    let (txid, id): (i64, i64) = sqlx::query_as("SELECT txid::text::int8, id FROM audit_relay").fetch_one(&mut *tx).await?;
    let sql = format!(
        "SELECT {COLUMNS}, txid::text::int8 AS txid FROM audit_events e
         WHERE (txid, id) > ($1::int8::text::xid8, $2) AND txid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY e.txid, e.id LIMIT $3"
    );
    let rows: Vec<ClaimedRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(txid).bind(id).bind(limit).fetch_all(&mut *tx).await?;
    let after = rows.last().map_or(Cursor { txid, id }, |r| Cursor { txid: r.txid, id: r.row.id });
    Ok(Claim { rows: rows.into_iter().map(|r| r.row).collect(), after })
}

/// Moves the relay to `after` (a claim's) once the broker acknowledged the claim's events.
pub async fn mark_published(tx: &mut PgConnection, after: Cursor) -> crate::Result<()> {
    sqlx::query("UPDATE audit_relay SET txid = $1::int8::text::xid8, id = $2").bind(after.txid).bind(after.id).execute(&mut *tx).await?;
    Ok(())
}

/// How many events still wait for the topic (tests, metrics).
pub async fn unpublished(pool: &PgPool) -> crate::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM audit_events e, audit_relay r WHERE (e.txid, e.id) > (r.txid, r.id)").fetch_one(pool).await?)
}

/// Makes sure the monthly partitions of the trail exist from the current month to `ahead`
/// months after it (migration 0018's `create_audit_partition`).
pub async fn ensure_partitions(pool: &PgPool, ahead: i32) -> crate::Result<()> {
    sqlx::query("SELECT create_audit_partition(now() + make_interval(months => m)) FROM generate_series(0, $1) AS m")
        .bind(ahead)
        .execute(pool)
        .await?;
    Ok(())
}

/// Makes sure the partition of the month holding `at` exists (an operator's backfill; tests).
pub async fn ensure_partition_for(pool: &PgPool, at: OffsetDateTime) -> crate::Result<()> {
    sqlx::query("SELECT create_audit_partition($1)").bind(at).execute(pool).await?;
    Ok(())
}

/// A partition of the trail: its table name and range (`from` `None`: everything before `to`;
/// both `None`: the default partition).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Partition {
    pub name: String,
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
    /// Events in it not yet on `audit.events.v1`.
    pub unpublished: i64,
}

/// Every partition of the trail, oldest first (the default partition last).
pub async fn partitions(pool: &PgPool) -> crate::Result<Vec<Partition>> {
    let mut parts: Vec<Partition> = sqlx::query_as(
        "SELECT c.relname::text AS name,
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz AS \"from\",
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz AS \"to\",
                0::int8 AS unpublished
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'audit_events'::regclass
         ORDER BY 3 NULLS LAST",
    )
    .fetch_all(pool)
    .await?;
    for p in &mut parts {
        let sql = format!("SELECT count(*) FROM {} e, audit_relay r WHERE (e.txid, e.id) > (r.txid, r.id)", quoted(&p.name));
        p.unpublished = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await?;
    }
    Ok(parts)
}

/// A partition's events in id order, `limit` at a time after `after_id` (the export).
pub async fn partition_rows(pool: &PgPool, partition: &str, after_id: i64, limit: i64) -> crate::Result<Vec<AuditRow>> {
    let sql = format!("SELECT {COLUMNS} FROM {} WHERE id > $1 ORDER BY id LIMIT $2", quoted(partition));
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(after_id).bind(limit).fetch_all(pool).await?)
}

/// Detaches a partition from the trail and drops it, in one transaction: what retention does
/// once the partition's export is written and verified. Rows are never deleted one by one.
pub async fn drop_partition(pool: &PgPool, partition: &str) -> crate::Result<()> {
    let mut tx = pool.begin().await?;
    let detach = format!("ALTER TABLE audit_events DETACH PARTITION {}", quoted(partition));
    sqlx::query(sqlx::AssertSqlSafe(detach)).execute(&mut *tx).await?;
    let drop = format!("DROP TABLE {}", quoted(partition));
    sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// A partition's name as an SQL identifier. Names come from the catalog (`partitions`) and are
/// checked to be the trail's own, so nothing else can be named here.
fn quoted(name: &str) -> String {
    assert!(
        name.starts_with("audit_events_") && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "not a partition of the trail"
    );
    format!("\"{name}\"")
}
