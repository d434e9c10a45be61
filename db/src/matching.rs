//! The PMM1 match index: stored values (peppered token digests) per key id and member.

use sqlx::{PgConnection, PgPool};

/// One stored value of one member's token for one key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub key_id: String,
    pub stored: Vec<u8>,
    /// 1 to 5 (T1…T5).
    pub token_type: i16,
    pub member_id: String,
}

async fn insert(tx: &mut PgConnection, rows: &[IndexRow]) -> crate::Result<()> {
    for chunk in rows.chunks(20_000) {
        let key_ids: Vec<&str> = chunk.iter().map(|r| r.key_id.as_str()).collect();
        let stored: Vec<&[u8]> = chunk.iter().map(|r| r.stored.as_slice()).collect();
        let types: Vec<i16> = chunk.iter().map(|r| r.token_type).collect();
        let members: Vec<&str> = chunk.iter().map(|r| r.member_id.as_str()).collect();
        sqlx::query(
            "INSERT INTO match_index (key_id, stored, token_type, member_id)
             SELECT * FROM unnest($1::text[], $2::bytea[], $3::smallint[], $4::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&key_ids)
        .bind(&stored)
        .bind(&types)
        .bind(&members)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Replaces the index rows of `members` for `key_ids` with `rows` (inside the composer's batch).
pub async fn replace_members(tx: &mut PgConnection, key_ids: &[String], members: &[String], rows: &[IndexRow]) -> crate::Result<()> {
    sqlx::query("DELETE FROM match_index WHERE member_id = ANY($1) AND key_id = ANY($2)").bind(members).bind(key_ids).execute(&mut *tx).await?;
    insert(tx, rows).await
}

/// Rebuilds the whole index of one key id from `rows`, in one transaction; the composer's
/// updates wait for it (the table is locked against writers meanwhile).
pub async fn rebuild(pool: &PgPool, key_id: &str, rows: &[IndexRow]) -> crate::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE match_index IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM match_index WHERE key_id = $1").bind(key_id).execute(&mut *tx).await?;
    insert(&mut tx, rows).await?;
    tx.commit().await?;
    Ok(())
}

/// Appends rows (bulk loads for benchmarks).
pub async fn append(pool: &PgPool, rows: &[IndexRow]) -> crate::Result<()> {
    let mut tx = pool.begin().await?;
    insert(&mut tx, rows).await?;
    tx.commit().await?;
    Ok(())
}

/// The unambiguous hits among `stored` values for `key_id`: (token type, member id). A value
/// that more than one member holds is left out.
pub async fn lookup(pool: &PgPool, key_id: &str, stored: &[Vec<u8>]) -> crate::Result<Vec<(i16, String)>> {
    Ok(sqlx::query_as(
        "SELECT min(token_type), min(member_id) FROM match_index
         WHERE key_id = $1 AND stored = ANY($2) GROUP BY stored HAVING count(*) = 1",
    )
    .bind(key_id)
    .bind(stored)
    .fetch_all(pool)
    .await?)
}

/// Live demographics (Patient JSON) of members in member-id order after `after`, for rebuilds.
pub async fn patients_page(pool: &PgPool, after: &str, limit: i64) -> crate::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT member_id, body::text FROM components
         WHERE kind = 'demographics' AND NOT deleted AND member_id > $1 ORDER BY member_id, source LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A member's open tasks (requested, received, accepted, ready, in progress, on hold), as JSON.
pub async fn open_tasks(pool: &PgPool, member_id: &str) -> crate::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT body::text FROM components WHERE resource_type = 'Task' AND NOT deleted AND member_id = $1
         AND status IN ('requested', 'received', 'accepted', 'ready', 'in-progress', 'on-hold') ORDER BY resource_id",
    )
    .bind(member_id)
    .fetch_all(pool)
    .await?)
}

/// Rows and bytes on disk (table and indexes) of the match index.
pub async fn size(pool: &PgPool) -> crate::Result<(i64, i64)> {
    Ok(sqlx::query_as("SELECT count(*), pg_total_relation_size('match_index') FROM match_index").fetch_one(pool).await?)
}
