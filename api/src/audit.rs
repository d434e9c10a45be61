//! The audit trail: every access to a protected route and every token request is recorded
//! (who, what, when, outcome) before its response leaves, in the append-only `audit_events`
//! table; a relay then publishes each event, as a FHIR `AuditEvent`, on `audit.events.v1`.
//!
//! Records are written in groups (one statement and one commit for all the requests that
//! arrived meanwhile), so auditing costs one durable commit per group, not per request.

use crate::batch::{Batcher, Overlap};
use crate::rest;
use axum::http::{Method, StatusCode};
use db::audit::{AuditRecord, AuditRow};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// What a handler tells the guard about the access it served (as a response extension).
#[derive(Debug, Clone, Default)]
pub struct Audited {
    pub operation: Option<&'static str>,
    /// For the token endpoint: the registered client that asked.
    pub partner_id: Option<String>,
    /// The members whose data the response holds (or was asked for).
    pub member_ids: Vec<String>,
    /// For $hashed-match: the key id named and the decision (never the tokens).
    pub key_id: Option<String>,
    pub decision: Option<&'static str>,
}

impl Audited {
    pub fn operation(operation: &'static str) -> Self {
        Audited { operation: Some(operation), ..Audited::default() }
    }

    pub fn members(member_ids: Vec<String>) -> Self {
        Audited { member_ids, ..Audited::default() }
    }
}

/// Marks a response with the members it concerns.
pub fn with_members(mut response: axum::response::Response, member_ids: Vec<String>) -> axum::response::Response {
    response.extensions_mut().insert(Audited::members(member_ids));
    response
}

/// Marks a response whose access was already recorded, with this status, by the statement that
/// served its data (`$medication-profile`); the guard then records nothing more, unless the
/// response left with another status.
#[derive(Debug, Clone, Copy)]
pub struct Recorded(pub StatusCode);

pub fn recorded(mut response: axum::response::Response, status: StatusCode) -> axum::response::Response {
    response.extensions_mut().insert(Recorded(status));
    response
}

/// The operation, resource type and requested member of a request, from its method and path.
fn classify(method: &Method, path: &str) -> (&'static str, Option<String>, Option<String>) {
    if path == crate::auth::token::PATH {
        return ("token", None, None);
    }
    let segments: Vec<&str> = path.trim_start_matches("/fhir").split('/').filter(|s| !s.is_empty()).collect();
    let resource_type = segments.first().filter(|t| t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphabetic())).map(|t| (*t).to_owned());
    let write = matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let operation = match (segments.as_slice(), write) {
        ([_, op], true) if op.starts_with('$') => {
            if *op == "$hashed-match" {
                "match"
            } else {
                "operation"
            }
        }
        (_, true) => "write",
        ([_], false) => "search",
        ([_, _], false) => "read",
        ([_, _, "_history"], false) => "history",
        ([_, _, "_history", _], false) => "vread",
        ([_, _, op], false) if op.starts_with('$') => "operation",
        _ => "other",
    };
    let member = match segments.as_slice() {
        ["Patient", id, ..] if !id.starts_with('$') && rest::parse_id(id).is_ok() => Some((*id).to_owned()),
        _ => None,
    };
    (operation, resource_type, member)
}

/// The audit record of one request.
pub fn record_for(method: &Method, path: &str, partner_id: Option<String>, audited: Option<Audited>, status: StatusCode) -> AuditRecord {
    let (operation, resource_type, requested) = classify(method, path);
    let audited = audited.unwrap_or_default();
    let mut member_ids = audited.member_ids.clone();
    if let Some(m) = requested
        && !member_ids.contains(&m)
    {
        member_ids.insert(0, m);
    }
    let path: String = path.chars().take(512).collect();
    AuditRecord {
        partner_id,
        operation: audited.operation.unwrap_or(operation).to_owned(),
        resource_type,
        member_ids,
        method: method.as_str().to_owned(),
        path,
        status: status.as_u16() as i16,
        outcome: db::audit::outcome(status.as_u16()).to_owned(),
        key_id: audited.key_id,
        decision: audited.decision.map(str::to_owned),
    }
}

/// The audit record of a request whose caller did not prove who it is (no valid token, or a
/// token request refused before its signature was verified): no partner, no member, and the
/// route template instead of the path, which can name a member. What the caller claimed is
/// not evidence of anything.
pub fn anonymous_record_for(method: &Method, path: &str, route: Option<&str>, audited: Option<Audited>, status: StatusCode) -> AuditRecord {
    let (operation, resource_type, _) = classify(method, path);
    let path = match route {
        Some(template) => template.chars().take(512).collect(),
        None => "(no such route)".to_owned(),
    };
    AuditRecord {
        partner_id: None,
        operation: audited.and_then(|a| a.operation).unwrap_or(operation).to_owned(),
        resource_type,
        member_ids: Vec::new(),
        method: method.as_str().to_owned(),
        path,
        status: status.as_u16() as i16,
        outcome: db::audit::outcome(status.as_u16()).to_owned(),
        key_id: None,
        decision: None,
    }
}

/// Writes audit records in groups; `record` returns once its record is committed.
#[derive(Debug, Clone)]
pub struct Auditor {
    writer: Batcher<AuditRecord, bool>,
}

/// Most records written by one statement.
const GROUP: usize = 512;

impl Auditor {
    /// Starts `writers` writer tasks; while one commits, the next gathers, so commits overlap
    /// (and PostgreSQL flushes their WAL together).
    pub fn start(pool: db::Pool, writers: usize) -> Self {
        let writer = Batcher::start(writers, GROUP, Overlap::Immediate, move |_, records: Vec<AuditRecord>| {
            let pool = pool.clone();
            async move {
                let written = match db::audit::append(&pool, &records).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, records = records.len(), "audit records could not be written; the requests get 503");
                        false
                    }
                };
                vec![written; records.len()]
            }
        });
        Auditor { writer }
    }

    /// Records one access durably; `Err` when it could not be written.
    pub async fn record(&self, record: AuditRecord) -> Result<(), ()> {
        match self.writer.submit(record).await {
            Some(true) => Ok(()),
            _ => Err(()),
        }
    }
}

pub const PARTNER_SYSTEM: &str = "urn:fhir-event-platform:partner";
pub const OPERATION_SYSTEM: &str = "urn:fhir-event-platform:audit-operation";

/// An audit event as a FHIR R4B `AuditEvent`.
pub fn audit_event(row: &AuditRow, base_url: &str) -> Value {
    serde_json::to_value(AuditEvent::of(row, base_url)).unwrap_or(Value::Null)
}

/// An audit event as the JSON text of a FHIR R4B `AuditEvent`, written straight from the row
/// (the relay writes one per request served; no intermediate JSON tree).
pub fn audit_event_json(row: &AuditRow, base_url: &str) -> String {
    serde_json::to_string(&AuditEvent::of(row, base_url)).unwrap_or_default()
}

/// The `AuditEvent` resource, borrowing from its row.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent<'a> {
    resource_type: &'static str,
    id: String,
    meta: Meta,
    #[serde(rename = "type")]
    kind: Coding<'a>,
    subtype: [Coding<'a>; 1],
    action: &'static str,
    recorded: String,
    outcome: &'static str,
    outcome_desc: String,
    agent: [Agent<'a>; 1],
    source: Source<'a>,
    entity: Vec<Entity<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    version_id: &'static str,
    last_updated: String,
}

#[derive(Serialize)]
struct Coding<'a> {
    system: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'static str>,
}

const fn coding(system: &'static str, code: &'static str, display: &'static str) -> Coding<'static> {
    Coding { system, code, display: Some(display) }
}

const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";

#[derive(Serialize)]
struct Agent<'a> {
    who: Who<'a>,
    requestor: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Who<'a> {
    Identifier { system: &'static str, value: &'a str },
    Display(&'static str),
}

#[derive(Serialize)]
struct Source<'a> {
    site: &'a str,
    observer: Display,
    #[serde(rename = "type")]
    kind: [Coding<'static>; 1],
}

#[derive(Serialize)]
struct Display {
    display: &'static str,
}

#[derive(Serialize)]
struct Reference {
    reference: String,
}

#[derive(Serialize)]
struct Detail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "valueString")]
    value: &'a str,
}

#[derive(Serialize)]
struct Entity<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    what: Option<Reference>,
    #[serde(rename = "type")]
    kind: Coding<'static>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Coding<'static>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    detail: Vec<Detail<'a>>,
}

impl<'a> AuditEvent<'a> {
    fn of(row: &'a AuditRow, base_url: &'a str) -> AuditEvent<'a> {
        let r = &row.record;
        let recorded = rest::instant(row.recorded_at);
        let rest = match r.operation.as_str() {
            "read" => Some("read"),
            "vread" => Some("vread"),
            "history" => Some("history-instance"),
            "search" => Some("search-type"),
            "operation" => Some("operation"),
            _ => None,
        };
        let subtype = match rest {
            Some(code) => Coding { system: "http://hl7.org/fhir/restful-interaction", code, display: None },
            None => Coding { system: OPERATION_SYSTEM, code: &r.operation, display: None },
        };
        let action = match (r.operation.as_str(), r.method.as_str()) {
            ("read" | "vread" | "history" | "operation", _) => "R",
            ("write", "PUT") => "U",
            ("write", _) => "C",
            _ => "E",
        };
        let outcome = match r.status {
            200..=399 => "0",
            400..=499 => "4",
            _ => "8",
        };
        let who = match &r.partner_id {
            Some(p) => Who::Identifier { system: PARTNER_SYSTEM, value: p },
            None => Who::Display("unauthenticated caller"),
        };
        let mut entity: Vec<Entity> = r
            .member_ids
            .iter()
            .map(|m| Entity {
                what: Some(Reference { reference: format!("Patient/{m}") }),
                kind: coding(ENTITY_TYPE, "1", "Person"),
                role: Some(coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient")),
                name: None,
                description: None,
                detail: Vec::new(),
            })
            .collect();
        let detail = [("keyId", &r.key_id), ("decision", &r.decision)]
            .into_iter()
            .filter_map(|(kind, v)| v.as_deref().map(|value| Detail { kind, value }))
            .collect();
        entity.push(Entity {
            what: None,
            kind: coding(ENTITY_TYPE, "2", "System Object"),
            role: None,
            name: r.resource_type.as_deref(),
            description: Some(format!("{} {}", r.method, r.path)),
            detail,
        });
        AuditEvent {
            resource_type: "AuditEvent",
            id: row.id.to_string(),
            meta: Meta { version_id: "1", last_updated: recorded.clone() },
            kind: coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "RESTful Operation"),
            subtype: [subtype],
            action,
            recorded,
            outcome,
            outcome_desc: format!("HTTP {} ({})", r.status, r.outcome),
            agent: [Agent { who, requestor: true }],
            source: Source {
                site: base_url,
                observer: Display { display: "fhir-event-platform api" },
                kind: [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "3", "Web Server")],
            },
            entity,
        }
    }
}

/// Publishes audit events to `audit.events.v1` (key: the partner id, `-` when unauthenticated;
/// value: the AuditEvent; header `event_id`: the audit id), moving past events only after the
/// broker acknowledged them. Runs until the process ends.
pub fn spawn_relay(pool: db::Pool, kafka: platform::KafkaConfig, base_url: String) {
    tokio::spawn(async move {
        let topic = kafka.topic(platform::topics::AUDIT_EVENTS);
        let producer: FutureProducer = match platform::kafka::producer(&kafka)
            .set("linger.ms", "5")
            // AuditEvents repeat most of their text: compressed, the broker writes (and the
            // kernel later writes back, on the disk PostgreSQL's WAL may share) about a
            // fifteenth of the bytes. As the composer's relay does.
            .set("compression.type", "zstd")
            .set("log_level", "3")
            .create()
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(partner: Option<&str>, operation: &str, resource_type: Option<&str>, members: &[&str], key: Option<&str>) -> AuditRow {
        AuditRow {
            id: 42,
            recorded_at: time::macros::datetime!(2026-11-28 09:33:43.123 UTC),
            record: AuditRecord {
                partner_id: partner.map(str::to_owned),
                operation: operation.into(),
                resource_type: resource_type.map(str::to_owned),
                member_ids: members.iter().map(|m| m.to_string()).collect(),
                method: "GET".into(),
                path: "/fhir/Patient/M1/$medication-profile".into(),
                status: 200,
                outcome: "success".into(),
                key_id: key.map(str::to_owned),
                decision: key.map(|_| "match".to_owned()),
            },
        }
    }

    #[test]
    fn an_audit_event_names_the_partner_the_members_and_the_request() {
        let event = audit_event(&row(Some("partner-1"), "operation", Some("Patient"), &["M1", "M2"], Some("k1")), "http://h/fhir");
        let person = json!({ "system": ENTITY_TYPE, "code": "1", "display": "Person" });
        let patient = json!({ "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" });
        assert_eq!(
            event,
            json!({
                "resourceType": "AuditEvent",
                "id": "42",
                "meta": { "versionId": "1", "lastUpdated": "2026-11-28T09:33:43.123Z" },
                "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" },
                "subtype": [{ "system": "http://hl7.org/fhir/restful-interaction", "code": "operation" }],
                "action": "R",
                "recorded": "2026-11-28T09:33:43.123Z",
                "outcome": "0",
                "outcomeDesc": "HTTP 200 (success)",
                "agent": [{ "who": { "identifier": { "system": PARTNER_SYSTEM, "value": "partner-1" } }, "requestor": true }],
                "source": { "site": "http://h/fhir", "observer": { "display": "fhir-event-platform api" },
                    "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3", "display": "Web Server" }] },
                "entity": [
                    { "what": { "reference": "Patient/M1" }, "type": person, "role": patient },
                    { "what": { "reference": "Patient/M2" }, "type": person, "role": patient },
                    { "type": { "system": ENTITY_TYPE, "code": "2", "display": "System Object" }, "name": "Patient",
                      "description": "GET /fhir/Patient/M1/$medication-profile",
                      "detail": [{ "type": "keyId", "valueString": "k1" }, { "type": "decision", "valueString": "match" }] },
                ],
            })
        );
        assert_eq!(
            serde_json::from_str::<Value>(&audit_event_json(
                &row(Some("partner-1"), "operation", Some("Patient"), &["M1", "M2"], Some("k1")),
                "http://h/fhir"
            ))
            .ok(),
            Some(event)
        );
    }

    #[test]
    fn an_unauthenticated_call_is_attributed_to_no_partner_and_has_no_empty_fields() {
        let event = audit_event(&row(None, "token", None, &[], None), "http://h/fhir");
        assert_eq!(event["agent"], json!([{ "who": { "display": "unauthenticated caller" }, "requestor": true }]));
        assert_eq!(event["subtype"], json!([{ "system": OPERATION_SYSTEM, "code": "token" }]));
        assert_eq!(event["action"], "E");
        assert_eq!(
            event["entity"],
            json!([{ "type": { "system": ENTITY_TYPE, "code": "2", "display": "System Object" }, "description": "GET /fhir/Patient/M1/$medication-profile" }])
        );
    }
}
