//! Publishes synthetic systems-of-record events for N members to the `sor.*` topics.

use clap::Parser;
use devtools::generator::{self, GeneratorConfig};

#[derive(Parser)]
#[command(about = "Publish synthetic systems-of-record events to the sor.* topics")]
struct Cli {
    #[command(flatten)]
    kafka: platform::KafkaConfig,
    /// Number of members.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Number of the first member (M0000001 is 1).
    #[arg(long, default_value_t = 1)]
    first_member: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Malformed messages to mix in (they go to sor.dlq.v1).
    #[arg(long, default_value_t = 0)]
    malformed: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init("info", platform::LogFormat::Text);
    platform::kafka::ensure(&cli.kafka).await?;
    let cfg = GeneratorConfig {
        members: cli.members,
        first_member: cli.first_member,
        seed: cli.seed,
        malformed: cli.malformed,
        ..GeneratorConfig::default()
    };
    let messages = generator::generate(&cfg);
    let started = std::time::Instant::now();
    generator::publish(&generator::producer(&cli.kafka)?, &cli.kafka, &messages).await?;
    println!("published {} events for {} members in {:.1?}", messages.len(), cli.members, started.elapsed());
    Ok(())
}
