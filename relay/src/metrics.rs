//! What the relay exports on its operations listener: records acknowledged by the broker per
//! topic family, the time from enqueueing a batch to its last acknowledgement, records parked,
//! and the outbox's lag (read from PostgreSQL at scrape time).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// `fhir.medication-profile.v1`, `fhir.partner.*` (every partner's topics together: one
    /// series whatever the number of partners) or `partner.inbound.v1`.
    pub topic: &'static str,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    published: Family<TopicLabel, Counter>,
    pub parked: Counter,
    publish_seconds: Histogram,
    outbox_unpublished: Gauge,
    outbox_oldest: Gauge<f64, AtomicU64>,
    outbox_parked: Gauge,
    /// 1 while this relay has the lead (of several relays on one database, one publishes).
    pub leading: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            published: Family::default(),
            parked: Counter::default(),
            publish_seconds: Histogram::new(platform::ops::latency_buckets()),
            outbox_unpublished: Gauge::default(),
            outbox_oldest: Gauge::default(),
            outbox_parked: Gauge::default(),
            leading: Gauge::default(),
        };
        for topic in [platform::topics::MEDICATION_PROFILE, PARTNER_TOPICS, platform::topics::PARTNER_INBOUND] {
            let _ = m.published.get_or_create(&TopicLabel { topic });
        }
        m
    }
}

const PARTNER_TOPICS: &str = "fhir.partner.*";

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("relay");
        r.register("records_published", "Records the broker acknowledged, by topic family", self.published.clone());
        r.register("records_parked", "Records the broker refused for what they are (parked for fhirctl outbox)", self.parked.clone());
        r.register("leading", "1 while this relay has the lead and publishes; 0 while it stands by", self.leading.clone());
        r.register("publish_seconds", "From enqueueing a batch to the broker's last acknowledgement", self.publish_seconds.clone());
        registry.register("outbox_unpublished", "Outbox rows not yet acknowledged by Kafka (parked ones apart)", self.outbox_unpublished.clone());
        registry.register("outbox_oldest_unpublished_seconds", "Age of the oldest of them (0 when none)", self.outbox_oldest.clone());
        registry.register("outbox_parked", "Outbox rows the relay parked for an operator (fhirctl outbox)", self.outbox_parked.clone());
    }

    /// A batch acknowledged after `took`: each record's contract topic, and whether it was
    /// refused.
    pub(crate) fn sent<'a>(&self, topics: impl Iterator<Item = (Option<&'a str>, bool)>, took: std::time::Duration) {
        self.publish_seconds.observe(took.as_secs_f64());
        // Counted per batch, then added: one lookup per family, not one per record.
        let (mut main, mut inbound, mut partner, mut parked) = (0, 0, 0, 0);
        for (topic, refused) in topics {
            match topic {
                _ if refused => parked += 1,
                Some(platform::topics::MEDICATION_PROFILE) => main += 1,
                Some(platform::topics::PARTNER_INBOUND) => inbound += 1,
                _ => partner += 1,
            }
        }
        self.parked.inc_by(parked);
        for (topic, n) in [(platform::topics::MEDICATION_PROFILE, main), (platform::topics::PARTNER_INBOUND, inbound), (PARTNER_TOPICS, partner)] {
            if n > 0 {
                self.published.get_or_create(&TopicLabel { topic }).inc_by(n);
            }
        }
    }

    /// Records acknowledged on `topic` (a contract name or `fhir.partner.*`) since start.
    pub fn published(&self, topic: &'static str) -> u64 {
        self.published.get_or_create(&TopicLabel { topic }).get()
    }

    pub async fn refresh(&self, pool: &db::Pool) {
        match db::outbox::lag(pool).await {
            Ok(lag) => {
                self.outbox_unpublished.set(lag.unpublished);
                self.outbox_oldest.set(lag.oldest_secs);
                self.outbox_parked.set(lag.parked);
            }
            Err(e) => tracing::warn!(error = %e, "outbox lag not refreshed"),
        }
    }
}
