//! `fhirctl rebuild` and `fhirctl replay`: composites recomputed from their stored components
//! (after a bad deploy), and current composites published again (for a partner who lost its
//! copy). Both go in member order, a page at a time, alongside a running platform.

use fhir::composite::Composites;
use indicatif::{ProgressBar, ProgressStyle};

/// Members per transaction: each holds one advisory lock per member, as a composer batch does.
const PAGE: i64 = 500;

/// What a rebuild did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Rebuilt {
    pub members: u64,
    pub new_versions: u64,
}

/// Which members to rebuild.
pub enum Members {
    All,
    One(String),
    TouchedSince(time::OffsetDateTime),
}

/// Recomputes the composites of `members` from their components, writing a new version (and
/// its outbox row, so it is published and notified like any change) only where the content
/// differs from the stored one.
pub async fn rebuild(pool: &db::Pool, composites: &Composites, members: Members, progress: &ProgressBar) -> anyhow::Result<Rebuilt> {
    let mut done = Rebuilt::default();
    let mut after = String::new();
    loop {
        let page = match &members {
            Members::One(m) if after.is_empty() => vec![m.clone()],
            Members::One(_) => Vec::new(),
            Members::All => db::composites::members_to_rebuild(pool, None, &after, PAGE).await?,
            Members::TouchedSince(t) => db::composites::members_to_rebuild(pool, Some(*t), &after, PAGE).await?,
        };
        let Some(last) = page.last().cloned() else { break };
        let rebuilt = fhir::composite::rebuild_members(pool, composites, &page).await?;
        let versions = &rebuilt.versions;
        for v in versions {
            tracing::info!(member = %v.member_id, version = v.version_id, "composite rebuilt with a new version");
        }
        done.members += page.len() as u64;
        done.new_versions += versions.len() as u64;
        progress.inc(page.len() as u64);
        progress.set_message(format!("{} new versions", done.new_versions));
        after = last;
    }
    Ok(done)
}

/// Publishes live composites again without new versions: to `fhir.medication-profile.v1` and
/// the partner topics (`member`: one member's), through the outbox in order. Returns how many.
pub async fn replay_everywhere(pool: &db::Pool, member: Option<&str>, progress: &ProgressBar) -> anyhow::Result<u64> {
    let topic = platform::topics::MEDICATION_PROFILE;
    let mut after = String::new();
    let mut queued = 0;
    loop {
        let page = db::composites::live_versions(pool, member, &after, PAGE).await?;
        let Some((last, _)) = page.last().cloned() else { break };
        let rows: Vec<(String, i64, uuid::Uuid)> = page.into_iter().map(|(m, v)| (m.clone(), v, fhir::composite::event_id(topic, &m, v))).collect();
        queued += db::outbox::replay(pool, topic, &rows).await?;
        progress.inc(rows.len() as u64);
        after = last;
    }
    Ok(queued)
}

/// A progress bar on the terminal (hidden when stderr is not one, or for JSON output).
pub fn progress(length: Option<u64>, what: &'static str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = match length {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template =
        if length.is_some() { "{prefix} [{bar:40}] {pos}/{len} members, {msg} ({eta} left)" } else { "{prefix} {spinner} {pos} members, {msg}" };
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_prefix(what);
    bar
}
