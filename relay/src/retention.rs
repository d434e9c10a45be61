//! Retention: what the platform keeps, and for how long (docs/operations.md, "Retention").
//!
//! - Applied event ids: while a redelivery of the event is possible, i.e. while the
//!   systems-of-record topics may still hold it (their retention, 7 days by default, plus a
//!   margin): 8 days.
//! - Published outbox rows that subscriptions were fanned out from: a day.
//! - Delivered subscription events: the `$events` replay window, 7 days.
//! - Composite and resource history: by policy (off by default: every version is kept).
//! - The audit trail: by month. A month past the retention is first exported to a file (gzip
//!   NDJSON of AuditEvents, with a manifest holding its row count and SHA-256), the file is read
//!   back and checked against the manifest, and only then is the month's partition detached and
//!   dropped. Off by default, and never without an export directory.
//!
//! Each step removes a batch at a time with a pause between batches, so that the pipeline's
//! transactions never wait long behind it. The relay runs it on a schedule; `fhirctl retention
//! run` runs it now. One run at a time across every process (an advisory lock).

use clap::Args;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Debug, Clone, Args)]
pub struct RetentionConfig {
    /// How often the relay runs retention, in seconds (0: never; `fhirctl retention run` still can).
    #[arg(long, env = "RETENTION_INTERVAL_SECS", default_value_t = 3600)]
    pub retention_interval_secs: u64,

    /// Applied event ids are kept this long, in hours: longer than the systems-of-record topics
    /// keep messages (a redelivery of an id no longer kept would be applied again).
    #[arg(long, env = "RETENTION_APPLIED_EVENTS_HOURS", default_value_t = 192)]
    pub retention_applied_events_hours: u64,

    /// Published (and fanned out) outbox rows are kept this long, in hours.
    #[arg(long, env = "RETENTION_PUBLISHED_OUTBOX_HOURS", default_value_t = 24)]
    pub retention_published_outbox_hours: u64,

    /// Delivered subscription events are kept this long, in hours: the `$events` replay window.
    #[arg(long, env = "RETENTION_SUBSCRIPTION_EVENTS_HOURS", default_value_t = 168)]
    pub retention_subscription_events_hours: u64,

    /// Versions of composites and resources that a newer one replaced are kept this long, in
    /// days (0: kept for ever).
    #[arg(long, env = "RETENTION_HISTORY_DAYS", default_value_t = 0)]
    pub retention_history_days: u64,

    /// Months of audit trail kept besides the current one (0: kept for ever). Older months are
    /// exported to RETENTION_AUDIT_EXPORT_DIR, verified, then dropped.
    #[arg(long, env = "RETENTION_AUDIT_MONTHS", default_value_t = 0)]
    pub retention_audit_months: u32,

    /// Where exported audit months go (required when RETENTION_AUDIT_MONTHS is set).
    #[arg(long, env = "RETENTION_AUDIT_EXPORT_DIR")]
    pub retention_audit_export_dir: Option<PathBuf>,

    /// Rows removed per statement.
    #[arg(long, env = "RETENTION_BATCH_ROWS", default_value_t = 1000)]
    pub retention_batch_rows: i64,

    /// Pause between two statements, in milliseconds: at most a batch per pause per table, well
    /// above what a table gains at 1,000 events/s, and little enough that the pipeline's
    /// transactions hardly notice (docs/benchmarks.md).
    #[arg(long, env = "RETENTION_PAUSE_MS", default_value_t = 100)]
    pub retention_pause_ms: u64,
}

impl Default for RetentionConfig {
    /// The defaults above, with RETENTION_* from the environment, as the relay reads them.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Settings {
            #[command(flatten)]
            retention: RetentionConfig,
        }
        <Settings as clap::Parser>::parse_from(["retention"]).retention
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

/// What retention did, for the operations listener.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    deleted: Family<TableLabel, Counter>,
    audit_months: Counter,
    runs: Counter,
    failures: Counter,
    last_run_seconds: Gauge<f64, AtomicU64>,
    last_success: Gauge,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("retention");
        for table in TABLES {
            let _ = self.deleted.get_or_create(&TableLabel { table });
        }
        r.register("rows_deleted", "Rows retention removed, by table", self.deleted.clone());
        r.register("audit_partitions_dropped", "Audit months exported, verified and dropped", self.audit_months.clone());
        r.register("runs", "Retention runs", self.runs.clone());
        r.register("failures", "Retention runs that failed", self.failures.clone());
        r.register("last_run_seconds", "How long the last run took", self.last_run_seconds.clone());
        r.register("last_success_timestamp_seconds", "When the last run succeeded (Unix time)", self.last_success.clone());
    }
}

const TABLES: [&str; 5] = ["applied_events", "outbox", "subscription_events", "composite_history", "resource_history"];

/// What a run did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Rows removed per table.
    pub deleted: std::collections::BTreeMap<&'static str, u64>,
    /// Audit months exported and dropped: their manifests.
    pub audit: Vec<PathBuf>,
    /// Set when another process was running retention (nothing was done).
    pub skipped: bool,
}

/// One run of every step. `base_url`: the FHIR base of the exported AuditEvents' references.
pub async fn run(pool: &db::Pool, config: &RetentionConfig, base_url: &str, metrics: &Metrics) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    metrics.runs.inc();
    let result = run_locked(pool, config, base_url, metrics).await;
    metrics.last_run_seconds.set(started.elapsed().as_secs_f64());
    match &result {
        Ok(report) if !report.skipped => {
            metrics.last_success.set(OffsetDateTime::now_utc().unix_timestamp());
        }
        Ok(_) => {}
        Err(_) => {
            metrics.failures.inc();
        }
    }
    result
}

async fn run_locked(pool: &db::Pool, config: &RetentionConfig, base_url: &str, metrics: &Metrics) -> anyhow::Result<Report> {
    let mut lock = pool.acquire().await?;
    if !db::retention::try_lock(&mut lock).await? {
        return Ok(Report { skipped: true, ..Report::default() });
    }
    let result = steps(pool, config, base_url, metrics).await;
    db::retention::unlock(&mut lock).await?;
    result
}

async fn steps(pool: &db::Pool, config: &RetentionConfig, base_url: &str, metrics: &Metrics) -> anyhow::Result<Report> {
    let now = OffsetDateTime::now_utc();
    let hours = |h: u64| now - time::Duration::hours(i64::try_from(h).unwrap_or(i64::MAX / 3600));
    let mut report = Report::default();
    let batch = config.retention_batch_rows.max(1);
    let pause = Duration::from_millis(config.retention_pause_ms);
    macro_rules! step {
        ($table:expr, $f:path, $before:expr) => {{
            let before = $before;
            let mut total = 0u64;
            loop {
                let n = $f(pool, before, batch).await?;
                total += n;
                metrics.deleted.get_or_create(&TableLabel { table: $table }).inc_by(n);
                if n < batch as u64 {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            report.deleted.insert($table, total);
        }};
    }
    step!("applied_events", db::retention::applied_events, hours(config.retention_applied_events_hours));
    step!("outbox", db::retention::published_outbox, hours(config.retention_published_outbox_hours));
    step!("subscription_events", db::retention::delivered_subscription_events, hours(config.retention_subscription_events_hours));
    if config.retention_history_days > 0 {
        let before = hours(config.retention_history_days.saturating_mul(24));
        step!("composite_history", db::retention::composite_history, before);
        step!("resource_history", db::retention::resource_history, before);
    }
    db::audit::ensure_partitions(pool, 2).await?;
    if config.retention_audit_months > 0 {
        let dir = config.retention_audit_export_dir.as_deref().ok_or_else(|| {
            anyhow::anyhow!("RETENTION_AUDIT_MONTHS is set but RETENTION_AUDIT_EXPORT_DIR is not: audit months are never dropped unexported")
        })?;
        let this_month = now.replace_day(1)?.replace_time(time::Time::MIDNIGHT);
        let cutoff = months_before(this_month, config.retention_audit_months);
        for partition in db::audit::partitions(pool).await? {
            // Only whole months past the retention; never the default partition.
            let Some(to) = partition.to else { continue };
            if to > cutoff {
                continue;
            }
            if partition.unpublished > 0 {
                tracing::warn!(partition = %partition.name, unpublished = partition.unpublished, "audit month past retention still has events not on audit.events.v1; kept for now");
                continue;
            }
            let manifest = export(pool, &partition, dir, base_url).await?;
            verify(&manifest)?;
            db::audit::drop_partition(pool, &partition.name).await?;
            metrics.audit_months.inc();
            tracing::info!(partition = %partition.name, manifest = %manifest.display(), "audit month exported, verified and dropped");
            report.audit.push(manifest);
        }
    }
    Ok(report)
}

/// The first instant of the month `months` before `month_start`.
fn months_before(month_start: OffsetDateTime, months: u32) -> OffsetDateTime {
    let total = month_start.year() * 12 + i32::from(u8::from(month_start.month())) - 1 - i32::try_from(months).unwrap_or(i32::MAX / 2);
    let (year, month) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    let month = time::Month::try_from(u8::try_from(month).unwrap_or(1)).unwrap_or(time::Month::January);
    time::Date::from_calendar_date(year, month, 1).map_or(month_start, |d| d.midnight().assume_utc())
}

/// What an exported audit month holds, written next to it (`<partition>.manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub partition: String,
    /// The month's range (`from` absent: everything before `to`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub from: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub to: Option<OffsetDateTime>,
    pub rows: u64,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    /// The export's file name, in the manifest's directory.
    pub file: String,
    /// SHA-256 of the file as written (compressed), hex.
    pub sha256: String,
    pub format: String,
    #[serde(with = "time::serde::rfc3339")]
    pub exported_at: OffsetDateTime,
}

const FORMAT: &str = "gzip-compressed NDJSON: one FHIR R4B AuditEvent per line, in id order";

/// Writes a partition's events to `<dir>/<partition>.ndjson.gz` and its manifest beside it (each
/// written under a temporary name, flushed to disk, then renamed), and returns the manifest's path.
async fn export(pool: &db::Pool, partition: &db::audit::Partition, dir: &Path, base_url: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let file_name = format!("{}.ndjson.gz", partition.name);
    let path = dir.join(&file_name);
    let partial = dir.join(format!("{file_name}.partial"));
    let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(std::fs::File::create(&partial)?), flate2::Compression::default());
    let (mut rows, mut first_id, mut last_id) = (0u64, None, None);
    let mut after = i64::MIN;
    loop {
        let page = db::audit::partition_rows(pool, &partition.name, after, 5000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for row in &page {
            gz.write_all(fhir::audit::audit_event_json(row, base_url).as_bytes())?;
            gz.write_all(b"\n")?;
            first_id.get_or_insert(row.id);
            last_id = Some(row.id);
            rows += 1;
        }
    }
    let file = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, &path)?;
    let manifest = Manifest {
        partition: partition.name.clone(),
        from: partition.from,
        to: partition.to,
        rows,
        first_id,
        last_id,
        file: file_name,
        sha256: sha256_file(&path)?,
        format: FORMAT.to_owned(),
        exported_at: OffsetDateTime::now_utc(),
    };
    let manifest_path = dir.join(format!("{}.manifest.json", partition.name));
    let partial = dir.join(format!("{}.manifest.json.partial", partition.name));
    let mut out = std::fs::File::create(&partial)?;
    out.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&partial, &manifest_path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(manifest_path)
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    loop {
        let chunk = file.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(chunk);
        let n = chunk.len();
        file.consume(n);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads an export back and checks it against its manifest: the file's SHA-256, then every line
/// an AuditEvent, as many as the manifest says, the first and last ids its own. Returns the
/// manifest.
pub fn verify(manifest_path: &Path) -> anyhow::Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(manifest_path)?)?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let file = dir.join(&manifest.file);
    let digest = sha256_file(&file)?;
    anyhow::ensure!(digest == manifest.sha256, "{}: SHA-256 {digest}, the manifest says {}", file.display(), manifest.sha256);
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(std::fs::File::open(&file)?));
    let (mut rows, mut first, mut last) = (0u64, None, None);
    for line in reader.lines() {
        let event: serde_json::Value = serde_json::from_str(&line?)?;
        anyhow::ensure!(event["resourceType"] == "AuditEvent", "{}: line {} is not an AuditEvent", file.display(), rows + 1);
        let id = event["id"].as_str().and_then(|i| i.parse::<i64>().ok());
        first = first.or(id);
        last = id;
        rows += 1;
    }
    anyhow::ensure!(rows == manifest.rows, "{}: {rows} events, the manifest says {}", file.display(), manifest.rows);
    anyhow::ensure!(
        (first, last) == (manifest.first_id, manifest.last_id),
        "{}: ids {first:?}..{last:?}, the manifest says {:?}..{:?}",
        file.display(),
        manifest.first_id,
        manifest.last_id
    );
    Ok(manifest)
}

/// Runs retention a minute after start and then every `retention_interval_secs`, until `stop`
/// (the relay's schedule).
pub fn schedule(pool: db::Pool, config: RetentionConfig, base_url: String, metrics: Metrics, stop: Arc<AtomicBool>) {
    if config.retention_interval_secs == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut due = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            while tokio::time::Instant::now() < due {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match run(&pool, &config, &base_url, &metrics).await {
                Ok(r) if r.skipped => tracing::debug!("retention: another process is running it"),
                Ok(r) => tracing::info!(deleted = ?r.deleted, audit_months = r.audit.len(), "retention run"),
                Err(e) => tracing::error!(error = %e, "retention run failed; it runs again at the next interval"),
            }
            due = tokio::time::Instant::now() + Duration::from_secs(config.retention_interval_secs);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_before_crosses_years() {
        let dec = time::macros::datetime!(2026-12-01 0:00 UTC);
        assert_eq!(months_before(dec, 0), dec);
        assert_eq!(months_before(dec, 11), time::macros::datetime!(2026-01-01 0:00 UTC));
        assert_eq!(months_before(dec, 12), time::macros::datetime!(2025-12-01 0:00 UTC));
        assert_eq!(months_before(dec, 84), time::macros::datetime!(2019-12-01 0:00 UTC));
    }

    #[test]
    fn a_tampered_export_fails_verification() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("retention-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("audit_events_2025_01.ndjson.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&file)?, flate2::Compression::default());
        gz.write_all(b"{\"resourceType\":\"AuditEvent\",\"id\":\"7\"}\n{\"resourceType\":\"AuditEvent\",\"id\":\"9\"}\n")?;
        gz.finish()?;
        let manifest = Manifest {
            partition: "audit_events_2025_01".into(),
            from: None,
            to: None,
            rows: 2,
            first_id: Some(7),
            last_id: Some(9),
            file: "audit_events_2025_01.ndjson.gz".into(),
            sha256: sha256_file(&file)?,
            format: FORMAT.into(),
            exported_at: OffsetDateTime::now_utc(),
        };
        let path = dir.join("m.json");
        std::fs::write(&path, serde_json::to_vec(&manifest)?)?;
        assert_eq!(verify(&path)?, manifest);
        std::fs::write(&path, serde_json::to_vec(&Manifest { rows: 3, ..manifest.clone() })?)?;
        assert!(verify(&path).is_err(), "a row count that differs");
        std::fs::write(&path, serde_json::to_vec(&manifest)?)?;
        let mut bytes = std::fs::read(&file)?;
        let last = bytes.len() - 9;
        bytes[last] ^= 1;
        std::fs::write(&file, bytes)?;
        assert!(verify(&path).is_err(), "a changed byte");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
