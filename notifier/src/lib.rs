//! The notifier: turns new composite versions into events on each matching subscription's
//! queue (in PostgreSQL), and delivers each queue on its own: one slow or dead endpoint never
//! delays another.
//!
//! - **Fan-out**: the outbox's composite versions, in order, become events numbered per
//!   subscription, for the subscriptions whose partner the member is attributed to (and whose
//!   `patient` filter, if any, names the member), in one transaction with marking them done.
//! - **Delivery**: a subscription with something due (its handshake, events, a heartbeat) is
//!   leased to one notifier, which sends its oldest undelivered events (up to `max-count`) in
//!   one notification and marks them delivered only when the endpoint (or Kafka) acknowledged
//!   them. A failure is retried with exponential backoff and jitter, the same events first, so
//!   order holds and nothing is skipped; after `SUBSCRIPTION_RETRY_FOR_SECS` of failing, the
//!   subscription goes to `error` and keeps its queue (`$events` replays it).
//! - **The Kafka channel, once**: a notifier that takes over a subscription whose last delivery
//!   may have reached Kafka unrecorded (its notifier stopped, or the producer gave up) reads the
//!   subscription's last notification back from the topic first ([`kafka_channel`]).

pub mod kafka_channel;
pub mod metrics;

use clap::Parser;
use db::subscriptions::{self as q, Subscription};
use fhir::subscriptions::{self as subs, Kind, SIGNATURE_HEADER};
use platform::KafkaConfig;
use platform::egress::EgressPolicy;
use rand::Rng;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// Outbox rows the fan-out turns into subscription events per transaction.
const FAN_OUT_BATCH: i64 = 1000;

#[derive(Debug, Clone, Parser)]
#[command(name = "notifier", about = "Deliver FHIR Subscription notifications")]
pub struct NotifierConfig {
    #[command(flatten)]
    pub common: platform::CommonConfig,

    /// How often the notifier looks for due deliveries (retries, heartbeats) when idle, in
    /// milliseconds. New events wake it at once (LISTEN fhir_subscription_events).
    #[arg(long, env = "NOTIFIER_POLL_MS", default_value_t = 50)]
    pub poll_ms: u64,

    /// How often the notifier looks for new composite versions when no commit notified it, in
    /// milliseconds (LISTEN fhir_outbox wakes it at once).
    #[arg(long, env = "NOTIFIER_FAN_OUT_POLL_MS", default_value_t = 200)]
    pub fan_out_poll_ms: u64,

    /// The first retry of a failed notification waits about this long (milliseconds); each
    /// further failure doubles it, up to `retry-max-ms`; each wait is jittered (50–100 %).
    #[arg(long, env = "SUBSCRIPTION_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,

    #[arg(long, env = "SUBSCRIPTION_RETRY_MAX_MS", default_value_t = 60_000)]
    pub retry_max_ms: u64,

    /// After failing for this long, a subscription goes to `error` (its queue is kept).
    #[arg(long, env = "SUBSCRIPTION_RETRY_FOR_SECS", default_value_t = 86_400)]
    pub retry_for_secs: i64,

    /// Most deliveries in flight at once (each to a different subscription).
    #[arg(long, env = "NOTIFIER_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,

    /// Most deliveries in flight at once for one partner: a partner whose endpoints are slow or
    /// never answer holds only this share of NOTIFIER_CONCURRENCY, never the others'.
    #[arg(long, env = "NOTIFIER_PARTNER_CONCURRENCY", default_value_t = 8)]
    pub partner_concurrency: usize,

    /// Networks (CIDR, comma-separated) rest-hook endpoints may be in although they are not
    /// public (as the API's SUBSCRIPTION_ALLOWED_NETWORKS): local tests and demos only.
    #[arg(long, env = "SUBSCRIPTION_ALLOWED_NETWORKS", value_delimiter = ',')]
    pub allowed_networks: Vec<String>,

    /// A PEM file of certificate authorities to trust for rest-hook endpoints besides the
    /// public ones (Mozilla's list): a plan that accepts endpoints its own CA certified.
    #[arg(long, env = "SUBSCRIPTION_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// How long a claim holds a subscription beyond the subscription's own timeout, in seconds.
const LEASE_SECS: i32 = 5;

/// How long the Kafka channel's producer tries to deliver a notification (a request, half of it):
/// within a Kafka-channel subscription's lease, so that a record still on its way when the lease
/// runs out is not possible, and the next claimant's read-back sees what was sent.
const KAFKA_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a claim holds `s` (as [`q::claim_due`] computes it).
fn lease_of(s: &Subscription) -> Duration {
    let timeout = Duration::from_secs(u64::try_from(s.timeout_secs).unwrap_or(0));
    let timeout = if s.channel == "kafka" { timeout.max(KAFKA_DELIVERY_TIMEOUT) } else { timeout };
    Duration::from_secs(LEASE_SECS as u64) + timeout
}

pub struct Notifier {
    config: NotifierConfig,
    pool: db::Pool,
    base_url: String,
    http: reqwest::Client,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    known_topics: Mutex<HashSet<String>>,
    /// Subscriptions this notifier is delivering now, with their partners.
    in_flight: Mutex<HashMap<String, String>>,
    egress: EgressPolicy,
    pub metrics: Arc<metrics::Metrics>,
}

impl Notifier {
    pub fn new(config: NotifierConfig, pool: db::Pool) -> anyhow::Result<Arc<Self>> {
        let kafka = &config.common.kafka;
        let producer: FutureProducer = platform::kafka::producer(kafka)?
            .set("linger.ms", "0")
            .set("message.timeout.ms", KAFKA_DELIVERY_TIMEOUT.as_millis().to_string())
            .set("request.timeout.ms", (KAFKA_DELIVERY_TIMEOUT / 2).as_millis().to_string())
            .set("log_level", "4")
            .create()?;
        let admin = platform::kafka::admin(kafka)?;
        let egress = EgressPolicy::new(&config.allowed_networks).map_err(anyhow::Error::msg)?;
        // Redirects are not followed: a notification goes to the registered endpoint only. No
        // proxy either: the connection goes to the address the resolver checked.
        let mut http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { policy: egress.clone() }))
            .connect_timeout(Duration::from_secs(10));
        if let Some(file) = &config.ca_file {
            let pem = std::fs::read(file).map_err(|e| anyhow::anyhow!("reading SUBSCRIPTION_CA_FILE {}: {e}", file.display()))?;
            for ca in reqwest::Certificate::from_pem_bundle(&pem)? {
                http = http.add_root_certificate(ca);
            }
        }
        let http = http.build()?;
        Ok(Arc::new(Notifier {
            base_url: config.common.fhir_base_url.trim_end_matches('/').to_owned(),
            config,
            pool,
            http,
            producer,
            admin,
            known_topics: Mutex::default(),
            in_flight: Mutex::default(),
            egress,
            metrics: Arc::default(),
        }))
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.config.common.kafka
    }

    /// Fans out and delivers until `stop` is set.
    pub async fn run(self: Arc<Self>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        tracing::info!("notifier delivering");
        let fan_out = {
            let this = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move { this.fan_out_loop(&stop).await })
        };
        let poll = Duration::from_millis(self.config.poll_ms);
        let mut wakeup = db::Wakeup::new(&self.pool, &[db::channels::SUBSCRIPTION_EVENTS]).await;
        let mut deliveries = tokio::task::JoinSet::new();
        while !stop.load(Ordering::Relaxed) {
            while deliveries.try_join_next().is_some() {}
            let free = self.config.concurrency.saturating_sub(deliveries.len());
            // Before the claim: the leases it takes end no sooner than this plus their length.
            let claimed_at = std::time::Instant::now();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                let busy = self.busy_partners();
                q::claim_due(
                    &self.pool,
                    (LEASE_SECS, KAFKA_DELIVERY_TIMEOUT.as_secs() as i32),
                    free as i64,
                    self.config.partner_concurrency.max(1) as i64,
                    &busy,
                )
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "notifier: could not claim subscriptions");
                    Vec::new()
                })
            };
            // Fewer than there was room for: nothing else is due now, so wait (claiming again at
            // once would only find nothing, at a statement's cost).
            let idle = claimed.len() < free.max(1);
            for s in claimed {
                if !self.in_flight.lock().map(|mut f| f.insert(s.id.clone(), s.partner_id.clone()).is_none()).unwrap_or(false) {
                    // Only when a delivery outlived its lease (stuck beyond its timeout): leave
                    // it; the lease taken now expires and the queue is sent again.
                    tracing::warn!(subscription = %s.id, "notifier: a delivery outlived its lease");
                    continue;
                }
                let this = self.clone();
                deliveries.spawn(async move {
                    let id = s.id.clone();
                    // `deliver` leaves the in-flight set itself, just before releasing the lease.
                    this.deliver(s, claimed_at).await.unwrap_or_else(|e| {
                        tracing::warn!(subscription = %id, error = %e, "notifier: a delivery did not finish; its lease runs out and the next claim takes it over");
                        this.done(&id);
                        false
                    })
                });
            }
            if idle {
                // New events and a finished delivery whose queue may hold more (it sent a full
                // notification) wake it at once; retries and heartbeats come due at the poll. A
                // delivery that emptied its queue wakes nothing: claiming again would find only
                // what a notification announces anyway (at a statement and a commit per delivery).
                let until = tokio::time::Instant::now() + poll;
                loop {
                    tokio::select! {
                        _ = wakeup.wait(until.saturating_duration_since(tokio::time::Instant::now())) => break,
                        Some(joined) = deliveries.join_next(), if !deliveries.is_empty() => {
                            if joined.unwrap_or(true) {
                                break;
                            }
                        }
                    }
                }
            }
        }
        while deliveries.join_next().await.is_some() {}
        fan_out.await?
    }

    async fn fan_out_loop(&self, stop: &AtomicBool) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.config.fan_out_poll_ms);
        let mut wakeup = db::Wakeup::new(&self.pool, &[db::channels::OUTBOX]).await;
        let mut last_expiry = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let today = OffsetDateTime::now_utc().date();
            match q::fan_out(&self.pool, today, FAN_OUT_BATCH, fhir::subscriptions::TOPICS).await {
                Ok((0, _)) => wakeup.wait(poll).await,
                Ok((rows, events)) => {
                    self.metrics.events_queued.inc_by(events as u64);
                    tracing::debug!(rows, events, "notifier: queued subscription events");
                    // Fewer than a batch: the outbox was drained as of that transaction, and
                    // what committed since notified the listener, which returns at once. Looking
                    // again now would find nothing, at a transaction's cost per batch.
                    if (rows as i64) < FAN_OUT_BATCH {
                        wakeup.wait(poll).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notifier: fan-out failed; it is retried");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            if last_expiry.elapsed() > Duration::from_secs(5) {
                last_expiry = std::time::Instant::now();
                if let Ok(n) = q::end_expired(&self.pool).await
                    && n > 0
                {
                    tracing::info!(subscriptions = n, "notifier: subscriptions reached their end");
                }
            }
        }
        Ok(())
    }

    /// Sends what is due for one leased subscription and records the outcome. True when its
    /// queue may hold more now (a full notification went out, or the handshake).
    async fn deliver(&self, s: Subscription, claimed_at: std::time::Instant) -> anyhow::Result<bool> {
        let (kind, events) = if s.status == "requested" {
            (Kind::Handshake, Vec::new())
        } else {
            let today = OffsetDateTime::now_utc().date();
            let events = q::pending(&self.pool, &s.id, &s.partner_id, today, i64::from(s.max_count), s.content == "full-resource").await?;
            let heartbeat_due = s
                .heartbeat_secs
                .is_some_and(|h| s.last_sent_at.unwrap_or(s.created_at) + time::Duration::seconds(i64::from(h)) <= OffsetDateTime::now_utc());
            match (events.is_empty(), heartbeat_due) {
                (false, _) => (Kind::EventNotification, events),
                (true, true) => (Kind::Heartbeat, events),
                (true, false) => {
                    self.done(&s.id);
                    q::release(&self.pool, &s.id).await?;
                    return Ok(false);
                }
            }
        };
        if let (Some(first), "kafka") = (events.first(), s.channel.as_str())
            && let Some(last) = self.sent_before(&s).await?
            && last >= first.event_number
        {
            tracing::warn!(subscription = %s.id, through = last,
                "notifier: the last notifier to hold this subscription sent its notification and stopped before recording it; recorded it instead of sending it again");
            self.done(&s.id);
            q::delivered(&self.pool, &s.id, Some(last)).await?;
            return Ok(true);
        }
        let body = subs::notification(&self.base_url, &s, kind, &events).to_string();
        // The notifier's span of the latest change the notification carries.
        let trace = events.iter().rev().find_map(|e| e.traceparent.as_deref().and_then(platform::trace::TraceParent::parse)).map(|t| t.child());
        let started = std::time::Instant::now();
        let (channel, sent) = match s.channel.as_str() {
            "rest-hook" => ("rest-hook", self.post(&s, body, trace).await),
            _ => {
                // A record sent now is delivered or given up on before the lease runs out, so the
                // next claimant's read-back sees it; with less time left, the lease is left to run out.
                anyhow::ensure!(
                    claimed_at.elapsed() + KAFKA_DELIVERY_TIMEOUT + Duration::from_secs(1) < lease_of(&s),
                    "the lease ran short before the notification was sent"
                );
                ("kafka", self.produce(&s, body, &events, trace).await)
            }
        };
        let outcome = if sent.is_ok() { "delivered" } else { "failed" };
        let more = sent.is_ok() && (kind == Kind::Handshake || events.len() >= s.max_count as usize);
        self.metrics.delivered(channel, kind.code(), outcome, events.len(), started.elapsed());
        // Before the lease is released: once it is, this notifier may claim the subscription
        // again at once, and must not find it still "in flight" (it would skip it, and the new
        // lease would hold the queue until it expired).
        self.done(&s.id);
        match sent {
            Ok(()) => {
                q::delivered(&self.pool, &s.id, events.last().map(|e| e.event_number)).await?;
                match trace.filter(platform::trace::TraceParent::sampled) {
                    Some(t) => {
                        tracing::debug!(subscription = %s.id, events = events.len(), kind = ?kind, trace_id = %t.trace_id(), "notification delivered")
                    }
                    None => tracing::debug!(subscription = %s.id, events = events.len(), kind = ?kind, "notification delivered"),
                }
            }
            Err(error) => {
                let now = OffsetDateTime::now_utc();
                let attempts = u32::try_from(s.attempts).unwrap_or(0).saturating_add(1);
                let wait = self.backoff(attempts);
                let give_up = s.failing_since.unwrap_or(now) + time::Duration::seconds(self.config.retry_for_secs) <= now;
                q::failed(&self.pool, &s.id, &error, now + wait, give_up).await?;
                if give_up {
                    tracing::warn!(subscription = %s.id, partner = %s.partner_id, attempts, %error, "subscription in error: deliveries failed for too long; its queue is kept");
                } else {
                    tracing::info!(subscription = %s.id, attempts, retry_in_ms = wait.whole_milliseconds() as i64, %error, "notification failed; retrying");
                }
            }
        }
        Ok(more)
    }

    /// When the last attempt to deliver to `s` may have reached Kafka without being recorded (its
    /// notifier stopped mid-delivery, or the producer gave up on a record the broker may still
    /// have taken): the last event number a Kafka-channel notification of `s` carried since
    /// those attempts began. `None` when the last attempt ended as recorded.
    async fn sent_before(&self, s: &Subscription) -> anyhow::Result<Option<i64>> {
        // An interrupted lease began its length before it ended; a failed attempt
        // began up to the producer's delivery timeout before it was recorded; and a minute more
        // for clocks.
        let margin = time::Duration::seconds(60);
        let lease = s.interrupted_lease.map(|until| until - lease_of(s) - margin);
        let failing = s.failing_since.map(|since| since - KAFKA_DELIVERY_TIMEOUT - margin);
        let Some(since) = lease.into_iter().chain(failing).min() else { return Ok(None) };
        let topic = self.kafka().topic(&subs::kafka_topic(&s.partner_id));
        let consumer = kafka_channel::reader(self.kafka())?;
        let id = s.id.clone();
        tokio::task::spawn_blocking(move || kafka_channel::last_sent(&consumer, &topic, &id, since)).await?
    }

    /// Deliveries in flight per partner.
    fn busy_partners(&self) -> Vec<(String, i64)> {
        let mut busy: HashMap<String, i64> = HashMap::new();
        if let Ok(f) = self.in_flight.lock() {
            for partner in f.values() {
                *busy.entry(partner.clone()).or_default() += 1;
            }
        }
        busy.into_iter().collect()
    }

    fn done(&self, id: &str) {
        if let Ok(mut f) = self.in_flight.lock() {
            f.remove(id);
        }
    }

    /// Exponential backoff with jitter: base × 2^(attempts−1), at most max, times 0.5–1.0.
    fn backoff(&self, attempts: u32) -> time::Duration {
        let exp = self.config.retry_base_ms.saturating_mul(1u64 << attempts.saturating_sub(1).min(20));
        let capped = exp.min(self.config.retry_max_ms) as f64;
        let jittered = capped * rand::rng().random_range(0.5..=1.0);
        time::Duration::milliseconds(jittered as i64)
    }

    async fn post(&self, s: &Subscription, body: String, trace: Option<platform::trace::TraceParent>) -> Result<(), String> {
        let endpoint = s.endpoint.as_deref().ok_or("no endpoint")?;
        // Names are checked by the client's resolver as they are resolved; an address written
        // into the URL is checked here.
        let url = reqwest::Url::parse(endpoint).map_err(|_| "the endpoint is not a URL".to_owned())?;
        if matches!(url.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) | None) {
            self.egress.check(&url).await.map_err(|e| e.to_string())?;
        }
        let at = OffsetDateTime::now_utc().unix_timestamp();
        let mut request = self
            .http
            .post(endpoint)
            .timeout(Duration::from_secs(u64::try_from(s.timeout_secs).unwrap_or(10)))
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json");
        if let Some(secret) = &s.secret {
            request = request.header(SIGNATURE_HEADER, subs::signature(secret, at, body.as_bytes()));
        }
        if let Some(trace) = trace {
            request = request.header(platform::trace::HEADER, trace.to_string());
        }
        for h in &s.headers {
            if let Some((name, value)) = h.split_once(':') {
                request = request.header(name.trim(), value.trim());
            }
        }
        match request.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the endpoint answered {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err(format!("no answer within {} s", s.timeout_secs)),
            Err(e) if refusal(&e).is_some() => Err(refusal(&e).map(|r| r.to_string()).unwrap_or_default()),
            Err(e) if e.is_connect() => Err("could not connect to the endpoint".to_owned()),
            Err(_) => Err("the request to the endpoint failed".to_owned()),
        }
    }

    async fn produce(
        &self,
        s: &Subscription,
        body: String,
        events: &[db::subscriptions::Event],
        trace: Option<platform::trace::TraceParent>,
    ) -> Result<(), String> {
        let topic = self.kafka().topic(&subs::kafka_topic(&s.partner_id));
        self.ensure_topic(&topic).await.map_err(|e| format!("creating {topic}: {e}"))?;
        let first = events.first().map(|e| e.event_number.to_string()).unwrap_or_default();
        let last = events.last().map(|e| e.event_number.to_string()).unwrap_or_default();
        let traceparent = trace.map(|t| t.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "subscription", value: Some(s.id.as_str()) })
            .insert(Header { key: "first_event", value: Some(first.as_str()) })
            .insert(Header { key: "last_event", value: Some(last.as_str()) });
        if let Some(t) = &traceparent {
            headers = headers.insert(Header { key: platform::trace::HEADER, value: Some(t.as_str()) });
        }
        let record = FutureRecord::to(&topic).key(&s.id).payload(&body).headers(headers);
        match self.producer.send(record, KAFKA_DELIVERY_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(format!("kafka: {e}")),
        }
    }

    async fn ensure_topic(&self, topic: &str) -> anyhow::Result<()> {
        if self.known_topics.lock().map(|k| k.contains(topic)).unwrap_or(false) {
            return Ok(());
        }
        let wanted = [(topic.to_owned(), platform::kafka::Retention::Delete(None))];
        platform::kafka::create_with(&self.admin, self.kafka(), &wanted).await?;
        if let Ok(mut k) = self.known_topics.lock() {
            k.insert(topic.to_owned());
        }
        Ok(())
    }
}

/// Resolves names for the notifier's HTTP client and keeps only the addresses the egress policy
/// permits, so that a connection goes to an address that was checked. (IP-literal URLs do not
/// pass through a resolver: [`Notifier::post`] checks those itself.)
struct CheckedResolver {
    policy: EgressPolicy,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = url::Host::Domain(name.as_str());
            let addrs = policy.resolve(&host, 0).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The resolver's refusal, when the client failed because no address of the endpoint may be
/// connected to.
fn refusal(e: &reqwest::Error) -> Option<platform::egress::Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<platform::egress::Refusal>() {
            return Some(r.clone());
        }
        source = s.source();
    }
    None
}

/// A notifier from [`spawn`]: its stop flag, its task, and where its operations listener answers.
pub type Running = platform::ops::Running<tokio::task::JoinHandle<anyhow::Result<()>>>;

/// Starts a notifier task (connects, migrates first) and its operations listener.
pub async fn spawn(config: NotifierConfig) -> anyhow::Result<Running> {
    let pool = db::connect_for_stage(&config.common, (config.concurrency as u32 / 4).clamp(4, 16)).await?;
    db::migrate(&pool).await?;
    let notifier = Notifier::new(config.clone(), pool.clone())?;
    let mut ops = config.common.ops();
    notifier.metrics.register(ops.registry());
    db::observe(&mut ops, &pool);
    ops.watch_kafka(&config.common.kafka)?;
    let metrics = notifier.metrics.clone();
    ops.on_scrape(move || {
        let (metrics, pool) = (metrics.clone(), pool.clone());
        async move { metrics.refresh(&pool).await }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ops_addr = ops.serve(config.common.ops_addr(platform::config::ops_port::NOTIFIER), stop.clone()).await?;
    Ok(platform::ops::Running { stop: stop.clone(), handle: tokio::spawn(notifier.run(stop)), ops_addr })
}
