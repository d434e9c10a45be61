//! Applies the platform's migrations to the database named by DATABASE_URL.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Apply the platform's database migrations")]
struct Cli {
    #[command(flatten)]
    common: platform::CommonConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logs();
    let pool = db::connect_configured(&cli.common, 2).await?;
    db::migrate(&pool).await?;
    let applied = db::MIGRATOR.iter().count();
    tracing::info!(migrations = applied, "database migrated");
    Ok(())
}
