//! The local PostgreSQL's batched-upsert ceiling: the same statement shape the composer uses
//! for components (unnest arrays, ON CONFLICT DO UPDATE), with nothing else in the transaction.

use sqlx::PgPool;
use std::time::{Duration, Instant};

/// Upserts `rows` rows (each with a JSON body of `body_bytes`) in transactions of `batch`,
/// twice over the same keys (insert, then update), and returns the elapsed time.
pub async fn upsert_ceiling(pool: &PgPool, rows: usize, batch: usize, body_bytes: usize) -> crate::Result<Duration> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_upserts (kind text, source text, record_id text, member_id text,
           version bigint, deleted boolean, body json, updated_at timestamptz, PRIMARY KEY (kind, source, record_id))",
    )
    .execute(pool)
    .await?;
    let body = format!("{{\"resourceType\":\"MedicationStatement\",\"text\":\"{}\"}}", "x".repeat(body_bytes.saturating_sub(50)));
    let started = Instant::now();
    for round in 0..2i64 {
        for start in (0..rows / 2).step_by(batch) {
            let end = (start + batch).min(rows / 2);
            let ids: Vec<String> = (start..end).map(|i| format!("R{i}")).collect();
            let members: Vec<String> = (start..end).map(|i| format!("M{:07}", i / 10)).collect();
            let bodies: Vec<&str> = ids.iter().map(|_| body.as_str()).collect();
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO bench_upserts (kind, source, record_id, member_id, version, deleted, body, updated_at)
                 SELECT 'medication', 'bench', r, m, $3, false, b::json, now()
                 FROM unnest($1::text[], $2::text[], $4::text[]) AS u(r, m, b)
                 ON CONFLICT (kind, source, record_id) DO UPDATE SET version = EXCLUDED.version, body = EXCLUDED.body,
                   updated_at = EXCLUDED.updated_at WHERE bench_upserts.version < EXCLUDED.version",
            )
            .bind(&ids)
            .bind(&members)
            .bind(round + 1)
            .bind(&bodies)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
    }
    Ok(started.elapsed())
}

/// `fsync`, `synchronous_commit` and `full_page_writes` as the server runs them.
pub async fn durability(pool: &PgPool) -> crate::Result<String> {
    let row: (String, String, String) =
        sqlx::query_as("SELECT current_setting('fsync'), current_setting('synchronous_commit'), current_setting('full_page_writes')")
            .fetch_one(pool)
            .await?;
    Ok(format!("fsync={} synchronous_commit={} full_page_writes={}", row.0, row.1, row.2))
}

/// Drops a benchmark database (name checked as in `create_database`).
pub async fn drop_database(pool: &PgPool, name: &str) -> crate::Result<()> {
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(crate::Error::Sqlx(sqlx::Error::Protocol(format!("not a plain database name: {name:?}"))));
    }
    // Without FORCE (which needs the right to signal other backends): wait for the benchmark's
    // own connections to close.
    let mut attempts = 0;
    loop {
        match sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\""))).execute(pool).await {
            Ok(_) => return Ok(()),
            Err(e) if attempts < 50 => {
                attempts += 1;
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Refreshes the planner's statistics of a table after a bulk load.
pub async fn analyze(pool: &PgPool, table: &str) -> crate::Result<()> {
    let plain = !table.is_empty() && table.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if !plain {
        return Err(crate::Error::Sqlx(sqlx::Error::Protocol(format!("not a plain table name: {table:?}"))));
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}"))).execute(pool).await?;
    Ok(())
}

/// The tables the composer, relay and notifier plan against.
pub const PIPELINE_TABLES: [&str; 8] =
    ["components", "composites", "composite_history", "outbox", "resource_history", "applied_events", "attribution_changes", "partner_topic_members"];

/// Refreshes the statistics of [`PIPELINE_TABLES`] (a benchmark, once its data is in).
pub async fn analyze_pipeline(pool: &PgPool) -> crate::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {}", PIPELINE_TABLES.join(", ")))).execute(pool).await?;
    Ok(())
}

/// How many members have a composite (live or deleted).
pub async fn composites(pool: &PgPool) -> crate::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM composites").fetch_one(pool).await?)
}
