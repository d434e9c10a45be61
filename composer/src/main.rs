use clap::Parser;
use composer::ComposerConfig;
use std::sync::atomic::Ordering;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ComposerConfig::parse();
    config.common.init_logs();
    let composer::Running { stop, thread, .. } = composer::spawn(config).await?;
    let waiter = tokio::task::spawn_blocking(move || thread.join());
    tokio::pin!(waiter);
    tokio::select! {
        _ = platform::shutdown::signal() => {}
        joined = &mut waiter => {
            let ended = joined?.map_err(|_| anyhow::anyhow!("composer thread panicked"))?;
            // In the log too (a deployment's log file, not only stderr): why the composer exited.
            if let Err(e) = &ended {
                tracing::error!(error = %e, "composer stopped");
            }
            return ended;
        }
    }
    // Finish the batch in hand, then stop: its transaction either commits or never happened.
    tracing::info!("stopping composer");
    stop.store(true, Ordering::Relaxed);
    waiter.await?.map_err(|_| anyhow::anyhow!("composer thread panicked"))?
}
