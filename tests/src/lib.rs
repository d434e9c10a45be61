//! Shared support for the end-to-end tests: every test gets a fresh PostgreSQL database and its
//! own Kafka topic namespace on the real services started by `scripts/services up`.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://fhir:fhir@127.0.0.1:5432/fhir?sslmode=disable".to_owned())
}

pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A short unique name for this test's database and topics.
pub fn unique(label: &str) -> String {
    format!("t_{label}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A path in this checkout, relative to the repository root. Resolved when the test runs (cargo
/// runs tests in their package's directory, and sets `CARGO_MANIFEST_DIR`), not when it is
/// compiled: the shared target directory can hold test binaries built from another clone.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    package.join("..").join(relative)
}

/// Creates an empty database (named `t_…`; `scripts/test` drops old ones) and returns its URL,
/// migrated when `migrate` is set.
pub async fn fresh_database(label: &str, migrate: bool) -> anyhow::Result<(String, db::Pool)> {
    let base = database_url();
    let admin = db::connect(&base, 1).await?;
    let name = unique(label);
    db::create_database(&admin, &name).await?;
    admin.close().await;
    let url = db::url_with_database(&base, &name)?;
    let pool = db::connect(&url, 8).await?;
    if migrate {
        db::migrate(&pool).await?;
    }
    Ok((url, pool))
}

pub fn admin_client() -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create()?)
}

pub async fn create_topic(name: &str, partitions: i32, config: &[(&str, &str)]) -> anyhow::Result<()> {
    let admin = admin_client()?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let results = admin.create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A composer configuration for a test: its database, topic namespace and consumer group.
pub fn composer_config(database_url: &str, prefix: &str, group: &str) -> composer::ComposerConfig {
    composer_config_with(database_url, prefix, group, &[])
}

/// As [`composer_config`], with extra flags (e.g. PMM1 secrets and key ids).
pub fn composer_config_with(database_url: &str, prefix: &str, group: &str, extra: &[&str]) -> composer::ComposerConfig {
    use clap::Parser;
    init_logs();
    let kafka = kafka_bootstrap();
    let base = [
        "composer",
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        &kafka,
        "--kafka-topic-prefix",
        prefix,
        "--group-id",
        group,
        "--fhir-base-url",
        "http://fhir.test/fhir",
        "--database-max-connections",
        "4",
    ];
    composer::ComposerConfig::parse_from(base.iter().copied().chain(extra.iter().copied()))
}

/// A binary of this workspace, built next to the test executables (`cargo build --workspace`).
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).ok_or_else(|| anyhow::anyhow!("unexpected test path"))?;
    let bin = dir.join(name);
    anyhow::ensure!(bin.exists(), "{} not built: run `cargo build --workspace` first (scripts/test does)", bin.display());
    Ok(bin)
}

/// Messages a consumer group has applied, from the offsets stored in PostgreSQL (topics of a
/// test start empty, so the sum of positions counts the messages).
pub async fn applied_messages(pool: &db::Pool, group: &str) -> anyhow::Result<i64> {
    Ok(db::composer::total_position(pool, group).await?)
}

/// Waits until `group` applied `total` messages.
pub async fn wait_applied(pool: &db::Pool, group: &str, total: usize, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "the composer to apply every message", || async { Ok((applied_messages(pool, group).await? >= total as i64).then_some(())) })
        .await
}

/// The contract topic names in a test namespace, as a composer with that prefix sees them.
pub fn kafka_config(prefix: &str) -> platform::KafkaConfig {
    platform::KafkaConfig {
        bootstrap_servers: kafka_bootstrap(),
        topic_prefix: prefix.to_owned(),
        message_max_bytes: 1_048_576,
        topic_partitions: 3,
        replication_factor: 1,
    }
}

/// A composite's content: the Bundle without `meta` and `timestamp` (the time of the change).
pub fn content(body: &str) -> anyhow::Result<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(body)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("meta");
        o.remove("timestamp");
    }
    Ok(v)
}

/// What must hold of stored composites after any run, interrupted or not:
/// - each member's history is versions 1..n, no gaps or repeats, and the current row is the last;
/// - consecutive versions differ in content (a version only when content changes);
/// - the outbox has exactly one row per history row, in version order per member, with the
///   same body (or a tombstone), keyed by member, with unique event ids;
/// - every stored body parses with fhir-sdk as an R4B Bundle whose id and versionId match, with
///   the member's Patient and every other entry referencing `Patient/<member>`.
///
/// Returns the number of versions checked.
pub async fn check_composite_invariants(pool: &db::Pool) -> anyhow::Result<usize> {
    use anyhow::{bail, ensure};
    use db::composer::{all_composites, all_history, all_outbox};
    use std::collections::{BTreeMap, HashSet};

    let history = all_history(pool).await?;
    let current: BTreeMap<String, db::composer::VersionRow> = all_composites(pool).await?.into_iter().map(|c| (c.member_id.clone(), c)).collect();
    let mut by_member: BTreeMap<&str, Vec<&db::composer::VersionRow>> = BTreeMap::new();
    for h in &history {
        by_member.entry(&h.member_id).or_default().push(h);
    }
    ensure!(by_member.len() == current.len(), "{} members with history, {} composites", by_member.len(), current.len());
    for (member, versions) in &by_member {
        for (i, v) in versions.iter().enumerate() {
            ensure!(v.version_id == i as i64 + 1, "{member}: history versions {:?}", versions.iter().map(|v| v.version_id).collect::<Vec<_>>());
            ensure!(v.deleted == v.body.is_none(), "{member} v{}: deleted flag and body disagree", v.version_id);
            if let Some(body) = &v.body {
                check_bundle(member, v.version_id, body)?;
            }
            if i > 0 {
                let prev = versions[i - 1];
                let same = match (&prev.body, &v.body) {
                    (Some(a), Some(b)) => content(a)? == content(b)?,
                    (None, None) => true,
                    _ => false,
                };
                ensure!(!same, "{member}: v{} repeats v{} without a content change", v.version_id, prev.version_id);
            }
        }
        let last = versions.last().expect("non-empty");
        let cur = current.get(*member).ok_or_else(|| anyhow::anyhow!("{member}: history without a composite"))?;
        ensure!(cur == *last, "{member}: current composite is not the last history version");
    }

    let outbox = all_outbox(pool).await?;
    ensure!(outbox.len() == history.len(), "{} outbox rows for {} versions", outbox.len(), history.len());
    let mut ids = HashSet::new();
    let mut next_version: BTreeMap<&str, i64> = BTreeMap::new();
    let by_key: BTreeMap<(&str, i64), &db::composer::VersionRow> = history.iter().map(|h| ((h.member_id.as_str(), h.version_id), h)).collect();
    for (topic, key, event_id, row) in &outbox {
        ensure!(topic == platform::topics::MEDICATION_PROFILE, "outbox topic {topic}");
        ensure!(key == &row.member_id, "outbox key {key} for member {}", row.member_id);
        ensure!(ids.insert(*event_id), "duplicate outbox event id {event_id}");
        let expected = next_version.entry(&row.member_id).or_insert(1);
        ensure!(row.version_id == *expected, "{}: outbox version {} where {} was next", row.member_id, row.version_id, expected);
        *expected += 1;
        match by_key.get(&(row.member_id.as_str(), row.version_id)) {
            Some(h) if *h == row => {}
            _ => bail!("{} v{}: outbox row differs from history", row.member_id, row.version_id),
        }
    }
    Ok(history.len())
}

fn check_bundle(member: &str, version: i64, body: &str) -> anyhow::Result<()> {
    use anyhow::ensure;
    let bundle = fhir::mapping::parse_bundle(body).map_err(|e| anyhow::anyhow!("{member} v{version}: not an R4B Bundle: {e}"))?;
    ensure!(bundle.id.as_deref() == Some(member), "{member}: bundle id {:?}", bundle.id);
    let version_id = bundle.meta.as_ref().and_then(|m| m.version_id.clone());
    ensure!(version_id == Some(version.to_string()), "{member} v{version}: meta.versionId {version_id:?}");
    let (patients, links) = fhir::mapping::bundle_patient_links(&bundle);
    ensure!(patients == [member], "{member} v{version}: Patient entries {patients:?}");
    for (kind, id, reference) in links {
        ensure!(reference == format!("Patient/{member}"), "{member} v{version}: {kind}/{id} references {reference:?}");
    }
    Ok(())
}

/// Where `scripts/test` collects everything the platform logs during the run (for the PHI scan).
pub fn test_log_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("PLATFORM_TEST_LOG_DIR").map(std::path::PathBuf::from)
}

/// The filter for logs collected in [`test_log_dir`]: more than an operator's default.
pub const COLLECTED_LOG_LEVEL: &str = "info,api=debug,composer=debug,db=debug,platform=debug";

/// A log file in [`test_log_dir`] for one process.
pub fn collected_log_file(label: &str) -> Option<std::path::PathBuf> {
    let dir = test_log_dir()?;
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(format!("{label}-{}-{}.jsonl", std::process::id(), &Uuid::new_v4().simple().to_string()[..8])))
}

/// Logs of in-process components go to the test's output (`TEST_LOG` sets the filter) and,
/// under `scripts/test`, to a collected log file.
pub fn init_logs() {
    let level = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let exe = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())).unwrap_or_default();
    let file = collected_log_file(&exe);
    platform::telemetry::init_to(&level, platform::LogFormat::Text, file.as_deref().map(|f| (f, COLLECTED_LOG_LEVEL)));
}

/// Sends a child process's logs, in full, to the collection the PHI scan reads (under
/// `scripts/test`; otherwise the command is left as it is).
pub fn collect_logs(command: &mut std::process::Command, label: &str) {
    if let Some(file) = collected_log_file(label) {
        command.env("LOG_FILE", file).env("LOG_LEVEL", COLLECTED_LOG_LEVEL).stderr(std::process::Stdio::null());
    }
}

/// Remembers a secret the suite handled (a bearer token, a client assertion), so that the log
/// scan can prove the platform never logged it.
pub fn remember_secret(secret: &str) {
    if let Some(dir) = test_log_dir() {
        use std::io::Write;
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("secrets.txt")) {
            let _ = writeln!(f, "{secret}");
        }
    }
}

/// Starts the API on a random port against `database_url`; returns its base URL.
pub async fn start_api(database_url: &str, fhir_base_url: &str) -> anyhow::Result<String> {
    start_api_on(database_url, "127.0.0.1:0", fhir_base_url).await
}

/// Starts the API on `bind` against `database_url`; returns its base URL.
pub async fn start_api_on(database_url: &str, bind: &str, fhir_base_url: &str) -> anyhow::Result<String> {
    start_api_with(database_url, bind, fhir_base_url, &[]).await
}

/// Starts the API with extra flags (e.g. `--rate-limit-burst 5`). Its topics (the audit topic)
/// are in a namespace named after the database, so tests never see each other's messages.
pub async fn start_api_with(database_url: &str, bind: &str, fhir_base_url: &str, extra: &[&str]) -> anyhow::Result<String> {
    use clap::Parser;
    init_logs();
    let prefix = format!("{}.", api_topic_prefix(database_url));
    let mut args = vec![
        "api",
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        &kafka_bootstrap(),
        "--kafka-topic-prefix",
        &prefix,
        "--http-bind",
        bind,
        "--fhir-base-url",
        fhir_base_url,
        "--database-max-connections",
        "4",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let config = api::Config::try_parse_from(args)?;
    let app = api::Application::build(&config).await?;
    let addr = app.local_addr()?;
    tokio::spawn(app.run_until_stopped());
    Ok(format!("http://{addr}"))
}

/// The topic namespace of an API started on `database_url` (without the trailing dot).
pub fn api_topic_prefix(database_url: &str) -> String {
    let path = database_url.split('?').next().unwrap_or_default();
    path.rsplit('/').next().unwrap_or("api").to_owned()
}

/// How a test partner signs its client assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Es384,
    Rs384,
}

/// A partner registered in a test's database, with its private key.
pub struct TestPartner {
    pub id: String,
    pub key: api::auth::client::ClientKey,
}

/// A new RSA key from the `openssl` command (ring verifies RSA but does not generate keys).
pub fn rsa_key(kid: &str) -> anyhow::Result<api::auth::client::ClientKey> {
    let dir = std::env::temp_dir().join(unique("rsa"));
    std::fs::create_dir_all(&dir)?;
    let pem_path = dir.join("key.pem");
    let status = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&pem_path)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let out = std::process::Command::new("openssl").args(["rsa", "-noout", "-modulus", "-in"]).arg(&pem_path).output()?;
    anyhow::ensure!(out.status.success(), "openssl rsa -modulus failed");
    let hex = String::from_utf8(out.stdout)?.trim().trim_start_matches("Modulus=").to_owned();
    let modulus = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()?;
    let pem = std::fs::read(&pem_path)?;
    std::fs::remove_dir_all(&dir)?;
    api::auth::client::ClientKey::rs384_from_pem(kid, &pem, &modulus)
}

/// Registers a partner with a fresh key of `kind` and the given scopes and rate limit.
pub async fn register_partner(pool: &db::Pool, id: &str, scopes: &str, kind: KeyKind, rate: Option<(f64, i32)>) -> anyhow::Result<TestPartner> {
    let kid = format!("{id}-key");
    let key = match kind {
        KeyKind::Es384 => api::auth::client::ClientKey::generate_es384(&kid)?.0,
        KeyKind::Rs384 => rsa_key(&kid)?,
    };
    let jwks = api::auth::client::ClientKey::jwks(&[&key]).to_string();
    let scopes: Vec<String> = scopes.split_whitespace().map(str::to_owned).collect();
    let registration = db::partners::Registration {
        partner_id: id,
        name: id,
        jwks: &jwks,
        scopes: &scopes,
        rate_per_second: rate.map(|r| r.0),
        rate_burst: rate.map(|r| r.1),
        pmm1_key_ids: &[],
    };
    db::partners::register(pool, &registration).await?;
    Ok(TestPartner { id: id.to_owned(), key })
}

impl TestPartner {
    /// The token endpoint, as a SMART client discovers it.
    pub async fn token_url(origin: &str) -> anyhow::Result<String> {
        let config: serde_json::Value = reqwest::get(format!("{origin}/.well-known/smart-configuration")).await?.json().await?;
        config["token_endpoint"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no token_endpoint"))
    }

    /// A client assertion for this partner, `lifetime` seconds long.
    pub async fn assertion(&self, origin: &str, lifetime: i64) -> anyhow::Result<String> {
        let assertion = self.key.assertion(&self.id, &Self::token_url(origin).await?, lifetime, None)?;
        remember_secret(&assertion);
        Ok(assertion)
    }

    /// Posts a token request; returns the status, headers and body.
    pub async fn request_token(origin: &str, assertion: &str, scope: &str) -> anyhow::Result<(u16, reqwest::header::HeaderMap, serde_json::Value)> {
        let r = reqwest::Client::new()
            .post(format!("{origin}{}", api::auth::token::PATH))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(api::auth::client::token_request(assertion, scope))
            .send()
            .await?;
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let body: serde_json::Value = r.json().await?;
        if let Some(t) = body["access_token"].as_str() {
            remember_secret(t);
        }
        Ok((status, headers, body))
    }

    /// A bearer token with `scope`, through the whole SMART Backend Services flow.
    pub async fn token_with(&self, origin: &str, scope: &str) -> anyhow::Result<String> {
        let (status, _, body) = Self::request_token(origin, &self.assertion(origin, 240).await?, scope).await?;
        anyhow::ensure!(status == 200, "token refused ({status}): {body}");
        body["access_token"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no access_token in {body}"))
    }

    pub async fn token(&self, origin: &str) -> anyhow::Result<String> {
        self.token_with(origin, "system/*.read").await
    }

    /// An HTTP client that sends this partner's bearer token.
    pub async fn client(&self, origin: &str) -> anyhow::Result<reqwest::Client> {
        bearer_client(&self.token(origin).await?)
    }
}

pub fn bearer_client(token: &str) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    Ok(reqwest::Client::builder().default_headers(headers).build()?)
}

/// An attribution event: `member` is served by `partner` from 2026-01-01, open-ended.
pub fn attribution(member: &str, partner: &str) -> devtools::generator::SorMessage {
    devtools::generator::SorMessage {
        topic: platform::topics::ATTRIBUTION,
        key: member.to_owned(),
        value: Some(native_event(
            "upsert",
            "attribution",
            1,
            member,
            &format!("AT-{member}-{partner}"),
            Some(serde_json::json!({ "partner_id": partner, "relationship": "pcp", "period_start": "2026-01-01" })),
        )),
    }
}

/// A native envelope event, as a system of record would publish it.
pub fn native_event(op: &str, source: &str, version: i64, member: &str, record: &str, data: Option<serde_json::Value>) -> Vec<u8> {
    let mut v = serde_json::json!({ "event_id": Uuid::new_v4().to_string(), "op": op, "source": source,
        "occurred_at": "2026-11-20T10:15:00Z", "version": version, "member_id": member, "record_id": record });
    if let Some(d) = data {
        v["data"] = d;
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Starts a relay task publishing the outbox of `database_url` under the topic `prefix`.
pub async fn start_relay(
    database_url: &str,
    prefix: &str,
) -> anyhow::Result<(std::sync::Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    use clap::Parser;
    let config = relay::RelayConfig::parse_from([
        "relay",
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        &kafka_bootstrap(),
        "--kafka-topic-prefix",
        prefix,
    ]);
    relay::spawn(config).await
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: std::collections::BTreeMap<String, String>,
}

impl ReadRecord {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// Every record of `topic` from the beginning (in order per partition): reads until
/// `expected_at_least` arrived and then 3 s passed without another, or 30 s without any.
pub async fn read_topic(topic: &str, expected_at_least: usize) -> anyhow::Result<Vec<ReadRecord>> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut records = Vec::new();
    loop {
        let wait = if records.len() >= expected_at_least { Duration::from_secs(3) } else { Duration::from_secs(30) };
        let Ok(m) = tokio::time::timeout(wait, consumer.recv()).await else { break };
        let m = m?;
        let headers = m
            .headers()
            .map(|h| h.iter().map(|x| (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())).collect())
            .unwrap_or_default();
        records.push(ReadRecord {
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    Ok(records)
}

/// An upsert by a system of record (native envelope) as a message on its topic, keyed by member.
pub fn upsert(
    topic: &'static str,
    source: &str,
    version: i64,
    member: &str,
    record: &str,
    data: serde_json::Value,
) -> devtools::generator::SorMessage {
    devtools::generator::SorMessage {
        topic,
        key: member.to_owned(),
        value: Some(native_event("upsert", source, version, member, record, Some(data))),
    }
}

/// A member's demographics from `enrollment`, version 1 (the record id is the member id).
pub fn demographics(member: &str, data: serde_json::Value) -> devtools::generator::SorMessage {
    upsert(platform::topics::DEMOGRAPHICS, "enrollment", 1, member, member, data)
}

/// A pharmacy claim (`rx-claims`) for `record` of the member.
pub fn medication(member: &str, record: &str, version: i64, rxnorm_code: &str, status: &str) -> devtools::generator::SorMessage {
    upsert(platform::topics::MEDICATIONS, "rx-claims", version, member, record, serde_json::json!({ "rxnorm_code": rxnorm_code, "status": status }))
}
