//! The composer's Kafka side: a consumer group over the six `sor.*` topics whose positions live
//! in PostgreSQL (sought on every assignment), batches applied by [`crate::batch::apply`], and
//! dead letters produced (and acknowledged) before a batch commits.

use crate::batch::{self, Consumed, Outcome};
use crate::composite::Composite;
use crate::config::ComposerConfig;
use db::composer::StoredOffset;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use schemas::{Contracts, RecordKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// Positions this consumer owns: the next offset to read and what PostgreSQL holds.
#[derive(Debug, Default)]
struct Assignment {
    /// (topic, partition) → stored next offset (`None`: nothing stored yet).
    stored: HashMap<(String, i32), Option<i64>>,
    generation: u64,
    error: Option<String>,
}

/// Seeks every assigned partition to the offset stored in PostgreSQL. Runs inside `poll` on
/// the composer's own thread, so it may block on the database.
struct ComposerContext {
    pool: db::Pool,
    group: String,
    runtime: Handle,
    assignment: Mutex<Assignment>,
}

impl ClientContext for ComposerContext {}

impl ConsumerContext for ComposerContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let mut state = self.assignment.lock().unwrap_or_else(|p| p.into_inner());
        state.generation += 1;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let topics: Vec<String> = tpl.elements().iter().map(|e| e.topic().to_owned()).collect();
                let stored = self.runtime.block_on(db::composer::load_offsets(&self.pool, &self.group, &topics));
                let stored: HashMap<(String, i32), i64> = match stored {
                    Ok(rows) => rows.into_iter().map(|o| ((o.topic, o.partition), o.next_offset)).collect(),
                    Err(e) => {
                        state.error = Some(format!("loading stored offsets: {e}"));
                        let _ = consumer.unassign();
                        return;
                    }
                };
                state.stored.clear();
                for e in tpl.elements() {
                    let key = (e.topic().to_owned(), e.partition());
                    state.stored.insert(key.clone(), stored.get(&key).copied());
                }
                let positions: Vec<((String, i32), Option<i64>)> = state.stored.iter().map(|(k, v)| (k.clone(), *v)).collect();
                for ((topic, partition), offset) in positions {
                    let offset = offset.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                        state.error = Some(format!("setting offset of {topic}/{partition}: {e}"));
                    }
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned; positions from PostgreSQL");
                if let Err(e) = consumer.assign(tpl) {
                    state.error = Some(format!("assign: {e}"));
                }
            }
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::warn!(error = ?other, "rebalance error; unassigning");
                } else {
                    tracing::info!(partitions = tpl.count(), "partitions revoked");
                }
                state.stored.clear();
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // Kafka's committed offsets are only a hint; PostgreSQL holds the truth.
            tracing::debug!(error = %e, "offset hint commit failed");
        }
    }
}

/// Counters since start, readable while the composer runs.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages: AtomicU64,
    pub dead_letters: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale: AtomicU64,
    pub composite_versions: AtomicU64,
    pub batches: AtomicU64,
}

pub struct Composer {
    config: ComposerConfig,
    pool: db::Pool,
    contracts: Contracts,
    composites: Vec<Box<dyn Composite>>,
    /// Keeps the PMM1 match index, when PMM1 is configured.
    indexer: Option<crate::matching::MatchIndexer>,
    pub metrics: Arc<Metrics>,
}

impl Composer {
    pub fn new(config: ComposerConfig, pool: db::Pool, composites: Vec<Box<dyn Composite>>) -> anyhow::Result<Self> {
        let indexer = crate::matching::MatchIndexer::from_config(&config.pmm1)?;
        Ok(Self { config, pool, contracts: Contracts::load()?, composites, indexer, metrics: Arc::default() })
    }

    /// Consumes until `stop` is set. Runs on the calling (non-async) thread; database work
    /// goes through `runtime`.
    pub fn run(&self, runtime: Handle, stop: &AtomicBool) -> anyhow::Result<()> {
        let kafka = &self.config.common.kafka;
        let context = ComposerContext {
            pool: self.pool.clone(),
            group: self.config.group_id.clone(),
            runtime: runtime.clone(),
            assignment: Mutex::new(Assignment::default()),
        };
        let consumer: BaseConsumer<ComposerContext> = ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "20")
            .set("log_level", "4")
            .create_with_context(context)?;
        let dlq: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("log_level", "4")
            .create()?;
        let topics: Vec<String> = RecordKind::ALL.iter().map(|k| kafka.topic(k.topic())).collect();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        let kinds: HashMap<String, RecordKind> = RecordKind::ALL.iter().map(|k| (kafka.topic(k.topic()), *k)).collect();
        let dlq_topic = kafka.topic(platform::topics::DLQ);
        tracing::info!(group = %self.config.group_id, "composer consuming");

        // Messages polled while a failed batch waited to be retried, with the assignment
        // generation they were polled in: the next batch starts with them (dropping one would
        // skip its event for good, as the offsets move past it).
        let mut held: Vec<(u64, BorrowedMessage<'_>)> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let (generation, messages) = self.gather(&consumer, std::mem::take(&mut held))?;
            if messages.is_empty() {
                continue;
            }
            // Parse, validate and map outside the transaction.
            let consumed: Vec<Consumed> = messages
                .iter()
                .map(|m| {
                    let outcome = match kinds.get(m.topic()) {
                        Some(kind) => batch::prepare(&self.contracts, *kind, m.payload()),
                        None => Outcome::Nothing,
                    };
                    Consumed { topic: m.topic().to_owned(), partition: m.partition(), offset: m.offset(), outcome }
                })
                .collect();
            let offsets = {
                let state = consumer.context().assignment.lock().unwrap_or_else(|p| p.into_inner());
                if state.generation != generation {
                    continue; // A rebalance happened while gathering: positions were reset.
                }
                next_offsets(&consumed, &state.stored)
            };
            let mut attempt = 0u32;
            let mut dead_lettered = false;
            loop {
                let result = runtime.block_on(async {
                    // Once acknowledged, dead letters are not produced again when the
                    // transaction is retried.
                    if !dead_lettered {
                        self.dead_letter(&dlq, &dlq_topic, &messages, &consumed).await?;
                        dead_lettered = true;
                    }
                    batch::apply(&self.pool, &self.config.group_id, &self.composites, self.indexer.as_ref(), &consumed, &offsets)
                        .await
                        .map_err(anyhow::Error::from)
                });
                match result {
                    Ok(applied) => {
                        let m = &self.metrics;
                        m.messages.fetch_add(applied.messages as u64, Ordering::Relaxed);
                        m.dead_letters.fetch_add(applied.dead_letters as u64, Ordering::Relaxed);
                        m.duplicates.fetch_add(applied.duplicates as u64, Ordering::Relaxed);
                        m.stale.fetch_add(applied.stale as u64, Ordering::Relaxed);
                        m.composite_versions.fetch_add(applied.composite_versions as u64, Ordering::Relaxed);
                        m.batches.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(?applied, "batch applied");
                        self.committed(&consumer, &offsets);
                        break;
                    }
                    Err(e) if e.downcast_ref::<batch::BatchError>().is_some_and(|b| matches!(b, batch::BatchError::Fenced)) => {
                        tracing::warn!("another consumer owns a partition of this batch; dropping it");
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        let wait = Duration::from_millis(100 * 2u64.pow(attempt.min(6)));
                        tracing::error!(error = %e, attempt, "batch failed; retrying in {wait:?}");
                        if stop.load(Ordering::Relaxed) {
                            return Err(e);
                        }
                        std::thread::sleep(wait);
                        // Keep the group membership alive while retrying.
                        match consumer.poll(Duration::ZERO) {
                            Some(Ok(m)) => {
                                let generation = consumer.context().assignment.lock().unwrap_or_else(|p| p.into_inner()).generation;
                                held.push((generation, m));
                            }
                            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                            None => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Polls until the batch is full or `batch_wait` passed since its first message. The batch
    /// starts with the `held` messages of the current assignment (a rebalance since then sought
    /// back to the stored positions, so the others come again).
    fn gather<'c>(
        &self,
        consumer: &'c BaseConsumer<ComposerContext>,
        held: Vec<(u64, BorrowedMessage<'c>)>,
    ) -> anyhow::Result<(u64, Vec<BorrowedMessage<'c>>)> {
        let wait = Duration::from_millis(self.config.batch_wait_ms);
        let generation = consumer.context().assignment.lock().unwrap_or_else(|p| p.into_inner()).generation;
        let mut messages: Vec<BorrowedMessage<'c>> = held.into_iter().filter(|(g, _)| *g == generation).map(|(_, m)| m).collect();
        let mut deadline: Option<Instant> = (!messages.is_empty()).then(|| Instant::now() + wait);
        while messages.len() < self.config.batch_size {
            let timeout = match deadline {
                None => Duration::from_millis(200),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => left,
                    None => break,
                },
            };
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
                    deadline.get_or_insert_with(|| Instant::now() + wait);
                    messages.push(m);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None if deadline.is_none() => break,
                None => {}
            }
            let state = consumer.context().assignment.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = &state.error {
                anyhow::bail!("{e}");
            }
            if state.generation != generation {
                return Ok((state.generation, Vec::new()));
            }
        }
        // Messages below the stored position were applied before (a redelivery after restart).
        let state = consumer.context().assignment.lock().unwrap_or_else(|p| p.into_inner());
        messages.retain(|m| state.stored.get(&(m.topic().to_owned(), m.partition())).is_some_and(|stored| stored.is_none_or(|s| m.offset() >= s)));
        Ok((generation, messages))
    }

    /// Produces the batch's dead letters and waits for the broker's acknowledgement (acks=all).
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        topic: &str,
        messages: &[BorrowedMessage<'_>],
        consumed: &[Consumed],
    ) -> anyhow::Result<()> {
        let mut pending = Vec::new();
        for (m, c) in messages.iter().zip(consumed) {
            let Outcome::Rejected(rejection) = &c.outcome else { continue };
            let mut headers = OwnedHeaders::new();
            if let Some(original) = m.headers() {
                for h in original.iter() {
                    headers = headers.insert(Header { key: h.key, value: h.value });
                }
            }
            let (partition, offset, error) = (m.partition().to_string(), m.offset().to_string(), rejection.to_string());
            let contract = self.config.common.kafka.contract_name(m.topic()).unwrap_or(m.topic());
            headers = headers
                .insert(Header { key: "dlq.reason", value: Some(rejection.class()) })
                .insert(Header { key: "dlq.error", value: Some(&error) })
                .insert(Header { key: "dlq.source.topic", value: Some(contract) })
                .insert(Header { key: "dlq.source.partition", value: Some(&partition) })
                .insert(Header { key: "dlq.source.offset", value: Some(&offset) });
            tracing::warn!(topic = contract, partition = m.partition(), offset = m.offset(), reason = rejection.class(), "dead letter");
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            if let Some(payload) = m.payload() {
                record = record.payload(payload);
            }
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for delivery in pending {
            delivery.await?.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// After PostgreSQL committed: remember the new positions, and hint them to Kafka.
    fn committed(&self, consumer: &BaseConsumer<ComposerContext>, offsets: &[(StoredOffset, Option<i64>)]) {
        let mut state = consumer.context().assignment.lock().unwrap_or_else(|p| p.into_inner());
        let mut tpl = TopicPartitionList::new();
        for (o, _) in offsets {
            let key = (o.topic.clone(), o.partition);
            if let Some(slot) = state.stored.get_mut(&key) {
                *slot = Some(o.next_offset);
                let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
            }
        }
        drop(state);
        if tpl.count() > 0 {
            let _ = consumer.commit(&tpl, CommitMode::Async);
        }
    }
}

/// The position after the batch for each partition it read, with the stored position it
/// moves from.
fn next_offsets(consumed: &[Consumed], stored: &HashMap<(String, i32), Option<i64>>) -> Vec<(StoredOffset, Option<i64>)> {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    for c in consumed {
        let slot = next.entry((c.topic.clone(), c.partition)).or_insert(c.offset + 1);
        *slot = (*slot).max(c.offset + 1);
    }
    let mut moves: Vec<(StoredOffset, Option<i64>)> = next
        .into_iter()
        .map(|((topic, partition), next_offset)| {
            let expected = stored.get(&(topic.clone(), partition)).copied().flatten();
            (StoredOffset { topic, partition, next_offset }, expected)
        })
        .collect();
    moves.sort_by(|a, b| (&a.0.topic, a.0.partition).cmp(&(&b.0.topic, b.0.partition)));
    moves
}
