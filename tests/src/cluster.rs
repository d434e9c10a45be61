//! The secured cluster profile (`scripts/services up --cluster`) as its tests use it: clients
//! configured as a principal from the files the profile wrote, components that run as their
//! principal, and the broker's answers to a read or a write.

use crate::components::spawn_child;
use crate::env::{repo_path, state_dir};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::path::PathBuf;
use std::time::Duration;

/// The cluster's client listeners.
pub const BOOTSTRAP: &str = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094";

/// Where the profile keeps its nodes, certificates, secrets and client files.
pub fn home() -> PathBuf {
    state_dir().join("kafka-cluster")
}

fn properties_file(principal: &str) -> PathBuf {
    home().join("clients").join(format!("{principal}.properties"))
}

fn password_file(principal: &str) -> PathBuf {
    home().join("secrets").join(format!("{principal}.password"))
}

/// A client of the cluster as `principal`, configured from the files the profile wrote.
pub fn client(principal: &str) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", BOOTSTRAP).set("log_level", "3");
    for (name, value) in platform::kafka::parse_properties(&std::fs::read_to_string(properties_file(principal))?).map_err(anyhow::Error::msg)? {
        config.set(name, value);
    }
    config.set("sasl.password", std::fs::read_to_string(password_file(principal))?.trim());
    Ok(config)
}

/// The environment of a component that runs as `principal` on the cluster (as deployed: the
/// password from a file), in the composer group `group`.
fn component_env(principal: &str, group: &str) -> Vec<(String, String)> {
    [
        ("KAFKA_BOOTSTRAP_SERVERS", BOOTSTRAP.to_owned()),
        ("KAFKA_PROPERTIES_FILE", properties_file(principal).display().to_string()),
        ("KAFKA_CLIENT_SASL_PASSWORD_FILE", password_file(principal).display().to_string()),
        ("KAFKA_REPLICATION_FACTOR", "3".to_owned()),
        ("KAFKA_TOPIC_MIN_INSYNC_REPLICAS", "2".to_owned()),
        ("COMPOSER_GROUP_ID", group.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The workspace binary `name` as a child process running as `principal` (`extra` last, so it
/// may replace a default).
pub fn spawn_as(name: &str, principal: &str, database_url: &str, group: &str, extra: &[(&str, &str)]) -> anyhow::Result<std::process::Child> {
    let env = component_env(principal, group);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied()).collect();
    // The cluster's ACLs name the contract's topics: no namespace prefix.
    spawn_child(name, database_url, "", &env)
}

/// Sends one record as `principal`; the broker's answer.
pub async fn produce(principal: &str, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<Result<(), RDKafkaErrorCode>> {
    let producer: FutureProducer = client(principal)?.set("message.timeout.ms", "20000").create()?;
    let result = producer.send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(20)).await;
    Ok(match result {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(e.rdkafka_error_code().ok_or_else(|| anyhow::anyhow!("{e}"))?),
    })
}

/// Reads `topic` from the start as `principal` in `group`: the first record's key, or the error
/// the broker answered with.
pub async fn first_record(principal: &str, group: &str, topic: &str, within: Duration) -> anyhow::Result<Result<String, RDKafkaErrorCode>> {
    let consumer: StreamConsumer = client(principal)?.set("group.id", group).set("auto.offset.reset", "earliest").create()?;
    consumer.subscribe(&[topic])?;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => anyhow::bail!("{principal}: nothing from {topic} within {within:?}"),
            Ok(Ok(m)) => return Ok(Ok(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())),
            Ok(Err(KafkaError::MessageConsumption(code) | KafkaError::MessageConsumptionFatal(code))) if is_refusal(code) => return Ok(Err(code)),
            Ok(Err(KafkaError::MessageConsumption(_))) => continue, // not there yet (a topic about to be created)
            Ok(Err(e)) => match e.rdkafka_error_code() {
                Some(code) if is_refusal(code) => return Ok(Err(code)),
                _ => anyhow::bail!("{principal} reading {topic}: {e}"),
            },
        }
    }
}

fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::GroupAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

/// `scripts/services ARGS` (the cluster's partner principals, a node brought back, a database
/// restart).
pub fn services(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("bash").arg(repo_path("scripts/services")).args(args).output()?;
    anyhow::ensure!(out.status.success(), "scripts/services {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The process id of the cluster's node `n` (1–3).
pub fn node_pid(n: i32) -> anyhow::Result<u32> {
    Ok(std::fs::read_to_string(home().join(format!("node{n}/broker.pid")))?.trim().parse()?)
}

/// Removes every record of `topics` (those that exist) as the admin principal. The cluster's
/// topics are shared by every run and never namespaced (its ACLs name the contract's topics): a
/// test that starts a composer on a new database empties the `sor.*` topics first, or the
/// composer would compose every earlier run's events again.
pub async fn empty_topics(topics: &[&str]) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client("admin")?.create()?;
    let mut offsets = rdkafka::TopicPartitionList::new();
    for topic in topics {
        let metadata = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(20))?;
        for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                offsets.add_partition_offset(t.name(), p.id(), rdkafka::Offset::End)?;
            }
        }
    }
    if offsets.count() == 0 {
        return Ok(());
    }
    let done = admin.delete_records(&offsets, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await?;
    for e in done.elements() {
        if let Err(error) = e.error() {
            anyhow::bail!("emptying {} partition {}: {error}", e.topic(), e.partition());
        }
    }
    Ok(())
}

/// Deletes the partner topics earlier runs of a cluster test left (their partners are
/// `t{kind}` + 12 hex digits + one letter; see `unique`), as the admin principal. Every run
/// makes partners of its own, and their topics outlive it: a few hundred left partitions made
/// every replica fetch check them, a fifth of the brokers' CPU.
pub async fn remove_partner_topics_of(kind: char) -> anyhow::Result<usize> {
    use rdkafka::admin::AdminClient;
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client("admin")?.create()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(20))?;
    let ours = |partner: &str| {
        let b = partner.as_bytes();
        b.len() == 15 && b[0] == b't' && b[1] == kind as u8 && b[2..14].iter().all(u8::is_ascii_hexdigit) && b[14].is_ascii_lowercase()
    };
    let names: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.strip_prefix("fhir.partner.").and_then(|rest| rest.split_once('.')).is_some_and(|(partner, _)| ours(partner)))
        .collect();
    platform::kafka::delete_topics(&admin, &names).await
}
