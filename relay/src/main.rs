//! The relay process: publishes composite changes from the outbox to
//! `fhir.medication-profile.v1` and the partner topics, until SIGTERM or ctrl-c.

use clap::Parser;
use relay::{Relay, RelayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = RelayConfig::parse();
    config.common.init_logs();
    let pool = db::connect_configured(&config.common, 2).await?;
    db::migrate(&pool).await?;
    let stop = platform::shutdown::flag_on_signal("relay");
    Relay::new(config, pool)?.run(&stop).await
}
