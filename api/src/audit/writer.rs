//! Writes audit records in groups: one statement and one commit for all the requests that
//! arrived meanwhile, on connections of its own.

use crate::group_commit::{Batcher, Overlap};
use db::audit::AuditRecord;

/// Writes audit records in groups; `record` returns once its record is committed.
#[derive(Debug, Clone)]
pub struct Auditor {
    writer: Batcher<AuditRecord, bool>,
}

/// Most records written by one statement.
const GROUP: usize = 512;

impl Auditor {
    /// Starts `writers` writer tasks; while one commits, the next gathers, so commits overlap
    /// (and PostgreSQL flushes their WAL together).
    pub fn start(pool: db::Pool, writers: usize, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        let writer = Batcher::start(writers, GROUP, Overlap::Immediate, move |_, records: Vec<AuditRecord>| {
            let (pool, metrics) = (pool.clone(), metrics.clone());
            async move {
                let started = std::time::Instant::now();
                let appended = db::audit::append(&pool, &records).await;
                metrics.audit_written(started.elapsed());
                let written = match appended {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, records = records.len(), "audit records could not be written; the requests get 503");
                        false
                    }
                };
                vec![written; records.len()]
            }
        });
        Auditor { writer }
    }

    /// Records one access durably; `Err` when it could not be written.
    pub async fn record(&self, record: AuditRecord) -> Result<(), ()> {
        match self.writer.submit(record).await {
            Some(true) => Ok(()),
            _ => Err(()),
        }
    }
}
