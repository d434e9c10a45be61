//! Reading medication profiles in groups: the reads waiting at one moment, whoever the partners,
//! share one statement that also records them on the audit trail (`crate::group_commit`). The
//! body of a version already served comes from memory: a version's body never changes.

use crate::error::ApiError;
use crate::group_commit::{Batcher, Overlap};
use axum::http::StatusCode;
use bytes::Bytes;
use db::audit::AuditRecord;
use db::resources::{IfNoneMatch, ProfileRead, ServedRead};
use std::sync::Arc;
use std::time::Duration;

/// A read as served and recorded: its status, and the profile unless 404.
#[derive(Debug, Clone)]
pub struct Served {
    pub status: StatusCode,
    pub profile: Option<ServedProfile>,
}

/// A medication profile as served: `body` is `None` when the member was deleted.
#[derive(Debug, Clone)]
pub struct ServedProfile {
    pub version_id: i64,
    pub last_updated: time::OffsetDateTime,
    pub body: Option<Bytes>,
}

/// Reads medication profiles in groups. Every read asks PostgreSQL for the current version and
/// the attribution; the body of a version already served comes from memory (this spares the
/// database most of a read's work and bytes).
#[derive(Debug, Clone)]
pub struct ProfileReads {
    reads: Batcher<ProfileRead, Result<ServedRead, ()>>,
    /// By member: the last version served and its body (`None`: no cache).
    bodies: Option<Arc<BodyCache>>,
}

type BodyCache = quick_cache::sync::Cache<String, (i64, Bytes), BodyWeight>;

/// A cached body weighs its bytes plus its key and bookkeeping.
#[derive(Debug, Clone)]
struct BodyWeight;

impl quick_cache::Weighter<String, (i64, Bytes)> for BodyWeight {
    fn weight(&self, member_id: &String, (_, body): &(i64, Bytes)) -> u64 {
        (member_id.len() + body.len() + 64) as u64
    }
}

/// Most reads served by one statement.
const GROUP: usize = 256;

impl ProfileReads {
    /// A reader per pool (each with one connection, so that the first reader's statements all
    /// go to one server process); a group starts while another's statement is in flight only
    /// once that has run for `overlap_after`. `cache_bytes`: memory for bodies already served
    /// (0: none).
    pub fn start(pools: Vec<db::Pool>, overlap_after: Duration, cache_bytes: u64) -> Self {
        let pools = Arc::new(pools);
        let reads = Batcher::start(pools.len(), GROUP, Overlap::After(overlap_after), move |reader, reads: Vec<ProfileRead>| {
            let pool = pools[reader].clone();
            async move {
                // Attribution is by calendar day, UTC, as for every read.
                let on = time::OffsetDateTime::now_utc().date();
                match db::resources::medication_profiles(&pool, on, &reads).await {
                    Ok(profiles) => profiles.into_iter().map(Ok).collect(),
                    Err(e) => {
                        tracing::error!(error = %e, reads = reads.len(), "medication profiles could not be read");
                        vec![Err(()); reads.len()]
                    }
                }
            }
        });
        // A profile is about 5 kB.
        let bodies = (cache_bytes > 0).then(|| Arc::new(BodyCache::with_weighter((cache_bytes / 5_000) as usize, cache_bytes, BodyWeight)));
        ProfileReads { reads, bodies }
    }

    /// Serves one read and records its access (with the status served) in the same statement.
    pub async fn read(&self, member_id: &str, partner_id: &str, if_none_match: Option<IfNoneMatch>, access: AuditRecord) -> Result<Served, ApiError> {
        let known = self.bodies.as_ref().and_then(|cache| cache.get(member_id));
        let read = ProfileRead {
            member_id: member_id.to_owned(),
            partner_id: partner_id.to_owned(),
            known_version: known.as_ref().map(|k| k.0),
            if_none_match,
            access,
        };
        let served = match self.reads.submit(read).await {
            Some(Ok(served)) => served,
            _ => return Err(ApiError::Unavailable("the database is not available; retry later".into())),
        };
        let status = StatusCode::from_u16(served.status as u16).map_err(|_| ApiError::Unavailable("the profile read gave no status".into()))?;
        let Some(profile) = served.profile else { return Ok(Served { status, profile: None }) };
        let (version_id, last_updated) = (profile.version_id, profile.last_updated);
        let body = match (profile.deleted, profile.body, known) {
            (true, _, _) => {
                if let Some(cache) = &self.bodies {
                    cache.remove(member_id);
                }
                None
            }
            (false, Some(body), _) => {
                let body = Bytes::from(body);
                if let Some(cache) = &self.bodies {
                    cache.insert(member_id.to_owned(), (version_id, body.clone()));
                }
                Some(body)
            }
            (false, None, Some((known_version, body))) if known_version == version_id => Some(body),
            (false, None, _) => {
                // Recorded as served; the guard records the 503 as well.
                tracing::error!(member_id, version_id, "the current medication profile has no stored body");
                return Err(ApiError::Unavailable("the medication profile could not be read; retry later".into()));
            }
        };
        Ok(Served { status, profile: Some(ServedProfile { version_id, last_updated, body }) })
    }
}
