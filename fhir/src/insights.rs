//! Insights: `DetectedIssue`s derived from a member's medication profile with a knowledge base
//! shipped as data (`knowledge/medication-insights.json`): drug–drug interactions (`DRG`),
//! duplicate therapy (`DUPTHPY`), drug–allergy conflicts (`ALGY`) and refill gaps of maintenance
//! drugs (the platform's own code). [`evaluate`] is pure; [`refresh`] runs inside the
//! transaction that rebuilds the member's composites, so an insight changes exactly when, and
//! exactly once with, the data it comes from.

use crate::composite::{Component, entry_order};
use crate::mapping::{EXT_DAYS_SUPPLY, EXT_LAST_FILL_DATE, RXNORM, SNOMED};
use db::components::{self as q, ComponentKey, ComponentWrite};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

/// The knowledge base built into the binaries (`INSIGHTS_KNOWLEDGE_BASE` loads another).
pub const BUILT_IN: &str = include_str!("../../knowledge/medication-insights.json");

/// `components.kind` and `source` of insights: they are stored, versioned, served and searched
/// like the records they come from.
pub const KIND: &str = "insight";
pub const SOURCE: &str = "insights";
/// `meta.source` of a DetectedIssue.
pub const SOURCE_URI: &str = "urn:fhir-event-platform:insights";
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// The platform's code system for insights that v3 ActCode has no code for.
pub const INSIGHT_CODES: &str = "urn:fhir-event-platform:insight-code";
/// The extension naming the knowledge-base version that produced a DetectedIssue's version.
pub const EXT_KNOWLEDGE_BASE: &str = "urn:fhir-event-platform:extension:knowledge-base-version";
/// Status of an insight that holds, and of one that no longer does.
pub const OPEN: &str = "final";
pub const CLOSED: &str = "cancelled";

/// What kind of insight: its code and display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Interaction,
    Duplication,
    Allergy,
    RefillGap,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Interaction, Kind::Duplication, Kind::Allergy, Kind::RefillGap];

    /// (system, code, display).
    pub fn coding(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Interaction => (ACT_CODE, "DRG", "Drug Interaction Alert"),
            Kind::Duplication => (ACT_CODE, "DUPTHPY", "Duplicate Therapy Alert"),
            Kind::Allergy => (ACT_CODE, "ALGY", "Allergy Alert"),
            Kind::RefillGap => (INSIGHT_CODES, "refill-gap", "Maintenance medication not refilled"),
        }
    }

    pub fn code(self) -> &'static str {
        self.coding().1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    High,
    Moderate,
    Low,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::High => "high",
            Severity::Moderate => "moderate",
            Severity::Low => "low",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Class {
    display: String,
    maintenance: bool,
    duplicate_therapy: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct Ingredient {
    display: String,
    classes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Product {
    display: String,
    ingredients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Ingredient(String),
    Class(String),
}

#[derive(Debug, Clone, Deserialize)]
struct Interaction {
    a: Side,
    b: Side,
    severity: Severity,
    note: String,
    source: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Allergen {
    system: String,
    code: String,
    conflicts: Vec<Side>,
    source: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Source {
    id: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Document {
    version: String,
    sources: Vec<Source>,
    classes: HashMap<String, Class>,
    ingredients: HashMap<String, Ingredient>,
    products: HashMap<String, Product>,
    interactions: Vec<Interaction>,
    allergens: Vec<Allergen>,
}

/// Why a knowledge base cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeBaseError {
    #[error("the knowledge base could not be read: {0}")]
    Read(#[from] std::io::Error),
    #[error("the knowledge base is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the knowledge base does not follow schemas/json/knowledge-base.schema.json: {0}")]
    Schema(String),
    #[error("the knowledge base refers to {0}, which it does not define")]
    Dangling(String),
}

/// A validated knowledge base.
#[derive(Debug, Clone)]
pub struct KnowledgeBase {
    doc: Document,
    /// SHA-256 of the document's bytes: two loads of one version must be the same content.
    pub digest: String,
    /// The document as loaded (stored, to compare the next version with).
    pub text: String,
}

impl KnowledgeBase {
    /// Parses and validates a knowledge base: its JSON Schema, then that every class,
    /// ingredient and source it names is defined.
    pub fn parse(text: &str) -> Result<Self, KnowledgeBaseError> {
        let value: Value = serde_json::from_str(text)?;
        schemas::check_knowledge_base(&value).map_err(KnowledgeBaseError::Schema)?;
        let doc: Document = serde_json::from_value(value)?;
        let sources: BTreeSet<&str> = doc.sources.iter().map(|s| s.id.as_str()).collect();
        let dangling = |what: String| Err(KnowledgeBaseError::Dangling(what));
        let side_ok = |side: &Side| match side {
            Side::Ingredient(i) => doc.ingredients.contains_key(i),
            Side::Class(c) => doc.classes.contains_key(c),
        };
        for (id, ingredient) in &doc.ingredients {
            if let Some(c) = ingredient.classes.iter().find(|c| !doc.classes.contains_key(*c)) {
                return dangling(format!("class '{c}' (ingredient {id})"));
            }
        }
        for (id, product) in &doc.products {
            if let Some(i) = product.ingredients.iter().find(|i| !doc.ingredients.contains_key(*i)) {
                return dangling(format!("ingredient {i} (product {id})"));
            }
        }
        for (n, rule) in doc.interactions.iter().enumerate() {
            if !side_ok(&rule.a) || !side_ok(&rule.b) {
                return dangling(format!("a class or ingredient (interaction {n})"));
            }
            if !sources.contains(rule.source.as_str()) {
                return dangling(format!("source '{}' (interaction {n})", rule.source));
            }
        }
        for allergen in &doc.allergens {
            if !allergen.conflicts.iter().all(side_ok) {
                return dangling(format!("a class or ingredient (allergen {})", allergen.code));
            }
            if !sources.contains(allergen.source.as_str()) {
                return dangling(format!("source '{}' (allergen {})", allergen.source, allergen.code));
            }
        }
        let digest = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(KnowledgeBase { doc, digest, text: text.to_owned() })
    }

    /// The built-in knowledge base.
    pub fn built_in() -> Result<Self, KnowledgeBaseError> {
        Self::parse(BUILT_IN)
    }

    pub fn version(&self) -> &str {
        &self.doc.version
    }

    fn ingredients_of(&self, product: &str) -> Option<&[String]> {
        self.doc.products.get(product).map(|p| p.ingredients.as_slice()).or_else(|| {
            // An ingredient sent as the product code (`1191` aspirin).
            self.doc.ingredients.get_key_value(product).map(|(k, _)| std::slice::from_ref(k))
        })
    }

    fn classes_of<'a>(&'a self, ingredient: &str) -> impl Iterator<Item = &'a str> {
        self.doc.ingredients.get(ingredient).into_iter().flat_map(|i| i.classes.iter().map(String::as_str))
    }

    fn matches(&self, side: &Side, ingredient: &str) -> bool {
        match side {
            Side::Ingredient(i) => i == ingredient,
            Side::Class(c) => self.classes_of(ingredient).any(|k| k == c),
        }
    }

    fn ingredient_name<'a>(&'a self, ingredient: &'a str) -> &'a str {
        self.doc.ingredients.get(ingredient).map_or(ingredient, |i| i.display.as_str())
    }

    fn product_name<'a>(&'a self, product: &'a str) -> &'a str {
        self.doc.products.get(product).map(|p| p.display.as_str()).unwrap_or_else(|| self.ingredient_name(product))
    }

    /// Every product, ingredient and allergy code it knows: what a first knowledge base affects.
    pub fn all_codes(&self) -> BTreeSet<String> {
        let products = self.doc.products.keys().chain(self.doc.ingredients.keys()).cloned();
        products.chain(self.doc.allergens.iter().map(|a| a.code.clone())).collect()
    }

    /// The product codes (and ingredient codes) whose insights differ between `self` and
    /// `other`: the members taking one of them, or allergic to one of `allergy codes`, are the
    /// ones to recompute when the knowledge base changes.
    pub fn affected_codes(&self, other: &KnowledgeBase) -> BTreeSet<String> {
        let mut codes = BTreeSet::new();
        // A product whose facts (ingredients, classes, rules naming them) differ in any way.
        let facts = |kb: &KnowledgeBase, product: &str| -> String {
            let Some(ingredients) = kb.ingredients_of(product) else { return String::new() };
            let mut out = String::new();
            for i in ingredients {
                out.push_str(i);
                for c in kb.classes_of(i) {
                    let class = &kb.doc.classes[c];
                    out.push_str(&format!("|{c}:{}:{}:{}", class.display, class.maintenance, class.duplicate_therapy));
                }
                out.push_str(&format!("|{}", kb.ingredient_name(i)));
                for rule in kb.doc.interactions.iter().filter(|r| kb.matches(&r.a, i) || kb.matches(&r.b, i)) {
                    out.push_str(&format!("|{:?}{:?}{:?}{}", rule.a, rule.b, rule.severity, rule.note));
                }
                for a in kb.doc.allergens.iter().filter(|a| a.conflicts.iter().any(|s| kb.matches(s, i))) {
                    out.push_str(&format!("|allergen:{}:{}", a.system, a.code));
                }
            }
            out.push_str(&format!("|{}", kb.product_name(product)));
            out
        };
        let all: BTreeSet<&String> = self
            .doc
            .products
            .keys()
            .chain(other.doc.products.keys())
            .chain(self.doc.ingredients.keys())
            .chain(other.doc.ingredients.keys())
            .collect();
        for code in all {
            if facts(self, code) != facts(other, code) {
                codes.insert(code.clone());
            }
        }
        let allergens = |kb: &KnowledgeBase| -> BTreeMap<String, String> {
            kb.doc.allergens.iter().map(|a| (a.code.clone(), format!("{}{:?}", a.system, a.conflicts))).collect()
        };
        let (mine, theirs) = (allergens(self), allergens(other));
        for code in mine.keys().chain(theirs.keys()) {
            if mine.get(code) != theirs.get(code) {
                codes.insert(code.clone());
            }
        }
        codes
    }
}

/// How insights are derived in this deployment.
#[derive(Debug, Clone)]
pub struct Engine {
    pub kb: Arc<KnowledgeBase>,
    /// Days after a maintenance drug's supply runs out before its refill is a gap.
    pub grace_days: i64,
    /// Added to today's date when refill gaps are evaluated (tests move time with it).
    pub clock_skew_days: i64,
}

impl Engine {
    /// The date refill gaps are evaluated against.
    pub fn today(&self) -> Date {
        OffsetDateTime::now_utc().date().saturating_add(time::Duration::days(self.clock_skew_days))
    }
}

/// One insight that holds for a member now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// Stable across recomputations: the member, the kind and what it is about (ingredients,
    /// class, allergy and ingredient, or statement).
    pub key: String,
    pub kind: Kind,
    pub severity: Severity,
    /// `Type/id` of the resources involved, sorted.
    pub implicated: Vec<String>,
    pub detail: String,
}

impl Derived {
    /// The DetectedIssue's id.
    pub fn id(&self) -> String {
        insight_id(&self.key)
    }
}

pub fn insight_id(key: &str) -> String {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("urn:fhir-event-platform:insight/{key}").as_bytes()).to_string()
}

/// What [`evaluate`] found for one member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluation {
    pub insights: Vec<Derived>,
    /// The first day on which time alone changes this member's insights (a maintenance drug's
    /// supply plus grace runs out), if any.
    pub recheck_on: Option<Date>,
    /// Active medications whose product code the knowledge base does not know.
    pub unknown_products: usize,
}

/// An active medication entry of the profile, with what the knowledge base says of it.
struct Med<'a> {
    component: &'a Component,
    product: &'a str,
    ingredients: &'a [String],
}

impl Med<'_> {
    fn reference(&self) -> String {
        format!("MedicationStatement/{}", self.component.resource_id)
    }
}

/// The insights that hold for `member` given its live components, as of `today`.
pub fn evaluate(engine: &Engine, member: &str, components: &[Component], today: Date) -> Evaluation {
    let kb = &engine.kb;
    let mut out = Evaluation::default();
    // No Patient, no profile: nothing to tell anyone about.
    if !components.iter().any(|c| c.resource_type == "Patient") {
        return out;
    }
    // The entries the profile lists: per code, the first in entry order (one system of record's
    // record, or the partner's report of a drug no system of record knows).
    let mut by_code: BTreeMap<(&str, &str, &str), Vec<&Component>> = BTreeMap::new();
    for c in components {
        if let Some((system, code)) = &c.code
            && matches!(c.resource_type.as_str(), "MedicationStatement" | "AllergyIntolerance")
        {
            by_code.entry((c.resource_type.as_str(), system.as_str(), code.as_str())).or_default().push(c);
        }
    }
    let mut meds: Vec<Med> = Vec::new();
    let mut allergies: Vec<&Component> = Vec::new();
    for ((rtype, system, code), mut group) in by_code {
        entry_order(&mut group);
        let primary = group[0];
        match rtype {
            "MedicationStatement" if primary.status.as_deref() == Some("active") && system == RXNORM => match kb.ingredients_of(code) {
                Some(ingredients) => meds.push(Med { component: primary, product: code, ingredients }),
                None => out.unknown_products += 1,
            },
            "MedicationStatement" if primary.status.as_deref() == Some("active") => out.unknown_products += 1,
            "AllergyIntolerance" if primary.status.as_deref() == Some("active") => allergies.push(primary),
            _ => {}
        }
    }

    interactions(kb, member, &meds, &mut out.insights);
    duplications(kb, member, &meds, &mut out.insights);
    allergy_conflicts(kb, member, &meds, &allergies, &mut out.insights);
    refill_gaps(engine, member, &meds, today, &mut out);
    out.insights.sort_by(|a, b| a.key.cmp(&b.key));
    // One finding per key: a key written twice in one statement fails the whole batch.
    out.insights.dedup_by(|a, b| a.key == b.key);
    out
}

fn interactions(kb: &KnowledgeBase, member: &str, meds: &[Med], out: &mut Vec<Derived>) {
    // One insight per pair of ingredients (in two different entries), the most severe rule.
    let mut pairs: BTreeMap<(&str, &str), (&Interaction, BTreeSet<String>)> = BTreeMap::new();
    for (i, x) in meds.iter().enumerate() {
        for y in &meds[i + 1..] {
            for a in x.ingredients {
                for b in y.ingredients {
                    if a == b {
                        continue;
                    }
                    for rule in &kb.doc.interactions {
                        let hit = (kb.matches(&rule.a, a) && kb.matches(&rule.b, b)) || (kb.matches(&rule.a, b) && kb.matches(&rule.b, a));
                        if !hit {
                            continue;
                        }
                        let pair = if a < b { (a.as_str(), b.as_str()) } else { (b.as_str(), a.as_str()) };
                        let entry = pairs.entry(pair).or_insert_with(|| (rule, BTreeSet::new()));
                        if rule.severity < entry.0.severity {
                            entry.0 = rule;
                        }
                        entry.1.insert(x.reference());
                        entry.1.insert(y.reference());
                    }
                }
            }
        }
    }
    for ((a, b), (rule, implicated)) in pairs {
        out.push(Derived {
            key: format!("{member}|DRG|{a}+{b}"),
            kind: Kind::Interaction,
            severity: rule.severity,
            implicated: implicated.into_iter().collect(),
            detail: format!("{} with {}: {}", kb.ingredient_name(a), kb.ingredient_name(b), rule.note),
        });
    }
}

fn duplications(kb: &KnowledgeBase, member: &str, meds: &[Med], out: &mut Vec<Derived>) {
    let mut by_class: BTreeMap<&str, BTreeMap<&str, &Med>> = BTreeMap::new();
    for m in meds {
        for i in m.ingredients {
            for c in kb.classes_of(i).filter(|c| kb.doc.classes[*c].duplicate_therapy) {
                by_class.entry(c).or_default().insert(m.product, m);
            }
        }
    }
    for (class, products) in by_class.into_iter().filter(|(_, p)| p.len() > 1) {
        let names: Vec<&str> = products.keys().map(|p| kb.product_name(p)).collect();
        out.push(Derived {
            key: format!("{member}|DUPTHPY|{class}"),
            kind: Kind::Duplication,
            severity: Severity::Moderate,
            implicated: products.values().map(|m| m.reference()).collect::<BTreeSet<_>>().into_iter().collect(),
            detail: format!("{} active {}: {}.", products.len(), kb.doc.classes[class].display, names.join(", ")),
        });
    }
}

fn allergy_conflicts(kb: &KnowledgeBase, member: &str, meds: &[Med], allergies: &[&Component], out: &mut Vec<Derived>) {
    for allergy in allergies {
        let Some((system, code)) = &allergy.code else { continue };
        let short = match system.as_str() {
            RXNORM => "rxnorm",
            SNOMED => "snomed",
            _ => continue,
        };
        let listed: Vec<&Side> = kb.doc.allergens.iter().filter(|a| a.system == short && &a.code == code).flat_map(|a| &a.conflicts).collect();
        // An allergy coded as an ingredient conflicts with every product containing it.
        let own = Side::Ingredient(code.clone());
        let mut sides = listed;
        if short == "rxnorm" && kb.doc.ingredients.contains_key(code) {
            sides.push(&own);
        }
        if sides.is_empty() {
            continue;
        }
        let severity = match allergy_criticality(allergy).as_deref() {
            Some("low") => Severity::Moderate,
            _ => Severity::High,
        };
        // One insight per allergy and conflicting ingredient, implicating every product with it
        // (amoxicillin and amoxicillin/clavulanate against one penicillin allergy).
        let mut hits: BTreeMap<&str, (BTreeSet<String>, BTreeSet<&str>)> = BTreeMap::new();
        for m in meds {
            let Some(hit) = m.ingredients.iter().find(|i| sides.iter().any(|s| kb.matches(s, i))) else { continue };
            let (implicated, products) = hits.entry(hit.as_str()).or_default();
            implicated.insert(m.reference());
            products.insert(kb.product_name(m.product));
        }
        for (hit, (statements, products)) in hits {
            let mut implicated = vec![format!("AllergyIntolerance/{}", allergy.resource_id)];
            implicated.extend(statements);
            let names: Vec<&str> = products.into_iter().collect();
            out.push(Derived {
                key: format!("{member}|ALGY|{}|{hit}", allergy.resource_id),
                kind: Kind::Allergy,
                severity,
                implicated,
                detail: format!("{} contains {}, which the member's recorded allergy conflicts with.", names.join(" and "), kb.ingredient_name(hit)),
            });
        }
    }
}

fn allergy_criticality(allergy: &Component) -> Option<String> {
    let v: Value = serde_json::from_str(&allergy.json).ok()?;
    v.get("criticality")?.as_str().map(str::to_owned)
}

/// Last fill date and days' supply of a MedicationStatement, from its claim extensions.
fn fill_of(statement: &Component) -> Option<(Date, i64)> {
    let v: Value = serde_json::from_str(&statement.json).ok()?;
    let extensions = v.get("extension")?.as_array()?;
    let find = |url: &str| extensions.iter().find(|e| e.get("url").and_then(Value::as_str) == Some(url));
    let filled = find(EXT_LAST_FILL_DATE)?.get("valueDate")?.as_str()?;
    let filled = Date::parse(filled, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    let supply = find(EXT_DAYS_SUPPLY)?.get("valueInteger").and_then(Value::as_i64)?;
    Some((filled, supply))
}

fn refill_gaps(engine: &Engine, member: &str, meds: &[Med], today: Date, out: &mut Evaluation) {
    let kb = &engine.kb;
    for m in meds {
        let maintenance = m.ingredients.iter().any(|i| kb.classes_of(i).any(|c| kb.doc.classes[c].maintenance));
        if !maintenance {
            continue;
        }
        let Some((filled, supply)) = fill_of(m.component) else { continue };
        let Some(ran_out) = filled.checked_add(time::Duration::days(supply.clamp(0, 3650))) else { continue };
        let Some(gap_from) = ran_out.checked_add(time::Duration::days(engine.grace_days + 1)) else { continue };
        if gap_from <= today {
            out.insights.push(Derived {
                key: format!("{member}|refill-gap|{}", m.component.resource_id),
                kind: Kind::RefillGap,
                severity: Severity::Moderate,
                implicated: vec![m.reference()],
                detail: format!(
                    "{} was last filled on {filled} for {supply} days: the supply ran out on {ran_out}, more than {} days ago, and no new fill has arrived.",
                    kb.product_name(m.product),
                    engine.grace_days
                ),
            });
        } else {
            out.recheck_on = Some(out.recheck_on.map_or(gap_from, |d| d.min(gap_from)));
        }
    }
}

/// The stored JSON of one version of a DetectedIssue (its meta's versionId and lastUpdated are
/// added where it is served, as for every stored resource).
pub fn render(member: &str, d: &Derived, status: &str, identified: &str, kb_version: &str) -> String {
    let (system, code, display) = d.kind.coding();
    json!({
        "resourceType": "DetectedIssue",
        "id": d.id(),
        "meta": { "source": SOURCE_URI },
        "extension": [{ "url": EXT_KNOWLEDGE_BASE, "valueString": kb_version }],
        "identifier": [{ "system": INSIGHT_CODES, "value": d.key }],
        "status": status,
        "code": { "coding": [{ "system": system, "code": code, "display": display }], "text": display },
        "severity": d.severity.as_str(),
        "patient": { "reference": format!("Patient/{member}") },
        "identifiedDateTime": identified,
        "implicated": d.implicated.iter().map(|r| json!({ "reference": r })).collect::<Vec<_>>(),
        "detail": d.detail,
    })
    .to_string()
}

/// A stored insight's current version, as the composites and the insights topic use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub id: String,
    pub json: String,
    pub open: bool,
    /// Its code and severity, as subscriptions filter them.
    pub code: &'static str,
    pub severity: String,
    /// The version written by this refresh, if it changed.
    pub changed: Option<i64>,
}

/// What [`refresh`] did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// New DetectedIssue versions written.
    pub versions: usize,
    pub unknown_products: usize,
}

/// A stored insight: its component row's version and body.
struct Stored {
    version: i64,
    json: String,
    status: Option<String>,
}

fn stored_field<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Recomputes the insights of `members` (locked by the caller) from their live components,
/// writes a new DetectedIssue version for each one that appeared, changed, reopened or stopped
/// holding (`cancelled`), and sets when each member is to be looked at again. Returns each
/// member's current insights (every status), in id order.
pub async fn refresh(
    tx: &mut sqlx::PgConnection,
    engine: &Engine,
    members: &[String],
    components: &HashMap<String, Vec<Component>>,
    stored_rows: Vec<q::LiveComponent>,
    now: OffsetDateTime,
    now_text: &str,
) -> Result<(HashMap<String, Vec<Current>>, Refreshed), db::Error> {
    let today = engine.today();
    let mut stored: HashMap<String, BTreeMap<String, Stored>> = HashMap::new();
    for row in stored_rows {
        stored.entry(row.member_id).or_default().insert(row.record_id, Stored { version: row.version, json: row.body, status: row.status });
    }
    let mut writes = Vec::new();
    let mut current: HashMap<String, Vec<Current>> = HashMap::new();
    let mut rechecks = Vec::with_capacity(members.len());
    let mut refreshed = Refreshed::default();
    let kb_version = engine.kb.version();
    let empty = Vec::new();
    for member in members {
        let evaluation = evaluate(engine, member, components.get(member).unwrap_or(&empty), today);
        refreshed.unknown_products += evaluation.unknown_products;
        // Only days to come are written: a member whose day passed is cleared by the recheck
        // that rebuilt it (`db::insights::clear_rechecks`), so steady flow writes nothing here.
        if let Some(day) = evaluation.recheck_on {
            rechecks.push((member.clone(), day));
        }
        let mut before = stored.remove(member).unwrap_or_default();
        let mut after: Vec<Current> = Vec::new();
        // One DetectedIssue version, as a component write: (key, kind, status, body, version).
        let mut write = |key: &str, kind: Kind, status: &str, body: String, version: i64| {
            writes.push(ComponentWrite {
                key: ComponentKey { kind: KIND.into(), source: SOURCE.into(), record_id: key.to_owned() },
                member_id: member.clone(),
                version,
                event_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("insight|{key}|{version}").as_bytes()),
                resource: Some(("DetectedIssue".into(), insight_id(key))),
                code_system: Some(kind.coding().0.into()),
                code: Some(kind.code().into()),
                status: Some(status.into()),
                body: Some(body),
            });
        };
        for d in &evaluation.insights {
            let previous = before.remove(&d.key);
            let body = match &previous {
                // Still open: the same content (with the version that produced it) is no change.
                Some(p) if p.status.as_deref() == Some(OPEN) => {
                    let v: Value = serde_json::from_str(&p.json).unwrap_or(Value::Null);
                    let identified = stored_field(&v, "/identifiedDateTime").unwrap_or(now_text);
                    let produced_by = stored_field(&v, "/extension/0/valueString").unwrap_or(kb_version);
                    if render(member, d, OPEN, identified, produced_by) == p.json {
                        None
                    } else {
                        Some(render(member, d, OPEN, identified, kb_version))
                    }
                }
                // New, or reopened: identified now.
                _ => Some(render(member, d, OPEN, now_text, kb_version)),
            };
            let (json, changed) = match body {
                Some(body) => {
                    let version = previous.as_ref().map_or(1, |p| p.version + 1);
                    write(&d.key, d.kind, OPEN, body.clone(), version);
                    (body, Some(version))
                }
                None => (previous.map(|p| p.json).unwrap_or_default(), None),
            };
            after.push(Current { id: d.id(), json, open: true, code: d.kind.code(), severity: d.severity.as_str().to_owned(), changed });
        }
        // Those that no longer hold: cancelled once, kept.
        for (key, p) in before {
            let mut v: Value = serde_json::from_str(&p.json).unwrap_or(Value::Null);
            let id = stored_field(&v, "/id").map(str::to_owned).unwrap_or_else(|| insight_id(&key));
            let kind = Kind::ALL.into_iter().find(|k| stored_field(&v, "/code/coding/0/code") == Some(k.code())).unwrap_or(Kind::Interaction);
            let severity = stored_field(&v, "/severity").unwrap_or("low").to_owned();
            if p.status.as_deref() == Some(OPEN) {
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("status".into(), json!(CLOSED));
                    obj.insert("extension".into(), json!([{ "url": EXT_KNOWLEDGE_BASE, "valueString": kb_version }]));
                }
                let body = v.to_string();
                write(&key, kind, CLOSED, body.clone(), p.version + 1);
                after.push(Current { id, json: body, open: false, code: kind.code(), severity, changed: Some(p.version + 1) });
            } else {
                after.push(Current { id, json: p.json, open: false, code: kind.code(), severity, changed: None });
            }
        }
        after.sort_by(|a, b| a.id.cmp(&b.id));
        if !after.is_empty() {
            current.insert(member.clone(), after);
        }
    }
    refreshed.versions = writes.len();
    q::write_components(tx, &writes, now).await?;
    db::insights::set_rechecks(tx, &rechecks).await?;
    Ok((current, refreshed))
}

/// The `fhir.insights.v1` value of a member: a `collection` Bundle of every DetectedIssue of
/// the member in its current version. Returns (entries JSON, content hash).
pub fn bundle_entries(base_url: &str, member: &str, insights: &[Current]) -> (String, Vec<u8>) {
    let mut entries = String::from("[");
    for (i, c) in insights.iter().enumerate() {
        if i > 0 {
            entries.push(',');
        }
        entries.push_str(&format!("{{\"fullUrl\":{},\"resource\":{}}}", Value::String(format!("{base_url}/DetectedIssue/{}", c.id)), c.json));
    }
    entries.push(']');
    let mut hasher = Sha256::new();
    hasher.update(member.as_bytes());
    hasher.update([0u8]);
    hasher.update(entries.as_bytes());
    (entries, hasher.finalize().to_vec())
}

#[cfg(test)]
mod tests;
