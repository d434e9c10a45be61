//! Reading what the platform published on a topic.

use crate::env::{kafka_bootstrap, unique};
use std::time::Duration;

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: std::collections::BTreeMap<String, String>,
}

impl ReadRecord {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// Every record of `topic` from the beginning (in order per partition): reads until
/// `expected_at_least` arrived and then 3 s passed without another, or 30 s without any.
pub async fn read_topic(topic: &str, expected_at_least: usize) -> anyhow::Result<Vec<ReadRecord>> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut records = Vec::new();
    loop {
        let wait = if records.len() >= expected_at_least { Duration::from_secs(3) } else { Duration::from_secs(30) };
        let Ok(m) = tokio::time::timeout(wait, consumer.recv()).await else { break };
        let m = m?;
        let headers = m
            .headers()
            .map(|h| h.iter().map(|x| (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())).collect())
            .unwrap_or_default();
        records.push(ReadRecord {
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    Ok(records)
}
