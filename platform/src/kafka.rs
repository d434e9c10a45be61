//! Kafka clients and topics: the one place that says how the platform's clients and producers
//! are configured and how the topics it creates are (partitions, replication, retention, size
//! limit), so that every component agrees.

use crate::{KafkaConfig, topics};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The variables that add librdkafka properties: `KAFKA_CLIENT_SASL_MECHANISMS=SCRAM-SHA-512`
/// is `sasl.mechanisms`; with `_FILE` appended the value is read from that file (a secret, such
/// as `KAFKA_CLIENT_SASL_PASSWORD_FILE`).
pub const CLIENT_PROPERTY_PREFIX: &str = "KAFKA_CLIENT_";

/// The librdkafka properties the deployment gives every client of this process: those of
/// `KAFKA_PROPERTIES_FILE`, then the `KAFKA_CLIENT_*` variables (which win). Values are never
/// logged or put in an error: they hold passwords.
pub fn client_properties(kafka: &KafkaConfig) -> anyhow::Result<Vec<(String, String)>> {
    let mut properties = match &kafka.properties_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("KAFKA_PROPERTIES_FILE {}: {e}", path.display()))?;
            parse_properties(&text).map_err(|e| anyhow::anyhow!("KAFKA_PROPERTIES_FILE {}: {e}", path.display()))?
        }
        None => Vec::new(),
    };
    properties.extend(properties_from_env(std::env::vars())?);
    Ok(properties)
}

/// `name=value` lines (Java `.properties` as Kafka's own tools write them, without escapes or
/// continuations): blank lines and `#` or `!` comments are skipped, spaces around both trimmed.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut properties = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or_else(|| format!("line {}: not name=value", n + 1))?;
        let name = name.trim();
        if !is_property_name(name) {
            return Err(format!("line {}: not a property name", n + 1));
        }
        properties.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(properties)
}

/// The properties `KAFKA_CLIENT_*` variables set, in name order.
pub fn properties_from_env(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<Vec<(String, String)>> {
    let mut properties = Vec::new();
    for (var, value) in vars {
        let Some(rest) = var.strip_prefix(CLIENT_PROPERTY_PREFIX) else { continue };
        let (rest, from_file) = match rest.strip_suffix("_FILE") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let name = rest.to_ascii_lowercase().replace('_', ".");
        anyhow::ensure!(is_property_name(&name), "{var}: not a librdkafka property name");
        let value = if from_file {
            std::fs::read_to_string(&value).map_err(|e| anyhow::anyhow!("{var} {value}: {e}"))?.trim_end_matches(['\r', '\n']).to_owned()
        } else {
            value
        };
        properties.push((name, value));
    }
    properties.sort();
    Ok(properties)
}

fn is_property_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
}

/// A client of the platform's brokers, with the deployment's properties (security and any
/// other). Nagle's algorithm is off unless they say otherwise: librdkafka leaves it on by
/// default (the Java client always turns it off), and a small produce request or fetch answer
/// then waits for the peer's delayed ACK, up to ~40 ms on Linux, in every hop of the data flow.
/// What callers set afterwards (acks, idempotence, isolation) is the platform's guarantee and
/// wins over the deployment's properties.
pub fn client(kafka: &KafkaConfig) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers).set("socket.nagle.disable", "true");
    for (name, value) in client_properties(kafka)? {
        config.set(name, value);
    }
    Ok(config)
}

/// An idempotent producer's configuration (acks=all) whose largest record is the deployment's
/// `KAFKA_MESSAGE_MAX_BYTES`: a larger one fails at once (`MessageSizeTooLarge`), before it
/// reaches a broker, so the caller can tell that record apart from a broker that is down.
pub fn producer(kafka: &KafkaConfig) -> anyhow::Result<ClientConfig> {
    let mut config = client(kafka)?;
    config.set("enable.idempotence", "true").set("acks", "all").set("message.max.bytes", kafka.message_max_bytes.to_string());
    Ok(config)
}

/// A producer that sends what it is given within a millisecond: the composer's dead letters,
/// or a system of record sending each change as it happens.
pub fn prompt_producer(kafka: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    Ok(producer(kafka)?.set("linger.ms", "1").set("log_level", "4").create()?)
}

/// Commits `producer`'s open transaction once the caller has awaited the delivery of every record
/// in it. Blocking: call it from `spawn_blocking`.
///
/// rust-rdkafka flushes before it commits, and a flush that finds a record still counted polls
/// for a whole 100 ms. A record is counted until librdkafka frees its delivery report, a moment
/// after the report resolved the caller's future, so a commit right after the last acknowledgement
/// sometimes waited 100 ms (docs/benchmarks.md). This waits for that moment first (microseconds;
/// at most `RELEASE_WAIT`).
pub fn commit_transaction(producer: &FutureProducer, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
    use rdkafka::producer::Producer;
    let until = std::time::Instant::now() + RELEASE_WAIT;
    while producer.in_flight_count() > 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_micros(50));
    }
    producer.commit_transaction(timeout)
}

/// How long [`commit_transaction`] waits for librdkafka to release acknowledged records before
/// it commits anyway (and the flush polls).
const RELEASE_WAIT: Duration = Duration::from_millis(50);

/// A client without a group, for metadata and watermarks (readiness, consumer lag).
pub fn observer(kafka: &KafkaConfig) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    Ok(client(kafka)?.set("log_level", "4").create()?)
}

/// Every partition of `topics` with its low and high watermarks (a topic that does not exist
/// yet has none). Blocking: call it from `spawn_blocking`.
pub fn watermarks(client: &rdkafka::consumer::BaseConsumer, topics: &[String], timeout: Duration) -> anyhow::Result<Vec<(String, i32, i64, i64)>> {
    use rdkafka::consumer::Consumer;
    let mut out = Vec::new();
    for topic in topics {
        let metadata = client.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = client.fetch_watermarks(topic, p.id(), timeout)?;
                out.push((topic.clone(), p.id(), low, high));
            }
        }
    }
    Ok(out)
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
    Ok(client(kafka)?.set("log_level", "4").create()?)
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
    let min_insync = kafka.topic_min_insync_replicas.map(|n| n.to_string());
    let retention: Vec<Option<String>> =
        names.iter().map(|(_, r)| if let Retention::Delete(Some(ms)) = r { Some(ms.to_string()) } else { None }).collect();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .zip(&retention)
        .map(|((name, kind), ms)| {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication)).set("max.message.bytes", &max);
            let topic = match &min_insync {
                Some(n) => topic.set("min.insync.replicas", n),
                None => topic,
            };
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
    // librdkafka's default request timeout is a minute; a broker that does not answer sooner
    // fails the attempt, and a caller's retry (see [`patiently`]) goes to the metadata again.
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
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
    wanted.push((kafka.topic(topics::INSIGHTS), Retention::Compact));
    wanted.push((kafka.topic(topics::PARTNER_INBOUND), Retention::Delete(None)));
    create(kafka, &wanted).await
}

/// Runs `attempt` until it succeeds, waiting 1 s, 2 s, 4 s … (at most 10 s) between tries,
/// or until `stop` is set (then the last error). For what a component must do before it
/// works, such as checking its topics: a component that starts while a broker is down or
/// rejoining waits for the cluster instead of exiting.
pub async fn patiently<T, F, Fut>(what: &str, stop: &AtomicBool, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut wait = Duration::from_secs(1);
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) if stop.load(Ordering::Relaxed) => return Err(e.context(format!("{what} (stopping)"))),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "{what} failed; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Deletes every topic of `kafka`'s namespace (its non-empty topic prefix): benchmarks remove
/// what they created, so the broker does not carry hundreds of idle partitions into the next
/// measurement. Refuses an empty prefix (that would be the deployment's own topics).
pub async fn delete_namespace(kafka: &KafkaConfig) -> anyhow::Result<usize> {
    anyhow::ensure!(!kafka.topic_prefix.is_empty(), "refusing to delete topics without a namespace prefix");
    let admin = admin(kafka)?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let names: Vec<String> = metadata.topics().iter().map(|t| t.name().to_owned()).filter(|n| n.starts_with(&kafka.topic_prefix)).collect();
    delete_topics(&admin, &names).await
}

/// Deletes the topics `names` (none is no request); the first the broker refuses is the error.
/// Returns how many were deleted.
pub async fn delete_topics(admin: &AdminClient<DefaultClientContext>, names: &[String]) -> anyhow::Result<usize> {
    if names.is_empty() {
        return Ok(0);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&refs, &options).await? {
        if let Err((name, e)) = result {
            anyhow::bail!("deleting topic {name}: {e}");
        }
    }
    Ok(names.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kafka(properties_file: Option<std::path::PathBuf>) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            message_max_bytes: 1_048_576,
            topic_partitions: 3,
            replication_factor: 1,
            topic_min_insync_replicas: None,
            properties_file,
        }
    }

    #[test]
    fn a_properties_file_reaches_every_client_but_not_the_platforms_guarantees() {
        let dir = std::env::temp_dir().join(format!("kafka-properties-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.properties");
        std::fs::write(&file, "# the cluster profile\nsecurity.protocol = SASL_SSL\n\nsasl.mechanisms=SCRAM-SHA-512\n! comment\nacks=1\n").unwrap();
        let config = producer(&kafka(Some(file))).unwrap();
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("acks"), Some("all"), "acks=all is the platform's, not the deployment's");
        assert_eq!(config.get("socket.nagle.disable"), Some("true"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_properties_file_is_an_error_naming_the_setting() {
        let err = client(&kafka(Some("/nonexistent/client.properties".into()))).unwrap_err().to_string();
        assert!(err.contains("KAFKA_PROPERTIES_FILE /nonexistent/client.properties"), "{err}");
    }

    #[test]
    fn variables_map_to_property_names_and_secrets_come_from_files() {
        let dir = std::env::temp_dir().join(format!("kafka-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let vars = [
            ("KAFKA_CLIENT_SASL_USERNAME", "composer".to_owned()),
            ("KAFKA_CLIENT_SASL_PASSWORD_FILE", secret.display().to_string()),
            ("KAFKA_CLIENT_SSL_CA_LOCATION", "/etc/ca.pem".to_owned()),
            ("KAFKA_BOOTSTRAP_SERVERS", "elsewhere:9092".to_owned()),
        ];
        let properties = properties_from_env(vars.into_iter().map(|(k, v)| (k.to_owned(), v))).unwrap();
        let expected = [("sasl.password", "s3cret"), ("sasl.username", "composer"), ("ssl.ca.location", "/etc/ca.pem")];
        assert_eq!(properties, expected.map(|(k, v)| (k.to_owned(), v.to_owned())));
        let missing = properties_from_env([("KAFKA_CLIENT_SASL_PASSWORD_FILE".to_owned(), "/nonexistent".to_owned())].into_iter());
        assert!(missing.unwrap_err().to_string().starts_with("KAFKA_CLIENT_SASL_PASSWORD_FILE /nonexistent"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn malformed_lines_are_refused_by_line_number_without_their_content() {
        assert_eq!(parse_properties("a.b=1\nsasl.password\n"), Err("line 2: not name=value".to_owned()));
        assert_eq!(parse_properties("Sasl.Password=x"), Err("line 1: not a property name".to_owned()));
        assert_eq!(parse_properties("ssl.key.password = a=b \n"), Ok(vec![("ssl.key.password".to_owned(), "a=b".to_owned())]));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}") {
            let _ = parse_properties(&text);
        }

        #[test]
        fn written_properties_read_back(pairs in proptest::collection::vec(("[a-z][a-z0-9.]{0,30}", "[!-~]([ -~]{0,40}[!-~])?"), 0..10)) {
            let text: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            prop_assert_eq!(parse_properties(&text).unwrap(), pairs);
        }
    }
}
