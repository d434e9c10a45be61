//! Waiting for something the platform does asynchronously, with a deadline.

use std::time::Duration;

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages a consumer group has applied, from the offsets stored in PostgreSQL (topics of a
/// test start empty, so the sum of positions counts the messages).
pub async fn applied_messages(pool: &db::Pool, group: &str) -> anyhow::Result<i64> {
    Ok(db::offsets::total_position(pool, group).await?)
}

/// Waits until `group` applied `total` messages.
pub async fn wait_applied(pool: &db::Pool, group: &str, total: usize, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "the composer to apply every message", || async { Ok((applied_messages(pool, group).await? >= total as i64).then_some(())) })
        .await
}

/// Waits until the relay has nothing left to do: every outbox row published, every partner
/// topic following today's attributions.
pub async fn wait_relayed(pool: &db::Pool, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "the relay to drain the outbox and follow attributions", || async {
        Ok((db::partner_topics::backlog(pool, time::OffsetDateTime::now_utc().date()).await? == (0, 0, 0)).then_some(()))
    })
    .await
}

/// Marks the start of a named step of a long scenario. The test's captured output names the
/// last step begun, so a failure says where the scenario stood.
pub fn step(name: &str) {
    println!("-- step: {name}");
}
