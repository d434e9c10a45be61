//! `scripts/services`: `up` twice is harmless, and `down` then `up` brings both services back
//! with their data. Ignored by default because it stops the services every other test uses;
//! `scripts/test` runs it alone, before the rest.

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::process::Command;
use std::time::Duration;
use tests::*;

fn services(arg: &str) -> anyhow::Result<String> {
    let script = repo_path("scripts/services");
    let out = Command::new("bash").arg(script).arg(arg).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "scripts/services {arg} failed:\n{text}");
    Ok(text)
}

#[tokio::test]
#[ignore = "stops the shared services; run alone by scripts/test"]
async fn up_is_idempotent_and_down_up_keeps_data() -> anyhow::Result<()> {
    services("up")?;
    let again = services("up")?;
    assert!(again.contains("PostgreSQL") && again.contains("already running on 127.0.0.1:5432"), "{again}");
    assert!(again.contains("Kafka") && again.contains("already running on 127.0.0.1:9092"), "{again}");
    assert!(!again.contains("starting"), "second up started something:\n{again}");

    // Data in both services.
    let (url, pool) = fresh_database("services", true).await?;
    let instance = uuid::Uuid::new_v4();
    db::heartbeat::beat(&pool, "restart-check", instance).await?;
    pool.close().await;
    let topic = unique("restart");
    create_topic(&topic, 1).await?;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).set("enable.idempotence", "true").create()?;
    producer.send(FutureRecord::to(&topic).key("k").payload("kept across restarts"), Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    drop(producer);

    let down = services("down")?;
    assert!(down.contains("stopping Kafka") && down.contains("stopping PostgreSQL"), "{down}");
    assert!(db::connect(&url, 1).await.is_err(), "PostgreSQL still answers after down");
    let up = services("up")?;
    assert!(up.contains("starting PostgreSQL") && up.contains("starting Kafka"), "{up}");

    let pool = db::connect(&url, 1).await?;
    let row = db::heartbeat::get(&pool, "restart-check").await?.expect("row survives restart");
    assert_eq!(row.instance, instance);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("restart"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
    assert_eq!(m.payload(), Some(&b"kept across restarts"[..]));
    Ok(())
}
