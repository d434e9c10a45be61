//! The composer: consumes the systems-of-record topics, validates and maps each event, joins
//! them per member into composites, and stores components, composite versions, history, the
//! outbox and its consumer offsets, exactly once in effect. It never publishes composites
//! (the `relay` does) and never serves HTTP.
//!
//! Data flow: [`consumer`] (Kafka, positions in PostgreSQL) → [`apply::prepare`] (schemas,
//! `fhir::mapping`) → [`apply::apply`] (one transaction: components, composite versions built
//! by `fhir::composite`, outbox, offsets; the PMM1 [`matching`] index alongside).

pub mod apply;
pub mod config;
pub mod consumer;
pub mod insights;
pub mod matching;
pub mod metrics;

pub use config::ComposerConfig;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A composer running on its own thread, from [`spawn`].
pub struct Running {
    pub stop: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<anyhow::Result<()>>,
    pub metrics: Arc<consumer::Metrics>,
    /// Where its operations listener answers.
    pub ops_addr: std::net::SocketAddr,
}

/// Starts a composer on its own thread (connects, migrates, creates topics first) and its
/// operations listener; used by `main` and by the end-to-end tests.
pub async fn spawn(mut config: ComposerConfig) -> anyhow::Result<Running> {
    config.common.check_limits().map_err(anyhow::Error::msg)?;
    let pool = db::connect_configured(&config.common, config.common.database_max_connections).await?;
    db::migrate(&pool).await?;
    let stop = Arc::new(AtomicBool::new(false));
    platform::kafka::patiently("composer: checking its topics", &stop, || platform::kafka::ensure(&config.common.kafka)).await?;
    config.batch_size = fit_batch_size(config.batch_size, config.appliers, db::components::lock_capacity(&pool).await?);
    let composer = consumer::Composer::new(config.clone(), pool.clone(), fhir::composites(&config.common)?)?;
    let metrics = composer.metrics.clone();
    let ops_addr = serve_ops(&config, &pool, &metrics, stop.clone()).await?;
    let every = std::time::Duration::from_secs(config.common.insights.recheck_secs.max(1));
    insights::schedule(pool.clone(), fhir::composites(&config.common)?, every, metrics.clone(), stop.clone());
    let runtime = tokio::runtime::Handle::current();
    let flag = stop.clone();
    let thread = std::thread::Builder::new().name("composer".into()).spawn(move || composer.run(runtime, &flag))?;
    Ok(Running { stop, thread, metrics, ops_addr })
}

/// The operations listener: PostgreSQL and Kafka for `/ready`; the composer's metrics, the
/// consumer lag and the pool's use for `/metrics`.
async fn serve_ops(
    config: &ComposerConfig,
    pool: &db::Pool,
    metrics: &Arc<consumer::Metrics>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::net::SocketAddr> {
    let mut ops = config.common.ops();
    metrics.register(ops.registry());
    db::observe(&mut ops, pool);
    let observer = ops.watch_kafka(&config.common.kafka)?;
    let (metrics, pool, kafka, group) = (metrics.clone(), pool.clone(), config.common.kafka.clone(), config.group_id.clone());
    ops.on_scrape(move || {
        let (metrics, pool, kafka, group, observer) = (metrics.clone(), pool.clone(), kafka.clone(), group.clone(), observer.clone());
        async move {
            if let Err(e) = metrics::refresh_lag(&metrics, &pool, &kafka, observer, &group).await {
                tracing::warn!(error = %e, "consumer lag not refreshed");
            }
        }
    });
    ops.serve(config.common.ops_addr(platform::config::ops_port::COMPOSER), stop).await
}

/// The batch size to use: each applier's transaction holds one advisory lock per member of its
/// batch, and PostgreSQL fails a transaction ("out of shared memory") when its shared lock
/// table (`capacity` locks) is full. The appliers' batches together get at most half of it; a
/// larger `COMPOSER_BATCH_SIZE` is lowered to fit, with a warning.
pub fn fit_batch_size(batch_size: usize, appliers: usize, capacity: i64) -> usize {
    let fits = usize::try_from(capacity / 2).unwrap_or(0) / appliers.max(1);
    if batch_size <= fits {
        return batch_size.max(1);
    }
    tracing::warn!(
        batch_size,
        appliers,
        lock_table = capacity,
        using = fits.max(1),
        "COMPOSER_BATCH_SIZE x COMPOSER_APPLIERS member locks would not fit in half of PostgreSQL's lock table; \
         using a smaller batch size (raise max_locks_per_transaction to keep it)"
    );
    fits.max(1)
}

/// Stops a composer started by [`spawn`]: it finishes the batch in hand, then its thread ends.
pub async fn stop(flag: &AtomicBool, thread: std::thread::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    flag.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || thread.join()).await?.map_err(|_| anyhow::anyhow!("composer thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::fit_batch_size;

    #[test]
    fn batches_fit_in_half_the_lock_table() {
        // PostgreSQL's defaults: 64 locks per transaction x 100 connections.
        assert_eq!(fit_batch_size(2000, 1, 6400), 2000);
        assert_eq!(fit_batch_size(10_000, 1, 6400), 3200);
        assert_eq!(fit_batch_size(10_000, 3, 6400), 1066);
        // This project's services: 512 x 200 connections.
        assert_eq!(fit_batch_size(10_000, 3, 102_400), 10_000);
        assert_eq!(fit_batch_size(10_000, 0, 102_400), 10_000, "no appliers means one");
        assert_eq!(fit_batch_size(0, 1, 6400), 1, "a batch holds at least one message");
        assert_eq!(fit_batch_size(500, 4, 1), 1, "a tiny lock table still lets one member through");
    }
}
