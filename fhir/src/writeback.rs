//! Partner write-back: what a partner learned at the point of care (a MedicationStatement or an
//! AllergyIntolerance for a member attributed to it) becomes, in ONE transaction:
//! - a partner-reported component (`source` `partner:<id>`, `meta.source` `urn:partner:<id>`),
//!   served, versioned and searched like every other resource;
//! - a `Provenance` resource naming the partner as author of that version;
//! - the member's new composite version, where the report is reconciled with the systems of
//!   record's records of the same code (see `composite::reconcile`);
//! - an outbox row for `partner.inbound.v1`, so the message reaches Kafka exactly when the
//!   write committed.
//!
//! Validation comes first ([`validate`]), and nothing is stored unless all of it passes.

use crate::composite::{Assessment, Component, Composites, PARTNER_ID_SYSTEM, RebuildError, rebuild};
use crate::mapping::{self, ALLERGY_CLINICAL, RXNORM, SNOMED};
use db::components::{self as q, ComponentKey, ComponentWrite};
use db::writeback as w;
use fhir_sdk::r4b::resources::{AllergyIntolerance, MedicationStatement};
use schemas::RecordKind;
use serde_json::{Map, Value, json};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

/// The resource types partners may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writable {
    MedicationStatement,
    AllergyIntolerance,
}

impl Writable {
    pub fn name(self) -> &'static str {
        match self {
            Writable::MedicationStatement => "MedicationStatement",
            Writable::AllergyIntolerance => "AllergyIntolerance",
        }
    }

    fn kind(self) -> RecordKind {
        match self {
            Writable::MedicationStatement => RecordKind::Medication,
            Writable::AllergyIntolerance => RecordKind::Allergy,
        }
    }

    /// The element that names the member.
    fn subject(self) -> &'static str {
        match self {
            Writable::MedicationStatement => "subject",
            Writable::AllergyIntolerance => "patient",
        }
    }

    /// Date elements that must be sane: (element, path inside it or "").
    fn dates(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Writable::MedicationStatement => {
                &[("effectiveDateTime", ""), ("effectivePeriod", "start"), ("effectivePeriod", "end"), ("dateAsserted", "")]
            }
            Writable::AllergyIntolerance => {
                &[("onsetDateTime", ""), ("onsetPeriod", "start"), ("onsetPeriod", "end"), ("recordedDate", ""), ("lastOccurrence", "")]
            }
        }
    }
}

/// Why a resource was refused: the element (a FHIRPath such as
/// `MedicationStatement.medicationCodeableConcept.coding`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{expression}: {message}")]
pub struct Invalid {
    pub expression: String,
    pub message: String,
}

fn invalid(rt: Writable, element: &str, message: impl Into<String>) -> Invalid {
    invalid_in(rt.name(), element, message)
}

/// An [`Invalid`] for `element` of a resource of type `resource_type`.
pub(crate) fn invalid_in(resource_type: &str, element: &str, message: impl Into<String>) -> Invalid {
    let expression = if element.is_empty() { resource_type.to_owned() } else { format!("{resource_type}.{element}") };
    Invalid { expression, message: message.into() }
}

/// What one element of a partner's resource may hold: a resource is a few kilobytes of clinical
/// data, and each element is kept in every version of the member's composite.
pub const MAX_STRING_CHARS: usize = 4096;
/// Entries one repeating element may have.
pub const MAX_ARRAY_ITEMS: usize = 100;
/// How deep elements may nest (FHIR's own resources stay well within it).
pub const MAX_DEPTH: usize = 16;

/// The first element over the limits above (or holding U+0000, which PostgreSQL cannot store),
/// as a FHIRPath-like expression, and what is wrong with it.
fn check_elements(value: &Value, path: &str, depth: usize) -> Result<(), (String, String)> {
    if depth > MAX_DEPTH {
        return Err((path.to_owned(), format!("elements nest more than {MAX_DEPTH} deep")));
    }
    let child = |name: &str| if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
    match value {
        Value::String(s) if s.chars().count() > MAX_STRING_CHARS => Err((path.to_owned(), format!("longer than {MAX_STRING_CHARS} characters"))),
        Value::String(s) if s.contains('\0') => Err((path.to_owned(), schemas::NUL_RULE.to_owned())),
        Value::Array(items) if items.len() > MAX_ARRAY_ITEMS => Err((path.to_owned(), format!("more than {MAX_ARRAY_ITEMS} entries"))),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| check_elements(v, &format!("{path}[{i}]"), depth + 1)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| check_elements(v, &child(k), depth + 1)),
        _ => Ok(()),
    }
}

/// `object` parsed by fhir-sdk as `T` (a resource of type `resource_type`) and serialized back:
/// the failing element is named, and so is any element fhir-sdk does not know (it would
/// otherwise be dropped without a word). Elements over this server's limits are refused first.
pub(crate) fn parse_strict<T: serde::de::DeserializeOwned + serde::Serialize>(
    resource_type: &str,
    object: &Map<String, Value>,
) -> Result<Map<String, Value>, Invalid> {
    let input = Value::Object(object.clone());
    check_elements(&input, "", 0).map_err(|(path, why)| invalid_in(resource_type, &path, why))?;
    let parsed = serde_json::to_value(strict::<T>(resource_type, &input.to_string())?).map_err(|e| invalid_in(resource_type, "", e.to_string()))?;
    if let Some(path) = first_dropped(&input, &parsed, String::new()) {
        return Err(invalid_in(resource_type, &path, "not an element of this resource type in FHIR R4B"));
    }
    match parsed {
        Value::Object(map) => Ok(map),
        _ => Err(invalid_in(resource_type, "", "the body must be a JSON object")),
    }
}

/// A validated report, ready to store.
#[derive(Debug, Clone)]
pub struct Report {
    pub resource_type: Writable,
    pub member_id: String,
    /// The code that identifies the medication or substance: RxNorm (or SNOMED CT for allergies).
    pub code: (String, String),
    /// `MedicationStatement.status`, or the `AllergyIntolerance.clinicalStatus` code.
    pub status: String,
    /// `identifier` entries as (system, value).
    pub identifiers: Vec<(String, String)>,
    /// The resource without `id` and `meta` (the server sets them).
    elements: Map<String, Value>,
}

/// Checks a partner's resource: well-formed R4B of the right type with no unknown elements,
/// its subject `Patient/<id>`, its code RxNorm (allergies: RxNorm or SNOMED CT), and its dates
/// between 1900 and tomorrow (UTC), periods in order.
pub fn validate(rt: Writable, value: Value, today: Date) -> Result<Report, Invalid> {
    let Value::Object(object) = value else {
        return Err(invalid(rt, "", "the body must be a JSON object"));
    };
    match object.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == rt.name() => {}
        Some(t) => {
            return Err(invalid(rt, "resourceType", format!("must be {} at this endpoint, not {t}", rt.name())));
        }
        None => return Err(invalid(rt, "resourceType", "required")),
    }
    let mut elements = match rt {
        Writable::MedicationStatement => parse_strict::<MedicationStatement>(rt.name(), &object)?,
        Writable::AllergyIntolerance => parse_strict::<AllergyIntolerance>(rt.name(), &object)?,
    };
    elements.remove("id");
    elements.remove("meta");
    elements.remove("resourceType");

    let subject = rt.subject();
    let reference = elements.get(subject).and_then(|s| s.get("reference")).and_then(Value::as_str);
    let member_id = match reference.and_then(|r| r.strip_prefix("Patient/")) {
        Some(id) if platform::MemberId::parse(id).is_ok() => id.to_owned(),
        _ => {
            return Err(invalid(rt, subject, "required: a reference 'Patient/<member id>' to the member"));
        }
    };

    let (code_element, systems): (&str, &[&str]) = match rt {
        Writable::MedicationStatement => ("medicationCodeableConcept", &[RXNORM]),
        Writable::AllergyIntolerance => ("code", &[RXNORM, SNOMED]),
    };
    let code = codings(elements.get(code_element))
        .find(|(system, code)| systems.contains(system) && !code.is_empty())
        .map(|(s, c)| (s.to_owned(), c.to_owned()))
        .ok_or_else(|| {
            let what = if systems.len() == 1 { "an RxNorm coding" } else { "an RxNorm or SNOMED CT coding" };
            let system_list = systems.join(" or ");
            invalid(rt, &format!("{code_element}.coding"), format!("required: {what} (system {system_list}) with a code"))
        })?;
    if rt == Writable::MedicationStatement && code.1.bytes().any(|b| !b.is_ascii_digit()) {
        return Err(invalid(rt, "medicationCodeableConcept.coding.code", "an RxNorm code is digits only"));
    }

    let status = match rt {
        Writable::MedicationStatement => elements.get("status").and_then(Value::as_str).map(str::to_owned),
        Writable::AllergyIntolerance => codings(elements.get("clinicalStatus")).find(|(s, _)| *s == ALLERGY_CLINICAL).map(|(_, c)| c.to_owned()),
    }
    .ok_or_else(|| match rt {
        Writable::MedicationStatement => invalid(rt, "status", "required"),
        Writable::AllergyIntolerance => invalid(rt, "clinicalStatus", format!("required: a coding of {ALLERGY_CLINICAL}")),
    })?;

    let allowed: &[&str] = match rt {
        Writable::MedicationStatement => &["active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"],
        Writable::AllergyIntolerance => &["active", "inactive", "resolved"],
    };
    if !allowed.contains(&status.as_str()) {
        let element = if rt == Writable::MedicationStatement { "status" } else { "clinicalStatus.coding.code" };
        return Err(invalid(rt, element, format!("'{status}' is not one of {}", allowed.join(", "))));
    }

    check_dates(rt, &elements, today)?;

    let identifiers = elements
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i.get("system")?.as_str()?.to_owned(), i.get("value")?.as_str()?.to_owned())))
        .collect();
    Ok(Report { resource_type: rt, member_id, code, status, identifiers, elements })
}

/// Deserializes with fhir-sdk, naming the element that failed.
fn strict<T: serde::de::DeserializeOwned>(resource_type: &str, text: &str) -> Result<T, Invalid> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let mut element = if path == "." { String::new() } else { path };
        // A missing field is reported at its parent: name the field itself.
        if let Some(field) = message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
            element = if element.is_empty() { field.to_owned() } else { format!("{element}.{field}") };
        }
        let message = message.split(" at line ").next().unwrap_or_default().to_owned();
        invalid_in(resource_type, &element, message)
    })
}

/// The first element of `input` that `parsed` does not have (fhir-sdk ignores unknown
/// elements; a partner should learn that we did not keep one).
fn first_dropped(input: &Value, parsed: &Value, path: String) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
    };
    match (input, parsed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None if !v.is_null() => Some(join(k)),
            None => None,
            Some(p) => first_dropped(v, p, join(k)),
        }),
        (Value::Array(a), Value::Array(b)) => a.iter().zip(b).enumerate().find_map(|(i, (v, p))| first_dropped(v, p, format!("{path}[{i}]"))),
        _ => None,
    }
}

fn codings(concept: Option<&Value>) -> impl Iterator<Item = (&str, &str)> {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c.get("system")?.as_str()?, c.get("code")?.as_str()?)))
}

/// Dates between 1900 and tomorrow (UTC; a partner's local day may be ahead), periods in order.
/// FHIR date texts of the same precision compare as strings; a shorter one (`2026`, `2026-11`)
/// compares as its start.
fn check_dates(rt: Writable, elements: &Map<String, Value>, today: Date) -> Result<(), Invalid> {
    let tomorrow = today.next_day().unwrap_or(today);
    let latest = format!("{:04}-{:02}-{:02}", tomorrow.year(), tomorrow.month() as u8, tomorrow.day());
    let mut found: Vec<(String, String)> = Vec::new();
    for (element, part) in rt.dates() {
        let value = if part.is_empty() { elements.get(*element) } else { elements.get(*element).and_then(|p| p.get(*part)) };
        if let Some(text) = value.and_then(Value::as_str) {
            let path = if part.is_empty() { (*element).to_owned() } else { format!("{element}.{part}") };
            let day = &text[..text.len().min(10)];
            if day < "1900" {
                return Err(invalid(rt, &path, format!("{text} is before 1900")));
            }
            if day > latest.as_str() {
                return Err(invalid(rt, &path, format!("{text} is in the future")));
            }
            found.push((path, day.to_owned()));
        }
    }
    let start = found.iter().find(|(p, _)| p.ends_with(".start"));
    let end = found.iter().find(|(p, _)| p.ends_with(".end"));
    if let (Some((_, s)), Some((path, e))) = (start, end)
        && e.len() == s.len()
        && e < s
    {
        return Err(invalid(rt, path, "the period ends before it starts"));
    }
    Ok(())
}

/// What the write asks for.
#[derive(Debug, Clone)]
pub enum Mode {
    /// A new resource; with `If-None-Exist: identifier=system|value`, nothing is created when
    /// the partner's identifier already names one of its resources of this type.
    Create { if_none_exist: Option<(String, String)> },
    /// A new version of the partner's own resource `id`, whose current version must be `if_match`.
    Update { id: String, if_match: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Created,
    Updated,
    /// `If-None-Exist` matched: nothing was written; the matching resource is returned.
    Existing,
}

/// The stored resource after a write.
#[derive(Debug, Clone)]
pub struct Written {
    pub effect: Effect,
    pub id: String,
    pub version_id: i64,
    pub last_updated: OffsetDateTime,
    /// As stored (the API adds `meta.versionId` and `meta.lastUpdated`).
    pub body: String,
    pub member_id: String,
    pub provenance_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The member does not exist, or is not attributed to the partner today.
    #[error("Patient/{0} is not known")]
    UnknownMember(String),
    /// The resource to update does not exist or is not visible to the partner.
    #[error("{0} is not known")]
    NotFound(String),
    /// The resource exists but another source reported it.
    #[error("{0} was not reported by this partner; only a partner's own reports can be updated (report yours with POST)")]
    NotOwner(String),
    #[error("version {expected} is not the current version ({current}); read the resource again and retry")]
    VersionConflict { expected: i64, current: i64 },
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The member's composite would grow past `COMPOSITE_MAX_BYTES` with this report.
    #[error("with this report the member's medication profile would be {size} bytes, over the limit of {limit}; nothing was stored")]
    CompositeTooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Db(#[from] db::Error),
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        WriteError::Db(db::Error::Sqlx(e))
    }
}

impl From<RebuildError> for WriteError {
    fn from(e: RebuildError) -> Self {
        match e {
            RebuildError::Db(e) => WriteError::Db(e),
            RebuildError::TooLarge { size, limit, .. } => WriteError::CompositeTooLarge { size, limit },
        }
    }
}

/// Who writes: the partner's id and, for Provenance, its display name.
#[derive(Debug, Clone, Copy)]
pub struct Author<'a> {
    pub partner_id: &'a str,
    pub name: &'a str,
    /// The request's trace context: the write's composite versions and `partner.inbound.v1`
    /// message carry it.
    pub trace: Option<platform::trace::TraceParent>,
}

/// Stores a validated report as `mode` says, in one transaction with its Provenance, the
/// member's new composite versions and the `partner.inbound.v1` outbox row.
pub async fn write(pool: &db::Pool, composites: &Composites, author: Author<'_>, report: Report, mode: Mode) -> Result<Written, WriteError> {
    let rt = report.resource_type;
    let source = mapping::partner_source(author.partner_id);
    let member = report.member_id.clone();
    let (now, now_text) = platform::time::now_in_millis();
    let mut tx = pool.begin().await?;
    q::lock_members(&mut tx, std::slice::from_ref(&member)).await?;

    let (id, version, effect) = match &mode {
        Mode::Create { if_none_exist } => {
            if !w::serves(&mut tx, author.partner_id, now.date(), &member).await? {
                return Err(WriteError::UnknownMember(member));
            }
            if let Some((system, value)) = if_none_exist
                && let Some(existing) = w::by_identifier(&mut tx, author.partner_id, rt.name(), system, value).await?
            {
                return current(&mut tx, rt, &existing).await;
            }
            (Uuid::new_v4().to_string(), 1, Effect::Created)
        }
        Mode::Update { id, if_match } => {
            let reference = format!("{}/{id}", rt.name());
            let stored = w::resource_for_update(&mut tx, rt.name(), id).await?;
            let stored = match stored {
                Some(s) if !s.deleted && w::serves(&mut tx, author.partner_id, now.date(), &s.member_id).await? => s,
                _ => return Err(WriteError::NotFound(reference)),
            };
            if stored.source != source {
                return Err(WriteError::NotOwner(reference));
            }
            if stored.member_id != member {
                return Err(invalid(rt, rt.subject(), format!("the member of {reference} cannot change (it is Patient/{})", stored.member_id)).into());
            }
            if stored.resource_version != *if_match {
                return Err(WriteError::VersionConflict { expected: *if_match, current: stored.resource_version });
            }
            (id.clone(), stored.version + 1, Effect::Updated)
        }
    };

    let body = stored_body(rt, &id, &mapping::source_uri(&source), &report.elements);
    let provenance_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("provenance|{}|{id}|{version}", rt.name()).as_bytes()).to_string();
    let activity = if effect == Effect::Created { ("CREATE", "create") } else { ("UPDATE", "update") };
    let provenance = json!({
        "resourceType": "Provenance",
        "id": provenance_id,
        "meta": { "source": mapping::source_uri(&source) },
        "target": [{ "reference": format!("{}/{id}/_history/{version}", rt.name()) }],
        "recorded": now_text,
        "activity": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": activity.0, "display": activity.1 }] },
        "agent": [{
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author", "display": "Author" }] },
            "who": { "identifier": { "system": PARTNER_ID_SYSTEM, "value": author.partner_id }, "display": author.name }
        }]
    })
    .to_string();
    let writes = [
        ComponentWrite {
            key: ComponentKey { kind: rt.kind().as_str().to_owned(), source: source.clone(), record_id: id.clone() },
            member_id: member.clone(),
            version,
            body: Some(body.clone()),
            event_id: Uuid::new_v4(),
            resource: Some((rt.name().to_owned(), id.clone())),
            code_system: Some(report.code.0.clone()),
            code: Some(report.code.1.clone()),
            status: Some(report.status.clone()),
        },
        ComponentWrite {
            key: ComponentKey { kind: "provenance".to_owned(), source: source.clone(), record_id: provenance_id.clone() },
            member_id: member.clone(),
            version: 1,
            body: Some(provenance),
            event_id: Uuid::new_v4(),
            resource: Some(("Provenance".to_owned(), provenance_id.clone())),
            code_system: None,
            code: None,
            status: None,
        },
    ];
    q::write_components(&mut tx, &writes, now).await?;
    if effect == Effect::Created && !report.identifiers.is_empty() {
        let claimed = w::claim_identifiers(&mut tx, author.partner_id, rt.name(), &id, &report.identifiers).await?;
        // A concurrent retry with the same If-None-Exist identifier committed first: this
        // write becomes that one's answer, and creates nothing.
        if let Mode::Create { if_none_exist: Some(key) } = &mode
            && !claimed.contains(key)
        {
            tx.rollback().await?;
            let mut tx = pool.begin().await?;
            let existing = w::by_identifier(&mut tx, author.partner_id, rt.name(), &key.0, &key.1).await?;
            return match existing {
                Some(existing) => current(&mut tx, rt, &existing).await,
                None => Err(WriteError::NotFound(format!("{}?identifier={}|{}", rt.name(), key.0, key.1))),
            };
        }
    } else if !report.identifiers.is_empty() {
        w::claim_identifiers(&mut tx, author.partner_id, rt.name(), &id, &report.identifiers).await?;
    }
    let stored = w::resource_for_update(&mut tx, rt.name(), &id).await?.ok_or_else(|| WriteError::NotFound(id.clone()))?;

    let reconciliation = reconciliation(&mut tx, &report, &source, now).await?;
    let mut rebuilt = rebuild(&mut tx, composites, std::slice::from_ref(&member), now, &now_text).await?;
    let traceparent = author.trace.map(|t| t.to_string());
    for v in &mut rebuilt.versions {
        v.traceparent = traceparent.clone();
    }
    for b in &mut rebuilt.insight_bundles {
        b.version.traceparent = traceparent.clone();
    }
    rebuilt.write(&mut tx, now).await?;

    let event_id = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("{}|{}|{id}|{}", platform::topics::PARTNER_INBOUND, rt.name(), stored.resource_version).as_bytes(),
    );
    let mut resource: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.insert("versionId".into(), Value::String(stored.resource_version.to_string()));
        meta.insert("lastUpdated".into(), Value::String(now_text.clone()));
    }
    let payload = json!({
        "event_id": event_id.to_string(),
        "occurred_at": now_text,
        "partner_id": author.partner_id,
        "member_id": member,
        "interaction": if effect == Effect::Created { "create" } else { "update" },
        "resource_type": rt.name(),
        "resource_id": id,
        "version_id": stored.resource_version,
        "provenance": format!("Provenance/{provenance_id}"),
        "reconciliation": reconciliation,
        "resource": resource,
    })
    .to_string();
    let mut headers = json!({ "partner_id": author.partner_id, "resource_type": rt.name() });
    if let Some(t) = &traceparent {
        headers[platform::trace::HEADER] = json!(t);
    }
    w::enqueue(
        &mut tx,
        &w::OutboxMessage {
            topic: platform::topics::PARTNER_INBOUND,
            key: &member,
            event_id,
            member_id: &member,
            version_id: stored.resource_version,
            payload: &payload,
            headers: &headers,
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(partner = author.partner_id, member = %member, resource_type = rt.name(), version = stored.resource_version,
        trace_id = %author.trace.map(|t| t.trace_id()).unwrap_or_default(), "partner write-back stored");
    Ok(Written { effect, id, version_id: stored.resource_version, last_updated: now, body, member_id: member, provenance_id: Some(provenance_id) })
}

/// The current version of a partner's resource (the answer to a matched `If-None-Exist`).
async fn current(tx: &mut sqlx::PgConnection, rt: Writable, id: &str) -> Result<Written, WriteError> {
    let stored = w::resource_for_update(tx, rt.name(), id).await?.ok_or_else(|| WriteError::NotFound(format!("{}/{id}", rt.name())))?;
    Ok(Written {
        effect: Effect::Existing,
        id: id.to_owned(),
        version_id: stored.resource_version,
        last_updated: stored.updated_at,
        body: stored.body.unwrap_or_default(),
        member_id: stored.member_id,
        provenance_id: None,
    })
}

/// `{"resourceType":…,"id":…,"meta":{"source":…},…}`: resourceType, id and meta first, so the
/// API's `meta` insertion finds this meta and not a nested one.
fn stored_body(rt: Writable, id: &str, source_uri: &str, elements: &Map<String, Value>) -> String {
    let rest = Value::Object(elements.clone()).to_string();
    let rest = &rest[1..rest.len() - 1];
    let head = format!(
        "{{\"resourceType\":\"{}\",\"id\":{},\"meta\":{{\"source\":{}}}",
        rt.name(),
        Value::String(id.into()),
        Value::String(source_uri.into())
    );
    if rest.is_empty() { format!("{head}}}") } else { format!("{head},{rest}}}") }
}

/// The systems of record's live records of the member with the report's code, and how the
/// report relates to each (for `partner.inbound.v1`).
async fn reconciliation(tx: &mut sqlx::PgConnection, report: &Report, source: &str, now: OffsetDateTime) -> Result<Vec<Value>, WriteError> {
    let kind = report.resource_type.kind();
    let rows = q::live_components(tx, std::slice::from_ref(&report.member_id), &[kind.as_str()]).await?;
    let as_component = |source: String, record_id: String, resource_id: String, status: Option<String>, updated_at| Component {
        kind,
        source,
        record_id,
        version: 0,
        resource_type: report.resource_type.name().to_owned(),
        resource_id,
        json: String::new(),
        code: Some(report.code.clone()),
        status,
        updated_at,
    };
    let reported = as_component(source.to_owned(), String::new(), String::new(), Some(report.status.clone()), now);
    let mut out = Vec::new();
    for row in rows {
        if mapping::partner_of_source(&row.source).is_some()
            || row.code_system.as_ref() != Some(&report.code.0)
            || row.code.as_ref() != Some(&report.code.1)
        {
            continue;
        }
        let resource_id = mapping::resource_id(report.resource_type.name(), &row.source, &row.record_id);
        let record = as_component(row.source.clone(), row.record_id.clone(), resource_id.clone(), row.status.clone(), row.updated_at);
        let assessment = Assessment::of(&record, &reported).unwrap_or(Assessment::Contradicted);
        out.push(json!({
            "source": row.source,
            "record_id": row.record_id,
            "resource": format!("{}/{resource_id}", report.resource_type.name()),
            "status": row.status,
            "assessment": assessment.code(),
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
