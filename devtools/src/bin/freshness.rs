//! Freshness benchmark (not part of the test suite): at a steady rate (default 1,000 events/s)
//! a system of record publishes demographics of new members; the time from producing each
//! event to its composite on `fhir.medication-profile.v1` (composer, PostgreSQL, relay, Kafka),
//! and to its notification at a rest-hook endpoint (composer, PostgreSQL, notifier, HTTP), is
//! measured and printed as percentiles. The members are attributed to a partner with one
//! `id-only` rest-hook Subscription before the clock starts. The first 20 seconds of events
//! are sent but not measured (the partner topic is created then, connections run their first
//! statements, and a broker started moments ago compiles its hot paths: the first 30 s after a
//! restart had p99 above 300 ms). Production durability: fsync and synchronous commit on,
//! acks=all everywhere. With `--retention`, retention runs during every other 5 seconds of the
//! measured phase and freshness is reported inside and outside those windows. With
//! `--measure-insights`, every member also has demographics and warfarin before the clock starts, and the
//! measured events add aspirin: each one makes a new composite version and a high-severity
//! interaction, and the time to its `fhir.insights.v1` record is reported too.
//! Run: `scripts/bench freshness [--retention] [--measure-insights]`.

use clap::Parser;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The components' operations listeners on free ports (a demo may hold the default ones).
const ANY_PORT: std::net::SocketAddr = std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);
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
    /// How long to send at the rate before the clock starts, in seconds.
    #[arg(long, default_value_t = 20)]
    warmup_seconds: u64,
    /// Run retention (every window at 0: it removes all it may, as fast as it may) during
    /// alternate 5-second windows of the measured phase, and report freshness inside and outside
    /// them separately: retention's cost to the pipeline, in one run.
    #[arg(long)]
    retention: bool,
    /// Measure insights: members start with warfarin, each measured event adds aspirin (an
    /// interaction), and the time to its record on `fhir.insights.v1` is reported as well.
    #[arg(long)]
    measure_insights: bool,
}

/// The retention windows alternate every this long.
const RETENTION_WINDOW: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init("warn", platform::LogFormat::Text);
    let run = format!("bench_fresh_{}", std::process::id());
    let kafka = platform::KafkaConfig { topic_prefix: format!("{run}."), ..cli.common.kafka.clone() };
    let admin = db::connect(&cli.common.database_url, 1).await?;
    println!("PostgreSQL durability: {}", db::bench::durability(&admin).await?);
    db::create_database(&admin, &run).await?;
    let url = db::url_with_database(&cli.common.database_url, &run)?;

    let mut config = composer::ComposerConfig::parse_from(["composer", "--database-url", &url]);
    config.common.kafka = kafka.clone();
    config.group_id = run.clone();
    config.common.ops_addr = Some(ANY_PORT);
    let composer::Running { stop, thread, .. } = composer::spawn(config).await?;
    let mut relay_config = relay::RelayConfig::parse_from(["relay", "--database-url", &url]);
    relay_config.common.kafka = kafka.clone();
    relay_config.common.ops_addr = Some(ANY_PORT);
    let relay = relay::spawn(relay_config).await?;
    let mut notifier_config = notifier::NotifierConfig::parse_from(["notifier", "--database-url", &url, "--allowed-networks", "127.0.0.0/8"]);
    notifier_config.common.kafka = kafka.clone();
    notifier_config.common.ops_addr = Some(ANY_PORT);
    let notifier = notifier::spawn(notifier_config).await?;
    let total = (cli.rate * cli.seconds) as usize;
    // The warm-up's events are sent the same way but not measured: they pay for what happens
    // once (the partner topic's creation, first statements on new connections, the broker's
    // JIT compiling its hot paths when it was just started).
    let warmup = (cli.rate * cli.warmup_seconds) as usize;
    let producer = devtools::generator::producer(&kafka)?;
    let pool = db::connect(&url, 2).await?;

    // The partner's members and its rest-hook subscription, before the clock starts.
    let hooked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (endpoint, hook_latencies) = rest_hook(hooked.clone(), total).await?;
    let subscription = serde_json::json!({
        "resourceType": "Subscription", "status": "requested", "reason": "freshness benchmark",
        "criteria": fhir::subscriptions::TOPIC_URL,
        "channel": { "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
            "extension": [
                { "url": fhir::subscriptions::EXT_SIGNING_SECRET, "valueString": "ab".repeat(32) },
                { "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count", "valuePositiveInt": 100 }
            ] }
    });
    let limits = fhir::subscriptions::Limits { allow_http: true, min_heartbeat_secs: 1 };
    let subscription =
        fhir::subscriptions::accept(subscription, "bench", limits, time::OffsetDateTime::now_utc()).map_err(|e| anyhow::anyhow!("{e}"))?;
    db::subscriptions::create(&pool, &subscription, i64::MAX).await?;
    let attribution = kafka.topic(platform::topics::ATTRIBUTION);
    let mut acks = Vec::with_capacity(warmup + total);
    for i in 0..warmup + total {
        let member = format!("F{i:07}");
        let payload =
            event("attribution", &member, &format!("AT-{member}"), serde_json::json!({ "partner_id": "bench", "period_start": "2026-01-01" }))?;
        acks.push(enqueue(&producer, &attribution, &member, &payload).await?);
    }
    // With insights, every member has demographics and warfarin before the clock starts.
    let preloaded = if cli.measure_insights { 2 * (warmup + total) } else { 0 };
    if cli.measure_insights {
        for i in 0..warmup + total {
            let member = format!("F{i:07}");
            let events = [
                (platform::topics::DEMOGRAPHICS, "enrollment", member.clone(), serde_json::json!({ "given_name": "Fresh", "sex": "other" })),
                (
                    platform::topics::MEDICATIONS,
                    "rx-claims",
                    format!("RX-W-{member}"),
                    serde_json::json!({ "rxnorm_code": "855332", "status": "active" }),
                ),
            ];
            for (topic, source, record, data) in events {
                acks.push(enqueue(&producer, &kafka.topic(topic), &member, &event(source, &member, &record, data)?).await?);
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await.map_err(|_| anyhow::anyhow!("producer gone"))?.map_err(|(e, _)| anyhow::anyhow!("not acknowledged: {e}"))?;
    }
    while db::offsets::total_position(&pool, &run).await? < (warmup + total + preloaded) as i64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Steady state before the clock: the relay has published what the attributions produced and
    // followed them on the partner topic, and the statistics are as autovacuum keeps them in a
    // database in service (the tables grew from empty within seconds; plans made for empty
    // tables are no plans for 31,000 attributions).
    while db::partner_topics::backlog(&pool, time::OffsetDateTime::now_utc().date()).await? != (0, 0, 0) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db::bench::analyze_pipeline(&pool).await?;
    while db::subscriptions::get(&pool, "bench", &subscription.id).await?.is_none_or(|s| s.status != "active") {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The notifier has delivered what the preparation produced (with --measure-insights, every
    // member's first profile version): measured notifications do not queue behind them.
    loop {
        let queues = db::subscriptions::queues(&pool).await?;
        if queues.unnotified == 0 && queues.partners.iter().all(|p| p.undelivered == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let sent_at: Arc<Mutex<HashMap<String, (Instant, time::OffsetDateTime, bool)>>> = Arc::default();
    let retaining = Arc::new(AtomicBool::new(false));
    let retention_stop = Arc::new(AtomicBool::new(false));
    let mut retention = None;
    let consumer: Arc<StreamConsumer> =
        Arc::new(platform::kafka::client(&kafka)?.set("group.id", &run).set("auto.offset.reset", "earliest").set("fetch.wait.max.ms", "5").create()?);
    consumer.subscribe(&[&kafka.topic(platform::topics::MEDICATION_PROFILE)])?;
    let seen = sent_at.clone();
    let reading = consumer.clone();
    let reader = tokio::spawn(async move {
        let consumer = reading;
        // Total, and its two legs: produced → the composer's change time (`meta.lastUpdated`,
        // taken as its transaction starts), and from there → read from the topic.
        let (mut latencies, mut to_composer, mut to_topic) = (Vec::with_capacity(total), Vec::new(), Vec::new());
        let mut by_retention: [Vec<f64>; 2] = Default::default();
        while latencies.len() < total {
            let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await else { break };
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            if let Some((at, wall, retaining)) = seen.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                let now = time::OffsetDateTime::now_utc();
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                by_retention[usize::from(retaining)].push(at.elapsed().as_secs_f64() * 1000.0);
                let changed = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default()).ok().and_then(|v| {
                    v["meta"]["lastUpdated"]
                        .as_str()
                        .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
                });
                if let Some(changed) = changed {
                    to_composer.push((changed - wall).as_seconds_f64() * 1000.0);
                    to_topic.push((now - changed).as_seconds_f64() * 1000.0);
                }
            }
        }
        (latencies, to_composer, to_topic, by_retention)
    });
    // With insights: the time to each member's record on fhir.insights.v1 (its first, the
    // interaction aspirin brought).
    let insight_sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let insight_reader = if cli.measure_insights {
        let consumer: StreamConsumer = platform::kafka::client(&kafka)?
            .set("group.id", format!("{run}-insights"))
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        consumer.subscribe(&[&kafka.topic(platform::topics::INSIGHTS)])?;
        let seen = insight_sent.clone();
        Some(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total);
            while latencies.len() < total {
                let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await else { break };
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if let Some(at) = seen.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        }))
    } else {
        None
    };
    // The clock starts once the reader owns the topic's partitions (it reads from the start).
    while consumer.assignment().map_or(0, |a| a.count()) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The system of record's producer sends each change as it happens (acks=all, idempotent):
    // linger.ms=1, not the bulk loader's 10 ms.
    let producer = platform::kafka::prompt_producer(&kafka)?;

    let topic = kafka.topic(if cli.measure_insights { platform::topics::MEDICATIONS } else { platform::topics::DEMOGRAPHICS });
    let mut started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / cli.rate));
    for i in 0..warmup + total {
        if i == warmup {
            // The warm-up made the first composites: analyze again once they are stored, as
            // autovacuum does in a database in service. Analyzed while they were still empty,
            // the composer's cached plans scanned `composites` whole for every transaction
            // until autovacuum's next pass, which most runs ended before.
            while db::bench::composites(&pool).await? < warmup as i64 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            db::bench::analyze_pipeline(&pool).await?;
            ticker.reset();
            started = Instant::now();
            if cli.retention {
                retention = Some(retention_windows(url.clone(), retaining.clone(), retention_stop.clone()));
            }
        }
        ticker.tick().await;
        let member = format!("F{i:07}");
        let payload = if cli.measure_insights {
            event("rx-claims", &member, &format!("RX-A-{member}"), serde_json::json!({ "rxnorm_code": "1191", "status": "active" }))?
        } else {
            event("enrollment", &member, &member, serde_json::json!({ "given_name": "Fresh", "sex": "other" }))?
        };
        let now = Instant::now();
        if i >= warmup {
            let on = retaining.load(std::sync::atomic::Ordering::Relaxed);
            sent_at.lock().unwrap_or_else(|p| p.into_inner()).insert(member.clone(), (now, time::OffsetDateTime::now_utc(), on));
            hooked.lock().unwrap_or_else(|p| p.into_inner()).insert(member.clone(), now);
            if cli.measure_insights {
                insight_sent.lock().unwrap_or_else(|p| p.into_inner()).insert(member.clone(), now);
            }
        }
        match producer.send_result(FutureRecord::to(&topic).key(&member).payload(&payload)) {
            Ok(ack) => acks.push(ack),
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
    }
    for ack in acks {
        ack.await.map_err(|_| anyhow::anyhow!("producer gone"))?.map_err(|(e, _)| anyhow::anyhow!("not acknowledged: {e}"))?;
    }
    let sending = started.elapsed();
    retention_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let removed = match retention {
        Some(task) => task.await?,
        None => 0,
    };
    let (mut latencies, mut to_composer, mut to_topic, mut by_retention) = reader.await?;
    let mut hooks = tokio::time::timeout(Duration::from_secs(120), hook_latencies).await???;
    let mut insights = match insight_reader {
        Some(reader) => reader.await?,
        None => Vec::new(),
    };
    insights.sort_by(f64::total_cmp);
    composer::stop(&stop, thread).await?;
    relay.stop().await?;
    notifier.stop().await?;

    let [without, with] = &mut by_retention;
    for l in [&mut latencies, &mut hooks, &mut to_composer, &mut to_topic, without, with] {
        l.sort_by(f64::total_cmp);
    }
    let pct_of = |l: &[f64], p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
    let pct = |p: f64| pct_of(&latencies, p);
    println!(
        "sent {warmup} unmeasured events, then {total} in {:.1} s ({:.0} events/s); {} of the {total} measured composites seen on the topic",
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
    println!(
        "  of which: produced → composer's transaction starts p50 {:.1} ms, p99 {:.1} ms; from there → read from the topic p50 {:.1} ms, p99 {:.1} ms (ms-precision clock)",
        pct_of(&to_composer, 0.50),
        pct_of(&to_composer, 0.99),
        pct_of(&to_topic, 0.50),
        pct_of(&to_topic, 0.99)
    );
    println!(
        "event produced → notification at a rest-hook endpoint ({} seen): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        hooks.len(),
        pct_of(&hooks, 0.50),
        pct_of(&hooks, 0.90),
        pct_of(&hooks, 0.99),
        hooks.last().copied().unwrap_or(f64::NAN)
    );
    if cli.measure_insights {
        println!(
            "event produced → insight on fhir.insights.v1 ({} seen): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            insights.len(),
            pct_of(&insights, 0.50),
            pct_of(&insights, 0.90),
            pct_of(&insights, 0.99),
            insights.last().copied().unwrap_or(f64::NAN)
        );
    }
    if cli.retention {
        let (without, with) = (&by_retention[0], &by_retention[1]);
        println!(
            "retention: composite freshness p50/p99 outside its windows {:.1}/{:.1} ms ({} events), inside them {:.1}/{:.1} ms ({} events): p99 {:+.1} ms",
            pct_of(without, 0.50),
            pct_of(without, 0.99),
            without.len(),
            pct_of(with, 0.50),
            pct_of(with, 0.99),
            with.len(),
            pct_of(with, 0.99) - pct_of(without, 0.99)
        );
        println!("retention removed {removed} rows in its windows");
    }
    pool.close().await;
    db::bench::drop_database(&admin, &run).await?;
    platform::kafka::delete_namespace(&kafka).await?;
    Ok(())
}

/// A native-envelope upsert (version 1) of `record` of `member` by `source`.
fn event(source: &str, member: &str, record: &str, data: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(), "op": "upsert", "source": source,
        "occurred_at": "2026-11-27T00:00:00Z", "version": 1, "member_id": member, "record_id": record, "data": data }))?)
}

/// Enqueues one record, waiting while the producer's queue is full; returns its acknowledgement.
async fn enqueue(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
            Ok(ack) => return Ok(ack),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
    }
}

/// Runs retention on `url` with every window at 0 (all it may remove, at once) during every
/// other [`RETENTION_WINDOW`] (`on` says when) until `stop`; returns the rows it removed.
fn retention_windows(url: String, on: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let Ok(pool) = db::connect(&url, 2).await else { return 0 };
        let config = relay::retention::RetentionConfig {
            retention_interval_secs: 0,
            retention_applied_events_hours: 0,
            retention_published_outbox_hours: 0,
            retention_subscription_events_hours: 0,
            retention_history_days: 0,
            retention_audit_months: 0,
            retention_audit_export_dir: None,
            ..relay::retention::RetentionConfig::default()
        };
        let metrics = relay::retention::Metrics::default();
        let (start, mut removed) = (Instant::now(), 0);
        while !stop.load(Relaxed) {
            let retaining = (start.elapsed().as_secs() / RETENTION_WINDOW.as_secs()) % 2 == 1;
            on.store(retaining, Relaxed);
            if retaining {
                match relay::retention::run(&pool, &config, "http://bench/fhir", &metrics).await {
                    Ok(report) => removed += report.deleted.values().sum::<u64>(),
                    Err(e) => eprintln!("retention: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        on.store(false, Relaxed);
        pool.close().await;
        removed
    })
}

/// A minimal HTTP/1.1 endpoint (keep-alive) that answers 200 to every POST and records, for
/// each member named in a notification, the time since its event was produced. Returns its URL
/// and the latencies once `expected` members were seen (or the sender went quiet for 30 s).
async fn rest_hook(
    sent: Arc<Mutex<HashMap<String, Instant>>>,
    expected: usize,
) -> anyhow::Result<(String, tokio::task::JoinHandle<anyhow::Result<Vec<f64>>>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (sent, tx) = (sent.clone(), tx.clone());
            tokio::spawn(async move {
                let mut reader = BufReader::new(socket);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let now = Instant::now();
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        for e in v["entry"][0]["resource"]["notificationEvent"].as_array().into_iter().flatten() {
                            let member = e["focus"]["reference"].as_str().and_then(|f| f.split('/').rev().nth(1)).unwrap_or_default();
                            if let Some(at) = sent.lock().unwrap_or_else(|p| p.into_inner()).remove(member) {
                                let _ = tx.send((now - at).as_secs_f64() * 1000.0);
                            }
                        }
                    }
                    if reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let collect = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(expected);
        while latencies.len() < expected {
            let quiet = if latencies.is_empty() { Duration::from_secs(600) } else { Duration::from_secs(30) };
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(l)) => latencies.push(l),
                _ => break,
            }
        }
        Ok(latencies)
    });
    Ok((url, collect))
}
