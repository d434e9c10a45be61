//! What the notifier exports on its operations listener: notifications by channel, kind and
//! outcome with their latency, events fanned out to subscription queues, and (read from
//! PostgreSQL at scrape time) the composite versions not yet fanned out and, per partner and
//! subscription status, the events not yet delivered. Labels are bounded: channels, kinds,
//! outcomes, statuses and the registered partners; never a subscription or member id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `rest-hook` or `kafka`.
    pub channel: &'static str,
    /// `handshake`, `heartbeat` or `event-notification`.
    pub kind: &'static str,
    /// `delivered` or `failed`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    pub channel: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub partner: String,
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    deliveries: Family<DeliveryLabels, Counter>,
    delivery_seconds: Family<ChannelLabel, Histogram>,
    pub events_delivered: Counter,
    pub events_queued: Counter,
    unnotified: Gauge,
    queue_depth: Family<QueueLabels, Gauge>,
    failures: Family<QueueLabels, Gauge>,
}

pub const CHANNELS: [&str; 2] = ["rest-hook", "kafka"];

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            deliveries: Family::default(),
            delivery_seconds: Family::new_with_constructor(|| Histogram::new(platform::ops::latency_buckets())),
            events_delivered: Counter::default(),
            events_queued: Counter::default(),
            unnotified: Gauge::default(),
            queue_depth: Family::default(),
            failures: Family::default(),
        };
        for channel in CHANNELS {
            let _ = m.delivery_seconds.get_or_create(&ChannelLabel { channel });
            for outcome in ["delivered", "failed"] {
                let _ = m.deliveries.get_or_create(&DeliveryLabels { channel, kind: "event-notification", outcome });
            }
        }
        m
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("notifier");
        r.register("deliveries", "Notifications sent, by channel, kind and outcome", self.deliveries.clone());
        r.register(
            "delivery_seconds",
            "Time to deliver one notification (until the endpoint or Kafka acknowledged it)",
            self.delivery_seconds.clone(),
        );
        r.register("events_delivered", "Subscription events delivered in notifications", self.events_delivered.clone());
        r.register("events_queued", "Subscription events queued by fan-out", self.events_queued.clone());
        registry.register("outbox_unnotified", "Composite versions not yet turned into subscription events", self.unnotified.clone());
        registry.register(
            "subscription_queue_depth",
            "Subscription events not yet delivered, per partner and subscription status",
            self.queue_depth.clone(),
        );
        registry.register(
            "subscription_delivery_failures",
            "Failed notifications recorded on the subscriptions, per partner and status",
            self.failures.clone(),
        );
    }

    pub(crate) fn delivered(&self, channel: &'static str, kind: &'static str, outcome: &'static str, events: usize, took: std::time::Duration) {
        self.deliveries.get_or_create(&DeliveryLabels { channel, kind, outcome }).inc();
        self.delivery_seconds.get_or_create(&ChannelLabel { channel }).observe(took.as_secs_f64());
        if outcome == "delivered" {
            self.events_delivered.inc_by(events as u64);
        }
    }

    /// Notifications since start with these labels.
    pub fn deliveries(&self, channel: &'static str, kind: &'static str, outcome: &'static str) -> u64 {
        self.deliveries.get_or_create(&DeliveryLabels { channel, kind, outcome }).get()
    }

    pub async fn refresh(&self, pool: &db::Pool) {
        match db::subscriptions::queues(pool).await {
            Ok(queues) => {
                self.unnotified.set(queues.unnotified);
                // A partner or status that is gone reads 0 rather than its last value.
                self.queue_depth.clear();
                self.failures.clear();
                for q in queues.partners {
                    let labels = QueueLabels { partner: q.partner_id, status: q.status };
                    self.queue_depth.get_or_create(&labels).set(q.undelivered);
                    self.failures.get_or_create(&labels).set(q.delivery_failures);
                }
            }
            Err(e) => tracing::warn!(error = %e, "subscription queues not refreshed"),
        }
    }
}
