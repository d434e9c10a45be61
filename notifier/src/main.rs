//! The notifier process: delivers FHIR Subscription notifications (rest-hook and Kafka
//! channels) from the per-subscription queues, until SIGTERM or ctrl-c.

use clap::Parser;
use notifier::{Notifier, NotifierConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = NotifierConfig::parse();
    config.common.init_logs();
    let pool = db::connect_configured(&config.common, (config.concurrency as u32 / 4).clamp(4, 16)).await?;
    db::migrate(&pool).await?;
    let stop = platform::shutdown::flag_on_signal("notifier");
    Notifier::new(config, pool)?.run(stop).await
}
