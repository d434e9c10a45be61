//! The relay: publishes the outbox (written in the same transaction as each composite version)
//! to `fhir.medication-profile.v1` and to the topic of every partner the member is attributed
//! to, with an idempotent producer (acks=all), in version order per member, and marks rows
//! published only after the broker acknowledged every record of the batch. A crash in between
//! publishes the batch again: duplicates carry the same event id and versionId.
//!
//! The outbox also holds partner write-backs for `partner.inbound.v1`, published the same way
//! (in order, marked once acknowledged) with their own headers.
//!
//! Partner topics (`fhir.partner.<partner_id>.medication-profile.v1`) carry a member while it
//! is attributed to the partner: when the outbox is drained, the relay sends each newly
//! attributed member's current composite, and a tombstone when an attribution ended.

use clap::Parser;
use db::relay::{self as q, OutboxRow};
use platform::{KafkaConfig, topics};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, Parser)]
#[command(name = "relay", about = "Publish composite changes from the outbox to Kafka")]
pub struct RelayConfig {
    #[command(flatten)]
    pub common: platform::CommonConfig,

    /// Most outbox rows published per transaction.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i64,

    /// How long the relay waits when the outbox is empty, in milliseconds, unless a commit
    /// notifies it first (LISTEN fhir_outbox).
    #[arg(long, env = "RELAY_POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,

    /// Partitions of the topics the relay creates (partner topics).
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
}

/// The partner topic of `partner_id`, as a contract name.
pub fn partner_topic(partner_id: &str) -> String {
    format!("fhir.partner.{partner_id}.medication-profile.v1")
}

/// One record to produce.
struct Out {
    topic: String,
    key: String,
    payload: Option<String>,
    version_id: i64,
    event_id: Uuid,
    /// Headers beyond `versionId` and `event_id`.
    headers: Vec<(String, String)>,
}

pub struct Relay {
    config: RelayConfig,
    pool: db::Pool,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    known_topics: HashSet<String>,
    /// The day every partner topic was last compared with every attribution. Between those
    /// full comparisons (at start, and when the date changes: attribution periods follow the
    /// calendar), only members whose attribution changed are looked at.
    reconciled_on: Option<time::Date>,
}

/// Members whose attribution changed, reconciled per step. The outbox waits while a step runs
/// (it goes first only between steps): 1,000 at once took 50-1,000 ms, and composites committed
/// meanwhile reached the topic that much later; 100 bound the wait to a few milliseconds.
const ATTRIBUTION_CHANGES_PER_STEP: i64 = 100;

impl Relay {
    pub fn new(config: RelayConfig, pool: db::Pool) -> anyhow::Result<Self> {
        let kafka = &config.common.kafka;
        let producer: FutureProducer = crate::topics::client(&kafka.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A batch is enqueued at once and awaited: no need to linger for more.
            .set("linger.ms", "1")
            .set("compression.type", "zstd")
            // Keep trying through a broker restart; a batch that still fails is sent again.
            .set("message.timeout.ms", "300000")
            .set("log_level", "4")
            .create()?;
        let admin = crate::topics::client(&kafka.bootstrap_servers).set("log_level", "4").create()?;
        Ok(Relay { config, pool, producer, admin, known_topics: HashSet::new(), reconciled_on: None })
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.config.common.kafka
    }

    /// Publishes until `stop` is set; failures are retried (nothing is marked until acknowledged).
    pub async fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        crate::topics::ensure(self.kafka(), self.config.topic_partitions).await?;
        tracing::info!("relay publishing");
        let mut wakeup = db::Wakeup::new(&self.pool, &[db::channels::OUTBOX]).await;
        while !stop.load(Ordering::Relaxed) {
            match self.step().await {
                Ok(0) => wakeup.wait(Duration::from_millis(self.config.poll_ms)).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "relay: publishing failed; the batch will be sent again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }

    /// One transaction: a batch of the outbox, or (when it is empty) the partner topics'
    /// attribution changes. Returns how many records were published or changes handled (0:
    /// nothing to do).
    pub async fn step(&mut self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        q::lock(&mut tx).await?;
        let today = OffsetDateTime::now_utc().date();
        let rows = q::unpublished(&mut tx, self.config.batch_size).await?;
        if rows.is_empty() {
            let done = if self.reconciled_on != Some(today) {
                let (n, complete) = self.reconcile(&mut tx, today, None).await?;
                if complete {
                    self.reconciled_on = Some(today);
                }
                n
            } else {
                let (ids, members) = q::attribution_changes(&mut tx, ATTRIBUTION_CHANGES_PER_STEP).await?;
                if ids.is_empty() {
                    return Ok(0);
                }
                // The changes are forgotten once all of their members' records were sent.
                let (n, complete) = self.reconcile(&mut tx, today, Some(&members)).await?;
                if complete {
                    q::forget_attribution_changes(&mut tx, &ids).await?;
                }
                n.max(ids.len())
            };
            tx.commit().await?;
            return Ok(done);
        }
        let mut members: Vec<String> = rows.iter().map(|r| r.member_id.clone()).collect();
        members.sort();
        members.dedup();
        let mut partners: HashMap<String, Vec<String>> = HashMap::new();
        for (member, partner) in q::partners_of(&mut tx, &members, today).await? {
            partners.entry(member).or_default().push(partner);
        }
        let (mut records, mut added, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            records.push(self.main_record(row));
            // Only composite versions go to partner topics (not partner write-backs).
            if row.topic != topics::MEDICATION_PROFILE {
                continue;
            }
            for partner in partners.get(&row.member_id).into_iter().flatten() {
                records.push(Out {
                    topic: self.kafka().topic(&partner_topic(partner)),
                    key: row.key.clone(),
                    payload: row.body.clone(),
                    version_id: row.version_id,
                    event_id: Uuid::new_v5(&row.event_id, partner.as_bytes()),
                    headers: Vec::new(),
                });
                let pair = (partner.clone(), row.member_id.clone());
                if row.body.is_some() { added.push(pair) } else { removed.push(pair) }
            }
        }
        self.send(&records).await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        q::mark_published(&mut tx, &ids).await?;
        q::carried(&mut tx, &added, &removed).await?;
        tx.commit().await?;
        Ok(records.len())
    }

    fn main_record(&self, row: &OutboxRow) -> Out {
        Out {
            topic: self.kafka().topic(&row.topic),
            key: row.key.clone(),
            payload: row.body.clone(),
            version_id: row.version_id,
            event_id: row.event_id,
            headers: row.headers.clone(),
        }
    }

    /// Newly attributed members' current composites, and tombstones where attributions ended,
    /// among `members` (all when `None`). Returns how many records were published, and whether
    /// that was everything (at most a batch of each kind is done at once).
    async fn reconcile(&mut self, tx: &mut sqlx::PgConnection, today: time::Date, members: Option<&[String]>) -> anyhow::Result<(usize, bool)> {
        let limit = self.config.batch_size;
        let started = q::newly_attributed(tx, today, limit, members).await?;
        let ended = q::no_longer_attributed(tx, today, limit, members).await?;
        let complete = (started.len() as i64) < limit && (ended.len() as i64) < limit;
        if started.is_empty() && ended.is_empty() {
            return Ok((0, complete));
        }
        let event_id = |what: &str, partner: &str, member: &str, version: i64| {
            Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{}|{what}|{partner}|{member}|{version}", topics::MEDICATION_PROFILE).as_bytes())
        };
        let mut records = Vec::new();
        for (partner, member, version, body) in &started {
            records.push(Out {
                topic: self.kafka().topic(&partner_topic(partner)),
                key: member.clone(),
                payload: Some(body.clone()),
                version_id: *version,
                event_id: event_id("attributed", partner, member, *version),
                headers: Vec::new(),
            });
        }
        for (partner, member, version) in &ended {
            records.push(Out {
                topic: self.kafka().topic(&partner_topic(partner)),
                key: member.clone(),
                payload: None,
                version_id: *version,
                event_id: event_id("attribution-ended", partner, member, *version),
                headers: Vec::new(),
            });
        }
        self.send(&records).await?;
        let added: Vec<(String, String)> = started.iter().map(|(p, m, _, _)| (p.clone(), m.clone())).collect();
        let removed: Vec<(String, String)> = ended.iter().map(|(p, m, _)| (p.clone(), m.clone())).collect();
        q::carried(tx, &added, &removed).await?;
        tracing::info!(attributed = added.len(), ended = removed.len(), "relay: partner topics follow attribution");
        Ok((records.len(), complete))
    }

    /// Enqueues every record in order (so per-partition order is the outbox's), then waits for
    /// the broker to acknowledge all of them.
    async fn send(&mut self, records: &[Out]) -> anyhow::Result<()> {
        self.ensure_topics(records).await?;
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            let version = r.version_id.to_string();
            let event_id = r.event_id.to_string();
            let headers = r.headers.iter().fold(
                OwnedHeaders::new()
                    .insert(Header { key: "versionId", value: Some(version.as_str()) })
                    .insert(Header { key: "event_id", value: Some(event_id.as_str()) }),
                |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_str()) }),
            );
            let mut record = FutureRecord::to(&r.topic).key(&r.key).headers(headers);
            if let Some(payload) = &r.payload {
                record = record.payload(payload);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(anyhow::anyhow!("not acknowledged: {e}")),
                Err(_) => return Err(anyhow::anyhow!("the producer went away")),
            }
        }
        Ok(())
    }

    /// Creates partner topics (compacted) the first time they are needed.
    async fn ensure_topics(&mut self, records: &[Out]) -> anyhow::Result<()> {
        let missing: HashSet<&str> = records.iter().map(|r| r.topic.as_str()).filter(|t| !self.known_topics.contains(*t)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(t, self.config.topic_partitions, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact")
                    .set("min.compaction.lag.ms", "60000")
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
        for result in self.admin.create_topics(new.iter(), &options).await? {
            match result {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, e)) => anyhow::bail!("creating topic {name}: {e}"),
            }
        }
        self.known_topics.extend(missing.into_iter().map(str::to_owned));
        Ok(())
    }
}

/// Starts a relay task (connects, migrates first); returns its stop flag and handle.
pub async fn spawn(config: RelayConfig) -> anyhow::Result<(Arc<AtomicBool>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let pool = db::connect(&config.common.database_url, 2).await?;
    db::migrate(&pool).await?;
    let relay = Relay::new(config, pool)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    Ok((stop, tokio::spawn(async move { relay.run(&flag).await })))
}
