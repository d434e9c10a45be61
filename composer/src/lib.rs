//! The composer: consume the systems-of-record topics, validate, map to FHIR, join per member
//! into composites, store them with their history and outbox, exactly once in effect.
//!
//! Data flow: [`consumer`] (Kafka, positions in PostgreSQL) → [`batch::prepare`] (schemas,
//! [`fhir`] mapping) → [`batch::apply`] (one transaction: components, [`composite`] versions,
//! outbox, offsets).

pub mod batch;
pub mod composite;
pub mod config;
pub mod consumer;
pub mod fhir;
pub mod generator;
pub mod matching;
pub mod notifier;
pub mod relay;
pub mod subscriptions;
pub mod topics;
pub mod writeback;

pub use config::ComposerConfig;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The composites this deployment builds.
pub fn composites(config: &ComposerConfig) -> Vec<Box<dyn composite::Composite>> {
    vec![Box::new(composite::MedicationProfile { base_url: config.common.fhir_base_url.trim_end_matches('/').to_owned() })]
}

/// Starts a composer on its own thread (connects, migrates, creates topics first). Returns the
/// stop flag and the thread; used by `main` and by the end-to-end tests.
pub async fn spawn(config: ComposerConfig) -> anyhow::Result<(Arc<AtomicBool>, Arc<consumer::Metrics>, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let pool = db::connect(&config.common.database_url, config.common.database_max_connections).await?;
    db::migrate(&pool).await?;
    topics::ensure(&config.common.kafka, config.topic_partitions).await?;
    let composer = consumer::Composer::new(config.clone(), pool, composites(&config))?;
    let metrics = composer.metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();
    let flag = stop.clone();
    let thread = std::thread::Builder::new().name("composer".into()).spawn(move || composer.run(runtime, &flag))?;
    Ok((stop, metrics, thread))
}

/// Stops a composer started by [`spawn`]: it finishes the batch in hand, then its thread ends.
pub async fn stop(flag: &AtomicBool, thread: std::thread::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    flag.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || thread.join()).await?.map_err(|_| anyhow::anyhow!("composer thread panicked"))?
}

/// A stop flag that SIGTERM or ctrl-c sets, for the long-running binaries (`relay`, `notifier`).
pub fn stop_on_signal(name: &'static str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("stopping {name}");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    stop
}
