//! Applying a batch of inbound messages: exactly-once in effect. Within ONE PostgreSQL
//! transaction: keep per record only a version newer than stored, claim the event ids of those
//! changes (an id applied before changes nothing), write components,
//! rebuild the composites of the members they touch, write new versions + history + outbox,
//! and move the consumer offsets. Dead letters are acknowledged by Kafka before it commits.

use db::components::{self as q, ComponentKey, ComponentWrite};
use db::offsets::StoredOffset;
use fhir::composite::{Composites, RebuildError, rebuild};
use fhir::mapping::{self, MappedResource};
use schemas::{Change, Event, RecordKind, Rejection};
use std::borrow::Borrow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use uuid::Uuid;

/// One consumed message, after parsing and mapping (done before the transaction).
#[derive(Debug)]
pub struct Consumed {
    /// Full topic name (with the deployment's prefix).
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub outcome: Outcome,
    /// The trace this change belongs to: the system of record's `traceparent` header, or one
    /// the composer started (changes only).
    pub trace: Option<platform::trace::TraceParent>,
}

#[derive(Debug)]
pub enum Outcome {
    /// A valid change, with its FHIR resource for upserts of FHIR kinds, or the attribution
    /// record as JSON.
    Change { event: Event, body: Option<String>, resource: Option<MappedResource> },
    /// A Debezium tombstone: nothing to do.
    Nothing,
    /// Goes to the dead-letter topic.
    Rejected(Rejection),
}

/// Size → parse → validate → key → map, for one message of a contract topic. A message over
/// `max_bytes` is rejected unread.
pub fn prepare(contracts: &schemas::Contracts, kind: RecordKind, key: Option<&[u8]>, value: Option<&[u8]>, max_bytes: usize) -> Outcome {
    let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
    if size > max_bytes {
        return Outcome::Rejected(Rejection::TooLarge { size, limit: max_bytes });
    }
    let event = match contracts.parse(kind, value) {
        Ok(Some(event)) => event,
        Ok(None) => return Outcome::Nothing,
        Err(rejection) => return Outcome::Rejected(rejection),
    };
    if let Err(rejection) = schemas::check_key(key, &event.member_id) {
        return Outcome::Rejected(rejection);
    }
    match &event.change {
        Change::Delete => Outcome::Change { event, body: None, resource: None },
        Change::Upsert(data) => match mapping::map_record(&event, data) {
            Ok(Some(resource)) => Outcome::Change { body: Some(resource.json.clone()), resource: Some(resource), event },
            // Attribution: stored as the record itself (access data).
            Ok(None) => Outcome::Change { body: Some(serde_json::Value::Object(data.clone()).to_string()), resource: None, event },
            Err(e) => Outcome::Rejected(Rejection::Unmappable(e.to_string())),
        },
    }
}

/// What a batch did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub messages: usize,
    pub dead_letters: usize,
    pub duplicates: usize,
    pub stale: usize,
    pub components_written: usize,
    pub composite_versions: usize,
    /// New DetectedIssue versions.
    pub insight_versions: usize,
    /// Active medications whose product the knowledge base does not know (no insight).
    pub unknown_products: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error("lost partition ownership while applying a batch")]
    Fenced,
    /// A new version of `member_id`'s composite would be `size` bytes, over `limit`.
    #[error("the composite of member {member_id} would be {size} bytes, over the limit of {limit}")]
    CompositeTooLarge { member_id: String, size: usize, limit: usize },
}

impl BatchError {
    /// Whether the failure says nothing about the batch's content: the database is down, busy,
    /// restarting or out of a resource, or a transaction lost a race. Such a batch is retried as
    /// it is; any other failure may be one record's doing (see `consumer`'s isolation).
    pub fn is_transient(&self) -> bool {
        match self {
            BatchError::Db(db::Error::Sqlx(e)) => match e {
                sqlx::Error::Database(d) => {
                    // SQLSTATE classes: 08 connection, 40 transaction rollback (serialization,
                    // deadlock), 53 insufficient resources, 55 object not in prerequisite
                    // state (lock not available), 57 operator intervention (shutdown, statement
                    // timeout), 58 system error.
                    let code = d.code().unwrap_or_default();
                    ["08", "40", "53", "55", "57", "58"].iter().any(|class| code.starts_with(class))
                }
                sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Protocol(_) => true,
                _ => false,
            },
            BatchError::Db(db::Error::Migrate(_)) => true,
            BatchError::Fenced | BatchError::CompositeTooLarge { .. } => false,
        }
    }

    /// What a dead letter says of a record this failure was isolated to: for PostgreSQL, the
    /// SQLSTATE and the table and constraint it names, never a value.
    pub fn rejection(&self) -> Rejection {
        match self {
            BatchError::CompositeTooLarge { member_id, size, limit } => {
                Rejection::CompositeTooLarge { member_id: member_id.clone(), size: *size, limit: *limit }
            }
            BatchError::Db(db::Error::Sqlx(sqlx::Error::Database(d))) => {
                let mut what = format!("SQLSTATE {}", d.code().unwrap_or_default());
                if let Some(table) = d.table() {
                    what.push_str(&format!(" on table {table}"));
                }
                if let Some(constraint) = d.constraint() {
                    what.push_str(&format!(", constraint {constraint}"));
                }
                Rejection::Refused(what)
            }
            other => Rejection::Refused(other.kind()),
        }
    }

    fn kind(&self) -> String {
        match self {
            BatchError::Db(db::Error::Sqlx(e)) => format!("{}", sqlx_kind(e)),
            BatchError::Db(db::Error::Migrate(_)) => "migrations".into(),
            BatchError::Fenced => "fenced".into(),
            BatchError::CompositeTooLarge { .. } => "composite too large".into(),
        }
    }
}

/// A name for a sqlx error without its text (which can quote values).
fn sqlx_kind(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => "a stored value could not be decoded",
        sqlx::Error::Encode(_) => "a value could not be encoded",
        sqlx::Error::RowNotFound => "row not found",
        _ => "database error",
    }
}

impl From<RebuildError> for BatchError {
    fn from(e: RebuildError) -> Self {
        match e {
            RebuildError::Db(e) => BatchError::Db(e),
            RebuildError::TooLarge { member_id, size, limit } => BatchError::CompositeTooLarge { member_id, size, limit },
        }
    }
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Db(db::Error::Sqlx(e))
    }
}

/// Applies the changes of a batch (dead letters are already acknowledged) and moves the
/// offsets to `offsets` from `expected`, all in one transaction.
pub async fn apply(
    pool: &db::Pool,
    group: &str,
    composites: &Composites,
    indexer: Option<&crate::matching::MatchIndexer>,
    consumed: &[impl Borrow<Consumed>],
    offsets: &[(StoredOffset, Option<i64>)],
) -> Result<Applied, BatchError> {
    run(pool, group, composites, indexer, consumed, offsets, true).await
}

/// Whether [`apply`] would succeed for `consumed`, without moving offsets: the same work, rolled
/// back. Used to find the record a failing batch fails on.
pub async fn try_apply(
    pool: &db::Pool,
    composites: &Composites,
    indexer: Option<&crate::matching::MatchIndexer>,
    consumed: &[impl Borrow<Consumed>],
) -> Result<Applied, BatchError> {
    run(pool, "", composites, indexer, consumed, &[], false).await
}

async fn run(
    pool: &db::Pool,
    group: &str,
    composites: &Composites,
    indexer: Option<&crate::matching::MatchIndexer>,
    consumed: &[impl Borrow<Consumed>],
    offsets: &[(StoredOffset, Option<i64>)],
    commit: bool,
) -> Result<Applied, BatchError> {
    let mut applied = Applied { messages: consumed.len(), ..Applied::default() };
    // Redeliveries inside the batch: keep the first occurrence of an event id.
    let mut seen = HashSet::new();
    let mut events: Vec<(&Event, &Option<String>, &Option<MappedResource>)> = Vec::new();
    for c in consumed {
        match &c.borrow().outcome {
            Outcome::Change { event, body, resource } => {
                if seen.insert(event.event_id) {
                    events.push((event, body, resource));
                } else {
                    applied.duplicates += 1;
                }
            }
            Outcome::Rejected(_) => applied.dead_letters += 1,
            Outcome::Nothing => {}
        }
    }

    let (now, now_text) = platform::time::now_in_millis();
    let mut tx = pool.begin().await?;
    let mut members: Vec<String> = events.iter().map(|(e, _, _)| e.member_id.as_str().to_owned()).collect();
    members.sort();
    members.dedup();
    q::lock_members(&mut tx, &members).await?;

    // Each event's record, built once: the stored version of every record in the batch (a
    // change wins only over an older one).
    let keyed: Vec<(ComponentKey, &Event, &Option<String>, &Option<MappedResource>)> =
        events.iter().map(|&(e, body, resource)| (component_key(e), e, body, resource)).collect();
    let mut keys: Vec<ComponentKey> = keyed.iter().map(|(k, ..)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    let stored: HashMap<ComponentKey, q::StoredVersion> =
        q::component_versions(&mut tx, &keys).await?.into_iter().map(|s| (s.key.clone(), s)).collect();

    // Per record, the newest version in the batch (ties: the first one consumed), if it is newer
    // than the stored one. Only these winners change anything, so only their event ids are
    // claimed: an event that loses on version needs no record, since the stored version never
    // goes back. A winner whose id was applied before is a duplicate; without it, its record's
    // next newest event in the batch may win instead, so the winners are chosen again.
    let mut claimed: HashSet<Uuid> = HashSet::new();
    let mut repeated: HashSet<Uuid> = HashSet::new();
    let winners = loop {
        let mut stale = 0;
        let mut newest: BTreeMap<&ComponentKey, (&Event, &Option<String>, &Option<MappedResource>)> = BTreeMap::new();
        for (key, event, body, resource) in keyed.iter().filter(|(_, e, ..)| !repeated.contains(&e.event_id)) {
            match newest.entry(key) {
                Entry::Occupied(kept) if kept.get().0.version >= event.version => stale += 1,
                Entry::Occupied(mut kept) => {
                    stale += 1;
                    kept.insert((*event, *body, *resource));
                }
                Entry::Vacant(slot) => {
                    slot.insert((*event, *body, *resource));
                }
            }
        }
        let before = newest.len();
        newest.retain(|key, (event, _, _)| stored.get(*key).is_none_or(|p| p.version < event.version.get()));
        stale += before - newest.len();
        let unclaimed: Vec<Uuid> = newest.values().map(|(e, _, _)| e.event_id).filter(|id| !claimed.contains(id)).collect();
        claimed.extend(q::claim_event_ids(&mut tx, &unclaimed).await?);
        let again: Vec<Uuid> = unclaimed.into_iter().filter(|id| !claimed.contains(id)).collect();
        if again.is_empty() {
            applied.stale += stale;
            break newest;
        }
        applied.duplicates += again.len();
        repeated.extend(again);
    };

    let mut writes = Vec::new();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut moved_from = Vec::new();
    for (key, (event, body, resource)) in winners {
        let previous = stored.get(key);
        if composites.iter().any(|c| c.inputs().contains(&event.kind)) {
            dirty.insert(event.member_id.as_str().to_owned());
            // A record that moved to another member changes the old member's composite too.
            if let Some(p) = previous.filter(|p| p.member_id != event.member_id.as_str()) {
                dirty.insert(p.member_id.clone());
                moved_from.push(p.member_id.clone());
            }
        }
        let identity = mapping::identity(event.kind, event.member_id.as_str(), event.source.as_str(), event.record_id.as_str());
        let code = resource.as_ref().and_then(|r| r.code.clone());
        writes.push(ComponentWrite {
            key: key.clone(),
            member_id: event.member_id.as_str().to_owned(),
            version: event.version.get(),
            body: body.clone(),
            event_id: event.event_id,
            resource: identity.map(|(t, id)| (t.to_owned(), id)),
            code_system: code.as_ref().map(|c| c.0.clone()),
            code: code.map(|c| c.1),
            status: resource.as_ref().and_then(|r| r.status.clone()),
        });
    }
    if !moved_from.is_empty() {
        moved_from.sort();
        q::lock_members(&mut tx, &moved_from).await?;
    }
    q::write_components(&mut tx, &writes, now).await?;
    applied.components_written = writes.len();
    // Partner topics follow attribution: the relay reconciles these members (and a record's
    // previous member, when it moved).
    let mut attribution: Vec<String> = Vec::new();
    for w in writes.iter().filter(|w| w.key.kind == RecordKind::Attribution.as_str()) {
        attribution.push(w.member_id.clone());
        attribution.extend(stored.get(&w.key).filter(|p| p.member_id != w.member_id).map(|p| p.member_id.clone()));
    }
    attribution.sort();
    attribution.dedup();
    q::attribution_changed(&mut tx, &attribution).await?;

    if let Some(indexer) = indexer {
        // Demographics changed (or moved away from a member): re-index those members from
        // their live demographics, in this same transaction.
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for w in writes.iter().filter(|w| w.key.kind == RecordKind::Demographics.as_str()) {
            touched.insert(w.member_id.clone());
            if let Some(p) = stored.get(&w.key) {
                touched.insert(p.member_id.clone());
            }
        }
        if !touched.is_empty() {
            let members: Vec<String> = touched.into_iter().collect();
            let mut rows = Vec::new();
            for c in q::live_components(&mut tx, &members, &[RecordKind::Demographics.as_str()]).await? {
                rows.extend(indexer.rows(&c.member_id, &c.body));
            }
            db::matching::replace_members(&mut tx, &indexer.key_ids(), &members, &rows).await?;
        }
    }

    let mut rebuilt = rebuild(&mut tx, composites, &dirty.into_iter().collect::<Vec<_>>(), now, &now_text).await?;
    trace_versions(&mut rebuilt, consumed);
    rebuilt.write(&mut tx, now).await?;
    applied.composite_versions = rebuilt.versions.len();
    applied.insight_versions = rebuilt.insights.versions;
    applied.unknown_products = rebuilt.insights.unknown_products;

    if !offsets.is_empty() && !db::offsets::advance_offsets(&mut tx, group, offsets).await? {
        tx.rollback().await?;
        return Err(BatchError::Fenced);
    }
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(applied)
}

/// Gives each new version the composer's span of the change that made it: a child of the
/// trace of the member's last change in the batch (the one the version answers to).
fn trace_versions(rebuilt: &mut fhir::composite::Rebuilt, consumed: &[impl Borrow<Consumed>]) {
    if rebuilt.versions.is_empty() && rebuilt.insight_bundles.is_empty() {
        return;
    }
    let mut last: HashMap<&str, platform::trace::TraceParent> = HashMap::new();
    for c in consumed {
        let c = c.borrow();
        if let (Outcome::Change { event, .. }, Some(trace)) = (&c.outcome, c.trace) {
            last.insert(event.member_id.as_str(), trace);
        }
    }
    for v in &mut rebuilt.versions {
        let Some(trace) = last.get(v.member_id.as_str()) else { continue };
        let span = trace.child();
        if span.sampled() {
            tracing::debug!(member = %v.member_id, version = v.version_id, trace_id = %span.trace_id(), "composite version");
        }
        v.traceparent = Some(span.to_string());
    }
    for b in &mut rebuilt.insight_bundles {
        let Some(trace) = last.get(b.version.member_id.as_str()) else { continue };
        b.version.traceparent = Some(trace.child().to_string());
    }
}

fn component_key(event: &Event) -> ComponentKey {
    ComponentKey { kind: event.kind.as_str().to_owned(), source: event.source.as_str().to_owned(), record_id: event.record_id.as_str().to_owned() }
}
