//! `service_heartbeats`: which instance of each component started, and when it was last seen.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub component: String,
    pub instance: Uuid,
    pub started_at: OffsetDateTime,
    pub seen_at: OffsetDateTime,
}

/// Records that `instance` of `component` is alive; the start time is kept per instance.
pub async fn beat(pool: &PgPool, component: &str, instance: Uuid) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO service_heartbeats (component, instance, started_at, seen_at)
         VALUES ($1, $2, now(), now())
         ON CONFLICT (component) DO UPDATE
           SET started_at = CASE WHEN service_heartbeats.instance = EXCLUDED.instance
                                 THEN service_heartbeats.started_at ELSE EXCLUDED.started_at END,
               instance = EXCLUDED.instance,
               seen_at = EXCLUDED.seen_at",
    )
    .bind(component)
    .bind(instance)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn get(pool: &PgPool, component: &str) -> crate::Result<Option<Heartbeat>> {
    let row: Option<(String, Uuid, OffsetDateTime, OffsetDateTime)> =
        sqlx::query_as("SELECT component, instance, started_at, seen_at FROM service_heartbeats WHERE component = $1")
            .bind(component)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(component, instance, started_at, seen_at)| Heartbeat { component, instance, started_at, seen_at }))
}
