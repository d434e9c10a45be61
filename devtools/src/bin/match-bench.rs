//! Loads a PMM1 match index of synthetic members for the `$hashed-match` benchmark (not part
//! of the test suite): a fresh database, N members' stored values for one key id, and a file
//! of request bodies (tokens of indexed members, and of random people) for wrk to post.
//! Run through `scripts/bench match`, which passes the secrets and measures the API.

use clap::Parser;
use composer::matching::MatchIndexer;
use identity::{Identity, Normalized, PartnerKey};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use std::io::Write;
use std::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    common: platform::CommonConfig,
    #[command(flatten)]
    pmm1: platform::Pmm1Config,
    /// Database to create and load (must not exist).
    #[arg(long)]
    database: String,
    #[arg(long, default_value_t = 1_000_000)]
    members: usize,
    #[arg(long, default_value = "bench")]
    key_id: String,
    /// Where to write one request body per line.
    #[arg(long)]
    requests_out: std::path::PathBuf,
    /// Request bodies of each kind (indexed members, random people).
    #[arg(long, default_value_t = 5_000)]
    samples: usize,
}

fn identity_of(record: &Value) -> Identity {
    let text = |k: &str| record[k].as_str().unwrap_or_default().to_owned();
    Identity {
        given: text("given_name"),
        family: text("family_name"),
        birth_date: text("birth_date"),
        gender: text("sex"),
        line1: text("address_line"),
        postal_code: text("postal_code"),
        phone: text("phone"),
    }
}

fn request_body(key: &PartnerKey, key_id: &str, identity: &Identity) -> String {
    let mut parameter = vec![json!({ "name": "keyId", "valueString": key_id })];
    for (_, token) in identity::tokens(key, &Normalized::of(identity)) {
        let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
        parameter.push(json!({ "name": "token", "valueString": hex }));
    }
    json!({ "resourceType": "Parameters", "parameter": parameter }).to_string()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init("warn", platform::LogFormat::Text);
    let master = cli.pmm1.master().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("set PMM1_MASTER_SECRET"))?;
    let pepper = cli.pmm1.pepper().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("set PMM1_PEPPER"))?;
    let indexer = MatchIndexer::new(master.bytes(), pepper.bytes(), std::slice::from_ref(&cli.key_id));
    let key = PartnerKey::derive(master.bytes(), &cli.key_id);

    let admin = db::connect(&cli.common.database_url, 1).await?;
    println!("PostgreSQL durability: {}", db::bench::durability(&admin).await?);
    db::create_database(&admin, &cli.database).await?;
    let url = db::url_with_database(&cli.common.database_url, &cli.database)?;
    let pool = db::connect(&url, 2).await?;
    db::migrate(&pool).await?;

    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(11);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&cli.requests_out)?);
    let every = (cli.members / cli.samples.max(1)).max(1);
    let mut rows = Vec::new();
    for i in 0..cli.members {
        let member = format!("B{i:08}");
        let identity = identity_of(&devtools::generator::person(&mut rng));
        rows.extend(indexer.rows_of(&member, &identity));
        if i % every == 0 {
            writeln!(out, "{}", request_body(&key, &cli.key_id, &identity))?;
        }
        if rows.len() >= 250_000 {
            db::matching::append(&pool, &rows).await?;
            rows.clear();
        }
    }
    db::matching::append(&pool, &rows).await?;
    for _ in 0..cli.samples {
        let stranger = identity_of(&devtools::generator::person(&mut rng));
        writeln!(out, "{}", request_body(&key, &cli.key_id, &stranger))?;
    }
    out.flush()?;
    db::bench::analyze(&pool, "match_index").await?;
    let (count, bytes) = db::matching::size(&pool).await?;
    println!(
        "match index: {} members, {count} stored values, {:.0} MiB on disk (table and indexes), loaded in {:.0} s",
        cli.members,
        bytes as f64 / 1_048_576.0,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
