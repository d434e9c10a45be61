//! Where the real services are, and fresh, isolated pieces of them for one test: a database
//! named `t_…` and a topic namespace.

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://fhir:fhir@127.0.0.1:5432/fhir?sslmode=disable".to_owned())
}

pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A short unique name for this test's database and topics.
pub fn unique(label: &str) -> String {
    format!("t_{label}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A path in this checkout, relative to the repository root. Resolved when the test runs (cargo
/// runs tests in their package's directory, and sets `CARGO_MANIFEST_DIR`), not when it is
/// compiled: the shared target directory can hold test binaries built from another clone.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    package.join("..").join(relative)
}

/// Creates an empty database (named `t_…`; `scripts/test` drops old ones) and returns its URL,
/// migrated when `migrate` is set.
pub async fn fresh_database(label: &str, migrate: bool) -> anyhow::Result<(String, db::Pool)> {
    let base = database_url();
    let admin = db::connect(&base, 1).await?;
    let name = unique(label);
    db::create_database(&admin, &name).await?;
    admin.close().await;
    let url = db::url_with_database(&base, &name)?;
    let pool = db::connect(&url, 8).await?;
    if migrate {
        db::migrate(&pool).await?;
    }
    Ok((url, pool))
}

/// An admin client of the test broker.
pub fn admin_client() -> anyhow::Result<AdminClient<DefaultClientContext>> {
    platform::kafka::admin(&kafka_config(""))
}

/// Creates a topic of `partitions` (delete policy), as the platform creates its own.
pub async fn create_topic(name: &str, partitions: i32) -> anyhow::Result<()> {
    let kafka = platform::KafkaConfig { topic_partitions: partitions, ..kafka_config("") };
    platform::kafka::create(&kafka, &[(name.to_owned(), platform::kafka::Retention::Delete(None))]).await
}

/// The contract topic names in a test namespace, as a component with that prefix sees them.
pub fn kafka_config(prefix: &str) -> platform::KafkaConfig {
    platform::KafkaConfig {
        bootstrap_servers: kafka_bootstrap(),
        topic_prefix: prefix.to_owned(),
        message_max_bytes: 1_048_576,
        topic_partitions: 3,
        replication_factor: 1,
        topic_min_insync_replicas: None,
        properties_file: None,
    }
}

/// A binary of this workspace, built next to the test executables (`cargo build --workspace`).
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).ok_or_else(|| anyhow::anyhow!("unexpected test path"))?;
    let bin = dir.join(name);
    anyhow::ensure!(bin.exists(), "{} not built: run `cargo build --workspace` first (scripts/test does)", bin.display());
    Ok(bin)
}

/// A free loopback address (bound, then released for a child process to take).
pub fn free_address() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

/// The binary of the component `name` a test runs as a child process: from
/// `PLATFORM_TEST_COMPONENTS` (a directory, e.g. a release build's, for the fault test, which
/// measures freshness) when set, else this workspace's build the tests run from.
pub fn component_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    match std::env::var_os("PLATFORM_TEST_COMPONENTS") {
        Some(dir) => {
            let bin = std::path::PathBuf::from(dir).join(name);
            anyhow::ensure!(bin.exists(), "{} not built (PLATFORM_TEST_COMPONENTS)", bin.display());
            Ok(bin)
        }
        None => workspace_binary(name),
    }
}

/// Where `scripts/test` keeps the test tools (the Python venv, the Java classpath) and the
/// services' state: `PLATFORM_STATE_DIR`, else `~/.cache/fhir-platform`.
pub fn state_dir() -> std::path::PathBuf {
    std::env::var_os("PLATFORM_STATE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/fhir-platform"))
}
