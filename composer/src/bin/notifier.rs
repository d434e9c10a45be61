//! The notifier process: delivers FHIR Subscription notifications (rest-hook and Kafka
//! channels) from the per-subscription queues, until SIGTERM or ctrl-c.

use clap::Parser;
use composer::notifier::{Notifier, NotifierConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = NotifierConfig::parse();
    config.common.init_logs();
    let pool = db::connect(&config.common.database_url, (config.concurrency as u32 / 4).clamp(4, 16)).await?;
    db::migrate(&pool).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("stopping notifier");
        flag.store(true, Ordering::Relaxed);
    });
    Notifier::new(config, pool)?.run(stop).await
}
