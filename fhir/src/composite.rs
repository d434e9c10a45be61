//! Composites: FHIR resources assembled from a member's components. A composite is one
//! implementation of [`Composite`]; the medication profile is the first.

use crate::insights::{self, Current, Engine, Refreshed};
use db::components as q;
use db::composites::{CompositeState, CompositeVersion, composite_states};
use db::insights::BundleVersion;
use platform::MemberId;
use platform::time::instant;
use schemas::RecordKind;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt::Write;
use time::OffsetDateTime;
use uuid::Uuid;

/// One live component of a member, as stored: its FHIR resource JSON and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub kind: RecordKind,
    /// The system of record, or `partner:<partner_id>` for a partner's report.
    pub source: String,
    pub record_id: String,
    pub version: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub json: String,
    /// Primary code (system, code) and status, where the resource type has them.
    pub code: Option<(String, String)>,
    pub status: Option<String>,
    /// When this version was applied (system of record) or written (partner report).
    pub updated_at: OffsetDateTime,
}

impl Component {
    /// The partner that reported it, if a partner did.
    pub fn partner(&self) -> Option<&str> {
        crate::mapping::partner_of_source(&self.source)
    }
}

/// The extension on a composite entry that carries a partner's report about it.
pub const EXT_PARTNER_REPORT: &str = "urn:fhir-event-platform:extension:partner-report";
/// The extension on a composite entry naming another system-of-record record with the same code.
pub const EXT_SAME_CODE_RECORD: &str = "urn:fhir-event-platform:extension:same-code-record";
/// The identifier system of partner ids.
pub const PARTNER_ID_SYSTEM: &str = "urn:fhir-event-platform:partner-id";

/// How a partner's report relates to the entry it is shown on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assessment {
    /// The report says what the entry says (same status).
    Confirmed,
    /// The report says otherwise, and the entry's source has not changed since.
    Contradicted,
}

impl Assessment {
    pub fn code(self) -> &'static str {
        match self {
            Assessment::Confirmed => "confirmed",
            Assessment::Contradicted => "contradicted",
        }
    }

    /// How `report` relates to `primary` (the entry of their code), or `None` when the report
    /// is superseded: they disagree, and the system of record changed after the report.
    pub fn of(primary: &Component, report: &Component) -> Option<Assessment> {
        if primary.status == report.status {
            Some(Assessment::Confirmed)
        } else if primary.partner().is_some() || report.updated_at > primary.updated_at {
            Some(Assessment::Contradicted)
        } else {
            None
        }
    }
}

/// Entries of these types are reconciled by code: one entry per code (see [`reconcile`]).
const RECONCILED: [&str; 2] = ["MedicationStatement", "AllergyIntolerance"];

/// Orders the components that carry one code so that the first is the entry: records of the
/// systems of record first (an `active` one first, then by id), then partner reports, oldest
/// first. The order depends only on stored content, so the composite does too.
pub fn entry_order(group: &mut [&Component]) {
    fn key(c: &Component) -> (bool, bool, OffsetDateTime, &str) {
        let by_partner = c.partner().is_some();
        let inactive = !by_partner && c.status.as_deref() != Some("active");
        let reported = if by_partner { c.updated_at } else { OffsetDateTime::UNIX_EPOCH };
        (by_partner, inactive, reported, c.resource_id.as_str())
    }
    group.sort_by(|a, b| key(a).cmp(&key(b)));
}

/// One entry per code among MedicationStatements and AllergyIntolerances: the first of each
/// group (see [`entry_order`]) is listed; the others are shown on it as extensions:
/// - another record of a system of record with the same code: `same-code-record`, a reference;
/// - a partner's report: `partner-report`, with `assessment` (`confirmed` when the statuses
///   agree; `contradicted` when they differ and the system of record has not changed since the
///   report), `partner`, `reported` (when), `status` (what the partner reported) and `report`
///   (a reference to the partner's own resource). A disagreeing report older than the system of
///   record's last change is superseded and no longer shown (it stays readable on its own).
///
/// Returns the entries as (component, JSON to list).
fn reconcile(components: Vec<&Component>) -> Vec<(&Component, Cow<'_, str>)> {
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&Component>> = BTreeMap::new();
    let mut entries = Vec::new();
    for c in components {
        match &c.code {
            Some((system, code)) if RECONCILED.contains(&c.resource_type.as_str()) => {
                groups.entry((c.resource_type.as_str(), system.as_str(), code.as_str())).or_default().push(c)
            }
            _ => entries.push((c, Cow::Borrowed(c.json.as_str()))),
        }
    }
    for (_, mut group) in groups {
        entry_order(&mut group);
        let primary = group[0];
        if group.len() == 1 {
            entries.push((primary, Cow::Borrowed(primary.json.as_str())));
            continue;
        }
        let mut extensions = Vec::new();
        for other in &group[1..] {
            let reference = json!({ "reference": format!("{}/{}", other.resource_type, other.resource_id) });
            match other.partner() {
                None => extensions.push(json!({ "url": EXT_SAME_CODE_RECORD, "valueReference": reference })),
                Some(partner) => {
                    let Some(assessment) = Assessment::of(primary, other) else {
                        continue;
                    };
                    let mut parts = vec![
                        json!({ "url": "assessment", "valueCode": assessment.code() }),
                        json!({ "url": "partner", "valueIdentifier": { "system": PARTNER_ID_SYSTEM, "value": partner } }),
                        json!({ "url": "reported", "valueDateTime": instant(other.updated_at) }),
                    ];
                    if let Some(status) = &other.status {
                        parts.push(json!({ "url": "status", "valueCode": status }));
                    }
                    parts.push(json!({ "url": "report", "valueReference": reference }));
                    extensions.push(json!({ "url": EXT_PARTNER_REPORT, "extension": parts }));
                }
            }
        }
        // Only an entry that shows something else is parsed and written anew.
        let parsed = if extensions.is_empty() { None } else { serde_json::from_str::<Value>(&primary.json).ok() };
        let json = match parsed {
            Some(Value::Object(mut resource)) => {
                if let Value::Array(list) = resource.entry("extension").or_insert_with(|| Value::Array(Vec::new())) {
                    list.extend(extensions);
                }
                Cow::Owned(Value::Object(resource).to_string())
            }
            _ => Cow::Borrowed(primary.json.as_str()),
        };
        entries.push((primary, json));
    }
    entries
}

/// The content of a composite version, without its meta (versionId, lastUpdated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// The `entry` array, as JSON text.
    pub entries: String,
    /// SHA-256 of member id and entries: equal hashes mean equal content.
    pub hash: Vec<u8>,
}

/// A composite FHIR resource built per member from components.
pub trait Composite: Send + Sync {
    /// The contract topic its versions are published on.
    fn topic(&self) -> &'static str;
    /// The record kinds whose changes can change it.
    fn inputs(&self) -> &'static [RecordKind];
    /// Its content for a member from the member's live components (at least those of `inputs`
    /// kinds) and current insights (every status, in id order), or `None` when the member has
    /// no such composite (or no longer has one).
    fn assemble(&self, member: &MemberId, components: &[Component], insights: &[Current]) -> Option<Content>;
    /// The stored and served JSON of one version.
    fn render(&self, member: &MemberId, content: &Content, version_id: i64, last_updated: &str) -> String;
    /// The largest rendered version kept (`COMPOSITE_MAX_BYTES`): every version must fit in a
    /// record the relay can publish.
    fn max_bytes(&self) -> usize;
}

/// The composites a deployment builds, and how it derives insights (`None`: it does not).
pub struct Composites {
    list: Vec<Box<dyn Composite>>,
    pub insights: Option<Engine>,
    /// Base of the insights Bundle's `fullUrl`s.
    base_url: String,
}

impl Composites {
    pub fn new(list: Vec<Box<dyn Composite>>, insights: Option<Engine>, base_url: String) -> Self {
        Composites { list, insights, base_url }
    }
}

impl std::ops::Deref for Composites {
    type Target = [Box<dyn Composite>];

    fn deref(&self) -> &Self::Target {
        &self.list
    }
}

/// The member's medication profile: a `collection` Bundle with the member's Patient, every
/// current MedicationStatement, AllergyIntolerance and Immunization, and the open insights
/// (DetectedIssues) derived from them. It exists while the member
/// has demographics: records that arrive before them are kept and joined when they come.
pub struct MedicationProfile {
    /// Base of `fullUrl`s: `{base}/{type}/{id}`, where the API serves each entry.
    pub base_url: String,
    pub max_bytes: usize,
}

const ENTRY_ORDER: [&str; 5] = ["Patient", "MedicationStatement", "AllergyIntolerance", "Immunization", "DetectedIssue"];

impl Composite for MedicationProfile {
    fn topic(&self) -> &'static str {
        platform::topics::MEDICATION_PROFILE
    }

    fn inputs(&self) -> &'static [RecordKind] {
        &[RecordKind::Demographics, RecordKind::Medication, RecordKind::Allergy, RecordKind::Immunization]
    }

    fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn assemble(&self, member: &MemberId, components: &[Component], insights: &[Current]) -> Option<Content> {
        // One Patient: if several systems publish demographics for a member, the newest version
        // wins, then the (source, record) order, so the choice depends only on stored state.
        let patient = components
            .iter()
            .filter(|c| c.kind == RecordKind::Demographics)
            .max_by(|a, b| (a.version, &a.source, &a.record_id).cmp(&(b.version, &b.source, &b.record_id)))?;
        let others: Vec<&Component> = components.iter().filter(|c| c.kind != RecordKind::Demographics && self.inputs().contains(&c.kind)).collect();
        let mut others = reconcile(others);
        others.sort_by(|(a, _), (b, _)| {
            let rank = |c: &Component| ENTRY_ORDER.iter().position(|t| *t == c.resource_type).unwrap_or(usize::MAX);
            (rank(a), &a.resource_id).cmp(&(rank(b), &b.resource_id))
        });
        let open: Vec<&Current> = insights.iter().filter(|i| i.open).collect();
        let mut entries = String::with_capacity(
            patient.json.len()
                + others.iter().map(|(_, json)| json.len() + 96).sum::<usize>()
                + open.iter().map(|i| i.json.len() + 96).sum::<usize>()
                + 2,
        );
        entries.push('[');
        let listed = std::iter::once((patient, Cow::Borrowed(patient.json.as_str())))
            .chain(others)
            .map(|(c, json)| (c.resource_type.as_str(), c.resource_id.as_str(), json))
            .chain(open.iter().map(|i| ("DetectedIssue", i.id.as_str(), Cow::Borrowed(i.json.as_str()))));
        for (i, (resource_type, id, json)) in listed.enumerate() {
            if i > 0 {
                entries.push(',');
            }
            let _ = write!(
                entries,
                "{{\"fullUrl\":{},\"resource\":{}}}",
                serde_json::Value::String(format!("{}/{resource_type}/{id}", self.base_url)),
                json
            );
        }
        entries.push(']');
        let mut hasher = Sha256::new();
        hasher.update(member.as_str().as_bytes());
        hasher.update([0u8]);
        hasher.update(entries.as_bytes());
        Some(Content { entries, hash: hasher.finalize().to_vec() })
    }

    fn render(&self, member: &MemberId, content: &Content, version_id: i64, last_updated: &str) -> String {
        collection(member.as_str(), &content.entries, version_id, last_updated)
    }
}

/// A versioned `collection` Bundle of a member's entries (JSON array text).
pub fn collection(member: &str, entries: &str, version_id: i64, last_updated: &str) -> String {
    format!(
        "{{\"resourceType\":\"Bundle\",\"id\":{},\"meta\":{{\"versionId\":\"{version_id}\",\"lastUpdated\":\"{last_updated}\"}},\"type\":\"collection\",\"timestamp\":\"{last_updated}\",\"entry\":{entries}}}",
        serde_json::Value::String(member.to_owned()),
    )
}

/// The event id of version `version` of `member`'s composite on `topic`: the same whenever the
/// version is published, so consumers recognise a record sent again.
pub fn event_id(topic: &str, member: &str, version: i64) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{topic}|{member}|{version}").as_bytes())
}

/// Why composites could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Db(#[from] db::Error),
    /// A new version of `member_id`'s composite would be `size` bytes, over `limit`.
    #[error("the composite of member {member_id} would be {size} bytes, over the limit of {limit}")]
    TooLarge { member_id: String, size: usize, limit: usize },
}

/// What [`rebuild`] made: new composite versions, new insights Bundle versions, and what the
/// insights' refresh did. None has a trace context yet (the caller sets the change's).
#[derive(Debug, Default)]
pub struct Rebuilt {
    pub versions: Vec<CompositeVersion>,
    pub insight_bundles: Vec<BundleVersion>,
    pub insights: Refreshed,
}

impl Rebuilt {
    /// Stores the new versions (history, current rows, outbox).
    pub async fn write(&self, tx: &mut sqlx::PgConnection, now: OffsetDateTime) -> Result<(), db::Error> {
        db::composites::write_composites(tx, &self.versions, now).await?;
        db::insights::write_bundles(tx, &self.insight_bundles, now).await
    }
}

/// Rebuilds `members` in a transaction of their own (locking them) and stores what changed:
/// for work that is not a change of components (operators' rebuilds, insights looked at again).
pub async fn rebuild_members(pool: &db::Pool, composites: &Composites, members: &[String]) -> Result<Rebuilt, RebuildError> {
    let (now, now_text) = platform::time::now_in_millis();
    let mut tx = pool.begin().await.map_err(db::Error::from)?;
    q::lock_members(&mut tx, members).await?;
    let rebuilt = rebuild(&mut tx, composites, members, now, &now_text).await?;
    rebuilt.write(&mut tx, now).await?;
    tx.commit().await.map_err(db::Error::from)?;
    Ok(rebuilt)
}

/// Rebuilds `members`: refreshes their insights (writing each DetectedIssue version), then
/// gives new composite versions for members whose content changed (or that appeared or went)
/// and new insights Bundles where those changed.
/// Runs inside the transaction that changed their components, with the members locked
/// ([`q::lock_members`]); the caller stores the versions with [`Rebuilt::write`].
/// A version larger than its composite's `max_bytes` fails the whole rebuild.
pub async fn rebuild(
    tx: &mut sqlx::PgConnection,
    composites: &Composites,
    members: &[String],
    now: OffsetDateTime,
    now_text: &str,
) -> Result<Rebuilt, RebuildError> {
    let mut rebuilt = Rebuilt::default();
    if members.is_empty() {
        return Ok(rebuilt);
    }
    let mut kinds: Vec<&str> = composites.iter().flat_map(|c| c.inputs()).map(|k| k.as_str()).collect();
    if composites.insights.is_some() {
        kinds.extend([RecordKind::Demographics.as_str(), RecordKind::Medication.as_str(), RecordKind::Allergy.as_str(), insights::KIND]);
    }
    kinds.sort_unstable();
    kinds.dedup();
    let mut by_member: HashMap<String, Vec<Component>> = HashMap::new();
    let mut stored_insights = Vec::new();
    for row in q::live_components(tx, members, &kinds).await? {
        if row.kind == insights::KIND {
            stored_insights.push(row);
            continue;
        }
        let Some(kind) = RecordKind::parse(&row.kind) else {
            continue;
        };
        by_member.entry(row.member_id).or_default().push(Component {
            kind,
            source: row.source,
            record_id: row.record_id,
            version: row.version,
            resource_type: row.resource_type,
            resource_id: row.resource_id,
            json: row.body,
            code: row.code_system.zip(row.code),
            status: row.status,
            updated_at: row.updated_at,
        });
    }
    let current = match &composites.insights {
        Some(engine) => {
            let (current, refreshed) = insights::refresh(tx, engine, members, &by_member, stored_insights, now, now_text).await?;
            rebuilt.insights = refreshed;
            current
        }
        None => HashMap::new(),
    };
    let no_insights = Vec::new();
    let states: HashMap<String, CompositeState> = composite_states(tx, members).await?.into_iter().map(|s| (s.member_id.clone(), s)).collect();
    for composite in composites.iter() {
        for member in members {
            let Ok(member_id) = MemberId::parse(member) else {
                continue;
            };
            let own = current.get(member).unwrap_or(&no_insights);
            let content = composite.assemble(&member_id, by_member.get(member).map(Vec::as_slice).unwrap_or_default(), own);
            let state = states.get(member);
            let next = state.map_or(1, |s| s.version_id + 1);
            let event_id = event_id(composite.topic(), member, next);
            match (content, state) {
                (Some(content), s) if s.is_none_or(|s| s.deleted || s.content_hash != content.hash) => {
                    let body = composite.render(&member_id, &content, next, now_text);
                    if body.len() > composite.max_bytes() {
                        return Err(RebuildError::TooLarge { member_id: member.clone(), size: body.len(), limit: composite.max_bytes() });
                    }
                    rebuilt.versions.push(CompositeVersion {
                        member_id: member.clone(),
                        version_id: next,
                        body: Some(body),
                        content_hash: content.hash,
                        topic: composite.topic().to_owned(),
                        event_id,
                        traceparent: None,
                    });
                }
                (None, Some(s)) if !s.deleted => rebuilt.versions.push(CompositeVersion {
                    member_id: member.clone(),
                    version_id: next,
                    body: None,
                    content_hash: Vec::new(),
                    topic: composite.topic().to_owned(),
                    event_id,
                    traceparent: None,
                }),
                _ => {}
            }
        }
    }
    if !current.is_empty() {
        // A Bundle changes only when one of its DetectedIssues did.
        let with: Vec<String> = members.iter().filter(|m| current.get(*m).is_some_and(|c| c.iter().any(|i| i.changed.is_some()))).cloned().collect();
        let bundles: HashMap<String, CompositeState> =
            db::insights::bundle_states(tx, &with).await?.into_iter().map(|s| (s.member_id.clone(), s)).collect();
        for member in with {
            let (entries, hash) = insights::bundle_entries(&composites.base_url, &member, &current[&member]);
            let state = bundles.get(&member);
            if state.is_some_and(|s| s.content_hash == hash) {
                continue;
            }
            let next = state.map_or(1, |s| s.version_id + 1);
            let changes = current[&member]
                .iter()
                .filter_map(|c| {
                    c.changed.map(|version| db::insights::InsightChange {
                        id: c.id.clone(),
                        version,
                        code: c.code.to_owned(),
                        severity: c.severity.clone(),
                    })
                })
                .collect();
            let version = CompositeVersion {
                body: Some(collection(&member, &entries, next, now_text)),
                event_id: event_id(platform::topics::INSIGHTS, &member, next),
                topic: platform::topics::INSIGHTS.to_owned(),
                member_id: member,
                version_id: next,
                content_hash: hash,
                traceparent: None,
            };
            rebuilt.insight_bundles.push(BundleVersion { version, changes });
        }
    }
    Ok(rebuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(kind: RecordKind, resource_type: &str, id: &str, version: i64) -> Component {
        Component {
            kind,
            source: "s".into(),
            record_id: id.into(),
            version,
            resource_type: resource_type.into(),
            resource_id: id.into(),
            json: format!("{{\"resourceType\":\"{resource_type}\",\"id\":\"{id}\"}}"),
            code: None,
            status: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn profile() -> MedicationProfile {
        MedicationProfile { base_url: "http://h/fhir".into(), max_bytes: 524_288 }
    }

    fn coded(source: &str, id: &str, code: &str, status: &str, at: i64) -> Component {
        Component {
            source: source.into(),
            code: Some(("rx".into(), code.into())),
            status: Some(status.into()),
            updated_at: OffsetDateTime::from_unix_timestamp(at).unwrap(),
            ..component(RecordKind::Medication, "MedicationStatement", id, 1)
        }
    }

    /// (entry id, [(extension url, assessment or reference)]) per MedicationStatement entry.
    fn medication_entries(components: &[Component]) -> Vec<(String, Vec<(String, String)>)> {
        let m = MemberId::parse("M1").unwrap();
        let mut all = vec![component(RecordKind::Demographics, "Patient", "M1", 1)];
        all.extend_from_slice(components);
        let content = profile().assemble(&m, &all, &[]).unwrap();
        let entries: Vec<serde_json::Value> = serde_json::from_str(&content.entries).unwrap();
        entries[1..]
            .iter()
            .map(|e| {
                let r = &e["resource"];
                let ext = r["extension"].as_array().cloned().unwrap_or_default();
                let ext = ext
                    .iter()
                    .map(|x| {
                        let detail = match x["url"].as_str().unwrap() {
                            EXT_PARTNER_REPORT => x["extension"][0]["valueCode"].as_str().unwrap().to_owned(),
                            _ => x["valueReference"]["reference"].as_str().unwrap().to_owned(),
                        };
                        (x["url"].as_str().unwrap().to_owned(), detail)
                    })
                    .collect();
                (r["id"].as_str().unwrap().to_owned(), ext)
            })
            .collect()
    }

    #[test]
    fn one_entry_per_code_with_partner_reports_on_it() {
        let sor = coded("rx-claims", "s1", "100", "active", 10);
        // Confirmation, contradiction (newer than the record) and a new medication.
        let entries = medication_entries(&[
            sor.clone(),
            coded("partner:pa", "p1", "100", "active", 20),
            coded("rx-claims", "s2", "200", "active", 10),
            coded("partner:pb", "p2", "200", "stopped", 30),
            coded("partner:pa", "p3", "300", "active", 40),
        ]);
        assert_eq!(
            entries,
            vec![
                ("p3".into(), vec![]),
                ("s1".into(), vec![(EXT_PARTNER_REPORT.into(), "confirmed".into())]),
                ("s2".into(), vec![(EXT_PARTNER_REPORT.into(), "contradicted".into())]),
            ]
        );
        // The system of record changed after the contradiction: superseded (agreeing: confirmed).
        let entries = medication_entries(&[coded("rx-claims", "s2", "200", "active", 50), coded("partner:pb", "p2", "200", "stopped", 30)]);
        assert_eq!(entries, vec![("s2".into(), vec![])]);
        let entries = medication_entries(&[coded("rx-claims", "s2", "200", "stopped", 50), coded("partner:pb", "p2", "200", "stopped", 30)]);
        assert_eq!(entries, vec![("s2".into(), vec![(EXT_PARTNER_REPORT.into(), "confirmed".into())])]);
        // Two records of the systems of record with one code: the active one is listed.
        let entries = medication_entries(&[coded("rx-claims", "a", "100", "completed", 10), coded("emr", "b", "100", "active", 10)]);
        assert_eq!(entries, vec![("b".into(), vec![(EXT_SAME_CODE_RECORD.into(), "MedicationStatement/a".into())])]);
    }

    #[test]
    fn no_patient_no_profile() {
        let m = MemberId::parse("M1").unwrap();
        assert!(profile().assemble(&m, &[component(RecordKind::Medication, "MedicationStatement", "a", 1)], &[]).is_none());
    }

    #[test]
    fn content_is_independent_of_component_order_and_meta() {
        let m = MemberId::parse("M1").unwrap();
        let a = vec![
            component(RecordKind::Immunization, "Immunization", "i", 1),
            component(RecordKind::Medication, "MedicationStatement", "b", 1),
            component(RecordKind::Demographics, "Patient", "M1", 1),
            component(RecordKind::Medication, "MedicationStatement", "a", 1),
        ];
        let mut b = a.clone();
        b.reverse();
        let (ca, cb) = (profile().assemble(&m, &a, &[]).unwrap(), profile().assemble(&m, &b, &[]).unwrap());
        assert_eq!(ca, cb);
        let body = profile().render(&m, &ca, 3, "2026-11-27T05:00:00.000Z");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["meta"]["versionId"], "3");
        let order: Vec<&str> = v["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap()).collect();
        assert_eq!(order, ["M1", "a", "b", "i"]);
        assert_eq!(v["entry"][0]["fullUrl"], "http://h/fhir/Patient/M1");
        let changed = profile().assemble(&m, &a[..3], &[]).unwrap();
        assert_ne!(changed.hash, ca.hash);
    }
}
