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

pub mod metrics;
pub mod retention;

use clap::Parser;
use db::outbox::{self as q, OutboxRow};
use db::partner_topics as pt;
use platform::kafka::Retention;
use platform::{KafkaConfig, topics};
use rdkafka::admin::AdminClient;
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

    /// The relay also runs retention on a schedule (`retention`).
    #[command(flatten)]
    pub retention: retention::RetentionConfig,
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
    pub metrics: Arc<metrics::Metrics>,
}

/// Members whose attribution changed, reconciled per step. The outbox waits while a step runs
/// (it goes first only between steps), so a step is kept to a few milliseconds.
const ATTRIBUTION_CHANGES_PER_STEP: i64 = 100;

impl Relay {
    pub fn new(config: RelayConfig, pool: db::Pool) -> anyhow::Result<Self> {
        config.common.check_limits().map_err(anyhow::Error::msg)?;
        let kafka = &config.common.kafka;
        let producer: FutureProducer = platform::kafka::producer(kafka)?
            // A batch is enqueued at once and awaited: no need to linger for more.
            .set("linger.ms", "1")
            .set("compression.type", "zstd")
            // Keep trying through a broker restart; a batch that still fails is sent again.
            .set("message.timeout.ms", "300000")
            .set("log_level", "4")
            .create()?;
        let admin = platform::kafka::admin(kafka)?;
        Ok(Relay { config, pool, producer, admin, known_topics: HashSet::new(), reconciled_on: None, metrics: Arc::default() })
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.config.common.kafka
    }

    /// Publishes until `stop` is set; failures are retried (nothing is marked until acknowledged).
    pub async fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        platform::kafka::ensure(self.kafka()).await?;
        tracing::info!("relay publishing");
        let mut wakeup = db::Wakeup::new(&self.pool, &[db::channels::OUTBOX]).await;
        while !stop.load(Ordering::Relaxed) {
            match self.step().await {
                // Drained: what commits next notifies the listener, which returns at once.
                Ok((_, false)) => wakeup.wait(Duration::from_millis(self.config.poll_ms)).await,
                Ok((_, true)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "relay: publishing failed; the batch will be sent again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }

    /// One transaction: a batch of the outbox and, when that drained it, the partner topics'
    /// attribution changes (in the same transaction: a step per batch, not one more to find the
    /// outbox empty). Returns how many records were published or changes handled, and whether
    /// more may be waiting now (a full batch of either).
    pub async fn step(&mut self) -> anyhow::Result<(usize, bool)> {
        let mut tx = self.pool.begin().await?;
        q::lock(&mut tx).await?;
        let today = OffsetDateTime::now_utc().date();
        let rows = q::unpublished(&mut tx, self.config.batch_size).await?;
        let more_rows = rows.len() as i64 >= self.config.batch_size;
        let published = if rows.is_empty() { 0 } else { self.publish(&mut tx, rows, today).await? };
        let (followed, more_changes) = if more_rows { (0, false) } else { self.follow_attribution(&mut tx, today).await? };
        if published + followed > 0 {
            tx.commit().await?;
        }
        Ok((published + followed, more_rows || more_changes))
    }

    /// The partner topics' attribution changes (every attribution when the date changed): how
    /// many were handled, and whether more are left.
    async fn follow_attribution(&mut self, tx: &mut sqlx::PgConnection, today: time::Date) -> anyhow::Result<(usize, bool)> {
        let changes = if self.reconciled_on == Some(today) {
            let changes = pt::attribution_changes(tx, ATTRIBUTION_CHANGES_PER_STEP).await?;
            if changes.0.is_empty() {
                return Ok((0, false));
            }
            Some(changes)
        } else {
            None
        };
        // Reconciling sends members' current composites: only while the outbox is empty, or a
        // version committed since this step read its batch (each statement sees the latest
        // commits) would reach a partner topic here and again from its own outbox row.
        if !q::unpublished(tx, 1).await?.is_empty() {
            return Ok((0, true));
        }
        let Some((ids, members)) = changes else {
            let (n, complete) = self.reconcile(tx, today, None).await?;
            if complete {
                self.reconciled_on = Some(today);
            }
            return Ok((n, !complete));
        };
        // The changes are forgotten once all of their members' records were sent.
        let (n, complete) = self.reconcile(tx, today, Some(&members)).await?;
        if complete {
            pt::forget_attribution_changes(tx, &ids).await?;
        }
        Ok((n.max(ids.len()), !complete || ids.len() as i64 >= ATTRIBUTION_CHANGES_PER_STEP))
    }

    /// Publishes `rows` (the main topic and the partner topics of the members' partners) and
    /// marks them published, or parks those the broker refused. Returns the records sent.
    async fn publish(&mut self, tx: &mut sqlx::PgConnection, rows: Vec<OutboxRow>, today: time::Date) -> anyhow::Result<usize> {
        let mut members: Vec<String> = rows.iter().map(|r| r.member_id.clone()).collect();
        members.sort();
        members.dedup();
        let mut partners: HashMap<String, Vec<String>> = HashMap::new();
        for a in pt::partners_of(tx, &members, today).await? {
            partners.entry(a.member_id).or_default().push(a.partner_id);
        }
        // Each record with the row it publishes and, for a partner topic, the (partner, member)
        // pair it adds or removes there.
        let mut records = Vec::new();
        let mut owners: Vec<(usize, Option<(bool, (String, String))>)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            records.push(self.main_record(row));
            owners.push((i, None));
            // Composite versions and insights go to partner topics (not partner write-backs);
            // which members a partner topic carries is tracked by the profile's records.
            let profile = row.topic == topics::MEDICATION_PROFILE;
            for partner in partners.get(&row.member_id).into_iter().flatten() {
                let Some(topic) = topics::partner_topic(&row.topic, partner) else { break };
                records.push(Out {
                    topic: self.kafka().topic(&topic),
                    key: row.key.clone(),
                    payload: row.body.clone(),
                    version_id: row.version_id,
                    event_id: Uuid::new_v5(&row.event_id, partner.as_bytes()),
                    headers: trace_header(row),
                });
                owners.push((i, profile.then(|| (row.body.is_some(), (partner.clone(), row.member_id.clone())))));
            }
        }
        let refusals = self.send(&records).await?;
        // A row the broker refused any of its records for is parked with the reasons; the rest
        // are published. (A refused row's other records may have been published: its retry
        // sends them again, with the same event ids.)
        let mut reasons: HashMap<usize, Vec<String>> = HashMap::new();
        for ((row, _), refusal) in owners.iter().zip(&refusals) {
            if let Some(why) = refusal {
                reasons.entry(*row).or_default().push(why.clone());
            }
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for ((row, pair), refusal) in owners.into_iter().zip(&refusals) {
            if let (Some((live, pair)), None, false) = (pair, refusal, reasons.contains_key(&row)) {
                if live { added.push(pair) } else { removed.push(pair) }
            }
        }
        let published: Vec<i64> = rows.iter().enumerate().filter(|(i, _)| !reasons.contains_key(i)).map(|(_, r)| r.id).collect();
        let parked: Vec<(i64, String)> = reasons.into_iter().map(|(i, why)| (rows[i].id, why.join("; "))).collect();
        for (id, why) in &parked {
            let row = rows.iter().find(|r| r.id == *id);
            tracing::error!(outbox_id = id, member = row.map_or("", |r| r.member_id.as_str()), topic = row.map_or("", |r| r.topic.as_str()),
                reason = %why, "relay: the broker refused a record; parked it (fhirctl outbox list) and went on");
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for row in rows.iter().filter(|r| !parked.iter().any(|(id, _)| *id == r.id)) {
                if let Some(trace_id) = platform::trace::sampled_trace_id(row.traceparent.as_deref()) {
                    tracing::debug!(member = %row.member_id, version = row.version_id, topic = %row.topic, %trace_id, "published");
                }
            }
        }
        q::mark_published(tx, &published).await?;
        q::park(tx, &parked).await?;
        pt::carried(tx, &added, &removed).await?;
        Ok(records.len())
    }

    fn main_record(&self, row: &OutboxRow) -> Out {
        let mut headers: Vec<(String, String)> = row.headers.clone().map(|h| h.into_iter().collect()).unwrap_or_default();
        headers.extend(trace_header(row));
        Out {
            topic: self.kafka().topic(&row.topic),
            key: row.key.clone(),
            payload: row.body.clone(),
            version_id: row.version_id,
            event_id: row.event_id,
            headers,
        }
    }

    /// Newly attributed members' current composites, and tombstones where attributions ended,
    /// among `members` (all when `None`). Returns how many records were published, and whether
    /// that was everything (at most a batch of each kind is done at once).
    async fn reconcile(&mut self, tx: &mut sqlx::PgConnection, today: time::Date, members: Option<&[String]>) -> anyhow::Result<(usize, bool)> {
        let limit = self.config.batch_size;
        let started = pt::newly_attributed(tx, today, limit, members).await?;
        let ended = pt::no_longer_attributed(tx, today, limit, members).await?;
        let complete = (started.len() as i64) < limit && (ended.len() as i64) < limit;
        if started.is_empty() && ended.is_empty() {
            return Ok((0, complete));
        }
        let event_id = |what: &str, partner: &str, member: &str, version: i64| {
            Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{}|{what}|{partner}|{member}|{version}", topics::MEDICATION_PROFILE).as_bytes())
        };
        let mut records = Vec::new();
        for a in &started {
            records.push(Out {
                topic: self.kafka().topic(&topics::partner_profile(&a.partner_id)),
                key: a.member_id.clone(),
                payload: Some(a.body.clone()),
                version_id: a.version_id,
                event_id: event_id("attributed", &a.partner_id, &a.member_id, a.version_id),
                headers: Vec::new(),
            });
        }
        for u in &ended {
            records.push(Out {
                topic: self.kafka().topic(&topics::partner_profile(&u.partner_id)),
                key: u.member_id.clone(),
                payload: None,
                version_id: u.version_id,
                event_id: event_id("attribution-ended", &u.partner_id, &u.member_id, u.version_id),
                headers: Vec::new(),
            });
        }
        // The members' insights follow the same attribution: the current Bundle when it
        // starts, a tombstone when it ends.
        let mut insight_members: Vec<String> = started.iter().map(|a| a.member_id.clone()).chain(ended.iter().map(|u| u.member_id.clone())).collect();
        insight_members.sort();
        insight_members.dedup();
        let bundles: HashMap<String, (i64, String)> =
            db::insights::current_bundles(tx, &insight_members).await?.into_iter().map(|(m, v, b)| (m, (v, b))).collect();
        let insights_from = records.len();
        let mut insight_rows = Vec::new();
        let pairs = started.iter().map(|a| (&a.partner_id, &a.member_id, true)).chain(ended.iter().map(|u| (&u.partner_id, &u.member_id, false)));
        for (partner, member, live) in pairs {
            let Some((version, body)) = bundles.get(member) else { continue };
            let what = if live { "attributed" } else { "attribution-ended" };
            let event = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{}|{what}|{partner}|{member}|{version}", topics::INSIGHTS).as_bytes());
            records.push(Out {
                topic: self.kafka().topic(&topics::partner_insights(partner)),
                key: member.clone(),
                payload: live.then(|| body.clone()),
                version_id: *version,
                event_id: event,
                headers: Vec::new(),
            });
            insight_rows.push((partner.clone(), member.clone(), *version, event, live.then(|| body.clone())));
        }
        let refusals = self.send(&records).await?;
        // A composite the broker refuses for a partner topic is parked as an outbox row of that
        // topic (an operator retries or drops it) and counts as carried, so that reconciling
        // does not send it again and again. A tombstone cannot be too large: its refusal is the
        // broker's trouble, and the step is retried.
        for (a, refusal) in started.iter().zip(&refusals) {
            if let Some(why) = refusal {
                let topic = topics::partner_profile(&a.partner_id);
                tracing::error!(partner = %a.partner_id, member = %a.member_id, reason = %why, "relay: the broker refused a partner topic's record; parked it");
                let event = event_id("attributed", &a.partner_id, &a.member_id, a.version_id);
                q::park_partner_record(tx, &topic, &a.member_id, a.version_id, event, why, None).await?;
            }
        }
        for ((partner, member, version, event, body), refusal) in insight_rows.iter().zip(&refusals[insights_from..]) {
            match (refusal, body) {
                (Some(why), Some(body)) => {
                    tracing::error!(partner = %partner, member = %member, reason = %why, "relay: the broker refused a partner insights record; parked it");
                    q::park_partner_record(tx, &topics::partner_insights(partner), member, *version, *event, why, Some(body)).await?;
                }
                (Some(why), None) => anyhow::bail!("a tombstone was refused: {why}"),
                (None, _) => {}
            }
        }
        if let Some(why) = refusals[started.len()..insights_from].iter().flatten().next() {
            anyhow::bail!("a tombstone was refused: {why}");
        }
        let added: Vec<(String, String)> = started.iter().map(|a| (a.partner_id.clone(), a.member_id.clone())).collect();
        let removed: Vec<(String, String)> = ended.iter().map(|u| (u.partner_id.clone(), u.member_id.clone())).collect();
        pt::carried(tx, &added, &removed).await?;
        tracing::info!(attributed = added.len(), ended = removed.len(), "relay: partner topics follow attribution");
        Ok((records.len(), complete))
    }

    /// Enqueues every record in order (so per-partition order is the outbox's), then waits for
    /// the broker to acknowledge all of them. Returns, per record, why the broker (or the
    /// producer, before sending) refused it for what it is (too large, an invalid topic): such
    /// a record would be refused again. `Err`: the broker is not reachable or did not answer in
    /// time, and the whole batch is to be sent again.
    async fn send(&mut self, records: &[Out]) -> anyhow::Result<Vec<Option<String>>> {
        self.ensure_topics(records).await?;
        let started = std::time::Instant::now();
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
                        deliveries.push(Ok(delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => match refused(&e, r) {
                        Some(why) => {
                            deliveries.push(Err(why));
                            break;
                        }
                        None => return Err(e.into()),
                    },
                }
            }
        }
        let mut refusals = Vec::with_capacity(records.len());
        for (delivery, r) in deliveries.into_iter().zip(records) {
            let refusal = match delivery {
                Err(why) => Some(why),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => None,
                    Ok(Err((e, _))) => match refused(&e, r) {
                        Some(why) => Some(why),
                        None => return Err(anyhow::anyhow!("not acknowledged: {e}")),
                    },
                    Err(_) => return Err(anyhow::anyhow!("the producer went away")),
                },
            };
            refusals.push(refusal);
        }
        let kafka = &self.config.common.kafka;
        self.metrics.sent(records.iter().zip(&refusals).map(|(r, why)| (kafka.contract_name(&r.topic), why.is_some())), started.elapsed());
        Ok(refusals)
    }

    /// Creates partner topics (compacted) the first time they are needed.
    async fn ensure_topics(&mut self, records: &[Out]) -> anyhow::Result<()> {
        let missing: HashSet<&str> = records.iter().map(|r| r.topic.as_str()).filter(|t| !self.known_topics.contains(*t)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let wanted: Vec<(String, Retention)> = missing.iter().map(|t| ((*t).to_owned(), Retention::Compact)).collect();
        platform::kafka::create_with(&self.admin, self.kafka(), &wanted).await?;
        self.known_topics.extend(missing.into_iter().map(str::to_owned));
        Ok(())
    }
}

/// The `traceparent` header of a composite version's records (the composer's span of the change).
fn trace_header(row: &OutboxRow) -> Vec<(String, String)> {
    row.traceparent.iter().map(|t| (platform::trace::HEADER.to_owned(), t.clone())).collect()
}

/// Why the broker (or the producer) refused `record` for what it is, if that is why `e` came:
/// sent again unchanged, it would be refused again.
fn refused(e: &KafkaError, record: &Out) -> Option<String> {
    use RDKafkaErrorCode::*;
    let code = e.rdkafka_error_code()?;
    let size = record.payload.as_ref().map_or(0, String::len) + record.key.len();
    match code {
        MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge => Some(format!("{size} bytes is more than {} takes ({code})", record.topic)),
        InvalidMessage | InvalidRecord | InvalidTopic | PolicyViolation => Some(format!("{} refused it ({code})", record.topic)),
        _ => None,
    }
}

/// A relay from [`spawn`]: its stop flag, its task, and where its operations listener answers.
pub type Running = platform::ops::Running<tokio::task::JoinHandle<anyhow::Result<()>>>;

/// Starts a relay task (connects, migrates first) and its operations listener.
pub async fn spawn(config: RelayConfig) -> anyhow::Result<Running> {
    let pool = db::connect_for_stage(&config.common, 2).await?;
    db::migrate(&pool).await?;
    let relay = Relay::new(config.clone(), pool.clone())?;
    let mut ops = config.common.ops();
    relay.metrics.register(ops.registry());
    db::observe(&mut ops, &pool);
    ops.watch_kafka(&config.common.kafka)?;
    let stop = Arc::new(AtomicBool::new(false));
    let retention = retention::Metrics::default();
    retention.register(ops.registry());
    // Retention has a connection of its own: its statements on large tables hold one for seconds,
    // which the relay's two would otherwise wait for (acquire timeout: 5 s without publishing).
    let retention_pool = db::connect_lazy(&config.common, 2)?;
    retention::schedule(retention_pool, config.retention.clone(), config.common.fhir_base_url.clone(), retention, stop.clone());
    let metrics = relay.metrics.clone();
    ops.on_scrape(move || {
        let (metrics, pool) = (metrics.clone(), pool.clone());
        async move { metrics.refresh(&pool).await }
    });
    let ops_addr = ops.serve(config.common.ops_addr(platform::config::ops_port::RELAY), stop.clone()).await?;
    let flag = stop.clone();
    Ok(platform::ops::Running { stop, handle: tokio::spawn(async move { relay.run(&flag).await }), ops_addr })
}
