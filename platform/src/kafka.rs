//! Kafka clients and topics: the one place that says how the platform's clients and producers
//! are configured and how the topics it creates are (partitions, replication, retention, size
//! limit), so that every component agrees.

use crate::{KafkaConfig, topics};
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

/// An idempotent producer's configuration (acks=all) whose largest record is the deployment's
/// `KAFKA_MESSAGE_MAX_BYTES`: a larger one fails at once (`MessageSizeTooLarge`), before it
/// reaches a broker, so the caller can tell that record apart from a broker that is down.
pub fn producer(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = client(&kafka.bootstrap_servers);
    config.set("enable.idempotence", "true").set("acks", "all").set("message.max.bytes", kafka.message_max_bytes.to_string());
    config
}

/// A producer that sends what it is given within a millisecond: the composer's dead letters,
/// or a system of record sending each change as it happens.
pub fn prompt_producer(kafka: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    Ok(producer(kafka).set("linger.ms", "1").set("log_level", "4").create()?)
}

/// How a topic the platform creates keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Deleted by age (the broker's default, or this many milliseconds).
    Delete(Option<u64>),
    /// The latest record per key is kept (composites, per member).
    Compact,
}

/// An admin client (topic creation), quiet but for errors.
pub fn admin(kafka: &KafkaConfig) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(client(&kafka.bootstrap_servers).set("log_level", "4").create()?)
}

/// Creates `names` (full topic names) as the deployment configures topics (partitions,
/// replication, the size limit), unless they exist.
pub async fn create(kafka: &KafkaConfig, names: &[(String, Retention)]) -> anyhow::Result<()> {
    create_with(&admin(kafka)?, kafka, names).await
}

/// As [`create`], with an admin client the caller keeps.
pub async fn create_with(admin: &AdminClient<DefaultClientContext>, kafka: &KafkaConfig, names: &[(String, Retention)]) -> anyhow::Result<()> {
    let (partitions, replication) = (kafka.topic_partitions, kafka.replication_factor);
    let max = kafka.topic_max_message_bytes().to_string();
    let retention: Vec<Option<String>> =
        names.iter().map(|(_, r)| if let Retention::Delete(Some(ms)) = r { Some(ms.to_string()) } else { None }).collect();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .zip(&retention)
        .map(|((name, kind), ms)| {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication)).set("max.message.bytes", &max);
            let topic = match kind {
                Retention::Compact => topic.set("cleanup.policy", "compact").set("min.compaction.lag.ms", "60000"),
                Retention::Delete(_) => topic.set("cleanup.policy", "delete"),
            };
            match ms {
                Some(ms) => topic.set("retention.ms", ms),
                None => topic,
            }
        })
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

/// The topics every deployment has: `sor.*` and the DLQ keep history (delete policy; dead
/// letters for 30 days); published composites are compacted.
pub async fn ensure(kafka: &KafkaConfig) -> anyhow::Result<()> {
    let mut wanted: Vec<(String, Retention)> = topics::SOR_TOPICS.iter().map(|t| (kafka.topic(t), Retention::Delete(None))).collect();
    wanted.push((kafka.topic(topics::DLQ), Retention::Delete(Some(30 * 24 * 3600 * 1000))));
    wanted.push((kafka.topic(topics::MEDICATION_PROFILE), Retention::Compact));
    wanted.push((kafka.topic(topics::PARTNER_INBOUND), Retention::Delete(None)));
    create(kafka, &wanted).await
}

/// Deletes every topic of `kafka`'s namespace (its non-empty topic prefix): benchmarks remove
/// what they created, so the broker does not carry hundreds of idle partitions into the next
/// measurement. Refuses an empty prefix (that would be the deployment's own topics).
pub async fn delete_namespace(kafka: &KafkaConfig) -> anyhow::Result<usize> {
    anyhow::ensure!(!kafka.topic_prefix.is_empty(), "refusing to delete topics without a namespace prefix");
    let admin = admin(kafka)?;
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
