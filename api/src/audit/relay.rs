//! Publishes the audit trail to `audit.events.v1`, in the order of the transactions that wrote
//! it, moving its cursor only after the broker acknowledged.

use db::audit::AuditRow;
use fhir::audit::audit_event_json;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// Publishes audit events to `audit.events.v1` (key: the partner id, `-` when unauthenticated;
/// value: the AuditEvent; header `event_id`: the audit id), moving past events only after the
/// broker acknowledged them. Runs until the process ends.
pub fn spawn_relay(pool: db::Pool, kafka: platform::KafkaConfig, base_url: String) {
    tokio::spawn(async move {
        let topic = kafka.topic(platform::topics::AUDIT_EVENTS);
        let producer = platform::kafka::producer(&kafka).and_then(|mut config| {
            config
                .set("linger.ms", "5")
                // AuditEvents repeat most of their text: compressed, the broker writes (and the
                // kernel later writes back, on the disk PostgreSQL's WAL may share) about a
                // fifteenth of the bytes. As the composer's relay does.
                .set("compression.type", "zstd")
                .set("log_level", "3");
            Ok(config.create::<FutureProducer>()?)
        });
        let producer = match producer {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "audit relay: cannot create a Kafka producer; audit events wait on the trail");
                return;
            }
        };
        let mut topic_ready = false;
        loop {
            if !topic_ready {
                topic_ready = match platform::kafka::create(&kafka, &[(topic.clone(), platform::kafka::Retention::Delete(None))]).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "audit relay: cannot create the audit topic");
                        false
                    }
                };
            }
            // A full claim means more are waiting; otherwise let the next group gather, so that
            // relaying costs a few transactions (and fsyncs) a second, not one per request.
            let pause = match relay_once(&pool, &producer, &topic, &base_url).await {
                Ok(n) if n == RELAY_CLAIM => Duration::ZERO,
                Ok(0) => Duration::from_millis(250),
                Ok(_) => Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "audit relay: publishing failed; will retry");
                    Duration::from_secs(2)
                }
            };
            tokio::time::sleep(pause).await;
        }
    });
}

/// How long the relay waits for the producer to take (and the broker to acknowledge) an event.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Most audit events one relay transaction publishes.
const RELAY_CLAIM: usize = 500;

async fn relay_once(pool: &db::Pool, producer: &FutureProducer, topic: &str, base_url: &str) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let db::audit::Claim { rows, after } = db::audit::claim_unpublished(&mut tx, RELAY_CLAIM as i64).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Building the AuditEvents and handing them to the producer takes milliseconds for a full
    // claim: off the request workers, so that no request waits behind it.
    let published = rows.len();
    let (producer_, topic_, base_url_) = (producer.clone(), topic.to_owned(), base_url.to_owned());
    let deliveries = tokio::task::spawn_blocking(move || enqueue(&producer_, &topic_, &base_url_, &rows)).await??;
    for result in futures::future::join_all(deliveries).await {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("audit event not acknowledged: {e}"),
            Err(_) => anyhow::bail!("audit event not acknowledged: the producer was dropped"),
        }
    }
    db::audit::mark_published(&mut tx, after).await?;
    tx.commit().await?;
    Ok(published)
}

/// Hands each row, as an AuditEvent, to the producer (waiting while its queue is full, for as
/// long as a send may take); the futures resolve when the broker acknowledged them.
fn enqueue(producer: &FutureProducer, topic: &str, base_url: &str, rows: &[AuditRow]) -> anyhow::Result<Vec<DeliveryFuture>> {
    let deadline = std::time::Instant::now() + SEND_TIMEOUT;
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in rows {
        let key = row.record.partner_id.as_deref().unwrap_or("-");
        let (value, id) = (audit_event_json(row, base_url), row.id.to_string());
        let headers = OwnedHeaders::new().insert(Header { key: "event_id", value: Some(id.as_str()) });
        let mut record = FutureRecord::to(topic).key(key).payload(&value).headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) if std::time::Instant::now() < deadline => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => anyhow::bail!("audit event not accepted by the producer: {e}"),
            }
        }
    }
    Ok(deliveries)
}
