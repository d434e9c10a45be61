//! Issue 6 (subscriptions): topic-based Subscriptions deliver every medication-profile change
//! to rest-hook endpoints (signed) and to Kafka. A subscriber that is down for two minutes
//! (first answering 503, then not listening at all) receives every notification afterwards,
//! in order, with no gap in event numbers, while another subscriber's notifications keep
//! arriving without added delay; a subscriber that lost notifications recovers them with
//! `$events`; heartbeats arrive when nothing happens; filters and attribution hold.
//!
//! `SUBSCRIBER_DOWN_SECS` (default 120) shortens the outage for local runs.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use devtools::generator::SorMessage;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::*;

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
const SCOPES: &str = "system/*.read system/Subscription.write";

/// A notification as a receiver got it.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    path: String,
    kind: String,
    /// (event number, member id) of each event in it.
    events: Vec<(i64, String)>,
    body: Value,
}

#[derive(Default)]
struct ReceiverState {
    unavailable: bool,
    refused: usize,
    bad_signatures: usize,
    /// Events acknowledged but "lost" by this subscriber (it crashed before keeping them).
    lose: BTreeSet<i64>,
    received: Vec<Received>,
}

#[derive(Clone)]
struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    secret: Arc<Vec<u8>>,
    port: u16,
    shutdown: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let Some((t, v1)) = header.split_once(",v1=") else { return false };
    let Some(t) = t.strip_prefix("t=") else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let signed = [t.as_bytes(), b".", body].concat();
    hex::decode(v1).is_ok_and(|sig| ring::hmac::verify(&key, &signed, &sig).is_ok())
}

async fn hook(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut st = r.state.lock().unwrap();
    if st.unavailable {
        st.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let signature = headers.get("x-fhir-event-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !verify(&r.secret, signature, &body) {
        st.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST };
    let status = &v["entry"][0]["resource"];
    let events: Vec<(i64, String)> = status["notificationEvent"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let n = e["eventNumber"].as_str().and_then(|n| n.parse().ok()).unwrap_or(-1);
            let member = e["focus"]["reference"].as_str().and_then(|f| f.split('/').rev().nth(1)).unwrap_or_default().to_owned();
            (n, member)
        })
        .filter(|(n, _)| !st.lose.contains(n))
        .collect();
    st.received.push(Received {
        at: Instant::now(),
        path: uri.path().to_owned(),
        kind: status["type"].as_str().unwrap_or_default().to_owned(),
        events,
        body: v,
    });
    StatusCode::OK
}

impl Receiver {
    async fn start(secret: Vec<u8>) -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let r = Receiver {
            state: Arc::default(),
            secret: Arc::new(secret),
            port: listener.local_addr()?.port(),
            shutdown: Arc::default(),
            task: Arc::default(),
        };
        r.serve(listener);
        Ok(r)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new().fallback(axum::routing::post(hook)).with_state(self.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        *self.shutdown.lock().unwrap() = Some(tx);
        *self.task.lock().unwrap() = Some(task);
    }

    /// Stops listening: connections are refused until [`Receiver::restart`].
    async fn stop(&self) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    async fn restart(&self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.serve(listener);
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn received(&self, path: &str) -> Vec<Received> {
        self.state.lock().unwrap().received.iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Event numbers in the order they arrived, at `path`.
    fn event_numbers(&self, path: &str) -> Vec<i64> {
        self.received(path).iter().flat_map(|r| r.events.iter().map(|(n, _)| *n)).collect()
    }
}

fn subscription(endpoint: Option<&str>, content: &str, secret: &str, extra: &[Value], filter: Option<&str>) -> Value {
    let mut channel = match endpoint {
        Some(url) => json!({ "type": "rest-hook", "endpoint": url,
            "extension": [{ "url": "urn:fhir-event-platform:extension:signing-secret", "valueString": secret }] }),
        None => json!({ "type": "message",
            "_type": { "extension": [{ "url": format!("{BACKPORT}backport-channel-type"),
                "valueCoding": { "system": "urn:fhir-event-platform:subscription-channel-type", "code": "kafka" } }] } }),
    };
    channel["payload"] = json!("application/fhir+json");
    channel["_payload"] = json!({ "extension": [{ "url": format!("{BACKPORT}backport-payload-content"), "valueCode": content }] });
    if !extra.is_empty() {
        let list = channel["extension"].as_array().cloned().unwrap_or_default();
        channel["extension"] = Value::Array(list.into_iter().chain(extra.iter().cloned()).collect());
    }
    let mut s = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "keep the medication list current at home visits",
        "criteria": fhir::subscriptions::TOPIC_URL,
        "channel": channel,
    });
    if let Some(member) = filter {
        s["_criteria"] = json!({ "extension": [{ "url": format!("{BACKPORT}backport-filter-criteria"), "valueString": format!("Bundle?patient=Patient/{member}") }] });
    }
    s
}

fn member(i: usize) -> String {
    format!("S{:02}", i % 20)
}

/// A new medication record for the member: its composite gets a new version.
fn change(member: &str, n: usize) -> SorMessage {
    medication(member, &format!("RX-{member}-{n}"), 1, &(100_000 + n).to_string(), "active")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The scenario's platform: a composer, a notifier and an API over 20 members served by pa
/// (S00…S19) and X1 (pb's), with pa's four subscriptions active: A (full resources, to receiver
/// `a`), B (ids only, heartbeats every second, at most 5 events a notification, to `b`), F (ids
/// only, S01 only, to `b`) and K (the Kafka channel).
struct Scene {
    app: TestApp,
    origin: String,
    fhir: String,
    pa: reqwest::Client,
    a: Receiver,
    b: Receiver,
    ids: BTreeMap<&'static str, String>,
    /// Each change published, in order: its member and when.
    produced: Vec<(String, Instant)>,
}

/// A's outage: when it began, how long it lasted, how often the notifier tried A while A answered
/// 503, and how long A took to catch up once back.
struct Outage {
    start: Instant,
    down: Duration,
    refused_while_503: usize,
    caught_up: Duration,
}

impl Scene {
    async fn start() -> anyhow::Result<(Scene, Composer, Task)> {
        let app = TestApp::new("subs").await?;
        let composer = app.composer(&[]).await?;
        // The subscribers below listen on loopback, which a deployment refuses.
        let notifier = app.notifier(&["--retry-max-ms", "4000", "--allowed-networks", "127.0.0.0/8"]).await?;
        let mut stream = Vec::new();
        for i in 0..20 {
            let m = member(i);
            stream.push(demographics(&m, json!({ "given_name": "Ines", "sex": "female" })));
            stream.push(attribution(&m, "pa"));
        }
        stream.push(demographics("X1", json!({ "given_name": "Olu", "sex": "male" })));
        stream.push(attribution("X1", "pb"));
        app.apply(&stream).await?;

        let origin = app
            .api(&["--subscription-allow-http", "--subscription-allowed-networks", "127.0.0.0/8", "--subscription-min-heartbeat-secs", "1"])
            .await?;
        let fhir = format!("{origin}/fhir");
        let pa = bearer_client(&app.partner("pa", SCOPES, KeyKind::Es384).await?.token_with(&origin, SCOPES).await?)?;
        let secret_a = "a1".repeat(32);
        let secret_b = "b2".repeat(32);
        let a = Receiver::start(hex::decode(&secret_a)?).await?;
        let b = Receiver::start(hex::decode(&secret_b)?).await?;
        b.state.lock().unwrap().lose = [3, 4, 5].into();
        let heartbeat = json!({ "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": 1 });
        let max5 = json!({ "url": format!("{BACKPORT}backport-max-count"), "valuePositiveInt": 5 });
        let mut ids = BTreeMap::new();
        for (name, body) in [
            ("A", subscription(Some(&a.url("/a")), "full-resource", &secret_a, &[], None)),
            ("B", subscription(Some(&b.url("/b")), "id-only", &secret_b, &[heartbeat, max5], None)),
            ("F", subscription(Some(&b.url("/f")), "id-only", &secret_b, &[], Some("S01"))),
            ("K", subscription(None, "id-only", "", &[], None)),
        ] {
            let Reply { status, body: created, .. } = send(post_fhir(&pa, &format!("{fhir}/Subscription"), &body)).await?;
            assert_eq!(status, 201, "{name}: {created}");
            assert_eq!(created["status"], "requested");
            assert!(created.to_string().find(&secret_a).is_none() && created.to_string().find(&secret_b).is_none(), "the secret is never served");
            ids.insert(name, created["id"].as_str().unwrap_or_default().to_owned());
        }
        for (name, id) in &ids {
            eventually(Duration::from_secs(20), &format!("{name} completes its handshake"), || async {
                Ok((get(&pa, &format!("{fhir}/Subscription/{id}")).await?.body["status"] == "active").then_some(()))
            })
            .await?;
        }
        assert_eq!(a.received("/a")[0].kind, "handshake");
        Ok((Scene { app, origin, fhir, pa, a, b, ids, produced: Vec::new() }, composer, notifier))
    }

    /// Publishes the `n`th change (of member `member(n)`), and with it, every tenth time, one of
    /// X1's, which no subscription of pa may see.
    async fn change(&mut self, n: usize) -> anyhow::Result<()> {
        let m = member(n);
        self.produced.push((m.clone(), Instant::now()));
        let mut batch = vec![change(&m, n)];
        if n >= 10 && n % 10 == 0 {
            batch.push(change("X1", n));
        }
        self.app.publish(&batch).await
    }

    fn changes(&self) -> usize {
        self.produced.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_notification_in_order_through_an_outage() -> anyhow::Result<()> {
    let down = Duration::from_secs(std::env::var("SUBSCRIBER_DOWN_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120));
    let (mut scene, composer, notifier) = Scene::start().await?;
    step("before the outage: 10 changes, each seen by A and B");
    before_the_outage(&mut scene).await?;
    step("A is down, first answering 503, then not listening; then A catches up");
    let outage = a_is_down(&mut scene, down).await?;
    step("B was not held back by A");
    b_was_not_held_back(&scene, &outage)?;
    step("B recovers the events it lost with $events");
    b_recovers_what_it_lost(&scene).await?;
    step("heartbeats, the filter, attribution and signatures");
    heartbeats_filters_and_signatures(&scene).await?;
    step("the Kafka channel");
    the_kafka_channel_has_every_event(&scene).await?;
    step("operators' metrics");
    operators_see_queues_and_failures(&scene, &notifier, &outage).await?;
    step("search and delete");
    search_and_delete(&scene).await?;
    notifier.stop().await?;
    composer.stop().await
}

async fn before_the_outage(scene: &mut Scene) -> anyhow::Result<()> {
    for i in 0..10 {
        scene.change(i).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (a, b) = (&scene.a, &scene.b);
    eventually(Duration::from_secs(30), "A and B see the first 10 changes", || async {
        Ok((a.event_numbers("/a").len() == 10 && b.event_numbers("/b").len() == 7).then_some(()))
    })
    .await
}

/// A is down for `down`: first it answers 503, then it does not listen at all, while a change a
/// second is published. Afterwards A gets everything, in order, each once.
async fn a_is_down(scene: &mut Scene, down: Duration) -> anyhow::Result<Outage> {
    scene.a.state.lock().unwrap().unavailable = true;
    let start = Instant::now();
    let mut stopped = false;
    let mut i = 10;
    while start.elapsed() < down {
        if !stopped && start.elapsed() >= down / 2 {
            scene.a.stop().await;
            stopped = true;
        }
        scene.change(i).await?;
        i += 1;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let (a, changes) = (&scene.a, scene.changes());
    let refused_while_503 = a.state.lock().unwrap().refused;
    let Reply { status: s, body: st, .. } = get(&scene.pa, &format!("{}/Subscription/{}/$status", scene.fhir, scene.ids["A"])).await?;
    assert_eq!(s, 200);
    let status = &st["entry"][0]["resource"];
    assert_eq!((status["type"].as_str(), status["status"].as_str()), (Some("query-status"), Some("active")), "{st}");
    assert_eq!(status["eventsSinceSubscriptionStart"], changes.to_string());
    a.state.lock().unwrap().unavailable = false;
    a.restart().await?;
    let back = Instant::now();

    eventually(Duration::from_secs(60), "A catches up", || async { Ok((a.event_numbers("/a").len() >= changes).then_some(())) }).await?;
    let caught_up = back.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.event_numbers("/a"), (1..=changes as i64).collect::<Vec<_>>(), "A: every event once, in order, no gap");
    // Full resources: each event's composite, with the versionId of the entry's etag.
    for r in a.received("/a").iter().filter(|r| r.kind == "event-notification") {
        for entry in r.body["entry"].as_array().into_iter().flatten().skip(1) {
            let etag = entry["response"]["etag"].as_str().unwrap_or_default();
            assert_eq!(etag, format!("W/\"{}\"", entry["resource"]["meta"]["versionId"].as_str().unwrap_or_default()));
        }
    }
    Ok(Outage { start, down, refused_while_503, caught_up })
}

/// B's notifications kept arriving during A's outage without added delay, and the notifier's
/// retries of A backed off.
fn b_was_not_held_back(scene: &Scene, outage: &Outage) -> anyhow::Result<()> {
    let (b, changes) = (&scene.b, scene.changes());
    let received = b.received("/b");
    let mut during: Vec<f64> = Vec::new();
    for (m, at) in &scene.produced {
        if *at < outage.start || *at > outage.start + outage.down {
            continue;
        }
        if let Some(r) = received.iter().find(|r| r.at >= *at && r.events.iter().any(|(_, em)| em == m)) {
            during.push((r.at - *at).as_secs_f64() * 1000.0);
        }
    }
    during.sort_by(f64::total_cmp);
    let b_numbers = b.event_numbers("/b");
    let mut expected_b: Vec<i64> = (1..=changes as i64).filter(|n| ![3, 4, 5].contains(n)).collect();
    expected_b.sort();
    assert_eq!(b_numbers, expected_b, "B: every event but the three it lost, in order");
    let (down, refused_while_503) = (outage.down, outage.refused_while_503);
    println!(
        "B during A's {} s outage: {} changes, delay p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; A refused {} attempts in its 503 half (backoff), caught up {:.1} s after it came back",
        down.as_secs(),
        during.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.last().copied().unwrap_or(f64::NAN),
        refused_while_503,
        outage.caught_up.as_secs_f64()
    );
    assert!(during.len() as f64 >= 0.8 * (changes - 10) as f64, "B's changes are measured");
    assert!(percentile(&during, 0.99) < 1000.0, "B's notifications kept arriving without added delay: {during:?}");
    assert!((2..60).contains(&refused_while_503), "A's retries backed off: {refused_while_503} attempts in {} s", down.as_secs() / 2);
    Ok(())
}

/// B lost events 3..5: `$events` gives them back, as full resources when asked.
async fn b_recovers_what_it_lost(scene: &Scene) -> anyhow::Result<()> {
    let url = format!("{}/Subscription/{}/$events?eventsSinceNumber=3&eventsUntilNumber=5&content=full-resource", scene.fhir, scene.ids["B"]);
    let Reply { status, body: replay, .. } = get(&scene.pa, &url).await?;
    assert_eq!(status, 200);
    let status = &replay["entry"][0]["resource"];
    assert_eq!(status["type"], "query-event");
    let numbers: Vec<&str> = status["notificationEvent"].as_array().into_iter().flatten().filter_map(|e| e["eventNumber"].as_str()).collect();
    assert_eq!(numbers, ["3", "4", "5"]);
    for entry in replay["entry"].as_array().into_iter().flatten().skip(1) {
        assert_eq!(entry["resource"]["resourceType"], "Bundle", "{entry}");
    }
    Ok(())
}

/// Heartbeats when nothing happens; the filtered subscription sees only its member; pb's member
/// never reaches pa; every notification is signed.
async fn heartbeats_filters_and_signatures(scene: &Scene) -> anyhow::Result<()> {
    let (a, b) = (&scene.a, &scene.b);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(b.received("/b").iter().any(|r| r.kind == "heartbeat"), "B asked for heartbeats every second");
    let f_members: BTreeSet<String> = b.received("/f").iter().flat_map(|r| r.events.iter().map(|(_, m)| m.clone())).collect();
    assert_eq!(f_members, ["S01".to_owned()].into());
    for path in ["/a", "/b", "/f"] {
        let receiver = if path == "/a" { a } else { b };
        assert!(receiver.received(path).iter().all(|r| r.events.iter().all(|(_, m)| m != "X1")), "{path}: pb's member never appears");
    }
    assert_eq!((a.state.lock().unwrap().bad_signatures, b.state.lock().unwrap().bad_signatures), (0, 0));
    Ok(())
}

/// The Kafka channel: every event on the partner's notification topic, keyed by subscription.
async fn the_kafka_channel_has_every_event(scene: &Scene) -> anyhow::Result<()> {
    let changes = scene.changes();
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("subs-reader"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[scene.app.topic(&fhir::subscriptions::kafka_topic("pa")).as_str()])?;
    let mut kafka_numbers = BTreeSet::new();
    while kafka_numbers.len() < changes {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await else { break };
        let m = m?;
        assert_eq!(m.key(), Some(scene.ids["K"].as_bytes()));
        let v: Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        for e in v["entry"][0]["resource"]["notificationEvent"].as_array().into_iter().flatten() {
            kafka_numbers.insert(e["eventNumber"].as_str().and_then(|n| n.parse::<i64>().ok()).unwrap_or(-1));
        }
    }
    assert_eq!(kafka_numbers, (1..=changes as i64).collect());
    Ok(())
}

/// Operators' metrics, on the notifier's operations listener (not on the partner port): queue
/// depths and delivery failures per partner (A failed during its outage).
async fn operators_see_queues_and_failures(scene: &Scene, notifier: &Task, outage: &Outage) -> anyhow::Result<()> {
    assert_eq!(get(&scene.pa, &format!("{}/metrics", scene.origin)).await?.status, 404, "the partner port serves no metrics");
    let url = format!("http://{}/metrics", notifier.ops_addr);
    let metrics = eventually(Duration::from_secs(10), "every queue drained", || async {
        let text = reqwest::get(&url).await?.text().await?;
        Ok(text.contains("fhir_subscription_queue_depth{partner=\"pa\",status=\"active\"} 0").then_some(text))
    })
    .await?;
    let value = |prefix: &str| metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|n| n.parse::<f64>().ok());
    let stored = value("fhir_subscription_delivery_failures{partner=\"pa\",status=\"active\"}");
    assert!(stored.is_some_and(|n| n >= outage.refused_while_503 as f64), "{metrics}");
    let counted = value("fhir_notifier_deliveries_total{channel=\"rest-hook\",kind=\"event-notification\",outcome=\"failed\"}");
    assert!(counted.is_some_and(|n| n >= outage.refused_while_503 as f64), "{metrics}");
    assert!(metrics.contains("fhir_outbox_unnotified 0"), "{metrics}");
    Ok(())
}

async fn search_and_delete(scene: &Scene) -> anyhow::Result<()> {
    let (fhir, pa, f) = (&scene.fhir, &scene.pa, &scene.ids["F"]);
    let found = get(pa, &format!("{fhir}/Subscription?status=active")).await?.body;
    assert_eq!(found["total"], 4);
    assert_eq!(send(pa.delete(format!("{fhir}/Subscription/{f}"))).await?.status, 204);
    assert_eq!(get(pa, &format!("{fhir}/Subscription/{f}")).await?.status, 404);
    Ok(())
}

/// Files of a test PKI made with `openssl`: a CA, and a server certificate for `localhost` that
/// the CA signed; and a self-signed certificate for `localhost` that nobody trusts.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn make() -> anyhow::Result<Pki> {
        let dir = std::env::temp_dir().join(unique("pki"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n")?;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new("openssl").args(args).current_dir(&dir).output()?;
            anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        run(&[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Partner test CA"]].concat())?;
        run(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat())?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ])?;
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "stranger.key", "-out", "stranger.pem", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        ]
        .concat())?;
        Ok(Pki { dir })
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

/// An HTTPS endpoint serving `cert`/`key`: answers every request 200 and keeps the notification
/// types it received (a minimal HTTP/1.1 reader: one request per connection).
async fn https_endpoint(cert: &std::path::Path, key: &std::path::Path, received: Arc<Mutex<Vec<String>>>) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&std::fs::read(cert)?).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&std::fs::read(key)?)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, received) = (acceptor.clone(), received.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut request = Vec::new();
                let mut buf = [0u8; 16384];
                loop {
                    let Ok(n) = tls.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
                    let length = head
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()));
                    if body.len() < length.unwrap_or(0) {
                        continue;
                    }
                    let kind = serde_json::from_str::<Value>(body).ok().and_then(|v| v["entry"][0]["resource"]["type"].as_str().map(str::to_owned));
                    received.lock().unwrap().push(kind.unwrap_or_default());
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    let _ = tls.shutdown().await;
                    return;
                }
            });
        }
    });
    Ok(port)
}

/// Rest-hook endpoints are HTTPS: one whose certificate chains to a CA the notifier trusts
/// (here the partner's own, through SUBSCRIPTION_CA_FILE) gets its handshake and notifications;
/// one whose certificate nobody vouches for gets nothing, and the subscription says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_go_over_https_only_to_endpoints_whose_certificate_is_trusted() -> anyhow::Result<()> {
    let pki = Pki::make()?;
    let (trusted, untrusted) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let good_port = https_endpoint(&pki.path("server.pem"), &pki.path("server.key"), trusted.clone()).await?;
    let bad_port = https_endpoint(&pki.path("stranger.pem"), &pki.path("stranger.key"), untrusted.clone()).await?;
    let app = TestApp::new("tls").await?;
    let pool = &app.pool;
    let composer = app.composer(&[]).await?;
    let ca = pki.path("ca.pem").display().to_string();
    let notifier = app.notifier(&["--allowed-networks", "127.0.0.0/8,::1/128", "--ca-file", &ca]).await?;
    app.apply(&[demographics("T1", json!({ "given_name": "Tal", "sex": "other" })), attribution("T1", "pa")]).await?;
    let origin = app.api(&["--subscription-allowed-networks", "127.0.0.0/8,::1/128"]).await?;
    let pa = bearer_client(&app.partner("pa", SCOPES, KeyKind::Es384).await?.token_with(&origin, SCOPES).await?)?;
    let mut ids = Vec::new();
    for port in [good_port, bad_port] {
        let s = subscription(Some(&format!("https://localhost:{port}/hook")), "id-only", &"cd".repeat(32), &[], None);
        let r = pa.post(format!("{origin}/fhir/Subscription")).header("content-type", "application/fhir+json").json(&s).send().await?;
        assert_eq!(r.status(), 201);
        ids.push(r.json::<Value>().await?["id"].as_str().unwrap_or_default().to_owned());
    }
    let status = |id: String| {
        let pool = pool.clone();
        async move {
            let row: (String, Option<String>) =
                sqlx::query_as("SELECT status, error FROM subscriptions WHERE id = $1").bind(id).fetch_one(&pool).await?;
            Ok::<_, anyhow::Error>(row)
        }
    };
    eventually(Duration::from_secs(30), "the trusted endpoint's handshake", || async {
        Ok((status(ids[0].clone()).await?.0 == "active").then_some(()))
    })
    .await?;
    app.publish(&[medication("T1", "RX-T1", 1, "860975", "active")]).await?;
    eventually(Duration::from_secs(30), "a notification over HTTPS", || async {
        Ok(trusted.lock().unwrap().iter().any(|k| k == "event-notification").then_some(()))
    })
    .await?;
    let (bad_status, bad_error) = eventually(Duration::from_secs(30), "the untrusted endpoint refused", || async {
        let (s, e) = status(ids[1].clone()).await?;
        Ok(e.map(|e| (s, e)))
    })
    .await?;
    assert_eq!(bad_status, "requested", "no handshake with an endpoint whose certificate is not trusted");
    assert!(bad_error.contains("could not connect"), "{bad_error}");
    assert!(untrusted.lock().unwrap().is_empty(), "nothing was sent to it");
    notifier.stop().await?;
    std::fs::remove_dir_all(&pki.dir)?;
    composer.stop().await
}

/// A delivery reads the attributions of the members it carries, not all of its partner's: the
/// attribution check was an `EXISTS` that PostgreSQL planned as a hash of every attribution of
/// the partner, built per delivery (60 ms at 60,000 members), so a notifier that fell behind a
/// large partner's stream delivered slower than events arrived and never caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_reads_only_the_attributions_of_its_events() -> anyhow::Result<()> {
    let (_url, pool) = fresh_database("pending_plan", true).await?;
    let members = 20_000;
    sqlx::query(
        "INSERT INTO subscriptions (id, partner_id, topic, channel, content, timeout_secs, max_count, status, body)
         VALUES ('S1', 'big', $1, 'rest-hook', 'id-only', 10, 100, 'active', '{}')",
    )
    .bind(fhir::subscriptions::TOPIC_URL)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO components (kind, source, record_id, member_id, version, deleted, body, event_id, updated_at)
         SELECT 'attribution', 'enrollment', 'AT-' || i, 'M' || lpad(i::text, 6, '0'), 1, false,
                json_build_object('partner_id', 'big', 'period_start', '2026-01-01'), gen_random_uuid(), now()
         FROM generate_series(1, $1) i",
    )
    .bind(members)
    .execute(&pool)
    .await?;
    // Half of the queue delivered, as when a notifier catches up on a backlog.
    sqlx::query(
        "INSERT INTO subscription_events (subscription_id, event_number, member_id, version_id, deleted, occurred_at, delivered_at)
         SELECT 'S1', i, 'M' || lpad(i::text, 6, '0'), 1, false, now(), CASE WHEN i <= $1 / 2 THEN now() END
         FROM generate_series(1, $1) i",
    )
    .bind(members)
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE").execute(&pool).await?;
    let day = time::Date::from_calendar_date(2026, time::Month::December, 7)?;
    let pending = db::subscriptions::pending(&pool, "S1", "big", day, 100, false).await?;
    let numbers: Vec<i64> = pending.iter().map(|e| e.event_number).collect();
    assert_eq!(numbers, (i64::from(members / 2) + 1..=i64::from(members / 2) + 100).collect::<Vec<_>>());
    assert!(pending.iter().all(|e| e.attributed));

    let plan = db::subscriptions::explain_pending(&pool, "S1", "big", day, 100).await?;
    let read = rows_read_from(&plan[0]["Plan"], "components");
    assert!(read <= 100.0, "a delivery of 100 events read {read} attribution rows: {plan:#}");
    Ok(())
}

/// The rows the nodes of an executed plan read from `relation` (actual rows × loops).
fn rows_read_from(node: &Value, relation: &str) -> f64 {
    let own = if node["Relation Name"] == relation {
        node["Actual Rows"].as_f64().unwrap_or(0.0) * node["Actual Loops"].as_f64().unwrap_or(1.0)
    } else {
        0.0
    };
    own + node["Plans"].as_array().into_iter().flatten().map(|child| rows_read_from(child, relation)).sum::<f64>()
}

/// The fan-out (which bumps the counters of every subscription an event matches) and the claims
/// of two notifiers (which lease several subscriptions at once) lock the same rows: they must
/// never wait for each other in a cycle. PostgreSQL resolves a deadlock by failing one side after
/// a second (`deadlock_timeout`), so each one is a stall of every delivery; the fault test's two
/// notifiers met 5–8 per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fan_out_and_two_notifiers_claims_never_deadlock() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const SUBSCRIPTIONS: usize = 8;
    let app = TestApp::new("claimrace").await?;
    let composer = app.composer(&[]).await?;
    for i in 0..SUBSCRIPTIONS {
        sqlx::query(
            "INSERT INTO subscriptions (id, partner_id, topic, channel, content, timeout_secs, max_count, status, body)
             VALUES ($1, 'race', $2, 'rest-hook', 'id-only', 10, 100, 'active', '{}')",
        )
        .bind(format!("S{i}"))
        .bind(fhir::subscriptions::TOPIC_URL)
        .execute(&app.pool)
        .await?;
    }
    let members: Vec<String> = (0..300).map(|i| format!("DL{i:03}")).collect();
    app.apply(&members.iter().map(|m| attribution(m, "race")).collect::<Vec<_>>()).await?;
    // A wave at a time: a member's changes in one composer batch would make one version.
    for n in 1..=3 {
        let wave = members.iter().map(|m| upsert(platform::topics::DEMOGRAPHICS, "enrollment", n, m, m, json!({ "given_name": format!("V{n}") })));
        app.apply(&wave.collect::<Vec<_>>()).await?;
    }
    composer.stop().await?;
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE payload IS NULL").fetch_one(&app.pool).await?;

    // Two claimants claim and release again and again while the fan-out queues the events in
    // small batches (many transactions, each bumping every subscription).
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let claims = Arc::new(AtomicUsize::new(0));
    let claimants: Vec<_> = (0..2)
        .map(|_| {
            let (pool, stop, failures, claims) = (app.pool.clone(), stop.clone(), failures.clone(), claims.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match db::subscriptions::claim_due(&pool, (5, 10), SUBSCRIPTIONS as i64, SUBSCRIPTIONS as i64, &[]).await {
                        Ok(claimed) => {
                            claims.fetch_add(claimed.len(), Ordering::Relaxed);
                            for s in claimed {
                                if let Err(e) = db::subscriptions::release(&pool, &s.id).await {
                                    failures.lock().unwrap().push(format!("release: {e}"));
                                }
                            }
                        }
                        Err(e) => failures.lock().unwrap().push(format!("claim: {e}")),
                    }
                }
            })
        })
        .collect();
    let today = time::OffsetDateTime::now_utc().date();
    let (mut rows, mut queued) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        match db::subscriptions::fan_out(&app.pool, today, 4, fhir::subscriptions::TOPICS).await {
            Ok((0, _)) => break,
            Ok((r, q)) => (rows, queued) = (rows + r, queued + q),
            Err(e) => failures.lock().unwrap().push(format!("fan-out: {e}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in claimants {
        c.await?;
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} statements failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(3)]);
    assert!(claims.load(Ordering::Relaxed) > 0, "the claimants never claimed: the race did not happen");
    assert!(versions as usize >= 3 * members.len(), "{versions} composite versions");
    assert_eq!((rows, queued), (versions as usize, versions as u64 * SUBSCRIPTIONS as u64), "every version queued for every subscription");
    Ok(())
}

/// A notifier killed after Kafka took a Kafka-channel notification and before PostgreSQL recorded
/// it (the test holds the rows that record it): the notifier that takes the subscription over
/// when the lease runs out reads that notification back and records it, instead of sending its
/// events again. Every event number is on the topic once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_killed_after_kafka_took_a_notification_sends_it_once() -> anyhow::Result<()> {
    let app = TestApp::new("subskill").await?;
    let composer = app.composer(&[]).await?;
    let mut stream = Vec::new();
    for i in 0..3 {
        stream.push(demographics(&member(i), json!({ "given_name": "Ines", "sex": "female" })));
        stream.push(attribution(&member(i), "pa"));
    }
    app.apply(&stream).await?;
    let origin = app.api(&[]).await?;
    let pa = bearer_client(&app.partner("pa", SCOPES, KeyKind::Es384).await?.token_with(&origin, SCOPES).await?)?;
    let mut first = Children(vec![spawn_child("notifier", &app.url, &app.prefix, &[])?]);
    let id = kafka_subscription(&pa, &origin, "medication reconciliation").await?;
    let topic = app.topic(&fhir::subscriptions::kafka_topic("pa"));
    let numbers = |records: &[ReadRecord]| -> Vec<i64> {
        records
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(r.value.as_deref().unwrap_or_default()).ok())
            .flat_map(|v| {
                v["entry"][0]["resource"]["notificationEvent"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["eventNumber"].as_str().and_then(|n| n.parse::<i64>().ok()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let undelivered = || async {
        Ok::<i64, anyhow::Error>(
            sqlx::query_scalar("SELECT count(*) FROM subscription_events WHERE subscription_id = $1 AND delivered_at IS NULL")
                .bind(&id)
                .fetch_one(&app.pool)
                .await?,
        )
    };

    // Every version the composer applied is fanned out (whatever events it made).
    let fanned_out = || async {
        app.wait_applied(Duration::from_secs(60)).await?;
        eventually(Duration::from_secs(30), "the outbox fanned out", || async {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE notified_at IS NULL").fetch_one(&app.pool).await?;
            Ok((left == 0).then_some(()))
        })
        .await
    };
    let queued = || async {
        Ok::<i64, anyhow::Error>(
            sqlx::query_scalar("SELECT count(*) FROM subscription_events WHERE subscription_id = $1").bind(&id).fetch_one(&app.pool).await?,
        )
    };

    step("changes delivered as usual");
    for n in 0..3 {
        app.publish(&[change(&member(n % 3), n)]).await?;
    }
    // The members' first versions may have become events too, if the fan-out met them after the
    // subscription was made.
    fanned_out().await?;
    let before = eventually(Duration::from_secs(30), "the first events recorded as delivered", || async {
        let released: bool =
            sqlx::query_scalar("SELECT leased_until IS NULL FROM subscriptions WHERE id = $1").bind(&id).fetch_one(&app.pool).await?;
        let events = queued().await?;
        Ok((released && events >= 3 && undelivered().await? == 0).then_some(events))
    })
    .await?;

    step("three more events sent to Kafka by a notifier that cannot record them, and is killed");
    sqlx::query("UPDATE subscriptions SET next_attempt_at = now() + interval '1 hour' WHERE id = $1").bind(&id).execute(&app.pool).await?;
    for n in 3..6 {
        app.publish(&[change(&member(n % 3), n)]).await?;
    }
    fanned_out().await?;
    assert_eq!(undelivered().await?, 3, "three events queued");
    let mut holder = app.pool.begin().await?;
    sqlx::query("SELECT event_number FROM subscription_events WHERE subscription_id = $1 AND delivered_at IS NULL FOR UPDATE")
        .bind(&id)
        .fetch_all(&mut *holder)
        .await?;
    sqlx::query("UPDATE subscriptions SET next_attempt_at = now() WHERE id = $1").bind(&id).execute(&app.pool).await?;
    let sent = numbers(&read_topic(&topic, 2).await?);
    assert_eq!(sent, (1..=before + 3).collect::<Vec<_>>(), "Kafka took the three events");
    for child in &mut first.0 {
        child.kill()?;
        child.wait()?;
    }
    holder.rollback().await?;
    assert_eq!(undelivered().await?, 3, "PostgreSQL did not record them");

    step("the next notifier takes over when the lease runs out; one more event follows");
    let _second = Children(vec![spawn_child("notifier", &app.url, &app.prefix, &[])?]);
    app.publish(&[change(&member(0), 6)]).await?;
    eventually(Duration::from_secs(60), "the last event recorded as delivered", || async {
        Ok((queued().await? == before + 4 && undelivered().await? == 0).then_some(()))
    })
    .await?;
    let sent = numbers(&read_topic(&topic, 3).await?);
    assert_eq!(sent, (1..=before + 4).collect::<Vec<_>>(), "every event once, in order");
    composer.stop().await
}
