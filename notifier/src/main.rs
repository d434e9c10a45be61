//! The notifier process: delivers FHIR Subscription notifications (rest-hook and Kafka
//! channels) from the per-subscription queues, until SIGTERM or ctrl-c.

use clap::Parser;
use notifier::NotifierConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = NotifierConfig::parse();
    config.common.init_logs();
    notifier::spawn(config).await?.until_signal("notifier").await
}
