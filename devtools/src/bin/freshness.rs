//! Freshness benchmark (not part of the test suite): at a steady rate (default 1,000 events/s)
//! a system of record publishes demographics of new members; the time from producing each
//! event to its composite on `fhir.medication-profile.v1` (composer, PostgreSQL, relay, Kafka),
//! and to its notification at a rest-hook endpoint (composer, PostgreSQL, notifier, HTTP), is
//! measured and printed as percentiles, with the CPU time each process used per event (read
//! from `/proc`: the composer, relay, notifier and API as the child processes a deployment runs,
//! every PostgreSQL process, the Kafka broker, and this program, the load, apart). The members
//! are attributed to a partner with one `id-only` rest-hook Subscription before the clock
//! starts. The first 20 seconds of events are sent but not measured (the partner topic is
//! created then, connections run their first statements, and a broker started moments ago
//! compiles its hot paths: the first 30 s after a restart had p99 above 300 ms). Production
//! durability: fsync and synchronous commit on, acks=all everywhere. With `--sweep`, shorter
//! phases at other rates follow and the rate at which p99 crosses 100 ms is reported. With
//! `--retention`, retention runs during every other 5 seconds of the measured phase and
//! freshness is reported inside and outside those windows. With `--measure-insights`, every
//! member also has demographics and warfarin before the clock starts, and the measured events
//! add aspirin: each one makes a new composite version and a high-severity interaction, and the
//! time to its `fhir.insights.v1` record is reported too. `--components DIR` runs another
//! build's component binaries under the same load (a same-session comparison).
//! Run: `scripts/bench freshness [--sweep 1500,2000,3000] [--retention] [--measure-insights]`.

use clap::Parser;
use devtools::cpu;
use devtools::stats::percentile as pct;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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
    /// How long to send at the rate before the clock starts, in seconds.
    #[arg(long, default_value_t = 20)]
    warmup_seconds: u64,
    /// After the measured phase, a phase at each of these rates (events/s), to find where p99
    /// crosses 100 ms.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<u64>,
    /// How long each sweep phase sends, in seconds.
    #[arg(long, default_value_t = 10)]
    sweep_seconds: u64,
    /// The directory of the component binaries to run (default: this program's own, the same
    /// build); another build's release directory compares the two under one load.
    #[arg(long)]
    components: Option<PathBuf>,
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

/// Freshness above this is where the sweep says the platform stops keeping up.
const SWEEP_LIMIT_MS: f64 = 100.0;

/// The platform's processes in the CPU report, in order; the load generator is reported apart.
const PLATFORM: [&str; 6] = ["composer", "relay", "notifier", "api", "postgresql", "kafka"];
const LOAD: &str = "load (this program)";

/// The members sent and not yet seen at one delivery point, and the latencies (ms) of those
/// seen, by phase.
#[derive(Default)]
struct Track {
    pending: Mutex<HashMap<String, (Instant, usize)>>,
    seen: Mutex<Vec<Vec<f64>>>,
}

impl Track {
    fn expect(&self, member: &str, at: Instant, phase: usize) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(member.to_owned(), (at, phase));
    }

    /// Records `member`'s arrival now and returns its latency; `None` when it was not expected
    /// (unmeasured, or seen before).
    fn arrived(&self, member: &str) -> Option<f64> {
        let (at, phase) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(member)?;
        let latency = at.elapsed().as_secs_f64() * 1000.0;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() <= phase {
            seen.resize(phase + 1, Vec::new());
        }
        seen[phase].push(latency);
        Some(latency)
    }

    fn count(&self, phase: usize) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(phase).map_or(0, Vec::len)
    }

    /// Waits until `expected` members of `phase` arrived (or none did for 30 s); their
    /// latencies, sorted.
    async fn wait(&self, phase: usize, expected: usize) -> Vec<f64> {
        let (mut last, mut since) = (self.count(phase), Instant::now());
        while last < expected && since.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.count(phase);
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        let mut latencies = self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(phase).cloned().unwrap_or_default();
        latencies.sort_by(f64::total_cmp);
        latencies
    }
}

fn summary(l: &[f64]) -> String {
    format!("p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms", pct(l, 0.50), pct(l, 0.90), pct(l, 0.99), l.last().copied().unwrap_or(f64::NAN))
}

/// A component as a child process, configured through its environment as a deployment is.
struct Child {
    name: &'static str,
    process: std::process::Child,
    ops: String,
}

impl Child {
    fn spawn(dir: &Path, name: &'static str, url: &str, kafka: &platform::KafkaConfig, env: &[(&str, String)]) -> anyhow::Result<Child> {
        let ops = free_address()?;
        let binary = dir.join(name);
        let process = std::process::Command::new(&binary)
            .env("DATABASE_URL", url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
            .env("KAFKA_TOPIC_PREFIX", &kafka.topic_prefix)
            .env("LOG_LEVEL", "warn")
            .env("OPS_ADDR", &ops)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("{}: {e}", binary.display()))?;
        Ok(Child { name, process, ops: format!("http://{ops}") })
    }

    /// Waits until its `/ready` answers 200.
    async fn ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.process.try_wait()? {
                anyhow::bail!("{} exited: {status}", self.name);
            }
            if get_status(&format!("{}/ready", self.ops)).await == Some(200) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{} not ready within 120 s", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, as a deployment stops it, and waits for it to finish.
    fn stop(mut self) -> anyhow::Result<()> {
        std::process::Command::new("kill").args(["-TERM", &self.process.id().to_string()]).status()?;
        let status = self.process.wait()?;
        anyhow::ensure!(status.success(), "{} stopped with {status}", self.name);
        Ok(())
    }
}

/// A free loopback address (bound, then released for the child to take).
fn free_address() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

/// The status of an HTTP GET of `http://host:port/path`, enough for `/ready` (no HTTP client
/// dependency for one request).
async fn get_status(url: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/')?);
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// One measured phase's figures.
struct Phase {
    rate: u64,
    achieved: f64,
    profile: Vec<f64>,
    hooks: Vec<f64>,
    insights: Vec<f64>,
    usage: cpu::Usage,
    events: usize,
}

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

    // The components as a deployment runs them: one process each.
    let dir = match &cli.components {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?.parent().ok_or_else(|| anyhow::anyhow!("no directory"))?.to_path_buf(),
    };
    println!("components from {}", dir.display());
    let mut composer = Child::spawn(&dir, "composer", &url, &kafka, &[("COMPOSER_GROUP_ID", run.clone())])?;
    composer.ready().await?; // it migrates the new database
    let mut children = vec![composer];
    for (name, env) in [
        ("relay", vec![]),
        ("notifier", vec![("SUBSCRIPTION_ALLOWED_NETWORKS", "127.0.0.0/8".to_owned())]),
        ("api", vec![("HTTP_BIND", free_address()?)]),
    ] {
        let mut child = Child::spawn(&dir, name, &url, &kafka, &env)?;
        child.ready().await?;
        children.push(child);
    }
    let mut groups: Vec<(String, cpu::Group)> = children.iter().map(|c| (c.name.to_owned(), cpu::Group::Pid(c.process.id()))).collect();
    groups.push(("postgresql".into(), cpu::Group::Comm("postgres")));
    groups.push(("kafka".into(), cpu::Group::CommandLine("kafka.Kafka")));
    groups.push((LOAD.into(), cpu::Group::Pid(std::process::id())));

    let measured = std::iter::once((cli.rate, cli.seconds)).chain(cli.sweep.iter().map(|r| (*r, cli.sweep_seconds))).collect::<Vec<_>>();
    let total: usize = measured.iter().map(|(rate, secs)| (rate * secs) as usize).sum();
    // The warm-up's events are sent the same way but not measured: they pay for what happens
    // once (the partner topic's creation, first statements on new connections, the broker's
    // JIT compiling its hot paths when it was just started).
    let warmup = (cli.rate * cli.warmup_seconds) as usize;
    let producer = devtools::generator::producer(&kafka)?;
    let pool = db::connect(&url, 2).await?;

    // The partner's members and its rest-hook subscription, before the clock starts.
    let profile = Arc::new(Track::default());
    let hooked = Arc::new(Track::default());
    let insight = Arc::new(Track::default());
    let endpoint = rest_hook(hooked.clone()).await?;
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

    // The main phase's sending time and retention flag of each member, for the legs and the
    // retention split.
    let sent_wall: Arc<Mutex<HashMap<String, (time::OffsetDateTime, bool)>>> = Arc::default();
    let retaining = Arc::new(AtomicBool::new(false));
    let retention_stop = Arc::new(AtomicBool::new(false));
    let mut retention = None;
    // A partner's consumer: a fetch returns as soon as a record arrives (fetch.min.bytes=1), so
    // its wait bounds only how often an idle consumer asks the broker (a 5 ms wait cost the
    // broker a fetch request per consumer every 5 ms, which counted as the platform's CPU).
    let consumer: Arc<StreamConsumer> = Arc::new(
        platform::kafka::client(&kafka)?.set("group.id", &run).set("auto.offset.reset", "earliest").set("fetch.wait.max.ms", "100").create()?,
    );
    consumer.subscribe(&[&kafka.topic(platform::topics::MEDICATION_PROFILE)])?;
    // The main phase's legs: produced → the composer's change time (`meta.lastUpdated`, taken
    // as its transaction starts), from there → read from the topic, and the part of that from the
    // relay's send (the record's timestamp) → read (its Kafka transaction and the consumer's
    // fetch); and its latencies inside and outside retention's windows.
    type Legs = (Vec<f64>, Vec<f64>, Vec<f64>, [Vec<f64>; 2]);
    let legs: Arc<Mutex<Legs>> = Arc::default();
    {
        let (consumer, profile, sent_wall, legs) = (consumer.clone(), profile.clone(), sent_wall.clone(), legs.clone());
        tokio::spawn(async move {
            while let Ok(m) = consumer.recv().await {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let Some(latency) = profile.arrived(&key) else { continue };
                let Some((wall, retaining)) = sent_wall.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) else { continue };
                let now = time::OffsetDateTime::now_utc();
                let changed = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default()).ok().and_then(|v| {
                    v["meta"]["lastUpdated"]
                        .as_str()
                        .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
                });
                let sent_by_relay =
                    m.timestamp().to_millis().and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok());
                let mut legs = legs.lock().unwrap_or_else(|p| p.into_inner());
                legs.3[usize::from(retaining)].push(latency);
                if let Some(sent) = sent_by_relay {
                    legs.2.push((now - sent).as_seconds_f64() * 1000.0);
                }
                if let Some(changed) = changed {
                    legs.0.push((changed - wall).as_seconds_f64() * 1000.0);
                    legs.1.push((now - changed).as_seconds_f64() * 1000.0);
                }
            }
        });
    }
    // With insights: the time to each member's record on fhir.insights.v1 (its first, the
    // interaction aspirin brought).
    if cli.measure_insights {
        let consumer: StreamConsumer = platform::kafka::client(&kafka)?
            .set("group.id", format!("{run}-insights"))
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100")
            .create()?;
        consumer.subscribe(&[&kafka.topic(platform::topics::INSIGHTS)])?;
        let insight = insight.clone();
        tokio::spawn(async move {
            while let Ok(m) = consumer.recv().await {
                insight.arrived(&String::from_utf8_lossy(m.key().unwrap_or_default()));
            }
        });
    }
    // The clock starts once the reader owns the topic's partitions (it reads from the start).
    while consumer.assignment().map_or(0, |a| a.count()) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The system of record's producer sends each change as it happens (acks=all, idempotent):
    // linger.ms=1, not the bulk loader's 10 ms.
    let producer = platform::kafka::prompt_producer(&kafka)?;
    let topic = kafka.topic(if cli.measure_insights { platform::topics::MEDICATIONS } else { platform::topics::DEMOGRAPHICS });
    let send = |member: &str| -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
        let payload = if cli.measure_insights {
            event("rx-claims", member, &format!("RX-A-{member}"), serde_json::json!({ "rxnorm_code": "1191", "status": "active" }))?
        } else {
            event("enrollment", member, member, serde_json::json!({ "given_name": "Fresh", "sex": "other" }))?
        };
        producer.send_result(FutureRecord::to(&topic).key(member).payload(&payload)).map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))
    };

    // The warm-up, at the main rate.
    let mut next = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / cli.rate));
    for _ in 0..warmup {
        ticker.tick().await;
        acks.push(send(&format!("F{next:07}"))?);
        next += 1;
    }
    // The warm-up made the first composites: analyze again once they are stored, as autovacuum
    // does in a database in service. Analyzed while they were still empty, the composer's cached
    // plans scanned `composites` whole for every transaction until autovacuum's next pass, which
    // most runs ended before.
    while db::bench::composites(&pool).await? < warmup as i64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db::bench::analyze_pipeline(&pool).await?;

    let mut phases = Vec::new();
    for (phase, &(rate, seconds)) in measured.iter().enumerate() {
        let events = (rate * seconds) as usize;
        if phase == 0 && cli.retention {
            retention = Some(retention_windows(url.clone(), retaining.clone(), retention_stop.clone()));
        }
        let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let before = cpu::snapshot(&groups);
        let started = Instant::now();
        for _ in 0..events {
            ticker.tick().await;
            let member = format!("F{next:07}");
            next += 1;
            let now = Instant::now();
            if phase == 0 {
                let on = retaining.load(std::sync::atomic::Ordering::Relaxed);
                sent_wall.lock().unwrap_or_else(|p| p.into_inner()).insert(member.clone(), (time::OffsetDateTime::now_utc(), on));
            }
            profile.expect(&member, now, phase);
            hooked.expect(&member, now, phase);
            if cli.measure_insights {
                insight.expect(&member, now, phase);
            }
            acks.push(send(&member)?);
        }
        let achieved = events as f64 / started.elapsed().as_secs_f64();
        if phase == 0 {
            retention_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // The phase ends when its last change has reached every delivery point.
        let profile_latencies = profile.wait(phase, events).await;
        let hooks = hooked.wait(phase, events).await;
        let insights = if cli.measure_insights { insight.wait(phase, events).await } else { Vec::new() };
        let usage = cpu::snapshot(&groups).since(&before);
        phases.push(Phase { rate, achieved, profile: profile_latencies, hooks, insights, usage, events });
    }
    for ack in acks {
        ack.await.map_err(|_| anyhow::anyhow!("producer gone"))?.map_err(|(e, _)| anyhow::anyhow!("not acknowledged: {e}"))?;
    }
    let removed = match retention {
        Some(task) => task.await?,
        None => 0,
    };
    for child in children {
        child.stop()?;
    }

    let main = &phases[0];
    println!(
        "sent {warmup} unmeasured events, then {} at {:.0} events/s; {} of them seen on the topic, {} at the rest-hook",
        main.events,
        main.achieved,
        main.profile.len(),
        main.hooks.len()
    );
    println!("event produced → composite on fhir.medication-profile.v1: {}", summary(&main.profile));
    let (mut to_composer, mut to_topic, mut from_relay, [mut without, mut with]) =
        std::mem::take(&mut *legs.lock().unwrap_or_else(|p| p.into_inner()));
    for l in [&mut to_composer, &mut to_topic, &mut from_relay, &mut without, &mut with] {
        l.sort_by(f64::total_cmp);
    }
    println!(
        "  of which: produced → composer's transaction starts p50 {:.1} ms, p99 {:.1} ms; from there → read from the topic p50 {:.1} ms, p99 {:.1} ms (ms-precision clock)",
        pct(&to_composer, 0.50),
        pct(&to_composer, 0.99),
        pct(&to_topic, 0.50),
        pct(&to_topic, 0.99)
    );
    println!(
        "  and of the latter: the relay's send (record timestamp) → read from the topic p50 {:.1} ms, p99 {:.1} ms",
        pct(&from_relay, 0.50),
        pct(&from_relay, 0.99)
    );
    println!("event produced → notification at a rest-hook endpoint: {}", summary(&main.hooks));
    if cli.measure_insights {
        println!("event produced → insight on fhir.insights.v1 ({} seen): {}", main.insights.len(), summary(&main.insights));
    }
    if cli.retention {
        println!(
            "retention: composite freshness p50/p99 outside its windows {:.1}/{:.1} ms ({} events), inside them {:.1}/{:.1} ms ({} events): p99 {:+.1} ms",
            pct(&without, 0.50),
            pct(&without, 0.99),
            without.len(),
            pct(&with, 0.50),
            pct(&with, 0.99),
            with.len(),
            pct(&with, 0.99) - pct(&without, 0.99)
        );
        println!("retention removed {removed} rows in its windows");
    }
    print_cpu(main);
    if phases.len() > 1 {
        print_sweep(&phases);
    }
    pool.close().await;
    db::bench::drop_database(&admin, &run).await?;
    platform::kafka::delete_namespace(&kafka).await?;
    Ok(())
}

/// CPU milliseconds per event of each process and of the platform, and the cores it kept busy.
fn print_cpu(phase: &Phase) {
    let u = &phase.usage;
    let per_event = |d: Duration| d.as_secs_f64() * 1000.0 / phase.events as f64;
    println!("CPU during the measured phase ({:.1} s, {} events), from /proc:", u.elapsed.as_secs_f64(), phase.events);
    for name in PLATFORM.iter().copied().chain([LOAD]) {
        let cpu = u.by_group.get(name).copied().unwrap_or_default();
        println!("  {name:<20} {:>7.3} ms/event  {:>5.2} cores", per_event(cpu), u.cores(cpu));
    }
    let platform = u.total(&PLATFORM);
    println!("  {:<20} {:>7.3} ms/event  {:>5.2} cores", "platform (total)", per_event(platform), u.cores(platform));
    println!("  {:<20} {:>7.3} ms/event  {:>5.2} cores", "host (/proc/stat)", per_event(u.host_busy), u.cores(u.host_busy));
}

/// Each rate's freshness and CPU, and where p99 crosses [`SWEEP_LIMIT_MS`].
fn print_sweep(phases: &[Phase]) {
    println!("rate sweep (composite on fhir.medication-profile.v1; rest-hook):");
    for p in phases {
        let platform = p.usage.total(&PLATFORM);
        println!(
            "  {:>5} events/s (sent {:>6.0}/s): p50 {:>6.1} ms, p99 {:>7.1} ms; rest-hook p99 {:>7.1} ms; platform {:.3} ms/event, {:.2} cores",
            p.rate,
            p.achieved,
            pct(&p.profile, 0.5),
            pct(&p.profile, 0.99),
            pct(&p.hooks, 0.99),
            platform.as_secs_f64() * 1000.0 / p.events as f64,
            p.usage.cores(platform)
        );
    }
    let mut by_rate: Vec<&Phase> = phases.iter().collect();
    by_rate.sort_by_key(|p| p.rate);
    let over = |p: &Phase| pct(&p.profile, 0.99).max(pct(&p.hooks, 0.99)) >= SWEEP_LIMIT_MS || p.profile.len() < p.events;
    match by_rate.iter().position(|p| over(p)) {
        None => println!("p99 stays under {SWEEP_LIMIT_MS} ms up to {} events/s (the highest rate swept)", by_rate[by_rate.len() - 1].rate),
        Some(0) => println!("p99 is over {SWEEP_LIMIT_MS} ms already at {} events/s (the lowest rate swept)", by_rate[0].rate),
        Some(i) => println!("p99 crosses {SWEEP_LIMIT_MS} ms between {} and {} events/s", by_rate[i - 1].rate, by_rate[i].rate),
    }
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

/// A minimal HTTP/1.1 endpoint (keep-alive) that answers 200 to every POST and records each
/// member named in a notification as arrived. Returns its URL.
async fn rest_hook(hooked: Arc<Track>) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let hooked = hooked.clone();
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
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        for e in v["entry"][0]["resource"]["notificationEvent"].as_array().into_iter().flatten() {
                            let member = e["focus"]["reference"].as_str().and_then(|f| f.split('/').rev().nth(1)).unwrap_or_default();
                            hooked.arrived(member);
                        }
                    }
                    if reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(url)
}
