//! The Kafka channel's recovery: what a notifier that stopped mid-delivery already sent.
//!
//! A Kafka-channel notification is produced, then recorded as delivered in PostgreSQL. A notifier
//! killed (or cut off from PostgreSQL) between the two leaves its lease unreleased; the notifier
//! that claims the subscription next reads the subscription's last notification back from the
//! partner's topic and records it instead of sending those events again.

use platform::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// A reader of the notification topics: partitions are assigned, never a group's.
pub fn reader(kafka: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    Ok(platform::kafka::client(kafka)?
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        // librdkafka wants a group to assign partitions; no offset is ever committed (the cluster
        // profile grants the notifier `fhir-notifier*`).
        .set("group.id", kafka.topic("fhir-notifier-reader"))
        .set("log_level", "4")
        .create()?)
}

/// The last event number that subscription `id`'s notifications on `topic` carried (their
/// `last_event` header), among the records written since `since`. Blocking.
pub fn last_sent(consumer: &BaseConsumer, topic: &str, id: &str, since: OffsetDateTime) -> anyhow::Result<Option<i64>> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let Some(partitions) = metadata.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len() as i32) else {
        return Ok(None);
    };
    let mut from = TopicPartitionList::new();
    let millis = i64::try_from(since.unix_timestamp_nanos() / 1_000_000)?;
    for p in 0..partitions {
        from.add_partition_offset(topic, p, Offset::Offset(millis))?;
    }
    let mut assignment = TopicPartitionList::new();
    for e in consumer.offsets_for_times(from, timeout)?.elements() {
        let (_, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        if let Offset::Offset(start) = e.offset()
            && start < high
        {
            assignment.add_partition_offset(topic, e.partition(), Offset::Offset(start))?;
        }
    }
    let mut open = assignment.count();
    if open == 0 {
        return Ok(None);
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while open > 0 {
        anyhow::ensure!(Instant::now() < deadline, "{topic} was not read to its end in {timeout:?}");
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                let header = |name: &str| m.headers().and_then(|h| h.iter().find(|h| h.key == name)).and_then(|h| h.value);
                if header("subscription") == Some(id.as_bytes())
                    && let Some(n) = header("last_event").and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse::<i64>().ok())
                {
                    last = last.max(Some(n));
                }
            }
        }
    }
    Ok(last)
}
