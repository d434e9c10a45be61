//! Synthetic systems-of-record traffic for N members: real RxNorm, SNOMED and CVX codes from
//! `data/codes.json`, both envelopes, and a share of out-of-order versions, redeliveries,
//! deletes and malformed messages. Deterministic for a seed. The demo, the tests and the
//! benchmarks use it (`cargo run -p composer --bin generate`).

use platform::{KafkaConfig, topics};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::OnceLock;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Deserialize)]
struct Codes {
    rxnorm: Vec<(String, String)>,
    allergens: Vec<(String, String, String)>,
    reactions: Vec<String>,
    cvx: Vec<(String, String)>,
    tasks: Vec<(String, String)>,
    given: Vec<String>,
    family: Vec<String>,
    streets: Vec<String>,
    cities: Vec<(String, String, String)>,
}

fn codes() -> &'static Codes {
    static CODES: OnceLock<Codes> = OnceLock::new();
    CODES.get_or_init(|| serde_json::from_str(include_str!("../data/codes.json")).expect("data/codes.json is valid"))
}

#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub members: usize,
    /// Members are `M` + a 7-digit number starting here (lets runs add members).
    pub first_member: usize,
    pub seed: u64,
    /// Share of records whose versions arrive out of order.
    pub out_of_order: f64,
    /// Share of events delivered twice.
    pub duplicates: f64,
    /// Share of records whose last event is a delete.
    pub deletes: f64,
    /// Share of members whose demographics are deleted at the end.
    pub member_deletes: f64,
    /// Share of records published in the Debezium envelope.
    pub debezium: f64,
    /// Malformed messages mixed in (invalid JSON, schema violations, impossible dates).
    pub malformed: usize,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            members: 100,
            first_member: 1,
            seed: 42,
            out_of_order: 0.05,
            duplicates: 0.03,
            deletes: 0.05,
            member_deletes: 0.01,
            debezium: 0.2,
            malformed: 0,
        }
    }
}

/// One message for a `sor.*` topic (contract name; the publisher adds the namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SorMessage {
    pub topic: &'static str,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

pub fn member_id(n: usize) -> String {
    format!("M{n:07}")
}

struct Record {
    topic: &'static str,
    source: &'static str,
    record_id: String,
    debezium: bool,
    /// Field values per version (None: a delete).
    versions: Vec<Option<Value>>,
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn date(rng: &mut StdRng, from_year: i32, to_year: i32) -> String {
    format!("{:04}-{:02}-{:02}", rng.random_range(from_year..=to_year), rng.random_range(1..=12), rng.random_range(1..=28))
}

/// A last fill date before today: most within the supply's days (refilled on time), about one
/// in five up to a quarter of the supply later than that (a refill running late; past the grace
/// period, a refill-gap insight).
fn recent_fill(rng: &mut StdRng, days_supply: i64) -> String {
    let ago = rng.random_range(0..=days_supply + days_supply / 4);
    (time::OffsetDateTime::now_utc().date() - time::Duration::days(ago)).to_string()
}

/// The demographics record of a synthetic person (names from `data/codes.json`, with their
/// accents, hyphens and apostrophes).
pub fn person(rng: &mut StdRng) -> Value {
    let c = codes();
    let (city, state, zip3) = pick(rng, &c.cities).clone();
    json!({
        "given_name": pick(rng, &c.given), "family_name": pick(rng, &c.family),
        "birth_date": date(rng, 1935, 2015), "sex": pick(rng, &["male", "female", "female", "male", "other", "unknown"]),
        "address_line": format!("{} {}", rng.random_range(1..9999), pick(rng, &c.streets)),
        "city": city, "state": state, "postal_code": format!("{zip3}{:02}", rng.random_range(1..99)),
        "phone": format!("{}-555-{:04}", rng.random_range(201..989), rng.random_range(0..9999)),
    })
}

fn member_records(rng: &mut StdRng, cfg: &GeneratorConfig, member: &str) -> Vec<Record> {
    let c = codes();
    let mut records = Vec::new();
    let mut add = |rng: &mut StdRng, topic, source, record_id: String, versions: Vec<Option<Value>>| {
        let debezium = rng.random_bool(cfg.debezium);
        records.push(Record { topic, source, record_id, debezium, versions });
    };

    let mut versions: Vec<Option<Value>> = (0..rng.random_range(1..=2)).map(|_| Some(person(rng))).collect();
    if rng.random_bool(cfg.member_deletes) {
        versions.push(None);
    }
    add(rng, topics::DEMOGRAPHICS, "enrollment", member.to_owned(), versions);

    for i in 0..rng.random_range(1..=5) {
        let (code, display) = pick(rng, &c.rxnorm).clone();
        let start = date(rng, 2018, 2025);
        let mut versions = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            let days_supply = *pick(rng, &[30, 60, 90]);
            let mut v = json!({
                "rxnorm_code": code, "display": display,
                "status": pick(rng, &["active", "active", "active", "completed", "stopped", "on-hold"]),
                "dosage_text": pick(rng, &["1 tablet by mouth daily", "1 tablet twice daily", "as needed for pain"]),
                "effective_start": start, "last_fill_date": recent_fill(rng, days_supply),
                "days_supply": days_supply, "quantity": pick(rng, &[30.0, 60.0, 90.0, 0.5]),
                "prescriber_npi": format!("1{:09}", rng.random_range(0..999_999_999)),
            });
            if rng.random_bool(0.2) {
                v["effective_end"] = json!(date(rng, 2026, 2027));
            }
            versions.push(Some(v));
        }
        if rng.random_bool(cfg.deletes) {
            versions.push(None);
        }
        add(rng, topics::MEDICATIONS, "rx-claims", format!("RX-{member}-{i}"), versions);
    }
    for i in 0..rng.random_range(0..=2) {
        let (system, code, display) = pick(rng, &c.allergens).clone();
        let mut versions = vec![Some(json!({
            "code_system": system, "code": code, "display": display,
            "clinical_status": pick(rng, &["active", "active", "inactive", "resolved"]),
            "criticality": pick(rng, &["low", "high", "unable-to-assess"]),
            "reaction": pick(rng, &c.reactions), "recorded_date": date(rng, 2000, 2025),
        }))];
        if rng.random_bool(cfg.deletes) {
            versions.push(None);
        }
        add(rng, topics::ALLERGIES, "emr", format!("AL-{member}-{i}"), versions);
    }
    for i in 0..rng.random_range(0..=3) {
        let (code, display) = pick(rng, &c.cvx).clone();
        let mut versions = vec![Some(json!({
            "cvx_code": code, "display": display, "status": pick(rng, &["completed", "completed", "not-done"]),
            "occurrence_date": date(rng, 2015, 2026), "lot_number": format!("LOT{}", rng.random_range(1000..9999)),
        }))];
        if rng.random_bool(cfg.deletes) {
            versions.push(None);
        }
        add(rng, topics::IMMUNIZATIONS, "imm-registry", format!("IM-{member}-{i}"), versions);
    }
    for i in 0..rng.random_range(0..=2) {
        let (code, description) = pick(rng, &c.tasks).clone();
        let versions = vec![
            Some(json!({ "task_code": code, "description": description, "status": "requested",
                "priority": pick(rng, &["routine", "urgent"]), "due_date": date(rng, 2026, 2027) })),
            Some(json!({ "task_code": code, "description": description,
                "status": pick(rng, &["requested", "in-progress", "completed", "cancelled"]),
                "priority": "routine", "due_date": date(rng, 2026, 2027) })),
        ];
        let keep = rng.random_range(1..=2);
        add(rng, topics::CARE_TASKS, "care-mgmt", format!("TK-{member}-{i}"), versions[..keep].to_vec());
    }
    if rng.random_bool(0.8) {
        let versions = vec![Some(json!({
            "partner_id": format!("partner-{}", rng.random_range(1..=3)), "relationship": "pcp",
            "period_start": "2026-01-01",
        }))];
        add(rng, topics::ATTRIBUTION, "attribution", format!("AT-{member}"), versions);
    }
    records
}

fn encode(rng: &mut StdRng, member: &str, record: &Record, version: i64, data: &Option<Value>) -> Vec<u8> {
    if record.debezium {
        let row = |fields: &Value| {
            let mut row = fields.as_object().cloned().unwrap_or_default();
            row.insert("member_id".into(), json!(member));
            row.insert("record_id".into(), json!(record.record_id));
            Value::Object(row)
        };
        // Debezium carries the previous row on delete; the position is the version.
        let (op, before, after) = match data {
            Some(d) => (if version == 1 { "c" } else { "u" }, Value::Null, row(d)),
            None => ("d", row(&json!({})), Value::Null),
        };
        let payload = json!({
            "before": before, "after": after, "op": op, "ts_ms": 1_764_000_000_000i64 + version,
            "source": { "name": format!("{}-cdc", record.source), "connector": "postgresql", "lsn": version * 1000 }
        });
        let value = if rng.random_bool(0.5) { json!({ "schema": { "type": "struct" }, "payload": payload }) } else { payload };
        return serde_json::to_vec(&value).unwrap_or_default();
    }
    let mut event = json!({
        "event_id": Uuid::from_bytes(rng.random()).to_string(),
        "op": if data.is_some() { "upsert" } else { "delete" },
        "source": record.source,
        "occurred_at": format!("2026-11-{:02}T{:02}:{:02}:00Z", rng.random_range(1..=26), rng.random_range(0..24), rng.random_range(0..60)),
        "version": version,
        "member_id": member,
        "record_id": record.record_id,
    });
    if let Some(d) = data {
        event["data"] = d.clone();
    }
    serde_json::to_vec(&event).unwrap_or_default()
}

fn malformed(rng: &mut StdRng, member: &str) -> SorMessage {
    let event_id = Uuid::from_bytes(rng.random()).to_string();
    let base = |data: Value| {
        serde_json::to_vec(&json!({
            "event_id": event_id, "op": "upsert", "source": "rx-claims",
            "occurred_at": "2026-11-20T10:15:00Z", "version": 1, "member_id": member, "record_id": "BAD-1", "data": data,
        }))
        .unwrap_or_default()
    };
    match rng.random_range(0..3) {
        0 => SorMessage { topic: topics::MEDICATIONS, key: member.into(), value: Some(b"{\"event_id\": oops".to_vec()) },
        1 => SorMessage { topic: topics::MEDICATIONS, key: member.into(), value: Some(base(json!({ "rxnorm_code": "860975", "status": "taking" }))) },
        _ => SorMessage { topic: topics::DEMOGRAPHICS, key: member.into(), value: Some(base(json!({ "birth_date": "2023-02-30" }))) },
    }
}

/// The whole stream, in publication order.
pub fn generate(cfg: &GeneratorConfig) -> Vec<SorMessage> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut timed: Vec<(f64, SorMessage)> = Vec::new();
    for n in cfg.first_member..cfg.first_member + cfg.members {
        let member = member_id(n);
        for record in member_records(&mut rng, cfg, &member) {
            let mut t: f64 = rng.random();
            let mut events: Vec<(f64, SorMessage)> = Vec::new();
            for (i, data) in record.versions.iter().enumerate() {
                t += rng.random::<f64>() * 0.01;
                let version = i as i64 + 1;
                let value = Some(encode(&mut rng, &member, &record, version, data));
                events.push((t, SorMessage { topic: record.topic, key: member.clone(), value }));
            }
            if events.len() > 1 && rng.random_bool(cfg.out_of_order) {
                // Swap the publication times of two versions: the older one arrives last.
                let n = events.len();
                let (a, b) = (events[n - 2].0, events[n - 1].0);
                events[n - 2].0 = b;
                events[n - 1].0 = a;
            }
            let mut again = Vec::new();
            for (t, m) in &events {
                if rng.random_bool(cfg.duplicates) {
                    again.push((t + rng.random::<f64>() * 0.05, m.clone()));
                }
            }
            timed.extend(events);
            timed.extend(again);
        }
    }
    for _ in 0..cfg.malformed {
        let member = member_id(cfg.first_member + rng.random_range(0..cfg.members.max(1)));
        timed.push((rng.random(), malformed(&mut rng, &member)));
    }
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    timed.into_iter().map(|(_, m)| m).collect()
}

/// A producer as the systems of record would use for a bulk load: idempotent, acks=all.
pub fn producer(kafka: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    Ok(platform::kafka::client(kafka)?
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("compression.type", "zstd")
        .set("queue.buffering.max.messages", "1000000")
        .set("log_level", "4")
        .create()?)
}

/// Publishes `messages` in order and waits until the broker acknowledged every one.
pub async fn publish(producer: &FutureProducer, kafka: &KafkaConfig, messages: &[SorMessage]) -> anyhow::Result<()> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let names: std::collections::HashMap<&str, String> = messages.iter().map(|m| (m.topic, kafka.topic(m.topic))).collect();
    let mut pending = std::collections::VecDeque::new();
    for m in messages {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&names[m.topic]).key(m.key.as_str());
        if let Some(v) = &m.value {
            record = record.payload(v.as_slice());
        }
        // Enqueue now (in order); when the local queue is full, wait for deliveries.
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    match pending.pop_front() {
                        Some(d) => acknowledged(d.await)?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for d in pending {
        acknowledged(d.await)?;
    }
    Ok(())
}

fn acknowledged(
    delivery: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> anyhow::Result<()> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.into()),
        Err(_) => anyhow::bail!("producer dropped a delivery report"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_for_a_seed_and_mixed() {
        let cfg = GeneratorConfig { members: 50, malformed: 5, ..GeneratorConfig::default() };
        let a = generate(&cfg);
        assert_eq!(a, generate(&cfg));
        assert_ne!(a, generate(&GeneratorConfig { seed: 7, ..cfg.clone() }));
        let topics: std::collections::HashSet<_> = a.iter().map(|m| m.topic).collect();
        assert_eq!(topics.len(), 6);
        let text: Vec<String> = a.iter().map(|m| String::from_utf8_lossy(m.value.as_deref().unwrap_or_default()).into_owned()).collect();
        assert!(text.iter().any(|t| t.contains("\"payload\"")), "wrapped Debezium");
        assert!(text.iter().any(|t| t.contains("\"after\"") && !t.contains("\"payload\"")), "bare Debezium");
        assert!(text.iter().any(|t| t.contains("\"op\":\"delete\"")), "native deletes");
        assert!(text.iter().any(|t| t.contains("oops")), "malformed");
    }

    /// How often generated members have each kind of insight, with the built-in knowledge base
    /// (docs/insights.md quotes these shares): a member's records at their last version, mapped
    /// as the composer maps them, evaluated as of today.
    #[test]
    fn generated_members_have_insights_at_documented_rates() {
        use fhir::composite::Component;
        use fhir::insights::{Engine, Kind, KnowledgeBase, evaluate};
        let engine = Engine { kb: std::sync::Arc::new(KnowledgeBase::built_in().unwrap()), grace_days: 7, clock_skew_days: 0 };
        let contracts = schemas::Contracts::load().unwrap();
        let cfg = GeneratorConfig { members: 2000, malformed: 0, deletes: 0.0, member_deletes: 0.0, ..GeneratorConfig::default() };
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut with: std::collections::BTreeMap<Kind, usize> = Default::default();
        for n in 0..cfg.members {
            let member = member_id(n + 1);
            let mut components = Vec::new();
            for record in member_records(&mut rng, &cfg, &member) {
                let Some(Some(data)) = record.versions.last() else { continue };
                let kind = schemas::RecordKind::for_topic(record.topic).unwrap();
                let value = serde_json::to_vec(&json!({ "event_id": uuid::Uuid::new_v4().to_string(), "op": "upsert", "source": record.source,
                    "occurred_at": "2026-11-20T10:15:00Z", "version": 1, "member_id": member, "record_id": record.record_id, "data": data }))
                .unwrap();
                let composer::apply::Outcome::Change { resource: Some(r), .. } =
                    composer::apply::prepare(&contracts, kind, Some(member.as_bytes()), Some(&value), 262_144)
                else {
                    continue;
                };
                components.push(Component {
                    kind,
                    source: record.source.into(),
                    record_id: record.record_id.clone(),
                    version: 1,
                    resource_type: r.resource_type.into(),
                    resource_id: r.id,
                    json: r.json,
                    code: r.code,
                    status: r.status,
                    updated_at: time::OffsetDateTime::UNIX_EPOCH,
                });
            }
            let kinds: std::collections::BTreeSet<Kind> =
                evaluate(&engine, &member, &components, engine.today()).insights.iter().map(|d| d.kind).collect();
            for k in kinds {
                *with.entry(k).or_default() += 1;
            }
        }
        let share = |k: Kind| with.get(&k).copied().unwrap_or(0) as f64 / cfg.members as f64;
        println!("members with an insight of each kind (of {}): {with:?}", cfg.members);
        for (kind, low, high) in
            [(Kind::Interaction, 0.02, 0.40), (Kind::Duplication, 0.01, 0.40), (Kind::Allergy, 0.005, 0.15), (Kind::RefillGap, 0.02, 0.50)]
        {
            assert!((low..=high).contains(&share(kind)), "{kind:?}: {:.3} of members, expected {low}..{high}", share(kind));
        }
    }

    #[test]
    fn generated_events_pass_the_schemas_except_the_malformed_ones() {
        let contracts = schemas::Contracts::load().unwrap();
        let cfg = GeneratorConfig { members: 200, malformed: 0, ..GeneratorConfig::default() };
        for m in generate(&cfg) {
            let kind = schemas::RecordKind::for_topic(m.topic).unwrap();
            match composer::apply::prepare(&contracts, kind, Some(m.key.as_bytes()), m.value.as_deref(), 262_144) {
                composer::apply::Outcome::Rejected(r) => panic!("{}: {r}", m.topic),
                _ => {}
            }
        }
    }
}
