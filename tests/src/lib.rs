//! Shared support for the end-to-end tests: every test gets a fresh PostgreSQL database and its
//! own Kafka topic namespace on the real services started by `scripts/services up`.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://fhir:fhir@127.0.0.1:5432/fhir".to_owned())
}

pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A short unique name for this test's database and topics.
pub fn unique(label: &str) -> String {
    format!("t_{label}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Creates an empty database (named `t_…`; `scripts/test` drops old ones) and returns its URL,
/// migrated when `migrate` is set.
pub async fn fresh_database(label: &str, migrate: bool) -> anyhow::Result<(String, db::Pool)> {
    let base = database_url();
    let admin = db::connect(&base, 1).await?;
    let name = unique(label);
    db::create_database(&admin, &name).await?;
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("DATABASE_URL has no database name"))?;
    let url = format!("{prefix}/{name}");
    let pool = db::connect(&url, 8).await?;
    if migrate {
        db::migrate(&pool).await?;
    }
    Ok((url, pool))
}

pub fn admin_client() -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create()?)
}

pub async fn create_topic(name: &str, partitions: i32, config: &[(&str, &str)]) -> anyhow::Result<()> {
    let admin = admin_client()?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let results = admin
        .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

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
