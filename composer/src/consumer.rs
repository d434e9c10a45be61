//! The composer's Kafka side: a consumer group over the six `sor.*` topics whose positions live
//! in PostgreSQL (sought on every assignment), batches applied by [`crate::apply::apply`], and
//! dead letters produced (and acknowledged) before a batch commits.
//!
//! Threads form a pipeline: the consumer thread polls and prepares (parse, validate, map)
//! while applier threads apply earlier batches in PostgreSQL, each in its own transaction.
//! Partitions are split among the appliers by number (partition `p` of every topic goes to
//! applier `p % appliers`; members are keyed alike on every topic), so each partition is
//! applied in order by one applier, and concurrent batches rarely touch the same member (when
//! they do, the member lock orders them). What the consumer prepares while an applier is busy
//! becomes that applier's next batch (up to `batch_size`), so batches grow with the load. A
//! change after a quiet spell goes at once; while changes keep coming, one applier's batches
//! are at least `batch_wait_ms` apart (see [`Hand::push`]).

use crate::apply::{self as batch, Consumed, Outcome};
use crate::config::ComposerConfig;
use db::offsets::StoredOffset;
use fhir::composite::Composites;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schemas::{Contracts, RecordKind, Rejection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How long an assignment waits for PostgreSQL to answer before the composer gives up (well
/// within the group's `max.poll.interval.ms`, 5 minutes).
const OFFSETS_PATIENCE: Duration = Duration::from_secs(60);

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
                // A rebalance while PostgreSQL restarts (or fails over) waits for it, up to
                // OFFSETS_PATIENCE: the group waits too, and the composer does not exit for it.
                let mut attempt = 0;
                let stored = loop {
                    match self.runtime.block_on(db::offsets::load_offsets(&self.pool, &self.group, &topics)) {
                        Ok(rows) => break rows,
                        Err(e) if attempt < OFFSETS_PATIENCE.as_secs() => {
                            attempt += 1;
                            tracing::warn!(error = %e, attempt, "partitions assigned, but their positions could not be loaded from PostgreSQL; retrying in 1 s");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        Err(e) => {
                            state.error = Some(format!("loading stored offsets: {e}"));
                            let _ = consumer.unassign();
                            return;
                        }
                    }
                };
                let stored: HashMap<(String, i32), i64> = stored.into_iter().map(|o| ((o.topic, o.partition), o.next_offset)).collect();
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

pub use crate::metrics::Metrics;

/// A polled message after parsing, validation and mapping.
struct Prepared {
    consumed: Consumed,
    /// The message itself, for its dead letter if it is rejected now or isolated later.
    original: Option<OwnedMessage>,
    /// Its dead letter was acknowledged (a retried batch does not send it again).
    dead_lettered: bool,
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
    /// When a chunk last left this hand for its applier.
    handed: Option<Instant>,
}

/// Full-sized chunks a hand holds before the consumer thread stops polling.
const SEALED: usize = 2;

impl Hand {
    /// Adds a prepared message. A chunk it starts is due at once after a quiet spell (no chunk
    /// handed over for `wait`), else `wait` after the last one: a change that finds the
    /// pipeline idle waits for no timer, and while changes keep coming, batches of one applier
    /// are at least `wait` apart, so they grow with the rate instead of multiplying.
    fn push(&mut self, item: Prepared, generation: u64, wait: Duration, batch_size: usize) {
        let handed = self.handed;
        let (chunk, _) = self.growing.get_or_insert_with(|| {
            let now = Instant::now();
            let due = handed.map_or(now, |h| (h + wait).max(now));
            (Chunk { generation, items: Vec::new() }, due)
        });
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
            self.handed = Some(Instant::now());
            return Some((chunk, true));
        }
        match self.growing.take() {
            Some((chunk, due)) if Instant::now() >= due => {
                self.handed = Some(Instant::now());
                Some((chunk, false))
            }
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
    composites: Composites,
    /// Keeps the PMM1 match index, when PMM1 is configured.
    indexer: Option<crate::matching::MatchIndexer>,
    pub metrics: Arc<Metrics>,
}

impl Composer {
    pub fn new(config: ComposerConfig, pool: db::Pool, composites: Composites) -> anyhow::Result<Self> {
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
        let consumer: BaseConsumer<ComposerContext> = platform::kafka::client(kafka)?
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

        let dlq = platform::kafka::prompt_producer(kafka)?;
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
        // Positions PostgreSQL committed, hinted to Kafka (PostgreSQL holds the truth) at most
        // once per HINT_EVERY: a commit per batch was an offset commit per event at low rates,
        // each replicated, which a cluster's brokers paid for in CPU.
        let mut unhinted: HashMap<(String, i32), i64> = HashMap::new();
        let mut hinted_at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            while let Ok(offsets) = positions.try_recv() {
                unhinted.extend(offsets.into_iter().map(|o| ((o.topic, o.partition), o.next_offset)));
            }
            if !unhinted.is_empty() && hinted_at.elapsed() >= HINT_EVERY {
                hint(consumer, unhinted.drain());
                hinted_at = Instant::now();
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
                        Some(kind) => batch::prepare(&self.contracts, *kind, m.key(), m.payload(), self.config.max_message_bytes),
                        None => Outcome::Nothing,
                    };
                    let trace = matches!(outcome, Outcome::Change { .. }).then(|| trace_of(&m, self.config.trace_sample_ratio));
                    let consumed = Consumed { topic: m.topic().to_owned(), partition: m.partition(), offset: m.offset(), outcome, trace };
                    let hand = &mut hands[m.partition().unsigned_abs() as usize % lanes.len()];
                    hand.push(Prepared { consumed, original: Some(m.detach()), dead_lettered: false }, generation, wait, self.config.batch_size);
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
    /// transaction each, until the consumer thread hangs up. A chunk that fails is retried with
    /// backoff; between attempts the applier takes what the consumer thread prepared meanwhile
    /// into it, and, when the failure may be one record's doing, isolates that record
    /// ([`Composer::isolate`]): it is dead-lettered and the rest applied.
    #[allow(clippy::too_many_arguments)]
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
        while let Ok(chunk) = waiting.recv() {
            let mut work = chunk;
            let mut attempts = 0u32;
            loop {
                let error = match self.attempt(lane, runtime, shared, dlq, &mut work, &committed, attempts) {
                    Attempt::Done => break,
                    Attempt::Again => {
                        attempts = 0;
                        continue;
                    }
                    Attempt::Failed(e) => e,
                };
                attempts += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(attempts.min(6)));
                tracing::error!(error = %error, attempt = attempts, "batch failed; retrying in {wait:?}");
                if stop.load(Ordering::Relaxed) {
                    return Err(error.into());
                }
                // Meanwhile the consumer thread keeps polling (and so its group membership),
                // and what it prepares for this applier joins the batch being retried, up to a
                // batch's size (beyond it, Kafka keeps the rest: a batch must fit in
                // PostgreSQL's lock table, and an outage must not fill memory).
                let until = Instant::now() + wait;
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    if work.items.len() >= self.config.batch_size {
                        std::thread::sleep(left);
                        break;
                    }
                    match waiting.recv_timeout(left) {
                        Ok(more) if more.generation == work.generation => work.items.extend(more.items),
                        // A rebalance: what was polled before it comes again from the stored positions.
                        Ok(newer) => work = newer,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(error.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// One attempt at `work`, holding the applier's lock (so a rebalance waits for it).
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        lane: usize,
        runtime: &Handle,
        shared: &Shared,
        dlq: &FutureProducer,
        work: &mut Chunk,
        committed: &std::sync::mpsc::Sender<Vec<StoredOffset>>,
        attempts: u32,
    ) -> Attempt {
        let _applying = locked(&shared.applying[lane]);
        let offsets = {
            let state = locked(&shared.assignment);
            if work.generation != state.generation {
                return Attempt::Done;
            }
            // Messages below the stored position were applied before (a redelivery after a
            // restart or rebalance).
            work.items.retain(|p| {
                let c = &p.consumed;
                state.stored.get(&(c.topic.clone(), c.partition)).is_some_and(|stored| stored.is_none_or(|s| c.offset >= s))
            });
            let consumed: Vec<&Consumed> = work.items.iter().map(|p| &p.consumed).collect();
            next_offsets(&consumed, &state.stored)
        };
        if work.items.is_empty() {
            return Attempt::Done;
        }
        let started = Instant::now();
        let result = runtime.block_on(async {
            // Once acknowledged, dead letters are not produced again when the batch is retried.
            self.dead_letter(dlq, &mut work.items).await.map_err(Failure::Kafka)?;
            let consumed: Vec<&Consumed> = work.items.iter().map(|p| &p.consumed).collect();
            batch::apply(&self.pool, &self.config.group_id, &self.composites, self.indexer.as_ref(), &consumed, &offsets)
                .await
                .map_err(Failure::Batch)
        });
        let error = match result {
            Ok(applied) => {
                self.metrics.applied(&applied, started.elapsed());
                tracing::debug!(?applied, "batch applied");
                let mut state = locked(&shared.assignment);
                for (o, _) in &offsets {
                    if let Some(slot) = state.stored.get_mut(&(o.topic.clone(), o.partition)) {
                        *slot = Some(o.next_offset);
                    }
                }
                let _ = committed.send(offsets.into_iter().map(|(o, _)| o).collect());
                return Attempt::Done;
            }
            Err(Failure::Batch(batch::BatchError::Fenced)) => {
                tracing::warn!("another consumer owns a partition of this batch; dropping it");
                return Attempt::Done;
            }
            Err(Failure::Kafka(e)) => return Attempt::Failed(Failure::Kafka(e)),
            Err(Failure::Batch(e)) => e,
        };
        // A transient failure is retried as it is, a few times, before it is suspected.
        if error.is_transient() && attempts < ISOLATE_AFTER {
            return Attempt::Failed(Failure::Batch(error));
        }
        match runtime.block_on(self.isolate(&work.items)) {
            Ok(Some(Isolated { index, rejection })) => {
                let item = &mut work.items[index];
                let c = &item.consumed;
                tracing::warn!(topic = self.config.common.kafka.contract_name(&c.topic).unwrap_or(&c.topic), partition = c.partition,
                    offset = c.offset, reason = rejection.class(), %rejection, "a record fails on its own while the others apply; dead-lettering it");
                item.consumed.outcome = Outcome::Rejected(rejection);
                item.dead_lettered = false;
                self.metrics.isolated.inc();
                Attempt::Again
            }
            Ok(None) => Attempt::Failed(Failure::Batch(error)),
            Err(e) => Attempt::Failed(Failure::Batch(e)),
        }
    }

    /// Finds the record a failing batch fails on, by applying prefixes of it and rolling them
    /// back (a binary search: about log2(n) trial transactions). That record is the poison only
    /// when the failure is its own: it makes a composite too large, or other records of the
    /// batch apply while it does not. When every record fails alike (PostgreSQL refuses all
    /// writes, say), nothing is isolated (`None`) and the batch waits, retried, for the cause to
    /// go. `Err`: a trial failed transiently (the database went away); retry later.
    async fn isolate(&self, items: &[Prepared]) -> Result<Option<Isolated>, batch::BatchError> {
        let consumed: Vec<&Consumed> = items.iter().map(|p| &p.consumed).collect();
        let trial = |range: std::ops::Range<usize>| batch::try_apply(&self.pool, &self.composites, self.indexer.as_ref(), &consumed[range]);
        // items[..ok] applies, items[..failing] does not.
        let (mut ok, mut failing) = (0, items.len());
        while failing - ok > 1 {
            let mid = ok + (failing - ok) / 2;
            match trial(0..mid).await {
                Ok(_) => ok = mid,
                Err(e) if e.is_transient() => return Err(e),
                Err(_) => failing = mid,
            }
        }
        let index = failing - 1;
        let error = match trial(index..index + 1).await {
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => e,
            // It fails only together with records before it (e.g. two records that together
            // make a composite too large): the one that tips it over is the one isolated.
            Ok(_) => match trial(0..index + 1).await {
                Ok(_) => return Ok(None), // it all applies now
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => e,
            },
        };
        if let batch::BatchError::CompositeTooLarge { member_id, .. } = &error {
            // The member's records together are too large; which one arrived last across topics
            // is chance. Its demographics are what the composite exists for: a record that adds
            // to it goes first (the last one polled).
            let index = (0..=index).rev().find(|&i| adds_to(&consumed[i].outcome, member_id)).unwrap_or(index);
            return Ok(Some(Isolated { index, rejection: error.rejection() }));
        }
        let is_change = |i: &usize| matches!(consumed[*i].outcome, Outcome::Change { .. });
        let others_apply = if (0..index).any(|i| is_change(&i)) {
            true // items[..index] applied in the search
        } else {
            // A few of the later changes, each on its own.
            let later: Vec<usize> = (index + 1..items.len()).filter(is_change).collect();
            let step = (later.len() / EVIDENCE_SAMPLES).max(1);
            let mut applies = false;
            for i in later.into_iter().step_by(step).take(EVIDENCE_SAMPLES) {
                match trial(i..i + 1).await {
                    Ok(_) => {
                        applies = true;
                        break;
                    }
                    Err(e) if e.is_transient() => return Err(e),
                    Err(_) => {}
                }
            }
            applies
        };
        Ok(others_apply.then(|| Isolated { index, rejection: error.rejection() }))
    }

    /// Produces the dead letters of `items` not yet sent and waits for the broker's
    /// acknowledgement (acks=all); each is then marked sent.
    async fn dead_letter(&self, producer: &FutureProducer, items: &mut [Prepared]) -> anyhow::Result<()> {
        let topic = self.config.common.kafka.topic(platform::topics::DLQ);
        let limit = self.config.common.kafka.message_max_bytes;
        let mut pending = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let (Outcome::Rejected(rejection), Some(m), false) = (&item.consumed.outcome, &item.original, item.dead_lettered) else { continue };
            let contract = self.config.common.kafka.contract_name(m.topic()).unwrap_or(m.topic());
            let letter = DeadLetter::of(m, contract, rejection, limit);
            tracing::warn!(
                topic = contract,
                partition = m.partition(),
                offset = m.offset(),
                reason = rejection.class(),
                reference = letter.reference,
                "dead letter"
            );
            let mut headers = OwnedHeaders::new();
            for (key, value) in &letter.headers {
                headers = headers.insert(Header { key, value: Some(value.as_slice()) });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
            if let Some(key) = &letter.key {
                record = record.key(key);
            }
            if let Some(payload) = &letter.payload {
                record = record.payload(payload);
            }
            pending.push((i, rejection.class(), producer.send_result(record).map_err(|(e, _)| e)?));
        }
        let mut result = Ok(());
        for (i, reason, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => {
                    items[i].dead_lettered = true;
                    self.metrics.dead_lettered(reason);
                }
                Ok(Err((e, _))) => result = Err(e.into()),
                Err(_) => result = Err(anyhow::anyhow!("the dead-letter producer went away")),
            }
        }
        result
    }
}

/// The trace of a system of record's message: its `traceparent` header when it has a valid
/// one, else a new trace (sampled at `ratio`).
fn trace_of(m: &rdkafka::message::BorrowedMessage<'_>, ratio: f64) -> platform::trace::TraceParent {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == platform::trace::HEADER))
        .and_then(|x| std::str::from_utf8(x.value?).ok())
        .and_then(platform::trace::TraceParent::parse)
        .unwrap_or_else(|| platform::trace::TraceParent::root_sampled(ratio))
}

/// Whether `outcome` is a change of `member`'s records other than its demographics.
fn adds_to(outcome: &Outcome, member: &str) -> bool {
    matches!(outcome, Outcome::Change { event, .. } if event.member_id.as_str() == member && event.kind != RecordKind::Demographics)
}

/// How many times a transient failure is retried before the batch is searched for a poison.
const ISOLATE_AFTER: u32 = 3;

/// Later records tried on their own, at most, for evidence that the database takes changes.
const EVIDENCE_SAMPLES: usize = 8;

/// The record a failing batch was isolated to.
struct Isolated {
    index: usize,
    rejection: Rejection,
}

enum Failure {
    Kafka(anyhow::Error),
    Batch(batch::BatchError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Kafka(e) => write!(f, "dead letters not acknowledged: {e}"),
            Failure::Batch(e) => write!(f, "{e}"),
        }
    }
}

impl From<Failure> for anyhow::Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Kafka(e) => e,
            Failure::Batch(e) => e.into(),
        }
    }
}

enum Attempt {
    Done,
    /// A record was isolated: try again at once.
    Again,
    Failed(Failure),
}

/// A dead letter as produced: the original key, value and headers with `dlq.*` headers naming
/// the reason, error, source topic, partition and offset. One too large for the topic carries,
/// instead of what did not fit, a reference to the original in its source topic (size and
/// SHA-256 of the value; the key's SHA-256; how many headers were left out).
#[derive(Debug)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether the payload was replaced by a reference.
    pub reference: bool,
}

/// The largest key a dead letter carries as received; a longer one is replaced by its hash.
const DEAD_LETTER_KEY_BYTES: usize = 1024;

impl DeadLetter {
    pub fn of(m: &OwnedMessage, contract_topic: &str, rejection: &Rejection, limit: usize) -> DeadLetter {
        let hex = |bytes: &[u8]| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(bytes))
        };
        let mut headers: Vec<(String, Vec<u8>)> = vec![
            ("dlq.reason".into(), rejection.class().as_bytes().to_vec()),
            ("dlq.error".into(), rejection.to_string().into_bytes()),
            ("dlq.source.topic".into(), contract_topic.as_bytes().to_vec()),
            ("dlq.source.partition".into(), m.partition().to_string().into_bytes()),
            ("dlq.source.offset".into(), m.offset().to_string().into_bytes()),
        ];
        // Room for framing and the headers added below.
        let budget = limit.saturating_sub(4096);
        let ours: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut key = m.key().map(<[u8]>::to_vec);
        if let Some(k) = key.as_ref().filter(|k| k.len() > DEAD_LETTER_KEY_BYTES) {
            headers.push(("dlq.key.sha256".into(), hex(k).into_bytes()));
            key = None;
        }
        let original: Vec<(String, Vec<u8>)> =
            m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default();
        let original_size: usize = original.iter().map(|(k, v)| k.len() + v.len()).sum();
        let key_size = key.as_ref().map_or(0, Vec::len);
        let mut payload = m.payload().map(<[u8]>::to_vec);
        let payload_size = payload.as_ref().map_or(0, Vec::len);
        let mut reference = false;
        // The payload is kept when it fits (without the original headers, if need be); else a
        // reference takes its place.
        if ours + key_size + payload_size > budget
            && let Some(p) = payload.take()
        {
            let pointer = serde_json::json!({ "dlq_reference": {
                "topic": contract_topic, "partition": m.partition(), "offset": m.offset(), "size": p.len(), "sha256": hex(&p),
            }});
            headers.push(("dlq.payload".into(), b"reference".to_vec()));
            payload = Some(pointer.to_string().into_bytes());
            reference = true;
        }
        if ours + key_size + original_size + payload.as_ref().map_or(0, Vec::len) > budget {
            headers.push(("dlq.headers.omitted".into(), original.len().to_string().into_bytes()));
        } else {
            headers.splice(0..0, original);
        }
        DeadLetter { key, payload, headers, reference }
    }
}

/// How often the composer hints its positions to Kafka (for lag monitoring only).
const HINT_EVERY: Duration = Duration::from_secs(1);

/// Hints positions PostgreSQL committed to Kafka (for lag monitoring; PostgreSQL holds the
/// truth, and positions are sought from it on every assignment).
fn hint(consumer: &BaseConsumer<ComposerContext>, offsets: impl Iterator<Item = ((String, i32), i64)>) {
    let assigned = consumer.assignment().unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        if assigned.find_partition(&topic, partition).is_some() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
        }
    }
    if tpl.count() > 0 {
        let _ = consumer.commit(&tpl, CommitMode::Async);
    }
}

/// The position after the batch for each partition it read, with the stored position it
/// moves from.
fn next_offsets(consumed: &[&Consumed], stored: &HashMap<(String, i32), Option<i64>>) -> Vec<(StoredOffset, Option<i64>)> {
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
        Prepared {
            consumed: Consumed { topic: "t".into(), partition: 0, offset, outcome: Outcome::Nothing, trace: None },
            original: None,
            dead_lettered: false,
        }
    }

    fn offsets(chunk: &Chunk) -> Vec<i64> {
        chunk.items.iter().map(|p| p.consumed.offset).collect()
    }

    fn message(key: &[u8], payload: &[u8], header: &[u8]) -> OwnedMessage {
        let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some(header) });
        OwnedMessage::new(
            Some(payload.to_vec()),
            Some(key.to_vec()),
            "t.sor.member.demographics.v1".into(),
            rdkafka::Timestamp::NotAvailable,
            2,
            41,
            Some(headers),
        )
    }

    fn header<'a>(letter: &'a DeadLetter, name: &str) -> Option<&'a str> {
        letter.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    #[test]
    fn a_dead_letter_carries_the_original_and_says_why() {
        let rejection = Rejection::InvalidJson { line: 1, column: 2 };
        let letter = DeadLetter::of(&message(b"M1", b"{oops", b"abc"), "sor.member.demographics.v1", &rejection, 1_048_576);
        assert_eq!((letter.key.as_deref(), letter.payload.as_deref(), letter.reference), (Some(&b"M1"[..]), Some(&b"{oops"[..]), false));
        assert_eq!(header(&letter, "trace"), Some("abc"), "the original headers are kept");
        assert_eq!(header(&letter, "dlq.reason"), Some("invalid-json"));
        assert_eq!(header(&letter, "dlq.source.topic"), Some("sor.member.demographics.v1"));
        assert_eq!((header(&letter, "dlq.source.partition"), header(&letter, "dlq.source.offset")), (Some("2"), Some("41")));
    }

    #[test]
    fn a_dead_letter_too_large_for_the_topic_refers_to_the_original() {
        let payload = vec![b'x'; 1_048_000];
        let rejection = Rejection::TooLarge { size: payload.len(), limit: 262_144 };
        let letter = DeadLetter::of(&message(b"M1", &payload, b"abc"), "sor.member.demographics.v1", &rejection, 1_048_576);
        assert!(letter.reference);
        assert_eq!(header(&letter, "dlq.payload"), Some("reference"));
        let pointer: serde_json::Value = serde_json::from_slice(letter.payload.as_deref().unwrap()).unwrap();
        use sha2::Digest;
        assert_eq!(
            pointer["dlq_reference"],
            serde_json::json!({ "topic": "sor.member.demographics.v1", "partition": 2, "offset": 41, "size": 1_048_000,
                "sha256": hex::encode(sha2::Sha256::digest(&payload)) })
        );
        assert_eq!(header(&letter, "trace"), Some("abc"));
        let size: usize = letter.key.as_ref().map_or(0, Vec::len)
            + letter.payload.as_ref().map_or(0, Vec::len)
            + letter.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        assert!(size < 4096, "{size} bytes");

        // A key or headers too large to carry: hashed, and left out.
        let letter =
            DeadLetter::of(&message(&vec![b'k'; 600_000], b"{}", &vec![b'h'; 1_100_000]), "sor.member.demographics.v1", &rejection, 1_048_576);
        assert_eq!(letter.key, None);
        assert_eq!(header(&letter, "dlq.key.sha256").map(str::len), Some(64));
        assert_eq!(header(&letter, "dlq.headers.omitted"), Some("1"));
        assert_eq!(letter.payload.as_deref(), Some(&b"{}"[..]), "a small payload stays as it was");
    }

    #[test]
    fn a_hand_seals_full_chunks_and_hands_them_over_in_order() {
        let mut hand = Hand::default();
        hand.push(item(100), 1, Duration::from_secs(60), 3);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [100], "the first change finds the pipeline idle");
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
    fn a_change_after_a_quiet_spell_goes_at_once_and_a_stream_is_batched_by_the_wait() {
        let wait = Duration::from_millis(200);
        let mut hand = Hand::default();
        hand.push(item(0), 1, wait, 100);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [0], "no timer for a change to an idle pipeline");
        hand.push(item(1), 1, wait, 100);
        hand.push(item(2), 1, wait, 100);
        assert!(hand.take_due().is_none(), "changes right behind it wait for the batch window");
        std::thread::sleep(wait);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [1, 2]);
        // A quiet spell longer than the wait: the next change goes at once again.
        std::thread::sleep(wait);
        hand.push(item(3), 1, wait, 100);
        assert_eq!(offsets(&hand.take_due().unwrap().0), [3]);
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
