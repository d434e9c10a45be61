//! The relay process: publishes composite changes from the outbox to
//! `fhir.medication-profile.v1` and the partner topics, until SIGTERM or ctrl-c.

use clap::Parser;
use relay::RelayConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = RelayConfig::parse();
    config.common.init_logs();
    relay::spawn(config).await?.until_signal("relay").await
}
