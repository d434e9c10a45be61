//! Rebuilds the PMM1 match index of one key id from the live demographics (the current state
//! of `sor.member.demographics.v1`), e.g. after adding a key id for a rotation. Add the key id
//! to PMM1_KEY_IDS of the composer first, so that changes from then on are indexed too.

use clap::Parser;

#[derive(Parser)]
#[command(name = "match-index", about = "Rebuild the PMM1 match index for a key id")]
struct Cli {
    #[command(flatten)]
    common: platform::CommonConfig,
    #[command(flatten)]
    pmm1: platform::Pmm1Config,
    /// The key id to rebuild (one of PMM1_KEY_IDS).
    #[arg(long)]
    key_id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logs();
    let indexer = composer::matching::MatchIndexer::from_config(&cli.pmm1)?
        .ok_or_else(|| anyhow::anyhow!("set PMM1_KEY_IDS (with the key id), PMM1_MASTER_SECRET_FILE and PMM1_PEPPER_FILE"))?;
    let pool = db::connect_configured(&cli.common, 2).await?;
    db::migrate(&pool).await?;
    let started = std::time::Instant::now();
    let (members, rows) = composer::matching::rebuild(&pool, &indexer, &cli.key_id).await?;
    tracing::info!(key_id = %cli.key_id, members, rows, seconds = started.elapsed().as_secs_f64(), "match index rebuilt");
    println!("key id {}: {members} members, {rows} stored values, in {:.1} s", cli.key_id, started.elapsed().as_secs_f64());
    Ok(())
}
