//! Composer throughput benchmark (not part of the test suite): publishes ≥1M synthetic events
//! over 100k members to a fresh topic namespace, runs the composer on a fresh database with
//! production durability (fsync and synchronous_commit on, acks=all), and prints sustained
//! events/s next to this PostgreSQL's batched-upsert ceiling. Run: `scripts/bench composer`.

use clap::Parser;
use devtools::generator::{self, GeneratorConfig};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    common: platform::CommonConfig,
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// `COMPOSER_BATCH_SIZE` (the composer's default).
    #[arg(long, default_value_t = 10_000)]
    batch_size: usize,
    /// Composer appliers (`COMPOSER_APPLIERS`): a bulk load like this one runs one per
    /// partition.
    #[arg(long, default_value_t = 3)]
    appliers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init("warn", platform::LogFormat::Text);
    let run = format!("bench_{}", std::process::id());
    let kafka = platform::KafkaConfig { topic_prefix: format!("{run}."), ..cli.common.kafka.clone() };

    let admin = db::connect(&cli.common.database_url, 1).await?;
    let settings = db::bench::durability(&admin).await?;
    println!("PostgreSQL durability: {settings}");
    db::create_database(&admin, &run).await?;
    let url = db::url_with_database(&cli.common.database_url, &run)?;

    platform::kafka::ensure(&kafka).await?;
    let started = Instant::now();
    let stream = generator::generate(&GeneratorConfig { members: cli.members, seed: 1, ..GeneratorConfig::default() });
    let total = stream.len();
    println!("generated {total} events for {} members in {:.1?}", cli.members, started.elapsed());
    let started = Instant::now();
    generator::publish(&generator::producer(&kafka)?, &kafka, &stream).await?;
    let publish = started.elapsed();
    println!("published (acks=all, idempotent) in {publish:.1?}: {:.0} events/s", total as f64 / publish.as_secs_f64());
    drop(stream);

    let mut config = composer::ComposerConfig::parse_from(["composer", "--database-url", &url]);
    config.common.kafka = kafka.clone();
    config.group_id = run.clone();
    config.batch_size = cli.batch_size;
    config.appliers = cli.appliers;
    println!("composer: batches of up to {}, {} appliers", cli.batch_size, cli.appliers);
    config.common.ops_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let composer::Running { stop, thread, metrics, .. } = composer::spawn(config).await?;
    let pool = db::connect(&url, 2).await?;
    let started = Instant::now();
    let mut last = (Instant::now(), 0i64);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let applied = db::offsets::total_position(&pool, &run).await?;
        if last.0.elapsed() >= Duration::from_secs(10) {
            println!(
                "  {applied} / {total} applied ({:.0} events/s over the last {:.0?})",
                (applied - last.1) as f64 / last.0.elapsed().as_secs_f64(),
                last.0.elapsed()
            );
            last = (Instant::now(), applied);
        }
        if applied >= total as i64 {
            break;
        }
    }
    let elapsed = started.elapsed();
    composer::stop(&stop, thread).await?;
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "composer: {total} events in {elapsed:.1?} = {rate:.0} events/s sustained ({} composite versions, {} DetectedIssue versions, {} stale, {} duplicates)",
        metrics.composite_versions.get(),
        metrics.insight_versions.get(),
        metrics.events("stale"),
        metrics.events("duplicate")
    );

    let rows = 1_000_000;
    let ceiling = db::bench::upsert_ceiling(&pool, rows, cli.batch_size, 600).await?;
    let ceiling_rate = rows as f64 / ceiling.as_secs_f64();
    println!("PostgreSQL batched-upsert ceiling: {rows} rows of ~600 B in batches of {} = {ceiling_rate:.0} rows/s", cli.batch_size);
    println!("composer / ceiling = {:.2}", rate / ceiling_rate);
    pool.close().await;
    db::bench::drop_database(&admin, &run).await?;
    platform::kafka::delete_namespace(&kafka).await?;
    Ok(())
}
