//! Mapping validated system-of-record records to FHIR R4B resources with fhir-sdk types, and
//! parsing stored composites back. All FHIR (de)serialization of the workspace lives here so
//! that fhir-model's serde code is compiled once (see ../shared/STACK.md).

use fhir_sdk::r4b::codes::{
    AdministrativeGender, AllergyIntoleranceCategory, AllergyIntoleranceCriticality, ContactPointSystem, RequestPriority, TaskIntent, TaskStatus,
};
use fhir_sdk::r4b::resources::{
    AllergyIntolerance, AllergyIntoleranceReaction, Bundle, Immunization, ImmunizationOccurrence, MedicationStatement, MedicationStatementEffective,
    MedicationStatementMedication, Patient, Task, TaskRestriction,
};
use fhir_sdk::r4b::types::{
    Address, CodeableConcept, Coding, ContactPoint, Dosage, Extension, ExtensionValue, HumanName, Identifier, Meta, Period, Reference,
};
use fhir_sdk::{Date, DateTime};
use schemas::{Event, RecordKind};
use serde_json::{Map, Value};
use std::str::FromStr;
use uuid::Uuid;

pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const CVX: &str = "http://hl7.org/fhir/sid/cvx";
pub const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
pub const ALLERGY_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
/// The plan's member identifier system.
pub const MEMBER_ID_SYSTEM: &str = "urn:fhir-event-platform:member-id";
/// Extensions for pharmacy-claim facts that MedicationStatement has no element for.
pub const EXT_LAST_FILL_DATE: &str = "urn:fhir-event-platform:extension:last-fill-date";
pub const EXT_DAYS_SUPPLY: &str = "urn:fhir-event-platform:extension:days-supply";
pub const EXT_QUANTITY: &str = "urn:fhir-event-platform:extension:dispensed-quantity";

/// Why a record could not become a FHIR resource (goes to the dead-letter topic).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(String);

type Result<T> = std::result::Result<T, MappingError>;

/// A FHIR resource mapped from one record: its type, id and JSON text (exactly as stored and
/// served).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedResource {
    pub resource_type: &'static str,
    pub id: String,
    pub json: String,
    /// Search columns: the primary code (system, code) and status, where the type has them.
    pub code: Option<(String, String)>,
    pub status: Option<String>,
}

/// The FHIR type of a record kind (`None` for attribution, which is access data).
pub fn resource_type(kind: RecordKind) -> Option<&'static str> {
    Some(match kind {
        RecordKind::Demographics => "Patient",
        RecordKind::Medication => "MedicationStatement",
        RecordKind::Allergy => "AllergyIntolerance",
        RecordKind::Immunization => "Immunization",
        RecordKind::CareTask => "Task",
        RecordKind::Attribution => return None,
    })
}

/// The resource a record is, whether upserted or deleted: the Patient's id is the member id,
/// every other id is [`resource_id`].
pub fn identity(kind: RecordKind, member: &str, source: &str, record: &str) -> Option<(&'static str, String)> {
    let t = resource_type(kind)?;
    Some((t, if kind == RecordKind::Demographics { member.to_owned() } else { resource_id(t, source, record) }))
}

/// `meta.source`: names the system of record, or the partner (`urn:partner:<id>`).
pub fn source_uri(source: &str) -> String {
    match partner_of_source(source) {
        Some(partner) => format!("urn:partner:{partner}"),
        None => format!("urn:sor:{source}"),
    }
}

/// The stored `source` of a partner's reports. System-of-record sources cannot contain ':'.
pub fn partner_source(partner_id: &str) -> String {
    format!("partner:{partner_id}")
}

/// The partner of a stored `source`, if it is a partner's.
pub fn partner_of_source(source: &str) -> Option<&str> {
    source.strip_prefix("partner:")
}

/// Deterministic resource id for a record: same (type, source, record) → same id, forever.
pub fn resource_id(resource_type: &str, source: &str, record_id: &str) -> String {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("urn:sor:{source}/{resource_type}/{record_id}").as_bytes()).to_string()
}

fn built<T, E: std::fmt::Display>(what: &str, r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| MappingError(format!("{what}: {e}")))
}

fn text<'a>(data: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    data.get(key).and_then(Value::as_str).filter(|s| !s.trim().is_empty())
}

/// A calendar date `YYYY-MM-DD` that exists (the schema checks the shape only).
fn date(data: &Map<String, Value>, key: &str) -> Result<Option<Date>> {
    let Some(raw) = text(data, key) else {
        return Ok(None);
    };
    match Date::from_str(raw) {
        // Year 0 parses here but is not a FHIR date, and PostgreSQL refuses it: a stored
        // attribution with it would fail every query that reads its period.
        Ok(Date::Date(d)) if d.year() < 1 => Err(MappingError(format!("/{key}: the year must be 0001 or later"))),
        Ok(d @ Date::Date(_)) => Ok(Some(d)),
        _ => Err(MappingError(format!("/{key}: not a calendar date (YYYY-MM-DD)"))),
    }
}

fn coding(system: &str, code: &str, display: Option<&str>) -> Result<Coding> {
    let mut b = Coding::builder().system(system.to_owned()).code(code.to_owned());
    if let Some(d) = display {
        b = b.display(d.to_owned());
    }
    built("Coding", b.build())
}

fn concept(system: &str, code: &str, display: Option<&str>) -> Result<CodeableConcept> {
    let mut b = CodeableConcept::builder().coding(vec![Some(coding(system, code, display)?)]);
    if let Some(d) = display {
        b = b.text(d.to_owned());
    }
    built("CodeableConcept", b.build())
}

fn patient_ref(member_id: &str) -> Result<Reference> {
    built("Reference", Reference::builder().reference(format!("Patient/{member_id}")).build())
}

fn meta(source: &str) -> Result<Meta> {
    built("Meta", Meta::builder().source(source_uri(source)).build())
}

fn record_identifier(source: &str, record_id: &str) -> Result<Identifier> {
    built("Identifier", Identifier::builder().system(source_uri(source)).value(record_id.to_owned()).build())
}

fn extension(url: &str, value: ExtensionValue) -> Result<Extension> {
    built("Extension", Extension::builder().url(url.to_owned()).value(value).build())
}

fn to_json<T: serde::Serialize>(resource_type: &'static str, id: String, resource: &T) -> Result<MappedResource> {
    let json = built("serialize", serde_json::to_string(resource))?;
    Ok(MappedResource { resource_type, id, json, code: None, status: None })
}

impl MappedResource {
    fn searchable(mut self, system: &str, code: &str, status: &str) -> Self {
        self.code = Some((system.to_owned(), code.to_owned()));
        self.status = Some(status.to_owned());
        self
    }
}

/// Maps an upserted record to its FHIR resource. `None` for kinds that are not FHIR resources
/// (attribution is access data).
pub fn map_record(event: &Event, data: &Map<String, Value>) -> Result<Option<MappedResource>> {
    let member = event.member_id.as_str();
    let source = event.source.as_str();
    let record = event.record_id.as_str();
    Ok(Some(match event.kind {
        RecordKind::Demographics => patient(member, source, record, data)?,
        RecordKind::Medication => medication_statement(member, source, record, data)?,
        RecordKind::Allergy => allergy_intolerance(member, source, record, data)?,
        RecordKind::Immunization => immunization(member, source, record, data)?,
        RecordKind::CareTask => task(member, source, record, data)?,
        RecordKind::Attribution => {
            attribution_check(data)?;
            return Ok(None);
        }
    }))
}

fn patient(member: &str, source: &str, _record: &str, data: &Map<String, Value>) -> Result<MappedResource> {
    let mut b = Patient::builder()
        .id(member.to_owned())
        .meta(meta(source)?)
        .identifier(vec![Some(built("Identifier", Identifier::builder().system(MEMBER_ID_SYSTEM.to_owned()).value(member.to_owned()).build())?)]);
    let given = text(data, "given_name");
    let family = text(data, "family_name");
    if given.is_some() || family.is_some() {
        let mut name = HumanName::builder();
        if let Some(f) = family {
            name = name.family(f.to_owned());
        }
        if let Some(g) = given {
            name = name.given(vec![Some(g.to_owned())]);
        }
        b = b.name(vec![Some(built("HumanName", name.build())?)]);
    }
    if let Some(sex) = text(data, "sex") {
        b = b.gender(AdministrativeGender::from_str(sex).map_err(|_| MappingError("/sex: unknown code".into()))?);
    }
    if let Some(d) = date(data, "birth_date")? {
        b = b.birth_date(d);
    }
    let (line, city, state, postal) = (text(data, "address_line"), text(data, "city"), text(data, "state"), text(data, "postal_code"));
    if line.is_some() || city.is_some() || state.is_some() || postal.is_some() {
        let mut a = Address::builder();
        if let Some(l) = line {
            a = a.line(vec![Some(l.to_owned())]);
        }
        if let Some(c) = city {
            a = a.city(c.to_owned());
        }
        if let Some(s) = state {
            a = a.state(s.to_owned());
        }
        if let Some(p) = postal {
            a = a.postal_code(p.to_owned());
        }
        b = b.address(vec![Some(built("Address", a.build())?)]);
    }
    if let Some(phone) = text(data, "phone") {
        let cp = ContactPoint::builder().system(ContactPointSystem::Phone).value(phone.to_owned()).build();
        b = b.telecom(vec![Some(built("ContactPoint", cp)?)]);
    }
    to_json("Patient", member.to_owned(), &built("Patient", b.build())?)
}

fn medication_statement(member: &str, source: &str, record: &str, data: &Map<String, Value>) -> Result<MappedResource> {
    let id = resource_id("MedicationStatement", source, record);
    let code = text(data, "rxnorm_code").ok_or_else(|| MappingError("/rxnorm_code: required".into()))?;
    let mut b = MedicationStatement::builder()
        .id(id.clone())
        .meta(meta(source)?)
        .identifier(vec![Some(record_identifier(source, record)?)])
        // A claim or prescription without a status: we know it exists, not whether it is taken.
        .status(text(data, "status").unwrap_or("unknown").to_owned())
        .medication(MedicationStatementMedication::CodeableConcept(concept(RXNORM, code, text(data, "display"))?))
        .subject(patient_ref(member)?);
    let (start, end) = (date(data, "effective_start")?, date(data, "effective_end")?);
    if start.is_some() || end.is_some() {
        let mut p = Period::builder();
        if let Some(s) = start {
            p = p.start(DateTime::Date(s));
        }
        if let Some(e) = end {
            p = p.end(DateTime::Date(e));
        }
        b = b.effective(MedicationStatementEffective::Period(built("Period", p.build())?));
    }
    if let Some(dosage) = text(data, "dosage_text") {
        b = b.dosage(vec![Some(built("Dosage", Dosage::builder().text(dosage.to_owned()).build())?)]);
    }
    if let Some(npi) = text(data, "prescriber_npi") {
        let identifier = built("Identifier", Identifier::builder().system(NPI.to_owned()).value(npi.to_owned()).build())?;
        let prescriber = built("Reference", Reference::builder().r#type("Practitioner".to_owned()).identifier(identifier).build())?;
        b = b.information_source(prescriber);
    }
    let mut extensions = Vec::new();
    if let Some(d) = date(data, "last_fill_date")? {
        extensions.push(extension(EXT_LAST_FILL_DATE, ExtensionValue::Date(d))?);
    }
    if let Some(days) = data.get("days_supply").and_then(Value::as_i64) {
        let days = i32::try_from(days).map_err(|_| MappingError("/days_supply: out of range".into()))?;
        extensions.push(extension(EXT_DAYS_SUPPLY, ExtensionValue::Integer(days))?);
    }
    if let Some(q) = data.get("quantity").and_then(Value::as_f64) {
        extensions.push(extension(EXT_QUANTITY, ExtensionValue::Decimal(q))?);
    }
    if !extensions.is_empty() {
        b = b.extension(extensions);
    }
    let status = text(data, "status").unwrap_or("unknown");
    Ok(to_json("MedicationStatement", id, &built("MedicationStatement", b.build())?)?.searchable(RXNORM, code, status))
}

fn allergy_intolerance(member: &str, source: &str, record: &str, data: &Map<String, Value>) -> Result<MappedResource> {
    let id = resource_id("AllergyIntolerance", source, record);
    let code = text(data, "code").ok_or_else(|| MappingError("/code: required".into()))?;
    let (system, category) = match text(data, "code_system") {
        Some("rxnorm") => (RXNORM, Some(AllergyIntoleranceCategory::Medication)),
        Some("snomed") => (SNOMED, None),
        _ => {
            return Err(MappingError("/code_system: must be rxnorm or snomed".into()));
        }
    };
    let mut b = AllergyIntolerance::builder()
        .id(id.clone())
        .meta(meta(source)?)
        .identifier(vec![Some(record_identifier(source, record)?)])
        .code(concept(system, code, text(data, "display"))?)
        .patient(patient_ref(member)?);
    if let Some(c) = category {
        b = b.category(vec![Some(c)]);
    }
    if let Some(status) = text(data, "clinical_status") {
        b = b.clinical_status(concept(ALLERGY_CLINICAL, status, None)?);
    }
    if let Some(c) = text(data, "criticality") {
        let c = AllergyIntoleranceCriticality::from_str(c).map_err(|_| MappingError("/criticality: unknown code".into()))?;
        b = b.criticality(c);
    }
    if let Some(reaction) = text(data, "reaction") {
        let manifestation = built("CodeableConcept", CodeableConcept::builder().text(reaction.to_owned()).build())?;
        let r = AllergyIntoleranceReaction::builder().manifestation(vec![Some(manifestation)]).build();
        b = b.reaction(vec![Some(built("AllergyIntolerance.reaction", r)?)]);
    }
    if let Some(d) = date(data, "recorded_date")? {
        b = b.recorded_date(DateTime::Date(d));
    }
    let status = text(data, "clinical_status").unwrap_or_default();
    Ok(to_json("AllergyIntolerance", id, &built("AllergyIntolerance", b.build())?)?.searchable(system, code, status))
}

fn immunization(member: &str, source: &str, record: &str, data: &Map<String, Value>) -> Result<MappedResource> {
    let id = resource_id("Immunization", source, record);
    let code = text(data, "cvx_code").ok_or_else(|| MappingError("/cvx_code: required".into()))?;
    let occurrence = match date(data, "occurrence_date")? {
        Some(d) => ImmunizationOccurrence::DateTime(DateTime::Date(d)),
        None => ImmunizationOccurrence::String("unknown".to_owned()),
    };
    let mut b = Immunization::builder()
        .id(id.clone())
        .meta(meta(source)?)
        .identifier(vec![Some(record_identifier(source, record)?)])
        // A registry record without a status is an administered dose.
        .status(text(data, "status").unwrap_or("completed").to_owned())
        .vaccine_code(concept(CVX, code, text(data, "display"))?)
        .patient(patient_ref(member)?)
        .occurrence(occurrence);
    if let Some(lot) = text(data, "lot_number") {
        b = b.lot_number(lot.to_owned());
    }
    let status = text(data, "status").unwrap_or("completed");
    Ok(to_json("Immunization", id, &built("Immunization", b.build())?)?.searchable(CVX, code, status))
}

fn task(member: &str, source: &str, record: &str, data: &Map<String, Value>) -> Result<MappedResource> {
    let id = resource_id("Task", source, record);
    let code = text(data, "task_code").ok_or_else(|| MappingError("/task_code: required".into()))?;
    let status = TaskStatus::from_str(text(data, "status").unwrap_or("requested")).map_err(|_| MappingError("/status: unknown code".into()))?;
    let task_system = format!("urn:sor:{source}:task-code");
    let mut code_concept = CodeableConcept::builder().coding(vec![Some(coding(&task_system, code, None)?)]);
    if let Some(d) = text(data, "description") {
        code_concept = code_concept.text(d.to_owned());
    }
    let mut b = Task::builder()
        .id(id.clone())
        .meta(meta(source)?)
        .identifier(vec![Some(record_identifier(source, record)?)])
        .status(status)
        .intent(TaskIntent::from_str("plan").map_err(|e| MappingError(e))?)
        .code(built("CodeableConcept", code_concept.build())?)
        .r#for(patient_ref(member)?);
    if let Some(d) = text(data, "description") {
        b = b.description(d.to_owned());
    }
    if let Some(p) = text(data, "priority") {
        b = b.priority(RequestPriority::from_str(p).map_err(|_| MappingError("/priority: unknown code".into()))?);
    }
    if let Some(due) = date(data, "due_date")? {
        let period = built("Period", Period::builder().end(DateTime::Date(due)).build())?;
        b = b.restriction(built("Task.restriction", TaskRestriction::builder().period(period).build())?);
    }
    let status_code = text(data, "status").unwrap_or("requested").to_owned();
    Ok(to_json("Task", id, &built("Task", b.build())?)?.searchable(&task_system, code, &status_code))
}

/// Attribution is access data, not a FHIR resource; its dates must still be real dates.
fn attribution_check(data: &Map<String, Value>) -> Result<()> {
    let start = date(data, "period_start")?;
    let end = date(data, "period_end")?;
    if let (Some(Date::Date(s)), Some(Date::Date(e))) = (start, end) {
        if e < s {
            return Err(MappingError("/period_end: before period_start".into()));
        }
    }
    Ok(())
}

/// Parses a stored composite back into fhir-sdk's R4B `Bundle` (checks `resourceType` too,
/// which fhir-sdk ignores when parsing into a specific type).
pub fn parse_bundle(json: &str) -> std::result::Result<Bundle, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("resourceType is not Bundle".into());
    }
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

/// Parses a DetectedIssue (an insight) with fhir-sdk's R4B type: what the insights write must
/// be valid R4B.
pub fn parse_detected_issue(json: &str) -> std::result::Result<fhir_sdk::r4b::resources::DetectedIssue, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if value.get("resourceType").and_then(Value::as_str) != Some("DetectedIssue") {
        return Err("resourceType is not DetectedIssue".into());
    }
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

/// The references from each entry of a parsed Bundle to a Patient, with the entry's type and
/// id: `(resourceType, id, "Patient/…")`; and the Patient entries' ids.
pub fn bundle_patient_links(bundle: &Bundle) -> (Vec<String>, Vec<(String, String, String)>) {
    use fhir_sdk::r4b::resources::Resource;
    let mut patients = Vec::new();
    let mut links = Vec::new();
    for entry in bundle.entry.iter().flatten() {
        let Some(resource) = &entry.resource else {
            continue;
        };
        let reference = |r: &Reference| r.reference.clone().unwrap_or_default();
        match resource {
            Resource::Patient(p) => patients.push(p.id.clone().unwrap_or_default()),
            Resource::MedicationStatement(m) => links.push(("MedicationStatement".into(), m.id.clone().unwrap_or_default(), reference(&m.subject))),
            Resource::AllergyIntolerance(a) => links.push(("AllergyIntolerance".into(), a.id.clone().unwrap_or_default(), reference(&a.patient))),
            Resource::Immunization(i) => links.push(("Immunization".into(), i.id.clone().unwrap_or_default(), reference(&i.patient))),
            Resource::DetectedIssue(d) => {
                links.push(("DetectedIssue".into(), d.id.clone().unwrap_or_default(), d.patient.as_ref().map(reference).unwrap_or_default()))
            }
            _ => links.push(("other".into(), String::new(), String::new())),
        }
    }
    (patients, links)
}

#[cfg(test)]
mod tests;
