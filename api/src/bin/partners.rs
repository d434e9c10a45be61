//! The partner registry, for operators: register, list, disable and enable partners, and (for
//! local use) register a demo partner and print a bearer token for it in one command.

use api::auth::client::{ClientKey, check_jwks, token_request};
use api::auth::scope::Scope;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "partners", about = "Manage the partners (SMART Backend Services clients) of the platform")]
struct Cli {
    #[command(flatten)]
    common: platform::CommonConfig,
    #[command(flatten)]
    pmm1: platform::Pmm1Config,
    /// A command that gives a partner its Kafka principal and ACLs, run as `<command> grant <id>`
    /// after `register` and `enable`, and `<command> revoke <id>` after `disable` (the cluster
    /// profile's: `scripts/services partner-principal`). Split on spaces; the id is one argument.
    #[arg(long, env = "PARTNER_KAFKA_PRINCIPAL_COMMAND")]
    kafka_principal_command: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Runs the Kafka principal command, if there is one, for `action` on partner `id`.
fn kafka_principal(command: Option<&str>, action: &str, id: &str) -> anyhow::Result<()> {
    let Some(command) = command else { return Ok(()) };
    let mut words = command.split_whitespace();
    let program = words.next().ok_or_else(|| anyhow::anyhow!("PARTNER_KAFKA_PRINCIPAL_COMMAND is empty"))?;
    let status = std::process::Command::new(program).args(words).args([action, id]).stdout(std::process::Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "the Kafka principal command failed ({status}) to {action} {id}; the registry is changed: run it again");
    Ok(())
}

/// A partner's rate limit and PMM1 key ids.
#[derive(clap::Args)]
struct Limits {
    /// Sustained requests per second (default: the API's RATE_LIMIT_PER_SECOND).
    #[arg(long)]
    rate: Option<f64>,
    /// Burst size (default: the API's RATE_LIMIT_BURST).
    #[arg(long)]
    burst: Option<i32>,
    /// PMM1 key ids it may use for $hashed-match, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pmm1_key_ids: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Register a partner, or replace the registration of an existing one.
    Register {
        /// Partner id: the OAuth client id, and the `partner_id` of its attributions.
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        /// File holding the partner's public JWK Set (`-` for stdin).
        #[arg(long)]
        jwks: PathBuf,
        /// Scopes it may be granted, space-separated (e.g. "system/*.read").
        #[arg(long, default_value = "system/*.read")]
        scopes: String,
        #[command(flatten)]
        limits: Limits,
    },
    /// List partners (without their keys).
    List,
    /// Disable a partner: it gets no new token and its tokens stop working at once.
    Disable {
        #[arg(long)]
        id: String,
    },
    /// Enable a disabled partner again.
    Enable {
        #[arg(long)]
        id: String,
    },
    /// Print the PMM1 partner key of a key id (hex), for the operator to hand over out of band.
    /// Needs the master secret (PMM1_MASTER_SECRET_FILE).
    Pmm1Key {
        #[arg(long)]
        key_id: String,
    },
    /// For local use: register a demo partner with a P-384 key kept under the state directory,
    /// get a token from the running API through the SMART flow, and print it.
    DemoToken {
        /// The demo data attributes members to partner-1, partner-2 and partner-3.
        #[arg(long, default_value = "partner-1")]
        id: String,
        #[arg(long, default_value = "system/*.read")]
        scopes: String,
        #[command(flatten)]
        limits: Limits,
        /// The token endpoint (default: derived from FHIR_BASE_URL).
        #[arg(long, env = "AUTH_TOKEN_URL")]
        token_url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logs();
    if let Command::Pmm1Key { key_id } = &cli.command {
        anyhow::ensure!(api::rest::parse_id(key_id).is_ok(), "a key id is 1 to 64 characters of A-Z, a-z, 0-9, '-' or '.'");
        let master = cli.pmm1.master().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("set PMM1_MASTER_SECRET_FILE"))?;
        println!("{}", identity::PartnerKey::derive(master.bytes(), key_id).to_hex());
        return Ok(());
    }
    let pool = db::connect_configured(&cli.common, 2).await?;
    db::migrate(&pool).await?;
    match cli.command {
        Command::Pmm1Key { .. } => {}
        Command::Register { id, name, jwks, scopes, limits } => {
            let jwks = if jwks.as_os_str() == "-" { std::io::read_to_string(std::io::stdin())? } else { std::fs::read_to_string(&jwks)? };
            check_jwks(&jwks).map_err(anyhow::Error::msg)?;
            let scopes = parse_scopes(&scopes)?;
            register(&pool, &id, &name, &jwks, &scopes, &limits).await?;
            kafka_principal(cli.kafka_principal_command.as_deref(), "grant", &id)?;
            println!("registered {id}");
        }
        Command::List => {
            println!("{:<20} {:<24} {:<9} {:<10} {:<8} {:<30} pmm1 key ids", "id", "name", "status", "rate/s", "burst", "scopes");
            for p in db::partners::list(&pool).await? {
                let status = if p.disabled_at.is_some() { "disabled" } else { "active" };
                let rate = p.rate_per_second.map_or("default".to_owned(), |r| r.to_string());
                let burst = p.rate_burst.map_or("default".to_owned(), |b| b.to_string());
                println!(
                    "{:<20} {:<24} {:<9} {:<10} {:<8} {:<30} {}",
                    p.partner_id,
                    p.name,
                    status,
                    rate,
                    burst,
                    p.scopes.join(" "),
                    p.pmm1_key_ids.join(",")
                );
            }
        }
        Command::Disable { id } => {
            toggle(&pool, &id, true).await?;
            kafka_principal(cli.kafka_principal_command.as_deref(), "revoke", &id)?;
        }
        Command::Enable { id } => {
            toggle(&pool, &id, false).await?;
            kafka_principal(cli.kafka_principal_command.as_deref(), "grant", &id)?;
        }
        Command::DemoToken { id, scopes, limits, token_url } => {
            let token_url = token_url.unwrap_or_else(|| {
                let base = cli.common.fhir_base_url.trim_end_matches('/');
                format!("{}{}", base.strip_suffix("/fhir").unwrap_or(base), api::routes::TOKEN)
            });
            let key = demo_key(&id)?;
            let jwks = ClientKey::jwks(&[&key]).to_string();
            register(&pool, &id, &format!("Demo partner {id}"), &jwks, &parse_scopes(&scopes)?, &limits).await?;
            let assertion = key.assertion(&id, &token_url, 240, None)?;
            let response = reqwest::Client::new()
                .post(&token_url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(token_request(&assertion, &scopes))
                .send()
                .await?;
            let status = response.status();
            let body: serde_json::Value = response.json().await?;
            // RFC 6749 §5.2: {"error": …, "error_description": …}.
            anyhow::ensure!(status.is_success(), "the token endpoint refused ({status}): {} {}", body["error"], body["error_description"]);
            println!("{}", body["access_token"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

fn parse_scopes(raw: &str) -> anyhow::Result<Vec<String>> {
    raw.split_whitespace().map(|s| Scope::parse(s).map(|s| s.to_string()).ok_or_else(|| anyhow::anyhow!("not a SMART system scope: {s}"))).collect()
}

async fn register(pool: &db::Pool, id: &str, name: &str, jwks: &str, scopes: &[String], limits: &Limits) -> anyhow::Result<()> {
    anyhow::ensure!(api::rest::parse_id(id).is_ok(), "the partner id must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '.'");
    let registration = db::partners::Registration {
        partner_id: id,
        name,
        jwks,
        scopes,
        rate_per_second: limits.rate,
        rate_burst: limits.burst,
        pmm1_key_ids: &limits.pmm1_key_ids,
    };
    db::partners::register(pool, &registration).await?;
    tracing::info!(partner = %id, "partner registered");
    Ok(())
}

async fn toggle(pool: &db::Pool, id: &str, disabled: bool) -> anyhow::Result<()> {
    anyhow::ensure!(db::partners::set_disabled(pool, id, disabled).await?, "no partner {id}");
    println!("{id} {}", if disabled { "disabled" } else { "enabled" });
    Ok(())
}

/// The demo partner's key, made once and kept (0600) under the state directory.
fn demo_key(id: &str) -> anyhow::Result<ClientKey> {
    let state = std::env::var_os("PLATFORM_STATE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fhir-platform")))
        .ok_or_else(|| anyhow::anyhow!("set PLATFORM_STATE_DIR or HOME"))?;
    let path = state.join("partners").join(format!("{id}.es384.p8"));
    if let Ok(der) = std::fs::read(&path) {
        return ClientKey::es384_from_pkcs8(&format!("{id}-1"), &der);
    }
    let (key, der) = ClientKey::generate_es384(&format!("{id}-1"))?;
    std::fs::create_dir_all(path.parent().unwrap_or(&state))?;
    std::fs::write(&path, der)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(key)
}
