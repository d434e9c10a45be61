//! Freshness benchmark (not part of the test suite): at a steady rate (default 1,000 events/s)
//! a system of record publishes demographics of new members; the time from producing each
//! event to its composite on `fhir.medication-profile.v1` (composer, PostgreSQL, relay, Kafka)
//! is measured and printed as percentiles. Production durability: fsync and synchronous commit
//! on, acks=all everywhere. Run: `scripts/bench freshness`.

use clap::Parser;
use composer::generator;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    common: platform::CommonConfig,
    /// Events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init("warn", platform::LogFormat::Text);
    let run = format!("bench_fresh_{}", std::process::id());
    let kafka = platform::KafkaConfig { bootstrap_servers: cli.common.kafka.bootstrap_servers.clone(), topic_prefix: format!("{run}.") };
    let admin = db::connect(&cli.common.database_url, 1).await?;
    println!("PostgreSQL durability: {}", db::bench::durability(&admin).await?);
    db::create_database(&admin, &run).await?;
    let url = db::url_with_database(&cli.common.database_url, &run)?;

    let mut config = composer::ComposerConfig::parse_from(["composer", "--database-url", &url]);
    config.common.kafka = kafka.clone();
    config.group_id = run.clone();
    let (stop, _metrics, thread) = composer::spawn(config).await?;
    let mut relay_config = composer::relay::RelayConfig::parse_from(["relay", "--database-url", &url]);
    relay_config.common.kafka = kafka.clone();
    let (relay_stop, relay) = composer::relay::spawn(relay_config).await?;

    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", &run)
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    consumer.subscribe(&[&kafka.topic(platform::topics::MEDICATION_PROFILE)])?;
    let total = (cli.rate * cli.seconds) as usize;
    let seen = sent_at.clone();
    let reader = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await else { break };
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            if let Some(at) = seen.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        latencies
    });
    tokio::time::sleep(Duration::from_secs(2)).await; // the consumer joins its group

    let producer = generator::producer(&kafka)?;
    let topic = kafka.topic(platform::topics::DEMOGRAPHICS);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / cli.rate));
    let mut acks = Vec::with_capacity(total);
    for i in 0..total {
        ticker.tick().await;
        let member = format!("F{i:07}");
        let payload = serde_json::to_vec(&serde_json::json!({
            "event_id": uuid::Uuid::new_v4().to_string(), "op": "upsert", "source": "enrollment",
            "occurred_at": "2026-11-27T00:00:00Z", "version": 1, "member_id": member, "record_id": member,
            "data": { "given_name": "Fresh", "sex": "other" } }))?;
        sent_at.lock().unwrap_or_else(|p| p.into_inner()).insert(member.clone(), Instant::now());
        match producer.send_result(FutureRecord::to(&topic).key(&member).payload(&payload)) {
            Ok(ack) => acks.push(ack),
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
    }
    for ack in acks {
        ack.await.map_err(|_| anyhow::anyhow!("producer gone"))?.map_err(|(e, _)| anyhow::anyhow!("not acknowledged: {e}"))?;
    }
    let sending = started.elapsed();
    let mut latencies = reader.await?;
    composer::stop(&stop, thread).await?;
    relay_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    relay.await??;

    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
    println!(
        "sent {total} events in {:.1} s ({:.0} events/s); {} composites seen on the topic",
        sending.as_secs_f64(),
        total as f64 / sending.as_secs_f64(),
        latencies.len()
    );
    println!(
        "event produced → composite on fhir.medication-profile.v1: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    db::bench::drop_database(&admin, &run).await?;
    Ok(())
}
