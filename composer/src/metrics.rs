//! What the composer exports on its operations listener (`fhir_composer_*`): events by outcome,
//! dead letters by reason, batch sizes and apply latency, composite versions, and the consumer
//! lag per topic and partition (the broker's high watermark less the position stored in
//! PostgreSQL, read at scrape time).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `applied`, `stale` (an older version than the stored one), `duplicate` (an event id
    /// applied before).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `Rejection::class()`: `invalid-json`, `schema`, `mapping`, …
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The contract name of the topic (without the deployment's prefix).
    pub topic: String,
    pub partition: i32,
}

/// Counters since start, readable while the composer runs (tests read them too).
#[derive(Debug)]
pub struct Metrics {
    /// Messages of applied batches, dead letters included.
    pub messages: Counter,
    events: Family<OutcomeLabel, Counter>,
    dead_letters: Family<ReasonLabel, Counter>,
    pub composite_versions: Counter,
    /// DetectedIssue versions written (insights that appeared, changed or stopped holding).
    pub insight_versions: Counter,
    /// Active medications evaluated whose product the knowledge base does not know.
    pub unknown_products: Counter,
    /// Members whose insights the passing of time changed, looked at again on schedule.
    pub rechecked: Counter,
    /// Records a failing batch was isolated to and dead-lettered (counted as dead letters too).
    pub isolated: Counter,
    pub batch_size: Histogram,
    apply_seconds: Histogram,
    pub lag: Family<PartitionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            messages: Counter::default(),
            events: Family::default(),
            dead_letters: Family::default(),
            composite_versions: Counter::default(),
            insight_versions: Counter::default(),
            unknown_products: Counter::default(),
            rechecked: Counter::default(),
            isolated: Counter::default(),
            batch_size: Histogram::new(platform::ops::size_buckets()),
            apply_seconds: Histogram::new(platform::ops::latency_buckets()),
            lag: Family::default(),
        };
        // Every series exists from the start (at 0), so rates and alerts see the first one.
        for outcome in ["applied", "stale", "duplicate"] {
            let _ = metrics.events.get_or_create(&OutcomeLabel { outcome });
        }
        for reason in schemas::Rejection::CLASSES {
            let _ = metrics.dead_letters.get_or_create(&ReasonLabel { reason });
        }
        metrics
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("composer");
        r.register("messages", "Messages of applied batches (dead letters included)", self.messages.clone());
        r.register("events", "Events by outcome: applied, stale (older than stored), duplicate (applied before)", self.events.clone());
        r.register("dead_letters", "Messages dead-lettered to sor.dlq.v1, by reason", self.dead_letters.clone());
        r.register("composite_versions", "Composite versions written", self.composite_versions.clone());
        r.register(
            "insight_versions",
            "DetectedIssue versions written (insights that appeared, changed or stopped holding)",
            self.insight_versions.clone(),
        );
        r.register(
            "unknown_products",
            "Active medications evaluated whose product code the insights' knowledge base does not know (no insight)",
            self.unknown_products.clone(),
        );
        r.register("insight_rechecks", "Members looked at again because time alone can change their insights (refill gaps)", self.rechecked.clone());
        r.register("isolated", "Records a failing batch was narrowed down to (and dead-lettered)", self.isolated.clone());
        r.register("batch_size", "Messages per applied batch", self.batch_size.clone());
        r.register("apply_seconds", "Time to apply one batch in its PostgreSQL transaction", self.apply_seconds.clone());
        r.register("consumer_lag", "Messages on the broker past the composer's stored position", self.lag.clone());
    }

    pub(crate) fn applied(&self, applied: &crate::apply::Applied, took: Duration) {
        self.messages.inc_by(applied.messages as u64);
        let fresh = applied.messages.saturating_sub(applied.dead_letters + applied.duplicates + applied.stale);
        self.events.get_or_create(&OutcomeLabel { outcome: "applied" }).inc_by(fresh as u64);
        self.events.get_or_create(&OutcomeLabel { outcome: "stale" }).inc_by(applied.stale as u64);
        self.events.get_or_create(&OutcomeLabel { outcome: "duplicate" }).inc_by(applied.duplicates as u64);
        self.composite_versions.inc_by(applied.composite_versions as u64);
        self.insight_versions.inc_by(applied.insight_versions as u64);
        self.unknown_products.inc_by(applied.unknown_products as u64);
        self.batch_size.observe(applied.messages as f64);
        self.apply_seconds.observe(took.as_secs_f64());
    }

    /// One dead letter the broker acknowledged.
    pub(crate) fn dead_lettered(&self, reason: &'static str) {
        self.dead_letters.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Dead letters since start, every reason.
    pub fn dead_letters(&self) -> u64 {
        schemas::Rejection::CLASSES.iter().map(|&reason| self.dead_letters.get_or_create(&ReasonLabel { reason }).get()).sum()
    }

    /// Events since start with `outcome` (`applied`, `stale`, `duplicate`).
    pub fn events(&self, outcome: &'static str) -> u64 {
        self.events.get_or_create(&OutcomeLabel { outcome }).get()
    }
}

/// Sets the consumer lag gauges: per partition of the systems-of-record topics, the high
/// watermark less the position `group` stored (a partition with none: everything retained).
/// With transactional producers a partition's last offset is a commit marker, so a caught-up
/// partition reads 1.
pub async fn refresh_lag(
    metrics: &Metrics,
    pool: &db::Pool,
    kafka: &platform::KafkaConfig,
    observer: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    group: &str,
) -> anyhow::Result<()> {
    let topics: Vec<String> = platform::topics::SOR_TOPICS.iter().map(|t| kafka.topic(t)).collect();
    let stored = db::offsets::load_offsets(pool, group, &topics).await?;
    let marks = {
        let topics = topics.clone();
        tokio::task::spawn_blocking(move || platform::kafka::watermarks(&observer, &topics, Duration::from_secs(2))).await??
    };
    for (topic, partition, low, high) in marks {
        let position = stored.iter().find(|s| s.topic == topic && s.partition == partition).map_or(low, |s| s.next_offset.max(low));
        let labels = PartitionLabels { topic: kafka.contract_name(&topic).unwrap_or(&topic).to_owned(), partition };
        metrics.lag.get_or_create(&labels).set((high - position).max(0));
    }
    Ok(())
}
