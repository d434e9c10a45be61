//! [`TestApp`]: one test's own platform on the real services.

use crate::components::{self, Composer, Task};
use crate::env::{fresh_database, kafka_bootstrap, kafka_config, unique, workspace_binary};
use crate::logs::collect_logs;
use crate::partners::{KeyKind, TestPartner, register_partner};
use crate::wait::wait_applied;
use devtools::generator::{self, SorMessage};
use rdkafka::producer::FutureProducer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A fresh database and topic namespace for one test, and the one way to start each component
/// on them, register partners, and publish what the systems of record send. The composer's
/// consumer group is the test's label.
pub struct TestApp {
    pub url: String,
    pub pool: db::Pool,
    /// The topic namespace, with its trailing dot (`t_label_….`).
    pub prefix: String,
    pub kafka: platform::KafkaConfig,
    pub group: String,
    producer: FutureProducer,
    sent: AtomicUsize,
}

impl TestApp {
    /// A migrated database and an empty topic namespace.
    pub async fn new(label: &str) -> anyhow::Result<TestApp> {
        Self::with_database(label, true).await
    }

    /// As [`TestApp::new`]; with `migrate` false the database is left empty for the first
    /// component to migrate.
    pub async fn with_database(label: &str, migrate: bool) -> anyhow::Result<TestApp> {
        let (url, pool) = fresh_database(label, migrate).await?;
        let prefix = format!("{}.", unique(label));
        let kafka = kafka_config(&prefix);
        let producer = generator::producer(&kafka)?;
        Ok(TestApp { url, pool, prefix, kafka, group: label.to_owned(), producer, sent: AtomicUsize::new(0) })
    }

    /// A contract topic's name in this namespace.
    pub fn topic(&self, contract: &str) -> String {
        self.kafka.topic(contract)
    }

    pub async fn composer(&self, flags: &[&str]) -> anyhow::Result<Composer> {
        components::start_composer(&self.url, &self.prefix, &self.group, flags).await
    }

    pub async fn relay(&self, flags: &[&str]) -> anyhow::Result<Task> {
        components::start_relay(&self.url, &self.prefix, flags).await
    }

    pub async fn notifier(&self, flags: &[&str]) -> anyhow::Result<Task> {
        components::start_notifier(&self.url, &self.prefix, flags).await
    }

    /// Starts an API on this database; returns its origin (`http://127.0.0.1:port`).
    pub async fn api(&self, flags: &[&str]) -> anyhow::Result<String> {
        components::start_api(&self.url, flags).await
    }

    /// Registers a partner with a fresh key, `scopes` and the default rate limit.
    pub async fn partner(&self, id: &str, scopes: &str, kind: KeyKind) -> anyhow::Result<TestPartner> {
        register_partner(&self.pool, id, scopes, kind, None).await
    }

    /// Publishes `messages` as the systems of record do.
    pub async fn publish(&self, messages: &[SorMessage]) -> anyhow::Result<()> {
        generator::publish(&self.producer, &self.kafka, messages).await?;
        self.sent.fetch_add(messages.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Publishes `messages` and waits (60 s at most) until the composer applied everything
    /// published so far.
    pub async fn apply(&self, messages: &[SorMessage]) -> anyhow::Result<()> {
        self.publish(messages).await?;
        self.wait_applied(Duration::from_secs(60)).await
    }

    /// Waits until the composer applied everything published so far.
    pub async fn wait_applied(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_applied(&self.pool, &self.group, self.sent.load(Ordering::Relaxed), timeout).await
    }

    /// Counts `n` messages published by other means (e.g. raw bytes) toward [`Self::wait_applied`].
    pub fn count_sent(&self, n: usize) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Runs `fhirctl` against this platform; returns its standard output.
    pub fn fhirctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = std::process::Command::new(workspace_binary("fhirctl")?);
        command
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
            .env("KAFKA_TOPIC_PREFIX", &self.prefix)
            .env("FHIR_BASE_URL", components::FHIR_BASE_URL);
        collect_logs(&mut command, "fhirctl");
        let out = command.output()?;
        anyhow::ensure!(out.status.success(), "fhirctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `fhirctl --json …` output, one JSON object per line.
    pub fn fhirctl_json(&self, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.fhirctl(&all)?.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
    }
}
