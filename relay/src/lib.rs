//! The relay: publishes the outbox (written in the same transaction as each composite version)
//! to `fhir.medication-profile.v1` and to the topic of every partner the member is attributed
//! to, in version order per member, exactly once.
//!
//! Each step is one Kafka transaction (acks=all) and one PostgreSQL transaction. The Kafka one
//! carries the step's records and, last, what the step changes in PostgreSQL (which rows it
//! published, which members the partner topics now carry) on `relay.transactions.v1`; once
//! Kafka committed, PostgreSQL commits those changes with the step's number. A relay killed in
//! between left a step that Kafka committed and PostgreSQL did not: the relay that takes the
//! lead next fences it (the same transactional id), reads that last step back, and applies its
//! changes instead of publishing its records again. Consumers read committed records only
//! (`isolation.level=read_committed`, librdkafka's default): a step aborted leaves nothing they see.
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
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
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

    /// Publish each step in a Kafka transaction, so that consumers reading committed records
    /// see every version once even across relay crashes. `false`: at least once (a relay killed
    /// between the broker's acknowledgement and its own commit publishes those records again,
    /// with the same event ids), for less latency and broker CPU (docs/benchmarks.md).
    #[arg(long, env = "RELAY_EXACTLY_ONCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub exactly_once: bool,

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
    /// While this relay has the lead: the connection that holds it (steps run on it) and a
    /// producer whose transactions fenced every earlier one.
    lead: Option<Lead>,
    /// The last step committed in PostgreSQL, as this relay knows it.
    step: i64,
    admin: AdminClient<DefaultClientContext>,
    known_topics: HashSet<String>,
    /// The day every partner topic was last compared with every attribution. Between those
    /// full comparisons (at start, and when the date changes: attribution periods follow the
    /// calendar), only members whose attribution changed are looked at.
    reconciled_on: Option<time::Date>,
    pub metrics: Arc<metrics::Metrics>,
}

struct Lead {
    conn: sqlx::PgConnection,
    kafka: Transactional,
}

/// The lead's producer and its open Kafka transaction, if any (begun at a step's first record):
/// the deliveries it awaits at commit, and what it sent, for the metrics.
struct Transactional {
    producer: FutureProducer,
    /// Whether the producer is transactional (`RELAY_EXACTLY_ONCE`).
    transactions: bool,
    open: bool,
    pending: Vec<(rdkafka::producer::DeliveryFuture, String)>,
    sent: Vec<(String, bool)>,
    began: Option<std::time::Instant>,
}

impl Transactional {
    fn new(producer: FutureProducer, transactions: bool) -> Self {
        Transactional { producer, transactions, open: false, pending: Vec::new(), sent: Vec::new(), began: None }
    }
}

/// What a step changes in PostgreSQL besides parking, written to `relay.transactions.v1` in the
/// step's Kafka transaction and applied with the step's number.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Effects {
    step: i64,
    /// The database's lineage of steps (`relay_state.lineage`).
    lineage: Uuid,
    /// Outbox ids published, as inclusive ranges (a batch is mostly consecutive ids).
    published: Vec<(i64, i64)>,
    /// (partner, member) pairs the partner topics now carry, and no longer carry.
    carried: Vec<(String, String)>,
    dropped: Vec<(String, String)>,
    /// Attribution changes handled.
    forgotten: Vec<i64>,
}

impl Effects {
    fn publish(&mut self, ids: &[i64]) {
        for &id in ids {
            match self.published.last_mut() {
                Some((_, end)) if *end + 1 == id => *end = id,
                _ => self.published.push((id, id)),
            }
        }
    }

    fn published_ids(&self) -> Vec<i64> {
        self.published.iter().flat_map(|&(start, end)| start..=end).collect()
    }

    async fn apply(&self, tx: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        if !self.published.is_empty() {
            q::mark_published(tx, &self.published_ids()).await?;
        }
        pt::carried(tx, &self.carried, &self.dropped).await?;
        if !self.forgotten.is_empty() {
            pt::forget_attribution_changes(tx, &self.forgotten).await?;
        }
        Ok(())
    }
}

/// How long a Kafka transaction may stay open before the broker aborts it (a step takes
/// milliseconds; a relay that stopped mid-step is fenced sooner by the next one to lead).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Members whose attribution changed, reconciled per step. The outbox waits while a step runs
/// (it goes first only between steps), so a step is kept to a few milliseconds.
const ATTRIBUTION_CHANGES_PER_STEP: i64 = 100;

impl Relay {
    pub fn new(config: RelayConfig, pool: db::Pool) -> anyhow::Result<Self> {
        config.common.check_limits().map_err(anyhow::Error::msg)?;
        let admin = platform::kafka::admin(&config.common.kafka)?;
        Ok(Relay { config, pool, lead: None, step: 0, admin, known_topics: HashSet::new(), reconciled_on: None, metrics: Arc::default() })
    }

    /// A producer whose transactions are the relays' (one transactional id per deployment):
    /// initializing it aborts or completes whatever an earlier one left open, and fences it.
    /// Without `RELAY_EXACTLY_ONCE`, an idempotent producer that keeps trying through a broker
    /// restart (a batch that still fails is sent again).
    async fn transactional_producer(&self) -> anyhow::Result<FutureProducer> {
        let kafka = self.kafka();
        let mut config = platform::kafka::producer(kafka)?;
        // A batch is enqueued at once and awaited: no need to linger for more.
        config.set("linger.ms", "1").set("compression.type", "zstd").set("log_level", "4");
        if !self.config.exactly_once {
            return Ok(config.set("message.timeout.ms", "300000").create()?);
        }
        let timeout = TRANSACTION_TIMEOUT.as_millis().to_string();
        let producer: FutureProducer = config
            .set("transactional.id", kafka.topic("fhir-relay"))
            .set("transaction.timeout.ms", &timeout)
            // A record not acknowledged within the transaction fails the step, which is retried.
            .set("message.timeout.ms", &timeout)
            .create()?;
        let init = producer.clone();
        tokio::task::spawn_blocking(move || init.init_transactions(Duration::from_secs(30))).await??;
        Ok(producer)
    }

    /// Takes the lead if no other relay has it: fences the last leader's Kafka transactions and
    /// applies the step Kafka committed for it but PostgreSQL did not, if there is one.
    async fn take_lead(&mut self) -> anyhow::Result<bool> {
        let mut pooled = self.pool.acquire().await?;
        if !q::lead(&mut pooled).await? {
            return Ok(false);
        }
        // The lock lives as long as this session: the connection leaves the pool with it, and
        // closes (releasing the lead) when dropped, however the lead ends.
        let mut conn = pooled.detach();
        let producer = self.transactional_producer().await?;
        let last = if self.config.exactly_once { self.last_committed_step().await? } else { None };
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        let (mut step, lineage) = q::relay_step(&mut tx).await?;
        if let Some(effects) = last.filter(|e| e.lineage == lineage && e.step == step + 1) {
            effects.apply(&mut tx).await?;
            q::set_relay_step(&mut tx, effects.step).await?;
            tracing::warn!(
                step = effects.step,
                rows = effects.published_ids().len(),
                "relay: the last leader stopped after Kafka committed a step and before PostgreSQL did; applied it instead of publishing it again"
            );
            step = effects.step;
        }
        tx.commit().await?;
        self.step = step;
        self.reconciled_on = None;
        self.lead = Some(Lead { conn, kafka: Transactional::new(producer, self.config.exactly_once) });
        self.metrics.leading.set(1);
        Ok(true)
    }

    /// Gives up the lead: aborts an open Kafka transaction and ends the session that held it.
    async fn resign(&mut self) {
        self.reconciled_on = None;
        self.metrics.leading.set(0);
        if let Some(lead) = self.lead.take() {
            if lead.kafka.open && lead.kafka.transactions {
                drop(lead.kafka.pending);
                let producer = lead.kafka.producer.clone();
                let _ = tokio::task::spawn_blocking(move || producer.abort_transaction(Duration::from_secs(10))).await;
            }
            let _ = sqlx::Connection::close(lead.conn).await;
        }
    }

    /// The last step on `relay.transactions.v1` (committed records only).
    async fn last_committed_step(&self) -> anyhow::Result<Option<Effects>> {
        let topic = self.kafka().topic(topics::RELAY_TRANSACTIONS);
        let consumer: rdkafka::consumer::BaseConsumer = platform::kafka::client(self.kafka())?
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            // The partition is assigned and read to its end; no offset is ever committed (librdkafka
            // wants a group to assign partitions; the cluster profile grants the relay `fhir-relay*`).
            .set("enable.auto.commit", "false")
            .set("group.id", self.kafka().topic("fhir-relay-reader"))
            .set("log_level", "4")
            .create()?;
        tokio::task::spawn_blocking(move || last_record(&consumer, &topic)).await?
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.config.common.kafka
    }

    /// Publishes until `stop` is set; failures are retried (nothing is marked until acknowledged).
    pub async fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let own = [(self.kafka().topic(topics::RELAY_TRANSACTIONS), Retention::Delete(Some(24 * 3600 * 1000)))];
        platform::kafka::patiently("relay: checking its topics", stop, || async {
            platform::kafka::ensure(self.kafka()).await?;
            platform::kafka::create_with(&self.admin, self.kafka(), &own).await
        })
        .await?;
        let mut wakeup = db::Wakeup::new(&self.pool, &[db::channels::OUTBOX]).await;
        let mut waiting_since = None;
        while !stop.load(Ordering::Relaxed) {
            if self.lead.is_none() {
                match self.take_lead().await {
                    Ok(true) => {
                        tracing::info!(step = self.step, "relay publishing (this relay has the lead)");
                        waiting_since = None;
                    }
                    Ok(false) => {
                        if waiting_since.is_none() {
                            tracing::info!("relay standing by: another relay has the lead");
                            waiting_since = Some(());
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: could not take the lead; trying again");
                        self.resign().await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            match self.step().await {
                // Drained: what commits next notifies the listener, which returns at once.
                Ok((_, false)) => wakeup.wait(Duration::from_millis(self.config.poll_ms)).await,
                Ok((_, true)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "relay: publishing failed; the step is aborted and will be sent again");
                    self.resign().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.resign().await;
        Ok(())
    }

    /// One transaction: a batch of the outbox and, when that drained it, the partner topics'
    /// attribution changes (in the same transaction: a step per batch, not one more to find the
    /// outbox empty). Returns how many records were published or changes handled, and whether
    /// more may be waiting now (a full batch of either).
    pub async fn step(&mut self) -> anyhow::Result<(usize, bool)> {
        let mut lead = self.lead.take().ok_or_else(|| anyhow::anyhow!("this relay does not have the lead"))?;
        let result = self.step_on(&mut lead).await;
        // A failed step ends with `resign`, which needs the lead to abort its transaction.
        self.lead = Some(lead);
        result
    }

    async fn step_on(&mut self, lead: &mut Lead) -> anyhow::Result<(usize, bool)> {
        let mut tx = sqlx::Connection::begin(&mut lead.conn).await?;
        let (at, lineage) = q::relay_step(&mut tx).await?;
        anyhow::ensure!(at == self.step, "another relay published meanwhile (step {at}; this relay knew {})", self.step);
        let today = OffsetDateTime::now_utc().date();
        let rows = q::unpublished(&mut tx, self.config.batch_size).await?;
        let more_rows = rows.len() as i64 >= self.config.batch_size;
        let mut effects = Effects { step: at + 1, lineage, ..Effects::default() };
        let published = if rows.is_empty() { 0 } else { self.publish(&mut tx, &mut lead.kafka, rows, today, &mut effects).await? };
        let (followed, more_changes) =
            if more_rows { (0, false) } else { self.follow_attribution(&mut tx, &mut lead.kafka, today, &mut effects).await? };
        if lead.kafka.open {
            self.commit_to_kafka(&mut lead.kafka, &effects).await?;
            effects.apply(&mut tx).await?;
            q::set_relay_step(&mut tx, effects.step).await?;
            tx.commit().await?;
            self.step = effects.step;
        } else if published + followed > 0 {
            // Nothing went to Kafka (attribution changes that changed no partner topic, records
            // refused before they were sent): PostgreSQL alone.
            effects.apply(&mut tx).await?;
            tx.commit().await?;
        }
        Ok((published + followed, more_rows || more_changes))
    }

    /// Ends the step's Kafka transaction with what it changes in PostgreSQL, waits for the
    /// broker to acknowledge every record, and commits it. The step's record goes out with the
    /// others (what it says is known once they are enqueued), so the transaction's partitions
    /// are added together and its records travel in one round of requests.
    async fn commit_to_kafka(&mut self, kafka: &mut Transactional, effects: &Effects) -> anyhow::Result<()> {
        if kafka.transactions {
            let topic = self.kafka().topic(topics::RELAY_TRANSACTIONS);
            let payload = serde_json::to_vec(effects)?;
            let record = FutureRecord::to(&topic).partition(0).key("relay").payload(&payload);
            let delivery = kafka.producer.send_result(record).map_err(|(e, _)| e)?;
            kafka.pending.push((delivery, topic));
        }
        for (delivery, topic) in kafka.pending.drain(..) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => anyhow::bail!("{topic} did not take a record: {e}"),
                Err(_) => anyhow::bail!("the producer went away"),
            }
        }
        if kafka.transactions {
            let producer = kafka.producer.clone();
            tokio::task::spawn_blocking(move || platform::kafka::commit_transaction(&producer, TRANSACTION_TIMEOUT)).await??;
        }
        kafka.open = false;
        let cfg = &self.config.common.kafka;
        let took = kafka.began.take().map(|t| t.elapsed()).unwrap_or_default();
        self.metrics.sent(kafka.sent.iter().map(|(t, refused)| (cfg.contract_name(t), *refused)), took);
        kafka.sent.clear();
        Ok(())
    }

    /// The partner topics' attribution changes (every attribution when the date changed): how
    /// many were handled, and whether more are left.
    async fn follow_attribution(
        &mut self,
        tx: &mut sqlx::PgConnection,
        kafka: &mut Transactional,
        today: time::Date,
        effects: &mut Effects,
    ) -> anyhow::Result<(usize, bool)> {
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
            let (n, complete) = self.reconcile(tx, kafka, today, None, effects).await?;
            if complete {
                self.reconciled_on = Some(today);
            }
            return Ok((n, !complete));
        };
        // The changes are forgotten once all of their members' records were sent.
        let (n, complete) = self.reconcile(tx, kafka, today, Some(&members), effects).await?;
        if complete {
            effects.forgotten.extend(&ids);
        }
        Ok((n.max(ids.len()), !complete || ids.len() as i64 >= ATTRIBUTION_CHANGES_PER_STEP))
    }

    /// Publishes `rows` (the main topic and the partner topics of the members' partners) and
    /// marks them published, or parks those the broker refused. Returns the records sent.
    async fn publish(
        &mut self,
        tx: &mut sqlx::PgConnection,
        kafka: &mut Transactional,
        rows: Vec<OutboxRow>,
        today: time::Date,
        effects: &mut Effects,
    ) -> anyhow::Result<usize> {
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
        let refusals = self.send(kafka, &records).await?;
        // A row the producer refused any of its records for is parked with the reasons; the
        // rest are published. (A refused row's other records may have been published: its retry
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
        q::park(tx, &parked).await?;
        effects.publish(&published);
        effects.carried.extend(added);
        effects.dropped.extend(removed);
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
    async fn reconcile(
        &mut self,
        tx: &mut sqlx::PgConnection,
        kafka: &mut Transactional,
        today: time::Date,
        members: Option<&[String]>,
        effects: &mut Effects,
    ) -> anyhow::Result<(usize, bool)> {
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
        let refusals = self.send(kafka, &records).await?;
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
        tracing::info!(attributed = added.len(), ended = removed.len(), "relay: partner topics follow attribution");
        effects.carried.extend(added);
        effects.dropped.extend(removed);
        Ok((records.len(), complete))
    }

    /// Enqueues every record in order (so per-partition order is the outbox's) in the step's
    /// Kafka transaction; `commit_to_kafka` awaits them. Returns, per record, why the producer
    /// refused it for what it is (larger than the deployment's limit, an invalid topic): such a
    /// record would be refused again, and the transaction goes on without it. A record the
    /// broker refuses later fails the transaction at commit: the step is aborted and sent again.
    async fn send(&mut self, kafka: &mut Transactional, records: &[Out]) -> anyhow::Result<Vec<Option<String>>> {
        self.ensure_topics(records).await?;
        if !kafka.open {
            if kafka.transactions {
                kafka.producer.begin_transaction()?;
            }
            kafka.open = true;
            kafka.began = Some(std::time::Instant::now());
        }
        let mut refusals = Vec::with_capacity(records.len());
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
                match kafka.producer.send_result(record) {
                    Ok(delivery) => {
                        kafka.pending.push((delivery, r.topic.clone()));
                        refusals.push(None);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => match refused(&e, r) {
                        Some(why) => {
                            refusals.push(Some(why));
                            break;
                        }
                        None => return Err(e.into()),
                    },
                }
            }
        }
        kafka.sent.extend(records.iter().zip(&refusals).map(|(r, why)| (r.topic.clone(), why.is_some())));
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

/// The last record of `topic`'s partition 0, read committed. Blocking.
fn last_record(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> anyhow::Result<Option<Effects>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let timeout = Duration::from_secs(10);
    let (low, high) = consumer.fetch_watermarks(topic, 0, timeout)?;
    // Aborted steps and transaction markers take offsets too: look further back until a
    // committed record turns up.
    let mut back = 64;
    loop {
        let from = (high - back).max(low);
        if from >= high {
            return Ok(None);
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Offset(from))?;
        consumer.assign(&assignment)?;
        let mut last = None;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            anyhow::ensure!(std::time::Instant::now() < deadline, "{topic} was not read to its end in {timeout:?}");
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => last = m.payload().map(serde_json::from_slice::<Effects>).transpose()?,
            }
        }
        if last.is_some() || from == low {
            return Ok(last);
        }
        back *= 4;
    }
}
