//! One way to start each component of the platform for a test: in this process (composer,
//! relay, notifier, API) or as a child process (for SIGKILL tests). Each takes the test's
//! database and topic namespace plus extra flags; a flag given there replaces the test default.

use crate::env::{component_binary, kafka_bootstrap};
use crate::logs::{collect_logs, init_logs};
use clap::Parser;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The fhir base URL every test component uses (links in Bundles, Location headers).
pub const FHIR_BASE_URL: &str = "http://fhir.test/fhir";

/// `program`, the test defaults (those `flags` does not set), then `flags`.
fn arguments(program: &str, defaults: &[(&str, &str)], flags: &[&str]) -> Vec<String> {
    let mut args = vec![program.to_owned()];
    for (name, value) in defaults {
        if !flags.contains(name) {
            args.extend([(*name).to_owned(), (*value).to_owned()]);
        }
    }
    args.extend(flags.iter().map(|f| (*f).to_owned()));
    args
}

/// The test defaults every component shares: its database and topic namespace, and an
/// operations listener on a free port (tests run many components at once).
fn namespace<'a>(database_url: &'a str, kafka: &'a str, prefix: &'a str) -> [(&'static str, &'a str); 4] {
    [("--database-url", database_url), ("--kafka-bootstrap-servers", kafka), ("--kafka-topic-prefix", prefix), ("--ops-addr", "127.0.0.1:0")]
}

/// A composer running on its own thread in this process.
pub struct Composer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    pub metrics: Arc<composer::consumer::Metrics>,
    /// Its operations listener.
    pub ops_addr: std::net::SocketAddr,
}

impl Composer {
    /// Finishes the batch in hand and ends the thread; its error, if it failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        composer::stop(&self.stop, self.thread).await
    }
}

/// The configuration of a test composer: consumer group `group`, 4 database connections.
pub fn composer_config(database_url: &str, prefix: &str, group: &str, flags: &[&str]) -> anyhow::Result<composer::ComposerConfig> {
    init_logs();
    let kafka = kafka_bootstrap();
    let defaults = [
        namespace(database_url, &kafka, prefix).as_slice(),
        &[("--group-id", group), ("--fhir-base-url", FHIR_BASE_URL), ("--database-max-connections", "4")],
    ]
    .concat();
    Ok(composer::ComposerConfig::try_parse_from(arguments("composer", &defaults, flags))?)
}

pub async fn start_composer(database_url: &str, prefix: &str, group: &str, flags: &[&str]) -> anyhow::Result<Composer> {
    let composer::Running { stop, thread, metrics, ops_addr } = composer::spawn(composer_config(database_url, prefix, group, flags)?).await?;
    Ok(Composer { stop, thread, metrics, ops_addr })
}

/// A relay or a notifier running as a task in this process (`stop()` asks it to stop and
/// waits for it; `ops_addr` is its operations listener).
pub type Task = platform::ops::Running<tokio::task::JoinHandle<anyhow::Result<()>>>;

/// A relay publishing the outbox of `database_url` under the topic `prefix`.
pub async fn start_relay(database_url: &str, prefix: &str, flags: &[&str]) -> anyhow::Result<Task> {
    init_logs();
    let kafka = kafka_bootstrap();
    let defaults = namespace(database_url, &kafka, prefix);
    Ok(relay::spawn(relay::RelayConfig::try_parse_from(arguments("relay", &defaults, flags))?).await?)
}

/// A notifier for the Subscriptions of `database_url`, retrying after 0.5 s up to 2 s (a
/// deployment waits longer).
pub async fn start_notifier(database_url: &str, prefix: &str, flags: &[&str]) -> anyhow::Result<Task> {
    init_logs();
    let kafka = kafka_bootstrap();
    let defaults = [
        namespace(database_url, &kafka, prefix).as_slice(),
        &[("--fhir-base-url", FHIR_BASE_URL), ("--retry-base-ms", "500"), ("--retry-max-ms", "2000")],
    ]
    .concat();
    Ok(notifier::spawn(notifier::NotifierConfig::try_parse_from(arguments("notifier", &defaults, flags))?).await?)
}

/// Starts the API against `database_url` (on a free loopback port unless `--http-bind` is in
/// `flags`, with 4 database connections) and returns its origin. Its topics (the audit topic) are
/// in a namespace named after the database, so tests never see each other's messages.
pub async fn start_api(database_url: &str, flags: &[&str]) -> anyhow::Result<String> {
    serve_api(database_url, flags, false).await
}

/// As [`start_api`], over a pool that connects only when used: it starts even when its database
/// does not answer (the readiness tests).
pub async fn start_api_lazily(database_url: &str, flags: &[&str]) -> anyhow::Result<String> {
    serve_api(database_url, flags, true).await
}

async fn serve_api(database_url: &str, flags: &[&str], lazy: bool) -> anyhow::Result<String> {
    init_logs();
    let prefix = format!("{}.", api_topic_prefix(database_url));
    let kafka = kafka_bootstrap();
    let defaults = [
        namespace(database_url, &kafka, &prefix).as_slice(),
        &[("--http-bind", "127.0.0.1:0"), ("--fhir-base-url", FHIR_BASE_URL), ("--database-max-connections", "4")],
    ]
    .concat();
    let config = api::Config::try_parse_from(arguments("api", &defaults, flags))?;
    let app = if lazy {
        let pool = sqlx::postgres::PgPoolOptions::new().acquire_timeout(std::time::Duration::from_secs(1)).connect_lazy(database_url)?;
        api::Application::build_with_pool(&config, pool).await?
    } else {
        api::Application::build(&config).await?
    };
    let addr = app.local_addr()?;
    tokio::spawn(app.run_until_stopped());
    Ok(format!("http://{addr}"))
}

/// The topic namespace of an API started on `database_url` (without the trailing dot).
pub fn api_topic_prefix(database_url: &str) -> String {
    let path = database_url.split('?').next().unwrap_or_default();
    path.rsplit('/').next().unwrap_or("api").to_owned()
}

/// Child processes killed when dropped, however the test ends (a child left running would also
/// hold the test's output open).
pub struct Children(pub Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A component as a child process of this workspace's binary `name` (configured through its
/// environment, as a deployment does), for tests that SIGKILL it.
pub fn spawn_child(name: &str, database_url: &str, prefix: &str, env: &[(&str, &str)]) -> anyhow::Result<std::process::Child> {
    let mut command = std::process::Command::new(component_binary(name)?);
    command
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
        .env("KAFKA_TOPIC_PREFIX", prefix)
        .env("FHIR_BASE_URL", FHIR_BASE_URL)
        .env("LOG_LEVEL", "warn")
        .env("OPS_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    // A test that reads the child's log names the file itself (see `tests::log_file`).
    if env.iter().any(|(k, _)| *k == "LOG_FILE") {
        command.stderr(std::process::Stdio::null());
    } else {
        collect_logs(&mut command, &format!("{name}-child"));
    }
    Ok(command.spawn()?)
}

#[cfg(test)]
mod tests {
    use super::arguments;

    #[test]
    fn flags_replace_the_defaults_they_name() {
        let args = arguments("api", &[("--http-bind", "127.0.0.1:0"), ("--fhir-base-url", "http://a/fhir")], &["--http-bind", "127.0.0.1:9"]);
        assert_eq!(args, ["api", "--fhir-base-url", "http://a/fhir", "--http-bind", "127.0.0.1:9"]);
    }
}
