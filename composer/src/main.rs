use clap::Parser;
use composer::ComposerConfig;
use std::sync::atomic::Ordering;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ComposerConfig::parse();
    platform::telemetry::init(&config.common.log_level, config.common.log_format);
    let (stop, _metrics, thread) = composer::spawn(config).await?;
    let waiter = tokio::task::spawn_blocking(move || thread.join());
    tokio::pin!(waiter);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("stopping composer");
            stop.store(true, Ordering::Relaxed);
            waiter.await?.map_err(|_| anyhow::anyhow!("composer thread panicked"))??;
        }
        joined = &mut waiter => {
            joined?.map_err(|_| anyhow::anyhow!("composer thread panicked"))??;
        }
    }
    Ok(())
}
