//! Creates the platform's topics with the configuration they need, when they do not exist.

use platform::{KafkaConfig, topics};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// A client of the platform's brokers. Nagle's algorithm is off: librdkafka leaves it on by
/// default (the Java client always turns it off), and a small produce request or fetch answer
/// then waits for the peer's delayed ACK, up to ~40 ms on Linux, in every hop of the data flow.
pub fn client(bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap_servers).set("socket.nagle.disable", "true");
    config
}

/// An idempotent producer (acks=all) that sends what it is given within a millisecond: the
/// composer's dead letters, or a system of record sending each change as it happens.
pub fn prompt_producer(bootstrap_servers: &str) -> anyhow::Result<FutureProducer> {
    Ok(client(bootstrap_servers).set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "1").set("log_level", "4").create()?)
}

/// `sor.*` and the DLQ keep history (delete policy); published composites are compacted.
pub async fn ensure(kafka: &KafkaConfig, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(&kafka.bootstrap_servers).set("log_level", "4").create()?;
    let mut wanted: Vec<(String, Vec<(&str, &str)>)> =
        topics::SOR_TOPICS.iter().map(|t| (kafka.topic(t), vec![("cleanup.policy", "delete")])).collect();
    wanted.push((kafka.topic(topics::DLQ), vec![("cleanup.policy", "delete"), ("retention.ms", "2592000000")]));
    wanted.push((kafka.topic(topics::MEDICATION_PROFILE), vec![("cleanup.policy", "compact"), ("min.compaction.lag.ms", "60000")]));
    wanted.push((kafka.topic(topics::PARTNER_INBOUND), vec![("cleanup.policy", "delete")]));
    let new_topics: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|(name, config)| config.iter().fold(NewTopic::new(name, partitions, TopicReplication::Fixed(1)), |t, (k, v)| t.set(k, v)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    for result in admin.create_topics(new_topics.iter(), &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => anyhow::bail!("creating topic {name}: {e}"),
        }
    }
    Ok(())
}

/// Deletes every topic of `kafka`'s namespace (its non-empty topic prefix): benchmarks remove
/// what they created, so the broker does not carry hundreds of idle partitions into the next
/// measurement. Refuses an empty prefix (that would be the deployment's own topics).
pub async fn delete_namespace(kafka: &KafkaConfig) -> anyhow::Result<usize> {
    anyhow::ensure!(!kafka.topic_prefix.is_empty(), "refusing to delete topics without a namespace prefix");
    let admin: AdminClient<DefaultClientContext> = client(&kafka.bootstrap_servers).set("log_level", "4").create()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let names: Vec<String> = metadata.topics().iter().map(|t| t.name().to_owned()).filter(|n| n.starts_with(&kafka.topic_prefix)).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&refs, &options).await? {
        if let Err((name, e)) = result {
            anyhow::bail!("deleting topic {name}: {e}");
        }
    }
    Ok(names.len())
}
