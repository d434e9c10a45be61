//! A real Prometheus (Debian's package, installed by `scripts/test`) scrapes the operations
//! listener of every component, each a process of its own as deployed, and what it recorded
//! matches what the test did: events applied, dead letters by reason, consumer lag back to 0,
//! records published, requests by route template and status, the outbox drained. Then one
//! change is followed by its W3C trace context from the system of record's message to the
//! published records, the rest-hook notification and every component's JSON log.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tests::*;

/// A free loopback port (bound, then released for the process that will use it).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Prometheus {
    base: String,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job, address) every second, with its data in `dir`.
    fn start(dir: &std::path::Path, targets: &[(&str, String)], children: &mut Children) -> anyhow::Result<Prometheus> {
        let binary = which("prometheus").ok_or_else(|| anyhow::anyhow!("prometheus is not installed (scripts/test installs Debian's package)"))?;
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, address) in targets {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{address}']\n"));
        }
        std::fs::create_dir_all(dir)?;
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let port = free_port()?;
        let mut command = std::process::Command::new(binary);
        command
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        children.0.push(command.spawn()?);
        Ok(Prometheus { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() })
    }

    /// The value of an instant PromQL query that yields one sample (`None`: no sample).
    async fn value(&self, query: &str) -> anyhow::Result<Option<f64>> {
        let reply: Value = self.http.get(format!("{}/api/v1/query", self.base)).query(&[("query", query)]).send().await?.json().await?;
        anyhow::ensure!(reply["status"] == "success", "{query}: {reply}");
        let result = reply["data"]["result"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(result.len() <= 1, "{query} gave {} samples: {reply}", result.len());
        Ok(result.first().and_then(|s| s["value"][1].as_str()).and_then(|v| v.parse().ok()))
    }

    /// Waits (up to `timeout`) until `query` yields `expected`.
    async fn expect(&self, query: &str, expected: f64, timeout: Duration) -> anyhow::Result<()> {
        let outcome = eventually(timeout, query, || async { Ok((self.value(query).await? == Some(expected)).then_some(())) }).await;
        match outcome {
            Ok(()) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("{e}: {query} is {:?}, expected {expected}", self.value(query).await?)),
        }
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_component_and_its_figures_match_what_was_sent() -> anyhow::Result<()> {
    let app = TestApp::new("observe").await?;
    let mut children = Children(Vec::new());
    step("the four components as processes, each with its operations listener");
    let mut targets = Vec::new();
    let mut logs = BTreeMap::new();
    for name in ["composer", "relay", "notifier", "api"] {
        let ops = format!("127.0.0.1:{}", free_port()?);
        let log = log_file(&format!("observe-{name}"));
        let log_path = log.display().to_string();
        let mut env = vec![
            ("OPS_ADDR", ops.as_str()),
            ("COMPOSER_GROUP_ID", app.group.as_str()),
            ("LOG_FILE", log_path.as_str()),
            ("LOG_LEVEL", COLLECTED_LOG_LEVEL),
            // Rest-hook endpoints on loopback (a deployment refuses them).
            ("SUBSCRIPTION_ALLOWED_NETWORKS", "127.0.0.0/8"),
            ("SUBSCRIPTION_ALLOW_HTTP", "true"),
        ];
        let http = format!("127.0.0.1:{}", free_port()?);
        if name == "api" {
            env.push(("HTTP_BIND", http.as_str()));
        }
        children.0.push(spawn_child(name, &app.url, &app.prefix, &env)?);
        logs.insert(name, log);
        targets.push((name, ops));
        if name == "api" {
            targets.push(("partner-port", http));
        }
    }
    let client = reqwest::Client::new();
    for (name, ops) in &targets[..4] {
        let ready: Value = eventually(Duration::from_secs(60), &format!("{name} ready"), || async {
            let Ok(reply) = client.get(format!("http://{ops}/ready")).send().await else { return Ok(None) };
            Ok((reply.status() == 200).then_some(reply.json::<Value>().await?))
        })
        .await?;
        assert_eq!(ready["checks"]["postgres"]["status"], "pass", "{name}: {ready}");
        assert_eq!(ready["checks"]["kafka"]["status"], "pass", "{name}: {ready}");
        assert_eq!(client.get(format!("http://{ops}/health")).send().await?.status(), 200, "{name}");
    }
    let origin = format!("http://{}", targets[4].1);
    assert_eq!(client.get(format!("{origin}/metrics")).send().await?.status(), 404, "the partner port serves no metrics");
    let scraped: Vec<(&str, String)> = targets[..4].iter().map(|(n, a)| (*n, a.clone())).collect();
    let prometheus = Prometheus::start(&state_dir().join(unique("prometheus")), &scraped, &mut children)?;

    step("a partner's Kafka-channel subscription");
    let scopes = "system/*.read system/Subscription.write";
    let partner = bearer_client(&app.partner("pobs", scopes, KeyKind::Es384).await?.token_with(&origin, scopes).await?)?;
    kafka_subscription(&partner, &origin, "metrics").await?;

    step("what the test does: valid events, malformed ones, requests");
    let members = 30;
    let attributed = 10;
    let mut messages: Vec<_> = (0..attributed).map(|i| attribution(&format!("OBS{i}"), "pobs")).collect();
    messages.extend((0..members).map(|i| demographics(&format!("OBS{i}"), json!({ "given_name": "Ob", "sex": "female" }))));
    messages.extend((0..members).map(|i| medication(&format!("OBS{i}"), &format!("RX-OBS{i}"), 1, "860975", "active")));
    let (invalid_json, schema) = (7, 4);
    let raw =
        |value: &[u8]| devtools::generator::SorMessage { topic: platform::topics::DEMOGRAPHICS, key: "OBS0".into(), value: Some(value.to_vec()) };
    messages.extend((0..invalid_json).map(|_| raw(b"{ not json")));
    messages.extend((0..schema).map(|_| raw(br#"{"op": "upsert"}"#)));
    app.apply(&messages).await?;
    let metadata_reads = 5;
    for _ in 0..metadata_reads {
        assert_eq!(client.get(format!("{origin}/fhir/metadata")).send().await?.status(), 200);
    }
    let no_token = 3;
    for i in 0..no_token {
        assert_eq!(client.get(format!("{origin}/fhir/Patient/OBS{i}/$medication-profile")).send().await?.status(), 401);
    }

    step("what Prometheus recorded");
    let t = Duration::from_secs(30);
    for job in ["composer", "relay", "notifier", "api"] {
        prometheus.expect(&format!("up{{job=\"{job}\"}}"), 1.0, t).await?;
    }
    let events = (2 * members + attributed) as f64;
    prometheus.expect("sum(fhir_composer_events_total{outcome=\"applied\"})", events, t).await?;
    prometheus.expect("fhir_composer_dead_letters_total{reason=\"invalid-json\"}", invalid_json as f64, t).await?;
    prometheus.expect("fhir_composer_dead_letters_total{reason=\"schema\"}", schema as f64, t).await?;
    prometheus.expect("sum(fhir_composer_dead_letters_total)", (invalid_json + schema) as f64, t).await?;
    prometheus.expect("fhir_composer_messages_total", events + (invalid_json + schema) as f64, t).await?;
    prometheus.expect("sum(fhir_composer_consumer_lag)", 0.0, t).await?;
    prometheus.expect("count(fhir_composer_consumer_lag) >= bool 6", 1.0, t).await?;
    let versions = db::composites::all_composites(&app.pool).await?.iter().map(|c| c.version_id).sum::<i64>() as f64;
    prometheus.expect("fhir_composer_composite_versions_total", versions, t).await?;
    prometheus.expect("fhir_relay_records_published_total{topic=\"fhir.medication-profile.v1\"}", versions, t).await?;
    prometheus.expect("fhir_outbox_unpublished", 0.0, t).await?;
    prometheus.expect("fhir_outbox_unnotified", 0.0, t).await?;
    prometheus.expect("fhir_http_requests_total{route=\"/fhir/metadata\",method=\"GET\",status=\"200\"}", metadata_reads as f64, t).await?;
    prometheus
        .expect("fhir_http_requests_total{route=\"/fhir/Patient/{id}/$medication-profile\",method=\"GET\",status=\"401\"}", no_token as f64, t)
        .await?;
    prometheus.expect("fhir_http_request_seconds_count{route=\"/fhir/Patient/{id}/$medication-profile\",method=\"GET\"}", no_token as f64, t).await?;
    prometheus.expect("fhir_api_audit_unpublished", 0.0, t).await?;
    // The attributed members' composite versions, one event each, delivered on the Kafka channel.
    let queued = "fhir_notifier_events_queued_total";
    eventually(t, "every composite version fanned out", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE notified_at IS NULL").fetch_one(&app.pool).await?;
        Ok((left == 0).then_some(()))
    })
    .await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM subscription_events").fetch_one(&app.pool).await?;
    // (Fewer than one per attributed member when a member's versions were written before its
    // attribution, which arrives on another topic.)
    assert!(events > 0, "events for the partner's members");
    prometheus.expect(queued, events as f64, t).await?;
    prometheus.expect(&format!("fhir_notifier_events_delivered_total - {queued}"), 0.0, t).await?;
    prometheus.expect("fhir_subscription_queue_depth{partner=\"pobs\",status=\"active\"}", 0.0, t).await?;
    prometheus.expect("fhir_notifier_deliveries_total{channel=\"kafka\",kind=\"handshake\",outcome=\"delivered\"}", 1.0, t).await?;
    prometheus.expect("fhir_notifier_deliveries_total{channel=\"kafka\",kind=\"event-notification\",outcome=\"delivered\"} > bool 0", 1.0, t).await?;
    prometheus.expect("sum(fhir_notifier_deliveries_total{outcome=\"failed\"})", 0.0, t).await?;
    prometheus.expect("sum(fhir_api_match_requests_total)", 0.0, t).await?;
    for job in ["composer", "relay", "notifier", "api"] {
        prometheus.expect(&format!("fhir_db_pool_max_connections{{job=\"{job}\"}} > bool 0"), 1.0, t).await?;
    }

    step("the committed alerts and dashboard name only metrics the components export");
    let names: Value = prometheus.http.get(format!("{}/api/v1/label/__name__/values", prometheus.base)).send().await?.json().await?;
    let exported: Vec<&str> = names["data"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo_path("monitoring/dashboard.json"))?)?;
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(queries.len() >= 14, "{queries:?}");
    for query in &queries {
        // Prometheus parses and evaluates it.
        prometheus.value(&format!("count({query})")).await.map_err(|e| anyhow::anyhow!("dashboard query {query}: {e}"))?;
    }
    let alerts = std::fs::read_to_string(repo_path("monitoring/alerts.yml"))?;
    let mut referenced: Vec<&str> = queries.iter().map(String::as_str).chain([alerts.as_str()]).flat_map(metric_names).collect();
    referenced.sort();
    referenced.dedup();
    let missing: Vec<&&str> = referenced.iter().filter(|name| !exported.contains(name)).collect();
    assert!(missing.is_empty(), "referenced but not exported: {missing:?}");

    step("one change followed by its trace context");
    let hook = Hook::start().await?;
    let rest_hook = json!({ "resourceType": "Subscription", "status": "requested", "reason": "trace",
        "criteria": fhir::subscriptions::TOPIC_URL,
        "channel": { "type": "rest-hook", "endpoint": hook.url, "payload": "application/fhir+json",
            "extension": [{ "url": "urn:fhir-event-platform:extension:signing-secret", "valueString": "ab".repeat(32) }] } });
    let created = send(post_fhir(&partner, &format!("{origin}/fhir/Subscription"), &rest_hook)).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    eventually(Duration::from_secs(20), "the rest-hook handshake", || async { Ok((!hook.traces().is_empty()).then_some(())) }).await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let change = medication("OBS0", "RX-OBS0", 2, "860975", "stopped");
    let producer = devtools::generator::producer(&app.kafka)?;
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header { key: "traceparent", value: Some(sent.as_str()) });
    let topic = app.topic(change.topic);
    let record = rdkafka::producer::FutureRecord::to(&topic).key(&change.key).payload(change.value.as_deref().unwrap_or_default()).headers(headers);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    app.count_sent(1);
    app.wait_applied(Duration::from_secs(30)).await?;
    let version = db::composites::current_composite(&app.pool, "OBS0").await?.map(|c| c.version_id).unwrap_or_default().to_string();
    let traced = |records: Vec<ReadRecord>| records.into_iter().find(|r| r.key == "OBS0" && r.header("versionId") == version);
    for published in [platform::topics::MEDICATION_PROFILE.to_owned(), platform::topics::partner_profile("pobs")] {
        let record = traced(read_topic(&app.topic(&published), 1).await?).ok_or_else(|| anyhow::anyhow!("OBS0 v{version} not on {published}"))?;
        let header = platform::trace::TraceParent::parse(record.header("traceparent"));
        assert_eq!(header.map(|t| t.trace_id()).as_deref(), Some(trace_id), "{published}: {:?}", record.headers);
        assert_ne!(record.header("traceparent"), sent, "{published}: the composer's own span, not the sender's");
    }
    eventually(Duration::from_secs(20), "the rest-hook notification's traceparent", || async {
        Ok(hook
            .traces()
            .iter()
            .any(|t| t.as_deref().and_then(platform::trace::TraceParent::parse).is_some_and(|t| t.trace_id() == trace_id))
            .then_some(()))
    })
    .await?;
    let api_trace = "0af7651916cd43dd8448eb211c80319c";
    let read = client.get(format!("{origin}/fhir/Patient/OBS0")).header("traceparent", format!("00-{api_trace}-b7ad6b7169203331-01")).send().await?;
    assert_eq!(read.status(), 401);
    for (name, expected) in [("composer", trace_id), ("relay", trace_id), ("notifier", trace_id), ("api", api_trace)] {
        eventually(Duration::from_secs(10), &format!("{name} logs the trace id"), || async {
            let text = std::fs::read_to_string(&logs[name]).unwrap_or_default();
            let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            Ok(lines.iter().any(|l| l.to_string().contains(expected)).then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// A rest-hook endpoint that answers 200 and keeps each notification's `traceparent` header.
struct Hook {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl Hook {
    async fn start() -> anyhow::Result<Hook> {
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>> = Default::default();
        let kept = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let kept = kept.clone();
                async move {
                    let trace = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    kept.lock().map(|mut k| k.push(trace)).ok();
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Hook { url, seen })
    }

    fn traces(&self) -> Vec<Option<String>> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The `fhir_…` metric names in `text`.
fn metric_names(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices("fhir_").map(move |(at, _)| {
        let end = text[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(text.len(), |n| at + n);
        &text[at..end]
    })
}
