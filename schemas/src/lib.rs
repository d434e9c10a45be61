//! The inbound contracts: JSON Schemas (draft 2020-12, in `schemas/json/`) for the native
//! envelope, the Debezium envelope and each record kind, compiled once by [`Contracts::load`].
//! [`Contracts::parse`] turns the bytes of a Kafka message into a validated [`Event`], or a
//! [`Rejection`] that says why (for the dead-letter topic).

use jsonschema::Validator;
use platform::{MemberId, RecordId, RecordVersion, SourceName, topics};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The kind of record a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    Demographics,
    Medication,
    Allergy,
    Immunization,
    CareTask,
    Attribution,
}

impl RecordKind {
    pub const ALL: [RecordKind; 6] = [
        RecordKind::Demographics,
        RecordKind::Medication,
        RecordKind::Allergy,
        RecordKind::Immunization,
        RecordKind::CareTask,
        RecordKind::Attribution,
    ];

    /// The kind carried by a contract topic (`sor.pharmacy.medications.v1`, …).
    pub fn for_topic(topic: &str) -> Option<Self> {
        Some(match topic {
            topics::DEMOGRAPHICS => RecordKind::Demographics,
            topics::MEDICATIONS => RecordKind::Medication,
            topics::ALLERGIES => RecordKind::Allergy,
            topics::IMMUNIZATIONS => RecordKind::Immunization,
            topics::CARE_TASKS => RecordKind::CareTask,
            topics::ATTRIBUTION => RecordKind::Attribution,
            _ => return None,
        })
    }

    pub fn topic(self) -> &'static str {
        match self {
            RecordKind::Demographics => topics::DEMOGRAPHICS,
            RecordKind::Medication => topics::MEDICATIONS,
            RecordKind::Allergy => topics::ALLERGIES,
            RecordKind::Immunization => topics::IMMUNIZATIONS,
            RecordKind::CareTask => topics::CARE_TASKS,
            RecordKind::Attribution => topics::ATTRIBUTION,
        }
    }

    /// The name stored in `components.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Demographics => "demographics",
            RecordKind::Medication => "medication",
            RecordKind::Allergy => "allergy",
            RecordKind::Immunization => "immunization",
            RecordKind::CareTask => "care_task",
            RecordKind::Attribution => "attribution",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    fn schema_source(self) -> &'static str {
        match self {
            RecordKind::Demographics => include_str!("../json/demographics.schema.json"),
            RecordKind::Medication => include_str!("../json/medication.schema.json"),
            RecordKind::Allergy => include_str!("../json/allergy.schema.json"),
            RecordKind::Immunization => include_str!("../json/immunization.schema.json"),
            RecordKind::CareTask => include_str!("../json/care_task.schema.json"),
            RecordKind::Attribution => include_str!("../json/attribution.schema.json"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeKind {
    Native,
    Debezium,
}

/// What the event does to its record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The record's fields, with null fields removed (a null column is an absent field).
    Upsert(Map<String, Value>),
    Delete,
}

/// A validated change event, whichever envelope it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: RecordKind,
    pub envelope: EnvelopeKind,
    /// Native `event_id`; for Debezium, derived from (source, record, position, op).
    pub event_id: Uuid,
    pub source: SourceName,
    pub member_id: MemberId,
    pub record_id: RecordId,
    pub version: RecordVersion,
    pub change: Change,
}

/// Why a message was not accepted. The text goes into the dead letter's headers; it names
/// paths and rules, never field values (which can be PHI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("empty message value")]
    Empty,
    #[error("invalid JSON at line {line} column {column}")]
    InvalidJson { line: usize, column: usize },
    #[error("{schema} schema: {path}: {rule}")]
    Schema { schema: &'static str, path: String, rule: String },
    #[error("cannot map: {0}")]
    Unmappable(String),
    /// Larger than any record of the contract can be (`COMPOSER_MAX_MESSAGE_BYTES`).
    #[error("the message is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The message key is not the event's `member_id` (every `sor.*` topic is keyed by member).
    #[error("the message key {0}")]
    Key(&'static str),
    /// Applying the change would make the member's composite larger than `COMPOSITE_MAX_BYTES`.
    #[error("the change would make the composite of member {member_id} {size} bytes, over the limit of {limit}")]
    CompositeTooLarge { member_id: String, size: usize, limit: usize },
    /// PostgreSQL refused this change while it accepted the messages around it: the SQLSTATE and
    /// what it names (constraint, table), never the values.
    #[error("PostgreSQL refused the change: {0}")]
    Refused(String),
}

impl Rejection {
    /// Every [`Rejection::class`].
    pub const CLASSES: [&'static str; 8] = ["empty", "invalid-json", "schema", "mapping", "too-large", "key", "composite-too-large", "refused"];

    /// A short machine-readable class for the `dlq.reason` header.
    pub fn class(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::InvalidJson { .. } => "invalid-json",
            Rejection::Schema { .. } => "schema",
            Rejection::Unmappable(_) => "mapping",
            Rejection::TooLarge { .. } => "too-large",
            Rejection::Key(_) => "key",
            Rejection::CompositeTooLarge { .. } => "composite-too-large",
            Rejection::Refused(_) => "refused",
        }
    }
}

/// Checks a message's key against its event: every `sor.*` topic is keyed by `member_id`, as
/// the member id itself, or (as Debezium writes keys) a JSON object whose `member_id` it is,
/// bare or inside `payload`. Messages of one member then share a partition on every topic,
/// which the composer's ordering relies on.
pub fn check_key(key: Option<&[u8]>, member_id: &MemberId) -> Result<(), Rejection> {
    let Some(key) = key else { return Err(Rejection::Key("is missing; it must be the member_id")) };
    if key == member_id.as_str().as_bytes() {
        return Ok(());
    }
    let from_json = || {
        let v: Value = serde_json::from_slice(key).ok()?;
        let row = v.get("payload").filter(|p| p.is_object()).unwrap_or(&v);
        row.get("member_id")?.as_str().map(|m| m == member_id.as_str())
    };
    match from_json() {
        Some(true) => Ok(()),
        _ => Err(Rejection::Key("is not the event's member_id")),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("schema {name} does not compile: {message}")]
pub struct SchemaError {
    name: &'static str,
    message: String,
}

/// The schema of the messages the platform publishes on `partner.inbound.v1`, compiled once.
/// `Err` names the first violation (instance path and rule).
pub fn check_partner_inbound(value: &Value) -> Result<(), String> {
    static VALIDATOR: std::sync::OnceLock<Result<Validator, String>> = std::sync::OnceLock::new();
    first_violation(&VALIDATOR, "partner-inbound", include_str!("../json/partner-inbound.schema.json"), value)
}

/// The schema of the insights' knowledge base (`knowledge/medication-insights.json`), compiled
/// once. `Err` names the first violation (instance path and rule).
pub fn check_knowledge_base(value: &Value) -> Result<(), String> {
    static VALIDATOR: std::sync::OnceLock<Result<Validator, String>> = std::sync::OnceLock::new();
    first_violation(&VALIDATOR, "knowledge-base", include_str!("../json/knowledge-base.schema.json"), value)
}

fn first_violation(
    validator: &std::sync::OnceLock<Result<Validator, String>>,
    name: &'static str,
    source: &str,
    value: &Value,
) -> Result<(), String> {
    let validator = validator.get_or_init(|| compile(name, source).map_err(|e| e.message.clone())).as_ref()?;
    match validator.iter_errors(value).next() {
        Some(e) => Err(format!("{}: {}", e.instance_path(), e)),
        None => Ok(()),
    }
}

/// Every inbound schema, compiled once.
pub struct Contracts {
    envelope: Validator,
    debezium: Validator,
    records: Vec<(RecordKind, Validator)>,
}

fn compile(name: &'static str, source: &str) -> Result<Validator, SchemaError> {
    let schema: Value = serde_json::from_str(source).map_err(|e| SchemaError { name, message: e.to_string() })?;
    jsonschema::draft202012::new(&schema).map_err(|e| SchemaError { name, message: e.to_string() })
}

impl Contracts {
    pub fn load() -> Result<Self, SchemaError> {
        let mut records = Vec::new();
        for kind in RecordKind::ALL {
            records.push((kind, compile(kind.as_str(), kind.schema_source())?));
        }
        Ok(Self {
            envelope: compile("envelope", include_str!("../json/envelope.schema.json"))?,
            debezium: compile("debezium", include_str!("../json/debezium.schema.json"))?,
            records,
        })
    }

    fn record_validator(&self, kind: RecordKind) -> &Validator {
        // `records` holds every kind, in `RecordKind::ALL` order.
        &self.records[kind as usize].1
    }

    /// Parses and validates one message value from the topic of `kind`.
    /// `Ok(None)`: a Debezium tombstone (null value), which carries no change.
    pub fn parse(&self, kind: RecordKind, bytes: Option<&[u8]>) -> Result<Option<Event>, Rejection> {
        let Some(bytes) = bytes else { return Ok(None) };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Rejection::Empty);
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Rejection::InvalidJson { line: e.line(), column: e.column() })?;
        if let Some(path) = nul_path(&value, String::new()) {
            return Err(Rejection::Schema { schema: "envelope", path, rule: NUL_RULE.into() });
        }
        let Value::Object(object) = value else {
            return Err(Rejection::Schema { schema: "envelope", path: "".into(), rule: "the message must be a JSON object".into() });
        };
        let event = if is_debezium(&object) { self.parse_debezium(kind, object)? } else { self.parse_native(kind, object)? };
        Ok(Some(event))
    }

    fn parse_native(&self, kind: RecordKind, object: Map<String, Value>) -> Result<Event, Rejection> {
        let value = Value::Object(object);
        check(&self.envelope, "envelope", &value)?;
        let Value::Object(mut object) = value else { unreachable!("checked above") };
        let text = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        let event_id = Uuid::parse_str(&text(&object, "event_id")).map_err(|e| Rejection::Unmappable(format!("event_id: {e}")))?;
        let version = object.get("version").and_then(Value::as_i64).ok_or_else(|| Rejection::Unmappable("version out of range".into()))?;
        let change = match (text(&object, "op").as_str(), object.remove("data")) {
            ("upsert", Some(Value::Object(data))) => Change::Upsert(self.record(kind, data, "/data")?),
            _ => Change::Delete,
        };
        Ok(Event {
            kind,
            envelope: EnvelopeKind::Native,
            event_id,
            source: identifier(SourceName::parse(&text(&object, "source")), "source")?,
            member_id: identifier(MemberId::parse(&text(&object, "member_id")), "member_id")?,
            record_id: identifier(RecordId::parse(&text(&object, "record_id")), "record_id")?,
            version: RecordVersion::new(version).map_err(|e| Rejection::Unmappable(e.to_string()))?,
            change,
        })
    }

    fn parse_debezium(&self, kind: RecordKind, mut object: Map<String, Value>) -> Result<Event, Rejection> {
        if let (Some(_), Some(Value::Object(payload))) = (object.get("schema"), object.get("payload")) {
            object = payload.clone();
        }
        let value = Value::Object(object);
        check(&self.debezium, "debezium", &value)?;
        let Value::Object(mut object) = value else { unreachable!("checked above") };
        let op = object.get("op").and_then(Value::as_str).unwrap_or_default().to_owned();
        let source = object.get("source").cloned().unwrap_or(Value::Null);
        let position = source
            .get("lsn")
            .and_then(Value::as_i64)
            .or_else(|| source.get("ts_ms").and_then(Value::as_i64))
            .ok_or_else(|| Rejection::Unmappable("source.lsn / source.ts_ms out of range".into()))?;
        let source_name = source.get("name").or_else(|| source.get("connector")).and_then(Value::as_str).unwrap_or("debezium").to_owned();
        let (row_key, deleted) = if op == "d" { ("before", true) } else { ("after", false) };
        let Some(Value::Object(mut row)) = object.remove(row_key) else { unreachable!("checked above") };
        let text = |v: Option<Value>| v.and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let member_id = identifier(MemberId::parse(&text(row.remove("member_id"))), "member_id")?;
        let record_id = identifier(RecordId::parse(&text(row.remove("record_id"))), "record_id")?;
        let source_name = identifier(SourceName::parse(&source_name), "source.name")?;
        let event_id =
            Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("debezium|{}|{}|{}|{}|{}", kind.as_str(), source_name, record_id, position, op).as_bytes());
        let change = if deleted { Change::Delete } else { Change::Upsert(self.record(kind, row, &format!("/{row_key}"))?) };
        Ok(Event {
            kind,
            envelope: EnvelopeKind::Debezium,
            event_id,
            source: source_name,
            member_id,
            record_id,
            version: RecordVersion::new(position).map_err(|e| Rejection::Unmappable(e.to_string()))?,
            change,
        })
    }

    /// Drops null fields, then validates against the record schema of `kind`.
    fn record(&self, kind: RecordKind, mut data: Map<String, Value>, at: &str) -> Result<Map<String, Value>, Rejection> {
        data.retain(|_, v| !v.is_null());
        let value = Value::Object(data);
        check(self.record_validator(kind), kind.as_str(), &value).map_err(|r| match r {
            Rejection::Schema { schema, path, rule } => Rejection::Schema { schema, path: format!("{at}{path}"), rule },
            other => other,
        })?;
        let Value::Object(data) = value else { unreachable!("built above") };
        Ok(data)
    }
}

/// Why a string with U+0000 is refused: PostgreSQL stores no NUL character, in text or JSON
/// that it reads (one such record fails every query that reads its row).
pub const NUL_RULE: &str = "must not contain the character U+0000";

/// The JSON path of the first string (or key) that holds U+0000, if any.
pub fn nul_path(value: &Value, at: String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(at),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| nul_path(v, format!("{at}/{i}"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1").replace('\0', "\\u0000"));
            if k.contains('\0') { Some(here) } else { nul_path(v, here) }
        }),
        _ => None,
    }
}

fn is_debezium(object: &Map<String, Value>) -> bool {
    object.contains_key("before") || object.contains_key("after") || (object.contains_key("schema") && object.contains_key("payload"))
}

fn identifier<T>(parsed: Result<T, platform::domain::DomainError>, what: &str) -> Result<T, Rejection> {
    parsed.map_err(|e| Rejection::Unmappable(format!("{what}: {e}")))
}

fn check(validator: &Validator, schema: &'static str, value: &Value) -> Result<(), Rejection> {
    validator.validate(value).map_err(|e| Rejection::Schema {
        schema,
        path: e.instance_path().to_string(),
        // The keyword that failed, not the message: jsonschema's messages quote the value.
        rule: format!("violates {}", e.schema_path()),
    })
}

#[cfg(test)]
mod tests;
