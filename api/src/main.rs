use api::{Application, Config};
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.common.init_logs();
    let app = Application::build(&config).await?;
    tracing::info!(addr = %app.local_addr()?, "api listening");
    app.run_until_stopped().await?;
    Ok(())
}
