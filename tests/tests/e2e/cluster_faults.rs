//! Issue 27: the cluster fault test. On the secured three-broker cluster, with two of every
//! component (two composers in one group, two relays, two notifiers, two APIs), a system of
//! record sends a new demographics version of one of 200 members at a steady 200 events/s; at
//! spaced moments the leader broker of a partition of `fhir.medication-profile.v1`, one composer,
//! the leading relay, one notifier and one API are SIGKILLed (each brought back as a supervisor
//! would), and PostgreSQL is restarted once. Afterwards:
//! - every event was applied, once (RPO: none lost): each member's composite versions on
//!   `fhir.medication-profile.v1` and on the partner's topic (read committed, the latter by the
//!   partner's own principal) follow each other by one, each once, each carrying a later event of
//!   the system of record than the one before, and the last carries the last event sent (several
//!   events of one member in one composer batch make one version: the newest wins),
//! - each subscription's events reached the rest-hook and the Kafka channel in order with no
//!   gap; the Kafka channel's once each; a rest-hook notification is sent again only when a fault
//!   struck between the endpoint's acknowledgement and its record (its `eventNumber`s tell the
//!   receiver it has them),
//! - a client that retries (the other instance, then again) got an answer to every request,
//! - the partner's principal is still refused another partner's topic and every `sor.*` write.
//!
//! It prints the freshness (event sent → composite read from the topic) before the faults and
//! the RTO of each: the seconds from the fault until the p99 of each second's events is back
//! under 100 ms for three seconds running. Ignored by default: `scripts/test` runs it on the
//! cluster it brings up (`scripts/test --faults` runs only this).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use devtools::stats::percentile as pct;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::cluster::{self, first_record, produce, spawn_as};
use tests::*;

/// Events per second the system of record sends: 200 (issue 27 asks for at least that), or
/// `FAULT_TEST_RATE`.
fn rate() -> u64 {
    std::env::var("FAULT_TEST_RATE").ok().and_then(|r| r.parse().ok()).filter(|r| *r > 0).unwrap_or(200)
}
const MEMBERS: usize = 200;
/// Load before the first fault, between faults, and after the last.
const WARMUP: Duration = Duration::from_secs(20);
const SPACING: Duration = Duration::from_secs(15);
const TAIL: Duration = Duration::from_secs(15);
/// Freshness under this is recovered (issue 27's RTO).
const LIMIT_MS: f64 = 100.0;
/// Most events in one notification (the subscriptions' max-count).
const MAX_COUNT: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Broker,
    Composer,
    Relay,
    Notifier,
    Api,
    Postgres,
}

const FAULTS: [Fault; 6] = [Fault::Broker, Fault::Composer, Fault::Relay, Fault::Notifier, Fault::Api, Fault::Postgres];

/// How a component is started again after a kill: its binary, principal and environment.
struct Spec {
    name: &'static str,
    principal: &'static str,
    ops: String,
    env: Vec<(String, String)>,
}

/// Two of every component, as child processes running as their principals.
struct Fleet {
    url: String,
    group: String,
    specs: Vec<Spec>,
    children: Children,
}

impl Fleet {
    fn start(&mut self, name: &'static str, principal: &'static str, env: &[(&str, String)]) -> anyhow::Result<usize> {
        let ops = free_address()?;
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        env.push(("OPS_ADDR".into(), ops.clone()));
        self.specs.push(Spec { name, principal, ops, env });
        self.children.0.push(self.spawn(self.specs.len() - 1)?);
        Ok(self.specs.len() - 1)
    }

    fn spawn(&self, i: usize) -> anyhow::Result<std::process::Child> {
        let s = &self.specs[i];
        let env: Vec<(&str, &str)> = s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        spawn_as(s.name, s.principal, &self.url, &self.group, &env)
    }

    /// SIGKILL, then started again after a second (a supervisor's restart).
    async fn kill_and_restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.children.0[i].kill()?;
        self.children.0[i].wait()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.children.0[i] = self.spawn(i)?;
        Ok(())
    }

    async fn ready(&self, i: usize) -> anyhow::Result<()> {
        let url = format!("http://{}/ready", self.specs[i].ops);
        let what = format!("{} to be ready", self.specs[i].name);
        eventually(Duration::from_secs(90), &what, || {
            let url = url.clone();
            async move { Ok(reqwest::get(&url).await.ok().filter(|r| r.status() == 200).map(|_| ())) }
        })
        .await
    }

    /// The components that exited (none may: each fault is a kill the test restarts itself).
    fn exited(&mut self) -> Vec<String> {
        let specs = &self.specs;
        self.children.0.iter_mut().enumerate().filter_map(|(i, c)| Some(format!("{} ({})", specs[i].name, c.try_wait().ok()??))).collect()
    }

    /// The relay of `relays` that has the lead (its `fhir_relay_leading` gauge).
    async fn leading(&self, relays: &[usize]) -> anyhow::Result<usize> {
        eventually(Duration::from_secs(30), "a relay to lead", || async {
            for &i in relays {
                let metrics = reqwest::get(format!("http://{}/metrics", self.specs[i].ops)).await?.text().await?;
                if metrics.lines().any(|l| l == "fhir_relay_leading 1") {
                    return Ok(Some(i));
                }
            }
            Ok(None)
        })
        .await
    }
}

/// What a read-committed reader saw of each member's versions: the last composite version and
/// the system of record's event version it carries.
#[derive(Default)]
struct Versions {
    last: HashMap<String, (i64, i64)>,
    versions: usize,
    duplicates: usize,
    disorder: Vec<String>,
}

impl Versions {
    /// Records `key`'s composite `version` carrying event `event`; true when it is the member's
    /// next version.
    fn record(&mut self, key: &str, version: i64, event: i64) -> bool {
        let (last, last_event) = self.last.get(key).copied().unwrap_or((0, 0));
        if version == last {
            self.duplicates += 1;
            return false;
        }
        if version != last + 1 || event <= last_event {
            self.disorder.push(format!("{key}: version {version} (event {event}) after {last} (event {last_event})"));
        }
        self.last.insert(key.to_owned(), (version, event));
        self.versions += 1;
        true
    }

    /// The members whose last version carries the event `event`.
    fn at(&self, event: i64) -> usize {
        self.last.values().filter(|(_, e)| *e == event).count()
    }
}

/// The version of the system of record's event a composite carries: its given name, `V<n>`.
fn event_version(payload: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(payload).ok()?;
    let at = text.find("\"given\":[\"V")? + 11;
    text[at..].split('"').next()?.parse().ok()
}

/// Reads `topic` from the start as `principal`, into `seen` (the members whose ids start with
/// `run`); `arrived` is told each new version.
fn read_versions(
    run: &str,
    principal: &str,
    group: &str,
    topic: &str,
    seen: Arc<Mutex<Versions>>,
    arrived: impl Fn(&str, i64) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: StreamConsumer = cluster::client(principal)?
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    consumer.subscribe(&[topic])?;
    let run = run.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else { continue }; // a broker gone: the client reconnects
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            if !key.starts_with(&run) {
                continue;
            }
            let version = m
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == "versionId").and_then(|x| x.value))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok());
            let (Some(version), Some(event)) = (version, m.payload().and_then(event_version)) else { continue };
            if seen.lock().unwrap_or_else(|p| p.into_inner()).record(&key, version, event) {
                arrived(&key, event);
            }
        }
    }))
}

/// The event numbers of each notification a channel received, in arrival order.
#[derive(Default)]
struct Notifications(Mutex<Vec<Vec<i64>>>);

impl Notifications {
    fn receive(&self, body: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return };
        let status = &v["entry"][0]["resource"];
        if status["type"] != "event-notification" {
            return;
        }
        let numbers: Vec<i64> =
            status["notificationEvent"].as_array().into_iter().flatten().filter_map(|e| e["eventNumber"].as_str()?.parse().ok()).collect();
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(numbers);
    }

    fn highest(&self) -> i64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten().copied().max().unwrap_or(0)
    }

    /// Checks the events came in order with no gap up to `expected`; the notifications that
    /// repeated events received before, and how many events they repeated. A repeat is the
    /// notifier sending its oldest undelivered events again: it starts at an event already
    /// received, runs on without a gap, and may go on past the last one received.
    fn check(&self, channel: &str, expected: i64) -> (usize, usize) {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (mut next, mut resent, mut repeated) = (1i64, 0, 0);
        for numbers in all.iter() {
            assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{channel}: a notification out of order: {numbers:?}");
            let old = numbers.iter().filter(|n| **n < next).count();
            if old > 0 {
                resent += 1;
                repeated += old;
            }
            for n in &numbers[old..] {
                assert_eq!(*n, next, "{channel}: event {n} where {next} was due (a gap)");
                next += 1;
            }
        }
        assert_eq!(next - 1, expected, "{channel}: events received");
        (resent, repeated)
    }
}

async fn hook(State(received): State<Arc<Notifications>>, body: Bytes) -> StatusCode {
    received.receive(&body);
    StatusCode::OK
}

/// Each second's p99 of freshness (by when events were sent).
fn per_second_p99(arrivals: &[(f64, f64)]) -> Vec<f64> {
    let seconds = arrivals.iter().map(|(at, _)| *at as usize + 1).max().unwrap_or(0);
    let mut buckets = vec![Vec::new(); seconds];
    for (at, latency) in arrivals {
        buckets[*at as usize].push(*latency);
    }
    buckets
        .into_iter()
        .map(|mut b| {
            b.sort_by(f64::total_cmp);
            pct(&b, 0.99)
        })
        .collect()
}

/// Seconds from `at` until three seconds running have p99 under `limit`; `None` if that never
/// happens before `until`.
fn recovery(p99: &[f64], at: f64, until: f64, limit: f64) -> Option<f64> {
    let start = at as usize;
    (start..(until as usize).min(p99.len()).saturating_sub(2)).find(|s| p99[*s..*s + 3].iter().all(|p| *p < limit)).map(|s| (s as f64 - at).max(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the secured cluster, kills one of its brokers and restarts PostgreSQL; scripts/test runs it alone"]
async fn nothing_is_lost_or_repeated_through_broker_component_and_database_faults() -> anyhow::Result<()> {
    let app = TestApp::new("faults").await?;
    cluster::empty_topics(&platform::topics::SOR_TOPICS).await?;
    cluster::remove_partner_topics_of('f').await?;
    let run = unique("f").replace('_', "");
    let (p, q) = (format!("{run}p"), format!("{run}q"));
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("{run}-{i:03}")).collect();

    // The partners: p has the members (and subscriptions), q one member of its own.
    let partner = register_partner(&app.pool, &p, "system/*.read", KeyKind::Es384, Some((1000.0, 1000))).await?;
    cluster::services(&["partner-principal", "grant", &p])?;
    let hooked = Arc::new(Notifications::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/hook", listener.local_addr()?);
    let app_router = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(hooked.clone());
    tokio::spawn(async move { axum::serve(listener, app_router).await });
    let max_count =
        json!({ "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count", "valuePositiveInt": MAX_COUNT });
    let kafka_channel = json!({ "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type",
            "valueCoding": { "system": "urn:fhir-event-platform:subscription-channel-type", "code": "kafka" } });
    for channel in [
        json!({ "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json", "extension": [max_count,
            { "url": fhir::subscriptions::EXT_SIGNING_SECRET, "valueString": "cd".repeat(32) }] }),
        json!({ "type": "message", "payload": "application/fhir+json", "_type": { "extension": [kafka_channel] }, "extension": [max_count] }),
    ] {
        let subscription = json!({ "resourceType": "Subscription", "status": "requested", "reason": "fault test",
            "criteria": fhir::subscriptions::TOPIC_URL, "channel": channel });
        let limits = fhir::subscriptions::Limits { allow_http: true, min_heartbeat_secs: 1 };
        let accepted =
            fhir::subscriptions::accept(subscription, &p, limits, time::OffsetDateTime::now_utc()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        db::subscriptions::create(&app.pool, &accepted, i64::MAX).await?;
    }

    // Two of everything, each as its principal.
    let mut fleet = Fleet { url: app.url.clone(), group: format!("fhir-composer-{run}"), specs: Vec::new(), children: Children(Vec::new()) };
    let notifier_env = [
        ("SUBSCRIPTION_ALLOWED_NETWORKS", "127.0.0.0/8".to_owned()),
        ("SUBSCRIPTION_RETRY_BASE_MS", "200".to_owned()),
        ("SUBSCRIPTION_RETRY_MAX_MS", "1000".to_owned()),
    ];
    let composers = [fleet.start("composer", "composer", &[])?, fleet.start("composer", "composer", &[])?];
    let first_relay = fleet.start("relay", "relay", &[])?;
    fleet.ready(first_relay).await?;
    let relays = [first_relay, fleet.start("relay", "relay", &[])?];
    let notifiers = [fleet.start("notifier", "notifier", &notifier_env)?, fleet.start("notifier", "notifier", &notifier_env)?];
    let binds = [free_address()?, free_address()?];
    let apis = [fleet.start("api", "api", &[("HTTP_BIND", binds[0].clone())])?, fleet.start("api", "api", &[("HTTP_BIND", binds[1].clone())])?];
    for i in 0..fleet.specs.len() {
        fleet.ready(i).await?;
    }

    // The members' attributions and q's member, then the readers.
    for member in &members {
        let a = attribution(member, &p);
        assert_eq!(produce("sor-attribution", platform::topics::ATTRIBUTION, member, a.value.as_deref().unwrap_or_default()).await?, Ok(()));
    }
    let q_member = format!("{run}-q");
    let a = attribution(&q_member, &q);
    assert_eq!(produce("sor-attribution", platform::topics::ATTRIBUTION, &q_member, a.value.as_deref().unwrap_or_default()).await?, Ok(()));
    let demo = native_event("upsert", "enrollment", 1, &q_member, &q_member, Some(json!({ "given_name": "Q", "sex": "other" })));
    assert_eq!(produce("sor-demographics", platform::topics::DEMOGRAPHICS, &q_member, &demo).await?, Ok(()));
    eventually(Duration::from_secs(60), "the subscriptions' handshakes", || async {
        let active: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE status = 'active'").fetch_one(&app.pool).await?;
        Ok((active == 2).then_some(()))
    })
    .await?;

    let t0 = Instant::now();
    // Per member, the events sent and not yet seen in a composite.
    let sent: Arc<Mutex<HashMap<String, std::collections::BTreeMap<i64, Instant>>>> = Arc::default();
    let arrivals: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let main = Arc::new(Mutex::new(Versions::default()));
    let (sent_, arrivals_) = (sent.clone(), arrivals.clone());
    let partner_seen = Arc::new(Mutex::new(Versions::default()));
    let readers = [
        read_versions(&run, "admin", &format!("{run}-main"), platform::topics::MEDICATION_PROFILE, main.clone(), move |key, event| {
            // This version brings the member's events up to `event` (the newest of a batch wins).
            let mut sent = sent_.lock().unwrap_or_else(|p| p.into_inner());
            let Some(pending) = sent.get_mut(key) else { return };
            let rest = pending.split_off(&(event + 1));
            let now = Instant::now();
            let mut arrivals = arrivals_.lock().unwrap_or_else(|p| p.into_inner());
            for at in std::mem::replace(pending, rest).into_values() {
                arrivals.push(((at - t0).as_secs_f64(), (now - at).as_secs_f64() * 1000.0));
            }
        })?,
        // The partner's topic, read by the partner's own principal.
        read_versions(
            &run,
            &format!("partner-{p}"),
            &format!("{p}-faults"),
            &platform::topics::partner_profile(&p),
            partner_seen.clone(),
            |_, _| {},
        )?,
    ];
    let channel = Arc::new(Notifications::default());
    let channel_reader = {
        let consumer: StreamConsumer = cluster::client(&format!("partner-{p}"))?
            .set("group.id", format!("{p}-notifications"))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()?;
        consumer.subscribe(&[&platform::topics::partner_notifications(&p)])?;
        let channel = channel.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(m) = consumer.recv().await {
                    channel.receive(m.payload().unwrap_or_default());
                }
            }
        })
    };

    // A partner's client that retries: the other instance, then again, for up to 30 s.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let origins = binds.iter().map(|b| format!("http://{b}")).collect::<Vec<_>>();
    let client = partner.client(&origins[0]).await?;
    let requests = {
        let (stop, origins, members) = (stop.clone(), origins.clone(), members.clone());
        tokio::spawn(async move {
            // From when every member has a composite.
            tokio::time::sleep_until((t0 + WARMUP / 2).into()).await;
            let (mut answered, mut retried, mut unanswered, mut k) = (0usize, 0usize, Vec::new(), 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = format!("/fhir/Patient/{}/$medication-profile", members[k % MEMBERS]);
                let first = Instant::now();
                let mut attempt = 0;
                loop {
                    let origin = &origins[(k + attempt) % 2];
                    let reply = client.get(format!("{origin}{path}")).timeout(Duration::from_secs(5)).send().await;
                    match reply.map(|r| r.status().as_u16()) {
                        Ok(200) => {
                            answered += 1;
                            break;
                        }
                        Ok(status) if status < 500 && status != 429 => {
                            unanswered.push(format!("{path}: {status}"));
                            break;
                        }
                        _ if first.elapsed() > Duration::from_secs(30) => {
                            unanswered.push(format!("{path}: no answer within 30 s"));
                            break;
                        }
                        _ => {
                            retried += 1;
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100 * attempt.min(5) as u64)).await;
                        }
                    }
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (answered, retried, unanswered)
        })
    };

    // The system of record, at a steady rate (acks=all, idempotent).
    let producer: FutureProducer = cluster::client("sor-demographics")?
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "120000")
        .create()?;
    let load = WARMUP + SPACING * (FAULTS.len() as u32 - 1) + TAIL;
    let rate = rate();
    // Every member gets the same number of events.
    let total = (rate * load.as_secs()) as usize / MEMBERS * MEMBERS;
    let sending = {
        let sent = sent.clone();
        let members = members.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut acks = Vec::with_capacity(total);
            for k in 0..total {
                ticker.tick().await;
                let member = &members[k % MEMBERS];
                let version = (k / MEMBERS) as i64 + 1;
                let data = json!({ "given_name": format!("V{version}"), "sex": "other" });
                let payload = native_event("upsert", "enrollment", version, member, member, Some(data));
                sent.lock().unwrap_or_else(|p| p.into_inner()).entry(member.clone()).or_default().insert(version, Instant::now());
                let record = FutureRecord::to(platform::topics::DEMOGRAPHICS).key(member).payload(&payload);
                acks.push(producer.send_result(record).map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?);
            }
            let (mut acknowledged, mut refused) = (0, HashMap::<String, usize>::new());
            for ack in acks {
                match ack.await {
                    Ok(Ok(_)) => acknowledged += 1,
                    Ok(Err((e, _))) => *refused.entry(e.to_string()).or_default() += 1,
                    Err(_) => *refused.entry("the producer went away".to_owned()).or_default() += 1,
                }
            }
            anyhow::Ok((acknowledged, refused, t0.elapsed()))
        })
    };

    // The faults, at spaced moments.
    let mut struck = Vec::new();
    let mut restarted = None;
    for (n, fault) in FAULTS.iter().enumerate() {
        tokio::time::sleep_until((t0 + WARMUP + SPACING * n as u32).into()).await;
        let at = t0.elapsed().as_secs_f64();
        let what = match fault {
            Fault::Broker => {
                let metadata = tokio::task::spawn_blocking(|| -> anyhow::Result<i32> {
                    let consumer: BaseConsumer = cluster::client("admin")?.create()?;
                    let metadata = consumer.fetch_metadata(Some(platform::topics::MEDICATION_PROFILE), Duration::from_secs(10))?;
                    Ok(metadata.topics()[0].partitions()[0].leader())
                })
                .await??;
                std::process::Command::new("kill").args(["-KILL", &cluster::node_pid(metadata)?.to_string()]).status()?;
                // Started again 5 s later, as a supervisor would; it rejoins while the next faults
                // strike (replaying the cluster's metadata takes a minute here).
                restarted = Some(tokio::spawn(async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let started = Instant::now();
                    tokio::task::spawn_blocking(|| cluster::services(&["up", "--cluster"])).await??;
                    anyhow::Ok(started.elapsed())
                }));
                format!("broker {metadata} (leader of {} partition 0; started again 5 s later)", platform::topics::MEDICATION_PROFILE)
            }
            Fault::Composer => {
                fleet.kill_and_restart(composers[0]).await?;
                "a composer".to_owned()
            }
            Fault::Relay => {
                let leader = fleet.leading(&relays).await?;
                fleet.kill_and_restart(leader).await?;
                "the leading relay".to_owned()
            }
            Fault::Notifier => {
                fleet.kill_and_restart(notifiers[0]).await?;
                "a notifier".to_owned()
            }
            Fault::Api => {
                fleet.kill_and_restart(apis[0]).await?;
                "an API instance".to_owned()
            }
            Fault::Postgres => {
                tokio::task::spawn_blocking(|| cluster::services(&["restart-postgres"])).await??;
                "PostgreSQL (restarted)".to_owned()
            }
        };
        step(&format!("t = {at:.1} s: {what}"));
        struck.push((*fault, at, what));
    }
    let (acknowledged, refused, sent_for) = sending.await??;
    if let Some(restarted) = restarted {
        let took = restarted.await??;
        println!("the killed broker was serving again {:.0} s after it was started again", took.as_secs_f64());
    }
    assert!(refused.is_empty(), "the system of record's events refused: {refused:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, retried, unanswered) = requests.await?;

    // Everything sent arrives: the composites, the partner's topic and both channels.
    let last_event = (total / MEMBERS) as i64;
    let progress = || {
        let (main, partner) = (main.lock().unwrap_or_else(|p| p.into_inner()), partner_seen.lock().unwrap_or_else(|p| p.into_inner()));
        format!("main topic: {} of {MEMBERS} members at event {last_event}, partner topic: {}", main.at(last_event), partner.at(last_event))
    };
    let caught_up = eventually(Duration::from_secs(180), "every member's last event on both topics", || async {
        let (main, partner) = (main.lock().unwrap_or_else(|p| p.into_inner()), partner_seen.lock().unwrap_or_else(|p| p.into_inner()));
        Ok((main.at(last_event) == MEMBERS && partner.at(last_event) == MEMBERS).then_some(()))
    })
    .await;
    anyhow::ensure!(caught_up.is_ok(), "{caught_up:?}: {}; exited: {:?}", progress(), fleet.exited());
    let versions: i64 =
        sqlx::query_scalar("SELECT sum(version_id)::bigint FROM composites WHERE member_id <> $1").bind(&q_member).fetch_one(&app.pool).await?;
    let expected = versions;
    let notified = eventually(Duration::from_secs(120), "every notification", || async {
        Ok((hooked.highest() >= expected && channel.highest() >= expected).then_some(()))
    })
    .await;
    anyhow::ensure!(notified.is_ok(), "{notified:?}: rest-hook at event {}, kafka channel at {}, of {expected}", hooked.highest(), channel.highest());
    tokio::time::sleep(Duration::from_secs(3)).await; // anything repeated late
    for reader in readers.into_iter().chain([channel_reader]) {
        reader.abort();
    }
    let mut counts: Vec<(String, i64)> = sqlx::query_as("SELECT member_id, version_id FROM composites").fetch_all(&app.pool).await?;
    counts.sort();

    // The partner's principal is still refused what is not its own.
    let principal = format!("partner-{p}");
    assert_eq!(
        first_record(&principal, &format!("{p}-peek"), &platform::topics::partner_profile(&q), Duration::from_secs(30)).await?,
        Err(RDKafkaErrorCode::TopicAuthorizationFailed),
        "a partner read another partner's topic"
    );
    for topic in platform::topics::SOR_TOPICS {
        assert_eq!(produce(&principal, topic, &members[0], b"{}").await?, Err(RDKafkaErrorCode::TopicAuthorizationFailed), "a partner wrote {topic}");
    }
    let exited = fleet.exited();
    drop(fleet);

    // The figures.
    let mut arrivals = std::mem::take(&mut *arrivals.lock().unwrap_or_else(|p| p.into_inner()));
    let p99s = per_second_p99(&arrivals);
    let before: Vec<f64> = {
        let mut b: Vec<f64> = arrivals.iter().filter(|(at, _)| *at >= 5.0 && *at < WARMUP.as_secs_f64() - 3.0).map(|(_, l)| *l).collect();
        b.sort_by(f64::total_cmp);
        b
    };
    println!(
        "{total} events sent in {:.1} s ({:.0} events/s), {acknowledged} acknowledged; before the faults: p50 {:.1} ms, p99 {:.1} ms",
        sent_for.as_secs_f64(),
        total as f64 / sent_for.as_secs_f64(),
        pct(&before, 0.5),
        pct(&before, 0.99)
    );
    println!("p99 (ms) of each second's events: {}", p99s.iter().map(|p| format!("{p:.0}")).collect::<Vec<_>>().join(" "));
    let end = load.as_secs_f64();
    // Where the machine cannot keep p99 under 100 ms even before the faults, recovery is also
    // measured against twice the p99 before them (events sent in the 3 s before the first fault
    // apart: the broker's kill delays them).
    let baseline = (2.0 * pct(&before, 0.99)).max(LIMIT_MS);
    for (n, (_, at, what)) in struck.iter().enumerate() {
        let until = struck.get(n + 1).map_or(end, |s| s.1);
        let mut window: Vec<f64> = arrivals.iter().filter(|(t, _)| t >= at && *t < until).map(|(_, l)| *l).collect();
        window.sort_by(f64::total_cmp);
        let rto = |limit| recovery(&p99s, *at, until, limit).map_or("not within the window".to_owned(), |s| format!("{s:.0} s"));
        println!(
            "  t = {at:>5.1} s {what}: RTO {} (p99 < {LIMIT_MS} ms), {} (p99 back under {baseline:.0} ms); until the next fault p99 {:.0} ms, max {:.0} ms, {} events over {LIMIT_MS} ms",
            rto(LIMIT_MS),
            rto(baseline),
            pct(&window, 0.99),
            window.last().copied().unwrap_or(f64::NAN),
            window.iter().filter(|l| **l >= LIMIT_MS).count()
        );
    }
    arrivals.sort_by(|a, b| a.1.total_cmp(&b.1));
    let main = main.lock().unwrap_or_else(|p| p.into_inner());
    let partner_seen = partner_seen.lock().unwrap_or_else(|p| p.into_inner());
    let (hook_resent, hook_repeated) = hooked.check("rest-hook", expected);
    let (kafka_resent, kafka_repeated) = channel.check("kafka channel", expected);
    println!(
        "main topic {} versions, {} duplicates; partner topic {} versions, {} duplicates; rest-hook: {hook_resent} notifications sent again ({hook_repeated} events), \
         kafka channel: {kafka_resent} ({kafka_repeated} events); API: {answered} requests answered ({retried} retries), {} unanswered",
        main.versions,
        main.duplicates,
        partner_seen.versions,
        partner_seen.duplicates,
        unanswered.len()
    );

    // RPO 0 and exactly once: every acknowledged event made one version, in order, once.
    assert_eq!(acknowledged, total, "the system of record's events acknowledged");
    assert_eq!(arrivals.len(), total, "events whose composite version reached the topic (the rest are lost)");
    assert_eq!(counts.len(), MEMBERS + 1);
    for (name, seen) in [("main", &*main), ("partner", &*partner_seen)] {
        assert_eq!(seen.duplicates, 0, "{name} topic: a version published twice");
        assert!(seen.disorder.is_empty(), "{name} topic: out of order: {:?}", &seen.disorder[..seen.disorder.len().min(5)]);
        for (member, version) in counts.iter().filter(|(m, _)| *m != q_member) {
            assert_eq!(seen.last.get(member), Some(&(*version, last_event)), "{name} topic: {member}'s last version (PostgreSQL has {version})");
        }
    }
    // A rest-hook notification goes again when a fault struck between the endpoint's answer and
    // its record (the notifier's kill, the database's restart) or a lease ran out on a saturated
    // host: a few per fault at most, never a stream of them (`check` showed each repeats only
    // events already received, in order). The Kafka channel's never does: the next claimant reads
    // what the last one sent back from the topic.
    assert!(hook_resent <= 2 * FAULTS.len(), "rest-hook: {hook_resent} notifications sent again for {} faults", FAULTS.len());
    assert_eq!(kafka_resent, 0, "kafka channel: notifications sent again");
    assert!(exited.is_empty(), "components exited: {exited:?}");
    assert!(unanswered.is_empty(), "requests a retrying client got no answer to: {unanswered:?}");
    Ok(())
}
