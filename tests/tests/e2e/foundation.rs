//! Issue 2: the real services answer, Kafka keeps per-key order with an idempotent producer,
//! a row round-trips through the migrated database, and `/ready` tells the truth.

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::time::Duration;
use tests::*;

#[tokio::test]
async fn idempotent_producer_and_consumer_group_keep_every_message_once_in_order_per_key() -> anyhow::Result<()> {
    let topic = unique("roundtrip");
    create_topic(&topic, 3).await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    const KEYS: usize = 40;
    const MESSAGES: usize = 1_000;
    let mut deliveries = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let key = format!("member-{}", i % KEYS);
        let payload = format!("{}", i / KEYS); // sequence number within the key
        let producer = producer.clone();
        let topic = topic.clone();
        deliveries.push(tokio::spawn(async move {
            producer.send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(10)).await.map_err(|(e, _)| e)
        }));
    }
    // Spawned sends are enqueued in spawn order on one runtime thread at a time, but to make the
    // order per key a property of the producer and not of task scheduling, we check the offsets
    // the broker assigned against the sequence numbers below.
    for d in deliveries {
        d.await??;
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut seen: HashMap<String, Vec<(i32, i64, usize)>> = HashMap::new();
    let mut total = 0;
    while total < MESSAGES {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let key = String::from_utf8(m.key().unwrap_or_default().to_vec())?;
        let seq: usize = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
        seen.entry(key).or_default().push((m.partition(), m.offset(), seq));
        total += 1;
    }
    // Nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await.is_err(), "more than {MESSAGES} messages");

    assert_eq!(seen.len(), KEYS);
    for (key, messages) in &seen {
        let partitions: std::collections::HashSet<i32> = messages.iter().map(|m| m.0).collect();
        assert_eq!(partitions.len(), 1, "{key} spread over partitions {partitions:?}");
        let mut seqs: Vec<usize> = messages.iter().map(|m| m.2).collect();
        let offsets: Vec<i64> = messages.iter().map(|m| m.1).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{key} consumed out of offset order");
        let consumed_order = seqs.clone();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs, (0..MESSAGES / KEYS).collect::<Vec<_>>(), "{key}: every message exactly once");
        assert_eq!(consumed_order, seqs, "{key}: consumed in the order produced");
    }
    Ok(())
}

#[tokio::test]
async fn a_row_round_trips_through_the_migrated_database() -> anyhow::Result<()> {
    let (_url, pool) = fresh_database("roundtrip", true).await?;
    let instance = uuid::Uuid::new_v4();
    db::heartbeat::beat(&pool, "test-component", instance).await?;
    let first = db::heartbeat::get(&pool, "test-component").await?.expect("row written");
    assert_eq!(first.instance, instance);
    db::heartbeat::beat(&pool, "test-component", instance).await?;
    let second = db::heartbeat::get(&pool, "test-component").await?.expect("row kept");
    assert_eq!(second.started_at, first.started_at, "same instance keeps its start time");
    assert!(second.seen_at >= first.seen_at);
    assert!(db::heartbeat::get(&pool, "other").await?.is_none());
    // Migrating again is harmless.
    db::migrate(&pool).await?;
    Ok(())
}

/// Issue 27, client configuration the Kafka way: librdkafka properties reach a component's
/// clients from `KAFKA_PROPERTIES_FILE` and from `KAFKA_CLIENT_*` variables (which win, and read
/// secrets from `_FILE`s); a property librdkafka does not know stops the command, naming it; the
/// topics the platform creates take `min.insync.replicas` from the deployment.
#[tokio::test]
async fn kafka_client_properties_and_topic_settings_come_from_the_deployment() -> anyhow::Result<()> {
    let app = TestApp::new("kafkaprops").await?;
    let kafka = platform::KafkaConfig { topic_min_insync_replicas: Some(2), ..app.kafka.clone() };
    platform::kafka::ensure(&kafka).await?;
    let dlq = app.topic(platform::topics::DLQ);
    let described = admin_client()?
        .describe_configs(&[rdkafka::admin::ResourceSpecifier::Topic(&dlq)], &rdkafka::admin::AdminOptions::new())
        .await?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no description of {dlq}"))??;
    assert_eq!(described.get("min.insync.replicas").and_then(|e| e.value.as_deref()), Some("2"));

    let dir = state_dir().join(unique("kafka-properties"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("client.properties");
    std::fs::write(
        &file,
        "# as a secured deployment writes it, here for the single PLAINTEXT broker\nsecurity.protocol = plaintext\nclient.id=fhirctl-props\n",
    )?;
    let fhirctl = |env: &[(&str, &str)]| -> anyhow::Result<(bool, String)> {
        let out = std::process::Command::new(workspace_binary("fhirctl")?)
            .args(["dlq", "list"])
            .env("DATABASE_URL", &app.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
            .env("KAFKA_TOPIC_PREFIX", &app.prefix)
            .env("KAFKA_PROPERTIES_FILE", &file)
            .envs(env.iter().copied())
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (ok, stderr) = fhirctl(&[])?;
    assert!(ok, "with the properties file: {stderr}");
    // The variable wins over the file: TLS to a PLAINTEXT listener never gets its metadata.
    let (ok, _) = fhirctl(&[("KAFKA_CLIENT_SECURITY_PROTOCOL", "ssl")])?;
    assert!(!ok, "security.protocol=ssl must reach the client");
    let (ok, stderr) = fhirctl(&[("KAFKA_CLIENT_NO_SUCH_PROPERTY", "1")])?;
    assert!(!ok && stderr.contains("no.such.property"), "an unknown property is named: {stderr}");
    let (ok, stderr) = fhirctl(&[("KAFKA_CLIENT_SASL_PASSWORD_FILE", "/nonexistent/password")])?;
    assert!(!ok && stderr.contains("KAFKA_CLIENT_SASL_PASSWORD_FILE /nonexistent/password"), "a missing secret file is named: {stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
