//! `consumer_offsets`: the composer's positions, stored in the same transaction as what it
//! applied (Kafka's committed offsets are only a hint).

use sqlx::{PgConnection, PgPool};

/// A stored consumer position: the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

pub async fn load_offsets(pool: &PgPool, group: &str, topics: &[String]) -> crate::Result<Vec<StoredOffset>> {
    Ok(sqlx::query_as("SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = ANY($2)")
        .bind(group)
        .bind(topics)
        .fetch_all(pool)
        .await?)
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

/// Sum of a group's stored positions (tests and progress reports).
#[cfg(feature = "test-support")]
pub async fn total_position(pool: &PgPool, group: &str) -> crate::Result<i64> {
    let total: Option<i64> =
        sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE consumer_group = $1").bind(group).fetch_one(pool).await?;
    Ok(total.unwrap_or(0))
}
