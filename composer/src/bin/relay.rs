//! The relay process: publishes composite changes from the outbox to
//! `fhir.medication-profile.v1` and the partner topics, until SIGTERM or ctrl-c.

use clap::Parser;
use composer::relay::{Relay, RelayConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = RelayConfig::parse();
    config.common.init_logs();
    let pool = db::connect(&config.common.database_url, 2).await?;
    db::migrate(&pool).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("stopping relay");
        flag.store(true, Ordering::Relaxed);
    });
    Relay::new(config, pool)?.run(&stop).await
}
