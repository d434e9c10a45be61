//! The composer's Kafka side: a consumer group over the six `sor.*` topics whose positions live
//! in PostgreSQL (sought on every assignment), batches applied by [`crate::batch::apply`], and
//! dead letters produced (and acknowledged) before a batch commits.
//!
//! Threads form a pipeline: the consumer thread polls and prepares (parse, validate, map)
//! while applier threads apply earlier batches in PostgreSQL, each in its own transaction.
//! Partitions are split among the appliers by number (partition `p` of every topic goes to
//! applier `p % appliers`; members are keyed alike on every topic), so each partition is
//! applied in order by one applier, and concurrent batches rarely touch the same member (when
//! they do, the member lock orders them). What the consumer prepares while an applier is busy
//! becomes that applier's next batch (up to `batch_size`), so batches grow with the load
//! instead of waiting on a timer: `batch_wait_ms` only bounds how long a message waits for
//! others when its applier is idle.

use crate::batch::{self, Consumed, Outcome};
use crate::composite::Composite;
use crate::config::ComposerConfig;
use db::composer::StoredOffset;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schemas::{Contracts, RecordKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// Positions this consumer owns: the next offset to read and what PostgreSQL holds.
#[derive(Debug, Default)]
struct Assignment {
    /// (topic, partition) → stored next offset (`None`: nothing stored yet).
    stored: HashMap<(String, i32), Option<i64>>,
    /// Counts rebalances: messages polled in an earlier generation are not applied (the
    /// rebalance sought back to the stored positions, so they come again).
    generation: u64,
    error: Option<String>,
}

/// What the consumer thread and the applier threads share. Lock order: `applying` (by
/// index), then `assignment`.
struct Shared {
    assignment: Mutex<Assignment>,
    /// One per applier, held while it applies a batch. A rebalance takes them all first, so it
    /// reads the positions the batches in flight commit, and no batch of the old assignment
    /// starts after it.
    applying: Vec<Mutex<()>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seeks every assigned partition to the offset stored in PostgreSQL. Runs inside `poll` on
/// the consumer thread, so it may block on the database.
struct ComposerContext {
    pool: db::Pool,
    group: String,
    runtime: Handle,
    shared: Arc<Shared>,
}

impl ClientContext for ComposerContext {}

impl ConsumerContext for ComposerContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let _applying: Vec<_> = self.shared.applying.iter().map(locked).collect();
        let mut state = locked(&self.shared.assignment);
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

/// A polled message after parsing, validation and mapping.
struct Prepared {
    consumed: Consumed,
    /// The message itself, kept only when it goes to the dead-letter topic.
    original: Option<OwnedMessage>,
}

/// Prepared messages of one assignment generation, from the consumer thread to the applier.
struct Chunk {
    generation: u64,
    items: Vec<Prepared>,
}

/// What the consumer thread holds for one applier while that applier is busy: full-sized
/// chunks waiting their turn (oldest first), and the chunk still growing with the time it is
/// due. Holding a full chunk lets the consumer thread go on feeding the other appliers.
#[derive(Default)]
struct Hand {
    sealed: std::collections::VecDeque<Chunk>,
    growing: Option<(Chunk, Instant)>,
}

/// Full-sized chunks a hand holds before the consumer thread stops polling.
const SEALED: usize = 2;

impl Hand {
    fn push(&mut self, item: Prepared, generation: u64, wait: Duration, batch_size: usize) {
        let (chunk, _) = self.growing.get_or_insert_with(|| (Chunk { generation, items: Vec::new() }, Instant::now() + wait));
        chunk.items.push(item);
        if chunk.items.len() >= batch_size
            && let Some((chunk, _)) = self.growing.take()
        {
            self.sealed.push_back(chunk);
        }
    }

    /// When this hand next has a chunk for its applier (a sealed one is due now).
    fn due(&self) -> Option<Instant> {
        if self.sealed.is_empty() { self.growing.as_ref().map(|(_, due)| *due) } else { Some(Instant::now()) }
    }

    /// No room for another full chunk.
    fn full(&self, batch_size: usize) -> bool {
        self.sealed.len() >= SEALED && self.growing.as_ref().is_some_and(|(c, _)| c.items.len() + 1 >= batch_size)
    }

    fn forget_before(&mut self, generation: u64) {
        self.sealed.retain(|c| c.generation == generation);
        if self.growing.as_ref().is_some_and(|(c, _)| c.generation != generation) {
            self.growing = None;
        }
    }

    /// The next chunk for the applier: the oldest sealed one, or the growing one once due
    /// (`false`).
    fn take_due(&mut self) -> Option<(Chunk, bool)> {
        if let Some(chunk) = self.sealed.pop_front() {
            return Some((chunk, true));
        }
        match self.growing.take() {
            Some((chunk, due)) if Instant::now() >= due => Some((chunk, false)),
            growing => {
                self.growing = growing;
                None
            }
        }
    }

    /// A chunk from [`Hand::take_due`] that the applier did not take: where it was (a growing
    /// one goes on growing, due).
    fn put_back(&mut self, chunk: Chunk, sealed: bool) {
        if sealed {
            self.sealed.push_front(chunk);
        } else {
            self.growing = Some((chunk, Instant::now()));
        }
    }
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

    /// Consumes until `stop` is set. Polls on the calling (non-async) thread and applies on
    /// `appliers` threads of its own; database work goes through `runtime`.
    pub fn run(&self, runtime: Handle, stop: &AtomicBool) -> anyhow::Result<()> {
        let kafka = &self.config.common.kafka;
        let appliers = self.config.appliers.max(1);
        let shared = Arc::new(Shared { assignment: Mutex::default(), applying: (0..appliers).map(|_| Mutex::new(())).collect() });
        let context =
            ComposerContext { pool: self.pool.clone(), group: self.config.group_id.clone(), runtime: runtime.clone(), shared: shared.clone() };
        let consumer: BaseConsumer<ComposerContext> = crate::topics::client(&kafka.bootstrap_servers)
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
        let topics: Vec<String> = RecordKind::ALL.iter().map(|k| kafka.topic(k.topic())).collect();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        tracing::info!(group = %self.config.group_id, "composer consuming");

        let dlq = crate::topics::prompt_producer(&kafka.bootstrap_servers)?;
        let (committed, positions) = std::sync::mpsc::channel::<Vec<StoredOffset>>();
        std::thread::scope(|scope| {
            let mut lanes = Vec::new();
            let mut threads = Vec::new();
            for lane in 0..appliers {
                // A rendezvous: a chunk is handed over only when its applier is idle (or
                // full-sized, when the consumer thread waits for it); until then it grows.
                let (chunks, waiting) = std::sync::mpsc::sync_channel::<Chunk>(0);
                let (shared, runtime, dlq, committed) = (&shared, &runtime, &dlq, committed.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("composer-apply-{lane}"))
                    .spawn_scoped(scope, move || self.apply_loop(lane, runtime, shared, dlq, waiting, committed, stop))?;
                lanes.push(chunks);
                threads.push(thread);
            }
            drop(committed);
            let mut result = self.poll_loop(&consumer, &shared, lanes, positions, stop);
            for thread in threads {
                let applied = thread.join().map_err(|_| anyhow::anyhow!("composer applier panicked"))?;
                result = result.and(applied);
            }
            result
        })
    }

    /// The consumer thread: polls, prepares and hands chunks to the appliers (`lanes`) until
    /// `stop` is set (the chunks in hand are handed over first) or an applier ended.
    fn poll_loop(
        &self,
        consumer: &BaseConsumer<ComposerContext>,
        shared: &Shared,
        lanes: Vec<SyncSender<Chunk>>,
        positions: Receiver<Vec<StoredOffset>>,
        stop: &AtomicBool,
    ) -> anyhow::Result<()> {
        let kafka = &self.config.common.kafka;
        let kinds: HashMap<String, RecordKind> = RecordKind::ALL.iter().map(|k| (kafka.topic(k.topic()), *k)).collect();
        let wait = Duration::from_millis(self.config.batch_wait_ms);
        let mut hands: Vec<Hand> = lanes.iter().map(|_| Hand::default()).collect();
        while !stop.load(Ordering::Relaxed) {
            // Positions PostgreSQL committed, hinted to Kafka (PostgreSQL holds the truth).
            while let Ok(offsets) = positions.try_recv() {
                hint(consumer, &offsets);
            }
            // Until the next chunk is due; a chunk already due waits for a busy applier, so
            // look again within a millisecond.
            let timeout = match hands.iter().filter_map(Hand::due).min() {
                None => Duration::from_millis(200),
                Some(due) => due.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            };
            // An applier so far behind that its hand is full: no polling (Kafka keeps
            // buffering) until it takes a chunk; the other appliers still get theirs below.
            let message = if hands.iter().any(|h| h.full(self.config.batch_size)) {
                std::thread::sleep(Duration::from_millis(1));
                None
            } else {
                consumer.poll(timeout)
            };
            let generation = {
                let state = locked(&shared.assignment);
                if let Some(e) = &state.error {
                    anyhow::bail!("{e}");
                }
                state.generation
            };
            for hand in &mut hands {
                // A rebalance sought back to the stored positions: these come again.
                hand.forget_before(generation);
            }
            match message {
                Some(Ok(m)) => {
                    let outcome = match kinds.get(m.topic()) {
                        Some(kind) => batch::prepare(&self.contracts, *kind, m.payload()),
                        None => Outcome::Nothing,
                    };
                    let original = matches!(outcome, Outcome::Rejected(_)).then(|| m.detach());
                    let consumed = Consumed { topic: m.topic().to_owned(), partition: m.partition(), offset: m.offset(), outcome };
                    let hand = &mut hands[m.partition().unsigned_abs() as usize % lanes.len()];
                    hand.push(Prepared { consumed, original }, generation, wait, self.config.batch_size);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            for (hand, lane) in hands.iter_mut().zip(&lanes) {
                let Some((chunk, sealed)) = hand.take_due() else { continue };
                match lane.try_send(chunk) {
                    Ok(()) => {}
                    // The applier is busy: the chunk waits (and grows, if not full yet).
                    Err(TrySendError::Full(chunk)) => hand.put_back(chunk, sealed),
                    Err(TrySendError::Disconnected(_)) => return Ok(()), // `run` returns the applier's error.
                }
            }
        }
        for (hand, lane) in hands.into_iter().zip(&lanes) {
            for chunk in hand.sealed.into_iter().chain(hand.growing.map(|(c, _)| c)) {
                let _ = lane.send(chunk);
            }
        }
        Ok(())
    }

    /// An applier thread: applies each chunk the consumer thread hands over to `lane`, one
    /// transaction each, until the consumer thread hangs up.
    fn apply_loop(
        &self,
        lane: usize,
        runtime: &Handle,
        shared: &Shared,
        dlq: &FutureProducer,
        waiting: Receiver<Chunk>,
        committed: std::sync::mpsc::Sender<Vec<StoredOffset>>,
        stop: &AtomicBool,
    ) -> anyhow::Result<()> {
        let dlq_topic = self.config.common.kafka.topic(platform::topics::DLQ);
        while let Ok(chunk) = waiting.recv() {
            let _applying = locked(&shared.applying[lane]);
            let (consumed, originals, offsets) = {
                let state = locked(&shared.assignment);
                if chunk.generation != state.generation {
                    continue;
                }
                let items = chunk.items.into_iter();
                // Messages below the stored position were applied before (a redelivery after
                // a restart or rebalance).
                let items = items.filter(|p| {
                    let c = &p.consumed;
                    state.stored.get(&(c.topic.clone(), c.partition)).is_some_and(|stored| stored.is_none_or(|s| c.offset >= s))
                });
                let (consumed, originals): (Vec<Consumed>, Vec<Option<OwnedMessage>>) = items.map(|p| (p.consumed, p.original)).unzip();
                let offsets = next_offsets(&consumed, &state.stored);
                (consumed, originals, offsets)
            };
            if consumed.is_empty() {
                continue;
            }
            let mut attempt = 0u32;
            let mut dead_lettered = false;
            loop {
                let result = runtime.block_on(async {
                    // Once acknowledged, dead letters are not produced again when the
                    // transaction is retried.
                    if !dead_lettered {
                        self.dead_letter(dlq, &dlq_topic, &originals, &consumed).await?;
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
                        let mut state = locked(&shared.assignment);
                        for (o, _) in &offsets {
                            if let Some(slot) = state.stored.get_mut(&(o.topic.clone(), o.partition)) {
                                *slot = Some(o.next_offset);
                            }
                        }
                        let _ = committed.send(offsets.into_iter().map(|(o, _)| o).collect());
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
                        // Meanwhile the consumer thread keeps polling (and so its group
                        // membership), and what it prepares waits for this batch.
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        Ok(())
    }

    /// Produces the batch's dead letters and waits for the broker's acknowledgement (acks=all).
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        topic: &str,
        originals: &[Option<OwnedMessage>],
        consumed: &[Consumed],
    ) -> anyhow::Result<()> {
        let mut pending = Vec::new();
        for (m, c) in originals.iter().zip(consumed) {
            let (Outcome::Rejected(rejection), Some(m)) = (&c.outcome, m) else { continue };
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
}

/// Hints positions PostgreSQL committed to Kafka (for lag monitoring; PostgreSQL holds the
/// truth, and positions are sought from it on every assignment).
fn hint(consumer: &BaseConsumer<ComposerContext>, offsets: &[StoredOffset]) {
    let assigned = consumer.assignment().unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for o in offsets {
        if assigned.find_partition(&o.topic, o.partition).is_some() {
            let _ = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset));
        }
    }
    if tpl.count() > 0 {
        let _ = consumer.commit(&tpl, CommitMode::Async);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(offset: i64) -> Prepared {
        Prepared { consumed: Consumed { topic: "t".into(), partition: 0, offset, outcome: Outcome::Nothing }, original: None }
    }

    fn offsets(chunk: &Chunk) -> Vec<i64> {
        chunk.items.iter().map(|p| p.consumed.offset).collect()
    }

    #[test]
    fn a_hand_seals_full_chunks_and_hands_them_over_in_order() {
        let mut hand = Hand::default();
        for offset in 0..8 {
            hand.push(item(offset), 1, Duration::from_secs(60), 3);
        }
        assert_eq!(hand.sealed.len(), 2);
        assert!(hand.full(3), "two sealed and a growing chunk one short of full: stop polling");
        let (first, sealed) = hand.take_due().unwrap();
        assert!(sealed);
        assert_eq!(offsets(&first), [0, 1, 2]);
        // The applier was busy: it comes back first.
        hand.put_back(first, true);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [0, 1, 2]);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [3, 4, 5]);
        assert!(hand.take_due().is_none(), "the growing chunk is not due for a minute");
        assert!(!hand.full(3));
    }

    #[test]
    fn a_growing_chunk_is_due_after_the_wait_and_keeps_growing_while_its_applier_is_busy() {
        let mut hand = Hand::default();
        hand.push(item(0), 1, Duration::ZERO, 100);
        let (chunk, sealed) = hand.take_due().unwrap();
        assert!(!sealed);
        hand.put_back(chunk, false);
        hand.push(item(1), 1, Duration::ZERO, 100);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [0, 1]);
    }

    #[test]
    fn a_rebalance_forgets_what_was_polled_before_it() {
        let mut hand = Hand::default();
        for offset in 0..5 {
            hand.push(item(offset), 1, Duration::ZERO, 2);
        }
        hand.forget_before(2);
        assert!(hand.sealed.is_empty() && hand.growing.is_none());
        hand.push(item(9), 2, Duration::ZERO, 2);
        hand.forget_before(2);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [9]);
    }
}
