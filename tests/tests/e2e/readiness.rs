//! `/ready` answers 200 when PostgreSQL and Kafka both answer, and 503 naming the one that
//! does not. "Down" is a dependency that does not answer: an address where nothing listens,
//! so the shared services other tests use keep running.

use tests::*;

/// An API that waits 1.5 s for each dependency's answer.
async fn start(database_url: &str, kafka: &str, lazy_pool: bool) -> anyhow::Result<String> {
    let flags = ["--kafka-bootstrap-servers", kafka, "--ready-timeout-ms", "1500"];
    if lazy_pool { start_api_lazily(database_url, &flags).await } else { start_api(database_url, &flags).await }
}

async fn ready(base: &str) -> anyhow::Result<Reply> {
    get(&reqwest::Client::new(), &format!("{base}/ready")).await
}

#[tokio::test]
async fn ready_when_both_answer() -> anyhow::Result<()> {
    let (url, _pool) = fresh_database("ready", false).await?;
    let base = start(&url, &kafka_bootstrap(), false).await?;
    let Reply { status, body, .. } = ready(&base).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "pass");
    let health = reqwest::get(format!("{base}/health")).await?;
    assert_eq!(health.status().as_u16(), 200);
    Ok(())
}

#[tokio::test]
async fn not_ready_when_kafka_does_not_answer() -> anyhow::Result<()> {
    let (url, _pool) = fresh_database("ready", false).await?;
    let base = start(&url, "127.0.0.1:1", false).await?;
    let Reply { status, body, .. } = ready(&base).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "fail");
    assert_eq!(body["checks"]["postgres"]["status"], "pass");
    assert_eq!(body["checks"]["kafka"]["status"], "fail");
    assert!(body["checks"]["kafka"]["reason"].as_str().unwrap_or_default().contains("Kafka"), "{body}");
    Ok(())
}

#[tokio::test]
async fn not_ready_when_postgres_does_not_answer() -> anyhow::Result<()> {
    let base = start("postgres://fhir:fhir@127.0.0.1:1/fhir", &kafka_bootstrap(), true).await?;
    let Reply { status, body, .. } = ready(&base).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["postgres"]["status"], "fail");
    assert!(body["checks"]["postgres"]["reason"].as_str().unwrap_or_default().contains("PostgreSQL"), "{body}");
    assert_eq!(body["checks"]["kafka"]["status"], "pass");
    Ok(())
}
