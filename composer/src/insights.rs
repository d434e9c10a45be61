//! The composer's insights schedule: what changes insights without an event.
//! - A new knowledge base: at start, the members it judges differently from the last one applied
//!   (those with a medication or allergy whose code it treats differently; every member with one
//!   it knows, the first time) are rebuilt, and it is recorded as applied.
//! - Time: members whose refill gaps open today (`insight_rechecks`) are rebuilt every
//!   `INSIGHTS_RECHECK_SECS`.
//!
//! A rebuild writes new versions only where something changed, under the members' locks, so
//! several composers may run this at once.

use fhir::composite::{Composites, rebuild_members};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Members rebuilt per transaction.
const PAGE: i64 = 200;

/// Starts the schedule on the current runtime (nothing when insights are off).
pub fn schedule(pool: db::Pool, composites: Composites, every: Duration, metrics: Arc<crate::metrics::Metrics>, stop: Arc<AtomicBool>) {
    if composites.insights.is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            match apply_knowledge_base(&pool, &composites).await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "insights: the knowledge base could not be applied yet; trying again"),
            }
            if sleep_unless_stopped(Duration::from_secs(5), &stop).await {
                return;
            }
        }
        loop {
            match recheck(&pool, &composites).await {
                Ok(n) => {
                    metrics.rechecked.inc_by(n);
                    if n > 0 {
                        tracing::info!(members = n, "insights: members looked at again as time passed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "insights: looking at members again failed; trying at the next interval"),
            }
            if sleep_unless_stopped(every, &stop).await {
                return;
            }
        }
    });
}

/// Sleeps `d`; `true` when `stop` was set meanwhile.
async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200).min(d)).await;
    }
    stop.load(Ordering::Relaxed)
}

/// Rebuilds the members the loaded knowledge base affects, unless it was applied already.
pub async fn apply_knowledge_base(pool: &db::Pool, composites: &Composites) -> anyhow::Result<()> {
    let Some(engine) = &composites.insights else { return Ok(()) };
    let kb = &engine.kb;
    let previous = db::insights::applied_knowledge_base(pool).await?;
    if previous.as_ref().is_some_and(|p| p.digest == kb.digest) {
        return Ok(());
    }
    db::insights::record_knowledge_base(pool, kb.version(), &kb.digest, &kb.text).await?;
    let codes: BTreeSet<String> = match previous.as_ref().map(|p| fhir::insights::KnowledgeBase::parse(&p.body)) {
        Some(Ok(old)) => old.affected_codes(kb),
        // None applied before (or the stored one no longer parses): every code it knows.
        _ => kb.all_codes(),
    };
    let codes: Vec<String> = codes.into_iter().collect();
    let (mut after, mut members, mut versions) = (String::new(), 0usize, 0usize);
    loop {
        let page = db::insights::members_with_codes(pool, &codes, &after, PAGE).await?;
        let Some(last) = page.last().cloned() else { break };
        let rebuilt = rebuild_members(pool, composites, &page).await?;
        members += page.len();
        versions += rebuilt.insights.versions;
        after = last;
    }
    db::insights::knowledge_base_applied(pool, kb.version()).await?;
    tracing::info!(
        version = kb.version(),
        previous = previous.as_ref().map_or("none", |p| p.version.as_str()),
        codes = codes.len(),
        members,
        insight_versions = versions,
        "insights: knowledge base applied"
    );
    Ok(())
}

/// Rebuilds the members whose insights are due to be looked at again today. Returns how many.
pub async fn recheck(pool: &db::Pool, composites: &Composites) -> anyhow::Result<u64> {
    let Some(engine) = &composites.insights else { return Ok(0) };
    let mut done = 0;
    loop {
        let today = engine.today();
        let page = db::insights::due_rechecks(pool, today, PAGE).await?;
        if page.is_empty() {
            return Ok(done);
        }
        rebuild_members(pool, composites, &page).await?;
        db::insights::clear_rechecks(pool, &page, today).await?;
        done += page.len() as u64;
    }
}
